"""The masked forward pass: run the model with every node scaled between clean and ablated.

For node n with mask value a in [0, 1] on batch row b, its activation becomes
``ablated + a * (clean - ablated)``: a = 1 keeps the node, a = 0 replaces it by the ablation
value, and values in between interpolate, which makes the output differentiable in the mask.
Each row has its own mask, so many subgraphs of one prompt (or of many prompts) run as rows of
one batch.

Only the predicted position's logits are needed, so the residual stream is gathered at that
position before the final norm and unembedding (a hook on the last block's
``hook_resid_post``): on Gemma-3-270M, whose 262k-token unembedding dominates the forward
pass, this is the largest saving available (see benchmarks/masked_forward.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from strace_lens.ablation import Ablation, ZeroAblation
from strace_lens.graph import NodeGraph, hook_name
from strace_lens.hygiene import check_hook_points, model_untouched
from strace_lens.inputs import Prompts, TokenBatch, tokenize

HookFn = Callable[[Tensor, Any], Tensor]


def check_mask(mask: Tensor, n_rows: int, n_nodes: int) -> Tensor:
    """Validate a node mask and broadcast a single ``[node]`` mask over the batch."""
    if not isinstance(mask, Tensor):
        raise TypeError(
            f"The mask must be a torch.Tensor of shape [batch, node], not {type(mask).__name__}."
        )
    if mask.ndim == 1:
        mask = mask[None].expand(n_rows, -1)
    if mask.ndim != 2 or mask.shape[1] != n_nodes or mask.shape[0] not in (n_rows, 1):
        raise ValueError(
            f"The mask has shape {tuple(mask.shape)}, but this model and batch need "
            f"[{n_rows}, {n_nodes}] ([batch, node]; node order: NodeGraph.from_model(model).names)."
        )
    if mask.shape[0] == 1 and n_rows > 1:
        mask = mask.expand(n_rows, -1)
    values = mask.detach()
    if not values.dtype.is_floating_point:
        mask = mask.float()
        values = mask
    if (
        not bool(torch.isfinite(values).all())
        or bool((values < 0).any())
        or bool((values > 1).any())
    ):
        lo, hi = float(values.min()), float(values.max())
        raise ValueError(
            f"Mask values must lie in [0, 1] (1 keeps a node, 0 ablates it); got values in "
            f"[{lo:g}, {hi:g}]. Squash learned logits with torch.sigmoid first."
        )
    return mask


def _attn_hook(scale: Tensor, value: Tensor | None) -> HookFn:
    # scale: [b, head] -> broadcast over [b, pos, head, d_head]
    s = scale[:, None, :, None]

    def hook(z: Tensor, hook: Any) -> Tensor:
        # to the activation's own device: with a device_map, blocks sit on several devices
        m = s.to(device=z.device, dtype=z.dtype)
        if value is None:
            return z * m
        v = value.to(device=z.device, dtype=z.dtype)
        return v + m * (z - v)

    return hook


def _mlp_hook(scale: Tensor, value: Tensor | None) -> HookFn:
    s = scale[:, None, None]

    def hook(out: Tensor, hook: Any) -> Tensor:
        m = s.to(device=out.device, dtype=out.dtype)
        if value is None:
            return out * m
        v = value.to(device=out.device, dtype=out.dtype)
        return v + m * (out - v)

    return hook


def _gather_hook(predict_pos: Tensor) -> HookFn:
    def hook(resid: Tensor, hook: Any) -> Tensor:
        idx = predict_pos.to(resid.device)
        picked = resid[torch.arange(resid.shape[0], device=resid.device), idx][:, None, :]
        if resid.device.type != "cpu":
            return picked
        # CPU BLAS multiplies a handful of rows with another kernel (other rounding) than a
        # whole sequence: unembedding 1-3 rows moved Gemma's and SmolLM2's log-probs by
        # 2e-5 to 4e-5 against the model's own forward. Padding the gathered rows with copies
        # of the first to a multiple of 8, and at least 16, runs the same kernel as the full
        # forward: an all-ones mask then reproduces the model's fp32 log-probs bit for bit
        # for any row count (measured on both embedded models, 1 to 31 rows; 8 rows were not
        # enough). forward_logprobs reads the first rows only. (Repeating each row until the
        # row count was a multiple of 8, as before, unembedded 8x the rows of an odd-sized
        # call: 8-16 % of a Gemma-3-270M call's time, for its 262k-token unembedding.)
        n = picked.shape[0]
        pad = max(GATHER_MIN_ROWS, n + (-n % 8)) - n
        return torch.cat([picked, picked[:1].expand(pad, -1, -1)]) if pad else picked

    return hook


#: the fewest rows the CPU unembedding runs (see ``_gather_hook``)
GATHER_MIN_ROWS = 16


def hooked_layers(graph: NodeGraph, mask: Tensor) -> Bool[Tensor, " layer"]:
    """The layers ``node_hooks`` hooks for ``mask`` (``[batch, node]``): every layer when a
    gradient is wanted, else those where some row does not keep every node."""
    if mask.requires_grad:
        return torch.ones(graph.n_layers, dtype=torch.bool)
    per_layer = mask.detach().reshape(mask.shape[0], graph.n_layers, graph.nodes_per_layer)
    return (per_layer != 1).any(-1).any(0).cpu()


def node_hooks(
    graph: NodeGraph,
    mask: Tensor,
    ablation: Ablation,
    batch: TokenBatch,
    hooked: Bool[Tensor, " layer"] | None = None,
) -> list[tuple[str, HookFn]]:
    """Forward hooks that apply ``mask`` (``[batch, node]``) with ``ablation`` values, at the
    layers ``hooked_layers`` names and at those ``hooked`` adds. A hook that keeps a node
    computes ``v + 1 * (z - v)``, which under a mean ablation may differ from ``z`` in the last
    bit: ``hooked`` lets a subset of rows run with the hooks the whole batch had."""
    hooks: list[tuple[str, HookFn]] = []
    per_layer = mask.reshape(mask.shape[0], graph.n_layers, graph.nodes_per_layer)
    active = hooked_layers(graph, mask)
    if hooked is not None:
        active = active | hooked.cpu()
    for layer in range(graph.n_layers):
        heads = per_layer[:, layer, : graph.n_heads]
        mlp = per_layer[:, layer, graph.n_heads]
        # A layer whose nodes are all kept, with no gradient wanted, needs no hook at all.
        if not bool(active[layer]):
            continue
        hooks.append(
            (hook_name(layer, "attn"), _attn_hook(heads, ablation.attn_value(layer, batch)))
        )
        hooks.append((hook_name(layer, "mlp"), _mlp_hook(mlp, ablation.mlp_value(layer, batch))))
    return hooks


def forward_logprobs(
    model: Any,
    batch: TokenBatch,
    hooks: list[tuple[str, HookFn]],
    gather: bool = True,
    *,
    resid: Float[Tensor, "batch pos d_model"] | None = None,
    start_at_layer: int | None = None,
) -> Float[Tensor, "batch vocab"]:
    """Log-probabilities at each row's predicted position, with the given hooks attached.

    Must be called inside :func:`model_untouched`. With ``gather``, the residual stream is
    cut down to the predicted position before the final norm and unembedding. With
    ``resid`` and ``start_at_layer``, ``resid`` is the residual stream entering that block
    (``batch`` still gives the predicted positions and any attention mask).
    """
    n_layers = int(model.cfg.n_layers)
    all_hooks = list(hooks)
    gather_name = f"blocks.{n_layers - 1}.hook_resid_post"
    gathered = gather and gather_name in model.hook_dict
    if gathered:
        all_hooks.append((gather_name, _gather_hook(batch.predict_pos)))
    resume = {} if resid is None else {"start_at_layer": start_at_layer}
    with model.hooks(fwd_hooks=all_hooks):
        logits = model(batch.tokens if resid is None else resid, **batch.model_kwargs(), **resume)
    if gathered:
        logits = logits[: batch.tokens.shape[0], 0]  # any further rows pad the unembedding
    else:
        rows = torch.arange(logits.shape[0], device=logits.device)
        logits = logits[rows, batch.predict_pos.to(logits.device)]
    # At least float32 (half-precision log-probs are too coarse for KL), float64 kept as is.
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def check_finite(logprobs: Tensor, what: str = "the model's output") -> None:
    bad = ~torch.isfinite(logprobs).all(-1)
    if bool(bad.any()):
        rows = torch.nonzero(bad).flatten().tolist()
        raise FloatingPointError(
            f"NaN or inf in {what} for prompt row(s) {rows[:10]}: check those prompts and the "
            "model's dtype (fp16 overflows easily; load it in float32)."
        )


def run_with_mask(
    model: Any,
    tokens: Prompts,
    mask: Float[Tensor, "*#batch node"] | Bool[Tensor, "*#batch node"],
    ablation: Ablation | None = None,
    *,
    attention_mask: Tensor | None = None,
) -> Float[Tensor, "batch vocab"]:
    """Run ``model`` with each node scaled by ``mask`` and return next-token log-probs.

    Args:
        model: a ``TransformerBridge`` or ``HookedTransformer``.
        tokens: a prompt, a list of prompts, or token ids ``[batch, pos]`` (left or right
            padded; give ``attention_mask`` then).
        mask: ``[batch, node]`` (or ``[node]`` for every row) in [0, 1], node order as in
            ``NodeGraph.from_model(model)``; 1 keeps a node, 0 ablates it. Differentiable.
        ablation: what an ablated node is replaced with (default: ``ZeroAblation()``).
        attention_mask: 1 for real tokens, 0 for padding, when ``tokens`` is a tensor.

    Returns:
        Log-probabilities ``[batch, vocab]`` at each prompt's last real token (float32, or
        float64 for a float64 model).
    """
    graph = NodeGraph.from_model(model)
    check_hook_points(model, graph)
    ablation = ablation if ablation is not None else ZeroAblation()
    ablation.check_model(model)
    batch = tokenize(model, tokens, attention_mask)
    if batch.batch_size == 1 and isinstance(mask, Tensor) and mask.ndim == 2:
        # one prompt, many masks: the prompt is repeated for every mask row
        batch = batch.repeat_interleave(mask.shape[0])
    mask = check_mask(mask, batch.batch_size, len(graph))
    mask = mask.to(batch.tokens.device)
    with model_untouched(model):
        logprobs = forward_logprobs(model, batch, node_hooks(graph, mask, ablation, batch))
    check_finite(logprobs)
    return logprobs
