#include "expertflow/transition_predictor.h"

#include <algorithm>

#include "expertflow/error.h"

namespace expertflow {

TransitionPredictor::TransitionPredictor(int num_layers, int experts_per_layer,
                                         double request_weight)
    : num_layers_(num_layers), experts_(experts_per_layer), request_weight_(request_weight) {
  EF_CHECK(num_layers > 0, "num_layers must be positive, got ", num_layers);
  EF_CHECK(experts_per_layer > 0, "experts_per_layer must be positive, got ", experts_per_layer);
  EF_CHECK(request_weight >= 0.0 && request_weight <= 1.0, "request_weight must be in [0, 1], got ",
           request_weight);
  transitions_.assign(static_cast<std::size_t>(num_layers) * experts_ * experts_, 0);
  row_totals_.assign(static_cast<std::size_t>(num_layers) * experts_, 0);
  request_uses_.assign(static_cast<std::size_t>(num_layers) * experts_, 0);
  request_steps_.assign(num_layers, 0);
  last_.assign(num_layers, {});
}

void TransitionPredictor::check(int layer, const std::vector<int>* experts) const {
  EF_CHECK(layer >= 0 && layer < num_layers_, "layer ", layer, " out of range [0, ", num_layers_,
           ")");
  if (experts == nullptr) return;
  for (int e : *experts) {
    EF_CHECK(e >= 0 && e < experts_, "expert id ", e, " out of range [0, ", experts_, ") at layer ",
             layer);
  }
}

void TransitionPredictor::observe(int layer, const std::vector<int>& experts) {
  check(layer, &experts);
  if (layer > 0) {
    for (int from : last_[layer - 1]) {
      for (int to : experts) ++transitions_[cell(layer - 1, from, to)];
      row_totals_[static_cast<std::size_t>(layer - 1) * experts_ + from] += experts.size();
    }
  }
  for (int e : experts) ++request_uses_[static_cast<std::size_t>(layer) * experts_ + e];
  ++request_steps_[layer];
  last_[layer] = experts;
}

std::vector<std::pair<int, float>> TransitionPredictor::predict(int layer, int count) const {
  check(layer, nullptr);
  EF_CHECK(count >= 0, "count must be >= 0, got ", count);
  std::vector<double> score(experts_, 0.0);
  if (layer > 0 && !last_[layer - 1].empty()) {
    double total = 0.0;
    for (int from : last_[layer - 1])
      total += row_totals_[static_cast<std::size_t>(layer - 1) * experts_ + from];
    if (total > 0.0) {
      for (int from : last_[layer - 1]) {
        const std::uint32_t* row = &transitions_[cell(layer - 1, from, 0)];
        for (int to = 0; to < experts_; ++to)
          score[to] += (1.0 - request_weight_) * row[to] / total;
      }
    }
  }
  if (request_steps_[layer] > 0) {
    const std::uint32_t* uses = &request_uses_[static_cast<std::size_t>(layer) * experts_];
    for (int e = 0; e < experts_; ++e)
      score[e] += request_weight_ * uses[e] / request_steps_[layer];
  }
  std::vector<std::pair<int, float>> ranked;
  for (int e = 0; e < experts_; ++e) {
    if (score[e] > 0.0) ranked.emplace_back(e, static_cast<float>(score[e]));
  }
  auto better = [](const auto& a, const auto& b) {
    return a.second > b.second || (a.second == b.second && a.first < b.first);
  };
  std::size_t keep = std::min<std::size_t>(count, ranked.size());
  std::partial_sort(ranked.begin(), ranked.begin() + keep, ranked.end(), better);
  ranked.resize(keep);
  return ranked;
}

void TransitionPredictor::new_request() {
  std::fill(request_uses_.begin(), request_uses_.end(), 0);
  std::fill(request_steps_.begin(), request_steps_.end(), 0);
  for (auto& set : last_) set.clear();
}

}  // namespace expertflow
