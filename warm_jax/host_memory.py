"""Transparent huge pages for host memory: ``python -m warm_jax.train`` re-runs itself with them, once.

XLA:CPU gives every execution of a compiled program fresh temporary buffers (about 100 MB for the
quickstart-sized reward-model step, 3.8 GB at SmolLM2-135M) that glibc maps with ``mmap`` and unmaps
afterwards, so every step faults all of it in again, 4 KB at a time (26k and 977k page faults per
step). glibc's ``glibc.malloc.hugetlb=1`` tunable makes malloc ask the kernel for transparent huge
pages (``madvise``) on such mappings: 2 MB pages, 70-230x fewer faults. Measured on the 2-core CPU
machine (BENCHMARKS.md): the tiny RM step 1.33x faster, the 135M one 1.12x, the quickstart 490 -> 443 s,
with the same peak memory and the same results. On GPUs and TPUs the step buffers live on the device;
only host-side allocations change there (not measured).

glibc reads tunables only when a process starts, so the programs in ``PROGRAMS`` re-execute
themselves once, with ``GLIBC_TUNABLES`` extended, before anything heavy is imported (the hook is in
``warm_jax/__init__.py``). Nothing happens when the kernel has transparent huge pages off, on another
C library, when ``GLIBC_TUNABLES`` already sets it, or with ``WARM_JAX_HUGEPAGES=0``. Not for
``warm_jax.average``: its merge + write of K = 4 SmolLM2-sized members took 3.4-5.0 s with huge pages
against 2.3-2.6 s without (its host buffers are filled once, not re-faulted step after step).
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "WARM_JAX_HUGEPAGES"  # "0": leave the allocator alone
_DONE = "WARM_JAX_REEXECUTED"  # set in the re-executed process: never a second time
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"
_MIN_GLIBC = (2, 35)  # the first glibc with glibc.malloc.hugetlb
PROGRAMS = ("warm_jax.train",)  # measured faster with it (BENCHMARKS.md); sampling is even


def thp_mode(path: str = _THP_MODE) -> str | None:
    """The kernel's transparent-huge-page mode ('always', 'madvise', 'never'), None if unknown."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def _glibc_version() -> tuple[int, ...] | None:
    name, version = platform.libc_ver()
    if name != "glibc":
        return None
    try:
        return tuple(int(x) for x in version.split("."))
    except ValueError:
        return None


def tunables(
    environ: Mapping[str, str] | None = None,
    *,
    glibc: tuple[int, ...] | None | str = "detect",
    thp: str | None = "detect",
) -> str | None:
    """The ``GLIBC_TUNABLES`` value a training job should run with, or None to leave it as is.

    ``glibc`` and ``thp`` default to this machine's (tests pass their own).
    """
    environ = os.environ if environ is None else environ
    glibc = _glibc_version() if glibc == "detect" else glibc
    thp = thp_mode() if thp == "detect" else thp
    current = environ.get("GLIBC_TUNABLES", "")
    if environ.get(OPT_OUT) == "0" or not sys.platform.startswith("linux"):
        return None
    if glibc is None or glibc < _MIN_GLIBC or thp not in ("always", "madvise"):
        return None
    if any(item.split("=")[0] == TUNABLE for item in current.split(":")):
        return None  # the user chose already
    return f"{current}:{TUNABLE}=1" if current else f"{TUNABLE}=1"


def environ_with_hugepages(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of ``environ`` (default os.environ) as ``python -m warm_jax.train`` runs with it."""
    env = dict(os.environ if environ is None else environ)
    value = tunables(env)
    if value is not None:
        env["GLIBC_TUNABLES"] = value
    return env


def reexec_with_hugepages() -> None:
    """Replaces this process by the same command line with huge-page malloc, when ``tunables``
    says so; returns (and the program goes on as it is) otherwise, or when exec fails."""
    if os.environ.get(_DONE) or tunables() is None:
        return
    env = dict(environ_with_hugepages(), **{_DONE: "1"})
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:
        return


def module_run(orig_argv: list[str]) -> str | None:
    """The module a ``python [options] -m MODULE ...`` command line runs, else None."""
    args = iter(orig_argv[1:])
    for arg in args:
        if arg == "-m":
            return next(args, None)
        if arg.startswith("-m"):
            return arg[2:]
        if arg in ("-W", "-X"):  # interpreter options that take a value
            next(args, None)
        elif arg == "-c" or not arg.startswith("-"):
            return None  # a -c program or a script
    return None


def started_as_program() -> bool:
    """True while runpy imports the warm_jax package for ``python -m`` one of ``PROGRAMS``."""
    return sys.argv[:1] == ["-m"] and module_run(getattr(sys, "orig_argv", [])) in PROGRAMS


def describe() -> str:
    """One line on this process's setting, for the job's log."""
    value = os.environ.get("GLIBC_TUNABLES", "")
    on = any(item == f"{TUNABLE}=1" for item in value.split(":"))
    why = "re-executed with it" if os.environ.get(_DONE) else "as started"
    if on:
        return f"host malloc: transparent huge pages (GLIBC_TUNABLES={value}; {why})"
    return (
        f"host malloc: glibc default pages (transparent huge pages: {thp_mode()}; {OPT_OUT}={os.environ.get(OPT_OUT)})"
    )
