#!/usr/bin/env bash
# Tiles 8 and 9's GPU runs (one device call each, ~5-9 min; carry .whl): build, GPU tests, memcheck, then (PARTS)
# tile 8's 16- and 32-row blocks against the default and tile 7 (small: dense 9-32 rows, grouped M 8-128), the
# dense op's tiles 7 and 8 past 32 rows (dense), tile 8's split count (split8), the grouped op with tiles 7 and 8
# (moe), the dense default at 17-256 rows (bt32), the grouped default against bf16 (moedef), tile 8's rows of x a
# block forced (bt), tile 9 against tile 8 (ws), the dense default past 64 rows (rule), tile 8's stalls by SASS
# line (hot; HOT_CFG=9 profiles tile 9). Results under $OUT (logs.tgz and the tables). PARTS picks steps (default:
# build test sanitize small dense moe).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PARTS=${PARTS:-"build test sanitize small dense moe"}
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
has() { [[ " $PARTS " == *" $1 "* ]]; }
export PYTHONUNBUFFERED=1 MILO_CUDA_ARCHS=90 PYTHONPATH=$PWD:/tmp/site TORCH_EXTENSIONS_DIR=/tmp/ext_new MAX_JOBS=16
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c 'from milo_tensor.ops.cuda import load_extension, extension_status; ok=load_extension(); print(extension_status()); raise SystemExit(0 if ok else 1)' > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
echo "build [$(el)s]"
if has test; then
  timeout 300 python3 -m pytest -q -p no:cacheprovider -n 8 tests/test_cuda_kernel.py tests/test_moe_cuda.py -rf > "$OUT/test.log" 2>&1
  echo "tests rc=$? [$(el)s] $(tail -1 "$OUT/test.log")"; grep -E "^FAILED|^ERROR" "$OUT/test.log" | head -30
fi
if has sanitize; then
  for t in test_cuda_kernel test_moe_cuda; do
    timeout 90 compute-sanitizer --tool memcheck --print-limit 10 python3 tests/$t.py --sanitize > "$OUT/san_$t.log" 2>&1
    echo "memcheck $t rc=$? [$(el)s] $(grep -E 'ERROR SUMMARY|cases OK' "$OUT/san_$t.log" | tr '\n' ' ')"
  done
fi
if has small; then  # tile 8's 16- and 32-row blocks (branch tile8-small) against the default and tile 7
  MILO_INT3_FUSED_MAX_M=4096 timeout 150 python3 benchmarks/bench_kernel.py --sweep MILO_INT3_CFG=-,7,8 --sweep-ranks 0,32 \
    --shapes 14336x4096,4096x14336,4096x4096,1408x2048 --ms 9,16,24,32 > "$OUT/sw_small.md" 2>&1; grep "^|" "$OUT/sw_small.md"
  for c in 7 8; do
    MILO_INT3_GROUPED_CFG=$c timeout 120 python3 benchmarks/bench_moe.py --methods milo-grouped --ms 8,32,128 > "$OUT/moe_small$c.log" 2>&1
    grep -E "^\|" "$OUT/moe_small$c.log" | sed "s/^/cfg$c /"; echo "moe small cfg $c [$(el)s]"
  done
  echo "small [$(el)s]"
fi
if has bt32; then  # the dense default with tile 8's 32-row blocks at 17-32 rows, against tiles 7 and 8 forced
  MILO_INT3_FUSED_MAX_M=4096 timeout 150 python3 benchmarks/bench_kernel.py --sweep MILO_INT3_CFG=-,7,8 --sweep-ranks 0,32 \
    --shapes 14336x4096,4096x14336,4096x4096,1408x2048 --ms 17,32,64,128,256 > "$OUT/sw_bt32.md" 2>&1; grep "^|" "$OUT/sw_bt32.md"
  echo "bt32 [$(el)s]"
fi
if has moedef; then  # the grouped op's default rule against bf16
  timeout 170 python3 benchmarks/bench_moe.py --methods milo-grouped,bf16-grouped --layers mixtral,qwen3,dsv2lite \
    --ms 32,128,512 > "$OUT/moe_def.log" 2>&1; grep -E "^\|" "$OUT/moe_def.log"; echo "moe default [$(el)s]"
fi
if has dense; then
  MILO_INT3_FUSED_MAX_M=4096 timeout 200 python3 benchmarks/bench_kernel.py --sweep MILO_INT3_CFG=-,7,8 --sweep-ranks 0,32 \
    --shapes 14336x4096,4096x14336,4096x4096 --ms 32,64,128,256 > "$OUT/sw_cfg.md" 2>&1; grep "^|" "$OUT/sw_cfg.md"
  echo "dense cfg sweep [$(el)s]"
fi
if has moe; then
  for c in 0 7 8; do
    MILO_INT3_GROUPED_CFG=$c timeout 150 python3 benchmarks/bench_moe.py --methods milo-grouped$([ $c = 0 ] && echo ,bf16-grouped) --layers mixtral,qwen3 --ms 32,128,512 > "$OUT/moe_cfg$c.log" 2>&1
    grep -E "^==|M=|^\|" "$OUT/moe_cfg$c.log" | sed "s/^/cfg$c /"; echo "moe cfg $c [$(el)s]"
  done
fi
if has split8; then
  MILO_INT3_CFG=8 MILO_INT3_FUSED_MAX_M=4096 timeout 100 python3 benchmarks/bench_kernel.py --sweep MILO_INT3_SPLITS=-,1,2,3,4 \
    --sweep-ranks 0 --shapes 14336x4096,4096x14336 --ms 64,128,256 > "$OUT/sw_split8.md" 2>&1; grep "^|" "$OUT/sw_split8.md"
  echo "tile 8 splits [$(el)s]"
fi
if has bt; then  # tile 8's rows of x a block forced (2 blocks per SM at 32 rows: blocks, not barriers, interleave)
  MILO_INT3_CFG=8 MILO_INT3_FUSED_MAX_M=4096 timeout 150 python3 benchmarks/bench_kernel.py --sweep MILO_INT3_WA_BT=-,32,64 \
    --sweep-ranks 0 --shapes 14336x4096,4096x14336 --ms 64,128,256 > "$OUT/sw_bt.md" 2>&1; grep "^|" "$OUT/sw_bt.md"
  echo "bt [$(el)s]"
fi
if has ws; then  # tile 9 (tile 8 with a producer warpgroup and mbarriers) against tile 8, dense and grouped
  MILO_INT3_FUSED_MAX_M=4096 timeout 200 python3 benchmarks/bench_kernel.py --sweep MILO_INT3_CFG=8,9 --sweep-ranks 0,32 \
    --shapes 14336x4096,4096x14336,4096x4096 --ms 32,64,128,256 > "$OUT/sw_ws.md" 2>&1; grep "^|" "$OUT/sw_ws.md"
  for c in 8 9; do
    MILO_INT3_GROUPED_CFG=$c timeout 120 python3 benchmarks/bench_moe.py --methods milo-grouped --layers mixtral,qwen3 \
      --ms 128,512 > "$OUT/moe_ws$c.log" 2>&1; grep -E "^\|" "$OUT/moe_ws$c.log" | sed "s/^/cfg$c /"
  done
  echo "ws [$(el)s]"
fi
if has rule; then  # the dense default (tile 8 to 128 rows for 32M+ codes) against the earlier limit of 64 rows
  timeout 150 python3 benchmarks/bench_kernel.py --sweep MILO_INT3_FUSED_MAX_M=-,64 --sweep-ranks 0,32 \
    --shapes 14336x4096,4096x14336,28672x4096 --ms 64,80,96,128,160 > "$OUT/sw_rule.md" 2>&1; grep "^|" "$OUT/sw_rule.md"
  echo "rule [$(el)s]"
fi
if has hot; then  # where tile 8's warps stall, by SASS line (ncu source counters), at 14336x4096 M=64 and 128
  for m in 64 128; do
    MILO_INT3_CFG=${HOT_CFG:-8} MILO_INT3_FUSED_MAX_M=4096 timeout 150 ncu -o "$OUT/rep$m" --kernel-name regex:int3_gemm_wa --launch-count 1 \
      --section SourceCounters --section WarpStateStats python3 benchmarks/bench_kernel.py --profile 14336x4096x${m}x0 > "$OUT/ncu$m.log" 2>&1
    python3 scripts/ncu_hotspots.py "$OUT/rep$m.ncu-rep" 30 > "$OUT/hot$m.txt" 2>&1; cut -c1-160 "$OUT/hot$m.txt" | head -32
    rm -f "$OUT/rep$m.ncu-rep"
  done
  echo "hot [$(el)s]"
fi
(cd "$OUT" && tar czf logs.tgz ./*.log 2>/dev/null; rm -f ./*.log)
