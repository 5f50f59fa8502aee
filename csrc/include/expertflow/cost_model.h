// The cost model: how long one expert's work takes on each resource, from plain numbers.
//
// One model, two users: trace replay (timeline.h) calls these functions with a hardware
// profile's rates; the live scheduler calls them with rates measured at offload(). Inputs
// are rates in bytes and FLOPs per second and sizes in bytes, so that nothing here knows
// about caches, traces or devices.
//
//   device:  an expert's GEMMs read its weights once: max(bytes / memory rate, FLOPs /
//            compute rate) (a roofline; at batch 1 the expert is memory bound).
//   link:    a copy holds the link for bytes / link rate.
//   CPU:     an expert computed from its host blob streams its weights (bytes / CPU
//            streaming rate), does its FLOPs (FLOPs / CPU rate), and moves the tokens'
//            activations to the host and back over the link (2 x activation bytes / link
//            rate); the three are added because one core pool does them in turn.
#pragma once

#include <cstddef>

namespace expertflow {

// Rates, each > 0. Bytes per second and FLOPs per second.
struct HardwareRates {
  double link_bytes_per_s = 25e9;      // host -> device, pinned
  double device_bytes_per_s = 1e12;    // device memory
  double device_flops_per_s = 100e12;  // device dense bf16
  double cpu_bytes_per_s = 60e9;       // the CPU streaming expert weights
  double cpu_flops_per_s = 1e12;       // the CPU's matmul throughput
};

// One model's sizes. expert_flops_per_token: 2 FLOPs per weight (3 matrices for SwiGLU).
struct ModelCosts {
  double expert_bytes = 1.0;
  double expert_flops_per_token = 1.0;
  double activation_bytes_per_token = 0.0;  // one direction: hidden x dtype bytes
  double dense_bytes_per_layer = 0.0;       // attention and shared weights read per layer
  double dense_extra_seconds = 0.0;         // per layer, on the device, beyond those reads
};

// Throws InvalidArgument naming the first rate or size that is not positive (or, for
// the optional sizes, negative).
void check_costs(const HardwareRates& rates, const ModelCosts& model);

double copy_seconds(double bytes, const HardwareRates& rates);
double device_expert_seconds(const ModelCosts& model, int tokens, const HardwareRates& rates);
double cpu_expert_seconds(const ModelCosts& model, int tokens, const HardwareRates& rates);
// A layer's work outside its routed experts, on the device (batch 1: memory bound).
double dense_seconds(const ModelCosts& model, const HardwareRates& rates);

// Where a missed expert's work goes.
enum class Placement { kCopy, kCpu };

struct PlacementChoice {
  Placement where = Placement::kCopy;
  double finish = 0.0;  // when its output is ready, on the caller's clock
};

// The sooner of copying a missed expert (the copy can start at copy_start: when the link
// has finished what it owes and the slot's old reads are done; then the device computes
// it once free at device_free) and computing it on the CPU (free at cpu_free). Times are
// absolute, on one clock; `now` is when the miss is known. Ties go to the copy, which
// also leaves the expert cached.
PlacementChoice place_miss(double now, double copy_start, double device_free, double cpu_free,
                           const ModelCosts& model, int tokens, const HardwareRates& rates);

}  // namespace expertflow
