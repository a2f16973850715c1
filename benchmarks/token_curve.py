"""One nested token-granularity curve (learned masks) on real prompts, with a random baseline.

Traces ``--n`` WikiText dev prompts (the package's ``strace_lens/data/wikitext_40_dev.tsv``)
at ``granularity="token"`` with the default search (``method="mask"``, nested, the default
relative grid) and, for comparison, ``method="random"`` (5 draws per size) on the same sizes.
Prints per size: the mean relative size and unit count, mean TV and top-1 agreement (share
of prompts whose subgraph's most probable next token is the full model's) for both, and the
wall time of each trace next to one bare forward of the prompt batch, all in one process.

    nice -n 10 python benchmarks/token_curve.py --model smollm2-135m --n 4 --ablation zero
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import strace_lens as sl
from strace_lens.hygiene import model_untouched
from strace_lens.inputs import tokenize
from strace_lens.masked_forward import forward_logprobs

DATA = Path(__file__).resolve().parents[1] / "strace_lens" / "data" / "wikitext_40_dev.tsv"


def read_prompts(n: int) -> list[str]:
    lines = DATA.read_text(encoding="utf-8").splitlines()
    return [line.split("\t")[0] for line in lines if line.strip()][:n]


def bare_forward_seconds(model: object, prompts: list[str], repeats: int = 5) -> float:
    batch = tokenize(model, prompts)
    times = []
    with model_untouched(model), torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            forward_logprobs(model, batch, [])
            times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclass
class TokenCurves:
    """The learned token curve and the random one on its sizes, each timed, with one bare
    forward of the prompt batch timed in the same process."""

    learned: sl.TokenTraceResult
    random: sl.TokenTraceResult
    seconds_learned: float
    seconds_random: float
    seconds_bare: float


def token_curves(model: object, prompts: list[str], ablation: str, seed: int) -> TokenCurves:
    """The default learned token curve and ``method="random"`` on the same sizes."""
    bare = bare_forward_seconds(model, prompts)
    start = time.perf_counter()
    learned = sl.trace(
        model, prompts, granularity="token", ablation=ablation, seed=seed, progress=False
    )
    t_learned = time.perf_counter() - start
    start = time.perf_counter()
    random = sl.trace(
        model,
        prompts,
        granularity="token",
        method="random",
        sizes=list(learned.grid),
        ablation=ablation,
        seed=seed,
        inverse=False,
        progress=False,
    )
    t_random = time.perf_counter() - start
    assert isinstance(learned, sl.TokenTraceResult) and isinstance(random, sl.TokenTraceResult)
    return TokenCurves(learned, random, t_learned, t_random, bare)


def print_token_table(name: str, ablation: str, curves: TokenCurves) -> None:
    """Per size: mean relative size and units, mean TV and top-1 of learned and random."""
    learned, random, bare = curves.learned, curves.random, curves.seconds_bare
    print(
        f"model {name}, {learned.n_prompts} prompts, token counts {learned.n_pos.tolist()}, "
        f"units per prompt {[learned.n_units(p) for p in range(learned.n_prompts)]}, "
        f"ablation {ablation}, nested={learned.nested}"
    )
    print("| rel. size | units (mean) | TV learned | top-1 learned | TV random | top-1 random |")
    print("|---|---|---|---|---|---|")
    rel = learned.relative_sizes().mean(0)
    units = learned.counts.double().mean(0)
    for j in range(len(learned.grid)):
        print(
            f"| {rel[j]:.4f} | {units[j]:.1f} | {learned.metrics['tv'][:, j].mean():.3f} | "
            f"{learned.metrics['top1'][:, j].mean():.2f} | {random.metrics['tv'][:, j].mean():.3f}"
            f" | {random.metrics['top1'][:, j].mean():.2f} |"
        )
    t_learned = curves.seconds_learned
    print(
        f"wall time: learned {t_learned:.1f} s ({t_learned / bare:.0f}x one bare forward of "
        f"the batch, {bare:.3f} s), random {curves.seconds_random:.1f} s; search rows "
        f"{learned.options['search_rows']}, evaluation rows {learned.options['eval_rows']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--ablation", default="zero", choices=["zero", "mean"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = sl.load_model(args.model, device="cpu")
    prompts = read_prompts(args.n)
    curves = token_curves(model, prompts, args.ablation, args.seed)
    print_token_table(args.model, args.ablation, curves)


if __name__ == "__main__":
    main()
