"""Sparse subgraphs and shallow statistics: how frequent are the tokens small subgraphs predict?

Reference counts. Token frequencies are counted over a reference corpus tokenised with the
model's tokenizer, without special tokens: by default the traced prompts themselves; or any
text file (one text per non-empty line), list of strings, or token-id tensor.

Frequency rank. Rank 1 is the most frequent token of the corpus; tied counts share their
average rank; every token absent from the corpus gets rank ``n_seen + 1`` (one below the
rarest seen token: the corpus cannot order them further, and giving them the bottom of a
262k vocabulary would let a few unseen tokens dominate every mean).

Comparison. For every size and k in {1, 5}, the mean frequency rank (and the mean log10 rank)
of the subgraph's top-k tokens, against the full model's top-k on the same prompts, with the
per-prompt paired difference in mean log10 rank (subgraph minus full; negative: the subgraph
favours more frequent tokens) and its bootstrap interval.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Int
from scipy import stats
from torch import Tensor

from strace_lens.analysis._stats import DEFAULT_BOOT, mean_ci
from strace_lens.result import TraceResult

Corpus = str | os.PathLike[str] | Sequence[str] | Tensor


def _texts(corpus: str | os.PathLike[str] | Sequence[str]) -> list[str]:
    if isinstance(corpus, (str, os.PathLike)):
        path = Path(corpus)
        if not path.is_file():
            raise FileNotFoundError(
                f"No reference corpus file at {path}: give a text file (one text a line), a "
                "list of strings, or None to count the prompts' own tokens."
            )
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [str(t) for t in corpus]


def token_counts(
    model: Any, corpus: Corpus | None = None, prompts: Sequence[str] | None = None
) -> Int[Tensor, " vocab"]:
    """How often each token id occurs in the reference corpus (default: ``prompts``).

    ``model`` supplies the tokenizer (``model.tokenizer``) and the vocabulary size
    (``model.cfg.d_vocab``). A token tensor corpus is counted as is and needs no tokenizer.
    """
    vocab = int(model.cfg.d_vocab)
    if corpus is None:
        if prompts is None:
            raise ValueError("Give a reference corpus, or the prompts whose tokens to count.")
        corpus = list(prompts)
    if isinstance(corpus, Tensor):
        ids = corpus.flatten().long()
    else:
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(
                "This model has no tokenizer, so text cannot be counted: pass the corpus as a "
                "tensor of token ids."
            )
        encoded = tokenizer(_texts(corpus), add_special_tokens=False)["input_ids"]
        ids = torch.tensor([t for row in encoded for t in row], dtype=torch.long)
    if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"Token ids must lie in [0, {vocab}) for this model's vocabulary.")
    return torch.bincount(ids, minlength=vocab)


def frequency_ranks(counts: Tensor | np.ndarray) -> np.ndarray:
    """Frequency rank of every token id (1 = most frequent; ties averaged; unseen n_seen+1)."""
    c = np.asarray(counts, dtype=float)
    seen = c > 0
    ranks = np.full(len(c), float(seen.sum() + 1))
    ranks[seen] = stats.rankdata(-c[seen], method="average")
    return ranks


def unigram(
    result: TraceResult,
    counts: Tensor | np.ndarray,
    ks: Sequence[int] = (1, 5),
    n_boot: int = DEFAULT_BOOT,
    ci: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Per (size, k): frequency rank of the subgraphs' top-k tokens versus the full model's.

    ``counts``: token counts over the reference corpus (see :func:`token_counts`).
    Columns: ``size``, ``relative_size``, ``k``, ``mean_rank``, ``median_rank``,
    ``mean_log10_rank``, ``frac_unseen``, ``full_mean_rank``, ``full_mean_log10_rank``,
    ``full_frac_unseen``, ``diff_log10_rank`` (mean over prompts of subgraph minus full, per
    prompt averaged over its top-k), ``diff_ci_low``, ``diff_ci_high``, ``diff_p_value``,
    ``frac_same_top`` (prompts whose top-k list equals the full model's), ``n``.
    """
    ranks = frequency_ranks(counts)
    n_seen_plus_1 = float((np.asarray(counts) > 0).sum() + 1)
    order = result.size_order()
    top = result.top_tokens[:, order].numpy()  # [P, S, K]
    full_top = result.full_top_tokens.numpy()  # [P, K]
    if top.max(initial=0) >= len(ranks) or full_top.max(initial=0) >= len(ranks):
        raise ValueError(
            f"The result's tokens exceed the counts' vocabulary of {len(ranks)}: count with "
            "the model the result was traced on."
        )
    rows = []
    for k in ks:
        if k > top.shape[-1] or k > full_top.shape[-1]:
            raise ValueError(
                f"k={k} but the result kept only the top {min(top.shape[-1], full_top.shape[-1])}"
                " tokens."
            )
        full_r = ranks[full_top[:, :k]]  # [P, k]
        full_log = np.log10(full_r).mean(1)
        for j, s in enumerate(result.sizes[order].tolist()):
            sub_r = ranks[top[:, j, :k]]  # [P, k]
            sub_log = np.log10(sub_r).mean(1)
            diff = mean_ci(sub_log - full_log, n_boot, ci, seed)
            rows.append(
                {
                    "size": s,
                    "relative_size": s / max(result.n_candidates, 1),
                    "k": k,
                    "mean_rank": float(sub_r.mean()),
                    "median_rank": float(np.median(sub_r)),
                    "mean_log10_rank": float(sub_log.mean()),
                    "frac_unseen": float((sub_r == n_seen_plus_1).mean()),
                    "full_mean_rank": float(full_r.mean()),
                    "full_mean_log10_rank": float(full_log.mean()),
                    "full_frac_unseen": float((full_r == n_seen_plus_1).mean()),
                    "diff_log10_rank": diff["mean"],
                    "diff_ci_low": diff["ci_low"],
                    "diff_ci_high": diff["ci_high"],
                    "diff_p_value": diff["p_value"],
                    "frac_same_top": float((top[:, j, :k] == full_top[:, :k]).all(1).mean()),
                    "n": result.n_prompts,
                }
            )
    return pd.DataFrame(rows)
