// kernel instantiations: dtype f16, group size 64 (see int3_gemm_inst.cuh)
#define MILO_T half
#define MILO_G 64
#define MILO_FN launch_int3_gemm_f16_g64
#include "int3_gemm_inst.cuh"
