"""Exact edge ablation (strace_lens/edges/forward.py) against a hand-written masked forward."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import dev_prompts, make_tiny

from strace_lens.edges import EdgeGraph, EdgeMasks, edge_tokenize, run_with_edge_masks
from strace_lens.inputs import tokenize
from strace_lens.masked_forward import forward_logprobs


def _w(module):
    inner = module.original_component
    return inner.weight, inner.bias


def hand_forward(model, tokens, masks: EdgeMasks):
    """The native tiny model written out by hand, each edge term scaled by its mask.

    resid_mid = r_attn * resid_pre + sum_{h, j} mask[h, t, j] A[h, t, j] v_j W_O^h + b_O
    resid_post = r_mlp * resid_mid + m * MLP(LN2(resid_mid))
    """
    cfg = model.cfg
    n_heads, d_head = cfg.n_heads, cfg.d_head
    n_kv = cfg.n_key_value_heads or n_heads
    b, t = tokens.shape
    x = model.embed.original_component.weight[tokens]
    x = x + model.pos_embed.original_component.weight[:t]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for layer in range(cfg.n_layers):
        blk = model.blocks[layer]
        ln1 = blk.ln1.original_component
        h = F.layer_norm(x, (cfg.d_model,), ln1.weight, ln1.bias, ln1.eps)
        (wq, bq), (wk, bk), (wv, bv), (wo, bo) = (
            _w(blk.attn.q),
            _w(blk.attn.k),
            _w(blk.attn.v),
            _w(blk.attn.o),
        )
        q = (h @ wq.T + bq).view(b, t, n_heads, d_head)
        k = (h @ wk.T + bk).view(b, t, n_kv, d_head).repeat_interleave(n_heads // n_kv, 2)
        v = (h @ wv.T + bv).view(b, t, n_kv, d_head).repeat_interleave(n_heads // n_kv, 2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d_head)
        pattern = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        pattern = pattern * masks.attn[:, layer]
        z = torch.einsum("bhqk,bkhd->bqhd", pattern, v).reshape(b, t, n_heads * d_head)
        attn_out = z @ wo.T + bo
        mid = masks.resid[:, layer, 0, :, None] * x + attn_out
        ln2 = blk.ln2.original_component
        (w1, b1), (w2, b2) = _w(getattr(blk.mlp, "in")), _w(blk.mlp.out)
        mlp = F.gelu(F.layer_norm(mid, (cfg.d_model,), ln2.weight, ln2.bias, ln2.eps) @ w1.T + b1)
        mlp = mlp @ w2.T + b2
        x = masks.resid[:, layer, 1, :, None] * mid + masks.mlp[:, layer, :, None] * mlp
    lnf = model.ln_final.original_component
    final = F.layer_norm(x[:, -1], (cfg.d_model,), lnf.weight, lnf.bias, lnf.eps)
    wu, bu = _w(model.unembed)
    return torch.log_softmax(final @ wu.T + bu, -1)


def _tokens(t: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 50, (1, t), generator=torch.Generator().manual_seed(seed))


def _one_edge_removed(graph: EdgeGraph, name: str) -> EdgeMasks:
    keep = torch.ones(1, graph.n_edges, dtype=torch.float64)
    keep[0, graph.index(name)] = 0.0
    return EdgeMasks.from_edges(graph, keep)


@pytest.mark.parametrize("n_kv", [4, 2, 1])
def test_hand_written_forward_matches_with_random_float_masks(n_kv):
    model = make_tiny(torch.float64, n_key_value_heads=n_kv)
    tokens = _tokens()
    graph = EdgeGraph.from_model(model, tokens.shape[1])
    gen = torch.Generator().manual_seed(1)
    keep = torch.rand(3, graph.n_edges, generator=gen, dtype=torch.float64)
    masks = EdgeMasks.from_edges(graph, keep)
    got = run_with_edge_masks(model, tokenize(model, tokens), masks)
    with torch.no_grad():
        want = hand_forward(model, tokens.expand(3, -1), masks)
    assert (got - want).abs().max() <= 1e-10
    # and the masks really matter: the rows differ from each other and from the clean model
    assert (got[0] - got[1]).abs().max() > 1e-3


@pytest.mark.parametrize("n_kv", [4, 2])
@pytest.mark.parametrize("name", ["a1.h2:1->4", "a0.h3:5->5", "r1.attn:3", "r0.mlp:2", "m1:4"])
def test_removing_one_edge_matches_hand_written_forward(n_kv, name):
    model = make_tiny(torch.float64, n_key_value_heads=n_kv)
    tokens = _tokens()
    graph = EdgeGraph.from_model(model, tokens.shape[1])
    masks = _one_edge_removed(graph, name)
    got = run_with_edge_masks(model, tokenize(model, tokens), masks)
    with torch.no_grad():
        want = hand_forward(model, tokens, masks)
        clean = forward_logprobs(model, tokenize(model, tokens), [])
    assert (got - want).abs().max() <= 1e-10
    assert (got - clean).abs().max() > 1e-8  # the edge had an effect


def test_last_block_edges_into_the_last_position():
    model = make_tiny(torch.float64, n_key_value_heads=2)
    tokens = _tokens()
    graph = EdgeGraph.from_model(model, 6)
    for name in ["a2.h1:0->5", "r2.attn:5", "r2.mlp:5", "m2:5"]:
        masks = _one_edge_removed(graph, name)
        got = run_with_edge_masks(model, tokenize(model, tokens), masks)
        with torch.no_grad():
            want = hand_forward(model, tokens, masks)
        assert (got - want).abs().max() <= 1e-10, name


def test_all_kept_is_the_model_and_all_ablated_is_the_zero_run(tiny64):
    tokens = _tokens(7)
    batch = tokenize(tiny64, tokens)
    graph = EdgeGraph.from_model(tiny64, 7)
    all_kept = EdgeMasks.from_edges(graph, torch.ones(2, graph.n_edges, dtype=torch.float64))
    kept = run_with_edge_masks(tiny64, batch, all_kept)
    with torch.no_grad():
        clean = forward_logprobs(tiny64, batch.repeat_interleave(2), [])
    assert torch.equal(kept, clean)
    ablated = run_with_edge_masks(
        tiny64, batch, EdgeMasks.from_edges(graph, torch.zeros(1, graph.n_edges))
    )
    with torch.no_grad():
        # every edge out: attention adds only its bias b_O, the MLP and skips are cut, so the
        # last block's output is exactly zero, and the logits are those of a zero residual
        zero = tiny64.unembed(tiny64.ln_final(torch.zeros(1, 1, tiny64.cfg.d_model).double()))
        want = torch.log_softmax(zero[:, 0], -1)
    assert (ablated - want).abs().max() <= 1e-12


def test_pruned_and_non_edge_slots_cannot_change_the_output(tiny64):
    tokens = _tokens(6)
    graph = EdgeGraph.from_model(tiny64, 6)
    gen = torch.Generator().manual_seed(3)
    keep = torch.rand(1, graph.n_edges, generator=gen, dtype=torch.float64)
    outs = []
    for fill in (0.0, 1.0, 0.37):
        masks = EdgeMasks.from_edges(graph, keep, fill=fill)
        outs.append(run_with_edge_masks(tiny64, tokenize(tiny64, tokens), masks))
    # random values in every non-edge slot too
    dense = graph.dense_mask(keep)
    noise = torch.rand(dense.shape, generator=gen, dtype=torch.float64)
    dense = torch.where(graph.valid, dense, noise)
    outs.append(
        run_with_edge_masks(tiny64, tokenize(tiny64, tokens), EdgeMasks.from_dense(graph, dense))
    )
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


def test_masks_are_differentiable(tiny64):
    tokens = _tokens(5)
    graph = EdgeGraph.from_model(tiny64, 5)
    keep = torch.full((1, graph.n_edges), 0.5, dtype=torch.float64, requires_grad=True)
    out = run_with_edge_masks(tiny64, tokenize(tiny64, tokens), EdgeMasks.from_edges(graph, keep))
    out[0, 3].backward()
    assert keep.grad is not None
    kinds = graph.edge_fields["kind"]
    for kind in range(4):  # attention, residual, MLP edges all receive gradient
        assert keep.grad[0, kinds == kind].abs().sum() > 0
    # the gradient agrees with a finite difference on one attention edge
    e = graph.index("a1.h0:0->3")
    eps = 1e-6
    with torch.no_grad():
        up, down = keep.detach().clone(), keep.detach().clone()
        up[0, e] += eps
        down[0, e] -= eps
        batch = tokenize(tiny64, tokens)
        f_up = run_with_edge_masks(tiny64, batch, EdgeMasks.from_edges(graph, up))[0, 3]
        f_down = run_with_edge_masks(tiny64, batch, EdgeMasks.from_edges(graph, down))[0, 3]
    assert abs(float((f_up - f_down) / (2 * eps)) - float(keep.grad[0, e])) < 1e-6


def test_keeping_attention_edges_leaves_the_pattern_alone(tiny64):
    tokens = _tokens(6)
    graph = EdgeGraph.from_model(tiny64, 6)
    keep = torch.ones(1, graph.n_edges, dtype=torch.float64)
    keep[0, graph.edge_fields["kind"] == 0] = 0.0  # every attention edge out
    batch = tokenize(tiny64, tokens)
    masks = EdgeMasks.from_edges(graph, keep)
    cut = run_with_edge_masks(tiny64, batch, masks)
    counted_only = run_with_edge_masks(tiny64, batch, masks, ablate_attention_edges=False)
    with torch.no_grad():
        clean = forward_logprobs(tiny64, batch, [])
    assert torch.equal(counted_only, clean)
    assert (cut - clean).abs().max() > 1e-3


def test_bridge_hook_semantics_the_design_relies_on(tiny64):
    """On a TransformerBridge, hook_resid_mid is the MLP norm's input: a value returned there
    reaches the MLP but not the block's skip connection (so forward.py also rewrites
    hook_resid_post); and an edit of hook_pattern changes hook_z."""
    tokens = _tokens(5)
    seen: dict[str, torch.Tensor] = {}

    def save(key):
        def hook(x, hook):
            seen[key] = x.detach().clone()

        return hook

    names = ["blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"]
    names.append("blocks.1.attn.hook_z")
    with torch.no_grad():
        tiny64.run_with_hooks(tokens, fwd_hooks=[(n, save(n)) for n in names])
        clean = dict(seen)
        tiny64.run_with_hooks(
            tokens,
            fwd_hooks=[("blocks.1.hook_resid_mid", lambda x, hook: 2 * x)]
            + [(n, save(n)) for n in names[1:]],
        )
    mid = clean["blocks.1.hook_resid_mid"]
    assert (seen["blocks.1.hook_mlp_out"] - clean["blocks.1.hook_mlp_out"]).abs().max() > 1e-6
    skip = seen["blocks.1.hook_resid_post"] - seen["blocks.1.hook_mlp_out"]
    assert (skip - mid).abs().max() <= 1e-12  # the skip still carries the unedited state
    with torch.no_grad():

        def cut(p, hook):
            p = p.clone()
            p[:, 2, 4, 1] = 0
            return p

        tiny64.run_with_hooks(
            tokens, fwd_hooks=[("blocks.1.attn.hook_pattern", cut), (names[3], save(names[3]))]
        )
    dz = (seen[names[3]] - clean[names[3]]).abs()
    assert dz[0, 4, 2].max() > 1e-6
    dz[0, 4, 2] = 0
    assert dz.max() == 0


# -- the embedded models --------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.parametrize("name", ["smollm2", "gemma"])
def test_real_models_all_kept_and_all_ablated(name, request):
    model = request.getfixturevalue(name)
    batch = edge_tokenize(model, " ".join(dev_prompts(1)[0].split()[:12]))
    t = batch.tokens.shape[1]
    graph = EdgeGraph.from_model(model, t)
    keep = torch.ones(2, graph.n_edges)
    keep[1] = 0.0
    got = run_with_edge_masks(model, batch, EdgeMasks.from_edges(graph, keep))
    with torch.no_grad():
        clean = forward_logprobs(model, batch.repeat_interleave(2), [])
        zero = model.unembed(model.ln_final(torch.zeros(1, 1, model.cfg.d_model)))
        want_zero = torch.log_softmax(zero[:, 0].float(), -1)
    assert (got[0] - clean[0]).abs().max() <= 1e-5
    assert (got[1] - want_zero[0]).abs().max() <= 1e-4


@pytest.mark.integration
def test_gemma_attention_edge_through_the_post_attention_norm(gemma):
    """Cutting one attention edge of block l changes resid_mid[t] of that block exactly as
    resid_pre + post_norm(attention output without that term), by hand from the clean run."""
    batch = edge_tokenize(gemma, "The quick brown fox jumps over")
    t = batch.tokens.shape[1]
    graph = EdgeGraph.from_model(gemma, t)
    layer, head, j, q = 3, 2, 1, t - 2
    names = [f"blocks.{layer}.{n}" for n in ("hook_resid_pre", "attn.hook_z", "hook_resid_mid")]
    seen: dict[str, torch.Tensor] = {}

    def save(key):
        def hook(x, hook):
            seen[key] = x.detach().clone()

        return hook

    with torch.no_grad():
        gemma.run_with_hooks(batch.tokens, fwd_hooks=[(n, save(n)) for n in names])
    pre, z = seen[names[0]][0], seen[names[1]][0]
    pattern_hooks = []

    def keep_pattern(p, hook):
        seen["pattern"] = p.detach().clone()

    pattern_hooks.append((f"blocks.{layer}.attn.hook_pattern", keep_pattern))
    v_name = f"blocks.{layer}.attn.hook_v"
    pattern_hooks.append((v_name, save(v_name)))
    with torch.no_grad():
        gemma.run_with_hooks(batch.tokens, fwd_hooks=pattern_hooks)
        pattern, v = seen["pattern"][0], seen[v_name][0]
        n_rep = gemma.cfg.n_heads // v.shape[1]
        v_h = v[:, head // n_rep]
        z_cut = z[q].clone()
        z_cut[head] -= pattern[head, q, j] * v_h[j]
        raw = z_cut.reshape(-1) @ gemma.blocks[layer].attn.o.original_component.weight.T
        want_mid = pre[q] + gemma.blocks[layer].ln1_post(raw[None, None])[0, 0]

    masks = _one_edge_removed(graph, f"a{layer}.h{head}:{j}->{q}")
    masks = EdgeMasks(masks.attn.float(), masks.resid.float(), masks.mlp.float())
    got: dict[str, torch.Tensor] = {}

    def grab(x, hook):
        got["mid"] = x.detach().clone()

    from strace_lens.edges.forward import edge_hooks

    with torch.no_grad():
        gemma.run_with_hooks(
            batch.tokens,
            fwd_hooks=[*edge_hooks(masks, gemma.cfg.n_layers), (names[2], grab)],
        )
    assert (got["mid"][0, q] - want_mid).abs().max() <= 1e-4 * want_mid.abs().max()
    assert (got["mid"][0, q] - seen[names[2]][0, q]).abs().max() > 1e-4  # it had an effect


def test_prompts_of_different_lengths_run_as_rows_of_one_batch(tiny64):
    gen = torch.Generator().manual_seed(7)
    lengths = (4, 7)
    prompts = [torch.randint(0, 50, (1, n), generator=gen) for n in lengths]
    padded = torch.zeros(2, 7, dtype=torch.long)
    attention = torch.zeros(2, 7, dtype=torch.long)
    alone, masks = [], []
    for i, (n, tokens) in enumerate(zip(lengths, prompts)):
        padded[i, :n], attention[i, :n] = tokens[0], 1
        graph = EdgeGraph.from_model(tiny64, n)
        keep = torch.rand(1, graph.n_edges, generator=gen, dtype=torch.float64)
        m = EdgeMasks.from_edges(graph, keep)
        alone.append(run_with_edge_masks(tiny64, tokenize(tiny64, tokens), m))
        masks.append(m.padded_to(7))
    both = run_with_edge_masks(tiny64, tokenize(tiny64, padded, attention), EdgeMasks.cat(masks))
    assert (both - torch.cat(alone)).abs().max() <= 1e-10


def test_bad_masks_raise(tiny64):
    batch = tokenize(tiny64, _tokens(5))
    graph = EdgeGraph.from_model(tiny64, 5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        run_with_edge_masks(tiny64, batch, EdgeMasks.full(graph, 1, value=1.5))
    with pytest.raises(ValueError, match="shape"):
        run_with_edge_masks(tiny64, batch, EdgeMasks.full(EdgeGraph.from_model(tiny64, 4), 1))
    with pytest.raises(ValueError, match="rows"):
        run_with_edge_masks(tiny64, batch.repeat_interleave(2), EdgeMasks.full(graph, 3))
