"""Edge weights (strace_lens/edges/weights.py) against explicit per-edge vectors."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny

from strace_lens.edges import EdgeGraph, edge_tokenize, edge_weights, norm_linearisation
from strace_lens.inputs import tokenize


def _cache(model, tokens, names):
    seen = {}

    def save(key):
        def hook(x, hook):
            seen[key] = x.detach().clone()

        return hook

    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(n, save(n)) for n in names])
    return seen


@pytest.mark.parametrize("n_kv", [4, 2])
def test_weights_are_normalised_l1_norms_of_the_explicit_edge_vectors(n_kv):
    model = make_tiny(torch.float64, n_key_value_heads=n_kv)
    t = 5
    tokens = torch.randint(0, 50, (1, t), generator=torch.Generator().manual_seed(2))
    graph = EdgeGraph.from_model(model, t)
    (weights,), _ = edge_weights(model, tokenize(model, tokens))
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    names = []
    for layer in range(n_layers):
        names += [f"blocks.{layer}.{n}" for n in ("hook_resid_pre", "attn.hook_pattern")]
        names += [f"blocks.{layer}.{n}" for n in ("attn.hook_v", "hook_resid_mid")]
        names += [f"blocks.{layer}.{n}" for n in ("hook_attn_out", "hook_mlp_out")]
        names.append(f"blocks.{layer}.hook_resid_post")
    c = _cache(model, tokens, names)
    w_o, b_o = model.W_O.detach(), model.b_O.detach()
    lnf = model.ln_final.original_component
    for layer in range(n_layers):
        key = f"blocks.{layer}."
        pattern, v = c[key + "attn.hook_pattern"][0], c[key + "attn.hook_v"][0]
        last = layer == n_layers - 1
        x_fin = c[key + "hook_resid_post"][0, t - 1]
        sigma = (x_fin.var(unbiased=False) + lnf.eps).sqrt()

        def vec(x, last=last, sigma=sigma):
            # the final LayerNorm, its scale frozen at the clean input, for the last block
            return lnf.weight.detach() * (x - x.mean()) / sigma if last else x

        # the full [T, T, H, d] tensor of attention edge vectors, built the slow way
        explicit = torch.zeros(t, t, n_heads, model.cfg.d_model, dtype=torch.float64)
        for q in range(t):
            for j in range(q + 1):
                for h in range(n_heads):
                    v_j = v[j, h // (n_heads // n_kv)]
                    explicit[q, j, h] = pattern[h, q, j] * (v_j @ w_o[layer, h])
        # they are the attention output's terms: their sum plus b_O is hook_attn_out
        total = explicit.sum((1, 2)) + b_o[layer]
        assert (total - c[key + "hook_attn_out"][0]).abs().max() <= 1e-10
        for q in range(t):
            if last and q < t - 1:
                continue
            raw = {
                f"a{layer}.h{h}:{j}->{q}": vec(explicit[q, j, h]).abs().sum()
                for h in range(n_heads)
                for j in range(q + 1)
            }
            raw[f"r{layer}.attn:{q}"] = vec(c[key + "hook_resid_pre"][0, q]).abs().sum()
            z = sum(raw.values())
            for name, value in raw.items():
                assert abs(float(weights[graph.index(name)]) - float(value / z)) <= 1e-10, name
            mid, mlp = c[key + "hook_resid_mid"][0, q], c[key + "hook_mlp_out"][0, q]
            r_m, m_m = vec(mid).abs().sum(), vec(mlp).abs().sum()
            got_r = float(weights[graph.index(f"r{layer}.mlp:{q}")])
            assert abs(got_r - float(r_m / (r_m + m_m))) <= 1e-10
            got_m = float(weights[graph.index(f"m{layer}:{q}")])
            assert abs(got_m - float(m_m / (r_m + m_m))) <= 1e-10


def test_weights_into_every_node_sum_to_one(tiny64):
    tokens = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    weights, _ = edge_weights(tiny64, tokenize(tiny64, tokens))
    graph = EdgeGraph.from_model(tiny64, 6)
    for w in weights:
        sums = torch.zeros(graph.n_nodes, dtype=torch.float64)
        sums.index_add_(0, graph.edge_fields["target_node"], w)
        ptr, _ = graph.in_edges
        has_edges = ptr[1:] > ptr[:-1]
        assert torch.allclose(
            sums[has_edges], torch.ones(int(has_edges.sum()), dtype=torch.float64)
        )
        assert bool((w >= 0).all())


def test_padded_rows_get_their_own_prompt_weights(tiny64):
    gen = torch.Generator().manual_seed(5)
    short, long = (
        torch.randint(0, 50, (1, 4), generator=gen),
        torch.randint(0, 50, (1, 7), generator=gen),
    )
    padded = torch.zeros(2, 7, dtype=torch.long)
    padded[0, :4], padded[1] = short[0], long[0]
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, 4:] = 0
    both, _ = edge_weights(tiny64, tokenize(tiny64, padded, mask))
    (alone,), _ = edge_weights(tiny64, tokenize(tiny64, short))
    assert both[0].shape == alone.shape == (EdgeGraph.from_model(tiny64, 4).n_edges,)
    assert torch.allclose(both[0], alone, atol=1e-12)


@pytest.mark.integration
def test_gemma_post_attention_norm_linearisation_is_exact_at_the_clean_run(gemma):
    batch = edge_tokenize(gemma, "The quick brown fox jumps over the lazy dog")
    layer = 4
    names = [f"blocks.{layer}.ln1_post.hook_in", f"blocks.{layer}.hook_attn_out"]
    c = _cache(gemma, batch.tokens, names)
    scale, centre = norm_linearisation(gemma, gemma.blocks[layer].ln1_post, c[names[0]][0])
    assert not centre
    # the linear map at the clean point gives back the norm's output: the edge vectors
    # (linearised) sum to the attention branch exactly as the model adds it
    rebuilt = scale * c[names[0]][0].double()
    assert (rebuilt - c[names[1]][0].double()).abs().max() <= 1e-4 * c[names[1]].abs().max()
    (w,), _ = edge_weights(gemma, batch)
    graph = EdgeGraph.from_model(gemma, batch.tokens.shape[1])
    assert w.shape == (graph.n_edges,) and bool(torch.isfinite(w).all())


@pytest.mark.integration
def test_token_conventions_on_the_embedded_models(smollm2, gemma):
    text = "The cat sat on the mat"
    paper = edge_tokenize(smollm2, text).tokens[0].tolist()
    tl = edge_tokenize(smollm2, text, "transformer_lens").tokens[0].tolist()
    assert tl[0] == smollm2.tokenizer.bos_token_id and tl[1:] == paper
    assert paper[0] != smollm2.tokenizer.bos_token_id
    g_paper = edge_tokenize(gemma, text).tokens[0].tolist()
    assert g_paper[0] == gemma.tokenizer.bos_token_id
    assert g_paper == edge_tokenize(gemma, text, "transformer_lens").tokens[0].tolist()
