"""Win rate of policy A over policy B as judged by the oracle, with a bootstrap interval."""

from __future__ import annotations

import numpy as np

from warm_jax import stats


def wins(scores_a, scores_b) -> np.ndarray:
    """Per-prompt outcome for A: 1 (A scored higher), 0.5 (tie), 0 (B higher). [N], [N] → [N]."""
    a, b = np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"win rate needs two [N] score arrays on the same prompts, got {a.shape} and {b.shape}")
    return np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))


def win_rate(
    scores_a, scores_b, *, num_bootstrap: int = stats.N_BOOT, seed: int = stats.SEED, level: float = 0.95
) -> dict:
    """Fraction of shared prompts where A beats B (ties count half), with a percentile bootstrap
    interval over prompts (``stats.bootstrap_ci``). Returns {"value", "ci95": [lo, hi], "n_prompts"}."""
    w = wins(scores_a, scores_b)
    if len(w) == 0:
        raise ValueError("win rate over zero prompts")
    ci = stats.bootstrap_ci([w], n_boot=num_bootstrap, seed=seed, level=level)
    return {"value": float(w.mean()), "ci95": ci["ci95"], "n_prompts": int(len(w))}
