"""``TokenObjective``: the search objective with every (component, position) pair as a unit.

Every search method of :mod:`strace_lens.search` works on a ``SubgraphObjective``: masks over
``n_nodes`` units in layer order, scored by KL against the full model. At token granularity
the units of one prompt are the flattened ``[node, pos]`` pairs of its
:class:`~strace_lens.edges.token_level.TokenGraph` (node-major: unit ``node * n_pos + pos``),
and a mask runs through ``token_hooks``. So the learned nested growth, the independent
fine-tuning, the local searches, random draws and the exhaustive search run unchanged.

Units are positions of the prompt, so all prompts of one objective have the same length
(``n_pos``, no padding): ``token_trace`` builds one objective per prompt length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from strace_lens.edges.token_level import TokenGraph, token_hooks
from strace_lens.inputs import TokenBatch
from strace_lens.search.objective import SubgraphObjective
from strace_lens.skipped_mlps import kept_rows_by_layer


@dataclass
class TokenObjective(SubgraphObjective):
    """Scores token masks ``[row, node * n_pos]`` of same-length prompts (see module doc)."""

    granularity: ClassVar[str] = "token"

    #: the prompts' common token count (the batch must hold exactly that, without padding)
    n_pos: int = 0

    def __post_init__(self) -> None:
        width = int(self.batch.tokens.shape[1])
        if self.n_pos < 1 or width != self.n_pos or bool((self.batch.attention_mask == 0).any()):
            raise ValueError(
                f"A TokenObjective needs prompts of exactly n_pos={self.n_pos} tokens without "
                f"padding; the batch is {width} wide"
                f"{' with padding' if bool((self.batch.attention_mask == 0).any()) else ''}: "
                "select the prompts of one length and trim the batch."
            )
        if len(self.candidates) != len(self.token_graph):
            raise ValueError(
                f"candidates has {len(self.candidates)} entries; the token graph of "
                f"{self.n_pos} positions has {len(self.token_graph)} units."
            )
        super().__post_init__()  # the measured-rows store, keyed by this objective's units

    @property
    def token_graph(self) -> TokenGraph:
        return TokenGraph(self.graph.n_layers, self.graph.n_heads, self.n_pos)

    @property
    def n_nodes(self) -> int:
        return len(self.token_graph)

    @property
    def units_per_layer(self) -> int:
        return self.graph.nodes_per_layer * self.n_pos

    def hooks(
        self, masks: Tensor, rows: TokenBatch, hooked: Tensor | None = None
    ) -> list[tuple[str, Any]]:
        return token_hooks(self.token_graph, masks, self.ablation, rows)

    def mlp_kept_rows(self, masks: Tensor) -> dict[int, Tensor]:
        """The rows keeping each layer's MLP at some position (a row ablating it at every
        position skips it, :mod:`strace_lens.skipped_mlps`)."""
        if masks.shape[0] == 0:
            return {}
        graph = self.token_graph
        units = masks.detach().reshape(masks.shape[0], graph.n_layers, graph.n_heads + 1, -1)
        return kept_rows_by_layer((units[:, :, graph.n_heads] != 0).any(-1))

    def hooked_layers(self, masks: Tensor) -> Tensor:
        """``token_hooks`` hooks every layer, whatever the masks."""
        return torch.ones(self.token_graph.n_layers, dtype=torch.bool)


__all__ = ["TokenObjective"]
