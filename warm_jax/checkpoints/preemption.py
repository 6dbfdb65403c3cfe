"""Preemption: SIGTERM becomes a save decision at the next step boundary.

``install_sigterm_handler()`` records SIGTERM; ``Checkpointer.reached_preemption(step)`` turns it into a
save decision. With ``jax.distributed`` and its preemption service running, JAX's own SIGTERM notifier
and ``reached_preemption_sync_point`` are used instead, so every process saves the same step.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import jax
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

_PREEMPTION = threading.Event()
_HANDLER_LOCK = threading.Lock()
_handler_installed = False


def _on_sigterm(signum: int, frame: Any) -> None:
    del signum, frame
    # Only set a flag: the training loop saves at its next step boundary and exits 0.
    _PREEMPTION.set()


def _jax_preemption_service() -> bool:
    """True when `jax.distributed` runs with its preemption service (it owns SIGTERM then)."""
    return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)


def install_sigterm_handler() -> None:
    """Records SIGTERM so that the training loop can save and exit 0. Idempotent; call from the main thread.

    Under `jax.distributed` with the preemption service on, JAX has already installed a SIGTERM notifier
    that tells every process; replacing it with ours would keep the other processes in the dark, so
    nothing is installed then and `Checkpointer.reached_preemption` asks JAX's sync point instead.
    """
    global _handler_installed
    with _HANDLER_LOCK:
        if _handler_installed:
            return
        if _jax_preemption_service():
            log.info("SIGTERM is handled by the JAX preemption service (jax.distributed is initialized).")
        else:
            signal.signal(signal.SIGTERM, _on_sigterm)
        _handler_installed = True


def preemption_requested() -> bool:
    """True once SIGTERM was received here (or, multi-process, once the preemption sync step was reached)."""
    return _PREEMPTION.is_set()


def reached_preemption(step: int) -> bool:
    if _jax_preemption_service():
        # All processes must call this at every step; it returns True on all of them at the same step.
        try:
            reached = multihost_utils.reached_preemption_sync_point(step)
        except RuntimeError:  # the sync manager is not running
            reached = False
        if reached:
            _PREEMPTION.set()
        return reached
    return _PREEMPTION.is_set()
