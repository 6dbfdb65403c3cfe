"""Checkpoints: an Orbax `CheckpointManager` wrapper with preemption saves and an integrity manifest.

A step directory holds four Orbax items, finalised together (Orbax writes `<step>.orbax-checkpoint-tmp-*`
and renames it when every item is committed, so an unfinished step is never listed):

  state/      the training state pytree (params, optimizer state, step, key), any sharding
  data/       the input-pipeline iterator state (a JSON dict), optional
  meta/       free-form JSON metadata, optional
  manifest/   `manifest.process-<i>.json`, one per jax process: leaf path -> sha256, xxh3_128, shape, dtype,
              and the `layout` record of where each array of state/ lies (for `direct_read`)

Only Orbax's public API is used: the state item is a PyTreeCheckpointHandler with the options chosen
here (OCDBT, zarr v2, compression on request), which restores checkpoints of either setting and those
written through StandardCheckpointHandler.

This module is the manager (`Checkpointer`) and the package's public names. The pieces:

  manifest.py     the digests of every saved array, and their check against a restore
  direct_read.py  a saved state's arrays straight into caller-owned host buffers (no Orbax)
  preemption.py   SIGTERM as a save decision
  errors.py       CheckpointError and its kinds
"""

from __future__ import annotations

import gc
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as ocp_policies

from warm_jax.checkpoints.direct_read import (
    LAYOUT,
    StateReader,
    aligned_empty,
    check_buffers,
    layout_record,
    read_state_into,
)
from warm_jax.checkpoints.errors import (
    CheckpointCorruptError,
    CheckpointError,
    DirectReadUnsupported,
    NonFiniteStateError,
    short_error,
)
from warm_jax.checkpoints.manifest import (
    MANIFEST as _MANIFEST,
    MANIFEST_VERSION as _MANIFEST_VERSION,
    describe_leaves,
    finite_everywhere,
    key_str,
    leaf_hashes,
    leaf_path,
    named_leaves,
    read_manifests,
    tree_sha256,
    tree_sha256_of_entries,
    verify,
)
from warm_jax.checkpoints.preemption import install_sigterm_handler, preemption_requested, reached_preemption

__all__ = [
    "CheckpointCorruptError",
    "CheckpointError",
    "Checkpointer",
    "DirectReadUnsupported",
    "NonFiniteStateError",
    "StateReader",
    "aligned_empty",
    "check_buffers",
    "describe_leaves",
    "install_sigterm_handler",
    "leaf_hashes",
    "leaf_path",
    "named_leaves",
    "preemption_requested",
    "read_state_into",
    "tree_sha256",
    "tree_sha256_of_entries",
]

PyTree = Any

log = logging.getLogger(__name__)

_STATE, _DATA, _META = "state", "data", "meta"


def _state_handler(compress: bool) -> ocp.PyTreeCheckpointHandler:
    """The `state` item's handler: OCDBT, zarr (v2) chunks, zstd only when `compress`.

    zarr v2 inside OCDBT is the layout the manifest's `layout` record describes (`direct_read`);
    restoring reads the codec from each array's own metadata, so either setting reads both.
    """
    return ocp.PyTreeCheckpointHandler(
        save_concurrent_gb=96,
        restore_concurrent_gb=96,
        use_ocdbt=True,
        use_zarr3=False,
        use_compression=compress,
    )


def _as_array(x: Any) -> Any:
    """Array-likes (Python and numpy scalars) as numpy arrays: every leaf is saved as an array."""
    return x if isinstance(x, (np.ndarray, jax.Array)) else np.asarray(x)


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
        state_handler = _state_handler(compress)
        registry.add(_STATE, ocp.args.PyTreeSave, state_handler)
        registry.add(_STATE, ocp.args.PyTreeRestore, state_handler)
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
        return reached_preemption(step)

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
            if not finite_everywhere(x, finite):
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
            LAYOUT: layout_record(named),
        }

        state = jax.tree.map(_as_array, state)
        items: dict[str, Any] = {_STATE: ocp.args.PyTreeSave(state), _MANIFEST: ocp.args.JsonSave(manifest)}
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
            raise CheckpointCorruptError(f"{self.step_dir(step)}: unreadable state metadata: {short_error(e)}") from e
        tree = getattr(meta, "tree", meta)
        return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding), tree)

    def restore_partial(self, abstract_part: PyTree, step: int | None = None) -> tuple[PyTree, int]:
        """Restores (part, step): only the leaves of `abstract_part`, verified against the manifest.

        abstract_part: a subtree of the saved state with the same nesting (e.g. {"params": ...} of a
          TrainState saved as a dict), leaves jax.ShapeDtypeStruct (or arrays) with `.sharding`; the
          other saved arrays (optimizer state) are not read.
        step: None is the latest step; a step that does not verify raises CheckpointCorruptError (no
          fallback: a part of an older step is seldom what the caller wants).
        """
        self.wait()
        step = self._resolve(step)
        target = jax.tree_util.tree_map_with_path(lambda p, x: _abstract_leaf(leaf_path(p), x), abstract_part)
        self._check_structure(target, step, partial=True)
        part = self._read_state(step, target, partial=True)
        if self.verify:
            verify(part, read_manifests(self.step_dir(step)), str(self.step_dir(step)))
        return part, step

    def _state_args(self, target: PyTree, partial: bool) -> ocp.args.PyTreeRestore:
        return ocp.args.PyTreeRestore(
            item=target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=partial,
        )

    def _read_state(self, step: int, target: PyTree, partial: bool) -> PyTree:
        """The `state` item (`partial`: the leaves of `target` only) in `target`'s shardings, unverified;
        a read failure is a CheckpointCorruptError naming the arrays that cannot be read."""
        try:
            return self._mgr.restore(step, args=ocp.args.Composite(**{_STATE: self._state_args(target, partial)}))[
                _STATE
            ]
        except Exception as e:  # noqa: BLE001 - tensorstore/orbax raise many types on corrupt bytes
            message = self._locate_read_failure(target, step, e)
            # A failed Orbax read orphans the reads of the other arrays; collect them now, so that their
            # "exception ignored" reports come here and not at some later, unrelated moment.
            gc.collect()
            raise CheckpointCorruptError(message) from e

    def _restore_step(self, abstract_state: PyTree | None, step: int) -> tuple[PyTree, dict | None, int]:
        step = self._resolve(step)
        step_dir = self.step_dir(step)
        if abstract_state is None:
            target = self.saved_abstract_state(step)
        else:
            target = jax.tree_util.tree_map_with_path(lambda p, x: _abstract_leaf(leaf_path(p), x), abstract_state)
            self._check_structure(target, step)
        state = self._read_state(step, target, partial=False)
        data = None
        if (step_dir / _DATA).exists():
            try:
                data = self._mgr.restore(step, args=ocp.args.Composite(**{_DATA: ocp.args.JsonRestore()}))[_DATA]
            except Exception as e:  # noqa: BLE001 - a truncated or unparsable JSON item
                raise CheckpointCorruptError(f"{step_dir}: unreadable '{_DATA}' item: {short_error(e)}") from e
        if self.verify:
            verify(state, read_manifests(step_dir), str(step_dir))
        return state, data, step

    def _saved_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
        """Leaf path -> global shape of the saved state: from the manifest (every process's lists every
        leaf), else from Orbax's metadata, which opens every array's TensorStore (~1 ms per array)."""
        try:
            manifests = read_manifests(self.step_dir(step))
        except CheckpointCorruptError:  # unreadable: restore's verification reports it
            manifests = {}
        for manifest in manifests.values():
            leaves = manifest.get("leaves") if isinstance(manifest, dict) else None
            if isinstance(leaves, dict) and all(isinstance(e, dict) and "shape" in e for e in leaves.values()):
                return {p: tuple(e["shape"]) for p, e in leaves.items()}
        return {p: tuple(x.shape) for p, x in named_leaves(self.saved_abstract_state(step))}

    def _check_structure(self, target: PyTree, step: int, partial: bool = False) -> None:
        """Leaf paths and shapes must match the saved ones (`partial`: a subset of them); a mismatch is
        the caller's error (a model or optimizer configured differently from the one that saved), not
        corruption, so restore() does not fall back to an older step but says so."""
        saved = self._saved_shapes(step)
        wanted = {p: tuple(x.shape) for p, x in named_leaves(target)}
        if not wanted.keys() <= saved.keys() or (not partial and saved.keys() != wanted.keys()):
            raise CheckpointError(
                f"{self.step_dir(step)}: abstract_state does not match the saved state: missing from the "
                f"checkpoint {sorted(wanted.keys() - saved.keys())[:10]}, not in abstract_state "
                f"{sorted(saved.keys() - wanted.keys())[:10]}"
            )
        differ = [p for p in sorted(wanted) if wanted[p] != saved[p]]
        if differ:
            shown = ", ".join(f"'{p}' requested {list(wanted[p])}, saved {list(saved[p])}" for p in differ[:5])
            more = f" and {len(differ) - 5} more" if len(differ) > 5 else ""
            raise CheckpointError(
                f"{self.step_dir(step)}: the requested shapes differ from the saved ones ({shown}{more}); "
                "was the checkpoint written with another model or ensemble configuration?"
            )

    def _locate_read_failure(self, target: PyTree, step: int, error: Exception) -> str:
        """Names the arrays of `target` that cannot be read, by reading them one at a time."""
        step_dir = self.step_dir(step)
        bad = []
        for path, x in jax.tree_util.tree_flatten_with_path(target)[0]:
            one: dict = {}
            node = one
            for k in path[:-1]:
                node = node.setdefault(key_str(k), {})
            node[key_str(path[-1])] = x
            try:
                self._read_one(step, one)
            except Exception:  # noqa: BLE001
                bad.append(leaf_path(path))
        if not bad:
            return f"{step_dir}: cannot read the state: {short_error(error)}"
        return f"{step_dir}: cannot read array(s) {bad[:10]}{' ...' if len(bad) > 10 else ''}: {short_error(error)}"

    def _read_one(self, step: int, one: PyTree) -> None:
        self._mgr.restore(step, args=ocp.args.Composite(**{_STATE: self._state_args(one, partial=True)}))

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
