"""The node graph: one node per head and per MLP, ordered by layer, MIB-style names."""

from __future__ import annotations

import pytest
import torch

import strace_lens as sl
from strace_lens.graph import Node


def test_tiny_graph_order_names_and_kinds(tiny):
    graph = sl.NodeGraph.from_model(tiny)
    assert len(graph) == 3 * (4 + 1) == 15
    assert graph.names[:6] == ["a0.h0", "a0.h1", "a0.h2", "a0.h3", "m0", "a1.h0"]
    assert graph.names[-1] == "m2"
    assert graph[7] == Node("a1.h2", 1, "attn", 2)
    assert graph[9] == Node("m1", 1, "mlp", None)
    assert graph[7].hook_name == "blocks.1.attn.hook_z"
    assert graph[9].hook_name == "blocks.1.hook_mlp_out"
    assert all(node.hook_name in tiny.hook_dict for node in graph)
    assert graph.layers.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert graph.is_attn.tolist() == ([True] * 4 + [False]) * 3
    assert [n.name for n in graph] == graph.names
    for layer in range(3):
        assert graph.mlp_index(layer) == graph.index(f"m{layer}")
        for head in range(4):
            assert graph.attn_index(layer, head) == graph.index(f"a{layer}.h{head}")
    assert graph.to_dict() == {"n_layers": 3, "n_heads": 4}


def test_index_and_masks(tiny):
    graph = sl.NodeGraph.from_model(tiny)
    assert graph.index("a2.h1") == 11
    assert graph.index(graph[11]) == 11
    assert graph.index(11) == 11
    assert graph.indices(["m0", 0, graph[14]]) == [4, 0, 14]
    mask = graph.mask_from_nodes(["a0.h3", "m1", "a2.h0"])
    assert mask.dtype == torch.bool and mask.sum() == 3 and mask[[3, 9, 10]].all()
    assert graph.nodes_from_mask(mask) == ["a0.h3", "m1", "a2.h0"]
    assert graph.nodes_from_mask(mask.float()) == ["a0.h3", "m1", "a2.h0"]


def test_clear_errors(tiny):
    graph = sl.NodeGraph.from_model(tiny)
    with pytest.raises(KeyError, match=r"a5\.h0"):
        graph.index("a5.h0")
    with pytest.raises(IndexError, match=r"\[0, 15\)"):
        graph.index(15)
    with pytest.raises(IndexError):
        graph.index(-1)
    with pytest.raises(TypeError, match="not bool"):
        graph.index(True)
    with pytest.raises(ValueError, match=r"shape \(15,\)"):
        graph.nodes_from_mask(torch.ones(14))
    with pytest.raises(TypeError, match="TransformerLens model"):
        sl.NodeGraph.from_model(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="at least one layer"):
        sl.NodeGraph(n_layers=0, n_heads=4)


def test_graph_of_another_shape():
    graph = sl.NodeGraph(n_layers=2, n_heads=9)
    assert len(graph) == 20
    assert graph.names[9] == "m0" and graph.names[10] == "a1.h0"
