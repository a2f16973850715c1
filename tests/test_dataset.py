"""Dataset-scale tracing: chunks saved as shards, resume, refusal of a different run."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import TINY_RUN_OPTIONS, TINY_RUN_PROMPTS

import strace_lens.dataset as ds
from strace_lens import MeanAblation, trace
from strace_lens.dataset import (
    IncompleteRunError,
    RunMismatchError,
    TraceOutOfMemoryError,
    trace_dataset,
)
from strace_lens.prompts import read_prompts
from strace_lens.result import TraceResult
from strace_lens.tiny_model import tiny_model

PROMPTS = TINY_RUN_PROMPTS
FAST = TINY_RUN_OPTIONS


@pytest.fixture(scope="module")
def model():
    return tiny_model(device="cpu")


def count_traces(monkeypatch) -> list[int]:
    """Count chunk traces (and their sizes) while still running the real trace."""
    calls: list[int] = []

    def counting(model, prompts, **kw):
        calls.append(len(prompts))
        return trace(model, prompts, **kw)

    monkeypatch.setattr(ds, "_trace_function", lambda: counting)
    return calls


def test_chunks_equal_tracing_each_chunk_with_the_shared_mean(model, tmp_path):
    run = trace_dataset(model, PROMPTS, tmp_path / "run", chunk_size=2, **FAST)
    assert sorted(p.name for p in (tmp_path / "run" / "shards").iterdir()) == [
        "00000",
        "00001",
        "00002",
    ]
    mean = MeanAblation.from_prompts(model, PROMPTS, progress=False)
    parts = [
        trace(model, PROMPTS[lo : lo + 2], ablation=mean, progress=False, **FAST)
        for lo in (0, 2, 4)
    ]
    assert run.equals(TraceResult.concat(parts))
    assert run.prompts == PROMPTS and run.masks.shape == (5, 3, 15)
    # the full graph reproduces the model exactly
    assert torch.all(run.metrics["kl"][:, -1].abs() < 1e-6)
    # TraceResult.load reads a run folder back
    assert TraceResult.load(tmp_path / "run").equals(run)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["chunk_size"] == 2 and manifest["n_prompts"] == 5
    assert manifest["options"]["method"] == "mask" and manifest["options"]["ablation"] == "mean"
    assert manifest["model"]["name"] == "native:tiny"
    assert len(manifest["prompt_sha256"]) == 5


def test_resume_traces_only_missing_or_broken_shards(model, tmp_path, monkeypatch):
    out = tmp_path / "run"
    clean = trace_dataset(model, PROMPTS, out, chunk_size=2, **FAST)
    shutil.rmtree(out / "shards" / "00001")  # lost shard
    tensors = out / "shards" / "00002" / "result.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-7])  # truncated shard
    (out / "shards" / ".00000.abc.tmp").mkdir()  # a temporary folder a kill left behind
    calls = count_traces(monkeypatch)
    resumed = trace_dataset(model, PROMPTS, out, chunk_size=2, **FAST)
    assert calls == [2, 1]  # chunk 1 (2 prompts) and chunk 2 (1 prompt) traced again
    assert resumed.equals(clean)
    assert not (out / "shards" / ".00000.abc.tmp").exists()
    calls.clear()
    assert trace_dataset(model, PROMPTS, out, chunk_size=2, **FAST).equals(clean)
    assert calls == []  # a finished run is only read back


def test_a_different_run_into_the_same_folder_is_refused(model, tmp_path):
    out = tmp_path / "run"
    trace_dataset(model, PROMPTS, out, chunk_size=2, **FAST)
    with pytest.raises(RunMismatchError, match="option 'method' was 'mask', now 'random'"):
        trace_dataset(model, PROMPTS, out, chunk_size=2, sizes=[1, 3, 15], method="random")
    with pytest.raises(RunMismatchError, match="option 'seed' was 0, now 1"):
        trace_dataset(model, PROMPTS, out, chunk_size=2, seed=1, **FAST)
    with pytest.raises(RunMismatchError, match=r"1 prompt.s. differ, first: prompt 3"):
        changed = [*PROMPTS[:3], "something else", *PROMPTS[4:]]
        trace_dataset(model, changed, out, chunk_size=2, **FAST)
    with pytest.raises(RunMismatchError, match="had 5 prompts, now 4"):
        trace_dataset(model, PROMPTS[:4], out, chunk_size=2, **FAST)
    with pytest.raises(RunMismatchError, match="chunk_size was 2, now 3"):
        trace_dataset(model, PROMPTS, out, chunk_size=3, **FAST)
    with pytest.raises(RunMismatchError, match="option 'ablation' was 'mean', now 'zero'"):
        trace_dataset(model, PROMPTS, out, chunk_size=2, ablation="zero", **FAST)
    other = tiny_model(device="cpu", seed=1)  # same shape, other weights
    with pytest.raises(RunMismatchError, match="weights differ"):
        trace_dataset(other, PROMPTS, out, chunk_size=2, **FAST)
    wider = tiny_model(device="cpu", n_heads=2)
    with pytest.raises(RunMismatchError, match="model was"):
        trace_dataset(wider, PROMPTS, out, chunk_size=2, sizes=[1, 3, 9], steps=3)
    # batch size and progress are not part of a run: a resume may change them
    trace_dataset(model, PROMPTS, out, chunk_size=2, batch_size=4, progress=False, **FAST)


def test_bad_arguments_leave_no_folder_behind(model, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TypeError, match="Unknown option"):  # found by the first chunk's trace
        trace_dataset(model, PROMPTS, out, chunk_size=2, sizes=[1, 2], no_such_option=1)
    assert not out.exists()
    # so the corrected command can run into the same folder
    trace_dataset(model, PROMPTS[:2], out, chunk_size=2, **FAST)


def test_incomplete_run_cannot_be_loaded(model, tmp_path):
    out = tmp_path / "run"
    trace_dataset(model, PROMPTS, out, chunk_size=2, **FAST)
    shutil.rmtree(out / "shards" / "00001")
    with pytest.raises(IncompleteRunError, match="2 of 3 shards are done"):
        TraceResult.load(out)


def test_per_dataset_is_one_shard(model, tmp_path):
    run = trace_dataset(model, PROMPTS, tmp_path / "run", chunk_size=2, per="dataset", **FAST)
    assert [p.name for p in (tmp_path / "run" / "shards").iterdir()] == ["00000"]
    assert run.masks.shape == (1, 3, 15) and run.per == "dataset"
    assert run.metrics["kl"].shape == (5, 3)


def test_tsv_targets_are_recorded(model, tmp_path):
    rows = ["\t".join([p, "w", "NOUN", "next", "NOUN", " next"]) for p in PROMPTS[:3]]
    path = tmp_path / "p.tsv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    run = trace_dataset(model, read_prompts(path), tmp_path / "run", chunk_size=2, **FAST)
    assert run.target_logprob is not None and run.target_logprob.shape == (3,)
    # byte tokenizer: " next" starts with the space byte; its full-model log-prob
    assert torch.all(run.target_logprob < 0)
    with pytest.raises(RunMismatchError, match="targets"):
        trace_dataset(model, PROMPTS[:3], tmp_path / "run", chunk_size=2, **FAST)


def test_progress_bar_only_when_asked_or_on_a_terminal(model, tmp_path, capsys):
    trace_dataset(model, PROMPTS[:2], tmp_path / "a", chunk_size=1, **FAST)
    assert capsys.readouterr().err == ""  # stderr is not a terminal under pytest
    trace_dataset(model, PROMPTS[:2], tmp_path / "b", chunk_size=1, progress=True, **FAST)
    err = capsys.readouterr().err
    assert "tracing" in err and "2/2" in err and "prompt" in err


def test_out_of_memory_says_what_to_lower_and_keeps_finished_shards(model, tmp_path, monkeypatch):
    calls = []

    def oom_on_second(model_, prompts, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return trace(model_, prompts, **kw)

    monkeypatch.setattr(ds, "_trace_function", lambda: oom_on_second)
    with pytest.raises(TraceOutOfMemoryError) as err:
        trace_dataset(model, PROMPTS, tmp_path / "run", chunk_size=2, batch_size=8, **FAST)
    msg = str(err.value)
    assert "chunk 1 (prompts 2-3)" in msg and "batch_size=8" in msg and "lower batch_size" in msg
    assert [p.name for p in (tmp_path / "run" / "shards").iterdir()] == ["00000"]
    monkeypatch.undo()
    # resuming with a smaller batch size finishes the run
    run = trace_dataset(model, PROMPTS, tmp_path / "run", chunk_size=2, batch_size=2, **FAST)
    assert run.n_prompts == 5


def test_errors_inside_a_chunk_name_the_run_prompt(model, tmp_path, monkeypatch):
    def nan_in_chunk(model_, prompts, **kw):
        if prompts == PROMPTS[2:4]:
            raise FloatingPointError("NaN or inf in the model's output for prompt row(s) [1]: x")
        return trace(model_, prompts, **kw)

    monkeypatch.setattr(ds, "_trace_function", lambda: nan_in_chunk)
    with pytest.raises(FloatingPointError, match=r"prompt\(s\) \[3\] of the run"):
        trace_dataset(model, PROMPTS, tmp_path / "run", chunk_size=2, **FAST)


def test_prompt_errors_name_the_index_in_the_whole_list(model, tmp_path):
    prompts = [*PROMPTS[:3], "   "]
    with pytest.raises(ValueError, match="Prompt 3 is empty or whitespace"):
        trace_dataset(model, prompts, tmp_path / "run", chunk_size=2, **FAST)
    assert not (tmp_path / "run").exists()


@pytest.mark.integration
def test_resumed_run_on_gemma_equals_the_uninterrupted_one(gemma, tmp_path, monkeypatch):
    from conftest import DATA

    prompts = read_prompts(DATA, n=2)
    n_nodes = 18 * 5
    opts = dict(sizes=[1, n_nodes], method="random", draws=1)
    clean = trace_dataset(gemma, prompts, tmp_path / "clean", chunk_size=1, **opts)
    assert clean.target_logprob is not None and torch.all(clean.target_logprob < 0)
    assert torch.all(clean.metrics["kl"][:, -1].abs() < 1e-5)  # the whole model
    assert torch.all(clean.metrics["kl"][:, 0] > 0.01)  # one node is far from it
    out = tmp_path / "run"
    shutil.copytree(tmp_path / "clean", out)
    shutil.rmtree(out / "shards" / "00001")  # as if killed before the last chunk
    calls = count_traces(monkeypatch)
    assert trace_dataset(gemma, prompts, out, chunk_size=1, **opts).equals(clean)
    assert calls == [1]


def test_a_folder_lock_held_by_an_old_version_does_not_block_workers(model, tmp_path):
    # Workers share a folder through per-shard leases (tests/test_workers.py), not a
    # folder-wide flock: a held .lock (an older strace-lens) no longer refuses the run.
    fcntl = pytest.importorskip("fcntl")
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ds.LOCK_FILE, "a+") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert trace_dataset(model, PROMPTS[:2], out, chunk_size=1, **FAST).n_prompts == 2
        fcntl.flock(held.fileno(), fcntl.LOCK_UN)
    assert not any((out / "leases").iterdir())  # every lease released
    (out / ".manifest.json.x1.tmp").write_text("half")  # left by a kill -9 mid-write
    trace_dataset(model, PROMPTS[:2], out, chunk_size=1, **FAST)
    assert not (out / ".manifest.json.x1.tmp").exists()


def test_out_of_memory_in_the_first_pass(model, tmp_path, monkeypatch):
    def oom(*args, **kw):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    monkeypatch.setattr(ds, "_check_full_outputs", oom)
    with pytest.raises(TraceOutOfMemoryError, match=r"first pass .*8 prompts per forward pass"):
        trace_dataset(model, PROMPTS, tmp_path / "run", batch_size=8, **FAST)
    assert not (tmp_path / "run").exists()
