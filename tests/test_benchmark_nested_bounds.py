"""benchmarks/strace_quality.py's two nested-family references (the family passing the most
pairs, and the family minimising the nested search's own objective) against brute force
over every nested family of a small random table."""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from strace_quality import best_nested_pass_rate, objective_optimal_family

from strace_lens.search.local_search import CHAIN_EPS

N_C, N_SIZES, N_PROMPTS = 5, 4, 3


def _tables(seed: int) -> list[torch.Tensor]:
    """KL ``[prompt, subset]`` of every subset of sizes 1..N_SIZES (itertools order): random,
    spread over decades so that the 5 % criterion both passes and fails."""
    gen = torch.Generator().manual_seed(seed)
    return [
        10 ** (2 * torch.rand(N_PROMPTS, math.comb(N_C, s), generator=gen) - 1)
        for s in range(1, N_SIZES + 1)
    ]


def _brute_force(tables, optima, per):
    """Max pass count, and (pass count, objective) of the objective's minimiser, per group,
    summed: every nested family of sizes 1..N_SIZES is an ordering of N_SIZES nodes."""
    values = [t if per == "input" else t.mean(0, keepdim=True) for t in tables]
    index = [
        {frozenset(c): i for i, c in enumerate(itertools.combinations(range(N_C), s))}
        for s in range(1, N_SIZES + 1)
    ]
    best_pass, opt_pass, opt_value = 0, 0, 0.0
    for g in range(values[0].shape[0]):
        scored = []
        for order in itertools.permutations(range(N_C), N_SIZES):
            passed, value = 0, 0.0
            for j in range(N_SIZES):
                kl = float(values[j][g, index[j][frozenset(order[: j + 1])]])
                opt = float(optima[g, j])
                passed += int(kl <= 1.05 * opt or kl - opt <= 1e-4)
                value += math.log(kl + CHAIN_EPS)
            scored.append((value, passed))
        best_pass += max(p for _, p in scored)
        value, passed = min(scored)
        opt_pass, opt_value = opt_pass + passed, opt_value + value
    return best_pass, opt_pass, opt_value


@pytest.mark.parametrize("per", ["input", "dataset"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nested_references_match_brute_force(per, seed):
    tables = _tables(seed)
    if per == "input":
        optima = torch.stack([t.min(-1).values for t in tables], -1)
    else:
        optima = torch.stack([t.mean(0).min() for t in tables])[None]
    pairs = optima.numel()
    best_pass, opt_pass, opt_value = _brute_force(tables, optima, per)
    assert best_nested_pass_rate(tables, optima, N_C, per) == pytest.approx(best_pass / pairs)
    rate, value = objective_optimal_family(tables, optima, N_C, per)
    assert rate == pytest.approx(opt_pass / pairs)
    assert value == pytest.approx(opt_value, rel=1e-9)
    # the objective's minimiser can pass no more pairs than the best family
    assert opt_pass <= best_pass
