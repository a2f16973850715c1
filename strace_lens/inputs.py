"""Turning prompts into a padded token batch, and finding the position each prompt predicts from.

Strings are tokenised one at a time with the model's own ``to_tokens`` (so a BOS token is
prepended exactly as TransformerLens does) and right-padded: in a causal model, padding after
the real tokens cannot change them, so a batched prompt sees exactly what it sees alone.
Token tensors may come left- or right-padded with an ``attention_mask``; the predicted
position of a row is always its last real token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from strace_lens.hygiene import model_device

Prompts = str | Sequence[str] | Tensor


@dataclass
class TokenBatch:
    """A padded batch of token ids with its attention mask and predicted positions."""

    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    #: index of the last real token of each row: the position whose next token is predicted
    predict_pos: Int[Tensor, " batch"]

    @property
    def is_padded(self) -> bool:
        return bool((self.attention_mask == 0).any())

    @property
    def has_left_padding(self) -> bool:
        """True when some row has padding before a real token (positions must then shift)."""
        # A padding slot is "left" padding when a real token comes after it: compare the mask
        # with its running maximum taken from the right.
        mask = self.attention_mask.long()
        real_later = mask.flip(-1).cummax(-1).values.flip(-1)
        return bool((real_later != mask).any())

    def model_kwargs(self) -> dict[str, Tensor]:
        """Keyword arguments for the model's forward: an attention mask only where needed.

        Right padding cannot change the real tokens of a causal model, so it runs without a
        mask (the fast causal attention path, and bit-for-bit the unpadded computation).
        """
        return {"attention_mask": self.attention_mask} if self.has_left_padding else {}

    @property
    def batch_size(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def real_positions(self) -> Int[Tensor, "batch pos"]:
        """Index of each token within its own prompt (0 at its first real token)."""
        return (self.attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(
            self.tokens.to(device), self.attention_mask.to(device), self.predict_pos.to(device)
        )

    def select(self, rows: Tensor | Sequence[int]) -> TokenBatch:
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.tokens.device)
        return TokenBatch(self.tokens[idx], self.attention_mask[idx], self.predict_pos[idx])

    def repeat_interleave(self, repeats: int) -> TokenBatch:
        """Each row repeated ``repeats`` times in place (row i -> rows i*r .. i*r+r-1)."""
        return TokenBatch(
            self.tokens.repeat_interleave(repeats, 0),
            self.attention_mask.repeat_interleave(repeats, 0),
            self.predict_pos.repeat_interleave(repeats, 0),
        )

    def trimmed(self) -> TokenBatch:
        """Drop columns that are padding in every row (after selecting a subset of rows)."""
        real = self.attention_mask.bool().any(0)
        cols = torch.nonzero(real).flatten()
        if len(cols) == self.tokens.shape[1]:
            return self
        lo, hi = int(cols.min()), int(cols.max()) + 1
        return TokenBatch(
            self.tokens[:, lo:hi], self.attention_mask[:, lo:hi], self.predict_pos - lo
        )


def _context_length(model: Any) -> int | None:
    n_ctx = getattr(model.cfg, "n_ctx", None)
    return int(n_ctx) if n_ctx else None


def _pad_id(model: Any) -> int:
    tokenizer = getattr(model, "tokenizer", None)
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None) if tokenizer is not None else None
        if value is not None:
            return int(value)
    return 0


def tokenize(model: Any, prompts: Prompts, attention_mask: Tensor | None = None) -> TokenBatch:
    """Tokenise prompts (a string, a list of strings, or a token tensor) into a ``TokenBatch``.

    Raises:
        ValueError: for an empty prompt list, an empty or whitespace-only prompt, a prompt
            longer than the model's context, or a malformed token tensor / attention mask.
    """
    device = model_device(model)
    if isinstance(prompts, Tensor):
        return _from_tensor(model, prompts, attention_mask, device)
    if attention_mask is not None:
        raise ValueError("attention_mask is only accepted with a token tensor, not with strings.")
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("The prompt list is empty: pass at least one non-empty string.")
    # Check every prompt before tokenising any, so a bad one fails fast and by its index.
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(
                f"Prompt {i} is a {type(prompt).__name__}, not a string; pass strings or one "
                "token tensor of shape [batch, pos]."
            )
        if not prompt.strip():
            raise ValueError(
                f"Prompt {i} is empty or whitespace only: remove it, or give it some text."
            )
    if getattr(model, "tokenizer", None) is None:
        raise ValueError(
            "This model has no tokenizer, so it cannot read strings: pass token ids "
            "([batch, pos] integer tensor) instead."
        )
    rows: list[Tensor] = []
    n_ctx = _context_length(model)
    for i, prompt in enumerate(prompts):
        ids = model.to_tokens(prompt, truncate=False)[0].to("cpu")
        if n_ctx is not None and len(ids) > n_ctx:
            raise ValueError(
                f"Prompt {i} has {len(ids)} tokens, more than the model's context of {n_ctx}: "
                "shorten it (e.g. keep its last words) before tracing."
            )
        rows.append(ids)
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), _pad_id(model), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        tokens[i, : len(ids)] = ids
        mask[i, : len(ids)] = 1
    lengths = torch.tensor([len(r) for r in rows])
    return TokenBatch(tokens, mask, lengths - 1).to(device)


def _from_tensor(
    model: Any, tokens: Tensor, attention_mask: Tensor | None, device: Any
) -> TokenBatch:
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise TypeError(f"Token ids must be an integer tensor, got dtype {tokens.dtype}.")
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ValueError(
            "Token ids must have shape [batch, pos] with batch, pos >= 1; got "
            f"{tuple(tokens.shape)}."
        )
    n_ctx = _context_length(model)
    if attention_mask is None:
        attention_mask = torch.ones_like(tokens)
    if attention_mask.shape != tokens.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but the tokens have "
            f"{tuple(tokens.shape)}: they must match."
        )
    attention_mask = attention_mask.long()
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token).")
    lengths = attention_mask.sum(-1)
    if bool((lengths == 0).any()):
        row = int(torch.nonzero(lengths == 0)[0])
        raise ValueError(f"Row {row} of the token batch is all padding: remove it.")
    if n_ctx is not None and int(lengths.max()) > n_ctx:
        raise ValueError(
            f"A prompt has {int(lengths.max())} tokens, more than the model's context of "
            f"{n_ctx}: shorten it before tracing."
        )
    pos = torch.arange(tokens.shape[1], device=attention_mask.device)
    predict_pos = (attention_mask * pos).argmax(-1)
    return TokenBatch(tokens, attention_mask, predict_pos).to(device)


def target_token_ids(model: Any, targets: Sequence[str]) -> Int[Tensor, " prompt"]:
    """The token id of each prompt's true next token (text, e.g. ``" his"``): the first token
    ``model.to_tokens`` gives it without a BOS, so a target of several tokens is scored by
    its first one (the next word starts there)."""
    ids = [int(model.to_tokens(t, prepend_bos=False)[0][0]) for t in targets]
    return torch.tensor(ids, dtype=torch.long)
