"""Progress (issue 17, item 6): a trace counts its forward rows against a plan, so a dataset
run's bar and ETA move inside a chunk; nothing is printed when quiet or in CI."""

from __future__ import annotations

import sys
from typing import ClassVar

import pytest
from conftest import TINY_RUN_OPTIONS, TINY_RUN_PROMPTS
from tqdm.auto import tqdm

import strace_lens as sl
import strace_lens.progress as progress
from strace_lens.cli import main
from strace_lens.tiny_model import tiny_model

PROMPTS = TINY_RUN_PROMPTS  # 5 prompts
N_CAND = 15  # the tiny model: 3 layers x (4 heads + 1 MLP)


@pytest.fixture(scope="module")
def model():
    return tiny_model(device="cpu")


@pytest.fixture
def terminal(monkeypatch):
    """stderr counts as an interactive terminal; no CI variable."""
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(progress, "stderr_is_terminal", lambda: True)


def test_exhaustive_plan_is_the_hand_count_and_fractions_climb_to_one(model):
    seen: list[float] = []
    with progress.metering(seen.append) as meter:
        sl.trace(model, PROMPTS, sizes=[1, 2], method="exhaustive", progress=False)
    # search: every subset of 1 and 2 of the 15 candidates on each prompt; evaluation: each
    # (prompt, size) mask and its inverse
    expected = 5 * (15 + 105) + 5 * 2 * 2
    assert meter.expected == expected == 620
    assert meter.done == expected
    assert seen[-1] == 1.0 and len(seen) >= 3
    assert all(0 < f <= progress.BEFORE_DONE for f in seen[:-1])
    assert seen == sorted(seen)


def test_forward_plan_counts_every_step_and_gradients_count_three(model):
    with progress.metering(lambda f: None) as meter:
        sl.trace(model, PROMPTS[:2], sizes=[1, 3], method="forward", progress=False)
    # steps 1..3 measure 15, 14, 13 single-node additions for each of 2 prompts
    assert meter.done == meter.expected == 2 * (15 + 14 + 13) + 2 * 2 * 2
    with progress.metering(lambda f: None) as meter:
        sl.trace(model, PROMPTS[:2], sizes=[1, 3], method="attribution", inverse=False)
    # one forward+backward per prompt (3 rows each), then 2 prompts x 2 sizes evaluated
    assert meter.done == meter.expected == 3 * 2 + 2 * 2


def test_learned_mask_plan_is_within_a_factor_of_two(model):
    with progress.metering(lambda f: None) as meter:
        sl.trace(model, PROMPTS, progress=False, **TINY_RUN_OPTIONS)
    assert 0.5 <= meter.done / meter.expected <= 2.0, (meter.done, meter.expected)


class Recording(tqdm):
    """A tqdm that records its value after every update."""

    drawn: ClassVar[list[tuple[str, float]]] = []

    def update(self, n=1):
        out = super().update(n)
        Recording.drawn.append((self.desc, self.n))
        return out


def test_dataset_bar_moves_inside_each_chunk(model, tmp_path, monkeypatch, capsys):
    Recording.drawn = []
    monkeypatch.setattr(progress, "tqdm", Recording)
    sl.trace_dataset(
        model,
        PROMPTS[:4],
        tmp_path / "run",
        chunk_size=2,
        progress=True,
        method="forward",
        sizes=[1, 3],
        ablation="zero",
    )
    values = [n for desc, n in Recording.drawn if desc == "tracing"]
    # a chunk of 2 prompts plans 2 x (15 + 14 + 13) search rows + 2 x 2 x 2 evaluation rows;
    # after the first forward step (2 x 15 rows) the bar stands at 2 x 30/92 of a prompt
    assert pytest.approx(2 * 30 / 92) in values
    assert pytest.approx(2 + 2 * 30 / 92) in values
    inside = [v for v in values if 0 < v < 2 or 2 < v < 4]
    assert len(inside) >= 6
    assert values == sorted(values) and values[-1] == 4
    assert "4/4" in capsys.readouterr().err  # whole prompts once the run is done


def test_quiet_and_ci_print_nothing(model, tmp_path, monkeypatch, capsys, terminal):
    opts = dict(sizes=[1, 3], method="forward")
    sl.trace(model, PROMPTS[:2], progress=False, **opts)
    sl.trace_dataset(model, PROMPTS[:2], tmp_path / "a", progress=False, **opts)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("CI", "true")
    sl.trace(model, PROMPTS[:2], **opts)
    sl.trace_dataset(model, PROMPTS[:2], tmp_path / "b", **opts)
    assert capsys.readouterr().err == ""
    # on a terminal outside CI the default shows the bars, the trace's in percent
    monkeypatch.delenv("CI")
    sl.trace(model, PROMPTS[:2], **opts)
    assert "tracing: 100%" in capsys.readouterr().err
    sl.trace_dataset(model, PROMPTS[:2], tmp_path / "c", chunk_size=1, **opts)
    err = capsys.readouterr().err
    # one bar, in prompts: the chunks' traces report into it rather than draw their own
    assert "2/2" in err and "prompt" in err and "%/s" not in err


def test_cli_quiet_prints_no_bar(tmp_path, capsys, terminal):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n", encoding="utf-8")
    common = ["trace", "--model", "native:tiny", "--prompts", str(prompts), "--no-html"]
    common += ["--sizes", "1", "3", "--method", "forward"]
    assert main([*common, "--out", str(tmp_path / "a"), "--quiet"]) == 0
    assert "tracing" not in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "b")]) == 0
    assert "tracing" in capsys.readouterr().err


def test_when_progress_is_shown(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert not progress.stderr_is_terminal()
    assert not progress.wants_progress(None)  # a log file or pipe
    assert progress.wants_progress(True) and not progress.wants_progress(False)
    monkeypatch.setattr(progress, "stderr_is_terminal", lambda: True)
    assert progress.wants_progress(None)
    for value, ci in [("true", True), ("1", True), ("false", False), ("0", False), ("", False)]:
        monkeypatch.setenv("CI", value)
        assert progress.in_ci() is ci
        assert progress.wants_progress(None) is not ci


def test_a_notebook_kernel_counts_as_interactive(monkeypatch):
    class ZMQInteractiveShell:  # the class name IPython gives a Jupyter kernel's shell
        pass

    class FakeIPython:
        shell: object | None = ZMQInteractiveShell()

        @classmethod
        def get_ipython(cls):
            return cls.shell

    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(progress, "stderr_is_terminal", lambda: False)
    monkeypatch.setitem(sys.modules, "IPython", FakeIPython)
    monkeypatch.setitem(sys.modules, "ipykernel", object())
    assert progress.in_notebook() and progress.wants_progress(None)
    FakeIPython.shell = None  # IPython imported, but no kernel running
    assert not progress.in_notebook()
    monkeypatch.setenv("CI", "true")
    FakeIPython.shell = ZMQInteractiveShell()
    assert not progress.wants_progress(None)
