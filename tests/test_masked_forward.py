"""The masked forward pass on tiny native models, checked against hand-written hook runs.

Every reference here is computed without strace-lens' hook code: plain ``run_with_hooks``
calls that zero or overwrite ``hook_z`` / ``hook_mlp_out``, and the model's own forward.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny

import strace_lens as sl
from strace_lens.graph import NodeGraph
from strace_lens.inputs import tokenize
from strace_lens.masked_forward import forward_logprobs

ATOL32 = 1e-5


def own_logprobs(model, tokens: torch.Tensor, fwd_hooks=(), **kwargs) -> torch.Tensor:
    """The model's log-probs at the last position, optionally with hand-written hooks."""
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=list(fwd_hooks), **kwargs)
    return torch.log_softmax(logits[:, -1].to(torch.float64), -1)


def hand_hooks(model, values: dict[str, torch.Tensor | None], scale: torch.Tensor | None = None):
    """Hooks that write ``v + a * (x - v)`` on every hook_z / hook_mlp_out, written plainly.

    ``values[name]`` is the replacement (None: zero). ``scale`` is a [batch, node] mask in the
    NodeGraph order; None means 0 everywhere (full ablation).
    """
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    hooks = []
    for layer in range(n_layers):
        for kind in ("attn", "mlp"):
            name = (
                f"blocks.{layer}.attn.hook_z" if kind == "attn" else f"blocks.{layer}.hook_mlp_out"
            )
            value = values.get(name)

            def hook(x, hook, value=value, layer=layer, kind=kind):
                v = torch.zeros_like(x) if value is None else value.to(x.dtype).expand_as(x)
                if scale is None:
                    return v.clone()
                first = layer * (n_heads + 1)
                if kind == "attn":
                    a = scale[:, first : first + n_heads].to(x.dtype)[:, None, :, None]
                else:
                    a = scale[:, first + n_heads].to(x.dtype)[:, None, None]
                return v + a * (x - v)

            hooks.append((name, hook))
    return hooks


# -- all ones: the model itself ------------------------------------------------------------
@pytest.mark.parametrize("gather", [True, False])
def test_all_ones_reproduces_model(tiny, tiny_tokens, gather):
    graph = NodeGraph.from_model(tiny)
    expected = own_logprobs(tiny, tiny_tokens)
    batch = tokenize(tiny, tiny_tokens)
    with sl.hygiene.model_untouched(tiny):
        direct = forward_logprobs(tiny, batch, [], gather=gather)
    masked = sl.run_with_mask(tiny, tiny_tokens, torch.ones(len(tiny_tokens), len(graph)))
    assert masked.shape == (4, 50)
    assert (masked.double() - expected).abs().max() <= ATOL32
    assert (direct.double() - expected).abs().max() <= ATOL32
    # probabilities, not logits
    assert torch.allclose(masked.exp().sum(-1), torch.ones(4), atol=1e-5)


@pytest.mark.parametrize("n_rows", [1, 3, 8, 9, 17])
def test_gathered_and_full_unembedding_agree(tiny64, n_rows):
    """The gather pads its rows (to a multiple of 8 on CPU); only each prompt's own row counts."""
    graph = NodeGraph.from_model(tiny64)
    gen = torch.Generator().manual_seed(n_rows)
    tokens = torch.randint(0, 50, (n_rows, 6), generator=gen)
    attention = torch.ones_like(tokens)
    attention[0, 4:] = 0  # row 0 predicts from position 3, the others from 5
    batch = tokenize(tiny64, tokens, attention)
    mask = torch.rand(n_rows, len(graph), generator=gen, dtype=torch.float64)
    hooks = sl.masked_forward.node_hooks(graph, mask, sl.ZeroAblation(), batch)
    with sl.hygiene.model_untouched(tiny64):
        gathered = forward_logprobs(tiny64, batch, hooks, gather=True)
        full = forward_logprobs(tiny64, batch, hooks, gather=False)
    assert gathered.shape == full.shape == (n_rows, 50)
    assert (gathered - full).abs().max() <= 1e-12
    # the CPU unembedding runs a multiple of 8 rows, at least 16: the gathered rows padded
    # with copies of the first, not every row repeated (8x the rows of an odd count)
    seen: list[int] = []
    with sl.hygiene.model_untouched(tiny64):
        with tiny64.hooks(fwd_hooks=[("unembed.hook_in", lambda x, hook: seen.append(x.shape[0]))]):
            forward_logprobs(tiny64, batch, hooks, gather=True)
    assert seen == [max(16, -(-n_rows // 8) * 8)]


def test_all_ones_with_grad_reproduces_model(tiny, tiny_tokens):
    """A mask that requires grad attaches every hook; at 1 they must still be the identity."""
    graph = NodeGraph.from_model(tiny)
    ones = torch.ones(len(tiny_tokens), len(graph), requires_grad=True)
    for ablation in (
        sl.ZeroAblation(),
        sl.MeanAblation.from_prompts(tiny, tiny_tokens, progress=False),
    ):
        masked = sl.run_with_mask(tiny, tiny_tokens, ones, ablation)
        assert (masked.double() - own_logprobs(tiny, tiny_tokens)).abs().max() <= ATOL32


# -- all zeros: hand-written ablations -----------------------------------------------------
def test_all_zeros_zero_ablation_equals_hand_hooks(tiny, tiny_tokens):
    graph = NodeGraph.from_model(tiny)
    masked = sl.run_with_mask(tiny, tiny_tokens, torch.zeros(4, len(graph)), sl.ZeroAblation())
    expected = own_logprobs(tiny, tiny_tokens, hand_hooks(tiny, {}))
    assert (masked.double() - expected).abs().max() <= ATOL32
    # and the ablation really did something
    assert (masked.double() - own_logprobs(tiny, tiny_tokens)).abs().max() > 1e-2


def test_zero_ablation_removes_every_node_contribution(tiny64, tiny_tokens):
    """With every node zeroed, the last residual is embed + pos_embed + the output biases.

    Checked with a different mechanism from the hooks: drop all blocks' computation by hand.
    """
    graph = NodeGraph.from_model(tiny64)
    masked = sl.run_with_mask(tiny64, tiny_tokens, torch.zeros(4, len(graph)))
    with torch.no_grad():
        _, cache = tiny64.run_with_cache(tiny_tokens)
        resid = cache["hook_embed"] + cache["hook_pos_embed"]
        for layer in range(tiny64.cfg.n_layers):
            block = tiny64.blocks[layer]
            resid = (
                resid + block.attn.o.original_component.bias + block.mlp.out.original_component.bias
            )
        logits = tiny64.unembed(tiny64.ln_final(resid))
    expected = torch.log_softmax(logits[:, -1], -1)
    assert (masked - expected).abs().max() <= 1e-10


def test_all_zeros_mean_ablation_equals_hand_written_means(tiny, tiny_tokens):
    graph = NodeGraph.from_model(tiny)
    reference = torch.randint(0, 50, (6, 7), generator=torch.Generator().manual_seed(5))
    mean = sl.MeanAblation.from_prompts(tiny, reference, progress=False)
    # the means, computed here by hand from a cache
    with torch.no_grad():
        _, cache = tiny.run_with_cache(reference)
    values = {}
    for layer in range(tiny.cfg.n_layers):
        for name in (f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.hook_mlp_out"):
            values[name] = cache[name].double().mean((0, 1))
    masked = sl.run_with_mask(tiny, tiny_tokens, torch.zeros(4, len(graph)), mean)
    expected = own_logprobs(tiny, tiny_tokens, hand_hooks(tiny, values))
    assert (masked.double() - expected).abs().max() <= ATOL32
    zeroed = own_logprobs(tiny, tiny_tokens, hand_hooks(tiny, {}))
    assert (masked.double() - zeroed).abs().max() > 1e-3  # means are not zeros


def test_all_zeros_per_position_means_equal_hand_written(tiny64, tiny_tokens):
    """Per-position means: position t of every prompt gets the mean over reference prompts'
    position t; beyond the longest reference prompt, the overall mean."""
    graph = NodeGraph.from_model(tiny64)
    reference = torch.randint(0, 50, (5, 6), generator=torch.Generator().manual_seed(7))
    mean = sl.MeanAblation.from_prompts(tiny64, reference, per_position=True, progress=False)
    with torch.no_grad():
        _, cache = tiny64.run_with_cache(reference)
    values = {}
    for name in cache:
        if name.endswith(("hook_z", "hook_mlp_out")):
            by_pos = cache[name].mean(0)  # [6, ...]: reference prompts are 6 tokens long
            beyond = cache[name].mean((0, 1))[None].expand(3, *by_pos.shape[1:])
            values[name] = torch.cat([by_pos, beyond])[None]  # tiny_tokens have 9 positions
    masked = sl.run_with_mask(tiny64, tiny_tokens, torch.zeros(4, len(graph)), mean)
    expected = own_logprobs(tiny64, tiny_tokens, hand_hooks(tiny64, values))
    assert (masked - expected).abs().max() <= 1e-12
    # tiny_tokens' last position (8) is beyond the reference, so it reads the overall mean;
    # with every node ablated nothing moves across positions, and the two ablations agree
    overall = sl.MeanAblation(mean.attn, mean.mlp)
    zeros = torch.zeros(15)
    assert (sl.run_with_mask(tiny64, tiny_tokens, zeros, overall) - masked).abs().max() <= 1e-12
    # a 5-token prompt predicts from position 4, inside the table: now they differ
    short = tiny_tokens[:, :5]
    by_position = sl.run_with_mask(tiny64, short, zeros, mean)
    assert (sl.run_with_mask(tiny64, short, zeros, overall) - by_position).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["zero", "mean"])
def test_fractional_mask_interpolates(tiny64, tiny_tokens, kind):
    graph = NodeGraph.from_model(tiny64)
    mask = torch.rand(
        4, len(graph), generator=torch.Generator().manual_seed(2), dtype=torch.float64
    )
    values: dict[str, torch.Tensor | None] = {}
    ablation: sl.Ablation = sl.ZeroAblation()
    if kind == "mean":
        ablation = sl.MeanAblation.from_prompts(tiny64, tiny_tokens, progress=False)
        with torch.no_grad():
            _, cache = tiny64.run_with_cache(tiny_tokens)
        values = {
            name: cache[name].mean((0, 1))
            for name in cache
            if name.endswith(("hook_z", "hook_mlp_out"))
        }
    masked = sl.run_with_mask(tiny64, tiny_tokens, mask, ablation)
    expected = own_logprobs(tiny64, tiny_tokens, hand_hooks(tiny64, values, scale=mask))
    assert masked.dtype == torch.float64
    assert (masked - expected).abs().max() <= 1e-12


def test_single_node_ablation_touches_only_that_head(tiny64, tiny_tokens):
    """Mask index -> (layer, head) follows NodeGraph: ablating a1.h2 == zeroing that slice."""
    graph = NodeGraph.from_model(tiny64)
    mask = torch.ones(len(graph), dtype=torch.float64)
    mask[graph.index("a1.h2")] = 0

    def zero_head(z, hook):
        z = z.clone()
        z[:, :, 2] = 0
        return z

    masked = sl.run_with_mask(tiny64, tiny_tokens, mask)
    expected = own_logprobs(tiny64, tiny_tokens, [("blocks.1.attn.hook_z", zero_head)])
    assert (masked - expected).abs().max() <= 1e-12
    assert (masked - own_logprobs(tiny64, tiny_tokens)).abs().max() > 1e-4


# -- batching ------------------------------------------------------------------------------
def test_rows_with_different_masks_equal_one_at_a_time(tiny, tiny_tokens):
    graph = NodeGraph.from_model(tiny)
    gen = torch.Generator().manual_seed(3)
    mask = (torch.rand(4, len(graph), generator=gen) > 0.5).float()
    mask[1] = torch.rand(len(graph), generator=gen)  # one fractional row as well
    mean = sl.MeanAblation.from_prompts(tiny, tiny_tokens, progress=False)
    for ablation in (sl.ZeroAblation(), mean):
        batched = sl.run_with_mask(tiny, tiny_tokens, mask, ablation)
        for row in range(4):
            alone = sl.run_with_mask(
                tiny, tiny_tokens[row : row + 1], mask[row : row + 1], ablation
            )
            assert (batched[row] - alone[0]).abs().max() <= ATOL32


def test_one_prompt_many_masks(tiny, tiny_tokens):
    """A single prompt with a [k, node] mask runs k subgraphs of that prompt."""
    graph = NodeGraph.from_model(tiny)
    masks = (torch.rand(3, len(graph), generator=torch.Generator().manual_seed(4)) > 0.3).float()
    out = sl.run_with_mask(tiny, tiny_tokens[:1], masks)
    assert out.shape == (3, 50)
    for k in range(3):
        alone = sl.run_with_mask(tiny, tiny_tokens[:1], masks[k])
        assert (out[k] - alone[0]).abs().max() <= ATOL32


def _padded(rows: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), 7, dtype=torch.long)  # pad id: any real token id
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        sl_ = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        tokens[i, sl_] = r
        attention[i, sl_] = 1
    return tokens, attention


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("kind", ["zero", "mean", "mean_per_position"])
def test_prompts_of_different_lengths_batched_equal_alone(tiny64, side, kind):
    """Exact in float64. (In float32, BLAS kernels change with the padded width, so even a
    prompt padded alone moves by ~1e-7 on the tiny model; float64 removes that noise so that
    any real leak of padding into a prompt would show up.)"""
    graph = NodeGraph.from_model(tiny64)
    gen = torch.Generator().manual_seed(6)
    rows = [torch.randint(0, 50, (n,), generator=gen) for n in (3, 9, 5, 12)]
    mask = torch.rand(4, len(graph), generator=gen, dtype=torch.float64)
    ablation: sl.Ablation = sl.ZeroAblation()
    if kind != "zero":
        reference = torch.randint(0, 50, (5, 8), generator=gen)
        ablation = sl.MeanAblation.from_prompts(
            tiny64, reference, per_position=kind == "mean_per_position", progress=False
        )
    tokens, attention = _padded(rows, side)
    batched = sl.run_with_mask(tiny64, tokens, mask, ablation, attention_mask=attention)
    for i, r in enumerate(rows):
        alone = sl.run_with_mask(tiny64, r[None], mask[i : i + 1], ablation)
        assert (batched[i] - alone[0]).abs().max() <= 1e-12, (side, kind, i)


def test_left_padded_all_ones_equals_unpadded_model(tiny64):
    gen = torch.Generator().manual_seed(8)
    rows = [torch.randint(0, 50, (n,), generator=gen) for n in (4, 10)]
    tokens, attention = _padded(rows, "left")
    graph = NodeGraph.from_model(tiny64)
    out = sl.run_with_mask(tiny64, tokens, torch.ones(2, len(graph)), attention_mask=attention)
    for i, r in enumerate(rows):
        assert (out[i] - own_logprobs(tiny64, r[None])[0]).abs().max() <= 1e-12


# -- gradients -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["zero", "mean"])
def test_mask_gradient_matches_finite_differences(tiny64, tiny_tokens, kind):
    graph = NodeGraph.from_model(tiny64)
    ablation: sl.Ablation = sl.ZeroAblation()
    if kind == "mean":
        ablation = sl.MeanAblation.from_prompts(tiny64, tiny_tokens, progress=False)
    gen = torch.Generator().manual_seed(9)
    # interior points, so central differences stay inside [0, 1]
    mask = (
        0.1 + 0.8 * torch.rand(2, len(graph), generator=gen, dtype=torch.float64)
    ).requires_grad_()
    weights = torch.randn(2, 50, generator=gen, dtype=torch.float64)

    def f(m: torch.Tensor) -> torch.Tensor:
        return (sl.run_with_mask(tiny64, tiny_tokens[:2], m, ablation) * weights).sum(-1)

    assert torch.autograd.gradcheck(f, (mask,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradient_at_all_ones_matches_one_sided_difference(tiny64, tiny_tokens):
    """At mask = 1 (where attribution methods take gradients) every hook must be attached."""
    graph = NodeGraph.from_model(tiny64)
    ones = torch.ones(1, len(graph), dtype=torch.float64, requires_grad=True)
    target = 3
    out = sl.run_with_mask(tiny64, tiny_tokens[:1], ones)[0, target]
    (grad,) = torch.autograd.grad(out, ones)
    assert grad.abs().min() > 0  # every node has some effect on this tiny model
    h = 1e-6
    for node in (0, graph.index("m0"), graph.index("a2.h3"), len(graph) - 1):
        lowered = torch.ones(1, len(graph), dtype=torch.float64)
        lowered[0, node] -= h
        fd = (out.detach() - sl.run_with_mask(tiny64, tiny_tokens[:1], lowered)[0, target]) / h
        assert abs(float(fd - grad[0, node])) <= 1e-4 * max(1.0, abs(float(grad[0, node])))


def test_backward_reaches_mask_not_parameters(tiny, tiny_tokens):
    graph = NodeGraph.from_model(tiny)
    mask = torch.full((4, len(graph)), 0.5, requires_grad=True)
    out = sl.run_with_mask(tiny, tiny_tokens, mask)
    out[:, 0].sum().backward()
    assert mask.grad is not None and torch.isfinite(mask.grad).all() and mask.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny.parameters())
    assert all(p.requires_grad for p in tiny.parameters())


# -- inputs and errors ---------------------------------------------------------------------
def test_single_node_mask_broadcasts_over_batch(tiny, tiny_tokens):
    graph = NodeGraph.from_model(tiny)
    mask = (torch.arange(len(graph)) % 2).float()
    one = sl.run_with_mask(tiny, tiny_tokens, mask)
    many = sl.run_with_mask(tiny, tiny_tokens, mask.expand(4, -1))
    assert torch.equal(one, many)
    bool_mask = sl.run_with_mask(tiny, tiny_tokens, mask.bool())
    assert torch.equal(one, bool_mask)


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ((4, 14), r"\[4, 15\]"),
        ((3, 15), r"\[4, 15\]"),
        ((4, 15, 1), r"\[4, 15\]"),
        ((16,), r"\[4, 15\]"),
    ],
)
def test_wrong_mask_shape_is_a_clear_error(tiny, tiny_tokens, shape, expected):
    with pytest.raises(ValueError, match=expected):
        sl.run_with_mask(tiny, tiny_tokens, torch.ones(shape))


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan"), float("inf")])
def test_mask_outside_unit_interval_is_a_clear_error(tiny, tiny_tokens, bad):
    mask = torch.ones(4, 15)
    mask[2, 3] = bad
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sl.run_with_mask(tiny, tiny_tokens, mask)


def test_mask_not_a_tensor_is_a_clear_error(tiny, tiny_tokens):
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        sl.run_with_mask(tiny, tiny_tokens, [[1.0] * 15] * 4)


def test_empty_prompts_are_clear_errors(tiny):
    mask = torch.ones(15)
    with pytest.raises(ValueError, match="empty"):
        sl.run_with_mask(tiny, [], mask)
    with pytest.raises(ValueError, match="Prompt 1 is empty"):
        sl.run_with_mask(tiny, ["a", ""], mask)
    with pytest.raises(ValueError, match="Prompt 0 is empty or whitespace"):
        sl.run_with_mask(tiny, "  \n", mask)


def test_prompt_longer_than_context_is_a_clear_error(tiny):
    tokens = torch.zeros(1, tiny.cfg.n_ctx + 1, dtype=torch.long)
    with pytest.raises(ValueError, match=f"context of {tiny.cfg.n_ctx}.*shorten"):
        sl.run_with_mask(tiny, tokens, torch.ones(15))
    # exactly the context length is fine
    out = sl.run_with_mask(tiny, tokens[:, 1:], torch.ones(15))
    assert out.shape == (1, 50)


def test_model_missing_a_hook_point_is_named(tiny, tiny_tokens):
    class Stripped:
        """Something TransformerLens-like that lacks one hook point."""

        def __init__(self) -> None:
            self.cfg = tiny.cfg
            self.hook_dict = {
                k: v for k, v in tiny.hook_dict.items() if k != "blocks.1.hook_mlp_out"
            }

    with pytest.raises(ValueError, match=r"'blocks\.1\.hook_mlp_out'"):
        sl.run_with_mask(Stripped(), tiny_tokens, torch.ones(15))
    with pytest.raises(TypeError, match="TransformerLens model"):
        sl.run_with_mask(torch.nn.Linear(2, 2), tiny_tokens, torch.ones(15))


def test_mean_ablation_from_another_model_is_rejected(tiny, tiny_tokens):
    other = make_tiny(n_layers=2)
    mean = sl.MeanAblation.from_prompts(other, tiny_tokens, progress=False)
    with pytest.raises(ValueError, match="2 layers"):
        sl.run_with_mask(tiny, tiny_tokens, torch.ones(15), mean)


def test_strings_without_a_tokenizer_are_a_clear_error(tiny):
    with pytest.raises(ValueError, match=r"no tokenizer.*token ids"):
        sl.run_with_mask(tiny, ["hello"], torch.ones(15))
