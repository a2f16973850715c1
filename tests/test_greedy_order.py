"""The write-norm best-first order of nodes (``greedy_order``): a hand-checked case, and the
same order as the plain reference written out below on random norms."""

from __future__ import annotations

import heapq

import torch

from strace_lens.search.baselines import greedy_order


def _reference(norms, layers, is_attn):
    """Best-first from the output, straight from the definition: pop the node of largest
    share, then offer every node that can feed it (heads feed their own layer's MLP and
    every later layer, an MLP every later layer) with its share among those sources. The
    feeding relation is built here as a whole matrix from the tensors, not by the
    implementation's pairwise predicate, so the two formulations check each other."""
    n = len(norms)
    w = [float(x) for x in norms]
    same_layer = layers[:, None] == layers[None, :]
    head_into_mlp = is_attn[:, None] & ~is_attn[None, :]
    feeds = (layers[:, None] < layers[None, :]) | (same_layer & head_into_mlp)  # [src, dst]
    total = sum(w) or 1.0
    heap = [(-w[u] / total, u) for u in range(n)]
    heapq.heapify(heap)
    chosen, taken = [], [False] * n
    while heap and len(chosen) < n:
        _, u = heapq.heappop(heap)
        if taken[u]:
            continue
        taken[u] = True
        chosen.append(u)
        sources = torch.nonzero(feeds[:, u]).flatten().tolist()
        norm = sum(w[v] for v in sources) or 1.0
        for v in sources:
            if not taken[v]:
                heapq.heappush(heap, (-w[v] / norm, v))
    return chosen


def test_hand_checked_order():
    # layer 0: head 0, head 1, mlp 2; layer 1: head 3, mlp 4
    layers = torch.tensor([0, 0, 0, 1, 1])
    is_attn = torch.tensor([True, True, False, True, False])
    norms = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    # 4 (5/15) first; its sources 0-3 share 10: 3 (0.4), then 3's sources 0-2 share 6:
    # 2 (0.5), whose sources 0, 1 share 3: 1 (2/3), then 0 (1/3)
    assert greedy_order(norms, layers, is_attn) == [4, 3, 2, 1, 0]


def test_same_order_as_the_reference_on_random_norms():
    gen = torch.Generator().manual_seed(0)
    for n_layers, n_heads in ((3, 4), (6, 9), (2, 1)):
        per = n_heads + 1
        layers = torch.arange(n_layers).repeat_interleave(per)
        is_attn = (torch.arange(n_layers * per) % per) < n_heads
        for _ in range(5):
            norms = torch.rand(n_layers * per, generator=gen) ** 3
            expected = _reference(norms.double().tolist(), layers, is_attn)
            assert greedy_order(norms, layers, is_attn) == expected
            assert sorted(expected) == list(range(n_layers * per))
