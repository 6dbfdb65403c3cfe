"""CLI and configuration: every gin file parses, bad bindings are named, README and CI agree."""

import glob
import os
import re
import subprocess
import sys

import gin
import pytest

from tests import helpers
from warm_jax import config

GIN_FILES = sorted(
    os.path.relpath(p, helpers.REPO)
    for p in glob.glob(os.path.join(helpers.REPO, "gin", "**", "*.gin"), recursive=True)
)


@pytest.mark.parametrize("path", GIN_FILES)
def test_every_gin_file_parses(path):
    gin.clear_config()
    try:
        config.parse([path])
    finally:
        gin.clear_config()


PRESETS = [
    ["gin/quickstart.gin"],
    ["gin/repro.gin"],
    ["gin/warp.gin"],
    ["gin/smollm2_sentiment.gin"],
    ["gin/smollm2_sentiment.gin", "gin/smollm2_cpu_smoke.gin"],
    ["gin/smollm2_one_gpu.gin"],
    ["gin/smollm2_warp_one_gpu.gin"],
]


@pytest.mark.parametrize("files", PRESETS, ids=lambda f: "+".join(os.path.basename(x) for x in f))
def test_every_preset_builds_its_stage_configs(files):
    """Each preset's configs pass their own checks, and WARM's top-M fits the ensemble it selects from."""
    from warm_jax import ensemble, evaluation, rm_average
    from warm_jax.policy import bon, reinforce
    from warm_jax.task import builtin_pairs, generation

    gin.clear_config()
    try:
        config.parse(files)
        ens, avg = ensemble.EnsembleConfig(), rm_average.AverageConfig()
        evaluation.EvalConfig(), reinforce.ReinforceConfig(), bon.BonConfig()
        builtin_pairs.PairsConfig(), generation.GenerationConfig()
    finally:
        gin.clear_config()
    assert avg.top_m is None or avg.top_m <= ens.num_members, (files, avg.top_m, ens.num_members)


def test_unknown_binding_fails_naming_it(tmp_path):
    proc = helpers.run_train(str(tmp_path / "wd"), ["PretrainConfig.num_stepz = 3"], check=False, timeout=120)
    assert proc.returncode != 0
    assert "num_stepz" in proc.stderr
    assert not os.path.exists(tmp_path / "wd" / "pretrain")


def test_unknown_stage_is_named(tmp_path):
    proc = helpers.run_train(
        str(tmp_path / "wd"), [helpers.MESH_8, helpers.stages("pretrain", "pretrian")], check=False, timeout=120
    )
    assert proc.returncode != 0
    assert "pretrian" in proc.stderr and "run_pipeline.stages" in proc.stderr


def test_missing_gin_file_is_named(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "warm_jax.train", "--gin_file=nope.gin", f"--workdir={tmp_path}"],
        env=helpers.subprocess_env(),
        cwd=helpers.REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "nope.gin" in proc.stderr


def _readme_commands():
    text = open(os.path.join(helpers.REPO, "README.md")).read()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S)
    return [b.strip() for b in blocks[:2]]


def test_readme_opens_with_two_commands_and_ci_runs_the_second():
    run_cmd, test_cmd = _readme_commands()
    assert "python -m warm_jax.train --gin_file=gin/quickstart.gin" in run_cmd
    assert "pip install" in run_cmd and "pip install" in test_cmd and "pytest" in test_cmd
    ci = open(os.path.join(helpers.REPO, ".ci", "run")).read()
    assert test_cmd in ci, "'.ci/run' must run README's test command verbatim"
