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
- Every step measures the hard subgraphs of its ranking exactly (that forward is also the
  one the gradient is taken in); the kept step is the measured one with the lowest mean
  ``log KL`` over the trained budgets (step 0, the greedy, included). The ranking after the
  last update is not measured by the learning (a forward-only pass of the budget rows used
  to do that); the merge measures it.
- One ranking for all sizes trades sizes against each other: on SmolLM2 (2 prompts, before
  the merge) the kept step was better than the greedy at s = 0.02 and much worse from 0.08
  to 0.4. So the result is by default (``MaskSearch.merge``) not one learned ranking but a
  *measured nested merge* (:func:`merge_nested`) of the greedy's ranking and the rankings
  of the learned steps: size by size along the grid, the chain so far is extended by each
  candidate ranking's next edges and the extension with the lowest exact KL is kept.
  Picking by KL alone left some sizes worse than the greedy's (median TV higher at one size
  in 3 of 4 model x semantics runs): a chain that took a learned block need not lie inside
  the greedy's prefix later, and KL is not the TV the comparison reads. So by default
  (``MaskSearch.greedy_bound``) the merge is a small dynamic programme over measured
  subgraphs: the greedy's own prefix is measured at every size (an extra row where the
  chain has left it), extensions with a higher TV than that prefix are dropped, and the
  prefix can be re-entered, grown from the measured state below it that it contains (the
  previous prefix always is one) with the lowest path TV; the ranking is the path that
  ends at the last size. So, per prompt, every size's TV is at most the greedy's prefix's
  (up to float rounding between batches), hence so is every quantile over prompts; a
  learned block survives only where the chain stays within the bound to the end (or
  re-enters the greedy's prefix through a state containing it). On a 1-layer, 9-edge model
  (4 prompts, every size) the merge was never worse than the greedy; with 10 steps and 4
  candidates it cut its KL gap to the exhaustive optimum by 2-3x, with the defaults (1
  step, 2 candidates) it is the greedy there (tests/test_edge_learned.py, ``pytest -s``).
  Measured on SmolLM2-135M and Gemma-3-270M: docs/edge-learned.md.

Known weakness of the learning: the gradient is taken at the hard masks, so an edge on a
path whose other edges are all absent gets no gradient (a product of masks), and with
attention edges ablated the greedy's small subgraphs are such dead ends. With attention
edges kept, their masks do not reach the forward at all; by default
(``MaskSearch.kept_attention_gradient``) the learning hooks the attention pattern anyway
with hard value 1 (the same forward) so that they get a gradient: on 16 dev prompts that
made the median TV lower than the greedy's at 9 instead of 5 of 22 sizes on SmolLM2 and 3
instead of 2 on Gemma (docs/edge-learned.md).

Cost per prompt: one all-edges forward row (the reference), ``steps`` forward and backward
passes of ``len(budgets)`` rows, ``steps`` greedy rankings (heap passes over the edges,
about 1 s each on 0.3 M edges; step 0 is the greedy's own) and for the merge at most
``max_candidates`` rows per grid size (one more where the bound measures the greedy's
prefix). ``batch_prompts`` prompts run side by side: one forward per learning step and one
per merge size carries the rows of all of them, and the model is entered
(:func:`model_untouched`, the hook check) once per search: entered per forward, they took
32.7 s against 47.9 s of forwards in a profile of the one-prompt-at-a-time search
(docs/edge-learned.md, "Where the time went"). The trace's evaluation then runs nothing of
this again: the reference row and every merged size's subgraph are read back
(:mod:`strace_lens.edges.measured`), so it runs only the sizes that keep no edge.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from strace_lens.edges.forward import EdgeMasks, check_edge_hook_points, edge_masked_logprobs
from strace_lens.edges.graph import EdgeGraph
from strace_lens.edges.greedy import greedy_order
from strace_lens.hygiene import model_untouched
from strace_lens.inputs import TokenBatch
from strace_lens.metrics import kl_divergence, tv_distance


@dataclass(frozen=True)
class MaskSearch:
    """Options of the learned search (see module docstring).

    ``budgets``: relative sizes trained as rows of one batch; None picks up to
    ``max_budgets`` of the evaluation grid's sizes with ``1 <= int(s * E) < E``, evenly
    spread over them. ``noise``: scale of logistic noise added to the scores for the hard
    forward of each step (0 = deterministic; ``seed`` fixes the draws). ``merge``: build
    the ranking with :func:`merge_nested` from the greedy's and at most
    ``max_candidates - 1`` learned steps' rankings (False: the best *measured* step's
    ranking alone; the ranking after the last update is measured only by the merge, so
    with ``steps=1`` that is the greedy's). ``greedy_bound``: the merge keeps each size's
    TV at most the greedy's own prefix's, per prompt (see :func:`merge_nested`).
    ``batch_prompts``: prompts searched side by side (their rows share each forward);
    ``max_rows``: the most rows in one forward (memory: the learning's rows keep their
    activations for the backward). Neither changes the result beyond float rounding.
    ``kept_attention_gradient``: with attention edges kept (not ablated), give attention
    edges a gradient anyway (see :func:`learn_orders`); the forward values are unchanged.
    The defaults are the settings measured on SmolLM2 and Gemma (docs/edge-learned.md).
    """

    steps: int = 1
    lr: float = 0.3
    temperature: tuple[float, float] = (2.0, 0.3)
    budgets: tuple[float, ...] | None = None
    max_budgets: int = 4
    noise: float = 0.0
    seed: int = 0
    merge: bool = True
    max_candidates: int = 2
    greedy_bound: bool = True
    batch_prompts: int = 4
    max_rows: int = 64
    kept_attention_gradient: bool = True

    def __post_init__(self) -> None:
        bad = self.max_budgets < 1 or self.noise < 0 or self.max_candidates < 1
        bad = bad or self.batch_prompts < 1 or self.max_rows < 1
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
    #: per size: the merged subgraph is the first ranking's own prefix
    greedy_prefix: Bool[Tensor, " size"] | None = field(default=None, repr=False)
    #: sizes at which the chain went back to the first ranking's prefix after leaving it
    restarts: int = 0


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
    #: the all-edges reference row the search measured against (read back by the trace's
    #: evaluation with the merged sizes' rows, strace_lens/edges/measured.py)
    logp_full: Float[Tensor, " vocab"] | None = field(default=None, repr=False)

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
            out["merge_restarts"] = self.merge.restarts
            if self.merge.greedy_prefix is not None:
                out["merge_greedy_prefix"] = self.merge.greedy_prefix.tolist()
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


def masked_rows(
    model: Any,
    batch: TokenBatch,
    prompts: Sequence[int],
    graphs: Sequence[EdgeGraph],
    keeps: Sequence[Tensor],
    *,
    ablate_attention_edges: bool,
    max_rows: int = 64,
) -> list[Tensor]:
    """Log-probs of several prompts' edge-masked rows, side by side in as few forwards as
    ``max_rows`` allows: ``keeps[i]`` (``[rows_i, edge]``, may carry a gradient) are the
    masks of prompt ``prompts[i]`` (a row of the right-padded ``batch``), over
    ``graphs[i]``. Must run inside :func:`model_untouched`.

    One forward of the bridge costs about 0.45 s of Python and hook overhead on SmolLM2
    whatever its rows (measured: 1 row 0.96 s, 4 rows 0.53 s per row, 48 rows 0.40 s per
    row), so the rows of several prompts go through together."""
    dtype = next(model.parameters()).dtype
    out: list[Tensor] = []
    group: list[int] = []

    def flush() -> None:
        index = [prompts[i] for i in group for _ in range(keeps[i].shape[0])]
        rows = batch.select(index).trimmed()
        width = int(rows.tokens.shape[1])
        masks = EdgeMasks.cat(
            [EdgeMasks.from_edges(graphs[i], keeps[i].to(dtype)).padded_to(width) for i in group]
        )
        logp = edge_masked_logprobs(
            model, rows, masks, ablate_attention_edges=ablate_attention_edges
        )
        out.extend(logp.split([int(keeps[i].shape[0]) for i in group]))
        group.clear()

    for i in range(len(keeps)):
        if group and sum(int(keeps[j].shape[0]) for j in group) + keeps[i].shape[0] > max_rows:
            flush()
        group.append(i)
    if group:
        flush()
    return out


def full_logprobs(
    model: Any,
    batch: TokenBatch,
    graphs: Sequence[EdgeGraph],
    *,
    ablate_attention_edges: bool,
) -> list[Tensor]:
    """Each prompt's all-edges row (the reference the KL is taken against), in one forward."""
    dtype = next(model.parameters()).dtype
    ones = [torch.ones(1, g.n_edges, dtype=dtype) for g in graphs]
    with torch.no_grad():
        rows = masked_rows(
            model,
            batch,
            range(len(graphs)),
            graphs,
            ones,
            ablate_attention_edges=ablate_attention_edges,
        )
    return [r[0].detach() for r in rows]


def _update(theta: Tensor, grad: Tensor, lr: float) -> Tensor:
    # seen on Gemma-3-270M with attention edges kept: a non-finite backward through a
    # fully ablated state; such edges are not moved this step
    grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
    nz = grad.abs()[grad != 0]
    if len(nz) == 0:
        return theta
    scale = torch.quantile(nz.float(), 0.99).double() if len(nz) > 1 else nz[0]
    return theta - lr * (grad / scale).clamp(-1.0, 1.0)


def learn_orders(
    model: Any,
    batch: TokenBatch,
    graphs: Sequence[EdgeGraph],
    init_orders: Sequence[Tensor],
    budgets: Sequence[Tensor],
    *,
    search: MaskSearch = MaskSearch(),
    ablate_attention_edges: bool = True,
    logp_full: Sequence[Tensor],
) -> list[LearnedOrder]:
    """:func:`learn_order` for the prompts of a right-padded ``batch`` (row p: prompt p),
    side by side: each step is one forward and backward of every prompt's budget rows.
    Must run inside :func:`model_untouched`. The prompts do not interact (the loss is a sum
    over rows), so each ranking is the one a prompt would get alone, up to float rounding."""
    n = len(graphs)
    thetas = [rank_scores(o) for o in init_orders]
    # With attention edges kept, an attention edge's mask never reaches the forward, so it
    # gets no gradient and the learning can only reorder residual and MLP edges around the
    # greedy's attention edges. Yet the ranking decides which attention edges are counted,
    # and through them which positions' residual and MLP edges the connected prefixes can
    # reach. So the pattern is hooked anyway with every attention edge's hard value 1 (the
    # kept semantics' forward, exactly: x * 1.0 = x) and a straight-through relaxation
    # beside it: the gradient says how much the output leans on that attention entry.
    attn_grad = not ablate_attention_edges and search.kept_attention_gradient
    is_attn = [g.edge_fields["kind"] == 0 for g in graphs] if attn_grad else []
    gens = [torch.Generator().manual_seed(search.seed) for _ in range(n)]
    t0, t1 = search.temperature
    history: list[list[Tensor]] = [[] for _ in range(n)]
    step_orders: list[list[Tensor]] = [[] for _ in range(n)]
    best = [(math.inf, 0) for _ in range(n)]
    for step in range(search.steps):
        temp = t0 * (t1 / t0) ** (step / max(search.steps, 1))
        keeps, ths = [], []
        for p, graph in enumerate(graphs):
            noisy = thetas[p]
            if search.noise > 0 and step > 0:
                u = torch.rand(graph.n_edges, generator=gens[p], dtype=torch.float64)
                u = u.clamp(1e-9, 1 - 1e-9)
                noisy = thetas[p] + search.noise * temp * (u.log() - (-u).log1p())
            # step 0 without noise: the scores' ranking is the initial one (rank_scores), so
            # the heap pass (about 1 s on 0.3 M edges) is skipped
            fresh = step > 0 or search.noise > 0
            order = greedy_order(graph, noisy) if fresh else init_orders[p].to(torch.int32)
            step_orders[p].append(order)
            hard = hard_masks(order, budgets[p], graph.n_edges)
            th = thetas[p].clone().requires_grad_(True)
            # tau_b: the k_b-th largest score (the relaxation's boundary for budget b)
            tau = torch.sort(thetas[p], descending=True).values[budgets[p] - 1]
            soft = torch.sigmoid((th[None, :] - tau[:, None]) / temp)
            if attn_grad:
                hard = torch.where(is_attn[p][None, :], 1.0, hard)
            keeps.append(hard + soft - soft.detach())
            ths.append(th)
        logps = masked_rows(
            model,
            batch,
            range(n),
            graphs,
            keeps,
            ablate_attention_edges=ablate_attention_edges or attn_grad,
            max_rows=search.max_rows,
        )
        losses = []
        for p, logp in enumerate(logps):
            kl = kl_divergence(logp_full[p].expand_as(logp), logp).clamp(min=0)
            history[p].append(kl.detach().double().cpu())
            score = float(torch.log(kl.detach().double() + 1e-12).mean())
            if score < best[p][0]:
                best[p] = (score, step)
            losses.append(torch.log(kl + 1e-12).sum())
        grads = torch.autograd.grad(torch.stack(losses).sum(), ths)
        thetas = [_update(t, g, search.lr) for t, g in zip(thetas, grads)]
    fits = []
    for p, graph in enumerate(graphs):
        if search.steps == 0:
            step_orders[p].append(init_orders[p].to(torch.int32))
        else:  # the ranking after the last update: not measured here (the merge measures it)
            step_orders[p].append(greedy_order(graph, thetas[p]))
        best_step = best[p][1]
        kl = torch.stack(history[p]) if history[p] else torch.zeros(0, len(budgets[p]))
        fits.append(
            LearnedOrder(
                order=step_orders[p][best_step],
                scores=thetas[p],
                budgets=budgets[p],
                best_step=best_step,
                kl=kl,
                passes=search.steps,
                step_orders=step_orders[p],
            )
        )
    return fits


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
    ``order`` is the ranking of the measured step with the lowest mean log KL (step 0: the
    greedy's); ``step_orders`` also holds the ranking after the last update (unmeasured).
    """
    check_edge_hook_points(model)
    with model_untouched(model):
        if logp_full is None:
            (logp_full,) = full_logprobs(
                model, row, [graph], ablate_attention_edges=ablate_attention_edges
            )
        (fit,) = learn_orders(
            model,
            row,
            [graph],
            [init_order],
            [budgets],
            search=search,
            ablate_attention_edges=ablate_attention_edges,
            logp_full=[logp_full],
        )
    return fit


@dataclass
class _State:
    """One measured subgraph of a prompt's merge at one edge count."""

    mask: Tensor | None  # bool [edge]; dropped once no later state can grow from it
    block: Tensor  # the edges added to the predecessor's, in the order they are ranked
    pred: int  # index among the previous count's states (-1: the empty subgraph)
    ranking: int  # the candidate ranking whose edges the block is
    kl: float
    tv: float
    logp: Tensor | None  # dropped once the state cannot be on the chosen path
    path_tv: float  # sum of TV over the path that ends here
    greedy_prefix: bool  # the first ranking's own prefix
    restart: bool = False  # the first ranking's prefix entered while the chain had left it


@dataclass
class _Chain:
    """The state of one prompt's nested merge: the measured states per count, the chain's
    current one and (``bound``) the first ranking's prefix measured at every count."""

    rankings: Sequence[Tensor]
    counts: list[int]
    bound: bool
    levels: list[list[_State]] = field(default_factory=list)
    current: int = 0
    rows: int = 0

    def __post_init__(self) -> None:
        first = self.rankings[0].long()
        self.position = torch.empty(len(first), dtype=torch.long)
        self.position[first] = torch.arange(len(first))

    def _prev(self) -> tuple[Tensor, int]:
        if not self.levels:
            return torch.zeros(len(self.position), dtype=torch.bool), 0
        state = self.levels[-1][self.current]
        assert state.mask is not None
        return state.mask, int(state.mask.sum())

    def candidates(self, i: int) -> list[_State]:
        """The chain's extensions by each ranking's next edges not taken yet, distinct as
        sets; with ``bound``, also the first ranking's own prefix of ``counts[i]`` edges
        when no extension is it, grown from the measured state below it with the lowest
        path TV (the previous count's prefix is always one)."""
        k = self.counts[i]
        taken, prev = self._prev()
        cands: list[_State] = []
        masks: list[Tensor] = []
        prefix = self.position < k
        for r, ranking in enumerate(self.rankings):
            block = ranking[~taken[ranking.long()]][: k - prev]
            mask = taken.clone()
            mask[block.long()] = True
            if any(torch.equal(mask, m) for m in masks):
                continue
            masks.append(mask)
            same = bool(torch.equal(mask, prefix))
            cands.append(_State(mask, block, self.current, r, 0.0, 0.0, None, 0.0, same))
        if self.bound and not any(c.greedy_prefix for c in cands):
            below = self.levels[-1]  # not empty: at the first count ranking 0 gives the prefix
            inside = [j for j, b in enumerate(below) if not (b.mask & ~prefix).any()]  # type: ignore[operator]
            pred = min(inside, key=lambda j: below[j].path_tv)
            base = below[pred].mask
            first = self.rankings[0][:k]
            block = first[~base[first.long()]]  # type: ignore[index]
            cands.append(_State(prefix, block, pred, 0, 0.0, 0.0, None, 0.0, True, True))
        return cands

    def take(self, cands: list[_State], kl: Tensor, tv: Tensor, logp: Tensor) -> None:
        """Records the measured candidates; the chain continues from the one with the lowest
        KL among those (``bound``) whose TV is at most the first ranking's prefix's."""
        below = self.levels[-1] if self.levels else []
        bound = next((float(t) for c, t in zip(cands, tv) if c.greedy_prefix), math.inf)
        level = []
        for c, kl_c, tv_c, logp_c in zip(cands, kl.tolist(), tv.tolist(), logp):
            if self.bound and tv_c > bound:
                continue  # cannot be on a path that is never worse than the prefix
            c.kl, c.tv, c.logp = kl_c, tv_c, logp_c
            c.path_tv = tv_c + (below[c.pred].path_tv if below else 0.0)
            level.append(c)
        # the first of equal minima: the earlier ranking, the prefix entered last
        self.current = min(range(len(level)), key=lambda j: level[j].kl)
        self.rows += len(cands)
        used = {c.pred for c in level}
        for j, b in enumerate(below):
            b.mask = None  # the next count's candidates grow from this level's states
            if j not in used:
                b.logp = None
        self.levels.append(level)

    def result(self, vocab: int) -> tuple[Tensor, MergeChoice]:
        path: list[_State] = []
        j = self.current
        for level in reversed(self.levels):
            path.append(level[j])
            j = level[j].pred
        path.reverse()
        first = self.rankings[0]
        taken = torch.zeros(len(first), dtype=torch.bool)
        blocks = [p.block for p in path]
        for b in blocks:
            taken[b.long()] = True
        blocks.append(first[~taken[first.long()]])
        return torch.cat(blocks).to(torch.int32), MergeChoice(
            counts=torch.tensor(self.counts[: len(path)], dtype=torch.long),
            choice=torch.tensor([p.ranking for p in path], dtype=torch.long),
            kl=torch.tensor([p.kl for p in path], dtype=torch.float64),
            logp=torch.stack([p.logp for p in path]) if path else torch.zeros(0, vocab),  # type: ignore[misc]
            rows=self.rows,
            greedy_prefix=torch.tensor([p.greedy_prefix for p in path], dtype=torch.bool),
            restarts=sum(p.restart for p in path),
        )


def merge_nested_many(
    model: Any,
    batch: TokenBatch,
    graphs: Sequence[EdgeGraph],
    rankings: Sequence[Sequence[Tensor]],
    counts: Sequence[Tensor],
    *,
    ablate_attention_edges: bool = True,
    logp_full: Sequence[Tensor],
    max_rows: int = 64,
    greedy_bound: bool = True,
) -> list[tuple[Int[Tensor, " edge"], MergeChoice]]:
    """:func:`merge_nested` for the prompts of a right-padded ``batch`` (row p: prompt p),
    in lockstep: the candidates of every prompt at its i-th count are measured in one
    forward. Must run inside :func:`model_untouched`."""
    chains = []
    for graph, ranks, count in zip(graphs, rankings, counts):
        if not ranks:
            raise ValueError("merge_nested needs at least one candidate ranking.")
        for r in ranks:
            if r.shape != (graph.n_edges,):
                raise ValueError(f"A candidate ranking must order all {graph.n_edges} edges.")
        ks = sorted({int(c) for c in count.tolist() if 0 < int(c) < graph.n_edges})
        chains.append(_Chain(ranks, ks, greedy_bound))
    for i in range(max((len(c.counts) for c in chains), default=0)):
        live = [p for p, c in enumerate(chains) if i < len(c.counts)]
        cands = {p: chains[p].candidates(i) for p in live}
        keeps = [torch.stack([c.mask for c in cands[p]]) for p in live]  # type: ignore[misc]
        with torch.no_grad():
            logps = masked_rows(
                model,
                batch,
                live,
                [graphs[p] for p in live],
                keeps,
                ablate_attention_edges=ablate_attention_edges,
                max_rows=max_rows,
            )
        for p, logp in zip(live, logps):
            target = logp_full[p].detach().expand_as(logp)
            kl = kl_divergence(target, logp).clamp(min=0).double().cpu()
            tv = tv_distance(target, logp).double().cpu()
            chains[p].take(cands[p], kl, tv, logp.detach().cpu())
    return [c.result(int(logp_full[p].shape[-1])) for p, c in enumerate(chains)]


def merge_nested(
    model: Any,
    row: TokenBatch,
    graph: EdgeGraph,
    rankings: Sequence[Tensor],
    counts: Int[Tensor, " size"],
    *,
    ablate_attention_edges: bool = True,
    logp_full: Float[Tensor, " vocab"],
    max_rows: int = 64,
    greedy_bound: bool = True,
) -> tuple[Int[Tensor, " edge"], MergeChoice]:
    """One nested ranking that, size by size, continues with whichever candidate measures best.

    At each edge count ``k`` (ascending), the chain so far ``S`` (``k_prev`` edges) is
    extended by each ranking's first ``k - k_prev`` edges not in ``S``, in that ranking's
    order; every distinct extension is measured exactly (hard masks, KL at the last
    position, one batch) and the one with the lowest KL is kept (ties: the earlier ranking).
    So the first size is the best of the rankings' own prefixes, and wherever ``S`` lies
    inside the first ranking's prefix of size ``k`` (the greedy's, e.g. while the greedy has
    been chosen all along), the extension by the first ranking is that prefix.

    ``greedy_bound`` (the default): the first ranking's prefix of ``k`` edges ``G_k`` is
    measured at every count (one more row where no extension is it); extensions whose TV is
    above ``G_k``'s are dropped; ``G_k`` itself stays, grown from the kept state of the
    previous count that it contains with the lowest sum of TV along its path (``G_k_prev``
    always qualifies), and the chain continues from the kept state with the lowest KL. The
    ranking is the path of kept states that ends at the last count's chosen one, so at every
    count its TV is at most ``G_k``'s. False: KL alone, the chain itself is the ranking.

    If every ranking has all its prefixes connected to the output (as :func:`greedy_order`
    rankings have), so has the merge: an edge's target is reached by an edge earlier in its
    own ranking, which is in the predecessor or earlier in the block (for ``G_k``, the
    block is the first ranking's order). After the last count the first ranking continues.
    Cost: one masked forward of at most ``len(rankings)`` (+1 with the bound) rows per count.
    """
    check_edge_hook_points(model)
    with model_untouched(model):
        ((order, choice),) = merge_nested_many(
            model,
            row,
            [graph],
            [rankings],
            [counts],
            ablate_attention_edges=ablate_attention_edges,
            logp_full=[logp_full],
            max_rows=max_rows,
            greedy_bound=greedy_bound,
        )
    return order, choice


def merge_candidates(fit: LearnedOrder, greedy: Tensor, most: int) -> list[Tensor]:
    """The greedy's ranking first, then the kept (best measured) step's, then the latest
    steps' (the last one unmeasured by the learning), distinct, at most ``most`` in all."""
    steps = list(range(len(fit.step_orders) - 1, 0, -1))
    picked = [greedy]
    for s in [fit.best_step, *steps]:
        if len(picked) >= most:
            break
        order = fit.step_orders[s]
        if not any(torch.equal(order, o) for o in picked):
            picked.append(order)
    return picked


def learned_nested_orders(
    model: Any,
    batch: TokenBatch,
    greedy: Sequence[Tensor],
    grid: Sequence[float],
    *,
    search: MaskSearch = MaskSearch(),
    ablate_attention_edges: bool = True,
) -> list[LearnedOrder]:
    """``method="mask"`` for every prompt of a right-padded ``batch``, ``search.batch_prompts``
    prompts side by side: :func:`learn_orders` from the greedy rankings, then (``search.merge``)
    :func:`merge_nested_many` over the greedy's and the learned steps' rankings at the grid's
    edge counts. ``fit.merge.logp`` holds each merged subgraph's measured log-probs and
    ``fit.logp_full`` the all-edges reference row they were measured against."""
    if batch.has_left_padding:
        raise ValueError("Edge graphs index positions: give right-padded token rows.")
    lengths = (batch.predict_pos + 1).tolist()
    if len(greedy) != len(lengths):
        raise ValueError(f"{len(greedy)} greedy rankings for {len(lengths)} prompts.")
    check_edge_hook_points(model)
    fits: list[LearnedOrder] = []
    with model_untouched(model):
        for start in range(0, len(lengths), search.batch_prompts):
            part = list(range(start, min(start + search.batch_prompts, len(lengths))))
            sub = batch.select(part).trimmed()
            graphs = [EdgeGraph.from_model(model, lengths[p]) for p in part]
            fits += _search_part(
                model, sub, graphs, [greedy[p] for p in part], grid, search, ablate_attention_edges
            )
    return fits


def _search_part(
    model: Any,
    batch: TokenBatch,
    graphs: list[EdgeGraph],
    greedy: list[Tensor],
    grid: Sequence[float],
    search: MaskSearch,
    ablate: bool,
) -> list[LearnedOrder]:
    logp_full = full_logprobs(model, batch, graphs, ablate_attention_edges=ablate)
    budgets = [pick_budgets(grid, g.n_edges, search) for g in graphs]
    fits = learn_orders(
        model,
        batch,
        graphs,
        greedy,
        budgets,
        search=search,
        ablate_attention_edges=ablate,
        logp_full=logp_full,
    )
    for fit, logp in zip(fits, logp_full):
        fit.logp_full = logp.detach().cpu()
    if not search.merge:
        return fits
    merged = merge_nested_many(
        model,
        batch,
        graphs,
        [merge_candidates(f, o, search.max_candidates) for f, o in zip(fits, greedy)],
        [torch.tensor([int(s * g.n_edges) for s in grid], dtype=torch.long) for g in graphs],
        ablate_attention_edges=ablate,
        logp_full=logp_full,
        max_rows=search.max_rows,
        greedy_bound=search.greedy_bound,
    )
    for fit, (order, choice) in zip(fits, merged):
        fit.order, fit.merge = order, choice
    return fits


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
    """:func:`learned_nested_orders` for one prompt (``row``: a single-row, trimmed batch
    whose graph is ``graph``)."""
    if graph.n_pos != int(row.predict_pos[0]) + 1:
        raise ValueError(f"The graph is over {graph.n_pos} positions, the prompt has another.")
    (fit,) = learned_nested_orders(
        model, row, [greedy], grid, search=search, ablate_attention_edges=ablate_attention_edges
    )
    return fit
