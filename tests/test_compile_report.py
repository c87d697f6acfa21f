"""The offline sm_90 compile report (benchmarks/compile_report.py): its SASS reading, its loop model, and
the report itself over every Triton kernel at the production shapes, which must compile and must not
spill (local memory) -- the no-spill target of the GPU bring-up, checked without a GPU."""

import json
import warnings
import os
import subprocess
import sys

import pytest

from benchmarks import compile_report as cr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SASS = """
	code for sm_90a
		Function : _demo_kernel
	.headerflags	@"EF_CUDA_SM90"
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
        /*0020*/                   LDG.E R2, desc[UR4][R2.64] ;
        /*0030*/                   FFMA R3, R2, R2, R3 ;
        /*0040*/                   MUFU.EX2 R4, R3 ;
        /*0050*/                   ISETP.GE.AND P0, PT, R0, 0x10, PT ;
        /*0060*/               @!P0 BRA `(.L_x_1) ;
        /*0070*/                   HGMMA.64x64x16.F32 R8, gdesc[UR4], RZ ;
        /*0080*/                   BRA `(.L_x_0) ;
        /*0090*/                   STG.E desc[UR4][R2.64], R4 ;
        /*00a0*/                   EXIT ;
        /*00b0*/                   BRA 0xb0;
"""
# the branch targets as cuobjdump prints them: labels resolve to addresses in the listing
SASS = SASS.replace("`(.L_x_1)", "0x30").replace("`(.L_x_0)", "0x20")


def test_parse_sass_classes_and_loops():
    sass = cr.parse_sass(SASS)["_demo_kernel"]
    assert sass.instructions == 12
    assert sass.by_class["tensor"] == 1 and sass.by_class["mufu"] == 1 and sass.by_class["global"] == 2
    assert sass.opcodes["HGMMA"] == 1
    # two nested loops: [0x30, 0x60] inside [0x20, 0x80]; the trailing `BRA self` is not a loop
    bodies = sorted(lp[2] for lp in sass.loops)
    assert bodies == [4, 7]


def test_dynamic_count_multiplies_nested_trips():
    sass = cr.parse_sass(SASS)["_demo_kernel"]
    count, slots, lower = cr.dynamic_count(sass, {0: 3, 1: 5})
    # outer body (rank 0, 7 instructions at 0x20..0x80) runs 3 times; the inner 4 (0x30..0x60) 3*5 times
    inner, outer_only, outside = 4, 3, 5
    assert count == outside + 3 * outer_only + 15 * inner
    assert slots == count + 15 * (cr.MUFU_SLOTS - 1)  # the MUFU sits in the inner loop
    assert not lower
    assert cr.dynamic_count(sass, {0: 3})[2]  # a loop without a trip count: a lower bound
    # A loop the usual path never enters (trips 0): its body, nested loops included, counts nothing.
    assert cr.dynamic_count(sass, {0: 0, 1: 5})[0] == outside
    assert cr.dynamic_count(sass, {0: 3, 1: 0})[0] == outside + 3 * outer_only


def test_parse_res_usage():
    text = """
 Function _k:
  REG:40 STACK:16 SHARED:1024 LOCAL:16 CONSTANT[0]:568 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    assert cr.parse_res_usage(text) == {"_k": {"REG": 40, "STACK": 16, "SHARED": 1024, "LOCAL": 16}}


def _report_env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the report compiles real sm_90 code
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_report_compiles_every_kernel_without_spills(tmp_path):
    pytest.importorskip("triton")
    if cr._tool("cuobjdump") is None:
        pytest.skip("no cuobjdump (Triton's NVIDIA backend ships it)")
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.compile_report", "--json", str(out), "--no-cuda-cpp"],
                          cwd=ROOT, env=_report_env(), capture_output=True, text=True, timeout=1800)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert not rec["failures"], rec["failures"]
    # No spills is promised for the GPU machine's Triton (3.6) and later. Older Triton (3.2 with torch 2.6)
    # compiles every kernel, but spills a little in places (104 B in the v2 bf16 window-attention backward
    # at 3.2): slower there, not wrong, so it is reported rather than failed.
    import triton

    old_triton = tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 6)
    if old_triton and rec["spills"]:
        warnings.warn(f"Triton {triton.__version__}: spills {rec['spills']}")
    else:
        assert not rec["spills"], rec["spills"]
    ops = {c["op"] for c in rec["cases"]}
    assert ops == {"gumbel", "vq", "window_attention"}
    for case in rec["cases"]:
        assert case["kernels"], case["case"]
        for k in case["kernels"]:
            assert k["registers"] and k["sass_instructions"] > 0, (case["case"], k["kernel"])
    spills_only = old_triton and rec["spills"]  # the report's exit status counts spills too
    assert proc.returncode == 0 or spills_only, proc.stdout[-3000:] + proc.stderr[-3000:]
