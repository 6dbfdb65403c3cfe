"""Preference pairs: record schema, readers for the supported formats, validation, tokenisation, label flips.

Every format ends up as a stream of `PreferencePair`s (text) per split; `tokenize_pair` turns one pair into the
fixed-length arrays that the TFDS builder stores (see `warm_jax.data.builders`), and `flip_mask` decides which
training labels are swapped. Bad input raises `PreferenceDataError`, which names file, line and field; readers can
instead skip such records and count them in a `SkipLog`.

Formats (one JSON object per line, optionally gzip-compressed):
  * ``tldr``  — OpenAI summarize-from-feedback comparisons: ``info{id, post, title, subreddit, article}``,
    ``summaries[2]{text, ...}``, ``choice`` (0/1), ``split``, ...
  * ``hh``    — Anthropic HH-RLHF: ``chosen``/``rejected`` transcripts sharing the dialogue up to the last
    ``"\\n\\nAssistant:"``.
  * ``jsonl`` — generic ``{prompt, chosen, rejected}`` (optional numeric ``score_chosen``/``score_rejected``).

Hugging Face ``datasets`` tables (Parquet, Arrow, JSON lines with TRL's columns) are read by
`warm_jax.data.hf_tables`, which makes the same pairs and errors.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import math
import os
import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import numpy as np

from warm_jax.cli_errors import UserError

# TL;DR's `split` field -> our split names. valid2 holds the comparisons OpenAI kept for final evaluation; news
# (CNN/DM) items, recognised by their `article`, are a different distribution and go to `ood` whatever their split.
TLDR_SPLITS = {"train": "train", "valid1": "validation", "valid2": "test"}
TLDR_NEWS_SPLIT = "ood"
HH_ASSISTANT = "\n\nAssistant:"
# Files recognised when --input is a directory (hh, jsonl): stem -> split.
SPLIT_FILES = {"train": "train", "validation": "validation", "valid": "validation", "test": "test", "ood": "ood"}

# Reasons a record is rejected; `SkipLog.counts` is keyed by these.
# Tags that keep the seeded streams of different uses apart (first entropy word after the seed).
STREAM_FLIP, STREAM_VALIDATION, STREAM_ORDER, STREAM_SUBSET = 1, 2, 3, 4

REASONS = (
    "invalid_utf8",
    "malformed_json",
    "missing_field",
    "wrong_type",
    "bad_choice",
    "empty_text",
    "identical_responses",
    "identical_after_truncation",
    "no_common_prompt",
    "template_error",
)


class PreferenceDataError(UserError, ValueError):
    """A record that cannot be used; the message reads ``file:line: field 'x': reason [code]``."""

    def __init__(self, path: str | os.PathLike, line: int, field: str, reason: str, code: str):
        self.path, self.line, self.field, self.reason, self.code = os.fspath(path), line, field, reason, code
        super().__init__(f"{self.path}:{line}: field '{field}': {reason} [{code}]")


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    """One comparison in text form; `chosen` is the response the label prefers."""

    prompt: str
    chosen: str
    rejected: str
    score_chosen: float = math.nan  # oracle scores where the source has them (built-in task), else NaN
    score_rejected: float = math.nan
    origin: str = ""  # "file:line" (or "split[i]" for in-memory records), for messages
    subset: str = ""  # the source's subset of the pair (RewardBench's `subset` column), "" when it has none

    def swapped(self) -> PreferencePair:
        return dataclasses.replace(
            self,
            chosen=self.rejected,
            rejected=self.chosen,
            score_chosen=self.score_rejected,
            score_rejected=self.score_chosen,
        )


@dataclasses.dataclass
class SkipLog:
    """Counts of records skipped under ``skip_invalid``, by reason, with the first few messages kept."""

    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    messages: list[str] = dataclasses.field(default_factory=list)
    max_messages: int = 20

    def add(self, err: PreferenceDataError) -> None:
        self.counts[err.code] += 1
        if len(self.messages) < self.max_messages:
            self.messages.append(str(err))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_json(self) -> dict[str, Any]:
        return {"total": self.total, "by_reason": dict(sorted(self.counts.items())), "first_messages": self.messages}

    def summary(self, since: tuple[collections.Counter, int] | None = None) -> str:
        """One line: ``N skipped: reason n, ...; first: message`` (only what was added after `since`)."""
        counts, first = (self.counts, 0) if since is None else (self.counts - since[0], since[1])
        if not counts:
            return "none skipped"
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        head = f"{sum(counts.values())} skipped: {reasons}"
        return f"{head}; first: {self.messages[first]}" if first < len(self.messages) else head

    def mark(self) -> tuple[collections.Counter, int]:
        """A point to pass to `summary(since=...)`."""
        return self.counts.copy(), len(self.messages)


class TokenizerLike(Protocol):
    """The part of `warm_jax.data.tokenizers.Tokenizer` that the data code uses."""

    vocab_size: int
    pad_id: int
    bos_id: int | None
    eos_id: int
    add_bos: bool

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Any) -> str: ...


# ----------------------------------------------------------------------------------------------------- reading
def _raw_lines(path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """``(line_number, bytes)`` of a plain or gzip file; a damaged gzip stream raises `UserError` naming the file."""
    name = os.fspath(path)
    compressed = name.endswith(".gz")
    line_no = 0
    with (gzip.open if compressed else open)(path, "rb") as f:
        lines = iter(f)
        while True:
            try:
                raw = next(lines)
            except StopIteration:
                return
            except (gzip.BadGzipFile, EOFError, zlib.error) as e:
                # A broken stream cannot be resynchronised, so this is fatal even when bad records are skipped.
                kind = "truncated gzip file" if isinstance(e, EOFError) else "not a gzip file, or a damaged one"
                where = f"after line {line_no}" if line_no else "before the first complete line"
                raise UserError(f"{name}: {kind}: reading stopped {where} ({e})") from e
            line_no += 1
            yield line_no, raw


def iter_json_lines(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any] | PreferenceDataError]]:
    """Yields ``(line_number, object)`` for each non-blank line, or ``(line_number, error)`` for a bad one.

    Errors are yielded rather than raised so that a caller that skips them can carry on with the next line.
    Lines are decoded as strict UTF-8 here (not by `open`) so that the error can point at the line. A file that
    cannot be read at all (a broken gzip stream) raises `UserError`.
    """
    for line_no, raw in _raw_lines(path):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            reason = f"invalid UTF-8 at byte {e.start}: {raw[e.start : e.start + 4]!r}"
            yield line_no, PreferenceDataError(path, line_no, "<line>", reason, "invalid_utf8")
            continue
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            reason = f"malformed JSON: {e.msg} at column {e.colno}"
            yield line_no, PreferenceDataError(path, line_no, "<line>", reason, "malformed_json")
            continue
        if not isinstance(obj, dict):
            reason = f"expected a JSON object, got {type(obj).__name__}"
            yield line_no, PreferenceDataError(path, line_no, "<line>", reason, "wrong_type")
            continue
        yield line_no, obj


@dataclasses.dataclass(frozen=True)
class _Where:
    path: str
    line: int

    def error(self, field: str, reason: str, code: str) -> PreferenceDataError:
        return PreferenceDataError(self.path, self.line, field, reason, code)


def _get(obj: Mapping[str, Any], key: str, where: _Where, kind: type | tuple[type, ...], prefix: str = "") -> Any:
    name = prefix + key
    if key not in obj or obj[key] is None:
        raise where.error(name, "missing", "missing_field")
    value = obj[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int subclass, but a JSON `true` is never a valid choice or score.
    if not isinstance(value, kinds) or isinstance(value, bool):
        want = "/".join(k.__name__ for k in kinds)
        raise where.error(name, f"expected {want}, got {type(value).__name__}", "wrong_type")
    return value


def _score(obj: Mapping[str, Any], key: str, where: _Where) -> float:
    if obj.get(key) is None:
        return math.nan
    return float(_get(obj, key, where, (int, float)))


def same_text(a: str, b: str) -> bool:
    """Whether two texts are equal once runs of whitespace are collapsed and the ends stripped."""
    return a.split() == b.split()


def check_pair(
    pair: PreferencePair, where: _Where, fields: tuple[str, str, str] = ("prompt", "chosen", "rejected")
) -> PreferencePair:
    """Rejects empty (or whitespace-only) texts and pairs whose two responses are identical up to whitespace."""
    for name, text in zip(fields, (pair.prompt, pair.chosen, pair.rejected)):
        if not text.strip():
            raise where.error(name, "empty text", "empty_text")
    if same_text(pair.chosen, pair.rejected):
        how = "" if pair.chosen == pair.rejected else " after whitespace normalisation"
        raise where.error(f"{fields[1]}/{fields[2]}", f"chosen and rejected are identical{how}", "identical_responses")
    return pair


def where_of(pair: PreferencePair, split: str, i: int) -> _Where:
    """Where `pair` came from (its ``file:line`` origin), for messages; ``<split>:i`` when it has none."""
    path, sep, line = pair.origin.rpartition(":")
    if sep and line.isdigit():
        return _Where(path, int(line))
    return _Where(pair.origin or f"<{split}>", i)


def parse_tldr(obj: Mapping[str, Any], where: _Where) -> tuple[str, PreferencePair]:
    """One OpenAI TL;DR comparison -> (split, pair); the split mapping is `TLDR_SPLITS` / `TLDR_NEWS_SPLIT`."""
    info = _get(obj, "info", where, dict)
    summaries = _get(obj, "summaries", where, list)
    if len(summaries) != 2:
        raise where.error("summaries", f"expected 2 summaries, got {len(summaries)}", "wrong_type")
    choice = _get(obj, "choice", where, int)
    if choice not in (0, 1):
        raise where.error("choice", f"must be 0 or 1, got {choice}", "bad_choice")
    split_name = _get(obj, "split", where, str)
    texts = []
    for i, summary in enumerate(summaries):
        if not isinstance(summary, dict):
            raise where.error(f"summaries[{i}]", "expected an object", "wrong_type")
        texts.append(_get(summary, "text", where, str, prefix=f"summaries[{i}]."))
    if info.get("article") is not None:  # a news (CNN/DM) item
        article = _get(info, "article", where, str, prefix="info.")
        title = info.get("title")
        head = f"TITLE: {title}\n\n" if isinstance(title, str) and title.strip() else ""
        prompt, prompt_field, split = f"{head}ARTICLE: {article}\n\nTL;DR:", "info.article", TLDR_NEWS_SPLIT
    else:
        subreddit = _get(info, "subreddit", where, str, prefix="info.")
        title = _get(info, "title", where, str, prefix="info.")
        post = _get(info, "post", where, str, prefix="info.")
        if not post.strip():
            raise where.error("info.post", "empty text", "empty_text")
        prompt, prompt_field = f"SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:", "info.post"
        if split_name not in TLDR_SPLITS:
            raise where.error(
                "split", f"unknown split {split_name!r}; expected one of {sorted(TLDR_SPLITS)}", "wrong_type"
            )
        split = TLDR_SPLITS[split_name]
    pair = PreferencePair(prompt, texts[choice], texts[1 - choice], origin=f"{where.path}:{where.line}")
    return split, check_pair(pair, where, (prompt_field, f"summaries[{choice}].text", f"summaries[{1 - choice}].text"))


def parse_hh(obj: Mapping[str, Any], where: _Where) -> tuple[None, PreferencePair]:
    """One HH-RLHF record: the prompt is the shared dialogue up to and including the last "\\n\\nAssistant:"."""
    chosen = _get(obj, "chosen", where, str)
    rejected = _get(obj, "rejected", where, str)
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(HH_ASSISTANT)
    if cut < 0:
        if not chosen.strip() or not rejected.strip():
            raise where.error("chosen" if not chosen.strip() else "rejected", "empty text", "empty_text")
        raise where.error("chosen/rejected", f"no common prefix ending in {HH_ASSISTANT!r}", "no_common_prompt")
    cut += len(HH_ASSISTANT)
    pair = PreferencePair(chosen[:cut], chosen[cut:], rejected[cut:], origin=f"{where.path}:{where.line}")
    return None, check_pair(pair, where)


def parse_generic(obj: Mapping[str, Any], where: _Where) -> tuple[None, PreferencePair]:
    """One ``{prompt, chosen, rejected[, score_chosen, score_rejected]}`` record."""
    pair = PreferencePair(
        _get(obj, "prompt", where, str),
        _get(obj, "chosen", where, str),
        _get(obj, "rejected", where, str),
        _score(obj, "score_chosen", where),
        _score(obj, "score_rejected", where),
        origin=f"{where.path}:{where.line}",
    )
    return None, check_pair(pair, where)


PARSERS: dict[str, Callable[[Mapping[str, Any], _Where], tuple[str | None, PreferencePair]]] = {
    "tldr": parse_tldr,
    "hh": parse_hh,
    "jsonl": parse_generic,
}


def read_pairs(
    path: str | os.PathLike, fmt: str, skipped: SkipLog | None = None
) -> Iterator[tuple[str | None, PreferencePair]]:
    """Yields ``(split or None, pair)`` from one JSON-lines file of format `fmt` ('tldr', 'hh' or 'jsonl').

    With `skipped` given, bad records are counted there and left out; otherwise the first one raises
    `PreferenceDataError`.
    """
    parse = PARSERS[fmt]
    for line_no, obj in iter_json_lines(path):
        try:
            if isinstance(obj, PreferenceDataError):
                raise obj
            yield parse(obj, _Where(os.fspath(path), line_no))
        except PreferenceDataError as err:
            if skipped is None:
                raise
            skipped.add(err)


def pair_from_record(record: Mapping[str, Any], split: str, i: int) -> PreferencePair:
    """An in-memory record ``{prompt, chosen, rejected, score_chosen?, score_rejected?}`` (the built-in task's)."""
    return parse_generic(record, _Where(f"<{split}>", i))[1]


# -------------------------------------------------------------------------------------------- tokenisation
def sequence_length(max_prompt_len: int, max_response_len: int) -> int:
    return max_prompt_len + max_response_len


def bos_ids(tokenizer: TokenizerLike) -> list[int]:
    """The tokens put before every prompt: ``[bos_id]`` when the tokenizer adds one, else none."""
    return [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []


def tokenize_pair(
    pair: PreferencePair, tokenizer: TokenizerLike, max_prompt_len: int, max_response_len: int
) -> dict[str, np.ndarray]:
    """Token arrays for one pair, L = max_prompt_len + max_response_len.

    Each sequence is ``[BOS] + prompt[-(max_prompt_len - has_bos):] + response[:max_response_len] (+ EOS if there
    is room)``, right-padded with ``pad_id``. BOS counts towards the prompt budget so that every sequence fits L.
    Returns ``chosen_tokens``/``rejected_tokens`` int32[L], ``chosen_length``/``rejected_length``/``prompt_length``
    int32 scalars (real tokens; the reward is read at ``length - 1``) and ``prompt_truncated``/
    ``chosen_truncated``/``rejected_truncated`` bools (for statistics, not stored).
    """
    bos = bos_ids(tokenizer)
    room = max_prompt_len - len(bos)
    if room < 1:
        raise ValueError(f"max_prompt_len={max_prompt_len} leaves no room for the prompt after BOS")
    prompt_ids = tokenizer.encode(pair.prompt)
    head = bos + prompt_ids[-room:]  # left truncation keeps the end of the prompt, next to the response
    total = sequence_length(max_prompt_len, max_response_len)
    out: dict[str, np.ndarray] = {
        "prompt_length": np.int32(len(head)),
        "prompt_truncated": np.bool_(len(prompt_ids) > room),
    }
    for name, text in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        ids = tokenizer.encode(text)
        body = ids[:max_response_len]
        if len(body) < max_response_len:
            body = body + [tokenizer.eos_id]
        seq = head + body
        tokens = np.full((total,), tokenizer.pad_id, np.int32)
        tokens[: len(seq)] = seq
        out[f"{name}_tokens"] = tokens
        out[f"{name}_length"] = np.int32(len(seq))
        out[f"{name}_truncated"] = np.bool_(len(ids) > max_response_len)
    return out


def tokenizer_info(tokenizer: TokenizerLike) -> dict[str, Any]:
    return {
        "class": type(tokenizer).__name__,
        "vocab_size": int(tokenizer.vocab_size),
        "pad_id": int(tokenizer.pad_id),
        "eos_id": int(tokenizer.eos_id),
        "bos_id": None if tokenizer.bos_id is None else int(tokenizer.bos_id),
        "add_bos": bool(tokenizer.add_bos),
    }


# ------------------------------------------------------------------------------------------- permutations, flips
def stable_permutation(n: int, *entropy: int) -> np.ndarray:
    """A permutation of range(n), int64[n], fixed by `entropy` (e.g. seed, epoch, member).

    Built from the raw output of a bit generator, whose stream NumPy keeps stable across releases (NEP 19), rather
    than `Generator.permutation`, whose algorithm may change: a checkpointed data order must replay identically.
    Beware that SeedSequence ignores trailing zero words: (s, e) and (s, e, 0) give the same permutation.
    """
    bits = np.random.PCG64(np.random.SeedSequence([int(e) for e in entropy])).random_raw(n)
    return np.argsort(bits, kind="stable").astype(np.int64)


def flip_mask(n: int, fraction: float, seed: int, split: str = "train") -> np.ndarray:
    """bool[n] with exactly ``round(fraction * n)`` True entries, placed by a permutation seeded by (seed, split)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"flip fraction must be in [0, 1], got {fraction}")
    mask = np.zeros((n,), np.bool_)
    mask[stable_permutation(n, seed, STREAM_FLIP, zlib.crc32(split.encode()))[: round(fraction * n)]] = True
    return mask


def member_subset(n: int, fraction: float, seed: int) -> np.ndarray:
    """int64[round(fraction * n)], sorted: the positions of the training pairs one ensemble member sees when each
    member trains on its own share of them (subagging), chosen by a permutation seeded by the member's seed."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"member data fraction must be in (0, 1], got {fraction}")
    return np.sort(stable_permutation(n, seed, STREAM_SUBSET)[: round(fraction * n)])


def carve_validation(
    pairs: list[PreferencePair], fraction: float, seed: int
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Splits `pairs` into (train, validation) with ``round(fraction * n)`` validation pairs chosen by a seeded
    permutation; both keep the input order."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {fraction}")
    held = np.zeros((len(pairs),), np.bool_)
    held[stable_permutation(len(pairs), seed, STREAM_VALIDATION)[: round(fraction * len(pairs))]] = True
    return [p for p, h in zip(pairs, held) if not h], [p for p, h in zip(pairs, held) if h]
