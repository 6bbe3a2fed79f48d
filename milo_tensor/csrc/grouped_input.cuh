// The grouped (MoE) op's row tiles and input rows, read by the kernels themselves so a decode step
// needs no tile-list kernel, no gather and no activation kernel in front of its matmuls.
//
// * Tiles: offsets[e] = end row of expert e (clamped to [0, rows] and made monotone, as the reference
//   reads them); expert e owns rows start_e .. end_e - 1, cut into ceil((end_e - start_e) / bm) tiles of
//   at most bm rows, numbered expert by expert. scan_expert_tiles() walks the experts a block at a time
//   with two block scans (running max of the ends, sum of the tile counts); a kernel finds its own tile
//   from it (block_tile()), the tensor-core path's tile-list kernel lists them all.
// * Input rows: row m of the op's input is x[x_rows[m]] (gather; x_rows == nullptr: x[m]; an index
//   outside [0, x_rows_n) reads zeros), and with act = kActSiluMul the row is silu(gate) * up of the
//   stored row [gate (K) | up (K)], each product rounded to T as transformers' eager experts do.
#pragma once

#include <cub/block/block_scan.cuh>

#include "int3_gemm.cuh"

namespace milo {

constexpr int kActNone = 0;
constexpr int kActSiluMul = 1;

struct IntMax {
  __device__ __forceinline__ int operator()(int a, int b) const { return a > b ? a : b; }
};

// Calls visit(e, start, end, first_tile, n_tiles) on the thread owning expert e, for every expert;
// returns (end row of the last expert, total tiles), the same on every thread. Whole block, kThreads
// threads; every thread must call it.
template <int kThreads, typename F>
__device__ __forceinline__ int2 scan_expert_tiles(const void* offsets, bool offsets_i64, int E, int rows, int bm,
                                                  F&& visit) {
  using Scan = cub::BlockScan<int, kThreads, cub::BLOCK_SCAN_WARP_SCANS>;  // fewest barriers
  __shared__ typename Scan::TempStorage scan_tmp;
  int carry_end = 0, carry_tiles = 0;
  for (int base = 0; base < E; base += kThreads) {
    const int e = base + static_cast<int>(threadIdx.x);
    int end = 0;
    if (e < E) {
      const long long o = offsets_i64 ? reinterpret_cast<const long long*>(offsets)[e]
                                      : static_cast<long long>(reinterpret_cast<const int*>(offsets)[e]);
      end = static_cast<int>(o < 0 ? 0 : (o > rows ? rows : o));
    }
    int start, max_end, first, n_tiles;
    Scan(scan_tmp).ExclusiveScan(end, start, carry_end, IntMax(), max_end);
    __syncthreads();  // scan_tmp reused
    end = start > end ? start : end;
    const int count = e < E ? (end - start + bm - 1) / bm : 0;
    Scan(scan_tmp).ExclusiveSum(count, first, n_tiles);
    __syncthreads();
    if (e < E) visit(e, start, end, carry_tiles + first, count);
    carry_end = carry_end > max_end ? carry_end : max_end;
    carry_tiles += n_tiles;
  }
  return make_int2(carry_end, carry_tiles);
}

// (expert, first row, end row, 0) of row block `slot`: the listed tile (p.tiles), the tile found from
// p.offsets (tiles of p.tile_rows rows), or for the dense op rows bm * slot ..; expert -1: no work.
// *tail0 (where given) = first row past the last expert (the grouped op's rows from there on belong to
// no expert), p.M for the dense op and a listed tile.
template <int kThreads>
__device__ __forceinline__ int4 block_tile(const Int3GemmParams& p, int slot, int bm, int* tail0 = nullptr) {
  if (tail0 != nullptr) *tail0 = p.M;
  if (p.tiles != nullptr) return p.tiles[slot];
  if (p.offsets == nullptr) {
    const int m0 = slot * bm;
    return make_int4(m0 < p.M ? 0 : -1, m0, min(p.M, m0 + bm), 0);
  }
  __shared__ int4 s_tile;
  if (threadIdx.x == 0) s_tile = make_int4(-1, 0, 0, 0);  // ordered before the visit by the scan's barriers
  const int tr = p.tile_rows;
  const int2 tot = scan_expert_tiles<kThreads>(p.offsets, p.offsets_i64, p.n_experts, p.M, tr,
                                               [&](int e, int start, int end, int first, int count) {
                                                 if (slot >= first && slot < first + count) {
                                                   const int m0 = start + (slot - first) * tr;
                                                   s_tile = make_int4(e, m0, min(end, m0 + tr), 0);
                                                 }
                                               });
  __syncthreads();
  if (tail0 != nullptr) *tail0 = tot.x;
  return s_tile;
}

// where row m of the op's input is stored (its gate half with the activation), or nullptr for a zero row
template <typename T>
__device__ __forceinline__ const T* input_row(const Int3GemmParams& p, int m) {
  long long r = m;
  if (p.x_rows != nullptr) {
    r = p.x_rows[m];
    if (r < 0 || r >= p.x_rows_n) return nullptr;
  }
  return reinterpret_cast<const T*>(p.x) + r * p.ldx;
}

// silu(gate) * up of 8 packed values (silu_mul1: of one, before its last rounding), each step rounded to T.
// Kernels take the input's activation as a template flag (kAct): compiled into every instance, its code in
// the decode kernel's staging added spills to the 80-register instances' main loop even where it never ran
// (sm_90 SASS); the output's (kGateOut) runs once per block, after the main loop. The quotient is the
// approximate one (two instructions; IEEE division is seven and a rarely taken branch): its error, a few
// ulp of fp32, is far below the fp16 / bf16 rounding that follows; a gate below -87 (the divisor past 2^126)
// gives 0 where silu is under 2e-36 in magnitude.
template <typename T>
__device__ __forceinline__ float silu_mul1(T gate, T up) {
  const float gf = to_float(gate);
  return to_float(from_float<T>(__fdividef(gf, 1.f + __expf(-gf)))) * to_float(up);
}

template <typename T>
__device__ __forceinline__ uint4 silu_mul8(uint4 gate, uint4 up) {
  T* g = reinterpret_cast<T*>(&gate);
  const T* u = reinterpret_cast<const T*>(&up);
#pragma unroll
  for (int i = 0; i < 8; ++i) g[i] = from_float<T>(silu_mul1<T>(g[i], u[i]));
  return gate;
}

// input values k .. k + 7 of a row (row = input_row(); nullptr gives zeros), 16-byte aligned; with
// kAct the row is [gate | up], K apart
template <typename T, bool kAct>
__device__ __forceinline__ uint4 load_input8(const T* row, int K, int k) {
  if (row == nullptr) return make_uint4(0, 0, 0, 0);
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(row + k));
  if constexpr (!kAct) return v;
  else return silu_mul8<T>(v, __ldg(reinterpret_cast<const uint4*>(row + K + k)));
}

}  // namespace milo
