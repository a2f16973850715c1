"""The run-time type checker of the test suite (``--jaxtyping-packages`` in pyproject.toml).

beartype with the PEP 484 numeric tower: an ``int`` is accepted where ``float`` is annotated,
as mypy and the Python typing rules accept it.

A public function validates what users pass and raises an error that names the argument and
the fix (tests/test_reliability.py checks those messages). Under the checker, a badly typed
argument would be stopped first by beartype's generic message; so on an argument violation the
function itself is called: its own error is what users see and what the tests assert. If the
function accepts the argument instead, the annotation is wrong and the violation is raised.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from beartype import BeartypeConf, beartype
from beartype.roar import BeartypeCallHintParamViolation

_check = beartype(conf=BeartypeConf(is_pep484_tower=True))


def typechecker(obj: Any) -> Any:
    checked = _check(obj)
    if not inspect.isfunction(obj) or inspect.isgeneratorfunction(obj):
        return checked
    fn: Callable[..., Any] = obj

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return checked(*args, **kwargs)
        except BeartypeCallHintParamViolation as violation:
            fn(*args, **kwargs)  # the function's own check raises first, as users see it
            raise violation  # it accepted a value its annotation excludes

    return wrapper
