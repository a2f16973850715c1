"""The search-method registry: one ``SearchMethod`` per ``method=`` name.

A method has a name, the granularities it supports, its own frozen options dataclass (built
and validated from the keyword options of ``trace`` by ``parse_options``) and ``run``, which
turns an objective, the size grid and the row grouping into hard candidate masks. ``trace``
reads: validate the configuration, prepare the objective, ``method.run(...)``, evaluate, build
the result; it knows no method by name.

To add a method, subclass ``SearchMethod`` and decorate it with ``@register``.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from strace_lens.progress import GRADIENT_ROW_COST
from strace_lens.search.baselines import (
    EXHAUSTIVE_MAX_SUBSETS,
    FORWARD_DEFAULT_MAX,
    FORWARD_FULL_LIMIT,
    attribution_scores,
    exhaustive_masks,
    forward_selection,
    greedy_masks,
    greedy_scores,
    random_masks,
)
from strace_lens.search.grouping import RowGrouping
from strace_lens.search.mask_learning import MaskOptions, learn_masks, planned_mask_rows
from strace_lens.search.objective import SubgraphObjective
from strace_lens.search.ranking import top_s_grid
from strace_lens.types import Granularity


@dataclass(frozen=True)
class SearchOutput:
    """What a method found: hard candidate masks ``[R, S, n_cand]`` (R = groups) for the
    sizes it reached (a method may stop early), and, for methods with several random draws,
    every draw ``[D, R, S, n_cand]`` (``masks`` is the first)."""

    masks: Bool[Tensor, "group size cand"]
    sizes: Int[Tensor, " size"]
    draws: Bool[Tensor, "draw group size cand"] | None = None


@dataclass(frozen=True)
class NoOptions:
    """A method without options."""


def options_from_kwargs(method: str, cls: type[Any], given: Mapping[str, Any]) -> Any:
    """Build the options dataclass ``cls`` of ``method`` from keyword options; unknown names
    raise TypeError listing the known ones."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(given) - known
    if unknown:
        raise TypeError(
            f"Unknown option(s) for method={method!r}: {sorted(unknown)}; known: {sorted(known)}."
        )
    return cls(**given)


class SearchMethod(ABC):
    """One search method: its name, options, granularities and run."""

    name: ClassVar[str]
    options_type: ClassVar[type[Any]] = NoOptions
    granularities: ClassVar[tuple[Granularity, ...]] = ("node",)
    #: whether every family it returns is nested across sizes, whatever its options
    always_nested: ClassVar[bool] = False

    def parse_options(self, given: Mapping[str, Any], nested: bool) -> Any:
        """The method's frozen options from ``trace``'s keyword options (validated)."""
        return options_from_kwargs(self.name, self.options_type, given)

    def nested(self, options: Any) -> bool:
        """Whether the masks it returns are nested across sizes (recorded in the result)."""
        return self.always_nested

    def planned_rows(
        self,
        objective: SubgraphObjective,
        sizes: Int[Tensor, " size"],
        grouping: RowGrouping,
        options: Any,
    ) -> int:
        """The forward rows ``run`` is expected to spend through the objective (a row with a
        gradient counted as ``GRADIENT_ROW_COST``), for progress; 0 for a method that runs
        none (its masks are drawn or read off one pass outside the objective)."""
        return 0

    @abstractmethod
    def run(
        self,
        objective: SubgraphObjective,
        sizes: Int[Tensor, " size"],
        grouping: RowGrouping,
        seed: int,
        options: Any,
    ) -> SearchOutput:
        """Hard masks of exactly ``sizes[j]`` candidates for every group and size."""


#: method name -> method, in the order of ``strace_lens.types.METHODS``
REGISTRY: dict[str, SearchMethod] = {}


def register(cls: type[SearchMethod]) -> type[SearchMethod]:
    """Class decorator: add one instance of ``cls`` to the registry under ``cls.name``."""
    if cls.name in REGISTRY:
        raise ValueError(f"A search method named {cls.name!r} is already registered.")
    REGISTRY[cls.name] = cls()
    return cls


def get_method(name: str) -> SearchMethod:
    """The registered method ``name`` (ValueError listing the known ones otherwise)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"Unknown method {name!r}; choose one of {', '.join(REGISTRY)}.") from None


# -- learned masks -------------------------------------------------------------------------
@dataclass(frozen=True)
class MaskSearch:
    """``method="mask"``'s options: the search options and whether the family is nested."""

    search: MaskOptions
    nested: bool = True


@register
class MaskMethod(SearchMethod):
    name = "mask"
    options_type = MaskOptions
    granularities = ("node", "token")

    def parse_options(self, given: Mapping[str, Any], nested: bool) -> MaskSearch:
        return MaskSearch(MaskOptions.from_kwargs(dict(given)), nested)

    def nested(self, options: MaskSearch) -> bool:
        return options.nested

    def planned_rows(
        self,
        objective: SubgraphObjective,
        sizes: Tensor,
        grouping: RowGrouping,
        options: MaskSearch,
    ) -> int:
        n_cand = int(objective.candidates.sum())
        return planned_mask_rows(
            objective.n_prompts, grouping, n_cand, sizes, options.search, options.nested
        )

    def run(
        self,
        objective: SubgraphObjective,
        sizes: Tensor,
        grouping: RowGrouping,
        seed: int,
        options: MaskSearch,
    ) -> SearchOutput:
        init = None
        if options.search.init == "attribution":
            init = -attribution_scores(objective, grouping)
        # the nested growth also proposes nodes in the best-first order of write norms (a
        # node-level order: at token granularity the growth runs on its other proposals)
        by_norms = options.nested and objective.granularity == "node"
        guide = greedy_scores(objective, grouping) if by_norms else None
        masks = learn_masks(
            objective, sizes, grouping, options.nested, init, options.search, seed, guide
        )
        return SearchOutput(masks, sizes)


# -- baselines -----------------------------------------------------------------------------
@dataclass(frozen=True)
class RandomOptions:
    draws: int = 5  # random subgraphs per (group, size): the metrics are their mean and std

    def __post_init__(self) -> None:
        if int(self.draws) < 1:
            raise ValueError(f"draws must be at least 1, got {self.draws}.")


@register
class RandomMethod(SearchMethod):
    name = "random"
    options_type = RandomOptions
    granularities = ("node", "token")

    def run(
        self,
        objective: SubgraphObjective,
        sizes: Tensor,
        grouping: RowGrouping,
        seed: int,
        options: RandomOptions,
    ) -> SearchOutput:
        gen = torch.Generator().manual_seed(seed)
        n_cand = int(objective.candidates.sum())
        draws = random_masks(grouping.n_groups, sizes, n_cand, int(options.draws), gen)
        return SearchOutput(draws[0], sizes, draws if draws.shape[0] > 1 else None)


@register
class GreedyMethod(SearchMethod):
    name = "greedy"
    always_nested = True

    def run(
        self,
        objective: SubgraphObjective,
        sizes: Tensor,
        grouping: RowGrouping,
        seed: int,
        options: NoOptions,
    ) -> SearchOutput:
        return SearchOutput(greedy_masks(objective, sizes, grouping), sizes)


@register
class AttributionMethod(SearchMethod):
    name = "attribution"
    always_nested = True

    def planned_rows(
        self, objective: SubgraphObjective, sizes: Tensor, grouping: RowGrouping, options: NoOptions
    ) -> int:
        return GRADIENT_ROW_COST * objective.n_prompts  # one gradient at the ablated end

    def run(
        self,
        objective: SubgraphObjective,
        sizes: Tensor,
        grouping: RowGrouping,
        seed: int,
        options: NoOptions,
    ) -> SearchOutput:
        scores = attribution_scores(objective, grouping).abs().cpu()
        return SearchOutput(top_s_grid(scores, sizes), sizes)


@dataclass(frozen=True)
class ForwardOptions:
    # largest size searched (default: every size up to 24 candidates, else 8)
    max_size: int | None = None


@register
class ForwardMethod(SearchMethod):
    name = "forward"
    options_type = ForwardOptions
    always_nested = True

    def planned_rows(
        self,
        objective: SubgraphObjective,
        sizes: Tensor,
        grouping: RowGrouping,
        options: ForwardOptions,
    ) -> int:
        n_cand = int(objective.candidates.sum())
        limit = self._limit(options, n_cand)
        limit = max((s for s in sizes.tolist() if s <= limit), default=0)  # the largest reached
        # step t measures every node outside the current t - 1 for every group
        trials = sum(n_cand - t + 1 for t in range(1, limit + 1))
        return trials * grouping.n_groups * grouping.group_size

    @staticmethod
    def _limit(options: ForwardOptions, n_cand: int) -> int:
        if options.max_size is not None:
            return int(options.max_size)
        return n_cand if n_cand <= FORWARD_FULL_LIMIT else FORWARD_DEFAULT_MAX

    def run(
        self,
        objective: SubgraphObjective,
        sizes: Tensor,
        grouping: RowGrouping,
        seed: int,
        options: ForwardOptions,
    ) -> SearchOutput:
        limit = self._limit(options, int(objective.candidates.sum()))
        reached = sizes[sizes <= int(limit)]
        if len(reached) == 0:
            raise ValueError(f"max_size={limit} is below the smallest size asked for.")
        masks = forward_selection(objective, reached, grouping, int(reached.max()))
        return SearchOutput(masks, reached)


@dataclass(frozen=True)
class ExhaustiveOptions:
    max_subsets: int = EXHAUSTIVE_MAX_SUBSETS  # refuse above this many subsets per prompt


@register
class ExhaustiveMethod(SearchMethod):
    name = "exhaustive"
    options_type = ExhaustiveOptions
    granularities = ("node", "token")

    def planned_rows(
        self,
        objective: SubgraphObjective,
        sizes: Tensor,
        grouping: RowGrouping,
        options: ExhaustiveOptions,
    ) -> int:
        n_cand = int(objective.candidates.sum())
        return objective.n_prompts * sum(math.comb(n_cand, int(s)) for s in sizes.tolist())

    def run(
        self,
        objective: SubgraphObjective,
        sizes: Tensor,
        grouping: RowGrouping,
        seed: int,
        options: ExhaustiveOptions,
    ) -> SearchOutput:
        masks = exhaustive_masks(objective, sizes, grouping, int(options.max_subsets))
        return SearchOutput(masks, sizes)


__all__ = [
    "REGISTRY",
    "ExhaustiveOptions",
    "ForwardOptions",
    "MaskSearch",
    "NoOptions",
    "RandomOptions",
    "SearchMethod",
    "SearchOutput",
    "get_method",
    "register",
]
