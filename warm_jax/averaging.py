"""Weight averaging of reward models (WARM), member selection, and linear mode connectivity.

Averaging in memory, on device, accumulating in float32: ``mean_stacked`` reduces the stacked
ensemble ([M, ...] on every leaf, split over the mesh's 'ensemble' axis) over its leading axis in
one jitted program; the result lands in the single-member sharding. K member checkpoints on disk
are averaged by ``checkpoint_averaging.average_checkpoints``, streamed, with the same maths.

Both compute the running mean ``m_k = m_{k−1} + (w_k / W_k)(θ_k − m_{k−1})`` (W_k = w_1 + … +
w_k), so averaging K identical members returns them bit for bit (every difference is an exact
zero); summing the members and dividing would not be exact (3·x/3 ≠ x in floating point).

Selection (WARM §4: "WARM M" = the M best of 10 by accuracy) and greedy soups (Wortsman et
al., 2022: add members best-first, keep one only if the average does not get worse) work on
member indices; interpolation θ(λ) = (1−λ)·θ_a + λ·θ_b measures linear mode connectivity.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from warm_jax import checkpoints

log = logging.getLogger(__name__)

PyTree = Any
DEFAULT_LAMBDAS = np.linspace(0.0, 1.0, 11)


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
        raise MergeError(f"weights must be finite, non-negative and not all zero, got {w.tolist()}")
    if not np.isfinite(w.sum()):
        raise MergeError(f"weights {w.tolist()} sum to infinity in float64; scale them down")
    return w / w.sum()


# ----------------------------------------------------------------------------- stacked mean


def drop_leading(s) -> NamedSharding | None:
    """The sharding of one member of a stacked array: the same spec without its first entry."""
    if isinstance(s, NamedSharding):
        return NamedSharding(s.mesh, P(*tuple(s.spec)[1:]))
    return None


def weighted_mean_leaf(coef, x):
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
        return jax.tree.map(functools.partial(weighted_mean_leaf, coef), stacked)

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
        outs = tuple(drop_leading(getattr(x, "sharding", None)) for x in leaves)
    else:
        outs = tuple(jax.tree_util.tree_leaves(out_shardings))
        if len(outs) != len(leaves):
            raise MergeError(f"out_shardings has {len(outs)} leaves, stacked_params {len(leaves)}")
    w = jnp.full((m,), 1.0 / m, jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
    if w.shape != (m,):
        raise MergeError(f"mean_stacked: weights of shape {w.shape} for {m} members")
    return _stacked_mean_fn(treedef, outs)(stacked_params, w)


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


@jax.jit
def task_vector_geometry(stacked_params: PyTree, inits: PyTree) -> tuple[jax.Array, jax.Array]:
    """How far the members moved from their inits, and how alike their moves are.

    stacked_params: leaves [M, ...]; inits: one init shared by every member (the same tree without the member
    axis) or each member's own (leaves [M, ...], as Baklava members start from different pretraining
    checkpoints). With task vectors τ_i = θ_i − θ_0,i (float32), returns (‖τ_i‖ / ‖θ_0,i‖ [M],
    cos(τ_i, τ_j) [M, M]). Members that stay close (small distances, cosines well above 0) are in one basin, where
    their weight average behaves like their ensemble; unrelated solutions (cosines near 0 at large distances)
    average into a shrunken model.
    """

    def per_member(s, x):
        return x.astype(jnp.float32) if x.ndim == s.ndim else x.astype(jnp.float32)[None]

    inits = jax.tree.map(per_member, stacked_params, inits)
    m = jax.tree.leaves(stacked_params)[0].shape[0]
    taus = jax.tree.map(lambda s, x: (s.astype(jnp.float32) - x).reshape(m, -1), stacked_params, inits)
    gram = sum(t @ t.T for t in jax.tree.leaves(taus))
    init_norm = jnp.sqrt(sum(jnp.sum(jnp.square(x).reshape(x.shape[0], -1), 1) for x in jax.tree.leaves(inits)))
    norms = jnp.sqrt(jnp.diagonal(gram))
    cos = gram / jnp.maximum(norms[:, None] * norms[None, :], jnp.finfo(jnp.float32).tiny)
    return norms / init_norm, cos
