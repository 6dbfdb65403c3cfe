"""Atomic file and directory writes: nothing half-written where a finished result is expected.

A directory is replaced in three renames, each atomic: the new content is written completely into
a temporary sibling ``.NAME.tmp-*``; the old ``NAME`` (if any) is renamed to ``.NAME.old-*``; the
temporary is renamed to ``NAME``; only then is the old one removed (renamed to ``.NAME.del-*``
first, so that an ``.old-*`` sibling is always complete). A crash at any point leaves the old or the
new content at ``NAME``, or (between the first two renames) ``NAME`` missing and the complete old
one beside it: :func:`recover` (called by every writer before it starts and by the readers of
params checkpoints) puts it back.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Mapping

import numpy as np

log = logging.getLogger(__name__)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Writes ``data`` to a temporary sibling, syncs it, then renames it to ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode())


class StaleArraysError(ValueError):
    """A per-example file is missing or does not match the SHA-256 its stage's JSON recorded."""


def write_arrays(path: str, arrays: Mapping[str, np.ndarray]) -> str:
    """Writes ``arrays`` as an uncompressed .npz at ``path`` atomically; returns the file's SHA-256."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def read_arrays(path: str, sha256: str | None = None) -> dict[str, np.ndarray]:
    """The arrays of an .npz from ``write_arrays``; with ``sha256``, refuses a file whose bytes differ."""
    if not os.path.isfile(path):
        raise StaleArraysError(f"{path}: missing")
    with open(path, "rb") as f:
        data = f.read()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise StaleArraysError(f"{path}: does not match the SHA-256 its results file recorded")
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def atomic_write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str):
    """The parsed JSON file; a parse error names the file (``json.JSONDecodeError``, a ValueError)."""
    with open(path) as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise json.JSONDecodeError(f"{path}: not valid JSON: {e.msg}", e.doc, e.pos) from None


# ----------------------------------------------------------------------------- directories


def _sibling_pattern(path: str, tag: str) -> re.Pattern:
    return re.compile(rf"\.{re.escape(os.path.basename(path))}\.{tag}-(\d+)-[0-9a-f]{{8}}")


def _siblings(path: str, tag: str) -> list[str]:
    """``.NAME.<tag>-<time_ns>-<hex>`` siblings of ``path``, oldest first."""
    parent = os.path.dirname(path)
    pattern = _sibling_pattern(path, tag)
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    found = [(int(m.group(1)), n) for n in names if (m := pattern.fullmatch(n))]
    return [os.path.join(parent, n) for _, n in sorted(found)]


def _new_sibling(path: str, tag: str) -> str:
    parent, base = os.path.split(path)
    return os.path.join(parent, f".{base}.{tag}-{time.time_ns()}-{uuid.uuid4().hex[:8]}")


def recover(path: str) -> bool:
    """Puts back a complete old copy of ``path`` (or of a missing ancestor) that an interrupted
    :func:`replace_directory` moved aside. Safe to call from any process, any number of times; a
    failure (e.g. a read-only file system) only logs. Returns whether anything was put back."""
    path = os.path.abspath(path)
    parts = []
    p = path
    while True:
        parts.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    restored = False
    for p in reversed(parts):  # the shallowest missing directory first
        if os.path.lexists(p):
            continue
        olds = _siblings(p, "old")
        if not olds:
            return restored
        try:
            os.rename(olds[-1], p)
        except OSError as e:
            if not os.path.lexists(p):  # not another process that put it back first
                log.warning("%s is missing; could not restore it from %s: %s", p, olds[-1], e)
                return restored
        else:
            log.warning("%s was missing after an interrupted replace; restored the previous copy %s", p, olds[-1])
            restored = True
    return restored


def _remove_stale(path: str) -> None:
    """Leftovers of interrupted replaces: ``.del-*`` (half-deleted) and, once ``path`` holds a
    complete directory, the ``.old-*`` copies that it superseded."""
    stale = _siblings(path, "del") + (_siblings(path, "old") if os.path.isdir(path) else [])
    for d in stale:
        shutil.rmtree(d, ignore_errors=True)


def output_directory(path: str, *, overwrite: bool = False) -> str:
    """The resolved (absolute, symlinks followed) path of an output directory, checked up front.

    Puts back a copy moved aside by an interrupted replace first. Raises FileExistsError when
    ``path`` is a regular file (never replaced), or when it exists and ``overwrite`` is False;
    NotADirectoryError when one of its parents is a file.
    """
    path = os.path.realpath(path)
    recover(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"output {path} is a file, not a directory; remove it or choose another output path")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise NotADirectoryError(f"output {path}: its parent {parent} is a file, not a directory")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"output {path} already exists (pass --overwrite to replace it)")
    return path


def replace_directory(src: str, dst: str) -> None:
    """Puts the complete directory ``src`` at ``dst`` atomically, replacing any directory there.

    The old ``dst`` is renamed aside before and removed only after ``src`` is renamed in; if that
    rename fails, the old one is renamed back. ``src`` and ``dst`` must be on one file system.
    """
    dst = os.path.abspath(dst)
    old = None
    if os.path.lexists(dst):
        if not os.path.isdir(dst) or os.path.islink(dst):
            raise FileExistsError(f"output {dst} is not a directory; refusing to replace it")
        old = _new_sibling(dst, "old")
        os.rename(dst, old)
    try:
        os.rename(src, dst)
    except BaseException:
        if old is not None:
            try:
                os.rename(old, dst)
            except OSError as e:  # recover() puts it back next time
                log.warning("could not put %s back at %s: %s", old, dst, e)
        raise
    if old is not None:
        trash = _new_sibling(dst, "del")
        try:
            os.rename(old, trash)
        except OSError as e:  # harmless: removed by the next write of dst
            log.warning("could not remove the previous %s (kept as %s): %s", dst, old, e)
            return
        shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: str, *, overwrite: bool = False):
    """Yields a temporary sibling directory that replaces ``path`` (``replace_directory``) on success.

    On an exception ``path`` is untouched and the temporary is removed; a crash leaves ``path``
    old or new (or its old copy for :func:`recover`), and at worst a ``.NAME.tmp*`` sibling. With
    several jax processes every process writes into the same temporary (its name is
    deterministic) and process 0 alone prepares and renames it, between barriers.
    """
    import jax

    from warm_jax import runtime

    path = output_directory(path, overwrite=overwrite)
    main = jax.process_index() == 0
    parent = os.path.dirname(path)
    multi = jax.process_count() > 1
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp" + ("" if multi else f"-{uuid.uuid4().hex[:8]}"))
    if main:
        os.makedirs(parent, exist_ok=True)
        _remove_stale(path)
        shutil.rmtree(tmp, ignore_errors=True)  # a stale one from a crashed run
        os.makedirs(tmp)
    runtime.sync(f"atomic-dir-open:{path}")
    try:
        yield tmp
        runtime.sync(f"atomic-dir-written:{path}")
        if main:
            replace_directory(tmp, path)
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    runtime.sync(f"atomic-dir-done:{path}")
