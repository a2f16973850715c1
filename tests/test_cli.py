"""The strace-lens command line: help, trace + summary table, the HTML and reproduce hooks."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

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
    return [
        "trace",
        "--model",
        "native:tiny",
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--sizes",
        "1",
        "4",
        "15",
        "--option",
        "steps=2",
        "--quiet",
        *extra,
    ]


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
