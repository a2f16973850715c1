"""``reproduce``: trace (resumable), analyse, judge the claims and write the report."""

from __future__ import annotations

import json
import os
import shlex
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from strace_lens import analysis as an
from strace_lens.ablation import MeanAblation
from strace_lens.atomic import refuse_links, sha256_file, write_text
from strace_lens.models import model_identity
from strace_lens.reproduce.claims import (
    MIN_PROMPTS,
    ModelRun,
    Reproduction,
    agreement_claims,
    analyse,
    claims_of,
    with_multiplicity,
)
from strace_lens.reproduce.config import ReproduceConfig, models_of, sizes_of
from strace_lens.reproduce.edge_claims import EdgeReproduction
from strace_lens.reproduce.edge_pipeline import run_edge
from strace_lens.reproduce.markdown import git_commit, slug_of, write_report
from strace_lens.reproduce.runs import load_spec, shard_seconds, shard_table
from strace_lens.result import TraceResult
from strace_lens.types import AblationName, Granularity, MethodName


def _trace_run(
    model: Any,
    prompts: list[str],
    targets: list[str] | None,
    folder: Path,
    chunk_size: int,
    progress: bool | None,
    batch_size: int | None,
    options: dict[str, Any],
) -> TraceResult:
    """Trace through ``trace_dataset``: sharded, resumable, refused if the options changed."""
    from strace_lens.dataset import trace_dataset

    result = trace_dataset(
        model,
        prompts,
        folder,
        chunk_size=chunk_size,
        progress=progress,
        targets=targets,
        batch_size=batch_size,
        **options,
    )
    if not isinstance(result, TraceResult):  # the claims are read off node-level results
        raise TypeError("reproduce traces at node granularity; an edge run cannot be judged.")
    return result


# -- the entry point -------------------------------------------------------------------------
def reproduce(
    model: str | Any | Sequence[str | Any],
    prompts_file: str | os.PathLike[str],
    n: int = 200,
    out_dir: str | os.PathLike[str] = "reproduction",
    sizes: Sequence[int | float] | None = None,
    seed: int = 0,
    *,
    granularity: Granularity = "node",
    method: MethodName | None = None,
    ablate_attention_edges: bool | None = None,
    ablation: AblationName | None = None,
    chunk_size: int = 16,
    batch_size: int | None = None,
    random_draws: int | None = None,
    corpus: str | os.PathLike[str] | None = None,
    core_nucleus: float | None = None,
    refined_nucleus: float | None = None,
    small_core: float | None = None,
    min_prompts: int = MIN_PROMPTS,
    n_boot: int = 2000,
    device: str | None = None,
    progress: bool | None = None,
    command: str | None = None,
    **mask_options: Any,
) -> Reproduction | EdgeReproduction:
    """Trace the first ``n`` prompts of a file, run every analysis, and write ``report.md``.

    Args:
        model: an embedded model name (``"gemma-3-270m"``, ``"smollm2-135m"``), a local
            folder, a loaded TransformerLens model, or a list of two of these (the report then
            adds the cross-model agreement of per-prompt density).
        prompts_file: a plain-text (one prompt a line) or 6-column TSV prompt file; with a TSV
            the true next token (column 6) gives the loss on the true next word (node only).
        n: how many prompts, from the top of the file.
        out_dir: where runs (``runs/<model>/<method>``, ``runs/<model>/random``), tables
            (``tables/<model>/*.csv``, ``claims.csv``) and ``report.md`` go. Calling again
            with the same arguments resumes the traces and rewrites tables and report.
        sizes: node counts or relative sizes (default: the trace's log grid, 1 to N). Node
            only: edge runs use the paper's grid.
        seed: seeds the traces, the random baseline and every bootstrap.
        granularity: ``"node"`` (heads and MLPs, learned masks, the default) or ``"edge"``
            (the paper's token-level edges; :mod:`strace_lens.reproduce.edge_pipeline`).
        method: edge only: ``"greedy"`` (the paper's, default) or ``"mask"`` (learned).
        ablate_attention_edges: edge only: False counts attention edges in s but keeps them
            (default True).
        ablation: node: "mean" (over the ``n`` prompts, shared by both traces; default) or
            "zero"; edge: zero only.
        chunk_size: prompts per saved shard (what an interruption can lose).
        batch_size: rows per forward pass (default: the trace's own); not part of a run's
            identity, so it may change when resuming (e.g. after an out-of-memory error).
        random_draws: node only: random subgraphs per (prompt, size) for the baseline
            (default 5; the edge control draws one).
        corpus: reference text file for unigram frequencies (default: the prompts' tokens).
        core_nucleus, refined_nucleus: node only: the phase rule (default 1 and 90; see
            :func:`strace_lens.analysis.phases`).
        small_core: claim 1a calls a core small below this relative size (default: 0.1 of
            the nodes, 1e-2 of the edges); claim 3 counts every traced size up to it as sparse.
        min_prompts: below this many contributing prompts every verdict is inconclusive.
        n_boot: bootstrap resamples for every interval.
        device: where to load a model given by name (default: CUDA when available).
        progress: progress bars (default: when stderr is a terminal).
        command: the command line to record in the report (the CLI passes its own);
            default: the equivalent Python call.
        **mask_options: options of the learned-mask search (``steps``, ``lr``, ...; at edge
            granularity the fields of :class:`strace_lens.edges.MaskSearch`, method "mask").

    Options of one granularity given at the other are refused (:class:`ReproduceConfig`).
    """
    config = ReproduceConfig(
        models=models_of(model),
        prompts_file=prompts_file,
        n=n,
        out_dir=out_dir,
        granularity=granularity,
        method=method,
        ablate_attention_edges=ablate_attention_edges,
        sizes=sizes_of(sizes),
        seed=seed,
        ablation=ablation,
        chunk_size=chunk_size,
        batch_size=batch_size,
        random_draws=random_draws,
        corpus=corpus,
        core_nucleus=core_nucleus,
        refined_nucleus=refined_nucleus,
        small_core=small_core,
        min_prompts=min_prompts,
        n_boot=n_boot,
        device=device,
        progress=progress,
        command=command,
        mask_options=mask_options,
    )
    return run(config)


def run(config: ReproduceConfig) -> Reproduction | EdgeReproduction:
    """Run a checked configuration: what ``reproduce`` and ``strace-lens reproduce`` call."""
    if config.granularity == "edge":
        return run_edge(config)
    return _run_node(config)


def _run_node(config: ReproduceConfig) -> Reproduction:
    """The node-level reproduction: learned masks and random subgraphs of heads and MLPs."""
    from strace_lens import __version__
    from strace_lens.prompts import read_prompts

    started = time.perf_counter()
    models = list(config.models)
    prompts_file, n, seed, sizes = config.prompts_file, config.n, config.seed, config.sizes
    ablation, chunk_size = config.ablation, config.chunk_size
    batch_size, progress, random_draws = config.batch_size, config.progress, config.random_draws
    corpus, core_nucleus = config.corpus, config.number("core_nucleus")
    refined_nucleus, small_core = config.number("refined_nucleus"), config.number("small_core")
    min_prompts, n_boot, mask_options = config.min_prompts, config.n_boot, config.mask_options
    out = Path(config.out_dir)
    pfile = read_prompts(prompts_file, n)
    prompts, targets = pfile.prompts, pfile.targets
    command = config.command if config.command is not None else config.python_call()
    runs: list[ModelRun] = []
    for spec in models:
        loaded = load_spec(spec, config.device) if isinstance(spec, str) else spec
        identity = model_identity(loaded)
        name = spec if isinstance(spec, str) else identity.get("name") or "model"
        slug = slug_of(str(name))
        if any(slug_of(r.name) == slug for r in runs):
            name, slug = f"{name} (2)", f"{slug}-2"  # the same model twice: keep both runs
        run_dir = out / "runs" / slug
        for sub in ("mask", "random"):  # before hours of tracing: no link inside `out`
            refuse_links(out, run_dir / sub)
        common = {"sizes": list(sizes) if sizes is not None else None, "seed": seed, "per": "input"}
        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        mask = _trace_run(
            loaded,
            prompts,
            targets,
            run_dir / "mask",
            chunk_size,
            progress,
            batch_size,
            {**common, "method": "mask", "ablation": ablation, **mask_options},
        )
        seconds["mask"] = time.perf_counter() - t0
        # the random baseline uses the very ablation the learned masks were scored with
        shared = run_dir / "mask" / "ablation.safetensors"
        rand_ablation: Any = MeanAblation.load(shared) if shared.exists() else ablation
        t0 = time.perf_counter()
        random = _trace_run(
            loaded,
            prompts,
            targets,
            run_dir / "random",
            chunk_size,
            progress,
            batch_size,
            # no inverse for random subgraphs: the inverse of a random s-subset is a random
            # (N - s)-subset, already on the random curve; skipping it halves the baseline's cost
            {
                **common,
                "sizes": mask.sizes.tolist(),
                "method": "random",
                "ablation": rand_ablation,
                "draws": random_draws,
                "inverse": False,
            },
        )
        seconds["random"] = time.perf_counter() - t0
        counts = an.token_counts(loaded, corpus, prompts)
        tables = analyse(mask, random, counts, core_nucleus, refined_nucleus, n_boot, seed)
        shards = shard_table({"mask": run_dir / "mask", "random": run_dir / "random"})
        tables["shards"] = shards
        seconds["mask_shards"] = shard_seconds(shards, "mask")
        seconds["random_shards"] = shard_seconds(shards, "random")
        claims = claims_of(
            mask, tables, counts, str(name), n_boot, seed, min_prompts, small_core, random=random
        )
        for key, frame in tables.items():
            write_text(out / "tables" / slug / f"{key}.csv", frame.to_csv(index=False), out)
        runs.append(ModelRun(str(name), identity, mask, random, tables, claims, seconds))

    agreement = agreement_table = None
    all_claims = pd.concat([r.claims for r in runs], ignore_index=True)
    if len(runs) == 2:
        agreement, agreement_table, extra = agreement_claims(runs, n_boot, seed, min_prompts)
        all_claims = pd.concat([all_claims, pd.DataFrame(extra)], ignore_index=True)
        write_text(out / "tables" / "agreement.csv", agreement.to_csv(index=False), out)
        write_text(
            out / "tables" / "agreement_controls.csv", agreement_table.to_csv(index=False), out
        )
    # the multiplicity correction runs over every judged row of the report, both models' too
    all_claims = with_multiplicity(all_claims)
    write_text(out / "claims.csv", all_claims.to_csv(index=False), out)

    first = runs[0].mask
    commit = git_commit()
    settings: dict[str, Any] = {
        "models": ", ".join(
            f"{r.name} ({r.identity['n_layers']} layers x {r.identity['n_heads']} heads)"
            for r in runs
        ),
        "prompts": f"first {len(prompts)} prompts of `{prompts_file}` (lines "
        f"{pfile.lines[0]}-{pfile.lines[-1]}; sha256 {sha256_file(pfile.path)[:16]}...)"
        + ("; loss uses the TSV's next-token column" if targets else "; no targets: no loss"),
        "ablation": json.dumps(first.options.get("ablation", ablation), default=str),
        "search": "learned masks per input, nested across sizes; options "
        + (
            json.dumps(first.options["method_options"], default=str)
            if first.options.get("method_options")
            else "the defaults of strace_lens.trace"
        ),
        "random baseline": f"{random_draws} random subgraphs per (prompt, size), metrics averaged",
        "sizes": ", ".join(
            f"{r.name}: {r.mask.sizes.tolist()} of {r.mask.n_candidates}" for r in runs
        ),
        "seed": seed,
        "unigram corpus": str(corpus) if corpus else "the prompts' own tokens",
        "core_nucleus": core_nucleus,
        "refined_nucleus": refined_nucleus,
        "small_core": small_core,
        "min_prompts": min_prompts,
        "bootstrap resamples": n_boot,
        "strace-lens version": __version__ + (f" (git {commit})" if commit else ""),
        "command": f"`{command}`",
        "wall time of this invocation": f"{time.perf_counter() - started:.0f} s",
        # what the wall time ran on: `--threads`, else torch's own count (the shards record
        # each chunk's in timing.json)
        "torch CPU threads of this invocation": torch.get_num_threads(),
    }
    repro = Reproduction(
        out, out / "report.md", runs, all_claims, agreement, settings, agreement_table
    )
    write_report(repro, settings)
    return repro


def cli_command(argv: Sequence[str]) -> str:
    """The command line as typed (quoted so it can be pasted back into a shell)."""
    return " ".join(shlex.quote(a) for a in argv)


__all__ = ["cli_command", "reproduce", "run"]
