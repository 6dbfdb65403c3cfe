"""The artefact layer (warm_jax/workdir.py): the layout, --rerun_from's outputs against what the stages write, the
trunk loader without the pretraining optimizer, members stacked by one ensemble-axis rule, and a source check that
no other module builds a path of a stage's files."""

from __future__ import annotations

import ast
import fnmatch
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from tests import helpers
from warm_jax import checkpoint_averaging, checkpoints, evaluate_checkpoint, loop, pretrain, runtime, sharding
from warm_jax import workdir as workdir_lib
from warm_jax.models import transformer as tr
from warm_jax.policy import rewards
from warm_jax.stages import RunContext
from warm_jax.train_state import new_state, state_specs
from warm_jax.workdir import Workdir

ROOT = Path(__file__).resolve().parent.parent / "warm_jax"

# ----------------------------------------------------------------------------- the layout


def test_every_artefact_path_lies_under_the_workdir_where_earlier_versions_wrote_it(tmp_path):
    root = str(tmp_path / "wd")
    wd = Workdir(root)
    # The on-disk layout is the one stages wrote before the layer existed: old workdirs stay readable.
    expected = {
        wd.config_gin: "config.gin",
        wd.record("rm_eval"): "config/rm_eval.gin",
        wd.record("rm_eval", operative=True): "config/rm_eval.operative.gin",
        wd.superseded: "superseded",
        wd.done_file("bon"): "bon/DONE.json",
        wd.metrics_jsonl("rl_warm"): "metrics/rl_warm.jsonl",
        wd.tensorboard("pretrain"): "tensorboard/pretrain",
        wd.tokenizer: "tokenizer",
        wd.pretrain_ckpt: "pretrain/ckpt",
        wd.pretrain_imported: "pretrain/imported",
        wd.pretrain_model_json: "pretrain/model.json",
        wd.data: "data",
        wd.rm_ckpt: "rm/ckpt",
        wd.rm_updates: "rm/updates.json",
        wd.rm_members: "rm/members",
        wd.member(3): "rm/members/3",
        wd.ensemble_json: "rm/ensemble.json",
        wd.rm_probe_examples: "rm/probe_examples.npz",
        wd.rm_warm: "rm/warm",
        wd.selection: "average/selection.json",
        wd.rm_eval: "rm/eval.json",
        wd.rm_eval_examples: "rm/eval_examples.npz",
        wd.rm_control_ckpt: "rm_control/ckpt",
        wd.control_lmc: "rm_control/lmc.json",
        wd.control_examples: "rm_control/lmc_examples.npz",
        wd.bon_results: "bon/results.json",
        wd.bon_per_prompt: "bon/per_prompt.npz",
        wd.rl_run("warm_ema").ckpt: "rl/warm_ema/ckpt",
        wd.rl_run("warm").updates: "rl/warm/updates.json",
        wd.rl_run("warm").initial_eval: "rl/warm/initial_eval.json",
        wd.rl_run("warm").eval_scores(20): "rl/warm/eval_scores/20.json",
        wd.rl_run("warm").winrate_scores: "rl/warm/winrate_scores.json",
        wd.rl_results: "rl/results.json",
        wd.policy_ensemble.meta: "policy_ensemble/policies.json",
        wd.policy_ensemble.policy(1).winrate_scores: "policy_ensemble/1/winrate_scores.json",
        wd.policy_ensemble.results: "policy_ensemble/results.json",
        wd.warp_iteration(1).policies.ckpt: "warp/iter_1/policies/ckpt",
        wd.warp_iteration(0).merged: "warp/iter_0/merged",
        wd.warp_iteration(0).next_init: "warp/iter_0/next_init",
        wd.warp_iteration(0).front_point(2): "warp/iter_0/front/2.json",
        wd.warp.results: "warp/results.json",
        wd.warp.front_examples: "warp/front_examples.npz",
        wd.policy_merge.merged: "policy_merge/merged",
        wd.policy_merge.results: "policy_merge/results.json",
        wd.report_dir: "report",
        wd.summary_json: "report/summary.json",
    }
    for path, rel in expected.items():
        assert path == os.path.join(root, *rel.split("/")), rel
        assert os.path.abspath(path).startswith(os.path.abspath(root) + os.sep)
    # The files loop.py and metrics.py name are the layer's.
    assert loop.updates_path(wd.rm_ckpt) == wd.rm_updates
    assert loop.updates_path(wd.rl_run("warm").ckpt) == wd.rl_run("warm").updates
    # Every extra output --rerun_from moves is a named artefact of the layout.
    named = {os.path.relpath(p, root) for p in expected}
    for stage, extras in workdir_lib.EXTRA_OUTPUTS.items():
        for pattern in extras:
            if not any(c in pattern for c in "*?["):
                assert pattern in named or any(n.startswith(pattern + "/") for n in named), (stage, pattern)


# ----------------------------------------------------------------------------- --rerun_from's outputs vs the stages

LATER = (
    "rm_ensemble",
    "rm_control",
    "average",
    "rm_eval",
    "bon",
    "reinforce",
    "policy_ensemble",
    "policy_merge",
    "warp",
    "report",
)
RUN_WIDE = ("config.gin", "config", "metrics", "tensorboard")  # written by the runner / shared folders
PIPELINE = (
    helpers.TINY
    + helpers.TINY_POLICY
    + [
        helpers.MESH_8,
        "ReinforceConfig.rewards = ('warm',)",
        "PolicyEnsembleConfig.num_policies = 2",
        "WarpConfig.iterations = 1",
        "WarpConfig.num_policies = 2",
        "WarpConfig.etas = (0.0, 1.0)",
    ]
)


def _tree(root: str) -> set[str]:
    out = set()
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            out.add(os.path.relpath(os.path.join(d, name), root))
    return out


def _owned(path: str, patterns) -> bool:
    """``path`` or a folder above it matches one of ``patterns``."""
    parts = path.split(os.sep)
    return any(fnmatch.fnmatchcase("/".join(parts[:k]), pat) for k in range(1, len(parts) + 1) for pat in patterns)


def _matched(paths: set[str], patterns) -> set[str]:
    return {p for p in paths if any(fnmatch.fnmatchcase(p.replace(os.sep, "/"), pat) for pat in patterns)}


def _check_stage(stage: str, before: set[str], after: set[str]) -> None:
    patterns = workdir_lib.stage_outputs(stage)
    new = after - before
    owned = {p for p in new if _owned(p, patterns)}
    # A new path no output covers is a folder made on the way to an owned one (rm/ for rm/ckpt) or run-wide.
    stray = [p for p in new - owned if p not in RUN_WIDE and not any(o.startswith(p + os.sep) for o in owned)]
    assert not stray, f"stage {stage} wrote {sorted(stray)}, which --rerun_from={stage} would leave behind"
    # What --rerun_from would move for this stage is this stage's own: nothing an earlier stage wrote.
    foreign = sorted(_matched(before, patterns))
    assert not foreign, f"stage_outputs({stage!r}) also matches {foreign}, written before it ran"
    assert stage in owned and os.path.join(stage, "DONE.json") in owned


@pytest.fixture(scope="module")
def pipeline(base_workdir, tmp_path_factory):
    """The tiny pipeline, one stage at a time after base_workdir's pretrain + data: {stage: (before, after)}."""
    wd = str(tmp_path_factory.mktemp("artefacts") / "wd")
    shutil.copytree(base_workdir, wd)
    trees = {}
    for k, stage in enumerate(LATER):
        before = _tree(wd)
        helpers.run_in_process(wd, PIPELINE + [helpers.stages("pretrain", "data", *LATER[: k + 1])])
        trees[stage] = (before, _tree(wd))
    return wd, trees


def test_base_workdir_is_exactly_pretrain_and_data_outputs(base_workdir):
    tree = _tree(base_workdir)
    patterns = workdir_lib.stage_outputs("pretrain") + workdir_lib.stage_outputs("data")
    stray = [p for p in tree if p not in RUN_WIDE and not _owned(p, patterns)]
    assert not stray
    assert not _matched(tree, workdir_lib.stage_outputs("data")) & _matched(tree, workdir_lib.stage_outputs("pretrain"))


@pytest.mark.parametrize("stage", LATER)
def test_rerun_from_moves_exactly_what_each_stage_wrote(pipeline, stage):
    _, trees = pipeline
    _check_stage(stage, *trees[stage])


# ----------------------------------------------------------------------------- the trunk loader


def _restore_the_old_way(wd: Workdir, mesh, step=None):
    """What pretrain.load_params did: rebuild the gin PretrainConfig's optimizer to restore the whole TrainState."""
    meta, model_cfg = wd.read_pretrain_meta()
    _, abstract, axes = tr.abstract_model(model_cfg)
    specs = sharding.tree_specs(axes, abstract, mesh)
    tx = pretrain.make_optimizer(pretrain.PretrainConfig())
    st_abstract = jax.eval_shape(lambda: new_state(abstract, tx, jax.random.key(0)))
    target = sharding.abstract_with_sharding(st_abstract, sharding.named(mesh, state_specs(tx, abstract, specs)))
    with checkpoints.Checkpointer(wd.pretrain_ckpt, read_only=True, async_save=False) as ck:
        state, _, _ = ck.restore(target, step=step)
    return state.params


def _equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb):
        assert x.sharding.is_equivalent_to(y.sharding, x.ndim)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_trunk_loader_restores_the_params_without_the_pretraining_optimizer(base_workdir, monkeypatch):
    wd = Workdir(base_workdir)
    with helpers.gin_config(helpers.TINY + [helpers.MESH_8]):
        mesh = runtime.make_mesh()
        old, old_10 = _restore_the_old_way(wd, mesh), _restore_the_old_way(wd, mesh, step=10)
    # Another learning rate and another optimizer in the configuration: the old way cannot restore any more...
    monkeypatch.setattr(pretrain, "make_optimizer", lambda cfg: optax.sgd(cfg.learning_rate, momentum=0.9))
    with helpers.gin_config(helpers.TINY + [helpers.MESH_8, "PretrainConfig.learning_rate = 0.5"]):
        assert pretrain.PretrainConfig().learning_rate == 0.5
        with pytest.raises(checkpoints.CheckpointError, match="does not match the saved state"):
            _restore_the_old_way(wd, mesh)
        # ...the trunk loader reads only the params: the same arrays, the same shardings.
        trunk = wd.load_trunk(mesh)
        trunk_10 = wd.load_trunk(mesh, step=10)
    _equal(trunk.params, old)
    _equal(trunk_10.params, old_10)
    assert not np.array_equal(np.asarray(trunk.params["embed"]), np.asarray(trunk_10.params["embed"]))
    assert trunk.model_cfg == wd.read_pretrain_meta()[1]
    assert trunk.tokenizer.vocab_size == trunk.model_cfg.vocab_size
    assert trunk.specs == sharding.tree_specs(*reversed(tr.abstract_model(trunk.model_cfg)[1:]), mesh)


def test_trunk_loader_names_a_missing_checkpoint(tmp_path, base_workdir):
    wd = str(tmp_path / "wd")
    shutil.copytree(base_workdir, wd)
    shutil.rmtree(Workdir(wd).pretrain_ckpt)
    with pytest.raises(FileNotFoundError) as e:
        Workdir(wd).load_trunk(runtime.make_mesh({"data": 8}))
    assert e.value.filename == Workdir(wd).pretrain_ckpt


# ----------------------------------------------------------------------------- members: one ensemble-axis rule


def _leads(tree) -> set:
    return {x.sharding.spec[0] if len(x.sharding.spec) else None for x in jax.tree.leaves(tree)}


def test_members_stack_with_the_ensemble_axis_leading(pipeline):
    wd = Workdir(pipeline[0])
    mesh = runtime.make_mesh({"ensemble": 2, "data": 2, "tensor": 2})
    members = wd.load_members(mesh)
    assert members.ids == [0, 1, 2, 3]
    for x, s in zip(jax.tree.leaves(members.stacked), jax.tree.leaves(sharding.stacked_specs(members.specs, 4, mesh))):
        assert x.shape[0] == 4 and x.sharding.spec == s and s[0] == sharding.ENSEMBLE
    for i in members.ids:  # row i is member i's checkpoint
        one = wd.load_member(mesh, i)[2]
        for x, y in zip(jax.tree.leaves(members.stacked), jax.tree.leaves(one)):
            np.testing.assert_array_equal(np.asarray(x)[i], np.asarray(y))
    # Three members do not divide over an ensemble axis of 2: replicated along M, the rest as one member.
    three = wd.load_members(mesh, [0, 2, 3])
    assert _leads(three.stacked) == {None} and three.ids == [0, 2, 3]
    # A mesh without the axis.
    assert _leads(wd.load_members(_data_only_mesh()).stacked) == {None}
    # Every reader of stacked members uses that rule: the ENS reward, the stacked training checkpoint, the CLI.
    ens = rewards.load_reward(RunContext(workdir=pipeline[0], mesh=mesh, seed=0), "ens")
    assert _leads(ens.params) == {sharding.ENSEMBLE}
    stacked, _ = checkpoint_averaging.restore_stacked_params(wd.rm_ckpt, mesh, members.model_cfg)
    assert _leads(stacked) == {sharding.ENSEMBLE}
    loaded = evaluate_checkpoint.load_checkpoint(wd.rm_members, mesh)
    for x, y in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(members.stacked)):
        assert x.sharding == y.sharding
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _data_only_mesh():
    return jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def test_stacked_specs_rule():
    mesh = runtime.make_mesh({"ensemble": 2, "data": 4})
    specs = {"w": P("data", None), "b": P()}
    assert sharding.stacked_specs(specs, 4, mesh) == {"w": P("ensemble", "data", None), "b": P("ensemble")}
    assert sharding.stacked_specs(specs, 3, mesh) == {"w": P(None, "data", None), "b": P(None)}
    assert sharding.stacked_specs(specs, 4, _data_only_mesh()) == {
        "w": P(None, "data", None),
        "b": P(None),
    }


# ----------------------------------------------------------------------------- no stage builds another's paths


def _layout_names(root: Path) -> set[str]:
    """The top-level names of the workdir layout: workdir.py's path constants and every registered stage's folder."""
    names = set()
    tree = ast.parse((root / "workdir.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            target = node.targets[0]
            if isinstance(target, ast.Name) and target.id.isupper() and target.id not in ("DONE", "MODEL_JSON"):
                names.add(node.value.value.split("/")[0])
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", getattr(node.func, "attr", None)) == "register_stage"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                names.add(node.args[0].value)
    return names - {"results.json", "front_examples.npz"}


def _mentions_workdir(node: ast.AST) -> bool:
    for n in ast.walk(node):
        name = n.id if isinstance(n, ast.Name) else n.attr if isinstance(n, ast.Attribute) else ""
        if "workdir" in name.lower():
            return True
    return False


def _first_literal(args) -> str | None:
    for a in args:
        if isinstance(a, ast.Constant) and isinstance(a.value, str):
            return a.value.split("/")[0]
        if isinstance(a, ast.JoinedStr):
            return None
    return None


def path_violations(root: Path = ROOT) -> list[str]:
    """Calls outside workdir.py that build a path under a workdir from a layout name: ``ctx.path("rm", ...)``,
    ``os.path.join(<...workdir...>, "rl", ...)`` (and ``Path(workdir) / "rm"``)."""
    names = _layout_names(root)
    found = []
    for path in sorted(root.rglob("*.py")):
        if path.name == "workdir.py" and path.parent == root:
            continue
        rel = path.relative_to(root.parent)
        nodes = sorted(
            (n for n in ast.walk(ast.parse(path.read_text(), filename=str(path))) if hasattr(n, "lineno")),
            key=lambda n: (n.lineno, n.col_offset),
        )
        for node in nodes:
            literal = None
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if node.func.attr == "path" and node.args and isinstance(node.func.value, (ast.Name, ast.Attribute)):
                    if "ctx" in ast.unparse(node.func.value) or _mentions_workdir(node.func.value):
                        literal = _first_literal(node.args[:1])
                elif node.func.attr == "join" and ast.unparse(node.func.value) in ("os.path", "path", "posixpath"):
                    if node.args and _mentions_workdir(node.args[0]):
                        literal = _first_literal(node.args[1:2])
            elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and _mentions_workdir(node.left):
                literal = _first_literal([node.right])
            if literal in names:
                found.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_module_but_workdir_builds_a_path_of_the_layout():
    bad = path_violations()
    assert not bad, "paths of the workdir layout built outside warm_jax/workdir.py:\n" + "\n".join(bad)


def test_the_path_check_finds_what_the_stages_used_to_write(tmp_path):
    pkg = tmp_path / "warm_jax"
    pkg.mkdir()
    shutil.copy(ROOT / "workdir.py", pkg / "workdir.py")
    (pkg / "stage_a.py").write_text(
        "import os\n"
        "@register_stage('rm_ensemble')\n"
        "def run(ctx):\n"
        "    a = ctx.path('rm', 'members', str(3))\n"
        "    b = os.path.join(ctx.workdir, 'rl', 'warm')\n"
        "    c = os.path.join(workdir, 'warp', RESULTS)\n"
        "    d = self.ctx.path('average', 'selection.json')\n"
        "    e = os.path.join(run_dir, 'ckpt')  # inside a folder handed over: not the layout\n"
        "    f = ctx.artefacts.member(3)\n"
        "    g = os.path.join(ctx.workdir, 'rm_ensemble', 'DONE.json')\n"
    )
    bad = path_violations(pkg)
    assert [b.split(": ", 1)[1] for b in bad] == [
        "ctx.path('rm', 'members', str(3))",
        "os.path.join(ctx.workdir, 'rl', 'warm')",
        "os.path.join(workdir, 'warp', RESULTS)",
        "self.ctx.path('average', 'selection.json')",
        "os.path.join(ctx.workdir, 'rm_ensemble', 'DONE.json')",
    ]
