"""A tiny randomly initialised model with a byte-level tokenizer, for tests (``native:tiny``).

``strace-lens trace --model native:tiny`` uses it so that the command line (resume after a
kill, bad inputs, ...) can be tested end to end in seconds, with string prompts, without an
embedded model. Its weights are seeded, so every process builds exactly the same model. It
predicts nothing meaningful: it is a test model, not a language model.

The tokenizer maps each UTF-8 byte to one token (ids 3..258) after a BOS token (id 0), with
no merges, so any text tokenises and the vocabulary is 259 tokens.
"""

from __future__ import annotations

from typing import Any

import torch

#: Model names that select this test model.
TINY_MODEL_NAMES = ("native:tiny",)

TINY_CONFIG: dict[str, Any] = dict(
    n_layers=3,
    d_model=32,
    n_ctx=256,
    d_head=8,
    n_heads=4,
    d_mlp=64,
    d_vocab=259,
    act_fn="gelu",
    normalization_type="LN",
    seed=0,
)


def byte_tokenizer() -> Any:
    """A Hugging Face fast tokenizer with one token per byte plus <bos>, <eos>, <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<bos>": 0, "<eos>": 1, "<pad>": 2}
    for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet())):
        vocab[char] = 3 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        add_bos_token=True,
        # TransformerLens re-reads the tokenizer's init kwargs and needs this key.
        name_or_path="strace-lens-tiny",
    )


def tiny_model(
    device: str | torch.device | None = None, dtype: torch.dtype = torch.float32, **overrides: Any
) -> Any:
    """The ``native:tiny`` test model: 3 layers x 4 heads (15 nodes), byte tokenizer, seed 0."""
    from transformer_lens.model_bridge import TransformerBridge

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = {**TINY_CONFIG, **overrides}
    # boot_native is attached to the class at import time, which mypy cannot see.
    boot = getattr(TransformerBridge, "boot_native")  # noqa: B009
    model = boot(cfg, tokenizer=byte_tokenizer(), device=device, dtype=dtype)
    model.cfg.model_name = "native:tiny"
    model.eval()
    return model


__all__ = ["TINY_CONFIG", "TINY_MODEL_NAMES", "byte_tokenizer", "tiny_model"]
