"""Stage `policy_ensemble`: M policies trained by REINFORCE as ONE jitted, vmapped, sharded step (WARP).

WARP (Ramé et al., 2024, arXiv 2406.16768) trains M policies independently from one initialisation,
each with its KL anchored to an exponential moving average of itself, then merges them. Here the M
policies are a leading [M] axis on every leaf of the train state (params, Adam moments, step, key,
EMA anchor), split over the mesh's 'ensemble' axis exactly as the reward-model ensemble's is, and
one ``jax.jit(jax.vmap(policy_step, spmd_axis_name='ensemble'))`` does, per policy: sample k
responses per prompt, score them with the reward (shared, not vmapped), advantages, the update,
and the EMA anchor update (``reinforce.reinforce_update``). Policies differ by their key and their
prompt order, both derived by name from the run's seed (``warm_jax.seeds``): the streams
(stage, "policy", i) and (stage, "prompt_order", i). A policy's non-finite update is skipped in-graph for that policy alone, counted
per policy (``loop.UpdateCounts.member_skipped``) and logged naming the policy.

Evaluation follows the single runs (``reinforce.train_one``): at step 0 and every ``eval_every``
steps each policy samples the held-out eval prompts with the same fixed key (one vmapped program),
judged by the proxy reward, the oracle and the KL to the pretrained policy (``setup.ref_params``,
or ``eval_reference``).

Outputs under ``run_dir`` (a ``workdir.PolicyRun``; the stage's is WORKDIR/policy_ensemble/): ckpt/ (the stacked
state), updates.json, policies.json (what ``load_policies`` needs), initial_eval.json (step 0, [M] means),
<i>/eval_scores/<step>.json and <i>/winrate_scores.json per policy i (read with
``PolicyRun.policy(i).read_eval_scores(steps)``), results.json (per-policy eval curves, update counts, skips per
policy); metrics/<stage>.jsonl holds [M] lists per step.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from warm_jax import batched, cpu_tuning, io_utils, loop, metrics as metrics_lib, seeds, sharding
from warm_jax.data import pipeline
from warm_jax.ensemble import StackedIterator
from warm_jax.policy import reinforce, sampler
from warm_jax.policy import rewards as rewards_lib
from warm_jax.stages import RunContext, register_stage
from warm_jax.task import prompts as task_prompts
from warm_jax.workdir import PolicyRun
from warm_jax.task.generation import GenerationConfig

log = logging.getLogger(__name__)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PolicyEnsembleConfig:
    """M policies against one reward; every other REINFORCE setting comes from ReinforceConfig."""

    num_policies: int = 4
    reward: str = "warm"  # a name of rewards.REWARD_NAMES
    anchor: str = "ema"  # the KL anchor, reinforce.ANCHORS (WARP: 'ema', rate ReinforceConfig.ema_rate)

    def __post_init__(self):
        if self.num_policies < 1:
            raise ValueError(f"PolicyEnsembleConfig.num_policies must be ≥ 1, got {self.num_policies}")
        if self.reward not in rewards_lib.REWARD_NAMES:
            raise ValueError(
                f"PolicyEnsembleConfig.reward = {self.reward!r} is unknown; choose from {rewards_lib.REWARD_NAMES}"
            )
        reinforce.check_anchor(self.anchor, "PolicyEnsembleConfig.anchor")


# ----------------------------------------------------------------------------- keys and data order


def policy_keys(seed: int, stage: str, m: int) -> np.ndarray:
    """Raw key data [M, 2] (uint32): policy i's key is the stream (stage, "policy", i) of the run's seed."""
    return np.stack([np.asarray(jax.random.key_data(seeds.key(seed, stage, "policy", i))) for i in range(m)])


def policy_seeds(seed: int, stage: str, m: int) -> list[int]:
    """Prompt-order seeds, one per policy: the streams (stage, "prompt_order", i) of the run's seed."""
    return [seeds.seed(seed, stage, "prompt_order", i) for i in range(m)]


# ----------------------------------------------------------------------------- the vmapped programs


def policy_step(
    state,
    ref_params,
    rm_state,
    prompts,
    nan_step,
    *,
    graphdef,
    model_cfg,
    samp_cfg: sampler.SamplingConfig,
    rm_apply,
    tx,
    cfg: reinforce.ReinforceConfig,
    pad_id: int,
    anchor: str,
):
    """ONE policy's step (vmapped by the caller): sample, then ``reinforce_update``.

    prompts: tokens/mask [B, P] (k consecutive rows per prompt); ``ref_params``: the 'init' KL
    anchor (shared, unused for 'ema'); nan_step: int32 [] (tests; −1 = never). The sampling key is
    fold_in(state.step_key(), 0), as in ``reinforce.StepRunner``. Returns (state, scalar metrics,
    response tokens [B, N]).
    """
    key = jax.random.fold_in(state.step_key(), 0)
    gen = sampler.sample(
        state.params, prompts["tokens"], prompts["mask"], key, graphdef=graphdef, model_cfg=model_cfg, cfg=samp_cfg
    )
    batch = {
        "prompt_tokens": prompts["tokens"],
        "prompt_mask": prompts["mask"],
        "response_tokens": gen["tokens"],
        "response_mask": gen["mask"],
    }
    state, metrics = reinforce.reinforce_update(
        state,
        ref_params,
        rm_state,
        batch,
        graphdef=graphdef,
        rm_apply=rm_apply,
        tx=tx,
        cfg=cfg,
        pad_id=pad_id,
        anchor=anchor,
        nan_at_step=nan_step,
    )
    return state, metrics, gen["tokens"]


def eval_one(
    params,
    ref_params,
    rm_state,
    prompt_tokens,
    prompt_mask,
    key,
    *,
    graphdef,
    model_cfg,
    samp_cfg,
    rm_apply,
    pad_id: int,
):
    """ONE policy's eval on shared prompts [B, P] (vmapped by the caller): tokens [B, N], length [B],
    proxy [B], KL to ``ref_params`` [B]."""
    gen = sampler.sample(params, prompt_tokens, prompt_mask, key, graphdef=graphdef, model_cfg=model_cfg, cfg=samp_cfg)
    batch = {
        "prompt_tokens": prompt_tokens,
        "prompt_mask": prompt_mask,
        "response_tokens": gen["tokens"],
        "response_mask": gen["mask"],
    }
    scores = reinforce.eval_scores(
        params, ref_params, rm_state, batch, graphdef=graphdef, rm_apply=rm_apply, pad_id=pad_id
    )
    return {"tokens": gen["tokens"], "length": gen["length"], **scores}


def _sampling_config(setup: reinforce.Setup) -> sampler.SamplingConfig:
    return sampler.SamplingConfig(
        max_new_tokens=setup.gen.max_new_tokens,
        temperature=setup.cfg.temperature,
        eos_id=setup.tok.eos_id,
        pad_id=setup.tok.pad_id,
    )


@dataclasses.dataclass
class Programs:
    """The stacked layout and the compiled programs of M policies (one set per reward kind and anchor;
    another M is another shape, traced again by the same jits)."""

    state_sh: object  # stacked state shardings
    params_sh: object  # stacked params shardings
    prompts_sh: NamedSharding  # [M, B, P] per-policy prompts
    shared_sh: NamedSharding  # [B, P] prompts every policy sees
    member_sh: NamedSharding  # [M]
    init: object  # (init_params, keys [M, 2]) -> stacked state
    step: object  # (state, ref_params, rm_state, prompts, nan_steps) -> (state, metrics, tokens [M, B, N])
    evaluate: object  # (stacked params, ref_params, rm_state, tokens, mask, key) -> dict of [M, B, ...]


def stacked_state_shardings(setup: reinforce.Setup, anchor: str):
    """The stacked [M, ...] state's shardings: every leaf leads with the 'ensemble' mesh axis."""
    abstract = jax.eval_shape(lambda: setup.ref_params)
    specs = reinforce.policy_state_specs(setup.tx, abstract, setup.param_specs, anchor)
    return sharding.named(setup.ctx.mesh, sharding.prefix_ensemble(specs))


def programs(setup: reinforce.Setup, reward_fn: rewards_lib.RewardFn, anchor: str) -> Programs:
    name = ("policy_ensemble", reward_fn.kind, anchor)
    if name in setup.compiled:
        return setup.compiled[name]
    mesh, cfg = setup.ctx.mesh, setup.cfg
    repl = sharding.replicated(mesh)
    param_sh = sharding.named(mesh, setup.param_specs)
    rm_sh = reinforce.rm_shardings(reward_fn, mesh)
    state_sh = stacked_state_shardings(setup, anchor)
    params_sh = sharding.named(mesh, sharding.prefix_ensemble(setup.param_specs))
    prompts_sh = sharding.batch_sharding(mesh, 3, members="stacked")
    shared_sh = sharding.batch_sharding(mesh, 2, members="shared")
    member_sh = NamedSharding(mesh, P(sharding.ENSEMBLE))
    stacked_2d = sharding.batch_sharding(mesh, 2, members="stacked")
    samp_cfg = _sampling_config(setup)
    common = dict(
        graphdef=setup.graphdef,
        model_cfg=setup.model_cfg,
        samp_cfg=samp_cfg,
        rm_apply=reward_fn.apply,
        pad_id=setup.tok.pad_id,
    )

    init = jax.jit(
        jax.vmap(lambda p, key: reinforce.initial_state(p, setup.tx, key, anchor), in_axes=(None, 0)),
        in_shardings=(param_sh, member_sh),
        out_shardings=state_sh,
    )
    vstep = jax.vmap(
        functools.partial(policy_step, tx=setup.tx, cfg=cfg, anchor=anchor, **common),
        in_axes=(0, None, None, 0, 0),
        spmd_axis_name=sharding.ENSEMBLE,
    )

    def step(state, ref_params, rm_state, prompts, nan_steps):
        state, metrics, tokens = vstep(state, ref_params, rm_state, prompts, nan_steps)
        # One verdict for the loop; which policies skipped goes into its error and the update counts.
        metrics["member_finite"] = metrics["finite"]
        metrics["finite"] = jnp.all(metrics["finite"])
        return state, metrics, tokens

    step = jax.jit(
        step,
        in_shardings=(state_sh, param_sh, rm_sh, {"tokens": prompts_sh, "mask": prompts_sh}, member_sh),
        out_shardings=(state_sh, repl, prompts_sh),
        donate_argnums=0,
        compiler_options=cpu_tuning.compiler_options(cpu_tuning.TRAIN_STEP),
    )
    evaluate = jax.jit(
        jax.vmap(
            functools.partial(eval_one, **common),
            in_axes=(0, None, None, None, None, None),
            spmd_axis_name=sharding.ENSEMBLE,
        ),
        in_shardings=(params_sh, param_sh, rm_sh, shared_sh, shared_sh, repl),
        out_shardings={"tokens": prompts_sh, "length": stacked_2d, "proxy": stacked_2d, "kl": stacked_2d},
    )
    setup.compiled[name] = Programs(state_sh, params_sh, prompts_sh, shared_sh, member_sh, init, step, evaluate)
    return setup.compiled[name]


# ----------------------------------------------------------------------------- evaluation


def evaluate_policies(
    setup: reinforce.Setup, progs: Programs, params, reward_fn, prompts: task_prompts.PromptSet, key, reference=None
) -> dict[str, np.ndarray]:
    """Every policy samples ``prompts`` with the same key (chunk at row r: fold_in(key, r), as
    ``sampler.sample_in_batches``); per policy and prompt: oracle, proxy, KL to ``reference``
    (default ``setup.ref_params``), length and the scored texts [M, R] (host)."""
    reference = setup.ref_params if reference is None else reference
    rm_state = reinforce.rm_state_on_mesh(reward_fn, setup.ctx.mesh)

    def run(b, start):
        out = progs.evaluate(params, reference, rm_state, b["tokens"], b["mask"], jax.random.fold_in(key, start))
        return {k: out[k] for k in ("tokens", "length", "proxy", "kl")}

    host = batched.map_batches(
        run,
        {"tokens": prompts.tokens, "mask": prompts.mask},
        batch_size=setup.eval_chunk,
        mesh=setup.ctx.mesh,
        members="shared",
        out_axis=1,
    )
    texts = [task_prompts.oracle_texts(setup.tok, prompts.texts, toks) for toks in host["tokens"]]
    return {
        "oracle": np.stack([setup.oracle.score(t) for t in texts]),
        "proxy": host["proxy"],
        "kl": host["kl"],
        "length": host["length"].astype(np.float32),
        "texts": np.asarray(texts),
    }


def _per_policy(ev: dict[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    return {k: v[i] for k, v in ev.items()}


def _summary(ev: dict[str, np.ndarray]) -> dict[str, list[float]]:
    """Per-policy means: eval_<k> → [M]."""
    return {f"eval_{k}": [float(x) for x in np.mean(ev[k], axis=1)] for k in reinforce.SCORES}


def _write_eval(run: PolicyRun, step: int, ev: dict[str, np.ndarray]) -> None:
    for i in range(len(ev["oracle"])):
        reinforce.write_eval_scores(run.policy(i), step, _per_policy(ev, i))


# ----------------------------------------------------------------------------- training


class EnsembleRunner:
    """The step ``loop.train`` calls: the one vmapped program; keeps the sampled tokens for the
    training oracle and the latest params for evaluation (valid until the next step donates them)."""

    def __init__(self, setup, progs: Programs, anchor_params, rm_state, nan_steps):
        self.setup, self.progs = setup, progs
        self.anchor_params, self.rm_state, self.nan_steps = anchor_params, rm_state, nan_steps
        self.last = None  # (prompt indices [M, B], response tokens [M, B, N])
        self.params = None

    def __call__(self, state, batch):
        prompts = {"tokens": batch["tokens"], "mask": batch["mask"]}
        state, metrics, tokens = self.progs.step(state, self.anchor_params, self.rm_state, prompts, self.nan_steps)
        self.last = (batch["texts_index"], tokens)
        self.params = state.params
        return state, metrics


def _meta(num_policies: int, anchor: str, reward: str, stage: str, seed: int) -> dict:
    return {"num_policies": num_policies, "anchor": anchor, "reward": reward, "stage": stage, "seed": seed}


def train_policies(
    setup: reinforce.Setup,
    *,
    reward: str,
    num_policies: int,
    init_params,
    run_dir: str,
    anchor: str,
    stage: str,
    num_steps: int | None = None,
    eval_reference=None,
):
    """Trains ``num_policies`` policies from ``init_params`` against ``reward``; returns their
    stacked final params [M, ...] (sharded with the 'ensemble' axis leading). Resumes from
    ``run_dir``/ckpt when it has a checkpoint.

    init_params: one policy's params (e.g. the pretrained policy, or WARP's previous LITI point),
      sharded like ``setup.ref_params``; it is also the 'init' KL anchor and the EMA's start.
    anchor: 'init' | 'ema' (rate ``setup.cfg.ema_rate``).
    stage: the metrics stream (metrics/<stage>.jsonl) and the name the policies' keys derive from.
    num_steps: default ``setup.cfg.num_steps``.
    eval_reference: the policy the evaluations' KL is measured to, sharded like ``setup.ref_params``
      (default: ``setup.ref_params``, the pretrained/SFT policy, so that KLs of WARP iterations that
      start elsewhere stay on one axis; pass ``init_params`` for the KL to this run's start).
    ``setup.fault`` (tests) may poison some policies' updates at a step (``faults.FaultInjection``).
    """
    ctx, cfg = setup.ctx, setup.cfg
    run = PolicyRun(run_dir)
    m = num_policies
    reinforce.check_anchor(anchor, "anchor")
    num_steps = cfg.num_steps if num_steps is None else num_steps
    ens = ctx.mesh.shape.get(sharding.ENSEMBLE, 1)
    if m % ens:
        raise ValueError(
            f"PolicyEnsembleConfig.num_policies = {m} must be a multiple of the mesh's ensemble axis ({ens})"
        )
    reward_fn = rewards_lib.load_reward(
        ctx, reward, conservative_lambda=cfg.conservative_lambda, normalise=cfg.normalise_reward
    )
    progs = programs(setup, reward_fn, anchor)
    # A previous iteration's point may sit in another layout; the programs take the policy's own.
    param_sh = sharding.named(ctx.mesh, setup.param_specs)
    init_params = jax.device_put(init_params, param_sh)
    keys = sharding.put_global(policy_keys(ctx.seed, stage, m), progs.member_sh)
    state = progs.init(init_params, keys)
    abstract_state = sharding.abstract_with_sharding(jax.eval_shape(lambda: state), progs.state_sh)
    nan_steps = sharding.put_global(setup.fault.member_nan_steps(m), progs.member_sh)

    k = cfg.samples_per_prompt
    iterator = StackedIterator([reinforce.prompt_iterator(setup, s) for s in policy_seeds(ctx.seed, stage, m)])

    def to_device(b):
        # k consecutive rows per prompt (the layout RLOO's baseline expects), per policy.
        local = {f: np.repeat(b[f], k, axis=1) for f in ("tokens", "mask")}
        out = pipeline.to_global(local, progs.prompts_sh)
        out["texts_index"] = np.repeat(b["index"], k, axis=1)  # host-side, for the oracle
        return out

    if jax.process_index() == 0:
        io_utils.atomic_write_json(run.meta, _meta(m, anchor, reward, stage, ctx.seed))
    key = reinforce.eval_key(setup)
    initial = run.initial_eval
    reference = None if eval_reference is None else jax.device_put(eval_reference, param_sh)
    evaluate = functools.partial(evaluate_policies, setup, progs, reward_fn=reward_fn, reference=reference)
    if not os.path.exists(initial):
        ev = evaluate(state.params, prompts=setup.eval_prompts, key=key)
        if jax.process_index() == 0:
            _write_eval(run, 0, ev)
            io_utils.atomic_write_json(initial, {"step": 0, **_summary(ev)})

    rm_state = reinforce.rm_state_on_mesh(reward_fn, ctx.mesh)
    runner = EnsembleRunner(setup, progs, init_params, rm_state, nan_steps)

    def on_log(step: int, host: dict) -> dict:
        extra = {}
        if runner.last is not None:
            idx, toks = runner.last
            toks = np.asarray(multihost_utils.process_allgather(toks, tiled=True))
            texts = [[setup.train_prompts.texts[j] for j in row] for row in np.asarray(idx)]
            extra["oracle"] = [
                float(np.mean(setup.oracle.score(task_prompts.oracle_texts(setup.tok, t, x))))
                for t, x in zip(texts, toks)
            ]
        if step % cfg.eval_every == 0 or step == num_steps:
            ev = evaluate(runner.params, prompts=setup.eval_prompts, key=key)
            if jax.process_index() == 0:
                _write_eval(run, step, ev)
            extra.update(_summary(ev))
        return extra

    loop_cfg = reinforce.loop_config(cfg)
    final = loop.train(
        stage=stage,
        workdir=ctx.workdir,
        state=state,
        abstract_state=abstract_state,
        step_fn=runner,
        iterator=iterator,
        to_device=to_device,
        num_steps=num_steps,
        ckpt_dir=run.ckpt,
        cfg=loop_cfg,
        show=("proxy", "kl", "oracle"),
        on_log=on_log,
        fault=setup.fault,
    )
    wr = evaluate(final.params, prompts=setup.winrate_prompts, key=jax.random.fold_in(key, 1))
    if jax.process_index() == 0:
        step = loop.scalar_step(final)
        for i in range(m):
            io_utils.atomic_write_json(run.policy(i).winrate_scores, {"oracle": wr["oracle"][i].tolist(), "step": step})
        updates = loop.read_updates(run.ckpt)
        io_utils.atomic_write_json(
            run.results,
            {
                **_meta(m, anchor, reward, stage, ctx.seed),
                "policies": curves(ctx.workdir, run_dir, stage, m),
                "updates": updates,
                # Per policy (updates.json lists member_skipped only once a policy has skipped one).
                "policy_skipped": updates.get("member_skipped", [0] * m),
                "config": dataclasses.asdict(cfg),
            },
        )
    return final.params


def curves(workdir: str, run_dir: str, stage: str, m: int) -> list[dict[str, list]]:
    """Per policy, its held-out eval curve: step 0 (the initial policy) then every eval step."""
    rows = [io_utils.read_json(PolicyRun(run_dir).initial_eval)]
    rows += [r for r in metrics_lib.read_metrics(workdir, stage) if "eval_oracle" in r]
    return [
        {
            "step": [int(r["step"]) for r in rows],
            **{k: [r[f"eval_{k}"][i] for r in rows] for k in ("kl", "oracle", "proxy", "length")},
        }
        for i in range(m)
    ]


def load_policies(run_dir: str, setup: reinforce.Setup):
    """The stacked final params [M, ...] of a finished ``train_policies`` run, on ``setup``'s mesh
    (``sharding.stacked_specs``: the 'ensemble' axis leading). Raises FileNotFoundError when the run has not
    finished."""
    return PolicyRun(run_dir).load_policies(setup.ref_params, setup.param_specs, setup.ctx.mesh)


@register_stage("policy_ensemble")
def run(
    ctx: RunContext,
    cfg: PolicyEnsembleConfig | None = None,
    rl_cfg: reinforce.ReinforceConfig | None = None,
    gen: GenerationConfig | None = None,
) -> None:
    """M policies from the pretrained/SFT policy against ``cfg.reward``; writes WORKDIR/policy_ensemble/."""
    cfg = cfg or PolicyEnsembleConfig()
    setup = reinforce.build(ctx, rl_cfg or reinforce.ReinforceConfig(), gen)
    train_policies(
        setup,
        reward=cfg.reward,
        num_policies=cfg.num_policies,
        init_params=setup.ref_params,
        run_dir=ctx.artefacts.policy_ensemble.dir,
        anchor=cfg.anchor,
        stage="policy_ensemble",
    )
