"""Usage: how often each node is part of the subgraph, across prompts, at each size.

The frequency of a node at size s is the fraction of mask rows (prompts, for per-input
masks) whose size-s subgraph holds it. Its inequality over the candidate nodes is summarised
by the Gini coefficient (0: every node used equally often; (n-1)/n: one node in every
subgraph and no other ever) and drawn as a Lorenz curve (nodes sorted from least to most used;
cumulative share of nodes versus cumulative share of uses).

Note that a per-dataset result has a single row, so its frequencies are 0 or 1 and its Gini
is simply 1 - s/n at size s: usage is informative for per-input results.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from strace_lens.analysis._stats import gini, lorenz_points
from strace_lens.result import TraceResult


def _frequencies(result: TraceResult) -> tuple[torch.Tensor, torch.Tensor]:
    order = result.size_order()
    freq = result.masks[:, order].double().mean(0)  # [S, N]
    return freq[:, result.candidates], order


def usage(result: TraceResult) -> pd.DataFrame:
    """Per (size, candidate node): ``frequency`` of use over mask rows, with the node's layer
    and kind, and ``gini`` of that size's frequencies."""
    freq, order = _frequencies(result)
    cand = torch.nonzero(result.candidates).flatten().tolist()
    names = [result.graph.names[i] for i in cand]
    layers = result.graph.layers[cand].numpy()
    kinds = ["attn" if bool(result.graph.is_attn[i]) else "mlp" for i in cand]
    frames = []
    for j, s in enumerate(result.sizes[order].tolist()):
        f = freq[j].numpy()
        frames.append(
            pd.DataFrame(
                {
                    "size": s,
                    "relative_size": s / max(result.n_candidates, 1),
                    "node": names,
                    "layer": layers,
                    "kind": kinds,
                    "frequency": f,
                    "gini": gini(f),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def lorenz(result: TraceResult) -> pd.DataFrame:
    """Lorenz curve points per size: ``node_share`` (x) and ``usage_share`` (y), n + 1 points
    from (0, 0) to (1, 1), and the size's ``gini``."""
    freq, order = _frequencies(result)
    frames = []
    for j, s in enumerate(result.sizes[order].tolist()):
        f = freq[j].numpy()
        x, y = lorenz_points(f)
        frames.append(
            pd.DataFrame(
                {
                    "size": s,
                    "relative_size": s / max(result.n_candidates, 1),
                    "node_share": x,
                    "usage_share": y,
                    "gini": gini(f),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def gini_by_size(result: TraceResult) -> pd.DataFrame:
    """One line per size: ``size``, ``relative_size``, ``gini``, ``n_used`` (nodes used at
    least once), ``top_node`` and its ``top_frequency``."""
    freq, order = _frequencies(result)
    cand = torch.nonzero(result.candidates).flatten().tolist()
    rows = []
    for j, s in enumerate(result.sizes[order].tolist()):
        f = freq[j].numpy()
        top = int(np.argmax(f))
        rows.append(
            {
                "size": s,
                "relative_size": s / max(result.n_candidates, 1),
                "gini": gini(f),
                "n_used": int((f > 0).sum()),
                "top_node": result.graph.names[cand[top]],
                "top_frequency": float(f[top]),
            }
        )
    return pd.DataFrame(rows)
