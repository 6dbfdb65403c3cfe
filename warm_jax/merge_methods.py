"""Merge methods by name: linear, SLERP, task arithmetic, TIES and DARE, per leaf, on device.

Every method is a per-leaf function ``(base [...] | None, members [M, ...], weights [M] float32,
key | None, **params) → [...]`` registered under a name (``register_merge_method``), so that a
stacked ensemble (``merge_stacked``: the whole tree in one jitted program) and K checkpoints on
disk (``checkpoint_averaging.merge_checkpoints``: a group of leaves at a time) give the same
merge. The maths is float32 (bf16 members too); each leaf is cast back to its own dtype once, at
the end. Methods act per tensor, as mergekit does and as WARP applies SLERP per layer.

Task vectors are δ_i = θ_i − θ_base (the shared initialisation). Weights w_i ≥ 0 (default: see
each method) and, where a method takes them, ``density`` in (0, 1] and ``scaling`` = λ:

* linear            Σ w_i θ_i / Σ w_i, as the running mean m_k = m_{k−1} + (w_k / W_k)(θ_k − m_{k−1})
                    of ``averaging.mean_stacked`` (bit for bit; identical members come back exactly).
                    No base. Default weights uniform.
* slerp             base + SLERP of the task vectors (WARP, Ramé et al. 2024). Two members:
                    base + [sin((1−t)Ω)/sin Ω]·δ_1 + [sin(tΩ)/sin Ω]·δ_2 with Ω the angle between δ_1 and
                    δ_2 and t = w_2 / (w_1 + w_2) (0.5 by default). M > 2: incremental SLERP,
                    m_1 = δ_1, m_k = slerp(m_{k−1}, δ_k, w_k / (w_1 + … + w_k)), which is the two-model
                    rule for M = 2 and the weighted mean of the task vectors when they are parallel; it
                    depends on the order of the members when they are not. Where SLERP is undefined or
                    ill-conditioned — a zero task vector, or 1 − |cos Ω| < ``SLERP_PARALLEL_TOL`` (parallel
                    or antiparallel, Ω within ~1.4 mrad of 0 or π) — the step is the linear
                    interpolation (1−t)·m + t·δ instead (mergekit falls back the same way).
* task_arithmetic   base + λ·Σ w_i δ_i (Ilharco et al. 2023); weights default to 1 each and are not
                    normalised (mergekit's semantics), λ = ``scaling`` (1.0).
* ties              TIES-merging (Yadav et al. 2023): each δ_i is trimmed to its ``density`` fraction of
                    largest magnitudes (k = max(1, ⌊density·n⌋) entries of the tensor's n, ties broken
                    towards the lower flat index); the sign of each entry is elected by the sign of the
                    weighted mass Σ w_i·trim(δ_i) (a zero mass elects +); the merged task vector is the
                    disjoint weighted mean Σ w_i·trim(δ_i)·[agrees] / Σ w_i·[agrees] (0 where no member
                    agrees); base + λ·that. Weights default to 1 each. density=1 keeps everything.
* dare              DARE (Yu et al. 2024): each entry of each δ_i is dropped with probability
                    1 − ``density`` and the survivors are divided by ``density``; then task arithmetic,
                    base + λ·Σ w_i·dare(δ_i). The masks come from ``leaf_key(key, path)`` folded with
                    the member index: they depend on the key, the leaf's name and the member, not on
                    the order in which leaves are merged or streamed. density=1 drops nothing.

Memory, streamed from disk: linear keeps one float32 accumulator of the model plus two groups of
leaves, whatever M is (``checkpoint_averaging.average_checkpoints``); every method with a base
holds the merged model plus, per group of leaves (``CHUNK_BYTES``, ~64 MB), the M members and the
base on the host, twice (the next group is read while this one is merged), and their float32
copies on the device — O(model + 2·(M + 1)·group), not O(M·model). Within one leaf, slerp and
task arithmetic need O(M·leaf) float32; ties adds its masks and a bisection over the magnitudes'
bits (O(M·leaf)); dare its masks and random bits (O(M·leaf)).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from warm_jax import checkpoints
from warm_jax.averaging import MergeError, drop_leading, weighted_mean_leaf, check_compatible

PyTree = Any
# SLERP falls back to linear interpolation where 1 − |cos Ω| is below this: the angle then comes
# from an arccos near ±1 (float32 dot products of large tensors are not more accurate than this),
# and near Ω = π the SLERP coefficients blow up (sin Ω → 0).
SLERP_PARALLEL_TOL = 1e-6


@dataclasses.dataclass(frozen=True)
class MergeMethod:
    """A merge method: its per-leaf function and what it needs.

    leaf_fn(base [...] | None, members [M, ...] any float dtype, weights [M] float32, key | None,
    **params) → [...] (float32 or the members' dtype; the caller casts to the leaf's dtype).
    defaults: the method's parameters and their defaults (the only names it accepts).
    uniform: the weights when none are given: "mean" (1/M each) or "ones" (1 each).
    """

    name: str
    leaf_fn: Callable[..., jax.Array]
    needs_base: bool
    needs_key: bool
    defaults: Mapping[str, float]
    uniform: str

    def resolve_params(self, params: Mapping[str, Any]) -> dict[str, float]:
        """The defaults overridden by ``params``; ValueError naming an unknown or out-of-range one."""
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            accepts = ", ".join(sorted(self.defaults)) or "none"
            raise MergeError(f"merge method '{self.name}' takes no parameter {unknown[0]!r} (it takes: {accepts})")
        out = {**self.defaults, **{k: float(v) for k, v in params.items()}}
        for name, v in out.items():
            if not math.isfinite(v):
                raise MergeError(f"merge method '{self.name}': {name}={v} is not finite")
        if "density" in out and not 0.0 < out["density"] <= 1.0:
            raise MergeError(f"merge method '{self.name}': density={out['density']:g} must be in (0, 1]")
        return out

    def default_weights(self, m: int) -> np.ndarray:
        """[m] float32 weights used when none are given."""
        return np.full(m, 1.0 / m if self.uniform == "mean" else 1.0, np.float32)


MERGE_METHODS: dict[str, MergeMethod] = {}


def register_merge_method(
    name: str,
    *,
    needs_base: bool = False,
    needs_key: bool = False,
    defaults: Mapping[str, float] | None = None,
    uniform: str = "ones",
):
    """Decorator: registers ``leaf_fn`` as merge method ``name`` (see ``MergeMethod``)."""
    if uniform not in ("mean", "ones"):
        raise ValueError(f"uniform={uniform!r}: expected 'mean' or 'ones'")

    def register(leaf_fn):
        if name in MERGE_METHODS:
            raise ValueError(f"merge method {name!r} is registered already")
        MERGE_METHODS[name] = MergeMethod(name, leaf_fn, needs_base, needs_key, dict(defaults or {}), uniform)
        return leaf_fn

    return register


def get_merge_method(name: str) -> MergeMethod:
    """The registered method ``name``; ValueError listing the known ones."""
    if name not in MERGE_METHODS:
        raise MergeError(f"unknown merge method {name!r}; known: {', '.join(sorted(MERGE_METHODS))}")
    return MERGE_METHODS[name]


# ----------------------------------------------------------------------------- helpers


def _running_coef(weights: jax.Array) -> jax.Array:
    """[M] float32 running-mean coefficients w_k / (w_1 + … + w_k), 0 where that sum is 0."""
    w = weights.astype(jnp.float32)
    cum = jnp.cumsum(w)
    return jnp.where(cum > 0, w / jnp.where(cum > 0, cum, 1.0), 0.0)


def _sum_all(x: jax.Array) -> jax.Array:
    """Sum of every entry in float32, in two levels (rows, then the row sums) rather than one long
    running sum: the dot products of SLERP's angle over millions of entries stay accurate."""
    return jnp.sum(jnp.sum(x, axis=-1)) if x.ndim >= 2 else jnp.sum(x)


def _task_vectors(base: jax.Array, members: jax.Array) -> list[jax.Array]:
    """[M] list of float32 task vectors δ_i = θ_i − θ_base, each [...] (member slices: no reduction
    over the leading axis, which XLA:CPU lowers slowly for large leaves)."""
    b = base.astype(jnp.float32)
    return [members[i].astype(jnp.float32) - b for i in range(members.shape[0])]


def _weighted_sum(ws: jax.Array, xs: list[jax.Array]) -> jax.Array:
    out = ws[0] * xs[0]
    for i in range(1, len(xs)):
        out = out + ws[i] * xs[i]
    return out


def slerp_pair(a: jax.Array, b: jax.Array, t: jax.Array) -> jax.Array:
    """SLERP of two float32 tensors [...] by t ∈ [0, 1] (the angle between them as flat vectors):
    sin((1−t)Ω)/sin Ω·a + sin(tΩ)/sin Ω·b; (1−t)·a + t·b where a or b is zero or they are
    (anti)parallel within ``SLERP_PARALLEL_TOL``."""
    t = jnp.asarray(t, jnp.float32)
    na2, nb2 = _sum_all(a * a), _sum_all(b * b)
    denom = jnp.sqrt(na2) * jnp.sqrt(nb2)
    cos = jnp.clip(_sum_all(a * b) / jnp.where(denom > 0, denom, 1.0), -1.0, 1.0)
    ok = (denom > 0) & (1.0 - jnp.abs(cos) > SLERP_PARALLEL_TOL)
    omega = jnp.arccos(jnp.where(ok, cos, 0.0))
    sin = jnp.where(ok, jnp.sin(omega), 1.0)
    ca = jnp.where(ok, jnp.sin((1.0 - t) * omega) / sin, 1.0 - t)
    cb = jnp.where(ok, jnp.sin(t * omega) / sin, t)
    return ca * a + cb * b


def _top_k_mask(a: jax.Array, k: int) -> jax.Array:
    """a [M, n] float32 ≥ 0 → [M, n] bool: each row's k largest entries (equal values: the lower
    index first, as ``lax.top_k`` breaks ties), without sorting.

    The k-th largest value is found by bisection on its bit pattern (non-negative float32 values
    order as their int32 bits): 31 counting passes over the row, ~9x faster than ``lax.top_k``
    with k = 0.2·n on XLA:CPU and the same set.
    """
    m = a.shape[0]
    bits = jax.lax.bitcast_convert_type(a, jnp.int32)

    def halve(_, lohi):
        lo, hi = lohi  # count(bits ≥ lo) ≥ k > count(bits ≥ hi)
        mid = lo + (hi - lo) // 2
        ok = jnp.sum(bits >= mid[:, None], axis=1) >= k
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    init = (jnp.zeros((m,), jnp.int32), jnp.full((m,), 0x7F800001, jnp.int32))  # 0.0 and just above +inf
    kth, _ = jax.lax.fori_loop(0, 31, halve, init)
    at_least = bits >= kth[:, None]

    def first_ties(_):  # more entries equal the k-th value than fit: keep the lower indices
        above = bits > kth[:, None]
        tied = at_least & ~above
        room = k - jnp.sum(above, axis=1, keepdims=True)
        return above | (tied & (jnp.cumsum(tied, axis=1, dtype=jnp.int32) <= room))

    # The running count (a scan as slow as the bisection on XLA:CPU) only when ties need it.
    return jax.lax.cond(jnp.all(jnp.sum(at_least, axis=1) == k), lambda _: at_least, first_ties, None)


def trim_top_k(deltas: jax.Array, density: float) -> jax.Array:
    """deltas [M, ...] float32 with all but each member's k = max(1, ⌊density·n⌋) largest |δ| zeroed
    (n entries per member; equal magnitudes: the lower flat index is kept)."""
    m = deltas.shape[0]
    n = math.prod(deltas.shape[1:])
    k = max(1, math.floor(density * n + 1e-9))
    if k >= n:
        return deltas
    flat = deltas.reshape(m, n)
    return jnp.where(_top_k_mask(jnp.abs(flat), k), flat, 0.0).reshape(deltas.shape)


def path_hash(path: str) -> int:
    """CRC-32 of a leaf's name (e.g. 'layer_0/mlp/w_up'), the data ``leaf_key`` folds in."""
    return zlib.crc32(path.encode())


def leaf_key(key: jax.Array, path: str) -> jax.Array:
    """The key of the leaf named ``path``: fold_in of ``path_hash(path)``, so a leaf's random
    numbers do not depend on which leaves are merged before it (or streamed from disk)."""
    return jax.random.fold_in(key, np.uint32(path_hash(path)))


# ----------------------------------------------------------------------------- methods


@register_merge_method("linear", uniform="mean")
def _linear(base, members, weights, key):
    """Weighted mean Σ w_i θ_i / Σ w_i (WARM), the running mean of averaging.mean_stacked."""
    return weighted_mean_leaf(_running_coef(weights), members)


@register_merge_method("slerp", needs_base=True)
def _slerp(base, members, weights, key):
    """base + SLERP of the task vectors; M > 2: incremental SLERP by the running weights."""
    deltas = _task_vectors(base, members)
    coef = _running_coef(weights)
    m = deltas[0]
    for k in range(1, len(deltas)):
        # coef 1: the first member with weight (all before it weigh 0); coef 0: a member without weight.
        m = jnp.where(coef[k] == 1.0, deltas[k], jnp.where(coef[k] == 0.0, m, slerp_pair(m, deltas[k], coef[k])))
    return base.astype(jnp.float32) + m


@register_merge_method("task_arithmetic", needs_base=True, defaults={"scaling": 1.0})
def _task_arithmetic(base, members, weights, key, *, scaling):
    """base + scaling·Σ w_i (θ_i − base), weights 1 each by default (not normalised)."""
    deltas = _task_vectors(base, members)
    return base.astype(jnp.float32) + scaling * _weighted_sum(weights.astype(jnp.float32), deltas)


@register_merge_method("ties", needs_base=True, defaults={"density": 0.2, "scaling": 1.0})
def _ties(base, members, weights, key, *, density, scaling):
    """Trim each task vector to its top density fraction, elect signs by mass, disjoint weighted mean."""
    trimmed = trim_top_k(jnp.stack(_task_vectors(base, members)), density)
    w = weights.astype(jnp.float32)
    deltas = [trimmed[i] for i in range(trimmed.shape[0])]
    elected = jnp.where(_weighted_sum(w, deltas) >= 0, 1.0, -1.0)
    agree = [jnp.sign(d) == elected for d in deltas]
    num = _weighted_sum(w, [jnp.where(a, d, 0.0) for a, d in zip(agree, deltas)])
    den = _weighted_sum(w, [a.astype(jnp.float32) for a in agree])
    return base.astype(jnp.float32) + scaling * jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def dare_masks(key: jax.Array, m: int, shape: tuple, density: float) -> list[jax.Array]:
    """[m] boolean keep-masks [shape] of one leaf: member i's from fold_in(key, i), kept with
    probability ``density`` (key: the leaf's key, ``leaf_key``)."""
    return [jax.random.bernoulli(jax.random.fold_in(key, i), density, shape) for i in range(m)]


@register_merge_method("dare", needs_base=True, needs_key=True, defaults={"density": 0.5, "scaling": 1.0})
def _dare(base, members, weights, key, *, density, scaling):
    """Drop each task-vector entry with probability 1 − density, rescale by 1/density, task arithmetic."""
    deltas = _task_vectors(base, members)
    if density < 1.0:
        masks = dare_masks(key, len(deltas), base.shape, density)
        deltas = [jnp.where(keep, d / density, 0.0) for keep, d in zip(masks, deltas)]
    return base.astype(jnp.float32) + scaling * _weighted_sum(weights.astype(jnp.float32), deltas)


# ----------------------------------------------------------------------------- trees


def merge_leaf(method: MergeMethod, base, members, weights, key, params: Mapping[str, float]) -> jax.Array:
    """One leaf merged by ``method`` and cast to the members' dtype. Integer leaves are not merged:
    the base's value, or (no base) the member with the largest running weight, as mean_stacked."""
    if not jnp.issubdtype(members.dtype, jnp.inexact):
        return base if base is not None else members[jnp.argmax(_running_coef(weights))]
    return method.leaf_fn(base, members, weights, key, **params).astype(members.dtype)


@functools.lru_cache(maxsize=64)
def _merge_fn(name: str, treedef, paths: tuple, out_shardings: tuple, params: tuple):
    method = MERGE_METHODS[name]
    kw = dict(params)

    def fn(stacked, base, weights, key):
        xs = treedef.flatten_up_to(stacked)
        bs = treedef.flatten_up_to(base) if base is not None else [None] * len(xs)
        out = [
            merge_leaf(method, b, x, weights, leaf_key(key, p) if key is not None else None, kw)
            for p, b, x in zip(paths, bs, xs)
        ]
        return jax.tree_util.tree_unflatten(treedef, out)

    outs = None if all(s is None for s in out_shardings) else jax.tree_util.tree_unflatten(treedef, out_shardings)
    return jax.jit(fn, out_shardings=outs)


def check_weights(weights, m: int, method: MergeMethod) -> jax.Array:
    """[m] float32 weights (the method's default when None); MergeError unless finite, ≥ 0, not all 0."""
    if weights is None:
        return jnp.asarray(method.default_weights(m))
    if isinstance(weights, jax.core.Tracer):
        return weights.astype(jnp.float32)
    w = np.asarray(weights, np.float64)
    if w.shape != (m,):
        raise MergeError(f"merge method '{method.name}': weights of shape {w.shape} for {m} members")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise MergeError(f"merge method '{method.name}': weights must be finite, >= 0 and not all 0, got {w.tolist()}")
    return jnp.asarray(w, jnp.float32)


def check_base(stacked: PyTree, base: PyTree) -> None:
    """MergeError naming the first leaf where ``base`` is not one member of ``stacked`` [M, ...]."""
    want = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), stacked)
    got = jax.tree.map(lambda x: jax.ShapeDtypeStruct(tuple(x.shape), x.dtype), base)
    check_compatible({"a member of the stacked tree": want, "base": got})


def merge_stacked(stacked, *, method: str, base=None, weights=None, key=None, **params):
    """Merges a stacked ensemble into one model with a registered method, on device.

    Args:
      stacked: tree of [M, ...] leaves (the leading 'ensemble' axis, possibly sharded over the
        mesh's 'ensemble' axis).
      method: a name in MERGE_METHODS.
      base: the same tree without the leading axis (the initialisation the task vectors start
        from); required by methods with ``needs_base``, ignored by linear.
      weights: [M] ≥ 0, or None (the method's default: uniform for linear, 1 each otherwise).
      key: a jax PRNG key (dare); each leaf draws from ``leaf_key(key, its path)``.
      **params: the method's parameters (``density``, ``scaling``).
    Returns:
      The merged tree (no leading axis), from one jitted program, computed in float32 and cast to
      each leaf's dtype, placed like one member (each leaf's sharding without its leading axis).
    """
    m_def = get_merge_method(method)
    kw = m_def.resolve_params(params)
    flat, treedef = jax.tree_util.tree_flatten_with_path(stacked)
    if not flat:
        raise MergeError("merge_stacked: nothing to merge (no leaves)")
    leaves = [x for _, x in flat]
    m = leaves[0].shape[0] if leaves[0].ndim else 0
    if m == 0 or any(x.ndim == 0 or x.shape[0] != m for x in leaves):
        raise MergeError(f"merge_stacked: every leaf needs the same leading member axis [M={m}, ...]")
    if m_def.needs_base:
        if base is None:
            raise MergeError(f"merge method '{method}' needs a base (the initialisation the task vectors start from)")
        check_base(stacked, base)
    else:
        base = None
    if m_def.needs_key and key is None:
        raise MergeError(f"merge method '{method}' needs a PRNG key")
    w = check_weights(weights, m, m_def)
    paths = tuple(checkpoints.leaf_path(p) for p, _ in flat)
    outs = tuple(drop_leading(getattr(x, "sharding", None)) for x in leaves)
    fn = _merge_fn(method, treedef, paths, outs, tuple(sorted(kw.items())))
    return fn(stacked, base, w, key if m_def.needs_key else None)


@jax.jit
def _liti(base, merged, eta):
    eta = jnp.asarray(eta, jnp.float32)

    def leaf(b, x):
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            return x
        b32, x32 = b.astype(jnp.float32), x.astype(jnp.float32)
        # The endpoints exactly: eta 1 is the merge, eta 0 the base (b + 1·(x − b) need not be x).
        out = jnp.where(eta == 1.0, x32, jnp.where(eta == 0.0, b32, b32 + eta * (x32 - b32)))
        return out.astype(x.dtype)

    return jax.tree.map(leaf, base, merged)


def liti(base: PyTree, merged: PyTree, eta: float) -> PyTree:
    """WARP's LITI: base + eta·(merged − base) per leaf, float32 maths, cast to merged's dtypes.

    eta is traced (one compile for every eta); 1 gives ``merged`` and 0 the base, exactly.
    """
    check_compatible({"base": base, "merged": merged})
    return _liti(base, merged, eta)
