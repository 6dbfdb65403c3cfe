"""Stage `average` (selection, WORKDIR/rm/warm, the rewards' statistics) and what `rm_eval` reads of it."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from tests import helpers
from warm_jax.workdir import Workdir
from warm_jax import evaluation, io_utils, params_io, stages
from warm_jax.policy import rewards

BINDINGS = helpers.TINY + [
    helpers.MESH_8,
    helpers.stages("pretrain", "data", "rm_ensemble", "average", "rm_eval"),
    "AverageConfig.warm_selection = 'top_m'",
    "AverageConfig.top_m = 2",
    "EvalConfig.lmc_lambdas = 2",
]


@pytest.fixture(scope="module")
def finished(base_workdir, tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("avg") / "wd")
    shutil.copytree(base_workdir, wd)
    helpers.run_in_process(wd, BINDINGS)
    return wd


def _params(ctx, directory):
    return jax.tree.map(np.asarray, params_io.load_params_checkpoint(directory, ctx.mesh)[2])


def test_average_writes_the_best_two_members_mean_and_their_statistics(finished):
    wd = finished
    sel = io_utils.read_json(Workdir(wd).selection)
    acc = {int(k): v for k, v in sel["accuracy"].items()}
    assert sel["members"] == [0, 1, 2, 3] and sel["select_split"] == "validation"
    assert sel["order"] == sorted(acc, key=lambda i: -acc[i])  # best-first, ties in member order
    assert sel["chosen"] == sel["order"][:2] and sel["best_member"] == sel["order"][0]
    assert set(sel["reward_stats"]) == {"warm", "member_best", "ens"}
    meta, _ = params_io.read_model_json(os.path.join(wd, "rm", "warm"))
    assert meta["merge"]["members"] == sel["chosen"] and meta["merge"]["weights"] == [0.5, 0.5]
    assert meta["merge"]["accuracies"] == {str(i): {"validation": acc[i]} for i in acc}
    with helpers.gin_config(BINDINGS):
        ctx = helpers.context(wd)
        a, b = (_params(ctx, os.path.join(wd, "rm", "members", str(i))) for i in sel["chosen"])
        warm = _params(ctx, os.path.join(wd, "rm", "warm"))
        # The policy stages' rewards read the selection: member_best is its best member, normalised by its stats.
        best = rewards.load_reward(ctx, "member_best")
    check = lambda w, x, y: np.testing.assert_allclose(w, (x + y) / 2, rtol=1e-6, atol=1e-7)  # noqa: E731
    jax.tree.map(check, warm, a, b)
    assert (best.shift, best.scale) == (
        sel["reward_stats"]["member_best"]["mean"],
        sel["reward_stats"]["member_best"]["std"],
    )


def test_rm_eval_measures_the_average_it_finds(finished):
    wd = finished
    sel = io_utils.read_json(Workdir(wd).selection)
    ev = io_utils.read_json(os.path.join(wd, "rm", "eval.json"))
    assert ev["rm"]["warm"]["members"] == sel["chosen"] and ev["rm"]["warm"]["M"] == 2
    # Measured again by rm_eval on the same pairs with the same code: the same numbers, to the bit.
    assert ev["reward_stats"] == sel["reward_stats"] and ev["best_member"] == sel["best_member"]
    assert ev["rm"]["order"] == sel["order"]
    assert ev["rm"]["warm"]["acc"] == ev["rm"]["warm_by_m"][1]["acc"]  # WARM = the best two


def test_rm_eval_refuses_a_warm_model_that_is_not_the_average_of_its_members(finished, tmp_path):
    wd = str(tmp_path / "wd")
    shutil.copytree(finished, wd)
    path = os.path.join(wd, "rm", "warm", "model.json")
    meta = io_utils.read_json(path)
    others = [i for i in range(4) if i not in meta["merge"]["members"]]
    io_utils.atomic_write_json(path, {**meta, "merge": {**meta["merge"], "members": others}})
    with helpers.gin_config(BINDINGS):
        ctx = helpers.context(wd)
        with pytest.raises(ValueError, match=r"rm/warm: its sha256 .* is not that of the uniform average of its "):
            evaluation.run(ctx)
        io_utils.atomic_write_json(path, {**meta, "merge": {**meta["merge"], "method": "ties"}})
        with pytest.raises(ValueError, match=r"model.json: field 'merge' does not describe a uniform average"):
            evaluation.run(ctx)
    assert json.load(open(os.path.join(wd, "rm", "eval.json"))) == json.load(
        open(os.path.join(finished, "rm", "eval.json"))
    )  # nothing rewritten


def test_policy_rewards_say_which_stage_is_missing(tmp_path):
    ctx = stages.RunContext(workdir=str(tmp_path), mesh=None, seed=0)  # fails before any array is made
    with pytest.raises(FileNotFoundError, match="run the `average` stage before the policy stages"):
        rewards.load_reward(ctx, "warm")


def test_top_m_larger_than_the_ensemble_is_refused():
    from warm_jax import rm_average

    cfg = rm_average.AverageConfig(warm_selection="top_m", top_m=5)
    with pytest.raises(ValueError, match="AverageConfig.top_m = 5 but the ensemble has only 4 members"):
        rm_average.select_members([2, 0, 1, 3], cfg, lambda idx: 0.0)
    assert rm_average.select_members(
        [2, 0, 1, 3], rm_average.AverageConfig(warm_selection="top_m", top_m=4), lambda idx: 0.0
    ) == [2, 0, 1, 3]
