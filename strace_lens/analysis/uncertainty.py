"""Density follows uncertainty: rank correlation of per-prompt density with the full model's
entropy, and with its loss on the true next word; and the same density across two models.

Density is :func:`strace_lens.analysis.density` (normalised AUC-TV). Loss is
``-target_logprob``, the full model's negative log-probability of the prompt's true next token
(the first token of the TSV's next-token column), recorded by ``trace(..., targets=...)``.
Intervals: percentile bootstrap over prompts; p-values: SciPy's ``spearmanr``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from strace_lens.analysis._stats import DEFAULT_BOOT, spearman_ci
from strace_lens.analysis.density import density
from strace_lens.result import TraceResult


def uncertainty(
    result: TraceResult,
    metric: str = "tv",
    n_boot: int = DEFAULT_BOOT,
    ci: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Spearman rho of density with ``entropy`` and with ``loss`` (one line each).

    Columns: ``against``, ``rho``, ``ci_low``, ``ci_high``, ``p_value``, ``n``, ``ci``. The
    loss line is NaN with ``n = 0`` when the trace recorded no targets.
    """
    frame = density(result, metric)
    rows = []
    for against in ("entropy", "loss"):
        stats = spearman_ci(frame["density"], frame[against], n_boot, ci, seed)
        rows.append({"against": against, **stats, "ci": ci})
    out = pd.DataFrame(rows)
    out["n"] = out["n"].astype(int)
    return out


def agreement(
    result_a: TraceResult,
    result_b: TraceResult,
    metric: str = "tv",
    n_boot: int = DEFAULT_BOOT,
    ci: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Spearman rho of per-prompt density between two results (e.g. two models).

    Prompts are matched by text; only prompts traced in both count (``n``), and at least 3
    are needed. Columns: ``model_a``, ``model_b``, ``rho``, ``ci_low``, ``ci_high``,
    ``p_value``, ``n``, ``ci``.
    """
    da = density(result_a, metric).drop_duplicates("text").set_index("text")["density"]
    db = density(result_b, metric).drop_duplicates("text").set_index("text")["density"]
    common = [t for t in da.index if t in db.index]
    if len(common) < 3:
        raise ValueError(
            f"The two results share {len(common)} prompt(s) (matched by text): agreement needs "
            "at least 3. Trace the same prompts with both models."
        )
    stats = spearman_ci(np.asarray(da.loc[common]), np.asarray(db.loc[common]), n_boot, ci, seed)
    return pd.DataFrame(
        [
            {
                "model_a": _model_name(result_a),
                "model_b": _model_name(result_b),
                **stats,
                "n": len(common),
                "ci": ci,
            }
        ]
    )


def _model_name(result: TraceResult) -> str:
    model = result.options.get("model")
    if isinstance(model, dict):
        return str(model.get("name") or model.get("model_name") or model)
    return str(model) if model is not None else "?"
