"""Run-time instruction-set levels of the CPU kernels (csrc/cpu/isa.h): the level is picked at load time,
VLM_KERNELS_CPU_ISA forces a lower one (a request above the CPU's is a clear error), every level gives
the same answers, and no code outside a level's namespace contains that level's instructions (so a
baseline or AVX2 machine never executes an AVX-512 instruction)."""

import glob
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from vlm_kernels import _backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEVELS = ("baseline", "avx2", "avx512")

pytestmark = pytest.mark.skipif(not _backend.cpu_isa(), reason="needs the compiled extension with CPU levels")


def _runnable_levels():
    detected = _backend.cpu_isa()["detected"]
    compiled = _backend.cpu_isa()["compiled"].split(",")
    return [lv for lv in LEVELS[: LEVELS.index(detected) + 1] if lv in compiled]


def _run(code: str, level: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, VLM_KERNELS_CPU_ISA=level, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("VLM_KERNELS_BACKEND", None)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)


def test_report_names_the_level():
    isa = _backend.cpu_isa()
    assert isa["selected"] in LEVELS and isa["detected"] in LEVELS
    assert LEVELS.index(isa["selected"]) <= LEVELS.index(isa["detected"])
    assert "baseline" in isa["compiled"].split(",")
    import vlm_kernels as vk

    assert f"{isa['selected']} level in use" in vk.info()


def test_unknown_or_impossible_level_is_a_clear_error():
    code = ("import torch, vlm_kernels as vk\n"
            "try:\n    vk.vq_nearest(torch.randn(4, 3), torch.randn(5, 3))\n"
            "except vk.BackendUnavailableError as e:\n    print('ERR', e)\n")
    out = _run(code, "avx1024").stdout
    assert "ERR" in out and "VLM_KERNELS_CPU_ISA=avx1024" in out, out
    if _backend.cpu_isa()["detected"] != "avx512":  # a level above this CPU's
        out = _run(code, "avx512").stdout
        assert "ERR" in out and "cannot run" in out, out


SAME_ANSWER = r"""
import json, torch, vlm_kernels as vk
from vlm_kernels import _backend
g = torch.Generator().manual_seed(0)
x = torch.randn(300, 37, generator=g); e = torch.randn(129, 37, generator=g)
idx, dist = vk.vq_nearest(x, e)
xs = torch.randn(2, 20, 5, 7, generator=g)
soft = vk.gumbel_softmax(xs, tau=0.7, dim=1, seed=5)
hard = vk.gumbel_argmax(xs, dim=1, seed=5)
qkv = torch.randn(2, 9, 11, 3 * 32, generator=g); table = torch.randn(169, 2, generator=g)
wa = vk.window_attention(qkv, num_heads=2, window_size=7, shift_size=3, rel_pos_bias=table)
print(json.dumps({"level": _backend.cpu_isa()["selected"], "idx": idx.tolist(), "dist": dist.tolist(),
                  "soft": soft.flatten().tolist(), "hard": hard.flatten().tolist(), "wa": wa.flatten().tolist()}))
"""


def test_every_level_gives_the_same_answers():
    levels = _runnable_levels()
    results = {}
    for level in levels:
        proc = _run(SAME_ANSWER, level)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rec = json.loads(proc.stdout.strip().splitlines()[-1])
        assert rec["level"] == level
        results[level] = rec
    base = results[levels[0]]
    for level, rec in results.items():
        assert rec["idx"] == base["idx"], level  # exact nearest codes
        assert rec["hard"] == base["hard"], level  # the noise is bit-identical on every level
        for key in ("dist", "soft", "wa"):
            torch.testing.assert_close(torch.tensor(rec[key]), torch.tensor(base[key]), rtol=2e-5, atol=2e-6,
                                       msg=f"{key} at {level}")


_AVX512 = re.compile(r"%zmm|%k[0-7]\b")


def _is_avx(mnemonic: str, operands: str) -> bool:
    return mnemonic.startswith("v") or "%ymm" in operands  # VEX/EVEX-encoded, or 256-bit registers


def test_no_level_instructions_outside_their_namespace():
    """Disassemble the extension: a function outside vlm::avx512 has no AVX-512 (zmm, mask registers);
    one outside vlm::avx2 and vlm::avx512 has no AVX at all (ymm, VEX-encoded v* instructions)."""
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) not found")
    if "avx512" not in _backend.cpu_isa()["compiled"]:
        pytest.skip("this build has the baseline level only")
    import vlm_kernels

    so = sorted(glob.glob(os.path.join(os.path.dirname(vlm_kernels.__file__), "_C*.so")))
    assert so, "no compiled extension found"
    text = subprocess.run([objdump, "-d", "-C", "--no-show-raw-insn", so[0]], capture_output=True, text=True,
                          check=True).stdout
    bad, name, wide = [], "", {"avx2": 0, "avx512": 0}
    for line in text.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            name = m.group(1)
            continue
        if not line.startswith(" ") or "\t" not in line:
            continue
        insn = line.split("\t", 1)[1].split("#", 1)[0].strip()  # drop objdump's comment
        mnemonic, _, operands = insn.partition(" ")
        if "vlm::avx512::" in name:
            wide["avx512"] += bool(_AVX512.search(operands))
            continue
        if "vlm::avx2::" in name:
            wide["avx2"] += "%ymm" in operands
        if _AVX512.search(operands):
            bad.append(f"AVX-512 in {name}: {insn}")
        elif "vlm::avx2::" not in name and _is_avx(mnemonic, operands):
            bad.append(f"AVX in {name}: {insn}")
    assert not bad, "\n".join(bad[:20])
    # and the levels do contain their instructions (the wrappers' target pragmas took effect)
    assert wide["avx512"] > 100 and wide["avx2"] > 100, wide


QEMU_SMOKE = r"""
import torch, vlm_kernels as vk
from vlm_kernels import _backend
isa = _backend.cpu_isa()
assert isa["detected"] == "avx2" and isa["selected"] == "avx2", isa  # QEMU's -cpu max: AVX2, no AVX-512
g = torch.Generator().manual_seed(0)
def both(fn):
    with vk.use_backend("cpu"):
        got = fn()
    with vk.use_backend("reference"):
        want = fn()
    return got, want
x = torch.randn(3, 40, 5, generator=g)
for hard in (False, True):
    a, b = both(lambda: vk.gumbel_softmax(x, tau=0.5, hard=hard, dim=1, seed=9))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
a, b = both(lambda: vk.gumbel_argmax(x, dim=1, seed=9)); assert torch.equal(a, b)
a, b = both(lambda: vk.categorical_kl_uniform(x, dim=1)); torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
xg = x.clone().requires_grad_(True)
a, b = both(lambda: torch.autograd.grad(vk.gumbel_softmax(xg, tau=0.5, dim=1, seed=9).square().sum(), xg)[0])
torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
r = torch.randn(200, 24, generator=g); e = torch.randn(70, 24, generator=g)
a, b = both(lambda: vk.vq_nearest(r, e)); assert torch.equal(a[0], b[0])
idx = b[0]
a, b = both(lambda: vk.vq_code_stats(r, idx, 70)); torch.testing.assert_close(a, b)
qkv = torch.randn(2, 9, 11, 3 * 32, generator=g, requires_grad=True); t = torch.randn(169, 2, generator=g)
f = lambda: torch.autograd.grad(vk.window_attention(qkv, num_heads=2, window_size=7, shift_size=3,
                                                    rel_pos_bias=t).square().sum(), qkv)[0]
a, b = both(f); torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
print("SMOKE OK", isa)
"""


def _require_qemu():
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        if "qemu" in os.environ.get("VLM_KERNELS_TEST_REQUIRE", ""):
            pytest.fail("qemu-x86_64 is required by VLM_KERNELS_TEST_REQUIRE (apt-get install qemu-user)")
        pytest.skip("qemu-x86_64 not installed (Debian's qemu-user)")
    return qemu


def test_every_op_on_a_cpu_without_avx512():
    """Under QEMU's -cpu max (AVX2 and FMA, no AVX-512) the automatic choice picks the AVX2 level, which
    matches the reference; an AVX-512 instruction would kill the process (SIGILL)."""
    qemu = _require_qemu()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="2")
    env.pop("VLM_KERNELS_CPU_ISA", None)
    proc = subprocess.run([qemu, "-cpu", "max", sys.executable, "-c", QEMU_SMOKE], env=env, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0 and "SMOKE OK" in proc.stdout, (proc.returncode, proc.stdout[-2000:], proc.stderr[-4000:])
