"""strace_lens.export: EAP-IG / MIB graph JSON, MIB submission folders and long tables.

Each format is written, read back with a reader written here from the format's description
(EAP-IG's Graph.to_json / MIB's circuit-track README), and compared with the result.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import strace_lens
from strace_lens.export import (
    MIB_PERCENTAGES,
    count_edges,
    save_table,
    to_eap_ig,
    to_mib,
    to_table,
)
from strace_lens.graph import NodeGraph
from strace_lens.result import TraceResult

EDGE = re.compile(r"(input|a\d+\.h\d+|m\d+)->(logits|a\d+\.h\d+|m\d+)(?:<([qkv])>)?")


# -- a reader from the format's description ----------------------------------------------------
def read_eap_ig(path: Path):
    """cfg, the kept heads/MLPs, and {(parent, child, qkv): (in_graph, score)}."""
    data = json.loads(path.read_text(encoding="utf-8"))
    assert {"cfg", "nodes", "edges"} <= set(data)
    cfg = data["cfg"]
    assert set(cfg) == {"n_layers", "n_heads", "parallel_attn_mlp", "d_model"}
    nodes = data["nodes"]
    assert nodes["input"]["in_graph"] is True and nodes["logits"]["in_graph"] is True
    kept = {name for name, node in nodes.items() if node["in_graph"]} - {"input", "logits"}
    edges = {}
    for name, edge in data["edges"].items():
        match = EDGE.fullmatch(name)
        assert match, name
        parent, child, qkv = match.groups()
        assert (qkv is not None) == child.startswith("a"), name  # only edges into heads have qkv
        assert isinstance(edge["in_graph"], bool) and isinstance(edge["score"], float)
        edges[(parent, child, qkv)] = (edge["in_graph"], edge["score"])
    return cfg, kept, edges


def position(name: str, n_heads: int, parallel: bool) -> tuple[float, float]:
    """(when the node reads the residual stream, when it writes to it)."""
    if name == "input":
        return (-1, -1)
    if name == "logits":
        return (float("inf"), float("inf"))
    if name.startswith("a"):
        layer = int(name[1:].split(".")[0])
        return (layer, layer + 0.25)
    layer = int(name[1:])
    return (layer if parallel else layer + 0.5, layer + 0.75)


def expected_edges(n_layers: int, n_heads: int, parallel: bool = False) -> set:
    """Every (parent, child, qkv) where the parent writes before the child reads."""
    names = ["input", "logits"]
    names += [f"a{l}.h{h}" for l in range(n_layers) for h in range(n_heads)]  # noqa: E741
    names += [f"m{l}" for l in range(n_layers)]  # noqa: E741
    out = set()
    for p in names:
        for c in names:
            if p == "logits" or c == "input" or p == c:
                continue
            if position(p, n_heads, parallel)[1] < position(c, n_heads, parallel)[0]:
                for qkv in "qkv" if c.startswith("a") else [None]:
                    out.add((p, c, qkv))
    return out


# -- results ---------------------------------------------------------------------------------
def nested_result(n_layers=3, n_heads=4, sizes=(1, 3, 6, 15), per="dataset", d_model=64, seed=0):
    """A per-dataset (or per-input) result whose subgraphs are the top-s of a random order."""
    graph = NodeGraph(n_layers, n_heads)
    n, n_p = len(graph), 3
    rows = 1 if per == "dataset" else n_p
    gen = torch.Generator().manual_seed(seed)
    masks = torch.zeros(rows, len(sizes), n, dtype=torch.bool)
    for r in range(rows):
        order = torch.randperm(n, generator=gen)
        for j, s in enumerate(sizes):
            masks[r, j, order[:s]] = True
    metrics = {name: torch.rand(n_p, len(sizes), generator=gen) for name in ("kl", "tv")}
    return TraceResult(
        graph=graph,
        sizes=torch.tensor(sizes),
        masks=masks,
        metrics=metrics,
        entropy=torch.rand(n_p, generator=gen),
        prompts=[f"prompt {i}" for i in range(n_p)],
        top_tokens=torch.zeros(n_p, len(sizes), 5, dtype=torch.long),
        full_top_tokens=torch.zeros(n_p, 5, dtype=torch.long),
        candidates=torch.ones(n, dtype=torch.bool),
        options={
            "method": "mask",
            "per": per,
            "model": {
                "name": "synthetic",
                "n_layers": n_layers,
                "n_heads": n_heads,
                "d_model": d_model,
            },
        },
    )


# -- EAP-IG ------------------------------------------------------------------------------------
def test_edge_enumeration_follows_the_residual_order():
    for n_layers, n_heads in [(1, 1), (3, 4), (6, 4)]:
        for parallel in (False, True):
            got = strace_lens.export.eap_ig_edges(n_layers, n_heads, parallel)
            assert len(got) == len(set(got)) == count_edges(n_layers, n_heads, parallel)
            assert set(got) == expected_edges(n_layers, n_heads, parallel)
    # GPT-2 small: MIB's 0.1 % budget is 32 edges
    assert count_edges(12, 12) == 32491


@pytest.mark.parametrize("size", [1, 3, 6, 15])
def test_eap_ig_json_names_exactly_the_kept_nodes(tmp_path, size):
    result = nested_result()
    path = to_eap_ig(result, tmp_path / "graph.json", size=size)
    cfg, kept, edges = read_eap_ig(path)
    assert cfg == {"n_layers": 3, "n_heads": 4, "parallel_attn_mlp": False, "d_model": 64}
    assert kept == set(result.nodes(size=size)) and len(kept) == size
    assert set(edges) == expected_edges(3, 4)
    ends_in = kept | {"input", "logits"}
    for (parent, child, _), (in_graph, _) in edges.items():
        assert in_graph == (parent in ends_in and child in ends_in)
    meta = json.loads(path.read_text())["strace_lens"]
    assert meta["size"] == size and meta["per"] == "dataset"
    assert meta["edges_in_graph"] == sum(flag for flag, _ in edges.values())


def test_eap_ig_scores_rank_the_traced_circuits_first(tmp_path):
    """Keeping the edges that score at least a circuit's lowest edge gives that circuit."""
    result = nested_result(n_layers=4, n_heads=3, sizes=(1, 2, 5, 9, 16))
    for size in result.sizes.tolist():
        _, _, edges = read_eap_ig(to_eap_ig(result, tmp_path / f"{size}.json", size=size))
        threshold = min(score for flag, score in edges.values() if flag)
        assert all((score >= threshold) == flag for flag, score in edges.values())


def test_eap_ig_per_input_needs_a_prompt_and_size_needs_naming(tmp_path):
    result = nested_result(per="input")
    with pytest.raises(ValueError, match="prompt=i"):
        to_eap_ig(result, tmp_path / "g.json", size=3)
    with pytest.raises(ValueError, match="sizes"):
        to_eap_ig(nested_result(), tmp_path / "g.json")
    with pytest.raises(KeyError, match="not in this result"):
        to_eap_ig(nested_result(), tmp_path / "g.json", size=4)
    _, kept, _ = read_eap_ig(to_eap_ig(result, tmp_path / "g.json", size=3, prompt=2))
    assert kept == set(result.nodes(prompt=2, size=3))


def test_eap_ig_parallel_models_and_missing_d_model(tmp_path):
    result = nested_result()
    path = to_eap_ig(result, tmp_path / "p.json", size=6, parallel_attn_mlp=True)
    cfg, _, edges = read_eap_ig(path)
    assert cfg["parallel_attn_mlp"] is True and set(edges) == expected_edges(3, 4, True)
    result.options["model"] = {}
    with pytest.raises(ValueError, match="d_model"):
        to_eap_ig(result, tmp_path / "q.json", size=6)
    assert read_eap_ig(to_eap_ig(result, tmp_path / "q.json", size=6, d_model=8))[0]["d_model"] == 8


def test_a_real_per_dataset_trace_exports(tiny, tiny_tokens, tmp_path):
    result = strace_lens.trace(
        tiny, tiny_tokens, sizes=[1, 3, 15], per="dataset", steps=3, progress=False
    )
    assert result.per == "dataset"
    for size in (1, 3, 15):
        cfg, kept, _ = read_eap_ig(to_eap_ig(result, tmp_path / f"{size}.json", size=size))
        assert kept == set(result.nodes(size=size))
        assert cfg["d_model"] == tiny.cfg.d_model


# -- MIB ---------------------------------------------------------------------------------------
def test_mib_folder_holds_one_circuit_per_budget_within_it(tmp_path):
    # interpbench's shape (6 x 4), a grid from one node to all 30
    result = nested_result(n_layers=6, n_heads=4, sizes=(1, 2, 4, 8, 16, 30))
    summary = to_mib(result, tmp_path / "sub", task="arithmetic_addition", model="interpbench")
    folder = tmp_path / "sub" / "arithmetic-addition_interpbench"
    assert summary["folder"] == folder
    files = sorted(p.name for p in folder.iterdir())
    assert files == sorted(f"circuit_{p:g}.json" for p in MIB_PERCENTAGES) and len(files) == 9
    total = count_edges(6, 4)
    assert summary["n_edges"] == total
    # the expansion of every traced size, counted from the files to_eap_ig writes
    counts = {}
    for size in result.sizes.tolist():
        _, kept, edges = read_eap_ig(to_eap_ig(result, tmp_path / f"{size}.json", size=size))
        counts[size] = (kept, sum(flag for flag, _ in edges.values()))
    for percent, circuit in zip(MIB_PERCENTAGES, summary["circuits"], strict=True):
        cfg, kept, edges = read_eap_ig(folder / f"circuit_{percent:g}.json")
        assert cfg == {"n_layers": 6, "n_heads": 4, "parallel_attn_mlp": False, "d_model": 64}
        n_in = sum(flag for flag, _ in edges.values())
        budget = int(percent / 100 * total)
        fitting = [s for s, (_, n) in counts.items() if n <= budget]
        if fitting:
            assert kept == counts[max(fitting)][0] and circuit["size"] == max(fitting)
            assert n_in <= budget
        else:  # nothing traced is small enough: the empty circuit
            assert kept == set() and circuit["size"] is None and n_in == 1
        assert circuit["edges"] == n_in and set(circuit["nodes"]) == kept


def test_mib_refuses_unknown_tasks_models_and_the_wrong_model(tmp_path):
    result = nested_result()
    with pytest.raises(ValueError, match="Unknown MIB task"):
        to_mib(result, tmp_path, task="sst2", model="gpt2")
    with pytest.raises(ValueError, match="Unknown MIB model"):
        to_mib(result, tmp_path, task="ioi", model="gpt3")
    with pytest.raises(ValueError, match="12 layers x 12 heads"):
        to_mib(result, tmp_path, task="ioi", model="gpt2")
    summary = to_mib(result, tmp_path, task="arc-easy", model="gpt2", check_model=False)
    assert summary["folder"].name == "arc-easy_gpt2"


# -- tables ------------------------------------------------------------------------------------
def check_table(frame, result):
    n_p, n_s, n_n = result.n_prompts, len(result.sizes), len(result.graph)
    assert len(frame) == n_p * n_s * n_n
    assert list(frame.columns[:10]) == list(strace_lens.export.TABLE_COLUMNS)
    for (p, size), group in frame.groupby(["prompt", "size"]):
        kept = set(group.loc[group["in_subgraph"].astype(bool), "node"].astype(str))
        assert kept == set(result.nodes(prompt=int(p), size=int(size)))
        j = result.size_index(int(size))
        assert group["kl"].iloc[0] == pytest.approx(float(result.metrics["kl"][int(p), j]))
    row = frame.iloc[n_n - 1]  # prompt 0, first size, the last node (the last MLP)
    assert row["node"] == f"m{result.graph.n_layers - 1}" and row["kind"] == "mlp"
    assert pd.isna(row["head"]) and frame.iloc[0]["head"] == 0


def test_table_has_one_row_per_prompt_size_node():
    for per in ("dataset", "input"):
        result = nested_result(per=per)
        check_table(to_table(result), result)


@pytest.mark.parametrize("suffix", [".parquet", ".arrow"])
def test_table_round_trips_through_parquet_and_arrow(tmp_path, suffix):
    pytest.importorskip("pyarrow")
    result = nested_result(per="input")
    path = save_table(result, tmp_path / f"t{suffix}")
    assert path.suffix == suffix
    back = pd.read_parquet(path) if suffix == ".parquet" else pd.read_feather(path)
    pd.testing.assert_frame_equal(back, to_table(result))
    check_table(back, result)


def test_table_without_pyarrow_is_csv_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` now fails
    result = nested_result()
    with pytest.warns(UserWarning, match="pyarrow is not installed"):
        path = save_table(result, tmp_path / "t.parquet")
    assert path == tmp_path / "t.csv" and not (tmp_path / "t.parquet").exists()
    monkeypatch.undo()  # pandas 3 itself reads strings through pyarrow when it is there
    back = pd.read_csv(path, dtype={"head": "Int64"})
    want = to_table(result)
    assert back["node"].tolist() == want["node"].astype(str).tolist()
    assert back["head"].equals(want["head"])
    for column in ("prompt", "size", "layer", "in_subgraph", "candidate"):
        assert back[column].tolist() == want[column].tolist()
    for column in ("relative_size", "entry_size", "kl", "tv"):
        pd.testing.assert_series_equal(back[column], want[column], check_exact=False)
    check_table(back, result)
    with pytest.raises(ValueError, match="Unknown table format"):
        save_table(result, tmp_path / "t.xlsx")
