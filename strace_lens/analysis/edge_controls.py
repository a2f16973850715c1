"""The claims' random-subgraph controls at edge granularity.

The same controls as :mod:`strace_lens.analysis.controls`, read off ``EdgeTraceResult``s: the
traced family (greedy or learned) and ``method="random"`` on the same prompts and size grid
(one uniformly drawn edge subgraph per prompt and size).

- :func:`edge_uncertainty_controls` (2a; 2b when given the loss on the true next token):
  density against the full model's entropy (and loss) for the traced subgraphs, for the
  random ones, and traced with random partialled out (partial Spearman,
  :func:`strace_lens.analysis.partial_spearman_ci`), for both density measures of
  :func:`strace_lens.analysis.edge_density`: ``auc`` (the paper's TV x decades) and
  ``density`` (per decade).
- :func:`edge_agreement_controls` (2c): the same three lines across two models, prompts
  matched by text.
- :func:`sparse_rank_diffs` (3): per prompt, the mean log10 frequency rank of the sparse
  subgraphs' top-1 token minus the full model's, for the traced or the random family.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from jaxtyping import Float

from strace_lens.analysis._stats import DEFAULT_BOOT
from strace_lens.analysis.controls import correlation_lines, cross_model_lines
from strace_lens.analysis.edge_density import edge_density
from strace_lens.edges.result import EdgeTraceResult

#: the two density measures of edge_density: the paper's area and the per-decade density
MEASURES = ("auc", "density")


def check_same_prompts(result: EdgeTraceResult, random: EdgeTraceResult) -> None:
    """The random control must cover the traced prompts, in order, on the same grid."""
    if result.prompts != random.prompts or result.grid != random.grid:
        raise ValueError(
            "The random control was traced on other prompts or another size grid than the "
            "traced family: trace both with the same prompts and sizes."
        )
    if not bool((result.counts == random.counts).all()):
        raise ValueError(
            "The random control's subgraph sizes differ from the traced family's (another "
            "token convention?): trace both with the same options."
        )


def edge_uncertainty_controls(
    result: EdgeTraceResult,
    random: EdgeTraceResult,
    n_boot: int = DEFAULT_BOOT,
    ci: float = 0.95,
    seed: int = 0,
    loss: Float[np.ndarray, " prompt"] | None = None,
) -> pd.DataFrame:
    """Density against entropy (2a), and against ``loss`` (2b) when given: traced, random
    subgraphs, and traced | random.

    ``loss``: the full model's loss on each prompt's true next token, in the run's prompt
    order (:func:`strace_lens.edges.edge_target_loss`). One line per (``against`` in
    entropy / loss, ``measure`` in auc / density, ``statistic`` in traced / random /
    partial). Columns: ``measure``, ``against``, ``statistic``, ``rho``, ``ci_low``,
    ``ci_high``, ``p_value``, ``n``, ``ci``.
    """
    check_same_prompts(result, random)
    traced, rand = edge_density(result), edge_density(random)
    uncertainty = {"entropy": traced["entropy"].to_numpy(dtype=float)}
    if loss is not None:
        if len(loss) != result.n_prompts:
            raise ValueError(
                f"{len(loss)} losses for {result.n_prompts} traced prompts: give one per prompt."
            )
        uncertainty["loss"] = np.asarray(loss, dtype=float)
    rows = []
    for against, values in uncertainty.items():
        for measure in MEASURES:
            lines = correlation_lines(
                traced[measure].to_numpy(dtype=float),
                rand[measure].to_numpy(dtype=float),
                values,
                n_boot,
                ci,
                seed,
            )
            rows += [{"measure": measure, "against": against, **line} for line in lines]
    out = pd.DataFrame(rows)
    out["n"] = out["n"].astype(int)
    return out


def edge_agreement_controls(
    result_a: EdgeTraceResult,
    random_a: EdgeTraceResult,
    result_b: EdgeTraceResult,
    random_b: EdgeTraceResult,
    n_boot: int = DEFAULT_BOOT,
    ci: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Cross-model agreement of per-prompt density (each measure): traced, random, partial.

    Prompts matched by text. Columns: ``measure``, ``statistic``, ``rho``, ``ci_low``,
    ``ci_high``, ``p_value``, ``n``, ``ci``.
    """
    check_same_prompts(result_a, random_a)
    check_same_prompts(result_b, random_b)
    tables = [
        edge_density(r).drop_duplicates("text").set_index("text")
        for r in (result_a, random_a, result_b, random_b)
    ]
    common = [t for t in tables[0].index if t in tables[2].index]
    if len(common) < 3:
        raise ValueError(
            f"The two models share {len(common)} prompt(s) (matched by text): agreement needs "
            "at least 3 (the partial line, 5). Trace the same prompts with both models."
        )
    rows = []
    for measure in MEASURES:
        da, ra, db, rb = (np.asarray(t.loc[common, measure], dtype=float) for t in tables)
        rows += [
            {"measure": measure, **line}
            for line in cross_model_lines(da, ra, db, rb, n_boot, ci, seed)
        ]
    out = pd.DataFrame(rows)
    out["n"] = out["n"].astype(int)
    return out


def sparse_rank_diffs(
    result: EdgeTraceResult, ranks: Float[np.ndarray, " vocab"], max_size: float
) -> Float[np.ndarray, " prompt"]:
    """Per prompt: the mean over its non-empty subgraphs of grid size up to ``max_size`` of
    log10 rank(subgraph's top-1 token) - log10 rank(full model's); NaN when it has none."""
    full = np.log10(ranks[result.full_top_tokens.numpy()])
    diff = np.log10(ranks[result.top_tokens.numpy()]) - full[:, None]  # [P, S]
    sparse = np.array([s <= max_size * (1 + 1e-9) for s in result.grid])
    keep = (result.counts.numpy() > 0) & sparse[None]
    with np.errstate(invalid="ignore"):
        mean = np.where(keep, diff, 0.0).sum(1) / keep.sum(1)
    return np.where(keep.any(1), mean, np.nan)


__all__ = [
    "MEASURES",
    "check_same_prompts",
    "edge_agreement_controls",
    "edge_uncertainty_controls",
    "sparse_rank_diffs",
]
