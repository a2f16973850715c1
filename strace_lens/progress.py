"""Progress of long runs: when to show it, and how far a trace is inside a chunk.

When: ``progress=None`` (the default of ``trace``, ``trace_dataset`` and the CLI without
``--quiet``) shows bars on an interactive terminal and in a Jupyter notebook (tqdm.auto draws
a widget there), and nothing when stderr is not a terminal or a CI service says so
(``CI=true``, as GitHub Actions, GitLab and most CI services set it). ``progress=True`` shows
bars anywhere (in a log, tqdm writes a line at most every ``LOG_INTERVAL`` seconds);
``progress=False`` / ``--quiet`` shows nothing.

How far: a trace's work is counted in forward rows (one prompt under one mask), the unit every
search method and the final evaluation spend, all through ``SubgraphObjective``. Before
searching, ``run_trace`` announces the rows it expects (:func:`expect_rows`: the method's
estimate plus the exact evaluation rows) and each batched pass reports the rows it ran
(:func:`rows_ran`; a row with a gradient counts ``GRADIENT_ROW_COST`` rows). A
:class:`WorkMeter` active in the calling context turns these into the fraction done, so a
dataset run's bar advances inside a chunk (not only when a shard is written) and its ETA
moves with it. The plan is exact for the baselines and an estimate for the learned masks
(their local searches stop when nothing improves), so the fraction shown before the end stays
below ``BEFORE_DONE``. Edge-granularity traces (:mod:`strace_lens.edges`) do not report rows
yet: their chunks advance the bar when they finish.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from tqdm.auto import tqdm

#: the largest fraction shown before a trace has finished (its plan may be an estimate)
BEFORE_DONE = 0.99
#: a row run with a gradient counts as this many forward rows (forward + backward, the usual
#: rule of thumb: the backward pass costs about twice the forward)
GRADIENT_ROW_COST = 3
#: seconds between progress lines when stderr is not a terminal (``progress=True`` in a log)
LOG_INTERVAL = 30.0


def in_ci() -> bool:
    """Whether a CI service runs us: ``CI`` set to anything but empty/0/false/no."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def in_notebook() -> bool:
    """Whether we run in a Jupyter kernel (whose stderr is no terminal, but shows widgets)."""
    ipython = sys.modules.get("IPython")
    if ipython is None or "ipykernel" not in sys.modules:
        return False
    shell = ipython.get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def stderr_is_terminal() -> bool:
    """Whether stderr (where bars go) is an interactive terminal."""
    return sys.stderr.isatty()


def wants_progress(progress: bool | None) -> bool:
    """Whether to show progress: ``progress`` when given, else on an interactive terminal
    or in a notebook, never in CI."""
    if progress is not None:
        return bool(progress)
    if in_ci():
        return False
    return in_notebook() or stderr_is_terminal()


def progress_bar(total: float, desc: str, unit: str, show: bool, initial: float = 0) -> tqdm:
    """A tqdm.auto bar on stderr (a widget in notebooks), disabled when ``show`` is False;
    redrawn at most every ``LOG_INTERVAL`` seconds when stderr is not a terminal."""
    interactive = stderr_is_terminal() or in_notebook()
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        disable=not show,
        dynamic_ncols=True,
        mininterval=0.5 if interactive else LOG_INTERVAL,
    )


class WorkMeter:
    """Counts a trace's forward rows against the rows it expects and reports the fraction
    done (below ``BEFORE_DONE`` until :meth:`finish`) to ``report``."""

    def __init__(self, report: Callable[[float], None]) -> None:
        self.report = report
        self.expected = 0
        self.done = 0

    def expect(self, rows: int) -> None:
        self.expected += max(int(rows), 0)

    def ran(self, rows: int) -> None:
        self.done += int(rows)
        if self.expected > 0:
            self.report(min(self.done / self.expected, BEFORE_DONE))

    def finish(self) -> None:
        self.report(1.0)


_METER: ContextVar[WorkMeter | None] = ContextVar("strace_lens_work_meter", default=None)


@contextmanager
def metering(report: Callable[[float], None]) -> Iterator[WorkMeter]:
    """Count the rows of the traces run inside the block; ``report(fraction)`` after each
    batched pass (and 1.0 when the block ends without error)."""
    meter = WorkMeter(report)
    token = _METER.set(meter)
    try:
        yield meter
        meter.finish()
    finally:
        _METER.reset(token)


def expect_rows(rows: int) -> None:
    """Announce rows the running trace will evaluate (no-op without an active meter)."""
    meter = _METER.get()
    if meter is not None:
        meter.expect(rows)


def rows_ran(rows: int) -> None:
    """Report rows just evaluated (no-op without an active meter)."""
    meter = _METER.get()
    if meter is not None:
        meter.ran(rows)


@contextmanager
def trace_progress(progress: bool | None) -> Iterator[None]:
    """A bar in percent for one ``trace`` call, unless one is not wanted or an outer run
    (a dataset run's chunk) already counts this trace's rows."""
    if _METER.get() is not None or not wants_progress(progress):
        yield
        return
    with progress_bar(100, "tracing", "%", True) as bar:

        def report(fraction: float) -> None:
            bar.update(round(100 * fraction - bar.n, 6))  # update(): the ETA follows

        with metering(report):
            yield


class PromptBar:
    """A dataset run's bar, counting prompts: whole chunks as their shards are done, and the
    fraction of the chunk being traced in between (so its rate and ETA move inside a chunk).

    Use as a context manager; ``with bar.within(n): ...`` around a chunk's trace, then
    ``bar.done(n)`` once its shard is there (by this worker or another)."""

    def __init__(self, bar: tqdm) -> None:
        self.bar = bar
        self.whole = bar.n  # prompts whose shards are done

    def __enter__(self) -> PromptBar:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)

    def _move_to(self, n: float) -> None:
        # update() (not setting n) so that tqdm's smoothed rate, hence the ETA, follows
        self.bar.update(round(n - self.bar.n, 6))

    @contextmanager
    def within(self, n_prompts: int) -> Iterator[None]:
        """Advance through a chunk of ``n_prompts`` as its trace reports its rows."""
        with metering(lambda fraction: self._move_to(self.whole + fraction * n_prompts)):
            yield

    def done(self, n_prompts: int) -> None:
        """A chunk of ``n_prompts`` is finished: the bar stands at the whole prompts done."""
        self.whole += n_prompts
        self._move_to(self.whole)
        self.bar.n = self.whole  # a whole number again (fractions can leave float residue)


def prompt_bar(total: int, initial: int, show: bool) -> PromptBar:
    """The bar of a dataset run (see :class:`PromptBar`)."""
    return PromptBar(progress_bar(total, "tracing", "prompt", show, initial=initial))


__all__ = [
    "BEFORE_DONE",
    "GRADIENT_ROW_COST",
    "LOG_INTERVAL",
    "PromptBar",
    "WorkMeter",
    "expect_rows",
    "in_ci",
    "in_notebook",
    "metering",
    "progress_bar",
    "prompt_bar",
    "rows_ran",
    "stderr_is_terminal",
    "trace_progress",
    "wants_progress",
]
