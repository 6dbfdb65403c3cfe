"""Input pipelines over written preference datasets: seeded, per-process sharded, checkpointable.

Order: epoch ``e`` of an iterator visits a seeded permutation of the split (one per member for an ensemble with
its own data orders). Global batch ``s`` of that epoch is the slice ``perm[s*B*P : (s+1)*B*P]`` (B = per-process
batch, P = process count), and process ``p`` reads its ``p``-th sub-slice of B. So processes read disjoint shards
that together cover the epoch, and the global data order does not depend on how many processes read it.

The iterator state is two integers (epoch, step in epoch) plus the settings that fix the order; it is JSON, so it is
checkpointed with the model (e.g. as an Orbax JSON item) and a restored iterator yields exactly the batches an
uninterrupted one would. The state can be restored on a different process count as long as the global batch size
(B * P) is unchanged.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from warm_jax.data import preference as pref

DEFAULT_FIELDS = (
    "chosen_tokens",
    "rejected_tokens",
    "chosen_length",
    "rejected_length",
    "prompt_length",
    "flipped",
    "index",
)
STATE_VERSION = 1
# State entries that must match on restore: they fix which examples each global step reads.
_ORDER_KEYS = ("num_examples", "global_batch_size", "seed", "num_members", "shuffle", "drop_remainder")


def load_split(dataset_dir: str | os.PathLike, split: str) -> Sequence[dict[str, Any]]:
    """Random-access data source over one split: ``len(src)``, ``src[i]`` and ``src.__getitems__(indices)``.

    Examples are dicts of numpy values; text fields come back as UTF-8 bytes.
    """
    import tensorflow_datasets as tfds  # lazy: slow to import, and only readers need it

    builder = tfds.builder_from_directory(os.fspath(dataset_dir))
    if split not in builder.info.splits:
        raise KeyError(f"{dataset_dir} has no split '{split}'; it has {sorted(builder.info.splits)}")
    return builder.as_data_source(split=split)


def load_metadata(dataset_dir: str | os.PathLike) -> dict[str, Any]:
    from warm_jax.data import builders

    path = Path(dataset_dir) / builders.METADATA_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {dataset_dir} is not a dataset written by warm_jax.data")
    return json.loads(path.read_text())


def _read(source: Sequence[Mapping[str, Any]], indices: np.ndarray, fields: Sequence[str]) -> dict[str, np.ndarray]:
    """Reads `indices` (any shape) and stacks each field to ``indices.shape + field_shape``.

    Each distinct example is read once (ensemble members often draw the same example in one step).
    """
    unique, inverse = np.unique(indices.reshape(-1), return_inverse=True)
    keys = [int(i) for i in unique]
    records = source.__getitems__(keys) if hasattr(source, "__getitems__") else [source[i] for i in keys]
    out = {}
    for name in fields:
        try:
            stacked = np.stack([np.asarray(r[name]) for r in records])
        except KeyError:
            raise KeyError(f"field '{name}' is not in the dataset; it has {sorted(records[0])}") from None
        out[name] = stacked[inverse].reshape(indices.shape + stacked.shape[1:])
    return out


class PreferenceIterator:
    """Checkpointable batch iterator over a data source (see the module docstring for the order).

    Yields dicts of numpy arrays: ``[B, ...]`` per field when `num_members` is None (one order shared by the whole
    ensemble), else ``[M, B, ...]`` with member m's order seeded by (seed, m). Each batch also has ``valid`` bool
    ``[B]`` / ``[M, B]``: all True unless ``drop_remainder=False`` pads the last batch of an epoch (with examples from
    the start of the epoch's order) to full size.
    """

    def __init__(
        self,
        source: Sequence[Mapping[str, Any]],
        *,
        batch_size: int,
        seed: int,
        num_members: int | None = None,
        num_epochs: int | None = None,
        shuffle: bool = True,
        drop_remainder: bool = True,
        process_index: int | None = None,
        process_count: int | None = None,
        fields: Sequence[str] = DEFAULT_FIELDS,
    ):
        self._source = source
        self._n = len(source)
        self._batch_size = int(batch_size)
        self._seed = int(seed)
        self._num_members = num_members
        self._num_epochs = num_epochs
        self._shuffle = shuffle
        self._drop_remainder = drop_remainder
        self._process_index = jax.process_index() if process_index is None else int(process_index)
        self._process_count = jax.process_count() if process_count is None else int(process_count)
        self._fields = tuple(fields)
        if self._batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if num_members is not None and num_members < 1:
            raise ValueError(f"num_members must be positive or None, got {num_members}")
        if not 0 <= self._process_index < self._process_count:
            raise ValueError(f"process_index={self._process_index} is not in [0, process_count={self._process_count})")
        self._global_batch = self._batch_size * self._process_count
        full, rest = divmod(self._n, self._global_batch)
        self._steps_per_epoch = full if drop_remainder else full + (rest > 0)
        if self._steps_per_epoch == 0:
            raise ValueError(
                f"{self._n} examples make no full global batch of {self._global_batch} "
                f"(batch_size={batch_size} x process_count={self._process_count}); use "
                "drop_remainder=False or a smaller batch"
            )
        self._epoch = 0
        self._step = 0
        self._perms: tuple[int, np.ndarray] | None = None  # (epoch, int64[M or 1, N]) cache

    @property
    def steps_per_epoch(self) -> int:
        return self._steps_per_epoch

    def _orders(self, epoch: int) -> np.ndarray:
        """int64[M or 1, N]: the example order of each member (or the shared order) in `epoch`."""
        if self._perms is None or self._perms[0] != epoch:
            members = [None] if self._num_members is None else range(self._num_members)
            if self._shuffle:
                # Slot 0 is the shared order, 1 + m member m's. (Not "no slot" for the shared order: SeedSequence treats
                # trailing zero words as absent, so [.., epoch] and [.., epoch, 0] would give the same permutation.)
                orders = [
                    pref.stable_permutation(self._n, self._seed, pref.STREAM_ORDER, epoch, 0 if m is None else 1 + m)
                    for m in members
                ]
            else:
                orders = [np.arange(self._n, dtype=np.int64) for _ in members]
            self._perms = (epoch, np.stack(orders))
        return self._perms[1]

    def _positions(self) -> np.ndarray:
        """int64[B]: positions in the epoch's order that this process reads at the current step."""
        start = self._step * self._global_batch + self._process_index * self._batch_size
        return np.arange(start, start + self._batch_size, dtype=np.int64)

    def __iter__(self) -> PreferenceIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._num_epochs is not None and self._epoch >= self._num_epochs:
            raise StopIteration
        positions = self._positions()
        orders = self._orders(self._epoch)
        indices = orders[:, positions % self._n]  # [M or 1, B]; wraps only in a padded last batch
        batch = _read(self._source, indices, self._fields)
        batch["valid"] = np.broadcast_to(positions < self._n, indices.shape).copy()
        if self._num_members is None:
            batch = {k: v[0] for k, v in batch.items()}
        self._step += 1
        if self._step == self._steps_per_epoch:
            self._epoch, self._step = self._epoch + 1, 0
        return batch

    def get_state(self) -> dict[str, Any]:
        """JSON-able state; `set_state` on a fresh iterator over the same data resumes exactly here."""
        return {
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "step": self._step,
            "num_examples": self._n,
            "global_batch_size": self._global_batch,
            "seed": self._seed,
            "num_members": self._num_members,
            "shuffle": self._shuffle,
            "drop_remainder": self._drop_remainder,
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"iterator state version {state.get('version')!r} is not {STATE_VERSION}")
        mine = self.get_state()
        for key in _ORDER_KEYS:
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"iterator state has {key}={state.get(key)!r} but this iterator has {key}={mine[key]!r}; "
                    "restoring would replay a different data order"
                )
        if not 0 <= int(state["step"]) < self._steps_per_epoch:
            raise ValueError(f"iterator state step={state['step']} is outside [0, {self._steps_per_epoch})")
        self._epoch, self._step = int(state["epoch"]), int(state["step"])


def eval_batches(
    source: Sequence[Mapping[str, Any]],
    batch_size: int,
    *,
    fields: Sequence[str] = DEFAULT_FIELDS,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """One sequential pass, ``[B, ...]`` batches; the last is padded and ``valid`` bool[B] marks real examples.

    With several processes each reads its sub-slice of every global batch, and all yield the same number of batches.
    """
    return PreferenceIterator(
        source,
        batch_size=batch_size,
        seed=0,
        shuffle=False,
        num_epochs=1,
        drop_remainder=False,
        process_index=process_index,
        process_count=process_count,
        fields=fields,
    )


def to_global(
    batch: Mapping[str, np.ndarray],
    sharding_for: Callable[[str, np.ndarray], jax.sharding.Sharding] | jax.sharding.Sharding,
) -> dict[str, jax.Array]:
    """A global batch that every process holds in full -> global `jax.Array`s.

    `sharding_for` is one sharding for every field or a function (field name, array) -> sharding. Each process copies
    only the slices its devices address (`jax.make_array_from_callback`), so any mesh layout works, including an
    ensemble axis that spans processes while every member needs its whole batch.
    """
    from warm_jax.sharding import put_global

    return {
        name: put_global(x, sharding_for(name, x) if callable(sharding_for) else sharding_for)
        for name, x in batch.items()
    }
