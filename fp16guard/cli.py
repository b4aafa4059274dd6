"""The ``fp16guard`` command line (argparse + rich): its entry point and its one error path.

Commands: ``inspect`` (activation ranges), ``bisect`` (first module whose FP16 execution breaks the
output), ``calibrate`` (write a rewrite plan), ``fix`` (rewrite, convert to typed FP16, verify),
``export`` (OpenMMLab models through mmdeploy's torch2onnx with fp16guard's rewriters),
``fetch-examples``. Exit status: 0 clean, 1 FP16 overflow / an offender found / a fixed model that
still overflows, 2 bad usage (missing file, unreadable model, wrong input, unknown or missing
backend, a model that cannot be split): each :class:`~fp16guard.errors.Fp16GuardError` carries its
status. Anything else is a bug and ends in a traceback.

This module runs a command line (:func:`main`, :func:`console_main`: logging, the outputs, the
exit status); the rest has a module each: the argument declarations (:mod:`fp16guard.cli_parser`),
the checks of the options before any work (:mod:`fp16guard.cli_checks`), the model and inputs a
command line names (:mod:`fp16guard.cli_models`) and what each command does
(:mod:`fp16guard.cli_commands`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from fp16guard.cli_checks import check_options
from fp16guard.cli_parser import EXAMPLE_NAMES, build_parser
from fp16guard.errors import Fp16GuardError, UsageError

#: Exit status of an internal error (a bug: fp16guard's or a library's), printed with its traceback.
EXIT_INTERNAL = 3

__all__ = ["EXAMPLE_NAMES", "EXIT_INTERNAL", "console_main", "main"]


#: Loggers of libraries whose warnings say nothing to a user of fp16guard (the ONNX exporter's
#: "torchvision is not installed", torch.export's deserialization traceback): quiet unless -v.
QUIET_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "torch.fx.experimental.symbolic_shapes", "onnxscript")


@contextlib.contextmanager
def _verbose_log(verbose: bool):
    """With ``verbose``, INFO records of every logger (fp16guard's steps, libraries' warnings) go
    to stderr for the block; the root logger is as it was after it (one command's ``-v`` does not
    leak into the next ``main`` call of the same process)."""
    if not verbose:
        yield
        return
    root = logging.getLogger()
    level = root.level
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        root.removeHandler(handler)
        root.setLevel(level)


class _StderrHandler(logging.StreamHandler):
    """A log handler that writes to whatever ``sys.stderr`` is when a record is emitted (the one
    ``-v`` installs, once): a handler bound to the stream of its day would write to a closed
    stream after ``main`` ran under a redirected stderr (tests, notebooks)."""

    @property
    def stream(self):
        """The current ``sys.stderr``."""
        return sys.stderr

    @stream.setter
    def stream(self, value):
        """Ignored: the stream is always the current ``sys.stderr``."""


def _quiet_libraries(verbose: bool) -> None:
    """Log fp16guard's steps with ``verbose``; otherwise silence third-party loggers (warnings are
    routed in :func:`main`)."""
    if verbose:
        return
    import torch  # every command but fetch-examples imports it anyway; its import resets its loggers' levels

    torch._logging.set_logs(onnx=logging.ERROR, export=logging.ERROR)  # documented: torch._logging.set_logs
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


#: errno values of a disk that cannot take an output: no space, over quota, too large, read-only.
DISK_ERRORS = {28, 122, 27, 30}  # ENOSPC, EDQUOT, EFBIG, EROFS (Linux numbers; see errno)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the command line; returns the exit status.

    An :class:`~fp16guard.errors.Fp16GuardError` (bad usage or input, a command-line error from
    argparse too) is printed as one line on stderr and exits with its ``exit_code`` (2 for usage
    and input errors, 1 for a fixed model that still overflows); any other exception propagates
    with its traceback (:func:`console_main` turns it into exit status 3).
    """
    try:
        args = build_parser().parse_args(argv)
        verbose, quiet = getattr(args, "verbose", False), getattr(args, "quiet", False)
        if verbose and quiet:
            raise UsageError("-v and -q contradict each other; give one")
        import warnings

        if not verbose:  # with -v, libraries' warnings go through the log (_verbose_log)
            warnings.simplefilter("ignore")  # libraries' notes (numpy, matplotlib, torch): stderr holds fp16guard's lines
        if os.getcwd() not in sys.path and "" not in sys.path:
            # package.module:factory from the current folder, as `python -m` finds it (a console script does not)
            sys.path.insert(0, os.getcwd())
        check_options(args)  # before any work, and before torch loads: a wrong option is known at once
        if args.command != "fetch-examples":
            _quiet_libraries(verbose)
        from rich.console import Console

        console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 150)
        args.progress = Console(stderr=True) if not quiet else None  # steps drawn on stderr, on a terminal
        from fp16guard.cli_commands import COMMANDS
        from fp16guard.progress import RichProgress, reporting

        from fp16guard.cli_stream import process_group
        from fp16guard.files import terminate_as_interrupt

        with contextlib.ExitStack() as stack:
            stack.enter_context(_verbose_log(verbose))
            stack.enter_context(terminate_as_interrupt())  # SIGTERM unwinds like Ctrl-C: no partial output
            # every output renamed into place at the end, or none; under torchrun by rank 0 alone
            args.outputs = stack.enter_context(process_group(args, console))
            reporter = stack.enter_context(RichProgress(args.progress)) if args.progress is not None else None
            stack.enter_context(reporting(reporter))
            try:
                return COMMANDS[args.command](args, console)
            except OSError as e:
                if e.errno not in DISK_ERRORS:
                    raise
                from fp16guard.errors import OutputError

                raise OutputError(f"cannot write the output: {e.strerror}"
                                  f"{f' ({Path(e.filename).name})' if e.filename else ''}; free space or write "
                                  f"elsewhere (nothing was written)") from None
    except Fp16GuardError as e:
        print(f"fp16guard: error: {e}", file=sys.stderr)
        return e.exit_code


def console_main() -> None:
    """The ``fp16guard`` console script: :func:`main`, with an internal error (anything that is not
    an :class:`~fp16guard.errors.Fp16GuardError`) printed with its traceback and exit status
    :data:`EXIT_INTERNAL` (3), so a crash never reads as "overflow found" (1) or "bad usage" (2)."""
    import traceback

    try:
        code = main()
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (fp16guard.files.Terminated): outputs removed
        signum = getattr(e, "signum", 2)
        print(f"fp16guard: {'interrupted' if signum == 2 else 'terminated'}; nothing was written", file=sys.stderr)
        code = 128 + signum
    except Exception:  # noqa: BLE001 - a bug: show everything, then a distinct status
        traceback.print_exc()
        print(f"fp16guard: internal error (exit {EXIT_INTERNAL}): the traceback above is a bug of fp16guard or of a "
              f"library it called; please report it with the command line", file=sys.stderr)
        code = EXIT_INTERNAL
    sys.exit(code)


if __name__ == "__main__":
    console_main()
