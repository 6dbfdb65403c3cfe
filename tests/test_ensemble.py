"""Stage `rm_ensemble`: one vmapped, sharded step for M members; equivalence; resume; NaN policy."""

import json
import os
import signal

import jax
import numpy as np
import pytest

from tests import helpers
from warm_jax import ensemble, evaluation
from warm_jax.data import pipeline
from warm_jax.metrics import read_metrics

ENS = helpers.TINY + [helpers.MESH_ENS]


@pytest.fixture(scope="module")
def trained(base_workdir, tmp_path_factory):
    """M=4 on a mesh ensemble=2 × data=2 × tensor=2, trained in this process."""
    import shutil

    wd = str(tmp_path_factory.mktemp("ens") / "wd")
    shutil.copytree(base_workdir, wd)
    with helpers.gin_config(ENS):
        ctx = helpers.context(wd)
        cfg = ensemble.EnsembleConfig()
        ens, state = ensemble.train_ensemble(ctx, cfg)
        seeds = ensemble.member_seeds(cfg, ctx.seed)
    return wd, ctx, cfg, ens, state, seeds


def test_every_leaf_is_sharded_with_ensemble_leading(trained):
    _, ctx, cfg, ens, state, _ = trained
    assert dict(ctx.mesh.shape) == {"ensemble": 2, "data": 2, "fsdp": 1, "tensor": 2}
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    assert any("count" in jax.tree_util.keystr(p) for p, _ in flat)  # optimizer counters are in the tree
    for path, x in flat:
        name = jax.tree_util.keystr(path)
        assert x.shape[0] == cfg.num_members, name
        assert x.sharding.spec[0] == "ensemble", f"{name}: {x.sharding.spec}"
        # Within a member the rules table still applies (e.g. attention heads over 'tensor').
    wq = state.params["layer_0"]["attn"]["wq"]
    assert wq.sharding.spec == jax.sharding.PartitionSpec("ensemble", "fsdp", "tensor", None)
    assert wq.sharding.shard_shape(wq.shape)[0] == cfg.num_members // 2


def test_members_differ_and_each_members_loss_fell(trained):
    wd, ctx, cfg, ens, state, _ = trained
    params = state.params
    flat0 = jax.tree.leaves(jax.tree.map(lambda x: np.asarray(x[0]), params))
    for i in range(1, cfg.num_members):
        flat_i = jax.tree.leaves(jax.tree.map(lambda x, i=i: np.asarray(x[i]), params))
        assert any(not np.array_equal(a, b) for a, b in zip(flat0, flat_i)), f"member {i} equals member 0"
    # Train loss over the whole train split: initial (shared LP-FT init) vs final, per member.
    train = evaluation.read_split_rows(os.path.join(wd, "data"), "train", ctx.mesh, 64)
    scorer = evaluation.Scorer(ens.graphdef, ctx.mesh, 64)
    init_rc, init_rr = scorer.pairs(ens.member_inits[0], train)
    rc, rr = scorer.stacked_pairs(params, train)
    init_loss = evaluation.bt_loss(init_rc, init_rr)
    for i in range(cfg.num_members):
        assert evaluation.bt_loss(rc[i], rr[i]) < init_loss - 0.01, i
    rows = read_metrics(wd, "rm_ensemble")
    assert len(rows[-1]["loss"]) == cfg.num_members and len(rows[-1]["learning_rate"]) == cfg.num_members


def test_baklava_members_start_from_their_own_pretraining_checkpoint(base_workdir, tmp_path):
    """EnsembleConfig.featurizer_steps: member 1 starts from the trunk kept at step 10, member 0 from the last,
    both under the one head probed on the last trunk's features."""
    import shutil

    wd = str(tmp_path / "wd")
    shutil.copytree(base_workdir, wd)
    with helpers.gin_config(ENS):
        ctx = helpers.context(wd)
        cfg = ensemble.EnsembleConfig(num_members=2, featurizer_steps=(None, 10), dropout_rates=(0.0,))
        ens = ensemble.build(ctx, cfg, pipeline.load_split(ensemble.dataset_dir(ctx, cfg), "train"))
        trunks = {s: ctx.artefacts.load_trunk(ctx.mesh, step=s).params for s in (None, 10)}
    for i, s in enumerate((None, 10)):
        for name in trunks[s]:
            if name == "reward_head":
                continue
            for a, b, c in zip(*(jax.tree.leaves(t[name]) for t in (ens.state.params, ens.member_inits[i], trunks[s]))):
                np.testing.assert_array_equal(np.asarray(a[i]), np.asarray(c))
                np.testing.assert_array_equal(np.asarray(b), np.asarray(c))
    for a, b in zip(*(jax.tree.leaves(p["reward_head"]) for p in ens.member_inits)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(
        not np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(trunks[None]), jax.tree.leaves(trunks[10]))
    )


def test_member_alone_equals_member_inside_the_ensemble(trained):
    wd, ctx, cfg, ens, state, seeds = trained
    i = 2
    alone_wd = wd + "-alone"
    import shutil

    shutil.copytree(wd, alone_wd, ignore=shutil.ignore_patterns("rm", "metrics", "tensorboard"))
    with helpers.gin_config(helpers.TINY + [helpers.MESH_8]):
        actx = helpers.context(alone_wd)
        acfg = ensemble.EnsembleConfig(
            num_members=1,
            seeds=(seeds[i],),
            learning_rates=(cfg.learning_rates[0],),
            dropout_rates=(cfg.dropout_rates[i],),
        )
        _, alone = ensemble.train_ensemble(actx, acfg)
    # Two programs on two meshes sum in another order, and Adam amplifies round-off where a gradient is near
    # zero, so compare each member's *update* from the shared init, relative to its size: member i alone is
    # member i of the ensemble to round-off, and much closer to it than to any other member.
    init = jax.tree.leaves(jax.tree.map(np.asarray, ens.member_inits[0]))
    alone_update = np.concatenate([(np.asarray(x[0]) - z).ravel() for x, z in zip(jax.tree.leaves(alone.params), init)])
    updates = [
        np.concatenate([(np.asarray(x[j]) - z).ravel() for x, z in zip(jax.tree.leaves(state.params), init)])
        for j in range(cfg.num_members)
    ]
    dist = [np.linalg.norm(alone_update - u) / np.linalg.norm(u) for u in updates]
    assert dist[i] < 1e-3, dist
    assert dist[i] < 0.01 * min(d for j, d in enumerate(dist) if j != i), dist


STAGE = ENS + [helpers.stages("rm_ensemble"), "EnsembleConfig.num_steps = 10"]


@pytest.fixture(scope="module")
def reference_run(base_workdir, tmp_path_factory):
    import shutil

    wd = str(tmp_path_factory.mktemp("ref") / "wd")
    shutil.copytree(base_workdir, wd)
    helpers.run_train(wd, STAGE)
    return helpers.final_state_hash(os.path.join(wd, "rm", "ckpt"))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_interrupted_then_rerun_is_bitwise_equal(reference_run, copy_workdir, sig):
    wd = copy_workdir()
    ckpt = os.path.join(wd, "rm", "ckpt")
    proc = helpers.run_until_then_signal(wd, STAGE, ckpt_dir=ckpt, sig=sig, min_step=4)
    if sig == signal.SIGTERM:
        assert proc.returncode == 0, proc.stderr[-2000:]  # saved at that step and exited cleanly
        assert "preempted" in proc.stderr
    else:
        assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(wd, "rm_ensemble", "DONE.json"))
    helpers.run_train(wd, STAGE)
    assert helpers.final_state_hash(ckpt) == reference_run
    assert sorted(os.listdir(os.path.join(wd, "rm", "members"))) == ["0", "1", "2", "3"]


def test_nan_skip_leaves_state_unchanged(base_workdir, tmp_path):
    import shutil

    results = {}
    for name, extra in [
        ("two", ["EnsembleConfig.num_steps = 2"]),
        ("nan", ["EnsembleConfig.num_steps = 3", "FaultInjection.nan_at_step = 3"]),
    ]:
        wd = str(tmp_path / name)
        shutil.copytree(base_workdir, wd)
        with helpers.gin_config(ENS + extra):
            _, st = ensemble.train_ensemble(helpers.context(wd), ensemble.EnsembleConfig())
        results[name] = jax.device_get((st.params, st.opt_state))
    for x, y in zip(jax.tree.leaves(results["two"]), jax.tree.leaves(results["nan"])):
        np.testing.assert_array_equal(x, y)


def test_nan_abort_exits_nonzero_and_keeps_last_good_checkpoint(copy_workdir):
    wd = copy_workdir()
    proc = helpers.run_train(
        wd, STAGE + ["FaultInjection.nan_at_step = 6", "LoopConfig.nan_policy = 'abort'"], check=False
    )
    assert proc.returncode != 0
    assert "non-finite" in proc.stderr
    step, _ = helpers.final_state_hash(os.path.join(wd, "rm", "ckpt"))  # verifies the manifest too
    assert step == 4


def test_member_slice_takes_one_member_in_the_single_member_layout(trained):
    _, ctx, cfg, ens, state, _ = trained
    for i in (0, cfg.num_members - 1):
        member = ensemble.member_slice(state.params, i, ctx.mesh, ens.param_specs)
        wq = member["layer_0"]["attn"]["wq"]
        assert wq.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
        for a, b in zip(jax.tree.leaves(member), jax.tree.leaves(state.params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b[i]))


def test_subagged_members_record_their_share_of_the_pairs_and_rm_eval_splits_by_it(copy_workdir):
    wd = copy_workdir()
    helpers.run_in_process(
        wd,
        ENS
        + [
            helpers.stages("rm_ensemble", "average", "rm_eval"),
            "EnsembleConfig.num_steps = 4",
            "EnsembleConfig.member_data_fraction = 0.5",
            "EvalConfig.random_orders_per_member = 1",
        ],
    )
    n = len(pipeline.load_split(os.path.join(wd, "data"), "train"))
    record = json.load(open(os.path.join(wd, "rm", "ensemble.json")))
    assert record["member_data_fraction"] == 0.5 and record["train_pairs"] == [n // 2] * 4
    for i in range(4):
        meta = json.load(open(os.path.join(wd, "rm", "members", str(i), "model.json")))
        assert meta["train_pairs"] == n // 2 and meta["seed"] == record["seeds"][i]
    ev = json.load(open(os.path.join(wd, "rm", "eval.json")))
    examples = np.load(os.path.join(wd, "rm", "eval_examples.npz"))
    views = ev["rm"]["by_share"]
    seen = np.concatenate([examples["train_clean/seen"], examples["train_corrupted/seen"]], axis=1)
    assert seen.shape == (4, n) and seen.sum(1).tolist() == [n // 2] * 4  # each member saw its half
    for view in ("train_clean", "train_corrupted"):
        assert sum(r["pairs"] for r in views[view]["seen_by"]) == examples[f"{view}/seen"].shape[1]
    # The same run's curve over random member orders, one starting with each member; its ends are the mean member
    # and the best-first curve's last point.
    rows, orders = ev["rm"]["warm_by_m_random"], ev["rm"]["random_orders"]
    assert [o[0] for o in orders] == [0, 1, 2, 3] and all(sorted(o) == [0, 1, 2, 3] for o in orders)
    assert [r["M"] for r in rows] == [1, 2, 3, 4]
    for s in ("validation", "ood_cue", "ood_temp"):
        assert rows[0]["acc"][s] == pytest.approx(np.mean([m["acc"][s] for m in ev["rm"]["members"]]))
        assert rows[-1]["acc"][s] == ev["rm"]["warm_by_m"][-1]["acc"][s]
        shape = (4, len(examples[f"{s}/warm"]))
        assert examples[f"{s}/warm_by_m_random"].shape == examples[f"{s}/ens_by_m_random"].shape == shape
