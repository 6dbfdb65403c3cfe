"""How every command-line tool reports an expected failure: one line on stderr, a non-zero exit.

A tool raises :class:`UserError` (or lets an expected exception through: a bad file, a missing
path, a corrupt checkpoint, a wrong value); :func:`guarded` turns it into ``error: MESSAGE`` on
stderr and exit status 1. The Python traceback is shown only with ``--verbose`` or
``WARM_JAX_VERBOSE=1``, for bug reports. Anything else (a bug) keeps its traceback.
"""

from __future__ import annotations

import json
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
    return msg


def guarded(fn: Callable[[], int | None], *, verbose: bool = False) -> int:
    """Runs ``fn``; an expected failure becomes ``error: ...`` on stderr and exit status 1."""
    try:
        rc = fn()
    except expected_errors() as e:
        if verbose:
            traceback.print_exc()
        print(f"error: {describe(e)}", file=sys.stderr)
        return 1
    return 0 if rc is None else rc
