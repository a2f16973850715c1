"""Baselines, scored by the same objective as the learned masks.

- ``random``: uniformly random subsets of each size (several draws: mean and spread).
- ``greedy``: the paper's best-first search transferred to nodes. A node's weight is the L1
  norm of what it writes to the residual stream at the predicted position, relative to its
  ablated value ((z - z_ablated) W_O for a head; mlp_out - ablated for an MLP). Edges run from
  every node into every later node and into the output; an edge's weight is its source's norm
  normalised over all the edges entering the same target. Starting from the output, the
  heaviest frontier edge is taken and its source's own in-edges join the frontier, so nodes
  that feed already chosen ones (through a smaller normaliser) rise in priority.
- ``attribution``: attribution patching, |dKL/dm| per node. At the clean run KL is at its
  minimum and its gradient is zero, so the gradient is taken at the ablated end of the path
  (all candidates ablated): dKL/dm = grad . (clean - ablated) exactly, for each node.
- ``forward``: greedy forward selection, adding the node that lowers KL most, every candidate
  of a step evaluated as rows of batched passes. Stops at ``max_size`` (default: every size
  when there are at most 24 candidates, else 8): larger sizes are not reported.
- ``exhaustive``: every subset of each size; refuses when the subsets to score exceed
  ``max_subsets`` (default 20000 per prompt).
"""

from __future__ import annotations

import heapq
import itertools
import math
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from strace_lens.graph import hook_name
from strace_lens.masked_forward import forward_logprobs
from strace_lens.search.grouping import RowGrouping, as_grouping
from strace_lens.search.objective import SubgraphObjective
from strace_lens.search.ranking import top_s, top_s_grid
from strace_lens.types import Per

EXHAUSTIVE_MAX_SUBSETS = 20000
FORWARD_FULL_LIMIT = 24
FORWARD_DEFAULT_MAX = 8


def random_masks(
    n_rows: int, sizes: Int[Tensor, " size"], n_cand: int, draws: int, gen: torch.Generator
) -> Bool[Tensor, "draw row size cand"]:
    scores = torch.rand(draws, n_rows, len(sizes), n_cand, generator=gen)
    flat = scores.reshape(-1, n_cand)
    sz = sizes.repeat(draws * n_rows)
    return top_s(flat, sz).reshape(draws, n_rows, len(sizes), n_cand)


def attribution_scores(
    objective: SubgraphObjective, per: Per | RowGrouping
) -> Float[Tensor, "group cand"]:
    """dKL/dm at the all-ablated point for every candidate (signed; negative = helps)."""
    n_p = objective.n_prompts
    grouping = as_grouping(per, n_p)
    n_c = int(objective.candidates.sum())
    device = objective.logp_full.device
    zeros = torch.zeros(n_p, n_c, device=device, requires_grad=True)
    weights = torch.ones(n_p, device=device) / grouping.group_size
    objective.kl_backward(objective.full_mask(zeros), torch.arange(n_p, device=device), weights)
    assert zeros.grad is not None
    return grouping.pool(zeros.grad.detach())


@torch.no_grad()
def contribution_norms(objective: SubgraphObjective) -> Float[Tensor, "prompt node"]:
    """L1 norm of each node's (clean - ablated) write to the residual at the predicted position."""
    model, graph, batch = objective.model, objective.graph, objective.batch
    n_p = batch.batch_size
    rows = torch.arange(n_p, device=batch.tokens.device)
    norms = torch.zeros(n_p, len(graph), device=objective.logp_full.device)
    w_o = _head_output_weights(model)

    def attn_hook(z: Tensor, hook: Any) -> None:
        layer = int(hook.name.split(".")[1])
        z_at = z[rows.to(z.device), batch.predict_pos.to(z.device)]  # [p, head, d_head]
        abl = objective.ablation.attn_value(layer, batch)
        if abl is not None:
            abl = abl.to(z.device, z.dtype).expand(z.shape[0], z.shape[1], -1, -1)
            z_at = z_at - abl[rows.to(z.device), batch.predict_pos.to(z.device)]
        out = torch.einsum("phd,hdm->phm", z_at, w_o[layer].to(z.device, z.dtype))
        start = graph.attn_index(layer, 0)
        norms[:, start : start + graph.n_heads] = out.abs().sum(-1).float().to(norms.device)

    def mlp_hook(out: Tensor, hook: Any) -> None:
        layer = int(hook.name.split(".")[1])
        at = (rows.to(out.device), batch.predict_pos.to(out.device))
        o = out[at]
        abl = objective.ablation.mlp_value(layer, batch)
        if abl is not None:
            abl = abl.to(out.device, out.dtype).expand(out.shape[0], out.shape[1], -1)
            o = o - abl[at]
        norms[:, graph.mlp_index(layer)] = o.abs().sum(-1).float().to(norms.device)

    hooks: list[tuple[str, Any]] = []
    for layer in range(graph.n_layers):
        hooks.append((hook_name(layer, "attn"), attn_hook))
        hooks.append((hook_name(layer, "mlp"), mlp_hook))
    forward_logprobs(model, batch, hooks)
    return norms


def _head_output_weights(model: Any) -> Tensor:
    """W_O as ``[layer, head, d_head, d_model]``."""
    w_o = model.W_O
    cfg = model.cfg
    if w_o.ndim == 4:
        return w_o.detach()
    return w_o.detach().reshape(cfg.n_layers, cfg.n_heads, cfg.d_head, cfg.d_model)


def greedy_order(norms: Float[Tensor, " node"], layers: Tensor, is_attn: Tensor) -> list[int]:
    """Best-first order of nodes from the output (see module docstring)."""
    n = len(norms)
    w = norms.double().tolist()
    # plain lists: indexing a tensor element per (source, node) pair took 5 % of a trace
    layer, attn = [int(x) for x in layers.tolist()], [bool(x) for x in is_attn.tolist()]

    # sources that can feed a node: heads feed the MLP of their own layer and everything later;
    # an MLP feeds everything in later layers.
    def feeds(src: int, dst: int) -> bool:
        if layer[src] < layer[dst]:
            return True
        return layer[src] == layer[dst] and attn[src] and not attn[dst]

    total = sum(w) or 1.0
    heap = [(-w[u] / total, u) for u in range(n)]
    heapq.heapify(heap)
    chosen: list[int] = []
    taken = [False] * n
    while heap and len(chosen) < n:
        _, u = heapq.heappop(heap)
        if taken[u]:
            continue
        taken[u] = True
        chosen.append(u)
        sources = [v for v in range(n) if feeds(v, u)]
        norm = sum(w[v] for v in sources) or 1.0
        for v in sources:
            if not taken[v]:
                heapq.heappush(heap, (-w[v] / norm, v))
    return chosen


def greedy_scores(
    objective: SubgraphObjective, per: Per | RowGrouping
) -> Float[Tensor, "group cand"]:
    """Minus each candidate's position in the best-first order (higher = taken earlier)."""
    norms = contribution_norms(objective).cpu()
    cand = objective.candidates.cpu()
    graph = objective.graph
    layers, is_attn = graph.layers[cand], graph.is_attn[cand]
    if as_grouping(per, objective.n_prompts).shared:
        norms = norms.mean(0, keepdim=True)
    out = torch.zeros(norms.shape[0], int(cand.sum()))
    for r in range(norms.shape[0]):
        order = greedy_order(norms[r, cand], layers, is_attn)
        out[r, torch.tensor(order)] = -torch.arange(len(order), dtype=torch.float32)
    return out


def greedy_masks(
    objective: SubgraphObjective, sizes: Int[Tensor, " size"], per: Per | RowGrouping
) -> Bool[Tensor, "row size cand"]:
    return top_s_grid(greedy_scores(objective, per), sizes)


def forward_selection(
    objective: SubgraphObjective,
    sizes: Int[Tensor, " size"],
    per: Per | RowGrouping,
    max_size: int,
) -> Bool[Tensor, "row size cand"]:
    """Greedy forward selection up to ``max_size`` nodes (nested)."""
    grouping = as_grouping(per, objective.n_prompts)
    n_c = int(objective.candidates.sum())
    n_groups = grouping.n_groups
    current = torch.zeros(n_groups, n_c, dtype=torch.bool)
    out = torch.zeros(n_groups, len(sizes), n_c, dtype=torch.bool)
    wanted = {int(s): j for j, s in enumerate(sizes.tolist())}
    for step in range(1, max_size + 1):
        masks, owners = [], []
        for g in range(n_groups):
            for node in torch.nonzero(~current[g]).flatten().tolist():
                m = current[g].clone()
                m[node] = True
                masks.append(m)
                owners.append(g)
        cand_masks = torch.stack(masks)
        owner = torch.tensor(owners)
        kl = grouping.group_kl(objective, cand_masks, owner)
        for g in range(n_groups):
            sel = torch.nonzero(owner == g).flatten()
            current[g] = cand_masks[sel[torch.argmin(kl[sel])]]
        if step in wanted:
            out[:, wanted[step]] = current
    return out


def _subsets(n_c: int, s: int) -> Bool[Tensor, "subset cand"]:
    subsets = torch.zeros(math.comb(n_c, s), n_c, dtype=torch.bool)
    for i, combo in enumerate(itertools.combinations(range(n_c), s)):
        subsets[i, list(combo)] = True
    return subsets


def exhaustive_table(
    objective: SubgraphObjective, size: int
) -> tuple[Bool[Tensor, "subset cand"], Float[Tensor, "prompt subset"]]:
    """Every subset of ``size`` candidates and its KL on every prompt."""
    n_p = objective.n_prompts
    device = objective.logp_full.device
    subsets = _subsets(int(objective.candidates.sum()), size)
    rows = subsets.repeat(n_p, 1)
    prompts = torch.arange(n_p).repeat_interleave(len(subsets))
    kl = objective.kl(objective.full_mask(rows.float().to(device)), prompts.to(device)).cpu()
    return subsets, kl.reshape(n_p, len(subsets))


def exhaustive_masks(
    objective: SubgraphObjective,
    sizes: Int[Tensor, " size"],
    per: Per | RowGrouping,
    max_subsets: int,
) -> Bool[Tensor, "row size cand"]:
    n_p = objective.n_prompts
    n_c = int(objective.candidates.sum())
    total = sum(math.comb(n_c, int(s)) for s in sizes)
    if total > max_subsets:
        raise ValueError(
            f"Exhaustive search would score {total} subsets of {n_c} candidates per prompt, "
            f"above the limit of {max_subsets}: restrict `candidates` (e.g. to <= 16 nodes), "
            "ask for fewer sizes, or raise max_subsets=..."
        )
    grouping = as_grouping(per, n_p)
    out = torch.zeros(grouping.n_groups, len(sizes), n_c, dtype=torch.bool)
    for j, s in enumerate(sizes.tolist()):
        subsets, kl = exhaustive_table(objective, s)
        if grouping.shared:
            kl = kl.mean(0, keepdim=True)
        out[:, j] = subsets[kl.argmin(-1)]
    return out
