"""Trace every method x per x ablation on the tiny model and save the results as golden data.

Run once with the code *before* a refactoring (``python tests/golden/make_golden.py``): the
results land in ``tests/data/golden/<case>/`` (``TraceResult.save``: safetensors + JSON), and
``tests/test_golden.py`` re-traces every case with the current code and compares bit for bit.
Single-threaded on CPU, so that float reductions run in one fixed order.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

#: short prompts for the byte-tokenizer tiny model
PROMPTS = ["The cat sat on the", "Paris is the capital of", "one two three"]
SIZES = [1, 4, 9, 15]
#: (case name, trace keyword arguments besides per and ablation); small steps, every method
METHODS: list[tuple[str, dict[str, Any]]] = [
    ("mask", dict(method="mask", steps=4, finetune_steps=3)),
    ("mask_independent", dict(method="mask", nested=False, steps=4, finetune_steps=3)),
    ("random", dict(method="random", draws=3)),
    ("greedy", dict(method="greedy")),
    ("attribution", dict(method="attribution")),
    ("forward", dict(method="forward")),
    # on 8 of the 15 nodes (the others always kept), to stay quick
    ("exhaustive", dict(method="exhaustive", candidates=list(range(8)), sizes=[1, 3, 8])),
]
PER = ("input", "dataset")
ABLATIONS = ("zero", "mean")
GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden"


def cases() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for name, kwargs in METHODS:
        for per in PER:
            for ablation in ABLATIONS:
                out.append(
                    (f"{name}-{per}-{ablation}", dict(kwargs, per=per, ablation=ablation, seed=0))
                )
    return out


def run_case(model: Any, kwargs: dict[str, Any]) -> Any:
    from strace_lens import trace

    return trace(model, PROMPTS, **{"sizes": SIZES, **kwargs})


def main() -> None:
    from strace_lens.tiny_model import tiny_model

    torch.set_num_threads(1)
    model = tiny_model(device="cpu")
    wanted = set(sys.argv[1:])
    for name, kwargs in cases():
        if wanted and name not in wanted:
            continue
        result = run_case(model, kwargs)
        result.save(GOLDEN / name)
        print(name, f"{result.options['seconds']:.1f} s", flush=True)


if __name__ == "__main__":
    main()
