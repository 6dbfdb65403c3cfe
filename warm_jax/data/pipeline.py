"""Input pipelines over written preference datasets: seeded, per-process sharded, checkpointable.

Order: epoch ``e`` of an iterator visits a seeded permutation of the split (one per member for an ensemble with
its own data orders). Global batch ``s`` of that epoch is the slice ``perm[s*G : (s+1)*G]`` (G = global batch size).
A process reads only the entries of each global batch that its devices hold: given `local_rows.LocalRows` (computed
from the batch sharding), exactly those rows and members; without it, the ``p``-th of P contiguous sub-slices of
``B = G / P`` rows. Either way processes read disjoint shards that together cover the epoch, and the global batch
does not depend on how many processes read it.

The iterator state is two integers (epoch, step in epoch) plus the settings that fix the order; it is JSON, so it is
checkpointed with the model (e.g. as an Orbax JSON item) and a restored iterator yields exactly the batches an
uninterrupted one would. The state can be restored on a different process count as long as the global batch size
(B * P) is unchanged.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import logging
import operator
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from warm_jax.cli_errors import UserError
from warm_jax.data import preference as pref
from warm_jax.data.local_rows import LocalRows

log = logging.getLogger(__name__)

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


class SplitNotFoundError(UserError, KeyError):
    """The dataset has no such split (a KeyError for callers that look splits up like keys)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclasses.dataclass(frozen=True)
class _Shard:
    """One shard file to read whole; the shape of `array_record_data_source.FileInstruction` (no recount)."""

    filename: str
    skip: int
    take: int
    examples_in_shard: int


class SplitSource(Sequence):
    """Random access over the ArrayRecord shards of one split: ``len(src)``, ``src[i]``, ``src.__getitems__(keys)``.

    Records are decoded with the feature spec in `warm_jax.data.builders.features`, built here from the stored
    ``seq_len``: nothing that the dataset's own files name (``features.json``, ``dataset_info.json``) is imported or
    even read, so a dataset folder cannot run code. Examples are dicts of numpy values (Python scalars for scalar
    fields, int32[seq_len] token arrays); text fields come back as UTF-8 bytes.
    """

    def __init__(self, shards: Sequence[_Shard], seq_len: int, name: str):
        from array_record.python import array_record_data_source  # lazy, like every reader dependency

        self._shards = list(shards)
        self._ends = np.cumsum([s.take for s in self._shards]).tolist()
        self._seq_len = seq_len
        self._name = name
        self._source = array_record_data_source.ArrayRecordDataSource(self._shards)
        self._features = None

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __repr__(self) -> str:
        return f"SplitSource({self._name}, {len(self)} examples)"

    def _key(self, key: Any) -> int:
        i = operator.index(key)
        i = i + len(self) if i < 0 else i
        if not 0 <= i < len(self):
            raise IndexError(f"{self._name}: index {key} is out of range for {len(self)} examples")
        return i

    def _where(self, i: int) -> str:
        shard = bisect.bisect_right(self._ends, i)
        return f"{self._shards[shard].filename}: record {i - (self._ends[shard - 1] if shard else 0)}"

    def _decode(self, record: bytes, i: int) -> dict[str, Any]:
        if self._features is None:
            from warm_jax.data import builders

            self._features = builders.features(self._seq_len)
        try:
            return self._features.deserialize_example_np(record)
        except Exception as e:  # pylint: disable=broad-except  # any failure here means damaged bytes in the file
            raise UserError(f"{self._where(i)}: cannot decode it ({type(e).__name__}: {e})") from e

    def __getitem__(self, key: Any) -> dict[str, Any]:  # type: ignore[override]
        i = self._key(key)
        try:
            record = self._source[i]
        except RuntimeError as e:  # the reader's error for a damaged chunk
            raise UserError(f"{self._where(i)}: unreadable ({e})") from e
        return self._decode(record, i)

    def __getitems__(self, keys: Sequence[int]) -> list[dict[str, Any]]:
        keys = [self._key(k) for k in keys]
        if not keys:
            return []
        try:
            records = self._source.__getitems__(keys)
        except RuntimeError:
            for i in keys:  # find the damaged record, to name it
                self[i]
            raise
        return [self._decode(r, i) for r, i in zip(records, keys)]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self[i]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_features": None}  # rebuilt on first use after unpickling


def _shard_records(path: Path) -> int:
    from array_record.python import array_record_module

    reader = array_record_module.ArrayRecordReader(os.fspath(path))
    try:
        if reader.ok():
            return reader.num_records()
    finally:
        try:
            reader.close()
        except RuntimeError as e:  # the reader keeps its error until it is closed
            raise UserError(f"{path}: not a readable ArrayRecord file ({e or 'damaged or truncated'})") from None
    raise UserError(f"{path}: not a readable ArrayRecord file")


class Subset(Sequence):
    """The records of ``source`` at ``indices`` (int [k]) as a source of their own: ``len`` k, item i is
    ``source[indices[i]]``; ``__getitems__`` passes through, so a split's shards are still read in batches."""

    def __init__(self, source: Sequence[Mapping[str, Any]], indices: np.ndarray):
        self._source = source
        self._indices = np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i: Any) -> Mapping[str, Any]:  # type: ignore[override]
        return self._source[int(self._indices[i])]

    def __getitems__(self, keys: Sequence[int]) -> list[Mapping[str, Any]]:
        return _read_records(self._source, [int(self._indices[k]) for k in keys])


def _read_records(source: Sequence[Mapping[str, Any]], keys: list[int]) -> list[Mapping[str, Any]]:
    return source.__getitems__(keys) if hasattr(source, "__getitems__") else [source[i] for i in keys]


def load_split(dataset_dir: str | os.PathLike, split: str) -> SplitSource:
    """Random-access data source over one split (see `SplitSource`), checked against the dataset's metadata."""
    from warm_jax.data import builders

    meta = load_metadata(dataset_dir)
    if split not in meta["splits"]:
        raise SplitNotFoundError(f"{dataset_dir} has no split '{split}'; it has {sorted(meta['splits'])}")
    expected = meta["splits"][split]["num_examples"]
    if expected == 0:
        raise UserError(f"{dataset_dir}: split '{split}' has no examples")
    found: dict[int, set[int]] = {}
    for path in Path(dataset_dir).iterdir():
        m = re.fullmatch(builders.SHARD_PATTERN, path.name)
        if m and m["split"] == split:
            found.setdefault(int(m["count"]), set()).add(int(m["shard"]))
    if len(found) != 1 or set(range(next(iter(found)))) != next(iter(found.values())):
        have = sorted(p.name for p in Path(dataset_dir).glob(f"{builders.DATASET_NAME}-{split}.*"))
        raise UserError(f"{dataset_dir}: split '{split}' does not have a complete set of shard files; found {have}")
    count = next(iter(found))
    shards = []
    for k in range(count):
        path = Path(dataset_dir) / f"{builders.DATASET_NAME}-{split}.array_record-{k:05d}-of-{count:05d}"
        n = _shard_records(path)
        shards.append(_Shard(os.fspath(path), 0, n, n))
    total = sum(s.take for s in shards)
    if total != expected:
        raise UserError(
            f"{dataset_dir}: split '{split}' has {total} records in its shard files but {builders.METADATA_FILE} "
            f"says {expected}; a shard is truncated or was replaced"
        )
    return SplitSource(shards, meta["seq_len"], f"{dataset_dir}:{split}")


def load_metadata(dataset_dir: str | os.PathLike) -> dict[str, Any]:
    """The dataset's ``preference_metadata.json``, checked; an error names the file and the field at fault."""
    from warm_jax.data import builders

    path = Path(dataset_dir) / builders.METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {dataset_dir} is not a dataset written by warm_jax.data")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    _check_metadata(meta, path, builders)
    return meta


_NUMBER = (int, float)
_STATS_KEYS = ("mean", "min", "p50", "p95", "max")


def _field(obj: Any, key: str, kinds: type | tuple[type, ...], path: Path, prefix: str = "") -> Any:
    """``obj[key]`` if it has one of `kinds` (never a bool unless asked), else `UserError` naming the field."""
    name = f"{prefix}{key}"
    if key not in obj:
        raise UserError(f"{path}: field '{name}' is missing")
    value, kinds = obj[key], kinds if isinstance(kinds, tuple) else (kinds,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        want = "/".join("null" if k is type(None) else k.__name__ for k in kinds)
        raise UserError(f"{path}: field '{name}': expected {want}, got {type(value).__name__} {value!r:.60}")
    return value


def _check_metadata(meta: Any, path: Path, builders: Any) -> None:
    if not isinstance(meta, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    version = _field(meta, "format_version", int, path)
    if version != builders.FORMAT_VERSION:
        raise UserError(f"{path}: field 'format_version' is {version}; this reader knows {builders.FORMAT_VERSION}")
    _field(meta, "source", str, path)
    if not all(isinstance(f, str) for f in _field(meta, "source_files", list, path)):
        raise UserError(f"{path}: field 'source_files': expected a list of strings")
    _field(meta, "tokenizer", dict, path)
    if _field(meta, "tokenizer_dir", (str, type(None)), path) not in (None, builders.TOKENIZER_DIR):
        raise UserError(f"{path}: field 'tokenizer_dir' must be null or {builders.TOKENIZER_DIR!r}")
    lengths = {k: _field(meta, k, int, path) for k in ("max_prompt_len", "max_response_len", "seq_len")}
    if min(lengths.values()) < 1 or lengths["seq_len"] != lengths["max_prompt_len"] + lengths["max_response_len"]:
        raise UserError(f"{path}: fields {lengths} are inconsistent (seq_len = max_prompt_len + max_response_len >= 2)")
    for name, s in _field(meta, "splits", dict, path).items():
        prefix = f"splits.{name}."
        if not re.fullmatch(builders.SPLIT_NAME, name):
            raise UserError(f"{path}: field 'splits': {name!r} is not a split name")
        if not isinstance(s, dict):
            raise UserError(f"{path}: field 'splits.{name}': expected object, got {type(s).__name__}")
        for key in ("num_examples", "num_flipped"):
            if _field(s, key, int, path, prefix) < 0:
                raise UserError(f"{path}: field '{prefix}{key}' is negative")
        for key in ("flip_fraction", "configured_flip_fraction"):
            _field(s, key, _NUMBER, path, prefix)
        _field(s, "num_truncated", dict, path, prefix)
        for key in ("prompt_length", "chosen_length", "rejected_length"):
            stats = _field(s, key, dict, path, prefix)
            for k in _STATS_KEYS:
                _field(stats, k, _NUMBER, path, f"{prefix}{key}.")
    skipped = _field(meta, "skipped", dict, path)
    _field(skipped, "total", int, path, "skipped.")
    _field(skipped, "by_reason", dict, path, "skipped.")
    _field(skipped, "first_messages", list, path, "skipped.")


def _read(source: Sequence[Mapping[str, Any]], indices: np.ndarray, fields: Sequence[str]) -> dict[str, np.ndarray]:
    """Reads `indices` (any shape) and stacks each field to ``indices.shape + field_shape``.

    Each distinct example is read once (ensemble members often draw the same example in one step).
    """
    unique, inverse = np.unique(indices.reshape(-1), return_inverse=True)
    keys = [int(i) for i in unique]
    records = _read_records(source, keys)
    out = {}
    for name in fields:
        try:
            stacked = np.stack([np.asarray(r[name]) for r in records])
        except KeyError:
            raise KeyError(f"field '{name}' is not in the dataset; it has {sorted(records[0])}") from None
        out[name] = stacked[inverse].reshape(indices.shape + stacked.shape[1:])
    return out


def read_rows(
    source: Sequence[Mapping[str, Any]], rows: np.ndarray, fields: Sequence[str] = DEFAULT_FIELDS
) -> dict[str, np.ndarray]:
    """The examples at ``rows`` (int [r]: positions in `source`) as one array ``[r, ...]`` per field.

    For a pass that reads only some rows of a split (each process its own, ``batched.process_rows``)."""
    rows = np.asarray(rows, np.int64)
    if rows.ndim != 1 or not len(rows):
        raise ValueError(f"read_rows: rows must be a non-empty 1-D index array, got shape {rows.shape}")
    return _read(source, rows, fields)


class PreferenceIterator:
    """Checkpointable batch iterator over a data source (see the module docstring for the order).

    Yields dicts of numpy arrays: ``[B, ...]`` per field when `num_members` is None (one order shared by the whole
    ensemble), else ``[M, B, ...]`` with member m's order seeded by (seed, m). Each batch also has ``valid`` bool
    ``[B]`` / ``[M, B]``: all True unless ``drop_remainder=False`` pads the last batch of an epoch (with examples from
    the start of the epoch's order) to full size.

    With `local` (this process's `LocalRows` of the ``[G]`` / ``[M, G]`` global batch, G = `batch_size`) a batch is
    the process's grid ``[r, ...]`` / ``[m, r, ...]`` of those rows and members, and only the entries its devices
    hold are read (others are zero); `local_rows.assemble` builds the global arrays from it. Without `local`,
    `batch_size` is per process and process p reads rows ``[p*B, (p+1)*B)`` of the ``B * process_count`` global
    batch. `rows_read` / `records_read` count the batch entries filled and the distinct records fetched.
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
        local: LocalRows | None = None,
    ):
        self._source = source
        self._n = len(source)
        self._batch_size = int(batch_size)
        self._seed = int(seed)
        self._num_members = num_members
        self._num_epochs = num_epochs
        self._shuffle = shuffle
        self._drop_remainder = drop_remainder
        self._fields = tuple(fields)
        if self._batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if num_members is not None and num_members < 1:
            raise ValueError(f"num_members must be positive or None, got {num_members}")
        per_process = local is None  # batch_size is per process, rows the process's contiguous sub-slice
        if per_process:
            process_index = jax.process_index() if process_index is None else int(process_index)
            process_count = jax.process_count() if process_count is None else int(process_count)
            if not 0 <= process_index < process_count:
                raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
            self._global_batch = self._batch_size * process_count
            lead = (self._global_batch,) if num_members is None else (num_members, self._global_batch)
            everything = LocalRows.everything(lead)
            local = dataclasses.replace(
                everything,
                rows=everything.rows[process_index * self._batch_size : (process_index + 1) * self._batch_size],
                needed=everything.needed[:, : self._batch_size],
            )
        else:
            if process_index is not None or process_count is not None:
                raise ValueError("pass either local (rows from the batch sharding) or process_index/process_count")
            self._global_batch = self._batch_size
            lead = (self._global_batch,) if num_members is None else (num_members, self._global_batch)
            if tuple(local.global_shape) != lead:
                raise ValueError(f"local rows are of a batch {tuple(local.global_shape)}, this iterator's is {lead}")
            if local.num_needed == 0:
                raise ValueError("local rows select nothing; a process with no rows has no iterator to run")
        self._local = local
        self.rows_read = 0
        self.records_read = 0
        full, rest = divmod(self._n, self._global_batch)
        self._steps_per_epoch = full if drop_remainder else full + (rest > 0)
        if self._steps_per_epoch == 0:
            raise ValueError(
                f"{self._n} examples make no full global batch of {self._global_batch} "
                f"(batch_size={batch_size}{' x process_count' if per_process else ''}); use "
                "drop_remainder=False or a smaller batch"
            )
        self._epoch = 0
        self._step = 0
        self._perms: tuple[int, np.ndarray] | None = None  # (epoch, int64[M or 1, N]) cache

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
        """int64[r]: positions in the epoch's order of this process's rows at the current step."""
        return self._step * self._global_batch + self._local.rows

    def __iter__(self) -> PreferenceIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._num_epochs is not None and self._epoch >= self._num_epochs:
            raise StopIteration
        positions = self._positions()
        orders = self._orders(self._epoch)
        if self._local.members is not None:
            orders = orders[self._local.members]
        indices = orders[:, positions % self._n]  # [m or 1, r]; wraps only in a padded last batch
        needed = self._local.needed
        if needed.all():
            batch = _read(self._source, indices, self._fields)
        else:  # entries held by other processes' devices are not read
            part = _read(self._source, indices[needed], self._fields)
            batch = {}
            for name, v in part.items():
                batch[name] = np.zeros(indices.shape + v.shape[1:], v.dtype)
                batch[name][needed] = v
        self.rows_read += int(needed.sum())
        self.records_read += len(np.unique(indices[needed]))
        batch["valid"] = np.broadcast_to(positions < self._n, indices.shape).copy()
        if self._num_members is None:
            batch = {k: v[0] for k, v in batch.items()}
        self.skip()
        return batch

    def skip(self) -> None:
        """Moves past the current batch without reading it (another process reads it)."""
        self._step += 1
        if self._step == self._steps_per_epoch:
            self._epoch, self._step = self._epoch + 1, 0

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
    local: LocalRows | None = None,
) -> PreferenceIterator:
    """One sequential pass, ``[B, ...]`` batches; the last is padded and ``valid`` bool[B] marks real examples.

    With several processes each reads its rows of every global batch (`local`, or the process's contiguous sub-slice),
    and all yield the same number of batches.
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
        local=local,
    )


def to_global(
    batch: Mapping[str, np.ndarray],
    sharding_for: Callable[[str, np.ndarray], jax.sharding.Sharding] | jax.sharding.Sharding,
    local: LocalRows | None = None,
) -> dict[str, jax.Array]:
    """A batch -> global `jax.Array`s.

    `sharding_for` is one sharding for every field or a function (field name, array) -> sharding. Without `local`,
    every process holds the global batch in full; with it, the batch is this process's rows (an iterator's batch
    made with the same `local`). Either way each process copies only the slices its devices address
    (`jax.make_array_from_callback`), so any mesh layout works, including an ensemble axis that spans processes.
    """
    from warm_jax.data.local_rows import assemble
    from warm_jax.sharding import put_global

    out = {}
    for name, x in batch.items():
        sh = sharding_for(name, x) if callable(sharding_for) else sharding_for
        out[name] = put_global(x, sh) if local is None else assemble(x, local, sh)
    return out


def log_reads(stage: str, iterator: Any) -> None:
    """One line per process: how much of the global batches it read (with per-host input, only its own rows)."""
    log.info(
        "[%s] input: process %d of %d read %d batch rows (%d records)",
        stage,
        jax.process_index(),
        jax.process_count(),
        iterator.rows_read,
        iterator.records_read,
    )
