"""The benchmark runner (the README's main command).

Measures every implementation of every case side by side in one process, prints a table of time,
peak memory and speed-up of vlm_kernels over each peer, checks the issue targets, and writes a JSON
record (machine, versions, every number) and a PNG plot.

    python -m benchmarks.run                    # full sizes on the best device here
    python -m benchmarks.run --quick            # small sizes (a minute)
    python -m benchmarks.run --device cuda --out $OUT
    python -m benchmarks.run --device cuda --mode headline    # the GPU check's first stage: the targets only

Modes: ``all`` (default) every case and peer; ``headline`` only the cases that carry the headline
targets, without the extended peers; ``main`` every case but the extended ones, without the extended
peers (torch.compile, FlexAttention); ``extended`` what ``main`` leaves out (with our implementation
again, for the ratios). The JSON record is rewritten after every case, so a run cut short by a
timeout keeps what it measured.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

import torch

from .harness import copy_bandwidth, machine_record, measure_many

OPS = {"gumbel": "benchmarks.bench_gumbel", "vq": "benchmarks.bench_vq",
       "window_attention": "benchmarks.bench_window_attention", "models": "benchmarks.bench_models",
       "overhead": "benchmarks.bench_overhead", "transformers": "benchmarks.bench_transformers"}


def _fmt_bytes(n):
    return "-" if n is None else f"{n / 2**20:,.0f} MB"


def _fmt_time(s):
    if s is None:
        return "-"
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms"


def write_json(path: str, payload: dict) -> None:
    """Atomic rewrite: a run killed mid-write keeps the previous complete file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(payload, fh, indent=2)
    os.replace(tmp, path)


MODES = ("all", "headline", "main", "extended")


def select_impls(case, mode: str) -> dict:
    """The implementations of ``case`` that ``mode`` times ({} when the case is not in this mode)."""
    if mode == "all":
        return dict(case.impls)
    if mode in ("headline", "main"):
        if case.extended or (mode == "headline" and not case.headline):
            return {}
        return {n: f for n, f in case.impls.items() if n not in case.extended_impls}
    if case.extended:
        return dict(case.impls)
    if not case.extended_impls:
        return {}
    return {n: f for n, f in case.impls.items() if n in case.extended_impls or n == case.ours}


def run_case(case, device, bandwidth, impls=None):
    """Measure each implementation (``impls``: a subset of ``case.impls``); returns the case's record."""
    def error(exc):
        return {"error": f"{exc.__class__.__name__}: {exc}"[:300]}

    impls = case.impls if impls is None else impls
    rows, fns = {}, {}
    if device.type == "cuda":  # one at a time: only one implementation's buffers on the device
        for name, setup in impls.items():
            try:
                m = measure_many({name: setup()}, device, repeats=case.repeats)[name]
            except Exception as exc:  # noqa: BLE001 - a failing peer is reported, not fatal
                m = exc
            rows[name] = error(m) if isinstance(m, Exception) else m  # no traceback keeping buffers alive
            m = None
            torch.cuda.empty_cache()
    else:  # all set up, then timed in rotating rounds
        for name, setup in impls.items():
            try:
                fns[name] = setup()
            except Exception as exc:  # noqa: BLE001
                rows[name] = error(exc)
        rows.update(measure_many(fns, device, repeats=case.repeats))
        fns = None
    def row(v):
        if isinstance(v, Exception):
            return error(v)
        if isinstance(v, dict):  # already an error row
            return v
        calls = max(1, case.calls)
        return {"time_s": v.time_s / calls, "peak_bytes": v.peak_bytes, "times_s": [t / calls for t in v.times_s]}

    rows = {name: row(rows[name]) for name in impls}
    ours = rows.get(case.ours, {})
    for name, row in rows.items():
        if "time_s" in row and "time_s" in ours:
            row["speedup_of_ours"] = row["time_s"] / ours["time_s"]
    record = {"op": case.op, "shape": case.shape, "mode": case.mode, "dtype": case.dtype, "ours": case.ours,
              "results": rows, "targets": [], "calls_per_timed_call": case.calls}
    if case.scaling_group:
        record.update(scaling_group=case.scaling_group, size=case.size, size_label=case.size_label,
                      show_floor=device.type == "cuda")
    if case.floor_bytes and "time_s" in ours:
        record["floor_bytes"] = case.floor_bytes
        record["floor_time_s"] = case.floor_bytes / bandwidth
        record["fraction_of_copy_bandwidth"] = record["floor_time_s"] / ours["time_s"]
    if case.floor_flops and "time_s" in ours:
        record["floor_flops"] = case.floor_flops
        record["ours_gflops"] = case.floor_flops / ours["time_s"] / 1e9
    for t in case.targets:
        if t.max_seconds is not None:
            sec = ours.get("time_s")
            record["targets"].append({"target": t.label, "peer": "", "max_seconds": t.max_seconds, "ratio": None,
                                      "time_s": sec, "met": None if sec is None else bool(sec <= t.max_seconds)})
            continue
        if t.max_bytes is not None:
            peak = ours.get("peak_bytes")
            record["targets"].append({"target": t.label, "peer": "", "max_bytes": t.max_bytes, "ratio": None,
                                      "peak_bytes": peak, "met": None if peak is None else bool(peak <= t.max_bytes)})
            continue
        if t.max_peak_ratio is not None:
            peak, peer_peak = ours.get("peak_bytes"), rows.get(t.peer, {}).get("peak_bytes")
            ratio = peak / peer_peak if peak is not None and peer_peak else None
            record["targets"].append({"target": t.label, "peer": t.peer, "max_peak_ratio": t.max_peak_ratio,
                                      "ratio": ratio, "peak_bytes": peak, "peer_peak_bytes": peer_peak,
                                      "met": None if ratio is None else bool(ratio <= t.max_peak_ratio)})
            continue
        if t.peer == "floor":
            ratio = record.get("fraction_of_copy_bandwidth")
        else:
            ratio = rows.get(t.peer, {}).get("speedup_of_ours")
        record["targets"].append({"target": t.label, "peer": t.peer, "min_ratio": t.min_ratio, "ratio": ratio,
                                  "met": None if ratio is None else bool(ratio >= t.min_ratio)})
    return record


def print_case(rec):
    print(f"\n{rec['op']}  {rec['shape']}  {rec['mode']}  {rec['dtype']}")
    print(f"  {'implementation':<28} {'time':>11} {'peak mem':>10} {'ours is':>10}")
    for name, row in rec["results"].items():
        if "error" in row:
            print(f"  {name:<28} error: {row['error']}")
            continue
        sp = row.get("speedup_of_ours")  # None when our implementation failed
        sp_txt = "" if name == rec["ours"] or sp is None else f"{sp:.2f}x"
        print(f"  {name:<28} {_fmt_time(row['time_s']):>11} {_fmt_bytes(row['peak_bytes']):>10} {sp_txt:>10}")
    if "fraction_of_copy_bandwidth" in rec:
        print(f"  floor (bytes / copy bandwidth): {rec['floor_time_s'] * 1e3:.2f} ms; ours at "
              f"{100 * rec['fraction_of_copy_bandwidth']:.0f}% of copy bandwidth")
    if "ours_gflops" in rec:
        print(f"  ours at {rec['ours_gflops']:.0f} GFLOP/s of distance product")
    for t in rec["targets"]:
        mark = {True: "MET", False: "MISSED", None: "n/a"}[t["met"]]
        if "max_seconds" in t:
            print(f"  target {t['target']}: {'-' if t['time_s'] is None else _fmt_time(t['time_s'])} -> {mark}")
            continue
        if "max_bytes" in t:
            print(f"  target {t['target']}: peak {_fmt_bytes(t['peak_bytes'])} -> {mark}")
            continue
        if "max_peak_ratio" in t:
            ratio = "-" if t["ratio"] is None else f"{t['ratio']:.3f}"
            print(f"  target {t['target']}: peak {_fmt_bytes(t['peak_bytes'])} vs {_fmt_bytes(t['peer_peak_bytes'])}, "
                  f"ratio {ratio} -> {mark}")
            continue
        ratio = "-" if t["ratio"] is None else f"{t['ratio']:.2f}"
        print(f"  target {t['target']}: ratio {ratio} -> {mark}")


_ISA_ENV = {  # level -> (PyTorch's ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS, FAISS_OPT_LEVEL)
    "baseline": ("default", "SSE4_2", "generic"),
    "avx2": ("avx2", "AVX2", "avx2"),
    "avx512": ("avx512", "AVX512", "avx512"),
}


def _reexec_at_isa(level: str, argv: list) -> None:
    """Run this benchmark again with every library held to ``level`` (they read it at load time)."""
    aten, mkl, faiss = _ISA_ENV[level]
    env = dict(os.environ, VLM_KERNELS_CPU_ISA=level, ATEN_CPU_CAPABILITY=aten, MKL_ENABLE_INSTRUCTIONS=mkl,
               FAISS_OPT_LEVEL=faiss)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "benchmarks.run"] + argv, env)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {', '.join(OPS)}")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="small shapes, for a smoke run")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"), help="folder for JSON + PNG")
    parser.add_argument("--tag", default="", help="suffix for the output file names")
    parser.add_argument("--filter", default="", help="only cases whose 'shape mode' text contains this")
    parser.add_argument("--mode", default="all", choices=MODES,
                        help="which cases and peers: all (default), headline, main (no torch.compile/FlexAttention "
                             "peers, no blocks/models), extended (what main leaves out)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--cpu-isa", default="", choices=["", "baseline", "avx2", "avx512"],
                        help="emulate a CPU of this level for ours and the peers alike: VLM_KERNELS_CPU_ISA, "
                             "ATEN_CPU_CAPABILITY (PyTorch's kernels), MKL_ENABLE_INSTRUCTIONS, FAISS_OPT_LEVEL "
                             "(re-executes the runner with them set)")
    parser.add_argument("--scaling", action="store_true",
                        help="time against size for one case per op (each op's scaling_cases), plotted as curves")
    parser.add_argument("--append", action="store_true",
                        help="add to the cases already in the output JSON (of the same device, mode and tag)")
    args = parser.parse_args(argv)
    if args.cpu_isa and os.environ.get("VLM_KERNELS_CPU_ISA") != args.cpu_isa:
        _reexec_at_isa(args.cpu_isa, sys.argv[1:] if argv is None else list(argv))

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    os.makedirs(args.out, exist_ok=True)
    machine = machine_record(device)
    from vlm_kernels import _backend

    isa = _backend.cpu_isa()
    machine["cpu_isa"] = isa.get("selected")
    machine["cpu_isa_detected"] = isa.get("detected")
    machine["aten_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    bandwidth = copy_bandwidth(device, nbytes=(1 << 30) if device.type == "cuda" else (1 << 28))
    machine["copy_bandwidth_GBps"] = bandwidth / 1e9
    print(f"device: {machine['device']}; torch {machine['torch']}; triton {machine['triton']}; "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write); CPU kernels at {machine['cpu_isa']} "
          f"(CPU runs {machine['cpu_isa_detected']}; PyTorch's kernels at {machine['aten_cpu_capability']})")
    import vlm_kernels

    print(vlm_kernels.info())

    stem = (f"bench_{device.type}{'_quick' if args.quick else ''}{'_scaling' if args.scaling else ''}"
            f"{'' if args.mode == 'all' else '_' + args.mode}{'_' + args.tag if args.tag else ''}")
    json_path = os.path.join(args.out, stem + ".json")
    png_path = os.path.join(args.out, stem + ".png")
    records = []
    if args.append and os.path.exists(json_path):
        with open(json_path) as fh:
            records = json.load(fh).get("cases", [])
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    for op in ops:
        if op not in OPS:
            parser.error(f"unknown op {op!r}; choose from {', '.join(OPS)}")
    for op in ops:
        module = importlib.import_module(OPS[op])
        if args.scaling and not hasattr(module, "scaling_cases"):
            continue
        for case in (module.scaling_cases if args.scaling else module.cases)(device, quick=args.quick):
            if args.filter and args.filter not in f"{case.shape} {case.mode}":
                continue
            impls = case.impls if args.scaling else select_impls(case, args.mode)
            if not impls:
                continue
            t0 = time.perf_counter()
            rec = run_case(case, device, bandwidth, impls)
            rec["wall_s"] = time.perf_counter() - t0
            records.append(rec)
            print_case(rec)
            sys.stdout.flush()
            write_json(json_path, {"machine": machine, "quick": args.quick, "mode": args.mode, "cases": records,
                                   "complete": False})

    write_json(json_path, {"machine": machine, "quick": args.quick, "mode": args.mode, "cases": records,
                           "complete": True})
    if not args.no_plot:
        from . import plots

        title = f"{machine['device']} ({machine.get('cpu_isa', device.type)})" if device.type == "cpu" else machine["device"]
        (plots.scaling if args.scaling else plots.summary)(records, png_path, title)
    missed = [(r["op"], r["shape"], r["mode"], t["target"]) for r in records for t in r["targets"] if t["met"] is False]
    print(f"\nwrote {json_path}{'' if args.no_plot else ' and ' + png_path}")
    print(f"targets: {sum(t['met'] is True for r in records for t in r['targets'])} met, {len(missed)} missed")
    for m in missed:
        print("  missed:", " | ".join(m))
    return 0


if __name__ == "__main__":
    sys.exit(main())
