"""``reproduce --granularity edge`` (issue 14): the configuration and its refusals, the phase
quantities and controls against hand computations and planted results, and the whole run on
the tiny model, resuming run folders made by the direct ``trace_dataset`` call.

The edge composition and band values themselves are checked against hand counts and brute
force in tests/test_edge_analysis.py (test_shares_equal_a_hand_count,
test_composition_bands_on_the_hand_result, test_traced_tiny_composition_and_bands_match_brute_
force); here: what reproduce adds on top of them."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from edge_handmade import handmade

from strace_lens.analysis import (
    edge_composition,
    edge_core_sizes,
    edge_phases,
    edge_uncertainty_controls,
    holm,
    partial_spearman_ci,
)
from strace_lens.analysis.edge_bands import REFINEMENT_BAND, band_average
from strace_lens.analysis.edge_controls import sparse_rank_diffs
from strace_lens.analysis.edge_phases import RAW_QUANTITIES, EdgePhases, derive, phase_values
from strace_lens.edges import EdgeGraph
from strace_lens.reproduce.claims import (
    CONTROL,
    FAILS,
    HOLDS,
    INCONCLUSIVE,
    REFERENCE,
    UNDETERMINED,
)
from strace_lens.reproduce.config import ReproduceConfig
from strace_lens.reproduce.edge_claims import EdgeModelRun, edge_agreement_claims, edge_claims_of

# the hand-made result of tests/test_edge_analysis.py: 6 blocks, 2 heads, 3 tokens, 114 edges
FIRST = ["r5.mlp:2", "m5:2", "a5.h1:0->2", "r4.attn:2", "m3:1", "a0.h0:0->1", "r1.mlp:0",
         "a2.h1:1->2"]  # fmt: skip
GRID = (0.005, 0.02, 0.04, 0.075, 1.0)
COUNTS = [0, 2, 4, 8, 114]


def _depth(name: str) -> float:
    """Relative depth of an edge's target block, read from its name (6 blocks)."""
    return int(name[1 : name.index(".") if "." in name[:3] else name.index(":")]) / 5


# -- the configuration ---------------------------------------------------------------------
def test_config_resolves_defaults_per_granularity():
    node = ReproduceConfig(models=("m",), prompts_file="p.txt")
    assert (node.method, node.ablation, node.random_draws) == ("mask", "mean", 5)
    assert (node.core_nucleus, node.refined_nucleus, node.small_core) == (1.0, 90.0, 0.1)
    assert node.ablate_attention_edges is None
    edge = ReproduceConfig(models=("m",), prompts_file="p.txt", granularity="edge")
    assert (edge.method, edge.ablation, edge.ablate_attention_edges) == ("greedy", "zero", True)
    assert edge.small_core == 0.01 and edge.core_nucleus is None
    # exactly the direct call's options; the search's only when given
    assert edge.edge_trace_options("random") == {
        "granularity": "edge", "method": "random", "sizes": "paper",
        "ablate_attention_edges": True, "seed": 0,
    }  # fmt: skip
    learned = ReproduceConfig(models=("m",), prompts_file="p", granularity="edge",
                              method="mask", ablate_attention_edges=False,
                              mask_options={"steps": 2})  # fmt: skip
    assert learned.edge_trace_options("mask")["mask_search"] == {"steps": 2}
    assert "mask_search" not in learned.edge_trace_options("random")


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"ablation": "mean"}, "ablation='mean'"),
        ({"random_draws": 2}, "random_draws=2"),
        ({"sizes": (1, 2)}, "sizes"),
        ({"core_nucleus": 5.0}, "core_nucleus"),
        ({"refined_nucleus": 40.0}, "refined_nucleus"),
        ({"mask_options": {"steps": 3}}, "method='mask'"),
    ],
)
def test_node_options_are_refused_at_edge(kwargs, named):
    with pytest.raises(ValueError, match="do not apply") as err:
        ReproduceConfig(models=("m",), prompts_file="p", granularity="edge", **kwargs)
    assert named in str(err.value) and "granularity='node'" in str(err.value)


def test_edge_options_are_refused_at_node_and_bad_values_by_name():
    with pytest.raises(ValueError, match="method='greedy' applies at granularity='edge'"):
        ReproduceConfig(models=("m",), prompts_file="p", method="greedy")
    with pytest.raises(ValueError, match="ablate_attention_edges applies at granularity='edge'"):
        ReproduceConfig(models=("m",), prompts_file="p", ablate_attention_edges=False)
    with pytest.raises(TypeError, match="Unknown mask_search field"):
        ReproduceConfig(models=("m",), prompts_file="p", granularity="edge", method="mask",
                        mask_options={"stepz": 3})  # fmt: skip
    with pytest.raises((TypeError, ValueError), match="token"):
        ReproduceConfig(models=("m",), prompts_file="p", granularity="token")
    with pytest.raises(ValueError, match="one model or two"):
        ReproduceConfig(models=("a", "b", "c"), prompts_file="p")


def test_cli_refuses_before_any_work(tmp_path, capsys):
    from strace_lens.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one two three\n", encoding="utf-8")
    out = tmp_path / "out"
    base = ["reproduce", "--model", "native:tiny", "--prompts", str(prompts), "--n", "1",
            "--out", str(out), "--quiet"]  # fmt: skip
    assert main([*base, "--granularity", "edge", "--ablation", "mean"]) == 2
    assert "ablation='mean'" in capsys.readouterr().err
    assert main([*base, "--method", "greedy"]) == 2
    assert "applies at granularity='edge'" in capsys.readouterr().err
    for flags in (["--method", "beam"], ["--granularity", "edge", "--ablate-attention-edges",
                                         "maybe"]):  # fmt: skip
        with pytest.raises(SystemExit) as code:
            main([*base, *flags])
        assert code.value.code == 2
        assert "invalid choice" in capsys.readouterr().err
    assert not out.exists()


class _Stop(Exception):
    pass


@pytest.mark.parametrize("options", [{}, {"steps": 2, "lr": 0.5}])
def test_edge_runs_are_traced_by_exactly_the_direct_call(tmp_path, monkeypatch, options):
    """The arguments trace_dataset receives: those of the documented direct call, the
    learned search's options only when given."""
    from strace_lens import dataset
    from strace_lens.reproduce import reproduce

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one two three\nfour five six\n", encoding="utf-8")
    calls = []

    def first_call(model, prompt_list, folder, **kwargs):
        calls.append((prompt_list, folder, kwargs))
        raise _Stop

    monkeypatch.setattr(dataset, "trace_dataset", first_call)
    with pytest.raises(_Stop):
        reproduce("native:tiny", prompts, n=2, out_dir=tmp_path / "out", granularity="edge",
                  method="mask", ablate_attention_edges=False, seed=3, chunk_size=8,
                  batch_size=4, device="cpu", progress=False, **options)  # fmt: skip
    prompt_list, folder, kwargs = calls[0]
    assert prompt_list == ["one two three", "four five six"]
    assert folder == tmp_path / "out" / "runs" / "native_tiny" / "mask"
    expected = {
        "chunk_size": 8,
        "progress": False,
        "batch_size": 4,
        "granularity": "edge",
        "method": "mask",
        "sizes": "paper",
        "ablate_attention_edges": False,
        "seed": 3,
    }
    if options:
        expected["mask_search"] = options
    assert kwargs == expected  # fmt: skip


# -- the phase quantities, by hand ---------------------------------------------------------
@pytest.fixture(scope="module")
def hand():
    return handmade(6, 2, [3], [FIRST], [COUNTS], GRID, tv=[[1.0, 0.9, 0.8, 0.5, 0.0]],
                    top1=[[0, 0, 1, 0, 1]])  # fmt: skip


def test_phase_quantities_equal_a_hand_count(hand):
    phases = edge_phases(hand, core_size=0.04)
    values, full, outside = (derive(v, 18) for v in phase_values(hand, core_size=0.04))
    # 2 edges: r5.mlp:2 and m5:2, both into block 5; one component, MLP 5, of 6 * 3
    assert values[0, 1, :6] == pytest.approx([0, 0, 1.0, 1 / 18, 0, 1.0])
    # per kind: no attention edge or head yet; the MLP edge m5:2 is outside the first quartile
    assert np.isnan(values[0, 1, [6, 8]]).all() and values[0, 1, [7, 9]] == pytest.approx([0, 1])
    # 4 edges: + a5.h1:0->2 and r4.attn:2 (block 4, depth 0.8); components m5 and a5.h1
    assert values[0, 2, :6] == pytest.approx([0, 1 / 4, 3.8 / 4, 2 / 18, 1 / 2, 1.0])
    # 8 edges: + m3:1, a0.h0:0->1, r1.mlp:0, a2.h1:1->2; blocks 0 and 1 form the first quartile
    depths = [_depth(n) for n in FIRST]
    assert depths == [1.0, 1.0, 1.0, 0.8, 0.6, 0.0, 0.2, 0.4]
    assert values[0, 3] == pytest.approx(
        [2 / 8, 3 / 8, sum(depths) / 8, 5 / 18, 3 / 5, (1 + 1 + 0.6 + 0 + 0.4) / 5,
         1 / 3, 0 / 2, (1 + 0 + 0.4) / 3, (1 + 0.6) / 2]
    )  # fmt: skip
    # the empty subgraph: no share or depth is defined; it touches no component
    assert np.isnan(values[0, 0]).sum() == 9 and values[0, 0, 3] == 0
    # the whole graph by brute force over its edge names
    graph = EdgeGraph(6, 2, 3)
    names = graph.names(torch.arange(graph.n_edges))
    d = np.array([_depth(n) for n in names])
    attn = np.array([n.startswith("a") for n in names])
    assert full[0, :3] == pytest.approx([(d <= 0.2).mean(), attn.mean(), d.mean()])
    assert full[0, 3:6] == pytest.approx([1.0, 12 / 18, 0.5])
    mlp = np.array([n.startswith("m") for n in names])
    q1 = d <= 0.2
    assert full[0, 6:] == pytest.approx([q1[attn].mean(), q1[mlp].mean(), 0.5, 0.5])
    # outside the core (the 4-edge subgraph at s = 0.04): 110 edges, 16 untouched components
    core = set(FIRST[:4])
    rest = [i for i, n in enumerate(names) if n not in core]
    assert outside[0, 1] == pytest.approx(attn[rest].mean())
    assert outside[0, 2] == pytest.approx(d[rest].mean())
    assert outside[0, 3:5] == pytest.approx([16 / 18, 11 / 16])
    heads_left = [(b, h) for b in range(6) for h in range(2) if (b, h) != (5, 1)]
    mlps_left = list(range(5))
    mean_depth = (sum(b / 5 for b, _ in heads_left) + sum(b / 5 for b in mlps_left)) / 16
    assert outside[0, 5] == pytest.approx(mean_depth)
    # the per-prompt table reads those references and the bands off the same curves
    table = phases.per_prompt().set_index("quantity")
    assert table.loc["edge_attn_share", "full"] == pytest.approx(full[0, 1])
    assert table.loc["component_head_share", "outside_core"] == pytest.approx(11 / 16)
    refinement = band_average(phases.log_grid, phases.curves, REFINEMENT_BAND)
    assert table.loc["edge_q1_share", "refinement"] == pytest.approx(refinement[0, 0],
                                                                      nan_ok=True)  # fmt: skip


def test_component_quantities_of_a_band_are_ratios_of_band_means():
    # one prompt: residual edges only below s = 1e-3 (no component), then 1 head and 3 MLPs
    grid = np.linspace(-5, 0, 151)
    raw = np.zeros((1, len(grid), len(RAW_QUANTITIES)))
    later = grid >= -3
    raw[0, :, :5] = 0.5  # edge shares, defined everywhere
    raw[0, later, 5] = 1.0  # heads, at depth 1
    raw[0, later, 6] = 3.0  # MLPs, at depths summing to 0.6
    raw[0, later, 7], raw[0, later, 8] = 1.0, 0.6
    ref = raw[0, -1][None]
    phases = EdgePhases(grid, raw, ref, ref, 1e-3, n_components=12)
    table = phases.per_prompt().set_index("quantity")
    heads = band_average(grid, raw[:, :, [5]], (1e-4, 1e-2))[0, 0]
    assert 0 < heads < 1  # half the band's decades touch no component
    # a mean of per-size ratios would be undefined here; the ratio of band means is not
    assert table.loc["component_head_share", "construction"] == pytest.approx(heads / (4 * heads))
    assert table.loc["component_mean_depth", "construction"] == pytest.approx(1.6 / 4)
    assert table.loc["component_share", "construction"] == pytest.approx(4 * heads / 12)
    assert table.loc["head_mean_depth", "minimal_core"] == pytest.approx(1.0)
    assert table.loc["mlp_mean_depth", "full"] == pytest.approx(0.2)
    bands = phases.bands().set_index(["band", "quantity"])
    assert bands.loc[("construction", "component_head_share"), "n"] == 1
    assert bands.loc[("construction", "component_head_share"), "lo"] == 1e-4


def test_core_sizes_and_sparse_ranks_by_hand(hand):
    core = edge_core_sizes(hand).iloc[0]
    # top-1 agrees first at grid index 2 (4 edges); the traced subgraph below it has 2
    assert core["reached"] and core["n_edges"] == 4
    assert core["relative_size"] == pytest.approx(4 / 114)
    assert core["lower_relative_size"] == pytest.approx(3 / 114)
    assert core["component_share"] == pytest.approx(2 / 18)
    r = handmade(6, 2, [3], [FIRST], [COUNTS], GRID)
    r.top_tokens = torch.tensor([[9, 1, 2, 3, 4]])
    r.full_top_tokens = torch.tensor([4])
    ranks = np.array([1.0, 10.0, 100.0, 1000.0, 10000.0, 5, 5, 5, 5, 7])
    # sizes up to 0.04 with edges: indices 1 and 2 (index 0 is empty): log10 10, log10 100
    assert sparse_rank_diffs(r, ranks, 0.04)[0] == pytest.approx((1 + 2) / 2 - 4)
    assert np.isnan(sparse_rank_diffs(r, ranks, 0.006)[0])  # only the empty subgraph


# -- controls on planted results -------------------------------------------------------------
def _flat_edges(tv: np.ndarray, entropy: np.ndarray) -> object:
    """Prompts of one 2-block, 1-head, 3-token graph (27 edges) with flat TV curves: each
    prompt's AUC is its TV times the same span."""
    n = len(tv)
    r = handmade(2, 1, [3] * n, [[]] * n, [[2, 5, 13, 27]] * n, (0.1, 0.2, 0.5, 1.0),
                 tv=[[float(t)] * 4 for t in tv])  # fmt: skip
    r.entropy = torch.tensor(entropy, dtype=torch.float32)
    r.prompts = [f"p{i}" for i in range(n)]
    return r


def test_a_planted_prompt_effect_vanishes_under_the_partial_correlation_at_edge():
    rng = np.random.default_rng(0)
    n = 60
    h = rng.uniform(0, 1, n)
    entropy = h + 0.05 * rng.normal(size=n)
    traced = _flat_edges(0.3 * h + 0.02 * rng.normal(size=n), entropy)
    random = _flat_edges(0.5 + 0.4 * h + 0.001 * rng.normal(size=n), entropy)
    table = edge_uncertainty_controls(traced, random, n_boot=300)
    line = table[table["measure"] == "auc"].set_index("statistic")
    assert line.loc["traced", "ci_low"] > 0.5 and line.loc["random", "ci_low"] > 0.5
    assert line.loc["partial", "ci_low"] < 0 < line.loc["partial", "ci_high"]
    # a signal of the traced density's own survives it
    signal = rng.uniform(0, 1, n)
    traced = _flat_edges(0.3 * h + signal, entropy + signal)
    random = _flat_edges(0.5 + 0.4 * h + 0.001 * rng.normal(size=n), entropy + signal)
    line = edge_uncertainty_controls(traced, random, n_boot=300).set_index(["measure", "statistic"])
    assert line.loc[("auc", "partial"), "ci_low"] > 0.3
    # flat curves: AUC = TV x span and density = TV, the same ranks
    assert line.loc[("density", "traced"), "rho"] == pytest.approx(line.loc[("auc", "traced"),
                                                                             "rho"])  # fmt: skip


def test_a_planted_cross_model_prompt_effect_vanishes_under_the_partial_correlation():
    rng = np.random.default_rng(4)
    n = 60
    h = rng.uniform(0, 1, n)
    entropy = np.ones(n)
    runs = []
    for name, slope in (("A", 0.3), ("B", 0.5)):  # both models' densities follow h only
        traced = _flat_edges(slope * h + 0.03 * rng.normal(size=n), entropy)
        random = _flat_edges(0.5 + 0.4 * h + 0.001 * rng.normal(size=n), entropy)
        comp = edge_composition(traced)
        runs.append(EdgeModelRun(name, {}, traced, random, comp, {}, pd.DataFrame(), {}))
    controls, rows = edge_agreement_claims(runs, n_boot=300, min_n=3)
    by = {row["id"]: row for row in rows}
    assert [row["id"] for row in rows] == ["2c", "2c.random", "2c.partial"]
    assert by["2c"]["model"] == "A vs B" and by["2c.random"]["role"] == REFERENCE
    assert by["2c"]["verdict"] == HOLDS and by["2c.random"]["verdict"] == HOLDS
    assert by["2c.partial"]["verdict"] == INCONCLUSIVE
    # the row is the two-control partial Spearman of the matched AUCs (flat TV x one span)
    auc = [r.metrics["tv"][:, 0].double().numpy() for run in runs for r in (run.traced, run.random)]
    expected = partial_spearman_ci(auc[0], auc[2], np.stack([auc[1], auc[3]], 1), n_boot=300)
    assert by["2c.partial"]["estimate"] == pytest.approx(expected["rho"])
    assert set(controls["measure"]) == {"auc", "density"} and (controls["model_a"] == "A").all()


def test_a_planted_prompt_effect_on_the_loss_vanishes_under_the_partial_correlation():
    """2b: the loss lines are read from the loss, not the entropy (here unrelated to density),
    and judged like 2a's: a prompt effect shared with random subgraphs does not survive."""
    from scipy.stats import spearmanr

    rng = np.random.default_rng(2)
    n = 60
    h = rng.uniform(0, 1, n)
    loss = 3 * h + 0.1 * rng.normal(size=n)
    entropy = rng.uniform(0, 1, n)  # independent of every density
    traced = _flat_edges(0.3 * h + 0.02 * rng.normal(size=n), entropy)
    random = _flat_edges(0.5 + 0.4 * h + 0.001 * rng.normal(size=n), entropy)
    controls = edge_uncertainty_controls(traced, random, n_boot=300, loss=loss)
    assert set(controls["against"]) == {"entropy", "loss"} and len(controls) == 12
    by = controls.set_index(["against", "measure", "statistic"])
    auc = traced.metrics["tv"][:, 0].double().numpy()  # flat curves: AUC ranks = TV ranks
    random_auc = random.metrics["tv"][:, 0].double().numpy()
    assert by.loc[("loss", "auc", "traced"), "rho"] == pytest.approx(spearmanr(auc, loss)[0])
    assert by.loc[("loss", "auc", "random"), "rho"] == pytest.approx(spearmanr(random_auc, loss)[0])
    expected = partial_spearman_ci(auc, loss, random_auc[:, None], n_boot=300)
    assert by.loc[("loss", "auc", "partial"), "rho"] == pytest.approx(expected["rho"])
    assert by.loc[("entropy", "auc", "traced"), "rho"] == pytest.approx(spearmanr(auc, entropy)[0])
    tables = _planted_tables(n, "attention", seed=1)
    tables["uncertainty_controls"] = controls
    claims = edge_claims_of(tables, "p", n_boot=300).set_index("id")
    assert list(claims.index[14:22]) == ["2a", "2a.random", "2a.partial", "2a.density", "2b",
                                         "2b.random", "2b.partial", "S1"]  # fmt: skip
    assert claims.loc["2b", "verdict"] == HOLDS and claims.loc["2b.random", "verdict"] == HOLDS
    assert claims.loc["2b.partial", "verdict"] == INCONCLUSIVE
    assert claims.loc["2b.partial", "role"] == CONTROL
    assert claims.loc["2b.random", "role"] == REFERENCE
    assert np.isnan(claims.loc["2b.random", "p_holm"])
    assert claims.loc["2b", "estimate"] == pytest.approx(by.loc[("loss", "auc", "traced"), "rho"])
    assert claims.loc["2a", "verdict"] == INCONCLUSIVE  # the entropy's line, not the loss's
    with pytest.raises(ValueError, match="59 losses for 60 traced prompts"):
        edge_uncertainty_controls(traced, random, n_boot=10, loss=loss[:-1])
    # without a loss: no 2b row (the report says why)
    tables["uncertainty_controls"] = edge_uncertainty_controls(traced, random, n_boot=50)
    assert "2b" not in set(edge_claims_of(tables, "p", n_boot=50)["id"])


def test_edge_target_loss_is_the_full_models_loss_on_the_true_next_token():
    """Against brute force: each prompt alone, followed by its target, through the model; the
    loss read at the last prompt position for the target's first token."""
    from strace_lens.edges import edge_target_loss, edge_tokenize, edge_trace
    from strace_lens.tiny_model import tiny_model

    tiny = tiny_model(device="cpu")
    prompts = ["ab", "a longer prompt", "xyz q"]
    targets = [" c", "!", "rs"]
    result = edge_trace(tiny, prompts, method="random", sizes=[0.5, 1.0])
    loss = edge_target_loss(tiny, result, targets, chunk_size=2)  # chunks of 2 and 1
    expected = []
    for prompt, target in zip(prompts, targets, strict=True):
        n = int(edge_tokenize(tiny, prompt).predict_pos[0]) + 1
        whole = edge_tokenize(tiny, prompt + target)
        with torch.no_grad():
            logp = torch.log_softmax(tiny(whole.tokens)[0].double(), -1)
        expected.append(-float(logp[n - 1, whole.tokens[0, n]]))
    assert loss == pytest.approx(expected, abs=1e-5)
    assert loss[0] != pytest.approx(loss[1])
    with pytest.raises(ValueError, match="2 targets for the run's 3 prompts"):
        edge_target_loss(tiny, result, targets[:2])
    # another model is not the run's full model: refused, not silently scored
    with pytest.raises(ValueError, match="not the run's full model"):
        edge_target_loss(tiny_model(device="cpu", seed=5), result, targets)


def _planted_tables(n: int, refinement: str, seed: int) -> dict[str, pd.DataFrame]:
    """Per-prompt phase values of an MLP-only construction band whose refinement is drawn
    at random from a pool with attention share ~0.95 (``"random"``) or is all attention
    (``"attention"``); the other claims' inputs are flat."""
    rng = np.random.default_rng(seed)
    pool = 0.95 + 0.01 * rng.normal(size=n)
    ref = pool + 0.02 * rng.normal(size=n) if refinement == "random" else np.ones(n)
    rows = []
    for q, (construction, refine, outside) in {
        "edge_q1_share": (0.4, 0.3, 0.3), "edge_attn_share": (0.0, ref, pool),
        "edge_mean_depth": (0.2, 0.5, 0.5), "component_share": (0.1, 0.9, 0.9),
        "component_head_share": (0.0, ref, pool), "component_mean_depth": (0.3, 0.5, 0.5),
        "attn_edge_q1_share": (0.5, 0.3, 0.3), "mlp_edge_q1_share": (0.25, 0.25, 0.25),
        "head_mean_depth": (0.4, 0.5, 0.5), "mlp_mean_depth": (0.6, 0.5, 0.5),
    }.items():  # fmt: skip
        rows.append(pd.DataFrame({
            "prompt": np.arange(n), "quantity": q,
            "construction": construction + 0.01 * rng.normal(size=n),
            "refinement": refine, "minimal_core": construction, "full": 0.3 if "q1" in q else 0.5,
            "outside_core": outside,
        }))  # fmt: skip
    core = pd.DataFrame({"prompt": np.arange(n), "relative_size": np.full(n, 0.02),
                         "lower_relative_size": np.full(n, 0.01),
                         "component_share": np.full(n, 0.3)})  # fmt: skip
    controls = pd.DataFrame([
        {"measure": m, "against": "entropy", "statistic": s, "rho": 0.5, "ci_low": 0.2,
         "ci_high": 0.7, "p_value": 0.01, "n": n, "ci": 0.95}
        for m in ("auc", "density") for s in ("traced", "random", "partial")
    ])  # fmt: skip
    density = pd.DataFrame({"auc": np.full(n, 1.0), "density": np.full(n, 0.2)})
    return {
        "phases": pd.concat(rows, ignore_index=True), "core": core,
        "uncertainty_controls": controls, "density": density,
        "random_density": density.assign(auc=1.5 + 0.1 * rng.normal(size=n)),
        "frequency": pd.DataFrame({"traced_diff_log10_rank": -1 + 0.1 * rng.normal(size=n),
                                   "random_diff_log10_rank": -1 + 0.1 * rng.normal(size=n)}),
    }  # fmt: skip


def test_a_planted_base_rate_makes_1d_inconclusive_at_edge():
    for refinement, expected in (("random", INCONCLUSIVE), ("attention", HOLDS)):
        tables = _planted_tables(60, refinement, seed=1)
        claims = edge_claims_of(tables, "p", n_boot=300).set_index("id")
        for key in ("1d", "1d.components"):  # against the attention-free construction band
            assert claims.loc[key, "verdict"] == HOLDS
        for key in ("1d.base", "1d.base.components"):
            assert claims.loc[key, "role"] == CONTROL
            assert claims.loc[key, "verdict"] == expected, (refinement, key)
    # every lower end of 1a's core is exactly the threshold: undetermined, in edges only
    assert claims.loc["1a", "ci_low"] == 0.01 and claims.loc["1a", "verdict"] == UNDETERMINED
    assert claims.loc["1a.components", "verdict"] == FAILS  # 0.3 of the components > 0.1
    # 1b: construction q1 share 0.4 against 0.3 of all edges; 3.control ~ 0: not shown
    assert claims.loc["1b", "estimate"] == pytest.approx(0.1, abs=0.01)
    assert claims.loc["1b", "verdict"] == HOLDS and claims.loc["3", "verdict"] == HOLDS
    # per kind at the minimal core: early heads (0.4 against 0.5), late MLPs (0.6)
    assert claims.loc["1b.attn.components", "verdict"] == HOLDS
    assert claims.loc["1b.mlp.components", "verdict"] == FAILS
    assert claims.loc["1b.attn", "estimate"] == pytest.approx(0.5 - 0.3)
    assert claims.loc["3.control", "verdict"] == INCONCLUSIVE
    assert claims.loc["2a.random", "role"] == REFERENCE and np.isnan(
        claims.loc["2a.random", "p_holm"]
    )


# -- the whole run -------------------------------------------------------------------------
PROMPTS = [f"Number {i} follows {i - 1} and it comes just before {i + 1} in the list."
           for i in range(1, 6)]  # fmt: skip


def test_edge_reproduce_end_to_end_resumes_the_direct_trace_dataset_folders(
    tmp_path, monkeypatch, capsys
):
    from strace_lens import dataset
    from strace_lens.cli import main
    from strace_lens.dataset import trace_dataset
    from strace_lens.reproduce import reproduce
    from strace_lens.tiny_model import tiny_model

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    model = tiny_model(device="cpu")
    direct = {}
    for method in ("greedy", "random"):  # as a long run started by hand does it
        direct[method] = trace_dataset(
            model, PROMPTS, out / "runs" / "native_tiny" / method, chunk_size=16,
            progress=False, granularity="edge", method=method, sizes="paper",
            ablate_attention_edges=True, seed=0,
        )  # fmt: skip

    def no_tracing():
        raise AssertionError("reproduce retraced a finished run folder")

    monkeypatch.setattr(dataset, "_trace_function", no_tracing)
    repro = reproduce("native:tiny", prompts, n=5, out_dir=out, granularity="edge",
                      min_prompts=3, n_boot=200, device="cpu", progress=False)  # fmt: skip
    run = repro.runs[0]
    for label, result in (("greedy", run.traced), ("random", run.random)):
        assert torch.equal(result.ids, direct[label].ids)
        assert torch.equal(result.metrics["tv"], direct[label].metrics["tv"])
        assert len(list((out / "runs" / "native_tiny" / label / "shards").iterdir())) == 1
    claims = pd.read_csv(out / "claims.csv")
    assert list(claims["id"]) == [
        "1a", "1a.components", "1b", "1b.components", "1b.attn", "1b.mlp", "1b.attn.components",
        "1b.mlp.components", "1c", "1c.components", "1d", "1d.base",
        "1d.components", "1d.base.components", "2a", "2a.random", "2a.partial", "2a.density",
        "S1", "3", "3.random", "3.control",
    ]  # fmt: skip
    assert set(claims["verdict"]) <= {HOLDS, FAILS, INCONCLUSIVE, UNDETERMINED}
    judged = claims["role"] != REFERENCE
    assert claims.loc[judged, "p_holm"].to_numpy() == pytest.approx(
        holm(claims.loc[judged, "p_value"]), nan_ok=True
    )
    tables = out / "tables" / "native_tiny"
    density = pd.read_csv(tables / "density.csv")
    random_density = pd.read_csv(tables / "random_density.csv")
    assert len(density) == 5 and (density["auc"] > 0).all()
    assert ((density["density"] >= 0) & (density["density"] <= 1)).all()
    s1 = claims.set_index("id").loc["S1", "estimate"]
    assert s1 == pytest.approx((random_density["auc"] - density["auc"]).mean())
    # E ~ 1.5e4 edges: every prompt covers both bands; shares of a band sum to one
    bands = pd.read_csv(tables / "composition_bands.csv")
    for band in ("construction", "refinement"):
        means = bands[bands["band"] == band].set_index("quantity")["mean"]
        assert means[[f"q{q}_share" for q in range(1, 5)]].sum() == pytest.approx(1.0)
        assert means[["attn_share", "mlp_share", "resid_share"]].sum() == pytest.approx(1.0)
        assert (bands[bands["band"] == band]["n"] == 5).all()
    phases = pd.read_csv(tables / "phases.csv")
    q1 = phases[phases["quantity"] == "edge_q1_share"]
    expected_1b = (q1["construction"] - q1["full"]).mean()
    assert claims.set_index("id").loc["1b", "estimate"] == pytest.approx(expected_1b)
    for name in ("projection", "projection_bands", "phase_bands", "core", "uncertainty_controls",
                 "frequency", "curves", "composition"):  # fmt: skip
        assert (tables / f"{name}.csv").exists(), name
    shards = pd.read_csv(tables / "shards.csv")  # one row per shard, as timing.json has it
    for label in ("greedy", "random"):
        (timing,) = (out / "runs" / "native_tiny" / label / "shards").glob("*/timing.json")
        (row,) = shards[shards["run"] == label].itertuples()
        assert (row.shard, row.seconds) == (0, json.loads(timing.read_text())["seconds"])
    report = (out / "report.md").read_text(encoding="utf-8")
    needed_words = [
        "edge granularity",
        "1d.base.components",
        "| p_holm |",
        "verdict_holm",
        "without an edge analogue",
        "**2b**",
        "**S2**",
        "granularity='edge'",
    ]
    for needed in needed_words:
        assert needed in report, needed
    # the project's edge page: fidelity of traced and random, composition, token circuit
    page = (out / "figures" / "native_tiny.html").read_text(encoding="utf-8")
    for div in ("fig-edge_fidelity", "fig-edge_composition", "fig-token_circuit"):
        assert div in page, div
    assert "figures/native_tiny.html" in report

    # the command line resumes the same folders, records itself, prints both verdicts
    status = main(["reproduce", "--model", "native:tiny", "--prompts", str(prompts), "--n", "5",
                   "--out", str(out), "--granularity", "edge", "--method", "greedy",
                   "--ablate-attention-edges", "true", "--quiet"])  # fmt: skip
    assert status == 0
    printed = capsys.readouterr().out
    assert "verdict_holm" in printed and "1d.base" in printed
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "--granularity edge --method greedy --ablate-attention-edges true" in report


def test_edge_reproduce_with_targets_claims_2b_without_retracing(tmp_path, monkeypatch):
    """A TSV's next-token column gives 2b: the loss of one clean forward (density.csv's
    ``loss``), the run folders traced exactly as without targets (same identity: resumed)."""
    from strace_lens import dataset
    from strace_lens.dataset import trace_dataset
    from strace_lens.edges import edge_target_loss
    from strace_lens.reproduce import reproduce
    from strace_lens.tiny_model import tiny_model

    texts, targets = PROMPTS[:3], [" 2", " x", "!"]
    prompts = tmp_path / "prompts.tsv"
    prompts.write_text("".join(f"{p}\tw\tX\tn\tY\t{t}\n" for p, t in zip(texts, targets,
                                                                         strict=True)),
                       encoding="utf-8")  # fmt: skip
    out = tmp_path / "out"
    model = tiny_model(device="cpu")
    for method in ("greedy", "random"):  # traced without targets, as the direct call does
        trace_dataset(model, texts, out / "runs" / "native_tiny" / method, chunk_size=16,
                      progress=False, granularity="edge", method=method, sizes="paper",
                      ablate_attention_edges=True, seed=0)  # fmt: skip

    def no_tracing():
        raise AssertionError("reproduce retraced a finished run folder")

    monkeypatch.setattr(dataset, "_trace_function", no_tracing)
    repro = reproduce("native:tiny", prompts, n=3, out_dir=out, granularity="edge",
                      min_prompts=3, n_boot=50, device="cpu", progress=False)  # fmt: skip
    claims = pd.read_csv(out / "claims.csv").set_index("id")
    assert list(claims.index[14:22]) == ["2a", "2a.random", "2a.partial", "2a.density", "2b",
                                         "2b.random", "2b.partial", "S1"]  # fmt: skip
    density = pd.read_csv(out / "tables" / "native_tiny" / "density.csv")
    expected = edge_target_loss(model, repro.runs[0].traced, targets)
    assert density["loss"].to_numpy() == pytest.approx(expected)
    from scipy.stats import spearmanr

    assert claims.loc["2b", "estimate"] == pytest.approx(spearmanr(density["auc"], expected)[0])
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "**S2**" in report and "**2b**" not in report
    assert "loss (2b) on the TSV's next-token column" in report
