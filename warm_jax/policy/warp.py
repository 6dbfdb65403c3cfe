"""Stage `warp`: Weight Averaged Rewarded Policies (Ramé et al., 2024, arXiv 2406.16768).

Per iteration k, from that iteration's init θ_k (θ_0 = the SFT policy):

1. M policies trained by REINFORCE against ``WarpConfig.reward``, each KL-anchored to an exponential
   moving average of itself, as one vmapped program (``policy_ensemble.train_policies``);
2. merged by ``WarpConfig.merge_method`` (SLERP of the task vectors θ_i − θ_k by default,
   ``merge_methods.merge_stacked``) into θ_merged, checkpointed (the η = 1 point);
3. interpolated back towards θ_k: LITI θ(η) = θ_k + η·(θ_merged − θ_k) for every η of
   ``WarpConfig.etas``; each point sampled on the held-out eval prompts with the fixed eval key of the
   ``reinforce`` stage (the same prompts and key as the single policies) and scored by the oracle, the
   proxy reward and the KL to the *original* SFT policy — the front of iteration k;
4. θ_{k+1} = θ(``next_eta``), checkpointed, starts the next iteration.

Every part is kept as it finishes, so a rerun resumes where the last one stopped: the policies resume
from their own checkpoints, and a finished merge, η point or next init is read back, not recomputed.

Outputs (WORKDIR/warp/): iter_<k>/policies/ (the M policies, ``policy_ensemble``'s layout),
iter_<k>/merged/ and iter_<k>/next_init/ (``params_io`` checkpoints: exportable with
``python -m warm_jax.export --kind=causal_lm`` like any policy), iter_<k>/front/<i>.json (η point i,
per prompt), results.json (the front per iteration: η, KL, oracle, proxy, length) and
front_examples.npz (per-prompt "iter<k>/oracle|proxy|kl" [E, P], for the claims' bootstrap), named in
results.json with its SHA-256.

`policy_merge` is the merge alone, as its own stage: it merges the M policies the `policy_ensemble`
stage trained from the SFT policy and evaluates the same η grid (one WARP iteration split into two
stages, so each keeps its own DONE.json, configuration record and --rerun_from); it writes
policy_merge/ in the same format, read by the report when there is no `warp` stage.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import gin
import jax
import numpy as np

from warm_jax import io_utils, merge_methods, params_io, seeds, sharding
from warm_jax.policy import policy_ensemble, reinforce
from warm_jax.policy import rewards as rewards_lib
from warm_jax.stages import RunContext, register_stage
from warm_jax.workdir import MergeRun
from warm_jax.task.generation import GenerationConfig

log = logging.getLogger(__name__)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class WarpConfig:
    reward: str = "warm"  # one of rewards.REWARD_NAMES: the reward every WARP policy is trained against
    iterations: int = 2
    num_policies: int = 2  # M, merged per iteration
    etas: tuple[float, ...] = tuple(i / 10 for i in range(11))  # the LITI grid: θ_k + η·(θ_merged − θ_k)
    next_eta: float = 0.3  # the LITI point that starts the next iteration
    merge_method: str = "slerp"  # a method of merge_methods.merge_stacked
    merge_params: tuple[tuple[str, float], ...] = ()  # the method's parameters, e.g. (('density', 0.5),)

    def __post_init__(self):
        if self.reward not in rewards_lib.REWARD_NAMES:
            raise ValueError(f"WarpConfig.reward = {self.reward!r}; choose from {rewards_lib.REWARD_NAMES}")
        if self.iterations < 1:
            raise ValueError(f"WarpConfig.iterations = {self.iterations} must be >= 1")
        if self.num_policies < 2:
            raise ValueError(f"WarpConfig.num_policies = {self.num_policies} must be >= 2 (a merge needs two policies)")
        etas = [float(e) for e in self.etas]
        if not etas or any(not 0.0 <= e <= 1.0 for e in etas) or sorted(set(etas)) != etas:
            raise ValueError(f"WarpConfig.etas = {tuple(self.etas)} must be distinct, increasing values in [0, 1]")
        if not 0.0 <= self.next_eta <= 1.0:
            raise ValueError(f"WarpConfig.next_eta = {self.next_eta} must lie in [0, 1]")
        if self.merge_method not in merge_methods.MERGE_METHODS:
            known = ", ".join(sorted(merge_methods.MERGE_METHODS))
            raise ValueError(f"WarpConfig.merge_method = {self.merge_method!r} is unknown; known: {known}")
        try:
            merge_methods.get_merge_method(self.merge_method).resolve_params(dict(self.merge_params))
        except (ValueError, TypeError) as e:
            raise ValueError(f"WarpConfig.merge_params = {tuple(self.merge_params)}: {e}") from e


def single_runs(reward: str) -> dict[str, str]:
    """The `reinforce` runs WARP against ``reward`` is compared with (one per KL anchor): run name → anchor."""
    return {reinforce.run_name(reward, anchor): anchor for anchor in reinforce.ANCHORS}


# ----------------------------------------------------------------------------- merge and LITI


def merge(setup: reinforce.Setup, stacked, base, method: str, *, name: str, params=()):
    """θ_merged: the stacked policies [M, ...] merged by ``method`` relative to ``base``, placed like one policy.

    Methods that draw (DARE) use the key of the stream ("merge", ``name``) (the merge's place in the workdir)."""
    key = seeds.key(setup.ctx.seed, "merge", name)
    merged = merge_methods.merge_stacked(stacked, method=method, base=base, key=key, **dict(params))
    return jax.device_put(merged, sharding.named(setup.ctx.mesh, setup.param_specs))


def liti(setup: reinforce.Setup, base, merged, eta: float):
    """θ(η) = base + η·(merged − base), placed like one policy (the eval sampler never recompiles)."""
    out = merge_methods.liti(base, merged, np.float32(eta))
    return jax.device_put(out, sharding.named(setup.ctx.mesh, setup.param_specs))


def save_policy(setup: reinforce.Setup, directory: str, params, meta: dict) -> None:
    params_io.save_params(
        directory,
        params,
        model_cfg=setup.model_cfg,
        meta=meta,
        tokenizer_dir=setup.ctx.artefacts.trunk_tokenizer_dir(),
    )


def load_policy(setup: reinforce.Setup, directory: str):
    return params_io.load_params_checkpoint(directory, setup.ctx.mesh)[2]


def _finished(directory: str) -> bool:
    io_utils.recover(directory)
    return os.path.isfile(os.path.join(directory, "model.json"))


def evaluate_front(setup, reward_fn, base, merged, etas, run: MergeRun) -> dict[str, np.ndarray]:
    """Every LITI point between ``base`` and ``merged`` on the held-out eval prompts.

    Each point is written to ``run.front_point(i)`` as it finishes and read back on a rerun. Returns
    {"eta" [E], "oracle" | "proxy" | "kl" | "length" [E, P]} (KL to the SFT policy, setup.ref_params).
    """
    rows = []
    for i, eta in enumerate(etas):
        path = run.front_point(i)
        if os.path.exists(path):
            row = io_utils.read_json(path)
            if abs(row["eta"] - float(eta)) > 1e-12:
                raise ValueError(f"{path}: holds η = {row['eta']}, not {eta} (WarpConfig.etas changed?)")
        else:
            params = liti(setup, base, merged, eta)
            ev = reinforce.evaluate_policy(setup, params, reward_fn, setup.eval_prompts, reinforce.eval_key(setup))
            row = {"eta": float(eta), **{k: np.asarray(ev[k], np.float64).tolist() for k in reinforce.SCORES}}
            if jax.process_index() == 0:
                io_utils.atomic_write_json(path, row)
            log.info(
                "[warp] η = %.2f: KL %.3f, oracle %.3f, proxy %.3f",
                eta,
                np.mean(ev["kl"]),
                np.mean(ev["oracle"]),
                np.mean(ev["proxy"]),
            )
        rows.append(row)
    out = {"eta": np.asarray([r["eta"] for r in rows])}
    for k in ("oracle", "proxy", "kl", "length"):
        out[k] = np.asarray([r[k] for r in rows], np.float64)
    return out


def front_record(iteration: int, front: dict[str, np.ndarray], **extra) -> dict:
    """One iteration of results.json: η and the means over prompts of KL, oracle, proxy and length."""
    means = {k: [float(x) for x in np.mean(front[k], axis=1)] for k in ("kl", "oracle", "proxy", "length")}
    return {"iteration": iteration, "eta": [float(e) for e in front["eta"]], **means, **extra}


def write_results(run: MergeRun, iterations: list[dict], fronts: list[dict], **extra) -> dict:
    """front_examples.npz, then results.json naming it with its SHA-256 (process 0 only)."""
    arrays = {}
    for it, front in zip(iterations, fronts):
        for k in ("oracle", "proxy", "kl"):
            arrays[f"iter{it['iteration']}/{k}"] = front[k]
    sha = io_utils.write_arrays(run.front_examples, arrays)
    result = {
        "iterations": iterations,
        **extra,
        "per_prompt": {"file": os.path.basename(run.front_examples), "sha256": sha},
    }
    io_utils.atomic_write_json(run.results, result)
    return result


def read_front_examples(result: dict) -> dict[str, np.ndarray]:
    """The per-prompt arrays results.json names ("iter<k>/oracle|proxy|kl" [E, P]).

    Raises io_utils.StaleArraysError when the file is missing or does not match its SHA-256."""
    ref = result.get("per_prompt")
    if not isinstance(ref, dict) or "file" not in ref:
        raise io_utils.StaleArraysError(f"{result['directory']}: results.json records no per-prompt front")
    return io_utils.read_arrays(os.path.join(result["directory"], ref["file"]), ref.get("sha256"))


# ----------------------------------------------------------------------------- the stages


def _setup(ctx: RunContext, reward: str, rl_cfg: reinforce.ReinforceConfig | None, gen: GenerationConfig | None):
    rl_cfg = rl_cfg or reinforce.ReinforceConfig()
    setup = reinforce.build(ctx, rl_cfg, gen)
    reward_fn = rewards_lib.load_reward(
        ctx, reward, conservative_lambda=rl_cfg.conservative_lambda, normalise=rl_cfg.normalise_reward
    )
    return setup, reward_fn


def merged_policy(setup, cfg: WarpConfig, init, directory: str, stacked_fn, meta: dict):
    """The merge of the policies ``stacked_fn()`` returns, relative to ``init``: read from ``directory``
    when a run finished it, else merged and saved there (the η = 1 point, exportable like any policy)."""
    if _finished(directory):
        return load_policy(setup, directory)
    stacked = stacked_fn()
    name = setup.ctx.artefacts.relative(directory)
    merged = merge(setup, stacked, init, cfg.merge_method, name=name, params=cfg.merge_params)
    del stacked
    save_policy(setup, directory, merged, {**meta, "eta": 1.0})
    return merged


def run_iteration(setup, reward_fn, cfg: WarpConfig, k: int, init, it: MergeRun):
    """One WARP iteration from ``init`` in ``it`` (warp/iter_<k>): M EMA-anchored policies, their merge, the LITI
    front towards ``init``, the next init. Returns (record, front, next init)."""
    wd = setup.ctx.artefacts
    merged_dir, next_dir = it.merged, it.next_init
    meta = {
        "warp_iteration": k,
        "merge_method": cfg.merge_method,
        "num_policies": cfg.num_policies,
        "reward": cfg.reward,
    }

    def train():
        t0 = time.time()
        stacked = policy_ensemble.train_policies(
            setup,
            reward=cfg.reward,
            num_policies=cfg.num_policies,
            init_params=init,
            run_dir=it.policies.dir,
            anchor="ema",
            stage=f"warp_iter{k}",
        )
        log.info("[warp] iteration %d: %d policies trained in %.1fs", k, cfg.num_policies, time.time() - t0)
        return stacked

    merged = merged_policy(setup, cfg, init, merged_dir, train, meta)
    front = evaluate_front(setup, reward_fn, init, merged, cfg.etas, it)
    if _finished(next_dir):
        nxt = load_policy(setup, next_dir)
    else:
        nxt = liti(setup, init, merged, cfg.next_eta)
        save_policy(setup, next_dir, nxt, {**meta, "eta": cfg.next_eta})
    paths = {"merged": wd.relative(merged_dir), "next_init": wd.relative(next_dir)}
    return front_record(k, front, **paths), front, nxt


@register_stage("warp")
def run(
    ctx: RunContext,
    cfg: WarpConfig | None = None,
    rl_cfg: reinforce.ReinforceConfig | None = None,
    gen: GenerationConfig | None = None,
) -> None:
    """``cfg.iterations`` WARP iterations from the SFT policy; writes WORKDIR/warp/."""
    cfg = cfg or WarpConfig()
    setup, reward_fn = _setup(ctx, cfg.reward, rl_cfg, gen)
    init = setup.ref_params
    records, fronts = [], []
    for k in range(cfg.iterations):
        record, front, init = run_iteration(setup, reward_fn, cfg, k, init, ctx.artefacts.warp_iteration(k))
        records.append(record)
        fronts.append(front)
        best = int(np.argmax(record["oracle"]))
        log.info(
            "[warp] iteration %d: best oracle %.3f at η = %g (KL %.3f)",
            k,
            record["oracle"][best],
            record["eta"][best],
            record["kl"][best],
        )
    if jax.process_index() == 0:
        write_results(
            ctx.artefacts.warp,
            records,
            fronts,
            reward=cfg.reward,
            next_eta=cfg.next_eta,
            config=dataclasses.asdict(cfg),
        )


@register_stage("policy_merge")
def run_merge(
    ctx: RunContext,
    cfg: WarpConfig | None = None,
    rl_cfg: reinforce.ReinforceConfig | None = None,
    gen: GenerationConfig | None = None,
) -> None:
    """One WARP merge of the `policy_ensemble` stage's policies (trained from the SFT policy): the merge
    relative to the SFT policy and its LITI front; writes WORKDIR/policy_merge/ (``WarpConfig.etas``,
    ``.merge_method``; the reward and M are the ensemble's own)."""
    cfg = cfg or WarpConfig()
    wd = ctx.artefacts
    policies = wd.policy_ensemble
    info = io_utils.read_json(policies.meta)
    setup, reward_fn = _setup(ctx, info["reward"], rl_cfg, gen)
    init = setup.ref_params
    out = wd.policy_merge
    meta = {
        "merge_method": cfg.merge_method,
        "num_policies": info["num_policies"],
        "reward": info["reward"],
        "anchor": info["anchor"],
    }
    merged = merged_policy(
        setup,
        cfg,
        init,
        out.merged,
        lambda: policies.load_policies(setup.ref_params, setup.param_specs, ctx.mesh),
        meta,
    )
    front = evaluate_front(setup, reward_fn, init, merged, cfg.etas, out)
    record = front_record(0, front, merged=wd.relative(out.merged))
    if jax.process_index() == 0:
        write_results(out, [record], [front], reward=info["reward"], config={**dataclasses.asdict(cfg), **meta})
