"""Metrics as JSON lines and TensorBoard events (tensorboardX, no TensorFlow), plus progress.

Only process 0 writes; other processes get no-op writers so stage code needs no branches.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping

import jax
import numpy as np


def _scalar(v):
    v = np.asarray(v)
    return float(v) if v.ndim == 0 else [float(x) for x in v.reshape(-1)]


class MetricsWriter:
    """Appends ``{"step": s, **metrics}`` to WORKDIR/metrics/STAGE.jsonl and to TensorBoard.

    Array-valued metrics (e.g. per-member [M] losses) are written as lists in JSON and as
    ``name/i`` scalars in TensorBoard.
    """

    def __init__(self, workdir: str, stage: str, *, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics", f"{stage}.jsonl")
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard", stage))

    def truncate_after(self, step: int) -> None:
        """Drops lines past ``step`` (a resumed run rewrites them, so the file has no repeats)."""
        if not self.enabled or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            keep = [l for l in f if l.strip() and json.loads(l).get("step", -1) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, self.path)

    def write(self, step: int, metrics: Mapping[str, object]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k == "step":
                    continue
                if isinstance(v, list):
                    for i, x in enumerate(v):
                        self._tb.add_scalar(f"{k}/{i}", x, step)
                else:
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str, stage: str) -> list[dict]:
    path = os.path.join(workdir, "metrics", f"{stage}.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


class Progress:
    """One status line on process 0: stage, step/total, chosen metrics, steps/s, ETA."""

    def __init__(self, stage: str, total: int, start: int = 0, *, stream=None):
        self.enabled = jax.process_index() == 0
        self.stage, self.total, self.start = stage, total, start
        self.t0 = time.perf_counter()
        self.stream = stream or sys.stderr
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, step: int, metrics: Mapping[str, object] | None = None, *, final: bool = False) -> None:
        if not self.enabled:
            return
        done = step - self.start
        dt = time.perf_counter() - self.t0
        rate = done / dt if dt > 0 and done > 0 else float("nan")
        eta = (self.total - step) / rate if rate and rate > 0 and not math.isnan(rate) else float("nan")
        parts = [f"[{self.stage}] step {step}/{self.total}"]
        for k, v in (metrics or {}).items():
            v = np.asarray(v)
            parts.append(f"{k}={float(v.mean()):.4g}" + (f"(±{float(v.std()):.2g})" if v.size > 1 else ""))
        parts.append(f"{rate:.2f} steps/s" if not math.isnan(rate) else "-- steps/s")
        if not math.isnan(eta):
            parts.append(f"ETA {int(eta) // 60}m{int(eta) % 60:02d}s")
        line = "  ".join(parts)
        end = "\n" if (final or not self._tty) else ""
        self.stream.write(("\r" if self._tty else "") + line + end)
        self.stream.flush()
