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

Edge granularity (``strace_lens.edges.EdgeTraceResult``), in the paper's units:

- :func:`edge_composition`: edge shares by target-block quartile and by kind (attention,
  MLP, residual) on a common log grid; ``.bands()`` reads them in the phase bands
  (:data:`CONSTRUCTION_BAND`, :data:`REFINEMENT_BAND`, :data:`MINIMAL_CORE_SIZE`).
- :func:`edge_density`: AUC of TV against log10 s (TV x decades) and per decade.
- :func:`edge_projection`, :func:`projection_bands`: the components the same subgraphs touch.
- :func:`edge_phases`, :func:`edge_core_sizes`: the phase claims' quantities per prompt, in
  edges and in components, read in the bands against the whole graph and the pool outside
  the minimal core; the smallest subgraph giving the top-1 token.
- :func:`edge_uncertainty_controls`, :func:`edge_agreement_controls`,
  :func:`sparse_rank_diffs`: the random-subgraph controls of 2a, 2c and 3 at edge level.
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
from strace_lens.analysis.edge_bands import (
    CONSTRUCTION_BAND,
    MINIMAL_CORE_SIZE,
    PHASE_BANDS,
    REFINEMENT_BAND,
    band_summary,
)
from strace_lens.analysis.edge_composition import EdgeComposition, edge_composition
from strace_lens.analysis.edge_controls import (
    edge_agreement_controls,
    edge_uncertainty_controls,
    sparse_rank_diffs,
)
from strace_lens.analysis.edge_density import edge_density
from strace_lens.analysis.edge_phases import (
    PHASE_QUANTITIES,
    EdgePhases,
    edge_core_sizes,
    edge_phases,
)
from strace_lens.analysis.edge_projection import edge_projection, projection_bands
from strace_lens.analysis.phases import phases, split_core, split_refinement
from strace_lens.analysis.recovery import RECOVERY_LEVELS, nucleus_recovery, recovery_sizes
from strace_lens.analysis.uncertainty import agreement, uncertainty
from strace_lens.analysis.unigram import frequency_ranks, token_counts, unigram
from strace_lens.analysis.usage import gini_by_size, lorenz, usage

__all__ = [
    "CONSTRUCTION_BAND",
    "MINIMAL_CORE_SIZE",
    "PHASE_BANDS",
    "PHASE_QUANTITIES",
    "RECOVERY_LEVELS",
    "REFINEMENT_BAND",
    "EdgeComposition",
    "EdgePhases",
    "agreement",
    "agreement_controls",
    "band_summary",
    "baseline_gap",
    "baselines",
    "composition",
    "core_depth_by_kind",
    "density",
    "density_curve",
    "edge_agreement_controls",
    "edge_composition",
    "edge_core_sizes",
    "edge_density",
    "edge_phases",
    "edge_projection",
    "edge_uncertainty_controls",
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
    "projection_bands",
    "recovery_sizes",
    "refinement_base_rate",
    "sparse_rank_diffs",
    "spearman_ci",
    "split_core",
    "split_refinement",
    "token_counts",
    "uncertainty",
    "uncertainty_controls",
    "unigram",
    "usage",
]
