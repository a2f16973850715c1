"""Start-layer bands: resumed rows run a few calls of many rows, not many calls of a few.

The nested growth runs each proposal from the current subgraph's residual entering the layer
of its earliest new node (:mod:`strace_lens.search.resumed`). Run grouped by that start
layer, a growth step's few hundred rows become up to one call per layer, of a handful of rows
each, and a forward call has a fixed cost: on a CPU (SmolLM2-135M, 17-token rows, one
thread) one masked row from layer 0 took 0.60 s, two 0.67 s, eight 1.10 s, and from 16 rows
on each row added 0.13 s; from layer 15 on, 0.39 s for one row and 0.067 s for each row
more. So a call of n rows through k blocks costs about k x (n + ``CALL_FIXED_ROWS``)
row-blocks: the fixed part is about three or four rows' worth of work per block.

A band runs all its rows from its lowest start layer. That stays exact: a row whose own
start layer L lies above the band's start B has the mask of the current subgraph on every
layer below L, so blocks B .. L-1 recompute, from the same cached residual and with the
same masks (hooked as in the gradient pass that filled the cache), what that pass computed;
only a kernel's rounding for another row count may differ (0.0 on the tiny test model,
tests/test_bands.py). The bands are chosen to minimise the cost model above, exactly (a
dynamic program over the sorted start layers: with every row in the band of the highest
start at or below its own, bands are runs of consecutive start layers). With
``CALL_FIXED_ROWS = 0`` no two layers share a band (merging only adds blocks): the rows run
grouped by their own start layer, as before bands (what ``benchmarks/strace_speed.py
--unbanded`` compares against).
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Int
from torch import Tensor

#: a forward call's fixed cost per block run, in rows (see the module docstring); 0 turns
#: banding off (the benchmark's side-by-side knob)
CALL_FIXED_ROWS = 3.0


def band_cost(n_rows: int, start: int, n_layers: int, rows_per_call: int, fixed: float) -> float:
    """Cost of ``n_rows`` rows run from block ``start`` in calls of ``rows_per_call`` rows:
    (blocks run) x (rows + ``fixed`` per call)."""
    calls = math.ceil(n_rows / max(1, rows_per_call))
    return (n_layers - start) * (n_rows + fixed * calls)


def start_bands(
    start_layer: Int[Tensor, " row"],
    n_layers: int,
    rows_per_call: int,
    fixed: float | None = None,
) -> Int[Tensor, " row"]:
    """The layer each row runs from: the start of its band, at or below its own
    ``start_layer``. The bands minimise the total ``band_cost`` (``fixed``: default
    ``CALL_FIXED_ROWS``, read at call time)."""
    fixed = CALL_FIXED_ROWS if fixed is None else float(fixed)
    layers, counts = torch.unique(start_layer.cpu(), return_counts=True)
    layer_list, count_list = layers.tolist(), counts.tolist()
    k = len(layer_list)
    # best[i]: least cost of the rows of the first i start layers; cut[i]: where the last
    # band of that optimum begins (bands are runs of consecutive start layers)
    best = [0.0] + [math.inf] * k
    cut = [0] * (k + 1)
    for i in range(1, k + 1):
        rows = 0
        for j in range(i - 1, -1, -1):  # the last band: start layers j .. i-1
            rows += count_list[j]
            cost = best[j] + band_cost(rows, layer_list[j], n_layers, rows_per_call, fixed)
            if cost < best[i]:
                best[i], cut[i] = cost, j
    band_of_layer: dict[int, int] = {}
    i = k
    while i > 0:
        j = cut[i]
        for layer in layer_list[j:i]:
            band_of_layer[layer] = layer_list[j]
        i = j
    return torch.tensor([band_of_layer[int(s)] for s in start_layer.cpu().tolist()],
                        dtype=torch.long)  # fmt: skip


__all__ = ["CALL_FIXED_ROWS", "band_cost", "start_bands"]
