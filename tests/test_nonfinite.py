"""No silent failure, and bfloat16 as a first-class setting.

Every training stage counts its skipped (non-finite) updates, records applied and skipped updates
beside its checkpoints and in its results, and stops after ``LoopConfig.max_consecutive_skips`` in a
row with an error naming the stage and what went non-finite, keeping the last good checkpoint. The tiny
pipeline runs once end to end in bfloat16 with every update finite and the parameters moving.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import jax
import numpy as np
import pytest

from tests import helpers
from warm_jax import io_utils, loop

BF16 = "ModelConfig.dtype = 'bfloat16'"
RL = [
    "ReinforceConfig.rewards = ('warm',)",
    "ReinforceConfig.num_steps = 4",
    "ReinforceConfig.eval_every = 4",
    "ReinforceConfig.learning_rate = 1e-3",
]


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    """The whole tiny pipeline in bfloat16 (XLA attention), every stage, one process."""
    wd = str(tmp_path_factory.mktemp("bf16") / "wd")
    helpers.run_train(wd, helpers.TINY + helpers.TINY_POLICY + [helpers.stages(*helpers.ALL_STAGES), BF16] + RL)
    return wd


def test_bfloat16_pipeline_applies_every_update_and_moves_every_model(bf16_run):
    wd = bf16_run
    expected = {"pretrain": 30, "rm": 12, "rm_control": 12, os.path.join("rl", "warm"): 4}
    summary = io_utils.read_json(os.path.join(wd, "report", "summary.json"))
    assert set(summary["updates"]) == set(expected)
    for run, steps in expected.items():
        record = io_utils.read_json(os.path.join(wd, run, "updates.json"))
        assert record == {"applied": steps, "skipped": 0, "skipped_steps": []}, run
        assert summary["updates"][run] == record
    assert "## Training updates" in open(os.path.join(wd, "report", "report.md")).read()
    # The models moved: pretraining between its kept step 10 and the end, the members between their last
    # two checkpoints, the policy away from the reference (KL > 0 on the held-out prompts).
    for ckpt, a, b in (("pretrain/ckpt", 10, 30), ("rm/ckpt", 8, 12)):
        early, late = (helpers.restore_tree(os.path.join(wd, ckpt), step=s)[1] for s in (a, b))
        moved = [not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(early), jax.tree.leaves(late))]
        assert sum(moved) > len(moved) // 2, ckpt
    rl = io_utils.read_json(os.path.join(wd, "rl", "results.json"))["runs"]["warm"]
    assert rl["updates"]["applied"] == 4 and rl["updates"]["skipped"] == 0
    assert rl["step"][-1] == 4 and rl["kl"][0] == 0.0 and rl["kl"][-1] > 0, rl["kl"]
    assert all(np.isfinite(rl[k]).all() for k in ("kl", "oracle", "proxy"))
    ev = io_utils.read_json(os.path.join(wd, "rm", "eval.json"))
    assert ev["updates"]["applied"] == 12
    # The LMC negative control made from a permuted member rides along: its curves and per-pair margins.
    splits = {"train_clean", "train_corrupted", "validation", "ood_cue", "ood_temp"}
    assert set(ev["permutation_control"]["loss_barrier"]) == splits
    examples = io_utils.read_arrays(os.path.join(wd, "rm", ev["examples"]["file"]), ev["examples"]["sha256"])
    for sp in ("ood_cue", "ood_temp"):
        assert examples[f"{sp}/perm_weight"].shape == examples[f"{sp}/lmc_weight"].shape


@pytest.mark.parametrize(
    "stage, bindings, diagnostic",
    [
        ("pretrain", ["PretrainConfig.learning_rate = 1e30"], "grad_norm="),
        ("rm_ensemble", ["EnsembleConfig.learning_rates = (1e30,)"], "non-finite member(s) [0, 1, 2, 3]"),
        ("reinforce", ["ReinforceConfig.learning_rate = 1e30", "ReinforceConfig.num_steps = 12"], "proxy="),
    ],
)
def test_a_stage_whose_updates_all_go_nonfinite_stops_naming_it(bf16_run, tmp_path, stage, bindings, diagnostic):
    """A learning rate of 1e30: the first update overflows the parameters; every later one is non-finite and
    skipped, and after 10 in a row (the default) `python -m warm_jax.train` exits non-zero naming the stage,
    'non-finite' and what went non-finite; no updates.json is written and the last good checkpoint stays."""
    wd = str(tmp_path / "wd")
    shutil.copytree(bf16_run, wd)
    proc = helpers.run_train(
        wd,
        helpers.TINY + helpers.TINY_POLICY + [helpers.stages(stage), BF16] + RL + bindings,
        flags=(f"--rerun_from={stage}",),
        check=False,
    )
    assert proc.returncode != 0
    err = proc.stderr
    assert "non-finite" in err and f"[{'rl_warm' if stage == 'reinforce' else stage}] stopped" in err, err[-3000:]
    assert "10 non-finite update(s) in a row" in err and diagnostic in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]  # one clear line, not a stack
    ckpt = {"pretrain": "pretrain/ckpt", "rm_ensemble": "rm/ckpt", "reinforce": "rl/warm/ckpt"}[stage]
    assert not os.path.exists(loop.updates_path(os.path.join(wd, ckpt)))
    assert not os.path.exists(os.path.join(wd, stage, "DONE.json"))
    if os.path.isdir(os.path.join(wd, ckpt)):  # what was saved before the stop is finite and verifies
        _, state = helpers.restore_tree(os.path.join(wd, ckpt))
        assert all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree.leaves(state))


def test_one_nonfinite_member_is_named_and_the_counts_survive_a_resume(base_workdir, tmp_path):
    """Member 1 diverges (lr 1e30) while the others train: every step from its overflow on counts as skipped, the
    error names member 1 only; with a higher limit a run preempted mid-way resumes with the counts it saved."""
    bad = ["EnsembleConfig.learning_rates = (3e-3, 1e30, 3e-3, 3e-3)", helpers.stages("rm_ensemble"), helpers.MESH_8]
    wd = str(tmp_path / "abort")
    shutil.copytree(base_workdir, wd)
    proc = helpers.run_train(wd, helpers.TINY + bad + ["LoopConfig.max_consecutive_skips = 3"], check=False)
    assert proc.returncode != 0 and "non-finite member(s) [1]" in proc.stderr, proc.stderr[-3000:]
    assert "3 non-finite update(s) in a row up to step 4" in proc.stderr, proc.stderr[-3000:]

    wd = str(tmp_path / "resume")
    shutil.copytree(base_workdir, wd)
    run = helpers.TINY + bad + ["LoopConfig.max_consecutive_skips = 100"]
    ckpt = os.path.join(wd, "rm", "ckpt")
    proc = helpers.run_until_then_signal(wd, run, ckpt_dir=ckpt, sig=signal.SIGTERM, min_step=4)
    assert proc.returncode == 0 and "preempted" in proc.stderr, proc.stderr[-3000:]
    assert not os.path.exists(os.path.join(wd, "rm", "updates.json"))
    helpers.run_train(wd, run)  # resumes from the preemption save with the counts it saved
    assert io_utils.read_json(os.path.join(wd, "rm", "updates.json")) == {
        "applied": 1,
        "skipped": 11,
        "skipped_steps": list(range(2, 13)),
        "member_skipped": [0, 11, 0, 0],
    }


def test_update_counts_record_and_describe():
    counts = loop.UpdateCounts()
    for step, ok in enumerate([True, False, False, True, False], start=1):
        counts.record(step, ok)
    assert counts.as_json() == {"applied": 2, "skipped": 3, "skipped_steps": [2, 3, 5]}
    assert counts.consecutive_skips == 1
    text = loop.describe_nonfinite(
        {"loss": np.array([0.5, np.nan]), "grad_norm": np.array([1.0, np.inf]), "member_finite": np.array([1, 0], bool)}
    )
    assert text == "loss=[0.5, nan], grad_norm=[1, inf], non-finite member(s) [1]"


def test_loop_config_refuses_a_limit_below_one():
    with pytest.raises(ValueError, match="max_consecutive_skips"):
        loop.LoopConfig(max_consecutive_skips=0)


def test_results_json_is_plain_json(bf16_run):
    """results files stay loadable by any JSON reader (no NaN tokens)."""
    for rel in ("rl/results.json", "rm/eval.json", "report/summary.json"):
        with open(os.path.join(bf16_run, rel)) as f:
            json.loads(f.read(), parse_constant=lambda c: pytest.fail(f"{rel}: {c}"))


CHECK = os.path.join(helpers.REPO, "scripts", "gpu_pipeline_check.py")


def _check(out: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, CHECK, f"--out={out}", *args],
        env=helpers.subprocess_env(),
        cwd=helpers.REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_the_accelerator_check_script_collects_a_finished_run_and_fails_loudly(bf16_run, tmp_path):
    """scripts/gpu_pipeline_check.py on the finished bf16 run (every stage skips): stage times, report,
    summary, REINFORCE results and its verdict land in one folder; a failing run, an overrun and a missing
    GGUF each exit non-zero with the reason."""
    flags = helpers.train_cmd(
        bf16_run, helpers.TINY + helpers.TINY_POLICY + [helpers.stages(*helpers.ALL_STAGES), BF16] + RL
    )[3:]
    out = str(tmp_path / "out")
    made = set(glob.glob(os.path.join(tempfile.gettempdir(), "warm_gpu_check_*")))
    proc = _check(out, "--preset=none", "--", *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The flags name the workdir, so the script makes no temporary one of its own.
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "warm_gpu_check_*"))) == made
    assert sorted(os.listdir(out)) == sorted(
        ["check.json", "report.md", "rl_results.json", "stage_times.json", "summary.json", "train.log"]
    )
    times = io_utils.read_json(os.path.join(out, "stage_times.json"))
    assert set(helpers.ALL_STAGES) <= set(times) and all(times[s] >= 0 for s in helpers.ALL_STAGES)
    check = io_utils.read_json(os.path.join(out, "check.json"))
    assert check["verdict"] == "ok" and check["final_kl"]["warm"] > 0
    speed = check["reinforce"]["warm"]
    assert speed["seconds_per_update"] > 0 and speed["generated_tokens_per_s"] > 0

    bad = _check(
        str(tmp_path / "bad"), "--preset=none", "--", f"--workdir={tmp_path / 'w'}", "--gin_bindings=Nope.x = 1"
    )
    assert bad.returncode == 1 and "FAILED: warm_jax.train exited" in bad.stderr, bad.stderr[-2000:]
    assert io_utils.read_json(str(tmp_path / "bad" / "check.json"))["verdict"] == "failed"
    slow = _check(str(tmp_path / "slow"), "--preset=none", "--limit_s=1", "--", *flags)
    assert slow.returncode == 1 and "overran its 1 s limit" in slow.stderr
    missing = _check(str(tmp_path / "gguf"), "--gguf=/nonexistent.gguf")
    assert missing.returncode == 1 and "/nonexistent.gguf" in missing.stderr and "is not a file" in missing.stderr
