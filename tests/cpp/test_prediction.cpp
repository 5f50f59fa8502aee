// The history predictor's scores, worked out by hand, and the cache's scoring of
// predictions (precision and recall) and of prefetched experts.
#include <utility>
#include <vector>

#include "cache_fixture.h"
#include "expertflow/transition_predictor.h"

namespace {

namespace ef = expertflow;
using Ranked = std::vector<std::pair<int, float>>;

TEST(transition_predictor_scores) {
  ef::TransitionPredictor p(3, 4, /*request_weight=*/0.5);
  p.observe(0, {0, 1});
  p.observe(1, {2});
  p.observe(2, {3});
  p.observe(0, {0, 1});
  // Layer 1 after {0, 1}: transitions 0->2 and 1->2 out of row totals 1 + 1, so 2/2 = 1,
  // weighted 0.5; request: expert 2 in 1 of 1 steps of layer 1, weighted 0.5.
  EXPECT_EQ(p.predict(1, 4), (Ranked{{2, 1.0f}}));
  p.observe(1, {3});
  p.observe(2, {3});
  p.observe(0, {1});
  // After {1}: row 1 of layer 0 is {2: 1, 3: 1} of 2, so 0.25 each; request: 2 and 3 in
  // 1 of 2 steps each, 0.25 each. A tie goes to the lower id.
  EXPECT_EQ(p.predict(1, 4), (Ranked{{2, 0.5f}, {3, 0.5f}}));
  EXPECT_EQ(p.predict(1, 1), (Ranked{{2, 0.5f}}));
  // Layer 0 has no layer before it: request frequencies alone, {0: 2/3, 1: 3/3} x 0.5.
  EXPECT_EQ(p.predict(0, 4), (Ranked{{1, 0.5f}, {0, 1.0f / 3.0f}}));
  p.new_request();  // forgets the request and the last sets, keeps the transitions
  EXPECT_EQ(p.predict(1, 4), Ranked{});
  p.observe(0, {0});
  EXPECT_EQ(p.predict(1, 4), (Ranked{{2, 0.25f}, {3, 0.25f}}));
}

TEST(transition_predictor_bad_input) {
  EXPECT_THROW_MSG(ef::TransitionPredictor(0, 4), ef::InvalidArgument, "num_layers");
  EXPECT_THROW_MSG(ef::TransitionPredictor(2, 4, 1.5), ef::InvalidArgument, "1.5");
  ef::TransitionPredictor p(2, 4);
  EXPECT_THROW_MSG(p.observe(2, {0}), ef::InvalidArgument, "layer 2");
  EXPECT_THROW_MSG(p.observe(1, {4}), ef::InvalidArgument, "expert id 4");
  EXPECT_THROW_MSG(p.predict(0, -1), ef::InvalidArgument, "-1");
  p.observe(0, {1});  // still usable
  EXPECT_EQ(p.predict(0, 1), (Ranked{{1, 0.5f}}));
}

TEST(precision_and_recall_of_predictions) {
  ef::ExpertCache cache(ef_fixture::make_pool(2, 4, 1000), 4, ef_fixture::policy("expertflow"));
  cache.prefetch(1, {1, 2}, {});
  EXPECT_EQ(ef_fixture::use(cache, 1, {2, 3}), 0);
  ef::CacheStats s = cache.stats();
  // Predicted {1, 2}, used {2, 3}: precision 1/2, recall 1/2.
  EXPECT_EQ(s.predicted, 2u);
  EXPECT_EQ(s.predicted_used, 1u);
  EXPECT_EQ(s.layers[1].predicted, 2u);
  EXPECT_EQ(s.layers[1].predicted_used, 1u);
  EXPECT_EQ(s.layers[0].predicted, 0u);
  // Expert 2 was taken in by the prefetch: a hit, whether or not its copy had started.
  EXPECT_EQ(s.hits, 1u);
  EXPECT_EQ(s.prefetch_hits, 1u);
  EXPECT_EQ(s.misses, 1u);
  // The predictions for layer 1 are spent: acquiring it again scores none.
  EXPECT_EQ(ef_fixture::use(cache, 1, {2}), 0);
  EXPECT_EQ(cache.stats().predicted, 2u);
}

TEST(predict_records_without_copying) {
  ef::ExpertCache cache(ef_fixture::make_pool(2, 4, 1000), 2, ef_fixture::policy("expertflow"));
  EXPECT_EQ(ef_fixture::use(cache, 0, {0}), 0);  // t1: (0,0) -> s0
  EXPECT_EQ(ef_fixture::use(cache, 0, {1}), 0);  // t2: (0,1) -> s1
  // (0,0) is the least recently used, but predicted for layer 0's next run: the victim of
  // the next miss is the unpredicted (0,1).
  cache.predict(0, {0}, {0.5f});
  EXPECT_EQ(cache.stats().prefetch_issued, 0u);
  EXPECT_EQ(cache.stats().bytes_prefetch, 0u);
  EXPECT_EQ(ef_fixture::use(cache, 1, {3}), 0);
  EXPECT_EQ(ef_fixture::residency(cache), "10000001");
  EXPECT_THROW_MSG(cache.predict(0, {9}, {}), ef::InvalidArgument, "expert id 9");
  EXPECT_THROW_MSG(cache.predict(0, {1}, {-1.0f}), ef::InvalidArgument, "score -1");
  EXPECT_EQ(ef_fixture::use(cache, 0, {0}), 0);  // scored: predicted 1, used 1
  EXPECT_EQ(cache.stats().predicted, 1u);
  EXPECT_EQ(cache.stats().predicted_used, 1u);
}

}  // namespace

EF_TEST_MAIN()
