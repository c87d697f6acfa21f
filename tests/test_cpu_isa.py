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
