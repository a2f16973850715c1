"""The edge evaluation runs each distinct row once (strace_lens/edges/measured.py, trace.py):
``method="mask"`` reads the search's reference row and merged sizes back, and the full graph
is the reference row at every method. The saved results (masks, metrics, top tokens,
entropy) equal what the previous evaluation (every size plus a reference row, run again)
gives, with fewer model rows run."""

from __future__ import annotations

import pytest
import torch

import strace_lens.edges.forward as edge_forward
from strace_lens.edges import (
    EdgeGraph,
    EdgeMasks,
    edge_counts,
    edge_tokenize,
    edge_trace,
    edge_weights,
    evaluate_subgraphs,
    greedy_order,
    run_with_edge_masks,
)
from strace_lens.edges.learned import MaskSearch, learned_nested_orders
from strace_lens.edges.measured import MeasuredPrefixes
from strace_lens.metrics import entropy, fidelity
from strace_lens.tiny_model import tiny_model

PROMPTS = ["The cat sat", "Paris is the"]
# 1e-4 keeps no edge of the tiny graphs (747 and 861 edges): a size the merge never measures
GRID = [1e-4, 0.01, 0.05, 0.1, 0.3, 1.0]
SEARCHES = {"merge": MaskSearch(steps=3), "no_merge": MaskSearch(steps=3, merge=False)}


@pytest.fixture(scope="module")
def byte_tiny():
    return tiny_model(device="cpu", dtype=torch.float64)


@pytest.fixture(scope="module")
def byte_tiny32():
    return tiny_model(device="cpu", dtype=torch.float32)


@pytest.fixture
def rows_run(monkeypatch):
    """Counts the rows of every edge-masked forward (the search's and the evaluation's)."""
    count = [0]
    forward = edge_forward.forward_logprobs

    def counted(model, batch, hooks, *args, **kwargs):
        count[0] += int(batch.batch_size)
        return forward(model, batch, hooks, *args, **kwargs)

    monkeypatch.setattr(edge_forward, "forward_logprobs", counted)
    return count


def previous_evaluation(model, result, ablate, max_rows=32):
    """The evaluation before read-back, written out: per prompt, every size's subgraph and
    an all-edges reference row, run as rows of the prompt's own batch."""
    batch = edge_tokenize(model, result.prompts)
    dtype = next(model.parameters()).dtype
    metrics, tops, fulls, rows = [], [], [], []
    for p in range(result.n_prompts):
        graph = result.graph(p)
        keep = torch.zeros(len(result.grid) + 1, graph.n_edges, dtype=dtype)
        for i in range(len(result.grid)):
            keep[i, result.subgraph(p, i).long()] = 1.0
        keep[-1] = 1.0
        row = batch.select([p]).trimmed()
        logp = torch.cat(
            [
                run_with_edge_masks(
                    model,
                    row,
                    EdgeMasks.from_edges(graph, keep[s : s + max_rows]),
                    ablate_attention_edges=ablate,
                )
                for s in range(0, keep.shape[0], max_rows)
            ]
        )
        sub, full = logp[:-1], logp[-1]
        rows.append((sub, full))
        scores = fidelity(full.expand_as(sub), sub)
        scores["top1"] = (sub.argmax(-1) == full.argmax(-1)).float()
        metrics.append(scores)
        tops.append(sub.argmax(-1))
        fulls.append(full)
    stacked = {k: torch.stack([m[k] for m in metrics]) for k in metrics[0]}
    return stacked, torch.stack(tops), torch.stack(fulls), rows


def assert_same_results(result, previous):
    """Every saved metric, the top tokens and the entropy equal the previous evaluation's
    bit for bit. The rows read back ran in other batches (the merge's: right-padded, with
    other candidates and prompts); on the tiny model that does not change a bit (float64
    and float32 alike), on SmolLM2 it does at float32 rounding (docs/edge-learned.md)."""
    metrics, tops, fulls, _ = previous
    assert set(result.metrics) == set(metrics)
    for key, values in metrics.items():
        assert torch.equal(result.metrics[key].double(), values.double()), key
    assert torch.equal(result.top_tokens, tops)
    assert torch.equal(result.full_top_tokens, fulls.argmax(-1))
    assert torch.equal(result.entropy, entropy(fulls).to(result.entropy.dtype))


@pytest.mark.parametrize("ablate", [True, False], ids=["ablated", "kept"])
@pytest.mark.parametrize("which", list(SEARCHES))
def test_mask_trace_reads_back_the_search_rows(byte_tiny, rows_run, ablate, which):
    search = SEARCHES[which]
    # the search alone, as edge_trace runs it: its rankings and its rows
    batch = edge_tokenize(byte_tiny, PROMPTS)
    lengths = (batch.predict_pos + 1).tolist()
    graphs = [EdgeGraph.from_model(byte_tiny, n) for n in lengths]
    weights = edge_weights(byte_tiny, batch)[0]
    greedy = [greedy_order(g, w) for g, w in zip(graphs, weights)]
    rows_run[0] = 0
    fits = learned_nested_orders(
        byte_tiny, batch, greedy, GRID, search=search, ablate_attention_edges=ablate
    )
    search_rows = rows_run[0]
    rows_run[0] = 0
    result = edge_trace(
        byte_tiny,
        PROMPTS,
        method="mask",
        sizes=GRID,
        mask_search=search,
        ablate_attention_edges=ablate,
    )
    trace_rows = rows_run[0]
    # the saved masks: the search's rankings, unchanged
    assert torch.equal(result.ids, torch.cat([f.order for f in fits]).to(torch.int32))
    # rows: the search's, then only the sizes it has not measured (the empty subgraph, and
    # without the merge every size below the whole graph); before, every size plus a
    # reference row per prompt
    counts = [edge_counts(GRID, g.n_edges) for g in graphs]
    assert all(int(c[0]) == 0 for c in counts)
    unmeasured = 1 if search.merge else len(GRID) - 1
    assert trace_rows == search_rows + unmeasured * len(PROMPTS)
    previous_rows = search_rows + (len(GRID) + 1) * len(PROMPTS)
    assert previous_rows - trace_rows == (len(GRID) + 1 - unmeasured) * len(PROMPTS)
    previous = previous_evaluation(byte_tiny, result, ablate)
    assert_same_results(result, previous)
    # the log-probs themselves, read back where measured, equal the rows run again
    for p, (fit, graph, (sub, full)) in enumerate(zip(fits, graphs, previous[3])):
        got_sub, got_full = evaluate_subgraphs(
            byte_tiny,
            batch.select([p]).trimmed(),
            graph,
            [fit.order[: int(k)] for k in counts[p]],
            ablate_attention_edges=ablate,
            measured=MeasuredPrefixes.from_fit(fit),
        )
        assert torch.equal(got_sub, sub) and torch.equal(got_full, full)
    # the full graph is the reference row itself: exactly zero TV, KL, full top-1
    assert float(result.metrics["tv"][:, -1].abs().max()) == 0.0
    assert float(result.metrics["kl"][:, -1].abs().max()) == 0.0


@pytest.mark.parametrize("ablate", [True, False], ids=["ablated", "kept"])
@pytest.mark.parametrize("method", ["greedy", "random"])
def test_greedy_and_random_run_the_full_graph_once(byte_tiny, rows_run, ablate, method):
    result = edge_trace(
        byte_tiny, PROMPTS, method=method, sizes=GRID, ablate_attention_edges=ablate, seed=4
    )
    # every size and one reference row, the full graph (s = 1) being that row: one row less
    # per prompt than before
    assert rows_run[0] == len(GRID) * len(PROMPTS)
    assert_same_results(result, previous_evaluation(byte_tiny, result, ablate))
    assert float(result.metrics["tv"][:, -1].abs().max()) == 0.0


def test_a_subgraph_that_is_not_the_measured_prefix_runs_again(byte_tiny):
    """Read back only the ranking's own prefixes: the same number of other edges runs."""
    batch = edge_tokenize(byte_tiny, PROMPTS[:1])
    graph = EdgeGraph.from_model(byte_tiny, int(batch.predict_pos[0]) + 1)
    weights = edge_weights(byte_tiny, batch)[0]
    (fit,) = learned_nested_orders(
        byte_tiny, batch, [greedy_order(graph, weights[0])], GRID, search=SEARCHES["merge"]
    )
    measured = MeasuredPrefixes.from_fit(fit)
    assert measured is not None
    k = int(edge_counts(GRID, graph.n_edges)[3])
    assert measured.get(fit.order[:k]) is not None
    other = torch.cat([fit.order[: k - 1], fit.order[k : k + 1]])
    assert measured.get(other) is None
    assert measured.get(fit.order[: k + 1]) is None  # a length the merge did not measure
    assert torch.equal(measured.get(fit.order), fit.logp_full)


@pytest.mark.parametrize("ablate", [True, False], ids=["ablated", "kept"])
def test_mask_trace_reads_back_the_same_bits_in_float32(byte_tiny32, ablate):
    result = edge_trace(
        byte_tiny32,
        PROMPTS,
        method="mask",
        sizes=GRID,
        mask_search=SEARCHES["merge"],
        ablate_attention_edges=ablate,
    )
    assert_same_results(result, previous_evaluation(byte_tiny32, result, ablate))
