"""Stage `rm_eval`: what weight averaging buys, measured on every split.

Accuracy of each member, of WARM (uniform weight average of the best-first top M, M = 1 … M_max)
and of ENS (mean of the members' rewards), on ``train_clean``, ``train_corrupted``,
``validation`` and ``ood``. On ``train_corrupted`` accuracy is measured against the flipped
(training) labels, so HIGHER means MORE memorisation of label noise. Also: ensemble
disagreement, calibration (ECE of σ(r⁺ − r⁻)), linear mode connectivity between two members,
and the merged RM's reward statistics (for reward normalisation in RL). Writes the merged RM to
WORKDIR/rm/warm and the numbers to WORKDIR/rm/eval.json.
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
from jax.sharding import PartitionSpec as P

from warm_jax import averaging, checkpoint_averaging, checkpoints, ensemble, io_utils, loop, params_io, reward, sharding
from warm_jax.data import pipeline
from warm_jax.models import transformer as tr
from warm_jax.stages import RunContext, register_stage

log = logging.getLogger(__name__)

SPLITS = ("train_clean", "train_corrupted", "validation", "ood")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class EvalConfig:
    select_split: str = "validation"  # members are ranked best-first on this split
    warm_selection: str = "all"  # 'all' (uniform over M), 'top_m' or 'greedy'
    top_m: int | None = None
    lmc_members: tuple[int, int] | None = None  # default: the two best members
    lmc_lambdas: int = 11
    batch_size: int = 256
    max_examples: int | None = None  # per split, for quick runs
    ece_bins: int = 10
    dataset_dir: str | None = None


# ----------------------------------------------------------------------------- data


def load_eval_splits(dataset_dir: str, max_examples: int | None = None) -> dict[str, dict[str, np.ndarray]]:
    """All four evaluation splits as host arrays (train split in two by its flip mask)."""
    fields = ensemble.RM_FIELDS + ("flipped",)

    def read(split):
        src = pipeline.load_split(dataset_dir, split)
        # Every process holds every pair (Scorer shards them onto the devices itself).
        batches = list(pipeline.eval_batches(src, 512, fields=fields, process_index=0, process_count=1))
        out = {k: np.concatenate([b[k][b["valid"]] for b in batches]) for k in fields}
        return out

    train = read("train")
    flipped = train["flipped"].astype(bool)
    splits = {
        "train_clean": {k: v[~flipped] for k, v in train.items()},
        "train_corrupted": {k: v[flipped] for k, v in train.items()},
        "validation": read("validation"),
        "ood": read("ood"),
    }
    if max_examples:
        splits = {s: {k: v[:max_examples] for k, v in d.items()} for s, d in splits.items()}
    return splits


# ----------------------------------------------------------------------------- scoring


class Scorer:
    """Jitted reward scoring of all pairs of a split, for one model or a stacked ensemble.

    ``pairs(params, split) -> (r_chosen [N], r_rejected [N])``; ``stacked_pairs`` → [M, N].
    Batches are padded to a multiple of the mesh's batch shards; padding is dropped.
    """

    def __init__(self, graphdef, mesh, batch_size: int):
        self.mesh = mesh
        self.batch_sh = sharding.batch_sharding(mesh, 2)
        self.len_sh = sharding.batch_sharding(mesh, 1)
        self.batch_size = sharding.shard_batch_size(batch_size, self.batch_sh)
        score = functools.partial(reward.score, graphdef=graphdef)
        # Replicated outputs: every process reads every reward (multi-host safe).
        rep = sharding.replicated(mesh)
        self._one = jax.jit(lambda p, t, l: score(p, tokens=t, lengths=l), out_shardings=rep)
        self._stack = jax.jit(
            jax.vmap(lambda p, t, l: score(p, tokens=t, lengths=l), in_axes=(0, None, None)), out_shardings=rep
        )

    def _run(self, fn, params, tokens, lengths):
        n = len(tokens)
        outs = []
        for s in range(0, n, self.batch_size):
            t, l = tokens[s : s + self.batch_size], lengths[s : s + self.batch_size]
            real = len(t)
            if real < self.batch_size:
                pad = self.batch_size - real
                t = np.concatenate([t, np.repeat(t[-1:], pad, 0)])
                l = np.concatenate([l, np.repeat(l[-1:], pad, 0)])
            r = fn(params, sharding.put_global(t, self.batch_sh), sharding.put_global(l, self.len_sh))
            outs.append(np.asarray(jax.device_get(r))[..., :real])
        return np.concatenate(outs, axis=-1)

    def pairs(self, params, data):
        return (
            self._run(self._one, params, data["chosen_tokens"], data["chosen_length"]),
            self._run(self._one, params, data["rejected_tokens"], data["rejected_length"]),
        )

    def stacked_pairs(self, stacked, data):
        return (
            self._run(self._stack, stacked, data["chosen_tokens"], data["chosen_length"]),
            self._run(self._stack, stacked, data["rejected_tokens"], data["rejected_length"]),
        )


# ----------------------------------------------------------------------------- metrics


def accuracy(r_c, r_r) -> float:
    """Fraction of pairs with r⁺ > r⁻ (ties count half)."""
    d = np.asarray(r_c) - np.asarray(r_r)
    return float(np.mean((d > 0) + 0.5 * (d == 0)))


def bt_loss(r_c, r_r) -> float:
    d = np.asarray(r_c, np.float64) - np.asarray(r_r, np.float64)
    return float(np.mean(np.logaddexp(0.0, -d)))


def ece(r_c, r_r, bins: int = 10) -> float:
    """Expected calibration error of p = σ(r⁺ − r⁻) as the probability that 'chosen' wins.

    Pairs are symmetrised (each pair also counted as (rejected, chosen) with 1 − p), so the
    confidence covers [0, 1] and a constant offset cannot hide miscalibration.
    """
    d = np.asarray(r_c, np.float64) - np.asarray(r_r, np.float64)
    p = np.concatenate([1 / (1 + np.exp(-d)), 1 / (1 + np.exp(d))])
    y = np.concatenate([np.ones_like(d), np.zeros_like(d)])
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(p, edges) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            total += sel.mean() * abs(p[sel].mean() - y[sel].mean())
    return float(total)


def split_metrics(r_c, r_r, bins) -> dict:
    return {"acc": accuracy(r_c, r_r), "loss": bt_loss(r_c, r_r), "ece": ece(r_c, r_r, bins)}


# ----------------------------------------------------------------------------- the stage


def load_members(ctx: RunContext):
    """Members' exported checkpoints, stacked on device as [M, ...] with the ensemble sharding."""
    member_dirs = sorted((d for d in os.listdir(ctx.path("rm", "members")) if d.isdigit()), key=int)
    loaded = [params_io.load_params_checkpoint(ctx.path("rm", "members", d), ctx.mesh) for d in member_dirs]
    model_cfg, graphdef = loaded[0][0], loaded[0][1]
    members = [p for _, _, p, _ in loaded]
    _, abstract, axes = tr.abstract_model(model_cfg)
    specs = sharding.tree_specs(axes, abstract, ctx.mesh)
    ens_size = ctx.mesh.shape.get(sharding.ENSEMBLE, 1)
    stacked_specs = (
        sharding.prefix_ensemble(specs)
        if len(members) % ens_size == 0
        else jax.tree.map(lambda s: P(None, *s), specs, is_leaf=lambda x: isinstance(x, P))
    )
    stack = jax.jit(
        lambda *ms: jax.tree.map(lambda *xs: jnp.stack(xs), *ms), out_shardings=sharding.named(ctx.mesh, stacked_specs)
    )
    return model_cfg, graphdef, stack(*members), specs, [int(d) for d in member_dirs]


def evaluate_rms(ctx: RunContext, cfg: EvalConfig) -> dict:
    data_dir = cfg.dataset_dir or ctx.path("data")
    splits = load_eval_splits(data_dir, cfg.max_examples)
    model_cfg, graphdef, stacked, specs, ids = load_members(ctx)
    m = len(ids)
    scorer = Scorer(graphdef, ctx.mesh, cfg.batch_size)
    single_sh = sharding.named(ctx.mesh, specs)

    # Members and ENS: one vmapped pass per split.
    member_r = {s: scorer.stacked_pairs(stacked, d) for s, d in splits.items()}  # ([M,N], [M,N])
    members = [{"id": ids[i], "acc": {s: accuracy(rc[i], rr[i]) for s, (rc, rr) in member_r.items()}} for i in range(m)]
    order = sorted(range(m), key=lambda i: -members[i]["acc"][cfg.select_split])

    def ens_of(idx):
        return {s: split_metrics(rc[idx].mean(0), rr[idx].mean(0), cfg.ece_bins) for s, (rc, rr) in member_r.items()}

    def warm_params(idx):
        w = np.zeros(m, np.float32)
        w[list(idx)] = 1.0 / len(idx)
        return averaging.mean_stacked(stacked, jnp.asarray(w), out_shardings=single_sh)

    def warm_of(idx):
        p = warm_params(idx)
        return {s: split_metrics(*scorer.pairs(p, d), cfg.ece_bins) for s, d in splits.items()}, p

    warm_by_m, ens_by_m = [], []
    for k in range(1, m + 1):
        wm, _ = warm_of(order[:k])
        warm_by_m.append({"M": k, "members": [ids[i] for i in order[:k]], **_acc_view(wm)})
        ens_by_m.append({"M": k, **_acc_view(ens_of(order[:k]))})

    if cfg.warm_selection == "all":
        chosen = list(range(m))
    elif cfg.warm_selection == "top_m":
        chosen = order[: cfg.top_m or m]
    elif cfg.warm_selection == "greedy":
        sel_data = splits[cfg.select_split]
        chosen = averaging.greedy_soup(order, lambda idx: accuracy(*scorer.pairs(warm_params(idx), sel_data)))
    else:
        raise ValueError(f"EvalConfig.warm_selection must be 'all', 'top_m' or 'greedy', got {cfg.warm_selection!r}")
    warm_metrics, warm_p = warm_of(chosen)
    ens_metrics = ens_of(chosen)

    # Disagreement: std over members of the reward margin, averaged over pairs.
    disagreement = {s: float(np.mean(np.std(rc - rr, axis=0))) for s, (rc, rr) in member_r.items()}

    # Reward statistics on validation (chosen and rejected together) for RL normalisation.
    val = splits["validation"]
    wc, wr = scorer.pairs(warm_p, val)
    best = order[0]
    rc, rr = member_r["validation"]
    ens_all = np.concatenate([rc[chosen].mean(0), rr[chosen].mean(0)])
    reward_stats = {
        "warm": _stats(np.concatenate([wc, wr])),
        "member_best": _stats(np.concatenate([rc[best], rr[best]])),
        "ens": _stats(ens_all),
    }

    # Linear mode connectivity between two members (default: the two best).
    a, b = cfg.lmc_members or (order[0], order[1] if m > 1 else order[0])
    lambdas = np.linspace(0.0, 1.0, cfg.lmc_lambdas)
    pa, pb = (ensemble.member_slice(stacked, i, ctx.mesh, specs) for i in (a, b))
    lmc = lmc_curves(scorer, pa, pb, splits, lambdas, (ids[a], ids[b]))

    accuracies = {ids[i]: members[i]["acc"] for i in range(m)}
    hashes = {
        ids[i]: checkpoints.tree_sha256(host_copy(ensemble.member_slice(stacked, i, ctx.mesh, specs))) for i in range(m)
    }
    checkpoint_averaging.write_merged(
        ctx.path("rm", "warm"),
        warm_p,
        model_cfg=model_cfg,
        members=[ids[i] for i in chosen],
        weights=[1.0 / len(chosen)] * len(chosen),
        accuracies=accuracies,
        hashes=hashes,
        tokenizer_dir=ctx.path("tokenizer"),
    )
    result = {
        "rm": {
            "members": members,
            "order": [ids[i] for i in order],
            "warm": {"M": len(chosen), "members": [ids[i] for i in chosen], **_acc_view(warm_metrics)},
            "ens": {"M": len(chosen), **_acc_view(ens_metrics)},
            "warm_by_m": warm_by_m,
            "ens_by_m": ens_by_m,
            "disagreement": disagreement,
            "note": "train_corrupted accuracy is measured against the flipped (training) labels: higher = more memorisation",
        },
        "lmc": lmc,
        "best_member": ids[best],
        "members": ids,
        "reward_stats": reward_stats,
    }
    return result


def host_copy(tree):
    """A tree of (possibly multi-host sharded) arrays as numpy on every process."""
    from jax.experimental import multihost_utils

    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)


def _acc_view(metrics: dict) -> dict:
    return {
        "acc": {s: v["acc"] for s, v in metrics.items()},
        "loss": {s: v["loss"] for s, v in metrics.items()},
        "ece": {s: v["ece"] for s, v in metrics.items()},
    }


def _stats(x) -> dict:
    return {"mean": float(np.mean(x)), "std": float(np.std(x) + 1e-6)}


def lmc_curves(scorer: Scorer, pa, pb, splits, lambdas, members=(0, 1)) -> dict:
    """Accuracy/loss of θ(λ) = (1−λ)θ_a + λθ_b and of the prediction mix (1−λ)r_a + λr_b, per split."""

    def acc_loss(r_c, r_r):
        return {"accuracy": accuracy(r_c, r_r), "loss": bt_loss(r_c, r_r)}

    def rewards(p):
        return {s: scorer.pairs(p, d) for s, d in splits.items()}

    curve = averaging.interpolation_curve(
        pa,
        pb,
        lambda p: {s: acc_loss(*r) for s, r in rewards(p).items()},
        lambdas,
        rewards_fn=rewards,
        eval_pred_fn=acc_loss,
    )
    return {
        "members": [int(m) for m in members],
        "lambdas": curve["lambdas"],
        "weight_interp": {s: v["accuracy"] for s, v in curve["weight"].items()},
        "weight_interp_loss": {s: v["loss"] for s, v in curve["weight"].items()},
        "pred_interp": {s: v["accuracy"] for s, v in curve["pred"].items()},
        "pred_interp_loss": {s: v["loss"] for s, v in curve["pred"].items()},
        "barrier": curve["barrier"],
        "loss_barrier": curve["loss_barrier"],
    }


@register_stage("rm_eval")
def run(ctx: RunContext, cfg: EvalConfig | None = None) -> None:
    cfg = cfg or EvalConfig()
    result = {**evaluate_rms(ctx, cfg), "updates": loop.read_updates(ctx.path("rm", "ckpt"))}
    if jax.process_index() == 0:
        io_utils.atomic_write_json(ctx.path("rm", "eval.json"), result)
    w, e = result["rm"]["warm"]["acc"], result["rm"]["ens"]["acc"]
    log.info(
        "[rm_eval] WARM %s | ENS %s", {k: round(v, 3) for k, v in w.items()}, {k: round(v, 3) for k, v in e.items()}
    )


def pair_interpolation(ctx: RunContext, graphdef, stacked, specs, data_dir: str, cfg: EvalConfig | None = None) -> dict:
    """LMC curves between members 0 and 1 of a stacked [2, ...] tree (the negative control)."""
    cfg = cfg or EvalConfig()
    splits = load_eval_splits(data_dir, cfg.max_examples)
    scorer = Scorer(graphdef, ctx.mesh, cfg.batch_size)
    pa, pb = (ensemble.member_slice(stacked, i, ctx.mesh, specs) for i in (0, 1))
    return lmc_curves(scorer, pa, pb, splits, np.linspace(0.0, 1.0, cfg.lmc_lambdas))
