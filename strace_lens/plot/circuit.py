"""The circuit diagram: every node of the model, the early core and the late refinement.

Layout, with explicit coordinates: layer on x, head on y (head 0 at the bottom), and each
layer's MLP as a square in a row of its own above the heads, so a 30-layer, 9-head model is a
30 x 10 grid. The subgraph of the chosen size is drawn in the phase colours (core vermillion,
refinement blue, the same as the phase bands of the curves); ablated nodes are small grey
dots, so the model's extent stays visible. A node's marker area grows the earlier it entered
the family (its entry size, :meth:`TraceResult.entry_sizes`). The core/refinement split is
:func:`strace_lens.analysis.split_core`'s, never recomputed here.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch

from strace_lens.analysis import split_core
from strace_lens.graph import NodeGraph
from strace_lens.plot._common import model_name, short
from strace_lens.plot.style import CORE_COLOR, REFINEMENT_COLOR, TEMPLATE, UNUSED_COLOR
from strace_lens.result import TraceResult

#: the default diagram shows at most this share of the candidate nodes (see default_size)
DEFAULT_MAX_SHARE = 0.5
MLP_GAP = 0.7  # extra vertical space between the top head and the MLP row, in head units
MAX_NODE_PX = 24.0
# Marker diameter as a fraction of the grid cell: earliest entry -> BIG, latest -> SMALL.
BIG, SMALL, ABLATED = 0.86, 0.42, 0.22

SHORT_NAMES = {
    "core": "core",
    "refinement": "refinement",
    "core_out": "core, ablated",
    "fixed": "kept",
    "ablated": "ablated",
}
LEGEND_RANK = {"core": 1, "refinement": 2, "core_out": 3, "fixed": 4, "ablated": 5}
PHASES = {
    # key: (legend name, colour, filled?)
    "core": ("early core", CORE_COLOR, True),
    "core_out": ("core, ablated at this s", CORE_COLOR, False),
    "refinement": ("late refinement", REFINEMENT_COLOR, True),
    "fixed": ("not a candidate (kept)", "#555555", True),
    "ablated": ("ablated", UNUSED_COLOR, True),
}


def circuit(
    result: TraceResult,
    prompt: int | None = None,
    size: int | None = None,
    core_nucleus: float = 1.0,
) -> go.Figure:
    """The subgraph of ``size`` nodes drawn over the whole model (default: :func:`default_size`).

    Args:
        result: a per-input or per-dataset :class:`TraceResult`.
        prompt: which prompt's subgraph to draw for a per-input result (default 0). For a
            per-dataset result the shared subgraph is drawn, and ``prompt`` only picks whose
            fidelity the hover shows (default: the mean over prompts).
        size: the subgraph size to draw. A size that was not traced draws the nearest traced
            one (ties to the smaller), with a warning and said in the subtitle. Default
            (:func:`default_size`, said in the figure's subtitle): the early core, the
            smallest traced subgraph that predicts the full model's top-1 token, when it
            holds at most half the candidate nodes; otherwise the largest traced size that
            does. (The smallest subgraph reaching a 90 % shared nucleus, the earlier default,
            was the whole model in every default run tried.)
        core_nucleus: passed to :func:`strace_lens.analysis.split_core` (percent of shared
            nucleus that ends the core; 1 = the top-1 token is the full model's).
    """
    graph = result.graph
    per_dataset = result.masks.shape[0] == 1 and result.n_prompts != 1
    row, size, rule = _row_and_size(result, prompt, size, core_nucleus, per_dataset)
    j = result.size_index(size)
    shown = result.masks[row, j].clone()
    entry = result.entry_sizes()[row].double()
    core_size_all, core_mask_all = split_core(result, core_nucleus)
    core, core_size = core_mask_all[row], float(core_size_all[row])

    phase = _phases(shown, result.candidates, core)
    rel = _marker_sizes(result, entry, phase)
    hover = _hover_texts(result, row, prompt, per_dataset, shown, entry, phase)
    fig = go.Figure()
    _add_phase_traces(fig, graph, phase, rel, hover)
    titles = _titles(result, row, size, per_dataset, core_size, core_nucleus, rule)
    _lay_out(fig, graph, titles, size=size, row=row, core_size=core_size)
    return fig


def _row_and_size(
    result: TraceResult,
    prompt: int | None,
    size: int | None,
    core_nucleus: float,
    per_dataset: bool,
) -> tuple[int, int, str]:
    """The mask row drawn, its size and how the size was chosen ("" when given)."""
    n_prompts = result.n_prompts
    if prompt is not None and not 0 <= prompt < n_prompts:
        raise IndexError(f"prompt={prompt} is outside this result's {n_prompts} prompts.")
    row = 0 if per_dataset else (prompt or 0)
    if size is not None:
        # off the grid: the nearest traced size, with a warning, as TraceResult.nodes does
        traced = int(result.sizes[result.nearest_size_index(size)])
        return row, traced, "" if traced == int(size) else f"nearest traced to the asked {size}"
    size, rule = _default_size(result, row, core_nucleus)
    return row, size, rule


def default_size(result: TraceResult, prompt: int = 0, core_nucleus: float = 1.0) -> int:
    """The size :func:`circuit` draws by default for ``prompt`` (ignored for a per-dataset
    result): the early core (:func:`strace_lens.analysis.split_core`: the smallest traced
    subgraph whose shared nucleus reaches ``core_nucleus`` %, by default the one that
    predicts the full model's top-1 token) when it holds at most ``DEFAULT_MAX_SHARE`` of
    the candidate nodes; otherwise (a larger core, or none on the grid) the largest traced
    size within that share, or the smallest traced size when none is."""
    per_dataset = result.masks.shape[0] == 1 and result.n_prompts != 1
    return _default_size(result, 0 if per_dataset else prompt, core_nucleus)[0]


def _default_size(result: TraceResult, row: int, core_nucleus: float) -> tuple[int, str]:
    core = float(split_core(result, core_nucleus)[0][row])
    cap = DEFAULT_MAX_SHARE * result.n_candidates
    if not math.isnan(core) and core <= cap:
        return int(core), "the early core"
    sizes = sorted(int(s) for s in result.sizes.tolist())
    within = [s for s in sizes if s <= cap]
    why = "no core on the grid" if math.isnan(core) else f"the core needs s = {int(core)}"
    share = f"{DEFAULT_MAX_SHARE:.0%}"
    if within:
        return within[-1], f"the largest traced s ≤ {share} of the nodes ({why})"
    return sizes[0], f"the smallest traced s ({why}; none ≤ {share} of the nodes)"


def _phases(shown: torch.Tensor, candidates: torch.Tensor, core: torch.Tensor) -> np.ndarray:
    """Each node's phase key (see ``PHASES``) in the subgraph drawn."""
    phase = np.full(len(shown), "ablated", dtype=object)
    phase[(shown & candidates & ~core).numpy()] = "refinement"
    phase[(shown & core).numpy()] = "core"
    phase[(~shown & core).numpy()] = "core_out"
    phase[(~candidates).numpy()] = "fixed"
    return phase


def _marker_sizes(result: TraceResult, entry: torch.Tensor, phase: np.ndarray) -> np.ndarray:
    """Marker diameter as a fraction of a cell, from the entry size on a log scale between
    the grid's ends (earliest -> BIG, latest -> SMALL)."""
    grid = result.sizes.double()
    lo, hi = math.log(max(float(grid.min()), 1.0)), math.log(max(float(grid.max()), 1.0))
    with np.errstate(invalid="ignore", divide="ignore"):
        t = (np.log(entry.numpy()) - lo) / max(hi - lo, 1e-12)
    t = np.where(np.isnan(t), 1.0, np.clip(t, 0.0, 1.0))
    rel = BIG - (BIG - SMALL) * t
    rel = np.where(phase == "ablated", ABLATED, rel)
    return np.where(phase == "fixed", BIG * 0.8, rel)


def _hover_texts(
    result: TraceResult,
    row: int,
    prompt: int | None,
    per_dataset: bool,
    shown: torch.Tensor,
    entry: torch.Tensor,
    phase: np.ndarray,
) -> np.ndarray:
    """Each node's hover: name, phase, entry size and the fidelity there (that prompt's, or
    the mean over prompts for a shared mask)."""
    sel = slice(None) if (per_dataset and prompt is None) else slice(row, row + 1)
    if per_dataset and prompt is not None:
        sel = slice(prompt, prompt + 1)
    kl = result.metrics["kl"][sel].double().mean(0)
    tv = result.metrics["tv"][sel].double().mean(0)
    candidates = result.candidates
    n_cand = max(result.n_candidates, 1)
    hover = []
    for i, node in enumerate(result.graph.nodes):
        kind = f"attention head {node.head}" if node.kind == "attn" else "MLP"
        lines = [f"<b>{node.name}</b>", f"layer {node.layer}, {kind}", PHASES[phase[i]][0]]
        e = float(entry[i])
        if not candidates[i]:
            lines.append("not a candidate: kept in every subgraph")
        elif math.isnan(e):
            in_largest = bool(result.masks[row, int(torch.argmax(result.sizes))][i])
            lines.append(
                "entry size: none ("
                + ("leaves a larger subgraph)" if in_largest or shown[i] else "never kept)")
            )
        else:
            je = result.size_index(int(e))
            lines.append(f"entry size: s = {int(e)} ({e / n_cand:.3g} of nodes)")
            lines.append(f"fidelity there: KL {float(kl[je]):.3g} nats, TV {float(tv[je]):.3g}")
        hover.append("<br>".join(lines))
    return np.array(hover, dtype=object)


def _add_phase_traces(
    fig: go.Figure, graph: NodeGraph, phase: np.ndarray, rel: np.ndarray, hover: np.ndarray
) -> None:
    """One scatter trace per phase: layer on x, head (or the MLP row) on y."""
    x = graph.layers.numpy().astype(float)
    heads = [n.head for n in graph.nodes]
    y = np.array([h if h is not None else graph.n_heads - 1 + MLP_GAP + 1 for h in heads], float)
    is_attn = graph.is_attn.numpy()
    for key in ("ablated", "fixed", "refinement", "core_out", "core"):
        # Heads first: a legend shows the trace's first marker, and most nodes are heads.
        idx = np.nonzero(phase == key)[0]
        idx = idx[np.argsort(~is_attn[idx], kind="stable")]
        if len(idx) == 0:
            continue
        name, colour, filled = PHASES[key]
        symbols = np.where(is_attn[idx], "circle", "square")
        if not filled:
            symbols = np.char.add(symbols.astype(str), "-open")
        fig.add_trace(
            go.Scatter(
                x=x[idx],
                y=y[idx],
                mode="markers",
                name=f"{name} ({len(idx)})",
                legendrank=LEGEND_RANK[key],
                marker=dict(
                    color=colour,
                    symbol=list(symbols),
                    size=list(rel[idx]),  # fractions of a cell; relayout() makes them px
                    line=dict(width=0.8 if key != "ablated" else 0, color="white")
                    if filled
                    else dict(width=2, color=colour),
                    opacity=1.0,
                ),
                text=list(hover[idx]),
                customdata=[graph.names[i] for i in idx],
                hovertemplate="%{text}<extra></extra>",
                meta=dict(
                    phase=key,
                    rel_size=[float(v) for v in rel[idx]],
                    names=[f"{name} ({len(idx)})", SHORT_NAMES[key]],
                ),
            )
        )


def _titles(
    result: TraceResult,
    row: int,
    size: int,
    per_dataset: bool,
    core_size: float,
    core_nucleus: float,
    rule: str = "",
) -> tuple[tuple[str, str], tuple[str, str]]:
    """(title, subtitle) for wide and for narrow (paper column) layouts: which subgraph (and
    why this size, when it is the default), and where its core ends."""
    model = model_name(result)
    lead = f"{model}: " if model else ""
    n_cand = max(result.n_candidates, 1)
    where = (
        f"shared by {result.n_prompts} prompts"
        if per_dataset
        else f"prompt {row}: “{short(result.prompts[row], 36)}”"
    )
    if math.isnan(core_size):
        core_text = f"no subgraph reaches a {core_nucleus:g}% shared nucleus: no core"
    else:
        core_text = (
            f"core: smallest subgraph with a ≥{core_nucleus:g}% shared nucleus "
            f"(s = {int(core_size)})"
        )
    return (
        (
            f"{lead}s = {size} of {n_cand} nodes, {where}",
            (f"{'' if rule.startswith('nearest') else 'default size: '}{rule}; " if rule else "")
            + f"{core_text}; bigger = entered earlier; ○ head, □ MLP",
        ),
        (
            f"{lead}s = {size} of {n_cand} nodes",
            f"core: s = {'none' if math.isnan(core_size) else int(core_size)}; bigger = earlier",
        ),
    )


def _lay_out(
    fig: go.Figure, graph: NodeGraph, titles: Any, *, size: int, row: int, core_size: float
) -> None:
    """Axes, legend, the dotted line above the heads, faint layer columns, pixel sizes."""
    fig.update_layout(
        template=TEMPLATE,
        xaxis=dict(
            title="layer",
            range=[-0.6, graph.n_layers - 0.4],
            tick0=0,
            showgrid=False,
            zeroline=False,
        ),
        yaxis=dict(title="head / MLP", showgrid=False, zeroline=False),
        legend=dict(
            orientation="h",
            x=0,
            xanchor="left",
            yref="container",
            y=0,
            yanchor="bottom",
            itemsizing="constant",
        ),
        hovermode="closest",
        meta=dict(
            strace_lens="circuit",
            n_layers=graph.n_layers,
            n_heads=graph.n_heads,
            core_size=None if math.isnan(core_size) else core_size,
            size=size,
            row=row,
            titles=titles,
        ),
    )
    top = _mlp_row(graph.n_heads)
    # A dotted line separates the MLP row from the heads; faint columns mark the layers.
    fig.add_hline(
        y=graph.n_heads - 1 + (MLP_GAP + 1) / 2, line=dict(color="#BBBBBB", width=1, dash="dot")
    )
    for layer in range(0, graph.n_layers, 2):
        fig.add_vrect(
            x0=layer - 0.5, x1=layer + 0.5, fillcolor="#F4F4F4", line_width=0, layer="below"
        )
    fig.update_yaxes(range=[-0.7, top + 0.7])
    relayout(fig, width=int(max(620, 110 + graph.n_layers * 34)))


def _mlp_row(n_heads: int) -> float:
    return n_heads - 1 + MLP_GAP + 1


def relayout(fig: go.Figure, width: int, font_px: float | None = None) -> None:
    """Lay a circuit figure out for ``width`` pixels: height, margins, ticks, node sizes.

    The grid cell is what the width allows (at most 34 px); the height follows from the
    cell, so nodes stay round and never overlap. Tick spacing and the title's length adapt so
    labels never collide. :func:`strace_lens.plot.save` calls this for paper presets.
    """
    meta: dict[str, Any] = fig.layout.meta
    n_layers, n_heads = meta["n_layers"], meta["n_heads"]
    font = float(font_px or fig.layout.font.size or 13)
    narrow = width < 560
    left, right = 3.6 * font + 2.2 * font, 12
    cell = min(34.0, (width - left - right) / (n_layers + 0.2))
    top_row = _mlp_row(n_heads)
    plot_h = (top_row + 1.4) * cell
    title_h = 3.6 * font + 18
    legend_rows = 1  # narrow layouts use short legend names so one row holds them
    bottom = 1.6 * font + 1.9 * font + legend_rows * 1.9 * font + 10
    height = round(title_h + plot_h + bottom)
    layer_dtick = next(d for d in (1, 2, 5, 10, 20) if cell * d >= 1.9 * font)
    head_step = next(d for d in (1, 2, 3, 4, 5, 8) if cell * d >= 1.25 * font)
    heads = list(range(0, n_heads, head_step))
    fig.update_layout(
        width=width,
        height=height,
        margin=dict(l=left, r=right, t=title_h, b=bottom),
        title=dict(
            text=meta["titles"][1 if narrow else 0][0],
            subtitle=dict(text=meta["titles"][1 if narrow else 0][1]),
        ),
    )
    fig.update_xaxes(dtick=layer_dtick, title_standoff=4)
    fig.update_yaxes(
        tickvals=[*heads, top_row], ticktext=[f"h{h}" for h in heads] + ["MLP"], title_standoff=4
    )
    for trace in fig.data:
        trace_meta = trace.meta or {}
        if "rel_size" in trace_meta:
            rel = trace_meta["rel_size"]
            trace.marker.size = [max(2.0, min(MAX_NODE_PX, r * cell)) for r in rel]
            trace.name = trace_meta["names"][1 if narrow else 0]
