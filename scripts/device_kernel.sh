#!/usr/bin/env bash
# The one script the GPU machine runs for the int3 kernel: build, test, sanitize, benchmark.
#
#   bash scripts/device_kernel.sh [all|test|bench|quick] [extra bench args...]
#
# Run from anywhere; works in the repository root. Results go to $OUT (default /tmp/milo_kernel_out):
# device.txt, build.log, test.log, sanitize.log, bench_kernel.md/.json. Peers that are not installed
# (torchao, gemlite) are installed from ./.whl if that folder exists (see docs/kernel.md).
# Each step has a time limit so the whole run stays inside one 10-minute device call.
set -uo pipefail
MODE=${1:-all}
shift || true
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/milo_kernel_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-16}
export MILO_CUDA_ARCHS=${MILO_CUDA_ARCHS:-90}
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site:${PYTHONPATH:-} || echo "wheel install failed"
else
  export PYTHONPATH=$PWD:${PYTHONPATH:-}
fi

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  nvcc --version | tail -2
} 2>&1 | tee "$OUT/device.txt"

echo "== build [$(el)s]"
MILO_JIT_VERBOSE=1 timeout 300 python3 -c "
import time; t=time.time()
from milo_tensor.ops.cuda import load_extension, extension_status
ok = load_extension(); print(extension_status(), f'{time.time()-t:.1f}s')
raise SystemExit(0 if ok else 1)" > "$OUT/build.log" 2>&1
BUILD_RC=$?
grep -E "error|warning|Used [0-9]+ registers|spill" "$OUT/build.log" | grep -v "^$" | tail -40
tail -2 "$OUT/build.log"
[ $BUILD_RC -ne 0 ] && { echo "BUILD FAILED"; exit 1; }
# SASS instruction mix of the decode kernel (fp16, M<=16, group 64)
SO=$(ls -t ~/.cache/torch_extensions/*/milo_tensor_cuda/milo_tensor_cuda.so 2>/dev/null | head -1)
if [ -n "$SO" ] && command -v cuobjdump >/dev/null; then
  cuobjdump -sass "$SO" > "$OUT/sass_all.txt" 2>/dev/null
  awk '/Function : .*int3_gemm_kernel.*6__halfLi1ELi8ELi2ELi64/{f=1;next} f&&/Function :/{f=0} f' "$OUT/sass_all.txt" > "$OUT/sass_mt1_f16_g64.txt"
  echo "SASS mix (MT=1 fp16 g64):"; grep -oE "^\s+/\*[0-9a-f]+\*/\s+[A-Z0-9_.]+" "$OUT/sass_mt1_f16_g64.txt" | awk '{print $2}' \
    | sed 's/\..*//' | sort | uniq -c | sort -rn | head -16 | tr '\n' ' '; echo
  rm -f "$OUT/sass_all.txt"
fi

if [ "$MODE" = all ] || [ "$MODE" = test ] || [ "$MODE" = profile ]; then
  echo "== tests [$(el)s]"
  timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider --maxfail=25 tests/test_cuda_kernel.py \
    > "$OUT/test.log" 2>&1
  echo "pytest rc=$?"
  grep -E "passed|failed|error" "$OUT/test.log" | tail -5
  grep -E "^FAILED|relative error|Error" "$OUT/test.log" | head -30
fi
if [ "$MODE" = all ] || [ "$MODE" = test ]; then
  echo "== compute-sanitizer memcheck [$(el)s]"
  timeout ${SAN_TIMEOUT:-150} compute-sanitizer --tool memcheck --print-limit 10 \
    python3 tests/test_cuda_kernel.py --sanitize > "$OUT/sanitize.log" 2>&1
  echo "sanitizer rc=$?"
  grep -E "ERROR SUMMARY|sanitize cases|Invalid|out of bounds|Error" "$OUT/sanitize.log" | head -12
fi

if [ "$MODE" = profile ]; then
  echo "== ncu [$(el)s]"
  CASES=${PROFILE_CASES:-14336x4096x1x0,4096x14336x1x0,14336x4096x16x0,14336x4096x64x0}
  for CFG in ${PROFILE_CFGS:-0}; do
    MILO_INT3_DECODE_CFG=$CFG timeout 150 ncu --clock-control none -k regex:'int3_gemm|dequant' --launch-skip 1 --launch-count 1 \
      --section SpeedOfLight --section WarpStateStats --section Occupancy \
      --metrics regex:'smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
      python3 benchmarks/bench_kernel.py --profile "$CASES" > "$OUT/ncu_cfg$CFG.txt" 2>&1
    echo "ncu cfg=$CFG rc=$?"
    grep -E "int3_gemm_kernel|Duration|DRAM Throughput|Achieved Active Warps|Warp Cycles Per Issued|issue_stalled" "$OUT/ncu_cfg$CFG.txt" \
      | sed -E 's/ +/ /g; s/smsp__average_warps_issue_stalled_//; s/_per_issue_active.ratio//' | awk '$NF+0 >= 0.3 || !/ratio/' | cut -c1-110 | head -40
  done
  echo "== sweep [$(el)s]"
  timeout ${SWEEP_TIMEOUT:-200} python3 benchmarks/bench_kernel.py --sweep --shapes ${SWEEP_SHAPES:-14336x4096,4096x14336,4096x4096} \
    --ms ${SWEEP_MS:-1,16,64} > "$OUT/sweep.txt" 2>&1
  grep -E "^\||check" "$OUT/sweep.txt" | head -60
fi

if [ -n "${RUN_SWEEP:-}" ] && [ "$MODE" != profile ]; then
  echo "== sweep [$(el)s]"
  SWEEP_CFGS=${SWEEP_CFGS:-1,10,13,17,18} SWEEP_PER_SM=${SWEEP_PER_SM:-3,4,6} timeout ${SWEEP_TIMEOUT:-100} \
    python3 benchmarks/bench_kernel.py --sweep --shapes ${SWEEP_SHAPES:-14336x4096,4096x14336} --ms ${SWEEP_MS:-1,16} \
    > "$OUT/sweep.txt" 2>&1
  grep -E "^\||check" "$OUT/sweep.txt" | head -40
fi

if [ -z "${SKIP_BENCH:-}" ] && { [ "$MODE" = all ] || [ "$MODE" = bench ] || [ "$MODE" = quick ] || [ "$MODE" = profile ]; }; then
  echo "== bench [$(el)s]"
  Q=""
  [ "$MODE" = quick ] || [ "$MODE" = profile ] && Q="--quick"
  LEFT=$(( ${TOTAL_BUDGET:-560} - $(el) ))
  timeout $(( LEFT > 30 ? LEFT : 30 )) python3 benchmarks/bench_kernel.py $Q --out "$OUT/bench_kernel.md" \
    --budget-s $(( LEFT > 90 ? LEFT - 90 : 10 )) "$@" > "$OUT/bench.log" 2>&1
  echo "bench rc=$?"
  if [ -f "$OUT/bench_kernel.md" ]; then sed -n '/## CUDA graph/,/## eager/p' "$OUT/bench_kernel.md"; else tail -40 "$OUT/bench.log"; fi
fi
echo "== done [$(el)s]"
