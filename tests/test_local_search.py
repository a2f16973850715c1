"""The local searches behind method="mask": each ends in a local optimum it can verify.

``swap_refine`` (independent sizes) must end where no single swap lowers any subgraph's KL;
``chain_refine`` (nested families) must keep the family nested with the grid's sizes and end
where no exchange of two nodes' entry levels lowers sum log(KL + eps). Both are checked by
brute force with hard masks run independently of the search code.
"""

from __future__ import annotations

import math

import pytest
import torch
from run_helpers import node_objective

import strace_lens as sl
from strace_lens.hygiene import model_untouched
from strace_lens.search.mask_learning import (
    CHAIN_EPS,
    MaskOptions,
    chain_refine,
    grow_nested,
    swap_refine,
    top_s,
)

SIZES = torch.tensor([2, 4, 8])


@pytest.fixture
def toks():
    return torch.randint(0, 50, (3, 8), generator=torch.Generator().manual_seed(4))


def _objective(model, toks, ablation="zero"):
    return node_objective(model, toks, ablation)


def _kl(model, toks, masks, ablation):
    """KL of node masks ``[prompt, node]`` (row p on prompt p), independent of the search."""
    with torch.no_grad():
        full = torch.log_softmax(model(toks)[:, -1].float(), -1)
        sub = sl.run_with_mask(model, toks, masks.float(), ablation)
    return sl.kl_divergence(full, sub)


def _start(n_prompts, n_nodes, seed):
    scores = torch.rand(n_prompts, n_nodes, generator=torch.Generator().manual_seed(seed))
    rows = top_s(scores.repeat_interleave(len(SIZES), 0), SIZES.repeat(n_prompts))
    return rows.reshape(n_prompts, len(SIZES), n_nodes)


@pytest.mark.slow
@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_swap_refine_ends_where_no_single_swap_helps(tiny, toks, ablation):
    n_p, n = len(toks), 15
    start = _start(n_p, n, seed=0)
    with model_untouched(tiny):
        objective = _objective(tiny, toks, ablation)
        abl = objective.ablation
        out = swap_refine(objective, start, "input", MaskOptions(refine_rounds=50))
    assert torch.equal(out.sum(-1), start.sum(-1))  # sizes kept
    for j in range(len(SIZES)):
        before = _kl(tiny, toks, start[:, j], abl)
        after = _kl(tiny, toks, out[:, j], abl)
        assert bool((after <= before + 1e-6).all())
        for p in range(n_p):
            inside = torch.nonzero(out[p, j]).flatten().tolist()
            outside = torch.nonzero(~out[p, j]).flatten().tolist()
            swaps = []
            for i in inside:
                for o in outside:
                    m = out[p, j].clone()
                    m[i], m[o] = False, True
                    swaps.append(m)
            kl = _kl(tiny, toks[p : p + 1].expand(len(swaps), -1), torch.stack(swaps), abl)
            assert float(kl.min()) >= float(after[p]) * (1 - 1e-5) - 1e-7


def _score(model, toks, family, ablation, per):
    """sum over sizes of log(KL + eps): per prompt, or of the mean KL for a dataset family."""
    n_p = len(toks)
    total = torch.zeros(family.shape[0])
    for j in range(family.shape[1]):
        masks = family[:, j] if per == "input" else family[0, j].expand(n_p, -1)
        kl = _kl(model, toks, masks, ablation)
        total += torch.log((kl if per == "input" else kl.mean(0, keepdim=True)) + CHAIN_EPS)
    return total


@pytest.mark.slow  # brute force over every exchange: minutes
@pytest.mark.parametrize("per", ["input", "dataset"])
def test_chain_refine_keeps_nesting_and_ends_in_a_local_optimum(tiny, toks, per):
    n = 15
    start = _start(len(toks) if per == "input" else 1, n, seed=1)
    with model_untouched(tiny):
        objective = _objective(tiny, toks)
        abl = objective.ablation
        out = chain_refine(objective, start, per, MaskOptions(refine_rounds=50, refine_width=1000))
    assert torch.equal(out.sum(-1), start.sum(-1))
    assert bool((out[:, :-1] <= out[:, 1:]).all())  # nested: each holds the smaller ones
    before = _score(tiny, toks, start, abl, per)
    after = _score(tiny, toks, out, abl, per)
    assert bool((after <= before + 1e-5).all())
    assert float((before - after).max()) > 0.1  # a random family is far from a local optimum
    level = (~out).sum(1)
    for g in range(out.shape[0]):
        for x in range(n):
            for y in range(n):
                if level[g, x] >= level[g, y]:
                    continue
                new = level[g].clone()
                new[x], new[y] = level[g, y], level[g, x]
                fam = (new[None, :] <= torch.arange(len(SIZES))[:, None])[None]
                toks_g = toks if per == "dataset" else toks[g : g + 1]
                score = _score(tiny, toks_g, fam, abl, per)
                assert float(score) >= float(after[g]) - 1e-4 * max(1.0, abs(float(after[g])))


@pytest.mark.slow
def test_nested_search_is_not_worse_than_its_ranking_alone(tiny, toks):
    """chain_refine only accepts improvements: with it the family scores at least as well."""
    plain = sl.trace(
        tiny, toks, sizes=SIZES.tolist(), progress=False, inverse=False, refine_rounds=0
    )
    refined = sl.trace(tiny, toks, sizes=SIZES.tolist(), progress=False, inverse=False)
    assert refined.is_nested
    eps = CHAIN_EPS
    score_plain = torch.log(plain.metrics["kl"] + eps).sum(1)
    score_refined = torch.log(refined.metrics["kl"] + eps).sum(1)
    assert bool((score_refined <= score_plain + 1e-5).all())
    assert not math.isnan(float(score_refined.sum()))


@pytest.mark.parametrize("per", ["input", "dataset"])
def test_nested_growth_is_nested_and_first_size_beats_the_rankings_top_node(tiny, toks, per):
    """Each size grows the one before; the first size is the best of proposals that include
    the ranking's and the guide's top node, so it is never worse than either alone."""
    n = 15
    groups = len(toks) if per == "input" else 1
    gen = torch.Generator().manual_seed(2)
    ranking, guide = torch.randn(groups, n, generator=gen), torch.randn(groups, n, generator=gen)
    with model_untouched(tiny):
        objective = _objective(tiny, toks)
        abl = objective.ablation
        sizes = torch.tensor([1, 3, 8])
        fam = grow_nested(objective, ranking, sizes, per, MaskOptions(), guide)
    assert torch.equal(fam.sum(-1), sizes.expand(groups, -1))
    assert bool((fam[:, :-1] <= fam[:, 1:]).all())

    def family_kl(masks):  # [groups, node] -> KL per group (mean over prompts per dataset)
        rows = masks if per == "input" else masks.expand(len(toks), -1)
        kl = _kl(tiny, toks, rows, abl)
        return kl if per == "input" else kl.mean(0, keepdim=True)

    got = family_kl(fam[:, 0])
    for scores in (ranking, guide):
        alone = top_s(scores, torch.ones(groups, dtype=torch.long))
        assert bool((got <= family_kl(alone) + 1e-6).all())


def _levels_of_order(order, grid, n):
    """Levels of the family whose nodes enter in ``order`` (grid sizes ``grid``)."""
    level = [len(grid)] * n
    for place, node in enumerate(order):
        level[node] = sum(1 for s in grid if s <= place)
    return tuple(level)


@pytest.mark.parametrize(
    ("level", "grid"),
    [([0, 1, 2, 3], [1, 2, 3]), ([1, 0, 2, 1, 0], [2, 4]), ([2, 0, 1, 2, 0, 1], [2, 4])],
)
def test_insertions_are_every_family_one_move_away(level, grid):
    """Every distinct family reached by taking one node out of the order and putting it back
    elsewhere (by brute force over orders consistent with the levels), and only those."""
    from strace_lens.search.local_search import _insertions

    n = len(level)
    found = {tuple(t.tolist()) for t in _insertions(torch.tensor(level), torch.tensor(grid))}
    order = sorted(range(n), key=lambda x: (level[x], x))  # ties in index order, as documented
    expected = set()
    for p in range(n):
        rest = order[:p] + order[p + 1 :]
        for q in range(n):
            expected.add(_levels_of_order([*rest[:q], order[p], *rest[q:]], grid, n))
    expected.discard(tuple(level))
    assert found == expected
    assert len(found) == len(_insertions(torch.tensor(level), torch.tensor(grid)))  # distinct
    for new in found:  # every size keeps its count: a family of the same grid
        assert sorted(new) == sorted(level)


@pytest.mark.slow  # brute force over every exchange and insertion: minutes
def test_chain_refine_on_a_small_set_ends_where_no_insertion_helps(tiny, toks):
    """On a candidate set of at most INSERTION_CANDIDATES nodes the nested search ends where
    neither an exchange nor an insertion lowers the score (brute force, independent runs)."""
    from strace_lens.masked_forward import forward_logprobs
    from strace_lens.search.local_search import INSERTION_CANDIDATES
    from strace_lens.search.objective import SubgraphObjective

    graph = sl.NodeGraph.from_model(tiny)
    cand = torch.zeros(len(graph), dtype=torch.bool)
    cand[1:11] = True  # 10 candidates, every other node kept
    # this grid and start: exchanges alone end where one insertion still lowers the score by
    # 0.09 for some prompt (found by running the search with insertions off)
    n_c, grid = int(cand.sum()), torch.arange(1, 10)
    assert n_c <= INSERTION_CANDIDATES
    scores = torch.rand(len(toks), n_c, generator=torch.Generator().manual_seed(1))
    rows = top_s(scores.repeat_interleave(len(grid), 0), grid.repeat(len(toks)))
    start = rows.reshape(len(toks), len(grid), n_c)
    with model_untouched(tiny):
        batch = sl.tokenize(tiny, toks)
        with torch.no_grad():
            logp_full = forward_logprobs(tiny, batch, [])
        objective = node_objective(tiny, toks, "zero")
        objective = SubgraphObjective(tiny, graph, batch, logp_full, objective.ablation, cand, None)
        out = chain_refine(objective, start, "input", MaskOptions(refine_rounds=50))
    assert bool((out[:, :-1] <= out[:, 1:]).all()) and torch.equal(out.sum(-1), start.sum(-1))

    def score(g, levels):
        fams = torch.stack([torch.tensor(lv) for lv in levels])  # [family, cand]
        members = fams[:, None, :] <= torch.arange(len(grid))[None, :, None]
        full = torch.ones(len(levels), len(grid), len(graph))
        full[:, :, cand] = members.float()
        kl = _kl(tiny, toks[g : g + 1].expand(len(levels) * len(grid), -1),
                 full.reshape(-1, len(graph)), objective.ablation)  # fmt: skip
        return torch.log(kl.reshape(len(levels), len(grid)) + CHAIN_EPS).sum(-1)

    from strace_lens.search.local_search import _insertions

    level = (~out).sum(1)
    for g in range(len(toks)):
        own = float(score(g, [level[g].tolist()])[0])
        moves = [t.tolist() for t in _insertions(level[g], grid)]
        for x in range(n_c):
            for y in range(n_c):
                if level[g, x] < level[g, y]:
                    new = level[g].clone()
                    new[x], new[y] = level[g, y], level[g, x]
                    moves.append(new.tolist())
        assert float(score(g, moves).min()) >= own - 1e-4 * max(1.0, abs(own))
