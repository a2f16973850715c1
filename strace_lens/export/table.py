"""A :class:`TraceResult` as one long table: one row per prompt x size x node.

Columns (``TABLE_COLUMNS``): ``prompt`` (index into ``result.prompts``), ``size``,
``relative_size``, ``node`` (``a3.h1``, ``m5``), ``layer``, ``kind`` (``attn``/``mlp``),
``head`` (empty for an MLP), ``candidate`` (False: always kept, outside the search),
``in_subgraph``, ``entry_size`` (the smallest traced size from which the node stays in this
prompt's subgraph, NaN if none), then the (prompt, size) metrics (``kl``, ``tv``,
``nucleus``, ``inv_*``, ...). A per-dataset result repeats its shared subgraph for each
prompt. Join with ``result.to_frame()`` on ``prompt`` for the prompt texts.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from strace_lens.atomic import written_file
from strace_lens.result import TraceResult

TABLE_COLUMNS = (
    "prompt",
    "size",
    "relative_size",
    "node",
    "layer",
    "kind",
    "head",
    "candidate",
    "in_subgraph",
    "entry_size",
)
ARROW_SUFFIXES = (".arrow", ".feather")


def to_table(result: TraceResult) -> Any:
    """One row per (prompt, size, node), as a pandas DataFrame (see the module docstring)."""
    import pandas as pd

    graph = result.graph
    n_p, n_s, n_n = result.n_prompts, len(result.sizes), len(graph)
    masks = result.prompt_masks()  # [P, S, N]
    entry = result.entry_sizes()  # [R, N]
    entry = entry.expand(n_p, -1) if entry.shape[0] == 1 else entry
    prompt = torch.arange(n_p).repeat_interleave(n_s * n_n)
    size_index = torch.arange(n_s).repeat_interleave(n_n).repeat(n_p)
    node_index = torch.arange(n_n).repeat(n_p * n_s)
    heads = [node.head for node in graph.nodes]
    data: dict[str, Any] = {
        "prompt": prompt.numpy(),
        "size": result.sizes[size_index].numpy(),
        "relative_size": result.relative_sizes[size_index].numpy(),
        "node": pd.Categorical.from_codes(node_index.numpy(), categories=pd.Index(graph.names)),
        "layer": graph.layers[node_index].numpy(),
        "kind": pd.Categorical.from_codes(
            (~graph.is_attn[node_index]).long().numpy(), categories=pd.Index(["attn", "mlp"])
        ),
        "head": pd.array([heads[i] for i in node_index.tolist()], dtype="Int64"),
        "candidate": result.candidates[node_index].numpy(),
        "in_subgraph": masks.reshape(-1).numpy(),
        "entry_size": entry[prompt, node_index].double().numpy(),
    }
    for name, values in result.metrics.items():
        data[name] = values.double()[prompt, size_index].numpy()
    return pd.DataFrame(data)


def _has_pyarrow() -> bool:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


def save_table(table: TraceResult | Any, path: str | os.PathLike[str]) -> Path:
    """Write :func:`to_table` (of a result, or a table already made) and return the file.

    The suffix chooses the format: ``.parquet`` (or no suffix) writes Parquet and
    ``.arrow``/``.feather`` the Arrow IPC file, both through ``pyarrow``; ``.csv`` writes CSV.
    Without ``pyarrow`` installed, Parquet and Arrow fall back to CSV next to the requested
    name (``.csv`` suffix) with a warning saying so. The returned path is the file written.
    """
    frame = to_table(table) if isinstance(table, TraceResult) else table
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == "":
        path, suffix = path.with_suffix(".parquet"), ".parquet"
    if suffix not in (".parquet", ".csv", *ARROW_SUFFIXES):
        raise ValueError(
            f"Unknown table format {path.suffix!r}: use .parquet, .arrow/.feather or .csv."
        )
    if suffix != ".csv" and not _has_pyarrow():
        csv = path.with_suffix(".csv")
        warnings.warn(
            f"pyarrow is not installed, so {path.name} cannot be written as {suffix[1:]}: "
            f"writing CSV to {csv} instead (`pip install pyarrow` for Parquet/Arrow).",
            stacklevel=2,
        )
        path, suffix = csv, ".csv"
    with written_file(path) as tmp:  # never through a planted link
        if suffix == ".parquet":
            frame.to_parquet(tmp, index=False)
        elif suffix in ARROW_SUFFIXES:
            frame.to_feather(tmp)
        else:
            frame.to_csv(tmp, index=False)
    return path


__all__ = ["TABLE_COLUMNS", "save_table", "to_table"]
