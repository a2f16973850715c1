"""Projecting an edge subgraph onto components: which heads and MLPs it uses, and where.

An attention edge ``a{l}.h{h}:{j}->{t}`` uses head (l, h) at query position t, reading
position j; an MLP edge ``m{l}:{t}`` uses MLP l at position t. Residual edges use no
component. Token-level names are ``a{l}.h{h}@{t}`` and ``m{l}@{t}``; node-level names are the
package's usual ``a{l}.h{h}`` and ``m{l}`` (a component used at any position).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from strace_lens.edges.graph import EdgeGraph


@dataclass
class EdgeComponents:
    """The components an edge subgraph touches."""

    #: head (l, h) used at query position t
    heads: Bool[Tensor, "layer head pos"]
    #: head (l, h) reading source position j
    head_sources: Bool[Tensor, "layer head pos"]
    #: MLP l used at position t
    mlps: Bool[Tensor, "layer pos"]
    #: residual edges kept, per (layer, 0 = into attention / 1 = into MLP, position)
    resid: Bool[Tensor, "layer two pos"]

    def token_names(self) -> list[str]:
        """``a{l}.h{h}@{t}`` and ``m{l}@{t}`` in layer order (heads before the MLP)."""
        names = []
        n_layers, n_heads, _ = self.heads.shape
        for layer in range(n_layers):
            for head in range(n_heads):
                for t in torch.nonzero(self.heads[layer, head]).flatten().tolist():
                    names.append(f"a{layer}.h{head}@{t}")
            for t in torch.nonzero(self.mlps[layer]).flatten().tolist():
                names.append(f"m{layer}@{t}")
        return names

    def counts(self) -> dict[str, int]:
        """How many components the subgraph touches: ``heads`` and ``mlps`` (node level: used
        at any position), ``head_positions`` and ``mlp_positions`` (token level: (head, query
        position) and (MLP, position) pairs), ``components`` = heads + mlps."""
        heads, mlps = int(self.heads.any(-1).sum()), int(self.mlps.any(-1).sum())
        return {
            "heads": heads,
            "mlps": mlps,
            "components": heads + mlps,
            "head_positions": int(self.heads.sum()),
            "mlp_positions": int(self.mlps.sum()),
        }

    def node_names(self) -> list[str]:
        """``a{l}.h{h}`` and ``m{l}`` used at any position, in the node graph's order."""
        names = []
        n_layers, n_heads, _ = self.heads.shape
        for layer in range(n_layers):
            names += [f"a{layer}.h{h}" for h in range(n_heads) if bool(self.heads[layer, h].any())]
            if bool(self.mlps[layer].any()):
                names.append(f"m{layer}")
        return names


def project(graph: EdgeGraph, edge_ids: Int[Tensor, " k"]) -> EdgeComponents:
    """The components used by the edges ``edge_ids`` (compact ids) of ``graph``."""
    f = graph.edge_fields
    ids = torch.as_tensor(edge_ids, dtype=torch.long)
    kind, layer, head = f["kind"][ids], f["layer"][ids], f["head"][ids]
    target, source = f["target"][ids], f["source"][ids]
    n_l, n_h, t = graph.n_layers, graph.n_heads, graph.n_pos
    heads = torch.zeros(n_l, n_h, t, dtype=torch.bool)
    sources = torch.zeros(n_l, n_h, t, dtype=torch.bool)
    mlps = torch.zeros(n_l, t, dtype=torch.bool)
    resid = torch.zeros(n_l, 2, t, dtype=torch.bool)
    a = kind == 0
    heads[layer[a], head[a], target[a]] = True
    sources[layer[a], head[a], source[a]] = True
    m = kind == 2
    mlps[layer[m], target[m]] = True
    r = (kind == 1) | (kind == 3)
    resid[layer[r], (kind[r] == 3).long(), target[r]] = True
    return EdgeComponents(heads, sources, mlps, resid)
