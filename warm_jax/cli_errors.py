"""How every command-line tool reports an expected failure: one line on stderr, a non-zero exit.

A tool raises :class:`UserError` (or lets an expected exception through: a bad file, a missing
path, a corrupt checkpoint, a wrong value); :func:`guarded` turns it into ``error: MESSAGE`` on
stderr and exit status 1. The Python traceback is shown only with ``--verbose`` or
``WARM_JAX_VERBOSE=1``, for bug reports. Anything else (a bug) keeps its traceback.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable

VERBOSE_ENV = "WARM_JAX_VERBOSE"


class UserError(Exception):
    """An expected failure whose message already names the file, record, field or flag at fault."""


def expected_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean "bad input", not "bug": their message is the whole report."""
    from warm_jax.checkpoints.errors import CheckpointError

    return (UserError, CheckpointError, OSError, ValueError, KeyError, json.JSONDecodeError, EOFError)


def verbose_requested(argv: list[str] | None = None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return "--verbose" in argv or os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def describe(e: BaseException) -> str:
    """The message, with the file or missing field named where the exception carries it apart."""
    if isinstance(e, UserError):
        msg = str(e)
    elif isinstance(e, OSError) and e.filename is not None:
        msg = f"{e.filename}: {e.strerror or e}"
    elif isinstance(e, KeyError):
        msg = f"missing field {e}"
    else:
        msg = str(e) or type(e).__name__
    # One line: gin appends "In call to configurable ..." on lines of its own, which name no input.
    lines = [line.strip() for line in msg.splitlines()]
    return " ".join(line for line in lines if line and not line.startswith("In call to configurable")) or msg


def _leftover_of_aborted_read(unraisable) -> bool:
    """A report about work that a failed Orbax/TensorStore read left behind (its error is reported
    already): an orphaned read coroutine, or a TensorStore callback into the closed event loop of
    the aborted restore."""
    code = getattr(unraisable.object, "cr_code", None)
    if code is not None:
        return f"{os.sep}orbax{os.sep}" in code.co_filename
    tb = unraisable.exc_traceback
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return (
        unraisable.object is None
        and isinstance(unraisable.exc_value, RuntimeError)
        and str(unraisable.exc_value) == "Event loop is closed"
        and tb is not None
        and f"{os.sep}asyncio{os.sep}" in tb.tb_frame.f_code.co_filename
    )


def _quiet_aborted_reads() -> None:
    """Drops, from now on, Python's reports ("Exception ignored in ...", bare tracebacks) of the work that
    an aborted Orbax read leaves behind: one per orphaned coroutine or callback, printed when it is
    collected or fires, which may be at exit, after our error line. Other reports go on as before."""
    previous = sys.unraisablehook
    if getattr(previous, "warm_jax_quiet", False):
        return

    def hook(unraisable):
        if not _leftover_of_aborted_read(unraisable):
            previous(unraisable)

    hook.warm_jax_quiet = True
    sys.unraisablehook = hook


def guarded(fn: Callable[[], int | None], *, verbose: bool = False) -> int:
    """Runs ``fn``; an expected failure becomes ``error: ...`` on stderr and exit status 1.

    Without ``verbose``, absl's warnings (Orbax's notes on every read-only open) and Python's reports
    of what an aborted Orbax read left behind are not shown: stderr holds our warnings and the error.
    """
    verbose = verbose or verbose_requested([])
    try:
        from absl import logging as absl_logging

        absl = absl_logging.get_absl_logger()
    except ImportError:  # pragma: no cover (absl comes with Orbax)
        absl = logging.getLogger("absl-unused")
    level = absl.level
    if not verbose:
        absl.setLevel(logging.ERROR)
        _quiet_aborted_reads()
    try:
        rc = fn()
    except expected_errors() as e:
        if verbose:
            traceback.print_exc()
        print(f"error: {describe(e)}", file=sys.stderr)
        rc = 1
    finally:
        absl.setLevel(level)
    if rc == 1 and not verbose:
        gc.collect()  # report (and drop) the orphaned reads now, not at exit
    return 0 if rc is None else rc
