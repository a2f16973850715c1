"""Shared fixtures: tiny native models for fast unit tests, embedded models for integration."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from strace_lens.tiny_model import TINY_CONFIG as TINY_MODEL_CONFIG

#: the WikiText prompt set shipped in the package (strace_lens/data/, CC BY-SA 3.0)
DATA = Path(__file__).resolve().parents[1] / "strace_lens" / "data" / "wikitext_40_dev.tsv"

# the package's own test model (strace_lens/tiny_model.py), with a smaller vocabulary so tests
# can draw token ids with torch.randint(0, 50, ...)
TINY_CONFIG = {**TINY_MODEL_CONFIG, "n_ctx": 64, "d_vocab": 50}

#: short prompts for the tiny byte-tokenizer model of the dataset-run and reliability tests
TINY_RUN_PROMPTS = [
    "The cat sat on the",
    "Paris is the capital of",
    "one two three four",
    "In 1999 the band released",
    "She opened the door and",
]
#: small and quick: three sizes (the last is the whole graph), a short optimisation
TINY_RUN_OPTIONS = dict(sizes=[1, 3, 15], steps=3)


def make_tiny(dtype: torch.dtype = torch.float32, **overrides):
    from transformer_lens.model_bridge import TransformerBridge

    cfg = {**TINY_CONFIG, **overrides}
    model = TransformerBridge.boot_native(cfg, dtype=dtype)
    model.eval()
    return model


@pytest.fixture
def tiny():
    """A 3-layer, 4-head native TransformerBridge (15 nodes), fresh for each test."""
    return make_tiny()


@pytest.fixture
def tiny64():
    return make_tiny(torch.float64)


@pytest.fixture
def tiny_tokens():
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 50, (4, 9), generator=gen)


def dev_rows(n: int) -> list[list[str]]:
    rows = [line.rstrip("\n").split("\t") for line in DATA.read_text(encoding="utf-8").splitlines()]
    return rows[:n]


def dev_prompts(n: int) -> list[str]:
    return [row[0] for row in dev_rows(n)]


@pytest.fixture(scope="session")
def gemma():
    import strace_lens

    return strace_lens.load_model("gemma-3-270m", device="cpu")


@pytest.fixture(scope="session")
def smollm2():
    import strace_lens

    return strace_lens.load_model("smollm2-135m", device="cpu")
