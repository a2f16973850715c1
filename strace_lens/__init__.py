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
    run = strace_lens.trace_dataset(model, prompts, "out/")  # dataset.py: chunked, resumable
"""

from strace_lens.ablation import Ablation, MeanAblation, ZeroAblation
from strace_lens.dataset import load_run, trace_dataset
from strace_lens.graph import Node, NodeGraph
from strace_lens.inputs import TokenBatch, tokenize
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
from strace_lens.prompts import prompt_sets, read_prompts
from strace_lens.result import TraceResult
from strace_lens.trace import trace

__version__ = "0.1.0"

__all__ = [
    "EMBEDDED_MODELS",
    "NUCLEUS_LEVELS",
    "Ablation",
    "MeanAblation",
    "Node",
    "NodeGraph",
    "TokenBatch",
    "TraceResult",
    "ZeroAblation",
    "__version__",
    "entropy",
    "fidelity",
    "kl_divergence",
    "load_model",
    "load_run",
    "prompt_sets",
    "read_prompts",
    "run_with_mask",
    "shared_nucleus",
    "tokenize",
    "trace",
    "trace_dataset",
    "tv_distance",
]
