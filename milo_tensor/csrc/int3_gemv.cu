// Decode path of milo::int3_linear and milo::int3_grouped_linear: at most 4 rows of x per block,
// the dequantization and the dot products on CUDA cores.
//
// Why not the tensor-core kernel: at M <= 4 a 16-row mma tile wastes 15/16 of its work while the
// unpacking is paid in full, and the kernel stalls on barriers between small k stages (docs/kernel.md).
// Here each lane streams 128 codes (3 x 16-byte loads) per output row with no barrier in the inner
// loop, and a code costs 2 shifts + 2 logic ops to become the fp32 number f = 1 + code/8 (its 3 bits
// put into the mantissa of 1.0) and one FMA per row of x:
//
//     sum_k x_k (q_k - z) s = s (8 sum_k x_k f_k - (8 + z) sum_k x_k)        per group
//
// with sum_k x_k per group computed once per block. Block: 8 warps x 2 output columns each (16
// consecutive n); x is staged in shared memory as fp32, 4096 k at a time, padded every 128 floats so
// the lanes' float4 reads are bank-conflict free. The low-rank term is added per block: the 16
// columns' U^T entries are 32 contiguous bytes per rank, so it reads U coalesced; t = x V^T comes
// from the caller (cuBLAS for the dense op, the grouped op's split-K pre-step). Summation order is
// fixed: the result is deterministic. Graph-capturable: no host sync, no allocation.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/util/Exception.h>

#include "int3_gemm.cuh"
#include "int3_launch.h"

namespace milo {
namespace {

constexpr int kWarps = 8;
constexpr int kRowsPerWarp = 2;                    // output columns (n) per warp
constexpr int kCols = kWarps * kRowsPerWarp;       // 16 output columns per block
constexpr int kChunk = 4096;                       // k staged per pass: 32 lanes x 128 codes
constexpr int kPad = 4;                            // floats of padding per 128 k
constexpr int kRankSlices = 256 / kCols;           // threads per column in the low-rank epilogue

__device__ __forceinline__ int xs_idx(int k) { return k + (k >> 7) * kPad; }

// f = 1 + code/8 exactly: the code's low 2 bits (at lo_pos of lo_word) go to mantissa bits 20..21,
// its high bit (at hi_pos of hi_word) to bit 22, under the exponent of 1.0. Positions are
// compile-time constants after unrolling, so each shift is one instruction.
__device__ __forceinline__ float code_f(uint32_t lo_word, int lo_pos, uint32_t hi_word, int hi_pos) {
  const uint32_t a = lo_pos <= 20 ? (lo_word << (20 - lo_pos)) : (lo_word >> (lo_pos - 20));
  const uint32_t b = hi_pos <= 22 ? (hi_word << (22 - hi_pos)) : (hi_word >> (hi_pos - 22));
  return __uint_as_float((a & 0x00300000u) | (b & 0x00400000u) | 0x3F800000u);
}

template <typename T>
__device__ __forceinline__ void to_float8(const uint4 raw, float (&out)[8]) {
  const T* h = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = to_float(h[i]);
}

// One lane's share of a work item: 128 codes (3 x 16-byte words) of each of the warp's two columns,
// with their scales and zeros.
template <int G>
struct LaneSlice {
  uint32_t w[kRowsPerWarp][12];
  float sc[kRowsPerWarp][128 / G], zc[kRowsPerWarp][128 / G];
};

template <typename T, int G>
__device__ __forceinline__ void load_slice(LaneSlice<G>& d, const int32_t* qe, const T* se, const T* ze, int n0,
                                           int k_lane, int N, int K) {
  const int words_per_row = K / 32 * 3, groups_per_row = K / G;
  const bool active = k_lane < K;
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int n = n0 + r;
    const bool ok = active && n < N;
    const uint4* src = reinterpret_cast<const uint4*>(qe + static_cast<long long>(n) * words_per_row + k_lane / 32 * 3);
#pragma unroll
    for (int v = 0; v < 3; ++v) {
      const uint4 u = ok ? __ldg(src + v) : make_uint4(0, 0, 0, 0);
      d.w[r][4 * v + 0] = u.x;
      d.w[r][4 * v + 1] = u.y;
      d.w[r][4 * v + 2] = u.z;
      d.w[r][4 * v + 3] = u.w;
    }
#pragma unroll
    for (int i = 0; i < 128 / G; ++i) {
      const long long gi = static_cast<long long>(n) * groups_per_row + k_lane / G + i;
      d.sc[r][i] = ok ? to_float(se[gi]) : 0.f;
      d.zc[r][i] = ok ? to_float(ze[gi]) : 0.f;
    }
  }
}

// x rows m0 .. m0 + rows - 1, k in [k0, k0 + len), into xs (fp32, padded) at local k 0 .., and each
// group's sum into xsum; rows past `rows` become zeros. Each group's sum is a shuffle over its G/8
// consecutive lanes (the loop runs whole warps: len/8 is a multiple of G/8 and of 16, so a lane group
// never straddles rows).
template <typename T, int G, int MR>
__device__ __forceinline__ void stage_x(const T* xg, int m0, int rows, int K, int k0, int len, float* xs,
                                        int xs_stride, float* xsum, int xsum_stride) {
  const int tid = threadIdx.x, lane = tid & 31;
  const int items = MR * (len / 8);
  for (int base = 0; base < items; base += blockDim.x) {
    const int i = base + tid;
    const bool valid = i < items;
    const int m = valid ? i / (len / 8) : 0;
    const int k = valid ? (i - m * (len / 8)) * 8 : 0;
    float v[8];
    if (valid && m < rows) {
      to_float8<T>(*reinterpret_cast<const uint4*>(xg + static_cast<long long>(m0 + m) * K + k0 + k), v);
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) v[j] = 0.f;
    }
    if (valid) {
      float4* dst = reinterpret_cast<float4*>(xs + m * xs_stride + xs_idx(k));
      dst[0] = make_float4(v[0], v[1], v[2], v[3]);
      dst[1] = make_float4(v[4], v[5], v[6], v[7]);
    }
    float sum = ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
#pragma unroll
    for (int off = 1; off < G / 8; off <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (valid && lane % (G / 8) == 0) xsum[m * xsum_stride + k / G] = sum;
  }
}

// yacc[m][r] += x[m, k] * deq[n_r, k] over the lane's 128 codes (kl: their first local k in xs).
template <int G, int MR>
__device__ __forceinline__ void dot_slice(const LaneSlice<G>& d, const float* xs, int xs_stride, const float* xsum,
                                          int xsum_stride, int kl, float (&yacc)[MR][kRowsPerWarp]) {
  float acc[MR][kRowsPerWarp];  // x . f over the current group
#pragma unroll
  for (int c = 0; c < 4; ++c) {  // 32-code chunks of the lane's 128
    if ((c * 32) % G == 0) {
#pragma unroll
      for (int m = 0; m < MR; ++m)
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) acc[m][r] = 0.f;
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // codes 16h .. 16h + 15 of the chunk
#pragma unroll
      for (int j4 = 0; j4 < 16; j4 += 4) {
        float4 xv[MR];
#pragma unroll
        for (int m = 0; m < MR; ++m)
          xv[m] = *reinterpret_cast<const float4*>(xs + m * xs_stride + xs_idx(kl + 32 * c + 16 * h + j4));
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) {
          const int j = j4 + jj;
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r) {
            const float f = code_f(d.w[r][3 * c + h], 2 * j, d.w[r][3 * c + 2], 16 * h + j);
#pragma unroll
            for (int m = 0; m < MR; ++m) {
              const float xval = jj == 0 ? xv[m].x : (jj == 1 ? xv[m].y : (jj == 2 ? xv[m].z : xv[m].w));
              acc[m][r] = fmaf(xval, f, acc[m][r]);
            }
          }
        }
      }
    }
    if (((c + 1) * 32) % G == 0) {  // group end: apply scale and zero
      const int gl = (c * 32) / G;
      const int gx = (kl + c * 32) / G;
#pragma unroll
      for (int m = 0; m < MR; ++m) {
        const float sx = xsum[m * xsum_stride + gx];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r)
          yacc[m][r] = fmaf(d.sc[r][gl], fmaf(8.f, acc[m][r], -(8.f + d.zc[r][gl]) * sx), yacc[m][r]);
      }
    }
  }
}

// MR: rows of x this block multiplies (1, 2 or 4; rows past `rows` are zero). One block = 16
// output columns; per 4096-wide pass of k, each warp loads its columns' codes first, then the block
// stages x, then the warp computes. (Measured on an H100: a persistent variant that keeps x resident
// and prefetches the next column group's codes was 13% slower at M = 1: it needs 128 registers, i.e.
// 2 blocks per SM instead of 3.)
template <typename T, int G, int MR>
__device__ __forceinline__ void gemv_block(const Int3GemmParams& p, int e, int m0, int rows, float* smem) {
  const int K = p.K, N = p.N, R = p.R;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int n_base = blockIdx.x * kCols;
  const int32_t* qe = p.q + e * p.q_estride;
  const T* se = reinterpret_cast<const T*>(p.scales) + e * p.s_estride;
  const T* ze = reinterpret_cast<const T*>(p.zeros) + e * p.s_estride;
  const T* xg = reinterpret_cast<const T*>(p.x);
  constexpr int kXsStride = kChunk + kChunk / 128 * kPad;
  float* xs = smem;                      // [MR][kXsStride]
  float* xsum = smem + MR * kXsStride;   // [MR][kChunk / G]
  __shared__ float ys[MR][kCols];
  __shared__ float red[kRankSlices][MR][kCols];

  float yacc[MR][kRowsPerWarp];
#pragma unroll
  for (int m = 0; m < MR; ++m)
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) yacc[m][r] = 0.f;
  for (int kc0 = 0; kc0 < K; kc0 += kChunk) {
    LaneSlice<G> d;  // loaded before x is staged, so its latency overlaps the staging
    load_slice<T, G>(d, qe, se, ze, n_base + warp * kRowsPerWarp, kc0 + lane * 128, N, K);
    __syncthreads();  // the previous pass's readers are done with xs / xsum
    stage_x<T, G, MR>(xg, m0, rows, K, kc0, min(kChunk, K - kc0), xs, kXsStride, xsum, kChunk / G);
    __syncthreads();
    if (kc0 + lane * 128 < K) dot_slice<G, MR>(d, xs, kXsStride, xsum, kChunk / G, lane * 128, yacc);
  }

  // reduce across the warp's lanes
#pragma unroll
  for (int m = 0; m < MR; ++m)
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      float v = yacc[m][r];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      if (lane == 0) ys[m][warp * kRowsPerWarp + r] = v;
    }
  // low-rank term: thread (column nn, rank slice rs) sums t[m, r] * ut[r, n] over r = rs (mod 16);
  // the 16 columns' U^T entries of one rank are 32 contiguous bytes
  const int nn = tid % kCols, rs = tid / kCols;
  const int n = n_base + nn;
  float lr[MR];
#pragma unroll
  for (int m = 0; m < MR; ++m) lr[m] = 0.f;
  if (R > 0 && n < N) {
    const T* ute = reinterpret_cast<const T*>(p.ut) + e * p.ut_estride;
    for (int r = rs; r < R; r += kRankSlices) {
      const float u = to_float(ute[static_cast<long long>(r) * N + n]);
#pragma unroll
      for (int m = 0; m < MR; ++m) {
        if (m < rows) {
          float tv = 0.f;
          for (int sp = 0; sp < p.t_splits; ++sp) tv += p.t[sp * p.t_split_stride + static_cast<long long>(m0 + m) * R + r];
          lr[m] = fmaf(tv, u, lr[m]);
        }
      }
    }
  }
#pragma unroll
  for (int m = 0; m < MR; ++m) red[rs][m][nn] = lr[m];
  __syncthreads();
  if (tid < MR * kCols) {
    const int m = tid / kCols, c = tid % kCols, col = n_base + c;
    if (m < rows && col < N) {
      float v = ys[m][c];
#pragma unroll
      for (int sp = 0; sp < kRankSlices; ++sp) v += red[sp][m][c];
      if (p.bias != nullptr) v += to_float(reinterpret_cast<const T*>(p.bias)[col]);
      reinterpret_cast<T*>(p.y)[static_cast<long long>(m0 + m) * N + col] = from_float<T>(v);
    }
  }
}

// grid (ceil(N / 16), row blocks): the dense op's blockIdx.y covers rows 4y .. 4y + 3; the grouped
// op's indexes the tile list (expert, row start, row end).
template <typename T, int G>
__global__ void __launch_bounds__(256) int3_gemv_kernel(const Int3GemmParams p) {
  extern __shared__ float4 gemv_smem4[];
  float* smem = reinterpret_cast<float*>(gemv_smem4);
  int e = 0, m0, m_end;
  if (p.tiles != nullptr) {
    const int4 tl = p.tiles[blockIdx.y];
    if (tl.x < 0) return;
    e = tl.x;
    m0 = tl.y;
    m_end = tl.z;
  } else {
    m0 = blockIdx.y * kInt3GemvMaxRows;
    m_end = min(p.M, m0 + kInt3GemvMaxRows);
  }
  const int rows = m_end - m0;
  if (rows <= 0) return;
  if (rows == 1) {
    gemv_block<T, G, 1>(p, e, m0, rows, smem);
  } else if (rows == 2) {
    gemv_block<T, G, 2>(p, e, m0, rows, smem);
  } else {
    gemv_block<T, G, 4>(p, e, m0, rows, smem);
  }
}

template <typename T, int G>
void launch(const Int3GemmParams& p, int row_blocks, int max_rows, cudaStream_t stream) {
  const int mr = max_rows <= 1 ? 1 : (max_rows <= 2 ? 2 : 4);
  auto bytes = [](int rows) { return rows * (kChunk + kChunk / 128 * kPad + kChunk / G) * static_cast<int>(sizeof(float)); };
  auto kern = int3_gemv_kernel<T, G>;
  static bool attr_done[64] = {false};
  const int dev = c10::cuda::current_device();
  if (dev < 64 && !attr_done[dev]) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes(kInt3GemvMaxRows)));
    attr_done[dev] = true;
  }
  const dim3 grid((p.N + kCols - 1) / kCols, row_blocks);
  kern<<<grid, 256, bytes(mr), stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_int3_gemv(int dtype, int group, const Int3GemmParams& p, int row_blocks, int max_rows,
                      cudaStream_t stream) {
  TORCH_CHECK(p.K % 128 == 0, "int3 gemv: K must be a multiple of 128");
  if (dtype == 0) {
    if (group == 32) return launch<half, 32>(p, row_blocks, max_rows, stream);
    if (group == 64) return launch<half, 64>(p, row_blocks, max_rows, stream);
    return launch<half, 128>(p, row_blocks, max_rows, stream);
  }
  if (group == 32) return launch<__nv_bfloat16, 32>(p, row_blocks, max_rows, stream);
  if (group == 64) return launch<__nv_bfloat16, 64>(p, row_blocks, max_rows, stream);
  return launch<__nv_bfloat16, 128>(p, row_blocks, max_rows, stream);
}

}  // namespace milo
