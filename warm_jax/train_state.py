"""The training state pytree and its sharding, shared by every stage that trains."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from warm_jax import faults


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs to draw the same numbers: step, params, opt state, key.

    ``key`` is raw uint32 key data ([2]) so Orbax can save it; ``step_key`` folds the step in.
    """

    step: jax.Array  # int32 []   ([M] when stacked)
    params: Any
    opt_state: Any
    key: jax.Array  # uint32 [2] ([M, 2] when stacked)

    def step_key(self):
        return jax.random.fold_in(jax.random.wrap_key_data(self.key), self.step)


def new_state(params, tx: optax.GradientTransformation, key) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        key=jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key,
    )


def state_specs(tx: optax.GradientTransformation, abstract_params, param_specs) -> TrainState:
    """PartitionSpecs for a TrainState: optimizer moments follow their parameters, counters
    and scalars are replicated."""
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_specs = optax.tree_map_params(
        tx,
        lambda _, spec: spec,
        abstract_opt,
        param_specs,
        transform_non_params=lambda _: P(),
        is_leaf=lambda x: isinstance(x, P),
    )
    return TrainState(step=P(), params=param_specs, opt_state=opt_specs, key=P())


def all_finite(tree) -> jax.Array:
    """True iff every floating leaf is finite (scalar bool)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def select(pred, new, old):
    """``new`` where pred else ``old``, leafwise (used to skip a non-finite update in-graph)."""
    return jax.tree.map(lambda n, o: jnp.where(pred, n, o), new, old)


def guarded_update(state: TrainState, loss, grads, tx: optax.GradientTransformation, *, nan_at_step=faults.NEVER):
    """One optimizer update that is skipped in-graph when the loss, a gradient or a new parameter is non-finite.

    The step counter still advances (so the data iterator and the step key move on), but params
    and optimizer state keep their old values. ``nan_at_step`` (``faults.FaultInjection``, tests; may be
    traced) poisons the loss and gradients of the update that makes that step. Returns (new state, loss,
    finite flag).
    """
    loss, grads = faults.poison(state.step + 1, nan_at_step, loss, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # The new params too: an optimizer can overflow finite gradients (a huge learning rate, a tiny second
    # moment), and a non-finite state must never be kept or saved.
    finite = jnp.isfinite(loss) & all_finite(grads) & all_finite(params)
    new = state.replace(
        step=state.step + 1,
        params=select(finite, params, state.params),
        opt_state=select(finite, opt_state, state.opt_state),
    )
    return new, loss, finite
