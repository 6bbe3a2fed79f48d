// A top-k MoE router's forward (transformers' Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE routers): logits = x @ W^T,
// softmax over the experts in fp32, the top-k (descending, as torch.topk) and, where the model asks, the chosen
// probabilities divided by their sum. Semantics and the oracle: milo_tensor/ops/reference.py (router_topk).
//
// Why a kernel: in a compiled decode step the same is the router GEMM (cuBLAS split-K, two kernels, ~6 us) and
// torch's softmax, topk select, topk sort and renormalization (~11 us), about a tenth of a Mixtral-shaped
// decode layer (H100, 2026-12-07 11:55 UTC). For a small router (up to 128 KB of weight: Mixtral's 8 x 4096)
// and up to kRouterMaxTokens tokens it is one launch: the blocks of a token, an sm_90 cluster of up to 8, each
// read 8-16 KB of the weight, and one of them takes the top-k of all the token's logits through distributed
// shared memory. One block reads its share no faster than about 10 GB/s (H100, 2026-12-07 12:50 UTC: 64 KB in one
// block 7.8 us, 512 KB over 8 blocks 20 us), so a larger router (Qwen3's 128 x 2048, 512 KB) is read by one block
// per 8 KB (no cluster) writing its logits, then the top-k kernel runs, one block a token; more tokens take
// cuBLAS's GEMM and the top-k kernel.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "int3_gemm.cuh"  // to_float / from_float, grid_dep_*
#include "int3_launch.h"  // launch_ex, launch_programmatic_if, chain_programmatic

namespace milo {
namespace {

constexpr int kTopkMaxExperts = 1024;  // a thread per expert
constexpr int kTopkMaxK = 32;
constexpr int kRouterThreads = 1024;
constexpr int kRouterLogitsThreads = 256;  // the logits-only blocks: 8 KB of weight each, two 16-byte loads a thread
constexpr int kRouterMaxTokens = 16;            // the fused kernel's tokens; past them cuBLAS computes the logits
constexpr int kRouterMaxCluster = 8;            // blocks a token (the portable cluster size)
constexpr int kRouterBytesPerBlock = 8 * 1024;      // of the router's weight a block reads (more blocks, less each)
constexpr int kRouterMaxBlockBytes = 16 * 1024;     // ... and at most; a larger router takes cuBLAS's GEMM
constexpr int kRouterMaxBytes = kRouterMaxCluster * kRouterMaxBlockBytes;

struct ValIdx {
  float v;
  int i;
};
// the larger logit, ties to the lower expert (torch.topk's order among equal values is unspecified)
__device__ __forceinline__ ValIdx better(ValIdx a, ValIdx b) {
  return (b.v > a.v || (b.v == a.v && b.i < a.i)) ? b : a;
}

// barrier 1 of the block's first n threads (a multiple of 32): the top-k below runs on as many warps as there
// are experts, not on the whole block (H100, 2026-12-07 13:03 UTC: 1024 threads each looping over the 32 warps'
// partials took ~5 us of a 9 us Mixtral-shaped router)
__device__ __forceinline__ void bar_first(int n) { asm volatile("bar.sync 1, %0;\n" ::"r"(n) : "memory"); }

__device__ __forceinline__ ValIdx warp_best(ValIdx c) {
  for (int o = 16; o > 0; o >>= 1)
    c = better(c, ValIdx{__shfl_xor_sync(0xffffffffu, c.v, o), __shfl_xor_sync(0xffffffffu, c.i, o)});
  return c;
}

// Softmax, top-k and renormalization of one token by the block's first nt = 32 * ceil(E / 32) threads (the
// others must not call it): thread e (< E) holds logit x of expert e. Experts are chosen by logit (softmax is
// monotone; NaN as the largest, as torch.topk), k rounds of an argmax (warp shuffles, then each warp reduces
// the warps' winners, double-buffered: one barrier a round); the values are exp(x - max) / sum as torch's
// softmax computes them.
__device__ void block_topk(float x, int E, int k, bool renormalize, float* __restrict__ w_out,
                           int64_t* __restrict__ i_out) {
  __shared__ float s_max[32], s_sum[32];
  __shared__ ValIdx s_best[2][32];
  __shared__ float s_p[kTopkMaxK];
  __shared__ int s_e[kTopkMaxK];
  const int e = threadIdx.x, lane = e & 31, warp = e >> 5;
  const int nt = (E + 31) / 32 * 32, warps = nt >> 5;
  if (e >= E) x = -INFINITY;
  float m = x;
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  if (warps > 1) {
    if (lane == 0) s_max[warp] = m;
    bar_first(nt);
    m = lane < warps ? s_max[lane] : -INFINITY;
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  }
  const float ex = e < E ? expf(x - m) : 0.f;
  float sum = ex;
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (warps > 1) {
    if (lane == 0) s_sum[warp] = sum;
    bar_first(nt);
    sum = lane < warps ? s_sum[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  }
  const float key = isnan(x) ? INFINITY : x;
  bool taken = e >= E;
  for (int r = 0; r < k; ++r) {
    ValIdx b = warp_best(ValIdx{taken ? -INFINITY : key, taken ? INT_MAX : e});
    if (warps > 1) {  // s_best[r & 1] was last read in round r - 2, before every thread passed round r - 1's barrier
      if (lane == 0) s_best[r & 1][warp] = b;
      bar_first(nt);
      b = warp_best(lane < warps ? s_best[r & 1][lane] : ValIdx{-INFINITY, INT_MAX});
    }
    if (e == b.i) {  // an untaken expert always wins over the taken ones (index INT_MAX), so k <= E are chosen
      taken = true;
      s_p[r] = ex / sum;
      s_e[r] = e;
    }
  }
  bar_first(nt);
  if (e < k) {
    float total = 1.f;
    if (renormalize) {
      total = 0.f;
      for (int r = 0; r < k; ++r) total += s_p[r];
    }
    w_out[e] = s_p[e] / total;
    i_out[e] = s_e[e];
  }
}

// the top-k of logits already computed (cuBLAS's): one block a token
template <typename T>
__global__ void router_topk_kernel(const T* __restrict__ logits, int E, int k, bool renormalize,
                                   float* __restrict__ w_out, int64_t* __restrict__ i_out) {
  grid_dep_wait();  // launched programmatically (chain_programmatic()): the router's GEMM is done from here
  grid_dep_launch_dependents();
  const long long t = blockIdx.x;
  const float x = threadIdx.x < E ? to_float(logits[t * E + threadIdx.x]) : -INFINITY;
  block_topk(x, E, k, renormalize, w_out + t * k, i_out + t * k);
}

// fp32 dot product of 16 bytes of x and of a weight row
template <typename T>
__device__ __forceinline__ float dot16(const int4& a, const int4& b) {
  const uint32_t ua[4] = {static_cast<uint32_t>(a.x), static_cast<uint32_t>(a.y), static_cast<uint32_t>(a.z),
                          static_cast<uint32_t>(a.w)};
  const uint32_t ub[4] = {static_cast<uint32_t>(b.x), static_cast<uint32_t>(b.y), static_cast<uint32_t>(b.z),
                          static_cast<uint32_t>(b.w)};
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (std::is_same_v<T, float>) {
      s = fmaf(__uint_as_float(ua[i]), __uint_as_float(ub[i]), s);
    } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {  // bf16 is the top half of an fp32
      s = fmaf(__uint_as_float(ua[i] << 16), __uint_as_float(ub[i] << 16), s);
      s = fmaf(__uint_as_float(ua[i] & 0xffff0000u), __uint_as_float(ub[i] & 0xffff0000u), s);
    } else {
      const float2 fa = __half22float2(*reinterpret_cast<const __half2*>(&ua[i]));
      const float2 fb = __half22float2(*reinterpret_cast<const __half2*>(&ub[i]));
      s = fmaf(fa.x, fb.x, s);
      s = fmaf(fa.y, fb.y, s);
    }
  }
  return s;
}

// How the blocks of a token share the router's forward: one block does it all; a cluster's blocks compute the
// logits and block 0 the top-k; or the blocks compute the logits only (router_topk_kernel after them).
enum class RouterMode { kOneBlock, kCluster, kLogitsOnly };

// The router's forward for one token per blockIdx.y: block `rank` = blockIdx.x of gridDim.x computes the logits
// of experts [rank * epb, rank * epb + epb), several warps a row where the block has fewer experts than warps
// (partials summed in a fixed order), and writes them rounded to T (as F.linear returns them); with kOneBlock or
// kCluster block 0 then takes the top-k of all E (a cluster's logits through its distributed shared memory).
// Needs H % (16 / sizeof(T)) == 0 and 16-byte aligned rows.
template <typename T, RouterMode kMode>
__global__ void __launch_bounds__(kRouterThreads)
    router_fused_kernel(const T* __restrict__ x, const T* __restrict__ weight, int H, int E, int k, bool renormalize,
                        T* __restrict__ logits, float* __restrict__ w_out, int64_t* __restrict__ i_out) {
  grid_dep_wait();  // launched programmatically (chain_programmatic()): the kernel writing x is done from here
  grid_dep_launch_dependents();
  __shared__ float s_part[kTopkMaxExperts];
  __shared__ float s_logit[kTopkMaxExperts];
  constexpr int V = 16 / sizeof(T);
  const int rank = blockIdx.x, blocks = gridDim.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
  const long long t = blockIdx.y;
  const int epb = (E + blocks - 1) / blocks, e0 = rank * epb, ne = max(0, min(E, e0 + epb) - e0);
  const int hv = H / V, slices = ne > 0 ? max(1, warps / ne) : 1, per = (hv + slices - 1) / slices;
  const int4* xr = reinterpret_cast<const int4*>(x + t * H);
  for (int item = warp; item < ne * slices; item += warps) {
    const int e = item / slices, s = item % slices;
    const int4* wr = reinterpret_cast<const int4*>(weight + static_cast<long long>(e0 + e) * H);
    const int v1 = min(hv, (s + 1) * per);
    float acc = 0.f;
#pragma unroll 4
    for (int v = s * per + lane; v < v1; v += 32) acc += dot16<T>(__ldg(xr + v), __ldg(wr + v));
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) s_part[item] = acc;
  }
  __syncthreads();
  const int j = threadIdx.x;
  if (j < ne) {
    float sum = 0.f;
    for (int s = 0; s < slices; ++s) sum += s_part[j * slices + s];
    const T l = from_float<T>(sum);
    logits[t * E + e0 + j] = l;
    s_logit[j] = to_float(l);
  }
  if constexpr (kMode == RouterMode::kLogitsOnly) return;
  float mine = -INFINITY;
  if constexpr (kMode == RouterMode::kCluster) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();  // every block's logits in its shared memory
    if (rank == 0 && j < E) mine = cluster.map_shared_rank(s_logit, j / epb)[j % epb];
    cluster.sync();  // and kept there until block 0 has read them
    if (rank != 0) return;
#else
    __trap();  // the host launches clusters only where this kernel was compiled for sm_90 (cluster_kernel_ok())
#endif
  } else {
    __syncthreads();
    if (j < E) mine = s_logit[j];
  }
  if (j >= (E + 31) / 32 * 32) return;  // block_topk's threads only
  block_topk(mine, E, k, renormalize, w_out + t * k, i_out + t * k);
}

// whether the cluster instance runs here: a GPU of compute capability 9+ and the kernel's code built for it
// (not JIT-compiled from an older PTX, where it traps)
bool cluster_kernel_ok() {
  static const bool ok = [] {
    int dev = 0, major = 0;
    cudaFuncAttributes attr{};
    const bool ok = cudaGetDevice(&dev) == cudaSuccess &&
                    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
                    major >= 9 &&
                    cudaFuncGetAttributes(&attr, router_fused_kernel<half, RouterMode::kCluster>) == cudaSuccess;
    (void)cudaGetLastError();  // a failed query leaves no error behind for the next launch's check
    return ok && attr.ptxVersion >= 90;
  }();
  return ok;
}

// how the fused kernel runs for a router of weight_bytes: blocks a token (0: not at all, cuBLAS's GEMM) and mode
struct RouterPlan {
  int blocks;
  RouterMode mode;
};
RouterPlan router_plan(long long weight_bytes, int E) {
  const long long per_8k = (weight_bytes + kRouterBytesPerBlock - 1) / kRouterBytesPerBlock;
  if (cluster_kernel_ok() && weight_bytes <= kRouterMaxBytes) {
    const int blocks = static_cast<int>(std::min<long long>({kRouterMaxCluster, E, per_8k}));
    return {blocks, blocks > 1 ? RouterMode::kCluster : RouterMode::kOneBlock};
  }
  if (weight_bytes <= kRouterMaxBlockBytes) return {1, RouterMode::kOneBlock};
  return {static_cast<int>(std::min<long long>(E, per_8k)), RouterMode::kLogitsOnly};
}

template <typename T>
void launch_fused(const at::Tensor& x, const at::Tensor& weight, int k, bool renormalize, const at::Tensor& logits,
                  const at::Tensor& w, const at::Tensor& idx, RouterPlan plan, cudaStream_t stream) {
  const int tokens = static_cast<int>(x.size(0)), H = static_cast<int>(x.size(1));
  const int E = static_cast<int>(weight.size(0));
  const bool cluster = plan.mode == RouterMode::kCluster, logits_only = plan.mode == RouterMode::kLogitsOnly;
  launch_ex(cluster       ? router_fused_kernel<T, RouterMode::kCluster>
            : logits_only ? router_fused_kernel<T, RouterMode::kLogitsOnly>
                          : router_fused_kernel<T, RouterMode::kOneBlock>,
            dim3(plan.blocks, tokens), dim3(logits_only ? kRouterLogitsThreads : kRouterThreads), 0,
            chain_programmatic(), cluster ? plan.blocks : 1, stream, reinterpret_cast<const T*>(x.data_ptr()),
            reinterpret_cast<const T*>(weight.data_ptr()), H, E, k, renormalize,
            reinterpret_cast<T*>(logits.data_ptr()), w.data_ptr<float>(), idx.data_ptr<int64_t>());
}

template <typename T>
void launch_topk(const at::Tensor& logits, int k, bool renormalize, const at::Tensor& w, const at::Tensor& idx,
                 cudaStream_t stream) {
  const int E = static_cast<int>(logits.size(1));
  launch_programmatic_if(router_topk_kernel<T>, dim3(logits.size(0)), dim3((E + 31) / 32 * 32), 0,
                         chain_programmatic(), stream, reinterpret_cast<const T*>(logits.data_ptr()), E, k,
                         renormalize, w.data_ptr<float>(), idx.data_ptr<int64_t>());
}

template <typename T>
struct DtypeTag {
  using type = T;
};
// f(DtypeTag<T>{}) for the kernels' dtypes (the caller has checked dt is one of them)
template <typename F>
void dispatch_router_dtype(at::ScalarType dt, F&& f) {
  if (dt == at::kHalf)
    f(DtypeTag<half>{});
  else if (dt == at::kBFloat16)
    f(DtypeTag<__nv_bfloat16>{});
  else
    f(DtypeTag<float>{});
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> router_topk_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                                int64_t top_k, bool renormalize) {
  TORCH_CHECK(x.is_cuda() && weight.is_cuda(), "router_topk (CUDA): x and weight must be on the GPU");
  TORCH_CHECK(x.device() == weight.device(), "router_topk: x and weight must be on one device, got ", x.device(),
              " and ", weight.device());
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "router_topk: x must be [tokens, hidden] and weight [experts, hidden], got ", x.sizes(), " and ",
              weight.sizes());
  const int64_t tokens = x.size(0), E = weight.size(0);
  TORCH_CHECK(top_k >= 1 && top_k <= E, "router_topk: top_k must be in [1, ", E, "] (the experts), got ", top_k);
  c10::cuda::CUDAGuard guard(x.device());
  const at::ScalarType dt = x.scalar_type();
  const bool kernel_dtype =
      (dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat) && weight.scalar_type() == dt;
  const bool topk_kernel = kernel_dtype && E <= kTopkMaxExperts && top_k <= kTopkMaxK && tokens < (1LL << 31);
  at::Tensor w = at::empty({tokens, top_k}, x.options().dtype(at::kFloat));
  at::Tensor idx = at::empty({tokens, top_k}, x.options().dtype(at::kLong));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int k = static_cast<int>(top_k);
  const RouterPlan plan = router_plan(E * x.size(1) * static_cast<long long>(x.element_size()), static_cast<int>(E));
  const bool whole_pieces = x.size(1) % (16 / x.element_size()) == 0;  // rows of 16-byte loads
  if (topk_kernel && tokens > 0 && tokens <= kRouterMaxTokens && whole_pieces) {
    const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
    if (aligned16(xc) && aligned16(wc)) {
      at::Tensor logits = at::empty({tokens, E}, x.options());
      dispatch_router_dtype(dt, [&](auto tag) {
        using T = typename decltype(tag)::type;
        launch_fused<T>(xc, wc, k, renormalize, logits, w, idx, plan, stream);
        if (plan.mode == RouterMode::kLogitsOnly) launch_topk<T>(logits, k, renormalize, w, idx, stream);
      });
      return {logits, w, idx};
    }
  }
  at::Tensor logits = at::linear(x, weight);
  if (!topk_kernel) {
    at::Tensor probs = at::softmax(logits, -1, at::kFloat);
    auto [tw, ti] = at::topk(probs, top_k, -1);
    return {logits, renormalize ? tw / tw.sum(-1, true) : tw, ti};
  }
  if (tokens == 0) return {logits, w, idx};
  dispatch_router_dtype(dt, [&](auto tag) {
    launch_topk<typename decltype(tag)::type>(logits, k, renormalize, w, idx, stream);
  });
  return {logits, w, idx};
}

}  // namespace
}  // namespace milo

TORCH_LIBRARY_IMPL(milo, CUDA, m) { m.impl("router_topk", &milo::router_topk_cuda); }
