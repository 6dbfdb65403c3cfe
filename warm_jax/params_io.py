"""Standalone parameter checkpoints: one model's params + model.json, the unit users exchange.

Members exported by `rm_ensemble`, the merged WARM RM, imported pretrained models and policies
are all in this format: ``DIR/model.json`` (model config, tokenizer location, metadata) and an
Orbax checkpoint with the integrity manifest under ``DIR/ckpt``. ``python -m warm_jax.average``
and ``python -m warm_jax.export`` take it.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp

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


def model_config_from_json(meta, source: str) -> tr.ModelConfig:
    """The ModelConfig of a model.json's contents ``meta``; ValueError naming ``source`` and the field
    that is missing, unknown or of the wrong type (not a traceback from deep inside the model)."""
    if not isinstance(meta, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(meta).__name__}")
    if not isinstance(meta.get("model"), dict):
        got = "nothing" if "model" not in meta else type(meta["model"]).__name__
        raise ValueError(f"{source}: field 'model' must be an object of model config fields, got {got}")
    fields = {f.name: f for f in dataclasses.fields(tr.ModelConfig)}
    model = {k: v for k, v in meta["model"].items() if k not in tr.RETIRED_FIELDS}
    unknown = sorted(set(model) - set(fields))
    if unknown:
        raise ValueError(f"{source}: unknown model config field(s) {unknown} (written by another version?)")
    for name, value in model.items():
        default = fields[name].default
        if isinstance(default, bool):
            ok, kind = isinstance(value, bool), "boolean"
        elif isinstance(default, int) or default is None:  # sizes (head_dim: None = d_model // n_heads)
            ok = (isinstance(value, int) and not isinstance(value, bool) and value >= 1) or (
                default is None and value is None
            )
            kind = "positive integer" + (" or null" if default is None else "")
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            kind = "finite number"
        else:
            ok, kind = isinstance(value, str), "string"
        if ok and name in ("dtype", "param_dtype"):
            try:
                ok = jnp.issubdtype(jnp.dtype(value), jnp.floating)
            except TypeError:
                ok = False
            kind = "floating-point dtype name"
        if not ok:
            raise ValueError(f"{source}: field 'model.{name}' = {value!r} is not a valid {kind}")
    try:
        return tr.config_from_dict(model)
    except ValueError as e:
        raise ValueError(f"{source}: field 'model': {str(e).splitlines()[0]}") from None


def read_model_json(directory: str) -> tuple[dict, tr.ModelConfig]:
    """(contents, ModelConfig) of ``directory``/model.json; errors name the file and the field."""
    path = os.path.join(directory, "model.json")
    meta = io_utils.read_json(path)
    return meta, model_config_from_json(meta, path)


def load_params_checkpoint(directory: str, mesh, *, rules=None):
    """Restores a ``save_params`` checkpoint into the rules' sharding on ``mesh``.

    Returns (model_cfg, graphdef, params, meta).
    """
    io_utils.recover(directory)
    meta, model_cfg = read_model_json(directory)
    graphdef, abstract, axes = tr.abstract_model(model_cfg)
    specs = sharding.tree_specs(axes, abstract, mesh, rules)
    target = {"params": sharding.abstract_with_sharding(abstract, sharding.named(mesh, specs))}
    ck = checkpoints.Checkpointer(os.path.join(directory, "ckpt"), read_only=True, async_save=False)
    try:
        state, _, _ = ck.restore(target)
    finally:
        ck.close()
    return model_cfg, graphdef, state["params"], meta
