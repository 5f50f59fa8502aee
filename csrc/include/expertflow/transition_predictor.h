// TransitionPredictor: training-free routing prediction from history.
//
// Two online tables, both cheap enough for every layer of every step:
//  - transitions: how often expert b ran at layer l+1 right after expert a ran at layer l;
//  - request frequencies: how often each expert ran in the current request (its prefill
//    shows which experts the request favours).
// The score of expert b at layer l is a weighted sum of the two, each in [0, 1]:
//   transition: sum over a in S of count[l-1][a][b] / sum over a in S of row[l-1][a],
//               S the experts last observed at layer l-1 (unknown for layer 0);
//   request:    uses of b at layer l in this request / steps of layer l in this request.
// Not thread-safe: one predictor serves one sequence of layers.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

namespace expertflow {

class TransitionPredictor {
 public:
  // request_weight in [0, 1]: the request frequencies' share of the score.
  TransitionPredictor(int num_layers, int experts_per_layer, double request_weight = 0.5);

  // The experts one step used at `layer`, in the order layers run.
  void observe(int layer, const std::vector<int>& experts);
  // Up to `count` experts of `layer` with a positive score, highest first (ties: lower id).
  std::vector<std::pair<int, float>> predict(int layer, int count) const;
  // A new request: forgets its frequencies and the last observed sets; keeps transitions.
  void new_request();

  int num_layers() const { return num_layers_; }
  int experts_per_layer() const { return experts_; }

 private:
  std::size_t cell(int layer, int from, int to) const {
    return (static_cast<std::size_t>(layer) * experts_ + from) * experts_ + to;
  }
  void check(int layer, const std::vector<int>* experts) const;

  int num_layers_;
  int experts_;
  double request_weight_;
  std::vector<std::uint32_t> transitions_;    // [layer][from][to], layer -> layer + 1
  std::vector<std::uint32_t> row_totals_;     // [layer][from]
  std::vector<std::uint32_t> request_uses_;   // [layer][expert]
  std::vector<std::uint32_t> request_steps_;  // [layer]
  std::vector<std::vector<int>> last_;        // [layer]: the experts last observed
};

}  // namespace expertflow
