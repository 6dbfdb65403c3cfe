"""Reward-model maths for one member: scoring and the Bradley–Terry loss (pure functions).

Batches hold right-padded sequences (prompt + response) and their lengths; the reward is the
scalar head at the last real token (index length − 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from warm_jax.models import transformer as tr


def length_mask(lengths, seq_len: int):
    """[B] lengths → [B, T] int32 mask of real tokens (right padding)."""
    return (jnp.arange(seq_len)[None, :] < lengths[:, None]).astype(jnp.int32)


def score(params, graphdef, tokens, lengths, *, dropout_rate=0.0, key=None):
    """Rewards of sequences. tokens [B, T] int32, lengths [B] → [B] float32."""
    model = tr.bind(graphdef, params)
    mask = length_mask(lengths, tokens.shape[1])
    h, _ = model.hidden(tokens, mask, dropout_rate=dropout_rate, key=key, right_padded=True)
    return model.reward(h, mask)


def features(params, graphdef, tokens, lengths):
    """Pooled final hidden state at the last real token: [B, T] → [B, d] float32 (for probing)."""
    model = tr.bind(graphdef, params)
    mask = length_mask(lengths, tokens.shape[1])
    h, _ = model.hidden(tokens, mask, right_padded=True)
    return tr.pool_last(h, mask).astype(jnp.float32)


def pair_rewards(params, graphdef, batch, *, dropout_rate=0.0, key=None):
    """Rewards of chosen and rejected, scored in one forward of [2B, T]. Returns ([B], [B])."""
    tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]], axis=0)
    lengths = jnp.concatenate([batch["chosen_length"], batch["rejected_length"]], axis=0)
    r = score(params, graphdef, tokens, lengths, dropout_rate=dropout_rate, key=key)
    b = batch["chosen_tokens"].shape[0]
    return r[:b], r[b:]


def bradley_terry(r_chosen, r_rejected, *, margin=0.0, center_coef=0.0):
    """−log σ(r⁺ − r⁻ − margin) + center_coef · mean((r⁺ + r⁻)²): scalar loss and metrics.

    The centring term (Eisenstein et al., 2023) pins the reward's offset, which the BT loss
    leaves free, so members' rewards stay on one scale.
    """
    diff = r_chosen - r_rejected
    loss = -jnp.mean(jax.nn.log_sigmoid(diff - margin))
    if center_coef:
        loss = loss + center_coef * jnp.mean((r_chosen + r_rejected) ** 2)
    both = jnp.concatenate([r_chosen, r_rejected])
    return loss, {
        "accuracy": jnp.mean((diff > 0).astype(jnp.float32)),
        "reward_mean": jnp.mean(both),
        "reward_std": jnp.std(both),
    }
