"""``EdgeTraceConfig``: what ``trace(..., granularity="edge")`` is asked to do, checked once.

``trace`` and ``trace_dataset`` take one set of keyword arguments for every granularity. At
edge granularity only some of them mean something; this module turns those into the edge
configuration and refuses the others by name, saying what the paper's edge method does
instead (``ablation``: edges are zero-ablated; ``per``: each prompt has its own graph, so
there is no subgraph shared by a dataset; ``keep``/``candidates``: name heads and MLPs, not
edges; ``inverse``: not scored at edge granularity).

``identity()`` is the configuration as plain JSON: what a ``trace_dataset`` run folder
records and hashes, so a run resumed with another semantics, token convention, grid, method
or seed is refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, get_args

from strace_lens.edges.learned import MaskSearch
from strace_lens.edges.sizes import relative_sizes
from strace_lens.edges.tokens import TokenConvention
from strace_lens.edges.trace import EdgeMethod, RandomVariant

EDGE_METHODS: tuple[str, ...] = get_args(EdgeMethod)
TOKEN_CONVENTIONS: tuple[str, ...] = get_args(TokenConvention)
RANDOM_VARIANTS: tuple[str, ...] = get_args(RandomVariant)
#: the method when none is named: the paper's greedy (at node granularity: learned masks)
DEFAULT_EDGE_METHOD = "greedy"
#: method options (``trace``'s ``**options``) that edge granularity takes
EDGE_OPTIONS = ("ablate_attention_edges", "tokens", "random_variant", "mask_search")

_NODE_ONLY = {
    "per": "each prompt has its own edge graph (its size depends on the prompt's length), "
    "so there is no subgraph shared by a dataset; use per='input'",
    "keep": "keep names heads and MLPs, not edges; leave it None",
    "candidates": "candidates names heads and MLPs, not edges; leave it None",
    "inverse": "inverse subgraphs are not scored at edge granularity; leave it None",
    "targets": "the true next token's log-prob is not recorded at edge granularity; leave "
    "targets None (strace_lens.edges.edge_target_loss reads the full model's loss on them "
    "afterwards)",
}


@dataclass(frozen=True)
class EdgeTraceConfig:
    """A validated edge-granularity trace configuration (see :func:`edge_trace`)."""

    method: str = DEFAULT_EDGE_METHOD
    #: "paper" or relative sizes in (0, 1]; resolved to an ascending tuple
    sizes: str | Sequence[float] = "paper"
    ablate_attention_edges: bool = True
    tokens: str = "paper"
    random_variant: str = "uniform"
    seed: int = 0
    mask_search: MaskSearch | None = None

    def __post_init__(self) -> None:
        _check_choice("method", self.method, EDGE_METHODS)
        _check_choice("tokens", self.tokens, TOKEN_CONVENTIONS)
        _check_choice("random_variant", self.random_variant, RANDOM_VARIANTS)
        if not isinstance(self.ablate_attention_edges, bool):
            raise TypeError(
                "ablate_attention_edges must be True (ablate attention edges, the default) or "
                f"False (count them in s but keep them), got {self.ablate_attention_edges!r}."
            )
        if self.random_variant != "uniform" and self.method != "random":
            raise ValueError(
                f"random_variant={self.random_variant!r} applies to method='random' only "
                f"(method is {self.method!r})."
            )
        if self.mask_search is not None and self.method != "mask":
            raise ValueError(
                f"mask_search applies to method='mask' only (method is {self.method!r})."
            )
        object.__setattr__(self, "sizes", relative_sizes(self.sizes))

    @classmethod
    def from_trace_arguments(
        cls,
        *,
        method: str | None = None,
        sizes: str | Sequence[float] | None = None,
        ablation: Any = None,
        seed: int = 0,
        nested: bool = True,
        options: Mapping[str, Any] | None = None,
        **node_only: Any,
    ) -> EdgeTraceConfig:
        """The configuration of ``trace(..., granularity="edge", **arguments)``.

        ``node_only`` holds ``per``, ``keep``, ``candidates``, ``inverse`` and ``targets`` as
        given; each must be at its default. ``options`` is ``trace``'s ``**options``.
        """
        for name, value in node_only.items():
            if name not in _NODE_ONLY:
                raise TypeError(f"Unknown argument {name!r} for granularity='edge'.")
            if value is not None and not (name == "per" and value == "input"):
                raise ValueError(
                    f"{name}={value!r} does not apply at granularity='edge': {_NODE_ONLY[name]}."
                )
        _check_ablation(ablation)
        if nested is not True:
            raise ValueError(
                "nested=False does not apply at granularity='edge': the paper's greedy and "
                "the learned edge ranking are nested by construction, and method='random' "
                "draws every size independently; leave nested at its default."
            )
        given = dict(options or {})
        unknown = sorted(set(given) - set(EDGE_OPTIONS))
        if unknown:
            raise TypeError(
                f"Unknown option(s) at granularity='edge': {unknown}; known: "
                f"{', '.join(EDGE_OPTIONS)} (rows per forward pass: batch_size)."
            )
        if "mask_search" in given:
            given["mask_search"] = _mask_search(given["mask_search"])
        return cls(
            method=DEFAULT_EDGE_METHOD if method is None else method,
            sizes="paper" if sizes is None else sizes,
            seed=seed,
            **given,
        )

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> EdgeTraceConfig:
        """From ``trace``'s keyword arguments as one mapping (``trace_dataset``'s options);
        runtime settings (``batch_size``, ``device``, ``progress``) and ``granularity`` are
        skipped."""
        named = {"method", "sizes", "ablation", "seed", "nested", *_NODE_ONLY}
        skip = {"granularity", "batch_size", "device", "progress"}
        arguments = {k: v for k, v in kwargs.items() if k in named}
        options = {k: v for k, v in kwargs.items() if k not in named | skip}
        return cls.from_trace_arguments(**arguments, options=options)

    def trace_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``trace`` that give this configuration (defaults
        included; ``ablation="zero"``, the edge ablation)."""
        kwargs: dict[str, Any] = {
            "granularity": "edge",
            "method": self.method,
            "sizes": list(self.sizes),
            "ablation": "zero",
            "seed": self.seed,
            "ablate_attention_edges": self.ablate_attention_edges,
            "tokens": self.tokens,
            "random_variant": self.random_variant,
        }
        if self.mask_search is not None:
            kwargs["mask_search"] = self.mask_search
        return kwargs

    def identity(self) -> dict[str, Any]:
        """The configuration as plain JSON values (a run folder's recorded options)."""
        record = {**self.trace_kwargs(), "ablation": "zero"}
        search = self.mask_search or (MaskSearch() if self.method == "mask" else None)
        if search is not None:
            record["mask_search"] = {
                f.name: _plain(getattr(search, f.name)) for f in dataclasses.fields(search)
            }
            if self.ablate_attention_edges:
                # no effect with attention edges ablated (their masks reach the forward
                # anyway), so folders traced before the option existed still resume
                del record["mask_search"]["kept_attention_gradient"]
        return record


def _check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(
            f"Unknown {name}={value!r} at granularity='edge'; choose one of {', '.join(choices)}."
        )


def _check_ablation(ablation: Any) -> None:
    """Only zero ablation exists at edge granularity (the paper removes an edge's term)."""
    from strace_lens.ablation import ZeroAblation

    if ablation is None or ablation == "zero" or isinstance(ablation, ZeroAblation):
        return
    shown = ablation if isinstance(ablation, str) else type(ablation).__name__
    raise ValueError(
        f"ablation={shown!r} does not apply at granularity='edge': the paper's edge ablation "
        "is zero (an edge outside the subgraph contributes nothing to its target). Leave "
        "ablation None or 'zero'."
    )


def _mask_search(value: Any) -> MaskSearch:
    if isinstance(value, MaskSearch):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(f"mask_search must be a MaskSearch or a dict of its fields, got {value!r}.")
    known = [f.name for f in dataclasses.fields(MaskSearch)]
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise TypeError(f"Unknown mask_search field(s) {unknown}; known: {', '.join(known)}.")
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
    return MaskSearch(**fields)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


__all__ = ["DEFAULT_EDGE_METHOD", "EDGE_METHODS", "EDGE_OPTIONS", "EdgeTraceConfig"]
