"""Progress of long steps: named, counted and timed where they run, shown by whoever listens.

Library code marks its long steps with :func:`step`::

    with step("verify: fixed model on emulate", total=len(inputs)) as advance:
        for item in inputs:
            ...
            advance()

Work that runs deeper than the step, or whose size is known only once it started, counts with
:func:`advance` and :func:`set_total`, which act on the innermost running step (ONNX Runtime runs
inside :func:`fp16guard.onnx_ranges.value_ranges`, bisect's bound once its cuts are known).

With no listener (the Python API) a step only logs its start and duration at INFO level on the
``fp16guard`` logger. The command line installs a :class:`RichProgress` with :func:`reporting`:
when stderr is a terminal it draws each running step there (spinner, description, bar, count,
elapsed time, time remaining) and clears it when the step ends; on a pipe or a CI log it writes one
line per finished step to stderr (``done  <description> (<count>)  <seconds> s``). Lines printed
on stdout while a step is drawn go through :func:`echo`, so they do not tear the display.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from typing import Callable, Iterator, Protocol

log = logging.getLogger("fp16guard")


class Reporter(Protocol):
    """Who shows steps: :meth:`start` returns a handle that the other methods take."""

    def start(self, description: str, total: int | None) -> object:
        """Show a step (``total`` units, or None for a spinner); return its handle."""

    def advance(self, handle: object, n: int) -> None:
        """Count ``n`` more units of the step ``handle``."""

    def set_total(self, handle: object, total: int) -> None:
        """The step ``handle`` turns out to have ``total`` units."""

    def finish(self, handle: object, seconds: float, ok: bool) -> None:
        """The step ``handle`` ended after ``seconds`` (wall time); ``ok`` False when it raised."""


_reporter: contextvars.ContextVar[Reporter | None] = contextvars.ContextVar("fp16guard_progress", default=None)
#: ``(reporter, handle)`` of the innermost running step, for :func:`advance` and :func:`set_total`.
_current: contextvars.ContextVar[tuple[Reporter, object] | None] = contextvars.ContextVar(
    "fp16guard_step", default=None)


@contextlib.contextmanager
def step(description: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
    """A named step of long work; yields ``advance(n=1)`` to count ``total`` units (inputs, cuts).

    Args:
        description: what runs, for a reader ("calibration: FP32 activation ranges on 3 inputs").
        total: units of work, or None for a spinner with elapsed time only (until
            :func:`set_total` gives it one).
    """
    reporter = _reporter.get()
    t0 = time.perf_counter()
    log.info("%s ...", description)
    handle = reporter.start(description, total) if reporter is not None else None
    token = _current.set((reporter, handle) if reporter is not None else None)

    def count(n: int = 1) -> None:
        """Count ``n`` units of this step."""
        if reporter is not None:
            reporter.advance(handle, n)

    ok = False
    try:
        yield count
        ok = True
    finally:
        _current.reset(token)
        seconds = time.perf_counter() - t0
        if reporter is not None:
            reporter.finish(handle, seconds, ok)
        log.info("%s: %s in %.1f s", description, "done" if ok else "stopped", seconds)


def advance(n: int = 1) -> None:
    """Count ``n`` units of the innermost running step (nothing outside a step or a listener)."""
    current = _current.get()
    if current is not None:
        current[0].advance(current[1], n)


def set_total(total: int) -> None:
    """Give the innermost running step its ``total`` units, once the work knows its size."""
    current = _current.get()
    if current is not None:
        current[0].set_total(current[1], total)


def echo(console, *objects, **kwargs) -> None:
    """``console.print(*objects, **kwargs)``, above the live progress display when one is drawn on
    the same terminal (a stdout line printed under a stderr display would tear it)."""
    reporter = _reporter.get()
    above = getattr(reporter, "print_above", None)
    if above is not None:
        above(console, *objects, **kwargs)
    else:
        console.print(*objects, **kwargs)


@contextlib.contextmanager
def reporting(reporter: Reporter | None) -> Iterator[None]:
    """Send the steps run inside this block to ``reporter`` (None: log only)."""
    token = _reporter.set(reporter)
    try:
        yield
    finally:
        _reporter.reset(token)


class RichProgress:
    """A :class:`Reporter` drawing with ``rich.progress`` on a console (stderr for the CLI).

    On a terminal each running step is a row (spinner, description cut to fit, bar, ``M/N``,
    elapsed, ``eta``), removed when the step ends. Elsewhere nothing is drawn and each step that
    ends normally leaves one line, ``done  <description> (<M/N>)  <seconds> s``. Use as a context
    manager.
    """

    def __init__(self, console) -> None:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)
        from rich.table import Column
        from rich.text import Text

        class Count(MofNCompleteColumn):
            """``M/N``; ``M`` alone for a step without a total, nothing before the first unit."""

            def render(self, task) -> Text:
                """The count of ``task`` (rich's column protocol)."""
                if task.total is None:
                    return Text(str(int(task.completed)) if task.completed else "", style="progress.download")
                return super().render(task)

        class Eta(TimeRemainingColumn):
            """``eta H:MM:SS`` once a counted step has a rate; nothing otherwise."""

            def render(self, task) -> Text:
                """The ETA of ``task`` (rich's column protocol)."""
                if task.total is None or task.time_remaining is None:
                    return Text("")
                return Text.assemble("eta ", super().render(task))

        self.console = console
        self.live = console.is_terminal
        description = TextColumn("{task.description}", table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis"))
        self.progress = Progress(SpinnerColumn(), description, BarColumn(bar_width=20), Count(), TimeElapsedColumn(),
                                 Eta(), console=console, transient=True, expand=True, disable=not self.live)

    def __enter__(self) -> "RichProgress":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def _task(self, handle: object):
        return next(t for t in self.progress.tasks if t.id == handle)

    def start(self, description: str, total: int | None) -> object:
        """A rich task for the step (see :class:`Reporter`)."""
        return self.progress.add_task(description, total=total)

    def advance(self, handle: object, n: int) -> None:
        """Advance the step's task; a count past its total raises the total (see :class:`Reporter`)."""
        self.progress.advance(handle, n)  # type: ignore[arg-type]
        task = self._task(handle)
        if task.total is not None and task.completed > task.total:
            self.progress.update(handle, total=task.completed)  # type: ignore[arg-type]

    def set_total(self, handle: object, total: int) -> None:
        """Set the step's total (see :class:`Reporter`)."""
        self.progress.update(handle, total=max(total, self._task(handle).completed))  # type: ignore[arg-type]

    def finish(self, handle: object, seconds: float, ok: bool = True) -> None:
        """Remove the step's task; off a terminal, a step that ended normally leaves its line."""
        from rich.text import Text

        task = self._task(handle)
        self.progress.remove_task(handle)  # type: ignore[arg-type]
        if self.live:  # cleared now, not at the next tick: the report may follow on stdout at once
            self.progress.refresh()
        elif ok:
            done = int(task.completed)
            count = f" ({done}/{int(task.total)})" if task.total is not None else (f" ({done})" if done else "")
            self.console.print(Text(f"done  {task.description}{count}  {seconds:.1f} s"), soft_wrap=True)

    def print_above(self, console, *objects, **kwargs) -> None:
        """Print on ``console``; when the display is live and ``console`` is a terminal too, through
        the display's console, above the running steps (see :func:`echo`)."""
        if self.live and console.is_terminal:
            self.console.print(*objects, **kwargs)
        else:
            console.print(*objects, **kwargs)
