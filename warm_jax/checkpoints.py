"""Checkpoints: an Orbax `CheckpointManager` wrapper with preemption saves and an integrity manifest.

A step directory holds four Orbax items, finalised together (Orbax writes `<step>.orbax-checkpoint-tmp-*`
and renames it when every item is committed, so an unfinished step is never listed):

  state/      the training state pytree (params, optimizer state, step, key), any sharding
  data/       the input-pipeline iterator state (a JSON dict), optional
  meta/       free-form JSON metadata, optional
  manifest/   `manifest.process-<i>.json`, one per jax process: leaf path -> sha256, xxh3_128, shape, dtype

Orbax keeps no checksums of array contents, so the manifest is ours: it is written at save time from the
arrays being saved and checked against the arrays restored. Two digests per array: sha256, the content's
identity (``tree_sha256``, the merge metadata's member hashes), and xxh3-128, which restores check when
the manifest has it (~15x faster than sha256; an integrity check against corrupt bytes, not an
adversary). Manifests without xxh3 (older checkpoints, per-shard entries) are checked with sha256. A fully addressable array is hashed as its
global contents (`np.asarray(x)`), which does not depend on the sharding, so a checkpoint written on one
mesh verifies when restored onto another. An array spread over several processes is hashed shard by
shard (keyed by the shard's index) in that process's manifest.

Preemption: `install_sigterm_handler()` records SIGTERM; `Checkpointer.reached_preemption(step)` turns
it into a save decision. With `jax.distributed` and its preemption service running, JAX's own SIGTERM
notifier and `reached_preemption_sync_point` are used instead, so every process saves the same step.
"""

from __future__ import annotations

import concurrent.futures
import gc
import hashlib
import json
import logging
import mmap
import os
import signal
import threading
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import xxhash
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as ocp_policies

PyTree = Any

log = logging.getLogger(__name__)

_STATE, _DATA, _META, _MANIFEST = "state", "data", "meta", "manifest"
_MANIFEST_GLOB = "manifest.process-*.json"
_MANIFEST_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the step dir and the array at fault."""


class NonFiniteStateError(CheckpointError):
    """The state to save holds NaN or Inf; nothing was written."""


class CheckpointCorruptError(CheckpointError):
    """A saved step does not match its manifest or cannot be read (restore() may fall back past it)."""


# --------------------------------------------------------------------------------------------------
# Preemption.

_PREEMPTION = threading.Event()
_HANDLER_LOCK = threading.Lock()
_handler_installed = False


def _on_sigterm(signum: int, frame: Any) -> None:
    del signum, frame
    # Only set a flag: the training loop saves at its next step boundary and exits 0.
    _PREEMPTION.set()


def _jax_preemption_service() -> bool:
    """True when `jax.distributed` runs with its preemption service (it owns SIGTERM then)."""
    return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)


def install_sigterm_handler() -> None:
    """Records SIGTERM so that the training loop can save and exit 0. Idempotent; call from the main thread.

    Under `jax.distributed` with the preemption service on, JAX has already installed a SIGTERM notifier
    that tells every process; replacing it with ours would keep the other processes in the dark, so
    nothing is installed then and `Checkpointer.reached_preemption` asks JAX's sync point instead.
    """
    global _handler_installed
    with _HANDLER_LOCK:
        if _handler_installed:
            return
        if _jax_preemption_service():
            log.info("SIGTERM is handled by the JAX preemption service (jax.distributed is initialized).")
        else:
            signal.signal(signal.SIGTERM, _on_sigterm)
        _handler_installed = True


def preemption_requested() -> bool:
    """True once SIGTERM was received here (or, multi-process, once the preemption sync step was reached)."""
    return _PREEMPTION.is_set()


def _reached_preemption(step: int) -> bool:
    if _jax_preemption_service():
        # All processes must call this at every step; it returns True on all of them at the same step.
        try:
            reached = multihost_utils.reached_preemption_sync_point(step)
        except RuntimeError:  # the sync manager is not running
            reached = False
        if reached:
            _PREEMPTION.set()
        return reached
    return _PREEMPTION.is_set()


# --------------------------------------------------------------------------------------------------
# Hashing.


def _key_str(key: Any) -> str:
    for attr in ("key", "name", "idx"):  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def leaf_path(path: Sequence[Any]) -> str:
    """'/'-joined names of a `tree_flatten_with_path` key path, e.g. 'params/layers/0/w'."""
    return "/".join(_key_str(k) for k in path) or "<root>"


def named_leaves(tree: PyTree) -> list[tuple[str, Any]]:
    """(path, leaf) pairs sorted by path, the fixed order used by hashes and checks."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    pairs = [(leaf_path(p), x) for p, x in flat]
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError(f"two leaves share a path name in {sorted(names)}")
    return sorted(pairs, key=lambda kv: kv[0])


def _is_key_array(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _host(x: Any) -> np.ndarray:
    """Host copy of a fully addressable array (typed PRNG keys as their raw key data)."""
    if _is_key_array(x):
        x = jax.random.key_data(x)
    return np.ascontiguousarray(np.asarray(x))


def _bytes(a: np.ndarray) -> np.ndarray:
    # A uint8 view of the contiguous buffer holds the same bytes as .tobytes() without copying them
    # (hashlib and xxhash release the GIL on it, which lets _map_threads hash leaves side by side).
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(_bytes(a)).hexdigest()


def _xxh(a: np.ndarray) -> str:
    return xxhash.xxh3_128(_bytes(a)).hexdigest()


# Whole-array digests a restore can check, fastest first: the first one a manifest entry has is used.
_CHECKS = (("xxh3_128", _xxh), ("sha256", _sha))


def _check_of(entries: Sequence[dict]) -> tuple[str, Any] | None:
    """(name, digest function) of the fastest whole-array digest every entry has; None if they have none."""
    for name, fn in _CHECKS:
        if entries and all(name in e for e in entries):
            return name, fn
    return None


def _map_threads(fn, items: Sequence[Any]) -> list[Any]:
    """[fn(x) for x in items], on a few threads: hashing and numpy reductions release the GIL.

    Results come back in order; the first exception (in item order) is raised.
    """
    workers = min(len(items), os.cpu_count() or 1, 8)
    if workers <= 1:
        return [fn(x) for x in items]
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="ckpt-hash") as pool:
        return list(pool.map(fn, items))


def _all_finite_host(a: np.ndarray) -> bool:
    """np.isfinite(a).all() in 1M-element slices: no bool temporary the size of `a` (a fresh
    allocation of that size costs more in page faults than the check itself)."""
    flat = np.ascontiguousarray(a).reshape(-1)
    step = 1 << 20
    return all(bool(np.isfinite(flat[i : i + step]).all()) for i in range(0, flat.size, step))


def _is_float(x: Any) -> bool:
    return not _is_key_array(x) and jnp.issubdtype(np.dtype(x.dtype), jnp.inexact)


def _index_key(index: tuple[slice, ...], shape: Sequence[int]) -> str:
    """A shard's index as 'start:stop,start:stop' (full ranges spelled out, so keys compare)."""
    parts = []
    for s, n in zip(index, shape):
        start, stop, _ = s.indices(n)
        parts.append(f"{start}:{stop}")
    return ",".join(parts)


def _parse_index(key: str) -> tuple[slice, ...]:
    if not key:
        return ()
    return tuple(slice(int(a), int(b)) for a, b in (p.split(":") for p in key.split(",")))


def _fully_addressable(x: Any) -> bool:
    return getattr(x, "is_fully_addressable", True)


def _describe(x: Any) -> tuple[dict[str, Any], bool]:
    """Manifest entry of one leaf and whether its local contents are finite.

    Fully addressable: {"sha256", "xxh3_128", "shape", "dtype"} over the global contents. Otherwise
    {"shards": {index: sha256}, "shape", "dtype"} over this process's shards (one per distinct index).
    """
    if not hasattr(x, "dtype"):  # a Python scalar leaf
        x = np.asarray(x)
    entry: dict[str, Any] = {"shape": list(x.shape), "dtype": str(x.dtype)}
    is_float = _is_float(x)
    if _fully_addressable(x):
        a = _host(x)
        entry["sha256"], entry["xxh3_128"] = _sha(a), _xxh(a)
        return entry, (not is_float) or _all_finite_host(a)
    shards: dict[str, str] = {}
    finite = True
    for shard in x.addressable_shards:
        key = _index_key(shard.index, x.shape)
        if key in shards:  # a replica of a shard already hashed
            continue
        a = _host(shard.data)
        shards[key] = _sha(a)
        finite = finite and ((not is_float) or _all_finite_host(a))
    entry["shards"] = dict(sorted(shards.items()))
    return entry, finite


def describe_leaves(tree: PyTree) -> dict[str, tuple[dict, bool]]:
    """Leaf path -> (manifest entry, local contents finite), the leaves hashed on a few threads.

    Passing the result to ``Checkpointer.save(described=...)`` saves hashing the same arrays twice.
    """
    leaves = named_leaves(tree)
    return dict(zip([p for p, _ in leaves], _map_threads(lambda kv: _describe(kv[1]), leaves)))


def leaf_hashes(tree: PyTree) -> dict[str, dict]:
    """Leaf path -> {"sha256", "shape", "dtype"} ("shards" instead of "sha256" for multi-process arrays)."""
    return {path: entry for path, (entry, _) in describe_leaves(tree).items()}


def tree_sha256_of_entries(entries: dict[str, dict], prefix: str = "") -> str | None:
    """``tree_sha256`` of the subtree under ``prefix`` computed from its manifest entries (no hashing).

    entries: leaf path -> manifest entry (``leaf_hashes`` or a saved manifest's "leaves"); only
    paths starting with ``prefix`` count, with the prefix cut off. None when an entry cannot give
    it: hashed per shard (several processes), or a typed PRNG key (hashed as its key data).
    """
    h = hashlib.sha256()
    for path in sorted(p for p in entries if p.startswith(prefix)):
        entry = entries[path]
        if "sha256" not in entry or entry["dtype"].startswith("key<"):
            return None
        h.update(f"{path[len(prefix) :]}\t{entry['dtype']}\t{entry['shape']}\t{entry['sha256']}\n".encode())
    return h.hexdigest()


def tree_sha256(tree: PyTree) -> str:
    """sha256 over every leaf's path, dtype, shape and contents, in sorted path order.

    Independent of sharding. Arrays spread over several processes are gathered first, which makes the
    call collective (every process must make it).
    """
    h = hashlib.sha256()
    for path, x in named_leaves(tree):
        if not _fully_addressable(x):
            x = multihost_utils.process_allgather(x, tiled=True)
        if not hasattr(x, "dtype"):  # a Python scalar leaf
            x = np.asarray(x)
        a = _host(x)
        dtype = str(x.dtype)
        h.update(f"{path}\t{dtype}\t{list(a.shape)}\t{_sha(a)}\n".encode())
    return h.hexdigest()


@jax.jit
def _all_finite(x: jax.Array) -> jax.Array:
    # A 0-d result is replicated on every device, so every process reads the same answer.
    return jnp.all(jnp.isfinite(x))


def _all_finite_global(x: jax.Array) -> bool:
    """Finiteness of an array spread over processes, as one answer that all processes share."""
    return bool(_all_finite(x))


# --------------------------------------------------------------------------------------------------
# Manifest verification.


def _verify_leaf(
    path: str, x: Any, entries: list[dict], step_dir: str, full: np.ndarray | None, digest: str | None = None
) -> None:
    """Raises CheckpointCorruptError if restored leaf `x` differs from any of its manifest entries.

    full: the global contents of `x` on host when this process does not hold it whole (else None).
    digest: the ``_check_of(entries)`` digest of a fully addressable `x`'s contents, when already computed.
    """

    def fail(what: str) -> None:
        raise CheckpointCorruptError(f"{step_dir}: array '{path}' does not match the manifest ({what})")

    for entry in entries:
        if list(entry["shape"]) != list(np.shape(x)):
            fail(f"shape {list(np.shape(x))} != {entry['shape']}")
        if entry["dtype"] != str(x.dtype):
            log.warning(
                "%s: array '%s' restored as %s but saved as %s; its hash is not checked",
                step_dir,
                path,
                x.dtype,
                entry["dtype"],
            )
            continue
        if _fully_addressable(x):
            full = _host(x)
        if full is not None:
            check = _check_of([entry])
            if check is not None:
                name, fn = check
                got = digest if digest is not None and check == _check_of(entries) else fn(full)
                if got != entry[name]:
                    fail(f"{name} of contents")
            else:
                for key, sha in entry["shards"].items():
                    if _sha(full[_parse_index(key)]) != sha:
                        fail(f"sha256 of shard [{key}]")
        else:  # the same shards as at save time are local: compare them one by one
            local = {_index_key(s.index, x.shape): s.data for s in x.addressable_shards}
            for key, sha in entry["shards"].items():
                if _sha(_host(local[key])) != sha:
                    fail(f"sha256 of shard [{key}]")


def _indices_local(x: jax.Array, shards: dict[str, str]) -> bool:
    local = {_index_key(s.index, x.shape) for s in x.addressable_shards}
    return set(shards) <= local


def _read_manifests(step_dir: epath.Path) -> dict[int, dict]:
    """Process index -> manifest, for every manifest file of a finalised step."""
    out = {}
    for f in sorted((step_dir / _MANIFEST).glob(_MANIFEST_GLOB)):
        index = int(f.name[len("manifest.process-") : -len(".json")])
        try:
            out[index] = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointCorruptError(f"{step_dir}: unreadable manifest {f.name}: {e}") from e
    return out


def _any_process(flags: np.ndarray) -> np.ndarray:
    """Element-wise OR of `flags` over all processes (identity with one process)."""
    if jax.process_count() == 1:
        return flags
    return np.asarray(multihost_utils.process_allgather(flags)).any(axis=0)


def _verify(state: PyTree, manifests: dict[int, dict], step_dir: str) -> None:
    """Checks restored `state` against the manifests: this process's one for leaves spread over processes,
    every process's entries for leaves this process holds whole.

    With several processes the gathers and the verdict are collective, so that all processes raise (and
    fall back to the same older step) or none does.
    """
    if not manifests:
        raise CheckpointCorruptError(f"{step_dir}: no manifest ({_MANIFEST}/{_MANIFEST_GLOB}) to verify against")
    me = jax.process_index()
    leaves = named_leaves(state)
    plans = []
    for path, x in leaves:
        sources = [manifests[me]] if (not _fully_addressable(x) and me in manifests) else manifests.values()
        entries = [m["leaves"][path] for m in sources if path in m["leaves"]]
        if not entries:
            raise CheckpointCorruptError(f"{step_dir}: array '{path}' is missing from the manifest")
        # Gather a spread array when its saved shards are not all local here (it was resharded).
        gather = not _fully_addressable(x) and any("sha256" in e or not _indices_local(x, e["shards"]) for e in entries)
        plans.append((entries, gather))
    gathers = _any_process(np.array([g for _, g in plans], dtype=bool))

    # Hash the leaves held whole here on a few threads first (no collectives in that); the checks
    # below then run in path order as before, so the first bad leaf named is the same.
    def whole_digest(i: int) -> str | None:
        (_, x), (entries, _) = leaves[i], plans[i]
        check = _check_of(entries)
        hashed = check is not None and any(e["dtype"] == str(x.dtype) for e in entries)
        return check[1](_host(x)) if hashed and _fully_addressable(x) else None

    digests = _map_threads(whole_digest, range(len(leaves)))
    first_bad, message = -1, ""
    for i, ((path, x), (entries, _)) in enumerate(zip(leaves, plans)):
        full = _host(multihost_utils.process_allgather(x, tiled=True)) if gathers[i] else None
        if first_bad < 0:
            try:
                _verify_leaf(path, x, entries, step_dir, full, digests[i])
            except CheckpointCorruptError as e:
                first_bad, message = i, str(e)
    bad = np.zeros(len(leaves), dtype=bool)
    if first_bad >= 0:
        bad[first_bad] = True
    bad = _any_process(bad)
    if bad.any():
        if first_bad < 0:
            first_bad = int(np.argmax(bad))
            message = f"{step_dir}: array '{leaves[first_bad][0]}' does not match the manifest of another process"
        raise CheckpointCorruptError(message)


# --------------------------------------------------------------------------------------------------
# Direct reads: the arrays of a saved state straight into caller-owned host buffers.
#
# `Checkpointer.restore` goes through Orbax, which reads every array into a fresh zero-filled numpy
# array and then copies it into a fresh device buffer: two new allocations of the whole state per
# restore, whose page faults cost more than the reads themselves on a CPU host (~1 s per GB). A
# caller streaming many same-shaped checkpoints (`averaging.average_checkpoints`) reads them here
# into buffers it reuses instead, then places them on device itself (`jax.device_put` of a
# 64-byte-aligned numpy array on CPU aliases it instead of copying).


class DirectReadUnsupported(CheckpointError):
    """The checkpoint is not one `read_state_into` reads (not OCDBT, several processes, not local...)."""


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


def read_state_into(step_dir: str | os.PathLike, buffers: dict[str, np.ndarray]) -> None:
    """Reads saved arrays of a step's `state` item into ``buffers`` with TensorStore (no Orbax, no copies).

    buffers: leaf path (e.g. 'params/layer_0/attn/wq') -> host array of the saved shape and dtype,
      overwritten. Only checked against the manifest by `check_buffers`.
    Raises DirectReadUnsupported when the step is not a local, single-process OCDBT checkpoint
    (use `Checkpointer.restore`), CheckpointCorruptError naming the arrays that cannot be opened
    or read, or whose saved shape/dtype differ from the buffer's. Every read has finished (or
    failed) when this returns or raises, so the buffers may be reused right away.
    """
    import tensorstore as ts  # noqa: PLC0415 - Orbax's own dependency; only needed here

    path = os.fspath(step_dir)
    if "://" in path:
        raise DirectReadUnsupported(f"{path}: not a local path")
    state_dir = os.path.join(os.path.abspath(path), _STATE)
    manifests = list((epath.Path(path) / _MANIFEST).glob(_MANIFEST_GLOB))
    if len(manifests) != 1:
        raise DirectReadUnsupported(f"{path}: {len(manifests)} process manifests")
    try:
        with open(os.path.join(state_dir, "_METADATA")) as f:
            meta = json.load(f)
        names = {}
        for entry in meta["tree_metadata"].values():
            keys = [str(k["key"]) for k in entry["key_metadata"]]
            names["/".join(keys)] = ".".join(keys)  # Orbax names an array by its key path joined with '.'
        use_ocdbt, use_zarr3 = bool(meta["use_ocdbt"]), bool(meta.get("use_zarr3"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DirectReadUnsupported(f"{path}: unreadable Orbax metadata: {e}") from e
    if not use_ocdbt or not set(buffers) <= set(names):
        raise DirectReadUnsupported(f"{path}: not OCDBT, or the buffers are not the saved arrays")
    resources = {"file_io_concurrency": {"limit": 128}, "cache_pool#ocdbt": {"total_bytes_limit": 10**8}}
    try:
        # Read the (finalised, never rewritten) files through memory maps: TensorStore then decodes
        # straight from the page cache into the buffers, instead of read() into fresh buffers of its
        # own first (2-3x less time and 4x less system time per checkpoint here).
        context = ts.Context({**resources, "file_io_mode": {"mode": "memmap"}})
    except ValueError:  # a TensorStore without the option
        context = ts.Context(resources)
    spec = lambda name: {
        "driver": "zarr3" if use_zarr3 else "zarr",
        "kvstore": {"driver": "ocdbt", "base": f"file://{state_dir}/", "path": name + "/"},
        "recheck_cached_data": False,
        "recheck_cached_metadata": False,
    }
    paths = sorted(buffers)
    opening = [ts.open(spec(names[p]), read=True, open=True, context=context) for p in paths]
    stores, bad, first = [], [], None
    for p, fut in zip(paths, opening):  # all opened before any read starts: nothing is left running
        try:
            t = fut.result()
            if tuple(t.shape) != buffers[p].shape or t.dtype.numpy_dtype != buffers[p].dtype:
                raise CheckpointCorruptError(f"saved as {t.dtype.numpy_dtype}{list(t.shape)}")
            stores.append(t)
        except Exception as e:  # noqa: BLE001 - TensorStore raises several types on bad bytes
            bad.append(p)
            first = first or e
    if bad:
        raise CheckpointCorruptError(f"{path}: cannot open array(s) {bad[:10]}: {_short(first)}")
    # ts.array(buffer) refers to the buffer's memory: the write fills it in place.
    reading = [ts.array(buffers[p]).write(t) for p, t in zip(paths, stores)]
    for p, fut in zip(paths, reading):  # wait for every read, even after a failure
        try:
            fut.result()
        except Exception as e:  # noqa: BLE001
            bad.append(p)
            first = first or e
    if bad:
        raise CheckpointCorruptError(f"{path}: cannot read array(s) {bad[:10]}: {_short(first)}")


def check_buffers(step_dir: str | os.PathLike, buffers: dict[str, np.ndarray]) -> None:
    """Checks arrays read by `read_state_into` against the step's manifest, as `Checkpointer.restore` does.

    The arrays are hashed on a few threads (xxh3-128, or sha256 for manifests without it). Raises
    CheckpointCorruptError naming the first array (in path order) that does not match,
    DirectReadUnsupported when the manifest has no whole-array hash to compare with (arrays saved
    per shard by several processes).
    """
    manifests = _read_manifests(epath.Path(os.fspath(step_dir)))
    if len(manifests) != 1:
        raise DirectReadUnsupported(f"{step_dir}: {len(manifests)} process manifests")
    saved = next(iter(manifests.values()))["leaves"]
    paths = sorted(buffers)
    for p in paths:
        entry = saved.get(p)
        if entry is None:
            raise CheckpointCorruptError(f"{step_dir}: array '{p}' is missing from the manifest")
        if _check_of([entry]) is None or entry["dtype"] != str(buffers[p].dtype):
            raise DirectReadUnsupported(f"{step_dir}: array '{p}' has no whole-array hash of its dtype")
        if list(entry["shape"]) != list(buffers[p].shape):
            raise CheckpointCorruptError(
                f"{step_dir}: array '{p}' does not match the manifest (shape {list(buffers[p].shape)} "
                f"!= {entry['shape']})"
            )
    checks = {p: _check_of([saved[p]]) for p in paths}
    for p, digest in zip(paths, _map_threads(lambda p: checks[p][1](buffers[p]), paths)):
        name = checks[p][0]
        if digest != saved[p][name]:
            raise CheckpointCorruptError(f"{step_dir}: array '{p}' does not match the manifest ({name} of contents)")


# --------------------------------------------------------------------------------------------------
# The manager.


def _short(error: BaseException, limit: int = 400) -> str:
    """The gist of an Orbax/TensorStore error, without the multi-kilobyte spec dumps they carry."""
    text = str(error)
    for cut in (" See full TensorStore details", " [tensorstore_spec="):
        text = text.split(cut)[0]
    return text if len(text) <= limit else text[:limit] + " ..."


class _UncompressedStandardHandler(ocp.handlers.StandardCheckpointHandler):
    """StandardCheckpointHandler that writes chunks without zstd (its constructor has no such option).

    Its work is done by a PyTreeCheckpointHandler held as `_impl`; this one is built like the
    parent's (same defaults) with use_compression=False. Restoring reads the codec from the
    array metadata, so it reads compressed checkpoints too.
    """

    def __init__(self):
        super().__init__()
        if not isinstance(getattr(self, "_impl", None), ocp.PyTreeCheckpointHandler):
            # Another Orbax layout: still a correct checkpoint, only compressed (slower to read).
            log.warning("this Orbax's StandardCheckpointHandler has no PyTreeCheckpointHandler _impl; compressing")
            return
        self._impl = ocp.PyTreeCheckpointHandler(
            save_concurrent_gb=96, restore_concurrent_gb=96, use_ocdbt=True, use_compression=False
        )


def _abstract_leaf(path: str, x: Any) -> jax.ShapeDtypeStruct:
    sharding = getattr(x, "sharding", None)
    if sharding is None:
        raise ValueError(f"abstract_state leaf '{path}' has no .sharding; restore needs the target sharding")
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


class Checkpointer:
    """Saves and restores (state, data iterator state, metadata) per step under `directory`.

    Args:
      directory: root of the step directories (created unless read_only).
      save_interval_steps: `save(step)` writes when `step % save_interval_steps == 0`.
      max_to_keep: newest steps kept (None: all); steps in `keep_steps` are kept besides.
      keep_steps: steps never deleted by retention.
      async_save: write in a background thread after the device->host copy.
      verify: check restored arrays against the manifest (the manifest is always written).
      read_only: open an existing directory without creating, cleaning or deleting anything.
      compress: write array chunks zstd-compressed (Orbax's default). Float weights barely
        compress (~7% for float32) and compressing halves the write and restore speed, so
        ``params_io.save_params`` turns it off. Reading handles either.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        save_interval_steps: int = 1000,
        max_to_keep: int | None = 3,
        keep_steps: Sequence[int] = (),
        async_save: bool = True,
        verify: bool = True,
        read_only: bool = False,
        compress: bool = True,
    ):
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be None or >= 1, got {max_to_keep}")
        path = os.fspath(directory)
        self.directory = epath.Path(path if "://" in path else os.path.abspath(path))
        if read_only and not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: no such checkpoint directory")
        self.save_interval_steps = save_interval_steps
        self.verify = verify
        self._bad_steps: set[int] = set()  # steps found corrupt by restore(); re-saving replaces them

        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        state_handler = ocp.handlers.StandardCheckpointHandler if compress else _UncompressedStandardHandler
        registry.add(_STATE, ocp.args.StandardSave, state_handler())
        registry.add(_STATE, ocp.args.StandardRestore, state_handler())
        for item in (_DATA, _META):
            handler = ocp.handlers.JsonCheckpointHandler()
            registry.add(item, ocp.args.JsonSave, handler)
            registry.add(item, ocp.args.JsonRestore, handler)
        # primary_host=None makes every process write; each writes its own file name.
        manifest_handler = ocp.handlers.JsonCheckpointHandler(
            f"manifest.process-{jax.process_index()}.json",
            multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=None),
        )
        registry.add(_MANIFEST, ocp.args.JsonSave, manifest_handler)

        preserve: list[Any] = [ocp_policies.LatestN(n=max_to_keep)]
        if keep_steps:
            preserve.append(ocp_policies.CustomSteps(steps=list(keep_steps)))
        options = ocp.CheckpointManagerOptions(
            # save() decides itself (interval, force, preemption) and passes force=True; this policy only
            # mirrors that decision for Orbax's own bookkeeping (its default also saves any first step).
            save_decision_policy=ocp_policies.AnySavePolicy(
                [ocp_policies.FixedIntervalPolicy(save_interval_steps), ocp_policies.PreemptionCheckpointingPolicy()]
            ),
            preservation_policy=ocp_policies.AnyPreservationPolicy(preserve),
            enable_async_checkpointing=async_save,
            # Leftovers of a save killed mid-write (`<step>.orbax-checkpoint-tmp-*`) are never listed
            # as steps; this also deletes them.
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
            create=not read_only,
        )
        self._mgr = ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)

    # -- queries ---------------------------------------------------------------------------------

    def step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def all_steps(self) -> list[int]:
        """Finalised steps, ascending (steps that restore() found corrupt are left out)."""
        return sorted(s for s in self._mgr.all_steps() if s not in self._bad_steps)

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def reached_preemption(self, step: int) -> bool:
        """True once SIGTERM was received (multi-process: at the step all processes agreed on)."""
        return _reached_preemption(step)

    def should_save(self, step: int) -> bool:
        """True at interval steps past the latest saved step, and at any unsaved step after preemption."""
        if self.reached_preemption(step):
            return step not in self.all_steps()
        latest = self.latest_step()
        return (latest is None or step > latest) and step % self.save_interval_steps == 0

    # -- save ------------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        state: PyTree,
        *,
        data: dict | None = None,
        meta: dict | None = None,
        force: bool = False,
        described: dict[str, tuple[dict, bool]] | None = None,
    ) -> bool:
        """Saves `state` (+ `data`, `meta`) at `step` if due; returns whether a save started.

        described: `describe_leaves(state)` when the caller already has it (its paths must be the
          state's), so that the arrays are not hashed a second time.
        Raises NonFiniteStateError (naming the first non-finite leaf) before anything is written.
        After a preemption the save is waited for, so the step is final when this returns.
        """
        preempted = self.reached_preemption(step)
        if not (force or preempted or self.should_save(step)):
            return False
        if step in self._mgr.all_steps():
            if step not in self._bad_steps:
                log.info("%s: step %d is already saved", self.directory, step)
                return False
            self._mgr.delete(step)  # a corrupt copy found by restore(); replace it
            self._bad_steps.discard(step)
        for name, item in ((_DATA, data), (_META, meta)):
            if item is not None:
                try:
                    json.dumps(item)
                except (TypeError, ValueError) as e:
                    raise CheckpointError(f"{self.step_dir(step)}: '{name}' item is not JSON-serialisable: {e}") from e

        named = named_leaves(state)
        if described is None:
            described = describe_leaves(state)
        elif set(described) != {p for p, _ in named}:
            raise ValueError(f"{self.step_dir(step)}: `described` does not have the leaf paths of the state")
        leaves: dict[str, dict] = {}
        for path, x in named:
            entry, finite = described[path]
            if not _fully_addressable(x) and _is_float(x):
                finite = _all_finite_global(x)  # one answer shared by all processes
            if not finite:
                raise NonFiniteStateError(
                    f"{self.step_dir(step)}: not saved, array '{path}' (shape {entry['shape']}, "
                    f"{entry['dtype']}) holds NaN or Inf"
                )
            leaves[path] = entry
        manifest = {
            "version": _MANIFEST_VERSION,
            "step": step,
            "process_index": jax.process_index(),
            "process_count": jax.process_count(),
            "leaves": leaves,
        }

        items: dict[str, Any] = {_STATE: ocp.args.StandardSave(state), _MANIFEST: ocp.args.JsonSave(manifest)}
        if data is not None:
            items[_DATA] = ocp.args.JsonSave(data)
        if meta is not None:
            items[_META] = ocp.args.JsonSave(meta)
        saved = self._mgr.save(step, args=ocp.args.Composite(**items), force=True)
        if saved and preempted:
            log.warning("%s: preemption save of step %d; waiting for it to finish", self.directory, step)
            self._mgr.wait_until_finished()
        return saved

    # -- restore ---------------------------------------------------------------------------------

    def restore(self, abstract_state: PyTree | None, step: int | None = None) -> tuple[PyTree, dict | None, int]:
        """Restores (state, data item or None, step), verified against the manifest.

        abstract_state: pytree of jax.ShapeDtypeStruct (or arrays) with `.sharding` set; the state is read
          straight into those shardings, whatever mesh wrote it. None: the saved tree as nested dicts of
          arrays on one local CPU device (for tools that do not know the model).
        step: None picks the latest step that verifies, warning about each newer one that does not;
          an explicit step raises CheckpointCorruptError instead.
        """
        self.wait()
        if step is not None:
            return self._restore_step(abstract_state, step)
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"{self.directory}: no finished checkpoint to restore")
        errors = []
        for s in reversed(steps):
            try:
                return self._restore_step(abstract_state, s)
            except CheckpointCorruptError as e:
                log.warning("skipping corrupt checkpoint step %d: %s", s, e)
                self._bad_steps.add(s)
                errors.append(str(e))
        raise CheckpointCorruptError(f"{self.directory}: no step verifies: " + "; ".join(errors))

    def restore_meta(self, step: int | None = None) -> dict | None:
        """The `meta` item of `step` (default: latest), or None if that step has none."""
        step = self._resolve(step)
        if not (self.step_dir(step) / _META).exists():
            return None
        return self._mgr.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))[_META]

    def _resolve(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"{self.directory}: no finished checkpoint")
        elif step not in self._mgr.all_steps():
            raise CheckpointError(f"{self.step_dir(step)}: no such finished step (have {self._mgr.all_steps()})")
        return step

    def saved_abstract_state(self, step: int, sharding: jax.sharding.Sharding | None = None) -> PyTree:
        """The saved tree of `step` as ShapeDtypeStructs (nested dicts), placed on `sharding`
        (default: the first local CPU device)."""
        if sharding is None:
            sharding = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
        try:
            meta = self._mgr.item_metadata(step)[_STATE]
        except Exception as e:  # noqa: BLE001 - any read failure means the step is unusable
            raise CheckpointCorruptError(f"{self.step_dir(step)}: unreadable state metadata: {_short(e)}") from e
        tree = getattr(meta, "tree", meta)
        return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding), tree)

    def _restore_step(self, abstract_state: PyTree | None, step: int) -> tuple[PyTree, dict | None, int]:
        step = self._resolve(step)
        step_dir = self.step_dir(step)
        if abstract_state is None:
            target = self.saved_abstract_state(step)
        else:
            target = jax.tree_util.tree_map_with_path(lambda p, x: _abstract_leaf(leaf_path(p), x), abstract_state)
            self._check_structure(target, step)
        items: dict[str, Any] = {_STATE: ocp.args.StandardRestore(target)}
        has_data = (step_dir / _DATA).exists()
        if has_data:
            items[_DATA] = ocp.args.JsonRestore()
        try:
            restored = self._mgr.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 - tensorstore/orbax raise many types on corrupt bytes
            message = self._locate_read_failure(target, step, e)
            # A failed Orbax read orphans the reads of the other arrays; collect them now, so that their
            # "exception ignored" reports come here and not at some later, unrelated moment.
            gc.collect()
            raise CheckpointCorruptError(message) from e
        state = restored[_STATE]
        if self.verify:
            _verify(state, _read_manifests(step_dir), str(step_dir))
        return state, (restored[_DATA] if has_data else None), step

    def _saved_paths(self, step: int) -> set[str]:
        """Leaf paths of the saved state: from the manifest (every process's lists every leaf), else
        from Orbax's metadata, which opens every array's TensorStore (~1 ms per array)."""
        try:
            manifests = _read_manifests(self.step_dir(step))
        except CheckpointCorruptError:  # unreadable: restore's verification reports it
            manifests = {}
        for manifest in manifests.values():
            if isinstance(manifest, dict) and isinstance(manifest.get("leaves"), dict):
                return set(manifest["leaves"])
        return {p for p, _ in named_leaves(self.saved_abstract_state(step))}

    def _check_structure(self, target: PyTree, step: int) -> None:
        """Leaf paths must match the saved ones; a mismatch is the caller's error, not corruption."""
        saved = self._saved_paths(step)
        wanted = {p for p, _ in named_leaves(target)}
        if saved != wanted:
            raise CheckpointError(
                f"{self.step_dir(step)}: abstract_state does not match the saved state: missing from the "
                f"checkpoint {sorted(wanted - saved)[:10]}, not in abstract_state {sorted(saved - wanted)[:10]}"
            )

    def _locate_read_failure(self, target: PyTree, step: int, error: Exception) -> str:
        """Names the arrays that cannot be read, by reading the saved arrays one at a time."""
        step_dir = self.step_dir(step)
        try:
            by_path = dict(named_leaves(target))
            saved, _ = jax.tree_util.tree_flatten_with_path(
                getattr(self._mgr.item_metadata(step)[_STATE], "tree", None)
            )
        except Exception:  # noqa: BLE001 - the metadata itself is unreadable
            return f"{step_dir}: cannot read the state: {_short(error)}"
        reader = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
        bad = []
        for path, _ in saved:
            name = leaf_path(path)
            one: dict = {}
            node = one
            for k in path[:-1]:
                node = node.setdefault(_key_str(k), {})
            node[_key_str(path[-1])] = by_path[name]
            try:
                reader.restore(
                    step_dir / _STATE,
                    args=ocp.args.PyTreeRestore(
                        item=one, restore_args=ocp.checkpoint_utils.construct_restore_args(one), partial_restore=True
                    ),
                )
            except Exception:  # noqa: BLE001
                bad.append(name)
        reader.close()
        if not bad:
            return f"{step_dir}: cannot read the state: {_short(error)}"
        return f"{step_dir}: cannot read array(s) {bad[:10]}{' ...' if len(bad) > 10 else ''}: {_short(error)}"

    # -- lifecycle -------------------------------------------------------------------------------

    def wait(self) -> None:
        """Blocks until background saves (and the deletions retention asked for) are finished."""
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
