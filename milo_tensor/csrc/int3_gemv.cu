// Decode path of milo::int3_linear and milo::int3_grouped_linear: at most 8 rows of x per block.
//
// Why a separate kernel: at M <= 8 the GEMM kernel's 16-row x tile wastes half or more of its mma work and
// stalls on barriers between small k stages (docs/kernel.md). Here the *weight* is the mma's A operand
// (16 output columns n per warp) and x the B operand, each warp streams its codes straight from global
// memory into registers (16-byte loads, no shared-memory ring, no barrier in the main loop). A pair of
// neighbouring codes (one 3-bit field of a format-2 word, int3_gemm.cuh) becomes one half2 / bf162
// register with one AND or LOP3 (and at most one shift), in one of the encodings of CodeEnc below.
//
// Group purity. A lane of a quad owns 128 consecutive k (three 16-byte words per weight row); one
// m16n8k16 mma takes 4 k from each of the quad's 4 lanes, which may sit in different quantization
// groups. So the B operand's 8 columns are used as (row of x, source lane) pairs: column 4m + c holds
// row m of x on lane c's k and zeros elsewhere. Column 4m + c of the accumulator then sums only lane
// c's k, which lie in one group until the group ends, where the group's affine map is applied in fp32:
//
//     y[n, m] += 8 s * sum_k x_k (1 + q_k / 8)  -  s (8 + z) * sum_k x_k
//
// (sum_k x_k per group computed once when x is staged). Two rows of x per mma; every two rows more take
// one more mma on the same dequantized A (8 rows: 4 mmas). Cost per code about half an AND / LOP3
// (classed) or one shift and one LOP3 per two codes (fixed), plus 1/8 of an mma per two rows.
//
// Block: 8 warps; WK warps (a power of two chosen from K) split the k of one 16-column tile in 512-k
// slices, so a block covers 16 * 8 / WK columns. Each warp stages the x of its slice in its own
// shared memory, each chunk's words in the order its mmas take them (a lane's B registers are one
// 16-byte load per two mmas, no register moves). Partials of a tile's warps are summed in a fixed
// order, the low-rank term t U^T (t = x V^T from the caller) and the bias are added per column, y is
// written once. Deterministic; no host sync, no allocation. The grouped op's input rows may be gathered
// and gated on the fly (grouped_input.cuh).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/util/Exception.h>

#include "grouped_input.cuh"
#include "int3_gemm.cuh"
#include "int3_launch.h"

namespace milo {
namespace {

constexpr int kThreads = 256;            // 8 warps per block
constexpr int kWarps = kThreads / 32;
constexpr int kSliceK = 512;            // k per warp step: 4 lanes x 128
constexpr int kXRowBytes = 1024 + 64;   // one staged x row of a slice (512 halves + 16 bytes per 128 k)
constexpr int kXSumFloats = kSliceK / 32;  // group sums per staged row (G >= 32)
// shared memory a warp stages x in: `rows` rows of a 512-k slice, their group sums and (bf16) their
// magic sums (CodeEnc)
__host__ __device__ constexpr int warp_x_bytes(int rows) { return rows * (kXRowBytes + 2 * kXSumFloats * 4); }
constexpr int kRChunk = 64;             // ranks of t staged in shared memory at a time (epilogue)
// kernel flags (host: launch_mr())
constexpr int kXBlock = 1;  // x of the whole K staged once per block up front (else per warp, per slice)
constexpr int kUAsync = 2;  // the first kRChunk ranks of U^T's block columns copied to shared memory up front
constexpr int kLrMma = 4;   // the low-rank term by mma where it applies (GemvLaunch::lr_mma)
constexpr int kGateOut = 8; // the output gated, silu(gate) * up (p.out_act): block columns in gate / up halves

// How the code pair p (codes 2p, 2p + 1 of a 32-code chunk: neighbouring k, so its B register is one
// word of x) becomes one mma A register (layout: int3_gemm.cuh, format 2): the pair's 3-bit field is
// placed at bit pos(p) of each half and OR-ed into a magic, giving kMagic + code * 2^pos(p) * unit.
// Two encodings:
//
// * Classed (the decode path at 1-2 rows of x, g >= 64): pos(p) is where the field already sits in
//   its word, or in the word shifted once for several pairs, so most pairs cost one AND (fp16) or one
//   LOP3 (bf16) and no shift. The power of two then depends on the pair: pairs are multiplied in mmas
//   of one class (one pos) each, into an accumulator per class, and the classes are combined in fp32 at
//   the group end.
//     fp16: fp16 subnormals (magic 0): the field is code << pos times 2^-24 exactly, no offset, so
//           nothing cancels; pos 0, 3, 6 (classes 0, 1, 2) for fields 0-2, word >> 9 for fields 3-4.
//     bf16: a bf16 subnormal times x would underflow fp32, so the magic 1.0 stays: 1 + (code << pos) /
//           128 (field at most bit 6 of the 7-bit mantissa): pos 0, 3 (classes 0, 1), from the word,
//           word >> 6 and word >> 12.
// * Fixed (4 or 8 rows of x, or g = 32, where the classed accumulators do not fit in registers): every code
//   at the top of the mantissa of 1.0, 1 + code / 8, one class, one shift and one LOP3 a pair. (Magic
//   1024 + code would make a lane's 128-k partial sum ~300x larger than the result, too much
//   cancellation for offset activations.)
//
// The group end subtracts the magic's share, sum_k x_k * kInvUnit / 8^class(k) (staged with x). mma i
// of a chunk multiplies pairs pa(i) and pb(i), both of one class (mmas_one_class()); mmas 0-3 take 7 pairs of the
// chunk's lower half (0-7) and one of the upper, mmas 4-7 the rest, so x can be staged in mma order with
// one word traded between the two lanes that stage a chunk (x_slot, stage_x).
template <typename T, bool kClassed>
struct CodeEnc;
template <>
struct CodeEnc<half, true> {
  static constexpr int kClasses = 3;
  static constexpr uint32_t kMagic2 = 0u;
  static constexpr float kInvUnit = 16777216.f;  // 2^24: class c counts code * 8^c * 2^-24
  __host__ __device__ static constexpr int pos(int p) {
    constexpr int t[16] = {0, 3, 6, 0, 3, 0, 3, 6, 0, 3, 6, 0, 3, 0, 3, 6};
    return t[p];
  }
  __host__ __device__ static constexpr int pa(int i) {
    constexpr int t[8] = {0, 1, 2, 5, 6, 8, 9, 10};
    return t[i];
  }
  __host__ __device__ static constexpr int pb(int i) {
    constexpr int t[8] = {3, 4, 7, 13, 14, 11, 12, 15};
    return t[i];
  }
};
template <>
struct CodeEnc<__nv_bfloat16, true> {
  static constexpr int kClasses = 2;
  static constexpr uint32_t kMagic2 = 0x3F803F80u;  // bf162(1, 1)
  static constexpr float kInvUnit = 128.f;          // class c counts code * 8^c / 128
  __host__ __device__ static constexpr int pos(int p) {
    constexpr int t[16] = {0, 3, 0, 3, 0, 0, 3, 0, 0, 3, 0, 3, 0, 3, 0, 0};
    return t[p];
  }
  __host__ __device__ static constexpr int pa(int i) {
    constexpr int t[8] = {0, 4, 1, 7, 6, 8, 12, 9};
    return t[i];
  }
  __host__ __device__ static constexpr int pb(int i) {
    constexpr int t[8] = {2, 5, 3, 15, 13, 10, 14, 11};
    return t[i];
  }
};
// the tensor-core kernel's encoding (Int3Traits, int3_gemm.cuh): 1 + code / 8, the code at bit kPos up
template <typename T>
struct CodeEnc<T, false> {
  static constexpr int kClasses = 1;
  static constexpr float kInvUnit = kInt3Unit;
  static constexpr uint32_t kMagic2 = Int3Traits<T>::kOne2;
  __host__ __device__ static constexpr int pos(int) { return Int3Traits<T>::kPos; }
  __host__ __device__ static constexpr int pa(int i) { return 2 * i; }
  __host__ __device__ static constexpr int pb(int i) { return 2 * i + 1; }
};
// the class of pair p (its accumulator): its bit position / 3 with several classes, else 0
template <typename E>
__host__ __device__ constexpr int enc_cls(int p) { return E::kClasses > 1 ? E::pos(p) / 3 : 0; }
// both pairs of mma i in one class, that mma's
template <typename E>
__host__ __device__ constexpr bool mmas_one_class() {
  for (int i = 0; i < 8; ++i)
    if (enc_cls<E>(E::pa(i)) != enc_cls<E>(E::pb(i))) return false;
  return true;
}
static_assert(mmas_one_class<CodeEnc<half, true>>() && mmas_one_class<CodeEnc<__nv_bfloat16, true>>(),
              "classed mma order: an mma's two pairs in one class");

// where the classed encoding is used: its registers fit
__host__ __device__ constexpr bool classed(int rows_per_block, int group) { return rows_per_block <= 2 && group >= 64; }
// Whether a slice's codes and scales are loaded one slice ahead of its math (a second register set): always
// with the classed encoding; with the fixed one at 4 rows (g >= 64) where the launch asks (kPF), the grouped
// op's warps that stream 8 slices or more (gemv_prefetch()). H100, 2026-12-06, bench_moe.py: Mixtral-shaped
// M=8 (4-row tiles, one warp per tile, 8 and 28 slices) 433 / 438 -> 388 / 384 us; prefetching every 4-row
// launch (2 blocks per SM instead of 3) cost Qwen3-shaped M=32 (2-4 slices a warp) 223 -> 249 us and the
// dense op 4096x14336 M=4 R=32 31.9 -> 37.6 us. 8 rows and g = 32 at 4 rows spill with it.
__host__ __device__ constexpr bool prefetched(int rows_per_block, int group, bool pf) {
  return classed(rows_per_block, group) || (pf && rows_per_block <= 4 && group >= 64);
}

// resident blocks per SM the decode kernel's register cap allows: the prefetch needs about 128 registers
// (2 blocks), and so do 8 rows (twice the accumulators of 4); the fixed one at 4 rows without it 80 (3
// blocks; a 64-register cap for 4 spilled and was 5-30% slower, H100)
__host__ __device__ constexpr int min_blocks(int rows_per_block, int group, bool pf) {
  return prefetched(rows_per_block, group, pf) || rows_per_block > 4 || group == 32 ? 2 : 3;
}

// whether an instance writes the gated output (kGateOut) at all: the grouped op's 2- and 4-row instances that are
// not register-prefetched (in that one the gated epilogue took the spills from 0 to 20-32 bytes, sm_90a), and its
// 1-row instance (grouped: one-token decode, MILO_INT3_GROUPED_GEMV_BM=1), not the dense op's
__host__ __device__ constexpr bool gate_out_compiled(int rows_per_block, bool pf, bool grouped) {
  return (!pf && (rows_per_block == 2 || rows_per_block == 4)) || (grouped && rows_per_block == 1);
}

// Where pair p's x word sits in a staged 32-k chunk (in words): mma i's two pairs pa(i), pb(i) side by side at
// 2i, 2i + 1, so its B registers are one aligned register pair as loaded (no moves before the mma). The fixed
// encoding's mmas take neighbouring pairs: natural order.
template <typename E>
__host__ __device__ constexpr int x_slot(int p) {
  for (int i = 0; i < 8; ++i) {
    if (E::pa(i) == p) return 2 * i;
    if (E::pb(i) == p) return 2 * i + 1;
  }
  return -1;
}
// the pair at slot j (x_slot's inverse)
template <typename E>
__host__ __device__ constexpr int x_pair(int j) {
  return (j & 1) ? E::pb(j >> 1) : E::pa(j >> 1);
}
template <typename E>
__host__ __device__ constexpr bool x_natural() {
  for (int p = 0; p < 16; ++p)
    if (x_slot<E>(p) != p) return false;
  return true;
}
// the pair of half h (0: pairs 0-7, 1: 8-15) whose slot lies in the other half; exactly one (checked below)
template <typename E>
__host__ __device__ constexpr int x_crossing(int h) {
  int found = -1, count = 0;
  for (int p = 8 * h; p < 8 * h + 8; ++p)
    if ((x_slot<E>(p) >= 8) != (h == 1)) found = p, ++count;
  return count == 1 ? found : -1;
}
static_assert(x_crossing<CodeEnc<half, true>>(0) >= 0 && x_crossing<CodeEnc<half, true>>(1) >= 0 &&
                  x_crossing<CodeEnc<__nv_bfloat16, true>>(0) >= 0 && x_crossing<CodeEnc<__nv_bfloat16, true>>(1) >= 0,
              "classed mma order: one pair of each half staged by the other lane");

// pairs p0 .. p0 + S - 1 of a chunk (words w0, w1, w2) as the operands of their classes
template <typename E, int S>
__device__ __forceinline__ void span_pairs(uint32_t w0, uint32_t w1, uint32_t w2, int p0, uint32_t (&r)[S]) {
  const uint32_t w[3] = {w0, w1, w2};
#pragma unroll
  for (int j = 0; j < S; ++j) {
    const int p = p0 + j;
    r[j] = p < 15 ? field_pair(w[pair_word(p)], pair_field(p), E::pos(p), E::kMagic2)
                  : spare_pair(w0, w1, w2, E::pos(15), E::kMagic2);
  }
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
// load when vec (src aligned), else halfword loads; the second NW halves only when second. kPred: the
// vector path does not branch on ok (a predicated load): lanes that load nothing (the dense op's lanes
// past its rows at M = 1, half of every warp) would otherwise run the halfword path after the others,
// four times a slice (ncu, H100 2026-12-07: the slice loads were 14% of the M=1 decode kernel's
// instructions). Not in the register-prefetched 4-row instance (ok uniform but for one-row tiles), whose
// spills it moved (sm_90a, with the mma low-rank term: 0 -> 20 / 48 bytes).
template <int NW, bool kPred>
__device__ __forceinline__ void load_halves(uint32_t (&dst)[NW], const void* src, bool ok, bool vec, bool second) {
  const uint16_t* h = reinterpret_cast<const uint16_t*>(src);
  if (vec && second && (kPred || ok)) {
    if constexpr (NW == 1) {
      dst[0] = ok ? __ldg(reinterpret_cast<const unsigned int*>(src)) : 0u;
    } else if constexpr (NW == 2) {
      const uint2 v = ok ? __ldg(reinterpret_cast<const uint2*>(src)) : make_uint2(0u, 0u);
      dst[0] = v.x;
      dst[1] = v.y;
    } else {
      const uint4 v = ok ? __ldg(reinterpret_cast<const uint4*>(src)) : make_uint4(0u, 0u, 0u, 0u);
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

// A staged slice (warp_x_bytes(MR)): MR rows of x, then their group sums xsum[MR][kXSumFloats], then
// their magic sums xmag[MR][kXSumFloats]
template <int MR>
__device__ __forceinline__ float* staged_xsum(uint8_t* wx) { return reinterpret_cast<float*>(wx + MR * kXRowBytes); }

// Stage input row m (xm = input_row(); nullptr: zeros) for k0 .. k0+511 into the buffer wx of MR rows:
// 16-k block b = lane holds slots 8 (b & 1) .. +7 of chunk b / 2: the chunk's 16 words in x_slot order
// (natural for the fixed encoding). Group sums go to xsum[m][k_local/G], and with a magic the sums of
// x_k * kInvUnit / 8^class(k) (its share, CodeEnc) to xmag[m][k_local/G]. One warp.
template <typename E, typename T, int G, int MR, bool kAct>
__device__ __forceinline__ void stage_x_row(const T* xm, int m, int K, int k0, uint8_t* wx) {
  float* xsum = staged_xsum<MR>(wx);
  float* xmag = xsum + MR * kXSumFloats;
  constexpr bool kMagic = E::kMagic2 != 0u && E::kClasses > 1;  // one class: the group end uses sum x
  const int lane = threadIdx.x & 31;
  const int k = k0 + lane * 16;
  const bool upper = (lane & 1) != 0;  // pairs 8..15 of the chunk
  uint4 a = make_uint4(0, 0, 0, 0), b = make_uint4(0, 0, 0, 0);
  if (k < K && xm != nullptr) {
    const uint4* src = reinterpret_cast<const uint4*>(xm + k);
    a = __ldg(src);
    b = __ldg(src + 1);
    if constexpr (kAct) {  // the up half, K further on
      const uint4 ua = __ldg(src + K / 8), ub = __ldg(src + K / 8 + 1);
      a = silu_mul8<T>(a, ua);
      b = silu_mul8<T>(b, ub);
    }
  }
  const uint32_t v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
  float sum = 0.f, mag = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) {  // word i: pair i (+ 8) of the chunk
    const T* h = reinterpret_cast<const T*>(&v[i]);
    const float pair_sum = to_float(h[0]) + to_float(h[1]);
    sum += pair_sum;
    if constexpr (kMagic) {
      constexpr float wc[3] = {E::kInvUnit, E::kInvUnit / 8, E::kInvUnit / 64};
      mag = fmaf(upper ? wc[enc_cls<E>(8 + i)] : wc[enc_cls<E>(i)], pair_sum, mag);
    }
  }
  if constexpr (x_natural<E>()) {
    uint4* dst = reinterpret_cast<uint4*>(wx + m * kXRowBytes + xblk_off(lane));
    dst[0] = a;
    dst[1] = b;
  } else {  // the chunk's words in mma order (x_slot): this lane's half of the slots, one word from the partner
    constexpr int c0 = x_crossing<E>(0), c1 = x_crossing<E>(1);
    const uint32_t recv = __shfl_xor_sync(0xffffffffu, upper ? v[c1 - 8] : v[c0], 1);
    uint32_t o[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int lo = x_pair<E>(j), hi = x_pair<E>(8 + j);
      o[j] = upper ? (hi >= 8 ? v[hi - 8] : recv) : (lo < 8 ? v[lo] : recv);
    }
    uint4* dst = reinterpret_cast<uint4*>(wx + m * kXRowBytes + xblk_off(lane));
    dst[0] = make_uint4(o[0], o[1], o[2], o[3]);
    dst[1] = make_uint4(o[4], o[5], o[6], o[7]);
  }
#pragma unroll
  for (int off = 1; off < G / 16; off <<= 1) {
    sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if constexpr (kMagic) mag += __shfl_xor_sync(0xffffffffu, mag, off);
  }
  if (lane % (G / 16) == 0) {
    xsum[m * kXSumFloats + lane / (G / 16)] = sum;
    if constexpr (kMagic) xmag[m * kXSumFloats + lane / (G / 16)] = mag;
  }
}

// all MR rows xr[0..MR-1] of a slice (one warp)
template <typename E, typename T, int G, int MR, bool kAct>
__device__ __forceinline__ void stage_x(const T* const* xr, int K, int k0, uint8_t* wx) {
#pragma unroll
  for (int m = 0; m < MR; ++m) stage_x_row<E, T, G, MR, kAct>(xr[m], m, K, k0, wx);
}

// t's split partials of ranks r0 .. r0 + rc - 1 summed into tsm[m][0 .. kRChunk - 1] (zeros past rc and past
// the block's rows), in a fixed order. Whole block; the caller syncs before reading tsm.
template <int MR>
__device__ __forceinline__ void stage_t_chunk(const Int3GemmParams& p, int m0, int rows, int r0, int rc,
                                              float (*tsm)[kRChunk]) {
  for (int i = threadIdx.x; i < MR * kRChunk; i += kThreads) {
    const int m = i / kRChunk, rr = i % kRChunk;
    float tv = 0.f;
    if (m < rows && rr < rc) {
      const float* tp = p.t + static_cast<long long>(m0 + m) * p.R + r0 + rr;
      for (int sp = 0; sp < p.t_splits; ++sp) tv += __ldcg(tp + sp * p.t_split_stride);
    }
    tsm[m][rr] = tv;
  }
}

// The weight row (column of y) of block column j of a block of BR columns: n_blk + j, or with kGateOut
// (silu(gate) * up written) the block takes BR / 2 gate columns and the matching up columns N / 2 further
// (BR / 2 a multiple of 16 and N / 2 of BR / 2: the host checks), so its columns j >= BR / 2 are up columns.
__device__ __forceinline__ int gemv_col(int flags, int N, int BR, int j) {
  if (!(flags & kGateOut)) return blockIdx.x * BR + j;
  const int half = BR / 2;
  return blockIdx.x * half + j + (j >= half ? N / 2 - half : 0);
}

// acc += t[:, chunk] U^T[chunk, the tile's 16 columns] over the rc ranks of a chunk in tsm and usm (ub: this lane's
// ldmatrix address in usm): A = U^T's rows by transposed ldmatrix, B = t's rows as the n8 columns in hi + lo halves
// (fp32 accuracy); ranks zero past rc up to a multiple of 16 in both
template <typename T, int MR>
__device__ __forceinline__ void lowrank_mma_chunk(float (&acc)[4], uint32_t ub, const float (*tsm)[kRChunk], int BR,
                                                  int rc) {
  const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
  for (int k0 = 0; k0 < rc; k0 += 16) {
    uint32_t a[4];  // matrices (columns 0-7 | 8-15) x (ranks k0 .. k0 + 7 | + 8 .. + 15)
    ldmatrix_x4_trans(a, ub + 2 * BR * (k0 + (lane & 7) + 8 * ((lane >> 4) & 1)));
    float2 t0 = make_float2(0.f, 0.f), t1 = t0;  // B: row g of x at ranks k0 + 2c, + 1 and k0 + 8 + 2c, + 1
    if (g < MR) {
      t0 = *reinterpret_cast<const float2*>(&tsm[g][k0 + 2 * c]);
      t1 = *reinterpret_cast<const float2*>(&tsm[g][k0 + 8 + 2 * c]);
    }
    uint32_t b0hi, b0lo, b1hi, b1lo;
    split_hi_lo<T>(t0.x, t0.y, b0hi, b0lo);
    split_hi_lo<T>(t1.x, t1.y, b1hi, b1lo);
    mma16816<T>(acc, a, b0hi, b1hi, acc);
    mma16816<T>(acc, a, b0lo, b1lo, acc);
  }
}

// MR: rows of x this block multiplies (1, 2, 4 or 8; rows past `rows` are zeros). kAct: the input rows are
// silu(gate) * up of [gate | up] rows (p.act, the grouped op's down projection). kRChunks: the 1-row instance for
// segments of more than kRChunk ranks (launch()), its mma low-rank term a chunk at a time. kGrouped: the grouped
// op's 1-row instance (its own, so that the dense op's 1-row instances keep their schedule): the gated epilogue
// compiled in.
template <typename T, int G, int MR, bool kAct, bool kPF, bool kRChunks = false, bool kGrouped = false>
__device__ __forceinline__ void gemv_block(const Int3GemmParams& p, int e, int m0, int rows, int wk_log2, int flags,
                                           uint8_t* smem, float (*ys)[MR][16], float* red,
                                           float (*tsm)[kRChunk], uint4* zrow16, const void** xrow) {
  // the classed encoding and a slice of prefetch where their registers fit (CodeEnc)
  constexpr bool kClassed = classed(MR, G);
  using E = CodeEnc<T, kClassed>;
  constexpr int NB = (MR + 1) / 2;     // mma sets, two rows of x each
  constexpr int GPL = 128 / G;         // groups in a lane's 128 k
  const int K = p.K, N = p.N, R = p.R;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, c = lane & 3;
  const int WK = 1 << wk_log2;
  const int BR = 16 * (kWarps >> wk_log2);  // weight rows (columns of y) of the block
  const int tile = warp >> wk_log2, wk = warp & (WK - 1);
  // the weight row (column of y) of block column j (gemv_col()), recomputed where used: held through the
  // main loop, the values behind it spilled
  const int col_flags = gate_out_compiled(MR, kPF, kGrouped) ? flags : 0;
  const auto col_of = [&](int j) { return gemv_col(col_flags, N, BR, j); };
  const int n_tile = col_of(tile * 16);
  const int n_row[2] = {n_tile + g, n_tile + g + 8};
  const int words_per_row = K / 32 * 3, groups_per_row = K / G;
  const int32_t* qe = p.q + e * p.q_estride;
  const T* se = reinterpret_cast<const T*>(p.scales) + e * p.s_estride;
  const T* ze = reinterpret_cast<const T*>(p.zeros) + e * p.s_estride;
  // where the block's input rows are (gather, activation: grouped_input.cuh), in shared memory (set after
  // the first code loads are issued): held in registers through the main loop they spilled at 4 rows
  // (80-register cap)
  const T* const* xr = reinterpret_cast<const T* const*>(xrow);
  const bool xblock = (flags & kXBlock) != 0;
  const int n_slices = (K + kSliceK - 1) / kSliceK;
  // shared memory: the staged x (per slice when xblock, else per warp), then U^T's first rank chunk
  constexpr int kWxBytes = warp_x_bytes(MR);
  auto slice_x = [&](int s) { return smem + (xblock ? s : warp) * kWxBytes; };
  T* usm = reinterpret_cast<T*>(smem + (xblock ? n_slices : kWarps) * kWxBytes);
  const T* ute = reinterpret_cast<const T*>(p.ut) + e * p.ut_estride;
  const uint8_t* zrow = reinterpret_cast<const uint8_t*>(zrow16);

  // B operand: column (lane >> 2) of set b carries row 2b + (lane >> 4) of x on the k of lane (lane >> 2) & 3
  const int bcol = lane >> 2;
  bool b_on[NB];
#pragma unroll
  for (int b = 0; b < NB; ++b) b_on[b] = (bcol & 3) == c && 2 * b + (bcol >> 2) < rows;
  // mma sets past the tile's rows (a grouped tile or the dense op's last row block short of MR rows) are
  // skipped: their accumulators stay zero and are never written
  const auto set_on = [rows](int b) { return b == 0 || 2 * b < rows; };
  // accumulator columns of this lane: 2c, 2c+1 = row m = c >> 1 (+2b for set b), source lanes cs0, cs0 + 1
  const int cs0 = 2 * (c & 1);
  const bool need_scales = (c >> 1) < rows;  // set 0's row is this lane's first
  // a lane's 2 * GPL scales of a row are one aligned vector when every row and expert start is
  const bool vec_scales = groups_per_row % (2 * GPL) == 0 && reinterpret_cast<uintptr_t>(se) % (4 * GPL) == 0 &&
                          reinterpret_cast<uintptr_t>(ze) % (4 * GPL) == 0;

  float yacc[NB][4];
#pragma unroll
  for (int b = 0; b < NB; ++b)
#pragma unroll
    for (int i = 0; i < 4; ++i) yacc[b][i] = 0.f;

  // A slice's codes and scales are loaded one slice ahead of its math (two register sets in turn), so a
  // warp with several slices keeps its next loads in flight while it computes.
  using Codes = uint32_t[2][12];
  using Raw = uint32_t[2][GPL];
  // the lane's offsets at slice 0 (row n_row[0]; row n_row[1] is 8 rows further), advanced by a slice's
  // words / groups per slice: the per-slice address work is a few integer adds
  const int q_off = n_row[0] * words_per_row + c * (128 / 32 * 3);
  const int s_off = n_row[0] * groups_per_row + (cs0 * 128) / G;
  const bool row_ok[2] = {n_row[0] < N, n_row[1] < N};
  auto load_slice = [&](int s, Codes& w, Raw& sv, Raw& zv) {
    const int k0 = s * kSliceK;
    const int kc = k0 + c * 128;  // this lane's 128 k
    // codes of the lane's two rows (issued first: their latency overlaps the staging of x)
    const uint4* src0 = reinterpret_cast<const uint4*>(qe + q_off + s * (kSliceK / 32 * 3));
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const bool ok = kc < K && row_ok[r];
      const uint4* src = src0 + r * 2 * words_per_row;  // 8 rows = 8 * words_per_row / 4 vectors
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
    const int kk = k0 + cs0 * 128;
    const bool second = kk + 128 < K;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const bool ok = need_scales && kk < K && row_ok[r];
      const int gi = s_off + r * 8 * groups_per_row + s * (kSliceK / G);
      load_halves<GPL, !kPF>(sv[r], se + gi, ok, vec_scales, second);
      load_halves<GPL, !kPF>(zv[r], ze + gi, ok, vec_scales, second);
    }
  };
  auto compute_slice = [&](int s, const Codes& w, const Raw& sv, const Raw& zv) {
    uint8_t* wx = slice_x(s);
    const float* xsum = staged_xsum<MR>(wx);
    const float* xmag = xsum + MR * kXSumFloats;
    if (!xblock) {
      __syncwarp();  // the previous slice's readers are done with the warp's x buffer
      stage_x<E, T, G, MR, kAct>(xr, K, s * kSliceK, wx);
      __syncwarp();
    }
    // where set b's B registers come from: the staged x row, or the block's zero row for the lanes whose
    // column is another lane's (no zeroing of registers before every load)
    const uint8_t* xb[NB];
#pragma unroll
    for (int b = 0; b < NB; ++b) xb[b] = b_on[b] ? wx + (2 * b + (bcol >> 2)) * kXRowBytes : zrow;

    // d[b][cl]: the current group's sum over k of x * (kMagic + code * 8^cl * unit), class cl (CodeEnc)
    constexpr int NC = E::kClasses;
    float d[NB][NC][4];
#pragma unroll
    for (int h = 0; h < 4; ++h) {  // 32-k chunks of the lane's 128 k
      if ((32 * h) % G == 0) {
#pragma unroll
        for (int b = 0; b < NB; ++b)
#pragma unroll
          for (int cl = 0; cl < NC; ++cl)
#pragma unroll
            for (int i = 0; i < 4; ++i) d[b][cl][i] = 0.f;
      }
      // pairs decoded and multiplied in spans: the whole chunk for the classed encoding (a class's pairs
      // are spread over it), halves for the fixed one (its mmas take neighbouring pairs; fewer live
      // registers where its 80-register cap would spill)
      constexpr int kSpan = NC > 1 ? 16 : 8;
#pragma unroll
      for (int p0 = 0; p0 < 16; p0 += kSpan) {
        uint32_t pr[2][kSpan];  // pr[r][p - p0] = code pair p of the chunk, row r, as its class's operand
#pragma unroll
        for (int r = 0; r < 2; ++r) span_pairs<E, kSpan>(w[r][3 * h], w[r][3 * h + 1], w[r][3 * h + 2], p0, pr[r]);
        const int xoff = xblk_off(8 * c + 2 * h) + 4 * p0;  // the chunk's two 16-k blocks are contiguous
#pragma unroll
        for (int b = 0; b < NB; ++b) {
          if (!set_on(b)) continue;  // the tile's rows end before set b (uniform over the block)
          uint32_t bv[kSpan];  // bv[x_slot(p) - p0] = the x word of pair p
#pragma unroll
          for (int v = 0; v < kSpan / 4; ++v) {
            const uint4 u = lds128(xb[b] + xoff + 16 * v);
            bv[4 * v] = u.x;
            bv[4 * v + 1] = u.y;
            bv[4 * v + 2] = u.z;
            bv[4 * v + 3] = u.w;
          }
#pragma unroll
          for (int i = p0 / 2; i < (p0 + kSpan) / 2; ++i) {
            const int ja = E::pa(i) - p0, jb = E::pb(i) - p0, cl = enc_cls<E>(E::pa(i));  // A: decoded pairs
            const int ba = x_slot<E>(E::pa(i)) - p0, bb = x_slot<E>(E::pb(i)) - p0;  // B: their x words
            const uint32_t a[4] = {pr[0][ja], pr[1][ja], pr[0][jb], pr[1][jb]};
            mma16816<T>(d[b][cl], a, bv[ba], bv[bb], d[b][cl]);
          }
        }
      }
      if ((32 * (h + 1)) % G == 0) {  // group end: the classes and the affine map, in fp32
        const int gl = (32 * h) / G;
#pragma unroll
        for (int b = 0; b < NB; ++b) {
          if (!set_on(b)) continue;
          const int m = 2 * b + (c >> 1);
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int r = i >> 1, cc = i & 1;
            const int hi = cc * GPL + gl;  // half index in sv / zv
            const float sc = u16_to_float<T>(static_cast<uint16_t>(sv[r][hi >> 1] >> (16 * (hi & 1))));
            const float zc = u16_to_float<T>(static_cast<uint16_t>(zv[r][hi >> 1] >> (16 * (hi & 1))));
            const int xi = (m < MR ? m : 0) * kXSumFloats + ((cs0 + cc) * 128) / G + gl;
            // sum_k x_k code_k: class cl counts code * 8^cl / kInvUnit (+ the magic's share, staged)
            float xq = d[b][NC - 1][i];
#pragma unroll
            for (int cl = NC - 2; cl >= 0; --cl) xq = fmaf(xq, 0.125f, d[b][cl][i]);
            // the magic's share: staged for several classes, (magic unit) * sum x for one
            float off;
            if constexpr (NC == 1) off = (zc + E::kInvUnit) * xsum[xi];
            else if constexpr (E::kMagic2 != 0u) off = fmaf(zc, xsum[xi], xmag[xi]);
            else off = zc * xsum[xi];
            yacc[b][i] = fmaf(sc * E::kInvUnit, xq, fmaf(-sc, off, yacc[b][i]));
          }
        }
      }
    }
    };
  Codes wa, wb;
  Raw sa, za, sb, zb;
  // up front, while the first codes are in flight: U^T's first rank chunk of the block's columns
  // (cp.async, read in the epilogue), the zero row, and with xblock the x of every slice (one load
  // round trip per block instead of one per warp and slice, each slice staged once per block)
  // U^T's ranks r0 .. r0 + min(kRChunk, left) - 1 of the block's columns into usm by cp.async: rows up to a
  // multiple of 16 ranks, zeros past `left` (the mma epilogue's last k16 step reads them). Up front the first
  // chunk of the block's segment (rank_window); the chunked instance copies the later ones in its epilogue.
  const auto copy_ut_chunk = [&](int r0, int left) {
    const int rc = min(kRChunk, (left + 15) / 16 * 16), per_row = BR / 8;
    for (int u = tid; u < rc * per_row; u += kThreads) {
      const int r = u / per_row, j = (u - r * per_row) * 8, n = col_of(j);
      const bool ok = n < N && r < left;  // N % 8 == 0 (host)
      cp_async16_zfill(smem_u32(usm + r * BR + j), ok ? ute + static_cast<long long>(r0 + r) * N + n : ute, ok);
    }
    cp_async_commit();
  };
  if (flags & kUAsync) {
    const int2 win = rank_window(p, col_of(0));
    copy_ut_chunk(win.x, win.y - win.x);
  }
  if (wk < n_slices) load_slice(wk, wa, sa, za);
  for (int i = tid; i < kXRowBytes / 16; i += kThreads) zrow16[i] = make_uint4(0, 0, 0, 0);
  if (tid < MR) xrow[tid] = tid < rows ? input_row<T>(p, m0 + tid) : nullptr;
  __syncthreads();
  if (xblock) {
    // one (slice, row) per warp at a time: all 8 warps stage, not one per slice (a 2-slice K, 4 rows: 8
    // warps instead of 2 in the chain before the first mma)
    for (int u = warp; u < n_slices * MR; u += kWarps) {
      const int s = u / MR, m = u - s * MR;
      stage_x_row<E, T, G, MR, kAct>(xr[m], m, K, s * kSliceK, slice_x(s));
    }
  }
  __syncthreads();
  if constexpr (!prefetched(MR, G, kPF)) {
    for (int s = wk; s < n_slices; s += WK) {
      if (s != wk) load_slice(s, wa, sa, za);
      compute_slice(s, wa, sa, za);
    }
  } else {
    for (int s = wk; s < n_slices; s += 2 * WK) {
      const int s1 = s + WK;
      if (s1 < n_slices) load_slice(s1, wb, sb, zb);
      compute_slice(s, wa, sa, za);
      if (s1 >= n_slices) break;
      if (s1 + WK < n_slices) load_slice(s1 + WK, wa, sa, za);
      compute_slice(s1, wb, sb, zb);
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

  // t may still be in flight when this kernel was launched programmatically after the kernel
  // computing it: wait for it here, after the main loop
  if (R > 0) grid_dep_wait();
  // Re: the expert's own rank (Int3GemmParams::ranks; R strides t and U^T, the t kernels write zeros past Re), its
  // index found again from ute (held through the main loop anyway): e held for this, or kept in shared memory,
  // spilled in the 80-register 4-row instances (sm_90a, g64: 24 -> 76-92 bytes). Compiled into the 2- and 4-row
  // instances the grouped op runs, not into the register-prefetched one (fp16 g64 0 -> 32 bytes of spills; it runs
  // every expert's term over all R ranks, t zero past the expert's own) nor the 1- and 8-row ones only the dense op
  // runs: there the code moved the main loop's schedule (H100 2026-12-07, dense 4096x4096 M=1 R0 7.4 -> 7.5 us), and
  // without it their SASS is the same as before ranks (scripts/sass_stats.py --dump).
  constexpr bool kExpertRanks = !kPF && (MR == 2 || MR == 4);
  // the dense op's segment of a stacked weight (rank_window): the block's ranks rlo .. rlo + Re - 1
  const int2 win = rank_window(p, col_of(0));
  const int rlo = win.x;
  const int Re = !kExpertRanks ? win.y - win.x
                 : p.ranks == nullptr || p.R == 0
                     ? win.y - win.x
                     : expert_rank(p, static_cast<unsigned>(ute - reinterpret_cast<const T*>(p.ut)) /
                                          static_cast<unsigned>(p.ut_estride));  // E * R * N < 2^31 (host)
  // low-rank term, up to kRChunk ranks with U^T's chunk in shared memory (kUAsync): by mma, each tile's first
  // warp adding t U^T[:, its 16 columns] to its own partial sums (ys). A = U^T's chunk rows by transposed
  // ldmatrix, B = t's rows as the n8 columns in hi + lo halves of T (fp32 accuracy). The scalar loop below it
  // (one thread per column and rank slice, each rank's t from shared memory) cost 10-14% of the grouped decode
  // kernels' instructions at rank 32 (ncu, H100 2026-12-07, Qwen3-shaped M=32).
  // Compiled where it leaves the instance's spills as they were (sm_90a, scripts/sass_stats.py): not in the
  // register-prefetched 4-row instance (0 -> 20-44 bytes; Mixtral-shaped M=8 4% slower, H100 2026-12-07
  // 07:32) nor at 8 rows with g = 32 (36 -> 88-96). (Written last in the condition: placed first, the same
  // constant moved the spills of the other instances.)
  constexpr bool kLrMmaHere = !kPF && !(MR == 8 && G == 32);
  // Past kRChunk ranks (the issue's rank 512; a stacked weight's segment of more than 64) the mma term runs a
  // chunk at a time in a 1-row instance of its own (the dense op's M = 1); elsewhere the scalar loop takes them.
  // Compiled into the 2- to 8-row instances the chunk loop moved their spills (sm_90a ptxas: 0 -> 4-36 bytes at 2
  // rows), out of line (__noinline__) it put 264-368 byte stack frames on every instance, and in the one 1-row
  // instance (127-128 registers from 123-128) it cost R = 0 / 32 at M = 1 0.1-0.2 us (H100 2026-12-07 16:25 UTC,
  // 14336x4096 14.7 -> 14.85; R = 512 70.8 -> 31.3).
  static_assert(!kRChunks || MR == 1, "the chunked low-rank term is a 1-row instance");
  const bool lr_mma = Re > 0 && (kRChunks || Re <= kRChunk) && (flags & kUAsync) && (flags & kLrMma) && kLrMmaHere;
  // thread (column nn, rank slice rs) of the scalar loop: sums t[m, r] * ut[r, n] over r = rs (mod slices)
  const int slices = kThreads / BR;
  const int nn = tid % BR, rs = tid / BR;
  const int n = col_of(nn);
  if (kRChunks && lr_mma) {
    // a chunk of kRChunk ranks at a time: U^T's first chunk was copied up front, each later one is copied (and
    // t's partials summed) after every tile's mma has read the one before: one load round trip a chunk, where
    // the scalar loop took one per 4 ranks a thread past the first chunk
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    const uint32_t ub = smem_u32(usm) + 2 * (tile * 16 + 8 * ((lane >> 3) & 1));
    for (int r0 = 0; r0 < Re; r0 += kRChunk) {
      const int rc = min(kRChunk, Re - r0);
      if (r0 > 0) {
        __syncthreads();  // usm and tsm read by every tile
        copy_ut_chunk(rlo + r0, Re - r0);
      }
      stage_t_chunk<MR>(p, m0, rows, rlo + r0, rc, tsm);
      cp_async_wait<0>();
      __syncthreads();  // tsm, U^T's chunk and the warps' ys visible
      if (wk == 0) lowrank_mma_chunk<T, MR>(acc, ub, tsm, BR, rc);
    }
    if (wk == 0)
#pragma unroll
      for (int e = 0; e < 2; ++e) {  // acc: columns g and g + 8 of the tile, rows 2c and 2c + 1
        const int m = 2 * c + e;
        if (m < MR) {
          ys[warp][m][g] += acc[e];
          ys[warp][m][g + 8] += acc[2 + e];
        }
      }
  } else if (lr_mma) {
    stage_t_chunk<MR>(p, m0, rows, rlo, Re, tsm);  // t's split partials, summed once per block
    cp_async_wait<0>();
    __syncthreads();  // tsm, U^T's chunk and the warps' ys visible
    if (wk == 0) {
      float acc[4] = {0.f, 0.f, 0.f, 0.f};
      lowrank_mma_chunk<T, MR>(acc, smem_u32(usm) + 2 * (tile * 16 + 8 * ((lane >> 3) & 1)), tsm, BR, Re);
      // acc: columns g and g + 8 of the tile, rows 2c and 2c + 1
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int m = 2 * c + e;
        if (m < MR) {
          ys[warp][m][g] += acc[e];
          ys[warp][m][g + 8] += acc[2 + e];
        }
      }
    }
  } else if (Re > 0) {
    float lr[MR];
#pragma unroll
    for (int m = 0; m < MR; ++m) lr[m] = 0.f;
    // ranks in chunks of kRChunk: the block sums t's split partials of a chunk once into shared
    // memory (one load round trip, all threads), then each thread walks its ranks of the chunk. (Each
    // thread summing the partials itself cost a chain of dependent global loads per rank: 11 us at
    // 14336x4096, M=4, R=32.) kRChunk is a multiple of every `slices`, so a thread visits the same
    // ranks in the same order as without chunks.
    if (flags & kUAsync) cp_async_wait<0>();  // visible to the block after the __syncthreads below
    for (int r0 = 0; r0 < Re; r0 += kRChunk) {
      const int rc = min(kRChunk, Re - r0);
      stage_t_chunk<MR>(p, m0, rows, rlo + r0, rc, tsm);
      __syncthreads();
      if (n < N) {
        // the first chunk's U from shared memory (copied up front) when there; else 4 ranks' loads
        // in flight at a time (one dependent global round trip per rank cost ~5 us at R=32)
        const bool from_smem = (flags & kUAsync) && r0 == 0;
        for (int r = rs; r < rc; r += 4 * slices) {
          float u[4];
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int rj = r + j * slices;
            u[j] = rj < rc ? to_float(from_smem ? usm[rj * BR + nn] : ute[static_cast<long long>(rlo + r0 + rj) * N + n])
                           : 0.f;
          }
#pragma unroll
          for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int m = 0; m < MR; ++m) lr[m] = fmaf(tsm[m][min(r + j * slices, kRChunk - 1)], u[j], lr[m]);
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int m = 0; m < MR; ++m) red[(rs * MR + m) * BR + nn] = lr[m];
  }
  __syncthreads();
  // y[m, column nc of block column col]: the warps' partial sums, the scalar loop's low-rank slices, the bias;
  // kGateOut: block columns col and col + BR / 2 (gate, up) rounded to T and gated into y's column nc (y is
  // N / 2 wide), as when y is written whole and the next op gates it
  const bool gate_out = (col_flags & kGateOut) != 0;
  const int out_cols = gate_out ? BR / 2 : BR, ldy = gate_out ? N / 2 : N;
  const auto col_sum = [&](int m, int bc) {
    const int t0 = (bc / 16) << wk_log2;
    float v = 0.f;
    for (int w2 = 0; w2 < WK; ++w2) v += ys[t0 + w2][m][bc % 16];
    if (Re > 0 && !lr_mma)
      for (int sl = 0; sl < slices; ++sl) v += red[(sl * MR + m) * BR + bc];
    if (p.bias != nullptr) v += to_float(reinterpret_cast<const T*>(p.bias)[col_of(bc)]);
    return v;
  };
  for (int idx = tid; idx < MR * out_cols; idx += kThreads) {
    const int m = idx / out_cols, col = idx % out_cols, nc = col_of(col);
    if (m < rows && nc < N) {
      float v = col_sum(m, col);
      if (gate_out) v = silu_mul1<T>(from_float<T>(v), from_float<T>(col_sum(m, col + out_cols)));
      reinterpret_cast<T*>(p.y)[static_cast<long long>(m0 + m) * ldy + nc] = from_float<T>(v);
    }
  }
}

// grid (ceil(N / BR), row blocks): the dense op's blockIdx.y covers rows MR*y .. MR*y + MR - 1; the
// grouped op's is a tile (expert, row start, row end) of at most MR rows, listed or found from the
// offsets by the block itself (block_tile()).
template <typename T, int G, int MR, int MINB, bool kAct, bool kPF, bool kRChunks, bool kGrouped>
__global__ void __launch_bounds__(kThreads, MINB) int3_gemv_kernel(const Int3GemmParams p, int wk_log2, int flags) {
  extern __shared__ __align__(16) uint8_t gemv_smem[];
  __shared__ float ys[kWarps][MR][16];
  __shared__ float red[kThreads * MR];
  __shared__ __align__(16) float tsm[MR][kRChunk];  // float2 reads (the mma low-rank term)
  __shared__ uint4 zrow[kXRowBytes / 16];  // the B operand of lanes whose column is another lane's
  __shared__ const void* xrow[MR];         // the input rows (input_row())
  grid_dep_launch_dependents();  // the kernels launched programmatically after it wait for it at their start
  int tail0;
  const int4 tl = block_tile<kThreads>(p, blockIdx.y, MR, &tail0);
  if (blockIdx.y == 0 && tail0 < p.M) {  // the grouped op's rows past the last expert: no tile covers them
    const bool gate_out = gate_out_compiled(MR, kPF, kGrouped) && (flags & kGateOut);  // y N / 2 wide, blocks half as many columns
    const int ny = gate_out ? p.N / 2 : p.N, br = (16 * (kWarps >> wk_log2)) >> (gate_out ? 1 : 0);
    const int n0 = blockIdx.x * br, nc = min(br, ny - n0);
    T* y = reinterpret_cast<T*>(p.y);
    for (int i = threadIdx.x; i < (p.M - tail0) * nc; i += kThreads)
      y[static_cast<long long>(tail0 + i / nc) * ny + n0 + i % nc] = from_float<T>(0.f);
  }
  const int rows = min(tl.z, tl.y + MR) - tl.y;
  if (tl.x < 0 || rows <= 0) return;
  gemv_block<T, G, MR, kAct, kPF, kRChunks, kGrouped>(p, tl.x, tl.y, rows, wk_log2, flags, gemv_smem, ys, red, tsm, zrow, xrow);
}

// whether an instance of MR rows (kPF: register-prefetched; grouped: the grouped op's) at br columns a block
// writes silu(gate) * up itself (the pairing of gate and up columns in gemv_col())
bool gates_output(int MR, bool kPF, bool grouped, int br, int N) {
  return gate_out_compiled(MR, kPF, grouped) && br >= 32 && N % br == 0;
}

template <typename T, int G, int MR, bool kAct, bool kPF = false, bool kRChunks = false, bool kGrouped = false>
void launch_mr(const Int3GemmParams& p, int row_blocks, int wk_log2, const GemvLaunch& l, cudaStream_t stream) {
  constexpr int kMinBlocks = min_blocks(MR, G, kPF);
  auto kern = int3_gemv_kernel<T, G, MR, kMinBlocks, kAct, kPF, kRChunks, kGrouped>;
  const int br = 16 * (kWarps >> wk_log2);
  const dim3 grid((p.N + br - 1) / br, row_blocks);
  // shared memory: x of the whole K once per block where it fits beside the other resident blocks
  // (else one slice per warp, restaged every slice), and U^T's first rank chunk where rows are 16-byte
  // aligned
  const int n_slices = (p.K + kSliceK - 1) / kSliceK;
  TORCH_CHECK(static_cast<long long>(p.N) * (p.K / 32 * 3) < (1LL << 31), "int3 gemv: a weight of ", p.N, " x ", p.K,
              " is past the kernel's 32-bit offsets");
  const bool uasync = p.R > 0 && p.N % 8 == 0 && (p.ut_estride * 2) % 16 == 0 &&
                      reinterpret_cast<uintptr_t>(p.ut) % 16 == 0;
  const int u_bytes = uasync ? std::min(kRChunk, (p.R + 15) / 16 * 16) * br * 2 : 0;
  static const int static_smem = [kern] {  // the kernel's static shared memory, as compiled
    cudaFuncAttributes a;
    C10_CUDA_CHECK(cudaFuncGetAttributes(&a, kern));
    return static_cast<int>(a.sharedSizeBytes);
  }();
  const int xblock_bytes = n_slices * warp_x_bytes(MR) + u_bytes;
  const bool xblock_fits = (xblock_bytes + static_smem + 1024) * kMinBlocks <= l.smem_per_sm;
  // by default only up to 8 slices: x of more is a long serial load before the first mma (H200,
  // 2026-12-02, M=1, R=0: 14336x4096 (8 slices) 18.6 -> 17.1 us, 4096x14336 (28) 16.8 -> 17.8 us)
  const bool xblock = xblock_fits && (l.xblock_force >= 0 ? l.xblock_force > 0 : n_slices <= 8);
  const int smem = xblock ? xblock_bytes : kWarps * warp_x_bytes(MR) + u_bytes;
  if (smem + static_smem > 48 * 1024)  // past 48 KB of static + dynamic a block needs the opt-in
    C10_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  TORCH_CHECK(p.out_act == 0 || gates_output(MR, kPF, kGrouped, br, p.N),
              "int3 gemv: no gated output in this launch (int3_gemv_gates_output())");
  const int flags = (xblock ? kXBlock : 0) | (uasync ? kUAsync : 0) | (l.lr_mma ? kLrMma : 0) |
                    (p.out_act ? kGateOut : 0);
  launch_programmatic_if(kern, grid, dim3(kThreads), smem, l.programmatic, stream, p, wk_log2, flags);
}

// Warps per 16-column tile (log2). One 512-k slice per warp (at most 8 warps) is the default; the grid is
// then moved toward 0.7 of a wave of resident blocks, the least that kept the SMs' loads in flight:
// * grids past it take fewer warps per tile: a warp streams several slices (the next one's loads in
//   flight where slices are prefetched, the classed encoding) and the block's cross-warp reduction shrinks.
//   Dense: only 2 warps per tile, with 8+ slices and at least a block per SM (H200, 2026-12-02, M=1: 14336x4096
//   17.9 us vs 19.6 at 8 warps; 4096x4096, 64 blocks, 11.4 vs 7.5; 2026-12-03, M=4, fixed encoding, 3 blocks
//   per SM: 14336x4096 23.0 vs 26.0, x staged by 224 blocks instead of 896). Grouped: down to 1 warp
//   (H200, 2026-12-03, bench_moe.py milo-grouped under MILO_INT3_GEMV_WK=1: Qwen3-shaped M=8 147 -> 118 us,
//   M=32 304 -> 245, DeepSeek-V2-Lite-shaped M=8 237 -> 172; at M=1, where 1 warp leaves under half a
//   wave, 2 warps: 41.4 -> 40.7, 75.8 -> 71.2).
// * grids short of it take more warps per tile than slices, up to 8: more blocks on more SMs, the spare
//   warps idle (H200, 2026-12-02, M=1, 8 warps vs 4: 1408x2048 4.1 vs 4.6 us, 768x2048 3.9 vs 4.6).
// * before both, the dense op's register-prefetched instances (M <= 2) take the fewest warps per tile that leave a
//   warp at most 4 slices where a warp then streams 3-4 slices in one wave of blocks on 0.7 of the SMs or more:
//   fewer, longer blocks (H100, 2026-12-07 19:07 / 19:44 UTC, M = 1 / 2, us: 14336x2048 1 warp, 112 blocks, 9.8 /
//   10.4 against 4 warps, 448 blocks, 11.3 / 11.9, R=32 11.9 against 15.1; 6144x4096 (a stacked q/k/v) 2 warps,
//   96 blocks, 9.8 / 10.3 against 8 warps 10.4 / 12.0, R=32 11.3 against 14.1). Not the 4-row instance without
//   the prefetch (6144x4096 M=4 2 warps 15.1 against 8 warps 12.7), nor 2 slices a warp on a block per SM
//   (4096x4096 M=1 4 warps 7.8 against 8 warps 7.5, R=32 10.4 against 9.0), nor past one wave (28672x4096, 17408x4096:
//   the rules below within 3% of the best).
// busy_row_blocks: row blocks with work (the grouped op's tile list has empty slots); blocks_per_sm: the
// resident blocks per SM of the launch's register cap; streams: the instance loads a warp's next slice ahead.
int gemv_wk_log2(int N, int K, int busy_row_blocks, int sms, int blocks_per_sm, int wk_force, bool grouped,
                 bool streams) {
  const int n_slices = (K + kSliceK - 1) / kSliceK;
  int wk_log2 = 0;
  while (wk_log2 < 3 && (1 << wk_log2) < (wk_force > 0 ? wk_force : n_slices)) ++wk_log2;
  if (wk_force > 0) return wk_log2;
  // the blocks of a grid at 2^wk warps per tile; whether they fill 0.7 of a wave of resident blocks
  const auto blocks = [&](int wk) {
    const int br = 16 * (kWarps >> wk);
    return static_cast<long long>((N + br - 1) / br) * busy_row_blocks;
  };
  const auto fills_wave = [&](int wk) { return 10 * blocks(wk) >= 7LL * blocks_per_sm * sms; };
  if (streams && !grouped) {
    const auto per_warp = [&](int wk) { return (n_slices + (1 << wk) - 1) >> wk; };
    int wk = 0;
    while (wk < 3 && per_warp(wk) > 4) ++wk;
    if (per_warp(wk) >= 3 && 10 * blocks(wk) >= 7LL * sms && blocks(wk) <= 1LL * blocks_per_sm * sms) return wk;
  }
  if (grouped) {
    wk_log2 = 0;
  } else if (n_slices >= 8 && blocks(1) >= sms) {
    return 1;
  }
  while (wk_log2 < 3 && !fills_wave(wk_log2)) ++wk_log2;
  return wk_log2;
}

// the grouped op's launch (a tile list or offsets), not the dense op's
bool is_grouped(const Int3GemmParams& p) { return p.tiles != nullptr || p.offsets != nullptr; }

// whether a 4-row launch prefetches (prefetched()): the grouped op's, where a warp streams 8 slices or more
// (it starts at one warp per tile: gemv_wk_log2()) of an input not gated in the kernel (gated in the kernel
// only up to 8 slices: K = 4096 alone would take the instance)
bool gemv_prefetch(const Int3GemmParams& p, int max_rows, int group) {
  return is_grouped(p) && p.act == kActNone && max_rows > 2 && max_rows <= 4 && group >= 64 &&
         (p.K + kSliceK - 1) / kSliceK >= 8;
}

// warps per tile (log2) of a launch: row blocks with work are at most the rows for the grouped op
int launch_wk_log2(const Int3GemmParams& p, int row_blocks, int max_rows, int group, const GemvLaunch& l) {
  const bool grouped = is_grouped(p);
  const int busy = grouped ? std::min(row_blocks, std::max(p.M, 1)) : row_blocks;
  const bool pf = gemv_prefetch(p, max_rows, group);
  return gemv_wk_log2(p.N, p.K, busy, l.sms, min_blocks(max_rows, group, pf), l.wk_force, grouped,
                      prefetched(max_rows, group, pf));
}

template <typename T, int G>
void launch(const Int3GemmParams& p, int row_blocks, int max_rows, const GemvLaunch& l, cudaStream_t stream) {
  const int wk_log2 = launch_wk_log2(p, row_blocks, max_rows, G, l);
  // the activation only where the grouped op runs it (tiles of 2 or 4 rows): its own instances
  TORCH_CHECK(p.act == kActNone || (p.act == kActSiluMul && max_rows > 1 && max_rows <= 4), "int3 gemv: activation ",
              p.act, " with ", max_rows, "-row tiles");
  TORCH_CHECK(max_rows <= kInt3GemvMaxRows, "int3 gemv: tiles of ", max_rows, " rows, at most ", kInt3GemvMaxRows);
  // the grouped op's 1-row tiles (MILO_INT3_GROUPED_GEMV_BM=1) their own instance: the gated epilogue in
  if (max_rows <= 1 && is_grouped(p)) return launch_mr<T, G, 1, false, false, false, true>(p, row_blocks, wk_log2, l, stream);
  if (max_rows <= 1)
    return int3_max_segment_rank(p) > kRChunk
               ? launch_mr<T, G, 1, false, false, true>(p, row_blocks, wk_log2, l, stream)
               : launch_mr<T, G, 1, false>(p, row_blocks, wk_log2, l, stream);
  if (max_rows <= 2)
    return p.act ? launch_mr<T, G, 2, true>(p, row_blocks, wk_log2, l, stream)
                 : launch_mr<T, G, 2, false>(p, row_blocks, wk_log2, l, stream);
  if (max_rows <= 4)
    return gemv_prefetch(p, max_rows, G) ? launch_mr<T, G, 4, false, true>(p, row_blocks, wk_log2, l, stream)
           : p.act                        ? launch_mr<T, G, 4, true>(p, row_blocks, wk_log2, l, stream)
                                          : launch_mr<T, G, 4, false>(p, row_blocks, wk_log2, l, stream);
  return launch_mr<T, G, 8, false>(p, row_blocks, wk_log2, l, stream);  // the dense op at M 5-8
}

// the columns of each block of that launch
int launch_columns(const Int3GemmParams& p, int row_blocks, int max_rows, int group, const GemvLaunch& l) {
  return 16 * (kWarps >> launch_wk_log2(p, row_blocks, max_rows, group, l));
}

}  // namespace

int int3_max_segment_rank(const Int3GemmParams& p) {
  if (p.n_blocks == 0) return p.R;
  int r = 0;
  for (int i = 0; i < p.n_blocks; ++i) r = std::max(r, p.blk_rank[i] - (i > 0 ? p.blk_rank[i - 1] : 0));
  return r;
}

long long int3_gemv_blocks(const Int3GemmParams& p, int row_blocks, int max_rows, int group, const GemvLaunch& l) {
  const int br = launch_columns(p, row_blocks, max_rows, group, l);
  return static_cast<long long>((p.N + br - 1) / br) * row_blocks;
}

bool int3_gemv_gates_output(const Int3GemmParams& p, int row_blocks, int max_rows, int group, const GemvLaunch& l) {
  const int mr = max_rows <= 1 ? 1 : max_rows <= 2 ? 2 : (max_rows <= 4 ? 4 : 8);
  return gates_output(mr, gemv_prefetch(p, max_rows, group), is_grouped(p), launch_columns(p, row_blocks, max_rows, group, l),
                      p.N);
}

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
