"""The strace-lens command line: help, trace + summary table, the HTML and reproduce hooks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from run_helpers import assert_refused, cli_trace_args

import strace_lens.cli as cli
import strace_lens.dataset as ds
from strace_lens.cli import main
from strace_lens.result import TraceResult

ROWS = [
    ("The cat sat on the", " mat"),
    ("Paris is the capital of", " France"),
    ("one two three four", " five"),
]


@pytest.fixture
def tsv(tmp_path):
    path = tmp_path / "prompts.tsv"
    lines = ["\t".join([p, "w", "NOUN", t.strip(), "NOUN", t]) for p, t in ROWS]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def trace_args(prompts, out, *extra):
    return cli_trace_args(prompts, out, "--sizes", "1", "4", "15", "--option", "steps=2", *extra)


def test_help_from_the_installed_console_script():
    exe = shutil.which("strace-lens") or str(
        __import__("pathlib").Path(sys.executable).with_name("strace-lens")
    )
    done = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert "trace" in done.stdout and "reproduce" in done.stdout
    done = subprocess.run([exe, "trace", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--chunk-size" in done.stdout and "native:tiny" in done.stdout


def test_version_and_exit_codes_in_help(capsys):
    import strace_lens

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"strace-lens {strace_lens.__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Exit status: 0 success; 2 bad input" in text and "STRACE_LENS_DEBUG=1" in text


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_trace_prints_medians_per_size_and_saves_the_run(tsv, tmp_path, capsys):
    out = tmp_path / "run"
    args = trace_args(tsv, out, "--n", "2", "--chunk-size", "1", "--no-html")
    assert main(args) == 0
    captured = capsys.readouterr()
    result = TraceResult.load(out)
    assert result.n_prompts == 2 and result.sizes.tolist() == [1, 4, 15]
    assert result.target_logprob is not None  # TSV column 6 was used
    lines = captured.out.strip().splitlines()
    assert lines[0].startswith("2 prompt(s), 15 candidate nodes, method=mask, per=input")
    assert lines[1].split() == ["size", "relative", "median", "KL", "median", "TV", "nucleus", "%"]
    table = [line.split() for line in lines[2:]]
    assert [int(row[0]) for row in table] == [1, 4, 15]
    for j, row in enumerate(table):
        assert float(row[1]) == pytest.approx(result.sizes[j].item() / 15, rel=1e-2)
        kl = float(result.metrics["kl"][:, j].median())
        assert float(row[2]) == pytest.approx(kl, rel=1e-3, abs=1e-6)
        assert float(row[3]) == pytest.approx(float(result.metrics["tv"][:, j].median()), abs=1e-4)
        assert float(row[4]) == float(result.metrics["nucleus"][:, j].median())
    assert "HTML page" not in captured.out and not (out / cli.HTML_PAGE).exists()
    # the same command again resumes: nothing to trace, same output
    assert main(args) == 0
    assert capsys.readouterr().out == captured.out


def test_the_real_html_page_has_the_circuit_diagram(tsv, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(trace_args(tsv, out, "--n", "2")) == 0
    page = (out / cli.HTML_PAGE).read_text(encoding="utf-8")
    assert "plotly" in page.lower() and "fig-circuit" in page
    assert "strace-lens trace --model native:tiny" in page  # the command, as notes
    assert f"HTML page: {out / cli.HTML_PAGE}" in capsys.readouterr().out


def test_interrupt_and_out_of_memory_exit_codes(tsv, tmp_path, capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_trace", interrupted)
    assert main(trace_args(tsv, tmp_path / "a")) == 130
    assert "run the same command to resume" in capsys.readouterr().err
    monkeypatch.undo()

    def oom(model, prompts, **kw):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    monkeypatch.setattr(ds, "_trace_function", lambda: oom)
    assert main(trace_args(tsv, tmp_path / "b", "--batch-size", "64")) == 1
    err = capsys.readouterr().err
    assert err.startswith("strace-lens: error: Out of memory while tracing chunk 0")
    assert "batch_size=64" in err and "lower batch_size" in err and err.count("\n") == 1


def test_device_option_reaches_the_trace(tsv, tmp_path, monkeypatch):
    seen = []
    real = ds._trace_function()

    def spy(model, prompts, **kw):
        seen.append(kw.get("device"))
        return real(model, prompts, **kw)

    monkeypatch.setattr(ds, "_trace_function", lambda: spy)
    assert main([*trace_args(tsv, tmp_path / "run"), "--device", "cpu", "--no-html"]) == 0
    assert seen == ["cpu"]


def test_threads_option_reaches_torch_and_the_count_is_restored(tsv, tmp_path, monkeypatch):
    before = torch.get_num_threads()
    wanted = 1 if before > 1 else 2  # a count other than torch's current one
    seen = []
    real = ds._trace_function()

    def spy(model, prompts, **kw):
        seen.append(torch.get_num_threads())
        return real(model, prompts, **kw)

    monkeypatch.setattr(ds, "_trace_function", lambda: spy)
    plain = trace_args(tsv, tmp_path / "a", "--n", "2", "--chunk-size", "1", "--no-html")
    assert main(plain) == 0
    assert seen == [before, before]  # without --threads: torch's own count
    # the count is not part of the run: the same run with --threads resumes (nothing traced)
    assert main([*plain, "--threads", str(wanted)]) == 0
    assert len(seen) == 2 and torch.get_num_threads() == before
    out = tmp_path / "b"
    args = trace_args(tsv, out, "--n", "2", "--chunk-size", "1", "--no-html")
    assert main([*args, "--threads", str(wanted)]) == 0
    assert seen[2:] == [wanted, wanted] and torch.get_num_threads() == before
    # each shard records the count it was traced with, beside its wall time
    timings = [json.loads(p.read_text()) for p in sorted(out.glob("shards/*/timing.json"))]
    assert [t["torch_threads"] for t in timings] == [wanted, wanted]
    assert all(t["seconds"] > 0 for t in timings)
    assert TraceResult.load(out).equals(TraceResult.load(tmp_path / "a"))

    def interrupted(model, prompts, **kw):
        seen.append(torch.get_num_threads())
        raise KeyboardInterrupt

    monkeypatch.setattr(ds, "_trace_function", lambda: interrupted)
    assert main([*trace_args(tsv, tmp_path / "c", "--no-html"), "--threads", str(wanted)]) == 130
    assert seen[-1] == wanted and torch.get_num_threads() == before  # restored on error too


@pytest.mark.parametrize("command", ["trace", "reproduce"])
@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5", ""])
def test_bad_threads_are_refused_in_one_line(tsv, tmp_path, capsys, command, value):
    out = tmp_path / "run"
    argv = [command, "--model", "native:tiny", "--prompts", str(tsv), "--out", str(out)]
    before = torch.get_num_threads()
    # the message names the flag, the value and the fix
    message = (
        f"--threads: takes a positive whole number of CPU threads, got {value!r}: e.g. --threads 1"
    )
    assert_refused(capsys, [*argv, "--threads", value], message, out)
    assert torch.get_num_threads() == before
