"""The paper's claims as data: what each measures, its confidence interval and its verdict.

Verdicts come only from the numbers, by the rule printed in the report (see :func:`verdict`):
a claim *holds* when its whole confidence interval lies on the side the paper predicts, *does
not hold* when the whole interval lies on the other side (or on the null value), and is
*inconclusive* otherwise or when too few prompts contribute. A claim against a threshold
(1a) is *undetermined* when an end of its interval falls exactly on the threshold.

Besides the paper's claims (role ``claim``) and the sanity checks (``sanity``), the table
holds controls: ``control`` rows re-test a claim against what it would show without the
effect it names (judged like a claim), ``reference`` rows give the control's own figure (e.g.
the same correlation for random subgraphs; judged by the same rule, for information, and
left out of the multiplicity correction). Every judged row's p-value is Holm-adjusted over
the whole table (``p_holm``), and ``verdict_holm`` demotes a *holds* whose adjusted p-value
is not below ``ALPHA`` to *inconclusive*.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from strace_lens import analysis as an
from strace_lens.analysis._stats import DEFAULT_BOOT, holm
from strace_lens.result import TraceResult

#: Fewer contributing prompts than this and every verdict is "inconclusive".
MIN_PROMPTS = 10


#: "Small" core: below this fraction of the candidate nodes (see the report's rules).
SMALL_CORE = 0.1


HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"
UNDETERMINED = "undetermined"

#: Family-wise error rate of the Holm correction (matching the 95 % intervals).
ALPHA = 0.05

#: What a row of the claims table is (see the module docstring).
CLAIM, SANITY, CONTROL, REFERENCE = "claim", "sanity", "control", "reference"

#: The claims table's columns, in order.
COLUMNS = [
    "model",
    "id",
    "role",
    "claim",
    "figure",
    "estimate",
    "ci_low",
    "ci_high",
    "p_value",
    "p_holm",
    "n",
    "predicted",
    "verdict",
    "verdict_holm",
]


#: A claim row to build: (id, role, claim, figure, stats, estimate key, predicted, null).
Spec = tuple[str, str, str, str, Mapping[Any, Any], str, str, float]


# -- verdicts ------------------------------------------------------------------------------
def verdict(
    ci_low: float,
    ci_high: float,
    predicted: str,
    null: float,
    n: int,
    min_n: int = MIN_PROMPTS,
    touching: bool = False,
) -> str:
    """The verdict on a claim that predicts a statistic ``greater`` or ``less`` than ``null``.

    holds: the whole interval is strictly on the predicted side; does not hold: the whole
    interval is on the other side or on the null itself; inconclusive: the interval straddles
    the null, is undefined, or fewer than ``min_n`` prompts contribute. With ``touching``
    (a threshold claim, 1a), an interval with an end exactly on ``null`` is *undetermined*:
    a value on the threshold is neither below nor clearly above it.
    """
    if predicted not in ("greater", "less"):
        raise ValueError(f"predicted must be 'greater' or 'less', got {predicted!r}.")
    if n < min_n or np.isnan(ci_low) or np.isnan(ci_high):
        return INCONCLUSIVE
    if touching and (_on(ci_low, null) or _on(ci_high, null)):
        return UNDETERMINED
    if predicted == "greater":
        if ci_low > null:
            return HOLDS
        return FAILS if ci_high <= null else INCONCLUSIVE
    if ci_high < null:
        return HOLDS
    return FAILS if ci_low >= null else INCONCLUSIVE


def _on(value: float, null: float) -> bool:
    """``value`` equals ``null`` up to rounding (9/90 is the threshold 0.1)."""
    return bool(np.isfinite(value) and np.isclose(value, null, rtol=1e-9, atol=1e-12))


def claim(
    claim: str,
    figure: str,
    stats: Mapping[Any, Any],
    estimate_key: str,
    predicted: str,
    null: float,
    min_n: int,
    model: str,
    *,
    key: str = "",
    role: str = CLAIM,
    touching: bool = False,
) -> dict[str, Any]:
    """One row of the claims table (``p_holm`` and ``verdict_holm`` come from
    :func:`with_multiplicity`, over the whole table)."""
    n = int(stats.get("n", 0))
    return {
        "model": model,
        "id": key,
        "role": role,
        "claim": claim,
        "figure": figure,
        "estimate": stats[estimate_key],
        "ci_low": stats["ci_low"],
        "ci_high": stats["ci_high"],
        "p_value": stats.get("p_value", np.nan),
        "p_holm": np.nan,
        "n": n,
        "predicted": f"{'>' if predicted == 'greater' else '<'} {null:g}",
        "verdict": verdict(stats["ci_low"], stats["ci_high"], predicted, null, n, min_n, touching),
        "verdict_holm": "",
    }


def with_multiplicity(claims: pd.DataFrame, alpha: float = ALPHA) -> pd.DataFrame:
    """The claims table with ``p_holm`` (Holm-adjusted over every judged row) and
    ``verdict_holm`` (a *holds* whose adjusted p-value is not below ``alpha`` becomes
    *inconclusive*; reference rows are outside the family: ``verdict_holm`` "reference")."""
    out = claims.copy()
    judged = (out["role"] != REFERENCE).to_numpy()
    p = np.where(judged, out["p_value"].astype(float).to_numpy(), np.nan)
    out["p_holm"] = holm(p)
    after = []
    for is_judged, v, ph in zip(judged, out["verdict"], out["p_holm"]):
        if not is_judged:
            after.append(REFERENCE)
        elif v == HOLDS and not ph < alpha:
            after.append(INCONCLUSIVE)
        else:
            after.append(v)
    out["verdict_holm"] = after
    return out[COLUMNS + [c for c in out.columns if c not in COLUMNS]]


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
    agreement_controls: pd.DataFrame | None = None


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
        "core_depth_by_kind": an.core_depth_by_kind(mask, core_nucleus),
        "refinement_base_rate": an.refinement_base_rate(mask, core_nucleus, refined_nucleus),
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
        tables["uncertainty_controls"] = an.uncertainty_controls(
            mask, random, n_boot=n_boot, seed=seed
        )
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


def sign_test(lower: np.ndarray, upper: np.ndarray, threshold: float) -> float:
    """Two-sided sign test of "the median lies below ``threshold``" on bracketed values.

    A value known only to lie in [lower, upper] counts below when ``upper < threshold``,
    above when ``lower > threshold``, and as a tie (dropped) when its bracket reaches the
    threshold; the p-value is the binomial test of below against above at 1/2 (NaN when
    every value is a tie).
    """
    below = int((upper < threshold).sum())
    above = int((lower > threshold).sum())
    if below + above == 0:
        return float("nan")
    return float(scipy_stats.binomtest(below, below + above, 0.5).pvalue)


def claim_rows(
    specs: Sequence[Spec],
    min_n: int,
    model: str,
) -> list[dict[str, Any]]:
    """Claim rows from ``(key, role, claim, figure, stats, estimate_key, predicted, null)``."""
    return [
        claim(text, figure, stats, est, pred, null, min_n, model, key=key, role=role)
        for key, role, text, figure, stats, est, pred, null in specs
    ]


def _core_size_claim(
    mask: TraceResult,
    core: pd.DataFrame,
    n_boot: int,
    seed: int,
    min_n: int,
    small_core: float,
    model: str,
) -> dict[str, Any]:
    """1a: prompts without a core count as +inf (beyond the grid). The grid only brackets a
    core: it lies between the traced size below it (exclusive) and its own, so the interval
    runs from the lower ends' lower bound to the upper ends' upper bound; a threshold that
    falls inside one grid step cannot then be decided either way, and one on an end of the
    interval is undetermined."""
    reached = core["reached"].astype(bool).to_numpy()
    core_rel = np.where(reached, core["end_relative_size"], np.inf)
    stats = dict(an.median_ci(core_rel, n_boot, seed=seed))
    lower_ends = _grid_lower_bounds(mask, core_rel)
    lower = an.median_ci(lower_ends, n_boot, seed=seed)
    stats["ci_low"] = lower["ci_low"]
    stats["p_value"] = sign_test(lower_ends, core_rel, small_core)
    return claim(
        "1a. Two phases: a small subgraph already reproduces the full model's top-1 token",
        "median relative size of the core (smallest traced subgraph sharing the top-1 "
        "token); interval widened to the grid step below each core; p: sign test against "
        "the threshold",
        stats,
        "median",
        "less",
        small_core,
        min_n,
        model,
        key="1a",
        touching=True,
    )


def _phase_claims(
    tables: dict[str, pd.DataFrame], n_boot: int, seed: int, min_n: int, model: str
) -> list[dict[str, Any]]:
    """1b-1d and their controls: depth per node kind, attention share against its base rate."""
    ph = tables["phases"]
    per_row = ph[ph["row"] != "all"]
    core = per_row[per_row["phase"] == "core"].set_index("row")
    ref = per_row[per_row["phase"] == "refinement"].set_index("row")
    base_depth = float(tables["composition"]["base_mean_depth"].iloc[0])
    both = core.index.intersection(ref.index)
    depth_gap = ref.loc[both, "mean_depth"].to_numpy() - core.loc[both, "mean_depth"].to_numpy()
    attn_gap = ref.loc[both, "attn_share"].to_numpy() - core.loc[both, "attn_share"].to_numpy()
    kinds = tables["core_depth_by_kind"]
    excess = tables["refinement_base_rate"]["excess"].to_numpy()

    def mean(values: Any) -> dict[str, float]:
        return an.mean_ci(values, n_boot, seed=seed)

    def by_kind(kind: str) -> dict[str, float]:
        return mean(kinds[kinds["kind"] == kind]["depth_gap"].to_numpy())

    specs: list[Spec] = [
        ("1b", CLAIM, "1b. Two phases: the core is made of early-layer nodes",
         "mean over prompts of (mean depth of all candidates - mean depth of the core); "
         "depth 0 = first layer, 1 = last",
         mean(base_depth - core["mean_depth"].to_numpy()), "mean", "greater", 0.0),
        ("1b.mlp", CONTROL, "Control of 1b: the core's MLPs lie earlier than the average MLP",
         "mean over prompts whose core has MLPs of (mean depth of all candidate MLPs - mean "
         "depth of the core's MLPs)", by_kind("mlp"), "mean", "greater", 0.0),
        ("1b.attn", CONTROL,
         "Control of 1b: the core's attention heads lie earlier than the average head",
         "mean over prompts whose core has heads of (mean depth of all candidate heads - mean "
         "depth of the core's heads)", by_kind("attn"), "mean", "greater", 0.0),
        ("1c", CLAIM, "1c. Two phases: refinement nodes lie in later layers than the core",
         "mean over prompts of (refinement mean depth - core mean depth)",
         mean(depth_gap), "mean", "greater", 0.0),
        ("1d", CLAIM,
         "1d. Two phases: the refinement is richer in attention heads than the core",
         "mean over prompts of (refinement attention share - core attention share)",
         mean(attn_gap), "mean", "greater", 0.0),
        ("1d.base", CONTROL,
         "Control of 1d: the refinement is richer in attention heads than the nodes it was "
         "drawn from",
         "mean over prompts of (refinement attention share - attention share of the "
         "candidates outside the core)", mean(excess), "mean", "greater", 0.0),
    ]  # fmt: skip
    return claim_rows(specs, min_n, model)


def _uncertainty_claims(
    tables: dict[str, pd.DataFrame], min_n: int, model: str
) -> list[dict[str, Any]]:
    """2a-2b, and with a random baseline their reference (random subgraphs) and control
    (random density partialled out)."""
    unc = tables["uncertainty"].set_index("against")
    controls = tables.get("uncertainty_controls")
    specs: list[Spec] = []
    for key, against, text, what in (
        ("2a", "entropy",
         "2a. Density follows uncertainty: density rises with the full model's entropy",
         "entropy"),
        ("2b", "loss",
         "2b. Density follows uncertainty: density rises with the loss on the true next word",
         "-log p(true next token)"),
    ):  # fmt: skip
        if unc.loc[against].to_dict()["n"] <= 0:
            continue
        specs.append(
            (key, CLAIM, text, f"Spearman rho(density, {what}) over prompts",
             unc.loc[against].to_dict(), "rho", "greater", 0.0)
        )  # fmt: skip
        if controls is None:
            continue
        line = controls[controls["against"] == against].set_index("statistic")
        specs += [
            (f"{key}.random", REFERENCE,
             f"Control of {key} (reference): the same rho for equal-size random subgraphs",
             f"Spearman rho(random-subgraph density, {what}) over prompts",
             line.loc["random"].to_dict(), "rho", "greater", 0.0),
            (f"{key}.partial", CONTROL,
             f"Control of {key}: the same with random-subgraph density partialled out",
             f"partial Spearman rho(density, {what} | random-subgraph density): ranks, "
             "residuals after least squares on the control's ranks",
             line.loc["partial"].to_dict(), "rho", "greater", 0.0),
        ]  # fmt: skip
    return claim_rows(specs, min_n, model)


def _frequency_claims(
    mask: TraceResult,
    random: TraceResult | None,
    tables: dict[str, pd.DataFrame],
    counts: Any,
    n_boot: int,
    seed: int,
    min_n: int,
    small_core: float,
    model: str,
) -> list[dict[str, Any]]:
    """3 (every size up to ``small_core`` of the candidates, top-1 token), and with a random
    baseline the same for random subgraphs of those sizes, and traced minus random."""
    uni = tables["unigram"]
    sizes = uni[(uni["k"] == 1) & (uni["relative_size"] <= small_core)]["size"].tolist()
    if not sizes:
        sizes = [int(uni["size"].min())]
    ranks = an.frequency_ranks(counts)
    diffs = _sparse_rank_diffs(mask, ranks, sizes)
    specs: list[Spec] = [
        ("3", CLAIM, "3. Sparse subgraphs favour frequent tokens",
         "mean over prompts of log10 frequency rank of the sparse subgraphs' top-1 token "
         f"minus the full model's (sizes {sizes}; < 0: more frequent)",
         an.mean_ci(diffs, n_boot, seed=seed), "mean", "less", 0.0),
    ]  # fmt: skip
    if random is not None:
        random_diffs = _sparse_rank_diffs(random, ranks, sizes)
        specs += [
            ("3.random", REFERENCE,
             "Control of 3 (reference): random subgraphs of the same sizes",
             "the same mean for one random subgraph per (prompt, size) of the random "
             f"baseline (sizes {sizes})",
             an.mean_ci(random_diffs, n_boot, seed=seed), "mean", "less", 0.0),
            ("3.control", CONTROL,
             "Control of 3: sparse traced subgraphs favour frequent tokens more than random "
             "subgraphs of the same sizes",
             "mean over prompts of (traced - random) mean log10 frequency rank of the top-1 "
             f"token (sizes {sizes})",
             an.mean_ci(diffs - random_diffs, n_boot, seed=seed), "mean", "less", 0.0),
        ]  # fmt: skip
    return claim_rows(specs, min_n, model)


def _sanity_claims(
    mask: TraceResult,
    tables: dict[str, pd.DataFrame],
    n_boot: int,
    seed: int,
    min_n: int,
    model: str,
) -> list[dict[str, Any]]:
    """S1-S2: sanity checks of the search itself."""
    specs: list[Spec] = []
    if "baseline_gap" in tables:
        gap = tables["baseline_gap"].iloc[0].to_dict()
        gap["mean"] = gap["gap"]
        specs.append(
            ("S1", SANITY, "S1. Sanity: learned subgraphs beat random ones of equal size",
             "mean over prompts of density(random) - density(trace)", gap, "mean", "greater",
             0.0)
        )  # fmt: skip
    if "inv_tv" in mask.metrics:
        inv = an.density(mask, "inv_tv")["density"].to_numpy()
        stats = an.mean_ci(inv - tables["density"]["density"].to_numpy(), n_boot, seed=seed)
        specs.append(
            ("S2", SANITY,
             "S2. Sanity: removing the subgraph (its inverse) hurts more than keeping only it",
             "mean over prompts of density(inverse) - density(trace)", stats, "mean",
             "greater", 0.0)
        )  # fmt: skip
    return claim_rows(specs, min_n, model)


def claims_of(
    mask: TraceResult,
    tables: dict[str, pd.DataFrame],
    counts: Any,
    model: str,
    n_boot: int = DEFAULT_BOOT,
    seed: int = 0,
    min_n: int = MIN_PROMPTS,
    small_core: float = SMALL_CORE,
    random: TraceResult | None = None,
) -> pd.DataFrame:
    """One row per claim of the paper, its controls and the sanity checks, with figure, CI,
    p-value (raw and Holm-adjusted over this table) and verdicts.

    ``random``: the random baseline (same prompts and sizes), for claim 3's control; the
    density controls come from ``tables["uncertainty_controls"]`` (see :func:`analyse`).
    """
    ph = tables["phases"]
    per_row = ph[ph["row"] != "all"]
    core = per_row[per_row["phase"] == "core"].set_index("row")
    rows = [_core_size_claim(mask, core, n_boot, seed, min_n, small_core, model)]
    rows += _phase_claims(tables, n_boot, seed, min_n, model)
    rows += _uncertainty_claims(tables, min_n, model)
    rows += _frequency_claims(mask, random, tables, counts, n_boot, seed, min_n, small_core, model)
    rows += _sanity_claims(mask, tables, n_boot, seed, min_n, model)
    return with_multiplicity(pd.DataFrame(rows, columns=COLUMNS))


def agreement_claims(
    runs: list[ModelRun], n_boot: int = DEFAULT_BOOT, seed: int = 0, min_n: int = MIN_PROMPTS
) -> tuple[pd.DataFrame, pd.DataFrame, list[dict[str, Any]]]:
    """2c for two models: the agreement table, its controls, and the claim rows (2c; with
    both random baselines, 2c.random for reference and 2c.partial)."""
    a, b = runs
    model = f"{a.name} vs {b.name}"
    agreement = an.agreement(a.mask, b.mask, n_boot=n_boot, seed=seed)
    agreement["model_a"], agreement["model_b"] = a.name, b.name
    controls = an.agreement_controls(a.mask, a.random, b.mask, b.random, n_boot=n_boot, seed=seed)
    controls.insert(0, "model_b", b.name)
    controls.insert(0, "model_a", a.name)
    line = controls.set_index("statistic")
    specs: list[Spec] = [
        ("2c", CLAIM, "2c. Per-input density is correlated across models",
         "Spearman rho of per-prompt density, model A vs model B",
         agreement.iloc[0].to_dict(), "rho", "greater", 0.0),
        ("2c.random", REFERENCE,
         "Control of 2c (reference): the same rho for equal-size random subgraphs",
         "Spearman rho of per-prompt random-subgraph density, model A vs model B",
         line.loc["random"].to_dict(), "rho", "greater", 0.0),
        ("2c.partial", CONTROL,
         "Control of 2c: the same with both models' random-subgraph density partialled out",
         "partial Spearman rho(density A, density B | random density A, random density B): "
         "ranks, residuals after least squares on the controls' ranks",
         line.loc["partial"].to_dict(), "rho", "greater", 0.0),
    ]  # fmt: skip
    return agreement, controls, claim_rows(specs, min_n, model)


def _sparse_rank_diffs(mask: TraceResult, ranks: np.ndarray, sizes: list[int]) -> np.ndarray:
    """Per prompt: mean over ``sizes`` of log10 rank(subgraph top-1) - log10 rank(full top-1)."""
    full = np.log10(ranks[mask.full_top_tokens[:, 0].numpy()])
    cols = [mask.size_index(s) for s in sizes]
    sub = np.log10(ranks[mask.top_tokens[:, cols, 0].numpy()])  # [P, len(sizes)]
    return np.asarray(sub.mean(1) - full)


__all__ = [
    "ALPHA",
    "CLAIM",
    "COLUMNS",
    "CONTROL",
    "FAILS",
    "HOLDS",
    "INCONCLUSIVE",
    "MIN_PROMPTS",
    "REFERENCE",
    "SANITY",
    "SMALL_CORE",
    "UNDETERMINED",
    "ModelRun",
    "Reproduction",
    "Spec",
    "agreement_claims",
    "analyse",
    "claim",
    "claim_rows",
    "claims_of",
    "sign_test",
    "verdict",
    "with_multiplicity",
]
