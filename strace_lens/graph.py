"""The node graph: every attention head and every MLP of a model, in a fixed order.

Nodes are ordered by layer, and within a layer the heads come first, then the MLP
(``a0.h0, a0.h1, ..., m0, a1.h0, ...``): the order in which they write to the residual
stream. Names follow the EAP-IG / MIB convention (``a{layer}.h{head}``, ``m{layer}``).
Grouped-query attention models have fewer key/value heads than query heads; the nodes are
the query heads, the slices of ``blocks.{l}.attn.hook_z``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import torch
from jaxtyping import Bool
from torch import Tensor

NodeKind = Literal["attn", "mlp"]


@dataclass(frozen=True)
class Node:
    """One attention head or one MLP."""

    name: str
    layer: int
    kind: NodeKind
    head: int | None  # None for an MLP

    @property
    def hook_name(self) -> str:
        """The TransformerLens hook point whose activation this node ablates."""
        return hook_name(self.layer, self.kind)


def hook_name(layer: int, kind: NodeKind) -> str:
    """The hook point of layer ``layer``'s heads (``attn.hook_z``, one slice per head) or its
    MLP (``hook_mlp_out``): the one place that spells TransformerLens's hook names."""
    if kind == "attn":
        return f"blocks.{layer}.attn.hook_z"
    return f"blocks.{layer}.hook_mlp_out"


@dataclass(frozen=True)
class NodeGraph:
    """The ordered set of nodes of a model with ``n_layers`` layers of ``n_heads`` heads."""

    n_layers: int
    n_heads: int

    def __post_init__(self) -> None:
        if self.n_layers < 1 or self.n_heads < 1:
            raise ValueError(
                f"A node graph needs at least one layer and one head, got "
                f"n_layers={self.n_layers}, n_heads={self.n_heads}."
            )

    @classmethod
    def from_model(cls, model: Any) -> NodeGraph:
        """Build the graph of a ``TransformerBridge`` or ``HookedTransformer``."""
        cfg = getattr(model, "cfg", None)
        if cfg is None or not hasattr(cfg, "n_layers") or not hasattr(cfg, "n_heads"):
            raise TypeError(
                "NodeGraph.from_model() needs a TransformerLens model (a TransformerBridge or "
                f"HookedTransformer) with cfg.n_layers and cfg.n_heads; got {type(model).__name__}."
            )
        return cls(n_layers=int(cfg.n_layers), n_heads=int(cfg.n_heads))

    # -- the node list -------------------------------------------------------------------
    @property
    def nodes_per_layer(self) -> int:
        return self.n_heads + 1

    def __len__(self) -> int:
        return self.n_layers * self.nodes_per_layer

    @cached_property
    def nodes(self) -> list[Node]:
        out: list[Node] = []
        for layer in range(self.n_layers):
            for head in range(self.n_heads):
                out.append(Node(f"a{layer}.h{head}", layer, "attn", head))
            out.append(Node(f"m{layer}", layer, "mlp", None))
        return out

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __getitem__(self, index: int) -> Node:
        return self.nodes[index]

    @cached_property
    def names(self) -> list[str]:
        return [node.name for node in self.nodes]

    @cached_property
    def _lookup(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}

    def index(self, node: str | Node | int) -> int:
        """The position of a node given by name (``"a3.h1"``, ``"m5"``), Node or index."""
        if isinstance(node, Node):
            node = node.name
        if isinstance(node, int) and not isinstance(node, bool):
            if not 0 <= node < len(self):
                raise IndexError(f"Node index {node} is outside [0, {len(self)}).")
            return node
        if isinstance(node, str):
            if node in self._lookup:
                return self._lookup[node]
            raise KeyError(
                f"Unknown node {node!r}: names are 'a{{layer}}.h{{head}}' with layer < "
                f"{self.n_layers} and head < {self.n_heads}, or 'm{{layer}}'."
            )
        raise TypeError(f"A node is a name, a Node or an int index, not {type(node).__name__}.")

    def indices(self, nodes: Iterable[str | Node | int]) -> list[int]:
        return [self.index(node) for node in nodes]

    # -- convenient views for masks --------------------------------------------------------
    @property
    def layers(self) -> Tensor:
        """Layer of each node, ``[node]``."""
        return torch.tensor([node.layer for node in self.nodes])

    @property
    def is_attn(self) -> Bool[Tensor, " node"]:
        return torch.tensor([node.kind == "attn" for node in self.nodes])

    def attn_index(self, layer: int, head: int) -> int:
        return layer * self.nodes_per_layer + head

    def mlp_index(self, layer: int) -> int:
        return layer * self.nodes_per_layer + self.n_heads

    def mask_from_nodes(self, nodes: Sequence[str | Node | int]) -> Bool[Tensor, " node"]:
        """A boolean keep-mask holding exactly the given nodes."""
        mask = torch.zeros(len(self), dtype=torch.bool)
        mask[self.indices(nodes)] = True
        return mask

    def nodes_from_mask(self, mask: Tensor) -> list[str]:
        if mask.shape != (len(self),):
            raise ValueError(f"Expected a mask of shape ({len(self)},), got {tuple(mask.shape)}.")
        return [self.names[i] for i in torch.nonzero(mask.bool()).flatten().tolist()]

    def to_dict(self) -> dict[str, int]:
        return {"n_layers": self.n_layers, "n_heads": self.n_heads}
