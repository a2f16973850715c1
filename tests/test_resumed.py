"""Rows resumed at layer L from a cached residual: the same KL as a whole forward, blocks
restored afterwards, and the nested growth unchanged by resuming its proposals."""

from __future__ import annotations

import pytest
import torch
from run_helpers import node_objective

import strace_lens as sl
from strace_lens.ablation import resolve_ablation
from strace_lens.hygiene import model_untouched
from strace_lens.masked_forward import forward_logprobs
from strace_lens.search.mask_options import MaskOptions
from strace_lens.search.nested import grow_nested
from strace_lens.search.objective import SubgraphObjective
from strace_lens.tiny_model import tiny_model


@pytest.fixture
def tiny():
    """The 3-layer test model with its byte tokenizer (string prompts of other lengths)."""
    return tiny_model()


@pytest.fixture
def prompts():
    # different lengths: right padding, rows trimmed to different widths
    return ["hello there friend", "a b", "the quick brown fox jumps over"]


def _objective(model, prompts, ablation="mean"):
    return node_objective(model, prompts, ablation)


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_resumed_rows_equal_whole_forwards(tiny, prompts, ablation):
    """Proposals that change nodes from layer L on, run from the base mask's residual at L,
    give the KL of a whole masked forward (hard masks run by ``run_with_mask``)."""
    gen = torch.Generator().manual_seed(0)
    with model_untouched(tiny):
        objective = _objective(tiny, prompts, ablation)
        graph = objective.graph
        assert objective.can_resume()
        base = torch.rand(3, len(graph), generator=gen) < 0.5
        store = objective.residual_store()
        m = base.float().requires_grad_(True)
        objective.kl_backward(m * 1.0, torch.arange(3), torch.ones(3), store)
        masks, prompt, start = [], [], []
        for p in range(3):
            for layer in range(graph.n_layers):
                new = base[p].clone()
                own = torch.arange(
                    layer * graph.nodes_per_layer, (layer + 1) * graph.nodes_per_layer
                )
                new[own] = ~new[own]  # flip every node of this layer: all later ones as base
                masks.append(new)
                prompt.append(p)
                start.append(layer)
        masks_t, prompt_t = torch.stack(masks), torch.tensor(prompt)
        whole_first = objective.kl(masks_t.float(), prompt_t)
        resumed = objective.kl(masks_t.float(), prompt_t, torch.tensor(start), store)
        # a whole forward after resumed ones is unchanged (nothing of the skipping is left)
        whole = objective.kl(masks_t.float(), prompt_t)
    torch.testing.assert_close(whole, whole_first, rtol=0, atol=0)
    abl = resolve_ablation(ablation, tiny, prompts, progress=False)
    batch = sl.tokenize(tiny, prompts)
    full = forward_logprobs(tiny, batch, [])
    reference = torch.stack(
        [
            sl.kl_divergence(
                full[p : p + 1], sl.run_with_mask(tiny, prompts[p], masks_t[i : i + 1].float(), abl)
            )[0]
            for i, p in enumerate(prompt)
        ]
    )
    torch.testing.assert_close(resumed, whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(resumed, reference, rtol=1e-5, atol=1e-6)
    assert len(set(resumed.tolist())) > 3  # the flips matter: not one value for every row
    assert _no_instance_forward(tiny)


def _no_instance_forward(model) -> bool:
    """No module of the model (wrapped modules included) keeps a per-instance ``forward``."""
    return all("forward" not in module.__dict__ for module in model.modules())


def test_blocks_are_restored_when_a_resumed_forward_fails(tiny, prompts):
    tokens = sl.tokenize(tiny, prompts).tokens
    with torch.no_grad():
        before = tiny(tokens)
    with model_untouched(tiny):
        objective = _objective(tiny, prompts)
        store = objective.residual_store()
        m = torch.ones(1, len(objective.graph))
        bad = store[..., :3]  # a residual of the wrong width (d_model): block 2 fails
        with pytest.raises(RuntimeError):
            objective.kl(m, torch.tensor([2]), torch.tensor([2]), bad)
    assert _no_instance_forward(tiny)
    with torch.no_grad():
        assert torch.equal(tiny(tokens), before)


@pytest.mark.parametrize("per", ["input", "dataset"])
def test_nested_growth_is_the_same_with_and_without_resuming(tiny, prompts, per, monkeypatch):
    n = 15
    groups = len(prompts) if per == "input" else 1
    gen = torch.Generator().manual_seed(3)
    ranking, guide = torch.randn(groups, n, generator=gen), torch.randn(groups, n, generator=gen)
    sizes = torch.tensor([1, 2, 4, 9, 15])
    with model_untouched(tiny):
        objective = _objective(tiny, prompts)
        resumed = grow_nested(objective, ranking, sizes, per, MaskOptions(), guide)
        layer_rows_resumed = objective.layer_rows
        rows_resumed = objective.rows_evaluated
        monkeypatch.setattr(SubgraphObjective, "can_resume", lambda self: False)
        objective = _objective(tiny, prompts)
        whole = grow_nested(objective, ranking, sizes, per, MaskOptions(), guide)
    assert torch.equal(resumed, whole)
    assert objective.rows_evaluated == rows_resumed
    # the same rows, fewer blocks run
    assert layer_rows_resumed < objective.layer_rows == rows_resumed * objective.graph.n_layers


def test_a_model_without_start_at_layer_falls_back_to_whole_forwards(tiny, prompts, monkeypatch):
    """TransformerLens 3.x's bridge raises NotImplementedError for ``start_at_layer``: the
    growth then runs whole forwards, with the same result, and stops trying to resume."""
    import strace_lens.search.objective as objective_module

    n, sizes = 15, torch.tensor([1, 2, 4, 9, 15])
    gen = torch.Generator().manual_seed(5)
    ranking, guide = torch.randn(len(prompts), n, generator=gen), torch.randn(3, n, generator=gen)
    with model_untouched(tiny):
        expected = grow_nested(
            _objective(tiny, prompts), ranking, sizes, "input", MaskOptions(), guide
        )
        calls = []

        def refuse(*args, **kwargs):
            calls.append(1)
            raise NotImplementedError("start_at_layer is not supported")

        monkeypatch.setattr(objective_module, "resumed_logprobs", refuse)
        objective = _objective(tiny, prompts)
        got = grow_nested(objective, ranking, sizes, "input", MaskOptions(), guide)
    assert torch.equal(got, expected)
    assert len(calls) == 1 and not objective.can_resume()
    assert objective.layer_rows == objective.rows_evaluated * objective.graph.n_layers


def test_a_model_whose_forward_lacks_start_at_layer_is_not_resumed(tiny, prompts):
    """A model with blocks and residual hooks but no ``start_at_layer`` argument (a plain
    Hugging Face-style forward) is run whole: ``can_resume`` checks the signature."""
    from strace_lens.search.resumed import can_resume

    batch = sl.tokenize(tiny, prompts)
    assert can_resume(tiny, batch)

    class NoResume(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.cfg, self.blocks = inner, inner.cfg, inner.blocks
            self.hook_dict = inner.hook_dict

        def forward(self, tokens, attention_mask=None):
            return self.inner(tokens, attention_mask=attention_mask)

    assert not can_resume(NoResume(tiny), batch)
