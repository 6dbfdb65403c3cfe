"""Checkpoints on Orbax's public API: the manifest's layout record matches what Orbax wrote (direct reads
equal `Checkpointer.restore` bit for bit), a record that does not match is refused and the merge falls
back to Orbax, uncompressed chunks really are, partial restores are verified, and checkpoints written by
the earlier writer (StandardCheckpointHandler, compressed, no layout record) still restore."""

from __future__ import annotations

import gc
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from jax.sharding import NamedSharding, PartitionSpec as P

from tests.test_checkpoints import abstract, host
from warm_jax import checkpoint_averaging, checkpoints, params_io, runtime
from warm_jax.checkpoints import CheckpointCorruptError, CheckpointError, Checkpointer, DirectReadUnsupported
from warm_jax.models import transformer as tr

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

AUTO2 = (jax.sharding.AxisType.Auto,) * 2
CFG = tr.ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, max_len=16)


@pytest.fixture(scope="module", autouse=True)
def _collect_orphaned_reads():
    yield
    gc.collect()


@pytest.fixture(scope="module")
def state():
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=AUTO2)
    k1, k2 = jax.random.split(jax.random.key(1))
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    return {
        "params": {
            "layers": [{"w": put(jax.random.normal(k1, (2, 8, 16)), P("data", None, "model"))}],  # [M, D, F]
            "b": put(jax.random.normal(k2, (2, 16)).astype(jnp.bfloat16), P("data", "model")),  # [M, F]
        },
        "opt": {"count": put(jnp.array([3, 3], jnp.int32), P("data")), "mu": jnp.ones((4, 3), jnp.float32)},
        "step": jnp.int32(7),
        "key": jax.random.key(0),
    }


def manifest_file(step_dir):
    return step_dir / "manifest" / "manifest.process-0.json"


def edit_manifest(step_dir, change):
    m = json.loads(manifest_file(step_dir).read_text())
    change(m)
    manifest_file(step_dir).write_text(json.dumps(m))


class _UncompressedStandardHandler(ocp.handlers.StandardCheckpointHandler):
    """The earlier writer's uncompressed state handler was a subclass of this name, which the step's
    metadata records; it no longer exists in warm_jax (here it compresses: the name is what matters)."""


def legacy_save(directory, step, state, handler_cls=ocp.handlers.StandardCheckpointHandler):
    """A step as the writer before the public-API change wrote it: StandardSave and a manifest without
    the layout record."""
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    handler = handler_cls()
    registry.add("state", ocp.args.StandardSave, handler)
    registry.add("state", ocp.args.StandardRestore, handler)
    registry.add("manifest", ocp.args.JsonSave, ocp.handlers.JsonCheckpointHandler("manifest.process-0.json"))
    manifest = {
        "version": 1,
        "step": step,
        "process_index": 0,
        "process_count": 1,
        "leaves": checkpoints.leaf_hashes(state),
    }
    with ocp.CheckpointManager(directory, handler_registry=registry) as mgr:
        mgr.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), manifest=ocp.args.JsonSave(manifest)),
            force=True,
        )
        mgr.wait_until_finished()


@pytest.mark.parametrize("compress", [True, False])
def test_layout_record_locates_every_array_bitwise(tmp_path, state, compress):
    """The record lists every array but the typed PRNG key; what TensorStore reads where the record
    says equals Orbax's restore bit for bit. Fails when Orbax names or stores arrays differently."""
    with Checkpointer(tmp_path, async_save=False, compress=compress) as ckpt:
        ckpt.save(0, state, force=True)
        restored, _, _ = ckpt.restore(abstract(state))
    record = json.loads(manifest_file(tmp_path / "0").read_text())["layout"]
    named = dict(checkpoints.named_leaves(state))
    assert set(record["arrays"]) == set(named) - {"key"}
    assert record["arrays"]["params/layers/0/w"] == "params.layers.0.w"
    buffers = {p: checkpoints.aligned_empty(named[p].shape, named[p].dtype) for p in record["arrays"]}
    checkpoints.read_state_into(tmp_path / "0", buffers)
    checkpoints.check_buffers(tmp_path / "0", buffers)
    for p, x in checkpoints.named_leaves(restored):
        assert host(x).tobytes() == host(named[p]).tobytes(), p
        if p in buffers:
            assert buffers[p].tobytes() == host(x).tobytes(), p
    # The chunks are compressed exactly when asked (what motivated turning it off: restore speed).
    spec = {
        "driver": "zarr",
        "kvstore": {"driver": "ocdbt", "base": f"file://{tmp_path}/0/state/", "path": "params.b/"},
    }
    compressor = ts.open(spec).result().spec().to_json()["metadata"]["compressor"]
    assert (compressor is not None) == compress


def test_a_record_that_does_not_match_is_refused(tmp_path, state):
    with Checkpointer(tmp_path, async_save=False, compress=False) as ckpt:
        ckpt.save(0, state, force=True)
    step_dir = tmp_path / "0"
    buffers = {"params/b": checkpoints.aligned_empty((2, 16), jnp.bfloat16)}

    def rename(m):  # what an Orbax that names arrays differently would leave: the record points nowhere
        m["layout"]["arrays"]["params/b"] = "params/b"

    edit_manifest(step_dir, rename)
    with pytest.raises(DirectReadUnsupported, match=r"\['params/b'\] are not where the manifest's 'layout' record"):
        checkpoints.read_state_into(step_dir, buffers)
    edit_manifest(step_dir, lambda m: m["layout"].update(format="ocdbt/zarr2/v0"))
    with pytest.raises(DirectReadUnsupported, match="no 'layout' record of format"):
        checkpoints.read_state_into(step_dir, buffers)
    with Checkpointer(tmp_path, read_only=True) as ckpt:  # Orbax still restores it
        assert host(ckpt.restore(abstract(state))[0]["params"]["b"]).tobytes() == host(state["params"]["b"]).tobytes()


def test_merge_falls_back_to_orbax_when_the_record_does_not_match(tmp_path, monkeypatch):
    mesh = runtime.make_mesh({"data": 1}, devices=jax.devices()[:1])
    dirs = []
    for s in range(2):
        d = str(tmp_path / str(s))
        params_io.save_params(d, tr.init_params(CFG, jax.random.key(s)), model_cfg=CFG, meta={}, tokenizer_dir=None)
        dirs.append(d)
    _, _, direct, _ = checkpoint_averaging.average_checkpoints(dirs, mesh=mesh)
    edit_manifest(tmp_path / "1" / "ckpt" / "0", lambda m: m["layout"]["arrays"].update({"params/embed": "nowhere"}))
    restores = []
    real = checkpoint_averaging._restore_member
    monkeypatch.setattr(checkpoint_averaging, "_restore_member", lambda d, t: restores.append(d) or real(d, t))
    _, _, fallback, _ = checkpoint_averaging.average_checkpoints(dirs, mesh=mesh)
    assert restores == [dirs[1]]
    a, b = dict(checkpoints.named_leaves(direct)), dict(checkpoints.named_leaves(fallback))
    assert all(np.asarray(a[p]).tobytes() == np.asarray(b[p]).tobytes() for p in a)


def test_restore_partial_reads_and_verifies_only_the_part(tmp_path, state):
    with Checkpointer(tmp_path, async_save=False, compress=False) as ckpt:
        ckpt.save(0, state, force=True)
        part, step = ckpt.restore_partial({"params": abstract(state["params"])})
        assert step == 0 and set(part) == {"params"}
        for p, x in checkpoints.named_leaves(part["params"]):
            assert host(x).tobytes() == host(dict(checkpoints.named_leaves(state["params"]))[p]).tobytes()
        assert part["params"]["b"].sharding == state["params"]["b"].sharding
        with pytest.raises(CheckpointError, match=r"missing from the checkpoint \['params/nope'\]"):
            ckpt.restore_partial({"params": {"nope": abstract(state["params"]["b"])}})

    def corrupt(name):  # valid bytes that the manifest does not match
        kvstore = {"driver": "ocdbt", "base": f"file://{tmp_path}/0/state/", "path": f"{name}/"}
        t = ts.open({"driver": "zarr", "kvstore": kvstore}).result()
        t[0] = t[0].read().result() + 1

    corrupt("opt.count")  # not read by a restore of the params
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        ckpt.restore_partial({"params": abstract(state["params"])}, step=0)
        corrupt("params.b")
        with pytest.raises(CheckpointCorruptError, match=rf"{tmp_path}/0: array 'params/b' does not match"):
            ckpt.restore_partial({"params": abstract(state["params"])}, step=0)


@pytest.mark.parametrize("handler_cls", [ocp.handlers.StandardCheckpointHandler, _UncompressedStandardHandler])
def test_checkpoints_of_the_earlier_writer_restore(tmp_path, state, handler_cls):
    """StandardCheckpointHandler or a subclass gone since (no layout record): full and partial
    restores, the saved tree, and direct reads through the record the manifest implies."""
    legacy_save(tmp_path, 3, state, handler_cls)
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        restored, _, step = ckpt.restore(abstract(state))
        assert step == 3
        for (p, x), (_, y) in zip(checkpoints.named_leaves(restored), checkpoints.named_leaves(state)):
            assert host(x).tobytes() == host(y).tobytes(), p
        part, _ = ckpt.restore_partial({"params": abstract(state["params"])})
        assert host(part["params"]["b"]).tobytes() == host(state["params"]["b"]).tobytes()
        saved = ckpt.saved_abstract_state(3)
        shapes = {p: x.shape for p, x in checkpoints.named_leaves(saved)}
        assert shapes.pop("key") == (2,)  # a typed PRNG key is saved as its key data
        assert shapes == {p: x.shape for p, x in checkpoints.named_leaves(state) if p != "key"}
    named = dict(checkpoints.named_leaves(state))
    wanted = [p for p in named if p != "key"]
    buffers = {p: checkpoints.aligned_empty(named[p].shape, named[p].dtype) for p in wanted}
    checkpoints.read_state_into(tmp_path / "3", buffers)
    checkpoints.check_buffers(tmp_path / "3", buffers)
    assert all(buffers[p].tobytes() == host(named[p]).tobytes() for p in wanted)
    with pytest.raises(DirectReadUnsupported, match=r"\['key'\] not in the manifest's 'layout' record"):
        checkpoints.read_state_into(tmp_path / "3", {"key": checkpoints.aligned_empty((2,), np.uint32)})
    # A new save into the same directory writes the new format beside it.
    with Checkpointer(tmp_path, async_save=False, max_to_keep=None) as ckpt:
        ckpt.save(4, state, force=True)
        assert ckpt.all_steps() == [3, 4]
        assert "layout" in json.loads(manifest_file(tmp_path / "4").read_text())
        assert os.path.isdir(tmp_path / "3")
