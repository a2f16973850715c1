"""The token-level circuit diagram and the edge composition figure (strace_lens/plot/
token_circuit.py, edge_composition.py): exactly the kept edges drawn, coloured by phase, the
drawing rule's cap, hover texts, readability at 30 layers x 50 tokens, static export."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from edge_handmade import handmade

import strace_lens.plot as sp
from strace_lens.analysis import edge_composition as composition_of
from strace_lens.edges import PAPER_GRID, EdgeGraph, edge_counts, edge_trace
from strace_lens.plot.style import CORE_COLOR, REFINEMENT_COLOR
from strace_lens.plot.token_circuit import SIDE
from strace_lens.tiny_model import tiny_model

FIRST = ["r5.mlp:2", "m5:2", "a5.h1:0->2", "r4.attn:2", "m3:1", "a0.h0:0->1", "r1.mlp:0",
         "a2.h1:1->2", "r0.attn:0", "m0:0", "a1.h0:1->1"]  # fmt: skip
GRID = (0.005, 0.02, 0.04, 0.075, 1.0)
COUNTS = [0, 2, 4, 8, 114]  # 6 blocks, 2 heads, 3 tokens: E = 114


@pytest.fixture(scope="module")
def byte_tiny():
    return tiny_model(device="cpu", dtype=torch.float64)


@pytest.fixture(scope="module")
def hand():
    return handmade(6, 2, [3], [FIRST], [COUNTS], GRID, top1=[[0, 0, 1, 1, 1]])


def drawn(fig, phase: str | None = None, kind: str | None = None) -> list[str]:
    """Edge names of the hoverable midpoints, per phase and kind."""
    return [
        name
        for t in fig.data
        if (t.meta or {}).get("role") == "hover"
        and (phase is None or t.meta["phase"] == phase)
        and (kind is None or t.meta["kind"] == kind)
        for name in t.customdata
    ]


def midpoints(fig) -> dict[str, tuple[float, float]]:
    return {
        n: (x, y)
        for t in fig.data
        if (t.meta or {}).get("role") == "hover"
        for n, x, y in zip(t.customdata, t.x, t.y)
    }


def test_draws_exactly_the_kept_edges_coloured_by_phase(hand):
    fig = sp.token_circuit(hand, size=3, core=0.02, tokens=["A", " b", "c\n"])
    assert sorted(drawn(fig)) == sorted(FIRST[:8]) == sorted(hand.edge_names(0, 3))
    # core: edges entering at s <= 0.02 (the first two); the rest is refinement
    assert sorted(drawn(fig, "core")) == ["m5:2", "r5.mlp:2"]
    assert sorted(drawn(fig, "refinement")) == sorted(FIRST[2:8])
    assert sorted(drawn(fig, kind="MLP")) == ["m3:1", "m5:2"]
    assert sorted(drawn(fig, kind="residual")) == ["r1.mlp:0", "r4.attn:2", "r5.mlp:2"]
    for t in fig.data:
        role = (t.meta or {}).get("role")
        if role == "edges":
            colour = CORE_COLOR if t.meta["phase"] == "core" else REFINEMENT_COLOR
            assert t.line.color == colour
            # one segment per edge: two points and a gap
            assert len(t.x) == 3 * len(drawn(fig, t.meta["phase"], t.meta["kind"]))
    meta = fig.layout.meta
    assert (meta["n_subgraph"], meta["n_drawn"], meta["n_core"]) == (8, 8, 2)
    assert meta["core_size"] == 0.02
    assert list(fig.layout.xaxis.ticktext) == ["A", "␣b", "c⏎"]


def test_edges_sit_where_they_act(hand):
    pos = midpoints(sp.token_circuit(hand, size=4, max_edges=11))
    assert pos["a0.h0:0->1"] == (0.5, 0.5)  # (pos 0, emb) -> (pos 1, after block 0 attention)
    assert pos["a5.h1:0->2"] == (1.0, 10.5)  # (0, graph layer 10) -> (2, 11)
    assert pos["m3:1"] == pytest.approx((1 + SIDE, 7.5))  # MLP right of its column
    assert pos["r1.mlp:0"] == pytest.approx((-SIDE, 3.5))  # residual left of it
    assert pos["r0.attn:0"] == pytest.approx((-SIDE, 0.5))
    out = next(t for t in sp.token_circuit(hand).data if (t.meta or {}).get("role") == "output")
    assert (out.x[0], out.y[0]) == (2, 12)


def test_hover_names_the_edge_its_entry_size_and_weight(hand):
    weights = torch.arange(114, dtype=torch.float64) / 1000
    fig = sp.token_circuit(hand, size=3, weights=weights)
    texts = {n: h for t in fig.data if (t.meta or {}).get("role") == "hover"
             for n, h in zip(t.customdata, t.hovertext)}  # fmt: skip
    graph = EdgeGraph(6, 2, 3)
    text = texts["a5.h1:0->2"]
    assert "<b>a5.h1:0->2</b>" in text
    assert "block 5 head 1: 0 (pos 0) → 2 (pos 2)" in text
    assert "enters at s = 0.04 (rank 3)" in text  # the third edge: in the 4-edge subgraph
    assert f"weight {graph.index('a5.h1:0->2') / 1000:.4g}" in text
    assert "enters at s = 0.02 (rank 1)" in texts["r5.mlp:2"]
    with pytest.raises(ValueError, match="one value per edge"):
        sp.token_circuit(hand, weights=torch.zeros(5))


def test_drawing_rule_caps_the_edges(hand):
    # default: the largest grid subgraph with at most max_edges edges
    fig = sp.token_circuit(hand, max_edges=5)
    assert fig.layout.meta["size_index"] == 2 and fig.layout.meta["n_drawn"] == 4
    assert "s = 0.04 (the largest with ≤ 5 edges): 4 of 114" in fig.layout.title.subtitle.text
    assert sorted(drawn(fig)) == sorted(FIRST[:4])
    # a larger subgraph asked for: its max_edges earliest-entering edges, and the title says
    fig = sp.token_circuit(hand, size=4, max_edges=10)
    assert sorted(drawn(fig)) == sorted(FIRST[:10])
    assert fig.layout.meta["n_subgraph"] == 114 and fig.layout.meta["n_drawn"] == 10
    assert "114 of 114 edges, the first 10 drawn (at most 10)" in fig.layout.title.subtitle.text
    # never more than max_edges, even when the smallest non-empty subgraph is larger
    assert len(drawn(sp.token_circuit(hand, max_edges=1))) == 1
    with pytest.raises(ValueError, match="max_edges"):
        sp.token_circuit(hand, max_edges=0)


def test_core_at_first_top1_agreement(hand):
    fig = sp.token_circuit(hand, size=3, core="top1")
    assert fig.layout.meta["core_size"] == 0.04  # top-1 agrees first at grid index 2
    assert sorted(drawn(fig, "core")) == sorted(FIRST[:4])
    assert "top-1 first agrees" in fig.layout.title.subtitle.text
    never = handmade(6, 2, [3], [FIRST], [COUNTS], GRID)  # top1 all 0
    fig = sp.token_circuit(never, size=3, core="top1")
    assert drawn(fig, "core") == [] and len(drawn(fig, "refinement")) == 8
    assert "no core" in fig.layout.title.subtitle.text
    with pytest.raises(ValueError, match="core must be"):
        sp.token_circuit(hand, core=2.0)


def test_bad_inputs_say_what_to_pass(hand, byte_tiny):
    with pytest.raises(ValueError, match="3 tokens but 2 token strings"):
        sp.token_circuit(hand, tokens=["a", "b"])
    with pytest.raises(IndexError, match="prompt must lie"):
        sp.token_circuit(hand, prompt=1)
    with pytest.raises(IndexError, match="grid index"):
        sp.token_circuit(hand, size=9)
    random = edge_trace(byte_tiny, ["ab"], method="random", sizes=[0.1, 1.0])
    with pytest.raises(ValueError, match="nested family"):
        sp.token_circuit(random)


def test_tokens_from_the_model_under_the_trace_convention(byte_tiny):
    r = edge_trace(byte_tiny, ["Hi you"])
    fig = sp.token_circuit(r, model=byte_tiny)
    labels = list(fig.layout.xaxis.ticktext)
    assert len(labels) == int(r.n_pos[0])
    assert "".join(labels[1:]).replace("␣", " ") == "Hi you"  # after the BOS


@pytest.fixture(scope="module")
def big():
    """30 blocks x 9 heads, 50 tokens (E = 337,578), a seeded random ranking."""
    graph = EdgeGraph(30, 9, 50)
    order = torch.randperm(graph.n_edges, generator=torch.Generator().manual_seed(0))
    counts = edge_counts(PAPER_GRID, graph.n_edges).tolist()
    return handmade(30, 9, [50], [order], [counts], PAPER_GRID)


def test_30_layers_50_tokens_stays_readable(big):
    tokens = [f" tok{i}" for i in range(50)]
    fig = sp.token_circuit(big, tokens=tokens)
    meta = fig.layout.meta
    assert meta["n_drawn"] <= 600 and meta["n_drawn"] == meta["n_subgraph"]
    assert meta["size"] == 1.4e-3  # 472 edges; 2e-3 would hold 675
    assert len(drawn(fig)) == meta["n_drawn"]
    m = fig.layout.margin
    font = fig.layout.xaxis.tickfont.size
    x_px = (fig.layout.width - m.l - m.r) / (fig.layout.xaxis.range[1] - fig.layout.xaxis.range[0])
    assert x_px >= 1.5 * font, "token labels (vertical) would collide"
    ticks = fig.layout.yaxis.tickvals
    y_px = (fig.layout.height - m.t - m.b) / (fig.layout.yaxis.range[1] - fig.layout.yaxis.range[0])
    body = fig.layout.template.layout.font.size
    assert min(np.diff(ticks)) * y_px >= 1.2 * body, "layer labels would collide"
    assert len(ticks) <= 32


def test_30_layers_50_tokens_exports_to_png_svg_pdf(big, tmp_path):
    fig = sp.token_circuit(big, tokens=[f" tok{i}" for i in range(50)])
    with sp.export_session():
        for suffix in ("png", "svg", "pdf"):
            path = sp.save(fig, tmp_path / f"circuit.{suffix}", scale=1)
            assert path.stat().st_size > 10_000, suffix
    assert (tmp_path / "circuit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"tok49" in (tmp_path / "circuit.svg").read_bytes()


def test_edge_composition_figure_draws_the_analysis_with_bands(hand):
    r = handmade(6, 2, [3], [FIRST], [COUNTS], GRID)
    fig = sp.edge_composition(r)
    table = composition_of(r).table()
    table = table[table["n"] > 0]
    q4 = next(t for t in fig.data if t.name.startswith("Q4"))
    assert list(q4.x) == pytest.approx(table["relative_size"].tolist())
    assert list(q4.y) == pytest.approx(table["q4_share"].tolist())
    resid = next(t for t in fig.data if t.name == "residual edges")
    assert list(resid.y) == pytest.approx(table["resid_share"].tolist())
    rects = sorted((s.x0, s.x1) for s in fig.layout.shapes if s.type == "rect")
    # one rectangle per band and panel
    assert rects == [(1e-4, 1e-2), (1e-4, 1e-2), (1e-2, 1.0), (1e-2, 1.0)]
    lines = [s for s in fig.layout.shapes if s.type == "line"]
    assert lines and all(s.x0 == 1e-3 for s in lines)
    assert fig.layout.xaxis.type == "log" and math.isclose(fig.layout.xaxis.range[0], -4)
    two = sp.edge_composition({"ablated": r, "kept": composition_of(r)})
    assert [a.text for a in two.layout.annotations][:2] == ["ablated", "kept"]


def test_edge_fidelity_draws_median_quartiles_and_top1_per_size():
    tv = [[0.9, 0.8, 0.5, 0.2, 0.0], [0.7, 0.6, 0.1, 0.1, 0.0], [1.0, 0.9, 0.9, 0.3, 0.0]]
    top1 = [[0, 0, 1, 1, 1], [0, 1, 1, 1, 1], [0, 0, 0, 1, 1]]
    three = handmade(6, 2, [3, 3, 3], [FIRST] * 3, [COUNTS] * 3, GRID, tv=tv, top1=top1)
    three.options.update(method="greedy", ablate_attention_edges=False)
    fig = sp.edge_fidelity(three)
    band, median, share = fig.data
    assert median.name == "greedy, attention edges kept"
    assert list(median.x) == list(GRID)
    # the median prompt at each size, by hand: 0.9, 0.8, 0.5, 0.2, 0
    assert np.allclose(median.y, [0.9, 0.8, 0.5, 0.2, 0.0])
    # numpy's linear quartiles of three values: q1 halfway between the two lowest
    assert np.allclose(np.asarray(band.y)[:5], [0.95, 0.85, 0.7, 0.25, 0.0])  # q3, left to right
    assert np.allclose(np.asarray(band.y)[5:], [0.8, 0.7, 0.3, 0.15, 0.0][::-1])  # q1, reversed
    assert np.allclose(share.y, [0, 100 / 3, 200 / 3, 100, 100])
    assert fig.layout.template.layout.font.family  # the project's named template is applied
    with pytest.raises(TypeError, match="EdgeTraceResult"):  # run-time checks name it too
        sp.edge_fidelity({"x": "nope"})


def test_edge_report_page_holds_fidelity_composition_and_circuit(hand, tmp_path):
    random = handmade(6, 2, [3], [FIRST], [COUNTS], GRID)
    random.nested = False  # independent draws: fidelity only (no entry order to draw)
    random.offsets = torch.tensor([0, *np.cumsum(COUNTS).tolist()])
    random.ids = torch.cat([torch.arange(c, dtype=torch.int32) for c in COUNTS])
    random.options["method"] = "random"
    figs = sp.edge_figures({"greedy": hand, "random": random})
    assert list(figs) == ["edge_fidelity", "edge_composition", "token_circuit"]
    assert [t.name for t in figs["edge_fidelity"].data if t.showlegend is not False] == [
        "greedy",
        "random",
    ]
    assert sorted(drawn(figs["token_circuit"])) == sorted(
        hand.edge_names(0, len(GRID) - 1)  # the whole graph here: 114 edges <= 600
    )
    page = sp.edge_report_html({"greedy": hand, "random": random}, tmp_path / "r.html", "T")
    text = page.read_text(encoding="utf-8")
    for div in ("fig-edge_fidelity", "fig-edge_composition", "fig-token_circuit"):
        assert f'id="{div}"' in text
    assert text.count("<tr>") == 3  # header + two results
    assert "114–114" in text  # edges per prompt
