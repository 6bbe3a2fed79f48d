#!/usr/bin/env bash
# The open kernel experiments in one device call.  1) The load probe (scripts/probe_loads.cu, table in $OUT/probe.md): what bandwidth the
# decode kernel's access pattern, a persistent balanced grid, a cp.async ring and the sm_90 bulk copy engine reach.
# 2) The tensor-core tiles forced in turn (tests); bench_kernel.py at M 5..16 under the settings in KENVS; bench_moe.py
# milo-grouped at M 8 and 32 by default, with the 16-row tile forced and with the decode kernel up to 4 rows per
# expert.  Carry .whl; logs under $OUT (logs.tgz).
#   on the GPU:  bash scripts/device_exp.sh             # PARTS="probe tile kbench moe" (the default) picks steps
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/milo_exp}; mkdir -p "$OUT/logs"
PARTS=" ${PARTS:-probe tile kbench moe} "
part() { [[ $PARTS == *" $1 "* ]]; }
if part probe; then
  nvcc -O3 -std=c++17 -arch=sm_90 -o /tmp/probe scripts/probe_loads.cu && timeout 150 /tmp/probe > "$OUT/probe.md" 2>&1
  echo "probe rc=$?"; grep -E "memcpy|stream|pers|ring|bulk|lane PF1 \| 2 " "$OUT/probe.md" | head -80
fi
if part tile || part kbench || part moe; then source scripts/device_setup.sh /tmp/ext_tile; fi
part tile && { timeout 240 python3 -m pytest -q -x -n 4 tests/test_cuda_kernel.py tests/test_moe_cuda.py \
  -k "forced_tile_configs or grouped_tile_configs" > "$OUT/logs/tests.log" 2>&1
echo "tests rc=$?"; tail -3 "$OUT/logs/tests.log"; }
OUT_LOGS="$OUT/logs"
part kbench && ENVS="${KENVS:-default;MILO_INT3_CTAS_PER_SM=2}" \
  OUT="$OUT_LOGS" for_each_env kernel timeout 100 python3 benchmarks/bench_kernel.py --methods fp16,milo-R0,milo-R32 \
  --no-eager --replays 20 --shapes "${SHAPES:-14336x4096,4096x14336,4096x4096}" --ms "${MS:-5,8,16}"
part moe && ENVS="default;MILO_INT3_GROUPED_CFG=1;MILO_INT3_GROUPED_GEMV_MAX_ROWS=4" \
  OUT="$OUT_LOGS" for_each_env moe timeout 100 python3 benchmarks/bench_moe.py --methods milo-grouped,bf16-grouped \
  --layers "${LAYERS:-mixtral,dsv2lite}" --ms "${MOE_MS:-8,32}"
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$OUT/logs"
