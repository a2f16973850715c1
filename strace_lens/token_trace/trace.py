"""s-Trace at token granularity: every head and MLP at every position is a unit.

``trace(model, prompts, granularity="token", ...)`` comes here with a validated
``TraceConfig``. The prompts are grouped by token length (a unit is a position of one
prompt, so only prompts of one length share a graph); each group gets a
:class:`~strace_lens.token_trace.objective.TokenObjective`, the configured search method of
:mod:`strace_lens.search` runs on it unchanged (learned masks under an exact budget, nested
or independent; random draws; the exhaustive search), and every hard subgraph and its inverse
is scored with its hard mask. Sizes: :mod:`strace_lens.token_trace.sizes`.

``per="dataset"`` means one subgraph of (component, position) pairs shared by every prompt,
which is defined only when the prompts have one length; otherwise it is refused.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from jaxtyping import Bool
from torch import Tensor

from strace_lens.ablation import resolve_ablation
from strace_lens.config import TraceConfig
from strace_lens.evaluate import TOP_K, Evaluation, evaluate_draws, evaluate_masks
from strace_lens.graph import NodeGraph
from strace_lens.hygiene import check_hook_points, model_untouched
from strace_lens.inputs import Prompts, TokenBatch, tokenize
from strace_lens.masked_forward import check_finite, forward_logprobs
from strace_lens.metrics import entropy
from strace_lens.models import model_identity
from strace_lens.progress import expect_rows
from strace_lens.search.grouping import RowGrouping
from strace_lens.token_trace.objective import TokenObjective
from strace_lens.token_trace.result import TokenTraceResult
from strace_lens.token_trace.sizes import size_grid, unit_counts_of


def length_groups(batch: TokenBatch) -> dict[int, list[int]]:
    """Prompt indices by token count (ascending lengths, prompts in order)."""
    lengths = batch.attention_mask.sum(-1).tolist()
    groups: dict[int, list[int]] = {}
    for p, n in enumerate(lengths):
        groups.setdefault(int(n), []).append(p)
    return dict(sorted(groups.items()))


def check_per(per: str, groups: dict[int, list[int]]) -> None:
    """``per="dataset"`` needs one prompt length (ValueError naming the lengths otherwise)."""
    if per == "dataset" and len(groups) > 1:
        raise ValueError(
            "per='dataset' at granularity='token' needs prompts of one token length: a "
            "(component, position) pair of one prompt is no unit of a prompt of another "
            f"length, so no subgraph can be shared; these prompts have {sorted(groups)} "
            "tokens. Trace each length on its own (e.g. group the prompts by length), or use "
            "per='input'."
        )


def run_token_trace(
    model: Any,
    prompts: Prompts,
    config: TraceConfig,
    *,
    batch_size: int | None = None,
) -> TokenTraceResult:
    """``trace(..., granularity="token")`` for a validated configuration (module docstring)."""
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    started = time.perf_counter()
    node_graph = NodeGraph.from_model(model)
    check_hook_points(model, node_graph)
    batch = tokenize(model, prompts)
    if batch.has_left_padding:
        raise ValueError(
            "At granularity='token' positions index the mask: give right-padded token rows "
            "(or strings)."
        )
    groups = length_groups(batch)
    check_per(config.per, groups)
    per_node = len(node_graph)
    grid = size_grid(config.sizes, [per_node * n for n in groups])
    abl = resolve_ablation(config.ablation, model, prompts, progress=False)
    torch.manual_seed(config.seed)
    method = config.search_method
    n_p = batch.batch_size
    masks: list[Tensor | None] = [None] * n_p
    scored: list[tuple[list[int], Evaluation]] = []
    logp_full = torch.zeros(0)
    search_rows = eval_rows = 0
    with model_untouched(model):
        objectives = []
        for n_pos, members in groups.items():
            rows = batch.select(members).trimmed()
            with torch.no_grad():
                logp = forward_logprobs(model, rows, [])
            check_finite(logp, "the full model's output")
            n_units = per_node * n_pos
            cand = torch.ones(n_units, dtype=torch.bool)
            objective = TokenObjective(
                model, node_graph, rows, logp, abl, cand, batch_size, n_pos=n_pos
            )
            counts = unit_counts_of(grid, n_units)
            objectives.append((members, objective, counts))
            expect_rows(_planned_rows(objective, counts, config))
        for members, objective, counts in objectives:
            found, evaluation = _search_and_score(objective, counts, config)
            search_rows += objective.rows_evaluated - evaluation[1]
            eval_rows += evaluation[1]
            scored.append((members, evaluation[0]))
            for r, p in enumerate(members):
                masks[p] = found[0 if found.shape[0] == 1 else r]
        logp_full = _in_prompt_order(n_p, [(m, o.logp_full.cpu()) for m, o, _ in objectives])
    metrics, top_tokens = _merge_evaluations(n_p, scored)
    metrics["top1"] = (top_tokens[..., 0] == logp_full.argmax(-1)[:, None]).float()
    nested_family, ids, offsets = TokenTraceResult.encode([m for m in masks if m is not None])
    options: dict[str, Any] = {
        "granularity": "token",
        "method": config.method,
        "per": config.per,
        "nested": method.nested(config.options),
        "seed": config.seed,
        "ablation": abl.describe(),
        "method_options": dict(config.method_options),
        "inverse": config.inverse,
        "model": model_identity(model),
        "search_rows": search_rows,
        "eval_rows": eval_rows,
        "seconds": round(time.perf_counter() - started, 3),
    }
    n_pos_all = batch.attention_mask.sum(-1).long().cpu()
    return TokenTraceResult(
        n_layers=node_graph.n_layers,
        n_heads=node_graph.n_heads,
        grid=grid,
        n_pos=n_pos_all,
        counts=torch.stack([unit_counts_of(grid, per_node * int(n)) for n in n_pos_all]),
        nested=nested_family,
        ids=ids,
        offsets=offsets,
        metrics=metrics,
        entropy=entropy(logp_full),
        top_tokens=top_tokens,
        full_top_tokens=logp_full.topk(TOP_K, -1).indices,
        prompts=_prompt_texts(model, prompts, n_p),
        options=options,
    )


def _search_and_score(
    objective: TokenObjective, counts: Tensor, config: TraceConfig
) -> tuple[Bool[Tensor, "group size unit"], tuple[Evaluation, int]]:
    """One length group: the method's hard masks at every grid size (a count repeated by
    rounding is searched once) and their evaluation (and the rows it ran)."""
    method = config.search_method
    unique, column = torch.unique(counts, return_inverse=True)
    grouping = RowGrouping(config.per, objective.n_prompts)
    found = method.run(objective, unique, grouping, config.seed, config.options)
    if len(found.sizes) != len(unique):
        raise ValueError(
            f"method={config.method!r} reached only sizes {found.sizes.tolist()} of "
            f"{unique.tolist()} at granularity='token'."
        )
    before = objective.rows_evaluated
    if found.draws is not None:
        evaluation = evaluate_draws(objective, found.draws[:, :, column], config.inverse)
    else:
        evaluation = evaluate_masks(objective, found.masks[:, column].cpu(), config.inverse)
    return found.masks[:, column].cpu(), (evaluation, objective.rows_evaluated - before)


def _planned_rows(objective: TokenObjective, counts: Tensor, config: TraceConfig) -> int:
    sizes = torch.unique(counts)
    grouping = RowGrouping(config.per, objective.n_prompts)
    draws = int(getattr(config.options, "draws", 1))
    evaluation = objective.n_prompts * len(counts) * (2 if config.inverse else 1) * draws
    return config.search_method.planned_rows(objective, sizes, grouping, config.options) + (
        evaluation
    )


def _in_prompt_order(n_p: int, parts: list[tuple[list[int], Tensor]]) -> Tensor:
    """Rows of each group's tensor put back at their prompts' indices."""
    first = parts[0][1]
    out = torch.zeros(n_p, *first.shape[1:], dtype=first.dtype)
    for members, values in parts:
        out[torch.tensor(members)] = values
    return out


def _merge_evaluations(
    n_p: int, scored: list[tuple[list[int], Evaluation]]
) -> tuple[dict[str, Tensor], Tensor]:
    names = scored[0][1].metrics
    metrics = {k: _in_prompt_order(n_p, [(m, e.metrics[k]) for m, e in scored]) for k in names}
    top = _in_prompt_order(n_p, [(m, e.top_tokens) for m, e in scored])
    return metrics, top


def _prompt_texts(model: Any, prompts: Prompts, n: int) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, Tensor):
        tokenizer = getattr(model, "tokenizer", None)
        rows = prompts if prompts.ndim == 2 else prompts[None]
        if tokenizer is None:
            return [f"<tokens {i}>" for i in range(n)]
        return [tokenizer.decode(r.tolist()) for r in rows]
    return [str(p) for p in prompts]


__all__ = ["check_per", "length_groups", "run_token_trace"]
