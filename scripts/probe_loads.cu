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
// Persistent variants (grid = 2 blocks per SM, the (16-column tile, 512-k slice) units split evenly over all warps in
// contiguous runs, a tile's slices in order, so no SM holds more work than another: today's grid leaves 40 of 132 SMs
// with one block at 14336x4096):
//   pers:  the lane pattern, next unit in registers (PF=1) or two ahead (PF=2);
//   ring:  cp.async 16-byte copies into a per-warp shared-memory ring of S units (no register cost for depth);
//   bulk:  cp.async.bulk (the Hopper copy engine, sm_90): 16 row pieces of 192 bytes + scales per unit, an mbarrier per
//          ring slot; a handful of instructions per 3 KB.
// stream: the read ceiling, a grid-stride 16-byte read of the same bytes with no structure at all.
#include <cuda_runtime.h>
#include <cstdint>
#include <cstdio>
#include <vector>
#include <algorithm>
#include <type_traits>

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


// ---- persistent variants -------------------------------------------------------------------------------------------
// warp w of W takes units [w*T/W, (w+1)*T/W) of the T = tiles * slices units, unit u = (tile u / S, slice u % S)
__device__ __forceinline__ void unit_range(int N, int K, int& u0, int& u1) {
  const int W = gridDim.x * (blockDim.x >> 5), w = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const long long T = (long long)((N + 15) / 16) * (K / 512);
  u0 = (int)(T * w / W); u1 = (int)(T * (w + 1) / W);
}

template <int PF, int OPS>
__global__ void __launch_bounds__(256, 2) pers(const int32_t* q, const uint16_t* sc, const uint16_t* zr, int N, int K,
                                                int, uint32_t* out) {
  const int lane = threadIdx.x & 31, S = K / 512;
  int u0, u1; unit_range(N, K, u0, u1);
  uint32_t acc = 0;
  Slice buf[PF + 1];
#pragma unroll
  for (int i = 0; i < PF; ++i) if (u0 + i < u1) load<false>(buf[i], q, sc, zr, (u0 + i) / S * 16, lane, N, K, (u0 + i) % S);
  for (int u = u0; u < u1; u += PF + 1) {
#pragma unroll
    for (int i = 0; i <= PF; ++i) {  // buf[i] holds unit u + i; refill buf[(i + PF) % (PF + 1)] with unit u + i + PF
      if (u + i >= u1) break;
      const int nu = u + i + PF;
      if (nu < u1) load<false>(buf[(i + PF) % (PF + 1)], q, sc, zr, nu / S * 16, lane, N, K, nu % S);
      acc = use<OPS>(buf[i], acc);
    }
  }
  if (acc == 0x12345678u) out[blockIdx.x] = acc;
}

// a unit in shared memory: 16 rows x 192 bytes of codes, then 16 rows x (8 scales + 8 zeros) fp16
constexpr int kUnitBytes = 16 * 192 + 16 * 32;

__device__ __forceinline__ void cp16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}

template <int ST, int OPS>
__global__ void __launch_bounds__(256, 2) ring(const int32_t* q, const uint16_t* sc, const uint16_t* zr, int N, int K,
                                                int, uint32_t* out) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, S = K / 512, wpr = K / 32 * 3, gpr = K / 64;
  unsigned char* mine = smem + warp * ST * kUnitBytes;
  int u0, u1; unit_range(N, K, u0, u1);
  auto issue = [&](int u, int slot) {  // lane l: code chunks l, l + 32, ... (row c / 12, 16-byte column c % 12)
    const uint32_t base = (uint32_t)__cvta_generic_to_shared(mine + slot * kUnitBytes);
    const int n0 = u / S * 16, k0 = u % S * 512;
#pragma unroll
    for (int i = 0; i < 6; ++i) {
      const int c = lane + 32 * i, row = c / 12, col = c - 12 * row;
      cp16(base + c * 16, q + (long long)(n0 + row) * wpr + k0 / 32 * 3 + col * 4);
    }
    const int row = lane & 15;  // lanes 0-15 scales, 16-31 zeros of their row (8 groups = 16 bytes)
    cp16(base + 16 * 192 + lane * 16, (lane < 16 ? sc : zr) + (long long)(n0 + row) * gpr + k0 / 64);
  };
  uint32_t acc = 0;
#pragma unroll
  for (int i = 0; i < ST - 1; ++i) {
    if (u0 + i < u1) issue(u0 + i, i);
    asm volatile("cp.async.commit_group;\n");
  }
  for (int u = u0, slot = 0; u < u1; ++u, slot = slot + 1 == ST ? 0 : slot + 1) {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(ST - 2));
    __syncwarp();
    const int nu = u + ST - 1;
    if (nu < u1) issue(nu, slot == 0 ? ST - 1 : slot - 1);  // the slot read last round
    asm volatile("cp.async.commit_group;\n");
    const uint4* src = reinterpret_cast<const uint4*>(mine + slot * kUnitBytes);
    Slice d;
#pragma unroll
    for (int i = 0; i < 6; ++i) d.c[i] = src[i * 32 + lane];  // 96 bytes a lane, conflict-free
    const uint2* ssrc = reinterpret_cast<const uint2*>(mine + slot * kUnitBytes + 16 * 192);
    d.s[0] = ssrc[lane]; d.s[1] = ssrc[lane + 32]; d.z[0] = ssrc[(lane + 64) & 63]; d.z[1] = ssrc[(lane + 1) & 63];
    acc = use<OPS>(d, acc);
    __syncwarp();
  }
  asm volatile("cp.async.wait_all;\n");
  if (acc == 0x12345678u) out[blockIdx.x] = acc;
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define PROBE_BULK 1
#endif
__device__ int bulk_timeouts;

template <int ST, int OPS>
__global__ void __launch_bounds__(256, 2) bulk(const int32_t* q, const uint16_t* sc, const uint16_t* zr, int N, int K,
                                                int, uint32_t* out) {
#ifdef PROBE_BULK
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ __align__(8) uint64_t bars[8][ST];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, S = K / 512, wpr = K / 32 * 3, gpr = K / 64;
  unsigned char* mine = smem + warp * ST * kUnitBytes;
  int u0, u1; unit_range(N, K, u0, u1);
  if (lane < ST) {
    const uint32_t b = (uint32_t)__cvta_generic_to_shared(&bars[warp][lane]);
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(b));
  }
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  __syncwarp();
  auto issue = [&](int u, int slot) {  // lane 0 arms the slot's barrier for all bytes, lanes 0-15 copy a row each
    const uint32_t b = (uint32_t)__cvta_generic_to_shared(&bars[warp][slot]);
    const uint32_t base = (uint32_t)__cvta_generic_to_shared(mine + slot * kUnitBytes);
    const int n0 = u / S * 16, k0 = u % S * 512;
    if (lane == 0) asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(b), "r"(kUnitBytes) : "memory");
    __syncwarp();
    if (lane < 16) {
      const int32_t* src = q + (long long)(n0 + lane) * wpr + k0 / 32 * 3;
      asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], 192, [%2];\n"
                   ::"r"(base + lane * 192), "l"(src), "r"(b) : "memory");
    } else {
      const int row = lane & 15;
      asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], 16, [%2];\n"
                   ::"r"(base + 16 * 192 + row * 32), "l"(sc + (long long)(n0 + row) * gpr + k0 / 64), "r"(b) : "memory");
      asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], 16, [%2];\n"
                   ::"r"(base + 16 * 192 + row * 32 + 16), "l"(zr + (long long)(n0 + row) * gpr + k0 / 64), "r"(b) : "memory");
    }
  };
  uint32_t acc = 0;
  for (int i = 0; i < ST - 1; ++i) if (u0 + i < u1) issue(u0 + i, i);
  uint32_t phases = 0;  // bit i: the parity slot i's barrier completes next
  int slot = 0;
  for (int u = u0; u < u1; ++u) {
    const uint32_t b = (uint32_t)__cvta_generic_to_shared(&bars[warp][slot]);
    uint32_t done = 0;
    for (int spin = 0; !done; ++spin) {
      asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
                   : "=r"(done) : "r"(b), "r"((phases >> slot) & 1u) : "memory");
      if (spin > (1 << 20)) { if (lane == 0) atomicAdd(&bulk_timeouts, 1); done = 1; }
    }
    phases ^= 1u << slot;
    const int nu = u + ST - 1, prev = slot == 0 ? ST - 1 : slot - 1;
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // last round's generic reads before async writes
    __syncwarp();
    if (nu < u1) issue(nu, prev);
    const uint4* src = reinterpret_cast<const uint4*>(mine + slot * kUnitBytes);
    Slice d;
#pragma unroll
    for (int i = 0; i < 6; ++i) d.c[i] = src[i * 32 + lane];
    const uint2* ssrc = reinterpret_cast<const uint2*>(mine + slot * kUnitBytes + 16 * 192);
    d.s[0] = ssrc[lane]; d.s[1] = ssrc[lane + 32]; d.z[0] = ssrc[(lane + 64) & 63]; d.z[1] = ssrc[(lane + 1) & 63];
    acc = use<OPS>(d, acc);
    slot = slot + 1 == ST ? 0 : slot + 1;
  }
  if (acc == 0x12345678u) out[blockIdx.x] = acc;
#endif
}

// the read ceiling: every byte of codes, scales and zeros once, grid-stride 16-byte loads, 4 in flight per thread
__global__ void __launch_bounds__(256) stream_read(const int32_t* q, const uint16_t* sc, const uint16_t* zr, int N, int K,
                                                    int, uint32_t* out) {
  const long long nq = (long long)N * K * 3 / 8 / 16, ns = (long long)N * (K / 64) * 2 / 16;
  const long long stride = (long long)gridDim.x * blockDim.x, t0 = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  uint32_t acc = 0;
  const uint4* qv = reinterpret_cast<const uint4*>(q);
  long long i = t0;
  for (; i + 3 * stride < nq; i += 4 * stride) {
    uint4 a = __ldg(qv + i), b = __ldg(qv + i + stride), c = __ldg(qv + i + 2 * stride), d = __ldg(qv + i + 3 * stride);
    acc ^= a.x ^ b.y ^ c.z ^ d.w;
  }
  for (; i < nq; i += stride) acc ^= __ldg(qv + i).x;
  for (long long j = t0; j < ns; j += stride)
    acc ^= __ldg(reinterpret_cast<const uint4*>(sc) + j).x ^ __ldg(reinterpret_cast<const uint4*>(zr) + j).y;
  if (acc == 0x12345678u) out[blockIdx.x] = acc;
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
    // median us of 40 back-to-back launches of kern on (blocks, smem), over 7 repeats after 10 warm-up launches,
    // printed as a table row (wk < 0: a persistent variant, no warps-per-tile split)
    auto run_on = [&](auto kern, const char* name, int wk, int ops, int blocks, int smem) {
      cudaEvent_t e0, e1; cudaEventCreate(&e0); cudaEventCreate(&e1);
      auto launch = [&](int i) {
        kern<<<blocks, 256, smem>>>(qs[i % copies], ss[i % copies], zs[i % copies], sh.N, sh.K, wk < 0 ? 0 : wk, out);
      };
      for (int i = 0; i < 10; ++i) launch(i);
      CK(cudaGetLastError());
      std::vector<float> t;
      for (int rep = 0; rep < 7; ++rep) {
        cudaEventRecord(e0);
        for (int i = 0; i < 40; ++i) launch(i);
        cudaEventRecord(e1); CK(cudaEventSynchronize(e1));
        float ms; cudaEventElapsedTime(&ms, e0, e1); t.push_back(ms / 40 * 1e3f);
      }
      std::sort(t.begin(), t.end());
      char wks[8] = "-";
      if (wk >= 0) snprintf(wks, sizeof wks, "%d", 1 << wk);
      printf("| %dx%d | %.1f | %s | %s | %d | %d | %.1f | %.2f |\n", sh.N, sh.K, mb, name, wks, ops, blocks, t[3],
             mb * 1e6 / (t[3] * 1e-6) / 1e12);
    };
    auto run = [&](auto kern, const char* name, int wk, int ops) {
      const int br = 16 * (8 >> wk);
      run_on(kern, name, wk, ops, (sh.N + br - 1) / br, 0);
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
    // persistent variants: as many blocks as can be resident at once (2 per SM where the ring fits)
    auto run_p = [&](auto kern, const char* name, int smem, int ops) {
      CK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
      int occ = 0;
      CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kern, 256, smem));
      run_on(kern, name, -1, ops, sms * std::max(1, std::min(occ, 2)), smem);
    };
    {  // the read ceiling at full occupancy
      int occ = 0;
      CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, stream_read, 256, 0));
      run_on(stream_read, "stream (read ceiling)", -1, 0, sms * std::max(1, occ), 0);
    }
    auto persistent = [&](auto ops) {  // ops: std::integral_constant, the integer work per word
      constexpr int O = decltype(ops)::value;
      run_p(pers<1, O>, "pers PF1", 0, O);
      run_p(pers<2, O>, "pers PF2", 0, O);
      run_p(ring<3, O>, "ring S3", 8 * 3 * kUnitBytes, O);
      run_p(ring<4, O>, "ring S4", 8 * 4 * kUnitBytes, O);
      run_p(ring<6, O>, "ring S6", 8 * 6 * kUnitBytes, O);
      run_p(bulk<3, O>, "bulk S3", 8 * 3 * kUnitBytes, O);
      run_p(bulk<6, O>, "bulk S6", 8 * 6 * kUnitBytes, O);
    };
    persistent(std::integral_constant<int, 1>{});
    persistent(std::integral_constant<int, 15>{});
    int timeouts = 0;
    CK(cudaMemcpyFromSymbol(&timeouts, bulk_timeouts, sizeof(int)));
    if (timeouts) printf("bulk: %d barrier waits timed out (its rows are not valid)\n", timeouts);
    for (int i = 0; i < copies; ++i) { cudaFree(qs[i]); cudaFree(ss[i]); cudaFree(zs[i]); }
  }
  return 0;
}
