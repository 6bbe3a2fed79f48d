#!/usr/bin/env bash
# First GPU run of branch tile7-grouped (one device call, ~6-8 min; carry .whl): build, GPU tests, memcheck,
# then the grouped op with tile 7 forced against its default tiles, tile 7's split rule against forced
# splits (2 and 7: what main's rule takes at 14336x4096 / 4096x14336 M=32), and tile 7 against the dense
# default past 16 rows. Results under $OUT (logs.tgz).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
export PYTHONUNBUFFERED=1 MILO_CUDA_ARCHS=90 PYTHONPATH=$PWD:/tmp/site TORCH_EXTENSIONS_DIR=/tmp/ext_new MAX_JOBS=16
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c 'from milo_tensor.ops.cuda import load_extension, extension_status; ok=load_extension(); print(extension_status()); raise SystemExit(0 if ok else 1)' > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
echo "build [$(el)s]"
timeout 200 python3 -m pytest -q -p no:cacheprovider -n 8 tests/test_cuda_kernel.py tests/test_moe_cuda.py -rf > "$OUT/test.log" 2>&1
echo "tests rc=$? [$(el)s] $(tail -1 "$OUT/test.log")"; grep -E "^FAILED|^ERROR" "$OUT/test.log" | head -20
for t in test_cuda_kernel test_moe_cuda; do
  timeout 80 compute-sanitizer --tool memcheck --print-limit 10 python3 tests/$t.py --sanitize > "$OUT/san_$t.log" 2>&1
  echo "memcheck $t rc=$? [$(el)s] $(grep -E 'ERROR SUMMARY|cases OK' "$OUT/san_$t.log" | tr '\n' ' ')"
done
for c in 0 7; do
  MILO_INT3_GROUPED_CFG=$c timeout 150 python3 benchmarks/bench_moe.py --methods milo-grouped --ms 8,32,128,512 > "$OUT/moe_cfg$c.log" 2>&1
  grep -E "^==|M=" "$OUT/moe_cfg$c.log" | sed "s/^/cfg$c /"; echo "moe cfg $c [$(el)s]"
done
MILO_INT3_CFG=7 timeout 100 python3 benchmarks/bench_kernel.py --sweep MILO_INT3_SPLITS=-,1,2,4,7,8 --sweep-ranks 0 \
  --shapes 14336x4096,4096x14336 --ms 16,32,64 > "$OUT/sw_splits.md" 2>&1; grep "^|" "$OUT/sw_splits.md"
echo "splits [$(el)s]"
MILO_INT3_FUSED_MAX_M=4096 timeout 120 python3 benchmarks/bench_kernel.py --sweep MILO_INT3_CFG=-,7 --sweep-ranks 0,32 \
  --shapes 14336x4096,4096x14336,4096x4096,1408x2048 --ms 32,64,128 > "$OUT/sw_cfg.md" 2>&1; grep "^|" "$OUT/sw_cfg.md"
echo "cfg sweep [$(el)s]"
(cd "$OUT" && tar czf logs.tgz ./*.log 2>/dev/null; rm -f ./*.log)
