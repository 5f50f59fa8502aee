#!/usr/bin/env bash
# The prepared device run for a session lent a GPU, inside 8 minutes on an H200: builds
# with CUDA and the machine's own torch (pip install --no-build-isolation), runs the C++
# and Python tests (CUDA ones included), the big-model check (16 GiB of experts through a
# 4 GiB budget), the per-policy GPU benchmark, the CUDA microbenchmark, the offload
# overhead and the host memory of loading. Logs and JSON go to $OUT (the device tool's
# folder) or bench/results. Each step has its own time limit, and all of them together 470 s,
# so that one hang costs only its step and the run leaves time for a second one.
set -uo pipefail
deadline=$((SECONDS + 470))
out=${OUT:-bench/results}
mkdir -p "$out"
export EXPERTFLOW_CUDA=ON PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=16
step() {  # step SECONDS LOG command...: runs it, logs it, prints its tail and its status
  local limit=$1 log=$2; shift 2
  local start=$SECONDS
  ((limit > deadline - SECONDS)) && limit=$((deadline - SECONDS))
  ((limit > 0)) || { echo "== $log: skipped, no time left"; return; }
  timeout "$limit" "$@" >"$out/$log" 2>&1
  local status=$?
  tail -8 "$out/$log"
  echo "== $log: exit $status in $((SECONDS - start)) s"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$out/gpu.txt" 2>&1
cat "$out/gpu.txt"
step 150 install.log pip install --no-build-isolation .
step 120 build.log bash -c "cmake --preset test -DEXPERTFLOW_CUDA=ON && cmake --build build/test"
step 60 ctest.log ctest --test-dir build/test --output-on-failure
step 120 pytest.log python -m pytest -q tests/python
step 150 big_model_check.log python bench/big_model_check.py --out "$out/big_model_check.json"
step 150 gpu_bench.log python bench/gpu_bench.py --out "$out/gpu_bench.json"
step 30 core_bench.log ./build/test/core_bench --backend cuda --out "$out/core_bench_cuda.json"
step 60 offload_overhead.log python bench/offload_overhead.py --device cuda --reps 3
cp bench/results/offload_overhead_cuda.json "$out/" 2>/dev/null || true
step 60 host_memory.log python bench/host_memory.py --device cuda --out "$out/host_memory_cuda.json"
