#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>

#include "bindings.h"
#include "expertflow/expert_cache.h"

namespace py = pybind11;

namespace expertflow::python {

namespace {

py::dict counters(const LayerStats& s) {
  py::dict d;
  d["hits"] = s.hits;
  d["prefetch_hits"] = s.prefetch_hits;
  d["misses"] = s.misses;
  d["evictions"] = s.evictions;
  d["prefetch_issued"] = s.prefetch_issued;
  d["prefetch_used"] = s.prefetch_used;
  d["prefetch_late"] = s.prefetch_late;
  d["prefetch_wasted"] = s.prefetch_wasted;
  d["prefetch_cancelled"] = s.prefetch_cancelled;
  d["prefetch_dropped"] = s.prefetch_dropped;
  d["prefetch_failed"] = s.prefetch_failed;
  d["predicted"] = s.predicted;
  d["predicted_used"] = s.predicted_used;
  d["bytes_demand"] = s.bytes_demand;
  d["bytes_prefetch"] = s.bytes_prefetch;
  d["stall_seconds"] = s.stall_seconds;
  return d;
}

py::dict stats_dict(const CacheStats& s) {
  py::dict d;
  d["acquires"] = s.acquires;
  for (auto item : counters(s)) d[item.first] = item.second;
  py::list layers;
  for (const LayerStats& layer : s.layers) layers.append(counters(layer));
  d["layers"] = layers;
  return d;
}

std::vector<std::uintptr_t> addresses(const std::vector<void*>& pointers) {
  std::vector<std::uintptr_t> out(pointers.size());
  for (std::size_t i = 0; i < pointers.size(); ++i)
    out[i] = reinterpret_cast<std::uintptr_t>(pointers[i]);
  return out;
}

}  // namespace

void register_cache(py::module_& m) {
  using Release = py::call_guard<py::gil_scoped_release>;
  py::class_<ExpertCache>(m, "ExpertCache")
      .def(py::init([](std::shared_ptr<HostPool> pool, int num_slots, const std::string& policy,
                       int prefetch_streams, double lfu_decay, std::uint64_t lfu_decay_period,
                       std::vector<int> static_keys, std::vector<std::vector<int>> future) {
             PolicyOptions options;
             options.name = policy;
             options.lfu_decay = lfu_decay;
             options.lfu_decay_period = lfu_decay_period;
             options.static_keys = std::move(static_keys);
             options.future = std::move(future);
             return std::make_unique<ExpertCache>(std::move(pool), num_slots, options,
                                                  prefetch_streams);
           }),
           // Allocating the arena (cudaMalloc) and creating streams can take a while.
           py::arg("pool"), py::arg("num_slots"), py::arg("policy") = "lru",
           py::arg("prefetch_streams") = 1, py::arg("lfu_decay") = 1.0,
           py::arg("lfu_decay_period") = 0, py::arg("static_keys") = std::vector<int>{},
           py::arg("future") = std::vector<std::vector<int>>{}, Release())
      .def(
          "acquire",
          [](ExpertCache& c, int layer, const std::vector<int>& experts, std::uintptr_t stream,
             int stream_device) {
            return addresses(c.acquire(layer, experts, stream, stream_device));
          },
          py::arg("layer"), py::arg("experts"), py::arg("stream") = 0,
          py::arg("stream_device") = -1, Release())
      .def("prefetch", &ExpertCache::prefetch, py::arg("layer"), py::arg("experts"),
           py::arg("scores") = std::vector<float>{}, Release())
      .def("predict", &ExpertCache::predict, py::arg("layer"), py::arg("experts"),
           py::arg("scores") = std::vector<float>{})
      .def("release", &ExpertCache::release, py::arg("layer"), py::arg("experts"),
           py::arg("stream") = 0, py::arg("stream_device") = -1, Release())
      .def("stats",
           [](const ExpertCache& c) {
             CacheStats stats;
             {
               py::gil_scoped_release release;  // may wait for pending stall timers
               stats = c.stats();
             }
             return stats_dict(stats);
           })
      .def("reset_stats", &ExpertCache::reset_stats)
      .def(
          "slot_address",
          [](const ExpertCache& c, int slot) {
            return reinterpret_cast<std::uintptr_t>(c.slot_address(slot));
          },
          py::arg("slot"))
      .def("resident", &ExpertCache::resident, py::arg("layer"), py::arg("expert"))
      .def("pending_prefetches", &ExpertCache::pending_prefetches)
      .def("close", &ExpertCache::close, Release())
      .def_property_readonly("closed", &ExpertCache::closed)
      .def_property_readonly("num_slots", &ExpertCache::num_slots)
      .def_property_readonly("max_acquire", &ExpertCache::max_acquire)
      .def_property_readonly("slot_bytes", &ExpertCache::slot_bytes)
      .def_property_readonly("policy", &ExpertCache::policy_name);
}

}  // namespace expertflow::python
