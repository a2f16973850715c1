"""The paper's greedy s-Trace at edge granularity: fidelity on the paper's grid, and its cost.

For each model, ``--n`` dev prompts (first column of the TSV), tokenised the paper's way
(``strace_lens.edges.tokens``), and both evaluation semantics:

    ablated   every edge outside the subgraph zero-ablated, attention edges included
    kept      attention edges counted in s but never ablated (what the released evaluation
              code appears to do)

The table gives, per relative size s of the paper's grid, the mean number of edges kept, the
mean TV distance to the full model at the last position and the share of prompts whose top-1
next token agrees, for each semantics. The ranking is the same for both (weights come from
the clean run).

Cost, measured side by side in one run: one bare forward of the whole prompt batch (median
of ``--repeats`` runs before the curve and as many after it), then the whole greedy curve for
each semantics: edge weights (one cached clean forward of the batch, then the per-prompt
norms), the best-first ranking, and the 27 grid rows per prompt (the last, the full graph,
is the all-edges reference row: ``evaluate_subgraphs`` runs it once), given as a multiple of
the bare forward. Memory: the bytes of the edge weights, of
the clean-run cache they are computed from, of the masks of one prompt's evaluation batch,
and the process's peak resident set.

``--cost-n`` times only the first that many prompts (the bare forward is of that batch); the
remaining prompts are evaluated afterwards and count in the table only. The note's figures:

    nice -n 10 python benchmarks/edge_greedy.py --n 30 --cost-n 16

The learned ranking (``method="mask"``) against this greedy: benchmarks/edge_learned.py (the
same search as ``trace(granularity="edge", method="mask")``).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import strace_lens as sl
from strace_lens.edges import (
    PAPER_GRID,
    EdgeGraph,
    EdgeMasks,
    edge_counts,
    edge_tokenize,
    evaluate_subgraphs,
    greedy_order,
)
from strace_lens.edges.weights import clean_cache, prompt_weights
from strace_lens.masked_forward import forward_logprobs
from strace_lens.metrics import tv_distance

SEMANTICS = (("ablated", True), ("kept", False))
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext_40_dev.tsv"


def read_prompts(path: Path, n: int) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.split("\t")[0] for line in lines if line.strip()][:n]


def bare_forward_times(model: Any, batch: sl.TokenBatch, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad():
            forward_logprobs(model, batch, [])
        times.append(time.perf_counter() - start)
    return times


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.1f} MiB"


def half_top1_size(top1: torch.Tensor, grid: list[float]) -> str:
    """The smallest size at which at least half of the prompts keep the top-1 token."""
    ok = (top1.mean(0) >= 0.5).tolist()
    return next((f"{s:g}" for s, good in zip(grid, ok) if good), "none")


@dataclass
class Curve:
    """The greedy curve of one batch of prompts, both semantics, and what it cost."""

    graphs: list[EdgeGraph]
    orders: list[torch.Tensor]
    tv: dict[str, torch.Tensor]  # semantics -> [prompt, size]
    top1: dict[str, torch.Tensor]
    seconds: dict[str, float]  # "weights", "greedy", and one entry per semantics
    weight_bytes: int
    cache_bytes: int
    mask_bytes: int


def greedy_curve(model: Any, batch: sl.TokenBatch) -> Curve:
    """Edge weights, greedy ranking and the grid's evaluation rows, each step timed."""
    lengths = (batch.predict_pos + 1).tolist()
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    cache, _ = clean_cache(model, batch)
    with torch.no_grad():
        w_o = model.W_O.detach()
        weights = [prompt_weights(model, w_o, cache, p, n) for p, n in enumerate(lengths)]
    seconds["weights"] = time.perf_counter() - start
    cache_bytes = sum(t.numel() * t.element_size() for layer in cache for t in layer.values())
    del cache
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)

    start = time.perf_counter()
    graphs = [EdgeGraph.from_model(model, n) for n in lengths]
    orders = [greedy_order(g, w) for g, w in zip(graphs, weights)]
    seconds["greedy"] = time.perf_counter() - start

    tv: dict[str, torch.Tensor] = {}
    top1: dict[str, torch.Tensor] = {}
    mask_bytes = 0
    rows = len(PAPER_GRID)  # the full graph is the reference row
    for label, ablate in SEMANTICS:
        start = time.perf_counter()
        tvs, top1s = [], []
        for p, (graph, order) in enumerate(zip(graphs, orders)):
            counts = edge_counts(PAPER_GRID, graph.n_edges)
            row = batch.select([p]).trimmed()
            logp_sub, logp_full = evaluate_subgraphs(
                model,
                row,
                graph,
                [order[: int(k)] for k in counts],
                ablate_attention_edges=ablate,
                max_rows=rows,
            )
            tvs.append(tv_distance(logp_full.expand_as(logp_sub), logp_sub))
            top1s.append((logp_sub.argmax(-1) == logp_full.argmax(-1)).float())
        seconds[label] = time.perf_counter() - start
        tv[label], top1[label] = torch.stack(tvs), torch.stack(top1s)
        mask_bytes = max(EdgeMasks.full(g, rows).nbytes() for g in graphs)
    return Curve(graphs, orders, tv, top1, seconds, weight_bytes, cache_bytes, mask_bytes)


def print_table(name: str, curves: list[Curve]) -> None:
    """Mean edges, TV and top-1 agreement per size over every prompt of ``curves``."""
    graphs = [g for c in curves for g in c.graphs]
    counts = torch.stack([edge_counts(PAPER_GRID, g.n_edges) for g in graphs]).double()
    tv = {label: torch.cat([c.tv[label] for c in curves]) for label, _ in SEMANTICS}
    top1 = {label: torch.cat([c.top1[label] for c in curves]) for label, _ in SEMANTICS}
    n_edges = [g.n_edges for g in graphs]
    n_pos = [g.n_pos for g in graphs]
    print(
        f"\n## {name}: {len(graphs)} prompts, {min(n_pos)}-{max(n_pos)} tokens, "
        f"E = {min(n_edges)}-{max(n_edges)} edges per prompt"
    )
    print(f"{'s':>8} {'edges':>9} | {'TV ablated':>10} {'top1':>5} | {'TV kept':>8} {'top1':>5}")
    for i, s in enumerate(PAPER_GRID):
        label = "full" if s == 1.0 else f"{s:g}"
        print(
            f"{label:>8} {counts[:, i].mean():9.1f} | {tv['ablated'][:, i].mean():10.4f} "
            f"{top1['ablated'][:, i].mean():5.2f} | {tv['kept'][:, i].mean():8.4f} "
            f"{top1['kept'][:, i].mean():5.2f}"
        )
    for label, _ in SEMANTICS:
        print(
            f"half of the prompts keep top-1 ({label}) from s = "
            f"{half_top1_size(top1[label], list(PAPER_GRID))}"
        )


def print_cost(name: str, curve: Curve, bare: float) -> None:
    """The timed curve's steps as multiples of the bare forward of the same batch."""
    n = len(curve.graphs)
    sec = curve.seconds
    print(
        f"\n## {name}: cost on the first {n} prompts (bare forward of the {n}-prompt batch: "
        f"{bare:.3f} s, median):"
    )
    t_weights, t_greedy = sec["weights"], sec["greedy"]
    print(f"  edge weights (clean forward + norms)  {t_weights:8.2f} s  {t_weights / bare:7.1f} x")
    print(
        f"  greedy ranking                        {t_greedy:8.2f} s  {t_greedy / bare:7.1f} x"
        f"  ({t_greedy / n:.2f} s per prompt)"
    )
    for label, _ in SEMANTICS:
        total = t_weights + t_greedy + sec[label]
        print(
            f"  evaluation, {label:<8} ({len(PAPER_GRID)} rows/prompt)  {sec[label]:8.2f} s  "
            f"{sec[label] / bare:7.1f} x   -> whole curve {total:.2f} s = {total / bare:.1f} x"
        )


def run_model(
    name: str,
    prompts: list[str],
    cost_n: int,
    repeats: int,
) -> None:
    """The table over every prompt; the cost on the first ``cost_n``, timed side by side
    with the bare forward of that batch."""
    model = sl.load_model(name, device="cpu")
    batch = edge_tokenize(model, prompts[:cost_n])
    with torch.no_grad():
        forward_logprobs(model, batch, [])  # warm-up: the first call initialises lazily
    # the bare forward is timed before and after the curve, and the median of both taken, so
    # that a slow spell on this shared machine weighs on both sides of the ratio
    bare_times = bare_forward_times(model, batch, repeats)
    timed = greedy_curve(model, batch)
    bare = statistics.median(bare_times + bare_forward_times(model, batch, repeats))
    print_cost(name, timed, bare)
    curves = [timed]
    if len(prompts) > cost_n:  # the remaining prompts count in the table only
        print_table(f"{name} (the timed prompts only)", curves)
        curves.append(greedy_curve(model, edge_tokenize(model, prompts[cost_n:])))
    print_table(name, curves)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        f"memory: edge weights {mib(timed.weight_bytes)} (float64, {cost_n} prompts), clean-run "
        f"cache {mib(timed.cache_bytes)}, masks of one prompt's {len(PAPER_GRID)} rows "
        f"{mib(timed.mask_bytes)} (float32, longest prompt), process peak RSS {mib(peak)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", default=["smollm2-135m", "gemma-3-270m"])
    parser.add_argument("--prompts", type=Path, default=DATA, help="TSV; first column")
    parser.add_argument("--n", type=int, default=30, help="number of prompts (the table)")
    parser.add_argument(
        "--cost-n",
        type=int,
        default=None,
        help="the first this many prompts are timed (default: --n)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="bare forward repeats")
    args = parser.parse_args()
    torch.manual_seed(0)
    prompts = read_prompts(args.prompts, args.n)
    cost_n = len(prompts) if args.cost_n is None else args.cost_n
    if not 1 <= cost_n <= len(prompts):
        raise SystemExit(
            f"--cost-n must lie in [1, {len(prompts)}] (the prompts read), got {cost_n}."
        )
    print(
        f"edge greedy benchmark: {len(prompts)} prompts from {args.prompts}, torch threads "
        f"{torch.get_num_threads()}"
    )
    for name in args.model:
        run_model(name, prompts, cost_n, args.repeats)


if __name__ == "__main__":
    main()
