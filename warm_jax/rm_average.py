"""Stage `average`: the WARM reward model — members selected, averaged into WORKDIR/rm/warm, rewards' statistics.

Named for what it makes, the averaged reward model; ``warm_jax.average`` is the command line that merges any
checkpoints, ``warm_jax.averaging`` the arithmetic both use.

Members (WORKDIR/rm/members/<id>) are ranked best-first by accuracy on ``AverageConfig.select_split``; WARM averages
them uniformly: all of them, the best ``top_m``, or a greedy soup (a member is kept when the average's accuracy does
not drop). The merged model goes to WORKDIR/rm/warm (a ``save_params`` checkpoint whose metadata names the members,
their weights, their selection accuracies and hashes, and its own sha256). WORKDIR/average/selection.json holds what
the policy stages read: the members, the ranking, the chosen members, the best single member, and each reward's
mean and std on validation (chosen and rejected rewards together) so that ``(r − mean) / std`` normalises it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np

from warm_jax import averaging, checkpoint_averaging, checkpoints, ensemble, eval_splits, evaluation, io_utils, sharding
from warm_jax.stages import RunContext, register_stage

log = logging.getLogger(__name__)

SELECTIONS = ("all", "top_m", "greedy")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class AverageConfig:
    select_split: str = "validation"  # members are ranked best-first on this split
    warm_selection: str = "all"  # 'all' (uniform over M), 'top_m' or 'greedy'
    top_m: int | None = None  # 'top_m': how many of the best (default: all)
    batch_size: int = 256
    max_examples: int | None = None  # the first pairs of each dataset split (train before its flip-mask cut)
    dataset_dir: str | None = None  # default WORKDIR/data

    def __post_init__(self):
        if self.warm_selection not in SELECTIONS:
            raise ValueError(f"AverageConfig.warm_selection must be one of {SELECTIONS}, got {self.warm_selection!r}")
        eval_splits.check_selection_split(self.select_split, "AverageConfig.select_split")
        if self.top_m is not None and self.top_m < 1:
            raise ValueError(f"AverageConfig.top_m must be at least 1, got {self.top_m}")


def rank(accuracies: Sequence[float]) -> list[int]:
    """Indices best-first by accuracy (ties keep the members' order)."""
    return sorted(range(len(accuracies)), key=lambda i: -accuracies[i])


def select_members(order: Sequence[int], cfg: AverageConfig, warm_accuracy: Callable[[list[int]], float]) -> list[int]:
    """The indices WARM averages: all, the best ``top_m`` of ``order``, or a greedy soup over ``order``.

    warm_accuracy(indices) → accuracy on the selection split of the uniform average of those members.
    """
    order = list(order)
    if cfg.warm_selection == "all":
        return sorted(order)
    if cfg.warm_selection == "top_m":
        if cfg.top_m is not None and cfg.top_m > len(order):
            raise ValueError(f"AverageConfig.top_m = {cfg.top_m} but the ensemble has only {len(order)} members")
        return order[: cfg.top_m or len(order)]
    return averaging.greedy_soup(order, warm_accuracy)


@register_stage("average")
def run(ctx: RunContext, cfg: AverageConfig | None = None) -> None:
    cfg = cfg or AverageConfig()
    wd = ctx.artefacts
    needed = (cfg.select_split, "validation")
    splits = evaluation.read_eval_splits(
        cfg.dataset_dir or wd.data, ctx.mesh, cfg.batch_size, cfg.max_examples, stage="average", names=needed
    )
    members = wd.load_members(ctx.mesh)
    graphdef, stacked, specs, ids = members.graphdef, members.stacked, members.specs, members.ids
    m = len(ids)
    scorer = evaluation.Scorer(graphdef, ctx.mesh, cfg.batch_size)
    single_sh = sharding.named(ctx.mesh, specs)

    def warm_params(idx):
        w = np.zeros(m, np.float32)
        w[list(idx)] = 1.0 / len(idx)
        return averaging.mean_stacked(stacked, jnp.asarray(w), out_shardings=single_sh)

    member_r = evaluation.score_splits(lambda d: scorer.stacked_pairs(stacked, d), splits, needed)

    def warm_pairs(params, split: str) -> evaluation.RewardPairs:
        return evaluation.score_splits(lambda d: scorer.pairs(params, d), splits, (split,))[split]

    rc, rr = member_r[cfg.select_split]
    accuracies = [evaluation.accuracy(rc[i], rr[i]) for i in range(m)]
    order = rank(accuracies)
    chosen = select_members(
        order, cfg, lambda idx: evaluation.accuracy(*warm_pairs(warm_params(idx), cfg.select_split))
    )
    warm = warm_params(chosen)
    stats = evaluation.reward_statistics(member_r["validation"], order[0], chosen, warm_pairs(warm, "validation"))
    hashes = {
        ids[i]: checkpoints.tree_sha256(evaluation.host_copy(ensemble.member_slice(stacked, i, ctx.mesh, specs)))
        for i in range(m)
    }
    checkpoint_averaging.write_merged(
        wd.rm_warm,
        warm,
        model_cfg=members.model_cfg,
        members=[ids[i] for i in chosen],
        weights=[1.0 / len(chosen)] * len(chosen),
        accuracies={ids[i]: {cfg.select_split: accuracies[i]} for i in range(m)},
        hashes=hashes,
        tokenizer_dir=wd.tokenizer,
    )
    if jax.process_index() == 0:
        io_utils.atomic_write_json(
            wd.selection,
            {
                "select_split": cfg.select_split,
                "warm_selection": cfg.warm_selection,
                "members": ids,
                "accuracy": {str(ids[i]): accuracies[i] for i in range(m)},
                "order": [ids[i] for i in order],
                "chosen": [ids[i] for i in chosen],
                "best_member": ids[order[0]],
                "reward_stats": stats,
            },
        )
    log.info("[average] WARM of members %s (%s on %s)", [ids[i] for i in chosen], cfg.warm_selection, cfg.select_split)
