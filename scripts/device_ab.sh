#!/usr/bin/env bash
# Kernel A/B on one GPU: the kernels of an earlier revision ("old") beside the working tree's ("new"),
# built side by side and timed by the same bench_kernel.py command in one device call.
#   here:        bash scripts/device_ab.sh prepare REV     # REV's milo_tensor/ + benchmarks/ into .dev/old
#   on the GPU:  bash scripts/device_ab.sh                 # carry .dev and .whl; results under $OUT
# Environment: METH, SHAPES, MS (bench_kernel.py --methods/--shapes/--ms), TEST_SEL / TEST_T (GPU tests
# of the new tree first), SWEEP (shapes for a warps-per-tile sweep of the new decode kernel), MOE_MS (bench_moe.py
# --ms of both trees, milo-grouped vs bf16-grouped; the new tree's kernels per call listed too).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = prepare ]; then
  grep -qx '/.dev/' .git/info/exclude 2>/dev/null || echo '/.dev/' >> .git/info/exclude
  rm -rf .dev/old && mkdir -p .dev/old && git archive "${2:?revision}" milo_tensor benchmarks | tar -x -C .dev/old
  rm -rf .dev/old/milo_tensor/assets
  exit 0
fi
OUT=${OUT:-/tmp/milo_ab}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MILO_CUDA_ARCHS=${MILO_CUDA_ARCHS:-90}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt"
BUILD='from milo_tensor.ops.cuda import load_extension, extension_status; ok=load_extension(); print(extension_status()); raise SystemExit(0 if ok else 1)'
(cd .dev/old && MAX_JOBS=8 TORCH_EXTENSIONS_DIR=/tmp/ext_old PYTHONPATH=$PWD:/tmp/site python3 -c "$BUILD") > "$OUT/build_old.log" 2>&1 &
MAX_JOBS=8 TORCH_EXTENSIONS_DIR=/tmp/ext_new PYTHONPATH=$PWD:/tmp/site python3 -c "$BUILD" > "$OUT/build_new.log" 2>&1 \
  || { echo "new build failed"; tail -40 "$OUT/build_new.log"; exit 1; }
wait; echo "builds done [$(el)s]"
export PYTHONPATH=$PWD:/tmp/site TORCH_EXTENSIONS_DIR=/tmp/ext_new
if [ -n "${TEST_SEL:-tests/test_cuda_kernel.py tests/test_moe_cuda.py}" ]; then
  timeout "${TEST_T:-240}" python3 -m pytest -q -p no:cacheprovider -n 4 ${TEST_SEL:-tests/test_cuda_kernel.py tests/test_moe_cuda.py} -rf > "$OUT/test.log" 2>&1
  echo "tests rc=$? [$(el)s] $(tail -1 "$OUT/test.log")"; grep -E "^FAILED|^ERROR" "$OUT/test.log" | head -20
fi
B="--methods ${METH:-fp16,milo-R0,milo-R32} --shapes ${SHAPES:-14336x4096,4096x14336,4096x4096,1408x2048,768x2048} --ms ${MS:-1,2,4} --no-eager --replays 20"
(cd .dev/old && TORCH_EXTENSIONS_DIR=/tmp/ext_old PYTHONPATH=$PWD:/tmp/site python3 benchmarks/bench_kernel.py $B) > "$OUT/b_old.log" 2>&1
python3 benchmarks/bench_kernel.py $B > "$OUT/b_new.log" 2>&1; echo "benches done [$(el)s]"
if [ -n "${MOE_MS:-}" ]; then  # the MoE layer, old tree then new, same command
  MB="--methods milo-grouped,bf16-grouped --ms $MOE_MS ${MOE_EXTRA:-}"
  (cd .dev/old && TORCH_EXTENSIONS_DIR=/tmp/ext_old PYTHONPATH=$PWD:/tmp/site timeout 200 python3 benchmarks/bench_moe.py $MB) > "$OUT/moe_old.log" 2>&1
  timeout 200 python3 benchmarks/bench_moe.py $MB --profile > "$OUT/moe_new.log" 2>&1
  echo "moe done [$(el)s]"; grep -E "^==|M=" "$OUT/moe_old.log" | sed 's/^/old /'; grep -E "^==|M=|kernels per|^      " "$OUT/moe_new.log" | sed 's/^/new /'
fi
if [ -n "${SWEEP:-}" ]; then
  SWEEP_WK=0,1,2,4,8 timeout 200 python3 benchmarks/bench_kernel.py --sweep --shapes "$SWEEP" --ms "${SWEEP_MS:-1,2}" > "$OUT/sweep.md" 2>&1
  grep "^|" "$OUT/sweep.md"
fi
python3 - "$OUT" <<'PY'
import re, sys
rows = {}
for tag in ("old", "new"):
    shape = None
    for line in open(f"{sys.argv[1]}/b_{tag}.log"):
        m = re.match(r"== (\d+) x (\d+) ==", line)
        if m:
            shape = f"{m.group(1)}x{m.group(2)}"
        m = re.match(r"\s+(\S+)\s+M=\s*(\d+): graph\s+([\d.]+)", line)
        if m:
            rows.setdefault((shape, int(m.group(2)), m.group(1)), {})[tag] = m.group(3)
print("| N x K | M | method | old us | new us |\n|---|---|---|---|---|")
for (shape, M, meth), v in rows.items():
    print(f"| {shape} | {M} | {meth} | {v.get('old', '-')} | {v.get('new', '-')} |")
PY
