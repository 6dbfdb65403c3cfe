"""Weight averaging of reward models (WARM), member selection, and linear mode connectivity.

Two ways to average, both on device and both accumulating in float32:

* ``mean_stacked``: the stacked ensemble ([M, ...] on every leaf, split over the mesh's
  'ensemble' axis) reduced over its leading axis in one jitted program; the result lands in
  the single-member sharding.
* ``average_checkpoints``: K member checkpoints, streamed. Member k is restored straight into
  the sharded target, folded into a float32 running mean whose buffer is donated to the
  update, and dropped before member k+1 is read, so peak memory is one accumulator plus one
  member whatever K is.

Both compute the running mean ``m_k = m_{k−1} + (w_k / W_k)(θ_k − m_{k−1})`` (W_k = w_1 + … +
w_k), so averaging K identical members returns them bit for bit (every difference is an exact
zero); summing the members and dividing would not be exact (3·x/3 ≠ x in floating point).

Selection (WARM §4: "WARM M" = the M best of 10 by accuracy) and greedy soups (Wortsman et
al., 2022: add members best-first, keep one only if the average does not get worse) work on
member indices; interpolation θ(λ) = (1−λ)·θ_a + λ·θ_b measures linear mode connectivity.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from warm_jax import checkpoints, io_utils, params_io, sharding
from warm_jax.models import transformer as tr

log = logging.getLogger(__name__)

PyTree = Any
DEFAULT_LAMBDAS = np.linspace(0.0, 1.0, 11)
# Config fields that may differ between members that are averaged (they do not change the maths
# of a forward pass without dropout).
_CFG_FIELDS_MAY_DIFFER = ("dropout_rate",)


class MergeError(ValueError):
    """Members cannot be averaged (different trees, shapes, dtypes or model configs, bad weights)."""


# ----------------------------------------------------------------------------- checks


def _describe_leaf(x) -> str:
    return f"{np.dtype(x.dtype).name}{list(x.shape)}"


def check_compatible(trees: Mapping[str, PyTree]) -> None:
    """Raises MergeError unless every tree has the same leaf paths, shapes and dtypes.

    trees: member name → tree of arrays or ShapeDtypeStructs. The message names the first
    mismatching leaf path (sorted order) and what each of the two members holds there.
    """
    names = list(trees)
    if not names:
        raise MergeError("nothing to average: no members")
    ref_name = names[0]
    ref = dict(checkpoints.named_leaves(trees[ref_name]))
    for name in names[1:]:
        other = dict(checkpoints.named_leaves(trees[name]))
        for path in sorted(set(ref) | set(other)):
            if path not in other:
                raise MergeError(f"leaf '{path}' is in {ref_name} ({_describe_leaf(ref[path])}) but not in {name}")
            if path not in ref:
                raise MergeError(f"leaf '{path}' is in {name} ({_describe_leaf(other[path])}) but not in {ref_name}")
            a, b = ref[path], other[path]
            if tuple(a.shape) != tuple(b.shape) or np.dtype(a.dtype) != np.dtype(b.dtype):
                raise MergeError(
                    f"leaf '{path}' differs: {ref_name} has {_describe_leaf(a)}, {name} has {_describe_leaf(b)}"
                )


def normalize_weights(weights: Sequence[float] | None, k: int) -> np.ndarray:
    """[k] float64 weights summing to 1 (uniform when None). Weights must be finite and ≥ 0."""
    if weights is None:
        return np.full(k, 1.0 / k)
    w = np.asarray(weights, np.float64)
    if w.shape != (k,):
        raise MergeError(f"{w.size} weights given for {k} members")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise MergeError(f"weights must be finite, non-negative and not all zero, got {list(w)}")
    return w / w.sum()


# ----------------------------------------------------------------------------- stacked mean


def _drop_leading(s) -> NamedSharding | None:
    """The sharding of one member of a stacked array: the same spec without its first entry."""
    if isinstance(s, NamedSharding):
        return NamedSharding(s.mesh, P(*tuple(s.spec)[1:]))
    return None


def _weighted_mean_leaf(coef, x):
    """coef [M] float32 running-mean coefficients w_k / (w_1 + … + w_k); x [M, ...] → [...] in x.dtype.

    The same running mean as the streamed average, unrolled over the (static) member axis into
    one elementwise fusion: each member slice is read once, no [M, ...] temporary and no
    reduction over the leading axis (which XLA:CPU lowers very slowly for large leaves).
    """
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        return x[jnp.argmax(coef)]  # integer leaves are not averaged: one member's value
    m = x[0].astype(jnp.float32)
    for k in range(1, x.shape[0]):
        xk = x[k].astype(jnp.float32)
        # coef == 1: the first member with weight (all before it weigh 0): take it exactly.
        m = jnp.where(coef[k] == 1.0, xk, m + coef[k] * (xk - m))
    return m.astype(x.dtype)


@functools.lru_cache(maxsize=32)
def _stacked_mean_fn(treedef, out_shardings: tuple):
    def fn(stacked, w):
        cum = jnp.cumsum(w.astype(jnp.float32))
        coef = jnp.where(cum > 0, w / jnp.where(cum > 0, cum, 1.0), 0.0)
        return jax.tree.map(functools.partial(_weighted_mean_leaf, coef), stacked)

    out = None if all(s is None for s in out_shardings) else jax.tree_util.tree_unflatten(treedef, out_shardings)
    return jax.jit(fn, out_shardings=out)


def mean_stacked(stacked_params: PyTree, weights: jax.Array | None = None, *, out_shardings=None) -> PyTree:
    """Weighted mean over the leading 'ensemble' axis, on device.

    Args:
      stacked_params: tree of [M, ...] arrays (the ensemble's stacked params).
      weights: [M] non-negative (normalised here; zeros leave members out), default uniform. A
        traced array, so changing it does not recompile.
      out_shardings: tree of single-member NamedShardings; default: each input's sharding
        without its leading axis.
    Returns:
      tree of [...] arrays in the leaves' own dtypes (float32 accumulation).
    """
    leaves, treedef = jax.tree_util.tree_flatten(stacked_params)
    m = leaves[0].shape[0]
    if any(x.ndim == 0 or x.shape[0] != m for x in leaves):
        raise MergeError(f"mean_stacked: every leaf needs the same leading member axis [M={m}, ...]")
    if out_shardings is None:
        outs = tuple(_drop_leading(getattr(x, "sharding", None)) for x in leaves)
    else:
        outs = tuple(jax.tree_util.tree_leaves(out_shardings))
        if len(outs) != len(leaves):
            raise MergeError(f"out_shardings has {len(outs)} leaves, stacked_params {len(leaves)}")
    w = jnp.full((m,), 1.0 / m, jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
    if w.shape != (m,):
        raise MergeError(f"mean_stacked: weights of shape {w.shape} for {m} members")
    return _stacked_mean_fn(treedef, outs)(stacked_params, w)


# ----------------------------------------------------------------------------- streaming mean


@functools.lru_cache(maxsize=32)
def _stream_fns(treedef, shardings: tuple):
    sh = jax.tree_util.tree_unflatten(treedef, shardings)
    f32 = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)
    start = jax.jit(f32, out_shardings=sh)

    def update(acc, x, c):
        # Running mean: exact when x == acc (identical members), and acc's buffer is reused.
        return jax.tree.map(lambda a, b: a + c * (b.astype(jnp.float32) - a), acc, x)

    step = jax.jit(update, out_shardings=sh, donate_argnums=0)
    return start, step


@functools.lru_cache(maxsize=32)
def _cast_fn(treedef, shardings: tuple, dtypes: tuple):
    sh = jax.tree_util.tree_unflatten(treedef, shardings)

    def cast(acc):
        leaves = jax.tree_util.tree_leaves(acc)
        return jax.tree_util.tree_unflatten(treedef, [x.astype(d) for x, d in zip(leaves, dtypes)])

    return jax.jit(cast, out_shardings=sh, donate_argnums=0)


def _read_model_json(directory: str) -> dict:
    path = os.path.join(directory, "model.json")
    if not os.path.isfile(path):
        raise MergeError(
            f"{directory}: not a params checkpoint (no model.json); a stacked ensemble "
            "checkpoint (WORKDIR/rm/ckpt) is read with restore_stacked_params"
        )
    return io_utils.read_json(path)


def _check_configs(cfgs: Mapping[str, dict]) -> None:
    names = list(cfgs)
    ref = cfgs[names[0]]
    for name in names[1:]:
        for field in sorted(set(ref) | set(cfgs[name])):
            if field in _CFG_FIELDS_MAY_DIFFER:
                continue
            if ref.get(field) != cfgs[name].get(field):
                raise MergeError(
                    f"model config field '{field}' differs: {names[0]}/model.json has {ref.get(field)!r}, "
                    f"{name}/model.json has {cfgs[name].get(field)!r}"
                )


def _manifest_params_hash(step_dir: str) -> str | None:
    """``tree_sha256`` of the saved params, from the checkpoint's own manifest (no second hashing pass).

    None when the manifest cannot give it (several processes, or arrays hashed per shard).
    """
    manifests = sorted(f for f in os.listdir(os.path.join(step_dir, "manifest")) if f.startswith("manifest.process-"))
    if len(manifests) != 1:
        return None
    leaves = io_utils.read_json(os.path.join(step_dir, "manifest", manifests[0]))["leaves"]
    h = hashlib.sha256()
    for path in sorted(p for p in leaves if p.startswith("params/")):
        entry = leaves[path]
        if "sha256" not in entry:
            return None
        h.update(f"{path[len('params/') :]}\t{entry['dtype']}\t{entry['shape']}\t{entry['sha256']}\n".encode())
    return h.hexdigest()


def checkpoint_abstract(directory: str) -> tuple[PyTree, int]:
    """(saved params tree of ShapeDtypeStructs, latest step) of a ``save_params`` directory."""
    ck = checkpoints.Checkpointer(os.path.join(directory, "ckpt"), read_only=True, async_save=False)
    try:
        step = ck.latest_step()
        if step is None:
            raise MergeError(f"{directory}/ckpt: no finished checkpoint")
        return ck.saved_abstract_state(step)["params"], step
    finally:
        ck.close()


def average_checkpoints(dirs: Sequence[str], *, mesh, weights: Sequence[float] | None = None, rules=None):
    """Streams K ``save_params`` checkpoints into their weighted average, one member at a time.

    Args:
      dirs: member directories (``model.json`` + ``ckpt/``), e.g. WORKDIR/rm/members/<i>.
      mesh: target mesh; params are restored and averaged in the rules' sharding on it.
      weights: one per member, non-negative (normalised); members with weight 0 are not read.
    Returns:
      (model_cfg, graphdef, params, info) with info = {"members", "weights", "hashes", "meta"}:
      the directories, normalised weights, each member's params sha256 (``tree_sha256``) and
      model.json contents.
    Raises:
      MergeError naming the first mismatching leaf (or config field), before anything is read.
    """
    dirs = [os.fspath(d) for d in dirs]
    if not dirs:
        raise MergeError("nothing to average: no checkpoint directories")
    w = normalize_weights(weights, len(dirs))
    metas = {d: _read_model_json(d) for d in dirs}
    model_cfg = tr.ModelConfig(**metas[dirs[0]]["model"])
    graphdef, abstract, axes = tr.abstract_model(model_cfg)
    saved = {d: checkpoint_abstract(d)[0] for d in dirs}
    check_compatible({f"{dirs[0]}/model.json": abstract, **saved})
    _check_configs({d: m["model"] for d, m in metas.items()})

    shardings = sharding.named(mesh, sharding.tree_specs(axes, abstract, mesh, rules))
    target = {"params": sharding.abstract_with_sharding(abstract, shardings)}
    flat_sh, treedef = jax.tree_util.tree_flatten(shardings)
    start, update = _stream_fns(treedef, tuple(flat_sh))
    dtypes = tuple(np.dtype(x.dtype) for x in jax.tree_util.tree_leaves(abstract))

    acc, seen, hashes = None, 0.0, {}
    for d, wk in zip(dirs, w):
        if wk == 0:
            continue
        ck = checkpoints.Checkpointer(os.path.join(d, "ckpt"), read_only=True, async_save=False)
        try:
            state, _, step = ck.restore(target)
            step_dir = str(ck.step_dir(step))
        finally:
            ck.close()
        member = state.pop("params")
        hashes[d] = _manifest_params_hash(step_dir) or checkpoints.tree_sha256(member)
        seen += wk
        acc = start(member) if acc is None else update(acc, member, jnp.float32(wk / seen))
        # Wait for the update (dispatch is asynchronous) so the member's buffers are freed before
        # the next restore allocates: peak = accumulator + one member, whatever K is.
        acc = jax.block_until_ready(acc)
        del member, state
    params = _cast_fn(treedef, tuple(flat_sh), dtypes)(acc)
    info = {"members": dirs, "weights": [float(x) for x in w], "hashes": hashes, "meta": metas}
    return model_cfg, graphdef, params, info


# ----------------------------------------------------------------------------- stacked checkpoint


def restore_stacked_params(ckpt_dir: str, mesh, model_cfg: tr.ModelConfig, *, step: int | None = None, rules=None):
    """The params of a stacked ensemble training checkpoint (WORKDIR/rm/ckpt), [M, ...] per leaf.

    Only the ``params`` subtree of the saved TrainState is read (not the optimizer state); it is
    checked against the checkpoint's hash manifest. The leading axis is split over 'ensemble'
    when M is a multiple of that mesh axis, else replicated. Returns (stacked params, step).
    """
    ck = checkpoints.Checkpointer(ckpt_dir, read_only=True, async_save=False)
    try:
        step = ck.latest_step() if step is None else step
        if step is None:
            raise MergeError(f"{ckpt_dir}: no finished checkpoint")
        saved = ck.saved_abstract_state(step)
        step_dir = str(ck.step_dir(step))
    finally:
        ck.close()
    if not isinstance(saved, Mapping) or "params" not in saved:
        raise MergeError(f"{step_dir}: not a training state (no 'params' item)")
    _, abstract, axes = tr.abstract_model(model_cfg)
    saved_params = saved["params"]
    m = jax.tree_util.tree_leaves(saved_params)[0].shape[0]
    stacked_abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct((m, *x.shape), x.dtype), abstract)
    check_compatible({"the model config (stacked)": stacked_abstract, step_dir: saved_params})
    specs = sharding.tree_specs(axes, abstract, mesh, rules)
    ens = mesh.shape.get(sharding.ENSEMBLE, 1)
    lead = sharding.ENSEMBLE if m % ens == 0 and sharding.ENSEMBLE in mesh.shape else None
    stacked_specs = jax.tree.map(lambda s: P(lead, *s), specs, is_leaf=lambda x: isinstance(x, P))
    target = {"params": sharding.abstract_with_sharding(stacked_abstract, sharding.named(mesh, stacked_specs))}
    reader = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    try:
        restored = reader.restore(
            os.path.join(step_dir, "state"),
            args=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
            ),
        )
    finally:
        reader.close()
    _verify_subtree(restored, step_dir)
    return restored["params"], step


def _verify_subtree(tree: PyTree, step_dir: str) -> None:
    """Checks a partially restored tree against the (single-process) hash manifest."""
    mdir = os.path.join(step_dir, "manifest")
    manifests = [f for f in os.listdir(mdir) if f.startswith("manifest.process-")]
    if len(manifests) != 1:
        log.warning("%s: %d manifests; partial restore not verified", step_dir, len(manifests))
        return
    saved = io_utils.read_json(os.path.join(mdir, manifests[0]))["leaves"]
    for path, entry in checkpoints.leaf_hashes(tree).items():
        want = saved.get(path, {}).get("sha256")
        if want is not None and entry.get("sha256") != want:
            raise checkpoints.CheckpointCorruptError(f"{step_dir}: array '{path}' does not match the manifest")


# ----------------------------------------------------------------------------- selection


def select_top_m(accuracies: Sequence[float], m: int) -> list[int]:
    """Indices of the m most accurate members, best first (ties: lower index first)."""
    acc = np.asarray(accuracies, np.float64)
    if not 1 <= m <= acc.size:
        raise MergeError(f"top_m={m} must be between 1 and the number of members ({acc.size})")
    if not np.all(np.isfinite(acc)):
        raise MergeError(f"accuracies must be finite, got {list(acc)}")
    return [int(i) for i in np.argsort(-acc, kind="stable")[:m]]


def greedy_soup(
    order: Sequence[int], evaluate: Callable[[list[int]], float], *, history: list | None = None
) -> list[int]:
    """Best-first greedy soup: add members in ``order``, keep one only if the average does not get worse.

    evaluate(members) → accuracy of the uniform average of ``members`` (on a held-out split).
    ``history``, when given, receives (candidate, accuracy, kept) per step.
    """
    order = [int(i) for i in order]
    if not order:
        raise MergeError("greedy_soup: empty order")
    chosen = [order[0]]
    best = float(evaluate(list(chosen)))
    if history is not None:
        history.append((order[0], best, True))
    for i in order[1:]:
        acc = float(evaluate(chosen + [i]))
        kept = acc >= best
        if kept:
            chosen, best = chosen + [i], acc
        if history is not None:
            history.append((i, acc, kept))
        log.info("greedy soup: +%d → %.4f (%s)", i, acc, "kept" if kept else "dropped")
    return chosen


# ----------------------------------------------------------------------------- output


def write_merged(
    output_dir: str,
    params: PyTree,
    *,
    model_cfg: tr.ModelConfig,
    members: list,
    weights: list,
    accuracies: dict | None,
    hashes: dict,
    tokenizer_dir: str | None,
) -> None:
    """Writes the merged RM as a ``save_params`` checkpoint (temporary path, renamed when complete).

    Metadata (in model.json and the checkpoint's meta item): {"merge": {"method", "members",
    "weights", "accuracies", "member_sha256", "sha256"}} — member keys as strings.
    """
    if len(members) != len(weights):
        raise MergeError(f"{len(members)} members but {len(weights)} weights")
    strkeys = lambda d: None if d is None else {str(k): v for k, v in d.items()}
    meta = {
        "merge": {
            "method": "weight_average",
            "members": [m if isinstance(m, (int, str)) else str(m) for m in members],
            "weights": [float(x) for x in weights],
            "accuracies": strkeys(accuracies),
            "member_sha256": strkeys(hashes),
            "sha256": checkpoints.tree_sha256(params),
        }
    }
    json.dumps(meta)  # fail before writing anything if the metadata is not JSON
    params_io.save_params(output_dir, params, model_cfg=model_cfg, meta=meta, tokenizer_dir=tokenizer_dir)


# ----------------------------------------------------------------------------- interpolation / LMC


@jax.jit
def _interp(a, b, lam):
    lam = jnp.asarray(lam, jnp.float32)
    return jax.tree.map(
        lambda x, y: ((1.0 - lam) * x.astype(jnp.float32) + lam * y.astype(jnp.float32)).astype(x.dtype), a, b
    )


def interpolate(params_a: PyTree, params_b: PyTree, lam: float) -> PyTree:
    """θ(λ) = (1−λ)·θ_a + λ·θ_b, on device (λ traced: one compile for every λ). λ=0 gives θ_a exactly."""
    check_compatible({"params_a": params_a, "params_b": params_b})
    return _interp(params_a, params_b, lam)


def barrier_height(lambdas: Sequence[float], accs: Sequence[float]) -> float:
    """max over λ of (linear interpolation of the endpoint accuracies − acc(λ)); > 0 means a barrier.

    lambdas ascending with the endpoints first and last (e.g. 0, 0.1, …, 1).
    """
    lam = np.asarray(lambdas, np.float64)
    acc = np.asarray(accs, np.float64)
    if lam.shape != acc.shape or lam.size < 2:
        raise ValueError(f"barrier_height: {lam.size} lambdas and {acc.size} accuracies")
    t = (lam - lam[0]) / (lam[-1] - lam[0])
    line = (1 - t) * acc[0] + t * acc[-1]
    return float(np.max(line - acc))


def interpolation_curve(
    params_a: PyTree,
    params_b: PyTree,
    eval_fn: Callable[[PyTree], dict],
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    *,
    rewards_fn: Callable[[PyTree], dict] | None = None,
    eval_pred_fn: Callable[[Any, Any], dict] | None = None,
) -> dict:
    """Weight and prediction interpolation between two members, per split.

    eval_fn(params) → {split: {"accuracy": float, "loss": float}}.
    Prediction interpolation (ENS of the two at λ = 0.5) needs both rewards_fn(params) →
    {split: (r_chosen [N], r_rejected [N])} and eval_pred_fn(r_chosen, r_rejected) →
    {"accuracy", "loss"}; the rewards of θ_a and θ_b are computed once and mixed as
    (1−λ)·r_a + λ·r_b.
    Returns {"lambdas", "weight": {split: {"accuracy": [..], "loss": [..]}}, "pred": (same or
    None), "barrier": {split: accuracy barrier}, "loss_barrier": {split: max(loss(λ) − line)}}.
    """
    lambdas = [float(x) for x in lambdas]
    weight: dict[str, dict[str, list]] = {}
    for lam in lambdas:
        for split, mets in eval_fn(interpolate(params_a, params_b, lam)).items():
            row = weight.setdefault(split, {"accuracy": [], "loss": []})
            row["accuracy"].append(float(mets["accuracy"]))
            row["loss"].append(float(mets["loss"]))
    pred = None
    if rewards_fn is not None and eval_pred_fn is not None:
        ra, rb = rewards_fn(params_a), rewards_fn(params_b)
        pred = {}
        for split in ra:
            ca, xa = (np.asarray(v) for v in ra[split])
            cb, xb = (np.asarray(v) for v in rb[split])
            rows = [eval_pred_fn((1 - lam) * ca + lam * cb, (1 - lam) * xa + lam * xb) for lam in lambdas]
            pred[split] = {k: [float(r[k]) for r in rows] for k in ("accuracy", "loss")}
    return {
        "lambdas": lambdas,
        "weight": weight,
        "pred": pred,
        "barrier": {s: barrier_height(lambdas, v["accuracy"]) for s, v in weight.items()},
        # A loss barrier is the same shape upside down: loss above the line between the endpoints.
        "loss_barrier": {s: barrier_height(lambdas, [-x for x in v["loss"]]) for s, v in weight.items()},
    }
