"""Leaving the user's model exactly as we found it.

Every public entry point that runs the model does so inside :func:`model_untouched`: it
switches the model to eval mode and freezes its parameters for the duration (so no parameter
gradient is ever built or stored), and on the way out, whether the body returned, raised or
was interrupted, it restores every module's train/eval flag, every parameter's
``requires_grad`` and ``.grad``, and removes any hook the body added. Weights are never
written to by this package.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from strace_lens.graph import NodeGraph, hook_name


def _hook_points(model: Any) -> dict[str, Any]:
    hook_dict = getattr(model, "hook_dict", None)
    if not isinstance(hook_dict, dict):
        raise TypeError(
            f"{type(model).__name__} has no TransformerLens hook points (model.hook_dict); pass "
            "a TransformerBridge or HookedTransformer."
        )
    return hook_dict


def required_hook_names(graph: NodeGraph) -> list[str]:
    names = []
    for layer in range(graph.n_layers):
        names += [hook_name(layer, "attn"), hook_name(layer, "mlp")]
    return names


def check_hook_points(model: Any, graph: NodeGraph | None = None) -> None:
    """Raise a clear error naming the first hook point the model lacks."""
    graph = graph or NodeGraph.from_model(model)
    hook_dict = _hook_points(model)
    for name in required_hook_names(graph):
        if name not in hook_dict:
            raise ValueError(
                f"The model has no hook point {name!r}, which strace-lens ablates nodes "
                "through. Use a TransformerBridge (TransformerLens >= 3) or a HookedTransformer, "
                "whose blocks expose attn.hook_z and hook_mlp_out."
            )


def _hook_counts(model: Any) -> dict[str, tuple[int, int]]:
    return {
        name: (len(getattr(hp, "fwd_hooks", [])), len(getattr(hp, "bwd_hooks", [])))
        for name, hp in _hook_points(model).items()
    }


@contextmanager
def model_untouched(model: Any) -> Iterator[None]:
    """Run the body with the model in eval mode and frozen; restore everything afterwards."""
    modes = {module: module.training for module in model.modules()}
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    hooks_before = _hook_counts(model)
    try:
        model.eval()
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        # Hooks added inside the body and still attached (e.g. the body was interrupted while
        # adding them) are removed from the end of each hook point's list: ours came last.
        for name, hp in _hook_points(model).items():
            n_fwd, n_bwd = hooks_before.get(name, (0, 0))
            for attr, keep in (("fwd_hooks", n_fwd), ("bwd_hooks", n_bwd)):
                handles = getattr(hp, attr, None)
                if handles is None or len(handles) <= keep:
                    continue
                for handle in handles[keep:]:
                    handle.hook.remove()
                setattr(hp, attr, handles[:keep])
        for module, mode in modes.items():
            module.training = mode
        for p, flag, grad in zip(params, flags, grads):
            p.requires_grad_(flag)
            p.grad = grad


def model_device(model: Any) -> torch.device:
    cfg_device = getattr(getattr(model, "cfg", None), "device", None)
    if cfg_device is not None:
        return torch.device(cfg_device)
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
