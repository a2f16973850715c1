"""Phases: the early core (construction) and the late refinement of every subgraph family.

The rule (a parameter, stated here and in every table it produces):

- The **core** of a family is its smallest subgraph on the size grid whose shared nucleus
  with the full model reaches ``core_nucleus`` percent. The default, 1, means "the top-1
  token is already the full model's" (the 1 % nucleus of any distribution whose top token
  holds at least 1 % of the mass is that token alone): the construction phase of the paper
  ends when the head of the distribution is in place.
- The **refinement** is what is added after the core until the family reaches
  ``refined_nucleus`` percent (default 90, the highest level of the paper's recovery
  analysis), i.e. the nodes of that later subgraph that are not in the core. When no
  subgraph of the grid reaches it, the largest subgraph is used and the row is flagged.

Why a nucleus threshold and not a fixed size band (the paper shades 1e-4 to 1e-2): the
paper's own claim is that the construction phase is the one that "reconstructs the head of
the output distribution", which is a statement about the shared nucleus; a fixed band would
assume the answer. The threshold is measured per prompt, so a prompt whose top-1 token needs
more nodes gets a larger core.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from strace_lens.analysis._common import layer_quartile, relative_depth, row_nucleus, sorted_sizes
from strace_lens.result import TraceResult


def _first_reaching(result: TraceResult, level: float) -> tuple[Tensor, Tensor]:
    """Per row: index (in the result's size order) of the smallest size whose nucleus >= level.

    Returns ``(index, reached)``; ``index`` is -1 where no size reaches the level.
    """
    _, order = sorted_sizes(result)
    nucleus = row_nucleus(result)[:, order]  # [R, S] increasing size
    hit = nucleus >= level
    reached = hit.any(1)
    first_sorted = hit.long().argmax(1)
    index = torch.where(reached, order[first_sorted], torch.full_like(first_sorted, -1))
    return index, reached


def split_core(
    result: TraceResult, core_nucleus: float = 1.0
) -> tuple[Float[Tensor, " row"], Bool[Tensor, "row node"]]:
    """The early core of each mask row: its grid size and its nodes.

    The core of a row is its smallest subgraph on the size grid whose shared nucleus reaches
    ``core_nucleus`` percent (default 1: the subgraph already predicts the full model's top-1
    token). For a per-input result, a row is a prompt and its own nucleus is used; for a
    per-dataset result (one mask row) the nucleus is averaged over the prompts first.

    Returns:
        ``core_size``: float ``[R]``, the grid size (number of candidate nodes) of each row's
        core; NaN where no subgraph of the grid reaches ``core_nucleus``.
        ``core_mask``: bool ``[R, N]``, the candidate nodes of that core subgraph (nodes
        outside the candidates, which every subgraph keeps, are left out, so
        ``core_mask.sum(1) == core_size``); all False where there is no core.
    """
    if "nucleus" not in result.metrics:
        raise KeyError(
            "split_core needs the 'nucleus' metric of the TraceResult; this result has only "
            f"{sorted(result.metrics)}. Trace again with a strace-lens that records it."
        )
    index, reached = _first_reaching(result, core_nucleus)
    rows = torch.arange(result.masks.shape[0])
    chosen = result.masks[rows, index.clamp(min=0)] & result.candidates
    core_mask = torch.where(reached[:, None], chosen, torch.zeros_like(chosen))
    nan = torch.full(index.shape, torch.nan, dtype=torch.float64)
    core_size = torch.where(reached, result.sizes[index.clamp(min=0)].double(), nan)
    return core_size.float(), core_mask


def split_refinement(
    result: TraceResult, core_nucleus: float = 1.0, refined_nucleus: float = 90.0
) -> tuple[Float[Tensor, " row"], Bool[Tensor, "row node"], Bool[Tensor, " row"]]:
    """The refinement of each mask row: nodes of the refined subgraph outside the core.

    The refined subgraph is the smallest one on the grid whose shared nucleus reaches
    ``refined_nucleus`` (the largest subgraph of the grid when none does; the third output
    is False on those rows). Rows without a core have an empty refinement.

    Returns ``(refined_size [R], refinement_mask [R, N], refined_reached [R])``.
    """
    _, core_mask = split_core(result, core_nucleus)
    index, reached = _first_reaching(result, refined_nucleus)
    largest = int(torch.argmax(result.sizes))
    index = torch.where(reached, index, torch.full_like(index, largest))
    rows = torch.arange(result.masks.shape[0])
    refined = result.masks[rows, index] & result.candidates
    has_core = core_mask.any(1)
    refinement = refined & ~core_mask & has_core[:, None]
    return result.sizes[index].double().float(), refinement, reached


def _profile(mask: Tensor, result: TraceResult) -> dict[str, np.ndarray]:
    """Per row: node count, attention share, mean relative depth and quartile shares."""
    m = mask.double()
    count = m.sum(1)
    safe = count.clamp(min=1)
    attn = (m * result.graph.is_attn.double()).sum(1) / safe
    depth = (m * relative_depth(result)).sum(1) / safe
    quart = layer_quartile(result)
    out = {
        "n_nodes": count.numpy(),
        "attn_share": torch.where(count > 0, attn, torch.nan).numpy(),
        "mean_depth": torch.where(count > 0, depth, torch.nan).numpy(),
    }
    for q in range(4):
        share = (m * (quart == q).double()).sum(1) / safe
        out[f"q{q + 1}_share"] = torch.where(count > 0, share, torch.nan).numpy()
    return out


def phases(
    result: TraceResult, core_nucleus: float = 1.0, refined_nucleus: float = 90.0
) -> pd.DataFrame:
    """Core versus refinement for every mask row, plus an aggregated ``row == "all"`` line.

    One line per (row, phase) with ``phase`` in ``{"core", "refinement"}``: the phase's node
    count, its size relative to the candidates, its attention share, its mean relative layer
    depth (0 = first layer, 1 = last) and its share of each layer quartile. ``reached`` says
    whether the phase's nucleus threshold was met on the grid (a core never reached has no
    nodes and NaN shares; it is reported, never dropped). The aggregated lines give the
    median over the rows that have a core and a non-empty phase (a refinement is empty when
    the core already reaches ``refined_nucleus``), and ``n_rows`` how many those are.
    """
    core_size, core_mask = split_core(result, core_nucleus)
    refined_size, ref_mask, ref_reached = split_refinement(result, core_nucleus, refined_nucleus)
    n_cand = max(result.n_candidates, 1)
    has_core = ~torch.isnan(core_size)
    frames = []
    for phase, mask, size, reached in (
        ("core", core_mask, core_size, ~torch.isnan(core_size)),
        ("refinement", ref_mask, refined_size, ref_reached & has_core),
    ):
        prof = _profile(mask, result)
        frame = pd.DataFrame(
            {
                "row": np.arange(mask.shape[0]).astype(object),
                "phase": phase,
                "reached": reached.numpy(),
                "end_size": size.double().numpy(),
                "end_relative_size": size.double().numpy() / n_cand,
                **prof,
                "relative_n_nodes": prof["n_nodes"] / n_cand,
            }
        )
        frames.append(frame)
    per_row = pd.concat(frames, ignore_index=True)
    value_cols = [c for c in per_row.columns if c not in ("row", "phase", "reached")]
    agg_lines = []
    rows_with_core = np.nonzero(has_core.numpy())[0]
    for phase in ("core", "refinement"):
        sel = per_row[
            (per_row["phase"] == phase)
            & per_row["row"].isin(rows_with_core)
            & (per_row["n_nodes"] > 0)
        ]
        line: dict[str, object] = {"row": "all", "phase": phase}
        line["reached"] = bool(sel["reached"].all()) if len(sel) else False
        for col in value_cols:
            line[col] = float(np.nanmedian(sel[col])) if sel[col].notna().any() else np.nan
        line["n_rows"] = len(sel)
        agg_lines.append(line)
    per_row["n_rows"] = 1
    out = pd.concat([per_row, pd.DataFrame(agg_lines)], ignore_index=True)
    out["core_nucleus"] = core_nucleus
    out["refined_nucleus"] = refined_nucleus
    return out
