"""Edge granularity through the stack: ``trace(granularity="edge")``, ``trace_dataset`` runs of
edge shards (resume, identity, workers), ``strace_lens.load`` and the command line."""

from __future__ import annotations

import pytest
import torch

from strace_lens import trace
from strace_lens.ablation import MeanAblation, ZeroAblation
from strace_lens.config import TraceConfig
from strace_lens.edges import EdgeTraceResult, edge_trace
from strace_lens.tiny_model import tiny_model

PROMPTS = ["The cat sat on", "Paris is the", "one two three", "She opened the", "In 1999 the"]
GRID = [0.01, 0.1, 0.5, 1.0]


@pytest.fixture(scope="module")
def model():
    """The native:tiny model (byte tokenizer: prompt strings work at edge granularity)."""
    return tiny_model(device="cpu")


def assert_same_edges(a: EdgeTraceResult, b: EdgeTraceResult) -> None:
    """Every stored tensor, prompt and option equal (wall time aside)."""
    assert (a.n_layers, a.n_heads, a.grid, a.nested) == (b.n_layers, b.n_heads, b.grid, b.nested)
    assert a.prompts == b.prompts
    for key in ("n_pos", "counts", "ids", "offsets", "entropy", "top_tokens", "full_top_tokens"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    assert a.metrics.keys() == b.metrics.keys()
    for key in a.metrics:
        assert torch.equal(a.metrics[key].float(), b.metrics[key].float()), key
    drop = ("seconds",)
    assert {k: v for k, v in a.options.items() if k not in drop} == {
        k: v for k, v in b.options.items() if k not in drop
    }


# -- trace(granularity="edge") ---------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"method": "random", "seed": 3},
        {"method": "random", "random_variant": "resid_mlp_first", "seed": 1},
        {"ablate_attention_edges": False},
        {"tokens": "transformer_lens"},
    ],
    ids=["greedy", "random", "random-resid-mlp-first", "attention-kept", "tl-tokens"],
)
def test_trace_at_edge_granularity_is_edge_trace(model, kwargs):
    got = trace(model, PROMPTS[:2], granularity="edge", sizes=GRID, **kwargs)
    assert isinstance(got, EdgeTraceResult)
    assert_same_edges(got, edge_trace(model, PROMPTS[:2], sizes=GRID, **kwargs))


def test_edge_defaults_are_the_papers(model):
    got = trace(model, PROMPTS[0], granularity="edge")
    assert got.grid == edge_trace(model, PROMPTS[0]).grid and len(got.grid) == 27
    assert got.options["method"] == "greedy" and got.nested
    assert got.options["ablate_attention_edges"] is True and got.options["tokens"] == "paper"
    # zero ablation named explicitly is the same trace
    again = trace(model, PROMPTS[0], granularity="edge", ablation=ZeroAblation())
    assert_same_edges(got, again)
    # batch_size (subgraphs per masked forward) does not change the result
    assert_same_edges(got, trace(model, PROMPTS[0], granularity="edge", batch_size=5))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"per": "dataset"}, "per='dataset' does not apply at granularity='edge'"),
        ({"ablation": "mean"}, "the paper's edge ablation is zero"),
        ({"keep": ["MLP0"]}, "keep names heads and MLPs, not edges"),
        ({"candidates": ["MLP0"]}, "candidates names heads and MLPs"),
        ({"inverse": True}, "inverse subgraphs are not scored at edge granularity"),
        ({"nested": False}, "nested=False does not apply"),
        ({"targets": [" mat"]}, "not recorded at edge granularity"),
        ({"method": "attribution"}, "choose one of greedy, random, mask"),
        ({"tokens": "bpe"}, "Unknown tokens='bpe'"),
        ({"sizes": [0.5, 0.1]}, "ascending"),
        ({"sizes": "log"}, "Unknown size grid 'log'"),
        ({"random_variant": "resid_mlp_first"}, "applies to method='random' only"),
    ],
)
def test_options_that_do_not_apply_at_edge_granularity_are_refused(model, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        trace(model, PROMPTS[0], granularity="edge", **kwargs)


def test_more_refusals_at_edge_granularity(model):
    with pytest.raises(ValueError, match="the paper's edge ablation is zero"):
        trace(
            model,
            PROMPTS[0],
            granularity="edge",
            ablation=MeanAblation.from_prompts(model, PROMPTS[:2], progress=False),
        )
    with pytest.raises(TypeError, match=r"Unknown option\(s\) at granularity='edge': \['steps'\]"):
        trace(model, PROMPTS[0], granularity="edge", steps=3)
    with pytest.raises(TypeError, match="prompts are strings"):
        trace(model, torch.tensor([[3, 4, 5]]), granularity="edge")
    with pytest.raises(ValueError, match="'token' is not wired into trace"):
        trace(model, PROMPTS[0], granularity="token")
    with pytest.raises(ValueError, match="granularity must be one of node, token, edge"):
        trace(model, PROMPTS[0], granularity="layer")
    with pytest.raises(ValueError, match="TraceConfig configures node-granularity traces"):
        TraceConfig(granularity="edge")


def test_node_granularity_is_unchanged_by_the_new_defaults(model):
    """method=None and inverse=None are trace's defaults now: they mean mask and True."""
    tokens = torch.tensor([[0, 5, 9, 12, 40], [0, 7, 7, 30, 2]])
    implicit = trace(model, tokens, sizes=[1, 3], steps=2)
    explicit = trace(model, tokens, sizes=[1, 3], steps=2, method="mask", inverse=True)
    assert implicit.equals(explicit) and implicit.method == "mask"
    assert implicit.options["inverse"] is True and implicit.options["method"] == "mask"
