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
  d["strategy"] = r.strategy;
  d["steps"] = r.steps;
  d["tokens"] = r.tokens;
  d["accesses"] = r.accesses;
  d["hits"] = r.hits;
  d["misses"] = r.misses;
  d["cpu_experts"] = r.cpu_experts;
  d["hit_rate"] = r.accesses ? static_cast<double>(r.hits) / r.accesses : 0.0;
  d["prefetch_hits"] = r.cache.prefetch_hits;
  d["prefetch_issued"] = r.cache.prefetch_issued;
  d["prefetch_used"] = r.cache.prefetch_used;
  d["prefetch_wasted"] = r.cache.prefetch_wasted;
  d["evictions"] = r.cache.evictions;
  d["bytes_demand"] = r.bytes_demand;
  d["bytes_prefetch"] = r.bytes_prefetch;
  d["modelled_seconds"] = r.modelled_seconds;
  d["device_busy_seconds"] = r.device_busy_seconds;
  d["link_busy_seconds"] = r.link_busy_seconds;
  d["cpu_busy_seconds"] = r.cpu_busy_seconds;
  d["bound_seconds"] = r.bound_seconds;
  d["compute_floor_seconds"] = r.compute_floor_seconds;
  return d;
}

std::vector<ReplayStep> steps_of(Ints requests, Ints tokens, Ints layers, Ints offsets,
                                 Ints experts) {
  py::ssize_t n = requests.size();
  EF_CHECK(tokens.size() == n && layers.size() == n && offsets.size() == n + 1,
           "replay needs requests, tokens and layers of one length and offsets one longer");
  auto off = offsets.unchecked<1>();
  EF_CHECK(off(n) == experts.size(), "offsets end at ", off(n), " but there are ", experts.size(),
           " experts");
  std::vector<ReplayStep> steps(n);
  auto req = requests.unchecked<1>(), tok = tokens.unchecked<1>(), lay = layers.unchecked<1>();
  auto exp = experts.unchecked<1>();
  for (py::ssize_t i = 0; i < n; ++i) {
    EF_CHECK(off(i) <= off(i + 1), "offsets decrease at step ", i);
    steps[i].request = req(i);
    steps[i].token = tok(i);
    steps[i].layer = lay(i);
    for (int j = off(i); j < off(i + 1); ++j) steps[i].experts.push_back(exp(j));
  }
  return steps;
}

double number(const py::dict& d, const char* name) {
  EF_CHECK(d.contains(name), "missing cost \"", name, "\"");
  return d[name].cast<double>();
}

// Options from the Python side's plain dicts: `options` (cache and replay), `costs`
// (rates and sizes, in the cost model's units).
ReplayOptions options_of(const py::dict& options, const py::dict& costs) {
  ReplayOptions o;
  o.policy.name = options["policy"].cast<std::string>();
  o.policy.static_keys = options["static_keys"].cast<std::vector<int>>();
  o.policy.lfu_decay = options["lfu_decay"].cast<double>();
  o.policy.lfu_decay_period = options["lfu_decay_period"].cast<std::uint64_t>();
  o.capacity = options["capacity"].cast<int>();
  o.per_layer = options["per_layer"].cast<bool>();
  o.reset_per_request = options["reset_per_request"].cast<bool>();
  o.warmup_tokens = options["warmup_tokens"].cast<int>();
  o.history = options["history"].cast<bool>();
  o.prefetch_top = options["prefetch_top"].cast<int>();
  o.speculative_recall = options["speculative_recall"].cast<double>();
  o.rates.link_bytes_per_s = number(costs, "link_bytes_per_s");
  o.rates.device_bytes_per_s = number(costs, "device_bytes_per_s");
  o.rates.device_flops_per_s = number(costs, "device_flops_per_s");
  o.rates.cpu_bytes_per_s = number(costs, "cpu_bytes_per_s");
  o.rates.cpu_flops_per_s = number(costs, "cpu_flops_per_s");
  o.model.expert_bytes = number(costs, "expert_bytes");
  o.model.expert_flops_per_token = number(costs, "expert_flops_per_token");
  o.model.activation_bytes_per_token = number(costs, "activation_bytes_per_token");
  o.model.dense_bytes_per_layer = number(costs, "dense_bytes_per_layer");
  o.model.dense_extra_seconds = number(costs, "dense_extra_seconds");
  return o;
}

}  // namespace

void register_replay(py::module_& m) {
  m.def(
      "replay",
      [](int num_layers, int experts_per_layer, Ints requests, Ints tokens, Ints layers,
         Ints offsets, Ints experts, const py::dict& options, const py::dict& costs) {
        std::vector<ReplayStep> steps = steps_of(requests, tokens, layers, offsets, experts);
        ReplayOptions o = options_of(options, costs);
        ReplayResult result;
        {
          py::gil_scoped_release release;
          result = replay(num_layers, experts_per_layer, steps, o);
        }
        return counters(result);
      },
      py::arg("num_layers"), py::arg("experts_per_layer"), py::arg("requests"), py::arg("tokens"),
      py::arg("layers"), py::arg("offsets"), py::arg("experts"), py::arg("options"),
      py::arg("costs"));
  m.def(
      "replay_strategies",
      [](int num_layers, int experts_per_layer, Ints requests, Ints tokens, Ints layers,
         Ints offsets, Ints experts, const py::dict& options, const py::dict& costs,
         const std::vector<std::string>& strategies) {
        std::vector<ReplayStep> steps = steps_of(requests, tokens, layers, offsets, experts);
        ReplayOptions o = options_of(options, costs);
        std::vector<ReplayResult> results;
        {
          py::gil_scoped_release release;
          results = replay_strategies(num_layers, experts_per_layer, steps, o, strategies);
        }
        py::list out;
        for (const ReplayResult& r : results) out.append(counters(r));
        return out;
      },
      py::arg("num_layers"), py::arg("experts_per_layer"), py::arg("requests"), py::arg("tokens"),
      py::arg("layers"), py::arg("offsets"), py::arg("experts"), py::arg("options"),
      py::arg("costs"), py::arg("strategies"));
  m.def("strategy_names", &strategy_names);
}

}  // namespace expertflow::python
