"""What both granularities' pipelines share: loading a named model and reading the tracing
time a run folder's shards record."""

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


def shard_seconds(folder: Path) -> float:
    """Total tracing time recorded by a run's shards (all sessions of a resumed run)."""
    total = 0.0
    for timing in folder.glob("shards/*/timing.json"):
        try:
            total += float(json.loads(timing.read_text()).get("seconds", 0.0))
        except (ValueError, OSError):
            continue
    return total


__all__ = ["load_spec", "shard_seconds"]
