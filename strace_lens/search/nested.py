"""The nested growth of ``method="mask"``: a family of subgraphs grown size by size."""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from strace_lens.search.grouping import RowGrouping, as_grouping
from strace_lens.search.mask_options import MaskOptions
from strace_lens.search.objective import SubgraphObjective
from strace_lens.search.ranking import rank_positions
from strace_lens.search.relaxation import row_weights
from strace_lens.types import Per

#: the nested growth adds nodes one at a time while a grid step adds at most this many (the
#: default of ``MaskOptions.grow_single_steps``)
GROW_SINGLE_STEPS = 4


def grow_nested(
    objective: SubgraphObjective,
    ranking: Float[Tensor, "group cand"],
    sizes: Int[Tensor, " size"],
    per: Per | RowGrouping,
    opts: MaskOptions,
    guide: Float[Tensor, "group cand"] | None = None,
) -> Bool[Tensor, "group size cand"]:
    """A nested family grown size by size, each step chosen among proposals measured exactly.

    The subgraph of each grid size holds the one of the size before, plus d new nodes (added
    one at a time through the sizes in between while d <= ``opts.grow_single_steps``). The
    proposals for the new nodes: the top d outside nodes by the learned ranking, by the
    gradient -dKL/dm at the current subgraph (one batched forward+backward per step; not
    with ``opts.grow_gradient=False``, whose proposals then run whole: no pass fills the
    residual cache they would resume from), by the ``guide`` scores when given (trace passes
    the order of the write-norm best-first search), and by all ranks together; and, for each
    of the ``grow_width`` best single nodes by each score (one from ``grow_narrow_from`` nodes
    on), that node plus the best d - 1 of the rest; with ``opts.grow_quiet`` (and the
    gradient, d > 1), also the d outside nodes of the smallest |gradient|, a near-neutral
    filler by first order, so that a step whose "helpful" nodes overshoot together can keep
    about the KL it had. Every proposal is run with its hard mask and the lowest KL is kept.
    Why: a ranking read off as top-s is tuned for all sizes at once, so a node that helps
    only alongside many others can lead the family and make the smallest subgraphs worse
    than random; measuring each size's growth keeps every size honest, while the ranking
    still brings in what the gradient at one point cannot see.
    """
    n_groups, n_c = ranking.shape
    n_p = objective.n_prompts
    device = objective.logp_full.device
    current = torch.zeros(n_groups, n_c, dtype=torch.bool)
    out = torch.zeros(n_groups, len(sizes), n_c, dtype=torch.bool)
    grouping = as_grouping(per, n_p)
    prompt_of_row = torch.arange(n_p)
    group_of_row = grouping.group_of_prompt()
    weights = row_weights(group_of_row).to(device)
    rank_orders = {"rank": rank_positions(ranking)}  # 0 = best
    # the layer of each candidate: a proposal runs from the current subgraph's residual
    # entering the layer of its earliest new node (blocks below it are skipped)
    cand_layer = torch.nonzero(objective.candidates.cpu()).flatten() // objective.units_per_layer
    resume = opts.grow_gradient and objective.can_resume()
    store = objective.residual_store() if resume else None
    if guide is not None:
        rank_orders["guide"] = rank_positions(guide.float())
    for size, j in growth_steps(sizes, opts.grow_single_steps):
        d = size - int(current[0].sum())
        if d <= 0 or size == n_c:
            current = current | (size == n_c)
            if j >= 0:
                out[:, j] = current
            continue
        orders = dict(rank_orders)
        quiet: Tensor | None = None  # 0 = the smallest |gradient| (grow_quiet's order)
        if opts.grow_gradient:
            m = current[group_of_row].float().to(device).requires_grad_(True)
            objective.kl_backward(objective.full_mask(m), prompt_of_row.to(device), weights, store)
            assert m.grad is not None
            grad = torch.zeros(n_groups, n_c).index_add_(0, group_of_row, m.grad.cpu())
            orders["grad"] = rank_positions(-grad)
            if opts.grow_quiet and d > 1:
                quiet = rank_positions(-grad.abs())
        width = grow_width(opts, size - d)
        proposals: list[Tensor] = []
        owner: list[int] = []
        for g in range(n_groups):
            orders_g = {key: order[g] for key, order in orders.items()}
            quiet_g = None if quiet is None else quiet[g]
            for pick in _proposals(orders_g, ~current[g], d, width, quiet_g):
                proposals.append(current[g] | pick)
                owner.append(g)
        owners = torch.tensor(owner)
        stacked = torch.stack(proposals)
        start = _first_new_layer(stacked, current[owners], cand_layer) if resume else None
        # at a grid size, the winner's log-probs are kept for the evaluation (one prompt per
        # group only: a shared group's winner is known after all its prompts' rows)
        best = _BestRow(owners) if j >= 0 and not grouping.shared else None
        kl = grouping.group_kl(objective, stacked, owners, start, store, best)
        for g in range(n_groups):
            sel = torch.nonzero(owners == g).flatten()
            chosen = int(sel[torch.argmin(kl[sel])])
            current[g] = proposals[chosen]
            if best is not None and best.index.get(g) == chosen:
                full = objective.full_mask(current[g].float().to(device))
                objective.measured.add(g, full, best.logp[g], best.hooked[g])
        if j >= 0:
            out[:, j] = current
    return out


class _BestRow:
    """A ``kl`` sink that keeps, for each group, the log-probs of its lowest-KL trial so far
    (the first on ties, as ``argmin``): the grown subgraph of a grid size is measured exactly
    by the growth, and the evaluation then reads its log-probs instead of running it again."""

    def __init__(self, owners: Int[Tensor, " trial"]) -> None:
        self.owners = owners.tolist()
        self.kl: dict[int, float] = {}
        self.index: dict[int, int] = {}
        self.logp: dict[int, Tensor] = {}
        self.hooked: dict[int, Tensor] = {}

    def __call__(self, rows: Tensor, kl: Tensor, logp: Tensor, hooked: Tensor) -> None:
        for row, value, row_logp in zip(rows.tolist(), kl.tolist(), logp):
            g = self.owners[row]
            # lexicographic (KL, trial): the trial argmin picks, whatever order rows ran in
            if g not in self.kl or (value, row) < (self.kl[g], self.index[g]):
                self.kl[g], self.index[g] = value, row
                self.logp[g], self.hooked[g] = row_logp.clone(), hooked


def _first_new_layer(
    proposals: Bool[Tensor, "trial cand"],
    current: Bool[Tensor, "trial cand"],
    cand_layer: Int[Tensor, " cand"],
) -> Int[Tensor, " trial"]:
    """The layer of each proposal's earliest node not in its current subgraph."""
    new = proposals & ~current
    layers = torch.where(new, cand_layer[None, :], torch.iinfo(torch.long).max)
    return layers.min(-1).values.clamp(max=int(cand_layer.max()))


def grow_width(opts: MaskOptions, held: int) -> int:
    """Single-node seeds per order for a growth step from a subgraph of ``held`` nodes:
    ``opts.grow_width``, or one from ``opts.grow_narrow_from`` nodes on (the small sizes are
    where the seeds find what the orders miss; see docs/search-quality.md)."""
    narrow = opts.grow_narrow_from is not None and held >= opts.grow_narrow_from
    return 1 if narrow else opts.grow_width


def growth_steps(
    sizes: Int[Tensor, " size"], single_steps: int = GROW_SINGLE_STEPS
) -> list[tuple[int, int]]:
    """(size, grid index or -1 for a size in between) of every growth step: a grid step that
    adds at most ``single_steps`` nodes goes through every size in between."""
    steps: list[tuple[int, int]] = []
    held = 0
    for j, size in enumerate(sizes.tolist()):
        if size - held <= single_steps:
            steps += [(t, -1) for t in range(held + 1, size)]
        steps.append((size, j))
        held = size
    return steps


def _proposals(
    orders: dict[str, Tensor],
    outside: Bool[Tensor, " cand"],
    d: int,
    width: int,
    quiet: Int[Tensor, " cand"] | None = None,
) -> list[Bool[Tensor, " cand"]]:
    """The distinct sets of ``d`` new nodes proposed for one group (see ``grow_nested``):
    the top d outside nodes by each order (0 = best) and by all ranks together, and each of
    the ``width`` best single nodes by each order with the best d - 1 of the rest; with a
    ``quiet`` order (``grow_quiet``), last, its first d outside nodes. It is last so that a
    tie in KL still goes to the proposals made without it."""
    scores = {key: -order.float() for key, order in orders.items()}
    scores["all"] = -torch.stack(list(orders.values())).sum(0).float()
    picks = [_top_outside(score, outside, d) for score in scores.values()]
    seeds: list[int] = []
    for key in orders:
        best_single = _top_outside(scores[key], outside, width)
        seeds += [int(i) for i in torch.nonzero(best_single).flatten().tolist()]
    for node in dict.fromkeys(seeds):  # unique, in order
        rest = outside.clone()
        rest[node] = False
        pick = _top_outside(scores["all"], rest, d - 1)
        pick[node] = True
        picks.append(pick)
    if quiet is not None:
        picks.append(_top_outside(-quiet.float(), outside, d))
    return list({tuple(p.tolist()): p for p in picks}.values())


def _top_outside(score: Tensor, outside: Tensor, k: int) -> Tensor:
    """Mask of the ``k`` highest-scoring nodes among ``outside`` (fewer if fewer are left)."""
    pick = torch.zeros_like(outside)
    k = min(k, int(outside.sum()))
    if k > 0:
        masked = torch.where(outside, score, torch.tensor(-torch.inf))
        pick[torch.topk(masked, k).indices] = True
    return pick


__all__ = ["GROW_SINGLE_STEPS", "grow_nested", "grow_width", "growth_steps"]
