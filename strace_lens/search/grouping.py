"""Which prompts share a subgraph: the one place that knows what ``per`` means.

``per="input"``: every prompt is its own group (a subgraph per prompt and size).
``per="dataset"``: all prompts form one group (a subgraph per size, scored by the mean KL).

A search works on *groups* (one score vector, one mask per size each) and runs *rows* (a
(prompt, mask) pair each); ``RowGrouping`` maps between them: the rows a group's masks expand
to, the weight of each row in its group's objective, and a group's KL as the mean over its
prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from strace_lens.search.objective import LogpSink, SubgraphObjective
from strace_lens.types import Per


@dataclass(frozen=True)
class RowGrouping:
    """How ``n_prompts`` prompts form groups that share one subgraph per size."""

    per: Per
    n_prompts: int

    @property
    def shared(self) -> bool:
        """True when all prompts share one group (``per="dataset"``)."""
        return self.per == "dataset"

    @property
    def n_groups(self) -> int:
        return 1 if self.shared else self.n_prompts

    @property
    def group_size(self) -> int:
        """Prompts per group."""
        return self.n_prompts if self.shared else 1

    def group_of_prompt(self) -> Int[Tensor, " prompt"]:
        """The group each prompt belongs to."""
        prompts = torch.arange(self.n_prompts)
        return torch.zeros_like(prompts) if self.shared else prompts

    def prompt_weights(self) -> Float[Tensor, " prompt"]:
        """Each prompt's weight in its group's objective: 1 / (prompts in the group)."""
        return torch.ones(self.n_prompts) / self.group_size

    def pool(self, per_prompt: Float[Tensor, "prompt ..."]) -> Float[Tensor, "group ..."]:
        """Per-prompt values summed into their group (e.g. gradients of the group's KL)."""
        return per_prompt.sum(0, keepdim=True) if self.shared else per_prompt

    def pair_rows(self, n_sizes: int) -> tuple[Int[Tensor, " row"], Int[Tensor, " row"]]:
        """One row per (prompt, size) of every group: ``(pair, prompt)`` of each row, where
        pair ``g * n_sizes + j`` is group g's subgraph of grid size j."""
        if not self.shared:
            pairs = torch.arange(self.n_prompts * n_sizes)
            return pairs, torch.arange(self.n_prompts).repeat_interleave(n_sizes)
        pairs = torch.arange(n_sizes).repeat_interleave(self.n_prompts)
        return pairs, torch.arange(self.n_prompts).repeat(n_sizes)

    def group_kl(
        self,
        objective: SubgraphObjective,
        masks: Bool[Tensor, "trial cand"],
        group: Int[Tensor, " trial"],
        start_layer: Int[Tensor, " trial"] | None = None,
        cache: Float[Tensor, "prompt layer pos d_model"] | None = None,
        sink: LogpSink | None = None,
    ) -> Float[Tensor, " trial"]:
        """Exact KL of each candidate mask for its group: its prompt's KL, or the mean KL over
        all prompts when they share one group. With ``start_layer`` and ``cache``, each
        trial runs from its prompts' cached residual at its start layer (``objective.kl``).
        ``sink`` (one prompt per group only) sees each chunk's trial indices and log-probs."""
        device = objective.logp_full.device
        if not self.shared:
            full = objective.full_mask(masks.float().to(device))
            return objective.kl(full, group.to(device), start_layer, cache, sink).cpu()
        if sink is not None:
            raise ValueError("sink is for one prompt per group (per='input') only.")
        n_p = self.n_prompts
        rows = masks.repeat_interleave(n_p, 0)
        prompts = torch.arange(n_p).repeat(len(masks))
        starts = None if start_layer is None else start_layer.repeat_interleave(n_p)
        full = objective.full_mask(rows.float().to(device))
        kl = objective.kl(full, prompts.to(device), starts, cache).cpu()
        return kl.reshape(len(masks), n_p).mean(-1)


def as_grouping(per: Per | RowGrouping, n_prompts: int) -> RowGrouping:
    """A grouping from ``per`` ("input" or "dataset"), or the grouping itself."""
    if isinstance(per, RowGrouping):
        return per
    if per not in ("input", "dataset"):
        raise ValueError(f"Unknown per={per!r}; choose one of input, dataset.")
    return RowGrouping(per, n_prompts)


__all__ = ["RowGrouping", "as_grouping"]
