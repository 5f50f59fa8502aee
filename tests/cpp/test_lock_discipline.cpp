// Invariant: bookkeeping holds the cache's mutex for microseconds; no copy, fence
// operation or allocation runs under it. A backend whose chosen operation blocks until
// the test lets it go shows it: while one thread is stuck inside that operation, another
// thread's hit, release and stats() must still complete. Were the operation called under
// the mutex, they would wait for the gate's timeout and the test would fail.
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>

#include "cache_fixture.h"

namespace {

namespace ef = expertflow;
using ef_fixture::make_pool;

enum class Op { kNone, kCopy, kRecord, kCreateFence, kQuery };

// The CPU backend, except that the armed operation blocks (up to 10 s) until opened.
class GatedBackend final : public ef::Backend {
 public:
  GatedBackend() : inner_(ef::make_backend(ef::DeviceKind::kCpu)) {}

  void arm(Op op) {
    std::lock_guard<std::mutex> lock(mutex_);
    armed_ = op;
    open_ = false;
    blocked_ = false;
  }
  bool wait_blocked() {
    std::unique_lock<std::mutex> lock(mutex_);
    return cv_.wait_for(lock, std::chrono::seconds(10), [this] { return blocked_; });
  }
  bool still_blocked() {
    std::lock_guard<std::mutex> lock(mutex_);
    return blocked_;
  }
  void open() {
    std::lock_guard<std::mutex> lock(mutex_);
    open_ = true;
    cv_.notify_all();
  }

  ef::DeviceKind kind() const override { return inner_->kind(); }
  std::string name() const override { return "gated-cpu"; }
  void* alloc_host(std::size_t bytes) override { return inner_->alloc_host(bytes); }
  void free_host(void* p) noexcept override { inner_->free_host(p); }
  void register_host(void* p, std::size_t bytes) override { inner_->register_host(p, bytes); }
  void unregister_host(void* p) noexcept override { inner_->unregister_host(p); }
  void* alloc_device(std::size_t bytes) override { return inner_->alloc_device(bytes); }
  void free_device(void* p) noexcept override { inner_->free_device(p); }
  ef::StreamHandle create_stream(bool high) override { return inner_->create_stream(high); }
  void destroy_stream(ef::StreamHandle s) noexcept override { inner_->destroy_stream(s); }
  void check_stream(ef::StreamHandle s, int device) const override {
    inner_->check_stream(s, device);
  }
  std::unique_ptr<ef::Fence> create_fence() override {
    gate(Op::kCreateFence);
    return inner_->create_fence();
  }
  std::unique_ptr<ef::Fence> create_timer() override {
    gate(Op::kCreateFence);
    return inner_->create_timer();
  }
  bool query(ef::Fence& f) override {
    gate(Op::kQuery);
    return inner_->query(f);
  }
  std::optional<double> elapsed_seconds(ef::Fence& a, ef::Fence& b) override {
    return inner_->elapsed_seconds(a, b);
  }
  void record(ef::Fence& f, ef::StreamHandle s) override {
    gate(Op::kRecord);
    inner_->record(f, s);
  }
  void wait(ef::StreamHandle s, ef::Fence& f) override { inner_->wait(s, f); }
  void synchronize(ef::Fence& f) override { inner_->synchronize(f); }
  void copy_to_device(void* dst, const void* src, std::size_t bytes, ef::StreamHandle s) override {
    gate(Op::kCopy);
    inner_->copy_to_device(dst, src, bytes, s);
  }

 private:
  void gate(Op op) {
    std::unique_lock<std::mutex> lock(mutex_);
    if (armed_ != op) return;
    armed_ = Op::kNone;  // only the first such call blocks
    blocked_ = true;
    cv_.notify_all();
    cv_.wait_for(lock, std::chrono::seconds(10), [this] { return open_; });
    blocked_ = false;
  }

  std::shared_ptr<ef::Backend> inner_;
  std::mutex mutex_;
  std::condition_variable cv_;
  Op armed_ = Op::kNone;
  bool open_ = false;
  bool blocked_ = false;
};

struct Rig {
  std::shared_ptr<GatedBackend> backend = std::make_shared<GatedBackend>();
  std::shared_ptr<ef::HostPool> pool;
  std::unique_ptr<ef::ExpertCache> cache;
  Rig() {
    pool = std::make_shared<ef::HostPool>(backend, ef::ExpertLayout(2, 8, 4096));
    ef_fixture::fill_pattern(*pool);
    cache = std::make_unique<ef::ExpertCache>(pool, 4, ef_fixture::policy("lru"));
    EXPECT_EQ(ef_fixture::use(*cache, 0, {0}), 0);  // expert (0, 0) resident
  }
  // While the backend is stuck in the armed operation, another thread's hit on (0, 0),
  // its release and stats() complete.
  void expect_other_threads_proceed() {
    ASSERT_TRUE(backend->wait_blocked());
    EXPECT_EQ(ef_fixture::use(*cache, 0, {0}), 0);
    (void)cache->stats();
    EXPECT_TRUE(backend->still_blocked());
    backend->open();
  }
};

TEST(demand_copy_runs_outside_the_lock) {
  Rig rig;
  rig.backend->arm(Op::kCopy);
  std::thread miss([&] { EXPECT_EQ(ef_fixture::use(*rig.cache, 1, {3}), 0); });
  rig.expect_other_threads_proceed();
  miss.join();
}

TEST(prefetch_copy_runs_outside_the_lock) {
  Rig rig;
  rig.backend->arm(Op::kCopy);
  rig.cache->prefetch(1, {5}, {});
  rig.expect_other_threads_proceed();
  EXPECT_TRUE(ef_fixture::wait_until([&] { return rig.cache->resident(1, 5); }));
}

TEST(release_records_its_fence_outside_the_lock) {
  Rig rig;
  rig.cache->acquire(1, {2}, 0);
  rig.backend->arm(Op::kRecord);
  std::thread release([&] { rig.cache->release(1, {2}, 0); });
  rig.expect_other_threads_proceed();
  release.join();
}

TEST(fences_are_created_outside_the_lock) {
  Rig rig;
  rig.cache->acquire(1, {2}, 0);
  rig.backend->arm(Op::kCreateFence);  // every fence made so far is held: the pool makes one
  std::thread release([&] { rig.cache->release(1, {2}, 0); });
  rig.expect_other_threads_proceed();
  release.join();
}

TEST(fence_queries_run_outside_the_lock) {
  Rig rig;
  rig.backend->arm(Op::kQuery);  // the miss's stream asks whether its copy is done
  std::thread miss([&] { EXPECT_EQ(ef_fixture::use(*rig.cache, 1, {3}), 0); });
  rig.expect_other_threads_proceed();
  miss.join();
}

}  // namespace

EF_TEST_MAIN()
