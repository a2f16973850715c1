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
nodes (and on at most 12, moves one node in the order) while that lowers sum log(KL + 1e-6)
over the grid. With ``nested=False`` every
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

from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from strace_lens.progress import GRADIENT_ROW_COST
from strace_lens.search.grouping import RowGrouping, as_grouping
from strace_lens.search.local_search import (
    CHAIN_EPS,
    FULL_NEIGHBOURHOOD,
    INSERTION_CANDIDATES,
    SMALL_CANDIDATE_SET,
    chain_refine,
    refine_budget,
    swap_refine,
)
from strace_lens.search.mask_options import MaskOptions
from strace_lens.search.nested import GROW_SINGLE_STEPS, grow_nested, grow_width, growth_steps
from strace_lens.search.objective import SubgraphObjective
from strace_lens.search.ranking import top_s
from strace_lens.search.relaxation import (
    RowAdam,
    StepRows,
    cycled_sizes,
    normalise,
    optimise,
    threshold_mask,
)
from strace_lens.types import Per

#: the optimiser's old name (tests patch its ``step``)
_RowAdam = RowAdam


def learn_masks(
    objective: SubgraphObjective,
    sizes: Int[Tensor, " size"],
    per: Per | RowGrouping,
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
    grouping = as_grouping(per, n_p)
    n_groups = grouping.n_groups
    device = objective.logp_full.device

    # -- stage 1: one ranking per prompt (or for the dataset) -------------------------------
    if init_scores is not None and opts.init == "attribution":
        theta = normalise(init_scores.to(device).float()).clone()
    else:
        theta = 0.01 * torch.randn(n_groups, n_c, generator=gen).to(device)
    cyc = cycled_sizes(n_p, n_s, opts.steps, opts.sizes_per_step, gen)
    prompt_of_row = torch.arange(n_p).repeat_interleave(opts.sizes_per_step)
    group_of_row = grouping.group_of_prompt()[prompt_of_row]
    stage1 = [
        StepRows(group_of_row, prompt_of_row, sizes[cyc[i].reshape(-1)]) for i in range(opts.steps)
    ]
    optimise(objective, theta, stage1, opts, track_best=False)
    ranking = theta.detach()
    if nested:
        hard = grow_nested(objective, ranking.cpu(), sizes.cpu(), grouping, opts, guide)
        return chain_refine(objective, hard, grouping, opts).cpu()

    # -- stage 2: per-size scores, fine-tuned from the ranking ------------------------------
    theta2 = ranking.repeat_interleave(n_s, 0).clone()  # group g*S + j
    pair_of_row, prompt_of_pair_row = grouping.pair_rows(n_s)
    rows = StepRows(pair_of_row, prompt_of_pair_row, sizes[pair_of_row % n_s])
    best = optimise(objective, theta2, [rows] * opts.finetune_steps, opts, track_best=True)
    hard = top_s(theta2, sizes.to(device).repeat(n_groups)).reshape(n_groups, n_s, n_c)
    if best is not None:
        hard = best[0].reshape(n_groups, n_s, n_c)
    hard = swap_refine(objective, hard, grouping, opts)
    return hard.cpu()


#: local-search rounds a plan counts on (a search stops earlier when no move helps; a round
#: after the first measures only the masks whose neighbours changed)
PLANNED_REFINE_ROUNDS = 2
#: proposals measured per group in a growth step, beyond the ``grow_width`` seeds of each
#: order: the top-d picks of the three orders and of all ranks together
GROWTH_PICKS = 4


def planned_mask_rows(
    n_prompts: int,
    grouping: RowGrouping,
    n_cand: int,
    sizes: Int[Tensor, " size"],
    opts: MaskOptions,
    nested: bool,
) -> int:
    """The forward rows ``learn_masks`` is expected to run, a row with a gradient counted as
    ``GRADIENT_ROW_COST`` (for progress and its ETA; see :mod:`strace_lens.progress`).
    Exact for the gradient steps; the growth counts every proposal as distinct (duplicates
    are measured once, so fewer may run) and the local searches ``PLANNED_REFINE_ROUNDS``
    rounds of every mask."""
    g, n_p, n_s = GRADIENT_ROW_COST, n_prompts, len(sizes)
    per_group = grouping.group_size  # rows that measure one mask of a group
    rows = g * n_p if opts.init == "attribution" else 0
    rows += g * opts.steps * n_p * opts.sizes_per_step
    if nested:
        orders = 3 if opts.grow_gradient else 2  # ranking, write norms (, gradient)
        held = 0
        for size, _ in growth_steps(sizes, opts.grow_single_steps):
            if 0 < size < n_cand:
                proposals = GROWTH_PICKS - (3 - orders) + orders * grow_width(opts, held)
                proposals += opts.grow_quiet and size - held > 1  # the quiet filler
                rows += g * n_p * opts.grow_gradient + grouping.n_groups * per_group * proposals
            held = size
        rounds, width = refine_budget(opts, n_cand)
        if n_cand <= SMALL_CANDIDATE_SET or opts.refine_rounds is not None:
            trials = grouping.n_groups * width * per_group * max(n_s // 2, 1)
            rows += min(rounds, PLANNED_REFINE_ROUNDS) * (g * n_p * n_s + trials)
            if n_cand <= INSERTION_CANDIDATES and rounds > 0:
                # one round of every insertion, each changing about a third of the sizes
                insertions = n_cand * (n_cand - 1) * max(n_s // 3, 1)
                rows += grouping.n_groups * per_group * insertions
        return rows
    pairs = grouping.n_groups * n_s
    rows += g * opts.finetune_steps * pairs * per_group
    rounds, width = refine_budget(opts, n_cand)
    if width > 0:
        trials = 0  # per group: the swaps measured and the two cross-size moves
        for size in sizes.tolist():
            swaps = size * (n_cand - size)
            full = n_cand <= SMALL_CANDIDATE_SET and swaps <= FULL_NEIGHBOURHOOD
            cross = n_cand if n_cand <= SMALL_CANDIDATE_SET else 1
            trials += (swaps if full else min(width, swaps)) + 2 * cross
        rows += min(rounds, PLANNED_REFINE_ROUNDS) * (
            g * pairs * per_group + grouping.n_groups * per_group * trials
        )
    return rows


__all__ = [
    "CHAIN_EPS",
    "FULL_NEIGHBOURHOOD",
    "GROW_SINGLE_STEPS",
    "SMALL_CANDIDATE_SET",
    "MaskOptions",
    "StepRows",
    "chain_refine",
    "grow_nested",
    "learn_masks",
    "planned_mask_rows",
    "swap_refine",
    "threshold_mask",
    "top_s",
]
