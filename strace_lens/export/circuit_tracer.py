"""An edge-level result as a circuit-tracer attribution-graph JSON (``to_circuit_tracer``).

circuit-tracer (safety-research/circuit-tracer) writes one JSON per graph, which its local
viewer and Neuronpedia load: ``metadata`` (``slug``, ``scan``, ``transcoder_list``,
``prompt_tokens``, ``prompt``, ``node_threshold``, ``schema_version``), ``qParams``
(``pinnedIds``, ``supernodes``, ``linkType``, ``clickedId``, ``sg_pos``), ``nodes`` (each with
``node_id``, ``feature``, ``layer`` as a string, ``ctx_idx``, ``feature_type``,
``token_prob``, ``is_target_logit``, ``run_idx``, ``reverse_ctx_idx``, ``jsNodeId``,
``clerp``, ``influence``, ``activation``) and ``links`` (``source``, ``target``, ``weight``;
node ids). This module writes that schema (version 1) for one prompt's subgraph of an
:class:`~strace_lens.edges.EdgeTraceResult`, the paper's token-level graph.

How s-Trace's graph maps onto it. A node of the token-level graph is a residual-stream state
(graph layer, position); circuit-tracer's nodes are features at (layer, position):

- the input embedding at position t: ``feature_type="embedding"``, ``layer="E"``,
  ``feature=t`` (as circuit-tracer's token nodes), id ``E_{t}_{t}`` (circuit-tracer puts the
  token's vocabulary id in the middle; a result stores positions, not token ids);
- the state after block l's attention (``resid_mid``) and after its MLP (``resid_post``):
  ``feature_type="cross layer transcoder"`` (the viewer's generic feature node), layer
  ``str(l)``, feature 0 (after attention) or 1 (after MLP), id ``{l}_{feature}_{t}``, and a
  ``clerp`` naming the state (``attn3@5``, the name :class:`EdgeGraph` uses);
- the output (the last state at the last position): ``feature_type="logit"``, layer
  ``str(n_layers + 1)``, ``feature`` = the full model's top token id, ``is_target_logit``.

Links: every kept edge becomes a link from its source state to its target state. Several
edges can join the same two states (the heads of one layer between two positions, an MLP and
its skip path); they become one link, whose ``edges`` field lists their s-Trace names. Link
weights: a result holds which edges a subgraph keeps and, for a nested family, the order they
entered; it holds no attribution weights (those need the model). So by default a link's
weight is the entry order of its earliest edge, ``1 - rank / k`` (1 for the first edge of a
k-edge subgraph, towards 0 for the last; 1 for every edge of a non-nested family), and
``metadata["weight"]`` says so. Pass ``weights`` (one per edge of the prompt's graph, e.g. from
:func:`strace_lens.edges.weights.edge_weights`) to write those instead; parallel edges then add.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from strace_lens.atomic import write_text
from strace_lens.edges.graph import EdgeGraph
from strace_lens.edges.result import EdgeTraceResult

SCHEMA_VERSION = 1
WEIGHT_ENTRY_ORDER = "entry order: 1 - rank / k of the link's earliest edge (no attribution)"
WEIGHT_GIVEN = "the weights passed to to_circuit_tracer, summed over a link's edges"


def to_circuit_tracer(
    result: Any,
    path: str | os.PathLike[str],
    prompt: int = 0,
    size: float | None = None,
    *,
    weights: Float[Tensor, " edge"] | None = None,
    tokens: Sequence[str] | None = None,
    slug: str | None = None,
) -> Path:
    """Write prompt ``prompt``'s subgraph of relative size ``size`` as circuit-tracer JSON.

    Args:
        result: an :class:`~strace_lens.edges.EdgeTraceResult` (``edge_trace``'s result).
        path: the ``.json`` file to write (parent folders are created; written atomically).
        prompt: which prompt.
        size: a relative size on the result's grid (``result.grid``); default: the smallest
            whose subgraph predicts the full model's top-1 token, else the largest.
        weights: optional link weights, one per edge of the prompt's graph (compact ids);
            default: the entry order (see the module docstring).
        tokens: the prompt's tokens as text, for ``metadata.prompt_tokens`` (e.g.
            ``model.to_str_tokens(prompt)``); default: ``<0>``, ``<1>``, ...
        slug: the graph's name in the viewer (default ``strace-lens-p{prompt}-s{size}``).

    Returns the path written.
    """
    if not isinstance(result, EdgeTraceResult):
        raise TypeError(
            f"to_circuit_tracer writes an edge-level result (EdgeTraceResult, from "
            f"strace_lens.edges.edge_trace); got {type(result).__name__}. A node-level "
            "TraceResult has no positions or edges: export it with to_eap_ig or to_mib."
        )
    doc = circuit_tracer_graph(result, prompt, size, weights=weights, tokens=tokens, slug=slug)
    return write_text(path, json.dumps(doc))


def circuit_tracer_graph(
    result: EdgeTraceResult,
    prompt: int = 0,
    size: float | None = None,
    *,
    weights: Float[Tensor, " edge"] | None = None,
    tokens: Sequence[str] | None = None,
    slug: str | None = None,
) -> dict[str, Any]:
    """The JSON document :func:`to_circuit_tracer` writes, as a dict."""
    if not 0 <= prompt < result.n_prompts:
        raise IndexError(f"prompt={prompt} is outside this result's {result.n_prompts} prompts.")
    j = _grid_index(result, prompt, size)
    graph = result.graph(prompt)
    kept = result.subgraph(prompt, j)
    if weights is not None and tuple(weights.shape) != (graph.n_edges,):
        raise ValueError(
            f"weights has shape {tuple(weights.shape)}; prompt {prompt}'s graph has "
            f"{graph.n_edges} edges: give one weight per edge (compact ids)."
        )
    n_pos = graph.n_pos
    if tokens is not None and len(tokens) != n_pos:
        raise ValueError(f"{len(tokens)} tokens given; prompt {prompt} has {n_pos} positions.")
    token_names = (
        [str(t) for t in tokens] if tokens is not None else [f"<{t}>" for t in range(n_pos)]
    )
    top = int(result.full_top_tokens[prompt])
    links = _links(graph, kept, weights)
    used = sorted({n for link in links.values() for n in (link["_s"], link["_t"])})
    nodes = {n: _node(graph, n, top) for n in used}
    grid_size = float(result.grid[j])
    doc: dict[str, Any] = {
        "metadata": {
            "slug": slug or f"strace-lens-p{prompt}-s{grid_size:g}",
            "scan": str(result.options.get("model", "strace-lens")),
            "transcoder_list": [],
            "prompt_tokens": token_names,
            "prompt": result.prompts[prompt],
            "node_threshold": None,
            "schema_version": SCHEMA_VERSION,
            "weight": WEIGHT_GIVEN if weights is not None else WEIGHT_ENTRY_ORDER,
            "strace_lens": {
                "relative_size": grid_size,
                "edges": len(kept),
                "of_edges": graph.n_edges,
                **{k: float(v[prompt, j]) for k, v in result.metrics.items()},
            },
        },
        "qParams": {
            "pinnedIds": [],
            "supernodes": [],
            "linkType": "both",
            "clickedId": "",
            "sg_pos": "",
        },
        "nodes": list(nodes.values()),
        "links": [
            {
                "source": nodes[link["_s"]]["node_id"],
                "target": nodes[link["_t"]]["node_id"],
                "weight": link["weight"],
                "edges": link["edges"],
            }
            for link in links.values()
        ],
    }
    return doc


def _grid_index(result: EdgeTraceResult, prompt: int, size: float | None) -> int:
    grid = [float(g) for g in result.grid]
    if size is None:
        top1 = result.metrics.get("top1")
        agrees = [] if top1 is None else torch.nonzero(top1[prompt] > 0.5).flatten().tolist()
        return int(agrees[0]) if agrees else len(grid) - 1
    for j, g in enumerate(grid):
        if abs(g - float(size)) <= 1e-9 * max(1.0, abs(g)):
            return j
    raise ValueError(f"size={size} is not on the result's grid {grid}: choose one of those.")


def _links(
    graph: EdgeGraph, kept: Tensor, weights: Tensor | None
) -> dict[tuple[int, int], dict[str, Any]]:
    """One link per (source state, target state) pair of the kept edges, in entry order."""
    fields = graph.edge_fields
    names = graph.names(kept)
    k = max(len(kept), 1)
    links: dict[tuple[int, int], dict[str, Any]] = {}
    for rank, (edge, name) in enumerate(zip(kept.tolist(), names)):
        s, t = int(fields["source_node"][edge]), int(fields["target_node"][edge])
        link = links.setdefault((s, t), {"_s": s, "_t": t, "weight": 0.0, "edges": []})
        link["edges"].append(name)
        if weights is not None:
            link["weight"] += float(weights[edge])
        else:
            link["weight"] = max(link["weight"], 1.0 - rank / k)
    return links


def _node(graph: EdgeGraph, node: int, top_token: int) -> dict[str, Any]:
    """circuit-tracer's node record for one residual-stream state (see module docstring)."""
    g, t = divmod(node, graph.n_pos)
    base: dict[str, Any] = {
        "ctx_idx": t,
        "token_prob": 0.0,
        "is_target_logit": False,
        "run_idx": 0,
        "reverse_ctx_idx": 0,
        "clerp": graph.node_name(node),
        "influence": None,
        "activation": None,
    }
    if node == graph.output_node:
        logit_layer = str(graph.n_layers + 1)
        return {
            **base,
            "node_id": f"{logit_layer}_{top_token}_{t}",
            "feature": top_token,
            "layer": logit_layer,
            "feature_type": "logit",
            "is_target_logit": True,
            "jsNodeId": f"L_{top_token}-{t}",
            "clerp": f"output at {t} ({graph.node_name(node)}); full model's top token id "
            f"{top_token}",
        }
    if g == 0:
        return {
            **base,
            "node_id": f"E_{t}_{t}",
            "feature": t,
            "layer": "E",
            "feature_type": "embedding",
            "jsNodeId": f"E_{t}-{t}",
        }
    layer, feature = (g - 1) // 2, (g - 1) % 2  # feature 0: after attention, 1: after MLP
    return {
        **base,
        "node_id": f"{layer}_{feature}_{t}",
        "feature": feature,
        "layer": str(layer),
        "feature_type": "cross layer transcoder",
        "jsNodeId": f"{layer}_{feature}-{t}",
    }


__all__ = ["SCHEMA_VERSION", "circuit_tracer_graph", "to_circuit_tracer"]
