"""A jitted function mapped over host arrays in fixed-size batches on the mesh: pad, shard, run, gather, slice.

Evaluation-style passes (rm_eval's scorer, Best-of-N's reward scoring, sampling, REINFORCE's held-out evaluation)
apply one function to N examples that do not fit one call. ``map_batches`` cuts the examples' leading axis into
batches of B rows (B rounded down to a multiple of the mesh's batch shards, at least one row per shard) and pads the
last batch with copies of row N − 1, so every batch has one shape and the function compiles once. Each batch is put
on the mesh as global arrays sharded like any batch (``sharding.batch_sharding(mesh, ndim)``: rows over every
data-parallel axis, or over the batch axes only for a batch that every member of an ensemble sees), the outputs are gathered to host numpy on every process and the padding is dropped.

Per-host input: ``process_rows`` names the rows of [N] that this process's devices hold in any batch (row N − 1 too
when they hold padding). A process that passes only those rows (``rows=``) reads nothing else; each batch's global
arrays are assembled from them (``local_rows.assemble``, which cuts every device's box out of the process's rows, so
any mesh layout works), and the result is the one every process would get from all N rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from warm_jax import sharding
from warm_jax.data import local_rows as local_rows_lib


MEMBERS = ("none", "shared")  # the ``sharding.batch_sharding`` layouts of an unstacked [B, ...] batch


def _sharding(mesh, ndim: int, members: str):
    if members not in MEMBERS:
        raise ValueError(f"batched: members must be one of {MEMBERS} (a batch [B, ...]), got {members!r}")
    return sharding.batch_sharding(mesh, ndim, members=members)


def batch_rows(batch_size: int, mesh, members: str = "none") -> int:
    """The rows per batch ``map_batches`` uses: ``batch_size`` rounded down to a multiple of the batch shards."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    return sharding.shard_batch_size(int(batch_size), _sharding(mesh, 1, members))


def _batch_local_rows(b: int, mesh, members: str, devices=None) -> local_rows_lib.LocalRows:
    return local_rows_lib.local_rows(_sharding(mesh, 1, members), (b,), devices)


def process_rows(n: int, batch_size: int, mesh, devices=None, members: str = "none") -> np.ndarray:
    """int64[r]: sorted indices into [N] of the rows this process must pass to ``map_batches(rows=...)``.

    The rows its devices hold in every batch of ``batch_rows(batch_size, mesh)``; a padding position maps to row
    N − 1. ``devices`` defaults to this process's (tests pass another process's to simulate it).
    """
    if n <= 0:
        return np.zeros(0, np.int64)
    b = batch_rows(batch_size, mesh, members)
    mine = _batch_local_rows(b, mesh, members, devices).rows
    starts = np.arange(0, n, b, dtype=np.int64)
    return np.unique(np.minimum(starts[:, None] + mine[None, :], n - 1))


def rows_per_batch(batch_size: int, mesh, members: str = "none") -> int:
    """How many positions of each batch this process's devices hold (all B in a single process)."""
    return len(_batch_local_rows(batch_rows(batch_size, mesh, members), mesh, members).rows)


def to_host(tree):
    """A tree of (possibly multi-host sharded) jax arrays as numpy arrays of their global value, on every process."""
    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)


def map_batches(
    fn: Callable[[Any, int], Any],
    inputs,
    *,
    batch_size: int,
    mesh,
    rows: np.ndarray | None = None,
    num_rows: int | None = None,
    out_axis: int = 0,
    members: str = "none",
):
    """``fn`` over the rows of ``inputs`` in fixed-size batches; its outputs for every row, as host numpy.

    Args:
      fn: ``fn(batch, start) -> tree of jax arrays``: ``batch`` is ``inputs``' tree of global arrays [B, ...] on the
        mesh, ``start`` the index of its first row (e.g. for ``fold_in(key, start)``). Every output leaf has the
        batch on axis ``out_axis`` ([B, ...]; [M, B] with ``out_axis=1`` or -1 for a vmapped ensemble).
      inputs: a tree of host arrays sharing the leading example axis: [N, ...], or with ``rows`` only this
        process's rows [len(rows), ...].
      batch_size: rows per call, rounded down to a multiple of the mesh's batch shards (``batch_rows``).
      rows: the indices into [N] that ``inputs`` holds (``process_rows(num_rows, batch_size, mesh)`` or a superset);
        None when ``inputs`` holds all N rows.
      num_rows: N; required with ``rows``.
      members: the batch layout (``sharding.batch_sharding``): 'none' splits rows over every data-parallel axis,
        'ensemble' included; 'shared' over the batch axes only, replicated over 'ensemble' (a batch every member
        of a vmapped ensemble sees).
    Returns ``fn``'s output tree with the batches concatenated on ``out_axis`` and the padding dropped ([N] there),
    the same on every process. N = 0 returns empty arrays of the output's shapes without running ``fn``.
    Raises ValueError when the inputs disagree on their row count, or a row this process's devices need is not
    among ``rows``.
    """
    leaves, treedef = jax.tree.flatten(inputs)
    if not leaves:
        raise ValueError("map_batches: no input arrays")
    leaves = [np.asarray(x) for x in leaves]
    counts = {len(x) if x.ndim else None for x in leaves}
    if len(counts) != 1 or None in counts:
        raise ValueError(
            f"map_batches: every input needs the same leading (row) axis, got shapes {[x.shape for x in leaves]}"
        )
    (count,) = counts
    if rows is None:
        if num_rows is not None and num_rows != count:
            raise ValueError(f"map_batches: num_rows={num_rows} but the inputs hold {count} rows")
        n = count
    else:
        rows = np.asarray(rows, np.int64)
        if num_rows is None:
            raise ValueError("map_batches: rows= needs num_rows= (the global row count)")
        if len(rows) != count:
            raise ValueError(f"map_batches: {len(rows)} row indices for inputs of {count} rows")
        n = int(num_rows)
    b = batch_rows(batch_size, mesh, members)
    shardings = [_sharding(mesh, x.ndim, members) for x in leaves]
    if n == 0:
        return _empty(fn, leaves, treedef, shardings, b, out_axis)
    mine = None if rows is None else _batch_local_rows(b, mesh, members)

    def place(start: int):
        idx = np.minimum(np.arange(start, start + b), n - 1)  # the last batch padded with row N − 1
        if mine is None:
            return [sharding.put_global(x[idx], sh) for x, sh in zip(leaves, shardings)]
        wanted = idx[mine.rows]
        pos = np.searchsorted(rows, wanted)
        if np.any(pos >= len(rows)) or np.any(rows[np.minimum(pos, len(rows) - 1)] != wanted):
            missing = sorted(set(wanted.tolist()) - set(rows.tolist()))
            raise ValueError(
                f"map_batches: this process's devices need rows {missing[:8]} that are not among its {len(rows)} "
                "rows (pass process_rows(...) of the same batch size and mesh)"
            )
        return [local_rows_lib.assemble(x[pos], mine, sh) for x, sh in zip(leaves, shardings)]

    def take(y, real):
        y = np.asarray(y)
        return y[(slice(None),) * (out_axis % y.ndim) + (slice(0, real),)]

    outs, pending = [], None
    for start in range(0, n, b):
        out = fn(jax.tree.unflatten(treedef, place(start)), start)
        # Gather the previous batch only after this one is dispatched: the devices never wait on the host.
        if pending is not None:
            outs.append(jax.tree.map(lambda y, r=pending[1]: take(y, r), to_host(pending[0])))
        pending = (out, min(b, n - start))
    outs.append(jax.tree.map(lambda y: take(y, pending[1]), to_host(pending[0])))
    return jax.tree.map(lambda *ys: np.concatenate(ys, axis=out_axis), *outs)


def _empty(fn, leaves, treedef, shardings, b: int, out_axis: int):
    """``fn``'s output tree for zero rows: its shapes for one batch with the batch axis at 0 (traced, not run)."""
    batch = [jax.ShapeDtypeStruct((b, *x.shape[1:]), x.dtype, sharding=sh) for x, sh in zip(leaves, shardings)]
    shapes = jax.eval_shape(lambda t: fn(t, 0), jax.tree.unflatten(treedef, batch))

    def zero(s):
        shape = list(s.shape)
        shape[out_axis % len(shape)] = 0
        return np.zeros(shape, s.dtype)

    return jax.tree.map(zero, shapes)
