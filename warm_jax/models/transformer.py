"""Llama-style decoder (Flax NNX) shared by the policy (LM head) and the reward models.

RMSNorm, rotary embeddings (half-rotation layout, as in HF Llama checkpoints), SwiGLU, grouped
query attention, optional tied embeddings, residual dropout whose rate may be a traced value
(so a vmapped ensemble can give each member its own rate). Three heads read the final hidden
state: LM logits, a scalar reward at the last real token, and a per-token value.

Every parameter carries its logical axes as ``axes`` metadata; ``warm_jax.sharding`` maps them
to the mesh.

Two layouts of the layers, chosen by ``ModelConfig.scan_layers``: one ``Block`` per layer
(params 'layer_0' ... 'layer_{L-1}'; the forward is a Python loop, so XLA compiles every layer), or
ONE stacked ``Block`` under 'layers' whose every parameter has a leading [L] axis (logical axis
'layers') and a ``lax.scan`` over it (XLA compiles one layer; compile time stops growing with
depth). Both run the same per-layer function with the same dropout keys, and the same seed
initialises the same weights, so the layouts differ only in float rounding;
``stack_layers`` / ``unstack_layers`` convert a params tree between them.

The hot path is functional: ``graphdef, params = abstract_model(cfg)[:2]``, then
``nnx.merge(graphdef, params)`` inside jitted pure functions.

Shapes: B batch, T new tokens, S key slots (cache length), d model width, H query heads,
K kv heads, G = H // K, D head dim, V vocabulary, L layers.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any, NamedTuple

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

Cache = dict[str, Any]


# Activations named in the layer code (checkpoint_name) that the 'minimal' remat policy keeps: with
# them the backward pass recomputes no projection, only norms, RoPE, SwiGLU's product and dtype casts
# (and, with attention='xla', the attention scores; the fused kernel's own outputs are kept).
# Saving the rest too (no remat) stores ~3x the bytes per layer — on a GPU at the SmolLM2-135M shape
# that traffic, not FLOPs, dominated the step (BENCHMARKS.md § GPU).
SAVED_ACTIVATIONS = ("attn_q", "attn_k", "attn_v", "attn_out", "resid_mid", "mlp_gate", "mlp_up", "dropout_keep")
# jax's fused (cuDNN) attention forward: keeping its outputs (the result and the softmax statistics its
# backward needs) avoids running the kernel again in the backward pass.
_FUSED_ATTENTION_FORWARD = ("dot_product_attention_fwd", "dot_product_attention_fwd_wrapper")

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "minimal": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.save_only_these_names(*SAVED_ACTIVATIONS),
        lambda prim, *_, **__: prim.name in _FUSED_ATTENTION_FORWARD,
    ),
}


# ModelConfig fields that choose how our decoder stores and runs a model (precision, attention kernel, layer
# layout), not what it computes: a checkpoint does not fix them (the importer takes them from gin).
RUN_FIELDS = ("dtype", "param_dtype", "attention", "scan_layers", "remat", "remat_policy")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 512
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int | None = None  # default d_model // n_heads
    d_ff: int = 384
    max_len: int = 128
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dropout_rate: float = 0.0
    dtype: str = "float32"  # activations / matmul inputs
    param_dtype: str = "float32"
    init_std: float = 0.02
    # 'xla' (any backend), 'cudnn' (fused, GPU only) or 'auto' (jax.nn.dot_product_attention's own choice, which
    # in jax 0.10-0.11 is always its XLA implementation: on a GPU, ask for 'cudnn').
    attention: str = "xla"
    # One stacked block scanned over (params under 'layers', [L, ...]) instead of 'layer_{i}' attributes.
    scan_layers: bool = False
    # Recompute each layer's activations in the backward pass (jax.checkpoint per layer), keeping what
    # ``remat_policy`` names (REMAT_POLICIES): 'full' keeps nothing (least memory, ~1/3 more FLOPs);
    # 'minimal' keeps the projections and attention outputs and recomputes only element-wise work.
    remat: bool = False
    remat_policy: str = "full"

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    def __post_init__(self):
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"ModelConfig.remat_policy={self.remat_policy!r}: expected one of {sorted(REMAT_POLICIES)}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"ModelConfig.n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")


# Fields a model.json written by an earlier warm_jax may hold that ModelConfig no longer has: the decode-only
# kernel layout is the sampler's choice now (Decoder's ``out_first``), never a property of a saved model.
RETIRED_FIELDS = ("out_first_kernels",)


def config_from_dict(fields: dict) -> ModelConfig:
    """The ModelConfig a model.json's "model" entry describes (retired fields dropped)."""
    return ModelConfig(**{k: v for k, v in fields.items() if k not in RETIRED_FIELDS})


def _param(key, shape, axes, std, dtype):
    return nnx.Param(std * jax.random.normal(key, shape, dtype), axes=axes)


# The projection kernels, by attribute name: how many of their leading axes (in the in-first layout) are inputs.
_KERNEL_INPUTS = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1, "w_down": 1, "lm_head": 1}


def _kernel(cfg: ModelConfig, key, name: str, shape, axes, std, out_first: bool = False):
    """The projection kernel ``name``: [*in, *out] (shape and axes given in that order), or [*out, *in] when
    ``out_first`` (the sampler's decode view, see ``Decoder``)."""
    n_in = _KERNEL_INPUTS[name]
    if out_first:
        shape, axes = shape[n_in:] + shape[:n_in], axes[n_in:] + axes[:n_in]
    return _param(key, shape, axes, std, jnp.dtype(cfg.param_dtype))


def project(x, w, out_first: bool = False, out_dtype=None):
    """x [B, T, *in] through kernel w → [B, T, *out]; w is [*in, *out], or [*out, *in] if ``out_first``.
    ``out_dtype`` (e.g. float32 from bfloat16 inputs) is the product's accumulation and result dtype.

    Out-first is for decoding a few rows on XLA:CPU: a product with the weights on the left and the
    rows on the right ([N, K] · [M, K]ᵀ → [N, M]) streams each weight once, while [M, K] · [K, N]
    repacks the weight matrix on every call (SmolLM2's MLP at 16 rows: 0.82 vs 1.1 ms per layer;
    BENCHMARKS § 3). The barrier keeps XLA from folding the transpose back into the product, which
    would give the slow form again.
    """
    n_in = x.ndim - 2
    if not out_first:
        return jnp.tensordot(x, w, n_in, preferred_element_type=out_dtype)
    b, t = x.shape[:2]
    out_shape = w.shape[: w.ndim - n_in]
    yt = jnp.dot(w.reshape(math.prod(out_shape), -1), x.reshape(b * t, -1).T, preferred_element_type=out_dtype)
    return jax.lax.optimization_barrier(yt).T.reshape(b, t, *out_shape)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), axes=("norm",))
        self.eps = eps

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope(x, positions, theta: float):
    """Rotary embedding, half-rotation layout. x: [B, T, N, D]; positions: [B, T] int."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : d // 2], xf[..., d // 2 :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def dropout(x, rate, key):
    """Inverted dropout whose ``rate`` may be traced (per-member rates under vmap). x: [..., D].

    An element is kept when its 16-bit uniform integer u is >= t = round(rate · 2^16) and then
    scaled by 2^16 / (2^16 − t), the exact inverse of its keep probability (the rate is used
    rounded to a multiple of 2^-16). The 16-bit integers are the two halves of 32-bit words drawn
    for half of the last axis: JAX's (partitionable) threefry runs one threefry2x32 block per word
    drawn, so this is half the random-number work of ``jax.random.bernoulli`` (a word per
    element; BENCHMARKS.md § Ensemble step). Drawing along the last axis keeps the leading
    (batch) axes, and so their sharding, as they are.
    """
    if key is None:
        return x
    d = x.shape[-1]
    words = jax.random.bits(key, (*x.shape[:-1], -(-d // 2)), jnp.uint32)
    u = jnp.concatenate([words & 0xFFFF, words >> 16], axis=-1)[..., :d].astype(jnp.int32)
    t = jnp.clip(jnp.round(jnp.asarray(rate, jnp.float32) * 65536), 0, 65536).astype(jnp.int32)
    keep = checkpoint_name(u >= t, "dropout_keep")
    scale = 65536.0 / jnp.maximum(65536 - t, 1).astype(jnp.float32)  # rate 1: nothing kept, scale unused
    return jnp.where(keep, x * scale.astype(x.dtype), 0).astype(x.dtype)


class AttentionMask(NamedTuple):
    """Which keys each query sees. ``dense`` [B, T, S] bool always; ``lengths`` [B] int32 only when every
    row is right-padded and there is no cache, where ``dense`` = causal & (key < length).

    Every query sees at least one key (a pad query that would see none sees its own slot, see
    ``visible_keys``): a fully masked row is 0/0 in a softmax and, in a fused kernel, poisons the backward."""

    dense: jax.Array
    lengths: jax.Array | None = None


def visible_keys(causal, key_mask, own_slot):
    """[B, T, S] bool: causal [T, S] & key_mask [B, S]; a query that would see no key sees its own slot own_slot [T, S].

    Only pad queries can see nothing (a real query sees its own key), so nothing a real token computes
    changes, and a right-padded pad query keeps the keys before it (as the length mask gives it). But no
    row is left empty: jax's cuDNN path turns the mask into a bias of −2**41 in bfloat16, and the backward
    pass rebuilds an empty row's probabilities as exp(s − 2**41 − logsumexp), where float32 keeps no digit
    of s, so the row's gradient is inf·0 = NaN — and every left-padded prompt has such rows.
    """
    visible = causal[None] & key_mask[:, None, :]
    return visible | (own_slot[None] & ~visible.any(axis=-1, keepdims=True))


# jax's fused attention needs even lengths with a mask when training (jax 0.10-0.11), and the cuDNN
# kernels tile by 64; lengths are padded up to a multiple of this and the padding masked.
FUSED_LENGTH_MULTIPLE = 64
# The head dims jax's cuDNN path accepts (Hopper and later: ≤ 256; earlier GPUs: ≤ 128), multiples of 8.
FUSED_MAX_HEAD_DIM = 256


def _pad_axis(x, axis: int, size: int, value=0):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def fused_attention(q, k, v, mask: AttentionMask, implementation: str | None = "cudnn"):
    """jax.nn.dot_product_attention with T and S padded to ``FUSED_LENGTH_MULTIPLE`` (any length works).

    Padded keys are masked; padded queries see their own slot and are cut off the result. Shapes as
    ``attend``. ``implementation`` is passed on ('cudnn', or None for jax's choice; on the CPU jax's XLA
    implementation takes the same masks and lengths, which is how the tests check the padding).
    """
    b, t, h, hd = q.shape
    s = k.shape[1]
    tp = -(-t // FUSED_LENGTH_MULTIPLE) * FUSED_LENGTH_MULTIPLE
    sp = -(-s // FUSED_LENGTH_MULTIPLE) * FUSED_LENGTH_MULTIPLE
    q, k, v = _pad_axis(q, 1, tp), _pad_axis(k, 1, sp), _pad_axis(v, 1, sp)
    if mask.lengths is not None:
        # The kernel builds causal & (key < length) itself, forward and backward, from the lengths;
        # an empty row (length 0: a row of padding only) sees key 0 instead.
        out = jax.nn.dot_product_attention(
            q, k, v, is_causal=True, key_value_seq_lengths=jnp.maximum(mask.lengths, 1), implementation=implementation
        )
    else:
        dense = _pad_axis(_pad_axis(mask.dense, 1, tp), 2, sp)
        dense = (
            dense | (jnp.arange(tp)[:, None] == jnp.arange(sp)[None, :])[None] & (jnp.arange(tp) >= t)[None, :, None]
        )
        # An explicit [B, H, T, S] mask: a broadcast head dim does not survive vmap's batching rule.
        full = jnp.broadcast_to(dense[:, None], (b, h, tp, sp))
        out = jax.nn.dot_product_attention(q, k, v, mask=full, implementation=implementation)
    return out[:, :t]


def attend(q, k, v, mask: AttentionMask, implementation: str = "xla"):
    """Grouped-query attention. q [B, T, H, D], k/v [B, S, K, D] → [B, T, H, D].

    'xla' is a plain einsum softmax (float32 scores); 'cudnn' is jax's fused cuDNN kernel (through
    ``fused_attention``, which accepts any length); 'auto' is the same call with jax's own choice of kernel
    (in jax 0.10-0.11 always its XLA implementation).
    """
    hd = q.shape[-1]
    if implementation == "cudnn" and (hd > FUSED_MAX_HEAD_DIM or hd % 8):
        logging.getLogger(__name__).warning(
            "attention: head dim %d is not one jax's cuDNN kernel takes (a multiple of 8, at most %d); "
            "using XLA attention for this model",
            hd,
            FUSED_MAX_HEAD_DIM,
        )
        implementation = "xla"
    if implementation in ("cudnn", "auto"):
        return fused_attention(q, k, v, mask, "cudnn" if implementation == "cudnn" else None)
    b, t, h, hd = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) / jnp.sqrt(hd).astype(jnp.float32)
    scores = jnp.where(mask.dense[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    # (The fused kernel's output needs no name: the remat policy keeps that kernel's outputs.)
    return checkpoint_name(jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, hd), "attn_out")


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, out_first: bool = False):
        d, h, k, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.dim_head
        std = cfg.init_std
        kernel = functools.partial(_kernel, cfg, out_first=out_first)
        self.wq = kernel(rngs.params(), "wq", (d, h, hd), ("embed", "heads", "head_dim"), std)
        self.wk = kernel(rngs.params(), "wk", (d, k, hd), ("embed", "kv_heads", "head_dim"), std)
        self.wv = kernel(rngs.params(), "wv", (d, k, hd), ("embed", "kv_heads", "head_dim"), std)
        # Output projection scaled down by depth (GPT-2 style) so deep stacks start stable.
        wo_std = std / (2 * cfg.n_layers) ** 0.5
        self.wo = kernel(rngs.params(), "wo", (h, hd, d), ("heads", "head_dim", "embed"), wo_std)
        self.cfg = cfg
        self.out_first = out_first

    def __call__(self, x, positions, mask, layer_cache):
        """x: [B, T, d]; positions: [B, T]; mask: AttentionMask; layer_cache: None or
        {'k','v': [B, S, K, D], 'index': int32 scalar (first slot to write)}."""
        cfg = self.cfg
        dt = x.dtype
        q, k, v = (project(x, w[...].astype(dt), self.out_first) for w in (self.wq, self.wk, self.wv))
        q = checkpoint_name(rope(q, positions, cfg.rope_theta), "attn_q")
        k = checkpoint_name(rope(k, positions, cfg.rope_theta), "attn_k")
        v = checkpoint_name(v, "attn_v")
        new_cache = None
        if layer_cache is not None:
            idx = layer_cache["index"]
            k_all = jax.lax.dynamic_update_slice_in_dim(layer_cache["k"], k.astype(layer_cache["k"].dtype), idx, 1)
            v_all = jax.lax.dynamic_update_slice_in_dim(layer_cache["v"], v.astype(layer_cache["v"].dtype), idx, 1)
            new_cache = {"k": k_all, "v": v_all}
            k, v = k_all.astype(dt), v_all.astype(dt)
        out = attend(q, k, v, mask, cfg.attention)
        return project(out, self.wo[...].astype(dt), self.out_first), new_cache


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, out_first: bool = False):
        d, f = cfg.d_model, cfg.d_ff
        std = cfg.init_std
        kernel = functools.partial(_kernel, cfg, out_first=out_first)
        self.w_gate = kernel(rngs.params(), "w_gate", (d, f), ("embed", "mlp"), std)
        self.w_up = kernel(rngs.params(), "w_up", (d, f), ("embed", "mlp"), std)
        self.w_down = kernel(rngs.params(), "w_down", (f, d), ("mlp", "embed"), std / (2 * cfg.n_layers) ** 0.5)
        self.out_first = out_first

    def __call__(self, x):
        dt = x.dtype
        g = checkpoint_name(project(x, self.w_gate[...].astype(dt), self.out_first), "mlp_gate")
        u = checkpoint_name(project(x, self.w_up[...].astype(dt), self.out_first), "mlp_up")
        return project(jax.nn.silu(g) * u, self.w_down[...].astype(dt), self.out_first)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, out_first: bool = False):
        pd = jnp.dtype(cfg.param_dtype)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd)
        self.attn = Attention(cfg, rngs, out_first)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd)
        self.mlp = MLP(cfg, rngs, out_first)

    def __call__(self, x, positions, mask, layer_cache, dropout_rate, key):
        k1, k2 = jax.random.split(key) if key is not None else (None, None)
        a, new_cache = self.attn(self.attn_norm(x), positions, mask, layer_cache)
        x = checkpoint_name(x + dropout(a, dropout_rate, k1), "resid_mid")
        x = x + dropout(self.mlp(self.mlp_norm(x)), dropout_rate, k2)
        return x, new_cache


def _run_block(graph, state, x, i, layer_cache, positions, mask, dropout_rate, key):
    """Layer ``i`` as a function of arrays (the loop, the scan and jax.checkpoint all call this).

    graph/state: ``nnx.split`` of one (unstacked) Block; i: int or traced int32 layer index; the
    rest as in ``Block.__call__`` except ``key``, the forward's dropout key (or None): the layer's
    own is ``fold_in(key, i)`` in both layouts, so they draw the same dropout masks.
    Returns (x [B, T, d], the layer's new cache or None).
    """
    layer_key = jax.random.fold_in(key, i) if key is not None else None
    return nnx.merge(graph, state)(x, positions, mask, layer_cache, dropout_rate, layer_key)


def _init_blocks(cfg: ModelConfig, rngs: nnx.Rngs, out_first: bool = False) -> Block | list[Block]:
    """The L blocks, initialised in a ``lax.scan`` over layers: one stacked Block ([L, ...] params, axes
    ('layers', ...)) when ``cfg.scan_layers``, else a list of L Blocks.

    Each layer draws its keys from ``rngs.params`` in turn, as L ``Block(cfg, rngs)`` calls would (the
    stream's counter is the scan's carry), so the values are the same bits in either layout, and the
    same as building the blocks one by one. Built one by one, every layer inlined its own threefry
    programs: compiling SmolLM2-135M's init took 37-39 s on 2 CPU cores.
    """
    stream = rngs.params
    base = stream.key[...]

    def layer(count, _):
        r = nnx.Rngs(params=base)
        r.params.count[...] = count
        block = Block(cfg, r, out_first)
        return r.params.count[...], nnx.state(block)

    graph = nnx.graphdef(nnx.eval_shape(lambda: Block(cfg, nnx.Rngs(params=0), out_first)))
    count, stacked = jax.lax.scan(layer, stream.count[...], None, length=cfg.n_layers)
    stream.count[...] = count
    is_var = lambda x: isinstance(x, nnx.Variable)
    if cfg.scan_layers:
        add_axis = lambda v: v.replace(v[...], axes=("layers", *v.get_metadata()["axes"]))
        return nnx.merge(graph, jax.tree.map(add_axis, stacked, is_leaf=is_var))
    return [
        nnx.merge(graph, jax.tree.map(lambda v: v.replace(v[...][i]), stacked, is_leaf=is_var))
        for i in range(cfg.n_layers)
    ]


class Decoder(nnx.Module):
    """The decoder trunk plus LM, reward and value heads.

    ``out_first``: projection kernels stored [*out, *in] instead of [*in, *out] — the sampler's decode view only
    (``kernels_out_first``; checkpoints, training and everything else use in-first kernels). XLA:CPU runs a
    few-row product ~30% faster with the weights on the left (see ``project``).
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, out_first: bool = False):
        pd = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.out_first = out_first
        self.embed = _param(rngs.params(), (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std, pd)
        # One seed gives the same weights in either layout (see _init_blocks).
        blocks = _init_blocks(cfg, rngs, out_first)
        if cfg.scan_layers:
            self.layers = blocks
        else:
            for i, block in enumerate(blocks):
                # Named attributes (not a list) give checkpoint paths 'layer_3/attn/wq' with string keys.
                setattr(self, f"layer_{i}", block)
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd)
        if not cfg.tie_embeddings:
            self.lm_head = _kernel(
                cfg,
                rngs.params(),
                "lm_head",
                (cfg.d_model, cfg.vocab_size),
                ("embed", "vocab"),
                cfg.init_std,
                out_first=out_first,
            )
        self.reward_head = RewardHead(cfg, rngs)
        self.value_head = RewardHead(cfg, rngs)

    def hidden(
        self,
        tokens,
        token_mask,
        *,
        cache: Cache | None = None,
        dropout_rate=0.0,
        key=None,
        right_padded: bool = False,
    ):
        """Final-norm hidden states.

        Args:
          tokens: [B, T] int32. token_mask: [B, T] (1 = real token; left or right padding).
          cache: None for a full forward; else from ``init_cache`` (decoding: the T tokens go
            into slots [index, index + T)).
          dropout_rate: scalar, may be traced. key: dropout key or None (no dropout).
          right_padded: the caller promises every row of ``token_mask`` is 1s then 0s (no cache):
            fused attention kernels then mask by lengths (same result, no dense mask).
        Returns:
          hidden [B, T, d] in cfg.dtype, and the updated cache (None without one).
        """
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        token_mask = token_mask.astype(jnp.int32)
        x = self.embed[...].astype(dt)[tokens]
        if cache is None:
            positions = jnp.maximum(jnp.cumsum(token_mask, axis=1) - 1, 0)
            t = tokens.shape[1]
            causal = jnp.tril(jnp.ones((t, t), bool))
            mask = AttentionMask(
                visible_keys(causal, token_mask > 0, jnp.eye(t, dtype=bool)),
                jnp.sum(token_mask, axis=1) if right_padded else None,
            )
        else:
            idx = cache["index"]
            positions = cache["positions"][:, None] + jnp.cumsum(token_mask, axis=1) - 1
            positions = jnp.maximum(positions, 0)
            key_mask = jax.lax.dynamic_update_slice_in_dim(cache["key_mask"], token_mask.astype(bool), idx, 1)
            s = key_mask.shape[1]
            q_slot = idx + jnp.arange(tokens.shape[1])
            causal = jnp.arange(s)[None, :] <= q_slot[:, None]  # [T, S]
            mask = AttentionMask(visible_keys(causal, key_mask, jnp.arange(s)[None, :] == q_slot[:, None]))
        # prevent_cse guards an unrolled remat against XLA merging the recompute into the forward; a scan
        # body cannot be merged that way, and the guard would only cost speed there (jax.checkpoint docs).
        run = (
            jax.checkpoint(
                _run_block,
                static_argnums=(0,),
                prevent_cse=not cfg.scan_layers,
                policy=REMAT_POLICIES[cfg.remat_policy],
            )
            if cfg.remat
            else _run_block
        )

        def layer(block_graph, block_state, x, i, layer_cache):
            if layer_cache is not None:
                layer_cache = {**layer_cache, "index": cache["index"]}
            return run(block_graph, block_state, x, i, layer_cache, positions, mask, dropout_rate, key)

        if cfg.scan_layers:
            graph, stacked = nnx.split(self.layers)

            def body(x, xs):
                block_state, i, layer_cache = xs
                x, new_cache = layer(graph, block_state, x, i, layer_cache)
                if new_cache is not None:
                    # Only the T new slots leave the scan; returning each layer's whole [B, S, K, D] cache
                    # would rewrite the entire cache on every decoded token.
                    new_cache = jax.tree.map(
                        lambda c: jax.lax.dynamic_slice_in_dim(c, cache["index"], tokens.shape[1], axis=1), new_cache
                    )
                return x, new_cache

            layer_caches = None if cache is None else cache["layers"]
            x, new_slots = jax.lax.scan(body, x, (stacked, jnp.arange(cfg.n_layers), layer_caches))
            if cache is not None:  # one in-place write of the new slots, [L, B, T, K, D] into [L, B, S, K, D]
                new_layers = jax.tree.map(
                    lambda c, new: jax.lax.dynamic_update_slice_in_dim(c, new.astype(c.dtype), cache["index"], axis=2),
                    cache["layers"],
                    new_slots,
                )
        else:
            new_layers = []
            for i in range(cfg.n_layers):
                x, lc = layer(
                    *nnx.split(getattr(self, f"layer_{i}")), x, i, None if cache is None else cache["layers"][i]
                )
                new_layers.append(lc)
        new_cache = None
        if cache is not None:
            new_cache = {
                "layers": new_layers,
                "key_mask": key_mask,
                "index": cache["index"] + tokens.shape[1],
                "positions": cache["positions"] + jnp.sum(token_mask, axis=1),
            }
        return self.final_norm(x), new_cache

    def logits(self, hidden):
        """[B, T, d] → float32 [B, T, V], accumulated in float32 whatever the activations' dtype (a bfloat16
        logit keeps ~3 significant digits: too few for log-probabilities, their ratios and the KL)."""
        out_first = self.out_first
        if self.cfg.tie_embeddings:  # the table [V, d] is an out-first kernel already
            w = self.embed[...] if out_first else self.embed[...].T
        else:
            w = self.lm_head[...]
        return project(hidden, w.astype(hidden.dtype), out_first, out_dtype=jnp.float32)

    def reward(self, hidden, token_mask):
        """Scalar reward at the last real token. hidden [B, T, d], token_mask [B, T] → [B] f32."""
        return self.reward_head(pool_last(hidden, token_mask))

    def value(self, hidden):
        """Per-token value estimate, [B, T, d] → [B, T] f32."""
        return self.value_head(hidden)

    def __call__(self, tokens, token_mask):
        h, _ = self.hidden(tokens, token_mask)
        return self.logits(h)


class RewardHead(nnx.Module):
    """Linear map d → 1 (biases annotated too)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.kernel = _param(rngs.params(), (cfg.d_model, 1), ("embed", "out"), cfg.init_std, pd)
        self.bias = nnx.Param(jnp.zeros((1,), pd), axes=("out",))

    def __call__(self, h):
        out = h.astype(jnp.float32) @ self.kernel[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return out[..., 0]


def pool_last(hidden, token_mask):
    """hidden [B, T, d] at each row's last real token (works for left and right padding)."""
    t = token_mask.shape[1]
    last = t - 1 - jnp.argmax(token_mask[:, ::-1] > 0, axis=1)
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> Cache:
    """Empty KV cache: 'layers' holds k, v [B, S, K, D] per layer (a list of L dicts), or with
    ``scan_layers`` one dict of stacked k, v [L, B, S, K, D]; key_mask [B, S]; index; positions [B]."""
    dt = jnp.dtype(dtype or cfg.dtype)
    shape = (batch, length, cfg.n_kv_heads, cfg.dim_head)
    if cfg.scan_layers:
        layers = {"k": jnp.zeros((cfg.n_layers, *shape), dt), "v": jnp.zeros((cfg.n_layers, *shape), dt)}
    else:
        layers = [{"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)} for _ in range(cfg.n_layers)]
    return {
        "layers": layers,
        "key_mask": jnp.zeros((batch, length), bool),
        "index": jnp.zeros((), jnp.int32),
        "positions": jnp.zeros((batch,), jnp.int32),
    }


# ----------------------------------------------------------------------------- functional API


def _axes_of(state):
    return jax.tree.map(lambda v: tuple(v.get_metadata()["axes"]), state, is_leaf=lambda x: isinstance(x, nnx.Variable))


@functools.lru_cache(maxsize=16)
def _abstract_model_cached(cfg: ModelConfig, out_first: bool):
    module = nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(params=0), out_first))
    graphdef, state = nnx.split(module)
    return graphdef, nnx.to_pure_dict(state), nnx.to_pure_dict(_axes_of(state))


def abstract_model(cfg: ModelConfig, *, out_first: bool = False):
    """Shapes without allocation (``out_first``: the sampler's decode view, see ``Decoder``).

    Returns (graphdef, abstract params: pure dict of ShapeDtypeStruct, axes: same tree of
    logical-axis tuples). Cached per (hashable, frozen) config; the dicts returned are fresh
    copies, so a caller may change them without touching the cache (the leaves are immutable).
    """
    graphdef, abstract, axes = _abstract_model_cached(cfg, bool(out_first))
    copy = lambda t: jax.tree.map(lambda x: x, t, is_leaf=lambda x: isinstance(x, tuple))
    return graphdef, copy(abstract), copy(axes)


def init_params(cfg: ModelConfig, key):
    """Pure-dict parameters (call under jit with out_shardings for a sharded init)."""
    return nnx.to_pure_dict(nnx.split(Decoder(cfg, nnx.Rngs(params=key)))[1])


def bind(graphdef, params) -> Decoder:
    """A Decoder view over a pure dict of (possibly traced) parameter arrays."""
    return nnx.merge(graphdef, params)


def _stack(leaves):
    # Host trees stay on the host (the importer places each shard from numpy; export writes numpy).
    return np.stack(leaves) if all(isinstance(x, np.ndarray) for x in leaves) else jnp.stack(leaves)


# The axis of the residual stream (d_model) in each parameter, by its name; biases have none.
_RESIDUAL_AXIS = {
    "embed": -1,
    "scale": -1,  # every RMSNorm
    "wq": -3,
    "wk": -3,
    "wv": -3,
    "wo": -1,
    "w_gate": -2,
    "w_up": -2,
    "w_down": -1,
    "lm_head": -2,
    "kernel": -2,  # reward and value heads
}


def permute_hidden_units(params: dict, key, *, residual: bool = True) -> dict:
    """The same function from other weights: every layer's MLP hidden units in another order (a key-drawn
    permutation per layer) and, with ``residual``, the residual stream's d_model coordinates in another order
    (one permutation shared by every parameter that reads or writes the stream: embeddings, norm scales, every
    projection, the heads). RMSNorm and attention are equivariant to both, so every output is unchanged up to
    float rounding of the reordered sums, while every weight matrix moves (only biases stay). Averaging such a
    copy with another member is the negative control of linear mode connectivity. Either layer layout; in-first
    kernels (the training layout). Works under jit.
    """

    def permute(mlp, k):
        f = mlp["w_up"].shape[-1]
        perm = jax.random.permutation(k, f)
        return {
            **mlp,
            "w_gate": jnp.take(mlp["w_gate"], perm, axis=-1),
            "w_up": jnp.take(mlp["w_up"], perm, axis=-1),
            "w_down": jnp.take(mlp["w_down"], perm, axis=-2),
        }

    mlp_key, residual_key = jax.random.split(key)
    if "layers" in params:  # [L, ...]: one permutation per layer
        n = params["layers"]["mlp"]["w_up"].shape[0]
        mlp = jax.vmap(permute)(params["layers"]["mlp"], jax.random.split(mlp_key, n))
        out = {**params, "layers": {**params["layers"], "mlp": mlp}}
    else:
        out = dict(params)
        names = sorted((k for k in params if k.startswith("layer_")), key=lambda k: int(k.split("_")[1]))
        for name, k in zip(names, jax.random.split(mlp_key, len(names))):
            out[name] = {**params[name], "mlp": permute(params[name]["mlp"], k)}
    if not residual:
        return out
    perm = jax.random.permutation(residual_key, params["embed"].shape[-1])

    def move(path, x):
        axis = _RESIDUAL_AXIS.get(getattr(path[-1], "key", None))
        return x if axis is None else jnp.take(x, perm, axis=axis)

    return jax.tree_util.tree_map_with_path(move, out)


def stack_layers(params: dict, n_layers: int) -> dict:
    """Per-layer params ('layer_0' ... 'layer_{L-1}') -> the ``scan_layers`` layout ('layers', [L, ...]).

    Works on pure dicts of numpy or jax arrays (numpy in, numpy out); other entries are kept as they are.
    """
    names = [f"layer_{i}" for i in range(n_layers)]
    if "layers" in params:
        raise ValueError("stack_layers: params are already in the stacked layout ('layers')")
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"stack_layers: expected per-layer params {names[0]}..{names[-1]}; missing {missing}")
    rest = {k: v for k, v in params.items() if k not in names}
    return {**rest, "layers": jax.tree.map(lambda *xs: _stack(xs), *(params[n] for n in names))}


def unstack_layers(params: dict) -> dict:
    """The ``scan_layers`` layout ('layers', [L, ...]) -> per-layer params ('layer_0' ... 'layer_{L-1}')."""
    if "layers" not in params:
        raise ValueError("unstack_layers: params have no stacked 'layers' entry")
    stacked = params["layers"]
    n_layers = jax.tree.leaves(stacked)[0].shape[0]
    rest = {k: v for k, v in params.items() if k != "layers"}
    return {**rest, **{f"layer_{i}": jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n_layers)}}


def kernels_out_first(params: dict) -> dict:
    """In-first params → the same model's params for ``abstract_model(cfg, out_first=True)``.

    Each projection kernel [*in, *out] becomes [*out, *in] (under 'layers', the ``scan_layers`` stack, its
    leading layer axis stays first); everything else is returned as it is.
    """

    def convert(path, x):
        keys = [getattr(k, "key", None) for k in path]
        if keys[-1] not in _KERNEL_INPUTS:
            return x
        lead, n_in = int(keys[0] == "layers"), _KERNEL_INPUTS[keys[-1]]
        axes = list(range(x.ndim))
        return jnp.transpose(x, axes[:lead] + axes[lead + n_in :] + axes[lead : lead + n_in])

    return jax.tree_util.tree_map_with_path(convert, params)


def param_count(params, *, exclude_embeddings: bool = False) -> int:
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    total = 0
    for path, x in flat:
        if exclude_embeddings and jax.tree_util.keystr(path) in ("['embed']", "['lm_head']"):
            continue
        total += int(x.size)
    return total


def flops_per_token(cfg: ModelConfig, seq_len: int, *, training: bool = True, lm_head: bool = True) -> float:
    """Model FLOPs per token (matmuls only; the standard 6N + attention estimate).

    Forward = 2 · (non-embedding matmul params + LM head) + 4 · L · T · d_attn (scores and
    values); training = 3 × forward. ``lm_head=False`` for reward models, which never compute
    the vocabulary logits (at SmolLM2-135M the head would add 27% to the count).
    """
    d, hd = cfg.d_model, cfg.dim_head
    attn = d * hd * (cfg.n_heads * 2 + cfg.n_kv_heads * 2)
    mlp = 3 * d * cfg.d_ff
    matmul_params = cfg.n_layers * (attn + mlp) + (d * cfg.vocab_size if lm_head else 0)
    forward = 2 * matmul_params + 4 * cfg.n_layers * seq_len * cfg.n_heads * hd
    return float(3 * forward if training else forward)
