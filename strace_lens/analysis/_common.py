"""Small helpers shared by the analyses: sorted size grids, per-row nucleus, quartiles."""

from __future__ import annotations

import numpy as np
from jaxtyping import Float
from torch import Tensor

from strace_lens.result import TraceResult


def sorted_sizes(result: TraceResult) -> tuple[Tensor, Tensor]:
    """The size grid in increasing order, and the permutation that sorts it."""
    order = result.size_order()
    return result.sizes[order], order


def row_nucleus(result: TraceResult) -> Float[Tensor, "row size"]:
    """Shared nucleus per mask row (columns in the result's own size order).

    A per-input result has one row per prompt; a per-dataset result has one row, the mean
    over prompts of each size's shared nucleus.
    """
    nucleus = result.metrics["nucleus"].double()
    if result.masks.shape[0] == nucleus.shape[0]:
        return nucleus
    return nucleus.mean(0, keepdim=True)


def layer_quartile(result: TraceResult) -> Tensor:
    """Quartile (0..3) of each node's layer: layer l of L falls in quartile floor(4 l / L)."""
    layers = result.graph.layers
    return (4 * layers) // result.graph.n_layers


def relative_depth(result: TraceResult) -> Tensor:
    """Each node's layer scaled to [0, 1] (0 = first layer, 1 = last)."""
    n = result.graph.n_layers
    return result.graph.layers.double() / max(n - 1, 1)


def to_numpy(x: Tensor) -> np.ndarray:
    return x.detach().cpu().double().numpy()
