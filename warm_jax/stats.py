"""Paired bootstrap confidence intervals over examples, and the per-example arrays they are computed from.

Every claim (``claims.py``) is judged by a 95% percentile bootstrap interval. The N examples
(preference pairs for reward-model claims, prompts for Best-of-N and RL) are resampled with
replacement ``N_BOOT`` = 2,000 times from ``numpy.random.default_rng(SEED)`` with SEED = 0, and every
array compared is resampled with the SAME draws (a paired bootstrap: the two models are scored on the
same pairs, the two policies on the same prompts). The statistics used here are all functions of
per-example means (an accuracy is the mean of per-pair correctness, a Best-of-N or RL score the mean
oracle reward over prompts), so a resample needs only how often it drew each example:
``means = counts @ x / N``. The interval is the 2.5th and 97.5th percentile of the resampled
statistic (numpy's linear quantiles); the run's own value is the statistic of the full data.

Per-example results live beside the stage's JSON in an ``.npz`` (``io_utils.write_arrays``); the JSON
records its SHA-256, and ``io_utils.read_arrays`` refuses a file that does not match.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

N_BOOT = 2000
SEED = 0
LEVEL = 0.95
_CHUNK_ELEMENTS = 1 << 22  # resample counts held at once: [rows, N] int64, about 32 MB


def correctness(margins) -> np.ndarray:
    """Per-pair correctness of a reward margin r⁺ − r⁻: 1 (right), ½ (tie), 0 (wrong). [...] → [...] float64."""
    d = np.asarray(margins)
    return (d > 0).astype(np.float64) + 0.5 * (d == 0)


def _as_matrix(x) -> np.ndarray:
    a = np.asarray(x, np.float64)
    if a.ndim == 0:
        raise ValueError("bootstrap: an array of examples needs a leading examples axis, got a scalar")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"bootstrap: {int(np.sum(~np.isfinite(a)))} non-finite value(s) among the examples")
    return a.reshape(a.shape[0], -1)


def resampled_means(arrays: Sequence, n_boot: int = N_BOOT, seed: int = SEED) -> list[np.ndarray]:
    """Means over the examples of each array for ``n_boot`` paired resamples.

    arrays: each [N, ...] with the examples first and the same N. Returns, per array, [n_boot, ...].
    The draws depend only on (N, n_boot, seed), so every call with the same N resamples alike.
    """
    mats = [_as_matrix(x) for x in arrays]
    n = mats[0].shape[0]
    if any(m.shape[0] != n for m in mats):
        raise ValueError(f"paired bootstrap needs the same examples in every array, got {[m.shape[0] for m in mats]}")
    if n == 0:
        raise ValueError("bootstrap over zero examples")
    x = np.concatenate(mats, axis=1)
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK_ELEMENTS // n)
    out = np.empty((n_boot, x.shape[1]))
    for start in range(0, n_boot, rows):
        b = min(rows, n_boot - start)
        idx = rng.integers(0, n, size=(b, n))
        counts = np.bincount((idx + n * np.arange(b)[:, None]).ravel(), minlength=b * n).reshape(b, n)
        out[start : start + b] = counts @ x / n
    split, res = 0, []
    for a, m in zip(arrays, mats):
        res.append(out[:, split : split + m.shape[1]].reshape((n_boot, *np.shape(a)[1:])))
        split += m.shape[1]
    return res


def percentile_ci(samples, level: float = LEVEL) -> list[float]:
    lo, hi = np.quantile(np.asarray(samples, np.float64), [(1 - level) / 2, 1 - (1 - level) / 2])
    return [float(lo), float(hi)]


def bootstrap_ci(
    arrays: Sequence,
    statistic: Callable[..., np.ndarray] | None = None,
    *,
    n_boot: int = N_BOOT,
    seed: int = SEED,
    level: float = LEVEL,
) -> dict:
    """A statistic of the means of paired per-example arrays, with its percentile bootstrap interval.

    arrays: each [N, ...] (examples first, the same N). ``statistic(*means)`` takes each array's mean
    over examples ([...] for the data, [n_boot, ...] for the resamples: reduce over trailing axes only)
    and returns a scalar per resample; default: the mean of the single array. Returns
    {"value", "ci95": [lo, hi] at ``level``, "se" (std of the resampled statistic), "n"}.
    """
    arrays = list(arrays)
    if statistic is None:
        if len(arrays) != 1:
            raise ValueError("bootstrap_ci: give a statistic to compare several arrays")

        def statistic(m):
            return m

    full = [_as_matrix(a).mean(0).reshape(np.shape(a)[1:]) for a in arrays]
    value = float(np.asarray(statistic(*full)))
    boot = np.asarray(statistic(*resampled_means(arrays, n_boot, seed)), np.float64).reshape(n_boot)
    return {"value": value, "ci95": percentile_ci(boot, level), "se": float(np.std(boot)), "n": int(len(arrays[0]))}


def mean_difference(mean_a, mean_b):
    return mean_a - mean_b


def paired_bootstrap_ci(
    a,
    b,
    statistic: Callable[[np.ndarray, np.ndarray], np.ndarray] = mean_difference,
    n_boot: int = N_BOOT,
    seed: int = SEED,
    level: float = LEVEL,
) -> dict:
    """``statistic(mean(a), mean(b))`` (default: mean(a) − mean(b)) with its paired bootstrap interval.

    a, b: [N, ...] per-example values of two models on the same N examples (row i of a and of b is the
    same example). See ``bootstrap_ci`` for the statistic's shapes and the result.
    """
    return bootstrap_ci([a, b], statistic, n_boot=n_boot, seed=seed, level=level)


def standard_error(x) -> float | None:
    """Standard error of the mean over the leading axis (ddof 1); None below two examples."""
    a = np.asarray(x, np.float64)
    if len(a) < 2:
        return None
    return float(np.std(a, ddof=1) / np.sqrt(len(a)))
