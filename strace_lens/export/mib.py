"""A MIB circuit-localization submission folder from a :class:`TraceResult`.

MIB (Mueller et al. 2025, the Mechanistic Interpretability Benchmark) takes, per task and
model, a folder named ``{task}_{model}`` (task with dashes: ``ioi_gpt2``,
``arithmetic-addition_qwen2.5``) holding either one file of importance scores or one binary
circuit per edge budget: a circuit with at most 0.1 %, 0.2 %, 0.5 %, 1 %, 2 %, 5 %, 10 %, 20 %
and 50 % of the model's edges. s-Trace traces node circuits of chosen sizes, so
:func:`to_mib` writes the second kind: for each budget, the largest traced size whose
EAP-IG expansion (every edge between kept nodes) fits, as an EAP-IG graph JSON
(:mod:`strace_lens.export.eap_ig`). A budget that even the smallest traced size exceeds gets
the empty circuit (only ``input -> logits``): trace smaller sizes to fill it.

MIB's README fixes the folder's name and the budgets, not the circuit files' names; they are
written as ``circuit_{percent}.json`` (``circuit_0.1.json`` ... ``circuit_50.json``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from strace_lens.export.eap_ig import (
    _cfg,
    _row,
    count_edges,
    graph_json,
    node_scores,
    write_json,
)
from strace_lens.result import TraceResult

#: MIB's edge budgets, in percent of the model's edges (one circuit per budget)
MIB_PERCENTAGES: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0)
#: MIB's circuit-track tasks (folder names use dashes for underscores)
MIB_TASKS: tuple[str, ...] = (
    "ioi",
    "mcqa",
    "arithmetic_addition",
    "arithmetic_subtraction",
    "arc_easy",
    "arc_challenge",
)
#: MIB's models: name -> (n_layers, n_heads, d_model); none runs attention and MLP in
#: parallel. gpt2 = GPT-2 Small, qwen2.5 = Qwen-2.5 0.5B, gemma2 = Gemma-2 2B,
#: llama3 = Llama-3.1 8B, interpbench = the IOI model with a known circuit.
MIB_MODELS: dict[str, tuple[int, int, int]] = {
    "gpt2": (12, 12, 768),
    "qwen2.5": (24, 14, 896),
    "gemma2": (26, 8, 2304),
    "llama3": (32, 32, 4096),
    "interpbench": (6, 4, 64),
}


def _percent_name(percent: float) -> str:
    return f"{percent:g}"


def to_mib(
    result: TraceResult,
    folder: str | os.PathLike[str],
    task: str,
    model: str,
    *,
    prompt: int | None = None,
    check_model: bool = True,
) -> dict[str, Any]:
    """Write ``folder/{task}_{model}/circuit_{percent}.json``, one circuit per MIB edge budget.

    Args:
        result: a per-dataset result traced on the MIB model named ``model`` (or a per-input
            one with ``prompt=``). Its sizes decide which circuits exist: trace a grid fine
            enough at the small end (MIB's smallest budget, 0.1 % of GPT-2's 32,491 edges, is
            32 edges, a couple of nodes).
        folder: the submission root (created); one ``{task}_{model}`` folder is written in it.
        task: a MIB task (``MIB_TASKS``; dashes or underscores).
        model: a MIB model name (``MIB_MODELS``).
        prompt: for a per-input result, whose subgraphs to export.
        check_model: refuse a result whose graph is not that model's (layers x heads).

    Returns:
        A summary: the folder, the model's edge count and, per budget, the file, the traced
        size used (None for the empty circuit), its nodes and its edge count.
    """
    key = task.replace("-", "_")
    if key not in MIB_TASKS:
        raise ValueError(f"Unknown MIB task {task!r}: use one of {', '.join(MIB_TASKS)}.")
    if model not in MIB_MODELS:
        raise ValueError(f"Unknown MIB model {model!r}: use one of {', '.join(MIB_MODELS)}.")
    n_layers, n_heads, d_model = MIB_MODELS[model]
    graph = result.graph
    if check_model and (graph.n_layers, graph.n_heads) != (n_layers, n_heads):
        raise ValueError(
            f"MIB's {model} has {n_layers} layers x {n_heads} heads, but this result was traced "
            f"on {graph.n_layers} x {graph.n_heads}: trace that model (or pass "
            "check_model=False for a test)."
        )
    row = _row(result, prompt)
    cfg = _cfg(result, d_model if check_model else None, False)
    total = count_edges(cfg["n_layers"], cfg["n_heads"], cfg["parallel_attn_mlp"])
    scores = node_scores(result, row)
    # edges of each traced size's expansion, smallest size first
    by_size = []
    for j in sorted(range(len(result.sizes)), key=lambda j: int(result.sizes[j])):
        kept = graph.nodes_from_mask(result.masks[row, j])
        data = graph_json(graph, cfg, kept, scores)
        n_in = sum(1 for e in data["edges"].values() if e["in_graph"])
        by_size.append((int(result.sizes[j]), kept, n_in, data))
    out = Path(folder) / f"{key.replace('_', '-')}_{model}"
    out.mkdir(parents=True, exist_ok=True)
    circuits = []
    for percent in MIB_PERCENTAGES:
        budget = int(percent / 100 * total)
        fitting = [entry for entry in by_size if entry[2] <= budget]
        if fitting:
            size, kept, n_in, data = max(fitting, key=lambda entry: entry[2])
        else:
            size, kept = None, []
            data = graph_json(graph, cfg, kept, scores)
            n_in = sum(1 for e in data["edges"].values() if e["in_graph"])
        data = {
            **data,
            "strace_lens": {
                "mib_percent": percent,
                "edge_budget": budget,
                "size": size,
                "nodes": kept,
                "edges_in_graph": n_in,
                "method": result.method,
                "per": result.per,
            },
        }
        path = write_json(data, out / f"circuit_{_percent_name(percent)}.json")
        circuits.append(
            {"percent": percent, "file": path.name, "size": size, "nodes": kept, "edges": n_in}
        )
    return {"folder": out, "task": key, "model": model, "n_edges": total, "circuits": circuits}


__all__ = ["MIB_MODELS", "MIB_PERCENTAGES", "MIB_TASKS", "to_mib"]
