"""Reruns against the workdir's record: a changed configuration stops before touching anything,
naming the bindings that differ; --rerun_from moves old outputs aside; clear one-line CLI errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from tests import helpers
from warm_jax import config, stages
from warm_jax.checkpoints import CheckpointCorruptError, CheckpointError, Checkpointer

BASE = helpers.TINY + [helpers.MESH_8, helpers.stages("pretrain", "data")]


def _snapshot(wd: str) -> dict[str, bytes]:
    """Every file of a workdir with its contents (checkpoints by name and size only)."""
    out = {}
    for root, _, files in os.walk(wd):
        for f in files:
            p = os.path.join(root, f)
            rel = os.path.relpath(p, wd)
            out[rel] = open(p, "rb").read() if p.endswith((".gin", ".json")) else os.path.getsize(p)
    return out


def _cli(wd: str, bindings: list[str], *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        helpers.train_cmd(wd, bindings) + list(extra),
        env=helpers.subprocess_env(),
        cwd=helpers.REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


# ------------------------------------------------------------------------------------ config.compare


RECORDED = """
SEED = 0
run_pipeline.seed = %SEED
run_pipeline.stages = ['pretrain']
make_mesh.shape = {'data': -1}
ModelConfig.d_model = 32
LoopConfig.log_every = 2
PretrainConfig.num_steps = 30
"""


def _current(**changes: str) -> str:
    lines = dict(line.split(" = ", 1) for line in RECORDED.strip().splitlines())
    lines.update(changes)
    return "\n".join(f"{k} = {v}" for k, v in lines.items() if v is not None)


def test_compare_names_each_changed_binding_with_old_and_new_value():
    diffs = config.compare(RECORDED, _current(**{"ModelConfig.d_model": "64", "PretrainConfig.num_steps": "31"}))
    assert [str(d) for d in diffs] == ["ModelConfig.d_model = 32, now 64", "PretrainConfig.num_steps = 30, now 31"]
    assert config.compare(RECORDED, RECORDED) == []


def test_compare_ignores_run_only_settings_and_resolves_macros():
    run_only = {
        "run_pipeline.stages": "['pretrain', 'data']",
        "make_mesh.shape": "{'data': 2, 'tensor': 4}",
        "LoopConfig.log_every": "50",
        "metrics.writers": "['tensorboard', 'wandb']",
    }
    assert config.compare(RECORDED, _current(**run_only)) == []
    (d,) = config.compare(RECORDED, _current(SEED="1"))
    assert str(d) == "run_pipeline.seed = 0, now 1"
    (d,) = config.compare(RECORDED, _current(**{"PretrainConfig.num_steps": None}))
    assert str(d) == "PretrainConfig.num_steps = 30, now unset (the default)"


def test_compare_with_the_operative_record_checks_only_what_the_stage_read():
    operative = "ModelConfig.d_model = 32\nModelConfig.dropout_rate = 0.0\nrun_pipeline.seed = 0\n"
    # BonConfig was not read by the stage: no difference. A binding now set to the default it used: none.
    current = _current(**{"BonConfig.num_prompts": "8", "ModelConfig.dropout_rate": "0.0"})
    assert config.compare(RECORDED, current, operative=operative) == []
    (d,) = config.compare(RECORDED, _current(**{"ModelConfig.dropout_rate": "0.1"}), operative=operative)
    assert str(d) == "ModelConfig.dropout_rate = 0.0 (the default), now 0.1"
    # Without it (an unfinished stage) every binding counts.
    assert [d.key for d in config.compare(RECORDED, current)] == ["BonConfig.num_prompts", "ModelConfig.dropout_rate"]


def test_an_unreadable_record_is_named(tmp_path):
    with pytest.raises(config.ConfigError, match="rec.gin: not a readable gin configuration"):
        config.compare("ModelConfig.d_model = (", RECORDED, source="rec.gin")


def test_malformed_binding_and_missing_stage_list_are_named(tmp_path):
    for binding, message in [
        ("run_pipeline.stages = ['pretrain'", "run_pipeline.stages = ['pretrain'\"): EOF in multi-line"),
        ("ModelConfig.d_model 64", "ModelConfig.d_model 64'): Couldn't parse"),
        ("ModelConfig.d_model = %NOPE", "No bindings specified for 'NOPE/gin.macro'"),
    ]:
        with pytest.raises(config.ConfigError) as e:
            helpers.run_in_process(str(tmp_path / "wd"), [binding])
        assert message in str(e.value) and "config string" not in str(e.value)
    with pytest.raises(config.ConfigError, match="run_pipeline.stages is not set"):
        helpers.run_in_process(str(tmp_path / "wd"), [helpers.MESH_8])
    assert not os.path.exists(tmp_path / "wd")


# ------------------------------------------------------------------------------ the pipeline, in process


def test_base_workdir_records_each_stage(base_workdir):
    for stage in ("pretrain", "data"):
        rec = open(stages.record_path(base_workdir, stage)).read()
        assert "ModelConfig.d_model = 32" in rec and "PretrainConfig.num_steps = 30" in rec
        operative = open(stages.record_path(base_workdir, stage, operative=True)).read()
        assert "ModelConfig.norm_eps" in operative  # defaults included
    assert "PairsConfig" not in open(stages.record_path(base_workdir, "pretrain", operative=True)).read()
    assert "PretrainConfig.num_steps = 30" in open(os.path.join(base_workdir, "config.gin")).read()


def test_changed_config_of_a_skipped_stage_stops_before_touching_anything(copy_workdir):
    wd = copy_workdir()
    before = _snapshot(wd)
    with pytest.raises(config.ConfigMismatchError) as e:
        helpers.run_in_process(wd, BASE + ["ModelConfig.d_model = 64"])
    msg = str(e.value)
    assert "stage 'pretrain' (finished)" in msg and "ModelConfig.d_model = 32, now 64" in msg
    assert "--rerun_from=pretrain" in msg and "new --workdir" in msg and "stage 'data' too" in msg
    assert _snapshot(wd) == before
    # A binding only `data` reads names `data`, not `pretrain`; a run-only one passes.
    with pytest.raises(
        config.ConfigMismatchError, match=r"stage 'data' \(finished\).*PairsConfig.num_train = 96, now 50"
    ):
        helpers.run_in_process(wd, BASE + ["PairsConfig.num_train = 50"])
    assert _snapshot(wd) == before
    # The shared text shape: a later stage that asks for other prompts than the pairs were built with stops too.
    with pytest.raises(
        config.ConfigMismatchError,
        match=r"stage 'data' \(finished\).*GenerationConfig.max_prompt_len = 8, now 10",
    ):
        helpers.run_in_process(wd, BASE + ["GenerationConfig.max_prompt_len = 10"])
    assert _snapshot(wd) == before
    helpers.run_in_process(wd, BASE + ["LoopConfig.log_every = 7"])


def test_unfinished_stage_compares_every_binding(copy_workdir):
    wd = copy_workdir()
    os.remove(os.path.join(wd, "data", "DONE.json"))
    os.remove(stages.record_path(wd, "data", operative=True))
    with pytest.raises(config.ConfigMismatchError, match=r"stage 'data' \(unfinished\).*BonConfig.num_prompts"):
        helpers.run_in_process(wd, BASE + ["BonConfig.num_prompts = 3"])


def test_adding_a_stage_runs_it_and_records_it(copy_workdir):
    wd = copy_workdir()
    ran = []
    stages.register_stage("_noop_test")(lambda ctx: ran.append(ctx.workdir))
    try:
        helpers.run_in_process(wd, helpers.TINY + [helpers.MESH_8, helpers.stages("pretrain", "data", "_noop_test")])
    finally:
        stages.STAGES.pop("_noop_test")
    assert ran == [wd]
    assert os.path.exists(os.path.join(wd, "_noop_test", "DONE.json"))
    assert (
        "run_pipeline.stages = ['pretrain', 'data', '_noop_test']" in open(stages.record_path(wd, "_noop_test")).read()
    )


def test_rerun_from_moves_that_stage_and_later_ones_aside(copy_workdir):
    wd = copy_workdir()
    old_data = _snapshot(os.path.join(wd, "data"))
    with helpers.gin_config(BASE + ["PairsConfig.num_train = 50"]):
        with pytest.raises(config.ConfigError, match="--rerun_from=rm_eval: not a stage in run_pipeline.stages"):
            stages.check_records(wd, ["pretrain", "data"], "rm_eval")
        with pytest.raises(config.ConfigMismatchError, match="stage 'data'"):
            stages.check_records(wd, ["pretrain", "data"], None)
        assert stages.check_records(wd, ["pretrain", "data"], "data") == ["data"]
        # Rerunning from pretrain also supersedes an unlisted stage that started after it.
        assert stages.check_records(wd, ["pretrain"], "pretrain") == ["pretrain", "data"]
        dest = stages.move_aside(wd, ["data"])
    assert _snapshot(os.path.join(dest, "data")) == old_data
    assert os.path.exists(os.path.join(dest, "config", "data.gin"))
    assert not os.path.exists(os.path.join(wd, "data")) and not os.path.exists(stages.record_path(wd, "data"))
    assert os.path.dirname(dest) == os.path.join(wd, "superseded")


def test_shape_mismatch_on_restore_names_the_shapes(copy_workdir):
    # A workdir without records (an older warm_jax) resumed with another d_model: the restore names the cause.
    wd = copy_workdir()
    os.remove(os.path.join(wd, "pretrain", "DONE.json"))
    shutil.rmtree(os.path.join(wd, "config"))
    with pytest.raises(CheckpointError, match=r"requested \[\d+, 64\], saved \[\d+, 32\]") as e:
        helpers.run_in_process(
            wd, helpers.TINY + [helpers.MESH_8, helpers.stages("pretrain"), "ModelConfig.d_model = 64"]
        )
    assert not isinstance(e.value, CheckpointCorruptError) and "no step verifies" not in str(e.value)


def test_checkpointer_restore_with_other_shapes_is_not_corruption(tmp_path):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sh = NamedSharding(mesh, P())
    state = {"w": jax.device_put(jnp.ones((4, 8)), sh), "step": jax.device_put(jnp.int32(2), sh)}
    with Checkpointer(tmp_path, async_save=False) as ck:
        ck.save(1, state, force=True)
        ck.save(2, state, force=True)
        wrong = {"w": jax.ShapeDtypeStruct((4, 16), jnp.float32, sharding=sh), "step": state["step"]}
        with pytest.raises(CheckpointError, match=r"'w' requested \[4, 16\], saved \[4, 8\]") as e:
            ck.restore(wrong)
        assert not isinstance(e.value, CheckpointCorruptError)
        assert ck.all_steps() == [1, 2]  # no step was written off as corrupt
        restored, _, step = ck.restore(state)
        assert step == 2 and np.array_equal(np.asarray(restored["w"]), np.ones((4, 8)))


# ------------------------------------------------------------------------------------------ the CLI


def test_cli_refused_rerun_is_one_line_and_keeps_the_record(copy_workdir):
    wd = copy_workdir()
    before = _snapshot(wd)
    proc = _cli(wd, BASE + ["ModelConfig.d_model = 64"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = _error_lines(proc)
    assert "ModelConfig.d_model = 32, now 64" in line and "--rerun_from=pretrain" in line
    assert "Traceback" not in proc.stderr
    assert _snapshot(wd) == before

    # --rerun_from=pretrain (listing only pretrain, 4 steps): pretrain reruns, the unlisted data moves aside too.
    changed = ["ModelConfig.d_model = 64", "PretrainConfig.num_steps = 4", "PretrainConfig.keep_steps = ()"]
    proc = _cli(wd, helpers.TINY + [helpers.MESH_8, helpers.stages("pretrain")] + changed, "--rerun_from=pretrain")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (old,) = os.listdir(os.path.join(wd, "superseded"))
    moved = os.path.join(wd, "superseded", old)
    assert open(os.path.join(moved, "config", "pretrain.gin")).read().encode() == before["config/pretrain.gin"]
    assert os.path.isdir(os.path.join(moved, "data")) and not os.path.exists(os.path.join(wd, "data"))
    assert "ModelConfig.d_model = 64" in open(stages.record_path(wd, "pretrain")).read()
    assert os.path.exists(os.path.join(wd, "pretrain", "DONE.json"))


def test_cli_bad_workdirs_are_one_line(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = {str(a_file): "exists and is not a directory", str(a_file / "sub"): f"{a_file} is not a directory"}
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        cases[str(ro)] = "not writable"
    for wd, message in cases.items():
        proc = _cli(wd, helpers.TINY + [helpers.MESH_8, helpers.stages("pretrain")], timeout=120)
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert _error_lines(proc) == [f"error: workdir {wd}: {message}"], proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr


def test_cli_missing_input_is_one_line_and_verbose_adds_the_traceback(tmp_path):
    wd = str(tmp_path / "wd")
    bindings = helpers.TINY + [helpers.MESH_8, helpers.stages("rm_eval")]
    proc = _cli(wd, bindings, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    (line,) = _error_lines(proc)
    assert line.startswith("error: stage 'rm_eval' is missing an input: ") and "run_pipeline.stages" in line
    assert "Traceback" not in proc.stderr
    verbose = _cli(wd, bindings, "--verbose", timeout=120)
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr and _error_lines(verbose) == [line]


def test_python_m_logits_names_an_empty_gguf(tmp_path):
    empty = tmp_path / "model.gguf"
    empty.write_bytes(b"")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "warm_jax.logits",
            "--model",
            str(empty),
            "--text",
            "hi",
            "--output",
            str(tmp_path / "o"),
        ],
        env=helpers.subprocess_env(1),
        cwd=helpers.REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and f"{empty}: empty file" in proc.stderr and "Traceback" not in proc.stderr
