"""``trace``: s-Trace over a size sweep, with learned masks or a baseline, measured one way.

The user's path: prompts -> full-model distributions -> a search method proposes hard
subgraphs of exactly s candidate nodes for every size s -> each subgraph and its inverse are
run with hard masks and scored against the full model -> a ``TraceResult``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from strace_lens.ablation import Ablation, resolve_ablation
from strace_lens.config import TraceConfig
from strace_lens.edges.config import EdgeTraceConfig
from strace_lens.edges.result import EdgeTraceResult
from strace_lens.edges.trace import edge_trace
from strace_lens.evaluate import TOP_K, embed_candidates, evaluate_draws, evaluate_masks
from strace_lens.graph import Node, NodeGraph
from strace_lens.hygiene import check_hook_points, model_device, model_untouched
from strace_lens.inputs import Prompts, target_token_ids, tokenize
from strace_lens.masked_forward import check_finite, forward_logprobs
from strace_lens.metrics import entropy
from strace_lens.models import model_identity
from strace_lens.progress import expect_rows, trace_progress
from strace_lens.result import TraceResult
from strace_lens.search.grouping import RowGrouping
from strace_lens.search.objective import SubgraphObjective
from strace_lens.sizes import DEFAULT_GRID_POINTS, checked_sizes, default_sizes
from strace_lens.token_trace.result import TokenTraceResult
from strace_lens.token_trace.trace import run_token_trace
from strace_lens.types import METHODS, PER
from strace_lens.validate import guarded

NodeSpec = Sequence[str | Node | int]


def resolve_sizes(sizes: Sequence[int | float] | Tensor | None, n_candidates: int) -> Tensor:
    """Node counts (ints in [1, n]) or relative sizes (floats in (0, 1]) -> sorted counts."""
    if sizes is None:
        return default_sizes(n_candidates)
    values, are_counts = checked_sizes(
        sizes,
        n_candidates,
        units="node counts",
        whole="the candidate nodes",
        range_note=" (the number of candidate nodes).",
    )
    # a relative size is one node count for every prompt
    counts = [int(v) if are_counts else max(1, round(v * n_candidates)) for v in values]
    if len(set(counts)) != len(counts):
        dup = sorted({c for c in counts if counts.count(c) > 1})
        raise ValueError(f"Sizes repeat (node counts {dup}); give each size once.")
    return torch.tensor(sorted(counts), dtype=torch.long)


def resolve_candidates(
    graph: NodeGraph, keep: NodeSpec | None, candidates: NodeSpec | None
) -> Bool[Tensor, " node"]:
    """Candidates: the nodes a search may choose; all other nodes stay in every subgraph."""
    keep_idx = set(graph.indices(keep)) if keep is not None else set()
    if candidates is not None:
        cand_idx = set(graph.indices(candidates))
        if not cand_idx:
            raise ValueError("`candidates` is empty: name at least one node the search may choose.")
        overlap = keep_idx & cand_idx
        if overlap:
            names = [graph.names[i] for i in sorted(overlap)]
            raise ValueError(
                f"Nodes {names} are both in `keep` (always kept) and in `candidates` (may be "
                "dropped): put each node in one of them."
            )
    else:
        cand_idx = set(range(len(graph))) - keep_idx
        if not cand_idx:
            raise ValueError("`keep` holds every node: nothing is left for the search to choose.")
    mask = torch.zeros(len(graph), dtype=torch.bool)
    mask[sorted(cand_idx)] = True
    return mask


def _target_logprobs(model: Any, logp_full: Tensor, targets: Sequence[str] | None) -> Tensor | None:
    if targets is None:
        return None
    if len(targets) != logp_full.shape[0]:
        raise ValueError(f"{len(targets)} targets for {logp_full.shape[0]} prompts: give one each.")
    idx = target_token_ids(model, targets).to(logp_full.device)
    return logp_full.gather(-1, idx[:, None])[:, 0].cpu()


@guarded  # checks the arguments; keeps the caller's RNG state and grad mode
def trace(
    model: Any,
    prompts: Prompts,
    sizes: Sequence[int | float] | Tensor | str | None = None,
    ablation: Ablation | str | None = None,
    per: str = "input",
    method: str | None = None,
    keep: NodeSpec | None = None,
    candidates: NodeSpec | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    *,
    nested: bool = True,
    inverse: bool | None = None,
    targets: Sequence[str] | None = None,
    batch_size: int | None = None,
    granularity: str = "node",
    **options: Any,
) -> TraceResult | EdgeTraceResult | TokenTraceResult:
    """Find, for every size s, the subgraph of s nodes that best reproduces the model's output.

    ``granularity="edge"`` traces the paper's token-level edge graph instead and returns an
    ``EdgeTraceResult`` (see "Edge granularity" below).

    Args:
        model: a ``TransformerBridge`` or ``HookedTransformer`` (left as found).
        prompts: a string, a list of strings, or token ids ``[batch, pos]``.
        sizes: node counts (ints in [1, n_candidates]) or relative sizes (floats in (0, 1]);
            default: about 12 log-spaced counts from 1 to n_candidates.
        ablation: "mean" (default; mean over ``prompts`` themselves), "zero", or an
            ``Ablation`` such as ``MeanAblation.from_prompts(model, reference_prompts)``.
        per: "input" (a subgraph per prompt and size) or "dataset" (one per size, shared by
            all prompts; objective: mean KL).
        method: "mask" (learned masks; the default), or a baseline: "random", "greedy",
            "attribution", "forward", "exhaustive".
        keep: nodes always kept (not counted in s).
        candidates: the only nodes a search may choose; every other node is kept.
        seed: makes the result reproducible (on CPU, bit for bit).
        device: checked only: the model's device (a model is traced where it is; move it
            with ``model.to(...)`` first). Raises ValueError when they differ.
        progress: a bar with ETA (tqdm.auto: a widget in notebooks); default: on a terminal
            or in a notebook, never in CI (see :mod:`strace_lens.progress`).
        nested: for "mask", make subgraphs nested across sizes (each contains the smaller
            ones). Default True: entry sizes, the core/refinement phases and the composition
            curves of the paper are read off nested families, and the nested search is the
            cheap one on full graphs. Nesting has a price, measured against the exhaustive
            optimum by benchmarks/strace_quality.py (README, "Search quality"): no nested
            family at all gets every size within 5 % of its own optimum, so for the best
            subgraph of each size on its own, pass nested=False.
        inverse: also score each subgraph's inverse (candidates in it ablated, others kept;
            default True).
        targets: the true next token of each prompt (text), to record its full-model log-prob.
        batch_size: rows per forward pass (default: chosen from the free memory of the
            model's device, at most 2048 tokens per pass on CPU; see
            :mod:`strace_lens.memory`); a pass that runs out of memory is retried with half
            the rows.
        granularity: "node" (heads and MLPs; the default), "token" or "edge" (below).
        **options: method options (mask: ``steps``, ``finetune_steps``, ``lr``, ...;
            random: ``draws``; forward: ``max_size``; exhaustive: ``max_subsets``).

    Token granularity (:mod:`strace_lens.token_trace`; docs/token-granularity.md): every
        head and MLP at every position is a unit (names ``a{l}.h{h}@{t}``, ``m{l}@{t}``) and
        a ``TokenTraceResult`` is returned. method: "mask" (default; ``nested`` as above),
        "random" or "exhaustive". sizes: ints count (component, position) pairs, the same for
        every prompt (each must fit the shortest prompt); floats are relative sizes over
        ``n_layers * (n_heads + 1) * n_pos`` of each prompt (the natural choice for prompts
        of different lengths); default: the node grid's counts over the shortest prompt's
        units, as relative sizes. ``ablation``, ``inverse``, ``seed`` and the method options
        are as at node granularity; ``per="dataset"`` needs prompts of one token length;
        ``keep``, ``candidates`` and ``targets`` do not apply and raise ValueError.

    Edge granularity (:mod:`strace_lens.edges`, :func:`~strace_lens.edges.edge_trace`):
        method: "greedy" (the paper's best-first ranking; the default here), "random"
        (uniform edge subsets per size) or "mask" (a learned ranking started from the
        greedy's). sizes: "paper" (the paper's grid; the default) or ascending relative sizes
        in (0, 1]; size s keeps int(s * E) edges. Options: ``ablate_attention_edges`` (True;
        False counts attention edges in s but keeps them, as the released code's evaluation
        appears to), ``tokens`` ("paper", "hf" or "transformer_lens"), ``random_variant``
        ("uniform" or "resid_mlp_first"), ``mask_search`` (a ``MaskSearch`` or a dict of its
        fields). ``batch_size`` is the number of subgraphs per masked forward (default 32).
        Ablation is zero (the paper's); ``per="dataset"``, ``ablation="mean"``, ``keep``,
        ``candidates``, ``inverse``, ``targets`` and ``nested=False`` do not apply and raise
        ValueError saying why.
    """
    if granularity == "edge":
        edge_config = EdgeTraceConfig.from_trace_arguments(
            method=method,
            sizes=sizes.tolist() if isinstance(sizes, Tensor) else sizes,
            ablation=ablation,
            seed=seed,
            nested=nested,
            options=options,
            per=per,
            keep=keep,
            candidates=candidates,
            inverse=inverse,
            targets=targets,
        )
        return run_edge_trace(model, prompts, edge_config, batch_size=batch_size, device=device)
    config = TraceConfig.from_kwargs(
        dict(
            method="mask" if method is None else method,
            per=per,
            ablation=ablation,
            sizes=sizes,
            keep=keep,
            candidates=candidates,
            seed=seed,
            nested=nested,
            inverse=True if inverse is None else inverse,
            granularity=granularity,
            **options,
        )
    )
    if granularity == "token":
        if targets is not None:
            raise ValueError(
                "targets (true next tokens) are not recorded at granularity='token': leave "
                "them None."
            )
        _check_device(model, device)
        with trace_progress(progress):
            return run_token_trace(model, prompts, config, batch_size=batch_size)
    with trace_progress(progress):
        return run_trace(
            model, prompts, config, targets=targets, batch_size=batch_size, device=device
        )


def run_edge_trace(
    model: Any,
    prompts: Prompts,
    config: EdgeTraceConfig,
    *,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
) -> EdgeTraceResult:
    """``trace(..., granularity="edge")`` for a validated edge configuration."""
    if isinstance(prompts, Tensor):
        raise TypeError(
            "At granularity='edge', prompts are strings: the token convention (tokens='paper', "
            "'hf' or 'transformer_lens') decides how they are tokenised, and with it every "
            "edge count. Decode token ids to text first."
        )
    _check_device(model, device)
    return edge_trace(
        model,
        prompts,
        method=config.method,  # type: ignore[arg-type]
        sizes=config.sizes,
        ablate_attention_edges=config.ablate_attention_edges,
        tokens=config.tokens,  # type: ignore[arg-type]
        random_variant=config.random_variant,  # type: ignore[arg-type]
        seed=config.seed,
        max_rows=32 if batch_size is None else batch_size,
        mask_search=config.mask_search,
    )


def _check_device(model: Any, device: str | torch.device | None) -> None:
    if device is not None and torch.device(device) != model_device(model):
        raise ValueError(
            f"The model is on {model_device(model)} but device={device!r} was asked for: move "
            f"the model first (model.to({str(device)!r})) or leave device=None."
        )


def run_trace(
    model: Any,
    prompts: Prompts,
    config: TraceConfig,
    *,
    targets: Sequence[str] | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
) -> TraceResult:
    """``trace`` for a validated configuration: prepare, search, evaluate, build the result."""
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    started = time.perf_counter()
    graph = NodeGraph.from_model(model)
    check_hook_points(model, graph)
    _check_device(model, device)
    batch = tokenize(model, prompts)
    cand = resolve_candidates(graph, config.keep, config.candidates)
    size_counts = resolve_sizes(config.sizes, int(cand.sum()))
    # default: the mean over the prompts' own real tokens
    abl = resolve_ablation(config.ablation, model, prompts, progress=False)
    torch.manual_seed(config.seed)
    grouping = RowGrouping(config.per, batch.batch_size)
    method = config.search_method

    with model_untouched(model):
        with torch.no_grad():
            logp_full = forward_logprobs(model, batch, [])
        check_finite(logp_full, "the full model's output")
        objective = SubgraphObjective(model, graph, batch, logp_full, abl, cand, batch_size)
        expect_rows(planned_rows(objective, method, size_counts, grouping, config))
        found = method.run(objective, size_counts, grouping, config.seed, config.options)
        masks = embed_candidates(found.masks, cand)
        search_rows = objective.rows_evaluated
        if found.draws is not None:
            scored = evaluate_draws(objective, found.draws, config.inverse)
        else:
            scored = evaluate_masks(objective, masks, config.inverse)
    explicit = config.keep is not None or config.candidates is not None
    options_record: dict[str, Any] = {
        "method": config.method,
        "per": config.per,
        "nested": method.nested(config.options),
        "seed": config.seed,
        "ablation": abl.describe(),
        "keep": graph.nodes_from_mask(~cand) if explicit else [],
        "method_options": dict(config.method_options),
        "inverse": config.inverse,
        "model": model_identity(model),
        "search_rows": search_rows,
        # rows the evaluation scored: run, or read back from the search's own measurement
        # (objective.measured; benchmarks/strace_speed.py counts the rows actually run)
        "eval_rows": objective.rows_evaluated - search_rows + objective.measured.reused,
        "seconds": round(time.perf_counter() - started, 3),
        "version": _version(),
    }
    return TraceResult(
        graph=graph,
        sizes=found.sizes.clone(),
        masks=masks,
        metrics=scored.metrics,
        entropy=entropy(logp_full).cpu(),
        prompts=_prompt_texts(model, prompts, batch.batch_size),
        top_tokens=scored.top_tokens,
        full_top_tokens=logp_full.topk(TOP_K, -1).indices.cpu(),
        candidates=cand,
        options=options_record,
        target_logprob=_target_logprobs(model, logp_full, targets),
    )


def planned_rows(
    objective: SubgraphObjective,
    method: Any,
    sizes: Int[Tensor, " size"],
    grouping: RowGrouping,
    config: TraceConfig,
) -> int:
    """The forward rows a trace expects: the method's search and the evaluation of every
    (prompt, size) mask (and its inverse; of every random draw)."""
    draws = int(getattr(config.options, "draws", 1))
    evaluation = objective.n_prompts * len(sizes) * (2 if config.inverse else 1) * draws
    return method.planned_rows(objective, sizes, grouping, config.options) + evaluation


def _prompt_texts(model: Any, prompts: Prompts, n: int) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, Tensor):
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is None:
            return [f"<tokens {i}>" for i in range(n)]
        rows = prompts if prompts.ndim == 2 else prompts[None]
        return [tokenizer.decode(r.tolist()) for r in rows]
    return [str(p) for p in prompts]


def _version() -> str:
    from strace_lens import __version__

    return __version__


__all__ = [
    "DEFAULT_GRID_POINTS",
    "METHODS",
    "PER",
    "TOP_K",
    "default_sizes",
    "resolve_candidates",
    "resolve_sizes",
    "run_edge_trace",
    "run_trace",
    "trace",
]
