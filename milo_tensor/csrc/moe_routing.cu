// MoE routing glue on CUDA: the launches around the grouped op (milo::int3_grouped_linear).
//
// In decode each of these is a few microseconds of launch for almost no work, and in plain torch the
// glue of one layer is a dozen kernels (sort, histogram, cumsum, two gathers, a multiply, a mask, a
// scatter, a sum). Here it is two: moe_route before the experts (a stable counting sort in one block)
// and moe_combine after them (each token's weighted sum of its rows, fp32, one block per token).
// Semantics and the oracle: milo_tensor/ops/reference.py (moe_route, moe_combine).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include "int3_gemm.cuh"    // to_float / from_float, grid_dep_*
#include "int3_launch.h"    // launch_programmatic_if, chain_programmatic

namespace milo {
namespace {

constexpr int kRouteMaxThreads = 1024;

// Exclusive prefix sum of a[0 .. n) in place (shared memory), by the whole block; returns the total.
// Warp scans with shuffles, the warp totals scanned by warp 0, chunk by chunk with a carry.
__device__ int block_exclusive_scan(int* a, int n, int* warp_sums) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warps = blockDim.x >> 5;
  int carry = 0;
  for (int base = 0; base < n; base += blockDim.x) {
    const int i = base + tid;
    const int v = i < n ? a[i] : 0;
    int incl = v;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int o = __shfl_up_sync(0xffffffffu, incl, d);
      if (lane >= d) incl += o;
    }
    if (lane == 31) warp_sums[warp] = incl;
    __syncthreads();
    if (warp == 0) {
      int w = lane < warps ? warp_sums[lane] : 0;
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const int o = __shfl_up_sync(0xffffffffu, w, d);
        if (lane >= d) w += o;
      }
      if (lane < warps) warp_sums[lane] = w;  // inclusive over warps
    }
    __syncthreads();
    const int before = warp == 0 ? 0 : warp_sums[warp - 1];
    if (i < n) a[i] = carry + before + incl - v;
    carry += warp_sums[warps - 1];
    __syncthreads();  // warp_sums is rewritten by the next chunk
  }
  return carry;
}

// One block. key(i) = ids[i] if it names an expert, else E (sentinel, sorted last). Counting sort:
// histogram, exclusive scan into each key's first row, then rows handed out in index order, chunk by
// chunk, warp by warp (lanes with the same key ranked by __match_any_sync), so equal keys keep their
// order (stable) and the result is the same on every run.
template <typename IdT>
__global__ void moe_route_kernel(const IdT* __restrict__ ids, int n, int top_k, int E,
                                 int* __restrict__ token_of_row, int* __restrict__ row_of_choice,
                                 int* __restrict__ offsets) {
  extern __shared__ int s_next[];  // [E + 1]: count, then the next free row of each key
  __shared__ int warp_sums[32];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warps = blockDim.x >> 5;
  grid_dep_wait();  // launched programmatically (chain_programmatic()): the router's kernels are done from here
  grid_dep_launch_dependents();
  auto key = [&](int i) -> int {
    const long long e = static_cast<long long>(ids[i]);
    return (e >= 0 && e < E) ? static_cast<int>(e) : E;
  };
  for (int e = tid; e <= E; e += blockDim.x) s_next[e] = 0;
  __syncthreads();
  for (int i = tid; i < n; i += blockDim.x) atomicAdd(&s_next[key(i)], 1);
  __syncthreads();
  block_exclusive_scan(s_next, E + 1, warp_sums);
  __syncthreads();
  for (int e = tid; e < E; e += blockDim.x) offsets[e] = s_next[e + 1];  // end row of e = first row of e + 1
  __syncthreads();
  for (int base = 0; base < n; base += blockDim.x) {
    const int i = base + tid;
    const bool valid = i < n;
    const int k = valid ? key(i) : -1;  // -1: a group of its own, never placed
    const unsigned peers = __match_any_sync(0xffffffffu, k);
    const int rank = __popc(peers & ((1u << lane) - 1u));
    const int leader = __ffs(peers) - 1;
    int first = 0;
    for (int w = 0; w < warps; ++w) {
      if (warp == w && valid && lane == leader) {
        first = s_next[k];
        s_next[k] = first + __popc(peers);
      }
      __syncthreads();
    }
    first = __shfl_sync(0xffffffffu, first, leader);
    if (valid) {
      const int row = first + rank;
      row_of_choice[i] = row;
      token_of_row[row] = i / top_k;
    }
  }
}

// One block per token: y[t, :] = sum over j of w[t, j] * out[row_of_choice[t * k + j], :] in fp32, in
// j order, skipping rows past offsets[E - 1] (dropped choices: their weight may be anything).
template <typename T, typename WT, int VEC>
__global__ void moe_combine_kernel(const T* __restrict__ out, const int* __restrict__ row_of_choice,
                                   const WT* __restrict__ w, const int* __restrict__ offsets, int E, int top_k,
                                   int H, T* __restrict__ y) {
  grid_dep_wait();  // as moe_route_kernel: the experts' last kernel is done from here
  const int t = blockIdx.x;
  const int end = E > 0 ? offsets[E - 1] : 0;
  for (int h0 = threadIdx.x * VEC; h0 < H; h0 += blockDim.x * VEC) {
    float acc[VEC];
#pragma unroll
    for (int u = 0; u < VEC; ++u) acc[u] = 0.f;
    for (int j = 0; j < top_k; ++j) {
      const int row = row_of_choice[t * top_k + j];
      if (row >= end) continue;
      const float wj = to_float(w[t * top_k + j]);
      const T* src = out + static_cast<long long>(row) * H + h0;
      if constexpr (VEC * sizeof(T) == 16) {
        const uint4 raw = *reinterpret_cast<const uint4*>(src);
        const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int u = 0; u < VEC; ++u) acc[u] = fmaf(wj, to_float(v[u]), acc[u]);
      } else {
#pragma unroll
        for (int u = 0; u < VEC; ++u) acc[u] = fmaf(wj, to_float(src[u]), acc[u]);
      }
    }
    T* dst = y + static_cast<long long>(t) * H + h0;
#pragma unroll
    for (int u = 0; u < VEC; ++u) dst[u] = from_float<T>(acc[u]);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_route_cuda(const at::Tensor& expert_ids, int64_t num_experts) {
  TORCH_CHECK(expert_ids.is_cuda(), "moe_route (CUDA): expert_ids must be on the GPU");
  TORCH_CHECK(expert_ids.scalar_type() == at::kLong || expert_ids.scalar_type() == at::kInt,
              "moe_route: expert_ids must be int64 or int32 (the router's top-k indices), got ",
              expert_ids.scalar_type());
  TORCH_CHECK(num_experts >= 0 && num_experts < (1 << 13),
              "moe_route: num_experts must be in [0, 8192) (one block's shared memory), got ", num_experts);
  const int64_t n64 = expert_ids.numel();
  TORCH_CHECK(n64 < (1LL << 31), "moe_route: too many (token, choice) pairs");
  const int top_k = expert_ids.dim() == 0 ? 1 : static_cast<int>(std::max<int64_t>(1, expert_ids.size(-1)));
  c10::cuda::CUDAGuard guard(expert_ids.device());
  const auto opts = expert_ids.options().dtype(at::kInt);
  at::Tensor token_of_row = at::empty({n64}, opts), row_of_choice = at::empty({n64}, opts);
  at::Tensor offsets = at::empty({num_experts}, opts);
  const int n = static_cast<int>(n64), E = static_cast<int>(num_experts);
  if (n == 0 && E == 0) return {token_of_row, row_of_choice, offsets};
  const at::Tensor ids = expert_ids.contiguous();
  // as few warps as the work needs: a decode step routes a handful of pairs (one barrier per warp)
  const int threads = static_cast<int>(std::min<int64_t>(kRouteMaxThreads, std::max<int64_t>(32, ((std::max(n, E + 1) + 31) / 32) * 32)));
  const size_t smem = (E + 1) * sizeof(int);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool pdl = chain_programmatic();
  int *tor = token_of_row.data_ptr<int>(), *roc = row_of_choice.data_ptr<int>(), *off = offsets.data_ptr<int>();
  if (ids.scalar_type() == at::kLong)
    launch_programmatic_if(moe_route_kernel<int64_t>, dim3(1), dim3(threads), smem, pdl, stream,
                           ids.data_ptr<int64_t>(), n, top_k, E, tor, roc, off);
  else
    launch_programmatic_if(moe_route_kernel<int32_t>, dim3(1), dim3(threads), smem, pdl, stream,
                           ids.data_ptr<int32_t>(), n, top_k, E, tor, roc, off);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {token_of_row, row_of_choice, offsets};
}

template <typename T, typename WT>
void launch_combine(const at::Tensor& out, const at::Tensor& rows, const at::Tensor& w, const at::Tensor& off,
                    int E, int tokens, int top_k, int H, at::Tensor& y, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const bool vec = H % V == 0 && reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0;
  const int per_thread = vec ? V : 1;
  const int threads = std::max(32, std::min(256, ((H / per_thread + 31) / 32) * 32));
  const T* op = reinterpret_cast<const T*>(out.data_ptr());
  const WT* wp = reinterpret_cast<const WT*>(w.data_ptr());
  T* yp = reinterpret_cast<T*>(y.data_ptr());
  const bool pdl = chain_programmatic();
  const int *rp = rows.data_ptr<int>(), *offp = off.data_ptr<int>();
  if (vec)
    launch_programmatic_if(moe_combine_kernel<T, WT, V>, dim3(tokens), dim3(threads), 0, pdl, stream, op, rp, wp, offp,
                           E, top_k, H, yp);
  else
    launch_programmatic_if(moe_combine_kernel<T, WT, 1>, dim3(tokens), dim3(threads), 0, pdl, stream, op, rp, wp, offp,
                           E, top_k, H, yp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_combine_w(const at::Tensor& out, const at::Tensor& rows, const at::Tensor& w, const at::Tensor& off,
                      int E, int tokens, int top_k, int H, at::Tensor& y, cudaStream_t stream) {
  switch (w.scalar_type()) {
    case at::kFloat: return launch_combine<T, float>(out, rows, w, off, E, tokens, top_k, H, y, stream);
    case at::kHalf: return launch_combine<T, half>(out, rows, w, off, E, tokens, top_k, H, y, stream);
    default: return launch_combine<T, __nv_bfloat16>(out, rows, w, off, E, tokens, top_k, H, y, stream);
  }
}

// Other dtypes (float64, ...): the reference's math in ATen ops, still without a host sync.
at::Tensor combine_aten(const at::Tensor& out, const at::Tensor& row_of_choice, const at::Tensor& weights,
                        const at::Tensor& offsets) {
  const int64_t tokens = weights.size(0), top_k = weights.size(1), H = out.size(1);
  const at::ScalarType acc = at::promote_types(out.scalar_type(), at::kFloat);
  const at::Tensor rows = row_of_choice.to(at::kLong);
  const at::Tensor end = offsets.numel() > 0 ? offsets.select(0, offsets.numel() - 1).to(at::kLong)
                                             : at::zeros({}, rows.options());
  const at::Tensor keep = rows.lt(end).view({tokens, top_k, 1});
  const at::Tensor safe = rows.clamp(0, std::max<int64_t>(out.size(0) - 1, 0));
  at::Tensor picked = out.to(acc).index_select(0, safe).view({tokens, top_k, H});
  at::Tensor w = weights.to(acc).view({tokens, top_k, 1});
  const at::Tensor zero = at::zeros({}, picked.options());
  picked = at::where(keep, picked, zero);
  w = at::where(keep, w, zero);
  at::Tensor y = at::zeros({tokens, H}, picked.options());
  for (int64_t j = 0; j < top_k; ++j) y = y + w.select(1, j) * picked.select(1, j);
  return y.to(out.scalar_type());
}

at::Tensor moe_combine_cuda(const at::Tensor& out, const at::Tensor& row_of_choice, const at::Tensor& weights,
                            const at::Tensor& offsets) {
  TORCH_CHECK(out.is_cuda() && row_of_choice.is_cuda() && weights.is_cuda() && offsets.is_cuda(),
              "moe_combine (CUDA): all tensors must be on the GPU");
  TORCH_CHECK(out.dim() == 2, "moe_combine: out must be [rows, H] (the grouped op's output)");
  TORCH_CHECK(weights.dim() == 2, "moe_combine: weights must be [tokens, top_k] (the router's top-k weights)");
  TORCH_CHECK(row_of_choice.scalar_type() == at::kInt && offsets.scalar_type() == at::kInt,
              "moe_combine: row_of_choice and offsets must be int32, as moe_route returns them");
  TORCH_CHECK(row_of_choice.numel() == weights.numel(), "moe_combine: row_of_choice must have one row per (token, choice), ",
              weights.numel(), " here, got ", row_of_choice.numel());
  c10::cuda::CUDAGuard guard(out.device());
  const at::ScalarType ot = out.scalar_type(), wt = weights.scalar_type();
  auto kernel_dtype = [](at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat; };
  if (!kernel_dtype(ot) || !kernel_dtype(wt) || out.size(0) >= (1LL << 31) || out.size(1) >= (1LL << 31))
    return combine_aten(out, row_of_choice, weights, offsets);
  const int tokens = static_cast<int>(weights.size(0)), top_k = static_cast<int>(weights.size(1));
  const int H = static_cast<int>(out.size(1)), E = static_cast<int>(offsets.numel());
  at::Tensor y = at::empty({tokens, H}, out.options());
  if (tokens == 0 || H == 0) return y;
  const at::Tensor o = out.contiguous(), r = row_of_choice.contiguous(), w = weights.contiguous(),
                   off = offsets.contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (ot == at::kHalf) launch_combine_w<half>(o, r, w, off, E, tokens, top_k, H, y, stream);
  else if (ot == at::kBFloat16) launch_combine_w<__nv_bfloat16>(o, r, w, off, E, tokens, top_k, H, y, stream);
  else launch_combine_w<float>(o, r, w, off, E, tokens, top_k, H, y, stream);
  return y;
}

}  // namespace
}  // namespace milo

TORCH_LIBRARY_IMPL(milo, CUDA, m) {
  m.impl("moe_route", &milo::moe_route_cuda);
  m.impl("moe_combine", &milo::moe_combine_cuda);
}
