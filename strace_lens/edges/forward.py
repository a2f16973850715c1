"""Exact edge ablation: run the model with every edge of the paper's graph scaled by a mask.

Each batch row has its own mask, in three parts (the dense layout of :class:`EdgeGraph`):
attention ``[row, layer, head, q, k]``, residual ``[row, layer, 2, pos]`` and MLP
``[row, layer, pos]``. A mask value of 1 keeps an edge, 0 zero-ablates it, and values in
between scale it, so the output is differentiable in the masks. Per block l, in one pass:

- ``blocks.{l}.attn.hook_pattern`` (post-softmax ``[batch, head, q, k]``): multiplied by the
  attention mask, not renormalised. On grouped-query models the pattern is per query head,
  so each query head's edges are cut separately even though heads share their values.
- ``blocks.{l}.hook_resid_pre`` and ``blocks.{l}.hook_attn_out`` are read (not changed):
  the state entering the block in *this* (ablated) run, and the attention branch as it is
  added to the residual stream (after Gemma 3's post-attention norm, whose input is the
  masked heads' sum: the norm then acts on what is left, as the model would).
- ``blocks.{l}.hook_resid_mid``: replaced by ``r_attn * resid_pre + attn_out``. On a
  TransformerBridge this hook point is the MLP's input norm's ``hook_in`` (``ln2.hook_in``):
  a value returned there reaches the MLP but *not* the block's own skip connection, which
  still adds the unmasked resid_mid. So the skip is cut again at the block's output:
- ``blocks.{l}.hook_mlp_out``: multiplied by the MLP mask per position (after Gemma's
  post-feedforward norm: the MLP edge is the whole branch).
- ``blocks.{l}.hook_resid_post``: replaced by ``r_mlp * resid_mid + mlp_out``, from the
  values this pass computed, so the block's output is exactly the masked sum.

Attention output biases (``b_O``, absent from SmolLM2 and Gemma) are not edges: they stay.
With ``ablate_attention_edges=False`` the pattern hook is not attached: attention edges are
still counted in subgraph sizes but never removed, the behaviour the released evaluation
code appears to have (see docs/strace-method.md, section 2b).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from strace_lens.edges.graph import EdgeGraph
from strace_lens.hygiene import model_untouched
from strace_lens.inputs import TokenBatch
from strace_lens.masked_forward import check_finite, forward_logprobs

HookFn = Callable[[Tensor, Any], Tensor | None]


@dataclass
class EdgeMasks:
    """Per-row masks over every edge slot of the dense layout (see :class:`EdgeGraph`)."""

    attn: Float[Tensor, "row layer head q k"]
    resid: Float[Tensor, "row layer two pos"]
    mlp: Float[Tensor, "row layer pos"]

    @classmethod
    def from_dense(cls, graph: EdgeGraph, dense: Float[Tensor, "row dense"]) -> EdgeMasks:
        if dense.ndim != 2 or dense.shape[1] != graph.n_dense:
            raise ValueError(
                f"A dense edge mask has shape [row, {graph.n_dense}], got {tuple(dense.shape)}."
            )
        n_a, n_r = graph.n_attn_slots, graph.n_resid_slots
        rows = dense.shape[0]
        return cls(
            attn=dense[:, :n_a].reshape(rows, *graph.attn_shape),
            resid=dense[:, n_a : n_a + n_r].reshape(rows, *graph.resid_shape),
            mlp=dense[:, n_a + n_r :].reshape(rows, *graph.mlp_shape),
        )

    @classmethod
    def from_edges(cls, graph: EdgeGraph, keep: Tensor, fill: float = 1.0) -> EdgeMasks:
        """From per-edge values ``[row, edge]`` (bool or float in [0, 1])."""
        return cls.from_dense(graph, graph.dense_mask(keep, fill=fill))

    @classmethod
    def full(cls, graph: EdgeGraph, rows: int, value: float = 1.0) -> EdgeMasks:
        return cls.from_dense(graph, torch.full((rows, graph.n_dense), value))

    @property
    def n_rows(self) -> int:
        return int(self.attn.shape[0])

    @property
    def n_pos(self) -> int:
        return int(self.mlp.shape[-1])

    def padded_to(self, width: int, fill: float = 1.0) -> EdgeMasks:
        """The same masks over ``width >= n_pos`` positions, extra slots set to ``fill``.

        Lets prompts of different lengths run as rows of one right-padded batch: positions
        past a prompt's end are padding, which a causal model's real positions never read.
        """
        extra = width - self.n_pos
        if extra < 0:
            raise ValueError(f"Cannot pad masks over {self.n_pos} positions to {width}.")
        pad = torch.nn.functional.pad
        return EdgeMasks(
            attn=pad(self.attn, (0, extra, 0, extra), value=fill),
            resid=pad(self.resid, (0, extra), value=fill),
            mlp=pad(self.mlp, (0, extra), value=fill),
        )

    @staticmethod
    def cat(masks: list[EdgeMasks]) -> EdgeMasks:
        """Stack the rows of several masks (all over the same positions)."""
        return EdgeMasks(
            attn=torch.cat([m.attn for m in masks]),
            resid=torch.cat([m.resid for m in masks]),
            mlp=torch.cat([m.mlp for m in masks]),
        )

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.attn, self.resid, self.mlp))

    def check(self, n_layers: int, n_heads: int, n_pos: int) -> None:
        want = {
            "attn": (n_layers, n_heads, n_pos, n_pos),
            "resid": (n_layers, 2, n_pos),
            "mlp": (n_layers, n_pos),
        }
        for part, shape in want.items():
            got = tuple(getattr(self, part).shape[1:])
            if got != shape:
                raise ValueError(
                    f"The {part} mask has shape [row, {', '.join(map(str, got))}], but this "
                    f"model and token batch need [row, {', '.join(map(str, shape))}]."
                )
            values = getattr(self, part).detach()
            if not values.dtype.is_floating_point:
                raise TypeError(f"The {part} mask must be a float tensor, not {values.dtype}.")
            lo, hi = float(values.min()), float(values.max())
            if not (0.0 <= lo and hi <= 1.0):  # also false for NaN
                raise ValueError(
                    f"Edge mask values must lie in [0, 1] (1 keeps an edge, 0 ablates it); the "
                    f"{part} mask has values in [{lo:g}, {hi:g}]."
                )


def edge_hooks(
    masks: EdgeMasks, n_layers: int, ablate_attention_edges: bool = True
) -> list[tuple[str, HookFn]]:
    """The forward hooks that apply ``masks`` (see module docstring); attach them in order."""
    hooks: list[tuple[str, HookFn]] = []
    for layer in range(n_layers):
        hooks += _block_hooks(masks, layer, ablate_attention_edges)
    return hooks


def _block_hooks(masks: EdgeMasks, layer: int, ablate_attn: bool) -> list[tuple[str, HookFn]]:
    # values this block computed in the current pass, read by its later hooks
    seen: dict[str, Tensor] = {}
    r_attn = masks.resid[:, layer, 0, :, None]
    r_mlp = masks.resid[:, layer, 1, :, None]
    m_mlp = masks.mlp[:, layer, :, None]
    a_mask = masks.attn[:, layer]

    def pattern(p: Tensor, hook: Any) -> Tensor:
        return p * a_mask.to(p.dtype)

    def read(key: str) -> HookFn:
        def hook(x: Tensor, hook: Any) -> None:
            seen[key] = x

        return hook

    def resid_mid(h: Tensor, hook: Any) -> Tensor:
        mid = r_attn.to(h.dtype) * seen["pre"] + seen["attn"]
        seen["mid"] = mid
        return mid

    def mlp_out(y: Tensor, hook: Any) -> Tensor:
        out = m_mlp.to(y.dtype) * y
        seen["mlp"] = out
        return out

    def resid_post(x: Tensor, hook: Any) -> Tensor:
        return r_mlp.to(x.dtype) * seen["mid"] + seen["mlp"]

    hooks: list[tuple[str, HookFn]] = [(f"blocks.{layer}.hook_resid_pre", read("pre"))]
    if ablate_attn:
        hooks.append((f"blocks.{layer}.attn.hook_pattern", pattern))
    hooks += [
        (f"blocks.{layer}.hook_attn_out", read("attn")),
        (f"blocks.{layer}.hook_resid_mid", resid_mid),
        (f"blocks.{layer}.hook_mlp_out", mlp_out),
        (f"blocks.{layer}.hook_resid_post", resid_post),
    ]
    return hooks


def check_edge_hook_points(model: Any) -> None:
    names = ["attn.hook_pattern", "hook_resid_pre", "hook_attn_out", "hook_resid_mid"]
    names += ["hook_mlp_out", "hook_resid_post"]
    # read once: a TransformerBridge rebuilds hook_dict (with its aliases) at every access,
    # which cost 0.3 s per check on SmolLM2 when read once per hook point
    hook_dict = model.hook_dict
    for layer in range(int(model.cfg.n_layers)):
        for name in names:
            if f"blocks.{layer}.{name}" not in hook_dict:
                raise ValueError(
                    f"The model has no hook point 'blocks.{layer}.{name}', which edge ablation "
                    "needs: use a TransformerBridge (TransformerLens >= 3)."
                )


def run_with_edge_masks(
    model: Any,
    batch: TokenBatch,
    masks: EdgeMasks,
    *,
    ablate_attention_edges: bool = True,
) -> Float[Tensor, "row vocab"]:
    """Next-token log-probs at each row's predicted position with every edge masked.

    Args:
        model: a ``TransformerBridge``.
        batch: token rows, right-padded (no left padding: positions index the masks). A
            single-row batch is repeated for every mask row.
        masks: one mask per row; their ``pos`` axes must match the batch's width.
        ablate_attention_edges: False leaves the attention pattern untouched.
    """
    check_edge_hook_points(model)
    with model_untouched(model):
        return edge_masked_logprobs(
            model, batch, masks, ablate_attention_edges=ablate_attention_edges
        )


def edge_masked_logprobs(
    model: Any,
    batch: TokenBatch,
    masks: EdgeMasks,
    *,
    ablate_attention_edges: bool = True,
) -> Float[Tensor, "row vocab"]:
    """:func:`run_with_edge_masks` for callers that run many masked forwards: it must be
    called inside :func:`model_untouched`, after :func:`check_edge_hook_points`. Entering
    ``model_untouched`` walks every module and parameter (0.3 s per forward on SmolLM2,
    as much as the forward of a few rows), so a search enters it once."""
    if batch.has_left_padding:
        raise ValueError("Edge masks index positions: give right-padded token rows.")
    if batch.batch_size == 1 and masks.n_rows > 1:
        batch = batch.repeat_interleave(masks.n_rows)
    if batch.batch_size != masks.n_rows:
        raise ValueError(
            f"{masks.n_rows} mask rows for {batch.batch_size} token rows: give one per row."
        )
    cfg = model.cfg
    masks.check(int(cfg.n_layers), int(cfg.n_heads), int(batch.tokens.shape[1]))
    device = batch.tokens.device
    masks = EdgeMasks(masks.attn.to(device), masks.resid.to(device), masks.mlp.to(device))
    wants_grad = any(t.requires_grad for t in (masks.attn, masks.resid, masks.mlp))
    with torch.set_grad_enabled(wants_grad):
        hooks = edge_hooks(masks, int(cfg.n_layers), ablate_attention_edges)
        logprobs = forward_logprobs(model, batch, hooks)  # type: ignore[arg-type]
    check_finite(logprobs, "the edge-masked model's output")
    return logprobs
