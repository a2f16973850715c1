"""Learned edge subgraphs (``method="mask"``): a nested ranking searched with the gradient.

The paper's greedy never measures fidelity. Here one score per edge, ``theta``, is learned
so that the subgraphs it ranks are faithful (small KL(P_full || P_sub) at the last
position), and the ranking is still one nested order of the edges:

- The ranking of a score vector is :func:`greedy_order` run on the scores: best-first from
  the output node, so every prefix is connected to the output (with attention edges
  ablated, an edge off such a path cannot carry signal). The subgraph of size s is the first
  ``int(s * E)`` edges, exactly as for the greedy.
- ``theta`` starts at ``-log(1 + greedy rank)``, whose ranking *is* the greedy's (on the
  frontier, the smallest greedy rank is the greedy's next edge), so step 0 measures the
  greedy's subgraphs.
- Each step runs a few budgets ``k_b`` (sizes of the grid) as rows of one edge-masked batch.
  The forward uses the *hard* masks of the current ranking (the exact subgraphs, not a
  relaxation); the backward goes through a straight-through relaxation
  ``sigmoid((theta - tau_b) / T)``, ``tau_b`` the k_b-th largest score, so the gradient
  reaches the edges near each budget's boundary (scores are in log-rank units, so ``T`` is
  a width in ranks: T = 1 reaches edges within a factor e of the boundary rank). T is
  annealed geometrically. The loss is ``sum_b log KL_b`` (every budget counts, whatever its
  scale); the step is normalised by the 99th percentile of ``|grad|`` and clipped, so the
  steepest edges move by ``lr`` log-rank units.
- Every step measures the hard subgraphs exactly, so the scores kept are those of the step
  with the lowest mean ``log KL`` over the trained budgets (step 0, the greedy, included).
- One ranking for all sizes trades sizes against each other: on SmolLM2 (2 prompts, before
  the merge) the kept step was better than the greedy at s = 0.02 and much worse from 0.08
  to 0.4. So the result is by default (``MaskSearch.merge``) not one learned ranking but a
  *measured nested merge* (:func:`merge_nested`) of the greedy's ranking and the rankings
  of the learned steps: size by size along the grid, the chain so far is extended by each
  candidate ranking's next edges and the extension with the lowest exact KL is kept. The
  first size is the best of the candidates' own prefixes; while the chain lies inside the
  greedy's prefix it is never worse than the greedy there; after a learned block was taken
  no size is guaranteed, and the evaluation reports them as they are. On a 1-layer, 9-edge
  model (4 prompts, every size) the merge was never worse than the greedy and cut its KL
  gap to the exhaustive optimum by 2-3x (tests/test_edge_learned.py, ``pytest -s``).
  Measured on SmolLM2-135M and Gemma-3-270M: docs/edge-learned.md.

Known weakness of the learning: the gradient is taken at the hard masks, so an edge on a
path whose other edges are all absent gets no gradient (a product of masks), and with
attention edges ablated the greedy's small subgraphs are such dead ends.

Cost: one all-edges forward row (the reference), ``steps + 1`` forward and backward passes
of ``len(budgets)`` rows, one greedy ranking (a heap pass over the edges) per step, and for
the merge one forward of at most ``max_candidates`` rows per grid size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from strace_lens.edges.forward import EdgeMasks, run_with_edge_masks
from strace_lens.edges.graph import EdgeGraph
from strace_lens.edges.greedy import greedy_order
from strace_lens.inputs import TokenBatch
from strace_lens.metrics import kl_divergence


@dataclass(frozen=True)
class MaskSearch:
    """Options of the learned search (see module docstring).

    ``budgets``: relative sizes trained as rows of one batch; None picks up to
    ``max_budgets`` of the evaluation grid's sizes with ``1 <= int(s * E) < E``, evenly
    spread over them. ``noise``: scale of logistic noise added to the scores for the hard
    forward of each step (0 = deterministic; ``seed`` fixes the draws). ``merge``: build
    the ranking with :func:`merge_nested` from the greedy's and at most
    ``max_candidates - 1`` learned steps' rankings (False: the kept step's ranking alone).
    The defaults are the settings measured on SmolLM2 and Gemma (docs/edge-learned.md).
    """

    steps: int = 3
    lr: float = 0.3
    temperature: tuple[float, float] = (2.0, 0.3)
    budgets: tuple[float, ...] | None = None
    max_budgets: int = 4
    noise: float = 0.0
    seed: int = 0
    merge: bool = True
    max_candidates: int = 3

    def __post_init__(self) -> None:
        bad = self.max_budgets < 1 or self.noise < 0 or self.max_candidates < 1
        if self.steps < 0 or self.lr <= 0 or bad:
            raise ValueError(f"Invalid mask search options: {self}.")
        if min(self.temperature) <= 0:
            raise ValueError(f"Temperatures must be positive, got {self.temperature}.")


@dataclass
class MergeChoice:
    """How :func:`merge_nested` built a ranking: per merged edge count, which candidate
    ranking continued the chain (0: the first ranking given, the greedy's) and its hard KL."""

    counts: Int[Tensor, " size"]
    choice: Int[Tensor, " size"]
    kl: Float[Tensor, " size"]
    #: hard log-probs of each merged subgraph (the chain's own measurement)
    logp: Float[Tensor, "size vocab"] = field(repr=False)
    #: masked forward rows measured (one per distinct candidate per size)
    rows: int = 0


@dataclass
class LearnedOrder:
    """The learned ranking of one prompt and how the search went."""

    order: Int[Tensor, " edge"]
    scores: Float[Tensor, " edge"]
    budgets: Int[Tensor, " budget"]
    best_step: int
    #: hard KL(P_full || P_sub) per step (row 0: the greedy) and budget
    kl: Float[Tensor, "step budget"] = field(repr=False)
    #: forward + backward passes, each of len(budgets) rows
    passes: int = 0
    #: the ranking measured at each step (row 0: the greedy's), for :func:`merge_nested`
    step_orders: list[Tensor] = field(default_factory=list, repr=False)
    #: how the nested merge chose (None when no merge ran): ranking index per merged size
    merge: MergeChoice | None = None

    def summary(self) -> dict[str, Any]:
        """What a result records of the search (JSON-able)."""
        out: dict[str, Any] = {
            "best_step": self.best_step,
            "passes": self.passes,
            "budgets": self.budgets.tolist(),
        }
        if self.merge is not None:
            out["merge_counts"] = self.merge.counts.tolist()
            out["merge_choice"] = self.merge.choice.tolist()
            out["merge_rows"] = self.merge.rows
        return out


def pick_budgets(grid: Sequence[float], n_edges: int, search: MaskSearch) -> Int[Tensor, " budget"]:
    """Edge counts to train: the search's own sizes, or up to ``max_budgets`` grid sizes."""
    sizes = search.budgets if search.budgets is not None else tuple(grid)
    counts = sorted({int(s * n_edges) for s in sizes})
    counts = [k for k in counts if 1 <= k < n_edges]
    if not counts:
        raise ValueError(f"No trainable budget (1 <= int(s * E) < E = {n_edges}) in {sizes}.")
    if search.budgets is None and len(counts) > search.max_budgets:
        pick = torch.linspace(0, len(counts) - 1, search.max_budgets).round().long()
        counts = [counts[int(i)] for i in pick.unique()]
    return torch.tensor(counts, dtype=torch.long)


def rank_scores(order: Int[Tensor, " edge"]) -> Float[Tensor, " edge"]:
    """``-log(1 + rank)`` per edge: scores whose :func:`greedy_order` is ``order`` itself."""
    rank = torch.empty(len(order), dtype=torch.float64)
    rank[order.long()] = torch.arange(len(order), dtype=torch.float64)
    return -torch.log1p(rank)


def hard_masks(order: Tensor, counts: Tensor, n_edges: int) -> Tensor:
    """``[budget, edge]`` 0/1 masks: the first ``counts[b]`` edges of ``order``."""
    position = torch.empty(n_edges, dtype=torch.long)
    position[order.long()] = torch.arange(n_edges)
    return (position[None, :] < counts[:, None]).double()


def learn_order(
    model: Any,
    row: TokenBatch,
    graph: EdgeGraph,
    init_order: Int[Tensor, " edge"],
    budgets: Int[Tensor, " budget"],
    *,
    search: MaskSearch = MaskSearch(),
    ablate_attention_edges: bool = True,
    logp_full: Float[Tensor, " vocab"] | None = None,
) -> LearnedOrder:
    """Learn a nested ranking of one prompt's edges from ``init_order`` (see module doc).

    ``row``: the prompt as a single-row, trimmed batch; ``budgets``: edge counts trained.
    """
    n_edges = graph.n_edges
    dtype = next(model.parameters()).dtype
    if logp_full is None:
        with torch.no_grad():
            ones = EdgeMasks.from_edges(graph, torch.ones(1, n_edges, dtype=dtype))
            logp_full = run_with_edge_masks(
                model, row, ones, ablate_attention_edges=ablate_attention_edges
            )[0]
    target = logp_full.detach()
    theta = rank_scores(init_order)
    gen = torch.Generator().manual_seed(search.seed)
    t0, t1 = search.temperature
    n_b = len(budgets)
    history: list[Tensor] = []
    step_orders: list[Tensor] = []
    best = (math.inf, theta.clone(), 0)
    passes = 0
    for step in range(search.steps + 1):
        temp = t0 * (t1 / t0) ** (step / max(search.steps, 1))
        noisy = theta
        if search.noise > 0 and step > 0:
            u = torch.rand(n_edges, generator=gen, dtype=torch.float64).clamp(1e-9, 1 - 1e-9)
            noisy = theta + search.noise * temp * (u.log() - (-u).log1p())
        order = greedy_order(graph, noisy)
        step_orders.append(order)
        hard = hard_masks(order, budgets, n_edges)
        last = step == search.steps
        th = theta.clone().requires_grad_(not last)
        # tau_b: the k_b-th largest score (the relaxation's boundary for budget b)
        tau = torch.sort(theta, descending=True).values[budgets - 1]
        soft = torch.sigmoid((th[None, :] - tau[:, None]) / temp)
        masks_e = hard + soft - soft.detach()
        masks = EdgeMasks.from_edges(graph, masks_e.to(dtype))
        logp = run_with_edge_masks(model, row, masks, ablate_attention_edges=ablate_attention_edges)
        passes += 1
        kl = kl_divergence(target.expand_as(logp), logp).clamp(min=0)
        history.append(kl.detach().double().cpu())
        score = float(torch.log(kl.detach().double() + 1e-12).mean())
        # with noise, the measured subgraphs are those of the noisy scores: keep those
        if score < best[0]:
            best = (score, (noisy if search.noise > 0 else theta).clone(), step)
        if last:
            break
        loss = torch.log(kl + 1e-12).sum()
        (grad,) = torch.autograd.grad(loss, th)
        # seen on Gemma-3-270M with attention edges kept: a non-finite backward through a
        # fully ablated state; such edges are not moved this step
        grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
        nz = grad.abs()[grad != 0]
        if len(nz) == 0:
            continue
        scale = torch.quantile(nz.float(), 0.99).double() if len(nz) > 1 else nz[0]
        theta = theta - search.lr * (grad / scale).clamp(-1.0, 1.0)
    _, scores, best_step = best
    return LearnedOrder(
        order=greedy_order(graph, scores),
        scores=scores,
        budgets=budgets,
        best_step=best_step,
        kl=torch.stack(history) if history else torch.zeros(0, n_b),
        passes=passes,
        step_orders=step_orders,
    )


def merge_nested(
    model: Any,
    row: TokenBatch,
    graph: EdgeGraph,
    rankings: Sequence[Int[Tensor, " edge"]],
    counts: Int[Tensor, " size"],
    *,
    ablate_attention_edges: bool = True,
    logp_full: Float[Tensor, " vocab"],
    max_rows: int = 32,
) -> tuple[Int[Tensor, " edge"], MergeChoice]:
    """One nested ranking that, size by size, continues with whichever candidate measures best.

    At each edge count ``k`` (ascending), the chain so far ``S`` (``k_prev`` edges) is
    extended by each ranking's first ``k - k_prev`` edges not in ``S``, in that ranking's
    order; every distinct extension is measured exactly (hard masks, KL at the last
    position, one batch) and the one with the lowest KL is kept (ties: the earlier ranking).
    So the first size is the best of the rankings' own prefixes, and wherever ``S`` lies
    inside the first ranking's prefix of size ``k`` (the greedy's, e.g. while the greedy has
    been chosen all along), the chain is at least as good as that prefix. If every ranking
    has all its prefixes connected to the output (as :func:`greedy_order` rankings have),
    so has the merge: an edge's target is reached by an edge earlier in its own ranking,
    which is in ``S`` or earlier in the block. After the last count the first ranking
    continues. Cost: one masked forward of at most ``len(rankings)`` rows per count.
    """
    n_edges = graph.n_edges
    if not rankings:
        raise ValueError("merge_nested needs at least one candidate ranking.")
    for r in rankings:
        if r.shape != (n_edges,):
            raise ValueError(f"A candidate ranking must order all {n_edges} edges.")
    dtype = next(model.parameters()).dtype
    target = logp_full.detach()
    taken = torch.zeros(n_edges, dtype=torch.bool)
    blocks: list[Tensor] = []
    merged, chosen, kls, logps = [], [], [], []
    rows = 0
    prev = 0
    for k in sorted({int(c) for c in counts.tolist() if 0 < int(c) < n_edges}):
        cands: list[tuple[int, Tensor]] = []
        for i, r in enumerate(rankings):
            block = r[~taken[r.long()]][: k - prev]
            key = torch.sort(block).values
            if not any(torch.equal(key, torch.sort(b).values) for _, b in cands):
                cands.append((i, block))
        keep = taken[None].repeat(len(cands), 1)
        for c, (_, block) in enumerate(cands):
            keep[c, block.long()] = True
        out = []
        with torch.no_grad():
            for start in range(0, len(cands), max_rows):
                masks = EdgeMasks.from_edges(graph, keep[start : start + max_rows].to(dtype))
                out.append(
                    run_with_edge_masks(
                        model, row, masks, ablate_attention_edges=ablate_attention_edges
                    )
                )
        logp = torch.cat(out)
        rows += len(cands)
        kl = kl_divergence(target.expand_as(logp), logp).clamp(min=0).double().cpu()
        best = int(torch.argmin(kl))  # the first of equal minima: the earlier ranking
        index, block = cands[best]
        blocks.append(block)
        taken[block.long()] = True
        merged.append(k)
        chosen.append(index)
        kls.append(float(kl[best]))
        logps.append(logp[best].detach().cpu())
        prev = k
    first = rankings[0]
    blocks.append(first[~taken[first.long()]])
    order = torch.cat(blocks).to(torch.int32) if blocks else first.to(torch.int32)
    vocab = int(target.shape[-1])
    return order, MergeChoice(
        counts=torch.tensor(merged, dtype=torch.long),
        choice=torch.tensor(chosen, dtype=torch.long),
        kl=torch.tensor(kls, dtype=torch.float64),
        logp=torch.stack(logps) if logps else torch.zeros(0, vocab),
        rows=rows,
    )


def merge_candidates(fit: LearnedOrder, greedy: Tensor, most: int) -> list[Tensor]:
    """The greedy's ranking first, then the kept step's, then the latest steps', distinct,
    at most ``most`` in all."""
    steps = list(range(len(fit.step_orders) - 1, 0, -1))
    picked = [greedy]
    for s in [fit.best_step, *steps]:
        if len(picked) >= most:
            break
        order = fit.step_orders[s]
        if not any(torch.equal(order, o) for o in picked):
            picked.append(order)
    return picked


def learned_nested_order(
    model: Any,
    row: TokenBatch,
    graph: EdgeGraph,
    greedy: Int[Tensor, " edge"],
    grid: Sequence[float],
    *,
    search: MaskSearch = MaskSearch(),
    ablate_attention_edges: bool = True,
) -> LearnedOrder:
    """``method="mask"`` for one prompt: :func:`learn_order` from the greedy ranking, then
    (``search.merge``) :func:`merge_nested` over the greedy's and the learned steps'
    rankings at the grid's edge counts."""
    n_edges = graph.n_edges
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        ones = EdgeMasks.from_edges(graph, torch.ones(1, n_edges, dtype=dtype))
        logp_full = run_with_edge_masks(
            model, row, ones, ablate_attention_edges=ablate_attention_edges
        )[0]
    budgets = pick_budgets(grid, n_edges, search)
    fit = learn_order(
        model,
        row,
        graph,
        greedy,
        budgets,
        search=search,
        ablate_attention_edges=ablate_attention_edges,
        logp_full=logp_full,
    )
    if not search.merge:
        return fit
    counts = torch.tensor([int(s * n_edges) for s in grid], dtype=torch.long)
    order, choice = merge_nested(
        model,
        row,
        graph,
        merge_candidates(fit, greedy, search.max_candidates),
        counts,
        ablate_attention_edges=ablate_attention_edges,
        logp_full=logp_full,
    )
    fit.order, fit.merge = order, choice
    return fit
