"""Standalone parameter checkpoints: one model's params + model.json, the unit users exchange.

Members exported by `rm_ensemble`, the merged WARM RM, imported pretrained models and policies
are all in this format: ``DIR/model.json`` (model config, tokenizer location, metadata) and an
Orbax checkpoint with the integrity manifest under ``DIR/ckpt``. ``python -m warm_jax.average``
and ``python -m warm_jax.export`` take it.
"""

from __future__ import annotations

import dataclasses
import os

import jax

from warm_jax import checkpoints, io_utils, sharding
from warm_jax.models import transformer as tr


def save_params(
    directory: str,
    params,
    *,
    model_cfg: tr.ModelConfig,
    meta: dict,
    tokenizer_dir: str | None,
    described: dict | None = None,
):
    """A standalone params checkpoint: Orbax + hash manifest, and model.json beside it.

    Written to a temporary sibling and renamed, so ``directory`` only ever holds a finished one.
    Chunks are stored uncompressed: weights barely compress, and zstd halves the speed of the
    save and of every later restore (``average``, ``export``, scoring). ``described``:
    ``checkpoints.describe_leaves(params)`` when the caller has it already (not hashed again).
    """
    if described is not None:
        described = {f"params/{path}": v for path, v in described.items()}
    with io_utils.atomic_directory(directory, overwrite=True) as tmp:
        ck = checkpoints.Checkpointer(os.path.join(tmp, "ckpt"), async_save=False, compress=False)
        ck.save(0, {"params": params}, meta=meta, force=True, described=described)
        ck.close()
        if jax.process_index() == 0:
            io_utils.atomic_write_json(
                os.path.join(tmp, "model.json"),
                {"model": dataclasses.asdict(model_cfg), "tokenizer": tokenizer_dir, **meta},
            )


def load_params_checkpoint(directory: str, mesh, *, rules=None):
    """Restores a ``save_params`` checkpoint into the rules' sharding on ``mesh``.

    Returns (model_cfg, graphdef, params, meta).
    """
    meta = io_utils.read_json(os.path.join(directory, "model.json"))
    model_cfg = tr.ModelConfig(**meta["model"])
    graphdef, abstract, axes = tr.abstract_model(model_cfg)
    specs = sharding.tree_specs(axes, abstract, mesh, rules)
    target = {"params": sharding.abstract_with_sharding(abstract, sharding.named(mesh, specs))}
    ck = checkpoints.Checkpointer(os.path.join(directory, "ckpt"), async_save=False)
    try:
        state, _, _ = ck.restore(target)
    finally:
        ck.close()
    return model_cfg, graphdef, state["params"], meta
