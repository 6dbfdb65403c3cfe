"""batched.map_batches: fixed-size batches on the mesh give the unbatched call's outputs, compile once, and read
per host only the rows a process's devices hold."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from warm_jax import batched, runtime, sharding


@pytest.fixture(scope="module")
def mesh():
    return runtime.make_mesh({"ensemble": 2, "data": -1})  # 8 batch shards: ensemble x data


def counted(fn):
    """``fn`` jitted, with the number of times it was traced."""
    traces = []

    def body(*args):
        traces.append(1)
        return fn(*args)

    return jax.jit(body), traces


def row_fn(t, lengths):
    """A row-wise function of tokens [B, T] and lengths [B]: a pytree of outputs with the batch leading."""
    x = t.astype(jnp.float32)
    return {"sum": x.sum(1) * lengths, "pair": (x[:, :2] + 1.0, lengths * 2)}


def test_batches_give_the_unbatched_outputs_with_one_compilation(mesh):
    rng = np.random.default_rng(0)
    for n in (37, 5, 16):  # not a multiple of the batch, fewer rows than one batch, a multiple
        t = rng.integers(0, 50, size=(n, 6)).astype(np.int32)
        lengths = rng.integers(1, 6, size=(n,)).astype(np.float32)
        jitted, traces = counted(row_fn)
        out = batched.map_batches(lambda b, _: jitted(b["t"], b["l"]), {"t": t, "l": lengths}, batch_size=16, mesh=mesh)
        expected = jax.device_get(row_fn(jnp.asarray(t), jnp.asarray(lengths)))
        jax.tree.map(np.testing.assert_array_equal, out, expected)
        assert out["sum"].shape == (n,) and out["pair"][0].shape == (n, 2)
        assert len(traces) == 1, f"N={n}: traced {len(traces)} times"


def test_batch_size_rounds_to_the_batch_shards_and_start_names_each_batch(mesh):
    assert batched.batch_rows(20, mesh) == 16 and batched.batch_rows(3, mesh) == 8
    starts = []

    def fn(b, start):
        starts.append(start)
        return b["x"] + 0

    out = batched.map_batches(fn, {"x": np.arange(40)}, batch_size=20, mesh=mesh)
    np.testing.assert_array_equal(out, np.arange(40))
    assert starts == [0, 16, 32]


def test_ensemble_outputs_with_the_batch_on_axis_one(mesh):
    x = np.arange(13, dtype=np.float32)
    w = jnp.asarray([1.0, 2.0, 3.0])
    fn = jax.jit(jax.vmap(lambda wi, v: wi * v, in_axes=(0, None)))
    out = batched.map_batches(lambda b, _: fn(w, b), x, batch_size=8, mesh=mesh, out_axis=1)
    np.testing.assert_array_equal(out, np.asarray(w)[:, None] * x[None])


def test_zero_rows_give_empty_outputs_without_running(mesh):
    calls = []

    def fn(b, _):
        calls.append(1)
        return row_fn(b["t"], b["l"])

    out = batched.map_batches(
        fn, {"t": np.zeros((0, 6), np.int32), "l": np.zeros((0,), np.float32)}, batch_size=8, mesh=mesh
    )
    assert out["sum"].shape == (0,) and out["pair"][0].shape == (0, 2) and out["pair"][1].dtype == np.float32
    assert calls == [1]  # traced once for the shapes (jax.eval_shape), never run on data
    assert batched.process_rows(0, 8, mesh).shape == (0,)


def test_bad_inputs_are_refused_clearly(mesh):
    with pytest.raises(ValueError, match="same leading"):
        batched.map_batches(lambda b, _: b, {"a": np.zeros(3), "b": np.zeros(4)}, batch_size=8, mesh=mesh)
    with pytest.raises(ValueError, match="num_rows"):
        batched.map_batches(lambda b, _: b, np.zeros(3), batch_size=8, mesh=mesh, rows=np.arange(3))
    with pytest.raises(ValueError, match="not among"):
        batched.map_batches(lambda b, _: b, np.zeros(3), batch_size=8, mesh=mesh, rows=np.arange(3), num_rows=12)
    with pytest.raises(ValueError, match="at least 1"):
        batched.batch_rows(0, mesh)


def test_process_rows_split_every_batch_between_processes(mesh):
    """Two simulated processes of 4 devices each: each reads half of every batch (plus row N − 1 for the padding),
    together every row; a single process (all 8 devices) reads everything."""
    n, b = 37, 16
    devices = sorted(mesh.devices.flat, key=lambda d: d.id)
    halves = [batched.process_rows(n, b, mesh, devices[:4]), batched.process_rows(n, b, mesh, devices[4:])]
    assert set(halves[0]) | set(halves[1]) == set(range(n))
    full_batches = n // b * b
    for h in halves:
        assert np.sum(h < full_batches) == full_batches // 2
    # The last batch: 5 real rows, all on the first process's devices; the second holds only padding (row 36).
    np.testing.assert_array_equal(halves[0][halves[0] >= full_batches], [32, 33, 34, 35, 36])
    np.testing.assert_array_equal(halves[1][halves[1] >= full_batches], [36])
    np.testing.assert_array_equal(batched.process_rows(n, b, mesh), np.arange(n))
    # Passing only the process's rows gives the same outputs as passing all of them.
    x = np.arange(n, dtype=np.float32) * 3
    rows = batched.process_rows(n, b, mesh)
    same = batched.map_batches(lambda t, _: t * 2, x[rows], batch_size=b, mesh=mesh, rows=rows, num_rows=n)
    np.testing.assert_array_equal(same, x * 2)


def test_outputs_reach_the_host_from_a_sharded_mesh(mesh):
    sh = sharding.batch_sharding(mesh, 2)
    x = np.arange(24, dtype=np.float32).reshape(12, 2)
    out = batched.map_batches(lambda t, _: jax.jit(lambda v: v * 2, out_shardings=sh)(t), x, batch_size=8, mesh=mesh)
    assert isinstance(out, np.ndarray)
    np.testing.assert_array_equal(out, x * 2)


def test_a_batch_every_member_sees_is_split_over_the_batch_axes_only(mesh):
    assert batched.batch_rows(20, mesh, "shared") == 20  # 4 batch shards ('data'); 'ensemble' holds copies
    assert batched.batch_rows(20, mesh) == 16  # 8: 'ensemble' x 'data'
    x = np.arange(10, dtype=np.float32)
    out = batched.map_batches(lambda t, _: t + 1, x, batch_size=4, mesh=mesh, members="shared")
    np.testing.assert_array_equal(out, x + 1)
    with pytest.raises(ValueError, match="members must be one of"):
        batched.batch_rows(8, mesh, "stacked")
