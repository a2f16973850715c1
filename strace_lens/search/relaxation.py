"""The relaxation of ``method="mask"``: soft node masks with an exact size, learned by Adam.

Each group of rows owns a score vector theta over the candidate nodes. For a row that must
keep s nodes, the soft mask is ``sigmoid((theta - t) / tau)`` with the threshold t found by
bisection so that the mask sums to exactly s: the budget holds at every step, and the gradient
concentrates on the nodes near the boundary of the top-s set. tau is annealed from
``tau_start`` to ``tau_end`` so the soft masks harden. With the straight-through relaxation
the forward pass runs the hard top-s mask (the true objective) while the gradient flows
through the soft one. All rows of a step, across prompts and sizes, run as rows of batched
forward passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from strace_lens.search.mask_options import MaskOptions
from strace_lens.search.objective import SubgraphObjective
from strace_lens.search.ranking import top_s


def threshold_mask(
    theta: Float[Tensor, "row cand"], sizes: Int[Tensor, " row"], tau: float
) -> Float[Tensor, "row cand"]:
    """``sigmoid((theta - t) / tau)`` with t per row chosen so each row sums to its size."""
    with torch.no_grad():
        lo = theta.min(-1).values - 20 * tau
        hi = theta.max(-1).values + 20 * tau
        target = sizes.to(theta.dtype)
        for _ in range(50):
            mid = (lo + hi) / 2
            total = torch.sigmoid((theta - mid[:, None]) / tau).sum(-1)
            too_big = total > target
            lo = torch.where(too_big, mid, lo)
            hi = torch.where(too_big, hi, mid)
        t = (lo + hi) / 2
    return torch.sigmoid((theta - t[:, None]) / tau)


class RowAdam:
    """Adam over the rows of a parameter matrix, updating only the rows that got a gradient."""

    def __init__(self, param: Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.99)):
        self.param, self.lr, self.betas = param, lr, betas
        self.m = torch.zeros_like(param)
        self.v = torch.zeros_like(param)
        self.t = torch.zeros(param.shape[0], dtype=param.dtype, device=param.device)

    @torch.no_grad()
    def step(self, rows: Tensor) -> None:
        grad = self.param.grad
        assert grad is not None
        b1, b2 = self.betas
        g = grad[rows]
        self.t[rows] += 1
        self.m[rows] = b1 * self.m[rows] + (1 - b1) * g
        self.v[rows] = b2 * self.v[rows] + (1 - b2) * g * g
        t = self.t[rows][:, None]
        m_hat = self.m[rows] / (1 - b1**t)
        v_hat = self.v[rows] / (1 - b2**t)
        self.param[rows] -= self.lr * m_hat / (v_hat.sqrt() + 1e-8)
        self.param.grad = None


def normalise(scores: Tensor) -> Tensor:
    centred = scores - scores.mean(-1, keepdim=True)
    return centred / centred.std(-1, unbiased=False, keepdim=True).clamp(min=1e-12)


def _tau(step: int, steps: int, opts: MaskOptions) -> float:
    if steps <= 1:
        return opts.tau_end
    frac = step / (steps - 1)
    return opts.tau_start * (opts.tau_end / opts.tau_start) ** frac


@dataclass
class StepRows:
    """The rows of one optimisation step: which scores, prompt and size each row uses."""

    group: Tensor
    prompt: Tensor
    size: Tensor


def optimise(
    objective: SubgraphObjective,
    theta: Tensor,
    steps: list[StepRows],
    opts: MaskOptions,
    track_best: bool,
) -> tuple[Tensor, Tensor] | None:
    """Adam on ``theta`` (one row of scores per group) over the given steps.

    With ``track_best`` (every step must then hold every group's rows), the hard top-s mask
    of each group and its measured objective are recorded at every straight-through step,
    and the best one seen is returned: the forward pass of a step *is* an exact evaluation.
    """
    hard_forward = opts.relaxation == "straight-through"
    theta.requires_grad_(True)
    adam = RowAdam(theta, opts.lr)
    n_groups = theta.shape[0]
    best_kl = torch.full((n_groups,), float("inf"))
    best_mask = torch.zeros(theta.shape, dtype=torch.bool)
    for step, rows in enumerate(steps):
        tau = _tau(step, len(steps), opts)
        size = rows.size.to(theta.device)
        soft = threshold_mask(theta[rows.group], size, tau)
        if hard_forward:
            hard = top_s(theta.detach()[rows.group], size).to(soft.dtype)
            mask = hard + soft - soft.detach()
        else:
            mask = soft
        weights = row_weights(rows.group)
        kl = objective.kl_backward(objective.full_mask(mask), rows.prompt, weights.to(theta.device))
        if track_best and hard_forward:
            # in the KL's own dtype: a float64 model's KL is float64
            row_kl = kl.detach().cpu() * weights.to(kl.dtype)
            group_kl = torch.zeros(n_groups, dtype=kl.dtype).index_add_(0, rows.group, row_kl)
            better = group_kl < best_kl
            best_kl = torch.where(better, group_kl, best_kl)
            hard_by_group = top_s(theta.detach(), _group_sizes(rows, n_groups).to(theta.device))
            best_mask[better] = hard_by_group.cpu()[better]
        adam.step(torch.unique(rows.group))
    theta.requires_grad_(False)
    if not (track_best and hard_forward) or not bool(torch.isfinite(best_kl).all()):
        return None
    return best_mask, best_kl


def _group_sizes(rows: StepRows, n_groups: int) -> Tensor:
    sizes = torch.zeros(n_groups, dtype=torch.long)
    sizes[rows.group] = rows.size.cpu()
    return sizes


def row_weights(group_of_row: Tensor) -> Tensor:
    """Weight 1 / (rows sharing a group): each group's loss is its rows' mean KL."""
    counts = torch.bincount(group_of_row).to(torch.float32)
    return 1.0 / counts[group_of_row]


def cycled_sizes(
    n_prompts: int, n_sizes: int, steps: int, per_step: int, gen: torch.Generator
) -> Tensor:
    """``[steps, prompts, per_step]`` size indices: each prompt cycles through a shuffled grid."""
    out = torch.empty(steps, n_prompts, per_step, dtype=torch.long)
    for p in range(n_prompts):
        seq: list[int] = []
        while len(seq) < steps * per_step:
            seq += torch.randperm(n_sizes, generator=gen).tolist()
        out[:, p] = torch.tensor(seq[: steps * per_step]).reshape(steps, per_step)
    return out


__all__ = [
    "RowAdam",
    "StepRows",
    "cycled_sizes",
    "normalise",
    "optimise",
    "row_weights",
    "threshold_mask",
]
