// kernel instantiations: dtype bf16, group size 32 (see int3_gemm_inst.cuh)
#define MILO_T __nv_bfloat16
#define MILO_G 32
#define MILO_FN launch_int3_gemm_bf16_g32
#include "int3_gemm_inst.cuh"
