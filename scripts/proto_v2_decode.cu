// Prototype of a v2 code layout for the decode kernel (int3_gemv.cu), to count its instructions before any kernel is
// rewritten: 32 codes of a row in 3 int32 words, word m holding codes 10m..10m+4 at bits 3i of its low half and codes
// 10m+5..10m+9 at bits 16+3i of its high half, and bit m of codes 30 / 31 in its bits 15 / 31.  A register pair
// (code 10m+i, code 10m+5+i) is then one AND of the word (or of the word shifted once), against v1's shift + 2 lop3
// per pair.  fp16: codes become subnormals code * 8^cls * 2^-24 in three classes (0, 1, 2) with separate accumulators;
// bf16: 1 + code * 8^cls / 128 in two classes (bf16 subnormals times x would underflow fp32), one LOP3 each.
// Not part of the package.  Host check of the decode (no GPU needed), then, on a GPU, the device decode against it:
//   nvcc -O3 -std=c++17 -arch=sm_90 -o /tmp/proto scripts/proto_v2_decode.cu && /tmp/proto
// Static instruction mix of the main loop (decode + class mmas + group-end math of a one-row decode warp):
//   python scripts/sass_stats.py scripts/proto_v2_decode.cu --kernel main_loop
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

// ---- the layout ----------------------------------------------------------------------------------------------------
inline void pack_v2(const uint8_t* c, uint32_t* w) {  // 32 codes (0..7) -> 3 words
  for (int m = 0; m < 3; ++m) {
    uint32_t x = 0;
    for (int i = 0; i < 5; ++i) x |= uint32_t(c[10 * m + i]) << (3 * i) | uint32_t(c[10 * m + 5 + i]) << (16 + 3 * i);
    x |= uint32_t((c[30] >> m) & 1) << 15 | uint32_t((c[31] >> m) & 1) << 31;
    w[m] = x;
  }
}
// pair p of a chunk (p = 5m + i for word m, 15 = codes 30 / 31): its two codes
inline void pair_codes(int p, int& lo, int& hi) {
  if (p == 15) { lo = 30; hi = 31; return; }
  lo = 10 * (p / 5) + p % 5; hi = lo + 5;
}

// ---- decode: 16 registers of code pairs and each one's class --------------------------------------------------------
// fp16: half bits = code << 3 cls (a subnormal, value code * 8^cls * 2^-24); classes 0,1,2,0,1 per word, the spare
// pair class 2: 6 / 6 / 4 pairs, whole mmas (two pairs of a row each) per class
__host__ __device__ constexpr int cls_f16(int p) { return p == 15 ? 2 : (p % 5) % 3; }
__host__ __device__ __forceinline__ void decode_f16(const uint32_t w[3], uint32_t r[16]) {
#pragma unroll
  for (int m = 0; m < 3; ++m) {
    const uint32_t s = w[m] >> 9;
    r[5 * m + 0] = w[m] & 0x00070007u;
    r[5 * m + 1] = w[m] & 0x00380038u;
    r[5 * m + 2] = w[m] & 0x01C001C0u;
    r[5 * m + 3] = s & 0x00070007u;
    r[5 * m + 4] = s & 0x00380038u;
  }
  r[15] = ((w[0] >> 9) & 0x00400040u) | ((w[1] >> 8) & 0x00800080u) | ((w[2] >> 7) & 0x01000100u);
}
// bf16: half bits = 0x3F80 | code << 3 cls (1 + code * 8^cls / 128); classes 0,1,0,1,0 per word, the spare pair
// class 0: 10 / 6 pairs
__host__ __device__ constexpr int cls_bf16(int p) { return p == 15 ? 0 : (p % 5) % 2; }
__host__ __device__ __forceinline__ void decode_bf16(const uint32_t w[3], uint32_t r[16]) {
  constexpr uint32_t kOne = 0x3F803F80u;
#pragma unroll
  for (int m = 0; m < 3; ++m) {
    const uint32_t s = w[m] >> 6, t = w[m] >> 12;
    r[5 * m + 0] = (w[m] & 0x00070007u) | kOne;
    r[5 * m + 1] = (w[m] & 0x00380038u) | kOne;
    r[5 * m + 2] = (s & 0x00070007u) | kOne;
    r[5 * m + 3] = (s & 0x00380038u) | kOne;
    r[5 * m + 4] = (t & 0x00070007u) | kOne;
  }
  r[15] = ((w[0] >> 15) & 0x00010001u) | ((w[1] >> 14) & 0x00020002u) | ((w[2] >> 13) & 0x00040004u) | kOne;
}

// what a decoded half must equal, from its code and class
inline float f16_expect(int code, int cls) { return std::ldexp(float(code), 3 * cls - 24); }
inline float bf16_expect(int code, int cls) { return 1.0f + std::ldexp(float(code), 3 * cls - 7); }
inline float half_bits_to_float(uint16_t b, bool bf16) {
  if (bf16) { uint32_t u = uint32_t(b) << 16; float f; memcpy(&f, &u, 4); return f; }
  const int e = (b >> 10) & 31, man = b & 1023;  // no sign: codes are non-negative
  return e == 0 ? std::ldexp(float(man), -24) : std::ldexp(float(1024 + man), e - 25);
}

// every pair of random chunks decodes to its codes' values (host, or a device decode's output r)
int check_decode(const uint8_t* codes, const uint32_t* r, int chunks, bool bf16) {
  int bad = 0;
  for (int ch = 0; ch < chunks; ++ch)
    for (int p = 0; p < 16; ++p) {
      int lo, hi; pair_codes(p, lo, hi);
      const int cls = bf16 ? cls_bf16(p) : cls_f16(p);
      const uint32_t v = r[16 * ch + p];
      const float want_lo = bf16 ? bf16_expect(codes[32 * ch + lo], cls) : f16_expect(codes[32 * ch + lo], cls);
      const float want_hi = bf16 ? bf16_expect(codes[32 * ch + hi], cls) : f16_expect(codes[32 * ch + hi], cls);
      if (half_bits_to_float(uint16_t(v), bf16) != want_lo || half_bits_to_float(uint16_t(v >> 16), bf16) != want_hi) {
        if (bad++ < 5) printf("  chunk %d pair %d (%s): got %08x\n", ch, p, bf16 ? "bf16" : "fp16", v);
      }
    }
  return bad;
}

__global__ void decode_kernel(const uint32_t* w, uint32_t* r, int chunks, bool bf16) {
  const int ch = blockIdx.x * blockDim.x + threadIdx.x;
  if (ch >= chunks) return;
  uint32_t ww[3] = {w[3 * ch], w[3 * ch + 1], w[3 * ch + 2]}, rr[16];
  if (bf16) decode_bf16(ww, rr); else decode_f16(ww, rr);
  for (int p = 0; p < 16; ++p) r[16 * ch + p] = rr[p];
}

// ---- the main loop the count is for ---------------------------------------------------------------------------------
// One warp, one row of x, fp16 g64: a lane owns 128 k (4 chunks) of weight rows g and g+8 per 512-k slice (6 16-byte
// loads, the next slice's in flight), B (x) from shared memory, 8 class mmas per chunk, per 64-k group the classes
// combined in fp32 and the affine map applied (y += s * q - s z * sum x), as the classed v1 kernel does.
__device__ __forceinline__ void mma16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__global__ void __launch_bounds__(256, 2) main_loop(const uint4* __restrict__ q, const float2* __restrict__ sz,
                                                    float* __restrict__ y, int slices) {
  __shared__ uint2 xs[8][512 / 4];  // x permuted: a lane's B registers of one mma are one 8-byte load
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int i = threadIdx.x; i < 8 * 128; i += 256) xs[i / 128][i % 128] = make_uint2(i * 0x10001u, i * 0x20003u);
  __syncthreads();
  const uint4* qw = q + (blockIdx.x * 8 + warp) * (size_t)slices * 192 + lane * 6;
  uint4 cur[6], nxt[6];
#pragma unroll
  for (int i = 0; i < 6; ++i) cur[i] = __ldg(qw + i);
  float out[4] = {0.f, 0.f, 0.f, 0.f};
  for (int s = 0; s < slices; ++s) {
    if (s + 1 < slices) {
#pragma unroll
      for (int i = 0; i < 6; ++i) nxt[i] = __ldg(qw + (s + 1) * 192 + i);
    }
    const uint32_t* words = reinterpret_cast<const uint32_t*>(cur);  // rows g (0..11) and g+8 (12..23)
#pragma unroll
    for (int grp = 0; grp < 2; ++grp) {  // 64-k groups of the lane's 128 k
      float acc[3][4] = {};
#pragma unroll
      for (int ch = 2 * grp; ch < 2 * grp + 2; ++ch) {
        uint32_t ra[16], rb[16];
        decode_f16(words + 3 * ch, ra);
        decode_f16(words + 12 + 3 * ch, rb);
        int mma_i = 0;
#pragma unroll
        for (int cls = 0; cls < 3; ++cls) {
          int first = -1;
#pragma unroll
          for (int p = 0; p < 16; ++p) {
            if (cls_f16(p) != cls) continue;
            if (first < 0) { first = p; continue; }
            const uint32_t a[4] = {ra[first], rb[first], ra[p], rb[p]};
            const uint2 b = xs[warp][(ch * 8 + mma_i++) * 4 + (lane & 3)];
            mma16816(acc[cls], a, b.x, b.y);
            first = -1;
          }
        }
      }
      const float2 f = __ldg(sz + ((blockIdx.x * 8 + warp) * slices + s) * 64 + grp * 32 + lane);  // (s, s z sum x)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float qx = fmaf(acc[2][e], 262144.f, fmaf(acc[1][e], 2097152.f, acc[0][e] * 16777216.f));
        out[e] = fmaf(f.x, qx, out[e]) - f.y;
      }
    }
#pragma unroll
    for (int i = 0; i < 6; ++i) cur[i] = nxt[i];
  }
  if (lane & 2) return;  // at one row of x only half the accumulator columns hold it
  y[(blockIdx.x * 8 + warp) * 64 + lane * 2] = out[0] + out[2];
  y[(blockIdx.x * 8 + warp) * 64 + lane * 2 + 1] = out[1] + out[3];
}

int main() {
  const int chunks = 4096;
  uint8_t* codes = new uint8_t[32 * chunks];
  uint32_t* words = new uint32_t[3 * chunks];
  uint32_t* regs = new uint32_t[16 * chunks];
  srand(12345);
  for (int i = 0; i < 32 * chunks; ++i) codes[i] = rand() & 7;
  for (int ch = 0; ch < chunks; ++ch) pack_v2(codes + 32 * ch, words + 3 * ch);
  int bad = 0;
  for (int bf = 0; bf < 2; ++bf) {
    for (int ch = 0; ch < chunks; ++ch) {
      if (bf) decode_bf16(words + 3 * ch, regs + 16 * ch); else decode_f16(words + 3 * ch, regs + 16 * ch);
    }
    const int b = check_decode(codes, regs, chunks, bf);
    printf("host decode %s: %d of %d pairs wrong\n", bf ? "bf16" : "fp16", b, 16 * chunks);
    bad += b;
  }
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    printf("no GPU: host check only\n");
    return bad ? 1 : 0;
  }
  uint32_t *dw, *dr;
  cudaMalloc(&dw, 12 * chunks);
  cudaMalloc(&dr, 64 * chunks);
  cudaMemcpy(dw, words, 12 * chunks, cudaMemcpyHostToDevice);
  for (int bf = 0; bf < 2; ++bf) {
    cudaMemset(dr, 0xFF, 64 * chunks);
    decode_kernel<<<(chunks + 127) / 128, 128>>>(dw, dr, chunks, bf);
    cudaMemcpy(regs, dr, 64 * chunks, cudaMemcpyDeviceToHost);
    const int b = check_decode(codes, regs, chunks, bf);
    printf("device decode %s: %d of %d pairs wrong (%s)\n", bf ? "bf16" : "fp16", b, 16 * chunks,
           cudaGetErrorString(cudaGetLastError()));
    bad += b;
  }
  return bad ? 1 : 0;
}
