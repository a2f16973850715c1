"""The edge-granularity report: ``report.md`` (setup, claims in edges and in components, the
rules, the band tables), beside one HTML figure page per model (``figures/<model>.html``,
written by :func:`strace_lens.plot.edge_report_html`: fidelity of the traced family and the
random control, the composition figure in edge units, the first prompt's token-level
circuit)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from strace_lens.atomic import write_text
from strace_lens.reproduce.claims import ALPHA
from strace_lens.reproduce.edge_claims import (
    NO_EDGE_ANALOGUE,
    NO_TARGETS,
    EdgeModelRun,
    EdgeReproduction,
)
from strace_lens.reproduce.markdown import markdown_table, report_opening, slug_of


def figures_path(model: str) -> str:
    """Where a model's figure page goes, relative to the output folder."""
    return f"figures/{slug_of(model)}.html"


EDGE_RULES = """\
Each claim is one statistic whose sign (or position against a threshold) the paper
predicts, estimated over prompts with a 95 % percentile-bootstrap interval (prompts resampled
with replacement, seeded): **holds** when the whole interval lies strictly on the predicted
side of the null value, **does not hold** when it lies on the other side or on the null
itself, **inconclusive** when it contains the null, is undefined, or fewer than {min_n}
prompts contribute; 1a is **undetermined** when an end of its interval is exactly on the
threshold.

Units. A subgraph of relative size s keeps int(s E) of the prompt's E token-level edges (the
paper's grid, 1e-5 to 1). The phases are the paper's fixed bands: construction 1e-4 <= s <=
1e-2, refinement 1e-2 <= s <= 1, minimal core s = 1e-3. A prompt's value in a band is the
mean of its curve over log10 s across the band (curves interpolated linearly in log10 s onto
151 points from 1e-5 to 1, never extrapolated; a prompt whose curve does not cover a band is
left out of it). Each phase claim is stated in edges and, with the id suffix
`.components`, in components: the heads and MLPs the same subgraph touches (a head is
touched when one of its attention edges is kept, at any position; residual edges touch none).
An edge share is averaged over a band as it is; a component share or depth is a ratio of
band means (e.g. the band's mean head count over its mean component count), defined wherever
the band touches a component (the smallest subgraphs often hold residual edges only).
Quartiles of blocks as the released code splits them (numpy.array_split); depth = block /
(L - 1). *full*: the prompt's whole graph; *outside core*: the edges outside the prompt's
subgraph at s = 1e-3, and the components it does not touch (the pool the refinement adds
from). *Density*: the area under TV against log10 s over the prompt's non-empty traced
sizes (AUC, TV x decades, the paper's number); the normalised density is AUC / span.
1a's core: the smallest traced non-empty subgraph whose top-1 token is the full model's; a
prompt whose subgraphs never agree below s = 1 counts as beyond the grid; the grid brackets
each core (one edge above the largest smaller traced subgraph), so the interval runs from
the bootstrap lower bound of the median of those lower ends to the upper bound of the median
of the traced sizes; p-value: sign test of cores below against above the threshold (ties,
cores whose bracket reaches it, dropped). Claim 3 uses every non-empty grid size up to the
1a threshold ({small_core:g}). 2b's loss: -log p(the true next token's first token) under
the full model, read after tracing by one clean forward per chunk of prompts on the run's
own tokens (its entropy checked against the run's record); only for prompts with targets
(a 6-column TSV). Correlation p-values: SciPy's `spearmanr`; mean differences: one-sample
t-test against 0.

**Controls** (`role`): *control* rows re-test a claim against what it would show without the
effect it names and are judged like a claim; *reference* rows give the control's own figure,
for information. The random control is `trace_dataset(..., method="random")`: one uniformly
drawn edge subgraph per prompt and grid size, the same edge counts. 2a/2b/2c: the same rho for
random subgraphs, and the partial Spearman rho with random-subgraph AUC partialled out (ranks
of both variables regressed by least squares on the control's ranks, Pearson correlation of
the residuals; t-test with n - 2 - k degrees of freedom; percentile bootstrap). 1b.attn,
1b.mlp: 1b per kind at the minimal core (s = 1e-3), each kind against its own layer spread
(first-quartile share among the core's attention or MLP edges minus that share among all
edges of the kind; in components, the mean depth of all heads or MLPs minus that of those
the core touches; prompts whose core holds none of the kind are left out). 1d.base: the
refinement band's attention share against the pool outside the minimal core. 3.control:
traced minus random log10-rank difference per prompt.

**Multiplicity**: every judged row's p-value (claims, controls, sanity checks, of every model
in the report; reference rows excluded) is Holm-Bonferroni adjusted as one family (`p_holm`);
`verdict_holm` turns a *holds* whose adjusted p-value is not below {alpha:g} into
*inconclusive* and keeps the other verdicts.
"""


def _pivot(frame: pd.DataFrame, bands: list[str]) -> pd.DataFrame:
    """Band summaries as one row per band, one column per quantity (means)."""
    table = frame.pivot_table(index="band", columns="quantity", values="mean", sort=False)
    table = table.reindex([b for b in bands if b in table.index])
    return table.reset_index()


def model_section(run: EdgeModelRun) -> list[str]:
    t, r, sec = run.tables, run.traced, run.seconds
    core = t["core"]
    order = ["construction", "minimal_core", "refinement", "full", "outside_core"]
    composition = _pivot(t["composition_bands"], order)
    projection = _pivot(t["projection_bands"], order)
    phases = _pivot(t["phase_bands"], order)
    lines = [
        f"## {run.name}",
        "",
        f"{r.n_layers} blocks x {r.n_heads} heads; {r.n_prompts} prompts of "
        f"{int(r.n_pos.min())}-{int(r.n_pos.max())} tokens, "
        f"{min(r.n_edges(p) for p in range(r.n_prompts))}-"
        f"{max(r.n_edges(p) for p in range(r.n_prompts))} edges each; {len(r.grid)} sizes "
        f"({r.grid[0]:g} to {r.grid[-1]:g}). Tracing time: {sec.get('traced', 0):.0f} s "
        f"traced, {sec.get('random', 0):.0f} s random in this invocation (the shards record "
        f"{sec.get('traced_shards', 0):.0f} s and {sec.get('random_shards', 0):.0f} s over "
        f"every session of a resumed run; per shard: `tables/{slug_of(run.name)}/shards.csv`).",
        "",
        "### Density and uncertainty",
        "",
        f"Mean AUC (TV x decades): traced {t['density']['auc'].mean():.3f}, random "
        f"{t['random_density']['auc'].mean():.3f}; mean density per decade: traced "
        f"{t['density']['density'].mean():.3f}, random "
        f"{t['random_density']['density'].mean():.3f}.",
        "",
        markdown_table(t["uncertainty_controls"],
                       ["measure", "statistic", "rho", "ci_low", "ci_high", "p_value", "n"]),
        "",
        "### Phases in edges (composition: shares of kept edges; means over prompts)",
        "",
        markdown_table(composition),
        "",
        "### The same subgraphs in components (node projection; means over prompts)",
        "",
        markdown_table(projection),
        "",
        "### The phase claims' quantities (means over prompts)",
        "",
        markdown_table(phases),
        "",
        f"1a's core (smallest subgraph with the full model's top-1 token): reached below the "
        f"full graph by {int(core['reached'].sum())} of {len(core)} prompts.",
        "",
    ]  # fmt: skip
    return lines


def _not_measured(claims: pd.DataFrame) -> dict[str, str]:
    """The node-level claims this report lacks, and why: S2 always, 2b without targets."""
    missing = {} if (claims["id"] == "2b").any() else {"2b": NO_TARGETS}
    return {**missing, **NO_EDGE_ANALOGUE}


def write_edge_report(repro: EdgeReproduction, settings: dict[str, Any]) -> Path:
    """Write ``report.md`` of an edge reproduction (atomically)."""
    lines = report_opening(
        "s-Trace reproduction report (edge granularity)",
        "Claims of Kervadec et al., *Tracing Computation Density in LLMs* (arXiv 2605.27033), "
        "section 1 of the method reference, measured at the paper's own granularity: "
        "token-level edges, zero ablation, the paper's size grid and phase bands; every "
        "phase claim also in components (heads and MLPs touched).",
        settings,
        repro.claims,
        EDGE_RULES.format(
            min_n=settings["min_prompts"], small_core=settings["small_core"], alpha=ALPHA
        ),
    )
    lines += [
        "### Node-level claims without an edge analogue, or not measured",
        "",
        *[f"- **{key}**: {why}." for key, why in _not_measured(repro.claims).items()],
        "",
    ]
    if repro.agreement_controls is not None:
        lines += [
            "## Cross-model agreement of per-prompt density",
            "",
            markdown_table(
                repro.agreement_controls,
                [
                    "model_a",
                    "model_b",
                    "measure",
                    "statistic",
                    "rho",
                    "ci_low",
                    "ci_high",
                    "p_value",
                    "n",
                ],
            ),
            "",
        ]
    for run in repro.runs:
        lines += model_section(run)
    lines += [
        "## Figures and tables",
        "",
        "Figures (one page per model: fidelity of the traced subgraphs and the random "
        "control, the composition in edge units, the token-level circuit of the first "
        "prompt): "
        + ", ".join(f"[`{figures_path(r.name)}`]({figures_path(r.name)})" for r in repro.runs)
        + ". Every table is a CSV next to this report: "
        + ", ".join(f"`tables/{slug_of(repro.runs[0].name)}/{k}.csv`"
                    for k in sorted(repro.runs[0].tables))
        + (" (one folder per model), `tables/agreement_controls.csv`"
           if len(repro.runs) > 1 else "")
        + ", and `claims.csv`.",
        "",
    ]  # fmt: skip
    path = repro.out_dir / "report.md"
    write_text(path, "\n".join(lines), repro.out_dir)
    return path


__all__ = ["EDGE_RULES", "figures_path", "model_section", "write_edge_report"]
