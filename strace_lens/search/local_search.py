"""The local searches of ``method="mask"``, run on hard masks after the gradient steps.

Why a local search: a hard mask's KL is far from linear in the mask, so a swap predicted to
help by the gradient often does not, and the best swap is often not among the predicted best.
On small candidate sets (at most 32 nodes) all the moves of a subgraph are measured when they
are at most 64; otherwise the gradient picks the few (``refine_width``) that are.

- ``swap_refine`` (independent masks): swap single nodes across the boundary of each hard
  mask, and try masks grown or shrunk from the neighbouring sizes.
- ``chain_refine`` (nested families): exchange the entry sizes of two nodes while that lowers
  sum log(KL + 1e-6) over the grid, and on sets of at most ``INSERTION_CANDIDATES`` nodes,
  where no exchange helps, move one node to another place in the family's order; off by
  default on large candidate sets (its cost).
"""

from __future__ import annotations

import torch
from jaxtyping import Bool
from torch import Tensor

from strace_lens.search.grouping import RowGrouping, as_grouping
from strace_lens.search.mask_options import MaskOptions
from strace_lens.search.objective import SubgraphObjective
from strace_lens.search.relaxation import row_weights
from strace_lens.types import Per

#: candidate sets up to this size are searched until no move helps
SMALL_CANDIDATE_SET = 32
#: on small candidate sets, a mask's moves are all measured when there are at most this many
FULL_NEIGHBOURHOOD = 64
#: the nested search scores a family by sum log(KL + CHAIN_EPS) over the grid
CHAIN_EPS = 1e-6
#: on candidate sets up to this size, the nested exchange search that no exchange improves
#: measures every insertion too (n (n - 1) families, each changing the sizes in between)
INSERTION_CANDIDATES = 12


def refine_budget(opts: MaskOptions, n_c: int) -> tuple[int, int]:
    """(rounds, width) of a local search: small candidate sets are searched until no move
    helps; large ones get a short polish (every round costs a batched forward+backward)."""
    small = n_c <= SMALL_CANDIDATE_SET
    rounds = opts.refine_rounds if opts.refine_rounds is not None else (16 if small else 2)
    width = opts.refine_width if opts.refine_width is not None else (8 if small else 4)
    return rounds, width


def _full_neighbourhood(n_c: int, n_moves: int) -> bool:
    """Evaluate every move exactly when the candidate set is small and the moves are few."""
    return n_c <= SMALL_CANDIDATE_SET and n_moves <= FULL_NEIGHBOURHOOD


def swap_refine(
    objective: SubgraphObjective,
    hard: Bool[Tensor, "group size cand"],
    per: Per | RowGrouping,
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
    rounds, width = refine_budget(opts, n_c)
    if rounds <= 0 or width <= 0:
        return hard
    hard = hard.clone()
    device = objective.logp_full.device
    flat = hard.view(-1, n_c)  # pair index = group * n_s + size index
    n_pairs = n_groups * n_s
    grouping = as_grouping(per, n_p)
    pair_of_row, prompt_of_row = grouping.pair_rows(n_s)
    weights = row_weights(pair_of_row).to(device)
    active = torch.ones(n_pairs, dtype=torch.bool)
    for _ in range(rounds):
        rows = torch.nonzero(active[pair_of_row]).flatten()
        m = flat[pair_of_row[rows]].float().to(device).requires_grad_(True)
        kl_rows = objective.kl_backward(
            objective.full_mask(m), prompt_of_row[rows].to(device), weights[rows]
        )
        assert m.grad is not None
        grad = torch.zeros(n_pairs, n_c).index_add_(0, pair_of_row[rows], m.grad.cpu())
        base = torch.zeros(n_pairs, dtype=kl_rows.dtype).index_add_(  # float64 models: float64
            0, pair_of_row[rows], kl_rows.detach().cpu() * weights[rows].cpu().to(kl_rows.dtype)
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
        trial_kl = grouping.group_kl(objective, trials, owners // n_s)
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
    per: Per | RowGrouping,
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
    and keeps the best per group when it lowers the score. On candidate sets of at most
    ``INSERTION_CANDIDATES`` nodes, a group no exchange improves then has every insertion
    measured (one node moved to another place in the family's order, the nodes in between
    shifted by one), and keeps the best when it lowers the score.
    """
    n_groups, n_s, n_c = hard.shape
    n_p = objective.n_prompts
    rounds, width = refine_budget(opts, n_c)
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
    grouping = as_grouping(per, n_p)
    pair_of_row, prompt_of_row = grouping.pair_rows(n_s)  # pair = group * n_s + level

    def accept_best(trials: dict[int, list[Tensor]]) -> set[int]:
        """Measure every group's trial families exactly (against this round's ``kl``) and
        give each group its best trial where that lowers the score (``level`` updated in
        place); the groups that changed."""
        owner = [g for g, own in trials.items() for _ in own]
        if not owner:
            return set()
        new_levels = torch.stack([t for own in trials.values() for t in own])
        owners = torch.tensor(owner)
        gain = _chain_gain(objective, level, new_levels, owners, kl, grouping, eps)
        changed = set()
        for g in torch.unique(owners).tolist():
            sel = torch.nonzero(owners == g).flatten()
            best = sel[torch.argmin(gain[sel])]
            if gain[best] < -1e-9:
                level[g] = new_levels[best]
                changed.add(g)
        return changed

    for _ in range(rounds):
        masks = level[:, None, :] <= torch.arange(n_s)[None, :, None]  # [group, size, cand]
        m_rows = masks.reshape(-1, n_c)[pair_of_row]
        weights = torch.full((len(m_rows),), 1.0 / grouping.group_size)
        m = m_rows.float().to(device).requires_grad_(True)
        kl_rows = objective.kl_backward(
            objective.full_mask(m), prompt_of_row.to(device), weights.to(device)
        ).cpu()
        assert m.grad is not None
        grad = torch.zeros(n_groups * n_s, n_c).index_add_(0, pair_of_row, m.grad.cpu())
        # the KL's own dtype (float64 for a float64 model)
        kl = torch.zeros(n_groups * n_s, dtype=kl_rows.dtype).index_add_(
            0, pair_of_row, kl_rows * weights.to(kl_rows.dtype)
        )
        grad, kl = grad.view(n_groups, n_s, n_c), kl.view(n_groups, n_s)
        # cumulative sensitivity of the score: cum[g, j, x] = sum over sizes < j
        h = grad / (kl[..., None] + eps)
        cum = torch.cat([torch.zeros(n_groups, 1, n_c), h.cumsum(1)], 1)  # [g, S+1, c]
        changed = accept_best(
            {g: _exchanges(level[g], cum[g], n_c, width) for g in range(n_groups)}
        )
        if n_c <= INSERTION_CANDIDATES:
            # where no exchange helps: try moving one node to another place in the family's
            # order (an insertion; the nodes in between shift by one). An exchange moves two
            # nodes at once, so a family can sit at an exchange optimum that one insertion
            # leaves: on SmolLM2, zero ablation, per input (10 candidates, 4 prompts),
            # exchanges alone ended 1.4 nats of the objective above its exact optimum.
            grid = hard[0].sum(-1)  # the grid's sizes (every group has the same)
            unchanged = [g for g in range(n_groups) if g not in changed]
            changed |= accept_best({g: _insertions(level[g], grid) for g in unchanged})
        if not changed:
            break
    return level[:, None, :] <= torch.arange(n_s)[None, :, None]


def _exchanges(level: Tensor, cum: Tensor, n_c: int, width: int) -> list[Tensor]:
    """The exchanges of one family's levels to measure, best predicted first: every one on a
    small candidate set with few moves, else the ``width`` best. ``cum[j, x]``: the score's
    sensitivity to node x summed over the sizes below j."""
    # predicted change of exchanging x (earlier level) with y, to first order:
    # sum over sizes j in [lv_x, lv_y) of h_j[y] - h_j[x]
    #   = (C[lv_y, y] - C[lv_x, y]) - (C[lv_y, x] - C[lv_x, x])
    at_level = cum[level]  # [x, y] = C[lv_x, y]
    own = at_level.diagonal()  # C[lv_x, x]
    predicted = own[None, :] - at_level - at_level.T + own[:, None]
    valid = level[:, None] < level[None, :]
    n_moves = int(valid.sum())
    if n_moves == 0:
        return []
    predicted = torch.where(valid, predicted, torch.inf)
    k = n_moves if _full_neighbourhood(n_c, n_moves) else min(width, n_moves)
    out = []
    for idx in torch.topk(-predicted.flatten(), k).indices.tolist():
        x, y = divmod(idx, n_c)
        new = level.clone()
        new[x], new[y] = level[y], level[x]
        out.append(new)
    return out


def _insertions(level: Tensor, grid: Tensor) -> list[Tensor]:
    """Every distinct family one insertion away: the nodes in order of their level (ties in
    index order), one node taken out and put back at another place, the levels read off the
    new order (the node at place r enters at the first grid size above r)."""
    order = torch.argsort(level, stable=True)
    level_at = torch.searchsorted(grid, torch.arange(len(level)), right=True)
    seen = {tuple(level.tolist())}
    out = []
    for p in range(len(order)):
        rest = torch.cat([order[:p], order[p + 1 :]])
        for q in range(len(order)):
            if q == p:
                continue
            moved = torch.cat([rest[:q], order[p : p + 1], rest[q:]])
            new = torch.empty_like(level)
            new[moved] = level_at
            key = tuple(new.tolist())
            if key not in seen:
                seen.add(key)
                out.append(new)
    return out


def _chain_gain(
    objective: SubgraphObjective,
    level: Tensor,
    new_levels: Tensor,
    owners: Tensor,
    kl: Tensor,
    grouping: RowGrouping,
    eps: float,
) -> Tensor:
    """Exact change of sum_j log(KL_j + eps) for each trial family (only changed sizes run)."""
    n_s = kl.shape[1]
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
    new_kl = grouping.group_kl(objective, torch.stack(masks), owner_of_row)
    old_kl = kl[owner_of_row, size_t]
    delta = torch.log(new_kl + eps) - torch.log(old_kl + eps)
    return torch.zeros(len(new_levels), dtype=delta.dtype).index_add_(0, trial_t, delta)


__all__ = [
    "CHAIN_EPS",
    "FULL_NEIGHBOURHOOD",
    "INSERTION_CANDIDATES",
    "SMALL_CANDIDATE_SET",
    "chain_refine",
    "refine_budget",
    "swap_refine",
]
