"""Metric writers chosen by name: JSONL always, TensorBoard, W&B offline (read back from its run file) and
what each does when a stage resumes."""

from __future__ import annotations

import glob
import json
import logging
import os
import struct
import sys
import time

import gin
import numpy as np
import pytest

from warm_jax import metrics


def _rows(n0, n1, scale=1.0):
    """Rows of steps n0..n1: a scalar loss and a per-member [3] array."""
    return [
        (s, {"loss": scale / s, "member_loss": np.asarray([s, 2 * s, 3 * s], np.float32) * scale})
        for s in range(n0, n1 + 1)
    ]


def _write(workdir, rows, *, truncate=None, **kw):
    w = metrics.MetricsWriter(workdir, "rm_ensemble", **kw)
    try:
        if truncate is not None:
            w.truncate_after(truncate)
        for step, m in rows:
            w.write(step, m)
    finally:
        w.close()
    return w


def test_jsonl_only_when_no_other_writer_is_chosen(tmp_path):
    wd = str(tmp_path)
    gin.clear_config()
    try:
        gin.parse_config("metrics.writers = []")
        _write(wd, _rows(1, 2))
    finally:
        gin.clear_config()
    assert [r["step"] for r in metrics.read_metrics(wd, "rm_ensemble")] == [1, 2]
    assert metrics.read_metrics(wd, "rm_ensemble")[1]["member_loss"] == [2.0, 4.0, 6.0]
    assert not os.path.exists(os.path.join(wd, "tensorboard"))


def test_tensorboard_by_default_and_off_by_keyword(tmp_path):
    _write(str(tmp_path / "a"), _rows(1, 2))
    assert glob.glob(str(tmp_path / "a" / "tensorboard" / "rm_ensemble" / "events.out.tfevents.*"))
    _write(str(tmp_path / "b"), _rows(1, 2), tensorboard=False)
    assert not os.path.exists(tmp_path / "b" / "tensorboard")
    assert len(metrics.read_metrics(str(tmp_path / "b"), "rm_ensemble")) == 2


def test_unknown_writer_names_the_binding(tmp_path):
    with pytest.raises(ValueError, match=r"metrics.writers: unknown writer\(s\) \['mlflow'\]; known: \["):
        metrics.MetricsWriter(str(tmp_path), "x", writers=["mlflow"])
    with pytest.raises(ValueError, match="expected a list of names"):
        metrics.MetricsWriter(str(tmp_path), "x", cfg=metrics.MetricsConfig(writers="wandb"))


def test_jsonl_resume_drops_the_steps_past_the_checkpoint(tmp_path):
    wd = str(tmp_path)
    _write(wd, _rows(1, 4), writers=[])
    _write(wd, _rows(3, 5, scale=10.0), writers=[], truncate=2)
    got = metrics.read_metrics(wd, "rm_ensemble")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in got] == pytest.approx([1.0, 0.5, 10 / 3, 10 / 4, 10 / 5])


def test_missing_wandb_is_one_log_line_and_the_others_carry_on(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb → ImportError
    monkeypatch.setattr(metrics, "_said_no_wandb", False)
    with caplog.at_level(logging.WARNING, logger="warm_jax.metrics"):
        for stage in ("a", "b"):
            w = metrics.MetricsWriter(str(tmp_path), stage, writers=["tensorboard", "wandb"])
            assert w.writer_names == ["JsonlWriter", "TensorBoardWriter"]
            w.write(1, {"loss": 1.0})
            w.close()
    lines = [r.getMessage() for r in caplog.records if "wandb" in r.getMessage()]
    assert len(lines) == 1 and "not installed" in lines[0] and "warm_jax[wandb]" in lines[0]
    assert metrics.read_metrics(str(tmp_path), "b") == [{"step": 1, "loss": 1.0}]


# ----------------------------------------------------------------------------- W&B offline

# A W&B run file (run-ID.wandb) is LevelDB's log format: 32 KiB blocks of records, each with a 7-byte header
# (checksum u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last), after a 7-byte file header
# (':W&B', magic 0xBEE1, version). Each record is a wandb_internal_pb2.Record. wandb ≥ 0.2x ships no Python
# reader of its own, so the test reads the file here.
_BLOCK = 32768


def _wandb_records(path: str):
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1), path
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind == 0 and n == 0:
            break
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record


def _read_run(folder: str, wait_s: float = 30.0) -> dict:
    """The run record's id and config, and the logged history {step: {name: value}} of an offline run folder.

    W&B's service writes the file on its own thread; on a loaded machine the run record can land after the
    writing process returned from ``finish``, so the file is read again until it holds one (or ``wait_s`` ends)."""
    deadline = time.monotonic() + wait_s
    while True:
        out = _read_run_once(folder)
        if "id" in out or time.monotonic() > deadline:
            return out
        time.sleep(0.5)


def _read_run_once(folder: str) -> dict:
    (path,) = glob.glob(os.path.join(folder, "run-*.wandb"))
    out = {"history": {}}
    for r in _wandb_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["id"] = r.run.run_id
            out["name"] = r.run.display_name
            out["config"] = {u.key: json.loads(u.value_json) for u in r.run.config.update}
        elif kind == "history":
            row = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
            out["history"][r.history.step.num] = {k: v for k, v in row.items() if not k.startswith("_")}
    return out


def _flat_jsonl(workdir: str, steps) -> dict:
    rows = {r["step"]: metrics.flat_scalars(r) for r in metrics.read_metrics(workdir, "rm_ensemble")}
    return {s: rows[s] for s in steps}


@pytest.fixture
def offline(monkeypatch):
    pytest.importorskip("wandb", reason="the wandb package is not installed (pip install 'warm_jax[wandb]')")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_wandb_offline_run_holds_the_same_scalars_as_the_jsonl(tmp_path, offline):
    wd = str(tmp_path / "wd")
    gin.clear_config()
    try:
        gin.parse_config("metrics.writers = ['wandb']\nmetrics.wandb_project = 'warm_jax_test'")
        w = _write(wd, _rows(1, 4))
    finally:
        gin.clear_config()
    assert w.writer_names == ["JsonlWriter", "WandbWriter"]  # the binding replaced TensorBoard
    (folder,) = glob.glob(os.path.join(wd, "wandb", "offline-run-*"))
    run = _read_run(folder)
    assert run["name"] == "rm_ensemble"
    assert run["id"] == json.load(open(os.path.join(wd, "wandb", "rm_ensemble.run.json")))["id"]
    assert run["config"]["metrics.writers"] == ["wandb"]  # the gin configuration travels with the run
    assert sorted(run["history"]) == [1, 2, 3, 4]
    assert run["history"] == _flat_jsonl(wd, [1, 2, 3, 4])
    assert run["history"][3]["member_loss/2"] == 9.0


def test_wandb_resume_rewinds_the_run_and_jsonl_stays_exact(tmp_path, offline):
    wd = str(tmp_path / "wd")
    _write(wd, _rows(1, 4), writers=["wandb"])  # "crashed" after step 4, checkpoint at step 2
    _write(wd, _rows(3, 5, scale=10.0), writers=["wandb"], truncate=2)
    got = metrics.read_metrics(wd, "rm_ensemble")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5]
    assert got[2]["member_loss"] == [30.0, 60.0, 90.0]
    first, second = (_read_run(f) for f in sorted(glob.glob(os.path.join(wd, "wandb", "offline-run-*"))))
    # The second process continues the first run's id from step 2: what W&B keeps after both are synced is
    # the first run's steps 1-2 and the second's 3-5, i.e. the JSONL.
    assert second["id"] == first["id"]
    assert second["config"]["_wandb"]["branch_point"] == {"run_id": first["id"], "step": 2}
    assert {s: first["history"][s] for s in (1, 2)} == _flat_jsonl(wd, [1, 2])
    assert second["history"] == _flat_jsonl(wd, [3, 4, 5])


def test_a_fresh_stage_starts_a_new_wandb_run(tmp_path, offline):
    wd = str(tmp_path / "wd")
    _write(wd, _rows(1, 2), writers=["wandb"])
    _write(wd, _rows(1, 2), writers=["wandb"])  # no checkpoint to resume: no truncate_after
    ids = [_read_run(f)["id"] for f in glob.glob(os.path.join(wd, "wandb", "offline-run-*"))]
    assert len(set(ids)) == 2
