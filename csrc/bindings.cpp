// The Python module vlm_kernels._C. Every kernel file registers its own functions in the
// `vlm_kernels_C` torch library (TORCH_LIBRARY_FRAGMENT), so this file only gives Python a module to
// import and says which optional parts were compiled in.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef VLM_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
