"""The reproduction pipeline moved to :mod:`strace_lens.reproduce` (claims, markdown,
pipeline); this module keeps the old import path working."""

from strace_lens.reproduce import (
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
    cli_command,
    markdown_table,
    reproduce,
    verdict,
    with_multiplicity,
    write_report,
)
from strace_lens.reproduce.markdown import model_section as _model_section

__all__ = [
    "FAILS",
    "HOLDS",
    "INCONCLUSIVE",
    "MIN_PROMPTS",
    "SMALL_CORE",
    "UNDETERMINED",
    "ModelRun",
    "Reproduction",
    "_model_section",
    "analyse",
    "claims_of",
    "cli_command",
    "markdown_table",
    "reproduce",
    "verdict",
    "with_multiplicity",
    "write_report",
]
