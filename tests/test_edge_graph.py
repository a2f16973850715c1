"""The edge graph (strace_lens/edges/graph.py) against an independent enumeration."""

from __future__ import annotations

import pytest
import torch

from strace_lens.edges import EdgeGraph, project


def enumerate_edges(n_layers: int, n_heads: int, n_pos: int) -> list[tuple[str, tuple, tuple]]:
    """(name, source node, target node) of every edge of the pruned graph, by plain loops.

    A node is (graph layer, position); layer 0 = embeddings, 1 + 2l after attention of block
    l, 2 + 2l after its MLP. Pruning: keep the edges whose target reaches the output node.
    """
    edges = []
    for layer in range(n_layers):
        for t in range(n_pos):
            for head in range(n_heads):
                for j in range(t + 1):
                    edges.append((f"a{layer}.h{head}:{j}->{t}", (2 * layer, j), (2 * layer + 1, t)))
            edges.append((f"r{layer}.attn:{t}", (2 * layer, t), (2 * layer + 1, t)))
            edges.append((f"m{layer}:{t}", (2 * layer + 1, t), (2 * layer + 2, t)))
            edges.append((f"r{layer}.mlp:{t}", (2 * layer + 1, t), (2 * layer + 2, t)))
    # backward reachability from the output node, by fixed-point iteration
    reach = {(2 * n_layers, n_pos - 1)}
    changed = True
    while changed:
        changed = False
        for _, src, dst in edges:
            if dst in reach and src not in reach:
                reach.add(src)
                changed = True
    return [e for e in edges if e[2] in reach]


@pytest.mark.parametrize("dims", [(1, 1, 1), (2, 3, 4), (3, 2, 5), (3, 4, 1)])
def test_edges_match_an_independent_enumeration(dims):
    graph = EdgeGraph(*dims)
    want = enumerate_edges(*dims)
    assert graph.n_edges == len(want) == int(graph.valid.sum())
    names = graph.names()
    assert sorted(names) == sorted(name for name, _, _ in want)
    n_pos = dims[2]
    src = graph.edge_fields["source_node"].tolist()
    dst = graph.edge_fields["target_node"].tolist()
    by_name = {name: (s, d) for name, s, d in want}
    for i, name in enumerate(names):
        s, d = by_name[name]
        assert src[i] == s[0] * n_pos + s[1] and dst[i] == d[0] * n_pos + d[1]
    assert graph.output_node == 2 * dims[0] * n_pos + n_pos - 1


def test_names_round_trip_and_bad_names_raise():
    graph = EdgeGraph(3, 2, 5)
    for i in range(graph.n_edges):
        assert graph.index(graph.name(i)) == i
    for bad in ["a0.h0:3->2", "m2:3", "r2.attn:0", "a3.h0:0->0", "a0.h2:0->0", "x", "m0:5"]:
        with pytest.raises(KeyError):
            graph.index(bad)


def test_edge_count_at_smollm2_size():
    # 30 blocks, 9 heads, 50 tokens: about 0.3 M edges, as the issue says
    graph = EdgeGraph(30, 9, 50)
    assert graph.n_edges == 29 * (9 * 50 * 51 // 2 + 3 * 50) + 9 * 50 + 3
    assert 0.3e6 < graph.n_edges < 0.35e6


def test_in_edges_group_every_edge_by_target():
    graph = EdgeGraph(2, 3, 4)
    ptr, ids = graph.in_edges
    target = graph.edge_fields["target_node"]
    assert int(ptr[-1]) == graph.n_edges
    for node in range(graph.n_nodes):
        got = ids[ptr[node] : ptr[node + 1]]
        assert torch.equal(got, torch.nonzero(target == node).flatten())


def test_projection_to_components():
    graph = EdgeGraph(2, 2, 3)
    ids = [graph.index(n) for n in ["a0.h1:0->2", "a0.h1:1->2", "m0:1", "r1.attn:2", "m1:2"]]
    comp = project(graph, torch.tensor(ids))
    assert comp.token_names() == ["a0.h1@2", "m0@1", "m1@2"]
    assert comp.node_names() == ["a0.h1", "m0", "m1"]
    assert comp.head_sources[0, 1].tolist() == [True, True, False]
    assert bool(comp.resid[1, 0, 2]) and int(comp.resid.sum()) == 1


def test_node_names():
    graph = EdgeGraph(2, 1, 3)
    assert [graph.node_name(n) for n in (0, 2, 3, 7, graph.output_node)] == [
        "emb@0",
        "emb@2",
        "attn0@0",
        "mlp0@1",
        "mlp1@2",
    ]


def test_names_in_bulk_match_one_by_one():
    graph = EdgeGraph(3, 2, 4)
    assert graph.names() == [graph.name(i) for i in range(graph.n_edges)]
    assert graph.names(torch.tensor([5, 0])) == [graph.name(5), graph.name(0)]
    with pytest.raises(IndexError):
        graph.names([graph.n_edges])
