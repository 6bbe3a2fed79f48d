#!/usr/bin/env bash
# Hardware counters of the decode kernel (ncu, one device call): the dense op at the Mixtral shapes (M=1) and the
# grouped op's gate_up / down launches at a Qwen3-shaped MoE layer (M=1 and 8).  Carry .whl; results under $OUT.
#   on the GPU:  bash scripts/device_ncu.sh
# Environment: DENSE (bench_kernel.py --profile cases NxKxMxR), MOE_MS (empty: none), SECTIONS (ncu --section list),
# KREGEX (kernel name regex, default int3_gemv; int3_gemm for the tensor-core kernel), LAUNCHES (kernels profiled per
# dense case, default 1).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/milo_ncu}; mkdir -p "$OUT"
source scripts/device_setup.sh ${EXT_DIR:-/tmp/ext_ncu}
S=""; for s in ${SECTIONS:-SpeedOfLight MemoryWorkloadAnalysis Occupancy LaunchStats SchedulerStats WarpStateStats InstructionStats SourceCounters}; do S="$S --section $s"; done
NCU="ncu --clock-control none --kernel-name regex:${KREGEX:-int3_gemv} $S --metrics regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,smsp__inst_executed.sum,dram__bytes_read.sum"
for c in ${DENSE:-14336x4096x1x0 14336x4096x1x32 4096x14336x1x0}; do
  timeout 120 $NCU --launch-count ${LAUNCHES:-1} python3 benchmarks/bench_kernel.py --profile "$c" > "$OUT/ncu_dense_$c.txt" 2>&1
  echo "dense $c rc=$?"
  if grep -q "==ERROR==" "$OUT/ncu_dense_$c.txt"; then  # the metric list refused: sections only
    grep "==ERROR==" "$OUT/ncu_dense_$c.txt" | head -3; NCU="ncu --clock-control none --kernel-name regex:${KREGEX:-int3_gemv} $S"
    timeout 120 $NCU --launch-count ${LAUNCHES:-1} python3 benchmarks/bench_kernel.py --profile "$c" > "$OUT/ncu_dense_$c.txt" 2>&1
  fi
done
for m in ${MOE_MS-1 8}; do  # the first call's gate_up and down launches
  timeout 150 $NCU --launch-count 2 python3 benchmarks/bench_moe.py --layers qwen3 --ms "$m" --methods milo-grouped \
    --copies 1 --routes 1 > "$OUT/ncu_moe_M$m.txt" 2>&1
  echo "moe M=$m rc=$?"
done
for f in "$OUT"/ncu_*.txt; do
  echo "== $f"; grep -E "Duration|DRAM Throughput|Memory Throughput|Registers Per|Achieved Occupancy|Issue Slots Busy|Executed Ipc A|Warp Cycles Per Issued|Block Limit|Grid Size|Dynamic Shared|Executed Instructions  |stalled_|inst_executed.sum|dram__bytes" "$f" | head -60
done
