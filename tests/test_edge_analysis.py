"""Edge analyses in the paper's units (strace_lens/analysis/edge_*.py): composition by
target-block quartile and kind, the phase bands, density, and the component projection,
against hand counts on hand-made results and brute force on a traced tiny model."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest
import torch
from edge_handmade import handmade

from strace_lens.analysis import (
    CONSTRUCTION_BAND,
    MINIMAL_CORE_SIZE,
    REFINEMENT_BAND,
    band_summary,
    edge_composition,
    edge_density,
    edge_projection,
    projection_bands,
)
from strace_lens.analysis.edge_bands import band_average
from strace_lens.analysis.edge_composition import CATEGORIES, block_quartiles, edge_shares
from strace_lens.edges import edge_trace
from strace_lens.tiny_model import tiny_model

# 6 blocks, 2 heads, 3 tokens: E = 5 * (2 * 6 + 9) + (2 * 3 + 3) = 114 edges. Quartiles of
# the 6 blocks (array_split): {0, 1}, {2, 3}, {4}, {5}.
FIRST = [
    "r5.mlp:2",  # q4 resid
    "m5:2",  # q4 mlp
    "a5.h1:0->2",  # q4 attn
    "r4.attn:2",  # q3 resid
    "m3:1",  # q2 mlp
    "a0.h0:0->1",  # q1 attn
    "r1.mlp:0",  # q1 resid
    "a2.h1:1->2",  # q2 attn
]
GRID = (0.005, 0.02, 0.04, 0.075, 1.0)
COUNTS = [0, 2, 4, 8, 114]  # int(s * 114)
TV = [1.0, 0.9, 0.8, 0.5, 0.0]


@pytest.fixture(scope="module")
def hand():
    return handmade(6, 2, [3], [FIRST], [COUNTS], GRID, tv=[TV])


def test_block_quartiles_split_like_the_released_code():
    assert block_quartiles(30).tolist() == [0] * 8 + [1] * 8 + [2] * 7 + [3] * 7
    assert block_quartiles(18).tolist() == [0] * 5 + [1] * 5 + [2] * 4 + [3] * 4
    # not the node analyses' floor(4 l / L), which gives {0, 1}, {2}, {3, 4}, {5} for 6 blocks
    assert block_quartiles(6).tolist() == [0, 0, 1, 1, 2, 3]


def test_shares_equal_a_hand_count(hand):
    assert hand.n_edges(0) == 114
    relative, shares = edge_shares(hand)
    assert relative[0].tolist() == pytest.approx([c / 114 for c in COUNTS])
    assert np.isnan(shares[0, 0]).all()  # no edge: no share
    #            q1     q2     q3     q4     attn   mlp    resid
    expected = [
        [0, 0, 0, 1, 0, 1 / 2, 1 / 2],
        [0, 0, 1 / 4, 3 / 4, 1 / 4, 1 / 4, 2 / 4],
        [2 / 8, 2 / 8, 1 / 8, 3 / 8, 3 / 8, 2 / 8, 3 / 8],
        # every edge: blocks 0-4 hold 12 attention, 3 MLP and 6 residual edges each, block 5
        # (last position only) 6, 1 and 2
        [42 / 114, 42 / 114, 21 / 114, 9 / 114, 66 / 114, 16 / 114, 32 / 114],
    ]
    assert shares[0, 1:] == pytest.approx(np.array(expected))
    assert shares[0, 1:, :4].sum(-1) == pytest.approx(np.ones(4))
    assert shares[0, 1:, 4:].sum(-1) == pytest.approx(np.ones(4))


def test_interpolation_is_exact_at_traced_sizes_and_linear_between(hand):
    x2, x4 = math.log10(2 / 114), math.log10(4 / 114)
    mid = (x2 + x4) / 2  # the geometric mean of the two sizes
    grid = np.array([math.log10(1 / 114), x2, mid, x4, 0.0])
    _, shares = edge_shares(hand)
    comp = edge_composition(hand, log_grid=grid)
    at = comp.per_prompt[0]
    assert np.isnan(at[0]).all()  # below the smallest non-empty subgraph: never extrapolated
    assert at[1] == pytest.approx(shares[0, 1])
    assert at[3] == pytest.approx(shares[0, 2])
    assert at[4] == pytest.approx(shares[0, 4])
    assert at[2] == pytest.approx((shares[0, 1] + shares[0, 2]) / 2)  # halfway in log10 s
    linear = edge_composition(hand, log_grid=grid, along="s").per_prompt[0]
    w = (math.sqrt(8) - 2) / (4 - 2)  # the same point, linear in s
    assert linear[2] == pytest.approx((1 - w) * shares[0, 1] + w * shares[0, 2])
    assert linear[1] == pytest.approx(shares[0, 1])
    table = comp.table()
    assert table["n"].tolist() == [0, 1, 1, 1, 1]
    assert table.loc[2, "q4_share"] == pytest.approx((1 + 3 / 4) / 2)


def test_mean_over_prompts_counts_only_prompts_covering_a_point():
    # prompt 1: 2 tokens, E = 5 * (2 * 3 + 6) + (2 * 2 + 3) = 67, first edge at s = 1 / 67
    r = handmade(
        6, 2, [3, 2], [FIRST, ["m5:1", "a4.h0:0->1"]],
        [COUNTS, [0, 1, 2, 5, 67]], GRID,
    )  # fmt: skip
    assert r.n_edges(1) == 67
    grid = np.log10([1 / 67, 2 / 114, 0.5, 1.0])
    comp = edge_composition(r, log_grid=grid)
    _, shares = edge_shares(r)
    assert comp.n.tolist() == [1, 2, 2, 2]
    assert comp.mean[0] == pytest.approx(shares[1, 1])  # only prompt 1 reaches 1/67
    assert comp.mean[3] == pytest.approx((shares[0, 4] + shares[1, 4]) / 2)
    assert comp.quartile_names()[0] == "Q1 (blocks 0–1)"
    assert comp.quartile_names()[2] == "Q3 (block 4)"


def test_band_average_is_the_trapezoid_over_the_band():
    grid = np.array([-4.0, -3.0, -2.0, -1.0, 0.0])
    a, b, c, d, e = 0.9, 0.7, 0.4, 0.2, 0.1
    curves = np.array([[a, b, c, d, e], [1.0, 1.0, 1.0, 1.0, 1.0]])[:, :, None]
    construction = band_average(grid, curves, CONSTRUCTION_BAND)
    assert construction[0, 0] == pytest.approx(((a + b) / 2 + (b + c) / 2) / 2)
    assert construction[1, 0] == pytest.approx(1.0)
    refinement = band_average(grid, curves, REFINEMENT_BAND)
    assert refinement[0, 0] == pytest.approx(((c + d) / 2 + (d + e) / 2) / 2)
    # a band edge between grid points: the curve's value there, linear in log10 s
    half = band_average(grid, curves, (10**-3.5, 1e-2))
    y_edge = (a + b) / 2
    assert half[0, 0] == pytest.approx((0.5 * (y_edge + b) / 2 + (b + c) / 2) / 1.5)
    # a prompt not covering the whole band has no value for it
    gap = curves.copy()
    gap[1, 0, 0] = np.nan
    assert np.isnan(band_average(grid, gap, CONSTRUCTION_BAND)[1, 0])
    table = band_summary(grid, gap, ["x"])
    row = table[(table.band == "construction")].iloc[0]
    assert row["n"] == 1 and row["mean"] == pytest.approx(construction[0, 0])
    core = table[table.band == "minimal_core"].iloc[0]
    assert core["lo"] == MINIMAL_CORE_SIZE and core["mean"] == pytest.approx((b + 1.0) / 2)
    with pytest.raises(ValueError, match="leaves the grid"):
        band_average(grid[2:], curves[:, 2:], CONSTRUCTION_BAND)


def test_composition_bands_on_the_hand_result(hand):
    comp = edge_composition(hand)
    bands = comp.bands().set_index(["band", "quantity"])
    # the smallest subgraph (2/114 > 1e-2) starts inside the refinement band: no value
    assert 2 / 114 > 1e-2 and bands.loc[("refinement", "q1_share"), "n"] == 0
    grid = np.log10([0.02, 0.04, 0.1, 1.0])
    local = band_summary(
        grid, edge_composition(hand, log_grid=grid).per_prompt, list(CATEGORIES),
        bands={"late": (0.04, 1.0)}, core_size=0.04,
    ).set_index(["band", "quantity"])  # fmt: skip
    _, shares = edge_shares(hand)
    # q4 share: 3/4 at s = 4/114, 3/8 at 8/114, 9/114 at 1; on this grid, linear in log10 s
    xs = np.log10([4 / 114, 8 / 114, 1.0])
    q4 = np.interp(np.log10([0.04, 0.1, 1.0]), xs, shares[0, [2, 3, 4], 3])
    x = np.log10([0.04, 0.1, 1.0])
    expected = np.trapezoid(q4, x) / (x[-1] - x[0])
    assert local.loc[("late", "q4"), "mean"] == pytest.approx(expected)
    assert local.loc[("minimal_core", "q4"), "mean"] == pytest.approx(q4[0])


def test_density_equals_the_hand_trapezoid(hand):
    table = edge_density(hand)
    l2 = math.log10(2)
    auc = l2 * (0.9 + 0.8) / 2 + l2 * (0.8 + 0.5) / 2 + math.log10(114 / 8) * (0.5 + 0.0) / 2
    span = math.log10(114 / 2)  # the empty subgraph (s = 0.005 -> 0 edges) is left out
    row = table.iloc[0]
    assert row["auc"] == pytest.approx(auc)
    assert row["span"] == pytest.approx(span)
    assert row["density"] == pytest.approx(auc / span)
    assert row["smallest_size"] == pytest.approx(2 / 114)
    assert row["n_edges"] == 114
    on_grid = edge_density(hand, log_grid=np.array([math.log10(8 / 114), 0.0])).iloc[0]
    assert on_grid["auc"] == pytest.approx(math.log10(114 / 8) * 0.25)
    assert on_grid["density"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="never extrapolates"):
        edge_density(hand, log_grid=np.array([-3.0, 0.0]))
    with pytest.raises(KeyError, match="no 'loss' metric"):
        edge_density(hand, metric="loss")


def test_projection_counts_components_and_last_position_by_hand(hand):
    table = edge_projection(hand)
    row = table[table["size"] == 0.075].iloc[0]
    assert row["n_edges"] == 8
    # heads a5.h1, a0.h0, a2.h1; MLPs m5, m3
    assert (row["heads"], row["mlps"], row["components"]) == (3, 2, 5)
    assert row["component_share"] == pytest.approx(5 / (6 * 3))
    assert (row["head_positions"], row["mlp_positions"]) == (3, 2)
    # targets at the last position (2): r5.mlp:2, m5:2, a5.h1:0->2, r4.attn:2, a2.h1:1->2
    assert row["last_position_share"] == pytest.approx(5 / 8)
    empty = table[table["size"] == 0.005].iloc[0]
    assert empty["n_edges"] == 0 and np.isnan(empty["last_position_share"])
    full = table[table["size"] == 1.0].iloc[0]
    assert (full["heads"], full["mlps"]) == (12, 6)
    # every edge: 3 positions in blocks 0-4 (21 edges each, 1 + 2 + 3 attention per head into
    # position 2 -> 3 * 2 + 3 = 9 into position 2), and block 5's 9
    assert full["last_position_share"] == pytest.approx((5 * 9 + 9) / 114)
    bands = projection_bands(hand, log_grid=np.log10([0.04, 0.1, 1.0]), core_size=0.04)
    assert set(bands["quantity"]) >= {"components", "last_position_share"}
    core = bands[(bands.band == "minimal_core") & (bands.quantity == "components")].iloc[0]
    # 2 components at s = 4/114, 5 at 8/114; 0.04 lies log10(1.14) / log10(2) of the way
    w = math.log10(0.04 * 114 / 4) / math.log10(2)
    assert core["mean"] == pytest.approx(2 + 3 * w)


# -- a traced tiny model against brute force over edge names ---------------------------------
_NAME = re.compile(r"^(?:a(\d+)\.h\d+:\d+->\d+|r(\d+)\.(?:attn|mlp):\d+|m(\d+):\d+)$")


def _brute_shares(names: list[str], n_layers: int) -> np.ndarray:
    """Shares by parsing edge names: quartile of the block in the name (the first L mod 4
    quartiles one block longer), kind from the prefix."""
    sizes = [n_layers // 4 + (q < n_layers % 4) for q in range(4)]
    bounds = np.cumsum(sizes)
    out = np.zeros(7)
    for name in names:
        m = _NAME.match(name)
        assert m, name
        block = int(next(g for g in m.groups() if g is not None))
        out[int(np.searchsorted(bounds, block, side="right"))] += 1
        out[{"a": 4, "m": 5, "r": 6}[name[0]]] += 1
    return out / len(names)


@pytest.fixture(scope="module")
def traced():
    model = tiny_model(device="cpu", dtype=torch.float64)
    return edge_trace(model, ["The cat sat on the mat and", "Paris is the capital of"])


def test_traced_tiny_composition_and_bands_match_brute_force(traced):
    r = traced
    relative, shares = edge_shares(r)
    for p in range(r.n_prompts):
        for i in range(len(r.grid)):
            names = r.edge_names(p, i)
            if names:
                assert shares[p, i] == pytest.approx(_brute_shares(names, r.n_layers)), (p, i)
    # the refinement band by hand: brute-force shares, linear in log10 s, on the default grid
    comp = edge_composition(r)
    bands = comp.bands().set_index(["band", "quantity"])
    grid = np.linspace(-5, 0, 151)
    x = grid[grid >= -2 - 1e-9]
    per_prompt = []
    for p in range(r.n_prompts):
        keep = r.counts[p] > 0
        xs = np.log10(relative[p][keep.numpy()])
        sizes = torch.nonzero(keep).flatten().tolist()
        ys = [_brute_shares(r.edge_names(p, i), r.n_layers)[0] for i in sizes]
        xs, first = np.unique(xs, return_index=True)
        q1 = np.interp(x, xs, np.asarray(ys)[first])
        per_prompt.append(np.trapezoid(q1, x) / 2.0)
    assert bands.loc[("refinement", "q1_share"), "mean"] == pytest.approx(np.mean(per_prompt))
    assert bands.loc[("refinement", "q1_share"), "n"] == 2
    table = comp.table()
    assert isinstance(table, pd.DataFrame)
    covered = table[table["n"] > 0]
    for group in (["q1", "q2", "q3", "q4"], ["attn", "mlp", "resid"]):
        total = covered[[f"{c}_share" for c in group]].sum(1).to_numpy()
        assert total == pytest.approx(np.ones(len(covered)))


def test_traced_tiny_density_and_projection(traced):
    r = traced
    table = edge_density(r)
    for p in range(r.n_prompts):
        keep = (r.counts[p] > 0).numpy()
        x = np.log10(r.relative_sizes()[p].numpy()[keep])
        y = r.metrics["tv"][p].double().numpy()[keep]
        assert table.loc[p, "auc"] == pytest.approx(np.trapezoid(y, x))
        assert 0 <= table.loc[p, "density"] <= 1
    proj = edge_projection(r)
    for p, i in [(0, 20), (1, 25)]:
        row = proj[(proj.prompt == p) & (proj["size"] == r.grid[i])].iloc[0]
        names = r.edge_names(p, i)
        heads = {n.split(":")[0] for n in names if n.startswith("a")}
        mlps = {n.split(":")[0] for n in names if n.startswith("m")}
        assert (row["heads"], row["mlps"]) == (len(heads), len(mlps))
        last = int(r.n_pos[p]) - 1
        into_last = [n for n in names if int(n.rsplit(":", 1)[1].split("->")[-1]) == last]
        assert row["last_position_share"] == pytest.approx(len(into_last) / len(names))
