"""Reliability: faults injected mid-run, a real kill -9, and a clear error for each bad input.

After every fault the user's model must be exactly as it was (no hooks, no new ``.grad``,
``requires_grad``, train/eval mode and weights unchanged), no shard a resume would trust may
be left half-written, and resuming must give the same result as a run that never failed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
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
    record("fault (exception inside a hook)", "model untouched; resume equals a clean run")


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
    record("fault (KeyboardInterrupt mid-optimisation)", "model untouched; resume equals clean")


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
    record("fault (disk full mid-write of a shard)", "no partial shard; resume equals clean")


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
    record("fault (failing rename of a finished shard)", "no partial shard; resume equals clean")


def test_kill_9_of_a_running_cli_then_resume_equals_a_clean_run(tmp_path):
    prompts = [f"Prompt number {i} is about the weather in town" for i in range(6)]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    args = [
        "trace",
        "--model",
        "native:tiny",
        "--prompts",
        str(tmp_path / "p.txt"),
        "--chunk-size",
        "2",
        "--sizes",
        "1",
        "3",
        "15",
        "--quiet",
        "--no-html",
        "--option",
        "steps=3",
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
    record("fault (kill -9 of the CLI mid-run)", "resume equals a clean run")


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
        (
            b"short\n\n" + b"x" * 300 + b"\n",
            [],
            "Prompt 1 has 301 tokens, more than the model's "
            "context of 256: shorten it (e.g. keep its last words) before tracing. (line 3 of",
        ),
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
    record("bad input (CLI prompt file or value)", "one line, exit 2")


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


# == round 2 (issue 16): links, silent mixing, damaged folders, every bad input ================
# The suite counts what it tried; `pytest -s tests/test_reliability.py` prints the figures.
FIGURES: dict[str, int] = {}


def record(kind: str, outcome: str, n: int = 1) -> None:
    """Count ``n`` cases of ``kind`` (bad input, injected fault, ...) that ended in ``outcome``."""
    key = f"{kind}: {outcome}"
    FIGURES[key] = FIGURES.get(key, 0) + n


@pytest.fixture(scope="module", autouse=True)
def print_figures():
    yield
    if FIGURES:
        inputs = sum(v for k, v in FIGURES.items() if k.startswith(("bad input", "input")))
        faults = sum(v for k, v in FIGURES.items() if k.startswith("fault"))
        print(f"\nreliability figures: {inputs} inputs tried, {faults} faults injected")
        for key in sorted(FIGURES):
            print(f"  {FIGURES[key]:4d}  {key}")


ZERO = dict(sizes=[1, 15], steps=2, ablation="zero")  # the cheapest run that writes shards


def finished_run(model, out, prompts=PROMPTS[:2], **opts):
    options = {**ZERO, **opts}
    if options.get("method", "mask") != "mask":
        del options["steps"]
    return trace_dataset(model, prompts, out, chunk_size=1, **options)


def counting_traces(monkeypatch) -> list[int]:
    calls: list[int] = []

    def counting(model, prompts, **kw):
        calls.append(len(prompts))
        return trace(model, prompts, **kw)

    monkeypatch.setattr(ds, "_trace_function", lambda: counting)
    return calls


def victim_folder(tmp_path: Path) -> Path:
    """A folder outside the run, like a home directory: dot-entries that must survive."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_rsa").write_text("secret")
    (home / ".bashrc").write_text("alias ll='ls -l'")
    (home / "notes.txt").write_text("keep me")
    return home


def tree(folder: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(folder.rglob("*"))
    }


# -- 1. nothing outside the run folder is created, changed or removed --------------------------
@pytest.mark.parametrize(
    "name", ["shards", "leases", ".lock", "manifest.json", "ablation.safetensors", "report.html"]
)
@pytest.mark.parametrize("target", ["folder", "file", "missing"])
def test_a_link_in_a_new_run_folder_is_refused_and_never_followed(model, tmp_path, name, target):
    home = victim_folder(tmp_path)
    dest = {"folder": home, "file": home / ".bashrc", "missing": home / ".created"}[target]
    out = tmp_path / "run"
    out.mkdir()
    (out / name).symlink_to(dest)
    before = tree(home)
    with pytest.raises(ValueError, match="symbolic link"):
        finished_run(model, out)
    assert tree(home) == before
    assert (out / name).is_symlink()  # the user's link is left for the user to remove
    record("bad input (a link in the run folder)", "refused, naming the link; nothing outside")


def test_a_shards_link_on_resume_deletes_nothing_outside(model, tmp_path, capsys):
    """The probe's case: OUT/shards a link to a home folder, then a rerun of a finished run."""
    out = tmp_path / "run"
    finished_run(model, out)
    home = victim_folder(tmp_path)
    for shard in (out / "shards").iterdir():
        shutil.move(str(shard), home / shard.name)
    (out / "shards").rmdir()
    (out / "shards").symlink_to(home)
    before = tree(home)
    with pytest.raises(ValueError, match=r"shards is a symbolic link.*Remove the link"):
        finished_run(model, out)
    assert tree(home) == before
    args = [
        "trace",
        "--model",
        "native:tiny",
        "--prompts",
        str(tmp_path / "p.txt"),
        "--out",
        str(out),
        "--quiet",
        "--no-html",
    ]
    (tmp_path / "p.txt").write_text("one\ntwo\n", encoding="utf-8")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "symbolic link" in err and err.count("\n") == 1
    assert tree(home) == before
    record("bad input (a link in the run folder)", "refused, naming the link; nothing outside")


@pytest.mark.parametrize(
    "name", ["shards", "leases", ".lock", "manifest.json", "ablation.safetensors", "report.html"]
)
def test_a_run_folder_entry_of_the_wrong_kind_is_named(model, tmp_path, capsys, name):
    out = tmp_path / "run"
    out.mkdir()
    if name in ("shards", "leases"):
        (out / name).write_text("not a folder")
    else:
        (out / name).mkdir()
    (tmp_path / "p.txt").write_text("one\ntwo\n", encoding="utf-8")
    argv = ["trace", "--model", "native:tiny", "--prompts", str(tmp_path / "p.txt")]
    code, err = cli_error([*argv, "--out", str(out), "--quiet", "--no-html"], capsys)
    assert code == 2 and str(out / name) in err and err.count("\n") == 1
    record("bad input (a run-folder entry of the wrong kind)", "one line naming it, exit 2")


def test_links_inside_the_shards_folder_are_removed_not_followed(model, tmp_path, monkeypatch):
    out = tmp_path / "run"
    clean = finished_run(model, out)
    home = victim_folder(tmp_path)
    shutil.rmtree(out / "shards" / "00001")
    (out / "shards" / "00001").symlink_to(home)  # a shard name pointing outside
    (out / "shards" / ".00000.x.tmp").symlink_to(home)  # a "temporary" pointing outside
    (out / "shards" / ".stray").symlink_to(home / ".bashrc")
    before = tree(home)
    calls = counting_traces(monkeypatch)
    assert finished_run(model, out).equals(clean)
    assert calls == [1]  # the linked shard was traced again, into a real folder
    assert tree(home) == before
    assert not (out / "shards" / "00001").is_symlink()
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["00000", "00001"]
    record("fault (links planted inside shards/)", "links removed, target untouched, resumed")


def test_written_files_get_normal_permissions(model, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        trace_dataset(model, PROMPTS[:2], out, chunk_size=1, sizes=[1, 15], steps=2)
        single = trace(model, PROMPTS[:1], sizes=[1, 15], steps=2, progress=False)
        single.save(tmp_path / "single")
    finally:
        os.umask(old)
    files = [
        out / "manifest.json",
        out / "ablation.safetensors",
        out / "shards" / "00000" / "result.json",
        out / "shards" / "00000" / "result.safetensors",
        tmp_path / "single" / "result.json",
        tmp_path / "single" / "result.safetensors",
    ]
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o644, path
    assert (out / "shards" / "00000").stat().st_mode & 0o777 == 0o755


# -- 2. no silent mixing when the manifest is lost ---------------------------------------------
def test_a_lost_manifest_never_mixes_two_runs(model, tmp_path, monkeypatch):
    out = tmp_path / "run"
    rand = dict(method="random", draws=1)
    finished_run(model, out, **rand)
    calls = counting_traces(monkeypatch)
    changes = [{**rand, "seed": 1}, {}, {"ablation": "mean"}]
    for change in changes:
        (out / "manifest.json").unlink()
        calls.clear()
        run = finished_run(model, out, **change)
        assert calls == [1, 1], change  # every shard traced again under the new options
        assert load_run(out).equals(run)
        assert run.options["seed"] == change.get("seed", 0)
        assert run.method == change.get("method", "mask")
        record("fault (manifest deleted, rerun with other options)", "shards re-traced")
    # the same options again after losing the manifest: every shard is reused
    (out / "manifest.json").unlink()
    calls.clear()
    assert finished_run(model, out, ablation="mean").equals(run)
    assert calls == []
    record("fault (manifest deleted, same command)", "rebuilt; all shards reused")
    other = tiny_model(device="cpu", seed=1)  # same shape, other weights
    (out / "manifest.json").unlink()
    finished_run(other, out, ablation="mean")
    assert calls == [1, 1]
    record("fault (manifest deleted, rerun with other options)", "shards re-traced")


# -- 3. a lost or damaged ablation file does not force a re-trace ------------------------------
@pytest.mark.parametrize("damage", ["deleted", "truncated", "flipped"])
def test_a_lost_or_damaged_ablation_file_is_recomputed_and_shards_kept(
    model, tmp_path, monkeypatch, damage
):
    out = tmp_path / "run"
    clean = finished_run(model, out, ablation="mean")
    path = out / "ablation.safetensors"
    if damage == "deleted":
        path.unlink()
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    else:
        data = bytearray(path.read_bytes())
        data[-5] ^= 0xFF
        path.write_bytes(bytes(data))
    calls = counting_traces(monkeypatch)
    assert finished_run(model, out, ablation="mean").equals(clean)
    assert calls == []
    assert (
        ds.MeanAblation.load(path).tensor_sha256()
        == json.loads((out / "manifest.json").read_text())["ablation_sha256"]
    )
    record(f"fault (ablation file {damage})", "recomputed, identical; no shard re-traced")


def test_the_ablation_checksum_is_by_tensor_contents(model, tmp_path):
    mean = MeanAblation.from_prompts(model, PROMPTS[:2], progress=False)
    mean.save(tmp_path / "a.safetensors")
    again = MeanAblation.load(tmp_path / "a.safetensors")
    assert again.tensor_sha256() == mean.tensor_sha256()
    moved = MeanAblation(mean.attn.double(), mean.mlp.double())
    assert moved.tensor_sha256() != mean.tensor_sha256()  # dtype is part of the contents


# -- 4. damaged shards and manifests -----------------------------------------------------------
@pytest.mark.parametrize(
    "edit",
    ["prompts not a list", "graph key missing", "options not a dict", "sizes wrong type"],
)
def test_a_shard_with_a_wrong_json_type_or_key_is_traced_again(model, tmp_path, monkeypatch, edit):
    out = tmp_path / "run"
    clean = finished_run(model, out)
    meta_path = out / "shards" / "00001" / "result.json"
    meta = json.loads(meta_path.read_text())
    if edit == "prompts not a list":
        meta["prompts"] = 5
    elif edit == "graph key missing":
        del meta["graph"]
    elif edit == "options not a dict":
        meta["options"] = []
    else:
        meta["graph"] = {"n_layers": "three"}
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"Shard .*00001 cannot be read.*Rerun the same"):
        load_run(out)
    calls = counting_traces(monkeypatch)
    assert finished_run(model, out).equals(clean)
    assert calls == [1]
    record(f"fault (shard JSON: {edit})", "named on load; re-traced on resume")


@pytest.mark.parametrize(
    "damage", ["truncated", "empty", "n_prompts a string", "hashes missing", "not an object"]
)
def test_a_damaged_manifest_is_rebuilt_and_intact_shards_kept(model, tmp_path, monkeypatch, damage):
    out = tmp_path / "run"
    clean = finished_run(model, out)
    path = out / "manifest.json"
    text = path.read_text()
    manifest = json.loads(text)
    if damage == "truncated":
        path.write_text(text[: len(text) // 2])
    elif damage == "empty":
        path.write_text("")
    elif damage == "n_prompts a string":
        path.write_text(json.dumps({**manifest, "n_prompts": "2"}))
    elif damage == "hashes missing":
        path.write_text(json.dumps({k: v for k, v in manifest.items() if k != "prompt_sha256"}))
    else:
        path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"manifest\.json") as err:
        load_run(out)
    assert "Delete" not in str(err.value) and "delete" not in str(err.value)
    calls = counting_traces(monkeypatch)
    assert finished_run(model, out).equals(clean)
    assert calls == []
    record(f"fault (manifest {damage})", "named; rebuilt by the same command, shards kept")


def test_a_crafted_manifest_fails_fast_naming_the_file(model, tmp_path):
    out = tmp_path / "run"
    finished_run(model, out)
    manifest = json.loads((out / "manifest.json").read_text())
    crafted = {**manifest, "n_prompts": 5_000_000, "n_shards": 5_000_000}
    (out / "manifest.json").write_text(json.dumps(crafted))
    started = time.monotonic()
    with pytest.raises(ValueError, match=r"manifest\.json is corrupted \(prompt_sha256"):
        load_run(out)
    assert time.monotonic() - started < 5
    record("bad input (crafted manifest: 5 million prompts)", "refused in under 5 s")


# -- 5 and 6. the command line: every flag with a bad value ------------------------------------
def cli_error(argv, capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse
        code = int(exit_.code or 0)
    return code, capsys.readouterr().err


def _args(case) -> list[str]:
    return case.values[0] if hasattr(case, "values") else case[0]


TRACE_BAD = [
    (["--model", "no-such-model"], "no-such-model"),
    (["--prompts", "MISSING"], "No prompt file at"),
    (["--prompts", "FOLDER"], "is a folder"),
    (["--n", "0"], "--n must be at least 1"),
    (["--n", "x"], "--n: invalid int value"),
    (["--out", "FILE"], "is a file"),
    (["--sizes", "four"], "--sizes takes node counts"),
    (["--sizes", "1", "0.5"], "--sizes mixes node counts and relative sizes"),
    (["--sizes", "0", "4"], "outside [1, 15]"),
    (["--sizes", "nan"], "--sizes must be finite"),
    (["--sizes", "0.5", "2.5"], "outside (0, 1]"),
    (["--sizes", ","], "--sizes needs at least one value"),
    (["--method", "magic"], "Unknown method 'magic'"),
    (["--per", "token"], "Unknown per='token'"),
    (["--ablation", "median"], "Unknown ablation 'median'"),
    (["--seed", "-1"], "--seed must be between 0"),
    (["--seed", "x"], "--seed: invalid int value"),
    (["--seed", str(2**64)], "--seed must be between 0"),
    (["--chunk-size", "0"], "--chunk-size must be at least 1"),
    (["--chunk-size", "1.5"], "--chunk-size: invalid int value"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--batch-size", "-3"], "--batch-size must be at least 1"),
    (["--device", "tpu"], "--device='tpu' is not a device torch knows"),
    (["--device", "cuda:99"], "--device='cuda:99'"),
    pytest.param(
        ["--device", "cuda"],
        "--device='cuda' is not available",
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),
    ),
    (["--device", "meta"], "--device='meta'"),
    (["--option", "steps"], "--option takes KEY=VALUE"),
    (["--option", "=3"], "no KEY"),
    (["--option", "bogus=1"], "Unknown option(s) for method='mask'"),
    (["--option", "steps=-1"], "--option steps must be at least 1"),
    (["--option", "steps=1.5"], "--option steps must be an integer"),
    (["--option", "steps=two"], "--option steps must be an integer"),
    (["--option", "lr=NaN"], "--option lr must be a finite number"),
    (["--option", "lr=-0.1"], "--option lr must be greater than 0"),
    (["--option", "lr=Infinity"], "--option lr must be a finite number"),
    (["--option", "tau_end=0"], "--option tau_end must be greater than 0"),
    (["--option", "init=random"], "--option init must be one of attribution, zeros"),
    (["--option", "relaxation=hard"], "--option relaxation must be one of"),
    (["--option", "refine_width=0"], "--option refine_width must be at least 1"),
    (["--option", "steps=2", "--option", "steps=3"], "given more than once"),
    (["--method", "random", "--option", "draws=0"], "--option draws must be at least 1"),
    (["--method", "random", "--option", "steps=2"], "Unknown option(s) for method='random'"),
    (["--method", "forward", "--option", "max_size=0"], "--option max_size must be at least 1"),
    (["--method", "exhaustive", "--option", "max_subsets=-5"], "max_subsets must be at least 1"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--quiet=yes"], "--quiet: ignored explicit argument"),
    (["--no-html=1"], "--no-html: ignored explicit argument"),
]


def _fill(argv: list[str], tmp_path: Path) -> list[str]:
    (tmp_path / "FOLDER").mkdir(exist_ok=True)
    (tmp_path / "FILE").write_text("x")
    names = {
        "MISSING": str(tmp_path / "missing.txt"),
        "FOLDER": str(tmp_path / "FOLDER"),
        "FILE": str(tmp_path / "FILE"),
    }
    return [names.get(a, a) for a in argv]


@pytest.mark.parametrize(
    ("extra", "message"), TRACE_BAD, ids=[" ".join(_args(a)) for a in TRACE_BAD]
)
def test_every_trace_flag_with_a_bad_value_exits_2_with_one_line(
    tmp_path, capsys, monkeypatch, extra, message
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "p.txt").write_text("one\ntwo\n", encoding="utf-8")
    base = {
        "--model": "native:tiny",
        "--prompts": str(tmp_path / "p.txt"),
        "--out": str(tmp_path / "o"),
    }
    extra = _fill(extra, tmp_path)
    for flag in list(base):
        if flag in extra:
            del base[flag]
    argv = ["trace", *[x for kv in base.items() for x in kv], "--quiet", "--no-html", *extra]
    code, err = cli_error(argv, capsys)
    assert code == 2, err
    assert message in err
    assert err.startswith("strace-lens: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing was written
    record("bad input (CLI trace flag)", "one line, exit 2, nothing written")


REPRODUCE_BAD = [
    (["--model", "a", "--model", "b", "--model", "c"], "one or two --model"),
    (["--n", "0"], "--n must be at least 1"),
    (["--random-draws", "0"], "--random-draws must be at least 1"),
    (["--core-nucleus", "0"], "--core-nucleus must be in (0, 100]"),
    (["--core-nucleus", "nan"], "--core-nucleus must be in (0, 100]"),
    (["--refined-nucleus", "101"], "--refined-nucleus must be in (0, 100]"),
    (["--small-core", "2"], "--small-core must be in (0, 1]"),
    (["--small-core", "x"], "--small-core: invalid float value"),
    (["--corpus", "MISSING"], "--corpus"),
    (["--sizes", "1", "0.5"], "--sizes mixes"),
    (["--device", "tpu"], "--device='tpu'"),
    (["--option", "lr=NaN"], "--option lr must be a finite number"),
    (["--chunk-size", "0"], "--chunk-size must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--seed", "-2"], "--seed must be between 0"),
    (["--ablation", "median"], "Unknown ablation 'median'"),
    (["--out", "FILE"], "is a file"),
    (["--prompts", "MISSING"], "No prompt file at"),
    (["--bogus"], "unrecognized arguments"),
]


@pytest.mark.parametrize(
    ("extra", "message"), REPRODUCE_BAD, ids=[" ".join(a) for a, _ in REPRODUCE_BAD]
)
def test_every_reproduce_flag_with_a_bad_value_exits_2_with_one_line(
    tmp_path, capsys, extra, message
):
    (tmp_path / "p.txt").write_text("one\ntwo\n", encoding="utf-8")
    base = {"--prompts": str(tmp_path / "p.txt"), "--out": str(tmp_path / "o")}
    extra = _fill(extra, tmp_path)
    for flag in list(base):
        if flag in extra:
            del base[flag]
    if "--model" not in extra:
        extra = ["--model", "native:tiny", *extra]
    argv = ["reproduce", *[x for kv in base.items() for x in kv], "--quiet", *extra]
    code, err = cli_error(argv, capsys)
    assert code == 2, err
    assert message in err
    assert err.startswith("strace-lens: error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()
    record("bad input (CLI reproduce flag)", "one line, exit 2, nothing written")


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (OSError(28, "No space left on device"), 1, "the disk is full"),
        (OSError(30, "Read-only file system"), 2, "Read-only file system"),
        (PermissionError(13, "Permission denied"), 2, "Permission denied"),
        (OSError(5, "Input/output error"), 1, "Input/output error"),
    ],
)
def test_disk_full_and_read_only_folders_give_one_line(
    tmp_path, capsys, monkeypatch, error, code, message
):
    (tmp_path / "p.txt").write_text("one\ntwo\n", encoding="utf-8")

    def failing(*args, **kw):
        error.filename = str(tmp_path / "o" / "shards")
        raise error

    monkeypatch.setattr(ds, "_write_shard", failing)
    argv = [
        "trace",
        "--model",
        "native:tiny",
        "--prompts",
        str(tmp_path / "p.txt"),
        "--out",
        str(tmp_path / "o"),
        "--quiet",
        "--no-html",
        "--sizes",
        "1",
        "15",
        "--option",
        "steps=2",
        "--ablation",
        "zero",
    ]
    got, err = cli_error(argv, capsys)
    assert got == code
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    if error.errno == 28:
        assert "run the same command again" in err and "resumes" in err
    record("fault (OS error while writing a shard)", f"one line, exit {code}")


# -- bad inputs: the API raises a typed error naming the argument ------------------------------
API_BAD = [
    (dict(sizes=[1, 0.5]), TypeError, "all ints"),
    (dict(sizes="1 2"), TypeError, "sizes must be a list"),
    (dict(sizes=[1, None]), TypeError, "sizes must hold numbers"),
    (dict(seed=-1), ValueError, "seed must be at least 0"),
    (dict(seed=1.5), TypeError, "seed must be an integer"),
    (dict(seed="0"), TypeError, "seed must be an integer"),
    (dict(batch_size=0), ValueError, "batch_size must be at least 1"),
    (dict(device="tpu"), ValueError, "device='tpu' is not a device torch knows"),
    (dict(device="cuda:99"), ValueError, "device='cuda:99'"),
    (dict(targets="x"), TypeError, "targets must be a list of strings"),
    (dict(targets=[1, 2]), TypeError, "Target 0 is a int"),
    (dict(targets=["", " a"]), ValueError, "Target 0 is empty"),
    (dict(targets=[" a"]), ValueError, "1 targets for 2 prompts"),
    (dict(lr=float("nan")), ValueError, "option lr must be a finite number"),
    (dict(lr=-1.0), ValueError, "option lr must be greater than 0"),
    (dict(steps=-1), ValueError, "option steps must be at least 1"),
    (dict(steps=True), TypeError, "option steps must be an integer"),
    (dict(init="random"), ValueError, "option init must be one of"),
    (dict(method="random", draws=0), ValueError, "option draws must be at least 1"),
    (dict(nested="yes"), TypeError, "nested must be True or False"),
    (dict(inverse=1), TypeError, "inverse must be True or False"),
    (dict(keep=5), TypeError, "keep must be a list of node names"),
    (dict(bogus=1), TypeError, "Unknown option(s) for method='mask'"),
]


@pytest.mark.parametrize("api", ["trace", "trace_dataset"])
@pytest.mark.parametrize(
    ("kwargs", "error", "message"), API_BAD, ids=[str(k) for k, _, _ in API_BAD]
)
def test_every_bad_api_argument_raises_a_typed_error_naming_it(
    model, tmp_path, api, kwargs, error, message
):
    before = torch.random.get_rng_state()
    with pytest.raises(error) as err:
        if api == "trace":
            trace(model, PROMPTS[:2], progress=False, **{"sizes": [1, 15], **kwargs})
        else:
            trace_dataset(model, PROMPTS[:2], tmp_path / "o", **{"sizes": [1, 15], **kwargs})
    assert message in str(err.value)
    assert not (tmp_path / "o").exists()
    assert torch.equal(torch.random.get_rng_state(), before)
    record(f"bad input (API {api})", "typed error naming the argument")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(chunk_size=0), "chunk_size must be at least 1"),
        (dict(chunk_size=2.0), "chunk_size must be an integer"),
        (dict(out_dir="FILE"), "is a file, not a folder"),
        (dict(prompts=["ok", "\u200b\ufeff"]), "Prompt 1 is empty or whitespace only"),
        (dict(prompts="one prompt"), "needs a list of prompt strings"),
    ],
)
def test_trace_dataset_own_arguments(model, tmp_path, kwargs, message):
    (tmp_path / "FILE").write_text("x")
    args = {"prompts": PROMPTS[:2], "out_dir": tmp_path / "o", **kwargs}
    if args["out_dir"] == "FILE":
        args["out_dir"] = tmp_path / "FILE"
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        trace_dataset(model, args.pop("prompts"), args.pop("out_dir"), sizes=[1, 15], **args)
    assert (tmp_path / "FILE").read_text() == "x"
    record("bad input (API trace_dataset)", "typed error naming the argument")


# -- classes: numeric types, explicit defaults, the caller's global state ----------------------
def test_numpy_and_torch_numbers_and_explicit_defaults_are_the_same_run(
    model, tmp_path, monkeypatch
):
    np = pytest.importorskip("numpy")
    out = tmp_path / "run"
    plain = trace_dataset(model, PROMPTS[:2], out, chunk_size=1, sizes=[1, 15], steps=2)
    calls = counting_traces(monkeypatch)
    again = trace_dataset(
        model,
        PROMPTS[:2],
        out,
        chunk_size=np.int64(1),
        sizes=np.array([1, 15]),
        steps=torch.tensor(2),
        seed=np.int32(0),
        lr=0.2,
        init="attribution",
        tau_end=0.05,
        batch_size=np.int64(4),
    )
    assert calls == []  # the same run: nothing traced again, no refusal
    assert again.equals(plain)
    single = trace(
        model,
        PROMPTS[:1],
        sizes=[np.int64(1), torch.tensor(15)],
        steps=np.int16(2),
        seed=torch.tensor(0),
        progress=False,
    )
    assert single.sizes.tolist() == [1, 15]
    record("input (numpy/torch numbers, explicit defaults)", "accepted as plain values")


def test_the_callers_rng_and_grad_mode_are_left_as_found(model):
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    with torch.no_grad():
        result = trace(model, PROMPTS[:1], sizes=[1, 15], steps=2, progress=False)
        assert not torch.is_grad_enabled()
    assert torch.equal(torch.random.get_rng_state(), state)
    with torch.inference_mode():
        again = trace(model, PROMPTS[:1], sizes=[1, 15], steps=2, progress=False)
        assert torch.is_inference_mode_enabled()
    assert again.equals(result) or torch.equal(again.masks, result.masks)
    assert torch.equal(torch.random.get_rng_state(), state)
    record("input (trace inside no_grad / inference_mode)", "traced; state as found")


def test_an_option_given_at_its_default_is_the_same_run(model, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    clean = finished_run(model, out)
    calls = counting_traces(monkeypatch)
    assert finished_run(model, out, lr=0.2, relaxation="straight-through").equals(clean)
    assert calls == []
    (tmp_path / "p.txt").write_text("one\ntwo\n", encoding="utf-8")
    argv = ["trace", "--model", "native:tiny", "--prompts", str(tmp_path / "p.txt")]
    argv += ["--out", str(tmp_path / "cli"), "--quiet", "--no-html", "--sizes", "1", "15"]
    argv += ["--ablation", "zero", "--option", "steps=2"]
    assert main(argv) == 0
    calls.clear()
    assert main([*argv, "--option", "lr=0.2", "--option", "grow_width=4"]) == 0
    assert calls == []  # the same run: nothing traced again, no refusal
    record("input (an option given at its default value)", "the same run; nothing re-traced")
