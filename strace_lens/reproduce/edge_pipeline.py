"""``reproduce`` at edge granularity: trace (resumable), analyse, judge, write the report.

Per model, two run folders, each one ``trace_dataset`` call with exactly these arguments (so
a folder traced by the same direct call, e.g. a long run started by hand, is resumed and
never retraced)::

    trace_dataset(model, prompts, OUT/runs/<slug>/<method>, chunk_size=..., progress=...,
                  batch_size=..., granularity="edge", method=<method>, sizes="paper",
                  ablate_attention_edges=<bool>, seed=<seed>)

and the random control ``OUT/runs/<slug>/random``, the same call with ``method="random"``.
No targets (they are not recorded at edge granularity); for ``method="mask"`` the learned
search's options only when the user gives some (``mask_search=``). When the prompts have
true next tokens (a 6-column TSV), claim 2b's loss is read afterwards by one clean forward
of the model per chunk of prompts (:func:`strace_lens.edges.edge_target_loss`): the run
folders, and with them their identity, stay as traced.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from strace_lens import analysis as an
from strace_lens.atomic import refuse_links, sha256_file, write_text
from strace_lens.edges.result import EdgeTraceResult
from strace_lens.edges.target_loss import edge_target_loss
from strace_lens.models import model_identity
from strace_lens.reproduce.claims import with_multiplicity
from strace_lens.reproduce.config import ReproduceConfig
from strace_lens.reproduce.edge_claims import (
    EdgeModelRun,
    EdgeReproduction,
    analyse_edges,
    edge_agreement_claims,
    edge_claims_of,
)
from strace_lens.reproduce.edge_markdown import figures_path, write_edge_report
from strace_lens.reproduce.markdown import git_commit, slug_of
from strace_lens.reproduce.runs import load_spec, shard_seconds, shard_table


def trace_edge_run(
    model: Any, prompts: list[str], folder: Path, config: ReproduceConfig, method: str
) -> EdgeTraceResult:
    """One edge run folder through ``trace_dataset`` (module docstring: the exact call)."""
    from strace_lens.dataset import trace_dataset

    result = trace_dataset(
        model,
        prompts,
        folder,
        chunk_size=config.chunk_size,
        progress=config.progress,
        batch_size=config.batch_size,
        **config.edge_trace_options(method),
    )
    if not isinstance(result, EdgeTraceResult):  # trace_dataset returns what it traced
        raise TypeError(f"{folder} holds a node-level run, not an edge run.")
    return result


def _trace_model(
    config: ReproduceConfig, spec: Any, prompts: list[str], out: Path, taken: list[str]
) -> tuple[str, Any, dict[str, Any], EdgeTraceResult, EdgeTraceResult, dict[str, float]]:
    """Load (when named) and trace one model: its name, model, identity, traced family,
    random control and timings."""
    loaded = load_spec(spec, config.device) if isinstance(spec, str) else spec
    identity = model_identity(loaded)
    name = str(spec if isinstance(spec, str) else identity.get("name") or "model")
    if slug_of(name) in taken:
        name = f"{name} (2)"  # the same model twice: keep both runs
    run_dir = out / "runs" / slug_of(name)
    method = str(config.method)
    for sub in (method, "random"):  # before hours of tracing: no link inside `out`
        refuse_links(out, run_dir / sub)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    traced = trace_edge_run(loaded, prompts, run_dir / method, config, method)
    seconds["traced"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    random = trace_edge_run(loaded, prompts, run_dir / "random", config, "random")
    seconds["random"] = time.perf_counter() - t0
    return name, loaded, identity, traced, random, seconds


def run_edge(config: ReproduceConfig) -> EdgeReproduction:
    """The edge-granularity reproduction of a checked configuration."""
    from strace_lens import plot
    from strace_lens.prompts import read_prompts

    started = time.perf_counter()
    out = Path(config.out_dir)
    pfile = read_prompts(config.prompts_file, config.n)
    prompts = pfile.prompts
    small_core = config.number("small_core")
    runs: list[EdgeModelRun] = []
    for spec in config.models:
        name, loaded, identity, traced, random, seconds = _trace_model(
            config, spec, prompts, out, [slug_of(r.name) for r in runs]
        )
        counts = an.token_counts(loaded, config.corpus, prompts)
        loss = None
        if pfile.targets is not None:  # 2b: the full model's loss, the runs left as traced
            loss = edge_target_loss(loaded, traced, pfile.targets, config.chunk_size)
        comp, tables = analyse_edges(
            traced, random, counts, config.n_boot, config.seed, small_core, loss
        )
        run_dir = out / "runs" / slug_of(name)
        shards = shard_table(
            {str(config.method): run_dir / str(config.method), "random": run_dir / "random"}
        )
        tables["shards"] = shards
        seconds["traced_shards"] = shard_seconds(shards, str(config.method))
        seconds["random_shards"] = shard_seconds(shards, "random")
        claims = edge_claims_of(
            tables, name, config.n_boot, config.seed, config.min_prompts, small_core
        )
        for key, frame in tables.items():
            write_text(
                out / "tables" / slug_of(name) / f"{key}.csv", frame.to_csv(index=False), out
            )
        runs.append(EdgeModelRun(name, identity, traced, random, comp, tables, claims, seconds))
        # the project's edge page: fidelity (traced and random), composition, token circuit;
        # one page per model, so each circuit's axis is decoded by that model's tokenizer
        page = out / figures_path(name)
        refuse_links(out, page)
        plot.edge_report_html(
            {str(config.method): traced, "random": random},
            page,
            title=f"s-Trace reproduction, edge granularity: {name}",
            notes=config.command or config.python_call(),
            model=loaded,
        )

    agreement = None
    all_claims = pd.concat([r.claims for r in runs], ignore_index=True)
    if len(runs) == 2:
        agreement, extra = edge_agreement_claims(
            runs, config.n_boot, config.seed, config.min_prompts
        )
        all_claims = pd.concat([all_claims, pd.DataFrame(extra)], ignore_index=True)
        write_text(out / "tables" / "agreement_controls.csv", agreement.to_csv(index=False), out)
    all_claims = with_multiplicity(all_claims)  # one Holm family over the whole report
    write_text(out / "claims.csv", all_claims.to_csv(index=False), out)

    settings = _settings(config, runs, pfile, started)
    figures = [out / figures_path(r.name) for r in runs]
    repro = EdgeReproduction(out, out / "report.md", runs, all_claims, agreement, settings, figures)
    write_edge_report(repro, settings)
    return repro


def _settings(
    config: ReproduceConfig, runs: list[EdgeModelRun], pfile: Any, started: float
) -> dict[str, Any]:
    from strace_lens import __version__

    commit = git_commit()
    first = runs[0].traced
    search = first.options.get("mask_search")
    return {
        "models": ", ".join(
            f"{r.name} ({r.traced.n_layers} blocks x {r.traced.n_heads} heads)" for r in runs
        ),
        "prompts": f"first {len(pfile.prompts)} prompts of `{config.prompts_file}` (lines "
        f"{pfile.lines[0]}-{pfile.lines[-1]}; sha256 {sha256_file(pfile.path)[:16]}...)"
        + (
            "; loss (2b) on the TSV's next-token column, one clean forward of the full model"
            if pfile.targets is not None
            else "; no targets: no loss (2b not measured)"
        ),
        "granularity": "edge (the paper's token-level edges; zero ablation)",
        "method": f"{config.method} (nested across sizes)"
        + (f"; search {json.dumps(search, default=str)}" if search else ""),
        "ablate_attention_edges": config.ablate_attention_edges,
        "token convention": first.options.get("tokens", "paper"),
        "sizes": f"the paper's grid, {len(first.grid)} relative sizes {first.grid[0]:g} to 1",
        "random control": "one uniform random edge subgraph per (prompt, size), same edge counts",
        "seed": config.seed,
        "unigram corpus": str(config.corpus) if config.corpus else "the prompts' own tokens",
        "small_core": config.number("small_core"),
        "min_prompts": config.min_prompts,
        "bootstrap resamples": config.n_boot,
        "strace-lens version": __version__ + (f" (git {commit})" if commit else ""),
        "command": f"`{config.command or config.python_call()}`",
        "wall time of this invocation": f"{time.perf_counter() - started:.0f} s",
        # what the wall time ran on: `--threads`, else torch's own count (the shards record
        # each chunk's in timing.json)
        "torch CPU threads of this invocation": torch.get_num_threads(),
    }


__all__ = ["run_edge", "trace_edge_run"]
