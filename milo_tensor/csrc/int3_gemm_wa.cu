// Tensor-core GEMM with the weight as the mma A operand, dequantized in registers (the dense op's tile 7;
// int3_linear.cu says where it runs by default, MILO_INT3_CFG=7 forces it):
//
//   y[M, N] = x[M, K] @ deq(Q)[N, K]^T + t[M, R] @ ut[R, N] (+ bias),
//   deq(Q)[n, k] = (code - zeros[n, k / G]) * scales[n, k / G],  t = x @ V^T (fp32, computed before)
//
// Why: int3_gemm_kernel takes x as A and applies each group's affine map in fp32 after the mma (two
// accumulator sets, the sums of x per group), so every further 16 rows of x cost a whole group-end pass;
// the decode kernel's mmas take two rows of x each (group purity through B's columns). Here the mma
// computes y^T = deq(Q) x^T: each warp owns 16 weight rows (output features) and dequantizes them into
// its A registers, w = (q - z) * s (WaDequant: bf16 in fp32, rounded once; fp16 in half2), and one A
// fragment serves BT / 8 mmas, one per 8 rows of x (BT = 16, 32 or 64 rows of x per block). No per-group
// pass, no second accumulator set.
//
// The k order inside a 128-k stage is permuted so that a lane's A registers are code pairs at compile-time
// positions: lane (g, t) of a warp takes, in k16 step s (0..7), pairs 2s and 2s + 1 of storage chunk t (32
// codes = 3 words, format 2) of its rows g and g + 8. The mma's k slots 2t, 2t + 1 / 2t + 8, 2t + 9 then
// stand for k 32t + 4s + {0, 1} / {2, 3}, and the lane's B registers are x[row][32t + 4s .. + 3]: one 8-byte
// shared load from x in natural order (rows of 256 bytes, 16-byte units XOR-swizzled by row & 7: a warp's
// loads take the minimum two wavefronts). The mma sums over k in any order, so no x is permuted.
//
// Block: 8 warps = 128 output features, BT rows of x, a 4-stage cp.async ring of 128-k stages (x: BT x 256
// bytes, codes: 128 x 48 bytes, each row's scales and zeros of the stage: 2 x 128 x 8 bytes). Split-K over
// blockIdx.z where the blocks do not fill the GPU, reduced by the last split to arrive at a tile (fixed
// order); the low-rank term by mma in the epilogue (U^T chunk as A by transposed ldmatrix, t as B in hi +
// lo halves; t's split partials from the rows kernel summed there, after griddepcontrol.wait when launched
// programmatically behind it), y staged in shared memory and written in 16-byte rows.
//
// Tile 8 (WG = true, sm_90a): the same blocks, codes, dequantization, k order and epilogue, with the mmas
// issued as warpgroup MMAs (wgmma, A from registers, B from shared memory): warps 0-3 and 4-7 are two
// warpgroups of 64 weight rows, and one m64nBTk16 per k16 step and warpgroup replaces BT / 8 mma.sync per
// warp. Why: with mma.sync every warp reads all BT rows of x from shared memory for its own 16 weight
// rows (128 KB a stage at BT = 64, the SM's shared-memory bandwidth for ~1000 cycles), and 8 warps per
// block leave the mma chain's latency exposed; a wgmma reads B once per warpgroup and runs
// asynchronously beside the next stage's copies. B must be in the wgmma's canonical layout (core matrices
// of 8 rows x 8 k), so each landed stage of x (tile 7's ring) is rewritten in shared memory in the k order
// above: a thread reads four 16-byte pieces of a row (k 8j + 32t' .. + 7 for t' = 0..3) and stores, for each
// of their 4 words w, the words of equal w as one 16-byte core-matrix row (core matrix 4j + w holds k pairs
// 16t' + 4j + w, i.e. the mma's k slots of step s = 2j + (w >> 1), half w & 1). Loading x into registers a
// stage ahead instead left the warps waiting on those loads (ncu, H100 2026-12-06: 3.1 of 7.8 cycles per
// issued instruction on long scoreboard). BT = 16, 32, 64 or 128 (m64n16k16 .. m64n128k16). Warpgroup 0
// issues the copies, warpgroup 1 rewrites x: the proxy fence after the rewrite waits for the fencing warp's
// copies.
//
// Tile 9 (WS = true): tile 8 warp-specialized, 384 threads. Warpgroups 0 and 1 consume as in tile 8;
// warpgroup 2's warps 0-1 copy stages into a ring of copy slots and count their landing on the slot's
// `landed` mbarrier, its warps 2-3 rewrite x into one of 3 buffers in the wgmma layout and mark it full, the
// consumers free the copy slot once read and the x buffer once its wgmmas are done. No block barrier in the
// main loop.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/util/Exception.h>

#include "int3_gemm.cuh"
#include "int3_launch.h"
#include "wgmma.cuh"

#include <algorithm>
#include <type_traits>

namespace milo {
namespace {

constexpr int kWaBN = kInt3WaBN, kWaBK = 128, kWaStages = 4, kWaThreads = 256;
constexpr int kWaQRow = kWaBK * 3 / 8;  // 48 bytes of codes per weight row and stage
constexpr int kWaMinStagesPerSplit = 4;  // 512 k

template <int BT>
struct WaTile {
  static_assert(BT % 16 == 0 && BT * 16 % kWaThreads == 0, "x rows per block: 16, 32, 64 or 128");
  static constexpr int NJ = BT / 8;                          // n8 tiles (8 rows of x each)
  static constexpr int XBytes = BT * kWaBK * 2;              // x of a stage: BT rows of 256 bytes
  static constexpr int QBytes = kWaBN * kWaQRow;            // codes of a stage: 6 KB
  static constexpr int SZBytes = 2 * kWaBN * 8;              // its scales, then zeros: 8 bytes a row each
  static constexpr int StageBytes = XBytes + QBytes + SZBytes;
  static constexpr int Smem = kWaStages * StageBytes;        // 96 KB at BT = 64
  static constexpr int SmemWG = Smem + 2 * XBytes;           // tile 8: + two stages of x in the wgmma layout
  static_assert(SmemWG <= 227 * 1024, "a block's shared memory on sm_90: 227 KB");
};

// tile 9's rings: copy slots of [x as loaded | codes | scales, zeros] (tile 7's stages), as many as fit
// beside XBufs buffers of x in the wgmma layout (tile 8 has 4 and 2; a third buffer lets the rewrite of
// stage st start once stage st - 3's wgmmas are done, a stage before the consumers need it)
template <int BT>
struct WsRing {
  static constexpr int XBufs = 3;
  static constexpr int XBufBytes = XBufs * WaTile<BT>::XBytes;
  static constexpr int Stages = std::min(8, (227 * 1024 - 256 - XBufBytes) / WaTile<BT>::StageBytes);  // 8 at BT <= 32, 7 at 64, 3 at 128
  static constexpr int Smem = Stages * WaTile<BT>::StageBytes + XBufBytes;
  static_assert(Stages >= 3, "tile 9 needs 3 copy slots");
};
constexpr int kWsThreads = kWaThreads + 128;  // tile 9: two consumer warpgroups, then the producer's


// byte offset of 16-byte unit `unit` of row `row` in a tile of 256-byte rows (16 units)
__device__ __forceinline__ uint32_t swz256(int row, int unit) {
  return static_cast<uint32_t>(row * 256 + ((unit ^ (row & 7)) << 4));
}
// the same in a tile of 128-byte rows (8 units)
__device__ __forceinline__ uint32_t swz128(int row, int unit) {
  return static_cast<uint32_t>(row * 128 + ((unit ^ (row & 7)) << 4));
}

__device__ __forceinline__ uint2 lds64(uint32_t addr) {
  uint2 v;
  asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "r"(addr) : "memory");
  return v;
}

// A register of two dequantized weights (codes 2p, 2p + 1 of a chunk) from a row's scale s and c0 = -z s.
// Both start from the pair as the half2 1024 + code (one AND-OR of the word with the exponent of 1024).
// bf16: each half widened to fp32 (exact), times s plus c1 = c0 - 1024 s in fp32, rounded once to bf16: 6
// instructions a pair (the code as a float through a byte permute and a subtraction took 8); c1's fp32
// rounding moves a weight by at most 2^-24 x 1032 s, under half a bf16 ulp for weights past 0.03 s, so the
// result is the dequant + cuBLAS path's fmaf(code, s, c0) except where that lies within this distance of a
// bf16 rounding boundary (one ulp then). fp16: minus 1024
// (exact), times s plus c0 in half2: 3 instructions a pair; c0 rounded to fp16 adds at most half an fp16 ulp
// of z s to a weight.
template <typename T>
struct WaDequant {
  float s, c1;
  __device__ __forceinline__ WaDequant(float s_, float c0) : s(s_), c1(fmaf(-1024.f, s_, c0)) {}
  __device__ __forceinline__ uint32_t pair(const uint32_t (&wd)[3], int p) const {
    const uint32_t h = chunk_pair(wd, p, 0, 0x64006400u);  // (1024 + code 2p, 1024 + code 2p + 1)
    const float2 q = __half22float2(*reinterpret_cast<const __half2*>(&h));
    return pack2<T>(fmaf(q.x, s, c1), fmaf(q.y, s, c1));
  }
};
template <>
struct WaDequant<half> {
  __half2 s2, c2;
  __device__ __forceinline__ WaDequant(float s, float c0) : s2(__float2half2_rn(s)), c2(__float2half2_rn(c0)) {}
  __device__ __forceinline__ uint32_t pair(const uint32_t (&wd)[3], int p) const {
    const uint32_t h = chunk_pair(wd, p, 0, 0x64006400u);  // (1024 + code 2p, 1024 + code 2p + 1)
    const __half2 q2 = __hsub2(*reinterpret_cast<const __half2*>(&h), __float2half2_rn(1024.f));
    const __half2 w2 = __hfma2(q2, s2, c2);
    return *reinterpret_cast<const uint32_t*>(&w2);
  }
};

template <typename T, int G, int BT, bool WG, bool WS>
__global__ void __launch_bounds__(WS ? kWsThreads : kWaThreads, WS || BT >= 128 || (WG && BT >= 64) ? 1 : 2)
    int3_gemm_wa_kernel(const Int3GemmParams p) {
  using Tile = WaTile<BT>;
  constexpr int NJ = Tile::NJ;
  static_assert(!WG || BT == 16 || BT == 32 || BT == 64 || BT == 128, "tile 8 takes 16, 32, 64 or 128 rows of x a block");
  static_assert(!WS || WG, "tile 9 is tile 8 with a producer warpgroup");
  if constexpr (WG) {
    if (!MILO_WGMMA) __trap();  // built without sm_90a: the host launches tile 8 on sm_90 only
  }
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const uint8_t* __restrict__ q = reinterpret_cast<const uint8_t*>(p.q);
  const T* __restrict__ scales = static_cast<const T*>(p.scales);
  const T* __restrict__ zeros = static_cast<const T*>(p.zeros);
  const T* __restrict__ ut = static_cast<const T*>(p.ut);
  const int M = p.M, N = p.N, K = p.K;
  // rows m0 .. m_end - 1 of x and y: row block blockIdx.x of the dense op, or the grouped op's listed tile
  // (an expert's rows; its weights at the expert's strides; expert < 0: an unused slot)
  int m0 = blockIdx.x * BT, m_end = M;
  if (p.tiles != nullptr) {
    const int4 tile = p.tiles[blockIdx.x];
    if (tile.x < 0) return;
    m0 = tile.y;
    m_end = tile.z;
    q += tile.x * p.q_estride * 4;
    scales += tile.x * p.s_estride;
    zeros += tile.x * p.s_estride;
    if (ut != nullptr) ut += tile.x * p.ut_estride;
  }
  extern __shared__ __align__(16) uint8_t smem[];
  const uint32_t s_base = smem_u32(smem);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.y * kWaBN;
  const int st0 = blockIdx.z * p.stages_per_split;  // split z: stages st0 .. st0 + stages - 1
  const int stages = min(K / kWaBK - st0, p.stages_per_split);
  const int64_t q_row_bytes = K * 3 / 8;
  const int groups = K / G;
  const int r_lo = warp * 16 + g;  // the lane's weight rows in the tile: r_lo, r_lo + 8

  // the ring: kStages slots of kSlotBytes (tiles 7 / 8: x, codes, scales and zeros; tile 9 also its x in the
  // wgmma layout). The copies are issued by kLoaders threads (tile 7: all; tile 8: warpgroup 0; tile 9: its
  // producer's first two warps), thread lt, and x is rewritten in the wgmma layout by kPermuters others
  // (tile 8: warpgroup 1; tile 9: the producer's last two warps). Why apart: the proxy fence after the
  // rewrite waits for the fencing warp's copies still in flight (ncu, H100 2026-12-06 17:25 UTC, tile 8 with
  // both in every warp: the fence and the barrier after it held 11% of the stall samples at 14336x4096 M=64,
  // on long scoreboard), and tile 9's producer fenced a stage behind its newest copies every stage.
  constexpr int kStages = WS ? WsRing<BT>::Stages : kWaStages;
  constexpr int kSlotBytes = Tile::StageBytes;
  constexpr int kLoaders = WS ? 64 : (WG ? 128 : kWaThreads);
  constexpr int kPermuters = WS ? 64 : 128;
  static_assert(BT * 16 % kLoaders == 0, "x's 16-byte units split evenly over the loading threads");
  auto slot = [&](int st) { return (st % kStages) * kSlotBytes; };  // stage st's slot, bytes from smem
  auto load_stage = [&](int st, int lt) {
    const uint32_t sb = s_base + slot(st);
#pragma unroll
    for (int i = 0; i < BT * 16 / kLoaders; ++i) {
      const int u = lt + i * kLoaders, row = u >> 4, unit = u & 15;
      const bool ok = m0 + row < m_end;
      const T* src = ok ? x + static_cast<int64_t>(m0 + row) * p.ldx + (st0 + st) * kWaBK + unit * 8 : x;
      cp_async16_zfill(sb + swz256(row, unit), src, ok);
    }
#pragma unroll
    for (int i = 0; i < (kWaBN * 3 + kLoaders - 1) / kLoaders; ++i) {  // 128 rows x 3 pieces of 16 bytes
      const int u = lt + i * kLoaders;
      if (u < kWaBN * 3) {
        const int row = u / 3, part = u - row * 3;
        const bool ok = n0 + row < N;
        const uint8_t* src = ok ? q + (n0 + row) * q_row_bytes + (st0 + st) * kWaQRow + part * 16 : q;
        cp_async16_zfill(sb + Tile::XBytes + row * kWaQRow + part * 16, src, ok);
      }
    }
#pragma unroll
    for (int i = 0; i < 2 * kWaBN / kLoaders; ++i) {  // the stage's scales (u < 128) or zeros of row u % 128: its 128 / G groups
      const int u = lt + i * kLoaders, row = u & (kWaBN - 1), n = n0 + row;
      const T* src = (u < kWaBN ? scales : zeros) + static_cast<int64_t>(n) * groups + (st0 + st) * (kWaBK / G);
      const uint32_t dst = sb + Tile::XBytes + Tile::QBytes + (u >> 7) * (kWaBN * 8) + row * 8;
      if constexpr (G == 128)  // one group: the aligned word holding it (the host aligns scales to 8 bytes)
        cp_async_small_zfill<4>(dst, n < N ? reinterpret_cast<const T*>(reinterpret_cast<uintptr_t>(src) & ~uintptr_t{3}) : scales, n < N);
      else  // 4 (G = 64) or 8 (G = 32) bytes at an aligned start: groups is even, a multiple of 4 at G = 32
        cp_async_small_zfill<kWaBK / G * 2>(dst, n < N ? src : scales, n < N);
    }
  };

  // the dequantization of the lane's row r_lo + 8h and chunk (k 32t .. 32t + 31) in landed stage st: its scale
  // and zero come with the stage by cp.async (loaded from global memory a stage ahead, every barrier and proxy
  // fence of the stage waited for them; ncu, H100 2026-12-06: 30-40% of the stall samples at 14336x4096 M=128)
  auto stage_dequant = [&](int st, int h) {
    const uint8_t* sz = smem + slot(st) + Tile::XBytes + Tile::QBytes;
    // the lane's group among the row's 8 bytes; G = 128: the half of the aligned word (rows 8 apart are 8 x
    // groups elements apart: the same half)
    const int group = G == 128 ? (((st0 + st) + (n0 + r_lo) * groups) & 1) : 32 * t / G;
    const uint8_t* e = sz + (r_lo + 8 * h) * 8 + group * 2;
    const float sc = to_float(*reinterpret_cast<const T*>(e)), zc = to_float(*reinterpret_cast<const T*>(e + kWaBN * 8));
    return WaDequant<T>(sc, -zc * sc);
  };

  float acc[NJ][4];
#pragma unroll
  for (int j = 0; j < NJ; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;

  // tiles 8 / 9: a landed stage's x (tile 7's layout) rewritten in the wgmma's B layout (the header), in
  // one of two buffers after the ring (tile 8) or in its slot (tile 9), by the kPermuters threads: thread task
  // i is row n = task % BT and j = task / BT; it reads k 8j + 32u .. + 7 (u = 0..3) and stores, for each word
  // w, the four words w as one 16-byte core-matrix row (the 8 rows of a quarter warp read 8 distinct bank
  // groups and store one 128-byte core matrix)
  constexpr int kXTasks = WG ? (BT * 4 + kPermuters - 1) / kPermuters : 0;  // BT * 4 < kPermuters: some idle
  constexpr int kXBufs = WS ? WsRing<BT>::XBufs : 2;
  auto wg_x_offset = [&](int st) {  // stage st's x in the wgmma layout (a buffer after the ring), bytes from smem
    return kStages * Tile::StageBytes + (st % kXBufs) * Tile::XBytes;
  };
  auto permute_x = [&](int st, int lt) {
    const uint8_t* const xn = smem + slot(st);
    uint8_t* const xb = smem + wg_x_offset(st);
#pragma unroll
    for (int i = 0; i < kXTasks; ++i) {
      const int task = lt + i * kPermuters, n = task % BT, j = task / BT;
      if (BT * 4 < kPermuters && task >= BT * 4) break;
      uint4 v[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) v[u] = lds128(xn + swz256(n, 4 * u + j));
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        const auto word = [&](int u) { return reinterpret_cast<const uint32_t*>(&v[u])[w]; };
        *reinterpret_cast<uint4*>(xb + ((4 * j + w) * (BT / 8) + (n >> 3)) * 128 + (n & 7) * 16) =
            make_uint4(word(0), word(1), word(2), word(3));
      }
    }
    fence_proxy_async_smem();  // the wgmma reads them through the async proxy (after the barrier)
  };

  // tile 8: the wgmmas a warpgroup keeps in flight, each with its own A registers (the wgmma reads them
  // asynchronously). ptxas computes a stage's 8 A sets ahead of its first wgmma anyway, so with one in flight
  // (the first version) the 8 wgmmas ran one after the other, each waiting for the last; 7 let a stage's
  // wgmmas queue and run on through the next stage's barriers and dequantization (1 block per SM at 64+ rows:
  // the registers are there); 3 at 16-32 rows keep 2 blocks per SM
  constexpr int kWgPending = BT >= 64 ? 7 : 3;
  static_assert(8 % (kWgPending + 1) == 0, "the A ring's phase must repeat every stage");
  uint32_t a_ring[kWgPending + 1][4];

  // stage st's work after it landed: the lane's codes and dequantizers, then per k16 step its A fragment and
  // the mmas (tile 7: mma.sync per 8 rows of x; tiles 8 / 9: one wgmma a warpgroup, from stage st's x in the
  // wgmma layout)
  auto compute_stage = [&](int st) {
    const uint8_t* qs = smem + slot(st) + Tile::XBytes + r_lo * kWaQRow + t * 12;
    const uint32_t w0[3] = {lds32(qs), lds32(qs + 4), lds32(qs + 8)};
    const uint32_t w1[3] = {lds32(qs + 8 * kWaQRow), lds32(qs + 8 * kWaQRow + 4), lds32(qs + 8 * kWaQRow + 8)};
    const WaDequant<T> d0 = stage_dequant(st, 0), d1 = stage_dequant(st, 1);
    // the A fragment of k16 step s: rows r_lo (d0) and r_lo + 8 (d1), the step's two k halves
    auto dequant_a = [&](uint32_t (&a)[4], int s) {
      a[0] = d0.pair(w0, 2 * s);
      a[1] = d1.pair(w1, 2 * s);
      a[2] = d0.pair(w0, 2 * s + 1);
      a[3] = d1.pair(w1, 2 * s + 1);
    };
    if constexpr (WG) {
      // one wgmma per k16 step (core matrices 2s, 2s + 1 of every 8-row group), each dequantized while the
      // ones before it run: up to kWgPending in flight, each holding its own A registers (a ring of
      // kWgPending + 1 sets, indexed by the step: 8 steps a stage keep the ring's phase across stages)
      const uint64_t desc = wgmma_desc_k_major(s_base + wg_x_offset(st), (BT / 8) * 128, 128);
#pragma unroll
      for (int s = 0; s < 8; ++s) {
        uint32_t(&a)[4] = a_ring[s % (kWgPending + 1)];
        dequant_a(a, s);
        wgmma_fence();
        wgmma_rs<T, BT>(acc, a, desc + ((2 * s * (BT / 8) * 128) >> 4));  // the start address field, in 16 bytes
        wgmma_commit();
        wgmma_wait<kWgPending>();  // the step that used the next A set is done
      }
    } else {
      const uint32_t xb = s_base + slot(st);
#pragma unroll
      for (int s = 0; s < 8; ++s) {
        uint32_t a[4];
        dequant_a(a, s);
#pragma unroll
        for (int j = 0; j < NJ; ++j) {  // rows 8j .. 8j + 7 of x: k 32t + 4s .. + 3 of row 8j + g
          const uint2 b = lds64(xb + swz256(8 * j + g, 4 * t + (s >> 1)) + 8 * (s & 1));
          mma16816<T>(acc[j], a, b.x, b.y, acc[j]);
        }
      }
    }
  };

  if constexpr (WS) {
    // tile 9: warpgroup 2 produces: its warps 0-1 copy stage after stage into free copy slots (each copy
    // thread's landing counted by the slot's `landed` barrier), its warps 2-3 rewrite each landed stage's x
    // into a free x buffer and mark it full; warpgroups 0 and 1 consume (wait for the x buffer, compute, free
    // the copy slot, and free the x buffer of the stage before once its wgmmas are done). Why: in tile 8 every
    // warp passes two block barriers a stage, so the copies' issue, the rewrite and each warp's dequantization
    // wait for the slowest warp (ncu, H100 2026-12-06: 26-33% of issue slots busy at 14336x4096 M=64); here
    // each role waits only for its data.
    __shared__ __align__(8) uint64_t ring_bars[2 * kStages + 2 * kXBufs];
    const uint32_t landed0 = smem_u32(ring_bars);       // copy slot landed: the copy threads, by cp.async
    const uint32_t slot_free0 = landed0 + 8 * kStages;  // copy slot read: rewrite threads and consumers
    const uint32_t x_full0 = slot_free0 + 8 * kStages;  // x buffer rewritten: the rewrite threads
    const uint32_t x_free0 = x_full0 + 8 * kXBufs;      // x buffer's wgmmas done: the consumers
    if (tid == 0) {
      for (int b = 0; b < kStages; ++b) {
        mbar_init(landed0 + 8 * b, kLoaders);
        mbar_init(slot_free0 + 8 * b, kPermuters + kWaThreads);
      }
      for (int b = 0; b < kXBufs; ++b) {
        mbar_init(x_full0 + 8 * b, kPermuters);
        mbar_init(x_free0 + 8 * b, kWaThreads);
      }
    }
    __syncthreads();
    // the n-th use of a slot or buffer (n = 0, 1, ...) completes its barrier's phase n: waiters name n & 1
    if (tid >= kWaThreads) {
      const int pt = tid - kWaThreads;
      if (pt < kLoaders) {
        for (int st = 0; st < stages; ++st) {
          if (st >= kStages) mbar_wait(slot_free0 + 8 * (st % kStages), (st / kStages - 1) & 1);
          load_stage(st, pt);
          cp_async_mbar_arrive(landed0 + 8 * (st % kStages));
        }
        cp_async_wait<0>();
      } else {
        for (int st = 0; st < stages; ++st) {
          mbar_wait(landed0 + 8 * (st % kStages), (st / kStages) & 1);
          if (st >= kXBufs) mbar_wait(x_free0 + 8 * (st % kXBufs), (st / kXBufs - 1) & 1);
          permute_x(st, pt - kLoaders);
          mbar_arrive(x_full0 + 8 * (st % kXBufs));
          mbar_arrive(slot_free0 + 8 * (st % kStages));
        }
      }
      return;  // the epilogue is the consumers' (named barrier 2)
    }
    for (int st = 0; st < stages; ++st) {
      mbar_wait(x_full0 + 8 * (st % kXBufs), (st / kXBufs) & 1);
      compute_stage(st);
      mbar_arrive(slot_free0 + 8 * (st % kStages));                // its codes, scales and zeros are read
      if (st > 0) mbar_arrive(x_free0 + 8 * ((st - 1) % kXBufs));  // stage st - 1's wgmmas are done
    }
  } else {
#pragma unroll
    for (int s = 0; s < kWaStages - 1; ++s) {
      if (s < stages && tid < kLoaders) load_stage(s, tid);
      cp_async_commit();
    }
    for (int st = 0; st < stages; ++st) {
      cp_async_wait<kWaStages - 2>();  // stage st landed
      __syncthreads();                 // every warp done with step st - 1: its buffer is free
      const int nx = st + kWaStages - 1;
      if constexpr (WG) {
        // warpgroup 0 copies stage nx while warpgroup 1 rewrites stage st's x into the buffer stage st - 2's
        // wgmmas read (done: at most kWgPending steps, all of st - 1, in flight)
        if (tid < kLoaders) {
          if (nx < stages) load_stage(nx, tid);
        } else {
          permute_x(st, tid - kLoaders);
        }
        cp_async_commit();
        __syncthreads();
      } else {
        if (nx < stages) load_stage(nx, tid);
        cp_async_commit();
      }
      compute_stage(st);
    }
  }
  if constexpr (WG) wgmma_wait<0>();
  cp_async_wait<0>();
  // the epilogue's barriers: the block's, or tile 9's consumers' (its producer has returned)
  auto sync_out = [] {
    if constexpr (WS)
      named_bar_sync(2, kWaThreads);
    else
      __syncthreads();
  };

  // acc[j][2h + e] is y[m0 + 8j + 2t + e][n0 + r_lo + 8h]: f(j, h, e, row, col) for each, row and col in
  // the tile (for_each_frag) or in y, for those inside it (for_each_acc)
  auto for_each_frag = [&](auto&& f) {
#pragma unroll
    for (int j = 0; j < NJ; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int e = 0; e < 2; ++e) f(j, h, e, 8 * j + 2 * t + e, r_lo + 8 * h);
  };
  auto for_each_acc = [&](auto&& f) {
    for_each_frag([&](int j, int h, int e, int row, int col) {
      if (m0 + row < m_end && n0 + col < N) f(j, h, e, m0 + row, n0 + col);
    });
  };

  // split-K: partial tile to the workspace; the last split to arrive sums all of them in split order
  if (p.splits > 1) {
    float* ws = p.ws + static_cast<int64_t>(blockIdx.z) * M * N;
    for_each_acc([&](int j, int h, int e, int row, int col) { ws[static_cast<int64_t>(row) * N + col] = acc[j][2 * h + e]; });
    __threadfence();
    sync_out();
    __shared__ int last;
    int* counter = p.counters + blockIdx.y * gridDim.x + blockIdx.x;
    if (tid == 0) last = atomicAdd(counter, 1) == p.splits - 1;
    sync_out();
    if (!last) return;
    __threadfence();
    for_each_acc([&](int j, int h, int e, int row, int col) {
      float sum = 0.f;
      for (int z = 0; z < p.splits; ++z) sum += __ldcg(p.ws + (static_cast<int64_t>(z) * M + row) * N + col);
      acc[j][2 * h + e] = sum;
    });
  }

  // low-rank term, per 64-rank chunk: y^T[tile] += U[tile, chunk] t[:, chunk]^T by mma with A = U (from ut's
  // chunk rows by transposed ldmatrix) and B = t's rows (hi and lo halves), all staged in the freed ring
  if (p.R > 0) {
    // launched programmatically after the kernel computing t (sm_90), this block may have streamed its
    // weights while t was in flight: wait for it here (returns at once after a normal launch)
    grid_dep_wait();
    // the tile's expert's own rank (Int3GemmParams::ranks; its t is zero past it): the chunks and k16 steps past it
    // are skipped (the tile's expert read again from the list, not held through the main loop)
    const int rk = p.ranks != nullptr && p.tiles != nullptr ? expert_rank(p, __ldg(&p.tiles[blockIdx.x].x)) : p.R;
    const uint32_t s_ut = s_base, s_thi = s_base + 64 * 256, s_tlo = s_thi + BT * 128;
    uint8_t* const thi = smem + 64 * 256;
    uint8_t* const tlo = thi + BT * 128;
    for (int r0 = 0; r0 < rk; r0 += 64) {
      sync_out();  // the buffers are free (main loop, or the previous chunk's mma, done)
#pragma unroll
      for (int i = 0; i < 64 * 16 / kWaThreads; ++i) {  // ut[r0 + r, n0 .. n0 + 127]: 64 rows x 16 units
        const int u = tid + i * kWaThreads, r = u >> 4, unit = u & 15;
        const bool ok = r0 + r < rk && n0 + unit * 8 < N;
        const T* src = ok ? ut + static_cast<int64_t>(r0 + r) * N + n0 + unit * 8 : ut;
        cp_async16_zfill(s_ut + swz256(r, unit), src, ok);
      }
      cp_async_commit();
      for (int u = tid; u < BT * 8; u += kWaThreads) {  // t[m0 + m, r0 .. r0 + 63] as hi + lo: BT rows x 8 units
        const int m = u >> 3, unit = u & 7;
        float v[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = 0.f;
        if (m0 + m < m_end) {  // t's split partials summed in a fixed order
          const float* tp = p.t + static_cast<int64_t>(m0 + m) * p.R;
          for (int ts = 0; ts < p.t_splits; ++ts, tp += p.t_split_stride)
#pragma unroll
            for (int e = 0; e < 8; ++e)
              if (r0 + unit * 8 + e < rk) v[e] += tp[r0 + unit * 8 + e];
        }
        uint32_t hi[4], lo[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) split_hi_lo<T>(v[2 * e], v[2 * e + 1], hi[e], lo[e]);
        *reinterpret_cast<uint4*>(thi + swz128(m, unit)) = make_uint4(hi[0], hi[1], hi[2], hi[3]);
        *reinterpret_cast<uint4*>(tlo + swz128(m, unit)) = make_uint4(lo[0], lo[1], lo[2], lo[3]);
      }
      cp_async_wait<0>();
      sync_out();
#pragma unroll
      for (int ks = 0; ks < 4; ++ks) {
        if (16 * ks >= rk - r0) break;  // the chunk's ranks past the expert's (zero rows, zero t)
        uint32_t a[4];  // U[r_lo-ish rows, ranks 16ks ..]: matrices (features 0-7 | 8-15) x (ranks 0-7 | 8-15)
        ldmatrix_x4_trans(a, s_ut + swz256(16 * ks + (lane & 7) + ((lane >> 4) & 1) * 8, 2 * warp + ((lane >> 3) & 1)));
#pragma unroll
        for (int jj = 0; jj < NJ / 2; ++jj)
#pragma unroll
          for (int half_ = 0; half_ < 2; ++half_) {
            uint32_t b[4];  // rows 16jj .. 16jj + 15 of t: n8 tiles 2jj, 2jj + 1 at ranks 16ks .. + 15
            ldmatrix_x4(b, (half_ ? s_tlo : s_thi) + swz128(16 * jj + (lane & 7) + ((lane >> 4) << 3), 2 * ks + ((lane >> 3) & 1)));
            mma16816<T>(acc[2 * jj], a, b[0], b[1], acc[2 * jj]);
            mma16816<T>(acc[2 * jj + 1], a, b[2], b[3], acc[2 * jj + 1]);
          }
      }
    }
  }

  // bias, then y through shared memory (BT rows x 256 bytes) so each row is written in 16-byte pieces
  const T* __restrict__ bias = static_cast<const T*>(p.bias);
  float b_lo = 0.f, b_hi = 0.f;
  if (bias != nullptr) {
    if (n0 + r_lo < N) b_lo = to_float(bias[n0 + r_lo]);
    if (n0 + r_lo + 8 < N) b_hi = to_float(bias[n0 + r_lo + 8]);
  }
  sync_out();  // the ring (or the low-rank chunk) is no longer read
  T* const sy = reinterpret_cast<T*>(smem);
  for_each_frag([&](int j, int h, int e, int row, int col) {
    sy[row * kWaBN + (((col >> 3) ^ (row & 7)) << 3) + (col & 7)] = from_float<T>(acc[j][2 * h + e] + (h ? b_hi : b_lo));
  });
  sync_out();
  T* __restrict__ y = static_cast<T*>(p.y);
  for (int u = tid; u < BT * 16; u += kWaThreads) {
    const int row = u >> 4, unit = u & 15;
    if (m0 + row < m_end && n0 + unit * 8 < N)
      *reinterpret_cast<uint4*>(y + static_cast<int64_t>(m0 + row) * N + n0 + unit * 8) =
          *reinterpret_cast<const uint4*>(smem + swz256(row, unit));
  }
}

// TILE: 7, 8 or 9 (the kernel's WG = TILE >= 8, WS = TILE == 9)
template <typename T, int G, int BT, int TILE>
void launch_wa(const Int3GemmParams& p, int row_blocks, bool programmatic, cudaStream_t stream) {
  static bool attr_done[64] = {false};
  const int dev = c10::cuda::current_device();
  auto kern = int3_gemm_wa_kernel<T, G, BT, (TILE >= 8), (TILE == 9)>;
  constexpr int kSmem = TILE == 9 ? WsRing<BT>::Smem : TILE == 8 ? WaTile<BT>::SmemWG : WaTile<BT>::Smem;
  if (dev < 64 && !attr_done[dev]) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
    attr_done[dev] = true;
  }
  const dim3 grid(row_blocks, (p.N + kWaBN - 1) / kWaBN, p.splits);
  launch_programmatic_if(kern, grid, dim3(TILE == 9 ? kWsThreads : kWaThreads), kSmem, programmatic, stream, p);
}

template <typename T, int G, int TILE>
void launch_wa_bt(int bt, int row_blocks, const Int3GemmParams& p, bool programmatic, cudaStream_t stream) {
  switch (bt) {
    case 16:
      return launch_wa<T, G, 16, TILE>(p, row_blocks, programmatic, stream);
    case 32:
      return launch_wa<T, G, 32, TILE>(p, row_blocks, programmatic, stream);
    case 64:
      return launch_wa<T, G, 64, TILE>(p, row_blocks, programmatic, stream);
    case 128:  // tiles 8 and 9 only
      if constexpr (TILE >= 8) return launch_wa<T, G, 128, TILE>(p, row_blocks, programmatic, stream);
      [[fallthrough]];
    default:
      TORCH_CHECK(false, "int3_linear: tile ", TILE, TILE >= 8 ? " takes 16, 32, 64 or 128" : " takes 16, 32 or 64",
                  " rows of x a block, not ", bt);
  }
}

template <typename T, int TILE>
void launch_wa_group(int group, int bt, int row_blocks, const Int3GemmParams& p, bool programmatic,
                     cudaStream_t stream) {
  switch (group) {
    case 32:
      return launch_wa_bt<T, 32, TILE>(bt, row_blocks, p, programmatic, stream);
    case 64:
      return launch_wa_bt<T, 64, TILE>(bt, row_blocks, p, programmatic, stream);
    case 128:
      return launch_wa_bt<T, 128, TILE>(bt, row_blocks, p, programmatic, stream);
    default:
      TORCH_CHECK(false, "int3_linear: tiles 7-9 are built for group sizes 32, 64 and 128, not ", group);
  }
}

}  // namespace

int int3_gemm_wa_bt(int rows, bool wg) { return rows <= 16 ? 16 : rows <= 32 ? 32 : rows <= 64 || !wg ? 64 : 128; }

std::pair<int, int> int3_gemm_wa_splits(int tiles, int K, int sms, int forced) {
  const int stages = K / kWaBK;
  // the splits that minimize the stages the busiest SM runs, ceil(blocks / SMs) x stages per split, with at
  // most 2 blocks per SM (one wave) and ties to the fewest (each split writes and re-reads M x N fp32
  // partials). A second co-resident block does not add throughput: H100 2026-12-06, bench_kernel.py
  // --sweep MILO_INT3_SPLITS under MILO_INT3_CFG=7, us at M = 32 / 64: 14336x4096 (112 tiles, 32 stages)
  // 1 split 42.4 / 67.7, 2 splits 47.5 / 81.9, 8 splits 56.1 / 99.7; 4096x14336 (32 tiles, 112 stages) 4
  // splits 46.8 / 80.4, 8 splits 43.3 / 85.3, 6 splits 55.3 / 102.3. The earlier rule (about 3 of 4 slots
  // of 2 per SM) took 2 and 7 splits there: 47.4 / 80.7 and 52.4 / 95.9.
  int splits = 1;
  if (forced > 0) {
    splits = std::min(forced, stages);
  } else {
    int64_t best = -1;
    for (int s = 1; s <= std::max(1, stages / kWaMinStagesPerSplit) && int64_t{tiles} * s <= 2LL * sms; ++s) {
      const int64_t cost = ((int64_t{tiles} * s + sms - 1) / sms) * ((stages + s - 1) / s);
      if (best < 0 || cost < best) best = cost, splits = s;
    }
  }
  const int sps = (stages + splits - 1) / splits;
  return {(stages + sps - 1) / sps, sps};
}

void launch_int3_gemm_wa(int tile, int dtype, int group, int bt, int row_blocks, const Int3GemmParams& p,
                         bool programmatic, cudaStream_t stream) {
  TORCH_CHECK(p.K % kWaBK == 0 && p.N % 8 == 0, "int3_linear: tiles 7-9 need K % 128 == 0 and N % 8 == 0");
  const auto launch = [&](auto tile_tag) {  // the tile as a compile-time constant
    constexpr int TILE = decltype(tile_tag)::value;
    if (dtype == 0)
      launch_wa_group<half, TILE>(group, bt, row_blocks, p, programmatic, stream);
    else
      launch_wa_group<__nv_bfloat16, TILE>(group, bt, row_blocks, p, programmatic, stream);
  };
  switch (tile) {
    case 7:
      return launch(std::integral_constant<int, 7>{});
    case 8:
      return launch(std::integral_constant<int, 8>{});
    case 9:
      return launch(std::integral_constant<int, 9>{});
    default:
      TORCH_CHECK(false, "int3_linear: launch_int3_gemm_wa takes tile 7, 8 or 9, not ", tile);
  }
}

}  // namespace milo
