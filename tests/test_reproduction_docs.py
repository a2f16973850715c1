"""docs/reproduction/README.md: every verdict and figure of its summary table comes from a
committed claims.csv. The table is rebuilt here from the CSVs and compared with the README;
``python tests/test_reproduction_docs.py`` prints it (paste it between the markers)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from strace_lens.reproduce.summary import cell, read_claims, summary_markdown

DOCS = Path(__file__).resolve().parents[1] / "docs" / "reproduction"
BEGIN, END = "<!-- summary:begin -->", "<!-- summary:end -->"
#: (column header, claims.csv under docs/reproduction/, model)
COLUMNS = [
    ("node, learned, mean abl.: Gemma", "both/claims.csv", "gemma-3-270m"),
    ("node, learned, mean abl.: SmolLM2", "both/claims.csv", "smollm2-135m"),
    ("edge, greedy, attn. ablated: Gemma", "edge-greedy-ablated/claims.csv", "gemma-3-270m"),
    ("edge, greedy, attn. ablated: SmolLM2", "edge-greedy-ablated/claims.csv", "smollm2-135m"),
    ("edge, greedy, attn. kept: Gemma", "edge-greedy-kept/claims.csv", "gemma-3-270m"),
    ("edge, greedy, attn. kept: SmolLM2", "edge-greedy-kept/claims.csv", "smollm2-135m"),
    ("edge, learned, attn. ablated: Gemma", "edge-mask-ablated/claims.csv", "gemma-3-270m"),
    ("edge, learned, attn. ablated: SmolLM2", "edge-mask-ablated/claims.csv", "smollm2-135m"),
]
IDS = ("1a", "1a.components", "1b", "1b.components", "1b.attn", "1b.mlp", "1c",
       "1c.components", "1d", "1d.components", "1d.base", "2a", "2a.partial", "2b",
       "2b.partial", "2c", "2c.partial", "3", "3.control", "S1", "S2")  # fmt: skip


def table() -> str:
    return summary_markdown(COLUMNS, IDS, root=DOCS)


def test_readme_summary_is_the_table_of_the_committed_csvs():
    text = (DOCS / "README.md").read_text(encoding="utf-8")
    assert BEGIN in text and END in text, "the README lost its summary markers"
    shown = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert shown == table(), "README summary differs from the CSVs: paste the printed table"


def test_cells_read_holm_verdicts_raw_ones_and_agreement_rows(tmp_path):
    path = tmp_path / "claims.csv"
    pd.DataFrame(
        [
            dict(
                model="a",
                id="1a",
                estimate=0.123456,
                ci_low=0.1,
                ci_high=0.2,
                verdict="holds",
                verdict_holm="inconclusive",
            ),
            dict(
                model="b",
                id="1a",
                estimate=1.0,
                ci_low=0.5,
                ci_high=2.0,
                verdict="holds",
                verdict_holm="holds",
            ),
            dict(
                model="a vs b",
                id="2c",
                estimate=0.79,
                ci_low=float("nan"),
                ci_high=0.84,
                verdict="holds",
                verdict_holm="holds",
            ),
        ]
    ).to_csv(path, index=False)
    cells = read_claims(path, "a")
    assert cells == {"1a": "inconclusive (0.123; 0.1 to 0.2)", "2c": "holds (0.79; n/a to 0.84)"}
    assert read_claims(path, "b")["1a"] == "holds (1; 0.5 to 2)"
    with pytest.raises(ValueError, match="no rows for model 'c'"):
        read_claims(path, "c")
    # an old report: no id, no Holm column; the id is the claim text's prefix
    old = dict(model="a", claim="2b. Density rises", estimate=0.16, ci_low=0.02, ci_high=0.29,
               verdict="holds")  # fmt: skip
    assert cell(old) == "holds (raw) (0.16; 0.02 to 0.29)"
    pd.DataFrame([old]).to_csv(path, index=False)
    assert read_claims(path, "a") == {"2b": "holds (raw) (0.16; 0.02 to 0.29)"}
    md = summary_markdown([("A", path, "a")], ("2b", "9z"), root="/")
    assert md.splitlines() == [
        "| claim | A |",
        "|---|---|",
        "| 2b | holds (raw) (0.16; 0.02 to 0.29) |",
    ]


def test_an_edge_report_with_2b_beside_one_without(tmp_path):
    """An edge report with the loss gives 2b and its control a cell; an older one (no 2b
    row) shows "–" there, not an error; a row no report has is left out."""
    new, old = tmp_path / "new.csv", tmp_path / "old.csv"
    row = dict(model="m", estimate=0.3, ci_low=0.1, ci_high=0.5, verdict="holds",
               verdict_holm="holds")  # fmt: skip
    pd.DataFrame([{**row, "id": "2a"}, {**row, "id": "2b", "estimate": 0.25},
                  {**row, "id": "2b.partial", "verdict_holm": "inconclusive", "ci_low": -0.1}]
                 ).to_csv(new, index=False)  # fmt: skip
    pd.DataFrame([{**row, "id": "2a"}]).to_csv(old, index=False)
    md = summary_markdown([("new", new, "m"), ("old", old, "m")], IDS, root="/")
    assert md.splitlines()[2:] == [
        "| 2a | holds (0.3; 0.1 to 0.5) | holds (0.3; 0.1 to 0.5) |",
        "| 2b | holds (0.25; 0.1 to 0.5) | – |",
        "| 2b.partial | inconclusive (0.3; -0.1 to 0.5) | – |",
    ]


#: the node reports' folders under docs/reproduction/ and the names the README gives them
NODE_MODELS = [("gemma-3-270m", "Gemma"), ("smollm2-135m", "SmolLM2")]


def node_reading() -> list[str]:
    """The figures of the README's "How to read the phase claims" paragraph, recomputed from
    the committed node tables, as the README must print them."""
    top, depth, attn, refined = [], [], [], []
    for model, short in NODE_MODELS:
        tables = DOCS / model / "tables" / model
        usage = pd.read_csv(tables / "usage.csv")
        first = usage[usage["size"] == usage["size"].min()].sort_values("frequency").iloc[-1]
        top.append(f"{short} `{first['node']}` in {round(100 * first['frequency'])} %")
        comp = pd.read_csv(tables / "composition.csv").sort_values("size")
        below = comp[comp["relative_size"] < 1].iloc[-1]
        depth.append(
            (comp.iloc[0]["mean_depth"], below["mean_depth"], 100 * below["relative_size"])
        )
        attn.append((comp.iloc[0]["new_attn_share"], below["new_attn_share"]))
        phases = pd.read_csv(tables / "phases.csv")
        refinement = phases[phases["phase"] == "refinement"]
        refined.append(int((refinement["end_relative_size"] < 1).sum()))
    return [
        f"({top[0]}, {top[1]})",
        f"from {depth[0][0]:.2f} / {depth[1][0]:.2f} at size 1 to {depth[0][1]:.2f} / "
        f"{depth[1][1]:.2f} at {depth[0][2]:.0f} / {depth[1][2]:.0f} % of the nodes",
        f"from {attn[0][0]:.2f} / {attn[1][0]:.2f} to {attn[0][1]:.2f} / {attn[1][1]:.2f}",
        f"for only {refined[0]} (Gemma) and {refined[1]} (SmolLM2) of",
    ]


def test_readme_reading_of_the_node_reports_is_their_tables():
    text = " ".join((DOCS / "README.md").read_text(encoding="utf-8").split())
    for phrase in node_reading():
        assert phrase in text, f"README lacks {phrase!r} (from the committed node tables)"


if __name__ == "__main__":
    print(table())
    print("\nnode reading figures:", *node_reading(), sep="\n")
