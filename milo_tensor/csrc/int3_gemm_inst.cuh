// Included once per (dtype, group) translation unit with MILO_T, MILO_G and MILO_FN defined, so
// the kernel instantiations compile in parallel.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/util/Exception.h>

#include "int3_gemm.cuh"
#include "int3_launch.h"

namespace milo {
namespace {

template <typename Cfg>
void launch_cfg(const Int3GemmParams& p, int n_tiles, int m_blocks, bool programmatic, cudaStream_t stream) {
  static_assert(Cfg::BK == kInt3BK, "host tiling assumes BK = 128");
  constexpr int kMaxSmem = Cfg::SMEM_BASE + Cfg::LR_BYTES;
  static bool attr_done[64] = {false};
  const int dev = c10::cuda::current_device();
  auto kern = int3_gemm_kernel<Cfg>;
  if (dev < 64 && !attr_done[dev]) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, kMaxSmem));
    attr_done[dev] = true;
  }
  const int smem = Cfg::SMEM_BASE + (p.R > 0 ? Cfg::LR_BYTES : 0);
  launch_programmatic_if(kern, dim3(n_tiles, p.splits, m_blocks), dim3(Cfg::THREADS), smem, programmatic, stream, p);
}

}  // namespace

void MILO_FN(int mt, const Int3GemmParams& p, int n_tiles, int m_blocks, bool programmatic, cudaStream_t s) {
  switch (mt) {
    case 1:  // decode (M <= 16): 64 columns per block, 8 warps (4 along N x 2 along K), 4 stages
      // (4 stages measured 20-25% faster than 8 at M = 1..16 on an H100)
      launch_cfg<Int3Cfg<MILO_T, 1, 2, 4, MILO_G, 4, 3>>(p, n_tiles, m_blocks, programmatic, s);
      break;
    case 2:
      launch_cfg<Int3Cfg<MILO_T, 2, 8, 2, MILO_G, 4>>(p, n_tiles, m_blocks, programmatic, s);
      break;
    case 3:  // 32 x 64: the decode tile's warps with two m16 tiles each, 128 registers, 2 blocks per SM
      launch_cfg<Int3Cfg<MILO_T, 2, 2, 4, MILO_G, 4, 2>>(p, n_tiles, m_blocks, programmatic, s);
      break;
    case 4:
      launch_cfg<Int3Cfg<MILO_T, 4, 4, 4, MILO_G, 4>>(p, n_tiles, m_blocks, programmatic, s);
      break;
    default:
      TORCH_CHECK(false, "int3_linear: tile configuration ", mt, " is not built for this dtype / group size");
  }
}

}  // namespace milo
