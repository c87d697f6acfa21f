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
