"""The quickstart's nested curve with and without the quiet growth proposal (``grow_quiet``).

Runs the README's first command (``strace-lens trace --model gemma-3-270m --prompts wikitext
--n 4``: node granularity, ``method="mask"`` nested, per input, mean ablation, default
options) twice in one process, once as is and once with ``grow_quiet=True`` (plus any
``--options`` given to both), each into its own run folder under ``--out``. Prints each
curve (median KL and TV per size), the per-prompt KL matrix, and the number of (prompt,
consecutive grid size) pairs where the KL rises.

    nice -n 10 python benchmarks/quiet_growth.py --model gemma-3-270m --n 4 --out /tmp/quiet
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from strace_lens.dataset import trace_dataset
from strace_lens.models import load_model
from strace_lens.prompts import read_prompts


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--prompts", default="wikitext")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--out", type=Path, required=True, help="folder for the two runs")
    parser.add_argument("--options", type=json.loads, default={}, help="JSON, for both runs")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    prompts = read_prompts(args.prompts, n=args.n)
    curves = {}
    for label, quiet in (("default", {}), ("grow_quiet", {"grow_quiet": True})):
        started = time.perf_counter()
        result = trace_dataset(
            model, prompts, args.out / label, progress=False, **args.options, **quiet
        )
        seconds = time.perf_counter() - started
        sizes = [int(s) for s in result.sizes]
        kl, tv = result.metrics["kl"].float(), result.metrics["tv"].float()
        curves[label] = kl
        show(label, sizes, kl, tv, seconds)
    diff = curves["grow_quiet"] - curves["default"]
    print(
        f"grow_quiet - default, KL per (prompt, size): lower {int((diff < 0).sum())}, "
        f"equal {int((diff == 0).sum())}, higher {int((diff > 0).sum())} of {diff.numel()}"
    )


if __name__ == "__main__":
    main()
