"""The artefact layer: the layout of WORKDIR and typed loaders of what the stages leave there.

Stages exchange files only through this module. A stage asks its ``RunContext`` for ``ctx.artefacts`` (a
``Workdir``) and reads a named attribute or method (``wd.rm_members``, ``wd.member(3)``, ``wd.rl_run("warm")``)
or a loader (``wd.load_trunk(mesh)``, ``wd.load_members(mesh)``, ``wd.read_selection()``); no other module joins
a folder name of another stage onto the workdir (tests/test_workdir.py checks that on the source). The layout is
the one earlier versions wrote, so old workdirs stay readable:

  config.gin, config/<stage>[.operative].gin   the run's and each stage's configuration records
  <stage>/DONE.json                             a finished stage (its folder is the stage's own)
  metrics/<stage>.jsonl, tensorboard/<stage>/   training curves
  superseded/<UTC time>/                        what --rerun_from moved aside
  tokenizer/                                    pretrain | import_model
  pretrain/{ckpt/, imported/, model.json}       pretrain (ckpt: TrainState steps) | import_model (imported)
  data/                                         data: the preference dataset
  rm/{ckpt/, updates.json, members/<i>/, ensemble.json, probe_examples.npz}   rm_ensemble
  rm/warm/, average/selection.json              average: the merged RM; members, ranking, reward statistics
  rm/{eval.json, eval_examples.npz}             rm_eval
  rm_control/{ckpt/, updates.json, lmc.json, lmc_examples.npz}   rm_control
  bon/{results.json, per_prompt.npz}            bon
  rl/<run>/ (a PolicyRun), rl/results.json      reinforce
  policy_ensemble/ (a PolicyRun of M policies)  policy_ensemble
  warp/iter_<k>/{policies/, merged/, next_init/, front/<i>.json}, warp/{results.json, front_examples.npz}   warp
  policy_merge/{merged/, front/<i>.json, results.json, front_examples.npz}   policy_merge
  report/{summary.json, report.md, *.png}       report

``stage_outputs(stage)`` (what ``--rerun_from`` moves aside) is derived from the same names.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Any

import jax
import numpy as np

from warm_jax import checkpoints, io_utils, params_io, sharding
from warm_jax.data.tokenizers import Tokenizer, load_tokenizer
from warm_jax.models import transformer as tr

# ----------------------------------------------------------------------------- names (relative, '/'-separated)

CONFIG_GIN = "config.gin"
RECORDS = "config"  # config/<stage>.gin and <stage>.operative.gin
SUPERSEDED = "superseded"
DONE = "DONE.json"
METRICS = "metrics"
TENSORBOARD = "tensorboard"
TOKENIZER = "tokenizer"
PRETRAIN = "pretrain"
PRETRAIN_CKPT = "pretrain/ckpt"
PRETRAIN_IMPORTED = "pretrain/imported"
PRETRAIN_MODEL = "pretrain/model.json"
DATA = "data"
RM = "rm"
RM_CKPT = "rm/ckpt"
RM_UPDATES = "rm/updates.json"  # loop.updates_path(rm/ckpt)
RM_MEMBERS = "rm/members"
ENSEMBLE_JSON = "rm/ensemble.json"
RM_PROBE_EXAMPLES = "rm/probe_examples.npz"  # the probe gate's per-pair margins, named in ensemble.json
RM_WARM = "rm/warm"
RM_EVAL = "rm/eval.json"
RM_EVAL_EXAMPLES = "rm/eval_examples.npz"
SELECTION = "average/selection.json"
RM_CONTROL = "rm_control"
RL = "rl"
RL_RESULTS = "rl/results.json"
POLICY_ENSEMBLE = "policy_ensemble"
WARP = "warp"
POLICY_MERGE = "policy_merge"
BON = "bon"
REPORT = "report"
MODEL_JSON = "model.json"  # of every params_io checkpoint directory
RESULTS = "results.json"
FRONT_EXAMPLES = "front_examples.npz"
# Where the report finds WARP's front: the first of these that ran.
WARP_SOURCES = (WARP, POLICY_MERGE)

# What a stage writes besides <stage>/, metrics/<stage>.jsonl, tensorboard/<stage>/ and its records (globs allowed).
EXTRA_OUTPUTS: dict[str, tuple[str, ...]] = {
    "pretrain": (TOKENIZER,),
    "import_model": (PRETRAIN, TOKENIZER),
    "rm_ensemble": (RM_CKPT, RM_MEMBERS, ENSEMBLE_JSON, RM_PROBE_EXAMPLES, RM_UPDATES),
    "average": (RM_WARM,),
    "rm_eval": (RM_EVAL, RM_EVAL_EXAMPLES),
    "reinforce": (RL, f"{METRICS}/rl_*.jsonl", f"{TENSORBOARD}/rl_*"),
    "warp": (f"{METRICS}/warp_iter*.jsonl", f"{TENSORBOARD}/warp_iter*"),
}


def record_name(stage: str, *, operative: bool = False) -> str:
    return f"{RECORDS}/{stage}{'.operative' if operative else ''}.gin"


def stage_outputs(stage: str) -> tuple[str, ...]:
    """Paths (relative to the workdir, globs allowed) stage ``stage`` writes: its folder, metrics, records, extras."""
    return (
        stage,
        f"{METRICS}/{stage}.jsonl",
        f"{TENSORBOARD}/{stage}",
        *EXTRA_OUTPUTS.get(stage, ()),
        record_name(stage),
        record_name(stage, operative=True),
    )


# ----------------------------------------------------------------------------- sub-layouts


@dataclasses.dataclass(frozen=True)
class PolicyRun:
    """The folder of one policy training run: rl/<run>, policy_ensemble/ (and its per-policy <i>/), a WARP
    iteration's policies/."""

    dir: str

    @property
    def ckpt(self) -> str:
        return os.path.join(self.dir, "ckpt")

    @property
    def updates(self) -> str:  # loop.updates_path(ckpt)
        return os.path.join(self.dir, "updates.json")

    @property
    def initial_eval(self) -> str:
        return os.path.join(self.dir, "initial_eval.json")

    def eval_scores(self, step: int) -> str:
        return os.path.join(self.dir, "eval_scores", f"{int(step)}.json")

    @property
    def winrate_scores(self) -> str:
        return os.path.join(self.dir, "winrate_scores.json")

    @property
    def meta(self) -> str:  # policy_ensemble: what load_policies needs
        return os.path.join(self.dir, "policies.json")

    @property
    def results(self) -> str:
        return os.path.join(self.dir, RESULTS)

    def policy(self, i: int) -> PolicyRun:
        """Policy i of a run of M policies (its eval and win-rate scores)."""
        return PolicyRun(os.path.join(self.dir, str(i)))

    def read_eval_scores(self, steps) -> dict[str, np.ndarray]:
        """{"step" [S], "oracle" [S, P], "proxy" [S, P]} at ``steps`` (null → NaN).

        Raises FileNotFoundError when a step has no per-prompt record (a run from before they were written)."""
        rows = [io_utils.read_json(self.eval_scores(s)) for s in steps]
        return {
            "step": np.asarray([int(r["step"]) for r in rows], np.int64),
            "oracle": np.asarray([r["oracle"] for r in rows], np.float64),
            "proxy": np.asarray([r["proxy"] for r in rows], np.float64),
        }

    def read_winrate_scores(self) -> np.ndarray:
        """The final policy's oracle reward per win-rate prompt [P]."""
        return np.asarray(io_utils.read_json(self.winrate_scores)["oracle"], np.float64)

    def load_policies(self, like, specs, mesh):
        """The final params [M, ...] of a finished run of M policies (``meta``'s num_policies), stacked by
        ``sharding.stacked_specs``. Only the params of the saved state are read (no optimizer or anchor).

        like: one policy's params (or ShapeDtypeStructs) with the run's shapes and dtypes; specs: their specs.
        Raises FileNotFoundError when the run has not finished (no updates.json yet)."""
        m = int(io_utils.read_json(self.meta)["num_policies"])
        io_utils.read_json(self.updates)  # written only when the run finished
        stacked = jax.tree.map(lambda x: jax.ShapeDtypeStruct((m, *x.shape), x.dtype), like)
        shardings = sharding.named(mesh, sharding.stacked_specs(specs, m, mesh))
        with checkpoints.Checkpointer(self.ckpt, read_only=True, async_save=False) as ck:
            part, _ = ck.restore_partial({"params": sharding.abstract_with_sharding(stacked, shardings)})
        return part["params"]


@dataclasses.dataclass(frozen=True)
class MergeRun:
    """A policy merge and its LITI front: warp/iter_<k>/ (with policies/ and next_init/), policy_merge/; warp/ and
    policy_merge/ hold results.json and front_examples.npz."""

    dir: str

    @property
    def policies(self) -> PolicyRun:
        return PolicyRun(os.path.join(self.dir, "policies"))

    @property
    def merged(self) -> str:
        return os.path.join(self.dir, "merged")

    @property
    def next_init(self) -> str:
        return os.path.join(self.dir, "next_init")

    def front_point(self, i: int) -> str:
        return os.path.join(self.dir, "front", f"{i}.json")

    @property
    def results(self) -> str:
        return os.path.join(self.dir, RESULTS)

    @property
    def front_examples(self) -> str:
        return os.path.join(self.dir, FRONT_EXAMPLES)


# ----------------------------------------------------------------------------- typed artefacts


@dataclasses.dataclass(frozen=True)
class Trunk:
    """The pretrained (or imported) model every RM and policy starts from, sharded per the rules."""

    model_cfg: tr.ModelConfig
    graphdef: Any
    params: Any
    specs: Any  # PartitionSpecs of params (no ensemble axis)
    tokenizer: Tokenizer


@dataclasses.dataclass(frozen=True)
class Members:
    """Reward-model members stacked on device: every leaf [M, ...] (``sharding.stacked_specs``)."""

    model_cfg: tr.ModelConfig
    graphdef: Any
    stacked: Any
    specs: Any  # one member's PartitionSpecs
    ids: list[int]  # row i is member ids[i] (rm/members/<id>)


# ----------------------------------------------------------------------------- the workdir


@dataclasses.dataclass(frozen=True)
class Workdir:
    """Every artefact path of one work directory, and loaders of the artefacts stages hand on."""

    root: str

    def _at(self, rel: str, *more: str) -> str:
        return os.path.join(self.root, *rel.split("/"), *more)

    # -- run bookkeeping
    @property
    def config_gin(self) -> str:
        return self._at(CONFIG_GIN)

    def record(self, stage: str, *, operative: bool = False) -> str:
        return self._at(record_name(stage, operative=operative))

    @property
    def records_glob(self) -> str:
        return os.path.join(glob.escape(self.root), RECORDS, "*.gin")

    @property
    def superseded(self) -> str:
        return self._at(SUPERSEDED)

    def stage_dir(self, stage: str) -> str:
        return self._at(stage)

    def done_file(self, stage: str) -> str:
        return self._at(stage, DONE)

    def metrics_jsonl(self, stage: str) -> str:
        return self._at(METRICS, f"{stage}.jsonl")

    def tensorboard(self, stage: str) -> str:
        return self._at(TENSORBOARD, stage)

    # -- pretrain / import_model
    @property
    def tokenizer(self) -> str:
        return self._at(TOKENIZER)

    @property
    def pretrain_ckpt(self) -> str:
        return self._at(PRETRAIN_CKPT)

    @property
    def pretrain_imported(self) -> str:
        return self._at(PRETRAIN_IMPORTED)

    @property
    def pretrain_model_json(self) -> str:
        return self._at(PRETRAIN_MODEL)

    # -- data
    @property
    def data(self) -> str:
        return self._at(DATA)

    # -- rm_ensemble
    @property
    def rm_ckpt(self) -> str:
        return self._at(RM_CKPT)

    @property
    def rm_updates(self) -> str:
        return self._at(RM_UPDATES)

    @property
    def rm_members(self) -> str:
        return self._at(RM_MEMBERS)

    def member(self, i: int) -> str:
        return self._at(RM_MEMBERS, str(i))

    @property
    def ensemble_json(self) -> str:
        return self._at(ENSEMBLE_JSON)

    @property
    def rm_probe_examples(self) -> str:
        return self._at(RM_PROBE_EXAMPLES)

    # -- average
    @property
    def rm_warm(self) -> str:
        return self._at(RM_WARM)

    @property
    def selection(self) -> str:
        return self._at(SELECTION)

    # -- rm_eval
    @property
    def rm_dir(self) -> str:  # where eval.json's examples file lies
        return self._at(RM)

    @property
    def rm_eval(self) -> str:
        return self._at(RM_EVAL)

    @property
    def rm_eval_examples(self) -> str:
        return self._at(RM_EVAL_EXAMPLES)

    # -- rm_control
    @property
    def rm_control_dir(self) -> str:
        return self._at(RM_CONTROL)

    @property
    def rm_control_ckpt(self) -> str:
        return self._at(RM_CONTROL, "ckpt")

    @property
    def control_lmc(self) -> str:
        return self._at(RM_CONTROL, "lmc.json")

    @property
    def control_examples(self) -> str:
        return self._at(RM_CONTROL, "lmc_examples.npz")

    # -- bon
    @property
    def bon_dir(self) -> str:
        return self._at(BON)

    @property
    def bon_results(self) -> str:
        return self._at(BON, RESULTS)

    @property
    def bon_per_prompt(self) -> str:
        return self._at(BON, "per_prompt.npz")

    # -- reinforce, policy_ensemble, warp, policy_merge
    def rl_run(self, name: str) -> PolicyRun:
        return PolicyRun(self._at(RL, name))

    @property
    def rl_results(self) -> str:
        return self._at(RL_RESULTS)

    @property
    def policy_ensemble(self) -> PolicyRun:
        return PolicyRun(self._at(POLICY_ENSEMBLE))

    @property
    def warp(self) -> MergeRun:
        return MergeRun(self._at(WARP))

    def warp_iteration(self, k: int) -> MergeRun:
        return MergeRun(self._at(WARP, f"iter_{k}"))

    @property
    def policy_merge(self) -> MergeRun:
        return MergeRun(self._at(POLICY_MERGE))

    # -- report
    @property
    def report_dir(self) -> str:
        return self._at(REPORT)

    @property
    def summary_json(self) -> str:
        return self._at(REPORT, "summary.json")

    def relative(self, path: str) -> str:
        """``path`` relative to the workdir (the names results files record)."""
        return os.path.relpath(path, self.root)

    # ------------------------------------------------------------------------- loaders

    def read_pretrain_meta(self) -> tuple[dict, tr.ModelConfig]:
        """(pretrain/model.json's contents, its ModelConfig); errors name the file and the field."""
        meta = io_utils.read_json(self.pretrain_model_json)
        return meta, params_io.model_config_from_json(meta, self.pretrain_model_json)

    def write_pretrain_meta(self, model_cfg: tr.ModelConfig, **extra) -> None:
        """pretrain/model.json: the trunk's model config and where its tokenizer lies (relative to the workdir)."""
        io_utils.atomic_write_json(
            self.pretrain_model_json, {"model": dataclasses.asdict(model_cfg), "tokenizer": TOKENIZER, **extra}
        )

    def trunk_tokenizer_dir(self) -> str:
        """The tokenizer pretrain/model.json names."""
        meta, _ = self.read_pretrain_meta()
        return os.path.join(self.root, meta["tokenizer"])

    def load_tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.trunk_tokenizer_dir())

    def load_trunk(self, mesh, step: int | None = None) -> Trunk:
        """The pretrained parameters in the rules' sharding on ``mesh``, and the pieces that go with them.

        From pretrain/ckpt only the ``params`` item of the saved TrainState is read (``restore_partial``, checked
        against the hash manifest): the optimizer state is neither read nor rebuilt, so the current gin
        ``PretrainConfig`` plays no part. ``step``: a kept pretraining step (Baklava featurizers); None: the latest.
        An imported model (import_model) has no steps.
        """
        meta, model_cfg = self.read_pretrain_meta()
        tok = load_tokenizer(os.path.join(self.root, meta["tokenizer"]))
        if meta.get("imported"):
            if step is not None:
                raise ValueError(f"an imported model ({meta['imported']}) has no pretraining step {step}")
            model_cfg, graphdef, params, _ = params_io.load_params_checkpoint(self.pretrain_imported, mesh)
            _, abstract, axes = tr.abstract_model(model_cfg)
            return Trunk(model_cfg, graphdef, params, sharding.tree_specs(axes, abstract, mesh), tok)
        graphdef, abstract, axes = tr.abstract_model(model_cfg)
        specs = sharding.tree_specs(axes, abstract, mesh)
        if not os.path.isdir(self.pretrain_ckpt):
            raise FileNotFoundError(2, "no pretraining checkpoint", self.pretrain_ckpt)
        target = {"params": sharding.abstract_with_sharding(abstract, sharding.named(mesh, specs))}
        with checkpoints.Checkpointer(self.pretrain_ckpt, read_only=True, async_save=False) as ck:
            part, _ = ck.restore_partial(target, step)
        return Trunk(model_cfg, graphdef, part["params"], specs, tok)

    def member_ids(self) -> list[int]:
        """The members rm_ensemble exported (rm/members/<id>), ascending."""
        return sorted(int(d) for d in os.listdir(self.rm_members) if d.isdigit())

    def _member_dir(self, member: int) -> str:
        d = self.member(member)
        if not os.path.isdir(d):
            raise FileNotFoundError(2, f"reward-model member {member} has no checkpoint", d)
        return d

    def load_member(self, mesh, member: int):
        """One member's (model_cfg, graphdef, params, meta)."""
        return params_io.load_params_checkpoint(self._member_dir(member), mesh)

    def load_members(self, mesh, ids=None) -> Members:
        """Members ``ids`` (default: all) stacked on device [M, ...] by ``sharding.stack_members``."""
        ids = self.member_ids() if ids is None else [int(i) for i in ids]
        if not ids:
            raise FileNotFoundError(2, "no reward-model members", self.rm_members)
        loaded = [self.load_member(mesh, i) for i in ids]
        model_cfg, graphdef = loaded[0][0], loaded[0][1]
        for i, (cfg, _, _, _) in zip(ids, loaded):
            if cfg != model_cfg:
                raise ValueError(
                    f"{os.path.join(self.member(i), MODEL_JSON)}: its model differs from member {ids[0]}'s; "
                    "an ensemble needs one architecture"
                )
        _, abstract, axes = tr.abstract_model(model_cfg)
        specs = sharding.tree_specs(axes, abstract, mesh)
        stacked = sharding.stack_members([p for _, _, p, _ in loaded], mesh, specs)
        return Members(model_cfg, graphdef, stacked, specs, ids)

    def read_warm_meta(self) -> dict:
        """rm/warm/model.json's contents (its 'merge' record names the members and their weights)."""
        meta, _ = params_io.read_model_json(self.rm_warm)
        return meta

    def load_merged(self, mesh):
        """The merged WARM RM of rm/warm: (model_cfg, graphdef, params, meta)."""
        if not os.path.isdir(self.rm_warm):
            raise FileNotFoundError(2, "no merged WARM reward model (run the `average` stage)", self.rm_warm)
        return params_io.load_params_checkpoint(self.rm_warm, mesh)

    def read_selection(self) -> dict:
        """average/selection.json, checked for the fields the policy stages read."""
        path = self.selection
        if not os.path.exists(path):
            raise FileNotFoundError(2, "not found: run the `average` stage before the policy stages", path)
        data = io_utils.read_json(path)
        for field in ("best_member", "members", "reward_stats"):
            if field not in data:
                raise KeyError(f"{path} has no field {field!r}; it has {sorted(data)}")
        return data

    # -- results (None when the stage did not run)
    def _maybe(self, path: str) -> dict | None:
        return io_utils.read_json(path) if os.path.exists(path) else None

    def read_ensemble(self) -> dict | None:
        return self._maybe(self.ensemble_json)

    def read_rm_eval(self) -> dict | None:
        return self._maybe(self.rm_eval)

    def read_control(self) -> dict | None:
        return self._maybe(self.control_lmc)

    def read_bon(self) -> dict | None:
        return self._maybe(self.bon_results)

    def read_rl(self) -> dict | None:
        return self._maybe(self.rl_results)

    def read_warp(self) -> dict | None:
        """The WARP results of the first of ``WARP_SOURCES`` that ran ("source" names it, "directory" holds it)."""
        for source in WARP_SOURCES:
            run = MergeRun(self._at(source))
            if os.path.exists(run.results):
                return {**io_utils.read_json(run.results), "source": source, "directory": run.dir}
        return None

    def training_updates(self) -> dict[str, dict]:
        """Applied and skipped updates of every training run (``loop.updates_path``), by run folder."""
        found = {}
        for parent in (self.root, self._at(RL)):
            if not os.path.isdir(parent):
                continue
            for name in sorted(os.listdir(parent)):
                path = os.path.join(parent, name, "updates.json")
                if os.path.isfile(path):
                    found[self.relative(os.path.join(parent, name))] = io_utils.read_json(path)
        for path in sorted(glob.glob(os.path.join(glob.escape(self.root), WARP, "iter_*", "policies", "updates.json"))):
            found[self.relative(os.path.dirname(path))] = io_utils.read_json(path)
        return found
