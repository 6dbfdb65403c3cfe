"""Stage `reinforce`: KL-regularised REINFORCE against each configured reward, then win rates.

Per step: k samples for each of B prompts from the compiled sampler (the policy's params swap in
without a recompile), then ONE jitted pure update ``(state, ref, rm, batch) -> (state, metrics)``:

    R_i   = r_RM(prompt_i + response_i) − β · KL_i,   KL_i = Σ_t (log π − log π_ref)(a_t)
    A_i,t = R_i − baseline        (registry: value head / RLOO / batch mean, advantages.py)
    loss  = −mean_i Σ_t A_i,t · log π(a_t)  (+ value_coef · MSE(V, R) for the value baseline)

The reward is read at the final token (the RM's scalar head), the KL is a per-sequence sum of
log-ratios against the KL anchor, log π is the temperature-1
policy (sampling uses ``temperature``, 0.9 as in the paper). A non-finite update is skipped in
the graph. ``loop.train`` owns resume (the key lives in the state, the prompt iterator is
checkpointed), SIGTERM and metrics. Every ``eval_every`` steps the policy is sampled on
held-out prompts with a fixed key (so runs against different rewards are comparable) and
judged by the proxy reward, the oracle and the KL to the pretrained policy.

KL anchors (``ANCHORS``, chosen per run by ``ReinforceConfig.anchors``):

* ``init``: the frozen reference, the pretrained policy the run starts from (WARM's setting);
* ``ema``: an exponential moving average of the policy itself (WARP, Ramé et al. 2024, §3),
  anchor ← (1 − μ)·anchor + μ·θ after each applied update, μ = ``ReinforceConfig.ema_rate``. The
  anchor starts at the initial policy, lives in the train state (``AnchoredState``, float32
  whatever the parameters' dtype: a bfloat16 anchor would round μ-sized steps away) and so is
  checkpointed with it; a skipped update leaves it unchanged.

Runs are named ``<reward>`` (anchor 'init') and ``<reward>_ema`` (anchor 'ema').
Outputs: WORKDIR/rl/<reward>/ckpt/ and updates.json (applied and skipped updates),
metrics/rl_<reward>.jsonl, WORKDIR/rl/results.json; per prompt, for the claims' bootstrap intervals:
rl/<reward>/eval_scores/<step>.json (oracle and proxy reward on the held-out eval prompts, the same
prompts and sampling key for every reward, at step 0 and every eval step) and
rl/<reward>/winrate_scores.json (the final policy's oracle reward on the win-rate prompts).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import time

import flax.struct
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from warm_jax import batched, cpu_tuning, faults, io_utils, loop, metrics as metrics_lib, oracle as oracle_lib
from warm_jax import seeds
from warm_jax import sharding
from warm_jax.data import pipeline
from warm_jax.models import transformer as tr
from warm_jax.policy import advantages, sampler, winrate
from warm_jax.policy import rewards as rewards_lib
from warm_jax.stages import RunContext, register_stage
from warm_jax.task import prompts as task_prompts
from warm_jax.workdir import PolicyRun, Workdir
from warm_jax.task.generation import GenerationConfig
from warm_jax.train_state import TrainState, guarded_update, new_state, select, state_specs

log = logging.getLogger(__name__)

ANCHORS = ("init", "ema")
SCORES = ("oracle", "proxy", "kl", "length")  # per prompt, from every policy evaluation
# Texts kept per eval (eval_scores/<step>.json): enough to read what a policy writes once it games its reward.
SAMPLES_KEPT = 4


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ReinforceConfig:
    rewards: tuple[str, ...] = ("warm", "member_best", "ens")
    num_steps: int = 60
    prompts_per_step: int = 16  # global batch of prompts
    samples_per_prompt: int = 4  # k
    beta: float = 0.01  # KL coefficient (paper: 0.003 clean labels, 0.01 corrupted)
    baseline: str = "value"  # a key of advantages.ADVANTAGE_ESTIMATORS
    value_coef: float = 0.5
    learning_rate: float = 1e-4
    max_grad_norm: float = 1.0
    temperature: float = 0.9
    num_train_prompts: int = 2_000
    eval_every: int = 20
    num_eval_prompts: int = 128
    num_winrate_prompts: int = 256
    normalise_reward: bool = True
    conservative_lambda: float = 1.0  # for 'ens_conservative'
    # KL anchors to train a policy with, one run per reward and anchor (see ANCHORS); WARP's μ for 'ema'.
    anchors: tuple[str, ...] = ("init",)
    ema_rate: float = 0.01

    def __post_init__(self):
        advantages.get_estimator(self.baseline)
        bad = [r for r in self.rewards if r not in rewards_lib.REWARD_NAMES]
        if bad:
            raise ValueError(f"ReinforceConfig.rewards has unknown {bad}; choose from {rewards_lib.REWARD_NAMES}")
        if self.baseline == "rloo" and self.samples_per_prompt < 2:
            raise ValueError("ReinforceConfig.baseline='rloo' needs samples_per_prompt >= 2")
        anchors = (self.anchors,) if isinstance(self.anchors, str) else tuple(self.anchors)
        for a in anchors:
            check_anchor(a, "ReinforceConfig.anchors")
        if not anchors or len(set(anchors)) != len(anchors):
            raise ValueError(f"ReinforceConfig.anchors must name each of {ANCHORS} at most once, got {self.anchors!r}")
        if not 0.0 <= self.ema_rate <= 1.0:
            raise ValueError(f"ReinforceConfig.ema_rate must lie in [0, 1] (WARP uses 0.01), got {self.ema_rate}")
        object.__setattr__(self, "anchors", anchors)


def check_anchor(anchor: str, binding: str) -> str:
    if anchor not in ANCHORS:
        raise ValueError(f"{binding} = {anchor!r} is not a KL anchor; choose from {ANCHORS}")
    return anchor


def run_name(reward: str, anchor: str) -> str:
    """A single run's name: the reward for anchor 'init' (the original layout), ``<reward>_ema`` for 'ema'."""
    return reward if check_anchor(anchor, "anchor") == "init" else f"{reward}_{anchor}"


# ----------------------------------------------------------------------------- the EMA anchor


@flax.struct.dataclass
class AnchoredState(TrainState):
    """A policy's TrainState plus its KL anchor for ``anchor='ema'``: a float32 tree shaped like params."""

    anchor: object = None

    @classmethod
    def from_state(cls, state: TrainState, anchor) -> AnchoredState:
        return cls(step=state.step, params=state.params, opt_state=state.opt_state, key=state.key, anchor=anchor)


def ema_update(anchor, params, rate):
    """anchor ← (1 − rate)·anchor + rate·params, leafwise in float32 (anchor float32, params any dtype)."""
    return jax.tree.map(lambda a, p: (1.0 - rate) * a + rate * p.astype(jnp.float32), anchor, params)


def anchor_params(state: AnchoredState, like):
    """The EMA anchor in the dtypes of ``like`` (the policy's params), for the KL forward pass."""
    return jax.tree.map(lambda a, p: a.astype(p.dtype), state.anchor, like)


def initial_state(params, tx: optax.GradientTransformation, key, anchor: str):
    """A fresh policy state from ``params`` (copied: the state is donated, ``params`` may be the
    reference): a TrainState for 'init', an AnchoredState whose anchor is float32 ``params`` for 'ema'."""
    state = new_state(jax.tree.map(lambda x: x + 0, params), tx, key)
    if check_anchor(anchor, "anchor") == "ema":
        # A copy of its own too (+ 0): a float32 astype is the input itself, and the state is donated.
        return AnchoredState.from_state(state, jax.tree.map(lambda x: x.astype(jnp.float32) + 0, params))
    return state


def policy_state_specs(tx: optax.GradientTransformation, abstract_params, param_specs, anchor: str):
    """PartitionSpecs of ``initial_state``'s result: the anchor is sharded like the params."""
    specs = state_specs(tx, abstract_params, param_specs)
    return AnchoredState.from_state(specs, param_specs) if anchor == "ema" else specs


# ----------------------------------------------------------------------------- maths


def policy_forward(params, graphdef, tokens, mask, response_start: int):
    """One full forward over prompt + response.

    tokens, mask: [B, P + N] (prompt left-padded, response after column P = response_start).
    Returns log π(a_t) [B, N] (temperature 1), per-token values V(s_t) [B, N] (the state that
    emits a_t) and per-token entropies [B, N].
    """
    model = tr.bind(graphdef, params)
    h, _ = model.hidden(tokens, mask)
    hs = h[:, response_start - 1 : -1]
    logp_all = jax.nn.log_softmax(model.logits(hs), axis=-1)
    logp = jnp.take_along_axis(logp_all, tokens[:, response_start:, None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    return logp, model.value(hs), entropy


def sequence_kl(logp, ref_logp, mask):
    """Per-sequence KL estimate Σ_t (log π − log π_ref) over real response tokens: [B, N] → [B]."""
    return jnp.sum((logp - ref_logp) * mask.astype(jnp.float32), axis=1)


def policy_gradient_loss(logp, mask, adv):
    """−mean_i Σ_t A_i,t · log π(a_i,t) over real tokens. logp, mask, adv: [B, N] → scalar."""
    return -jnp.mean(jnp.sum(adv * logp * mask.astype(jnp.float32), axis=1))


def _sequences(batch):
    tokens = jnp.concatenate([batch["prompt_tokens"], batch["response_tokens"]], axis=1)
    mask = jnp.concatenate([batch["prompt_mask"], batch["response_mask"]], axis=1)
    return tokens, mask


def reinforce_update(
    state: TrainState,
    ref_params,
    rm_state,
    batch,
    *,
    graphdef,
    rm_apply,
    tx,
    cfg: ReinforceConfig,
    pad_id: int,
    anchor: str = "init",
    nan_at_step=faults.NEVER,
):
    """One REINFORCE update (pure). batch: prompt_tokens/prompt_mask [B, P] (k consecutive rows
    per prompt), response_tokens/response_mask [B, N]. The KL is to ``ref_params`` for anchor
    'init' and to ``state.anchor`` (an AnchoredState's EMA, then updated) for 'ema'.
    ``nan_at_step`` (``faults``, tests; may be traced) poisons the update that makes that step. Returns
    (state, scalar metrics)."""
    p = batch["prompt_tokens"].shape[1]
    tokens, mask = _sequences(batch)
    rmask = batch["response_mask"].astype(jnp.float32)
    rm_tokens, rm_len = rewards_lib.repack(
        batch["prompt_tokens"], batch["prompt_mask"], batch["response_tokens"], batch["response_mask"], pad_id=pad_id
    )
    proxy = jax.lax.stop_gradient(rm_apply(rm_state, rm_tokens, rm_len)[0])
    kl_ref = ref_params if check_anchor(anchor, "anchor") == "init" else anchor_params(state, state.params)
    ref_logp = jax.lax.stop_gradient(policy_forward(kl_ref, graphdef, tokens, mask, p)[0])
    estimator = advantages.get_estimator(cfg.baseline)
    needs_value = cfg.baseline in advantages.NEEDS_VALUE

    def loss_fn(params):
        logp, values, entropy = policy_forward(params, graphdef, tokens, mask, p)
        kl = sequence_kl(jax.lax.stop_gradient(logp), ref_logp, rmask)
        returns = proxy - cfg.beta * kl
        adv = estimator(returns, values, rmask, cfg.samples_per_prompt)
        pg = policy_gradient_loss(logp, rmask, adv)
        v_loss = advantages.value_loss(returns, values, rmask) if needs_value else jnp.zeros(())
        n_tok = jnp.maximum(rmask.sum(), 1.0)
        aux = {
            "pg_loss": pg,
            "value_loss": v_loss,
            "kl": kl.mean(),
            "return": returns.mean(),
            "entropy": jnp.sum(entropy * rmask) / n_tok,
            "advantage_abs": jnp.sum(jnp.abs(adv)) / n_tok,
        }
        return pg + cfg.value_coef * v_loss, aux

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new, loss, finite = guarded_update(state, loss, grads, tx, nan_at_step=nan_at_step)
    if anchor == "ema":
        # After the update, towards the new params (WARP's order); a skipped update moves nothing.
        new = new.replace(anchor=select(finite, ema_update(state.anchor, new.params, cfg.ema_rate), state.anchor))
    metrics = {
        "loss": loss,
        "proxy": proxy.mean(),
        "response_length": rmask.sum(1).mean(),
        "grad_norm": optax.tree.norm(grads),
        "finite": finite,
        **aux,
    }
    return new, metrics


def eval_scores(params, ref_params, rm_state, batch, *, graphdef, rm_apply, pad_id: int):
    """Proxy reward [B] and KL [B] of sampled responses (batch as in ``reinforce_update``)."""
    p = batch["prompt_tokens"].shape[1]
    tokens, mask = _sequences(batch)
    rmask = batch["response_mask"].astype(jnp.float32)
    logp = policy_forward(params, graphdef, tokens, mask, p)[0]
    ref_logp = policy_forward(ref_params, graphdef, tokens, mask, p)[0]
    rm_tokens, rm_len = rewards_lib.repack(
        batch["prompt_tokens"], batch["prompt_mask"], batch["response_tokens"], batch["response_mask"], pad_id=pad_id
    )
    return {"proxy": rm_apply(rm_state, rm_tokens, rm_len)[0], "kl": sequence_kl(logp, ref_logp, rmask)}


def make_optimizer(cfg: ReinforceConfig) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), optax.adam(cfg.learning_rate))


# ----------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Setup:
    """Everything shared by the runs against different rewards (compiled once)."""

    ctx: RunContext
    cfg: ReinforceConfig
    gen: GenerationConfig
    model_cfg: tr.ModelConfig
    graphdef: object
    ref_params: object
    param_specs: object
    tok: object
    tx: optax.GradientTransformation
    state_sh: TrainState
    batch_sh: object
    sampler: object  # one compiled program for training rollouts and evals (same config and shardings)
    eval_chunk: int
    train_prompts: task_prompts.PromptSet
    eval_prompts: task_prompts.PromptSet
    winrate_prompts: task_prompts.PromptSet
    oracle: oracle_lib.Oracle
    compiled: dict  # (reward kind, anchor, nan step) → (update, eval_scores); other programs by their own keys
    fault: faults.FaultInjection = faults.FaultInjection()  # tests only (see ``faults``)


def state_shardings(setup: Setup, anchor: str):
    """Shardings of a single policy's state for ``anchor`` (see ``initial_state``)."""
    if anchor == "init":
        return setup.state_sh
    abstract = jax.eval_shape(lambda: setup.ref_params)
    return sharding.named(setup.ctx.mesh, policy_state_specs(setup.tx, abstract, setup.param_specs, anchor))


def build(
    ctx: RunContext,
    cfg: ReinforceConfig,
    gen: GenerationConfig | None = None,
    fault: faults.FaultInjection | None = None,
) -> Setup:
    """Everything the runs share. ``gen``: default gin's GenerationConfig; ``fault``: tests only (default:
    gin's, which injects nothing)."""
    gen = gen or GenerationConfig()
    mesh = ctx.mesh
    trunk = ctx.artefacts.load_trunk(mesh)
    model_cfg, graphdef, ref_params, param_specs = trunk.model_cfg, trunk.graphdef, trunk.params, trunk.specs
    tok = trunk.tokenizer
    shards = sharding.batch_shards(sharding.batch_sharding(mesh, 2))
    rows = cfg.prompts_per_step * cfg.samples_per_prompt
    if rows % shards:
        raise ValueError(
            f"ReinforceConfig.prompts_per_step × samples_per_prompt = {rows} must be a multiple of the mesh's "
            f"{shards} batch shards"
        )
    seed = ctx.seed
    ev = task_prompts.prompt_set(tok, "rl_eval", cfg.num_eval_prompts, seed, gen.max_prompt_len)
    wr = task_prompts.prompt_set(tok, "rl_winrate", cfg.num_winrate_prompts, seed, gen.max_prompt_len)
    held_out = set(ev.texts) | set(wr.texts)
    tr_ = task_prompts.prompt_set(tok, "rl_train", cfg.num_train_prompts, seed, gen.max_prompt_len, exclude=held_out)
    tx = make_optimizer(cfg)
    state_sh = sharding.named(mesh, state_specs(tx, jax.eval_shape(lambda: ref_params), param_specs))
    batch_sh = sharding.batch_sharding(mesh, 2)
    param_sh = sharding.named(mesh, param_specs)
    repl = sharding.replicated(mesh)
    samp_cfg = sampler.SamplingConfig(
        max_new_tokens=gen.max_new_tokens, temperature=cfg.temperature, eos_id=tok.eos_id, pad_id=tok.pad_id
    )
    # Explicit shardings: new params (same shapes, same shardings) never trigger a recompile.
    policy_sampler = sampler.make_sampler(
        graphdef, model_cfg, samp_cfg, in_shardings=(param_sh, batch_sh, batch_sh, repl)
    )
    eval_chunk = sharding.shard_batch_size(min(256, cfg.num_eval_prompts), batch_sh)
    return Setup(
        ctx,
        cfg,
        gen,
        model_cfg,
        graphdef,
        ref_params,
        param_specs,
        tok,
        tx,
        state_sh,
        batch_sh,
        policy_sampler,
        eval_chunk,
        tr_,
        ev,
        wr,
        oracle_lib.make_oracle(gen.oracle),
        {},
        fault or faults.FaultInjection(),
    )


def compiled_for(setup: Setup, reward_fn: rewards_lib.RewardFn, anchor: str = "init"):
    """(update, eval) jitted for this reward's kind and the KL anchor; rewards of one kind share them."""
    name = (reward_fn.kind, anchor, setup.fault.nan_at_step)
    if name not in setup.compiled:
        mesh, cfg = setup.ctx.mesh, setup.cfg
        repl = sharding.replicated(mesh)
        param_sh = sharding.named(mesh, setup.param_specs)
        rm_sh = rm_shardings(reward_fn, mesh)
        state_sh = state_shardings(setup, anchor)
        update = jax.jit(
            functools.partial(
                reinforce_update,
                graphdef=setup.graphdef,
                rm_apply=reward_fn.apply,
                tx=setup.tx,
                cfg=cfg,
                pad_id=setup.tok.pad_id,
                anchor=anchor,
                nan_at_step=setup.fault.nan_at_step,
            ),
            in_shardings=(state_sh, param_sh, rm_sh, setup.batch_sh),
            out_shardings=(state_sh, repl),
            donate_argnums=0,
            compiler_options=cpu_tuning.compiler_options(cpu_tuning.TRAIN_STEP),
        )
        evaluate = jax.jit(
            functools.partial(eval_scores, graphdef=setup.graphdef, rm_apply=reward_fn.apply, pad_id=setup.tok.pad_id),
            in_shardings=(param_sh, param_sh, rm_sh, setup.batch_sh),
        )
        setup.compiled[name] = (update, evaluate)
    return setup.compiled[name]


def rm_shardings(reward_fn: rewards_lib.RewardFn, mesh) -> dict:
    """The reward state's shardings: parameters where they were loaded, constants replicated."""
    repl = sharding.replicated(mesh)
    return {"params": jax.tree.map(lambda x: x.sharding, reward_fn.params), "shift": repl, "scale": repl, "lam": repl}


def rm_state_on_mesh(reward_fn: rewards_lib.RewardFn, mesh) -> dict:
    return jax.device_put(reward_fn.state, rm_shardings(reward_fn, mesh))


def evaluate_policy(setup: Setup, params, reward_fn, prompts: task_prompts.PromptSet, key) -> dict[str, np.ndarray]:
    """Samples ``prompts`` with a fixed key; per prompt (host arrays [R]) the ``SCORES`` and the scored ``texts``."""
    mesh = setup.ctx.mesh
    samples = sampler.sample_in_batches(
        setup.sampler, params, prompts.tokens, prompts.mask, key, batch=setup.eval_chunk, mesh=mesh
    )
    _, evaluate = compiled_for(setup, reward_fn)
    rm_state = rm_state_on_mesh(reward_fn, mesh)
    parts = {
        "prompt_tokens": prompts.tokens,
        "prompt_mask": prompts.mask,
        "response_tokens": samples["tokens"],
        "response_mask": samples["mask"],
    }
    scores = batched.map_batches(
        lambda b, _: evaluate(params, setup.ref_params, rm_state, b), parts, batch_size=setup.eval_chunk, mesh=mesh
    )
    texts = task_prompts.oracle_texts(setup.tok, prompts.texts, samples["tokens"])
    return {
        "oracle": setup.oracle.score(texts),
        "proxy": scores["proxy"],
        "kl": scores["kl"],
        "length": samples["length"].astype(np.float32),
        "texts": np.asarray(texts),
    }


def write_eval_scores(run: PolicyRun, step: int, ev: dict[str, np.ndarray]) -> None:
    """Per-prompt oracle and proxy reward of one eval (process 0), a non-finite value stored as null, and the
    first ``SAMPLES_KEPT`` scored texts."""

    def plain(x):
        return [float(v) if np.isfinite(v) else None for v in np.asarray(x, np.float64)]

    io_utils.atomic_write_json(
        run.eval_scores(step),
        {
            "step": int(step),
            "oracle": plain(ev["oracle"]),
            "proxy": plain(ev["proxy"]),
            "samples": [str(t) for t in ev.get("texts", ())[:SAMPLES_KEPT]],
        },
    )


def _summary(ev: dict[str, np.ndarray], prefix: str = "eval_") -> dict[str, float]:
    return {f"{prefix}{k}": float(np.mean(ev[k])) for k in SCORES}


def eval_key(setup: Setup):
    return task_prompts.sampling_key(setup.ctx.seed, "rl_eval")


class StepRunner:
    """The step ``loop.train`` calls: sample (timed), then the jitted update (timed).

    The state's key drives sampling (fold_in of the step), so the step is deterministic given
    the state and batch; the host timings only feed the metrics.
    """

    def __init__(self, setup: Setup, reward_fn: rewards_lib.RewardFn, anchor: str = "init"):
        self.setup, self.reward_fn = setup, reward_fn
        self.update = compiled_for(setup, reward_fn, anchor)[0]
        self.rm_state = rm_state_on_mesh(reward_fn, setup.ctx.mesh)
        self.last = None  # (prompt indices [B], response tokens [B, N]) of the latest step, for the oracle
        self.params = None  # the latest params (valid until the next step donates them)

    def __call__(self, state: TrainState, batch):
        t0 = time.perf_counter()
        key = jax.random.fold_in(state.step_key(), 0)
        gen = self.setup.sampler(state.params, batch["tokens"], batch["mask"], key)
        jax.block_until_ready(gen)
        t1 = time.perf_counter()
        full = {
            "prompt_tokens": batch["tokens"],
            "prompt_mask": batch["mask"],
            "response_tokens": gen["tokens"],
            "response_mask": gen["mask"],
        }
        state, metrics = self.update(state, self.setup.ref_params, self.rm_state, full)
        jax.block_until_ready(metrics)
        t2 = time.perf_counter()
        self.last = (batch["texts_index"], gen["tokens"])
        self.params = state.params
        metrics = {**metrics, "gen_time_share": (t1 - t0) / max(t2 - t0, 1e-9), "step_time": t2 - t0}
        return state, metrics


def prompt_iterator(setup: Setup, seed: int) -> pipeline.PreferenceIterator:
    """The training prompts in the order of ``seed``: batches of tokens, mask [b, P] and index [b]."""
    records = [
        {"tokens": t, "mask": m, "index": np.int32(i)}
        for i, (t, m) in enumerate(zip(setup.train_prompts.tokens, setup.train_prompts.mask))
    ]
    return pipeline.PreferenceIterator(
        records,
        batch_size=setup.cfg.prompts_per_step,
        seed=seed,
        fields=("tokens", "mask", "index"),
        process_index=0,
        process_count=1,  # every process reads the global batch (see sharding.put_global)
    )


def loop_config(cfg: ReinforceConfig) -> loop.LoopConfig:
    """The gin LoopConfig, logging on every eval step too (the eval metrics ride on the log rows)."""
    base = loop.LoopConfig()
    return dataclasses.replace(base, log_every=math.gcd(base.log_every, cfg.eval_every))


def train_one(setup: Setup, name: str, anchor: str = "init") -> TrainState:
    """Trains the policy against reward ``name`` with KL ``anchor``; returns the final state (resumes
    if it can). The run is ``run_name(name, anchor)``; both anchors draw the same keys and prompts."""
    ctx, cfg = setup.ctx, setup.cfg
    reward_fn = rewards_lib.load_reward(
        ctx, name, conservative_lambda=cfg.conservative_lambda, normalise=cfg.normalise_reward
    )
    key = seeds.key(ctx.seed, "reinforce", name)
    state_sh = state_shardings(setup, anchor)
    # The policy starts as a copy of the reference (the state is donated; the reference is not).
    state = jax.jit(lambda p: initial_state(p, setup.tx, key, anchor), out_shardings=state_sh)(setup.ref_params)
    abstract_state = sharding.abstract_with_sharding(jax.eval_shape(lambda: state), state_sh)

    k = cfg.samples_per_prompt
    iterator = prompt_iterator(setup, seeds.seed(ctx.seed, "reinforce", "prompt_order"))

    def to_device(b):
        # k consecutive rows per prompt (the layout RLOO's baseline expects).
        local = {f: np.repeat(b[f], k, axis=0) for f in ("tokens", "mask")}
        out = pipeline.to_global(local, setup.batch_sh)
        out["texts_index"] = np.repeat(b["index"], k)  # host-side, for the oracle
        return out

    run = ctx.artefacts.rl_run(run_name(name, anchor))
    if not os.path.exists(run.initial_eval):
        ev = evaluate_policy(setup, setup.ref_params, reward_fn, setup.eval_prompts, eval_key(setup))
        if jax.process_index() == 0:
            write_eval_scores(run, 0, ev)
            io_utils.atomic_write_json(run.initial_eval, {"step": 0, **_summary(ev)})

    runner = StepRunner(setup, reward_fn, anchor)

    def on_log(step: int, host: dict) -> dict:
        extra = {}
        if runner.last is not None:
            idx, toks = runner.last
            texts = [setup.train_prompts.texts[i] for i in np.asarray(idx)]
            toks = np.asarray(multihost_utils.process_allgather(toks, tiled=True))
            extra["oracle"] = float(np.mean(setup.oracle.score(task_prompts.oracle_texts(setup.tok, texts, toks))))
        if step % cfg.eval_every == 0 or step == cfg.num_steps:
            ev = evaluate_policy(setup, runner.params, reward_fn, setup.eval_prompts, eval_key(setup))
            if jax.process_index() == 0:
                write_eval_scores(run, step, ev)
            extra.update(_summary(ev))
        return extra

    loop_cfg = loop_config(cfg)
    final = loop.train(
        stage=f"rl_{run_name(name, anchor)}",
        workdir=ctx.workdir,
        state=state,
        abstract_state=abstract_state,
        step_fn=runner,
        iterator=iterator,
        to_device=to_device,
        num_steps=cfg.num_steps,
        ckpt_dir=run.ckpt,
        cfg=loop_cfg,
        show=("proxy", "kl", "oracle"),
        on_log=on_log,
        fault=setup.fault,
    )
    wr = evaluate_policy(setup, final.params, reward_fn, setup.winrate_prompts, jax.random.fold_in(eval_key(setup), 1))
    if jax.process_index() == 0:
        io_utils.atomic_write_json(
            run.winrate_scores, {"oracle": wr["oracle"].tolist(), "step": loop.scalar_step(final)}
        )
    return final


def run_curve(workdir: str, name: str) -> dict[str, list]:
    """Held-out eval curve of one run: step 0 (the reference policy) then every eval step."""
    rows = [io_utils.read_json(Workdir(workdir).rl_run(name).initial_eval)]
    rows += [r for r in metrics_lib.read_metrics(workdir, f"rl_{name}") if "eval_oracle" in r]
    return {
        "step": [int(r["step"]) for r in rows],
        "kl": [r["eval_kl"] for r in rows],
        "oracle": [r["eval_oracle"] for r in rows],
        "proxy": [r["eval_proxy"] for r in rows],
        "length": [r["eval_length"] for r in rows],
    }


def win_rates(workdir: str, names) -> dict:
    wd = Workdir(workdir)
    scores = {n: io_utils.read_json(wd.rl_run(n).winrate_scores)["oracle"] for n in names}
    out = {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            out[f"{a}_vs_{b}"] = winrate.win_rate(scores[a], scores[b])
    return out


@register_stage("reinforce")
def run(ctx: RunContext, cfg: ReinforceConfig | None = None, gen: GenerationConfig | None = None) -> None:
    cfg = cfg or ReinforceConfig()
    setup = build(ctx, cfg, gen)
    runs = []
    for name in cfg.rewards:
        for anchor in cfg.anchors:
            t0 = time.time()
            train_one(setup, name, anchor)
            runs.append(run_name(name, anchor))
            log.info("[reinforce] %s: %.1fs", runs[-1], time.time() - t0)
    if jax.process_index() == 0:
        wd = ctx.artefacts
        result = {
            "runs": {n: {**run_curve(ctx.workdir, n), "updates": loop.read_updates(wd.rl_run(n).ckpt)} for n in runs},
            "win_rate": win_rates(ctx.workdir, runs),
            "config": dataclasses.asdict(cfg),
        }
        io_utils.atomic_write_json(wd.rl_results, result)
