"""What both granularities' pipelines share: loading a named model and reading the tracing
time a run folder's shards record (summed for the report, per shard for ``shards.csv``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def load_spec(name: str, device: str | None) -> Any:
    """An embedded model, a local folder, or ``native:tiny`` (the seeded test model)."""
    from strace_lens.models import load_model
    from strace_lens.tiny_model import TINY_MODEL_NAMES, tiny_model

    if name in TINY_MODEL_NAMES:
        return tiny_model(device=device)
    return load_model(name, device=device)


def shard_table(folders: dict[str, Path]) -> Any:
    """One row per finished shard of each named run folder: ``run``, ``shard`` (its index),
    ``seconds`` and ``torch_threads`` as its ``timing.json`` records them (every session of a
    resumed run: a shard is traced once). The report's "the shards record" sums are its
    per-run totals; the table keeps what a sum hides (a shard slowed by other jobs)."""
    import pandas as pd

    rows = []
    for run, folder in folders.items():
        for timing in sorted(folder.glob("shards/*/timing.json")):
            if not timing.parent.name.isdigit():  # a shard being written, not yet renamed
                continue
            try:
                record = json.loads(timing.read_text())
                seconds = float(record.get("seconds", 0.0))
            except (ValueError, OSError):
                continue
            threads = record.get("torch_threads")
            rows.append(
                {
                    "run": run,
                    "shard": int(timing.parent.name),
                    "seconds": seconds,
                    "torch_threads": int(threads) if isinstance(threads, int) else None,
                }
            )
    frame = pd.DataFrame(rows, columns=["run", "shard", "seconds", "torch_threads"])
    # shards traced before timing.json recorded the thread count leave it empty, not 1.0
    return frame.astype({"torch_threads": "Int64"})


def shard_seconds(shards: Any, run: str) -> float:
    """Total tracing time a :func:`shard_table` records for ``run`` (all sessions of a
    resumed run): the report's "the shards record" figure."""
    return float(shards.loc[shards["run"] == run, "seconds"].sum())


__all__ = ["load_spec", "shard_seconds", "shard_table"]
