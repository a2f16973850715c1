"""``TraceResult``: the subgraphs an s-Trace found, their fidelity, and how to save them.

Shapes (P prompts, S sizes, N nodes, R = P for per-input masks or 1 for per-dataset ones):

- ``masks``: bool ``[R, S, N]``, each ``masks[r, j]`` holds exactly ``sizes[j]`` of the
  candidate nodes plus every node outside the candidates (those are always kept).
- ``metrics``: name -> float ``[P, S]``: ``kl``, ``tv``, ``nucleus`` for the subgraph, and
  ``inv_kl``, ``inv_tv``, ``inv_nucleus`` for its inverse (the complement among the
  candidates: every candidate in the subgraph ablated, every other candidate kept). Methods
  with several draws (``"random"``) add ``kl_std`` etc.
- ``entropy``: float ``[P]``, the full model's next-token entropy (nats).
- ``top_tokens``: long ``[P, S, k]`` the subgraph's k most probable next tokens;
  ``full_top_tokens``: long ``[P, k]`` the full model's.
- ``target_logprob``: float ``[P]`` (optional) the full model's log-prob of the true next token.

Relative size = ``sizes / n_candidates``. The entry size of a node is the smallest grid size
from which the node belongs to every larger subgraph of the family (for nested families this
is simply the smallest subgraph containing it); nodes never in the largest subgraph have none.
"""

from __future__ import annotations

import importlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from strace_lens.atomic import read_checked_tensors, sha256_file, write_text, written_file
from strace_lens.config import TraceConfig
from strace_lens.graph import NodeGraph

FORMAT = "strace-lens/trace-result"
FORMAT_VERSION = 1
TENSORS_FILE = "result.safetensors"
META_FILE = "result.json"

#: options a trace records that vary from run to run (its wall time)
VOLATILE_OPTIONS = ("seconds",)


@dataclass
class TraceResult:
    """Subgraphs of every requested size, for each prompt (or shared), and their fidelity."""

    graph: NodeGraph
    sizes: Int[Tensor, " size"]
    masks: Bool[Tensor, "row size node"]
    metrics: dict[str, Float[Tensor, "prompt size"]]
    entropy: Float[Tensor, " prompt"]
    prompts: list[str]
    top_tokens: Int[Tensor, "prompt size k"]
    full_top_tokens: Int[Tensor, "prompt k"]
    candidates: Bool[Tensor, " node"]
    options: dict[str, Any] = field(default_factory=dict)
    target_logprob: Float[Tensor, " prompt"] | None = None

    # -- shape facts ---------------------------------------------------------------------
    @property
    def per(self) -> str:
        return (
            "dataset"
            if self.masks.shape[0] == 1 and len(self.prompts) != 1
            else str(self.options.get("per", "input"))
        )

    @property
    def config(self) -> TraceConfig:
        """The trace configuration this result records (sizes, keep and candidates are read
        off the result itself)."""
        return TraceConfig.from_record(self.options)

    @property
    def method(self) -> str:
        return str(self.options.get("method", "mask"))

    @property
    def n_prompts(self) -> int:
        return len(self.prompts)

    @property
    def n_candidates(self) -> int:
        return int(self.candidates.sum())

    @property
    def relative_sizes(self) -> Float[Tensor, " size"]:
        return self.sizes.double() / max(self.n_candidates, 1)

    def prompt_masks(self) -> Bool[Tensor, "prompt size node"]:
        """Masks for every prompt (a per-dataset mask repeated for each prompt)."""
        if self.masks.shape[0] == self.n_prompts:
            return self.masks
        return self.masks.expand(self.n_prompts, -1, -1)

    def size_order(self) -> Int[Tensor, " size"]:
        """The permutation that sorts the size grid increasingly."""
        return torch.argsort(self.sizes)

    @property
    def is_nested(self) -> bool:
        """True when each subgraph contains every smaller one, for every row."""
        order = self.size_order()
        m = self.masks[:, order]
        return bool((m[:, :-1] & ~m[:, 1:]).sum() == 0)

    def entry_sizes(self) -> Float[Tensor, "row node"]:
        """Per row and node: the smallest grid size from which the node stays in the subgraph.

        NaN for nodes outside the candidates (always kept) and for nodes that are not in the
        largest subgraph.
        """
        order = self.size_order()
        sizes = self.sizes[order].double()
        m = self.masks[:, order]  # [R, S, N]
        # in_from_here[j] = node is in every subgraph of size index >= j
        in_from_here = m.flip(1).long().cumprod(1).flip(1).bool()
        first = torch.where(in_from_here.any(1), in_from_here.long().argmax(1), -1)
        out = torch.where(first >= 0, sizes[first.clamp(min=0)], torch.nan)
        out[:, ~self.candidates] = torch.nan
        return out

    def nodes(self, prompt: int = 0, size: int | None = None) -> list[str]:
        """Names of the nodes in the subgraph of ``size`` (default: the smallest) for a prompt.

        A size that was not traced is replaced by the nearest traced one (in node count; a
        tie goes to the smaller), with a warning that names both: a subgraph of another size
        was never searched for, so none is made up.
        """
        j = 0 if size is None else self.nearest_size_index(size)
        row = 0 if self.masks.shape[0] == 1 else prompt
        return self.graph.nodes_from_mask(self.masks[row, j])

    def nearest_size_index(self, size: int) -> int:
        """The grid index of ``size``, or of the nearest traced size (with a warning)."""
        if int(size) in self.sizes.tolist():
            return self.size_index(size)
        if int(size) < 1:
            raise ValueError(f"size must be a node count of at least 1, got {size}.")
        gaps = (self.sizes - int(size)).abs()
        tied = torch.nonzero(gaps == gaps.min()).flatten()
        j = int(tied[self.sizes[tied].argmin()])  # a tie goes to the smaller size
        warnings.warn(
            f"Size {size} was not traced; using the nearest traced size, {int(self.sizes[j])} "
            f"(traced sizes: {self.sizes.tolist()}).",
            UserWarning,
            stacklevel=3,
        )
        return j

    def size_index(self, size: int) -> int:
        hits = torch.nonzero(self.sizes == int(size)).flatten()
        if len(hits) == 0:
            raise KeyError(f"Size {size} is not in this result's sizes {self.sizes.tolist()}.")
        return int(hits[0])

    # -- tables ----------------------------------------------------------------------------
    def to_frame(self) -> Any:
        """One row per (prompt, size): sizes, metrics, entropy (a pandas DataFrame)."""
        import pandas as pd

        n_p, n_s = self.n_prompts, len(self.sizes)
        data: dict[str, Any] = {
            "prompt": torch.arange(n_p).repeat_interleave(n_s).numpy(),
            "size": self.sizes.repeat(n_p).numpy(),
            "relative_size": self.relative_sizes.repeat(n_p).numpy(),
        }
        for name, values in self.metrics.items():
            data[name] = values.reshape(-1).double().numpy()
        data["entropy"] = self.entropy.repeat_interleave(n_s).double().numpy()
        if self.target_logprob is not None:
            data["target_logprob"] = self.target_logprob.repeat_interleave(n_s).double().numpy()
        frame = pd.DataFrame(data)
        frame.insert(1, "text", [self.prompts[i] for i in frame["prompt"]])
        frame["method"] = self.method
        frame["per"] = self.per
        return frame

    # -- persistence -----------------------------------------------------------------------
    def _tensors(self) -> dict[str, Tensor]:
        out = {
            "sizes": self.sizes.long(),
            "masks": self.masks.to(torch.uint8),
            "entropy": self.entropy.float(),
            "top_tokens": self.top_tokens.long(),
            "full_top_tokens": self.full_top_tokens.long(),
            "candidates": self.candidates.to(torch.uint8),
        }
        for name, values in self.metrics.items():
            out[f"metric.{name}"] = values.float()
        if self.target_logprob is not None:
            out["target_logprob"] = self.target_logprob.float()
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``result.safetensors`` + ``result.json`` into folder ``path``, atomically.

        Both files are first written under temporary names and then renamed; the JSON, renamed
        last, records the SHA-256 of the tensors file, so a reader never trusts a pair that
        did not finish writing together.
        """
        from safetensors.torch import save_file

        folder = Path(path)
        with written_file(folder / TENSORS_FILE) as tensors_tmp:
            save_file(self._tensors(), str(tensors_tmp))
            digest = sha256_file(tensors_tmp)
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "graph": self.graph.to_dict(),
            "prompts": self.prompts,
            "options": self.options,
            "tensors_sha256": digest,
        }
        # Written last: until it names the new tensors' checksum, a reader refuses the pair.
        write_text(folder / META_FILE, json.dumps(meta, indent=1, default=str))
        return folder

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TraceResult:
        """Read a result folder written by :meth:`save`.

        A ``trace_dataset`` run folder is read with ``strace_lens.load(path)``; passing one
        here still works (it is handed over, with a DeprecationWarning).
        """
        folder = Path(path)
        if (folder / "manifest.json").exists() and not (folder / META_FILE).exists():
            warnings.warn(
                f"{folder} is a dataset run folder: read it with strace_lens.load(path); "
                "TraceResult.load reads single results.",
                DeprecationWarning,
                stacklevel=2,
            )
            # by name, at run time: the result container does not depend on the layer above
            loading = importlib.import_module("strace_lens.loading")
            run = loading.load(folder)
            if not isinstance(run, TraceResult):
                raise ValueError(
                    f"{folder} is a dataset run at edge granularity: read it with "
                    "strace_lens.load(path), which returns an EdgeTraceResult."
                )
            return run
        meta, tensors = read_checked_tensors(
            folder, META_FILE, TENSORS_FILE, FORMAT, FORMAT_VERSION, "TraceResult"
        )
        metrics = {k[len("metric.") :]: v for k, v in tensors.items() if k.startswith("metric.")}
        return cls(
            graph=NodeGraph(**meta["graph"]),
            sizes=tensors["sizes"],
            masks=tensors["masks"].bool(),
            metrics=metrics,
            entropy=tensors["entropy"],
            prompts=list(meta["prompts"]),
            top_tokens=tensors["top_tokens"],
            full_top_tokens=tensors["full_top_tokens"],
            candidates=tensors["candidates"].bool(),
            options=meta.get("options", {}),
            target_logprob=tensors.get("target_logprob"),
        )

    def check_model(self, model: Any) -> None:
        """Raise if this result was traced on a model with a different node graph."""
        graph = NodeGraph.from_model(model)
        if graph != self.graph:
            raise ValueError(
                f"This result was traced on a model with {self.graph.n_layers} layers x "
                f"{self.graph.n_heads} heads, but the model has {graph.n_layers} x "
                f"{graph.n_heads}: load the model it was traced on."
            )

    @staticmethod
    def concat(results: list[TraceResult]) -> TraceResult:
        """Join per-input results over disjoint prompt sets (same sizes, graph and options)."""
        if not results:
            raise ValueError("Nothing to concatenate.")
        first = results[0]
        for other in results[1:]:
            if other.graph != first.graph or not torch.equal(other.sizes, first.sizes):
                raise ValueError("Only results with the same graph and sizes can be joined.")
        has_target = all(r.target_logprob is not None for r in results)
        return TraceResult(
            graph=first.graph,
            sizes=first.sizes,
            masks=torch.cat([r.prompt_masks() for r in results]),
            metrics={k: torch.cat([r.metrics[k] for r in results]) for k in first.metrics},
            entropy=torch.cat([r.entropy for r in results]),
            prompts=[p for r in results for p in r.prompts],
            top_tokens=torch.cat([r.top_tokens for r in results]),
            full_top_tokens=torch.cat([r.full_top_tokens for r in results]),
            candidates=first.candidates,
            options=dict(first.options),
            target_logprob=torch.cat([r.target_logprob for r in results])  # type: ignore[misc]
            if has_target
            else None,
        )

    def equals(self, other: TraceResult) -> bool:
        """Exact equality of every tensor, prompt and option (wall times aside: two runs of
        the same trace are equal, however long each took)."""
        a, b = self._tensors(), other._tensors()

        def stable(options: dict[str, Any]) -> str:
            kept = {k: v for k, v in options.items() if k not in VOLATILE_OPTIONS}
            return json.dumps(kept, sort_keys=True, default=str)

        return (
            a.keys() == b.keys()
            and all(torch.equal(a[k], b[k]) for k in a)
            and self.prompts == other.prompts
            and self.graph == other.graph
            and stable(self.options) == stable(other.options)
        )
