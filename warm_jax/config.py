"""gin plumbing, kept in one place: search paths, parsing with clear errors, operative config."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import gin

from warm_jax import io_utils

# The project's gin/ folder (a source checkout or an editable install).
GIN_DIR = Path(__file__).resolve().parent.parent / "gin"


class _QuietSearchPathLogs(logging.Filter):
    """gin logs every search-path miss (at ERROR) while it looks for an included file."""

    def filter(self, record):
        return not str(record.msg).startswith(("system_path_file_exists", "Path not found"))


class ConfigError(ValueError):
    """A gin file or binding is wrong; the message names it."""


def register_all() -> None:
    """Imports every module with configurables, so gin knows all names before parsing."""
    from warm_jax import stages

    stages.import_stage_modules()


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
    except (ValueError, KeyError, NameError, TypeError, AttributeError, ImportError) as e:
        # gin's message already names the binding and file:line; keep it, say where it came from.
        raise ConfigError(f"invalid gin configuration: {e}") from e
    finally:
        logging.getLogger().removeFilter(quiet)
    gin.finalize()


def _search_paths(extra: Sequence[str]) -> list[str]:
    """cwd, the project's gin/ and its root (so both 'quickstart.gin' and 'gin/quickstart.gin' work)."""
    return [os.getcwd(), str(GIN_DIR), str(GIN_DIR.parent), *extra]


def _find(path: str, search_paths: Sequence[str]) -> str | None:
    for base in ["", *_search_paths(search_paths)]:
        p = os.path.join(base, path) if base else path
        if os.path.exists(p):
            return p
    return None


def write_config(workdir: str, *, operative: bool) -> str:
    """Writes WORKDIR/config.gin: the parsed config at start, the operative one at the end."""
    text = gin.operative_config_str() if operative else gin.config_str()
    path = os.path.join(workdir, "config.gin")
    io_utils.atomic_write_text(path, text)
    return path
