"""Hard masks from scores: the top s candidates of each row (shared by every search method)."""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


def top_s(
    scores: Float[Tensor, "row cand"], sizes: Int[Tensor, " row"]
) -> Bool[Tensor, "row cand"]:
    """Hard masks of exactly ``sizes[r]`` highest-scoring candidates (ties: lower index)."""
    ranks = rank_positions(scores)
    return ranks < sizes[:, None].to(ranks.device)


def top_s_grid(
    scores: Float[Tensor, "group cand"], sizes: Int[Tensor, " size"]
) -> Bool[Tensor, "group size cand"]:
    """``top_s`` of every row of ``scores`` at every size of the grid."""
    n_rows, n_c = scores.shape
    flat = top_s(scores.repeat_interleave(len(sizes), 0), sizes.repeat(n_rows))
    return flat.reshape(n_rows, len(sizes), n_c)


def rank_positions(scores: Float[Tensor, "row cand"]) -> Int[Tensor, "row cand"]:
    """Position of each entry when its row is sorted by descending score (0 = highest; ties:
    lower index first)."""
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    pos = torch.empty_like(order)
    pos.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return pos


__all__ = ["rank_positions", "top_s", "top_s_grid"]
