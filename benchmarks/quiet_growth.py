"""The quickstart's nested curve with and without the quiet growth proposal (``grow_quiet``).

Runs the README's first command (``strace-lens trace --model gemma-3-270m --prompts wikitext
--n 4``: node granularity, ``method="mask"`` nested, per input, mean ablation, default
options) twice in one process, once as is and once with ``grow_quiet=True`` (plus any
``--options`` given to both), each into its own run folder under ``--out``. Prints each
curve (median KL and TV per size), the per-prompt KL matrix, and the number of (prompt,
consecutive grid size) pairs where the KL rises. With ``--steps``, the grow_quiet run
also prints each growth step that adds d > 1 nodes, per prompt: the KL of the subgraph it
grows from, the lowest KL of the proposals made without the option, the quiet proposal's
KL, and which was kept (the growth's own measurements, before the local search).

    nice -n 10 python benchmarks/quiet_growth.py --model gemma-3-270m --n 4 --out /tmp/quiet
    nice -n 10 python benchmarks/quiet_growth.py --model smollm2-135m --n 16 --words 8 ...
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

import strace_lens.search.nested as nested
from strace_lens.dataset import trace_dataset
from strace_lens.models import load_model
from strace_lens.prompts import read_prompts
from strace_lens.search.objective import SubgraphObjective


def rises(kl: torch.Tensor, slack: float = 0.0) -> int:
    """(prompt, consecutive grid size) pairs whose KL rises by more than ``slack``."""
    return int((kl[:, 1:] - kl[:, :-1] > slack).sum())


def show(label: str, sizes: list[int], kl: torch.Tensor, tv: torch.Tensor, seconds: float) -> None:
    def row(name: str, values: torch.Tensor) -> str:
        return f"  {name:<12}" + "".join(f"{float(v):8.3f}" for v in values)

    print(f"{label}: {seconds:.1f} s")
    print("  size        " + "".join(f"{s:8d}" for s in sizes))
    print(row("median KL", kl.median(0).values))
    print(row("median TV", tv.median(0).values))
    for p in range(kl.shape[0]):
        print(row(f"KL prompt {p + 1}", kl[p]))
    print(f"  KL rises (prompt, consecutive size): {rises(kl)} of {kl[:, 1:].numel()}")


@contextmanager
def growth_record(n_groups: int):
    """Record every row ``SubgraphObjective.kl`` measures ((prompt, mask) -> KL) and every
    growth step's proposals (the quiet one last), while the block runs."""
    seen: dict[tuple[int, bytes], float] = {}
    steps: list[dict[str, Any]] = []
    real_kl, real_proposals = SubgraphObjective.kl, nested._proposals

    def kl(self, masks, prompt_index, *args, **kwargs):
        out = real_kl(self, masks, prompt_index, *args, **kwargs)
        for row, p, value in zip(masks.bool(), prompt_index.tolist(), out.tolist()):
            seen[(p, row.numpy().tobytes())] = value
        return out

    def proposals(orders, outside, d, width, quiet=None):
        picks = real_proposals(orders, outside, d, width, quiet)
        if quiet is not None:
            quiet_pick = nested._top_outside(-quiet.float(), outside, d)
            steps.append({"d": d, "current": ~outside, "picks": picks, "quiet": quiet_pick})
        return picks

    SubgraphObjective.kl, nested._proposals = kl, proposals  # type: ignore[method-assign]
    try:
        yield seen, steps
    finally:
        SubgraphObjective.kl, nested._proposals = real_kl, real_proposals  # type: ignore[method-assign]


def show_steps(
    seen: dict[tuple[int, bytes], float], steps: list[dict[str, Any]], n_groups: int
) -> None:
    """Per growth step adding d > 1 nodes and prompt: KL of the current subgraph, the best
    proposal without the option, the quiet proposal, and the one kept."""

    def measured(p: int, mask: torch.Tensor) -> float:
        return seen.get((p, mask.numpy().tobytes()), float("nan"))

    print("  growth steps adding d > 1 nodes (KL; current: nan where it was not measured)")
    print("  prompt  from -> to   current  best other   quiet    kept")
    counts = {"others all rise": 0, "quiet kept": 0, "quiet <= current": 0, "kept rises": 0}
    for k, step in enumerate(steps):
        p, current, quiet = k % n_groups, step["current"], step["current"] | step["quiet"]
        others = [current | pick for pick in step["picks"] if not torch.equal(pick, step["quiet"])]
        now = measured(p, current)
        best = min(measured(p, m) for m in others)
        q = measured(p, quiet)
        kept = min(best, q)
        held = int(current.sum())
        print(
            f"  {p + 1:6d}  {held:4d} -> {held + step['d']:<4d} {now:8.3f} {best:11.3f} "
            f"{q:8.3f} {'quiet' if q < best else 'other':>7}"
        )
        counts["others all rise"] += best > now
        counts["quiet kept"] += q < best
        counts["quiet <= current"] += q <= now
        counts["kept rises"] += kept > now
    print(f"  of {len(steps)} (prompt, step): {counts}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--prompts", default="wikitext")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--out", type=Path, required=True, help="folder for the two runs")
    parser.add_argument("--options", type=json.loads, default={}, help="JSON, for both runs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", action="store_true", help="print the growth steps too")
    parser.add_argument(
        "--words", type=int, default=None, help="the wikitext dev prompts cut to N words"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    if args.words:  # strace_quality.py's baseline prompts (its script folder is on the path)
        from strace_quality import dev_prompts

        prompts: Any = dev_prompts(args.n, args.words)
    else:
        prompts = read_prompts(args.prompts, n=args.n)
    n_prompts = len(prompts) if isinstance(prompts, list) else len(prompts.prompts)
    curves = {}
    for label, quiet in (("default", {}), ("grow_quiet", {"grow_quiet": True})):
        started = time.perf_counter()
        with growth_record(n_prompts) as (seen, steps):
            result = trace_dataset(
                model, prompts, args.out / label, progress=False, **args.options, **quiet
            )
        seconds = time.perf_counter() - started
        sizes = [int(s) for s in result.sizes]
        kl, tv = result.metrics["kl"].float(), result.metrics["tv"].float()
        curves[label] = kl
        show(label, sizes, kl, tv, seconds)
        if args.steps and quiet:
            show_steps(seen, steps, n_prompts)
    diff = curves["grow_quiet"] - curves["default"]
    print(
        f"grow_quiet - default, KL per (prompt, size): lower {int((diff < 0).sum())}, "
        f"equal {int((diff == 0).sum())}, higher {int((diff > 0).sum())} of {diff.numel()}"
    )


if __name__ == "__main__":
    main()
