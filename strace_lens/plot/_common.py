"""Helpers shared by the figure modules: naming results, collecting them, axis titles."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from strace_lens.result import TraceResult

Results = TraceResult | Sequence[TraceResult] | Mapping[str, TraceResult]


def model_name(result: TraceResult) -> str:
    """The model a result was traced on, as stored in its options ("" when unknown)."""
    model = result.options.get("model", "")
    if isinstance(model, Mapping):
        model = model.get("name", "")
    return str(model or "")


def label(result: TraceResult) -> str:
    """A short legend label: model, method and (for per-dataset masks) ``per-dataset``."""
    parts = [model_name(result), result.method]
    if result.per == "dataset":
        parts.append("per-dataset")
    return " · ".join(p for p in parts if p)


def as_labelled(results: Results) -> list[tuple[str, TraceResult]]:
    """``(label, result)`` pairs from one result, a list, or a ``{label: result}`` mapping.

    Labels made from a list are de-duplicated with a counter, so two runs of the same method
    on the same model stay two legend entries.
    """
    if isinstance(results, TraceResult):
        return [(label(results), results)]
    if isinstance(results, Mapping):
        pairs = [(str(k), v) for k, v in results.items()]
    else:
        pairs = [(label(r), r) for r in results]
    if not pairs:
        raise ValueError("No results to plot: pass a TraceResult, a list or a dict of them.")
    for name, r in pairs:
        if not isinstance(r, TraceResult):
            raise TypeError(f"{name!r} is a {type(r).__name__}, not a TraceResult.")
    seen: dict[str, int] = {}
    out = []
    for name, r in pairs:
        seen[name] = seen.get(name, 0) + 1
        out.append((name if seen[name] == 1 else f"{name} ({seen[name]})", r))
    return out


def axis_token(token: str, n: int = 10) -> str:
    """A token readable on an axis: a leading space as ␣, newlines as ⏎, at most n chars."""
    text = token.replace("\n", "⏎").replace("\t", "⇥")
    if text.startswith(" "):
        text = "␣" + text[1:]
    text = text or "∅"
    return text if len(text) <= n else text[: n - 1] + "…"


def prompt_token_labels(
    prompt: int,
    n_pos: int,
    tokens: Sequence[str] | None,
    model: Any,
    token_ids: Callable[[], list[int]],
) -> list[str]:
    """Axis labels of a prompt's ``n_pos`` traced tokens: ``tokens`` as given, else the
    model's tokenizer decoding ``token_ids()`` (the prompt's ids, tokenised as the trace did),
    else the positions."""
    if tokens is None and model is not None:
        tokens = [model.tokenizer.decode([i]) for i in token_ids()[:n_pos]]
    if tokens is None:
        return [str(t) for t in range(n_pos)]
    if len(tokens) != n_pos:
        raise ValueError(
            f"Prompt {prompt} was traced over {n_pos} tokens but {len(tokens)} token strings "
            "were given: pass the tokens of that prompt, tokenised as the trace did (or "
            "model=, to decode them)."
        )
    return [axis_token(t) for t in tokens]


def short(text: str, n: int = 48) -> str:
    """A prompt shortened for a title: its last ``n`` characters (where the prediction is)."""
    text = " ".join(text.split())
    return text if len(text) <= n else "…" + text[-(n - 1) :]
