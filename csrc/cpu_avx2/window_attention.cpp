// The AVX2 + FMA (x86-64-v3) build of csrc/cpu/window_attention.cpp (see csrc/cpu/isa.h).
// Its headers are included first, before the target pragma, so that their inline functions stay baseline.
#define VLM_CPU_LEVEL avx2
#include "cpu/isa.h"
#if VLM_CPU_MULTI_LEVEL
#define VLM_CPU_INCLUDES_ONLY
#include "cpu/window_attention.cpp"
#undef VLM_CPU_INCLUDES_ONLY
#define VLM_WA_ISA_AVX2 1  // __AVX2__ etc. do not follow the pragma in C++ (see window_attention.cpp)
#pragma GCC target("avx2,fma")
#include "cpu/window_attention.cpp"
#endif
