"""Checking what callers pass to ``trace`` and ``trace_dataset``, and keeping their global state.

Every check here runs before any work and raises :class:`ArgumentError` (a ``ValueError``)
or :class:`ArgumentTypeError` (a ``TypeError``) whose message names the argument, the value
and the fix. Numbers from numpy or torch (``np.int64(3)``, ``torch.tensor(0.1)``) are accepted
wherever Python ints and floats are, and turned into them, so that they are recorded and
compared like the plain values.

:func:`guarded` wraps ``trace`` so that the caller's random number generators and grad mode
are left exactly as found (``trace`` seeds torch's generator; it needs autograd even when the
caller is inside ``torch.no_grad()`` or ``torch.inference_mode()``).
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import Tensor

F = TypeVar("F", bound=Callable[..., Any])


class ArgumentError(ValueError):
    """A bad argument value; the message names the argument and the fix."""


class ArgumentTypeError(TypeError):
    """An argument of the wrong type; the message names the argument and the fix."""


# -- plain numbers ---------------------------------------------------------------------------
def _scalar(value: Any) -> Any:
    """A 0-d tensor or numpy scalar as the Python number it holds; anything else unchanged."""
    if isinstance(value, Tensor):
        return value.item() if value.numel() == 1 and value.ndim == 0 else value
    if not isinstance(value, (bool, int, float, str)) and hasattr(value, "item"):
        try:
            return value.item()
        except (TypeError, ValueError):
            return value
    return value


def as_int(
    value: Any,
    name: str,
    minimum: int | None = None,
    maximum: int | None = None,
    allow_none: bool = False,
) -> int | None:
    """``value`` as a Python int in [minimum, maximum] (numpy/torch integers accepted)."""
    if value is None and allow_none:
        return None
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, float) and value.is_integer():
            hint = f" (write {int(value)}, not {value!r})"
        else:
            hint = ""
        raise ArgumentTypeError(
            f"{name} must be an integer{' or None' if allow_none else ''}, got {value!r}{hint}."
        )
    value = int(value)
    if minimum is not None and value < minimum:
        raise ArgumentError(f"{name} must be at least {minimum}, got {value}.")
    if maximum is not None and value > maximum:
        raise ArgumentError(f"{name} must be at most {maximum}, got {value}.")
    return value


def as_float(
    value: Any,
    name: str,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = True,
    allow_none: bool = False,
) -> float | None:
    """``value`` as a finite Python float in (low, high] (``low_open``) or [low, high]."""
    if value is None and allow_none:
        return None
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{name} must be a number, got {value!r}.")
    value = float(value)
    if not math.isfinite(value):
        raise ArgumentError(f"{name} must be a finite number, got {value!r}.")
    if low is not None and (value <= low if low_open else value < low):
        bound = f"greater than {low:g}" if low_open else f"at least {low:g}"
        raise ArgumentError(f"{name} must be {bound}, got {value!r}.")
    if high is not None and value > high:
        raise ArgumentError(f"{name} must be at most {high:g}, got {value!r}.")
    return value


def _choice(value: Any, name: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ArgumentError(f"{name} must be one of {', '.join(choices)}; got {value!r}.")
    return value


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be True or False, got {value!r}.")
    return value


def as_sizes(sizes: Any) -> Any:
    """Sizes with numpy/torch scalars turned into Python ints and floats (range checked later)."""
    if sizes is None or isinstance(sizes, Tensor):
        return sizes
    if hasattr(sizes, "tolist"):  # a numpy array
        values = sizes.tolist()
    elif isinstance(sizes, (Sequence, set, frozenset)) and not isinstance(sizes, (str, bytes)):
        values = list(sizes)
    else:
        raise ArgumentTypeError(
            f"sizes must be a list of node counts (ints) or relative sizes (floats), got {sizes!r}."
        )
    out = []
    for v in values:
        v = _scalar(v)
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise ArgumentTypeError(
                f"sizes must hold numbers (node counts or relative sizes), got {v!r}."
            )
        out.append(int(v) if isinstance(v, numbers.Integral) else float(v))
    return out


# -- devices ---------------------------------------------------------------------------------
def check_device(device: Any, name: str = "device") -> None:
    """Refuse a device torch does not know or this machine does not have."""
    if device is None:
        return
    if not isinstance(device, (str, torch.device)):
        raise ArgumentTypeError(f"{name} must be a string like 'cpu' or 'cuda', got {device!r}.")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ArgumentError(
            f"{name}={str(device)!r} is not a device torch knows: use 'cpu', 'cuda' or "
            "'cuda:N' (or leave it out to use the model's device)."
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ArgumentError(
                f"{name}={str(device)!r} is not available: this torch has no CUDA support or "
                "sees no GPU. Use 'cpu', or install a CUDA build of torch on a GPU machine."
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ArgumentError(
                f"{name}={str(device)!r}: there are only {torch.cuda.device_count()} GPU(s) "
                f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})."
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ArgumentError(f"{name}={str(device)!r} is not available on this machine.")
    elif dev.type != "cpu":
        raise ArgumentError(
            f"{name}={str(device)!r}: strace-lens runs on 'cpu' or 'cuda' (or 'mps')."
        )


# -- prompts and targets ---------------------------------------------------------------------
def is_blank(text: str) -> bool:
    """True when ``text`` has nothing but whitespace, control and invisible format characters
    (e.g. a zero-width space or a stray byte-order mark)."""
    return all(ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf") for ch in text)


def check_prompt_texts(prompts: Any) -> None:
    """Refuse string prompts that are empty once invisible characters are removed."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, Tensor) or not isinstance(prompts, Sequence):
        return
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str) and prompt.strip() and is_blank(prompt):
            raise ArgumentError(
                f"Prompt {i} is empty or whitespace only (it holds only invisible characters "
                f"{prompt!r}): remove it, or give it some text."
            )


def check_targets(targets: Any, n_prompts: int | None = None) -> list[str] | None:
    """Targets as a list of non-empty strings, one per prompt, or None."""
    if targets is None:
        return None
    if isinstance(targets, (str, bytes)) or not isinstance(targets, Sequence):
        raise ArgumentTypeError(
            f"targets must be a list of strings (the true next token of each prompt), got "
            f"{type(targets).__name__}: for one prompt, pass [target]."
        )
    out = list(targets)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise ArgumentTypeError(
                f"Target {i} is a {type(t).__name__} ({t!r}), not a string: give the next "
                "token as text, e.g. ' Paris'."
            )
        if t == "":
            raise ArgumentError(
                f"Target {i} is empty: give the true next token as text, e.g. ' Paris'."
            )
    if n_prompts is not None and len(out) != n_prompts:
        raise ArgumentError(f"{len(out)} targets for {n_prompts} prompts: give one each.")
    return out


# -- method options --------------------------------------------------------------------------
def _positive_int(name: str, minimum: int = 1, allow_none: bool = False) -> Callable[[Any], Any]:
    return lambda v: as_int(v, f"option {name}", minimum=minimum, allow_none=allow_none)


def _positive_float(name: str) -> Callable[[Any], Any]:
    return lambda v: as_float(v, f"option {name}", low=0.0)


def method_option_specs(method: str) -> dict[str, tuple[Any, Callable[[Any], Any]]]:
    """The options each method takes: name -> (default, check returning the plain value)."""
    if method == "mask":
        from strace_lens.search.mask_learning import MaskOptions

        d = MaskOptions()
        return {
            "steps": (d.steps, _positive_int("steps")),
            "finetune_steps": (d.finetune_steps, _positive_int("finetune_steps", 0)),
            "sizes_per_step": (d.sizes_per_step, _positive_int("sizes_per_step")),
            "lr": (d.lr, _positive_float("lr")),
            "tau_start": (d.tau_start, _positive_float("tau_start")),
            "tau_end": (d.tau_end, _positive_float("tau_end")),
            "init": (d.init, lambda v: _choice(v, "option init", ("attribution", "zeros"))),
            "relaxation": (
                d.relaxation,
                lambda v: _choice(v, "option relaxation", ("straight-through", "soft")),
            ),
            "refine_rounds": (d.refine_rounds, _positive_int("refine_rounds", 0, True)),
            "refine_width": (d.refine_width, _positive_int("refine_width", 1, True)),
            "grow_width": (d.grow_width, _positive_int("grow_width")),
            "grow_narrow_from": (
                d.grow_narrow_from,
                _positive_int("grow_narrow_from", 0, True),
            ),
            "grow_single_steps": (d.grow_single_steps, _positive_int("grow_single_steps", 0)),
            "grow_gradient": (d.grow_gradient, lambda v: _flag(v, "option grow_gradient")),
            "grow_quiet": (d.grow_quiet, lambda v: _flag(v, "option grow_quiet")),
        }
    if method == "random":
        return {"draws": (5, _positive_int("draws"))}
    if method == "forward":
        return {"max_size": (None, _positive_int("max_size", 1, True))}
    if method == "exhaustive":
        from strace_lens.search.baselines import EXHAUSTIVE_MAX_SUBSETS

        return {"max_subsets": (EXHAUSTIVE_MAX_SUBSETS, _positive_int("max_subsets"))}
    return {}


def check_method_options(method: Any, options: dict[str, Any]) -> dict[str, Any]:
    """Method options with their values checked and made plain (unknown names are left for
    the method itself to refuse, listing the known ones)."""
    specs = method_option_specs(method) if isinstance(method, str) else {}
    from strace_lens.types import METHODS

    unknown = set(options) - set(specs)
    if method in METHODS and unknown:
        raise ArgumentTypeError(
            f"Unknown option(s) for method={method!r}: {sorted(unknown)}; known: {sorted(specs)}."
        )
    out = {}
    for key, value in options.items():
        out[key] = specs[key][1](value) if key in specs else _scalar(value)
    return out


def without_defaults(method: Any, options: dict[str, Any]) -> dict[str, Any]:
    """Drop method options given at their default value (``steps=24`` is the same run as no
    ``steps``)."""
    specs = method_option_specs(method) if isinstance(method, str) else {}
    return {k: v for k, v in options.items() if not (k in specs and v == specs[k][0])}


#: method options added after run folders were first recorded, whose default is the search
#: from before they existed: a run's identity names them only when given away from it, so a
#: folder traced before the option existed still resumes (and keeps its run hash)
LATER_OPTIONS = {"mask": ("grow_quiet",)}


def method_defaults(method: Any) -> dict[str, Any]:
    """The defaults a run's identity records for the options not given (all but
    ``LATER_OPTIONS``)."""
    specs = method_option_specs(method) if isinstance(method, str) else {}
    later = LATER_OPTIONS.get(method, ()) if isinstance(method, str) else ()
    return {k: default for k, (default, _) in specs.items() if k not in later}


# -- trace's arguments -----------------------------------------------------------------------
def _plain_nodes(nodes: Any, name: str) -> Any:
    if nodes is None or isinstance(nodes, (str, Tensor)):
        return nodes
    if not isinstance(nodes, Sequence):
        raise ArgumentTypeError(
            f"{name} must be a list of node names (e.g. 'L0H1', 'MLP2') or indices, got {nodes!r}."
        )
    return [_scalar(n) for n in nodes]


def check_trace_arguments(arguments: dict[str, Any]) -> dict[str, Any]:  # noqa: C901
    """Check and make plain the arguments of ``trace`` (as bound by ``inspect``)."""
    args = dict(arguments)
    granularity = args.get("granularity", "node")
    if "granularity" in args:
        from strace_lens.types import GRANULARITIES

        _choice(granularity, "granularity", GRANULARITIES)
    if "sizes" in args and not (granularity == "edge" and isinstance(args["sizes"], str)):
        args["sizes"] = as_sizes(args["sizes"])  # edge granularity also takes "paper"
    if "seed" in args:
        args["seed"] = as_int(args["seed"], "seed", minimum=0, maximum=2**63 - 1)
    if args.get("batch_size") is not None:
        args["batch_size"] = as_int(args["batch_size"], "batch_size", minimum=1)
    for flag in ("nested", "inverse"):
        if flag in args:
            value = _scalar(args[flag])
            if value is None and flag == "inverse":
                continue  # trace's default: True at node granularity
            if not isinstance(value, bool):
                raise ArgumentTypeError(f"{flag} must be True or False, got {value!r}.")
            args[flag] = value
    for name in ("keep", "candidates"):
        if name in args:
            args[name] = _plain_nodes(args[name], name)
    if "device" in args:
        check_device(args["device"])
    if "targets" in args:
        args["targets"] = check_targets(args["targets"])
    if "prompts" in args:
        check_prompt_texts(args["prompts"])
    if "options" in args and granularity != "edge":  # edge options: EdgeTraceConfig
        method = args.get("method")
        args["options"] = check_method_options(
            "mask" if method is None else method, args["options"]
        )
    return args


@contextmanager
def caller_state_kept() -> Iterator[None]:
    """Run a trace with autograd on and leave the caller's RNGs and grad mode as found."""
    devices: list[int] = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        devices = list(range(torch.cuda.device_count()))
    with torch.random.fork_rng(devices=devices), torch.inference_mode(False), torch.enable_grad():
        yield


def guarded(fn: F) -> F:
    """Check ``trace``'s arguments first, and run it with the caller's global state kept."""
    signature = inspect.signature(fn)
    var_kw = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        arguments = dict(bound.arguments)
        if var_kw is not None and var_kw in arguments:
            arguments["options"] = arguments.pop(var_kw)
        checked = check_trace_arguments(arguments)
        if var_kw is not None and "options" in checked:
            checked[var_kw] = checked.pop("options")
        for key, value in checked.items():
            bound.arguments[key] = value
        with caller_state_kept():
            return fn(*bound.args, **bound.kwargs)

    return wrapper  # type: ignore[return-value]


__all__ = [
    "ArgumentError",
    "ArgumentTypeError",
    "as_float",
    "as_int",
    "caller_state_kept",
    "check_device",
    "check_targets",
    "check_trace_arguments",
    "guarded",
]
