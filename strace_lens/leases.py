"""Leases: which worker is working on which part of a run folder, safe on network file systems.

Many workers (processes, possibly on other hosts sharing the folder over NFS) may run the same
``trace_dataset`` call on one folder. Each unit of work (the run's setup and mean ablation; one
shard) is claimed with a *lease*: ``leases/<name>.lease``, created with
``O_CREAT | O_EXCL | O_NOFOLLOW`` (exclusive creation works on NFSv3+ and every local file
system; ``flock`` does not always), holding the worker's id, host, pid and start time.

- **Heartbeat.** While a lease is held, a background thread rewrites its mtime
  (``os.utime``) every ``timeout / 4`` seconds.
- **Stale.** A lease is stale when its mtime is older than ``timeout`` seconds (clocks of the
  hosts sharing the folder must agree to well within the timeout), or at once when it names
  this host and a process id that no longer exists (a worker killed on this machine).
- **Take-over.** A taker first creates ``leases/.<name>.takeover`` exclusively (of several
  takers one goes on, the others try again later), checks again that the lease is stale,
  renames it to a unique name (atomic), checks that what moved is the stale one, deletes it,
  and creates a fresh lease exclusively: only one taker wins. A take-over file older than
  the timeout (its taker died mid-take-over) is removed.
- **Fencing.** Before committing its work the holder checks that the lease file still holds
  its own token (:meth:`Lease.still_held`); a holder whose lease was taken over (it was paused
  for longer than the timeout) drops its work instead of committing it.
- **Release** removes the file, after the work is committed.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any

LEASES_DIR = "leases"
LEASE_SUFFIX = ".lease"
#: seconds without a heartbeat after which a lease counts as abandoned
DEFAULT_LEASE_TIMEOUT = 120.0


def worker_id() -> str:
    """This process's worker id: host, pid and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's), or cannot tell: assume alive
    return True


class Lease:
    """A held lease; use :func:`try_acquire` to get one. A context manager that releases."""

    def __init__(self, path: Path, token: str, timeout: float) -> None:
        self.path = path
        self.token = token
        self.timeout = timeout
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease {path.name}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(max(self.timeout / 4, 0.01)):
            try:
                os.utime(self.path)
            except OSError:
                self.lost = True

    def still_held(self) -> bool:
        """True while the lease file still holds this holder's token (checked before a commit)."""
        return not self.lost and _read(self.path).get("token") == self.token

    def release(self) -> None:
        """Stop the heartbeat and remove the lease file (only if it is still ours)."""
        self._stop.set()
        # unlink before waiting for the heartbeat thread: a signal that ends the process
        # (submitit's preemption signal raises SystemExit) during the join must not leave a
        # finished shard's lease behind (a late heartbeat on the removed file is harmless)
        if _read(self.path).get("token") == self.token:
            self.path.unlink(missing_ok=True)
        self._thread.join()

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read(path: Path) -> dict[str, Any]:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as f:
            data = json.loads(f.read(4096).decode("utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def is_stale(path: Path, timeout: float, now: float | None = None) -> bool:
    """Whether the lease at ``path`` is abandoned (see the module docstring); False if absent."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if (time.time() if now is None else now) - st.st_mtime > timeout:
        return True
    info = _read(path)
    pid = info.get("pid")
    same_host = info.get("host") == socket.gethostname()
    return same_host and isinstance(pid, int) and pid != os.getpid() and not _pid_alive(pid)


def _create(path: Path, worker: str, timeout: float) -> Lease | None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except FileExistsError:
        return None
    token = secrets.token_hex(16)
    record = {
        "worker": worker,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "time": time.time(),
        "token": token,
    }
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(record, f)
    return Lease(path, token, timeout)


def try_acquire(folder: Path, name: str, worker: str, timeout: float) -> Lease | None:
    """Take the lease ``name`` in ``folder/leases`` if it is free or stale, else None."""
    leases = folder / LEASES_DIR
    if leases.is_symlink():
        raise OSError(f"{leases} is a symbolic link: refusing to write through it.")
    leases.mkdir(exist_ok=True)
    path = leases / f"{name}{LEASE_SUFFIX}"
    lease = _create(path, worker, timeout)
    if lease is not None or not is_stale(path, timeout):
        return lease
    # stale: only the holder of the take-over file may replace it (created exclusively, so
    # of several takers one goes on; the others try again on their next round)
    guard = leases / f".{name}.takeover"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        os.close(os.open(guard, flags, 0o666))
    except FileExistsError:
        try:  # left by a taker that died in the middle of a take-over
            if time.time() - os.lstat(guard).st_mtime > timeout:
                guard.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
        return None
    try:
        if not is_stale(path, timeout):
            return None  # released, or taken over, since we looked
        # move it aside (atomic), and check that what moved is the stale one
        aside = leases / f".{name}.taken.{secrets.token_hex(6)}"
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return _create(path, worker, timeout)
        if not is_stale(aside, timeout):  # a fresh one slipped in: put it back
            try:
                os.link(aside, path)
            except OSError:
                pass
            aside.unlink(missing_ok=True)
            return None
        aside.unlink(missing_ok=True)
        return _create(path, worker, timeout)
    finally:
        guard.unlink(missing_ok=True)


def held_by_others(folder: Path) -> list[str]:
    """Names of the leases in ``folder/leases`` (fresh or stale) that exist now."""
    leases = folder / LEASES_DIR
    if not leases.is_dir() or leases.is_symlink():
        return []
    return sorted(
        p.name[: -len(LEASE_SUFFIX)]
        for p in leases.iterdir()
        if p.name.endswith(LEASE_SUFFIX) and not p.name.startswith(".")
    )


def static_share(num_workers: int | None, worker_index: int | None) -> tuple[int, int]:
    """``(num_workers, worker_index)``, from the arguments or else SLURM's array variables.

    ``SLURM_ARRAY_TASK_COUNT`` / ``SLURM_ARRAY_TASK_ID`` are used when set and the arguments are
    not (task ids are taken relative to ``SLURM_ARRAY_TASK_MIN``, default 0).
    """
    env = os.environ
    if num_workers is None and worker_index is None and "SLURM_ARRAY_TASK_COUNT" in env:
        try:
            count = int(env["SLURM_ARRAY_TASK_COUNT"])
            index = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        except (KeyError, ValueError) as err:
            raise ValueError(
                "SLURM_ARRAY_TASK_COUNT is set but SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_MIN "
                "are missing or not integers: pass --num-workers and --worker-index instead."
            ) from err
        num_workers, worker_index = count, index
    n = 1 if num_workers is None else num_workers
    i = 0 if worker_index is None else worker_index
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"num_workers must be a positive integer, got {n!r}.")
    if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
        raise ValueError(f"worker_index must be an integer in [0, {n - 1}], got {i!r}.")
    return n, i


__all__ = [
    "DEFAULT_LEASE_TIMEOUT",
    "LEASES_DIR",
    "Lease",
    "held_by_others",
    "is_stale",
    "static_share",
    "try_acquire",
    "worker_id",
]
