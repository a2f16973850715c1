"""``MaskOptions``: the options of ``method="mask"``, shared by the relaxation, the nested
growth and the local searches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MaskOptions:
    """Options of ``method="mask"`` (validated when built)."""

    steps: int = 24  # nested-ranking steps
    finetune_steps: int = 12  # per-size steps when nested=False
    sizes_per_step: int = 1
    lr: float = 0.2
    tau_start: float = 1.0
    tau_end: float = 0.05
    init: str = "attribution"  # or "zeros"
    # "straight-through": the forward pass uses the hard top-s mask (the true objective) and
    # the gradient flows through the soft threshold mask; "soft": the soft mask throughout
    relaxation: str = "straight-through"
    refine_rounds: int | None = None  # swap-search rounds (None: auto)
    refine_width: int | None = None  # nodes on each side of the boundary tried (None: auto)
    grow_width: int = 4  # nested: single-node seeds measured per size while growing
    # nested: from a subgraph of this many nodes on, one seed per order (None: grow_width)
    grow_narrow_from: int | None = None
    # nested: grow one node at a time through the sizes between two grid sizes at most this
    # many apart (0: grow straight from grid size to grid size)
    grow_single_steps: int = 4
    # nested: propose by the gradient at the current subgraph (one forward+backward per
    # growth step); False: by the ranking and the write-norm order only, no backward
    grow_gradient: bool = True
    # nested, with grow_gradient: one more proposal per growth step adding d > 1 nodes, the d
    # outside nodes of the smallest |gradient| (a near-neutral filler: when the d "helpful"
    # nodes overshoot together, every other proposal can raise the KL). Measured and left
    # off: the filler is not neutral (docs/search-quality.md, "The quiet growth proposal").
    # Out of a run's identity while False, so folders traced before it existed still resume.
    grow_quiet: bool = False

    def __post_init__(self) -> None:
        if self.init not in ("attribution", "zeros"):
            raise ValueError(f"Unknown init {self.init!r}: use 'attribution' or 'zeros'.")
        if self.relaxation not in ("straight-through", "soft"):
            raise ValueError(
                f"Unknown relaxation {self.relaxation!r}: use 'straight-through' or 'soft'."
            )
        if self.grow_quiet and not self.grow_gradient:
            raise ValueError(
                "grow_quiet=True proposes by the gradient at the current subgraph, which "
                "grow_gradient=False does not compute: drop one of the two."
            )

    @classmethod
    def from_kwargs(cls, options: dict[str, Any]) -> MaskOptions:
        known = set(cls.__dataclass_fields__)
        unknown = set(options) - known
        if unknown:
            raise TypeError(
                f"Unknown option(s) for method='mask': {sorted(unknown)}; known: {sorted(known)}."
            )
        return cls(**options)


__all__ = ["MaskOptions"]
