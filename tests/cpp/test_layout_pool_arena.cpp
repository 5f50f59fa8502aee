// ExpertLayout, HostPool and DeviceArena on the CPU backend.
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <vector>

#include "cache_fixture.h"
#include "ef_test.h"
#include "expertflow/backend.h"
#include "expertflow/device_arena.h"
#include "expertflow/error.h"
#include "expertflow/host_pool.h"

namespace ef = expertflow;
using ef_fixture::holds;

namespace {

std::uintptr_t addr(const void* p) { return reinterpret_cast<std::uintptr_t>(p); }

struct AlignedBuffer {
  explicit AlignedBuffer(std::size_t bytes)
      : data(static_cast<std::byte*>(std::aligned_alloc(4096, (bytes + 4095) / 4096 * 4096))) {}
  ~AlignedBuffer() { std::free(data); }
  std::byte* data;
};

}  // namespace

TEST(layout_uniform_offsets_aligned) {
  ef::ExpertLayout layout(3, 5, 1000);
  EXPECT_EQ(layout.num_layers(), 3);
  EXPECT_EQ(layout.experts_per_layer(), 5);
  EXPECT_EQ(layout.num_keys(), 15);
  EXPECT_EQ(layout.max_bytes(), std::size_t{1000});
  for (int key = 0; key < layout.num_keys(); ++key) {
    EXPECT_EQ(layout.offset(key) % ef::ExpertLayout::kAlignment, std::size_t{0});
    EXPECT_EQ(layout.bytes(key), std::size_t{1000});
    if (key > 0) EXPECT_TRUE(layout.offset(key) >= layout.offset(key - 1) + 1000);
  }
  EXPECT_TRUE(layout.total_bytes() >= layout.offset(14) + 1000);
}

TEST(layout_mixed_sizes) {
  // Layer-major sizes; blobs must not overlap and each starts on a 256-byte boundary.
  std::vector<std::size_t> sizes = {100, 300, 1, 256, 257, 4096};
  ef::ExpertLayout layout(2, 3, sizes);
  EXPECT_EQ(layout.num_keys(), 6);
  EXPECT_EQ(layout.max_bytes(), std::size_t{4096});
  EXPECT_EQ(layout.offset(0), std::size_t{0});
  for (int key = 0; key < 6; ++key) {
    EXPECT_EQ(layout.bytes(key), sizes[key]);
    EXPECT_EQ(layout.offset(key) % 256, std::size_t{0});
    if (key > 0) EXPECT_TRUE(layout.offset(key) >= layout.offset(key - 1) + sizes[key - 1]);
  }
  EXPECT_TRUE(layout.total_bytes() >= layout.offset(5) + 4096);
}

TEST(layout_key_mapping_and_bounds) {
  ef::ExpertLayout layout(2, 4, 64);
  EXPECT_EQ(layout.key(0, 0), 0);
  EXPECT_EQ(layout.key(0, 3), 3);
  EXPECT_EQ(layout.key(1, 0), 4);
  EXPECT_EQ(layout.key(1, 3), 7);
  EXPECT_EQ(layout.layer_of(6), 1);
  EXPECT_EQ(layout.expert_of(6), 2);
  EXPECT_THROW_MSG(layout.key(12345, 0), ef::InvalidArgument, "12345");
  EXPECT_THROW_MSG(layout.key(2, 0), ef::InvalidArgument, "2");
  EXPECT_THROW_MSG(layout.key(-7, 0), ef::InvalidArgument, "-7");
  EXPECT_THROW_MSG(layout.key(0, 4321), ef::InvalidArgument, "4321");
  EXPECT_THROW_MSG(layout.key(1, -9876), ef::InvalidArgument, "-9876");
  EXPECT_THROW_MSG(layout.key(0, 4), ef::InvalidArgument, "4");
}

TEST(cpu_backend_basics) {
  auto backend = ef::make_backend(ef::DeviceKind::kCpu);
  ASSERT_TRUE(backend != nullptr);
  EXPECT_TRUE(backend->kind() == ef::DeviceKind::kCpu);
  EXPECT_EQ(backend->name(), std::string("cpu"));
  backend->check_stream(0, -1);
  EXPECT_THROW_MSG(backend->check_stream(12345, -1), ef::InvalidArgument, "12345");
  void* p = backend->alloc_host(10000);
  ASSERT_TRUE(p != nullptr);
  EXPECT_EQ(addr(p) % 4096, std::uintptr_t{0});
  backend->free_host(p);
}

TEST(build_info_lists_cpu) {
  ef::BuildInfo info = ef::build_info();
  EXPECT_TRUE(!info.version.empty());
  bool found_cpu = false;
  for (const ef::BackendInfo& b : info.backends) {
    if (b.name == "cpu") {
      found_cpu = true;
      EXPECT_TRUE(b.built);
      EXPECT_TRUE(b.usable);
      EXPECT_TRUE(b.reason.empty());
    }
    if (!b.usable) EXPECT_TRUE(!b.reason.empty());
  }
  EXPECT_TRUE(found_cpu);
}

TEST(host_pool_allocates) {
  ef::ExpertLayout layout(2, 3, std::vector<std::size_t>{100, 300, 1, 256, 257, 4096});
  ef::HostPool pool(ef::make_backend(ef::DeviceKind::kCpu), layout);
  ASSERT_TRUE(pool.data() != nullptr);
  EXPECT_TRUE(pool.owns_memory());
  EXPECT_EQ(addr(pool.data()) % 4096, std::uintptr_t{0});
  EXPECT_TRUE(pool.bytes() >= layout.total_bytes());
  EXPECT_EQ(pool.layout().num_keys(), 6);
  EXPECT_EQ(pool.backend().kind(), ef::DeviceKind::kCpu);
  for (int key = 0; key < 6; ++key) {
    EXPECT_TRUE(pool.blob(key) == pool.data() + layout.offset(key));
    EXPECT_EQ(addr(pool.blob(key)) % 256, std::uintptr_t{0});
  }
  // Every byte of every blob is writable and keeps its value.
  ef_fixture::fill_pattern(pool);
  for (int key = 0; key < 6; ++key) EXPECT_TRUE(holds(pool.blob(key), key, layout.bytes(key)));
}

TEST(host_pool_wraps_caller_memory) {
  ef::ExpertLayout layout(2, 4, 1000);
  AlignedBuffer buffer(layout.total_bytes());
  ASSERT_TRUE(buffer.data != nullptr);
  {
    // Fill first, through the layout: the pool must not copy or clear it.
    for (int key = 0; key < layout.num_keys(); ++key) {
      auto* blob = reinterpret_cast<std::uint8_t*>(buffer.data + layout.offset(key));
      for (std::size_t i = 0; i < 1000; ++i) blob[i] = ef_fixture::pattern_byte(key, i);
    }
    ef::HostPool pool(ef::make_backend(ef::DeviceKind::kCpu), layout, buffer.data,
                      layout.total_bytes());
    EXPECT_TRUE(pool.data() == buffer.data);
    EXPECT_TRUE(!pool.owns_memory());
    EXPECT_EQ(pool.bytes(), layout.total_bytes());
    for (int key = 0; key < layout.num_keys(); ++key) {
      EXPECT_TRUE(pool.blob(key) == buffer.data + layout.offset(key));
      EXPECT_TRUE(holds(pool.blob(key), key, 1000));
    }
  }
  // The pool is gone; the caller's memory is intact (and is freed by the caller).
  EXPECT_TRUE(holds(buffer.data + layout.offset(5), 5, 1000));
}

TEST(host_pool_wrap_rejects_bad_memory) {
  ef::ExpertLayout layout(2, 4, 1000);
  auto backend = ef::make_backend(ef::DeviceKind::kCpu);
  AlignedBuffer buffer(layout.total_bytes() + 4096);
  EXPECT_THROW((void)ef::HostPool(backend, layout, nullptr, layout.total_bytes()),
               ef::InvalidArgument);
  EXPECT_THROW((void)ef::HostPool(backend, layout, buffer.data + 64, layout.total_bytes()),
               ef::InvalidArgument);
  EXPECT_THROW((void)ef::HostPool(backend, layout, buffer.data + 1, layout.total_bytes()),
               ef::InvalidArgument);
  EXPECT_THROW((void)ef::HostPool(backend, layout, buffer.data, layout.total_bytes() - 1),
               ef::InvalidArgument);
  EXPECT_THROW((void)ef::HostPool(backend, layout, buffer.data, 0), ef::InvalidArgument);
  // 256-byte alignment is enough.
  ef::HostPool ok(backend, layout, buffer.data + 256, layout.total_bytes());
  EXPECT_TRUE(ok.data() == buffer.data + 256);
}

TEST(device_arena_slots) {
  auto backend = ef::make_backend(ef::DeviceKind::kCpu);
  // A slot size that is not a multiple of 256: every slot must still be 256-byte aligned.
  ef::DeviceArena arena(backend, 300, 5);
  EXPECT_EQ(arena.num_slots(), 5);
  EXPECT_TRUE(arena.slot_bytes() >= 300);
  for (int i = 0; i < 5; ++i) {
    ASSERT_TRUE(arena.slot(i) != nullptr);
    EXPECT_EQ(addr(arena.slot(i)) % 256, std::uintptr_t{0});
    if (i > 0) EXPECT_TRUE(arena.slot(i) >= arena.slot(i - 1) + 300);
    // CPU slots are host memory: writable and distinct.
    for (std::size_t b = 0; b < 300; ++b)
      reinterpret_cast<std::uint8_t*>(arena.slot(i))[b] = ef_fixture::pattern_byte(i, b);
  }
  for (int i = 0; i < 5; ++i) EXPECT_TRUE(holds(arena.slot(i), i, 300));

  ef::DeviceArena one(backend, 1, 1);
  EXPECT_EQ(one.num_slots(), 1);
  EXPECT_TRUE(one.slot_bytes() >= 1);
}

TEST(device_arena_rejects_bad_sizes) {
  auto backend = ef::make_backend(ef::DeviceKind::kCpu);
  EXPECT_THROW((void)ef::DeviceArena(backend, 1024, 0), ef::InvalidArgument);
  EXPECT_THROW((void)ef::DeviceArena(backend, 1024, -3), ef::InvalidArgument);
  EXPECT_THROW((void)ef::DeviceArena(backend, 0, 4), ef::InvalidArgument);
}

EF_TEST_MAIN()
