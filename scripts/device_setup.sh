# Sourced by the one-call device scripts (device_ncu.sh, device_moe_env.sh): the carried .whl wheels into /tmp/site
# (the GPU machine lacks torchao, gemlite, hqq, termcolor) and the milo extension JIT-built once, cached under
# TORCH_EXTENSIONS_DIR=$1, so the script's timed runs do not pay the build.  Exits the script if either fails.
export PYTHONUNBUFFERED=1 MILO_CUDA_ARCHS=${MILO_CUDA_ARCHS:-90} PYTHONPATH=$PWD:/tmp/site TORCH_EXTENSIONS_DIR=$1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
MAX_JOBS=12 python3 -c 'from milo_tensor.ops.cuda import load_extension, extension_status; ok=load_extension(); print(extension_status()); raise SystemExit(0 if ok else 1)' \
  > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
