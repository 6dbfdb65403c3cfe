"""Writing preference datasets: a TFDS builder over ArrayRecord files, filled from any supported format.

`write_preference_dataset` is the one writer: it validates and tokenises pairs, applies the recorded label flips,
and writes a TFDS dataset directory (``dataset_info.json``, ``features.json``, ArrayRecord shards per split) plus
``preference_metadata.json`` and, when the tokenizer can save itself, ``tokenizer/``. `prepare_dataset` reads the
real formats (TL;DR, HH-RLHF, generic JSON lines) from local files and calls it.

TFDS writes ArrayRecord without TensorFlow through `GeneratorBasedBuilder` (its example serializer uses TFDS's own
copy of the tf.Example protos). Output is built in a hidden sibling directory and renamed into place only once
complete, so a failure never leaves a partial dataset where a finished one is expected.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
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

from warm_jax.data import preference as pref

METADATA_FILE = "preference_metadata.json"
TOKENIZER_DIR = "tokenizer"
DATASET_NAME = "preference_pairs"
FORMAT_VERSION = 1
INPUT_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
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
        self.identical_tokens = 0
        self.flipped = 0

    def add(self, ex: Mapping[str, Any]) -> None:
        for key, values in self.lengths.items():
            values.append(int(ex[key]))
        for key in self.truncated:
            self.truncated[key] += int(ex[f"{key}_truncated"])
        self.identical_tokens += int(np.array_equal(ex["chosen_tokens"], ex["rejected_tokens"]))
        self.flipped += int(ex["flipped"])

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
        # Pairs whose responses differ only past max_response_len: the model cannot tell them apart.
        out["num_identical_after_truncation"] = self.identical_tokens
        return out


class PreferencePairs(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """TFDS builder over in-memory, already validated pairs; examples are tokenised as they are written."""

    VERSION = tfds.core.Version("1.0.0")
    # TFDS looks for a checksums file beside the builder's code; nothing is downloaded here, and resolving the path
    # needs `importlib_resources`, which TFDS does not install.
    code_path = None

    def __init__(
        self,
        *,
        pairs: Mapping[str, Sequence[pref.PreferencePair]],
        flips: Mapping[str, np.ndarray],
        tokenizer: pref.TokenizerLike,
        max_prompt_len: int,
        max_response_len: int,
        description: str,
        **kwargs: Any,
    ):
        self._pairs, self._flips, self._tokenizer = pairs, flips, tokenizer
        self._max_prompt_len, self._max_response_len = max_prompt_len, max_response_len
        self._description = description
        self.stats = {split: _SplitStats() for split in pairs}
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        seq_len = pref.sequence_length(self._max_prompt_len, self._max_response_len)
        # Shuffling off: `index` must equal the position in the split, and flips were drawn for that order.
        return self.dataset_info_from_configs(
            description=self._description, features=features(seq_len), disable_shuffling=True
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict[str, Any]]]]:
        del dl_manager
        return {split: self._generate_examples(split) for split in self._pairs}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
        for i, (pair, flipped) in enumerate(zip(self._pairs[split], self._flips[split])):
            shown = pair.swapped() if flipped else pair  # "chosen" is what the training label prefers
            ex = pref.tokenize_pair(shown, self._tokenizer, self._max_prompt_len, self._max_response_len)
            ex.update(
                flipped=np.bool_(flipped),
                index=np.int64(i),
                score_chosen=np.float32(shown.score_chosen),
                score_rejected=np.float32(shown.score_rejected),
                prompt=shown.prompt,
                chosen=shown.chosen,
                rejected=shown.rejected,
            )
            self.stats[split].add(ex)
            yield i, {k: ex[k] for k in STORED_FIELDS}


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


def _collect(
    split: str, records: Iterable[Mapping[str, Any] | pref.PreferencePair], skip_log: pref.SkipLog | None
) -> list[pref.PreferencePair]:
    out = []
    for i, record in enumerate(records):
        try:
            if isinstance(record, pref.PreferencePair):
                pair = pref.check_pair(record, pref._Where(record.origin or f"<{split}>", i))
            else:
                pair = pref.pair_from_record(record, split, i)
        except pref.PreferenceDataError as err:
            if skip_log is None:
                raise
            skip_log.add(err)
            continue
        out.append(pair)
    return out


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
        `PreferencePair`s). All records are validated before anything is written.
      flip_fraction: fraction of labels to swap; a float applies to 'train' only, a dict gives it per split.
        Exactly ``round(fraction * n)`` examples are flipped, chosen by a permutation seeded with `seed`.
      skip_invalid: skip bad records (counted in the metadata) instead of raising `PreferenceDataError`.
      source: a short name of where the data came from ('builtin', 'tldr', ...), stored in the metadata.
      skip_log: records already skipped by a reader, merged into the metadata's counts.
      overwrite: replace an existing dataset at `output_dir` (only once the new one is complete).

    Returns:
      The metadata dict that is also written to ``preference_metadata.json``.
    """
    output = Path(output_dir).absolute()
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(f"{output} already exists and is not empty; pass overwrite=True (--overwrite)")
    for split in splits:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", split):
            raise ValueError(f"split name {split!r} is not a valid TFDS split name")
    if skip_log is None:
        skip_log = pref.SkipLog()
    pairs = {split: _collect(split, records, skip_log if skip_invalid else None) for split, records in splits.items()}
    for split, items in pairs.items():
        if not items:
            raise ValueError(f"split '{split}' has no valid examples (skipped: {skip_log.to_json()['by_reason']})")
    fractions = _flip_fractions(flip_fraction, pairs)
    flips = {split: pref.flip_mask(len(items), fractions[split], seed, split) for split, items in pairs.items()}

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.incomplete-{uuid.uuid4().hex[:8]}"
    try:
        tfds.disable_progress_bar()  # our stages report their own progress
        # TFDS prints a 'Downloading and preparing' banner.
        with _no_tfds_tempdirs(), contextlib.redirect_stdout(io.StringIO()):
            builder = PreferencePairs(
                pairs=pairs,
                flips=flips,
                tokenizer=tokenizer,
                max_prompt_len=max_prompt_len,
                max_response_len=max_response_len,
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
        (built / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
        _replace_dir(built, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return metadata


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


def _replace_dir(src: Path, dst: Path) -> None:
    """Renames `src` to `dst`; an existing `dst` is moved aside first and deleted only after the rename."""
    old = None
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(dst, old)
    os.rename(src, dst)
    if old is not None:
        shutil.rmtree(old)


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
    splits: dict[str, list[pref.PreferencePair]] = {}
    files = input_files(fmt, input_path)
    for file_split, path in files:
        for record_split, pair in pref.read_pairs(path, fmt, skip_log):
            splits.setdefault(record_split or file_split or "train", []).append(pair)
    if "validation" not in splits and validation_fraction > 0 and "train" in splits:
        splits["train"], splits["validation"] = pref.carve_validation(splits["train"], validation_fraction, seed)
    return splits, [p for _, p in files]


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
) -> dict[str, Any]:
    """Reads `input_path` in format `fmt` ('tldr', 'hh', 'jsonl') and writes the dataset; returns its metadata."""
    skip_log = pref.SkipLog()
    splits, files = read_format(
        fmt, input_path, validation_fraction=validation_fraction, seed=seed, skip_log=skip_log if skip_invalid else None
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
            "validation_fraction": validation_fraction,
            **({"split_mapping": {**pref.TLDR_SPLITS, "<news items>": pref.TLDR_NEWS_SPLIT}} if fmt == "tldr" else {}),
        },
    )
