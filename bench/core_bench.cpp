// Microbenchmarks of the ExpertFlow core: acquire on a hit, a miss's victim choice, the
// CPU backend's copy throughput and, on CUDA, pinned host-to-device throughput through
// the prefetch path. Each figure is measured several times; the table and the JSON file
// give the median and the extremes, and compare the median with the target of the issue.
//
//   core_bench [--backend cpu|cuda] [--out PATH] [--quick]
//
// See bench/README.md for what each benchmark does and the fields of the JSON file.
#include <sys/utsname.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <deque>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iomanip>
#include <memory>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "expertflow/backend.h"
#include "expertflow/eviction_policy.h"
#include "expertflow/expert_cache.h"
#include "expertflow/host_pool.h"

#ifdef EXPERTFLOW_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace ef = expertflow;

namespace {

using Clock = std::chrono::steady_clock;

constexpr std::size_t kKiB = 1024;
constexpr std::size_t kMiB = 1024 * kKiB;

double seconds(Clock::time_point from, Clock::time_point to) {
  return std::chrono::duration<double>(to - from).count();
}

double median_of(std::vector<double> values) {
  if (values.empty()) return std::nan("");
  std::sort(values.begin(), values.end());
  std::size_t n = values.size();
  return n % 2 == 1 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

std::vector<int> range(int n) {
  std::vector<int> out(n);
  std::iota(out.begin(), out.end(), 0);
  return out;
}

// ---------------------------------------------------------------------------------------
// Results

struct Target {
  enum class Kind { kNone, kAtMost, kAtLeast };
  Kind kind = Kind::kNone;
  double value = 0.0;

  static Target at_most(double v) { return {Kind::kAtMost, v}; }
  static Target at_least(double v) { return {Kind::kAtLeast, v}; }
  std::string str() const {
    if (kind == Kind::kNone) return "";
    std::ostringstream out;
    out << (kind == Kind::kAtMost ? "<= " : ">= ") << value;
    return out.str();
  }
};

// One figure, measured once per repetition.
struct Row {
  std::string metric;
  std::string unit;
  std::vector<double> samples;
  Target target;

  double median() const { return median_of(samples); }
  double min() const { return *std::min_element(samples.begin(), samples.end()); }
  double max() const { return *std::max_element(samples.begin(), samples.end()); }
  bool has_target() const { return target.kind != Target::Kind::kNone && !samples.empty(); }
  bool pass() const {
    double m = median();
    return target.kind == Target::Kind::kAtMost ? m <= target.value : m >= target.value;
  }
};

using Param = std::variant<std::int64_t, double, bool, std::string>;

struct Group {
  std::string name;
  std::string description;
  std::string status = "ok";  // "ok", "skipped: <reason>" or "error: <message>"
  std::vector<std::pair<std::string, Param>> params;
  std::deque<Row> rows;  // a deque, so that references to rows stay valid
  std::vector<std::string> notes;

  Row& row(const std::string& metric, const std::string& unit, Target target = {}) {
    for (Row& r : rows) {
      if (r.metric == metric) return r;
    }
    rows.push_back(Row{metric, unit, {}, target});
    return rows.back();
  }
  template <typename T>
  void param(const std::string& key, T value) {
    if constexpr (std::is_same_v<T, bool>) {
      params.emplace_back(key, Param(value));
    } else if constexpr (std::is_integral_v<T>) {
      params.emplace_back(key, Param(static_cast<std::int64_t>(value)));
    } else if constexpr (std::is_floating_point_v<T>) {
      params.emplace_back(key, Param(static_cast<double>(value)));
    } else {
      params.emplace_back(key, Param(std::string(value)));
    }
  }
};

struct Machine {
  std::string cpu_model;
  unsigned cores = 0;
  std::uint64_t mem_total_bytes = 0;
  std::string kernel;
  std::string compiler;
  bool ndebug = false;
  std::string date_utc;
  ef::BuildInfo build;
  std::string device;  // the device the benchmarks ran on
};

// ---------------------------------------------------------------------------------------
// JSON

class JsonWriter {
 public:
  std::string str() const { return out_.str() + "\n"; }

  void begin_object() { open('{'); }
  void end_object() { close('}'); }
  void begin_array() { open('['); }
  void end_array() { close(']'); }

  void key(const std::string& k) {
    separate();
    write_string(k);
    out_ << ": ";
    after_key_ = true;
  }
  void value(const std::string& v) {
    prefix();
    write_string(v);
  }
  void value(const char* v) { value(std::string(v)); }
  void value(bool v) {
    prefix();
    out_ << (v ? "true" : "false");
  }
  void value(double v) {
    prefix();
    if (std::isfinite(v)) {
      out_ << std::setprecision(10) << v;
    } else {
      out_ << "null";
    }
  }
  template <typename T,
            std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool>, int> = 0>
  void value(T v) {
    prefix();
    out_ << v;
  }
  void value(const Param& p) {
    std::visit([this](const auto& v) { value(v); }, p);
  }
  template <typename T>
  void field(const std::string& k, const T& v) {
    key(k);
    value(v);
  }

 private:
  void separate() {
    if (first_.empty()) return;
    if (!first_.back()) out_ << ',';
    first_.back() = false;
    out_ << '\n' << std::string(2 * first_.size(), ' ');
  }
  void prefix() {
    if (after_key_) {
      after_key_ = false;
    } else {
      separate();
    }
  }
  void open(char c) {
    prefix();
    out_ << c;
    first_.push_back(true);
  }
  void close(char c) {
    bool empty = first_.back();
    first_.pop_back();
    if (!empty) out_ << '\n' << std::string(2 * first_.size(), ' ');
    out_ << c;
  }
  void write_string(const std::string& s) {
    out_ << '"';
    for (unsigned char c : s) {
      switch (c) {
        case '"':
          out_ << "\\\"";
          break;
        case '\\':
          out_ << "\\\\";
          break;
        case '\n':
          out_ << "\\n";
          break;
        case '\t':
          out_ << "\\t";
          break;
        case '\r':
          out_ << "\\r";
          break;
        default:
          if (c < 0x20) {
            char buf[8];
            std::snprintf(buf, sizeof buf, "\\u%04x", c);
            out_ << buf;
          } else {
            out_ << c;
          }
      }
    }
    out_ << '"';
  }

  std::ostringstream out_;
  std::vector<bool> first_;  // per open container: nothing written in it yet
  bool after_key_ = false;
};

std::string to_json(const Machine& machine, const std::string& backend, bool quick,
                    const std::vector<Group>& groups) {
  JsonWriter w;
  w.begin_object();
  w.field("schema", "expertflow.core_bench/1");
  w.field("backend", backend);
  w.field("quick", quick);

  w.key("machine");
  w.begin_object();
  w.field("cpu_model", machine.cpu_model);
  w.field("cores", machine.cores);
  w.field("mem_total_bytes", machine.mem_total_bytes);
  w.field("kernel", machine.kernel);
  w.field("compiler", machine.compiler);
  w.field("ndebug", machine.ndebug);
  w.field("date_utc", machine.date_utc);
  w.field("device", machine.device);
  w.key("build_info");
  w.begin_object();
  w.field("version", machine.build.version);
  w.field("cuda_runtime", machine.build.cuda_runtime);
  w.key("backends");
  w.begin_array();
  for (const ef::BackendInfo& b : machine.build.backends) {
    w.begin_object();
    w.field("name", b.name);
    w.field("built", b.built);
    w.field("usable", b.usable);
    w.field("reason", b.reason);
    w.field("device_count", b.device_count);
    w.end_object();
  }
  w.end_array();
  w.end_object();
  w.end_object();

  int passed = 0, failed = 0, skipped = 0, errors = 0;
  w.key("benchmarks");
  w.begin_array();
  for (const Group& g : groups) {
    w.begin_object();
    w.field("name", g.name);
    w.field("description", g.description);
    w.field("status", g.status);
    if (g.status.rfind("skipped", 0) == 0) ++skipped;
    if (g.status.rfind("error", 0) == 0) ++errors;
    w.key("params");
    w.begin_object();
    for (const auto& [k, v] : g.params) w.field(k, v);
    w.end_object();
    w.key("results");
    w.begin_array();
    for (const Row& r : g.rows) {
      if (r.samples.empty()) continue;
      w.begin_object();
      w.field("metric", r.metric);
      w.field("unit", r.unit);
      w.field("median", r.median());
      w.field("min", r.min());
      w.field("max", r.max());
      w.key("samples");
      w.begin_array();
      for (double s : r.samples) w.value(s);
      w.end_array();
      if (r.has_target()) {
        w.key("target");
        w.begin_object();
        w.field("op", r.target.kind == Target::Kind::kAtMost ? "<=" : ">=");
        w.field("value", r.target.value);
        w.end_object();
        w.field("pass", r.pass());
        (r.pass() ? passed : failed)++;
      } else {
        w.key("target");
        w.begin_object();
        w.end_object();
      }
      w.end_object();
    }
    w.end_array();
    w.key("notes");
    w.begin_array();
    for (const std::string& n : g.notes) w.value(n);
    w.end_array();
    w.end_object();
  }
  w.end_array();

  w.key("summary");
  w.begin_object();
  w.field("targets_passed", passed);
  w.field("targets_failed", failed);
  w.field("benchmarks_skipped", skipped);
  w.field("benchmarks_failed_to_run", errors);
  w.end_object();
  w.end_object();
  return w.str();
}

// ---------------------------------------------------------------------------------------
// Table

void print_group(const Group& g) {
  std::printf("\n== %s: %s\n", g.name.c_str(), g.description.c_str());
  if (g.status != "ok") std::printf("   %s\n", g.status.c_str());
  if (!g.rows.empty()) {
    std::printf("   %-34s %-10s %11s %11s %11s %10s  %s\n", "metric", "unit", "median", "min",
                "max", "target", "result");
  }
  for (const Row& r : g.rows) {
    if (r.samples.empty()) continue;
    int digits = r.unit == "x" ? 3 : r.unit == "GB/s" ? 2 : 1;
    std::printf("   %-34s %-10s %11.*f %11.*f %11.*f %10s  %s\n", r.metric.c_str(), r.unit.c_str(),
                digits, r.median(), digits, r.min(), digits, r.max(), r.target.str().c_str(),
                r.has_target() ? (r.pass() ? "PASS" : "FAIL") : "");
  }
  for (const std::string& n : g.notes) std::printf("   note: %s\n", n.c_str());
  std::fflush(stdout);
}

// ---------------------------------------------------------------------------------------
// Machine description

std::string read_cpuinfo_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) {
      auto colon = line.find(':');
      if (colon != std::string::npos) {
        std::string v = line.substr(colon + 1);
        v.erase(0, v.find_first_not_of(" \t"));
        return v;
      }
    }
  }
  return "unknown";
}

// A field of /proc/meminfo in bytes, 0 when absent.
std::uint64_t read_meminfo(const std::string& field) {
  std::ifstream in("/proc/meminfo");
  std::string name;
  std::uint64_t kib = 0;
  std::string unit;
  while (in >> name >> kib) {
    std::getline(in, unit);
    if (name == field + ":") return kib * 1024;
  }
  return 0;
}

std::string utc_now() {
  std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

std::string compiler_version() {
#if defined(__clang__)
  return __VERSION__;
#elif defined(__GNUC__)
  return std::string("GCC ") + __VERSION__;
#else
  return __VERSION__;
#endif
}

const ef::BackendInfo* find_backend(const ef::BuildInfo& info, const std::string& name) {
  for (const ef::BackendInfo& b : info.backends) {
    if (b.name == name) return &b;
  }
  return nullptr;
}

Machine describe_machine() {
  Machine m;
  m.cpu_model = read_cpuinfo_model();
  m.cores = std::thread::hardware_concurrency();
  m.mem_total_bytes = read_meminfo("MemTotal");
  utsname u{};
  if (uname(&u) == 0) m.kernel = std::string(u.sysname) + " " + u.release + " " + u.machine;
  m.compiler = compiler_version();
#ifdef NDEBUG
  m.ndebug = true;
#endif
  m.date_utc = utc_now();
  m.build = ef::build_info();
  return m;
}

// ---------------------------------------------------------------------------------------
// Helpers shared by the benchmarks

#ifdef EXPERTFLOW_WITH_CUDA
void cuda_check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
  }
}
#endif

// Gives every blob its own bytes (and faults the pool's pages in before any timing).
void fill_pool(ef::HostPool& pool) {
  const ef::ExpertLayout& layout = pool.layout();
  for (int key = 0; key < layout.num_keys(); ++key) {
    std::byte* blob = pool.blob(key);
    std::size_t bytes = layout.bytes(key);
    std::memset(blob, 0x5a ^ (key & 0xff), bytes);
    if (bytes >= 2 * sizeof(int)) {
      std::memcpy(blob, &key, sizeof key);
      std::memcpy(blob + bytes - sizeof key, &key, sizeof key);
    }
  }
}

// Blocks the host until the work enqueued on `stream` so far has finished.
void sync_stream(ef::Backend& backend, ef::StreamHandle stream) {
  std::unique_ptr<ef::Fence> fence = backend.create_fence();
  backend.record(*fence, stream);
  backend.synchronize(*fence);
}

// Whether `slot` (device memory on CUDA) holds the bytes of `key`.
bool slot_holds(ef::Backend& backend, const ef::HostPool& pool, const void* slot, int key) {
  std::size_t bytes = pool.layout().bytes(key);
  if (backend.kind() == ef::DeviceKind::kCpu) {
    return std::memcmp(slot, pool.blob(key), bytes) == 0;
  }
#ifdef EXPERTFLOW_WITH_CUDA
  std::size_t n = std::min<std::size_t>(bytes, 64 * kKiB);
  std::vector<std::byte> head(n), tail(n);
  cuda_check(cudaMemcpy(head.data(), slot, n, cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
  cuda_check(cudaMemcpy(tail.data(), static_cast<const std::byte*>(slot) + bytes - n, n,
                        cudaMemcpyDeviceToHost),
             "cudaMemcpy D2H");
  return std::memcmp(head.data(), pool.blob(key), n) == 0 &&
         std::memcmp(tail.data(), pool.blob(key) + bytes - n, n) == 0;
#else
  return false;
#endif
}

std::string stats_summary(const ef::CacheStats& s) {
  std::ostringstream out;
  out << "acquires=" << s.acquires << " hits=" << s.hits << " prefetch_hits=" << s.prefetch_hits
      << " misses=" << s.misses << " evictions=" << s.evictions
      << " prefetch_issued=" << s.prefetch_issued << " prefetch_cancelled=" << s.prefetch_cancelled
      << " bytes_demand=" << s.bytes_demand << " bytes_prefetch=" << s.bytes_prefetch;
  return out.str();
}

// Prefetches `experts` of `layer` and returns once every copy it queued is issued: done on
// the CPU backend, enqueued on its stream on CUDA (an acquire then makes the caller's
// stream wait for it). The public API has no completion call, so this polls the cache's
// prefetch byte count, sleeping between polls to leave the cores to the copy workers.
// Notes a warning when a throughput run did not copy every expert by prefetch exactly once.
void check_all_prefetched(Group& g, const std::string& label, const ef::CacheStats& s,
                          std::uint64_t expected) {
  if (s.misses != 0 || s.prefetch_issued != expected || s.prefetch_hits != expected) {
    g.notes.push_back("WARNING: " + label + ": expected " + std::to_string(expected) +
                      " prefetch copies and hits, no miss; stats: " + stats_summary(s));
  }
}

void prefetch_and_wait(ef::ExpertCache& cache, int layer, const std::vector<int>& experts) {
  const ef::CacheStats before = cache.stats();
  cache.prefetch(layer, experts, {});
  const ef::CacheStats queued = cache.stats();
  const ef::ExpertLayout& layout = cache.pool().layout();
  std::uint64_t expected = 0;
  if (queued.prefetch_issued - before.prefetch_issued == experts.size()) {
    for (int e : experts) expected += layout.bytes(layout.key(layer, e));
  } else {
    throw std::runtime_error("prefetch queued " +
                             std::to_string(queued.prefetch_issued - before.prefetch_issued) +
                             " copies for " + std::to_string(experts.size()) +
                             " missing experts; stats: " + stats_summary(queued));
  }
  const auto deadline = Clock::now() + std::chrono::seconds(60);
  while (cache.stats().bytes_prefetch - before.bytes_prefetch < expected) {
    if (Clock::now() > deadline) {
      throw std::runtime_error("prefetch copies not issued within 60 s; stats: " +
                               stats_summary(cache.stats()));
    }
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

double gbps(std::size_t bytes, double secs) { return static_cast<double>(bytes) / secs / 1e9; }

// One line per benchmark, shared by the run and by its "skipped" record.
constexpr const char* kAcquireHitInfo =
    "acquire/release of resident experts, top-8 of 64 on 8 layers, 512 slots";
constexpr const char* kVictimChoiceInfo =
    "acquire of one missing expert with 1,024 full slots, minus a hit and the copy";
constexpr const char* kCpuCopyInfo =
    "CPU backend: demand and prefetch copies against memcpy of the same bytes";
constexpr const char* kCudaH2dInfo =
    "CUDA: pinned host-to-device copies through prefetch against one cudaMemcpy";

struct Env {
  std::shared_ptr<ef::Backend> backend;
  ef::StreamHandle stream = 0;  // the stream acquire and release name
  bool quick = false;
};

// ---------------------------------------------------------------------------------------
// 1. acquire on a hit

Group bench_acquire_hit(const Env& env) {
  constexpr int kLayers = 8, kExperts = 64, kTopK = 8, kSlots = 512;
  constexpr std::size_t kBlob = 4 * kKiB;
  const int passes = env.quick ? 300 : 3000;  // a pass acquires top-8 on every layer
  const int reps = env.quick ? 3 : 7;

  Group g;
  g.name = "acquire_hit";
  g.description = kAcquireHitInfo;
  g.param("layers", kLayers);
  g.param("experts_per_layer", kExperts);
  g.param("top_k", kTopK);
  g.param("slots", kSlots);
  g.param("expert_bytes", kBlob);
  g.param("policy", "lru");
  g.param("passes_per_rep", passes);
  g.param("reps", reps);

  ef::Backend& backend = *env.backend;
  auto pool =
      std::make_shared<ef::HostPool>(env.backend, ef::ExpertLayout(kLayers, kExperts, kBlob));
  fill_pool(*pool);
  ef::ExpertCache cache(pool, kSlots, ef::PolicyOptions{}, 1);
  const std::vector<int> all = range(kExperts);
  for (int layer = 0; layer < kLayers; ++layer) {
    cache.acquire(layer, all, env.stream);
    cache.release(layer, all, env.stream);
  }
  sync_stream(backend, env.stream);
  int resident = 0;
  for (int layer = 0; layer < kLayers; ++layer) {
    for (int e = 0; e < kExperts; ++e) resident += cache.resident(layer, e) ? 1 : 0;
  }
  if (resident != kLayers * kExperts) {
    g.notes.push_back("WARNING: after loading every expert, " + std::to_string(resident) + " of " +
                      std::to_string(kLayers * kExperts) + " are resident");
  }

  // Random top-8 sets, a different one for every layer of a run of passes.
  std::mt19937 rng(20240601);
  constexpr int kSets = 1024;
  std::vector<std::vector<int>> sets(kSets);
  for (auto& set : sets) {
    std::vector<int> shuffled = all;
    std::shuffle(shuffled.begin(), shuffled.end(), rng);
    set.assign(shuffled.begin(), shuffled.begin() + kTopK);
  }

  auto run = [&](int n, double* acquire_s, double* release_s) {
    std::size_t next = 0;
    for (int pass = 0; pass < n; ++pass) {
      std::size_t first = next;
      auto t0 = Clock::now();
      for (int layer = 0; layer < kLayers; ++layer) {
        cache.acquire(layer, sets[next++ % kSets], env.stream);
      }
      auto t1 = Clock::now();
      next = first;
      for (int layer = 0; layer < kLayers; ++layer) {
        cache.release(layer, sets[next++ % kSets], env.stream);
      }
      auto t2 = Clock::now();
      *acquire_s += seconds(t0, t1);
      *release_s += seconds(t1, t2);
      if (backend.kind() != ef::DeviceKind::kCpu && pass % 64 == 63) {
        sync_stream(backend, env.stream);
      }
    }
  };

  double warm_a = 0, warm_r = 0;
  run(std::max(1, passes / 10), &warm_a, &warm_r);
  cache.reset_stats();

  Row& acquire = g.row("acquire", "ns/expert", Target::at_most(1000.0));
  Row& both = g.row("acquire+release", "ns/expert", Target::at_most(1000.0));
  Row& release = g.row("release", "ns/expert");
  const double experts = static_cast<double>(passes) * kLayers * kTopK;
  for (int rep = 0; rep < reps; ++rep) {
    double a = 0, r = 0;
    run(passes, &a, &r);
    acquire.samples.push_back(a / experts * 1e9);
    release.samples.push_back(r / experts * 1e9);
    both.samples.push_back((a + r) / experts * 1e9);
  }
  sync_stream(backend, env.stream);

  ef::CacheStats s = cache.stats();
  const std::uint64_t expected = static_cast<std::uint64_t>(reps) * passes * kLayers * kTopK;
  if (s.misses != 0 || s.hits != expected) {
    g.notes.push_back("WARNING: expected " + std::to_string(expected) +
                      " hits and no miss; stats: " + stats_summary(s));
  }
  g.notes.push_back("stats over the timed reps: " + stats_summary(s));
  cache.close();
  return g;
}

// ---------------------------------------------------------------------------------------
// 2. a miss's victim choice over 1,024 slots

struct VictimFigures {
  double miss_ns, hit_ns, copy_ns;
};

Group bench_victim_choice(const Env& env) {
  constexpr int kSlots = 1024, kLayers = 16, kExperts = 128, kFillPerLayer = kSlots / kLayers;
  constexpr std::size_t kBlob = 256;
  const int iterations = env.quick ? 300 : 3000;
  const int reps = env.quick ? 3 : 5;
  const std::vector<std::string> policies = {"lru", "lfu", "expertflow", "static"};

  Group g;
  g.name = "victim_choice";
  g.description = kVictimChoiceInfo;
  g.param("slots", kSlots);
  g.param("layers", kLayers);
  g.param("experts_per_layer", kExperts);
  g.param("expert_bytes", kBlob);
  g.param("iterations_per_rep", iterations);
  g.param("reps", reps);
  g.param("policies", "lru,lfu,expertflow,static");

  ef::Backend& backend = *env.backend;
  auto pool =
      std::make_shared<ef::HostPool>(env.backend, ef::ExpertLayout(kLayers, kExperts, kBlob));
  fill_pool(*pool);
  const ef::ExpertLayout& layout = pool->layout();
  const std::vector<int> fill = range(kFillPerLayer);

  // The copy a miss issues, alone: the backend's copy of one blob and its fence.
  const bool cpu = backend.kind() == ef::DeviceKind::kCpu;
  ef::StreamHandle copy_stream = cpu ? 0 : backend.create_stream(true);
  void* copy_dst = backend.alloc_device(kBlob);
  std::unique_ptr<ef::Fence> copy_fence = backend.create_fence();
  std::unique_ptr<ef::Fence> sync_fence = backend.create_fence();
  auto sync = [&]() {
    if (cpu) return;
    backend.record(*sync_fence, env.stream);
    backend.synchronize(*sync_fence);
  };

  for (const std::string& policy_name : policies) {
    ef::PolicyOptions options;
    options.name = policy_name;
    if (policy_name == "static") {
      // Every key of the fill but the last: the last slot is the one others stream through.
      for (int layer = 0; layer < kLayers; ++layer) {
        for (int e : fill) options.static_keys.push_back(layout.key(layer, e));
      }
      options.static_keys.pop_back();
    }
    ef::ExpertCache cache(pool, kSlots, options, 1);
    for (int layer = 0; layer < kLayers; ++layer) {
      cache.acquire(layer, fill, env.stream);
      cache.release(layer, fill, env.stream);
    }
    sync();

    std::mt19937 rng(7);
    std::uniform_int_distribution<int> pick_layer(0, kLayers - 1);
    std::uniform_int_distribution<int> pick_expert(0, kExperts - 1);
    std::uniform_real_distribution<float> pick_score(0.0f, 1.0f);

    // expertflow ranks predicted experts by distance and confidence: predict every
    // resident expert of a layer (prefetch of resident experts copies nothing).
    auto predict_layer = [&](int layer) {
      std::vector<int> experts;
      std::vector<float> scores;
      for (int e = 0; e < kExperts; ++e) {
        if (cache.resident(layer, e)) {
          experts.push_back(e);
          scores.push_back(pick_score(rng));
        }
      }
      if (!experts.empty()) cache.prefetch(layer, experts, scores);
    };
    const bool predict = policy_name == "expertflow";
    if (predict) {
      for (int layer = 0; layer < kLayers; ++layer) predict_layer(layer);
    }

    int resident = 0;
    for (int layer = 0; layer < kLayers; ++layer) {
      for (int e = 0; e < kExperts; ++e) resident += cache.resident(layer, e) ? 1 : 0;
    }
    const int expected_resident = policy_name == "static" ? kSlots - 1 : kSlots;
    if (resident != expected_resident) {
      g.notes.push_back("WARNING: " + policy_name + ": " + std::to_string(resident) +
                        " experts resident after the fill, expected " +
                        std::to_string(expected_resident));
    }

    auto one_rep = [&](int n) {
      std::vector<double> miss(n), hit(n), copy(n);
      for (int i = 0; i < n; ++i) {
        int layer, expert;
        do {
          layer = pick_layer(rng);
          expert = pick_expert(rng);
        } while (cache.resident(layer, expert));
        std::vector<int> one{expert};
        auto t0 = Clock::now();
        cache.acquire(layer, one, env.stream);
        auto t1 = Clock::now();
        cache.release(layer, one, env.stream);
        sync();
        miss[i] = seconds(t0, t1) * 1e9;
        if (predict) predict_layer(layer);

        do {
          layer = pick_layer(rng);
          expert = pick_expert(rng);
        } while (!cache.resident(layer, expert));
        one[0] = expert;
        t0 = Clock::now();
        cache.acquire(layer, one, env.stream);
        t1 = Clock::now();
        cache.release(layer, one, env.stream);
        sync();
        hit[i] = seconds(t0, t1) * 1e9;
        if (predict) predict_layer(layer);

        const int key = layout.key(layer, expert);
        t0 = Clock::now();
        backend.copy_to_device(copy_dst, pool->blob(key), kBlob, copy_stream);
        backend.record(*copy_fence, copy_stream);
        t1 = Clock::now();
        backend.synchronize(*copy_fence);
        copy[i] = seconds(t0, t1) * 1e9;
      }
      return VictimFigures{median_of(miss), median_of(hit), median_of(copy)};
    };

    one_rep(std::max(1, iterations / 10));
    cache.reset_stats();
    const std::uint64_t issued_before = cache.stats().prefetch_issued;
    Row& victim = g.row(policy_name + ": victim choice", "ns", Target::at_most(5000.0));
    Row& miss = g.row(policy_name + ": miss", "ns");
    Row& hit = g.row(policy_name + ": hit", "ns");
    Row& copy = g.row(policy_name + ": copy 256 B", "ns");
    for (int rep = 0; rep < reps; ++rep) {
      VictimFigures f = one_rep(iterations);
      miss.samples.push_back(f.miss_ns);
      hit.samples.push_back(f.hit_ns);
      copy.samples.push_back(f.copy_ns);
      victim.samples.push_back(f.miss_ns - f.hit_ns - f.copy_ns);
    }
    ef::CacheStats s = cache.stats();
    const std::uint64_t expected = static_cast<std::uint64_t>(reps) * iterations;
    if (s.misses != expected || s.hits != expected) {
      g.notes.push_back("WARNING: " + policy_name + ": expected " + std::to_string(expected) +
                        " misses and hits; stats: " + stats_summary(s));
    }
    if (policy_name != "static" && s.evictions != expected) {
      g.notes.push_back("WARNING: " + policy_name +
                        ": expected every miss to evict; stats: " + stats_summary(s));
    }
    if (s.prefetch_issued != issued_before) {
      g.notes.push_back("WARNING: " + policy_name +
                        ": predicting resident experts queued copies; stats: " + stats_summary(s));
    }
    cache.close();
  }
  g.notes.push_back(
      "victim choice = median miss - median hit - median copy, per rep; static keeps 1,023 "
      "experts and streams misses through the remaining slot, so its miss takes a slot freed "
      "at the last release rather than ranking victims");
  backend.free_device(copy_dst);
  if (!cpu) backend.destroy_stream(copy_stream);
  return g;
}

// ---------------------------------------------------------------------------------------
// 3. CPU backend copy throughput against memcpy

Group bench_cpu_copy(bool quick) {
  int experts = quick ? 16 : 64;
  std::size_t blob = quick ? 4 * kMiB : 16 * kMiB;
  const int reps = quick ? 3 : 7;
  constexpr int kTopK = 8;

  // Two layers in the pool, one in a cache's slots: keep that within half of what is free.
  const std::uint64_t available = read_meminfo("MemAvailable");
  while (available != 0 && blob > kMiB &&
         3.0 * experts * static_cast<double>(blob) > 0.5 * static_cast<double>(available)) {
    blob /= 2;
  }

  Group g;
  g.name = "cpu_copy";
  g.description = kCpuCopyInfo;
  g.param("experts_per_layer", experts);
  g.param("expert_bytes", blob);
  g.param("bytes_per_rep", static_cast<std::uint64_t>(experts) * blob);
  g.param("top_k", kTopK);
  g.param("reps", reps);
  g.param("prefetch_streams", "1,2");

  auto backend = ef::make_backend(ef::DeviceKind::kCpu);
  auto pool = std::make_shared<ef::HostPool>(backend, ef::ExpertLayout(2, experts, blob));
  fill_pool(*pool);
  const ef::ExpertLayout& layout = pool->layout();
  const std::vector<int> all = range(experts);
  const std::size_t total = static_cast<std::size_t>(experts) * blob;

  // Memcpy of the blobs of `layer` to the slots the cache put them in.
  auto run_memcpy = [&](int layer, const std::vector<void*>& dsts) {
    auto t0 = Clock::now();
    for (int e = 0; e < experts; ++e) std::memcpy(dsts[e], pool->blob(layout.key(layer, e)), blob);
    return seconds(t0, Clock::now());
  };
  auto check_slots = [&](int layer, const std::vector<void*>& dsts, const std::string& what) {
    for (int e = 0; e < experts; ++e) {
      if (!slot_holds(*backend, *pool, dsts[e], layout.key(layer, e))) {
        g.notes.push_back("WARNING: " + what + ": the slot of layer " + std::to_string(layer) +
                          " expert " + std::to_string(e) + " does not hold its bytes");
        return;
      }
    }
  };

  Row& memcpy_row = g.row("memcpy", "GB/s");
  {
    ef::ExpertCache cache(pool, experts, ef::PolicyOptions{}, 1);
    // Alternate layers so that every acquire misses and evicts the other layer's expert.
    auto run_demand = [&](int layer, std::vector<void*>* dsts) {
      dsts->assign(experts, nullptr);
      auto t0 = Clock::now();
      for (int first = 0; first < experts; first += kTopK) {
        std::vector<int> chunk(all.begin() + first, all.begin() + std::min(experts, first + kTopK));
        std::vector<void*> ptrs = cache.acquire(layer, chunk, 0);
        cache.release(layer, chunk, 0);
        for (std::size_t i = 0; i < chunk.size(); ++i) (*dsts)[chunk[i]] = ptrs[i];
      }
      return seconds(t0, Clock::now());
    };
    std::vector<void*> dsts;
    run_demand(0, &dsts);
    run_demand(1, &dsts);
    check_slots(1, dsts, "demand");
    cache.reset_stats();

    Row& demand = g.row("demand copy", "GB/s");
    Row& ratio = g.row("demand / memcpy", "x", Target::at_least(0.8));
    for (int rep = 0; rep < reps; ++rep) {
      int layer = rep % 2;
      double d = run_demand(layer, &dsts);
      double m = run_memcpy(layer, dsts);
      demand.samples.push_back(gbps(total, d));
      memcpy_row.samples.push_back(gbps(total, m));
      ratio.samples.push_back(m / d);
    }
    ef::CacheStats s = cache.stats();
    const std::uint64_t expected = static_cast<std::uint64_t>(reps) * experts;
    if (s.misses != expected || s.bytes_demand != expected * blob) {
      g.notes.push_back("WARNING: demand: expected " + std::to_string(expected) +
                        " misses; stats: " + stats_summary(s));
    }
    cache.close();
  }

  for (int streams : {1, 2}) {
    ef::ExpertCache cache(pool, experts, ef::PolicyOptions{}, streams);
    // Prefetch a whole layer and wait for the workers to copy it, then acquire it (all
    // hits). Acquiring before the copies finish would cancel the queued ones: acquiring a
    // layer ends its predictions.
    auto run_prefetch = [&](int layer, std::vector<void*>* dsts) {
      auto t0 = Clock::now();
      prefetch_and_wait(cache, layer, all);
      *dsts = cache.acquire(layer, all, 0);
      double s = seconds(t0, Clock::now());
      cache.release(layer, all, 0);
      return s;
    };
    std::vector<void*> dsts;
    run_prefetch(0, &dsts);
    run_prefetch(1, &dsts);
    check_slots(1, dsts, "prefetch x" + std::to_string(streams));
    cache.reset_stats();

    const std::string label =
        "prefetch, " + std::to_string(streams) + (streams == 1 ? " stream" : " streams");
    Row& prefetch = g.row(label, "GB/s");
    Row& ratio = g.row(label + " / memcpy", "x", Target::at_least(0.8));
    for (int rep = 0; rep < reps; ++rep) {
      int layer = rep % 2;
      double p = run_prefetch(layer, &dsts);
      double m = run_memcpy(layer, dsts);
      prefetch.samples.push_back(gbps(total, p));
      memcpy_row.samples.push_back(gbps(total, m));
      ratio.samples.push_back(m / p);
    }
    check_all_prefetched(g, label, cache.stats(), static_cast<std::uint64_t>(reps) * experts);
    cache.close();
  }
  g.notes.push_back(
      "ratios pair each rep with a single-threaded memcpy of the same blobs to the same slots, "
      "run right after it; the memcpy row pools those baselines");
  return g;
}

// ---------------------------------------------------------------------------------------
// 4. CUDA: pinned host-to-device throughput through the prefetch path

Group bench_cuda_h2d(const Env& env) {
  Group g;
  g.name = "cuda_h2d";
  g.description = kCudaH2dInfo;
#ifndef EXPERTFLOW_WITH_CUDA
  (void)env;
  g.status = "skipped: built without CUDA";
  return g;
#else
  const int experts = env.quick ? 16 : 64;
  const std::size_t blob = env.quick ? 8 * kMiB : 32 * kMiB;
  const int reps = env.quick ? 3 : 5;
  const std::size_t total = static_cast<std::size_t>(experts) * blob;
  g.param("experts_per_layer", experts);
  g.param("expert_bytes", blob);
  g.param("bytes_per_rep", total);
  g.param("reps", reps);
  g.param("prefetch_streams", "1,2,4");

  ef::Backend& backend = *env.backend;
  auto pool = std::make_shared<ef::HostPool>(env.backend, ef::ExpertLayout(2, experts, blob));
  fill_pool(*pool);
  const ef::ExpertLayout& layout = pool->layout();
  const std::vector<int> all = range(experts);
  ef::StreamHandle stream = backend.create_stream(false);
  cudaStream_t cuda_stream = reinterpret_cast<cudaStream_t>(stream);

  // One copy of a whole layer's bytes, which lie contiguous in the pool.
  void* device_buffer = backend.alloc_device(total);
  auto run_memcpy = [&](int layer) {
    const std::byte* src = pool->blob(layout.key(layer, 0));
    auto t0 = Clock::now();
    cuda_check(cudaMemcpyAsync(device_buffer, src, total, cudaMemcpyHostToDevice, cuda_stream),
               "cudaMemcpyAsync");
    cuda_check(cudaStreamSynchronize(cuda_stream), "cudaStreamSynchronize");
    return seconds(t0, Clock::now());
  };
  run_memcpy(0);

  Row& memcpy_row = g.row("cudaMemcpy, one copy", "GB/s");
  for (int streams : {1, 2, 4}) {
    ef::ExpertCache cache(pool, experts, ef::PolicyOptions{}, streams);
    auto run_prefetch = [&](int layer, std::vector<void*>* ptrs) {
      auto t0 = Clock::now();
      prefetch_and_wait(cache, layer, all);
      *ptrs = cache.acquire(layer, all, stream);
      cuda_check(cudaStreamSynchronize(cuda_stream), "cudaStreamSynchronize");
      double s = seconds(t0, Clock::now());
      cache.release(layer, all, stream);
      return s;
    };
    std::vector<void*> ptrs;
    run_prefetch(0, &ptrs);
    run_prefetch(1, &ptrs);
    for (int e : {0, experts / 2, experts - 1}) {
      if (!slot_holds(backend, *pool, ptrs[e], layout.key(1, e))) {
        g.notes.push_back("WARNING: prefetch x" + std::to_string(streams) +
                          ": the slot of expert " + std::to_string(e) + " does not hold its bytes");
        break;
      }
    }
    cache.reset_stats();

    const std::string label =
        "prefetch, " + std::to_string(streams) + (streams == 1 ? " stream" : " streams");
    Row& prefetch = g.row(label, "GB/s");
    Row& ratio = g.row(label + " / cudaMemcpy", "x", Target::at_least(0.9));
    for (int rep = 0; rep < reps; ++rep) {
      int layer = rep % 2;
      double p = run_prefetch(layer, &ptrs);
      double m = run_memcpy(layer);
      prefetch.samples.push_back(gbps(total, p));
      memcpy_row.samples.push_back(gbps(total, m));
      ratio.samples.push_back(m / p);
    }
    check_all_prefetched(g, label, cache.stats(), static_cast<std::uint64_t>(reps) * experts);
    cache.close();
  }

  // Demand copies for reference (no target): every acquire of a top-8 misses.
  {
    ef::ExpertCache cache(pool, experts, ef::PolicyOptions{}, 1);
    auto run_demand = [&](int layer) {
      auto t0 = Clock::now();
      for (int first = 0; first < experts; first += 8) {
        std::vector<int> chunk(all.begin() + first, all.begin() + std::min(experts, first + 8));
        cache.acquire(layer, chunk, stream);
        cache.release(layer, chunk, stream);
      }
      cuda_check(cudaStreamSynchronize(cuda_stream), "cudaStreamSynchronize");
      return seconds(t0, Clock::now());
    };
    run_demand(0);
    run_demand(1);
    Row& demand = g.row("demand copy, top-8 acquires", "GB/s");
    for (int rep = 0; rep < reps; ++rep) demand.samples.push_back(gbps(total, run_demand(rep % 2)));
    cache.close();
  }

  backend.free_device(device_buffer);
  backend.destroy_stream(stream);
  g.notes.push_back(
      "a prefetch rep runs from prefetch() until the stream that acquired the layer has "
      "finished; each is paired with one cudaMemcpyAsync of the layer's bytes right after it");
  return g;
#endif
}

// ---------------------------------------------------------------------------------------

struct Options {
  std::string backend = "cpu";
  std::string out;
  bool quick = false;
};

void usage(std::FILE* to) {
  std::fprintf(to,
               "usage: core_bench [--backend cpu|cuda] [--out PATH] [--quick]\n"
               "  --backend  backend for the cache benchmarks (default cpu)\n"
               "  --out      JSON output (default bench/results/core_bench_<backend>.json)\n"
               "  --quick    small sizes and few repetitions, for a smoke run\n");
}

bool parse(int argc, char** argv, Options* options) {
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    auto take = [&](const std::string& flag, std::string* value) {
      if (arg == flag && i + 1 < argc) {
        *value = argv[++i];
        return true;
      }
      if (arg.rfind(flag + "=", 0) == 0) {
        *value = arg.substr(flag.size() + 1);
        return true;
      }
      return false;
    };
    if (arg == "--help" || arg == "-h") {
      usage(stdout);
      std::exit(0);
    } else if (arg == "--quick") {
      options->quick = true;
    } else if (take("--backend", &options->backend) || take("--out", &options->out)) {
    } else {
      std::fprintf(stderr, "core_bench: unknown argument '%s'\n", arg.c_str());
      return false;
    }
  }
  if (options->backend != "cpu" && options->backend != "cuda") {
    std::fprintf(stderr, "core_bench: --backend must be cpu or cuda, not '%s'\n",
                 options->backend.c_str());
    return false;
  }
  if (options->out.empty()) options->out = "bench/results/core_bench_" + options->backend + ".json";
  return true;
}

// Runs one benchmark, turning an exception into the group's status.
Group run_group(const std::string& name, const std::string& description,
                const std::function<Group()>& body) {
  try {
    return body();
  } catch (const std::exception& e) {
    Group g;
    g.name = name;
    g.description = description;
    g.status = std::string("error: ") + e.what();
    return g;
  }
}

Group skipped(const std::string& name, const std::string& description, const std::string& reason) {
  Group g;
  g.name = name;
  g.description = description;
  g.status = "skipped: " + reason;
  return g;
}

}  // namespace

int main(int argc, char** argv) {
  Options options;
  if (!parse(argc, argv, &options)) {
    usage(stderr);
    return 2;
  }

  Machine machine = describe_machine();
  const ef::BackendInfo* cuda = find_backend(machine.build, "cuda");
  const bool cuda_usable = cuda != nullptr && cuda->usable;
  std::string cuda_reason = cuda == nullptr ? "this build has no CUDA backend"
                            : !cuda->built  ? "this build has no CUDA backend"
                                            : cuda->reason;

  std::printf("expertflow core_bench %s: backend %s%s\n", machine.build.version.c_str(),
              options.backend.c_str(), options.quick ? " (quick)" : "");
  std::printf("cpu: %s, %u cores; %s; %s\n", machine.cpu_model.c_str(), machine.cores,
              machine.compiler.c_str(), machine.date_utc.c_str());

  std::vector<Group> groups;
  Env env;
  env.quick = options.quick;
  std::string backend_error;
  try {
    if (options.backend == "cpu") {
      env.backend = ef::make_backend(ef::DeviceKind::kCpu);
    } else {
      env.backend = ef::make_backend(ef::DeviceKind::kCuda, 0);
      env.stream = env.backend->create_stream(false);
    }
    machine.device = env.backend->name();
  } catch (const std::exception& e) {
    backend_error = e.what();
  }
#ifdef EXPERTFLOW_WITH_CUDA
  if (env.backend && env.backend->kind() == ef::DeviceKind::kCuda) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess) {
      machine.device += std::string(" (") + prop.name + ")";
    }
  }
#endif

  auto add = [&](Group g) {
    print_group(g);
    groups.push_back(std::move(g));
  };
  const std::string no_backend = "no " + options.backend + " backend: " + backend_error;
  if (env.backend) {
    add(run_group("acquire_hit", kAcquireHitInfo, [&] { return bench_acquire_hit(env); }));
    add(run_group("victim_choice", kVictimChoiceInfo, [&] { return bench_victim_choice(env); }));
  } else {
    add(skipped("acquire_hit", kAcquireHitInfo, no_backend));
    add(skipped("victim_choice", kVictimChoiceInfo, no_backend));
  }
  if (options.backend == "cpu") {
    add(run_group("cpu_copy", kCpuCopyInfo, [&] { return bench_cpu_copy(options.quick); }));
  } else {
    add(skipped("cpu_copy", kCpuCopyInfo, "measures the CPU backend; run with --backend cpu"));
  }
  if (!cuda_usable) {
    add(skipped("cuda_h2d", kCudaH2dInfo, cuda_reason));
  } else if (options.backend != "cuda") {
    add(skipped("cuda_h2d", kCudaH2dInfo, "run with --backend cuda"));
  } else if (!env.backend) {
    add(skipped("cuda_h2d", kCudaH2dInfo, no_backend));
  } else {
    add(run_group("cuda_h2d", kCudaH2dInfo, [&] { return bench_cuda_h2d(env); }));
  }
  if (env.backend && env.stream != 0) env.backend->destroy_stream(env.stream);

  std::string json = to_json(machine, options.backend, options.quick, groups);
  std::filesystem::path out(options.out);
  std::error_code ec;
  if (out.has_parent_path()) std::filesystem::create_directories(out.parent_path(), ec);
  std::ofstream file(out);
  file << json;
  file.close();
  if (!file) {
    std::fprintf(stderr, "core_bench: could not write %s\n", options.out.c_str());
    return 1;
  }
  std::printf("\nwrote %s\n", options.out.c_str());

  bool any_error = std::any_of(groups.begin(), groups.end(),
                               [](const Group& g) { return g.status.rfind("error", 0) == 0; });
  return any_error ? 1 : 0;
}
