"""The nested growth's cost options (``grow_single_steps``, ``grow_gradient``,
``grow_narrow_from``): which steps and proposals they run, checked against hand-built
expectations and independent measurements on the tiny model."""

from __future__ import annotations

import pytest
import torch
from run_helpers import node_objective

import strace_lens as sl
from strace_lens.hygiene import model_untouched
from strace_lens.search.mask_options import MaskOptions
from strace_lens.search.nested import grow_nested, grow_width, growth_steps
from strace_lens.tiny_model import tiny_model

PROMPTS = ["hello there friend", "a b", "the quick brown fox jumps over"]


@pytest.fixture
def tiny():
    """The 3-layer test model with its byte tokenizer (string prompts)."""
    return tiny_model()


def _objective(model, ablation="mean"):
    return node_objective(model, PROMPTS, ablation)


def test_growth_steps_go_through_the_sizes_in_between_only_while_asked():
    sizes = torch.tensor([1, 2, 5, 8, 20])
    assert growth_steps(sizes) == [
        (1, 0),
        (2, 1),
        (3, -1),
        (4, -1),
        (5, 2),
        (6, -1),
        (7, -1),
        (8, 3),
        (20, 4),
    ]
    assert growth_steps(sizes, 2) == [(1, 0), (2, 1), (5, 2), (8, 3), (20, 4)]
    assert growth_steps(sizes, 0) == [(1, 0), (2, 1), (5, 2), (8, 3), (20, 4)]


def test_grow_width_narrows_from_the_given_size():
    assert [grow_width(MaskOptions(grow_width=3), held) for held in (0, 5, 100)] == [3, 3, 3]
    narrow = MaskOptions(grow_width=3, grow_narrow_from=2)
    assert [grow_width(narrow, held) for held in (0, 1, 2, 50)] == [3, 3, 1, 1]


def test_growth_without_gradient_keeps_the_best_of_its_measured_proposals(tiny, monkeypatch):
    """With ``grow_gradient=False`` no backward pass runs, and the first size is the single
    node with the lowest measured KL among the top node of the ranking, of the guide and of
    both positions summed (grow_width=1), measured here one by one."""
    gen = torch.Generator().manual_seed(7)
    n = 15
    ranking, guide = torch.randn(3, n, generator=gen), torch.randn(3, n, generator=gen)
    sizes = torch.tensor([1, 4, 9, 15])
    opts = MaskOptions(grow_gradient=False, grow_width=1, grow_single_steps=0)
    with model_untouched(tiny):
        objective = _objective(tiny)

        def no_backward(*args, **kwargs):
            raise AssertionError("grow_gradient=False ran a backward pass")

        monkeypatch.setattr(objective, "kl_backward", no_backward)
        family = grow_nested(objective, ranking, sizes, "input", opts, guide)
        check = _objective(tiny)
        pos_rank = torch.argsort(torch.argsort(-ranking, dim=-1), dim=-1)
        pos_guide = torch.argsort(torch.argsort(-guide, dim=-1), dim=-1)
        for p in range(3):
            both = pos_rank[p] + pos_guide[p]
            assert int((both == both.min()).sum()) == 1  # this seed: no tie to break
            nodes = [int(pos_rank[p].argmin()), int(pos_guide[p].argmin()), int(both.argmin())]
            nodes = list(dict.fromkeys(nodes))
            masks = torch.zeros(len(nodes), n)
            masks[torch.arange(len(nodes)), torch.tensor(nodes)] = 1.0
            kl = check.kl(masks, torch.full((len(nodes),), p))
            expected = nodes[int(kl.argmin())]
            assert torch.nonzero(family[p, 0]).flatten().tolist() == [expected]
    assert family.sum(-1).tolist() == [[1, 4, 9, 15]] * 3
    assert bool((family[:, :-1] <= family[:, 1:]).all())  # nested


def test_fewer_seeds_and_steps_measure_fewer_rows(tiny):
    gen = torch.Generator().manual_seed(2)
    ranking, guide = torch.randn(3, 15, generator=gen), torch.randn(3, 15, generator=gen)
    sizes = torch.tensor([1, 2, 6, 15])
    rows = {}
    for label, opts in {
        "default": MaskOptions(),
        "narrow": MaskOptions(grow_narrow_from=1),
        "narrow, grid only": MaskOptions(grow_narrow_from=1, grow_single_steps=0),
    }.items():
        with model_untouched(tiny):
            objective = _objective(tiny)
            family = grow_nested(objective, ranking, sizes, "input", opts, guide)
        assert family.sum(-1).tolist() == [[1, 2, 6, 15]] * 3
        rows[label] = objective.rows_evaluated
    assert rows["default"] > rows["narrow"] > rows["narrow, grid only"]


def test_fast_options_trace_is_reproducible_and_exact_sized(tiny):
    options = dict(steps=2, grow_width=2, grow_narrow_from=2, grow_gradient=False)
    a = sl.trace(tiny, PROMPTS, sizes=[1, 3, 7, 15], progress=False, **options)
    b = sl.trace(tiny, PROMPTS, sizes=[1, 3, 7, 15], progress=False, **options)
    assert torch.equal(a.masks, b.masks)
    assert a.masks.sum(-1).tolist() == [[1, 3, 7, 15]] * 3
    assert a.options["method_options"]["grow_gradient"] is False


@pytest.mark.parametrize(
    ("option", "value", "error", "words"),
    [
        ("grow_gradient", "no", TypeError, "True or False"),
        ("grow_narrow_from", -1, ValueError, "at least 0"),
        ("grow_single_steps", 1.5, TypeError, "grow_single_steps"),
    ],
)
def test_bad_growth_options_are_refused_by_name(tiny, option, value, error, words):
    with pytest.raises(error, match=words):
        sl.trace(tiny, PROMPTS, sizes=[1, 15], progress=False, **{option: value})
