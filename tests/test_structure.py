"""The package's structure (issue 11): the method registry, the typed run configuration, the
public evaluate, and an import graph without cycles."""

from __future__ import annotations

import pytest
import torch

from strace_lens.config import TraceConfig
from strace_lens.search.methods import REGISTRY, MaskSearch, RandomOptions, get_method
from strace_lens.types import METHODS


def test_registry_holds_exactly_the_method_names():
    assert tuple(REGISTRY) == METHODS
    for name, method in REGISTRY.items():
        assert method.name == name
        assert "node" in method.granularities


def test_config_validates_once_and_parses_method_options():
    config = TraceConfig(method="mask", method_options={"steps": 3}, nested=False)
    assert isinstance(config.options, MaskSearch)
    assert config.options.search.steps == 3 and not config.options.nested
    assert TraceConfig(method="random", method_options={"draws": 2}).options == RandomOptions(2)
    with pytest.raises(ValueError, match="Unknown method 'beam'"):
        TraceConfig(method="beam")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Unknown per='token'"):
        TraceConfig(per="token")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Unknown ablation 'median'"):
        TraceConfig(ablation="median")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Unknown option"):
        TraceConfig(method="greedy", method_options={"steps": 3})
    with pytest.raises(ValueError, match="draws"):
        TraceConfig(method="random", method_options={"draws": 0})
    with pytest.raises(ValueError, match="Unknown method"):
        get_method("beam")


def test_config_from_kwargs_and_identity_defaults():
    config = TraceConfig.from_kwargs({"method": "forward", "max_size": 3, "device": "cpu"})
    assert config.method == "forward" and dict(config.method_options) == {"max_size": 3}
    assert TraceConfig.identity_defaults() == {
        "sizes": None,
        "ablation": None,
        "per": "input",
        "method": "mask",
        "keep": None,
        "candidates": None,
        "seed": 0,
        "nested": True,
        "inverse": True,
    }


def test_result_keeps_its_config(tiny, tiny_tokens):
    import strace_lens as sl

    result = sl.trace(tiny, tiny_tokens[:2], sizes=[1, 3], method="random", draws=2, seed=3)
    config = result.config
    assert config.method == "random" and config.seed == 3
    assert config.options == RandomOptions(2)
    assert torch.is_tensor(result.masks)
