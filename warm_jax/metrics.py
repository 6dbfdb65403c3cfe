"""Metrics of every stage: JSON lines (always), plus writers chosen by name (TensorBoard, W&B), and progress.

``MetricsWriter(workdir, stage)`` fans each ``write(step, metrics)`` out to the writers in :data:`WRITERS`:

* ``jsonl``: WORKDIR/metrics/STAGE.jsonl, one ``{"step": s, **metrics}`` per line; always on, since the
  report and the tests read it.
* ``tensorboard``: event files in WORKDIR/tensorboard/STAGE (tensorboardX, no TensorFlow).
* ``wandb``: a Weights & Biases run per stage, its files under WORKDIR/wandb/ (the ``wandb`` extra:
  ``pip install 'warm_jax[wandb]'``). ``WANDB_MODE=offline`` (or ``metrics.wandb_mode = 'offline'``) writes
  the run to disk only, for ``wandb sync`` later. Without the package, one log line says so and the other
  writers carry on.

Which ones run is a gin setting, e.g. ``metrics.writers = ['tensorboard', 'wandb']`` (default: TensorBoard);
``register_writer`` adds another. Array-valued metrics (per-member [M] losses) are lists in JSON and ``name/i``
scalars elsewhere.

Resume: ``truncate_after(step)`` drops the JSONL lines past the restored step, so a resumed run's file holds
every step once. TensorBoard keeps the old events (its readers show the newest for a step). W&B continues
the stage's earlier run (its id is kept in WORKDIR/wandb/STAGE.run.json), rewound to the restored step
(``wandb.init(resume_from="ID?_step=S")``), so the run's history, like the JSONL, holds each step once; in
offline mode that leaves a second run folder with the same id and the branch point recorded, which
``wandb sync`` uploads after the first. When W&B refuses the rewind (e.g. online, a run that never reached
the server), a log line says so and a new run starts.

Only process 0 writes; other processes get no-op writers so stage code needs no branches.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence

import gin
import jax
import numpy as np

from warm_jax import io_utils
from warm_jax.workdir import Workdir

log = logging.getLogger(__name__)

Row = Mapping[str, object]  # {"step": int, name: float | list[float]}


@gin.configurable("metrics")
@dataclasses.dataclass(frozen=True)
class MetricsConfig:
    """Which writers run besides JSONL (names in :data:`WRITERS`), and the W&B run's settings."""

    writers: tuple[str, ...] = ("tensorboard",)
    wandb_project: str = "warm_jax"
    wandb_entity: str | None = None
    # None: the WANDB_MODE environment variable, else 'online'; 'offline' keeps the run on disk only.
    wandb_mode: str | None = None


def _scalar(v):
    v = np.asarray(v)
    return float(v) if v.ndim == 0 else [float(x) for x in v.reshape(-1)]


def flat_scalars(row: Row) -> dict[str, float]:
    """A row without its step, lists spread to ``name/i`` (for writers that take scalars only)."""
    out = {}
    for k, v in row.items():
        if k == "step":
            continue
        if isinstance(v, list):
            out.update({f"{k}/{i}": x for i, x in enumerate(v)})
        else:
            out[k] = v
    return out


# ----------------------------------------------------------------------------- writers

WRITERS: dict[str, Callable] = {}


def register_writer(name: str):
    """Registers ``factory(workdir, stage, cfg: MetricsConfig)`` → a writer (``write(step, row)``,
    ``truncate_after(step)``, ``close()``), or None when it cannot run here (after saying why in one line)."""

    def deco(factory):
        WRITERS[name] = factory
        return factory

    return deco


def jsonl_path(workdir: str, stage: str) -> str:
    return Workdir(workdir).metrics_jsonl(stage)


@register_writer("jsonl")
class JsonlWriter:
    def __init__(self, workdir: str, stage: str, cfg: MetricsConfig | None = None):
        self.path = jsonl_path(workdir, stage)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)

    def write(self, step: int, row: Row) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(dict(row)) + "\n")

    def truncate_after(self, step: int) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            keep = [l for l in f if l.strip() and json.loads(l).get("step", -1) <= step]
        io_utils.atomic_write_text(self.path, "".join(keep))

    def close(self) -> None:
        pass


@register_writer("tensorboard")
class TensorBoardWriter:
    def __init__(self, workdir: str, stage: str, cfg: MetricsConfig | None = None):
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(Workdir(workdir).tensorboard(stage))

    def write(self, step: int, row: Row) -> None:
        for k, v in flat_scalars(row).items():
            self._tb.add_scalar(k, v, step)

    def truncate_after(self, step: int) -> None:
        pass  # event files are append-only; readers show the newest event of a step

    def close(self) -> None:
        self._tb.close()


_said_no_wandb = False


@register_writer("wandb")
def _wandb_writer(workdir: str, stage: str, cfg: MetricsConfig):
    global _said_no_wandb
    try:
        import wandb
    except ImportError:
        if not _said_no_wandb:
            log.warning(
                "metrics.writers asks for 'wandb' but the wandb package is not installed "
                "(pip install 'warm_jax[wandb]'); writing the other metrics only"
            )
            _said_no_wandb = True
        return None
    return WandbWriter(workdir, stage, cfg, wandb)


class WandbWriter:
    """One W&B run per stage, started at the first write (or at ``truncate_after``, which says whether the
    stage resumes), with the stage's gin configuration as the run's config."""

    def __init__(self, workdir: str, stage: str, cfg: MetricsConfig, wandb_module):
        self.workdir, self.stage, self.cfg, self._wandb = os.path.abspath(workdir), stage, cfg, wandb_module
        self.dir = os.path.join(self.workdir, "wandb")
        self.id_path = os.path.join(self.dir, f"{stage}.run.json")
        self.run = None
        self.mode = cfg.wandb_mode or os.environ.get("WANDB_MODE") or "online"

    def _init(self, resume_step: int | None) -> None:
        os.makedirs(self.dir, exist_ok=True)
        kwargs = dict(
            project=self.cfg.wandb_project,
            entity=self.cfg.wandb_entity,
            name=self.stage,
            group=os.path.basename(self.workdir),
            dir=self.workdir,  # W&B adds its own wandb/ folder
            mode=self.mode,
            config=_gin_config(),
            reinit="create_new",
            settings=self._wandb.Settings(console="off", silent=True),
        )
        previous = io_utils.read_json(self.id_path).get("id") if os.path.exists(self.id_path) else None
        if resume_step is not None and previous:
            try:
                self.run = self._wandb.init(resume_from=f"{previous}?_step={int(resume_step)}", **kwargs)
            except Exception as e:  # noqa: BLE001 - W&B raises many types (usage, comm, server)
                log.warning(
                    "[%s] W&B cannot rewind run %s to step %d (%s); starting a new run",
                    self.stage,
                    previous,
                    resume_step,
                    str(e).splitlines()[0] if str(e) else type(e).__name__,
                )
        if self.run is None:
            self.run = self._wandb.init(**kwargs)
            io_utils.atomic_write_json(self.id_path, {"id": self.run.id, "project": self.cfg.wandb_project})

    def write(self, step: int, row: Row) -> None:
        if self.run is None:
            self._init(None)
        self.run.log(flat_scalars(row), step=int(step))

    def truncate_after(self, step: int) -> None:
        if self.run is None:
            self._init(step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def _gin_config() -> dict:
    """The parsed gin configuration as ``{binding: value}`` (values W&B cannot store as JSON as their repr)."""
    from warm_jax import config

    def plain(v):
        try:
            json.dumps(v)
            return v
        except (TypeError, ValueError):
            return repr(v)

    return {k: plain(v) for k, v in config.bindings(gin.config_str(), "the gin configuration").items()}


# ----------------------------------------------------------------------------- the stages' writer


class MetricsWriter:
    """Appends ``{"step": s, **metrics}`` to WORKDIR/metrics/STAGE.jsonl and to the configured writers.

    writers: names in :data:`WRITERS` besides ``jsonl`` (default: gin's ``metrics.writers``);
    ``tensorboard=False`` leaves TensorBoard out whatever they say.
    """

    def __init__(
        self,
        workdir: str,
        stage: str,
        *,
        tensorboard: bool = True,
        writers: Sequence[str] | None = None,
        cfg: MetricsConfig | None = None,
    ):
        self.enabled = jax.process_index() == 0
        self.path = jsonl_path(workdir, stage)
        self._writers: list = []
        self.writer_names: list[str] = []
        if not self.enabled:
            return
        cfg = cfg or MetricsConfig()
        if isinstance(cfg.writers, str) and writers is None:
            raise ValueError(f"metrics.writers = {cfg.writers!r}: expected a list of names, e.g. ['tensorboard']")
        names = list(cfg.writers if writers is None else writers)
        unknown = [n for n in names if n not in WRITERS]
        if unknown:
            raise ValueError(f"metrics.writers: unknown writer(s) {unknown}; known: {sorted(WRITERS)}")
        names = ["jsonl"] + [n for n in dict.fromkeys(names) if n != "jsonl" and (tensorboard or n != "tensorboard")]
        for n in names:
            w = WRITERS[n](workdir, stage, cfg)
            if w is not None:
                self._writers.append(w)
        self.writer_names = [type(w).__name__ for w in self._writers]  # those that run here

    def truncate_after(self, step: int) -> None:
        """Drops lines past ``step`` (a resumed run rewrites them, so the file has no repeats)."""
        for w in self._writers:
            w.truncate_after(step)

    def write(self, step: int, metrics: Mapping[str, object]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        for w in self._writers:
            w.write(int(step), row)

    def close(self) -> None:
        for w in self._writers:
            w.close()
        self._writers = []


def read_metrics(workdir: str, stage: str) -> list[dict]:
    path = jsonl_path(workdir, stage)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


class Progress:
    """One status line on process 0: stage, step/total, chosen metrics, steps/s, ETA."""

    def __init__(self, stage: str, total: int, start: int = 0, *, stream=None):
        self.enabled = jax.process_index() == 0
        self.stage, self.total, self.start = stage, total, start
        self.t0 = time.perf_counter()
        self.stream = stream or sys.stderr
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, step: int, metrics: Mapping[str, object] | None = None, *, final: bool = False) -> None:
        if not self.enabled:
            return
        done = step - self.start
        dt = time.perf_counter() - self.t0
        rate = done / dt if dt > 0 and done > 0 else float("nan")
        eta = (self.total - step) / rate if rate and rate > 0 and not math.isnan(rate) else float("nan")
        parts = [f"[{self.stage}] step {step}/{self.total}"]
        for k, v in (metrics or {}).items():
            v = np.asarray(v)
            parts.append(f"{k}={float(v.mean()):.4g}" + (f"(±{float(v.std()):.2g})" if v.size > 1 else ""))
        parts.append(f"{rate:.2f} steps/s" if not math.isnan(rate) else "-- steps/s")
        if not math.isnan(eta):
            parts.append(f"ETA {int(eta) // 60}m{int(eta) % 60:02d}s")
        line = "  ".join(parts)
        end = "\n" if (final or not self._tty) else ""
        self.stream.write(("\r" if self._tty else "") + line + end)
        self.stream.flush()
