"""The ``strace-lens`` command line: ``trace`` a prompt file, or ``reproduce`` the paper's figures.

    strace-lens trace --model gemma-3-270m --prompts FILE --n 16 --out DIR

traces the first 16 prompts of FILE (plain text, one prompt a line, or the 6-column TSV of
``shared/data``) with :func:`strace_lens.dataset.trace_dataset`, so an interrupted run
resumes when the same command is run again; prints the median KL / TV / shared nucleus per
size; and writes an HTML page with the circuit diagram and figures when the installed
``strace_lens.plot`` provides a page writer.

Any number of copies of the same ``trace`` command may run on one ``--out`` folder (each shard
is traced once, under a lease; ``--lease-timeout``), or a static split with ``--num-workers N
--worker-index I`` (SLURM array variables are read when set); ``strace-lens merge DIR``
prints the summary and writes the page of a finished folder.

``--model native:tiny`` selects a tiny randomly initialised test model (see
``strace_lens/tiny_model.py``): it exercises the whole command in seconds, its results mean
nothing.

Exit status: 0 on success; 2 for bad input (a one-line error on stderr, no traceback);
1 when the run itself failed (out of memory, NaN in the model's output); 130 when interrupted.
Set ``STRACE_LENS_DEBUG=1`` to see the traceback of an error.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import re
import shlex
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
HTML_PAGE = "report.html"
DEFAULT_REPRODUCE_MODEL = "gemma-3-270m"


class BadInput(ValueError):
    """An error in what the user gave the command."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (and exit status 2), like every
    other bad input."""

    def error(self, message: str) -> Any:
        self.exit(
            EXIT_BAD_INPUT,
            f"strace-lens: error: {_one_line(message)} (see `{self.prog} --help`)\n",
        )


# -- argument parsing --------------------------------------------------------------------------
def _parse_sizes(tokens: Sequence[str] | None) -> list[int] | list[float] | None:
    if not tokens:
        return None
    values: list[str] = [v for t in tokens for v in t.replace(",", " ").split()]
    if not values:
        raise BadInput(
            "--sizes needs at least one value: node counts (1 4 16) or relative "
            "sizes (0.01 0.1 1.0)."
        )
    is_int = [v.lstrip("+-").isdigit() for v in values]
    try:
        if all(is_int):
            return [int(v) for v in values]
        floats = [float(v) for v in values]
    except ValueError:
        raise BadInput(
            f"--sizes takes node counts (1 4 16) or relative sizes (0.01 0.1 1.0), got {values}."
        ) from None
    if any(is_int):
        raise BadInput(
            f"--sizes mixes node counts and relative sizes ({' '.join(values)}): give all "
            "integers (node counts, e.g. 1 4 16) or all fractions (e.g. 0.25 0.5 1.0)."
        )
    bad = [v for v, f in zip(values, floats) if not math.isfinite(f)]
    if bad:
        raise BadInput(f"--sizes must be finite numbers, got {' '.join(bad)}.")
    return floats


def _parse_option(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--option takes KEY=VALUE, got {text!r}.")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise argparse.ArgumentTypeError(f"--option takes KEY=VALUE, got {text!r} (no KEY).")
    try:
        value: Any = json.loads(raw, parse_constant=lambda c: float(c))
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parse_threads(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"takes a positive whole number of CPU threads, got {text!r}: e.g. --threads 1 "
            "on a machine shared with other jobs, or leave it out for torch's own count"
        )
    return value


def _version() -> str:
    from strace_lens import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    from strace_lens.models import DEFAULT_MODEL, EMBEDDED_MODELS
    from strace_lens.types import ABLATIONS, GRANULARITIES, METHODS, PER

    parser = _Parser(
        prog="strace-lens",
        description="s-Trace on TransformerLens: the smallest subgraphs of attention heads and "
        "MLPs that reproduce a model's next-token distribution, at every size.",
        epilog="Exit status: 0 success; 2 bad input (one line on stderr, nothing written); 1 the "
        "run failed (out of memory, NaN, disk full: rerunning the same command resumes it); "
        "130 interrupted. Set STRACE_LENS_DEBUG=1 to see the traceback of an error.",
    )
    parser.add_argument("--version", action="version", version=f"strace-lens {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    tr = sub.add_parser(
        "trace",
        help="trace the prompts of a file (resumable)",
        description="Trace prompts in chunks, each saved as a shard in --out; rerunning the "
        "same command resumes an interrupted run.",
    )
    tr.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"embedded model ({', '.join(sorted(EMBEDDED_MODELS))}), a local Hugging Face "
        "folder, or native:tiny (a tiny random test model) (default: %(default)s)",
    )
    tr.add_argument("--prompts", required=True, type=Path, help="file (text/TSV) or set: wikitext")
    tr.add_argument("--n", type=int, default=None, help="trace the first N prompts (default: all)")
    tr.add_argument("--out", required=True, type=Path, help="run folder (created; resumed)")
    tr.add_argument(
        "--sizes",
        nargs="+",
        default=None,
        help="node counts (1 4 16) or relative sizes (0.01 0.1 1.0); default: a log grid "
        "(at --granularity edge: relative sizes or 'paper', the paper's grid and the default)",
    )
    tr.add_argument(
        "--granularity",
        default="node",
        metavar="{" + ",".join(GRANULARITIES) + "}",
        help="heads and MLPs (node), each of them at each position (token; sizes count "
        "(component, position) pairs, floats are relative to each prompt) or the paper's "
        "token-level edges (edge) (default: %(default)s)",
    )
    # the names come from strace_lens.types (the method registry's names, checked by a test);
    # they are checked before any work, one line and exit 2 (_check_arguments)
    tr.add_argument(
        "--method",
        default=None,
        metavar="{" + ",".join(METHODS) + "}",
        help="search method (default: mask; at --granularity edge: greedy, the paper's, or "
        "random or mask)",
    )
    tr.add_argument(
        "--per",
        default="input",
        metavar="{" + ",".join(PER) + "}",
        help="a subgraph per input or one per dataset (default: %(default)s)",
    )
    tr.add_argument(
        "--ablation",
        default=None,
        metavar="{" + ",".join(ABLATIONS) + "}",
        help="what replaces a removed node (default: mean; at --granularity edge only zero, "
        "the paper's edge ablation)",
    )
    tr.add_argument(
        "--ablate-attention-edges",
        type=_parse_bool,
        default=None,
        metavar="{true,false}",
        help="--granularity edge: false counts attention edges in s but keeps them, as the "
        "released code's evaluation appears to (default: true)",
    )
    tr.add_argument(
        "--tokens",
        default=None,
        metavar="{paper,hf,transformer_lens}",
        help="--granularity edge: how prompts are tokenised, which fixes every edge count "
        "(default: paper, the model's original Hugging Face tokenizer)",
    )
    _add_run_arguments(tr, "a method option, e.g. --option steps=48")
    tr.add_argument("--no-html", action="store_true", help="do not write the HTML page")
    _add_worker_arguments(tr)

    mg = sub.add_parser(
        "merge",
        help="merge a finished run's shards: print the summary, write the HTML page",
        description="Read every shard of a run folder (all workers done) as one result, print "
        "the summary table and write report.html.",
    )
    mg.add_argument("out", type=Path, help="the run folder")
    mg.add_argument("--no-html", action="store_true", help="do not write the HTML page")

    rp = sub.add_parser(
        "reproduce",
        help="trace prompts, run every analysis and judge the paper's claims (resumable)",
        description="Run strace_lens.report.reproduce: trace the first N prompts with learned "
        "masks (or, at --granularity edge, the paper's greedy or learned edge masks) and a "
        "random baseline (resumable), run every analysis, and write report.md and the tables "
        "as CSV into --out. Give --model twice for the cross-model agreement.",
    )
    rp.add_argument(
        "--model",
        action="append",
        default=None,
        help=f"model to trace (repeat for two models; default: {DEFAULT_MODEL})",
    )
    rp.add_argument("--prompts", required=True, type=Path, help="file (text/TSV) or set: wikitext")
    rp.add_argument("--n", type=int, default=200, help="first N prompts (default 200)")
    rp.add_argument("--out", required=True, type=Path, help="output folder (created; resumed)")
    rp.add_argument(
        "--sizes",
        nargs="+",
        default=None,
        help="node counts or relative sizes; default: a log grid",
    )
    rp.add_argument(
        "--granularity",
        choices=("node", "edge"),
        default="node",
        help="heads and MLPs (node), or the paper's token-level edges (edge) with its size "
        "grid, phase bands and zero ablation (default: %(default)s)",
    )
    rp.add_argument(
        "--method",
        choices=("greedy", "mask"),
        default=None,
        help="--granularity edge: the paper's greedy (default) or learned edge masks; node "
        "reproduce always learns masks",
    )
    rp.add_argument(
        "--ablate-attention-edges",
        choices=("true", "false"),
        default=None,
        help="--granularity edge: false counts attention edges in s but keeps them, as the "
        "released code's evaluation appears to (default: true)",
    )
    rp.add_argument(
        "--ablation",
        default=None,
        metavar="{" + ",".join(ABLATIONS) + "}",
        help="what replaces a removed node (default: mean; at --granularity edge only zero)",
    )
    rp.add_argument(
        "--random-draws",
        type=int,
        default=None,
        help="random subgraphs per (prompt, size) for the baseline (default 5; at "
        "--granularity edge one)",
    )
    rp.add_argument(
        "--corpus",
        type=Path,
        default=None,
        help="text file for unigram frequencies (default: the prompts' tokens)",
    )
    rp.add_argument(
        "--core-nucleus",
        type=float,
        default=None,
        help="phase rule: the core is the smallest subgraph whose shared nucleus "
        "reaches this %% (default 1: it gives the top-1 token; node only)",
    )
    rp.add_argument(
        "--refined-nucleus",
        type=float,
        default=None,
        help="phase rule: the refinement ends at the smallest subgraph reaching "
        "this %% (default 90; node only: edge uses the paper's fixed bands)",
    )
    rp.add_argument(
        "--small-core",
        type=float,
        default=None,
        help="claim 1a calls a core small below this fraction of the nodes (default 0.1) or, "
        "at --granularity edge, of the edges (default 0.01)",
    )
    _add_run_arguments(rp, "a mask-search option, e.g. --option steps=48")
    return parser


def _add_run_arguments(parser: argparse.ArgumentParser, option_help: str) -> None:
    """How a command that runs a model runs it (the same flags on ``trace`` and
    ``reproduce``): seed, chunking, batching, device, search options, progress, threads."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk-size", type=int, default=16, help="prompts per shard (default 16)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="rows per forward pass (lower it after an out-of-memory error)",
    )
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, ... (default: cuda if available)"
    )
    parser.add_argument(
        "--option",
        action="append",
        type=_parse_option,
        default=[],
        metavar="KEY=VALUE",
        help=f"{option_help} (repeatable; VALUE read as JSON)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--threads",
        type=_parse_threads,
        default=None,
        metavar="N",
        help="torch's CPU threads (intra-op) for this command: fewer than the cores on a "
        "machine shared with other jobs, e.g. --threads 1 (default: torch's own, one per "
        "core); not part of the run, so a resumed run may use another count",
    )


def _add_worker_arguments(tr: argparse.ArgumentParser) -> None:
    tr.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="a static split into N workers (default: SLURM_ARRAY_TASK_COUNT when set); "
        "without it, any number of copies of the same command share the folder",
    )
    tr.add_argument(
        "--worker-index",
        type=int,
        default=None,
        help="this worker's index in [0, N) (default: SLURM_ARRAY_TASK_ID when set)",
    )
    tr.add_argument(
        "--lease-timeout",
        type=float,
        default=None,
        help="seconds without a heartbeat before another worker takes over a dead worker's "
        "shard (default 120)",
    )
    # models larger than one device, and half precision (strace_lens.models.load_model)
    tr.add_argument(
        "--dtype",
        default=None,
        choices=("float32", "bfloat16", "float16"),
        help="parameter dtype of the forwards (default float32); log-probs and KL stay float32",
    )
    tr.add_argument(
        "--device-map",
        default=None,
        help="place a model too big for one device on several: auto, balanced, sequential, "
        "or a JSON map such as '{\"model.layers.0\": 0, ...}' (not with --device)",
    )
    # the launcher (strace_lens/launch.py, submitit): the same command as N workers
    tr.add_argument(
        "--executor",
        default=None,
        choices=("local", "slurm"),
        help="run the command as --workers N workers: local processes (one GPU each when "
        "there are GPUs) or a SLURM job array; needs pip install 'strace-lens[slurm]'",
    )
    tr.add_argument("--workers", type=int, default=None, help="workers for --executor")
    tr.add_argument("--partition", default=None, help="SLURM partition (--executor slurm)")
    tr.add_argument(
        "--time",
        default=None,
        help="time limit per worker: minutes or [D-]HH:MM:SS; timed-out workers are requeued "
        "and resume",
    )
    tr.add_argument("--gpus-per-task", type=int, default=None, help="SLURM GPUs per worker")
    tr.add_argument("--mem", default=None, help="SLURM memory per worker, e.g. 64G")
    tr.add_argument("--cpus-per-task", type=int, default=None, help="SLURM CPUs per worker")
    tr.add_argument(
        "--slurm-extra",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other sbatch option, e.g. --slurm-extra qos=high (repeatable)",
    )
    tr.add_argument(
        "--wait",
        action="store_true",
        help="with --executor slurm: wait for the array, then merge and print the summary "
        "(default: return after submitting; the last worker merges)",
    )


# -- commands ----------------------------------------------------------------------------------
def _device_map(text: str | None) -> str | dict[str, Any] | None:
    if text is None or not text.strip().startswith("{"):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise BadInput(f"--device-map {text!r} is not valid JSON ({err.msg}).") from err
    if not isinstance(value, dict):
        raise BadInput("--device-map takes auto, balanced, sequential or a JSON object.")
    return value


def _load(
    name: str, device: str | None, dtype: str | None = None, device_map: str | None = None
) -> Any:
    from strace_lens.models import load_model
    from strace_lens.tiny_model import TINY_MODEL_NAMES, tiny_model

    placement = _device_map(device_map)  # checked with the other flags (_check_placement)
    if name in TINY_MODEL_NAMES:
        import torch

        return tiny_model(device=device, dtype=getattr(torch, dtype or "float32"))
    return load_model(name, device=device, dtype=dtype, device_map=placement)


def summary_table(result: Any) -> str:
    """Median KL, TV and shared nucleus over prompts, one line per size."""
    return _per_size_table(
        [
            ("size", 6, "d", result.sizes.tolist()),
            ("relative", 9, ".3g", result.relative_sizes.tolist()),
            ("median KL", 10, ".4g", _prompt_medians(result.metrics["kl"])),
            ("median TV", 10, ".4f", _prompt_medians(result.metrics["tv"])),
            ("nucleus %", 10, ".0f", _prompt_medians(result.metrics["nucleus"])),
        ]
    )


def edge_summary_table(result: Any) -> str:
    """Mean edge count, mean TV and top-1 agreement over prompts, one line per size."""
    return _per_size_table(
        [
            ("s", 8, ".3g", list(result.grid)),
            ("mean edges", 11, ".1f", _prompt_means(result.counts)),
            ("mean TV", 8, ".4f", _prompt_means(result.metrics["tv"])),
            ("top-1 %", 8, ".1f", [100 * v for v in _prompt_means(result.metrics["top1"])]),
        ]
    )


def token_summary_table(result: Any) -> str:
    """Mean relative size and unit count, mean KL, TV and top-1 agreement over prompts, one
    line per size."""
    return _per_size_table(
        [
            ("relative", 9, ".3g", result.relative_sizes().mean(0).tolist()),
            ("mean units", 11, ".1f", _prompt_means(result.counts)),
            ("mean KL", 9, ".4g", _prompt_means(result.metrics["kl"])),
            ("mean TV", 8, ".4f", _prompt_means(result.metrics["tv"])),
            ("top-1 %", 8, ".1f", [100 * v for v in _prompt_means(result.metrics["top1"])]),
        ]
    )


def _per_size_table(columns: Sequence[tuple[str, int, str, Sequence[float]]]) -> str:
    """The summary every run prints: a header, then one line per size; each column is
    (header, width, number format, its value at each size)."""
    lines = [" ".join(f"{header:>{width}}" for header, width, _, _ in columns)]
    for j in range(len(columns[0][3])):
        lines.append(" ".join(f"{values[j]:>{width}{fmt}}" for _, width, fmt, values in columns))
    return "\n".join(lines)


def _prompt_means(values: Any) -> list[float]:
    """The mean over prompts (rows) of a (prompt, size) tensor, in float64, per size."""
    return values.double().mean(0).tolist()


def _prompt_medians(values: Any) -> list[float]:
    """The median over prompts of a (prompt, size) tensor, per size (torch's: the lower
    middle value of an even count)."""
    return [float(values[:, j].median()) for j in range(values.shape[1])]


def _with_file_line(message: str, prompt_file: Any) -> str:
    """Point a "Prompt i ..." error at the line of the prompt file it came from."""
    found = re.match(r"Prompt (\d+) ", message)
    if found is None or int(found.group(1)) >= len(prompt_file.lines):
        return message
    return f"{message} (line {prompt_file.lines[int(found.group(1))]} of {prompt_file.path})"


def _check_arguments(args: argparse.Namespace, method: str, per: str = "input") -> None:
    """Check every flag before any work (loading a model takes time): one line, exit 2."""
    from strace_lens.prompts import resolve_prompt_source
    from strace_lens.validate import check_device, check_method_options

    if args.n is not None and args.n < 1:
        raise BadInput(f"--n must be at least 1, got {args.n}.")
    if args.chunk_size < 1:
        raise BadInput(f"--chunk-size must be at least 1, got {args.chunk_size}.")
    if args.batch_size is not None and args.batch_size < 1:
        raise BadInput(f"--batch-size must be at least 1, got {args.batch_size}.")
    if not 0 <= args.seed < 2**63:
        raise BadInput(f"--seed must be between 0 and 2**63 - 1, got {args.seed}.")
    # edge: checked in _edge_options; token takes the node's methods, ablations and options
    node = getattr(args, "granularity", "node") in ("node", "token")
    if node:
        _check_node_choices(args.ablation, method, per)
    if args.out.exists() and not args.out.is_dir():
        raise BadInput(f"--out {args.out} is a file: give a folder (it is created).")
    try:
        resolve_prompt_source(args.prompts)  # a file, or a shipped set's name ("wikitext")
    except FileNotFoundError as err:
        raise BadInput(str(err)) from err
    keys = [key for key, _ in args.option]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise BadInput(f"--option {', '.join(repeated)} is given more than once: give it once.")
    try:
        check_device(args.device, "--device")
        if node:
            check_method_options(method, dict(args.option))
    except (ValueError, TypeError) as err:
        raise BadInput(str(err).replace("option ", "--option ", 1)) from err


def _check_placement(args: argparse.Namespace) -> None:
    from strace_lens.tiny_model import TINY_MODEL_NAMES

    if args.device_map is None:
        return
    _device_map(args.device_map)
    if args.device is not None:
        raise BadInput("Give --device or --device-map, not both.")
    if args.model in TINY_MODEL_NAMES:
        raise BadInput(f"--device-map needs a Hugging Face model, not {args.model}.")


def _check_node_choices(ablation: str | None, method: str, per: str) -> None:
    from strace_lens.types import ABLATIONS, METHODS, PER

    if ablation is not None and ablation not in ABLATIONS:
        raise BadInput(f"Unknown ablation {ablation!r}: use mean or zero.")
    if method not in METHODS:
        raise BadInput(f"Unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    if per not in PER:
        raise BadInput(f"Unknown per={per!r}; choose one of {', '.join(PER)}.")


def _check_worker_arguments(args: argparse.Namespace) -> None:
    from strace_lens.leases import static_share

    _check_placement(args)

    if (args.num_workers is None) != (args.worker_index is None):
        raise BadInput("--num-workers and --worker-index go together: give both or neither.")
    try:
        static_share(args.num_workers, args.worker_index)
    except ValueError as err:
        raise BadInput(
            str(err)
            .replace("num_workers", "--num-workers", 1)
            .replace("worker_index", "--worker-index", 1)
        ) from err
    if args.lease_timeout is not None and not (
        math.isfinite(args.lease_timeout) and args.lease_timeout > 0
    ):
        raise BadInput(
            f"--lease-timeout must be a positive number of seconds, got {args.lease_timeout}."
        )


def cmd_trace(args: argparse.Namespace) -> int:
    from strace_lens.dataset import WorkerShareDone, trace_dataset
    from strace_lens.prompts import read_prompts

    _check_arguments(args, args.method or "mask", args.per)
    _check_worker_arguments(args)
    options = _run_options(args)
    prompt_file = read_prompts(args.prompts, n=args.n)
    if args.executor is not None or args.workers is not None:
        from strace_lens.launch import launch

        def finish(result: Any) -> None:
            _finish(result, args, f"strace-lens trace: {args.model}, {result.n_prompts} prompts")

        # every worker runs main() on this command line, without the launch options
        return launch(args, main, build_parser(), finish)
    model = _load(args.model, args.device, args.dtype, args.device_map)
    if args.device is not None:
        options["device"] = args.device
    if args.lease_timeout is not None:
        options["lease_timeout"] = args.lease_timeout
    try:
        result = trace_dataset(
            model,
            prompt_file,
            args.out,
            chunk_size=args.chunk_size,
            progress=False if args.quiet else None,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            worker_index=args.worker_index,
            **options,
        )
    except WorkerShareDone as err:
        print(f"strace-lens: {_one_line(err)}")
        return EXIT_OK
    except ValueError as err:
        located = _with_file_line(str(err), prompt_file)
        if located == str(err):
            raise
        raise BadInput(located) from err
    title = f"strace-lens trace: {args.model}, {result.n_prompts} prompts"
    _finish(result, args, title, model=model)
    return EXIT_OK


def _run_options(args: argparse.Namespace) -> dict[str, Any]:
    """``trace_dataset``'s options from the flags (checked before any work: exit 2)."""
    granularity = args.granularity
    if granularity in ("node", "token"):
        edge_flags = [
            flag
            for flag, value in (
                ("--ablate-attention-edges", args.ablate_attention_edges),
                ("--tokens", args.tokens),
            )
            if value is not None
        ]
        if edge_flags:
            raise BadInput(f"{' and '.join(edge_flags)} apply at --granularity edge only.")
        options = {
            "sizes": _parse_sizes(args.sizes),
            "method": args.method or "mask",
            "per": args.per,
            "ablation": args.ablation or "mean",
            "seed": args.seed,
            **dict(args.option),
        }
        return options if granularity == "node" else _token_options(options)
    if granularity != "edge":
        raise BadInput(f"Unknown --granularity {granularity!r}: choose node, token or edge.")
    return _edge_options(args)


def _token_options(options: dict[str, Any]) -> dict[str, Any]:
    """The node options at token granularity, checked (a method the token units do not
    support is refused, one line)."""
    from strace_lens.config import TraceConfig

    options = {**options, "granularity": "token"}
    try:
        TraceConfig.from_kwargs(options)
    except (ValueError, TypeError) as err:
        raise BadInput(str(err).replace("granularity='token'", "--granularity token")) from err
    return options


def _edge_options(args: argparse.Namespace) -> dict[str, Any]:
    from strace_lens.edges.config import EdgeTraceConfig

    paper = args.sizes is None or [t.strip().lower() for t in args.sizes] == ["paper"]
    options: dict[str, Any] = {
        "granularity": "edge",
        "method": args.method,
        "sizes": "paper" if paper else _parse_sizes(args.sizes),
        "ablation": args.ablation,
        "per": args.per,
        "seed": args.seed,
        **dict(args.option),
    }
    if args.ablate_attention_edges is not None:
        options["ablate_attention_edges"] = args.ablate_attention_edges
    if args.tokens is not None:
        options["tokens"] = args.tokens
    try:
        EdgeTraceConfig.from_kwargs(options)
    except (ValueError, TypeError) as err:
        raise BadInput(str(err).replace("granularity='edge'", "--granularity edge")) from err
    return options


def _summary_heading(result: Any) -> str:
    """What the summary table is of: the run's granularity and settings."""
    from strace_lens.edges.result import EdgeTraceResult
    from strace_lens.token_trace.result import TokenTraceResult

    opts = result.options
    if isinstance(result, TokenTraceResult):
        return (
            f"token granularity, method={opts.get('method')}, per={opts.get('per')}, "
            f"nested={str(result.nested).lower()}"
        )
    if isinstance(result, EdgeTraceResult):
        return (
            f"edge granularity, method={opts.get('method')}, "
            f"ablate_attention_edges={str(opts.get('ablate_attention_edges')).lower()}, "
            f"tokens={opts.get('tokens')}"
        )
    return f"{result.n_candidates} candidate nodes, method={result.method}, per={result.per}"


def _finish(result: Any, args: argparse.Namespace, title: str, model: Any = None) -> None:
    """Print the summary and write the HTML page (one worker at a time, under a lease).

    ``model``, when at hand, puts the prompt's tokens on the axis of the token-level circuit
    (edge runs) or unit map (token runs).
    """
    from strace_lens.edges.result import EdgeTraceResult
    from strace_lens.token_trace.result import TokenTraceResult

    tokens = isinstance(result, TokenTraceResult)
    edges = isinstance(result, EdgeTraceResult)
    table = token_summary_table if tokens else edge_summary_table if edges else summary_table
    print(f"{result.n_prompts} prompt(s), {_summary_heading(result)}; run folder: {args.out}")
    print(table(result))
    if args.no_html:
        return
    from strace_lens.leases import DEFAULT_LEASE_TIMEOUT, try_acquire, worker_id
    from strace_lens.plot import (  # plotly imports slowly
        edge_report_html,
        report_html,
        token_report_html,
    )

    timeout = getattr(args, "lease_timeout", None) or DEFAULT_LEASE_TIMEOUT
    lease = try_acquire(args.out, "report", worker_id(), timeout)
    if lease is None:  # another worker is writing the same page right now
        print(f"HTML page: {args.out / HTML_PAGE} (written by another worker)")
        return
    notes = shlex.join(["strace-lens", *getattr(args, "argv", [])])
    with lease:
        if edges:
            page = edge_report_html(result, args.out / HTML_PAGE, title, notes, model=model)
        elif tokens:
            page = token_report_html(result, args.out / HTML_PAGE, title, notes, model=model)
        else:
            page = report_html(result, args.out / HTML_PAGE, title=title, notes=notes)
    print(f"HTML page: {page}")


def cmd_merge(args: argparse.Namespace) -> int:
    from strace_lens.dataset import IncompleteRunError, load_run

    if not args.out.is_dir():
        raise BadInput(f"No run folder at {args.out}.")
    try:
        result = load_run(args.out)
    except IncompleteRunError as err:
        print(f"strace-lens: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_FAILED
    _finish(result, args, f"strace-lens run {args.out.name}: {result.n_prompts} prompts")
    return EXIT_OK


def cmd_reproduce(args: argparse.Namespace) -> int:
    import dataclasses

    from strace_lens.reproduce import cli_command
    from strace_lens.reproduce.config import ReproduceConfig
    from strace_lens.reproduce.pipeline import run

    models = args.model or [DEFAULT_REPRODUCE_MODEL]
    if len(models) > 2:
        raise BadInput(f"reproduce takes one or two --model, got {len(models)}.")
    _check_arguments(args, "mask")
    if args.random_draws is not None and args.random_draws < 1:
        raise BadInput(f"--random-draws must be at least 1, got {args.random_draws}.")
    for flag, value, high in (
        ("--core-nucleus", args.core_nucleus, 100.0),
        ("--refined-nucleus", args.refined_nucleus, 100.0),
        ("--small-core", args.small_core, 1.0),
    ):
        if value is not None and not (math.isfinite(value) and 0 < value <= high):
            raise BadInput(f"{flag} must be in (0, {high:g}], got {value}.")
    if args.corpus is not None and not args.corpus.is_file():
        raise BadInput(f"--corpus {args.corpus}: no such file.")
    sizes = _parse_sizes(args.sizes)
    aae = None if args.ablate_attention_edges is None else args.ablate_attention_edges == "true"
    config = ReproduceConfig(
        models=tuple(models),
        prompts_file=args.prompts,
        n=args.n,
        out_dir=args.out,
        granularity=args.granularity,
        method=args.method,
        ablate_attention_edges=aae,
        sizes=None if sizes is None else tuple(sizes),
        seed=args.seed,
        ablation=args.ablation,
        chunk_size=args.chunk_size,
        batch_size=args.batch_size,
        random_draws=args.random_draws,
        corpus=args.corpus,
        core_nucleus=args.core_nucleus,
        refined_nucleus=args.refined_nucleus,
        small_core=args.small_core,
        device=args.device,
        progress=False if args.quiet else None,
        mask_options=dict(args.option),
    )
    config = dataclasses.replace(config, command=cli_command(_reproduce_argv(config)))
    repro = run(config)
    print(repro.claims[["model", "id", "claim", "verdict", "verdict_holm"]].to_string(index=False))
    print(f"Report: {repro.report}")
    return EXIT_OK


def _reproduce_argv(config: Any) -> list[str]:
    """The command as a user would retype it, every setting explicit."""
    argv = ["strace-lens", "reproduce"]
    for name in config.models:
        argv += ["--model", str(name)]
    argv += ["--prompts", str(config.prompts_file), "--n", str(config.n)]
    argv += ["--out", str(config.out_dir)]
    if config.granularity == "edge":
        argv += ["--granularity", "edge", "--method", config.method, "--ablate-attention-edges"]
        argv += [str(config.ablate_attention_edges).lower(), "--seed", str(config.seed)]
        argv += ["--chunk-size", str(config.chunk_size)]
    else:
        if config.sizes is not None:
            argv += ["--sizes", *map(str, config.sizes)]
        argv += ["--seed", str(config.seed), "--ablation", config.ablation]
        argv += ["--chunk-size", str(config.chunk_size)]
        argv += ["--random-draws", str(config.random_draws)]
    if config.corpus is not None:
        argv += ["--corpus", str(config.corpus)]
    if config.granularity == "node":
        argv += ["--core-nucleus", f"{config.core_nucleus:g}"]
        argv += ["--refined-nucleus", f"{config.refined_nucleus:g}"]
    argv += ["--small-core", f"{config.small_core:g}"]
    for key, value in config.mask_options.items():
        argv += ["--option", f"{key}={json.dumps(value)}"]
    return argv


# -- entry point -------------------------------------------------------------------------------
def _one_line(err: object) -> str:
    return " ".join(str(err).split()) or type(err).__name__


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` while a command runs (None: left as
    it is), and the previous count put back when it ends, even on error: ``main`` also runs
    in-process (tests, notebooks), where the count would otherwise outlive the command."""
    if threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (also used by the console script)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    command = {"trace": cmd_trace, "reproduce": cmd_reproduce, "merge": cmd_merge}[args.command]
    debug = os.environ.get("STRACE_LENS_DEBUG") == "1"
    from strace_lens.dataset import TraceOutOfMemoryError

    try:
        args.argv = list(sys.argv[1:] if argv is None else argv)  # shown on the HTML page
        with _torch_threads(getattr(args, "threads", None)):
            return command(args)
    except KeyboardInterrupt:
        print(
            "strace-lens: interrupted; finished shards are kept, run the same command to resume.",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except (TraceOutOfMemoryError, FloatingPointError) as err:
        if debug:
            raise
        print(f"strace-lens: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_FAILED
    except (
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        FileNotFoundError,
        ModuleNotFoundError,
        IsADirectoryError,
        NotADirectoryError,
        FileExistsError,
    ) as err:
        if debug:
            raise
        text = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"strace-lens: error: {_one_line(text)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as err:
        if debug:
            raise
        where = f" ({err.filename})" if err.filename else ""
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            print(
                f"strace-lens: error: the disk is full{where}: free some space and run the same "
                "command again; finished shards are kept and the run resumes.",
                file=sys.stderr,
            )
            return EXIT_FAILED
        if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            print(
                f"strace-lens: error: cannot write or read{where}: {err.strerror}. Give --out a "
                "folder you can write to and a readable --prompts file (finished shards are "
                "kept: the same command resumes).",
                file=sys.stderr,
            )
            return EXIT_BAD_INPUT
        print(f"strace-lens: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
