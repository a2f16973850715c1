"""``report.md``: the setup, one row per claim with its figure, interval and verdict, the
rules that give the verdicts, and the supporting tables."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from strace_lens.atomic import write_text
from strace_lens.reproduce.claims import ALPHA, ModelRun, Reproduction


# -- tracing (resumable) ---------------------------------------------------------------------
def slug_of(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "model"


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


#: The claims table's columns as both reports print them (n before the p-values).
CLAIMS_TABLE_COLUMNS = ("model", "id", "role", "claim", "figure", "estimate", "ci_low",
                        "ci_high", "n", "p_value", "p_holm", "predicted", "verdict",
                        "verdict_holm")  # fmt: skip


def markdown_table(frame: pd.DataFrame, columns: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured markdown table of ``frame`` (numbers to 3 significant digits)."""
    cols = list(columns) if columns is not None else list(frame.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in frame[cols].iterrows():
        lines.append("| " + " | ".join(_fmt(row[c]) for c in cols) + " |")
    return "\n".join(lines)


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
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
p-values: SciPy's `spearmanr`; mean differences: one-sample t-test against 0; 1a: two-sided
sign test of the cores below against above the threshold (cores whose grid step reaches it
are ties, dropped).

**Undetermined** (1a only): the interval has an end exactly on the threshold (e.g. a lower
bound of 9/90 = 0.1 against "< 0.1"): a core on the threshold is neither small nor clearly
not, so the claim is neither held nor refuted.

**Controls** (rows "Control of ..."; column `role`). *control* rows re-test a claim against
what it would show without the effect it names and are judged like a claim; *reference*
rows give the control's own figure, judged by the same rule for information only.

- 2a, 2b (and 2c with two models): beside the traced rho, the same rho for equal-size random
  subgraphs (the random baseline's per-prompt density; *reference*), and the partial
  Spearman rho with random density partialled out (*control*): the Pearson correlation of
  the ranks of density and entropy (or loss) after each is regressed, by least squares with
  an intercept, on the ranks of random density (for 2c, on both models' random densities);
  with one control this is (r_xy - r_xz r_yz) / sqrt((1 - r_xz^2)(1 - r_yz^2)). p-value:
  t-test with n - 2 - k degrees of freedom (k controls); interval: percentile bootstrap over
  prompts, ranks recomputed in every resample. A density effect that is only a prompt
  effect (any subgraph finds the prompt hard) vanishes under it.
- 1b per node kind: the core's MLPs against all candidate MLPs, its heads against all
  candidate heads (mean depth of the kind minus mean depth of the core's nodes of that kind,
  over prompts whose core has that kind).
- 1d against its base rate: the refinement's attention share minus the attention share of
  the candidates outside the core (the pool it was drawn from); a refinement that is the
  whole pool scores exactly 0.
- 3 against random subgraphs: the same log10-rank difference for the random baseline's
  subgraph of each sparse size (one draw: the one whose top tokens the baseline records;
  *reference*), and per prompt traced minus random (*control*; < 0: traced sparse subgraphs
  favour frequent tokens more than random ones of the same sizes).

**Multiplicity**: the p-values of every judged row (claims, controls and sanity checks, of
every model in this report) are Holm-Bonferroni adjusted as one family (`p_holm`; reference
rows are outside it). `verdict_holm` is the verdict after the correction: a *holds* whose
adjusted p-value is not below {alpha:g} becomes *inconclusive*; the other verdicts are kept
(the correction guards against false positives only).
"""


def settings_lines(settings: dict[str, Any]) -> list[str]:
    out = []
    for key, value in settings.items():
        if isinstance(value, (dict, list)):
            value = "`" + json.dumps(value, default=str) + "`"
        out.append(f"- **{key}**: {value}")
    return out


def model_section(run: ModelRun) -> list[str]:
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
        "over every session of a resumed run; per shard: "
        f"`tables/{slug_of(run.name)}/shards.csv`).",
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
    ]
    if "uncertainty_controls" in t:
        lines += [
            "Controls: the same rho for equal-size random subgraphs (`random`) and the traced "
            "rho with random-subgraph density partialled out (`partial`):",
            "",
            markdown_table(
                t["uncertainty_controls"],
                ["against", "statistic", "rho", "ci_low", "ci_high", "p_value", "n"],
            ),
            "",
        ]
    lines += [
        "### Nucleus recovery (relative size needed; median and IQR over prompts)",
        "",
        markdown_table(
            t["recovery"],
            ["level", "median", "q25", "q75", "median_size", "n_reached", "n_unreached"],
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
            [
                "phase",
                "n_rows",
                "n_nodes",
                "relative_n_nodes",
                "end_relative_size",
                "attn_share",
                "mean_depth",
                "q1_share",
                "q2_share",
                "q3_share",
                "q4_share",
            ],
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
            [
                "size",
                "relative_size",
                "attn_share",
                "new_attn_share",
                "mean_depth",
                "q1_share",
                "q2_share",
                "q3_share",
                "q4_share",
            ],
        ),
        "",
        f"Among all candidates: attention share "
        f"{_fmt(t['composition']['base_attn_share'].iloc[0])}, mean depth "
        f"{_fmt(t['composition']['base_mean_depth'].iloc[0])}.",
        "",
        "### Node usage across prompts",
        "",
        markdown_table(
            t["gini"], ["size", "relative_size", "gini", "n_used", "top_node", "top_frequency"]
        ),
        "",
        "### Unigram frequency of the top-1 token",
        "",
        markdown_table(
            t["unigram"][t["unigram"]["k"] == 1],
            [
                "size",
                "relative_size",
                "mean_rank",
                "median_rank",
                "full_mean_rank",
                "diff_log10_rank",
                "diff_ci_low",
                "diff_ci_high",
                "frac_same_top",
            ],
        ),
        "",
    ]
    return lines


def report_opening(
    title: str, intro: str, settings: dict[str, Any], claims: pd.DataFrame, rules: str
) -> list[str]:
    """The lines every report (node or edge) opens with: title, introduction, setup, the
    claims table and the verdict rules."""
    return [
        f"# {title}",
        "",
        intro,
        "",
        "## Setup",
        "",
        *settings_lines(settings),
        "",
        "## Claims and verdicts",
        "",
        markdown_table(claims, CLAIMS_TABLE_COLUMNS),
        "",
        "### Verdict rules",
        "",
        rules,
    ]


def write_report(repro: Reproduction, settings: dict[str, Any]) -> Path:
    """Write ``report.md`` for a finished reproduction (atomically)."""
    rules = RULES.format(
        min_n=settings["min_prompts"],
        core_nucleus=settings["core_nucleus"],
        refined_nucleus=settings["refined_nucleus"],
        small_core=settings["small_core"],
        min_rel=", ".join(f"{float(r.mask.relative_sizes.min()):.2g}" for r in repro.runs),
        alpha=ALPHA,
    )
    lines = report_opening(
        "s-Trace reproduction report",
        "Claims of Kervadec et al., *Tracing Computation Density in LLMs* (arXiv 2605.27033), "
        "section 1 of the method reference, measured with strace-lens's node-level, "
        "learned-mask variant (heads and MLPs as nodes, the rest ablated).",
        settings,
        repro.claims,
        rules,
    )
    if repro.agreement is not None:
        lines += [
            "## Cross-model agreement of per-prompt density",
            "",
            markdown_table(
                repro.agreement, ["model_a", "model_b", "rho", "ci_low", "ci_high", "p_value", "n"]
            ),
            "",
        ]
    if repro.agreement_controls is not None:
        lines += [
            "Controls: the same rho for equal-size random subgraphs (`random`) and the traced "
            "rho with both models' random-subgraph density partialled out (`partial`):",
            "",
            markdown_table(
                repro.agreement_controls,
                ["statistic", "rho", "ci_low", "ci_high", "p_value", "n"],
            ),
            "",
        ]
    for run in repro.runs:
        lines += model_section(run)
    lines += [
        "## Tables",
        "",
        "Every table above, and the per-prompt ones, are CSV files next to this report: "
        + ", ".join(
            f"`tables/{slug_of(run.name)}/{name}.csv`"
            for run in repro.runs[:1]
            for name in sorted(run.tables)
        )
        + (" (one folder per model)" if len(repro.runs) > 1 else "")
        + ", and `claims.csv`.",
        "",
    ]
    path = repro.out_dir / "report.md"
    write_text(path, "\n".join(lines), repro.out_dir)
    return path


__all__ = [
    "RULES",
    "git_commit",
    "markdown_table",
    "model_section",
    "report_opening",
    "settings_lines",
    "slug_of",
    "write_report",
]
