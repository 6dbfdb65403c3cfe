"""Stage `bon`: Best-of-N selection by each reward, judged by the oracle.

The largest N is sampled once per prompt; a smaller N is evaluated on the Nmax/N disjoint
groups of N samples that the Nmax samples split into (the best sample of each group by the
proxy reward is judged by the oracle, and the oracle scores are averaged over groups and
prompts), which gives every N the same samples and a lower-variance estimate than taking only
the first N. KL(BoN ‖ policy) = log N − (N − 1)/N.

results.json holds, per reward and N, the mean over prompts of the oracle reward of the choice
(``oracle``) and its standard error over prompts (``oracle_se``); the per-prompt values
(``oracle/<reward>`` [len(n), num_prompts], float64, each prompt's mean over its groups) are in
bon/per_prompt.npz, whose SHA-256 results.json records under ``per_prompt``. The claims' bootstrap
intervals resample these prompts.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os

import gin
import jax
import numpy as np

from warm_jax import batched, io_utils, oracle as oracle_lib, stats
from warm_jax.policy import rewards as rewards_lib
from warm_jax.policy import sampler
from warm_jax.stages import RunContext, register_stage
from warm_jax.task import prompts as task_prompts
from warm_jax.workdir import Workdir
from warm_jax.task.generation import GenerationConfig

log = logging.getLogger(__name__)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class BonConfig:
    n_values: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    rewards: tuple[str, ...] = ("warm", "member_best", "ens", "ens_conservative")
    conservative_lambda: float = 1.0
    num_prompts: int = 64
    temperature: float = 1.0
    sample_batch_size: int = 512
    score_batch_size: int = 1024
    normalise_reward: bool = True

    def __post_init__(self):
        if not self.n_values or min(self.n_values) < 1:
            raise ValueError(f"BonConfig.n_values must be positive integers, got {self.n_values}")
        bad = [r for r in self.rewards if r not in rewards_lib.REWARD_NAMES]
        if bad:
            raise ValueError(f"BonConfig.rewards has unknown {bad}; choose from {rewards_lib.REWARD_NAMES}")


def bon_kl(n: int) -> float:
    """KL between the Best-of-N distribution and the base policy: log N − (N − 1)/N."""
    return math.log(n) - (n - 1) / n


def score_rewards(
    reward_fn: rewards_lib.RewardFn, prompt_tokens, prompt_mask, samples, *, batch: int, pad_id: int, mesh
):
    """(reward [R], std [R]) host arrays of policy samples, scored in fixed-size batches (``batched.map_batches``).

    prompt_tokens, prompt_mask: [R, P] left-padded; samples: tokens, mask [R, N] of the responses."""

    def score(b, _):
        return reward_fn(*rewards_lib.repack_jit(b["pt"], b["pm"], b["rt"], b["rm"], pad_id=pad_id))

    inputs = {"pt": prompt_tokens, "pm": prompt_mask, "rt": samples["tokens"], "rm": samples["mask"]}
    r, std = batched.map_batches(score, inputs, batch_size=batch, mesh=mesh)
    return r, std


def best_of_n_per_prompt(proxy, gold, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per prompt, the mean (oracle, proxy) of the proxy-best sample over its disjoint groups of ``n``.

    proxy, gold: [num_prompts, Nmax]. Groups: columns [g·n, (g+1)·n) for g < Nmax // n. Returns [num_prompts] x 2.
    """
    p, nmax = proxy.shape
    groups = nmax // n
    if groups == 0:
        raise ValueError(f"N={n} exceeds the {nmax} samples drawn per prompt")
    pr = np.asarray(proxy)[:, : groups * n].reshape(p, groups, n)
    go = np.asarray(gold)[:, : groups * n].reshape(p, groups, n)
    pick = np.argmax(pr, axis=-1)[..., None]
    return np.take_along_axis(go, pick, -1)[..., 0].mean(1), np.take_along_axis(pr, pick, -1)[..., 0].mean(1)


def best_of_n(proxy, gold, n: int) -> tuple[float, float]:
    """Mean (oracle, proxy) of the proxy-best sample over disjoint groups of ``n`` and over prompts."""
    go, pr = best_of_n_per_prompt(proxy, gold, n)
    return float(go.mean()), float(pr.mean())


def run_bon(ctx: RunContext, cfg: BonConfig, gen: GenerationConfig) -> tuple[dict, dict[str, np.ndarray]]:
    trunk = ctx.artefacts.load_trunk(ctx.mesh)
    model_cfg, graphdef, params, tok = trunk.model_cfg, trunk.graphdef, trunk.params, trunk.tokenizer
    nmax = max(cfg.n_values)
    prompts = task_prompts.prompt_set(tok, "bon", cfg.num_prompts, ctx.seed, gen.max_prompt_len)
    texts, ptoks, pmask = prompts.texts, prompts.tokens, prompts.mask
    rep_t, rep_m = np.repeat(ptoks, nmax, axis=0), np.repeat(pmask, nmax, axis=0)  # prompt-major rows
    rep_texts = [t for t in texts for _ in range(nmax)]
    samp_cfg = sampler.SamplingConfig(
        max_new_tokens=gen.max_new_tokens, temperature=cfg.temperature, eos_id=tok.eos_id, pad_id=tok.pad_id
    )
    samples = sampler.sample_in_batches(
        sampler.make_sampler(graphdef, model_cfg, samp_cfg),
        params,
        rep_t,
        rep_m,
        task_prompts.sampling_key(ctx.seed, "bon"),
        batch=min(cfg.sample_batch_size, len(rep_t)),
        mesh=ctx.mesh,
    )
    gold = oracle_lib.make_oracle(gen.oracle).score(task_prompts.oracle_texts(tok, rep_texts, samples["tokens"]))
    gold = gold.reshape(cfg.num_prompts, nmax)
    log.info(
        "[bon] %d prompts x %d samples; mean oracle %.4f, mean length %.1f",
        cfg.num_prompts,
        nmax,
        gold.mean(),
        samples["length"].mean(),
    )

    score_batch = min(cfg.score_batch_size, len(rep_t))
    proxies: dict[str, np.ndarray] = {}
    ens_needed = any(r.startswith("ens") for r in cfg.rewards)
    for name in [r for r in cfg.rewards if not r.startswith("ens")] + (["ens"] if ens_needed else []):
        fn = rewards_lib.load_reward(ctx, name, normalise=cfg.normalise_reward)
        r, std = score_rewards(fn, rep_t, rep_m, samples, batch=score_batch, pad_id=tok.pad_id, mesh=ctx.mesh)
        if name == "ens":
            # Conservative ENS from the same member scores: mean − λ·std (both normalised).
            proxies["ens"] = r
            proxies["ens_conservative"] = r - cfg.conservative_lambda * std
        else:
            proxies[name] = r
    result = {
        "n": list(cfg.n_values),
        "kl": [bon_kl(n) for n in cfg.n_values],
        "oracle": {},
        "proxy": {},
        "num_prompts": cfg.num_prompts,
        "samples_per_prompt": nmax,
        "temperature": cfg.temperature,
        "oracle_mean_all_samples": float(gold.mean()),
    }
    per_prompt = {"n": np.asarray(cfg.n_values, np.int64)}
    result["oracle_se"] = {}
    for name in cfg.rewards:
        proxy = proxies[name].reshape(cfg.num_prompts, nmax)
        rows = [best_of_n_per_prompt(proxy, gold, n) for n in cfg.n_values]
        per_prompt[f"oracle/{name}"] = np.stack([g for g, _ in rows]).astype(np.float64)
        result["oracle"][name] = [float(g.mean()) for g, _ in rows]
        result["oracle_se"][name] = [stats.standard_error(g) for g, _ in rows]
        result["proxy"][name] = [float(p.mean()) for _, p in rows]
        log.info("[bon] %s: oracle %s", name, [round(v, 4) for v in result["oracle"][name]])
    return result, per_prompt


def write_results(wd: Workdir, result: dict, per_prompt: dict[str, np.ndarray]) -> dict:
    """bon/per_prompt.npz, then bon/results.json naming it with its SHA-256 (process 0 only)."""
    sha = io_utils.write_arrays(wd.bon_per_prompt, per_prompt)
    result = {**result, "per_prompt": {"file": os.path.basename(wd.bon_per_prompt), "sha256": sha}}
    io_utils.atomic_write_json(wd.bon_results, result)
    return result


def read_per_prompt(directory: str, result: dict) -> dict[str, np.ndarray]:
    """The per-prompt oracle rewards results.json points to ({'n', 'oracle/<reward>'}).

    Raises io_utils.StaleArraysError when the results predate them or the file does not match."""
    ref = result.get("per_prompt")
    if not isinstance(ref, dict) or "file" not in ref:
        raise io_utils.StaleArraysError(f"{directory}: results.json records no per-prompt rewards (rerun bon)")
    return io_utils.read_arrays(os.path.join(directory, ref["file"]), ref.get("sha256"))


@register_stage("bon")
def run(ctx: RunContext, cfg: BonConfig | None = None, gen: GenerationConfig | None = None) -> None:
    result, per_prompt = run_bon(ctx, cfg or BonConfig(), gen or GenerationConfig())
    if jax.process_index() == 0:
        write_results(ctx.artefacts, result, per_prompt)
