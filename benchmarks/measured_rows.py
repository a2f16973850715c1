"""How close the evaluation's read-back of the growth's measurements is to running the rows
again, and, for scale, how much a different batch size alone moves the same metrics.

For each model and ablation: one nested ``trace`` per input (the evaluation reads back the
grown subgraphs, ``strace_lens/search/measured.py``), then ``evaluate`` on its masks (every
row run, the default batch size) and again with ``--batch-size``. Prints the largest
absolute and relative differences of KL and TV (subgraphs and inverses), the number of
(prompt, size) pairs whose shared nucleus differs, and whether the top tokens agree.

    python benchmarks/measured_rows.py --models smollm2-135m --n 4 --words 8

With ``--timing``: instead, the evaluation phase timed both ways side by side in one run, in
units of one bare forward+backward of the same batch (median of ``--repeats``): after one
nested search per input, ``evaluate_masks`` on the search's own objective (grown subgraphs
read back) and on a fresh objective (every row run), each ``--repeats`` times, medians.

    python benchmarks/measured_rows.py --timing --models smollm2-135m --n 16 --words 0
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import strace_lens as sl
from strace_lens.ablation import resolve_ablation
from strace_lens.evaluate import Evaluation, embed_candidates, evaluate_masks
from strace_lens.hygiene import model_untouched
from strace_lens.masked_forward import forward_logprobs
from strace_lens.search.grouping import RowGrouping
from strace_lens.search.mask_options import MaskOptions
from strace_lens.search.methods import MaskSearch, get_method
from strace_lens.search.objective import SubgraphObjective
from strace_lens.trace import default_sizes

DATA = Path(__file__).resolve().parents[1] / "strace_lens" / "data" / "wikitext_40_dev.tsv"


def compare(a: sl.TraceResult | Evaluation, b: Evaluation) -> str:
    parts = []
    for key in ("kl", "tv", "inv_kl", "inv_tv"):
        diff = (a.metrics[key] - b.metrics[key]).abs()
        rel = (diff / b.metrics[key].abs().clamp(min=1e-6)).max()
        parts.append(f"{key} max|d| {float(diff.max()):.2e} (rel {float(rel):.1e})")
    for key in ("nucleus", "inv_nucleus"):
        differ = int((a.metrics[key] != b.metrics[key]).sum())
        parts.append(f"{key} differs {differ}/{a.metrics[key].numel()}")
    parts.append(f"top tokens same: {torch.equal(a.top_tokens, b.top_tokens)}")
    return "; ".join(parts)


def timing(model: object, prompts: list[str], ablation: str, steps: int, repeats: int) -> str:
    """The evaluation phase with and without read-back, in bare forward+backward units."""
    from strace_speed import bare_fwd_bwd

    batch = sl.tokenize(model, prompts)
    bare = statistics.median(bare_fwd_bwd(model, batch) for _ in range(repeats))
    graph = sl.NodeGraph.from_model(model)
    abl = resolve_ablation(ablation, model, prompts, progress=False)
    cand = torch.ones(len(graph), dtype=torch.bool)
    sizes = default_sizes(len(graph))
    with model_untouched(model):
        logp_full = forward_logprobs(model, batch, [])

        def objective() -> SubgraphObjective:
            return SubgraphObjective(model, graph, batch, logp_full, abl, cand)

        searched = objective()
        t0 = time.perf_counter()
        found = get_method("mask").run(
            searched, sizes, RowGrouping("input", len(prompts)), 0, MaskSearch(MaskOptions(steps))
        )
        search_s = time.perf_counter() - t0
        masks = embed_candidates(found.masks, cand)
        times: dict[str, list[float]] = {"read back": [], "every row run": []}
        rows: dict[str, int] = {}
        for _ in range(repeats):
            for label, obj in (("read back", searched), ("every row run", objective())):
                before, reused = obj.rows_evaluated, obj.measured.reused
                t0 = time.perf_counter()
                evaluate_masks(obj, masks)
                times[label].append(time.perf_counter() - t0)
                rows[label] = obj.rows_evaluated - before
                assert label == "every row run" or obj.measured.reused > reused
    out = [
        f"  bare forward+backward (median of {repeats}): {bare:.2f} s; width "
        f"{batch.tokens.shape[1]}; search (steps={steps}) {search_s:.1f} s = {search_s / bare:.1f}x"
    ]
    for label, secs in times.items():
        med = statistics.median(secs)
        out.append(
            f"  evaluation, {label:14s} {med:7.1f} s = {med / bare:5.2f}x bare "
            f"({rows[label]} rows run; median of {repeats})"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma-3-270m"])
    parser.add_argument("--ablations", nargs="+", default=["mean", "zero"])
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--words", type=int, default=8, help="each prompt's last N words")
    parser.add_argument("--steps", type=int, default=4, help="ranking steps (default search: 24)")
    parser.add_argument("--batch-size", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timing", action="store_true", help="time the evaluation both ways")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = DATA.read_text("utf-8").splitlines()[: args.n]
    texts = [line.split("\t")[0] for line in lines]
    prompts = [" ".join(t.split()[-args.words :]) if args.words > 0 else t for t in texts]
    for name in args.models:
        model = sl.load_model(name, device="cpu")
        for ablation in args.ablations:
            if args.timing:
                print(f"{name}, {ablation}: {len(prompts)} prompts", flush=True)
                print(timing(model, prompts, ablation, args.steps, args.repeats), flush=True)
                continue
            t0 = time.perf_counter()
            res = sl.trace(model, prompts, ablation=ablation, steps=args.steps, progress=False)
            assert isinstance(res, sl.TraceResult)
            scored = res.options["eval_rows"]
            fresh = sl.evaluate(model, prompts, res.masks, ablation=ablation)
            other = sl.evaluate(
                model, prompts, res.masks, ablation=ablation, batch_size=args.batch_size
            )
            print(
                f"{name}, {ablation}: {len(prompts)} prompts, {len(res.sizes)} sizes, "
                f"{scored} evaluation rows scored ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
            print(f"  read back vs run again:         {compare(res, fresh)}", flush=True)
            print(f"  batch size {args.batch_size} vs default:      {compare(other, fresh)}")


if __name__ == "__main__":
    main()
