"""The names a run is configured with, in one place: per, method, ablation, granularity.

Each is a ``Literal`` alias for type checkers and a tuple of its values for run-time checks
(``check_choice``) and for the command line's ``choices``. This module imports nothing heavy,
so ``strace-lens --help`` can read it without importing torch.

The method names are those of the search-method registry (``strace_lens.search.methods``); a
test checks that the two agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

#: one subgraph per prompt and size, or one per size shared by all prompts (mean KL)
Per = Literal["input", "dataset"]
#: learned masks, or a baseline
MethodName = Literal["mask", "random", "greedy", "attribution", "forward", "exhaustive"]
#: what an ablated node's output is replaced by
AblationName = Literal["mean", "zero"]
#: what a subgraph is made of: attention heads and MLPs ("node"), each of them at each
#: position ("token"), or the paper's token-level edges ("edge"; strace_lens.edges)
Granularity = Literal["node", "token", "edge"]

PER: tuple[Per, ...] = get_args(Per)
METHODS: tuple[MethodName, ...] = get_args(MethodName)
ABLATIONS: tuple[AblationName, ...] = get_args(AblationName)
GRANULARITIES: tuple[Granularity, ...] = get_args(Granularity)


def check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    """Raise ValueError naming ``name`` when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"Unknown {name}={value!r}; choose one of {', '.join(choices)}.")


__all__ = [
    "ABLATIONS",
    "GRANULARITIES",
    "METHODS",
    "PER",
    "AblationName",
    "Granularity",
    "MethodName",
    "Per",
    "check_choice",
]
