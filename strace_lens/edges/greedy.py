"""The paper's greedy s-Trace on the edge graph: best-first from the output node.

Start with the edges entering the output node on the frontier. Repeatedly pop the heaviest
frontier edge and append it to the ranking; if its source node has not been reached before,
push the edges entering that source. Every edge of the pruned graph is eventually ranked
(each reachable node's in-edges are pushed exactly once), and the subgraph of size s is the
first ``int(s * E)`` edges of the ranking, so subgraphs are nested. Fidelity is never
evaluated during the search.

Ties (equal weights) go to the smaller compact edge id: the heap orders ``(-weight, id)``.
The weights are the local, normalised ones of :mod:`strace_lens.edges.weights`.
"""

from __future__ import annotations

import heapq

import torch
from jaxtyping import Float, Int
from torch import Tensor

from strace_lens.edges.graph import EdgeGraph


def greedy_order(graph: EdgeGraph, weights: Float[Tensor, " edge"]) -> Int[Tensor, " edge"]:
    """The best-first ranking of every edge (compact ids, first = taken first)."""
    if weights.shape != (graph.n_edges,):
        raise ValueError(f"Expected {graph.n_edges} edge weights, got {tuple(weights.shape)}.")
    ptr_t, ids_t = graph.in_edges
    # The heap holds each edge's position in the (-weight, id) order instead of the pair:
    # integers compare much faster than tuples of floats (3-6x on 0.3 M edges), and a stable
    # sort of -weight breaks ties by the smaller id, so the pops come in the same order.
    by_rank = torch.sort(-weights.double(), stable=True).indices
    rank_t = torch.empty_like(by_rank)
    rank_t[by_rank] = torch.arange(len(by_rank))
    # plain Python lists: heapq on ints is fastest with no tensor access
    rank, edge_at = rank_t.tolist(), by_rank.tolist()
    ptr, ids = ptr_t.tolist(), ids_t.tolist()
    source = graph.edge_fields["source_node"].tolist()
    reached = bytearray(graph.n_nodes)
    out = graph.output_node
    reached[out] = 1
    heap = [rank[e] for e in ids[ptr[out] : ptr[out + 1]]]
    heapq.heapify(heap)
    order: list[int] = []
    push, pop = heapq.heappush, heapq.heappop
    while heap:
        e = edge_at[pop(heap)]
        order.append(e)
        node = source[e]
        if not reached[node]:
            reached[node] = 1
            for f in ids[ptr[node] : ptr[node + 1]]:
                push(heap, rank[f])
    return torch.tensor(order, dtype=torch.int32)


def random_order(
    graph: EdgeGraph, generator: torch.Generator, resid_mlp_first: bool = False
) -> Int[Tensor, " edge"]:
    """A random ranking: uniform, or (``resid_mlp_first``) residual and MLP edges in random
    order before attention edges in random order, as the released code's random baseline."""
    perm = torch.randperm(graph.n_edges, generator=generator)
    if not resid_mlp_first:
        return perm.to(torch.int32)
    is_attn = graph.edge_fields["kind"][perm] == 0
    return torch.cat([perm[~is_attn], perm[is_attn]]).to(torch.int32)
