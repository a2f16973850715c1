"""Analyses on constructed TraceResults whose answers are known by hand."""

from __future__ import annotations

import math

import numpy as np
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
        sizes, masks, GRAPH, nucleus=nucleus, n_prompts=3, candidates=candidates,
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
