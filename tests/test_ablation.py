"""Zero and mean ablation values, checked against means computed by hand from a cache."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny

import strace_lens as sl
from strace_lens.ablation import resolve_ablation
from strace_lens.inputs import tokenize


def padded_reference() -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Three prompts of lengths 4, 7, 2, right-padded with token 11 (a real token id)."""
    gen = torch.Generator().manual_seed(21)
    rows = [torch.randint(0, 50, (n,), generator=gen) for n in (4, 7, 2)]
    tokens = torch.full((3, 7), 11, dtype=torch.long)
    attention = torch.zeros((3, 7), dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
        attention[i, : len(r)] = 1
    return tokens, attention, rows


def hand_activations(model, rows: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """Each prompt's activations, run alone (no padding anywhere)."""
    acts: dict[str, list[torch.Tensor]] = {}
    for r in rows:
        with torch.no_grad():
            _, cache = model.run_with_cache(r[None])
        for layer in range(model.cfg.n_layers):
            for name in (f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.hook_mlp_out"):
                acts.setdefault(name, []).append(cache[name][0].double())
    return acts


def test_zero_ablation_values_are_zero(tiny, tiny_tokens):
    zero = sl.ZeroAblation()
    batch = tokenize(tiny, tiny_tokens)
    assert zero.attn_value(0, batch) is None and zero.mlp_value(2, batch) is None
    assert zero.describe() == {"name": "zero"}
    zero.check_model(tiny)  # fits any model


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_mean_excludes_padding(tiny64, batch_size):
    """Padding positions (token 11 here) must not enter the mean; batching must not matter."""
    tokens, attention, rows = padded_reference()
    mean = sl.MeanAblation.from_prompts(
        tiny64, tokens, attention_mask=attention, batch_size=batch_size, progress=False
    )
    acts = hand_activations(tiny64, rows)
    assert mean.n_prompts == 3 and mean.n_tokens == 4 + 7 + 2
    assert mean.attn.shape == (3, 4, 8) and mean.mlp.shape == (3, 32)
    for layer in range(3):
        z = torch.cat(acts[f"blocks.{layer}.attn.hook_z"])  # [13, head, d_head]
        out = torch.cat(acts[f"blocks.{layer}.hook_mlp_out"])
        assert torch.allclose(mean.attn[layer], z.mean(0), atol=1e-12)
        assert torch.allclose(mean.mlp[layer], out.mean(0), atol=1e-12)
    # the same reference with padding counted would differ: the check above can fail
    with torch.no_grad():
        _, cache = tiny64.run_with_cache(tokens)
    padded_mean = cache["blocks.0.hook_mlp_out"].mean((0, 1))
    assert (padded_mean - mean.mlp[0]).abs().max() > 1e-3


def test_mean_from_left_padded_tokens_equals_right_padded(tiny64):
    tokens, attention, rows = padded_reference()
    # two columns wider than the longest prompt: all-padding columns must not make positions
    left = torch.full((3, 9), 11, dtype=torch.long)
    left_attention = torch.zeros((3, 9), dtype=torch.long)
    for i, r in enumerate(rows):
        left[i, -len(r) :] = r
        left_attention[i, -len(r) :] = 1
    for per_position in (False, True):
        right = sl.MeanAblation.from_prompts(
            tiny64, tokens, attention_mask=attention, per_position=per_position, progress=False
        )
        lefty = sl.MeanAblation.from_prompts(
            tiny64, left, attention_mask=left_attention, per_position=per_position, progress=False
        )
        assert torch.allclose(right.attn, lefty.attn, atol=1e-12)
        assert torch.allclose(right.mlp, lefty.mlp, atol=1e-12)
        if per_position:
            assert torch.allclose(right.attn_by_pos, lefty.attn_by_pos, atol=1e-12)
            assert torch.allclose(right.mlp_by_pos, lefty.mlp_by_pos, atol=1e-12)


def test_per_position_means_by_hand(tiny64):
    tokens, attention, rows = padded_reference()
    mean = sl.MeanAblation.from_prompts(
        tiny64, tokens, attention_mask=attention, per_position=True, batch_size=2, progress=False
    )
    acts = hand_activations(tiny64, rows)
    assert mean.per_position
    assert mean.attn_by_pos is not None and mean.mlp_by_pos is not None
    assert mean.attn_by_pos.shape == (3, 7, 4, 8) and mean.mlp_by_pos.shape == (3, 7, 32)
    for layer in range(3):
        outs = acts[f"blocks.{layer}.hook_mlp_out"]
        zs = acts[f"blocks.{layer}.attn.hook_z"]
        for pos in range(7):
            here_out = torch.stack([o[pos] for o in outs if len(o) > pos])
            here_z = torch.stack([z[pos] for z in zs if len(z) > pos])
            assert torch.allclose(mean.mlp_by_pos[layer, pos], here_out.mean(0), atol=1e-12)
            assert torch.allclose(mean.attn_by_pos[layer, pos], here_z.mean(0), atol=1e-12)
    # position 0..1 averaged over 3 prompts, 2..3 over 2, 4..6 over the longest one alone
    assert torch.allclose(mean.mlp_by_pos[1, 6], acts["blocks.1.hook_mlp_out"][1][6], atol=1e-12)


def test_per_position_values_follow_each_prompt_and_fall_back_beyond(tiny64):
    tokens, attention, _ = padded_reference()
    mean = sl.MeanAblation.from_prompts(
        tiny64, tokens, attention_mask=attention, per_position=True, progress=False
    )
    assert mean.mlp_by_pos is not None and mean.attn_by_pos is not None
    # a left-padded batch wider than the reference (9 > 7 positions)
    batch_tokens = torch.zeros((2, 10), dtype=torch.long)
    batch_attention = torch.ones((2, 10), dtype=torch.long)
    batch_attention[0, :4] = 0  # row 0: 6 real tokens starting at column 4
    batch = tokenize(tiny64, batch_tokens, batch_attention)
    mlp = mean.mlp_value(2, batch)
    attn = mean.attn_value(2, batch)
    assert mlp.shape == (2, 10, 32) and attn.shape == (2, 10, 4, 8)
    for col in range(4, 10):  # row 0 real position = col - 4
        assert torch.equal(mlp[0, col], mean.mlp_by_pos[2, col - 4])
        assert torch.equal(attn[0, col], mean.attn_by_pos[2, col - 4])
    for col in range(10):  # row 1: positions 0..6 from the table, 7..9 the overall mean
        expected = mean.mlp_by_pos[2, col] if col < 7 else mean.mlp[2]
        assert torch.equal(mlp[1, col], expected)


def test_overall_mean_broadcasts(tiny, tiny_tokens):
    mean = sl.MeanAblation.from_prompts(tiny, tiny_tokens, progress=False)
    batch = tokenize(tiny, tiny_tokens)
    assert mean.attn_value(1, batch).shape == (1, 1, 4, 8)
    assert mean.mlp_value(1, batch).shape == (1, 1, 32)
    assert not mean.per_position and mean.attn_by_pos is None
    assert mean.attn.dtype == torch.float32  # the model's dtype


@pytest.mark.parametrize("per_position", [False, True])
def test_save_load_round_trip(tiny, tiny_tokens, tmp_path, per_position):
    mean = sl.MeanAblation.from_prompts(
        tiny, tiny_tokens, per_position=per_position, progress=False
    )
    path = mean.save(tmp_path / "sub" / "means.safetensors")
    assert path.exists() and not [p for p in path.parent.iterdir() if p.name.startswith(".")]
    back = sl.MeanAblation.load(path)
    assert torch.equal(back.attn, mean.attn) and torch.equal(back.mlp, mean.mlp)
    assert back.per_position == per_position
    if per_position:
        assert torch.equal(back.attn_by_pos, mean.attn_by_pos)
        assert torch.equal(back.mlp_by_pos, mean.mlp_by_pos)
    assert (back.n_prompts, back.n_tokens) == (4, 36)
    assert back.model_info == mean.model_info and back.model_info["n_layers"] == 3
    mask = torch.rand(4, 15, generator=torch.Generator().manual_seed(0))
    assert torch.equal(
        sl.run_with_mask(tiny, tiny_tokens, mask, back),
        sl.run_with_mask(tiny, tiny_tokens, mask, mean),
    )


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="No mean-ablation file"):
        sl.MeanAblation.load(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable mean-ablation file"):
        sl.MeanAblation.load(bad)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"attn": torch.zeros(1, 1, 1), "mlp": torch.zeros(1, 1)}, str(other))
    with pytest.raises(ValueError, match="not a strace-lens mean-ablation file"):
        sl.MeanAblation.load(other)


def test_check_model_and_resolve(tiny, tiny_tokens):
    mean = sl.MeanAblation.from_prompts(tiny, tiny_tokens, progress=False)
    assert resolve_ablation(mean, tiny) is mean
    assert isinstance(resolve_ablation("zero", tiny), sl.ZeroAblation)
    resolved = resolve_ablation(None, tiny, tiny_tokens, progress=False)
    assert isinstance(resolved, sl.MeanAblation) and torch.equal(resolved.mlp, mean.mlp)
    with pytest.raises(ValueError, match="needs reference prompts"):
        resolve_ablation("mean", tiny)
    with pytest.raises(ValueError, match="Unknown ablation 'median'"):
        resolve_ablation("median", tiny)
    wider = make_tiny(d_model=48)
    with pytest.raises(ValueError, match=r"d_model=32.*d_model=48"):
        resolve_ablation(mean, wider)
    with pytest.raises(ValueError, match="batch_size"):
        sl.MeanAblation.from_prompts(tiny, tiny_tokens, batch_size=0)


def test_from_prompts_leaves_model_untouched(tiny, tiny_tokens):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    tiny.train()
    sl.MeanAblation.from_prompts(tiny, tiny_tokens, progress=False)
    assert tiny.training
    assert all(p.grad is None and p.requires_grad for p in tiny.parameters())
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())
    assert not any(hp.fwd_hooks for hp in tiny.hook_dict.values())
