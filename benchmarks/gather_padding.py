"""The CPU unembedding's padding: the gathered rows padded to a multiple of 8 (at least 16)
against every row repeated until the count is a multiple of 8 (the previous way).

For each model and each row count: a batch of that many dev prompts with random 0/1 masks
(mean ablation, no grad), run both ways with the repeats interleaved (median seconds); the
largest log-prob difference between the two ways; and, with an all-ones mask, each way's
largest difference from the model's own forward (0 = bit for bit).

    python benchmarks/gather_padding.py --models gemma-3-270m smollm2-135m --repeats 3
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import strace_lens as sl
import strace_lens.masked_forward as mf
from strace_lens.hygiene import model_untouched

DATA = Path(__file__).resolve().parents[1] / "strace_lens" / "data" / "wikitext_40_dev.tsv"


def repeated_gather_hook(predict_pos: torch.Tensor) -> mf.HookFn:
    """The previous gather: each row repeated until the row count is a multiple of 8."""

    def hook(resid: torch.Tensor, hook: Any) -> torch.Tensor:
        picked = resid[torch.arange(resid.shape[0]), predict_pos][:, None, :]
        copies = 8 // math.gcd(picked.shape[0], 8)
        return picked.repeat(1, copies, 1) if copies > 1 else picked

    return hook


def logprobs(model: Any, batch: sl.TokenBatch, hooks: list, repeated: bool) -> torch.Tensor:
    if not repeated:
        return mf.forward_logprobs(model, batch, hooks)
    last = f"blocks.{int(model.cfg.n_layers) - 1}.hook_resid_post"
    with model.hooks(fwd_hooks=[*hooks, (last, repeated_gather_hook(batch.predict_pos))]):
        logits = model(batch.tokens, **batch.model_kwargs())
    return torch.log_softmax(logits[:, 0].float(), dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["gemma-3-270m", "smollm2-135m"])
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 2, 3, 5, 7, 9, 13, 31])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prompts = [line.split("\t")[0] for line in DATA.read_text("utf-8").splitlines()]
    for name in args.models:
        model = sl.load_model(name, device="cpu")
        graph = sl.NodeGraph.from_model(model)
        ablation = sl.MeanAblation.from_prompts(model, prompts[:16], progress=False)
        gen = torch.Generator().manual_seed(0)
        print(f"\n{name}: random 0/1 masks, mean ablation; seconds are medians of {args.repeats}")
        print(
            "  rows  padded s  repeated s  padded/repeated  masked max|d|  "
            "all-ones vs own: padded  repeated"
        )
        with torch.no_grad(), model_untouched(model):
            for n in args.rows:
                batch = sl.tokenize(model, prompts[:n])
                masks = (torch.rand(n, len(graph), generator=gen) < 0.3).float()
                hooks = mf.node_hooks(graph, masks, ablation, batch)
                times: dict[bool, list[float]] = {False: [], True: []}
                out: dict[bool, torch.Tensor] = {}
                for _ in range(args.repeats):
                    for repeated in (False, True):
                        t0 = time.perf_counter()
                        out[repeated] = logprobs(model, batch, hooks, repeated)
                        times[repeated].append(time.perf_counter() - t0)
                own = model(batch.tokens, **batch.model_kwargs())
                own = torch.log_softmax(own[torch.arange(n), batch.predict_pos].float(), dim=-1)
                ones = {r: logprobs(model, batch, [], r) for r in (False, True)}
                padded, repeated_s = (statistics.median(times[r]) for r in (False, True))
                print(
                    f"  {n:4d}  {padded:8.2f}  {repeated_s:10.2f}  {padded / repeated_s:15.3f}  "
                    f"{float((out[False] - out[True]).abs().max()):13.2e}  "
                    f"{float((ones[False] - own).abs().max()):22.2e}  "
                    f"{float((ones[True] - own).abs().max()):8.2e}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
