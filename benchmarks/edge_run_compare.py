"""Two finished edge run folders, size by size: the learned masks against the paper's greedy.

Reads two folders written by ``trace_dataset(..., granularity="edge")`` (or ``reproduce
--granularity edge``) on the same prompts and grid, e.g. a reproduction's
``runs/<model>/mask`` and the greedy reproduction's ``runs/<model>/greedy`` with the same
semantics, and prints per size from ``--min-size``: the median TV of each, the share of
prompts keeping the full model's top-1 token, how many prompts are lower / higher by more
than ``--tol``; then the medians lower / equal / higher and the smallest size at which half
of the prompts keep the top-1 token. Nothing is traced: it reads what the runs measured.
``--csv PATH`` also writes the per-size table (docs/reproduction/ commits these).

    python benchmarks/edge_run_compare.py runs/edge-mask-ablated/runs/smollm2-135m/mask \
        runs/edge-greedy-ablated/runs/smollm2-135m/greedy
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch
from edge_greedy import half_top1_size

import strace_lens as sl
from strace_lens.atomic import write_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("candidate", help="run folder of the method compared (e.g. .../mask)")
    parser.add_argument("reference", help="run folder of the reference (e.g. .../greedy)")
    parser.add_argument("--min-size", type=float, default=1e-4, help="first size compared")
    parser.add_argument("--tol", type=float, default=1e-4, help="|difference| counted equal")
    parser.add_argument("--csv", type=Path, help="also write the per-size table here")
    args = parser.parse_args()
    cand, ref = sl.load(args.candidate), sl.load(args.reference)
    if list(cand.prompts) != list(ref.prompts) or list(cand.grid) != list(ref.grid):
        raise SystemExit("the two runs differ in prompts or size grid: compare matching runs")
    if cand.options.get("ablate_attention_edges") != ref.options.get("ablate_attention_edges"):
        raise SystemExit("the two runs differ in ablate_attention_edges: compare one semantics")
    keep = [j for j, s in enumerate(cand.grid) if s >= args.min_size]
    grid = [float(cand.grid[j]) for j in keep]
    tv_c, tv_r = (r.metrics["tv"].double()[:, keep] for r in (cand, ref))
    top_c, top_r = (r.metrics["top1"].double()[:, keep] for r in (cand, ref))
    print(
        f"{cand.n_prompts} prompts; {args.candidate} against {args.reference}; "
        f"ablate_attention_edges={cand.options.get('ablate_attention_edges')}"
    )
    rows = compare_sizes(tv_c, tv_r, top_c, top_r, grid, args.tol)
    if args.csv is not None:
        write_text(args.csv, pd.DataFrame(rows).to_csv(index=False))


def compare_sizes(
    tv_c: torch.Tensor,
    tv_r: torch.Tensor,
    top_c: torch.Tensor,
    top_r: torch.Tensor,
    grid: list[float],
    tol: float,
    names: tuple[str, str] = ("candidate", "reference"),
) -> list[dict[str, object]]:
    """Print, per size, the median TV ``[prompt, size]`` of a candidate and a reference, the
    share of prompts keeping top-1 and how many prompts are lower / higher by more than
    ``tol``; then the medians lower / equal / higher and the smallest size at which half of
    the prompts keep top-1. Returns the per-size rows (also used by strace_quality.py)."""
    n_prompts = tv_c.shape[0]
    print(f"{'s':>8} | {'median TV':>9} {'ref':>8} | {'top1':>5} {'ref':>5} | lower higher")
    counts = {"lower": 0, "equal": 0, "higher": 0}
    rows: list[dict[str, object]] = []
    for j, s in enumerate(grid):
        a, b = tv_c[:, j].median().item(), tv_r[:, j].median().item()
        mark = "equal" if abs(a - b) <= tol else ("lower" if a < b else "higher")
        counts[mark] += 1
        lower = int((tv_c[:, j] < tv_r[:, j] - tol).sum())
        higher = int((tv_c[:, j] > tv_r[:, j] + tol).sum())
        print(
            f"{s:>8g} | {a:9.4f} {b:8.4f} | {top_c[:, j].mean():5.2f} {top_r[:, j].mean():5.2f} "
            f"| {lower:5d} {higher:6d}  {mark}"
        )
        rows.append(
            {
                "size": s,
                "median_tv": a,
                "median_tv_reference": b,
                "top1_share": top_c[:, j].mean().item(),
                "top1_share_reference": top_r[:, j].mean().item(),
                "prompts_lower": lower,
                "prompts_higher": higher,
                "median": mark,
                "tol": tol,
                "n_prompts": n_prompts,
            }
        )
    pairs_lower = int((tv_c < tv_r - tol).sum())
    pairs_higher = int((tv_c > tv_r + tol).sum())
    print(
        f"medians lower / equal / higher: {counts['lower']} / {counts['equal']} / "
        f"{counts['higher']} of {len(grid)} sizes; (prompt, size) pairs lower / higher: "
        f"{pairs_lower} / {pairs_higher}"
    )
    print(
        f"half of the prompts keep top-1 from: {names[0]} {half_top1_size(top_c, grid)}, "
        f"{names[1]} {half_top1_size(top_r, grid)}"
    )
    return rows


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
