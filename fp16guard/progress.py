"""Progress of long steps: named, counted and timed where they run, shown by whoever listens.

Library code marks its long steps with :func:`step`::

    with step("verify: fixed model on emulate", total=len(inputs)) as advance:
        for item in inputs:
            ...
            advance()

With no listener (the Python API) a step only logs its start and duration at INFO level on the
``fp16guard`` logger. The command line installs a :class:`RichProgress` with :func:`reporting`,
which draws each running step on stderr (spinner, description, count, elapsed time) when stderr is
a terminal, and leaves a one-line record of each finished step; on a pipe or a CI log it draws
nothing, so stdout holds only the report and stderr only errors.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from typing import Callable, Iterator, Protocol

log = logging.getLogger("fp16guard")


class Reporter(Protocol):
    """Who shows steps: :meth:`start` returns a handle that :meth:`advance` and :meth:`finish` take."""

    def start(self, description: str, total: int | None) -> object:
        """Show a step (``total`` units, or None for a spinner); return its handle."""

    def advance(self, handle: object, n: int) -> None:
        """Count ``n`` more units of the step ``handle``."""

    def finish(self, handle: object, seconds: float) -> None:
        """The step ``handle`` ended after ``seconds`` (wall time)."""


_reporter: contextvars.ContextVar[Reporter | None] = contextvars.ContextVar("fp16guard_progress", default=None)


@contextlib.contextmanager
def step(description: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
    """A named step of long work; yields ``advance(n=1)`` to count ``total`` units (inputs, cuts).

    Args:
        description: what runs, for a reader ("calibration: FP32 activation ranges on 3 inputs").
        total: units of work, or None for a spinner with elapsed time only.
    """
    reporter = _reporter.get()
    t0 = time.perf_counter()
    log.info("%s ...", description)
    handle = reporter.start(description, total) if reporter is not None else None

    def advance(n: int = 1) -> None:
        """Count ``n`` units of this step."""
        if reporter is not None:
            reporter.advance(handle, n)

    try:
        yield advance
    finally:
        seconds = time.perf_counter() - t0
        if reporter is not None:
            reporter.finish(handle, seconds)
        log.info("%s: done in %.1f s", description, seconds)


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

    Live drawing happens only when the console is a terminal; each finished step then leaves
    ``done  <description>  <seconds>`` above the live area. Use as a context manager.
    """

    def __init__(self, console) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.console = console
        self.live = console.is_terminal
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=20),
                                 MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True,
                                 disable=not self.live)

    def __enter__(self) -> "RichProgress":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def start(self, description: str, total: int | None) -> object:
        """A rich task for the step (see :class:`Reporter`)."""
        return self.progress.add_task(description, total=total)

    def advance(self, handle: object, n: int) -> None:
        """Advance the step's task (see :class:`Reporter`)."""
        self.progress.advance(handle, n)  # type: ignore[arg-type]

    def finish(self, handle: object, seconds: float) -> None:
        """Remove the step's task; on a terminal, leave ``done <description> <seconds>``."""
        task = next(t for t in self.progress.tasks if t.id == handle)
        self.progress.remove_task(handle)  # type: ignore[arg-type]
        if self.live:
            self.progress.console.print(f"[dim]done[/]  {task.description}  [dim]{seconds:.1f} s[/]")
