"""Attention for every length and padding layout: the fused path pads to what the kernel takes, no query row
is ever empty, and everything stays finite in float32 and bfloat16 (forward and backward)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import helpers
from warm_jax.models import transformer as tr

H, K, D = 4, 2, 16


def _token_mask(layout: str, b: int, t: int) -> np.ndarray:
    """[B, T] int32 rows of real tokens (1) and padding (0) in one layout."""
    rng = np.random.default_rng(t)
    lengths = rng.integers(1, t + 1, b)
    lengths[0] = t
    cols = np.arange(t)[None]
    if layout == "right":
        return (cols < lengths[:, None]).astype(np.int32)
    if layout == "left":
        return (cols >= t - lengths[:, None]).astype(np.int32)
    # prompt left-padded, response right-padded (REINFORCE), and one row of padding only
    m = ((cols >= t // 3 - lengths[:, None] // 3) & (cols < t - (lengths[:, None] // 4))).astype(np.int32)
    m[-1] = 0
    return m


def _mask(token_mask, right_padded: bool) -> tr.AttentionMask:
    t = token_mask.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    dense = tr.visible_keys(causal, jnp.asarray(token_mask) > 0, jnp.eye(t, dtype=bool))
    return tr.AttentionMask(dense, jnp.asarray(token_mask.sum(1), jnp.int32) if right_padded else None)


def _qkv(b, t, dtype):
    ks = jax.random.split(jax.random.key(t), 3)
    return (
        jax.random.normal(ks[0], (b, t, H, D), dtype),
        jax.random.normal(ks[1], (b, t, K, D), dtype),
        jax.random.normal(ks[2], (b, t, K, D), dtype),
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("layout", ["right", "left", "mixed"])
@pytest.mark.parametrize("t", [1, 7, 63, 65])
def test_fused_path_pads_any_length_and_matches_xla_attention(t, layout, dtype):
    """The padding the fused kernel needs (to a multiple of 64, masked) changes no real query's output, and
    the forward and backward stay finite for every row, one of padding only included."""
    b = 4
    token_mask = _token_mask(layout, b, t)
    qkv = _qkv(b, t, dtype)
    real = token_mask[:, :, None, None].astype(np.float32)
    masks = {"dense": _mask(token_mask, False)}
    if layout == "right":
        masks["lengths"] = _mask(token_mask, True)
    ref = np.asarray(tr.attend(*qkv, masks["dense"], "xla"), np.float32)
    for name, mask in masks.items():

        def loss(q, k, v, mask=mask):
            out = tr.fused_attention(q, k, v, mask, "xla")
            return jnp.sum(out.astype(jnp.float32) * real), out

        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(*qkv)
        assert out.shape == qkv[0].shape
        assert np.isfinite(np.asarray(out, np.float32)).all(), name
        assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in grads), name
        rel = 1e-5 if dtype == jnp.float32 else 2e-2
        helpers.assert_close_to_scale(np.asarray(out, np.float32) * real, ref * real, rel=rel, err_msg=name)


def test_no_query_row_is_empty_and_real_rows_are_unchanged():
    """Every query of every layout sees ≥ 1 key; the own slot that guarantees it is given only to queries that
    would see nothing, and changes no real token's attention output, bit for bit."""
    for layout in ("right", "left", "mixed"):
        token_mask = _token_mask(layout, 4, 9)
        dense = np.asarray(_mask(token_mask, False).dense)
        assert dense.any(axis=-1).all(), layout
        causal = np.tril(np.ones((9, 9), bool))
        without = causal[None] & (token_mask[:, None, :] > 0)
        real = token_mask > 0
        np.testing.assert_array_equal(dense[real], without[real])
        if layout == "right":  # a right-padded pad query keeps the keys before it, as the length mask has it
            np.testing.assert_array_equal(dense, without)
        qkv = _qkv(4, 9, jnp.float32)
        a = np.asarray(tr.attend(*qkv, tr.AttentionMask(jnp.asarray(dense)), "xla"))
        b = np.asarray(tr.attend(*qkv, tr.AttentionMask(jnp.asarray(without)), "xla"))
        np.testing.assert_array_equal(a[real], b[real])


@pytest.mark.parametrize("attention", ["xla", "auto"])
def test_decoder_gradients_are_finite_in_bfloat16_with_padding_only_rows(attention):
    """A bfloat16 decoder over left-padded, right-padded and all-padding rows of odd length: logits,
    reward and every parameter's gradient are finite."""
    cfg = tr.ModelConfig(
        vocab_size=64, d_model=32, n_layers=2, n_heads=H, n_kv_heads=K, d_ff=64, max_len=64, dtype="bfloat16"
    )
    cfg = dataclasses.replace(cfg, attention=attention)
    graphdef = tr.abstract_model(cfg)[0]
    params = tr.init_params(cfg, jax.random.key(0))
    token_mask = jnp.asarray(_token_mask("mixed", 4, 63))
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 64, (4, 63)), jnp.int32) * token_mask

    def loss(p):
        m = tr.bind(graphdef, p)
        h, _ = m.hidden(tokens, token_mask)
        logp = jax.nn.log_softmax(m.logits(h), axis=-1)
        return jnp.sum(logp[..., 5] * token_mask) + jnp.sum(m.reward(h, token_mask))

    value, grads = jax.value_and_grad(loss)(params)
    assert np.isfinite(float(value))
    assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in jax.tree.leaves(grads))


def test_unsupported_head_dim_falls_back_to_xla_with_one_log_line(caplog):
    q = jnp.ones((1, 5, 2, 12), jnp.float32)  # head dim 12: not a multiple of 8
    mask = _mask(np.ones((1, 5), np.int32), False)
    with caplog.at_level("WARNING"):
        out = tr.attend(q, q[:, :, :1], q[:, :, :1], mask, "cudnn")  # would raise if it reached cuDNN on a CPU
    assert out.shape == q.shape
    assert "head dim 12" in caplog.text and "XLA attention" in caplog.text
