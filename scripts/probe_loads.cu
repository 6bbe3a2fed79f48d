// Load-side probe of the decode kernel (int3_gemv.cu): how much DRAM bandwidth its way of reading codes and
// scales reaches when the math is replaced by a little integer work, so the kernel's own time can be split
// into "what the loads allow" and "what the math adds".  Not part of the package; run on a GPU:
//   nvcc -O3 -std=c++17 -arch=sm_90 -o /tmp/probe scripts/probe_loads.cu && /tmp/probe
// Each variant streams the same int3 weight (row-major, 3 K/32 int32 words a row, as packing.py lays it out)
// and its fp16 group-64 scales and zeros, grid and warps as the decode kernel: 8 warps a block, 2^wk warps
// per 16-column tile splitting K in 512-k slices, launch bounds (256, 2).  Variants:
//   lane:  a lane reads its own 48 bytes of each of its two rows (three 16-byte loads 48 bytes apart: the
//          decode kernel's pattern), the next slice one ahead in registers (PF=1), two ahead (PF=2) or none;
//   coal:  the warp's 16 rows x 192 bytes read as 6 fully used 512-byte spans (lane l: 16-byte chunk l + 32 i).
// OPS integer ops per loaded word stand in for the math (an op is about 3 instructions; the real kernel spends about 37 instructions per word).
#include <cuda_runtime.h>
#include <cstdint>
#include <cstdio>
#include <vector>
#include <algorithm>

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s: %s\n", #x, cudaGetErrorString(e)); exit(1); } } while (0)

template <int OPS>
__device__ __forceinline__ uint32_t work(uint32_t acc, uint32_t w) {
#pragma unroll
  for (int i = 0; i < OPS; ++i) acc = (acc ^ (w >> (i & 7))) + 0x9E3779B9u * i;
  return acc;
}

struct Slice { uint4 c[6]; uint2 s[2], z[2]; };

template <bool kCoal>
__device__ __forceinline__ void load(Slice& d, const int32_t* q, const uint16_t* sc, const uint16_t* zr, int n0, int lane,
                                     int N, int K, int s) {
  const int wpr = K / 32 * 3, k0 = s * 512, g = lane >> 2, c = lane & 3, gpr = K / 64;
  if (kCoal) {
#pragma unroll
    for (int i = 0; i < 6; ++i) {
      const int qq = lane + 32 * i, row = qq / 12, col = qq - 12 * row;
      d.c[i] = __ldg(reinterpret_cast<const uint4*>(q + (long long)(n0 + row) * wpr + k0 / 32 * 3 + col * 4));
    }
  } else {
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int v = 0; v < 3; ++v)
        d.c[3 * r + v] = __ldg(reinterpret_cast<const uint4*>(q + (long long)(n0 + g + 8 * r) * wpr + (k0 + c * 128) / 32 * 3) + v);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const long long gi = (long long)(n0 + g + 8 * r) * gpr + (k0 + 2 * (c & 1) * 128) / 64;
    d.s[r] = __ldg(reinterpret_cast<const uint2*>(sc + gi));
    d.z[r] = __ldg(reinterpret_cast<const uint2*>(zr + gi));
  }
}

template <int OPS>
__device__ __forceinline__ uint32_t use(const Slice& d, uint32_t acc) {
#pragma unroll
  for (int i = 0; i < 6; ++i) {
    acc = work<OPS>(acc, d.c[i].x); acc = work<OPS>(acc, d.c[i].y);
    acc = work<OPS>(acc, d.c[i].z); acc = work<OPS>(acc, d.c[i].w);
  }
  return acc ^ d.s[0].x ^ d.s[1].y ^ d.z[0].x ^ d.z[1].y;
}

template <bool kCoal, int PF, int OPS>
__global__ void __launch_bounds__(256, 2) probe(const int32_t* q, const uint16_t* sc, const uint16_t* zr, int N, int K,
                                                 int wk_log2, uint32_t* out) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, WK = 1 << wk_log2;
  const int tile = warp >> wk_log2, wk = warp & (WK - 1);
  const int n0 = (blockIdx.x * (8 >> wk_log2) + tile) * 16;
  const int n_slices = K / 512;
  if (n0 >= N) return;
  uint32_t acc = 0;
  if constexpr (PF == 0) {
    for (int s = wk; s < n_slices; s += WK) { Slice a; load<kCoal>(a, q, sc, zr, n0, lane, N, K, s); acc = use<OPS>(a, acc); }
  } else if constexpr (PF == 1) {
    Slice a, b;
    if (wk < n_slices) load<kCoal>(a, q, sc, zr, n0, lane, N, K, wk);
    for (int s = wk; s < n_slices; s += 2 * WK) {
      if (s + WK < n_slices) load<kCoal>(b, q, sc, zr, n0, lane, N, K, s + WK);
      acc = use<OPS>(a, acc);
      if (s + WK >= n_slices) break;
      if (s + 2 * WK < n_slices) load<kCoal>(a, q, sc, zr, n0, lane, N, K, s + 2 * WK);
      acc = use<OPS>(b, acc);
    }
  } else {
    Slice a, b, c;
    if (wk < n_slices) load<kCoal>(a, q, sc, zr, n0, lane, N, K, wk);
    if (wk + WK < n_slices) load<kCoal>(b, q, sc, zr, n0, lane, N, K, wk + WK);
    for (int s = wk; s < n_slices; s += 3 * WK) {
      if (s + 2 * WK < n_slices) load<kCoal>(c, q, sc, zr, n0, lane, N, K, s + 2 * WK);
      acc = use<OPS>(a, acc);
      if (s + WK >= n_slices) break;
      if (s + 3 * WK < n_slices) load<kCoal>(a, q, sc, zr, n0, lane, N, K, s + 3 * WK);
      acc = use<OPS>(b, acc);
      if (s + 2 * WK >= n_slices) break;
      if (s + 4 * WK < n_slices) load<kCoal>(b, q, sc, zr, n0, lane, N, K, s + 4 * WK);
      acc = use<OPS>(c, acc);
    }
  }
  if (acc == 0x12345678u) out[blockIdx.x] = acc;  // keeps the loads live
}

int main() {
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  uint32_t* out;
  CK(cudaMalloc(&out, 1 << 20));
  struct Shape { int N, K; } shapes[] = {{14336, 4096}, {4096, 14336}, {4096, 4096}, {8 * 28672, 4096}};
  printf("| N x K | MB | variant | WK | ops/word | blocks | us | TB/s |\n|---|---|---|---|---|---|---|---|\n");
  for (auto sh : shapes) {
    const long long qb = (long long)sh.N * sh.K * 3 / 8, sb = (long long)sh.N * sh.K / 64 * 2;
    const int copies = std::max(1, (int)(400LL * 1024 * 1024 / (qb + 2 * sb)));  // well past L2
    std::vector<int32_t*> qs(copies);
    std::vector<uint16_t*> ss(copies), zs(copies);
    for (int i = 0; i < copies; ++i) {
      CK(cudaMalloc(&qs[i], qb)); CK(cudaMalloc(&ss[i], sb)); CK(cudaMalloc(&zs[i], sb));
      CK(cudaMemset(qs[i], i + 1, qb)); CK(cudaMemset(ss[i], 1, sb)); CK(cudaMemset(zs[i], 2, sb));
    }
    const double mb = (qb + 2 * sb) / 1e6;
    // copy floor: the same bytes device to device
    {
      int32_t* dst; CK(cudaMalloc(&dst, qb));
      cudaEvent_t e0, e1; cudaEventCreate(&e0); cudaEventCreate(&e1);
      for (int i = 0; i < 5; ++i) CK(cudaMemcpyAsync(dst, qs[i % copies], qb, cudaMemcpyDeviceToDevice));
      cudaEventRecord(e0);
      for (int i = 0; i < 50; ++i) CK(cudaMemcpyAsync(dst, qs[i % copies], qb, cudaMemcpyDeviceToDevice));
      cudaEventRecord(e1); CK(cudaEventSynchronize(e1));
      float ms; cudaEventElapsedTime(&ms, e0, e1);
      printf("| %dx%d | %.1f | memcpy (read+write) | - | - | - | %.1f | %.2f |\n", sh.N, sh.K, qb / 1e6, ms * 20,
             2.0 * qb / (ms / 50 * 1e-3) / 1e12);
      cudaFree(dst);
    }
    auto run = [&](auto kern, const char* name, int wk, int ops) {
      const int br = 16 * (8 >> wk), blocks = (sh.N + br - 1) / br;
      cudaEvent_t e0, e1; cudaEventCreate(&e0); cudaEventCreate(&e1);
      for (int i = 0; i < 10; ++i) kern<<<blocks, 256>>>(qs[i % copies], ss[i % copies], zs[i % copies], sh.N, sh.K, wk, out);
      CK(cudaGetLastError());
      std::vector<float> t;
      for (int rep = 0; rep < 7; ++rep) {
        cudaEventRecord(e0);
        for (int i = 0; i < 40; ++i) kern<<<blocks, 256>>>(qs[i % copies], ss[i % copies], zs[i % copies], sh.N, sh.K, wk, out);
        cudaEventRecord(e1); CK(cudaEventSynchronize(e1));
        float ms; cudaEventElapsedTime(&ms, e0, e1); t.push_back(ms / 40 * 1e3f);
      }
      std::sort(t.begin(), t.end());
      printf("| %dx%d | %.1f | %s | %d | %d | %d | %.1f | %.2f |\n", sh.N, sh.K, mb, name, 1 << wk, ops, blocks, t[3],
             mb * 1e6 / (t[3] * 1e-6) / 1e12);
    };
    for (int wk : {0, 1, 2, 3}) {
      run(probe<false, 0, 1>, "lane PF0", wk, 1);
      run(probe<false, 1, 1>, "lane PF1", wk, 1);
      run(probe<false, 2, 1>, "lane PF2", wk, 1);
      run(probe<true, 1, 1>, "coal PF1", wk, 1);
      run(probe<false, 1, 15>, "lane PF1", wk, 15);
      run(probe<true, 1, 15>, "coal PF1", wk, 15);
      run(probe<false, 2, 15>, "lane PF2", wk, 15);
    }
    for (int i = 0; i < copies; ++i) { cudaFree(qs[i]); cudaFree(ss[i]); cudaFree(zs[i]); }
  }
  return 0;
}
