"""Helpers shared by several test files: the dataset-run and command-line checks of the node,
edge and token granularities, and the node search objective of the search-level tests."""

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


def assert_refused(capsys, argv: list[str], message: str, out) -> None:
    """The command line ``argv`` is refused as bad input: exit status 2 (argparse's own errors,
    a flag's type, exit through SystemExit), one error line naming ``message``, no run
    folder ``out``."""
    from strace_lens.cli import main

    try:
        code = main(argv)
    except SystemExit as done:
        code = done.code
    assert code == 2
    assert_one_line_error(capsys.readouterr().err, message, out)


def cli_trace_args(prompts, out, *options: str) -> list[str]:
    """A quiet ``strace-lens trace`` command line on the tiny test model; ``options`` are the
    test's own flags (granularity, sizes, method, ...)."""
    return [
        "trace",
        "--model",
        "native:tiny",
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--quiet",
        *options,
    ]


def write_prompt_file(folder, prompts: list[str]):
    """``folder/prompts.txt``, one prompt a line (the command line's plain-text prompt file)."""
    path = folder / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    return path


def node_objective(model, prompts, ablation="mean", batch_size=None):
    """The node search's objective on ``prompts`` with every node a candidate (what the
    search-level tests of the growth, read-back, resumed rows, local search and memory use)."""
    import torch

    import strace_lens as sl
    from strace_lens.ablation import resolve_ablation
    from strace_lens.masked_forward import forward_logprobs
    from strace_lens.search.objective import SubgraphObjective

    graph = sl.NodeGraph.from_model(model)
    batch = sl.tokenize(model, prompts)
    with torch.no_grad():  # as trace computes it: the reference carries no graph
        logp_full = forward_logprobs(model, batch, [])
    abl = resolve_ablation(ablation, model, prompts, progress=False)
    cand = torch.ones(len(graph), dtype=torch.bool)
    return SubgraphObjective(model, graph, batch, logp_full, abl, cand, batch_size)
