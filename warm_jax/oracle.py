"""Gold ("control") rewards: scorers that stand where the paper's control RM and AI labeller stand.

An oracle maps texts to one float per text. It labels preference pairs and judges policies, so it must be
independent of every model we train: the built-in one is VADER sentiment (the `nltk-vader-sentiment` package),
which nobody here wrote. Oracles are chosen by name from a small registry (`make_oracle("vader")`, or a gin
binding): "vader" scores the whole text, "vader_sentences" averages over sentences so that neutral padding lowers
the score. A user plugs in their own by subclassing `Oracle` under `@register_oracle("name")`, or by wrapping a
function in `CallableOracle`.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

ORACLES: dict[str, type[Oracle]] = {}

_O = TypeVar("_O", bound=type)


def register_oracle(name: str) -> Callable[[_O], _O]:
    """Class decorator: makes an `Oracle` subclass available to `make_oracle(name)`."""

    def register(cls: _O) -> _O:
        if not (isinstance(cls, type) and issubclass(cls, Oracle)):
            raise TypeError(f"register_oracle({name!r}): {cls!r} is not an Oracle subclass")
        if name in ORACLES and ORACLES[name] is not cls:
            raise ValueError(f"register_oracle: name {name!r} is already taken by {ORACLES[name].__qualname__}")
        ORACLES[name] = cls
        return cls

    return register


def make_oracle(name: str, /, **kwargs: Any) -> Oracle:
    """The oracle registered as `name`, built with `kwargs` (which may include a `name` of their own)."""
    if name not in ORACLES:
        raise ValueError(f"unknown oracle {name!r}; known oracles: {sorted(ORACLES)}")
    try:
        return ORACLES[name](**kwargs)
    except TypeError as e:
        raise TypeError(f"make_oracle({name!r}): bad arguments {sorted(kwargs)}: {e}") from e


class Oracle(abc.ABC):
    """Scores texts; higher is better. Subclasses implement `_score`; `score` checks inputs and outputs."""

    name: str = "oracle"

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """Scores of `texts` (N strings) as float32 `[N]`."""
        if isinstance(texts, str):
            raise TypeError(f"oracle {self.name!r}: score() takes a sequence of texts, got one str")
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"oracle {self.name!r}: text {i} is a {type(t).__name__}, not a str")
        scores = np.asarray(self._score(texts), dtype=np.float32)
        if scores.shape != (len(texts),):
            raise ValueError(
                f"oracle {self.name!r} returned scores of shape {scores.shape} for {len(texts)} texts "
                f"(expected ({len(texts)},))"
            )
        bad = np.flatnonzero(~np.isfinite(scores))
        if bad.size:
            raise ValueError(f"oracle {self.name!r} returned non-finite scores for texts {bad[:10].tolist()}")
        return scores

    __call__ = score

    @abc.abstractmethod
    def _score(self, texts: list[str]) -> np.ndarray | Sequence[float]:
        """One score per text, `[N]`."""


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@register_oracle("vader")
class VaderOracle(Oracle):
    """VADER's compound sentiment score in [-1, 1], from the `nltk-vader-sentiment` package.

    VADER's compound score squashes a sum of word valences, so it saturates towards +-1 on long texts: two
    continuations that are both clearly positive can tie at 0.99. `aggregate="sentences"` scores each sentence
    and averages, which keeps differences between long texts visible (useful as an RL reward).
    """

    name = "vader"

    def __init__(self, aggregate: str = "text"):
        """`aggregate`: "text" (VADER's score of the whole text) or "sentences" (mean over sentences)."""
        if aggregate not in ("text", "sentences"):
            raise ValueError(f"VaderOracle: aggregate must be 'text' or 'sentences', got {aggregate!r}")
        import vader  # nltk-vader-sentiment; imported here so the registry loads without it

        self._analyzer = vader.SentimentIntensityAnalyzer()
        self.aggregate = aggregate

    def _compound(self, text: str) -> float:
        return self._analyzer.polarity_scores(text)["compound"]

    def _score(self, texts: list[str]) -> np.ndarray:
        if self.aggregate == "text":
            return np.array([self._compound(t) for t in texts], dtype=np.float32)
        out = np.empty(len(texts), np.float32)
        for i, t in enumerate(texts):
            sentences = [s for s in _SENTENCE_END.split(t.strip()) if s]
            out[i] = np.mean([self._compound(s) for s in sentences]) if sentences else 0.0
        return out


@register_oracle("vader_sentences")
class VaderSentencesOracle(VaderOracle):
    """VADER averaged over sentences: a neutral sentence counts as 0, so padding a text with neutral filler lowers
    its score. A reward model that learnt "longer is better" from a length cue is then judged by an oracle that
    penalises the padding it rewards: the setting in which a single RM gets hacked and WARM's robustness shows.
    """

    name = "vader_sentences"

    def __init__(self):
        super().__init__(aggregate="sentences")


@register_oracle("callable")
class CallableOracle(Oracle):
    """Any function `fn(list[str]) -> [N] scores` as an oracle (an RM checkpoint's scorer, an API call, ...)."""

    def __init__(self, fn: Callable[[list[str]], Any], name: str = "callable"):
        if not callable(fn):
            raise TypeError(f"CallableOracle: fn must be callable, got {type(fn).__name__}")
        self._fn = fn
        self.name = name

    def _score(self, texts: list[str]) -> Any:
        return self._fn(texts)
