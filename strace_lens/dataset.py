"""Dataset-scale tracing that survives interruption: prompts traced in chunks, one shard each.

A run folder looks like this::

    out_dir/
      manifest.json            what the run is: options, model, prompt hashes, chunking
      ablation.safetensors     the mean ablation shared by every chunk (mean ablation only)
      shards/00000/            one TraceResult (result.safetensors + result.json) per chunk,
                               + run.json (the run's identity hash, result.json's checksum)
      shards/00001/ ...
      leases/                  one lease file per shard (or stage) a worker is busy with

Many workers may run the same call on one folder (any number, on hosts sharing it over NFS,
or a static split with ``num_workers``/``worker_index``): each shard is traced once, under a
lease with a heartbeat that another worker takes over when it goes stale
(:mod:`strace_lens.leases`); the manifest and mean ablation are made once, under the
``setup`` lease.

Every file is written under a temporary name and renamed into place, so a reader (or a
resumed run) sees either a whole shard or none. A shard folder is trusted only when
``TraceResult.load`` accepts it (its tensors match the checksum in its JSON), it holds
exactly the prompts of its chunk, and its ``run.json`` names this very run (options with
defaults filled in, model, weights, prompts, targets, chunking and the ablation's tensors)
with an unchanged ``result.json``; anything else (a half-written temporary folder left by a
kill, a truncated file, a shard of another run after ``manifest.json`` was lost) is deleted
and traced again. A damaged manifest is rebuilt by the same call; the mean ablation is
checked by its tensors, not its file bytes. Nothing outside the folder is ever written or
deleted: a symbolic link where the run keeps a file is refused, and links inside
``shards/`` are removed, never followed.

Rerunning with the same arguments skips finished shards, and the result equals
(``TraceResult.equals``) what an uninterrupted run gives. Rerunning with different prompts,
options, model or chunk size into the same folder is refused, naming what differs.

Choices worth knowing:

- **Mean ablation is shared.** With ``ablation=None``/``"mean"`` the mean is taken over *all*
  the run's prompts once (not per chunk, which would make a prompt's result depend on its
  chunk-mates' activations), saved to ``ablation.safetensors`` and reused on resume.
- **Every chunk uses the same seed.** Chunk k's result is exactly
  ``trace(model, chunk_k, seed=seed, ablation=<the shared ablation>, ...)``.
- **Edge granularity** (``granularity="edge"``): each shard is an ``EdgeTraceResult``
  (``edges.safetensors`` + ``edges.json``) of ``trace(chunk, granularity="edge", ...)``; the
  run's identity records the edge configuration with its defaults (method, grid, semantics
  ``ablate_attention_edges``, token convention, seed), there is no mean ablation (edges are
  zero-ablated), and ``load_run`` joins the shards with ``EdgeTraceResult.concat``.
- **Token granularity** (``granularity="token"``): each shard is a ``TokenTraceResult``
  (``token.safetensors`` + ``token.json``) of ``trace(chunk, granularity="token", ...)``;
  the run's identity is the node configuration's (sizes, ablation, per, method, seed,
  nested, inverse, method options, with defaults) plus ``granularity="token"``, the mean
  ablation is shared as at node granularity, and ``load_run`` joins the shards with
  ``TokenTraceResult.concat``. Targets are not recorded at token granularity.
- **per="dataset" is one shard.** One subgraph shared by all prompts cannot be split into
  chunks without changing what it means, so such a run traces all prompts as a single chunk
  (``chunk_size`` is ignored; resume is all-or-nothing).
- **Not part of a run's identity** (free to change on resume): ``batch_size``, ``device`` and
  ``progress``. Batch size changes how rows are grouped into forward passes, which can move
  results in the last float bits; keep it fixed when bit-identical results matter.
- The trace's wall time (``options["seconds"]``) is kept out of the shard's options, so that
  equal runs compare equal; each shard keeps it in ``timing.json``, with the number of CPU
  threads torch used (``torch_threads``; not part of the run's identity either).

Determinism: on CPU, the same prompts, options and seed give bit-identical masks and metrics
(tested in tests/test_reliability.py). On a GPU, cuBLAS/cuDNN kernels may sum in a different
order from run to run and between GPU models, so metrics can differ in the last bits and, when
two candidate subgraphs are almost tied, a learned mask may pick a different node; results
from CPU and GPU are not expected to be bit-identical either (an expectation, not measured
here). Resume a run on the device it started on when exact equality matters. More in
docs/dataset-runs.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from strace_lens.ablation import Ablation, MeanAblation, ZeroAblation
from strace_lens.atomic import (
    read_versioned_json,
    replaced_folder,
    sha256_file,
    write_text,
)
from strace_lens.config import IDENTITY_FIELDS, TraceConfig
from strace_lens.config import RUNTIME_OPTIONS as CONFIG_RUNTIME_OPTIONS
from strace_lens.edges.config import EdgeTraceConfig
from strace_lens.edges.result import META_FILE as EDGE_META_FILE
from strace_lens.edges.result import EdgeTraceResult
from strace_lens.edges.tokens import edge_tokenize
from strace_lens.graph import Node, NodeGraph
from strace_lens.hygiene import model_untouched
from strace_lens.inputs import TokenBatch, tokenize
from strace_lens.leases import (
    DEFAULT_LEASE_TIMEOUT,
    LEASES_DIR,
    Lease,
    held_by_others,
    static_share,
    try_acquire,
    worker_id,
)
from strace_lens.masked_forward import forward_logprobs
from strace_lens.memory import is_out_of_memory
from strace_lens.models import model_identity
from strace_lens.progress import prompt_bar, wants_progress
from strace_lens.prompts import PromptFile
from strace_lens.result import META_FILE as NODE_META_FILE
from strace_lens.result import VOLATILE_OPTIONS, TraceResult
from strace_lens.token_trace.result import META_FILE as TOKEN_META_FILE
from strace_lens.token_trace.result import TokenTraceResult
from strace_lens.token_trace.sizes import size_grid
from strace_lens.token_trace.trace import check_per, length_groups
from strace_lens.types import ABLATIONS
from strace_lens.validate import (
    as_int,
    caller_state_kept,
    check_prompt_texts,
    check_targets,
    check_trace_arguments,
    method_defaults,
    without_defaults,
)

MANIFEST_FILE = "manifest.json"
ABLATION_FILE = "ablation.safetensors"
SHARDS_DIR = "shards"
TIMING_FILE = "timing.json"
LOCK_FILE = ".lock"
RUN_ID_FILE = "run.json"
#: every name strace-lens writes or cleans directly inside a run folder (report.html: the CLI)
RUN_FOLDER_NAMES = (MANIFEST_FILE, ABLATION_FILE, SHARDS_DIR, LOCK_FILE, "report.html", LEASES_DIR)
#: the names above that are folders
RUN_FOLDER_DIRS = (SHARDS_DIR, LEASES_DIR)
#: the lease of the run's first stage (manifest, full-output check, mean ablation)
SETUP_LEASE = "setup"
RUN_FORMAT = "strace-lens/dataset-run"
RUN_FORMAT_VERSION = 1
#: Trace arguments that do not change what a run computes, so a resume may change them.
RUNTIME_OPTIONS = ("batch_size", "device", "progress")


class RunMismatchError(ValueError):
    """The output folder holds a run made with different prompts, options or model."""


class IncompleteRunError(RuntimeError):
    """A run folder whose shards are not all finished."""


class RunInUseError(ValueError):
    """Another process is tracing into the same output folder."""


class WorkerShareDone(IncompleteRunError):
    """This worker of a static split (``num_workers`` > 1) finished its shards while other
    workers' shards are still missing: the last worker to finish returns the merged run, or
    ``load_run`` / ``strace-lens merge DIR`` does once every shard is there."""


class TraceOutOfMemoryError(RuntimeError):
    """Tracing a chunk ran out of memory; the message says what to lower."""


class RunFolderError(ValueError):
    """The run folder cannot be used as it is (a link where a file belongs, a damaged or
    crafted manifest); the message names the file and the fix."""


class ManifestDamagedError(RunFolderError):
    """``manifest.json`` is unreadable or malformed. Every shard records its run's identity,
    so rerunning the same command rebuilds the manifest and keeps the shards of that run."""


# -- public API -----------------------------------------------------------------------------
def trace_dataset(
    model: Any,
    prompts: Sequence[str] | PromptFile,
    out_dir: str | os.PathLike[str],
    chunk_size: int = 16,
    progress: bool | None = None,
    batch_size: int | None = None,
    targets: Sequence[str] | None = None,
    num_workers: int | None = None,
    worker_index: int | None = None,
    lease_timeout: float = DEFAULT_LEASE_TIMEOUT,
    **trace_options: Any,
) -> TraceResult | EdgeTraceResult | TokenTraceResult:
    """Trace many prompts in chunks, each saved as a shard, resuming where a run stopped.

    Args:
        model: a ``TransformerBridge`` / ``HookedTransformer``, left exactly as found. It runs
            where it is: load it on CUDA when available (``load_model`` does), else CPU.
        prompts: a list of strings, or a :class:`~strace_lens.prompts.PromptFile` (whose TSV
            targets are used when ``targets`` is not given).
        out_dir: the run folder (created if needed).
        chunk_size: prompts per shard: the unit of work that a kill can lose.
        progress: a progress bar with ETA on stderr (a widget in notebooks) that advances
            inside a chunk as its trace runs; default: on a terminal or in a notebook, never
            in CI (:mod:`strace_lens.progress`).
        batch_size: rows per forward pass inside each chunk (default: the trace's own,
            chosen from the device's free memory, :mod:`strace_lens.memory`; a pass that runs
            out of memory is retried with half the rows). Lower it after an out-of-memory
            error: unlike ``chunk_size``, it may change when a run resumes.
        targets: the true next token of each prompt, to record its full-model log-prob.
        num_workers, worker_index: a static split: this worker traces only the shards k with
            ``k % num_workers == worker_index`` (default: SLURM_ARRAY_TASK_COUNT /
            SLURM_ARRAY_TASK_ID when set, else every shard). Without a split, any number of
            workers may run the same call on one folder: each shard is traced once, under a
            lease (see :mod:`strace_lens.leases` and docs/dataset-runs.md).
        lease_timeout: seconds without a heartbeat after which another worker takes over a
            shard (or the first stage) whose worker died. Not part of the run's identity.
        **trace_options: everything else :func:`strace_lens.trace` takes (``sizes``,
            ``ablation``, ``per``, ``method``, ``keep``, ``candidates``, ``seed``, ``device``,
            method options), ``granularity="edge"`` and its options too: each shard is
            then an ``EdgeTraceResult`` (edge options, the semantics and the token
            convention are part of the run's identity; a PromptFile's targets are not
            recorded at edge granularity).

    Returns:
        The whole run as one ``TraceResult`` (an ``EdgeTraceResult`` at edge granularity),
        read back from the shards, as ``strace_lens.load(out_dir)`` would.

    Raises:
        RunMismatchError: ``out_dir`` holds a run with other prompts, options or model.
        WorkerShareDone: (static split only) this worker's shards are done, others' are not.
        TraceOutOfMemoryError: a chunk did not fit in memory (finished shards are kept).
        ValueError / FloatingPointError: bad prompts or options; NaN/inf in the model's
            output, naming the prompt.

    See the module docstring for the folder layout and what may differ on a GPU.
    """
    granularity = trace_options.get("granularity", "node")
    edges = granularity == "edge"
    if isinstance(prompts, PromptFile):
        if targets is None and granularity == "node":  # not recorded at edge or token
            targets = prompts.targets
        prompts = prompts.prompts
    prompts = _check_prompt_list(prompts)
    targets = check_targets(targets, len(prompts))
    if granularity in ("edge", "token") and targets is not None:
        raise ValueError(
            f"targets (true next tokens) are not recorded at granularity={granularity!r}: "
            "leave them None (a PromptFile's targets are left out by itself)."
        )
    chunk_size = as_int(chunk_size, "chunk_size", minimum=1)  # type: ignore[assignment]
    batch_size = as_int(batch_size, "batch_size", minimum=1, allow_none=True)
    share = static_share(num_workers, worker_index)
    if isinstance(lease_timeout, bool) or not isinstance(lease_timeout, (int, float)):
        raise TypeError(f"lease_timeout must be a number of seconds, got {lease_timeout!r}.")
    if not 0 < lease_timeout < float("inf"):
        raise ValueError(
            f"lease_timeout must be a positive number of seconds, got {lease_timeout}."
        )
    if "prompts" in trace_options or "targets" in trace_options:
        raise TypeError("Pass prompts and targets as trace_dataset's own arguments.")
    trace_options = _plain_options(trace_options)
    per = trace_options.get("per", "input")
    if per == "dataset":
        chunk_size = len(prompts)  # one shard: a shared subgraph cannot be split by chunks
    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(
            f"out_dir {folder} is a file, not a folder: choose a folder path (it is created)."
        )
    if any((folder / name).exists() for name in (NODE_META_FILE, EDGE_META_FILE, TOKEN_META_FILE)):
        raise RunMismatchError(
            f"{folder} holds a single saved TraceResult, not a dataset run: choose another "
            "output folder."
        )
    show = wants_progress(progress)
    # Validate everything that can be checked before any work (prompts: empty, longer than
    # the context; method, per, sizes, keep/candidates), so that a mistake costs no time,
    # leaves no folder behind, and a prompt error names its index in the whole list.
    _check_options(model, trace_options)
    if edges:  # the tokens the edge graphs are built on
        batch = edge_tokenize(model, prompts, trace_options["tokens"])
    else:
        batch = tokenize(model, prompts)
    if granularity == "token":  # sizes and per depend on the prompts' lengths
        groups = length_groups(batch)
        check_per(trace_options.get("per", "input"), groups)
        per_node = len(NodeGraph.from_model(model))
        size_grid(trace_options.get("sizes"), [per_node * n for n in groups])

    with model_untouched(model), caller_state_kept():
        identity = _run_identity(model, prompts, targets, chunk_size, trace_options)
        created = not folder.exists()
        _check_no_links(folder)
        folder.mkdir(parents=True, exist_ok=True)
        return _run(
            model,
            prompts,
            targets,
            folder,
            created,
            identity,
            chunk_size,
            show,
            batch_size,
            batch,
            trace_options,
            share,
            float(lease_timeout),
        )


def _run(  # noqa: C901  (a flat sequence of run-folder checks)
    model: Any,
    prompts: list[str],
    targets: list[str] | None,
    folder: Path,
    created: bool,
    identity: dict[str, Any],
    chunk_size: int,
    show: bool,
    batch_size: int | None,
    batch: TokenBatch,
    trace_options: dict[str, Any],
    share: tuple[int, int] = (1, 0),
    lease_timeout: float = DEFAULT_LEASE_TIMEOUT,
) -> TraceResult | EdgeTraceResult | TokenTraceResult:
    """The body of :func:`trace_dataset`: the first stage under the setup lease, then every
    shard of this worker's share under its own lease."""
    worker = worker_id()
    fresh = False  # known to be a new run (so a failure may remove what it wrote)
    poll = min(1.0, max(0.05, lease_timeout / 8))
    chunks = _chunks(len(prompts), chunk_size)
    written = 0
    existing = None
    try:
        with _wait_for_lease(folder, SETUP_LEASE, worker, lease_timeout, poll):
            existing = _existing_run(folder, identity)
            fresh = existing is None
            ablation, run_id = _setup(
                model,
                prompts,
                folder,
                existing,
                identity,
                chunk_size,
                show,
                batch_size,
                batch,
                trace_options,
                chunks,
            )
        shards = folder / SHARDS_DIR
        options = {k: v for k, v in trace_options.items() if k != "ablation"}
        if batch_size is not None:
            options["batch_size"] = batch_size
        n_workers, index = share
        mine = [k for k in range(len(chunks)) if k % n_workers == index]
        pending = [
            k
            for k in mine
            if not _shard_is_valid(
                shards / _shard_name(k), prompts[slice(*chunks[k])], run_id, clean=False
            )
        ]
        for k in sorted(set(mine) - set(pending)):  # finished: clean what a kill left
            if any(e.name.startswith(f".{_shard_name(k)}.") for e in shards.iterdir()):
                lease = try_acquire(folder, _shard_name(k), worker, lease_timeout)
                if lease is not None:
                    with lease:
                        _remove_shard_temporaries(shards, k)
        with prompt_bar(
            total=sum(hi - lo for k, (lo, hi) in enumerate(chunks) if k in mine),
            initial=sum(hi - lo for k, (lo, hi) in enumerate(chunks) if k in mine)
            - sum(chunks[k][1] - chunks[k][0] for k in pending),
            show=show,
        ) as bar:
            while pending:
                for k in list(pending):
                    lo, hi = chunks[k]
                    lease = try_acquire(folder, _shard_name(k), worker, lease_timeout)
                    if lease is None:
                        continue  # another worker holds it: look again later
                    with lease:
                        _remove_shard_temporaries(shards, k)
                        if not _shard_is_valid(shards / _shard_name(k), prompts[lo:hi], run_id):
                            with bar.within(hi - lo):  # the bar moves inside a chunk
                                result = _trace_chunk(
                                    model,
                                    prompts,
                                    targets,
                                    lo,
                                    hi,
                                    k,
                                    ablation,
                                    options,
                                    batch_size,
                                    chunk_size,
                                )
                            if not lease.still_held():
                                continue  # taken over (we were paused too long): drop it
                            _write_shard(shards, k, result, run_id)
                            written += 1
                    pending.remove(k)
                    bar.done(hi - lo)
                if pending:
                    time.sleep(poll)
    except BaseException:
        # A new run that failed before any shard was finished (by any worker) leaves nothing
        # behind, so the user can fix the arguments and run again into the same folder.
        if fresh and written == 0 and _nothing_started(folder):
            _forget_fresh_run(folder, created)
        raise
    if n_workers > 1:
        present = {p.name for p in shards.iterdir()}
        missing = [k for k in range(len(chunks)) if _shard_name(k) not in present]
        if missing:
            raise WorkerShareDone(
                f"Worker {index} of {n_workers} finished its shards in {folder}; "
                f"{len(chunks) - len(missing)} of {len(chunks)} shards are done. The last "
                "worker to finish returns the merged run; or run `strace-lens merge "
                f"{folder}` once every worker is done."
            )
    return load_run(folder)


def _wait_for_lease(folder: Path, name: str, worker: str, timeout: float, poll: float) -> Lease:
    """Take the lease ``name``, waiting while another worker holds a fresh one."""
    while True:
        lease = try_acquire(folder, name, worker, timeout)
        if lease is not None:
            return lease
        time.sleep(poll)


def _nothing_started(folder: Path) -> bool:
    """No shard finished and no other worker holding a lease: the run can be forgotten."""
    shards = folder / SHARDS_DIR
    finished = shards.is_dir() and any(not p.name.startswith(".") for p in shards.iterdir())
    return not finished and not held_by_others(folder)


def _setup(
    model: Any,
    prompts: list[str],
    folder: Path,
    existing: dict[str, Any] | None,
    identity: dict[str, Any],
    chunk_size: int,
    show: bool,
    batch_size: int | None,
    batch: TokenBatch,
    trace_options: dict[str, Any],
    chunks: list[tuple[int, int]],
) -> tuple[Ablation, str]:
    """The run's first stage, done by one worker at a time under the setup lease (the first
    computes the mean ablation; the others read it back): the shared ablation and the run's
    identity hash."""
    _remove_root_temporaries(folder)
    # NaN/inf in the full model's output would poison the shared mean ablation and
    # every chunk's metrics: find such prompts first, and name them. (A resumed run
    # has the same prompts and weights as the run that passed this check.)
    try:
        if existing is None:
            _check_full_outputs(model, batch, prompts, batch_size or 16)
        ablation, ablation_sha = _shared_ablation(
            model, prompts, folder, trace_options.get("ablation"), existing, show, batch_size
        )
        run_id = _run_sha256(identity, ablation_sha)
    except (RuntimeError, MemoryError) as err:
        if not is_out_of_memory(err):
            raise
        raise TraceOutOfMemoryError(
            "Out of memory in the first pass over the prompts (full-model outputs and mean "
            f"activations, {batch_size or 16} prompts per forward pass): lower batch_size."
        ) from err
    if existing is None:
        manifest = {
            **identity,
            "ablation_sha256": ablation_sha,
            "run_sha256": run_id,
            "n_shards": len(chunks),
            "runtime": {
                "batch_size": batch_size,
                "device": str(trace_options.get("device")),
            },
        }
        _write_json_atomic(folder / MANIFEST_FILE, manifest)
    elif existing.get("run_sha256") != run_id:
        # a run from before shards recorded their run (or one whose manifest was lost):
        # record it now; shards without the same record are traced again
        _write_json_atomic(
            folder / MANIFEST_FILE,
            {**existing, "ablation_sha256": ablation_sha, "run_sha256": run_id},
        )
    shards = folder / SHARDS_DIR
    shards.mkdir(exist_ok=True)
    _remove_strays(shards)
    return ablation, run_id


def _existing_run(folder: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The run the folder holds (checked to be this one), or None for a new run."""
    existing = None
    if (folder / MANIFEST_FILE).exists():
        try:
            existing = _read_manifest(folder)
        except ManifestDamagedError:
            # Every shard records its run's identity, so a damaged manifest is rebuilt and
            # only the shards of this very run are kept (the others are traced again).
            existing = None
    if existing is not None:
        _check_same_run(folder, existing, identity)
    return existing


def load_run(folder: str | os.PathLike[str]) -> TraceResult | EdgeTraceResult | TokenTraceResult:
    """Read a whole ``trace_dataset`` run back as one result (shards joined in order): a
    ``TraceResult``, or an ``EdgeTraceResult`` for a run at edge granularity.

    Raises:
        IncompleteRunError: some shard is missing (rerun the same command to finish it).
        ValueError: the manifest or a shard is corrupted or does not match the manifest.
    """
    folder = Path(folder)
    manifest = _read_manifest(folder)
    chunks = _chunks(int(manifest["n_prompts"]), int(manifest["chunk_size"]))
    hashes = manifest["prompt_sha256"]
    run_id = manifest.get("run_sha256")
    shards = folder / SHARDS_DIR
    # list the folder once (not one stat per shard), so a crafted count fails fast
    present = {p.name for p in shards.iterdir()} if shards.is_dir() else set()
    missing = [k for k in range(len(chunks)) if _shard_name(k) not in present]
    if missing:
        raise IncompleteRunError(
            f"{folder} is an unfinished run: {len(chunks) - len(missing)} of {len(chunks)} "
            f"shards are done (first missing: {SHARDS_DIR}/{_shard_name(missing[0])}). Rerun the "
            "same trace_dataset call or `strace-lens trace` command to finish it."
        )
    parts = []
    for k, (lo, hi) in enumerate(chunks):
        path = folder / SHARDS_DIR / _shard_name(k)
        if run_id is not None and _shard_run_id(path) != run_id:
            raise ValueError(
                f"Shard {path} cannot be read as part of this run: its {RUN_ID_FILE} is missing "
                "or damaged, its result.json was changed, or it was traced by another run than "
                f"the one {folder / MANIFEST_FILE} describes. Rerun the same command: it traces "
                "that shard again."
            )
        try:
            part = _load_shard(path)
        except Exception as err:  # any damage: a wrong type or key in its JSON, too
            raise ValueError(
                f"Shard {path} cannot be read ({type(err).__name__}: {err}). Rerun the same "
                "command: a resumed run traces broken shards again."
            ) from err
        if [_sha256_text(p) for p in part.prompts] != hashes[lo:hi]:
            raise ValueError(
                f"Shard {path} holds other prompts than the manifest lists for it. Rerun the "
                "same command: it traces that shard again."
            )
        parts.append(part)
    if len(parts) == 1:
        return parts[0]
    if any(type(p) is not type(parts[0]) for p in parts):
        raise ValueError(
            f"The shards of {folder} hold results of different granularities: the folder was "
            "edited. Move it away and trace again."
        )
    return type(parts[0]).concat(parts)  # type: ignore[arg-type]


def _plain_options(trace_options: dict[str, Any]) -> dict[str, Any]:
    """The trace options checked, as plain Python values, without method options given at
    their default (so that ``steps=24`` and no ``steps`` are the same run). At edge
    granularity: the edge configuration's own arguments, every default filled in."""
    if trace_options.get("granularity", "node") == "edge":
        runtime = {k: v for k, v in trace_options.items() if k in CONFIG_RUNTIME_OPTIONS}
        check_trace_arguments({**runtime, "granularity": "edge"})  # device, batch_size
        return {**EdgeTraceConfig.from_kwargs(trace_options).trace_kwargs(), **runtime}
    if trace_options.get("granularity", "node") == "token":
        rest = {k: v for k, v in trace_options.items() if k != "granularity"}
        return {**_plain_options(rest), "granularity": "token"}
    # trace()'s named parameters; every other keyword is a method option
    params = {*IDENTITY_FIELDS, *CONFIG_RUNTIME_OPTIONS, "targets"}
    named = {k: v for k, v in trace_options.items() if k in params}
    extra = {k: v for k, v in trace_options.items() if k not in named}
    checked = check_trace_arguments({**named, "options": extra})
    method = checked.get("method", "mask")
    options = without_defaults(method, checked.pop("options"))
    return {**checked, **options}


def _check_options(model: Any, trace_options: dict[str, Any]) -> None:
    from strace_lens.trace import resolve_candidates, resolve_sizes

    if trace_options.get("granularity", "node") == "edge":
        return  # checked by EdgeTraceConfig (_plain_options); edges need no hook names
    TraceConfig.from_kwargs(trace_options)  # method, per, ablation and method options
    if trace_options.get("granularity") == "token":
        return  # sizes and per: checked on the prompts' lengths (trace_dataset)
    graph = NodeGraph.from_model(model)
    cand = resolve_candidates(graph, trace_options.get("keep"), trace_options.get("candidates"))
    resolve_sizes(trace_options.get("sizes"), int(cand.sum()))


# -- the run's identity -----------------------------------------------------------------------
def _check_prompt_list(prompts: Any) -> list[str]:
    if isinstance(prompts, (str, Tensor)):
        raise TypeError(
            "trace_dataset needs a list of prompt strings (or a PromptFile from read_prompts); "
            "for a single prompt or token ids, use strace_lens.trace."
        )
    if not isinstance(prompts, Iterable) or isinstance(prompts, (bytes, dict)):
        raise TypeError(
            f"prompts must be a list of strings (or a PromptFile), got {type(prompts).__name__}."
        )
    prompts = list(prompts)
    if not prompts:
        raise ValueError("The prompt list is empty: pass at least one non-empty string.")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"Prompt {i} is a {type(p).__name__}, not a string.")
    check_prompt_texts(prompts)
    return prompts


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _weights_fingerprint(model: Any) -> str:
    """SHA-256 of an evenly spaced sample of every parameter (cheap, exact, device-independent).

    The model identity names the architecture; this catches two models of the same shape
    with different weights (another checkpoint, a fine-tuned copy, another dtype).
    """
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 1024)
        sample = flat[::step][:1024].to("cpu")
        digest.update(name.encode())
        digest.update(str(p.dtype).encode())
        digest.update(str(tuple(p.shape)).encode())
        digest.update(sample.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _jsonable(value: Any, where: str) -> Any:
    """A JSON value that records an option exactly (tensors as lists, ablations by content)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, where) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, ZeroAblation):
        return "zero"
    if isinstance(value, MeanAblation):
        return {**value.describe(), "sha256": _ablation_hash(value)}
    if isinstance(value, Node):
        return value.name
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    raise TypeError(
        f"Option {where} has type {type(value).__name__}, which a run manifest cannot record; "
        "pass plain numbers, strings, lists, tensors or an Ablation."
    )


def _trace_defaults() -> dict[str, Any]:
    """The default of every option that identifies a run (the trace configuration's)."""
    return TraceConfig.identity_defaults()


def _ablation_hash(ablation: MeanAblation) -> str:
    digest = hashlib.sha256()
    for t in (ablation.attn, ablation.mlp, ablation.attn_by_pos, ablation.mlp_by_pos):
        if t is not None:
            digest.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _run_identity(
    model: Any,
    prompts: list[str],
    targets: list[str] | None,
    chunk_size: int,
    trace_options: dict[str, Any],
) -> dict[str, Any]:

    if trace_options.get("granularity", "node") == "edge":
        options = EdgeTraceConfig.from_kwargs(trace_options).identity()
        return _identity_record(model, prompts, targets, chunk_size, options)
    # Record the trace's defaults too, so that "method not given" and method="mask" (the
    # default) count as the same run, and a difference names both values.
    given = {
        **_trace_defaults(),
        **method_defaults(trace_options.get("method", "mask")),
        **trace_options,
    }
    options = {k: _jsonable(v, k) for k, v in sorted(given.items()) if k not in RUNTIME_OPTIONS}
    ablation = trace_options.get("ablation")
    if ablation is None or isinstance(ablation, str):
        options["ablation"] = ablation or "mean"
    elif not isinstance(ablation, Ablation):
        raise ValueError(
            f"Unknown ablation {ablation!r}: use 'mean', 'zero', ZeroAblation() or "
            "MeanAblation.from_prompts(model, prompts)."
        )
    if options["ablation"] not in ABLATIONS and isinstance(options["ablation"], str):
        raise ValueError(
            f"Unknown ablation {options['ablation']!r}: use 'mean', 'zero', ZeroAblation() or "
            "MeanAblation.from_prompts(model, prompts)."
        )
    return _identity_record(model, prompts, targets, chunk_size, options)


def _identity_record(
    model: Any,
    prompts: list[str],
    targets: list[str] | None,
    chunk_size: int,
    options: dict[str, Any],
) -> dict[str, Any]:
    from strace_lens import __version__

    return {
        "format": RUN_FORMAT,
        "version": RUN_FORMAT_VERSION,
        "strace_lens_version": __version__,
        "model": model_identity(model),
        "weights_sha256": _weights_fingerprint(model),
        "options": options,
        "chunk_size": chunk_size,
        "n_prompts": len(prompts),
        "prompt_sha256": [_sha256_text(p) for p in prompts],
        "target_sha256": None if targets is None else [_sha256_text(t) for t in targets],
    }


def _read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest, checked field by field, so that a damaged or crafted one fails fast and
    by name (:class:`ManifestDamagedError`) instead of somewhere later."""
    path = folder / MANIFEST_FILE
    if not path.exists():
        raise FileNotFoundError(f"{folder} holds no dataset run ({MANIFEST_FILE} is missing).")
    if path.is_symlink():
        raise RunFolderError(_link_message(path))
    fix = (
        ". Rerun the same trace_dataset call or `strace-lens trace` command: it rebuilds the "
        "manifest and keeps every shard of that run."
    )
    try:
        manifest = read_versioned_json(
            path, RUN_FORMAT, RUN_FORMAT_VERSION, "dataset-run manifest", fix, "run format"
        )
    except ValueError as err:
        if "is corrupted" in str(err):
            raise ManifestDamagedError(str(err)) from err
        if "is not a strace-lens" in str(err):
            if (folder / SHARDS_DIR).is_dir():  # our layout: our manifest, overwritten
                damaged = f"{path} is corrupted (not a run manifest){fix}"
                raise ManifestDamagedError(damaged) from err
            raise RunFolderError(
                f"{path} is not a strace-lens run manifest: the folder holds something else. "
                "Choose another output folder."
            ) from err
        raise
    problem = _manifest_problem(manifest)
    if problem is not None:
        raise ManifestDamagedError(f"{path} is corrupted ({problem}){fix}")
    return manifest


def _manifest_problem(m: dict[str, Any]) -> str | None:
    """What is wrong with a manifest's fields, or None."""

    def hashes(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(h, str) and len(h) == 64 for h in v)

    n = m.get("n_prompts")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return f"n_prompts is {n!r}, not a positive integer"
    chunk = m.get("chunk_size")
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        return f"chunk_size is {chunk!r}, not a positive integer"
    if not hashes(m.get("prompt_sha256")) or len(m["prompt_sha256"]) != n:
        return f"prompt_sha256 is not a list of {n} SHA-256 hashes"
    targets = m.get("target_sha256")
    if targets is not None and (not hashes(targets) or len(targets) != n):
        return f"target_sha256 is not null or a list of {n} SHA-256 hashes"
    if not isinstance(m.get("options"), dict):
        return "options is not a JSON object"
    if m.get("n_shards") != -(-n // chunk):
        return (
            f"n_shards is {m.get('n_shards')!r}, but {n} prompts in chunks of {chunk} "
            f"make {-(-n // chunk)}"
        )
    for key in ("ablation_sha256", "run_sha256", "weights_sha256", "strace_lens_version"):
        if m.get(key) is not None and not isinstance(m.get(key), str):
            return f"{key} is {m.get(key)!r}, not a string"
    return None


def _check_same_run(folder: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    """Refuse to mix two different runs in one folder, naming every difference."""
    diffs: list[str] = []
    if old.get("strace_lens_version") != new["strace_lens_version"]:
        diffs.append(
            f"strace-lens version was {old.get('strace_lens_version')}, now "
            f"{new['strace_lens_version']}"
        )
    if old.get("model") != new["model"]:
        diffs.append(f"model was {old.get('model')}, now {new['model']}")
    elif old.get("weights_sha256") != new["weights_sha256"]:
        diffs.append("the model's weights differ (same architecture, other checkpoint or dtype)")
    old_opts, new_opts = old.get("options", {}), new["options"]
    node_run = isinstance(old_opts, dict) and old_opts.get("granularity", "node") == "node"
    if node_run:  # a manifest written before method defaults were recorded
        old_opts = {**method_defaults(old_opts.get("method", "mask")), **old_opts}
    for key in sorted(set(old_opts) | set(new_opts)):
        if old_opts.get(key, "<not given>") != new_opts.get(key, "<not given>"):
            diffs.append(
                f"option {key!r} was {old_opts.get(key, '<not given>')!r}, now "
                f"{new_opts.get(key, '<not given>')!r}"
            )
    if old.get("chunk_size") != new["chunk_size"]:
        diffs.append(f"chunk_size was {old.get('chunk_size')}, now {new['chunk_size']}")
    old_h, new_h = old.get("prompt_sha256", []), new["prompt_sha256"]
    if len(old_h) != len(new_h):
        diffs.append(f"the run had {len(old_h)} prompts, now {len(new_h)}")
    else:
        changed = [i for i, (a, b) in enumerate(zip(old_h, new_h)) if a != b]
        if changed:
            diffs.append(f"{len(changed)} prompt(s) differ, first: prompt {changed[0]}")
    if old.get("target_sha256") != new["target_sha256"] and not diffs:
        diffs.append("the targets (true next tokens) differ")
    if diffs:
        raise RunMismatchError(
            f"{folder} already holds a different run: " + "; ".join(diffs) + ". Use another "
            "output folder, or delete this one to start over."
        )


# -- the shared ablation ---------------------------------------------------------------------
def _shared_ablation(
    model: Any,
    prompts: list[str],
    folder: Path,
    spec: Ablation | str | None,
    existing: dict[str, Any] | None,
    show: bool,
    batch_size: int | None,
) -> tuple[Ablation, str | None]:
    """The ablation every chunk uses, and the SHA-256 of its file (mean over the run only).

    A mean over all the run's prompts is computed once and saved; a resumed run reads it
    back (after checking its checksum) instead of computing it again.
    """
    if isinstance(spec, Ablation):
        spec.check_model(model)
        return spec, None
    if spec == "zero":
        return ZeroAblation(), None
    path = folder / ABLATION_FILE
    recorded = existing.get("ablation_sha256") if existing is not None else None
    if recorded and path.is_file() and not path.is_symlink():
        try:
            saved: MeanAblation | None = MeanAblation.load(path)
        except (ValueError, KeyError, OSError):
            saved = None  # damaged: computed again below
        # by tensor contents (a run made before 0.x recorded the file's hash)
        if saved is not None and recorded in (saved.tensor_sha256(), sha256_file(path)):
            return saved, saved.tensor_sha256()
    mean = MeanAblation.from_prompts(model, prompts, batch_size=batch_size or 16, progress=show)
    digest = mean.tensor_sha256()
    if existing is not None and existing.get("run_sha256") and recorded != digest:
        raise RunMismatchError(
            f"{path} is missing or damaged, and the mean ablation computed again from the "
            "prompts differs from the one the finished shards used (recorded in "
            f"{folder / MANIFEST_FILE}): resume on the device and with the torch version the "
            "run started with (the shards are kept), or restore the file. To trace every "
            f"shard again with the new mean instead, delete {folder / MANIFEST_FILE}."
        )
    mean.save(path)
    return mean, digest


# -- chunks and shards -----------------------------------------------------------------------
def _chunks(n_prompts: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + chunk_size, n_prompts)) for lo in range(0, n_prompts, chunk_size)]


def _shard_name(k: int) -> str:
    return f"{k:05d}"


def _remove(entry: Path) -> None:
    """Delete a file or folder inside the run; a symbolic link is removed, never followed."""
    if entry.is_symlink() or not entry.is_dir():
        entry.unlink(missing_ok=True)
    else:
        shutil.rmtree(entry, ignore_errors=True)  # rmtree itself never follows links inside


def _remove_temporaries(shards: Path) -> None:
    """Delete half-written shard folders a killed run left behind (never trusted anyway)."""
    if shards.is_symlink():  # checked before; never clean what a link points to
        raise RunFolderError(_link_message(shards))
    for entry in shards.iterdir():
        if entry.name.startswith(".") or entry.is_symlink():
            _remove(entry)


def _remove_strays(shards: Path) -> None:
    """Delete links in ``shards/`` and hidden entries that are no shard's temporary folder
    (those belong to whichever worker holds that shard's lease)."""
    if shards.is_symlink():  # checked before; never clean what a link points to
        raise RunFolderError(_link_message(shards))
    for entry in shards.iterdir():
        if entry.is_symlink() or (
            entry.name.startswith(".") and not re.match(r"\.\d{5,}\.", entry.name)
        ):
            _remove(entry)


def _remove_shard_temporaries(shards: Path, k: int) -> None:
    """Delete what a killed worker left half-written for shard k (we hold its lease)."""
    for entry in shards.iterdir():
        if entry.name.startswith(f".{_shard_name(k)}."):
            _remove(entry)


def _shard_run_id(path: Path) -> str | None:
    """The run a shard was traced by, from its ``run.json``; None when that file is missing,
    damaged, or its ``result.json`` was changed after writing (its checksum is there too)."""
    try:
        data = json.loads((path / RUN_ID_FILE).read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            return None
        if data.get("result_json_sha256") != sha256_file(_shard_meta_file(path)):
            return None
        run_id = data.get("run_sha256")
        return run_id if isinstance(run_id, str) else None
    except (OSError, ValueError):
        return None


def _shard_is_valid(path: Path, prompts: list[str], run_id: str, clean: bool = True) -> bool:
    """A shard is reused only when it loads, holds its chunk's prompts and was traced by this
    very run (same options, model, prompts, targets and ablation tensors). An invalid one is
    deleted when ``clean`` (only by the holder of its lease)."""
    if not path.exists() and not path.is_symlink():
        return False
    try:
        ok = (
            not path.is_symlink()
            and path.is_dir()
            and not any(p.is_symlink() for p in path.iterdir())
            and _shard_run_id(path) == run_id
            and _load_shard(path).prompts == prompts
        )
    except Exception:  # any damage (a wrong type or key in its JSON, too): trace it again
        ok = False
    if not ok and clean:
        _remove(path)
    return ok


def _shard_meta_file(path: Path) -> Path:
    """A shard's JSON header: ``edges.json`` for an edge run's shard, ``token.json`` for a
    token run's, else ``result.json`` (the run's identity, recorded in ``run.json``, says
    which granularity it was traced at)."""
    for meta in (path / EDGE_META_FILE, path / TOKEN_META_FILE):
        if meta.exists():
            return meta
    return path / NODE_META_FILE


def _load_shard(path: Path) -> TraceResult | EdgeTraceResult | TokenTraceResult:
    if (path / EDGE_META_FILE).exists():
        return EdgeTraceResult.load(path)
    if (path / TOKEN_META_FILE).exists():
        return TokenTraceResult.load(path)
    return TraceResult.load(path)


def _write_shard(
    shards: Path, k: int, result: TraceResult | EdgeTraceResult | TokenTraceResult, run_id: str
) -> None:
    """Save a chunk's result into a temporary folder, then rename it to its shard name."""
    timing = {key: result.options.pop(key) for key in VOLATILE_OPTIONS if key in result.options}
    # the CPU threads the chunk was traced with explain its wall time (`--threads`); like the
    # time, they are not part of the run's identity
    timing["torch_threads"] = torch.get_num_threads()
    with replaced_folder(shards / _shard_name(k), prefix=f".{_shard_name(k)}.") as tmp:
        result.save(tmp)
        (tmp / TIMING_FILE).write_text(json.dumps(timing), encoding="utf-8")
        record = {"run_sha256": run_id, "result_json_sha256": sha256_file(_shard_meta_file(tmp))}
        (tmp / RUN_ID_FILE).write_text(json.dumps(record), encoding="utf-8")


def _link_message(path: Path) -> str:
    return (
        f"{path} is a symbolic link: strace-lens writes and cleans only real files inside "
        f"the run folder, never what a link points to. Remove the link (rm {path}) or choose "
        "another output folder."
    )


def _check_no_links(folder: Path) -> None:
    """Refuse a run folder where a name strace-lens writes or cleans is a symbolic link."""
    if not folder.is_dir():
        return
    for name in RUN_FOLDER_NAMES:
        path = folder / name
        if path.is_symlink():
            raise RunFolderError(_link_message(path))
        wrong = "a file" if name in RUN_FOLDER_DIRS else "a folder"
        if path.exists() and (path.is_dir() != (name in RUN_FOLDER_DIRS)):
            what = {SHARDS_DIR: "shard folders", LEASES_DIR: "worker leases"}.get(name, name)
            raise RunFolderError(
                f"{path} is {wrong}, where strace-lens keeps its "
                f"{what}: the run folder was edited. "
                "Move it away, or choose another output folder."
            )


def _run_sha256(identity: dict[str, Any], ablation_sha: str | None) -> str:
    """The run's identity as one hash, recorded in the manifest and in every shard."""
    record = {**identity, "ablation_tensors_sha256": ablation_sha}
    text = json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _remove_root_temporaries(folder: Path) -> None:
    """Delete a manifest or ablation file that a killed run left half-written."""
    for entry in folder.iterdir():
        if entry.is_file() and entry.name.startswith((f".{MANIFEST_FILE}.", f".{ABLATION_FILE}.")):
            entry.unlink(missing_ok=True)


def _forget_fresh_run(folder: Path, created: bool) -> None:
    for name in (MANIFEST_FILE, ABLATION_FILE, LOCK_FILE):
        (folder / name).unlink(missing_ok=True)
    leases = folder / LEASES_DIR
    if leases.is_dir() and not leases.is_symlink():
        for entry in leases.iterdir():
            if entry.name.startswith("."):
                entry.unlink(missing_ok=True)  # a stale lease moved aside by a take-over
        if not any(leases.iterdir()):
            leases.rmdir()
    shards = folder / SHARDS_DIR
    if shards.is_dir():
        _remove_temporaries(shards)
        if not any(shards.iterdir()):
            shards.rmdir()
    if created and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    write_text(path, json.dumps(data, indent=1, allow_nan=False))


# -- tracing one chunk -----------------------------------------------------------------------
def _trace_function() -> Any:
    from strace_lens.trace import trace

    return trace


def _trace_chunk(
    model: Any,
    prompts: list[str],
    targets: list[str] | None,
    lo: int,
    hi: int,
    k: int,
    ablation: Ablation,
    options: dict[str, Any],
    batch_size: int | None,
    chunk_size: int,
) -> TraceResult | EdgeTraceResult | TokenTraceResult:
    trace = _trace_function()
    try:
        return trace(
            model,
            prompts[lo:hi],
            ablation=ablation,
            progress=False,
            targets=None if targets is None else targets[lo:hi],
            **options,
        )
    except FloatingPointError as err:
        raise FloatingPointError(_name_bad_prompts(str(err), prompts, lo, hi)) from err
    except (RuntimeError, MemoryError) as err:
        if not is_out_of_memory(err):
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise TraceOutOfMemoryError(
            f"Out of memory while tracing chunk {k} (prompts {lo}-{hi - 1}) with "
            f"batch_size={batch_size if batch_size is not None else 'default'} and "
            f"chunk_size={chunk_size}: lower batch_size (rows per forward pass); finished "
            "shards are kept, and the same call with a smaller batch_size resumes. If that is "
            "not enough, a smaller chunk_size needs a new output folder."
        ) from err


@torch.no_grad()
def _check_full_outputs(model: Any, batch: TokenBatch, prompts: list[str], step: int) -> None:
    bad: list[int] = []
    for lo in range(0, batch.batch_size, step):
        rows = batch.select(range(lo, min(lo + step, batch.batch_size))).trimmed()
        logp = forward_logprobs(model, rows, [])
        bad += [lo + int(i) for i in torch.nonzero(~torch.isfinite(logp).all(-1)).flatten()]
    if bad:
        first = prompts[bad[0]]
        shown = first if len(first) <= 80 else first[:77] + "..."
        raise FloatingPointError(
            f"NaN or inf in the model's output for prompt(s) {bad[:10]}"
            f"{' and more' if len(bad) > 10 else ''}; the first reads: {shown!r}. Check those "
            "prompts and the model's weights and dtype (fp16 overflows easily; load it in "
            "float32)."
        )


def _name_bad_prompts(message: str, prompts: list[str], lo: int, hi: int) -> str:
    """Rewrite a chunk-relative 'prompt row(s) [..]' message with the prompts' run indices."""
    found = re.search(r"row\(s\) \[([0-9, ]*)\]", message)
    rows = [int(r) for r in found.group(1).split(",") if r.strip()] if found else []
    rows = [r for r in rows if 0 <= r < hi - lo]
    if not rows:
        return f"{message} (in the chunk of prompts {lo}-{hi - 1})"
    first = prompts[lo + rows[0]]
    shown = first if len(first) <= 80 else first[:77] + "..."
    return (
        f"{message} -- that is prompt(s) {[lo + r for r in rows]} of the run; the first reads: "
        f"{shown!r}"
    )


__all__ = [
    "IncompleteRunError",
    "ManifestDamagedError",
    "RunFolderError",
    "RunInUseError",
    "RunMismatchError",
    "TraceOutOfMemoryError",
    "WorkerShareDone",
    "load_run",
    "trace_dataset",
]
