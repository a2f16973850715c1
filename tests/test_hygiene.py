"""The user's model is left as found, even when a call raises inside a hook or is interrupted."""

from __future__ import annotations

import pytest
import torch

import strace_lens as sl
from strace_lens.hygiene import check_hook_points, model_untouched


def torch_hook_counts(model) -> dict[str, int]:
    """Hooks at the torch level, on every submodule (what TransformerLens' lists could miss)."""
    return {
        name: len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for name, m in model.named_modules()
    }


class ExplodingAblation(sl.ZeroAblation):
    """Its layer-1 head value has the wrong shape, so the hook raises mid-forward."""

    def __init__(self, error: type[BaseException] | None = None) -> None:
        self.error = error

    def attn_value(self, layer, batch):
        if layer != 1:
            return None
        if self.error is not None:
            error = self.error

            # a value whose use raises the chosen error inside the hook
            def raising(*args, **kwargs):
                raise error("interrupted inside a hook")

            value = torch.zeros(1, 1, 4, 8)
            value.to = raising  # type: ignore[method-assign]
            return value
        return torch.zeros(1, 1, 3, 8)  # 3 heads, the model has 4: broadcasting fails


def snapshot(model):
    return {
        "modes": {name: m.training for name, m in model.named_modules()},
        "flags": {name: p.requires_grad for name, p in model.named_parameters()},
        "grads": {
            name: (None if p.grad is None else p.grad.clone())
            for name, p in model.named_parameters()
        },
        "weights": {name: v.clone() for name, v in model.state_dict().items()},
        "hooks": torch_hook_counts(model),
        "tl_hooks": {n: (len(h.fwd_hooks), len(h.bwd_hooks)) for n, h in model.hook_dict.items()},
    }


def assert_same(before, after):
    assert after["modes"] == before["modes"]
    assert after["flags"] == before["flags"]
    assert after["hooks"] == before["hooks"]
    assert after["tl_hooks"] == before["tl_hooks"]
    for name, g in before["grads"].items():
        got = after["grads"][name]
        assert (g is None and got is None) or (
            g is not None and got is not None and torch.equal(g, got)
        )
    for name, w in before["weights"].items():
        assert torch.equal(w, after["weights"][name]), name


def odd_state(model):
    """A model state no one would guess: partly training, partly frozen, one stale grad,
    and a hook of the user's own."""
    # The bridge wires its own internal capture hooks (torch pre-hooks on ln1/ln2) lazily at
    # its first forward and keeps them: run one first so they count as the model's own state.
    with torch.no_grad():
        model(torch.zeros(1, 2, dtype=torch.long))
    model.train()
    model.blocks[0].eval()
    first = next(iter(model.parameters()))
    first.grad = torch.full_like(first, 0.25)
    list(model.parameters())[-1].requires_grad_(False)
    calls: list[int] = []
    model.hook_dict["blocks.2.hook_mlp_out"].add_hook(lambda act, hook: calls.append(1))
    return calls


@pytest.mark.parametrize("error", [None, KeyboardInterrupt, RuntimeError])
def test_call_raising_inside_a_hook_leaves_model_as_found(tiny, tiny_tokens, error):
    calls = odd_state(tiny)
    before = snapshot(tiny)
    mask = torch.full((4, 15), 0.5, requires_grad=True)
    with pytest.raises(BaseException) as info:
        sl.run_with_mask(tiny, tiny_tokens, mask, ExplodingAblation(error))
    if error is not None:
        assert isinstance(info.value, error)
    else:
        assert isinstance(info.value, RuntimeError)  # a shape mismatch inside the hook
    assert_same(before, snapshot(tiny))
    # the user's hook still fires, and only once per forward: nothing of ours is left
    n = len(calls)
    with torch.no_grad():
        logits = tiny(tiny_tokens)
    assert len(calls) == n + 1
    # and a masked run still computes the model itself (no stale ablation hook)
    clean = sl.run_with_mask(tiny, tiny_tokens, torch.ones(15))
    assert (torch.log_softmax(logits[:, -1], -1) - clean).abs().max() <= 1e-5


def test_successful_calls_leave_model_as_found(tiny, tiny_tokens):
    odd_state(tiny)
    before = snapshot(tiny)
    mask = torch.full((4, 15), 0.5, requires_grad=True)
    out = sl.run_with_mask(
        tiny, tiny_tokens, mask, sl.MeanAblation.from_prompts(tiny, tiny_tokens, progress=False)
    )
    out.sum().backward()  # backward after the call, with the user's flags back on
    assert mask.grad is not None
    assert_same(before, snapshot(tiny))


def test_body_runs_in_eval_mode_and_frozen(tiny):
    tiny.train()
    with model_untouched(tiny):
        assert not any(m.training for m in tiny.modules())
        assert not any(p.requires_grad for p in tiny.parameters())
    assert all(m.training for m in tiny.modules())
    assert all(p.requires_grad for p in tiny.parameters())


def test_hooks_added_and_left_by_the_body_are_removed(tiny):
    before = torch_hook_counts(tiny)
    with pytest.raises(ValueError, match="mid-body"):
        with model_untouched(tiny):
            tiny.hook_dict["blocks.0.attn.hook_z"].add_hook(lambda z, hook: z * 0)
            tiny.hook_dict["blocks.1.hook_mlp_out"].add_hook(lambda z, hook: z * 0)
            raise ValueError("mid-body")
    assert torch_hook_counts(tiny) == before
    assert not tiny.hook_dict["blocks.0.attn.hook_z"].fwd_hooks


def test_check_hook_points(tiny):
    check_hook_points(tiny)  # complete model: no error

    class NoHooks:
        cfg = tiny.cfg

    with pytest.raises(TypeError, match=r"model\.hook_dict"):
        check_hook_points(NoHooks())
