"""Tokenizers: one interface, a word-level tokenizer for the built-in task, an adapter over HF `tokenizers`.

Every tokenizer is saved as a directory holding a `tokenizer.json` (and, for HF tokenizers, the usual
`tokenizer_config.json` naming the special tokens), and `load_tokenizer` reads either kind back by looking at the
file's content, so a workdir never has to record which class wrote it.

Conventions shared by both implementations:
  * `encode(text)` returns the ids of the text alone: no BOS, no EOS. `encode_prompt` prepends BOS when the
    tokenizer's model expects one (`add_bos`).
  * `decode(ids)` reads up to the first EOS and drops pad and BOS, so that a padded sampler output row
    `[T]` decodes to the text the policy wrote.
"""

from __future__ import annotations

import abc
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers as hf_tokenizers

TOKENIZER_FILE = "tokenizer.json"
# The file name and key names follow the Hugging Face convention, so a downloaded HF model directory and one we
# saved are read the same way.
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

# Marks a tokenizer.json written by warm_jax (rather than by HF `tokenizers`), and says which class reads it.
_FORMAT_KEY = "warm_jax_tokenizer"
_FORMAT_VERSION = 1

# Punctuation that the word tokenizer splits off into tokens of its own.
PUNCTUATION = (".", ",", "!", "?", ";", ":")
_WORD_RE = re.compile(r"[^\s.,!?;:]+|[.,!?;:]")


class Tokenizer(abc.ABC):
    """Text <-> token ids. Implementations are immutable after construction."""

    @property
    @abc.abstractmethod
    def kind(self) -> str:
        """Short name of the implementation, as written in the saved file ('word', 'hf')."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special tokens included; every id is in [0, vocab_size)."""

    @property
    @abc.abstractmethod
    def pad_id(self) -> int:
        """Id used to pad sequences to a common length."""

    @property
    @abc.abstractmethod
    def bos_id(self) -> int | None:
        """Beginning-of-sequence id, or None if the vocabulary has none."""

    @property
    @abc.abstractmethod
    def eos_id(self) -> int:
        """End-of-sequence id; a sampler stops a row when it emits it."""

    @property
    @abc.abstractmethod
    def add_bos(self) -> bool:
        """Whether a prompt should start with BOS (what the model saw in training)."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of `text`, without BOS or EOS."""

    @abc.abstractmethod
    def _decode_clean(self, ids: list[int]) -> str:
        """Text of ids from which EOS (and what follows), pad and BOS are already removed."""

    @abc.abstractmethod
    def save(self, directory: str | os.PathLike) -> Path:
        """Writes the tokenizer into `directory` (created if needed); returns the tokenizer.json path."""

    def encode_prompt(self, text: str) -> list[int]:
        """Ids of a prompt: `encode(text)`, with BOS in front when `add_bos`."""
        ids = self.encode(text)
        if self.add_bos and self.bos_id is not None:
            return [self.bos_id, *ids]
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of each text; ragged (no padding)."""
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of ids `[T]`, read up to the first EOS, with pad and BOS dropped."""
        return self._decode_clean(self._strip_specials(ids))

    def decode_batch(self, batch: Sequence[Sequence[int]] | np.ndarray) -> list[str]:
        """`decode` of each row of `batch` `[B, T]` (a 2-D array or a list of ragged rows)."""
        return [self.decode(row) for row in batch]

    def _strip_specials(self, ids: Sequence[int] | np.ndarray) -> list[int]:
        values = np.asarray(ids)
        if values.ndim != 1:
            raise ValueError(f"decode expects one sequence of ids [T], got an array of shape {values.shape}")
        if values.size and not np.issubdtype(values.dtype, np.integer):
            raise ValueError(f"decode expects integer ids, got dtype {values.dtype}")
        out: list[int] = []
        for i in values.tolist():
            if i < 0:
                raise ValueError(f"decode got a negative token id {i}")
            if i == self.eos_id:
                break
            if i == self.pad_id or i == self.bos_id:
                continue
            out.append(i)
        return out


# ---------------------------------------------------------------------------------------------------- word level


def split_words(text: str) -> list[str]:
    """Lowercased words of `text`, with each of . , ! ? ; : as a token of its own."""
    return _WORD_RE.findall(text.lower())


def join_words(words: Iterable[str]) -> str:
    """Inverse of `split_words` on well-formed text: no space before punctuation ("great movie !" -> "great movie!")."""
    out: list[str] = []
    for w in words:
        if out and w not in PUNCTUATION:
            out.append(" ")
        out.append(w)
    return "".join(out)


class WordTokenizer(Tokenizer):
    """Word-level tokenizer: ids 0..3 are <pad>, <bos>, <eos>, <unk>, then one id per word.

    Text is lowercased and punctuation is split off, so `decode(encode(t)) == join_words(split_words(t))` for any
    text whose words are all in the vocabulary; unknown words become <unk>.
    """

    SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
    PAD, BOS, EOS, UNK = 0, 1, 2, 3

    def __init__(self, vocab: Sequence[str]):
        """`vocab`: every token by id, starting with the four SPECIALS in order."""
        vocab = list(vocab)
        if tuple(vocab[: len(self.SPECIALS)]) != self.SPECIALS:
            raise ValueError(f"WordTokenizer vocab must start with {self.SPECIALS}, got {vocab[:4]}")
        index: dict[str, int] = {}
        for i, word in enumerate(vocab):
            if i >= len(self.SPECIALS):
                _check_word(word)
            if word in index:
                raise ValueError(f"WordTokenizer vocab has {word!r} twice (ids {index[word]} and {i})")
            index[word] = i
        self._vocab = tuple(vocab)
        # Literal "<pad>"/"<bos>"/"<eos>" in input text must not become control ids (an "<eos>" typed by a user
        # would end decoding early), so only ordinary words and "<unk>" are looked up.
        self._index = {w: i for w, i in index.items() if i >= len(self.SPECIALS) or i == self.UNK}

    @classmethod
    def from_words(cls, words: Iterable[str]) -> WordTokenizer:
        """Tokenizer over `words` (deduplicated, order kept) after the special tokens."""
        seen = dict.fromkeys(w for w in words if w not in cls.SPECIALS)
        return cls([*cls.SPECIALS, *seen])

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> WordTokenizer:
        """Reads the content of a tokenizer.json written by `save`; errors name `source`."""
        version = data.get("format_version")
        if version != _FORMAT_VERSION:
            raise ValueError(f"{source}: unsupported format_version {version!r} (expected {_FORMAT_VERSION})")
        vocab = data.get("vocab")
        if not isinstance(vocab, list) or not all(isinstance(w, str) for w in vocab):
            raise ValueError(f"{source}: field 'vocab' must be a list of strings")
        try:
            return cls(vocab)
        except ValueError as e:
            raise ValueError(f"{source}: field 'vocab': {e}") from e

    @property
    def kind(self) -> str:
        return "word"

    @property
    def vocab(self) -> tuple[str, ...]:
        """Every token, indexed by id."""
        return self._vocab

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    @property
    def pad_id(self) -> int:
        return self.PAD

    @property
    def bos_id(self) -> int:
        return self.BOS

    @property
    def eos_id(self) -> int:
        return self.EOS

    @property
    def unk_id(self) -> int:
        return self.UNK

    @property
    def add_bos(self) -> bool:
        return True

    def encode(self, text: str) -> list[int]:
        get = self._index.get
        return [get(w, self.UNK) for w in split_words(text)]

    def _decode_clean(self, ids: list[int]) -> str:
        # Ids past the vocabulary can come from a model whose embedding table is padded (to a multiple of 128,
        # say) and that has not learnt never to sample them; they read as <unk> rather than crash a sampler.
        n = len(self._vocab)
        return join_words(self._vocab[i] if i < n else self.SPECIALS[self.UNK] for i in ids)

    def save(self, directory: str | os.PathLike) -> Path:
        data = {
            _FORMAT_KEY: self.kind,
            "format_version": _FORMAT_VERSION,
            "special_tokens": dict(zip(("pad", "bos", "eos", "unk"), self.SPECIALS)),
            "vocab": list(self._vocab),
        }
        path = Path(directory) / TOKENIZER_FILE
        _write_atomic(path, json.dumps(data, indent=1) + "\n")
        return path

    def __repr__(self) -> str:
        return f"WordTokenizer(vocab_size={self.vocab_size})"


def _check_word(word: Any) -> None:
    if not isinstance(word, str) or not word:
        raise ValueError(f"word {word!r} is not a non-empty string")
    # A word must come back as itself from split_words, or it could never be encoded.
    if split_words(word) != [word]:
        raise ValueError(
            f"word {word!r} is not a single lowercase token (it splits into {split_words(word)}); "
            f"punctuation {PUNCTUATION} must be a word of its own"
        )


# ---------------------------------------------------------------------------------------------------- HF adapter

# Names that models commonly give their special tokens, most specific first; used only when neither the caller
# nor tokenizer_config.json says which token plays which role.
_EOS_NAMES = ("</s>", "<eos>", "<|endoftext|>", "<|end_of_text|>", "<|im_end|>", "<|eot_id|>")
_BOS_NAMES = ("<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>")
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")


class HFTokenizer(Tokenizer):
    """Adapter over a Hugging Face `tokenizers.Tokenizer` (BPE, WordLevel, Unigram, ...)."""

    def __init__(
        self,
        tokenizer: hf_tokenizers.Tokenizer,
        *,
        eos_id: int,
        bos_id: int | None = None,
        pad_id: int | None = None,
        add_bos: bool = False,
    ):
        """`pad_id` None pads with EOS (many causal LMs have no pad token)."""
        # A private copy, with the file's padding/truncation settings off: `encode` must return exactly the ids
        # of the text, and the caller's object must not change under it.
        self._tok = hf_tokenizers.Tokenizer.from_str(tokenizer.to_str())
        self._tok.no_padding()
        self._tok.no_truncation()
        n = self._tok.get_vocab_size(with_added_tokens=True)
        for name, value in (("eos_id", eos_id), ("bos_id", bos_id), ("pad_id", pad_id)):
            if value is not None and not 0 <= value < n:
                raise ValueError(f"HFTokenizer {name}={value} is outside the vocabulary [0, {n})")
        if add_bos and bos_id is None:
            raise ValueError("HFTokenizer add_bos=True needs a bos_id")
        self._eos = int(eos_id)
        self._bos = None if bos_id is None else int(bos_id)
        self._pad = self._eos if pad_id is None else int(pad_id)
        self._add_bos = bool(add_bos)

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        *,
        eos_id: int | None = None,
        bos_id: int | None = None,
        pad_id: int | None = None,
        add_bos: bool | None = None,
    ) -> HFTokenizer:
        """Reads a tokenizer.json (or a directory holding one).

        Each special id not given is resolved, in order, from a `tokenizer_config.json` beside the file
        (`eos_token`, `bos_token`, `pad_token`, `add_bos_token`), then from the file's own padding settings and the
        usual names of special tokens. `add_bos` not given and not in the config is True when the file's
        post-processor itself prepends BOS.
        """
        file = _tokenizer_file(path)
        try:
            tok = hf_tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises a bare Exception with serde's message
            raise ValueError(f"{file}: not a readable HF tokenizers file: {e}") from e
        config = _read_tokenizer_config(file.parent / TOKENIZER_CONFIG_FILE)
        with open(file, encoding="utf-8") as f:
            padding = json.load(f).get("padding") or {}

        def from_config(key: str) -> int | None:
            token = config.get(key)
            if isinstance(token, dict):  # older files store AddedToken dicts
                token = token.get("content")
            if token is None:
                return None
            token_id = tok.token_to_id(token)
            if token_id is None:
                raise ValueError(
                    f"{file.parent / TOKENIZER_CONFIG_FILE}: field {key!r} names {token!r}, "
                    f"which is not in the vocabulary of {file}"
                )
            return token_id

        specials = [t.content for t in tok.get_added_tokens_decoder().values() if t.special]

        def by_name(names: Sequence[str]) -> int | None:
            for name in names:
                if name in specials:
                    return tok.token_to_id(name)
            return None

        if eos_id is None:
            eos_id = from_config("eos_token")
        if eos_id is None:
            eos_id = by_name(_EOS_NAMES)
        if eos_id is None:
            raise ValueError(
                f"{file}: cannot tell which token is EOS (special tokens: {specials}); pass eos_id or write "
                f"'eos_token' into {TOKENIZER_CONFIG_FILE} beside it"
            )
        if bos_id is None:
            bos_id = from_config("bos_token")
        if bos_id is None:
            bos_id = by_name(_BOS_NAMES)
        if pad_id is None:
            pad_id = from_config("pad_token")
        if pad_id is None and isinstance(padding.get("pad_id"), int):
            pad_id = padding["pad_id"]
        if pad_id is None:
            pad_id = by_name(_PAD_NAMES)
        if add_bos is None:
            add_bos = config.get("add_bos_token")
        if add_bos is None:
            add_bos = bos_id is not None and _post_processor_adds(tok, bos_id)
        try:
            return cls(tok, eos_id=eos_id, bos_id=bos_id, pad_id=pad_id, add_bos=bool(add_bos))
        except ValueError as e:
            raise ValueError(f"{file}: {e}") from e

    @property
    def kind(self) -> str:
        return "hf"

    @property
    def backend(self) -> hf_tokenizers.Tokenizer:
        """The wrapped HF tokenizer (padding and truncation disabled)."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return self._pad

    @property
    def bos_id(self) -> int | None:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def add_bos(self) -> bool:
        return self._add_bos

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # The library's batch call runs in parallel in Rust.
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def _decode_clean(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def save(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / TOKENIZER_FILE
        tmp = path.with_name(path.name + ".tmp")
        self._tok.save(str(tmp))
        os.replace(tmp, path)
        token = self._tok.id_to_token
        config = {
            "eos_token": token(self._eos),
            "bos_token": None if self._bos is None else token(self._bos),
            "pad_token": token(self._pad),
            "add_bos_token": self._add_bos,
        }
        _write_atomic(directory / TOKENIZER_CONFIG_FILE, json.dumps(config, indent=1) + "\n")
        return path

    def __repr__(self) -> str:
        return (
            f"HFTokenizer(vocab_size={self.vocab_size}, bos_id={self._bos}, eos_id={self._eos}, "
            f"pad_id={self._pad}, add_bos={self._add_bos})"
        )


def _post_processor_adds(tok: hf_tokenizers.Tokenizer, bos_id: int) -> bool:
    """True if the file's post-processor puts BOS in front of a single sequence."""
    with_specials = tok.encode("a", add_special_tokens=True).ids
    without = tok.encode("a", add_special_tokens=False).ids
    return bool(with_specials) and with_specials[0] == bos_id and (not without or without[0] != bos_id)


def _read_tokenizer_config(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


# ---------------------------------------------------------------------------------------------------- loading


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Reads a tokenizer saved by either implementation, or an HF model's tokenizer.json.

    `path` is a tokenizer.json file or a directory holding one. The kind is read from the content: a file with a
    'warm_jax_tokenizer' field is ours, one with a 'model' field is an HF `tokenizers` file.
    """
    file = _tokenizer_file(path)
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(data).__name__}")
    if _FORMAT_KEY in data:
        kind = data[_FORMAT_KEY]
        if kind != "word":
            raise ValueError(f"{file}: field {_FORMAT_KEY!r} is {kind!r}; known kinds: ['word']")
        return WordTokenizer.from_json_dict(data, source=str(file))
    if "model" in data:
        return HFTokenizer.from_file(file)
    raise ValueError(
        f"{file}: not a tokenizer file (no {_FORMAT_KEY!r} field for a warm_jax tokenizer, "
        f"no 'model' field for a HF tokenizers file)"
    )


def _tokenizer_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {file}")
    return file


def _write_atomic(path: Path, text: str) -> None:
    # Readers never see a half-written file: write beside it, then rename over it.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def encode_prompts(prompts: Sequence[str], tok: Tokenizer, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompt tokens and mask [N, max_len] (BOS when the tokenizer adds one)."""
    tokens = np.full((len(prompts), max_len), tok.pad_id, np.int32)
    mask = np.zeros((len(prompts), max_len), np.int32)
    for i, ids in enumerate(tok.encode_batch(prompts)):
        ids = ([tok.bos_id] if tok.add_bos and tok.bos_id is not None else []) + list(ids)
        ids = ids[-max_len:]
        tokens[i, max_len - len(ids) :] = ids
        mask[i, max_len - len(ids) :] = 1
    return tokens, mask
