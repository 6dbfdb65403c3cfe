"""Atomic file and directory writes: nothing half-written where a finished result is expected."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid


def atomic_write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str, *, overwrite: bool = False):
    """Yields a temporary sibling directory that is renamed to ``path`` on success.

    On an exception (or a crash) ``path`` is untouched and the temporary is removed (a
    crash leaves only a ``.tmp`` sibling, never a partial ``path``). With several jax
    processes every process writes into the same temporary (its name is deterministic) and
    process 0 alone prepares and renames it, between barriers.
    """
    import jax

    from warm_jax import runtime

    path = os.path.abspath(path)
    main = jax.process_index() == 0
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"output {path} already exists")
    parent = os.path.dirname(path)
    multi = jax.process_count() > 1
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp" + ("" if multi else f"-{uuid.uuid4().hex[:8]}"))
    if main:
        os.makedirs(parent, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a stale one from a crashed run
        os.makedirs(tmp)
    runtime.sync(f"atomic-dir-open:{path}")
    try:
        yield tmp
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    runtime.sync(f"atomic-dir-written:{path}")
    if main:
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    runtime.sync(f"atomic-dir-done:{path}")


def read_json(path: str):
    with open(path) as f:
        return json.load(f)
