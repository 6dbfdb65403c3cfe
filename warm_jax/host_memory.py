"""Transparent huge pages for host memory: an explicit opt-in for CPU training jobs.

XLA:CPU gives every execution of a compiled program fresh temporary buffers (about 100 MB for the
quickstart-sized reward-model step, 3.8 GB at SmolLM2-135M) that glibc maps with ``mmap`` and unmaps
afterwards, so every step faults all of it in again, 4 KB at a time. glibc's
``glibc.malloc.hugetlb=1`` tunable makes malloc ask the kernel for transparent huge pages
(``madvise``) on such mappings: 2 MB pages, 70-230x fewer faults (BENCHMARKS.md has the speed-ups on
a 2-core CPU; results are unchanged). On GPUs and TPUs the step buffers live on the device, so the
setting buys nothing there.

glibc reads tunables only when a process starts, so ``warm-train --host_hugepages`` (or
``WARM_JAX_HUGEPAGES=1``) re-executes the command once, with ``GLIBC_TUNABLES`` extended, before jax
is imported. Nothing happens on another C library, a glibc without the tunable, a kernel with
transparent huge pages off, or when ``GLIBC_TUNABLES`` already sets it. Importing warm_jax never
re-executes anything.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb"
OPT_IN = "WARM_JAX_HUGEPAGES"  # "1": ask for huge pages (as --host_hugepages does)
_DONE = "WARM_JAX_REEXECUTED"  # set in the re-executed process: never a second time
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"
_MIN_GLIBC = (2, 35)  # the first glibc with glibc.malloc.hugetlb


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
    if not sys.platform.startswith("linux"):
        return None
    if glibc is None or glibc < _MIN_GLIBC or thp not in ("always", "madvise"):
        return None
    if any(item.split("=")[0] == TUNABLE for item in current.split(":")):
        return None  # the user chose already
    return f"{current}:{TUNABLE}=1" if current else f"{TUNABLE}=1"


def requested(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the environment opts in (``WARM_JAX_HUGEPAGES=1``)."""
    return (os.environ if environ is None else environ).get(OPT_IN) == "1"


def environ_with_hugepages(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of ``environ`` (default os.environ) with the tunable added where this machine has it."""
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


def describe() -> str:
    """One line on this process's setting, for the job's log."""
    value = os.environ.get("GLIBC_TUNABLES", "")
    on = any(item == f"{TUNABLE}=1" for item in value.split(":"))
    why = "re-executed with it" if os.environ.get(_DONE) else "as started"
    if on:
        return f"host malloc: transparent huge pages (GLIBC_TUNABLES={value}; {why})"
    return f"host malloc: glibc default pages (transparent huge pages: {thp_mode()}; opt in with --host_hugepages)"
