"""Controls for the paper's claims: what each statistic would show without the effect it names.

- **Density against uncertainty** (:func:`uncertainty_controls`) and **across models**
  (:func:`agreement_controls`): a prompt can look dense to any subgraph, traced or not (a
  long or odd prompt is hard to reproduce from few nodes whichever they are). So beside the
  traced rho, the same rho for equal-size random subgraphs (the random baseline's per-prompt
  density), and the traced rho with random density partialled out (partial Spearman: ranks,
  residuals after least squares on the control's ranks; see ``_stats``).
- **Depth of the core per node kind** (:func:`core_depth_by_kind`): the core's mean depth
  among its MLPs against all candidate MLPs, and among its heads against all candidate heads,
  so a core rich in one kind is compared with that kind's own layer spread.
- **Attention share against its base rate** (:func:`refinement_base_rate`): the refinement
  is drawn from the candidates outside the core; if the core is MLP-rich, that pool is
  attention-rich, and any refinement (even a random one) looks richer in heads than the core.
  The control is the refinement's attention share minus the pool's.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float

from strace_lens.analysis._common import relative_depth
from strace_lens.analysis._stats import DEFAULT_BOOT, partial_spearman_ci, spearman_ci
from strace_lens.analysis.baselines import _check_same_prompts
from strace_lens.analysis.density import density
from strace_lens.analysis.phases import split_core, split_refinement
from strace_lens.result import TraceResult


def uncertainty_controls(
    result: TraceResult,
    random: TraceResult,
    metric: str = "tv",
    n_boot: int = DEFAULT_BOOT,
    ci: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Density against entropy and loss: traced, random subgraphs, and traced | random.

    ``random`` is ``trace(..., method="random")`` on the same prompts and sizes. One line per
    (``against`` in entropy / loss, ``statistic`` in traced / random / partial): ``rho`` is
    Spearman rho(traced density, against), rho(random density, against), or the partial
    Spearman rho(traced density, against | random density). Columns: ``against``,
    ``statistic``, ``rho``, ``ci_low``, ``ci_high``, ``p_value``, ``n``, ``ci``. The traced
    line equals :func:`strace_lens.analysis.uncertainty` (same seed).
    """
    _check_same_prompts(result, random)
    traced = density(result, metric)
    rand = density(random, metric)["density"].to_numpy()
    rows = []
    for against in ("entropy", "loss"):
        values = traced[against].to_numpy()
        d = traced["density"].to_numpy()
        for line in correlation_lines(d, rand, values, n_boot, ci, seed):
            rows.append({"against": against, **line})
    out = pd.DataFrame(rows)
    out["n"] = out["n"].astype(int)
    return out


def agreement_controls(
    result_a: TraceResult,
    random_a: TraceResult,
    result_b: TraceResult,
    random_b: TraceResult,
    metric: str = "tv",
    n_boot: int = DEFAULT_BOOT,
    ci: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Cross-model agreement of per-prompt density: traced, random, and traced | random.

    Prompts matched by text (those traced in all four results). Lines: ``traced``
    (rho(density A, density B), as :func:`strace_lens.analysis.agreement`), ``random``
    (rho(random density A, random density B)) and ``partial`` (rho(density A, density B)
    with both models' random density partialled out). Columns: ``statistic``, ``rho``,
    ``ci_low``, ``ci_high``, ``p_value``, ``n``, ``ci``.
    """
    _check_same_prompts(result_a, random_a)
    _check_same_prompts(result_b, random_b)
    per_text = [
        density(r, metric).drop_duplicates("text").set_index("text")["density"]
        for r in (result_a, random_a, result_b, random_b)
    ]
    common = [t for t in per_text[0].index if t in per_text[2].index]
    if len(common) < 3:
        raise ValueError(
            f"The two models share {len(common)} prompt(s) (matched by text): agreement needs "
            "at least 3 (the partial line, 5). Trace the same prompts with both models."
        )
    da, ra, db, rb = (np.asarray(s.loc[common], dtype=float) for s in per_text)
    out = pd.DataFrame(cross_model_lines(da, ra, db, rb, n_boot, ci, seed))
    out["n"] = out["n"].astype(int)
    return out


def correlation_lines(
    traced: Float[np.ndarray, " prompt"],
    random: Float[np.ndarray, " prompt"],
    against: Float[np.ndarray, " prompt"],
    n_boot: int = DEFAULT_BOOT,
    ci: float = 0.95,
    seed: int = 0,
) -> list[dict[str, float | str]]:
    """The three lines of a density correlation and its control, from per-prompt values:
    ``traced`` (Spearman rho(traced, against)), ``random`` (rho(random, against)) and
    ``partial`` (rho(traced, against | random)); each ``{"statistic", "rho", "ci_low",
    "ci_high", "p_value", "n", "ci"}``. Node and edge densities alike."""
    return [
        {"statistic": statistic, **stats, "ci": ci}
        for statistic, stats in (
            ("traced", spearman_ci(traced, against, n_boot, ci, seed)),
            ("random", spearman_ci(random, against, n_boot, ci, seed)),
            ("partial", partial_spearman_ci(traced, against, random, n_boot, ci, seed)),
        )
    ]


def cross_model_lines(
    traced_a: Float[np.ndarray, " prompt"],
    random_a: Float[np.ndarray, " prompt"],
    traced_b: Float[np.ndarray, " prompt"],
    random_b: Float[np.ndarray, " prompt"],
    n_boot: int = DEFAULT_BOOT,
    ci: float = 0.95,
    seed: int = 0,
) -> list[dict[str, float | str]]:
    """The three lines of a cross-model agreement from matched per-prompt values: ``traced``
    (rho(traced A, traced B)), ``random`` (rho(random A, random B)) and ``partial``
    (rho(traced A, traced B | random A, random B))."""
    both = np.stack([random_a, random_b], 1)
    return [
        {"statistic": statistic, **stats, "ci": ci}
        for statistic, stats in (
            ("traced", spearman_ci(traced_a, traced_b, n_boot, ci, seed)),
            ("random", spearman_ci(random_a, random_b, n_boot, ci, seed)),
            ("partial", partial_spearman_ci(traced_a, traced_b, both, n_boot, ci, seed)),
        )
    ]


def core_depth_by_kind(result: TraceResult, core_nucleus: float = 1.0) -> pd.DataFrame:
    """Per mask row and node kind: the core's mean depth against all candidates of that kind.

    Lines per (``row``, ``kind`` in attn / mlp): ``n_nodes`` (the core's nodes of that kind),
    ``core_mean_depth`` (their mean relative depth; NaN when there are none or no core),
    ``base_mean_depth`` (mean relative depth of every candidate of that kind) and
    ``depth_gap`` = base - core (positive: the core's nodes of that kind lie earlier).
    """
    _, core = split_core(result, core_nucleus)
    depth = relative_depth(result)
    frames = []
    for kind, of_kind in (("attn", result.graph.is_attn), ("mlp", ~result.graph.is_attn)):
        pool = result.candidates & of_kind
        base = float(depth[pool].mean()) if pool.any() else float("nan")
        m = (core & of_kind).double()
        count = m.sum(1)
        mean = torch.where(count > 0, (m * depth).sum(1) / count.clamp(min=1), torch.nan)
        frames.append(
            pd.DataFrame(
                {
                    "row": np.arange(core.shape[0]),
                    "kind": kind,
                    "n_nodes": count.numpy().astype(int),
                    "core_mean_depth": mean.numpy(),
                    "base_mean_depth": base,
                    "depth_gap": base - mean.numpy(),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def refinement_base_rate(
    result: TraceResult, core_nucleus: float = 1.0, refined_nucleus: float = 90.0
) -> pd.DataFrame:
    """Per mask row: the refinement's attention share against the pool it was drawn from.

    The pool is the candidates outside the core (every node the refinement could add).
    Columns: ``row``, ``n_nodes`` (refinement), ``attn_share`` (refinement), ``pool_size``,
    ``pool_attn_share``, ``core_attn_share`` and ``excess`` = attn_share - pool_attn_share
    (NaN without a core or with an empty refinement). A refinement that is the whole pool has
    an excess of exactly 0.
    """
    _, core = split_core(result, core_nucleus)
    _, refinement, _ = split_refinement(result, core_nucleus, refined_nucleus)
    is_attn = result.graph.is_attn.double()

    def share(mask: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        m = mask.double()
        count = m.sum(1)
        value = torch.where(count > 0, (m * is_attn).sum(1) / count.clamp(min=1), torch.nan)
        return count.numpy(), value.numpy()

    has_core = core.any(1)
    pool = result.candidates[None] & ~core & has_core[:, None]
    n_ref, ref_share = share(refinement)
    n_pool, pool_share = share(pool)
    _, core_share = share(core)
    return pd.DataFrame(
        {
            "row": np.arange(core.shape[0]),
            "n_nodes": n_ref.astype(int),
            "attn_share": ref_share,
            "pool_size": n_pool.astype(int),
            "pool_attn_share": pool_share,
            "core_attn_share": core_share,
            "excess": ref_share - pool_share,
        }
    )


__all__ = [
    "agreement_controls",
    "core_depth_by_kind",
    "correlation_lines",
    "cross_model_lines",
    "refinement_base_rate",
    "uncertainty_controls",
]
