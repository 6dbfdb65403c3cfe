"""Logical axis names → mesh axes, and the 'ensemble' prefix for stacked states.

Every parameter carries a tuple of logical axis names (its ``axes`` metadata, see
``models/transformer.py``). One rules table maps each logical name to a mesh axis (or to
several, or to none). Specs are resolved against the array's shape: a dimension that the
mesh axis does not divide is replicated rather than failing, so e.g. SmolLM2's 3 KV heads
still load on a tensor axis of 2.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

ENSEMBLE = "ensemble"

# logical axis -> mesh axis (str), several mesh axes (tuple) or None (replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("out", None),
    ("length", None),
    ("cache_length", None),
    ("layers", None),
    (ENSEMBLE, ENSEMBLE),
)


@gin.configurable
def axis_rules(rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> dict[str, Any]:
    """The rules table as a dict; override in gin with ``axis_rules.rules = (...)``."""
    return dict(rules)


def _mesh_axes_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    if isinstance(axes, str):
        axes = (axes,)
    return int(np.prod([mesh.shape[a] for a in axes if a in mesh.shape]))


def _present(mesh: Mesh, axes):
    """Drops mesh axes that this mesh does not have (e.g. no 'tensor' on a 1-D mesh)."""
    if axes is None:
        return None
    if isinstance(axes, str):
        return axes if axes in mesh.shape else None
    kept = tuple(a for a in axes if a in mesh.shape)
    return kept or None


def logical_to_spec(
    logical: Sequence[str | None],
    shape: Sequence[int] | None,
    mesh: Mesh,
    rules: Mapping[str, Any] | None = None,
) -> P:
    """Resolves logical axis names to a PartitionSpec for ``mesh``.

    A mesh axis is used at most once per spec (first dimension wins), and only where it
    divides the dimension, so every resolved spec is valid for its array.
    """
    rules = axis_rules() if rules is None else rules
    used: set[str] = set()
    out = []
    for dim, name in enumerate(logical):
        if name is not None and name not in rules:
            raise KeyError(
                f"logical axis {name!r} has no rule; known: {sorted(rules)} "
                "(add it with the gin binding axis_rules.rules)"
            )
        axes = _present(mesh, rules.get(name)) if name is not None else None
        if axes is not None:
            tup = (axes,) if isinstance(axes, str) else tuple(axes)
            tup = tuple(a for a in tup if a not in used)
            size = _mesh_axes_size(mesh, tup)
            if not tup or (shape is not None and shape[dim] % size != 0):
                axes = None
            else:
                used.update(tup)
                axes = tup[0] if len(tup) == 1 else tup
        out.append(axes)
    return P(*out)


def tree_specs(axes_tree, shapes_tree, mesh: Mesh, rules=None):
    """Maps a tree of logical-axis tuples (and matching shapes) to PartitionSpecs."""
    return jax.tree.map(
        lambda ax, x: logical_to_spec(ax, x.shape, mesh, rules),
        axes_tree,
        shapes_tree,
        is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x),
    )


def prefix_ensemble(specs, *, axis: str = ENSEMBLE):
    """Prefixes the 'ensemble' mesh axis to every PartitionSpec of a stacked state's specs.

    The stacked state has a leading [M] dimension on every leaf (parameters, optimizer
    moments and counters, step, key); members never communicate inside a step, so that
    dimension is always split over the ensemble axis.
    """
    prefixed = jax.tree.map(lambda s: P(axis, *s), specs, is_leaf=lambda x: isinstance(x, P))
    assert_ensemble_leading(prefixed, axis=axis)
    return prefixed


def stacked_specs(specs, m: int, mesh: Mesh):
    """Specs of a tree of M stacked models ([M, ...] per leaf) built from one model's ``specs``.

    The ONE rule for stacked members and policies read back from disk: the leading [M] dimension is split over
    'ensemble' when the mesh has that axis and its size divides M, else replicated (every other dimension keeps
    the single model's spec). Training states, whose M is checked against the axis, use ``prefix_ensemble``.
    """
    ens = mesh.shape.get(ENSEMBLE)
    lead = ENSEMBLE if ens is not None and m % ens == 0 else None
    return jax.tree.map(lambda s: P(lead, *s), specs, is_leaf=lambda x: isinstance(x, P))


def stack_members(trees: Sequence, mesh: Mesh, specs):
    """M trees of the same structure (one model each, ``specs`` their specs) → one tree [M, ...] per leaf, stacked
    on device straight into ``stacked_specs``' sharding."""
    out = named(mesh, stacked_specs(specs, len(trees), mesh))
    return jax.jit(lambda *ms: jax.tree.map(lambda *xs: jnp.stack(xs), *ms), out_shardings=out)(*trees)


def assert_ensemble_leading(specs, *, axis: str = ENSEMBLE) -> None:
    """Raises if any leaf's spec does not start with the ensemble axis (names the leaf)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))
    for path, spec in flat:
        if not isinstance(spec, P) or len(spec) == 0 or spec[0] != axis:
            raise ValueError(
                f"stacked-state leaf {jax.tree_util.keystr(path)} has spec {spec}; every leaf must lead with {axis!r}"
            )


def named(mesh: Mesh, specs):
    """PartitionSpec tree → NamedSharding tree."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int, *, members: str = "none") -> NamedSharding:
    """Sharding of a batch array.

    members:
      'none'    a single model's batch [B, ...]: B over every data-parallel axis, 'ensemble' included
                (outside the ensemble stage that axis is plain data parallelism);
      'stacked' per-member batches [M, B, ...]: M over 'ensemble', B over the rules' batch axes;
      'shared'  one batch [B, ...] every member sees: B over the batch axes, replicated over 'ensemble'.
    """
    batch_axes = _present(mesh, axis_rules()["batch"])
    batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes or ())
    if members == "none":
        axes = tuple(a for a in (ENSEMBLE, *batch_axes) if a in mesh.shape)
        return NamedSharding(mesh, P(axes or None, *(None,) * (ndim - 1)))
    if members == "shared":
        return NamedSharding(mesh, P(batch_axes or None, *(None,) * (ndim - 1)))
    if members == "stacked":
        ens = ENSEMBLE if ENSEMBLE in mesh.shape else None
        return NamedSharding(mesh, P(ens, batch_axes or None, *(None,) * (ndim - 2)))
    raise ValueError(f"batch_sharding: members must be 'none', 'shared' or 'stacked', got {members!r}")


def batch_shards(sharding_: NamedSharding) -> int:
    """How many ways the leading (batch) dimension of ``sharding_`` is split."""
    axes = sharding_.spec[0] if len(sharding_.spec) else None
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return int(np.prod([sharding_.mesh.shape[a] for a in axes]))


def shard_batch_size(n: int, sharding_: NamedSharding) -> int:
    """``n`` rows rounded down to a multiple of ``sharding_``'s batch shards, at least one row per shard."""
    shards = batch_shards(sharding_)
    return max(shards, n // shards * shards)


def put_global(x: np.ndarray, sharding_: NamedSharding) -> jax.Array:
    """A host array that every process holds in full → a global array with ``sharding_``.

    Each process copies only the slices its own devices address, so this is right for any mesh
    layout (e.g. an ensemble axis that spans processes), not only process-major batch splits.
    """
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding_, lambda idx: x[idx])


def abstract_with_sharding(shapes_tree, shardings_tree):
    """ShapeDtypeStructs that carry their target sharding (for Orbax restore / jit init)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes_tree, shardings_tree)
