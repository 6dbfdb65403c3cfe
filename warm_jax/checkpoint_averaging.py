"""Averaging K params checkpoints on disk, reading a stacked ensemble checkpoint's params, and
writing the merged RM.

``average_checkpoints`` streams the members, each in groups of consecutive leaves (~64 MB): the
next group is read (TensorStore, into one of two reused host buffers) on a background thread
while this one is checked against its member's hash manifest, placed in the sharded target and
folded into a float32 running mean (the one of ``averaging``) whose buffer is donated to the
update, so peak memory is one accumulator plus two groups, whatever K and the model's size.
``merge_checkpoints`` merges them with any method of ``merge_methods`` (SLERP, task arithmetic,
TIES, DARE against a base checkpoint), streamed the same way: every member's (and the base's)
copy of a group of leaves at once, merged leaf by leaf, so memory is the merged model plus
2·(K + 1) groups.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from warm_jax import checkpoints, io_utils, merge_methods, params_io, sharding
from warm_jax.averaging import MergeError, check_compatible, normalize_weights
from warm_jax.models import transformer as tr

log = logging.getLogger(__name__)

PyTree = Any
# Config fields that may differ between members that are averaged (they do not change the maths
# of a forward pass without dropout).
_CFG_FIELDS_MAY_DIFFER = ("dropout_rate",)
# A member is read, checked and folded in groups of consecutive leaves of about this many bytes,
# through two reused host buffers of the largest group's size: a merge holds the float32
# accumulator plus two groups, not two whole members (a 7B float32 model: ~30 GB, not ~85 GB).
CHUNK_BYTES = 64 << 20
_ALIGN = 64  # bytes; a leaf's view in a group buffer starts on this boundary (zero-copy device_put)


# ----------------------------------------------------------------------------- streaming mean


def _mean_update(a, x, c):
    """a + c·(x − a) in float32: exact when x == a (identical members). c == 1 (the first member)
    gives x exactly (a + 1·(x − a) would turn −0.0 into +0.0), which lets the first member be
    copied into a preallocated accumulator by the same program."""
    x = x.astype(jnp.float32)
    return jnp.where(c == 1.0, x, a + c * (x - a))


# Leaf-wise folds: one small program per distinct (shape, sharding, dtype) of leaf, not one over the
# whole tree: a 30-layer model has ~10 distinct leaf shapes but 272 leaves, and compiling a
# whole-tree program costs ~0.6 s per program on CPU against ~10 ms per leaf program.


@functools.lru_cache(maxsize=512)
def _leaf_update(sharding):
    """jit(a [...] float32, x [...] any float, c [] float32) → `_mean_update` [...] float32, a donated."""
    return jax.jit(_mean_update, out_shardings=sharding, donate_argnums=0)


@functools.lru_cache(maxsize=512)
def _leaf_cast(sharding, dtype):
    """jit(x [...]) → x.astype(dtype) [...] in ``sharding``."""
    return jax.jit(lambda x: x.astype(dtype), out_shardings=sharding)


@functools.lru_cache(maxsize=512)
def _leaf_zeros(shape: tuple, sharding):
    """jit() → zeros [shape] float32 in ``sharding``, in a buffer of XLA's own.

    Not a member's leaves: those may alias reused host buffers, and a donated aliased buffer is not
    reused in place. (A jitted zeros, not a transfer of np.zeros: that reads 0.5 GB of zero pages.)
    """
    return jax.jit(lambda: jnp.zeros(shape, jnp.float32), out_shardings=sharding)


class _LeafFold:
    """The accumulator as one float32 array per leaf, in the leaf's sharding (any mesh)."""

    def __init__(self, groups: list, abstract_leaves: list, shardings: list, dtypes: list):
        self.groups, self.abstract, self.shardings, self.dtypes = groups, abstract_leaves, shardings, dtypes

    def buffer_bytes(self, j: int) -> int:
        """Bytes of group j's host buffer."""
        return self.groups[j].nbytes

    def prepare(self) -> list:
        """Compiles the programs (once per distinct leaf type) and returns the zero accumulators,
        allocated (asynchronously) while the rest compiles. Run while the first group is read."""
        kinds = {(tuple(x.shape), s, d) for x, s, d in zip(self.abstract, self.shardings, self.dtypes)}
        for shape, s in {(shape, s) for shape, s, _ in kinds}:
            _leaf_zeros(shape, s).lower().compile()
        zeros = [_leaf_zeros(tuple(x.shape), s)() for x, s in zip(self.abstract, self.shardings)]
        for shape, s, d in kinds:
            acc = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=s)
            _leaf_update(s).lower(acc, jax.ShapeDtypeStruct(shape, d, sharding=s), jnp.float32(0)).compile()
            if d != jnp.float32:
                _leaf_cast(s, d).lower(acc).compile()
        return zeros

    def fold(self, acc: list, arrays: list, j: int, c: float) -> list:
        """Folds group j's leaves (on device, in their shardings) into acc (donated)."""
        g, c = self.groups[j], jnp.float32(c)
        for k, x in zip(range(g.start, g.stop), arrays):
            acc[k] = _leaf_update(self.shardings[k])(acc[k], x, c)
        return acc

    def leaves(self, acc: list) -> list:
        """The merged leaves in their saved dtypes."""
        return [x if d == jnp.float32 else _leaf_cast(s, d)(x) for x, s, d in zip(acc, self.shardings, self.dtypes)]


class _PackedFold:
    """The accumulator as ONE float32 [N + W] array on one CPU device (each leaf at its 64-byte
    aligned offset, the groups one after the other, W elements of slack at the end), and one
    program that folds any W-element window of a group's buffer in: one compile in all and one call
    per window, instead of one per leaf or per group size.

    W is ``chunk_bytes`` worth of elements (at most N): a group larger than that (one large leaf)
    is folded in window by window; the part of a window past its group's end is masked out.
    """

    def __init__(self, groups: list, abstract_leaves: list, sharding, dtype, chunk_bytes: int):
        self.groups, self.abstract, self.sharding, self.dtype = groups, abstract_leaves, sharding, jnp.dtype(dtype)
        itemsize = self.dtype.itemsize
        self.sizes = [g.nbytes // itemsize for g in groups]  # elements per group (multiples of 16)
        self.n = sum(self.sizes)
        self.window = w = min(max(chunk_bytes // _ALIGN * _ALIGN // itemsize, _ALIGN // itemsize), self.n)
        self.offsets = [0, *np.cumsum(self.sizes)[:-1].tolist()]  # element offset of each group in acc

        def update(acc, x, start, valid, c):
            window = jax.lax.dynamic_slice(acc, (start,), (w,))
            window = jnp.where(jnp.arange(w) < valid, _mean_update(window, x, c), window)
            return jax.lax.dynamic_update_slice(acc, window, (start,))  # in place: acc is donated

        self._update = jax.jit(update, out_shardings=sharding, donate_argnums=0)

    def buffer_bytes(self, j: int) -> int:
        """Bytes of group j's host buffer: whole windows."""
        return -(-self.sizes[j] // self.window) * self.window * self.dtype.itemsize

    def prepare(self):
        zeros = _leaf_zeros((self.n + self.window,), self.sharding)
        zeros.lower().compile()
        acc = zeros()
        i32 = jax.ShapeDtypeStruct((), jnp.int32)
        self._update = self._update.lower(
            jax.ShapeDtypeStruct((self.n + self.window,), jnp.float32, sharding=self.sharding),
            jax.ShapeDtypeStruct((self.window,), self.dtype, sharding=self.sharding),
            i32,
            i32,
            jax.ShapeDtypeStruct((), jnp.float32),
        ).compile()
        if self.dtype != jnp.float32:
            _leaf_cast(self.sharding, self.dtype).lower(
                jax.ShapeDtypeStruct((self.n + self.window,), jnp.float32)
            ).compile()
        return acc

    def fold(self, acc, buffer: np.ndarray, j: int, c: float):
        """Folds group j, read into ``buffer`` (uint8 host array), into acc (donated)."""
        x = buffer[: self.buffer_bytes(j)].view(self.dtype)
        w, c = self.window, np.float32(c)
        for k in range(0, self.sizes[j], w):
            window = jax.device_put(x[k : k + w], self.sharding)  # aliases the buffer: 64-byte aligned
            acc = self._update(acc, window, np.int32(self.offsets[j] + k), np.int32(self.sizes[j] - k), c)
        return acc

    def leaves(self, acc) -> list:
        """The merged leaves in their saved dtype: views of the packed result, placed on the device
        without a copy (64-byte aligned); each keeps the packed buffer alive."""
        if self.dtype != jnp.float32:
            acc = _leaf_cast(self.sharding, self.dtype)(acc)
        host = np.asarray(acc).view(np.uint8)  # [N + W] elements: the slack is never viewed
        itemsize = self.dtype.itemsize
        views = []
        for g, off in zip(self.groups, self.offsets):
            views += _leaf_views(host, g, self.abstract, base=off * itemsize)
        return jax.device_put(views, [self.sharding] * len(views))


def read_model_json(directory: str) -> dict:
    """model.json of a member directory, checked (its model config builds): errors name the file and field."""
    io_utils.recover(directory)
    if not os.path.isdir(directory):
        what = "is a file, not a directory" if os.path.exists(directory) else "does not exist"
        raise MergeError(f"{directory}: {what} (expected a params checkpoint directory: model.json + ckpt/)")
    if not os.path.isfile(os.path.join(directory, "model.json")):
        raise MergeError(
            f"{directory}: not a params checkpoint (no model.json); a stacked ensemble "
            "checkpoint (WORKDIR/rm/ckpt) is read with restore_stacked_params"
        )
    return params_io.read_model_json(directory)[0]


def check_configs(cfgs: Mapping[str, dict]) -> None:
    names = list(cfgs)
    ref = cfgs[names[0]]
    for name in names[1:]:
        for field in sorted(set(ref) | set(cfgs[name])):
            if field in _CFG_FIELDS_MAY_DIFFER:
                continue
            if ref.get(field) != cfgs[name].get(field):
                raise MergeError(
                    f"model config field '{field}' differs: {names[0]}/model.json has {ref.get(field)!r}, "
                    f"{name}/model.json has {cfgs[name].get(field)!r}"
                )


def _single_manifest_leaves(step_dir: str) -> dict | None:
    """The "leaves" of a step's manifest when one process wrote it, else None."""
    mdir = os.path.join(step_dir, "manifest")
    if not os.path.isdir(mdir):
        return None
    manifests = sorted(f for f in os.listdir(mdir) if f.startswith("manifest.process-"))
    if len(manifests) != 1:
        return None
    return io_utils.read_json(os.path.join(mdir, manifests[0]))["leaves"]


def _manifest_params_hash(leaves: dict | None) -> str | None:
    """``tree_sha256`` of the saved params from a manifest's "leaves" (no second hashing pass).

    None when the manifest cannot give it (several processes, or arrays hashed per shard).
    """
    return None if leaves is None else checkpoints.tree_sha256_of_entries(leaves, prefix="params/")


def _abstract_from_manifest(leaves: dict) -> PyTree | None:
    """The params tree of ShapeDtypeStructs that a manifest lists ("params/a/b" → {"a": {"b": ...}})."""
    tree: dict = {}
    try:
        for path, entry in leaves.items():
            if not path.startswith("params/"):
                continue
            *parents, name = path[len("params/") :].split("/")
            node = tree
            for k in parents:
                node = node.setdefault(k, {})
            node[name] = jax.ShapeDtypeStruct(tuple(entry["shape"]), jnp.dtype(entry["dtype"]))
    except (TypeError, KeyError, AttributeError):  # a dtype numpy cannot name, or a malformed entry
        return None
    return tree or None


def checkpoint_abstract(directory: str) -> tuple[PyTree, int]:
    """(saved params tree of ShapeDtypeStructs, latest step) of a ``save_params`` directory.

    Read from the hash manifest (one small JSON) when there is one: Orbax's own metadata read
    opens every array's TensorStore (~0.3 s for 272 arrays). A manifest that disagrees with the
    arrays fails the restore's verification anyway.
    """
    ck = checkpoints.Checkpointer(os.path.join(directory, "ckpt"), read_only=True, async_save=False)
    try:
        step = ck.latest_step()
        if step is None:
            raise MergeError(f"{directory}/ckpt: no finished checkpoint")
        leaves = _single_manifest_leaves(str(ck.step_dir(step)))
        tree = None if leaves is None else _abstract_from_manifest(leaves)
        return (tree if tree is not None else ck.saved_abstract_state(step)["params"]), step
    finally:
        ck.close()


def _restore_member(directory: str, target: PyTree) -> tuple[list, str]:
    """(flat params leaves restored by Orbax into ``target``'s shardings and verified, step directory).

    The fallback of the direct read: the latest step that verifies (warning about newer corrupt
    ones), or CheckpointCorruptError naming the checkpoint and the first bad array.
    """
    ck = checkpoints.Checkpointer(os.path.join(directory, "ckpt"), read_only=True, async_save=False)
    try:
        state, _, step = ck.restore(target)
        step_dir = str(ck.step_dir(step))
    finally:
        ck.close()
    leaves, member_def = jax.tree_util.tree_flatten(state.pop("params"))
    if member_def != jax.tree_util.tree_structure(target["params"]):  # the leaf order relies on it
        raise MergeError(f"{directory}: restored params do not have the model's tree structure")
    return leaves, step_dir


@dataclasses.dataclass(frozen=True)
class _Group:
    """Leaves [start, stop) of the flat params, read, checked and folded in together.

    offsets: byte offset of each leaf in a group buffer (64-byte aligned, in leaf order);
    nbytes: the bytes of the buffer the group spans (a multiple of 64).
    """

    start: int
    stop: int
    offsets: tuple[int, ...]
    nbytes: int


def _nbytes(x) -> int:
    return int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize


def _leaf_groups(abstract_leaves: list, chunk_bytes: int) -> list[_Group]:
    """Consecutive leaves in groups of at most ``chunk_bytes`` (a larger leaf is a group of its own)."""
    groups, start, offsets, n = [], 0, [], 0
    for i, x in enumerate(abstract_leaves):
        size = -(-_nbytes(x) // _ALIGN) * _ALIGN
        if offsets and n + size > chunk_bytes:
            groups.append(_Group(start, i, tuple(offsets), n))
            start, offsets, n = i, [], 0
        offsets.append(n)
        n += size
    groups.append(_Group(start, len(abstract_leaves), tuple(offsets), n))
    return groups


def _leaf_views(buffer: np.ndarray, group: _Group, abstract_leaves: list, base: int = 0) -> list[np.ndarray]:
    """The group's leaves [saved shapes] as views of a uint8 buffer, the first ``base`` bytes in."""
    leaves = abstract_leaves[group.start : group.stop]
    return [
        buffer[base + o : base + o + _nbytes(x)].view(np.dtype(x.dtype)).reshape(x.shape)
        for o, x in zip(group.offsets, leaves)
    ]


class _Member:
    """One member being folded in, group by group: read directly and checked against its manifest
    per group, or, once a direct read cannot be used or does not verify, restored whole through
    Orbax (which falls back past a corrupt step to an older one that verifies, or raises naming
    the checkpoint and the array) and taken from that.
    """

    def __init__(self, directory: str, step_dir: str, target: PyTree):
        self.directory, self.step_dir, self.target = directory, step_dir, target
        self.fallback: list | None = None  # the Orbax-restored leaves, in flat order
        self.saved = _single_manifest_leaves(step_dir)  # the manifest's "leaves"
        # The params sha256 from the manifest: a direct read never holds the whole member to hash.
        self.sha256 = _manifest_params_hash(self.saved)

    def take(self, j: int, group: _Group, error, host: dict, shardings: list | None) -> list | None:
        """Group ``j``, checked, in ``host`` (leaf path → view of a group buffer, which holds it
        when ``error`` — why the loader could not read it — is None).

        Returns the group's leaves on device in ``shardings``, or, with ``shardings`` None (the
        packed fold reads the buffer itself), None once ``host`` holds the verified leaves. On CPU
        the arrays alias the buffer: drop them before the buffer is read into again.
        """
        if self.fallback is None:
            if error is None and self.sha256 is None:
                error = checkpoints.DirectReadUnsupported(f"{self.step_dir}: no whole-tree hash in its manifest")
            if error is None:
                try:
                    checkpoints.check_buffers(self.step_dir, host, self.saved)
                except (checkpoints.DirectReadUnsupported, checkpoints.CheckpointCorruptError) as e:
                    error = e
            if error is None:
                return None if shardings is None else jax.device_put(list(host.values()), shardings)
            self._restore(j, error)
        leaves = self.fallback[group.start : group.stop]
        if shardings is not None:
            return leaves
        for buffer, leaf in zip(host.values(), leaves):  # both in the flat order of the params tree
            np.copyto(buffer, np.asarray(leaf))
        return None

    def _restore(self, j: int, error: Exception) -> None:
        if isinstance(error, checkpoints.CheckpointCorruptError):
            log.warning("%s; restoring %s through Orbax", error, self.directory)
        leaves, step_dir = _restore_member(self.directory, self.target)
        if j > 0 and os.path.realpath(step_dir) != os.path.realpath(self.step_dir):
            raise checkpoints.CheckpointCorruptError(
                f"{error}; part of {self.step_dir} had been averaged already, and Orbax falls back to "
                f"{step_dir}: delete {self.step_dir} and average again"
            )
        self.fallback, self.step_dir = leaves, step_dir
        self.sha256 = _manifest_params_hash(_single_manifest_leaves(step_dir)) or checkpoints.tree_sha256(
            jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(self.target["params"]), leaves)
        )


def _open_member(step_dir: str, specs: dict) -> checkpoints.StateReader | Exception:
    """Loader thread: the member's arrays opened for direct reads, or why they cannot be read so
    (the main thread then restores the member through Orbax)."""
    if jax.process_count() > 1:  # each process would read whole arrays; Orbax reads its shards only
        return checkpoints.DirectReadUnsupported("several jax processes")
    try:
        return checkpoints.StateReader(step_dir, specs)
    except (checkpoints.DirectReadUnsupported, checkpoints.CheckpointCorruptError) as e:
        return e


def _read_group(reader: checkpoints.StateReader | Exception, buffers: dict[str, np.ndarray]) -> Exception | None:
    """Loader thread: a group's arrays into ``buffers``; None, or why they could not be read."""
    if isinstance(reader, Exception):
        return reader
    try:
        reader.read_into(buffers)
    except checkpoints.CheckpointCorruptError as e:
        return e
    return None


@dataclasses.dataclass(frozen=True)
class _Inputs:
    """K params checkpoints checked against each other and the model their model.json describes.

    metas/steps: per directory, its model.json and latest step; target: {"params": abstract params
    in the rules' shardings on the mesh}; flat_*: per leaf in tree order; paths: 'params/…' names.
    """

    metas: dict
    steps: dict
    model_cfg: tr.ModelConfig
    graphdef: Any
    abstract: PyTree
    target: PyTree
    treedef: Any
    flat_sh: list
    flat_abstract: list
    dtypes: list
    paths: list
    specs: dict

    @classmethod
    def open(cls, dirs: list[str], mesh, rules) -> _Inputs:
        """Reads and checks every model.json and saved tree: MergeError naming the first mismatching
        leaf (or config field) before any array is read."""
        metas = {d: read_model_json(d) for d in dirs}
        model_cfg = tr.config_from_dict(metas[dirs[0]]["model"])
        graphdef, abstract, axes = tr.abstract_model(model_cfg)
        with concurrent.futures.ThreadPoolExecutor(min(len(dirs), 8), thread_name_prefix="warm-meta") as pool:
            abstracts = list(pool.map(checkpoint_abstract, dirs))
        saved = {d: a for d, (a, _) in zip(dirs, abstracts)}
        steps = {d: step for d, (_, step) in zip(dirs, abstracts)}
        check_compatible({f"{dirs[0]}/model.json": abstract, **saved})
        check_configs({d: m["model"] for d, m in metas.items()})
        shardings = sharding.named(mesh, sharding.tree_specs(axes, abstract, mesh, rules))
        target = {"params": sharding.abstract_with_sharding(abstract, shardings)}
        flat_sh, treedef = jax.tree_util.tree_flatten(shardings)
        flat_abstract = jax.tree_util.tree_leaves(abstract)
        paths = [f"params/{checkpoints.leaf_path(p)}" for p, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]]
        return cls(
            metas=metas,
            steps=steps,
            model_cfg=model_cfg,
            graphdef=graphdef,
            abstract=abstract,
            target=target,
            treedef=treedef,
            flat_sh=flat_sh,
            flat_abstract=flat_abstract,
            dtypes=[jnp.dtype(x.dtype) for x in flat_abstract],
            paths=paths,
            specs={p: (tuple(x.shape), x.dtype) for p, x in zip(paths, flat_abstract)},
        )


def average_checkpoints(
    dirs: Sequence[str],
    *,
    mesh,
    weights: Sequence[float] | None = None,
    rules=None,
    chunk_bytes: int = CHUNK_BYTES,
):
    """Streams K ``save_params`` checkpoints into their weighted average, a group of leaves at a time.

    Each member is read in groups of consecutive leaves (``chunk_bytes`` each, a larger leaf alone)
    into one of two reused host buffers; group j + 1 is read (TensorStore, on a background thread)
    while group j is checked against its hash manifest, placed in the sharded target and folded
    into the float32 running mean. Peak memory is the accumulator plus two groups, whatever K is.

    Args:
      dirs: member directories (``model.json`` + ``ckpt/``), e.g. WORKDIR/rm/members/<i>.
      mesh: target mesh; params are restored and averaged in the rules' sharding on it.
      weights: one per member, non-negative (normalised); members with weight 0 are not read.
      chunk_bytes: bytes per group read and folded at once.
    Returns:
      (model_cfg, graphdef, params, info) with info = {"members", "weights", "hashes", "meta"}:
      the directories, normalised weights, each member's params sha256 (``tree_sha256``) and
      model.json contents.
    Raises:
      MergeError naming the first mismatching leaf (or config field), before anything is read;
      CheckpointCorruptError naming the checkpoint and the array that does not verify.
    """
    dirs = [os.fspath(d) for d in dirs]
    if not dirs:
        raise MergeError("nothing to average: no checkpoint directories")
    w = normalize_weights(weights, len(dirs))
    inp = _Inputs.open(dirs, mesh, rules)
    metas, model_cfg, graphdef, steps, target = inp.metas, inp.model_cfg, inp.graphdef, inp.steps, inp.target
    flat_sh, treedef, flat_abstract, dtypes = inp.flat_sh, inp.treedef, inp.flat_abstract, inp.dtypes
    paths, specs = inp.paths, inp.specs
    groups = _leaf_groups(flat_abstract, chunk_bytes)

    # Everything on one CPU device in one dtype (a merge on a CPU host): one packed accumulator and
    # one fold program (`_PackedFold`); otherwise one accumulator and program per leaf (`_LeafFold`).
    # (On one device every leaf's sharding is that device, whatever its spec says.) The packed
    # fold's offsets are int32: models of 2^31 elements and more (~8B) are folded leaf by leaf.
    devices = {d for s in flat_sh for d in s.device_set}
    packed = (
        jax.process_count() == 1
        and len(devices) == 1
        and next(iter(devices)).platform == "cpu"
        and len(set(dtypes)) == 1
        and 2 * sum(g.nbytes for g in groups) // dtypes[0].itemsize < 2**31
    )
    if packed:
        one = jax.sharding.SingleDeviceSharding(next(iter(devices)))
        fold = _PackedFold(groups, flat_abstract, one, dtypes[0], chunk_bytes)
    else:
        fold = _LeafFold(groups, flat_abstract, flat_sh, dtypes)

    todo = [(d, float(wk)) for d, wk in zip(dirs, w) if wk > 0]
    items = [(i, j) for i in range(len(todo)) for j in range(len(groups))]
    # Two host buffers of the largest group (in whole windows when packed), reused: item n is read into
    # buffer n % 2. Each is allocated by the loader when first needed, overlapping the compiles.
    buffers: list[np.ndarray | None] = [None, None]
    buffer_bytes = max(fold.buffer_bytes(j) for j in range(len(groups)))

    def buffer(n: int) -> np.ndarray:
        if buffers[n % 2] is None:
            buffers[n % 2] = checkpoints.aligned_empty((buffer_bytes,), np.uint8)
        return buffers[n % 2]

    def group_buffers(n: int) -> dict[str, np.ndarray]:
        j = items[n][1]
        g = groups[j]
        return dict(zip(paths[g.start : g.stop], _leaf_views(buffer(n), g, flat_abstract)))

    step_dirs = [os.path.join(d, "ckpt", str(steps[d])) for d, _ in todo]
    readers: dict[int, Any] = {}  # loader thread only: member index -> StateReader | Exception

    def load(n: int) -> Exception | None:
        i, j = items[n]
        if j == 0:
            readers[i] = _open_member(step_dirs[i], specs)
        reader = readers[i] if j + 1 < len(groups) else readers.pop(i)
        return _read_group(reader, group_buffers(n))

    seen, hashes = 0.0, {}
    # Two stages: a loader thread reads item n + 1 into one buffer (file reads and TensorStore
    # release the GIL) while item n, in the other, is checked against its hash manifest (hashing
    # releases the GIL too), placed on device and folded in here. Members and groups are taken in
    # order, so the result is the sequential one bit for bit. A read into a buffer starts only once
    # the group it held is folded in and dropped.
    with (
        concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="warm-read") as loader,
        concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="warm-compile") as compiler,
    ):
        pending = loader.submit(load, 0)
        if len(items) > 1:
            loader.submit(buffer, 1)  # queued behind the first read, so not in its way
        # Compile and allocate the accumulator while the first group is read and checked.
        prepared = compiler.submit(fold.prepare)
        acc = None
        for n, (i, j) in enumerate(items):
            error = pending.result()
            pending = loader.submit(load, n + 1) if n + 1 < len(items) else None
            d, wk = todo[i]
            g = groups[j]
            if j == 0:
                member = _Member(d, step_dirs[i], target)
                seen += wk
            host = group_buffers(n)
            arrays = member.take(j, g, error, host, None if packed else flat_sh[g.start : g.stop])
            acc = prepared.result() if acc is None else acc
            acc = fold.fold(acc, buffer(n) if packed else arrays, j, wk / seen)  # the first member: copied in
            # Wait for the fold (dispatch is asynchronous): the arrays may alias the buffer, which
            # the loader fills again once the next iteration starts.
            acc = jax.block_until_ready(acc)
            del arrays, host
            if j + 1 == len(groups):
                hashes[d] = member.sha256
    buffers.clear()  # the host buffers are no longer needed
    cast = fold.leaves(acc)
    del acc
    params = jax.tree_util.tree_unflatten(treedef, cast)
    info = {"members": dirs, "weights": [float(x) for x in w], "hashes": hashes, "meta": metas}
    return model_cfg, graphdef, params, info


# ----------------------------------------------------------------------------- other merge methods


@functools.lru_cache(maxsize=512)
def _merge_leaf_program(method: str, params: tuple, sharding):
    """jit(base [...], members: M × [...], weights [M] float32, key | None, name_hash [] uint32) → the
    leaf merged by ``method`` [...] in ``sharding``: what ``merge_stacked`` computes for that leaf."""
    m_def = merge_methods.get_merge_method(method)
    kw = dict(params)

    def fn(base, members, weights, key, name_hash):
        k = None if key is None else jax.random.fold_in(key, name_hash)
        return merge_methods.merge_leaf(m_def, base, jnp.stack(members), weights, k, kw)

    return jax.jit(fn, out_shardings=sharding)


def check_one_featurizer(metas: Mapping[str, dict], method: str) -> None:
    """MergeError unless every member was fine-tuned from the same pretraining checkpoint.

    A task-vector method subtracts one base from every member; Baklava members (``rm_ensemble`` with
    ``EnsembleConfig.featurizer_steps``, recorded as ``featurizer_step`` in each member's model.json)
    start from different checkpoints, so their deltas from any one base would carry the gap between
    featurizers. Members without the field (merged or exported elsewhere) count as one featurizer.
    """
    steps = {d: m.get("featurizer_step") for d, m in metas.items()}
    if len(set(steps.values())) > 1:
        listed = ", ".join(f"{d}: {'last' if s is None else s}" for d, s in steps.items())
        raise MergeError(
            f"merge method '{method}' subtracts one base from every member, but the members start from different "
            f"pretraining checkpoints (featurizer_step {listed}); use --method=linear, or merge each featurizer's "
            "members against their own base"
        )


def merge_checkpoints(
    dirs: Sequence[str],
    *,
    mesh,
    method: str = "linear",
    base: str | None = None,
    weights: Sequence[float] | None = None,
    key: jax.Array | None = None,
    params: Mapping[str, float] | None = None,
    rules=None,
    chunk_bytes: int = CHUNK_BYTES,
):
    """Streams K ``save_params`` checkpoints (and a base) into one, merged by a registered method.

    linear is ``average_checkpoints`` (the running mean, memory flat in K; weights normalised). The
    other methods (see ``merge_methods``) need every member's copy of a leaf at once: the members
    and the base are read a group of leaves at a time (``chunk_bytes``; a larger leaf alone), each
    group checked against its checkpoint's hash manifest, placed in the sharded target, merged leaf
    by leaf and dropped, while the next group is read on a background thread. Peak memory is the
    merged model plus 2·(K + 1) groups on the host (and the group's float32 temporaries on the
    device), not K models. Leaf ``params/a/b`` draws its random numbers (dare) from
    ``merge_methods.leaf_key(key, 'a/b')``, so the result equals ``merge_stacked`` of the stacked
    members. Members with weight 0 are read too (their index keys dare's masks). A checkpoint that
    cannot be read directly (several jax processes, no whole-array hashes) or fails its check is
    restored whole through Orbax instead, and held until the merge ends: O(model) for each such one.

    Args:
      dirs: member directories (``model.json`` + ``ckpt/``).
      mesh: target mesh; params are read and merged in the rules' sharding on it.
      method: a name in ``merge_methods.MERGE_METHODS``.
      base: the base directory (same format and model) the task vectors start from; required by
        every method but linear, which ignores it.
      weights: one per member, ≥ 0; None: the method's default (uniform / 1 each).
      key: PRNG key (dare).
      params: the method's parameters (density, scaling).
    Returns:
      (model_cfg, graphdef, params, info); info as ``average_checkpoints``'s plus "method", "params"
      (the method's parameters with defaults filled in), "base" and "base_sha256" (None for linear).
    """
    m_def = merge_methods.get_merge_method(method)
    kw = m_def.resolve_params(dict(params or {}))
    if not m_def.needs_base:
        if base is not None:
            log.info("merge method %s takes no base; %s is not read", method, base)
        out = average_checkpoints(dirs, mesh=mesh, weights=weights, rules=rules, chunk_bytes=chunk_bytes)
        out[3].update(method=method, params=kw, base=None, base_sha256=None)
        return out
    dirs = [os.fspath(d) for d in dirs]
    if not dirs:
        raise MergeError("nothing to merge: no checkpoint directories")
    if base is None:
        raise MergeError(f"merge method '{method}' needs a base checkpoint (the initialisation of the task vectors)")
    if m_def.needs_key and key is None:
        raise MergeError(f"merge method '{method}' needs a PRNG key")
    base = os.fspath(base)
    w = merge_methods.check_weights(weights, len(dirs), m_def)
    sources = [base, *dirs]
    inp = _Inputs.open(sources, mesh, rules)
    check_one_featurizer({d: inp.metas[d] for d in dirs}, method)
    flat_abstract, flat_sh, paths = inp.flat_abstract, inp.flat_sh, inp.paths
    groups = _leaf_groups(flat_abstract, chunk_bytes)
    buffer_bytes = max(g.nbytes for g in groups)
    # Two sets of host buffers, one per source each: group j is read into set j % 2.
    buffers = [[checkpoints.aligned_empty((buffer_bytes,), np.uint8) for _ in sources] for _ in range(2)]
    step_dirs = [os.path.join(d, "ckpt", str(inp.steps[d])) for d in sources]
    names = [np.uint32(merge_methods.path_hash(p[len("params/") :])) for p in paths]
    kw_items = tuple(sorted(kw.items()))
    key = key if m_def.needs_key else None

    def hosts(j: int) -> list[dict[str, np.ndarray]]:
        g = groups[j]
        return [dict(zip(paths[g.start : g.stop], _leaf_views(b, g, flat_abstract))) for b in buffers[j % 2]]

    def load(j: int, readers: list) -> list:
        return [_read_group(r, h) for r, h in zip(readers, hosts(j))]

    out: list = [None] * len(flat_abstract)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="warm-read") as loader:
        readers = [_open_member(sd, inp.specs) for sd in step_dirs]
        sources_m = [_Member(d, sd, inp.target) for d, sd in zip(sources, step_dirs)]
        pending = loader.submit(load, 0, readers)
        for j, g in enumerate(groups):
            errors = pending.result()
            pending = loader.submit(load, j + 1, readers) if j + 1 < len(groups) else None
            host = hosts(j)
            arrays = [m.take(j, g, e, h, flat_sh[g.start : g.stop]) for m, e, h in zip(sources_m, errors, host)]
            for k in range(g.start, g.stop):
                i = k - g.start
                program = _merge_leaf_program(method, kw_items, flat_sh[k])
                out[k] = program(arrays[0][i], tuple(a[i] for a in arrays[1:]), w, key, names[k])
            # The arrays may alias the buffers (CPU), which are read into again two groups on.
            jax.block_until_ready(out[g.start : g.stop])
            del arrays, host
    buffers.clear()  # the host buffers are no longer needed
    merged = jax.tree_util.tree_unflatten(inp.treedef, out)
    info = {
        "members": dirs,
        "weights": [float(x) for x in (np.asarray(w) if weights is None else weights)],
        "hashes": {d: m.sha256 for d, m in zip(dirs, sources_m[1:])},
        "meta": {d: inp.metas[d] for d in dirs},
        "method": method,
        "params": kw,
        "base": base,
        "base_sha256": sources_m[0].sha256,
    }
    return inp.model_cfg, inp.graphdef, merged, info


# ----------------------------------------------------------------------------- stacked checkpoint


def restore_stacked_params(ckpt_dir: str, mesh, model_cfg: tr.ModelConfig, *, step: int | None = None, rules=None):
    """The params of a stacked ensemble training checkpoint (WORKDIR/rm/ckpt), [M, ...] per leaf.

    Only the ``params`` subtree of the saved TrainState is read (not the optimizer state); it is
    checked against the checkpoint's hash manifest. The leading axis follows ``sharding.stacked_specs``.
    Returns (stacked params, step).
    """
    with checkpoints.Checkpointer(ckpt_dir, read_only=True, async_save=False) as ck:
        step = ck.latest_step() if step is None else step
        if step is None:
            raise MergeError(f"{ckpt_dir}: no finished checkpoint")
        saved = ck.saved_abstract_state(step)
        step_dir = str(ck.step_dir(step))
        if not isinstance(saved, Mapping) or "params" not in saved:
            raise MergeError(f"{step_dir}: not a training state (no 'params' item)")
        _, abstract, axes = tr.abstract_model(model_cfg)
        saved_params = saved["params"]
        m = jax.tree_util.tree_leaves(saved_params)[0].shape[0]
        stacked_abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct((m, *x.shape), x.dtype), abstract)
        check_compatible({"the model config (stacked)": stacked_abstract, step_dir: saved_params})
        specs = sharding.stacked_specs(sharding.tree_specs(axes, abstract, mesh, rules), m, mesh)
        target = {"params": sharding.abstract_with_sharding(stacked_abstract, sharding.named(mesh, specs))}
        restored, step = ck.restore_partial(target, step)
    return restored["params"], step


# ----------------------------------------------------------------------------- output


def merged_sha256(params: PyTree, described: dict | None = None) -> str:
    """The sha256 ``write_merged`` records for ``params`` (``described``: their ``checkpoints.describe_leaves``)."""
    described = checkpoints.describe_leaves(params) if described is None else described
    entries = {path: entry for path, (entry, _) in described.items()}
    return checkpoints.tree_sha256_of_entries(entries) or checkpoints.tree_sha256(params)


def write_merged(
    output_dir: str,
    params: PyTree,
    *,
    model_cfg: tr.ModelConfig,
    members: list,
    weights: list,
    accuracies: dict | None,
    hashes: dict,
    tokenizer_dir: str | None,
    method: str = "linear",
    method_params: dict | None = None,
    base: str | None = None,
    base_sha256: str | None = None,
) -> None:
    """Writes the merged RM as a ``save_params`` checkpoint (temporary path, renamed when complete).

    Metadata (in model.json and the checkpoint's meta item): {"merge": {"method" (a name in
    ``merge_methods.MERGE_METHODS``), "params" (its parameters, e.g. density, scaling, seed),
    "base", "base_sha256" (the base the task vectors start from; None for linear), "members",
    "weights", "accuracies", "member_sha256", "sha256"}} — member keys as strings.
    """
    if len(members) != len(weights):
        raise MergeError(f"{len(members)} members but {len(weights)} weights")
    strkeys = lambda d: None if d is None else {str(k): v for k, v in d.items()}
    # Hash the merged params once (on a few threads): the same per-leaf hashes give the metadata's
    # sha256 and the checkpoint's manifest.
    described = checkpoints.describe_leaves(params)
    sha = merged_sha256(params, described)
    meta = {
        "merge": {
            "method": method,
            "params": dict(method_params or {}),
            "base": base,
            "base_sha256": base_sha256,
            "members": [m if isinstance(m, (int, str)) else str(m) for m in members],
            "weights": [float(x) for x in weights],
            "accuracies": strkeys(accuracies),
            "member_sha256": strkeys(hashes),
            "sha256": sha,
        }
    }
    json.dumps(meta)  # fail before writing anything if the metadata is not JSON
    params_io.save_params(
        output_dir, params, model_cfg=model_cfg, meta=meta, tokenizer_dir=tokenizer_dir, described=described
    )
