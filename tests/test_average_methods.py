"""Merge methods on checkpoints: the streamed merge equals merge_stacked, the CLI's --method, --base and
method flags, the metadata it records, and its one-line errors."""

from __future__ import annotations

import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts

from warm_jax import average, checkpoint_averaging, checkpoints, io_utils, merge_methods, params_io, runtime
from warm_jax.models import transformer as tr
from warm_jax.train_state import TrainState

from tests.test_merge_methods import np_merge

CFG = tr.ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, max_len=16)
MESH8 = "--mesh=data=2,fsdp=2,tensor=2"  # the mesh8 fixture's: the CLI reuses the programs compiled for it
METHODS = [
    ("slerp", {}),
    ("task_arithmetic", {"scaling": 0.6}),
    ("ties", {"density": 0.3}),
    ("dare", {"density": 0.5, "scaling": 0.8}),
]


def _host(tree):
    return {p: np.asarray(x) for p, x in checkpoints.named_leaves(tree)}


def _save(directory, params):
    params_io.save_params(str(directory), params, model_cfg=CFG, meta={}, tokenizer_dir=None)
    return str(directory)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A base (the shared init) and three members fine-tuned from it: (base dir, member dirs, host
    base params, host stacked member params)."""
    root = tmp_path_factory.mktemp("merge")
    base = jax.device_get(tr.init_params(CFG, jax.random.key(0)))
    rng = np.random.default_rng(1)
    members = [jax.tree.map(lambda b: b + 0.02 * rng.standard_normal(b.shape).astype(b.dtype), base) for _ in range(3)]
    dirs = [_save(root / f"m{i}", p) for i, p in enumerate(members)]
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *members)
    return _save(root / "init", base), dirs, base, stacked


@pytest.fixture(scope="module")
def mesh8():
    return runtime.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


@pytest.mark.parametrize("method,params", METHODS)
def test_streamed_merge_equals_merge_stacked(ckpts, mesh8, method, params):
    base_dir, dirs, base, stacked = ckpts
    key = jax.random.key(4)
    w = [0.5, 0.2, 0.3]
    # Small groups: several per member, and leaves larger than a group.
    cfg, _, merged, info = checkpoint_averaging.merge_checkpoints(
        dirs, mesh=mesh8, method=method, base=base_dir, weights=w, key=key, params=params, chunk_bytes=6000
    )
    assert cfg == CFG and info["method"] == method and info["base"] == base_dir
    assert info["params"] == merge_methods.get_merge_method(method).resolve_params(params)
    _, _, p0, _ = params_io.load_params_checkpoint(base_dir, mesh8)
    assert info["base_sha256"] == checkpoints.tree_sha256(p0) and set(info["hashes"]) == set(dirs)
    want = _host(merge_methods.merge_stacked(stacked, method=method, base=base, weights=w, key=key, **params))
    got = _host(merged)
    assert set(got) == set(want)
    for path in got:
        assert got[path].dtype == want[path].dtype, path
        np.testing.assert_allclose(got[path], want[path], rtol=1e-6, atol=1e-7, err_msg=path)
    # Placed in the rules' single-member shardings, as a restore on the mesh places them.
    for (p, x), (_, y) in zip(checkpoints.named_leaves(merged), checkpoints.named_leaves(p0)):
        assert x.sharding.is_equivalent_to(y.sharding, x.ndim), p


def test_streamed_merge_on_one_device(ckpts):
    """One CPU device (where linear uses its packed fold): the per-leaf programs still merge alike."""
    base_dir, dirs, base, stacked = ckpts
    mesh1 = runtime.make_mesh({"data": 1}, devices=jax.devices()[:1])
    merged = checkpoint_averaging.merge_checkpoints(dirs, mesh=mesh1, method="slerp", base=base_dir, weights=[1, 2, 3])[
        2
    ]
    want = _host(merge_methods.merge_stacked(stacked, method="slerp", base=base, weights=[1, 2, 3]))
    assert all(x.sharding.device_set == {jax.devices()[0]} for x in jax.tree.leaves(merged))
    for path, x in _host(merged).items():
        np.testing.assert_allclose(x, want[path], rtol=1e-6, atol=1e-7, err_msg=path)


def test_linear_merge_is_the_running_mean(ckpts, mesh8):
    _, dirs, _, _ = ckpts
    _, _, a, info = checkpoint_averaging.merge_checkpoints(dirs, mesh=mesh8, weights=[1.0, 2.0, 1.0])
    _, _, b, _ = checkpoint_averaging.average_checkpoints(dirs, mesh=mesh8, weights=[1.0, 2.0, 1.0])
    assert info["method"] == "linear" and info["base"] is None and info["weights"] == [0.25, 0.5, 0.25]
    for path, x in _host(a).items():
        np.testing.assert_array_equal(x, _host(b)[path])
    with pytest.raises(ValueError, match=r"merge method 'ties' needs a base checkpoint"):
        checkpoint_averaging.merge_checkpoints(dirs, mesh=mesh8, method="ties")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the Orbax fallback's orphans
def test_corrupt_base_is_named(ckpts, tmp_path, mesh8):
    base_dir, dirs, _, _ = ckpts
    bad = tmp_path / "bad_init"
    shutil.copytree(base_dir, bad)
    kvstore = {"driver": "ocdbt", "base": f"file://{bad}/ckpt/0/state/", "path": "params.embed/"}
    t = ts.open({"driver": "zarr", "kvstore": kvstore}).result()
    t[0, 0:2] = t[0, 0:2].read().result() + 1
    with pytest.raises(checkpoints.CheckpointCorruptError, match=rf"{bad}/ckpt/0: array 'params/embed' does not match"):
        checkpoint_averaging.merge_checkpoints(dirs[:2], mesh=mesh8, method="slerp", base=str(bad))


# ----------------------------------------------------------------------------- CLI


def test_cli_slerp_two_members(ckpts, tmp_path, mesh8, capsys):
    base_dir, dirs, _, _ = ckpts
    out = tmp_path / "slerp"
    argv = ["--method=slerp", f"--base={base_dir}", *(f"--checkpoint={d}" for d in dirs[:2]), f"--output={out}"]
    assert average.main([*argv, MESH8]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "slerp" and summary["params"] == {} and "note" not in summary
    cfg, _, params, meta = params_io.load_params_checkpoint(str(out), mesh8)
    merge = meta["merge"]
    assert cfg == CFG and merge["method"] == "slerp" and merge["base"] == base_dir and merge["weights"] == [1.0, 1.0]
    assert merge["base_sha256"] == checkpoints.tree_sha256(params_io.load_params_checkpoint(base_dir, mesh8)[2])
    assert merge["members"] == dirs[:2] and merge["sha256"] == summary["sha256"] == checkpoints.tree_sha256(params)
    # The streamed merge on the same mesh, which equals merge_stacked (test above): the same bits.
    want = _host(checkpoint_averaging.merge_checkpoints(dirs[:2], mesh=mesh8, method="slerp", base=base_dir)[2])
    for path, x in _host(params).items():
        np.testing.assert_array_equal(x, want[path], err_msg=path)
    # Three members: the incremental generalisation, said in the summary.
    out3 = tmp_path / "slerp3"
    argv = ["--method=slerp", f"--base={base_dir}", *(f"--checkpoint={d}" for d in dirs), f"--output={out3}", MESH8]
    assert average.main(argv) == 0
    assert "incremental SLERP" in json.loads(capsys.readouterr().out)["note"]


@pytest.mark.parametrize(
    "flags,method,recorded",
    [  # the parameters of METHODS, so that the streamed merges' programs are compiled already
        (["--method=ties", "--density=0.3"], "ties", {"density": 0.3, "scaling": 1.0}),
        (
            ["--method=dare", "--density=0.5", "--scaling=0.8", "--seed=3"],
            "dare",
            {"density": 0.5, "scaling": 0.8, "seed": 3},
        ),
        (["--method=task_arithmetic", "--scaling=0.6", "--weights=1,2,1"], "task_arithmetic", {"scaling": 0.6}),
    ],
)
def test_cli_methods_record_parameters(ckpts, tmp_path, mesh8, capsys, flags, method, recorded):
    base_dir, dirs, _, _ = ckpts
    out = tmp_path / method
    argv = [*flags, f"--base={base_dir}", *(f"--checkpoint={d}" for d in dirs), f"--output={out}", MESH8]
    assert average.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["params"] == recorded
    _, _, params, meta = params_io.load_params_checkpoint(str(out), mesh8)
    assert meta["merge"]["method"] == method and meta["merge"]["params"] == recorded
    w = [1.0, 2.0, 1.0] if "--weights=1,2,1" in flags else None
    assert meta["merge"]["weights"] == (w or [1.0, 1.0, 1.0])
    kw = {k: v for k, v in recorded.items() if k != "seed"}
    key = jax.random.key(recorded.get("seed", 0))
    want = checkpoint_averaging.merge_checkpoints(
        dirs, mesh=mesh8, method=method, base=base_dir, weights=w, key=key, params=kw
    )[2]
    for path, x in _host(params).items():
        np.testing.assert_array_equal(x, _host(want)[path], err_msg=path)


@pytest.mark.parametrize(
    "flags,error",
    [
        (
            ["--method=soup"],
            r"--method=soup: unknown merge method 'soup'; known: dare, linear, slerp, task_arithmetic, ties",
        ),
        (["--method=slerp"], r"--method=slerp needs --base=DIR"),
        (["--density=0.5"], r"--density=0.5 does not apply to --method=linear \(it takes no parameters\)"),
        (["--method=ties", "--base=BASE", "--density=0"], r"--density=0: .*density=0 must be in \(0, 1\]"),
        (["--method=slerp", "--base=BASE", "--scaling=2"], r"--scaling=2 does not apply to --method=slerp"),
        (["--method=ties", "--base=BASE", "--seed=1"], r"--seed=1 applies to --method=dare only"),
        (["--base=BASE"], r"--base=.*: --method=linear uses no base"),
        (["--method=ties", "--base=TMP"], r"--output=.* and --base=.*: the output lies inside it"),
        (["--method=ties", "--base=NOPE"], r"--base=.*nope: no such directory"),
    ],
)
def test_cli_method_errors_are_one_line(ckpts, tmp_path, capsys, flags, error):
    base_dir, dirs, _, _ = ckpts
    out = tmp_path / "out"
    flags = [
        f.replace("=BASE", f"={base_dir}").replace("=TMP", f"={tmp_path}").replace("=NOPE", f"={tmp_path}/nope")
        for f in flags
    ]
    assert average.main([*flags, *(f"--checkpoint={d}" for d in dirs[:2]), f"--output={out}"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert re.search(error, err), err
    assert not out.exists()


def test_cli_stacked_checkpoint_with_method(ckpts, tmp_path, mesh8, capsys):
    base_dir, dirs, base, stacked = ckpts
    mesh = runtime.make_mesh({"ensemble": 1, "data": -1})
    on_dev = jax.device_put(stacked, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    state = TrainState(
        step=jnp.zeros((3,), jnp.int32),
        params=on_dev,
        opt_state={"mu": jax.tree.map(jnp.zeros_like, on_dev)},
        key=jnp.zeros((3, 2), jnp.uint32),
    )
    rm = tmp_path / "w" / "rm"
    with checkpoints.Checkpointer(str(rm / "ckpt"), async_save=False) as ck:
        ck.save(7, state, force=True)
    os.makedirs(rm / "members")
    io_utils.atomic_write_json(str(rm / "members" / "0" / "model.json"), io_utils.read_json(f"{dirs[0]}/model.json"))
    out = tmp_path / "slerp"
    # Member 1 is left out: weight 0, skipped by the incremental SLERP (which is the pair's SLERP).
    argv = ["--method=slerp", f"--base={base_dir}", f"--checkpoint={rm / 'ckpt'}", "--members=0,2", f"--output={out}"]
    assert average.main(argv) == 0
    _, _, params, meta = params_io.load_params_checkpoint(str(out), mesh8)
    assert meta["merge"]["method"] == "slerp" and meta["merge"]["members"] == [
        f"{rm / 'ckpt'}@7[0]",
        f"{rm / 'ckpt'}@7[2]",
    ]
    pair, flat_base = _host(jax.tree.map(lambda x: x[[0, 2]], stacked)), _host(base)
    for path, x in _host(params).items():
        want = np_merge("slerp", flat_base[path], pair[path], None)
        np.testing.assert_allclose(x, want, rtol=1e-6, atol=1e-7, err_msg=path)
    # Baklava: member 2 fine-tuned from another pretraining checkpoint has no common base with member 0.
    member2 = {**io_utils.read_json(f"{dirs[0]}/model.json"), "featurizer_step": 900}
    io_utils.atomic_write_json(str(rm / "members" / "2" / "model.json"), member2)
    capsys.readouterr()
    assert average.main([*argv[:-1], f"--output={tmp_path / 'mixed'}"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(r"ckpt\[0\]: last, .*ckpt\[2\]: 900", err), err
    assert not (tmp_path / "mixed").exists()


def test_task_vector_methods_refuse_members_from_different_featurizers(ckpts, tmp_path, mesh8, capsys):
    base_dir, dirs, _, stacked = ckpts
    late = jax.tree.map(lambda x: x[1], stacked)
    baklava = str(tmp_path / "m1_900")
    params_io.save_params(baklava, late, model_cfg=CFG, meta={"featurizer_step": 900}, tokenizer_dir=None)
    with pytest.raises(ValueError, match=rf"'ties' subtracts one base .*{dirs[0]}: last, {baklava}: 900"):
        checkpoint_averaging.merge_checkpoints([dirs[0], baklava], mesh=mesh8, method="ties", base=base_dir)
    argv = [f"--checkpoint={dirs[0]}", f"--checkpoint={baklava}", MESH8]
    assert average.main(["--method=task_arithmetic", f"--base={base_dir}", *argv, f"--output={tmp_path / 'ta'}"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "use --method=linear" in err, err
    # The plain average needs no base, so it merges them.
    assert average.main([*argv, f"--output={tmp_path / 'linear'}"]) == 0
