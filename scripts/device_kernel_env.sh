#!/usr/bin/env bash
# The dense op's launch switches on the kernel benchmark (one device call): bench_kernel.py under each environment
# setting in ENVS (';'-separated; 'default' = none), same build, same run; then each kernel's duration per launch
# (ncu gpu__time_duration, one cold-ish launch each) for the NCU cases (bench_kernel.py --profile NxKxMxR).
# Carry .whl; results under $OUT.
#   on the GPU:  ENVS="default;MILO_INT3_PDL=0" SHAPES=14336x4096,4096x14336 MS=1,4 bash scripts/device_kernel_env.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/milo_kenv}; mkdir -p "$OUT"
source scripts/device_setup.sh /tmp/ext_kenv
for_each_env kenv timeout 150 python3 benchmarks/bench_kernel.py --methods "${METH:-milo-R0,milo-R32}" --no-eager \
  --replays 20 --shapes "${SHAPES:-14336x4096,4096x14336,4096x4096}" --ms "${MS:-1,4}"
for c in ${NCU:-}; do
  timeout 90 ncu --clock-control none --kernel-name regex:"int3|lowrank" --metrics gpu__time_duration.sum python3 benchmarks/bench_kernel.py --profile "$c" \
    > "$OUT/ncu_$c.txt" 2>&1
  echo "ncu $c rc=$?"; grep -E "_kernel|gpu__time_duration" "$OUT/ncu_$c.txt" | sed -E 's/^ *(void )?milo::\(anonymous namespace\)::/  /' | cut -c1-110 | head -24
done
