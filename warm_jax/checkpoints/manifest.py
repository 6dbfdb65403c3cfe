"""The integrity manifest: per-array digests written with a saved state and checked against a restore.

Orbax keeps no checksums of array contents, so the manifest is ours: ``manifest/manifest.process-<i>.json``
(one per jax process) maps each leaf path to its shape, dtype and digests. A fully addressable array is
hashed as its global contents (``np.asarray(x)``), which does not depend on the sharding, so a checkpoint
written on one mesh verifies when restored onto another; an array spread over several processes is
hashed shard by shard (keyed by the shard's index) in that process's manifest. Two digests per whole
array: sha256, the content's identity (``tree_sha256``, the merge metadata's member hashes), and
xxh3-128, which restores check when the manifest has it (~15x faster than sha256; an integrity check
against corrupt bytes, not an adversary). Entries without xxh3 (older checkpoints, per-shard entries)
are checked with sha256.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import xxhash
from etils import epath
from jax.experimental import multihost_utils

from warm_jax.checkpoints.errors import CheckpointCorruptError

PyTree = Any
log = logging.getLogger(__name__)

MANIFEST = "manifest"
MANIFEST_GLOB = "manifest.process-*.json"
MANIFEST_VERSION = 1


def key_str(key: Any) -> str:
    for attr in ("key", "name", "idx"):  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def leaf_path(path: Sequence[Any]) -> str:
    """'/'-joined names of a `tree_flatten_with_path` key path, e.g. 'params/layers/0/w'."""
    return "/".join(key_str(k) for k in path) or "<root>"


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
    # (hashlib and xxhash release the GIL on it, which lets map_threads hash leaves side by side).
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(_bytes(a)).hexdigest()


def _xxh(a: np.ndarray) -> str:
    return xxhash.xxh3_128(_bytes(a)).hexdigest()


# Whole-array digests a restore can check, fastest first: the first one a manifest entry has is used.
_CHECKS = (("xxh3_128", _xxh), ("sha256", _sha))


def digest_check(entries: Sequence[dict]) -> tuple[str, Any] | None:
    """(name, digest function) of the fastest whole-array digest every entry has; None if they have none."""
    for name, fn in _CHECKS:
        if entries and all(name in e for e in entries):
            return name, fn
    return None


def map_threads(fn, items: Sequence[Any]) -> list[Any]:
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
    return dict(zip([p for p, _ in leaves], map_threads(lambda kv: _describe(kv[1]), leaves)))


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


def finite_everywhere(x: Any, finite_here: bool) -> bool:
    """Whether leaf `x` holds no NaN/Inf: ``finite_here`` (``describe_leaves``'s verdict on this process's
    contents), or, for a float array spread over several processes, one answer that all processes share
    (a collective: every process must call it)."""
    if _fully_addressable(x) or not _is_float(x):
        return finite_here
    return bool(_all_finite(x))


def _verify_leaf(
    path: str, x: Any, entries: list[dict], step_dir: str, full: np.ndarray | None, digest: str | None = None
) -> None:
    """Raises CheckpointCorruptError if restored leaf `x` differs from any of its manifest entries.

    full: the global contents of `x` on host when this process does not hold it whole (else None).
    digest: the ``digest_check(entries)`` digest of a fully addressable `x`'s contents, when already computed.
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
            check = digest_check([entry])
            if check is not None:
                name, fn = check
                got = digest if digest is not None and check == digest_check(entries) else fn(full)
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


def read_manifests(step_dir: epath.Path) -> dict[int, dict]:
    """Process index -> manifest, for every manifest file of a finalised step."""
    out = {}
    for f in sorted((step_dir / MANIFEST).glob(MANIFEST_GLOB)):
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


def verify(state: PyTree, manifests: dict[int, dict], step_dir: str) -> None:
    """Checks restored `state` against the manifests: this process's one for leaves spread over processes,
    every process's entries for leaves this process holds whole.

    With several processes the gathers and the verdict are collective, so that all processes raise (and
    fall back to the same older step) or none does.
    """
    if not manifests:
        raise CheckpointCorruptError(f"{step_dir}: no manifest ({MANIFEST}/{MANIFEST_GLOB}) to verify against")
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
        check = digest_check(entries)
        hashed = check is not None and any(e["dtype"] == str(x.dtype) for e in entries)
        return check[1](_host(x)) if hashed and _fully_addressable(x) else None

    digests = map_threads(whole_digest, range(len(leaves)))
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
