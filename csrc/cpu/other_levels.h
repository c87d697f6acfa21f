// Included by a kernel file's baseline build just before its op registration, with VLM_CPU_HEADER
// naming the kernel's header: declares the other levels' entry points (the header has no include guard:
// each inclusion declares them in the namespace VLM_CPU_LEVEL names) and defines VLM_CPU_PICK(fn), the
// entry point of the level chosen at load time (see isa.h).
#if VLM_CPU_MULTI_LEVEL
#undef VLM_CPU_LEVEL
#define VLM_CPU_LEVEL avx2
#include VLM_CPU_HEADER
#undef VLM_CPU_LEVEL
#define VLM_CPU_LEVEL avx512
#include VLM_CPU_HEADER
#undef VLM_CPU_LEVEL
#define VLM_CPU_LEVEL base
#define VLM_CPU_PICK(fn) ::vlm::cpu::pick(&::vlm::base::fn, &::vlm::avx2::fn, &::vlm::avx512::fn)
#else
#define VLM_CPU_PICK(fn) \
  ::vlm::cpu::pick(&::vlm::base::fn, decltype(&::vlm::base::fn){nullptr}, decltype(&::vlm::base::fn){nullptr})
#endif
