"""The package without its compiled extension: import works, info explains, ops fall back."""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_without_extension(code: str) -> subprocess.CompletedProcess:
    # A None entry in sys.modules makes `import vlm_kernels._C` raise ImportError, as on a machine
    # where the package was installed with VLM_KERNELS_NO_EXT=1 or without a compiler.
    prelude = "import sys; sys.modules['vlm_kernels._C'] = None\n"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("VLM_KERNELS_BACKEND", None)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


def test_pure_python_install_works_and_explains():
    proc = _run_without_extension("""
        import warnings, torch, vlm_kernels as vk
        print(vk.info())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = vk.gumbel_softmax(torch.randn(3, 5), seed=1)
            vk.gumbel_softmax(torch.randn(3, 5), seed=1)
        assert torch.allclose(y.sum(-1), torch.ones(3))
        print("warnings:", len([w for w in caught if 'falling back' in str(w.message)]))
        try:
            with vk.use_backend("cpu"):
                vk.gumbel_argmax(torch.randn(3, 5), seed=1)
        except vk.BackendUnavailableError as exc:
            print("forced:", exc)
    """)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "vlm_kernels._C is not importable" in out
    assert "warnings: 1" in out, out
    assert "forced: gumbel: backend 'cpu' was requested but cannot run" in out


def test_python_m_vlm_kernels_info():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "vlm_kernels", "info"], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for name in ("reference", "cpu", "triton", "cuda"):
        assert name in proc.stdout


def test_triton_interpreter_with_a_numpy_it_cannot_run_is_explained(monkeypatch):
    """Triton < 3.7's interpreter calls int() on one-element arrays, an error since numpy 2.4: the triton
    backend then names the pair and the fix instead of failing inside a kernel."""
    import numpy
    import triton
    import torch

    from vlm_kernels import _backend

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for triton_version, numpy_version, bad in [("3.6.0", "2.4.0", True), ("3.6.0", "2.3.5", False),
                                               ("3.7.0", "2.5.1", False), ("3.2.0+git1", "2.4.6", True)]:
        monkeypatch.setattr(triton, "__version__", triton_version)
        monkeypatch.setattr(numpy, "__version__", numpy_version)
        _backend._interpreter_numpy_reason.cache_clear()
        reason = _backend._interpreter_numpy_reason()
        assert bool(reason) == bad, (triton_version, numpy_version, reason)
        if bad:
            assert "numpy<2.4" in reason and triton_version in reason
            if _backend.availability("triton").ok:
                assert _backend.device_reason("triton", torch.device("cpu")) == reason
    _backend._interpreter_numpy_reason.cache_clear()
