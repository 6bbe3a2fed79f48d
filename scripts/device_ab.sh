#!/usr/bin/env bash
# Kernel A/B on one GPU: the kernels of an earlier revision ("old") beside the working tree's ("new"),
# built side by side and timed by the same bench_kernel.py command in one device call.
#   here:        bash scripts/device_ab.sh prepare REV     # REV's milo_tensor/ + benchmarks/ into .dev/old
#   optionally:  python scripts/prebuild_ext.py --torch T [--tree .dev/old]   # the builds done here, not there
#   on the GPU:  bash scripts/device_ab.sh                 # carry .dev and .whl (and milo_tensor/_C.*); results under $OUT
#   (two prebuilt libraries and the wheels pass the device tool's 64 MiB carry: `xz -c .dev/old/milo_tensor/_C.abi3.so >
#   .dev/old.so.xz`, that file removed from .dev/old; every .dev/NAME.so.xz is unpacked into .dev/NAME there first)
# Environment: METH, SHAPES, MS (bench_kernel.py --methods/--shapes/--ms; DENSE=0 skips it), TEST_SEL / TEST_T (GPU tests
# of the new tree first), SANITIZE=1 (then compute-sanitizer memcheck of its ops, SAN_T seconds each, test files SAN_SEL), SWEEP
# (shapes for a sweep of one switch of the new tree: SWEEP_VAR, default the decode kernel's warps per tile), MOE_MS (bench_moe.py --ms of both trees,
# milo-grouped vs bf16-grouped; the new tree's kernels per call listed too).
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
for xz in .dev/*.so.xz; do  # .dev/NAME.so.xz: the prebuilt library of the tree .dev/NAME (old, or a third one)
  [ -f "$xz" ] || continue
  so=".dev/$(basename "$xz" .so.xz)/milo_tensor/_C.abi3.so"
  [ -f "$so" ] || python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" \
    "$xz" "$so" || exit 1
done
# a library prebuilt here by scripts/prebuild_ext.py serves only the sources it was built from (the loader
# checks that too, but an old tree's loader may predate the check)
for t in . .dev/*/; do  # the working tree, .dev/old and any third tree
  t=${t%/}; so=$t/milo_tensor/_C.abi3.so; [ -f "$so" ] || continue
  why=$(PYTHONPATH=scripts python3 -c "import sys; from prebuild_ext import tree_loader; print(tree_loader('.').prebuilt_mismatch(sys.argv[1]))" "$t/milo_tensor")
  [ -f "$t/milo_tensor/_C.sources.sha256" ] || why="no _C.sources.sha256 beside it"
  [ -z "$why" ] || { echo "$so removed (JIT): $why"; rm -f "$so"; }
done
(cd .dev/old && MAX_JOBS=8 TORCH_EXTENSIONS_DIR=/tmp/ext_old PYTHONPATH=$PWD:/tmp/site python3 -c "$BUILD") > "$OUT/build_old.log" 2>&1 &
MAX_JOBS=8 TORCH_EXTENSIONS_DIR=/tmp/ext_new PYTHONPATH=$PWD:/tmp/site python3 -c "$BUILD" > "$OUT/build_new.log" 2>&1 \
  || { echo "new build failed"; tail -40 "$OUT/build_new.log"; exit 1; }
wait; echo "builds done [$(el)s]: old $(tail -1 "$OUT/build_old.log"), new $(tail -1 "$OUT/build_new.log")"
export PYTHONPATH=$PWD:/tmp/site TORCH_EXTENSIONS_DIR=/tmp/ext_new
if [ -n "${TEST_SEL:-tests/test_cuda_kernel.py tests/test_moe_cuda.py}" ]; then
  timeout "${TEST_T:-240}" python3 -m pytest -q -p no:cacheprovider -n 4 ${TEST_SEL:-tests/test_cuda_kernel.py tests/test_moe_cuda.py} -rf > "$OUT/test.log" 2>&1
  echo "tests rc=$? [$(el)s] $(tail -1 "$OUT/test.log")"; grep -E "^FAILED|^ERROR" "$OUT/test.log" | head -20
fi
if [ -n "${SANITIZE:-}" ]; then  # compute-sanitizer memcheck of the new tree's ops
  for t in ${SAN_SEL:-test_cuda_kernel test_moe_cuda}; do
    timeout "${SAN_T:-150}" compute-sanitizer --tool memcheck --print-limit 10 python3 tests/$t.py --sanitize > "$OUT/san_$t.log" 2>&1
    echo "memcheck $t rc=$? [$(el)s] $(grep -E 'ERROR SUMMARY|cases OK' "$OUT/san_$t.log" | tr '\n' ' ')"
  done
fi
B="--methods ${METH:-fp16,milo-R0,milo-R32} --shapes ${SHAPES:-14336x4096,4096x14336,4096x4096,1408x2048,768x2048} --ms ${MS:-1,2,4} --no-eager --replays 20"
# ROUNDS rounds of old then new (default 2): drift of the machine between runs shows as a difference between rounds
ROUNDS=${ROUNDS:-2}
for r in $(seq "$ROUNDS"); do
  [ "${DENSE:-1}" = 0 ] && break  # DENSE=0: no dense A/B
  (cd .dev/old && TORCH_EXTENSIONS_DIR=/tmp/ext_old PYTHONPATH=$PWD:/tmp/site python3 benchmarks/bench_kernel.py $B) > "$OUT/b_old$r.log" 2>&1
  python3 benchmarks/bench_kernel.py $B > "$OUT/b_new$r.log" 2>&1
done
echo "benches done [$(el)s]"
if [ -n "${MOE_MS:-}" ]; then  # the MoE layer, old tree then new, same command, ROUNDS rounds; the kernels per call once
  MB="--methods milo-grouped,bf16-grouped --ms $MOE_MS ${MOE_EXTRA:-}"
  for r in $(seq "$ROUNDS"); do
    (cd .dev/old && TORCH_EXTENSIONS_DIR=/tmp/ext_old PYTHONPATH=$PWD:/tmp/site timeout 200 python3 benchmarks/bench_moe.py $MB) > "$OUT/moe_old$r.log" 2>&1
    timeout 200 python3 benchmarks/bench_moe.py $MB $([ "$r" = 1 ] && echo --profile) > "$OUT/moe_new$r.log" 2>&1
    grep -E "^==|M=" "$OUT/moe_old$r.log" | sed "s/^/old$r /"; grep -E "^==|M=" "$OUT/moe_new$r.log" | sed "s/^/new$r /"
  done
  echo "moe done [$(el)s]"; grep -E "^==|kernels per" "$OUT/moe_new1.log"  # the kernel lists stay in the log
fi
if [ -n "${SWEEP:-}" ]; then
  timeout 200 python3 benchmarks/bench_kernel.py --sweep "${SWEEP_VAR:-MILO_INT3_GEMV_WK=-,1,2,4,8}" \
    --sweep-ranks "${SWEEP_RANKS:-0}" --shapes "$SWEEP" --ms "${SWEEP_MS:-1,2}" > "$OUT/sweep.md" 2>&1
  grep "^|" "$OUT/sweep.md"
fi
[ "${DENSE:-1}" = 0 ] || python3 - "$OUT" "$ROUNDS" <<'PY'
import re, sys
rows, tags = {}, [f"{t}{r}" for r in range(1, int(sys.argv[2]) + 1) for t in ("old", "new")]
for tag in tags:
    shape = None
    for line in open(f"{sys.argv[1]}/b_{tag}.log"):
        m = re.match(r"== (\d+) x (\d+) ==", line)
        if m:
            shape = f"{m.group(1)}x{m.group(2)}"
        m = re.match(r"\s+(\S+)\s+M=\s*(\d+): graph\s+([\d.]+)", line)
        if m:
            rows.setdefault((shape, int(m.group(2)), m.group(1)), {})[tag] = m.group(3)
print("| N x K | M | method | " + " | ".join(f"{t} us" for t in tags) + " |\n|---|---|---|" + "---|" * len(tags))
for (shape, M, meth), v in rows.items():
    print(f"| {shape} | {M} | {meth} | " + " | ".join(v.get(t, "-") for t in tags) + " |")
PY
# the verdicts again, last (a device call returns only the tail of the output)
echo "== summary [$(el)s]"
[ -f "$OUT/test.log" ] && echo "tests: $(tail -1 "$OUT/test.log")"
for f in "$OUT"/san_*.log; do [ -f "$f" ] && echo "memcheck $(basename "$f" .log): $(grep -E 'ERROR SUMMARY|cases OK' "$f" | tr '\n' ' ')"; done
# the logs in one file (what comes back from a device call is limited to a few files); callers that add
# their own logs should archive them under another name
(cd "$OUT" && tar czf ab_logs.tgz ./*.log && rm -f ./*.log)
