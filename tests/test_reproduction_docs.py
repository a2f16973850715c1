"""docs/reproduction/README.md: every verdict and figure of its summary table comes from a
committed claims.csv. The table is rebuilt here from the CSVs and compared with the README;
``python tests/test_reproduction_docs.py`` prints it (paste it between the markers)."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from strace_lens.reproduce.summary import cell, read_claims, summary_markdown

DOCS = Path(__file__).resolve().parents[1] / "docs" / "reproduction"
BEGIN, END = "<!-- summary:begin -->", "<!-- summary:end -->"
#: the committed reports: (label, folder of its claims.csv, folder of its per-model tables,
#: the traced run's name in shards.csv), folders under docs/reproduction/
REPORTS = [
    ("node, learned, mean abl.", "both", "{model}", "mask"),
    ("edge, greedy, attn. ablated", "edge-greedy-ablated", "edge-greedy-ablated", "greedy"),
    ("edge, greedy, attn. kept", "edge-greedy-kept", "edge-greedy-kept", "greedy"),
    ("edge, learned, attn. ablated", "edge-mask-ablated", "edge-mask-ablated", "mask"),
    ("edge, learned, attn. kept", "edge-mask-kept", "edge-mask-kept", "mask"),
]
#: the node reports' folders under docs/reproduction/ and the names the README gives them
NODE_MODELS = [("gemma-3-270m", "Gemma"), ("smollm2-135m", "SmolLM2")]
#: (column header, claims.csv under docs/reproduction/, model) of the summary table
COLUMNS = [
    (f"{label}: {short}", f"{claims}/claims.csv", model)
    for label, claims, _, _ in REPORTS
    for model, short in NODE_MODELS
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


def claim(report: str, model: str, claim_id: str) -> pd.Series:
    """One row of a committed report's claims.csv (2c: the row of the model pair)."""
    table = pd.read_csv(DOCS / report / "claims.csv")
    if claim_id.startswith("2c"):
        model = f"{NODE_MODELS[0][0]} vs {NODE_MODELS[1][0]}"
    (row,) = table[(table["model"] == model) & (table["id"] == claim_id)].itertuples(index=False)
    return pd.Series(row._asdict())


def edge_reading() -> list[str]:
    """The figures of the README's "What changes with the unit" bullets, recomputed from the
    committed claims.csv, phase_bands.csv and learned-against-greedy tables, as the README
    must print them (percentages rounded to whole per cent, rho to two decimals)."""
    gemma, smol = (m for m, _ in NODE_MODELS)
    pair = (gemma, smol)
    ablated, kept, learned = "edge-greedy-ablated", "edge-greedy-kept", "edge-mask-ablated"

    def est(report: str, model: str, claim_id: str) -> float:
        return float(claim(report, model, claim_id)["estimate"])

    def pct(value: float) -> str:
        return f"{100 * value:.0f} %"

    core = [pct(est(ablated, m, "1a")) for m in pair]
    attn = []
    for model in pair:
        bands = pd.read_csv(DOCS / ablated / "tables" / model / "phase_bands.csv")
        row = bands[(bands["band"] == "construction") & (bands["quantity"] == "edge_attn_share")]
        attn.append(pct(float(row["mean"].iloc[0])))
    phrases = [
        f"a median {core[0]} (Gemma) and {core[1]} (SmolLM2) of the edges",
        f"({attn[0]} for Gemma, {attn[1]} for SmolLM2;",
        f"(rho {est(ablated, smol, '2a'):.2f})",
        f"Gemma rho {est(ablated, gemma, '2b'):.2f}, partialled "
        f"{est(ablated, gemma, '2b.partial'):.2f}",
        f"SmolLM2 {est(ablated, smol, '2b'):.2f}, partialled "
        f"{est(ablated, smol, '2b.partial'):.2f}",
        f"(2c, rho {est('both', gemma, '2c'):.2f}) is not there at edge "
        f"({est(ablated, gemma, '2c'):.2f},",
    ]
    kept_core = [claim(kept, m, "1a") for m in pair]
    assert pct(kept_core[0]["estimate"]) == pct(kept_core[1]["estimate"]), "reword the README"
    intervals = " and ".join(f"{r['ci_low']:.1g} to {r['ci_high']:.1g}" for r in kept_core)
    touched = [pct(est(kept, m, "1a.components")) for m in pair]
    phrases += [
        f"a median {pct(kept_core[0]['estimate'])} of the edges for both models "
        f"(intervals {intervals}:",
        f"where with attention edges ablated it was {core[0]} and {core[1]})",
        f"touching {touched[0]} (Gemma) and {touched[1]} (SmolLM2) of the components",
        f"(2c holds, rho {est(kept, gemma, '2c'):.2f}, and survives the random control, "
        f"2c.partial {est(kept, gemma, '2c.partial'):.2f})",
    ]
    lower = {m: lower_sizes(learned, m) for m in pair}
    learned_core = [pct(est(learned, m, "1a")) for m in pair]
    phrases += [
        f"median TV lower at {lower[smol]} sizes for SmolLM2 and {lower[gemma]} for Gemma, "
        "no size or prompt worse;",
        f"(1b {est(learned, gemma, '1b'):.3g} against {est(ablated, gemma, '1b'):.3g} for Gemma)",
        f"falls from a median {core[0]} to {learned_core[0]} of the edges",
        f"SmolLM2's stays at {learned_core[1]};",
        f"(Gemma {est(learned, gemma, 'S1'):.3g} against {est(ablated, gemma, 'S1'):.3g} TV x "
        "decades)",
        f"(rho {est(learned, gemma, '2a'):.2f}, "
        f"partialled {est(learned, gemma, '2a.partial'):.2f})",
    ]
    assert core[1] == learned_core[1], "SmolLM2's learned core moved: reword the README"
    return phrases + learned_kept_reading()


def lower_sizes(report: str, model: str) -> str:
    """ "k of n": the sizes at which the learned masks' median TV is below the greedy's, from
    the report's learned_vs_greedy table; the README says no size or prompt is worse."""
    sizes = pd.read_csv(DOCS / report / "learned_vs_greedy" / f"{model}.csv")
    worse = (sizes["median"] == "higher").sum() + sizes["prompts_higher"].sum()
    assert worse == 0, f"{report} {model}: the learned masks are worse somewhere: reword"
    return f"{(sizes['median'] == 'lower').sum()} of {len(sizes)}"


def half_top1(report: str, model: str) -> tuple[str, str]:
    """The smallest size at which half of the prompts keep the top-1 token: learned, greedy."""
    sizes = pd.read_csv(DOCS / report / "learned_vs_greedy" / f"{model}.csv")
    return tuple(  # type: ignore[return-value]
        f"{sizes[sizes[col] >= 0.5]['size'].iloc[0]:g}"
        for col in ("top1_share", "top1_share_reference")
    )


def learned_kept_reading() -> list[str]:
    """The figures of the "Learned edge masks, attention edges kept" bullet."""
    gemma, smol = (m for m, _ in NODE_MODELS)
    kept, learned = "edge-greedy-kept", "edge-mask-kept"
    changed = []
    for claim_id in (i for i in IDS if i != "S2"):  # S2: no edge analogue
        for model in (gemma, smol) if not claim_id.startswith("2c") else (gemma,):
            verdicts = [claim(r, model, claim_id)["verdict_holm"] for r in (kept, learned)]
            if verdicts[0] != verdicts[1]:
                short = "both models" if claim_id.startswith("2c") else dict(NODE_MODELS)[model]
                changed.append(f"{claim_id} for {short} ({verdicts[0]} to {verdicts[1]})")
    halves = {m: half_top1(learned, m) for m in (gemma, smol)}
    cores = {r: {m: claim(r, m, "1a") for m in (gemma, smol)} for r in (kept, learned)}
    touched = {m: float(claim(learned, m, "1a.components")["estimate"]) for m in (gemma, smol)}

    def pct(report: str, model: str, column: str = "estimate") -> str:
        return f"{100 * cores[report][model][column]:.1f}"

    return [
        f"a median {pct(learned, smol)} % (SmolLM2; interval {pct(learned, smol, 'ci_low')} to "
        f"{pct(learned, smol, 'ci_high')} %) and {pct(learned, gemma)} % (Gemma; "
        f"{pct(learned, gemma, 'ci_low')} to {pct(learned, gemma, 'ci_high')} %) of the edges, "
        f"against {pct(kept, smol)} % and {pct(kept, gemma)} % for the greedy",
        f"touching {100 * touched[smol]:.0f} % (SmolLM2) and {100 * touched[gemma]:.0f} % (Gemma) "
        "of the components",
        f"median TV lower at {lower_sizes(learned, smol)} sizes for SmolLM2 and "
        f"{lower_sizes(learned, gemma)} for Gemma, no size or prompt worse;",
        f"half of the prompts keep the top-1 token from s = {halves[smol][0]} (SmolLM2; greedy "
        f"{halves[smol][1]}) and {halves[gemma][0]} (Gemma; greedy {halves[gemma][1]})",
        "verdicts after the Holm correction that differ from the greedy's: "
        + ("; ".join(changed) if changed else "none")
        + ".",
    ]


def test_readme_reading_of_the_edge_reports_is_their_tables():
    text = " ".join((DOCS / "README.md").read_text(encoding="utf-8").split())
    for phrase in edge_reading():
        assert phrase in text, f"README lacks {phrase!r} (from the committed edge tables)"


COST_BEGIN, COST_END = "<!-- cost:begin -->", "<!-- cost:end -->"


def cost_table() -> str:
    """The README's cost table: each committed run's shards.csv, summed per run."""

    def spread(seconds: pd.Series) -> str:
        return f"{seconds.min():.0f} to {seconds.max():.0f}"

    lines = [
        "| run | model | shards | traced: s in all | s per prompt | s per shard | "
        "random control: s in all | s per shard |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, _, folder, traced in REPORTS:
        for model, short in NODE_MODELS:
            tables = DOCS / folder.format(model=model) / "tables" / model
            shards = pd.read_csv(tables / "shards.csv")
            n_prompts = len(pd.read_csv(tables / "density.csv"))
            run, random = (shards[shards["run"] == r]["seconds"] for r in (traced, "random"))
            lines.append(
                f"| {label} | {short} | {len(run)} | {run.sum():.0f} | "
                f"{run.sum() / n_prompts:.1f} | {spread(run)} | {random.sum():.0f} | "
                f"{spread(random)} |"
            )
    return "\n".join(lines)


def test_readme_cost_table_is_the_committed_shard_tables():
    text = (DOCS / "README.md").read_text(encoding="utf-8")
    assert COST_BEGIN in text and COST_END in text, "the README lost its cost markers"
    shown = text.split(COST_BEGIN, 1)[1].split(COST_END, 1)[0].strip()
    assert shown == cost_table(), "README cost table differs from shards.csv: paste it"


#: The numbers the README's prose may print without a CSV behind them: settings and
#: definitions, not results. Every other number must sit in a phrase this module recomputes.
SETTINGS = {
    "0": "the sign a claim predicts (> 0, < 0)",
    "1": "section 1, the full size, formula constants, the 1 % nucleus, one draw",
    "2": "degrees of freedom n - 2 - k, 2 random draws, the 2-core machine",
    "3": "claim 3",
    "4": "the default grow_width, a 4-prompt first try",
    "6": "a 6-column TSV",
    "24": "the default steps",
    "27": "the paper's grid: 27 sizes",
    "90": "the refined nucleus, 90 %",
    "95": "95 % intervals",
    "200": "prompts per model",
    "9/90": "1a's threshold example",
    "0.01": "edge 1a threshold, the construction band's end",
    "0.05": "the Holm level",
    "0.1": "node 1a threshold",
    "1e-2": "band edge",
    "1e-3": "the minimal core's size",
    "1e-4": "band edge",
    "1e-5": "the grid's first size",
}
NUMBER = re.compile(r"(?<![\w.\-])-?\d+(?:\.\d+)?(?:e-?\d+)?(?:/\d+)?(?![\w])")


def unexplained_numbers(text: str) -> list[str]:
    """The numbers of README prose that neither a recomputed phrase nor SETTINGS covers:
    generated tables, code blocks, inline code and link targets are left out (the tables
    are rebuilt from the CSVs by the tests above; code is commands and settings)."""
    for begin, end in ((BEGIN, END), (COST_BEGIN, COST_END)):
        if begin in text:
            text = text.split(begin, 1)[0] + text.split(end, 1)[1]
    text = re.sub(r"```.*?```", " ", text, flags=re.S)
    text = " ".join(text.split())
    for phrase in node_reading() + edge_reading():
        text = text.replace(" ".join(phrase.split()), " ")
    text = re.sub(r"`[^`]*`", " ", text)
    text = re.sub(r"\]\([^)]*\)", "]", text)
    return [
        f"{m.group()} in ...{text[max(0, m.start() - 60) : m.end() + 20]}..."
        for m in NUMBER.finditer(text)
        if m.group() not in SETTINGS
    ]


def test_every_number_of_the_readme_prose_is_recomputed_or_a_setting():
    assert unexplained_numbers("a 3 in 12 of 0.5 %") == [
        "12 in ...a 3 in 12 of 0.5 %...",
        "0.5 in ...a 3 in 12 of 0.5 %...",
    ]
    text = (DOCS / "README.md").read_text(encoding="utf-8")
    left = unexplained_numbers(text)
    assert not left, "numbers from no committed CSV (recompute them here or drop them):\n" + (
        "\n".join(left)
    )


if __name__ == "__main__":
    print(table())
    print("\nnode reading figures:", *node_reading(), sep="\n")
    print("\nedge reading figures:", *edge_reading(), sep="\n")
    print(f"\ncost table (between {COST_BEGIN} and {COST_END}):\n{cost_table()}")
