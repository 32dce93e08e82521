#!/usr/bin/env bash
# Every GPU figure this project reports, on one CUDA GPU, in under 8 minutes: the fused-softmax kernel
# (correctness and bandwidth), bf16 training steps of GPT 125M-1.3B per attention backend (TFLOP/s, MFU,
# peak memory against the estimate), and the layout sweep at world size 1. Writes gpu_suite.json and
# gpu_suite.md under benchmarks/results/gpu_suite (or --output-dir DIR).
# Without CUDA: says so, runs the same code path tiny on the CPU, exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" benchmarks/gpu_suite.py "$@"
