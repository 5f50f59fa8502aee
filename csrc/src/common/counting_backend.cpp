#include "expertflow/error.h"
#include "expertflow/testing.h"

namespace expertflow::testing {

CountingBackend::CountingBackend(std::shared_ptr<Backend> inner, bool fences_complete)
    : inner_(std::move(inner)), fences_complete_(fences_complete) {
  EF_CHECK(inner_ != nullptr, "CountingBackend needs a backend to wrap, got null");
}

DeviceKind CountingBackend::kind() const { return inner_->kind(); }
std::string CountingBackend::name() const { return inner_->name(); }
void* CountingBackend::alloc_host(std::size_t bytes) { return inner_->alloc_host(bytes); }
void CountingBackend::free_host(void* ptr) noexcept { inner_->free_host(ptr); }
void CountingBackend::register_host(void* ptr, std::size_t bytes) {
  inner_->register_host(ptr, bytes);
}
void CountingBackend::unregister_host(void* ptr) noexcept { inner_->unregister_host(ptr); }
void* CountingBackend::alloc_device(std::size_t bytes) { return inner_->alloc_device(bytes); }
void CountingBackend::free_device(void* ptr) noexcept { inner_->free_device(ptr); }

StreamHandle CountingBackend::create_stream(bool high_priority) {
  StreamHandle stream = inner_->create_stream(high_priority);
  ++counts_.streams_created;
  return stream;
}
void CountingBackend::destroy_stream(StreamHandle stream) noexcept {
  ++counts_.streams_destroyed;
  inner_->destroy_stream(stream);
}
void CountingBackend::check_stream(StreamHandle stream, int stream_device) const {
  inner_->check_stream(stream, stream_device);
}

std::unique_ptr<Fence> CountingBackend::create_fence() {
  ++counts_.fences_created;
  return inner_->create_fence();
}
std::unique_ptr<Fence> CountingBackend::create_timer() {
  ++counts_.fences_created;
  return inner_->create_timer();
}
void CountingBackend::record(Fence& fence, StreamHandle stream) {
  ++counts_.records;
  inner_->record(fence, stream);
}
void CountingBackend::wait(StreamHandle stream, Fence& fence) {
  ++counts_.waits;
  inner_->wait(stream, fence);
}
void CountingBackend::synchronize(Fence& fence) {
  ++counts_.synchronizes;
  inner_->synchronize(fence);
}
bool CountingBackend::query(Fence& fence) {
  ++counts_.queries;
  return inner_->query(fence) && fences_complete_;
}
std::optional<double> CountingBackend::elapsed_seconds(Fence& start, Fence& end) {
  std::optional<double> seconds = inner_->elapsed_seconds(start, end);
  double reported = elapsed_;
  if (seconds && reported >= 0.0) return reported;
  return seconds;
}
void CountingBackend::copy_to_device(void* dst, const void* src, std::size_t bytes,
                                     StreamHandle stream) {
  ++counts_.copies;
  inner_->copy_to_device(dst, src, bytes, stream);
}

}  // namespace expertflow::testing
