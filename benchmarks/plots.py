"""The benchmark pictures, readable at 100% zoom on a laptop screen (1400 x ~900 pixels).

* :func:`summary`: one panel per op family in a grid; each case is a row of horizontal bars, our speed-up
  over each peer (log axis, 1x marked), the target drawn on its peer's bar as a black tick, and the row
  label green (every target met), red (one missed) or grey (no target), with the case's other targets
  (fraction of the copy-bandwidth floor, time per call, memory) written at the right.
* :func:`scaling`: time against size for one case per op (log-log), ours and its main peers, and on a
  GPU the fraction of the copy-bandwidth floor on a second axis.
"""

from __future__ import annotations

import math
import re
import textwrap

FAMILIES = [  # (title, ops)
    ("Gumbel-softmax", ("gumbel_softmax",)),
    ("Vector quantisation", ("vq_nearest", "VectorQuantizer", "ResidualVQ")),
    ("Window attention (the op)", ("window_attention op",)),
    ("Swin block", ("swin_block",)),
    ("Whole models", ("swin_tiny", "dvae encode+sample")),
    ("Host overhead (per call)", ("host overhead",)),
    ("Hugging Face Swin encoders", ("hf_donut_stage", "hf_donut_encoder", "hf swin", "DonutSwin encoder")),
]
COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974",
          "#64B5CD"]


def short_label(rec: dict, with_op: bool = False) -> str:
    """A case's row label: its shape without what the panel title already says (``with_op``: prefixed with
    the op, for panels that hold several)."""
    op = "" if rec["op"].startswith("hf_") else rec["op"].replace(" encode+sample", "")  # hf: the shape says it
    s = (op + " " if with_op and op else "") + rec["shape"]
    s = re.sub(r"Swin-T (stage \d) \d+x\d+ C=\d+ h=\d+", r"\1", s)
    s = re.sub(r"\s*w\d+ s\d+", "", s)
    s = re.sub(r"\s*D=\d+", "", s)
    s = re.sub(r"\s*C=\d+ h=\d+ w\d+", "", s)  # DonutSwin stages
    s = re.sub(r"ResidualVQ\(dim=\d+, num_quantizers=(\d+), codebook_size=(\d+)\)", r"\1 x \2 codes", s)
    s = s.replace(" tiny input", "")
    dtype = "" if rec.get("dtype") in ("float32", None) else f" {rec['dtype'].replace('bfloat16', 'bf16').replace('float16', 'fp16')}"
    # At most ~30 characters a line: a long label would squeeze its panel's bars into a sliver.
    return textwrap.fill(f"{s} {rec['mode']}{dtype}".strip(), width=30, break_on_hyphens=False)


def _family(op: str) -> str:
    for title, ops in FAMILIES:
        if op in ops:
            return title
    return op


def _verdict(rec: dict):
    mets = [t["met"] for t in rec.get("targets", [])]
    if not mets:
        return None
    if any(m is False for m in mets):
        return False
    return True if all(m is True for m in mets) else None


def _side_note(rec: dict) -> str:
    notes = []
    for t in rec.get("targets", []):
        mark = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
        if t.get("peer") == "floor":
            got = "-" if t["ratio"] is None else f"{100 * t['ratio']:.0f}%"
            notes.append(f"{got} of floor (>= {100 * t['min_ratio']:.0f}%: {mark})")
        elif "max_seconds" in t:
            got = "-" if t.get("time_s") is None else f"{t['time_s'] * 1e6:.0f} us"
            notes.append(f"{got} (<= {t['max_seconds'] * 1e6:.0f} us: {mark})")
        elif "max_bytes" in t:
            got = "-" if t.get("peak_bytes") is None else f"{t['peak_bytes'] / 2**20:.0f} MB"
            notes.append(f"{got} (<= {t['max_bytes'] / 2**20:.0f} MB: {mark})")
    if not notes and "fraction_of_copy_bandwidth" in rec:
        notes.append(f"{100 * rec['fraction_of_copy_bandwidth']:.0f}% of copy bw")
    return "; ".join(notes)


def summary(records: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    groups: dict[str, list[dict]] = {}
    for rec in records:
        groups.setdefault(_family(rec["op"]), []).append(rec)
    if not groups:
        return
    order = [t for t, _ in FAMILIES if t in groups] + [g for g in groups if g not in dict(FAMILIES)]
    peers = []
    for rec in records:
        for name, row in rec["results"].items():
            if name != rec["ours"] and "speedup_of_ours" in row and name not in peers:
                peers.append(name)
    color = {p: COLORS[i % len(COLORS)] for i, p in enumerate(peers)}

    ncols = 2 if len(order) > 1 else 1
    nrows = math.ceil(len(order) / ncols)
    rows_per = [sum(1 for _ in groups[g]) for g in order]
    height = max(4.0, min(24.0, 1.0 + 0.45 * sum(max(rows_per[i:i + ncols]) for i in range(0, len(order), ncols))
                          + 1.5 * nrows))
    fig, axes = plt.subplots(nrows, ncols, figsize=(14, height), squeeze=False,
                             gridspec_kw={"height_ratios": [max(rows_per[i:i + ncols]) + 2.5
                                                            for i in range(0, len(order), ncols)]})
    for ax in axes.flat[len(order):]:
        ax.axis("off")
    for ax, fam in zip(axes.flat, order):
        recs = groups[fam]
        fam_peers = [p for p in peers if any("speedup_of_ours" in r["results"].get(p, {}) for r in recs)]
        xs_all = [1.0]
        for i, rec in enumerate(recs):
            y0 = len(recs) - 1 - i
            present = [p for p in fam_peers if rec["results"].get(p, {}).get("speedup_of_ours") is not None]
            h = 0.8 / max(1, len(present))
            for j, p in enumerate(present):
                sp = rec["results"][p]["speedup_of_ours"]
                y = y0 + 0.4 - h * (j + 0.5)
                ax.barh(y, sp, height=h * 0.9, color=color[p])
                ax.annotate(f"{sp:.2g}x", xy=(sp, y), xytext=(2, 0), textcoords="offset points", va="center",
                            fontsize=6.5, color="#333333")
                xs_all.append(sp)
                for t in rec.get("targets", []):
                    if t.get("peer") == p and t.get("min_ratio"):
                        ax.plot([t["min_ratio"]] * 2, [y - h * 0.55, y + h * 0.55], color="black", lw=2.4)
                        xs_all.append(t["min_ratio"])
            if not present:
                ax.annotate("ours failed" if "error" in rec["results"].get(rec["ours"], {}) else "no peer ran",
                            xy=(1.0, y0), va="center", fontsize=7.5, color="#cf222e")
            note = _side_note(rec)
            if note:
                ax.annotate(note, xy=(1.0, y0), xycoords=("axes fraction", "data"), xytext=(4, 0),
                            textcoords="offset points", va="center", fontsize=7.5, color="#333333")
        ax.set_yticks(range(len(recs)))
        several = len({r["op"] for r in recs}) > 1
        ax.set_yticklabels([short_label(r, several) for r in reversed(recs)], fontsize=8.5)
        for lab, rec in zip(ax.get_yticklabels(), reversed(recs)):
            lab.set_color({True: "#1a7f37", False: "#cf222e", None: "#555555"}[_verdict(rec)])
        ax.set_xscale("log")
        lo, hi = min(xs_all), max(xs_all)
        ax.set_xlim(lo / 1.5, hi * 2.2)
        ticks = [t for t in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if lo / 1.5 <= t <= hi * 2.2]
        ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_title(fam, fontsize=10.5, loc="left", fontweight="bold")
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="x", which="major", alpha=0.3)
        ax.set_ylim(-0.6, len(recs) - 0.4)
        handles = [plt.Rectangle((0, 0), 1, 1, color=color[p]) for p in fam_peers]
        ax.legend(handles, [f"vs {p}" for p in fam_peers], fontsize=7.5, loc="upper center",
                  bbox_to_anchor=(0.5, -0.09), ncol=min(3, max(1, len(fam_peers))), frameon=False)
    fig.suptitle(f"{title}: speed-up of vlm_kernels over each peer (peer time / our time; > 1 is faster). "
                 "Black tick: target. Label green: targets met, red: missed.", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.93, 0.97))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def scaling(records: list[dict], path: str, title: str) -> None:
    """Time against size: ``records`` carry ``scaling_group`` (the panel) and ``size`` (the x value)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[dict]] = {}
    for rec in records:
        groups.setdefault(rec["scaling_group"], []).append(rec)
    if not groups:
        return
    fig, axes = plt.subplots(1, len(groups), figsize=(14, 4.6), squeeze=False)
    for ax, (name, recs) in zip(axes.flat, groups.items()):
        recs = sorted(recs, key=lambda r: r["size"])
        impls = []
        for r in recs:
            impls += [n for n in r["results"] if n not in impls]
        for i, impl in enumerate(impls):
            pts = [(r["size"], r["results"][impl]["time_s"]) for r in recs if "time_s" in r["results"].get(impl, {})]
            if pts:
                ax.plot(*zip(*pts), marker="o", lw=2.4 if impl == recs[0]["ours"] else 1.4,
                        color=COLORS[i % len(COLORS)], label=impl)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(recs[0].get("size_label", "size"), fontsize=9)
        ax.set_ylabel("time per call (s)", fontsize=9)
        ax.set_title(name, fontsize=10, loc="left")
        ax.grid(which="both", alpha=0.25)
        ax.legend(fontsize=7.5)
        fr = [(r["size"], r["fraction_of_copy_bandwidth"]) for r in recs if "fraction_of_copy_bandwidth" in r]
        if fr and recs[0].get("show_floor"):
            ax2 = ax.twinx()
            ax2.plot(*zip(*fr), ls="--", color="black", lw=1, label="ours, fraction of copy bw")
            ax2.set_ylim(0, 1.05)
            ax2.set_ylabel("fraction of the copy-bandwidth floor", fontsize=8)
    fig.suptitle(f"{title}: time against size", fontsize=10.5)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=100)
    plt.close(fig)
