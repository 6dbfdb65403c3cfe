"""Chat templates: a conversation (a list of ``{role, content}`` messages) rendered to the text a chat model reads.

A template is a Jinja2 program, as Hugging Face tokenizers ship it: it sees ``messages``, ``add_generation_prompt``,
``bos_token`` and ``eos_token``, may call ``raise_exception(msg)`` and ``strftime_now(fmt)`` and use the ``tojson``
filter, and runs in Jinja's immutable sandbox with ``trim_blocks`` and ``lstrip_blocks`` (so a template renders here
as it does in ``apply_chat_template``). It is read from:

  * a GGUF file's ``tokenizer.chat_template`` metadata (llama.cpp's key; SmolLM2-Instruct ships one),
  * a ``tokenizer_config.json``'s ``chat_template`` (a string, or a list of ``{name, template}`` of which the one
    named 'default' is used), or a ``chat_template.jinja`` file (where newer ``transformers`` save it),
  * or the built-in `DEFAULT_TEMPLATE` when the tokenizer has none (the built-in word tokenizer, a bare
    tokenizer.json). It writes each message as ``"\\n\\n" + Role + ": " + content`` with the roles user -> Human,
    assistant -> Assistant, system -> System (others capitalised), and the generation prompt as
    ``"\\n\\nAssistant:"`` — the layout of Anthropic's HH-RLHF transcripts, which the ``hh`` format also reads:

        [{"role": "user", "content": "hi"}]  + generation prompt  ->  "\\n\\nHuman: hi\\n\\nAssistant:"
        ... + [{"role": "assistant", "content": "hello"}]          ->  "\\n\\nHuman: hi\\n\\nAssistant: hello"
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox

from warm_jax.cli_errors import UserError

DEFAULT_SOURCE = "default"
DEFAULT_TEMPLATE = (
    "{%- set names = {'user': 'Human', 'assistant': 'Assistant', 'system': 'System'} -%}"
    "{%- for message in messages -%}"
    "{{ '\\n\\n' + names.get(message['role'], message['role'] | capitalize) + ': ' + message['content'] }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '\\n\\nAssistant:' }}{%- endif -%}"
)
GGUF_KEY = "tokenizer.chat_template"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
JINJA_FILE = "chat_template.jinja"


class ChatTemplateError(ValueError):
    """A conversation the template refuses (its ``raise_exception``) or cannot render; no file or row named."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters, which would change the text the model was trained on.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=8)
def _compile(text: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(text)


class ChatTemplate:
    """A compiled chat template and where it came from.

    Args:
      text: the Jinja2 source.
      source: where it was read from ("PATH (field)", or "default"), for messages and the dataset's metadata.
      bos_token, eos_token: the token strings the template may print (``{{ bos_token }}``).
    """

    def __init__(self, text: str, source: str, *, bos_token: str = "", eos_token: str = ""):
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{source}: the chat template is empty")
        self.text, self.source, self.bos_token, self.eos_token = text, source, bos_token, eos_token
        try:
            self._template = _compile(text)
        except jinja2.TemplateSyntaxError as e:
            raise UserError(f"{source}: the chat template is not valid Jinja2 (line {e.lineno}: {e.message})") from e

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False) -> str:
        """The text of `messages`; raises `ChatTemplateError` when the template refuses them."""
        try:
            return self._template.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except ChatTemplateError:
            raise
        except (jinja2.TemplateError, TypeError, KeyError, AttributeError) as e:
            raise ChatTemplateError(f"the chat template from {self.source} failed: {type(e).__name__}: {e}") from e

    def describe(self) -> dict[str, str]:
        """What the dataset's metadata records: the source and the template's SHA-256."""
        return {"source": self.source, "sha256": self.sha256}

    def __repr__(self) -> str:
        return f"ChatTemplate(source={self.source!r}, sha256={self.sha256[:12]})"


def default() -> ChatTemplate:
    return ChatTemplate(DEFAULT_TEMPLATE, DEFAULT_SOURCE)


def _token_text(value: Any) -> str:
    if isinstance(value, dict):  # older tokenizer_config.json files store AddedToken dicts
        value = value.get("content")
    return value if isinstance(value, str) else ""


def from_gguf(path: str | os.PathLike) -> ChatTemplate | None:
    """The template in a GGUF's metadata, with its BOS/EOS token strings; None when it has none."""
    from warm_jax.models import gguf_file

    try:
        fields = gguf_file.read(path).fields
    except gguf_file.GGUFFormatError as e:
        raise UserError(str(e)) from None
    text = fields.get(GGUF_KEY)
    if text is None:
        return None
    if not isinstance(text, str):
        raise UserError(f"{path}: metadata field {GGUF_KEY!r} is a {type(text).__name__}, not a string")
    tokens = fields.get("tokenizer.ggml.tokens") or []

    def token(key: str) -> str:
        i = fields.get(key)
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else ""

    source = f"{os.fspath(path)} ({GGUF_KEY})"
    return ChatTemplate(
        text, source, bos_token=token("tokenizer.ggml.bos_token_id"), eos_token=token("tokenizer.ggml.eos_token_id")
    )


def from_tokenizer_config(path: str | os.PathLike) -> ChatTemplate | None:
    """The ``chat_template`` of a tokenizer_config.json, or of a ``chat_template.jinja`` beside it (which newer
    ``transformers`` write instead); None when there is neither. Token strings come from the config."""
    path = Path(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(config).__name__}")
    tokens = dict(bos_token=_token_text(config.get("bos_token")), eos_token=_token_text(config.get("eos_token")))
    text = config.get("chat_template")
    source = f"{path} (chat_template)"
    if isinstance(text, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in text if isinstance(t, dict)}
        if "default" not in named:
            raise UserError(f"{path}: field 'chat_template' lists templates {sorted(named)} but none named 'default'")
        text, source = named["default"], f"{path} (chat_template 'default')"
    if text is None:
        jinja_file = path.parent / JINJA_FILE
        if not jinja_file.is_file():
            return None
        return ChatTemplate(jinja_file.read_text(encoding="utf-8"), os.fspath(jinja_file), **tokens)
    if not isinstance(text, str):
        raise UserError(f"{path}: field 'chat_template' is a {type(text).__name__}, not a string")
    return ChatTemplate(text, source, **tokens)


def load(path: str | os.PathLike) -> ChatTemplate:
    """The template at `path`: a ``.gguf``, a tokenizer_config.json, a ``.jinja`` file, or a directory holding
    tokenizer_config.json or chat_template.jinja. A file without a template is an error naming it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"chat template {path} does not exist")
    found = _find(path)
    if found is None:
        raise UserError(
            f"{path} holds no chat template (no {GGUF_KEY!r} metadata, no 'chat_template' in a "
            f"{TOKENIZER_CONFIG_FILE}, no {JINJA_FILE}); pass --chat_template=default for the built-in one"
        )
    return found


def _find(path: Path) -> ChatTemplate | None:
    if path.is_dir():
        if (path / TOKENIZER_CONFIG_FILE).is_file():
            return from_tokenizer_config(path / TOKENIZER_CONFIG_FILE)
        if (path / JINJA_FILE).is_file():
            return ChatTemplate((path / JINJA_FILE).read_text(encoding="utf-8"), os.fspath(path / JINJA_FILE))
        return None
    if path.suffix == ".gguf":
        return from_gguf(path)
    if path.suffix == ".jinja":
        return ChatTemplate(path.read_text(encoding="utf-8"), os.fspath(path))
    if path.suffix == ".json":
        return from_tokenizer_config(path)
    raise UserError(f"chat template {path}: expected a .gguf, a .json tokenizer config, a .jinja file or a directory")


def resolve(spec: str | os.PathLike | None, tokenizer_path: str | os.PathLike | None) -> ChatTemplate:
    """The template a dataset is rendered with.

    `spec` 'default' is the built-in template; another `spec` is a path for `load`. Without one, the tokenizer's own:
    a GGUF's metadata, or the tokenizer_config.json / chat_template.jinja beside its tokenizer.json; the built-in
    template when it has none.
    """
    if spec is not None:
        return default() if os.fspath(spec) == DEFAULT_SOURCE else load(spec)
    if tokenizer_path is not None:
        path = Path(tokenizer_path)
        if path.is_file() and path.suffix != ".gguf":
            path = path.parent  # a tokenizer.json: its config sits beside it
        if path.exists():
            found = _find(path)
            if found is not None:
                return found
    return default()
