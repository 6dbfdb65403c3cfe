"""The stage registry and the pipeline runner.

A stage is a function ``(ctx: RunContext) -> None`` registered by name; the gin file lists the
stages to run (``run_pipeline.stages``). A finished stage leaves WORKDIR/<stage>/DONE.json and
is skipped on a rerun; an unfinished one resumes from its own checkpoints.

Each stage keeps the record of the configuration it ran with: WORKDIR/config/<stage>.gin (the
parsed configuration, written when the stage starts and never rewritten) and
WORKDIR/config/<stage>.operative.gin (every value read, defaults included, written when it
finishes). They live apart from the stage's own folder, which a stage may replace as a whole (the
`data` stage renames a finished dataset into place). Before anything is written, a rerun compares
its configuration with the record of every listed stage, finished or not (``config.compare``), and
stops naming the bindings that differ. ``rerun_from=STAGE`` (``--rerun_from``) reruns STAGE and every
stage listed after it: their old outputs and records (``stage_outputs``) move to
WORKDIR/superseded/<UTC time>/ first, as do those of any unlisted stage that started after STAGE
(it may have read STAGE's old outputs).
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import time
from collections.abc import Callable, Sequence

import gin
import jax
from jax.sharding import Mesh

from warm_jax import config, io_utils, runtime
from warm_jax.cli_errors import UserError
from warm_jax.workdir import Workdir, stage_outputs

log = logging.getLogger(__name__)

STAGES: dict[str, Callable] = {}


class WorkdirError(UserError):
    """The work directory cannot be used (not a directory, not writable); the message names it."""


def register_stage(name: str):
    """Registers a stage; what it writes is ``workdir.stage_outputs(name)``."""

    def deco(fn):
        STAGES[name] = fn
        return fn

    return deco


def record_path(workdir: str, stage: str, *, operative: bool = False) -> str:
    """WORKDIR/config/<stage>.gin (configuration at the start) or <stage>.operative.gin (values read)."""
    return Workdir(workdir).record(stage, operative=operative)


@dataclasses.dataclass
class RunContext:
    workdir: str
    mesh: Mesh
    seed: int

    @property
    def artefacts(self) -> Workdir:
        """The layout of ``workdir`` and the loaders of what earlier stages left there."""
        return Workdir(self.workdir)

    def path(self, *parts: str) -> str:
        return os.path.join(self.workdir, *parts)

    def done(self, stage: str) -> bool:
        return os.path.exists(self.artefacts.done_file(stage))


@gin.configurable("run_pipeline")
def pipeline_settings(stages=gin.REQUIRED, seed: int = 0) -> tuple[list[str], int]:
    """The gin face of :func:`run_pipeline`: ``run_pipeline.stages`` (names, in order) and ``.seed``."""
    return list(stages), seed


def run_pipeline(workdir: str, *, rerun_from: str | None = None) -> RunContext:
    """Runs the listed stages in order in ``workdir``.

    Raises config.ConfigMismatchError, before anything is written, when the configuration differs
    from the record of a listed stage (unless ``rerun_from`` names that stage or an earlier one).
    """
    try:
        gin.query_parameter("run_pipeline.stages")
    except ValueError:
        raise config.ConfigError(
            "run_pipeline.stages is not set: give a gin file that lists the stages (e.g. "
            "--gin_file=gin/quickstart.gin) or --gin_bindings=\"run_pipeline.stages = ['pretrain', ...]\""
        ) from None
    names, seed = pipeline_settings()
    config.register_all()
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        raise config.ConfigError(f"run_pipeline.stages lists unknown stage(s) {unknown}; known: {sorted(STAGES)}")
    check_workdir(workdir)
    mesh = runtime.make_mesh()
    superseded = check_records(workdir, names, rerun_from)
    runtime.sync("config-checked")  # no process writes before every process has compared
    if runtime.is_main_process():
        try:
            os.makedirs(workdir, exist_ok=True)
            if superseded:
                move_aside(workdir, superseded)
            config.write_config(Workdir(workdir).config_gin)
        except OSError as e:
            raise WorkdirError(f"workdir {workdir}: cannot write there: {e.filename or workdir}: {e.strerror}") from e
    runtime.sync("workdir-ready")
    ctx = RunContext(workdir=workdir, mesh=mesh, seed=seed)
    log.info("mesh %s on %d devices, %d process(es)", dict(ctx.mesh.shape), jax.device_count(), jax.process_count())
    for name in names:
        if ctx.done(name):
            log.info("[%s] already finished, skipping", name)
            continue
        if runtime.is_main_process() and not os.path.exists(record_path(workdir, name)):
            io_utils.atomic_write_text(
                record_path(workdir, name), config.record_text(f"# The configuration stage '{name}' started with.")
            )
        t0 = time.time()
        try:
            STAGES[name](ctx)
        except FileNotFoundError as e:  # an input another stage writes, most often
            missing = f"{e.filename}: {e.strerror}" if e.filename else str(e)
            raise UserError(
                f"stage '{name}' is missing an input: {missing} (if another stage writes it, list that stage "
                f"before '{name}' in run_pipeline.stages)"
            ) from e
        runtime.sync(f"stage-{name}")
        if runtime.is_main_process():
            io_utils.atomic_write_text(
                record_path(workdir, name, operative=True),
                config.record_text(
                    f"# The values stage '{name}' (and any stage before it in the same process) read.", operative=True
                ),
            )
            io_utils.atomic_write_json(ctx.artefacts.done_file(name), {"stage": name, "seconds": time.time() - t0})
        runtime.sync(f"stage-{name}-done")
    return ctx


def check_workdir(workdir: str) -> None:
    """Raises WorkdirError when ``workdir`` exists but is not a writable directory (reads only)."""
    if not workdir:
        raise WorkdirError("workdir is empty; name a directory")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f"workdir {workdir}: exists and is not a directory")
    if os.path.isdir(workdir) and not os.access(workdir, os.W_OK | os.X_OK):
        raise WorkdirError(f"workdir {workdir}: not writable")
    parent = os.path.dirname(os.path.abspath(workdir))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise WorkdirError(f"workdir {workdir}: {parent} is not a directory")
    if not os.path.exists(workdir) and not os.access(parent, os.W_OK | os.X_OK):
        raise WorkdirError(f"workdir {workdir}: cannot be created ({parent} is not writable)")


def check_records(workdir: str, names: Sequence[str], rerun_from: str | None) -> list[str]:
    """Compares the current configuration with each listed stage's record; reads only.

    Returns the stages whose outputs ``rerun_from`` supersedes (in the order to move them). Raises
    ConfigMismatchError naming, for the first stage that differs, the bindings (recorded vs now).
    """
    names = list(names)
    if rerun_from is not None and rerun_from not in names:
        raise config.ConfigError(f"--rerun_from={rerun_from}: not a stage in run_pipeline.stages {names}")
    kept = names if rerun_from is None else names[: names.index(rerun_from)]
    wd = Workdir(workdir)
    current = gin.config_str()
    mismatched: list[tuple[str, bool, str, list[config.Difference]]] = []
    for name in kept:
        record = record_path(workdir, name)
        finished = os.path.exists(wd.done_file(name))
        if not os.path.exists(record):
            if os.path.isdir(wd.stage_dir(name)):
                log.warning("[%s] has no configuration record (an older warm_jax wrote it): not compared", name)
            continue
        operative_path = record_path(workdir, name, operative=True)
        operative = _read(operative_path) if finished and os.path.exists(operative_path) else None
        diffs = config.compare(
            _read(record), current, operative=operative, source=record, operative_source=operative_path
        )
        if diffs:
            mismatched.append((name, finished, record, diffs))
    if mismatched:
        raise config.ConfigMismatchError(_mismatch_message(workdir, mismatched))
    if rerun_from is None:
        return []
    later = names[names.index(rerun_from) :]
    return later + _started_after(workdir, rerun_from, exclude=names)


def _mismatch_message(workdir: str, mismatched: list[tuple[str, bool, str, list[config.Difference]]]) -> str:
    name, finished, record, diffs = mismatched[0]
    shown = "; ".join(str(d) for d in diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
    others = [f"'{m[0]}'" for m in mismatched[1:]]
    also = f" ({'stages' if len(others) > 1 else 'stage'} {', '.join(others)} too)" if others else ""
    state = "finished" if finished else "unfinished"
    return (
        f"workdir {workdir}: stage '{name}' ({state}) ran with a different configuration (recorded in {record}): "
        f"{shown}{also}. Nothing was changed. Use a new --workdir, or pass --rerun_from={name} to rerun '{name}' "
        f"and every stage after it (their old outputs move to {Workdir(workdir).superseded}/)."
    )


def _started_after(workdir: str, stage: str, exclude: Sequence[str]) -> list[str]:
    """Unlisted stages of ``workdir`` whose record is newer than ``stage``'s: they may have read its outputs."""
    ref = record_path(workdir, stage)
    if not os.path.exists(ref):
        return []
    t0 = os.path.getmtime(ref)
    found = []
    for record in sorted(glob.glob(Workdir(workdir).records_glob)):
        name = os.path.basename(record)[: -len(".gin")]
        if not name.endswith(".operative") and name not in exclude and os.path.getmtime(record) >= t0:
            found.append(name)
    return found


def move_aside(workdir: str, stages: Sequence[str]) -> str:
    """Moves every output of ``stages`` to WORKDIR/superseded/<UTC time>/ (same relative paths)."""
    dest = os.path.join(Workdir(workdir).superseded, time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    base, n = dest, 1
    while os.path.exists(dest):
        dest, n = f"{base}-{n}", n + 1
    moved = []
    for name in stages:
        for pattern in stage_outputs(name):
            for src in sorted(glob.glob(os.path.join(glob.escape(workdir), pattern))):
                rel = os.path.relpath(src, workdir)
                os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
                os.replace(src, os.path.join(dest, rel))
                moved.append(rel)
                _remove_empty_parents(os.path.dirname(src), workdir)
    if moved:
        log.warning("--rerun_from: moved the old outputs of %s (%s) to %s", list(stages), ", ".join(moved), dest)
    return dest


def _remove_empty_parents(path: str, workdir: str) -> None:
    """Removes ``path`` and its parents up to (not including) ``workdir`` while they are empty."""
    top = os.path.abspath(workdir)
    path = os.path.abspath(path)
    while path.startswith(top + os.sep):
        try:
            os.rmdir(path)
        except OSError:  # not empty
            return
        path = os.path.dirname(path)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()
