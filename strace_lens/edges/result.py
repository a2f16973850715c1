"""``EdgeTraceResult``: edge subgraphs of every size for each prompt, stored compactly.

SmolLM2-135M has about 0.3 M edges per 50-token prompt, so subgraphs are never stored as
masks. A *nested* family (the greedy) is one ranked list of compact edge ids per prompt plus
the edge count of each size: subgraph i of prompt p is ``ranking[p][:counts[p, i]]``. A
non-nested family (random draws) stores each subgraph's ids. Shapes (P prompts, S sizes):

- ``grid``: the relative sizes s; ``counts``: long ``[P, S]``, ``int(s * E_p)``.
- ``n_pos``: long ``[P]``, each prompt's token count (it fixes the prompt's graph).
- ``ids`` / ``offsets``: int32 concatenated id lists and their boundaries, ``[P + 1]`` for a
  nested family, ``[P * S + 1]`` (prompt-major) otherwise.
- ``metrics``: name -> float ``[P, S]``: ``tv``, ``kl``, ``nucleus``, ``top1`` (1 where the
  subgraph's most probable next token is the full model's).
- ``entropy``: float ``[P]``; ``top_tokens``: long ``[P, S]`` and ``full_top_tokens``
  ``[P]``, the subgraph's and the full model's most probable next token.

Saved as ``edges.safetensors`` + ``edges.json`` (format tag, version, options, and the
SHA-256 of the tensors file, checked on load), written into a temporary folder renamed into
place. No pickle.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from strace_lens.atomic import read_checked_tensors, replaced_folder, sha256_file
from strace_lens.edges.compact import (
    family_header,
    family_tensors,
    joined_lists,
    joined_prompts,
    stored_fields,
)
from strace_lens.edges.components import EdgeComponents, project
from strace_lens.edges.graph import EdgeGraph

FORMAT = "strace-lens/edge-trace-result"
FORMAT_VERSION = 1
TENSORS_FILE = "edges.safetensors"
META_FILE = "edges.json"
#: options recorded once per prompt (joined by ``concat``), and the wall time (summed)
PER_PROMPT_OPTIONS = ("mask_fits",)


@dataclass
class EdgeTraceResult:
    """Edge subgraphs of each size for each prompt, and their fidelity (see module docstring)."""

    n_layers: int
    n_heads: int
    grid: tuple[float, ...]
    n_pos: Int[Tensor, " prompt"]
    counts: Int[Tensor, "prompt size"]
    nested: bool
    ids: Int[Tensor, " total"]
    offsets: Int[Tensor, " lists_plus_1"]
    metrics: dict[str, Float[Tensor, "prompt size"]]
    entropy: Float[Tensor, " prompt"]
    top_tokens: Int[Tensor, "prompt size"]
    full_top_tokens: Int[Tensor, " prompt"]
    prompts: list[str]
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def n_prompts(self) -> int:
        return len(self.prompts)

    def graph(self, prompt: int) -> EdgeGraph:
        return EdgeGraph(self.n_layers, self.n_heads, int(self.n_pos[prompt]))

    def n_edges(self, prompt: int) -> int:
        return self.graph(prompt).n_edges

    def relative_sizes(self) -> Float[Tensor, "prompt size"]:
        """Sizes over each prompt's total E (what the paper plots; int() rounds them down)."""
        totals = torch.tensor([self.n_edges(p) for p in range(self.n_prompts)])
        return self.counts.double() / totals[:, None]

    def subgraph(self, prompt: int, size: int) -> Int[Tensor, " k"]:
        """Compact edge ids of prompt ``prompt``'s subgraph number ``size`` (grid index)."""
        k = int(self.counts[prompt, size])
        if self.nested:
            start = int(self.offsets[prompt])
            return self.ids[start : start + k].long()
        i = prompt * len(self.grid) + size
        return self.ids[int(self.offsets[i]) : int(self.offsets[i + 1])].long()

    def edge_names(self, prompt: int, size: int) -> list[str]:
        return self.graph(prompt).names(self.subgraph(prompt, size))

    def components(self, prompt: int, size: int) -> EdgeComponents:
        """Which heads and MLPs the subgraph uses, and at which positions."""
        return project(self.graph(prompt), self.subgraph(prompt, size))

    def mean_curve(self) -> dict[str, list[float]]:
        """Mean of each metric over prompts, per size."""
        return {k: v.double().mean(0).tolist() for k, v in self.metrics.items()}

    @staticmethod
    def concat(results: Sequence[EdgeTraceResult]) -> EdgeTraceResult:
        """Join results over disjoint prompt lists (same model shape, grid, family and
        options), prompts in the order given: what one call on all the prompts records."""
        if not results:
            raise ValueError("Nothing to concatenate: give at least one EdgeTraceResult.")
        first = results[0]
        for i, r in enumerate(results[1:], start=1):
            same = (r.n_layers, r.n_heads, r.grid, r.nested) == (
                first.n_layers, first.n_heads, first.grid, first.nested
            )  # fmt: skip
            if not same or _shared_options(r.options) != _shared_options(first.options):
                raise ValueError(
                    f"Result {i} was traced with another model shape, grid, method or options "
                    "than result 0: only results of one configuration can be joined."
                )
        ids, offsets = joined_lists(results)
        options = dict(first.options)
        for key in PER_PROMPT_OPTIONS:
            if key in options:
                options[key] = [x for r in results for x in r.options[key]]
        if "seconds" in options:
            options["seconds"] = sum(float(r.options.get("seconds", 0.0)) for r in results)
        return EdgeTraceResult(
            n_layers=first.n_layers,
            n_heads=first.n_heads,
            grid=first.grid,
            nested=first.nested,
            ids=ids,
            offsets=offsets,
            options=options,
            **joined_prompts(results),
        )

    # -- saving --------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the folder ``path`` (replacing it) with the tensors and their JSON header."""
        from safetensors.torch import save_file

        folder = Path(path)
        with replaced_folder(folder, prefix=f".{folder.name}-") as tmp:
            save_file(family_tensors(self), str(tmp / TENSORS_FILE))
            meta = {
                **family_header(self, FORMAT, FORMAT_VERSION, self.options),
                "tensors_sha256": sha256_file(tmp / TENSORS_FILE),
            }
            text = json.dumps(meta, indent=1, default=str)
            (tmp / META_FILE).write_text(text, encoding="utf-8")
        return folder

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> EdgeTraceResult:
        folder = Path(path)
        meta, t = read_checked_tensors(
            folder, META_FILE, TENSORS_FILE, FORMAT, FORMAT_VERSION, "EdgeTraceResult"
        )
        return cls(grid=tuple(float(s) for s in meta["grid"]), **stored_fields(meta, t))


def _shared_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options every prompt of one configuration shares (wall time and per-prompt
    records aside)."""
    return {k: v for k, v in options.items() if k not in ("seconds", *PER_PROMPT_OPTIONS)}
