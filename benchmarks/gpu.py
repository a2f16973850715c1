"""Throughput and memory of s-Trace on a GPU machine (and the same figures on CPU).

One prepared script to run where a GPU is: for each model it prints

    mask fwd rows/s      run_with_mask on --n prompts (one random 0/1 mask per row, mean
                         ablation, no grad): rows per second, median of --repeats
    mask fwd+bwd rows/s  one step of the mask search: sigmoid(logits) -> run_with_mask ->
                         KL(full || sub) -> backward to the mask logits
    curve s/prompt       the whole curve: trace() of --curve-prompts prompts with the default
                         size grid and --steps optimisation steps, seconds per prompt
    peak GiB             CUDA: torch.cuda.max_memory_allocated over this model's passes;
                         CPU: the process's peak resident memory so far (ru_maxrss)

for the two embedded models (fp32 and --dtype) and for a random-weight model of
Llama-3-8B's shape (32 layers x 32 heads, d_model 4096, GQA 8 KV heads, d_mlp 14336,
vocab 128256, RMSNorm, rotary, gated SiLU MLP) in bf16, built with
``TransformerBridge.boot_native`` directly on the device (16 GB of bf16 weights; it is left
out on CPU unless --llama is given). Its prompts are tokenised by the byte tokenizer of the
tiny test model (one token per byte), so its sequences are about 4x longer than BPE ones.

    python benchmarks/gpu.py                      # on the GPU machine: every model
    python benchmarks/gpu.py --device cpu         # the CPU figures, embedded models
    python benchmarks/gpu.py --tiny               # seconds on CPU (CI): tiny models only

``--tiny`` swaps the models for the native:tiny test model and a Llama-shaped model scaled
down to 2 layers x 4 heads (the same boot_native path as the 8B one), with 4 prompts cut to
40 characters, 3 steps and 3 sizes.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import strace_lens as sl

DATA = Path(__file__).resolve().parents[1] / "strace_lens" / "data" / "wikitext_40_dev.tsv"

#: Llama-3-8B's shape (config.json of meta-llama/Meta-Llama-3-8B) as a native bridge config
LLAMA3_8B: dict[str, Any] = dict(
    n_layers=32,
    d_model=4096,
    n_heads=32,
    d_head=128,
    n_key_value_heads=8,
    d_mlp=14336,
    d_vocab=128256,
    n_ctx=8192,
    act_fn="silu",
    gated_mlp=True,
    normalization_type="RMS",
    final_rms=True,
    eps=1e-5,
    positional_embedding_type="rotary",
    rotary_base=500000,
    seed=0,
)
#: the same architecture scaled down, for --tiny
LLAMA_TINY = {
    **LLAMA3_8B,
    **dict(n_layers=2, d_model=64, n_heads=4, d_head=16, n_key_value_heads=2, d_mlp=128),
    **dict(d_vocab=259, n_ctx=512),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def llama_shaped(config: dict[str, Any], device: torch.device, dtype: torch.dtype) -> Any:
    """A random-weight native bridge of ``config``'s shape, built directly on ``device`` in
    ``dtype`` (an 8B model never exists in fp32 or on the CPU)."""
    from transformer_lens.model_bridge import TransformerBridge

    from strace_lens.tiny_model import byte_tokenizer

    boot = getattr(TransformerBridge, "boot_native")  # noqa: B009  (attached at import)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = boot(config, tokenizer=byte_tokenizer(), device=device, dtype=dtype)
    finally:
        torch.set_default_dtype(default)
    model.cfg.model_name = "llama-3-8b-shape" if config is LLAMA3_8B else "llama-shape-tiny"
    model.eval()
    return model


def peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 2**20


def median_seconds(run: Callable[[], None], repeats: int, device: torch.device) -> float:
    times = []
    for round_ in range(repeats + 1):  # round 0 warms up and is dropped
        sync(device)
        t0 = time.perf_counter()
        run()
        sync(device)
        if round_ > 0:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(
    model: Any, prompts: list[str], args: argparse.Namespace, device: torch.device
) -> dict[str, float]:
    batch = sl.tokenize(model, prompts)
    graph = sl.NodeGraph.from_model(model)
    ablation = sl.MeanAblation.from_prompts(model, prompts, progress=False)
    gen = torch.Generator().manual_seed(0)
    hard = (torch.rand(batch.batch_size, len(graph), generator=gen) > 0.5).float().to(device)
    logits0 = torch.randn(batch.batch_size, len(graph), generator=gen).to(device)
    with torch.no_grad():
        full = sl.run_with_mask(model, batch.tokens, torch.ones_like(hard), ablation)

    def mask_fwd() -> None:
        with torch.no_grad():
            sl.run_with_mask(model, batch.tokens, hard, ablation)

    def mask_fwd_bwd() -> None:
        mask_logits = logits0.clone().requires_grad_()
        sub = sl.run_with_mask(model, batch.tokens, torch.sigmoid(mask_logits), ablation)
        sl.kl_divergence(full, sub).sum().backward()

    fwd = median_seconds(mask_fwd, args.repeats, device)
    fwd_bwd = median_seconds(mask_fwd_bwd, args.repeats, device)
    curve_prompts = prompts[: args.curve_prompts]
    sync(device)
    t0 = time.perf_counter()
    options: dict[str, Any] = {} if args.steps is None else {"steps": args.steps}
    if args.sizes is not None:
        options["sizes"] = args.sizes
    sl.trace(model, curve_prompts, ablation=ablation, **options)
    sync(device)
    curve = (time.perf_counter() - t0) / len(curve_prompts)
    widths = batch.attention_mask.sum(-1)
    return {
        "nodes": len(graph),
        "tokens": float(widths.float().mean()),
        "fwd": batch.batch_size / fwd,
        "fwd_bwd": batch.batch_size / fwd_bwd,
        "curve": curve,
        "peak": peak_gib(device),
    }


def load(name: str, device: torch.device, dtype: torch.dtype) -> Any:
    if name == "llama-3-8b-shape":
        return llama_shaped(LLAMA3_8B, device, dtype)
    if name == "llama-shape-tiny":
        return llama_shaped(LLAMA_TINY, device, dtype)
    if name == "native:tiny":
        from strace_lens.tiny_model import tiny_model

        return tiny_model(device=device, dtype=dtype)
    return sl.load_model(name, device=device, dtype=dtype)


def plan(args: argparse.Namespace, device: torch.device) -> list[tuple[str, torch.dtype]]:
    half = getattr(torch, args.dtype)
    if args.tiny:
        return [("native:tiny", torch.float32), ("native:tiny", half), ("llama-shape-tiny", half)]
    runs = [(m, dt) for m in ("gemma-3-270m", "smollm2-135m") for dt in (torch.float32, half)]
    if device.type == "cuda" or args.llama:
        runs.append(("llama-3-8b-shape", torch.bfloat16))
    return [(m, dt) for m, dt in runs if args.models is None or m in args.models]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    parser.add_argument("--n", type=int, default=16, help="prompts (rows) per masked forward")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--curve-prompts", type=int, default=4, help="prompts traced for the curve")
    parser.add_argument(
        "--steps", type=int, default=None, help="mask-search steps (default: trace's)"
    )
    parser.add_argument(
        "--sizes", nargs="+", type=float, default=None, help="relative sizes (default: trace's)"
    )
    parser.add_argument("--models", nargs="+", default=None, help="only these (default: all)")
    parser.add_argument("--tiny", action="store_true", help="tiny models and settings (CPU, CI)")
    parser.add_argument("--llama", action="store_true", help="the 8B-shaped model on CPU too")
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    if args.tiny:
        args.n, args.repeats, args.curve_prompts = min(args.n, 4), min(args.repeats, 2), 2
        args.steps = args.steps or 3
        args.sizes = args.sizes or [0.1, 0.5, 1.0]
    lines = args.data.read_text("utf-8").splitlines()[: args.n]
    # --tiny: the first 40 characters (the tiny models' byte tokenizer makes a token per byte)
    prompts = [line.split("\t")[0][: 40 if args.tiny else None] for line in lines]
    device = torch.device(args.device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"torch {torch.__version__}, device {device} ({gpu}), threads {torch.get_num_threads()}, "
        f"{len(prompts)} prompts per pass, median of {args.repeats}, curve over "
        f"{args.curve_prompts} prompts, steps {args.steps or 'default'}, sizes "
        f"{args.sizes or 'default'}"
    )
    if device.type == "cpu" and not (args.tiny or args.llama):
        print("llama-3-8b-shape left out on CPU (16 GB of bf16 weights): --llama adds it")
    header = (
        f"{'model':<18}{'dtype':<10}{'nodes':>6}{'tokens':>7}"
        f"{'fwd rows/s':>12}{'fwd+bwd rows/s':>16}{'curve s/prompt':>16}{'peak GiB':>10}"
    )
    print(header)
    for name, dtype in plan(args, device):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        model = load(name, device, dtype)
        r = measure(model, prompts, args, device)
        dt = str(dtype).removeprefix("torch.")
        print(
            f"{name:<18}{dt:<10}{r['nodes']:>6d}{r['tokens']:>7.0f}{r['fwd']:>12.2f}"
            f"{r['fwd_bwd']:>16.2f}{r['curve']:>16.2f}{r['peak']:>10.2f}",
            flush=True,
        )
        del model
    sys.stdout.flush()


if __name__ == "__main__":
    main()
