"""M policies in one vmapped REINFORCE program: equal to M separate updates, EMA anchors, resume, skips."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest

from tests import helpers
from tests.test_policy import make_tiny_workdir
from warm_jax import faults, runtime, sharding
from warm_jax.policy import policy_ensemble, reinforce, rewards
from warm_jax.stages import RunContext

M = 2
# A large EMA rate, so two steps move the anchor well away from both the init and the policy.
TINY_RL = {**helpers.TINY_RL, "rewards": ("warm",), "ema_rate": 0.3}
LOOP = ["LoopConfig.save_interval_steps = 2", "LoopConfig.async_save = False", "LoopConfig.log_every = 2"]


def ensemble_mesh():
    return runtime.make_mesh({"ensemble": 2, "data": 2}, devices=jax.devices()[:4])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    ctx = make_tiny_workdir(str(tmp_path_factory.mktemp("pe") / "wd"), ensemble_mesh())
    return reinforce.build(ctx, reinforce.ReinforceConfig(**TINY_RL), helpers.tiny_gen())


def _on(setup, workdir: str, fault: faults.FaultInjection | None = None, **cfg_changes):
    """The same setup (and compiled programs) writing into another copy of its workdir."""
    shutil.copytree(setup.ctx.workdir, workdir)
    ctx = RunContext(workdir=workdir, mesh=setup.ctx.mesh, seed=setup.ctx.seed)
    cfg = dataclasses.replace(setup.cfg, **cfg_changes)
    return dataclasses.replace(setup, ctx=ctx, cfg=cfg, fault=fault or setup.fault)


def _host(tree):
    return jax.tree.map(np.asarray, tree)


def test_vmapped_policy_updates_equal_separate_single_policy_updates(setup):
    steps, k = 2, setup.cfg.samples_per_prompt
    reward_fn = rewards.load_reward(setup.ctx, "warm")
    keys = policy_ensemble.policy_keys(setup.ctx.seed, "test", M)
    assert not np.array_equal(keys[0], keys[1])
    # Each policy its own prompts (rows 4i … 4i + 3, k consecutive samples each).
    tokens = [np.repeat(setup.train_prompts.tokens[4 * i : 4 * i + 4], k, 0) for i in range(M)]
    masks = [np.repeat(setup.train_prompts.mask[4 * i : 4 * i + 4], k, 0) for i in range(M)]

    # M separate runs of the single-policy step (reinforce.StepRunner: sampler, then the update).
    single_sh = reinforce.state_shardings(setup, "ema")
    init_one = jax.jit(lambda p, key: reinforce.initial_state(p, setup.tx, key, "ema"), out_shardings=single_sh)
    separate = []
    for i in range(M):
        runner = reinforce.StepRunner(setup, reward_fn, "ema")
        state = init_one(setup.ref_params, keys[i])
        batch = {
            "tokens": sharding.put_global(tokens[i], setup.batch_sh),
            "mask": sharding.put_global(masks[i], setup.batch_sh),
            "texts_index": np.zeros(len(tokens[i]), np.int32),
        }
        metrics, sampled = [], []
        for _ in range(steps):
            state, m = runner(state, batch)
            metrics.append(_host({k_: m[k_] for k_ in ("kl", "proxy", "loss", "finite")}))
            sampled.append(np.asarray(runner.last[1]))
        separate.append((_host(state), metrics, sampled))

    # The same M policies as one vmapped program.
    progs = policy_ensemble.programs(setup, reward_fn, "ema")
    state = progs.init(setup.ref_params, sharding.put_global(keys, progs.member_sh))
    prompts = {
        "tokens": sharding.put_global(np.stack(tokens), progs.prompts_sh),
        "mask": sharding.put_global(np.stack(masks), progs.prompts_sh),
    }
    never = sharding.put_global(np.full(M, -1, np.int32), progs.member_sh)
    rm_state = reinforce.rm_state_on_mesh(reward_fn, setup.ctx.mesh)
    vmetrics, vsampled = [], []
    for _ in range(steps):
        state, m, toks = progs.step(state, setup.ref_params, rm_state, prompts, never)
        vmetrics.append(_host(m))
        vsampled.append(np.asarray(toks))
    # The stacked state leads with the 'ensemble' mesh axis on every leaf.
    for leaf, sh in zip(jax.tree.leaves(state), jax.tree.leaves(progs.state_sh)):
        assert leaf.sharding.is_equivalent_to(sh, leaf.ndim) and sh.spec[0] == sharding.ENSEMBLE
    stacked = _host(state)

    for i, (single, metrics, sampled) in enumerate(separate):
        for s in range(steps):
            np.testing.assert_array_equal(vsampled[s][i], sampled[s], err_msg=f"policy {i} step {s} samples")
            assert vmetrics[s]["member_finite"][i] and metrics[s]["finite"]
        # Each metric's trajectory, judged at the size it reaches: the first step's KL is zero up to round-off,
        # which one program may round to exactly 0 and the other to 4e-8.
        for name in ("kl", "proxy", "loss"):
            got = [vmetrics[s][name][i] for s in range(steps)]
            helpers.assert_close_to_scale(got, [metrics[s][name] for s in range(steps)], err_msg=f"{name} {i}")
        mine = jax.tree.map(lambda x: x[i], stacked)
        assert int(mine.step) == steps and np.array_equal(mine.key, single.key)
        flat, _ = jax.tree_util.tree_flatten_with_path(single)
        for (path, want), got in zip(flat, jax.tree.leaves(mine)):
            helpers.assert_close_to_scale(got, want, rel=1e-4, err_msg=f"policy {i} {jax.tree_util.keystr(path)}")
    # The policies did differ (keys and prompts); each anchor moved off the init, and is not the policy.
    leaves = lambda t: [x for x in jax.tree.leaves(t) if x.size > 1]  # noqa: E731
    assert any(not np.allclose(x[0], x[1]) for x in leaves(stacked.params))
    init = leaves(_host(setup.ref_params))
    for i in range(M):
        assert any(not np.allclose(a[i], p0) for a, p0 in zip(leaves(stacked.anchor), init))
        assert any(not np.allclose(a[i], x[i]) for a, x in zip(leaves(stacked.anchor), leaves(stacked.params)))
    # Evaluation measures the KL to the reference it is given: none for policy 0 against itself.
    first = jax.device_put(
        jax.tree.map(lambda x: x[0], state.params), sharding.named(setup.ctx.mesh, setup.param_specs)
    )
    ev = policy_ensemble.evaluate_policies(
        setup, progs, state.params, reward_fn, setup.eval_prompts, reinforce.eval_key(setup), reference=first
    )
    assert ev["kl"].shape == ev["oracle"].shape == (M, setup.cfg.num_eval_prompts)
    assert np.abs(ev["kl"][0]).max() < 1e-4 and np.abs(ev["kl"][1]).mean() > 1e-2


def test_ema_anchor_update_matches_numpy_and_is_the_kl_reference(setup):
    rng = np.random.default_rng(0)
    anchor = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": {"c": rng.normal(size=(5,)).astype(np.float32)}}
    params = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": {"c": rng.normal(size=(5,)).astype(np.float32)}}
    out = jax.jit(reinforce.ema_update)(anchor, params, 0.01)
    for got, a, p in zip(jax.tree.leaves(out), jax.tree.leaves(anchor), jax.tree.leaves(params)):
        np.testing.assert_allclose(np.asarray(got), 0.99 * a.astype(np.float64) + 0.01 * p, rtol=1e-6, atol=1e-7)
    # bfloat16 params: the anchor stays float32, so a μ-sized step is not rounded away.
    bf = jax.tree.map(lambda x: jax.numpy.asarray(x, jax.numpy.bfloat16), params)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(reinforce.ema_update(anchor, bf, 0.01)))

    reward_fn = rewards.load_reward(setup.ctx, "warm")
    init_update = reinforce.compiled_for(setup, reward_fn, "init")[0]
    ema_update = reinforce.compiled_for(setup, reward_fn, "ema")[0]
    k = setup.cfg.samples_per_prompt
    t = sharding.put_global(np.repeat(setup.train_prompts.tokens[:4], k, 0), setup.batch_sh)
    msk = sharding.put_global(np.repeat(setup.train_prompts.mask[:4], k, 0), setup.batch_sh)
    rm_state = reinforce.rm_state_on_mesh(reward_fn, setup.ctx.mesh)
    # A policy away from the reference: the reference plus noise.
    moved = jax.jit(lambda p: jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(3), x.shape), p))(
        setup.ref_params
    )
    gen = setup.sampler(moved, t, msk, jax.random.key(5))
    batch = {"prompt_tokens": t, "prompt_mask": msk, "response_tokens": gen["tokens"], "response_mask": gen["mask"]}
    f32 = lambda p: jax.tree.map(lambda x: x.astype(np.float32), p)  # noqa: E731

    def state(anchor):
        fn = lambda p, a: reinforce.AnchoredState.from_state(reinforce.new_state(p, setup.tx, jax.random.key(0)), a)  # noqa: E731
        return jax.jit(fn, out_shardings=reinforce.state_shardings(setup, "ema"))(moved, anchor)

    plain = jax.jit(lambda p: reinforce.new_state(p, setup.tx, jax.random.key(0)), out_shardings=setup.state_sh)(moved)
    after_init, m_init = init_update(plain, setup.ref_params, rm_state, batch)
    assert type(after_init) is reinforce.TrainState  # 'init' keeps the state (and checkpoint) layout
    # Anchored at the reference, 'ema' sees the same KL as 'init'; anchored at itself, none.
    after_ref, m_ref = ema_update(state(f32(setup.ref_params)), setup.ref_params, rm_state, batch)
    helpers.assert_close_to_scale(m_ref["kl"], m_init["kl"])
    helpers.assert_close_to_scale(m_ref["loss"], m_init["loss"])
    assert abs(float(m_init["kl"])) > 1e-2
    _, m_self = ema_update(state(f32(moved)), setup.ref_params, rm_state, batch)
    assert abs(float(m_self["kl"])) < 1e-6 * abs(float(m_init["kl"])) + 1e-6
    # And the anchor moved: (1 − μ)·reference + μ·(the updated policy).
    mu = setup.cfg.ema_rate
    for got, ref, new in zip(
        jax.tree.leaves(_host(after_ref.anchor)),
        jax.tree.leaves(_host(setup.ref_params)),
        jax.tree.leaves(_host(after_ref.params)),
    ):
        helpers.assert_close_to_scale(got, (1 - mu) * ref.astype(np.float64) + mu * new, rel=1e-6)


def test_anchor_options_are_validated_and_init_keeps_run_names():
    assert reinforce.run_name("warm", "init") == "warm" and reinforce.run_name("warm", "ema") == "warm_ema"
    assert reinforce.ReinforceConfig(anchors="ema").anchors == ("ema",)
    with pytest.raises(ValueError, match=r"ReinforceConfig.anchors = 'fixed' is not a KL anchor"):
        reinforce.ReinforceConfig(anchors=("init", "fixed"))
    with pytest.raises(ValueError, match="ema_rate"):
        reinforce.ReinforceConfig(ema_rate=1.5)
    with pytest.raises(ValueError, match="PolicyEnsembleConfig.anchor"):
        policy_ensemble.PolicyEnsembleConfig(anchor="nope")
    with pytest.raises(ValueError, match="PolicyEnsembleConfig.reward"):
        policy_ensemble.PolicyEnsembleConfig(reward="nope")
    seeds = policy_ensemble.policy_seeds(0, "policy_ensemble", 4)
    assert len(set(seeds)) == 4 and seeds != policy_ensemble.policy_seeds(0, "warp_1", 4)


def _train(setup, run_dir, stage="pe", **kw):
    with helpers.gin_config(LOOP):
        return policy_ensemble.train_policies(
            setup,
            reward="warm",
            num_policies=M,
            init_params=setup.ref_params,
            run_dir=run_dir,
            anchor="ema",
            stage=stage,
            **kw,
        )


def test_resume_after_an_interruption_gives_the_same_policies(setup, tmp_path):
    a = _on(setup, str(tmp_path / "a"))
    b = _on(setup, str(tmp_path / "b"))
    run_a, run_b = a.ctx.path("rl", "pe"), b.ctx.path("rl", "pe")
    final_a = _host(_train(a, run_a))
    _train(b, run_b, num_steps=2)  # stops after step 2 (its checkpoint), then resumes to 4
    final_b = _host(_train(b, run_b))
    for x, y in zip(jax.tree.leaves(final_a), jax.tree.leaves(final_b)):
        np.testing.assert_array_equal(x, y)
    sa, state_a = helpers.restore_tree(os.path.join(run_a, "ckpt"))
    sb, state_b = helpers.restore_tree(os.path.join(run_b, "ckpt"))
    assert sa == sb == 4
    for x, y in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
        np.testing.assert_array_equal(x, y)  # the EMA anchors, Adam moments and keys too
    ra = json.load(open(os.path.join(run_a, "results.json")))
    rb = json.load(open(os.path.join(run_b, "results.json")))
    assert ra["policies"] == rb["policies"] and ra["updates"] == rb["updates"]
    assert len(ra["policies"]) == M and ra["policies"][0]["step"] == [0, 2, 4]
    # Step 0 is the init: KL 0 up to round-off (the stacked and the shared forward are other programs).
    assert abs(ra["policies"][0]["kl"][0]) < 1e-5 and ra["policies"][0]["kl"][-1] > 1e-3
    assert ra["policy_skipped"] == [0, 0] and ra["updates"]["applied"] == 4
    scores = a.ctx.artefacts.rl_run("pe/1").read_eval_scores([0, 2, 4])
    assert scores["oracle"].shape == (3, setup.cfg.num_eval_prompts)
    # The finished run loads back onto the mesh, stacked and sharded as trained.
    loaded = policy_ensemble.load_policies(run_a, a)
    for x, y in zip(jax.tree.leaves(loaded), jax.tree.leaves(final_a)):
        np.testing.assert_array_equal(np.asarray(x), y)
    assert jax.tree.leaves(loaded)[0].sharding.spec[0] == sharding.ENSEMBLE


def test_a_non_finite_policy_update_is_skipped_for_that_policy_and_reported(setup, tmp_path, caplog):
    c = _on(setup, str(tmp_path / "c"), fault=faults.FaultInjection(nan_at_step=2, nan_members=(1,)))
    run_c = c.ctx.path("rl", "pe")
    ckpt = os.path.join(run_c, "ckpt")
    with caplog.at_level(logging.WARNING, logger="warm_jax.loop"):
        _train(c, run_c, num_steps=1)
        _, at1 = helpers.restore_tree(ckpt)
        _train(c, run_c, num_steps=2)
        _, at2 = helpers.restore_tree(ckpt)
        _train(c, run_c)
    assert any("non-finite member(s) [1]" in r.getMessage() and "step 2" in r.getMessage() for r in caplog.records)
    updates = json.load(open(os.path.join(run_c, "updates.json")))
    assert json.load(open(os.path.join(run_c, "results.json")))["policy_skipped"] == [0, 1]
    assert updates["member_skipped"] == [0, 1] and updates["skipped_steps"] == [2]
    assert updates["skipped"] == 1 and updates["applied"] == 3
    # Step 2: policy 1 kept its params, moments and EMA anchor; policy 0 applied its update.
    for part in ("params", "opt_state", "anchor"):
        for x1, x2 in zip(jax.tree.leaves(at1[part]), jax.tree.leaves(at2[part])):
            if np.issubdtype(x1.dtype, np.floating) and x1.size > 1:
                np.testing.assert_array_equal(x2[1], x1[1])
    moved = [
        not np.array_equal(x1[0], x2[0])
        for x1, x2 in zip(jax.tree.leaves(at1["params"]), jax.tree.leaves(at2["params"]))
    ]
    assert any(moved)
    assert np.asarray(at2["step"]).tolist() == [2, 2]


def test_the_stage_reads_its_gin_config_and_writes_rl_policy_ensemble(setup, tmp_path):
    wd = str(tmp_path / "wd")
    shutil.copytree(setup.ctx.workdir, wd)
    ctx = RunContext(workdir=wd, mesh=setup.ctx.mesh, seed=setup.ctx.seed)
    rl = [f"ReinforceConfig.{k} = {v!r}" for k, v in {**TINY_RL, "num_steps": 2}.items()] + helpers.gen_bindings()
    with helpers.gin_config([*rl, *LOOP, "PolicyEnsembleConfig.num_policies = 3"]):
        with pytest.raises(ValueError, match=r"num_policies = 3 must be a multiple of the mesh's ensemble axis \(2\)"):
            policy_ensemble.run(ctx)
    with helpers.gin_config([*rl, *LOOP, "PolicyEnsembleConfig.num_policies = 2"]):
        policy_ensemble.run(ctx)
    out = ctx.artefacts.policy_ensemble.dir
    result = json.load(open(os.path.join(out, "results.json")))
    assert (result["num_policies"], result["anchor"], result["reward"]) == (2, "ema", "warm")
    assert result["stage"] == "policy_ensemble" and result["policies"][1]["step"] == [0, 2]
    for i in range(2):
        assert len(json.load(open(os.path.join(out, str(i), "winrate_scores.json")))["oracle"]) == 8
    assert os.path.exists(os.path.join(wd, "metrics", "policy_ensemble.jsonl"))
