#include "expertflow/cost_model.h"

#include <algorithm>

#include "expertflow/error.h"

namespace expertflow {

namespace {

// `!(value > 0)` so that NaN is refused too.
void check_positive(const char* name, double value) {
  EF_CHECK(value > 0.0, name, " must be positive, got ", value);
}

void check_not_negative(const char* name, double value) {
  EF_CHECK(value >= 0.0, name, " must not be negative, got ", value);
}

}  // namespace

void check_costs(const HardwareRates& rates, const ModelCosts& model) {
  check_positive("link_bytes_per_s", rates.link_bytes_per_s);
  check_positive("device_bytes_per_s", rates.device_bytes_per_s);
  check_positive("device_flops_per_s", rates.device_flops_per_s);
  check_positive("cpu_bytes_per_s", rates.cpu_bytes_per_s);
  check_positive("cpu_flops_per_s", rates.cpu_flops_per_s);
  check_positive("expert_bytes", model.expert_bytes);
  check_not_negative("expert_flops_per_token", model.expert_flops_per_token);
  check_not_negative("activation_bytes_per_token", model.activation_bytes_per_token);
  check_not_negative("dense_bytes_per_layer", model.dense_bytes_per_layer);
  check_not_negative("dense_extra_seconds", model.dense_extra_seconds);
}

double copy_seconds(double bytes, const HardwareRates& rates) {
  return bytes / rates.link_bytes_per_s;
}

double device_expert_seconds(const ModelCosts& model, int tokens, const HardwareRates& rates) {
  return std::max(model.expert_bytes / rates.device_bytes_per_s,
                  model.expert_flops_per_token * tokens / rates.device_flops_per_s);
}

double cpu_expert_seconds(const ModelCosts& model, int tokens, const HardwareRates& rates) {
  return model.expert_bytes / rates.cpu_bytes_per_s +
         model.expert_flops_per_token * tokens / rates.cpu_flops_per_s +
         2.0 * model.activation_bytes_per_token * tokens / rates.link_bytes_per_s;
}

double dense_seconds(const ModelCosts& model, const HardwareRates& rates) {
  return model.dense_bytes_per_layer / rates.device_bytes_per_s + model.dense_extra_seconds;
}

PlacementChoice place_miss(double now, double copy_start, double device_free, double cpu_free,
                           const ModelCosts& model, int tokens, const HardwareRates& rates) {
  double copied = std::max(now, copy_start) + copy_seconds(model.expert_bytes, rates);
  double by_copy = std::max(copied, device_free) + device_expert_seconds(model, tokens, rates);
  double by_cpu = std::max(now, cpu_free) + cpu_expert_seconds(model, tokens, rates);
  if (by_cpu < by_copy) return {Placement::kCpu, by_cpu};
  return {Placement::kCopy, by_copy};
}

}  // namespace expertflow
