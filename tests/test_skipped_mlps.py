"""Rows that ablate an MLP do not compute it: the same log-probs as computing it, the MLP run
on the kept rows only, and every module's ``forward`` restored, also after an error."""

from __future__ import annotations

import pytest
import torch
from run_helpers import node_objective

import strace_lens as sl
import strace_lens.skipped_mlps as skipped_mlps
from strace_lens.hygiene import model_untouched
from strace_lens.skipped_mlps import _mlp_module, mlp_kept_rows, mlps_on_kept_rows
from strace_lens.tiny_model import tiny_model


@pytest.fixture
def tiny():
    return tiny_model()


PROMPTS = ["hello there friend", "a b", "the quick brown fox jumps over"]


def both_ways(model, objective, masks, prompt):
    """The objective's log-probs of the rows with ablated MLPs skipped, then with every MLP
    computed (``skipped_mlps.ENABLED = False``, switched back on afterwards)."""
    with model_untouched(model):
        skipped = objective.logprobs(masks, prompt)
        skipped_mlps.ENABLED = False
        try:
            whole = objective.logprobs(masks, prompt)
        finally:
            skipped_mlps.ENABLED = True
    return skipped, whole


def test_kept_rows_by_hand():
    graph = sl.NodeGraph(n_layers=3, n_heads=2)  # 3 nodes a layer: head 0, head 1, MLP
    mask = torch.ones(4, 9)
    mask[0, 2] = 0.0  # row 0 ablates layer 0's MLP
    mask[2, 2] = 0.0  # row 2 too
    mask[1, 5] = 0.0  # row 1 ablates layer 1's MLP
    mask[3, 6] = 0.0  # a head of layer 2: no MLP skipped there
    mask[3, 8] = 0.5  # a partly kept MLP is computed
    kept = mlp_kept_rows(graph, mask)
    assert sorted(kept) == [0, 1]
    assert kept[0].tolist() == [1, 3]
    assert kept[1].tolist() == [0, 2, 3]
    # with a gradient to the masks, the same rows keep the MLP (the others compute it
    # without a gradient)
    with_grad = mlp_kept_rows(graph, mask.clone().requires_grad_(True))
    assert {k: v.tolist() for k, v in with_grad.items()} == {0: [1, 3], 1: [0, 2, 3]}
    # and the switch the speed benchmark turns off
    skipped_mlps.ENABLED = False
    try:
        assert mlp_kept_rows(graph, mask) == {}
    finally:
        skipped_mlps.ENABLED = True


def grads_both_ways(model, objective, masks, prompt):
    """The KL of each row and its gradient to the masks, with ablated MLPs computed without
    a gradient, then with every MLP computed with one (``ENABLED = False``)."""
    out = []
    with model_untouched(model):
        for enabled in (True, False):
            skipped_mlps.ENABLED = enabled
            try:
                m = masks.clone().requires_grad_(True)
                weights = torch.linspace(0.5, 1.5, len(prompt))
                kl = objective.kl_backward(m * 1.0, prompt, weights)
            finally:
                skipped_mlps.ENABLED = True
            assert m.grad is not None
            out.append((kl.detach(), m.grad))
    return out


def _hard_masks(n_rows: int, n_nodes: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(n_rows, n_nodes, generator=gen) < 0.5).float()


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_same_logprobs_and_mlp_runs_kept_rows_only(tiny, ablation):
    """Every row's log-probs are those of a run computing every MLP (to float32 rounding of
    a product over fewer rows), and each MLP module sees only the rows keeping it."""
    objective = node_objective(tiny, PROMPTS, ablation)
    graph = objective.graph
    masks = _hard_masks(12, len(graph), seed=3)
    prompt = torch.arange(12) % 3
    seen: dict[int, list[int]] = {}
    handles = [
        _first_linear(_mlp_module(tiny, layer)).register_forward_pre_hook(
            lambda _m, args, layer=layer: seen.setdefault(layer, []).append(args[0].shape[0])
        )
        for layer in range(graph.n_layers)
    ]
    try:
        skipped, whole = both_ways(tiny, objective, masks, prompt)
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(skipped, whole, rtol=0, atol=1e-5)
    kept = mlp_kept_rows(graph, masks)
    assert kept, "the random masks ablate some MLP"
    for layer in range(graph.n_layers):
        # the skipping run first, then the whole one
        assert seen[layer] == [len(kept[layer]) if layer in kept else 12, 12]


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_gradient_rows_compute_ablated_mlps_without_a_gradient(tiny, ablation):
    """A pass with a gradient to the masks gives the KL and mask gradients of computing every
    MLP with a gradient (to float32 rounding): an ablating row's MLP runs without one (its
    output is still needed: the gradient to an ablated MLP's own mask is not zero)."""
    objective = node_objective(tiny, PROMPTS, ablation)
    graph = objective.graph
    masks = _hard_masks(6, len(graph), seed=11)
    masks[0, graph.n_heads] = 0.0  # an ablated MLP, whose mask gradient is checked below
    prompt = torch.arange(6) % 3
    rows_by_grad: dict[bool, list[int]] = {True: [], False: []}
    handle = _first_linear(_mlp_module(tiny, 0)).register_forward_pre_hook(
        lambda _m, args: rows_by_grad[torch.is_grad_enabled()].append(args[0].shape[0])
    )
    try:
        (kl, grad), (kl_whole, grad_whole) = grads_both_ways(tiny, objective, masks, prompt)
    finally:
        handle.remove()
    torch.testing.assert_close(kl, kl_whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad, grad_whole, rtol=0, atol=1e-6)
    assert float(grad[0, graph.n_heads].abs()) > 1e-3
    kept = int(masks[:, graph.n_heads].sum())
    assert 0 < kept < 6
    # the skipping pass: kept rows with a gradient, the others without; then the whole pass
    assert rows_by_grad == {True: [kept, 6], False: [6 - kept]}


def _first_linear(module: torch.nn.Module) -> torch.nn.Module:
    """The MLP's first projection: its input rows are the rows the MLP computes."""
    return next(m for m in module.modules() if isinstance(m, torch.nn.Linear))


def test_an_mlp_no_row_keeps_runs_on_no_row(tiny):
    objective = node_objective(tiny, PROMPTS, "mean")
    graph = objective.graph
    masks = torch.ones(3, len(graph))
    masks[:, graph.n_heads] = 0.0  # layer 0's MLP ablated in every row
    skipped, whole = both_ways(tiny, objective, masks, torch.arange(3))
    torch.testing.assert_close(skipped, whole, rtol=0, atol=1e-5)


def test_forward_restored_after_an_error_and_an_own_forward_kept(tiny):
    graph = sl.NodeGraph.from_model(tiny)
    modules = [_mlp_module(tiny, layer) for layer in range(graph.n_layers)]
    own = modules[1].forward  # a bound method stored on the instance, as accelerate does

    def wrapped(*args, **kwargs):
        return own(*args, **kwargs)

    modules[1].forward = wrapped
    kept = {layer: torch.tensor([0]) for layer in range(graph.n_layers)}
    with pytest.raises(RuntimeError, match="boom"):
        with mlps_on_kept_rows(tiny, kept, n_rows=2):
            assert all("forward" in m.__dict__ for m in modules)
            raise RuntimeError("boom")
    assert "forward" not in modules[0].__dict__ and "forward" not in modules[2].__dict__
    assert modules[1].__dict__["forward"] is wrapped


def test_token_rows_skip_an_mlp_ablated_at_every_position(tiny):
    """A token mask skips a row's MLP only where it ablates it at every position; the
    log-probs are those of computing it."""
    from strace_lens.ablation import MeanAblation
    from strace_lens.masked_forward import forward_logprobs
    from strace_lens.token_trace import TokenObjective

    prompts = ["abcdef", "uvwxyz"]  # one length: a token batch has no padding
    graph = sl.NodeGraph.from_model(tiny)
    batch = sl.tokenize(tiny, prompts)
    n_pos = int(batch.tokens.shape[1])
    abl = MeanAblation.from_prompts(tiny, prompts, progress=False)
    with torch.no_grad(), model_untouched(tiny):
        logp_full = forward_logprobs(tiny, batch, [])
    cand = torch.ones(len(graph) * n_pos, dtype=torch.bool)
    objective = TokenObjective(tiny, graph, batch, logp_full, abl, cand, n_pos=n_pos)
    gen = torch.Generator().manual_seed(5)
    units = (torch.rand(4, graph.n_layers, graph.n_heads + 1, n_pos, generator=gen) < 0.5).float()
    units[0, 0, graph.n_heads] = 0.0  # row 0: layer 0's MLP ablated everywhere
    units[1, 0, graph.n_heads] = 0.0  # row 1 too, but for one position
    units[1, 0, graph.n_heads, 2] = 1.0
    units[2:, 0, graph.n_heads] = 1.0
    masks = units.flatten(1)
    kept = objective.mlp_kept_rows(masks)
    assert kept[0].tolist() == [1, 2, 3]
    prompt = torch.tensor([0, 1, 0, 1])
    skipped, whole = both_ways(tiny, objective, masks, prompt)
    torch.testing.assert_close(skipped, whole, rtol=0, atol=1e-5)
    (kl, grad), (kl_whole, grad_whole) = grads_both_ways(tiny, objective, masks, prompt)
    torch.testing.assert_close(kl, kl_whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad, grad_whole, rtol=0, atol=1e-6)


def test_an_mlp_returning_a_tuple_runs_whole():
    """An MLP whose output is not one tensor (a mixture of experts' (output, router logits))
    is run on every row, as if nothing were skipped."""

    class TupleMLP(torch.nn.Module):
        def forward(self, x):
            return x * 2, x.sum()

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = TupleMLP()

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([Block()])

    model = Model()
    x = torch.arange(6.0).reshape(3, 2)
    with mlps_on_kept_rows(model, {0: torch.tensor([1])}, n_rows=3):
        out, total = model.blocks[0].mlp(x)
    assert torch.equal(out, x * 2) and float(total) == 15.0
    assert "forward" not in model.blocks[0].mlp.__dict__
