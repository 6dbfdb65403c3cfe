"""Writing preference datasets: a TFDS builder over ArrayRecord files, filled from any supported format.

`write_preference_dataset` is the one writer: it validates and tokenises pairs, applies the recorded label flips,
and writes a TFDS dataset directory (``dataset_info.json``, ``features.json``, ArrayRecord shards per split) plus
``preference_metadata.json`` and, when the tokenizer can save itself, ``tokenizer/`` (and ``subsets.json`` when the
pairs name their subsets). `prepare_dataset` reads the real formats (TL;DR, HH-RLHF, generic JSON lines, and
Hugging Face tables through `warm_jax.data.hf_tables`) from local files and calls it.

TFDS writes ArrayRecord without TensorFlow through `GeneratorBasedBuilder` (its example serializer uses TFDS's own
copy of the tf.Example protos). Output is built in a hidden sibling directory and renamed into place only once
complete, so a failure never leaves a partial dataset where a finished one is expected. ``dataset_info.json`` and
``features.json`` are for TFDS users only: `warm_jax.data.pipeline.load_split` reads the shards with `features`
built in code, so that a dataset folder never names code to import.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import numbers
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from warm_jax import io_utils
from warm_jax.cli_errors import UserError
from warm_jax.data import preference as pref

METADATA_FILE = "preference_metadata.json"
# Per-example subset names (split -> [name of example i]), written only when the source has a subset column.
SUBSETS_FILE = "subsets.json"
TOKENIZER_DIR = "tokenizer"
DATASET_NAME = "preference_pairs"
FORMAT_VERSION = 1
INPUT_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
SPLIT_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
# TFDS's shard names, `{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}`; the reader finds a split's shards by it.
SHARD_PATTERN = DATASET_NAME + r"-(?P<split>" + SPLIT_NAME + r")\.array_record-(?P<shard>\d{5})-of-(?P<count>\d{5})"
STORED_FIELDS = (
    "chosen_tokens",
    "rejected_tokens",
    "chosen_length",
    "rejected_length",
    "prompt_length",
    "flipped",
    "index",
    "score_chosen",
    "score_rejected",
    "prompt",
    "chosen",
    "rejected",
)


def features(seq_len: int) -> tfds.features.FeaturesDict:
    """The stored example: token arrays int32[seq_len], scalars, and the texts (decoded as bytes on read)."""
    # Tokens as raw bytes: one string per array, parsed with np.frombuffer instead of a Python int list.
    tokens = lambda: tfds.features.Tensor(shape=(seq_len,), dtype=np.int32, encoding=tfds.features.Encoding.BYTES)
    scalar = tfds.features.Scalar
    return tfds.features.FeaturesDict(
        {
            "chosen_tokens": tokens(),
            "rejected_tokens": tokens(),
            "chosen_length": scalar(np.int32),
            "rejected_length": scalar(np.int32),
            "prompt_length": scalar(np.int32),
            "flipped": scalar(np.bool_),
            "index": scalar(np.int64),
            "score_chosen": scalar(np.float32),
            "score_rejected": scalar(np.float32),
            "prompt": tfds.features.Text(),
            "chosen": tfds.features.Text(),
            "rejected": tfds.features.Text(),
        }
    )


class _SplitStats:
    """Length and truncation statistics of one split, gathered while examples are written."""

    def __init__(self) -> None:
        self.lengths: dict[str, list[int]] = {"prompt_length": [], "chosen_length": [], "rejected_length": []}
        self.truncated = {"prompt": 0, "chosen": 0, "rejected": 0}
        self.flipped = 0
        self.subsets: list[str] = []

    def add(self, ex: Mapping[str, Any], subset: str = "") -> None:
        for key, values in self.lengths.items():
            values.append(int(ex[key]))
        for key in self.truncated:
            self.truncated[key] += int(ex[f"{key}_truncated"])
        self.flipped += int(ex["flipped"])
        self.subsets.append(subset)

    def to_json(self, configured_flip: float) -> dict[str, Any]:
        n = len(self.lengths["prompt_length"])
        out: dict[str, Any] = {
            "num_examples": n,
            "num_flipped": self.flipped,
            "flip_fraction": self.flipped / n if n else 0.0,
            "configured_flip_fraction": configured_flip,
        }
        for key, values in self.lengths.items():
            v = np.asarray(values)
            out[key] = {
                "mean": float(v.mean()),
                "min": int(v.min()),
                "p50": float(np.percentile(v, 50)),
                "p95": float(np.percentile(v, 95)),
                "max": int(v.max()),
            }
        out["num_truncated"] = dict(self.truncated)
        if any(self.subsets):
            out["subset_counts"] = {k: self.subsets.count(k) for k in sorted(set(self.subsets))}
        return out


class PreferencePairs(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """TFDS builder over in-memory pairs, already validated and tokenised (see `_collect`)."""

    VERSION = tfds.core.Version("1.0.0")
    # TFDS looks for a checksums file beside the builder's code; nothing is downloaded here, and resolving the path
    # needs `importlib_resources`, which TFDS does not install.
    code_path = None

    def __init__(
        self,
        *,
        examples: Mapping[str, Sequence[_Example]],
        flips: Mapping[str, np.ndarray],
        seq_len: int,
        description: str,
        **kwargs: Any,
    ):
        self._examples, self._flips, self._seq_len = examples, flips, seq_len
        self._description = description
        self.stats = {split: _SplitStats() for split in examples}
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        seq_len = self._seq_len
        # Shuffling off: `index` must equal the position in the split, and flips were drawn for that order.
        return self.dataset_info_from_configs(
            description=self._description, features=features(seq_len), disable_shuffling=True
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict[str, Any]]]]:
        del dl_manager
        return {split: self._generate_examples(split) for split in self._examples}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
        for i, ((pair, tokens), flipped) in enumerate(zip(self._examples[split], self._flips[split])):
            # "chosen" is what the training label prefers; tokenize_pair(pair.swapped()) == _swapped(tokens).
            shown, ex = (pair.swapped(), _swapped(tokens)) if flipped else (pair, dict(tokens))
            ex.update(
                flipped=np.bool_(flipped),
                index=np.int64(i),
                score_chosen=np.float32(shown.score_chosen),
                score_rejected=np.float32(shown.score_rejected),
                prompt=shown.prompt,
                chosen=shown.chosen,
                rejected=shown.rejected,
            )
            self.stats[split].add(ex, shown.subset)
            yield i, {k: ex[k] for k in STORED_FIELDS}


def check_flip_fraction(flip_fraction: float | Mapping[str, float]) -> None:
    items = flip_fraction.items() if isinstance(flip_fraction, Mapping) else [(None, flip_fraction)]
    for split, value in items:
        name = "flip_fraction" if split is None else f"flip_fraction[{split!r}]"
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def _flip_fractions(flip_fraction: float | Mapping[str, float], splits: Iterable[str]) -> dict[str, float]:
    splits = list(splits)
    if isinstance(flip_fraction, Mapping):
        unknown = sorted(set(flip_fraction) - set(splits))
        if unknown:
            raise ValueError(f"flip_fraction names splits {unknown} that are not in the dataset {splits}")
        fractions = dict(flip_fraction)
    else:
        if flip_fraction and "train" not in splits:
            raise ValueError(f"flip_fraction={flip_fraction} applies to split 'train', which is not among {splits}")
        fractions = {"train": float(flip_fraction)} if "train" in splits else {}
    return {s: float(fractions.get(s, 0.0)) for s in splits}


_Example = tuple[pref.PreferencePair, dict[str, np.ndarray]]  # a valid pair and its `tokenize_pair` arrays


def _swapped(tokens: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = dict(tokens)
    for key in ("tokens", "length", "truncated"):
        out[f"chosen_{key}"], out[f"rejected_{key}"] = tokens[f"rejected_{key}"], tokens[f"chosen_{key}"]
    return out


def _collect(
    split: str,
    records: Iterable[Mapping[str, Any] | pref.PreferencePair],
    skip_log: pref.SkipLog | None,
    tokenizer: pref.TokenizerLike,
    max_prompt_len: int,
    max_response_len: int,
) -> list[_Example]:
    """Validates and tokenises `records`; a pair the model could not tell apart (same tokens) is invalid too."""
    out = []
    for i, record in enumerate(records):
        try:
            if isinstance(record, pref.PreferencePair):
                pair = pref.check_pair(record, pref.where_of(record, split, i))
            else:
                pair = pref.pair_from_record(record, split, i)
            tokens = pref.tokenize_pair(pair, tokenizer, max_prompt_len, max_response_len)
            if np.array_equal(tokens["chosen_tokens"], tokens["rejected_tokens"]):
                raise pref.where_of(pair, split, i).error(
                    "chosen/rejected",
                    f"chosen and rejected have the same tokens once cut to max_response_len={max_response_len}",
                    "identical_after_truncation",
                )
        except pref.PreferenceDataError as err:
            if skip_log is None:
                raise
            skip_log.add(err)
            continue
        out.append((pair, tokens))
    return out


def check_output(output_dir: str | os.PathLike, *, overwrite: bool) -> Path:
    """The absolute output path; refuses early what the final rename would fail on or wrongly destroy."""
    output = Path(output_dir).absolute()
    io_utils.recover(os.fspath(output))  # a dataset an interrupted replace moved aside comes back first
    if output.exists():
        if not output.is_dir():
            raise UserError(f"output {output} is an existing file, not a directory; choose another output path")
        if any(output.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{output} already exists and is not empty; pass overwrite=True (--overwrite)")
            if not (output / METADATA_FILE).is_file():
                raise UserError(
                    f"output {output} is a non-empty directory but not a warm_jax dataset (no {METADATA_FILE}); "
                    "overwrite replaces only a dataset, choose another output path"
                )
    parent = output.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"output {output}: {parent} is a file, not a directory")
    return output


def check_lengths(tokenizer: pref.TokenizerLike, max_prompt_len: int, max_response_len: int) -> None:
    """Both lengths must leave room for at least one token of text."""
    for name, value, least, why in (
        ("max_prompt_len", max_prompt_len, 1 + len(pref.bos_ids(tokenizer)), " (one for BOS, one for the prompt)"),
        ("max_response_len", max_response_len, 1, ""),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}{why if least > 1 else ''}, got {value!r}")


def write_preference_dataset(
    output_dir: str | os.PathLike,
    splits: Mapping[str, Iterable[Mapping[str, Any] | pref.PreferencePair]],
    *,
    tokenizer: pref.TokenizerLike,
    max_prompt_len: int,
    max_response_len: int,
    flip_fraction: float | Mapping[str, float] = 0.0,
    seed: int = 0,
    skip_invalid: bool = False,
    source: str,
    extra_metadata: Mapping[str, Any] | None = None,
    source_files: Sequence[str] = (),
    skip_log: pref.SkipLog | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Validates, flips, tokenises and writes `splits` as a TFDS dataset directory at `output_dir`.

    Args:
      splits: split name -> records ``{prompt, chosen, rejected[, score_chosen, score_rejected]}`` (or
        `PreferencePair`s). All records are validated and tokenised before anything is written; a pair whose
        responses are identical up to whitespace, or whose token sequences are identical once cut to
        `max_response_len`, is invalid. A split left with no valid record raises `UserError`.
      flip_fraction: fraction of labels to swap; a float applies to 'train' only, a dict gives it per split.
        Exactly ``round(fraction * n)`` examples are flipped, chosen by a permutation seeded with `seed`.
      skip_invalid: skip bad records (counted in the metadata) instead of raising `PreferenceDataError`.
      source: a short name of where the data came from ('builtin', 'tldr', ...), stored in the metadata.
      skip_log: records already skipped by a reader, merged into the metadata's counts.
      overwrite: replace an existing dataset at `output_dir` (only once the new one is complete).

    Returns:
      The metadata dict that is also written to ``preference_metadata.json``.
    """
    output = check_output(output_dir, overwrite=overwrite)
    check_lengths(tokenizer, max_prompt_len, max_response_len)
    check_flip_fraction(flip_fraction)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    for split in splits:
        if not isinstance(split, str) or not re.fullmatch(SPLIT_NAME, split):
            raise ValueError(f"split name {split!r} is not a valid TFDS split name")
    if skip_log is None:
        skip_log = pref.SkipLog()
    where = ", ".join(os.fspath(f) for f in source_files) or f"<{source} records>"
    if not splits:
        raise UserError(f"{where}: no valid records ({skip_log.summary()})")
    pairs: dict[str, list[_Example]] = {}
    for split, records in splits.items():
        mark = skip_log.mark()
        pairs[split] = _collect(
            split, records, skip_log if skip_invalid else None, tokenizer, max_prompt_len, max_response_len
        )
        if not pairs[split]:
            raise UserError(f"{where}: split '{split}' has no valid records ({skip_log.summary(since=mark)})")
    fractions = _flip_fractions(flip_fraction, pairs)
    flips = {split: pref.flip_mask(len(items), fractions[split], seed, split) for split, items in pairs.items()}

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.incomplete-{uuid.uuid4().hex[:8]}"
    try:
        tfds.disable_progress_bar()  # our stages report their own progress
        # TFDS prints a 'Downloading and preparing' banner.
        with _no_tfds_tempdirs(), contextlib.redirect_stdout(io.StringIO()):
            builder = PreferencePairs(
                examples=pairs,
                flips=flips,
                seq_len=pref.sequence_length(max_prompt_len, max_response_len),
                description=f"Preference pairs from {source}.",
                data_dir=os.fspath(tmp),
                file_format="array_record",
            )
            builder.download_and_prepare()
        built = Path(os.fspath(builder.data_dir))
        metadata: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "source": source,
            "source_files": [os.fspath(f) for f in source_files],
            "max_prompt_len": max_prompt_len,
            "max_response_len": max_response_len,
            "seq_len": pref.sequence_length(max_prompt_len, max_response_len),
            "tokenizer": pref.tokenizer_info(tokenizer),
            "tokenizer_dir": None,
            "seed": seed,
            "flip_fraction": fractions,
            "skip_invalid": skip_invalid,
            "skipped": skip_log.to_json(),
            "splits": {s: builder.stats[s].to_json(fractions[s]) for s in pairs},
            "extra": dict(extra_metadata or {}),
        }
        if callable(getattr(tokenizer, "save", None)):
            tokenizer.save(os.fspath(built / TOKENIZER_DIR))
            metadata["tokenizer_dir"] = TOKENIZER_DIR
        subsets = {s: builder.stats[s].subsets for s in pairs if any(builder.stats[s].subsets)}
        if subsets:
            (built / SUBSETS_FILE).write_text(json.dumps(subsets) + "\n")
        (built / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
        io_utils.replace_directory(os.fspath(built), os.fspath(output))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return metadata


def load_subsets(dataset_dir: str | os.PathLike, split: str) -> list[str] | None:
    """The subset name of each example of `split` (by ``index``), or None when the source had no subsets."""
    path = Path(dataset_dir) / SUBSETS_FILE
    if not path.is_file():
        return None
    try:
        subsets = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not readable JSON ({e})") from None
    names = subsets.get(split) if isinstance(subsets, dict) else None
    if names is None:
        return None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UserError(f"{path}: field {split!r} must be a list of strings")
    return names


@contextlib.contextmanager
def _no_tfds_tempdirs():
    """Removes the empty temp dirs TFDS leaves behind.

    ``DatasetInfo.initialize_from_bucket`` makes a ``tmp*tfds`` directory for every builder even with
    no GCS access and never removes it (one per dataset build). Only new and still-empty ones go.
    """
    pattern = os.path.join(tempfile.gettempdir(), "tmp*tfds")
    before = set(glob.glob(pattern))
    try:
        yield
    finally:
        for d in set(glob.glob(pattern)) - before:
            with contextlib.suppress(OSError):  # not empty (someone else's): leave it
                os.rmdir(d)


# ------------------------------------------------------------------------------------------- real formats
def input_files(fmt: str, input_path: str | os.PathLike) -> list[tuple[str | None, Path]]:
    """The files to read and the split each one feeds (None: the split comes from the records, or 'train').

    A file is read as a whole. A directory: for 'tldr' every ``*.json[l][.gz]`` file (the OpenAI release is a folder
    of batch files; each record names its split); for 'hh'/'jsonl' the files ``{train,validation,valid,test,ood}``
    with those suffixes.
    """
    path = Path(input_path)
    if not path.exists():
        raise FileNotFoundError(f"--input {path} does not exist")
    if path.is_file():
        return [(None, path)]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(INPUT_SUFFIXES))
    if fmt == "tldr":
        found = [(None, p) for p in files]
    else:
        stem = lambda p: re.sub(r"\.jsonl?(\.gz)?$", "", p.name)
        found = [(pref.SPLIT_FILES[stem(p)], p) for p in files if stem(p) in pref.SPLIT_FILES]
    if not found:
        want = "*.json[l][.gz]" if fmt == "tldr" else "{" + ",".join(pref.SPLIT_FILES) + "}.jsonl[.gz]"
        raise FileNotFoundError(f"--input directory {path} holds no {want} files for format '{fmt}'")
    return found


def read_format(
    fmt: str, input_path: str | os.PathLike, *, validation_fraction: float, seed: int, skip_log: pref.SkipLog | None
) -> tuple[dict[str, list[pref.PreferencePair]], list[Path]]:
    """Reads every pair of a real format into splits; carves 'validation' out of 'train' when there is none."""
    if fmt not in pref.PARSERS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {sorted(pref.PARSERS)}")
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    splits: dict[str, list[pref.PreferencePair]] = {}
    files = input_files(fmt, input_path)
    for file_split, path in files:
        mark = skip_log.mark() if skip_log is not None else None
        count = 0
        for record_split, pair in pref.read_pairs(path, fmt, skip_log):
            splits.setdefault(record_split or file_split or "train", []).append(pair)
            count += 1
        if not count:  # an empty file, or (with skip_log) one whose every record was bad
            why = (
                skip_log.summary(since=mark)
                if skip_log is not None and skip_log.counts != mark[0]
                else "the file holds no records"
            )
            raise UserError(f"{path}: no valid records ({why})")
    return with_validation(splits, validation_fraction, seed, input_path), [p for _, p in files]


def with_validation(
    splits: dict[str, list[pref.PreferencePair]], validation_fraction: float, seed: int, input_path: Any
) -> dict[str, list[pref.PreferencePair]]:
    """`splits` with 'validation' carved out of 'train' when there is none (and the fraction is positive)."""
    if "validation" not in splits and validation_fraction > 0 and "train" in splits:
        n = len(splits["train"])
        splits["train"], splits["validation"] = pref.carve_validation(splits["train"], validation_fraction, seed)
        if not splits["validation"] or not splits["train"]:
            raise UserError(
                f"{input_path}: validation_fraction={validation_fraction} of the {n} valid 'train' records leaves "
                f"{len(splits['train'])} for train and {len(splits['validation'])} for validation; both need at "
                "least one (use 0 for no validation split)"
            )
    return splits


def prepare_dataset(
    fmt: str,
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    tokenizer: pref.TokenizerLike,
    max_prompt_len: int,
    max_response_len: int,
    flip_fraction: float | Mapping[str, float] = 0.0,
    seed: int = 0,
    validation_fraction: float = 0.05,
    skip_invalid: bool = False,
    overwrite: bool = False,
    chat_template: Any = None,
) -> dict[str, Any]:
    """Reads `input_path` in format `fmt` ('tldr', 'hh', 'jsonl', 'hf') and writes the dataset; returns its metadata.

    `chat_template` (a `chat_template.ChatTemplate`, 'hf' only) renders conversations; None is the built-in default.
    """
    check_output(output_dir, overwrite=overwrite)  # before the (long) reading
    check_lengths(tokenizer, max_prompt_len, max_response_len)
    check_flip_fraction(flip_fraction)
    skip_log = pref.SkipLog()
    extra: dict[str, Any] = {}
    if fmt == "hf":
        from warm_jax.data import chat_template as chat_lib  # pylint: disable=g-import-not-at-top
        from warm_jax.data import hf_tables  # pylint: disable=g-import-not-at-top

        if not 0.0 <= validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
        template = chat_template if chat_template is not None else chat_lib.default()
        splits, files, counts = hf_tables.read_splits(
            input_path,
            template=template,
            strip_bos=bool(pref.bos_ids(tokenizer)),
            skip_log=skip_log if skip_invalid else None,
        )
        splits = with_validation(splits, validation_fraction, seed, input_path)
        extra["chat_template"] = {
            **template.describe(),
            "rows_rendered": counts.rendered,
            "rows_plain": counts.plain,
        }
    else:
        splits, files = read_format(
            fmt,
            input_path,
            validation_fraction=validation_fraction,
            seed=seed,
            skip_log=skip_log if skip_invalid else None,
        )
    return write_preference_dataset(
        output_dir,
        splits,
        tokenizer=tokenizer,
        max_prompt_len=max_prompt_len,
        max_response_len=max_response_len,
        flip_fraction=flip_fraction,
        seed=seed,
        skip_invalid=skip_invalid,
        source=fmt,
        source_files=[os.fspath(f) for f in files],
        skip_log=skip_log,
        overwrite=overwrite,
        extra_metadata={
            **extra,
            "validation_fraction": validation_fraction,
            **({"split_mapping": {**pref.TLDR_SPLITS, "<news items>": pref.TLDR_NEWS_SPLIT}} if fmt == "tldr" else {}),
        },
    )
