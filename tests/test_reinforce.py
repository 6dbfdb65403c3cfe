"""REINFORCE: the loss gradient by hand, baselines, KL = 0 at the reference, exact resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import helpers
from tests.test_policy import make_tiny_workdir, tiny_mesh
from warm_jax.checkpoints import Checkpointer
from warm_jax import oracle as oracle_lib
from warm_jax.policy import advantages, reinforce


def test_policy_gradient_equals_hand_computed_gradient_on_a_two_token_toy():
    # π(a) = softmax(θ) over tokens {0, 1}, the same at every position; two sequences of two tokens.
    theta = jnp.asarray([0.3, -0.2])
    seqs = np.asarray([[0, 1], [1, 1]])
    mask = jnp.asarray([[1, 1], [1, 0]])  # the second sequence's last token is padding
    adv = jnp.asarray([[1.0, 1.0], [-0.5, -0.5]])

    def loss(t):
        logp = jax.nn.log_softmax(t)[seqs]
        return reinforce.policy_gradient_loss(logp, mask, adv)

    p = np.exp([0.3, -0.2]) / np.exp([0.3, -0.2]).sum()
    # ∂/∂θ −½ Σ_i A_i Σ_t m_it log π(a_it) = −½ Σ_i A_i Σ_t m_it (onehot(a_it) − p)
    by_hand = -0.5 * (1.0 * ((np.eye(2)[0] - p) + (np.eye(2)[1] - p)) + -0.5 * (np.eye(2)[1] - p))
    np.testing.assert_allclose(np.asarray(jax.grad(loss)(theta)), by_hand, rtol=1e-6)


def test_baselines():
    r = jnp.asarray([1.0, 3.0, 0.0, 2.0])  # two prompts, k = 2
    m = jnp.ones((4, 3))
    np.testing.assert_allclose(advantages.rloo(r, None, m, 2)[:, 0], [-2.0, 2.0, -2.0, 2.0])
    np.testing.assert_allclose(advantages.batch_mean(r, None, m, 2)[:, 0], [-0.5, 1.5, -1.5, 0.5])
    v = jnp.asarray([[0.5, 1.0, 0.0]] * 4)
    np.testing.assert_allclose(advantages.value(r, v, m, 2)[0], [0.5, 0.0, 1.0])
    np.testing.assert_allclose(advantages.value_loss(r, v, m), np.mean((np.asarray(v) - np.asarray(r)[:, None]) ** 2))
    with pytest.raises(ValueError, match="baseline"):
        reinforce.ReinforceConfig(baseline="nope")


TINY_RL = {**helpers.TINY_RL, "rewards": ("warm", "member_best")}


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    return make_tiny_workdir(str(tmp_path_factory.mktemp("rl")), tiny_mesh())


def test_kl_is_zero_at_the_reference_and_the_sampler_never_recompiles(ctx):
    cfg = reinforce.ReinforceConfig(**TINY_RL)
    setup = reinforce.build(ctx, cfg, helpers.tiny_gen())
    from warm_jax.policy import rewards

    reward_fn = rewards.load_reward(ctx, "warm")
    state = jax.jit(
        lambda p: reinforce.new_state(jax.tree.map(lambda x: x + 0, p), setup.tx, jax.random.key(0)),
        out_shardings=setup.state_sh,
    )(setup.ref_params)
    runner = reinforce.StepRunner(setup, reward_fn)
    tokens = np.repeat(setup.train_prompts.tokens[:4], 2, 0)
    mask = np.repeat(setup.train_prompts.mask[:4], 2, 0)
    batch = {
        "tokens": jax.device_put(tokens, setup.batch_sh),
        "mask": jax.device_put(mask, setup.batch_sh),
        "texts_index": np.repeat(np.arange(4), 2),
    }
    state, m = runner(state, batch)
    # The first step samples from π = π_ref: zero up to float32 round-off (the two forwards sit in
    # differently fused parts of one program).
    assert abs(float(m["kl"])) < 1e-6 and bool(m["finite"])
    assert float(m["response_length"]) > 0 and 0 < m["gen_time_share"] < 1
    for _ in range(2):
        state, m = runner(state, batch)
    assert float(m["kl"]) > 1e-4  # the policy moved
    assert setup.sampler._cache_size() == 1  # new params swapped in, no recompile
    ev = reinforce.evaluate_policy(setup, setup.ref_params, reward_fn, setup.eval_prompts, reinforce.eval_key(setup))
    assert np.all(ev["kl"] == 0.0) and ev["oracle"].shape == (8,)


def _bindings():
    b = [f"ReinforceConfig.{k} = {v!r}" for k, v in TINY_RL.items()]
    return (
        b
        + helpers.gen_bindings()
        + [
            "make_mesh.shape = {'data': -1, 'fsdp': 2}",
            "LoopConfig.save_interval_steps = 2",
            "LoopConfig.async_save = False",
            "LoopConfig.log_every = 2",
        ]
    )


# The stage function in a child process (only the modules it needs, not every stage's).
CHILD = """
import sys, gin
from warm_jax import runtime, stages, loop
from warm_jax.policy import reinforce
gin.parse_config(sys.argv[2:])
reinforce.run(stages.RunContext(workdir=sys.argv[1], mesh=runtime.make_mesh(), seed=0))
"""


def _run_stage(workdir, bindings, check=True):
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, workdir, *bindings],
        env=helpers.subprocess_env(),
        cwd=helpers.REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"reinforce stage exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def _final(workdir, name):
    ck = Checkpointer(os.path.join(workdir, "rl", name, "ckpt"), read_only=True)
    try:
        state, data, step = ck.restore(None)
    finally:
        ck.close()
    return step, jax.tree.map(np.asarray, state), data


def test_exact_resume_after_sigkill(ctx, tmp_path):
    import shutil

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    for d in (a, b):
        shutil.copytree(ctx.workdir, d)
    # Killed at the start of step 3 (steps 1-2 saved), then rerun to the end.
    killed = _run_stage(b, _bindings() + ["FaultInjection.kill_at_step = 3"], check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not os.path.exists(os.path.join(b, "rl", "results.json"))
    _run_stage(b, _bindings())
    _run_stage(a, _bindings())
    for name in ("warm", "member_best"):
        sa, state_a, data_a = _final(a, name)
        sb, state_b, data_b = _final(b, name)
        assert sa == sb == 4 and data_a == data_b
        la, lb = jax.tree.leaves(state_a), jax.tree.leaves(state_b)
        assert len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))
    ra = json.load(open(os.path.join(a, "rl", "results.json")))
    rb = json.load(open(os.path.join(b, "rl", "results.json")))
    assert ra["runs"] == rb["runs"] and ra["win_rate"] == rb["win_rate"]
    assert ra["runs"]["warm"]["step"] == [0, 2, 4] and ra["runs"]["warm"]["kl"][0] == 0.0
    wr = ra["win_rate"]["warm_vs_member_best"]
    assert 0.0 <= wr["ci95"][0] <= wr["value"] <= wr["ci95"][1] <= 1.0 and wr["n_prompts"] == 8


def test_the_stage_trains_each_reward_with_each_anchor(ctx, tmp_path):
    import shutil

    from warm_jax.stages import RunContext

    wd = str(tmp_path / "wd")
    shutil.copytree(ctx.workdir, wd)
    run_ctx = RunContext(workdir=wd, mesh=ctx.mesh, seed=ctx.seed)
    cfg = reinforce.ReinforceConfig(**{**TINY_RL, "rewards": ("warm",), "num_steps": 2, "anchors": ("init", "ema")})
    with helpers.gin_config(["LoopConfig.async_save = False", "LoopConfig.log_every = 2"]):
        reinforce.run(run_ctx, cfg, helpers.tiny_gen())
    result = json.load(open(os.path.join(wd, "rl", "results.json")))
    # 'init' keeps the run name and layout it always had; 'ema' is the same reward's second run.
    assert sorted(result["runs"]) == ["warm", "warm_ema"] and list(result["win_rate"]) == ["warm_vs_warm_ema"]
    assert result["config"]["anchors"] == ["init", "ema"]
    assert result["runs"]["warm"]["kl"][0] == result["runs"]["warm_ema"]["kl"][0] == 0.0
    # Each eval keeps its first texts, the very texts the oracle scored.
    record = json.load(open(run_ctx.artefacts.rl_run("warm").eval_scores(2)))
    kept = record["samples"]
    assert len(kept) == min(reinforce.SAMPLES_KEPT, cfg.num_eval_prompts) and all(kept)
    gold = oracle_lib.make_oracle(helpers.tiny_gen().oracle).score(kept)
    np.testing.assert_allclose(gold, record["oracle"][: len(kept)], rtol=1e-6)
    (_, init_state, _), (_, ema_state, _) = _final(wd, "warm"), _final(wd, "warm_ema")
    assert "anchor" not in init_state and "anchor" in ema_state
    # The checkpointed anchor is float32, off the reference and short of the policy.
    ref = jax.tree.map(np.asarray, run_ctx.artefacts.load_trunk(run_ctx.mesh).params)
    anchor, params = ema_state["anchor"], ema_state["params"]
    assert all(a.dtype == np.float32 for a in jax.tree.leaves(anchor))
    assert any(not np.array_equal(a, r) for a, r in zip(jax.tree.leaves(anchor), jax.tree.leaves(ref)))
    assert any(not np.allclose(a, p) for a, p in zip(jax.tree.leaves(anchor), jax.tree.leaves(params)))
