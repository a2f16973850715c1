"""Hand-made ``EdgeTraceResult``s for the edge analysis and figure tests: a ranking given by
edge names, edge counts and metrics chosen by hand, so every share, area and drawn edge can
be counted on paper."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from strace_lens.edges import EdgeGraph, EdgeTraceResult


def ranking(graph: EdgeGraph, first: Sequence[str] | torch.Tensor) -> torch.Tensor:
    """Compact ids: the given edges first (names or ids, in the given order), then every other
    edge by id."""
    if isinstance(first, torch.Tensor):
        head = first.long()
    else:
        head = torch.tensor([graph.index(n) for n in first], dtype=torch.long)
    rest = torch.ones(graph.n_edges, dtype=torch.bool)
    rest[head] = False
    return torch.cat([head, torch.nonzero(rest).flatten()]).to(torch.int32)


def handmade(
    n_layers: int,
    n_heads: int,
    n_pos: Sequence[int],
    firsts: Sequence[Sequence[str] | torch.Tensor],
    counts: Sequence[Sequence[int]],
    grid: Sequence[float],
    tv: Sequence[Sequence[float]] | None = None,
    top1: Sequence[Sequence[float]] | None = None,
) -> EdgeTraceResult:
    """A nested result: prompt p's ranking starts with ``firsts[p]``; its subgraph i keeps
    the first ``counts[p][i]`` edges."""
    orders = [
        ranking(EdgeGraph(n_layers, n_heads, t), first)
        for t, first in zip(n_pos, firsts, strict=True)
    ]
    offsets = [0]
    for order in orders:
        offsets.append(offsets[-1] + len(order))
    n_p, n_s = len(n_pos), len(grid)
    zeros = torch.zeros(n_p, n_s)
    tv_t = torch.tensor(tv, dtype=torch.float32) if tv is not None else zeros.clone()
    top1_t = torch.tensor(top1, dtype=torch.float32) if top1 is not None else zeros.clone()
    return EdgeTraceResult(
        n_layers=n_layers,
        n_heads=n_heads,
        grid=tuple(grid),
        n_pos=torch.tensor(list(n_pos)),
        counts=torch.tensor([list(c) for c in counts]),
        nested=True,
        ids=torch.cat(orders),
        offsets=torch.tensor(offsets),
        metrics={"tv": tv_t, "kl": zeros.clone(), "nucleus": zeros.clone(), "top1": top1_t},
        entropy=torch.ones(n_p),
        top_tokens=torch.zeros(n_p, n_s, dtype=torch.long),
        full_top_tokens=torch.zeros(n_p, dtype=torch.long),
        prompts=[f"prompt {p}" for p in range(n_p)],
        options={"method": "greedy", "tokens": "paper"},
    )
