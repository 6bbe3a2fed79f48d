// CUDA implementation of milo::int3_linear (schema defined in milo_tensor/ops/library.py):
//
//   int3_linear(Tensor x, Tensor qdata, Tensor scales, Tensor zeros, Tensor ut, Tensor v,
//               int group_size, Tensor? bias=None) -> Tensor
//
// Paths:
//  * decode: fp16/bf16, K % 128 == 0, group in {32, 64, 128}, M <= 8 -> t = x @ v^T (lowrank_t_rows_kernel,
//    k-split fp32 partials) + int3_gemv_kernel (int3_gemv.cu: weight as the mma A operand, low-rank
//    term in the epilogue), launched programmatically on sm_90 so its main loop overlaps the t kernel.
//  * fused: fp16/bf16, K % 128 == 0, N % 8 == 0, group in {32, 64, 128}, M <= fused_max_m
//    -> t = x @ v^T (fp32, cuBLAS) + int3_gemm_kernel (dequant fused, low-rank fused, split-K).
//  * everything else (large M, other shapes, float32, other group sizes): dequantize into a
//    [N, K (+R)] matrix of the compute dtype and one cuBLAS GEMM [x | t] @ [deq | ut^T]^T.
// Both paths run on the current stream, allocate only shape-dependent buffers through the caching
// allocator and never synchronize with the host, so CUDA-graph capture works.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <type_traits>
#include <tuple>
#include <utility>

#include "grouped_input.cuh"
#include "int3_launch.h"

namespace milo {

// tile configurations (int3_gemm_inst.cuh), rows x columns: 1 = 16 x 64, 2 = 32 x 128, 3 = 32 x 64,
// 4 = 64 x 128
int int3_cfg_bm(int cfg) { return cfg == 1 ? 16 : (cfg == 4 ? 64 : 32); }
int int3_cfg_bn(int cfg, int group) {
  (void)group;
  return cfg == 2 || cfg == 4 ? 128 : 64;
}

void launch_int3_gemm(int dtype, int mt, int group, const Int3GemmParams& p, int n_tiles, int m_blocks,
                      bool programmatic, cudaStream_t stream) {
  if (dtype == 0) {
    if (group == 32) return launch_int3_gemm_f16_g32(mt, p, n_tiles, m_blocks, programmatic, stream);
    if (group == 64) return launch_int3_gemm_f16_g64(mt, p, n_tiles, m_blocks, programmatic, stream);
    return launch_int3_gemm_f16_g128(mt, p, n_tiles, m_blocks, programmatic, stream);
  }
  if (group == 32) return launch_int3_gemm_bf16_g32(mt, p, n_tiles, m_blocks, programmatic, stream);
  if (group == 64) return launch_int3_gemm_bf16_g64(mt, p, n_tiles, m_blocks, programmatic, stream);
  return launch_int3_gemm_bf16_g128(mt, p, n_tiles, m_blocks, programmatic, stream);
}

namespace {

// ------------------------------------------------------------------------------------------------
// dequantization kernel (fallback and large-M path): W[n, k] = (code - z) * s, fp32 math
// ------------------------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ float ld_f(const T* p) {
  return static_cast<float>(*p);
}
template <>
__device__ __forceinline__ float ld_f<at::Half>(const at::Half* p) {
  return __half2float(*reinterpret_cast<const half*>(p));
}
template <>
__device__ __forceinline__ float ld_f<at::BFloat16>(const at::BFloat16* p) {
  return __bfloat162float(*reinterpret_cast<const __nv_bfloat16*>(p));
}

template <typename To>
__device__ __forceinline__ To cvt_out(float v);
template <>
__device__ __forceinline__ float cvt_out<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ half cvt_out<half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 cvt_out<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// One thread per 32-code chunk of a row (its 3 words), blocks of 64 threads along a row, grid (rows,
// K / 2048). Every code's word and bit position is compile-time, and the chunk lies in one group for
// any group size that is a multiple of 32 (GC: 32, 64, 128 compile-time, 0 any such size, -1 any
// other: per-code scales). (code - z) * s in fp32 as one FMA, rounded once to the output type. Each
// warp's outputs go through shared memory so its global stores are 512 contiguous bytes per
// instruction. H100 2026-12-06, 14336x4096: a quarter chunk per thread (coalesced stores, the quarter
// a runtime selection) ran ~20 instructions per output (ncu) and took 90-100 us; a chunk per thread
// storing its own 64 bytes, ~6, but its 16-byte stores 64 bytes apart held L2 at 88% of its
// throughput (ncu: 87 us); staged, ~55-60 us (docs/benchmarks.md).
constexpr int kDeqThreads = 64;

template <typename To, typename Ts, int GC>
__global__ void __launch_bounds__(kDeqThreads) dequant_int3_kernel(const int32_t* __restrict__ q,
                                                                   const Ts* __restrict__ scales,
                                                                   const Ts* __restrict__ zeros,
                                                                   To* __restrict__ w, int K, int G, int64_t ldw,
                                                                   bool vec_ok) {
  constexpr int SLOTS = 2 * static_cast<int>(sizeof(To));  // 16-byte pieces of a chunk's outputs
  __shared__ uint4 stage[kDeqThreads / 32][32 * SLOTS];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t n = blockIdx.x;
  const int c_first = blockIdx.y * kDeqThreads + warp * 32;  // the warp's first chunk
  const int chunks = min(32, K / 32 - c_first);               // warp-uniform
  if (chunks <= 0) return;
  const bool valid = lane < chunks;
  const int c = c_first + lane;
  const int g = GC > 0 ? GC : G;
  const int groups = K / g;
  const int32_t* qp = q + n * (3 * (K / 32)) + 3 * c;
  uint32_t wd[3] = {0u, 0u, 0u};
  if (valid) {
    wd[0] = static_cast<uint32_t>(__ldg(qp));
    wd[1] = static_cast<uint32_t>(__ldg(qp + 1));
    wd[2] = static_cast<uint32_t>(__ldg(qp + 2));
  }
  const Ts* sp = scales + n * groups;
  const Ts* zp = zeros + n * groups;
  float s = 0.f, c0 = 0.f;
  if (GC >= 0 && valid) {
    const int gi = 32 * c / g;
    s = ld_f(sp + gi);
    c0 = -ld_f(zp + gi) * s;
  }
  float v[32];
#pragma unroll
  for (int p = 0; p < 16; ++p) {
    const uint32_t pr = chunk_pair(wd, p, 0, 0u), lo = pr & 0xFFFFu, hi = pr >> 16;  // codes 2p, 2p + 1
    if (GC >= 0) {
      v[2 * p] = fmaf(static_cast<float>(lo), s, c0);
      v[2 * p + 1] = fmaf(static_cast<float>(hi), s, c0);
    } else {
      const int g0 = min(32 * c + 2 * p, K - 1) / g, g1 = min(32 * c + 2 * p + 1, K - 1) / g;
      v[2 * p] = (static_cast<float>(lo) - ld_f(zp + g0)) * ld_f(sp + g0);
      v[2 * p + 1] = (static_cast<float>(hi) - ld_f(zp + g1)) * ld_f(sp + g1);
    }
  }
  To* row = w + n * ldw;
  if (!vec_ok) {  // an unaligned destination: element stores
    if (valid) {
#pragma unroll
      for (int i = 0; i < 32; ++i) row[32 * c + i] = cvt_out<To>(v[i]);
    }
    return;
  }
  // piece j of lane l's chunk at slot l * SLOTS + (j ^ (l % SLOTS)): the swizzle keeps the per-lane
  // writes to 2-way bank conflicts and the reads of consecutive slots after them conflict-free
  uint4 piece[SLOTS];
  if constexpr (std::is_same<To, float>::value) {
#pragma unroll
    for (int j = 0; j < SLOTS; ++j)
      piece[j] = make_uint4(__float_as_uint(v[4 * j]), __float_as_uint(v[4 * j + 1]), __float_as_uint(v[4 * j + 2]),
                            __float_as_uint(v[4 * j + 3]));
  } else {
#pragma unroll
    for (int j = 0; j < SLOTS; ++j)
      piece[j] = make_uint4(pack2<To>(v[8 * j], v[8 * j + 1]), pack2<To>(v[8 * j + 2], v[8 * j + 3]),
                            pack2<To>(v[8 * j + 4], v[8 * j + 5]), pack2<To>(v[8 * j + 6], v[8 * j + 7]));
  }
  if (valid) {
#pragma unroll
    for (int j = 0; j < SLOTS; ++j) stage[warp][lane * SLOTS + (j ^ (lane % SLOTS))] = piece[j];
  }
  __syncwarp();
  uint4* dst = reinterpret_cast<uint4*>(row + 32 * c_first);
#pragma unroll
  for (int i = 0; i < SLOTS; ++i) {
    const int slot = lane + 32 * i, ch = slot / SLOTS, j = slot % SLOTS;
    if (ch < chunks) dst[slot] = stage[warp][ch * SLOTS + (j ^ (ch % SLOTS))];
  }
}

template <typename To, typename Ts>
void launch_dequant_group(const int32_t* q, const Ts* s, const Ts* z, To* w, int N, int K, int G, int64_t ldw,
                          bool vec_ok, cudaStream_t stream) {
  const dim3 blocks(N, (K / 32 + kDeqThreads - 1) / kDeqThreads);
  switch (G % 32 != 0 ? -1 : G) {
    case 32:
      dequant_int3_kernel<To, Ts, 32><<<blocks, kDeqThreads, 0, stream>>>(q, s, z, w, K, G, ldw, vec_ok);
      break;
    case 64:
      dequant_int3_kernel<To, Ts, 64><<<blocks, kDeqThreads, 0, stream>>>(q, s, z, w, K, G, ldw, vec_ok);
      break;
    case 128:
      dequant_int3_kernel<To, Ts, 128><<<blocks, kDeqThreads, 0, stream>>>(q, s, z, w, K, G, ldw, vec_ok);
      break;
    case -1:
      dequant_int3_kernel<To, Ts, -1><<<blocks, kDeqThreads, 0, stream>>>(q, s, z, w, K, G, ldw, vec_ok);
      break;
    default:
      dequant_int3_kernel<To, Ts, 0><<<blocks, kDeqThreads, 0, stream>>>(q, s, z, w, K, G, ldw, vec_ok);
      break;
  }
}

template <typename To>
void launch_dequant_to(const at::Tensor& q, const at::Tensor& scales, const at::Tensor& zeros, at::Tensor& w,
                       int N, int K, int G, int64_t ldw, cudaStream_t stream) {
  if (static_cast<int64_t>(N) * K == 0) return;
  To* wp = reinterpret_cast<To*>(w.data_ptr());
  const bool vec_ok = (reinterpret_cast<uintptr_t>(wp) % 16 == 0) && ((ldw * sizeof(To)) % 16 == 0);
  const int32_t* qp = q.data_ptr<int32_t>();
  switch (scales.scalar_type()) {
    case at::kHalf:
      launch_dequant_group<To, at::Half>(qp, scales.data_ptr<at::Half>(), zeros.data_ptr<at::Half>(), wp, N, K, G,
                                         ldw, vec_ok, stream);
      break;
    case at::kBFloat16:
      launch_dequant_group<To, at::BFloat16>(qp, scales.data_ptr<at::BFloat16>(), zeros.data_ptr<at::BFloat16>(), wp,
                                             N, K, G, ldw, vec_ok, stream);
      break;
    default: {
      at::Tensor s32 = scales.to(at::kFloat).contiguous();
      at::Tensor z32 = zeros.to(at::kFloat).contiguous();
      launch_dequant_group<To, float>(qp, s32.data_ptr<float>(), z32.data_ptr<float>(), wp, N, K, G, ldw, vec_ok,
                                      stream);
      break;
    }
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// dequantized weight in dtype cd into w[:, :K] (w is [N, ldw])
void dequant_into(const at::Tensor& q, const at::Tensor& scales, const at::Tensor& zeros, at::Tensor& w, int N,
                  int K, int G, cudaStream_t stream) {
  const int64_t ldw = w.size(1);
  at::Tensor s = scales, z = zeros;
  if (z.scalar_type() != s.scalar_type()) z = z.to(s.scalar_type());
  s = s.contiguous();
  z = z.contiguous();
  switch (w.scalar_type()) {
    case at::kHalf:
      launch_dequant_to<half>(q, s, z, w, N, K, G, ldw, stream);
      break;
    case at::kBFloat16:
      launch_dequant_to<__nv_bfloat16>(q, s, z, w, N, K, G, ldw, stream);
      break;
    default:
      launch_dequant_to<float>(q, s, z, w, N, K, G, ldw, stream);
      break;
  }
}

struct DevInfo {
  int major = 0;
  int minor = 0;
  int sms = 0;
  int smem_per_sm = 0;
};

// compute capability and SM count of the current device, read once per device
DevInfo dev_info() {
  static DevInfo cache[64];
  const int dev = c10::cuda::current_device();
  if (dev >= 0 && dev < 64 && cache[dev].sms > 0) return cache[dev];
  DevInfo d;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.minor, cudaDevAttrComputeCapabilityMinor, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev));
  if (dev >= 0 && dev < 64) cache[dev] = d;
  return d;
}

int env_int(const char* name, int dflt) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return dflt;
  return std::atoi(v);
}

// blocks per SM the split-K choice aims for (MILO_INT3_CTAS_PER_SM overrides): about what each tile's
// register cap lets reside
int int3_cfg_ctas_per_sm(int cfg) {
  return env_int("MILO_INT3_CTAS_PER_SM", cfg == 1 ? 4 : (cfg == 3 ? 2 : (cfg == 2 ? 3 : 1)));
}
// a forced tile (MILO_INT3_CFG for the dense op, MILO_INT3_GROUPED_CFG for the grouped op): 1-4 (int3_gemm.cuh),
// 7, 8 or 9 (int3_gemm_wa.cu); 0 if none
int forced_cfg(const char* var) {
  const int c = env_int(var, 0);
  return (c >= 1 && c <= 4) || (c >= 7 && c <= 9) ? c : 0;
}

// tiles 8 and 9 (warpgroup MMAs) are built for sm_90a, so they run on GPUs of compute capability 9.0 only
bool tile8_runs(const DevInfo& d) { return d.major == 9 && d.minor == 0; }
// tile 8 or 9 forced where it cannot run: say so rather than fall back
bool check_tile8(const DevInfo& d) {
  TORCH_CHECK(tile8_runs(d), "int3_linear: tiles 8 and 9 (MILO_INT3_CFG / MILO_INT3_GROUPED_CFG = 8 or 9) use ",
              "Hopper's wgmma and run on compute capability 9.0 only, this GPU is ", d.major, ".", d.minor,
              "; unset the variable");
  return true;
}

// whether a matmul kernel (decode or tensor-core) that follows its t kernel in the stream is launched
// programmatically (sm_90; MILO_INT3_PDL=0 serializes the two)
bool programmatic_after_t(int R, const DevInfo& d) {
  return R > 0 && d.major >= 9 && env_int("MILO_INT3_PDL", 1) != 0;
}

}  // namespace

bool chain_programmatic() {
  static const bool sm90 = dev_info().major >= 9;  // (one device kind per process)
  return sm90 && env_int("MILO_INT3_PDL", 1) != 0 && env_int("MILO_INT3_PDL_CHAIN", 1) != 0;
}

namespace {

// tests only: how long the t kernels sleep before writing t (MILO_INT3_TEST_T_DELAY_NS, 0 = not at all), so a
// test catches a kernel launched programmatically after them that reads t without waiting
unsigned test_t_delay_ns() { return static_cast<unsigned>(std::max(0, env_int("MILO_INT3_TEST_T_DELAY_NS", 0))); }

// how the decode kernel is launched (both ops): warps per tile forced by MILO_INT3_GEMV_WK (0 = gemv_wk_log2()),
// x staged once per block forced on or off by MILO_INT3_GEMV_XBLOCK (1 / 0; -1 = the default rule, launch_mr()),
// the low-rank term by mma (MILO_INT3_GEMV_LR_MMA=1, the default) or by the scalar loop (0)
GemvLaunch gemv_launch(int R, const DevInfo& d) {
  return GemvLaunch{env_int("MILO_INT3_GEMV_WK", 0), programmatic_after_t(R, d), d.sms, d.smem_per_sm,
                    env_int("MILO_INT3_GEMV_XBLOCK", -1), env_int("MILO_INT3_GEMV_LR_MMA", 1) != 0};
}

bool aligned(const at::Tensor& t, int bytes) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes == 0; }

at::Tensor aligned_contig(const at::Tensor& t, int bytes) {
  at::Tensor c = t.contiguous();
  if (c.numel() > 0 && !aligned(c, bytes)) c = c.clone(at::MemoryFormat::Contiguous);
  return c;
}

// t = x @ v^T in fp32: aten::mm.dtype (fp16/bf16 in, fp32 out, cuBLAS) when this torch has it,
// else an fp32 upcast. Looked up through the dispatcher so the source builds against any torch.
at::Tensor lowrank_t(const at::Tensor& x2d, const at::Tensor& v) {
  using MmDtype = at::Tensor(const at::Tensor&, const at::Tensor&, at::ScalarType);
  static const std::optional<c10::TypedOperatorHandle<MmDtype>> mm_dtype = []() {
    std::optional<c10::TypedOperatorHandle<MmDtype>> r;
    auto h = c10::Dispatcher::singleton().findSchema({"aten::mm", "dtype"});
    if (h.has_value()) r = h->typed<MmDtype>();
    return r;
  }();
  static bool usable = true;
  if (mm_dtype.has_value() && usable && x2d.scalar_type() == v.scalar_type() &&
      (x2d.scalar_type() == at::kHalf || x2d.scalar_type() == at::kBFloat16)) {
    try {
      return mm_dtype->call(x2d, v.t(), at::kFloat);
    } catch (const c10::Error&) {
      usable = false;
    }
  }
  return at::mm(x2d.to(at::kFloat), v.to(at::kFloat).t());
}

// Rows of x per block of the t kernel below, and the grouped op's decode tiles at most: t is indexed by
// row, so the dense op's 8-row decode blocks read the t of two of its row groups. (The t kernel with 8
// rows spilled at the 1024-thread blocks' 32-register cap, and fewer row groups filled fewer SMs: H100
// 2026-12-06, R=32, M=4 and 16 up to +24%; 8-row grouped tiles re-read an expert's weights per tile:
// Mixtral-shaped M=32, 8 rows per expert, 670 -> 1033 us against the 16-row tensor-core tile.)
constexpr int kTRows = 4;

// Decode t partials t[split][m, r] = sum over k in the split of x[m, k] v[e, r, k] (fp32) for row
// groups of at most kTRows (blockIdx.y: rows 4y.. of the dense op, e = 0, or the grouped op's tile y with
// its expert e, listed or found from the offsets; input rows gathered and gated as the decode kernel
// reads them, grouped_input.cuh): one warp per (rank, split), 16-byte loads issued several iterations
// ahead, a shuffle reduction; no barrier past the tile lookup, so a long K costs a few load round
// trips, not one per 32-k step. Lets the decode kernel launched after it start at once (programmatic
// launch): that kernel waits for t only before its epilogue. Needs K % 8 == 0, x and v rows 16-byte
// aligned. delay_ns (0 outside tests; MILO_INT3_TEST_T_DELAY_NS) holds each warp back before it writes
// t, so a test can catch a dependent kernel that overlaps this one without waiting for t.
// kThreads: 256, or 1024 at 32 registers a thread (32K registers, half an SM's: an SM holding one keeps room
// for one of the decode kernel's 128-register blocks, and the t grid sits on few SMs, R=32: 4 at K=4096).
// With 256-thread blocks each SM holding one (16 at K=4096, R=32) has a decode slot less until t is done,
// which delays a decode grid that needs every slot; but t on few SMs reads V slower, which costs where the
// decode grid has slots to spare or K is long (t_rows_wide()).
template <typename T, bool kAct, int kThreads>
__global__ void __launch_bounds__(kThreads, kThreads == 1024 ? 2 : 1)
    lowrank_t_rows_kernel(const Int3GemmParams p, const T* __restrict__ v, float* __restrict__ t, int splits,
                          int k_chunk, unsigned delay_ns) {
  grid_dep_wait();  // launched programmatically (chain_programmatic()): the kernel before it is done from here
  grid_dep_launch_dependents();
  const int4 tl = block_tile<kThreads>(p, blockIdx.y, kTRows);  // every thread (block scans)
  const int gw = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
  const int K = p.K, R = p.R;
  if (tl.x < 0 || gw >= R * splits) return;  // whole warps
  const int e = tl.x, m0 = tl.y, rows = min(kTRows, tl.z - tl.y);
  const T* xr[kTRows];
#pragma unroll
  for (int m = 0; m < kTRows; ++m) xr[m] = m < rows ? input_row<T>(p, m0 + m) : nullptr;
  const int r = gw / splits, sp = gw % splits;
  // ranks past the expert's own (Int3GemmParams::ranks) come out zero, V not read
  const int k_end = r < expert_rank(p, e) ? min(K, (sp + 1) * k_chunk) : 0;
  const T* vr = v + (static_cast<long long>(e) * R + r) * K;
  float acc[kTRows] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 4
  for (int k = sp * k_chunk + lane * 8; k < k_end; k += 256) {
    const uint4 vv = __ldg(reinterpret_cast<const uint4*>(vr + k));
    const T* vh = reinterpret_cast<const T*>(&vv);
#pragma unroll
    for (int m = 0; m < kTRows; ++m) {
      if (m < rows) {
        const uint4 xv = load_input8<T, kAct>(xr[m], K, k);
        const T* xh = reinterpret_cast<const T*>(&xv);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[m] = fmaf(to_float(xh[i]), to_float(vh[i]), acc[m]);
      }
    }
  }
  if (delay_ns != 0) sleep_ns(delay_ns);
#pragma unroll
  for (int m = 0; m < kTRows; ++m) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], off);
    if (lane == 0 && m < rows) t[(static_cast<long long>(sp) * p.M + m0 + m) * R + r] = acc[m];
  }
}

// splits of K for lowrank_t_rows_kernel: about one per MILO_INT3_T_SPLIT_K k (default 1024), at most 8,
// each a multiple of 256. On an H100 (2026-11-25, R=32, M=1 and 4) 4 splits beat 2 at K=4096 and 7 beat 14
// at K=14336; re-measure with MILO_INT3_T_SPLIT_K and benchmarks/bench_kernel.py.
std::pair<int, int> lowrank_rows_splits(int K) {
  const int per = std::max(256, env_int("MILO_INT3_T_SPLIT_K", 1024));
  const int want = std::max(1, std::min(8, (K + per - 1) / per));
  const int k_chunk = ((K + want - 1) / want + 255) / 256 * 256;
  return {(K + k_chunk - 1) / k_chunk, k_chunk};
}

// Whether the dense op's t kernel takes 1024-thread blocks (lowrank_t_rows_kernel): where the decode grid
// has a block per SM or more and K is short. H200, 2026-12-04, M=1/2/4, R=32, 1024- vs 256-thread blocks:
// 4096x4096 (256 decode blocks) 10.0/10.4/12.6 vs 11.1/13.5/15.3 us, 14336x4096 19.7/19.9/25.8 vs
// 20.0/20.1/25.5; slower at K=14336 (4096x14336 23.2/27.6 vs 22.5/25.9) and on grids short of the SMs
// (1408x2048, 88 blocks, 7.0/7.6/9.8 vs 7.1/7.3/8.7), and for the grouped op (Qwen3-shaped M=1).
bool t_rows_wide(int K, long long decode_blocks, int sms) { return K <= 4096 && decode_blocks >= sms; }

template <typename T>
struct TypeTag {
  using type = T;
};
// f(TypeTag<T>) for x's dtype (fp16 / bf16): the kernels take it as a template parameter
template <typename F>
void dispatch_dtype(at::ScalarType xt, F&& f) {
  if (xt == at::kHalf) f(TypeTag<half>{}); else f(TypeTag<__nv_bfloat16>{});
}
// f(TypeTag<T>, std::integral_constant<bool, kAct>) for x's dtype and the activation flag
template <typename F>
void dispatch_dtype_act(at::ScalarType xt, bool act, F&& f) {
  dispatch_dtype(xt, [&](auto dtype) {
    if (act) f(dtype, std::true_type{}); else f(dtype, std::false_type{});
  });
}

// t partials of the rows of p (x, M, K, R, the tiles or offsets and the input-row fields) into t;
// row_groups: ceil(M / kTRows) for the dense op, the tile slots for the grouped op; wide: 1024-thread blocks
void launch_lowrank_t_rows(at::ScalarType xt, const Int3GemmParams& p, const void* v, int row_groups, float* t,
                           int splits, int k_chunk, cudaStream_t stream, bool wide = false) {
  const int threads = wide ? 1024 : 256;
  const dim3 blocks((p.R * splits * 32 + threads - 1) / threads, row_groups);
  const unsigned delay_ns = test_t_delay_ns();
  dispatch_dtype_act(xt, p.act == kActSiluMul, [&](auto dtype, auto act) {
    using TT = typename decltype(dtype)::type;
    constexpr bool kAct = decltype(act)::value;
    const TT* vt = reinterpret_cast<const TT*>(v);
    if (wide)
      launch_programmatic_if(lowrank_t_rows_kernel<TT, kAct, 1024>, blocks, dim3(1024), 0, chain_programmatic(), stream,
                             p, vt, t, splits, k_chunk, delay_ns);
    else
      launch_programmatic_if(lowrank_t_rows_kernel<TT, kAct, 256>, blocks, dim3(256), 0, chain_programmatic(), stream,
                             p, vt, t, splits, k_chunk, delay_ns);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The grouped op's decode t partials t[split][m, r] (as lowrank_t_rows_kernel's), one block per (row tile,
// kTileTRanks ranks, k split): the tile's input rows are read, gathered and gated once into shared memory
// (lowrank_t_rows_kernel reads and gates them again in each of its R * splits warps: 64 times a row at
// Qwen3-shaped gate_up, R=32, and finds its tile again in each of its R * splits / 8 blocks), then one warp per
// rank runs over the split, its first kTileTBatch 16-byte V loads issued before the staging. 16 warps at 64
// registers, two blocks per SM. Needs K % 8 == 0 and k_chunk <= kTileTMaxChunk, a multiple of 256.
constexpr int kTileTRanks = 16;
constexpr int kTileTMaxChunk = 4096;  // kTRows x 4096 values: 32 KB of shared memory (fp16 / bf16)
constexpr int kTileTBatch = 8;        // V loads in flight per lane: 8 x 256 k per round trip

template <typename T, bool kAct>
__global__ void __launch_bounds__(kTileTRanks * 32, 2)
    lowrank_t_tile_kernel(const Int3GemmParams p, const T* __restrict__ v, float* __restrict__ t, int k_chunk,
                          unsigned delay_ns) {
  grid_dep_wait();  // as lowrank_t_rows_kernel
  grid_dep_launch_dependents();
  __shared__ __align__(16) T xs[kTRows * kTileTMaxChunk];
  const int4 tl = block_tile<kTileTRanks * 32>(p, blockIdx.x, kTRows);  // every thread (block scans)
  if (tl.x < 0) return;  // whole block
  const int K = p.K, R = p.R, e = tl.x, m0 = tl.y, rows = min(kTRows, tl.z - tl.y);
  const int lane = threadIdx.x & 31, r = blockIdx.y * kTileTRanks + (threadIdx.x >> 5), sp = blockIdx.z;
  const int k0 = sp * k_chunk, k1 = min(K, k0 + k_chunk);
  // ranks past the expert's own (Int3GemmParams::ranks; R is t's row stride) are written as zeros, V not read:
  // by the whole block where they are all of its ranks, else by warps that stage x, wait at the barrier, idle
  const int rank_e = expert_rank(p, e);
  if (static_cast<int>(blockIdx.y) * kTileTRanks >= rank_e) {
    if (lane == 0 && r < R)
      for (int m = 0; m < rows; ++m) t[(static_cast<long long>(sp) * p.M + m0 + m) * R + r] = 0.f;
    return;
  }
  const bool has_rank = r < rank_e;
  const T* vr = v + (static_cast<long long>(e) * R + (has_rank ? r : 0)) * K;
  uint4 vb[kTileTBatch];
  auto load_v = [&](int base) {
#pragma unroll
    for (int i = 0; i < kTileTBatch; ++i) {
      const int k = base + i * 256 + lane * 8;
      vb[i] = has_rank && k < k1 ? __ldg(reinterpret_cast<const uint4*>(vr + k)) : make_uint4(0, 0, 0, 0);
    }
  };
  load_v(k0);
  const int c8 = (k1 - k0) / 8;  // 16-byte pieces of a row's split
  for (int i = threadIdx.x; i < rows * c8; i += kTileTRanks * 32) {
    const int m = i / c8, c = i - m * c8;
    reinterpret_cast<uint4*>(xs + m * k_chunk)[c] = load_input8<T, kAct>(input_row<T>(p, m0 + m), K, k0 + c * 8);
  }
  __syncthreads();
  float acc[kTRows] = {0.f, 0.f, 0.f, 0.f};
  for (int base = k0; base < k1; base += kTileTBatch * 256) {
#pragma unroll
    for (int i = 0; i < kTileTBatch; ++i) {
      const int k = base + i * 256 + lane * 8;
      if (k < k1) {
        const T* vh = reinterpret_cast<const T*>(&vb[i]);
#pragma unroll
        for (int m = 0; m < kTRows; ++m) {
          if (m < rows) {
            const uint4 xv = *reinterpret_cast<const uint4*>(xs + m * k_chunk + (k - k0));
            const T* xh = reinterpret_cast<const T*>(&xv);
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[m] = fmaf(to_float(xh[j]), to_float(vh[j]), acc[m]);
          }
        }
      }
    }
    if (base + kTileTBatch * 256 < k1) load_v(base + kTileTBatch * 256);
  }
  if (delay_ns != 0) sleep_ns(delay_ns);
#pragma unroll
  for (int m = 0; m < kTRows; ++m) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], off);
    if (lane == 0 && r < R && m < rows) t[(static_cast<long long>(sp) * p.M + m0 + m) * R + r] = acc[m];
  }
}

// k splits of lowrank_t_tile_kernel: enough (at most 8) that the expected busy tiles' rank warps fill the SMs at
// two 16-warp blocks each, and splits of at most kTileTMaxChunk k; returns (splits, k per split, a multiple of 256).
// The grouped op (one_round): one split where a warp's one batch of V loads covers K (K <= 2048), at every M measured
// (H100 2026-12-07 08:47 UTC, bench_moe.py under MILO_INT3_GROUPED_T_SPLITS=1 against the rule, us, M = 1 / 8 /
// 32: Qwen3-shaped 32.0 / 92.2 / 174.4 -> 30.9 / 87.5 / 176.0, DeepSeek-V2-Lite-shaped 63.0 / 147.2 / 250.0 ->
// 61.7 / 144.7 / 240.4): fewer t blocks beside the decode kernel, one V round trip either way. Longer K keeps the
// fill rule (Mixtral-shaped, K = 4096 and 14336: 97.5 / 333.5 / 566.0 by the rule, 99.6 / 331.8 / 565.6 at one
// split). MILO_INT3_GROUPED_T_SPLITS=n asks for n splits (tuning; the dense op's tile t kernel too).
std::pair<int, int> tile_t_splits(int sms, int busy_tiles, int R, int K, bool one_round) {
  const long long rank_warps = static_cast<long long>(busy_tiles) * ((R + kTileTRanks - 1) / kTileTRanks) * kTileTRanks;
  int want = static_cast<int>(std::max(1LL, std::min<long long>(8, sms * 2LL * kTileTRanks / std::max(1LL, rank_warps))));
  if (one_round && K <= kTileTBatch * 256) want = 1;
  if (const int forced = env_int("MILO_INT3_GROUPED_T_SPLITS", 0); forced > 0) want = forced;
  want = std::max(want, (K + kTileTMaxChunk - 1) / kTileTMaxChunk);
  const int k_chunk = ((K + want - 1) / want + 255) / 256 * 256;
  return {(K + k_chunk - 1) / k_chunk, k_chunk};
}

void launch_lowrank_t_tile(at::ScalarType xt, const Int3GemmParams& p, const void* v, int n_slots, float* t,
                           int splits, int k_chunk, cudaStream_t stream) {
  TORCH_CHECK(k_chunk % 256 == 0 && k_chunk <= kTileTMaxChunk, "launch_lowrank_t_tile: bad k_chunk ", k_chunk);
  const dim3 grid(n_slots, (p.R + kTileTRanks - 1) / kTileTRanks, splits);
  const unsigned delay_ns = test_t_delay_ns();
  dispatch_dtype_act(xt, p.act == kActSiluMul, [&](auto dtype, auto act) {
    using TT = typename decltype(dtype)::type;
    launch_programmatic_if(lowrank_t_tile_kernel<TT, decltype(act)::value>, grid, dim3(kTileTRanks * 32), 0,
                           chain_programmatic(), stream, p, reinterpret_cast<const TT*>(v), t, k_chunk, delay_ns);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ------------------------------------------------------------------------------------------------
// general path: dequantize + cuBLAS
// ------------------------------------------------------------------------------------------------
at::Tensor int3_linear_general(const at::Tensor& x2d, const at::Tensor& q, const at::Tensor& scales,
                               const at::Tensor& zeros, const at::Tensor& ut, const at::Tensor& v, int G,
                               const std::optional<at::Tensor>& bias, int N, int K, int R) {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::ScalarType xt = x2d.scalar_type();
  const bool half_like = (xt == at::kHalf || xt == at::kBFloat16);
  const at::ScalarType cd = half_like ? xt : at::kFloat;
  const at::Tensor xc = x2d.to(cd);
  // ranks folded into the GEMM's K: [x | t] @ [deq | ut^T]^T; for bf16, t is split into hi + lo
  // bf16 halves ([x | t_hi | t_lo] @ [deq | ut^T | ut^T]^T) so it is not rounded to 8 bits
  const int copies = (half_like && R > 0) ? (cd == at::kBFloat16 ? 2 : 1) : 0;
  at::Tensor w = at::empty({N, K + static_cast<int64_t>(copies) * R}, x2d.options().dtype(cd));
  dequant_into(q, scales, zeros, w, N, K, G, stream);
  at::Tensor xx = xc;
  if (copies > 0) {
    const at::Tensor utt = ut.to(cd).t();
    for (int c = 0; c < copies; ++c) w.narrow(1, K + c * R, R).copy_(utt);
    const at::Tensor t32 = lowrank_t(xc, v.to(cd));
    const at::Tensor t_hi = t32.to(cd);
    xx = copies == 2 ? at::cat({xc, t_hi, (t32 - t_hi.to(at::kFloat)).to(cd)}, 1) : at::cat({xc, t_hi}, 1);
  }
  at::Tensor y = bias.has_value() ? at::addmm(bias->reshape({N}).to(cd), xx, w.t()) : at::mm(xx, w.t());
  if (copies == 0 && R > 0) y.addmm_(at::mm(xc, v.to(cd).t()), ut.to(cd));
  return y.to(xt);
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// the op
// ------------------------------------------------------------------------------------------------
// blocks (int3_linear's): [column end, rank end] per segment of a block-diagonal U^T, ascending, the last (N, R)
void check_rank_blocks(c10::IntArrayRef blocks, int64_t N, int64_t R) {
  TORCH_CHECK(blocks.size() >= 2 && blocks.size() % 2 == 0,
              "int3_linear: blocks is [column end, rank end] per segment, flattened; got ", blocks.size(), " values");
  int64_t n_prev = 0, r_prev = 0;
  for (size_t i = 0; i < blocks.size(); i += 2) {
    TORCH_CHECK(blocks[i] > n_prev && blocks[i + 1] >= r_prev, "int3_linear: blocks' column ends must ascend and rank "
                "ends not descend; got ", blocks);
    n_prev = blocks[i];
    r_prev = blocks[i + 1];
  }
  TORCH_CHECK(n_prev == N && r_prev == R, "int3_linear: the last block must end at (N, R) = (", N, ", ", R, "); got ",
              blocks);
}

// the decode kernel reads only a segment's U^T rows and t columns where every segment boundary falls between
// its blocks (at most 128 columns a block) and there are at most kMaxRankBlocks segments; else all R ranks
void set_rank_blocks(Int3GemmParams& p, c10::IntArrayRef blocks) {
  const int n = static_cast<int>(blocks.size() / 2);
  if (n > kMaxRankBlocks || n < 2) return;
  for (int i = 0; i < n; ++i)
    if (blocks[2 * i] % 128 != 0 && i + 1 < n) return;
  p.n_blocks = n;
  for (int i = 0; i < n; ++i) {
    p.blk_col[i] = static_cast<int>(blocks[2 * i]);
    p.blk_rank[i] = static_cast<int>(blocks[2 * i + 1]);
  }
}

at::Tensor int3_linear_cuda(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scales,
                            const at::Tensor& zeros, const at::Tensor& ut, const at::Tensor& v, int64_t group_size,
                            const std::optional<at::Tensor>& bias, at::OptionalIntArrayRef blocks) {
  TORCH_CHECK(x.dim() >= 1, "int3_linear: x must have at least one dimension");
  TORCH_CHECK(qdata.dim() == 2 && qdata.scalar_type() == at::kInt, "int3_linear: qdata must be int32 [N, 3K/32]");
  const int64_t K64 = x.size(-1);
  const int64_t N64 = qdata.size(0);
  TORCH_CHECK(K64 % 32 == 0 && qdata.size(1) == K64 / 32 * 3, "int3_linear: qdata is [N, 3K/32] with K % 32 == 0; got ",
              qdata.sizes(), " for K = ", K64);
  TORCH_CHECK(group_size > 0 && K64 % group_size == 0, "int3_linear: K must be a multiple of group_size");
  const int64_t groups = K64 / group_size;
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == N64 && scales.size(1) == groups, "int3_linear: scales must be [N, K/g]");
  TORCH_CHECK(zeros.dim() == 2 && zeros.size(0) == N64 && zeros.size(1) == groups, "int3_linear: zeros must be [N, K/g]");
  TORCH_CHECK(ut.dim() == 2 && ut.size(1) == N64, "int3_linear: ut must be [R, N]");
  TORCH_CHECK(v.dim() == 2 && v.size(0) == ut.size(0) && v.size(1) == K64, "int3_linear: v must be [R, K]");
  if (bias.has_value()) TORCH_CHECK(bias->numel() == N64, "int3_linear: bias must have N elements");
  if (blocks.has_value()) check_rank_blocks(*blocks, N64, ut.size(0));
  TORCH_CHECK(x.is_cuda() && qdata.is_cuda() && scales.is_cuda() && zeros.is_cuda() && ut.is_cuda() && v.is_cuda(),
              "int3_linear (CUDA): all tensors must be on the GPU");
  TORCH_CHECK(N64 < (1LL << 31) && K64 < (1LL << 28), "int3_linear: shape too large");

  c10::cuda::CUDAGuard guard(x.device());
  const int N = static_cast<int>(N64), K = static_cast<int>(K64), R = static_cast<int>(ut.size(0));
  const int G = static_cast<int>(group_size);

  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N64;
  const at::Tensor x2d = x.reshape({-1, K64});
  const int64_t M64 = x2d.size(0);
  if (M64 == 0 || N64 == 0) return at::zeros(out_shape, x.options());
  if (K64 == 0) {
    at::Tensor y = at::zeros({M64, N64}, x.options());
    if (bias.has_value()) y.add_(bias->to(x.scalar_type()));
    return y.reshape(out_shape);
  }

  const at::Tensor q = qdata.contiguous();
  const at::ScalarType xt = x.scalar_type();
  const bool dtype_ok = (xt == at::kHalf || xt == at::kBFloat16) && scales.scalar_type() == xt &&
                        zeros.scalar_type() == xt && ut.scalar_type() == xt && v.scalar_type() == xt &&
                        (!bias.has_value() || bias->scalar_type() == xt);
  // the tensor-core kernel up to 64 rows for weights of 32M+ codes (128 where tile 8 runs), 32 from 16M, 16
  // below (32 with a low-rank term: dequant + cuBLAS pays 11-13 us more for R = 32, the tensor-core kernel 6-9;
  // H100 2026-12-06 22:29 UTC, --sweep MILO_INT3_FUSED_MAX_M=0,4096 --sweep-ranks 0,32, R=32, M=24 / 32 / 64,
  // us: 5632x2048 27.9 / 28.0 / 28.5 vs 24.8 / 25.9 / 36.2, 2048x2816 26.4 / 26.2 / 26.7 vs 21.2 / 22.2 / 28.7,
  // 1408x2048 20.5 / 20.3 / 20.4 vs 17.3 / 17.6 / 23.6; R=0 at M=24 15.9 vs 18.2, 13.4 vs 14.6, 9.3 vs 10.5);
  // past that dequant + cuBLAS, whose cost is set by the weight's size (H100 2026-12-06, bench_kernel.py
  // --sweep MILO_INT3_FUSED_MAX_M=4096,0, us: 14336x4096 M=64 82.3 vs 101.0; 4096x4096 M=32 25.6 vs 24.2, M=48
  // 34.7 vs 24.4; 1408x2048 M=17 10.5 vs 8.9, 768x2048 9.8 vs 8.1; 17:47 UTC, --sweep MILO_INT3_FUSED_MAX_M=-,64,
  // tile 8 against dequant + cuBLAS at M=128: 14336x4096 55.1 / 103.2, 4096x14336 82.7 / 109.9, 28672x4096 111.1 /
  // 198.0; at M=256 14336x4096 105.0 (CFG=8) against 105.9 (09:31): even, hence 128)
  const DevInfo dinfo = dev_info();
  const int64_t codes = N64 * K64;
  const int fused_max_m = env_int("MILO_INT3_FUSED_MAX_M", codes >= (int64_t{32} << 20) ? (tile8_runs(dinfo) ? 128 : 64)
                                                           : (codes >= (int64_t{16} << 20) || R > 0 ? 32 : 16));
  const bool fused = dtype_ok && dinfo.major >= 8 && K % kInt3BK == 0 && N % 8 == 0 &&
                     (G == 32 || G == 64 || G == 128) && M64 <= fused_max_m && M64 < (1LL << 24);
  // decode: int3_gemv.cu for up to 4 rows (faster than the GEMM kernel at M <= 4 on every benchmark
  // shape at R = 0, H100 2026-11-25), and its 8-row blocks up to 8 where x of the whole K is staged once
  // per block (K <= 4096; H100 2026-12-06, M=5 / 8: 14336x4096 34.8 / 35.1 -> 28.2 / 30.4 us, 4096x4096
  // 17.1 / 17.3 -> 12.1 / 13.4; 4096x14336, x restaged per slice, 32.6 / 32.9 -> 33.3 / 36.5) or where
  // the tensor-core kernel cannot run (N % 8 != 0: else dequant + cuBLAS, with the weight rounded to
  // the activation dtype). Past 256 ranks a decode block multiplies, one row only: at 2-8 rows the decode kernel
  // takes the ranks past 64 by a scalar loop, the tensor-core tile by mma (H100 2026-12-07 19:44 UTC, R = 512,
  // --sweep MILO_INT3_GEMV_MAX_M=-,1, us, M = 2 / 4 / 8: 14336x4096 74.2 / 84.1 / 97.0 -> 52.7 / 53.0 / 53.0,
  // 4096x4096 42.3 / 50.4 / 56.0 -> 27.4 / 27.5 / 28.5, 1408x2048 25.4 / 27.6 / 32.9 -> 16.6 / 16.6 / 17.1). 256 set
  // from the R = 32 and 512 slopes, then checked (H100 2026-12-07 22:08 UTC, R = 128 / 256 / 384 at M = 2 / 4): the
  // faster path in 10 of 12 cases; 14336x4096 R = 256 M = 4 would take the tile (47.5 against 53.3 us).
  // MILO_INT3_GEMV_MAX_M=m: up to m rows whatever K and R (0 turns it off)
  constexpr int kGemvRowsMaxR = 256;
  Int3GemmParams segs{};  // the decode launch's rank segments (set_rank_blocks())
  segs.R = R;
  if (blocks.has_value()) set_rank_blocks(segs, *blocks);
  const int gemv_max_m = env_int("MILO_INT3_GEMV_MAX_M", fused && int3_max_segment_rank(segs) > kGemvRowsMaxR ? 1
                                                         : K <= 4096 || !fused                       ? kInt3GemvMaxRows
                                                                                                     : 4);
  const bool use_gemv = dtype_ok && K % 128 == 0 && (G == 32 || G == 64 || G == 128) && M64 <= gemv_max_m;
  if (!fused && !use_gemv) {
    return int3_linear_general(x2d, q, scales, zeros, ut, v, G, bias, N, K, R).reshape(out_shape);
  }

  const int M = static_cast<int>(M64);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor xa = aligned_contig(x2d, 16);
  const at::Tensor qa = aligned(q, 16) ? q : q.clone();
  const at::Tensor sa = aligned_contig(scales, 8);
  const at::Tensor za = aligned_contig(zeros, 8);
  at::Tensor ba;
  if (bias.has_value()) ba = bias->reshape({N64}).contiguous();
  at::Tensor y = at::empty({M64, N64}, x.options());
  // tile 7 (the weight as the mma A operand, int3_gemm_wa.cu; MILO_INT3_CFG=7 forces it, 1-4 force the
  // others) where it was measured faster than tiles 1 / 3 (H100 2026-12-06, bench_kernel.py --sweep
  // MILO_INT3_CFG=-,7 under MILO_INT3_FUSED_MAX_M=4096, us, R=0 / R=32; docs/benchmarks.md): N >= 8192 past
  // 16 rows (14336x4096 M=32 54.0 -> 46.8 / 62.4 -> 55.4, M=48 82.1 -> 73.6 / 91.9 -> 83.1, M=64 82.9 -> 79.8
  // / 93.5 -> 89.2), and at 9-16 rows without ranks (M=16 37.9 -> 34.2; with R=32 42.6 against 39.8: tile 1
  // takes t from the rows kernel launched programmatically, tile 7 from cuBLAS); K >= 8192 at 17-32 rows
  // (4096x14336 M=32 56.8 -> 51.0 / 69.6 -> 61.2; at M=64 it lost, 84.5 -> 96.4); not 4096x4096 (M=32 26.4
  // -> 31.3) nor the expert shapes (1408x2048 M=32 11.1 -> 17.4).
  // Tile 8 (tile 7 with warpgroup MMAs, capability 9.0 only; MILO_INT3_CFG=8 forces it) at 17-128 rows where N
  // and K >= 4096 (past 64 rows only for weights of 32M+ codes: the fused limit above). Its 64-row blocks at
  // 33-64 rows (H100 2026-12-06 14:33 UTC, bench_kernel.py --sweep MILO_INT3_CFG=-,7,8 under
  // MILO_INT3_FUSED_MAX_M=4096, us, R=0 / R=32: 14336x4096 M=64 66.7 -> 45.7 / 74.8 -> 54.5, 4096x14336 M=64
  // 83.3 -> 67.7 / 96.2 -> 77.7; at M=32 no gain, 43.4 -> 42.2 / 50.4 -> 50.4 and 48.7 -> 48.5 / 57.8 ->
  // 60.5; past 64 rows its 128-row blocks run one per SM and lost to tile 7 at K = 14336, e.g. M=128 180.1
  // against 131.8). With its 32-row blocks (m64n32k16) also at 17-32 rows where N and K >= 4096 (H100 2026-12-06
  // 15:51 UTC, same sweep, tile 7 -> tile 8, R=0 / R=32: 14336x4096 M=17 41.8 -> 35.9 / 49.3 -> 43.3, M=32 43.7
  // -> 37.5 / 50.9 -> 44.8; 4096x14336 M=17 44.2 -> 39.2 / 53.2 -> 48.6, M=32 47.5 -> 43.0 / 58.1 -> 53.5;
  // 4096x4096, where tiles 1 / 3 ran, M=32 26.1 -> 22.4 / 33.0 -> 30.7 at 15:20); not at 9-16 rows (14336x4096
  // M=16 31.6 against 34.0) nor the expert shapes (1408x2048 M=32 11.1 against 17.5). Where tile 8 runs, tile 9
  // (its warp-specialized form) takes 17-32 rows (H100 2026-12-06 17:47 UTC, --sweep MILO_INT3_CFG=8,9, us,
  // R=0 / R=32 at M=32: 14336x4096 32.1 -> 27.1 / 40.0 -> 34.3, 4096x14336 38.6 -> 36.3 / 48.5 -> 45.2, 4096x4096
  // 20.7 -> 20.2 / 29.9 -> 29.9; at M=64 14336x4096 39.8 -> 41.6, at M=128 54.2 -> 78.0: its 128-row blocks get
  // 3 ring slots).
  const int forced_tile = forced_cfg("MILO_INT3_CFG");
  const bool tile8 = !use_gemv && (forced_tile >= 8 ? check_tile8(dinfo)
                                                    : forced_tile == 0 && tile8_runs(dinfo) && M > 16 && M <= 128 &&
                                                          N >= 4096 && K >= 4096);
  const bool tile7 = !use_gemv && (forced_tile == 7 || tile8 ||
                                   (forced_tile == 0 && ((N >= 8192 && (M > 16 || R == 0)) ||
                                                         (K >= 8192 && M > 16 && M <= 32))));
  // t = x v^T by lowrank_t_rows_kernel in k splits for the decode kernel and the 16-row tensor-core tile
  // (up to kRowsTMaxR ranks and kRowsTMaxK; otherwise, and for tile 7, cuBLAS); the matmul kernel is then launched
  // programmatically right after it (sm_90), streams its weights while t is computed and waits for t
  // only in its epilogue. H100, bench_kernel.py M=16 R=32 (2026-11-25): 14336x4096 47.6 -> 43.4 us,
  // 4096x4096 26.4 -> 23.3, 1408x2048 17.6 -> 14.6, but 4096x14336 46.9 -> 49.7 (every warp of the rows
  // kernel re-reads its 4 rows of x over the long K), hence the K limit; R above 128 not measured. Tile 7
  // behind the rows kernel (programmatic) was slower than with cuBLAS's t (H100 2026-12-06, 14336x4096 R=32
  // M=9 / 16: 44.6 / 52.8 us against tile 1's 39.3 / 40.3).
  constexpr int kRowsTMaxR = 128, kRowsTMaxK = 8192;
  const bool rows_t = R > 0 && (use_gemv || (!tile7 && M <= 16 && R <= kRowsTMaxR && K <= kRowsTMaxK));
  // ... by the grouped op's tile kernel (lowrank_t_tile_kernel: x's rows staged once per 4-row tile, each V row
  // read once per tile, not once per row), except where the decode kernel takes the rows kernel in 1024-thread
  // blocks (t_rows_wide()) below 8 rows. H100 2026-12-07 08:51 UTC, bench_kernel.py --sweep
  // MILO_INT3_T_TILE_MIN_M=-,1 (the switch's first form) --sweep-ranks 32, rows -> tile kernel, us: 4096x14336 M=1 /
  // 2 20.5 -> 17.4 / 24.0 -> 20.3; 5632x2048 M=1 / 2 / 16 12.2 -> 11.3 / 13.1 -> 11.6 / 20.0 -> 17.8; 2048x2816
  // M=1 / 16 7.9 -> 7.4 / 18.1 -> 15.6 (M=4 / 8 10.0 -> 10.4 / 13.0 -> 13.5); 4096x4096 M=8 20.8 -> 15.9 (M=4,
  // wide, 12.2 -> 14.2); 14336x4096 (wide) M=1-4 equal, M=8 / 16 32.7 -> 33.2 / 40.0 -> 40.4. MILO_INT3_T_TILE=0 / 1
  // forces the rows / tile kernel.
  const int row_blocks = (M + kInt3GemvMaxRows - 1) / kInt3GemvMaxRows, max_rows = std::min(M, kInt3GemvMaxRows);
  const GemvLaunch gl = gemv_launch(R, dinfo);
  bool t_wide = false;
  if (use_gemv && rows_t) {
    Int3GemmParams shape = segs;  // the decode launch's shape and rank segments (its blocks per row block)
    shape.M = M;
    shape.N = N;
    shape.K = K;
    t_wide = t_rows_wide(K, int3_gemv_blocks(shape, row_blocks, max_rows, G, gl), dinfo.sms);
  }
  const int t_tile_env = env_int("MILO_INT3_T_TILE", -1);
  const bool t_tile = rows_t && (t_tile_env >= 0 ? t_tile_env > 0 : !t_wide || M >= 8);
  const int t_row_groups = (M + kTRows - 1) / kTRows;  // both t kernels take the rows kTRows at a time
  at::Tensor uta, tt, va;
  int t_splits = 1, t_k_chunk = 0;
  if (R > 0) {
    uta = aligned_contig(ut, 16);
    if (rows_t) {
      std::tie(t_splits, t_k_chunk) =
          t_tile ? tile_t_splits(dinfo.sms, t_row_groups, R, K, false) : lowrank_rows_splits(K);
      va = aligned_contig(v, 16);
      tt = at::empty({static_cast<int64_t>(t_splits) * M64 * R}, x.options().dtype(at::kFloat));
    } else {
      tt = lowrank_t(xa, v).contiguous();
      if (!aligned(tt, 8)) tt = tt.clone();
    }
  }
  Int3GemmParams p{};  // dense op: no tile list
  p.x = xa.data_ptr();
  p.q = qa.data_ptr<int32_t>();
  p.scales = sa.data_ptr();
  p.zeros = za.data_ptr();
  p.t = R > 0 ? tt.data_ptr<float>() : nullptr;
  p.ut = R > 0 ? uta.data_ptr() : nullptr;
  p.bias = bias.has_value() ? ba.data_ptr() : nullptr;
  p.y = y.data_ptr();
  p.M = M;
  p.N = N;
  p.K = K;
  p.R = R;
  p.t_splits = t_splits;
  p.t_split_stride = M64 * R;
  p.ldx = K;
  auto launch_rows_t = [&](bool wide) {
    if (t_tile)
      launch_lowrank_t_tile(xt, p, va.data_ptr(), t_row_groups, tt.data_ptr<float>(), t_splits, t_k_chunk, stream);
    else
      launch_lowrank_t_rows(xt, p, va.data_ptr(), t_row_groups, tt.data_ptr<float>(), t_splits, t_k_chunk, stream,
                            wide);
  };
  if (use_gemv) {
    if (blocks.has_value()) set_rank_blocks(p, *blocks);
    if (rows_t) launch_rows_t(t_wide);
    launch_int3_gemv(xt == at::kHalf ? 0 : 1, G, p, row_blocks, max_rows, gl, stream);
    return y.reshape(out_shape);
  }

  // split-K workspace: fp32 partials [splits, M, N] and per-tile arrival counters, zeroed in the stream
  at::Tensor ws;
  auto alloc_split_ws = [&](int splits, int64_t n_counters) {
    if (splits <= 1) return;
    const int64_t part_floats = static_cast<int64_t>(splits) * M64 * N64;
    ws = at::empty({part_floats + n_counters}, x.options().dtype(at::kFloat));
    p.ws = ws.data_ptr<float>();
    p.counters = reinterpret_cast<int*>(p.ws + part_floats);
    C10_CUDA_CHECK(cudaMemsetAsync(p.counters, 0, n_counters * sizeof(int), stream));
  };
  if (tile7) {
    // MILO_INT3_WA_BT forces the rows of x a block (measurements): tile 7 takes 16, 32 or 64, tile 8 also 128.
    // Tile 8 past 64 rows: 128-row blocks where the column tiles fill half the SMs, else 64-row blocks (H100
    // 2026-12-06 17:10 UTC, MILO_INT3_WA_BT=-,32,64 at M=128, us: 14336x4096 (112 column tiles) 67.6 / 104.3 /
    // 88.4, 4096x14336 (32) 137.1 / 111.4 / 93.5)
    const int n_tiles = (N + kInt3WaBN - 1) / kInt3WaBN;
    const int forced_bt = env_int("MILO_INT3_WA_BT", 0);
    const int bt = forced_bt > 0 ? forced_bt
                   : tile8 && M > 64 && 2 * n_tiles < dinfo.sms ? 64
                                                                : int3_gemm_wa_bt(M, tile8);
    const int row_blocks = (M + bt - 1) / bt;
    const int wa_tiles = row_blocks * n_tiles;
    std::tie(p.splits, p.stages_per_split) = int3_gemm_wa_splits(wa_tiles, K, dinfo.sms, env_int("MILO_INT3_SPLITS", 0));
    alloc_split_ws(p.splits, wa_tiles);
    if (rows_t) launch_rows_t(false);  // directly before the matmul kernel in the stream (after the memset)
    const int wa_tile = forced_tile >= 8 ? forced_tile : (tile8 ? (M <= 32 ? 9 : 8) : 7);
    launch_int3_gemm_wa(wa_tile, xt == at::kHalf ? 0 : 1, G, bt, row_blocks, p,
                        rows_t && programmatic_after_t(R, dinfo), stream);
    return y.reshape(out_shape);
  }
  // the 16 x 64 tile up to 16 rows, and past that where N is small (more blocks); else 32 x 64 (2 blocks
  // per SM). H100 2026-12-06, bench_kernel.py --sweep MILO_INT3_CFG, us at M = 32 / 64 (32 x 128 and 64 x
  // 128, one block per SM, the earlier choice): 14336x4096 53.9 / 84.3 (76.4 / 97.9), 4096x14336 58.0 / 84.9
  // (89.6 / 129.8), 4096x4096 26.1 / 36.9 (56.3 / 60.6); 1408x2048 with the 16 x 64 tile 11.2 / 16.4 (35.0 /
  // 35.4; 32 x 64: 13.3 / 17.7)
  int cfg = M <= 16 || N < 4096 ? 1 : 3;
  if (forced_tile >= 1 && forced_tile <= 4) cfg = forced_tile;
  const int bm = int3_cfg_bm(cfg), bn = int3_cfg_bn(cfg, G);
  const int m_blocks = (M + bm - 1) / bm;
  const int n_tiles = (N + bn - 1) / bn;
  const int total_stages = K / kInt3BK;
  const int base = n_tiles * m_blocks;
  const int per_sm = int3_cfg_ctas_per_sm(cfg);
  const int forced_splits = env_int("MILO_INT3_SPLITS", 0);
  const int target = dinfo.sms * std::max(1, per_sm);
  int splits = forced_splits > 0 ? forced_splits : (target + base - 1) / base;
  splits = std::max(1, std::min(splits, total_stages));
  const int sps = (total_stages + splits - 1) / splits;
  splits = (total_stages + sps - 1) / sps;

  alloc_split_ws(splits, base);
  p.splits = splits;
  p.stages_per_split = sps;
  if (rows_t) launch_rows_t(false);  // directly before the matmul kernel in the stream (after the memset)
  launch_int3_gemm(xt == at::kHalf ? 0 : 1, cfg, G, p, n_tiles, m_blocks, rows_t && programmatic_after_t(R, dinfo),
                   stream);
  return y.reshape(out_shape);
}

// ------------------------------------------------------------------------------------------------
// grouped (MoE) op: all experts of a layer in one GEMM launch
// ------------------------------------------------------------------------------------------------
namespace {

// One block of 256 threads: the tile list (the tensor-core path, and the decode kernel's on large grids), one (e, m0, m_end, 0) entry per
// BM-row tile of every non-empty expert in tiles[0 .. n_slots), the rest (e = -1) (scan_expert_tiles()
// numbers them as the decode kernel's own lookup does), and zeroes the rows of y past the last
// expert (expert-parallel sentinels), which no tile covers.
template <typename T>
__global__ void __launch_bounds__(256) grouped_tiles_kernel(const void* offsets, bool offsets_i64, int E, int rows,
                                                           int BM, int n_slots, int4* __restrict__ tiles,
                                                           T* __restrict__ y, int N) {
  const int2 tot = scan_expert_tiles<256>(offsets, offsets_i64, E, rows, BM,
                                          [&](int e, int start, int end, int first, int count) {
                                            for (int sl = first; sl < min(first + count, n_slots); ++sl) {
                                              const int m0 = start + (sl - first) * BM;
                                              tiles[sl] = make_int4(e, m0, min(end, m0 + BM), 0);
                                            }
                                          });
  for (int sl = tot.y + threadIdx.x; sl < n_slots; sl += 256) tiles[sl] = make_int4(-1, 0, 0, 0);
  const long long nz = static_cast<long long>(rows - tot.x) * N;
  T* yt = y + static_cast<long long>(tot.x) * N;
  for (long long i = threadIdx.x; i < nz; i += 256) yt[i] = from_float<T>(0.f);
}

// One warp's share of grouped_lowrank_kernel: rows m0 .. min(m0 + 16, m_end) of expert e's tile against
// ranks r0 .. r0 + 63 over k in [k_begin, k_stop), into acc (m16n8k16 C fragments, n8 tile j = ranks
// r0 + 8j ..). Per 32 k a lane loads 16 bytes (k 8t .. 8t + 7) of x for each of its two rows and of v for
// each of its ranks straight from global memory; both operands take the mma's k slots in that same
// permuted order.
template <typename T>
__device__ __forceinline__ void lowrank_tile_warp(const T* __restrict__ x, const T* __restrict__ v, int e, int m0,
                                                  int m_end, int r0, int K, int R, long long v_estride, int k_begin,
                                                  int k_stop, float (&acc)[8][4]) {  // R: the ranks to compute
  const int lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
  const int n_tiles = min(8, (R - r0 + 7) / 8);  // n8 tiles of ranks in this chunk (warp-uniform)
  const bool ok_a = m0 + g < m_end, ok_b = m0 + g + 8 < m_end;
  const T* xa = x + static_cast<long long>(ok_a ? m0 + g : m0) * K + 8 * t4;
  const T* xb = x + static_cast<long long>(ok_b ? m0 + g + 8 : m0) * K + 8 * t4;
  const T* ve = v + e * v_estride + 8 * t4;
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll 2
  for (int k0 = k_begin; k0 < k_stop; k0 += 32) {
    const uint4 pa = ok_a ? __ldg(reinterpret_cast<const uint4*>(xa + k0)) : zero;
    const uint4 pb = ok_b ? __ldg(reinterpret_cast<const uint4*>(xb + k0)) : zero;
    const uint32_t a_lo[4] = {pa.x, pb.x, pa.y, pb.y}, a_hi[4] = {pa.z, pb.z, pa.w, pb.w};
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (j < n_tiles) {
        const int r = r0 + 8 * j + g;
        const uint4 b = r < R ? __ldg(reinterpret_cast<const uint4*>(ve + static_cast<long long>(r) * K + k0)) : zero;
        mma16816<T>(acc[j], a_lo, b.x, b.y, acc[j]);
        mma16816<T>(acc[j], a_hi, b.z, b.w, acc[j]);
      }
    }
  }
}

constexpr int kLrThreads = 256;  // grouped_lowrank_kernel's block: 8 warps

// Low-rank products t[m, r] = sum over k of x[m, k] * v[e(m), r, k], fp32, for the rows of every tile.
// Grid (n_slots, ceil(R / 64), k_splits); a block of 8 warps takes one tile's rows (TM / 16 sub-tiles of 16)
// against 64 ranks on mma.sync, its warps split between the sub-tiles and 8 / (TM / 16) ways of the block's
// k range, the ways summed through shared memory in a fixed order. With several k splits the blocks write
// partials t_part[z] and the last split of a (tile, rank chunk) to finish sums them in split order into
// t_sum (a counter per tile and rank chunk, zeroed before the launch); with one, t_part[0] is t.
// History (bench_moe.py, bf16, rank 32): the first form (fp32 FMAs on 2-byte loads staged through shared
// memory, 64 x 64 outputs a block) took 47-126 us a launch beside 115-237 us GEMMs (H100 2026-12-06 19:27,
// --profile, eager); on mma.sync with one warp per 16 rows it took 25-54 (H200 20:33), and the GEMM's
// epilogue still summed up to 32 partials a t element in every column tile: rank 32 cost 14-46% of the
// layer (rank 0 against 32, same tree). Summed once per tile by the last split, one warp per 16 rows and
// about 16 warps per SM (H100 20:55 UTC): Mixtral-shaped 5-21% faster at M = 32-512, Qwen3-shaped M=128 11%, but
// M=512 3% slower, the t kernel alone 56 us (MILO_INT3_PDL=0): the last split's lone 1-2 warps summed
// 8-32 partials with scalar loads. Hence the 8-warp blocks: fewer k splits, the ways reduced on chip, the
// last sum by 256 threads in 16-byte loads.
template <typename T, int TM>
__global__ void __launch_bounds__(kLrThreads) grouped_lowrank_kernel(
    const T* __restrict__ x, const T* __restrict__ v, const int4* __restrict__ tiles, float* __restrict__ t,
    float* __restrict__ t_sum, int* __restrict__ counters, int K, int R, long long v_estride, int k_chunk,
    long long split_stride, unsigned delay_ns, const int* __restrict__ ranks) {
  constexpr int kSub = TM / 16, kWays = 8 / kSub;
  static_assert(kSub * kWays == 8, "TM must be 16, 32, 64 or 128");
  __shared__ float red[kWays > 1 ? 8 * 32 * 32 : 1];  // kWays > 1: each warp's fragments, lane-major
  __shared__ int last;
  grid_dep_launch_dependents();  // the GEMM launched after this kernel waits for t only in its epilogue
  const int4 tl = tiles[blockIdx.x];
  if (tl.x < 0) return;  // the whole block: an empty slot, whose counter nobody reads
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, sub = warp % kSub, way = warp / kSub;
  const int m0 = tl.y + 16 * sub, m_end = tl.z, r0 = blockIdx.y * 64;
  const int k_begin = blockIdx.z * k_chunk, k_stop = min(K, k_begin + k_chunk);
  const int way_chunk = ((k_stop - k_begin + kWays - 1) / kWays + 31) / 32 * 32;
  float acc[8][4];
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[j][c] = 0.f;
  // ranks past the expert's own (ranks != nullptr: each expert's rank) come out zero, V not read there: a whole
  // 64-rank chunk past it does no mma, the chunk holding it stops at its n8 tile and loads zeros past the rank
  const int rank_e = expert_rank(ranks, R, tl.x);
  if (m0 < m_end && r0 < rank_e)
    lowrank_tile_warp<T>(x, v, tl.x, m0, m_end, r0, K, rank_e, v_estride, min(k_stop, k_begin + way * way_chunk),
                         min(k_stop, k_begin + (way + 1) * way_chunk), acc);
  if constexpr (kWays > 1) {  // ways 1.. hand their fragments to way 0 of their sub-tile
    if (way > 0) {
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) red[(warp * 32 + j * 4 + c) * 32 + lane] = acc[j][c];
    }
    __syncthreads();
    if (way == 0) {
      for (int w = 1; w < kWays; ++w)
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[j][c] += red[((w * kSub + sub) * 32 + j * 4 + c) * 32 + lane];
    }
  }
  if (delay_ns != 0) sleep_ns(delay_ns);  // tests only (MILO_INT3_TEST_T_DELAY_NS)
  if (way == 0 && m0 < m_end) {
    float* tz = t + blockIdx.z * split_stride;
    const int g = lane >> 2, t4 = lane & 3;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {  // acc[j][c]: row m0 + g + 8 (c >> 1), rank r0 + 8j + 2 t4 + (c & 1)
        const int m = m0 + g + 8 * (c >> 1), r = r0 + 8 * j + 2 * t4 + (c & 1);
        if (m < m_end && r < R) tz[static_cast<long long>(m) * R + r] = acc[j][c];
      }
    }
  }
  if (gridDim.z == 1) return;
  // the last split of this (tile, rank chunk) to finish sums the partials in split order into t_sum
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(counters + blockIdx.x * gridDim.y + blockIdx.y, 1) == gridDim.z - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  const int n_r = min(64, R - r0), rows = m_end - tl.y, splits = gridDim.z;
  if ((R & 3) == 0) {  // 16-byte units of 4 ranks (t's rows are then 16-byte aligned)
    const int units = n_r / 4;
    for (int i = threadIdx.x; i < rows * units; i += kLrThreads) {
      const long long off = static_cast<long long>(tl.y + i / units) * R + r0 + 4 * (i % units);
      float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 8
      for (int z = 0; z < splits; ++z) {
        const float4 p = __ldcg(reinterpret_cast<const float4*>(t + z * split_stride + off));
        sum.x += p.x;
        sum.y += p.y;
        sum.z += p.z;
        sum.w += p.w;
      }
      *reinterpret_cast<float4*>(t_sum + off) = sum;
    }
  } else {
    for (int i = threadIdx.x; i < rows * n_r; i += kLrThreads) {
      const long long off = static_cast<long long>(tl.y + i / n_r) * R + r0 + i % n_r;
      float sum = 0.f;
#pragma unroll 8
      for (int z = 0; z < splits; ++z) sum += __ldcg(t + z * split_stride + off);
      t_sum[off] = sum;
    }
  }
}

// k splits of grouped_lowrank_kernel: about 2 blocks (16 warps) per SM over the expected busy row tiles and
// the 64-rank chunks, at most 32 splits, each warp's way of a split at least 64 k; returns (splits, k per split)
std::pair<int, int> tiled_lowrank_splits(int sms, int busy_tiles, int bm, int R, int K) {
  const int r_chunks = (R + 63) / 64;
  const int ways = 8 / (bm <= 16 ? 1 : bm <= 32 ? 2 : bm <= 64 ? 4 : 8);
  int splits = 1;
  if (R > 0) {
    const int want = (2 * sms + busy_tiles * r_chunks - 1) / (busy_tiles * r_chunks);
    splits = std::max(1, std::min({want, 32, K / (64 * ways)}));
  }
  const int k_chunk = ((K + splits - 1) / splits + 31) / 32 * 32;
  return {(K + k_chunk - 1) / k_chunk, k_chunk};
}

// grouped_input() for fp16 / bf16 in one pass: a thread writes 8 values of an output row, read through
// x_rows (int32 or int64; an index outside [0, x_rows_n) gives zeros) and gated with kAct (load_input8, as the
// decode kernel reads its rows). Its torch form took up to 9 kernels a call (the index widened, two
// compares and their union, a clamp, the gather, the fill, silu, mul; H100 2026-12-06, bench_moe.py --profile,
// Qwen3-shaped M=512: the layer's torch kernels 54 us in all, the input's share not separated).
template <typename T, bool kAct, typename I>
__global__ void __launch_bounds__(256) grouped_input_kernel(const T* __restrict__ x, long long ldx,
                                                           const I* __restrict__ x_rows, long long x_rows_n,
                                                           long long rows, int K, T* __restrict__ out) {
  const long long units = rows * (K / 8);
  for (long long u = blockIdx.x * 256LL + threadIdx.x; u < units; u += gridDim.x * 256LL) {
    const long long m = u / (K / 8);
    const int k = static_cast<int>(u - m * (K / 8)) * 8;
    const long long r = x_rows != nullptr ? static_cast<long long>(x_rows[m]) : m;
    const T* row = r >= 0 && r < x_rows_n ? x + r * ldx : nullptr;
    *reinterpret_cast<uint4*>(out + m * K + k) = load_input8<T, kAct>(row, K, k);
  }
}

}  // namespace

// The grouped op's input as a plain [rows, K] tensor (for the paths whose kernels read x directly):
// rows gathered by x_rows (an index outside [0, x.size(0)) gives a zero row), then silu(gate) * up of
// the [gate | up] halves for kActSiluMul, rounded to x's dtype at each step as the reference does.
at::Tensor grouped_input(const at::Tensor& x, const std::optional<at::Tensor>& x_rows, int act, int64_t K) {
  const bool one_pass = (x_rows.has_value() || act == kActSiluMul) && x.is_cuda() &&
                        (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16) && K % 8 == 0 &&
                        x.stride(1) == 1 && x.stride(0) % 8 == 0 &&
                        reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0;
  if (one_pass) {
    const int64_t rows = x_rows.has_value() ? x_rows->numel() : x.size(0);
    at::Tensor out = at::empty({rows, K}, x.options());
    if (rows == 0) return out;
    const at::Tensor idx = x_rows.has_value() ? x_rows->contiguous() : at::Tensor();
    const long long units = rows * (K / 8);
    const int blocks = static_cast<int>(std::min<long long>((units + 255) / 256, 8LL * dev_info().sms));
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    dispatch_dtype_act(x.scalar_type(), act == kActSiluMul, [&](auto dtype, auto act_tag) {
      using T = typename decltype(dtype)::type;
      const auto launch = [&](auto i_tag) {
        using I = decltype(i_tag);
        grouped_input_kernel<T, decltype(act_tag)::value, I><<<blocks, 256, 0, stream>>>(
            reinterpret_cast<const T*>(x.data_ptr()), x.stride(0), idx.defined() ? idx.data_ptr<I>() : nullptr,
            x.size(0), rows, static_cast<int>(K), reinterpret_cast<T*>(out.data_ptr()));
      };
      if (idx.defined() && idx.scalar_type() == at::kLong)
        launch(int64_t{});
      else
        launch(int32_t{});
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }
  at::Tensor xi = x;
  if (x_rows.has_value()) {
    const at::Tensor idx = x_rows->to(at::kLong);
    if (x.size(0) == 0) {
      xi = at::zeros({idx.numel(), x.size(1)}, x.options());
    } else {
      const at::Tensor outside = idx.lt(0).logical_or(idx.ge(x.size(0)));
      xi = x.index_select(0, idx.clamp(0, x.size(0) - 1)).masked_fill_(outside.unsqueeze(1), 0);
    }
  }
  if (act == kActSiluMul) xi = at::silu(xi.narrow(1, 0, K)).mul(xi.narrow(1, K, K));
  return xi.contiguous();
}

int parse_activation(c10::string_view activation) {
  if (activation == "none") return kActNone;
  if (activation == "silu_mul") return kActSiluMul;
  TORCH_CHECK(false, "int3_grouped_linear: unknown activation '", std::string(activation),
              "'; use 'none' or 'silu_mul' (silu(x[:, :K]) * x[:, K:])");
  return kActNone;
}

at::Tensor int3_grouped_linear_cuda(const at::Tensor& x, const at::Tensor& offsets, const at::Tensor& qdata,
                                    const at::Tensor& scales, const at::Tensor& zeros, const at::Tensor& ut,
                                    const at::Tensor& v, int64_t group_size, const std::optional<at::Tensor>& x_rows,
                                    c10::string_view activation, c10::string_view out_activation,
                                    const std::optional<at::Tensor>& ranks) {
  const int act = parse_activation(activation), out_act = parse_activation(out_activation);
  TORCH_CHECK(qdata.dim() == 3 && qdata.scalar_type() == at::kInt && qdata.size(2) % 3 == 0,
              "int3_grouped_linear: qdata must be int32 [E, N, 3K/32]");
  const int64_t E64 = qdata.size(0), N64 = qdata.size(1), K64 = qdata.size(2) / 3 * 32;
  const int64_t x_cols = act == kActSiluMul ? 2 * K64 : K64;
  TORCH_CHECK(x.dim() == 2 && x.size(1) == x_cols, "int3_grouped_linear: x must be [rows, ", x_cols, "] for qdata's K = ",
              K64, act == kActSiluMul ? " with activation='silu_mul' ([gate | up])" : "", ", got ", x.sizes());
  if (x_rows.has_value())
    TORCH_CHECK(x_rows->dim() == 1 && (x_rows->scalar_type() == at::kInt || x_rows->scalar_type() == at::kLong) &&
                    x_rows->is_cuda(),
                "int3_grouped_linear: x_rows must be an int32/int64 [rows] tensor on the GPU (row i reads x[x_rows[i]])");
  const int64_t rows64 = x_rows.has_value() ? x_rows->numel() : x.size(0);
  TORCH_CHECK(offsets.dim() == 1 && offsets.numel() == E64 &&
                  (offsets.scalar_type() == at::kInt || offsets.scalar_type() == at::kLong),
              "int3_grouped_linear: offsets must be int32/int64 [E] (end row of each expert)");
  TORCH_CHECK(group_size > 0 && K64 % group_size == 0, "int3_grouped_linear: K must be a multiple of group_size");
  const int64_t groups = K64 / group_size;
  TORCH_CHECK(scales.dim() == 3 && scales.size(0) == E64 && scales.size(1) == N64 && scales.size(2) == groups,
              "int3_grouped_linear: scales must be [E, N, K/g]");
  TORCH_CHECK(zeros.sizes() == scales.sizes(), "int3_grouped_linear: zeros must be [E, N, K/g]");
  TORCH_CHECK(ut.dim() == 3 && ut.size(0) == E64 && ut.size(2) == N64, "int3_grouped_linear: ut must be [E, R, N]");
  TORCH_CHECK(v.dim() == 3 && v.size(0) == E64 && v.size(1) == ut.size(1) && v.size(2) == K64,
              "int3_grouped_linear: v must be [E, R, K]");
  if (ranks.has_value())
    TORCH_CHECK(ranks->dim() == 1 && ranks->numel() == E64 &&
                    (ranks->scalar_type() == at::kInt || ranks->scalar_type() == at::kLong),
                "int3_grouped_linear: ranks must be an int32/int64 [E] tensor (each expert's rank), got ",
                ranks->sizes(), " ", ranks->scalar_type());
  TORCH_CHECK(x.is_cuda() && offsets.is_cuda() && qdata.is_cuda() && scales.is_cuda() && zeros.is_cuda() &&
                  ut.is_cuda() && v.is_cuda() && (!ranks.has_value() || ranks->is_cuda()),
              "int3_grouped_linear (CUDA): all tensors must be on the GPU");
  TORCH_CHECK(out_act == kActNone || N64 % 2 == 0, "int3_grouped_linear: out_activation='silu_mul' gates the [gate | up] ",
              "halves of y, so N must be even; got N = ", N64);
  c10::cuda::CUDAGuard guard(x.device());
  // y written whole, then gated by out_activation: every path but the decode kernel writing the gated y itself
  const int64_t ny = out_act == kActNone ? N64 : N64 / 2;
  const auto gated = [&](const at::Tensor& y) {
    return out_act == kActNone ? y : grouped_input(y, std::nullopt, out_act, ny);
  };
  const at::ScalarType xt = x.scalar_type();
  const int G = static_cast<int>(group_size);
  const DevInfo dinfo = dev_info();
  const bool fused = (xt == at::kHalf || xt == at::kBFloat16) && scales.scalar_type() == xt &&
                     zeros.scalar_type() == xt && ut.scalar_type() == xt && v.scalar_type() == xt &&
                     dinfo.major >= 8 && K64 % kInt3BK == 0 && N64 % 8 == 0 && (G == 32 || G == 64 || G == 128) &&
                     N64 < (1LL << 30) && K64 < (1LL << 27) && rows64 < (1LL << 24) && x.size(0) < (1LL << 31) &&
                     E64 < (1LL << 16);
  if (!fused) {
    // other dtypes / shapes: one int3_linear per expert; reads offsets on the host (a sync, so
    // not graph-capturable), like the reference
    const at::Tensor xin = grouped_input(x, x_rows, act, K64);
    at::Tensor y = at::zeros({rows64, N64}, x.options());
    const at::Tensor off = offsets.to(at::kCPU).to(at::kLong);
    const int64_t* o = off.data_ptr<int64_t>();
    const at::Tensor rk = ranks.has_value() ? ranks->to(at::kCPU).to(at::kLong) : at::Tensor();
    int64_t prev = 0;
    for (int64_t e = 0; e < E64; ++e) {
      const int64_t end = std::max(prev, std::min(o[e], rows64));
      const int64_t r = rk.defined() ? std::max<int64_t>(0, std::min(rk.data_ptr<int64_t>()[e], ut.size(1)))
                                     : ut.size(1);
      if (end > prev)
        y.narrow(0, prev, end - prev)
            .copy_(int3_linear_cuda(xin.narrow(0, prev, end - prev), qdata[e], scales[e], zeros[e],
                                    ut[e].narrow(0, 0, r), v[e].narrow(0, 0, r), group_size, std::nullopt,
                                    std::nullopt));
      prev = end;
    }
    return gated(y);
  }
  if (rows64 == 0 || N64 == 0) return at::empty({rows64, ny}, x.options());
  if (E64 == 0) return at::zeros({rows64, ny}, x.options());

  const int E = static_cast<int>(E64), N = static_cast<int>(N64), K = static_cast<int>(K64);
  const int rows = static_cast<int>(rows64), R = static_cast<int>(ut.size(1));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // tile height from the mean rows per busy expert (static: depends only on shapes)
  const int busy = std::max(1, std::min(E, rows));
  const int mean_rows = (rows + busy - 1) / busy;
  const int forced = forced_cfg("MILO_INT3_GROUPED_CFG");
  const int cfg = forced <= 4 ? forced : 0;  // tiles 1-4 (int3_gemm.cuh) only when forced
  // decode (up to 4 rows per busy expert): the decode kernel on tiles of at most 2 rows (4 when the mean
  // is above 1; an expert past 4 rows takes several tiles). H100, bench_moe.py: Mixtral-shaped M=8 (2 rows
  // per expert) 533 us vs 730 with the mma tiles; 2026-12-06, up to 4 rows instead of 2: Mixtral-shaped M=16
  // (4 rows) 651 -> 587 us, DeepSeek-V2-Lite-shaped M=32 (3) 454 -> 369, the others unchanged. Past that a tile
  // re-reads the weights too often (8-row tiles measured slower: kTRows). H100 2026-12-07, MILO_INT3_GROUPED_GEMV_BM
  // = 2 / 4 at every M (us): Qwen3-shaped M=1 / 8 / 32 36.1 / 105.8 / 230.6 against 42.3 / 107.2 / 192.8,
  // DSV2-Lite-shaped 66.4 / 158.7 / 304.7 against 70.4 / 160.5 / 264.1, Mixtral-shaped M=1 / 8 96.8 / 363.7 against
  // 107.6 / 333.2: this rule's choice the faster in each.
  // Its kernels read the input rows gathered and gated themselves (and on small grids find their tiles
  // from the offsets, below); the tensor-core path gets a tile list and a materialized input.
  const bool use_gemv = forced == 0 && K % 128 == 0 &&
                        mean_rows <= env_int("MILO_INT3_GROUPED_GEMV_MAX_ROWS", 4);
  // One-token decode: 1-row tiles on the grouped op's own 1-row instance (it ran the 2-row one with a row of zeros)
  // where the rows are unlikely to share an expert, rows (rows - 1) <= E (at most half a pair expected under uniform
  // routing; one token's top-k never repeats an expert; M = 1 alone in the Mixtral-, Qwen3- and DeepSeek-V2-Lite-
  // shaped layers), and the input is not gated in the kernel (the 1-row instances stage no activation). H100
  // 2026-12-08 01:14-01:29 UTC, 1-row tiles (MILO_INT3_GROUPED_GEMV_BM=1) against the 2-row rule, bench_moe.py
  // milo-grouped M=1, three rounds (us): Mixtral-shaped 86.1 / 86.6 / 85.9 against 89.4 / 88.8 / 89.3,
  // DSV2-Lite-shaped 60.1 / 60.2 / 59.9 against 61.2 / 60.6 / 60.9, Qwen3-shaped 28.9 / 29.0 / 28.9 against 29.2 /
  // 28.7 / 29.0; the 24-layer decode loop 280.8 / 280.5 against 273.8 / 277.0 tok/s.
  // MILO_INT3_GROUPED_GEMV_BM = 1, 2 or 4 forces the tile height (tuning, tests; 1 only where act is none).
  const int bm_env = env_int("MILO_INT3_GROUPED_GEMV_BM", 0);
  const bool one_row = act == kActNone && static_cast<long long>(rows) * (rows - 1) <= E;
  const int gemv_bm = (bm_env == 1 && act == kActNone) || bm_env == 2 || bm_env == kTRows ? bm_env
                      : mean_rows > 1                                                     ? kTRows
                      : one_row                                                           ? 1
                                                                                          : 2;
  // Past that, tile 7 (the weight as the mma A operand, int3_gemm_wa.cu), and tile 8 (its warpgroup-MMA form,
  // capability 9.0) past 16 rows per busy expert (64 before; below); MILO_INT3_GROUPED_CFG=1-4 / 7-9 forces a
  // tile. H100 2026-12-06 14:36 UTC, bench_moe.py milo-grouped under MILO_INT3_GROUPED_CFG=0 (then tiles 1-4: 16 / 32 /
  // 64 rows) / 7 / 8, us: Mixtral-shaped M=32 (8 rows per busy expert) 671 / 679 / 1224, M=128 (32) 1518 / 1224
  // / 1323, M=512 (128) 4189 / 3174 / 2934; Qwen3-shaped M=128 (8) 407 / 383 / 679, M=512 (32) 828 / 761 / 770.
  // Tile 8 past 16 rows since its copies and x's rewrite went to separate warpgroups (17:47 UTC, the default
  // then (tile 7 at 32 rows) / MILO_INT3_GROUPED_CFG=8 / 9: Mixtral-shaped M=128 1277 / 1195 / 1290, M=512 2789 /
  // 2789 / 3251; Qwen3-shaped M=128 (8 rows) 366 / 411 / 452, M=512 (32) 770 / 749 / 831)
  const bool tile8 = !use_gemv && (forced >= 8 ? check_tile8(dinfo) : forced == 0 && tile8_runs(dinfo) && mean_rows > 16);
  const bool tile7 = !use_gemv && (forced == 0 || forced == 7 || tile8);
  const int bm = use_gemv ? gemv_bm : (tile7 ? int3_gemm_wa_bt(mean_rows, tile8) : int3_cfg_bm(cfg));
  const int bn = tile7 ? kInt3WaBN : int3_cfg_bn(cfg, G);
  const int n_slots = (rows + bm - 1) / bm + busy;
  TORCH_CHECK(n_slots < 65536, "int3_grouped_linear: too many row tiles");
  const int n_tiles = (N + bn - 1) / bn;
  const int total_stages = K / kInt3BK;
  // expected busy tiles: one per busy expert when tiles are short, else rows / bm
  const int est = std::max(1, std::min(n_slots, std::max(busy, (rows + bm - 1) / bm)));
  const int forced_splits = env_int("MILO_INT3_SPLITS", 0);
  int splits = 1, sps = total_stages;
  if (tile7) {
    std::tie(splits, sps) = int3_gemm_wa_splits(n_tiles * est, K, dinfo.sms, forced_splits);
  } else if (!use_gemv) {  // tiles 1-4: about their blocks per SM over the expected busy tiles
    const int target = dinfo.sms * std::max(1, int3_cfg_ctas_per_sm(cfg));
    splits = forced_splits > 0 ? forced_splits : (target + n_tiles * est - 1) / (n_tiles * est);
    splits = std::max(1, std::min(splits, total_stages));
    sps = (total_stages + splits - 1) / splits;
    splits = (total_stages + sps - 1) / sps;
  }

  const int64_t part_floats = splits > 1 ? static_cast<int64_t>(splits) * rows64 * N64 : 0;
  const int64_t n_counters = splits > 1 ? static_cast<int64_t>(n_slots) * n_tiles : 0;
  // split-K of the low-rank pre-step: the tile kernel before the decode kernel (MILO_INT3_GROUPED_T_TILE=0: the
  // dense op's rows kernel), else the tiled kernel
  const bool t_tile = use_gemv && env_int("MILO_INT3_GROUPED_T_TILE", 1) != 0;
  const std::pair<int, int> t_split = t_tile     ? tile_t_splits(dinfo.sms, est, R, K, true)
                                      : use_gemv ? lowrank_rows_splits(K)
                                                 : tiled_lowrank_splits(dinfo.sms, est, bm, R, K);
  const int t_splits = t_split.first, k_chunk = t_split.second;  // (not a structured binding: a lambda captures it)
  // the tiled t kernel sums its own splits (into t_sum, counters per tile and rank chunk); the decode kernel
  // sums the rows kernel's
  const bool t_summed = R > 0 && !use_gemv && t_splits > 1;
  const int64_t t_floats = R > 0 ? static_cast<int64_t>(t_splits + (t_summed ? 1 : 0)) * rows64 * R : 0;
  const int64_t n_t_counters = t_summed ? static_cast<int64_t>(n_slots) * ((R + 63) / 64) : 0;
  // The decode kernel's blocks find their own tiles from the offsets (two block scans each, no tile-list
  // kernel) while the grid is a few waves; past that the scans, once per block, cost more than the
  // launch they save (H200 2026-12-03, bench_moe.py Mixtral-shaped M=8, 21504 blocks: 479 -> 538 us).
  // MILO_INT3_GROUPED_TILE_LOOKUP=1 / 0 forces it on / off (tests).
  Int3GemmParams shape_p;  // the launch's shape; offsets only mark it grouped (launch_wk_log2())
  shape_p.N = N;
  shape_p.K = K;
  shape_p.M = rows;
  shape_p.offsets = offsets.data_ptr();
  const GemvLaunch glaunch = gemv_launch(R, dinfo);
  const int lookup_env = env_int("MILO_INT3_GROUPED_TILE_LOOKUP", -1);
  const bool lookup = use_gemv && (lookup_env >= 0 ? lookup_env > 0
                                                   : int3_gemv_blocks(shape_p, n_slots, bm, G, glaunch) <=
                                                         4LL * 2 * dinfo.sms);
  const int64_t tile_ints = lookup ? 0 : 4LL * n_slots;
  // one scratch allocation: [tiles (int4) | t partials, t_sum (fp32) | partials (fp32) | counters | t counters (int)]
  at::Tensor ws = at::empty({tile_ints + t_floats + part_floats + n_counters + n_t_counters},
                            x.options().dtype(at::kFloat));
  float* wsp = ws.data_ptr<float>();
  int4* tiles = lookup ? nullptr : reinterpret_cast<int4*>(wsp);
  float* tbuf = wsp + tile_ints;
  float* t_sum = t_summed ? tbuf + static_cast<int64_t>(t_splits) * rows64 * R : nullptr;
  float* parts = tbuf + t_floats;
  int* counters = reinterpret_cast<int*>(parts + part_floats);
  int* t_counters = counters + n_counters;
  if (n_counters + n_t_counters > 0)
    C10_CUDA_CHECK(cudaMemsetAsync(counters, 0, (n_counters + n_t_counters) * sizeof(int), stream));

  // The decode kernel reads the input rows itself (gather, and the activation where it stages x once per
  // block, K <= 8 slices of 512: past that every warp gates its slice again, and a Mixtral-shaped down
  // projection (K = 14336) got 20 us slower than with the activation materialized, H200 2026-12-03);
  // otherwise the kernels get the input materialized.
  const bool in_kernel_input = use_gemv && (act == kActNone || K <= 8 * 512);
  const at::Tensor xa = aligned_contig(in_kernel_input ? x : grouped_input(x, x_rows, act, K64), 16);
  at::Tensor rows_i32;
  if (in_kernel_input && x_rows.has_value()) rows_i32 = x_rows->to(at::kInt).contiguous();
  const at::Tensor qa = aligned_contig(qdata, 16);
  const at::Tensor sa = aligned_contig(scales, 8);
  const at::Tensor za = aligned_contig(zeros, 8);
  const at::Tensor off = offsets.contiguous();

  at::Tensor uta, va, ranks_i32;
  if (R > 0) {
    uta = aligned_contig(ut, 16);
    va = aligned_contig(v, 16);
    // each expert's rank bounds its low-rank term: its t is zero past it (both paths' t kernels, V not read
    // there) and the decode kernel's epilogue stops there (it finds a block's expert from its U^T offset in 32
    // bits); the tensor-core kernels' epilogue multiplies those zeros by U^T's padding
    if (ranks.has_value()) ranks_i32 = ranks->to(at::kInt).contiguous();
  }
  Int3GemmParams p;
  p.x = xa.data_ptr();
  p.q = qa.data_ptr<int32_t>();
  p.scales = sa.data_ptr();
  p.zeros = za.data_ptr();
  p.t = R > 0 ? (t_summed ? t_sum : tbuf) : nullptr;
  p.ut = R > 0 ? uta.data_ptr() : nullptr;
  p.bias = nullptr;
  p.ws = splits > 1 ? parts : nullptr;
  p.counters = splits > 1 ? counters : nullptr;
  p.M = rows;
  p.N = N;
  p.K = K;
  p.R = R;
  p.splits = splits;
  p.stages_per_split = sps;
  p.tiles = tiles;
  p.q_estride = N64 * (K64 / 32 * 3);
  p.s_estride = N64 * groups;
  p.ut_estride = static_cast<long long>(R) * N64;
  p.t_splits = t_summed ? 1 : t_splits;
  p.t_split_stride = rows64 * R;
  p.ldx = static_cast<int>(xa.size(1));
  // the decode kernel finds a block's expert from its U^T offset in 32 bits; tiles 7-9 read it from the list
  p.ranks = ranks_i32.defined() && (!use_gemv || E64 * R * N64 < (1LL << 31)) ? ranks_i32.data_ptr<int>() : nullptr;
  if (lookup) {  // tiles from the offsets
    p.offsets = off.data_ptr();
    p.offsets_i64 = off.scalar_type() == at::kLong;
    p.n_experts = E;
    p.tile_rows = bm;
  }
  if (in_kernel_input) {
    p.x_rows = x_rows.has_value() ? rows_i32.data_ptr<int>() : nullptr;
    p.x_rows_n = x.size(0);
    p.act = act;
  }
  // out_activation in the decode kernel's epilogue where each block can take matching gate and up columns
  // (int3_gemv_gates_output()); elsewhere y is written whole and gated after (one more launch)
  if (out_act != kActNone && use_gemv && int3_gemv_gates_output(p, n_slots, bm, G, glaunch)) p.out_act = out_act;
  at::Tensor y = at::empty({rows64, p.out_act != kActNone ? ny : N64}, x.options());
  p.y = y.data_ptr();
  if (!lookup) {
    dispatch_dtype(xt, [&](auto dtype) {
      using TT = typename decltype(dtype)::type;
      grouped_tiles_kernel<TT><<<1, 256, 0, stream>>>(off.data_ptr(), off.scalar_type() == at::kLong, E, rows, bm,
                                                      n_slots, tiles, reinterpret_cast<TT*>(y.data_ptr()),
                                                      static_cast<int>(y.size(1)));
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  if (R > 0) {
    if (use_gemv) {
      if (t_tile)
        launch_lowrank_t_tile(xt, p, va.data_ptr(), n_slots, tbuf, t_splits, k_chunk, stream);
      else
        launch_lowrank_t_rows(xt, p, va.data_ptr(), n_slots, tbuf, t_splits, k_chunk, stream);
    } else {
      const dim3 grid(n_slots, (R + 63) / 64, t_splits);
      const long long vs_ = static_cast<long long>(R) * K, ss_ = rows64 * R;
      const unsigned delay_ns = test_t_delay_ns();
      dispatch_dtype(xt, [&](auto dtype) {
        using TT = typename decltype(dtype)::type;
        const auto launch = [&](auto tm) {  // the tile's rows, a template parameter
          grouped_lowrank_kernel<TT, decltype(tm)::value><<<grid, kLrThreads, 0, stream>>>(
              reinterpret_cast<const TT*>(xa.data_ptr()), reinterpret_cast<const TT*>(va.data_ptr()), tiles, tbuf,
              t_sum, t_counters, K, R, vs_, k_chunk, ss_, delay_ns,
              ranks_i32.defined() ? ranks_i32.data_ptr<int>() : nullptr);
        };
        if (bm <= 16) launch(std::integral_constant<int, 16>{});
        else if (bm <= 32) launch(std::integral_constant<int, 32>{});
        else if (bm <= 64) launch(std::integral_constant<int, 64>{});
        else launch(std::integral_constant<int, 128>{});
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  if (use_gemv) {
    launch_int3_gemv(xt == at::kHalf ? 0 : 1, G, p, n_slots, bm, glaunch, stream);
  } else if (tile7) {
    launch_int3_gemm_wa(forced >= 8 ? forced : (tile8 ? 8 : 7), xt == at::kHalf ? 0 : 1, G, bm, n_slots, p,
                        programmatic_after_t(R, dinfo), stream);
  } else {
    launch_int3_gemm(xt == at::kHalf ? 0 : 1, cfg, G, p, n_tiles, n_slots, programmatic_after_t(R, dinfo), stream);
  }
  return p.out_act != kActNone ? y : gated(y);
}

}  // namespace milo

TORCH_LIBRARY_IMPL(milo, CUDA, m) {
  m.impl("int3_linear", &milo::int3_linear_cuda);
  m.impl("int3_grouped_linear", &milo::int3_grouped_linear_cuda);
}
