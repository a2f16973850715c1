"""How good are the learned subgraphs? Optimality gap against exhaustive search, and medians
against every baseline.

Part 1 (optimality): ``--n-candidates`` nodes spread evenly over the node list are the only
ones the search may drop (all others kept); on ``--n-prompts`` dev prompts (cut to their last
``--words`` words), for every size 1 .. n_candidates - 1, zero and mean ablation, per input
and per dataset, the learned subgraph's KL is compared with the exhaustive optimum. A pair
passes when KL_mask <= 1.05 * KL_opt or KL_mask - KL_opt <= 1e-4.

Part 2 (baselines): on ``--n-baseline-prompts`` dev prompts, per input, the default size
grid over the whole graph: median KL of each method at each size ("forward" stops at
``--forward-max`` nodes).

    python benchmarks/strace_quality.py --models smollm2-135m gemma-3-270m

``--granularity edge`` (the paper's token-level edge graph; whole prompts unless ``--words``
is given): part 1 has no analogue on a real model (tens of thousands of edges per prompt:
no exhaustive optimum; the tiny-model exhaustive check is tests/test_edge_learned.py's) and
is skipped. Part 2, for each ``--ablate-attention-edges`` setting (default both): on the
paper's grid from ``--min-size`` (default 1e-4), per size, the median TV of the learned
nested masks (``method="mask"``) against the paper's greedy (the reference), the share of
prompts keeping the full model's top-1 token and how many prompts are lower / higher by
more than ``--tol`` (edge_run_compare.py's table); the medians lower / equal / higher and
the smallest size at which half of the prompts keep top-1; then the median KL of both and
uniform random edge subsets as a floor (TV, KL, top-1). ``--mask-options`` are the edge
search's (``MaskSearch`` fields, e.g. ``{"steps": 4}``).

``--granularity token`` (every head and MLP at every position; whole prompts unless
``--words``): part 1 is skipped as well (the tiny-model exhaustive checks are
tests/test_token_granularity.py's); part 2 is benchmarks/token_curve.py's table, the default
learned token curve against random subsets of the same sizes, for each of ``--ablations``.

    nice -n 10 python benchmarks/strace_quality.py --models smollm2-135m --granularity edge \
        --n-baseline-prompts 4 --threads 1
    nice -n 10 python benchmarks/strace_quality.py --models smollm2-135m --granularity token \
        --n-baseline-prompts 4 --words 8 --ablations zero --threads 1
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from edge_run_compare import compare_sizes
from strace_speed import true_false
from token_curve import TokenCurves, print_token_table, token_curves

import strace_lens as sl
from strace_lens.ablation import resolve_ablation
from strace_lens.edges import PAPER_GRID, EdgeTraceResult
from strace_lens.hygiene import model_untouched
from strace_lens.masked_forward import forward_logprobs
from strace_lens.models import model_identity
from strace_lens.search.baselines import exhaustive_table
from strace_lens.search.local_search import CHAIN_EPS
from strace_lens.search.objective import SubgraphObjective
from strace_lens.trace import resolve_candidates

DATA = Path(__file__).resolve().parents[1] / "strace_lens" / "data" / "wikitext_40_dev.tsv"
GRANULARITIES = ("node", "edge", "token")
#: the edge methods of part 2, the learned first, the greedy (the reference) second
EDGE_METHODS = {"learned": "mask", "greedy": "greedy", "random": "random"}
NO_OPTIMALITY = {
    "edge": "part 1 (optimality against exhaustive search) has no edge analogue on a real "
    "model (no exhaustive optimum over its edges): skipped; the tiny-model exhaustive check "
    "is tests/test_edge_learned.py's",
    "token": "part 1 (optimality against exhaustive search) is measured on whole nodes only: "
    "skipped at token granularity; the tiny-model exhaustive checks are "
    "tests/test_token_granularity.py's",
}


def dev_prompts(n: int, words: int | None) -> list[str]:
    lines = DATA.read_text(encoding="utf-8").splitlines()[:n]
    prompts = [line.split("\t")[0] for line in lines]
    if words:
        prompts = [" ".join(p.split(" ")[-words:]) for p in prompts]
    return prompts


def spread_candidates(graph: sl.NodeGraph, k: int) -> list[str]:
    idx = torch.linspace(0, len(graph) - 1, k).round().long().tolist()
    return [graph.names[i] for i in idx]


def exhaustive_tables(
    model: object,
    prompts: list[str],
    cands: list[str],
    sizes: list[int],
    ablation: str,
    cache: Path | None,
) -> list[torch.Tensor]:
    """KL ``[prompt, subset]`` of every subset of each size (itertools order), cached on disk.

    The cache file is keyed by model, ablation, prompts and candidates, so a rerun (e.g. after
    changing the search) skips the expensive part; delete the folder to recompute.
    """
    key = hashlib.sha256(
        json.dumps([model_identity(model), ablation, prompts, cands, sizes]).encode()
    ).hexdigest()[:16]
    path = cache / f"exhaustive-{key}.pt" if cache is not None else None
    if path is not None and path.exists():
        return list(torch.load(path))
    graph = sl.NodeGraph.from_model(model)
    batch = sl.tokenize(model, prompts)
    abl = resolve_ablation(ablation, model, prompts, progress=False)
    cand = resolve_candidates(graph, None, cands)
    with model_untouched(model):
        logp_full = forward_logprobs(model, batch, [])
        objective = SubgraphObjective(model, graph, batch, logp_full, abl, cand)
        tables = [exhaustive_table(objective, s)[1] for s in sizes]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(tables, tmp)
        tmp.replace(path)
    return tables


def exhaustive_optima(
    model: object,
    prompts: list[str],
    cands: list[str],
    sizes: list[int],
    ablation: str,
    cache: Path | None = None,
) -> dict[str, Any]:
    """Optimal KL per (prompt, size) and per size for the dataset, from one exhaustive table,
    and the best pass rate any nested family could reach."""
    tables = exhaustive_tables(model, prompts, cands, sizes, ablation, cache)
    optima = {
        "input": torch.stack([t.min(-1).values for t in tables], -1),  # [P, S]
        "dataset": torch.stack([t.mean(0).min() for t in tables])[None],  # [1, S]
    }
    n_c = len(cands)
    return {
        **optima,
        "nested_bound": {
            per: best_nested_pass_rate(tables, optima[per], n_c, per) for per in optima
        },
        "objective_optimal": {
            per: objective_optimal_family(tables, optima[per], n_c, per) for per in optima
        },
    }


def _subset_tables(
    tables: list[torch.Tensor], n_c: int, per: str
) -> tuple[list[torch.Tensor], list[dict[int, int]]]:
    """The tables per group (a prompt, or the mean over prompts for a dataset), and for each
    size the column of every subset, keyed by its bit set of candidates."""
    values = [t if per == "input" else t.mean(0, keepdim=True) for t in tables]
    index = [
        {
            sum(1 << c for c in combo): i
            for i, combo in enumerate(itertools.combinations(range(n_c), s))
        }
        for s in range(1, len(tables) + 1)
    ]
    return values, index


def _passes(kl: float, opt: float) -> bool:
    """A pair passes within 5 % of the optimum or within 1e-4 nats of it."""
    return kl <= 1.05 * opt or kl - opt <= 1e-4


def best_nested_pass_rate(
    tables: list[torch.Tensor], optima: torch.Tensor, n_c: int, per: str
) -> float:
    """The pass rate of the best possible nested family (most passing sizes), by dynamic
    programming over subsets: what nesting itself costs, whatever the search."""
    values, index = _subset_tables(tables, n_c, per)
    passed = 0
    for g in range(values[0].shape[0]):
        best: dict[int, int] = {0: 0}
        for j, (table, idx) in enumerate(zip(values, index)):
            opt = float(optima[g, j])
            nxt = {}
            for bits, i in idx.items():
                ok = int(_passes(float(table[g, i]), opt))
                prev = max(best[bits & ~(1 << c)] for c in range(n_c) if bits >> c & 1)
                nxt[bits] = prev + ok
            best = nxt
        passed += max(best.values())
    return passed / (values[0].shape[0] * len(tables))


def objective_optimal_family(
    tables: list[torch.Tensor], optima: torch.Tensor, n_c: int, per: str
) -> tuple[float, float]:
    """The nested family that minimises the nested search's own objective, sum over the sizes
    of log(KL + CHAIN_EPS), found exactly by dynamic programming over subsets: its pass rate
    and that minimum (summed over groups). It tells a search that misses its objective's
    optimum from an objective whose optimum passes fewer pairs than ``best_nested_pass_rate``.
    """
    values, index = _subset_tables(tables, n_c, per)
    passed, total = 0, 0.0
    for g in range(values[0].shape[0]):
        cost: dict[int, float] = {0: 0.0}
        back: list[dict[int, int]] = []
        for table, idx in zip(values, index):
            nxt, came_from = {}, {}
            for bits, i in idx.items():
                prev = min((bits & ~(1 << c) for c in range(n_c) if bits >> c & 1), key=cost.get)
                nxt[bits] = cost[prev] + math.log(float(table[g, i]) + CHAIN_EPS)
                came_from[bits] = prev
            cost = nxt
            back.append(came_from)
        bits = min(cost, key=cost.get)  # type: ignore[arg-type]
        total += cost[bits]
        for j in range(len(values) - 1, -1, -1):
            passed += int(_passes(float(values[j][g, index[j][bits]]), float(optima[g, j])))
            bits = back[j][bits]
    return passed / (values[0].shape[0] * len(tables)), total


def optimality(model: object, name: str, args: argparse.Namespace) -> list[dict[str, object]]:
    graph = sl.NodeGraph.from_model(model)
    prompts = dev_prompts(args.n_prompts, args.words)
    cands = spread_candidates(graph, args.n_candidates)
    sizes = list(range(1, args.n_candidates))
    print(f"{name}: candidates {cands}; prompts {prompts}", flush=True)
    rows = []
    for ablation in args.ablations:
        t0 = time.perf_counter()
        optima = exhaustive_optima(model, prompts, cands, sizes, ablation, args.cache)
        t_exh = time.perf_counter() - t0
        for per in args.per:
            for nested in args.nested:
                t2 = time.perf_counter()
                learned = sl.trace(
                    model,
                    prompts,
                    sizes,
                    ablation,
                    per,
                    "mask",
                    candidates=cands,
                    nested=nested,
                    progress=False,
                    inverse=False,
                    **args.mask_options,
                )
                t3 = time.perf_counter()
                opt, got = optima[per], learned.metrics["kl"]
                if per == "dataset":  # the objective is the mean over prompts
                    got = got.mean(0, keepdim=True)
                ok = (got <= 1.05 * opt) | (got - opt <= 1e-4)
                gap = ((got - opt) / opt.clamp(min=1e-12)).flatten()
                rows.append(
                    {
                        "model": name,
                        "ablation": ablation,
                        "per": per,
                        "nested": nested,
                        "pass_rate": float(ok.float().mean()),
                        "median_gap": float(gap.median()),
                        "max_gap": float(gap.max()),
                        "pairs": int(ok.numel()),
                        "nested_bound": optima["nested_bound"][per],
                        # the nested search's objective: found, and its exact optimum's
                        # pass rate and value
                        "objective": float(torch.log(got.double() + CHAIN_EPS).sum()),
                        "objective_optimal_pass": optima["objective_optimal"][per][0],
                        "objective_optimum": optima["objective_optimal"][per][1],
                        "t_exhaustive": t_exh,
                        "t_mask": t3 - t2,
                    }
                )
                print(_fmt(rows[-1]), flush=True)
    return rows


def baselines(model: object, name: str, args: argparse.Namespace) -> None:
    prompts = dev_prompts(args.n_baseline_prompts, args.words)
    methods = {
        "mask (nested)": {"method": "mask", "nested": True, **args.mask_options},
        "mask (independent)": {"method": "mask", "nested": False, **args.mask_options},
        "random": {"method": "random"},
        "greedy": {"method": "greedy"},
        "attribution": {"method": "attribution"},
        "forward": {"method": "forward", "max_size": args.forward_max},
    }
    if args.methods:
        methods = {k: v for k, v in methods.items() if k in args.methods}
    table: dict[str, dict[int, float]] = {}
    sizes = None
    for label, kwargs in methods.items():
        t0 = time.perf_counter()
        res = sl.trace(model, prompts, inverse=False, progress=False, **kwargs)  # type: ignore[arg-type]
        if sizes is None or label.startswith("mask"):
            sizes = res.sizes.tolist()
        med = res.metrics["kl"].median(0).values
        table[label] = dict(zip(res.sizes.tolist(), med.tolist()))
        search, evaluation = res.options.get("search_rows"), res.options.get("eval_rows")
        rows = f"search rows {search}, eval rows {evaluation}"
        print(f"  {name} {label}: {time.perf_counter() - t0:.1f}s ({rows})", flush=True)
    assert sizes is not None
    print(f"\n{name}: median KL (nats) per size, {len(prompts)} prompts, per input, mean ablation")
    print("method".ljust(20) + "".join(f"{s:>9d}" for s in sizes))
    for label, by_size in table.items():
        cells = "".join(f"{by_size[s]:>9.4f}" if s in by_size else f"{'-':>9}" for s in sizes)
        print(label.ljust(20) + cells)
    if "mask (nested)" not in table:
        return
    best = table["mask (nested)"]
    losses = [
        (label, s)
        for label, by_size in table.items()
        if not label.startswith("mask")
        for s, v in by_size.items()
        if v < best[s] - 1e-9
    ]
    print("sizes where a baseline beats mask (nested):", losses or "none")


def edge_curves(
    model: object, prompts: list[str], grid: list[float], ablate: bool, args: argparse.Namespace
) -> dict[str, EdgeTraceResult]:
    """The learned, greedy and random edge curves of ``prompts`` on ``grid``, each timed."""
    results = {}
    for label, method in EDGE_METHODS.items():
        options: dict[str, Any] = {"ablate_attention_edges": ablate}
        if method == "mask" and args.mask_options:
            options["mask_search"] = args.mask_options
        t0 = time.perf_counter()
        res = sl.trace(
            model, prompts, grid, method=method, granularity="edge", progress=False, **options
        )
        assert isinstance(res, EdgeTraceResult)
        results[label] = res
        semantics = "ablated" if ablate else "kept"
        print(f"  edge {label}, {semantics}: {time.perf_counter() - t0:.1f}s", flush=True)
    return results


def print_edge_floor(results: dict[str, EdgeTraceResult], grid: list[float]) -> None:
    """Median KL of the learned and greedy masks, and random subsets' median TV, KL and
    top-1 share, per size."""
    med = {
        (label, k): res.metrics[k].double().median(0).values
        for label, res in results.items()
        for k in ("tv", "kl")
    }
    top1 = results["random"].metrics["top1"].double().mean(0)
    print(
        f"{'s':>8} | {'KL learned':>10} {'KL greedy':>10} | {'TV random':>9} {'KL random':>9} top1"
    )
    for j, s in enumerate(grid):
        print(
            f"{s:>8g} | {med['learned', 'kl'][j]:10.4f} {med['greedy', 'kl'][j]:10.4f} | "
            f"{med['random', 'tv'][j]:9.4f} {med['random', 'kl'][j]:9.4f} {top1[j]:4.2f}"
        )


def edge_baselines(
    model: object, name: str, args: argparse.Namespace
) -> dict[str, tuple[dict[str, EdgeTraceResult], list[dict[str, object]]]]:
    """Part 2 at edge granularity, for each semantics: the results and the per-size rows."""
    prompts = dev_prompts(args.n_baseline_prompts, args.words)
    grid = [float(s) for s in PAPER_GRID if s >= args.min_size]
    out = {}
    for ablate in args.ablate_attention_edges:
        semantics = "ablated" if ablate else "kept"
        results = edge_curves(model, prompts, grid, ablate, args)
        tv = [results[k].metrics["tv"].double() for k in ("learned", "greedy")]
        top1 = [results[k].metrics["top1"].double() for k in ("learned", "greedy")]
        print(
            f"\n{name}: edge granularity, attention edges {semantics}, {len(prompts)} prompts, "
            f"the paper's grid from s = {args.min_size:g}; candidate: learned (method='mask', "
            f"nested), reference: the paper's greedy; lower / higher: prompts more than "
            f"{args.tol:g} apart"
        )
        rows = compare_sizes(*tv, *top1, grid, args.tol, names=("learned", "greedy"))
        print("median KL (nats) of both; uniform random edge subsets, the floor:")
        print_edge_floor(results, grid)
        out[semantics] = (results, rows)
    return out


def token_baselines(model: object, name: str, args: argparse.Namespace) -> dict[str, TokenCurves]:
    """Part 2 at token granularity: token_curve.py's table for each of ``--ablations``."""
    prompts = dev_prompts(args.n_baseline_prompts, args.words)
    out = {}
    for ablation in args.ablations:
        out[ablation] = token_curves(model, prompts, ablation, seed=0)
        print_token_table(name, ablation, out[ablation])
    return out


def run(model: object, name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Both parts at ``args.granularity`` on ``model``, printed; returns what part 2 found
    (edge: semantics -> (results, rows); token: ablation -> curves; node: nothing)."""
    if args.granularity == "node":
        if not args.skip_optimality:
            optimality(model, name, args)
        if not args.skip_baselines:
            baselines(model, name, args)
        return {}
    print(f"{name}: {NO_OPTIMALITY[args.granularity]}", flush=True)
    if args.skip_baselines:
        return {}
    if args.granularity == "edge":
        return edge_baselines(model, name, args)
    return token_baselines(model, name, args)


def _fmt(row: dict[str, object]) -> str:
    return (
        f"{row['model']:14s} {row['ablation']:5s} per={row['per']:8s} nested={row['nested']!s:5s} "
        f"pass={row['pass_rate']:.2%} of {row['pairs']} median_gap={row['median_gap']:+.3%} "
        f"max_gap={row['max_gap']:+.2%} (best nested family passes {row['nested_bound']:.2%}) "
        + (
            f"sum log(KL+eps) {row['objective']:.3f} (the nested family minimising it: "
            f"{row['objective_optimum']:.3f}, passes {row['objective_optimal_pass']:.2%}) "
            if row["nested"]
            else ""
        )
        + f"t_exh={row['t_exhaustive']:.1f}s "
        f"t_mask={row['t_mask']:.1f}s"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma-3-270m"])
    parser.add_argument("--n-prompts", type=int, default=4)
    parser.add_argument("--n-candidates", type=int, default=10)
    parser.add_argument(
        "--words",
        type=int,
        default=None,
        help="cut prompts to their last N words (default: 8 at node granularity, whole "
        "prompts at edge and token)",
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--n-baseline-prompts", type=int, default=16)
    parser.add_argument("--forward-max", type=int, default=8)
    parser.add_argument(
        "--cache", type=Path, default=None, help="folder to keep exhaustive tables between runs"
    )
    parser.add_argument(
        "--ablations",
        nargs="+",
        default=["zero", "mean"],
        help="node: part 1's ablations; token: part 2's (edge: zero, the paper's)",
    )
    parser.add_argument("--per", nargs="+", default=["input", "dataset"])
    parser.add_argument(
        "--nested",
        nargs="+",
        type=lambda v: v == "true",
        default=[True, False],
        help="nested settings to run: true, false or both",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="baseline-table rows to run, e.g. 'mask (nested)' random (default: all)",
    )
    parser.add_argument(
        "--mask-options",
        type=json.loads,
        default={},
        help='options of every "mask" run, as JSON, e.g. \'{"steps": 4, "grow_width": 1}\'',
    )
    parser.add_argument("--skip-optimality", action="store_true")
    parser.add_argument("--skip-baselines", action="store_true")
    parser.add_argument(
        "--granularity",
        choices=GRANULARITIES,
        default="node",
        help="node: parts 1 and 2 above (default); edge: learned against the paper's greedy "
        "on the paper's grid; token: learned against random",
    )
    parser.add_argument(
        "--ablate-attention-edges",
        nargs="+",
        type=true_false,
        default=[True, False],
        help="edge: true (attention edges ablated), false (kept), or both (default)",
    )
    parser.add_argument(
        "--min-size", type=float, default=1e-4, help="edge: the smallest size of the grid"
    )
    parser.add_argument(
        "--tol", type=float, default=1e-4, help="edge: |TV difference| counted equal"
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.granularity != "node" and args.methods:
        raise SystemExit(
            f"--methods picks rows of the node baseline table: at --granularity "
            f"{args.granularity} every method of its table runs; drop --methods."
        )
    if args.words is None and args.granularity == "node":
        args.words = 8
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.models:
        model = sl.load_model(name, device="cpu")
        run(model, name, args)


if __name__ == "__main__":
    main()
