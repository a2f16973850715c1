"""``strace_lens.load(path)``: read back whatever strace-lens saved in a folder.

A folder written by ``TraceResult.save`` (``result.json`` + ``result.safetensors``) is read by
``TraceResult.load``; one written by ``EdgeTraceResult.save`` (``edges.json`` +
``edges.safetensors``) by ``EdgeTraceResult.load``; one written by ``TokenTraceResult.save``
(``token.json`` + ``token.safetensors``) by ``TokenTraceResult.load``; a ``trace_dataset``
run folder (``manifest.json`` + shards) by ``load_run``, which joins its shards into one
result of the run's granularity. This module sits above all four, so the result containers
do not need to know about dataset runs.
"""

from __future__ import annotations

import os
from pathlib import Path

from strace_lens.dataset import MANIFEST_FILE, load_run
from strace_lens.edges.result import META_FILE as EDGE_META_FILE
from strace_lens.edges.result import EdgeTraceResult
from strace_lens.result import META_FILE, TraceResult
from strace_lens.token_trace.result import META_FILE as TOKEN_META_FILE
from strace_lens.token_trace.result import TokenTraceResult


def load(path: str | os.PathLike[str]) -> TraceResult | EdgeTraceResult | TokenTraceResult:
    """The result saved in folder ``path``: a single result or a dataset run, at node
    granularity (``TraceResult``), token granularity (``TokenTraceResult``) or edge
    granularity (``EdgeTraceResult``)."""
    folder = Path(path)
    if (folder / EDGE_META_FILE).exists():
        return EdgeTraceResult.load(folder)
    if (folder / TOKEN_META_FILE).exists():
        return TokenTraceResult.load(folder)
    if (folder / MANIFEST_FILE).exists() and not (folder / META_FILE).exists():
        return load_run(folder)
    return TraceResult.load(folder)


__all__ = ["load"]
