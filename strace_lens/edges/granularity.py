"""The three granularities of a subgraph, and the graph that counts each one's units.

- ``"node"``: every attention head and MLP (:class:`~strace_lens.graph.NodeGraph`, masks
  ``[row, node]``), what strace-lens traces today.
- ``"token"``: every head and MLP at every position (:class:`TokenGraph`, masks
  ``[row, node, pos]``).
- ``"edge"``: the paper's graph (:class:`EdgeGraph`, masks over edges; see graph.py).

Sizes are counted in each granularity's units and relative sizes are over ``len(graph)``.
"""

from __future__ import annotations

from typing import Any

from strace_lens.edges.graph import EdgeGraph
from strace_lens.edges.token_level import TokenGraph
from strace_lens.graph import NodeGraph
from strace_lens.types import GRANULARITIES, Granularity


def graph_for(
    model: Any, granularity: Granularity, n_pos: int | None = None
) -> NodeGraph | TokenGraph | EdgeGraph:
    """The graph of ``model`` at ``granularity`` (token and edge need the prompt's length)."""
    if granularity == "node":
        return NodeGraph.from_model(model)
    if granularity not in GRANULARITIES:
        raise ValueError(f"Unknown granularity {granularity!r}: one of {GRANULARITIES}.")
    if n_pos is None or n_pos < 1:
        raise ValueError(f"The {granularity} graph depends on the prompt: give its n_pos.")
    if granularity == "token":
        return TokenGraph.from_model(model, n_pos)
    return EdgeGraph.from_model(model, n_pos)
