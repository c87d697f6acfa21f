"""examples/train_llava.py: the scene renderer and question templates are deterministic and answer
correctly (each answer re-derived here from the scene description by independent geometry), the
held-out stream is disjoint from the training streams, and a tiny end-to-end run (every phase a few
steps) completes. Also LLaVA.text_loss, the decoder's text-only pre-training loss the script adds."""

from __future__ import annotations

import collections
import re

import pytest
import torch
import torch.nn.functional as F

from examples import train_llava as tl
from python_models.checkpoint import load_checkpoint
from python_models.llava import IGNORE_INDEX, LLaVA, LLaVAConfig

N = 300  # examples per question type checked


def examples(stream, qtype, n=N, seed=0):
    return [tl.make_example(stream, seed, i, qtype) for i in range(n)]


def box(sh):
    return sh.cx - sh.half, sh.cy - sh.half, sh.cx + sh.half, sh.cy + sh.half


# ----------------------------------------------------------------------------------------------------
# Scenes


def test_scenes_and_pixels_are_deterministic_per_stream_seed_and_index():
    for qtype in tl.QUESTION_TYPES + ("caption",):
        a, b = tl.make_example("questions", 3, 17, qtype), tl.make_example("questions", 3, 17, qtype)
        assert a == b
        assert torch.equal(tl.render(a.scene), tl.render(b.scene))
    assert tl.make_example("questions", 3, 17, "count") != tl.make_example("questions", 4, 17, "count")


def test_held_out_stream_shares_no_scene_with_the_training_streams():
    def key(scene):  # the discrete description, rounded positions
        return tuple(sorted((s.kind, s.colour, s.row, s.col, round(s.cx, 3), round(s.cy, 3)) for s in scene.shapes))

    held_out = {key(ex.scene) for ex in examples("eval", "position", 200)}
    for stream in ("pretrain", "text", "captions", "questions"):
        train = {key(tl.random_scene(tl.scene_rng(stream, 0, i))) for i in range(200)}
        assert not held_out & train, stream


def test_scene_invariants():
    seen = collections.Counter()
    for i in range(500):
        scene = tl.random_scene(tl.scene_rng("questions", 0, i))
        assert 1 <= len(scene.shapes) <= tl.MAX_SHAPES
        cells = [(s.row, s.col) for s in scene.shapes]
        assert len(set(cells)) == len(cells)
        names = [(s.colour, s.kind) for s in scene.shapes]
        assert len(set(names)) == len(names)
        for s in scene.shapes:
            x0, y0, x1, y1 = box(s)
            assert s.col * tl.CELL < x0 and x1 < (s.col + 1) * tl.CELL  # wholly inside its own cell
            assert s.row * tl.CELL < y0 and y1 < (s.row + 1) * tl.CELL
            lo, hi = tl.SIZES[s.size]
            assert lo <= s.half <= hi
            seen.update([s.kind, s.colour, s.size])
        seen[f"n{len(scene.shapes)}"] += 1
    for thing in tl.KINDS + tl.COLOUR_NAMES + tuple(tl.SIZES) + ("n1", "n2", "n3", "n4"):
        assert seen[thing] > 20, thing


def nearest_colour(rgb, background):
    palette = dict(tl.COLOURS, background=(background,) * 3)
    return min(palette, key=lambda name: sum((a - b) ** 2 for a, b in zip(rgb, palette[name])))


def test_render_draws_the_described_shapes():
    for i in range(60):
        scene = tl.random_scene(tl.scene_rng("eval", 1, i))
        img = (tl.render(scene) * 255).round()
        assert img.shape == (3, tl.IMG, tl.IMG) and img.dtype == torch.float32
        occupied = {(s.row, s.col) for s in scene.shapes}
        for s in scene.shapes:
            rgb = img[:, int(s.cy), int(s.cx)].tolist()  # the centre pixel has the shape's colour
            assert nearest_colour(rgb, scene.background) == s.colour
            # the kind, from the area the colour covers in the cell (antialiased: fractional coverage) and
            # its centroid (a triangle's lies h/3 below the box centre; the other kinds' at the centre)
            cell = img[:, s.row * tl.CELL:(s.row + 1) * tl.CELL, s.col * tl.CELL:(s.col + 1) * tl.CELL]
            bg = torch.full((3, 1, 1), float(scene.background))
            direction = torch.tensor(s.rgb, dtype=torch.float32).view(3, 1, 1) - bg
            alpha = ((cell - bg) * direction).sum(0) / (direction ** 2).sum()
            area = float(alpha.sum())
            expected = {"circle": torch.pi, "square": 4.0, "triangle": 2.0, "diamond": 2.0}[s.kind] * s.half ** 2
            assert 0.95 < area / expected < 1.2, (s, area, expected)  # circle vs square: 4 / pi = 1.27
            ys, xs = torch.meshgrid(torch.arange(tl.CELL) + 0.5 + s.row * tl.CELL,
                                    torch.arange(tl.CELL) + 0.5 + s.col * tl.CELL, indexing="ij")
            centroid = float((alpha * xs).sum()) / area, float((alpha * ys).sum()) / area
            drop = s.half / 3 if s.kind == "triangle" else 0.0
            assert abs(centroid[0] - s.cx) < 0.3 and abs(centroid[1] - (s.cy + drop)) < 0.3, (s, centroid)
        for r in range(tl.GRID):
            for c in range(tl.GRID):
                if (r, c) not in occupied:  # an empty cell is plain background
                    cell = img[:, r * tl.CELL:(r + 1) * tl.CELL, c * tl.CELL:(c + 1) * tl.CELL]
                    assert (cell == scene.background).all()
        kinds, colours = tl.cell_targets(scene)
        for s in scene.shapes:
            assert tl.KINDS[kinds[s.row * tl.GRID + s.col] - 1] == s.kind
            assert tl.COLOUR_NAMES[colours[s.row * tl.GRID + s.col] - 1] == s.colour
        assert int((kinds > 0).sum()) == len(scene.shapes) == int((colours > 0).sum())


# ----------------------------------------------------------------------------------------------------
# Questions: every answer re-derived from the scene description


def resolve(scene, ref):
    """The one shape that ``ref`` ("kind" or "colour kind") names; it must name exactly one."""
    words = ref.split()
    match = [s for s in scene.shapes if s.kind == words[-1] and (len(words) == 1 or s.colour == words[0])]
    assert len(match) == 1, (ref, scene)
    return match[0]


def strictly(a, b, relation):
    """a is ``relation`` b with the two shapes' boxes apart along that axis."""
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = box(a), box(b)
    return {"left of": ax1 < bx0, "right of": bx1 < ax0, "above": ay1 < by0, "below": by1 < ay0}[relation]


def expected_answer(ex):
    scene, q = ex.scene, ex.prompt
    if m := re.fullmatch(r"what color is the (\w+) \?", q):
        return resolve(scene, m[1]).colour
    if q == "how many shapes are there ?":
        return str(len(scene.shapes))
    if m := re.fullmatch(r"how many (\w+)s are there \?", q):
        assert m[1] in tl.KINDS
        return str(sum(s.kind == m[1] for s in scene.shapes))
    if m := re.fullmatch(r"is the (.+?) (left of|right of|above|below) the (.+) \?", q):
        a, b = resolve(scene, m[1]), resolve(scene, m[3])
        assert a is not b
        opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[m[2]]
        assert strictly(a, b, m[2]) != strictly(a, b, opposite)  # never ambiguous
        return "yes" if strictly(a, b, m[2]) else "no"
    if m := re.fullmatch(r"is there a (\w+) (\w+) \?", q):
        return "yes" if any(s.colour == m[1] and s.kind == m[2] for s in scene.shapes) else "no"
    if m := re.fullmatch(r"which (row|column) is the (.+) in \?", q):
        s = resolve(scene, m[2])
        x0, y0, x1, y1 = box(s)  # the cell from the box alone: 12-pixel cells, counted from 1
        lo, hi = (y0, y1) if m[1] == "row" else (x0, x1)
        assert int(lo // tl.CELL) == int(hi // tl.CELL)
        return str(int(lo // tl.CELL) + 1)
    if q == tl.CAPTION_PROMPT:
        order = sorted(scene.shapes, key=lambda s: (s.cy // tl.CELL, s.cx // tl.CELL))
        return " , ".join(f"{s.colour} {s.kind}" for s in order)
    raise AssertionError(f"no template matches {q!r}")


@pytest.mark.parametrize("qtype", tl.QUESTION_TYPES + (tl.LOCATE, "caption"))
@pytest.mark.parametrize("stream", ["questions", "eval"])
def test_answers_agree_with_the_scene_description(qtype, stream):
    for ex in examples(stream, qtype):
        assert ex.qtype == qtype
        assert ex.answer == expected_answer(ex), ex


def test_answers_are_balanced_and_cover_the_vocabulary():
    answers = {q: collections.Counter(ex.answer for ex in examples("questions", q, 600)) for q in tl.QUESTION_TYPES}
    for q in ("position", "presence"):
        assert set(answers[q]) == {"yes", "no"} and min(answers[q].values()) > 0.4 * 600, answers[q]
    assert set(answers["colour"]) == set(tl.COLOUR_NAMES)
    assert set(answers["count"]) == {"0", "1", "2", "3", "4"}
    where = collections.Counter((ex.prompt.split()[1], ex.answer) for ex in examples("questions", tl.LOCATE, 600))
    assert set(where) == {(axis, str(i)) for axis in ("row", "column") for i in range(1, tl.GRID + 1)}
    templates = {re.sub(r"\b(" + "|".join(tl.KINDS + tl.COLOUR_NAMES) + r")s?\b", "X", ex.prompt)
                 for q in tl.QUESTION_TYPES for ex in examples("questions", q, 200)}
    assert {"how many shapes are there ?", "how many X are there ?", "what color is the X ?",
            "is there a X X ?"} <= templates
    assert any(t.startswith("is the X X") for t in templates) and any(re.match(r"is the X (left|right|above|below)", t)
                                                                        for t in templates)


def test_ask_refuses_impossible_questions():
    rng = tl.scene_rng("t", 0, 0)
    lone = tl.Scene((tl.Shape("circle", "red", "small", 0, 0, 6.0, 6.0, 3.5, (220, 45, 45)),), 30)
    assert tl.ask(lone, "position", rng) is None  # one shape: nothing to compare
    twins = tl.Scene((lone.shapes[0], tl.Shape("circle", "blue", "small", 0, 1, 18.0, 6.0, 3.5, (55, 95, 235))), 30)
    assert tl.ask(twins, "colour", rng) is None  # no kind occurs once
    with pytest.raises(ValueError, match="qtype"):
        tl.ask(lone, "size", rng)


def test_tokenizer_and_answer_only_labels():
    tok = tl.WordTokenizer()
    exs = [tl.make_example("questions", 0, i, tl.QUESTION_TYPES[i % 4]) for i in range(8)]
    exs.append(tl.make_example("captions", 0, 0, "caption"))
    for ex in exs:
        assert tok.decode(tok.encode(ex.prompt)) == ex.prompt and tok.decode(tok.encode(ex.answer)) == ex.answer
    ids, labels = tl.encode_batch(tok, exs)
    for row, lab, ex in zip(ids, labels, exs):
        n_prompt = 1 + len(ex.prompt.split())
        n_answer = len(ex.answer.split()) + 1  # and EOS
        assert row[0] == 1 and (lab[:n_prompt] == IGNORE_INDEX).all()
        assert torch.equal(lab[n_prompt:n_prompt + n_answer], row[n_prompt:n_prompt + n_answer])
        assert lab[n_prompt + n_answer - 1] == 2 and (lab[n_prompt + n_answer:] == IGNORE_INDEX).all()
        assert tok.decode(row[n_prompt:]) == ex.answer
    with pytest.raises(KeyError):
        tok.encode("what colour is it")


def test_accuracy_table_is_exact_match_per_type():
    exs = [tl.make_example("eval", 0, i, q) for i, q in enumerate(("colour", "colour", "count", "caption", "where"))]
    preds = [exs[0].answer, "no", exs[2].answer + " ", exs[3].answer, exs[4].answer]
    table = tl.accuracy_table(exs, preds)  # overall: the evaluated types only (not captions, not "where")
    assert table == {"colour": 0.5, "count": 0.0, "caption": 1.0, "where": 1.0, "overall": 1 / 3}


# ----------------------------------------------------------------------------------------------------
# LLaVA.text_loss


def test_text_loss_is_next_token_cross_entropy_after_the_image_positions():
    torch.manual_seed(0)
    m = LLaVA(LLaVAConfig(vocab_size=12, vision="vit", img_size=16, patch_size=4, vision_dim=16, vision_depth=1,
                          vision_heads=2, dim=16, depth=1, heads=2, max_len=24)).eval()
    ids = torch.randint(3, 12, (3, 6))
    labels = ids.clone()
    labels[:, :2] = IGNORE_INDEX
    x = m.embed_tokens(ids) + m.embed_positions[:, 16:22]  # text at the positions it takes after 16 image tokens
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)
    logits = m.lm_head(m.decoder(x, mask=causal, is_causal=True))
    manual = F.cross_entropy(logits[:, 1:-1].reshape(-1, 12), ids[:, 2:].reshape(-1))
    torch.testing.assert_close(m.text_loss(ids, labels), manual)
    m.set_stage(2).zero_grad(set_to_none=True)
    m.text_loss(ids, labels).backward()
    with_grad = {n.split(".")[0] for n, p in m.named_parameters() if p.grad is not None}
    assert with_grad == {"embed_tokens", "embed_positions", "decoder", "lm_head"}
    only_first = torch.full_like(labels, IGNORE_INDEX)
    only_first[:, 0] = ids[:, 0]
    with pytest.raises(ValueError, match="no answer token after position 0"):
        m.text_loss(ids, only_first)
    with pytest.raises(ValueError, match=r"exceed max_len 24"):
        m.text_loss(torch.ones(1, 9, dtype=torch.long), torch.ones(1, 9, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------
# End to end


def test_tiny_end_to_end_run(tmp_path):
    result = tl.main(["--quick", "--no-progress", "--threads", "1", "--out", str(tmp_path)])
    for key in ("stage1", "stages12"):
        assert set(result[key]) == set(tl.QUESTION_TYPES) | {"caption", tl.LOCATE, "overall"}
        assert all(0.0 <= v <= 1.0 for v in result[key].values())
    assert {r["phase"] for r in result["timing"]} >= {"0a encoder", "0b decoder LM", "1 projector",
                                                     "2 projector+decoder", "total"}
    assert (tmp_path / "llava_samples.png").exists()
    log = (tmp_path / "llava_log.txt").read_text()
    assert "after stage 1 alone" in log and "after stages 1+2" in log and "timing total" in log
    model = load_checkpoint(tmp_path / "llava.pt")
    assert isinstance(model, LLaVA) and model.config.vision == "swin" and model.num_image_tokens == tl.GRID ** 2


def test_grid_position_code_tells_every_cell_apart_and_orders_rows_and_columns():
    code = tl.grid_position_code(tl.GRID, 32)
    assert code.shape == (tl.GRID * tl.GRID, 32) and code.abs().max() <= 1
    assert torch.cdist(code, code).add(torch.eye(len(code)) * 9).min() > 0.5  # all cells distinct
    rows, cols = code[:, :16], code[:, 16:]
    row_of, col_of = torch.arange(len(code)) // tl.GRID, torch.arange(len(code)) % tl.GRID
    for half, idx in ((rows, row_of), (cols, col_of)):  # one half depends on its own axis only
        for v in range(tl.GRID):
            assert torch.allclose(half[idx == v], half[idx == v][0].expand_as(half[idx == v]))
            assert v == 0 or (half[idx == v][0] - half[idx == v - 1][0]).norm() > 0.5
    # the lowest frequency is monotonic in the place along its axis: a linear read-out can compare places
    assert (rows[::tl.GRID, 7].diff() > 0).all() and (cols[:tl.GRID, 7].diff() > 0).all()
    with pytest.raises(ValueError, match="multiple of 4"):
        tl.grid_position_code(4, 30)
    args = tl.parse_args(["--quick", "--grid-code", "sincos", "--grid-scale", "1"])
    model = tl.build_model(args, tl.WordTokenizer())
    torch.testing.assert_close(model.embed_positions[0, :tl.GRID ** 2], tl.grid_position_code(tl.GRID, args.dim))


def test_grid_block_code_is_one_block_per_row_and_per_column():
    code = tl.grid_block_code(tl.GRID, 32, 3.0)
    assert code.shape == (tl.GRID * tl.GRID, 32) and set(code.unique().tolist()) == {0.0, 3.0}
    rows, cols = code[:, :16], code[:, 16:]
    row_of, col_of = torch.arange(len(code)) // tl.GRID, torch.arange(len(code)) % tl.GRID
    for half, idx in ((rows, row_of), (cols, col_of)):
        gram = half @ half.T  # the same row (column): 4 channels of 3 * 3; another: orthogonal
        torch.testing.assert_close(gram, (idx[:, None] == idx[None, :]).float() * 36)
    assert torch.cdist(code, code).add(torch.eye(len(code)) * 99).min() > 8  # all cells distinct
    with pytest.raises(ValueError, match="multiple of 8"):
        tl.grid_block_code(4, 36)
    args = tl.parse_args(["--quick"])  # the default code
    model = tl.build_model(args, tl.WordTokenizer())
    torch.testing.assert_close(model.embed_positions[0, :tl.GRID ** 2], tl.grid_block_code(tl.GRID, args.dim, 3.0))
