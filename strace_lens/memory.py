"""How many rows a masked forward pass takes when the user gives no ``batch_size``.

The rows per pass are chosen from the free memory of the model's device and an estimate of
the bytes one row needs, and lowered by halving when a pass runs out of memory anyway
(``SubgraphObjective`` retries the pass; see ``is_out_of_memory``).

The estimate, per row of ``width`` tokens, for the pass that needs the most: a forward with a
gradient to the masks, which keeps every layer's activations for the backward pass. Per
token and layer it counts, in the model's dtype, the residual stream and its norms (8 x
d_model), queries, keys, values, attention outputs and their hooked copies (4 x n_heads x
d_head), the attention scores and pattern (2 x n_heads x width) and the MLP's hidden
activations (gate, up, activation, product: 4 x d_mlp); per row, the unembedded position's
logits, log-probs and KL terms in float32 (6 x d_vocab). What it leaves out (allocator
slack, the backward pass's own temporaries, the mask and ablation tensors, the cached
residual stream of the growth) is what ``SAFETY_FACTOR`` = 2 and using only
``MEMORY_FRACTION`` = 1/2 of the free memory are for: a row is budgeted 4x its estimate.

Caps: on a GPU at most ``GPU_TOKENS_PER_PASS`` tokens per pass (a larger batch hardly runs
faster and makes each retry dearer); on the CPU at most ``CPU_TOKENS_PER_PASS`` (2048, the
default before memory was read: a CPU is not faster with larger batches, and CPU results
then stay those of earlier versions bit for bit), lowered only where memory is short.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

#: tokens (rows x padded width) per pass at most, on the CPU and on an accelerator
CPU_TOKENS_PER_PASS = 2048
GPU_TOKENS_PER_PASS = 65536
#: the estimate of ``row_bytes`` is multiplied by this (what it leaves out: module docstring)
SAFETY_FACTOR = 2.0
#: the share of the free memory the passes may fill (the rest: other tensors, other jobs)
MEMORY_FRACTION = 0.5
MEMINFO = Path("/proc/meminfo")


def row_bytes(model: Any, width: int) -> int:
    """Estimated bytes one row of ``width`` tokens needs in a forward with a gradient to the
    masks (module docstring), before ``SAFETY_FACTOR``."""
    cfg = model.cfg
    d_model = int(cfg.d_model)
    n_heads = int(cfg.n_heads)
    d_head = int(getattr(cfg, "d_head", 0) or d_model // n_heads)
    d_mlp = int(getattr(cfg, "d_mlp", 0) or 4 * d_model)
    d_vocab = int(getattr(cfg, "d_vocab", 0) or 0)
    dtype_bytes = next(model.parameters()).element_size()
    per_token_layer = 8 * d_model + 4 * n_heads * d_head + 2 * n_heads * width + 4 * d_mlp
    activations = width * int(cfg.n_layers) * per_token_layer * dtype_bytes
    return activations + 6 * d_vocab * 4


def free_bytes(device: torch.device) -> int | None:
    """Free memory of ``device`` in bytes: CUDA's ``mem_get_info``, the CPU's MemAvailable
    from /proc/meminfo; None where it cannot be read (other accelerators, other systems)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        return _meminfo_available(MEMINFO)
    return None


def _meminfo_available(path: Path) -> int | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024  # the figure is in kB
    return None


def rows_per_pass(model: Any, width: int, device: torch.device, free: int | None) -> int:
    """Rows per masked forward of ``width``-token rows on ``device`` with ``free`` bytes free
    (``free_bytes``; None: the device's token cap alone decides)."""
    width = max(int(width), 1)
    tokens = CPU_TOKENS_PER_PASS if device.type == "cpu" else GPU_TOKENS_PER_PASS
    rows = max(1, tokens // width)
    if free is not None:
        budget = free * MEMORY_FRACTION / SAFETY_FACTOR
        rows = min(rows, int(budget // row_bytes(model, width)))
    return max(1, rows)


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` says that memory ran out (CUDA's OutOfMemoryError, a CPU allocation
    failure, Python's MemoryError)."""
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


def release_cached_memory(device: torch.device) -> None:
    """Hand the CUDA caching allocator's free blocks back before a smaller retry."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


__all__ = [
    "CPU_TOKENS_PER_PASS",
    "GPU_TOKENS_PER_PASS",
    "MEMORY_FRACTION",
    "SAFETY_FACTOR",
    "free_bytes",
    "is_out_of_memory",
    "release_cached_memory",
    "row_bytes",
    "rows_per_pass",
]
