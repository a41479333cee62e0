#!/usr/bin/env bash
# One-GPU benchmark (under 8 minutes on one H200): the base config through the real trainer
# (ZeRO-2, bf16, batch 64, synthetic shards), benchmarks/step.py, the loader on every core,
# retrieval re-ranking (ITM pairs/s) and the hot loop's syncs; writes one JSON with samples/s,
# MFU (--peak-tflops, default 989 = H200 bf16 dense), peak memory and data-wait fraction.
#
#   benchmarks/gpu.sh [--out runs/bench_gpu/result.json] [--peak-tflops 989] [--steps 120]
#   benchmarks/gpu.sh --smoke      # the same path on the CPU, tiny config, minutes (tests)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
exec "$PY" benchmarks/gpu_run.py "$@"
