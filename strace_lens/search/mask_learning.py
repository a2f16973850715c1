"""``method="mask"``: learn node masks by gradient descent, then read off exact-size subgraphs.

The relaxation. Each group of rows owns a score vector theta over the candidate nodes. For a
row that must keep s nodes, the soft mask is ``sigmoid((theta - t) / tau)`` with the threshold
t found by bisection so that the mask sums to exactly s: the budget holds at every step, and
the gradient concentrates on the nodes near the boundary of the top-s set. tau is annealed
from ``tau_start`` to ``tau_end`` so the soft masks harden, and the returned subgraph is the
top-s of theta, a hard mask of exactly s nodes, evaluated as such.

Groups and rows. With ``nested=True`` a prompt (or the whole dataset) owns one score
vector, a ranking of the nodes: the subgraph of size s is its top s, so subgraphs are nested,
and each optimisation step trains it at ``sizes_per_step`` sizes of the grid (cycled, so all
sizes are visited). With ``nested=False`` every (prompt or dataset, size) pair owns its own
scores, initialised from the nested ranking, and is fine-tuned on its own size; afterwards a
local search swaps single nodes across the boundary of each hard mask while that lowers the
measured KL. All rows of a step, across prompts and sizes, run as rows of batched forward
passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from strace_lens.search.objective import SubgraphObjective


@dataclass
class MaskOptions:
    steps: int = 24  # nested-ranking steps
    finetune_steps: int = 12  # per-size steps when nested=False
    sizes_per_step: int = 1
    lr: float = 0.2
    tau_start: float = 1.0
    tau_end: float = 0.05
    init: str = "attribution"  # or "zeros"
    refine_rounds: int | None = None  # swap-search rounds (None: auto)
    refine_width: int | None = None  # nodes on each side of the boundary tried (None: auto)

    @classmethod
    def from_kwargs(cls, options: dict[str, Any]) -> MaskOptions:
        known = set(cls.__dataclass_fields__)
        unknown = set(options) - known
        if unknown:
            raise TypeError(
                f"Unknown option(s) for method='mask': {sorted(unknown)}; known: {sorted(known)}."
            )
        return cls(**options)


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


def top_s(scores: Float[Tensor, "row cand"], sizes: Int[Tensor, " row"]) -> Bool[Tensor, "row cand"]:
    """Hard masks of exactly ``sizes[r]`` highest-scoring candidates (ties: lower index)."""
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return ranks < sizes[:, None].to(ranks.device)


class _RowAdam:
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


def _normalise(scores: Tensor) -> Tensor:
    centred = scores - scores.mean(-1, keepdim=True)
    return centred / centred.std(-1, keepdim=True).clamp(min=1e-12)


def _tau(step: int, steps: int, opts: MaskOptions) -> float:
    if steps <= 1:
        return opts.tau_end
    frac = step / (steps - 1)
    return opts.tau_start * (opts.tau_end / opts.tau_start) ** frac


def _optimise(
    objective: SubgraphObjective,
    theta: Tensor,
    group_of_row: Tensor,
    prompt_of_row: Tensor,
    size_of_row: Tensor,
    schedule: list[Tensor],
    opts: MaskOptions,
    generator: torch.Generator,
) -> None:
    """Run Adam on ``theta`` over ``len(schedule)`` steps; ``schedule[i]``: the rows of step i."""
    theta.requires_grad_(True)
    adam = _RowAdam(theta, opts.lr)
    n_steps = len(schedule)
    weights_all = _row_weights(group_of_row)
    for step, rows in enumerate(schedule):
        tau = _tau(step, n_steps, opts)
        groups = group_of_row[rows]
        soft = threshold_mask(theta[groups], size_of_row[rows], tau)
        objective.kl_backward(objective.full_mask(soft), prompt_of_row[rows], weights_all[rows])
        adam.step(torch.unique(groups))
    theta.requires_grad_(False)


def _row_weights(group_of_row: Tensor) -> Tensor:
    """Weight 1 / (rows sharing a group): each group's loss is its rows' mean KL."""
    counts = torch.bincount(group_of_row).to(torch.float32)
    return 1.0 / counts[group_of_row]


def _cycled_sizes(n_prompts: int, n_sizes: int, steps: int, per_step: int, gen: torch.Generator) -> Tensor:
    """``[steps, prompts, per_step]`` size indices: each prompt cycles through a shuffled grid."""
    out = torch.empty(steps, n_prompts, per_step, dtype=torch.long)
    for p in range(n_prompts):
        seq: list[int] = []
        while len(seq) < steps * per_step:
            seq += torch.randperm(n_sizes, generator=gen).tolist()
        out[:, p] = torch.tensor(seq[: steps * per_step]).reshape(steps, per_step)
    return out


def learn_masks(
    objective: SubgraphObjective,
    sizes: Int[Tensor, " size"],
    per: str,
    nested: bool,
    init_scores: Float[Tensor, "group cand"] | None,
    options: dict[str, Any],
    seed: int,
) -> Bool[Tensor, "row size cand"]:
    """Hard candidate masks ``[R, S, n_cand]`` (R = prompts, or 1 per dataset)."""
    opts = MaskOptions.from_kwargs(options)
    gen = torch.Generator().manual_seed(seed)
    n_p, n_s = objective.n_prompts, len(sizes)
    n_c = int(objective.candidates.sum())
    n_groups = n_p if per == "input" else 1
    device = objective.logp_full.device

    # -- stage 1: one ranking per prompt (or for the dataset) -------------------------------
    if init_scores is not None and opts.init == "attribution":
        theta = _normalise(init_scores.to(device).float()).clone()
    else:
        theta = 0.01 * torch.randn(n_groups, n_c, generator=gen).to(device)
    cyc = _cycled_sizes(n_p, n_s, opts.steps, opts.sizes_per_step, gen)
    # rows: every (prompt, size-slot) pair; row index = (step-local) enumeration
    prompt_of_row = torch.arange(n_p).repeat_interleave(opts.sizes_per_step)
    group_of_row = prompt_of_row if per == "input" else torch.zeros_like(prompt_of_row)
    schedule_sizes = [sizes[cyc[i].reshape(-1)] for i in range(opts.steps)]
    _optimise_steps(objective, theta, group_of_row, prompt_of_row, schedule_sizes, opts, gen)
    ranking = theta.detach()
    size_grid = sizes.to(device)
    hard = top_s(
        ranking.repeat_interleave(n_s, 0), size_grid.repeat(n_groups)
    ).reshape(n_groups, n_s, n_c)
    if nested:
        return hard.cpu()

    # -- stage 2: per-size scores, fine-tuned from the ranking ------------------------------
    theta2 = ranking.repeat_interleave(n_s, 0).clone()  # group g*S + j
    if opts.finetune_steps > 0:
        if per == "input":
            prompt_of_row = torch.arange(n_p).repeat_interleave(n_s)
            group_of_row = torch.arange(n_p * n_s)
            size_of_row = sizes.repeat(n_p)
        else:
            prompt_of_row = torch.arange(n_p).repeat(n_s)
            size_idx = torch.arange(n_s).repeat_interleave(n_p)
            group_of_row = size_idx
            size_of_row = sizes[size_idx]
        schedule = [torch.arange(len(prompt_of_row))] * opts.finetune_steps
        fine = MaskOptions(**{**opts.__dict__, "tau_start": opts.tau_start / 2})
        _optimise(objective, theta2, group_of_row, prompt_of_row, size_of_row.to(device), schedule, fine, gen)
    hard = top_s(theta2, size_grid.repeat(n_groups)).reshape(n_groups, n_s, n_c)
    hard = swap_refine(objective, hard, theta2.reshape(n_groups, n_s, n_c), per, opts)
    return hard.cpu()


def _optimise_steps(
    objective: SubgraphObjective,
    theta: Tensor,
    group_of_row: Tensor,
    prompt_of_row: Tensor,
    schedule_sizes: list[Tensor],
    opts: MaskOptions,
    gen: torch.Generator,
) -> None:
    """Stage-1 loop: the same rows every step, each with this step's size."""
    theta.requires_grad_(True)
    adam = _RowAdam(theta, opts.lr)
    weights = _row_weights(group_of_row)
    all_groups = torch.unique(group_of_row)
    for step, row_sizes in enumerate(schedule_sizes):
        tau = _tau(step, len(schedule_sizes), opts)
        soft = threshold_mask(theta[group_of_row], row_sizes.to(theta.device), tau)
        objective.kl_backward(objective.full_mask(soft), prompt_of_row, weights)
        adam.step(all_groups)
    theta.requires_grad_(False)


def swap_refine(
    objective: SubgraphObjective,
    hard: Bool[Tensor, "group size cand"],
    scores: Float[Tensor, "group size cand"],
    per: str,
    opts: MaskOptions,
) -> Bool[Tensor, "group size cand"]:
    """Local search on hard masks: swap one node in for one node out while KL drops.

    Each round tries, for every (group, size), the swaps between the ``width`` weakest
    members and the ``width`` strongest non-members (by learned score), all as rows of
    batched forward passes, and keeps the best swap if it lowers the KL.
    """
    n_groups, n_s, n_c = hard.shape
    n_p = objective.n_prompts
    width = opts.refine_width if opts.refine_width is not None else (n_c if n_c <= 16 else 3)
    rounds = opts.refine_rounds
    if rounds is None:
        rounds = 3 if n_c <= 16 else 0
    if rounds <= 0 or width <= 0:
        return hard
    hard = hard.clone()
    device = objective.logp_full.device
    for _ in range(rounds):
        cand_masks, cand_owner = [], []  # owner: (group, size index)
        for g in range(n_groups):
            for j in range(n_s):
                current = hard[g, j]
                s = int(current.sum())
                if s == 0 or s == n_c:
                    continue
                sc = scores[g, j].to(device)
                inside = torch.nonzero(current).flatten()
                outside = torch.nonzero(~current).flatten()
                inside = inside[torch.argsort(sc[inside])][:width]
                outside = outside[torch.argsort(sc[outside], descending=True)][:width]
                for i_node in inside.tolist():
                    for o_node in outside.tolist():
                        m = current.clone()
                        m[i_node] = False
                        m[o_node] = True
                        cand_masks.append(m)
                        cand_owner.append((g, j))
        if not cand_masks:
            break
        masks = torch.stack(cand_masks)
        base = hard.reshape(-1, n_c)
        owners = torch.tensor([g * n_s + j for g, j in cand_owner])
        all_masks = torch.cat([base, masks])
        all_owner = torch.cat([torch.arange(n_groups * n_s), owners])
        kl = _group_kl(objective, all_masks, all_owner, n_s, per, n_p)
        base_kl, cand_kl = kl[: n_groups * n_s], kl[n_groups * n_s :]
        improved = False
        for owner in range(n_groups * n_s):
            sel = torch.nonzero(owners == owner).flatten()
            if len(sel) == 0:
                continue
            best = sel[torch.argmin(cand_kl[sel])]
            if cand_kl[best] < base_kl[owner] * (1 - 1e-6) - 1e-12:
                hard.view(-1, n_c)[owner] = masks[best]
                improved = True
        if not improved:
            break
    return hard


def _group_kl(
    objective: SubgraphObjective,
    masks: Bool[Tensor, "row cand"],
    owner: Int[Tensor, " row"],
    n_s: int,
    per: str,
    n_p: int,
) -> Float[Tensor, " row"]:
    """KL of each candidate mask for its owner: its prompt, or the mean over all prompts."""
    device = objective.logp_full.device
    if per == "input":
        prompt = owner // n_s
        full = objective.full_mask(masks.float().to(device))
        return objective.kl(full, prompt.to(device)).cpu()
    rows = masks.repeat_interleave(n_p, 0)
    prompts = torch.arange(n_p).repeat(len(masks))
    full = objective.full_mask(rows.float().to(device))
    kl = objective.kl(full, prompts.to(device)).cpu()
    return kl.reshape(len(masks), n_p).mean(-1)
