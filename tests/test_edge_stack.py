"""Edge granularity through the stack: ``trace(granularity="edge")``, ``trace_dataset`` runs of
edge shards (resume, identity, workers), ``strace_lens.load`` and the command line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from run_helpers import (
    assert_refused,
    cli_trace_args,
    count_chunks,
    write_prompt_file,
)

from strace_lens import trace
from strace_lens.ablation import MeanAblation, ZeroAblation
from strace_lens.config import TraceConfig
from strace_lens.edges import PAPER_GRID, EdgeTraceResult, edge_trace
from strace_lens.result import TraceResult
from strace_lens.tiny_model import tiny_model

PROMPTS = ["The cat sat on", "Paris is the", "one two three", "She opened the", "In 1999 the"]
GRID = [0.01, 0.1, 0.5, 1.0]


@pytest.fixture(scope="module")
def model():
    """The native:tiny model (byte tokenizer: prompt strings work at edge granularity)."""
    return tiny_model(device="cpu")


def assert_same_edges(a: EdgeTraceResult, b: EdgeTraceResult) -> None:
    """Every stored tensor, prompt and option equal (wall time aside)."""
    assert (a.n_layers, a.n_heads, a.grid, a.nested) == (b.n_layers, b.n_heads, b.grid, b.nested)
    assert a.prompts == b.prompts
    for key in ("n_pos", "counts", "ids", "offsets", "entropy", "top_tokens", "full_top_tokens"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    assert a.metrics.keys() == b.metrics.keys()
    for key in a.metrics:
        assert torch.equal(a.metrics[key].float(), b.metrics[key].float()), key
    drop = ("seconds",)
    assert {k: v for k, v in a.options.items() if k not in drop} == {
        k: v for k, v in b.options.items() if k not in drop
    }


# -- trace(granularity="edge") ---------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"method": "random", "seed": 3},
        {"method": "random", "random_variant": "resid_mlp_first", "seed": 1},
        {"ablate_attention_edges": False},
        {"tokens": "transformer_lens"},
    ],
    ids=["greedy", "random", "random-resid-mlp-first", "attention-kept", "tl-tokens"],
)
def test_trace_at_edge_granularity_is_edge_trace(model, kwargs):
    got = trace(model, PROMPTS[:2], granularity="edge", sizes=GRID, **kwargs)
    assert isinstance(got, EdgeTraceResult)
    assert_same_edges(got, edge_trace(model, PROMPTS[:2], sizes=GRID, **kwargs))


def test_edge_defaults_are_the_papers(model):
    got = trace(model, PROMPTS[0], granularity="edge")
    assert got.grid == PAPER_GRID and len(got.grid) == 27
    assert got.options["method"] == "greedy" and got.nested
    assert got.options["ablate_attention_edges"] is True and got.options["tokens"] == "paper"
    assert got.counts[0].tolist() == [int(s * got.n_edges(0)) for s in PAPER_GRID]
    # zero ablation named explicitly is the same trace, and batch_size (subgraphs per masked
    # forward) does not change the result
    small = trace(model, PROMPTS[0], granularity="edge", sizes=GRID)
    again = trace(model, PROMPTS[0], granularity="edge", sizes=GRID, ablation=ZeroAblation())
    assert_same_edges(small, again)
    assert_same_edges(small, trace(model, PROMPTS[0], granularity="edge", sizes=GRID, batch_size=2))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"per": "dataset"}, "per='dataset' does not apply at granularity='edge'"),
        ({"ablation": "mean"}, "the paper's edge ablation is zero"),
        ({"keep": ["MLP0"]}, "keep names heads and MLPs, not edges"),
        ({"candidates": ["MLP0"]}, "candidates names heads and MLPs"),
        ({"inverse": True}, "inverse subgraphs are not scored at edge granularity"),
        ({"nested": False}, "nested=False does not apply"),
        ({"targets": [" mat"]}, "not recorded at edge granularity"),
        ({"method": "attribution"}, "choose one of greedy, random, mask"),
        ({"tokens": "bpe"}, "Unknown tokens='bpe'"),
        ({"sizes": [0.5, 0.1]}, "ascending"),
        ({"sizes": "log"}, "Unknown size grid 'log'"),
        ({"random_variant": "resid_mlp_first"}, "applies to method='random' only"),
    ],
)
def test_options_that_do_not_apply_at_edge_granularity_are_refused(model, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        trace(model, PROMPTS[0], granularity="edge", **kwargs)


def test_more_refusals_at_edge_granularity(model):
    with pytest.raises(ValueError, match="the paper's edge ablation is zero"):
        trace(
            model,
            PROMPTS[0],
            granularity="edge",
            ablation=MeanAblation.from_prompts(model, PROMPTS[:2], progress=False),
        )
    with pytest.raises(TypeError, match=r"Unknown option\(s\) at granularity='edge': \['steps'\]"):
        trace(model, PROMPTS[0], granularity="edge", steps=3)
    with pytest.raises(TypeError, match="prompts are strings"):
        trace(model, torch.tensor([[3, 4, 5]]), granularity="edge")
    with pytest.raises(ValueError, match="granularity must be one of node, token, edge"):
        trace(model, PROMPTS[0], granularity="layer")
    with pytest.raises(ValueError, match="TraceConfig configures node- and token-granularity"):
        TraceConfig(granularity="edge")


def test_node_granularity_is_unchanged_by_the_new_defaults(model):
    """method=None and inverse=None are trace's defaults now: they mean mask and True."""
    tokens = torch.tensor([[0, 5, 9, 12, 40], [0, 7, 7, 30, 2]])
    implicit = trace(model, tokens, sizes=[2], steps=1, finetune_steps=0)
    explicit = trace(
        model, tokens, sizes=[2], steps=1, finetune_steps=0, method="mask", inverse=True
    )
    assert implicit.equals(explicit) and implicit.method == "mask"
    assert implicit.options["inverse"] is True and implicit.options["method"] == "mask"


# -- EdgeTraceResult.concat ------------------------------------------------------------------
@pytest.mark.parametrize("method", ["greedy", "random"])
def test_concat_joins_prompt_lists(model, method):
    parts = [
        edge_trace(model, PROMPTS[:2], method=method, sizes=GRID, seed=2),
        edge_trace(model, PROMPTS[2:3], method=method, sizes=GRID, seed=2),
        edge_trace(model, PROMPTS[3:], method=method, sizes=GRID, seed=2),
    ]
    joined = EdgeTraceResult.concat(parts)
    assert joined.prompts == PROMPTS and joined.n_prompts == 5
    assert joined.options["seconds"] == pytest.approx(sum(p.options["seconds"] for p in parts))
    p = 0
    for part in parts:
        for q in range(part.n_prompts):
            for i in range(len(GRID)):
                assert torch.equal(joined.subgraph(p, i), part.subgraph(q, i))
                assert joined.edge_names(p, i) == part.edge_names(q, i)
            assert float(joined.metrics["tv"][p, 1]) == float(part.metrics["tv"][q, 1])
            p += 1
    with pytest.raises(ValueError, match="another model shape, grid, method or options"):
        EdgeTraceResult.concat([parts[0], edge_trace(model, PROMPTS[2:3], sizes=[0.5, 1.0])])
    with pytest.raises(ValueError, match="Nothing to concatenate"):
        EdgeTraceResult.concat([])


# -- trace_dataset(granularity="edge") -------------------------------------------------------
def edge_run(model, out, **kwargs):
    from strace_lens.dataset import trace_dataset

    options = {"granularity": "edge", "sizes": GRID, "chunk_size": 2, **kwargs}
    return trace_dataset(model, PROMPTS, out, **options)


def test_edge_run_equals_one_call_and_loads_back(model, tmp_path):
    import strace_lens as sl

    out = tmp_path / "run"
    run = edge_run(model, out)
    assert isinstance(run, EdgeTraceResult)
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["00000", "00001", "00002"]
    assert (out / "shards" / "00000" / "edges.json").is_file()
    # each chunk is exactly trace() on its prompts; joined, they are one call's result
    chunks = [
        trace(model, PROMPTS[lo : lo + 2], granularity="edge", sizes=GRID) for lo in (0, 2, 4)
    ]
    assert_same_edges(run, EdgeTraceResult.concat(chunks))
    one_call = edge_trace(model, PROMPTS, sizes=GRID)
    assert torch.equal(run.ids, one_call.ids) and torch.equal(run.counts, one_call.counts)
    for key in run.metrics:
        assert torch.allclose(run.metrics[key], one_call.metrics[key], atol=1e-5), key
    assert_same_edges(sl.load(out), run)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="at edge granularity"):
        TraceResult.load(out)
    from strace_lens.dataset import load_run

    assert_same_edges(load_run(out), run)
    manifest = json.loads((out / "manifest.json").read_text())
    opts = manifest["options"]
    assert opts["granularity"] == "edge" and opts["method"] == "greedy"
    assert opts["ablate_attention_edges"] is True and opts["tokens"] == "paper"
    assert opts["sizes"] == GRID and opts["ablation"] == "zero"
    assert "ablation.safetensors" not in {p.name for p in out.iterdir()}  # no mean is taken


def test_edge_run_resumes_after_a_kill(model, tmp_path, monkeypatch):
    out = tmp_path / "run"
    clean = edge_run(model, tmp_path / "clean")
    calls = count_chunks(monkeypatch, fail_on=1)
    with pytest.raises(KeyboardInterrupt):
        edge_run(model, out)
    assert calls == [2] and sorted(p.name for p in (out / "shards").iterdir()) == ["00000"]
    calls = count_chunks(monkeypatch)
    assert_same_edges(edge_run(model, out), clean)
    assert calls == [2, 1]  # chunks 1 and 2 only
    # a lost shard, a truncated one and a temporary folder a kill left behind
    shutil.rmtree(out / "shards" / "00000")
    tensors = out / "shards" / "00002" / "edges.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-5])
    (out / "shards" / ".00001.abc.tmp").mkdir()
    calls.clear()
    assert_same_edges(edge_run(model, out), clean)
    assert calls == [2, 1] and not (out / "shards" / ".00001.abc.tmp").exists()
    calls.clear()
    assert_same_edges(edge_run(model, out), clean)
    assert calls == []  # finished: only read back


def test_edge_run_refuses_a_changed_identity(model, tmp_path):
    from strace_lens.dataset import RunMismatchError, trace_dataset

    out = tmp_path / "run"
    edge_run(model, out)
    changes = [
        ({"ablate_attention_edges": False}, "option 'ablate_attention_edges' was True, now False"),
        ({"tokens": "transformer_lens"}, "option 'tokens' was 'paper', now 'transformer_lens'"),
        ({"method": "random"}, "option 'method' was 'greedy', now 'random'"),
        ({"sizes": [0.1, 1.0]}, "option 'sizes' was"),
        ({"seed": 4}, "option 'seed' was 0, now 4"),
    ]
    for change, message in changes:
        with pytest.raises(RunMismatchError, match=message):
            edge_run(model, out, **change)
    with pytest.raises(RunMismatchError, match="option 'granularity' was 'edge'"):
        trace_dataset(model, PROMPTS, out, chunk_size=2, sizes=[1, 3], steps=2)
    # the default method and semantics, named explicitly, are the same run
    edge_run(model, out, method="greedy", ablate_attention_edges=True, batch_size=3)


def test_edge_run_refuses_what_does_not_apply_before_any_work(model, tmp_path):
    from strace_lens.dataset import trace_dataset

    out = tmp_path / "run"
    with pytest.raises(ValueError, match="the paper's edge ablation is zero"):
        edge_run(model, out, ablation="mean")
    with pytest.raises(ValueError, match="per='dataset' does not apply"):
        edge_run(model, out, per="dataset")
    with pytest.raises(ValueError, match=r"targets .* are not recorded"):
        trace_dataset(model, PROMPTS, out, granularity="edge", targets=["x"] * 5)
    assert not out.exists()


def test_edge_run_static_split_and_leases(model, tmp_path):
    from strace_lens.dataset import WorkerShareDone

    out = tmp_path / "run"
    clean = edge_run(model, tmp_path / "clean")
    with pytest.raises(WorkerShareDone, match="2 of 3 shards are done"):
        edge_run(model, out, num_workers=2, worker_index=0)  # shards 0 and 2
    last = edge_run(model, out, num_workers=2, worker_index=1)  # shard 1, then the merge
    assert_same_edges(last, clean)
    assert not any((out / "leases").iterdir())  # every lease released


# -- the command line ------------------------------------------------------------------------
def edge_cli_args(prompts, out, *extra):
    grid = [str(s) for s in GRID]
    return cli_trace_args(
        prompts, out, "--granularity", "edge", "--sizes", *grid, "--chunk-size", "2", *extra
    )


@pytest.fixture
def prompt_file(tmp_path):
    return write_prompt_file(tmp_path, PROMPTS[:3])


def test_cli_traces_edges_prints_the_table_and_merges(prompt_file, tmp_path, capsys):
    import strace_lens as sl
    from strace_lens.cli import main

    out = tmp_path / "run"
    assert main(edge_cli_args(prompt_file, out, "--ablate-attention-edges", "false")) == 0
    printed = capsys.readouterr().out
    result = sl.load(out)
    assert isinstance(result, EdgeTraceResult) and result.prompts == PROMPTS[:3]
    assert result.options["ablate_attention_edges"] is False
    lines = printed.strip().splitlines()
    assert lines[0] == (
        f"3 prompt(s), edge granularity, method=greedy, ablate_attention_edges=false, "
        f"tokens=paper; run folder: {out}"
    )
    assert lines[1].split() == ["s", "mean", "edges", "mean", "TV", "top-1", "%"]
    for j, row in enumerate(line.split() for line in lines[2 : 2 + len(GRID)]):
        assert float(row[0]) == GRID[j]
        assert float(row[1]) == pytest.approx(float(result.counts[:, j].double().mean()), abs=0.05)
        assert float(row[2]) == pytest.approx(float(result.metrics["tv"][:, j].mean()), abs=1e-4)
        top1 = 100 * float(result.metrics["top1"][:, j].mean())
        assert float(row[3]) == pytest.approx(top1, abs=0.05)
    assert lines[-1] == f"HTML page: {out / 'report.html'}"
    page = (out / "report.html").read_text(encoding="utf-8")
    for div in ("fig-edge_fidelity", "fig-edge_composition", "fig-token_circuit"):
        assert f'id="{div}"' in page
    # merge reads the finished run and prints the same summary
    assert main(["merge", str(out)]) == 0
    assert capsys.readouterr().out == printed
    # the same command resumes (nothing left to trace) and prints the same again
    assert main(edge_cli_args(prompt_file, out, "--ablate-attention-edges", "false")) == 0
    assert capsys.readouterr().out == printed


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--ablation", "mean"], "the paper's edge ablation is zero"),
        (["--per", "dataset"], "per='dataset' does not apply at --granularity edge"),
        (["--tokens", "bpe"], "Unknown tokens='bpe'"),
        (["--method", "forward"], "choose one of greedy, random, mask"),
        (["--option", "steps=3"], "Unknown option(s) at --granularity edge"),
        (["--ablate-attention-edges", "maybe"], "expected true or false"),
    ],
)
def test_cli_edge_bad_input_is_one_line_and_exit_2(prompt_file, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert_refused(capsys, edge_cli_args(prompt_file, out, *extra), message, out)


def test_cli_edge_only_flags_are_refused_at_node_granularity(prompt_file, tmp_path, capsys):
    from strace_lens.cli import main

    args = ["trace", "--model", "native:tiny", "--prompts", str(prompt_file)]
    assert main([*args, "--out", str(tmp_path / "a"), "--tokens", "hf"]) == 2
    assert "--tokens apply at --granularity edge only" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "b"), "--granularity", "layer"]) == 2
    assert "Unknown --granularity 'layer'" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "c"), "--sizes", "paper"]) == 2
    assert not any((tmp_path / name).exists() for name in "abc")
