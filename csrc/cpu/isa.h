// Instruction-set levels of the CPU kernels, chosen once at load time.
//
// Every kernel file (csrc/cpu/<op>.cpp) is compiled once per level: as itself for the portable
// baseline (no -march flag: SSE2 on x86-64, NEON on aarch64), and on x86-64 by the wrappers of the same
// name in csrc/cpu_avx2/ (AVX2+FMA, x86-64-v3) and csrc/cpu_avx512/ (AVX-512 F/BW/VL/DQ, x86-64-v4). A
// wrapper includes the kernel file's headers, turns on the level's instructions with `#pragma GCC
// target`, sets VLM_CPU_LEVEL to the level's namespace, defines the kernel's own level macro (e.g.
// VLM_VQ_ISA_AVX512, VLM_WA_ISA_AVX2) and includes the kernel file. In C++, g++'s target pragma does NOT
// define __AVX2__ / __AVX512F__ (they follow the command line only), so inside a kernel file:
//   * choose vector code with the wrapper's level macro (or the predefined macros, which a
//     -march=native build sets; __ARM_NEON on aarch64);
//   * put everything in `namespace vlm { namespace VLM_CPU_LEVEL {`: each level's copy of a kernel has
//     its own names, so no two levels' functions are ever merged;
//   * the header (csrc/cpu/<op>.h) declares the entry points inside the same namespace and has no
//     include guard: the baseline build includes it once more per level (other_levels.h) and registers
//     the ops with the entry points of the level chosen at load time.
// Inline functions of the headers (ATen, c10, std) stay baseline code: the wrapper includes them before
// its target pragma, and GCC compiles a function with the options in force where it is defined. A
// template first instantiated by a level's code may still come out at that level; the linker keeps the
// first copy of such a function, and the objects are linked baseline first, then AVX2, then AVX-512
// (csrc/cpu/ < csrc/cpu_avx2/ < csrc/cpu_avx512/ also in sorted order, which some build tools use), so
// a function shared by several levels runs the lowest one's code. tests/test_cpu_isa.py disassembles
// the library: no AVX-512 instruction outside vlm::avx512, no AVX instruction outside vlm::avx2/avx512.
//
// VLM_KERNELS_CPU_ISA=baseline|avx2|avx512 (read once, at load) forces a lower level; asking for a
// level this CPU cannot run (or an unknown name) makes every CPU kernel raise with that message.
#pragma once

#include <c10/util/Exception.h>

#include <string>

#if defined(__x86_64__) || defined(_M_X64)
#define VLM_CPU_X86 1
#else
#define VLM_CPU_X86 0
#endif

// The per-level copies need `#pragma GCC target` (GCC); other compilers build the baseline only.
#if VLM_CPU_X86 && defined(__GNUC__) && !defined(__clang__)
#define VLM_CPU_MULTI_LEVEL 1
#else
#define VLM_CPU_MULTI_LEVEL 0
#endif

// A wrapper in csrc/cpu_avx2/ or csrc/cpu_avx512/ defines VLM_CPU_LEVEL before including a kernel file; the kernel file's
// own compilation is the baseline build (the one that also registers the ops, see other_levels.h).
#ifndef VLM_CPU_LEVEL
#define VLM_CPU_LEVEL base
#define VLM_CPU_BASE_BUILD 1
#else
#define VLM_CPU_BASE_BUILD 0
#endif

namespace vlm {
namespace cpu {

enum class Isa : int { base = 0, avx2 = 1, avx512 = 2 };

const char* isa_name(Isa isa);       // "baseline", "avx2", "avx512"
Isa detected_isa();                  // the best level this CPU and OS can run (and that was compiled)
Isa selected_isa();                  // the level the kernels run: detected, or VLM_KERNELS_CPU_ISA's if lower
const std::string& isa_error();      // why VLM_KERNELS_CPU_ISA cannot be honoured ("" when it can)
std::string isa_report();            // "selected=avx2 detected=avx512 compiled=baseline,avx2,avx512"

[[noreturn]] void throw_isa_error();

template <class R, class... A>
R refuse_isa(A...) {
  throw_isa_error();
}

// The function of the selected level (the next lower one when that level has none); when
// VLM_KERNELS_CPU_ISA cannot be honoured, a function that raises its error.
template <class R, class... A>
auto pick(R (*base)(A...), R (*avx2)(A...), R (*avx512)(A...)) -> R (*)(A...) {
  if (!isa_error().empty()) return &refuse_isa<R, A...>;
  switch (selected_isa()) {
    case Isa::avx512:
      if (avx512 != nullptr) return avx512;
      [[fallthrough]];
    case Isa::avx2:
      if (avx2 != nullptr) return avx2;
      [[fallthrough]];
    default:
      return base;
  }
}

}  // namespace cpu
}  // namespace vlm
