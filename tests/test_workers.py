"""Many workers on one run folder: per-shard leases, a shared first stage, static splits.

The multi-process tests start real worker processes (the same call, one folder) and log
every chunk each traces, so "each shard is traced exactly once" is checked, not assumed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import TINY_RUN_OPTIONS

import strace_lens.dataset as ds
from strace_lens import leases
from strace_lens.cli import main
from strace_lens.dataset import load_run, trace_dataset
from strace_lens.tiny_model import tiny_model

PROMPTS = [f"Prompt {i} is about the weather" for i in range(6)]
FAST = TINY_RUN_OPTIONS

WORKER = r"""
import json, os, sys, time
import strace_lens.dataset as ds
from strace_lens.tiny_model import tiny_model
from strace_lens.trace import trace

cfg = json.loads(sys.argv[1])

def log(text):
    with open(cfg["log"], "a") as f:
        f.write(f"{os.getpid()} {text}\n")

def logged(model, prompts, **kw):
    k = cfg["prompts"].index(prompts[0]) // cfg["chunk_size"]
    log(f"start {k}")
    if k in cfg.get("hang", []):
        time.sleep(600)
    result = trace(model, prompts, **kw)
    log(f"done {k}")
    return result

mean = ds.MeanAblation.from_prompts
def counted_mean(*args, **kw):
    log("mean")
    return mean(*args, **kw)

ds._trace_function = lambda: logged
ds.MeanAblation.from_prompts = counted_mean
run = ds.trace_dataset(
    tiny_model(device="cpu"), cfg["prompts"], cfg["out"], chunk_size=cfg["chunk_size"],
    lease_timeout=cfg["timeout"], progress=False, **cfg["options"]
)
log(f"finished {run.n_prompts}")
"""


@pytest.fixture(scope="module")
def model():
    return tiny_model(device="cpu")


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    """The single-process run every multi-worker run must equal."""
    out = tmp_path_factory.mktemp("ref") / "run"
    return trace_dataset(model, PROMPTS, out, chunk_size=1, **FAST)


def start_worker(tmp_path: Path, out: Path, log: Path, timeout: float = 5.0, hang=()):
    script = tmp_path / "worker.py"
    script.write_text(WORKER, encoding="utf-8")
    cfg = {
        "prompts": PROMPTS,
        "out": str(out),
        "log": str(log),
        "chunk_size": 1,
        "timeout": timeout,
        "options": FAST,
        "hang": list(hang),
    }
    return subprocess.Popen(
        [sys.executable, str(script), json.dumps(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def read_log(log: Path) -> list[tuple[int, str]]:
    if not log.exists():
        return []
    return [(int(p), rest) for p, rest in (ln.split(" ", 1) for ln in log.read_text().splitlines())]


# -- the lease itself -------------------------------------------------------------------------
def test_a_lease_is_exclusive_beats_and_is_released(tmp_path):
    lease = leases.try_acquire(tmp_path, "00000", "w1", timeout=0.4)
    assert lease is not None
    info = json.loads((tmp_path / "leases" / "00000.lease").read_text())
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    assert info["worker"] == "w1" and isinstance(info["time"], float)
    assert leases.try_acquire(tmp_path, "00000", "w2", timeout=0.4) is None
    time.sleep(1.0)  # 2.5 timeouts: the heartbeat keeps it fresh
    assert not leases.is_stale(tmp_path / "leases" / "00000.lease", 0.4)
    assert leases.try_acquire(tmp_path, "00000", "w2", timeout=0.4) is None
    assert lease.still_held()
    lease.release()
    assert not (tmp_path / "leases" / "00000.lease").exists()
    again = leases.try_acquire(tmp_path, "00000", "w2", timeout=0.4)
    assert again is not None
    again.release()


def fake_lease(path: Path, host: str, pid: int, age: float) -> None:
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"worker": "x", "host": host, "pid": pid, "time": 0, "token": "t"}))
    then = time.time() - age
    os.utime(path, (then, then))


def test_a_stale_lease_is_taken_over_after_the_timeout(tmp_path):
    path = tmp_path / "leases" / "00003.lease"
    fake_lease(path, "another-host", 1, age=1.0)  # a live-looking worker elsewhere
    assert leases.try_acquire(tmp_path, "00003", "me", timeout=5.0) is None  # still fresh
    os.utime(path, (time.time() - 6, time.time() - 6))  # no heartbeat for 6 s > 5 s
    lease = leases.try_acquire(tmp_path, "00003", "me", timeout=5.0)
    assert lease is not None and json.loads(path.read_text())["worker"] == "me"
    lease.release()
    assert sorted(p.name for p in path.parent.iterdir()) == []  # nothing left aside


def test_a_lease_of_a_dead_process_on_this_host_is_stale_at_once(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = tmp_path / "leases" / "00000.lease"
    fake_lease(path, socket.gethostname(), dead.pid, age=0.0)
    assert leases.is_stale(path, 120.0)
    fake_lease(path, socket.gethostname(), os.getppid(), age=0.0)  # alive
    assert not leases.is_stale(path, 120.0)


def test_of_many_takers_of_one_stale_lease_exactly_one_wins(tmp_path):
    for _ in range(20):
        path = tmp_path / "leases" / "00001.lease"
        fake_lease(path, "another-host", 1, age=100.0)
        won: list[leases.Lease] = []
        barrier = threading.Barrier(8)

        def take(i: int, barrier=barrier, won=won) -> None:
            barrier.wait()
            for _ in range(20):  # a taker that lost a round tries again
                got = leases.try_acquire(tmp_path, "00001", f"w{i}", timeout=50.0)
                if got is not None:
                    won.append(got)
                time.sleep(0.001)

        threads = [threading.Thread(target=take, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1
        assert json.loads(path.read_text())["token"] == won[0].token
        won[0].release()


def test_a_holder_whose_lease_was_taken_over_knows_it(tmp_path):
    lease = leases.try_acquire(tmp_path, "00002", "w1", timeout=60.0)
    assert lease is not None
    path = tmp_path / "leases" / "00002.lease"
    path.unlink()  # taken over by another worker (as after a long pause)
    fake_lease(path, "another-host", 1, age=0.0)
    assert not lease.still_held()
    lease.release()  # leaves the other worker's lease alone
    assert path.exists()


def test_static_share_from_arguments_and_from_slurm(monkeypatch):
    for key in ("SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN"):
        monkeypatch.delenv(key, raising=False)
    assert leases.static_share(None, None) == (1, 0)
    assert leases.static_share(3, 2) == (3, 2)
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "6")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "5")
    assert leases.static_share(None, None) == (4, 1)
    assert leases.static_share(2, 0) == (2, 0)  # explicit arguments win
    for n, i in ((0, 0), (2, 2), (2, -1)):
        with pytest.raises(ValueError):
            leases.static_share(n, i)


# -- workers on one folder ----------------------------------------------------------------------
@pytest.mark.parametrize("n_workers", [2, 3])
def test_workers_started_together_equal_a_single_process_run(reference, tmp_path, n_workers):
    out, log = tmp_path / "run", tmp_path / "log.txt"
    t0 = time.monotonic()
    procs = [start_worker(tmp_path, out, log) for _ in range(n_workers)]
    errors = [p.communicate(timeout=300)[1].decode() for p in procs]
    seconds = time.monotonic() - t0
    assert [p.returncode for p in procs] == [0] * n_workers, errors
    events = read_log(log)
    done = sorted(int(e.split()[1]) for _, e in events if e.startswith("done"))
    assert done == list(range(len(PROMPTS)))  # every shard traced exactly once
    assert [e for _, e in events if e == "mean"] == ["mean"]  # the mean ablation: once
    assert sum(e == f"finished {len(PROMPTS)}" for _, e in events) == n_workers
    assert load_run(out).equals(reference)  # masks, metrics, options: identical
    assert not list((out / "leases").iterdir())  # every lease released
    workers = {pid for pid, e in events if e.startswith("done")}
    print(f"{n_workers} workers: {seconds:.1f} s; shards traced by {len(workers)} distinct workers")


def test_a_killed_worker_s_shard_is_traced_once_its_lease_is_stale(reference, tmp_path):
    out, log = tmp_path / "run", tmp_path / "log.txt"
    timeout = 2.0
    hung = start_worker(tmp_path, out, log, timeout=timeout, hang=[0])
    deadline = time.monotonic() + 240
    while (hung.pid, "start 0") not in read_log(log):  # it holds shard 0's lease now
        assert hung.poll() is None, hung.stderr.read().decode() if hung.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.05)
    others = [start_worker(tmp_path, out, log, timeout=timeout) for _ in range(2)]
    pids = {p.pid for p in others}
    rest = set(range(1, len(PROMPTS)))
    while {int(e.split()[1]) for p, e in read_log(log) if e.startswith("done")} != rest:
        assert all(p.poll() is None for p in others), [p.stderr.read() for p in others]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(2 * timeout)  # the hung worker's lease stays fresh (heartbeat): nobody takes it
    assert not [e for p, e in read_log(log) if p in pids and e == "start 0"]
    assert all(p.poll() is None for p in others)  # they wait for shard 0
    os.kill(hung.pid, signal.SIGKILL)
    hung.wait()
    errors = [p.communicate(timeout=240)[1].decode() for p in others]
    assert [p.returncode for p in others] == [0, 0], errors
    events = read_log(log)
    starts = [(p, int(e.split()[1])) for p, e in events if e.startswith("start")]
    assert sorted(k for p, k in starts if p in pids) == list(range(len(PROMPTS)))  # once each
    assert [k for p, k in starts if p == hung.pid] == [0]
    assert load_run(out).equals(reference)


def test_a_static_split_traces_its_share_and_the_last_worker_merges(
    model, reference, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    traced: list[str] = []
    real = ds._trace_function()

    def counting(m, prompts, **kw):
        traced.append(prompts[0])
        return real(m, prompts, **kw)

    monkeypatch.setattr(ds, "_trace_function", lambda: counting)
    with pytest.raises(ds.WorkerShareDone, match=r"Worker 1 of 3 .* 2 of 6 shards are done"):
        trace_dataset(model, PROMPTS, out, chunk_size=1, num_workers=3, worker_index=1, **FAST)
    assert traced == [PROMPTS[1], PROMPTS[4]]
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")
    with pytest.raises(ds.WorkerShareDone, match="Worker 0 of 3"):
        trace_dataset(model, PROMPTS, out, chunk_size=1, **FAST)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    assert trace_dataset(model, PROMPTS, out, chunk_size=1, **FAST).equals(reference)
    assert sorted(traced) == sorted(PROMPTS)  # each once
    # the worker options are not part of the run: a plain resume traces nothing more
    monkeypatch.delenv("SLURM_ARRAY_TASK_COUNT")
    assert trace_dataset(model, PROMPTS, out, chunk_size=1, lease_timeout=9, **FAST).equals(
        reference
    )
    assert len(traced) == len(PROMPTS)


def test_cli_workers_and_merge(reference, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SLURM_ARRAY_TASK_COUNT", raising=False)
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    args = ["trace", "--model", "native:tiny", "--prompts", str(tmp_path / "p.txt")]
    args += ["--out", str(tmp_path / "run"), "--chunk-size", "1", "--sizes", "1", "3", "15"]
    args += ["--option", "steps=3", "--quiet", "--no-html", "--lease-timeout", "30"]
    assert main([*args, "--num-workers", "2", "--worker-index", "0"]) == 0
    assert "Worker 0 of 2 finished its shards" in capsys.readouterr().out
    assert main(["merge", str(tmp_path / "run"), "--no-html"]) == 1  # not finished yet
    assert "unfinished run: 3 of 6 shards" in capsys.readouterr().err
    assert main([*args, "--num-workers", "2", "--worker-index", "1"]) == 0
    assert "median KL" in capsys.readouterr().out  # the last worker merges
    assert main(["merge", str(tmp_path / "run"), "--no-html"]) == 0
    assert "6 prompt(s)" in capsys.readouterr().out
    assert load_run(tmp_path / "run").equals(reference)
    for bad, said in (
        (["--num-workers", "2"], "go together"),
        (["--num-workers", "2", "--worker-index", "2"], "--worker-index must be"),
        (["--num-workers", "0", "--worker-index", "0"], "--num-workers must be"),
        (["--lease-timeout", "0"], "--lease-timeout must be"),
    ):
        assert main([*args, *bad]) == 2
        assert said in capsys.readouterr().err
