"""Rows that ablate an MLP do not compute it.

A node hook replaces an ablated MLP's output by ``v + 0 * (out - v)``, which is ``v`` whatever
``out`` is (for any finite ``out``), so computing the MLP for that row is wasted work. In a
search most rows are small subgraphs (or, for the inverse, their complements) that ablate
most MLPs, and the MLP is most of a block's arithmetic (70-75 % of a block's weights on
SmolLM2-135M and Gemma-3-270M). While :func:`mlps_on_kept_rows` is active, the MLP of
each listed layer runs on the rows that keep it only, and the other rows get zeros, which
the node hook then turns into the ablation value. The log-probs of an ablating row are
therefore the same as with the MLP computed; a kept row's differ at most by the rounding of
a matrix product over fewer rows (``benchmarks/strace_speed.py --unskipped`` compares
whole curves both ways; docs/search-quality.md).

A pass with a gradient to the masks still needs an ablated MLP's output (the gradient to its
mask is ``<dL/dhook, out - v>``), but not the MLP's backward pass: the hook multiplies the
gradient reaching ``out`` by the mask value 0, so the backward through that row's MLP only
adds zeros to the residual stream's gradient. There the ablating rows compute the MLP without
a gradient (no activations kept, no backward). The gradients are those of computing every
MLP with one, to the rounding of the kept rows' products over fewer rows (the zeros skipped
change no bit; measured on a batch of 16 dev prompts: identical on SmolLM2-135M, within
8e-7 on Gemma-3-270M).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from strace_lens.graph import NodeGraph

#: whether searches skip ablated MLPs (benchmarks/strace_speed.py --unskipped sets it False to
#: time the same curve without)
ENABLED = True


def mlp_kept_rows(graph: NodeGraph, mask: Tensor) -> dict[int, Int[Tensor, " kept"]]:
    """For each layer whose MLP some row of ``mask`` (``[row, node]``) ablates (mask value
    exactly 0 in the forward pass), the rows that keep it."""
    if mask.shape[0] == 0:
        return {}
    per_layer = mask.detach().reshape(mask.shape[0], graph.n_layers, graph.nodes_per_layer)
    return kept_rows_by_layer(per_layer[:, :, graph.n_heads] != 0)


def kept_rows_by_layer(keeps: Bool[Tensor, "row layer"]) -> dict[int, Int[Tensor, " kept"]]:
    """``{layer: rows keeping its MLP}`` for each layer some row ablates (``keeps`` False),
    or {} while skipping is off (``ENABLED``)."""
    if not ENABLED:
        return {}
    keeps = keeps.cpu()
    return {
        layer: torch.nonzero(keeps[:, layer]).flatten()
        for layer in torch.nonzero(~keeps.all(0)).flatten().tolist()
    }


def _mlp_module(model: Any, layer: int) -> Any:
    """The module whose output the MLP hook (``blocks.{layer}.hook_mlp_out``) receives: the
    Hugging Face MLP inside a ``TransformerBridge`` block's MLP (whose own ``forward`` fires
    the hook), or a ``HookedTransformer`` block's MLP (hooked by the block)."""
    mlp = model.blocks[layer].mlp
    inner = getattr(mlp, "original_component", None)
    return inner if isinstance(inner, torch.nn.Module) else mlp


@contextmanager
def mlps_on_kept_rows(
    model: Any, kept: dict[int, Tensor], n_rows: int, outputs_needed: bool = False
) -> Iterator[None]:
    """Run the MLP of each layer in ``kept`` on its kept rows only while inside; the other
    rows get zeros, or with ``outputs_needed`` (a pass with a gradient to the masks) their
    output computed without a gradient. A call with another row count than ``n_rows`` runs
    whole. Every module's ``forward`` is restored on exit, also after an error."""
    patched: list[tuple[Any, bool, Any]] = []
    try:
        for layer, rows in kept.items():
            module = _mlp_module(model, layer)
            had_own = "forward" in module.__dict__
            patched.append((module, had_own, module.__dict__.get("forward")))
            module.forward = _on_rows(module.forward, rows, n_rows, outputs_needed)
        yield
    finally:
        for module, had_own, own in reversed(patched):
            if had_own:
                module.forward = own
            else:
                del module.forward


def _on_rows(
    forward: Callable[..., Any], rows: Tensor, n_rows: int, outputs_needed: bool
) -> Callable[..., Any]:
    rest = None  # with outputs_needed: the rows that ablate the MLP, run without a gradient
    if outputs_needed:
        others = torch.ones(n_rows, dtype=torch.bool)
        others[rows] = False
        rest = torch.nonzero(others).flatten()

    # Any: a module's forward may return more than one tensor (then it runs whole)
    def run(x: Tensor, *args: Any, **kwargs: Any) -> Any:
        if x.shape[0] != n_rows or args or kwargs:
            return forward(x, *args, **kwargs)
        idx = rows.to(x.device)
        out = forward(x.index_select(0, idx))
        if not isinstance(out, Tensor):  # e.g. a mixture of experts' (output, router logits)
            return forward(x, *args, **kwargs)
        full = out.new_zeros((n_rows, *out.shape[1:]))
        if rest is not None:
            other_idx = rest.to(x.device)
            with torch.no_grad():
                full = full.index_copy(0, other_idx, forward(x.index_select(0, other_idx)))
        return full.index_copy(0, idx, out)

    return run


__all__ = ["ENABLED", "kept_rows_by_layer", "mlp_kept_rows", "mlps_on_kept_rows"]
