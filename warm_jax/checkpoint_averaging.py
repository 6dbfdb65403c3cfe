"""Averaging K params checkpoints on disk, reading a stacked ensemble checkpoint's params, and
writing the merged RM.

``average_checkpoints`` streams the members: member k + 1 is read (TensorStore, into one of two
reused host buffer sets) on a background thread while member k is checked against its hash
manifest, placed in the sharded target and folded into a float32 running mean (the one of
``averaging``) whose buffer is donated to the update, so peak memory is one accumulator plus two
members whatever K is.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import PartitionSpec as P

from warm_jax import checkpoints, io_utils, params_io, sharding
from warm_jax.averaging import MergeError, check_compatible, normalize_weights
from warm_jax.models import transformer as tr

log = logging.getLogger(__name__)

PyTree = Any
# Config fields that may differ between members that are averaged (they do not change the maths
# of a forward pass without dropout).
_CFG_FIELDS_MAY_DIFFER = ("dropout_rate",)


# ----------------------------------------------------------------------------- streaming mean


# One small program per distinct (sharding, dtype) of leaf, not one over the whole tree: a 30-layer
# model has ~10 distinct leaf shapes but 272 leaves, and compiling a whole-tree program costs
# ~0.6 s per program on CPU against ~10 ms per leaf program; dispatching 272 calls costs ~10 ms.


@functools.lru_cache(maxsize=512)
def _leaf_update(sharding):
    """jit(a [...] float32, x [...] any float, c [] float32) → a + c·(x − a) [...] float32, a donated.

    Running mean: exact when x == a (identical members), and a's buffer is reused. c == 1 (the
    first member) gives x exactly (a + 1·(x − a) would turn −0.0 into +0.0), which lets the first
    member be copied into a preallocated accumulator by the same program.
    """

    def update(a, x, c):
        x = x.astype(jnp.float32)
        return jnp.where(c == 1.0, x, a + c * (x - a))

    return jax.jit(update, out_shardings=sharding, donate_argnums=0)


@functools.lru_cache(maxsize=512)
def _leaf_cast(sharding, dtype):
    """jit(x [...]) → x.astype(dtype) [...] in ``sharding``."""
    return jax.jit(lambda x: x.astype(dtype), out_shardings=sharding)


@functools.lru_cache(maxsize=512)
def _leaf_zeros(shape: tuple, sharding):
    """jit() → zeros [shape] float32 in ``sharding``, in a buffer of XLA's own."""
    return jax.jit(lambda: jnp.zeros(shape, jnp.float32), out_shardings=sharding)


def _new_acc(abstract_leaves: list, shardings: list) -> list:
    """Zero accumulators [...] float32 per leaf, allocated before the first member lands (dispatched
    asynchronously: XLA fills them while the caller goes on).

    A buffer of XLA's own: a member's leaves may alias reused host buffers, so the accumulator
    cannot start as the first member itself, and a donated aliased buffer is not reused in place.
    (A jitted zeros, not a transfer of np.zeros: that reads 0.5 GB of zero pages as well.)
    """
    return [_leaf_zeros(tuple(x.shape), s)() for x, s in zip(abstract_leaves, shardings)]


def _fold_in(acc: list, leaves: list, shardings: list, c: float) -> list:
    """acc + c·(member − acc), leaf by leaf; acc's buffers are donated."""
    c = jnp.float32(c)
    return [_leaf_update(s)(a, x, c) for a, x, s in zip(acc, leaves, shardings)]


def _precompile(abstract_leaves: list, shardings: list, dtypes: list) -> list:
    """Compiles the leaf programs ``average_checkpoints`` will call (once per distinct leaf type)
    and returns the zero accumulators (``_new_acc``), allocated while the rest compiles.

    Called while the first member is being read; jit's cache then serves the real calls.
    """
    for shape, s in {(tuple(x.shape), s) for x, s in zip(abstract_leaves, shardings)}:
        _leaf_zeros(shape, s).lower().compile()
    zeros = _new_acc(abstract_leaves, shardings)
    seen = set()
    for x, s, d in zip(abstract_leaves, shardings, dtypes):
        key = (tuple(x.shape), s, d)
        if key in seen:
            continue
        seen.add(key)
        member = jax.ShapeDtypeStruct(x.shape, d, sharding=s)
        acc = jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=s)
        _leaf_update(s).lower(acc, member, jax.ShapeDtypeStruct((), jnp.float32)).compile()
        if d != jnp.float32:
            _leaf_cast(s, d).lower(acc).compile()
    return zeros


def _read_model_json(directory: str) -> dict:
    path = os.path.join(directory, "model.json")
    if not os.path.isfile(path):
        raise MergeError(
            f"{directory}: not a params checkpoint (no model.json); a stacked ensemble "
            "checkpoint (WORKDIR/rm/ckpt) is read with restore_stacked_params"
        )
    return io_utils.read_json(path)


def _check_configs(cfgs: Mapping[str, dict]) -> None:
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


def _manifest_params_hash(step_dir: str) -> str | None:
    """``tree_sha256`` of the saved params, from the checkpoint's own manifest (no second hashing pass).

    None when the manifest cannot give it (several processes, or arrays hashed per shard).
    """
    leaves = _single_manifest_leaves(step_dir)
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


def _read_member(directory: str, step: int, buffers: dict[str, np.ndarray]) -> tuple[str, Exception | None]:
    """Loader thread: reads member ``directory``'s step into ``buffers`` (leaf path → host array).

    Returns (step directory, None), or (step directory, the reason) when the direct read cannot
    be used or failed, so that the main thread falls back to the Orbax restore.
    """
    step_dir = os.path.join(directory, "ckpt", str(step))
    if jax.process_count() > 1:  # each process would read whole arrays; Orbax reads its shards only
        return step_dir, checkpoints.DirectReadUnsupported("several jax processes")
    try:
        checkpoints.read_state_into(step_dir, buffers)
    except (checkpoints.DirectReadUnsupported, checkpoints.CheckpointCorruptError) as e:
        return step_dir, e
    return step_dir, None


class _Slot:
    """One set of host buffers a member is read into, reused for every other member.

    buffers: leaf path → host array [saved shape] (what TensorStore fills and the manifest checks).
    host: the arrays placed on device and folded in: the buffers in leaf order, or, packed, one
      [N] array that every buffer is a 64-byte-aligned view of.
    """

    def __init__(self, paths: list[str], abstract_leaves: list, packed: bool):
        self.packed = packed
        if packed:
            offsets, n = _packed_offsets(abstract_leaves)
            flat = checkpoints.aligned_empty((n,), abstract_leaves[0].dtype)
            views = [flat[o : o + x.size].reshape(x.shape) for o, x in zip(offsets, abstract_leaves)]
            self.buffers, self.host = dict(zip(paths, views)), [flat]
        else:
            self.buffers = {p: checkpoints.aligned_empty(x.shape, x.dtype) for p, x in zip(paths, abstract_leaves)}
            self.host = [self.buffers[p] for p in paths]


def _packed_offsets(abstract_leaves: list) -> tuple[list[int], int]:
    """Element offsets of the leaves in one packed [N] array (each on a 64-byte boundary), and N."""
    align = max(1, 64 // np.dtype(abstract_leaves[0].dtype).itemsize)
    offsets, n = [], 0
    for x in abstract_leaves:
        offsets.append(n)
        n += -(-int(np.prod(x.shape, dtype=np.int64)) // align) * align
    return offsets, max(n, 1)


def _take_member(directory: str, target: PyTree, read: tuple[str, Exception | None], slot: _Slot, shardings):
    """(the member's arrays on device [``slot.host`` in ``shardings``], its params sha256), read by
    ``_read_member``.

    The buffers are checked against the step's hash manifest (the check ``Checkpointer.restore``
    makes) and placed on device; on CPU the arrays alias the buffers, so they must be dropped
    before the buffers are read into again. If the direct read failed or does not verify, the
    member is restored through Orbax instead (which falls back past a corrupt step to an older
    one that verifies, or raises naming the checkpoint and the array): its arrays are used as they
    are, or, packed (one CPU device), copied into the buffers.
    """
    step_dir, error = read
    if error is None:
        try:
            checkpoints.check_buffers(step_dir, slot.buffers)
        except (checkpoints.DirectReadUnsupported, checkpoints.CheckpointCorruptError) as e:
            error = e
    if error is None:
        arrays = jax.device_put(slot.host, list(shardings))
    else:
        if isinstance(error, checkpoints.CheckpointCorruptError):
            log.warning("%s; restoring %s through Orbax", error, directory)
        leaves, step_dir = _restore_member(directory, target)
        if slot.packed:
            # Both in the flat order of the params tree (the buffers were made in that order).
            for buffer, leaf in zip(slot.buffers.values(), leaves):
                np.copyto(buffer, np.asarray(leaf))
            del leaves
            arrays = jax.device_put(slot.host, list(shardings))
        else:
            arrays = leaves
    member_sha = _manifest_params_hash(step_dir)
    if member_sha is None and slot.packed:  # the same paths as the params tree: tree_sha256 only sees paths
        member_sha = checkpoints.tree_sha256({p[len("params/") :]: b for p, b in slot.buffers.items()})
    elif member_sha is None:
        member_sha = checkpoints.tree_sha256(
            jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(target["params"]), arrays)
        )
    return arrays, member_sha


def average_checkpoints(dirs: Sequence[str], *, mesh, weights: Sequence[float] | None = None, rules=None):
    """Streams K ``save_params`` checkpoints into their weighted average, folded in one at a time.

    Member k + 1 is restored (read, decoded, checked against its hash manifest) on a background
    thread while member k is folded in, so peak memory is the float32 accumulator plus two
    members, whatever K is.

    Args:
      dirs: member directories (``model.json`` + ``ckpt/``), e.g. WORKDIR/rm/members/<i>.
      mesh: target mesh; params are restored and averaged in the rules' sharding on it.
      weights: one per member, non-negative (normalised); members with weight 0 are not read.
    Returns:
      (model_cfg, graphdef, params, info) with info = {"members", "weights", "hashes", "meta"}:
      the directories, normalised weights, each member's params sha256 (``tree_sha256``) and
      model.json contents.
    Raises:
      MergeError naming the first mismatching leaf (or config field), before anything is read.
    """
    dirs = [os.fspath(d) for d in dirs]
    if not dirs:
        raise MergeError("nothing to average: no checkpoint directories")
    w = normalize_weights(weights, len(dirs))
    metas = {d: _read_model_json(d) for d in dirs}
    model_cfg = tr.ModelConfig(**metas[dirs[0]]["model"])
    graphdef, abstract, axes = tr.abstract_model(model_cfg)
    with concurrent.futures.ThreadPoolExecutor(min(len(dirs), 8), thread_name_prefix="warm-meta") as pool:
        abstracts = list(pool.map(checkpoint_abstract, dirs))
    saved = {d: a for d, (a, _) in zip(dirs, abstracts)}
    steps = {d: step for d, (_, step) in zip(dirs, abstracts)}
    check_compatible({f"{dirs[0]}/model.json": abstract, **saved})
    _check_configs({d: m["model"] for d, m in metas.items()})

    shardings = sharding.named(mesh, sharding.tree_specs(axes, abstract, mesh, rules))
    target = {"params": sharding.abstract_with_sharding(abstract, shardings)}
    flat_sh, treedef = jax.tree_util.tree_flatten(shardings)
    flat_abstract = jax.tree_util.tree_leaves(abstract)
    dtypes = [jnp.dtype(x.dtype) for x in flat_abstract]

    todo = [(d, float(wk)) for d, wk in zip(dirs, w) if wk > 0]
    paths = [f"params/{checkpoints.leaf_path(p)}" for p, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]]
    # Everything on one CPU device in one dtype (a merge on a CPU host): fold the members as ONE
    # packed [N] array: one program to compile and one call per member instead of one per leaf
    # shape and per leaf; the merged leaves are views of the packed result.
    # (On one device every leaf's sharding is that device, whatever its spec says.)
    devices = {d for s in flat_sh for d in s.device_set}
    packed = (
        jax.process_count() == 1
        and len(devices) == 1
        and next(iter(devices)).platform == "cpu"
        and len(set(dtypes)) == 1
    )
    fold_abstract = [jax.ShapeDtypeStruct((_packed_offsets(flat_abstract)[1],), dtypes[0])] if packed else flat_abstract
    fold_sh = [jax.sharding.SingleDeviceSharding(next(iter(devices)))] if packed else flat_sh
    fold_dtypes = dtypes[:1] if packed else dtypes
    # Two sets of host buffers [the saved shapes], reused: member k is read into set k % 2. Each is
    # allocated by the loader when first needed, so that this overlaps with compiling.
    slots: list[_Slot | None] = [None, None]

    def slot(k: int) -> _Slot:
        if slots[k] is None:
            slots[k] = _Slot(paths, flat_abstract, packed)
        return slots[k]

    seen, hashes = 0.0, {}
    # Two stages: a loader thread reads member k + 1 into one buffer set (file reads and
    # TensorStore release the GIL) while member k, in the other, is checked against its hash
    # manifest (hashlib releases the GIL too), placed on device and folded in here. Members are
    # taken in order, so the result is the sequential one bit for bit. Memory: the accumulator
    # and the two buffer sets, whatever K is; a read into a set starts only once the member it
    # held is folded in and dropped.
    with (
        concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="warm-read") as loader,
        concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="warm-compile") as compiler,
    ):
        read = lambda i: loader.submit(lambda: _read_member(todo[i][0], steps[todo[i][0]], slot(i % 2).buffers))
        pending = read(0)
        if len(todo) > 1:
            loader.submit(slot, 1)  # queued behind member 0's read, so not in member 1's read's way
        # Compile and allocate the accumulator while member 0 is read and checked.
        compiled = compiler.submit(_precompile, fold_abstract, fold_sh, fold_dtypes)
        acc = None
        for i, (d, wk) in enumerate(todo):
            done = pending.result()
            pending = read(i + 1) if i + 1 < len(todo) else None
            leaves, hashes[d] = _take_member(d, target, done, slots[i % 2], fold_sh)
            acc = compiled.result() if acc is None else acc
            seen += wk
            acc = _fold_in(acc, leaves, fold_sh, wk / seen)  # the first member: wk / seen == 1, copied
            # Wait for the fold (dispatch is asynchronous): the leaves alias buffer set i % 2,
            # which the loader fills with member i + 2 once the next iteration starts.
            acc = jax.block_until_ready(acc)
            del leaves
    slots.clear()  # the host buffers are no longer needed
    cast = [x if d == jnp.float32 else _leaf_cast(s, d)(x) for x, s, d in zip(acc, fold_sh, fold_dtypes)]
    del acc
    if packed:
        # Views of the packed result, placed on the device without a copy (they are 64-byte aligned);
        # each keeps the packed buffer alive.
        host = np.asarray(cast[0])
        offsets, _ = _packed_offsets(flat_abstract)
        views = [host[o : o + x.size].reshape(x.shape) for o, x in zip(offsets, flat_abstract)]
        cast = jax.device_put(views, list(flat_sh))
        del host, views
    params = jax.tree_util.tree_unflatten(treedef, cast)
    info = {"members": dirs, "weights": [float(x) for x in w], "hashes": hashes, "meta": metas}
    return model_cfg, graphdef, params, info


# ----------------------------------------------------------------------------- stacked checkpoint


def restore_stacked_params(ckpt_dir: str, mesh, model_cfg: tr.ModelConfig, *, step: int | None = None, rules=None):
    """The params of a stacked ensemble training checkpoint (WORKDIR/rm/ckpt), [M, ...] per leaf.

    Only the ``params`` subtree of the saved TrainState is read (not the optimizer state); it is
    checked against the checkpoint's hash manifest. The leading axis is split over 'ensemble'
    when M is a multiple of that mesh axis, else replicated. Returns (stacked params, step).
    """
    ck = checkpoints.Checkpointer(ckpt_dir, read_only=True, async_save=False)
    try:
        step = ck.latest_step() if step is None else step
        if step is None:
            raise MergeError(f"{ckpt_dir}: no finished checkpoint")
        saved = ck.saved_abstract_state(step)
        step_dir = str(ck.step_dir(step))
    finally:
        ck.close()
    if not isinstance(saved, Mapping) or "params" not in saved:
        raise MergeError(f"{step_dir}: not a training state (no 'params' item)")
    _, abstract, axes = tr.abstract_model(model_cfg)
    saved_params = saved["params"]
    m = jax.tree_util.tree_leaves(saved_params)[0].shape[0]
    stacked_abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct((m, *x.shape), x.dtype), abstract)
    check_compatible({"the model config (stacked)": stacked_abstract, step_dir: saved_params})
    specs = sharding.tree_specs(axes, abstract, mesh, rules)
    ens = mesh.shape.get(sharding.ENSEMBLE, 1)
    lead = sharding.ENSEMBLE if m % ens == 0 and sharding.ENSEMBLE in mesh.shape else None
    stacked_specs = jax.tree.map(lambda s: P(lead, *s), specs, is_leaf=lambda x: isinstance(x, P))
    target = {"params": sharding.abstract_with_sharding(stacked_abstract, sharding.named(mesh, stacked_specs))}
    reader = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    try:
        restored = reader.restore(
            os.path.join(step_dir, "state"),
            args=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
            ),
        )
    finally:
        reader.close()
    _verify_subtree(restored, step_dir)
    return restored["params"], step


def _verify_subtree(tree: PyTree, step_dir: str) -> None:
    """Checks a partially restored tree against the step's (single-process) manifest, as a full
    restore checks its state: every leaf must be listed, and its digest must match."""
    manifests = checkpoints.manifest.read_manifests(epath.Path(step_dir))
    if len(manifests) != 1:
        log.warning("%s: %d manifests; partial restore not verified", step_dir, len(manifests))
        return
    checkpoints.manifest.verify(tree, manifests, step_dir)


# ----------------------------------------------------------------------------- output


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
) -> None:
    """Writes the merged RM as a ``save_params`` checkpoint (temporary path, renamed when complete).

    Metadata (in model.json and the checkpoint's meta item): {"merge": {"method", "members",
    "weights", "accuracies", "member_sha256", "sha256"}} — member keys as strings.
    """
    if len(members) != len(weights):
        raise MergeError(f"{len(members)} members but {len(weights)} weights")
    strkeys = lambda d: None if d is None else {str(k): v for k, v in d.items()}
    # Hash the merged params once (on a few threads): the same per-leaf hashes give the metadata's
    # sha256 and the checkpoint's manifest.
    described = checkpoints.describe_leaves(params)
    entries = {path: entry for path, (entry, _) in described.items()}
    sha = checkpoints.tree_sha256_of_entries(entries) or checkpoints.tree_sha256(params)
    meta = {
        "merge": {
            "method": "weight_average",
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
