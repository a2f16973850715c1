"""s-Trace at edge granularity: rank or draw edge subgraphs per prompt and score each size.

``edge_trace(model, prompts)`` runs the paper's method as its released code does: the greedy
ranking of :mod:`strace_lens.edges.greedy` from one clean forward, the paper's size grid,
zero ablation of every edge outside each subgraph, and TV / KL / shared nucleus / top-1
agreement at the last position. Each prompt's sizes run as rows of one edge-masked batch
(chunked by ``max_rows``), together with one all-edges row whose output is the reference
"full model" (it equals the model's own forward, see tests/test_edge_forward.py, and shares
the batch's arithmetic); the full graph (s = 1) is that row, not a second one. With
``method="mask"`` the search has already run each prompt's reference row and every merged
size's subgraph: those are read back (:mod:`strace_lens.edges.measured`), not run again.

``ablate_attention_edges=False`` counts attention edges in s but never ablates them, which is
what the released evaluation code appears to do; run both to see the difference.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from strace_lens.edges.forward import EdgeMasks, run_with_edge_masks
from strace_lens.edges.graph import EdgeGraph
from strace_lens.edges.greedy import greedy_order, random_order
from strace_lens.edges.learned import MaskSearch, learned_nested_orders
from strace_lens.edges.measured import MeasuredPrefixes
from strace_lens.edges.result import EdgeTraceResult
from strace_lens.edges.sizes import edge_counts, relative_sizes
from strace_lens.edges.tokens import TokenConvention, edge_tokenize
from strace_lens.edges.weights import edge_weights
from strace_lens.inputs import TokenBatch
from strace_lens.metrics import entropy, fidelity

EdgeMethod = Literal["greedy", "random", "mask"]
RandomVariant = Literal["uniform", "resid_mlp_first"]


def evaluate_subgraphs(
    model: Any,
    row: TokenBatch,
    graph: EdgeGraph,
    subgraphs: Sequence[Tensor],
    *,
    ablate_attention_edges: bool = True,
    max_rows: int = 32,
    measured: MeasuredPrefixes | None = None,
) -> tuple[Tensor, Tensor]:
    """Log-probs of one prompt (a single-row batch) for each subgraph (compact id lists),
    and of the all-edges reference row: ``([subgraph, vocab], [vocab])``.

    The full graph runs once: a subgraph of every edge is the reference row itself (on the
    paper's grid, s = 1). With ``measured`` (what the learned search ran for this prompt),
    its reference row and the prefixes it measured are read back, not run again."""
    known = [measured.get(ids) if measured is not None else None for ids in subgraphs]
    full = measured.full if measured is not None else None
    pending = [i for i, k in enumerate(known) if k is None]
    keep = torch.zeros(len(pending), graph.n_edges)
    for j, i in enumerate(pending):
        keep[j, subgraphs[i].long()] = 1.0
    whole = keep.bool().all(-1)
    run = keep[~whole]
    if full is None:  # the reference row, last
        run = torch.cat([run, torch.ones(1, graph.n_edges)])
    dtype = next(model.parameters()).dtype
    chunks = []
    for start in range(0, run.shape[0], max_rows):
        masks = EdgeMasks.from_edges(graph, run[start : start + max_rows].to(dtype))
        chunks.append(
            run_with_edge_masks(model, row, masks, ablate_attention_edges=ablate_attention_edges)
        )
    fresh = torch.cat(chunks) if chunks else None
    if full is None:
        assert fresh is not None
        full, fresh = fresh[-1], fresh[:-1]
    device = full.device if fresh is None else fresh.device
    ran: list[Tensor] = list(fresh.unbind()) if fresh is not None else []
    rows = iter(ran)
    for j, i in enumerate(pending):
        known[i] = full if bool(whole[j]) else next(rows)
    logp_sub = [k.to(device) for k in known if k is not None]
    if not logp_sub:
        return full.new_zeros(0, full.shape[-1]), full
    return torch.stack(logp_sub), full.to(device)


def edge_trace(
    model: Any,
    prompts: str | Sequence[str],
    *,
    method: EdgeMethod = "greedy",
    sizes: str | Sequence[float] = "paper",
    ablate_attention_edges: bool = True,
    tokens: TokenConvention = "paper",
    random_variant: RandomVariant = "uniform",
    seed: int = 0,
    max_rows: int = 32,
    mask_search: MaskSearch | None = None,
) -> EdgeTraceResult:
    """Trace each prompt at edge granularity (see module docstring).

    Args:
        method: ``"greedy"`` (the paper's best-first ranking; nested subgraphs) or
            ``"random"`` (an independent draw per size; not nested) or ``"mask"`` (learned
            to be faithful, starting from the greedy; nested).
        sizes: ``"paper"`` or ascending relative sizes in (0, 1]; size s keeps int(s * E).
        ablate_attention_edges: False keeps every attention edge in the forward pass.
        tokens: ``"paper"`` (the original HF tokenizer's default), ``"hf"`` or
            ``"transformer_lens"`` (see :mod:`strace_lens.edges.tokens`).
        random_variant: ``"uniform"`` edge subsets, or ``"resid_mlp_first"``: residual and
            MLP edges drawn first, then attention edges (the released code's baseline).
        mask_search: options of ``method="mask"`` (:mod:`strace_lens.edges.learned`: a
            nested ranking learned from the greedy's, for this semantics, then merged size by
            size with the greedy's by exact measurement; docs/edge-learned.md).
    """
    if method not in ("greedy", "random", "mask"):
        raise ValueError(f"Unknown edge method {method!r}: 'greedy', 'random' or 'mask'.")
    if tokens not in ("paper", "hf", "transformer_lens"):  # checked before any work
        raise ValueError(
            f"Unknown token convention tokens={tokens!r}: 'paper', 'hf' or 'transformer_lens'."
        )
    if random_variant not in ("uniform", "resid_mlp_first"):
        raise ValueError(f"Unknown random variant {random_variant!r}.")
    grid = relative_sizes(sizes)
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    batch = edge_tokenize(model, prompt_list, tokens)
    lengths = (batch.predict_pos + 1).tolist()
    started = time.perf_counter()
    weights = edge_weights(model, batch)[0] if method != "random" else None
    search = mask_search or MaskSearch()
    learned: list[dict[str, Any]] = []
    gen = torch.Generator().manual_seed(seed)
    counts, id_lists, offsets = [], [], [0]
    metric_rows: list[dict[str, Tensor]] = []
    full_logps = []
    sub_top = []
    measured: list[MeasuredPrefixes | None] = [None] * len(lengths)
    graphs = [EdgeGraph.from_model(model, n_pos) for n_pos in lengths]
    greedy = [greedy_order(g, w) for g, w in zip(graphs, weights)] if weights else []
    if method == "mask":  # every prompt at once: their rows share the search's forwards
        fits = learned_nested_orders(
            model, batch, greedy, grid, search=search, ablate_attention_edges=ablate_attention_edges
        )
        greedy = [fit.order for fit in fits]
        learned = [fit.summary() for fit in fits]
        # the search's reference row and merged sizes, read back by the evaluation below
        measured = [MeasuredPrefixes.from_fit(fit) for fit in fits]
    for p, graph in enumerate(graphs):
        count = edge_counts(grid, graph.n_edges)
        counts.append(count)
        row = batch.select([p]).trimmed()
        if weights is not None:
            order = greedy[p]
            subgraphs = [order[: int(k)] for k in count]
            id_lists.append(order)
            offsets.append(offsets[-1] + len(order))
        else:
            subgraphs = []
            for k in count.tolist():
                ranking = random_order(graph, gen, random_variant == "resid_mlp_first")
                subgraphs.append(ranking[:k])
                id_lists.append(ranking[:k])
                offsets.append(offsets[-1] + k)
        logp_sub, logp_full = evaluate_subgraphs(
            model,
            row,
            graph,
            subgraphs,
            ablate_attention_edges=ablate_attention_edges,
            max_rows=max_rows,
            measured=measured[p],
        )
        scores = fidelity(logp_full.expand_as(logp_sub), logp_sub)
        scores["top1"] = (logp_sub.argmax(-1) == logp_full.argmax(-1)).float()
        metric_rows.append({k: v.detach().cpu() for k, v in scores.items()})
        full_logps.append(logp_full.detach().cpu())
        sub_top.append(logp_sub.argmax(-1).cpu())
    full = torch.stack(full_logps)
    options: dict[str, Any] = {
        "granularity": "edge",
        "method": method,
        "ablate_attention_edges": ablate_attention_edges,
        "tokens": tokens,
        "seed": seed,
        "seconds": time.perf_counter() - started,
    }
    if method == "random":
        options["random_variant"] = random_variant
    if method == "mask":
        options["mask_search"] = {k: getattr(search, k) for k in search.__dataclass_fields__}
        options["mask_fits"] = learned
    return EdgeTraceResult(
        n_layers=int(model.cfg.n_layers),
        n_heads=int(model.cfg.n_heads),
        grid=grid,
        n_pos=torch.tensor(lengths),
        counts=torch.stack(counts),
        nested=method != "random",
        ids=torch.cat(id_lists).to(torch.int32),
        offsets=torch.tensor(offsets),
        metrics={k: torch.stack([m[k] for m in metric_rows]) for k in metric_rows[0]},
        entropy=entropy(full),
        top_tokens=torch.stack(sub_top),
        full_top_tokens=full.argmax(-1),
        prompts=prompt_list,
        options=options,
    )
