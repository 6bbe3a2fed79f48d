#!/usr/bin/env bash
# The grouped op's launch switches on the MoE layer benchmark (one device call): bench_moe.py milo-grouped under each
# environment setting in ENVS (';'-separated; 'default' = none), same build, same run.  Carry .whl; results under $OUT.
#   on the GPU:  ENVS="default;MILO_INT3_GEMV_WK=2" LAYERS=qwen3,dsv2lite MOE_MS=1,8,32 bash scripts/device_moe_env.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/milo_env}; mkdir -p "$OUT"
source scripts/device_setup.sh /tmp/ext_env
for_each_env env timeout 200 python3 benchmarks/bench_moe.py --methods milo-grouped${BF16:+,bf16-grouped} \
  --layers "${LAYERS:-qwen3,dsv2lite}" --ms "${MOE_MS:-1,8,32}"
