"""``reproduce``: trace a prompt set, run every analysis, and judge the paper's claims.

What it does, per model:

1. traces the first ``n`` prompts of ``prompts_file`` per input with learned masks
   (``method="mask"``) and, on the same prompts, sizes and ablation, with random subgraphs
   (``method="random"``), through :func:`strace_lens.trace_dataset` (sharded, resumable: run
   the same call again after an interruption and it continues);
2. runs every analysis of :mod:`strace_lens.analysis` and writes each table as a CSV;
3. writes ``report.md``: the setup (model, prompts, ablation, sizes, seed, package version,
   the exact command), one row per claim of the paper with the measured figure, its 95 %
   confidence interval and a verdict, the rules that give the verdicts, and the supporting
   tables. With two models it adds the cross-model agreement of per-prompt density.

Verdicts come only from the numbers, by the rule printed in the report (see
:func:`verdict`): a claim *holds* when its whole confidence interval lies on the side the
paper predicts, *does not hold* when the whole interval lies on the other side (or on the
null value), and is *inconclusive* otherwise or when too few prompts contribute.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from strace_lens import analysis as an
from strace_lens.ablation import MeanAblation
from strace_lens.analysis._stats import DEFAULT_BOOT
from strace_lens.atomic import sha256_file
from strace_lens.models import model_identity
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


def _claim(
    claim: str, figure: str, stats: Mapping[Any, Any], estimate_key: str, predicted: str,
    null: float, min_n: int, model: str,
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


# -- tracing (resumable) ---------------------------------------------------------------------
def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "model"


def _trace_run(
    model: Any,
    prompts: list[str],
    targets: list[str] | None,
    folder: Path,
    chunk_size: int,
    progress: bool | None,
    batch_size: int | None,
    options: dict[str, Any],
) -> TraceResult:
    """Trace through ``trace_dataset``: sharded, resumable, refused if the options changed."""
    from strace_lens.dataset import trace_dataset

    return trace_dataset(
        model, prompts, folder, chunk_size=chunk_size, progress=progress, targets=targets,
        batch_size=batch_size, **options,
    )


def _load(name: str, device: str | None) -> Any:
    """An embedded model, a local folder, or ``native:tiny`` (the seeded test model)."""
    from strace_lens.models import load_model
    from strace_lens.tiny_model import TINY_MODEL_NAMES, tiny_model

    if name in TINY_MODEL_NAMES:
        return tiny_model(device=device)
    return load_model(name, device=device)


def _shard_seconds(folder: Path) -> float:
    """Total tracing time recorded by a run's shards (all sessions of a resumed run)."""
    total = 0.0
    for timing in folder.glob("shards/*/timing.json"):
        try:
            total += float(json.loads(timing.read_text()).get("seconds", 0.0))
        except (ValueError, OSError):
            continue
    return total


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
        _claim(
            "1a. Two phases: a small subgraph already reproduces the full model's top-1 token",
            "median relative size of the core (smallest traced subgraph sharing the top-1 "
            "token); interval widened to the grid step below each core",
            stats, "median", "less", small_core, min_n, model,
        )
    )
    base_depth = float(tables["composition"]["base_mean_depth"].iloc[0])
    stats = an.mean_ci(base_depth - core["mean_depth"].to_numpy(), n_boot, seed=seed)
    rows.append(
        _claim(
            "1b. Two phases: the core is made of early-layer nodes",
            "mean over prompts of (mean depth of all candidates - mean depth of the core); "
            "depth 0 = first layer, 1 = last",
            stats, "mean", "greater", 0.0, min_n, model,
        )
    )
    both = core.index.intersection(ref.index)
    depth_gap = ref.loc[both, "mean_depth"].to_numpy() - core.loc[both, "mean_depth"].to_numpy()
    stats = an.mean_ci(depth_gap, n_boot, seed=seed)
    rows.append(
        _claim(
            "1c. Two phases: refinement nodes lie in later layers than the core",
            "mean over prompts of (refinement mean depth - core mean depth)",
            stats, "mean", "greater", 0.0, min_n, model,
        )
    )
    attn_gap = ref.loc[both, "attn_share"].to_numpy() - core.loc[both, "attn_share"].to_numpy()
    stats = an.mean_ci(attn_gap, n_boot, seed=seed)
    rows.append(
        _claim(
            "1d. Two phases: the refinement is richer in attention heads than the core",
            "mean over prompts of (refinement attention share - core attention share)",
            stats, "mean", "greater", 0.0, min_n, model,
        )
    )
    unc = tables["uncertainty"].set_index("against")
    rows.append(
        _claim(
            "2a. Density follows uncertainty: density rises with the full model's entropy",
            "Spearman rho(density, entropy) over prompts",
            unc.loc["entropy"].to_dict(), "rho", "greater", 0.0, min_n, model,
        )
    )
    if unc.loc["loss"].to_dict()["n"] > 0:
        rows.append(
            _claim(
                "2b. Density follows uncertainty: density rises with the loss on the true "
                "next word",
                "Spearman rho(density, -log p(true next token)) over prompts",
                unc.loc["loss"].to_dict(), "rho", "greater", 0.0, min_n, model,
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
        _claim(
            "3. Sparse subgraphs favour frequent tokens",
            "mean over prompts of log10 frequency rank of the sparse subgraphs' top-1 token "
            f"minus the full model's (sizes {sparse_sizes}; < 0: more frequent)",
            stats, "mean", "less", 0.0, min_n, model,
        )
    )
    # sanity checks of the search itself
    if "baseline_gap" in tables:
        gap = tables["baseline_gap"].iloc[0].to_dict()
        gap["mean"] = gap["gap"]
        rows.append(
            _claim(
                "S1. Sanity: learned subgraphs beat random ones of equal size",
                "mean over prompts of density(random) - density(trace)",
                gap, "mean", "greater", 0.0, min_n, model,
            )
        )
    if "inv_tv" in mask.metrics:
        inv = an.density(mask, "inv_tv")["density"].to_numpy()
        stats = an.mean_ci(inv - tables["density"]["density"].to_numpy(), n_boot, seed=seed)
        rows.append(
            _claim(
                "S2. Sanity: removing the subgraph (its inverse) hurts more than keeping only it",
                "mean over prompts of density(inverse) - density(trace)",
                stats, "mean", "greater", 0.0, min_n, model,
            )
        )
    return pd.DataFrame(rows)


def _sparse_rank_diffs(mask: TraceResult, ranks: np.ndarray, sizes: list[int]) -> np.ndarray:
    """Per prompt: mean over ``sizes`` of log10 rank(subgraph top-1) - log10 rank(full top-1)."""
    full = np.log10(ranks[mask.full_top_tokens[:, 0].numpy()])
    cols = [mask.size_index(s) for s in sizes]
    sub = np.log10(ranks[mask.top_tokens[:, cols, 0].numpy()])  # [P, len(sizes)]
    return np.asarray(sub.mean(1) - full)


# -- writing ---------------------------------------------------------------------------------
def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if np.isnan(value):
            return "n/a"
        if np.isinf(value):
            return "beyond grid" if value > 0 else "-inf"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e4):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(frame: pd.DataFrame, columns: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured markdown table of ``frame`` (numbers to 3 significant digits)."""
    cols = list(columns) if columns is not None else list(frame.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in frame[cols].iterrows():
        lines.append("| " + " | ".join(_fmt(row[c]) for c in cols) + " |")
    return "\n".join(lines)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
            text=True, timeout=10, cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


RULES = """\
Each claim is turned into one statistic whose sign (or position against a threshold) the
paper predicts, estimated over prompts with a 95 % percentile-bootstrap interval (prompts
resampled with replacement, seeded).

- **holds**: the whole interval lies strictly on the predicted side of the null value;
- **does not hold**: the whole interval lies on the other side, or on the null value itself;
- **inconclusive**: the interval contains the null value, is undefined, or fewer than
  {min_n} prompts contribute.

Definitions. *Density* is the area under the TV-versus-log10(relative size) curve, by the
trapezoidal rule over the traced sizes, divided by the number of decades spanned (mean TV per
decade, in [0, 1]). The *core* of a prompt is its smallest traced subgraph whose shared
nucleus with the full model reaches {core_nucleus:g} % (at 1 %: the top-1 token is the full
model's); the *refinement* is the nodes of the smallest subgraph reaching {refined_nucleus:g} %
(the largest traced one when none does) that are not in the core. A prompt that never
reaches the core level counts as a core "beyond the grid" in 1a and is left out of 1b-1d.
*Depth* is layer / (n_layers - 1). Claim 1a calls a core small when it is below
{small_core:g} of the candidate nodes: our nodes are whole heads and MLPs, so the smallest
relative size is 1/N ({min_rel} here), already the upper end of the paper's construction band
(1e-4 to 1e-2 of its token-level edges); one decade above it is the threshold. The grid only
brackets a core's size (between the traced size below it, exclusive, and its own), so 1a's
interval runs from the bootstrap lower bound of the median of those lower ends to the upper
bound of the median of the traced sizes: a median core whose grid step contains the
threshold is inconclusive, not decided by where the grid happens to fall. Claim 3 uses
every traced size up to that same fraction. Frequency ranks are over the reference corpus
(rank 1 = most frequent; unseen tokens rank just below the rarest seen one). Correlation
p-values: SciPy's `spearmanr`; mean differences: one-sample t-test against 0 (shown for
information; verdicts use the intervals only).
"""


def _settings_lines(settings: dict[str, Any]) -> list[str]:
    out = []
    for key, value in settings.items():
        if isinstance(value, (dict, list)):
            value = "`" + json.dumps(value, default=str) + "`"
        out.append(f"- **{key}**: {value}")
    return out


def _model_section(run: ModelRun) -> list[str]:
    t = run.tables
    mask = run.mask
    sec = run.seconds
    lines = [
        f"## {run.name}",
        "",
        f"{mask.graph.n_layers} layers x {mask.graph.n_heads} heads: {mask.n_candidates} "
        f"candidate nodes; sizes {mask.sizes.tolist()} (relative "
        f"{', '.join(_fmt(float(r), 2) for r in mask.relative_sizes)}); "
        f"{mask.n_prompts} prompts. Tracing time: mask {sec.get('mask', 0):.0f} s, "
        f"random {sec.get('random', 0):.0f} s (this invocation; the shards record "
        f"{sec.get('mask_shards', 0):.0f} s and {sec.get('random_shards', 0):.0f} s in total, "
        "over every session of a resumed run).",
        "",
        "### Density and uncertainty",
        "",
        f"Mean density (AUC-TV per decade): trace {_fmt(t['density']['density'].mean())}"
        + (
            f", random {_fmt(t['random_density']['density'].mean())}"
            if "random_density" in t
            else ""
        )
        + ".",
        "",
        markdown_table(t["uncertainty"], ["against", "rho", "ci_low", "ci_high", "p_value", "n"]),
        "",
        "### Nucleus recovery (relative size needed; median and IQR over prompts)",
        "",
        markdown_table(
            t["recovery"], ["level", "median", "q25", "q75", "median_size", "n_reached",
                            "n_unreached"],
        ),
        "",
    ]
    if "random_recovery" in t:
        lines += [
            "Random subgraphs of equal size:",
            "",
            markdown_table(t["random_recovery"], ["level", "median", "q25", "q75", "n_unreached"]),
            "",
        ]
    ph = t["phases"]
    per_prompt = ph[ph["row"] != "all"]
    with_core = per_prompt[(per_prompt["phase"] == "core") & per_prompt["reached"]]["row"]
    refinements = per_prompt[
        (per_prompt["phase"] == "refinement") & per_prompt["row"].isin(with_core)
    ]
    # a refinement that never reaches its level runs to the largest traced subgraph: then 1c-1d
    # compare the core with (nearly) the whole graph, which the reader must know
    below_full = int((refinements["end_relative_size"] < 1.0).sum())
    lines += [
        "### Phases (medians over prompts with a core)",
        "",
        markdown_table(
            ph[ph["row"] == "all"],
            ["phase", "n_rows", "n_nodes", "relative_n_nodes", "end_relative_size", "attn_share",
             "mean_depth", "q1_share", "q2_share", "q3_share", "q4_share"],
        ),
        "",
        f"The refinement ends below the full model (a traced subgraph smaller than the whole "
        f"graph reaches the refined level) for {below_full} of {len(refinements)} prompts with "
        "a core; for the others it runs to the full model, so claims 1c-1d compare their core "
        "with the rest of the graph. Among all candidates: attention share "
        f"{_fmt(t['composition']['base_attn_share'].iloc[0])}, mean depth "
        f"{_fmt(t['composition']['base_mean_depth'].iloc[0])}.",
        "",
        "### Composition versus size (mean over prompts)",
        "",
        markdown_table(
            t["composition"],
            ["size", "relative_size", "attn_share", "new_attn_share", "mean_depth", "q1_share",
             "q2_share", "q3_share", "q4_share"],
        ),
        "",
        f"Among all candidates: attention share "
        f"{_fmt(t['composition']['base_attn_share'].iloc[0])}, mean depth "
        f"{_fmt(t['composition']['base_mean_depth'].iloc[0])}.",
        "",
        "### Node usage across prompts",
        "",
        markdown_table(t["gini"], ["size", "relative_size", "gini", "n_used", "top_node",
                                   "top_frequency"]),
        "",
        "### Unigram frequency of the top-1 token",
        "",
        markdown_table(
            t["unigram"][t["unigram"]["k"] == 1],
            ["size", "relative_size", "mean_rank", "median_rank", "full_mean_rank",
             "diff_log10_rank", "diff_ci_low", "diff_ci_high", "frac_same_top"],
        ),
        "",
    ]
    return lines


def write_report(repro: Reproduction, settings: dict[str, Any]) -> Path:
    """Write ``report.md`` for a finished reproduction (atomically)."""
    lines = [
        "# s-Trace reproduction report",
        "",
        "Claims of Kervadec et al., *Tracing Computation Density in LLMs* (arXiv 2605.27033), "
        "section 1 of the method reference, measured with strace-lens's node-level, "
        "learned-mask variant (heads and MLPs as nodes, the rest ablated).",
        "",
        "## Setup",
        "",
        *_settings_lines(settings),
        "",
        "## Claims and verdicts",
        "",
        markdown_table(
            repro.claims,
            ["model", "claim", "figure", "estimate", "ci_low", "ci_high", "n", "p_value",
             "predicted", "verdict"],
        ),
        "",
        "### Verdict rules",
        "",
        RULES.format(
            min_n=settings["min_prompts"],
            core_nucleus=settings["core_nucleus"],
            refined_nucleus=settings["refined_nucleus"],
            small_core=settings["small_core"],
            min_rel=", ".join(f"{float(r.mask.relative_sizes.min()):.2g}" for r in repro.runs),
        ),
    ]
    if repro.agreement is not None:
        lines += [
            "## Cross-model agreement of per-prompt density",
            "",
            markdown_table(
                repro.agreement, ["model_a", "model_b", "rho", "ci_low", "ci_high", "p_value", "n"]
            ),
            "",
        ]
    for run in repro.runs:
        lines += _model_section(run)
    lines += [
        "## Tables",
        "",
        "Every table above, and the per-prompt ones, are CSV files next to this report: "
        + ", ".join(
            f"`tables/{_slug(run.name)}/{name}.csv`"
            for run in repro.runs[:1]
            for name in sorted(run.tables)
        )
        + (" (one folder per model)" if len(repro.runs) > 1 else "")
        + ", and `claims.csv`.",
        "",
    ]
    path = repro.out_dir / "report.md"
    _write_atomic(path, "\n".join(lines))
    return path


# -- the entry point -------------------------------------------------------------------------
def reproduce(
    model: str | Any | Sequence[str | Any],
    prompts_file: str | os.PathLike[str],
    n: int = 200,
    out_dir: str | os.PathLike[str] = "reproduction",
    sizes: Sequence[int | float] | None = None,
    seed: int = 0,
    *,
    ablation: str = "mean",
    chunk_size: int = 16,
    batch_size: int | None = None,
    random_draws: int = 5,
    corpus: str | os.PathLike[str] | None = None,
    core_nucleus: float = 1.0,
    refined_nucleus: float = 90.0,
    small_core: float = SMALL_CORE,
    min_prompts: int = MIN_PROMPTS,
    n_boot: int = 2000,
    device: str | None = None,
    progress: bool | None = None,
    command: str | None = None,
    **mask_options: Any,
) -> Reproduction:
    """Trace the first ``n`` prompts of a file, run every analysis, and write ``report.md``.

    Args:
        model: an embedded model name (``"gemma-3-270m"``, ``"smollm2-135m"``), a local
            folder, a loaded TransformerLens model, or a list of two of these (the report then
            adds the cross-model agreement of per-prompt density).
        prompts_file: a plain-text (one prompt a line) or 6-column TSV prompt file; with a TSV
            the true next token (column 6) gives the loss on the true next word.
        n: how many prompts, from the top of the file.
        out_dir: where runs (``runs/<model>/mask``, ``runs/<model>/random``), tables
            (``tables/<model>/*.csv``, ``claims.csv``) and ``report.md`` go. Calling again
            with the same arguments resumes the traces and rewrites tables and report.
        sizes: node counts or relative sizes (default: the trace's log grid, 1 to N).
        seed: seeds the traces, the random baseline and every bootstrap.
        ablation: "mean" (over the ``n`` prompts, shared by both traces) or "zero".
        chunk_size: prompts per saved shard (what an interruption can lose).
        batch_size: rows per forward pass (default: the trace's own); not part of a run's
            identity, so it may change when resuming (e.g. after an out-of-memory error).
        random_draws: random subgraphs per (prompt, size) for the baseline.
        corpus: reference text file for unigram frequencies (default: the prompts' tokens).
        core_nucleus, refined_nucleus: the phase rule (see :func:`strace_lens.analysis.phases`).
        small_core: claim 1a calls a core small below this relative size; claim 3 counts
            every traced size up to it as sparse.
        min_prompts: below this many contributing prompts every verdict is inconclusive.
        n_boot: bootstrap resamples for every interval.
        device: where to load a model given by name (default: CUDA when available).
        progress: progress bars (default: when stderr is a terminal).
        command: the command line to record in the report (the CLI passes its own);
            default: the equivalent Python call.
        **mask_options: options of the learned-mask search (``steps``, ``lr``, ...).
    """
    from strace_lens import __version__
    from strace_lens.prompts import read_prompts

    started = time.perf_counter()
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    if not 1 <= len(models) <= 2:
        raise ValueError(f"reproduce takes one model or two (for agreement), got {len(models)}.")
    if ablation not in ("mean", "zero"):
        raise ValueError(f"ablation must be 'mean' or 'zero', got {ablation!r}.")
    # checked before hours of tracing, not when the analyses finally run
    if not 0 < core_nucleus <= refined_nucleus <= 100:
        raise ValueError(
            "The phase rule needs 0 < core_nucleus <= refined_nucleus <= 100 (shared-nucleus "
            f"percentages), got core_nucleus={core_nucleus:g}, refined_nucleus="
            f"{refined_nucleus:g}."
        )
    if not 0 < small_core <= 1:
        raise ValueError(
            f"small_core is a fraction of the candidate nodes in (0, 1], got {small_core:g}."
        )
    out = Path(out_dir)
    pfile = read_prompts(prompts_file, n)
    prompts, targets = pfile.prompts, pfile.targets
    if command is None:
        names = [m if isinstance(m, str) else "<model object>" for m in models]
        command = (
            "strace_lens.report.reproduce("
            + ", ".join(
                [
                    repr(names if len(names) > 1 else names[0]),
                    repr(str(prompts_file)),
                    f"n={n}",
                    f"out_dir={str(out_dir)!r}",
                    f"sizes={list(sizes) if sizes is not None else None}",
                    f"seed={seed}",
                    f"ablation={ablation!r}",
                    f"chunk_size={chunk_size}",
                    f"random_draws={random_draws}",
                    f"corpus={str(corpus) if corpus else None!r}",
                    f"core_nucleus={core_nucleus}",
                    f"refined_nucleus={refined_nucleus}",
                    *[f"{k}={v!r}" for k, v in sorted(mask_options.items())],
                ]
            )
            + ")"
        )
    runs: list[ModelRun] = []
    for spec in models:
        loaded = _load(spec, device) if isinstance(spec, str) else spec
        identity = model_identity(loaded)
        name = spec if isinstance(spec, str) else identity.get("name") or "model"
        slug = _slug(str(name))
        if any(_slug(r.name) == slug for r in runs):
            name, slug = f"{name} (2)", f"{slug}-2"  # the same model twice: keep both runs
        run_dir = out / "runs" / slug
        common = {"sizes": list(sizes) if sizes is not None else None, "seed": seed, "per": "input"}
        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        mask = _trace_run(
            loaded, prompts, targets, run_dir / "mask", chunk_size, progress, batch_size,
            {**common, "method": "mask", "ablation": ablation, **mask_options},
        )
        seconds["mask"] = time.perf_counter() - t0
        # the random baseline uses the very ablation the learned masks were scored with
        shared = run_dir / "mask" / "ablation.safetensors"
        rand_ablation: Any = MeanAblation.load(shared) if shared.exists() else ablation
        t0 = time.perf_counter()
        random = _trace_run(
            loaded, prompts, targets, run_dir / "random", chunk_size, progress, batch_size,
            # no inverse for random subgraphs: the inverse of a random s-subset is a random
            # (N - s)-subset, already on the random curve; skipping it halves the baseline's cost
            {**common, "sizes": mask.sizes.tolist(), "method": "random", "ablation": rand_ablation,
             "draws": random_draws, "inverse": False},
        )
        seconds["random"] = time.perf_counter() - t0
        seconds["mask_shards"] = _shard_seconds(run_dir / "mask")
        seconds["random_shards"] = _shard_seconds(run_dir / "random")
        counts = an.token_counts(loaded, corpus, prompts)
        tables = analyse(mask, random, counts, core_nucleus, refined_nucleus, n_boot, seed)
        claims = claims_of(mask, tables, counts, str(name), n_boot, seed, min_prompts, small_core)
        for key, frame in tables.items():
            _write_atomic(out / "tables" / slug / f"{key}.csv", frame.to_csv(index=False))
        runs.append(ModelRun(str(name), identity, mask, random, tables, claims, seconds))

    agreement = None
    all_claims = pd.concat([r.claims for r in runs], ignore_index=True)
    if len(runs) == 2:
        agreement = an.agreement(runs[0].mask, runs[1].mask, n_boot=n_boot, seed=seed)
        agreement["model_a"], agreement["model_b"] = runs[0].name, runs[1].name
        row = agreement.iloc[0].to_dict()
        extra = _claim(
            "2c. Per-input density is correlated across models",
            "Spearman rho of per-prompt density, model A vs model B",
            row, "rho", "greater", 0.0, min_prompts, f"{runs[0].name} vs {runs[1].name}",
        )
        all_claims = pd.concat([all_claims, pd.DataFrame([extra])], ignore_index=True)
        _write_atomic(out / "tables" / "agreement.csv", agreement.to_csv(index=False))
    _write_atomic(out / "claims.csv", all_claims.to_csv(index=False))

    first = runs[0].mask
    commit = _git_commit()
    settings: dict[str, Any] = {
        "models": ", ".join(
            f"{r.name} ({r.identity['n_layers']} layers x {r.identity['n_heads']} heads)"
            for r in runs
        ),
        "prompts": f"first {len(prompts)} prompts of `{prompts_file}` (lines "
        f"{pfile.lines[0]}-{pfile.lines[-1]}; sha256 {sha256_file(pfile.path)[:16]}...)"
        + ("; loss uses the TSV's next-token column" if targets else "; no targets: no loss"),
        "ablation": json.dumps(first.options.get("ablation", ablation), default=str),
        "search": "learned masks per input, nested across sizes; options "
        + (
            json.dumps(first.options["method_options"], default=str)
            if first.options.get("method_options")
            else "the defaults of strace_lens.trace"
        ),
        "random baseline": f"{random_draws} random subgraphs per (prompt, size), metrics averaged",
        "sizes": ", ".join(
            f"{r.name}: {r.mask.sizes.tolist()} of {r.mask.n_candidates}" for r in runs
        ),
        "seed": seed,
        "unigram corpus": str(corpus) if corpus else "the prompts' own tokens",
        "core_nucleus": core_nucleus,
        "refined_nucleus": refined_nucleus,
        "small_core": small_core,
        "min_prompts": min_prompts,
        "bootstrap resamples": n_boot,
        "strace-lens version": __version__ + (f" (git {commit})" if commit else ""),
        "command": f"`{command}`",
        "wall time of this invocation": f"{time.perf_counter() - started:.0f} s",
    }
    repro = Reproduction(out, out / "report.md", runs, all_claims, agreement, settings)
    write_report(repro, settings)
    return repro


def cli_command(argv: Sequence[str]) -> str:
    """The command line as typed (quoted so it can be pasted back into a shell)."""
    return " ".join(shlex.quote(a) for a in argv)


__all__ = ["Reproduction", "analyse", "claims_of", "markdown_table", "reproduce", "verdict"]
