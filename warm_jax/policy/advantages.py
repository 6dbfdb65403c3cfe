"""Advantage estimators for REINFORCE, chosen by name (``ReinforceConfig.baseline``).

Each estimator maps per-sequence returns to per-token advantages:

    estimator(returns [B], values [B, N] | None, mask [B, N], k) -> advantages [B, N]

where the batch holds ``k`` consecutive samples per prompt (rows ``i*k … i*k + k − 1`` share
prompt ``i``). Advantages are constants for the policy gradient (stop_gradient inside).

* ``value``: the paper's value baseline, A_t = R − V(s_t), with V the decoder's per-token
  ``value_head`` on the policy's own trunk, trained by ``value_loss`` towards the final return.
* ``rloo``: leave-one-out over the k samples of a prompt (REINFORCE Leave-One-Out).
* ``batch_mean``: the mean return of the batch.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Estimator = Callable[..., jax.Array]


def _broadcast(adv, mask):
    return jax.lax.stop_gradient(adv)[:, None] * mask.astype(jnp.float32)


def batch_mean(returns, values, mask, k: int):
    """A = R − mean(R) over the whole batch."""
    del values, k
    return _broadcast(returns - jnp.mean(returns), mask)


def rloo(returns, values, mask, k: int):
    """A_i = R_i − mean of the other k − 1 returns of the same prompt."""
    del values
    if k < 2:
        raise ValueError("baseline 'rloo' needs ReinforceConfig.samples_per_prompt >= 2")
    r = returns.reshape(-1, k)
    others = (r.sum(1, keepdims=True) - r) / (k - 1)
    return _broadcast((r - others).reshape(-1), mask)


def value(returns, values, mask, k: int):
    """A_t = R − V(s_t) per response token (V from the value head, not differentiated here)."""
    del k
    if values is None:
        raise ValueError("baseline 'value' needs per-token values from the value head")
    adv = returns[:, None] - jax.lax.stop_gradient(values)
    return adv * mask.astype(jnp.float32)


def value_loss(returns, values, mask):
    """Mean squared error of V(s_t) against the final return over real response tokens: scalar."""
    w = mask.astype(jnp.float32)
    err = (values - jax.lax.stop_gradient(returns)[:, None]) ** 2
    return jnp.sum(err * w) / jnp.maximum(jnp.sum(w), 1.0)


ADVANTAGE_ESTIMATORS: dict[str, Estimator] = {"value": value, "rloo": rloo, "batch_mean": batch_mean}
NEEDS_VALUE = frozenset({"value"})


def get_estimator(name: str) -> Estimator:
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"ReinforceConfig.baseline={name!r} is unknown; choose from {sorted(ADVANTAGE_ESTIMATORS)}")
    return ADVANTAGE_ESTIMATORS[name]
