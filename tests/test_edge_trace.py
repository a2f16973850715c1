"""edge_trace (strace_lens/edges/trace.py) and EdgeTraceResult storage."""

from __future__ import annotations

import inspect

import pytest
import torch

from strace_lens.edges import (
    PAPER_GRID,
    EdgeGraph,
    EdgeMasks,
    EdgeTraceResult,
    edge_tokenize,
    edge_trace,
    run_with_edge_masks,
)
from strace_lens.metrics import tv_distance
from strace_lens.tiny_model import tiny_model

PROMPTS = ["The cat sat", "Paris is the"]


@pytest.fixture(scope="module")
def byte_tiny():
    """The native:tiny model (byte tokenizer, strings accepted), in float64."""
    return tiny_model(device="cpu", dtype=torch.float64)


@pytest.fixture(scope="module")
def greedy_result(byte_tiny):
    return edge_trace(byte_tiny, PROMPTS)


def test_greedy_family_is_nested_with_paper_counts(byte_tiny, greedy_result):
    r = greedy_result
    assert r.nested and r.grid == PAPER_GRID
    for p in range(r.n_prompts):
        e = r.n_edges(p)
        assert r.counts[p].tolist() == [int(s * e) for s in PAPER_GRID]
        for i in range(len(PAPER_GRID) - 1):
            small, big = set(r.subgraph(p, i).tolist()), set(r.subgraph(p, i + 1).tolist())
            assert small <= big and len(small) == int(r.counts[p, i])
        assert sorted(r.subgraph(p, len(PAPER_GRID) - 1).tolist()) == list(range(e))
    # the full graph reproduces the model
    assert r.metrics["tv"][:, -1].abs().max() == 0
    assert bool((r.metrics["top1"][:, -1] == 1).all())


def test_metrics_are_those_of_the_stored_subgraphs(byte_tiny, greedy_result):
    r = greedy_result
    p, i = 1, 20
    graph = r.graph(p)
    batch = edge_tokenize(byte_tiny, PROMPTS[p])
    assert batch.tokens.shape[1] == graph.n_pos
    keep = graph.keep_mask(r.subgraph(p, i))[None].double()
    logp = run_with_edge_masks(byte_tiny, batch, EdgeMasks.from_edges(graph, keep))
    full = run_with_edge_masks(byte_tiny, batch, EdgeMasks.from_edges(graph, torch.ones_like(keep)))
    tv = tv_distance(full, logp)
    assert abs(float(tv[0]) - float(r.metrics["tv"][p, i])) <= 1e-6
    assert int(logp.argmax()) == int(r.top_tokens[p, i])


def test_attention_semantics_differ(byte_tiny, greedy_result):
    kept = edge_trace(byte_tiny, PROMPTS, ablate_attention_edges=False)
    # the same ranking (weights do not depend on the semantics), other fidelity
    assert torch.equal(kept.ids, greedy_result.ids)
    assert not torch.equal(kept.metrics["tv"], greedy_result.metrics["tv"])
    assert kept.options["ablate_attention_edges"] is False


def test_random_families(byte_tiny):
    grid = [0.01, 0.1, 0.5, 1.0]
    r = edge_trace(byte_tiny, PROMPTS, method="random", sizes=grid, seed=3)
    assert not r.nested
    for p in range(2):
        for i, s in enumerate(grid):
            ids = r.subgraph(p, i)
            assert len(ids) == int(s * r.n_edges(p)) == len(set(ids.tolist()))
    first = edge_trace(
        byte_tiny, PROMPTS, method="random", sizes=grid, random_variant="resid_mlp_first"
    )
    graph = first.graph(0)
    kinds = graph.edge_fields["kind"]
    n_other = int((kinds != 0).sum())
    for i in range(len(grid)):
        ids = first.subgraph(0, i)
        if len(ids) <= n_other:
            assert bool((kinds[ids] != 0).all())
        else:
            assert int((kinds[ids] != 0).sum()) == n_other
    again = edge_trace(byte_tiny, PROMPTS, method="random", sizes=grid, seed=3)
    assert torch.equal(again.ids, r.ids)


def test_save_load_round_trip_and_checksum(tmp_path, greedy_result):
    r = greedy_result
    folder = r.save(tmp_path / "res")
    back = EdgeTraceResult.load(folder)
    assert back.grid == r.grid and back.prompts == r.prompts and back.nested
    for name in ("n_pos", "counts", "ids", "offsets", "top_tokens", "full_top_tokens"):
        assert torch.equal(getattr(back, name), getattr(r, name).to(getattr(back, name).dtype))
    assert torch.equal(back.metrics["tv"], r.metrics["tv"].float())
    assert back.edge_names(1, 22) == r.edge_names(1, 22)
    assert back.components(0, 25).node_names() == r.components(0, 25).node_names()
    data = (folder / "edges.safetensors").read_bytes()
    (folder / "edges.safetensors").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ValueError, match="checksum"):
        EdgeTraceResult.load(folder)


def test_bad_options_raise(byte_tiny):
    with pytest.raises(ValueError, match="method"):
        inspect.unwrap(edge_trace)(byte_tiny, PROMPTS, method="bogus")
    with pytest.raises(ValueError, match="ascending"):
        edge_trace(byte_tiny, PROMPTS, sizes=[0.5, 0.1])
    with pytest.raises(ValueError, match="convention"):
        inspect.unwrap(edge_trace)(byte_tiny, PROMPTS, tokens="bpe")


def test_graph_of_stored_result_matches_prompt_length(byte_tiny, greedy_result):
    for p, prompt in enumerate(PROMPTS):
        n = edge_tokenize(byte_tiny, prompt).tokens.shape[1]
        assert greedy_result.graph(p) == EdgeGraph(3, 4, n)


@pytest.mark.integration
def test_smollm2_paper_trace_on_a_short_prompt(smollm2):
    r = edge_trace(smollm2, "The capital of France is")
    n_pos = int(r.n_pos[0])
    # the paper's tokens: no BOS for SmolLM2
    assert n_pos == len(smollm2.tokenizer("The capital of France is")["input_ids"]) - 1
    graph = r.graph(0)
    assert graph == EdgeGraph(30, 9, n_pos)
    assert r.counts[0].tolist() == [int(s * graph.n_edges) for s in PAPER_GRID]
    assert float(r.metrics["tv"][0, -1]) == 0.0 and float(r.metrics["nucleus"][0, -1]) == 99
    # the empty-ish subgraphs are far from the model, the full one is the model
    assert float(r.metrics["tv"][0, 0]) > 0.5
    comp = r.components(0, len(PAPER_GRID) - 1)
    assert len(comp.node_names()) == 30 * 10
