"""``ReproduceConfig``: what one ``reproduce`` run is asked to do, checked once.

The command line builds it from its arguments and :func:`strace_lens.reproduce.reproduce`
from its keywords; :func:`strace_lens.reproduce.pipeline.run` reads only this. Options that
mean something at one granularity only are left ``None`` by the caller and filled in here
with that granularity's default, so a value *given* at the other granularity can be refused
by name (an error that says what to do instead) rather than silently ignored:

- node only: ``sizes`` (the edge runs use the paper's size grid, so that a folder traced by
  the direct ``trace_dataset`` call is resumed), ``ablation`` other than ``"zero"`` (the
  paper's edge ablation is zero), ``random_draws`` above 1 (the edge random control is one
  subgraph per prompt and size), ``core_nucleus`` and ``refined_nucleus`` (the edge
  analyses use the paper's fixed phase bands instead of a nucleus rule);
- edge only: ``method`` other than ``"mask"`` (node reproduce traces learned masks),
  ``ablate_attention_edges``.

``small_core`` is the threshold of claim 1a at both, in each granularity's unit: a fraction
of the candidate nodes (default 0.1) or of the prompt's edges (default 1e-2, the upper end of
the paper's construction band).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from strace_lens.types import ABLATIONS, AblationName, Granularity, MethodName

#: the granularities ``reproduce`` runs at ("token" is not wired into it)
REPRODUCE_GRANULARITIES: tuple[Granularity, ...] = ("node", "edge")
#: the search methods ``reproduce --granularity edge`` traces (beside its random control)
EDGE_REPRODUCE_METHODS: tuple[MethodName, ...] = ("greedy", "mask")
#: claim 1a's threshold at node granularity: a fraction of the candidate nodes
NODE_SMALL_CORE = 0.1
#: claim 1a's threshold at edge granularity: a fraction of the prompt's edges (the end of
#: the paper's construction band, 1e-4 to 1e-2)
EDGE_SMALL_CORE = 1e-2
#: the phase rule's defaults at node granularity (shared-nucleus percentages)
CORE_NUCLEUS, REFINED_NUCLEUS = 1.0, 90.0
#: random subgraphs per (prompt, size) of the node random baseline
NODE_RANDOM_DRAWS = 5


@dataclass(frozen=True)
class ReproduceConfig:
    """A validated ``reproduce`` run (module docstring); ``None`` fields are resolved to the
    granularity's default on construction."""

    models: tuple[Any, ...]
    prompts_file: str | os.PathLike[str]
    n: int = 200
    out_dir: str | os.PathLike[str] = "reproduction"
    granularity: Granularity = "node"
    method: MethodName | None = None
    ablate_attention_edges: bool | None = None
    sizes: tuple[int | float, ...] | None = None
    seed: int = 0
    ablation: AblationName | None = None
    chunk_size: int = 16
    batch_size: int | None = None
    random_draws: int | None = None
    corpus: str | os.PathLike[str] | None = None
    core_nucleus: float | None = None
    refined_nucleus: float | None = None
    small_core: float | None = None
    min_prompts: int = 10
    n_boot: int = 2000
    device: str | None = None
    progress: bool | None = None
    command: str | None = None
    mask_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 1 <= len(self.models) <= 2:
            raise ValueError(
                f"reproduce takes one model or two (for agreement), got {len(self.models)}."
            )
        if self.granularity not in REPRODUCE_GRANULARITIES:
            raise ValueError(
                f"Unknown granularity={self.granularity!r} for reproduce; choose node (heads "
                "and MLPs) or edge (the paper's token-level edges)."
            )
        for name, value, low in (("n", self.n, 1), ("chunk_size", self.chunk_size, 1),
                                 ("min_prompts", self.min_prompts, 1), ("n_boot", self.n_boot, 1),
                                 ("seed", self.seed, 0)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}.")
        self._set("out_dir", Path(self.out_dir))
        self._set("mask_options", MappingProxyType(dict(self.mask_options)))
        if self.sizes is not None:
            self._set("sizes", tuple(self.sizes))
        if self.granularity == "node":
            self._resolve_node()
        else:
            self._resolve_edge()
        small = float(self.small_core)  # type: ignore[arg-type]
        if not 0 < small <= 1:
            raise ValueError(f"small_core is a fraction in (0, 1], got {small:g}.")

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def _resolve_node(self) -> None:
        if self.method not in (None, "mask"):
            raise ValueError(
                f"method={self.method!r} applies at granularity='edge' only (node reproduce "
                "traces learned masks): leave method unset, or pass granularity='edge'."
            )
        if self.ablate_attention_edges is not None:
            raise ValueError(
                "ablate_attention_edges applies at granularity='edge' only (nodes have no "
                "attention edges): leave it unset, or pass granularity='edge'."
            )
        ablation = "mean" if self.ablation is None else self.ablation
        if ablation not in ABLATIONS:
            raise ValueError(f"ablation must be 'mean' or 'zero', got {ablation!r}.")
        draws = NODE_RANDOM_DRAWS if self.random_draws is None else self.random_draws
        if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
            raise ValueError(f"random_draws must be an integer >= 1, got {draws!r}.")
        core = CORE_NUCLEUS if self.core_nucleus is None else float(self.core_nucleus)
        refined = REFINED_NUCLEUS if self.refined_nucleus is None else float(self.refined_nucleus)
        # checked before hours of tracing, not when the analyses finally run
        if not 0 < core <= refined <= 100:
            raise ValueError(
                "The phase rule needs 0 < core_nucleus <= refined_nucleus <= 100 (shared-"
                f"nucleus percentages), got core_nucleus={core:g}, refined_nucleus={refined:g}."
            )
        small = NODE_SMALL_CORE if self.small_core is None else self.small_core
        for name, value in (("method", "mask"), ("ablation", ablation), ("random_draws", draws),
                            ("core_nucleus", core), ("refined_nucleus", refined),
                            ("small_core", small)):  # fmt: skip
            self._set(name, value)

    def _resolve_edge(self) -> None:
        refused = []
        if self.sizes is not None:
            refused.append(
                "sizes: the edge runs use the paper's size grid (sizes='paper'), so that run "
                "folders are shared with the direct trace_dataset call; leave sizes unset"
            )
        if self.ablation not in (None, "zero"):
            refused.append(
                f"ablation={self.ablation!r}: the paper's edge ablation is zero (an edge outside "
                "the subgraph contributes nothing); leave ablation unset or 'zero'"
            )
        if self.random_draws not in (None, 1):
            refused.append(
                f"random_draws={self.random_draws!r}: the edge random control is one random "
                "subgraph per (prompt, size); leave random_draws unset or 1"
            )
        for name in ("core_nucleus", "refined_nucleus"):
            if getattr(self, name) is not None:
                refused.append(
                    f"{name}: the edge analyses use the paper's fixed phase bands "
                    "(construction 1e-4 to 1e-2, refinement 1e-2 to 1), not a nucleus rule; "
                    f"leave {name} unset"
                )
        method = "greedy" if self.method is None else self.method
        if method not in EDGE_REPRODUCE_METHODS:
            refused.append(
                f"method={method!r}: reproduce traces the paper's greedy or learned edge masks; "
                "choose method='greedy' or 'mask' (the random control is traced by itself)"
            )
        if self.mask_options and method != "mask":
            refused.append(
                f"search options {sorted(self.mask_options)}: they belong to the learned "
                "search; pass method='mask' or drop them"
            )
        if refused:
            raise ValueError(
                "At granularity='edge' these options do not apply: "
                + "; ".join(refused)
                + " (or run at granularity='node')."
            )
        if self.mask_options:  # field names and values, before any tracing
            from strace_lens.edges.config import EdgeTraceConfig

            EdgeTraceConfig.from_trace_arguments(
                method="mask", options={"mask_search": dict(self.mask_options)}
            )
        aae = True if self.ablate_attention_edges is None else self.ablate_attention_edges
        if not isinstance(aae, bool):
            raise ValueError(f"ablate_attention_edges must be True or False, got {aae!r}.")
        small = EDGE_SMALL_CORE if self.small_core is None else self.small_core
        for name, value in (("method", method), ("ablation", "zero"), ("random_draws", 1),
                            ("ablate_attention_edges", aae), ("small_core", small)):  # fmt: skip
            self._set(name, value)

    def number(self, name: str) -> float:
        """A resolved numeric option (``small_core``, and at node ``core_nucleus`` and
        ``refined_nucleus``), as a float."""
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"{name} does not apply at granularity={self.granularity!r}.")
        return float(value)

    # -- what the edge runs are traced with ------------------------------------------------
    def edge_trace_options(self, method: str) -> dict[str, Any]:
        """``trace_dataset``'s trace options for one edge run folder (``method`` is the
        config's own or ``"random"``): exactly those of the direct call the run folders
        share, the learned-search options only when the user gave some."""
        options: dict[str, Any] = {
            "granularity": "edge",
            "method": method,
            "sizes": "paper",
            "ablate_attention_edges": self.ablate_attention_edges,
            "seed": self.seed,
        }
        if method == "mask" and self.mask_options:
            options["mask_search"] = dict(self.mask_options)
        return options

    @property
    def model_names(self) -> list[str]:
        return [m if isinstance(m, str) else "<model object>" for m in self.models]

    def python_call(self) -> str:
        """The equivalent Python call (recorded in the report when no command is given)."""
        names = self.model_names
        parts = [
            repr(names if len(names) > 1 else names[0]),
            repr(str(self.prompts_file)),
            f"n={self.n}",
            f"out_dir={str(self.out_dir)!r}",
        ]
        if self.granularity == "node":
            parts += [
                f"sizes={list(self.sizes) if self.sizes is not None else None}",
                f"seed={self.seed}",
                f"ablation={self.ablation!r}",
                f"chunk_size={self.chunk_size}",
                f"random_draws={self.random_draws}",
                f"corpus={str(self.corpus) if self.corpus else None!r}",
                f"core_nucleus={self.core_nucleus}",
                f"refined_nucleus={self.refined_nucleus}",
            ]
        else:
            parts += [
                "granularity='edge'",
                f"method={self.method!r}",
                f"ablate_attention_edges={self.ablate_attention_edges}",
                f"seed={self.seed}",
                f"chunk_size={self.chunk_size}",
                f"corpus={str(self.corpus) if self.corpus else None!r}",
                f"small_core={self.small_core}",
            ]
        parts += [f"{k}={v!r}" for k, v in sorted(self.mask_options.items())]
        return "strace_lens.report.reproduce(" + ", ".join(parts) + ")"


def models_of(model: Any) -> tuple[Any, ...]:
    """``reproduce``'s ``model`` argument (one, or a list of two) as a tuple."""
    if isinstance(model, (list, tuple)):
        return tuple(model)
    return (model,)


def sizes_of(sizes: Sequence[int | float] | None) -> tuple[int | float, ...] | None:
    return None if sizes is None else tuple(sizes)


__all__ = [
    "EDGE_REPRODUCE_METHODS",
    "EDGE_SMALL_CORE",
    "NODE_SMALL_CORE",
    "REPRODUCE_GRANULARITIES",
    "ReproduceConfig",
    "models_of",
    "sizes_of",
]
