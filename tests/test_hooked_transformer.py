"""Every public entry point on a legacy ``HookedTransformer`` (not only on TransformerBridge).

TransformerLens 3.x ships ``HookedTransformer``; 4.0 removed it, and there the module is
skipped with that reason (``.ci/test-tl3`` runs it on 3.x). The tiny model is built from a
``HookedTransformerConfig`` (no download) with the package's byte tokenizer, and checked
against its own forward pass and against hand-written hooks.
"""

from __future__ import annotations

import pytest
import torch
from test_masked_forward import hand_hooks, own_logprobs

import strace_lens as sl
from strace_lens.hygiene import _hook_counts
from strace_lens.tiny_model import TINY_CONFIG, byte_tokenizer

try:
    from transformer_lens import HookedTransformer, HookedTransformerConfig
except (ImportError, AttributeError) as err:  # TransformerLens 4 removed it
    pytest.skip(
        f"this TransformerLens has no HookedTransformer ({err}); only TransformerBridge "
        "models exist here, and the other test files cover them",
        allow_module_level=True,
    )

ATOL = 1e-5
PROMPTS = ["The cat sat on the", "Paris is the capital of", "one two three four"]


@pytest.fixture(scope="module")
def hooked():
    cfg = HookedTransformerConfig(**{**TINY_CONFIG, "n_ctx": 64})
    model = HookedTransformer(cfg, tokenizer=byte_tokenizer())
    model.eval()
    return model


@pytest.fixture
def tokens():
    return torch.randint(0, 200, (4, 9), generator=torch.Generator().manual_seed(0))


def test_graph_and_hook_points(hooked):
    graph = sl.NodeGraph.from_model(hooked)
    assert (graph.n_layers, graph.n_heads, len(graph)) == (3, 4, 15)
    sl.masked_forward.check_hook_points(hooked, graph)


def test_all_ones_is_the_models_own_forward(hooked, tokens):
    mask = torch.ones(tokens.shape[0], 15)
    got = sl.run_with_mask(hooked, tokens, mask)
    assert torch.allclose(got, own_logprobs(hooked, tokens).float(), atol=ATOL)


def test_partial_masks_match_hand_written_hooks(hooked, tokens):
    gen = torch.Generator().manual_seed(1)
    mask = torch.rand(tokens.shape[0], 15, generator=gen)
    mask[:, ::3] = 0.0
    got = sl.run_with_mask(hooked, tokens, mask)  # zero ablation
    want = own_logprobs(hooked, tokens, hand_hooks(hooked, {}, mask))
    assert torch.allclose(got, want.float(), atol=ATOL)
    mean = sl.MeanAblation.from_prompts(hooked, tokens, progress=False)
    got = sl.run_with_mask(hooked, tokens, mask, mean)
    with torch.no_grad():  # the means, by hand from a cache
        _, cache = hooked.run_with_cache(tokens)
    values = {}
    for layer in range(hooked.cfg.n_layers):
        for name in (f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.hook_mlp_out"):
            values[name] = cache[name].double().mean((0, 1))
    want = own_logprobs(hooked, tokens, hand_hooks(hooked, values, mask))
    assert torch.allclose(got, want.float(), atol=ATOL)


def test_string_prompts_tokenize_and_run(hooked):
    batch = sl.tokenize(hooked, PROMPTS)
    assert batch.batch_size == 3
    logprobs = sl.run_with_mask(hooked, PROMPTS, torch.ones(15))
    full = sl.run_with_mask(hooked, PROMPTS, torch.ones(3, 15))
    assert torch.allclose(logprobs, full) and sl.kl_divergence(full, logprobs).abs().max() < 1e-6


@pytest.mark.parametrize("per", ["input", "dataset"])
def test_trace_leaves_the_model_as_found(hooked, per):
    hooks_before = _hook_counts(hooked)
    weights = {k: v.clone() for k, v in hooked.state_dict().items()}
    result = sl.trace(hooked, PROMPTS, sizes=[1, 4, 15], per=per, steps=3, progress=False)
    assert result.per == per and result.sizes.tolist() == [1, 4, 15]
    assert result.metrics["kl"][:, -1].abs().max() < 1e-5  # the whole graph is the model
    assert _hook_counts(hooked) == hooks_before and not hooked.training
    assert all(torch.equal(v, weights[k]) for k, v in hooked.state_dict().items())
    assert all(p.grad is None for p in hooked.parameters())


def test_dataset_run_and_export(hooked, tmp_path):
    import strace_lens.export as export

    run = sl.trace_dataset(
        hooked, PROMPTS, tmp_path / "run", chunk_size=2, progress=False, sizes=[1, 15], steps=2
    )
    loaded = sl.load_run(tmp_path / "run")
    assert loaded.equals(run) and loaded.n_prompts == 3
    result = sl.trace(hooked, PROMPTS, sizes=[2, 15], per="dataset", steps=2, progress=False)
    path = export.to_eap_ig(result, tmp_path / "g.json", size=2)
    assert path.exists() and len(export.to_table(result)) == 3 * 2 * 15


def test_ablated_mlps_skipped_with_the_same_logprobs(hooked):
    """A HookedTransformer's MLP (hooked by its block) runs on the rows keeping it only, and
    every row's log-probs are those of computing it (strace_lens.skipped_mlps)."""
    from run_helpers import node_objective
    from test_skipped_mlps import _hard_masks, both_ways, grads_both_ways

    from strace_lens.skipped_mlps import mlp_kept_rows

    objective = node_objective(hooked, PROMPTS, "mean")
    masks = _hard_masks(6, len(objective.graph), seed=1)
    prompt = torch.arange(6) % 3
    kept = mlp_kept_rows(objective.graph, masks)
    assert 0 in kept, "the random masks ablate layer 0's MLP in some row"
    seen: list[int] = []
    # hook_pre sees the MLP's hidden activations: one row per row it computes
    handle = hooked.blocks[0].mlp.hook_pre.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].shape[0])
    )
    try:
        skipped, whole = both_ways(hooked, objective, masks, prompt)
    finally:
        handle.remove()
    torch.testing.assert_close(skipped, whole, rtol=0, atol=ATOL)
    assert seen == [len(kept[0]), 6]
    assert "forward" not in hooked.blocks[0].mlp.__dict__
    # with a gradient to the masks: the same KL and mask gradients
    (kl, grad), (kl_whole, grad_whole) = grads_both_ways(hooked, objective, masks, prompt)
    torch.testing.assert_close(kl, kl_whole, rtol=0, atol=ATOL)
    torch.testing.assert_close(grad, grad_whole, rtol=0, atol=ATOL)
    assert "forward" not in hooked.blocks[0].mlp.__dict__
