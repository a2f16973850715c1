"""trace(): exact-size subgraphs, options respected, reproducible, and the exhaustive optimum."""

from __future__ import annotations

import itertools

import pytest
import torch

import strace_lens as sl
from strace_lens.trace import default_sizes, resolve_sizes

METHODS = ["mask", "random", "greedy", "attribution", "forward", "exhaustive"]


@pytest.fixture
def toks():
    return torch.randint(0, 50, (3, 8), generator=torch.Generator().manual_seed(1))


def _hard_kl(model, toks, node_mask, ablation):
    """KL of one hard node mask on every prompt, computed independently of the search code."""
    with torch.no_grad():
        full = torch.log_softmax(model(toks)[:, -1].float(), -1)
        sub = sl.run_with_mask(model, toks, node_mask.float()[None].expand(len(toks), -1), ablation)
    return sl.kl_divergence(full, sub)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("per", ["input", "dataset"])
def test_every_mask_has_exactly_s_nodes_and_full_size_is_exact(tiny, toks, method, per):
    cands = None if method != "exhaustive" else list(range(9))
    n = 15 if cands is None else 9
    sizes = [1, 2, 5, n] if method != "forward" else [1, 2, 5]
    res = (
        sl.trace(
            tiny,
            toks,
            sizes=sizes,
            per=per,
            method=method,
            candidates=cands,
            progress=False,
            steps=4,
        )
        if method == "mask"
        else sl.trace(
            tiny, toks, sizes=sizes, per=per, method=method, candidates=cands, progress=False
        )
    )
    assert res.masks.shape == (3 if per == "input" else 1, len(sizes), 15)
    cand = res.candidates
    counts = res.masks[:, :, cand].sum(-1)
    assert torch.equal(counts, torch.tensor(sizes).expand_as(counts))
    assert bool(res.masks[:, :, ~cand].all())  # non-candidates always kept
    if sizes[-1] == n:
        assert torch.allclose(res.metrics["kl"][:, -1], torch.zeros(3), atol=1e-6)
        assert bool((res.metrics["nucleus"][:, -1] == 99).all())
    assert res.metrics["kl"].shape == (3, len(sizes))
    assert bool((res.metrics["kl"] >= 0).all())


@pytest.mark.slow
def test_metrics_are_those_of_the_hard_masks(tiny, toks):
    res = sl.trace(tiny, toks, sizes=[2, 6], ablation="zero", progress=False, steps=3)
    for p in range(3):
        for j in range(2):
            kl = _hard_kl(tiny, toks[p : p + 1], res.masks[p, j], sl.ZeroAblation())
            assert float(res.metrics["kl"][p, j]) == pytest.approx(float(kl[0]), rel=1e-4, abs=1e-7)
            inverse = ~res.masks[p, j]
            kl_inv = _hard_kl(tiny, toks[p : p + 1], inverse, sl.ZeroAblation())
            assert float(res.metrics["inv_kl"][p, j]) == pytest.approx(
                float(kl_inv[0]), rel=1e-4, abs=1e-7
            )


@pytest.mark.parametrize(("per", "nested"), [("input", False), ("dataset", False), ("input", True)])
def test_mask_search_on_a_float64_model(tiny64, toks, per, nested):
    """The search's KL bookkeeping (the per-size fine-tuning's best straight-through mask, the
    local searches' base KL) follows the model's dtype: float64 here (once a dtype clash)."""
    sizes = [2, 5, 9]
    res = sl.trace(tiny64, toks, sizes=sizes, per=per, method="mask", nested=nested,
                   ablation="zero", progress=False, steps=4)  # fmt: skip
    n_groups = 3 if per == "input" else 1
    assert res.masks.shape == (n_groups, 3, 15)
    assert torch.equal(res.masks.sum(-1), torch.tensor(sizes).expand(n_groups, 3))
    for p in range(3):
        for j in range(3):
            mask = res.masks[p if per == "input" else 0, j]
            kl = _hard_kl(tiny64, toks[p : p + 1], mask, sl.ZeroAblation())
            assert float(res.metrics["kl"][p, j]) == pytest.approx(float(kl[0]), rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("per", ["input", "dataset"])
@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_exhaustive_matches_brute_force(tiny, toks, per, ablation):
    cands = ["a0.h1", "m0", "a1.h2", "a2.h0", "m2"]
    res = sl.trace(
        tiny,
        toks,
        sizes=[1, 2, 3, 4],
        ablation=ablation,
        per=per,
        method="exhaustive",
        candidates=cands,
        progress=False,
    )
    graph = sl.NodeGraph.from_model(tiny)
    abl = (
        sl.ZeroAblation()
        if ablation == "zero"
        else sl.MeanAblation.from_prompts(tiny, toks, progress=False)
    )
    idx = graph.indices(cands)
    for j, s in enumerate([1, 2, 3, 4]):
        best = None
        for combo in itertools.combinations(idx, s):
            mask = torch.ones(len(graph), dtype=torch.bool)
            mask[idx] = False
            mask[list(combo)] = True
            kl = _hard_kl(tiny, toks, mask, abl)
            score = kl if per == "input" else kl.mean()[None]
            best = score if best is None else torch.minimum(best, score)
        got = res.metrics["kl"][:, j] if per == "input" else res.metrics["kl"][:, j].mean()[None]
        assert torch.allclose(got, best, rtol=1e-4, atol=1e-7)


def test_keep_and_candidates_are_respected(tiny, toks):
    res = sl.trace(tiny, toks, sizes=[1, 3], keep=["m0", "a2.h3"], progress=False, steps=3)
    graph = res.graph
    assert bool(res.masks[:, :, graph.index("m0")].all())
    assert bool(res.masks[:, :, graph.index("a2.h3")].all())
    assert res.n_candidates == 13
    assert torch.equal(res.masks[:, :, res.candidates].sum(-1), torch.tensor([1, 3]).expand(3, 2))
    res2 = sl.trace(
        tiny, toks, sizes=[2], candidates=["a0.h0", "a1.h1", "m1"], method="greedy", progress=False
    )
    chosen = res2.masks[:, 0]
    outside = ~res2.candidates
    assert bool(chosen[:, outside].all())
    assert torch.equal(chosen[:, res2.candidates].sum(-1), torch.tensor([2, 2, 2]))


@pytest.mark.slow
def test_same_seed_same_result_and_different_seed_differs(tiny, toks):
    a = sl.trace(tiny, toks, sizes=[2, 4], progress=False, steps=4, seed=3)
    b = sl.trace(tiny, toks, sizes=[2, 4], progress=False, steps=4, seed=3)
    assert torch.equal(a.masks, b.masks)
    for k in a.metrics:
        assert torch.equal(a.metrics[k], b.metrics[k])
    assert a.equals(b)  # whatever the wall times
    r1 = sl.trace(tiny, toks, sizes=[4], method="random", progress=False, seed=0)
    r2 = sl.trace(tiny, toks, sizes=[4], method="random", progress=False, seed=1)
    assert not torch.equal(r1.masks, r2.masks)


def test_nested_masks_are_nested(tiny, toks):
    res = sl.trace(tiny, toks, sizes=[1, 3, 7, 12], nested=True, progress=False, steps=4)
    assert res.is_nested
    entry = res.entry_sizes()
    # a node's entry size is the smallest size whose subgraph holds it
    for p in range(3):
        for n in range(15):
            held = [int(s) for j, s in enumerate(res.sizes) if res.masks[p, j, n]]
            expected = min(held) if held else float("nan")
            got = float(entry[p, n])
            assert (got == expected) or (not held and got != got)


@pytest.mark.slow
def test_learned_masks_beat_random_on_average(tiny, toks):
    learned = sl.trace(tiny, toks, sizes=[2, 4, 8], progress=False)
    rand = sl.trace(tiny, toks, sizes=[2, 4, 8], method="random", progress=False)
    assert float(learned.metrics["kl"].mean()) < float(rand.metrics["kl"].mean())


def test_random_reports_spread_over_draws(tiny, toks):
    res = sl.trace(tiny, toks, sizes=[3], method="random", draws=4, progress=False)
    assert "kl_std" in res.metrics and bool((res.metrics["kl_std"] > 0).any())


def test_save_load_round_trip(tiny, toks, tmp_path):
    res = sl.trace(tiny, toks, sizes=[1, 4], progress=False, steps=3)
    res.save(tmp_path / "r")
    back = sl.TraceResult.load(tmp_path / "r")
    assert back.equals(res)
    frame = back.to_frame()
    assert len(frame) == 3 * 2 and {"kl", "tv", "nucleus", "inv_kl", "entropy"} <= set(
        frame.columns
    )


def test_relative_sizes_and_default_grid(tiny, toks):
    assert resolve_sizes([0.1, 0.5, 1.0], 15).tolist() == [2, 8, 15]
    grid = default_sizes(300)
    assert grid[0] == 1 and grid[-1] == 300 and 10 <= len(grid) <= 12
    assert torch.equal(default_sizes(10), torch.arange(1, 11))
    small = default_sizes(15)
    assert small[0] == 1 and small[-1] == 15 and bool((small.diff() > 0).all())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sizes": [0, 3]}, "outside \\[1, 15\\]"),
        ({"sizes": [16]}, "outside \\[1, 15\\]"),
        ({"sizes": [1.5]}, "outside \\(0, 1\\]"),
        ({"sizes": [2, 2]}, "repeat"),
        ({"candidates": []}, "empty"),
        ({"keep": ["m0"], "candidates": ["m0", "m1"]}, "both in `keep`"),
        ({"candidates": ["m0", "m1"], "sizes": [3]}, "outside \\[1, 2\\]"),
        ({"method": "beam"}, "Unknown method"),
        ({"per": "batch"}, "Unknown per"),
        ({"ablation": "resample"}, "Unknown ablation"),
        ({"method": "exhaustive", "sizes": [7]}, "above the limit"),
        ({"method": "mask", "stepz": 3}, "Unknown option"),
    ],
)
def test_clear_errors(tiny, toks, kwargs, message):
    if kwargs.get("method") == "exhaustive":
        kwargs["max_subsets"] = 100
    with pytest.raises((ValueError, TypeError), match=message):
        sl.trace(tiny, toks, progress=False, **kwargs)


def test_a_size_off_the_grid_gives_the_nearest_traced_subgraph_and_says_so(tiny, tiny_tokens):
    result = sl.trace(tiny, tiny_tokens[:1], sizes=[1, 3, 6, 15], method="greedy", inverse=False)
    assert result.nodes(0, 3) == result.graph.nodes_from_mask(result.masks[0, 1])
    off_grid = r"Size 4 was not traced; using the nearest traced size, 3"
    with pytest.warns(UserWarning, match=off_grid):
        assert result.nodes(0, 4) == result.nodes(0, 3)  # |4-3| < |4-6|
    with pytest.warns(UserWarning, match="nearest traced size, 6"):
        assert result.nodes(0, 5) == result.nodes(0, 6)
    with pytest.warns(UserWarning, match="nearest traced size, 1"):
        result.nodes(0, 2)  # a tie between 1 and 3 goes to the smaller
    with pytest.raises(ValueError, match="at least 1"):
        result.nodes(0, 0)
    with pytest.raises(KeyError, match="not in this result's sizes"):
        result.size_index(4)  # the exact lookup stays strict
