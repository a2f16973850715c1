"""The reproduction report: verdict rules, claims on planted results, and reproduce end to end."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from strace_lens.graph import NodeGraph
from strace_lens.report import (
    FAILS,
    HOLDS,
    INCONCLUSIVE,
    ModelRun,
    _model_section,
    analyse,
    claims_of,
    markdown_table,
    reproduce,
    verdict,
)
from strace_lens.result import TraceResult

GRAPH = NodeGraph(n_layers=4, n_heads=3)  # 16 nodes
SIZES = [1, 2, 4, 8, 16]


def test_verdict_rules():
    assert verdict(0.1, 0.5, "greater", 0.0, n=50) == HOLDS
    assert verdict(-0.1, 0.5, "greater", 0.0, n=50) == INCONCLUSIVE
    assert verdict(-0.5, -0.1, "greater", 0.0, n=50) == FAILS
    assert verdict(0.0, 0.0, "greater", 0.0, n=50) == FAILS  # exactly no effect
    assert verdict(0.1, 0.5, "greater", 0.0, n=5) == INCONCLUSIVE  # too few prompts
    assert verdict(np.nan, 0.5, "greater", 0.0, n=50) == INCONCLUSIVE
    assert verdict(0.01, 0.05, "less", 0.1, n=50) == HOLDS
    assert verdict(0.2, np.inf, "less", 0.1, n=50) == FAILS  # core beyond the grid
    assert verdict(0.05, np.inf, "less", 0.1, n=50) == INCONCLUSIVE
    with pytest.raises(ValueError):
        verdict(0, 1, "bigger", 0, 50)


def test_markdown_table_formats_numbers_and_escapes():
    frame = pd.DataFrame({"a": [np.inf, np.nan, 0.000123], "b": ["x|y", "z", "w"], "c": [1, 2, 3]})
    text = markdown_table(frame)
    lines = text.splitlines()
    assert lines[0] == "| a | b | c |" and lines[1] == "|---|---|---|"
    assert lines[2] == "| beyond grid | x\\|y | 1 |"
    assert lines[3] == "| n/a | z | 2 |"
    assert lines[4] == "| 1.23e-04 | w | 3 |"


def _planted(n: int, early_core: bool, seed: int = 0) -> tuple[TraceResult, torch.Tensor]:
    """Per-input results where the paper's claims hold (or, reversed, fail) by construction.

    Each prompt keeps the MLPs of layers 0-1 first (early_core) or the heads of layer 3 first;
    its top-1 token is reproduced from size 2 on, 90 % from size 8. Density is planted to rise
    with entropy; the size-1 subgraph predicts token 0 (the most frequent) while the full
    model predicts a rare token.
    """
    rng = np.random.default_rng(seed)
    early = [3, 7]
    late_heads = [12, 13, 14, 8, 9, 10]
    rest = [i for i in range(16) if i not in early + late_heads]
    first, then = (early, late_heads) if early_core else (late_heads[:2], [3, 7, *late_heads[2:]])
    order = first + [i for i in then if i not in first] + [i for i in rest if i not in first]
    masks = torch.zeros(n, len(SIZES), 16, dtype=torch.bool)
    for j, s in enumerate(SIZES):
        masks[:, j, order[:s]] = True
    level = rng.uniform(0.1, 0.9, n)
    tv = torch.tensor(level)[:, None] * torch.tensor([1.0, 0.8, 0.5, 0.2, 0.0])[None]
    entropy = torch.tensor(2 * level + rng.normal(0, 0.05, n))
    nucleus = torch.tensor([[0, 1, 20, 90, 99]] * n, dtype=torch.float32)
    full_top = torch.arange(5, 10).repeat(n, 1) + torch.tensor(rng.integers(0, 5, n))[:, None]
    top = full_top[:, None].repeat(1, len(SIZES), 1).clone()
    top[:, 0, 0] = 0
    counts = torch.tensor([100, 50, 40, 30, 20, 10, 5, 4, 3, 2, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    result = TraceResult(
        graph=GRAPH,
        sizes=torch.tensor(SIZES),
        masks=masks,
        metrics={
            "kl": tv.float(),
            "tv": tv.float(),
            "nucleus": nucleus,
            "inv_tv": (1 - tv).float(),
        },
        entropy=entropy.float(),
        prompts=[f"p{i}" for i in range(n)],
        top_tokens=top,
        full_top_tokens=full_top,
        candidates=torch.ones(16, dtype=torch.bool),
        options={"per": "input", "method": "mask"},
        target_logprob=-entropy.float(),
    )
    return result, counts


def test_claims_hold_on_a_planted_two_phase_result():
    result, counts = _planted(40, early_core=True)
    tables = analyse(result, None, counts, n_boot=300)
    claims = claims_of(result, tables, counts, "planted", n_boot=300)
    claims = claims.set_index(claims["claim"].str[:2])
    assert claims.loc["1a", "estimate"] == pytest.approx(2 / 16)
    assert claims.loc["1a", "verdict"] == FAILS  # 2/16 > 0.1 on every resample
    assert claims.loc["1b", "verdict"] == HOLDS
    assert claims.loc["1c", "verdict"] == HOLDS
    assert claims.loc["1d", "verdict"] == HOLDS and claims.loc["1d", "estimate"] == 1.0
    assert claims.loc["2a", "verdict"] == HOLDS and claims.loc["2b", "verdict"] == HOLDS
    assert claims.loc["3.", "verdict"] == HOLDS
    assert claims.loc["S2", "verdict"] == HOLDS
    # with a looser "small" threshold, the same core counts as small
    loose = claims_of(result, tables, counts, "planted", n_boot=300, small_core=0.2)
    assert loose.iloc[0]["verdict"] == HOLDS


def test_core_size_verdict_is_inconclusive_when_the_threshold_falls_inside_a_grid_step():
    result, counts = _planted(40, early_core=True)
    result.metrics["nucleus"][:, 1] = 0.0  # the top-1 token now first at size 4, not 2

    def claim_1a(small_core: float) -> dict:
        tables = analyse(result, None, counts, n_boot=100)
        claims = claims_of(result, tables, counts, "planted", n_boot=100, small_core=small_core)
        return claims.iloc[0].to_dict()

    # sizes 1, 2, 4, ...: a core traced at 4 of 16 nodes has 3 or 4 nodes (0.1875 to 0.25)
    row = claim_1a(0.2)
    assert row["estimate"] == pytest.approx(0.25)
    assert row["ci_low"] == pytest.approx(3 / 16) and row["ci_high"] == pytest.approx(0.25)
    assert row["verdict"] == INCONCLUSIVE
    assert claim_1a(0.3)["verdict"] == HOLDS
    assert claim_1a(0.15)["verdict"] == FAILS


def test_claims_fail_when_the_core_is_late_attention():
    result, counts = _planted(40, early_core=False)
    tables = analyse(result, None, counts, n_boot=300)
    claims = claims_of(result, tables, counts, "reversed", n_boot=300)
    by = dict(zip(claims["claim"].str[:2], claims["verdict"]))
    assert by["1b"] == FAILS and by["1c"] == FAILS and by["1d"] == FAILS


def test_claims_are_inconclusive_with_few_prompts():
    result, counts = _planted(6, early_core=True)
    tables = analyse(result, None, counts, n_boot=200)
    claims = claims_of(result, tables, counts, "few", n_boot=200)
    assert set(claims["verdict"]) == {INCONCLUSIVE}


def test_report_says_how_many_refinements_end_below_the_full_model():
    result, counts = _planted(40, early_core=True)

    def section(res: TraceResult) -> str:
        tables = analyse(res, None, counts, n_boot=50)
        claims = claims_of(res, tables, counts, "planted", n_boot=50)
        run = ModelRun("planted", {}, res, res, tables, claims, {})
        return "\n".join(_model_section(run))

    # the planted nucleus reaches 90 % at size 8 of 16: every refinement ends below the full model
    assert "for 40 of 40 prompts with a core" in section(result)
    # 90 % only at the full model for the first 15 prompts
    result.metrics["nucleus"][:15, 3] = 50.0
    assert "for 25 of 40 prompts with a core" in section(result)


def test_reproduce_end_to_end_on_the_tiny_model_and_resume(tmp_path):
    prompts = tmp_path / "prompts.tsv"
    rows = [
        f"The number {i} comes after {i - 1} and before\tbefore\tADP\t{i + 1}\tNUM\t {i + 1}"
        for i in range(1, 13)
    ]
    prompts.write_text("\n".join(rows) + "\n", encoding="utf-8")
    kwargs = dict(
        n=12,
        out_dir=tmp_path / "out",
        sizes=[1, 4, 15],
        seed=0,
        random_draws=2,
        n_boot=100,
        device="cpu",
        progress=False,
        steps=4,
    )
    # first through the command line, then resumed through the Python function
    from strace_lens.cli import main

    before = torch.get_num_threads()
    threads = 1 if before > 1 else 2  # a count other than torch's current one
    status = main(
        [
            "reproduce",
            "--model",
            "native:tiny",
            "--prompts",
            str(prompts),
            "--n",
            "12",
            "--out",
            str(tmp_path / "out"),
            "--sizes",
            "1",
            "4",
            "15",
            "--random-draws",
            "2",
            "--option",
            "steps=4",
            "--refined-nucleus",
            "60",
            "--small-core",
            "0.3",
            "--quiet",
            "--threads",
            str(threads),
        ]
    )
    assert status == 0 and torch.get_num_threads() == before
    report = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    # the thread count reached torch: the report and every shard record it
    assert f"- **torch CPU threads of this invocation**: {threads}" in report
    timings = list((tmp_path / "out" / "runs").glob("native_tiny/*/shards/*/timing.json"))
    assert len(timings) == 2  # the learned masks' shard and the random baseline's
    assert {json.loads(t.read_text())["torch_threads"] for t in timings} == {threads}
    # shards.csv: one row per shard as its timing.json records it; the report's sums are its
    shards_csv = pd.read_csv(tmp_path / "out" / "tables" / "native_tiny" / "shards.csv")
    recorded = {
        (t.parents[2].name, int(t.parent.name)): json.loads(t.read_text())["seconds"]
        for t in timings
    }
    assert {(r.run, r.shard): r.seconds for r in shards_csv.itertuples()} == recorded
    assert set(shards_csv["torch_threads"]) == {threads}
    mask_total, random_total = (recorded[(run, 0)] for run in ("mask", "random"))
    assert f"the shards record {mask_total:.0f} s and {random_total:.0f} s in total" in report
    assert "per shard: `tables/native_tiny/shards.csv`" in report
    assert "strace-lens reproduce --model native:tiny" in report
    # the phase rule given on the command line reached the analyses and the recorded command
    assert "--refined-nucleus 60 --small-core 0.3" in report
    assert "- **refined_nucleus**: 60.0" in report and "- **small_core**: 0.3" in report
    phases = pd.read_csv(tmp_path / "out" / "tables" / "native_tiny" / "phases.csv")
    assert set(phases["refined_nucleus"]) == {60.0}
    repro = reproduce("native:tiny", prompts, **kwargs)
    report = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    for needed in (
        "native:tiny",
        "prompts.tsv",
        "ablation",
        "sizes",
        "seed",
        "0.1.0",
        "command",
        "Verdict rules",
        "1a.",
        "2a.",
        "2b.",
        "3.",
        "S1.",
    ):
        assert needed in report, needed
    assert set(repro.claims["verdict"]) <= {HOLDS, FAILS, INCONCLUSIVE}
    claims_csv = pd.read_csv(tmp_path / "out" / "claims.csv")
    assert len(claims_csv) == len(repro.claims) >= 8
    # the controls and the multiplicity correction reach the CSV and the report
    for control in ("1b.mlp", "1d.base", "2a.random", "2a.partial", "2b.partial", "3.control"):
        assert control in set(claims_csv["id"]), control
    assert {"role", "p_holm", "verdict_holm"} <= set(claims_csv.columns)
    assert "| p_holm |" in report and "Holm-Bonferroni" in report and "2a.partial" in report
    for table in (
        "density",
        "recovery",
        "phases",
        "composition",
        "gini",
        "unigram",
        "curves",
        "uncertainty",
        "baseline_gap",
        "uncertainty_controls",
        "core_depth_by_kind",
        "refinement_base_rate",
    ):
        assert (tmp_path / "out" / "tables" / "native_tiny" / f"{table}.csv").exists(), table
    density = pd.read_csv(tmp_path / "out" / "tables" / "native_tiny" / "density.csv")
    assert len(density) == 12 and density["loss"].notna().all()
    # the second call resumed from the first one's shards: same traces, same numbers
    again = reproduce("native:tiny", prompts, **kwargs)
    assert again.runs[0].mask.equals(repro.runs[0].mask)
    pd.testing.assert_frame_equal(again.claims, repro.claims)
    shards = list((tmp_path / "out" / "runs" / "native_tiny" / "mask" / "shards").iterdir())
    assert len(shards) == 1


def test_reproduce_refuses_a_bad_phase_rule_before_tracing(tmp_path, capsys):
    from strace_lens.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one two three\n", encoding="utf-8")
    out = tmp_path / "out"
    base = [
        "reproduce",
        "--model",
        "native:tiny",
        "--prompts",
        str(prompts),
        "--n",
        "1",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main([*base, "--core-nucleus", "95", "--refined-nucleus", "90"]) == 2
    assert "0 < core_nucleus <= refined_nucleus <= 100" in capsys.readouterr().err
    assert main([*base, "--small-core", "2"]) == 2
    assert "--small-core must be in (0, 1]" in capsys.readouterr().err
    assert not out.exists()  # refused before anything was traced or written


def test_shard_table_reads_each_finished_shard_and_keeps_missing_thread_counts_empty(tmp_path):
    from strace_lens.reproduce.runs import shard_seconds, shard_table

    run = tmp_path / "mask"
    records = {
        "00000": {"seconds": 2.5},  # traced before timing.json recorded the thread count
        "00001": {"seconds": 1.25, "torch_threads": 2},
        ".00002.ab12.tmp": {"seconds": 99.0, "torch_threads": 2},  # a shard being written
    }
    for name, record in records.items():
        (run / "shards" / name).mkdir(parents=True)
        (run / "shards" / name / "timing.json").write_text(json.dumps(record))
    frame = shard_table({"mask": run})
    assert frame["shard"].tolist() == [0, 1] and frame["seconds"].tolist() == [2.5, 1.25]
    assert frame.to_csv(index=False).splitlines()[1:] == ["mask,0,2.5,", "mask,1,1.25,2"]
    assert shard_seconds(frame, "mask") == 2.5 + 1.25  # the report's sum: the same shards
    assert shard_seconds(shard_table({"none": tmp_path / "not traced"}), "none") == 0.0
