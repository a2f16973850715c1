"""The paper's greedy (strace_lens/edges/greedy.py) against a brute-force re-implementation."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny
from test_edge_graph import enumerate_edges

from strace_lens.edges import (
    PAPER_GRID,
    EdgeGraph,
    edge_counts,
    edge_weights,
    greedy_order,
    random_order,
)
from strace_lens.inputs import tokenize


def brute_force_greedy(edges: list[tuple[str, tuple, tuple]], weight: dict[str, float], tie):
    """Best-first from the output node with a plain list as the frontier (no heap).

    ``edges``: (name, source node, target node); ``tie``: name -> rank for equal weights.
    """
    output = max(dst for _, _, dst in edges)  # last graph layer; last position
    frontier = [e for e in edges if e[2] == output]
    reached = {output}
    taken: list[str] = []
    while frontier:
        best = 0
        for i in range(1, len(frontier)):
            a, b = frontier[i][0], frontier[best][0]
            if weight[a] > weight[b] or (weight[a] == weight[b] and tie[a] < tie[b]):
                best = i
        name, src, _ = frontier.pop(best)
        taken.append(name)
        if src not in reached:
            reached.add(src)
            frontier += [e for e in edges if e[2] == src]
    return taken


@pytest.mark.parametrize("n_kv,seed,n_pos", [(4, 0, 5), (2, 1, 6), (1, 2, 4)])
def test_greedy_equals_brute_force_at_every_size_of_the_grid(n_kv, seed, n_pos):
    model = make_tiny(torch.float64, n_key_value_heads=n_kv)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50, (1, n_pos), generator=gen)
    (weights,), _ = edge_weights(model, tokenize(model, tokens))
    graph = EdgeGraph.from_model(model, n_pos)
    order = greedy_order(graph, weights)
    edges = enumerate_edges(graph.n_layers, graph.n_heads, n_pos)
    weight = {name: float(weights[graph.index(name)]) for name, _, _ in edges}
    tie = {name: graph.index(name) for name, _, _ in edges}
    want = brute_force_greedy(edges, weight, tie)
    got = graph.names(order)
    assert len(got) == graph.n_edges == len(set(got))
    counts = edge_counts(PAPER_GRID, graph.n_edges)
    for s, k in zip(PAPER_GRID, counts.tolist()):
        assert k == int(s * graph.n_edges)
        assert got[:k] == want[:k]
    assert got == want


def test_greedy_with_ties_and_zero_weights_matches_brute_force():
    graph = EdgeGraph(2, 2, 3)
    gen = torch.Generator().manual_seed(0)
    # few distinct values: many ties, and zeros
    weights = torch.randint(0, 3, (graph.n_edges,), generator=gen).double() / 2
    edges = enumerate_edges(2, 2, 3)
    weight = {name: float(weights[graph.index(name)]) for name, _, _ in edges}
    tie = {name: graph.index(name) for name, _, _ in edges}
    assert graph.names(greedy_order(graph, weights)) == brute_force_greedy(edges, weight, tie)


def test_random_orders():
    graph = EdgeGraph(3, 2, 4)
    gen = torch.Generator().manual_seed(0)
    uniform = random_order(graph, gen)
    assert sorted(uniform.tolist()) == list(range(graph.n_edges))
    first = random_order(graph, gen, resid_mlp_first=True)
    assert sorted(first.tolist()) == list(range(graph.n_edges))
    kinds = graph.edge_fields["kind"][first.long()]
    n_other = int((graph.edge_fields["kind"] != 0).sum())
    assert bool((kinds[:n_other] != 0).all()) and bool((kinds[n_other:] == 0).all())
    assert not torch.equal(random_order(graph, gen), uniform)
