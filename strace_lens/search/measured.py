"""Rows a search has already run, read back by the evaluation instead of run a second time.

The nested growth measures every proposal of a size with its hard mask and keeps the best;
at a grid size that winner is exactly the subgraph the evaluation scores next. Its
log-probs are kept here, keyed by (prompt, node mask), and the evaluation reads them back.

What a row read back differs in. A row's log-probs depend on its own mask, the cached
residual it may resume from, whether a hook ran at the layers where it keeps every node,
and, on a CPU, the batch it ran in (the matrix kernels round differently for different row
counts: on SmolLM2 one mask's log-probs moved by 1e-4 between a batch of 1 and one of 8
rows). The hooks are matched: a hook that keeps a node computes ``v + 1 * (z - v)``, which
under a mean ablation may differ from ``z`` in the last bit, and a layer is hooked when any
row of the batch ablates a node there (``masked_forward.hooked_layers``); so each kept row
records the layers hooked when it ran, and is read back only where the evaluation's batch
hooks the same layers among those the row keeps whole (where it ablates a node, both batches
hook the layer; layers a resumed row skipped count as hooked, since its residual comes from
the growth's gradient pass, which hooks every layer). The batch cannot be matched: on the
tiny test model the read-back metrics are bit-identical to a re-run (tests/test_golden.py,
tests/test_measured.py), on SmolLM2 they differed by at most 1.6e-5 nats of KL and in the
shared nucleus of 1-2 of 48 (prompt, size) pairs (benchmarks/measured_rows.py,
docs/search-quality.md), against up to 7.6e-6 nats and no nucleus for a change of
``batch_size`` alone in the same run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Float
from torch import Tensor

#: at most this many bytes of log-probs are kept: 16 prompts x 11 grid sizes of
#: Gemma-3-270M's 262k-token vocabulary take 185 MB; beyond it, rows are run again
MEASURED_BYTES_CAP = 512 * 2**20


@dataclass(frozen=True)
class MeasuredRow:
    """One row's log-probs and the layers hooked when it ran."""

    logp: Float[Tensor, " vocab"]
    hooked: Bool[Tensor, " layer"]


@dataclass
class MeasuredRows:
    """Log-probs of hard-mask rows by (prompt, node mask), up to ``cap_bytes``."""

    nodes_per_layer: int
    cap_bytes: int = MEASURED_BYTES_CAP
    rows: dict[tuple[int, bytes], MeasuredRow] = field(default_factory=dict)
    n_bytes: int = 0
    #: rows handed back by ``get``
    reused: int = 0

    @staticmethod
    def key(prompt: int, node_mask: Tensor) -> tuple[int, bytes]:
        return int(prompt), bytes(node_mask.detach().bool().cpu().numpy().tobytes())

    def add(
        self,
        prompt: int,
        node_mask: Float[Tensor, " node"],
        logp: Float[Tensor, " vocab"],
        hooked: Bool[Tensor, " layer"],
    ) -> None:
        """Keep a hard mask's log-probs on ``prompt`` (the first ones given, within the cap)."""
        key = self.key(prompt, node_mask)
        size = logp.numel() * logp.element_size()
        if key in self.rows or self.n_bytes + size > self.cap_bytes:
            return
        self.rows[key] = MeasuredRow(logp.detach().clone(), hooked.detach().cpu().clone())
        self.n_bytes += size

    def get(
        self,
        prompt: int,
        node_mask: Float[Tensor, " node"],
        hooked: Bool[Tensor, " layer"],
    ) -> Float[Tensor, " vocab"] | None:
        """The kept log-probs of this row, if it ran with the hooks ``hooked`` gives it on
        every layer whose nodes it keeps (None otherwise: run it)."""
        row = self.rows.get(self.key(prompt, node_mask))
        if row is None:
            return None
        per_layer = node_mask.detach().cpu().reshape(-1, self.nodes_per_layer)
        kept_whole = (per_layer == 1).all(-1)
        if not torch.equal(row.hooked[kept_whole], hooked.cpu()[kept_whole]):
            return None
        self.reused += 1
        return row.logp


__all__ = ["MEASURED_BYTES_CAP", "MeasuredRow", "MeasuredRows"]
