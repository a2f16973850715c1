"""Fidelity of a subgraph's next-token distribution to the full model's, computed in log space.

All functions take log-probabilities ``[..., vocab]`` (as :func:`run_with_mask` returns) and
reduce over the last axis, so a whole batch of (prompt, size) rows is scored at once. Tokens
with zero probability contribute exactly zero (never NaN).
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

#: The nucleus levels of the paper, in percent.
NUCLEUS_LEVELS: tuple[int, ...] = (1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 99)


def kl_divergence(
    logp_full: Float[Tensor, "... vocab"], logp_sub: Float[Tensor, "... vocab"]
) -> Float[Tensor, "..."]:
    """KL(P_full || P_sub) in nats; +inf where the subgraph gives zero to a full-model token."""
    p = logp_full.exp()
    terms = p * (logp_full - logp_sub)
    terms = torch.where(p > 0, terms, torch.zeros_like(terms))
    return terms.sum(-1).clamp(min=0.0)


def tv_distance(
    logp_full: Float[Tensor, "... vocab"], logp_sub: Float[Tensor, "... vocab"]
) -> Float[Tensor, "..."]:
    """Total variation distance 0.5 * sum |p_full - p_sub|, in [0, 1]."""
    return 0.5 * (logp_full.exp() - logp_sub.exp()).abs().sum(-1).clamp(max=2.0)


def entropy(logp: Float[Tensor, "... vocab"]) -> Float[Tensor, "..."]:
    """Shannon entropy in nats."""
    p = logp.exp()
    terms = torch.where(p > 0, -p * logp, torch.zeros_like(p))
    return terms.sum(-1)


def _nucleus_sizes(sorted_p: Tensor, levels: Tensor) -> Tensor:
    """Number of top tokens whose cumulative probability first reaches each level."""
    cum = sorted_p.double().cumsum(-1)
    # small slack so that a distribution summing to 1 - 1e-7 still reaches the 99 % level
    cum = cum / cum[..., -1:].clamp(min=1e-30)
    target = levels.double().to(cum.device).expand(*cum.shape[:-1], -1).contiguous()
    k = torch.searchsorted(cum.contiguous(), target - 1e-12) + 1
    return k.clamp(max=sorted_p.shape[-1])


def shared_nucleus(
    logp_full: Float[Tensor, "... vocab"],
    logp_sub: Float[Tensor, "... vocab"],
    levels: tuple[int, ...] = NUCLEUS_LEVELS,
) -> Float[Tensor, "..."]:
    """Largest nucleus level (percent) whose top-p token lists agree, order included; 0 if none.

    The top-p nucleus of a distribution is its shortest list of most probable tokens whose
    cumulative probability reaches p. Two nuclei are identical when they hold the same tokens
    in the same order.
    """
    frac = torch.tensor([lv / 100.0 for lv in levels], dtype=torch.float64)
    p_full, idx_full = logp_full.exp().sort(dim=-1, descending=True, stable=True)
    p_sub, idx_sub = logp_sub.exp().sort(dim=-1, descending=True, stable=True)
    k_full = _nucleus_sizes(p_full, frac)
    k_sub = _nucleus_sizes(p_sub, frac)
    # length of the common prefix of the two ranked token lists
    prefix = (idx_full == idx_sub).long().cumprod(-1).sum(-1, keepdim=True)
    same = (k_full == k_sub) & (k_full <= prefix)
    level_values = torch.tensor(levels, dtype=torch.float32, device=same.device)
    zeros = torch.zeros_like(same, dtype=torch.float32)
    scored = torch.where(same, level_values.expand_as(same), zeros)
    return scored.max(-1).values


def fidelity(
    logp_full: Float[Tensor, "... vocab"], logp_sub: Float[Tensor, "... vocab"]
) -> dict[str, Tensor]:
    """KL, TV and shared nucleus of a subgraph against the full model, all at once."""
    return {
        "kl": kl_divergence(logp_full, logp_sub),
        "tv": tv_distance(logp_full, logp_sub),
        "nucleus": shared_nucleus(logp_full, logp_sub),
    }
