"""``method="mask"``: learn node masks by gradient descent, then read off exact-size subgraphs.

The relaxation. Each group of rows owns a score vector theta over the candidate nodes. For a
row that must keep s nodes, the soft mask is ``sigmoid((theta - t) / tau)`` with the threshold
t found by bisection so that the mask sums to exactly s: the budget holds at every step, and
the gradient concentrates on the nodes near the boundary of the top-s set. tau is annealed
from ``tau_start`` to ``tau_end`` so the soft masks harden, and the returned subgraph is the
top-s of theta, a hard mask of exactly s nodes, evaluated as such.

Groups and rows. With ``nested=True`` a prompt (or the whole dataset) owns one score
vector, a ranking of the nodes trained so that its top s is a good subgraph of size s; each
optimisation step trains it at ``sizes_per_step`` sizes of the grid (cycled, so all sizes
are visited). The family is then grown size by size by ``grow_nested``: each size holds the
previous subgraph plus the new nodes of the best of a dozen proposals (from the ranking, the
gradient at the current subgraph and the write-norm best-first order), each measured
exactly; on small candidate sets ``chain_refine`` then exchanges the entry sizes of two
nodes while that lowers sum log(KL + 1e-6) over the grid. With ``nested=False`` every
(prompt or dataset, size) pair owns its own scores, initialised from the ranking, and is
fine-tuned on its own size; afterwards ``swap_refine`` swaps single nodes across the boundary
of each hard mask (and tries masks grown or shrunk from the neighbouring sizes) while that
lowers the measured KL. All rows of a step, across prompts and sizes, run as rows of batched
forward passes.

Why a local search after the gradient steps: a hard mask's KL is far from linear in the
mask, so a swap predicted to help by the gradient often does not, and the best swap is often
not among the predicted best. On small candidate sets (at most 32 nodes) all the moves of
a subgraph are measured when they are at most 64; otherwise the gradient picks the few
(``refine_width``) that are. On large candidate sets the nested exchange search is off by
default (its cost; see ``chain_refine``) and the independent swap search runs two rounds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from strace_lens.search.objective import SubgraphObjective
from strace_lens.search.ranking import rank_positions as _rank_positions
from strace_lens.search.ranking import top_s

#: candidate sets up to this size are searched until no move helps
SMALL_CANDIDATE_SET = 32
#: on small candidate sets, a mask's moves are all measured when there are at most this many
FULL_NEIGHBOURHOOD = 64
#: the nested growth adds nodes one at a time while a grid step adds at most this many
GROW_SINGLE_STEPS = 4
#: the nested search scores a family by sum log(KL + CHAIN_EPS) over the grid
CHAIN_EPS = 1e-6


@dataclass(frozen=True)
class MaskOptions:
    """Options of ``method="mask"`` (validated when built)."""

    steps: int = 24  # nested-ranking steps
    finetune_steps: int = 12  # per-size steps when nested=False
    sizes_per_step: int = 1
    lr: float = 0.2
    tau_start: float = 1.0
    tau_end: float = 0.05
    init: str = "attribution"  # or "zeros"
    # "straight-through": the forward pass uses the hard top-s mask (the true objective) and
    # the gradient flows through the soft threshold mask; "soft": the soft mask throughout
    relaxation: str = "straight-through"
    refine_rounds: int | None = None  # swap-search rounds (None: auto)
    refine_width: int | None = None  # nodes on each side of the boundary tried (None: auto)
    grow_width: int = 4  # nested: single-node seeds measured per size while growing

    def __post_init__(self) -> None:
        if self.init not in ("attribution", "zeros"):
            raise ValueError(f"Unknown init {self.init!r}: use 'attribution' or 'zeros'.")
        if self.relaxation not in ("straight-through", "soft"):
            raise ValueError(
                f"Unknown relaxation {self.relaxation!r}: use 'straight-through' or 'soft'."
            )

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


def _optimise(
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
    adam = _RowAdam(theta, opts.lr)
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
        weights = _row_weights(rows.group)
        kl = objective.kl_backward(objective.full_mask(mask), rows.prompt, weights.to(theta.device))
        if track_best and hard_forward:
            group_kl = torch.zeros(n_groups).index_add_(0, rows.group, kl.cpu() * weights)
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


def _row_weights(group_of_row: Tensor) -> Tensor:
    """Weight 1 / (rows sharing a group): each group's loss is its rows' mean KL."""
    counts = torch.bincount(group_of_row).to(torch.float32)
    return 1.0 / counts[group_of_row]


def _cycled_sizes(
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


def learn_masks(
    objective: SubgraphObjective,
    sizes: Int[Tensor, " size"],
    per: str,
    nested: bool,
    init_scores: Float[Tensor, "group cand"] | None,
    options: MaskOptions | dict[str, Any],
    seed: int,
    guide: Float[Tensor, "group cand"] | None = None,
) -> Bool[Tensor, "row size cand"]:
    """Hard candidate masks ``[R, S, n_cand]`` (R = prompts, or 1 per dataset)."""
    opts = options if isinstance(options, MaskOptions) else MaskOptions.from_kwargs(options)
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
    prompt_of_row = torch.arange(n_p).repeat_interleave(opts.sizes_per_step)
    group_of_row = prompt_of_row if per == "input" else torch.zeros_like(prompt_of_row)
    stage1 = [
        StepRows(group_of_row, prompt_of_row, sizes[cyc[i].reshape(-1)]) for i in range(opts.steps)
    ]
    _optimise(objective, theta, stage1, opts, track_best=False)
    ranking = theta.detach()
    size_grid = sizes.to(device)
    hard = top_s(ranking.repeat_interleave(n_s, 0), size_grid.repeat(n_groups)).reshape(
        n_groups, n_s, n_c
    )
    if nested:
        hard = grow_nested(objective, ranking.cpu(), sizes.cpu(), per, opts, guide)
        return chain_refine(objective, hard, per, opts).cpu()

    # -- stage 2: per-size scores, fine-tuned from the ranking ------------------------------
    theta2 = ranking.repeat_interleave(n_s, 0).clone()  # group g*S + j
    if per == "input":
        rows = StepRows(
            torch.arange(n_p * n_s), torch.arange(n_p).repeat_interleave(n_s), sizes.repeat(n_p)
        )
    else:
        size_idx = torch.arange(n_s).repeat_interleave(n_p)
        rows = StepRows(size_idx, torch.arange(n_p).repeat(n_s), sizes[size_idx])
    best = _optimise(objective, theta2, [rows] * opts.finetune_steps, opts, track_best=True)
    hard = top_s(theta2, size_grid.repeat(n_groups)).reshape(n_groups, n_s, n_c)
    if best is not None:
        hard = best[0].reshape(n_groups, n_s, n_c)
    hard = swap_refine(objective, hard, per, opts)
    return hard.cpu()


def _refine_budget(opts: MaskOptions, n_c: int) -> tuple[int, int]:
    """(rounds, width) of a local search: small candidate sets are searched until no move
    helps; large ones get a short polish (every round costs a batched forward+backward)."""
    small = n_c <= SMALL_CANDIDATE_SET
    rounds = opts.refine_rounds if opts.refine_rounds is not None else (16 if small else 2)
    width = opts.refine_width if opts.refine_width is not None else (8 if small else 4)
    return rounds, width


def _full_neighbourhood(n_c: int, n_moves: int) -> bool:
    """Evaluate every move exactly when the candidate set is small and the moves are few."""
    return n_c <= SMALL_CANDIDATE_SET and n_moves <= FULL_NEIGHBOURHOOD


def grow_nested(
    objective: SubgraphObjective,
    ranking: Float[Tensor, "group cand"],
    sizes: Int[Tensor, " size"],
    per: str,
    opts: MaskOptions,
    guide: Float[Tensor, "group cand"] | None = None,
) -> Bool[Tensor, "group size cand"]:
    """A nested family grown size by size, each step chosen among proposals measured exactly.

    The subgraph of each grid size holds the one of the size before, plus d new nodes (added
    one at a time through the sizes in between while d <= ``GROW_SINGLE_STEPS``). The
    proposals for the new nodes: the top d outside nodes by the learned ranking, by the
    gradient -dKL/dm at the current subgraph (one batched forward+backward per step), by the
    ``guide`` scores when given (trace passes the order of the write-norm best-first search),
    and by all ranks together; and, for each of the ``grow_width`` best single nodes by each
    score, that node plus the best d - 1 of the rest. Every proposal is run with its hard
    mask and the lowest KL is kept. Why: a ranking read off as top-s is tuned for all sizes
    at once, so a node that helps only alongside many others can lead the family and make the
    smallest subgraphs worse than random; measuring each size's growth keeps every size honest,
    while the ranking still brings in what the gradient at one point cannot see.
    """
    n_groups, n_c = ranking.shape
    n_p = objective.n_prompts
    device = objective.logp_full.device
    current = torch.zeros(n_groups, n_c, dtype=torch.bool)
    out = torch.zeros(n_groups, len(sizes), n_c, dtype=torch.bool)
    prompt_of_row = torch.arange(n_p)
    group_of_row = prompt_of_row if per == "input" else torch.zeros_like(prompt_of_row)
    weights = _row_weights(group_of_row).to(device)
    rank_orders = {"rank": _rank_positions(ranking)}  # 0 = best
    if guide is not None:
        rank_orders["guide"] = _rank_positions(guide.float())
    targets: list[tuple[int, int]] = []  # (size, grid index or -1 for a size in between)
    held = 0
    for j, size in enumerate(sizes.tolist()):
        if size - held <= GROW_SINGLE_STEPS:
            targets += [(t, -1) for t in range(held + 1, size)]
        targets.append((size, j))
        held = size
    for size, j in targets:
        d = size - int(current[0].sum())
        if d <= 0 or size == n_c:
            current = current | (size == n_c)
            if j >= 0:
                out[:, j] = current
            continue
        m = current[group_of_row].float().to(device).requires_grad_(True)
        objective.kl_backward(objective.full_mask(m), prompt_of_row.to(device), weights)
        assert m.grad is not None
        grad = torch.zeros(n_groups, n_c).index_add_(0, group_of_row, m.grad.cpu())
        orders = {**rank_orders, "grad": _rank_positions(-grad)}
        proposals: list[Tensor] = []
        owner: list[int] = []
        for g in range(n_groups):
            outside = ~current[g]
            scores = {key: -order[g].float() for key, order in orders.items()}
            scores["all"] = -torch.stack([order[g] for order in orders.values()]).sum(0).float()
            picks = [_top_outside(score, outside, d) for score in scores.values()]
            seeds: list[int] = []
            for key in orders:
                best_single = _top_outside(scores[key], outside, opts.grow_width)
                seeds += [int(i) for i in torch.nonzero(best_single).flatten().tolist()]
            for node in dict.fromkeys(seeds):  # unique, in order
                rest = outside.clone()
                rest[node] = False
                pick = _top_outside(scores["all"], rest, d - 1)
                pick[node] = True
                picks.append(pick)
            for pick in {tuple(p.tolist()): p for p in picks}.values():
                proposals.append(current[g] | pick)
                owner.append(g)
        owners = torch.tensor(owner)
        kl = _pair_kl(objective, torch.stack(proposals), owners, 1, per, n_p)
        for g in range(n_groups):
            sel = torch.nonzero(owners == g).flatten()
            current[g] = proposals[int(sel[torch.argmin(kl[sel])])]
        if j >= 0:
            out[:, j] = current
    return out


def _top_outside(score: Tensor, outside: Tensor, k: int) -> Tensor:
    """Mask of the ``k`` highest-scoring nodes among ``outside`` (fewer if fewer are left)."""
    pick = torch.zeros_like(outside)
    k = min(k, int(outside.sum()))
    if k > 0:
        masked = torch.where(outside, score, torch.tensor(-torch.inf))
        pick[torch.topk(masked, k).indices] = True
    return pick


def swap_refine(
    objective: SubgraphObjective,
    hard: Bool[Tensor, "group size cand"],
    per: str,
    opts: MaskOptions,
) -> Bool[Tensor, "group size cand"]:
    """Local search on independent hard masks: swap one node in for one node out.

    Each round takes the gradient g = dKL/dm at every current hard mask (one batched
    forward+backward) and predicts the change of swapping member i for non-member j as
    g_j - g_i. On small candidate sets every swap is measured exactly (the prediction of a
    hard swap from a gradient is often wrong, and a missed swap leaves a local optimum); on
    large ones the ``width`` most promising are. Moves across sizes are measured too: the
    next smaller subgraph grown by one node (every node, when small) or the next larger
    shrunk, which escape single-swap optima. Each (group, size) keeps its best move when it
    lowers the KL; the search stops when no move helps or after ``refine_rounds`` rounds.
    Only pairs whose own mask or a neighbouring size's mask changed are searched again.
    """
    n_groups, n_s, n_c = hard.shape
    n_p = objective.n_prompts
    rounds, width = _refine_budget(opts, n_c)
    if rounds <= 0 or width <= 0:
        return hard
    hard = hard.clone()
    device = objective.logp_full.device
    flat = hard.view(-1, n_c)  # pair index = group * n_s + size index
    n_pairs = n_groups * n_s
    if per == "input":
        pair_of_row = torch.arange(n_pairs)
        prompt_of_row = torch.arange(n_groups).repeat_interleave(n_s)
    else:
        pair_of_row = torch.arange(n_s).repeat_interleave(n_p)
        prompt_of_row = torch.arange(n_p).repeat(n_s)
    weights = _row_weights(pair_of_row).to(device)
    active = torch.ones(n_pairs, dtype=torch.bool)
    for _ in range(rounds):
        rows = torch.nonzero(active[pair_of_row]).flatten()
        m = flat[pair_of_row[rows]].float().to(device).requires_grad_(True)
        kl_rows = objective.kl_backward(
            objective.full_mask(m), prompt_of_row[rows].to(device), weights[rows]
        )
        assert m.grad is not None
        grad = torch.zeros(n_pairs, n_c).index_add_(0, pair_of_row[rows], m.grad.cpu())
        base = torch.zeros(n_pairs).index_add_(
            0, pair_of_row[rows], kl_rows.cpu() * weights[rows].cpu()
        )
        trial_masks: list[Tensor] = []
        trial_pair: list[int] = []
        for pair in torch.nonzero(active).flatten().tolist():
            current = flat[pair]
            inside = torch.nonzero(current).flatten()
            outside = torch.nonzero(~current).flatten()
            if len(inside) == 0 or len(outside) == 0:
                continue
            predicted = grad[pair, outside][None, :] - grad[pair, inside][:, None]
            n_moves = predicted.numel()
            k = n_moves if _full_neighbourhood(n_c, n_moves) else min(width, n_moves)
            for flat_idx in torch.topk(-predicted.flatten(), k).indices.tolist():
                trial = current.clone()
                trial[int(inside[flat_idx // len(outside)])] = False
                trial[int(outside[flat_idx % len(outside)])] = True
                trial_masks.append(trial)
                trial_pair.append(pair)
            for trial in _cross_size_moves(flat, grad, pair, n_s, n_c, width):
                trial_masks.append(trial)
                trial_pair.append(pair)
        if not trial_masks:
            break
        trials = torch.stack(trial_masks)
        owners = torch.tensor(trial_pair)
        trial_kl = _pair_kl(objective, trials, owners, n_s, per, n_p)
        improved = torch.zeros(n_pairs, dtype=torch.bool)
        for pair in torch.unique(owners).tolist():
            sel = torch.nonzero(owners == pair).flatten()
            best = sel[torch.argmin(trial_kl[sel])]
            if trial_kl[best] < base[pair] * (1 - 1e-6) - 1e-12:
                flat[pair] = trials[best]
                improved[pair] = True
        # a pair is searched again when it or a neighbouring size (same group) changed
        j = torch.arange(n_pairs) % n_s
        active = improved.clone()
        active[:-1] |= improved[1:] & (j[:-1] < n_s - 1)
        active[1:] |= improved[:-1] & (j[1:] > 0)
        if not bool(active.any()):
            break
    return hard


def _cross_size_moves(
    flat: Tensor, grad: Tensor, pair: int, n_s: int, n_c: int, width: int
) -> list[Tensor]:
    """Masks for ``pair`` built from the next smaller (grown) or next larger (shrunk) size."""
    out: list[Tensor] = []
    j = pair % n_s
    target = int(flat[pair].sum())
    for other in (pair - 1, pair + 1):
        if not 0 <= j + (other - pair) < n_s:
            continue
        base_mask = flat[other]
        diff = target - int(base_mask.sum())
        if diff == 0:
            continue
        pool = torch.nonzero(~base_mask if diff > 0 else base_mask).flatten()
        if abs(diff) == 1 and _full_neighbourhood(n_c, len(pool)):
            picks = [pool[i : i + 1] for i in range(len(pool))]
        else:
            # the gradient at the other mask: add the nodes that lower KL most, drop the
            # nodes whose removal raises it least
            order = torch.argsort(grad[other, pool], descending=diff < 0)
            picks = [pool[order[: abs(diff)]]]
        for pick in picks:
            trial = base_mask.clone()
            trial[pick] = diff > 0
            if not torch.equal(trial, flat[pair]):
                out.append(trial)
    return out


def chain_refine(
    objective: SubgraphObjective,
    hard: Bool[Tensor, "group size cand"],
    per: str,
    opts: MaskOptions,
) -> Bool[Tensor, "group size cand"]:
    """Local search on nested families: exchange the entry levels of two nodes.

    A nested family over the grid is a level per node: the first grid size whose subgraph
    holds it (``n_s`` = none). Exchanging the levels of node x (level i) and node y (a later
    level k) keeps every subgraph's size and the nesting, and changes the subgraphs of the
    grid sizes i .. k-1 (x out, y in). The family is scored by the sum over grid sizes of
    log(KL + 1e-6): every size counts by its relative change, so a move may not buy a small
    gain at one size with a large relative loss at another. Each round takes dKL/dm at every
    grid subgraph (one batched forward+backward), predicts each exchange's change of the score
    to first order, measures the best predicted (all of them on small candidate sets) exactly,
    and keeps the best per group when it lowers the score.
    """
    n_groups, n_s, n_c = hard.shape
    n_p = objective.n_prompts
    rounds, width = _refine_budget(opts, n_c)
    if opts.refine_rounds is None and n_c > SMALL_CANDIDATE_SET:
        # on large candidate sets an exchange may change every grid subgraph (a node moved
        # from the first size to none), so a round costs up to width x sizes extra rows per
        # prompt, and one accepted exchange per round barely moves a family of hundreds of
        # nodes: off unless asked for (refine_rounds=...)
        rounds = 0
    if rounds <= 0 or width <= 0 or n_s < 1:
        return hard
    device = objective.logp_full.device
    # level of each node: number of grid subgraphs that do not hold it
    level = (~hard).sum(1)  # [group, cand], in 0..n_s
    eps = CHAIN_EPS
    for _ in range(rounds):
        masks = level[:, None, :] <= torch.arange(n_s)[None, :, None]  # [group, size, cand]
        if per == "input":
            prompt_of_row = torch.arange(n_groups).repeat_interleave(n_s)
            m_rows = masks.reshape(-1, n_c)
            level_of_row = torch.arange(n_s).repeat(n_groups)
            group_of_row = prompt_of_row
        else:
            m_rows = masks[0].repeat_interleave(n_p, 0)
            prompt_of_row = torch.arange(n_p).repeat(n_s)
            level_of_row = torch.arange(n_s).repeat_interleave(n_p)
            group_of_row = torch.zeros_like(prompt_of_row)
        weights = torch.full((len(m_rows),), 1.0 / (n_p if per == "dataset" else 1))
        m = m_rows.float().to(device).requires_grad_(True)
        kl_rows = objective.kl_backward(
            objective.full_mask(m), prompt_of_row.to(device), weights.to(device)
        ).cpu()
        assert m.grad is not None
        cell = group_of_row * n_s + level_of_row
        grad = torch.zeros(n_groups * n_s, n_c).index_add_(0, cell, m.grad.cpu())
        kl = torch.zeros(n_groups * n_s).index_add_(0, cell, kl_rows * weights)
        grad, kl = grad.view(n_groups, n_s, n_c), kl.view(n_groups, n_s)
        # cumulative sensitivity of the score: cum[g, j, x] = sum over sizes < j
        h = grad / (kl[..., None] + eps)
        cum = torch.cat([torch.zeros(n_groups, 1, n_c), h.cumsum(1)], 1)  # [g, S+1, c]
        trials: list[Tensor] = []
        owner: list[int] = []
        for g in range(n_groups):
            lv = level[g]
            # predicted change of exchanging x (earlier level) with y, to first order:
            # sum over sizes j in [lv_x, lv_y) of h_j[y] - h_j[x]
            #   = (C[lv_y, y] - C[lv_x, y]) - (C[lv_y, x] - C[lv_x, x])
            at_level = cum[g][lv]  # [x, y] = C[lv_x, y]
            own = at_level.diagonal()  # C[lv_x, x]
            predicted = own[None, :] - at_level - at_level.T + own[:, None]
            valid = lv[:, None] < lv[None, :]
            n_moves = int(valid.sum())
            if n_moves == 0:
                continue
            predicted = torch.where(valid, predicted, torch.inf)
            k = n_moves if _full_neighbourhood(n_c, n_moves) else min(width, n_moves)
            for idx in torch.topk(-predicted.flatten(), k).indices.tolist():
                x, y = divmod(idx, n_c)
                new = lv.clone()
                new[x], new[y] = lv[y], lv[x]
                trials.append(new)
                owner.append(g)
        if not trials:
            break
        new_levels = torch.stack(trials)
        owners = torch.tensor(owner)
        gain = _chain_gain(objective, level, new_levels, owners, kl, per, eps)
        improved = False
        for g in torch.unique(owners).tolist():
            sel = torch.nonzero(owners == g).flatten()
            best = sel[torch.argmin(gain[sel])]
            if gain[best] < -1e-9:
                level[g] = new_levels[best]
                improved = True
        if not improved:
            break
    return level[:, None, :] <= torch.arange(n_s)[None, :, None]


def _chain_gain(
    objective: SubgraphObjective,
    level: Tensor,
    new_levels: Tensor,
    owners: Tensor,
    kl: Tensor,
    per: str,
    eps: float,
) -> Tensor:
    """Exact change of sum_j log(KL_j + eps) for each trial family (only changed sizes run)."""
    n_s = kl.shape[1]
    n_p = objective.n_prompts
    sizes_idx = torch.arange(n_s)
    masks, trial_of, size_of = [], [], []
    for t, (new, g) in enumerate(zip(new_levels, owners.tolist())):
        new_m = new[None, :] <= sizes_idx[:, None]
        old_m = level[g][None, :] <= sizes_idx[:, None]
        for j in torch.nonzero((new_m != old_m).any(-1)).flatten().tolist():
            masks.append(new_m[j])
            trial_of.append(t)
            size_of.append(j)
    trial_t, size_t = torch.tensor(trial_of), torch.tensor(size_of)
    owner_of_row = owners[trial_t]
    if per == "input":
        new_kl = _pair_kl(objective, torch.stack(masks), owner_of_row * n_s, n_s, per, n_p)
    else:
        new_kl = _pair_kl(objective, torch.stack(masks), size_t, n_s, per, n_p)
    old_kl = kl[owner_of_row, size_t]
    delta = torch.log(new_kl + eps) - torch.log(old_kl + eps)
    return torch.zeros(len(new_levels)).index_add_(0, trial_t, delta)


def _pair_kl(
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
