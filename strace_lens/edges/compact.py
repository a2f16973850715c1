"""What the two compactly stored subgraph families share: ``EdgeTraceResult`` (edges) and
``TokenTraceResult`` (units of a component at a position).

Both hold, per prompt, a family of subgraphs as concatenated int32 id lists with their
boundaries (one list per prompt for a nested family, one per (prompt, size) otherwise), and
the same per-prompt tensors and JSON header. Saved, read and joined here the same way; what
differs (which options two parts must share to be joined, a family's own checks, how the
folder is replaced) stays with each result.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class CompactFamily(Protocol):
    """The fields both results have (annotations: see each result's module docstring)."""

    n_layers: int
    n_heads: int
    grid: tuple[Any, ...]
    n_pos: Tensor
    counts: Tensor
    nested: bool
    ids: Tensor
    offsets: Tensor
    metrics: dict[str, Tensor]
    entropy: Tensor
    top_tokens: Tensor
    full_top_tokens: Tensor
    prompts: list[str]
    options: dict[str, Any]


def family_tensors(result: CompactFamily) -> dict[str, Tensor]:
    """The tensors file's contents: fixed dtypes, on the CPU, contiguous."""
    out = {
        "n_pos": result.n_pos.long(),
        "counts": result.counts.long(),
        "ids": result.ids.to(torch.int32),
        "offsets": result.offsets.long(),
        "entropy": result.entropy.float(),
        "top_tokens": result.top_tokens.long(),
        "full_top_tokens": result.full_top_tokens.long(),
    }
    out.update({f"metric.{k}": v.float() for k, v in result.metrics.items()})
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def family_header(
    result: CompactFamily, fmt: str, version: int, options: dict[str, Any]
) -> dict[str, Any]:
    """The JSON header (without the tensors' checksum), recording ``options``."""
    return {
        "format": fmt,
        "version": version,
        "n_layers": result.n_layers,
        "n_heads": result.n_heads,
        "grid": list(result.grid),
        "nested": result.nested,
        "prompts": result.prompts,
        "options": options,
    }


def stored_fields(meta: dict[str, Any], tensors: dict[str, Tensor]) -> dict[str, Any]:
    """Every field but ``grid`` (each result reads its own) from a checked header and its
    tensors (:func:`strace_lens.atomic.read_checked_tensors`)."""
    return dict(
        n_layers=int(meta["n_layers"]),
        n_heads=int(meta["n_heads"]),
        n_pos=tensors["n_pos"],
        counts=tensors["counts"],
        nested=bool(meta["nested"]),
        ids=tensors["ids"],
        offsets=tensors["offsets"],
        metrics={k[len("metric.") :]: v for k, v in tensors.items() if k.startswith("metric.")},
        entropy=tensors["entropy"],
        top_tokens=tensors["top_tokens"],
        full_top_tokens=tensors["full_top_tokens"],
        prompts=list(meta["prompts"]),
        options=dict(meta.get("options", {})),
    )


def joined_lists(results: Sequence[CompactFamily]) -> tuple[Tensor, Tensor]:
    """(ids, offsets) of the results' id lists one after the other (same list layout)."""
    ids, offsets, start = [], [torch.zeros(1, dtype=torch.long)], 0
    for r in results:
        ids.append(r.ids.to(torch.int32))
        offsets.append(r.offsets[1:].long() + start)
        start += int(r.offsets[-1])
    return torch.cat(ids), torch.cat(offsets)


def joined_prompts(results: Sequence[CompactFamily]) -> dict[str, Any]:
    """The per-prompt fields of the results, prompts in the order given."""
    first = results[0]
    return dict(
        n_pos=torch.cat([r.n_pos for r in results]),
        counts=torch.cat([r.counts for r in results]),
        metrics={k: torch.cat([r.metrics[k] for r in results]) for k in first.metrics},
        entropy=torch.cat([r.entropy for r in results]),
        top_tokens=torch.cat([r.top_tokens for r in results]),
        full_top_tokens=torch.cat([r.full_top_tokens for r in results]),
        prompts=[p for r in results for p in r.prompts],
    )


__all__ = [
    "CompactFamily",
    "family_header",
    "family_tensors",
    "joined_lists",
    "joined_prompts",
    "stored_fields",
]
