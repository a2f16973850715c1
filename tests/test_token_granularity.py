"""Token granularity through the stack: ``trace(granularity="token")`` (every head and MLP at
every position is a unit), ``TokenTraceResult`` (saved, loaded, joined), ``trace_dataset``
runs of token shards and the command line."""

from __future__ import annotations

import itertools
import json
import shutil

import pytest
import torch
from conftest import make_tiny
from run_helpers import (
    assert_refused,
    cli_trace_args,
    count_chunks,
    write_prompt_file,
)

import strace_lens as sl
from strace_lens import trace
from strace_lens.ablation import MeanAblation, ZeroAblation
from strace_lens.edges import TokenGraph, run_with_token_mask
from strace_lens.graph import NodeGraph
from strace_lens.hygiene import model_untouched
from strace_lens.inputs import tokenize
from strace_lens.masked_forward import forward_logprobs, run_with_mask
from strace_lens.search.objective import SubgraphObjective
from strace_lens.sizes import default_sizes
from strace_lens.tiny_model import tiny_model
from strace_lens.token_trace import TokenObjective, TokenTraceResult

#: byte-tokenised prompts (BOS + one token per byte: 12, 9, 8 and 8 tokens), and two of one
#: length
PROMPTS = ["The cat sat", "Paris is", "one two", "She ran"]
SAME_LENGTH = ["one two", "cat dog"]
#: quick options of the learned search
QUICK = dict(steps=3, finetune_steps=2)
#: dataset runs: random draws (no search to wait for; the run machinery is the same)
RUN = dict(method="random", draws=2)


@pytest.fixture(scope="module")
def model():
    """The native:tiny model (3 layers x 4 heads, byte tokenizer)."""
    return tiny_model(device="cpu")


@pytest.fixture(scope="module")
def small():
    """2 layers x 2 heads: 6 components, 18 units on a 3-token prompt, small enough to
    search every subset of a few units."""
    return make_tiny(n_layers=2, n_heads=2)


def hand_kl(logp_full: torch.Tensor, logp_sub: torch.Tensor) -> torch.Tensor:
    p = logp_full.exp()
    return (p * (logp_full - logp_sub)).sum(-1)


def hand_tv(logp_full: torch.Tensor, logp_sub: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logp_full.exp() - logp_sub.exp()).abs().sum(-1)


def prompt_row(model, prompt):
    return tokenize(model, [prompt])


# -- sizes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("nested", [True, False])
def test_every_subgraph_has_exactly_its_size(model, nested):
    result = trace(
        model,
        PROMPTS[:2],
        granularity="token",
        sizes=[0.01, 0.05, 0.2, 1.0],
        ablation="zero",
        nested=nested,
        **QUICK,
    )
    per_node = len(NodeGraph.from_model(model))
    lengths = [len(p.encode()) + 1 for p in PROMPTS[:2]]  # BOS + one token per byte
    assert result.n_pos.tolist() == lengths
    for p, n_pos in enumerate(lengths):
        n_units = per_node * n_pos
        assert result.n_units(p) == n_units == len(TokenGraph(3, 4, n_pos))
        expected = [max(1, round(s * n_units)) for s in (0.01, 0.05, 0.2, 1.0)]
        assert result.counts[p].tolist() == expected
        masks = result.masks(p)
        assert masks.shape == (4, per_node, n_pos)
        assert masks.flatten(1).sum(-1).tolist() == expected
        for j in range(4):
            assert len(result.subgraph(p, j).unique()) == expected[j]
    assert result.relative_sizes()[:, -1].tolist() == [1.0, 1.0]


def test_int_sizes_are_counts_for_every_prompt_and_the_default_grid(model):
    result = trace(
        model, PROMPTS, granularity="token", sizes=[1, 7, 30], method="random", inverse=False
    )
    assert result.counts.tolist() == [[1, 7, 30]] * len(PROMPTS)
    for p in range(len(PROMPTS)):
        assert result.masks(p).flatten(1).sum(-1).tolist() == [1, 7, 30]
    # the default: the node grid's counts over the shortest prompt, as relative sizes
    default = trace(model, PROMPTS, granularity="token", method="random", draws=1, inverse=False)
    n_min = 15 * min(len(p.encode()) + 1 for p in PROMPTS)
    assert default.grid == pytest.approx([c / n_min for c in default_sizes(n_min).tolist()])
    shortest = int(torch.argmin(default.n_pos))
    assert torch.equal(default.counts[shortest], default_sizes(n_min))
    with pytest.raises(ValueError, match=r"must fit the shortest prompt \(120 pairs\)"):
        trace(model, PROMPTS, granularity="token", sizes=[1, 121])
    with pytest.raises(ValueError, match="Sizes repeat"):
        trace(model, PROMPTS, granularity="token", sizes=[0.1, 0.1])


# -- nesting, seeds, hard-mask metrics ----------------------------------------------------------
def test_nested_by_default_and_reproducible(model):
    a = trace(model, PROMPTS[2:], granularity="token", sizes=[2, 5, 12, 40], **QUICK)
    assert a.nested and a.options["nested"] is True
    for p in range(2):
        m = a.masks(p).flatten(1)
        assert bool((m[:-1] & ~m[1:]).sum() == 0)
    b = trace(model, PROMPTS[2:], granularity="token", sizes=[2, 5, 12, 40], **QUICK)
    assert a.equals(b)
    config = a.config
    assert config.granularity == "token" and config.nested and config.method == "mask"
    assert config.options.search.steps == 3


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_hard_mask_metrics_equal_an_independent_token_masked_run(model, ablation):
    result = trace(
        model, PROMPTS[1:], granularity="token", sizes=[0.02, 0.1, 0.4], ablation=ablation, **QUICK
    )
    abl = (
        ZeroAblation()
        if ablation == "zero"
        else MeanAblation.from_prompts(model, PROMPTS[1:], progress=False)
    )
    for p, prompt in enumerate(PROMPTS[1:]):
        row = prompt_row(model, prompt)
        with torch.no_grad(), model_untouched(model):
            full = forward_logprobs(model, row, [])
            sub = run_with_token_mask(model, row, result.masks(p).float(), abl)
            inverse = run_with_token_mask(model, row, (~result.masks(p)).float(), abl)
        torch.testing.assert_close(result.metrics["kl"][p], hand_kl(full, sub), atol=2e-5, rtol=0)
        torch.testing.assert_close(result.metrics["tv"][p], hand_tv(full, sub), atol=2e-5, rtol=0)
        torch.testing.assert_close(
            result.metrics["inv_kl"][p], hand_kl(full, inverse), atol=2e-5, rtol=0
        )
        top1 = (sub.argmax(-1) == full.argmax(-1)).float()
        assert torch.equal(result.metrics["top1"][p], top1)
        assert torch.equal(result.full_top_tokens[p], full[0].topk(5).indices)


def test_encoding_stores_each_family_exactly():
    nested = torch.zeros(3, 10, dtype=torch.bool)
    nested[0, [7]] = True
    nested[1, [7, 2, 9]] = True
    nested[2, [7, 2, 9, 0, 4]] = True
    loose = torch.zeros(3, 6, dtype=torch.bool)
    loose[0, [5]] = True
    loose[1, [1, 2]] = True  # not a superset of the first
    loose[2, [0, 1, 3]] = True
    for family in ([nested, nested.roll(1, -1)], [nested, loose]):
        is_nested, ids, offsets = TokenTraceResult.encode(family)
        assert is_nested == (family[1] is not loose)
        if is_nested:  # one list per prompt, in entry order
            assert ids[: offsets[1]].tolist()[:1] == [7] and int(offsets[1]) == 5
        counts = torch.stack([m.sum(-1) for m in family])
        n_pos = torch.tensor([m.shape[1] // 2 for m in family])  # 1 layer x (1 head + MLP)
        result = TokenTraceResult(
            n_layers=1, n_heads=1, grid=(1, 3, 5), n_pos=n_pos, counts=counts,
            nested=is_nested, ids=ids, offsets=offsets, metrics={}, entropy=torch.zeros(2),
            top_tokens=torch.zeros(2, 3, 5, dtype=torch.long),
            full_top_tokens=torch.zeros(2, 5, dtype=torch.long), prompts=["a", "b"],
        )  # fmt: skip
        for p, m in enumerate(family):
            assert torch.equal(result.masks(p).flatten(1), m)


def test_a_token_mask_constant_over_positions_is_the_node_mask(model):
    graph = NodeGraph.from_model(model)
    gen = torch.Generator().manual_seed(3)
    node_masks = torch.rand(6, len(graph), generator=gen) > 0.5
    batch = tokenize(model, SAME_LENGTH)
    n_pos = int(batch.tokens.shape[1])
    token_masks = node_masks[:, :, None].expand(-1, -1, n_pos)
    abl = MeanAblation.from_prompts(model, SAME_LENGTH, progress=False)
    with torch.no_grad(), model_untouched(model):
        logp_full = forward_logprobs(model, batch, [])
        cand = torch.ones(len(graph), dtype=torch.bool)
        node = SubgraphObjective(model, graph, batch, logp_full, abl, cand)
        token = TokenObjective(
            model,
            graph,
            batch,
            logp_full,
            abl,
            torch.ones(len(graph) * n_pos, dtype=torch.bool),
            n_pos=n_pos,
        )
        prompts = torch.tensor([0, 1, 0, 1, 0, 1])
        kl_node = node.kl(node_masks.float(), prompts)
        kl_token = token.kl(token_masks.reshape(6, -1).float(), prompts)
        direct_node = run_with_mask(model, "one two", node_masks[0].float(), abl)
        direct_token = run_with_token_mask(model, batch.select([0]), token_masks[:1].float(), abl)
    torch.testing.assert_close(kl_token, kl_node, atol=1e-6, rtol=0)
    torch.testing.assert_close(direct_token, direct_node, atol=1e-5, rtol=0)
    assert float(kl_node.max()) > 1e-3  # the masks do change the output


# -- search quality ---------------------------------------------------------------------------
@pytest.mark.slow  # about 20 s on a quiet machine
def test_learned_masks_beat_random_ones(model):
    sizes = [0.01, 0.03, 0.1, 0.3]
    learned = trace(model, PROMPTS[1:], granularity="token", sizes=sizes, ablation="zero", **QUICK)
    random = trace(
        model,
        PROMPTS[1:],
        granularity="token",
        sizes=sizes,
        ablation="zero",
        method="random",
        draws=8,
        inverse=False,
    )
    mean_learned = learned.metrics["kl"].mean(0)
    mean_random = random.metrics["kl"].mean(0)
    assert bool((mean_learned <= mean_random).all()), (mean_learned, mean_random)
    assert float(mean_learned[1]) < 0.5 * float(mean_random[1])


def brute_force_optimum(model, tokens, size):
    """The lowest KL over every set of ``size`` units (zero ablation), by a plain loop over
    explicit subsets, run through ``run_with_token_mask``."""
    row = tokenize(model, tokens)
    graph = TokenGraph.from_model(model, int(tokens.shape[1]))
    subsets = list(itertools.combinations(range(len(graph)), size))
    masks = torch.zeros(len(subsets), len(graph))
    for i, subset in enumerate(subsets):
        masks[i, list(subset)] = 1.0
    with torch.no_grad(), model_untouched(model):
        full = forward_logprobs(model, row, [])
        kls = []
        for lo in range(0, len(masks), 256):
            chunk = masks[lo : lo + 256].reshape(-1, len(graph.node_graph), graph.n_pos)
            kls.append(hand_kl(full, run_with_token_mask(model, row, chunk)))
    return float(torch.cat(kls).min())


#: learned independent masks within 5 % (relative) of the exhaustive optimum, plus 1e-6
#: absolute (float32); checked below on 3 prompts x sizes 1, 2, 3
OPTIMUM_TOLERANCE = 0.05


def test_learned_and_exhaustive_masks_reach_the_exhaustive_optimum(small):
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, 50, (3, 3), generator=gen)
    sizes = [1, 2, 3]
    learned = trace(small, tokens, granularity="token", sizes=sizes, ablation="zero", nested=False)
    exhaustive = trace(
        small, tokens, granularity="token", sizes=sizes, ablation="zero", method="exhaustive"
    )
    nested = trace(small, tokens, granularity="token", sizes=sizes, ablation="zero")
    for p in range(3):
        for j, s in enumerate(sizes):
            best = brute_force_optimum(small, tokens[p : p + 1], s)
            # float32 forwards in other batches: equal to 1e-6
            assert float(exhaustive.metrics["kl"][p, j]) == pytest.approx(best, abs=1e-6)
            limit = best * (1 + OPTIMUM_TOLERANCE) + 1e-6
            assert float(learned.metrics["kl"][p, j]) <= limit, (p, s, best)
            assert float(nested.metrics["kl"][p, j]) >= best - 1e-6


# -- per="dataset" --------------------------------------------------------------------------------
def test_per_dataset_needs_one_prompt_length(model):
    with pytest.raises(ValueError, match=r"needs prompts of one token length.*\[9, 12\]"):
        trace(model, PROMPTS[:2], granularity="token", per="dataset")
    shared = trace(model, SAME_LENGTH, granularity="token", per="dataset", sizes=[3, 20], **QUICK)
    assert shared.per == "dataset"
    assert torch.equal(shared.masks(0), shared.masks(1))
    assert shared.masks(0).flatten(1).sum(-1).tolist() == [3, 20]


def test_what_does_not_apply_at_token_granularity_is_refused(model):
    with pytest.raises(ValueError, match=r"keep=\.\.\. does not apply at granularity='token'"):
        trace(model, PROMPTS[0], granularity="token", keep=["m0"])
    with pytest.raises(ValueError, match=r"candidates=\.\.\. does not apply"):
        trace(model, PROMPTS[0], granularity="token", candidates=["m0"])
    with pytest.raises(ValueError, match=r"targets .* are not recorded at granularity='token'"):
        trace(model, PROMPTS[0], granularity="token", targets=["x"])
    with pytest.raises(ValueError, match="does not support granularity='token'"):
        trace(model, PROMPTS[0], granularity="token", method="greedy")
    with pytest.raises(TypeError, match="Unknown option"):
        trace(model, PROMPTS[0], granularity="token", draws=3)


def test_node_projection_and_names(model):
    result = trace(model, PROMPTS[:2], granularity="token", sizes=[4, 30], method="random")
    for p in range(2):
        dense = result.masks(p)
        names = result.unit_names(p, 0)
        graph = result.graph(p)
        assert len(names) == 4
        assert torch.equal(graph.mask_from_names(names).bool(), dense[0])
        assert torch.equal(result.node_masks(p), dense.any(-1))
        node_names = NodeGraph.from_model(model).names
        used = sorted({n.split("@")[0] for n in result.unit_names(p, 1)}, key=node_names.index)
        assert result.components(p, 1) == used


# -- saving and joining ---------------------------------------------------------------------------
def test_save_load_round_trip(model, tmp_path):
    nested = trace(model, PROMPTS[1:], granularity="token", sizes=[0.05, 0.5], **QUICK)
    independent = trace(model, PROMPTS[1:], granularity="token", sizes=[0.05, 0.5], method="random")
    for name, result in (("n", nested), ("r", independent)):
        result.save(tmp_path / name)
        assert {p.name for p in (tmp_path / name).iterdir()} == {
            "token.json",
            "token.safetensors",
        }
        back = sl.load(tmp_path / name)
        assert isinstance(back, TokenTraceResult) and back.equals(result)
        assert back.grid == result.grid and back.nested == result.nested
        for p in range(3):
            assert torch.equal(back.masks(p), result.masks(p))
    assert not independent.nested  # random draws are stored as one id list per size
    tensors = tmp_path / "n" / "token.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-3])
    with pytest.raises(ValueError, match="does not match its checksum"):
        sl.load(tmp_path / "n")


def test_concat_equals_one_call(model):
    sizes = [0.05, 0.5]
    one = trace(model, PROMPTS, granularity="token", sizes=sizes, method="random", draws=1)
    parts = [
        trace(model, PROMPTS[i : i + 2], granularity="token", sizes=sizes, method="random", draws=1)
        for i in (0, 2)
    ]
    joined = TokenTraceResult.concat(parts)
    assert joined.prompts == PROMPTS and torch.equal(joined.counts, one.counts)
    for p in range(len(PROMPTS)):
        assert joined.masks(p).shape == one.masks(p).shape
    with pytest.raises(ValueError, match="only per-input results of one configuration"):
        TokenTraceResult.concat(
            [parts[0], trace(model, PROMPTS[:1], granularity="token", sizes=[0.1], method="random")]
        )


# -- dataset runs ---------------------------------------------------------------------------------
def token_run(model, out, **kwargs):
    from strace_lens.dataset import trace_dataset

    options = {"granularity": "token", "sizes": [0.05, 0.5], "chunk_size": 2, **RUN, **kwargs}
    return trace_dataset(model, PROMPTS, out, **options)


def test_token_run_equals_its_chunks_resumes_and_loads(model, tmp_path, monkeypatch):
    clean = token_run(model, tmp_path / "clean")
    assert isinstance(clean, TokenTraceResult) and clean.prompts == PROMPTS
    assert (tmp_path / "clean" / "shards" / "00000" / "token.json").is_file()
    # the mean is taken once over the whole run and shared by every chunk
    mean = MeanAblation.load(tmp_path / "clean" / "ablation.safetensors")
    chunks = [
        trace(
            model,
            PROMPTS[lo : lo + 2],
            granularity="token",
            sizes=[0.05, 0.5],
            ablation=mean,
            **RUN,
        )
        for lo in (0, 2)
    ]
    assert clean.equals(TokenTraceResult.concat(chunks))
    assert sl.load(tmp_path / "clean").equals(clean)
    manifest = json.loads((tmp_path / "clean" / "manifest.json").read_text())
    assert manifest["options"]["granularity"] == "token"
    assert manifest["options"]["method"] == "random" and manifest["options"]["draws"] == 2

    out = tmp_path / "run"
    calls = count_chunks(monkeypatch, fail_on=1)
    with pytest.raises(KeyboardInterrupt):
        token_run(model, out)
    assert calls == [2] and sorted(p.name for p in (out / "shards").iterdir()) == ["00000"]
    calls = count_chunks(monkeypatch)
    assert token_run(model, out).equals(clean)
    assert calls == [2]  # only the chunk the kill lost
    shutil.rmtree(out / "shards" / "00001")
    tensors = out / "shards" / "00000" / "token.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-5])
    calls.clear()
    assert token_run(model, out).equals(clean)
    assert calls == [2, 2]
    calls.clear()
    assert token_run(model, out).equals(clean) and calls == []


def test_token_run_refuses_a_changed_identity_and_bad_options_before_work(model, tmp_path):
    from strace_lens.dataset import RunMismatchError, trace_dataset

    out = tmp_path / "run"
    token_run(model, out, ablation="zero")
    with pytest.raises(RunMismatchError, match="option 'granularity' was 'token', now"):
        trace_dataset(model, PROMPTS, out, chunk_size=2, sizes=[0.05, 0.5], ablation="zero", **RUN)
    with pytest.raises(RunMismatchError, match="option 'nested' was True, now False"):
        token_run(model, out, ablation="zero", nested=False)
    token_run(model, out, ablation="zero", nested=True, batch_size=5)  # the same run
    fresh = tmp_path / "fresh"
    with pytest.raises(ValueError, match="needs prompts of one token length"):
        token_run(model, fresh, per="dataset")
    with pytest.raises(ValueError, match="must fit the shortest prompt"):
        token_run(model, fresh, sizes=[1, 10_000])
    with pytest.raises(ValueError, match="does not apply at granularity='token'"):
        token_run(model, fresh, keep=["m0"])
    assert not fresh.exists()


# -- the command line ------------------------------------------------------------------------------
def token_cli_args(prompts, out, *extra):
    return cli_trace_args(
        prompts,
        out,
        "--granularity",
        "token",
        "--sizes",
        "0.05",
        "0.5",
        "--chunk-size",
        "2",
        "--method",
        "random",
        "--ablation",
        "zero",
        *extra,
    )


@pytest.fixture
def prompt_file(tmp_path):
    return write_prompt_file(tmp_path, PROMPTS[:3])


def test_cli_traces_tokens_prints_the_table_and_resumes(prompt_file, tmp_path, capsys):
    from strace_lens.cli import main

    out = tmp_path / "run"
    assert main(token_cli_args(prompt_file, out)) == 0
    printed = capsys.readouterr().out
    result = sl.load(out)
    assert isinstance(result, TokenTraceResult) and result.prompts == PROMPTS[:3]
    lines = printed.strip().splitlines()
    assert lines[0] == (
        f"3 prompt(s), token granularity, method=random, per=input, nested=false; run folder: {out}"
    )
    assert lines[1].split() == [
        "relative",
        "mean",
        "units",
        "mean",
        "KL",
        "mean",
        "TV",
        "top-1",
        "%",
    ]
    for j, row in enumerate(line.split() for line in lines[2:4]):
        rel = float(result.relative_sizes()[:, j].mean())
        assert float(row[0]) == pytest.approx(rel, rel=1e-2)
        assert float(row[1]) == pytest.approx(float(result.counts[:, j].double().mean()), abs=0.05)
        assert float(row[3]) == pytest.approx(float(result.metrics["tv"][:, j].mean()), abs=1e-4)
        top1 = 100 * float(result.metrics["top1"][:, j].mean())
        assert float(row[4]) == pytest.approx(top1, abs=0.05)
    assert lines[-1] == f"HTML page: {out / 'report.html'}"
    page = (out / "report.html").read_text(encoding="utf-8")
    assert 'id="fig-token_fidelity"' in page and 'id="fig-token_units"' in page
    assert "strace-lens trace --model native:tiny" in page  # the command, as notes
    assert main(["merge", str(out)]) == 0
    assert capsys.readouterr().out == printed
    assert main(token_cli_args(prompt_file, out)) == 0  # finished: read back
    assert capsys.readouterr().out == printed


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--tokens", "hf"], "--tokens apply at --granularity edge only"),
        (["--ablate-attention-edges", "false"], "apply at --granularity edge only"),
        (["--method", "greedy"], "does not support --granularity token"),
        (["--option", "steps=3"], "Unknown option(s) for method='random'"),
    ],
)
def test_cli_token_bad_input_is_one_line_and_exit_2(prompt_file, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert_refused(capsys, token_cli_args(prompt_file, out, *extra), message, out)
