"""Reliability: faults injected mid-run, a real kill -9, and a clear error for each bad input.

After every fault the user's model must be exactly as it was (no hooks, no new ``.grad``,
``requires_grad``, train/eval mode and weights unchanged), no shard a resume would trust may
be left half-written, and resuming must give the same result as a run that never failed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import TINY_RUN_OPTIONS, TINY_RUN_PROMPTS

import strace_lens.dataset as ds
import strace_lens.search.mask_learning as mask_learning
import strace_lens.search.objective as objective
from strace_lens import MeanAblation, run_with_mask, trace
from strace_lens.cli import main
from strace_lens.dataset import load_run, trace_dataset
from strace_lens.result import TraceResult
from strace_lens.tiny_model import tiny_model

PROMPTS = TINY_RUN_PROMPTS
FAST = TINY_RUN_OPTIONS


# -- the user's model, before and after --------------------------------------------------------
def user_model():
    """A tiny model in the state a user might leave it: training mode, trainable, a stale grad."""
    model = tiny_model(device="cpu")
    # The bridge adds its own pre-hooks to the layer norms on the first forward pass; run one,
    # as any user would have, so that those are part of the state before.
    with torch.no_grad():
        model(model.to_tokens("warm up"))
    model.train()
    first = next(model.parameters())
    first.grad = torch.full_like(first, 0.5)
    return model


def snapshot(model) -> dict:
    return {
        "modes": {name: m.training for name, m in model.named_modules()},
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {
            n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
        },
        "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
        "hook_points": {
            name: (len(hp.fwd_hooks), len(hp.bwd_hooks)) for name, hp in model.hook_dict.items()
        },
        "torch_hooks": sum(
            len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
            for m in model.modules()
        ),
    }


def assert_untouched(before: dict, model) -> None:
    after = snapshot(model)
    assert after["modes"] == before["modes"]
    assert after["flags"] == before["flags"]
    assert after["hook_points"] == before["hook_points"]
    assert after["torch_hooks"] == before["torch_hooks"]
    for n, g in before["grads"].items():
        g2 = after["grads"][n]
        if g is None:
            assert g2 is None, n
        else:
            assert g2 is not None and torch.equal(g, g2), n
    for n, w in before["weights"].items():
        assert torch.equal(w, after["weights"][n]), n


def assert_only_trusted_shards(out: Path, finished: list[str]) -> None:
    """The shards folder holds exactly the finished shards, each one loading with its checksum."""
    shards = out / "shards"
    assert sorted(p.name for p in shards.iterdir()) == finished  # no temporary leftovers
    for name in finished:
        TraceResult.load(shards / name)


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    """The reference: the same run, never interrupted."""
    out = tmp_path_factory.mktemp("clean") / "run"
    return trace_dataset(tiny_model(device="cpu"), PROMPTS, out, chunk_size=2, **FAST)


def arm_on_chunk(monkeypatch, chunk: int) -> dict:
    """state["armed"] becomes True while chunk ``chunk`` (0-based) is traced."""
    state = {"chunk": -1, "armed": False}

    def tracing(model, prompts, **kw):
        state["chunk"] += 1
        state["armed"] = state["chunk"] == chunk
        return trace(model, prompts, **kw)

    monkeypatch.setattr(ds, "_trace_function", lambda: tracing)
    return state


# -- fault injection ---------------------------------------------------------------------------
def test_exception_inside_a_hook(tmp_path, monkeypatch, clean_run):
    model = user_model()
    before = snapshot(model)
    state = arm_on_chunk(monkeypatch, 1)
    real_node_hooks = objective.node_hooks
    calls = {"n": 0}

    def failing_node_hooks(*args, **kw):
        hooks = real_node_hooks(*args, **kw)

        def wrap(fn):
            def hook(act, hook):
                if state["armed"]:
                    calls["n"] += 1
                    if calls["n"] == 7:  # a few forward passes into the chunk's optimisation
                        raise RuntimeError("injected failure inside a hook")
                return fn(act, hook)

            return hook

        return [(name, wrap(fn)) for name, fn in hooks]

    monkeypatch.setattr(objective, "node_hooks", failing_node_hooks)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="injected failure inside a hook"):
        trace_dataset(model, PROMPTS, out, chunk_size=2, **FAST)
    assert calls["n"] == 7
    assert_untouched(before, model)
    assert_only_trusted_shards(out, ["00000"])
    monkeypatch.undo()
    assert trace_dataset(model, PROMPTS, out, chunk_size=2, **FAST).equals(clean_run)
    assert_untouched(before, model)


def test_keyboard_interrupt_mid_optimisation(tmp_path, monkeypatch, clean_run):
    model = user_model()
    before = snapshot(model)
    state = arm_on_chunk(monkeypatch, 2)
    real_step = mask_learning._RowAdam.step
    steps = {"n": 0}

    def interrupted_step(self, *args, **kw):
        if state["armed"]:
            steps["n"] += 1
            if steps["n"] == 2:  # the second optimiser step of the third chunk
                raise KeyboardInterrupt
        return real_step(self, *args, **kw)

    monkeypatch.setattr(mask_learning._RowAdam, "step", interrupted_step)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        trace_dataset(model, PROMPTS, out, chunk_size=2, **FAST)
    assert steps["n"] == 2
    assert_untouched(before, model)
    assert_only_trusted_shards(out, ["00000", "00001"])
    monkeypatch.undo()
    assert trace_dataset(model, PROMPTS, out, chunk_size=2, **FAST).equals(clean_run)


def test_failing_tensor_write_leaves_no_trusted_partial_shard(tmp_path, monkeypatch):
    model = user_model()
    before = snapshot(model)
    real_save = safetensors.torch.save_file
    writes = {"n": 0}

    def disk_full(tensors, filename, *args, **kw):
        writes["n"] += 1
        if writes["n"] == 2:  # the second shard: half a file, then the disk is full
            real_save(tensors, filename, *args, **kw)
            data = Path(filename).read_bytes()
            Path(filename).write_bytes(data[: len(data) // 2])
            raise OSError(28, "No space left on device")
        return real_save(tensors, filename, *args, **kw)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    out = tmp_path / "run"
    with pytest.raises(OSError, match="No space left"):
        trace_dataset(model, PROMPTS, out, chunk_size=2, ablation="zero", **FAST)
    assert_untouched(before, model)
    assert_only_trusted_shards(out, ["00000"])
    monkeypatch.undo()
    resumed = trace_dataset(model, PROMPTS, out, chunk_size=2, ablation="zero", **FAST)
    reference = trace_dataset(
        tiny_model(device="cpu"), PROMPTS, tmp_path / "ref", chunk_size=2, ablation="zero", **FAST
    )
    assert resumed.equals(reference)


def test_failing_rename_of_a_finished_shard(tmp_path, monkeypatch, clean_run):
    model = user_model()
    before = snapshot(model)
    real_replace = os.replace
    renames = {"n": 0}

    def failing_replace(src, dst):
        if Path(dst).parent.name == "shards":  # renaming a whole shard folder into place
            renames["n"] += 1
            if renames["n"] == 3:
                raise PermissionError(13, "Permission denied", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    out = tmp_path / "run"
    with pytest.raises(PermissionError):
        trace_dataset(model, PROMPTS, out, chunk_size=2, **FAST)
    assert_untouched(before, model)
    assert_only_trusted_shards(out, ["00000", "00001"])
    monkeypatch.undo()
    assert trace_dataset(model, PROMPTS, out, chunk_size=2, **FAST).equals(clean_run)


def test_kill_9_of_a_running_cli_then_resume_equals_a_clean_run(tmp_path):
    prompts = [f"Prompt number {i} is about the weather in town" for i in range(6)]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    args = [
        "trace", "--model", "native:tiny", "--prompts", str(tmp_path / "p.txt"),
        "--chunk-size", "2", "--sizes", "1", "3", "15", "--quiet", "--no-html",
        "--option", "steps=3",
    ]
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "strace_lens.cli", *args, "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    first = out / "shards" / "00000"
    deadline = time.monotonic() + 240
    try:
        while not first.exists():
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "the first shard never appeared"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL  # really killed, not finished
    finished = [p.name for p in (out / "shards").iterdir() if not p.name.startswith(".")]
    assert 1 <= len(finished) < 3  # killed mid-run (3 shards in all)
    with pytest.raises(ds.IncompleteRunError):
        load_run(out)
    assert main([*args, "--out", str(out)]) == 0  # resume
    assert main([*args, "--out", str(tmp_path / "clean")]) == 0
    resumed, clean = TraceResult.load(out), TraceResult.load(tmp_path / "clean")
    assert resumed.n_prompts == len(prompts)
    assert resumed.equals(clean)


# -- bad inputs: API ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    return tiny_model(device="cpu")


def test_empty_and_whitespace_prompts(model, tmp_path):
    with pytest.raises(ValueError, match="prompt list is empty"):
        trace_dataset(model, [], tmp_path / "a", **FAST)
    with pytest.raises(ValueError, match="Prompt 1 is empty or whitespace only"):
        trace_dataset(model, ["fine", " \t "], tmp_path / "a", **FAST)
    with pytest.raises(ValueError, match="Prompt 0 is empty"):
        trace(model, [""], progress=False)


def test_prompt_over_the_context_length(model, tmp_path):
    long = "x" * 300  # 300 bytes -> 301 tokens with BOS; the context is 256
    expected = "Prompt 1 has 301 tokens, more than the model's context of 256"
    with pytest.raises(ValueError, match=expected):
        trace_dataset(model, ["short", long], tmp_path / "a", **FAST)


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ([0, 3], r"Sizes \[0\] are outside \[1, 15\]"),
        ([3, 16], r"Sizes \[16\] are outside \[1, 15\]"),
        ([2, 2], r"Sizes repeat \(node counts \[2\]\)"),
        ([0.0, 0.5], r"Relative sizes \[0.0\] are outside \(0, 1\]"),
        ([0.5, 1.5], r"Relative sizes \[1.5\] are outside \(0, 1\]"),
        ([], r"`sizes` is empty"),
    ],
)
def test_sizes_out_of_range_or_duplicated(model, tmp_path, sizes, message):
    with pytest.raises(ValueError, match=message):
        trace_dataset(model, PROMPTS[:2], tmp_path / "a", sizes=sizes)
    assert not (tmp_path / "a").exists()


def test_unknown_method_ablation_or_per(model, tmp_path):
    with pytest.raises(ValueError, match="Unknown method 'masks'"):
        trace_dataset(model, PROMPTS[:2], tmp_path / "a", method="masks")
    with pytest.raises(ValueError, match="Unknown ablation 'median'"):
        trace_dataset(model, PROMPTS[:2], tmp_path / "a", ablation="median")
    with pytest.raises(ValueError, match="Unknown per='prompt'"):
        trace_dataset(model, PROMPTS[:2], tmp_path / "a", per="prompt")
    with pytest.raises(ValueError, match="Unknown ablation 'median'"):
        trace(model, PROMPTS[:2], ablation="median", progress=False)


def test_mask_ablation_or_result_from_a_different_model(model, tmp_path):
    other = tiny_model(device="cpu", n_layers=2)  # 10 nodes, not 15
    tokens = model.to_tokens(PROMPTS[0])
    with pytest.raises(ValueError, match=r"The mask has shape \(1, 10\).*need \[1, 15\]"):
        run_with_mask(model, tokens, torch.ones(1, 10))
    result = trace(other, PROMPTS[:2], sizes=[1, 2], steps=2, progress=False)
    expected = "traced on a model with 2 layers x 4 heads, but the model has 3 x 4"
    with pytest.raises(ValueError, match=expected):
        result.check_model(model)
    mean = MeanAblation.from_prompts(other, PROMPTS[:2], progress=False)
    with pytest.raises(ValueError, match="computed for a model with 2 layers"):
        trace_dataset(model, PROMPTS[:2], tmp_path / "a", ablation=mean, **FAST)


def test_corrupted_or_truncated_result_files(model, tmp_path):
    run_dir = tmp_path / "run"
    trace_dataset(model, PROMPTS[:4], run_dir, chunk_size=2, **FAST)
    single = tmp_path / "single"
    trace(model, PROMPTS[:2], progress=False, **FAST).save(single)
    # truncated tensors
    tensors = single / "result.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        TraceResult.load(single)
    # a flipped byte in a shard
    shard = run_dir / "shards" / "00001" / "result.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"Shard .*00001 cannot be read.*truncated or corrupted"):
        TraceResult.load(run_dir)
    # a garbled manifest
    (run_dir / "manifest.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=r"manifest\.json is corrupted"):
        TraceResult.load(run_dir)
    # the JSON half of a single result
    (single / "result.json").write_bytes(b"\xff\xfe garbage")
    with pytest.raises(ValueError, match=r"result\.json is corrupted"):
        TraceResult.load(single)


def test_nan_in_the_model_output_names_the_prompt(tmp_path):
    model = tiny_model(device="cpu")
    tilde = int(model.to_tokens("~", prepend_bos=False)[0, 0])
    embed = dict(model.named_parameters())["tok_embed._original_component.weight"]
    with torch.no_grad():
        embed[tilde] = float("nan")
    prompts = [*PROMPTS[:3], "a tilde ~ here", PROMPTS[4]]
    expected = r"prompt\(s\) \[3\]; the first reads: 'a tilde ~ here'"
    with pytest.raises(FloatingPointError, match=expected):
        trace_dataset(model, prompts, tmp_path / "a", chunk_size=2, **FAST)
    assert not (tmp_path / "a").exists()
    with pytest.raises(FloatingPointError, match=r"row\(s\) \[1\]"):
        trace(model, prompts[2:4], progress=False, **FAST)


# -- bad inputs: the command line (exit status 2, one line on stderr, no traceback) ------------
def tsv_line(prompt: str, columns: int = 6) -> str:
    return "\t".join([prompt, "w", "NOUN", "next", "NOUN", " next"][:columns])


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        (b"", [], "holds no prompts"),
        (b"good\n  \n", [], "line 2: the prompt is whitespace only"),
        (b"ok\ncaf\xe9\n", [], "not UTF-8: line 2, byte 4"),
        (f"{tsv_line('a b')}\n{tsv_line('c d', 4)}\n".encode(), [], "line 2: 4 tab-separated"),
        (b"one\ntwo\n", ["--n", "5"], "fewer than the 5 asked for"),
        (b"one\ntwo\n", ["--sizes", "0", "4"], r"outside [1, 15]"),
        (b"one\ntwo\n", ["--sizes", "4", "4"], "Sizes repeat"),
        (b"one\ntwo\n", ["--sizes", "four"], "--sizes takes node counts"),
        (b"one\ntwo\n", ["--method", "magic"], "Unknown method 'magic'"),
        (b"one\ntwo\n", ["--ablation", "median"], "Unknown ablation 'median'"),
        (b"one\ntwo\n", ["--per", "token"], "Unknown per='token'"),
        (b"one\ntwo\n", ["--option", "bogus=1"], "Unknown option(s) for method='mask'"),
        (b"short\n\n" + b"x" * 300 + b"\n", [], "Prompt 1 has 301 tokens, more than the model's "
         "context of 256: shorten it (e.g. keep its last words) before tracing. (line 3 of"),
        (b"one\n", ["--model", "no-such-model"], "no-such-model"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(
    tmp_path, capsys, monkeypatch, content, extra, message
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # an unknown model name must not go online
    path = tmp_path / ("p.tsv" if b"\t" in content else "p.txt")
    path.write_bytes(content)
    args = ["trace", "--model", "native:tiny", "--prompts", str(path), "--out", str(tmp_path / "o")]
    code = main([*args, "--quiet", "--no-html", *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.startswith("strace-lens: error: ") and err.count("\n") == 1
    assert "Traceback" not in err


def test_cli_missing_file_and_other_run_in_folder(tmp_path, capsys):
    base = ["trace", "--model", "native:tiny", "--quiet", "--no-html", "--out", str(tmp_path / "o")]
    assert main([*base, "--prompts", str(tmp_path / "nope.txt")]) == 2
    assert "No prompt file at" in capsys.readouterr().err
    (tmp_path / "p.txt").write_text("one\ntwo\n", encoding="utf-8")
    fast = ["--sizes", "1", "15", "--option", "steps=2"]
    assert main([*base, "--prompts", str(tmp_path / "p.txt"), *fast]) == 0
    capsys.readouterr()
    assert main([*base, "--prompts", str(tmp_path / "p.txt"), *fast, "--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert "already holds a different run: option 'seed' was 0, now 3" in err
    assert err.count("\n") == 1


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as err:
        main(["trace", "--prompts", "x"])  # --out missing
    assert err.value.code == 2
    assert "--out" in capsys.readouterr().err


# -- determinism -------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["mask", "random"])
def test_same_seed_same_masks_and_metrics_on_cpu(model, tmp_path, method):
    opts = dict(sizes=[1, 3, 15], method=method, **({"steps": 3} if method == "mask" else {}))
    a = trace_dataset(model, PROMPTS[:3], tmp_path / "a", chunk_size=2, seed=5, **opts)
    b = trace_dataset(model, PROMPTS[:3], tmp_path / "b", chunk_size=2, seed=5, **opts)
    assert a.equals(b)
    assert torch.equal(a.masks, b.masks)
    assert all(torch.equal(a.metrics[k], b.metrics[k]) for k in a.metrics)
    if method == "random":  # the seed matters
        c = trace_dataset(model, PROMPTS[:3], tmp_path / "c", chunk_size=2, seed=6, **opts)
        assert not torch.equal(a.masks, c.masks)
