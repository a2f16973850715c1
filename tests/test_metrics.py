"""Fidelity metrics on constructed distributions whose KL, TV, entropy and nucleus are known."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import strace_lens as sl


def logp(*probs: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Log-probabilities of an explicit distribution (zeros become -inf)."""
    return torch.tensor(probs, dtype=torch.float64).log().to(dtype)


def test_known_kl_tv_entropy_with_zeros():
    half = logp(0.5, 0.5, 0.0, 0.0)
    uniform = logp(0.25, 0.25, 0.25, 0.25)
    assert sl.kl_divergence(half, uniform).item() == pytest.approx(math.log(2), abs=1e-6)
    assert sl.tv_distance(half, uniform).item() == pytest.approx(0.5, abs=1e-6)
    assert sl.entropy(half).item() == pytest.approx(math.log(2), abs=1e-6)
    assert sl.entropy(uniform).item() == pytest.approx(math.log(4), abs=1e-6)
    # the subgraph gives zero to tokens the full model uses: KL is +inf, never NaN
    assert sl.kl_divergence(uniform, half).item() == math.inf
    # identical distributions, zeros included
    for d in (half, uniform):
        assert sl.kl_divergence(d, d).item() == 0.0
        assert sl.tv_distance(d, d).item() == 0.0
    # disjoint supports: TV is exactly 1
    assert sl.tv_distance(half, logp(0.0, 0.0, 0.3, 0.7)).item() == pytest.approx(1.0, abs=1e-6)
    # a point mass has zero entropy
    assert sl.entropy(logp(0.0, 1.0, 0.0)).item() == 0.0


def test_kl_against_a_direct_formula():
    p = torch.tensor([0.7, 0.2, 0.1, 0.0], dtype=torch.float64)
    q = torch.tensor([0.1, 0.3, 0.4, 0.2], dtype=torch.float64)
    expected = 0.7 * math.log(7) + 0.2 * math.log(2 / 3) + 0.1 * math.log(1 / 4)
    assert sl.kl_divergence(p.log(), q.log()).item() == pytest.approx(expected, abs=1e-12)
    expected_tv = 0.5 * (0.6 + 0.1 + 0.3 + 0.2)
    assert sl.tv_distance(p.log(), q.log()).item() == pytest.approx(expected_tv, abs=1e-12)
    expected_h = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    assert sl.entropy(p.log()).item() == pytest.approx(expected_h, abs=1e-12)


def test_batched_shapes_and_no_nan_gradient_with_zeros():
    full = torch.stack([logp(0.5, 0.5, 0.0, 0.0), logp(0.1, 0.2, 0.3, 0.4)])  # [2, 4]
    sub = torch.log_softmax(torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(0)), -1)
    sub.requires_grad_()
    kl = sl.kl_divergence(full, sub)  # broadcasts to [3, 2]
    assert kl.shape == (3, 2) and torch.isfinite(kl).all() and (kl > 0).all()
    kl.sum().backward()
    assert sub.grad is not None and torch.isfinite(sub.grad).all()
    for name, value in sl.fidelity(full, sub.detach()).items():
        assert value.shape == (3, 2), name
        assert torch.isfinite(value).all(), name
    assert sl.entropy(full).shape == (2,)


def nucleus_case(full: list[float], sub: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    # two zero-probability tokens appended to both: zeros must not disturb anything
    return logp(*full, 0.0, 0.0), logp(*sub, 0.0, 0.0)


def test_shared_nucleus_constructed_cases():
    # Levels avoid exact ties with cumulative sums. full cum: .62 .92 .98 1
    # -> nucleus size 1 up to 60 %, 2 for 70-90 %, 4 for 99 %.
    full = [0.62, 0.30, 0.06, 0.02]
    cases = [
        # same order; sub cum .55 .85 .97 1: sizes agree at <=50, 70, 80, 99 -> 99
        (99.0, [0.55, 0.30, 0.12, 0.03]),
        # tokens 1 and 2 swapped: common prefix is 1 token, sizes 1 agree up to 60 -> 60
        (60.0, [0.62, 0.06, 0.30, 0.02]),
        # tokens 2 and 3 swapped: prefix 2; sub cum .55 .85 .97 1 -> largest agreeing level
        # with at most 2 tokens is 80
        (80.0, [0.55, 0.30, 0.03, 0.12]),
        # top-1 differs -> 0
        (0.0, [0.30, 0.62, 0.06, 0.02]),
        # identical -> 99
        (99.0, full),
    ]
    pairs = [nucleus_case(full, sub) for _, sub in cases]
    full_batch = torch.stack([p for p, _ in pairs])
    sub_batch = torch.stack([q for _, q in pairs])
    got = sl.shared_nucleus(full_batch, sub_batch)
    assert got.tolist() == [expected for expected, _ in cases]
    assert sl.fidelity(full_batch, sub_batch)["nucleus"].tolist() == got.tolist()


def test_shared_nucleus_custom_levels():
    full, sub = nucleus_case([0.62, 0.30, 0.06, 0.02], [0.62, 0.06, 0.30, 0.02])
    assert sl.shared_nucleus(full, sub, levels=(10, 30)).item() == 30.0
    assert sl.shared_nucleus(full, sub, levels=(70, 90)).item() == 0.0


def test_shared_nucleus_symmetric_and_single_token():
    a, b = nucleus_case([0.62, 0.30, 0.06, 0.02], [0.55, 0.30, 0.03, 0.12])
    assert sl.shared_nucleus(a, b).item() == sl.shared_nucleus(b, a).item() == 80.0
    point = logp(0.0, 1.0, 0.0)
    assert sl.shared_nucleus(point, point).item() == 99.0
    assert sl.shared_nucleus(point, logp(1.0, 0.0, 0.0)).item() == 0.0


def brute_nucleus(p: list[float], q: list[float], levels=sl.NUCLEUS_LEVELS) -> float:
    """The definition, written out: largest level whose ranked nuclei are identical."""

    def nucleus(dist: list[float], level: float) -> list[int]:
        order = sorted(range(len(dist)), key=lambda i: (-dist[i], i))
        total, out = 0.0, []
        for i in order:
            out.append(i)
            total += dist[i]
            if total >= level - 1e-12:
                break
        return out

    best = 0.0
    for lv in levels:
        if nucleus(p, lv / 100) == nucleus(q, lv / 100):
            best = float(lv)
    return best


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 20), min_size=5, max_size=5),
    st.lists(st.integers(0, 20), min_size=5, max_size=5),
)
def test_metrics_match_definitions(a: list[int], b: list[int]):
    if sum(a) == 0 or sum(b) == 0:
        return
    p = [x / sum(a) for x in a]
    q = [x / sum(b) for x in b]
    lp = torch.tensor(p, dtype=torch.float64).log()
    lq = torch.tensor(q, dtype=torch.float64).log()
    # KL, with the conventions 0 log 0 = 0 and p log(p / 0) = inf
    if any(pi > 0 and qi == 0 for pi, qi in zip(p, q)):
        expected_kl = math.inf
    else:
        expected_kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)
    kl = sl.kl_divergence(lp, lq).item()
    assert kl == pytest.approx(expected_kl, abs=1e-12) or kl == expected_kl == math.inf
    assert sl.tv_distance(lp, lq).item() == pytest.approx(
        0.5 * sum(abs(pi - qi) for pi, qi in zip(p, q)), abs=1e-12
    )
    assert sl.entropy(lp).item() == pytest.approx(
        -sum(pi * math.log(pi) for pi in p if pi > 0), abs=1e-12
    )
    # integer counts over 5 tokens make ties common: compare only when the rank order of
    # each distribution is unambiguous (ties are ordered by token id in both, but that is a
    # convention, not the definition)
    if len(set(a)) == 5 and len(set(b)) == 5:
        assert sl.shared_nucleus(lp, lq).item() == brute_nucleus(p, q)
