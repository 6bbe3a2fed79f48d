// Decode path of milo::int3_linear and milo::int3_grouped_linear: at most 4 rows of x per block.
//
// Why a separate kernel: at M <= 4 the GEMM kernel's 16-row x tile wastes 15/16 of its mma work and
// stalls on barriers between small k stages (docs/kernel.md). Here the *weight* is the mma's A operand
// (16 output columns n per warp) and x the B operand, each warp streams its codes straight from global
// memory into registers (16-byte loads, no shared-memory ring, no barrier in the main loop). A pair of
// codes (j, j + 8) of one 16-code plane word becomes the half2 / bf162 (1 + code_j / 8, 1 + code_j+8 / 8)
// exactly, with two shifts and two lop3: the code's bits go to the top of the mantissa of 1.0. (The
// GEMM kernel's magic 1024 + code would make each lane's 128-k partial sum ~300x larger than the
// result, too much cancellation for offset activations; 8 + code is ~2x.)
//
// Group purity. A lane of a quad owns 128 consecutive k (three 16-byte words per weight row); one
// m16n8k16 mma takes 4 k from each of the quad's 4 lanes, which may sit in different quantization
// groups. So the B operand's 8 columns are used as (row of x, source lane) pairs: column 4m + c holds
// row m of x on lane c's k and zeros elsewhere. Column 4m + c of the accumulator then sums only lane
// c's k, which lie in one group until the group ends, where the group's affine map is applied in fp32:
//
//     y[n, m] += 8 s * sum_k x_k (1 + q_k / 8)  -  s (8 + z) * sum_k x_k
//
// (sum_k x_k per group computed once when x is staged). Two rows of x per mma; four rows take a
// second mma on the same dequantized A. Cost per code ~2 shifts + 2 lop3 per two codes plus 1/8 of an
// mma, about half of a CUDA-core dot product's.
//
// Block: 8 warps; WK warps (a power of two chosen from K) split the k of one 16-column tile in 512-k
// slices, so a block covers 16 * 8 / WK columns. Each warp stages the x of its slice in its own
// shared memory, permuted so that a lane's B registers are one 16-byte load per 16 codes. Partials of
// a tile's warps are summed in a fixed order, the low-rank term t U^T (t = x V^T from the caller) and
// the bias are added per column, y is written once. Deterministic; no host sync, no allocation.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/util/Exception.h>

#include "int3_gemm.cuh"
#include "int3_launch.h"

namespace milo {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kSliceK = 512;            // k per warp step: 4 lanes x 128
constexpr int kXRowBytes = 1024 + 64;   // one staged x row of a slice (512 halves + 16 bytes per 128 k)
constexpr int kXSumFloats = kSliceK / 32;  // group sums per staged row (G >= 32)
// shared memory a warp stages x in: `rows` rows of a 512-k slice and their group sums
__host__ __device__ constexpr int warp_x_bytes(int rows) { return rows * (kXRowBytes + kXSumFloats * 4); }
constexpr int kRChunk = 64;             // ranks of t staged in shared memory at a time (epilogue)
static_assert(kRChunk * kInt3GemvMaxRows <= kThreads, "one t entry per thread when staging a chunk");

// 1 + code/8 in T: the code's low 2 bits at mantissa bits LO, LO + 1, its high bit at LO + 2
template <typename T>
struct CodeEnc;
template <>
struct CodeEnc<half> {
  static constexpr uint32_t kOne2 = 0x3C003C00u;
  static constexpr int LO = 7;
};
template <>
struct CodeEnc<__nv_bfloat16> {
  static constexpr uint32_t kOne2 = 0x3F803F80u;
  static constexpr int LO = 4;
};

// v shifted left by s (right by -s); s is a constant after unrolling
__device__ __forceinline__ uint32_t shl(uint32_t v, int s) { return s >= 0 ? v << s : v >> (-s); }

// (1 + code_j / 8, 1 + code_{j+8} / 8) of the 16-code plane word W, hb = the codes' high bits (code j at
// bit j, code j + 8 at bit 16 + j)
template <typename T>
__device__ __forceinline__ uint32_t code_pair(uint32_t W, uint32_t hb, int j) {
  constexpr int LO = CodeEnc<T>::LO;
  constexpr uint32_t kLoMask = 0x00030003u << LO, kHiMask = 0x00040004u << LO;
  return and_or(shl(hb, LO + 2 - j), kHiMask, and_or(shl(W, LO - 2 * j), kLoMask, CodeEnc<T>::kOne2));
}

// byte offset of 16-k block b (0..31) in a staged x row: 32 bytes each, 16 bytes of padding after
// every 8 blocks so the four active lanes (k 128 apart) hit different banks
__device__ __forceinline__ int xblk_off(int b) { return b * 32 + (b >> 3) * 16; }

__device__ __forceinline__ uint16_t ldg_u16(const void* p) {
  return __ldg(reinterpret_cast<const unsigned short*>(p));
}

template <typename T>
__device__ __forceinline__ float u16_to_float(uint16_t v) {
  T h;
  *reinterpret_cast<uint16_t*>(&h) = v;
  return to_float(h);
}

// 2 * NW halves from src (NW u32 words, half i in word i / 2) when ok, else zeros; one 4/8/16-byte
// load when vec (src aligned), else halfword loads; the second NW halves only when second.
template <int NW>
__device__ __forceinline__ void load_halves(uint32_t (&dst)[NW], const void* src, bool ok, bool vec, bool second) {
  const uint16_t* h = reinterpret_cast<const uint16_t*>(src);
  if (ok && vec && second) {
    if constexpr (NW == 1) {
      dst[0] = __ldg(reinterpret_cast<const unsigned int*>(src));
    } else if constexpr (NW == 2) {
      const uint2 v = __ldg(reinterpret_cast<const uint2*>(src));
      dst[0] = v.x;
      dst[1] = v.y;
    } else {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(src));
      dst[0] = v.x;
      dst[1] = v.y;
      dst[2] = v.z;
      dst[3] = v.w;
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < NW; ++i) {
    const bool in = ok && (2 * i < NW || second);
    const uint32_t lo = in ? ldg_u16(h + 2 * i) : 0u;
    const uint32_t hi = in && (2 * i + 1 < NW || second) ? ldg_u16(h + 2 * i + 1) : 0u;
    dst[i] = lo | (hi << 16);
  }
}

// Stage rows 0..MR-1 of x (global rows m0.., `rows` of them real) for k0 .. k0+511 into the warp's
// buffer: 16-k block b = lane holds (x_j, x_j+8) pairs, j = 0..7. Group sums go to xsum[m][k_local/G].
template <typename T, int G, int MR>
__device__ __forceinline__ void stage_x(const T* xg, int m0, int rows, int K, int k0, uint8_t* wx, float* xsum) {
  const int lane = threadIdx.x & 31;
  const int k = k0 + lane * 16;
#pragma unroll
  for (int m = 0; m < MR; ++m) {
    uint4 a = make_uint4(0, 0, 0, 0), b = make_uint4(0, 0, 0, 0);
    if (m < rows && k < K) {
      const uint4* src = reinterpret_cast<const uint4*>(xg + static_cast<long long>(m0 + m) * K + k);
      a = __ldg(src);
      b = __ldg(src + 1);
    }
    const uint32_t av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
    uint32_t o[8];
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      o[2 * i] = prmt(av[i], bv[i], 0x5410);
      o[2 * i + 1] = prmt(av[i], bv[i], 0x7632);
      const T* ha = reinterpret_cast<const T*>(&av[i]);
      const T* hb = reinterpret_cast<const T*>(&bv[i]);
      sum += (to_float(ha[0]) + to_float(ha[1])) + (to_float(hb[0]) + to_float(hb[1]));
    }
    uint4* dst = reinterpret_cast<uint4*>(wx + m * kXRowBytes + xblk_off(lane));
    dst[0] = make_uint4(o[0], o[1], o[2], o[3]);
    dst[1] = make_uint4(o[4], o[5], o[6], o[7]);
#pragma unroll
    for (int off = 1; off < G / 16; off <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (lane % (G / 16) == 0) xsum[m * kXSumFloats + lane / (G / 16)] = sum;
  }
}

// MR: rows of x this block multiplies (1, 2 or 4; rows past `rows` are zeros).
template <typename T, int G, int MR>
__device__ __forceinline__ void gemv_block(const Int3GemmParams& p, int e, int m0, int rows, int wk_log2,
                                           uint8_t* smem, float (*ys)[kInt3GemvMaxRows][16], float* red,
                                           float (*tsm)[kRChunk]) {
  constexpr int NB = MR > 2 ? 2 : 1;   // mma sets, two rows of x each
  constexpr int GPL = 128 / G;         // groups in a lane's 128 k
  const int K = p.K, N = p.N, R = p.R;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, c = lane & 3;
  const int WK = 1 << wk_log2;
  const int BR = 16 * (kWarps >> wk_log2);  // output columns of the block
  const int tile = warp >> wk_log2, wk = warp & (WK - 1);
  const int n_blk = blockIdx.x * BR;
  const int n_row[2] = {n_blk + tile * 16 + g, n_blk + tile * 16 + g + 8};
  const int words_per_row = K / 32 * 3, groups_per_row = K / G;
  const int32_t* qe = p.q + e * p.q_estride;
  const T* se = reinterpret_cast<const T*>(p.scales) + e * p.s_estride;
  const T* ze = reinterpret_cast<const T*>(p.zeros) + e * p.s_estride;
  const T* xg = reinterpret_cast<const T*>(p.x);
  uint8_t* wx = smem + warp * warp_x_bytes(MR);
  float* xsum = reinterpret_cast<float*>(wx + MR * kXRowBytes);

  // B operand: column (lane >> 2) of set b carries row 2b + (lane >> 4) of x on the k of lane (lane >> 2) & 3
  const int bcol = lane >> 2;
  bool b_on[NB];
#pragma unroll
  for (int b = 0; b < NB; ++b) b_on[b] = (bcol & 3) == c && 2 * b + (bcol >> 2) < rows;
  // accumulator columns of this lane: 2c, 2c+1 = row m = c >> 1 (+2 for set 1), source lanes cs0, cs0 + 1
  const int cs0 = 2 * (c & 1);
  const bool need_scales = (c >> 1) < rows || (NB > 1 && 2 + (c >> 1) < rows);
  // a lane's 2 * GPL scales of a row are one aligned vector when every row and expert start is
  const bool vec_scales = groups_per_row % (2 * GPL) == 0 && reinterpret_cast<uintptr_t>(se) % (4 * GPL) == 0 &&
                          reinterpret_cast<uintptr_t>(ze) % (4 * GPL) == 0;

  const int n_slices = (K + kSliceK - 1) / kSliceK;
  float yacc[NB][4];
#pragma unroll
  for (int b = 0; b < NB; ++b)
#pragma unroll
    for (int i = 0; i < 4; ++i) yacc[b][i] = 0.f;

  for (int s = wk; s < n_slices; s += WK) {
    const int k0 = s * kSliceK;
    const int kc = k0 + c * 128;  // this lane's 128 k
    // codes of the lane's two rows (issued first: their latency overlaps the staging of x)
    uint32_t w[2][12];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const bool ok = kc < K && n_row[r] < N;
      const uint4* src = reinterpret_cast<const uint4*>(qe + static_cast<long long>(n_row[r]) * words_per_row + kc / 32 * 3);
#pragma unroll
      for (int v = 0; v < 3; ++v) {
        const uint4 u = ok ? __ldg(src + v) : make_uint4(0, 0, 0, 0);
        w[r][4 * v + 0] = u.x;
        w[r][4 * v + 1] = u.y;
        w[r][4 * v + 2] = u.z;
        w[r][4 * v + 3] = u.w;
      }
    }
    // raw scales / zeros of the accumulator entries: row r, halves (cc * GPL + j) = group j of source
    // lane cs0 + cc (contiguous in memory: one vector load when aligned)
    uint32_t sv[2][GPL], zv[2][GPL];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int kk = k0 + cs0 * 128;
      const bool ok = need_scales && kk < K && n_row[r] < N;
      const long long gi = static_cast<long long>(n_row[r]) * groups_per_row + kk / G;
      load_halves<GPL>(sv[r], se + gi, ok, vec_scales, k0 + (cs0 + 1) * 128 < K);
      load_halves<GPL>(zv[r], ze + gi, ok, vec_scales, k0 + (cs0 + 1) * 128 < K);
    }
    __syncwarp();  // the previous slice's readers are done with the warp's x buffer
    stage_x<T, G, MR>(xg, m0, rows, K, k0, wx, xsum);
    __syncwarp();

    float d[NB][4];
#pragma unroll
    for (int h = 0; h < 4; ++h) {  // 32-k chunks of the lane's 128 k
      if ((32 * h) % G == 0) {
#pragma unroll
        for (int b = 0; b < NB; ++b)
#pragma unroll
          for (int i = 0; i < 4; ++i) d[b][i] = 0.f;
      }
#pragma unroll
      for (int wd = 0; wd < 2; ++wd) {  // plane word: codes 16wd .. 16wd + 15 of the chunk
        uint32_t pr[2][8];  // pr[r][j] = (1 + code j / 8, 1 + code j+8 / 8) of the word, row r
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const uint32_t W = w[r][3 * h + wd];
          const uint32_t hb = prmt(w[r][3 * h + 2], 0u, wd ? 0x4342u : 0x4140u);
#pragma unroll
          for (int j = 0; j < 8; ++j) pr[r][j] = code_pair<T>(W, hb, j);
        }
        const int xoff = xblk_off(8 * c + 2 * h + wd);
#pragma unroll
        for (int b = 0; b < NB; ++b) {
          const uint8_t* xr = wx + (2 * b + (bcol >> 2)) * kXRowBytes + xoff;
          const uint4 v0 = b_on[b] ? lds128(xr) : make_uint4(0, 0, 0, 0);
          const uint4 v1 = b_on[b] ? lds128(xr + 16) : make_uint4(0, 0, 0, 0);
          const uint32_t bv[8] = {v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w};
#pragma unroll
          for (int j0 = 0; j0 < 8; j0 += 2) {
            const uint32_t a[4] = {pr[0][j0], pr[1][j0], pr[0][j0 + 1], pr[1][j0 + 1]};
            mma16816<T>(d[b], a, bv[j0], bv[j0 + 1], d[b]);
          }
        }
      }
      if ((32 * (h + 1)) % G == 0) {  // group end: its affine map, in fp32
        const int gl = (32 * h) / G;
#pragma unroll
        for (int b = 0; b < NB; ++b) {
          const int m = 2 * b + (c >> 1);
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int r = i >> 1, cc = i & 1;
            const int hi = cc * GPL + gl;  // half index in sv / zv
            const float sc = u16_to_float<T>(static_cast<uint16_t>(sv[r][hi >> 1] >> (16 * (hi & 1))));
            const float zc = u16_to_float<T>(static_cast<uint16_t>(zv[r][hi >> 1] >> (16 * (hi & 1))));
            const float sx = xsum[(m < MR ? m : 0) * kXSumFloats + ((cs0 + cc) * 128) / G + gl];
            yacc[b][i] = fmaf(8.f * sc, d[b][i], fmaf(-sc * (8.f + zc), sx, yacc[b][i]));
          }
        }
      }
    }
  }

  // accumulator columns 2c, 2c+1 (row m, source lanes cs0, cs0+1) + the partner lane's (c ^ 1: the other
  // two source lanes of the same m)
#pragma unroll
  for (int b = 0; b < NB; ++b) {
    float ylo = yacc[b][0] + yacc[b][1], yhi = yacc[b][2] + yacc[b][3];
    ylo += __shfl_xor_sync(0xffffffffu, ylo, 1);
    yhi += __shfl_xor_sync(0xffffffffu, yhi, 1);
    const int m = 2 * b + (c >> 1);
    if ((c & 1) == 0 && m < MR) {
      ys[warp][m][g] = ylo;
      ys[warp][m][g + 8] = yhi;
    }
  }

  // low-rank term: thread (column nn, rank slice rs) sums t[m, r] * ut[r, n] over r = rs (mod slices)
  const int slices = kThreads / BR;
  const int nn = tid % BR, rs = tid / BR;
  const int n = n_blk + nn;
  float lr[MR];
#pragma unroll
  for (int m = 0; m < MR; ++m) lr[m] = 0.f;
  // t may still be in flight when this kernel was launched programmatically after the kernel
  // computing it: wait for it here, after the main loop
  if (R > 0) grid_dep_wait();
  if (R > 0) {
    // ranks in chunks of kRChunk: the block sums t's split partials of a chunk once into shared
    // memory (one load round trip, all threads), then each thread walks its ranks of the chunk. (Each
    // thread summing the partials itself cost a chain of dependent global loads per rank: 11 us at
    // 14336x4096, M=4, R=32.) kRChunk is a multiple of every `slices`, so a thread visits the same
    // ranks in the same order as without chunks.
    const T* ute = reinterpret_cast<const T*>(p.ut) + e * p.ut_estride;
    for (int r0 = 0; r0 < R; r0 += kRChunk) {
      const int rc = min(kRChunk, R - r0);
      for (int i = tid; i < MR * kRChunk; i += kThreads) {
        const int m = i / kRChunk, rr = i % kRChunk;
        float tv = 0.f;
        if (m < rows && rr < rc) {
          const float* tp = p.t + static_cast<long long>(m0 + m) * R + r0 + rr;
          for (int sp = 0; sp < p.t_splits; ++sp) tv += __ldcg(tp + sp * p.t_split_stride);
        }
        tsm[m][rr] = tv;
      }
      __syncthreads();
      if (n < N) {
        for (int r = rs; r < rc; r += slices) {
          const float u = to_float(ute[static_cast<long long>(r0 + r) * N + n]);
#pragma unroll
          for (int m = 0; m < MR; ++m) lr[m] = fmaf(tsm[m][r], u, lr[m]);
        }
      }
      __syncthreads();
    }
  }
#pragma unroll
  for (int m = 0; m < MR; ++m) red[(rs * MR + m) * BR + nn] = lr[m];
  __syncthreads();
  for (int idx = tid; idx < MR * BR; idx += kThreads) {
    const int m = idx / BR, col = idx % BR, nc = n_blk + col;
    if (m < rows && nc < N) {
      const int t0 = (col / 16) << wk_log2;
      float v = 0.f;
      for (int w2 = 0; w2 < WK; ++w2) v += ys[t0 + w2][m][col % 16];
      for (int sl = 0; sl < slices; ++sl) v += red[(sl * MR + m) * BR + col];
      if (p.bias != nullptr) v += to_float(reinterpret_cast<const T*>(p.bias)[nc]);
      reinterpret_cast<T*>(p.y)[static_cast<long long>(m0 + m) * N + nc] = from_float<T>(v);
    }
  }
}

// grid (ceil(N / BR), row blocks): the dense op's blockIdx.y covers rows MR*y .. MR*y + MR - 1; the
// grouped op's indexes the tile list (expert, row start, row end), at most MR rows a tile.
template <typename T, int G, int MR, int MINB>
__global__ void __launch_bounds__(kThreads, MINB) int3_gemv_kernel(const Int3GemmParams p, int wk_log2) {
  extern __shared__ __align__(16) uint8_t gemv_smem[];
  __shared__ float ys[kWarps][kInt3GemvMaxRows][16];
  __shared__ float red[kThreads * kInt3GemvMaxRows];
  __shared__ float tsm[kInt3GemvMaxRows][kRChunk];
  int e = 0, m0, m_end;
  if (p.tiles != nullptr) {
    const int4 tl = p.tiles[blockIdx.y];
    if (tl.x < 0) return;
    e = tl.x;
    m0 = tl.y;
    m_end = min(tl.z, m0 + MR);
  } else {
    m0 = blockIdx.y * MR;
    m_end = min(p.M, m0 + MR);
  }
  const int rows = m_end - m0;
  if (rows <= 0) return;
  gemv_block<T, G, MR>(p, e, m0, rows, wk_log2, gemv_smem, ys, red, tsm);
}

template <typename T, int G, int MR>
void launch_mr(const Int3GemmParams& p, int row_blocks, int wk_log2, const GemvLaunch& l, cudaStream_t stream) {
  // 80 registers: 3 blocks per SM (a 64-register cap for 4 spilled and was 5-30% slower, H100)
  auto kern = int3_gemv_kernel<T, G, MR, G == 32 ? 2 : 3>;
  const int br = 16 * (kWarps >> wk_log2);
  const dim3 grid((p.N + br - 1) / br, row_blocks);
  launch_programmatic_if(kern, grid, dim3(kThreads), kWarps * warp_x_bytes(MR), l.programmatic, stream, p, wk_log2);
}

template <typename T, int G>
void launch(const Int3GemmParams& p, int row_blocks, int max_rows, const GemvLaunch& l, cudaStream_t stream) {
  // warps per 16-column tile: enough 512-k slices to keep each warp busy, at most 8 (H100: fewer warps
  // per tile were slower on the benchmark shapes except 14336x4096 M=1, 20.5 vs 21.5 us)
  const int n_slices = (p.K + kSliceK - 1) / kSliceK;
  int wk_log2 = 0;
  while (wk_log2 < 3 && (1 << wk_log2) < (l.wk_force > 0 ? l.wk_force : n_slices)) ++wk_log2;
  if (max_rows <= 1) return launch_mr<T, G, 1>(p, row_blocks, wk_log2, l, stream);
  if (max_rows <= 2) return launch_mr<T, G, 2>(p, row_blocks, wk_log2, l, stream);
  return launch_mr<T, G, 4>(p, row_blocks, wk_log2, l, stream);
}

}  // namespace

void launch_int3_gemv(int dtype, int group, const Int3GemmParams& p, int row_blocks, int max_rows,
                      const GemvLaunch& l, cudaStream_t stream) {
  TORCH_CHECK(p.K % 128 == 0, "int3 gemv: K must be a multiple of 128");
  if (dtype == 0) {
    if (group == 32) return launch<half, 32>(p, row_blocks, max_rows, l, stream);
    if (group == 64) return launch<half, 64>(p, row_blocks, max_rows, l, stream);
    return launch<half, 128>(p, row_blocks, max_rows, l, stream);
  }
  if (group == 32) return launch<__nv_bfloat16, 32>(p, row_blocks, max_rows, l, stream);
  if (group == 64) return launch<__nv_bfloat16, 64>(p, row_blocks, max_rows, l, stream);
  return launch<__nv_bfloat16, 128>(p, row_blocks, max_rows, l, stream);
}

}  // namespace milo
