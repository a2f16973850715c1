"""Tokenising prompts for the edge graph, where the number of tokens fixes every edge count.

Conventions:

- ``"paper"`` (the default at edge granularity): the prompt as the model's original Hugging
  Face tokenizer encodes it by default: no BOS for SmolLM2, ``<bos>`` for Gemma 3. The
  embedded SmolLM2 is read from a GGUF file whose tokenizer *does* add a BOS (id 1, measured),
  unlike the original ``HuggingFaceTB/SmolLM2-135M`` tokenizer, so for the two embedded
  models the BOS is set from :data:`PAPER_BOS`; other models keep their tokenizer's default.
- ``"hf"``: exactly what ``model.tokenizer(prompt)`` returns.
- ``"transformer_lens"``: ``model.to_tokens``, what strace-lens uses at node granularity (it
  prepends a BOS to SmolLM2 prompts, which adds a token and changes every edge count).

Rows are right-padded, so a row's first T positions are its prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from strace_lens.inputs import TokenBatch, tokenize

TokenConvention = Literal["paper", "hf", "transformer_lens"]

#: whether the original Hugging Face tokenizer of an embedded model adds a BOS by default
PAPER_BOS: dict[str, bool] = {"smollm2-135m": False, "gemma-3-270m": True}


def hf_ids(model: Any, prompt: str, convention: TokenConvention = "paper") -> list[int]:
    tokenizer = model.tokenizer
    ids = [int(i) for i in tokenizer(prompt)["input_ids"]]
    if convention == "hf":
        return ids
    want_bos = PAPER_BOS.get(str(getattr(model.cfg, "model_name", "")))
    bos = tokenizer.bos_token_id
    if want_bos is None or bos is None:
        return ids
    has_bos = bool(ids) and ids[0] == bos
    if want_bos and not has_bos:
        return [int(bos), *ids]
    if not want_bos and has_bos:
        return ids[1:]
    return ids


def edge_tokenize(
    model: Any, prompts: str | Sequence[str], convention: TokenConvention = "paper"
) -> TokenBatch:
    """Right-padded token rows of ``prompts`` under the given convention."""
    if convention == "transformer_lens":
        return tokenize(model, prompts)
    if convention not in ("paper", "hf"):
        raise ValueError(
            f"Unknown token convention {convention!r}: 'paper', 'hf' or 'transformer_lens'."
        )
    if isinstance(prompts, str):
        prompts = [prompts]
    if getattr(model, "tokenizer", None) is None:
        raise ValueError("This model has no tokenizer: pass token ids to the masked forward.")
    rows = [hf_ids(model, p, convention) for p in prompts]
    if any(not r for r in rows):
        raise ValueError("A prompt tokenises to no token at all: remove it.")
    width = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, ids in enumerate(rows):
        tokens[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
    return tokenize(model, tokens, mask)
