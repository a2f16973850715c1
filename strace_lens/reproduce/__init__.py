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

With ``granularity="edge"`` (``strace-lens reproduce --granularity edge``) the same at the
paper's own granularity: the greedy or learned edge masks and a random control traced by
``trace_dataset`` (:mod:`strace_lens.reproduce.edge_pipeline`), the claims in the paper's
units, in edges and in components (:mod:`strace_lens.reproduce.edge_claims`), ``report.md``
and ``figures/<model>.html``. :class:`ReproduceConfig` holds a run's checked options.

Verdicts come only from the numbers, by the rule printed in the report (see
:func:`verdict`): a claim *holds* when its whole confidence interval lies on the side the
paper predicts, *does not hold* when the whole interval lies on the other side (or on the
null value), and is *inconclusive* otherwise or when too few prompts contribute; 1a is
*undetermined* when an end of its interval is exactly on its threshold. Each claim comes with
its controls (random subgraphs of equal size, partial correlations, per-kind depth, base
rates) and every p-value with its Holm-adjusted value (see :mod:`strace_lens.reproduce.claims`).
"""

from strace_lens.reproduce.claims import (
    FAILS,
    HOLDS,
    INCONCLUSIVE,
    MIN_PROMPTS,
    SMALL_CORE,
    UNDETERMINED,
    ModelRun,
    Reproduction,
    analyse,
    claims_of,
    verdict,
    with_multiplicity,
)
from strace_lens.reproduce.config import ReproduceConfig
from strace_lens.reproduce.edge_claims import EdgeModelRun, EdgeReproduction
from strace_lens.reproduce.markdown import markdown_table, write_report
from strace_lens.reproduce.pipeline import cli_command, reproduce, run

__all__ = [
    "FAILS",
    "HOLDS",
    "INCONCLUSIVE",
    "MIN_PROMPTS",
    "SMALL_CORE",
    "UNDETERMINED",
    "EdgeModelRun",
    "EdgeReproduction",
    "ModelRun",
    "ReproduceConfig",
    "Reproduction",
    "analyse",
    "claims_of",
    "cli_command",
    "markdown_table",
    "reproduce",
    "run",
    "verdict",
    "with_multiplicity",
    "write_report",
]
