"""Analyses on constructed TraceResults whose answers are known by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from strace_lens.graph import NodeGraph
from strace_lens.result import TraceResult


def make_result(
    sizes: list[int],
    masks: torch.Tensor,
    graph: NodeGraph | None = None,
    *,
    tv: torch.Tensor | None = None,
    nucleus: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    n_prompts: int | None = None,
    top_tokens: torch.Tensor | None = None,
    full_top_tokens: torch.Tensor | None = None,
    target_logprob: torch.Tensor | None = None,
    extra: dict[str, torch.Tensor] | None = None,
    candidates: torch.Tensor | None = None,
    options: dict | None = None,
) -> TraceResult:
    """A TraceResult built from given tensors (defaults fill what a test does not look at)."""
    graph = graph or NodeGraph(n_layers=4, n_heads=3)
    n_s = len(sizes)
    n_p = n_prompts or masks.shape[0]
    tv = tv if tv is not None else torch.zeros(n_p, n_s)
    nucleus = nucleus if nucleus is not None else torch.zeros(n_p, n_s)
    metrics = {"kl": tv.clone(), "tv": tv, "nucleus": nucleus}
    metrics.update(extra or {})
    return TraceResult(
        graph=graph,
        sizes=torch.tensor(sizes),
        masks=masks.bool(),
        metrics={k: v.float() for k, v in metrics.items()},
        entropy=(entropy if entropy is not None else torch.ones(n_p)).float(),
        prompts=[f"prompt {i}" for i in range(n_p)],
        top_tokens=top_tokens
        if top_tokens is not None
        else torch.zeros(n_p, n_s, 5, dtype=torch.long),
        full_top_tokens=full_top_tokens
        if full_top_tokens is not None
        else torch.zeros(n_p, 5, dtype=torch.long),
        candidates=candidates
        if candidates is not None
        else torch.ones(len(graph), dtype=torch.bool),
        options=options or {"per": "input", "method": "mask"},
        target_logprob=target_logprob,
    )


def nested_masks(graph: NodeGraph, orders: list[list[int]], sizes: list[int]) -> torch.Tensor:
    """Masks [R, S, N]: row r keeps the first sizes[j] nodes of orders[r]."""
    out = torch.zeros(len(orders), len(sizes), len(graph), dtype=torch.bool)
    for r, order in enumerate(orders):
        for j, s in enumerate(sizes):
            out[r, j, order[:s]] = True
    return out


# ----------------------------------------------------------------------------- phases
GRAPH = NodeGraph(n_layers=4, n_heads=3)  # 16 nodes: a{l}.h0..h2, m{l} for l < 4


def test_split_core_picks_smallest_size_reaching_the_level():
    sizes = [1, 2, 4, 8, 16]
    # row 0 enters nodes in index order (early layers first); row 1 from the last node back
    orders = [list(range(16)), list(range(15, -1, -1))]
    masks = nested_masks(GRAPH, orders, sizes)
    nucleus = torch.tensor([[0, 0, 1, 5, 99], [0, 10, 20, 50, 99]])
    result = make_result(sizes, masks, GRAPH, nucleus=nucleus)

    from strace_lens.analysis import split_core

    core_size, core_mask = split_core(result)
    assert core_size.tolist() == [4.0, 2.0]
    assert core_mask[0].nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert core_mask[1].nonzero().flatten().tolist() == [14, 15]
    assert core_mask.sum(1).tolist() == [4, 2]

    core_size, _ = split_core(result, core_nucleus=20)
    assert core_size.tolist() == [16.0, 4.0]


def test_split_core_unreached_is_nan_and_empty_and_unsorted_grid_is_fine():
    sizes = [8, 1, 4]  # unsorted on purpose
    orders = [list(range(16)), list(range(16))]
    masks = nested_masks(GRAPH, orders, sizes)
    nucleus = torch.tensor([[5, 0, 1], [0, 0, 0]])
    result = make_result(sizes, masks, GRAPH, nucleus=nucleus)
    from strace_lens.analysis import split_core

    core_size, core_mask = split_core(result)
    assert core_size[0].item() == 4.0
    assert math.isnan(core_size[1].item())
    assert not core_mask[1].any()


def test_split_core_per_dataset_uses_mean_nucleus_and_drops_always_kept_nodes():
    sizes = [2, 4, 8]
    masks = nested_masks(GRAPH, [list(range(16))], sizes)
    candidates = torch.ones(16, dtype=torch.bool)
    candidates[0] = False  # node 0 is always kept, outside the candidates
    masks[:, :, 0] = True
    nucleus = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.5, 1.0], [0.0, 1.0, 1.0]])
    result = make_result(
        sizes,
        masks,
        GRAPH,
        nucleus=nucleus,
        n_prompts=3,
        candidates=candidates,
        options={"per": "dataset", "method": "mask"},
    )
    from strace_lens.analysis import split_core

    core_size, core_mask = split_core(result)
    # mean nucleus per size: [1/3, 2.5/3, 1] -> only size 8 reaches 1
    assert core_size.tolist() == [8.0]
    assert core_mask.shape == (1, 16)
    assert not core_mask[0, 0]


def test_phases_core_is_early_mlp_and_refinement_late_attention():
    # row 0: the MLPs of layers 0 and 1 (nodes 3, 7) enter first, then the attention heads
    # of layers 2 and 3 (8, 9, 10, 12, 13, 14); core at size 2, refined (nucleus 90) at size 8
    sizes = [1, 2, 4, 8, 16]
    late_heads = [8, 9, 10, 12, 13, 14]
    rest = [i for i in range(16) if i not in [3, 7, *late_heads]]
    orders = [[3, 7, *late_heads, *rest], [3, 7, *late_heads, *rest]]
    masks = nested_masks(GRAPH, orders, sizes)
    nucleus = torch.tensor([[0, 1, 20, 90, 99], [0, 0, 0, 0, 0]])
    result = make_result(sizes, masks, GRAPH, nucleus=nucleus)
    from strace_lens.analysis import phases

    table = phases(result)
    core0 = table[(table["row"] == 0) & (table["phase"] == "core")].iloc[0]
    ref0 = table[(table["row"] == 0) & (table["phase"] == "refinement")].iloc[0]
    assert core0["n_nodes"] == 2 and core0["attn_share"] == 0.0
    assert core0["q1_share"] == 0.5 and core0["q2_share"] == 0.5  # layers 0 and 1
    assert core0["mean_depth"] == (0 + 1 / 3) / 2
    assert ref0["n_nodes"] == 6 and ref0["attn_share"] == 1.0
    assert ref0["q3_share"] == 0.5 and ref0["q4_share"] == 0.5
    assert ref0["end_size"] == 8 and bool(ref0["reached"])
    # row 1 never reproduces the top-1 token: reported, with no nodes, never dropped
    core1 = table[(table["row"] == 1) & (table["phase"] == "core")].iloc[0]
    assert not bool(core1["reached"]) and core1["n_nodes"] == 0 and np.isnan(core1["attn_share"])
    agg = table[(table["row"] == "all") & (table["phase"] == "core")].iloc[0]
    assert agg["n_rows"] == 1 and agg["attn_share"] == 0.0
    agg_ref = table[(table["row"] == "all") & (table["phase"] == "refinement")].iloc[0]
    assert agg_ref["n_rows"] == 1 and agg_ref["n_nodes"] == 6


def test_phases_empty_refinement_is_left_out_of_the_aggregate():
    sizes = [2, 4]
    masks = nested_masks(GRAPH, [list(range(16))] * 2, sizes)
    # row 0 reaches 90 % with its core already (empty refinement); row 1 refines 2 nodes
    nucleus = torch.tensor([[90, 99], [1, 90]])
    result = make_result(sizes, masks, GRAPH, nucleus=nucleus)
    from strace_lens.analysis import phases

    table = phases(result)
    ref = table[table["phase"] == "refinement"].set_index("row")
    assert ref.loc[0, "n_nodes"] == 0 and ref.loc[1, "n_nodes"] == 2
    assert ref.loc["all", "n_rows"] == 1 and ref.loc["all", "n_nodes"] == 2


def test_split_refinement_falls_back_to_largest_and_flags_it():
    sizes = [1, 2, 4]
    masks = nested_masks(GRAPH, [list(range(16))], sizes)
    result = make_result(sizes, masks, GRAPH, nucleus=torch.tensor([[1, 5, 10]]))
    from strace_lens.analysis import split_refinement

    refined_size, refinement, reached = split_refinement(result, refined_nucleus=90)
    assert refined_size.tolist() == [4.0] and reached.tolist() == [False]
    assert refinement[0].nonzero().flatten().tolist() == [1, 2, 3]


# ----------------------------------------------------------------------------- density
SIZES16 = [1, 2, 4, 8, 16]  # relative sizes 1/16 .. 1 on the 16-node GRAPH


def _curve_result(tv: torch.Tensor, **kw) -> TraceResult:
    masks = nested_masks(GRAPH, [list(range(16))] * tv.shape[0], SIZES16)
    return make_result(SIZES16, masks, GRAPH, tv=tv, **kw)


def test_density_of_known_curves():
    from strace_lens.analysis import density

    x = torch.log10(torch.tensor(SIZES16, dtype=torch.float64) / 16)
    span = math.log10(16)
    linear = (-x / span).float()  # TV falls linearly in log size from 1 to 0: AUC = span / 2
    flat = torch.full((5,), 0.3)  # constant TV: AUC = 0.3 * span
    # step: trapezoids of width log10(2) and mean heights 1, 0.5, 0, 0 -> AUC 1.5 log10(2)
    step = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0])
    result = _curve_result(torch.stack([linear, flat, step]))
    table = density(result)
    assert table["span"].iloc[0] == pytest.approx(span)
    expected_auc = [span / 2, 0.3 * span, 1.5 * math.log10(2)]
    assert table["auc"].tolist() == pytest.approx(expected_auc, rel=1e-6)
    assert table["density"].tolist() == pytest.approx([0.5, 0.3, 1.5 / 4], rel=1e-6)


def test_density_on_a_finer_grid_keeps_piecewise_linear_area_and_refuses_extrapolation():
    from strace_lens.analysis import density

    tv = torch.tensor([[0.9, 0.7, 0.2, 0.1, 0.0], [0.5, 0.5, 0.4, 0.1, 0.05]])
    result = _curve_result(tv)
    knots = np.log10(np.array(SIZES16) / 16)
    fine = np.unique(np.concatenate([knots, np.linspace(knots[0], 0, 37)]))
    assert density(result, log_grid=fine)["auc"].to_numpy() == pytest.approx(
        density(result)["auc"].to_numpy(), rel=1e-6
    )
    with pytest.raises(ValueError, match="traced range"):
        density(result, log_grid=np.linspace(-3, 0, 10))


def test_density_curve_averages_interpolated_curves():
    from strace_lens.analysis import density_curve

    tv = torch.tensor([[1.0, 0.75, 0.5, 0.25, 0.0], [0.0, 0.25, 0.5, 0.75, 1.0]])
    result = _curve_result(tv, entropy=torch.tensor([1.0, 2.0]))
    mid = (np.log10(1 / 16) + np.log10(2 / 16)) / 2  # halfway between the first two sizes
    curve = density_curve(result, log_grid=[np.log10(1 / 16), mid, 0.0, 0.5])
    assert curve["mean"].tolist()[:3] == pytest.approx([0.5, 0.5, 0.5])
    assert curve["q25"].iloc[1] == pytest.approx(0.125 + 0.25 * 0.75)  # between 0.125 and 0.875
    assert curve["n"].tolist() == [2, 2, 2, 0]  # 0.5 lies beyond the traced range
    assert np.isnan(curve["mean"].iloc[3])


def test_density_loss_comes_from_target_logprob():
    from strace_lens.analysis import density

    result = _curve_result(torch.zeros(2, 5), target_logprob=torch.tensor([-0.5, -3.0]))
    assert density(result)["loss"].tolist() == pytest.approx([0.5, 3.0])


# ----------------------------------------------------------------------------- recovery
def test_nucleus_recovery_sizes_and_unreached_prompts():
    from strace_lens.analysis import nucleus_recovery, recovery_sizes

    nucleus = torch.tensor(
        [
            [0, 1, 20, 90, 99],
            [1, 5, 10, 40, 90],
            [0, 0, 1, 10, 60],
            [0, 0, 0, 0, 0],
        ]
    )
    result = _curve_result(torch.zeros(4, 5), nucleus=nucleus)
    per = recovery_sizes(result, levels=[1, 90])
    level1 = per[per["level"] == 1]["size"].tolist()
    assert level1 == [2, 1, 4, math.inf]
    table = nucleus_recovery(result, levels=[1, 10, 90])
    row1 = table[table["level"] == 1].iloc[0]
    # relative sizes at level 1: 2/16, 1/16, 4/16, inf -> order stats (inverted CDF)
    assert row1["median"] == pytest.approx(2 / 16)
    assert row1["q25"] == pytest.approx(1 / 16) and row1["q75"] == pytest.approx(4 / 16)
    assert row1["n_unreached"] == 1 and row1["n_reached"] == 3
    row90 = table[table["level"] == 90].iloc[0]
    # level 90: 8/16, 16/16, inf, inf -> the median is censored: beyond the grid
    assert row90["q25"] == pytest.approx(0.5) and row90["median"] == pytest.approx(1.0)
    assert row90["q75"] == math.inf and row90["n_unreached"] == 2


# ----------------------------------------------------------------------------- composition
def test_composition_shares_per_size():
    from strace_lens.analysis import composition

    sizes = [2, 4]
    # row 0: a0.h0 (0), m0 (3), then a3.h0 (12), a3.h1 (13); row 1: m0, m1, m2, m3
    masks = nested_masks(GRAPH, [[0, 3, 12, 13], [3, 7, 11, 15]], sizes)
    result = make_result(sizes, masks, GRAPH)
    table = composition(result).set_index("size")
    assert table.loc[2, "attn_share"] == pytest.approx((0.5 + 0.0) / 2)
    assert table.loc[4, "attn_share"] == pytest.approx((0.75 + 0.0) / 2)
    assert table.loc[2, "mlp_share"] == pytest.approx(0.75)
    assert table.loc[2, "q1_share"] == pytest.approx((1.0 + 0.5) / 2)
    assert table.loc[4, "q4_share"] == pytest.approx((0.5 + 0.25) / 2)
    # entering at size 4: row 0 adds two layer-3 heads, row 1 adds m2, m3
    assert table.loc[4, "new_attn_share"] == pytest.approx(0.5)
    assert table.loc[4, "new_q4_share"] == pytest.approx((1.0 + 0.5) / 2)
    assert table["base_attn_share"].iloc[0] == pytest.approx(12 / 16)


# ----------------------------------------------------------------------------- usage
def test_usage_gini_of_planted_usage():
    from strace_lens.analysis import gini_by_size, lorenz, usage

    sizes = [1, 16]
    # four prompts, all choose node 5 first: at size 1 one node holds every use
    masks = nested_masks(GRAPH, [[5, *[i for i in range(16) if i != 5]]] * 4, sizes)
    result = make_result(sizes, masks, GRAPH)
    g = gini_by_size(result).set_index("size")
    assert g.loc[1, "gini"] == pytest.approx(15 / 16)
    assert g.loc[1, "top_node"] == GRAPH.names[5] and g.loc[1, "top_frequency"] == 1.0
    assert g.loc[16, "gini"] == pytest.approx(0.0)
    table = usage(result)
    assert table[(table["size"] == 1) & (table["node"] == "a1.h1")]["frequency"].item() == 1.0
    curve = lorenz(result)
    at1 = curve[curve["size"] == 1]
    assert at1["usage_share"].iloc[-2] == pytest.approx(0.0)  # the 15 unused nodes hold nothing
    assert at1["usage_share"].iloc[-1] == pytest.approx(1.0)


def test_gini_matches_hand_computed_values():
    from strace_lens.analysis import gini

    # values 1, 2, 3, 4: G = 2 * (1 + 4 + 9 + 16) / (4 * 10) - 5 / 4 = 0.25
    assert gini([4, 1, 3, 2]) == pytest.approx(0.25)
    assert gini([2, 2, 2]) == pytest.approx(0.0)
    # half the nodes used by every prompt, half never: G = 0.5
    assert gini([0, 0, 1, 1]) == pytest.approx(0.5)


# ----------------------------------------------------------------------------- uncertainty
def _density_planted(densities: np.ndarray, **kw) -> TraceResult:
    """Flat TV curves whose density equals the given values exactly."""
    tv = torch.tensor(densities, dtype=torch.float32)[:, None].expand(-1, 5).contiguous()
    return _curve_result(tv, **kw)


def test_uncertainty_finds_planted_correlation_and_not_a_missing_one():
    from strace_lens.analysis import uncertainty

    rng = np.random.default_rng(1)
    n = 60
    dens = rng.uniform(0.1, 0.9, n)
    entropy = 3.0 * dens + rng.normal(0, 0.3, n)  # strongly monotone with density
    loss = rng.uniform(0, 5, n)  # independent of density
    result = _density_planted(
        dens,
        entropy=torch.tensor(entropy, dtype=torch.float32),
        target_logprob=torch.tensor(-loss, dtype=torch.float32),
    )
    table = uncertainty(result, n_boot=500).set_index("against")
    assert table.loc["entropy", "rho"] > 0.8
    assert table.loc["entropy", "ci_low"] > 0.6 and table.loc["entropy", "p_value"] < 1e-6
    assert table.loc["loss", "ci_low"] < 0 < table.loc["loss", "ci_high"]
    assert table.loc["loss", "n"] == n


def test_spearman_ci_matches_scipy_and_brackets_rho():
    from scipy import stats

    from strace_lens.analysis import spearman_ci

    rng = np.random.default_rng(0)
    x = rng.normal(size=40)
    y = x + rng.normal(size=40)
    out = spearman_ci(x, y, n_boot=400, seed=3)
    ref = stats.spearmanr(x, y)
    assert out["rho"] == pytest.approx(ref.statistic)
    assert out["p_value"] == pytest.approx(ref.pvalue)
    assert out["ci_low"] < out["rho"] < out["ci_high"]
    assert spearman_ci(x, y, n_boot=400, seed=3) == out  # seeded: reproducible
    nan_out = spearman_ci([1.0, np.nan, 3.0, 4.0, 5.0], [1.0, 2.0, 3.0, 5.0, 4.0])
    assert nan_out["n"] == 4


def test_agreement_matches_prompts_by_text():
    from strace_lens.analysis import agreement

    dens = np.array([0.1, 0.4, 0.2, 0.8, 0.6])
    a = _density_planted(dens)
    b = _density_planted(dens[::-1].copy())
    b.prompts = list(reversed(a.prompts))  # same prompts, other order: densities agree exactly
    table = agreement(a, b, n_boot=200)
    assert table["rho"].item() == pytest.approx(1.0) and table["n"].item() == 5
    c = _density_planted(1 - dens)
    assert agreement(a, c, n_boot=200)["rho"].item() == pytest.approx(-1.0)
    d = _density_planted(dens)
    d.prompts = [f"other {i}" for i in range(5)]
    with pytest.raises(ValueError, match="share 0 prompt"):
        agreement(a, d)


# ----------------------------------------------------------------------------- unigram
def test_frequency_ranks_ties_and_unseen():
    from strace_lens.analysis import frequency_ranks

    ranks = frequency_ranks(torch.tensor([5, 0, 9, 5, 1, 0]))
    # 9 -> 1; the two 5s share ranks 2 and 3 -> 2.5; 1 -> 4; unseen -> n_seen + 1 = 5
    assert ranks.tolist() == [2.5, 5.0, 1.0, 2.5, 4.0, 5.0]


def test_token_counts_from_token_tensor_and_text_needs_tokenizer(tiny):
    from strace_lens.analysis import token_counts

    counts = token_counts(tiny, torch.tensor([[1, 2, 2], [2, 49, 1]]))
    assert counts.shape == (50,) and counts[2] == 3 and counts[1] == 2 and counts[49] == 1
    assert int(counts.sum()) == 6
    with pytest.raises(ValueError, match="tokenizer"):
        token_counts(tiny, ["some text"])


def test_unigram_small_subgraphs_favouring_frequent_tokens():
    from strace_lens.analysis import unigram

    counts = torch.zeros(20, dtype=torch.long)
    counts[:10] = torch.arange(100, 0, -10)  # token t < 10 has rank t + 1; others unseen (11)
    full = torch.tensor([[9, 8, 7, 6, 5], [4, 3, 2, 1, 0]])
    small = torch.tensor([[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]])  # the most frequent tokens
    top = torch.stack([small, full], 1)  # sizes 1 (small) and 16 (= full)
    sizes = [1, 16]
    masks = nested_masks(GRAPH, [list(range(16))] * 2, sizes)
    result = make_result(sizes, masks, GRAPH, top_tokens=top, full_top_tokens=full)
    table = unigram(result, counts, n_boot=200).set_index(["size", "k"])
    assert table.loc[(1, 1), "mean_rank"] == 1.0
    assert table.loc[(1, 1), "full_mean_rank"] == pytest.approx((10 + 5) / 2)
    expected = np.mean([np.log10(1) - np.log10(10), np.log10(1) - np.log10(5)])
    assert table.loc[(1, 1), "diff_log10_rank"] == pytest.approx(expected)
    assert table.loc[(1, 5), "mean_rank"] == pytest.approx(3.0)
    assert table.loc[(16, 1), "diff_log10_rank"] == pytest.approx(0.0)
    assert table.loc[(16, 5), "frac_same_top"] == 1.0 and table.loc[(1, 1), "frac_same_top"] == 0.0


# ----------------------------------------------------------------------------- baselines
def test_baselines_curves_and_gap():
    from strace_lens.analysis import baseline_gap, baselines

    tv = torch.tensor([[0.5, 0.4, 0.2, 0.1, 0.0], [0.6, 0.3, 0.2, 0.1, 0.0]])
    trace_r = _curve_result(tv, extra={"inv_tv": 1 - tv})
    random_r = _curve_result(torch.clamp(tv + 0.2, max=1.0))
    random_r.options = {"method": "random", "per": "input"}
    curves = baselines(trace_r, random_r)
    assert set(curves["curve"]) == {"trace", "inverse", "random"}
    first = curves[curves["log10_relative_size"] == curves["log10_relative_size"].min()]
    assert first.set_index("curve")["mean"].to_dict() == pytest.approx(
        {"trace": 0.55, "inverse": 0.45, "random": 0.75}
    )
    gap = baseline_gap(trace_r, random_r, n_boot=200)
    assert gap["gap"].item() == pytest.approx(0.2, abs=1e-6)
    assert gap["frac_trace_better"].item() == 1.0
    other = _curve_result(tv[:1])
    with pytest.raises(ValueError, match="other prompts"):
        baseline_gap(trace_r, other)
