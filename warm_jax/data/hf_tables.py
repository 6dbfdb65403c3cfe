"""Preference pairs from Hugging Face ``datasets`` tables: Parquet files, Arrow ``save_to_disk`` folders, JSON lines.

Columns follow the conventions of TRL's preference trainers:

  * ``chosen``, ``rejected`` — strings, or conversations: lists of ``{role, content}`` messages;
  * ``prompt`` (optional) — a string or a conversation, put before both ("explicit prompt");
  * ``score_chosen``, ``score_rejected`` (optional) — numbers, stored with the pair;
  * ``subset`` (optional) — a string (RewardBench's), kept per example (`builders.SUBSETS_FILE`).

Without a ``prompt`` column the prompt is what ``chosen`` and ``rejected`` share ("implicit prompt"): the messages the
two conversations begin with, up to the last one before an assistant turn; for strings, their common leading text cut
after its last whitespace (so that no word is split). A string prompt beside conversations becomes a user message
when both conversations begin with an assistant message; when they hold the whole dialogue (as in
HuggingFaceH4/ultrafeedback_binarized) the implicit prompt is used and the string is not.

Conversations are rendered with a `chat_template.ChatTemplate`, as TRL's ``apply_chat_template`` does for
preference data: the prompt's text is ``render(prompt, add_generation_prompt=True)`` (False when the prompt ends with
an assistant message), a response's text is ``render(prompt + response)`` less the prompt's text at its front; a
template whose rendering of the whole does not begin with that of the prompt is refused for the row. Where the
tokenizer adds BOS itself, a BOS token string at the front of the rendered prompt is dropped so that it is not
there twice. Strings are used as they are: TRL applies no template to them either.

``--input`` may be a ``.parquet``, ``.arrow`` or JSON-lines (``.jsonl``/``.json``, optionally ``.gz``) file; a
``save_to_disk`` folder (a Dataset: ``state.json`` and ``data-*.arrow``, Arrow IPC streams; a DatasetDict:
``dataset_dict.json`` and a Dataset folder per split); or any other folder, whose ``*.parquet`` files, or else
JSON-lines files, are all read (searched recursively; not both kinds). A file's split is the part of its name
before ``-NNNNN-of-NNNNN`` (the Hub's ``data/train-00000-of-00001.parquet``), else its stem when that is one of
train/validation/valid/test/ood, else its folder's name by the same rule (``train/0000.parquet``), else 'train';
'valid' means 'validation'. A save_to_disk Dataset folder is the split its ``state.json`` names, else 'train'.

A bad row raises `TableRecordError`: ``FILE row I column 'C': REASON``, I counted from 0 within the file as
``datasets`` indexes rows; JSON lines name the line, counted from 1. A table that lacks ``chosen`` or ``rejected``
raises `UserError` naming the file and the columns it has.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from warm_jax.cli_errors import UserError
from warm_jax.data import chat_template as chat_lib
from warm_jax.data import preference as pref

FORMAT = "hf"
REQUIRED_COLUMNS = ("chosen", "rejected")
COLUMNS = ("prompt", "chosen", "rejected", "score_chosen", "score_rejected", "subset")
JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
# JSON files that `datasets` and the Hub keep beside the data; never rows.
METADATA_FILES = frozenset({"dataset_info.json", "dataset_infos.json", "state.json", "dataset_dict.json"})
_SHARDED = re.compile(r"(?P<name>.+?)-\d{5}-of-\d{5}(?:-[0-9a-f]{8,})?")
BATCH_ROWS = 1024  # rows per Arrow batch turned into Python objects at once


class TableRecordError(pref.PreferenceDataError):
    """A row that cannot be used: ``FILE row I column 'C': REASON`` (``line`` for JSON lines)."""

    def __init__(self, path: str | os.PathLike, index: int, column: str | None, reason: str, code: str, unit: str):
        super().__init__(path, index, column or "<line>", reason, code)
        self.unit = unit
        self.args = (f"{self.path} {unit} {index}" + (f" column '{column}'" if column else "") + f": {reason}",)


@dataclasses.dataclass(frozen=True)
class _Row:
    path: str
    index: int
    unit: str  # "row" (from 0) or "line" (from 1)

    def error(self, column: str | None, reason: str, code: str) -> TableRecordError:
        return TableRecordError(self.path, self.index, column, reason, code, self.unit)


@dataclasses.dataclass(frozen=True)
class TableFile:
    path: Path
    kind: str  # "parquet", "arrow" or "jsonl"
    split: str


# ----------------------------------------------------------------------------------------------- finding files
def _name_split(name: str) -> str | None:
    m = _SHARDED.fullmatch(name)
    if m:
        name = m["name"]
    elif name not in pref.SPLIT_FILES:
        return None
    name = pref.SPLIT_FILES.get(name, name)
    return name if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) else None


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".parquet", ".arrow", ".jsonl", ".json"):
        name = name.removesuffix(suffix)
    return name


def split_of(path: Path) -> str:
    """The split a data file feeds, from its name or its folder's (see the module docstring)."""
    return _name_split(_stem(path)) or _name_split(path.parent.name) or "train"


def _kind(path: Path) -> str | None:
    if path.name.endswith(".parquet"):
        return "parquet"
    if path.name.endswith(".arrow"):
        return "arrow"
    if path.name.endswith(JSONL_SUFFIXES) and path.name not in METADATA_FILES:
        return "jsonl"
    return None


def _saved_dataset(folder: Path, split: str | None) -> list[TableFile]:
    """The Arrow files of a ``Dataset.save_to_disk`` folder, in order, as its state.json lists them."""
    state_path = folder / "state.json"
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
        names = [entry["filename"] for entry in state["_data_files"]]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(
            f"{state_path}: not a datasets save_to_disk state file (needs '_data_files': [{{filename}}]): "
            f"{type(e).__name__}: {e}"
        ) from None
    if not names:
        raise UserError(f"{state_path}: lists no data files")
    if split is None:
        split = state.get("_split") if isinstance(state.get("_split"), str) else None
        split = (_name_split(split) or split) if split else "train"
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", split):
        raise UserError(f"{state_path}: split {split!r} is not a usable split name")
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise UserError(f"{folder}: data files {missing} listed in state.json are missing")
    return [TableFile(folder / n, "arrow", split) for n in names]


def table_files(input_path: str | os.PathLike) -> list[TableFile]:
    """The files to read, with their kind and split (see the module docstring)."""
    path = Path(input_path)
    if not path.exists():
        raise FileNotFoundError(f"--input {path} does not exist")
    if path.is_file():
        kind = _kind(path)
        if kind is None:
            raise UserError(
                f"--input {path}: not a Parquet (.parquet), Arrow (.arrow) or JSON lines (.jsonl/.json[.gz]) file"
            )
        return [TableFile(path, kind, split_of(path))]
    if (path / "dataset_dict.json").is_file():
        try:
            splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f'{path / "dataset_dict.json"}: expected {{"splits": [...]}}: {e}') from None
        return [f for s in splits for f in _saved_dataset(path / s, _name_split(s) or s)]
    if (path / "state.json").is_file():
        return _saved_dataset(path, None)
    found = sorted(p for p in path.rglob("*") if p.is_file() and not any(x.startswith(".") for x in p.parts))
    by_kind = {k: [p for p in found if _kind(p) == k] for k in ("parquet", "jsonl")}
    if by_kind["parquet"] and by_kind["jsonl"]:
        raise UserError(
            f"--input directory {path} holds both Parquet ({len(by_kind['parquet'])}) and JSON lines "
            f"({len(by_kind['jsonl'])}) files; point --input at the folder or file of one kind"
        )
    kind = "parquet" if by_kind["parquet"] else "jsonl"
    if not by_kind[kind]:
        raise FileNotFoundError(
            f"--input directory {path} holds no *.parquet or JSON lines files and is not a datasets save_to_disk "
            "folder (no dataset_dict.json or state.json)"
        )
    return [TableFile(p, kind, split_of(p)) for p in by_kind[kind]]


# -------------------------------------------------------------------------------------------------- rows
def _check_columns(path: Path, names: Sequence[str]) -> list[str]:
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise UserError(
            f"{path}: no column {' or '.join(repr(c) for c in missing)} (a preference table needs 'chosen' and "
            f"'rejected', optionally 'prompt'); columns found: {list(names)}"
        )
    return [c for c in COLUMNS if c in names]


def _arrow_rows(path: Path) -> Iterator[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.name.endswith(".parquet"):
        try:
            table = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{path}: not a readable Parquet file ({e})") from None
        columns = _check_columns(path, table.schema_arrow.names)
        batches = table.iter_batches(batch_size=BATCH_ROWS, columns=columns)
    else:
        source = pa.memory_map(os.fspath(path))
        try:  # `datasets` writes IPC streams; an IPC file is accepted too
            reader = pa.ipc.open_stream(source)
            batches = iter(reader)
        except (pa.ArrowException, OSError):
            try:
                file_reader = pa.ipc.open_file(source)
            except (pa.ArrowException, OSError) as e:
                raise UserError(f"{path}: not an Arrow IPC stream or file ({e})") from None
            reader = file_reader
            batches = (file_reader.get_batch(i) for i in range(file_reader.num_record_batches))
        columns = _check_columns(path, reader.schema.names)
        batches = (b.select(columns) for b in batches)
    done = 0
    try:
        for batch in batches:
            for row in batch.to_pylist():
                yield row
                done += 1
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: reading stopped at row {done}: damaged file ({e})") from None


def iter_rows(table: TableFile) -> Iterator[tuple[_Row, Mapping[str, Any] | TableRecordError]]:
    """``(where, row)`` for every row of `table`, or ``(where, error)`` for a JSON line that is no object."""
    path = os.fspath(table.path)
    if table.kind == "jsonl":
        for line, obj in pref.iter_json_lines(table.path):
            where = _Row(path, line, "line")
            yield where, (where.error(None, obj.reason, obj.code) if isinstance(obj, pref.PreferenceDataError) else obj)
        return
    for i, row in enumerate(_arrow_rows(table.path)):
        yield _Row(path, i, "row"), row


# ------------------------------------------------------------------------------------------------ one row
Messages = list[dict[str, Any]]


def _value(row: Mapping[str, Any], column: str, where: _Row, required: bool) -> str | Messages | None:
    value = row.get(column)
    if value is None:
        if required:
            found = "" if column in row else f" (the record has {sorted(row)})"
            raise where.error(column, f"missing{found}", "missing_field")
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        if not value:
            raise where.error(column, "an empty list of messages", "empty_text")
        for k, message in enumerate(value):
            if not isinstance(message, dict):
                got = type(message).__name__
                raise where.error(column, f"message {k}: expected a {{role, content}} object, got {got}", "wrong_type")
            for key in ("role", "content"):
                if message.get(key) is None:
                    raise where.error(column, f"message {k} has no '{key}'", "missing_field")
                if not isinstance(message[key], str):
                    got = type(message[key]).__name__
                    raise where.error(column, f"message {k}: '{key}' must be a string, got {got}", "wrong_type")
        return [dict(m) for m in value]
    got = type(value).__name__
    raise where.error(column, f"expected a string or a list of {{role, content}} messages, got {got}", "wrong_type")


def _score(row: Mapping[str, Any], column: str, where: _Row) -> float:
    value = row.get(column)
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise where.error(column, f"expected a number, got {type(value).__name__}", "wrong_type")
    return float(value)


def _shared_prefix_text(chosen: str, rejected: str, where: _Row) -> tuple[str, str, str]:
    common = os.path.commonprefix([chosen, rejected])
    cut = max((i + 1 for i, ch in enumerate(common) if ch.isspace()), default=0)
    if not common[:cut].strip():
        raise where.error(
            "chosen/rejected",
            "no 'prompt' column, and the two texts share no leading words to take as the prompt",
            "no_common_prompt",
        )
    return common[:cut], chosen[cut:], rejected[cut:]


def _shared_prefix_messages(chosen: Messages, rejected: Messages, where: _Row) -> tuple[Messages, Messages, Messages]:
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while n and chosen[n - 1]["role"] == "assistant":  # the prompt ends where the model's turn begins
        n -= 1
    if not n:
        raise where.error(
            "chosen/rejected",
            "no 'prompt' column, and the two conversations share no leading messages before an assistant turn "
            "to take as the prompt",
            "no_common_prompt",
        )
    for column, messages in (("chosen", chosen), ("rejected", rejected)):
        if len(messages) == n:
            raise where.error(column, f"nothing after the {n} messages it shares with the other column", "empty_text")
    return chosen[:n], chosen[n:], rejected[n:]


def _render(
    template: chat_lib.ChatTemplate,
    prompt: Messages,
    replies: Mapping[str, Messages],
    where: _Row,
    prompt_column: str,
    strip_bos: bool,
) -> tuple[str, list[str]]:
    try:
        head = template.render(prompt, add_generation_prompt=prompt[-1]["role"] != "assistant")
    except chat_lib.ChatTemplateError as e:
        raise where.error(prompt_column, str(e), "template_error") from None
    texts = []
    for column, reply in replies.items():
        try:
            whole = template.render(prompt + reply)
        except chat_lib.ChatTemplateError as e:
            raise where.error(column, str(e), "template_error") from None
        if not whole.startswith(head):
            raise where.error(
                column,
                f"the chat template ({template.source}) does not render prompt + {column} as the prompt's text "
                "followed by the reply's, so the two cannot be told apart; use another --chat_template",
                "template_error",
            )
        texts.append(whole[len(head) :])
    if strip_bos and template.bos_token and head.startswith(template.bos_token):
        head = head[len(template.bos_token) :]
    return head, texts


def pair_from_row(
    row: Mapping[str, Any], where: _Row, template: chat_lib.ChatTemplate, *, strip_bos: bool = False
) -> tuple[pref.PreferencePair, bool]:
    """One table row -> (the checked pair, whether its texts were rendered with the chat template)."""
    prompt = _value(row, "prompt", where, required=False)
    chosen = _value(row, "chosen", where, required=True)
    rejected = _value(row, "rejected", where, required=True)
    kind = lambda v: "a list of messages" if isinstance(v, list) else "a string"
    if isinstance(chosen, list) != isinstance(rejected, list):
        raise where.error(
            "rejected", f"is {kind(rejected)} but 'chosen' is {kind(chosen)}; both must be of one kind", "wrong_type"
        )
    subset = row.get("subset")
    if subset is not None and not isinstance(subset, str):
        raise where.error("subset", f"expected a string, got {type(subset).__name__}", "wrong_type")
    scores = (_score(row, "score_chosen", where), _score(row, "score_rejected", where))
    rendered = isinstance(chosen, list)
    if not rendered:
        if isinstance(prompt, list):
            raise where.error(
                "prompt",
                "is a list of messages but 'chosen' and 'rejected' are strings; both must be of one kind",
                "wrong_type",
            )
        if prompt is None:
            prompt, chosen, rejected = _shared_prefix_text(chosen, rejected, where)
    else:
        prompt_column = "prompt"
        if isinstance(prompt, str):
            starts_with_reply = chosen[0]["role"] == "assistant" and rejected[0]["role"] == "assistant"
            prompt = [{"role": "user", "content": prompt}] if starts_with_reply else None
        if prompt is None:
            prompt, chosen, rejected = _shared_prefix_messages(chosen, rejected, where)
            prompt_column = "chosen"
        prompt, (chosen, rejected) = _render(
            template, prompt, {"chosen": chosen, "rejected": rejected}, where, prompt_column, strip_bos
        )
    pair = pref.PreferencePair(
        prompt, chosen, rejected, *scores, origin=f"{where.path}:{where.index}", subset=subset or ""
    )
    return pref.check_pair(pair, where), rendered


# ------------------------------------------------------------------------------------------------ all rows
@dataclasses.dataclass
class ReadStats:
    """How many kept rows were conversations (rendered with the template) and how many strings."""

    rendered: int = 0
    plain: int = 0


def read_splits(
    input_path: str | os.PathLike,
    *,
    template: chat_lib.ChatTemplate,
    strip_bos: bool = False,
    skip_log: pref.SkipLog | None = None,
) -> tuple[dict[str, list[pref.PreferencePair]], list[Path], ReadStats]:
    """Every pair under `input_path`, by split; the files read; counts of rendered and plain rows.

    With `skip_log`, bad rows are counted there and left out; otherwise the first raises `TableRecordError`. A file
    left with no valid row raises `UserError` either way.
    """
    files = table_files(input_path)
    splits: dict[str, list[pref.PreferencePair]] = {}
    stats = ReadStats()
    for table in files:
        mark = skip_log.mark() if skip_log is not None else None
        count = 0
        for where, row in iter_rows(table):
            try:
                if isinstance(row, pref.PreferenceDataError):
                    raise row
                pair, rendered = pair_from_row(row, where, template, strip_bos=strip_bos)
            except pref.PreferenceDataError as err:
                if skip_log is None:
                    raise
                skip_log.add(err)
                continue
            splits.setdefault(table.split, []).append(pair)
            count += 1
            stats.rendered += rendered
            stats.plain += not rendered
        if not count:
            why = (
                skip_log.summary(since=mark)
                if skip_log is not None and skip_log.counts != mark[0]
                else "the file holds no rows"
            )
            raise UserError(f"{table.path}: no valid records ({why})")
    return splits, [t.path for t in files], stats
