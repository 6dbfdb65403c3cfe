"""Stage `rm_eval`: what weight averaging buys, measured on every split.

Accuracy of each member, of WARM (uniform weight average of the best-first top M, M = 1 … M_max)
and of ENS (mean of the members' rewards), on ``train_clean``, ``train_corrupted``,
``validation`` and every ood split the dataset has (``eval_splits``: ``ood_cue`` and ``ood_temp`` for the
built-in task, ``ood`` for external data). On ``train_corrupted`` accuracy is measured against the flipped
(training) labels, so HIGHER means MORE memorisation of label noise. Also: ensemble
disagreement, calibration (ECE of σ(r⁺ − r⁻)), linear mode connectivity between two members,
and the rewards' statistics on validation. WARM is the model the `average` stage wrote to WORKDIR/rm/warm: its
members are read from its metadata and its average is checked against its sha256; this stage writes nothing
else reads as a model. Writes the numbers to WORKDIR/rm/eval.json and the per-pair reward margins r⁺ − r⁻ (float32)
that every claim's bootstrap interval is computed from to WORKDIR/rm/eval_examples.npz, keyed
``<split>/<model>``:

  members    [M, N]  each member (row i is member ``member_ids[i]``)
  warm, ens  [N]     WARM and ENS of the chosen members (``chosen``: their ids)
  warm_by_m  [M, N]  WARM of the best-first top k, k = 1 … M (``order``: ids best-first)
  ens_by_m   [M, N]  ENS of the same
  lmc_weight [L, N]  θ(λ) = (1−λ)θ_a + λθ_b at ``lambdas`` (``lmc_members``: the ids a, b)
  lmc_pred   [L, N]  the prediction mix (1−λ)r_a + λr_b
  perm_weight [L, N] θ(λ) with θ_b's hidden units permuted (tr.permute_hidden_units): the same function in
                     another basin, the negative control of linear mode connectivity
  length_gap [N]     tokens of chosen − rejected (int32), from which eval.json's ``length_bias`` reads how much
                     each reward leans on length: the built-in task's spurious cue, and RMs' best-known bias
  warm_by_m_random [M, N]  when ``EvalConfig.random_orders_per_member`` > 0: per pair, WARM's correctness (1, ½,
                     0; not a margin) averaged over the first k members of each of ``random_orders`` (ids), k = 1 … M
  ens_by_m_random [M, N]  ENS of the same
  seen       [M, N]  train views only, when members trained on shares of the pairs
                     (``EnsembleConfig.member_data_fraction`` < 1): member ``member_ids[i]`` trained on pair j;
                     eval.json's ``by_share`` splits the train accuracies by it (pairs no member saw are the
                     within-run control for memorisation)

eval.json's accuracies are the means of ``stats.correctness`` of exactly these margins.

Each dataset split is scored once, in batches of ``EvalConfig.batch_size`` pairs; train's scores are then cut in two
by its flip mask. A process reads only the pairs its devices hold in those batches (``read_eval_splits``) and
every process gets every reward.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Mapping, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np

from warm_jax import (
    averaging,
    batched,
    checkpoint_averaging,
    ensemble,
    eval_splits,
    io_utils,
    loop,
    rm_scoring,
    seeds,
    sharding,
    stats,
)
from warm_jax.data import pipeline, preference
from warm_jax.models import transformer as tr
from warm_jax.stages import RunContext, register_stage

log = logging.getLogger(__name__)

RewardPairs = tuple[np.ndarray, np.ndarray]  # (r_chosen [N], r_rejected [N])


@gin.configurable
@dataclasses.dataclass(frozen=True)
class EvalConfig:
    select_split: str = "validation"  # members are ranked best-first on this split (WARM of the best k, k = 1 … M)
    lmc_members: tuple[int, int] | None = None  # default: the two best members
    lmc_lambdas: int = 11
    batch_size: int = 256
    max_examples: int | None = None  # the first pairs of each dataset split (train before its flip-mask cut)
    ece_bins: int = 10
    dataset_dir: str | None = None
    # WARM and ENS of the first k members of random member orders, k = 1 … M: the expected curve over which members
    # join, whose M = 1 is the mean member rather than the best. Each member starts this many orders (the rest of an
    # order is shuffled), so M = 1 is every member equally; nested prefixes make the step from k to k + 1 a paired
    # comparison. 0 skips it.
    random_orders_per_member: int = 0

    def __post_init__(self):
        if self.random_orders_per_member < 0:
            raise ValueError(
                "EvalConfig.random_orders_per_member must be ≥ 0 (0 skips the random-order curve), "
                f"got {self.random_orders_per_member}"
            )
        if self.lmc_lambdas < 2:
            raise ValueError(f"EvalConfig.lmc_lambdas must be at least 2 (the two endpoints), got {self.lmc_lambdas}")
        eval_splits.check_selection_split(self.select_split, "EvalConfig.select_split")


# ----------------------------------------------------------------------------- data

# Per-pair fields every process holds for all rows: cheap, and needed to cut splits and to measure length bias.
GATHERED = ("flipped", "index", "chosen_length", "rejected_length")


@dataclasses.dataclass(frozen=True)
class SplitRows:
    """One split's pairs as this process holds them for scoring.

    data: fields [r, ...] of the rows ``rows`` (int64 [r], indices into the split's first ``n`` pairs), the rows
      this process's devices hold in the batches of ``batch_size`` (``batched.process_rows``); ``rows`` None when
      ``data`` holds all ``n`` pairs.
    gathered: ``GATHERED`` fields for all ``n`` pairs (every process).
    """

    data: dict[str, np.ndarray]
    rows: np.ndarray | None
    n: int
    gathered: dict[str, np.ndarray]

    @classmethod
    def whole(cls, data: dict[str, np.ndarray]) -> SplitRows:
        """A split whose every pair this process holds (tests, single-host tools)."""
        n = len(next(iter(data.values())))
        return cls(data, None, n, {k: np.asarray(data[k]) for k in GATHERED if k in data})

    @property
    def flipped(self) -> np.ndarray:
        """bool [n]: the pairs whose labels the dataset writer flipped."""
        return np.asarray(self.gathered["flipped"]).astype(bool)

    @property
    def length_gap(self) -> np.ndarray:
        """int32 [n]: tokens in the chosen sequence minus in the rejected one (the prompt cancels)."""
        g = self.gathered
        return (np.asarray(g["chosen_length"], np.int64) - np.asarray(g["rejected_length"], np.int64)).astype(np.int32)


def read_split_rows(
    dataset_dir: str,
    split: str,
    mesh,
    batch_size: int,
    max_examples: int | None = None,
    fields: Sequence[str] = tuple(dict.fromkeys(ensemble.RM_FIELDS + GATHERED)),
) -> SplitRows:
    """The first ``max_examples`` pairs of ``split`` (all by default): this process reads only the rows its
    devices hold in batches of ``batch_size`` (the Scorer's), and the ``GATHERED`` fields of every row are
    gathered from all processes."""
    src = pipeline.load_split(dataset_dir, split)
    n = min(len(src), max_examples) if max_examples else len(src)
    rows = batched.process_rows(n, batch_size, mesh)
    data = pipeline.read_rows(src, rows, fields)
    small = {k: data[k] for k in GATHERED if k in data}
    gathered = batched.map_batches(lambda b, _: b, small, batch_size=batch_size, mesh=mesh, rows=rows, num_rows=n)
    return SplitRows(data, rows, n, gathered)


def read_eval_splits(
    dataset_dir: str,
    mesh,
    batch_size: int,
    max_examples: int | None = None,
    *,
    stage: str,
    names: Sequence[str] | None = None,
) -> dict[str, SplitRows]:
    """The dataset's splits (train, validation, the ood splits) that rm_eval's splits ``names`` come from (default:
    ``eval_splits.dataset_rm_splits``), read per process.

    ``max_examples`` cuts each base split (train before it is cut by its flip mask). Logs the rows read by this
    process as ``[stage] input: process p of P read R batch rows (K records)``: R the batch positions its devices
    fill, K the distinct pairs it read."""
    if names is None:
        names = eval_splits.dataset_rm_splits(dataset_dir)
    out = {b: read_split_rows(dataset_dir, b, mesh, batch_size, max_examples) for b in _bases(names)}
    b, mine = batched.batch_rows(batch_size, mesh), batched.rows_per_batch(batch_size, mesh)
    log.info(
        "[%s] input: process %d of %d read %d batch rows (%d records)",
        stage,
        jax.process_index(),
        jax.process_count(),
        sum(-(-s.n // b) * mine for s in out.values()),
        sum(len(s.rows) for s in out.values()),
    )
    return out


def _base(split: str) -> str:
    return eval_splits.TRAIN if split in eval_splits.TRAIN_VIEWS else split


def _bases(names: Sequence[str]) -> list[str]:
    bad = [s for s in names if not eval_splits.is_eval_split(s)]
    if bad:
        raise ValueError(f"unknown evaluation split(s) {bad}; choose from {eval_splits.KNOWN}")
    return list(dict.fromkeys(_base(s) for s in names))


def score_splits(score, splits: dict[str, SplitRows], names: Sequence[str] | None = None) -> dict[str, RewardPairs]:
    """rm_eval's splits ``names`` (default: those ``splits`` — dataset splits as read by ``read_eval_splits`` —
    hold, ``eval_splits.ordered``) from ``score(SplitRows) -> (r_chosen [..., N], r_rejected [..., N])``, each base
    split scored once; train's pairs go to ``train_clean`` / ``train_corrupted`` by its flip mask, the flipped
    ones measured against their flipped (training) labels."""
    if names is None:
        names = eval_splits.measured(splits)
    scored = {b: score(splits[b]) for b in _bases(names)}
    out = {}
    for s in names:
        r = scored[_base(s)]
        if s != _base(s):
            flipped = splits["train"].flipped
            keep = flipped if s == "train_corrupted" else ~flipped
            r = tuple(np.asarray(x)[..., keep] for x in r)
        out[s] = r
    return out


# ----------------------------------------------------------------------------- scoring


class Scorer:
    """Jitted reward scoring of all pairs of a split, for one model or a stacked ensemble.

    ``pairs(params, split) -> (r_chosen [N], r_rejected [N])``; ``stacked_pairs`` → [M, N]. ``split`` is a
    ``SplitRows`` read for this scorer's ``batch_size`` (each process passes its own rows); ``batched.map_batches``
    pads, shards, runs and gathers.
    """

    def __init__(self, graphdef, mesh, batch_size: int):
        self.mesh = mesh
        self.batch_size = batch_size
        score = functools.partial(rm_scoring.score, graphdef=graphdef)
        # Replicated outputs: every process reads every reward (multi-host safe).
        rep = sharding.replicated(mesh)
        self._one = jax.jit(lambda p, t, l: score(p, tokens=t, lengths=l), out_shardings=rep)
        self._stack = jax.jit(
            jax.vmap(lambda p, t, l: score(p, tokens=t, lengths=l), in_axes=(0, None, None)), out_shardings=rep
        )

    def _run(self, fn, params, split: SplitRows, side: str):
        return batched.map_batches(
            lambda b, _: fn(params, *b),
            (split.data[f"{side}_tokens"], split.data[f"{side}_length"]),
            batch_size=self.batch_size,
            mesh=self.mesh,
            rows=split.rows,
            num_rows=split.n,
            out_axis=-1,
        )

    def pairs(self, params, split: SplitRows) -> RewardPairs:
        return self._run(self._one, params, split, "chosen"), self._run(self._one, params, split, "rejected")

    def stacked_pairs(self, stacked, split: SplitRows) -> RewardPairs:
        return self._run(self._stack, stacked, split, "chosen"), self._run(self._stack, stacked, split, "rejected")


# ----------------------------------------------------------------------------- metrics


def margins(r_c, r_r) -> np.ndarray:
    """Per-pair reward margin r⁺ − r⁻ as stored in eval_examples.npz: [N], [N] → [N] float32."""
    return (np.asarray(r_c) - np.asarray(r_r)).astype(np.float32)


def accuracy(r_c, r_r) -> float:
    """Fraction of pairs with r⁺ > r⁻ (ties count half), from the float32 margins."""
    return float(np.mean(stats.correctness(margins(r_c, r_r))))


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


# ----------------------------------------------------------------------------- from rewards to results


def measure(
    member_r: dict[str, RewardPairs],
    ids: list[int],
    cfg: EvalConfig,
    score_warm,
    score_interp,
    score_interp_permuted=None,
    *,
    chosen: Sequence[int],
    length_gap: Mapping[str, np.ndarray] | None = None,
    train_seen: Mapping[str, np.ndarray] | None = None,
    orders: Sequence[Sequence[int]] | None = None,
) -> tuple[dict, dict[str, np.ndarray]]:
    """eval.json's numbers and eval_examples.npz's margins from rewards (host arrays; no model here).

    member_r: {split: (r_chosen [M, N], r_rejected [M, N])}, row i the member ``ids[i]``.
    score_warm(idx, split) → RewardPairs of the uniform weight average of the members at indices ``idx``.
    score_interp(a, b, lam) → {split: RewardPairs} of (1−λ)θ_a + λθ_b (members at indices a, b).
    score_interp_permuted(a, b, lam): the same with θ_b's hidden units permuted (the same function in another
    basin: the negative control of LMC, 'permutation_control'); None skips it.
    chosen: the indices WARM averages (the `average` stage's choice).
    length_gap: {split: int [N]} tokens of chosen minus rejected; None skips the length-bias section.
    train_seen: {train view: bool [M, N]}, member ``ids[i]`` trained on pair j (``member_shares``); None skips the
      by-share section.
    orders: member orders (indices; ``member_orders``) whose first k members' WARM and ENS, averaged over the
      orders, make the random-order curve; None skips it.
    Returns (result, examples): eval.json's content (without 'updates' and 'examples') and the margins keyed
    ``<split>/<model>`` (module docstring).
    """
    m = len(ids)
    chosen = [int(i) for i in chosen]
    splits = list(member_r)
    members = [{"id": ids[i], "acc": {s: accuracy(rc[i], rr[i]) for s, (rc, rr) in member_r.items()}} for i in range(m)]
    order = sorted(range(m), key=lambda i: -members[i]["acc"][cfg.select_split])
    cache: dict = {}

    def warm_r(idx, split) -> RewardPairs:
        # The average depends on the set only (uniform weights), so the best-first top M and 'all' share it.
        key = (frozenset(idx), split)
        if key not in cache:
            cache[key] = score_warm(sorted(idx), split)
        return cache[key]

    def ens_r(idx, split) -> RewardPairs:
        rc, rr = member_r[split]
        return rc[list(idx)].mean(0), rr[list(idx)].mean(0)

    def metrics_of(fn, idx) -> dict:
        return {s: split_metrics(*fn(idx, s), cfg.ece_bins) for s in splits}

    warm_by_m, ens_by_m = [], []
    for k in range(1, m + 1):
        warm_by_m.append({"M": k, "members": [ids[i] for i in order[:k]], **_acc_view(metrics_of(warm_r, order[:k]))})
        ens_by_m.append({"M": k, **_acc_view(metrics_of(ens_r, order[:k]))})

    # Disagreement: std over members of the reward margin, averaged over pairs.
    disagreement = {s: float(np.mean(np.std(rc - rr, axis=0))) for s, (rc, rr) in member_r.items()}

    best = order[0]
    reward_stats = reward_statistics(member_r["validation"], best, chosen, warm_r(chosen, "validation"))

    # Linear mode connectivity between two members (default: the two best).
    a, b = cfg.lmc_members or (order[0], order[1] if m > 1 else order[0])
    lmc, lmc_margins = lmc_curves(
        lambda lam: score_interp(a, b, lam), np.linspace(0.0, 1.0, cfg.lmc_lambdas), (ids[a], ids[b])
    )

    control = None
    if score_interp_permuted is not None and a != b:
        control, control_margins = lmc_curves(
            lambda lam: score_interp_permuted(a, b, lam), np.linspace(0.0, 1.0, cfg.lmc_lambdas), (ids[a], ids[b])
        )

    examples: dict[str, np.ndarray] = {
        "member_ids": np.asarray(ids, np.int64),
        "order": np.asarray([ids[i] for i in order], np.int64),
        "chosen": np.asarray([ids[i] for i in chosen], np.int64),
        "lambdas": np.asarray(lmc["lambdas"], np.float64),
        "lmc_members": np.asarray(lmc["members"], np.int64),
    }
    for s, (rc, rr) in member_r.items():
        examples[f"{s}/members"] = np.stack([margins(rc[i], rr[i]) for i in range(m)])
        examples[f"{s}/warm"] = margins(*warm_r(chosen, s))
        examples[f"{s}/ens"] = margins(*ens_r(chosen, s))
        examples[f"{s}/warm_by_m"] = np.stack([margins(*warm_r(order[:k], s)) for k in range(1, m + 1)])
        examples[f"{s}/ens_by_m"] = np.stack([margins(*ens_r(order[:k], s)) for k in range(1, m + 1)])
        examples[f"{s}/lmc_weight"] = lmc_margins[s]["weight"]
        examples[f"{s}/lmc_pred"] = lmc_margins[s]["pred"]
        if control is not None:
            examples[f"{s}/perm_weight"] = control_margins[s]["weight"]

    bias = None
    if length_gap is not None:
        bias = {}
        for s in splits:
            gap = examples[f"{s}/length_gap"] = np.asarray(length_gap[s], np.int32)
            of = functools.partial(length_bias, gap=gap)
            bias[s] = {
                "share_longer_chosen": float(np.mean(gap > 0)),
                "members": [of(x) for x in examples[f"{s}/members"]],
                "warm": of(examples[f"{s}/warm"]),
                "ens": of(examples[f"{s}/ens"]),
                "warm_by_m": [of(x) for x in examples[f"{s}/warm_by_m"]],
            }

    by_m_random = {}
    if orders is not None:
        by_m_random["random_orders"] = [[ids[i] for i in o] for o in orders]

        def prefix_r(idx, split) -> RewardPairs:
            # WARM of one member is that member: its rewards are at hand, no average to score.
            return (member_r[split][0][idx[0]], member_r[split][1][idx[0]]) if len(idx) == 1 else warm_r(idx, split)

        for name, fn in (("warm", prefix_r), ("ens", ens_r)):
            right = {  # [M, N]: per pair, the share of the orders whose first k members' model ranks it right
                s: np.stack(
                    [np.mean([stats.correctness(margins(*fn(o[:k], s))) for o in orders], 0) for k in range(1, m + 1)]
                )
                for s in splits
            }
            by_m_random[f"{name}_by_m_random"] = [
                {"M": k + 1, "acc": {s: float(np.mean(right[s][k])) for s in splits}} for k in range(m)
            ]
            examples.update({f"{s}/{name}_by_m_random": r.astype(np.float32) for s, r in right.items()})

    by_share = None
    if train_seen is not None:
        by_share = {}
        for s, seen in train_seen.items():
            seen = examples[f"{s}/seen"] = np.asarray(seen, bool)
            own, warm, ens = examples[f"{s}/members"], examples[f"{s}/warm"], examples[f"{s}/ens"]
            count = seen[chosen].sum(0)  # how many of WARM's members trained on each pair
            by_share[s] = {
                "members": [
                    {"id": ids[i], "seen": _acc_on(own[i], seen[i]), "unseen": _acc_on(own[i], ~seen[i])}
                    for i in range(m)
                ],
                "seen_by": [
                    {"count": c, "pairs": int(np.sum(at)), "warm": _acc_on(warm, at), "ens": _acc_on(ens, at)}
                    for c in range(len(chosen) + 1)
                    if np.any(at := count == c)
                ],
            }

    result = {
        "rm": {
            "members": members,
            "order": [ids[i] for i in order],
            "warm": {"M": len(chosen), "members": [ids[i] for i in chosen], **_acc_view(metrics_of(warm_r, chosen))},
            "ens": {"M": len(chosen), **_acc_view(metrics_of(ens_r, chosen))},
            "warm_by_m": warm_by_m,
            "ens_by_m": ens_by_m,
            **by_m_random,
            "disagreement": disagreement,
            **({"length_bias": bias} if bias is not None else {}),
            **({"by_share": by_share} if by_share is not None else {}),
            "note": "train_corrupted accuracy is measured against the flipped (training) labels: higher = more memorisation",
        },
        "lmc": lmc,
        **({"permutation_control": control} if control is not None else {}),
        "best_member": ids[best],
        "members": ids,
        "reward_stats": reward_stats,
    }
    return result, examples


def member_orders(m: int, per_member: int, rng: np.random.Generator) -> list[tuple[int, ...]]:
    """``per_member`` orders of the m member indices starting with each member, the rest shuffled by ``rng``."""
    return [
        (j, *(int(i) for i in rng.permutation([i for i in range(m) if i != j])))
        for _ in range(per_member)
        for j in range(m)
    ]


def _acc_on(margin, sel) -> float | None:
    """Accuracy (ties half) of the margins [N] at the pairs ``sel`` (bool [N]); None when it selects none."""
    sel = np.asarray(sel, bool)
    return float(np.mean(stats.correctness(np.asarray(margin)[sel]))) if sel.any() else None


def member_shares(ensemble_record: dict | None, ids: Sequence[int], train: SplitRows, n_train: int) -> dict | None:
    """{"train_clean", "train_corrupted": bool [M, N]}: which of those pairs member ``ids[i]`` trained on, when the
    members trained on shares of the pairs (``member_data_fraction`` < 1 in rm/ensemble.json, ``ensemble_record``);
    None when every member saw every pair. ``n_train``: the training split's size, which the shares are drawn from.
    Raises ValueError when the members trained on a split of another size."""
    frac = (ensemble_record or {}).get("member_data_fraction", 1.0)
    if frac == 1.0:
        return None
    trained = ensemble_record["train_pairs"]
    shares = [preference.member_subset(n_train, frac, ensemble_record["seeds"][i]) for i in ids]
    if [len(s) for s in shares] != [trained[i] for i in ids]:
        raise ValueError(
            f"the members trained on shares of {trained} pairs, not of this training split's {n_train}: "
            "rm_eval reads another dataset than rm_ensemble did (EvalConfig.dataset_dir)"
        )
    seen = np.stack([np.isin(np.asarray(train.gathered["index"], np.int64), s) for s in shares])
    return {"train_clean": seen[:, ~train.flipped], "train_corrupted": seen[:, train.flipped]}


def length_bias(margin, gap) -> dict:
    """How much a reward reads response length, from its margins r⁺ − r⁻ [N] and the length gaps [N] (tokens of
    chosen − rejected).

    corr: Pearson correlation of margin and gap (None when either is constant). acc_longer_chosen /
    acc_shorter_chosen: accuracy on the pairs whose chosen sequence is the longer / the shorter (None when there
    are none; ties in length count in neither). A reward that leans on length scores high on the first and low on
    the second, whatever its overall accuracy.
    """
    margin, gap = np.asarray(margin, np.float64), np.asarray(gap)
    correct = stats.correctness(margin)

    def acc(sel):
        return float(correct[sel].mean()) if sel.any() else None

    corr = None if margin.std() == 0 or gap.std() == 0 else float(np.corrcoef(margin, gap)[0, 1])
    return {"corr": corr, "acc_longer_chosen": acc(gap > 0), "acc_shorter_chosen": acc(gap < 0)}


def reward_statistics(member_validation: RewardPairs, best: int, chosen: Sequence[int], warm_validation) -> dict:
    """Mean and std of each reward on validation, chosen and rejected rewards together (RL divides by them).

    member_validation: (r_chosen [M, N], r_rejected [M, N]); best: the best member's index; chosen: the indices
    WARM and ENS average; warm_validation: WARM's RewardPairs ([N], [N]).
    Returns {"warm", "member_best", "ens": {"mean", "std"}} (std + 1e-6: never zero).
    """
    rc, rr = member_validation
    chosen = list(chosen)
    return {
        "warm": score_stats(np.concatenate(warm_validation)),
        "member_best": score_stats(np.concatenate([rc[best], rr[best]])),
        "ens": score_stats(np.concatenate([rc[chosen].mean(0), rr[chosen].mean(0)])),
    }


def lmc_curves(score_at, lambdas, members=(0, 1)) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """Accuracy/loss of θ(λ) = (1−λ)θ_a + λθ_b and of the prediction mix (1−λ)r_a + λr_b, per split.

    score_at(lam) → {split: RewardPairs} of θ(λ) (θ(0) = θ_a and θ(1) = θ_b exactly). Returns (the
    curves as in eval.json's 'lmc', {split: {"weight": [L, N], "pred": [L, N]}} float32 margins).
    """
    lambdas = [float(x) for x in lambdas]
    cache: dict[float, dict] = {}

    def at(lam):
        if lam not in cache:
            cache[lam] = score_at(lam)
        return cache[lam]

    weight = {lam: at(lam) for lam in lambdas}
    ra, rb = at(0.0), at(1.0)
    curves: dict[str, dict] = {k: {} for k in ("wa", "wl", "pa", "pl")}
    margins_out: dict[str, dict[str, np.ndarray]] = {}
    for s in ra:
        (ca, xa), (cb, xb) = (tuple(np.asarray(v) for v in r[s]) for r in (ra, rb))
        pred = [((1 - lam) * ca + lam * cb, (1 - lam) * xa + lam * xb) for lam in lambdas]
        curves["wa"][s] = [accuracy(*weight[lam][s]) for lam in lambdas]
        curves["wl"][s] = [bt_loss(*weight[lam][s]) for lam in lambdas]
        curves["pa"][s] = [accuracy(*r) for r in pred]
        curves["pl"][s] = [bt_loss(*r) for r in pred]
        margins_out[s] = {
            "weight": np.stack([margins(*weight[lam][s]) for lam in lambdas]),
            "pred": np.stack([margins(*r) for r in pred]),
        }
    curve = {
        "members": [int(m) for m in members],
        "lambdas": lambdas,
        "weight_interp": curves["wa"],
        "weight_interp_loss": curves["wl"],
        "pred_interp": curves["pa"],
        "pred_interp_loss": curves["pl"],
        "barrier": {s: averaging.barrier_height(lambdas, v) for s, v in curves["wa"].items()},
        # A loss barrier is the same shape upside down: loss above the line between the endpoints.
        "loss_barrier": {s: averaging.barrier_height(lambdas, [-x for x in v]) for s, v in curves["wl"].items()},
    }
    return curve, margins_out


def _acc_view(metrics: dict) -> dict:
    return {
        "acc": {s: v["acc"] for s, v in metrics.items()},
        "loss": {s: v["loss"] for s, v in metrics.items()},
        "ece": {s: v["ece"] for s, v in metrics.items()},
    }


def score_stats(x) -> dict:
    return {"mean": float(np.mean(x)), "std": float(np.std(x) + 1e-6)}


# ----------------------------------------------------------------------------- the stage


def warm_members(ctx: RunContext, ids: list[int]) -> tuple[list[int], str]:
    """(indices into ``ids`` of the members WORKDIR/rm/warm averages, its recorded sha256), from its metadata.

    Raises ValueError naming model.json when rm/warm is not a uniform average of members in WORKDIR/rm/members."""
    wd = ctx.artefacts
    path = os.path.join(wd.rm_warm, "model.json")
    meta = wd.read_warm_meta()
    merge = meta.get("merge") or {}
    members, weights = merge.get("members") or [], merge.get("weights") or []
    unknown = [x for x in members if not str(x).isdigit() or int(x) not in ids]
    if merge.get("method") != "linear" or not members or unknown or len(set(weights)) != 1:
        raise ValueError(
            f"{path}: field 'merge' does not describe a uniform average of members {ids} of "
            f"{wd.rm_members} (method {merge.get('method')!r}, members {members}, weights {weights}): "
            "rm_eval measures the model the `average` stage writes; rerun it (--rerun_from=average)"
        )
    return [ids.index(int(x)) for x in members], merge.get("sha256")


def evaluate_rms(ctx: RunContext, cfg: EvalConfig) -> tuple[dict, dict[str, np.ndarray]]:
    """Scores every split with the members, their averages (WARM: rm/warm's members) and the interpolation.

    Returns (eval.json's content without 'updates'/'examples', the per-pair margins). Raises ValueError when the
    average of rm/warm's members computed here is not the model at rm/warm (its sha256 differs)."""
    wd = ctx.artefacts
    splits = read_eval_splits(cfg.dataset_dir or wd.data, ctx.mesh, cfg.batch_size, cfg.max_examples, stage="rm_eval")
    members = wd.load_members(ctx.mesh)
    graphdef, stacked, specs, ids = members.graphdef, members.stacked, members.specs, members.ids
    m = len(ids)
    chosen, warm_sha = warm_members(ctx, ids)
    scorer = Scorer(graphdef, ctx.mesh, cfg.batch_size)
    single_sh = sharding.named(ctx.mesh, specs)

    def warm_params(idx):
        w = np.zeros(m, np.float32)
        w[sorted(int(i) for i in idx)] = 1.0 / len(idx)
        return averaging.mean_stacked(stacked, jnp.asarray(w), out_shardings=single_sh)

    warm_scores: dict = {}  # set of member indices → {split: RewardPairs}: each average scored once on every split

    def warm_all(idx) -> dict[str, RewardPairs]:
        key = frozenset(int(i) for i in idx)
        if key not in warm_scores:
            params = warm_params(key)
            warm_scores[key] = score_splits(lambda d: scorer.pairs(params, d), splits)
        return warm_scores[key]

    def score_warm(idx, split):
        return warm_all(idx)[split]

    # WARM is scored as the average computed here (shared with the best-first curves); it must be rm/warm itself.
    sha = checkpoint_averaging.merged_sha256(warm_params(chosen))
    if sha != warm_sha:
        raise ValueError(
            f"{wd.rm_warm}: its sha256 {warm_sha} is not that of the uniform average of its members "
            f"{[ids[i] for i in chosen]} in {wd.rm_members} ({sha}): the members changed after "
            "`average` ran; rerun it (--rerun_from=average)"
        )

    slices: dict = {}

    def score_interp(a, b, lam, permuted=False):
        if lam == 0.0:
            # θ(0) is θ_a bit for bit, as is the average of {a} (the best member's WARM-by-M point): score it once.
            return warm_all({a})
        for i in (a, b):
            if i not in slices:
                slices[i] = ensemble.member_slice(stacked, i, ctx.mesh, specs)
        if permuted and ("permuted", b) not in slices:
            key = seeds.key(ctx.seed, "rm_eval", "permutation_control")
            slices["permuted", b] = jax.jit(tr.permute_hidden_units)(slices[b], key)
        p = averaging.interpolate(slices[a], slices["permuted", b] if permuted else slices[b], lam)
        return score_splits(lambda d: scorer.pairs(p, d), splits)

    # Members and ENS: one vmapped pass per split.
    member_r = score_splits(lambda d: scorer.stacked_pairs(stacked, d), splits)  # ([M,N], [M,N])
    gaps = {s: g for s, (g,) in score_splits(lambda d: (d.length_gap,), splits).items()}
    orders = None
    if cfg.random_orders_per_member:
        orders = member_orders(m, cfg.random_orders_per_member, seeds.rng(ctx.seed, "rm_eval", "member_orders"))
    train_seen = None
    if eval_splits.TRAIN in splits:
        n_train = len(pipeline.load_split(cfg.dataset_dir or wd.data, eval_splits.TRAIN))
        train_seen = member_shares(wd.read_ensemble(), ids, splits[eval_splits.TRAIN], n_train)
    return measure(
        member_r,
        ids,
        cfg,
        score_warm,
        score_interp,
        functools.partial(score_interp, permuted=True),
        chosen=chosen,
        length_gap=gaps,
        train_seen=train_seen,
        orders=orders,
    )


def host_copy(tree):
    """A tree of (possibly multi-host sharded) arrays as numpy on every process."""
    from jax.experimental import multihost_utils

    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)


def write_results(path: str, result: dict, examples: dict[str, np.ndarray], examples_path: str) -> dict:
    """Writes the margins to ``examples_path``, then ``result`` to ``path`` naming that file (relative to the folder
    of ``path``) with its SHA-256 (process 0 only)."""
    sha = io_utils.write_arrays(examples_path, examples)
    rel = os.path.relpath(examples_path, os.path.dirname(path))
    result = {**result, "examples": {"file": rel, "sha256": sha}}
    io_utils.atomic_write_json(path, result)
    return result


def read_examples(results_dir: str, results: dict) -> dict[str, np.ndarray]:
    """The per-pair margins a results file (eval.json, the control's lmc.json) points to.

    Raises io_utils.StaleArraysError when the results predate them or the file does not match."""
    ref = results.get("examples")
    if not isinstance(ref, dict) or "file" not in ref:
        raise io_utils.StaleArraysError(
            f"{results_dir}: the results file records no per-pair margins (written before they were: rerun the stage)"
        )
    return io_utils.read_arrays(os.path.join(results_dir, ref["file"]), ref.get("sha256"))


@register_stage("rm_eval")
def run(ctx: RunContext, cfg: EvalConfig | None = None) -> None:
    cfg = cfg or EvalConfig()
    wd = ctx.artefacts
    result, examples = evaluate_rms(ctx, cfg)
    result = {**result, "updates": loop.read_updates(wd.rm_ckpt)}
    if jax.process_index() == 0:
        write_results(wd.rm_eval, result, examples, wd.rm_eval_examples)
    w, e = result["rm"]["warm"]["acc"], result["rm"]["ens"]["acc"]
    log.info(
        "[rm_eval] WARM %s | ENS %s", {k: round(v, 3) for k, v in w.items()}, {k: round(v, 3) for k, v in e.items()}
    )


def pair_interpolation(ctx: RunContext, graphdef, stacked, specs, data_dir: str, cfg: EvalConfig | None = None) -> dict:
    """LMC curves between members 0 and 1 of a stacked [2, ...] tree (the negative control).

    Process 0 also writes their per-pair margins ('<split>/lmc_weight', '<split>/lmc_pred' [L, N],
    'lambdas') to WORKDIR/rm_control/lmc_examples.npz (``Workdir.control_examples``); the returned curves name it under 'examples'.
    """
    cfg = cfg or EvalConfig()
    splits = read_eval_splits(data_dir, ctx.mesh, cfg.batch_size, cfg.max_examples, stage="rm_control")
    scorer = Scorer(graphdef, ctx.mesh, cfg.batch_size)
    pa, pb = (ensemble.member_slice(stacked, i, ctx.mesh, specs) for i in (0, 1))

    def score_at(lam):
        p = averaging.interpolate(pa, pb, lam)
        return score_splits(lambda d: scorer.pairs(p, d), splits)

    curves, lmc_margins = lmc_curves(score_at, np.linspace(0.0, 1.0, cfg.lmc_lambdas))
    if jax.process_index() == 0:
        examples = {"lambdas": np.asarray(curves["lambdas"], np.float64)}
        for s, mm in lmc_margins.items():
            examples[f"{s}/lmc_weight"], examples[f"{s}/lmc_pred"] = mm["weight"], mm["pred"]
        path = ctx.artefacts.control_examples
        sha = io_utils.write_arrays(path, examples)
        curves["examples"] = {"file": os.path.basename(path), "sha256": sha}
    return curves
