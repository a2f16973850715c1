"""Token granularity: every attention head and every MLP at every position is a node.

Node names are the node graph's with a position: ``a{l}.h{h}@{t}`` and ``m{l}@{t}``. Masks are
``[row, node, pos]`` with the node axis in :class:`~strace_lens.graph.NodeGraph` order (heads
of a layer, then its MLP), so a token mask that is constant over positions is exactly a node
mask. A node's activation at a position is ``ablated + m * (clean - ablated)``, through
``blocks.{l}.attn.hook_z`` (``[batch, pos, head, d_head]``) and ``blocks.{l}.hook_mlp_out``,
with any :class:`~strace_lens.ablation.Ablation` (zero by default). Sizes count
(component, position) pairs; relative size = count / (n_layers * (n_heads + 1) * n_pos).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from strace_lens.ablation import Ablation, ZeroAblation
from strace_lens.graph import NodeGraph
from strace_lens.hygiene import check_hook_points, model_untouched
from strace_lens.inputs import TokenBatch
from strace_lens.masked_forward import check_finite, forward_logprobs

HookFn = Callable[[Tensor, Any], Tensor]


@dataclass(frozen=True)
class TokenGraph:
    """Heads and MLPs at each of ``n_pos`` positions of an ``n_layers`` x ``n_heads`` model."""

    n_layers: int
    n_heads: int
    n_pos: int

    @classmethod
    def from_model(cls, model: Any, n_pos: int) -> TokenGraph:
        return cls(int(model.cfg.n_layers), int(model.cfg.n_heads), int(n_pos))

    @property
    def node_graph(self) -> NodeGraph:
        return NodeGraph(self.n_layers, self.n_heads)

    def __len__(self) -> int:
        return len(self.node_graph) * self.n_pos

    def names(self) -> list[str]:
        """Names in mask order: node-major, then position (``mask[node, pos]`` flattened)."""
        return [f"{n}@{t}" for n in self.node_graph.names for t in range(self.n_pos)]

    def index(self, name: str) -> tuple[int, int]:
        """``(node, pos)`` of a name such as ``"a2.h1@5"`` or ``"m0@3"``."""
        node, sep, pos = name.partition("@")
        if not sep or not pos.isdigit() or not int(pos) < self.n_pos:
            raise KeyError(
                f"{name!r} is not a token node: 'a{{l}}.h{{h}}@{{t}}' or 'm{{l}}@{{t}}'."
            )
        return self.node_graph.index(node), int(pos)

    def mask_from_names(self, names: list[str]) -> Float[Tensor, "node pos"]:
        mask = torch.zeros(len(self.node_graph), self.n_pos)
        for name in names:
            mask[self.index(name)] = 1.0
        return mask

    def relative_size(self, count: int | Tensor) -> float | Tensor:
        return count / len(self)


def _blend(m: Tensor, clean: Tensor, value: Tensor | None) -> Tensor:
    m = m.to(device=clean.device, dtype=clean.dtype)  # blocks may sit on several devices
    if value is None:
        return clean * m
    v = value.to(device=clean.device, dtype=clean.dtype)
    return v + m * (clean - v)


def token_hooks(
    graph: TokenGraph, mask: Tensor, ablation: Ablation, batch: TokenBatch
) -> list[tuple[str, HookFn]]:
    per_layer = mask.reshape(mask.shape[0], graph.n_layers, graph.n_heads + 1, graph.n_pos)
    hooks: list[tuple[str, HookFn]] = []
    for layer in range(graph.n_layers):
        heads = per_layer[:, layer, : graph.n_heads].transpose(1, 2)[..., None]  # [b, pos, h, 1]
        mlp = per_layer[:, layer, graph.n_heads][..., None]  # [b, pos, 1]
        attn_value, mlp_value = ablation.attn_value(layer, batch), ablation.mlp_value(layer, batch)

        def attn_hook(z: Tensor, hook: Any, m: Tensor = heads, v: Any = attn_value) -> Tensor:
            return _blend(m, z, v)

        def mlp_hook(out: Tensor, hook: Any, m: Tensor = mlp, v: Any = mlp_value) -> Tensor:
            return _blend(m, out, v)

        hooks.append((f"blocks.{layer}.attn.hook_z", attn_hook))
        hooks.append((f"blocks.{layer}.hook_mlp_out", mlp_hook))
    return hooks


def run_with_token_mask(
    model: Any,
    batch: TokenBatch,
    mask: Float[Tensor, "row node pos"],
    ablation: Ablation | None = None,
) -> Float[Tensor, "row vocab"]:
    """Log-probs at each row's predicted position with each (node, position) scaled.

    ``batch`` must be right-padded (positions index the mask); a one-row batch is repeated
    for every mask row. Values in [0, 1]; differentiable.
    """
    if batch.has_left_padding:
        raise ValueError("Token masks index positions: give right-padded token rows.")
    graph = TokenGraph.from_model(model, int(batch.tokens.shape[1]))
    if mask.ndim != 3 or tuple(mask.shape[1:]) != (len(graph.node_graph), graph.n_pos):
        raise ValueError(
            f"A token mask has shape [row, {len(graph.node_graph)}, {graph.n_pos}] for this "
            f"model and batch, got {tuple(mask.shape)}."
        )
    if batch.batch_size == 1 and mask.shape[0] > 1:
        batch = batch.repeat_interleave(mask.shape[0])
    check_hook_points(model, graph.node_graph)
    ablation = ablation if ablation is not None else ZeroAblation()
    ablation.check_model(model)
    mask = mask.to(batch.tokens.device)
    with model_untouched(model), torch.set_grad_enabled(mask.requires_grad):
        logprobs = forward_logprobs(model, batch, token_hooks(graph, mask, ablation, batch))
    check_finite(logprobs, "the token-masked model's output")
    return logprobs
