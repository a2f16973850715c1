"""One table comparing the verdicts of several reproductions, read from their ``claims.csv``.

``docs/reproduction/README.md`` shows the committed reports side by side (node vs edge
granularity, greedy vs learned, attention edges ablated vs kept) with this table, and a test
rebuilds it from the committed CSVs, so every figure in it comes from a CSV. A cell is the
verdict after the Holm correction when the report has one (older reports predate it: their
raw verdict, marked ``raw``), then the estimate and its 95 % interval.

Claim ids: reports from before the ``id`` column name a claim by the start of its text
(``"1a. Two phases: ..."`` is ``1a``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

#: The paper's claims and sanity checks in the order the table lists them; an id that no
#: report has is left out, one that some reports lack shows "–" there.
ORDER = ("1a", "1b", "1c", "1d", "2a", "2b", "2c", "3", "S1", "S2")


def claim_ids(table: pd.DataFrame) -> pd.Series:
    """Each row's claim id: the ``id`` column, or the text before the first ". " of ``claim``."""
    if "id" in table.columns:
        return table["id"].astype(str)
    return table["claim"].astype(str).str.split(". ", n=1, regex=False).str[0]


def _number(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(float(value)) else f"{float(value):.3g}"


def cell(row: Mapping[Any, Any]) -> str:
    """``holds (0.33; 0.2 to 0.45)``: the verdict, the estimate and its interval."""
    holm = row.get("verdict_holm")
    if isinstance(holm, str) and holm:
        verdict = str(holm)
    else:
        verdict = f"{row['verdict']} (raw)"
    est = _number(row["estimate"])
    lo, hi = _number(row["ci_low"]), _number(row["ci_high"])
    return f"{verdict} ({est}; {lo} to {hi})"


def read_claims(path: str | os.PathLike[str], model: str) -> dict[str, str]:
    """Claim id -> table cell for ``model``'s rows of one ``claims.csv``, and the rows of the
    cross-model agreement (model ``"A vs B"``, claim 2c) when ``model`` is one of the pair."""
    table = pd.read_csv(path)
    names = table["model"].astype(str)
    pair = names.str.split(" vs ", regex=False)
    rows = table[(names == model) | pair.apply(lambda p: len(p) == 2 and model in p)]
    if rows.empty:
        models = sorted(set(table["model"]))
        raise ValueError(f"{path} has no rows for model {model!r}; it has {models}.")
    records = rows.to_dict("records")
    return {str(i): cell(r) for i, r in zip(claim_ids(rows), records, strict=True)}


def summary_markdown(
    columns: Sequence[tuple[str, str | os.PathLike[str], str]],
    ids: Sequence[str] = ORDER,
    root: str | os.PathLike[str] = ".",
) -> str:
    """A markdown table: one row per claim id, one column per ``(header, claims.csv, model)``.

    Paths are relative to ``root``. Rows whose id appears in no column are left out.
    """
    base = Path(root)
    read = [(header, read_claims(base / path, model)) for header, path, model in columns]
    lines = [
        "| claim | " + " | ".join(header for header, _ in read) + " |",
        "|---|" + "---|" * len(read),
    ]
    for claim in ids:
        cells = [cells.get(claim, "–") for _, cells in read]
        if all(c == "–" for c in cells):
            continue
        lines.append(f"| {claim} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
