"""Synthetic ``TraceResult`` objects with known structure, for the figure tests.

Nodes enter in a planted order (MLPs and early layers first, late attention heads last), TV
falls with size at a per-prompt rate tied to the prompt's entropy, the shared nucleus rises as
TV falls, and the inverse subgraph does the opposite. Every number is a plain function of the
arguments, so a test can state what a figure must show.
"""

from __future__ import annotations

import torch

from strace_lens.graph import NodeGraph
from strace_lens.metrics import NUCLEUS_LEVELS
from strace_lens.result import TraceResult


def size_grid(n: int) -> list[int]:
    """A log-spaced integer grid from 1 to n (what a trace sweep typically uses)."""
    raw = torch.logspace(0, torch.log10(torch.tensor(float(n))), steps=min(n, 12))
    return sorted({round(float(v)) for v in raw} | {n})


def nucleus_from_tv(tv: torch.Tensor) -> torch.Tensor:
    """The largest nucleus level not above 100 (1 - 2 tv), 0 below the smallest level."""
    target = 100.0 * (1.0 - 2.0 * tv).clamp(min=0)
    levels = torch.tensor([0, *NUCLEUS_LEVELS], dtype=torch.float64)
    return levels[(levels[None] <= target.double().reshape(-1, 1)).sum(1) - 1].reshape(tv.shape)


def synthetic_result(
    n_layers: int = 3,
    n_heads: int = 4,
    n_prompts: int = 5,
    per: str = "input",
    method: str = "mask",
    model: str = "synthetic",
    seed: int = 0,
    shuffle: bool = False,
) -> TraceResult:
    gen = torch.Generator().manual_seed(seed)
    graph = NodeGraph(n_layers, n_heads)
    n = len(graph)
    sizes = torch.tensor(size_grid(n))
    rows = 1 if per == "dataset" else n_prompts
    depth = graph.layers.double() / max(n_layers - 1, 1)
    attn = graph.is_attn.double()
    masks = torch.zeros(rows, len(sizes), n, dtype=torch.bool)
    for r in range(rows):
        # Early nodes first; late attention heads last; a little noise per row.
        noise = torch.rand(n, generator=gen, dtype=torch.float64)
        priority = depth + 0.5 * attn * depth + 0.15 * noise
        if shuffle:  # a random baseline: no structure
            priority = torch.rand(n, generator=gen, dtype=torch.float64)
        order = torch.argsort(priority)
        for j, s in enumerate(sizes.tolist()):
            masks[r, j, order[:s]] = True
    entropy = 0.5 + 4.0 * torch.rand(n_prompts, generator=gen, dtype=torch.float64)
    rel = sizes.double() / n
    # Higher entropy -> slower decay -> larger area under the TV curve (denser input).
    noise = torch.rand(n_prompts, generator=gen, dtype=torch.float64)
    rate = (2.0 + 8.0 / entropy) * (0.6 + 0.8 * noise)
    tv = 0.9 * torch.exp(-rate[:, None] * rel[None]) * (1 - rel[None])
    if shuffle:
        tv = (0.9 * (1 - rel[None]) ** 0.5).expand(n_prompts, -1).clone()
    inv_tv = 0.95 * (1 - torch.exp(-6.0 * rel[None])).expand(n_prompts, -1).clone()
    metrics = {
        "tv": tv.float(),
        "kl": (2 * tv + 3 * tv**2).float(),
        "nucleus": nucleus_from_tv(tv).float(),
        "inv_tv": inv_tv.float(),
        "inv_kl": (2 * inv_tv + 3 * inv_tv**2).float(),
        "inv_nucleus": nucleus_from_tv(inv_tv).float(),
    }
    return TraceResult(
        graph=graph,
        sizes=sizes,
        masks=masks,
        metrics=metrics,
        entropy=entropy.float(),
        prompts=[f"synthetic prompt number {i} about something" for i in range(n_prompts)],
        top_tokens=torch.randint(0, 100, (n_prompts, len(sizes), 5), generator=gen),
        full_top_tokens=torch.randint(0, 100, (n_prompts, 5), generator=gen),
        candidates=torch.ones(n, dtype=torch.bool),
        options={"method": method, "per": per, "model": {"name": model}, "seed": seed},
        target_logprob=-entropy.float(),
    )
