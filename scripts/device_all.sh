#!/usr/bin/env bash
# One device call: build the kernels, then the steps named in STEPS (space separated), each with
# its own time limit; everything lands in $OUT.
#   STEPS="test sanitize compress kbench" bash scripts/device_all.sh
# steps: test (tests/test_cuda_kernel.py + tests/test_moe_cuda.py), sanitize (compute-sanitizer
# memcheck of both ops), compress (benchmarks/compress.py, full), kbench (benchmarks/bench_kernel.py),
# moe (benchmarks/bench_moe.py), decode (benchmarks/bench_decode.py), sweep (one path or tuning
# switch over its values: bench_kernel.py --sweep "$SWEEP_VAR", default the decode kernel's warps per
# tile; MILO_INT3_GEMV_MAX_M=4096,0 for decode kernel vs tensor-core kernel).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/milo_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} MILO_CUDA_ARCHS=${MILO_CUDA_ARCHS:-90}
STEPS=${STEPS:-"test sanitize"}
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site || echo "wheel install failed"
else
  export PYTHONPATH=$PWD
fi
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv,noheader
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
  nvcc --version | tail -1
} 2>&1 | tee "$OUT/device.txt"
echo "== build [$(el)s]"
timeout 300 python3 -c "
import time; t=time.time()
from milo_tensor.ops.cuda import load_extension, extension_status
ok = load_extension(); print(extension_status(), f'{time.time()-t:.1f}s')
raise SystemExit(0 if ok else 1)" > /tmp/milo_build.log 2>&1 || { echo BUILD FAILED; cp /tmp/milo_build.log "$OUT/build.log"; tail -30 /tmp/milo_build.log; exit 1; }
tail -1 /tmp/milo_build.log
has() { case " $STEPS " in *" $1 "*) return 0;; *) return 1;; esac; }
log() { echo "$*" >> "$OUT/summary.txt"; echo "$*"; }
if has test; then
  echo "== tests [$(el)s]"
  timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -x -p no:cacheprovider --maxfail=20 ${PYTEST_ARGS:-} tests/test_cuda_kernel.py tests/test_moe_cuda.py -rf \
    > "$OUT/test.log" 2>&1
  log "pytest rc=$? $(grep -E '[0-9]+ (passed|failed)' "$OUT/test.log" | tail -1)"
  grep -E "^FAILED|^ERROR|Error|assert" "$OUT/test.log" | head -20
fi
if has sanitize; then
  echo "== sanitize [$(el)s]"
  for t in test_cuda_kernel test_moe_cuda; do
    timeout ${SAN_TIMEOUT:-120} compute-sanitizer --tool memcheck --print-limit 10 python3 tests/$t.py --sanitize > "$OUT/sanitize_$t.log" 2>&1
    log "sanitize $t rc=$? $(grep -E 'ERROR SUMMARY|cases OK' "$OUT/sanitize_$t.log" | tr '\n' ' ')"
  done
fi
if has compress; then
  echo "== compress [$(el)s]"
  timeout ${COMPRESS_TIMEOUT:-200} python3 benchmarks/compress.py --out "$OUT/compress.md" > "$OUT/compress.log" 2>&1
  log "compress rc=$?"; tail -12 "$OUT/compress.log"
fi
if has moe; then
  echo "== bench_moe [$(el)s]"
  timeout ${MOE_TIMEOUT:-200} python3 benchmarks/bench_moe.py --out "$OUT/bench_moe.md" ${MOE_ARGS:-} > /tmp/bench_moe.log 2>&1
  log "bench_moe rc=$?"; tail -25 /tmp/bench_moe.log
fi
if has decode; then
  echo "== bench_decode [$(el)s]"
  timeout ${DECODE_TIMEOUT:-150} python3 benchmarks/bench_decode.py --out "$OUT/bench_decode.md" ${DECODE_ARGS:-} > /tmp/bench_decode.log 2>&1
  log "bench_decode rc=$?"; tail -12 /tmp/bench_decode.log
fi
if has sweep; then
  echo "== sweep [$(el)s]"
  timeout ${SWEEP_TIMEOUT:-150} python3 benchmarks/bench_kernel.py --sweep "${SWEEP_VAR:-MILO_INT3_GEMV_WK=-,1,2,4,8}" \
    --sweep-ranks ${SWEEP_RANKS:-0} --shapes ${SWEEP_SHAPES:-14336x4096,4096x14336,4096x4096,1408x2048} \
    --ms ${SWEEP_MS:-1,4} > "$OUT/sweep.md" 2>&1
  log "sweep rc=$?"; cat "$OUT/sweep.md"
fi
if has kbench; then
  echo "== bench_kernel [$(el)s]"
  LEFT=$(( ${TOTAL_BUDGET:-570} - $(el) ))
  timeout $(( LEFT > 30 ? LEFT : 30 )) python3 benchmarks/bench_kernel.py --out "$OUT/bench_kernel.md" \
    --budget-s $(( LEFT > 160 ? LEFT - 160 : 10 )) ${KBENCH_ARGS:-} > "$OUT/bench_kernel.log" 2>&1
  log "bench_kernel rc=$?"
  [ -f "$OUT/bench_kernel.md" ] && sed -n '/## CUDA graph/,/## eager/p' "$OUT/bench_kernel.md" | cut -c1-200 || tail -30 "$OUT/bench_kernel.log"
fi
echo "== done [$(el)s]"
cat "$OUT/summary.txt" 2>/dev/null
