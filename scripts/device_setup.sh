# Sourced by the one-call device scripts (device_moe_env.sh, device_kernel_env.sh, device_exp.sh): the carried .whl
# wheels into /tmp/site (the GPU machine lacks torchao, gemlite, hqq, termcolor) and the milo extension JIT-built once,
# cached under TORCH_EXTENSIONS_DIR=$1, so the script's timed runs do not pay the build.  Exits the script if either fails.
export PYTHONUNBUFFERED=1 MILO_CUDA_ARCHS=${MILO_CUDA_ARCHS:-90} PYTHONPATH=$PWD:/tmp/site TORCH_EXTENSIONS_DIR=$1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
MAX_JOBS=12 python3 -c 'from milo_tensor.ops.cuda import load_extension, extension_status; ok=load_extension(); print(extension_status()); raise SystemExit(0 if ok else 1)' \
  > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
# for_each_env NAME CMD...: CMD once per ';'-separated setting of ENVS ('default' = none, "A=1 B=2" = both), its output in
# $OUT/NAME_<i>.log headed by the setting; prints each setting's exit status and the log's timing lines (== and M=)
for_each_env() {
  local name=$1 s i=0 log; shift
  local -a sets envs
  IFS=';' read -ra sets <<< "${ENVS:-default}"
  for s in "${sets[@]}"; do
    i=$((i + 1)); log="$OUT/${name}_$i.log"
    if [ "$s" = default ]; then envs=(); else read -ra envs <<< "$s"; fi
    echo "## $s" > "$log"
    env "${envs[@]}" "$@" >> "$log" 2>&1
    echo "$s rc=$?"; grep -E "^==|M=" "$log"
  done
}
