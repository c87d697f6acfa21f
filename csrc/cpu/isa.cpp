// Detection of the CPU's instruction-set level and the VLM_KERNELS_CPU_ISA override (see isa.h).
#include "cpu/isa.h"

#include <cstdlib>
#include <cstring>
#include <string>

namespace vlm {
namespace cpu {
namespace {

Isa detect() {
#if VLM_CPU_MULTI_LEVEL
  __builtin_cpu_init();
  // libgcc's checks include the OS's XSAVE support of the AVX / AVX-512 register state.
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return Isa::avx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
#endif
  return Isa::base;
}

struct Choice {
  Isa detected = Isa::base;
  Isa selected = Isa::base;
  std::string error;
};

const Choice& choice() {
  static const Choice c = [] {
    Choice r;
    r.detected = detect();
    r.selected = r.detected;
    const char* env = std::getenv("VLM_KERNELS_CPU_ISA");
    if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return r;
    Isa want;
    if (std::strcmp(env, "baseline") == 0 || std::strcmp(env, "base") == 0) {
      want = Isa::base;
    } else if (std::strcmp(env, "avx2") == 0) {
      want = Isa::avx2;
    } else if (std::strcmp(env, "avx512") == 0) {
      want = Isa::avx512;
    } else {
      r.error = std::string("VLM_KERNELS_CPU_ISA=") + env + " is not a level; expected baseline, avx2, avx512 or auto";
      return r;
    }
    if (static_cast<int>(want) > static_cast<int>(r.detected)) {
      r.error = std::string("VLM_KERNELS_CPU_ISA=") + env + " asks for a level this CPU cannot run (or that this build " +
                "does not have): the best here is " + isa_name(r.detected);
      return r;
    }
    r.selected = want;
    return r;
  }();
  return c;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512:
      return "avx512";
    case Isa::avx2:
      return "avx2";
    default:
      return "baseline";
  }
}

Isa detected_isa() { return choice().detected; }

void throw_isa_error() { TORCH_CHECK(false, "vlm_kernels CPU kernels: ", isa_error()); }
Isa selected_isa() { return choice().selected; }
const std::string& isa_error() { return choice().error; }

std::string isa_report() {
  std::string r = std::string("selected=") + isa_name(selected_isa()) + " detected=" + isa_name(detected_isa()) +
                  " compiled=baseline";
#if VLM_CPU_MULTI_LEVEL
  r += ",avx2,avx512";
#endif
  if (!isa_error().empty()) r += " error=" + isa_error();
  return r;
}

}  // namespace cpu
}  // namespace vlm

#include <torch/library.h>

// torch.ops.vlm_kernels_C.cpu_isa(): the level report, for `python -m vlm_kernels info` and the tests.
TORCH_LIBRARY_FRAGMENT(vlm_kernels_C, m) {
  m.def("cpu_isa() -> str", [] { return vlm::cpu::isa_report(); });
}
