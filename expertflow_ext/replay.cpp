#include "expertflow/replay.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bindings.h"
#include "expertflow/error.h"

namespace py = pybind11;

namespace expertflow::python {

namespace {

using Ints = py::array_t<int, py::array::c_style | py::array::forcecast>;

py::dict counters(const ReplayResult& r) {
  py::dict d;
  d["steps"] = r.steps;
  d["accesses"] = r.accesses;
  d["hits"] = r.hits;
  d["misses"] = r.misses;
  d["hit_rate"] = r.accesses ? static_cast<double>(r.hits) / r.accesses : 0.0;
  d["prefetch_hits"] = r.cache.prefetch_hits;
  d["prefetch_issued"] = r.cache.prefetch_issued;
  d["prefetch_used"] = r.cache.prefetch_used;
  d["prefetch_wasted"] = r.cache.prefetch_wasted;
  d["evictions"] = r.cache.evictions;
  d["bytes_demand"] = r.bytes_demand;
  d["modelled_seconds"] = r.modelled_seconds;
  d["link_floor_seconds"] = r.link_floor_seconds;
  return d;
}

}  // namespace

void register_replay(py::module_& m) {
  m.def(
      "replay",
      [](int num_layers, int experts_per_layer, Ints requests, Ints tokens, Ints layers,
         Ints offsets, Ints experts, const std::string& policy, int capacity, bool per_layer,
         bool reset_per_request, int warmup_tokens, bool history, int prefetch_top,
         std::size_t expert_bytes, double link_gbps, double layer_compute_us,
         std::vector<int> static_keys, double lfu_decay, std::uint64_t lfu_decay_period) {
        py::ssize_t n = requests.size();
        EF_CHECK(tokens.size() == n && layers.size() == n && offsets.size() == n + 1,
                 "replay needs requests, tokens and layers of one length and offsets one longer");
        auto off = offsets.unchecked<1>();
        EF_CHECK(off(n) == experts.size(), "offsets end at ", off(n), " but there are ",
                 experts.size(), " experts");
        std::vector<ReplayStep> steps(n);
        auto req = requests.unchecked<1>(), tok = tokens.unchecked<1>(),
             lay = layers.unchecked<1>();
        auto exp = experts.unchecked<1>();
        for (py::ssize_t i = 0; i < n; ++i) {
          EF_CHECK(off(i) <= off(i + 1), "offsets decrease at step ", i);
          steps[i].request = req(i);
          steps[i].token = tok(i);
          steps[i].layer = lay(i);
          for (int j = off(i); j < off(i + 1); ++j) steps[i].experts.push_back(exp(j));
        }
        ReplayOptions options;
        options.policy.name = policy;
        options.policy.static_keys = std::move(static_keys);
        options.policy.lfu_decay = lfu_decay;
        options.policy.lfu_decay_period = lfu_decay_period;
        options.capacity = capacity;
        options.per_layer = per_layer;
        options.reset_per_request = reset_per_request;
        options.warmup_tokens = warmup_tokens;
        options.history = history;
        options.prefetch_top = prefetch_top;
        options.expert_bytes = expert_bytes;
        options.link_gbps = link_gbps;
        options.layer_compute_us = layer_compute_us;
        ReplayResult result;
        {
          py::gil_scoped_release release;
          result = replay(num_layers, experts_per_layer, steps, options);
        }
        return counters(result);
      },
      py::arg("num_layers"), py::arg("experts_per_layer"), py::arg("requests"), py::arg("tokens"),
      py::arg("layers"), py::arg("offsets"), py::arg("experts"), py::arg("policy") = "lru",
      py::arg("capacity"), py::arg("per_layer") = false, py::arg("reset_per_request") = true,
      py::arg("warmup_tokens") = 0, py::arg("history") = false, py::arg("prefetch_top") = 0,
      py::arg("expert_bytes") = 1, py::arg("link_gbps") = 16.0, py::arg("layer_compute_us") = 0.0,
      py::arg("static_keys") = std::vector<int>{}, py::arg("lfu_decay") = 1.0,
      py::arg("lfu_decay_period") = 0);
}

}  // namespace expertflow::python
