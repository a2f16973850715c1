"""benchmarks/strace_quality.py and strace_speed.py at edge and token granularity, end to end
on the tiny model: the printed tables are the traces' own figures, checked against
independent ``trace`` calls (issue 13, "What to build" item 3)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

import strace_lens as sl
from strace_lens.edges import PAPER_GRID, EdgeTraceResult
from strace_lens.tiny_model import tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import strace_quality
import strace_speed
from edge_greedy import half_top1_size

GRID = [float(s) for s in PAPER_GRID if s >= 1e-4]
#: 2 dev prompts cut to their last 3 words: about 15-20 byte tokens each
QUALITY_ARGS = ["--n-baseline-prompts", "2", "--words", "3"]


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return tiny_model(device="cpu")


def numbers(line: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", line)]


def section(text: str, start: str, end: str | None) -> list[str]:
    part = text.split(start, 1)[1]
    return (part.split(end, 1)[0] if end else part).splitlines()


def independent(model, prompts, method, ablate):
    res = sl.trace(
        model, prompts, GRID, method=method, granularity="edge", ablate_attention_edges=ablate
    )
    assert isinstance(res, EdgeTraceResult)
    return res


def test_edge_quality_tables_are_the_traces_medians(model, capsys):
    args = strace_quality.parse_args(["--granularity", "edge", *QUALITY_ARGS])
    found = strace_quality.run(model, "native:tiny", args)
    text = capsys.readouterr().out
    assert "part 1 (optimality against exhaustive search) has no edge analogue" in text
    assert sorted(found) == ["ablated", "kept"]
    prompts = strace_quality.dev_prompts(2, 3)
    for semantics, ablate, end in (
        ("ablated", True, "attention edges kept,"),
        ("kept", False, None),
    ):
        lines = section(text, f"attention edges {semantics},", end)
        compare = [numbers(x) for x in lines if x.count("|") == 3 and x.split()[0] != "s"]
        floor = [numbers(x) for x in lines if x.count("|") == 2 and x.split()[0] != "s"]
        assert [row[0] for row in compare] == pytest.approx(GRID)
        assert [row[0] for row in floor] == pytest.approx(GRID)
        ref = {m: independent(model, prompts, m, ablate) for m in ("greedy", "mask", "random")}
        med = {(m, k): r.metrics[k].median(0).values for m, r in ref.items() for k in ("tv", "kl")}
        # the learned and greedy columns are what independent traces give, size by size
        for j, (row, low) in enumerate(zip(compare, floor)):
            assert row[1] == pytest.approx(float(med["mask", "tv"][j]), abs=6e-5)
            assert row[2] == pytest.approx(float(med["greedy", "tv"][j]), abs=6e-5)
            assert low[1] == pytest.approx(float(med["mask", "kl"][j]), abs=6e-5)
            assert low[2] == pytest.approx(float(med["greedy", "kl"][j]), abs=6e-5)
            assert low[3] == pytest.approx(float(med["random", "tv"][j]), abs=6e-5)
            assert low[4] == pytest.approx(float(med["random", "kl"][j]), abs=6e-5)
        # lower / higher prompt counts, and the medians' verdicts adding up to the sizes
        tv_l, tv_g = ref["mask"].metrics["tv"], ref["greedy"].metrics["tv"]
        assert [int(r[5]) for r in compare] == (tv_l < tv_g - 1e-4).sum(0).tolist()
        assert [int(r[6]) for r in compare] == (tv_l > tv_g + 1e-4).sum(0).tolist()
        verdicts = next(numbers(x) for x in lines if x.startswith("medians lower"))
        assert sum(verdicts[:3]) == verdicts[3] == len(GRID)
        marks = [x.split()[-1] for x in lines if x.count("|") == 3 and x.split()[0] != "s"]
        assert verdicts[:3] == [marks.count(m) for m in ("lower", "equal", "higher")]
        half = next(x for x in lines if x.startswith("half of the prompts"))
        top1 = {m: ref[m].metrics["top1"] for m in ("mask", "greedy")}
        assert half.endswith(
            f"learned {half_top1_size(top1['mask'], GRID)}, "
            f"greedy {half_top1_size(top1['greedy'], GRID)}"
        )
        results, rows = found[semantics]
        assert [r["median_tv_reference"] for r in rows] == med["greedy", "tv"].tolist()
        assert results["learned"].options["method"] == "mask"
        assert torch.equal(results["greedy"].ids, ref["greedy"].ids)  # the same subgraphs


def test_token_quality_table_is_learned_against_random(model, capsys):
    args = strace_quality.parse_args(
        ["--granularity", "token", "--ablations", "zero", *QUALITY_ARGS]
    )
    found = strace_quality.run(model, "native:tiny", args)
    text = capsys.readouterr().out
    assert "part 1 (optimality against exhaustive search) is measured on whole nodes" in text
    learned = found["zero"].learned
    rows = [numbers(x) for x in text.splitlines() if re.match(r"\| \d", x)]
    assert len(rows) == len(learned.grid)
    random = sl.trace(
        model,
        strace_quality.dev_prompts(2, 3),
        granularity="token",
        method="random",
        sizes=list(learned.grid),
        ablation="zero",
        inverse=False,
    )
    units = learned.counts.double().mean(0)
    for j, row in enumerate(rows):
        assert row[1] == pytest.approx(float(units[j]), abs=0.05)
        assert row[2] == pytest.approx(float(learned.metrics["tv"][:, j].mean()), abs=5e-4)
        assert row[4] == pytest.approx(float(random.metrics["tv"][:, j].mean()), abs=5e-4)
        assert row[5] == pytest.approx(float(random.metrics["top1"][:, j].mean()), abs=5e-3)
    assert rows[-1][0] == 1.0 and rows[-1][2] == 0.0  # the whole graph is the full model


def speed_lines(text: str) -> dict[str, list[float]]:
    """Label -> (seconds, ratio) of each timed curve's printed line."""
    out = {}
    for line in text.splitlines():
        match = re.match(r"\s+(\S.*?)\s+([\d.]+) s =\s+([\d.]+)x bare", line)
        if match:
            out[match[1]] = [float(match[2]), float(match[3])]
    return out


def test_edge_speed_times_learned_and_greedy_curves_against_the_bare_pass(model, capsys):
    args = strace_speed.build_parser().parse_args(
        ["--granularity", "edge", "--ablate-attention-edges", "true", "false", "--repeats", "1"]
    )
    prompts = ["The cat sat on", "Paris is the capital"]
    bare, runs = strace_speed.run(model, "native:tiny", prompts, args)
    text = capsys.readouterr().out
    printed = speed_lines(text)
    labels = [f"edge {m}, {s}" for s in ("ablated", "kept") for m in ("learned", "greedy")]
    assert list(runs) == list(printed) == labels
    for label, (secs, res, _, calls) in runs.items():
        assert isinstance(res, EdgeTraceResult) and len(res.grid) == len(PAPER_GRID)
        assert res.options["method"] == ("mask" if "learned" in label else "greedy")
        assert res.options["ablate_attention_edges"] == label.endswith("ablated")
        assert printed[label][1] == pytest.approx(secs / bare, abs=0.051)
        assert f"forward calls {calls})" in next(x for x in text.splitlines() if label in x)
        assert calls > 0
    learned_fits = runs["edge learned, ablated"][1].options["mask_fits"]
    merge_rows = sum(f["merge_rows"] for f in learned_fits)
    assert f"merge {merge_rows} forward rows in all" in text
    # the timed greedy curve is the greedy's (same subgraphs and metrics as a trace of its own)
    greedy = sl.trace(model, prompts, "paper", method="greedy", granularity="edge")
    assert torch.equal(runs["edge greedy, ablated"][1].metrics["tv"], greedy.metrics["tv"])
    for semantics in ("ablated", "kept"):
        ratio = runs[f"edge learned, {semantics}"][0] / runs[f"edge greedy, {semantics}"][0]
        line = next(
            x for x in text.splitlines() if f"learned / greedy, attention edges {semantics}" in x
        )
        assert numbers(line)[-1] == pytest.approx(ratio, abs=0.0051)


def test_token_speed_times_the_default_token_curve(model, capsys):
    args = strace_speed.build_parser().parse_args(["--granularity", "token", "--repeats", "1"])
    bare, runs = strace_speed.run(model, "native:tiny", ["The cat sat on", "Paris is"], args)
    text = capsys.readouterr().out
    ((label, (secs, res, ran, _)),) = runs.items()
    assert isinstance(res, sl.TokenTraceResult) and res.nested
    o = res.options
    assert f"search rows {o['search_rows']}, eval rows {o['eval_rows']}; rows run {ran}" in text
    assert ran >= o["search_rows"] > 0
    assert speed_lines(text)[label][1] == pytest.approx(secs / bare, abs=0.051)


def test_node_defaults_unchanged_and_node_only_options_refused(monkeypatch):
    args = strace_quality.parse_args([])
    assert (args.granularity, args.words, args.n_baseline_prompts) == ("node", 8, 16)
    assert strace_quality.parse_args(["--granularity", "edge"]).words is None
    with pytest.raises(SystemExit, match="--methods picks rows of the node baseline table"):
        strace_quality.parse_args(["--granularity", "edge", "--methods", "random"])
    speed = strace_speed.build_parser().parse_args([])
    assert (speed.granularity, speed.ablate_attention_edges) == ("node", [True])
    monkeypatch.setattr(sys, "argv", ["strace_speed.py", "--granularity", "edge", "--independent"])
    with pytest.raises(SystemExit, match="--independent time node curves"):
        strace_speed.main()


def test_speed_unskipped_curve_is_the_same_trace(model, capsys):
    """``strace_speed.py --unskipped`` times the default node curve with every MLP computed
    (skipped_mlps.ENABLED = False) beside the default one; on the tiny model both find the
    same masks with the same metrics, and the switch is back on afterwards."""
    import strace_lens.skipped_mlps as skipped_mlps

    args = strace_speed.build_parser().parse_args(
        ["--no-single", "--unskipped", "last", "--repeats", "1"]
    )
    prompts = strace_quality.dev_prompts(2, 3)
    _, runs = strace_speed.run(model, "native:tiny", prompts, args)
    assert list(runs) == ["curve, nested", "curve, nested unskipped"]
    assert skipped_mlps.ENABLED
    line = next(x for x in capsys.readouterr().out.splitlines() if "skipped / unskipped" in x)
    assert "same masks True; metrics max|d| 0.00e+00" in line
    skipping, whole = runs["curve, nested"][1], runs["curve, nested unskipped"][1]
    assert torch.equal(skipping.masks, whole.masks)


def test_speed_unskipped_token_curve_is_the_same_trace(model, capsys):
    args = strace_speed.build_parser().parse_args(
        ["--granularity", "token", "--unskipped", "--repeats", "1"]
    )
    prompts = strace_quality.dev_prompts(2, 3)
    _, runs = strace_speed.run(model, "native:tiny", prompts, args)
    assert list(runs) == ["token curve, unskipped", "token curve, learned"]
    line = next(x for x in capsys.readouterr().out.splitlines() if "skipped / unskipped" in x)
    assert "same masks True" in line
    skipping, whole = runs["token curve, learned"][1], runs["token curve, unskipped"][1]
    assert torch.equal(skipping.ids, whole.ids)
    for key, values in skipping.metrics.items():
        torch.testing.assert_close(values, whole.metrics[key], rtol=0, atol=1e-5)
