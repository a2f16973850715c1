"""The launcher: one ``strace-lens trace`` command run as N workers through submitit.

``strace-lens trace ... --executor slurm --workers N`` submits a SLURM job array of N tasks;
``--executor local --workers N`` starts N local processes (submitit's LocalExecutor: one GPU
each, round robin, when the machine has GPUs; CPU otherwise). Every worker runs the same
``trace`` command on the same run folder with ``--num-workers N --worker-index i`` added, so
worker i traces the shards k with ``k % N == i`` (each under a lease, strace_lens.leases),
and the mean ablation is computed once by whichever worker takes the setup lease first.

A preempted or timed-out worker is requeued by submitit (the worker is
``submitit.helpers.Checkpointable``): the requeued task runs the same command again, which
resumes exactly, since every finished shard is an atomic, checksummed folder and a shard
being traced when the signal came is simply traced again (its lease is stale at once on the
same host, after ``--lease-timeout`` on another).

The launcher waits for the workers with ``--executor local`` (and ``slurm --wait``), then
merges the run, prints the summary and writes the HTML page itself; without ``--wait`` a
SLURM launch returns at once and the last worker to finish merges (its log shows the table).

submitit's job files and logs go to ``<run folder>/submitit/``, inside the folder the user
named. submitit is an optional extra: ``pip install 'strace-lens[slurm]'``.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EXECUTORS = ("local", "slurm")
#: submitit's job files and logs, inside the run folder
LOG_DIR = "submitit"
#: how often one task may be requeued after a timeout (preemptions do not count): resume is
#: exact, so a long run on a short partition may go through many
MAX_TIMEOUT_REQUEUES = 20
#: a local worker's time limit when --time is not given (submitit's own default is 2 min)
LOCAL_DEFAULT_MINUTES = 7 * 24 * 60
#: options that configure the launch itself: removed from the command each worker runs
LAUNCH_OPTIONS = (
    "--executor",
    "--workers",
    "--partition",
    "--time",
    "--gpus-per-task",
    "--mem",
    "--cpus-per-task",
    "--slurm-extra",
    "--wait",
)
#: launch options that take no value
LAUNCH_FLAGS = ("--wait",)
SLURM_ONLY = ("partition", "gpus_per_task", "mem", "cpus_per_task", "slurm_extra")
INSTALL_HINT = "pip install 'strace-lens[slurm]'"
#: the CLI's exit statuses (strace_lens.cli), which this module does not import
EXIT_OK, EXIT_FAILED = 0, 1


def require_submitit() -> Any:
    """Import submitit, or say how to install it."""
    try:
        import submitit
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "--executor runs workers through submitit, an optional extra that is not "
            f"installed: {INSTALL_HINT} (or pip install submitit)."
        ) from None
    return submitit


# -- settings ----------------------------------------------------------------------------------
def parse_minutes(text: str) -> int:
    """A SLURM time limit (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``,
    ``D-HH:MM:SS``) in whole minutes, rounded up."""
    found = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if found is None:
        raise ValueError(
            f"--time {text!r} is not a SLURM time: give minutes (90), HH:MM:SS (01:30:00) "
            "or D-HH:MM (2-00:00)."
        )
    days, a, b, c = found.groups()
    parts = [int(a), *(int(x) for x in (b, c) if x is not None)]
    if days is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
        hours, minutes, seconds = [*parts, 0, 0][:3]
        total = ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
    elif len(parts) == 1:  # MM
        total = parts[0] * 60
    elif len(parts) == 2:  # MM:SS
        total = parts[0] * 60 + parts[1]
    else:  # HH:MM:SS
        total = (parts[0] * 60 + parts[1]) * 60 + parts[2]
    if total <= 0:
        raise ValueError(f"--time must be a positive time limit, got {text!r}.")
    return -(-total // 60)


def parse_memory_gb(text: str) -> float:
    """``--mem`` (``64G``, ``64GB``, ``500M``, ``1T``; a bare number is GB) in GB."""
    found = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)B?", text.strip(), flags=re.IGNORECASE)
    if found is None or float(found.group(1)) <= 0:
        raise ValueError(f"--mem {text!r} is not a memory size: give e.g. 64G or 500M.")
    scale = {"K": 1 / 1024**2, "M": 1 / 1024, "G": 1.0, "T": 1024.0, "": 1.0}
    return float(found.group(1)) * scale[found.group(2).upper()]


def parse_extra(items: Sequence[str]) -> dict[str, str]:
    """``--slurm-extra key=value`` items as sbatch flags (``qos=high`` -> ``--qos=high``)."""
    extra: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise ValueError(
                f"--slurm-extra takes KEY=VALUE (an sbatch option), got {item!r}: e.g. "
                "--slurm-extra qos=high --slurm-extra account=myproject."
            )
        extra[key] = value
    return extra


@dataclass(frozen=True)
class LaunchSettings:
    """What ``--executor`` and its options ask for, checked."""

    executor: str
    workers: int
    minutes: int | None = None
    partition: str | None = None
    gpus_per_task: int | None = None
    mem_gb: float | None = None
    cpus_per_task: int | None = None
    slurm_extra: dict[str, str] = field(default_factory=dict)
    wait: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> LaunchSettings:
        """Check the launch options of a parsed ``trace`` command (ValueError: bad input)."""
        if args.executor not in EXECUTORS:
            raise ValueError("--workers N needs --executor local or --executor slurm.")
        if args.workers is None or args.workers < 1:
            raise ValueError(f"--executor needs --workers N (N >= 1), got {args.workers}.")
        if args.num_workers is not None or args.worker_index is not None:
            raise ValueError(
                "--num-workers/--worker-index are set by --executor for each worker: drop them."
            )
        if args.executor == "slurm" and args.time is None:
            raise ValueError(
                "--executor slurm needs --time (each task's limit, e.g. 04:00:00; submitit's "
                "default is 5 minutes): timed-out tasks are requeued and resume."
            )
        device = getattr(args, "device", None)
        if args.executor == "local" and device not in (None, "cpu", "cuda"):
            raise ValueError(
                f"--device {device} with --executor local: each local worker gets its own GPU "
                "(CUDA_VISIBLE_DEVICES); give --device cpu, cuda, or none."
            )
        if args.executor == "local":
            given = [n for n in SLURM_ONLY if getattr(args, n) not in (None, [], False)]
            if given:
                flags = ", ".join("--" + n.replace("_", "-") for n in given)
                raise ValueError(f"{flags}: SLURM options, for --executor slurm only.")
        for name in ("gpus_per_task", "cpus_per_task"):
            value = getattr(args, name)
            if value is not None and value < (0 if name == "gpus_per_task" else 1):
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}.")
        return cls(
            executor=args.executor,
            workers=args.workers,
            minutes=None if args.time is None else parse_minutes(args.time),
            partition=args.partition,
            gpus_per_task=args.gpus_per_task,
            mem_gb=None if args.mem is None else parse_memory_gb(args.mem),
            cpus_per_task=args.cpus_per_task,
            slurm_extra=parse_extra(args.slurm_extra or []),
            wait=bool(args.wait) or args.executor == "local",
        )

    def slurm_parameters(self) -> dict[str, Any]:
        """The ``AutoExecutor.update_parameters`` keywords of a SLURM launch."""
        params: dict[str, Any] = {
            "name": "strace-lens",
            "slurm_array_parallelism": self.workers,
        }
        if self.minutes is not None:
            params["timeout_min"] = self.minutes
        if self.partition is not None:
            params["slurm_partition"] = self.partition
        if self.gpus_per_task is not None:
            params["slurm_gpus_per_task"] = self.gpus_per_task
        if self.mem_gb is not None:
            params["mem_gb"] = self.mem_gb
        if self.cpus_per_task is not None:
            params["cpus_per_task"] = self.cpus_per_task
        if self.slurm_extra:
            params["slurm_additional_parameters"] = dict(self.slurm_extra)
        return params


# -- the workers' command ------------------------------------------------------------------------
def _is_launch_option(token: str, known: Sequence[str]) -> str | None:
    """The launch option ``token`` names (argparse accepts unique prefixes), else None."""
    name = token.split("=", 1)[0]
    if not name.startswith("--"):
        return None
    exact = [o for o in known if o == name]
    matches = exact or [o for o in known if o.startswith(name)]
    if len(matches) == 1 and matches[0] in LAUNCH_OPTIONS:
        return matches[0]
    return None


def worker_argv(
    argv: Sequence[str], known: Sequence[str], workers: int, index: int, html: bool
) -> list[str]:
    """The ``trace`` command a worker runs: ``argv`` without the launch options, with
    ``--num-workers workers --worker-index index`` (and ``--no-html`` when the launcher
    writes the page itself)."""
    out: list[str] = []
    tokens = list(argv)
    i = 0
    while i < len(tokens):
        option = _is_launch_option(tokens[i], known)
        if option is None:
            out.append(tokens[i])
            i += 1
            continue
        takes_value = option not in LAUNCH_FLAGS and "=" not in tokens[i]
        i += 2 if takes_value else 1
    out += ["--num-workers", str(workers), "--worker-index", str(index)]
    if not html and "--no-html" not in out:
        out.append("--no-html")
    return out


class TraceWorker:
    """A worker: ``worker(argv, cwd)`` runs ``run(argv)`` (the CLI's ``main``, pickled by
    reference) in ``cwd``. After a preemption or a timeout submitit calls :meth:`checkpoint`
    and requeues the same call: the run folder holds the progress, so the rerun resumes."""

    def __init__(self, run: Callable[[list[str]], int]) -> None:
        self.run = run

    def __call__(self, argv: list[str], cwd: str) -> int:
        os.chdir(cwd)  # relative --out/--prompts mean what they meant to the launcher
        print(f"strace-lens worker (pid {os.getpid()}): {shlex.join(argv)}", flush=True)
        return self.run(argv)

    def checkpoint(self, argv: list[str], cwd: str) -> Any:
        submitit = require_submitit()
        return submitit.helpers.DelayedSubmission(self, argv, cwd)


# -- executors ---------------------------------------------------------------------------------
def slurm_executor(folder: Path, settings: LaunchSettings) -> Any:
    """A submitit ``AutoExecutor`` for SLURM with the launch's parameters (submits nothing)."""
    submitit = require_submitit()
    executor = submitit.AutoExecutor(
        folder=folder, cluster="slurm", slurm_max_num_timeout=MAX_TIMEOUT_REQUEUES
    )
    executor.update_parameters(**settings.slurm_parameters())
    return executor


def local_gpu_count(device: str | None) -> int:
    """GPUs the local workers are spread over: none when --device names a CPU."""
    if device is not None and device.startswith("cpu"):
        return 0
    import torch

    return torch.cuda.device_count()


def submit_local(
    folder: Path,
    settings: LaunchSettings,
    worker: TraceWorker,
    argvs: list[list[str]],
    cwd: str,
    gpus: int,
) -> list[Any]:
    """One local process per worker; worker i sees GPU ``i % gpus`` alone (CUDA_VISIBLE_DEVICES),
    or no GPU when ``gpus`` is 0."""
    submitit = require_submitit()
    # LocalExecutor itself: visible_gpus is not among AutoExecutor's local parameters
    executor = submitit.LocalExecutor(folder=folder, max_num_timeout=MAX_TIMEOUT_REQUEUES)
    minutes = settings.minutes or LOCAL_DEFAULT_MINUTES
    jobs = []
    for i, argv in enumerate(argvs):
        if gpus:
            executor.update_parameters(
                timeout_min=minutes, gpus_per_node=1, visible_gpus=[i % gpus]
            )
        else:
            executor.update_parameters(timeout_min=minutes, gpus_per_node=0)
        jobs.append(executor.submit(worker, argv, cwd))
    return jobs


def option_strings(parser: argparse.ArgumentParser) -> list[str]:
    """The long options of the ``trace`` subcommand of the CLI's ``parser``."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [s for s in sub.choices["trace"]._option_string_actions if s.startswith("--")]


def _wait_all(jobs: list[Any]) -> list[str]:
    """Wait for every job; the failures, one line each."""
    failures = []
    try:
        for i, job in enumerate(jobs):
            try:
                code = job.result()
            except Exception as err:  # submitit re-raises the worker's error here
                failures.append(
                    f"worker {i} failed ({type(err).__name__}); log: {job.paths.stderr}"
                )
                continue
            if code != 0:
                failures.append(f"worker {i} exited {code}; log: {job.paths.stderr}")
    except KeyboardInterrupt:
        for job in jobs:
            job.cancel(check=False)
        raise
    return failures


def launch(
    args: argparse.Namespace,
    run: Callable[[list[str]], int],
    parser: argparse.ArgumentParser,
    finish: Callable[[Any], None],
) -> int:
    """Run ``args`` (a checked ``trace`` command with ``--executor``) as N workers, each
    calling ``run`` (the CLI's ``main``) on its command line; ``parser`` is the CLI's, to tell
    the launch options apart; ``finish(result)`` prints and writes the merged run. Returns
    the exit status; bad launch options raise ValueError (the CLI's exit status 2)."""
    settings = LaunchSettings.from_args(args)
    require_submitit()
    worker = TraceWorker(run)
    argv = list(args.argv)
    known = option_strings(parser)
    html = not settings.wait  # a launcher that waits writes the page itself, once
    argvs = [worker_argv(argv, known, settings.workers, i, html) for i in range(settings.workers)]
    cwd = os.getcwd()
    args.out.mkdir(parents=True, exist_ok=True)
    folder = args.out / LOG_DIR
    if settings.executor == "slurm":
        executor = slurm_executor(folder, settings)
        jobs = executor.map_array(worker, argvs, [cwd] * len(argvs))
        job_id = jobs[0].job_id.split("_")[0]
        print(
            f"strace-lens: submitted SLURM job array {job_id} ({settings.workers} tasks) on "
            f"{args.out}; logs in {folder}. Watch: squeue -j {job_id}; resume: run the same "
            f"command again; merge: strace-lens merge {args.out}"
        )
        if not settings.wait:
            return EXIT_OK
    else:
        gpus = local_gpu_count(args.device)
        jobs = submit_local(folder, settings, worker, argvs, cwd, gpus)
        where = f"{min(gpus, settings.workers)} GPU(s)" if gpus else "CPU"
        print(f"strace-lens: {settings.workers} local workers on {where}; logs in {folder}")
    failures = _wait_all(jobs)
    if failures:
        for line in failures:
            print(f"strace-lens: {line}", file=sys.stderr)
        print(
            "strace-lens: rerun the same command to resume; finished shards are kept.",
            file=sys.stderr,
        )
        return EXIT_FAILED
    from strace_lens.dataset import load_run

    finish(load_run(args.out))
    return EXIT_OK


__all__ = [
    "EXECUTORS",
    "LaunchSettings",
    "TraceWorker",
    "launch",
    "parse_memory_gb",
    "parse_minutes",
    "slurm_executor",
    "worker_argv",
]
