"""What resuming proposals at their first new layer saves in the nested growth.

Runs the nested growth of ``method="mask"`` (ranking: attribution scores, guide: write-norm
best-first order, as ``trace`` passes them) twice on the same prompts, side by side: every
proposal run as a whole forward, and resumed from the current subgraph's residual at the
layer of its earliest new node. Prints the wall times, the forward rows, the (row, block)
pairs run, and whether both found the same family (they must: resuming is exact).

    python benchmarks/resumed_growth.py --model smollm2-135m --n 4 --words 8
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import strace_lens as sl
from strace_lens.ablation import resolve_ablation
from strace_lens.hygiene import model_untouched
from strace_lens.masked_forward import forward_logprobs
from strace_lens.search.baselines import attribution_scores, greedy_scores
from strace_lens.search.grouping import RowGrouping
from strace_lens.search.mask_options import MaskOptions
from strace_lens.search.nested import grow_nested
from strace_lens.search.objective import SubgraphObjective
from strace_lens.trace import default_sizes

DATA = Path(__file__).resolve().parents[1] / "strace_lens" / "data" / "wikitext_40_dev.tsv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--words", type=int, default=8, help="cut prompts to their last words")
    args = parser.parse_args()
    lines = DATA.read_text("utf-8").splitlines()[: args.n]
    prompts = [" ".join(line.split("\t")[0].split(" ")[-args.words :]) for line in lines]
    model = sl.load_model(args.model, device="cpu")
    graph = sl.NodeGraph.from_model(model)
    batch = sl.tokenize(model, prompts)
    abl = resolve_ablation("mean", model, prompts, progress=False)
    cand = torch.ones(len(graph), dtype=torch.bool)
    sizes = default_sizes(len(graph))
    grouping = RowGrouping("input", len(prompts))
    runs = {}
    with model_untouched(model):
        logp_full = forward_logprobs(model, batch, [])
        for label in ("whole forwards", "resumed"):
            objective = SubgraphObjective(model, graph, batch, logp_full, abl, cand)
            if label == "whole forwards":
                objective.can_resume = lambda: False  # type: ignore[method-assign]
            ranking = -attribution_scores(objective, grouping).cpu()
            guide = greedy_scores(objective, grouping).cpu()
            rows0, blocks0 = objective.rows_evaluated, objective.layer_rows
            t0 = time.perf_counter()
            family = grow_nested(objective, ranking, sizes, grouping, MaskOptions(), guide)
            secs = time.perf_counter() - t0
            rows = objective.rows_evaluated - rows0
            runs[label] = (secs, rows, objective.layer_rows - blocks0, family)
    print(
        f"{args.model}: {len(prompts)} prompts ({batch.tokens.shape[1]} tokens wide), "
        f"{len(graph)} nodes, {graph.n_layers} layers, sizes {sizes.tolist()}"
    )
    for label, (secs, rows, blocks, _) in runs.items():
        print(
            f"  {label:15s} {secs:8.1f} s  rows {rows}  (row, block) pairs {blocks} "
            f"= {blocks / (rows * graph.n_layers):.3f} of whole forwards"
        )
    whole, resumed = runs["whole forwards"], runs["resumed"]
    print(
        f"  time resumed / whole: {resumed[0] / whole[0]:.3f}; "
        f"same family: {torch.equal(whole[3], resumed[3])}"
    )


if __name__ == "__main__":
    main()
