"""What the masked forward pass costs next to the bare model, on real prompts.

For each model, one batch of ``--n`` prompts from the dev TSV, and these passes, timed side
by side in one run with the repeats interleaved (round r times every variant once, so a
slow spell on this shared machine hits all of them alike); the table gives medians:

    bare fwd          the model's own forward (no grad), log-probs at each predicted position
    bare fwd+bwd      the standard training step: next-token cross-entropy over every real
                      position, loss.backward() to the parameters
    mask fwd          run_with_mask, a random 0/1 mask per row, mean ablation (no grad)
    mask fwd+bwd      sigmoid(logits) -> run_with_mask -> KL(full || sub) -> backward to the
                      mask logits (one step of the s-Trace mask search)
    ... no gather     the same two, unembedding every position (forward_logprobs(gather=False))
                      instead of only the predicted one

Target (issue 2): mask fwd+bwd <= 1.1 x bare fwd+bwd.

    python benchmarks/masked_forward.py --models gemma-3-270m smollm2-135m --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import strace_lens as sl
from strace_lens.hygiene import model_untouched
from strace_lens.masked_forward import check_mask, forward_logprobs, node_hooks

DATA = Path(__file__).resolve().parents[1] / "strace_lens" / "data" / "wikitext_40_dev.tsv"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_variants(
    model: Any, batch: sl.TokenBatch, ablation: sl.Ablation, device: torch.device
) -> dict[str, Callable[[], None]]:
    graph = sl.NodeGraph.from_model(model)
    rows = torch.arange(batch.batch_size, device=device)
    gen = torch.Generator().manual_seed(0)
    hard = (torch.rand(batch.batch_size, len(graph), generator=gen) > 0.5).float().to(device)
    logits0 = torch.randn(batch.batch_size, len(graph), generator=gen).to(device)
    with torch.no_grad():
        full = torch.log_softmax(model(batch.tokens).float(), -1)[rows, batch.predict_pos]

    def bare_fwd() -> None:
        with torch.no_grad():
            logits = model(batch.tokens)
            torch.log_softmax(logits[rows, batch.predict_pos].float(), -1)

    def bare_fwd_bwd() -> None:
        logits = model(batch.tokens)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), batch.tokens[:, 1:].flatten(), reduction="none"
        )
        (loss * batch.attention_mask[:, 1:].flatten()).sum().backward()
        for p in model.parameters():
            p.grad = None

    def mask_fwd(gather: bool) -> Callable[[], None]:
        def run() -> None:
            if gather:  # the public entry point, validation included
                sl.run_with_mask(model, batch.tokens, hard, ablation)
                return
            with model_untouched(model):
                forward_logprobs(model, batch, node_hooks(graph, hard, ablation, batch), gather)

        return run

    def mask_fwd_bwd(gather: bool) -> Callable[[], None]:
        def run() -> None:
            mask_logits = logits0.clone().requires_grad_()
            mask = torch.sigmoid(mask_logits)
            if gather:
                sub = sl.run_with_mask(model, batch.tokens, mask, ablation)
            else:
                checked = check_mask(mask, batch.batch_size, len(graph))
                with model_untouched(model):
                    hooks = node_hooks(graph, checked, ablation, batch)
                    sub = forward_logprobs(model, batch, hooks, gather=False)
            sl.kl_divergence(full, sub).sum().backward()
            assert mask_logits.grad is not None

        return run

    return {
        "bare fwd": bare_fwd,
        "bare fwd+bwd": bare_fwd_bwd,
        "mask fwd": mask_fwd(True),
        "mask fwd+bwd": mask_fwd_bwd(True),
        "mask fwd, no gather": mask_fwd(False),
        "mask fwd+bwd, no gather": mask_fwd_bwd(False),
    }


def time_variants(
    variants: dict[str, Callable[[], None]], repeats: int, device: torch.device
) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(repeats + 1):  # round 0 warms up (allocator, lazy wiring) and is dropped
        for name, run in variants.items():
            sync(device)
            t0 = time.perf_counter()
            run()
            sync(device)
            if round_ > 0:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


BASELINE = {
    "bare fwd": "bare fwd",
    "bare fwd+bwd": "bare fwd+bwd",
    "mask fwd": "bare fwd",
    "mask fwd+bwd": "bare fwd+bwd",
    "mask fwd, no gather": "bare fwd",
    "mask fwd+bwd, no gather": "bare fwd+bwd",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["gemma-3-270m", "smollm2-135m"])
    parser.add_argument("--n", type=int, default=16, help="prompts in the batch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    lines = args.data.read_text("utf-8").splitlines()[: args.n]
    prompts = [line.split("\t")[0] for line in lines]
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    for name in args.models:
        model = sl.load_model(name, device=device)
        batch = sl.tokenize(model, prompts)
        ablation = sl.MeanAblation.from_prompts(model, prompts, progress=False)
        widths = batch.attention_mask.sum(-1)
        print(
            f"\n{name}: {len(prompts)} prompts, {int(widths.min())}-{int(widths.max())} tokens, "
            f"{len(sl.NodeGraph.from_model(model))} nodes, vocab {model.cfg.d_vocab}, "
            f"median of {args.repeats} interleaved repeats"
        )
        medians = time_variants(make_variants(model, batch, ablation, device), args.repeats, device)
        print(f"{'pass':<26}{'median s':>10}{'ratio':>8}  vs")
        for variant, seconds in medians.items():
            base = BASELINE[variant]
            ratio = seconds / medians[base]
            print(f"{variant:<26}{seconds:>10.3f}{ratio:>8.2f}  {base}")
        saved = medians["mask fwd+bwd, no gather"] / medians["mask fwd+bwd"]
        print(
            f"gathering the predicted position before the unembedding: fwd "
            f"{medians['mask fwd, no gather'] / medians['mask fwd']:.2f}x faster, "
            f"fwd+bwd {saved:.2f}x faster"
        )
        del model


if __name__ == "__main__":
    main()
