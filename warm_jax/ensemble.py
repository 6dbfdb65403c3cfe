"""Stage `rm_ensemble`: M reward models trained by ONE jitted, vmapped, sharded step.

Recipe (WARM §3 / LP-FT): every member starts from the same pretrained trunk (or, "Baklava",
from a listed pretraining checkpoint) and the SAME linear-probed reward head; members differ
only by seed (data order, dropout), learning rate and dropout rate, and, with
``member_data_fraction`` < 1, by which share of the training pairs each one sees. The stacked
state has a leading [M] axis on every leaf, split over the mesh's 'ensemble' axis; within a
member the rules table shards parameters over data/fsdp/tensor.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from warm_jax import averaging, cpu_tuning, eval_splits, faults, feature_probe, io_utils, loop, params_io, pretrain
from warm_jax import rm_scoring, seeds, sharding
from warm_jax.data import pipeline, preference
from warm_jax.data.local_rows import LocalRows, local_rows
from warm_jax.models import transformer as tr
from warm_jax.stages import RunContext, register_stage
from warm_jax.train_state import TrainState, guarded_update, new_state, state_specs

log = logging.getLogger(__name__)

RM_FIELDS = ("chosen_tokens", "rejected_tokens", "chosen_length", "rejected_length")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class EnsembleConfig:
    num_members: int = 4
    # Per-member lists; a single value applies to every member.
    learning_rates: tuple[float, ...] = (1e-3,)
    dropout_rates: tuple[float, ...] = (0.1,)
    seeds: tuple[int, ...] | None = None  # default: derived from the run's SEED
    featurizer_steps: tuple[int | None, ...] | None = None  # Baklava: pretrain step per member
    shared_data_order: bool = False
    # Subagging: each member trains on its own seeded share of the training pairs (1.0: every member on all).
    member_data_fraction: float = 1.0
    batch_size: int = 32  # pairs per member per step (global)
    num_steps: int = 400
    weight_decay: float = 0.0
    margin: float = 0.0
    center_coef: float = 0.0
    lp_steps: int = 300
    lp_learning_rate: float = 3e-2
    dataset_dir: str | None = None  # default WORKDIR/data
    # Negative control (not WARM): each member from its own random init, no pretraining, no probe.
    random_init: bool = False
    probe_gate: bool = True  # also probe random-init features; score both probes on validation and each ood split

    def __post_init__(self):
        if not 0.0 < self.member_data_fraction <= 1.0:
            raise ValueError(f"EnsembleConfig.member_data_fraction must be in (0, 1], got {self.member_data_fraction}")
        if self.shared_data_order and self.member_data_fraction < 1.0:
            raise ValueError(
                "EnsembleConfig.shared_data_order = True gives every member one order over the same pairs; "
                f"it cannot be combined with member_data_fraction = {self.member_data_fraction}"
            )


def per_member(values, m: int, binding: str) -> list:
    values = list(values)
    if len(values) == 1:
        return values * m
    if len(values) != m:
        raise ValueError(f"gin binding EnsembleConfig.{binding} has {len(values)} values for {m} members")
    return values


def member_seeds(cfg: EnsembleConfig, run_seed: int) -> list[int]:
    """Each member's seed (its step keys and data order): ``EnsembleConfig.seeds`` when given, else the named
    stream ("ensemble", "member", i) of the run's seed. The `rm_control` stage's two members take the first two
    (the same data order as members 0 and 1)."""
    if cfg.seeds is not None:
        return per_member(cfg.seeds, cfg.num_members, "seeds")
    return [seeds.seed(run_seed, "ensemble", "member", i) for i in range(cfg.num_members)]


def make_member_tx(cfg: EnsembleConfig, learning_rate) -> optax.GradientTransformation:
    """AdamW whose learning rate lives in the optimizer state (so it can differ per member)."""

    def build(learning_rate):
        return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(learning_rate, weight_decay=cfg.weight_decay))

    return optax.inject_hyperparams(build)(learning_rate=learning_rate)


# ----------------------------------------------------------------------------- linear probe


def linear_probe(params, graphdef, source, cfg: EnsembleConfig):
    """Fits the reward head on frozen features (BT loss, ``feature_probe``); returns (head params, train
    accuracy, the train feature differences [N, d])."""
    diff = feature_probe.feature_diffs(params, graphdef, source)
    head = jax.device_get(params["reward_head"])
    try:
        kernel = feature_probe.fit_head(diff, head["kernel"], steps=cfg.lp_steps, learning_rate=cfg.lp_learning_rate)
    except FloatingPointError as e:
        raise loop.NonFiniteUpdateError(
            f"[rm_ensemble] linear probe: {e} (EnsembleConfig.lp_learning_rate = {cfg.lp_learning_rate}, "
            f"lp_steps = {cfg.lp_steps})"
        ) from None
    acc = feature_probe.accuracy(feature_probe.margins(diff, kernel))
    return {"kernel": kernel.astype(head["kernel"].dtype), "bias": head["bias"]}, acc, diff


def probe_gate(ctx: RunContext, model_cfg, graphdef, base, train_diff, head, cfg: EnsembleConfig):
    """The probe on pretrained features against the same probe on random-init features of the same shape,
    both fitted on the training pairs and scored on validation and every ood split the dataset has
    (``eval_splits.dataset_held_out``). Returns (the gate record of
    ``feature_probe.gate``, per-pair margins {"pretrained/<split>", "random/<split>": [N]})."""
    key = seeds.key(ctx.seed, "rm_ensemble", "probe_gate", "random_init")
    rand = pretrain.sharded_init(model_cfg, ctx.mesh, key)[1]
    data = dataset_dir(ctx, cfg)
    rand_train = feature_probe.feature_diffs(rand, graphdef, pipeline.load_split(data, "train"))
    kernels = {"pretrained": np.asarray(head["kernel"], np.float32)}
    try:
        kernels["random"] = feature_probe.fit_head(
            rand_train, head["kernel"], steps=cfg.lp_steps, learning_rate=cfg.lp_learning_rate
        )
    except FloatingPointError as e:
        raise loop.NonFiniteUpdateError(f"[rm_ensemble] probe on random-init features: {e}") from None
    trunks = {"pretrained": base, "random": rand}
    margins = {name: {} for name in trunks}  # {features: {split: [N]}}
    margins["pretrained"]["train"] = feature_probe.margins(train_diff, kernels["pretrained"])
    margins["random"]["train"] = feature_probe.margins(rand_train, kernels["random"])
    for split in eval_splits.dataset_held_out(data):
        source = pipeline.load_split(data, split)
        for name, params in trunks.items():
            margins[name][split] = feature_probe.margins(
                feature_probe.feature_diffs(params, graphdef, source), kernels[name]
            )
    record = feature_probe.gate(margins["pretrained"], margins["random"])
    return record, {f"{name}/{split}": m for name, by_split in margins.items() for split, m in by_split.items()}


# ----------------------------------------------------------------------------- the step


def member_step(state: TrainState, batch, dropout_rate, nan_at_step, *, graphdef, tx, cfg: EnsembleConfig):
    """One Bradley–Terry update of ONE member (vmapped over members by the caller).

    batch: chosen/rejected tokens [B, T], lengths [B]; nan_at_step: int32 [] (``faults``; −1 = never).
    Returns (state, metrics of scalars).
    """
    # Rate 0 for every member is known when the step is traced: draw no masks (threefry over every
    # residual activation is ~5% of a CPU step), which is exactly dropout at rate 0.
    key = state.step_key() if any(r > 0 for r in cfg.dropout_rates) else None

    def loss_fn(params):
        r_c, r_r = rm_scoring.pair_rewards(params, graphdef, batch, dropout_rate=dropout_rate, key=key)
        loss, aux = rm_scoring.bradley_terry(r_c, r_r, margin=cfg.margin, center_coef=cfg.center_coef)
        return loss, aux

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    if not cfg.center_coef:
        # The BT loss only sees r⁺ − r⁻, so the head's bias is unidentifiable: its gradient is
        # rounding noise that Adam would normalise into lr-sized steps. Keep it fixed.
        grads = {**grads, "reward_head": {**grads["reward_head"], "bias": jnp.zeros_like(grads["reward_head"]["bias"])}}
    new, loss, finite = guarded_update(state, loss, grads, tx, nan_at_step=nan_at_step)
    metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": state.opt_state.hyperparams["learning_rate"],
        "finite": finite,
        **aux,
    }
    return new, metrics


def ensemble_step_fn(graphdef, tx, cfg: EnsembleConfig, state_sh, batch_sh, member_sh, replicated, *, nan_steps=None):
    """ONE jit of the vmapped member step, with explicit shardings and the state donated.

    nan_steps: int32 [M] (``faults.FaultInjection.member_nan_steps``, tests) or None (never)."""
    vstep = jax.vmap(
        functools.partial(member_step, graphdef=graphdef, tx=tx, cfg=cfg),
        in_axes=(0, None if cfg.shared_data_order else 0, 0, None if nan_steps is None else 0),
        spmd_axis_name=sharding.ENSEMBLE,
    )

    def step(state, batch, dropout_rates):
        nan = jnp.int32(faults.NEVER) if nan_steps is None else jnp.asarray(nan_steps, jnp.int32)
        state, metrics = vstep(state, batch, dropout_rates, nan)
        # One verdict for the loop; which members skipped goes into its error.
        metrics["member_finite"] = metrics["finite"]
        metrics["finite"] = jnp.all(metrics["finite"])
        return state, metrics

    return jax.jit(
        step,
        in_shardings=(state_sh, batch_sh, member_sh),
        out_shardings=(state_sh, replicated),
        donate_argnums=0,
        compiler_options=cpu_tuning.compiler_options(cpu_tuning.TRAIN_STEP),
    )


class StackedIterator:
    """M per-member iterators → batches [M, B, ...]; state is the list of member states.

    With `members` (sorted member indices this process holds, e.g. `LocalRows.members`) a batch is [m, B, ...] of
    those members only; the other members' iterators step past their batches unread, so every process keeps the
    same state for all M.
    """

    def __init__(self, iterators: Sequence, members: Sequence[int] | None = None):
        self.iterators = list(iterators)
        self.members = set(range(len(self.iterators)) if members is None else (int(m) for m in members))

    def __iter__(self):
        return self

    def __next__(self):
        batches = []
        for m, it in enumerate(self.iterators):
            if m in self.members:
                batches.append(next(it))
            else:
                it.skip()
        return {k: np.stack([b[k] for b in batches]) for k in batches[0]}

    @property
    def rows_read(self) -> int:
        return sum(it.rows_read for it in self.iterators)

    @property
    def records_read(self) -> int:
        return sum(it.records_read for it in self.iterators)

    def get_state(self) -> dict:
        return {"members": [it.get_state() for it in self.iterators]}

    def set_state(self, state: dict) -> None:
        for it, s in zip(self.iterators, state["members"], strict=True):
            it.set_state(s)


# ----------------------------------------------------------------------------- building it


@dataclasses.dataclass
class Ensemble:
    """What the stage builds: graphdef, optimizer, shardings, initial stacked state."""

    model_cfg: tr.ModelConfig
    graphdef: object
    tx: optax.GradientTransformation
    param_specs: object  # per-member specs (no ensemble axis)
    state_shardings: TrainState
    state: TrainState
    abstract_state: TrainState
    lp_accuracy: float
    probe: dict | None  # the probe gate (``probe_gate``) and its per-pair margins; None for random-init members
    member_inits: tuple  # each member's LP-FT init (its pretrained trunk + the probed head), unstacked


def stack_state(mesh, cfg: EnsembleConfig, inits: Sequence, param_specs, seeds: Sequence[int]):
    """The stacked training state [M, ...] from M per-member initial params (pure dicts).

    Every leaf (params, Adam moments, counters, the per-member learning rate, step, key) gets a
    leading member axis split over the mesh's 'ensemble' axis. Returns
    (tx, state shardings, state, abstract state with shardings).
    """
    m = len(inits)
    lrs = jnp.asarray(per_member(cfg.learning_rates, m, "learning_rates"), jnp.float32)
    keys = jnp.stack([jax.random.key_data(jax.random.key(s)) for s in seeds])
    tx = make_member_tx(cfg, 0.0)  # the rate itself lives in each member's optimizer state
    abstract_params = jax.eval_shape(lambda: inits[0])
    member_specs = state_specs(tx, abstract_params, param_specs)
    state_sh = sharding.named(mesh, sharding.prefix_ensemble(member_specs))
    # Stack on device: [M, ...] per leaf, written straight into the ensemble sharding (M is a multiple of the axis).
    params = sharding.stack_members(inits, mesh, param_specs)

    def init_member(p, lr, key):
        return new_state(p, make_member_tx(cfg, lr), key)

    state = jax.jit(jax.vmap(init_member), out_shardings=state_sh)(params, lrs, keys)
    abstract_state = sharding.abstract_with_sharding(jax.eval_shape(lambda: state), state_sh)
    return tx, state_sh, state, abstract_state


def build(ctx: RunContext, cfg: EnsembleConfig, train_source) -> Ensemble:
    mesh = ctx.mesh
    m = cfg.num_members
    ens_size = mesh.shape.get(sharding.ENSEMBLE, 1)
    if m % ens_size:
        raise ValueError(f"EnsembleConfig.num_members={m} must be a multiple of the mesh's ensemble axis ({ens_size})")
    trunk = ctx.artefacts.load_trunk(mesh)
    model_cfg, graphdef, base, param_specs = trunk.model_cfg, trunk.graphdef, trunk.params, trunk.specs
    member_seed_values = member_seeds(cfg, ctx.seed)
    if cfg.random_init:
        head, lp_acc, probe = base["reward_head"], float("nan"), None
        inits = [pretrain.sharded_init(model_cfg, mesh, seeds.key(s, "random_init"))[1] for s in member_seed_values]
    else:
        head, lp_acc, train_diff = linear_probe(base, graphdef, train_source, cfg)
        log.info("[rm_ensemble] linear probe: train accuracy %.3f", lp_acc)
        if cfg.probe_gate:
            gate, margins = probe_gate(ctx, model_cfg, graphdef, base, train_diff, head, cfg)
            probe = {"gate": gate, "margins": margins}
            log.log(
                logging.INFO if gate["holds"] else logging.WARNING,
                "[rm_ensemble] probe gate %s: validation accuracy %.3f on pretrained features, %.3f on random-init "
                "features (needs >= %.2f and a %.0f pt margin); %s",
                "holds" if gate["holds"] else "FAILS (pretraining gives the members little to share)",
                gate["pretrained"]["validation"],
                gate["random"]["validation"],
                gate["accuracy_bound"],
                100 * gate["margin_bound"],
                ", ".join(
                    f"{s} {gate['pretrained'][s]:.3f} vs {gate['random'][s]:.3f}"
                    for s in eval_splits.ood_splits(gate["pretrained"])
                ),
            )
        else:
            probe = None
        steps = per_member(cfg.featurizer_steps or (None,), m, "featurizer_steps")
        trunks = {s: (base if s is None else ctx.artefacts.load_trunk(mesh, step=s).params) for s in set(steps)}
        inits = [trunks[s] for s in steps]

    def with_head(p):
        return p if cfg.random_init else {**p, "reward_head": head}

    member_inits = [with_head(p) for p in inits]
    tx, state_sh, state, abstract_state = stack_state(mesh, cfg, member_inits, param_specs, member_seed_values)
    return Ensemble(
        model_cfg, graphdef, tx, param_specs, state_sh, state, abstract_state, lp_acc, probe, tuple(member_inits)
    )


def member_source(cfg: EnsembleConfig, source, seed: int):
    """The training pairs of the member with ``seed``: all of ``source``, or its share (``member_data_fraction``),
    which depends on the seed alone, so `rm_control`'s members see the pairs of members 0 and 1."""
    if cfg.member_data_fraction == 1.0:
        return source
    subset = preference.member_subset(len(source), cfg.member_data_fraction, seed)
    if len(subset) < cfg.batch_size:
        raise ValueError(
            f"EnsembleConfig.member_data_fraction = {cfg.member_data_fraction} leaves each member {len(subset)} of "
            f"{len(source)} training pairs, fewer than one batch (EnsembleConfig.batch_size = {cfg.batch_size})"
        )
    return pipeline.Subset(source, subset)


def member_iterators(cfg: EnsembleConfig, source, seeds: Sequence[int], local: LocalRows | None = None):
    """The training batches, [B, ...] shared or [M, B, ...] per member; with `local` (this process's rows of that
    global batch, from its sharding) only those rows, of this process's members."""
    make = lambda s, rows: pipeline.PreferenceIterator(
        member_source(cfg, source, s), batch_size=cfg.batch_size, seed=s, fields=RM_FIELDS, local=rows
    )
    if cfg.shared_data_order:
        return make(seeds[0], local or LocalRows.everything((cfg.batch_size,)))
    local = local or LocalRows.everything((len(seeds), cfg.batch_size))
    mine = {int(m): i for i, m in enumerate(local.members)}
    # Members held elsewhere keep an iterator too (never read, only stepped) so the saved state covers all M.
    unread = LocalRows.everything((cfg.batch_size,))  # the same global batch, so the same order and state
    its = [make(s, local.member(mine[m]) if m in mine else unread) for m, s in enumerate(seeds)]
    return StackedIterator(its, members=local.members)


def dataset_dir(ctx: RunContext, cfg: EnsembleConfig) -> str:
    return cfg.dataset_dir or ctx.artefacts.data


def train_ensemble(
    ctx: RunContext,
    cfg: EnsembleConfig | None = None,
    *,
    stage: str = "rm_ensemble",
    ckpt_dir: str | None = None,
    fault: faults.FaultInjection | None = None,
) -> tuple[Ensemble, TrainState]:
    cfg = cfg or EnsembleConfig()
    fault = fault or faults.FaultInjection()
    mesh = ctx.mesh
    source = pipeline.load_split(dataset_dir(ctx, cfg), "train")
    ens = build(ctx, cfg, source)
    seeds = member_seeds(cfg, ctx.seed)
    members = "shared" if cfg.shared_data_order else "stacked"
    lead = 0 if cfg.shared_data_order else 1  # [B, ...] or [M, B, ...]
    batch_shardings = {
        k: sharding.batch_sharding(mesh, lead + (1 if k.endswith("length") else 2), members=members) for k in RM_FIELDS
    }
    # Each process reads only the rows (of the members) its devices hold.
    global_lead = (cfg.batch_size,) if cfg.shared_data_order else (cfg.num_members, cfg.batch_size)
    local = local_rows(batch_shardings["chosen_tokens"], global_lead)
    iterator = member_iterators(cfg, source, seeds, local)
    member_sh = NamedSharding(mesh, P(sharding.ENSEMBLE))
    step = ensemble_step_fn(
        ens.graphdef,
        ens.tx,
        cfg,
        ens.state_shardings,
        batch_shardings,
        member_sh,
        sharding.replicated(mesh),
        nan_steps=fault.member_nan_steps(cfg.num_members),
    )
    dropout = sharding.put_global(
        np.asarray(per_member(cfg.dropout_rates, cfg.num_members, "dropout_rates"), np.float32), member_sh
    )
    to_device = lambda b: pipeline.to_global({k: b[k] for k in RM_FIELDS}, lambda k, _: batch_shardings[k], local)
    state = loop.train(
        stage=stage,
        workdir=ctx.workdir,
        state=ens.state,
        abstract_state=ens.abstract_state,
        step_fn=lambda s, b: step(s, b, dropout),
        iterator=iterator,
        to_device=to_device,
        num_steps=cfg.num_steps,
        ckpt_dir=ckpt_dir or ctx.artefacts.rm_ckpt,
        show=("loss", "accuracy"),
        fault=fault,
    )
    pipeline.log_reads(stage, iterator)
    return ens, state


# ----------------------------------------------------------------------------- member export


@jax.jit
def _take_member(stacked, i):
    # i is traced: one compile serves every member (a Python index would compile once per member).
    return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), stacked)


def member_slice(stacked_params, i: int, mesh, param_specs):
    """Member i of a stacked tree [M, ...] → [...], resharded to the single-member layout (on device)."""
    return jax.device_put(_take_member(stacked_params, jnp.int32(i)), sharding.named(mesh, param_specs))


@register_stage("rm_ensemble")
def run(ctx: RunContext, cfg: EnsembleConfig | None = None):
    cfg = cfg or EnsembleConfig()
    wd = ctx.artefacts
    ens, state = train_ensemble(ctx, cfg)
    seeds = member_seeds(cfg, ctx.seed)
    lrs = per_member(cfg.learning_rates, cfg.num_members, "learning_rates")
    drops = per_member(cfg.dropout_rates, cfg.num_members, "dropout_rates")
    feats = per_member(cfg.featurizer_steps or (None,), cfg.num_members, "featurizer_steps")
    train = pipeline.load_split(dataset_dir(ctx, cfg), "train")
    pairs = [len(member_source(cfg, train, s)) for s in seeds]
    for i in range(cfg.num_members):
        meta = {
            "member": i,
            "seed": seeds[i],
            "learning_rate": lrs[i],
            "dropout_rate": drops[i],
            "featurizer_step": feats[i],
            "train_pairs": pairs[i],
            "num_steps": cfg.num_steps,
        }
        params_io.save_params(
            wd.member(i),
            member_slice(state.params, i, ctx.mesh, ens.param_specs),
            model_cfg=ens.model_cfg,
            meta=meta,
            tokenizer_dir=wd.tokenizer,
        )
    geometry = {}
    if not cfg.random_init:
        # Members on one featurizer share its init; Baklava members are each measured from their own checkpoint.
        one = len(set(feats)) == 1
        inits = ens.member_inits[0] if one else sharding.stack_members(ens.member_inits, ctx.mesh, ens.param_specs)
        geometry_fn = jax.jit(averaging.task_vector_geometry, out_shardings=sharding.replicated(ctx.mesh))
        dist, cos = jax.device_get(geometry_fn(state.params, inits))
        geometry = {"distance_from_init": dist.tolist(), "task_vector_cosine": cos.tolist()}
        off = cos[~np.eye(len(cos), dtype=bool)]
        log.info(
            "[rm_ensemble] members moved %s of ||θ₀|| from their inits; task-vector cosines %.2f…%.2f",
            ", ".join(f"{d:.3f}" for d in dist),
            off.min() if off.size else 1.0,
            off.max() if off.size else 1.0,
        )
    if jax.process_index() == 0:
        probe_sha = ens.probe and io_utils.write_arrays(wd.rm_probe_examples, ens.probe["margins"])
        io_utils.atomic_write_json(
            wd.ensemble_json,
            {
                "num_members": cfg.num_members,
                "lp_train_accuracy": ens.lp_accuracy,
                **({"probe": {**ens.probe["gate"], "examples_sha256": probe_sha}} if ens.probe else {}),
                **({"geometry": geometry} if geometry else {}),
                "seeds": seeds,
                "learning_rates": lrs,
                "dropout_rates": drops,
                "featurizer_steps": feats,
                "member_data_fraction": cfg.member_data_fraction,
                "train_pairs": pairs,
            },
        )
