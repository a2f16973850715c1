"""Figures: contents checked against the analyses, rendered to PNG / SVG / PDF / HTML.

Synthetic results (tests/plot_synthetic.py) have planted structure; the last tests trace the
tiny native model for real and draw every figure from those results.
"""

from __future__ import annotations

import dataclasses
import math
import re
import struct

import numpy as np
import pytest
import torch
from plot_synthetic import synthetic_result

import strace_lens.plot as sp
from strace_lens.analysis import (
    composition,
    density,
    gini_by_size,
    nucleus_recovery,
    split_core,
    split_refinement,
    uncertainty,
)
from strace_lens.plot.circuit import MLP_GAP
from strace_lens.plot.export import PX_PER_INCH


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for every export of this module."""
    with sp.export_session():
        yield


@pytest.fixture(scope="module")
def per_input():
    return synthetic_result(3, 4, n_prompts=8, model="synth")


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def svg_texts(data: bytes) -> list[str]:
    return re.findall(r">([^<>]+)</text>", data.decode("utf-8"))


def nodes_of(fig, phase: str) -> set[str]:
    return {n for t in fig.data if (t.meta or {}).get("phase") == phase for n in t.customdata}


def all_node_names(fig) -> list[str]:
    return [n for t in fig.data if (t.meta or {}).get("phase") for n in t.customdata]


def test_static_export_without_a_browser_says_how_to_get_one(tmp_path, monkeypatch, per_input):
    import kaleido

    # Runs before any test opens the module's shared browser (tests run in file order).
    assert not kaleido._global_server.is_running()
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-chrome"))
    monkeypatch.setattr(
        "choreographer.browsers.chromium.Chromium.find_browser", staticmethod(lambda *a, **k: None)
    )
    with pytest.raises(RuntimeError, match="apt-get install -y chromium"):
        sp.save(sp.fidelity(per_input), tmp_path / "x.png")
    assert not list(tmp_path.iterdir())


# -- circuit ---------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", [0, 3])
def test_circuit_draws_every_node_once_and_splits_like_split_core(per_input, prompt):
    r = per_input
    fig = sp.circuit(r, prompt=prompt)
    names = all_node_names(fig)
    assert sorted(names) == sorted(r.graph.names)  # every node, exactly once
    size = sp.default_size(r, prompt)
    assert fig.layout.meta["size"] == size
    shown = r.masks[prompt, r.size_index(size)]
    _, core_mask = split_core(r)
    core = set(r.graph.nodes_from_mask(core_mask[prompt] & shown))
    assert core and nodes_of(fig, "core") == core
    assert nodes_of(fig, "ablated") == set(r.graph.nodes_from_mask(~shown))
    # at a larger size, the nodes beyond the core are the refinement
    big = int(r.sizes.max())
    fig = sp.circuit(r, prompt=prompt, size=big)
    _, refined_mask, _ = split_refinement(r)
    assert nodes_of(fig, "refinement") == set(
        r.graph.nodes_from_mask(r.masks[prompt, -1] & ~core_mask[prompt])
    )
    assert nodes_of(fig, "refinement") >= set(r.graph.nodes_from_mask(refined_mask[prompt]))


def _with_nucleus(r, nucleus_row):
    """``r`` whose prompt 0 has the given shared nucleus (%) at each grid size."""
    metrics = dict(r.metrics)
    metrics["nucleus"] = metrics["nucleus"].clone()
    metrics["nucleus"][0] = torch.tensor(nucleus_row, dtype=torch.float32)
    return dataclasses.replace(r, metrics=metrics)


def test_default_size_is_the_early_core_within_half_the_nodes(per_input):
    sizes = per_input.sizes.tolist()  # 15 nodes: [1, 2, 3, 4, 6, 8, 11, 15] or similar
    n = per_input.n_candidates
    cap = [s for s in sizes if s <= n / 2][-1]
    small = [s for s in sizes if s <= n / 2]
    assert len(small) >= 3 and sizes[-1] == n
    # the core (the first size whose top-1 agrees: nucleus >= 1 %) within half the nodes
    row = [0.0] * len(sizes)
    j = sizes.index(small[1])
    row[j:] = [50.0] * (len(sizes) - j)
    r = _with_nucleus(per_input, row)
    assert sp.default_size(r, 0) == small[1]
    fig = sp.circuit(r, prompt=0)
    assert fig.layout.meta["size"] == small[1]
    assert "default size: the early core" in fig.layout.title.subtitle.text
    # the core only at the full model: the largest traced size within half the nodes
    r = _with_nucleus(per_input, [0.0] * (len(sizes) - 1) + [100.0])
    assert sp.default_size(r, 0) == cap
    subtitle = sp.circuit(r, prompt=0).layout.title.subtitle.text
    assert f"the largest traced s ≤ 50% of the nodes (the core needs s = {n})" in subtitle
    # no core at all on the grid: the same cap, said so
    r = _with_nucleus(per_input, [0.0] * len(sizes))
    assert sp.default_size(r, 0) == cap
    assert "no core on the grid" in sp.circuit(r, prompt=0).layout.title.subtitle.text
    # a size that is asked for is drawn as asked, with no rule in the subtitle
    fig = sp.circuit(r, prompt=0, size=n)
    assert fig.layout.meta["size"] == n and "default size" not in fig.layout.title.subtitle.text


def test_fidelity_heading_names_only_what_the_figure_draws(per_input):
    rnd = synthetic_result(3, 4, n_prompts=8, method="random", shuffle=True)
    assert sp.fidelity_heading(per_input) == "Fidelity versus subgraph size, with inverse subgraphs"
    both = sp.fidelity_heading({"mask": per_input, "random": rnd})
    assert both == "Fidelity versus subgraph size, with the random baseline and inverse subgraphs"
    legend = {t.name for t in sp.fidelity({"mask": per_input, "random": rnd}).data if t.name}
    assert any("random" in name for name in legend)
    assert not any(
        "random" in name for name in {t.name for t in sp.fidelity(per_input).data if t.name}
    )


def test_circuit_coordinates_layer_on_x_head_on_y_mlp_above(per_input):
    fig = sp.circuit(per_input, size=int(per_input.sizes.max()))
    pos = {
        n: (x, y)
        for t in fig.data
        if t.customdata is not None
        for n, x, y in zip(t.customdata, t.x, t.y)
    }
    assert pos["a2.h3"] == (2, 3)
    assert pos["a0.h0"] == (0, 0)
    assert pos["m1"] == (1, per_input.graph.n_heads + MLP_GAP)
    symbols = {
        n: s
        for t in fig.data
        if t.customdata is not None
        for n, s in zip(t.customdata, t.marker.symbol)
    }
    assert symbols["m1"].startswith("square") and symbols["a1.h0"].startswith("circle")


def test_circuit_marker_grows_with_earlier_entry(per_input):
    r = per_input
    fig = sp.circuit(r, prompt=2, size=int(r.sizes.max()))
    entry = r.entry_sizes()[2]
    size_of = {
        n: s
        for t in fig.data
        if t.customdata is not None
        for n, s in zip(t.customdata, t.marker.size)
    }
    first = r.graph.names[int(torch.argmin(entry))]
    last = r.graph.names[int(torch.argmax(entry))]
    assert size_of[first] > size_of[last]


def test_circuit_hover_states_entry_size_and_fidelity_there(per_input):
    r = per_input
    fig = sp.circuit(r, prompt=1, size=int(r.sizes.max()))
    entry = r.entry_sizes()[1]
    i = int(torch.argmin(entry))
    name = r.graph.names[i]
    text = next(
        tx
        for t in fig.data
        if t.customdata is not None
        for n, tx in zip(t.customdata, t.text)
        if n == name
    )
    j = r.size_index(int(entry[i]))
    assert f"s = {int(entry[i])} " in text
    assert f"KL {float(r.metrics['kl'][1, j]):.3g} nats" in text
    assert f"TV {float(r.metrics['tv'][1, j]):.3g}" in text


def test_circuit_per_dataset_and_bad_arguments():
    r = synthetic_result(4, 3, n_prompts=6, per="dataset")
    fig = sp.circuit(r)
    assert len(all_node_names(fig)) == len(r.graph)
    assert "shared by 6 prompts" in fig.layout.title.text
    biggest = int(r.sizes.max())
    with pytest.warns(UserWarning, match=f"nearest traced size, {biggest}"):
        off_grid = sp.circuit(r, size=biggest + 1)
    assert f"s = {biggest} of" in off_grid.layout.title.text
    assert f"nearest traced to the asked {biggest + 1}" in off_grid.layout.title.subtitle.text
    with pytest.raises(ValueError, match="at least 1"):
        sp.circuit(r, size=0)
    with pytest.raises(IndexError, match="outside"):
        sp.circuit(r, prompt=6)


def _cell_px(fig):
    m = fig.layout.margin
    plot_w = fig.layout.width - m.l - m.r
    plot_h = fig.layout.height - m.t - m.b
    x_range = fig.layout.xaxis.range
    y_range = fig.layout.yaxis.range
    return plot_w / (x_range[1] - x_range[0]), plot_h / (y_range[1] - y_range[0])


@pytest.mark.parametrize("preset", [None, "column", "page"])
def test_circuit_30_layers_9_heads_stays_readable(preset):
    r = synthetic_result(30, 9, n_prompts=3, per="dataset", model="synthetic-30x9")
    fig = sp.circuit(r)
    if preset:
        fig = sp.apply_preset(fig, preset)
        assert fig.layout.width == round(sp.PRESETS[preset]["width_in"] * PX_PER_INCH)
    assert len(all_node_names(fig)) == 300
    dx, dy = _cell_px(fig)
    biggest = max(max(t.marker.size) for t in fig.data if t.customdata is not None)
    assert biggest < min(dx, dy), "nodes of neighbouring layers / heads would overlap"
    assert min(min(t.marker.size) for t in fig.data if t.customdata is not None) >= 2
    font = fig.layout.font.size or fig.layout.template.layout.font.size
    assert fig.layout.xaxis.dtick * dx >= 1.8 * font, "layer tick labels would collide"
    ticks = fig.layout.yaxis.tickvals
    assert min(np.diff(ticks)) * dy >= 1.2 * font, "head tick labels would collide"


# -- curves ----------------------------------------------------------------------------------
def test_fidelity_lines_axes_and_bands(per_input):
    rnd = synthetic_result(3, 4, n_prompts=8, method="random", shuffle=True, model="synth")
    fig = sp.fidelity([per_input, rnd])
    lines = {t.name: t for t in fig.data if t.mode == "lines" and t.showlegend is not False}
    assert set(lines) == {"synth · mask", "synth · mask · inverse", "synth · random"}
    assert lines["synth · random"].line.dash == "dash"
    assert lines["synth · mask · inverse"].line.dash == "dot"
    assert fig.layout.xaxis.type == "log"
    assert "TV" in fig.layout.yaxis.title.text and "relative size" in fig.layout.xaxis.title.text
    # The mean curve ends at the traced points: at the largest size, the mean TV over prompts.
    largest = int(torch.argmax(per_input.sizes))
    assert lines["synth · mask"].y[-1] == pytest.approx(
        float(per_input.metrics["tv"][:, largest].double().mean()), abs=1e-6
    )
    # The construction band ends at the median core size of split_core.
    core_size, _ = split_core(per_input)
    edge = float(np.median(core_size.numpy())) / per_input.n_candidates
    band = [s for s in fig.layout.shapes if s.type == "rect"]
    assert len(band) == 2
    assert band[0].x1 == pytest.approx(edge) and band[1].x0 == pytest.approx(edge)
    paper = sp.fidelity(per_input, bands="paper", inverse=False)
    rects = [s for s in paper.layout.shapes if s.type == "rect"]
    assert rects[0].x0 == pytest.approx(1e-4) and rects[0].x1 == pytest.approx(1e-2)
    assert all("inverse" not in (t.name or "") for t in paper.data)
    assert not [s for s in sp.fidelity(per_input, bands=None).layout.shapes if s.type == "rect"]


def test_fidelity_colours_models_apart_and_kl_axis():
    a = synthetic_result(3, 4, n_prompts=5, model="model-a")
    b = synthetic_result(4, 4, n_prompts=5, model="model-b", seed=2)
    fig = sp.fidelity([a, b], metric="kl", inverse=False)
    lines = [t for t in fig.data if t.mode == "lines" and t.showlegend is not False]
    assert [t.name for t in lines] == ["model-a · mask", "model-b · mask"]
    assert lines[0].line.color != lines[1].line.color
    assert "nats" in fig.layout.yaxis.title.text
    with pytest.raises(KeyError, match="no 'loss_x' metric"):
        sp.fidelity(a, metric="loss_x")


def test_nucleus_recovery_plots_the_analysis_medians(per_input):
    other = synthetic_result(4, 5, n_prompts=8, model="other", seed=3)
    fig = sp.nucleus_recovery([per_input, other])
    assert len(fig.data) == 2 and fig.layout.yaxis.type == "log"
    table = nucleus_recovery(per_input)
    med = table["median"].to_numpy(float)
    top = float(table["max_relative_size"].iloc[0])
    np.testing.assert_allclose(fig.data[0].y, np.where(np.isfinite(med), med, top))
    assert list(fig.layout.xaxis.ticktext) == [f"{v:g}%" for v in table["level"]]


# -- composition, usage, density --------------------------------------------------------------
def test_composition_stacks_to_one_and_matches_the_analysis(per_input):
    fig = sp.composition(per_input)
    quart = [t for t in fig.data if t.stackgroup == "quart1"]
    kind = [t for t in fig.data if t.stackgroup == "kind1"]
    assert len(quart) == 4 and len(kind) == 2
    np.testing.assert_allclose(np.sum([t.y for t in quart], 0), 1.0, atol=1e-9)
    np.testing.assert_allclose(np.sum([t.y for t in kind], 0), 1.0, atol=1e-9)
    table = composition(per_input).sort_values("relative_size")
    np.testing.assert_allclose(kind[0].y, table["attn_share"].to_numpy())
    assert fig.layout.xaxis.type == "log" and fig.layout.xaxis2.type == "log"
    assert quart[0].name == "Q1 (layer 0)"  # 3 layers: quartiles of layers 0, 1, 2
    two = sp.composition([per_input, synthetic_result(8, 2, n_prompts=4, model="b")])
    assert len([t for t in two.data if t.stackgroup and t.stackgroup.startswith("quart")]) == 8
    assert [a.text for a in two.layout.annotations] == ["synth · mask", "b · mask"]


def test_usage_lorenz_curves_and_gini(per_input):
    fig = sp.usage(per_input)
    curves = [t for t in fig.data if t.name != "even use"]
    gini = gini_by_size(per_input).set_index("size")["gini"]
    for s, t in zip(fig.layout.meta["sizes"], curves):
        assert t.name.endswith(f"Gini {gini[s]:.2f}")
        assert (t.x[0], t.y[0]) == (0, 0) and t.x[-1] == pytest.approx(1)
        assert np.all(np.asarray(t.y) <= np.asarray(t.x) + 1e-9)  # below the diagonal
    assert int(per_input.sizes.max()) not in fig.layout.meta["sizes"]
    with pytest.raises(KeyError, match="not in this result's grid"):
        sp.usage(per_input, sizes=[999])


def test_density_vs_entropy_states_spearman_in_the_title(per_input):
    fig = sp.density_vs_entropy(per_input)
    rho = uncertainty(per_input, n_boot=1000)
    line = rho[rho["against"] == "entropy"].iloc[0]
    assert f"Spearman ρ = {line['rho']:.2f}" in fig.layout.title.text
    assert len(fig.data[0].x) == per_input.n_prompts
    np.testing.assert_allclose(fig.data[0].y, density(per_input)["density"].to_numpy())
    assert fig.layout.meta["rho"][0] > 0.5  # planted: TV decays slower at higher entropy


# -- export ----------------------------------------------------------------------------------
def test_save_every_format_atomically(tmp_path, browser, per_input):
    fig = sp.fidelity(per_input)
    png = sp.save(fig, tmp_path / "f.png", scale=2)
    assert png_size(png.read_bytes()) == (2 * fig.layout.width, 2 * fig.layout.height)
    svg = sp.save(fig, tmp_path / "f.svg").read_bytes()
    texts = svg_texts(svg)
    assert "synth · mask" in texts and "construction" in texts
    assert sp.save(fig, tmp_path / "f.pdf").read_bytes()[:5] == b"%PDF-"
    html = sp.save(fig, tmp_path / "f.html").read_text(encoding="utf-8")
    assert "Plotly.newPlot" in html and "plotly.js v" in html
    assert not re.search(r"<script[^>]+src=", html)  # plotly.js embedded: works offline
    col = sp.save(fig, tmp_path / "c.png", preset="column", scale=1)
    assert png_size(col.read_bytes())[0] == round(3.3 * PX_PER_INCH)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "c.png",
        "f.html",
        "f.pdf",
        "f.png",
        "f.svg",
    ]  # no temporary files left behind
    with pytest.raises(ValueError, match=r"\.html, \.png, \.svg or \.pdf"):
        sp.save(fig, tmp_path / "f.jpg")


def test_every_figure_renders_to_png_and_svg(tmp_path, browser, per_input):
    rnd = synthetic_result(3, 4, n_prompts=8, method="random", shuffle=True, model="synth")
    figs = sp.paper_figures([per_input, rnd])
    assert set(figs) == {
        "circuit",
        "fidelity",
        "nucleus_recovery",
        "composition",
        "composition_entering",
        "usage",
        "density_vs_entropy",
    }
    for name, fig in figs.items():
        png = sp.save(fig, tmp_path / f"{name}.png", scale=1).read_bytes()
        assert png_size(png) == (fig.layout.width, fig.layout.height)
        texts = svg_texts(sp.save(fig, tmp_path / f"{name}.svg").read_bytes())
        assert fig.layout.title.text.split("<")[0].strip()[:20] in " ".join(texts)


def test_report_html_holds_every_figure_and_plotly_once(tmp_path, per_input):
    d = synthetic_result(3, 4, n_prompts=8, per="dataset", model="synth")
    page = sp.report_html(
        {"per input": per_input, "shared": d},
        tmp_path / "r" / "report.html",
        notes="strace-lens trace --model x",
    )
    text = page.read_text(encoding="utf-8")
    for name in (
        "circuit_0",
        "circuit_1",
        "fidelity",
        "nucleus_recovery",
        "composition",
        "usage_0",
        "density_vs_entropy",
    ):
        assert f'id="fig-{name}"' in text
    assert "usage_1" not in text  # a per-dataset mask has no usage spread
    assert text.count("Plotly.newPlot") == len(re.findall(r'id="fig-', text))
    assert len(re.findall(r"plotly\.js v\d", text)) == 1  # the library, embedded once
    assert "strace-lens trace --model x" in text
    # no random result was given: the fidelity heading promises none
    assert "<h2>Fidelity versus subgraph size, with inverse subgraphs</h2>" in text


# -- real traces of the tiny model -----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_results():
    from conftest import make_tiny

    from strace_lens.trace import trace

    model = make_tiny()
    tokens = torch.randint(0, 50, (5, 9), generator=torch.Generator().manual_seed(1))
    fast = dict(steps=8, refine_rounds=0)  # a real search, shortened: figures, not quality
    mask = trace(model, tokens, progress=False, seed=0, **fast)
    rnd = trace(model, tokens, method="random", progress=False, seed=0)
    shared = trace(model, tokens, per="dataset", progress=False, seed=0, **fast)
    return mask, rnd, shared


def test_figures_of_real_tiny_traces(tmp_path, browser, tiny_results):
    mask, rnd, shared = tiny_results
    for result in (mask, shared):
        fig = sp.circuit(result)
        assert len(all_node_names(fig)) == len(result.graph)
        row = fig.layout.meta["row"]
        _, core_mask = split_core(result)
        shown = result.masks[row, result.size_index(fig.layout.meta["size"])]
        core = set(result.graph.nodes_from_mask(core_mask[row] & shown))
        assert nodes_of(fig, "core") == core
        assert nodes_of(fig, "refinement") == set(
            result.graph.nodes_from_mask(shown & ~core_mask[row])
        )
    figs = sp.paper_figures({"mask": mask, "random": rnd, "shared": shared})
    fid = figs["fidelity"]
    names = [t.name for t in fid.data if t.showlegend is not False]
    assert names == ["mask", "mask · inverse", "random", "shared", "shared · inverse"]
    assert fid.layout.xaxis.type == "log"
    assert math.isclose(
        fid.data[0].x[0]
        if fid.data[0].name == "mask"
        else next(t for t in fid.data if t.name == "mask").x[0],
        1 / mask.n_candidates,
        rel_tol=1e-9,
    )
    for name, fig in figs.items():
        assert png_size(sp.save(fig, tmp_path / f"{name}.png", scale=1).read_bytes())[0] > 0
        assert svg_texts(sp.save(fig, tmp_path / f"{name}.svg").read_bytes())
