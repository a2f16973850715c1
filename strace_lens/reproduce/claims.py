"""The paper's claims as data: what each measures, its confidence interval and its verdict.

Verdicts come only from the numbers, by the rule printed in the report (see :func:`verdict`):
a claim *holds* when its whole confidence interval lies on the side the paper predicts, *does
not hold* when the whole interval lies on the other side (or on the null value), and is
*inconclusive* otherwise or when too few prompts contribute.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from strace_lens import analysis as an
from strace_lens.analysis._stats import DEFAULT_BOOT
from strace_lens.result import TraceResult

#: Fewer contributing prompts than this and every verdict is "inconclusive".
MIN_PROMPTS = 10


#: "Small" core: below this fraction of the candidate nodes (see the report's rules).
SMALL_CORE = 0.1


HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"


# -- verdicts ------------------------------------------------------------------------------
def verdict(
    ci_low: float, ci_high: float, predicted: str, null: float, n: int, min_n: int = MIN_PROMPTS
) -> str:
    """The verdict on a claim that predicts a statistic ``greater`` or ``less`` than ``null``.

    holds: the whole interval is strictly on the predicted side; does not hold: the whole
    interval is on the other side or on the null itself; inconclusive: the interval straddles
    the null, is undefined, or fewer than ``min_n`` prompts contribute.
    """
    if predicted not in ("greater", "less"):
        raise ValueError(f"predicted must be 'greater' or 'less', got {predicted!r}.")
    if n < min_n or np.isnan(ci_low) or np.isnan(ci_high):
        return INCONCLUSIVE
    if predicted == "greater":
        if ci_low > null:
            return HOLDS
        return FAILS if ci_high <= null else INCONCLUSIVE
    if ci_high < null:
        return HOLDS
    return FAILS if ci_low >= null else INCONCLUSIVE


def claim(
    claim: str,
    figure: str,
    stats: Mapping[Any, Any],
    estimate_key: str,
    predicted: str,
    null: float,
    min_n: int,
    model: str,
) -> dict[str, Any]:
    n = int(stats.get("n", 0))
    return {
        "model": model,
        "claim": claim,
        "figure": figure,
        "estimate": stats[estimate_key],
        "ci_low": stats["ci_low"],
        "ci_high": stats["ci_high"],
        "p_value": stats.get("p_value", np.nan),
        "n": n,
        "predicted": f"{'>' if predicted == 'greater' else '<'} {null:g}",
        "verdict": verdict(stats["ci_low"], stats["ci_high"], predicted, null, n, min_n),
    }


# -- what a reproduction produces ------------------------------------------------------------
@dataclass
class ModelRun:
    """The traces and tables of one model."""

    name: str
    identity: dict[str, Any]
    mask: TraceResult
    random: TraceResult
    tables: dict[str, pd.DataFrame]
    claims: pd.DataFrame
    seconds: dict[str, float]


@dataclass
class Reproduction:
    """What :func:`reproduce` returns: the report's path, its claims and every table."""

    out_dir: Path
    report: Path
    runs: list[ModelRun]
    claims: pd.DataFrame
    agreement: pd.DataFrame | None = None
    settings: dict[str, Any] = field(default_factory=dict)


# -- analyses of one model ---------------------------------------------------------------------
def analyse(
    mask: TraceResult,
    random: TraceResult | None,
    counts: Any,
    core_nucleus: float = 1.0,
    refined_nucleus: float = 90.0,
    n_boot: int = DEFAULT_BOOT,
    seed: int = 0,
) -> dict[str, pd.DataFrame]:
    """Every analysis of one model's traces, as named tables."""
    tables: dict[str, pd.DataFrame] = {
        "density": an.density(mask),
        "recovery": an.nucleus_recovery(mask),
        "recovery_per_prompt": an.recovery_sizes(mask),
        "composition": an.composition(mask),
        "phases": an.phases(mask, core_nucleus, refined_nucleus),
        "usage": an.usage(mask),
        "gini": an.gini_by_size(mask),
        "lorenz": an.lorenz(mask),
        "uncertainty": an.uncertainty(mask, n_boot=n_boot, seed=seed),
        "unigram": an.unigram(mask, counts, n_boot=n_boot, seed=seed),
        "curves": an.baselines(mask, random),
    }
    if random is not None:
        tables["random_density"] = an.density(random)
        tables["random_recovery"] = an.nucleus_recovery(random)
        tables["random_composition"] = an.composition(random)
        tables["baseline_gap"] = an.baseline_gap(mask, random, n_boot=n_boot, seed=seed)
    return tables


def _grid_lower_bounds(mask: TraceResult, upper: np.ndarray) -> np.ndarray:
    """The smallest relative size each traced value could stand for: one node above the
    traced size below it (a value beyond the grid: one node above the largest size)."""
    n = mask.n_candidates
    sizes = mask.sizes.double().numpy()
    below = np.concatenate([[0.0], sizes])  # the traced size under each grid point
    idx = np.searchsorted(sizes, np.round(np.minimum(upper, 1.0) * n))
    lower = (below[idx] + 1) / n
    return np.where(np.isinf(upper), (sizes[-1] + 1) / n, lower)


def claims_of(
    mask: TraceResult,
    tables: dict[str, pd.DataFrame],
    counts: Any,
    model: str,
    n_boot: int = DEFAULT_BOOT,
    seed: int = 0,
    min_n: int = MIN_PROMPTS,
    small_core: float = SMALL_CORE,
) -> pd.DataFrame:
    """One row per claim of the paper (and the sanity checks), with figure, CI and verdict."""
    rows: list[dict[str, Any]] = []
    ph = tables["phases"]
    per_row = ph[ph["row"] != "all"]
    core = per_row[per_row["phase"] == "core"].set_index("row")
    ref = per_row[per_row["phase"] == "refinement"].set_index("row")
    # 1a. core size: prompts without a core count as +inf (beyond the grid). The grid only
    # brackets a core: it lies between the traced size below it (exclusive) and its own, so
    # the interval runs from the lower ends' lower bound to the upper ends' upper bound; a
    # threshold that falls inside one grid step cannot then be decided either way.
    reached = core["reached"].astype(bool).to_numpy()
    core_rel = np.where(reached, core["end_relative_size"], np.inf)
    stats = dict(an.median_ci(core_rel, n_boot, seed=seed))
    lower = an.median_ci(_grid_lower_bounds(mask, core_rel), n_boot, seed=seed)
    stats["ci_low"] = lower["ci_low"]
    rows.append(
        claim(
            "1a. Two phases: a small subgraph already reproduces the full model's top-1 token",
            "median relative size of the core (smallest traced subgraph sharing the top-1 "
            "token); interval widened to the grid step below each core",
            stats,
            "median",
            "less",
            small_core,
            min_n,
            model,
        )
    )
    base_depth = float(tables["composition"]["base_mean_depth"].iloc[0])
    stats = an.mean_ci(base_depth - core["mean_depth"].to_numpy(), n_boot, seed=seed)
    rows.append(
        claim(
            "1b. Two phases: the core is made of early-layer nodes",
            "mean over prompts of (mean depth of all candidates - mean depth of the core); "
            "depth 0 = first layer, 1 = last",
            stats,
            "mean",
            "greater",
            0.0,
            min_n,
            model,
        )
    )
    both = core.index.intersection(ref.index)
    depth_gap = ref.loc[both, "mean_depth"].to_numpy() - core.loc[both, "mean_depth"].to_numpy()
    stats = an.mean_ci(depth_gap, n_boot, seed=seed)
    rows.append(
        claim(
            "1c. Two phases: refinement nodes lie in later layers than the core",
            "mean over prompts of (refinement mean depth - core mean depth)",
            stats,
            "mean",
            "greater",
            0.0,
            min_n,
            model,
        )
    )
    attn_gap = ref.loc[both, "attn_share"].to_numpy() - core.loc[both, "attn_share"].to_numpy()
    stats = an.mean_ci(attn_gap, n_boot, seed=seed)
    rows.append(
        claim(
            "1d. Two phases: the refinement is richer in attention heads than the core",
            "mean over prompts of (refinement attention share - core attention share)",
            stats,
            "mean",
            "greater",
            0.0,
            min_n,
            model,
        )
    )
    unc = tables["uncertainty"].set_index("against")
    rows.append(
        claim(
            "2a. Density follows uncertainty: density rises with the full model's entropy",
            "Spearman rho(density, entropy) over prompts",
            unc.loc["entropy"].to_dict(),
            "rho",
            "greater",
            0.0,
            min_n,
            model,
        )
    )
    if unc.loc["loss"].to_dict()["n"] > 0:
        rows.append(
            claim(
                "2b. Density follows uncertainty: density rises with the loss on the true "
                "next word",
                "Spearman rho(density, -log p(true next token)) over prompts",
                unc.loc["loss"].to_dict(),
                "rho",
                "greater",
                0.0,
                min_n,
                model,
            )
        )
    # 3. sparse subgraphs: every size up to small_core of the candidates, top-1 token
    uni = tables["unigram"]
    sparse_sizes = uni[(uni["k"] == 1) & (uni["relative_size"] <= small_core)]["size"].tolist()
    if not sparse_sizes:
        sparse_sizes = [int(uni["size"].min())]
    diffs = _sparse_rank_diffs(mask, an.frequency_ranks(counts), sparse_sizes)
    stats = an.mean_ci(diffs, n_boot, seed=seed)
    rows.append(
        claim(
            "3. Sparse subgraphs favour frequent tokens",
            "mean over prompts of log10 frequency rank of the sparse subgraphs' top-1 token "
            f"minus the full model's (sizes {sparse_sizes}; < 0: more frequent)",
            stats,
            "mean",
            "less",
            0.0,
            min_n,
            model,
        )
    )
    # sanity checks of the search itself
    if "baseline_gap" in tables:
        gap = tables["baseline_gap"].iloc[0].to_dict()
        gap["mean"] = gap["gap"]
        rows.append(
            claim(
                "S1. Sanity: learned subgraphs beat random ones of equal size",
                "mean over prompts of density(random) - density(trace)",
                gap,
                "mean",
                "greater",
                0.0,
                min_n,
                model,
            )
        )
    if "inv_tv" in mask.metrics:
        inv = an.density(mask, "inv_tv")["density"].to_numpy()
        stats = an.mean_ci(inv - tables["density"]["density"].to_numpy(), n_boot, seed=seed)
        rows.append(
            claim(
                "S2. Sanity: removing the subgraph (its inverse) hurts more than keeping only it",
                "mean over prompts of density(inverse) - density(trace)",
                stats,
                "mean",
                "greater",
                0.0,
                min_n,
                model,
            )
        )
    return pd.DataFrame(rows)


def _sparse_rank_diffs(mask: TraceResult, ranks: np.ndarray, sizes: list[int]) -> np.ndarray:
    """Per prompt: mean over ``sizes`` of log10 rank(subgraph top-1) - log10 rank(full top-1)."""
    full = np.log10(ranks[mask.full_top_tokens[:, 0].numpy()])
    cols = [mask.size_index(s) for s in sizes]
    sub = np.log10(ranks[mask.top_tokens[:, cols, 0].numpy()])  # [P, len(sizes)]
    return np.asarray(sub.mean(1) - full)


__all__ = [
    "FAILS",
    "HOLDS",
    "INCONCLUSIVE",
    "MIN_PROMPTS",
    "SMALL_CORE",
    "ModelRun",
    "Reproduction",
    "analyse",
    "claim",
    "claims_of",
    "verdict",
]
