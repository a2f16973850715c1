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
  with the lowest mean ``log KL`` over the trained budgets (step 0, the greedy, included):
  the selection is never worse than the greedy *on average over the trained budgets*; other
  grid sizes, and single budgets, are not guaranteed, and the evaluation reports them as
  they are.

Measured (benchmarks/edge_greedy.py --learned, 2 dev prompts): on the 3-layer tiny model
the learned ranking roughly halves the greedy's TV from s = 0.04 up with attention edges
ablated (worse at 0.01-0.02), and is about even with them kept; on a 1-layer, 9-edge model
it halves the greedy's KL gap to the exhaustive optimum (tests/test_edge_learned.py). On
SmolLM2-135M, 12 steps at lr 1.0 never beat step 0 (the result there *is* the greedy);
6 steps at lr 0.3, attention edges ablated, kept step 3: median TV at s = 0.02 0.76 against
the greedy's 0.99 (half the prompts keep top-1 from 0.02 instead of 0.2), but much worse
from 0.08 to 0.4 (0.71 against 0.22 at 0.2): the mean log KL over the trained budgets
trades large sizes for small ones. With attention edges kept (same run): better at
0.003-0.004 (0.45 against 0.72 at 0.004), slightly worse at 0.0012-0.0014, equal elsewhere.
Not better than the greedy on SmolLM2 overall.
Known weakness: the gradient is taken at the hard masks, so an edge on a path whose other
edges are all absent gets no gradient (a product of masks), and with attention edges
ablated the greedy's small subgraphs are such dead ends; a relaxed (soft) forward in the
first steps might reach them (untested), at one more forward per measured step.

Cost: ``steps + 1`` forward and backward passes of ``len(budgets)`` rows, plus one greedy
ranking (a heap pass over the edges) per step.
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
    forward of each step (0 = deterministic; ``seed`` fixes the draws).
    """

    steps: int = 30
    lr: float = 0.5
    temperature: tuple[float, float] = (2.0, 0.3)
    budgets: tuple[float, ...] | None = None
    max_budgets: int = 6
    noise: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.lr <= 0 or self.max_budgets < 1 or self.noise < 0:
            raise ValueError(f"Invalid mask search options: {self}.")
        if min(self.temperature) <= 0:
            raise ValueError(f"Temperatures must be positive, got {self.temperature}.")


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
    best = (math.inf, theta.clone(), 0)
    passes = 0
    for step in range(search.steps + 1):
        temp = t0 * (t1 / t0) ** (step / max(search.steps, 1))
        noisy = theta
        if search.noise > 0 and step > 0:
            u = torch.rand(n_edges, generator=gen, dtype=torch.float64).clamp(1e-9, 1 - 1e-9)
            noisy = theta + search.noise * temp * (u.log() - (-u).log1p())
        order = greedy_order(graph, noisy)
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
    )
