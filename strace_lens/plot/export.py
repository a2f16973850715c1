"""Writing figures to disk: interactive HTML, or PNG / SVG / PDF for papers, atomically.

Static export goes through kaleido 1.x, which drives a headless Chrome. kaleido finds the
browser itself: the ``BROWSER_PATH`` environment variable if set, otherwise a ``chromium`` /
``google-chrome`` on ``PATH`` or at the usual places (``/usr/bin/chromium`` on Debian, which
``apt-get install chromium`` provides, or the Chrome ``plotly_get_chrome`` downloads). Nothing
is downloaded at export time: MathJax, which kaleido would otherwise load from a CDN, is
switched off (these figures use no LaTeX), and plotly.js comes from the installed ``plotly``
package.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import plotly.graph_objects as go

from strace_lens.atomic import write_bytes

Preset = Literal["column", "page"]

# Chrome lays out 96 CSS px per inch; a PDF or SVG keeps that size, a PNG is rendered at
# ``scale`` x that (3 x 96 = 288 dpi, enough for print).
PX_PER_INCH = 96
PRESETS: dict[str, dict[str, Any]] = {
    # One column of a two-column paper (ACL, NeurIPS, ICML: 3.25-3.33 in), 8-9 pt text.
    "column": dict(width_in=3.3, font_px=11, title_px=12),
    # The full text width (6.75-7 in) at 9 pt text.
    "page": dict(width_in=6.9, font_px=12, title_px=14),
}
STATIC_FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
DEFAULT_ASPECT = 0.72  # height / width when a figure states no size
DEFAULT_WIDTH = 760


def apply_preset(fig: go.Figure, preset: Preset) -> go.Figure:
    """A copy of ``fig`` sized and lettered for a paper: ``"column"`` or ``"page"`` width.

    Text is set to the preset's size (8-9 pt in print), margins follow the text, long titles
    are wrapped, a legend below the plot gets the rows it needs at the new width, and the
    plotting area keeps its aspect ratio. The circuit diagram, which places its nodes in
    pixels, is laid out again for the new width (:func:`strace_lens.plot.circuit.relayout`).
    Multi-panel figures are better at ``"page"`` width.
    """
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}: use one of {sorted(PRESETS)} or None.")
    spec = PRESETS[preset]
    out = go.Figure(fig)
    width = round(spec["width_in"] * PX_PER_INCH)
    font = spec["font_px"]
    meta = out.layout.meta if isinstance(out.layout.meta, dict) else {}
    if meta.get("strace_lens") == "circuit":
        # Its height follows from the grid cell the width allows.
        from strace_lens.plot.circuit import relayout

        out.update_layout(
            font=dict(size=font),
            title=dict(font=dict(size=spec["title_px"]), subtitle=dict(font=dict(size=font - 1))),
        )
        relayout(out, width=width, font_px=font)
        return out

    base = 13.0  # the template's font size, which every figure's own layout assumes
    ratio = font / base
    old_w = out.layout.width or DEFAULT_WIDTH
    old_h = out.layout.height or old_w * DEFAULT_ASPECT
    m = out.layout.margin
    old_l, old_r = m.l if m.l is not None else 70, m.r if m.r is not None else 30
    old_t, old_b = m.t if m.t is not None else 80, m.b if m.b is not None else 60

    title = out.layout.title.text or ""
    subtitle = out.layout.title.subtitle.text or ""
    old_title_h = _text_block_h(title, 15) + _text_block_h(subtitle, 12) + 14
    new_title = title  # titles are kept short enough for a column; a wrapped one misplaces
    new_sub = _wrap(subtitle, width - 16, font - 1)
    new_title_h = _text_block_h(new_title, spec["title_px"]) + _text_block_h(new_sub, font - 1) + 14
    top = new_title_h + max(old_t - old_title_h, 0) * ratio

    bottom = old_b * ratio
    legend = out.layout.legend
    if legend.yref == "container" and (legend.y or 0) == 0:  # a legend below the plot
        names = [t.name for t in out.data if t.name and t.showlegend is not False]
        old_rows = _legend_rows(names, old_w, base)
        new_rows = _legend_rows(names, width, font)
        bottom = max(old_b - old_rows * 1.9 * base, 30) * ratio + new_rows * 1.9 * font

    left, right = max(old_l * ratio, 30), max(old_r * ratio, 8)
    old_pw, old_ph = old_w - old_l - old_r, old_h - old_t - old_b
    new_pw = width - left - right
    new_ph = max(old_ph * new_pw / max(old_pw, 1), 0.62 * new_pw)
    out.update_layout(
        width=width,
        height=round(top + bottom + new_ph),
        font=dict(size=font),
        title=dict(
            text=new_title,
            font=dict(size=spec["title_px"]),
            subtitle=dict(text=new_sub, font=dict(size=font - 1)),
        ),
        legend=dict(font=dict(size=font)),
        margin=dict(l=left, r=right, t=top, b=bottom),
    )
    for ann in out.layout.annotations:  # subplot titles, band labels
        ann.font.size = round((ann.font.size or base) * ratio, 1)
    _thin_log_ticks(out, new_pw, font)
    return out


def _thin_log_ticks(fig: go.Figure, plot_w: float, font: float) -> None:
    """Keep only powers of ten on log x axes whose 1-2-5 tick labels would collide."""
    import math

    for name in [k for k in fig.layout if k.startswith("xaxis")]:
        axis = fig.layout[name]
        if axis.type != "log" or not axis.tickvals or not axis.ticktext:
            continue
        domain = axis.domain or (0, 1)
        room = plot_w * (domain[1] - domain[0])
        label_w = max(len(t) for t in axis.ticktext) * 0.6 * font + 8
        if len(axis.tickvals) * label_w <= room:
            continue
        kept = [
            (v, t)
            for v, t in zip(axis.tickvals, axis.ticktext)
            if abs(math.log10(v) - round(math.log10(v))) < 1e-9
        ]
        axis.tickvals = [v for v, _ in kept]
        axis.ticktext = [t for _, t in kept]


def _text_block_h(text: str, size: float) -> float:
    if not text:
        return 0.0
    return (text.count("<br>") + 1) * 1.35 * size


def _wrap(text: str, width_px: float, size: float) -> str:
    """Break ``text`` at spaces so no line is wider than ``width_px`` (estimated widths)."""
    max_chars = max(int(width_px / (0.55 * size)), 10)
    lines = []
    for line in text.split("<br>"):
        words, cur = line.split(" "), ""
        for word in words:
            if cur and len(cur) + 1 + len(word) > max_chars:
                lines.append(cur)
                cur = word
            else:
                cur = f"{cur} {word}" if cur else word
        lines.append(cur)
    return "<br>".join(lines)


def _legend_rows(names: list[str], width: float, size: float) -> int:
    """How many rows a horizontal legend of ``names`` takes at ``width`` (estimate)."""
    rows, used = 1, 0.0
    for name in names:
        item = 40 + 0.5 * size * len(name)
        if used and used + item > width - 10:
            rows, used = rows + 1, 0.0
        used += item
    return rows


def save(
    fig: go.Figure,
    path: str | os.PathLike[str],
    preset: Preset | None = None,
    scale: float = 3.0,
) -> Path:
    """Write ``fig`` to ``path``; the suffix picks the format: .html, .png, .svg or .pdf.

    ``preset`` ("column", "page") sizes the figure for a paper (see :func:`apply_preset`);
    ``scale`` multiplies the pixel size of PNGs only. The file is written under a temporary
    name next to ``path`` and renamed, so a reader never sees half a figure. HTML embeds
    plotly.js and works offline.
    """
    target = Path(path)
    suffix = target.suffix.lower()
    if suffix != ".html" and suffix not in STATIC_FORMATS:
        raise ValueError(
            f"Cannot tell the format of {target.name!r}: give a path ending in .html, .png, "
            ".svg or .pdf."
        )
    if preset is not None:
        fig = apply_preset(fig, preset)
    target.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".html":
        data = fig.to_html(include_plotlyjs=True, full_html=True).encode("utf-8")
    else:
        data = to_image(fig, STATIC_FORMATS[suffix], scale=scale if suffix == ".png" else 1.0)
    write_bytes(target, data)
    return target


def to_image(fig: go.Figure, fmt: str, scale: float = 1.0) -> bytes:
    """Render ``fig`` as ``png``, ``svg`` or ``pdf`` bytes with kaleido, offline."""
    try:
        import kaleido
        from kaleido.errors import ChromeNotFoundError
    except ImportError as err:  # kaleido is a core dependency; this is a broken install
        raise RuntimeError(
            "Static export needs the 'kaleido' package: pip install 'kaleido>=1.0'."
        ) from err
    width = fig.layout.width or DEFAULT_WIDTH
    height = fig.layout.height or round(width * DEFAULT_ASPECT)
    opts = dict(format=fmt, width=width, height=height, scale=scale)
    # A plain dict, deep-copied: kaleido serialises it in another thread.
    fig_dict = copy.deepcopy(fig.to_plotly_json())
    try:
        if kaleido._global_server.is_running():  # an export_session(): reuse its browser
            data = kaleido.calc_fig_sync(fig_dict, opts=opts)
        else:
            data = kaleido.calc_fig_sync(fig_dict, opts=opts, kopts={"mathjax": False})
    except ChromeNotFoundError as err:
        raise RuntimeError(
            "Static export (PNG/SVG/PDF) needs a Chrome or Chromium and none was found. "
            "Run `plotly_get_chrome -y` (downloads Chrome for kaleido, no sudo), or on "
            "Debian/Ubuntu `apt-get install -y chromium`, or point the BROWSER_PATH "
            "environment variable at a Chrome/Chromium executable. HTML export (.html) needs "
            "no browser."
        ) from err
    return bytes(data)


@contextlib.contextmanager
def export_session() -> Iterator[None]:
    """Keep one headless browser open for many exports (each :func:`save` otherwise starts one).

    ``with strace_lens.plot.export_session(): save(...); save(...)``. When a kaleido server is
    already running (the user started one), it is used and left running.
    """
    import kaleido

    already = kaleido._global_server.is_running()  # no public accessor in kaleido 1.5
    if not already:
        kaleido.start_sync_server(mathjax=False, silence_warnings=True)
    try:
        yield
    finally:
        if not already:
            kaleido.stop_sync_server(silence_warnings=True)
