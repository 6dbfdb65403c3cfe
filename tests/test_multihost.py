"""Multi-host: 2 local processes × 4 CPU devices run the whole pipeline and agree with 1 × 8; with the data axis over
both processes each reads half of every global batch and the losses are 1 × 8's, and each reads half the
evaluation pairs for the same accuracies and margins; SIGTERM to one process saves both
at the same step; a missing process fails fast and clearly."""

import json
import os
import re
import signal
import time

import jax
import numpy as np
import pytest

from tests import helpers
from warm_jax.data import pipeline
from warm_jax.workdir import Workdir

PIPELINE = helpers.TINY + helpers.TINY_POLICY + [helpers.stages(*helpers.ALL_STAGES)]
MESH_2x4 = "make_mesh.shape = {'ensemble': 2, 'data': -1, 'fsdp': 1, 'tensor': 1}"


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
    """The one-process reference for the merged RM: the stages up to `average` (the later ones do not change it)."""
    wd = str(tmp_path_factory.mktemp("single") / "wd")
    to_average = helpers.stages("pretrain", "data", "rm_ensemble", "average")
    helpers.run_in_process(wd, helpers.TINY + helpers.TINY_POLICY + [MESH_2x4, to_average])
    return wd


def test_two_processes_run_every_stage_and_match_one_process(single_process_run, tmp_path):
    wd = str(tmp_path / "multi")
    results = helpers.wait_all(helpers.start_processes(wd, PIPELINE + [MESH_2x4]), timeout=1200)
    for i, r in results.items():
        assert r.returncode == 0, f"process {i}:\n{r.stderr[-4000:]}"
    for stage in helpers.ALL_STAGES:
        assert os.path.exists(os.path.join(wd, stage, "DONE.json")), stage
    assert os.path.exists(os.path.join(wd, "report", "summary.json"))
    # Only process 0 reports progress and writes metrics.
    assert "[rm_ensemble] step" in results[0].stderr and "[rm_ensemble] step" not in results[1].stderr
    _, merged_multi = helpers.restore_tree(os.path.join(wd, "rm", "warm", "ckpt"))
    _, merged_single = helpers.restore_tree(os.path.join(single_process_run, "rm", "warm", "ckpt"))
    a, b = jax.tree.leaves(merged_multi), jax.tree.leaves(merged_single)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        helpers.assert_close_to_scale(x, y, rel=1e-4)


def _rows_read(stderr: str, stage: str) -> dict[int, tuple[int, int, int]]:
    """{process: (process count, batch rows, records)} from the stage's per-process input log line."""
    found = re.findall(rf"\[{stage}\] input: process (\d+) of (\d+) read (\d+) batch rows \((\d+) records\)", stderr)
    return {int(p): (int(n), int(r), int(k)) for p, n, r, k in found}


def _losses(workdir: str, stage: str) -> dict[int, list[float]]:
    with open(os.path.join(workdir, "metrics", f"{stage}.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: np.atleast_1d(r["loss"]).tolist() for r in rows if "loss" in r}


EVAL_STAGES = ("pretrain", "data", "rm_ensemble", "average", "rm_eval")
# Batches of 16 pairs: the splits (train 96, validation, ood_cue and ood_temp 48 pairs each) span several, so each
# process has rows in each.
DATA_AXIS_OVER_BOTH = helpers.TINY + ["EvalConfig.batch_size = 16", "AverageConfig.batch_size = 16", helpers.MESH_8]


@pytest.fixture(scope="module")
def one_process_to_rm_eval(tmp_path_factory):
    """(workdir, stderr) of one process on 1 x 8 devices running the stages up to `rm_eval`: the reference of the
    two data-parallel tests below."""
    wd = str(tmp_path_factory.mktemp("one_to_eval") / "wd")
    return wd, helpers.run_train(wd, DATA_AXIS_OVER_BOTH + [helpers.stages(*EVAL_STAGES)]).stderr


def test_data_over_both_processes_each_reads_half_and_losses_match_one_process(one_process_to_rm_eval, tmp_path):
    one_wd, one_stderr = one_process_to_rm_eval
    bindings = DATA_AXIS_OVER_BOTH + [helpers.stages("pretrain", "data", "rm_ensemble")]
    multi = helpers.wait_all(helpers.start_processes(str(tmp_path / "multi"), bindings))
    for i, r in multi.items():
        assert r.returncode == 0, f"process {i}:\n{r.stderr[-4000:]}"
    for stage in ("pretrain", "rm_ensemble"):
        (one,) = _rows_read(one_stderr, stage).values()
        assert one[0] == 1 and one[1] > 0
        for p in (0, 1):
            reads = _rows_read(multi[p].stderr, stage)
            assert reads.get(p, (None,))[0] == 2, (stage, p, multi[p].stderr[-2000:])
            count, rows, records = reads[p]
            assert 2 * rows == one[1], (stage, p, rows, one[1])  # half the rows of every global batch
            assert records <= rows
        a, b = _losses(one_wd, stage), _losses(str(tmp_path / "multi"), stage)
        assert a.keys() == b.keys() and a
        for step in a:
            np.testing.assert_allclose(b[step], a[step], rtol=1e-5, atol=1e-6, err_msg=f"{stage} step {step}")


def test_evaluation_over_both_processes_reads_half_the_pairs_each_and_matches_one_process(
    one_process_to_rm_eval, tmp_path
):
    """`average` and `rm_eval` of the same members on 1 x 8 and 2 x 4 devices (data axis over both processes): each
    process reads only its rows of every evaluation batch, and the selection, accuracies and per-pair margins are
    the single process's, to the bit."""
    one_wd, one_stderr = one_process_to_rm_eval
    two_wd = helpers.copy_without(one_wd, str(tmp_path / "multi"), ("average", "rm_eval"))
    multi = helpers.wait_all(helpers.start_processes(two_wd, DATA_AXIS_OVER_BOTH + [helpers.stages(*EVAL_STAGES)]))
    for i, r in multi.items():
        assert r.returncode == 0, f"process {i}:\n{r.stderr[-4000:]}"
    for stage in ("average", "rm_eval"):
        (one,) = _rows_read(one_stderr, stage).values()
        assert one[0] == 1 and one[1] > 0 and one[2] > 0
        reads = [_rows_read(multi[p].stderr, stage)[p] for p in (0, 1)]
        assert all(count == 2 and 2 * rows == one[1] for count, rows, _ in reads), (stage, reads, one)
        # Each process reads about half the pairs: its half of every batch, plus the last pair as the last batch's
        # padding (at most once per split: 4); together every pair.
        assert all(records <= one[2] // 2 + 4 for _, _, records in reads), (stage, reads, one)
        assert sum(records for _, _, records in reads) >= one[2], (stage, reads, one)
        assert "[rm_ensemble] step" not in multi[0].stderr  # the copied members were not trained again
    for name in (os.path.join("average", "selection.json"), os.path.join("rm", "eval.json")):
        with open(os.path.join(one_wd, name)) as f1, open(os.path.join(two_wd, name)) as f2:
            assert json.load(f1) == json.load(f2), name
    a = np.load(Workdir(one_wd).rm_eval_examples)
    b = np.load(Workdir(two_wd).rm_eval_examples)
    assert sorted(a.files) == sorted(b.files) and "train_corrupted/warm" in a.files
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # The length gaps, gathered from both processes' halves of every batch, are the dataset's pair for pair.
    splits = [k.split("/")[0] for k in b.files if k.endswith("/length_gap") and not k.startswith("train")]
    assert "validation" in splits
    for split in splits:
        src = pipeline.load_split(Workdir(two_wd).data, split)  # rm_eval scores its first pairs (max_examples)
        want = [
            int(src[i]["chosen_length"]) - int(src[i]["rejected_length"]) for i in range(len(b[f"{split}/length_gap"]))
        ]
        np.testing.assert_array_equal(b[f"{split}/length_gap"], want, err_msg=split)


STAGE = helpers.TINY + [
    MESH_2x4,
    helpers.stages("pretrain", "data", "rm_ensemble"),
    "EnsembleConfig.num_steps = 40",
    "LoopConfig.save_interval_steps = 100",
]


def test_sigterm_to_one_process_saves_both_at_the_same_step_and_resumes(tmp_path):
    ref = str(tmp_path / "ref")
    for i, r in helpers.wait_all(helpers.start_processes(ref, STAGE)).items():
        assert r.returncode == 0, r.stderr[-3000:]
    _, ref_state = helpers.restore_tree(os.path.join(ref, "rm", "ckpt"))

    # pretrain and data as the reference ran them: only rm_ensemble is interrupted and resumed.
    wd = helpers.copy_without(ref, str(tmp_path / "term"), ("rm_ensemble",))
    procs = helpers.start_processes(wd, STAGE)
    metrics = os.path.join(wd, "metrics", "rm_ensemble.jsonl")
    t0 = time.time()
    while not os.path.exists(metrics) and time.time() - t0 < 600:
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)
    results = helpers.wait_all(procs)
    assert all(r.returncode == 0 for r in results.values()), [r.stderr[-2000:] for r in results.values()]
    assert not os.path.exists(os.path.join(wd, "rm_ensemble", "DONE.json"))
    steps = sorted(int(d) for d in os.listdir(os.path.join(wd, "rm", "ckpt")) if d.isdigit())
    assert steps and steps[-1] < 40  # the preemption save, before the end
    for i, r in helpers.wait_all(helpers.start_processes(wd, STAGE)).items():
        assert r.returncode == 0, r.stderr[-3000:]
    step, state = helpers.restore_tree(os.path.join(wd, "rm", "ckpt"))
    assert step == 40
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state)):
        np.testing.assert_array_equal(x, y)


def test_a_missing_process_fails_within_the_timeout_with_a_clear_message(tmp_path):
    t0 = time.time()
    procs = helpers.start_processes(
        str(tmp_path / "wd"), [helpers.stages("pretrain")], present=[0], extra_flags=["--init_timeout_s=10"]
    )
    r = helpers.wait_all(procs, timeout=120)[0]
    assert r.returncode != 0
    assert time.time() - t0 < 90
    assert "start-up failed" in r.stderr and "missing process id(s) [1]" in r.stderr
