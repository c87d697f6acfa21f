"""Build of vlm_kernels._C: CPU sources always, CUDA sources when a toolkit and a CUDA torch are present.

Environment:
  VLM_KERNELS_NO_EXT=1      pure-Python install (reference and Triton backends only)
  VLM_KERNELS_CUDA=0|1      force the CUDA sources off / on (default: on when nvcc and torch.version.cuda exist)
  VLM_KERNELS_NATIVE=1      compile with -march=native (a binary for this machine only; the default build
                            is portable: every CPU kernel is compiled for the baseline, AVX2 and AVX-512,
                            and the level is picked at load time, see csrc/cpu/isa.h)
  TORCH_CUDA_ARCH_LIST, MAX_JOBS, CUDA_HOME are honoured as torch.utils.cpp_extension does.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _toolkit_root_ok(root: str | None) -> bool:
    if not root:
        return False
    has_nvcc = os.path.isfile(os.path.join(root, "bin", "nvcc"))
    has_cudart = any(glob.glob(os.path.join(root, lib, "libcudart.so*")) for lib in ("lib64", "lib", "targets/x86_64-linux/lib"))
    return has_nvcc and bool(has_cudart)


def find_cuda_home() -> str | None:
    """The CUDA toolkit root (bin/nvcc and libcudart). nvcc on PATH may be a wrapper script elsewhere,
    so torch's guess from its location is not trusted: we follow the wrapper and try the usual roots."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:
            with open(real, "r", errors="ignore") as fh:
                head = fh.read(4096)
            candidates += [os.path.dirname(os.path.dirname(m)) for m in re.findall(r"(/\S+/bin/nvcc)\b", head)]
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in candidates:
        if _toolkit_root_ok(root):
            return os.path.realpath(root)
    return None


def want_extension() -> bool:
    if os.environ.get("VLM_KERNELS_NO_EXT", "0") in ("1", "true", "yes"):
        print("vlm_kernels: VLM_KERNELS_NO_EXT set, installing the pure-Python package")
        return False
    compiler = os.environ.get("CXX", "c++")
    if not shutil.which(compiler.split()[0]):
        print(f"vlm_kernels: no C++ compiler ({compiler!r}) found, installing the pure-Python package")
        return False
    return True


def cpu_sources() -> list[str]:
    """The baseline objects first, then the AVX2 builds, then the AVX-512 ones: the linker keeps the first
    copy of an inline function compiled at several levels, so shared code is the lowest level's
    (csrc/cpu/isa.h)."""
    levels = [sorted(glob.glob(os.path.join("csrc", folder, "*.cpp"))) for folder in ("cpu", "cpu_avx2", "cpu_avx512")]
    return ["csrc/bindings.cpp"] + levels[0] + levels[1] + levels[2]


def build_config():
    cuda_home = find_cuda_home()
    if cuda_home:
        # Must happen before torch.utils.cpp_extension is imported: it reads CUDA_HOME at import.
        os.environ["CUDA_HOME"] = cuda_home
    import torch
    from torch.utils import cpp_extension

    flag = os.environ.get("VLM_KERNELS_CUDA")
    if flag is not None:
        with_cuda = flag in ("1", "true", "yes")
        if with_cuda and not (cuda_home and torch.version.cuda):
            sys.exit("VLM_KERNELS_CUDA=1 but no CUDA toolkit (bin/nvcc + libcudart) or no CUDA-enabled torch was found")
    else:
        with_cuda = bool(cuda_home and torch.version.cuda)

    sources = cpu_sources()
    native = os.environ.get("VLM_KERNELS_NATIVE", "0") in ("1", "true", "yes")
    # No -std flag: torch.utils.cpp_extension picks the standard its headers need (C++20 for torch >= 2.10).
    cxx_flags = ["-O3", "-ffp-contract=off", "-fopenmp"] + (["-march=native"] if native else [])
    extra = {"cxx": cxx_flags}
    include_dirs = [os.path.join(ROOT, "csrc")]
    library_dirs = []
    define_macros = []
    ext_cls = cpp_extension.CppExtension
    if with_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        # torch's CUDA headers that the bare toolkit lacks (cusparse.h, ...) ship in its pip wheels.
        site = os.path.dirname(os.path.dirname(torch.__file__))
        include_dirs += sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
        library_dirs += [d for d in (os.path.join(cuda_home, "lib64"), os.path.join(cuda_home, "lib")) if os.path.isdir(d)]
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        define_macros.append(("VLM_WITH_CUDA", "1"))
        ext_cls = cpp_extension.CUDAExtension
    ext = ext_cls(
        name="vlm_kernels._C",
        sources=sources,
        include_dirs=include_dirs,
        library_dirs=library_dirs,
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )
    print(f"vlm_kernels: building _C with CUDA={'on' if with_cuda else 'off'} (CUDA_HOME={cuda_home})")
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = build_config() if want_extension() else ([], {})

setup(ext_modules=ext_modules, cmdclass=cmdclass)
