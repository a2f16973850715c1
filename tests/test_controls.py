"""The claims' statistical controls (issue 14, item 2): partial Spearman correlation, Holm,
the undetermined verdict, per-kind depth, base rates and the random-subgraph controls, each
on small inputs whose answer is known by hand or by an independent computation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from strace_lens.analysis import (
    agreement,
    agreement_controls,
    core_depth_by_kind,
    holm,
    partial_spearman_ci,
    refinement_base_rate,
    uncertainty,
    uncertainty_controls,
)
from strace_lens.graph import NodeGraph
from strace_lens.reproduce.claims import (
    CONTROL,
    FAILS,
    HOLDS,
    INCONCLUSIVE,
    REFERENCE,
    UNDETERMINED,
    ModelRun,
    agreement_claims,
    analyse,
    claims_of,
    sign_test,
    verdict,
    with_multiplicity,
)
from strace_lens.result import TraceResult

GRAPH = NodeGraph(n_layers=4, n_heads=3)  # 16 nodes: a{l}.h0..h2 then m{l}; m0 = 3, m1 = 7
SIZES = [1, 2, 4, 8, 16]
MLPS = [3, 7, 11, 15]
HEADS = [i for i in range(16) if i not in MLPS]


def _result(
    masks: torch.Tensor,
    *,
    tv: torch.Tensor | None = None,
    nucleus: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    loss: torch.Tensor | None = None,
    top: torch.Tensor | None = None,
    full_top: torch.Tensor | None = None,
    prompts: list[str] | None = None,
    method: str = "mask",
) -> TraceResult:
    """A per-input TraceResult on GRAPH from given masks [P, S, N] (defaults elsewhere)."""
    n = masks.shape[0]
    tv = tv if tv is not None else torch.zeros(n, len(SIZES))
    return TraceResult(
        graph=GRAPH,
        sizes=torch.tensor(SIZES),
        masks=masks.bool(),
        metrics={
            "kl": tv.float(),
            "tv": tv.float(),
            "nucleus": (nucleus if nucleus is not None else torch.zeros(n, len(SIZES))).float(),
        },
        entropy=(entropy if entropy is not None else torch.ones(n)).float(),
        prompts=prompts or [f"p{i}" for i in range(n)],
        top_tokens=top if top is not None else torch.zeros(n, len(SIZES), 5, dtype=torch.long),
        full_top_tokens=full_top if full_top is not None else torch.zeros(n, 5, dtype=torch.long),
        candidates=torch.ones(16, dtype=torch.bool),
        options={"per": "input", "method": method},
        target_logprob=None if loss is None else (-loss).float(),
    )


def _nested(orders: list[list[int]]) -> torch.Tensor:
    masks = torch.zeros(len(orders), len(SIZES), 16, dtype=torch.bool)
    for r, order in enumerate(orders):
        for j, s in enumerate(SIZES):
            masks[r, j, order[:s]] = True
    return masks


def _flat(densities: np.ndarray, **kw) -> TraceResult:
    """Flat TV curves: each prompt's density is exactly the given value."""
    tv = torch.tensor(densities, dtype=torch.float32)[:, None].expand(-1, len(SIZES))
    orders = [list(range(16))] * len(densities)
    return _result(_nested(orders), tv=tv.contiguous(), **kw)


# -- partial Spearman ------------------------------------------------------------------------
def test_partial_spearman_equals_the_textbook_formula_with_one_control():
    rng = np.random.default_rng(0)
    z = rng.normal(size=50)
    x = z + rng.normal(size=50)
    y = z + 0.5 * x + rng.normal(size=50)
    r_xy = stats.spearmanr(x, y).statistic
    r_xz = stats.spearmanr(x, z).statistic
    r_yz = stats.spearmanr(y, z).statistic
    expected = (r_xy - r_xz * r_yz) / np.sqrt((1 - r_xz**2) * (1 - r_yz**2))
    out = partial_spearman_ci(x, y, z, n_boot=300, seed=1)
    assert out["rho"] == pytest.approx(expected, abs=1e-12)
    t = expected * np.sqrt(47 / (1 - expected**2))  # df = n - 2 - 1
    assert out["p_value"] == pytest.approx(2 * stats.t.sf(abs(t), 47), rel=1e-9)
    assert out["ci_low"] < out["rho"] < out["ci_high"] and out["n"] == 50
    assert partial_spearman_ci(x, y, z, n_boot=300, seed=1) == out  # seeded


def test_partial_spearman_equals_a_residual_regression_with_two_controls():
    rng = np.random.default_rng(2)
    n = 40
    z = rng.normal(size=(n, 2))
    x = z @ [1.0, -0.5] + rng.normal(size=n)
    y = z @ [0.3, 1.0] + 0.4 * x + rng.normal(size=n)
    x[3] = np.nan  # dropped with its row
    keep = np.isfinite(x)
    ranks = [stats.rankdata(v) for v in (x[keep], y[keep], z[keep, 0], z[keep, 1])]
    design = np.column_stack([np.ones(keep.sum()), ranks[2], ranks[3]])
    res_x = ranks[0] - design @ np.linalg.lstsq(design, ranks[0], rcond=None)[0]
    res_y = ranks[1] - design @ np.linalg.lstsq(design, ranks[1], rcond=None)[0]
    expected = stats.pearsonr(res_x, res_y).statistic
    out = partial_spearman_ci(x, y, z, n_boot=200)
    assert out["rho"] == pytest.approx(expected, abs=1e-10) and out["n"] == n - 1


def test_partial_spearman_is_undefined_when_a_side_is_the_control():
    x = np.arange(10.0)
    out = partial_spearman_ci(x, x[::-1] ** 2, x, n_boot=50)
    assert np.isnan(out["rho"]) and np.isnan(out["p_value"])
    with pytest.raises(ValueError, match="one value per row"):
        partial_spearman_ci(x, x, x[:5])


# -- Holm ------------------------------------------------------------------------------------
def test_holm_against_a_hand_example():
    # sorted 0.005, 0.01, 0.03, 0.04 (m = 4): x4 = 0.02, x3 = 0.03, x2 = 0.06, x1 = 0.04 -> 0.06
    adjusted = holm([0.01, 0.04, 0.03, 0.005, np.nan])
    assert adjusted[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert np.isnan(adjusted[4])
    assert holm([0.5, 0.3]).tolist() == [0.6, 0.6]  # capped at 1 before the running maximum
    assert holm([0.9, 0.8]).tolist() == [1.0, 1.0]
    assert np.isnan(holm([np.nan])).all()


def test_with_multiplicity_demotes_holds_that_do_not_survive_and_skips_references():
    frame = pd.DataFrame(
        {
            "role": ["claim", "claim", REFERENCE, CONTROL, "sanity"],
            "p_value": [0.01, 0.02, 1e-9, 0.04, 0.001],
            "verdict": [HOLDS, HOLDS, HOLDS, FAILS, HOLDS],
        }
    )
    for col in ("model", "id", "claim", "figure", "predicted"):
        frame[col] = ""
    for col in ("estimate", "ci_low", "ci_high", "n"):
        frame[col] = 0.0
    out = with_multiplicity(frame)
    # family of 4 (the reference row is outside): 0.001 x4, 0.01 x3, 0.02 x2, 0.04 x1
    assert out["p_holm"].tolist()[:2] == pytest.approx([0.03, 0.04])
    assert np.isnan(out["p_holm"][2])
    assert out["p_holm"].tolist()[3:] == pytest.approx([0.04, 0.004])
    assert out["verdict_holm"].tolist() == [HOLDS, HOLDS, REFERENCE, FAILS, HOLDS]
    assert with_multiplicity(frame, alpha=0.035)["verdict_holm"].tolist()[:2] == [
        HOLDS,
        INCONCLUSIVE,
    ]


# -- 1a: undetermined on the threshold, sign test ----------------------------------------------
def test_a_threshold_on_an_end_of_the_interval_is_undetermined():
    # Gemma's case: lower bound 9/90 against "< 0.1"
    assert verdict(9 / 90, 26 / 90, "less", 0.1, n=200) == FAILS  # the plain rule
    assert verdict(9 / 90, 26 / 90, "less", 0.1, n=200, touching=True) == UNDETERMINED
    assert verdict(0.05, 0.1, "less", 0.1, n=200, touching=True) == UNDETERMINED
    assert verdict(0.05, 0.0999, "less", 0.1, n=200, touching=True) == HOLDS
    assert verdict(0.1001, 0.3, "less", 0.1, n=200, touching=True) == FAILS
    assert verdict(0.1, 0.3, "less", 0.1, n=5, touching=True) == INCONCLUSIVE  # too few


def test_sign_test_counts_bracketed_values():
    lower = np.array([0.01, 0.02, 0.05, 0.2, 0.08, 0.1])
    upper = np.array([0.02, 0.05, 0.08, 0.3, 0.12, 0.2])
    # below: the first three; above: 0.2-0.3; ties: 0.08-0.12 (straddles), 0.1-0.2 (touches)
    # two-sided binomial test of 3 of 4 at 1/2: 2 * (4 + 1) / 16
    assert sign_test(lower, upper, 0.1) == pytest.approx(10 / 16)
    assert np.isnan(sign_test(lower[4:], upper[4:], 0.1))


def _phases_planted(n: int, refinement: str, seed: int = 0) -> TraceResult:
    """A core of the two first-layer MLPs (m0, m1) at size 2, top-1 token from size 2, 90 %
    nucleus at size 8. The 6 nodes added from size 2 to 8 are, per ``refinement``: heads
    first ("heads"), or a random draw from the 14 other nodes ("random")."""
    rng = np.random.default_rng(seed)
    orders = []
    for _ in range(n):
        rest = [i for i in range(16) if i not in (3, 7)]
        rest = HEADS[:6] + [i for i in rest if i not in HEADS[:6]]
        if refinement == "random":
            rest = list(rng.permutation(rest))
        orders.append([3, 7, *rest])
    nucleus = torch.tensor([[0, 1, 20, 90, 99]] * n, dtype=torch.float32)
    return _result(_nested(orders), nucleus=nucleus)


def test_claim_1a_is_undetermined_when_its_interval_touches_the_threshold():
    result = _phases_planted(40, "heads")
    tables = analyse(result, None, torch.ones(20), n_boot=100)

    def row_1a(small_core: float) -> dict:
        claims = claims_of(result, tables, torch.ones(20), "p", n_boot=100, small_core=small_core)
        return claims.set_index("id").loc["1a"].to_dict()

    # every core is traced at size 2 (after 1): it has exactly 2 nodes, interval [2/16, 2/16]
    assert row_1a(2 / 16)["verdict"] == UNDETERMINED
    assert row_1a(0.1)["verdict"] == FAILS and row_1a(0.1)["p_value"] == pytest.approx(
        2 * 0.5**40
    )  # all 40 cores above: sign test 0 of 40
    assert row_1a(0.2)["verdict"] == HOLDS


# -- 1b per node kind, 1d against its base rate ----------------------------------------------
def test_core_depth_by_kind_by_hand():
    # row 0: core = size 2 of [m0, a3.h0, ...]; row 1: never reaches the core level
    masks = _nested([[3, 12, *range(16)], list(range(16))])
    nucleus = torch.tensor([[0, 5, 5, 5, 99], [0, 0, 0, 0, 0]], dtype=torch.float32)
    table = core_depth_by_kind(_result(masks, nucleus=nucleus)).set_index(["row", "kind"])
    # MLP depths 0, 1/3, 2/3, 1 (mean 0.5): the core's m0 at 0; heads likewise, a3.h0 at 1
    assert table.loc[(0, "mlp"), "depth_gap"] == pytest.approx(0.5)
    assert table.loc[(0, "attn"), "depth_gap"] == pytest.approx(-0.5)
    assert table.loc[(0, "attn"), "base_mean_depth"] == pytest.approx(0.5)
    assert table.loc[(0, "mlp"), "n_nodes"] == 1
    assert np.isnan(table.loc[(1, "mlp"), "core_mean_depth"])
    assert table.loc[(1, "attn"), "n_nodes"] == 0


def test_refinement_base_rate_by_hand():
    # core m0, m1 (size 2); refined at size 4: + a0.h0 and m2 -> refinement {a0.h0, m2}
    masks = _nested([[3, 7, 0, 11, *range(16)]])
    nucleus = torch.tensor([[0, 5, 95, 99, 99]], dtype=torch.float32)
    row = refinement_base_rate(_result(masks, nucleus=nucleus)).iloc[0]
    assert row["n_nodes"] == 2 and row["attn_share"] == pytest.approx(0.5)
    # the pool: 14 candidates outside the core, of which 12 heads
    assert row["pool_size"] == 14 and row["pool_attn_share"] == pytest.approx(12 / 14)
    assert row["excess"] == pytest.approx(0.5 - 12 / 14) and row["core_attn_share"] == 0.0


def test_a_planted_base_rate_makes_1d_inconclusive_while_heads_first_holds():
    counts = torch.ones(20)
    for refinement, expected in (("random", INCONCLUSIVE), ("heads", HOLDS)):
        result = _phases_planted(60, refinement, seed=3)
        tables = analyse(result, None, counts, n_boot=300)
        claims = claims_of(result, tables, counts, "p", n_boot=300).set_index("id")
        # against the MLP-only core, any refinement is richer in heads
        assert claims.loc["1d", "verdict"] == HOLDS
        assert claims.loc["1d.base", "role"] == CONTROL
        assert claims.loc["1d.base", "verdict"] == expected, refinement
    # heads first: the refinement is all heads against a pool of 12 heads in 14 nodes
    assert claims.loc["1d.base", "estimate"] == pytest.approx(1 - 12 / 14)
    # the core's two MLPs lie at depths 0 and 1/3 against 0.5 for all MLPs; no heads in it
    assert claims.loc["1b.mlp", "estimate"] == pytest.approx(0.5 - 1 / 6)
    assert claims.loc["1b.mlp", "verdict"] == HOLDS
    assert claims.loc["1b.attn", "n"] == 0 and claims.loc["1b.attn", "verdict"] == INCONCLUSIVE


# -- 2a/2b and 2c: random subgraphs and the partial correlation --------------------------------
def _prompt_effect(n: int, seed: int, own: float) -> tuple[TraceResult, TraceResult]:
    """Traced and random density both follow a prompt's hardness h; entropy follows h too.
    ``own``: how much of the traced density is its own signal that entropy also follows."""
    rng = np.random.default_rng(seed)
    h = rng.uniform(0, 1, n)
    signal = rng.uniform(0, 1, n)
    traced = 0.3 * h + own * signal + 0.02 * rng.normal(size=n)
    # random subgraphs measure the prompt effect (nearly) exactly: it is what they see
    rand = 0.5 + 0.4 * h + 0.001 * rng.normal(size=n)
    entropy = torch.tensor(h + own * signal + 0.05 * rng.normal(size=n))
    loss = torch.tensor(rng.uniform(0, 5, n))
    a = _flat(traced, entropy=entropy, loss=loss)
    b = _flat(rand, entropy=entropy, loss=loss, method="random")
    return a, b


def test_a_planted_prompt_effect_vanishes_under_the_partial_correlation():
    traced, random = _prompt_effect(80, seed=0, own=0.0)
    table = uncertainty_controls(traced, random, n_boot=400).set_index(["against", "statistic"])
    plain = uncertainty(traced, n_boot=400).set_index("against")
    # the traced line is the uncertainty table's own
    assert table.loc[("entropy", "traced"), "rho"] == plain.loc["entropy", "rho"]
    assert table.loc[("entropy", "traced"), "ci_low"] == plain.loc["entropy", "ci_low"]
    assert table.loc[("entropy", "traced"), "ci_low"] > 0.5  # looks like a density effect
    assert table.loc[("entropy", "random"), "ci_low"] > 0.5  # random subgraphs show it too
    partial = table.loc[("entropy", "partial")]
    assert partial["ci_low"] < 0 < partial["ci_high"] and abs(partial["rho"]) < 0.25
    # and the traced density's own signal survives it
    traced, random = _prompt_effect(80, seed=0, own=1.0)
    table = uncertainty_controls(traced, random, n_boot=400).set_index(["against", "statistic"])
    assert table.loc[("entropy", "partial"), "ci_low"] > 0.3
    assert table.loc[("loss", "partial"), "n"] == 80


def test_claims_carry_the_density_and_frequency_controls():
    traced, random = _prompt_effect(40, seed=1, own=0.0)
    full = torch.tensor([[9, 8, 7, 6, 5]] * 40)
    top = full[:, None].repeat(1, len(SIZES), 1).clone()
    top[:, 0, 0] = 0  # the traced size-1 subgraph predicts token 0 (rank 1)
    top[:20, 1, 0] = 1  # ... and for half the prompts size 2 predicts token 1 (rank 2)
    traced.top_tokens, traced.full_top_tokens = top, full
    rand_top = top.clone()
    rand_top[:, 1, 0] = 0  # random subgraphs: token 0 at sizes 1 and 2
    random.top_tokens, random.full_top_tokens = rand_top, full
    counts = torch.tensor([100, 50, 40, 30, 20, 10, 5, 4, 3, 2])  # token t has rank t + 1
    tables = analyse(traced, random, counts, n_boot=200)
    claims = claims_of(traced, tables, counts, "p", n_boot=200, small_core=0.15, random=random)
    by = claims.set_index("id")
    assert list(by.index) == [
        "1a", "1b", "1b.mlp", "1b.attn", "1c", "1d", "1d.base", "2a", "2a.random",
        "2a.partial", "2b", "2b.random", "2b.partial", "3", "3.random", "3.control", "S1",
    ]  # fmt: skip
    controls = tables["uncertainty_controls"].set_index(["against", "statistic"])
    assert by.loc["2a.partial", "estimate"] == controls.loc[("entropy", "partial"), "rho"]
    assert by.loc["2a.random", "role"] == REFERENCE
    assert np.isnan(by.loc["2a.random", "p_holm"])
    # 3: sparse sizes 1 and 2 (<= 0.15 of 16); full rank 10
    lg = np.log10
    traced_diff = np.r_[[(lg(1) + lg(2)) / 2] * 20, [(lg(1) + lg(10)) / 2] * 20] - lg(10)
    assert by.loc["3", "estimate"] == pytest.approx(traced_diff.mean())
    assert by.loc["3.random", "estimate"] == pytest.approx(lg(1) - lg(10))
    assert by.loc["3.control", "estimate"] == pytest.approx(traced_diff.mean() - lg(0.1))
    # random subgraphs favour frequent tokens more: the controlled claim does not hold
    assert by.loc["3", "verdict"] == HOLDS and by.loc["3.control", "verdict"] == FAILS
    judged = claims["role"] != REFERENCE
    assert claims.loc[judged, "p_holm"].to_numpy() == pytest.approx(
        holm(claims.loc[judged, "p_value"]), nan_ok=True
    )


def test_cross_model_agreement_controls_remove_a_shared_prompt_effect():
    rng = np.random.default_rng(4)
    n = 80
    h = rng.uniform(0, 1, n)
    results = []
    for slope in (0.3, 0.5):  # two "models": traced and random density both follow h
        results.append(_flat(slope * h + 0.03 * rng.normal(size=n)))
        results.append(_flat(0.5 + 0.4 * h + 0.001 * rng.normal(size=n), method="random"))
    mask_a, random_a, mask_b, random_b = results
    table = agreement_controls(mask_a, random_a, mask_b, random_b, n_boot=400)
    line = table.set_index("statistic")
    assert line.loc["traced", "rho"] == agreement(mask_a, mask_b, n_boot=400)["rho"].item()
    assert line.loc["traced", "ci_low"] > 0.6 and line.loc["random", "ci_low"] > 0.6
    assert line.loc["partial", "ci_low"] < 0 < line.loc["partial", "ci_high"]
    # the partial line is the two-control partial Spearman of the matched densities
    dens = [r.metrics["tv"][:, 0].double().numpy() for r in results]
    expected = partial_spearman_ci(dens[0], dens[2], np.stack([dens[1], dens[3]], 1), n_boot=400)
    assert line.loc["partial", "rho"] == pytest.approx(expected["rho"])
    assert line.loc["partial", "p_value"] == pytest.approx(expected["p_value"])


def test_agreement_claims_rows_and_one_holm_family_over_the_report():
    rng = np.random.default_rng(5)
    n = 30
    h = rng.uniform(0, 1, n)
    counts = torch.ones(20)
    runs = []
    for name, slope in (("A", 0.3), ("B", 0.5)):
        mask = _flat(slope * h + 0.03 * rng.normal(size=n))
        random = _flat(0.5 + 0.4 * h + 0.001 * rng.normal(size=n), method="random")
        tables = analyse(mask, random, counts, n_boot=100)
        claims = claims_of(mask, tables, counts, name, n_boot=100, random=random)
        runs.append(ModelRun(name, {}, mask, random, tables, claims, {}))
    table, controls, rows = agreement_claims(runs, n_boot=100)
    assert [r["id"] for r in rows] == ["2c", "2c.random", "2c.partial"]
    assert rows[0]["estimate"] == table["rho"].item() and rows[0]["model"] == "A vs B"
    line = controls.set_index("statistic")
    assert rows[2]["estimate"] == line.loc["partial", "rho"] and rows[1]["role"] == REFERENCE
    assert (controls["model_a"] == "A").all() and line.loc["partial", "n"] == n
    # the report's family: both models' judged rows and 2c's, adjusted together
    report = with_multiplicity(
        pd.concat([runs[0].claims, runs[1].claims, pd.DataFrame(rows)], ignore_index=True)
    )
    judged = report["role"] != REFERENCE
    assert report.loc[judged, "p_holm"].to_numpy() == pytest.approx(
        holm(report.loc[judged, "p_value"]), nan_ok=True
    )
    one_model = runs[0].claims.set_index("id")["p_holm"]
    in_report = report[report["model"] == "A"].set_index("id").loc["S1", "p_holm"]
    assert np.isfinite(one_model["S1"]) and in_report > one_model["S1"]  # a larger family
    with pytest.raises(ValueError, match="share 0 prompt"):
        other = _flat(h[:5])
        other.prompts = [f"q{i}" for i in range(5)]
        agreement_controls(runs[0].mask, runs[0].random, other, other)
