// Hopper warpgroup MMA (wgmma, sm_90a) with the A operand from registers and B from shared memory, for
// tiles 8 and 9 (int3_gemm_wa.cu), and tile 9's barriers. Each wgmma_rs call is written out for its N
// because PTX names every accumulator register. Only compiled into code for sm_90a
// (__CUDA_ARCH_FEAT_SM90_ALL); elsewhere the functions are empty and the host never launches the kernels
// that call them.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace milo {

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MILO_WGMMA 1
#else
#define MILO_WGMMA 0
#endif

// Descriptor of a K-major B operand without swizzle: core matrices of 8 rows (n) x 16 bytes (8 k), 128
// contiguous bytes each; `lbo` bytes from the core matrix of k 0-7 to that of k 8-15, `sbo` bytes from
// one 8-row group to the next (PTX ISA, "Matrix Descriptor Format": start address >> 4 in bits 0-13,
// leading byte offset >> 4 in 16-29, stride byte offset >> 4 in 32-45, swizzle mode 0 in 62-63).
__device__ __forceinline__ uint64_t wgmma_desc_k_major(uint32_t smem_addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((smem_addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(lbo >> 4) << 16) |
         (static_cast<uint64_t>(sbo >> 4) << 32);
}

#if MILO_WGMMA
// registers (accumulators, A) written before the next wgmma_rs
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// this thread's shared-memory writes made visible to the async proxy (the wgmma's B reads)
__device__ __forceinline__ void fence_proxy_async_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// tile 9's shared-memory barriers (mbarrier): `count` arrivals complete a phase; a waiter names the parity
// of the phase it waits for (0, 1, 0, ... as the ring's slot is reused)
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  while (!done)
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
}
// one arrival on `bar` once every cp.async this thread issued so far has landed (counted in the barrier's
// arrivals: .noinc)
__device__ __forceinline__ void cp_async_mbar_arrive(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
// barrier `id` (1-15) of `threads` threads (a multiple of 32): a subset of the block synchronizes
__device__ __forceinline__ void named_bar_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// d[n8 tile j][e] += A (64 x 16: warp w of the warpgroup rows 16w .. 16w + 15, the m16n8k16 A fragment
// layout) x B (16 x N from b_desc); d in the m16n8 accumulator layout, one n8 tile per j
template <typename T, int N>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 8][4], const uint32_t (&a)[4], uint64_t b_desc);

// one specialization per (dtype, N), all from one macro: PTX names every accumulator register, so N picks
// its accumulator operands (n8 tiles 0 .. N / 8 - 1, four floats each) and their names %0 .. %(N / 2 - 1),
// and each N names the operands after them: A's four registers, the descriptor, the scale-d flag
#define MILO_WGMMA_ACC(j) "+f"(d[j][0]), "+f"(d[j][1]), "+f"(d[j][2]), "+f"(d[j][3])
#define MILO_WGMMA_ACC_N16 MILO_WGMMA_ACC(0), MILO_WGMMA_ACC(1)
#define MILO_WGMMA_ACC_N32 MILO_WGMMA_ACC_N16, MILO_WGMMA_ACC(2), MILO_WGMMA_ACC(3)
#define MILO_WGMMA_ACC_N64 MILO_WGMMA_ACC_N32, MILO_WGMMA_ACC(4), MILO_WGMMA_ACC(5), MILO_WGMMA_ACC(6), MILO_WGMMA_ACC(7)
#define MILO_WGMMA_ACC_N128                                                                                   \
  MILO_WGMMA_ACC_N64, MILO_WGMMA_ACC(8), MILO_WGMMA_ACC(9), MILO_WGMMA_ACC(10), MILO_WGMMA_ACC(11),            \
      MILO_WGMMA_ACC(12), MILO_WGMMA_ACC(13), MILO_WGMMA_ACC(14), MILO_WGMMA_ACC(15)
#define MILO_WGMMA_REGS_N16 "%0, %1, %2, %3, %4, %5, %6, %7"
#define MILO_WGMMA_REGS_N32 MILO_WGMMA_REGS_N16 ", %8, %9, %10, %11, %12, %13, %14, %15"
#define MILO_WGMMA_REGS_N64                                                                            \
  MILO_WGMMA_REGS_N32 ", %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define MILO_WGMMA_REGS_N128                                                                                  \
  MILO_WGMMA_REGS_N64 ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, " \
                      "%49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define MILO_WGMMA_RS_IMPL(T, PTX_TYPE, N, A_DESC, SCALE_D)                                                 \
  template <>                                                                                            \
  __device__ __forceinline__ void wgmma_rs<T, N>(float(&d)[N / 8][4], const uint32_t(&a)[4], uint64_t b_desc) { \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SCALE_D ", 0;\n"                                       \
                 "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTX_TYPE "." PTX_TYPE                    \
                 " {" MILO_WGMMA_REGS_N##N "}, " A_DESC ", p, 1, 1, 0;\n}\n"                                \
                 : MILO_WGMMA_ACC_N##N                                                                      \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_desc), "r"(1));                       \
  }
#define MILO_WGMMA_RS(N, A_DESC, SCALE_D)                    \
  MILO_WGMMA_RS_IMPL(half, "f16", N, A_DESC, SCALE_D)        \
  MILO_WGMMA_RS_IMPL(__nv_bfloat16, "bf16", N, A_DESC, SCALE_D)

MILO_WGMMA_RS(16, "{%8, %9, %10, %11}, %12", "%13")
MILO_WGMMA_RS(32, "{%16, %17, %18, %19}, %20", "%21")
MILO_WGMMA_RS(64, "{%32, %33, %34, %35}, %36", "%37")
MILO_WGMMA_RS(128, "{%64, %65, %66, %67}, %68", "%69")
#undef MILO_WGMMA_RS
#undef MILO_WGMMA_RS_IMPL
#undef MILO_WGMMA_REGS_N16
#undef MILO_WGMMA_REGS_N32
#undef MILO_WGMMA_REGS_N64
#undef MILO_WGMMA_REGS_N128
#undef MILO_WGMMA_ACC_N16
#undef MILO_WGMMA_ACC_N32
#undef MILO_WGMMA_ACC_N64
#undef MILO_WGMMA_ACC_N128
#undef MILO_WGMMA_ACC
#else
__device__ __forceinline__ void wgmma_fence() {}
__device__ __forceinline__ void wgmma_commit() {}
template <int N>
__device__ __forceinline__ void wgmma_wait() {}
__device__ __forceinline__ void fence_proxy_async_smem() {}
__device__ __forceinline__ void mbar_init(uint32_t, uint32_t) {}
__device__ __forceinline__ void mbar_arrive(uint32_t) {}
__device__ __forceinline__ void mbar_wait(uint32_t, uint32_t) {}
__device__ __forceinline__ void cp_async_mbar_arrive(uint32_t) {}
__device__ __forceinline__ void named_bar_sync(int, int) {}
template <typename T, int N>
__device__ __forceinline__ void wgmma_rs(float (&)[N / 8][4], const uint32_t (&)[4], uint64_t) {}
#endif

}  // namespace milo
