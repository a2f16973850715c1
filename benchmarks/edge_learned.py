"""Learned nested edge masks (``method="mask"``) against the paper's greedy, on the paper's grid.

For each model and each semantics (attention edges ``ablated`` / ``kept``), the dev prompts
in chunks of ``--batch-prompts`` (the prompts one search runs side by side): per chunk the
edge weights, the greedy rankings and the learned nested rankings of
:func:`strace_lens.edges.learned.learned_nested_orders` (the search of
``trace(granularity="edge", method="mask")``: ``--steps`` of learning from the greedy, then
the measured nested merge of the greedy's and the learned rankings), each timed, with the
bare forward of the same chunk timed before and after (median); then per prompt the
greedy's subgraphs on the grid from ``--min-size`` (one edge-masked batch with an all-edges
reference row). The merged subgraphs' TV and top-1 come from the merge's own hard-mask
measurement, scored against the same reference row as the greedy's
(tests/test_edge_learned.py checks that the merge's measurement equals an independent
masked run).

Prints, per size: median TV of greedy and learned, the share of prompts keeping the full
model's top-1 token; the smallest size at which half of the prompts keep it; and the cost:
the search (learning + merge, which measures the learned curve) and the whole learned curve
(edge weights + greedy rankings + search) as multiples of the chunks' bare forwards, and,
for the chunks run by this process, of the bare forward of the whole prompt batch timed
before the first and after the last of them. The cost of ``edge_trace(method="mask")`` is
that curve plus the evaluation of its sizes, which is timed per prompt both ways on the
same prompt: as before (every size and a reference row run again, as one forward) and now
(read back from the search, strace_lens/edges/measured.py), with how far apart the two
evaluations' metrics are. Each (model, semantics, prompt) is saved as
JSON in ``--out`` when its chunk is done, and a rerun with the same options resumes from
there (a changed option raises); ``--report`` prints the table of the prompts saved so far.

    nice -n 10 python benchmarks/edge_learned.py --model smollm2-135m --n 16 --out runs/el
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from edge_greedy import DATA, bare_forward_times, half_top1_size, read_prompts

import strace_lens as sl
from strace_lens.atomic import write_text
from strace_lens.edges import (
    PAPER_GRID,
    EdgeGraph,
    edge_counts,
    edge_tokenize,
    edge_weights,
    evaluate_subgraphs,
    greedy_order,
)
from strace_lens.edges.forward import EdgeMasks, run_with_edge_masks
from strace_lens.edges.learned import LearnedOrder, MaskSearch, learned_nested_orders
from strace_lens.edges.measured import MeasuredPrefixes
from strace_lens.metrics import fidelity, tv_distance


def previous_evaluation(
    model: Any, row: sl.TokenBatch, graph: EdgeGraph, subgraphs: list[torch.Tensor], ablate: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``edge_trace``'s evaluation before read-back: every size's subgraph and an all-edges
    reference row, run again as rows of one forward of the prompt."""
    keep = torch.zeros(len(subgraphs) + 1, graph.n_edges)
    for i, ids in enumerate(subgraphs):
        keep[i, ids.long()] = 1.0
    keep[-1] = 1.0
    dtype = next(model.parameters()).dtype
    masks = EdgeMasks.from_edges(graph, keep.to(dtype))
    logp = run_with_edge_masks(model, row, masks, ablate_attention_edges=ablate)
    return logp[:-1], logp[-1]


def learned_evaluation(
    model: Any,
    row: sl.TokenBatch,
    graph: EdgeGraph,
    fit: LearnedOrder,
    counts: torch.Tensor,
    ablate: bool,
) -> dict[str, Any]:
    """The learned curve's evaluation in ``edge_trace``, timed both ways on the same prompt:
    run again (as before) and read back from the search (now); the rows each ran, and how far
    apart their metrics are (the read-back rows ran in the merge's batches)."""
    subgraphs = [fit.order[: int(k)] for k in counts]
    measured = MeasuredPrefixes.from_fit(fit)
    start = time.perf_counter()
    before = previous_evaluation(model, row, graph, subgraphs, ablate)
    t_before = time.perf_counter() - start
    start = time.perf_counter()
    now = evaluate_subgraphs(
        model, row, graph, subgraphs, ablate_attention_edges=ablate, measured=measured
    )
    t_now = time.perf_counter() - start
    read = [measured is not None and measured.get(ids) is not None for ids in subgraphs]
    whole = [len(ids) == graph.n_edges for ids in subgraphs]
    rows_now = sum(not (r or w) for r, w in zip(read, whole)) + (measured is None)
    scores = []
    for logp_sub, logp_full in (before, now):
        sub, full = logp_sub.detach().cpu(), logp_full.detach().cpu()
        score = fidelity(full.expand_as(sub), sub)
        score["top1"] = (sub.argmax(-1) == full.argmax(-1)).float()
        scores.append(score)
    diff = {k: (scores[1][k] - scores[0][k]).abs() for k in ("tv", "kl", "nucleus", "top1")}
    return {
        "sec_learned_eval_before": t_before,
        "sec_learned_eval_now": t_now,
        "learned_eval_rows_before": len(subgraphs) + 1,
        "learned_eval_rows_now": rows_now,
        "readback_max_abs_tv": float(diff["tv"].max()),
        "readback_max_abs_kl": float(diff["kl"].max()),
        "readback_nucleus_differs": int((diff["nucleus"] > 0).sum()),
        "readback_top1_differs": int((diff["top1"] > 0).sum()),
    }


def one_chunk(
    model: Any,
    batch: sl.TokenBatch,
    grid: list[float],
    search: MaskSearch,
    ablate: bool,
    repeats: int,
) -> list[dict[str, Any]]:
    """Greedy and learned curves of the prompts of ``batch`` (one search chunk), each step
    timed, with the bare forward of the same batch timed before and after (median)."""
    bare = bare_forward_times(model, batch, repeats)
    start = time.perf_counter()
    weights = edge_weights(model, batch)[0]
    t_weights = time.perf_counter() - start
    lengths = (batch.predict_pos + 1).tolist()
    graphs = [EdgeGraph.from_model(model, n) for n in lengths]
    start = time.perf_counter()
    orders = [greedy_order(g, w) for g, w in zip(graphs, weights)]
    t_order = time.perf_counter() - start
    start = time.perf_counter()
    fits = learned_nested_orders(
        model, batch, orders, grid, search=search, ablate_attention_edges=ablate
    )
    t_search = time.perf_counter() - start
    bare += bare_forward_times(model, batch, repeats)
    chunk = {
        "chunk_prompts": len(lengths),
        "chunk_sec_bare": statistics.median(bare),
        "chunk_sec_weights": t_weights,
        "chunk_sec_greedy_order": t_order,
        "chunk_sec_search": t_search,
    }
    outs = []
    for p, (graph, order, fit) in enumerate(zip(graphs, orders, fits)):
        counts = edge_counts(grid, graph.n_edges)
        start = time.perf_counter()
        logp_g, logp_full = evaluate_subgraphs(
            model,
            batch.select([p]).trimmed(),
            graph,
            [order[: int(k)] for k in counts],
            ablate_attention_edges=ablate,
            max_rows=len(grid) + 1,
        )
        t_greedy = time.perf_counter() - start
        assert fit.merge is not None
        where = {int(k): i for i, k in enumerate(fit.merge.counts.tolist())}
        full = logp_full.detach().cpu()
        # sizes the merge did not measure are the empty and the whole graph: the full row's
        logp_l = torch.stack(
            [fit.merge.logp[where[int(k)]] if int(k) in where else full for k in counts]
        )
        out: dict[str, Any] = {"n_edges": graph.n_edges, "counts": counts.tolist()}
        for which, logp in (("greedy", logp_g.detach().cpu()), ("learned", logp_l)):
            out[f"tv_{which}"] = tv_distance(full.expand_as(logp), logp).tolist()
            out[f"top1_{which}"] = (logp.argmax(-1) == full.argmax(-1)).float().tolist()
        out |= learned_evaluation(model, batch.select([p]).trimmed(), graph, fit, counts, ablate)
        out |= {"sec_greedy_eval": t_greedy, "chunk_first": p == 0} | chunk | fit.summary()
        outs.append(out)
    return outs


def report(name: str, label: str, results: list[dict[str, Any]], grid: list[float], bare: float):
    tv = {w: torch.tensor([r[f"tv_{w}"] for r in results]) for w in ("greedy", "learned")}
    top = {w: torch.tensor([r[f"top1_{w}"] for r in results]) for w in ("greedy", "learned")}
    n = len(results)
    print(f"\n### {name}, attention edges {label}: median TV over {n} prompts")
    print(f"{'s':>8} | {'greedy':>8} {'learned':>8} | {'top1 g':>6} {'top1 l':>6} | lower")
    for i, s in enumerate(grid):
        g, learned = tv["greedy"][:, i].median(), tv["learned"][:, i].median()
        # below 1e-4 apart the medians print the same: the same subgraph up to float noise
        mark = "equal" if abs(learned - g) < 1e-4 else ("yes" if learned < g else "NO")
        print(
            f"{'full' if s == 1.0 else f'{s:g}':>8} | {g:8.4f} {learned:8.4f} | "
            f"{top['greedy'][:, i].mean():6.2f} {top['learned'][:, i].mean():6.2f} | {mark}"
        )
    print(
        f"half of the prompts keep top-1 from: greedy {half_top1_size(top['greedy'], grid)}, "
        f"learned {half_top1_size(top['learned'], grid)}"
    )
    chunks = [r for r in results if r["chunk_first"]]
    search = sum(r["chunk_sec_search"] for r in chunks)
    curve = search + sum(r["chunk_sec_weights"] + r["chunk_sec_greedy_order"] for r in chunks)
    side = sum(r["chunk_sec_bare"] for r in chunks)
    evals = sum(r["sec_greedy_eval"] for r in results)
    passes = max(r["passes"] for r in results)
    rows = sum(r["merge_rows"] for r in results)
    sizes = "+".join(str(r["chunk_prompts"]) for r in chunks)
    print(
        f"learned search ({passes} forward+backward passes of {len(results[0]['budgets'])} rows "
        f"per prompt; merge: {rows} forward rows in all), chunks of {sizes} prompts, each timed "
        f"side by side with the bare forward of the same chunk (median of before and after):\n"
        f"  search {search:.1f} s = {search / side:.1f} x the chunks' bare forwards "
        f"({side:.2f} s in all)\n"
        f"  whole learned curve (edge weights + greedy ranking + search) {curve:.1f} s = "
        f"{curve / side:.1f} x\n"
        f"  for scale: one bare forward of the {n}-prompt batch, timed in this process: "
        f"{bare:.2f} s (search {search / bare:.1f} x); the greedy's evaluation ({len(grid)} rows "
        f"per prompt, one prompt per forward) {evals:.1f} s = {evals / side:.1f} x the chunks' "
        f"bare forwards"
    )
    if all("sec_learned_eval_now" in r for r in results):
        trace_cost(results, curve, side)


def trace_cost(results: list[dict[str, Any]], curve: float, side: float) -> None:
    """``edge_trace(method="mask")``'s cost, the learned curve plus its evaluation, with the
    evaluation as before (run again) and now (read back), timed on the same prompts."""
    before = sum(r["sec_learned_eval_before"] for r in results)
    now = sum(r["sec_learned_eval_now"] for r in results)
    rows_before = sum(r["learned_eval_rows_before"] for r in results)
    rows_now = sum(r["learned_eval_rows_now"] for r in results)
    pairs = sum(len(r["counts"]) for r in results)
    print(
        f"edge_trace(method='mask') = whole learned curve + the evaluation of its sizes, "
        f"as multiples of the chunks' bare forwards:\n"
        f"  before (every size and a reference row run again, {rows_before} rows): evaluation "
        f"{before:.1f} s = {before / side:.1f} x, trace {curve + before:.1f} s = "
        f"{(curve + before) / side:.1f} x\n"
        f"  now (read back from the search, {rows_now} rows run): evaluation {now:.2f} s = "
        f"{now / side:.2f} x, trace {curve + now:.1f} s = {(curve + now) / side:.1f} x\n"
        f"  read back against run again: max |dTV| "
        f"{max(r['readback_max_abs_tv'] for r in results):.2e}, max |dKL| "
        f"{max(r['readback_max_abs_kl'] for r in results):.2e}; shared nucleus differs at "
        f"{sum(r['readback_nucleus_differs'] for r in results)} and top-1 at "
        f"{sum(r['readback_top1_differs'] for r in results)} of {pairs} (prompt, size) pairs"
    )


def load_saved(path: Path, options: dict[str, Any], prompt: str) -> dict[str, Any]:
    saved = json.loads(path.read_text(encoding="utf-8"))
    if saved["options"] != json.loads(json.dumps(options)) or saved["prompt"] != prompt:
        raise ValueError(f"{path} was written with other options: use another --out.")
    return saved


def run_model(name: str, prompts: list[str], args: argparse.Namespace, search: MaskSearch):
    grid = [s for s in PAPER_GRID if s >= args.min_size]
    options: dict[str, Any] = {
        "search": {k: getattr(search, k) for k in search.__dataclass_fields__}
    }
    options |= {"min_size": args.min_size, "model": name}
    semantics = [("ablated", True), ("kept", False)]
    semantics = [(label, a) for label, a in semantics if label in args.semantics]
    paths = {
        label: [
            args.out / name / label / f"prompt_{args.first + p:03d}.json"
            for p in range(len(prompts))
        ]
        for label, _ in semantics
    }
    if args.report:  # the prompts done so far, in order, for every semantics
        done = min(
            next((p for p, f in enumerate(fs) if not f.exists()), len(fs)) for fs in paths.values()
        )
        if done == 0:
            raise ValueError(f"No saved prompt in {args.out / name}: run without --report first.")
        prompts = prompts[:done]
    model = sl.load_model(name, device="cpu")
    batch = edge_tokenize(model, prompts)
    bare_forward_times(model, batch, 1)  # warm-up
    for label, ablate in semantics:
        results: list[dict[str, Any] | None] = [
            load_saved(f, options, prompts[p]) if f.exists() else None
            for p, f in enumerate(paths[label][: len(prompts)])
        ]
        ran: list[dict[str, Any]] = []
        evals = {"before": 0.0, "now": 0.0}
        whole: list[float] = []
        for start in range(0, len(prompts), search.batch_prompts):
            part = list(range(start, min(start + search.batch_prompts, len(prompts))))
            if all(results[p] is not None for p in part):
                continue
            if not ran:  # the whole batch's bare forward, before the first chunk run here
                whole += bare_forward_times(model, batch, args.repeats)
            sub = batch.select(part).trimmed()
            outs = one_chunk(model, sub, grid, search, ablate, args.repeats)
            for p, out in zip(part, outs):
                out |= {"options": options, "prompt": prompts[p]}
                write_text(paths[label][p], json.dumps(out))
                results[p] = out
            ran.append(outs[0])
            for when in evals:
                evals[when] += sum(o[f"sec_learned_eval_{when}"] for o in outs)
            print(
                f"{name} {label} prompts {part[0]}-{part[-1]}: search "
                f"{outs[0]['chunk_sec_search']:.0f} s = "
                f"{outs[0]['chunk_sec_search'] / outs[0]['chunk_sec_bare']:.1f} x bare",
                flush=True,
            )
        after = bare_forward_times(model, batch, args.repeats)
        bare = statistics.median(after)
        report(name, label, [r for r in results if r is not None], grid, bare)
        if ran:
            t_whole = statistics.median(whole + after)
            search_s = sum(r["chunk_sec_search"] for r in ran)
            curve = search_s + sum(
                r["chunk_sec_weights"] + r["chunk_sec_greedy_order"] for r in ran
            )
            print(
                f"this process ran {sum(r['chunk_prompts'] for r in ran)} of the {len(prompts)} "
                f"prompts, between bare forwards of the {len(prompts)}-prompt batch (median "
                f"{t_whole:.2f} s, before and after): search {search_s:.1f} s = "
                f"{search_s / t_whole:.1f} x, whole learned curve {curve:.1f} s = "
                f"{curve / t_whole:.1f} x (one run, side by side when it ran every prompt)\n"
                f"  edge_trace(method='mask'), the curve and its evaluation: before "
                f"{(curve + evals['before']) / t_whole:.1f} x, now "
                f"{(curve + evals['now']) / t_whole:.1f} x"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", default=["smollm2-135m", "gemma-3-270m"])
    parser.add_argument("--prompts", type=Path, default=DATA, help="TSV; first column")
    parser.add_argument("--n", type=int, default=16, help="number of prompts")
    parser.add_argument("--first", type=int, default=0, help="index of the first prompt")
    parser.add_argument("--repeats", type=int, default=3, help="bare forward repeats")
    parser.add_argument("--semantics", nargs="+", default=["ablated", "kept"])
    parser.add_argument("--steps", type=int, default=MaskSearch.steps)
    parser.add_argument("--lr", type=float, default=MaskSearch.lr)
    parser.add_argument("--max-budgets", type=int, default=MaskSearch.max_budgets)
    parser.add_argument("--max-candidates", type=int, default=MaskSearch.max_candidates)
    parser.add_argument(
        "--no-greedy-bound",
        action="store_true",
        help="merge by KL alone, without keeping each size within the greedy's TV",
    )
    parser.add_argument(
        "--no-kept-attention-gradient",
        action="store_true",
        help="with attention edges kept, learn without the attention edges' gradient",
    )
    parser.add_argument(
        "--batch-prompts",
        type=int,
        default=MaskSearch.batch_prompts,
        help="prompts searched side by side (also the resume unit)",
    )
    parser.add_argument("--min-size", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--out", type=Path, required=True, help="folder for per-prompt JSON")
    parser.add_argument(
        "--report",
        action="store_true",
        help="no search: the table of the prompts saved so far (the first ones, in order), "
        "with the bare forward of their batch timed now",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    search = MaskSearch(
        steps=args.steps,
        lr=args.lr,
        max_budgets=args.max_budgets,
        max_candidates=args.max_candidates,
        greedy_bound=not args.no_greedy_bound,
        batch_prompts=args.batch_prompts,
        kept_attention_gradient=not args.no_kept_attention_gradient,
    )
    prompts = read_prompts(args.prompts, args.first + args.n)[args.first :]
    for name in args.model:
        run_model(name, prompts, args, search)


if __name__ == "__main__":
    main()
