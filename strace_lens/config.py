"""``TraceConfig``: what a trace is asked to do, typed, frozen and validated once.

``trace(...)`` builds one from its keyword arguments; ``trace_dataset`` records the same
fields (with these defaults) as the identity of a run folder, so "not given" and the default
count as the same run. ``TraceResult.config`` rebuilds it from a saved result's options.

Runtime settings that do not change the result (``batch_size``, ``device``, ``progress``)
are not part of it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from strace_lens.ablation import Ablation
from strace_lens.search.methods import REGISTRY, SearchMethod, get_method
from strace_lens.types import (
    ABLATIONS,
    PER,
    AblationName,
    Granularity,
    MethodName,
    Per,
    check_choice,
)

#: trace keyword arguments that change how a trace runs, never what it finds
RUNTIME_OPTIONS = ("batch_size", "device", "progress")

#: the fields that identify a run (``trace_dataset``'s manifest), in ``trace``'s order
IDENTITY_FIELDS = (
    "sizes",
    "ablation",
    "per",
    "method",
    "keep",
    "candidates",
    "seed",
    "nested",
    "inverse",
)


@dataclass(frozen=True)
class TraceConfig:
    """A validated trace configuration; ``options`` is the method's parsed options."""

    method: MethodName = "mask"
    per: Per = "input"
    #: "mean" (over the traced prompts; also None), "zero", or an ``Ablation``
    ablation: AblationName | Ablation | None = None
    #: node counts, relative sizes or None (the default grid), resolved against the graph
    sizes: Sequence[int | float] | Any | None = None
    #: node names, ``Node``s or indices (any sequence, or a tensor of indices)
    keep: Any = None
    candidates: Any = None
    seed: int = 0
    nested: bool = True
    inverse: bool = True
    granularity: Granularity = "node"
    #: the method's keyword options as given (recorded in the result)
    method_options: Mapping[str, Any] = field(default_factory=dict)
    options: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_names(self.method, self.per, self.ablation)
        if self.granularity not in ("node", "token"):
            raise ValueError(
                f"TraceConfig configures node- and token-granularity traces, not granularity="
                f"{self.granularity!r}: trace(..., granularity='edge') builds an "
                "EdgeTraceConfig (strace_lens.edges.config)."
            )
        if self.granularity == "token":
            for name in ("keep", "candidates"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"{name}=... does not apply at granularity='token': it names heads and "
                        "MLPs, and every (component, position) pair of a prompt is a candidate "
                        f"at token granularity; leave {name} None."
                    )
        method = self.search_method
        if self.granularity not in method.granularities:
            raise ValueError(
                f"method={self.method!r} does not support granularity={self.granularity!r} "
                f"(it supports {', '.join(method.granularities)})."
            )
        parsed = method.parse_options(dict(self.method_options), self.nested)
        object.__setattr__(self, "options", parsed)

    @property
    def search_method(self) -> SearchMethod:
        return get_method(self.method)

    @classmethod
    def identity_defaults(cls) -> dict[str, Any]:
        """The default of every field that identifies a run, by name."""
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        return {name: defaults[name] for name in IDENTITY_FIELDS}

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> TraceConfig:
        """The configuration of ``trace(model, prompts, **kwargs)`` (runtime settings and
        targets ignored; every other unknown name is a method option)."""
        own = {f.name for f in dataclasses.fields(cls) if f.init} - {"method_options"}
        fields = {k: v for k, v in kwargs.items() if k in own}
        # the names first, with errors that list the choices (the field annotations are
        # Literal types, which a run-time type checker would reject with less to go on)
        _check_names(
            fields.get("method", "mask"), fields.get("per", "input"), fields.get("ablation")
        )
        skip = {*own, *RUNTIME_OPTIONS, "targets"}
        method_options = {k: v for k, v in kwargs.items() if k not in skip}
        return cls(**fields, method_options=method_options)

    @classmethod
    def from_record(cls, options: Mapping[str, Any]) -> TraceConfig:
        """The configuration a saved result's ``options`` record (ablation by name; sizes,
        keep and candidates resolved: read them off the result)."""
        ablation = options.get("ablation")
        if isinstance(ablation, Mapping):
            ablation = ablation.get("name")
        return cls(
            method=options.get("method", "mask"),
            per=options.get("per", "input"),
            ablation=ablation if ablation in ABLATIONS else None,
            seed=int(options.get("seed", 0)),
            nested=bool(options.get("nested", True)),
            inverse=bool(options.get("inverse", True)),
            granularity=options.get("granularity", "node"),
            method_options=dict(options.get("method_options", {})),
        )


def _check_names(method: object, per: object, ablation: object) -> None:
    """ValueError naming the bad value for an unknown method, per or ablation name."""
    if method not in REGISTRY:
        raise ValueError(f"Unknown method {method!r}; choose one of {', '.join(REGISTRY)}.")
    check_choice("per", per, PER)
    if isinstance(ablation, str) and ablation not in ABLATIONS:
        raise ValueError(
            f"Unknown ablation {ablation!r}: use 'mean', 'zero', ZeroAblation() or "
            "MeanAblation.from_prompts(model, prompts)."
        )
    if ablation is not None and not isinstance(ablation, (str, Ablation)):
        raise TypeError(f"ablation must be 'mean', 'zero' or an Ablation, not {type(ablation)}.")


__all__ = ["IDENTITY_FIELDS", "RUNTIME_OPTIONS", "TraceConfig"]
