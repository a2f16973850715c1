"""Masked forward passes resumed at layer L from a cached residual stream.

Two masks that agree on every node of layers 0 .. L-1 give the same residual stream entering
block L. The nested growth measures a dozen proposals per prompt and step, each the current
subgraph plus a few nodes; a proposal whose earliest new node sits in layer L is run from
the current subgraph's residual at L (captured during the gradient pass the growth runs at
the current subgraph anyway), and blocks 0 .. L-1 are skipped: its cost falls by L / layers.
Rows of nearby start layers share one call, from the lowest (:mod:`strace_lens.search.bands`).

The residual is cached per prompt, at the width of the batch, right-padded: with right
padding a causal model's real positions never see the padding, so a row may run at any
width at least its own length. Batches with left padding are never resumed (``can_resume``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from inspect import signature
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from strace_lens.inputs import TokenBatch
from strace_lens.masked_forward import forward_logprobs

HookFn = Callable[[Tensor, Any], Tensor]


def resid_hook_name(layer: int) -> str:
    """The hook point of the residual stream entering block ``layer``."""
    return f"blocks.{layer}.hook_in"


def can_resume(model: Any, batch: TokenBatch) -> bool:
    """Whether rows of ``batch`` can be resumed from a cached residual on ``model``: a
    TransformerBridge-style model with a block stack, residual hook points at every block
    and ``start_at_layer``, and a batch without left padding."""
    n_layers = int(model.cfg.n_layers)
    blocks = getattr(model, "blocks", None)
    hook_dict = getattr(model, "hook_dict", {})
    forward = getattr(model, "forward", None)
    return (
        blocks is not None
        and forward is not None
        and "start_at_layer" in signature(forward).parameters
        and len(blocks) == n_layers
        and all(resid_hook_name(layer) in hook_dict for layer in range(n_layers))
        and not batch.has_left_padding
    )


def capture_hooks(
    store: Float[Tensor, "prompt layer pos d_model"], prompt_index: Int[Tensor, " row"]
) -> list[tuple[str, HookFn]]:
    """Hooks that copy the residual entering every block, detached, into ``store`` at the
    rows' prompts (one row per prompt)."""

    def make(layer: int) -> HookFn:
        def hook(resid: Tensor, hook: Any) -> Tensor:
            rows = prompt_index.to(store.device)
            store[rows, layer, : resid.shape[1]] = resid.detach()[: len(rows)].to(store.dtype)
            return resid

        return hook

    return [(resid_hook_name(layer), make(layer)) for layer in range(store.shape[1])]


@torch.no_grad()
def blocks_return_tuples(model: Any, batch: TokenBatch) -> bool:
    """Whether the model's blocks return ``(hidden,)`` rather than a bare tensor (the native
    TransformerLens models do, Hugging Face decoder layers do not): probed by running the
    first token of the first prompt with a forward hook on block 0 (removed after)."""
    seen: list[bool] = []

    def record(module: Any, args: Any, output: Any) -> None:
        seen.append(isinstance(output, tuple))

    handle = model.blocks[0].register_forward_hook(record)
    try:
        model(batch.tokens[:1, :1])
    finally:
        handle.remove()
    return bool(seen and seen[0])


@contextmanager
def _skipped_blocks(model: Any, n: int, as_tuple: bool) -> Iterator[None]:
    """Blocks 0 .. n-1 return their input unchanged (an instance ``forward``, removed after)."""

    def passthrough(*args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden,) if as_tuple else hidden

    blocks = list(model.blocks)[:n]
    try:
        for block in blocks:
            # straight into the instance dict: a bridge component's own __setattr__ would
            # pass ``forward`` on to the wrapped module (and leave it there)
            object.__setattr__(block, "forward", passthrough)
        yield
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)


def resumed_logprobs(
    model: Any,
    batch: TokenBatch,
    hooks: list[tuple[str, HookFn]],
    start_layer: int,
    resid: Float[Tensor, "row pos d_model"],
    as_tuple: bool,
) -> Float[Tensor, "row vocab"]:
    """``forward_logprobs`` of ``batch`` with ``hooks``, blocks ``start_layer`` on only, from
    ``resid``, the residual entering block ``start_layer`` (same width as ``batch``);
    ``as_tuple``: what ``blocks_return_tuples`` says of the model."""
    if start_layer == 0:
        return forward_logprobs(model, batch, hooks)
    with _skipped_blocks(model, start_layer, as_tuple):
        return forward_logprobs(model, batch, hooks, resid=resid, start_at_layer=start_layer)


__all__ = [
    "blocks_return_tuples",
    "can_resume",
    "capture_hooks",
    "resid_hook_name",
    "resumed_logprobs",
]
