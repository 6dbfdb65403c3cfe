"""The training loop every training stage shares: resume, step, log, checkpoint, preempt.

A stage supplies a jitted pure step ``(state, batch) -> (state, metrics)`` whose metrics hold
a scalar ``finite`` flag (the step itself already skipped a non-finite update in-graph, so with
``nan_policy='skip'`` the state after a bad step equals the state before it). The loop owns
everything stateful around it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import gin
import jax
import numpy as np

from warm_jax import checkpoints
from warm_jax.metrics import MetricsWriter, Progress

log = logging.getLogger(__name__)


class NonFiniteUpdateError(RuntimeError):
    """Raised under nan_policy='abort'; the last good checkpoint is left intact."""


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
    nan_policy: str = "skip"  # 'skip' the update (state unchanged) or 'abort' (non-zero exit)

    def __post_init__(self):
        if self.nan_policy not in ("skip", "abort"):
            raise ValueError(f"LoopConfig.nan_policy must be 'skip' or 'abort', got {self.nan_policy!r}")


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
):
    """Runs ``step_fn`` until ``num_steps``, resuming from ``ckpt_dir`` when it has a checkpoint.

    ``state`` is the freshly initialised state (ignored when resuming); ``abstract_state``
    carries the target shardings. ``iterator`` has get_state/set_state and is saved with the
    model so a resumed run replays no batch and skips none. Returns the final state.
    """
    cfg = cfg or LoopConfig()
    checkpoints.install_sigterm_handler()
    ckpt = checkpoints.Checkpointer(
        ckpt_dir,
        save_interval_steps=cfg.save_interval_steps,
        max_to_keep=cfg.max_to_keep,
        keep_steps=keep_steps,
        async_save=cfg.async_save,
    )
    writer = MetricsWriter(workdir, stage)
    try:
        if ckpt.latest_step() is not None:
            state, data_state, step = ckpt.restore(abstract_state)
            if data_state is not None:
                iterator.set_state(data_state)
            writer.truncate_after(step)
            log.info("[%s] resumed from step %d", stage, step)
        step = scalar_step(state)
        progress = Progress(stage, num_steps, start=step)
        while step < num_steps:
            batch = to_device(next(iterator))
            state, metrics = step_fn(state, batch)
            step += 1
            if not bool(metrics["finite"]):
                if cfg.nan_policy == "abort":
                    raise NonFiniteUpdateError(
                        f"[{stage}] non-finite loss or gradient at step {step}; aborting "
                        f"(LoopConfig.nan_policy='abort'); last good checkpoint: {ckpt.latest_step()}"
                    )
                log.warning("[%s] non-finite update at step %d skipped", stage, step)
            if step % cfg.log_every == 0 or step == num_steps:
                host = jax.device_get(metrics)
                if on_log is not None:
                    host = {**host, **on_log(step, host)}
                writer.write(step, host)
                progress.update(step, {k: host[k] for k in show if k in host}, final=step == num_steps)
            preempted = ckpt.reached_preemption(step)
            if ckpt.should_save(step) or preempted or step == num_steps or step in keep_steps:
                ckpt.save(step, state, data=iterator.get_state(), force=True)
            if preempted:
                ckpt.wait()
                log.warning("[%s] preempted: saved step %d, exiting", stage, step)
                raise Preempted(step)
        ckpt.wait()
        return state
    finally:
        ckpt.close()
        writer.close()
