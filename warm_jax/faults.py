"""Fault injection, for tests only: poison an update with NaN, or kill the process when a step starts.

Off by default. The training loops (pretrain, the RM ensemble, REINFORCE and the policy ensemble) read one
``FaultInjection`` from gin at their stage's entry and pass it down, so no production config carries a test hook:

    FaultInjection.nan_at_step = 3        # the update that makes step 3 sees a NaN loss and NaN gradients
    FaultInjection.nan_members = (1,)     # ... in member/policy 1 only (default: every member)
    FaultInjection.kill_at_step = 3       # SIGKILL this process when step 3 starts (a crash, no preemption save)

The poisoning happens inside the jitted step (the step to poison is compared with the traced step counter), so
it exercises the same in-graph skip that a real overflow takes.
"""

from __future__ import annotations

import dataclasses
import os
import signal

import gin
import jax
import jax.numpy as jnp
import numpy as np

NEVER = -1


@gin.configurable
@dataclasses.dataclass(frozen=True)
class FaultInjection:
    nan_at_step: int = NEVER  # poison the update that makes this step (steps count from 1); -1: never
    nan_members: tuple[int, ...] = ()  # ensembles: the members (policies) poisoned; empty: all of them
    kill_at_step: int = NEVER  # SIGKILL the process when this step starts; -1: never

    def __post_init__(self):
        for name in ("nan_at_step", "kill_at_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < NEVER:
                raise ValueError(f"FaultInjection.{name} must be -1 (never) or a step >= 0, got {value!r}")
        members = (self.nan_members,) if isinstance(self.nan_members, int) else tuple(self.nan_members)
        if any(isinstance(m, bool) or not isinstance(m, int) or m < 0 for m in members):
            raise ValueError(f"FaultInjection.nan_members must be member indices >= 0, got {self.nan_members!r}")
        object.__setattr__(self, "nan_members", members)

    def member_nan_steps(self, num_members: int) -> np.ndarray:
        """int32 [M]: the step at which each member is poisoned (-1: never)."""
        bad = [m for m in self.nan_members if m >= num_members]
        if bad:
            raise ValueError(f"FaultInjection.nan_members = {self.nan_members}: no member {bad} among {num_members}")
        hit = set(self.nan_members) if self.nan_members else set(range(num_members))
        return np.asarray([self.nan_at_step if i in hit else NEVER for i in range(num_members)], np.int32)

    def kill_if_due(self, step: int) -> None:
        """SIGKILLs this process when ``step`` (the step about to start) is ``kill_at_step``."""
        if self.kill_at_step != NEVER and int(step) == self.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)


def poison(new_step, nan_at_step, loss, grads):
    """(loss, grads) times NaN when ``new_step`` (the step the update makes) equals ``nan_at_step``, else
    unchanged (times 1). Both may be traced: inside a vmapped step each member compares its own."""
    factor = jnp.where(new_step == nan_at_step, jnp.nan, 1.0)
    return loss * factor, jax.tree.map(lambda g: g * factor, grads)
