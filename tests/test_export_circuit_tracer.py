"""to_circuit_tracer (issue 17, item 4): an edge-level subgraph as circuit-tracer graph JSON,
read back by a reader written from circuit-tracer's schema (frontend/graph_models.py:
Metadata, QParams, Node, Link), and compared with a mapping worked out from the edge names."""

from __future__ import annotations

import json
import re

import pytest
import torch

from strace_lens.edges import EdgeTraceResult
from strace_lens.edges.graph import EdgeGraph
from strace_lens.export import to_circuit_tracer

N_LAYERS, N_HEADS, N_POS = 2, 2, 3
TOP = 42  # the full model's top token id

# circuit-tracer's schema, version 1: field -> type (Node's optional fields may be None)
METADATA = {
    "slug": str,
    "scan": str,
    "transcoder_list": list,
    "prompt_tokens": list,
    "prompt": str,
}
QPARAMS = {"pinnedIds": list, "supernodes": list, "linkType": str, "clickedId": str, "sg_pos": str}
NODE = {
    "node_id": str,
    "feature": int,
    "layer": str,
    "ctx_idx": int,
    "feature_type": str,
    "token_prob": float,
    "is_target_logit": bool,
    "run_idx": int,
    "reverse_ctx_idx": int,
    "jsNodeId": str,
    "clerp": str,
}
FEATURE_TYPES = {"cross layer transcoder", "mlp reconstruction error", "embedding", "logit"}


def read_circuit_tracer(path) -> tuple[dict, dict[str, dict], list[dict]]:
    """A reader from the schema: checks every required field and its type, that node ids are
    unique and that links join existing nodes; returns (metadata, nodes by id, links)."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert set(doc) >= {"metadata", "qParams", "nodes", "links"}
    for spec, block in ((METADATA, doc["metadata"]), (QPARAMS, doc["qParams"])):
        for key, kind in spec.items():
            assert isinstance(block[key], kind), key
    assert doc["metadata"].get("schema_version", 1) == 1
    nodes: dict[str, dict] = {}
    for node in doc["nodes"]:
        for key, kind in NODE.items():
            assert isinstance(node[key], kind), (key, node)
        assert node["feature_type"] in FEATURE_TYPES
        assert node["node_id"] not in nodes
        nodes[node["node_id"]] = node
    for link in doc["links"]:
        assert link["source"] in nodes and link["target"] in nodes
        assert isinstance(link["weight"], float)
    return doc["metadata"], nodes, doc["links"]


def state_id(kind: str, layer: int, pos: int) -> str:
    """circuit-tracer id of a residual state, as the module docstring maps them."""
    if kind == "emb":
        return f"E_{pos}_{pos}"
    if kind == "post" and layer == N_LAYERS - 1 and pos == N_POS - 1:
        return f"{N_LAYERS + 1}_{TOP}_{pos}"
    return f"{layer}_{0 if kind == 'mid' else 1}_{pos}"


def expected_pair(name: str) -> tuple[str, str]:
    """(source, target) ids of an edge, from its name alone."""
    if m := re.fullmatch(r"a(\d+)\.h\d+:(\d+)->(\d+)", name):
        layer, j, t = map(int, m.groups())
        src = state_id("emb", 0, j) if layer == 0 else state_id("post", layer - 1, j)
        return src, state_id("mid", layer, t)
    if m := re.fullmatch(r"r(\d+)\.attn:(\d+)", name):
        layer, t = map(int, m.groups())
        src = state_id("emb", 0, t) if layer == 0 else state_id("post", layer - 1, t)
        return src, state_id("mid", layer, t)
    m = re.fullmatch(r"(?:m|r)(\d+)(?:\.mlp)?:(\d+)", name)
    assert m, name
    layer, t = map(int, m.groups())
    return state_id("mid", layer, t), state_id("post", layer, t)


@pytest.fixture
def result() -> EdgeTraceResult:
    graph = EdgeGraph(N_LAYERS, N_HEADS, N_POS)
    n_edges = graph.n_edges
    ranking = torch.randperm(n_edges, generator=torch.Generator().manual_seed(0))
    grid = (0.25, 0.5, 1.0)
    counts = torch.tensor([[int(g * n_edges) for g in grid]])
    metrics = {
        "tv": torch.tensor([[0.5, 0.1, 0.0]]),
        "kl": torch.tensor([[1.0, 0.2, 0.0]]),
        "nucleus": torch.tensor([[40.0, 80.0, 100.0]]),
        "top1": torch.tensor([[0.0, 1.0, 1.0]]),
    }
    return EdgeTraceResult(
        n_layers=N_LAYERS,
        n_heads=N_HEADS,
        grid=grid,
        n_pos=torch.tensor([N_POS]),
        counts=counts,
        nested=True,
        ids=ranking.int(),
        offsets=torch.tensor([0, n_edges]),
        metrics=metrics,
        entropy=torch.tensor([1.5]),
        top_tokens=torch.tensor([[7, TOP, TOP]]),
        full_top_tokens=torch.tensor([TOP]),
        prompts=["a b c"],
        options={"model": "tiny"},
    )


def test_round_trip_links_are_the_kept_edges_between_their_states(result, tmp_path):
    path = to_circuit_tracer(result, tmp_path / "sub" / "graph.json", size=0.5)
    meta, nodes, links = read_circuit_tracer(path)
    kept = result.edge_names(0, 1)
    assert len(kept) == int(0.5 * result.n_edges(0)) > 0
    # every kept edge sits in exactly one link, the one joining its source and target states
    listed = [name for link in links for name in link["edges"]]
    assert sorted(listed) == sorted(kept)
    for link in links:
        for name in link["edges"]:
            assert (link["source"], link["target"]) == expected_pair(name)
    # the nodes are exactly the states these edges touch, with layer and position
    touched = {i for name in kept for i in expected_pair(name)}
    assert set(nodes) == touched
    for node in nodes.values():
        assert node["ctx_idx"] == int(node["node_id"].rsplit("_", 1)[1])
    out = nodes[state_id("post", N_LAYERS - 1, N_POS - 1)]  # half the edges reach the output
    assert out["feature_type"] == "logit" and out["is_target_logit"]
    assert out["layer"] == str(N_LAYERS + 1) and out["feature"] == TOP
    assert [n for n in nodes.values() if n["feature_type"] == "logit"] == [out]
    # weights: entry order of each link's earliest edge
    rank = {name: r for r, name in enumerate(kept)}
    for link in links:
        best = min(rank[name] for name in link["edges"])
        assert link["weight"] == pytest.approx(1 - best / len(kept))
    assert meta["prompt_tokens"] == ["<0>", "<1>", "<2>"]
    assert meta["strace_lens"]["relative_size"] == 0.5
    assert meta["strace_lens"]["edges"] == len(kept)
    assert "entry order" in meta["weight"]


def test_given_weights_add_over_parallel_edges_and_default_size_is_first_top1(result, tmp_path):
    graph = result.graph(0)
    weights = torch.arange(graph.n_edges, dtype=torch.float32) / 10
    path = to_circuit_tracer(result, tmp_path / "g.json", weights=weights, tokens=["a", " b", " c"])
    meta, _, links = read_circuit_tracer(path)
    # default size: the smallest whose top-1 agrees with the full model (0.5 here)
    assert meta["strace_lens"]["relative_size"] == 0.5
    assert meta["prompt_tokens"] == ["a", " b", " c"]
    for link in links:
        ids = [graph.index(name) for name in link["edges"]]
        assert link["weight"] == pytest.approx(sum(i / 10 for i in ids), abs=1e-5)
    assert any(len(link["edges"]) > 1 for link in links)  # heads of a layer share a link


def test_bad_arguments_say_what_to_do(result, tmp_path):
    with pytest.raises(ValueError, match=r"not on the result's grid"):
        to_circuit_tracer(result, tmp_path / "g.json", size=0.3)
    with pytest.raises(ValueError, match="one weight per edge"):
        to_circuit_tracer(result, tmp_path / "g.json", weights=torch.ones(3))
    with pytest.raises(IndexError, match="prompt=1"):
        to_circuit_tracer(result, tmp_path / "g.json", prompt=1)
    with pytest.raises(TypeError, match="to_eap_ig"):
        to_circuit_tracer(object(), tmp_path / "g.json")
    assert not list(tmp_path.iterdir())
