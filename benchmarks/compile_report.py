"""Offline sm_90 compile report: what every GPU kernel costs on an H200, read from its machine code, no GPU.

    python -m benchmarks.compile_report                 # every op, the benchmarks' production shapes
    python -m benchmarks.compile_report --ops gumbel --json out.json --sass-dir sass/
    python -m benchmarks.compile_report --markdown      # the README's table

How. The op is called through its public function with the ``triton`` backend forced, on CPU tensors
of the production shape (allocated, never computed on). Triton's active driver is replaced by one
whose target is ``GPUTarget("cuda", 90, 32)`` and every ``kernel[grid](...)`` launch is turned into a
compile (``warmup``): the kernels, their specialisations (alignment, constexprs, autotune candidates:
each candidate config is compiled) and grids are exactly those a launch on an H200 would use. Each
cubin is read with Triton's own ``cuobjdump``: registers, local memory (spills), shared memory, and the
SASS instructions by class (tensor-core HGMMA/HMMA, global and shared memory, special functions,
integer and fp32 arithmetic, shuffles, barriers, local-memory LDL/STL). The CUDA C++ kernels are read
the same way from the built extension (``vlm_kernels/_C*.so``, compiled for sm_90 by setup.py).

The model. Each warp instruction takes one issue slot of one of the 4 schedulers of an SM; MUFU (exp,
log, rcp) runs at 16 lanes per clock per SM (8 slots per warp instruction on its scheduler), fp64 at 64
lanes per clock (2 slots). Static instruction counts are dynamic counts for loop-free code; for a
kernel with loops, the case may say how many times its largest loop runs (``trips``), otherwise every
loop counts once and the estimate is a lower bound (marked ``>=``). The kernel's time bound is the
largest of: issue (warp instructions x warps x programs / (132 SMs x 4 x 1.98 GHz)), the case's bytes
at the copy bandwidth measured on an H200 here (4.3 TB/s), and its tensor-core FLOPs at the dense rate
(bf16/fp16 790 TFLOP/s measured here; TF32 half of that, a datasheet ratio). These are predictions:
benchmarks/gpu_check.sh measures the real thing.

A kernel that spills (local memory) at a production configuration, or fails to compile, makes the
command exit non-zero (tests/test_compile_report.py runs it in CI).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Optional

# H200 (one lent machine, measured here 2026-10-28 and 2026-11-04; see the device notes) and sm_90 facts.
SMS = 132
SCHEDULERS_PER_SM = 4
CLOCK_HZ = 1.98e9
COPY_BW = 4.3e12  # bytes/s, read + write, device-to-device copy measured on an H200 here
BF16_RATE = 790e12  # FLOP/s, 8192^3 bf16 matmul on random data, measured here
TF32_RATE = BF16_RATE / 2  # datasheet ratio of dense TF32 to dense bf16
FP32_RATE = SMS * 128 * 2 * CLOCK_HZ  # FFMA: 128 lanes per SM per clock
ISSUE_RATE = SMS * SCHEDULERS_PER_SM * CLOCK_HZ  # warp instructions per second
MUFU_SLOTS = 8  # a MUFU warp instruction occupies its scheduler's 4-lane SFU for 8 clocks
FP64_SLOTS = 2

OPCODE_CLASSES = [  # (class, regex on the opcode without modifiers); first match wins
    ("tensor", r"^(HGMMA|HMMA|IMMA|QGMMA|WGMMA|GMMA)$"),
    ("local", r"^(LDL|STL)$"),
    ("global", r"^(LDG|STG|LD|ST|RED|ATOM|ATOMG|LDGSTS|UBLKCP|UTMALDG|UTMASTG|LDGDEPBAR)$"),
    ("shared", r"^(LDS|STS|LDSM|STSM|ATOMS)$"),
    ("mufu", r"^MUFU$"),
    ("fp64", r"^(DFMA|DADD|DMUL|DSETP|DMNMX)$"),
    ("fp32", r"^(FFMA|FADD|FMUL|FMNMX|FSETP|FSEL|FSET|FCHK|FRND|FMUL2|FFMA2|FADD2|HADD2|HMUL2|HFMA2|F2FP)$"),
    ("convert", r"^(F2F|F2I|I2F|I2FP|F2IP|FRND)$"),
    ("shuffle", r"^SHFL$"),
    ("barrier", r"^(BAR|BSYNC|BSSY|WARPSYNC|SYNCS|MEMBAR|DEPBAR|ERRBAR|FENCE|WARPGROUP|ARRIVES)$"),
    ("int", r"^(IMAD|IADD3|IADD|LOP3|LOP|SHF|SHL|SHR|LEA|ISETP|IMNMX|SEL|PRMT|POPC|FLO|BREV|IABS|VIMNMX|"
            r"IMUL|IDP|IMADSP|PLOP3|P2R|R2P|ULOP3|UIADD3|UIMAD|ULEA|USHF|UISETP|USEL|UPRMT|UMOV|UFLO|UPOPC|"
            r"VABSDIFF|LEPC|MOV|CS2R|S2R|S2UR|R2UR|LDC|ULDC|VOTE|VOTEU|IMNMX|BMSK|SGXT|MATCH|NOP|ISCADD)$"),
    ("control", r"^(BRA|EXIT|RET|CALL|BRX|JMP|JMX|YIELD|NANOSLEEP|BPT|KILL|ACQBULK|ELECT|ENDCOLLECTIVE)$"),
]


# ----------------------------------------------------------------------------------------------------
# Reading cubins.


def _tool(name: str) -> Optional[str]:
    """Triton's bundled CUDA tool (ptxas, cuobjdump), else one on PATH."""
    try:
        import triton

        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.isfile(path):
            return path
    except ImportError:
        pass
    return shutil.which(name)


@dataclass
class Sass:
    """Static SASS of one function."""

    instructions: int = 0
    by_class: dict = field(default_factory=dict)
    loops: list = field(default_factory=list)  # (start, end, instructions in the body)
    opcodes: dict = field(default_factory=dict)
    trace: list = field(default_factory=list)  # (address, class) of every instruction


def _class_of(opcode: str) -> str:
    for name, pattern in OPCODE_CLASSES:
        if re.match(pattern, opcode):
            return name
    return "other"


_SASS_LINE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def parse_sass(text: str) -> dict[str, Sass]:
    """{function name: Sass} from ``cuobjdump -sass`` output."""
    out: dict[str, Sass] = {}
    cur: Optional[Sass] = None
    addrs: list[int] = []
    branches: list[tuple[int, int]] = []

    def close():
        if cur is None:
            return
        for src, dst in branches:
            if dst <= src:  # a backward branch closes a loop [dst, src]
                body = sum(1 for a in addrs if dst <= a <= src)
                cur.loops.append((dst, src, body))

    for line in text.splitlines():
        m = re.match(r"\s+Function : (\S+)", line)
        if m:
            close()
            cur, addrs, branches = Sass(), [], []
            out[m.group(1)] = cur
            continue
        m = _SASS_LINE.match(line)
        if not m or cur is None:
            continue
        addr = int(m.group(1), 16)
        instr = m.group(2).strip()
        if instr.startswith("@"):
            instr = instr.split(None, 1)[1] if " " in instr else instr
        opcode_full = instr.split()[0]
        opcode = opcode_full.split(".")[0]
        if opcode == "NOP":
            continue
        if opcode == "BRA":
            t = re.search(r"`?\(?\.?L?_?x?_?(0x[0-9a-f]+)\)?", instr)
            if t:
                branches.append((addr, int(t.group(1), 16)))
        cur.instructions += 1
        addrs.append(addr)
        cls = _class_of(opcode)
        cur.by_class[cls] = cur.by_class.get(cls, 0) + 1
        cur.trace.append((addr, cls))
        cur.opcodes[opcode] = cur.opcodes.get(opcode, 0) + 1
    close()
    # A trailing `BRA self` (the end-of-kernel trap loop) is not a loop of the algorithm.
    for sass in out.values():
        sass.loops = [lp for lp in sass.loops if lp[2] > 1]
    return out


def parse_res_usage(text: str) -> dict[str, dict]:
    """{function: {REG, STACK, SHARED, LOCAL}} from ``cuobjdump -res-usage``."""
    out, name = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        if name and "REG:" in line:
            out[name] = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}
            name = None
    return out


def read_cubin(path: str) -> tuple[dict[str, dict], dict[str, Sass], str]:
    cuobjdump = _tool("cuobjdump")
    if cuobjdump is None:
        raise RuntimeError("cuobjdump not found (it ships with Triton's NVIDIA backend)")
    res = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    sass_text = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True, check=True).stdout
    return parse_res_usage(res), parse_sass(sass_text), sass_text


# ----------------------------------------------------------------------------------------------------
# Capturing Triton launches as sm_90 compiles.


@dataclass
class Launch:
    kernel: str
    meta: dict
    num_warps: int
    num_stages: int
    programs: int
    cubin: bytes
    shared: int
    autotune_candidates: int = 1
    # Launches of one autotuned call share a group (only the best candidate counts); others have their own.
    group: int = 0


class _OfflineDriver:
    """Enough of Triton's driver for compiling for sm_90 with no GPU (launches never happen)."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def get_device_capability(self, device=None):
        return (9, 0)

    def get_benchmarker(self):  # Triton 3.2's Autotuner asks for it when built; nothing is timed offline
        def refuse(*args, **kwargs):
            raise RuntimeError("compile_report: no benchmarking offline (launches are captured, not run)")

        return refuse

    def get_empty_cache_for_benchmark(self):
        import torch

        return torch.empty(0)


_captured: list[Launch] = []
_groups = [0, 0]  # [launches so far, the group of the autotuned call under way (0: none)]


def _grid_programs(grid, named: dict) -> int:
    if callable(grid):
        grid = grid(named)
    n = 1
    for g in tuple(grid):
        n *= int(g)
    return n


def _zero_integer_outputs(args) -> None:
    """The kernel never ran: give integer buffers (indices, counts) valid values, so that host code after the
    launch (a gather by the indices, say) runs; float outputs stay as allocated."""
    import torch

    for a in args:
        if isinstance(a, torch.Tensor) and not a.is_floating_point() and a.dtype != torch.bool:
            a.zero_()


def install_capture() -> None:
    """Route every Triton launch of this process to an sm_90 compile recorded in ``_captured``."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("the compile report needs TRITON_INTERPRET unset (it compiles real sm_90 code)")
    from triton.runtime import autotuner, driver, jit

    driver.set_active(_OfflineDriver())
    original = jit.JITFunction.run
    constexpr_names = {}

    def run(self, *args, grid, warmup=False, **kwargs):
        compiled = original(self, *args, grid=grid, warmup=True, **kwargs)
        _zero_integer_outputs(args)
        names = constexpr_names.setdefault(id(self), [p.name for p in self.params if p.is_constexpr])
        named = dict(zip(self.arg_names, args), **kwargs)
        meta = {k: v for k, v in named.items() if k in names}
        md = compiled.metadata
        _groups[0] += 1
        _captured.append(Launch(kernel=self.fn.__name__, meta=meta, num_warps=int(md.num_warps),
                                num_stages=int(getattr(md, "num_stages", 0)),
                                programs=_grid_programs(grid, named), cubin=compiled.asm["cubin"],
                                shared=int(getattr(md, "shared", 0)), group=_groups[1] or _groups[0]))
        return None

    def tune_run(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        configs = self.prune_configs(kwargs)
        _groups[1] = -(_groups[0] + 1)  # one group for every candidate of this call
        try:
            for config in configs:
                self.fn.run(*args, **kwargs, **config.all_kwargs())
                _captured[-1].autotune_candidates = len(configs)
        finally:
            _groups[1] = 0
        self.nargs = None

    jit.JITFunction.run = run
    autotuner.Autotuner.run = tune_run


# ----------------------------------------------------------------------------------------------------
# The production configurations.


@dataclass
class Case:
    """One op call at a production shape: ``call()`` runs it (launches are compiles); ``bytes``, ``flops``
    (tensor-core FLOPs) and ``elements`` describe the work of the whole call, for the bounds; ``trips``
    maps a kernel name to a function(meta) giving the trip count of its largest loop per program;
    ``target`` is (kind, value, text): ("copy", 0.85, ...) = at least 85% of the copy-bandwidth floor,
    ("tensor", 0.6, ...) = at least 60% of the tensor-core rate, ("floor", 0.5, ...) = within 2x of the
    bytes floor."""

    op: str
    label: str
    call: Callable[[], None]
    bytes: int = 0
    flops: int = 0
    elements: int = 0
    dot_dtype: str = ""  # "bf16", "fp16" or "tf32" for the tensor-core rate
    trips: dict = field(default_factory=dict)
    # The kernels wait for their tensor-core results before the epilogue (no warp specialisation): the
    # issue and tensor times add up instead of overlapping.
    serial: bool = False
    target: Optional[tuple] = None


def _empty(shape, dtype, requires_grad=False):
    import torch

    t = torch.empty(shape, dtype=dtype)
    if t.is_floating_point():
        t.zero_() if t.numel() < (1 << 20) else None  # small buffers (tables, biases) get real values
    return t.requires_grad_(requires_grad)


def gumbel_cases() -> list[Case]:
    import torch

    import vlm_kernels as vk

    # The looped kernels walk K = 8192 in chunks of BC (rows) or BR (columns) elements, in each of their
    # two loops (soft forward: statistics, then output; backward: dot, then output; hard forward: argmax,
    # then the one-hot; argmax: one loop). Single-pass kernels have no loop, or loops of one trip.
    def chunks(m):
        n = -(-8192 // (m["BC"] if m["LAST_DIM"] else m["BR"]))
        return {0: n, 1: n}

    # The split soft forward and backward: the largest loop merges the strip's partials, run by one program
    # of the strip (n_splits / NSB trips there: 4 of 64 programs' worth at K = 8192 forward, 8 of 128
    # backward; counted as none); the poll loop waits on one atomic (counted once). The fix-up kernel's
    # chunk loop runs only for chunks whose program gave up waiting: none when a strip's programs run
    # together.
    trips = {"_gumbel_argmax_kernel": chunks, "_gumbel_hard_fwd_kernel": chunks,
             "_gumbel_softmax_fwd_kernel": chunks, "_gumbel_softmax_bwd_kernel": chunks,
             "_gumbel_softmax_split_kernel": lambda m: {0: 0, 1: 1},
             "_gumbel_softmax_split_fixup_kernel": lambda m: {0: 0}}
    out = []
    for label, shape, dim in (("(64,8192,32,32) dim=1", (64, 8192, 32, 32), 1),
                              ("(65536,8192) dim=-1", (65536, 8192), -1)):
        numel = 1
        for s in shape:
            numel *= s

        def soft(shape=shape, dim=dim):
            vk.gumbel_softmax(_empty(shape, torch.float32), tau=1.0, hard=False, dim=dim, seed=1)

        def hard(shape=shape, dim=dim):
            vk.gumbel_softmax(_empty(shape, torch.float32), tau=1.0, hard=True, dim=dim, seed=1)

        def fwd_bwd(shape=shape, dim=dim):
            x = _empty(shape, torch.float32, requires_grad=True)
            vk.gumbel_softmax(x, tau=1.0, hard=False, dim=dim, seed=1).backward(_empty(shape, torch.float32))

        def argmax(shape=shape, dim=dim):
            vk.gumbel_argmax(_empty(shape, torch.float32), dim=dim, seed=1)

        out += [
            Case("gumbel", f"{label} fwd soft fp32", soft, bytes=8 * numel, elements=numel,
                 target=("copy", 0.85, ">=85% of copy bandwidth"), trips=trips),
            Case("gumbel", f"{label} fwd hard fp32", hard, bytes=8 * numel, elements=numel,
                 target=("copy", 0.85, ">=85% of copy bandwidth"), trips=trips),
            Case("gumbel", f"{label} fwd+bwd soft fp32", fwd_bwd, bytes=20 * numel, elements=numel,
                 target=("copy", 0.70, ">=70% of copy bandwidth"), trips=trips),
            Case("gumbel", f"{label} argmax fp32", argmax, bytes=4 * numel, elements=numel, trips=trips),
        ]
    return out


def vq_cases() -> list[Case]:
    import torch

    import vlm_kernels as vk

    n, k, d = 65536, 8192, 256
    # Loops of the nearest kernel by body size: the code tiles, then the float64 re-score's D chunks (and,
    # when x is streamed, the D chunks of each code tile). The prepared-rows kernel: its finite-row probe
    # and its write, both over D chunks. The rescan's loops depend on how many rows are flagged (data):
    # left at one trip, a lower bound.
    def nearest_trips(m):
        tiles, rd = k // m["BLOCK_N"], d // m["RESCORE_D"]
        if m["SINGLE_D"]:
            return {0: tiles, 1: rd}
        return {0: tiles, 1: d // m["BLOCK_D"], 2: rd}

    def prep_trips(m):
        return {0: -(-d // m["BLOCK_D"]), 1: -(-d // m["BLOCK_D"])}

    trips = {"_vq_nearest_kernel": nearest_trips, "_vq_prep_x_kernel": prep_trips}

    def lookup():
        import torch

        g = torch.Generator().manual_seed(0)
        vk.vq_nearest(torch.randn(n, d, generator=g), torch.randn(k, d, generator=g))

    def quantize():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, d, generator=g).requires_grad_(True)
        e = torch.randn(k, d, generator=g).requires_grad_(True)
        q, _, loss = vk.vq_quantize(x, e, beta=0.25)
        (q.sum() + loss).backward()

    return [
        Case("vq", f"vq_nearest N={n} K={k} D={d} fp32 (TF32 tiles)", lookup, bytes=4 * (n * d + k * d) + 12 * n,
             flops=2 * n * k * d, dot_dtype="tf32", target=("tensor", 0.6, ">=60% of the TF32 matmul rate"),
             trips=trips, serial=True),
        Case("vq", f"vq_quantize fwd+bwd N={n} K={k} D={d} fp32", quantize, bytes=4 * (4 * n * d + 2 * k * d),
             flops=2 * n * k * d, dot_dtype="tf32", trips=trips, serial=True),
    ]


def _windows_per_program(units: int):
    """Trip count of a window-attention program's window loop: its share of the (window, head) pairs."""
    return lambda meta, programs: {0: -(-units // programs)}


SWIN_STAGES = (("stage 1 56x56 C=96 h=3", (56, 56), 96, 3), ("stage 3 14x14 C=384 h=12", (14, 14), 384, 12))


def window_attention_cases(batch: int = 64) -> list[Case]:
    import torch

    import vlm_kernels as vk

    out = []
    window, shift = 7, 3
    for label, (h, w), c, heads in SWIN_STAGES:
        for dtype, dname in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
            for version in ("v1", "v2"):
                size = torch.finfo(dtype).bits // 8
                tokens = batch * h * w

                def make(h=h, w=w, c=c, heads=heads, dtype=dtype, version=version, grad=False):
                    qkv = _empty((batch, h, w, 3 * c), dtype, requires_grad=grad)
                    table = torch.randn((2 * window - 1) ** 2, heads, dtype=dtype).requires_grad_(grad)
                    kw = dict(num_heads=heads, window_size=window, shift_size=shift, rel_pos_bias=table,
                              pad_qkv=torch.randn(3 * c, dtype=dtype))
                    if version == "v2":
                        kw["logit_scale"] = torch.zeros(heads, 1, 1, dtype=dtype).requires_grad_(grad)
                    return qkv, kw

                def fwd(make=make):
                    qkv, kw = make()
                    with torch.no_grad():
                        vk.window_attention(qkv, **kw)

                def fwd_bwd(make=make, shape=(batch, h, w, c), dtype=dtype):
                    qkv, kw = make(grad=True)
                    vk.window_attention(qkv, **kw).backward(_empty(shape, dtype))

                n_tok = window * window
                flops = 4 * tokens * n_tok * c  # QK^T and PV over every window (padded maps aside)
                units = batch * (h // window) * (w // window) * heads  # (window, head) pairs
                # each program walks a run of windows of one head: its loop runs units / programs times
                per_program = {"_fwd_kernel": _windows_per_program(units),
                               "_bwd_fused_kernel": _windows_per_program(units)}
                out.append(Case("window_attention", f"{label} B={batch} {version} fwd {dname}", fwd,
                                bytes=tokens * c * size * 4, flops=flops,
                                dot_dtype="bf16" if dname == "bf16" else "tf32",
                                target=("floor", 0.5, "within 2x of the HBM floor")
                                if (label.startswith("stage 1") and dname == "bf16" and version == "v1") else None,
                                trips=per_program))
                out.append(Case("window_attention", f"{label} B={batch} {version} fwd+bwd {dname}", fwd_bwd,
                                bytes=tokens * c * size * 11, flops=flops * 3.5,
                                dot_dtype="bf16" if dname == "bf16" else "tf32", trips=per_program))
    return out


CASES = {"gumbel": gumbel_cases, "vq": vq_cases, "window_attention": window_attention_cases}


# ----------------------------------------------------------------------------------------------------
# Analysis.


def dynamic_count(sass: Sass, trips: dict[int, int]) -> tuple[float, float, bool]:
    """(warp instructions, issue slots) one warp executes, and whether that is a lower bound.

    Loops are ranked by static body size, largest first (rank 0); ``trips[rank]`` is how many times that
    loop runs each time it is entered (nested loops multiply; 0 for a loop the usual path never enters).
    Loops without a trip count run once."""
    loops = sorted(sass.loops, key=lambda lp: -lp[2])
    rank = {(lp[0], lp[1]): i for i, lp in enumerate(loops)}

    def factor(addr: int) -> float:
        f = 1.0
        for lp in loops:
            if lp[0] <= addr <= lp[1]:
                f *= max(0, trips.get(rank[(lp[0], lp[1])], 1))
        return f

    if not loops:
        n = sass.instructions
        slots = n + sass.by_class.get("mufu", 0) * (MUFU_SLOTS - 1) + sass.by_class.get("fp64", 0) * (FP64_SLOTS - 1)
        return float(n), float(slots), False
    count = slots = 0.0
    for addr, cls in sass.trace:
        f = factor(addr)
        count += f
        slots += f * (MUFU_SLOTS if cls == "mufu" else FP64_SLOTS if cls == "fp64" else 1)
    return count, slots, any(rank[(lp[0], lp[1])] not in trips for lp in loops)


def _kernel_row(launch: Launch, res: dict, sass: Sass, trips: dict[int, int]) -> dict:
    dynamic, slots, lower_bound = dynamic_count(sass, trips)
    warp_slots = slots * launch.num_warps * launch.programs
    return {
        "kernel": launch.kernel, "num_warps": launch.num_warps, "num_stages": launch.num_stages,
        "programs": launch.programs, "meta": {k: (v if isinstance(v, (int, float, bool, str)) or v is None else str(v))
                                              for k, v in launch.meta.items()},
        "registers": res.get("REG"), "local_bytes": res.get("LOCAL", 0), "stack_bytes": res.get("STACK", 0),
        "shared_bytes": max(res.get("SHARED", 0), launch.shared),
        "sass_instructions": sass.instructions, "sass_by_class": dict(sorted(sass.by_class.items())),
        "loops": [{"body": lp[2]} for lp in sorted(sass.loops, key=lambda lp: -lp[2])], "loop_trips": trips,
        "dynamic_instructions_per_warp": round(dynamic), "lower_bound": lower_bound,
        "tensor_cores": "HGMMA" if sass.opcodes.get("HGMMA") else ("HMMA" if sass.opcodes.get("HMMA") else "none"),
        "issue_time_s": warp_slots / ISSUE_RATE,
        "autotune_candidates": launch.autotune_candidates,
    }


def analyse_case(case: Case, launches: list[Launch], keep_sass: Optional[str] = None) -> dict:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, launch in enumerate(launches):
            path = os.path.join(tmp, f"k{i}.cubin")
            with open(path, "wb") as fh:
                fh.write(launch.cubin)
            res_all, sass_all, sass_text = read_cubin(path)
            name = next(iter(sass_all), launch.kernel)
            trips_fn = case.trips.get(launch.kernel)
            trips = {} if not trips_fn else (trips_fn(launch.meta, launch.programs)
                                             if trips_fn.__code__.co_argcount == 2 else trips_fn(launch.meta))
            trips = {0: int(trips)} if isinstance(trips, (int, float)) else {int(k): int(v) for k, v in trips.items()}
            rows.append(_kernel_row(launch, res_all.get(name, {}), sass_all.get(name, Sass()), trips))
            if keep_sass:
                os.makedirs(keep_sass, exist_ok=True)
                safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{case.op}_{case.label}_{i}_{launch.kernel}")
                with open(os.path.join(keep_sass, safe + ".sass"), "w") as fh:
                    fh.write(sass_text)
    # Autotune candidates: only one runs; the bound takes the best candidate of each autotuned call. Every
    # other launch counts (a kernel launched twice in a case, e.g. forward and backward, counts twice).
    best: dict = {}
    for launch, r in zip(launches, rows):
        key = launch.group
        if key not in best or r["issue_time_s"] < best[key]["issue_time_s"]:
            best[key] = r
    issue_s = sum(r["issue_time_s"] for r in best.values())
    bytes_s = case.bytes / COPY_BW
    rate = {"bf16": BF16_RATE, "fp16": BF16_RATE, "tf32": TF32_RATE}.get(case.dot_dtype, FP32_RATE)
    if case.flops and not any(r["tensor_cores"] != "none" for r in rows):
        rate = FP32_RATE
    flops_s = case.flops / rate if case.flops else 0.0
    predicted = max(issue_s + flops_s, bytes_s) if case.serial else max(issue_s, bytes_s, flops_s)
    rec = {"op": case.op, "case": case.label, "bytes": case.bytes, "flops": case.flops, "elements": case.elements,
           "bytes_floor_s": bytes_s, "flops_floor_s": flops_s, "issue_bound_s": issue_s,
           "predicted_s": predicted, "lower_bound": any(r["lower_bound"] for r in best.values()),
           "bound_by": max((("issue", issue_s), ("memory", bytes_s), ("tensor", flops_s)), key=lambda t: t[1])[0],
           "kernels": rows, "spills": any(r["local_bytes"] or r["stack_bytes"] for r in rows)}
    if case.elements:
        rec["warp_instructions_per_element"] = sum(
            r["dynamic_instructions_per_warp"] * r["num_warps"] * r["programs"] for r in best.values()) / case.elements
        rec["thread_instructions_per_element"] = 32 * rec["warp_instructions_per_element"]
    if case.target:
        kind, value, text = case.target
        if kind in ("copy", "floor"):
            achieved = bytes_s / predicted
        else:
            achieved = flops_s / predicted if flops_s else 0.0
        rec["target"] = {"text": text, "value": value, "predicted": achieved,
                         "met": None if rec["lower_bound"] and achieved >= value else bool(achieved >= value)}
    return rec


def cuda_cpp_report(so_path: Optional[str] = None) -> list[dict]:
    """Registers, local memory and SASS classes of every CUDA C++ kernel in the built extension."""
    if so_path is None:
        import vlm_kernels

        pkg = os.path.dirname(vlm_kernels.__file__)
        found = sorted(glob.glob(os.path.join(pkg, "_C*.so")))
        so_path = found[0] if found else None
    if not so_path:
        return []
    try:
        res, sass, _ = read_cubin(so_path)
    except (RuntimeError, subprocess.CalledProcessError):
        return []
    rows = []
    for name, s in sass.items():
        r = res.get(name, {})
        rows.append({"kernel": name, "registers": r.get("REG"), "local_bytes": r.get("LOCAL", 0),
                     "stack_bytes": r.get("STACK", 0), "shared_bytes": r.get("SHARED", 0),
                     "sass_instructions": s.instructions, "sass_by_class": dict(sorted(s.by_class.items())),
                     "loops": [{"body": lp[2]} for lp in s.loops]})
    return rows


# ----------------------------------------------------------------------------------------------------
# Output.


def _us(s: float) -> str:
    return f"{s * 1e6:,.0f} us" if s >= 1e-4 else f"{s * 1e6:.1f} us"


def markdown(records: list[dict], cuda_rows: list[dict]) -> str:
    lines = ["| op / case | kernel | regs | spill B | smem KB | SASS | tensor | warp instr / elem | bound | predicted | target |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for rec in records:
        first = True
        for r in rec["kernels"]:
            per = rec.get("warp_instructions_per_element")
            target = ""
            if first and "target" in rec:
                t = rec["target"]
                mark = {True: "met", False: "MISSED", None: "unknown"}[t["met"]]
                target = f"{t['text']}: {100 * t['predicted']:.0f}% ({mark})"
            lines.append(
                f"| {rec['op']} {rec['case'] if first else ''} | {r['kernel']} | {r['registers']} | "
                f"{r['local_bytes'] + r['stack_bytes']} | {r['shared_bytes'] / 1024:.0f} | "
                f"{'>=' if r['lower_bound'] else ''}{r['dynamic_instructions_per_warp']} | {r['tensor_cores']} | "
                f"{(f'{per:.2f}' if per is not None else '') if first else ''} | "
                f"{rec['bound_by'] + ' ' + _us(rec['predicted_s']) if first else ''} | "
                f"{(('>=' if rec['lower_bound'] else '') + _us(rec['predicted_s'])) if first else ''} | {target} |")
            first = False
    if cuda_rows:
        lines += ["", "| CUDA C++ kernel | regs | spill B | smem KB | SASS | loops |", "|---|---|---|---|---|---|"]
        for r in cuda_rows:
            short = r["kernel"] if len(r["kernel"]) < 70 else r["kernel"][:67] + "..."
            lines.append(f"| `{short}` | {r['registers']} | {r['local_bytes'] + r['stack_bytes']} | "
                         f"{r['shared_bytes'] / 1024:.0f} | {r['sass_instructions']} | {len(r['loops'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compile_report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    parser.add_argument("--filter", default="", help="only cases whose label contains this")
    parser.add_argument("--json", default="", help="write the full record here")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    parser.add_argument("--sass-dir", default="", help="keep each kernel's SASS here")
    parser.add_argument("--no-cuda-cpp", action="store_true", help="skip the CUDA C++ kernels of the extension")
    args = parser.parse_args(argv)

    import torch

    install_capture()
    import vlm_kernels as vk
    from vlm_kernels import _backend

    _backend.set_triton_compile_only(True)  # the triton backend takes CPU tensors, launches sized for a GPU
    torch.set_num_threads(max(1, torch.get_num_threads()))

    records, failures = [], []
    for op in [o.strip() for o in args.ops.split(",") if o.strip()]:
        if op not in CASES:
            parser.error(f"unknown op {op!r}; choose from {', '.join(CASES)}")
        for case in CASES[op]():
            if args.filter and args.filter not in case.label:
                continue
            _captured.clear()
            try:
                with vk.use_backend("triton"):
                    case.call()
            except Exception as exc:  # noqa: BLE001 - reported, and the exit status says so
                failures.append(f"{case.op} {case.label}: {exc.__class__.__name__}: {exc}")
                print(f"FAILED {case.op} {case.label}: {exc.__class__.__name__}: {str(exc)[:2000]}", file=sys.stderr)
                continue
            rec = analyse_case(case, list(_captured), args.sass_dir or None)
            records.append(rec)
            _print_record(rec)
    cuda_rows = [] if args.no_cuda_cpp else cuda_cpp_report()
    for r in cuda_rows:
        spill = r["local_bytes"] + r["stack_bytes"]
        print(f"cuda C++ {r['kernel'][:90]}: {r['registers']} regs, {spill} B local, "
              f"{r['sass_instructions']} SASS instructions{'  SPILLS' if spill else ''}")
    spilling = [f"{rec['op']} {rec['case']}: {r['kernel']} ({r['local_bytes'] + r['stack_bytes']} B local)"
                for rec in records for r in rec["kernels"] if r["local_bytes"] or r["stack_bytes"]]
    spilling += [f"cuda C++ {r['kernel']} ({r['local_bytes'] + r['stack_bytes']} B local)"
                 for r in cuda_rows if r["local_bytes"] or r["stack_bytes"]]
    if args.markdown:
        print()
        print(markdown(records, cuda_rows))
    if args.json:
        import triton

        with open(args.json, "w") as fh:
            json.dump({"target": "sm_90 (H200 model)", "triton": triton.__version__, "torch": torch.__version__,
                       "model": {"sms": SMS, "clock_hz": CLOCK_HZ, "copy_bw": COPY_BW, "bf16_rate": BF16_RATE,
                                 "tf32_rate": TF32_RATE, "issue_rate": ISSUE_RATE},
                       "cases": records, "cuda_cpp": cuda_rows, "failures": failures, "spills": spilling}, fh, indent=1)
    print(f"\n{len(records)} cases compiled, {len(failures)} failed, {len(spilling)} kernels with local memory (spills)")
    for s in spilling:
        print("  spills:", s)
    for f in failures:
        print("  failed:", f[:300])
    return 1 if failures or spilling else 0


def _print_record(rec: dict) -> None:
    per = rec.get("warp_instructions_per_element")
    head = f"{rec['op']} {rec['case']}: predicted {'>=' if rec['lower_bound'] else ''}{_us(rec['predicted_s'])} " \
           f"({rec['bound_by']}-bound; bytes floor {_us(rec['bytes_floor_s'])}"
    if rec["flops"]:
        head += f", tensor floor {_us(rec['flops_floor_s'])}"
    head += ")"
    if per is not None:
        head += f"; {per:.2f} warp instructions per element ({rec['thread_instructions_per_element']:.0f} per thread-element)"
    if "target" in rec:
        t = rec["target"]
        head += f"; target {t['text']}: predicted {100 * t['predicted']:.0f}%"
    print(head)
    for r in rec["kernels"]:
        spill = r["local_bytes"] + r["stack_bytes"]
        print(f"    {r['kernel']:<34} warps {r['num_warps']:>2} stages {r['num_stages']} programs {r['programs']:>8} "
              f"regs {r['registers']!s:>3} local {spill:>5} B smem {r['shared_bytes'] / 1024:5.1f} KB "
              f"SASS {'>=' if r['lower_bound'] else ''}{r['dynamic_instructions_per_warp']:>6} "
              f"tensor {r['tensor_cores']:<5} mufu {r['sass_by_class'].get('mufu', 0):>4} "
              f"int {r['sass_by_class'].get('int', 0):>5} loops {len(r['loops'])}")


if __name__ == "__main__":
    sys.exit(main())
