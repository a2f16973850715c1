"""The growth's resumed proposals run in start-layer bands against grouped by start layer.

Runs the nested growth of ``method="mask"`` (ranking: attribution scores, guide: write-norm
best-first order, as in benchmarks/resumed_growth.py) once; at every growth step its
proposals are measured both ways right there, from the same cached residuals, in
alternating order (the load of a shared machine changes within minutes, not within a
step): in bands (``CALL_FIXED_ROWS``, the default) and with every start layer on its own
(``CALL_FIXED_ROWS = 0``, as before bands). Prints the seconds, forward calls and
(row, block) pairs of the proposals both ways, and the largest KL difference.

    python benchmarks/start_bands.py --models smollm2-135m gemma-3-270m --n 16 --words 8
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import strace_lens as sl
import strace_lens.search.bands as bands
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
VARIANTS = {"bands": bands.CALL_FIXED_ROWS, "per layer": 0.0}


class BothWays(RowGrouping):
    """A per-input grouping whose ``group_kl`` runs resumed proposals both ways, timed."""

    def __init__(self, n_prompts: int) -> None:
        super().__init__("input", n_prompts)
        totals = {label: [0.0, 0, 0] for label in VARIANTS}  # seconds, calls, (row, block)
        object.__setattr__(self, "totals", totals)
        object.__setattr__(self, "steps", 0)
        object.__setattr__(self, "max_diff", 0.0)

    def group_kl(self, objective, masks, group, start_layer=None, cache=None, sink=None):  # type: ignore[no-untyped-def]
        if start_layer is None:
            return super().group_kl(objective, masks, group, start_layer, cache, sink)
        order = list(VARIANTS) if self.steps % 2 == 0 else list(VARIANTS)[::-1]
        object.__setattr__(self, "steps", self.steps + 1)
        kls = {}
        for label in order:
            bands.CALL_FIXED_ROWS = VARIANTS[label]
            calls, blocks = objective.forward_calls, objective.layer_rows
            t0 = time.perf_counter()
            kls[label] = super().group_kl(objective, masks, group, start_layer, cache, sink)
            total = self.totals[label]
            total[0] += time.perf_counter() - t0
            total[1] += objective.forward_calls - calls
            total[2] += objective.layer_rows - blocks
        bands.CALL_FIXED_ROWS = VARIANTS["bands"]
        diff = float((kls["bands"] - kls["per layer"]).abs().max())
        object.__setattr__(self, "max_diff", max(self.max_diff, diff))
        return kls["bands"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m"])
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--words", type=int, default=8, help="cut prompts to their last words")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = DATA.read_text("utf-8").splitlines()[: args.n]
    prompts = [" ".join(line.split("\t")[0].split(" ")[-args.words :]) for line in lines]
    for name in args.models:
        model = sl.load_model(name, device="cpu")
        graph = sl.NodeGraph.from_model(model)
        batch = sl.tokenize(model, prompts)
        abl = resolve_ablation("mean", model, prompts, progress=False)
        cand = torch.ones(len(graph), dtype=torch.bool)
        sizes = default_sizes(len(graph))
        grouping = BothWays(len(prompts))
        with model_untouched(model):
            logp_full = forward_logprobs(model, batch, [])
            objective = SubgraphObjective(model, graph, batch, logp_full, abl, cand)
            ranking = -attribution_scores(objective, grouping).cpu()
            guide = greedy_scores(objective, grouping).cpu()
            grow_nested(objective, ranking, sizes, grouping, MaskOptions(), guide)
        print(
            f"\n{name}: {len(prompts)} prompts ({batch.tokens.shape[1]} tokens wide), "
            f"{graph.n_layers} layers, {grouping.steps} growth steps, "
            f"{objective.rows_per_pass} rows per pass"
        )
        for label, (secs, calls, blocks) in grouping.totals.items():
            print(f"  proposals, {label:9s} {secs:7.1f} s  calls {calls:4d}  (row, block) {blocks}")
        b, p = grouping.totals["bands"], grouping.totals["per layer"]
        print(
            f"  bands / per layer: time {b[0] / p[0]:.3f}, calls {b[1] / p[1]:.3f}, "
            f"(row, block) {b[2] / p[2]:.3f}; KL max|d| {grouping.max_diff:.2e}"
        )


if __name__ == "__main__":
    main()
