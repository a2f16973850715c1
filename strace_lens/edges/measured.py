"""Rows the learned edge search has already run, read back by the evaluation.

The merge of ``method="mask"`` (:func:`~strace_lens.edges.learned.merge_nested`) measures,
at every grid size, the hard subgraph it keeps, and the final ranking's prefix of that size
*is* that subgraph; the search also runs each prompt's all-edges reference row. The
evaluation of :func:`~strace_lens.edges.trace.edge_trace` scores exactly those prefixes
against exactly that reference, so it reads their log-probs back instead of running them a
second time (the node search does the same, :mod:`strace_lens.search.measured`). Every
grid size that keeps at least one edge and not all of them is a merged size, so the learned
curve's evaluation runs only the sizes that keep no edge (``int(s * E) = 0``).

What a row read back differs in: only the batch it ran in. Every edge-masked forward hooks
every layer the same way whatever its masks (:func:`~strace_lens.edges.forward.edge_hooks`),
so, unlike the node read-back, there is no hook condition; but the merge ran a size's rows
with other candidates and other prompts (right-padded), the evaluation one prompt's sizes
together, and on a CPU the matrix kernels round differently for different batch shapes.
On the tiny model that changes no bit (tests/test_edge_read_back.py, float64 and float32);
on SmolLM2 and Gemma-3-270M (float32, 4 prompts, both semantics) TV moved by at most 2.0e-6
and KL by 1.1e-5 nats, no shared nucleus or top-1 token (benchmarks/edge_learned.py,
docs/edge-learned.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from strace_lens.edges.learned import LearnedOrder


@dataclass(frozen=True)
class MeasuredPrefixes:
    """Log-probs of one prompt's measured prefixes of ``order``, by prefix length; the
    length ``len(order)`` (every edge) is the search's all-edges reference row."""

    order: Int[Tensor, " edge"]
    logp: dict[int, Tensor]

    @property
    def full(self) -> Float[Tensor, " vocab"]:
        """The all-edges reference row."""
        return self.logp[len(self.order)]

    def get(self, ids: Int[Tensor, " k"]) -> Float[Tensor, " vocab"] | None:
        """The kept log-probs of the subgraph ``ids`` if it is the prefix of ``order`` of its
        length, in order (as :func:`edge_trace` forms it), and that prefix was measured."""
        logp = self.logp.get(len(ids))
        if logp is None or not torch.equal(ids.to(self.order.dtype), self.order[: len(ids)]):
            return None
        return logp

    @classmethod
    def from_fit(cls, fit: LearnedOrder) -> MeasuredPrefixes | None:
        """The rows :func:`~strace_lens.edges.learned.learned_nested_orders` measured for
        ``fit``: its reference row and (with the merge) every merged size's subgraph, which
        is ``fit.order``'s prefix of that size. None if the search kept no reference row."""
        if fit.logp_full is None:
            return None
        logp = {len(fit.order): fit.logp_full}
        if fit.merge is not None:
            for count, row in zip(fit.merge.counts.tolist(), fit.merge.logp):
                logp[int(count)] = row
        return cls(fit.order, logp)


__all__ = ["MeasuredPrefixes"]
