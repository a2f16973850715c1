"""Token granularity (strace_lens/edges/token_level.py) against node and edge ablation."""

from __future__ import annotations

import inspect

import pytest
import torch

from strace_lens.ablation import MeanAblation
from strace_lens.edges import (
    EdgeGraph,
    EdgeMasks,
    TokenGraph,
    graph_for,
    run_with_edge_masks,
    run_with_token_mask,
)
from strace_lens.graph import NodeGraph
from strace_lens.inputs import tokenize
from strace_lens.masked_forward import run_with_mask


def _tokens(t: int = 6) -> torch.Tensor:
    return torch.randint(0, 50, (1, t), generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("mean", [False, True])
def test_constant_token_mask_is_the_node_mask(tiny64, mean):
    tokens = _tokens()
    ablation = None
    if mean:
        ref = torch.randint(0, 50, (3, 8), generator=torch.Generator().manual_seed(1))
        ablation = MeanAblation.from_prompts(tiny64, ref)
    nodes = NodeGraph.from_model(tiny64)
    gen = torch.Generator().manual_seed(0)
    node_mask = torch.rand(2, len(nodes), generator=gen, dtype=torch.float64)
    want = run_with_mask(tiny64, tokens, node_mask, ablation)
    token_mask = node_mask[:, :, None].expand(-1, -1, tokens.shape[1])
    got = run_with_token_mask(tiny64, tokenize(tiny64, tokens), token_mask, ablation)
    assert (got - want).abs().max() <= 1e-12


def test_one_head_at_one_position_is_all_its_attention_edges_into_it(tiny64):
    """Zeroing head h's output at query t removes exactly the edges a{l}.h{h}:{j}->{t}."""
    t = 6
    tokens = _tokens(t)
    batch = tokenize(tiny64, tokens)
    tg = TokenGraph.from_model(tiny64, t)
    mask = torch.ones(1, len(tg.node_graph), t, dtype=torch.float64)
    node, pos = tg.index("a1.h2@4")
    mask[0, node, pos] = 0.0
    got = run_with_token_mask(tiny64, batch, mask)
    eg = EdgeGraph.from_model(tiny64, t)
    keep = torch.ones(1, eg.n_edges, dtype=torch.float64)
    keep[0, [eg.index(f"a1.h2:{j}->4") for j in range(5)]] = 0.0
    want = run_with_edge_masks(tiny64, batch, EdgeMasks.from_edges(eg, keep))
    assert (got - want).abs().max() <= 1e-12
    assert (got - run_with_token_mask(tiny64, batch, torch.ones_like(mask))).abs().max() > 1e-8


def test_mlp_at_one_position_is_its_mlp_edge(tiny64):
    t = 5
    batch = tokenize(tiny64, _tokens(t))
    tg = TokenGraph.from_model(tiny64, t)
    mask = torch.ones(1, len(tg.node_graph), t, dtype=torch.float64)
    mask[0, tg.index("m0@2")[0], 2] = 0.0
    eg = EdgeGraph.from_model(tiny64, t)
    keep = torch.ones(1, eg.n_edges, dtype=torch.float64)
    keep[0, eg.index("m0:2")] = 0.0
    want = run_with_edge_masks(tiny64, batch, EdgeMasks.from_edges(eg, keep))
    assert (run_with_token_mask(tiny64, batch, mask) - want).abs().max() <= 1e-12


def test_token_graph_names_and_sizes(tiny):
    tg = graph_for(tiny, "token", 4)
    assert isinstance(tg, TokenGraph)
    assert len(tg) == 3 * 5 * 4 == len(tg.names())
    assert tg.names()[:2] == ["a0.h0@0", "a0.h0@1"]
    assert tg.index("m2@3") == (14, 3)
    assert tg.mask_from_names(["a0.h1@2"])[1, 2] == 1
    with pytest.raises(KeyError):
        tg.index("m2@4")
    assert tg.relative_size(6) == 6 / 60
    assert isinstance(graph_for(tiny, "node"), NodeGraph)
    assert isinstance(graph_for(tiny, "edge", 4), EdgeGraph)
    with pytest.raises(ValueError):
        graph_for(tiny, "edge")
    with pytest.raises(ValueError):
        inspect.unwrap(graph_for)(tiny, "layer", 3)  # its own error, not the test checker's
