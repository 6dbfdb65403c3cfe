"""The built-in task's policy prompts and the text its oracle scores.

Policies (Best-of-N, REINFORCE, the policy ensemble, WARP) are sampled on review openings from the built-in grammar.
Each use draws its own named prompt set (``PROMPT_SETS``), distinct from the `data` stage's prompts, so policy
prompts are fresh draws; REINFORCE's training prompts exclude its held-out evaluation and win-rate prompts. The
oracle scores "prompt continuation", the text the `data` stage labels pairs by.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from warm_jax import seeds
from warm_jax.data import builtin_text
from warm_jax.data.tokenizers import Tokenizer, encode_prompts

# The named prompt sets; each draws from its own stream of the run's seed (``seeds``).
PROMPT_SETS = ("bon", "rl_train", "rl_eval", "rl_winrate")


@dataclasses.dataclass(frozen=True)
class PromptSet:
    """Held prompts: texts [R], tokens and mask [R, P] (left-padded, int32)."""

    texts: list[str]
    tokens: np.ndarray
    mask: np.ndarray

    def __len__(self) -> int:
        return len(self.texts)


def _check(name: str) -> str:
    if name not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {name!r}; choose from {sorted(PROMPT_SETS)}")
    return name


def prompt_set(tok: Tokenizer, name: str, n: int, seed: int, max_len: int, *, exclude=()) -> PromptSet:
    """``n`` built-in prompts of the set ``name`` for the run's ``seed``, none of them in ``exclude``."""
    _check(name)
    excluded = set(exclude)
    texts: list[str] = []
    draw = 0
    while len(texts) < n:
        batch = builtin_text.generate_prompts(2 * (n - len(texts)) + 16, seed=seeds.seed(seed, "prompts", name, draw))
        texts.extend(t for t in batch if t not in excluded)
        draw += 1
        if draw > 50:
            raise RuntimeError(f"could not draw {n} prompts outside the {len(excluded)} excluded ones")
    texts = texts[:n]
    tokens, mask = encode_prompts(texts, tok, max_len)
    return PromptSet(texts, tokens, mask)


def sampling_key(seed: int, name: str) -> jax.Array:
    """The key policies sample the prompt set ``name`` with (the same for every policy of a run)."""
    return seeds.key(seed, "sampling", _check(name))


def oracle_text(prompt: str, continuation: str) -> str:
    """What the oracle scores: the prompt, a space, the continuation."""
    return f"{prompt} {continuation}".strip()


def oracle_texts(tok: Tokenizer, prompts, responses) -> list[str]:
    """``oracle_text`` of each prompt and its decoded response. responses: [R, N] token ids."""
    return [oracle_text(p, tok.decode(r)) for p, r in zip(prompts, responses)]
