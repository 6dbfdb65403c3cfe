"""warm_jax: Weight Averaged Reward Models (WARM) in JAX."""

from __future__ import annotations

from warm_jax import host_memory as _host_memory

# `python -m warm_jax.train`: re-run once with huge-page malloc before jax is imported (see
# host_memory). Importing warm_jax as a library never does.
if _host_memory.started_as_program():
    _host_memory.reexec_with_hugepages()
