// Host-side declarations shared by the op (int3_linear.cu) and the kernel instantiation files.
#pragma once

#include <utility>

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include "int3_gemm.cuh"

namespace milo {

// Launch `kern` on `stream`; programmatic: with programmatic stream serialization (PDL, sm_90), so it
// may start while the kernel before it in the stream runs (it must griddepcontrol.wait before reading
// that kernel's output); cluster_x > 1: as thread-block clusters of cluster_x blocks along x (sm_90).
template <typename... KArgs, typename... Args>
void launch_ex(void (*kern)(KArgs...), dim3 grid, dim3 block, size_t smem, bool programmatic, int cluster_x,
               cudaStream_t stream, Args... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[2];
  int n = 0;
  if (programmatic) {
    attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n++].val.programmaticStreamSerializationAllowed = 1;
  }
  if (cluster_x > 1) {
    attr[n].id = cudaLaunchAttributeClusterDimension;
    attr[n].val.clusterDim.x = cluster_x;
    attr[n].val.clusterDim.y = 1;
    attr[n++].val.clusterDim.z = 1;
  }
  cfg.attrs = attr;
  cfg.numAttrs = n;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kern, args...));
}

// launch_ex without clusters. Shared by the decode and the tensor-core kernels' launchers.
template <typename... KArgs, typename... Args>
void launch_programmatic_if(void (*kern)(KArgs...), dim3 grid, dim3 block, size_t smem, bool programmatic,
                            cudaStream_t stream, Args... args) {
  launch_ex(kern, grid, block, smem, programmatic, 1, stream, args...);
}

// Whether the launches of a decode step's chain (router_topk, moe_route, the t kernels, moe_combine) are
// programmatic (sm_90; MILO_INT3_PDL=0 or MILO_INT3_PDL_CHAIN=0 turn it off): each such kernel waits for the
// kernel before it at its start, before reading or writing anything, and only then lets its own dependents
// launch, so a dependent that reads earlier kernels' outputs before its own wait (the decode kernel reads x and
// the routing) finds them done.
// What it saves is each launch's latency: the kernel is resident and waiting when the one before it ends.
bool chain_programmatic();

// Tile shapes chosen by the host: 128-wide k stages, BM = 16 * mt rows.
constexpr int kInt3BK = 128;

// Tile configurations (cfg ids): 1 = M <= 16 (MT 1, NT 2, WN 4 -> BN 64, 256 threads, 4 stages,
// register cap for 3 blocks/SM); 2 = MT 2 (NT 8, WN 2, BN 128); 3 = MT 2 (NT 2, WN 4, BN 64, register
// cap for 2 blocks/SM: the dense op at M 17-64); 4 = MT 4 (NT 4, WN 4, BN 128).
// (A 16x128 tile, MT 1 NT 4 at 2 blocks/SM, was measured slower than cfg 1 at M 8-16: docs/kernel.md.)
int int3_cfg_bn(int cfg, int group);
int int3_cfg_bm(int cfg);

// dtype: 0 = fp16, 1 = bf16. mt = cfg id (above); group in {32, 64, 128}.
// Launches int3_gemm_kernel on `stream` with grid (n_tiles, p.splits, m_blocks); programmatic: with
// programmatic stream serialization after the kernel computing p.t (it waits for t before its epilogue).
void launch_int3_gemm(int dtype, int mt, int group, const Int3GemmParams& p, int n_tiles, int m_blocks,
                      bool programmatic, cudaStream_t stream);

// Tile 7 (int3_gemm_wa.cu): y = x @ deq(Q)^T + t @ ut (+ bias) with the weight dequantized into the mma's
// A registers, 128 output columns and 16 / 32 / 64 rows of x per block: the dense op's row blocks, or the
// grouped op's listed tiles (p.tiles, per-expert strides; x rows p.ldx apart). t is the sum of p.t_splits
// partials. programmatic: launched with programmatic stream serialization after the kernel computing p.t
// (it waits for t before its low-rank epilogue). With splits > 1 the kernel needs p.ws (fp32 [splits, M,
// N]) and p.counters (int [row_blocks x column tiles], zeroed before the launch).
// Tile 8 (sm_90a, the host launches it on compute capability 9.0 only): the same blocks with the mmas as
// warpgroup MMAs, 16, 32, 64 or 128 rows of x a block. Tile 9: tile 8 with a producer warpgroup (the
// copies and x's rewrite) and mbarriers instead of block barriers.
int int3_gemm_wa_bt(int rows, bool wg);  // rows of x a block (tile 7: 16, 32 or 64; tile 8: 16, 32, 64 or 128)
constexpr int kInt3WaBN = 128;     // output columns a block
// (splits, stages per split) for `tiles` blocks of K (forced > 0: that many splits)
std::pair<int, int> int3_gemm_wa_splits(int tiles, int K, int sms, int forced);
// grid (row_blocks, column tiles, p.splits); p.tiles != nullptr: row block i is the listed tile i
void launch_int3_gemm_wa(int tile, int dtype, int group, int bt, int row_blocks, const Int3GemmParams& p,
                         bool programmatic, cudaStream_t stream);

// Decode path (int3_gemv.cu): tensor-core kernel with the weight as the mma A operand, for tiles of
// at most kInt3GemvMaxRows rows of x; grid (ceil(N / BR), row_blocks), BR = 16..128 columns per block
// chosen from K. Dense op: p.tiles == nullptr, row block y takes rows MR*y .. MR*y + MR - 1 where MR
// = 1, 2, 4 or 8 is max_rows rounded up; grouped op: p.tiles lists (expert, row start, row end) tiles of
// at most max_rows rows, one per row block. Needs K % 128 == 0; any N.
constexpr int kInt3GemvMaxRows = 8;
struct GemvLaunch {
  int wk_force;       // warps per 16-column tile (1, 2, 4, 8), 0 = chosen from N, K, SMs (tuning and tests)
  bool programmatic;  // launched with programmatic stream serialization: the kernel before it in the
                      // stream computes p.t and lets this one start; it waits only before using t
  int sms;            // multiprocessors of the device (the choice of warps per tile)
  int smem_per_sm;    // shared memory per multiprocessor (whether x of the whole K fits once per block)
  int xblock_force;   // x of the whole K staged once per block: 1 where it fits, 0 never, -1 the default rule
  bool lr_mma;        // the low-rank term by mma where it applies (U^T in shared memory, 64 ranks at a time)
};
void launch_int3_gemv(int dtype, int group, const Int3GemmParams& p, int row_blocks, int max_rows,
                      const GemvLaunch& l, cudaStream_t stream);
// the most ranks one decode block multiplies: R, or the largest segment's where the kernel reads segments
// (Int3GemmParams::n_blocks); past 64 the 1-row instance takes them by mma a chunk at a time, 2-8 rows a scalar loop
int int3_max_segment_rank(const Int3GemmParams& p);
// the blocks that launch would start (the grouped op: whether its blocks look their tiles up themselves)
long long int3_gemv_blocks(const Int3GemmParams& p, int row_blocks, int max_rows, int group, const GemvLaunch& l);
// whether that launch can take p.out_act (write silu(gate) * up of y's [gate | up] halves itself): tiles of
// 2 or 4 rows, not register-prefetched, blocks of 32+ columns dividing N
bool int3_gemv_gates_output(const Int3GemmParams& p, int row_blocks, int max_rows, int group, const GemvLaunch& l);

// one entry per (dtype, group) translation unit
void launch_int3_gemm_f16_g32(int mt, const Int3GemmParams& p, int n_tiles, int m_blocks, bool programmatic,
                            cudaStream_t s);
void launch_int3_gemm_f16_g64(int mt, const Int3GemmParams& p, int n_tiles, int m_blocks, bool programmatic,
                            cudaStream_t s);
void launch_int3_gemm_f16_g128(int mt, const Int3GemmParams& p, int n_tiles, int m_blocks, bool programmatic,
                            cudaStream_t s);
void launch_int3_gemm_bf16_g32(int mt, const Int3GemmParams& p, int n_tiles, int m_blocks, bool programmatic,
                            cudaStream_t s);
void launch_int3_gemm_bf16_g64(int mt, const Int3GemmParams& p, int n_tiles, int m_blocks, bool programmatic,
                            cudaStream_t s);
void launch_int3_gemm_bf16_g128(int mt, const Int3GemmParams& p, int n_tiles, int m_blocks, bool programmatic,
                            cudaStream_t s);

}  // namespace milo
