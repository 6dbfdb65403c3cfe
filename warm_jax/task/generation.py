"""What the policy's texts look like and who judges them: one config shared by every stage that samples.

The `data` stage samples preference pairs from the pretrained policy, `bon` samples N continuations per prompt,
`reinforce` / `policy_ensemble` / `warp` sample while they train; all of them left-pad prompts to the same width,
sample the same number of new tokens and score "prompt response" with the same oracle, so that the reward models
see at training time the shapes they score later. Bound once in gin:

    GenerationConfig.max_prompt_len = 12
    GenerationConfig.max_new_tokens = 23
    GenerationConfig.oracle = 'vader'

Each stage's entry reads it (``GenerationConfig()``) and passes it down with its own config.
"""

from __future__ import annotations

import dataclasses

import gin


@gin.configurable
@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    max_prompt_len: int = 12  # tokens, BOS included; prompts are left-padded to this width
    max_new_tokens: int = 23  # sampled tokens per response (an EOS, when sampled, among them)
    oracle: str = "vader"  # a name of oracle.ORACLES: the gold reward that labels pairs and judges policies

    def __post_init__(self):
        for name in ("max_prompt_len", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GenerationConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.oracle, str) or not self.oracle:
            raise ValueError(f"GenerationConfig.oracle must name an oracle, got {self.oracle!r}")

    @property
    def max_response_len(self) -> int:
        """The response width of the `data` stage's pairs: the sampled tokens plus room for an EOS."""
        return self.max_new_tokens + 1
