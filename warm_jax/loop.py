"""The training loop every training stage shares: resume, step, log, checkpoint, preempt.

A stage supplies a jitted pure step ``(state, batch) -> (state, metrics)`` whose metrics hold
a scalar ``finite`` flag (the step itself already skipped a non-finite update in-graph, so the
state after a bad step equals the state before it; a stacked ensemble adds ``member_finite`` [M]).
The loop owns everything stateful around it, and fails loudly: it logs and counts every skipped
update, stops the stage after ``max_consecutive_skips`` in a row naming what went non-finite, and
refuses to finish a run that applied no update.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from typing import Any

import gin
import jax
import numpy as np

from warm_jax import checkpoints, cli_errors, faults, io_utils
from warm_jax.metrics import MetricsWriter, Progress

log = logging.getLogger(__name__)


class NonFiniteUpdateError(cli_errors.UserError):
    """A stage stopped on non-finite updates; the last good checkpoint is left intact."""


class Preempted(SystemExit):
    """Raised after a preemption save; exits the process with status 0."""

    def __init__(self, step: int):
        super().__init__(0)
        self.step = step


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LoopConfig:
    log_every: int = 25
    save_interval_steps: int = 200
    max_to_keep: int = 2
    async_save: bool = True
    # A non-finite update is skipped in the graph (state unchanged); 'skip' goes on and stops the stage after
    # ``max_consecutive_skips`` in a row, 'abort' stops at the first.
    nan_policy: str = "skip"
    max_consecutive_skips: int = 10

    def __post_init__(self):
        if self.nan_policy not in ("skip", "abort"):
            raise ValueError(f"LoopConfig.nan_policy must be 'skip' or 'abort', got {self.nan_policy!r}")
        if self.max_consecutive_skips < 1:
            raise ValueError(f"LoopConfig.max_consecutive_skips must be ≥ 1, got {self.max_consecutive_skips}")


# What a non-finite step's error shows, in this order, where the step reports it.
_DIAGNOSTICS = ("loss", "grad_norm", "proxy", "return", "kl", "value_loss", "pg_loss")
# The record of skipped steps keeps the first few; the counts are exact.
_MAX_LISTED_SKIPS = 100


@dataclasses.dataclass
class UpdateCounts:
    """Applied and skipped updates of one training run, saved with every checkpoint (exact on resume).

    For a stacked ensemble a step counts as skipped when any member skipped its update (the others
    applied theirs); ``member_skipped`` [M] says how often each member skipped.
    """

    applied: int = 0
    skipped: int = 0
    consecutive_skips: int = 0
    skipped_steps: list[int] = dataclasses.field(default_factory=list)
    member_skipped: list[int] | None = None

    def record(self, step: int, finite: bool, member_finite=None) -> None:
        if member_finite is not None:
            ok = np.asarray(member_finite, bool).reshape(-1)
            self.member_skipped = [s + int(not f) for s, f in zip(self.member_skipped or [0] * ok.size, ok)]
        if finite:
            self.applied += 1
            self.consecutive_skips = 0
            return
        self.skipped += 1
        self.consecutive_skips += 1
        if len(self.skipped_steps) < _MAX_LISTED_SKIPS:
            self.skipped_steps.append(step)

    def never_updated(self) -> list[int] | None:
        """The members that skipped every step ([0] for a single model that did), or None."""
        steps = self.applied + self.skipped
        if not steps:
            return None
        if self.member_skipped is None:
            return [0] if self.applied == 0 else None
        return [i for i, s in enumerate(self.member_skipped) if s == steps] or None

    def as_json(self) -> dict:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "consecutive_skips"}
        return out if self.member_skipped is not None else {k: v for k, v in out.items() if k != "member_skipped"}


def describe_nonfinite(metrics: dict) -> str:
    """What went non-finite at a step: the diagnostic metrics, and which members for a stacked ensemble."""
    host = jax.device_get({k: metrics[k] for k in (*_DIAGNOSTICS, "member_finite") if k in metrics})
    parts = []
    for k in _DIAGNOSTICS:
        if k in host:
            v = np.asarray(host[k], np.float64)
            parts.append(f"{k}={float(v):.4g}" if v.ndim == 0 else f"{k}=[{', '.join(f'{x:.4g}' for x in v)}]")
    if "member_finite" in host:
        bad = np.flatnonzero(~np.asarray(host["member_finite"])).tolist()
        parts.append(f"non-finite member(s) {bad}")
    return ", ".join(parts)


def scalar_step(state) -> int:
    """The step counter (a stacked state has one per member; they move together)."""
    # Read from a local shard: a stacked [M] counter can span processes.
    return int(np.asarray(state.step.addressable_shards[0].data).reshape(-1)[0])


def train(
    *,
    stage: str,
    workdir: str,
    state,
    abstract_state,
    step_fn: Callable[[Any, Any], tuple[Any, dict]],
    iterator,
    to_device: Callable[[dict], Any],
    num_steps: int,
    ckpt_dir: str,
    keep_steps=(),
    cfg: LoopConfig | None = None,
    show: tuple[str, ...] = ("loss",),
    on_log: Callable[[int, dict], dict] | None = None,
    fault: faults.FaultInjection | None = None,
):
    """Runs ``step_fn`` until ``num_steps``, resuming from ``ckpt_dir`` when it has a checkpoint.

    ``state`` is the freshly initialised state (ignored when resuming); ``abstract_state``
    carries the target shardings. ``iterator`` has get_state/set_state and is saved with the
    model so a resumed run replays no batch and skips none. ``fault`` (default: gin's; tests) may kill the
    process when a step starts. Returns the final state.
    """
    cfg = cfg or LoopConfig()
    fault = fault or faults.FaultInjection()
    checkpoints.install_sigterm_handler()
    ckpt = checkpoints.Checkpointer(
        ckpt_dir,
        save_interval_steps=cfg.save_interval_steps,
        max_to_keep=cfg.max_to_keep,
        keep_steps=keep_steps,
        async_save=cfg.async_save,
    )
    writer = MetricsWriter(workdir, stage)
    counts = UpdateCounts()
    try:
        if ckpt.latest_step() is not None:
            state, saved, step = ckpt.restore(abstract_state)
            if saved is not None:
                iterator.set_state(saved["iterator"])
                counts = UpdateCounts(**saved["updates"])
            writer.truncate_after(step)
            log.info("[%s] resumed from step %d", stage, step)
        else:  # an attempt that died before its first checkpoint may have logged steps this run repeats
            writer.truncate_after(0)
        step = scalar_step(state)
        progress = Progress(stage, num_steps, start=step)
        while step < num_steps:
            fault.kill_if_due(step)
            batch = to_device(next(iterator))
            state, metrics = step_fn(state, batch)
            step += 1
            finite = bool(metrics["finite"])
            counts.record(step, finite, None if finite else jax.device_get(metrics.get("member_finite")))
            if not finite:
                what = describe_nonfinite(metrics)
                log.warning("[%s] non-finite update at step %d skipped (%s)", stage, step, what)
                stop = cfg.nan_policy == "abort" or counts.consecutive_skips >= cfg.max_consecutive_skips
                if stop:
                    raise NonFiniteUpdateError(
                        f"[{stage}] stopped: {counts.consecutive_skips} non-finite update(s) in a row up to step "
                        f"{step} ({what}); {counts.skipped} skipped and {counts.applied} applied in all "
                        f"(LoopConfig.nan_policy = {cfg.nan_policy!r}, max_consecutive_skips = "
                        f"{cfg.max_consecutive_skips}); the last good checkpoint, step {ckpt.latest_step()}, is kept"
                    )
            if step % cfg.log_every == 0 or step == num_steps:
                host = jax.device_get({k: v for k, v in metrics.items() if k != "member_finite"})
                host["skipped_updates"] = counts.skipped
                if on_log is not None:
                    host = {**host, **on_log(step, host)}
                writer.write(step, host)
                progress.update(step, {k: host[k] for k in show if k in host}, final=step == num_steps)
            preempted = ckpt.reached_preemption(step)
            if ckpt.should_save(step) or preempted or step == num_steps or step in keep_steps:
                saved = {"iterator": iterator.get_state(), "updates": dataclasses.asdict(counts)}
                ckpt.save(step, state, data=saved, force=True)
            if preempted:
                ckpt.wait()
                log.warning("[%s] preempted: saved step %d, exiting", stage, step)
                raise Preempted(step)
        ckpt.wait()
        idle = counts.never_updated()
        if idle is not None:
            who = "" if counts.member_skipped is None else f" of member(s) {idle}"
            raise NonFiniteUpdateError(
                f"[{stage}] no update{who} in {num_steps} step(s) was applied (all non-finite): nothing was trained"
            )
        if jax.process_index() == 0:
            io_utils.atomic_write_json(updates_path(ckpt_dir), counts.as_json())
        return state
    finally:
        ckpt.close()
        writer.close()


def updates_path(ckpt_dir: str) -> str:
    """Where a finished run records its applied and skipped updates: ``updates.json`` beside its checkpoints."""
    return os.path.join(os.path.dirname(os.path.normpath(ckpt_dir)), "updates.json")


def read_updates(ckpt_dir: str) -> dict:
    """The applied/skipped record of a finished run (see ``updates_path``)."""
    return io_utils.read_json(updates_path(ckpt_dir))
