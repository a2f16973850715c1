"""``TokenTraceResult``: token-granularity subgraphs of every size for each prompt, compactly.

A unit is a (component, position) pair of one prompt, with id ``node * n_pos + pos`` in the
prompt's :class:`~strace_lens.edges.token_level.TokenGraph` (names ``a{l}.h{h}@{t}``,
``m{l}@{t}``). SmolLM2-135M has 300 components, so a 50-token prompt has 15 000 units and a
subgraph is stored as its unit ids, never as a dense mask. A *nested* family is one list per
prompt, its units in the order they enter (subgraph j of prompt p is ``ids[p][:counts[p,
j]]``); any other family stores each subgraph's ids. Shapes (P prompts, S sizes):

- ``grid``: the sizes as asked: ints (unit counts) or floats (relative sizes);
  ``counts``: long ``[P, S]``, the units each subgraph holds (see :mod:`.sizes`).
- ``n_pos``: long ``[P]``, each prompt's token count (it fixes the prompt's graph).
- ``ids`` / ``offsets``: int32 concatenated id lists and their boundaries, ``[P + 1]`` for a
  nested family, ``[P * S + 1]`` (prompt-major) otherwise.
- ``metrics``: name -> float ``[P, S]``: ``kl``, ``tv``, ``nucleus``, ``top1`` (1 where the
  subgraph's most probable next token is the full model's), ``inv_*`` for the inverses
  (every unit of the subgraph ablated, the others kept), ``*_std`` over random draws.
- ``entropy``: float ``[P]``; ``top_tokens``: long ``[P, S, k]`` and ``full_top_tokens``
  ``[P, k]``, the subgraph's and the full model's most probable next tokens.

Saved as ``token.safetensors`` + ``token.json`` (format tag, version, options and the
SHA-256 of the tensors file, checked on load), each written atomically, the JSON last. No
pickle.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from strace_lens.atomic import read_checked_tensors, sha256_file, write_text, written_file
from strace_lens.config import TraceConfig
from strace_lens.edges.compact import (
    family_header,
    family_tensors,
    joined_lists,
    joined_prompts,
    stored_fields,
)
from strace_lens.edges.token_level import TokenGraph

FORMAT = "strace-lens/token-trace-result"
FORMAT_VERSION = 1
TENSORS_FILE = "token.safetensors"
META_FILE = "token.json"
#: options that vary from run to run (wall time), left out of ``equals`` and summed by concat
VOLATILE_OPTIONS = ("seconds",)
#: options that count work or describe the prompts (summed or left out when joining)
PER_CALL_OPTIONS = ("search_rows", "eval_rows", "ablation")


@dataclass
class TokenTraceResult:
    """Token subgraphs of each size for each prompt, and their fidelity (module docstring)."""

    n_layers: int
    n_heads: int
    grid: tuple[int | float, ...]
    n_pos: Int[Tensor, " prompt"]
    counts: Int[Tensor, "prompt size"]
    nested: bool
    ids: Int[Tensor, " total"]
    offsets: Int[Tensor, " lists_plus_1"]
    metrics: dict[str, Float[Tensor, "prompt size"]]
    entropy: Float[Tensor, " prompt"]
    top_tokens: Int[Tensor, "prompt size k"]
    full_top_tokens: Int[Tensor, "prompt k"]
    prompts: list[str]
    options: dict[str, Any] = field(default_factory=dict)

    # -- building --------------------------------------------------------------------------
    @staticmethod
    def encode(masks: Sequence[Tensor]) -> tuple[bool, Tensor, Tensor]:
        """(nested, ids, offsets) storing one hard bool ``[S, units]`` mask family per prompt
        (sizes ascending; prompts may have different unit counts): one entry-ordered list
        per prompt when every family is nested."""
        nested = all(bool((m[:-1] & ~m[1:]).sum() == 0) for m in masks)
        lists: list[Tensor] = []
        for m in masks:
            if nested:
                # the sizes that do not hold a unit: 0 for the smallest subgraph's units
                entry = (~m).sum(0)
                inside = torch.nonzero(m[-1]).flatten()
                order = torch.argsort(entry[inside], stable=True)  # by entry, then by id
                lists.append(inside[order])
            else:
                lists += [torch.nonzero(row).flatten() for row in m]
        lengths = torch.tensor([0] + [len(x) for x in lists])
        ids = torch.cat(lists) if lists else torch.zeros(0, dtype=torch.long)
        return nested, ids.to(torch.int32), lengths.cumsum(0)

    # -- reading ---------------------------------------------------------------------------
    @property
    def n_prompts(self) -> int:
        return len(self.prompts)

    @property
    def method(self) -> str:
        return str(self.options.get("method", "mask"))

    @property
    def per(self) -> str:
        return str(self.options.get("per", "input"))

    @property
    def config(self) -> TraceConfig:
        """The trace configuration this result records (sizes: ``grid``)."""
        return TraceConfig.from_record(self.options)

    def graph(self, prompt: int) -> TokenGraph:
        return TokenGraph(self.n_layers, self.n_heads, int(self.n_pos[prompt]))

    def n_units(self, prompt: int) -> int:
        return len(self.graph(prompt))

    def relative_sizes(self) -> Float[Tensor, "prompt size"]:
        """Each subgraph's units over its prompt's total, ``n_layers*(n_heads+1)*n_pos``."""
        totals = torch.tensor([self.n_units(p) for p in range(self.n_prompts)])
        return self.counts.double() / totals[:, None]

    def subgraph(self, prompt: int, size: int) -> Int[Tensor, " k"]:
        """Unit ids (``node * n_pos + pos``) of prompt ``prompt``'s subgraph at grid index
        ``size``."""
        if self.nested:
            start = int(self.offsets[prompt])
            return self.ids[start : start + int(self.counts[prompt, size])].long()
        i = prompt * len(self.grid) + size
        return self.ids[int(self.offsets[i]) : int(self.offsets[i + 1])].long()

    def masks(self, prompt: int) -> Bool[Tensor, "size node pos"]:
        """The dense hard masks of one prompt, ``[S, node, pos]`` (as ``run_with_token_mask``
        takes them)."""
        graph = self.graph(prompt)
        out = torch.zeros(len(self.grid), len(graph), dtype=torch.bool)
        for j in range(len(self.grid)):
            out[j, self.subgraph(prompt, j)] = True
        return out.reshape(len(self.grid), len(graph.node_graph), graph.n_pos)

    def unit_names(self, prompt: int, size: int) -> list[str]:
        """Names (``a{l}.h{h}@{t}``, ``m{l}@{t}``) of the units of one subgraph."""
        names = self.graph(prompt).names()
        return [names[i] for i in sorted(self.subgraph(prompt, size).tolist())]

    def node_masks(self, prompt: int) -> Bool[Tensor, "size node"]:
        """The projection to node level: the heads and MLPs each subgraph uses at any
        position."""
        return self.masks(prompt).any(-1)

    def components(self, prompt: int, size: int) -> list[str]:
        """Names of the heads and MLPs one subgraph uses at any position."""
        node_graph = self.graph(prompt).node_graph
        used = self.node_masks(prompt)[size]
        return [node_graph.names[i] for i in torch.nonzero(used).flatten().tolist()]

    def mean_curve(self) -> dict[str, list[float]]:
        """Mean of each metric over prompts, per size."""
        return {k: v.double().mean(0).tolist() for k, v in self.metrics.items()}

    # -- joining ---------------------------------------------------------------------------
    @staticmethod
    def concat(results: Sequence[TokenTraceResult]) -> TokenTraceResult:
        """Join per-input results over disjoint prompt lists (same model shape, grid, family
        and options), prompts in the order given."""
        if not results:
            raise ValueError("Nothing to concatenate: give at least one TokenTraceResult.")
        first = results[0]
        for i, r in enumerate(results[1:], start=1):
            same = (r.n_layers, r.n_heads, r.grid, r.per) == (
                first.n_layers, first.n_heads, first.grid, first.per
            )  # fmt: skip
            if not same or _shared(r.options) != _shared(first.options) or r.per == "dataset":
                raise ValueError(
                    f"Result {i} was traced with another model shape, grid, method or options "
                    "than result 0 (or per='dataset', whose one subgraph cannot be joined): "
                    "only per-input results of one configuration can be joined."
                )
        if any(r.nested != first.nested for r in results):
            parts = [r._as_lists() for r in results]  # re-encode all as per-size lists
            ids = torch.cat([p[0] for p in parts])
            lengths = torch.cat([p[1] for p in parts])
            offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
            nested = False
        else:
            (ids, offsets), nested = joined_lists(results), first.nested
        options = dict(first.options)
        for key in ("seconds", "search_rows", "eval_rows"):
            if key in options:
                options[key] = sum(r.options.get(key, 0) for r in results)
        return TokenTraceResult(
            n_layers=first.n_layers,
            n_heads=first.n_heads,
            grid=first.grid,
            nested=nested,
            ids=ids.to(torch.int32),
            offsets=offsets,
            options=options,
            **joined_prompts(results),
        )

    def _as_lists(self) -> tuple[Tensor, Tensor]:
        """(ids, lengths) of every (prompt, size) subgraph as its own list."""
        lists = [self.subgraph(p, j) for p in range(self.n_prompts) for j in range(len(self.grid))]
        return torch.cat(lists).to(torch.int32), torch.tensor([len(x) for x in lists])

    def equals(self, other: TokenTraceResult) -> bool:
        """Exact equality of every tensor, prompt and option (wall times aside)."""
        a, b = family_tensors(self), family_tensors(other)
        return (
            a.keys() == b.keys()
            and all(torch.equal(a[k], b[k]) for k in a)
            and self._header(with_hash=False) == other._header(with_hash=False)
        )

    # -- saving ----------------------------------------------------------------------------
    def _header(self, with_hash: bool = True) -> dict[str, Any]:
        options = self.options if with_hash else _stable(self.options)
        return family_header(self, FORMAT, FORMAT_VERSION, options)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``token.safetensors`` + ``token.json`` into folder ``path``, atomically.

        The JSON, renamed into place last, records the SHA-256 of the tensors file, so a
        reader never trusts a pair that did not finish writing together.
        """
        from safetensors.torch import save_file

        folder = Path(path)
        with written_file(folder / TENSORS_FILE) as tmp:
            save_file(family_tensors(self), str(tmp))
            digest = sha256_file(tmp)
        meta = {**self._header(), "tensors_sha256": digest}
        write_text(folder / META_FILE, json.dumps(meta, indent=1, default=str))
        return folder

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TokenTraceResult:
        folder = Path(path)
        meta, t = read_checked_tensors(
            folder, META_FILE, TENSORS_FILE, FORMAT, FORMAT_VERSION, "TokenTraceResult"
        )
        return cls(grid=tuple(meta["grid"]), **stored_fields(meta, t))


def _shared(options: dict[str, Any]) -> dict[str, Any]:
    """What every part of one configuration shares: the options without the work counts and
    the ablation's description of its own reference prompts (its name is kept)."""
    kept = {k: v for k, v in _stable(options).items() if k not in PER_CALL_OPTIONS}
    ablation = options.get("ablation")
    kept["ablation"] = ablation.get("name") if isinstance(ablation, dict) else ablation
    return kept


def _stable(options: dict[str, Any]) -> dict[str, Any]:
    """The options without the wall time (two runs of one trace are equal)."""
    return {k: v for k, v in options.items() if k not in VOLATILE_OPTIONS}


__all__ = ["META_FILE", "TENSORS_FILE", "TokenTraceResult"]
