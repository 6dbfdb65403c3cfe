"""Rewards of policy samples: reward models by name, and re-packing policy sequences for them.

A policy sequence is a left-padded prompt ``[B, P]`` followed by a response ``[B, N]`` (real
tokens first, then padding). Reward models read right-padded sequences with lengths (see
``warm_jax.rm_scoring``), so ``repack`` moves each row's real tokens to the front, on device.

Reward names (``load_reward``):

* ``warm``: the merged WARM model, ``WORKDIR/rm/warm/``;
* ``member_best``: the single member with the best selection accuracy (``average/selection.json``);
* ``ens``: the mean prediction of all members, scored in one vmapped pass over a stacked
  ``[M, ...]`` parameter tree (never a Python loop over members);
* ``ens_conservative``: ENS mean − λ·std over members (uncertainty-penalised ENS).

Rewards are normalised with the validation statistics that the ``average`` stage wrote,
``(r − mean) / std``, so that one KL coefficient means the same for every reward.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from warm_jax import rm_scoring
from warm_jax.stages import RunContext

REWARD_NAMES = ("warm", "member_best", "ens", "ens_conservative")
# Which average/selection.json reward_stats entry normalises each reward.
_STATS_KEY = {"warm": "warm", "member_best": "member_best", "ens": "ens", "ens_conservative": "ens"}


def repack(prompt_tokens, prompt_mask, response_tokens, response_mask, *, pad_id: int = 0):
    """Left-padded prompt + response → right-padded sequence and its length (jit-friendly).

    Args:
      prompt_tokens, prompt_mask: [B, P] left-padded prompts (mask 1 = real).
      response_tokens, response_mask: [B, N] responses, real tokens first (mask 1 = real).
    Returns:
      tokens [B, P + N] int32 (prompt then response, then ``pad_id``), lengths [B] int32.
    """
    b, p = prompt_tokens.shape
    seq = jnp.concatenate([prompt_tokens, response_tokens], axis=1).astype(jnp.int32)
    width = seq.shape[1]
    prompt_len = prompt_mask.astype(jnp.int32).sum(1)
    lengths = prompt_len + response_mask.astype(jnp.int32).sum(1)
    # Output slot j of row i reads input slot j + (P − prompt_len[i]): skips the left padding.
    src = jnp.arange(width)[None, :] + (p - prompt_len)[:, None]
    gathered = jnp.take_along_axis(seq, jnp.minimum(src, width - 1), axis=1)
    keep = jnp.arange(width)[None, :] < lengths[:, None]
    return jnp.where(keep, gathered, pad_id).astype(jnp.int32), lengths.astype(jnp.int32)


def ensemble_scores(stacked_params, graphdef, tokens, lengths):
    """Every member's reward in one vmapped pass. stacked_params: [M, ...] leaves → [M, B]."""
    return jax.vmap(lambda p: rm_scoring.score(p, graphdef, tokens, lengths))(stacked_params)


def apply_reward(rm_state, tokens, lengths, *, graphdef, ensemble_size: int | None):
    """Pure reward of right-padded sequences: tokens [B, T], lengths [B] → (reward [B], std [B]).

    ``rm_state`` = {"params", "shift", "scale", "lam"} (see ``RewardFn.state``); the constants
    are traced so rewards of one architecture share one compile. ``ensemble_size`` None: one
    model (std is zeros); otherwise params have a leading [M] axis and the reward is the member
    mean minus ``lam`` times the member std. ``(r − shift) / scale`` normalises the mean; the std
    is divided by ``scale``.
    """
    params = rm_state["params"]
    if ensemble_size is None:
        r = rm_scoring.score(params, graphdef, tokens, lengths)
        std = jnp.zeros_like(r)
    else:
        rs = ensemble_scores(params, graphdef, tokens, lengths)  # [M, B]
        r, std = rs.mean(0), rs.std(0)
    r, std = (r - rm_state["shift"]) / rm_state["scale"], std / rm_state["scale"]
    return r - rm_state["lam"] * std, std


@functools.lru_cache(maxsize=None)
def _compiled_apply(graphdef, ensemble_size: int | None):
    return jax.jit(functools.partial(apply_reward, graphdef=graphdef, ensemble_size=ensemble_size))


@dataclasses.dataclass
class RewardFn:
    """A reward by name: parameters on device plus the pure function that applies them.

    ``apply(self.state, tokens [B, T], lengths [B]) -> (reward [B], std [B])`` is traceable: use
    it inside a jitted step with ``state`` passed as an argument (not baked in as constants).
    Calling the object runs it jitted (one compile per architecture and ensemble size).
    """

    name: str
    graphdef: Any
    params: Any  # one tree, or [M, ...] stacked for ensembles
    ensemble_size: int | None
    conservative_lambda: float = 0.0
    shift: float = 0.0
    scale: float = 1.0

    @property
    def apply(self):
        return functools.partial(apply_reward, graphdef=self.graphdef, ensemble_size=self.ensemble_size)

    @property
    def kind(self) -> tuple:
        """Rewards with equal ``kind`` share compiled programs."""
        return (self.graphdef, self.ensemble_size)

    @property
    def state(self) -> dict:
        f32 = lambda x: jnp.asarray(x, jnp.float32)
        return {
            "params": self.params,
            "shift": f32(self.shift),
            "scale": f32(self.scale),
            "lam": f32(self.conservative_lambda),
        }

    def __call__(self, tokens, lengths):
        return _compiled_apply(self.graphdef, self.ensemble_size)(self.state, tokens, lengths)


repack_jit = jax.jit(repack, static_argnames=("pad_id",))


def load_reward(ctx: RunContext, name: str, *, conservative_lambda: float = 1.0, normalise: bool = True) -> RewardFn:
    """The reward called ``name`` (one of REWARD_NAMES) from the reward-model stages' outputs."""
    if name not in REWARD_NAMES:
        raise ValueError(f"unknown reward {name!r}; choose from {REWARD_NAMES}")
    wd = ctx.artefacts
    info = wd.read_selection()
    shift, scale = 0.0, 1.0
    if normalise:
        stats = info.get("reward_stats", {}).get(_STATS_KEY[name])
        if stats is None:
            raise KeyError(
                f"{wd.selection} has no reward_stats[{_STATS_KEY[name]!r}] to normalise "
                f"reward {name!r} (or set normalise_reward=False)"
            )
        shift, scale = float(stats["mean"]), max(float(stats["std"]), 1e-6)
    if name == "warm":
        _, graphdef, params, _ = wd.load_merged(ctx.mesh)
        return RewardFn(name, graphdef, params, None, shift=shift, scale=scale)
    if name == "member_best":
        _, graphdef, params, _ = wd.load_member(ctx.mesh, int(info["best_member"]))
        return RewardFn(name, graphdef, params, None, shift=shift, scale=scale)
    members = wd.load_members(ctx.mesh, info["members"])
    lam = conservative_lambda if name == "ens_conservative" else 0.0
    return RewardFn(
        name, members.graphdef, members.stacked, len(members.ids), conservative_lambda=lam, shift=shift, scale=scale
    )
