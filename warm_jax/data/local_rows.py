"""Which rows of a global batch one process holds, and the global array built from those rows alone.

A global batch has leading dims ``[B]`` (one batch) or ``[M, B]`` (one batch per ensemble member). Under a batch
sharding each device holds a box of it; a process needs the union of its devices' boxes and nothing else. The rows
are read off the sharding itself (``devices_indices_map``), not assumed process-major, so any mesh layout works: the
data axis split over processes (each reads its share of rows), the ensemble axis split over processes (each reads
its members' rows), or both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P


@dataclasses.dataclass(frozen=True)
class LocalRows:
    """The part of a global batch with leading dims `global_shape` that one process holds.

    members: int64[m], sorted global member indices, or None for an unstacked ``[B]`` batch.
    rows: int64[r], sorted global row indices (positions in the global batch).
    needed: bool[m or 1, r]: entry (members[i], rows[j]) is on one of the process's devices; the local batch is the
      grid ``members x rows`` and only needed entries are read (the others are zero-filled and never placed).
    """

    global_shape: tuple[int, ...]
    members: np.ndarray | None
    rows: np.ndarray
    needed: np.ndarray

    @property
    def num_needed(self) -> int:
        return int(self.needed.sum())

    def member(self, i: int) -> LocalRows:
        """The ``[B]`` view for the i-th local member (of a stacked ``[M, B]`` slice)."""
        if self.members is None:
            raise ValueError("member(): this slice is of an unstacked [B] batch")
        return LocalRows((self.global_shape[1],), None, self.rows, self.needed[i : i + 1])

    @classmethod
    def everything(cls, global_shape: Sequence[int]) -> LocalRows:
        """The whole batch (a single process, or a layout where one process holds every row)."""
        shape = tuple(int(d) for d in global_shape)
        members = None if len(shape) == 1 else np.arange(shape[0], dtype=np.int64)
        return cls(
            shape,
            members,
            np.arange(shape[-1], dtype=np.int64),
            np.ones((shape[0] if members is not None else 1, shape[-1]), bool),
        )


def _lead_indices(sharding: jax.sharding.Sharding, global_shape: tuple[int, ...], devices) -> list[tuple[slice, ...]]:
    """Each of `devices`' index boxes over the leading dims `global_shape` of a batch under `sharding`."""
    k = len(global_shape)
    if isinstance(sharding, NamedSharding):
        sharding = NamedSharding(sharding.mesh, P(*tuple(sharding.spec)[:k]))
    index_map = sharding.devices_indices_map(global_shape)
    return [tuple(index_map[d])[:k] for d in devices]


def local_rows(
    sharding: jax.sharding.Sharding, global_shape: Sequence[int], devices: Sequence[jax.Device] | None = None
) -> LocalRows:
    """The rows of a global batch (leading dims `global_shape`: ``(B,)`` or ``(M, B)``) that `devices` hold.

    `devices` defaults to this process's devices; tests pass another process's to simulate it. Trailing (feature)
    dims of `sharding` are ignored: a batch's rows are split on its leading dims only.
    """
    shape = tuple(int(d) for d in global_shape)
    if len(shape) not in (1, 2):
        raise ValueError(f"local_rows: global_shape must be (B,) or (M, B), got {shape}")
    if devices is None:
        devices = [d for d in sharding.device_set if d.process_index == jax.process_index()]
    mask = np.zeros((1 if len(shape) == 1 else shape[0], shape[-1]), bool)
    for idx in _lead_indices(sharding, shape, devices):
        if len(shape) == 1:
            mask[0, idx[0]] = True
        else:
            mask[idx[0], idx[1]] = True
    rows = np.flatnonzero(mask.any(axis=0)).astype(np.int64)
    if len(shape) == 1:
        return LocalRows(shape, None, rows, mask[:, rows])
    members = np.flatnonzero(mask.any(axis=1)).astype(np.int64)
    return LocalRows(shape, members, rows, mask[np.ix_(members, rows)])


def _positions(wanted: np.ndarray, have: np.ndarray, what: str) -> np.ndarray:
    pos = np.searchsorted(have, wanted)
    if len(wanted) and (pos.max() >= len(have) or np.any(have[np.minimum(pos, len(have) - 1)] != wanted)):
        missing = sorted(set(wanted.tolist()) - set(have.tolist()))
        raise ValueError(f"a device of this process needs {what} {missing[:8]} that this process did not read")
    return pos


def assemble(x: np.ndarray, local: LocalRows, sharding: jax.sharding.Sharding) -> jax.Array:
    """The global array with `sharding` from this process's local batch `x` ``[m, r, ...]`` / ``[r, ...]``.

    Each device's box is cut out of `x` by global member/row index; a box that reaches an entry the process did not
    read is an error (the sharding differs from the one `local` was computed for), never silent zeros.
    """
    x = np.asarray(x)
    k = len(local.global_shape)
    shape = local.global_shape + x.shape[k:]

    def take(idx: tuple[slice, ...]) -> np.ndarray:
        idx = tuple(idx) + (slice(None),) * (len(shape) - len(idx))
        row_ids = np.arange(shape[k - 1])[idx[k - 1]]
        rpos = _positions(row_ids, local.rows, "rows")
        if k == 1:
            if not local.needed[0, rpos].all():
                raise ValueError("a device of this process needs batch rows that this process did not read")
            return x[rpos][idx[1:]]
        mpos = _positions(np.arange(shape[0])[idx[0]], local.members, "members")
        if not local.needed[np.ix_(mpos, rpos)].all():
            raise ValueError("a device of this process needs batch entries that this process did not read")
        return x[np.ix_(mpos, rpos)][idx[2:]]

    return jax.make_array_from_callback(shape, sharding, take)
