"""strace-lens: s-Trace on TransformerLens.

For each size s, find the s attention heads and MLPs whose output best approximates the full
model's next-token distribution, every other node ablated through TransformerLens hook points.
The user's path, top to bottom:

    model = strace_lens.load_model("gemma-3-270m")          # models.py
    graph = strace_lens.NodeGraph.from_model(model)          # graph.py
    ablation = strace_lens.MeanAblation.from_prompts(...)    # ablation.py
    logprobs = strace_lens.run_with_mask(model, prompts, mask, ablation)  # masked_forward.py
    strace_lens.kl_divergence(full, logprobs)                # metrics.py
    result = strace_lens.trace(model, prompts)               # trace.py -> result.py
    strace_lens.evaluate(model, prompts, result.masks)       # evaluate.py
    run = strace_lens.trace_dataset(model, prompts, "out/")  # dataset.py: chunked, resumable
    result = strace_lens.load("out/")                        # a saved result or a run folder

Everything is imported on first use (``import strace_lens`` imports neither torch nor
plotly), and so are the subpackages: ``strace_lens.plot.circuit(...)`` and
``strace_lens.analysis.phases(...)`` work after a plain ``import strace_lens``.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "Ablation": "ablation",
    "MeanAblation": "ablation",
    "ZeroAblation": "ablation",
    "load_run": "dataset",
    "trace_dataset": "dataset",
    "Evaluation": "evaluate",
    "evaluate": "evaluate",
    "Node": "graph",
    "NodeGraph": "graph",
    "TokenBatch": "inputs",
    "tokenize": "inputs",
    "load": "loading",
    "run_with_mask": "masked_forward",
    "NUCLEUS_LEVELS": "metrics",
    "entropy": "metrics",
    "fidelity": "metrics",
    "kl_divergence": "metrics",
    "shared_nucleus": "metrics",
    "tv_distance": "metrics",
    "EMBEDDED_MODELS": "models",
    "load_model": "models",
    "prompt_sets": "prompts",
    "read_prompts": "prompts",
    "TraceResult": "result",
    "TokenTraceResult": "token_trace",
    "TraceConfig": "config",
    "trace": "trace",
}

#: subpackages and modules reachable as attributes (imported on first use)
_SUBMODULES = frozenset(
    {
        "ablation",
        "analysis",
        "atomic",
        "cli",
        "config",
        "dataset",
        "edges",
        "evaluate",
        "export",
        "graph",
        "hygiene",
        "inputs",
        "loading",
        "masked_forward",
        "metrics",
        "models",
        "plot",
        "prompts",
        "report",
        "reproduce",
        "result",
        "search",
        "tiny_model",
        "token_trace",
        "trace",
        "types",
    }
)

if TYPE_CHECKING:
    from strace_lens import analysis, plot
    from strace_lens.ablation import Ablation, MeanAblation, ZeroAblation
    from strace_lens.config import TraceConfig
    from strace_lens.dataset import load_run, trace_dataset
    from strace_lens.evaluate import Evaluation, evaluate
    from strace_lens.graph import Node, NodeGraph
    from strace_lens.inputs import TokenBatch, tokenize
    from strace_lens.loading import load
    from strace_lens.masked_forward import run_with_mask
    from strace_lens.metrics import (
        NUCLEUS_LEVELS,
        entropy,
        fidelity,
        kl_divergence,
        shared_nucleus,
        tv_distance,
    )
    from strace_lens.models import EMBEDDED_MODELS, load_model
    from strace_lens.prompts import read_prompts
    from strace_lens.result import TraceResult
    from strace_lens.token_trace import TokenTraceResult
    from strace_lens.trace import trace


def __getattr__(name: str) -> Any:
    """Import a public name's module, or a submodule, on first use (PEP 562)."""
    if name in _EXPORTS:
        module = importlib.import_module(f"strace_lens.{_EXPORTS[name]}")
        value = getattr(module, name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"strace_lens.{name}")
    else:
        raise AttributeError(f"module 'strace_lens' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_SUBMODULES})


#: functions named like the module that defines them: ``strace_lens.trace`` is the function
_SHADOWED = frozenset(name for name in _EXPORTS if name in _SUBMODULES)


class _Package(types.ModuleType):
    """The package module: importing ``strace_lens.trace`` (the module) must not replace the
    attribute ``strace_lens.trace`` (the function), as the import system would."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            return  # the module stays in sys.modules; the attribute is the function
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__all__ = [
    "EMBEDDED_MODELS",
    "NUCLEUS_LEVELS",
    "Ablation",
    "Evaluation",
    "MeanAblation",
    "Node",
    "NodeGraph",
    "TokenBatch",
    "TokenTraceResult",
    "TraceConfig",
    "TraceResult",
    "ZeroAblation",
    "__version__",
    "analysis",
    "entropy",
    "evaluate",
    "fidelity",
    "kl_divergence",
    "load",
    "load_model",
    "load_run",
    "plot",
    "prompt_sets",
    "read_prompts",
    "run_with_mask",
    "shared_nucleus",
    "tokenize",
    "trace",
    "trace_dataset",
    "tv_distance",
]
