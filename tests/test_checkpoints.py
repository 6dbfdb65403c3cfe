"""Checkpointer: bitwise round trip on a 2x4 mesh, cross-mesh restore, retention, integrity manifest,
corruption fallback, non-finite refusal, unfinished saves, preemption, and the inspect CLI."""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from warm_jax import checkpoints
from warm_jax.checkpoints import (
    CheckpointCorruptError,
    CheckpointError,
    Checkpointer,
    NonFiniteStateError,
    leaf_hashes,
    tree_sha256,
)

AUTO2 = (jax.sharding.AxisType.Auto,) * 2

# A failed Orbax restore orphans its other read coroutines; Python reports them as "exception ignored"
# when they are collected (the corruption tests cause these on purpose).
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module", autouse=True)
def _collect_orphaned_reads():
    yield
    gc.collect()  # report the orphaned reads (filtered above) here rather than at interpreter exit


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=AUTO2)


@pytest.fixture(scope="module")
def state(mesh):
    """A tiny ensemble-shaped state: leading member axis M=2 sharded over 'data'."""
    k1, k2 = jax.random.split(jax.random.key(1))
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    return {
        "params": {
            "w": put(jax.random.normal(k1, (2, 8, 16)), P("data", None, "model")),  # [M, D, F]
            "b": put(jax.random.normal(k2, (2, 16)).astype(jnp.bfloat16), P("data", "model")),  # [M, F]
        },
        "opt": {"count": put(jnp.array([3, 3], jnp.int32), P("data"))},  # [M]
        "step": jnp.int32(7),
        "key": jax.random.key(0),
    }


def abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def host(x):
    return np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)


def assert_bitwise_equal(a, b):
    la, lb = checkpoints.named_leaves(a), checkpoints.named_leaves(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        assert x.dtype == y.dtype, path
        assert host(x).tobytes() == host(y).tobytes(), path


def overwrite_first_chunk(step_dir, array_name):
    """Writes different (valid, finite) values into one saved array, as a bad disk or a stray writer would."""
    kvstore = {"driver": "ocdbt", "base": f"file://{step_dir}/state/", "path": f"{array_name}/"}
    t = ts.open({"driver": "zarr", "kvstore": kvstore}).result()
    idx = (0,) * (t.ndim - 1) + (slice(0, 2),)
    t[idx] = t[idx].read().result() + 1


def test_round_trip_is_bitwise_with_shardings_data_and_manifest(tmp_path, state):
    ckpt = Checkpointer(tmp_path, save_interval_steps=5)
    data = {"iterator": {"next_index": 42, "seed": 3}}
    assert ckpt.save(10, state, data=data, meta={"stage": "rm"})
    ckpt.wait()
    restored, data_back, step = ckpt.restore(abstract(state))
    assert step == 10 and data_back == data and ckpt.restore_meta() == {"stage": "rm"}
    assert_bitwise_equal(restored, state)
    for (path, x), (_, y) in zip(checkpoints.named_leaves(restored), checkpoints.named_leaves(state)):
        assert x.sharding.is_equivalent_to(y.sharding, x.ndim), path
    assert tree_sha256(restored) == tree_sha256(state)
    manifest = json.loads((tmp_path / "10" / "manifest" / "manifest.process-0.json").read_text())
    assert manifest["leaves"] == leaf_hashes(state)
    assert manifest["leaves"]["params/w"]["shape"] == [2, 8, 16]
    assert manifest["leaves"]["params/b"]["dtype"] == "bfloat16"
    ckpt.close()


def test_restore_onto_other_meshes(tmp_path, state):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, force=True)
    mesh81 = jax.make_mesh((8, 1), ("data", "model"), axis_types=AUTO2)
    one = SingleDeviceSharding(jax.devices()[3])
    targets = {
        "mesh81": jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(
                x.shape, x.dtype, sharding=NamedSharding(mesh81, P(None, "data") if x.ndim == 3 else P())
            ),
            state,
        ),
        "one_device": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), state),
    }
    with Checkpointer(tmp_path) as ckpt:
        for name, target in targets.items():
            restored, data, step = ckpt.restore(target)
            assert step == 1 and data is None, name
            assert_bitwise_equal(restored, state)
            for (path, x), (_, t) in zip(checkpoints.named_leaves(restored), checkpoints.named_leaves(target)):
                assert x.sharding.is_equivalent_to(t.sharding, x.ndim), (name, path)
    assert restored["params"]["w"].sharding.device_set == {jax.devices()[3]}


def test_save_policy_and_retention(tmp_path, state):
    ckpt = Checkpointer(tmp_path, save_interval_steps=2, max_to_keep=2, keep_steps=(2,), async_save=False)
    saved = [s for s in range(1, 11) if ckpt.save(s, state)]
    assert saved == [2, 4, 6, 8, 10]
    ckpt.wait()
    assert ckpt.all_steps() == [2, 8, 10] and ckpt.latest_step() == 10
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["10", "2", "8"]
    assert not ckpt.should_save(10) and not ckpt.should_save(11) and ckpt.should_save(12)
    assert ckpt.save(11, state, force=True) and ckpt.latest_step() == 11
    assert not ckpt.save(11, state, force=True)  # an existing step is never overwritten
    ckpt.close()


def test_overwritten_chunk_is_named_and_restore_falls_back(tmp_path, state, caplog):
    ckpt = Checkpointer(tmp_path, save_interval_steps=1)
    ckpt.save(1, state)
    ckpt.save(2, state, data={"pos": 2})
    ckpt.wait()
    overwrite_first_chunk(tmp_path / "2", "params.w")
    with pytest.raises(CheckpointCorruptError, match=rf"{tmp_path}/2: array 'params/w' does not match"):
        ckpt.restore(abstract(state), step=2)
    with caplog.at_level(logging.WARNING, logger="warm_jax.checkpoints"):
        restored, data, step = ckpt.restore(abstract(state))
    assert step == 1 and data is None
    assert_bitwise_equal(restored, state)
    assert any("step 2" in r.getMessage() and "params/w" in r.getMessage() for r in caplog.records)
    assert ckpt.latest_step() == 1
    # Training resumes from 1 and reaches 2 again: the corrupt copy is replaced, not kept.
    assert ckpt.save(2, state)
    ckpt.wait()
    assert ckpt.restore(abstract(state))[2] == 2
    ckpt.close()


def test_unreadable_chunk_is_named(tmp_path, state):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(3, state, force=True)
    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{tmp_path}/3/state/"}).result()
    kv.delete_range(ts.KvStore.KeyRange("params.w/0.0.0", "params.w/0.0.0\0")).result()
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(CheckpointCorruptError, match=r"/3: cannot read array\(s\) \['params/w'\]"):
            ckpt.restore(abstract(state), step=3)


def test_flipped_bytes_raise_then_fall_back_until_none_left(tmp_path, state):
    ckpt = Checkpointer(tmp_path, save_interval_steps=1)
    ckpt.save(1, state)
    ckpt.save(2, state)
    ckpt.wait()

    def flip(step):
        files = [f for f in (tmp_path / str(step) / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
        assert files
        for f in files:
            raw = bytearray(f.read_bytes())
            raw[len(raw) // 2] ^= 0xFF
            f.write_bytes(bytes(raw))

    flip(2)
    with pytest.raises(CheckpointCorruptError, match=rf"{tmp_path}/2"):
        ckpt.restore(abstract(state), step=2)
    assert ckpt.restore(abstract(state))[2] == 1
    flip(1)
    with pytest.raises(CheckpointCorruptError, match="no step verifies"):
        ckpt.restore(abstract(state))
    ckpt.close()


@pytest.mark.parametrize("compress", [True, False])
def test_direct_read_into_buffers_and_manifest_check(tmp_path, state, compress):
    with Checkpointer(tmp_path, async_save=False, compress=compress) as ckpt:
        ckpt.save(0, state, force=True)
        restored, _, _ = ckpt.restore(abstract(state))
    assert_bitwise_equal(restored, state)
    wanted = ("params/w", "params/b", "opt/count")  # f32, bf16, int32; a subset of the saved arrays
    full = dict(checkpoints.named_leaves(state))
    buffers = {p: checkpoints.aligned_empty(full[p].shape, full[p].dtype) for p in wanted}
    assert all(b.ctypes.data % 64 == 0 for b in buffers.values())
    checkpoints.read_state_into(tmp_path / "0", buffers)
    checkpoints.check_buffers(tmp_path / "0", buffers)
    for p in wanted:
        assert buffers[p].tobytes() == host(full[p]).tobytes(), p
    overwrite_first_chunk(tmp_path / "0", "params.w")
    checkpoints.read_state_into(tmp_path / "0", buffers)  # valid bytes: only the manifest tells
    with pytest.raises(CheckpointCorruptError, match=rf"{tmp_path}/0: array 'params/w' does not match.*xxh3_128"):
        checkpoints.check_buffers(tmp_path / "0", buffers)
    wrong = {"params/w": checkpoints.aligned_empty((3,), np.float32)}
    with pytest.raises(CheckpointCorruptError, match=r"cannot open array\(s\) \['params/w'\]"):
        checkpoints.read_state_into(tmp_path / "0", wrong)


def test_manifests_without_the_fast_digest_are_checked_with_sha256(tmp_path, state):
    """Checkpoints written before xxh3-128 was added (sha256 only) restore, and corruption is still found."""
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(0, state, force=True)
    manifest_file = tmp_path / "0" / "manifest" / "manifest.process-0.json"
    manifest = json.loads(manifest_file.read_text())
    assert all("xxh3_128" in e and "sha256" in e for e in manifest["leaves"].values())
    for e in manifest["leaves"].values():
        del e["xxh3_128"]
    manifest_file.write_text(json.dumps(manifest))
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        assert_bitwise_equal(ckpt.restore(abstract(state))[0], state)
    overwrite_first_chunk(tmp_path / "0", "params.w")
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        with pytest.raises(CheckpointCorruptError, match=r"'params/w' does not match the manifest \(sha256 of"):
            ckpt.restore(abstract(state), step=0)
    buffers = {"params/w": checkpoints.aligned_empty(state["params"]["w"].shape, np.float32)}
    checkpoints.read_state_into(tmp_path / "0", buffers)
    with pytest.raises(CheckpointCorruptError, match=r"'params/w' does not match the manifest \(sha256 of"):
        checkpoints.check_buffers(tmp_path / "0", buffers)


def test_save_with_precomputed_descriptions(tmp_path, state):
    described = checkpoints.describe_leaves(state)
    assert {p: e for p, (e, _) in described.items()} == leaf_hashes(state)
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        with pytest.raises(ValueError, match="leaf paths"):
            ckpt.save(0, state, force=True, described={"params/w": described["params/w"]})
        assert ckpt.save(0, state, force=True, described=described)
        assert_bitwise_equal(ckpt.restore(abstract(state))[0], state)
    entries = leaf_hashes(state["params"])
    assert checkpoints.tree_sha256_of_entries(entries) == tree_sha256(state["params"])
    assert checkpoints.tree_sha256_of_entries(leaf_hashes(state)) is None  # a typed PRNG key leaf


def test_non_finite_or_non_json_state_writes_nothing(tmp_path, state):
    ckpt = Checkpointer(tmp_path, save_interval_steps=1)
    bad = dict(state, params=dict(state["params"], b=state["params"]["b"].at[1, 3].set(jnp.nan)))
    with pytest.raises(NonFiniteStateError, match=r"'params/b'.*NaN or Inf"):
        ckpt.save(1, bad)
    inf = dict(state, opt={"count": state["opt"]["count"], "nu": jnp.array([1.0, jnp.inf])})
    with pytest.raises(NonFiniteStateError, match="'opt/nu'"):
        ckpt.save(1, inf)
    with pytest.raises(CheckpointError, match="'data' item is not JSON"):
        ckpt.save(1, state, data={"rng": object()})
    ckpt.wait()
    assert ckpt.all_steps() == [] and list(tmp_path.iterdir()) == []
    ckpt.close()


def test_unfinished_save_is_never_latest_and_is_cleaned_up(tmp_path, state):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, force=True)
    # What a save killed mid-write leaves behind: Orbax's temporary step directory.
    tmp = tmp_path / "5.orbax-checkpoint-tmp-1700000000000000"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "_METADATA").write_text("{")
    ckpt = Checkpointer(tmp_path, save_interval_steps=1)
    assert ckpt.all_steps() == [1] and ckpt.latest_step() == 1
    assert ckpt.restore(abstract(state))[2] == 1
    ckpt.save(2, state)
    ckpt.wait()
    assert not tmp.exists() and ckpt.all_steps() == [1, 2]
    ckpt.close()


@pytest.fixture
def sigterm_handler():
    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)
    checkpoints.preemption._PREEMPTION.clear()
    checkpoints.preemption._handler_installed = False


def test_sigterm_triggers_a_finished_preemption_save(tmp_path, state, sigterm_handler):
    ckpt = Checkpointer(tmp_path, save_interval_steps=1000)
    checkpoints.install_sigterm_handler()
    checkpoints.install_sigterm_handler()  # idempotent
    assert not checkpoints.preemption_requested() and not ckpt.reached_preemption(7)
    assert not ckpt.save(7, state)
    os.kill(os.getpid(), signal.SIGTERM)
    assert checkpoints.preemption_requested() and ckpt.reached_preemption(7) and ckpt.should_save(7)
    assert ckpt.save(7, state)
    assert ckpt.all_steps() == [7] and (tmp_path / "7" / "manifest").is_dir()  # final without wait()
    assert not ckpt.should_save(7)
    ckpt.close()


def _run_inspect(*args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, unlike the writer
    return subprocess.run(
        [sys.executable, "-m", "warm_jax.inspect_checkpoint", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_inspect_cli(tmp_path, state):
    with Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
        ckpt.save(4, state, meta={"stage": "pretrain"})
        ckpt.save(5, state)
    out = _run_inspect(str(tmp_path), "--step", "4")
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout)
    assert got["directory"] == str(tmp_path) and got["steps"] == [4, 5] and got["step"] == 4
    assert got["leaves"] == [
        {"path": p, "shape": list(x.shape), "dtype": str(x.dtype)} for p, x in checkpoints.named_leaves(state)
    ]
    assert got["param_count"] == 2 * 8 * 16 + 2 * 16
    assert got["sha256"] == tree_sha256(state) and got["verified"] is True
    assert got["meta"] == {"stage": "pretrain"}

    missing = _run_inspect(str(tmp_path / "nope"))
    assert missing.returncode == 1 and "no such checkpoint directory" in missing.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no finished checkpoint" in _run_inspect(str(empty)).stderr


_WORKER = r"""
import json, os, signal, sys, time
process_id, port, directory = int(sys.argv[1]), sys.argv[2], sys.argv[3]
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
import jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from warm_jax import checkpoints as C

C.install_sigterm_handler()  # leaves SIGTERM to the JAX preemption service
mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
full = np.arange(2 * 8 * 16, dtype=np.float32).reshape(2, 8, 16)
w = jax.make_array_from_callback(full.shape, NamedSharding(mesh, P("data", None, "model")), lambda i: full[i])
state = {"params": {"w": w}, "step": jax.device_put(jnp.int32(3), NamedSharding(mesh, P()))}
target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
out = {"fully_addressable": w.is_fully_addressable}
ckpt = C.Checkpointer(directory, save_interval_steps=1000)
ckpt.save(1, state, data={"pos": 1}, force=True)
restored, data, step = ckpt.restore(target)
out["restored"] = [step, data, C.tree_sha256(restored) == C.tree_sha256(state)]
resharded = dict(target, params={"w": jax.ShapeDtypeStruct(w.shape, w.dtype,
                                                           sharding=NamedSharding(mesh, P(None, "data", "model")))})
out["resharded_equal"] = C.tree_sha256(ckpt.restore(resharded)[0]) == C.tree_sha256(state)
try:
    ckpt.save(2, dict(state, params={"w": w.at[0, 0, 0].set(jnp.nan)}), force=True)
except C.NonFiniteStateError as e:
    out["refused"] = "params/w" in str(e)
for step in range(10, 2000):
    if step == 12 and process_id == 1:
        os.kill(os.getpid(), signal.SIGTERM)
    saved = ckpt.save(step, state)
    if ckpt.reached_preemption(step):
        out["preempted"] = [step, saved, ckpt.all_steps()]
        break
    time.sleep(0.01)
ckpt.close()
print("RESULT " + json.dumps(out), flush=True)
"""


def test_two_processes_save_verify_and_agree_on_preemption(tmp_path):
    from tests import helpers
    from warm_jax import runtime

    port = str(runtime.free_port())
    worker = tmp_path / "worker.py"
    worker.write_text(_WORKER)
    env = helpers.subprocess_env(4)  # PYTHONPATH names the repository: the worker runs from tmp_path
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(i), port, str(tmp_path / "ckpt")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=180) for p in procs]
    results = []
    for p, (stdout, stderr) in zip(procs, outs):
        assert p.returncode == 0, stderr[-3000:]
        results.append(json.loads(stdout.split("RESULT ", 1)[1]))
    for r in results:
        assert r["fully_addressable"] is False
        assert r["restored"] == [1, {"pos": 1}, True] and r["resharded_equal"] and r["refused"]
    # Both processes saw the preemption at the same step and saved that step.
    assert results[0]["preempted"] == results[1]["preempted"]
    step, saved, steps = results[0]["preempted"]
    assert saved and steps == [1, step]
    names = sorted(p.name for p in (tmp_path / "ckpt" / "1" / "manifest").glob("manifest.process-*.json"))
    assert names == ["manifest.process-0.json", "manifest.process-1.json"]
    # A single process (one CPU device) reads and verifies the two-process checkpoint.
    got = json.loads(_run_inspect(str(tmp_path / "ckpt"), "--step", "1").stdout)
    assert got["param_count"] == 2 * 8 * 16 and got["verified"] is True
