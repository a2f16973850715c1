"""The learned edge ranking, ``method="mask"`` (strace_lens/edges/learned.py)."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import make_tiny

from strace_lens.edges import (
    EdgeGraph,
    EdgeMasks,
    edge_tokenize,
    edge_trace,
    edge_weights,
    greedy_order,
    run_with_edge_masks,
)
from strace_lens.edges.learned import (
    MaskSearch,
    learn_order,
    learned_nested_order,
    learned_nested_orders,
    merge_nested,
    pick_budgets,
    rank_scores,
)
from strace_lens.inputs import tokenize
from strace_lens.metrics import kl_divergence, tv_distance
from strace_lens.tiny_model import tiny_model

PROMPTS = ["The cat sat", "Paris is the"]
GRID = [0.01, 0.05, 0.1, 0.3, 1.0]
FAST = MaskSearch(steps=4)


@pytest.fixture(scope="module")
def byte_tiny():
    return tiny_model(device="cpu", dtype=torch.float64)


@pytest.fixture(scope="module", params=[True, False], ids=["ablated", "kept"])
def mask_result(request, byte_tiny):
    return edge_trace(
        byte_tiny,
        PROMPTS,
        method="mask",
        sizes=GRID,
        mask_search=FAST,
        ablate_attention_edges=request.param,
    )


def test_rank_scores_reproduce_the_greedy():
    model = make_tiny(torch.float64)
    tokens = torch.randint(0, 50, (1, 6), generator=torch.Generator().manual_seed(0))
    (w,), _ = edge_weights(model, tokenize(model, tokens))
    graph = EdgeGraph.from_model(model, 6)
    order = greedy_order(graph, w)
    assert torch.equal(greedy_order(graph, rank_scores(order)), order)


def test_exact_sizes_and_nesting(mask_result):
    r = mask_result
    assert r.nested and r.options["method"] == "mask"
    for p in range(r.n_prompts):
        e = r.n_edges(p)
        assert r.counts[p].tolist() == [int(s * e) for s in GRID]
        assert sorted(r.subgraph(p, len(GRID) - 1).tolist()) == list(range(e))
        for i in range(len(GRID) - 1):
            small, big = set(r.subgraph(p, i).tolist()), set(r.subgraph(p, i + 1).tolist())
            assert len(small) == int(r.counts[p, i]) and small <= big
    assert r.metrics["tv"][:, -1].abs().max() == 0


def test_every_prefix_is_connected_to_the_output(mask_result):
    r = mask_result
    graph = r.graph(0)
    order = r.subgraph(0, len(GRID) - 1)
    source, target = graph.edge_fields["source_node"], graph.edge_fields["target_node"]
    reached = {graph.output_node}
    for e in order.tolist():
        assert int(target[e]) in reached
        reached.add(int(source[e]))


def test_hard_metrics_equal_an_independent_masked_run(byte_tiny, mask_result):
    r = mask_result
    ablate = r.options["ablate_attention_edges"]
    p, i = 1, 2
    graph = r.graph(p)
    batch = edge_tokenize(byte_tiny, PROMPTS[p])
    keep = graph.keep_mask(r.subgraph(p, i))[None].double()
    logp = run_with_edge_masks(
        byte_tiny, batch, EdgeMasks.from_edges(graph, keep), ablate_attention_edges=ablate
    )
    full = byte_tiny(batch.tokens)[0, -1].double().log_softmax(-1)[None]
    assert abs(float(tv_distance(full, logp)[0]) - float(r.metrics["tv"][p, i])) <= 1e-6
    assert abs(float(kl_divergence(full, logp)[0]) - float(r.metrics["kl"][p, i])) <= 1e-6


def test_same_seed_same_ranking(byte_tiny):
    noisy = MaskSearch(steps=3, noise=1.0, seed=5)
    a = edge_trace(byte_tiny, PROMPTS[:1], method="mask", sizes=GRID, mask_search=noisy)
    b = edge_trace(byte_tiny, PROMPTS[:1], method="mask", sizes=GRID, mask_search=noisy)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.metrics["kl"], b.metrics["kl"])


def test_prompts_side_by_side_give_each_prompt_its_own_search(byte_tiny):
    """Searching prompts of different lengths in one batch (their rows share forwards,
    right-padded) gives each the ranking and measurements it gets searched alone."""
    prompts = ["The cat sat on", "Paris is the capital of", "A"]
    batch = edge_tokenize(byte_tiny, prompts)
    lengths = (batch.predict_pos + 1).tolist()
    assert len(set(lengths)) == 3
    weights, _ = edge_weights(byte_tiny, batch)
    graphs = [EdgeGraph.from_model(byte_tiny, n) for n in lengths]
    greedy = [greedy_order(g, w) for g, w in zip(graphs, weights)]
    search = MaskSearch(steps=2, batch_prompts=3, max_rows=5)  # 5 rows: split forwards too
    together = learned_nested_orders(byte_tiny, batch, greedy, GRID, search=search)
    for p, fit in enumerate(together):
        alone = learned_nested_order(
            byte_tiny, batch.select([p]).trimmed(), graphs[p], greedy[p], GRID, search=search
        )
        assert torch.equal(fit.order, alone.order)
        assert fit.merge is not None and alone.merge is not None
        assert torch.equal(fit.merge.choice, alone.merge.choice)
        assert torch.allclose(fit.merge.kl, alone.merge.kl, atol=1e-9)
        assert torch.allclose(fit.kl, alone.kl, atol=1e-9)


def test_step_zero_is_the_greedy_and_selection_is_never_worse(byte_tiny):
    batch = edge_tokenize(byte_tiny, PROMPTS[0])
    graph = EdgeGraph.from_model(byte_tiny, batch.tokens.shape[1])
    (w,), _ = edge_weights(byte_tiny, batch)
    order = greedy_order(graph, w)
    budgets = pick_budgets(GRID, graph.n_edges, FAST)
    fit = learn_order(byte_tiny, batch, graph, order, budgets, search=FAST)
    keep = torch.zeros(len(budgets), graph.n_edges, dtype=torch.float64)
    for b, k in enumerate(budgets.tolist()):
        keep[b, order[:k].long()] = 1
    logp = run_with_edge_masks(byte_tiny, batch, EdgeMasks.from_edges(graph, keep))
    full = byte_tiny(batch.tokens)[0, -1].double().log_softmax(-1)[None]
    greedy_kl = kl_divergence(full.expand_as(logp), logp)
    assert torch.allclose(fit.kl[0], greedy_kl, atol=1e-9)
    assert fit.kl.shape == (FAST.steps, len(budgets)) and fit.passes == FAST.steps
    # the kept step's hard subgraphs are the learned order's prefixes, and no worse on average
    best = fit.kl[fit.best_step]
    assert float((best + 1e-12).log().mean()) <= float((greedy_kl + 1e-12).log().mean()) + 1e-9
    for b, k in enumerate(budgets.tolist()):
        keep[b] = 0
        keep[b, fit.order[:k].long()] = 1
    logp = run_with_edge_masks(byte_tiny, batch, EdgeMasks.from_edges(graph, keep))
    assert torch.allclose(kl_divergence(full.expand_as(logp), logp), best, atol=1e-9)


def test_kept_attention_gradient_moves_attention_edges_and_keeps_the_kept_forward(byte_tiny):
    """With attention edges kept their masks never reach the forward: without the option
    the learning leaves every attention edge's score where the greedy put it; with it they
    move, while each step still measures its subgraphs under the kept semantics (every
    step's recorded KL equals an independent kept-semantics run of that step's prefixes)."""
    batch = edge_tokenize(byte_tiny, PROMPTS[1])
    graph = EdgeGraph.from_model(byte_tiny, batch.tokens.shape[1])
    (w,), _ = edge_weights(byte_tiny, batch)
    order = greedy_order(graph, w)
    budgets = pick_budgets(GRID, graph.n_edges, FAST)
    is_attn = graph.edge_fields["kind"] == 0
    full = byte_tiny(batch.tokens)[0, -1].double().log_softmax(-1)[None]
    moved = {}
    for on in (False, True):
        search = MaskSearch(steps=3, kept_attention_gradient=on)
        fit = learn_order(
            byte_tiny, batch, graph, order, budgets, search=search, ablate_attention_edges=False
        )
        moved[on] = int((fit.scores[is_attn] != rank_scores(order)[is_attn]).sum())
        for step in range(search.steps):
            keep = torch.zeros(len(budgets), graph.n_edges, dtype=torch.float64)
            for b, k in enumerate(budgets.tolist()):
                keep[b, fit.step_orders[step][:k].long()] = 1
            logp = run_with_edge_masks(
                byte_tiny, batch, EdgeMasks.from_edges(graph, keep), ablate_attention_edges=False
            )
            assert torch.allclose(
                kl_divergence(full.expand_as(logp), logp), fit.kl[step], atol=1e-9
            )
    assert moved[False] == 0
    assert moved[True] > int(is_attn.sum()) // 10


def exhaustive_case(
    seed: int, ablate: bool, merged: MaskSearch | None = None
) -> tuple[list[float], list[float], list[float]]:
    """KL per size k = 1..E-1 of greedy, learned (``merged``: the learned nested merge on
    every k) and the best of all subsets (1 layer, 2 heads, 3 tokens: E = 9, 511 subsets)."""
    model = make_tiny(torch.float64, n_layers=1, n_heads=2, n_key_value_heads=2)
    tokens = torch.randint(0, 50, (1, 3), generator=torch.Generator().manual_seed(seed))
    batch = tokenize(model, tokens)
    (w,), _ = edge_weights(model, batch)
    graph = EdgeGraph.from_model(model, 3)
    n = graph.n_edges
    order = greedy_order(graph, w)
    if merged is not None:
        grid = [k / n for k in range(1, n)]
        fit = learned_nested_order(
            model, batch, graph, order, grid, search=merged, ablate_attention_edges=ablate
        )
    else:
        search = MaskSearch(steps=30, lr=0.5, max_budgets=6, merge=False)
        fit = learn_order(
            model, batch, graph, order, torch.arange(1, n), search=search,
            ablate_attention_edges=ablate,
        )  # fmt: skip
    subsets = [c for k in range(1, n) for c in itertools.combinations(range(n), k)]
    keep = torch.zeros(len(subsets) + 1, n, dtype=torch.float64)
    for i, c in enumerate(subsets):
        keep[i, list(c)] = 1
    keep[-1] = 1
    logp = run_with_edge_masks(
        model, batch, EdgeMasks.from_edges(graph, keep), ablate_attention_edges=ablate
    )
    kl = kl_divergence(logp[-1:].expand_as(logp[:-1]), logp[:-1])
    where = {c: i for i, c in enumerate(subsets)}

    def curve(ranking: torch.Tensor) -> list[float]:
        return [float(kl[where[tuple(sorted(ranking[:k].tolist()))]]) for k in range(1, n)]

    sizes = torch.tensor([len(c) for c in subsets])
    best = [float(kl[sizes == k].min()) for k in range(1, n)]
    return curve(order), curve(fit.order), best


@pytest.mark.parametrize("ablate", [True, False], ids=["ablated", "kept"])
def test_learned_against_greedy_and_exhaustive_optimum(ablate):
    """On 4 random prompts, every size: the exhaustive optimum bounds both; the learned
    ranking beats the greedy on the sum of log KL of each prompt and closes part of the gap.
    Per size it is not guaranteed (one order for all sizes); measured on these prompts:
    see the report printed with ``pytest -s``."""
    gaps_g, gaps_l, worse = [], [], 0
    for seed in range(4):
        g, learned, best = exhaustive_case(seed, ablate)
        for a, b, c in zip(g, learned, best):
            assert c <= a + 1e-12 and c <= b + 1e-12
            gaps_g.append(a - c)
            gaps_l.append(b - c)
            worse += b > a + 1e-12
        log = lambda xs: sum(torch.tensor(xs).add(1e-12).log().tolist())  # noqa: E731
        assert log(learned) <= log(g) + 1e-3
    print(
        f"\nablate={ablate}: mean KL gap to the exhaustive optimum: greedy "
        f"{sum(gaps_g) / len(gaps_g):.4f}, learned {sum(gaps_l) / len(gaps_l):.4f}; "
        f"learned worse than greedy at {worse} of {len(gaps_g)} (prompt, size) pairs"
    )
    assert sum(gaps_l) < sum(gaps_g)


@pytest.mark.parametrize(
    "search",
    [MaskSearch(), MaskSearch(steps=10, max_candidates=4)],
    ids=["default", "10-steps-4-candidates"],
)
@pytest.mark.parametrize("ablate", [True, False], ids=["ablated", "kept"])
def test_merged_against_greedy_and_exhaustive_optimum(ablate, search):
    """The nested merge of the greedy's and the learned rankings, every size of 4 random
    prompts: bounded by the exhaustive optimum, never worse than the greedy at the first
    size, and better than the greedy in total (log KL) on each prompt."""
    gaps_g, gaps_m, worse = [], [], 0
    for seed in range(4):
        g, merged, best = exhaustive_case(seed, ablate, merged=search)
        assert merged[0] <= g[0] + 1e-12
        for a, b, c in zip(g, merged, best):
            assert c <= a + 1e-12 and c <= b + 1e-12
            gaps_g.append(a - c)
            gaps_m.append(b - c)
            worse += b > a + 1e-12
        log = lambda xs: sum(torch.tensor(xs).add(1e-12).log().tolist())  # noqa: E731
        assert log(merged) <= log(g) + 1e-9
    print(
        f"\nablate={ablate}, merged ({search.steps} steps, {search.max_candidates} "
        f"candidates): mean KL gap to the exhaustive optimum: greedy "
        f"{sum(gaps_g) / len(gaps_g):.4f}, merged {sum(gaps_m) / len(gaps_m):.4f}; "
        f"merged worse than greedy at {worse} of {len(gaps_g)} (prompt, size) pairs"
    )
    assert sum(gaps_m) <= sum(gaps_g) + 1e-12
    if search.steps >= 10:  # one step of lr 0.3 need not move a 9-edge ranking at all
        assert sum(gaps_m) < sum(gaps_g)


def merge_case(byte_tiny, ablate: bool = True):
    batch = edge_tokenize(byte_tiny, PROMPTS[1])
    graph = EdgeGraph.from_model(byte_tiny, batch.tokens.shape[1])
    (w,), _ = edge_weights(byte_tiny, batch)
    greedy = greedy_order(graph, w)
    gen = torch.Generator().manual_seed(3)
    other = greedy_order(graph, torch.rand(graph.n_edges, generator=gen, dtype=torch.float64))
    keep = torch.ones(1, graph.n_edges, dtype=torch.float64)
    full = run_with_edge_masks(
        byte_tiny, batch, EdgeMasks.from_edges(graph, keep), ablate_attention_edges=ablate
    )[0]
    counts = torch.tensor([int(s * graph.n_edges) for s in GRID])
    return batch, graph, greedy, other, full, counts


def prefix_kl(model, batch, graph, order, counts, full, ablate=True):
    keep = torch.zeros(len(counts), graph.n_edges, dtype=torch.float64)
    for i, k in enumerate(counts.tolist()):
        keep[i, order[:k].long()] = 1
    logp = run_with_edge_masks(
        model, batch, EdgeMasks.from_edges(graph, keep), ablate_attention_edges=ablate
    )
    return kl_divergence(full.expand_as(logp), logp).clamp(min=0).detach()


@pytest.mark.parametrize("ablate", [True, False], ids=["ablated", "kept"])
def test_merge_measures_its_own_chain_and_stays_connected(byte_tiny, ablate):
    batch, graph, greedy, other, full, counts = merge_case(byte_tiny, ablate)
    order, choice = merge_nested(
        byte_tiny, batch, graph, [greedy, other], counts,
        ablate_attention_edges=ablate, logp_full=full,
    )  # fmt: skip
    assert sorted(order.tolist()) == list(range(graph.n_edges))
    inner = counts[(counts > 0) & (counts < graph.n_edges)]
    assert choice.counts.tolist() == inner.tolist()
    # the recorded KL is the hard KL of the merged ranking's own prefixes, run independently
    kl = prefix_kl(byte_tiny, batch, graph, order, inner, full, ablate)
    assert torch.allclose(kl, choice.kl, atol=1e-9)
    # the first size is the better of the two rankings' own prefixes
    first = min(
        float(prefix_kl(byte_tiny, batch, graph, r, inner[:1], full, ablate)[0])
        for r in (greedy, other)
    )
    assert abs(float(choice.kl[0]) - first) <= 1e-9
    # where the chain so far lies in the greedy's prefix, it is no worse than that prefix
    kl_g = prefix_kl(byte_tiny, batch, graph, greedy, inner, full, ablate)
    for i in range(1, len(inner)):
        if set(order[: int(inner[i - 1])].tolist()) <= set(greedy[: int(inner[i])].tolist()):
            assert float(choice.kl[i]) <= float(kl_g[i]) + 1e-9
    source, target = graph.edge_fields["source_node"], graph.edge_fields["target_node"]
    reached = {graph.output_node}
    for e in order.tolist():
        assert int(target[e]) in reached
        reached.add(int(source[e]))


def prefix_logp(model, batch, graph, order, counts, ablate):
    keep = torch.zeros(len(counts), graph.n_edges, dtype=torch.float64)
    for i, k in enumerate(counts.tolist()):
        keep[i, order[:k].long()] = 1
    masks = EdgeMasks.from_edges(graph, keep)
    return run_with_edge_masks(model, batch, masks, ablate_attention_edges=ablate).detach()


@pytest.mark.parametrize("ablate", [True, False], ids=["ablated", "kept"])
def test_greedy_bound_keeps_every_size_within_the_greedy_tv(byte_tiny, ablate):
    """A random (connected) ranking as the second candidate, 19 sizes: without the bound
    the KL-chosen chain has a higher TV than the greedy's prefix at some sizes; with it
    (the default) no size does, the chain goes back to the greedy's prefix (restarts), and
    the recorded KL is still that of the merged ranking's own prefixes, nested, connected."""
    batch, graph, greedy, other, full, _ = merge_case(byte_tiny, ablate)
    counts = torch.unique((torch.logspace(-2, 0, 20) * graph.n_edges).long())
    counts = counts[counts < graph.n_edges]
    gen = torch.Generator().manual_seed(1)
    other = greedy_order(graph, torch.rand(graph.n_edges, generator=gen, dtype=torch.float64))
    tv_g = tv_distance(full, prefix_logp(byte_tiny, batch, graph, greedy, counts, ablate))
    worse = {}
    for bound in (False, True):
        order, choice = merge_nested(
            byte_tiny, batch, graph, [greedy, other], counts,
            ablate_attention_edges=ablate, logp_full=full, greedy_bound=bound,
        )  # fmt: skip
        assert sorted(order.tolist()) == list(range(graph.n_edges))
        assert choice.counts.tolist() == counts.tolist()
        logp = prefix_logp(byte_tiny, batch, graph, order, counts, ablate)
        kl = kl_divergence(full.expand_as(logp), logp).clamp(min=0)
        assert torch.allclose(kl, choice.kl, atol=1e-9)
        assert torch.allclose(logp, choice.logp, atol=1e-9)
        worse[bound] = int((tv_distance(full, logp) > tv_g + 1e-12).sum())
        assert choice.greedy_prefix is not None
        # the sizes marked as the greedy's prefix are exactly it
        for i, k in enumerate(counts.tolist()):
            same = set(order[:k].tolist()) == set(greedy[:k].tolist())
            assert same == bool(choice.greedy_prefix[i])
        if bound:
            assert choice.restarts > 0
        source, target = graph.edge_fields["source_node"], graph.edge_fields["target_node"]
        reached = {graph.output_node}
        for e in order.tolist():
            assert int(target[e]) in reached
            reached.add(int(source[e]))
    assert worse[False] > 0 and worse[True] == 0


def test_merge_of_the_greedy_alone_is_the_greedy(byte_tiny):
    batch, graph, greedy, _, full, counts = merge_case(byte_tiny)
    order, choice = merge_nested(byte_tiny, batch, graph, [greedy], counts, logp_full=full)
    assert torch.equal(order, greedy) and choice.choice.eq(0).all()
    assert choice.rows == len(choice.counts)


def test_mask_result_saves_and_loads(tmp_path, mask_result):
    from strace_lens.edges import EdgeTraceResult

    back = EdgeTraceResult.load(mask_result.save(tmp_path / "mask"))
    assert back.nested and torch.equal(back.ids, mask_result.ids.to(back.ids.dtype))
    assert back.options["method"] == "mask"
    assert len(back.options["mask_fits"]) == len(PROMPTS)


def test_bad_search_options_raise():
    with pytest.raises(ValueError, match="mask search"):
        MaskSearch(steps=-1)
    with pytest.raises(ValueError, match="Temperatures"):
        MaskSearch(temperature=(1.0, 0.0))
    with pytest.raises(ValueError, match="mask search"):
        MaskSearch(max_candidates=0)
    with pytest.raises(ValueError, match="No trainable budget"):
        pick_budgets([1.0], 10, MaskSearch())


@pytest.mark.parametrize("ablate", [True, False], ids=["ablated", "kept"])
def test_kept_attention_gradient_names_a_run_only_with_attention_edges_kept(
    tmp_path, byte_tiny, ablate
):
    """The option cannot change a run whose attention edges are ablated, so such a folder
    traced with it off resumes with it on (folders traced before it existed resume too);
    with attention edges kept it is part of the run's identity and a change is refused."""
    from strace_lens.dataset import RunMismatchError, trace_dataset

    def run(on: bool):
        return trace_dataset(
            byte_tiny,
            PROMPTS[:1],
            tmp_path / "run",
            progress=False,
            granularity="edge",
            method="mask",
            sizes=GRID,
            ablate_attention_edges=ablate,
            mask_search=MaskSearch(steps=2, kept_attention_gradient=on),
        )

    first = run(False)
    if ablate:
        assert torch.equal(run(True).ids, first.ids)
    else:
        with pytest.raises(RunMismatchError, match="kept_attention_gradient"):
            run(True)
