"""The token-level circuit: the kept edges of one prompt's edge subgraph, drawn where they act.

Layout: x = token position (the prompt's tokens on the axis), y = graph layer (0 = input
embedding, 1 + 2l = after block l's attention, 2 + 2l = after its MLP; the paper's graph,
:mod:`strace_lens.edges.graph`). An attention edge ``a{l}.h{h}:{j}->{t}`` is a line from
(j, 2l) to (t, 1 + 2l); MLP and residual edges are vertical, one graph layer high, the MLP
edge (thick) just right of the token's column and the residual edge (dotted) just left of it,
so the two edges into the same MLP node stay apart. The output node is a star.

Colours: the *core* (edges entering the family at sizes up to the core size; default the
paper's minimal core, s = 1e-3; ``core="top1"``: the smallest grid size whose subgraph
already predicts the full model's top-1 token) in vermillion, the *refinement* (edges
entering after it) in blue, the project's phase colours. Hover on the dot at an edge's
middle: its name, what it connects, its entry size and rank, and its weight when given.

What is drawn (the readability rule): one subgraph of the (nested) family, by default the
largest one on the size grid with at most ``max_edges`` edges (600: on SmolLM2, 50 tokens,
E ~ 3.6e5, that is s = 1.4e-3, the 1e-3 core plus ~140 refinement edges). A larger
subgraph, asked for by ``size``, is cut to its ``max_edges`` earliest-entering edges (the
first of the ranking) and the subtitle says so. The figure never holds more than
``max_edges`` edges.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from torch import Tensor

from strace_lens.analysis.edge_bands import MINIMAL_CORE_SIZE
from strace_lens.edges.result import EdgeTraceResult
from strace_lens.plot._common import prompt_token_labels, short
from strace_lens.plot.style import CORE_COLOR, REFINEMENT_COLOR, TEMPLATE

DEFAULT_MAX_EDGES = 600
SIDE = 0.14  # horizontal offset of the vertical edges from the token's column
KIND_NAMES = ("attention", "MLP", "residual")
# kind code (0 attn, 1 resid_attn, 2 mlp, 3 resid_mlp) -> drawn group
GROUP_OF_KIND = (0, 2, 1, 2)
LINE_STYLE: dict[str, dict[str, Any]] = {
    "attention": dict(width=1.1),
    "MLP": dict(width=3.2),
    "residual": dict(width=1.4, dash="dot"),
}
PHASE_COLOURS = {"core": CORE_COLOR, "refinement": REFINEMENT_COLOR}


def token_labels(
    result: EdgeTraceResult,
    prompt: int,
    tokens: Sequence[str] | None = None,
    model: Any = None,
) -> list[str]:
    """Axis labels of the prompt's tokens: ``tokens`` as given, else decoded with the model's
    tokenizer under the trace's token convention, else the positions."""

    def token_ids() -> list[int]:
        from strace_lens.edges.tokens import edge_tokenize

        convention = result.options.get("tokens", "paper")
        return edge_tokenize(model, [result.prompts[prompt]], convention).tokens[0].tolist()

    return prompt_token_labels(prompt, int(result.n_pos[prompt]), tokens, model, token_ids)


def entry_indices(result: EdgeTraceResult, prompt: int, n: int) -> Tensor:
    """Grid index at which each of the prompt's first ``n`` ranked edges enters: the first
    size whose edge count exceeds the edge's rank."""
    return torch.searchsorted(result.counts[prompt].contiguous(), torch.arange(n), right=True)


def core_boundary(result: EdgeTraceResult, prompt: int, core: float | str) -> float:
    """The grid size ending the core: ``core`` itself, or for ``"top1"`` the smallest grid
    size whose top-1 token is the full model's (NaN when none is)."""
    if core == "top1":
        agree = torch.nonzero(result.metrics["top1"][prompt] > 0.5).flatten()
        return float(result.grid[int(agree[0])]) if len(agree) else float("nan")
    if isinstance(core, str) or not 0 < float(core) <= 1:
        raise ValueError(f"core must be a relative size in (0, 1] or 'top1', got {core!r}.")
    return float(core)


def _drawn_size(result: EdgeTraceResult, prompt: int, size: int | None, max_edges: int) -> int:
    if size is not None:
        if not 0 <= size < len(result.grid):
            raise IndexError(f"size is a grid index in [0, {len(result.grid)}), got {size}.")
        return size
    counts = result.counts[prompt]
    fits = torch.nonzero((counts <= max_edges) & (counts > 0)).flatten()
    if len(fits):
        return int(fits[-1])
    return int(torch.nonzero(counts > 0).flatten()[0])  # cut to max_edges below


def token_circuit(
    result: EdgeTraceResult,
    prompt: int = 0,
    *,
    tokens: Sequence[str] | None = None,
    model: Any = None,
    size: int | None = None,
    max_edges: int = DEFAULT_MAX_EDGES,
    core: float | Literal["top1"] = MINIMAL_CORE_SIZE,
    weights: Float[Tensor, " edge"] | None = None,
) -> go.Figure:
    """One prompt's edge subgraph drawn over its tokens and graph layers (module docstring).

    Args:
        result: a nested :class:`EdgeTraceResult` (``method="greedy"`` or ``"mask"``).
        prompt: which prompt.
        tokens: the prompt's token strings (as many as it was traced over), or ``model``
            to decode them; by default the axis shows positions.
        size: grid index of the subgraph to draw (default: the largest with at most
            ``max_edges`` edges).
        max_edges: the most edges drawn (the earliest-entering ones).
        core: the relative size ending the core, or ``"top1"``.
        weights: per-edge weights by compact id (e.g. ``edge_weights(...)[0][prompt]``),
            shown on hover.
    """
    if not result.nested:
        raise ValueError(
            "token_circuit draws a nested family (method='greedy' or 'mask'), whose edges "
            "enter at one size each; this result holds independent random draws."
        )
    if not 0 <= prompt < result.n_prompts:
        raise IndexError(f"prompt must lie in [0, {result.n_prompts}), got {prompt}.")
    if max_edges < 1:
        raise ValueError(f"max_edges must be at least 1, got {max_edges}.")
    graph = result.graph(prompt)
    if weights is not None and weights.shape != (graph.n_edges,):
        raise ValueError(
            f"weights must hold one value per edge of prompt {prompt} ({graph.n_edges}), "
            f"got shape {tuple(weights.shape)}."
        )
    labels = token_labels(result, prompt, tokens, model)
    j = _drawn_size(result, prompt, size, max_edges)
    subgraph = result.subgraph(prompt, j)
    drawn = subgraph[:max_edges]
    entry = entry_indices(result, prompt, len(drawn))
    entry_s = torch.tensor(result.grid, dtype=torch.float64)[entry]
    edge_core = core_boundary(result, prompt, core)
    is_core = entry_s <= edge_core * (1 + 1e-9)  # False everywhere when edge_core is NaN

    fig = go.Figure()
    f = {k: v[drawn].tolist() for k, v in graph.edge_fields.items()}
    names = graph.names(drawn)
    w = weights[drawn].tolist() if weights is not None else None
    groups: dict[tuple[str, str], list[int]] = {}
    for i, kind in enumerate(f["kind"]):
        phase = "core" if bool(is_core[i]) else "refinement"
        groups.setdefault((phase, KIND_NAMES[GROUP_OF_KIND[kind]]), []).append(i)
    for phase in ("core", "refinement"):
        for kind_name in KIND_NAMES:
            members = groups.get((phase, kind_name), [])
            if members:
                _add_group(fig, phase, kind_name, members, f, names, labels, entry_s, w)
    _add_output(fig, graph.n_layers, graph.n_pos, labels)
    _layout(fig, result, prompt, labels, graph.n_layers, j, len(subgraph), len(drawn),
            int(is_core.sum()), edge_core, core, max_edges, size is None)  # fmt: skip
    return fig


def _segment(kind: int, layer: int, t: int, s: int) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of an edge of the given kind code."""
    if kind == 0:
        return s, 2 * layer, t, 2 * layer + 1
    if kind == 1:
        return t - SIDE, 2 * layer, t - SIDE, 2 * layer + 1
    if kind == 2:
        return t + SIDE, 2 * layer + 1, t + SIDE, 2 * layer + 2
    return t - SIDE, 2 * layer + 1, t - SIDE, 2 * layer + 2


def _describe(kind: int, layer: int, head: int, t: int, s: int, labels: list[str]) -> str:
    if kind == 0:
        return f"block {layer} head {head}: {labels[s]} (pos {s}) → {labels[t]} (pos {t})"
    if kind == 2:
        return f"block {layer} MLP at {labels[t]} (pos {t})"
    where = "attention" if kind == 1 else "MLP"
    return f"skip around block {layer}'s {where} at {labels[t]} (pos {t})"


def _add_group(
    fig: go.Figure,
    phase: str,
    kind_name: str,
    members: list[int],
    f: dict[str, list[int]],
    names: list[str],
    labels: list[str],
    entry_s: Tensor,
    w: list[float] | None,
) -> None:
    """One line trace (segments split by None) and one trace of hoverable midpoints."""
    xs: list[float | None] = []
    ys: list[float | None] = []
    mx, my, hover, custom = [], [], [], []
    for i in members:
        kind, layer, t, s = f["kind"][i], f["layer"][i], f["target"][i], f["source"][i]
        x0, y0, x1, y1 = _segment(kind, layer, t, s)
        xs += [x0, x1, None]
        ys += [y0, y1, None]
        mx.append((x0 + x1) / 2)
        my.append((y0 + y1) / 2)
        text = (
            f"<b>{names[i]}</b><br>{_describe(kind, layer, f['head'][i], t, s, labels)}"
            f"<br>enters at s = {float(entry_s[i]):g} (rank {i + 1})"
        )
        if w is not None:
            text += f"<br>weight {w[i]:.4g}"
        hover.append(text)
        custom.append(names[i])
    colour = PHASE_COLOURS[phase]
    legend = f"{phase} · {kind_name}"
    fig.add_trace(go.Scatter(
        x=xs, y=ys, mode="lines", line=dict(color=colour, **LINE_STYLE[kind_name]),
        opacity=0.55 if kind_name == "attention" else 0.9, name=legend,
        legendgroup=legend, hoverinfo="skip", meta=dict(role="edges", phase=phase,
                                                        kind=kind_name),
    ))  # fmt: skip
    fig.add_trace(go.Scatter(
        x=mx, y=my, mode="markers", marker=dict(color=colour, size=4), name=legend,
        legendgroup=legend, showlegend=False, hovertext=hover, hoverinfo="text",
        customdata=custom, meta=dict(role="hover", phase=phase, kind=kind_name),
    ))  # fmt: skip


def _add_output(fig: go.Figure, n_layers: int, n_pos: int, labels: list[str]) -> None:
    fig.add_trace(go.Scatter(
        x=[n_pos - 1], y=[2 * n_layers], mode="markers", name="output",
        marker=dict(symbol="star", size=14, color="#222222"),
        hovertext=[f"output: the next token after {labels[-1]}"], hoverinfo="text",
        meta=dict(role="output"),
    ))  # fmt: skip


def _y_ticks(n_layers: int) -> tuple[list[int], list[str]]:
    """Every graph layer for up to 12 blocks; else the embedding and each block's MLP layer
    (labelled ``L{l}``), thinned to at most 32 labels."""
    if n_layers <= 12:
        vals = list(range(2 * n_layers + 1))
        text = ["emb"] + [f"{'a' if g % 2 else 'm'}{(g - 1) // 2}" for g in vals[1:]]
        return vals, text
    step = int(np.ceil(n_layers / 31))
    blocks = list(range(0, n_layers, step))
    return [0] + [2 + 2 * b for b in blocks], ["emb"] + [f"L{b}" for b in blocks]


def _layout(
    fig: go.Figure,
    result: EdgeTraceResult,
    prompt: int,
    labels: list[str],
    n_layers: int,
    j: int,
    n_subgraph: int,
    n_drawn: int,
    n_core: int,
    edge_core: float,
    core: float | str,
    max_edges: int,
    chosen: bool,
) -> None:
    n_pos = len(labels)
    s = result.grid[j]
    cut = f", the first {n_drawn} drawn (at most {max_edges})" if n_drawn < n_subgraph else ""
    # the drawing rule, stated on the figure when it chose the subgraph
    rule = f" (the largest with ≤ {max_edges} edges)" if chosen and n_drawn == n_subgraph else ""
    if np.isnan(edge_core):
        core_text = "no grid size predicts the full model's top-1 token: no core"
    else:
        why = "top-1 first agrees" if core == "top1" else "core size"
        core_text = f"core = edges entering at s ≤ {edge_core:g} ({why}): {n_core}"
    subtitle = (
        f"subgraph s = {s:g}{rule}: {n_subgraph} of {result.n_edges(prompt)} edges{cut}; "
        f"{core_text}, refinement: {n_drawn - n_core}"
    )
    ticks = _y_ticks(n_layers)
    fig.update_layout(
        template=TEMPLATE,
        title=dict(text=f"Token-level circuit · “{short(result.prompts[prompt])}”",
                   subtitle=dict(text=subtitle)),
        xaxis=dict(title="token", tickvals=list(range(n_pos)), ticktext=labels,
                   tickangle=-90, tickfont=dict(size=11), range=[-0.7, n_pos - 0.3],
                   showgrid=False),
        yaxis=dict(title="graph layer" if n_layers <= 12 else "graph layer (Ll: after block l)",
                   tickvals=ticks[0], ticktext=ticks[1], range=[-0.6, 2 * n_layers + 0.6]),
        legend=dict(orientation="h", x=0, xanchor="left", yref="container", y=0,
                    yanchor="bottom"),
        width=max(720, 180 + 24 * n_pos),
        height=max(560, 260 + 15 * (2 * n_layers + 1)),
        margin=dict(l=80, r=30, t=90, b=190),
        meta=dict(strace_lens="token_circuit", prompt=prompt, size=float(s), size_index=j,
                  n_subgraph=n_subgraph, n_drawn=n_drawn, n_core=n_core,
                  core_size=None if np.isnan(edge_core) else edge_core, max_edges=max_edges),
    )  # fmt: skip
