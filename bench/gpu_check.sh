#!/usr/bin/env bash
# The prepared device run for a session lent a GPU: builds with CUDA, runs the C++ and
# Python tests (CUDA ones included), the CUDA microbenchmark, the offload overhead
# benchmark and the per-policy GPU benchmark (bench/gpu_bench.py). Logs and JSON go to $OUT (the device tool's folder) or
# bench/results. Build with the machine's own torch: pip install --no-build-isolation.
set -uo pipefail
out=${OUT:-bench/results}
mkdir -p "$out"
export EXPERTFLOW_CUDA=ON PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$out/gpu.txt" 2>&1
pip install -q --no-build-isolation . 2>&1 | tail -3
cmake --preset test -DEXPERTFLOW_CUDA=ON >"$out/configure.log" 2>&1
cmake --build build/test >"$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
ctest --test-dir build/test --output-on-failure 2>&1 | tee "$out/ctest.log" | tail -5
python -m pytest -q tests/python 2>&1 | tee "$out/pytest.log" | tail -5
./build/test/core_bench --backend cuda --out "$out/core_bench_cuda.json" | tail -20
python bench/offload_overhead.py --device cuda --reps 3 2>&1 | tail -4
cp bench/results/offload_overhead_cuda.json "$out/" 2>/dev/null || true
python bench/gpu_bench.py --out "$out/gpu_bench.json" 2>&1 | grep -v "bench:" | tail -12
