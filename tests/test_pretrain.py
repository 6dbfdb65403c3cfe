"""Stage `pretrain`: the loss falls, and a SIGKILLed run resumes to a bitwise-identical state."""

import os
import signal

from tests import helpers
from warm_jax.metrics import read_metrics

BINDINGS = helpers.TINY + [helpers.MESH_8, helpers.stages("pretrain"), "PretrainConfig.num_steps = 16"]


def test_pretraining_loss_falls(base_workdir):
    rows = read_metrics(base_workdir, "pretrain")
    assert len(rows) >= 5
    first, last = rows[0]["loss"], rows[-1]["loss"]
    assert last < first - 0.5, (first, last)
    assert os.path.exists(os.path.join(base_workdir, "pretrain", "DONE.json"))


def test_sigkill_then_rerun_is_bitwise_equal_to_uninterrupted(tmp_path):
    ref = str(tmp_path / "ref")
    helpers.run_train(ref, BINDINGS)
    ref_step, ref_hash = helpers.final_state_hash(os.path.join(ref, "pretrain", "ckpt"))
    assert ref_step == 16

    wd = str(tmp_path / "killed")
    ckpt = os.path.join(wd, "pretrain", "ckpt")
    # An earlier attempt that died before its first checkpoint left a row the fresh start must drop.
    os.makedirs(os.path.join(wd, "metrics"))
    with open(os.path.join(wd, "metrics", "pretrain.jsonl"), "w") as f:
        f.write('{"step": 3, "loss": 99.0}\n')
    proc = helpers.run_until_then_signal(wd, BINDINGS, ckpt_dir=ckpt, sig=signal.SIGKILL, min_step=4)
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(wd, "pretrain", "DONE.json"))
    helpers.run_train(wd, BINDINGS)
    step, digest = helpers.final_state_hash(ckpt)
    assert (step, digest) == (ref_step, ref_hash)
    # The resumed metrics file has each step once.
    steps = [r["step"] for r in read_metrics(wd, "pretrain")]
    assert steps == sorted(set(steps))
    assert 99.0 not in [r["loss"] for r in read_metrics(wd, "pretrain")]
    # The operative config was written.
    assert "PretrainConfig.num_steps = 16" in open(os.path.join(wd, "config.gin")).read()
