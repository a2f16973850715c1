"""Composition versus size: which kinds of nodes, and from which layers, the subgraphs hold.

Shares are over the *candidate* nodes of each subgraph (nodes every subgraph keeps are not
counted), averaged over mask rows (prompts, or the one per-dataset row). Layer quartiles:
layer l of L lies in quartile floor(4 l / L) + 1, so with L = 18 quartile 1 is layers 0-4.
``new_*`` columns describe only the nodes that enter at that size (in the subgraph of this
size and not of the previous one), which is where "later nodes are increasingly attention
heads" shows; ``base_*`` columns are the shares among all candidates, the value a random
subgraph would have on average.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from strace_lens.analysis._common import layer_quartile, relative_depth
from strace_lens.result import TraceResult


def _shares(masks: torch.Tensor, result: TraceResult) -> dict[str, np.ndarray]:
    """Mean over rows of each share, for masks ``[R, S, N]``; NaN where a subgraph is empty."""
    m = masks.double()
    count = m.sum(-1)  # [R, S]
    safe = count.clamp(min=1)

    def share(weights: torch.Tensor) -> np.ndarray:
        s = (m * weights.double()).sum(-1) / safe
        s = torch.where(count > 0, s, torch.nan)
        return torch.nanmean(s, 0).numpy()

    quart = layer_quartile(result)
    out = {
        "attn_share": share(result.graph.is_attn),
        "mlp_share": share(~result.graph.is_attn),
        "mean_depth": share(relative_depth(result)),
    }
    for q in range(4):
        out[f"q{q + 1}_share"] = share(quart == q)
    out["n_nodes"] = count.mean(0).numpy()
    return out


def composition(result: TraceResult) -> pd.DataFrame:
    """Per size: attention / MLP shares, layer-quartile shares and mean relative depth.

    Columns: ``size``, ``relative_size``, ``attn_share``, ``mlp_share``, ``mean_depth``,
    ``q1_share`` .. ``q4_share`` (the subgraph), the same with a ``new_`` prefix (nodes
    entering at this size) and ``base_attn_share``, ``base_q1_share`` .. (all candidates).
    """
    order = result.size_order()
    masks = result.masks[:, order] & result.candidates
    previous = torch.zeros_like(masks)
    previous[:, 1:] = masks[:, :-1]
    new = masks & ~previous
    frame = pd.DataFrame(
        {
            "size": result.sizes[order].numpy(),
            "relative_size": result.relative_sizes[order].numpy(),
        }
    )
    for name, values in _shares(masks, result).items():
        frame[name] = values
    for name, values in _shares(new, result).items():
        frame[f"new_{name}"] = values
    base = _shares(result.candidates[None, None], result)
    for name in ("attn_share", "mean_depth", "q1_share", "q2_share", "q3_share", "q4_share"):
        frame[f"base_{name}"] = float(base[name][0])
    frame["method"] = result.method
    return frame
