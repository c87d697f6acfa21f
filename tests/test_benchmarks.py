"""The benchmark runner and the benchmarks' own peers: a peer that computes something else, or a runner
that dies when our implementation fails, would make the recorded ratios worthless."""

import json

import pytest
import torch

from benchmarks import run as runner
from benchmarks.cases import Case, Target


def test_op_peers_compute_our_op():
    """The op-level peers of the window-attention benchmark (a user's own roll + partition + timm math,
    eager and SDPA) give vk.window_attention's output and gradients."""
    pytest.importorskip("timm")
    import vlm_kernels as vk
    from benchmarks.bench_window_attention import SHIFT, WINDOW, _OpPeer

    torch.manual_seed(0)
    res, dim, heads = (14, 14), 64, 2
    qkv = torch.randn(2, *res, 3 * dim, dtype=torch.float64, requires_grad=True)
    table = torch.randn((2 * WINDOW - 1) ** 2, heads, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, *res, dim, dtype=torch.float64)
    with vk.use_backend("reference"):
        want = vk.window_attention(qkv, num_heads=heads, window_size=WINDOW, shift_size=SHIFT, rel_pos_bias=table)
    gq, gt = torch.autograd.grad(want, (qkv, table), dy)
    for kind in ("eager", "sdpa"):
        got = _OpPeer(kind, res, dim, heads, qkv.device, torch.float64)(qkv, table)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=kind)
        pq, pt = torch.autograd.grad(got, (qkv, table), dy)
        torch.testing.assert_close(pq, gq, rtol=1e-9, atol=1e-9, msg=kind)
        torch.testing.assert_close(pt, gt, rtol=1e-9, atol=1e-9, msg=kind)


def _case(ours_fails: bool) -> Case:
    def ours():
        if ours_fails:
            raise RuntimeError("no kernel")
        return lambda: torch.zeros(4).add_(1)

    return Case("demo", "tiny", "fwd", "float32", "ours",
                {"ours": ours, "peer": lambda: (lambda: torch.ones(4) * 2), "slow peer": lambda: (lambda: torch.ones(4))},
                [Target("peer", 1.0, ">=1x peer"), Target("", 0.0, "<= 1 s", max_seconds=1.0)],
                floor_bytes=32, repeats=2, calls=4, extended_impls=frozenset({"slow peer"}))


def test_runner_survives_a_failing_implementation(capsys):
    rec = runner.run_case(_case(ours_fails=True), torch.device("cpu"), 1e9)
    assert "error" in rec["results"]["ours"] and "time_s" in rec["results"]["peer"]
    assert all(t["met"] is None for t in rec["targets"])
    runner.print_case(rec)  # must not raise on the missing ratio
    assert "no kernel" in capsys.readouterr().out


def test_runner_per_call_time_and_targets():
    rec = runner.run_case(_case(ours_fails=False), torch.device("cpu"), 1e9)
    ours = rec["results"]["ours"]
    assert ours["time_s"] == pytest.approx(sorted(ours["times_s"])[len(ours["times_s"]) // 2], rel=0.5)
    assert rec["calls_per_timed_call"] == 4
    assert [t["met"] for t in rec["targets"]][1] is True  # far under a second per call
    runner.print_case(rec)


def test_modes_select_peers():
    case = _case(False)
    assert set(runner.select_impls(case, "all")) == {"ours", "peer", "slow peer"}
    assert set(runner.select_impls(case, "main")) == {"ours", "peer"}
    assert runner.select_impls(case, "headline") == {}
    assert set(runner.select_impls(case, "extended")) == {"ours", "slow peer"}
    case.headline = True
    assert set(runner.select_impls(case, "headline")) == {"ours", "peer"}
    case.extended = True
    assert runner.select_impls(case, "main") == {} and set(runner.select_impls(case, "extended")) == set(case.impls)


def test_json_is_rewritten_atomically(tmp_path):
    path = str(tmp_path / "x.json")
    runner.write_json(path, {"cases": [1]})
    runner.write_json(path, {"cases": [1, 2]})
    assert json.loads(open(path).read()) == {"cases": [1, 2]}
    assert not (tmp_path / "x.json.tmp").exists()


def test_plot_labels_stay_short_and_families_group_their_ops(tmp_path):
    """Row labels wrap at about 30 characters (one long label squeezed every bar of its panel into a
    sliver) and each op lands in its family's panel, the summary PNG included."""
    pytest.importorskip("matplotlib")
    from benchmarks import plots

    def rec(op, shape, mode="fwd"):
        return {"op": op, "shape": shape, "mode": mode, "dtype": "float32", "ours": "vlm_kernels",
                "results": {"vlm_kernels": {"time_s": 1.0}, "peer": {"time_s": 2.0, "speedup_of_ours": 2.0}},
                "targets": []}

    records = [rec("ResidualVQ", "ResidualVQ(dim=256, num_quantizers=8, codebook_size=1024) N=65536", "train step"),
               rec("hf_donut_stage", "DonutSwin stage 1 160x120 C=128 h=4 w10 B=1"),
               rec("hf_donut_encoder", "DonutSwin-base encoder 640x480 B=1")]
    labels = [plots.short_label(r, with_op=True) for r in records]
    assert labels[0] == "ResidualVQ 8 x 1024 codes\nN=65536 train step"
    assert all(len(line) <= 30 for label in labels for line in label.splitlines()), labels
    assert not labels[1].startswith("hf_")
    assert {plots._family(r["op"]) for r in records[1:]} == {"Hugging Face Swin encoders"}
    path = tmp_path / "summary.png"
    plots.summary(records, str(path), "test")
    assert path.stat().st_size > 0
