"""gin plumbing, kept in one place: search paths, parsing with clear errors, the configuration records.

A run writes WORKDIR/config.gin (its parsed configuration). Each stage keeps its own record in
WORKDIR/config/ (written by ``stages``): the parsed configuration when it starts, the operative one
(every value it read, defaults included) when it finishes. :func:`compare` says which bindings a rerun changes
against such a record; :data:`RUN_ONLY` lists the few that never count.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from tokenize import TokenError
from typing import Any

import gin
from gin import config_parser

from warm_jax import io_utils

# The project's gin/ folder (a source checkout or an editable install).
GIN_DIR = Path(__file__).resolve().parent.parent / "gin"


class _QuietSearchPathLogs(logging.Filter):
    """gin logs every search-path miss (at ERROR) while it looks for an included file."""

    def filter(self, record):
        return not str(record.msg).startswith(("system_path_file_exists", "Path not found"))


class ConfigError(ValueError):
    """A gin file or binding is wrong; the message names it."""


class ConfigMismatchError(ConfigError):
    """A rerun's configuration differs from the one a stage of the workdir ran with; nothing was touched."""


# Bindings that change how a run goes, not what it computes; a rerun may change them freely.
RUN_ONLY = frozenset(
    {
        "run_pipeline.stages",  # which stages this invocation runs (adding one must work)
        "make_mesh.shape",  # checkpoints restore onto any mesh; the math is the same up to rounding
        "make_mesh.devices",
        "LoopConfig.log_every",  # how often metrics are written
        "LoopConfig.save_interval_steps",  # which steps are saved: a resume is bitwise exact from any of them
        "LoopConfig.max_to_keep",  # retention of old steps (PretrainConfig.keep_steps is compared)
        "LoopConfig.async_save",  # whether a save blocks the loop
        "cpu_tuning.enabled",  # XLA:CPU fusion choices: the same math up to rounding, as with the mesh
        "cpu_tuning.train_step_ynn_fusion",
        "FaultInjection.kill_at_step",  # tests: a crash; the resumed run computes what an uninterrupted one does
        "metrics.writers",  # where metrics go besides the JSONL
        "metrics.wandb_project",
        "metrics.wandb_entity",
        "metrics.wandb_mode",
    }
)


# The modules that hold configurables and register stages (``stages.register_stage``). They are imported by
# name, here and nowhere else, so that `import warm_jax` stays light and no stage module is imported by the
# modules it imports (stages, config).
STAGE_MODULES = (
    "warm_jax.cpu_tuning",
    "warm_jax.pretrain",
    "warm_jax.task.builtin_pairs",
    "warm_jax.ensemble",
    "warm_jax.rm_control",
    "warm_jax.rm_average",
    "warm_jax.evaluation",
    "warm_jax.policy.bon",
    "warm_jax.policy.reinforce",
    "warm_jax.policy.policy_ensemble",
    "warm_jax.policy.warp",
    "warm_jax.report",
)


def register_all() -> None:
    """Imports every module with configurables, so gin knows all names (and every stage) before parsing."""
    for m in STAGE_MODULES:
        try:
            importlib.import_module(m)
        except ModuleNotFoundError as e:
            if e.name != m:  # a real missing dependency inside the module
                raise


def parse(
    gin_files: Sequence[str] = (),
    gin_bindings: Sequence[str] = (),
    search_paths: Sequence[str] = (),
) -> None:
    """Parses gin files (found relative to cwd, the project's gin/ and ``search_paths``)."""
    register_all()
    for p in _search_paths(search_paths):
        gin.add_config_file_search_path(p)
    for f in gin_files:
        if not _find(f, search_paths):
            raise ConfigError(f"gin file {f!r} not found in {_search_paths(search_paths)}")
    quiet = _QuietSearchPathLogs()
    logging.getLogger().addFilter(quiet)
    try:
        gin.parse_config_files_and_bindings(list(gin_files), list(gin_bindings), finalize_config=False)
        gin.finalize()  # checks that every %MACRO and @reference is defined
    except (ValueError, KeyError, NameError, TypeError, AttributeError, ImportError, SyntaxError, TokenError) as e:
        # gin's message names the binding and file:line, except for a malformed binding: find that one.
        bad = _first_malformed(gin_bindings)
        where = f" (--gin_bindings={bad!r})" if bad is not None else ""
        # The undefined-macro error quotes the whole configuration after this; the name is enough.
        message = str(e).split(" in config string:")[0]
        if isinstance(e, TokenError):
            message = f"{e.args[0]} (an unclosed bracket or quote?)"
        raise ConfigError(f"invalid gin configuration{where}: {message}") from e
    finally:
        logging.getLogger().removeFilter(quiet)


def _first_malformed(gin_bindings: Sequence[str]) -> str | None:
    """The first binding that does not parse on its own (syntax only), or None."""
    for b in gin_bindings:
        try:
            list(config_parser.ConfigParser(b, _Delegate()))
        except Exception:  # noqa: BLE001 - SyntaxError, tokenize.TokenError...
            return b
    return None


def _search_paths(extra: Sequence[str]) -> list[str]:
    """cwd, the project's gin/ and its root (so both 'quickstart.gin' and 'gin/quickstart.gin' work)."""
    return [os.getcwd(), str(GIN_DIR), str(GIN_DIR.parent), *extra]


def _find(path: str, search_paths: Sequence[str]) -> str | None:
    for base in ["", *_search_paths(search_paths)]:
        p = os.path.join(base, path) if base else path
        if os.path.exists(p):
            return p
    return None


def write_config(path: str) -> str:
    """Writes ``path`` (WORKDIR/config.gin, ``Workdir.config_gin``): the parsed configuration of the latest run that
    was let into the workdir.

    Each stage's own record (what it ran with) is WORKDIR/config/<stage>.gin; see ``stages``.
    """
    header = "# The configuration of the latest run in this workdir; each stage's own is config/<stage>.gin."
    io_utils.atomic_write_text(path, record_text(header))
    return path


def record_text(header: str, *, operative: bool = False) -> str:
    """The parsed configuration (or the operative one: every value read so far, defaults included),
    below a comment ``header`` and the time."""
    body = gin.operative_config_str() if operative else gin.config_str()
    return f"{header}\n# Written {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}.\n\n{body}"


# ------------------------------------------------------------------------------ comparing configurations


@dataclasses.dataclass(frozen=True)
class _Ref:
    """A ``@configurable`` reference (or an unresolved ``%MACRO``), compared and shown as written."""

    text: str

    def __repr__(self) -> str:
        return self.text


@dataclasses.dataclass(frozen=True)
class _Macro:
    name: str


class _Delegate(config_parser.ParserDelegate):
    def configurable_reference(self, scoped_configurable_name, evaluate):
        return _Ref(f"@{scoped_configurable_name}{'()' if evaluate else ''}")

    def macro(self, macro_name):
        return _Macro(macro_name)


UNSET = _Ref("unset")


def bindings(text: str, source: str) -> dict[str, Any]:
    """``'[scope/]Configurable.param' -> value`` of every binding in a gin text, macros resolved.

    ``source`` names the text in errors. Imports and includes are ignored: a record is self-contained.
    """
    values: dict[str, Any] = {}
    macros: dict[str, Any] = {}
    try:
        for st in config_parser.ConfigParser(text, _Delegate()):
            if not isinstance(st, config_parser.BindingStatement):
                continue
            name = f"{st.scope}/{st.selector}" if st.scope else st.selector
            if st.arg_name:
                values[f"{name}.{st.arg_name}"] = st.value
            else:
                macros[name] = st.value
    except Exception as e:  # noqa: BLE001 - gin's parser raises SyntaxError, tokenize.TokenError, ValueError...
        raise ConfigError(f"{source}: not a readable gin configuration: {e}") from e

    def resolve(v: Any, depth: int = 0) -> Any:
        if isinstance(v, _Macro):
            if v.name not in macros or depth > 32:
                return _Ref(f"%{v.name}")
            return resolve(macros[v.name], depth + 1)
        if isinstance(v, (list, tuple)):
            return type(v)(resolve(x, depth) for x in v)
        if isinstance(v, dict):
            return {k: resolve(x, depth) for k, x in v.items()}
        return v

    return {k: resolve(v) for k, v in values.items()}


def _configurable(key: str) -> str:
    """'scope/warm_jax.loop.LoopConfig.log_every' -> 'LoopConfig' (scope and module dropped)."""
    selector = key.rsplit(".", 1)[0]
    return selector.rsplit("/", 1)[-1].rsplit(".", 1)[-1]


def run_only(key: str) -> bool:
    return f"{_configurable(key)}.{key.rsplit('.', 1)[-1]}" in RUN_ONLY


@dataclasses.dataclass(frozen=True)
class Difference:
    """One binding a rerun changes: ``old`` is what the stage ran with, ``new`` the rerun's (or UNSET)."""

    key: str
    old: Any
    new: Any
    old_is_default: bool = False

    def __str__(self) -> str:
        old = "unset (the default)" if self.old is UNSET else f"= {self.old!r}"
        if self.old_is_default:
            old += " (the default)"
        new = "unset (the default)" if self.new is UNSET else repr(self.new)
        return f"{self.key} {old}, now {new}"


def compare(
    recorded: str,
    current: str,
    *,
    operative: str | None = None,
    source: str = "the record",
    operative_source: str = "the operative record",
) -> list[Difference]:
    """The bindings of ``current`` that differ from ``recorded`` (both parsed configurations), sorted.

    operative: the stage's operative record, when it finished. Then only the configurables in it (those
      the stage, or a stage before it in the same process, called) are compared, and a binding that is
      now set to the value the stage used by default is no change. Without it (an unfinished stage) every
      binding is compared. Bindings in :data:`RUN_ONLY` never count.
    """
    old = bindings(recorded, source)
    new = bindings(current, "the current configuration")
    used: Mapping[str, Any] | None = None
    if operative is not None:
        used = bindings(operative, operative_source)
    used_configurables = None if used is None else {_configurable(k) for k in used}
    out = []
    for key in sorted(set(old) | set(new)):
        if run_only(key) or (used_configurables is not None and _configurable(key) not in used_configurables):
            continue
        before, after = old.get(key, UNSET), new.get(key, UNSET)
        if before is UNSET and used is not None and key in used:  # unset then: compare with the default it used
            if after is not UNSET and after != used[key]:
                out.append(Difference(key, used[key], after, old_is_default=True))
        elif before != after:
            out.append(Difference(key, before, after))
    return out
