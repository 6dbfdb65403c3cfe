"""Weight averaging: exactness, equality with numpy, mesh independence, mismatches, atomic output."""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts

from warm_jax import average, averaging, checkpoint_averaging, checkpoints, io_utils, params_io, runtime, sharding
from warm_jax.models import transformer as tr
from warm_jax.train_state import TrainState

from tests.helpers import REPO, subprocess_env

CFG = tr.ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, max_len=16)


def _host(tree):
    return {p: np.asarray(x) for p, x in checkpoints.named_leaves(tree)}


def _save(directory, params, cfg=CFG):
    params_io.save_params(
        str(directory), params, model_cfg=cfg, meta={"member": os.path.basename(str(directory))}, tokenizer_dir=None
    )
    return str(directory)


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Three different members and two copies of the first: (dirs, host params per dir)."""
    root = tmp_path_factory.mktemp("members")
    params = [tr.init_params(CFG, jax.random.key(s)) for s in range(3)]
    dirs = [_save(root / str(i), p) for i, p in enumerate(params)]
    copies = [_save(root / f"copy{i}", params[0]) for i in range(2)]
    return dirs, copies, [_host(p) for p in params]


@pytest.fixture(scope="module")
def mesh8():
    return runtime.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


@pytest.fixture(scope="module")
def mesh1():
    return runtime.make_mesh({"data": 1}, devices=jax.devices()[:1])


def _specs(mesh, cfg=CFG):
    _, abstract, axes = tr.abstract_model(cfg)
    return sharding.tree_specs(axes, abstract, mesh)


# ----------------------------------------------------------------------------- exactness


def test_identical_members_average_bitwise(members, mesh8):
    dirs, copies, host = members
    _, _, params, info = checkpoint_averaging.average_checkpoints([dirs[0], *copies], mesh=mesh8)
    got = _host(params)
    assert set(got) == set(host[0])
    for path, want in host[0].items():
        np.testing.assert_array_equal(got[path], want, err_msg=path)  # bitwise, 3 copies (1/3 is inexact)
    assert len(set(info["hashes"].values())) == 1
    # The stacked mean is exact too, with uniform and with uneven weights.
    stacked = jax.tree.map(lambda x: jnp.stack([x] * 3), params)
    for w in (None, jnp.asarray([0.2, 0.5, 0.3])):
        out = _host(averaging.mean_stacked(stacked, w))
        for path, want in host[0].items():
            np.testing.assert_array_equal(out[path], want, err_msg=path)


def test_streaming_average_equals_numpy_mean(members, mesh8):
    dirs, _, host = members
    _, _, params, info = checkpoint_averaging.average_checkpoints(dirs, mesh=mesh8)
    got = _host(params)
    for path in host[0]:
        want = np.mean([h[path].astype(np.float64) for h in host], axis=0)
        np.testing.assert_allclose(got[path], want, rtol=1e-6, atol=1e-7, err_msg=path)
        assert got[path].dtype == host[0][path].dtype
    # Shardings are the rules' single-member shardings on the mesh.
    want_sh = sharding.named(mesh8, _specs(mesh8))
    for (p, x), (_, s) in zip(checkpoints.named_leaves(params), checkpoints.named_leaves(want_sh)):
        assert x.sharding.is_equivalent_to(s, x.ndim), p
    # Weighted; a zero-weight member is not even read (no hash recorded for it).
    _, _, params_w, info_w = checkpoint_averaging.average_checkpoints(dirs, mesh=mesh8, weights=[1.0, 3.0, 0.0])
    got = _host(params_w)
    for path in host[0]:
        want = 0.25 * host[0][path].astype(np.float64) + 0.75 * host[1][path]
        np.testing.assert_allclose(got[path], want, rtol=1e-6, atol=1e-7, err_msg=path)
    assert info_w["weights"] == [0.25, 0.75, 0.0] and set(info_w["hashes"]) == set(dirs[:2])


def test_member_hash_from_manifest_equals_tree_sha256(members, mesh8):
    dirs, _, _ = members
    _, _, _, info = checkpoint_averaging.average_checkpoints(dirs[:1], mesh=mesh8)
    _, _, p, _ = params_io.load_params_checkpoint(dirs[0], mesh8)
    assert info["hashes"][dirs[0]] == checkpoints.tree_sha256(p)


@pytest.mark.parametrize("mesh_name", ["mesh8", "mesh1"])  # per-leaf folds; packed folds on one CPU device
# One group; or several, and leaves larger than a group (folded window by window when packed).
@pytest.mark.parametrize("chunk_bytes", [checkpoint_averaging.CHUNK_BYTES, 6000])
def test_direct_read_pipeline_equals_orbax_restores_bitwise(members, mesh_name, chunk_bytes, request, monkeypatch):
    """The default path (direct reads, a group of leaves at a time, into two reused buffers, the next
    group read while one is folded) gives the same bits as restoring every member through Orbax
    one after the other."""
    dirs, _, _ = members
    mesh = request.getfixturevalue(mesh_name)
    folded = []  # per group folded in: which accumulator took it
    for cls in (checkpoint_averaging._PackedFold, checkpoint_averaging._LeafFold):
        monkeypatch.setattr(cls, "fold", lambda self, *a, f=cls.fold: folded.append(type(self).__name__) or f(self, *a))
    _, _, fast, info = checkpoint_averaging.average_checkpoints(
        dirs, mesh=mesh, weights=[1.0, 2.0, 3.0], chunk_bytes=chunk_bytes
    )
    leaves = jax.tree.leaves(fast)
    groups = checkpoint_averaging._leaf_groups(leaves, chunk_bytes)
    assert (len(groups) > 2) == (chunk_bytes < checkpoint_averaging.CHUNK_BYTES)
    assert folded == ["_PackedFold" if mesh_name == "mesh1" else "_LeafFold"] * len(groups) * len(dirs)

    def unsupported(step_dir, specs):
        raise checkpoints.DirectReadUnsupported("test")

    monkeypatch.setattr(checkpoints, "StateReader", unsupported)
    _, _, slow, info_slow = checkpoint_averaging.average_checkpoints(
        dirs, mesh=mesh, weights=[1.0, 2.0, 3.0], chunk_bytes=chunk_bytes
    )
    a, b = _host(fast), _host(slow)
    assert set(a) == set(b)
    for path in a:
        assert a[path].tobytes() == b[path].tobytes(), path
    assert info["hashes"] == info_slow["hashes"]


def test_group_buffers_hold_groups_not_members():
    """Groups are consecutive leaves of at most chunk_bytes (64-byte aligned), a larger leaf alone."""
    leaves = [jax.ShapeDtypeStruct(s, jnp.float32) for s in [(10,), (30, 4), (7,), (1000,), (3,)]]
    groups = checkpoint_averaging._leaf_groups(leaves, 1024)
    assert [(g.start, g.stop) for g in groups] == [(0, 3), (3, 4), (4, 5)]
    assert groups[0].offsets == (0, 64, 576) and groups[0].nbytes == 640 and groups[1].nbytes == 4032
    buf = checkpoints.aligned_empty((4032,), np.uint8)
    views = checkpoint_averaging._leaf_views(buf, groups[0], leaves)
    assert [v.shape for v in views] == [(10,), (30, 4), (7,)] and all(v.ctypes.data % 64 == 0 for v in views)


def test_bf16_members_average_on_one_device(tmp_path, mesh1):
    cfg = dataclasses.replace(CFG, param_dtype="bfloat16")
    params = [tr.init_params(cfg, jax.random.key(s)) for s in range(2)]
    dirs = [_save(tmp_path / str(i), p, cfg) for i, p in enumerate(params)]
    _, _, merged, _ = checkpoint_averaging.average_checkpoints(dirs, mesh=mesh1)
    got, host = _host(merged), [_host(p) for p in params]
    for path, x in got.items():
        assert x.dtype == host[0][path].dtype, path
        want = (host[0][path].astype(np.float32) + host[1][path].astype(np.float32)) / 2
        np.testing.assert_allclose(x.astype(np.float32), want, rtol=1e-2, atol=1e-3, err_msg=path)


def _corrupt_copy(src, dst, array="params.embed"):
    """A copy of member ``src`` whose array has other (valid, finite) values than its manifest says."""
    shutil.copytree(src, dst)
    kvstore = {"driver": "ocdbt", "base": f"file://{dst}/ckpt/0/state/", "path": f"{array}/"}
    t = ts.open({"driver": "zarr", "kvstore": kvstore}).result()
    t[0, 0:2] = t[0, 0:2].read().result() + 1
    return str(dst)


# The Orbax fallback's failed read orphans its other read coroutines (as in test_checkpoints).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_member_is_named(members, tmp_path, mesh1):
    dirs, _, _ = members
    bad = _corrupt_copy(dirs[1], tmp_path / "bad")
    with pytest.raises(checkpoints.CheckpointCorruptError, match=rf"{bad}/ckpt/0: array 'params/embed' does not match"):
        checkpoint_averaging.average_checkpoints([dirs[0], bad, dirs[2]], mesh=mesh1)
    # Found in a later group, after part of the member was folded in: still named, nothing returned.
    late = _corrupt_copy(dirs[1], tmp_path / "late", array="params.layer_0.mlp.w_up")
    with pytest.raises(checkpoints.CheckpointCorruptError, match=rf"{late}/ckpt/0: array 'params/layer_0/mlp/w_up'"):
        checkpoint_averaging.average_checkpoints([dirs[0], late], mesh=mesh1, chunk_bytes=20_000)
    # An unreadable chunk is named too.
    gone = tmp_path / "gone"
    shutil.copytree(dirs[0], gone)
    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{gone}/ckpt/0/state/"}).result()
    kv.delete_range(ts.KvStore.KeyRange("params.embed/0.0", "params.embed/0.0\0")).result()
    with pytest.raises(checkpoints.CheckpointCorruptError, match=rf"{gone}/ckpt.*params/embed"):
        checkpoint_averaging.average_checkpoints([dirs[0], str(gone)], mesh=mesh1)
    gc.collect()  # report the orphaned reads here (filtered above)


def test_mean_stacked_numpy_ensemble_sharding_and_bf16():
    mesh = runtime.make_mesh({"ensemble": 2, "data": 2, "tensor": 2})
    specs = _specs(mesh)
    single = sharding.named(mesh, specs)
    stacked_sh = sharding.named(mesh, sharding.prefix_ensemble(specs))
    host = [jax.device_get(tr.init_params(CFG, jax.random.key(s))) for s in range(4)]
    stacked = jax.device_put(jax.tree.map(lambda *xs: np.stack(xs), *host), stacked_sh)
    w = np.asarray([0.1, 0.0, 0.6, 0.3])
    out = averaging.mean_stacked(stacked, jnp.asarray(w), out_shardings=single)
    for (p, x), (_, s) in zip(checkpoints.named_leaves(out), checkpoints.named_leaves(single)):
        assert x.sharding.is_equivalent_to(s, x.ndim), p
        want = np.tensordot(w, np.stack([dict(checkpoints.named_leaves(h))[p] for h in host]).astype(np.float64), 1)
        np.testing.assert_allclose(np.asarray(x), want, rtol=1e-6, atol=1e-7, err_msg=p)
    # bfloat16 members: float32 accumulation, one rounding at the end (within one bf16 ulp).
    bf = jax.tree.map(lambda x: x.astype(jnp.bfloat16), stacked)
    out_bf = averaging.mean_stacked(bf)
    for (p, x), (_, xs) in zip(checkpoints.named_leaves(out_bf), checkpoints.named_leaves(bf)):
        assert x.dtype == jnp.bfloat16 and x.sharding.is_equivalent_to(
            dict(checkpoints.named_leaves(single))[p], x.ndim
        ), p
        want = np.mean(np.asarray(xs, np.float32), axis=0)
        np.testing.assert_allclose(np.asarray(x, np.float32), want, rtol=2**-8, atol=1e-6, err_msg=p)


def test_same_result_on_1_or_8_devices(members, mesh1, mesh8):
    dirs, _, _ = members
    one = _host(checkpoint_averaging.average_checkpoints(dirs, mesh=mesh1, weights=[0.2, 0.3, 0.5])[2])
    eight = checkpoint_averaging.average_checkpoints(dirs, mesh=mesh8, weights=[0.2, 0.3, 0.5])[2]
    assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated for x in jax.tree.leaves(eight))
    for path, x in _host(eight).items():
        np.testing.assert_array_equal(x, one[path], err_msg=path)


# ----------------------------------------------------------------------------- mismatches


def test_check_compatible_names_first_mismatching_leaf():
    a = {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32), "z": jax.ShapeDtypeStruct((1,), jnp.float32)}
    averaging.check_compatible({"a": a, "b": dict(a)})
    with pytest.raises(averaging.MergeError, match=r"leaf 'w' differs: a has float32\[2, 3\], b has float32\[3, 3\]"):
        averaging.check_compatible({"a": a, "b": {**a, "w": jax.ShapeDtypeStruct((3, 3), jnp.float32)}})
    with pytest.raises(averaging.MergeError, match=r"leaf 'z' differs: a has float32\[1\], b has bfloat16\[1\]"):
        averaging.check_compatible({"a": a, "b": {**a, "z": jax.ShapeDtypeStruct((1,), jnp.bfloat16)}})
    with pytest.raises(averaging.MergeError, match=r"leaf 'y' is in b .* but not in a"):
        averaging.check_compatible({"a": a, "b": {**a, "y": jax.ShapeDtypeStruct((1,), jnp.float32)}})


@pytest.mark.parametrize(
    "change,leaf",
    [
        ({"d_ff": 48}, r"layer_0/mlp/w_down' differs: .* float32\[64, 32\], .* float32\[48, 32\]"),
        ({"param_dtype": "bfloat16"}, r"leaf 'embed' differs: .* float32\[64, 32\], .* bfloat16\[64, 32\]"),
    ],
)
def test_cli_mismatch_fails_without_output(members, tmp_path, capsys, change, leaf):
    dirs, _, _ = members
    cfg = dataclasses.replace(CFG, **change)
    odd = _save(tmp_path / "odd", tr.init_params(cfg, jax.random.key(9)), cfg)
    out = tmp_path / "merged"
    rc = average.main([f"--checkpoint={dirs[0]}", f"--checkpoint={odd}", f"--output={out}"])
    assert rc == 1
    assert re.search(leaf, capsys.readouterr().err)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["odd"]


# ----------------------------------------------------------------------------- output


def test_cli_writes_merged_checkpoint_with_metadata(members, tmp_path, mesh8, capsys):
    dirs, _, host = members
    out = tmp_path / "merged"
    assert average.main([*(f"--checkpoint={d}" for d in dirs[:2]), "--weights=1,3", f"--output={out}"]) == 0
    summary = json.loads(capsys.readouterr().out)
    cfg, _, params, meta = params_io.load_params_checkpoint(str(out), mesh8)
    assert cfg == CFG
    merge = meta["merge"]
    assert merge["members"] == dirs[:2] and merge["weights"] == [0.25, 0.75]
    assert merge["sha256"] == summary["sha256"] == checkpoints.tree_sha256(params)
    assert set(merge["member_sha256"]) == set(dirs[:2])
    for path, x in _host(params).items():
        np.testing.assert_allclose(x, 0.25 * host[0][path] + 0.75 * host[1][path], rtol=1e-6, atol=1e-7)
    # An existing output is not replaced without --overwrite.
    assert average.main([f"--checkpoint={dirs[0]}", f"--output={out}"]) == 1
    assert "already exists" in capsys.readouterr().err


def test_cli_top_m_from_accuracies(members, tmp_path, capsys):
    dirs, _, _ = members
    acc = tmp_path / "acc.json"
    io_utils.atomic_write_json(str(acc), {"0": {"validation": 0.6}, "1": {"validation": 0.8}, "2": {"validation": 0.7}})
    out = tmp_path / "top2"
    args = [*(f"--checkpoint={d}" for d in dirs), f"--accuracies={acc}", "--top_m=2", f"--output={out}"]
    assert average.main(args) == 0
    meta = io_utils.read_json(str(out / "model.json"))["merge"]
    assert meta["members"] == [dirs[1], dirs[2]] and meta["accuracies"] == {"0": 0.6, "1": 0.8, "2": 0.7}


# The corrupt-array case orphans the failed Orbax restore's other read coroutines (reported when collected).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_cli_stacked_checkpoint_members(members, tmp_path, mesh8, capsys):
    dirs, _, host = members
    # A stacked training state as the rm_ensemble stage saves it: [M] on every leaf.
    mesh = runtime.make_mesh({"ensemble": 1, "data": -1})
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[params_io.load_params_checkpoint(d, mesh)[2] for d in dirs])
    state = TrainState(
        step=jnp.zeros((3,), jnp.int32),
        params=stacked,
        opt_state={"mu": jax.tree.map(jnp.zeros_like, stacked)},
        key=jnp.zeros((3, 2), jnp.uint32),
    )
    rm = tmp_path / "w" / "rm"
    with checkpoints.Checkpointer(str(rm / "ckpt"), async_save=False) as ck:
        ck.save(5, state, force=True)
    os.makedirs(rm / "members")
    io_utils.atomic_write_json(str(rm / "members" / "0" / "model.json"), io_utils.read_json(f"{dirs[0]}/model.json"))
    out = tmp_path / "merged"
    assert average.main([f"--checkpoint={rm / 'ckpt'}", "--members=0,2", f"--output={out}"]) == 0
    _, _, params, meta = params_io.load_params_checkpoint(str(out), mesh8)
    assert meta["merge"]["members"] == [f"{rm / 'ckpt'}@5[0]", f"{rm / 'ckpt'}@5[2]"]
    for path, x in _host(params).items():
        np.testing.assert_allclose(x, (host[0][path] + host[2][path].astype(np.float64)) / 2, rtol=1e-6, atol=1e-7)
    assert average.main([f"--checkpoint={rm / 'ckpt'}", "--members=0,3", f"--output={tmp_path / 'x'}"]) == 1
    assert "--members=[0, 3]" in capsys.readouterr().err and not (tmp_path / "x").exists()
    # Valid but different bytes in one params array: the manifest check names it, nothing is written.
    kvstore = {"driver": "ocdbt", "base": f"file://{rm / 'ckpt' / '5' / 'state'}/", "path": "params.embed/"}
    t = ts.open({"driver": "zarr", "kvstore": kvstore}).result()
    t[0, 0, :2] = t[0, 0, :2].read().result() + 1
    assert average.main([f"--checkpoint={rm / 'ckpt'}", "--members=0,2", f"--output={tmp_path / 'y'}"]) == 1
    assert "array 'params/embed' does not match the manifest" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_failed_write_leaves_no_output(members, tmp_path, mesh8, monkeypatch):
    dirs, _, _ = members
    _, _, params, info = checkpoint_averaging.average_checkpoints(dirs[:2], mesh=mesh8)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(io_utils, "atomic_write_json", boom)  # after Orbax wrote ckpt/, before model.json
    with pytest.raises(OSError, match="disk full"):
        checkpoint_averaging.write_merged(
            str(tmp_path / "out"),
            params,
            model_cfg=CFG,
            members=dirs[:2],
            weights=[0.5, 0.5],
            accuracies=None,
            hashes=info["hashes"],
            tokenizer_dir=None,
        )
    assert os.listdir(tmp_path) == []


CRASH = """
import os, sys
from warm_jax import average, io_utils
io_utils.atomic_write_json = lambda *a, **k: os._exit(9)  # the process dies mid-write
average.main(sys.argv[1:])
"""


def test_process_killed_during_write_leaves_no_output(members, tmp_path):
    dirs, _, _ = members
    out = tmp_path / "merged"
    proc = subprocess.run(
        [sys.executable, "-c", CRASH, f"--checkpoint={dirs[0]}", f"--checkpoint={dirs[1]}", f"--output={out}"],
        env=subprocess_env(1),
        cwd=REPO,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 9, proc.stderr.decode()[-2000:]
    assert not out.exists()
    assert all(p.name.startswith(".merged.tmp-") for p in tmp_path.iterdir())  # only the temporary remains


# ----------------------------------------------------------------------------- selection and LMC


def test_select_top_m_and_greedy_soup():
    acc = [0.6, 0.8, 0.7, 0.8]
    assert averaging.select_top_m(acc, 3) == [1, 3, 2]
    with pytest.raises(averaging.MergeError):
        averaging.select_top_m(acc, 5)
    # evaluate: accuracy of a soup = a table lookup; member 3 makes it worse, 2 helps.
    table = {(1,): 0.80, (1, 3): 0.78, (1, 2): 0.82, (1, 2, 0): 0.82}
    history = []
    assert averaging.greedy_soup([1, 3, 2, 0], lambda idx: table[tuple(idx)], history=history) == [1, 2, 0]
    assert [k for _, _, k in history] == [True, False, True, True]


def test_barrier_height():
    lam = np.linspace(0, 1, 11)
    assert averaging.barrier_height(lam, 0.7 + 0.1 * lam) == pytest.approx(0.0, abs=1e-12)
    dip = 0.8 - 0.3 * np.sin(np.pi * lam)  # worst at λ = 0.5
    assert averaging.barrier_height(lam, dip) == pytest.approx(0.3)
    assert averaging.barrier_height(lam, 0.8 + 0.05 * np.sin(np.pi * lam)) == pytest.approx(0.0)


def test_interpolation_curve():
    a = {"w": jnp.asarray([1.0, -2.0])}
    b = {"w": jnp.asarray([3.0, 2.0])}
    np.testing.assert_array_equal(averaging.interpolate(a, b, 0.0)["w"], a["w"])
    np.testing.assert_array_equal(averaging.interpolate(a, b, 1.0)["w"], b["w"])
    np.testing.assert_allclose(averaging.interpolate(a, b, 0.25)["w"], [1.5, -1.0])

    def eval_fn(p):  # accuracy dips in the middle: |w[1]| small → worse
        return {"val": {"accuracy": float(abs(p["w"][1])) / 2, "loss": 1.0 - float(abs(p["w"][1])) / 2}}

    def rewards_fn(p):
        return {"val": (np.asarray([p["w"][0]]), np.asarray([p["w"][1]]))}

    def eval_pred_fn(rc, rr):
        return {"accuracy": float(np.mean(rc > rr)), "loss": float(np.mean(np.logaddexp(0, rr - rc)))}

    curve = averaging.interpolation_curve(a, b, eval_fn, rewards_fn=rewards_fn, eval_pred_fn=eval_pred_fn)
    acc = curve["weight"]["val"]["accuracy"]
    assert len(acc) == 11 and acc[0] == 1.0 and acc[5] == 0.0 and acc[10] == 1.0
    assert curve["barrier"]["val"] == pytest.approx(1.0) and curve["loss_barrier"]["val"] == pytest.approx(1.0)
    assert curve["pred"]["val"]["accuracy"] == [1.0] * 11  # r_c − r_r = (1 + 2λ) − (−2 + 4λ) = 3 − 2λ > 0


def test_task_vector_geometry_matches_numpy():
    rng = np.random.default_rng(0)
    init = {"w": rng.normal(size=(5, 3)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}
    stacked = {
        k: np.stack([v + rng.normal(scale=0.1 * (i + 1), size=v.shape) for i in range(3)]) for k, v in init.items()
    }
    stacked["w"][2] = init["w"]  # member 2 moved its bias only
    dist, cos = averaging.task_vector_geometry(jax.tree.map(jnp.asarray, stacked), jax.tree.map(jnp.asarray, init))
    taus = np.stack([np.concatenate([(stacked[k][i] - init[k]).ravel() for k in ("b", "w")]) for i in range(3)])
    norm0 = np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in init.values()))
    np.testing.assert_allclose(dist, np.linalg.norm(taus, axis=1) / norm0, rtol=1e-5)
    unit = taus / np.linalg.norm(taus, axis=1, keepdims=True)
    np.testing.assert_allclose(cos, unit @ unit.T, rtol=1e-5, atol=1e-6)
    assert dist.shape == (3,) and cos.shape == (3, 3)


def test_task_vector_geometry_measures_each_member_from_its_own_init():
    """Baklava members start from different checkpoints: measured from one shared init, a member that never
    moved would look far away."""
    rng = np.random.default_rng(1)
    inits = {"w": rng.normal(size=(3, 4, 2)).astype(np.float32)}
    moves = rng.normal(scale=0.01, size=(3, 4, 2)).astype(np.float32)
    moves[1] = 0.0  # member 1 did not move from its own init
    stacked = {"w": inits["w"] + moves}
    dist, cos = averaging.task_vector_geometry(jax.tree.map(jnp.asarray, stacked), jax.tree.map(jnp.asarray, inits))
    own = np.linalg.norm(moves.reshape(3, -1), axis=1) / np.linalg.norm(inits["w"].reshape(3, -1), axis=1)
    np.testing.assert_allclose(dist, own, rtol=1e-5)
    assert dist[1] == 0.0
    shared, _ = averaging.task_vector_geometry(jax.tree.map(jnp.asarray, stacked), {"w": jnp.asarray(inits["w"][0])})
    assert shared[1] > 20 * dist[0]  # from member 0's init, the unmoved member 1 looks far off
    unit = moves[[0, 2]].reshape(2, -1) / np.linalg.norm(moves[[0, 2]].reshape(2, -1), axis=1, keepdims=True)
    np.testing.assert_allclose(cos[0, 2], unit[0] @ unit[1], rtol=1e-5)
