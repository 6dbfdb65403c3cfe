"""The stage registry and the pipeline runner.

A stage is a function ``(ctx: RunContext) -> None`` registered by name; the gin file lists the
stages to run (``run_pipeline.stages``). A finished stage leaves WORKDIR/<stage>/DONE.json and
is skipped on a rerun; an unfinished one resumes from its own checkpoints.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import time
from collections.abc import Callable

import gin
import jax
from jax.sharding import Mesh

from warm_jax import io_utils, runtime

log = logging.getLogger(__name__)

STAGES: dict[str, Callable] = {}

# Modules that register stages; imported lazily so `import warm_jax` stays light.
_STAGE_MODULES = (
    "warm_jax.pretrain",
    "warm_jax.data.builtin_pairs",
    "warm_jax.ensemble",
    "warm_jax.evaluation",
    "warm_jax.policy.bon",
    "warm_jax.policy.reinforce",
    "warm_jax.report",
)


def register_stage(name: str):
    def deco(fn):
        STAGES[name] = fn
        return fn

    return deco


def import_stage_modules() -> None:
    for m in _STAGE_MODULES:
        try:
            importlib.import_module(m)
        except ModuleNotFoundError as e:
            if e.name != m:  # a real missing dependency inside the module
                raise


@dataclasses.dataclass
class RunContext:
    workdir: str
    mesh: Mesh
    seed: int

    def path(self, *parts: str) -> str:
        return os.path.join(self.workdir, *parts)

    def done(self, stage: str) -> bool:
        return os.path.exists(self.path(stage, "DONE.json"))


@gin.configurable
def run_pipeline(workdir: str, stages=gin.REQUIRED, seed: int = 0) -> RunContext:
    """Runs the listed stages in order in ``workdir``."""
    import_stage_modules()
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"run_pipeline.stages lists unknown stage(s) {unknown}; known: {sorted(STAGES)}")
    ctx = RunContext(workdir=workdir, mesh=runtime.make_mesh(), seed=seed)
    log.info("mesh %s on %d devices, %d process(es)", dict(ctx.mesh.shape), jax.device_count(), jax.process_count())
    for name in stages:
        if ctx.done(name):
            log.info("[%s] already finished, skipping", name)
            continue
        t0 = time.time()
        STAGES[name](ctx)
        runtime.sync(f"stage-{name}")
        if runtime.is_main_process():
            io_utils.atomic_write_json(ctx.path(name, "DONE.json"), {"stage": name, "seconds": time.time() - t0})
        runtime.sync(f"stage-{name}-done")
    return ctx
