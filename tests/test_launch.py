"""The submitit launcher (strace_lens/launch.py): ``--executor local|slurm --workers N``.

The local executor is run for real (worker processes started by submitit, one of them
preempted with submitit's own signal mid-run and requeued); the SLURM path is run up to
``sbatch``, which is replaced by ``echo`` so nothing is submitted: the job file and the
pickled array tasks are read back and the tasks are run here, as SLURM would run them.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import TINY_RUN_OPTIONS

from strace_lens import launch
from strace_lens.cli import build_parser, main
from strace_lens.dataset import load_run, trace_dataset
from strace_lens.tiny_model import tiny_model

submitit = pytest.importorskip("submitit")

PROMPTS = [f"Prompt {i} is about the weather" for i in range(4)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-process run every launch must equal."""
    out = tmp_path_factory.mktemp("ref") / "run"
    return trace_dataset(tiny_model(device="cpu"), PROMPTS, out, chunk_size=1, **TINY_RUN_OPTIONS)


def trace_args(tmp_path: Path, out: Path) -> list[str]:
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    args = ["trace", "--model", "native:tiny", "--prompts", str(tmp_path / "p.txt")]
    args += ["--out", str(out), "--chunk-size", "1", "--sizes", "1", "3", "15"]
    return [*args, "--option", "steps=3", "--quiet", "--device", "cpu"]


# -- settings and the workers' command ---------------------------------------------------------
def test_slurm_time_and_memory_formats():
    assert launch.parse_minutes("90") == 90
    assert launch.parse_minutes("01:30:00") == 90
    assert launch.parse_minutes("10:30") == 11  # MM:SS, rounded up
    assert launch.parse_minutes("2-00:00") == 2880
    assert launch.parse_minutes("1-02") == 1560
    assert launch.parse_minutes("1-02:30:01") == 1591
    for bad in ("1h", "", "0", "1:2:3:4"):
        with pytest.raises(ValueError, match="--time"):
            launch.parse_minutes(bad)
    assert launch.parse_memory_gb("64G") == 64.0
    assert launch.parse_memory_gb("64GB") == 64.0
    assert launch.parse_memory_gb("512M") == 0.5
    assert launch.parse_memory_gb("1T") == 1024.0
    with pytest.raises(ValueError, match="--mem"):
        launch.parse_memory_gb("lots")


def test_the_workers_command_drops_the_launch_options_and_adds_the_split():
    known = launch.option_strings(build_parser())
    argv = ["trace", "--model", "m", "--executor", "slurm", "--workers=4", "--partition", "gpu"]
    argv += ["--wait", "--time", "60", "--slurm-extra", "qos=high", "--out", "o", "--exec=slurm"]
    argv += ["--mem", "8G", "--gpus-per", "1", "--cpus-per-task", "4", "--option", "steps=3"]
    assert launch.worker_argv(argv, known, 4, 3, html=True) == [
        "trace",
        "--model",
        "m",
        "--out",
        "o",
        "--option",
        "steps=3",
        "--num-workers",
        "4",
        "--worker-index",
        "3",
    ]
    assert launch.worker_argv(["trace", "--out", "o"], known, 2, 0, html=False)[-1] == "--no-html"


def test_bad_launch_options_are_one_line_errors(tmp_path, capsys):
    base = trace_args(tmp_path, tmp_path / "run")
    for extra, said in (
        (["--workers", "2"], "needs --executor local or --executor slurm"),
        (["--executor", "local"], "--executor needs --workers N"),
        (["--executor", "local", "--workers", "0"], "--executor needs --workers N"),
        (["--executor", "local", "--workers", "2", "--partition", "gpu"], "--executor slurm only"),
        (["--executor", "slurm", "--workers", "2", "--time", "2h"], "not a SLURM time"),
        (["--executor", "slurm", "--workers", "2"], "needs --time"),
        (["--executor", "slurm", "--workers", "2", "--time", "9", "--mem", "x"], "memory size"),
        (["--executor", "slurm", "--workers", "2", "--time", "9", "--slurm-extra", "q"], "KEY="),
        (
            ["--executor", "local", "--workers", "2", "--num-workers", "2", "--worker-index", "0"],
            "set by --executor",
        ),
    ):
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert said in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()  # nothing written
    # (checked here, not through main: a CPU machine refuses --device cuda:1 before that)
    args = build_parser().parse_args([*base, "--executor", "local", "--workers", "2"])
    args.device = "cuda:1"
    with pytest.raises(ValueError, match="its own GPU"):
        launch.LaunchSettings.from_args(args)


def test_without_submitit_the_error_names_the_extra(tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_submitit(name, *args, **kwargs):
        if name == "submitit" or name.startswith("submitit."):
            raise ModuleNotFoundError("No module named 'submitit'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_submitit)
    args = [*trace_args(tmp_path, tmp_path / "run"), "--executor", "local", "--workers", "2"]
    assert main(args) == 2
    assert "pip install 'strace-lens[slurm]'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# -- SLURM, up to sbatch -----------------------------------------------------------------------
@pytest.fixture
def fake_sbatch(monkeypatch):
    """``srun`` looks installed and ``sbatch FILE`` is ``echo``: submitit writes everything a
    real submission writes and submits nothing."""
    from submitit.slurm import slurm

    monkeypatch.setattr(slurm.SlurmExecutor, "affinity", classmethod(lambda cls: 2))
    monkeypatch.setattr(
        slurm.SlurmExecutor,
        "_make_submission_command",
        lambda self, path: ["echo", "Submitted batch job 4242"],
    )


def test_slurm_executor_parameters_and_job_file(tmp_path, fake_sbatch):
    args = build_parser().parse_args(
        [
            *trace_args(tmp_path, tmp_path / "run"),
            "--executor",
            "slurm",
            "--workers",
            "8",
            "--partition",
            "gpu",
            "--time",
            "1-02:30:00",
            "--gpus-per-task",
            "1",
            "--mem",
            "64G",
            "--cpus-per-task",
            "8",
            "--slurm-extra",
            "qos=high",
            "--slurm-extra",
            "account=lab",
        ]
    )
    settings = launch.LaunchSettings.from_args(args)
    executor = launch.slurm_executor(tmp_path / "logs", settings)
    assert executor.cluster == "slurm"
    assert executor._executor.max_num_timeout == launch.MAX_TIMEOUT_REQUEUES
    assert executor._executor.parameters == {
        "job_name": "strace-lens",
        "time": 1590,
        "partition": "gpu",
        "gpus_per_task": 1,
        "mem": "64GB",
        "cpus_per_task": 8,
        "array_parallelism": 8,
        "additional_parameters": {"qos": "high", "account": "lab"},
    }
    from submitit.slurm.slurm import _make_sbatch_string

    text = _make_sbatch_string(
        command="python -m x",
        folder=tmp_path / "logs",
        map_count=8,
        **executor._executor.parameters,
    )
    for line in (
        "#SBATCH --array=0-7%8",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=1590",
        "#SBATCH --gpus-per-task=1",
        "#SBATCH --mem=64GB",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --qos=high",
        "#SBATCH --account=lab",
        "#SBATCH --signal=USR2@90",  # the preemption/timeout warning that triggers a requeue
    ):
        assert line in text.splitlines(), line


@pytest.mark.slow
def test_a_slurm_array_s_tasks_trace_the_run_once_each(reference, tmp_path, fake_sbatch, capsys):
    out = tmp_path / "run"
    args = [*trace_args(tmp_path, out), "--executor", "slurm", "--workers", "2", "--time", "30"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "submitted SLURM job array 4242 (2 tasks)" in printed
    logs = out / launch.LOG_DIR
    job_file = (logs / "4242_submission.sh").read_text()
    assert "#SBATCH --array=0-1%2" in job_file and "#SBATCH --time=30" in job_file
    from submitit.core.utils import DelayedSubmission

    tasks = [DelayedSubmission.load(logs / f"4242_{i}_submitted.pkl") for i in range(2)]
    for i, task in enumerate(tasks):
        argv, cwd = task.args
        assert argv[-4:] == ["--num-workers", "2", "--worker-index", str(i)]
        assert "--executor" not in argv and "--no-html" not in argv and cwd == os.getcwd()
        assert isinstance(task.function, launch.TraceWorker) and task.function.run is main
    # a requeued task (submitit calls checkpoint) runs the very same call again
    again = tasks[0].function.checkpoint(*tasks[0].args)
    assert again.function is tasks[0].function and again.args == tasks[0].args
    assert tasks[0].result() == 0  # what SLURM task 0 runs
    assert "Worker 0 of 2 finished its shards" in capsys.readouterr().out
    assert tasks[1].result() == 0  # the last task merges and writes the page
    assert "median KL" in capsys.readouterr().out and (out / "report.html").exists()
    assert load_run(out).equals(reference)


# -- the local executor, for real --------------------------------------------------------------
def _worker_pids(logs: Path) -> dict[int, int]:
    """worker index -> pid of its latest start, from the submitit logs."""
    pids: dict[int, int] = {}
    for log in logs.glob("*_log.out"):
        for found in re.finditer(r"worker \(pid (\d+)\):.*--worker-index (\d+)", log.read_text()):
            pids[int(found.group(2))] = int(found.group(1))
    return pids


@pytest.mark.slow
def test_local_workers_one_preempted_and_requeued_equal_one_process(reference, tmp_path, capsys):
    out = tmp_path / "run"
    args = [*trace_args(tmp_path, out), "--executor", "local", "--workers", "2"]
    outcome: list[int] = []
    thread = threading.Thread(target=lambda: outcome.append(main(args)))
    thread.start()
    logs = out / launch.LOG_DIR
    deadline = time.monotonic() + 400
    # preempt worker 0 once it has finished a shard (it has another one to go): submitit's
    # signal, as SLURM sends before a preemption or a time limit
    while not (0 in _worker_pids(logs) and (out / "shards" / "00000").is_dir()):
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.1)
    first = _worker_pids(logs)[0]
    os.kill(first, signal.SIGUSR2)
    thread.join(timeout=max(1.0, deadline - time.monotonic()))
    assert not thread.is_alive() and outcome == [0]
    printed = capsys.readouterr().out
    assert "2 local workers on CPU" in printed and "median KL" in printed
    log0 = next(p for p in logs.glob("*_log.out") if "--worker-index 0" in p.read_text())
    text = log0.read_text()
    assert "this job is preempted" in text and "Requeued job" in text
    assert _worker_pids(logs)[0] != first  # the requeued worker is a new process ...
    assert load_run(out).equals(reference)  # ... that resumed: the run equals one process's
    assert (out / "report.html").exists() and not list((out / "leases").iterdir())


@pytest.mark.slow
def test_a_failing_worker_is_reported_with_its_log(tmp_path, capsys):
    out = tmp_path / "run"
    args = [*trace_args(tmp_path, out), "--executor", "local", "--workers", "2"]
    args[args.index("native:tiny")] = str(tmp_path / "no-such-model")  # fails in the worker
    assert main(args) == 1
    err = capsys.readouterr().err
    for i in range(2):
        assert re.search(rf"worker {i} exited 2; log: \S+_log\.err", err), err
    assert "rerun the same command to resume" in err
    logs = "".join(p.read_text() for p in (out / launch.LOG_DIR).glob("*_log.err"))
    assert "Could not load model" in logs
