"""The full model's loss on each prompt's true next token, for an edge run already traced.

Edge traces record the full model's output distribution through its entropy and top tokens,
not the loss on a true next token (``trace(..., granularity="edge")`` takes no targets). So
claim 2b reads the loss afterwards: one clean forward of the model per chunk of the run's
prompts, tokenised by the run's own token convention (``result.options["tokens"]``), the log-
probability of each target's first token (:func:`strace_lens.inputs.target_token_ids`, as at
node granularity) at the last position. The run itself is neither retraced nor changed.

The clean forward must be the run's full model: its entropy is compared with the one the run
recorded (the all-edges row of the masked forward, equal to the model's own forward up to
float rounding), and a mismatch, another model or token convention, is an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Float

from strace_lens.edges.result import EdgeTraceResult
from strace_lens.edges.tokens import edge_tokenize
from strace_lens.hygiene import model_untouched
from strace_lens.inputs import target_token_ids
from strace_lens.masked_forward import check_finite, forward_logprobs
from strace_lens.metrics import entropy

#: how far (nats) the clean forward's entropy may lie from the run's record: float rounding
#: of a batched against a masked forward is ~1e-5 in float32; another model is far beyond
ENTROPY_TOLERANCE = 1e-2


def edge_target_loss(
    model: Any,
    result: EdgeTraceResult,
    targets: Sequence[str],
    chunk_size: int = 32,
) -> Float[np.ndarray, " prompt"]:
    """Per prompt of ``result``: -log p(true next token) under the full ``model`` (nats).

    ``targets`` holds one true next token (text) per traced prompt, in order. Raises
    ValueError when their number differs, or when ``model`` is not the run's full model.
    """
    if len(targets) != result.n_prompts:
        raise ValueError(
            f"{len(targets)} targets for the run's {result.n_prompts} prompts: give one true "
            "next token per traced prompt, in the run's order."
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}.")
    tokens = result.options.get("tokens", "paper")
    ids = target_token_ids(model, targets)
    losses, entropies = [], []
    for start in range(0, result.n_prompts, chunk_size):
        batch = edge_tokenize(model, result.prompts[start : start + chunk_size], tokens)
        with model_untouched(model), torch.no_grad():
            logp = forward_logprobs(model, batch, [])
        check_finite(logp, "the full model's output")
        chunk_ids = ids[start : start + chunk_size].to(logp.device)
        losses.append(-logp.gather(-1, chunk_ids[:, None])[:, 0].double().cpu())
        entropies.append(entropy(logp).double().cpu())
    gap = (torch.cat(entropies) - result.entropy.double()).abs()
    if bool((gap > ENTROPY_TOLERANCE).any()):
        p = int(gap.argmax())
        raise ValueError(
            f"The model's clean forward is not the run's full model: on prompt {p} its entropy "
            f"differs from the run's record by {float(gap[p]):.3g} nats (more than "
            f"{ENTROPY_TOLERANCE:g}). Pass the model (and weights) the run was traced with."
        )
    return torch.cat(losses).numpy()


__all__ = ["ENTROPY_TOLERANCE", "edge_target_loss"]
