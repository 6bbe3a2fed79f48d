// milo_tensor: fused INT3 x fp16/bf16 GEMM with an optional fused low-rank term.
//
//   y[M, N] = x[M, K] @ deq(Q)[N, K]^T + t[M, R] @ ut[R, N] (+ bias)
//   deq(Q)[n, k] = (code[n, k] - zeros[n, k / G]) * scales[n, k / G]
//
// Q is read directly in the storage layout, format 2 (milo_tensor/quant/packing.py, docs/format.md):
// 32 codes of one row = 3 int32 words; the neighbours (2p, 2p + 1) form pair p, held in one 3-bit field
// of one word (low half: code 2p, high half: code 2p + 1); pair 15 sits in the spare bits 15 / 31.
//
// Design (docs/kernel.md has the long version):
// * tensor cores: mma.sync m16n8k16, x is the A operand (row-major), the weight the B operand.
// * the k order inside a chunk is the mma's own up to the pairing (the sum over k does not care): a
//   thread's B register is one code pair, i.e. two neighbouring k, so x is staged in natural order
//   and its A fragment registers are x words as loaded (16-byte ld.shared of rows g and g + 8, no
//   prmt; the compiler moves them into the fragment's register order); the pairs of a thread come
//   out of two words with the same shifts whichever half of the chunk it owns.
// * dequantization in registers: the code's 3 bits OR-ed into the top of the mantissa of 1.0 are the
//   fp16/bf16 number 1 + code / 8 exactly (Int3Traits). The mma accumulates x . (1 + code / 8) in fp32
//   per group; a second mma against a ones-matrix gives the row sums of x per group, and the group's
//   affine map is applied in fp32: acc += 8 s * acc_g - s * (z + 8) * xsum_g. Scale and zero never pass
//   through half precision, so bf16 is as accurate as fp16.
// * 16-byte cp.async.cg for the weights, a STAGES-deep pipeline, split-K over blocks with a
//   deterministic fixed-order reduction by the last-arriving block (per-tile counter), so all SMs
//   are busy at M = 1.
// * the low-rank term: t = x @ V^T is computed before (fp32, tiny); every block adds
//   t[:, chunk] @ ut[chunk, tile] with mma (t split into hi + lo halves for fp32-level accuracy)
//   for its share of the rank chunks, so U is read once, and y is written once.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace milo {

// ------------------------------------------------------------------------------------------------
// small device helpers
// ------------------------------------------------------------------------------------------------

template <typename T>
struct Int3Traits;

// The tensor-core kernel's codes: 1 + code / kUnit exactly, the code's 3 bits at the top of the mantissa
// of 1.0 (bit kPos up), OR-ed into kOne2. (Magic 1024 + code (fp16) or 128 + code (bf16) made a group's
// sum of x * (magic + code) 100-300x larger than the result for activations offset from zero, and the
// mma's fp32 accumulation then cost accuracy: bf16, g32, x + 4, M=8 3.05e-3 against a 1.81e-3 rounding
// floor; fp16 up to 4x its floor, H100 2026-12-06.)
template <>
struct Int3Traits<half> {
  static constexpr uint32_t kOne2 = 0x3C003C00u;  // half2(1, 1)
  static constexpr int kPos = 7;                  // 10-bit mantissa: bits 7..9 are 1/8 .. 1/2
};

template <>
struct Int3Traits<__nv_bfloat16> {
  static constexpr uint32_t kOne2 = 0x3F803F80u;  // bf162(1, 1)
  static constexpr int kPos = 4;                  // 7-bit mantissa: bits 4..6
};
constexpr float kInt3Unit = 8.f;  // 1 + code / 8

__device__ __forceinline__ float to_float(half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(float v) { return v; }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ half from_float<half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<half>(float lo, float hi) {
  half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// the fp32 pair (a, b) as two T pairs, hi = (a, b) rounded to T and lo = the remainders rounded to T: an mma of
// hi and of lo carries about twice T's precision (the low-rank epilogues' t operand)
template <typename T>
__device__ __forceinline__ void split_hi_lo(float a, float b, uint32_t& hi, uint32_t& lo) {
  const float ha = to_float(from_float<T>(a)), hb = to_float(from_float<T>(b));
  hi = pack2<T>(ha, hb);
  lo = pack2<T>(a - ha, b - hb);
}

// (a & b) | c
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  return r;
}

// ---- the format-2 code layout (packing.py): pair p = codes (2p, 2p + 1) of a 32-code chunk ----
// pairs 0..4 in fields 0..4 of word 0, 5..7 in fields 0..2 of word 1, 8..12 in fields 0..4 of word 2,
// 13..14 in fields 3..4 of word 1; field i = bits 3i..3i+2 (code 2p) and 16+3i.. (code 2p + 1)
__host__ __device__ constexpr int pair_word(int p) { return p < 5 ? 0 : (p < 8 ? 1 : (p < 13 ? 2 : 1)); }
__host__ __device__ constexpr int pair_field(int p) { return p < 5 ? p : (p < 8 ? p - 5 : (p < 13 ? p - 8 : p - 10)); }

// v shifted left by s (right by -s); s is a constant after unrolling
__device__ __forceinline__ uint32_t shl(uint32_t v, int s) { return s >= 0 ? v << s : v >> (-s); }

// field i of word w as a pair register: the two codes at bit pos of each half, OR-ed into magic
__device__ __forceinline__ uint32_t field_pair(uint32_t w, int i, int pos, uint32_t magic) {
  return and_or(shl(w, pos - 3 * i), 0x00070007u << pos, magic);
}
// pair 15 (codes 30, 31): bit b of each in bits 15 / 31 of word b
__device__ __forceinline__ uint32_t spare_pair(uint32_t w0, uint32_t w1, uint32_t w2, int pos, uint32_t magic) {
  uint32_t r = and_or(shl(w0, pos - 15), 0x00010001u << pos, magic);
  r = and_or(shl(w1, pos - 14), 0x00020002u << pos, r);
  return and_or(shl(w2, pos - 13), 0x00040004u << pos, r);
}
// pair p of a chunk from its 3 words, at bit pos of each half, OR-ed into magic (p compile-time after unrolling)
__device__ __forceinline__ uint32_t chunk_pair(const uint32_t (&wd)[3], int p, int pos, uint32_t magic) {
  return p < 15 ? field_pair(wd[pair_word(p)], pair_field(p), pos, magic) : spare_pair(wd[0], wd[1], wd[2], pos, magic);
}
// pairs 8h .. 8h + 7 of a chunk (k 16h .. 16h + 15) at bit POS, OR-ed into magic, for a runtime half h:
// X = word 2h, w1 = word 1, O = word 2 - 2h (h = 1: pairs 8..12 from word 2, 13..14 from word 1 >> 9,
// 15 the spare pair; h = 0: 0..4 from word 0, 5..7 from word 1: the same shifts)
template <int POS>
__device__ __forceinline__ void half_chunk_pairs(uint32_t X, uint32_t w1, uint32_t O, int h, uint32_t magic,
                                                 uint32_t (&b)[8]) {
  const uint32_t Y = w1 >> (9 * h);
#pragma unroll
  for (int i = 0; i < 5; ++i) b[i] = field_pair(X, i, POS, magic);
  b[5] = field_pair(Y, 0, POS, magic);
  b[6] = field_pair(Y, 1, POS, magic);
  b[7] = h ? spare_pair(O, w1, X, POS, magic) : field_pair(Y, 2, POS, magic);
}
// pairs 4q .. 4q + 3 of a chunk (k 8q .. 8q + 7) at bit POS, OR-ed into magic, for a runtime quarter q:
// X = word 2 (q >> 1), w1 = word 1, O = word 2 - 2 (q >> 1)
template <int POS>
__device__ __forceinline__ void quarter_chunk_pairs(uint32_t X, uint32_t w1, uint32_t O, int q, uint32_t magic,
                                                    uint32_t (&r)[4]) {
  const int h = q >> 1, odd = q & 1;
  const uint32_t Y = w1 >> (9 * h);
  const uint32_t Z = odd ? Y : X >> 3;  // q odd: pairs 1..3 of the quarter from Y's fields 0..2
  r[0] = field_pair(X >> (12 * odd), 0, POS, magic);
  r[1] = field_pair(Z, 0, POS, magic);
  r[2] = field_pair(Z, 1, POS, magic);
  r[3] = (odd & h) ? spare_pair(O, w1, X, POS, magic) : field_pair(Z, 2, POS, magic);
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}
// 16 bytes, and let L2 fetch the surrounding 256-byte block from DRAM (the next stages of the row)
__device__ __forceinline__ void cp_async16_pf(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}
// 16 bytes, zero-filled when !valid (src is not read then)
__device__ __forceinline__ void cp_async16_zfill(uint32_t dst, const void* src, bool valid) {
  int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
// 4 or 8 bytes, zero-filled when !valid (src is not read then)
template <int Bytes>
__device__ __forceinline__ void cp_async_small_zfill(uint32_t dst, const void* src, bool valid) {
  static_assert(Bytes == 4 || Bytes == 8, "cp.async.ca copies 4, 8 or 16 bytes");
  int n = valid ? Bytes : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(dst), "l"(src), "n"(Bytes), "r"(n));
}
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src));
}
// Programmatic dependent launch (sm_90+; no-ops before): the primary kernel lets the next kernel in
// the stream start early, and that kernel waits for the primary's results only where it needs them.
__device__ __forceinline__ void grid_dep_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void grid_dep_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
// spin for about ns nanoseconds of wall time (tests only: makes one kernel deliberately slow)
__device__ __forceinline__ void sleep_ns(unsigned ns) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
  unsigned long long t0, t1;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  do {
    __nanosleep(1000);
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t1));
  } while (t1 - t0 < ns);
#endif
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// plain C++ shared-memory loads: the compiler schedules them freely and keeps them inside barriers
__device__ __forceinline__ uint4 lds128(const uint8_t* p) { return *reinterpret_cast<const uint4*>(p); }
__device__ __forceinline__ float4 lds128f(const uint8_t* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ uint32_t lds32(const uint8_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// D = A * B + C, m16n8k16, fp32 accumulators
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                                         const float (&c)[4]);

template <>
__device__ __forceinline__ void mma16816<half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                                               const float (&c)[4]) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
}

template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1, const float (&c)[4]) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
}

// ------------------------------------------------------------------------------------------------
// parameters and tile configuration
// ------------------------------------------------------------------------------------------------

constexpr int kMaxRankBlocks = 3;  // Int3GemmParams::n_blocks: q, k and v

struct Int3GemmParams {
  const void* x;        // [M, K] row-major, T, 16-byte aligned
  const int32_t* q;     // [N, 3K/32] packed codes (format 2), 16-byte aligned
  const void* scales;   // [N, K/G] T, 4-byte aligned
  const void* zeros;    // [N, K/G] T, 4-byte aligned
  const float* t;       // [M, R] fp32 (x @ V^T), or nullptr when R == 0
  const void* ut;       // [R, N] T, 16-byte aligned, or nullptr when R == 0
  const void* bias;     // [N] T or nullptr
  void* y;              // [M, N] T
  float* ws;            // [splits, M, N] fp32 partials (splits > 1)
  int* counters;        // [m_blocks * n_tiles], zero on entry (splits > 1)
  int M, N, K, R;
  int splits;           // gridDim.y
  int stages_per_split; // 128-wide k stages per split
  // grouped (MoE) mode, nullptr for the dense op: one int4 (expert, row start, row end, 0) per
  // blockIdx.z, expert < 0 for an unused slot. x, t and y are then indexed by global row, and the
  // per-expert weights sit at q + e * q_estride (ints), scales / zeros + e * s_estride, ut + e *
  // ut_estride (elements).
  const int4* tiles;
  long long q_estride, s_estride, ut_estride;
  int t_splits;                 // t = sum of t_splits partials [t_splits, p.M, R] (1 for the dense op)
  long long t_split_stride;     // p.M * R
  // Read by the decode and t-rows kernels only (grouped_input.cuh); the tensor-core kernel needs
  // tiles listed and x as [M, K] rows. Grouped op with tiles == nullptr: row block y finds its tile of
  // at most tile_rows rows from offsets ([n_experts] int32, or int64 when offsets_i64) and zeroes the
  // rows past the last expert.
  const void* offsets = nullptr;
  bool offsets_i64 = false;
  int n_experts = 0, tile_rows = 0;
  // input row m is x + x_rows[m] * ldx (x_rows == nullptr: m * ldx; outside [0, x_rows_n): zeros), and
  // silu(gate) * up of that stored [gate | up] row when act == kActSiluMul
  const int* x_rows = nullptr;
  long long x_rows_n = 0;
  int ldx = 0, act = 0;
  // decode kernel only: kActSiluMul writes y = silu(gate) * up of the [gate | up] columns, [M, N / 2]
  int out_act = 0;
  // grouped op: expert e's rank ([n_experts] int32; nullptr: R for every expert). The t kernels write t = 0
  // past it without reading V; the decode kernel's epilogue stops there (but for its register-prefetched
  // instance, which multiplies those zeros by U^T's padding rows), and so does tiles 7-9's, at its 16-rank step.
  const int* ranks = nullptr;
  // dense op, decode kernel: U^T block-diagonal over n_blocks column segments (a stack of weights, fuse_qkv):
  // segment i, columns blk_col[i - 1] .. blk_col[i] - 1 (from 0 for i = 0; the last ends at N), has nonzero U^T
  // rows only in ranks blk_rank[i - 1] .. blk_rank[i] - 1 (the last ends at R), and a block reads only its
  // segment's (the host checks every boundary falls between blocks). n_blocks = 0: every column, all R ranks.
  int n_blocks = 0;
  int blk_col[kMaxRankBlocks] = {}, blk_rank[kMaxRankBlocks] = {};
};

// the ranks [x, y) of the segment (Int3GemmParams::n_blocks) holding column col: (0, R) without segments
__device__ __forceinline__ int2 rank_window(const Int3GemmParams& p, int col) {
  if (p.n_blocks == 0) return make_int2(0, p.R);
  int i = 0;
#pragma unroll
  for (int b = 0; b < kMaxRankBlocks - 1; ++b) i += b + 1 < p.n_blocks && col >= p.blk_col[b];
  return make_int2(i > 0 ? p.blk_rank[i - 1] : 0, p.blk_rank[i]);
}

// the ranks expert e's low-rank term runs over: its own (ranks[e], clamped to [0, R]) where the op was given them
__device__ __forceinline__ int expert_rank(const int* ranks, int R, int e) {
  return ranks != nullptr ? min(R, max(0, __ldg(ranks + e))) : R;
}
__device__ __forceinline__ int expert_rank(const Int3GemmParams& p, int e) { return expert_rank(p.ranks, p.R, e); }

template <typename T, int MT_, int NT_, int WN_, int G_, int STAGES_, int MINB_ = 1>
struct Int3Cfg {
  using Elem = T;
  static constexpr int MT = MT_;          // m16 tiles per block
  static constexpr int NT = NT_;          // n8 tiles per warp
  static constexpr int WN = WN_;          // warps along N
  static constexpr int WK = 2;            // warps along K (each one 64-wide slice of a stage)
  static constexpr int G = G_;            // quantization group size
  static constexpr int STAGES = STAGES_;
  static constexpr int MINB = MINB_;      // min resident blocks per SM (register cap)
  static constexpr int WARPS = WN * WK;
  static constexpr int THREADS = WARPS * 32;
  static constexpr int BM = 16 * MT;
  static constexpr int BN = 8 * NT * WN;
  static constexpr int BK = 128;
  static constexpr int KG = G < 64 ? G : 64;        // apply the group affine map every KG k
  // G >= 64: thread t of a quad owns half (t >> 1) of chunk (t & 1) of a 64-slice (8 pairs); G == 32:
  // thread t owns a quarter (4 pairs) of each chunk (the mma's k stay in one group)
  static constexpr bool NATURAL = G >= 64;
  static constexpr int GS = BK / G > 0 ? BK / G : 1;  // groups per stage (G <= 128)
  static constexpr int GW = GS >= 2 ? GS / 2 : 1;     // 4-byte windows of scales per row per stage
  static constexpr int W_ROW = BK * 3 / 8;            // 48 bytes of packed codes per row per stage
  static constexpr int W_BYTES = BN * W_ROW;
  static constexpr int X_ROW = NATURAL ? BK * 2 + 16 : BK * 2;  // bytes of x per row per stage (+pad)
  static constexpr int X_BYTES = BM * X_ROW;
  static constexpr int S_BYTES = 2 * BN * GW * 4;     // raw scales + zeros
  static constexpr int STAGE_BYTES = W_BYTES + X_BYTES + S_BYTES;
  static constexpr int PIPE_BYTES = STAGES * STAGE_BYTES;
  static constexpr int FS_BYTES = 2 * GS * BN * 8;    // fp32 (s, s*(z+magic)), double-buffered
  static constexpr int RC = 64;                       // rank chunk of the low-rank epilogue
  static constexpr int UT_BYTES = RC * BN * 2;
  static constexpr int UT_RING = PIPE_BYTES / UT_BYTES;  // extra ut buffers in the pipeline area
  static constexpr int RED_BYTES = WN * MT * NT * 4 * 32 * 4;
  static constexpr int SMEM_BASE = PIPE_BYTES + FS_BYTES;  // + LR_BYTES when R > 0
  // t[:, chunk] of the block's rows, summed over t's k-split partials once per chunk (fp32; rows
  // padded to 72 floats so a quad's float2 reads of 8 rows hit 32 distinct banks)
  static constexpr int TS_LD = RC + 8;
  static constexpr int TS_BYTES = BM * TS_LD * 4;
  static constexpr int LR_BYTES = UT_BYTES + TS_BYTES;
  static_assert(G == 32 || G == 64 || G == 128, "group size");
  static_assert(NT % 2 == 0, "the low-rank epilogue loads n8 tiles in pairs");
  static_assert(STAGES >= 3, "the scale conversion runs one stage ahead");
  static_assert(UT_RING >= 1, "pipeline area must hold one ut chunk");
  static_assert(RED_BYTES <= PIPE_BYTES, "reduction scratch");
  static_assert(W_BYTES % 16 == 0 && X_BYTES % 16 == 0 && S_BYTES % 16 == 0, "alignment");
  // per-thread load descriptors
  static constexpr int WU = (BN * 3 + THREADS - 1) / THREADS;            // 16-byte weight pieces
  static constexpr int SU = (2 * BN * GW + THREADS - 1) / THREADS;       // 4-byte scale windows
  static constexpr int XPR = 16;                                         // 16-byte x pieces per row
  static constexpr int XU = (BM * XPR + THREADS - 1) / THREADS;          // x pieces
  static constexpr int CU = (GS * BN + THREADS - 1) / THREADS;           // scale conversions
};

// ------------------------------------------------------------------------------------------------
// the kernel
// ------------------------------------------------------------------------------------------------

template <typename Cfg>
__global__ void __launch_bounds__(Cfg::THREADS, Cfg::MINB) int3_gemm_kernel(const Int3GemmParams p) {
  using T = typename Cfg::Elem;
  constexpr int MT = Cfg::MT, NT = Cfg::NT, G = Cfg::G, STAGES = Cfg::STAGES;
  constexpr int THREADS = Cfg::THREADS, BN = Cfg::BN, BM = Cfg::BM, GS = Cfg::GS, GW = Cfg::GW;
  constexpr int KG = Cfg::KG;
  constexpr uint32_t ONE2 = Int3Traits<T>::kOne2;
  constexpr int POS = Int3Traits<T>::kPos;

  extern __shared__ __align__(16) uint8_t smem[];
  const uint32_t s_base = smem_u32(smem);
  const uint32_t s_ut0 = s_base + Cfg::SMEM_BASE;
  float* const ts_s = reinterpret_cast<float*>(smem + Cfg::SMEM_BASE + Cfg::UT_BYTES);

  const int tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int wk = warp & 1, wn = warp >> 1;
  const int g = lane >> 2, t = lane & 3;
  const int hw = t >> 1;

  const int N = p.N, K = p.K, R = p.R;
  const int n0 = blockIdx.x * BN;
  const int split = blockIdx.y;
  // rows m0 .. M-1 (at most BM of them) are this block's; dense: M = p.M
  int M = p.M, m0 = blockIdx.z * BM;
  const int32_t* qptr = p.q;
  const T* sg = reinterpret_cast<const T*>(p.scales);
  const T* zg = reinterpret_cast<const T*>(p.zeros);
  const T* utg = reinterpret_cast<const T*>(p.ut);
  if (p.tiles != nullptr) {
    const int4 tl = p.tiles[blockIdx.z];
    if (tl.x < 0) return;  // whole block, before any barrier
    m0 = tl.y;
    M = tl.z;
    qptr += tl.x * p.q_estride;
    sg += tl.x * p.s_estride;
    zg += tl.x * p.s_estride;
    if (utg != nullptr) utg += tl.x * p.ut_estride;
  }
  const int m_valid = min(BM, M - m0);
  const int total_stages = K / Cfg::BK;
  const int st_begin = split * p.stages_per_split;
  const int st_end = min(total_stages, st_begin + p.stages_per_split);
  const int ns = max(0, st_end - st_begin);
  const int q_row_bytes = K * 3 / 8;
  const int groups_per_row = K / G;

  const uint8_t* qb = reinterpret_cast<const uint8_t*>(qptr);
  const T* xg = reinterpret_cast<const T*>(p.x);

  // rank chunks handled by this block: split, split + splits, ...
  const int r_chunks = (R + Cfg::RC - 1) / Cfg::RC;
  const int nc = (R > 0 && split < r_chunks) ? (r_chunks - split + p.splits - 1) / p.splits : 0;

  // ---------------- loaders (per-thread descriptors computed once) ----------------
  constexpr int WU = Cfg::WU, SU = Cfg::SU, XU = Cfg::XU, CU = Cfg::CU, XPR = Cfg::XPR;
  uint32_t w_soff[WU];
  const uint8_t* w_src[WU];
#pragma unroll
  for (int i = 0; i < WU; ++i) {
    const int u = tid + i * THREADS;
    const int row = u / 3, part = u - row * 3;
    const bool ok = (u < BN * 3) && (n0 + row < N);
    w_soff[i] = ok ? static_cast<uint32_t>(row * Cfg::W_ROW + part * 16) : 0xFFFFFFFFu;
    w_src[i] = qb + (ok ? static_cast<size_t>(n0 + row) * q_row_bytes + part * 16 : 0);
  }
  uint32_t s_soff[SU];
  const T* s_src[SU];  // row start (halfword index n * groups_per_row) + window
  int s_par[SU];       // parity of the row start (G = 128 only: one group per stage)
#pragma unroll
  for (int i = 0; i < SU; ++i) {
    const int u = tid + i * THREADS;
    const int arr = u / (BN * GW);
    const int rem = u - arr * (BN * GW);
    const int row = rem / GW, w = rem - row * GW;
    const bool ok = (u < 2 * BN * GW) && (n0 + row < N);
    s_soff[i] = ok ? static_cast<uint32_t>((arr * BN * GW + row * GW + w) * 4) : 0xFFFFFFFFu;
    s_src[i] = (arr ? zg : sg) + (ok ? static_cast<size_t>(n0 + row) * groups_per_row + 2 * w : 0);
    s_par[i] = ok ? static_cast<int>((static_cast<size_t>(n0 + row) * groups_per_row) & 1) : 0;
  }
  uint32_t x_soff[XU];
  int x_goff[XU];
#pragma unroll
  for (int i = 0; i < XU; ++i) {
    const int u = tid + i * THREADS;
    const int row = u / XPR, piece = u - row * XPR;
    const bool ok = (u < BM * XPR) && (row < m_valid);
    if (Cfg::NATURAL) {
      x_soff[i] = ok ? static_cast<uint32_t>(row * Cfg::X_ROW + piece * 16) : 0xFFFFFFFFu;
      x_goff[i] = row * K + piece * 8;
    } else {  // 64-byte chunks swapped in pairs on odd rows (bank spread of the A loads)
      const int cs = (piece >> 2) ^ (row & 1);
      x_soff[i] = ok ? static_cast<uint32_t>(row * Cfg::X_ROW + cs * 64 + (piece & 3) * 16) : 0xFFFFFFFFu;
      x_goff[i] = row * K + piece * 8;
    }
  }
  // scale conversion items: (group of the stage, row); parity of the row's first halfword (G=128)
  int cv_row[CU], cv_gl[CU], cv_par[CU];
#pragma unroll
  for (int i = 0; i < CU; ++i) {
    const int it_ = tid + i * THREADS;
    cv_gl[i] = it_ / BN;
    cv_row[i] = it_ - cv_gl[i] * BN;
    const bool ok = (it_ < GS * BN) && (n0 + cv_row[i] < N);
    if (!ok) cv_gl[i] = -1;
    cv_par[i] = ok ? static_cast<int>((static_cast<size_t>(n0 + cv_row[i]) * groups_per_row) & 1) : 0;
  }
  const T* x_base = xg + static_cast<size_t>(m0) * K;

  auto load_stage = [&](int st_local, int buf) {
    const int st = st_begin + st_local;
    const uint32_t sb = s_base + buf * Cfg::STAGE_BYTES;
    const size_t wofs = static_cast<size_t>(st) * Cfg::W_ROW;
#pragma unroll
    for (int i = 0; i < WU; ++i)
      if (w_soff[i] != 0xFFFFFFFFu) cp_async16_pf(sb + w_soff[i], w_src[i] + wofs);
    const T* xs0 = x_base + st * Cfg::BK;
#pragma unroll
    for (int i = 0; i < XU; ++i) {
      if (x_soff[i] != 0xFFFFFFFFu) {
        cp_async16(sb + Cfg::W_BYTES + x_soff[i], xs0 + x_goff[i]);
      }
    }
    // windows of 4 bytes; for G = 128 (one group per stage) the aligned window holding the group
    const int g0 = st * GS;
#pragma unroll
    for (int i = 0; i < SU; ++i) {
      if (s_soff[i] != 0xFFFFFFFFu) {
        // GS >= 2: the stage's first halfword index is even; GS == 1: align the window down
        const int adj = (GS == 1) ? (s_par[i] ^ (st & 1)) : 0;
        cp_async4(sb + Cfg::W_BYTES + Cfg::X_BYTES + s_soff[i], s_src[i] + g0 - adj);
      }
    }
  };

  // raw scales of stage st_local (in buffer buf) -> fp32 (8 s, s * (z + 8)) in fs buffer fbuf: a group's
  // sum of x (1 + q / 8) times 8 s, less s (8 + z) sum x, is s sum x (q - z)
  auto convert_scales = [&](int st_local, int buf, int fbuf) {
    const int st = st_begin + st_local;
    const uint8_t* ss = smem + buf * Cfg::STAGE_BYTES + Cfg::W_BYTES + Cfg::X_BYTES;
    const T* rs = reinterpret_cast<const T*>(ss);
    const T* rz = reinterpret_cast<const T*>(ss + BN * GW * 4);
    float2* fs = reinterpret_cast<float2*>(smem + Cfg::PIPE_BYTES) + fbuf * GS * BN;
#pragma unroll
    for (int i = 0; i < CU; ++i) {
      if (cv_gl[i] < 0) continue;
      const int row = cv_row[i], gl = cv_gl[i];
      const int hoff = (GS == 1) ? (cv_par[i] ^ (st & 1)) : 0;
      const float s = to_float(rs[row * GW * 2 + hoff + gl]);
      const float z = to_float(rz[row * GW * 2 + hoff + gl]);
      fs[gl * BN + row] = make_float2(s * kInt3Unit, s * (z + kInt3Unit));
    }
  };

  auto load_ut_chunk = [&](int jj, uint32_t dst) {
    const int chunk = split + jj * p.splits;
    const int r0 = chunk * Cfg::RC;
    for (int u = tid; u < Cfg::RC * (BN / 8); u += THREADS) {
      const int rl = u / (BN / 8), un = u - rl * (BN / 8);
      const int r = r0 + rl, n = n0 + un * 8;
      const bool ok = (r < R) && (n < N);
      const T* src = ok ? utg + static_cast<size_t>(r) * N + n : utg;
      cp_async16_zfill(dst + rl * (BN * 2) + ((un ^ (rl & 7)) * 16), src, ok);
    }
  };

  // zero the x rows that are never loaded (rows >= M in the last m block)
  if (m_valid < BM) {
    for (int s = 0; s < STAGES; ++s) {
      uint4* xb = reinterpret_cast<uint4*>(smem + s * Cfg::STAGE_BYTES + Cfg::W_BYTES + m_valid * Cfg::X_ROW);
      for (int i = tid; i < (BM - m_valid) * Cfg::X_ROW / 16; i += THREADS) xb[i] = make_uint4(0, 0, 0, 0);
    }
  }

  float acc[MT][NT][4];
#pragma unroll
  for (int a = 0; a < MT; ++a)
#pragma unroll
    for (int b = 0; b < NT; ++b)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[a][b][c] = 0.f;

  // ---------------- prologue ----------------
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < ns) load_stage(s, s);
    if (s == 0 && nc > 0) load_ut_chunk(0, s_ut0);
    cp_async_commit();
  }
  cp_async_wait<STAGES - 2>();
  __syncthreads();
  if (ns > 0) convert_scales(0, 0, 0);

  const float zero4[4] = {0.f, 0.f, 0.f, 0.f};

  // ---------------- main loop ----------------
  for (int it = 0; it < ns; ++it) {
    cp_async_wait<STAGES - 3>();
    __syncthreads();
    {
      const int nxt = it + STAGES - 1;
      if (nxt < ns) load_stage(nxt, nxt % STAGES);
      cp_async_commit();
    }
    if (it + 1 < ns) convert_scales(it + 1, (it + 1) % STAGES, (it + 1) & 1);

    const int buf = it % STAGES;
    const uint8_t* sw = smem + buf * Cfg::STAGE_BYTES;
    const uint8_t* sx = sw + Cfg::W_BYTES;
    const uint8_t* sfs = smem + Cfg::PIPE_BYTES + ((it & 1) * GS * BN) * 8;

    if constexpr (Cfg::NATURAL) {
      // ---- G >= 64: one 64-slice per warp; thread t owns half (t >> 1) of chunk (t & 1): 8 pairs ----
      const int cq = t & 1;  // chunk of the slice
      const int hq_ = t >> 1;  // pairs 8*hq_ .. 8*hq_ + 7 of the chunk (k 16*hq_ .. 16*hq_ + 15)
      uint32_t af[MT][4][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const uint8_t* xr = sx + (mt * 16 + g) * Cfg::X_ROW + wk * 128 + cq * 64 + hq_ * 32;
        const uint4 a0 = lds128(xr), a1 = lds128(xr + 16);
        const uint4 b0 = lds128(xr + 8 * Cfg::X_ROW), b1 = lds128(xr + 8 * Cfg::X_ROW + 16);
        const uint32_t ra[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
        const uint32_t rb[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
        for (int s_ = 0; s_ < 4; ++s_) {  // k16 step s_: pairs 2 s_ (k slots 2t, 2t+1) and 2 s_ + 1 (2t+8, 2t+9)
          af[mt][s_][0] = ra[2 * s_];
          af[mt][s_][1] = rb[2 * s_];
          af[mt][s_][2] = ra[2 * s_ + 1];
          af[mt][s_][3] = rb[2 * s_ + 1];
        }
      }
      float xs[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma16816<T>(xs[mt], af[mt][0], ONE2, ONE2, zero4);
#pragma unroll
        for (int s_ = 1; s_ < 4; ++s_) mma16816<T>(xs[mt], af[mt][s_], ONE2, ONE2, xs[mt]);
      }
      const int gl = (64 * wk) / G;
#pragma unroll
      for (int i = 0; i < NT; ++i) {
        const int row = (wn * NT + i) * 8 + g;
        const uint8_t* wrow = sw + row * Cfg::W_ROW + (2 * wk + cq) * 12;
        uint32_t b[8];
        half_chunk_pairs<POS>(lds32(wrow + 8 * hq_), lds32(wrow + 4), lds32(wrow + 8 - 8 * hq_), hq_, ONE2, b);
        float accg[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma16816<T>(accg[mt], af[mt][0], b[0], b[1], zero4);
#pragma unroll
          for (int s_ = 1; s_ < 4; ++s_) mma16816<T>(accg[mt], af[mt][s_], b[2 * s_], b[2 * s_ + 1], accg[mt]);
        }
        const int nl = (wn * NT + i) * 8 + 2 * t;
        const float4 f = lds128f(sfs + (gl * BN + nl) * 8);  // s0, sz0, s1, sz1
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          float* a = acc[mt][i];
          a[0] = fmaf(f.x, accg[mt][0], a[0]);
          a[0] = fmaf(-f.y, xs[mt][0], a[0]);
          a[1] = fmaf(f.z, accg[mt][1], a[1]);
          a[1] = fmaf(-f.w, xs[mt][1], a[1]);
          a[2] = fmaf(f.x, accg[mt][2], a[2]);
          a[2] = fmaf(-f.y, xs[mt][2], a[2]);
          a[3] = fmaf(f.z, accg[mt][3], a[3]);
          a[3] = fmaf(-f.w, xs[mt][3], a[3]);
        }
      }
    } else {
      // ---- G == 32: thread t owns 4 of the 8 code pairs of each chunk ----
      float accg[MT][NT][4];
      float xs[MT][4];

#pragma unroll
    for (int cc = 0; cc < 2; ++cc) {
      const int c = 2 * wk + cc;  // 32-chunk of the stage
      // A fragments (x), two k16 steps (sub) per chunk
      uint32_t af[MT][2][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const int ra = mt * 16 + g;
        const int cs = c ^ (g & 1);  // (ra & 1) == (ra + 8) & 1 == g & 1
        // thread t: pairs 4t .. 4t + 3 of the chunk (k 8t .. 8t + 7), step sub: pairs 4t + 2 sub, + 1
        const uint4 va = lds128(sx + ra * Cfg::X_ROW + cs * 64 + t * 16);
        const uint4 vb = lds128(sx + (ra + 8) * Cfg::X_ROW + cs * 64 + t * 16);
        af[mt][0][0] = va.x;
        af[mt][0][1] = vb.x;
        af[mt][0][2] = va.y;
        af[mt][0][3] = vb.y;
        af[mt][1][0] = va.z;
        af[mt][1][1] = vb.z;
        af[mt][1][2] = va.w;
        af[mt][1][3] = vb.w;
      }
      const bool group_start = (KG == 32) || (cc == 0);
      // row sums of x over the group (ones matrix as B)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        if (group_start)
          mma16816<T>(xs[mt], af[mt][0], ONE2, ONE2, zero4);
        else
          mma16816<T>(xs[mt], af[mt][0], ONE2, ONE2, xs[mt]);
        mma16816<T>(xs[mt], af[mt][1], ONE2, ONE2, xs[mt]);
      }
      // B fragments (dequantized weights) and the products
#pragma unroll
      for (int i = 0; i < NT; ++i) {
        const int row = (wn * NT + i) * 8 + g;
        const uint8_t* wrow = sw + row * Cfg::W_ROW + c * 12;
        uint32_t r4[4];
        quarter_chunk_pairs<POS>(lds32(wrow + 8 * hw), lds32(wrow + 4), lds32(wrow + 8 - 8 * hw), t, ONE2, r4);
        const uint32_t b[2][2] = {{r4[0], r4[1]}, {r4[2], r4[3]}};
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          if (group_start)
            mma16816<T>(accg[mt][i], af[mt][0], b[0][0], b[0][1], zero4);
          else
            mma16816<T>(accg[mt][i], af[mt][0], b[0][0], b[0][1], accg[mt][i]);
          mma16816<T>(accg[mt][i], af[mt][1], b[1][0], b[1][1], accg[mt][i]);
        }
      }
      // apply the group's affine map in fp32
      if (KG == 32 || cc == 1) {
        const int gl = (32 * c) / G;
#pragma unroll
        for (int i = 0; i < NT; ++i) {
          const int nl = (wn * NT + i) * 8 + 2 * t;
          const float4 f = lds128f(sfs + (gl * BN + nl) * 8);  // s0, sz0, s1, sz1
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            float* a = acc[mt][i];
            const float* ag = accg[mt][i];
            a[0] = fmaf(f.x, ag[0], a[0]);
            a[0] = fmaf(-f.y, xs[mt][0], a[0]);
            a[1] = fmaf(f.z, ag[1], a[1]);
            a[1] = fmaf(-f.w, xs[mt][1], a[1]);
            a[2] = fmaf(f.x, ag[2], a[2]);
            a[2] = fmaf(-f.y, xs[mt][2], a[2]);
            a[3] = fmaf(f.z, ag[3], a[3]);
            a[3] = fmaf(-f.w, xs[mt][3], a[3]);
          }
        }
      }
    }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // pipeline area free from here on

  // ---------------- low-rank term: acc += t[:, chunk] @ ut[chunk, tile] ----------------
  if (nc > 0) {
    // launched programmatically after the kernel computing t (sm_90), this block may have streamed its
    // weights while t was in flight: wait for it here (returns at once after a normal launch)
    grid_dep_wait();
    constexpr int P = Cfg::UT_RING;  // ring of P + 1 buffers: the ut region and P in the pipe area
    auto ut_buf = [&](int jj) -> uint32_t {
      const int b = jj % (P + 1);
      return b == 0 ? s_ut0 : s_base + (b - 1) * Cfg::UT_BYTES;
    };
    for (int jj = 1; jj < P; ++jj) {
      if (jj < nc) load_ut_chunk(jj, ut_buf(jj));
      cp_async_commit();
    }
    for (int jj = 0; jj < nc; ++jj) {
      cp_async_wait<P - 1>();
      __syncthreads();  // ut chunk jj landed; every warp is done with the previous chunk's t
      if (jj + P < nc) load_ut_chunk(jj + P, ut_buf(jj + P));
      cp_async_commit();
      const uint32_t ub = ut_buf(jj);
      const int r_base = (split + jj * p.splits) * Cfg::RC;
      {
        // stage t[rows, chunk]: the whole block sums the t_splits partials in a fixed order, loads
        // independent across elements and coalesced along r (the per-thread global sums this
        // replaces were a chain of dependent loads per rank)
        constexpr int TS_PER = (BM * Cfg::RC + THREADS - 1) / THREADS;
        float tv[TS_PER];
#pragma unroll
        for (int u = 0; u < TS_PER; ++u) tv[u] = 0.f;
        const float* tp = p.t;
#pragma unroll 4
        for (int ts = 0; ts < p.t_splits; ++ts, tp += p.t_split_stride) {
#pragma unroll
          for (int u = 0; u < TS_PER; ++u) {
            const int idx = tid + u * THREADS;
            const int ml = idx / Cfg::RC, c = idx - ml * Cfg::RC;
            const int m = m0 + ml, r = r_base + c;
            if (idx < BM * Cfg::RC && m < M && r < R) tv[u] += tp[static_cast<size_t>(m) * R + r];
          }
        }
#pragma unroll
        for (int u = 0; u < TS_PER; ++u) {
          const int idx = tid + u * THREADS;
          const int ml = idx / Cfg::RC, c = idx - ml * Cfg::RC;
          if (idx < BM * Cfg::RC) ts_s[ml * Cfg::TS_LD + c] = tv[u];
        }
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < 2; ++kk) {
        const int ks = 2 * kk + wk;  // k16 step of the chunk handled by this warp
        const int rk = r_base + ks * 16;
        if (rk >= R) continue;
        // A: t rows, split into hi + lo halves
        uint32_t ahi[MT][4], alo[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
          for (int half_ = 0; half_ < 2; ++half_) {      // rows g, g + 8
#pragma unroll
            for (int kh = 0; kh < 2; ++kh) {             // cols 2t.., 2t + 8..
              const float2 tv2 = *reinterpret_cast<const float2*>(
                  ts_s + (mt * 16 + g + 8 * half_) * Cfg::TS_LD + (rk - r_base) + 2 * t + 8 * kh);
              const int reg = half_ + 2 * kh;
              split_hi_lo<T>(tv2.x, tv2.y, ahi[mt][reg], alo[mt][reg]);
            }
          }
        }
#pragma unroll
        for (int i = 0; i < NT; i += 2) {
          // ldmatrix x4 trans: matrices (k 0-7, tile i), (k 8-15, tile i), (k 0-7, i+1), (k 8-15, i+1)
          const int mi = lane >> 3, rr = lane & 7;
          const int rl = ks * 16 + (mi & 1) * 8 + rr;
          const int un = (wn * NT + i + (mi >> 1));
          uint32_t bfr[4];
          if (NT >= 2) {
            ldmatrix_x4_trans(bfr, ub + rl * (BN * 2) + ((un ^ (rl & 7)) * 16));
          }
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            mma16816<T>(acc[mt][i], ahi[mt], bfr[0], bfr[1], acc[mt][i]);
            mma16816<T>(acc[mt][i], alo[mt], bfr[0], bfr[1], acc[mt][i]);
            mma16816<T>(acc[mt][i + 1], ahi[mt], bfr[2], bfr[3], acc[mt][i + 1]);
            mma16816<T>(acc[mt][i + 1], alo[mt], bfr[2], bfr[3], acc[mt][i + 1]);
          }
        }
      }
    }
    cp_async_wait<0>();
    __syncthreads();
  }

  // ---------------- reduce the two K-warps ----------------
  float* red = reinterpret_cast<float*>(smem);
  constexpr int E = MT * NT * 4;
  if (wk == 1) {
#pragma unroll
    for (int a = 0; a < MT; ++a)
#pragma unroll
      for (int b = 0; b < NT; ++b)
#pragma unroll
        for (int c = 0; c < 4; ++c) red[(wn * E + (a * NT + b) * 4 + c) * 32 + lane] = acc[a][b][c];
  }
  __syncthreads();
  if (wk == 1) return;
#pragma unroll
  for (int a = 0; a < MT; ++a)
#pragma unroll
    for (int b = 0; b < NT; ++b)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[a][b][c] += red[(wn * E + (a * NT + b) * 4 + c) * 32 + lane];

  // ---------------- epilogue ----------------
  T* yg = reinterpret_cast<T*>(p.y);
  const T* bg = reinterpret_cast<const T*>(p.bias);
  if (p.splits == 1) {
#pragma unroll
    for (int a = 0; a < MT; ++a)
#pragma unroll
      for (int b = 0; b < NT; ++b) {
        const int n = n0 + (wn * NT + b) * 8 + 2 * t;
        if (n >= N) continue;
        float b0 = 0.f, b1 = 0.f;
        if (bg) {
          b0 = to_float(bg[n]);
          b1 = to_float(bg[n + 1]);
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int m = m0 + a * 16 + g + 8 * h;
          if (m < M)
            *reinterpret_cast<uint32_t*>(yg + static_cast<size_t>(m) * N + n) =
                pack2<T>(acc[a][b][2 * h] + b0, acc[a][b][2 * h + 1] + b1);
        }
      }
    return;
  }

  // split-K: write the partial, the last block of the tile sums all partials in a fixed order
  const size_t MN = static_cast<size_t>(p.M) * N;  // partials are [splits, p.M, N] (global rows)
#pragma unroll
  for (int a = 0; a < MT; ++a)
#pragma unroll
    for (int b = 0; b < NT; ++b) {
      const int n = n0 + (wn * NT + b) * 8 + 2 * t;
      if (n >= N) continue;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = m0 + a * 16 + g + 8 * h;
        if (m < M)
          __stcg(reinterpret_cast<float2*>(p.ws + split * MN + static_cast<size_t>(m) * N + n),
                 make_float2(acc[a][b][2 * h], acc[a][b][2 * h + 1]));
      }
    }
  __threadfence();
  // only the wk == 0 warps are left: a named barrier over them
  asm volatile("bar.sync 1, %0;\n" ::"r"(THREADS / 2));
  __shared__ int s_last;
  const int tile = blockIdx.z * gridDim.x + blockIdx.x;
  if (tid == 0) {
    const int prev = atomicAdd(p.counters + tile, 1);
    s_last = (prev == p.splits - 1);
  }
  asm volatile("bar.sync 1, %0;\n" ::"r"(THREADS / 2));
  if (!s_last) return;
  __threadfence();
#pragma unroll
  for (int a = 0; a < MT; ++a)
#pragma unroll
    for (int b = 0; b < NT; ++b) {
      const int n = n0 + (wn * NT + b) * 8 + 2 * t;
      if (n >= N) continue;
      float b0 = 0.f, b1 = 0.f;
      if (bg) {
        b0 = to_float(bg[n]);
        b1 = to_float(bg[n + 1]);
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = m0 + a * 16 + g + 8 * h;
        if (m >= M) continue;
        float s0 = b0, s1 = b1;
        for (int s = 0; s < p.splits; ++s) {
          const float2 v = __ldcg(reinterpret_cast<const float2*>(p.ws + s * MN + static_cast<size_t>(m) * N + n));
          s0 += v.x;
          s1 += v.y;
        }
        *reinterpret_cast<uint32_t*>(yg + static_cast<size_t>(m) * N + n) = pack2<T>(s0, s1);
      }
    }
}

}  // namespace milo
