"""The quiet growth proposal (``MaskOptions.grow_quiet``): the d outside nodes of the smallest
|gradient| are measured among a step's proposals, checked against an independent gradient on
the tiny model and on a planted objective whose "helpful" nodes overshoot together; off, the
run is the one from before the option (golden tests unchanged, run identity unchanged)."""

from __future__ import annotations

import json

import pytest
import torch
from run_helpers import node_objective

import strace_lens as sl
from strace_lens.dataset import RunMismatchError, trace_dataset
from strace_lens.hygiene import model_untouched
from strace_lens.search.mask_options import MaskOptions
from strace_lens.search.nested import grow_nested
from strace_lens.search.objective import SubgraphObjective
from strace_lens.tiny_model import tiny_model

PROMPTS = ["hello there friend", "a b", "the quick brown fox jumps over"]
N = 15  # nodes of the tiny model


@pytest.fixture
def tiny():
    return tiny_model()


def _measured_rows(objective):
    """Spy on ``objective.kl``: every (prompt, node mask) -> KL it measures."""
    seen: dict[tuple[int, tuple[bool, ...]], float] = {}
    real = objective.kl

    def spy(masks, prompt_index, *args, **kwargs):
        kl = real(masks, prompt_index, *args, **kwargs)
        for row, p, value in zip(masks.bool().tolist(), prompt_index.tolist(), kl.tolist()):
            seen[(p, tuple(row))] = value
        return kl

    objective.kl = spy
    return seen


def _quiet_pick(model, current: torch.Tensor, d: int) -> torch.Tensor:
    """``current`` plus the d outside nodes of the smallest |dKL/dm| at ``current`` (ties: lower
    index), the gradient taken here on a fresh objective, one row per prompt."""
    check = node_objective(model, PROMPTS)
    leaf = current.float().requires_grad_(True)
    check.kl_backward(check.full_mask(leaf), torch.arange(len(PROMPTS)), torch.ones(len(PROMPTS)))
    assert leaf.grad is not None
    size = leaf.grad.abs().masked_fill(current, torch.inf)
    order = torch.argsort(size, dim=-1, stable=True)[:, :d]
    return current | torch.zeros_like(current).scatter(1, order, True)


def test_quiet_proposal_is_measured_and_the_step_keeps_the_lowest_kl(tiny):
    """Sizes 1 -> 5 (one grid step adding d = 4): with the option on, each prompt's quiet pick
    (its gradient recomputed here) is among the rows measured, the kept size-5 subgraph has
    the lowest KL of them, and its KL is at most the one kept with the option off."""
    gen = torch.Generator().manual_seed(3)
    ranking, guide = torch.randn(3, N, generator=gen), torch.randn(3, N, generator=gen)
    sizes = torch.tensor([1, 5, N])
    family, seen, rows = {}, {}, {}
    with model_untouched(tiny):
        for quiet in (False, True):
            objective = node_objective(tiny, PROMPTS)
            seen[quiet] = _measured_rows(objective)
            opts = MaskOptions(grow_single_steps=0, grow_quiet=quiet)
            family[quiet] = grow_nested(objective, ranking, sizes, "input", opts, guide)
            rows[quiet] = objective.rows_evaluated
        # the first step adds one node: no quiet proposal, the same subgraph either way
        assert torch.equal(family[True][:, 0], family[False][:, 0])
        picks = _quiet_pick(tiny, family[True][:, 0], 4)
    for p in range(3):
        quiet_key = (p, tuple(picks[p].tolist()))
        assert quiet_key in seen[True]
        step = {
            k: v for k, v in seen[True].items() if k[0] == p and sum(k[1]) == 5
        }  # this prompt's size-5 proposals
        chosen = seen[True][(p, tuple(family[True][p, 1].tolist()))]
        assert chosen == min(step.values())
        assert chosen <= seen[False][(p, tuple(family[False][p, 1].tolist()))]
    assert rows[True] > rows[False]  # one more proposal measured (where it is new)
    assert family[True].sum(-1).tolist() == [[1, 5, N]] * 3
    assert bool((family[True][:, :-1] <= family[True][:, 1:]).all())  # nested


class _OvershootObjective(SubgraphObjective):
    """A planted objective on 12 candidates: KL(m) = (1 - w . m)^2 + 0.5 with w = 0.9 on
    nodes 0-7 (each alone helps, two together overshoot: (1 - 1.8)^2 > (1 - 0.9)^2) and
    w = 0.001 i on nodes 8-11 (near neutral). One prompt, one layer; the interface
    ``grow_nested`` uses (what a model gives is tested above)."""

    n_prompts = 1
    units_per_layer = 12

    def __init__(self) -> None:  # none of the model-backed fields
        self.w = torch.tensor([0.9] * 8 + [0.001 * i for i in range(1, 5)])
        self.candidates = torch.ones(12, dtype=torch.bool)
        self.logp_full = torch.zeros(1, 1)
        self.measured = self  # type: ignore[assignment]  # .add: the grown subgraph's read-back, not used here

    def add(self, *args) -> None:
        pass

    def can_resume(self) -> bool:
        return False

    def full_mask(self, m: torch.Tensor) -> torch.Tensor:
        return m

    def value(self, m: torch.Tensor) -> torch.Tensor:
        return (1 - m @ self.w) ** 2 + 0.5

    def kl_backward(self, m, prompt_index, weights, capture=None):
        kl = self.value(m)
        (kl * weights).sum().backward()
        return kl.detach()

    def kl(self, masks, prompt_index, start_layer=None, cache=None, sink=None):
        kl = self.value(masks.float())
        if sink is not None:
            sink(torch.arange(len(masks)), kl, torch.zeros(len(masks), 1), torch.zeros(1))
        return kl


@pytest.mark.parametrize("quiet", [False, True], ids=["off", "on"])
def test_quiet_proposal_keeps_the_kl_where_every_other_proposal_overshoots(quiet):
    """Size 1 -> 4 from {0} (KL 0.51): the ranking, the guide and the gradient (-0.18 on
    nodes 0-7) all favour the overshooting nodes, so every other proposal adds 3 of them (KL
    (1 - 3.6)^2 + 0.5 = 7.26); the quiet pick (nodes 8, 9, 10: |gradient| 0.0002-0.0006) gives
    (1 - 0.906)^2 + 0.5 = 0.5088, and is kept only with the option on."""
    objective = _OvershootObjective()
    ranking = torch.linspace(2, 1, 12)[None]  # nodes 0-7 first
    opts = MaskOptions(grow_single_steps=0, grow_quiet=quiet)
    family = grow_nested(objective, ranking, torch.tensor([1, 4, 12]), "input", opts, ranking)
    current, step = family[0, 0], family[0, 1]
    assert torch.nonzero(current).flatten().tolist() == [0]  # KL 0.51, the lowest single
    kl_current, kl_step = (
        float(objective.value(current.float())),
        float(objective.value(step.float())),
    )
    if quiet:
        assert torch.nonzero(step).flatten().tolist() == [0, 8, 9, 10]
        assert kl_step <= kl_current
    else:
        assert kl_step == pytest.approx(7.26, abs=1e-5)  # > 0.51


def test_quiet_option_is_checked_by_name(tiny):
    with pytest.raises(TypeError, match=r"grow_quiet.*True or False"):
        sl.trace(tiny, PROMPTS, sizes=[1, 15], progress=False, grow_quiet="yes")
    with pytest.raises(ValueError, match=r"grow_quiet=True.*grow_gradient=False"):
        sl.trace(tiny, PROMPTS, sizes=[1, 15], progress=False, grow_quiet=True, grow_gradient=False)


def test_quiet_option_names_a_run_only_when_on(tmp_path, tiny):
    """Off, the run's identity is the one from before the option existed (no ``grow_quiet``
    in the manifest, so such folders resume); on, it is recorded and a change is refused."""

    def run(folder, **options):
        return trace_dataset(
            tiny, PROMPTS, folder, progress=False, steps=2, sizes=[1, 5, N], **options
        )

    off = run(tmp_path / "off")
    manifest = json.loads((tmp_path / "off" / "manifest.json").read_text())
    assert "grow_quiet" not in manifest["options"]
    assert manifest["options"]["grow_gradient"] is True  # the other defaults are recorded
    again = run(tmp_path / "off", grow_quiet=False)  # the same run, resumed
    assert torch.equal(again.masks, off.masks)
    with pytest.raises(RunMismatchError, match="grow_quiet"):
        run(tmp_path / "off", grow_quiet=True)
    on = run(tmp_path / "on", grow_quiet=True)
    manifest = json.loads((tmp_path / "on" / "manifest.json").read_text())
    assert manifest["options"]["grow_quiet"] is True
    assert torch.equal(run(tmp_path / "on", grow_quiet=True).masks, on.masks)  # same masks
    assert on.masks.sum(-1).tolist() == [[1, 5, N]] * 3
