"""Dataset-scale tracing that survives interruption: prompts traced in chunks, one shard each.

A run folder looks like this::

    out_dir/
      manifest.json            what the run is: options, model, prompt hashes, chunking
      ablation.safetensors     the mean ablation shared by every chunk (mean ablation only)
      shards/00000/            one TraceResult (result.safetensors + result.json) per chunk
      shards/00001/ ...

Every file is written under a temporary name and renamed into place, so a reader (or a
resumed run) sees either a whole shard or none. A shard folder is trusted only when
``TraceResult.load`` accepts it (its tensors match the checksum in its JSON) and it holds
exactly the prompts of its chunk; anything else (a half-written temporary folder left by a
kill, a truncated file) is deleted and traced again.

Rerunning with the same arguments skips finished shards, and the result equals
(``TraceResult.equals``) what an uninterrupted run gives. Rerunning with different prompts,
options, model or chunk size into the same folder is refused, naming what differs.

Choices worth knowing:

- **Mean ablation is shared.** With ``ablation=None``/``"mean"`` the mean is taken over *all*
  the run's prompts once (not per chunk, which would make a prompt's result depend on its
  chunk-mates' activations), saved to ``ablation.safetensors`` and reused on resume.
- **Every chunk uses the same seed.** Chunk k's result is exactly
  ``trace(model, chunk_k, seed=seed, ablation=<the shared ablation>, ...)``.
- **per="dataset" is one shard.** One subgraph shared by all prompts cannot be split into
  chunks without changing what it means, so such a run traces all prompts as a single chunk
  (``chunk_size`` is ignored; resume is all-or-nothing).
- **Not part of a run's identity** (free to change on resume): ``batch_size``, ``device`` and
  ``progress``. Batch size changes how rows are grouped into forward passes, which can move
  results in the last float bits; keep it fixed when bit-identical results matter.
- The trace's wall time (``options["seconds"]``) is kept out of the shard's options, so that
  equal runs compare equal; each shard keeps it in ``timing.json``.

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
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from strace_lens.ablation import Ablation, MeanAblation, ZeroAblation
from strace_lens.atomic import read_versioned_json, replaced_folder, sha256_file
from strace_lens.config import TraceConfig
from strace_lens.graph import Node, NodeGraph
from strace_lens.hygiene import model_untouched
from strace_lens.inputs import TokenBatch, tokenize
from strace_lens.masked_forward import forward_logprobs
from strace_lens.models import model_identity
from strace_lens.prompts import PromptFile
from strace_lens.result import VOLATILE_OPTIONS, TraceResult
from strace_lens.types import ABLATIONS

MANIFEST_FILE = "manifest.json"
ABLATION_FILE = "ablation.safetensors"
SHARDS_DIR = "shards"
TIMING_FILE = "timing.json"
LOCK_FILE = ".lock"
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


class TraceOutOfMemoryError(RuntimeError):
    """Tracing a chunk ran out of memory; the message says what to lower."""


# -- public API -----------------------------------------------------------------------------
def trace_dataset(
    model: Any,
    prompts: Sequence[str] | PromptFile,
    out_dir: str | os.PathLike[str],
    chunk_size: int = 16,
    progress: bool | None = None,
    batch_size: int | None = None,
    targets: Sequence[str] | None = None,
    **trace_options: Any,
) -> TraceResult:
    """Trace many prompts in chunks, each saved as a shard, resuming where a run stopped.

    Args:
        model: a ``TransformerBridge`` / ``HookedTransformer``, left exactly as found. It runs
            where it is: load it on CUDA when available (``load_model`` does), else CPU.
        prompts: a list of strings, or a :class:`~strace_lens.prompts.PromptFile` (whose TSV
            targets are used when ``targets`` is not given).
        out_dir: the run folder (created if needed).
        chunk_size: prompts per shard: the unit of work that a kill can lose.
        progress: a progress bar with ETA on stderr; default: only when stderr is a terminal.
        batch_size: rows per forward pass inside each chunk (default: the trace's own, about
            2048 tokens per pass). Lower it after an out-of-memory error: unlike
            ``chunk_size``, it may change when a run resumes.
        targets: the true next token of each prompt, to record its full-model log-prob.
        **trace_options: everything else :func:`strace_lens.trace` takes (``sizes``,
            ``ablation``, ``per``, ``method``, ``keep``, ``candidates``, ``seed``, ``device``,
            method options).

    Returns:
        The whole run as one ``TraceResult`` (read back from the shards, as
        ``TraceResult.load(out_dir)`` would).

    Raises:
        RunMismatchError: ``out_dir`` holds a run with other prompts, options or model.
        TraceOutOfMemoryError: a chunk did not fit in memory (finished shards are kept).
        ValueError / FloatingPointError: bad prompts or options; NaN/inf in the model's
            output, naming the prompt.

    See the module docstring for the folder layout and what may differ on a GPU.
    """
    if isinstance(prompts, PromptFile):
        if targets is None:
            targets = prompts.targets
        prompts = prompts.prompts
    prompts = _check_prompt_list(prompts)
    if targets is not None:
        targets = [str(t) for t in targets]
        if len(targets) != len(prompts):
            raise ValueError(f"{len(targets)} targets for {len(prompts)} prompts: give one each.")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
    if batch_size is not None and (isinstance(batch_size, bool) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if "prompts" in trace_options or "targets" in trace_options:
        raise TypeError("Pass prompts and targets as trace_dataset's own arguments.")
    per = trace_options.get("per", "input")
    if per == "dataset":
        chunk_size = len(prompts)  # one shard: a shared subgraph cannot be split by chunks
    folder = Path(out_dir)
    if (folder / "result.json").exists():
        raise RunMismatchError(
            f"{folder} holds a single saved TraceResult, not a dataset run: choose another "
            "output folder."
        )
    show = sys.stderr.isatty() if progress is None else bool(progress)
    # Validate everything that can be checked before any work (prompts: empty, longer than
    # the context; method, per, sizes, keep/candidates), so that a mistake costs no time,
    # leaves no folder behind, and a prompt error names its index in the whole list.
    _check_options(model, trace_options)
    batch = tokenize(model, prompts)

    with model_untouched(model):
        identity = _run_identity(model, prompts, targets, chunk_size, trace_options)
        created = not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
        with _exclusive(folder):
            return _run(
                model, prompts, targets, folder, created, identity, chunk_size, show, batch_size,
                batch, trace_options,
            )


def _run(
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
) -> TraceResult:
    """The body of :func:`trace_dataset`, run while holding the folder's lock."""
    existing = _read_manifest(folder) if (folder / MANIFEST_FILE).exists() else None
    if existing is not None:
        _check_same_run(folder, existing, identity)
    _remove_root_temporaries(folder)
    chunks = _chunks(len(prompts), chunk_size)
    written = 0
    try:
        # NaN/inf in the full model's output would poison the shared mean ablation and
        # every chunk's metrics: find such prompts first, and name them. (A resumed run
        # has the same prompts and weights as the run that passed this check.)
        try:
            if existing is None:
                _check_full_outputs(model, batch, prompts, batch_size or 16)
            ablation, ablation_sha = _shared_ablation(
                model, prompts, folder, trace_options.get("ablation"), existing, show, batch_size
            )
        except (RuntimeError, MemoryError) as err:
            if not _is_out_of_memory(err):
                raise
            raise TraceOutOfMemoryError(
                "Out of memory in the first pass over the prompts (full-model outputs and mean "
                f"activations, {batch_size or 16} prompts per forward pass): lower batch_size."
            ) from err
        if existing is None:
            manifest = {
                **identity,
                "ablation_sha256": ablation_sha,
                "n_shards": len(chunks),
                "runtime": {
                    "batch_size": batch_size,
                    "device": str(trace_options.get("device")),
                },
            }
            _write_json_atomic(folder / MANIFEST_FILE, manifest)
        shards = folder / SHARDS_DIR
        shards.mkdir(exist_ok=True)
        _remove_temporaries(shards)
        done = {
            k
            for k, (lo, hi) in enumerate(chunks)
            if _shard_is_valid(shards / _shard_name(k), prompts[lo:hi])
        }
        options = {k: v for k, v in trace_options.items() if k != "ablation"}
        if batch_size is not None:
            options["batch_size"] = batch_size
        with tqdm(
            total=len(prompts),
            initial=sum(hi - lo for k, (lo, hi) in enumerate(chunks) if k in done),
            desc="tracing",
            unit="prompt",
            disable=not show,
            dynamic_ncols=True,
        ) as bar:
            for k, (lo, hi) in enumerate(chunks):
                if k in done:
                    continue
                result = _trace_chunk(
                    model, prompts, targets, lo, hi, k, ablation, options, batch_size,
                    chunk_size,
                )
                _write_shard(shards, k, result)
                written += 1
                bar.update(hi - lo)
    except BaseException:
        # A new run that failed before finishing any shard leaves nothing behind, so the
        # user can fix the arguments and run again into the same folder.
        if existing is None and written == 0:
            _forget_fresh_run(folder, created)
        raise
    return load_run(folder)


def load_run(folder: str | os.PathLike[str]) -> TraceResult:
    """Read a whole ``trace_dataset`` run back as one ``TraceResult`` (shards joined in order).

    Raises:
        IncompleteRunError: some shard is missing (rerun the same command to finish it).
        ValueError: the manifest or a shard is corrupted or does not match the manifest.
    """
    folder = Path(folder)
    manifest = _read_manifest(folder)
    chunks = _chunks(int(manifest["n_prompts"]), int(manifest["chunk_size"]))
    hashes = manifest["prompt_sha256"]
    missing = [k for k in range(len(chunks)) if not (folder / SHARDS_DIR / _shard_name(k)).is_dir()]
    if missing:
        raise IncompleteRunError(
            f"{folder} is an unfinished run: {len(chunks) - len(missing)} of {len(chunks)} "
            f"shards are done (first missing: {SHARDS_DIR}/{_shard_name(missing[0])}). Rerun the "
            "same trace_dataset call or `strace-lens trace` command to finish it."
        )
    parts = []
    for k, (lo, hi) in enumerate(chunks):
        path = folder / SHARDS_DIR / _shard_name(k)
        try:
            part = TraceResult.load(path)
        except (ValueError, FileNotFoundError, OSError) as err:
            raise ValueError(
                f"Shard {path} cannot be read ({err}). Rerun the same command: a resumed run "
                "traces broken shards again."
            ) from err
        if [_sha256_text(p) for p in part.prompts] != hashes[lo:hi]:
            raise ValueError(
                f"Shard {path} holds other prompts than the manifest lists for it: the folder "
                "was edited by hand; trace into a fresh folder."
            )
        parts.append(part)
    return parts[0] if len(parts) == 1 else TraceResult.concat(parts)


def _check_options(model: Any, trace_options: dict[str, Any]) -> None:
    from strace_lens.trace import resolve_candidates, resolve_sizes

    TraceConfig.from_kwargs(trace_options)  # method, per, ablation and method options
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
    prompts = list(prompts)
    if not prompts:
        raise ValueError("The prompt list is empty: pass at least one non-empty string.")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"Prompt {i} is a {type(p).__name__}, not a string.")
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
    from strace_lens import __version__

    # Record the trace's defaults too, so that "method not given" and method="mask" (the
    # default) count as the same run, and a difference names both values.
    given = {**_trace_defaults(), **trace_options}
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
    path = folder / MANIFEST_FILE
    if not path.exists():
        raise FileNotFoundError(f"{folder} holds no dataset run ({MANIFEST_FILE} is missing).")
    manifest = read_versioned_json(
        path,
        RUN_FORMAT,
        RUN_FORMAT_VERSION,
        "dataset-run manifest",
        ". Delete the folder and trace again.",
        "run format",
    )
    return manifest


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
    if recorded and path.exists() and sha256_file(path) == recorded:
        return MeanAblation.load(path), recorded
    mean = MeanAblation.from_prompts(model, prompts, batch_size=batch_size or 16, progress=show)
    mean.save(path)
    digest = sha256_file(path)
    if existing is not None and recorded != digest:
        raise RunMismatchError(
            f"{path} was missing or damaged, and the mean ablation computed again differs from "
            "the one the finished shards used (another device or library version?). Delete "
            f"{folder} and trace again."
        )
    return mean, digest


# -- chunks and shards -----------------------------------------------------------------------
def _chunks(n_prompts: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + chunk_size, n_prompts)) for lo in range(0, n_prompts, chunk_size)]


def _shard_name(k: int) -> str:
    return f"{k:05d}"


def _remove_temporaries(shards: Path) -> None:
    """Delete half-written shard folders a killed run left behind (never trusted anyway)."""
    for entry in shards.iterdir():
        if entry.name.startswith("."):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink()


def _shard_is_valid(path: Path, prompts: list[str]) -> bool:
    if not path.exists():
        return False
    try:
        shard = TraceResult.load(path)
        ok = shard.prompts == prompts
    except (ValueError, FileNotFoundError, OSError, KeyError):
        ok = False
    if not ok:
        shutil.rmtree(path, ignore_errors=True)
    return ok


def _write_shard(shards: Path, k: int, result: TraceResult) -> None:
    """Save a chunk's result into a temporary folder, then rename it to its shard name."""
    timing = {key: result.options.pop(key) for key in VOLATILE_OPTIONS if key in result.options}
    with replaced_folder(shards / _shard_name(k), prefix=f".{_shard_name(k)}.") as tmp:
        result.save(tmp)
        (tmp / TIMING_FILE).write_text(json.dumps(timing), encoding="utf-8")


@contextmanager
def _exclusive(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on the run folder (POSIX ``flock``; released even by kill -9).

    Two processes tracing into one folder would overwrite each other's shards; the second
    is refused instead.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(folder / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunInUseError(
                f"Another strace-lens run is writing into {folder} right now: wait for it to "
                "finish, or choose another output folder."
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _remove_root_temporaries(folder: Path) -> None:
    """Delete a manifest or ablation file that a killed run left half-written."""
    for entry in folder.iterdir():
        if entry.is_file() and entry.name.startswith((f".{MANIFEST_FILE}.", f".{ABLATION_FILE}.")):
            entry.unlink(missing_ok=True)


def _forget_fresh_run(folder: Path, created: bool) -> None:
    for name in (MANIFEST_FILE, ABLATION_FILE, LOCK_FILE):
        (folder / name).unlink(missing_ok=True)
    shards = folder / SHARDS_DIR
    if shards.is_dir():
        _remove_temporaries(shards)
        if not any(shards.iterdir()):
            shards.rmdir()
    if created and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# -- tracing one chunk -----------------------------------------------------------------------
def _trace_function() -> Any:
    from strace_lens.trace import trace

    return trace


def _is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


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
) -> TraceResult:
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
        if not _is_out_of_memory(err):
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
    "RunInUseError",
    "RunMismatchError",
    "TraceOutOfMemoryError",
    "load_run",
    "trace_dataset",
]
