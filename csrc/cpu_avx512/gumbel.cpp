// The AVX-512 F/BW/VL/DQ (x86-64-v4) build of csrc/cpu/gumbel.cpp (see csrc/cpu/isa.h).
// Its headers are included first, before the target pragma, so that their inline functions stay baseline.
#define VLM_CPU_LEVEL avx512
#include "cpu/isa.h"
#if VLM_CPU_MULTI_LEVEL
#define VLM_CPU_INCLUDES_ONLY
#include "cpu/gumbel.cpp"
#undef VLM_CPU_INCLUDES_ONLY
#define VLM_GUMBEL_ISA_AVX512 1  // __AVX2__ etc. do not follow the pragma in C++ (see gumbel.cpp)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
#include "cpu/gumbel.cpp"
#endif
