"""The evaluation reads back the growth's own measurement of each grown subgraph: the same
metrics bit for bit as running it again, fewer rows run, and a row read back only where it
ran with the hooks the evaluation's batch gives it."""

from __future__ import annotations

import pytest
import torch
from run_helpers import node_objective

import strace_lens as sl
from strace_lens.evaluate import embed_candidates, evaluate_masks
from strace_lens.hygiene import model_untouched
from strace_lens.masked_forward import hooked_layers, node_hooks
from strace_lens.search.grouping import RowGrouping
from strace_lens.search.mask_options import MaskOptions
from strace_lens.search.measured import MeasuredRows
from strace_lens.search.nested import grow_nested
from strace_lens.tiny_model import tiny_model

PROMPTS = ["hello there friend", "a b", "the quick brown fox jumps over"]


@pytest.fixture
def tiny():
    return tiny_model()


def _objective(model, ablation):
    return node_objective(model, PROMPTS, ablation)


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_grown_subgraphs_are_read_back_with_the_bits_of_a_fresh_run(tiny, ablation):
    sizes = torch.tensor([1, 3, 7, 12, 15])
    gen = torch.Generator().manual_seed(1)
    with model_untouched(tiny):
        objective = _objective(tiny, ablation)
        n_c = len(objective.graph)
        ranking = torch.randn(3, n_c, generator=gen)
        family = grow_nested(objective, ranking, sizes, "input", MaskOptions(grow_width=2))
        masks = embed_candidates(family, objective.candidates)
        run_before = objective.rows_evaluated
        reused = evaluate_masks(objective, masks)
        ran = objective.rows_evaluated - run_before
        fresh = evaluate_masks(_objective(tiny, ablation), masks)
    # every grown size below the whole graph (4 of 5, per prompt) was measured by the growth
    assert objective.measured.reused == 3 * 4
    assert ran == 3 * 5 * 2 - 3 * 4  # the whole graph and every inverse are run
    for key, values in fresh.metrics.items():
        assert torch.equal(reused.metrics[key], values), key
    assert torch.equal(reused.top_tokens, fresh.top_tokens)


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_rows_left_in_chunks_run_together_across_chunks(tiny, ablation):
    """With chunks of 4 rows, the rows not read back (the whole graph's) sit in several
    chunks: they run in one pass per set of hooked layers, not one per chunk, and the
    metrics are those of a fresh evaluation bit for bit."""
    sizes = torch.tensor([1, 3, 7, 12, 15])
    gen = torch.Generator().manual_seed(2)
    with model_untouched(tiny):
        objective = node_objective(tiny, PROMPTS, ablation, batch_size=4)
        ranking = torch.randn(3, len(objective.graph), generator=gen)
        family = grow_nested(objective, ranking, sizes, "input", MaskOptions(grow_width=2))
        masks = embed_candidates(family, objective.candidates)
        asked = []
        get = objective.measured.get
        objective.measured.get = lambda *a: asked.append(get(*a)) or asked[-1]
        calls_before = objective.forward_calls
        reused = evaluate_masks(objective, masks)
        calls = objective.forward_calls - calls_before
        fresh_objective = node_objective(tiny, PROMPTS, ablation, batch_size=4)
        fresh = evaluate_masks(fresh_objective, masks)
    # the chunks of the subgraph rows: which rows were read back (in row order: the
    # evaluation asks for each row once, then for each inverse), and the layers each hooks
    read = [row is not None for row in asked[:15]]
    assert len(asked) == 30 and not any(row is not None for row in asked[15:])
    assert sum(read) == objective.measured.reused >= 3 * 3
    rows = masks.reshape(15, -1).float()
    chunks = [(read[lo : lo + 4], rows[lo : lo + 4]) for lo in range(0, 15, 4)]
    mixed = [chunk for chunk in chunks if any(chunk[0]) and not all(chunk[0])]
    unread = [chunk for chunk in chunks if not any(chunk[0])]
    hooked_sets = {tuple(hooked_layers(objective.graph, m).tolist()) for _, m in mixed}
    assert len(mixed) >= 2 and len(hooked_sets) < len(mixed)  # the change is exercised
    # one pass per hooked set for the rows left, one per unread chunk, 4 for the inverses
    assert calls == len(hooked_sets) + len(unread) + 4
    assert fresh_objective.forward_calls == 2 * 4
    # the rows run again (not read back), across chunks, give a fresh run's metrics bit for
    # bit; a row read back here ran in a growth chunk of another row count (4 rows per pass),
    # whose kernels may round differently (one KL 1.9e-7 apart under the zero ablation)
    again = ~torch.tensor(read).reshape(3, 5)
    for key, values in fresh.metrics.items():
        assert torch.equal(reused.metrics[key][again], values[again]), key
        torch.testing.assert_close(reused.metrics[key], values, rtol=0, atol=1e-6)
    assert torch.equal(reused.top_tokens, fresh.top_tokens)


def test_trace_metrics_equal_an_independent_evaluation(tiny):
    """``trace`` (rows read back) reports what ``evaluate`` on its masks gives, bit for bit;
    ``eval_rows`` stays the rows scored (each subgraph and its inverse, per prompt)."""
    result = sl.trace(tiny, PROMPTS, sizes=[1, 4, 9, 15], steps=2, ablation="mean")
    assert isinstance(result, sl.TraceResult)
    assert result.options["eval_rows"] == 3 * 4 * 2
    again = sl.evaluate(tiny, PROMPTS, result.masks, ablation="mean")
    for key, values in again.metrics.items():
        assert torch.equal(result.metrics[key], values), key
    assert torch.equal(result.top_tokens, again.top_tokens)


def test_hooked_forces_the_hooks_a_batch_would_have_had(tiny):
    """Under a mean ablation a hook that keeps a node computes v + (z - v), not always z:
    a kept row run alone then differs from the same row beside an ablating row, unless
    ``hooked`` gives it that batch's hooks."""
    with model_untouched(tiny):
        objective = _objective(tiny, "mean")
        graph, n = objective.graph, len(objective.graph)
        masks = torch.ones(2, n)
        masks[1, ::2] = 0.0  # row 1 ablates nodes in every layer: every layer hooked
        prompts = torch.tensor([0, 0])
        together = objective.logprobs(masks, prompts)
        hooked = hooked_layers(graph, masks)
        assert bool(hooked.all())
        alone = objective.logprobs(masks[:1], prompts[:1])
        forced = objective.logprobs(masks[:1], prompts[:1], hooked)
    assert torch.equal(forced[0], together[0])
    assert torch.allclose(alone[0], together[0], atol=1e-5)
    hooks = node_hooks(graph, masks[:1], objective.ablation, objective.batch)
    assert hooks == []  # alone, the all-kept row needs no hook at all


def test_read_back_only_with_the_same_hooks_on_wholly_kept_layers():
    rows = MeasuredRows(nodes_per_layer=3)
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 1.0])  # layer 0 kept whole, layer 1 not
    logp = torch.log_softmax(torch.randn(5), -1)
    rows.add(0, mask, logp, torch.tensor([False, True]))
    read = rows.get(0, mask, torch.tensor([False, True]))
    assert read is not None and torch.equal(read, logp)
    # layer 1 ablates a node: hooked either way, so the flag there does not matter
    assert rows.get(0, mask, torch.tensor([False, False])) is not None
    # layer 0 kept whole but hooked in the evaluation's batch: v + (z - v), run it
    assert rows.get(0, mask, torch.tensor([True, True])) is None
    assert rows.get(1, mask, torch.tensor([False, True])) is None  # another prompt
    assert rows.get(0, torch.ones(6), torch.tensor([False, True])) is None  # another mask
    assert rows.reused == 2


def test_cap_keeps_the_first_rows_within_it():
    logp = torch.zeros(10)  # 40 bytes
    rows = MeasuredRows(nodes_per_layer=1, cap_bytes=100)
    for p in range(3):
        rows.add(p, torch.ones(2), logp, torch.zeros(2, dtype=torch.bool))
    assert rows.n_bytes == 80 and len(rows.rows) == 2
    assert rows.get(2, torch.ones(2), torch.zeros(2, dtype=torch.bool)) is None


def test_dataset_growth_keeps_nothing(tiny):
    """Per dataset a size's winner is known only after all prompts' rows: nothing is kept."""
    with model_untouched(tiny):
        objective = _objective(tiny, "zero")
        n_c = len(objective.graph)
        ranking = torch.randn(1, n_c, generator=torch.Generator().manual_seed(0))
        grow_nested(
            objective, ranking, torch.tensor([1, 2, 15]), RowGrouping("dataset", 3), MaskOptions()
        )
    assert objective.measured.rows == {}
