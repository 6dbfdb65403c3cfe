"""Direct reads: the arrays of a saved state straight into caller-owned host buffers.

`Checkpointer.restore` goes through Orbax, which reads every array into a fresh zero-filled numpy
array and then copies it into a fresh device buffer: two new allocations of the whole state per
restore, whose page faults cost more than the reads themselves on a CPU host (~1 s per GB). A
caller streaming many same-shaped checkpoints (`checkpoint_averaging.average_checkpoints`) reads them here,
a group of arrays at a time, into buffers it reuses instead, then places them on device itself
(`jax.device_put` of a 64-byte-aligned numpy array on CPU aliases it instead of copying).

The arrays are located only from what we wrote: the manifest's `layout` record (`layout_record`,
written by `Checkpointer.save` from the handler options it chose: OCDBT, zarr v2, one array per
key; a manifest written before the record existed gets the record those options imply). Orbax's
own metadata files are never parsed. A step whose arrays are not where the record says (an Orbax
that names or stores arrays differently) raises DirectReadUnsupported: callers then restore
through Orbax. What is read
is checked against the manifest's digests (`check_buffers`), so a wrong record cannot pass
silently; tests/test_checkpoint_layout.py fails when the record stops matching Orbax's layout.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from warm_jax.checkpoints import manifest
from warm_jax.checkpoints.errors import CheckpointCorruptError, DirectReadUnsupported, short_error

_STATE = "state"
LAYOUT = "layout"  # the manifest's key for `layout_record`
_LAYOUT_FORMAT = "ocdbt/zarr2/v1"


def layout_record(named: Sequence[tuple[str, Any]]) -> dict:
    """Where a save puts each array of the `state` item, for `StateReader`: {"format", "item",
    "driver", "arrays": leaf path -> key of the array in the item's OCDBT store}.

    named: `named_leaves(state)`. The `state` handler writes OCDBT with zarr v2 chunks (the options
    `Checkpointer` passes), each array under its key path joined with '.'. Leaves whose keys hold
    '.' or '/' (ambiguous joined) and typed PRNG keys (stored as their key data plus metadata) are
    left out: they are read through Orbax only.
    """
    arrays = {}
    for path, x in named:
        keys = path.split("/")
        if (x is not None and manifest._is_key_array(x)) or any("." in k or not k for k in keys):
            continue
        arrays[path] = ".".join(keys)
    return {"format": _LAYOUT_FORMAT, "item": _STATE, "driver": "zarr", "arrays": arrays}


def _record_of_unrecorded(leaves: dict) -> dict:
    """The layout record a manifest written before records existed would hold: those writers used
    the same handler options (OCDBT, zarr v2), so `layout_record` of the manifest's own leaf paths
    (typed PRNG keys, whose dtype names a key type, left out). Arrays that are not there make
    `StateReader` refuse the step, and what is read is checked against the manifest's digests."""
    named = [(p, None) for p, e in leaves.items() if not str(e.get("dtype", "")).startswith("key")]
    return layout_record(named)


def aligned_empty(shape: Sequence[int], dtype: Any, align: int = 64) -> np.ndarray:
    """A C-contiguous host array whose data starts on an ``align``-byte boundary (contents unspecified).

    Large ones are anonymous mappings populated up front (Linux ``MAP_POPULATE``, page-aligned):
    one system call instead of a page fault per page on first touch, and no transparent-huge-page
    compaction, which numpy's own allocations ask for (together 3-5x faster on a busy VM).
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    populate = getattr(mmap, "MAP_POPULATE", None)
    if nbytes >= 1 << 20 and populate is not None and hasattr(mmap, "MAP_ANONYMOUS"):
        raw = np.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate), np.uint8)
        return raw.view(dtype).reshape(tuple(shape))
    raw = np.empty(nbytes + align, np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start : start + nbytes].view(dtype).reshape(tuple(shape))


class StateReader:
    """A step's saved arrays of the `state` item, opened once with TensorStore (no Orbax) and read
    into caller-owned host buffers, all at once or a few at a time.

    specs: leaf path (e.g. 'params/layer_0/attn/wq') -> (shape, dtype) of every array to read.
    Raises DirectReadUnsupported when the step is not local, has several process manifests, has no
    layout record for every array asked for, or its arrays are not where the record puts them (use
    `Checkpointer.restore`); CheckpointCorruptError naming the arrays that cannot be opened or whose
    saved shape/dtype differ from the spec's.
    """

    def __init__(self, step_dir: str | os.PathLike, specs: dict[str, tuple[tuple[int, ...], Any]]):
        import tensorstore as ts  # noqa: PLC0415 - Orbax's own dependency; only needed here

        self._ts = ts
        path = self.path = os.fspath(step_dir)
        if "://" in path:
            raise DirectReadUnsupported(f"{path}: not a local path")
        manifests = manifest.read_manifests(epath.Path(path))
        if len(manifests) != 1:
            raise DirectReadUnsupported(f"{path}: {len(manifests)} process manifests")
        saved = next(iter(manifests.values()))
        record = saved.get(LAYOUT)
        if record is None and isinstance(saved.get("leaves"), dict):
            record = _record_of_unrecorded(saved["leaves"])
        if not isinstance(record, dict) or record.get("format") != _LAYOUT_FORMAT:
            raise DirectReadUnsupported(f"{path}: the manifest has no '{LAYOUT}' record of format {_LAYOUT_FORMAT}")
        keys = record.get("arrays")
        missing = sorted(set(specs) - set(keys if isinstance(keys, dict) else {}))
        if missing:
            raise DirectReadUnsupported(f"{path}: array(s) {missing[:10]} not in the manifest's '{LAYOUT}' record")
        driver = record.get("driver")
        if record.get("item") != _STATE or driver not in ("zarr", "zarr3"):
            raise DirectReadUnsupported(
                f"{path}: the manifest's '{LAYOUT}' record names item/driver {record.get('item')!r}/{driver!r}"
            )
        state_dir = os.path.join(os.path.abspath(path), _STATE)
        resources = {"file_io_concurrency": {"limit": 128}, "cache_pool#ocdbt": {"total_bytes_limit": 10**8}}
        try:
            # Read the (finalised, never rewritten) files through memory maps: TensorStore then decodes
            # straight from the page cache into the buffers, instead of read() into fresh buffers of its
            # own first (2-3x less time and 4x less system time per checkpoint here).
            context = ts.Context({**resources, "file_io_mode": {"mode": "memmap"}})
        except ValueError:  # a TensorStore without the option
            context = ts.Context(resources)
        spec = lambda name: {
            "driver": driver,
            "kvstore": {"driver": "ocdbt", "base": f"file://{state_dir}/", "path": name + "/"},
            "recheck_cached_data": False,
            "recheck_cached_metadata": False,
        }
        paths = sorted(specs)
        opening = [ts.open(spec(keys[p]), read=True, open=True, context=context) for p in paths]
        self._stores, bad, absent, first = {}, [], [], None
        for p, fut in zip(paths, opening):  # all opened before any read starts: nothing is left running
            try:
                t = fut.result()
                shape, dtype = specs[p]
                if tuple(t.shape) != tuple(shape) or t.dtype.numpy_dtype != np.dtype(dtype):
                    raise CheckpointCorruptError(f"saved as {t.dtype.numpy_dtype}{list(t.shape)}")
                self._stores[p] = t
            except Exception as e:  # noqa: BLE001 - TensorStore raises several types on bad bytes
                (absent if "NOT_FOUND" in str(e) else bad).append(p)
                first = first or e
        if absent and not bad:
            raise DirectReadUnsupported(
                f"{path}: array(s) {absent[:10]} are not where the manifest's '{LAYOUT}' record puts them "
                f"(e.g. key '{keys[absent[0]]}' of {state_dir}); the checkpoint is read through Orbax instead"
            )
        if bad or absent:
            raise CheckpointCorruptError(f"{path}: cannot open array(s) {(bad + absent)[:10]}: {short_error(first)}")

    def read_into(self, buffers: dict[str, np.ndarray]) -> None:
        """Overwrites ``buffers`` (path -> host array of the spec's shape and dtype; any subset of the
        specs) with the saved arrays. Only checked against the manifest by `check_buffers`.

        Raises CheckpointCorruptError naming the arrays that cannot be read. Every read has finished
        (or failed) when this returns or raises, so the buffers may be reused right away.
        """
        paths = sorted(buffers)
        # ts.array(buffer) refers to the buffer's memory: the write fills it in place.
        reading = [self._ts.array(buffers[p]).write(self._stores[p]) for p in paths]
        bad, first = [], None
        for p, fut in zip(paths, reading):  # wait for every read, even after a failure
            try:
                fut.result()
            except Exception as e:  # noqa: BLE001
                bad.append(p)
                first = first or e
        if bad:
            raise CheckpointCorruptError(f"{self.path}: cannot read array(s) {bad[:10]}: {short_error(first)}")


def read_state_into(step_dir: str | os.PathLike, buffers: dict[str, np.ndarray]) -> None:
    """Reads saved arrays of a step's `state` item into ``buffers`` (leaf path -> host array of the
    saved shape and dtype, overwritten): `StateReader` opened and read once."""
    StateReader(step_dir, {p: (b.shape, b.dtype) for p, b in buffers.items()}).read_into(buffers)


def check_buffers(
    step_dir: str | os.PathLike, buffers: dict[str, np.ndarray], saved: dict[str, dict] | None = None
) -> None:
    """Checks arrays read by `StateReader` against the step's manifest, as `Checkpointer.restore` does.

    The arrays are hashed on a few threads (xxh3-128, or sha256 for manifests without it).
    ``saved``: the manifest's "leaves" when the caller has read it already (it is read otherwise). Raises
    CheckpointCorruptError naming the first array (in path order) that does not match,
    DirectReadUnsupported when the manifest has no whole-array hash to compare with (arrays saved
    per shard by several processes).
    """
    if saved is None:
        manifests = manifest.read_manifests(epath.Path(os.fspath(step_dir)))
        if len(manifests) != 1:
            raise DirectReadUnsupported(f"{step_dir}: {len(manifests)} process manifests")
        saved = next(iter(manifests.values()))["leaves"]
    paths = sorted(buffers)
    for p in paths:
        entry = saved.get(p)
        if entry is None:
            raise CheckpointCorruptError(f"{step_dir}: array '{p}' is missing from the manifest")
        if manifest.digest_check([entry]) is None or entry["dtype"] != str(buffers[p].dtype):
            raise DirectReadUnsupported(f"{step_dir}: array '{p}' has no whole-array hash of its dtype")
        if list(entry["shape"]) != list(buffers[p].shape):
            raise CheckpointCorruptError(
                f"{step_dir}: array '{p}' does not match the manifest (shape {list(buffers[p].shape)} "
                f"!= {entry['shape']})"
            )
    checks = {p: manifest.digest_check([saved[p]]) for p in paths}
    for p, digest in zip(paths, manifest.map_threads(lambda p: checks[p][1](buffers[p]), paths)):
        name = checks[p][0]
        if digest != saved[p][name]:
            raise CheckpointCorruptError(f"{step_dir}: array '{p}' does not match the manifest ({name} of contents)")
