"""A node subgraph of a :class:`TraceResult` as an EAP-IG / MIB graph JSON.

The format (EAP-IG's ``Graph.to_json``, read by ``Graph.from_json`` and by MIB's circuit
track) is one JSON object:

- ``cfg``: ``n_layers``, ``n_heads``, ``parallel_attn_mlp``, ``d_model``;
- ``nodes``: name -> ``{"in_graph": bool, "score": float}`` for ``input``, every
  ``a{layer}.h{head}`` and ``m{layer}``, and ``logits`` (always in the graph);
- ``edges``: name -> ``{"in_graph": bool, "score": float}`` for every edge of the model's
  residual graph: from ``input`` and every earlier head/MLP to each head (three edges,
  ``parent->a{l}.h{h}<q>``, ``<k>``, ``<v>``), to each MLP (``parent->m{l}``: the heads of its
  own layer are parents too unless the model runs attention and MLP in parallel) and to
  ``logits``.

s-Trace finds nodes, not edges, so a node circuit is expanded the way EAP-IG expands a node
circuit: every edge whose two ends are in the graph is in the graph (``input`` and ``logits``
always are). Scores: a node's is ``1 - entry / (n_candidates + 1)`` where ``entry`` is its
entry size (the smallest traced size from which it stays in the subgraph; see
``TraceResult.entry_sizes``), 1 for the input, the logits and nodes outside the candidates
(always kept), 0 for candidates never kept; an edge's is the smaller of its two ends'. So for
a nested family, keeping the edges scoring at least the score of size ``s`` gives exactly
the size-``s`` circuit, and MIB's top-k by score follows the traced order.

A top-level ``strace_lens`` key records what was exported (size, method, prompts); EAP-IG
and MIB readers ignore keys they do not know.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import Tensor

from strace_lens.atomic import write_text
from strace_lens.graph import NodeGraph
from strace_lens.result import TraceResult

EAP_IG_FORMAT_NOTE = (
    "EAP-IG Graph.to_json / MIB circuit JSON: cfg, nodes{name: in_graph, score}, "
    "edges{'parent->child[<q|k|v>]': in_graph, score}"
)

INPUT = "input"
LOGITS = "logits"


def edge_name(parent: str, child: str, qkv: str | None = None) -> str:
    """EAP-IG's edge name: ``parent->child``, or ``parent->a{l}.h{h}<q>`` into a head."""
    return f"{parent}->{child}" if qkv is None else f"{parent}->{child}<{qkv}>"


def eap_ig_edges(
    n_layers: int, n_heads: int, parallel_attn_mlp: bool = False
) -> list[tuple[str, str, str | None]]:
    """Every edge of the residual graph as ``(parent, child, qkv)``, qkv None unless into a head."""
    edges: list[tuple[str, str, str | None]] = []
    upstream = [INPUT]  # every node whose output is in the residual stream so far
    for layer in range(n_layers):
        heads = [f"a{layer}.h{head}" for head in range(n_heads)]
        mlp = f"m{layer}"
        edges += [(p, h, qkv) for p in upstream for h in heads for qkv in "qkv"]
        mlp_parents = upstream if parallel_attn_mlp else upstream + heads
        edges += [(p, mlp, None) for p in mlp_parents]
        upstream = [*upstream, *heads, mlp]
    edges += [(p, LOGITS, None) for p in upstream]
    return edges


def count_edges(n_layers: int, n_heads: int, parallel_attn_mlp: bool = False) -> int:
    """The number of edges of the residual graph (MIB's edge percentages are of this)."""
    total = 0
    upstream = 1
    for _ in range(n_layers):
        total += upstream * n_heads * 3 + upstream + (0 if parallel_attn_mlp else n_heads)
        upstream += n_heads + 1
    return total + upstream


def _row(result: TraceResult, prompt: int | None) -> int:
    if result.masks.shape[0] == 1:
        if prompt not in (None, 0) and result.per != "dataset":
            raise IndexError(f"Prompt {prompt} is outside this one-prompt result.")
        return 0
    if prompt is None:
        raise ValueError(
            f"This is a per-input result ({result.n_prompts} prompts, one subgraph each): an "
            "EAP-IG graph holds one circuit, so pass prompt=i to export prompt i's, or trace "
            "with per='dataset' for one shared circuit."
        )
    if not 0 <= prompt < result.n_prompts:
        raise IndexError(f"Prompt {prompt} is outside [0, {result.n_prompts}).")
    return prompt


def _size_index(result: TraceResult, size: int | None) -> int:
    if size is None:
        if len(result.sizes) == 1:
            return 0
        raise ValueError(
            f"Pass size=: this result holds subgraphs of sizes {result.sizes.tolist()}."
        )
    return result.size_index(size)


def _cfg(
    result: TraceResult, d_model: int | None, parallel_attn_mlp: bool | None
) -> dict[str, Any]:
    model = result.options.get("model") or {}
    if d_model is None:
        d_model = model.get("d_model")
    if d_model is None:
        raise ValueError(
            "The result does not record the model's d_model (traced before it was recorded?): "
            "pass d_model=."
        )
    if parallel_attn_mlp is None:
        parallel_attn_mlp = bool(model.get("parallel_attn_mlp", False))
    return {
        "n_layers": result.graph.n_layers,
        "n_heads": result.graph.n_heads,
        "parallel_attn_mlp": bool(parallel_attn_mlp),
        "d_model": int(d_model),
    }


def node_scores(result: TraceResult, row: int = 0) -> dict[str, float]:
    """Each node's export score (see the module docstring), input and logits included."""
    entry = result.entry_sizes()[row]
    denominator = result.n_candidates + 1
    scores = {INPUT: 1.0}
    for i, name in enumerate(result.graph.names):
        if not bool(result.candidates[i]):
            scores[name] = 1.0
        elif math.isnan(float(entry[i])):
            scores[name] = 0.0
        else:
            scores[name] = 1.0 - float(entry[i]) / denominator
    scores[LOGITS] = 1.0
    return scores


def graph_json(
    graph: NodeGraph,
    cfg: dict[str, Any],
    kept: Iterable[str],
    scores: dict[str, float] | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The EAP-IG JSON object of the node circuit ``kept`` (names of heads and MLPs)."""
    kept_set = set(kept)
    unknown = kept_set - set(graph.names)
    if unknown:
        raise KeyError(f"Not nodes of this graph: {sorted(unknown)}.")
    in_graph = {INPUT: True, LOGITS: True, **{name: name in kept_set for name in graph.names}}
    score = scores or {name: float(flag) for name, flag in in_graph.items()}
    nodes: dict[str, dict[str, Any]] = {}
    for name in [INPUT, *graph.names, LOGITS]:
        nodes[name] = {"in_graph": in_graph[name]}
        if scores is not None and name != LOGITS:
            nodes[name]["score"] = score[name]
    edges = {
        edge_name(p, c, qkv): {
            "score": min(score[p], score[c]),
            "in_graph": in_graph[p] and in_graph[c],
        }
        for p, c, qkv in eap_ig_edges(cfg["n_layers"], cfg["n_heads"], cfg["parallel_attn_mlp"])
    }
    out: dict[str, Any] = {"cfg": cfg, "nodes": nodes, "edges": edges}
    if meta is not None:
        out["strace_lens"] = meta
    return out


def eap_ig_graph(
    result: TraceResult,
    size: int | None = None,
    *,
    prompt: int | None = None,
    d_model: int | None = None,
    parallel_attn_mlp: bool | None = None,
) -> dict[str, Any]:
    """The EAP-IG JSON object (a dict) of the size-``size`` subgraph; see :func:`to_eap_ig`."""
    row, j = _row(result, prompt), _size_index(result, size)
    cfg = _cfg(result, d_model, parallel_attn_mlp)
    mask: Tensor = result.masks[row, j]
    kept = result.graph.nodes_from_mask(mask)
    meta = {
        "size": int(result.sizes[j]),
        "n_candidates": result.n_candidates,
        "nodes": kept,
        "method": result.method,
        "per": result.per,
        "prompt": None if result.masks.shape[0] == 1 else row,
        "n_prompts": result.n_prompts,
        "model": result.options.get("model"),
        "ablation": result.options.get("ablation"),
        "edges_in_graph": None,  # filled below
        "score": "node: 1 - entry_size / (n_candidates + 1); edge: min of its two nodes",
    }
    out = graph_json(result.graph, cfg, kept, node_scores(result, row), meta)
    meta["edges_in_graph"] = sum(1 for e in out["edges"].values() if e["in_graph"])
    return out


def write_json(data: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``data`` as JSON at ``path`` atomically (temporary file, then rename)."""
    return write_text(path, json.dumps(data))


def to_eap_ig(
    result: TraceResult,
    path: str | os.PathLike[str],
    size: int | None = None,
    *,
    prompt: int | None = None,
    d_model: int | None = None,
    parallel_attn_mlp: bool | None = None,
) -> Path:
    """Write the size-``size`` subgraph of ``result`` as an EAP-IG / MIB graph JSON file.

    Args:
        result: a per-dataset result (one circuit for all prompts), or a per-input one with
            ``prompt=``.
        path: the ``.json`` file to write (parent folders are created; written atomically).
        size: one of ``result.sizes`` (may be omitted when there is only one).
        prompt: for a per-input result, whose subgraph to export.
        d_model: the model's width, for ``cfg`` (default: recorded in the result's options).
        parallel_attn_mlp: whether attention and MLP read the same residual stream (GPT-J,
            Pythia); decides whether the heads of a layer feed its MLP. Default: recorded in
            the result's options, else False (Gemma, Llama, Qwen, GPT-2).

    Returns:
        The path written. The file's nodes in the graph are exactly the subgraph's nodes
        (plus ``input`` and ``logits``); its edges in the graph are those between them.
    """
    data = eap_ig_graph(
        result, size, prompt=prompt, d_model=d_model, parallel_attn_mlp=parallel_attn_mlp
    )
    return write_json(data, path)


__all__ = [
    "EAP_IG_FORMAT_NOTE",
    "count_edges",
    "eap_ig_edges",
    "eap_ig_graph",
    "edge_name",
    "graph_json",
    "node_scores",
    "to_eap_ig",
    "write_json",
]
