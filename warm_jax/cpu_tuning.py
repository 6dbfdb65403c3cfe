"""CPU-specific tuning: an explicit opt-in, in one place, applied where programs are compiled.

Nothing here changes what a program computes; it changes how XLA:CPU runs it. Off unless asked for:

* ``cpu_tuning.enabled = True`` (gin; gin/quickstart.gin and gin/smollm2_cpu_smoke.gin set it) gives the training
  steps (pretrain, the RM ensemble, REINFORCE, the policy ensemble) XLA:CPU's
  ``xla_cpu_experimental_ynn_fusion_type = LIBRARY_FUSION_TYPE_ELTWISE``. XLA's default
  (``LIBRARY_FUSION_TYPE_DOT``) hands each dot alone to YNNPACK and leaves the element-wise work around it to XLA's
  own loops; ELTWISE lets YNNPACK take a dot together with its element-wise producers and consumers as one fusion
  (the backward's ``dgate @ W_gate.T + dup @ W_up.T``, the SiLU recomputation feeding a dot). That is faster for
  training steps (BENCHMARKS.md) and slower for decoding's few-row products, so it is chosen per program kind
  (``compiler_options``), never process-wide. Off the CPU, or on a jaxlib without the option, no option is given.
* Huge-page host malloc: ``warm-train --host_hugepages`` (``warm_jax/host_memory.py``). glibc reads it only when a
  process starts, so it re-executes the command before jax is imported and cannot be a gin setting.
* Decoding few rows with out-first kernels is the sampler's own choice (``SamplingConfig.out_first_kernels``), made
  where it was measured to pay; the model's config does not carry it.
"""

from __future__ import annotations

import functools
import logging

import gin
import jax
import numpy as np

log = logging.getLogger(__name__)

TRAIN_STEP = "train_step"  # a jitted optimizer step (forward, backward, update)
DECODE = "decode"  # the sampler's prefill and token loop
PROGRAM_KINDS = (TRAIN_STEP, DECODE)

YNN_FUSION_OPTION = "xla_cpu_experimental_ynn_fusion_type"


@gin.configurable("cpu_tuning")
def settings(enabled: bool = False, train_step_ynn_fusion: str = "LIBRARY_FUSION_TYPE_ELTWISE") -> tuple[bool, str]:
    """The gin face: ``cpu_tuning.enabled`` (the opt-in) and the YNNPACK fusion type of training steps."""
    return bool(enabled), train_step_ynn_fusion


def compiler_options(kind: str) -> dict[str, str]:
    """XLA compiler options for a program of ``kind`` (``jax.jit(..., compiler_options=...)``): {} unless
    ``cpu_tuning.enabled`` and the backend is the CPU."""
    if kind not in PROGRAM_KINDS:
        raise ValueError(f"unknown program kind {kind!r}; one of {PROGRAM_KINDS}")
    enabled, fusion = settings()
    if not enabled or kind != TRAIN_STEP:
        return {}
    return cpu_options(fusion)


def cpu_options(ynn_fusion_type: str) -> dict[str, str]:
    """{YNN_FUSION_OPTION: ynn_fusion_type} on the CPU backend when this jaxlib accepts it, else {} (and an empty
    ``ynn_fusion_type`` keeps XLA's default)."""
    if not ynn_fusion_type or jax.default_backend() != "cpu":
        return {}
    return _option_if_supported(YNN_FUSION_OPTION, ynn_fusion_type)


@functools.cache
def _option_if_supported(name: str, value: str) -> dict[str, str]:
    opts = {name: value}
    try:  # an experimental option: a jaxlib without it refuses to compile
        jax.jit(lambda x: x + 1, compiler_options=opts).lower(np.float32(0)).compile()
    except Exception as e:  # noqa: BLE001 -- any refusal means "not supported here"
        log.warning("XLA option %s=%s not supported by this jaxlib (%s); using XLA's default", name, value, e)
        return {}
    return opts
