"""Edge weights of the paper's graph: each edge's L1 norm over the edges entering its target.

One clean forward pass caches, per block, the attention pattern, the values, the states
before the block and between its attention and MLP, and the MLP branch. Then, for each
prompt of the batch (right-padded rows; a row's first T positions are its own prompt):

- attention edge ``a{l}.h{h}:{j}->{t}``: ``A[h, t, j] * ||v_j W_O^h||_1``. As A >= 0 the
  pattern factors out of the norm, so only ``[head, pos, d_model]`` vectors are formed,
  never a ``[T, T, H, d]`` tensor. Grouped-query models repeat each key/value head for the
  query heads that share it, as their attention does.
- residual edges: ``||resid_pre[t]||_1`` (into the attention node) and ``||resid_mid[t]||_1``
  (into the MLP node); MLP edge: ``||mlp_out[t]||_1``, the branch as added to the stream.
- each weight is divided by the sum of the weights entering the same node (local weights,
  not multiplied along paths). Attention output biases (``b_O``) are not edges and are left
  out of the sums.

Norms between an edge and its target are linearised at the clean run, so that an edge's
vector is its own contribution to the target: the norm's scale (``1 / rms`` or ``1 / std``)
is frozen at the clean input and its weight applied (a LayerNorm also centres). Two norms
sit there: Gemma 3's post-attention norm (``blocks.{l}.ln1_post``), between every head's
edge and its attention node; and the final norm (``ln_final``), linearised into all four
kinds of edges of the last block, whose nodes are read by the unembedding only through it.
Gemma's post-feedforward norm is inside the MLP edge (the edge is the whole branch), so it
needs no linearisation. Each linearisation is checked against the norm module itself on the
clean input, so an unknown norm formula raises instead of giving wrong weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from strace_lens.edges.graph import EdgeGraph
from strace_lens.hygiene import model_untouched
from strace_lens.inputs import TokenBatch
from strace_lens.masked_forward import check_finite, forward_logprobs

LinearMap = Callable[[Tensor], Tensor]


def norm_linearisation(model: Any, norm: Any, x: Float[Tensor, "... d"]) -> tuple[Tensor, bool]:
    """The frozen-scale linear map of a norm module at input ``x``: ``(scale, centre)``.

    The map is ``c -> scale * (c - mean(c) if centre else c)`` with ``scale [..., d]``.
    """
    module = getattr(norm, "original_component", norm)
    cfg = model.cfg
    centre = isinstance(module, torch.nn.LayerNorm) or (
        "layernorm" in type(module).__name__.lower() and "rms" not in type(module).__name__.lower()
    )
    eps = getattr(module, "eps", None) or getattr(module, "variance_epsilon", None) or cfg.eps
    xf = x.double()
    centred = xf - xf.mean(-1, keepdim=True) if centre else xf
    inv = (centred.pow(2).mean(-1, keepdim=True) + float(eps)).rsqrt()
    weight = getattr(module, "weight", None)
    gain = torch.ones(x.shape[-1], dtype=torch.float64, device=x.device)
    if weight is not None:
        gain = weight.detach().double()
        if not centre and bool(getattr(cfg, "rmsnorm_uses_offset", False)):
            gain = 1.0 + gain  # Gemma's RMSNorm scales by (1 + weight)
    scale = gain * inv
    bias = getattr(module, "bias", None)
    rebuilt = scale * centred + (bias.detach().double() if bias is not None else 0.0)
    with torch.no_grad():
        actual = norm(x).double()
    tol = 1e-4 * float(actual.abs().max().clamp(min=1.0))
    if not torch.allclose(rebuilt, actual, atol=tol, rtol=1e-3):
        raise NotImplementedError(
            f"Cannot linearise the norm {type(module).__name__}: its output differs from "
            f"weight * x / rms(x) by {float((rebuilt - actual).abs().max()):.3g}."
        )
    return scale, centre


def _apply(scale: Tensor, centre: bool, c: Tensor) -> Tensor:
    return scale * (c - c.mean(-1, keepdim=True) if centre else c)


def head_source_vectors(
    w_o: Float[Tensor, "head d_head d_model"], v: Float[Tensor, "pos kv d_head"]
) -> Float[Tensor, "head pos d_model"]:
    """``v_j W_O^h`` for every query head h and source position j (kv heads repeated)."""
    # grouped-query heads: kv head k serves query heads k * rep .. (k + 1) * rep - 1
    v_q = einops.repeat(v, "pos kv d -> pos (kv rep) d", rep=w_o.shape[0] // v.shape[1])
    return torch.einsum("phd,hde->hpe", v_q.to(w_o.dtype), w_o)


def _cache_names(model: Any, layer: int) -> dict[str, str]:
    names = {
        "pattern": f"blocks.{layer}.attn.hook_pattern",
        "v": f"blocks.{layer}.attn.hook_v",
        "pre": f"blocks.{layer}.hook_resid_pre",
        "mid": f"blocks.{layer}.hook_resid_mid",
        "mlp": f"blocks.{layer}.hook_mlp_out",
        "post": f"blocks.{layer}.hook_resid_post",
    }
    post_attn_norm = f"blocks.{layer}.ln1_post.hook_in"
    if post_attn_norm in model.hook_dict:
        names["attn_raw"] = post_attn_norm
    return names


@torch.no_grad()
def clean_cache(
    model: Any, batch: TokenBatch
) -> tuple[list[dict[str, Tensor]], Float[Tensor, "batch vocab"]]:
    """One clean forward: per block the tensors the weights need, and the clean log-probs."""
    n_layers = int(model.cfg.n_layers)
    cache: list[dict[str, Tensor]] = [{} for _ in range(n_layers)]
    hooks: list[tuple[str, Any]] = []
    for layer in range(n_layers):
        for key, name in _cache_names(model, layer).items():

            def save(x: Tensor, hook: Any, layer: int = layer, key: str = key) -> None:
                cache[layer][key] = x.detach()

            hooks.append((name, save))
    with model_untouched(model):
        logprobs = forward_logprobs(model, batch, hooks)
    check_finite(logprobs)
    return cache, logprobs


def _block_weights(
    model: Any,
    w_o: Tensor,
    layer: int,
    c: dict[str, Tensor],
    row: int,
    n_pos: int,
    last: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Unnormalised (attention [head, q, k], residual [2, pos], MLP [pos]) L1 norms."""
    t = n_pos
    pattern = c["pattern"][row, :, :t, :t].double()
    u = head_source_vectors(w_o, c["v"][row, :t]).double()  # [head, pos, d]
    pre, mid, mlp = (c[k][row, :t].double() for k in ("pre", "mid", "mlp"))
    if "attn_raw" in c:
        s_post, _ = norm_linearisation(model, model.blocks[layer].ln1_post, c["attn_raw"][row, :t])
    else:
        s_post = None
    if not last:
        if s_post is None:
            attn = pattern * u.abs().sum(-1)[:, None, :]
        else:
            attn = pattern * torch.einsum("qe,hke->hqk", s_post.abs(), u.abs())
        resid = torch.stack([pre.abs().sum(-1), mid.abs().sum(-1)])
        return attn, resid, mlp.abs().sum(-1)
    # last block: every edge enters a node at position t - 1 and goes through the final norm
    scale, centre = norm_linearisation(model, model.ln_final, c["post"][row, t - 1])
    vecs = u if s_post is None else s_post[t - 1] * u

    def l1(x: Tensor) -> Tensor:
        return _apply(scale, centre, x).abs().sum(-1)

    attn = torch.zeros_like(pattern)
    attn[:, t - 1] = pattern[:, t - 1] * l1(vecs)
    resid = torch.zeros(2, t, dtype=torch.float64, device=pattern.device)
    resid[0, t - 1], resid[1, t - 1] = l1(pre[t - 1]), l1(mid[t - 1])
    mlp_w = torch.zeros(t, dtype=torch.float64, device=pattern.device)
    mlp_w[t - 1] = l1(mlp[t - 1])
    return attn, resid, mlp_w


def normalise(
    attn: Float[Tensor, "layer head q k"],
    resid: Float[Tensor, "layer two pos"],
    mlp: Float[Tensor, "layer pos"],
) -> tuple[Tensor, Tensor, Tensor]:
    """Divide each weight by the sum of the weights entering the same node."""
    into_attn = einops.reduce(attn, "layer head q k -> layer q", "sum") + resid[:, 0]
    into_mlp = mlp + resid[:, 1]
    tiny = torch.finfo(attn.dtype).tiny
    a_tot, m_tot = into_attn.clamp(min=tiny), into_mlp.clamp(min=tiny)
    resid_n = torch.stack([resid[:, 0] / a_tot, resid[:, 1] / m_tot], dim=1)
    return attn / a_tot[:, None, :, None], resid_n, mlp / m_tot


def prompt_weights(
    model: Any, w_o: Tensor, cache: list[dict[str, Tensor]], row: int, n_pos: int
) -> Float[Tensor, " edge"]:
    """Normalised weights of every edge of one prompt's graph, by compact edge id (float64).

    ``w_o``: ``model.W_O`` (``[layer, head, d_head, d_model]``; the bridge builds it anew at
    every access, so callers read it once).
    """
    n_layers = int(model.cfg.n_layers)
    parts = [
        _block_weights(model, w_o[layer], layer, cache[layer], row, n_pos, layer == n_layers - 1)
        for layer in range(n_layers)
    ]
    attn, resid, mlp = (torch.stack(p) for p in zip(*parts))
    attn, resid, mlp = normalise(attn, resid, mlp)
    dense = torch.cat([attn.flatten(), resid.flatten(), mlp.flatten()]).cpu()
    graph = EdgeGraph.from_model(model, n_pos)
    return dense[graph.dense_ids]


def edge_weights(
    model: Any, batch: TokenBatch
) -> tuple[list[Float[Tensor, " edge"]], Float[Tensor, "batch vocab"]]:
    """Edge weights of each prompt of a right-padded batch, and the clean log-probs."""
    if batch.has_left_padding:
        raise ValueError("Edge graphs index positions: give right-padded token rows.")
    cache, logprobs = clean_cache(model, batch)
    lengths = (batch.predict_pos + 1).tolist()
    with torch.no_grad():
        w_o = model.W_O.detach()
        weights = [prompt_weights(model, w_o, cache, row, n) for row, n in enumerate(lengths)]
    return weights, logprobs
