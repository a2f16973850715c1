"""The paper's claims at edge granularity, in its units, with their controls.

Every phase claim is stated twice: in edges (the paper's unit: shares of kept token-level
edges) and in components (the node projection of the same subgraphs: heads and MLPs
touched; ids ending in ``.components``). The phases are the paper's fixed bands of relative
size (construction 1e-4 to 1e-2, refinement 1e-2 to 1, minimal core 1e-3), read per prompt as
the mean of its curve over log10 s across the band (:mod:`strace_lens.analysis.edge_phases`).

- **1a** the smallest traced subgraph giving the full model's top-1 token, median relative
  size in edges against ``small_core`` (default 1e-2, the end of the construction band;
  interval widened to the grid step below each core; *undetermined* when an end of it is on
  the threshold); in components: the share of heads and MLPs that core touches, against 0.1.
- **1b** edges: the construction band's first-quartile share minus the first quartile's
  share of all the prompt's edges (> 0: the early core); components: mean depth of all
  components minus the construction band's component mean depth. Controls **1b.attn /
  1b.mlp** (and ``.components``): 1b per kind, each kind against its own layer spread, at
  the minimal core (s = 1e-3) rather than over the construction band, whose smallest
  subgraphs mostly hold no attention edge (a kind's share is undefined there): the
  first-quartile share among the core's attention (MLP) edges minus that share among all
  attention (MLP) edges; the mean depth of all heads (MLPs) minus that of those it touches.
- **1c** refinement-band minus construction-band mean depth (of the edges' target blocks;
  of the touched components).
- **1d** refinement-band minus construction-band attention share (of edges; of touched
  components, heads over heads and MLPs); control **1d.base**: the refinement band's share
  minus the share among what the minimal core leaves (the edges outside the core subgraph at
  s = 1e-3; the components it does not touch): the base rate a refinement drawn from that
  pool would have anyway.
- **2a** Spearman rho(density, entropy) with density the paper's AUC (TV x decades); beside
  it the same for the random control (reference), random density partialled out (control)
  and the per-decade density (reference). **2b** likewise against the full model's loss on
  the true next token (read by one clean forward, :func:`strace_lens.edges.edge_target_loss`,
  when the prompts have targets: a 6-column TSV), with its reference and control. **2c**
  (two models) likewise across the models.
- **3** the sparse subgraphs' (grid sizes up to ``small_core``) top-1 token's log10
  frequency rank minus the full model's; the same for the random control (reference) and
  traced minus random (control).
- **S1** AUC of the random control minus the traced family's (> 0: traced beats random).

No edge analogue: S2 (inverse subgraphs are not scored there). 2b needs the prompts' true
next tokens (:data:`NO_TARGETS` says so when they have none).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from jaxtyping import Float

from strace_lens import analysis as an
from strace_lens.analysis._stats import DEFAULT_BOOT
from strace_lens.analysis.edge_composition import EdgeComposition
from strace_lens.edges.result import EdgeTraceResult
from strace_lens.reproduce.claims import (
    CLAIM,
    COLUMNS,
    CONTROL,
    MIN_PROMPTS,
    REFERENCE,
    SANITY,
    Spec,
    claim,
    claim_rows,
    sign_test,
    with_multiplicity,
)
from strace_lens.reproduce.config import EDGE_SMALL_CORE, NODE_SMALL_CORE

#: node-level claims without an edge analogue, and why (the report prints these)
NO_EDGE_ANALOGUE = {
    "S2": "removing the subgraph: inverse subgraphs are not scored at edge granularity",
}
#: why 2b is missing from a report whose prompts have no true next token
NO_TARGETS = (
    "the loss on the true next word: not measured, the prompts have no true next token (a "
    "6-column TSV gives it in column 6; a plain-text file has none)"
)


@dataclass
class EdgeModelRun:
    """The traces, tables and claims of one model at edge granularity."""

    name: str
    identity: dict[str, Any]
    traced: EdgeTraceResult
    random: EdgeTraceResult
    composition: EdgeComposition
    tables: dict[str, pd.DataFrame]
    claims: pd.DataFrame
    seconds: dict[str, float]


@dataclass
class EdgeReproduction:
    """What ``reproduce(..., granularity="edge")`` returns."""

    out_dir: Path
    report: Path
    runs: list[EdgeModelRun]
    claims: pd.DataFrame
    agreement_controls: pd.DataFrame | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    #: the HTML figure page of each model (fidelity, composition, token-level circuit)
    figures: list[Path] = field(default_factory=list)


def analyse_edges(
    traced: EdgeTraceResult,
    random: EdgeTraceResult,
    counts: Any,
    n_boot: int = DEFAULT_BOOT,
    seed: int = 0,
    small_core: float = EDGE_SMALL_CORE,
    loss: Float[np.ndarray, " prompt"] | None = None,
) -> tuple[EdgeComposition, dict[str, pd.DataFrame]]:
    """Every edge analysis of one model's traced family and random control, as tables.

    ``loss``: the full model's loss on each prompt's true next token
    (:func:`strace_lens.edges.edge_target_loss`), for 2b; None when the prompts have none.
    """
    comp = an.edge_composition(traced)
    projection = an.edge_projection(traced)
    phases = an.edge_phases(traced)
    ranks = an.frequency_ranks(counts)
    traced_diffs = an.sparse_rank_diffs(traced, ranks, small_core)
    random_diffs = an.sparse_rank_diffs(random, ranks, small_core)
    density = an.edge_density(traced)
    if loss is not None:
        density["loss"] = np.asarray(loss, dtype=float)
    curves = pd.DataFrame({"size": list(traced.grid)})
    for label, r in (("traced", traced), ("random", random)):
        for metric, values in r.metrics.items():
            curves[f"{label}_{metric}"] = values.double().mean(0).numpy()
    tables = {
        "composition": comp.table(),
        "composition_bands": comp.bands(),
        "projection": projection,
        "projection_bands": an.projection_bands(traced, table=projection),
        "phases": phases.per_prompt(),
        "phase_bands": phases.bands(),
        "core": an.edge_core_sizes(traced),
        "density": density,
        "random_density": an.edge_density(random),
        "uncertainty_controls": an.edge_uncertainty_controls(
            traced, random, n_boot=n_boot, seed=seed, loss=loss
        ),
        "frequency": pd.DataFrame(
            {
                "prompt": np.arange(traced.n_prompts),
                "traced_diff_log10_rank": traced_diffs,
                "random_diff_log10_rank": random_diffs,
            }
        ),
        "curves": curves,
    }
    return comp, tables


def _by_band(tables: dict[str, pd.DataFrame], quantity: str, band: str) -> np.ndarray:
    ph = tables["phases"]
    return ph[ph["quantity"] == quantity].sort_values("prompt")[band].to_numpy(dtype=float)


def _core_claims(
    tables: dict[str, pd.DataFrame],
    n_boot: int,
    seed: int,
    min_n: int,
    small_core: float,
    model: str,
) -> list[dict[str, Any]]:
    """1a in edges (grid-bracketed, sign test) and in components."""
    core = tables["core"]
    upper = core["relative_size"].to_numpy(dtype=float)
    lower = core["lower_relative_size"].to_numpy(dtype=float)
    stats = dict(an.median_ci(upper, n_boot, seed=seed))
    stats["ci_low"] = an.median_ci(lower, n_boot, seed=seed)["ci_low"]
    stats["p_value"] = sign_test(lower, upper, small_core)
    share = core["component_share"].to_numpy(dtype=float)
    comp_stats = dict(an.median_ci(share, n_boot, seed=seed))
    comp_stats["p_value"] = sign_test(share, share, NODE_SMALL_CORE)
    text = "1a. Two phases: a small subgraph already reproduces the full model's top-1 token"
    return [
        claim(text, "median relative size (edges) of the smallest traced subgraph sharing the "
              "top-1 token; interval widened to the grid step below each core; p: sign test "
              "against the threshold", stats, "median", "less", small_core, min_n, model,
              key="1a", touching=True),
        claim(f"{text} (in components)", "median share of heads and MLPs touched by that "
              "subgraph; p: sign test against the threshold", comp_stats, "median", "less",
              NODE_SMALL_CORE, min_n, model, key="1a.components", touching=True),
    ]  # fmt: skip


#: the node kinds of 1b's per-kind controls: id suffix, edge word, components (plural, one)
_KINDS = (("attn", "attention", "heads", "head"), ("mlp", "MLP", "MLPs", "MLP"))


def _phase_claims(
    tables: dict[str, pd.DataFrame], n_boot: int, seed: int, min_n: int, model: str
) -> list[dict[str, Any]]:
    """1b-1d in edges and in components, and 1d against its base rate."""

    def diff(quantity: str, a: str, b: str) -> dict[str, float]:
        values = _by_band(tables, quantity, a) - _by_band(tables, quantity, b)
        return an.mean_ci(values, n_boot, seed=seed)

    bands = "construction band (1e-4 to 1e-2), refinement band (1e-2 to 1)"
    specs: list[Spec] = [
        ("1b", CLAIM, "1b. Two phases: the core is made of early-layer edges",
         "mean over prompts of (first-quartile share of the construction band's edges - the "
         "first quartile's share of all edges)", diff("edge_q1_share", "construction", "full"),
         "mean", "greater", 0.0),
        ("1b.components", CLAIM, "1b. Two phases: the core is made of early-layer components",
         "mean over prompts of (mean depth of all heads and MLPs - mean depth of those the "
         "construction band touches); depth 0 = first block, 1 = last",
         diff("component_mean_depth", "full", "construction"), "mean", "greater", 0.0),
        *[(f"1b.{kind}", CONTROL,
           f"Control of 1b: the core's {edges} edges lie earlier than all {edges} edges",
           f"mean over prompts of (first-quartile share of the {edges} edges of the subgraph at "
           f"s = 1e-3 - that share among all {edges} edges)",
           diff(f"{kind}_edge_q1_share", "minimal_core", "full"), "mean", "greater", 0.0)
          for kind, edges, _, _ in _KINDS],
        *[(f"1b.{kind}.components", CONTROL,
           f"Control of 1b: the core's {nodes} lie earlier than the average {node}",
           f"mean over prompts of (mean depth of all {nodes} - mean depth of the {nodes} the "
           f"subgraph at s = 1e-3 touches)" + (", over prompts whose core touches a head"
                                                if kind == "attn" else ""),
           diff(f"{node.lower()}_mean_depth", "full", "minimal_core"), "mean", "greater", 0.0)
          for kind, _, nodes, node in _KINDS],
        ("1c", CLAIM, "1c. Two phases: refinement edges lie in later layers than the core",
         f"mean over prompts of (refinement - construction) mean target-block depth; {bands}",
         diff("edge_mean_depth", "refinement", "construction"), "mean", "greater", 0.0),
        ("1c.components", CLAIM,
         "1c. Two phases: refinement components lie in later layers than the core",
         "mean over prompts of (refinement - construction) mean depth of touched components",
         diff("component_mean_depth", "refinement", "construction"), "mean", "greater", 0.0),
        ("1d", CLAIM, "1d. Two phases: the refinement is richer in attention edges",
         "mean over prompts of (refinement - construction) attention share of edges",
         diff("edge_attn_share", "refinement", "construction"), "mean", "greater", 0.0),
        ("1d.base", CONTROL,
         "Control of 1d: richer in attention edges than the edges outside the minimal core",
         "mean over prompts of (refinement attention share - attention share of the edges "
         "outside the subgraph at s = 1e-3)",
         diff("edge_attn_share", "refinement", "outside_core"), "mean", "greater", 0.0),
        ("1d.components", CLAIM, "1d. Two phases: the refinement is richer in attention heads",
         "mean over prompts of (refinement - construction) share of heads among touched "
         "components", diff("component_head_share", "refinement", "construction"), "mean",
         "greater", 0.0),
        ("1d.base.components", CONTROL,
         "Control of 1d: richer in heads than the components the minimal core leaves",
         "mean over prompts of (refinement head share - head share of the components the "
         "subgraph at s = 1e-3 does not touch)",
         diff("component_head_share", "refinement", "outside_core"), "mean", "greater", 0.0),
    ]  # fmt: skip
    return claim_rows(specs, min_n, model)


def _density_claims(
    tables: dict[str, pd.DataFrame], n_boot: int, seed: int, min_n: int, model: str
) -> list[dict[str, Any]]:
    """2a (AUC, the paper's units) with its controls, the per-decade density, 2b with its
    controls when the tables hold the loss, and S1."""
    controls = tables["uncertainty_controls"]

    def line(measure: str, statistic: str, against: str = "entropy") -> dict[str, Any]:
        chosen = controls[(controls["measure"] == measure) & (controls["statistic"] == statistic)
                          & (controls["against"] == against)]  # fmt: skip
        return {str(k): v for k, v in chosen.iloc[0].to_dict().items()}

    auc_gap = tables["random_density"]["auc"].to_numpy(dtype=float) - tables["density"][
        "auc"
    ].to_numpy(dtype=float)
    text = "2a. Density follows uncertainty: density rises with the full model's entropy"
    specs: list[Spec] = [
        ("2a", CLAIM, text, "Spearman rho(AUC of TV over log10 s, entropy) over prompts",
         line("auc", "traced"), "rho", "greater", 0.0),
        ("2a.random", REFERENCE,
         "Control of 2a (reference): the same rho for equal-size random edge subgraphs",
         "Spearman rho(random-subgraph AUC, entropy)", line("auc", "random"),
         "rho", "greater", 0.0),
        ("2a.partial", CONTROL,
         "Control of 2a: the same with random-subgraph density partialled out",
         "partial Spearman rho(AUC, entropy | random-subgraph AUC)",
         line("auc", "partial"), "rho", "greater", 0.0),
        ("2a.density", REFERENCE, "2a with the normalised density (AUC per decade)",
         "Spearman rho(AUC / span, entropy)", line("density", "traced"),
         "rho", "greater", 0.0),
    ]  # fmt: skip
    if (controls["against"] == "loss").any():
        text = "2b. Density follows uncertainty: density rises with the loss on the true next word"
        specs += [
            ("2b", CLAIM, text,
             "Spearman rho(AUC of TV over log10 s, -log p(true next token)) over prompts",
             line("auc", "traced", "loss"), "rho", "greater", 0.0),
            ("2b.random", REFERENCE,
             "Control of 2b (reference): the same rho for equal-size random edge subgraphs",
             "Spearman rho(random-subgraph AUC, -log p(true next token))",
             line("auc", "random", "loss"), "rho", "greater", 0.0),
            ("2b.partial", CONTROL,
             "Control of 2b: the same with random-subgraph density partialled out",
             "partial Spearman rho(AUC, -log p(true next token) | random-subgraph AUC)",
             line("auc", "partial", "loss"), "rho", "greater", 0.0),
        ]  # fmt: skip
    specs += [
        ("S1", SANITY, "S1. Sanity: traced edge subgraphs beat random ones of equal size",
         "mean over prompts of AUC(random) - AUC(traced), TV x decades",
         an.mean_ci(auc_gap, n_boot, seed=seed), "mean", "greater", 0.0),
    ]  # fmt: skip
    return claim_rows(specs, min_n, model)


def _frequency_claims(
    tables: dict[str, pd.DataFrame],
    n_boot: int,
    seed: int,
    min_n: int,
    small_core: float,
    model: str,
) -> list[dict[str, Any]]:
    freq = tables["frequency"]
    traced = freq["traced_diff_log10_rank"].to_numpy(dtype=float)
    random = freq["random_diff_log10_rank"].to_numpy(dtype=float)
    sizes = f"non-empty subgraphs of grid size <= {small_core:g}"
    specs: list[Spec] = [
        ("3", CLAIM, "3. Sparse subgraphs favour frequent tokens",
         "mean over prompts of log10 frequency rank of the sparse subgraphs' top-1 token "
         f"minus the full model's ({sizes}; < 0: more frequent)",
         an.mean_ci(traced, n_boot, seed=seed), "mean", "less", 0.0),
        ("3.random", REFERENCE, "Control of 3 (reference): random edge subgraphs of the same sizes",
         f"the same mean for the random control ({sizes})",
         an.mean_ci(random, n_boot, seed=seed), "mean", "less", 0.0),
        ("3.control", CONTROL,
         "Control of 3: sparse traced subgraphs favour frequent tokens more than random ones",
         f"mean over prompts of (traced - random) mean log10 frequency rank ({sizes})",
         an.mean_ci(traced - random, n_boot, seed=seed), "mean", "less", 0.0),
    ]  # fmt: skip
    return claim_rows(specs, min_n, model)


def edge_claims_of(
    tables: dict[str, pd.DataFrame],
    model: str,
    n_boot: int = DEFAULT_BOOT,
    seed: int = 0,
    min_n: int = MIN_PROMPTS,
    small_core: float = EDGE_SMALL_CORE,
) -> pd.DataFrame:
    """One row per edge-level claim, control and sanity check of one model (module
    docstring), with p-values Holm-adjusted over this table."""
    rows = _core_claims(tables, n_boot, seed, min_n, small_core, model)
    rows += _phase_claims(tables, n_boot, seed, min_n, model)
    rows += _density_claims(tables, n_boot, seed, min_n, model)
    rows += _frequency_claims(tables, n_boot, seed, min_n, small_core, model)
    return with_multiplicity(pd.DataFrame(rows, columns=COLUMNS))


def edge_agreement_claims(
    runs: list[EdgeModelRun],
    n_boot: int = DEFAULT_BOOT,
    seed: int = 0,
    min_n: int = MIN_PROMPTS,
) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """2c for two models at edge granularity: the controls table and the claim rows."""
    a, b = runs
    controls = an.edge_agreement_controls(a.traced, a.random, b.traced, b.random,
                                          n_boot=n_boot, seed=seed)  # fmt: skip
    controls.insert(0, "model_b", b.name)
    controls.insert(0, "model_a", a.name)
    line = controls[controls["measure"] == "auc"].set_index("statistic")
    specs: list[Spec] = [
        ("2c", CLAIM, "2c. Per-input density is correlated across models",
         "Spearman rho of per-prompt AUC, model A vs model B",
         line.loc["traced"].to_dict(), "rho", "greater", 0.0),
        ("2c.random", REFERENCE,
         "Control of 2c (reference): the same rho for equal-size random edge subgraphs",
         "Spearman rho of per-prompt random-subgraph AUC, model A vs model B",
         line.loc["random"].to_dict(), "rho", "greater", 0.0),
        ("2c.partial", CONTROL,
         "Control of 2c: the same with both models' random-subgraph density partialled out",
         "partial Spearman rho(AUC A, AUC B | random AUC A, random AUC B)",
         line.loc["partial"].to_dict(), "rho", "greater", 0.0),
    ]  # fmt: skip
    return controls, claim_rows(specs, min_n, f"{a.name} vs {b.name}")


__all__ = [
    "NO_EDGE_ANALOGUE",
    "NO_TARGETS",
    "EdgeModelRun",
    "EdgeReproduction",
    "analyse_edges",
    "edge_agreement_claims",
    "edge_claims_of",
]
