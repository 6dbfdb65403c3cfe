"""Linear probes on frozen features: the LP of LP-FT, and the gate that says whether pretraining gives the reward
models anything.

A probe is a linear reward head fitted with the Bradley–Terry loss on frozen features of the last real token,
``f(chosen) − f(rejected)`` (the head's bias cancels in a difference). ``rm_ensemble`` fits one on the pretrained
trunk and starts every member from it (LP-FT). The same probe fitted on the features of a randomly initialised
trunk of the same shape is the control: when the pretrained features are no better, the shared init anchors
nothing and WARM's premise (members fine-tuned from one pretrained model stay in one basin) is not being tested.
The gate asks for validation accuracy ≥ ``GATE_ACCURACY`` and ≥ ``GATE_MARGIN`` above the random features; the
``pretraining`` claim judges the margin with a paired bootstrap CI over validation pairs.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from warm_jax import rm_scoring, sharding
from warm_jax.data import pipeline

GATE_ACCURACY = 0.70
GATE_MARGIN = 0.05
FEATURE_FIELDS = ("chosen_tokens", "rejected_tokens", "chosen_length", "rejected_length")


def feature_diffs(params, graphdef, source, *, batch_size: int = 256) -> np.ndarray:
    """f(chosen) − f(rejected) of every pair of ``source``: [N, d] float32 on the host (the same on every process).

    Every process computes every feature (replicated output) from the whole split: the probe runs once, on frozen
    features, and placing the inputs by batch shard would change their rounding (a differently partitioned program).
    """
    mesh = jax.tree.leaves(params)[0].sharding.mesh
    feat = jax.jit(functools.partial(rm_scoring.features, graphdef=graphdef), out_shardings=sharding.replicated(mesh))
    diffs = []
    for batch in pipeline.eval_batches(source, batch_size, fields=FEATURE_FIELDS, process_index=0, process_count=1):
        fc = feat(params, tokens=batch["chosen_tokens"], lengths=batch["chosen_length"])
        fr = feat(params, tokens=batch["rejected_tokens"], lengths=batch["rejected_length"])
        diffs.append(np.asarray(fc - fr)[np.asarray(batch["valid"], bool)])
    return np.concatenate(diffs).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("steps", "learning_rate"))
def _fit(diff, kernel, *, steps: int, learning_rate: float):
    tx = optax.adam(learning_rate)

    def loss_fn(w):
        return -jnp.mean(jax.nn.log_sigmoid(diff @ w[:, 0]))

    def body(carry, _):
        w, s = carry
        u, s = tx.update(jax.grad(loss_fn)(w), s, w)
        return (optax.apply_updates(w, u), s), None

    (w, _), _ = jax.lax.scan(body, (kernel, tx.init(kernel)), None, length=steps)
    return w


def fit_head(diff: np.ndarray, init_kernel, *, steps: int, learning_rate: float) -> np.ndarray:
    """Full-batch Adam on the BT loss of ``diff`` [N, d] from ``init_kernel`` [d, 1]; returns the kernel [d, 1]
    in float32. Raises FloatingPointError when the features or the fitted kernel are non-finite."""
    if not np.isfinite(diff).all():
        raise FloatingPointError("the features are non-finite")
    kernel = np.asarray(
        _fit(jnp.asarray(diff), jnp.asarray(init_kernel, jnp.float32), steps=steps, learning_rate=learning_rate)
    )
    if not np.isfinite(kernel).all():
        raise FloatingPointError(f"the probe went non-finite (learning rate {learning_rate}, {steps} steps)")
    return kernel


def margins(diff: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """The probe's reward margins r⁺ − r⁻ of each pair: [N, d] @ [d, 1] → [N] float64."""
    return (np.asarray(diff, np.float64) @ np.asarray(kernel, np.float64))[:, 0]


def accuracy(m: np.ndarray) -> float:
    """Pair accuracy of margins [N] (a tie counts one half)."""
    return float(np.mean((m > 0) + 0.5 * (m == 0)))


def gate(pretrained: Mapping[str, np.ndarray], random: Mapping[str, np.ndarray]) -> dict:
    """The gate on per-pair margins of the two probes (``{split: [N]}``, the same pairs in both).

    Returns {"pretrained": {split: accuracy}, "random": {split: accuracy}, "margin": {split: pretrained − random},
    "accuracy_bound", "margin_bound", "holds"} — ``holds``: validation accuracy ≥ GATE_ACCURACY and margin ≥
    GATE_MARGIN (point estimates; the ``pretraining`` claim adds the CI)."""
    acc_p = {s: accuracy(m) for s, m in pretrained.items()}
    acc_r = {s: accuracy(m) for s, m in random.items()}
    margin = {s: acc_p[s] - acc_r[s] for s in acc_p if s in acc_r}
    holds = acc_p.get("validation", 0.0) >= GATE_ACCURACY and margin.get("validation", -1.0) >= GATE_MARGIN
    return {
        "pretrained": acc_p,
        "random": acc_r,
        "margin": margin,
        "accuracy_bound": GATE_ACCURACY,
        "margin_bound": GATE_MARGIN,
        "holds": bool(holds),
    }
