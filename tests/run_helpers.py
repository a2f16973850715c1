"""Helpers shared by the dataset-run and command-line tests of the edge and token
granularities (tests/test_edge_stack.py, tests/test_token_granularity.py)."""

from __future__ import annotations

from strace_lens import trace


def count_chunks(monkeypatch, fail_on: int | None = None) -> list[int]:
    """Count chunk traces (running the real trace); raise KeyboardInterrupt, as a kill
    would stop the run, when chunk number ``fail_on`` starts."""
    import strace_lens.dataset as ds

    calls: list[int] = []

    def counting(model, prompts, **kw):
        if fail_on is not None and len(calls) == fail_on:
            raise KeyboardInterrupt
        calls.append(len(prompts))
        return trace(model, prompts, **kw)

    monkeypatch.setattr(ds, "_trace_function", lambda: counting)
    return calls


def assert_one_line_error(err: str, message: str, out) -> None:
    """A refused command: one ``strace-lens: error:`` line naming ``message``, and no run
    folder ``out`` created."""
    assert err.startswith("strace-lens: error:") and message in err and err.count("\n") == 1
    assert not out.exists()
