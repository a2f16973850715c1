"""The paper's analyses of s-Trace results, each taking ``TraceResult``s and returning a
pandas DataFrame (definitions: the method reference, section 4; rules: each module's
docstring).

- :func:`density`, :func:`density_curve`: AUC of TV versus log10(relative size), per prompt,
  and the mean curve on a common log grid.
- :func:`nucleus_recovery`, :func:`recovery_sizes`: smallest size sharing the top-k % nucleus.
- :func:`composition`: attention / MLP and layer-quartile shares versus size.
- :func:`phases`, :func:`split_core`, :func:`split_refinement`: early core vs late refinement.
- :func:`usage`, :func:`lorenz`, :func:`gini_by_size`: how often each node is used.
- :func:`uncertainty`, :func:`agreement`: density versus entropy / loss; across two models.
- :func:`unigram`, :func:`token_counts`: frequency rank of the tokens subgraphs predict.
- :func:`baselines`, :func:`baseline_gap`: inverse and random curves next to the trace.
- :func:`uncertainty_controls`, :func:`agreement_controls`, :func:`core_depth_by_kind`,
  :func:`refinement_base_rate`: the claims' controls (random subgraphs, partial correlation,
  per-kind depth, base rates); :func:`partial_spearman_ci`, :func:`holm`: their statistics.
"""

from strace_lens.analysis._stats import (
    gini,
    holm,
    lorenz_points,
    mean_ci,
    median_ci,
    partial_spearman_ci,
    spearman_ci,
)
from strace_lens.analysis.baselines import baseline_gap, baselines
from strace_lens.analysis.composition import composition
from strace_lens.analysis.controls import (
    agreement_controls,
    core_depth_by_kind,
    refinement_base_rate,
    uncertainty_controls,
)
from strace_lens.analysis.density import density, density_curve, interpolate_curves
from strace_lens.analysis.phases import phases, split_core, split_refinement
from strace_lens.analysis.recovery import RECOVERY_LEVELS, nucleus_recovery, recovery_sizes
from strace_lens.analysis.uncertainty import agreement, uncertainty
from strace_lens.analysis.unigram import frequency_ranks, token_counts, unigram
from strace_lens.analysis.usage import gini_by_size, lorenz, usage

__all__ = [
    "RECOVERY_LEVELS",
    "agreement",
    "agreement_controls",
    "baseline_gap",
    "baselines",
    "composition",
    "core_depth_by_kind",
    "density",
    "density_curve",
    "frequency_ranks",
    "gini",
    "gini_by_size",
    "holm",
    "interpolate_curves",
    "lorenz",
    "lorenz_points",
    "mean_ci",
    "median_ci",
    "nucleus_recovery",
    "partial_spearman_ci",
    "phases",
    "recovery_sizes",
    "refinement_base_rate",
    "spearman_ci",
    "split_core",
    "split_refinement",
    "token_counts",
    "uncertainty",
    "uncertainty_controls",
    "unigram",
    "usage",
]
