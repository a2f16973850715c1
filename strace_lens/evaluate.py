"""Scoring hard node masks against the full model: KL, TV and shared nucleus, for each
subgraph and its inverse, with the subgraph's top tokens.

``evaluate(model, prompts, masks, ablation)`` is the public entry point (as auto-circuit's
``run_circuits``): it scores masks found any way, e.g. edited by hand. ``trace`` scores the
masks its search found with ``evaluate_masks`` on the objective it searched with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from strace_lens.ablation import Ablation, resolve_ablation
from strace_lens.graph import Node, NodeGraph
from strace_lens.hygiene import check_hook_points, model_untouched
from strace_lens.inputs import Prompts, tokenize
from strace_lens.masked_forward import check_finite, forward_logprobs
from strace_lens.metrics import kl_divergence, shared_nucleus, tv_distance
from strace_lens.search.objective import SubgraphObjective

#: top tokens recorded per subgraph and for the full model
TOP_K = 5


@dataclass(frozen=True)
class Evaluation:
    """Metrics name -> ``[P, S]`` (``kl``, ``tv``, ``nucleus``, and ``inv_*`` for inverses;
    ``*_std`` over random draws) and each subgraph's top tokens ``[P, S, k]``."""

    metrics: dict[str, Float[Tensor, "prompt size"]]
    top_tokens: Int[Tensor, "prompt size k"]


def embed_candidates(
    cand_masks: Bool[Tensor, "row size cand"], cand: Bool[Tensor, " node"]
) -> Bool[Tensor, "row size node"]:
    """Candidate masks ``[R, S, n_cand]`` -> node masks ``[R, S, N]`` (others kept)."""
    out = torch.ones(*cand_masks.shape[:2], len(cand), dtype=torch.bool)
    out[:, :, cand] = cand_masks.cpu()
    return out


def evaluate_masks(
    objective: SubgraphObjective, masks: Bool[Tensor, "row size node"], inverse: bool = True
) -> Evaluation:
    """Hard-mask metrics for every (prompt, size), and for each inverse subgraph (the
    candidates in the subgraph ablated, every other node kept). ``R`` is the number of
    prompts, or 1 for masks shared by all prompts."""
    cand = objective.candidates.cpu()
    n_p = objective.n_prompts
    n_r, n_s, n_n = masks.shape
    per_prompt = masks.expand(n_p, -1, -1) if n_r == 1 else masks
    rows = per_prompt.reshape(-1, n_n)
    prompt_index = torch.arange(n_p).repeat_interleave(n_s)
    metrics: dict[str, Tensor] = {}
    top = None
    variants = [("", rows)]
    if inverse:
        variants.append(("inv_", ~rows | ~cand[None]))
    device = objective.logp_full.device
    for prefix, variant in variants:
        kl, tv, nuc, tops = [], [], [], []
        step = objective.rows_per_pass
        chunks = _read_back(objective, variant, prompt_index, step)
        for lo in range(0, len(prompt_index), step):
            idx = prompt_index[lo : lo + step].to(device)
            logp = chunks.get(lo)
            if logp is None:  # nothing read back: the chunk runs as one pass
                logp = objective.logprobs(variant[lo : lo + step].float().to(device), idx)
            full = objective.logp_full[idx]
            kl.append(kl_divergence(full, logp).cpu())
            tv.append(tv_distance(full, logp).cpu())
            nuc.append(shared_nucleus(full, logp).cpu())
            if not prefix:
                tops.append(logp.topk(TOP_K, -1).indices.cpu())
        metrics[prefix + "kl"] = torch.cat(kl).reshape(n_p, n_s)
        metrics[prefix + "tv"] = torch.cat(tv).reshape(n_p, n_s)
        metrics[prefix + "nucleus"] = torch.cat(nuc).reshape(n_p, n_s)
        if not prefix:
            top = torch.cat(tops).reshape(n_p, n_s, TOP_K)
    assert top is not None
    return Evaluation(metrics, top)


def _read_back(
    objective: SubgraphObjective,
    masks: Bool[Tensor, "row node"],
    prompt_index: Int[Tensor, " row"],
    step: int,
) -> dict[int, Float[Tensor, "chunk vocab"]]:
    """Log-probs of each chunk of ``step`` rows (keyed by its first row) in which
    the search already ran some rows (``objective.measured``): those are read back, and the
    chunks' other rows run with the hooks their whole chunk would have had, all chunks'
    together (one pass per set of hooked layers, not a small pass per chunk). A row read
    back, or run beside other rows than its chunk's, may differ from a run of the whole
    chunk by the rounding of another batch (about 1e-5 in KL on SmolLM2; none on the tiny
    model): :mod:`strace_lens.search.measured`."""
    device = objective.logp_full.device
    known: dict[int, list[Tensor | None]] = {}
    left: dict[bytes, tuple[Tensor, list[int]]] = {}  # hooked layers -> (them, rows)
    for lo in range(0, len(prompt_index), step):
        chunk = masks[lo : lo + step].float()
        hooked = objective.hooked_layers(chunk)
        got = [
            objective.measured.get(int(p), m, hooked)
            for p, m in zip(prompt_index[lo : lo + step].tolist(), chunk)
        ]
        if all(logp is None for logp in got):
            continue
        known[lo] = got
        missing = [lo + i for i, logp in enumerate(got) if logp is None]
        if missing:
            key = bytes(hooked.cpu().numpy().tobytes())
            left.setdefault(key, (hooked, []))[1].extend(missing)
    for hooked, rows in left.values():
        index = torch.tensor(rows)
        ran = objective.logprobs(
            masks[index].float().to(device), prompt_index[index].to(device), hooked
        )
        for row, logp in zip(rows, ran):
            known[row - row % step][row % step] = logp
    return {
        lo: torch.stack([logp.to(device) for logp in got if logp is not None])
        for lo, got in known.items()
    }


def evaluate_draws(
    objective: SubgraphObjective, draws: Bool[Tensor, "draw row size cand"], inverse: bool
) -> Evaluation:
    """Several random draws: mean and standard deviation of every metric over the draws.

    Each draw is evaluated once; the top tokens reported are those of the first draw (whose
    masks the result stores).
    """
    cand = objective.candidates.cpu()
    evaluated = [evaluate_masks(objective, embed_candidates(d, cand), inverse) for d in draws]
    out: dict[str, Tensor] = {}
    for name in evaluated[0].metrics:
        stacked = torch.stack([e.metrics[name] for e in evaluated])
        out[name] = stacked.mean(0)
        out[name + "_std"] = stacked.std(0)
    return Evaluation(out, evaluated[0].top_tokens)


def evaluate(
    model: Any,
    prompts: Prompts,
    masks: Bool[Tensor, "*row_size node"],
    ablation: Ablation | str | None = None,
    *,
    candidates: Sequence[str | Node | int] | None = None,
    inverse: bool = True,
    batch_size: int | None = None,
) -> Evaluation:
    """Score hard node masks on ``prompts``: each subgraph (and its inverse) against the full
    model.

    Args:
        model: a ``TransformerBridge`` or ``HookedTransformer`` (left as found).
        prompts: a string, a list of strings, or token ids ``[batch, pos]``.
        masks: bool node masks ``[N]`` (one subgraph), ``[S, N]`` (S subgraphs, every prompt)
            or ``[P, S, N]`` (S subgraphs per prompt), e.g. ``TraceResult.masks``.
        ablation: "mean" (default; over ``prompts``), "zero", or an ``Ablation``.
        candidates: the nodes the inverse may ablate (default: every node).
        inverse: also score each subgraph's inverse.
        batch_size: rows per forward pass.

    Returns an ``Evaluation``: metrics ``[P, S]`` and top tokens ``[P, S, k]``.
    """
    graph = NodeGraph.from_model(model)
    check_hook_points(model, graph)
    masks = torch.as_tensor(masks).bool().cpu()
    if masks.shape[-1] != len(graph):
        raise ValueError(f"Masks have {masks.shape[-1]} nodes, the model has {len(graph)}.")
    while masks.ndim < 3:
        masks = masks[None]
    batch = tokenize(model, prompts)
    if masks.shape[0] not in (1, batch.batch_size):
        raise ValueError(
            f"Masks for {masks.shape[0]} prompts, but {batch.batch_size} prompts were given."
        )
    cand = torch.ones(len(graph), dtype=torch.bool)
    if candidates is not None:
        cand = torch.zeros(len(graph), dtype=torch.bool)
        cand[list(graph.indices(candidates))] = True
    abl = resolve_ablation(ablation, model, prompts, progress=False)
    with model_untouched(model):
        with torch.no_grad():
            logp_full = forward_logprobs(model, batch, [])
        check_finite(logp_full, "the full model's output")
        objective = SubgraphObjective(model, graph, batch, logp_full, abl, cand, batch_size)
        return evaluate_masks(objective, masks, inverse)


__all__ = [
    "TOP_K",
    "Evaluation",
    "embed_candidates",
    "evaluate",
    "evaluate_draws",
    "evaluate_masks",
]
