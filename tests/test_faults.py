"""Fault injection (tests only): off by default, per-member NaN steps, the in-graph poison, validation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from warm_jax import faults


def test_default_injects_nothing():
    f = faults.FaultInjection()
    assert f.member_nan_steps(3).tolist() == [-1, -1, -1]
    f.kill_if_due(0)  # never kills
    loss, grads = jax.jit(faults.poison)(jnp.int32(1), f.nan_at_step, jnp.float32(2.5), {"w": jnp.ones(2)})
    assert float(loss) == 2.5 and np.asarray(grads["w"]).tolist() == [1.0, 1.0]


def test_nan_steps_per_member_and_a_traced_poison():
    f = faults.FaultInjection(nan_at_step=3, nan_members=(1,))
    steps = f.member_nan_steps(3)
    assert steps.tolist() == [-1, 3, -1] and steps.dtype == np.int32
    assert faults.FaultInjection(nan_at_step=3).member_nan_steps(2).tolist() == [3, 3]
    # vmapped over members, as the ensemble steps do: only member 1 at step 3 is poisoned.
    loss, grads = jax.jit(jax.vmap(faults.poison, in_axes=(None, 0, None, None)))(
        jnp.int32(3), jnp.asarray(steps), jnp.float32(1.0), {"w": jnp.ones(2)}
    )
    assert np.isnan(np.asarray(loss)).tolist() == [False, True, False]
    assert np.isnan(np.asarray(grads["w"])).all(axis=1).tolist() == [False, True, False]


def test_bad_values_name_the_binding():
    with pytest.raises(ValueError, match="FaultInjection.nan_at_step"):
        faults.FaultInjection(nan_at_step=-2)
    with pytest.raises(ValueError, match="FaultInjection.nan_members"):
        faults.FaultInjection(nan_members=(-1,))
    with pytest.raises(ValueError, match=r"FaultInjection.nan_members = \(4,\): no member \[4\] among 2"):
        faults.FaultInjection(nan_at_step=1, nan_members=(4,)).member_nan_steps(2)
