// The cost model and the timeline, against times worked out by hand.
#include <cmath>
#include <string>

#include "ef_test.h"
#include "expertflow/cost_model.h"
#include "expertflow/error.h"
#include "expertflow/replay.h"
#include "expertflow/timeline.h"
#include "expertflow/transfer_engine.h"

using namespace expertflow;

namespace {

constexpr double kMiB = 1 << 20;
constexpr double kMs = 1e-3;
constexpr double kChunk = static_cast<double>(TransferEngine::kPrefetchChunkBytes);

bool near(double a, double b) { return std::abs(a - b) < 1e-12; }

// The link moves 1 MiB per ms, so a 4 MiB chunk takes 4 ms; the device reads 4 MiB per ms;
// the CPU streams 1 MiB per ms. FLOPs are free.
HardwareRates hand_rates() {
  HardwareRates r;
  r.link_bytes_per_s = kMiB / kMs;
  r.device_bytes_per_s = 4 * kMiB / kMs;
  r.device_flops_per_s = 1e30;
  r.cpu_bytes_per_s = kMiB / kMs;
  r.cpu_flops_per_s = 1e30;
  return r;
}

// A 4 MiB expert: copy 4 ms, device 1 ms, CPU 4 ms; dense work 3 ms per layer.
ModelCosts hand_model() {
  ModelCosts m;
  m.expert_bytes = 4 * kMiB;
  m.expert_flops_per_token = 0.0;
  m.dense_bytes_per_layer = 12 * kMiB;
  return m;
}

}  // namespace

TEST(cost_model_by_hand) {
  HardwareRates r{1e9, 1e12, 1e14, 1e10, 1e12};
  ModelCosts m{1e8, 1e8, 1e3, 1e9, 0.0};
  EXPECT_TRUE(near(copy_seconds(1e8, r), 0.1));
  EXPECT_TRUE(near(device_expert_seconds(m, 1, r), 1e-4));     // memory bound at batch 1
  EXPECT_TRUE(near(device_expert_seconds(m, 1000, r), 1e-3));  // compute bound at 1000
  EXPECT_TRUE(near(cpu_expert_seconds(m, 1, r), 0.01 + 1e-4 + 2e-6));
  EXPECT_TRUE(near(dense_seconds(m, r), 1e-3));
  PlacementChoice idle_cpu = place_miss(0.0, 0.05, 0.0, 0.0, m, 1, r);
  EXPECT_TRUE(idle_cpu.where == Placement::kCpu);
  EXPECT_TRUE(near(idle_cpu.finish, 0.010102));
  PlacementChoice busy_cpu = place_miss(0.0, 0.05, 0.0, 0.2, m, 1, r);
  EXPECT_TRUE(busy_cpu.where == Placement::kCopy);
  EXPECT_TRUE(near(busy_cpu.finish, 0.1501));
}

TEST(cost_model_refuses_rates_that_are_not_positive) {
  HardwareRates r;
  r.cpu_bytes_per_s = 0.0;
  EXPECT_THROW_MSG(check_costs(r, ModelCosts{}), InvalidArgument,
                   "cpu_bytes_per_s must be positive, got 0");
  r = HardwareRates{};
  r.link_bytes_per_s = -5.0;
  EXPECT_THROW_MSG(check_costs(r, ModelCosts{}), InvalidArgument, "link_bytes_per_s");
  ModelCosts m;
  m.expert_bytes = 0.0;
  EXPECT_THROW_MSG(check_costs(HardwareRates{}, m), InvalidArgument, "expert_bytes");
}

TEST(demand_copy_waits_for_the_prefetch_chunks_in_flight) {
  LinkTimeline link(kMiB / kMs, kChunk);
  int id = link.prefetch(0.0, 12 * kMiB);  // chunks [0,4] [4,8] [8,12] ms
  // Issued at 5 ms: the chunk that started at 4 ms and the one queued behind it (two in
  // flight, as live) finish first [4,12], then the demand copy [12,14].
  EXPECT_TRUE(near(link.demand(5 * kMs, 0.0, 2 * kMiB), 14 * kMs));
  EXPECT_TRUE(near(link.arrival(id, 20 * kMs), 12 * kMs));
  EXPECT_TRUE(near(link.busy_seconds(), 14 * kMs));
  EXPECT_TRUE(link.idle(20 * kMs));
}

TEST(a_prefetch_needed_early_is_promoted) {
  LinkTimeline link(kMiB / kMs, kChunk);
  int first = link.prefetch(0.0, 4 * kMiB);   // [0,4]
  int second = link.prefetch(0.0, 8 * kMiB);  // queued behind it
  // Needed at 1 ms: the first's chunk is in flight, then the second goes as demand [4,12].
  EXPECT_TRUE(near(link.arrival(second, 1 * kMs), 12 * kMs));
  EXPECT_TRUE(near(link.arrival(first, 12 * kMs), 4 * kMs));
  EXPECT_TRUE(near(link.drain(), 12 * kMs));
}

TEST(cancelling_drops_what_has_not_started) {
  LinkTimeline link(kMiB / kMs, kChunk);
  link.prefetch(0.0, 8 * kMiB);  // [0,4] [4,8]: started at 1 ms, so it finishes
  link.prefetch(0.0, 4 * kMiB);  // not started at 1 ms: dropped
  EXPECT_TRUE(near(link.cancel_queued(1 * kMs), 4 * kMiB));
  EXPECT_TRUE(near(link.drain(), 8 * kMs));
  EXPECT_TRUE(near(link.bytes(), 8 * kMiB));
}

TEST(a_copy_into_a_slot_waits_for_its_reads) {
  LinkTimeline link(kMiB / kMs, kChunk);
  EXPECT_TRUE(near(link.demand(0.0, 3 * kMs, kMiB), 4 * kMs));
  PassTimeline t(hand_rates(), hand_model(), kChunk);
  t.begin_layer();      // dense [0,3]
  t.on_device(0.0, 7);  // slot 7 read [3,4]
  t.on_device(0.0, 8);  // slot 8 read [4,5]
  EXPECT_TRUE(near(t.end_layer(), 5 * kMs));
  // The next layer's copy into slot 8 is issued at its routing, 8 ms, after those reads.
  t.begin_layer();
  EXPECT_TRUE(near(t.copy(8), 12 * kMs));
}

TEST(a_prefetch_hides_behind_compute) {
  PassTimeline t(hand_rates(), hand_model(), kChunk);
  EXPECT_TRUE(near(t.begin_layer(), 3 * kMs));
  t.on_device(0.0, 0);                               // resident: [3,4]
  int id = t.link().prefetch(t.routed(), 4 * kMiB);  // next layer's: [3,7]
  EXPECT_TRUE(near(t.end_layer(), 4 * kMs));
  EXPECT_TRUE(near(t.begin_layer(), 7 * kMs));       // dense [4,7]
  t.on_device(t.link().arrival(id, t.routed()), 1);  // arrived at 7: no stall
  EXPECT_TRUE(near(t.end_layer(), 8 * kMs));
  EXPECT_TRUE(near(t.device_busy(), 8 * kMs));
}

TEST(a_cpu_expert_runs_beside_a_device_expert) {
  PassTimeline t(hand_rates(), hand_model(), kChunk);
  t.begin_layer();                            // routed at 3
  t.on_device(0.0, 0);                        // [3,4]
  EXPECT_TRUE(near(t.on_cpu(), 7 * kMs));     // [3,7]
  EXPECT_TRUE(near(t.end_layer(), 7 * kMs));  // waits for the CPU
  EXPECT_TRUE(near(t.cpu_busy(), 4 * kMs));
  // A miss now: a copy would end at 10 + 4 + 1 = 15 ms, the CPU at 10 + 4 = 14 ms.
  t.begin_layer();
  PlacementChoice choice = t.place_miss();
  EXPECT_TRUE(choice.where == Placement::kCpu);
  EXPECT_TRUE(near(choice.finish, 14 * kMs));
}

TEST(unknown_strategy_names_the_value) {
  std::vector<ReplayStep> steps = {{0, 0, 0, {0}}};
  ReplayOptions options;
  options.capacity = 1;
  EXPECT_THROW_MSG(replay_strategies(1, 2, steps, options, {"lru", "fastest"}), InvalidArgument,
                   "unknown strategy \"fastest\"");
  EXPECT_EQ(replay_strategies(1, 2, steps, options, {"lru", "hybrid"}).size(), std::size_t{2});
}

EF_TEST_MAIN()
