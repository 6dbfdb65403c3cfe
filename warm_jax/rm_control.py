"""Stage `rm_control`: the negative control for linear mode connectivity — two RMs from different random inits.

Same data, learning rate, dropout and training length as the ensemble (``EnsembleConfig``), but no pretraining
and no shared probe; WARM predicts that their weight average falls off a barrier. Writes the interpolation curves
(and the step counts the members applied and skipped) to WORKDIR/rm_control/lmc.json and their per-pair margins
beside it (``evaluation.pair_interpolation``).
"""

from __future__ import annotations

import dataclasses

import jax

from warm_jax import ensemble, evaluation, io_utils, loop
from warm_jax.stages import RunContext, register_stage


@register_stage("rm_control")
def run(ctx: RunContext) -> None:
    base = ensemble.EnsembleConfig()
    cfg = dataclasses.replace(
        base,
        num_members=2,
        random_init=True,
        featurizer_steps=None,
        seeds=None,
        learning_rates=base.learning_rates[:1],
        dropout_rates=base.dropout_rates[:1],
    )
    wd = ctx.artefacts
    ens, state = ensemble.train_ensemble(ctx, cfg, stage="rm_control", ckpt_dir=wd.rm_control_ckpt)
    curves = evaluation.pair_interpolation(
        ctx, ens.graphdef, state.params, ens.param_specs, ensemble.dataset_dir(ctx, cfg)
    )
    if jax.process_index() == 0:
        updates = loop.read_updates(wd.rm_control_ckpt)
        io_utils.atomic_write_json(wd.control_lmc, {**curves, "updates": updates})
