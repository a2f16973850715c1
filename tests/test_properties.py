"""Property-based tests (hypothesis) of the invariants every trace must keep, on a tiny model."""

from __future__ import annotations

import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strace_lens import trace
from strace_lens.graph import NodeGraph
from strace_lens.result import TraceResult
from strace_lens.tiny_model import tiny_model

PROMPTS = ["The cat sat on the", "Paris is the capital of"]
N_NODES = 15  # 3 layers x (4 heads + 1 MLP)
# A handful of examples each: every example is a real trace on the tiny model.
FEW = settings(
    max_examples=5,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def model():
    return tiny_model(device="cpu")


@st.composite
def search_space(draw):
    """A candidate set (>= 2 nodes; all other nodes kept) and sizes within it."""
    cand = draw(st.sets(st.integers(0, N_NODES - 1), min_size=2, max_size=N_NODES))
    sizes = draw(st.sets(st.integers(1, len(cand)), min_size=1, max_size=4))
    return sorted(cand), sorted(sizes)


def method_options(method: str) -> dict:
    return {"steps": 2} if method == "mask" else {}


@FEW
@given(space=search_space(), method=st.sampled_from(["mask", "random", "attribution", "greedy"]))
def test_every_mask_holds_exactly_s_candidates_and_keeps_the_rest(model, space, method):
    cand, sizes = space
    result = trace(
        model,
        PROMPTS,
        sizes=sizes,
        candidates=cand,
        method=method,
        progress=False,
        inverse=False,
        **method_options(method),
    )
    is_cand = torch.zeros(N_NODES, dtype=torch.bool)
    is_cand[cand] = True
    assert torch.equal(result.candidates, is_cand)
    assert result.sizes.tolist() == sizes
    chosen = result.masks[:, :, is_cand].sum(-1)  # [R, S]
    assert torch.equal(chosen, result.sizes.expand_as(chosen))
    assert bool(result.masks[:, :, ~is_cand].all())


@FEW
@given(
    cand=st.sets(st.integers(0, N_NODES - 1), min_size=1, max_size=N_NODES),
    ablation=st.sampled_from(["mean", "zero"]),
    method=st.sampled_from(["mask", "random", "attribution"]),
)
def test_the_full_graph_gives_kl_zero(model, cand, ablation, method):
    result = trace(
        model,
        PROMPTS,
        sizes=[len(cand)],
        candidates=sorted(cand),
        ablation=ablation,
        method=method,
        progress=False,
        **method_options(method),
    )
    assert bool(result.masks.all())
    assert float(result.metrics["kl"].abs().max()) < 1e-6
    assert float(result.metrics["tv"].max()) < 1e-4
    assert torch.all(result.metrics["nucleus"] == 99)
    # its inverse ablates every candidate: it differs from the full model
    assert float(result.metrics["inv_kl"].min()) > 0


@FEW
@given(
    space=search_space(),
    method=st.sampled_from(["mask", "greedy"]),
    per=st.sampled_from(["input", "dataset"]),
)
def test_nested_subgraphs_are_nested(model, space, method, per):
    cand, sizes = space
    result = trace(
        model,
        PROMPTS,
        sizes=sizes,
        candidates=cand,
        method=method,
        per=per,
        nested=True,
        progress=False,
        inverse=False,
        **method_options(method),
    )
    assert result.is_nested
    m = result.masks  # sizes ascending
    assert not bool((m[:, :-1] & ~m[:, 1:]).any())
    # entry sizes: a node of the largest subgraph enters at a grid size, never later than s_max
    entry = result.entry_sizes()
    inside = m[:, -1] & result.candidates
    assert bool((entry[inside] <= result.sizes.max()).all())


@st.composite
def synthetic_results(draw):
    n_layers, n_heads = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    graph = NodeGraph(n_layers, n_heads)
    n = len(graph)
    n_p = draw(st.integers(1, 3))
    sizes = draw(st.sets(st.integers(1, n), min_size=1, max_size=3))
    n_s = len(sizes)
    per_dataset = draw(st.booleans())
    rows = 1 if per_dataset else n_p
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    floats = st.floats(allow_nan=False, width=32)
    metrics = {
        name: torch.tensor(draw(st.lists(floats, min_size=n_p * n_s, max_size=n_p * n_s))).reshape(
            n_p, n_s
        )
        for name in ("kl", "tv", "nucleus", "inv_kl")
    }
    target = None
    if draw(st.booleans()):
        target = torch.tensor(draw(st.lists(floats, min_size=n_p, max_size=n_p)))
    return TraceResult(
        graph=graph,
        sizes=torch.tensor(sorted(sizes)),
        masks=torch.rand(rows, n_s, n, generator=gen) > 0.5,
        metrics=metrics,
        entropy=torch.rand(n_p, generator=gen),
        prompts=draw(st.lists(st.text(max_size=30), min_size=n_p, max_size=n_p)),
        top_tokens=torch.randint(0, 1000, (n_p, n_s, 5), generator=gen),
        full_top_tokens=torch.randint(0, 1000, (n_p, 5), generator=gen),
        candidates=torch.rand(n, generator=gen) > 0.3,
        options=draw(
            st.dictionaries(
                st.text(min_size=1, max_size=8),
                st.one_of(st.integers(), st.text(max_size=10), st.booleans(), st.none()),
                max_size=4,
            )
        ),
        target_logprob=target,
    )


@settings(max_examples=30, deadline=None, derandomize=True)
@given(result=synthetic_results())
def test_saved_result_loads_back_identical(result):
    with tempfile.TemporaryDirectory() as folder:
        result.save(folder)
        loaded = TraceResult.load(folder)
    assert loaded.equals(result)
    assert loaded.prompts == result.prompts and loaded.options == result.options


@FEW
@given(space=search_space(), method=st.sampled_from(["mask", "random"]))
def test_traced_result_loads_back_identical(model, space, method):
    cand, sizes = space
    result = trace(
        model,
        PROMPTS,
        sizes=sizes,
        candidates=cand,
        method=method,
        progress=False,
        targets=[" mat", " France"],
        **method_options(method),
    )
    with tempfile.TemporaryDirectory() as folder:
        result.save(folder)
        loaded = TraceResult.load(folder)
    assert loaded.equals(result)
    assert torch.equal(loaded.masks, result.masks)
