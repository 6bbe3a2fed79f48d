#!/usr/bin/env bash
# The grouped op's launch switches on the MoE layer benchmark (one device call): bench_moe.py milo-grouped under each
# environment setting in ENVS (';'-separated; 'default' = none), same build, same run.  Carry .whl; results under $OUT.
#   on the GPU:  ENVS="default;MILO_INT3_GEMV_WK=2" LAYERS=qwen3,dsv2lite MOE_MS=1,8,32 bash scripts/device_moe_env.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/milo_env}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MILO_CUDA_ARCHS=${MILO_CUDA_ARCHS:-90} PYTHONPATH=$PWD:/tmp/site TORCH_EXTENSIONS_DIR=/tmp/ext_env
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
MAX_JOBS=12 python3 -c 'from milo_tensor.ops.cuda import load_extension, extension_status; ok=load_extension(); print(extension_status()); raise SystemExit(0 if ok else 1)' \
  > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
IFS=';' read -ra SETS <<< "${ENVS:-default}"
i=0
for s in "${SETS[@]}"; do
  i=$((i + 1)); log="$OUT/env_$i.log"
  if [ "$s" = default ]; then envs=(); else read -ra envs <<< "$s"; fi
  echo "## $s" > "$log"
  env "${envs[@]}" timeout 200 python3 benchmarks/bench_moe.py --methods milo-grouped${BF16:+,bf16-grouped} \
    --layers "${LAYERS:-qwen3,dsv2lite}" --ms "${MOE_MS:-1,8,32}" >> "$log" 2>&1
  echo "$s rc=$?"; grep -E "^==|M=" "$log"
done
