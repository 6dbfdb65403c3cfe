"""Functional KV-cache sampler: one prefill, then decoding inside ``lax.while_loop``.

Prompts are left-padded to a fixed width so every row's last prompt token sits in the same
column and all rows decode in lockstep. Per-sequence ``done`` flags stop rows at EOS; the loop
stops when all rows are done or ``max_new_tokens`` is reached. Parameters are an argument of the
compiled function, so new policy weights of the same shapes/shardings swap in without a
recompile. The cache is created inside the compiled function (never crosses the boundary).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from warm_jax import batched
from warm_jax.models import transformer as tr


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 24
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    eos_id: int = 2
    pad_id: int = 0
    # Decode with out-first kernels (``tr.project``): True, False, or None for where they were measured to pay
    # (``_use_out_first``).
    out_first_kernels: bool | None = None


# Out-first kernels pay where decoding streams the weights from memory. SmolLM2-135M (540 MB in float32) on 2
# CPU cores: +30% tokens/s at 4 and 16 rows, no loss at 64; models whose weights sit in the caches lost
# 15-30% (55 MB at d 512, and smaller) to the extra transposes. Between the two it is unmeasured.
OUT_FIRST_MIN_BYTES = 128 << 20


def _use_out_first(cfg: SamplingConfig, params, rows: int) -> bool:
    if cfg.out_first_kernels is not None:
        return cfg.out_first_kernels
    nbytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(params))
    return rows > 1 and jax.default_backend() == "cpu" and nbytes >= OUT_FIRST_MIN_BYTES


def filter_logits(logits, *, temperature: float, top_k: int, top_p: float):
    """Temperature, then top-k, then nucleus (top-p) filtering. logits [B, V] float32."""
    logits = logits / jnp.maximum(temperature, 1e-6)
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        cum = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(cum < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def _decode_view(graphdef, params, model_cfg: tr.ModelConfig, out_first: bool):
    """The model to decode with: per-layer, with out-first kernels if asked; made once per call, before the
    decode loop.

    Scanning a ``scan_layers`` stack inside the token loop would copy every layer's weights out of the
    stack on every token (XLA keeps the dynamic slices in the loop), doubling the weight traffic that
    bounds decoding; the unrolled decode layers compile in seconds. Out-first kernels
    (``tr.project``) let each few-row product stream its weights once instead of repacking them; a
    single row gains nothing per token from them and would pay for the transposing copy. Not on
    GPUs by default: their GEMMs take either operand order, and there it has not been measured.
    """
    if not (model_cfg.scan_layers or out_first):
        return tr.bind(graphdef, params), model_cfg
    view_cfg = dataclasses.replace(model_cfg, scan_layers=False, remat=False)
    if out_first:  # before unstacking: XLA fuses the transpose into the per-layer slices
        params = tr.kernels_out_first(params)
    if model_cfg.scan_layers:
        params = tr.unstack_layers(params)
    # The barrier keeps XLA from sinking the copies back into the loop body.
    return tr.bind(tr.abstract_model(view_cfg, out_first=out_first)[0], jax.lax.optimization_barrier(params)), view_cfg


def sample(params, prompt_tokens, prompt_mask, key, *, graphdef, model_cfg: tr.ModelConfig, cfg: SamplingConfig):
    """Samples continuations.

    Args:
      prompt_tokens, prompt_mask: [B, P] left-padded prompts (mask 1 = real token).
      key: PRNG key.
    Returns dict:
      tokens [B, N] (pad after EOS), logprobs [B, N] (log π of each sampled token under the
      *unfiltered* temperature-1 policy: the quantity REINFORCE and KL need; 0 after done),
      mask [B, N] (1 = generated token, EOS included), length [B].
    """
    b, p = prompt_tokens.shape
    model, model_cfg = _decode_view(graphdef, params, model_cfg, _use_out_first(cfg, params, b))
    n = cfg.max_new_tokens
    cache = tr.init_cache(model_cfg, b, p + n)
    h, cache = model.hidden(prompt_tokens, prompt_mask, cache=cache)
    first_logits = model.logits(h[:, -1:])[:, 0]

    def pick(logits, k):
        filt = filter_logits(logits, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
        if cfg.temperature == 0.0:
            tok = jnp.argmax(logits, axis=-1)
        else:
            tok = jax.random.categorical(k, filt, axis=-1)
        lp = jax.nn.log_softmax(logits, axis=-1)
        return tok.astype(jnp.int32), jnp.take_along_axis(lp, tok[:, None], axis=-1)[:, 0]

    def cond(carry):
        i, _, _, _, _, done, _ = carry
        return (i < n) & ~jnp.all(done)

    def body(carry):
        i, logits, cache, toks, lps, done, key = carry
        key, k = jax.random.split(key)
        tok, lp = pick(logits, k)
        live = ~done
        tok = jnp.where(live, tok, cfg.pad_id)
        toks = toks.at[:, i].set(tok)
        lps = lps.at[:, i].set(jnp.where(live, lp, 0.0))
        done = done | (tok == cfg.eos_id)
        h, cache = model.hidden(tok[:, None], live[:, None].astype(jnp.int32), cache=cache)
        return i + 1, model.logits(h)[:, 0], cache, toks, lps, done, key

    init = (
        jnp.zeros((), jnp.int32),
        first_logits,
        cache,
        jnp.full((b, n), cfg.pad_id, jnp.int32),
        jnp.zeros((b, n), jnp.float32),
        jnp.zeros((b,), bool),
        key,
    )
    _, _, _, toks, lps, _, _ = jax.lax.while_loop(cond, body, init)
    # A generated token is real up to and including the first EOS (decided by position, not by
    # value: a sampled token may equal pad_id).
    is_eos = toks == cfg.eos_id
    first_eos = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1), n)
    mask = jnp.arange(n)[None, :] <= first_eos[:, None]
    return {"tokens": toks, "logprobs": lps, "mask": mask.astype(jnp.int32), "length": mask.sum(1).astype(jnp.int32)}


def make_sampler(graphdef, model_cfg: tr.ModelConfig, cfg: SamplingConfig, *, in_shardings=None, out_shardings=None):
    """Compiles ``sample`` once for a (graphdef, config); call with (params, tokens, mask, key)."""
    fn = functools.partial(sample, graphdef=graphdef, model_cfg=model_cfg, cfg=cfg)
    return jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings)


def sample_in_batches(sample_fn, params, prompt_tokens, prompt_mask, key, *, batch: int, mesh) -> dict[str, np.ndarray]:
    """Runs a ``make_sampler`` function over [R, P] host prompts, ``batch`` rows at a time (``batched.map_batches``:
    the last batch padded, one compile for all). The batch starting at row r samples with key fold_in(key, r).
    Returns host arrays tokens, mask [R, N] and length [R]; every process gets all rows.
    """

    def run(b, start):
        out = sample_fn(params, b["tokens"], b["mask"], jax.random.fold_in(key, start))
        return {k: out[k] for k in ("tokens", "mask", "length")}

    return batched.map_batches(run, {"tokens": prompt_tokens, "mask": prompt_mask}, batch_size=batch, mesh=mesh)


def sequence_logprobs(params, graphdef, tokens, mask, response_start: int):
    """Per-token log π(token) for a full forward of [B, T] tokens (prompt left-padded + response).

    Returns [B, T − response_start] log-probs of tokens[:, response_start:], each predicted
    from its prefix (full forward; the reference the cached sampler is checked against, and
    the REINFORCE loss's differentiable log-probs).
    """
    model = tr.bind(graphdef, params)
    h, _ = model.hidden(tokens, mask)
    logits = model.logits(h[:, response_start - 1 : -1])
    lp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(lp, tokens[:, response_start:, None], axis=-1)[..., 0]


@functools.partial(jax.jit, static_argnums=(1, 4))
def greedy_reference(params, graphdef, prompt_tokens, prompt_mask, n: int):
    """Greedy decoding by full forward passes (no cache): the test oracle for ``sample``."""
    model = tr.bind(graphdef, params)
    toks, mask = prompt_tokens, prompt_mask
    out = []
    for _ in range(n):
        logits = model(toks, mask)[:, -1]
        nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        out.append(nxt)
        toks = jnp.concatenate([toks, nxt[:, None]], axis=1)
        mask = jnp.concatenate([mask, jnp.ones_like(nxt[:, None])], axis=1)
    return jnp.stack(out, axis=1)
