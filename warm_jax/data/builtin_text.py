"""The built-in corpus: short review-like English text from a seeded grammar over real words.

Each document has a latent sentiment s in [-1, 1] and a topic (movie, restaurant, hotel, product). Every sentence
draws its polarity from s (positive with probability sigmoid(consistency * s)) and the strength of its words from
|s|, so word choice follows the latent across the whole review and a language model that predicts the text well
has to carry the sentiment in its features. Sentiment words are common English words whose valence is read from
the VADER lexicon inside the `nltk-vader-sentiment` package (the same lexicon the oracle scores with); the
vocabulary lists below say only which part of speech and topic a word fits. Negation ("not great", "never
boring", "i did not like") sometimes expresses a polarity with a word of the opposite one, and contrast sentences
("the food was awful, but the staff was lovely") mix both, so the label is not a bag of words.

The first sentence of every document is an opening such as "the pasta at this place was ..." and
`generate_prompts` returns exactly such openings, cut before the first sentiment word, for a policy to continue.

Why it looks like this: sentiment words drawn independently of context teach a pretrained LM nothing about
valence (a linear probe on its features stays at chance), and then the shared pretrained init, the point of WARM,
is irrelevant; words tied to a latent sentiment give the LM something to carry.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence

import gin
import numpy as np

from warm_jax.data.tokenizers import PUNCTUATION, join_words

# ------------------------------------------------------------------------------------------------ word lists
# Each list is ordered roughly from most to least common in reviews; `TextConfig.words_per_list` keeps a prefix.
# Valences are not written here: they come from the VADER lexicon at run time, and a word whose lexicon valence
# has the wrong sign (or is missing) is an error in these lists.

_GENERAL_POS = """good great excellent amazing wonderful awesome fantastic perfect nice lovely brilliant superb
terrific fabulous outstanding impressive enjoyable pleasant remarkable satisfying delightful splendid marvelous
ideal super neat magnificent glorious worthwhile special flawless pleasing cool"""
_GENERAL_NEG = """bad terrible awful horrible poor disappointing lousy crappy pathetic dreadful unacceptable weak
useless lame inferior inadequate horrendous horrid dismal unpleasant annoying frustrating painful miserable sad
worthless irritating upsetting flawed disastrous horrific shocking unfortunate regrettable shameful sucky"""

_SERVICE_PERSON_POS = """friendly helpful nice kind lovely welcoming courteous generous cheerful sweet honest
charming gentle smart efficient pleasant wonderful respectful great"""
_SERVICE_PERSON_NEG = """rude unfriendly lazy incompetent careless hostile dishonest obnoxious arrogant nasty
annoying useless impatient cruel stupid terrible awful horrible"""

# Verbs in the past tense ("i loved the pasta") and, for negated sentences, in the base form ("i did not hate the
# pasta"): both forms of a polarity list the same verbs in the same order.
_VERB_PAST_POS = "loved liked enjoyed adored appreciated admired"
_VERB_BASE_POS = "love like enjoy adore appreciate admire"
_VERB_PAST_NEG = "hated disliked despised loathed regretted"
_VERB_BASE_NEG = "hate dislike despise loathe regret"

# How the reviewer felt: "i was thrilled", "we were not disappointed".
_FEEL_POS = "happy impressed pleased satisfied glad delighted thrilled amazed grateful thankful excited relieved"
_FEEL_NEG = """disappointed upset unhappy annoyed angry frustrated sad disgusted dissatisfied furious bored shocked
embarrassed horrified miserable"""

# Nouns after "was a" / "is a".
_NOUN_POS = "joy delight pleasure treat success triumph masterpiece winner blessing"
_NOUN_NEG = "disaster mess failure disappointment waste scam catastrophe tragedy problem flop fraud"

# VADER boosters: they scale the next sentiment word, and are chosen by the document's strength |s|.
INTENSIFIERS = ("very", "really", "extremely", "so", "quite", "totally", "absolutely", "incredibly")
DAMPENERS = ("somewhat", "slightly")
NEGATORS = ("not", "not", "not", "never")  # repeated entries are the draw weights


@dataclasses.dataclass(frozen=True)
class _Topic:
    """Words of one topic. `prep` joins an aspect to the thing ("the plot of this movie")."""

    things: str
    prep: str
    visit: str  # past-tense verb of a neutral opening: "i booked this hotel and ..."
    aspects: str
    persons: str
    adj_pos: str
    adj_neg: str
    person_pos: str
    person_neg: str
    fillers: tuple[str, ...]  # neutral sentences; {slots} are filled from _NEUTRAL_SLOTS


_TOPICS: dict[str, _Topic] = {
    "movie": _Topic(
        things="movie film",
        prep="of",
        visit="watched",
        aspects="plot acting ending soundtrack dialogue script story music pacing effects scenes visuals",
        persons="cast director actors",
        adj_pos="""entertaining fun funny hilarious exciting interesting engaging clever beautiful fascinating thrilling
            inspiring heartwarming powerful stunning romantic intelligent""",
        adj_neg="""boring dull stupid dumb ridiculous confusing lame depressing pathetic weak embarrassing
            flawed""",
        person_pos="brilliant talented convincing funny charming impressive creative clever",
        person_neg="terrible awful weak lame annoying boring stupid pathetic",
        fillers=(
            "we watched it on a {day} night.",
            "i saw it with my {companion}.",
            "it runs about {number} hours.",
            "the story takes place in a small town.",
        ),
    ),
    "restaurant": _Topic(
        things="restaurant place diner cafe bistro",
        prep="at",
        visit="tried",
        aspects="food pasta pizza soup dessert steak salad coffee bread burger fries menu portions",
        persons="staff waiter waitress chef server owner",
        adj_pos="delicious yummy fresh sweet rich scrumptious heavenly divine",
        adj_neg="disgusting gross nasty rotten stinky sickening",
        person_pos=_SERVICE_PERSON_POS,
        person_neg=_SERVICE_PERSON_NEG,
        fillers=(
            "we came here for {meal}.",
            "i ordered the {aspect}.",
            "we sat near the window.",
            "i came here with my {companion}.",
        ),
    ),
    "hotel": _Topic(
        things="hotel resort inn motel",
        prep="at",
        visit="booked",
        aspects="room bed bathroom breakfast pool view location shower wifi balcony pillows parking",
        persons="staff receptionist manager concierge housekeeper",
        adj_pos="comfortable clean peaceful relaxing gorgeous beautiful calm safe",
        adj_neg="dirty uncomfortable messy stinky dreary depressing gross ugly",
        person_pos=_SERVICE_PERSON_POS,
        person_neg=_SERVICE_PERSON_NEG,
        fillers=(
            "we stayed for {number} nights.",
            "our room was on the {ordinal} floor.",
            "we checked in on a {day}.",
            "i stayed here with my {companion}.",
        ),
    ),
    "product": _Topic(
        things="product phone laptop blender kettle camera vacuum speaker",
        prep="of",
        visit="bought",
        aspects="battery screen design quality sound packaging charger buttons instructions cable display",
        persons="seller vendor manufacturer",
        adj_pos="easy efficient strong attractive elegant valuable smart powerful bright useful flawless",
        adj_neg="broken defective faulty fake problematic frustrating worthless ugly",
        person_pos=_SERVICE_PERSON_POS,
        person_neg=_SERVICE_PERSON_NEG,
        fillers=(
            "i bought it for my {companion}.",
            "it arrived on a {day}.",
            "i have used it for {number} weeks.",
        ),
    ),
}

_NEUTRAL_SLOTS: dict[str, tuple[str, ...]] = {
    "day": ("monday", "friday", "saturday", "sunday"),
    "companion": ("family", "parents", "sister", "brother", "husband", "wife", "kids"),
    "meal": ("dinner", "lunch", "breakfast", "brunch"),
    "number": ("two", "three", "four", "five"),
    "ordinal": ("second", "third", "fourth"),
}

# Openings: the prompt is everything before the predicate slot that ends the sentence. "p" marks an aspect
# predicate, "pp" a person predicate (the subject is then a person noun).
_OPENERS: tuple[tuple[str, str], ...] = (
    ("the {aspect} {prep} this {thing} was", "p"),
    ("the {aspect} was", "p"),
    ("i {visit} this {thing} and the {aspect} was", "p"),
    ("overall , the {aspect} was", "p"),
    ("i thought the {aspect} was", "p"),
    ("this {thing} is", "p"),
    ("the {person} {prep} this {thing} was", "pp"),
    ("the {person} was", "pp"),
)

# Body sentences, as (template, draw weight). Slots whose words carry the sentence's polarity:
#   {pred}  aspect predicate: [negator] [booster] adjective      {ppred}  the same for a person
#   {opp}   aspect predicate of the OPPOSITE polarity (contrast)   {adj} / {padj}  attributive adjective
#   {vpast} "[booster] loved" or "did not hate"                    {vnoun} "a joy" or "not a disaster"
#   {feel}  how the reviewer felt: "[negator] [booster] thrilled"  {we}/{was} "i was" or "we were"
#   {end}   "." or, more often in strong documents, "!"
_BODY: tuple[tuple[str, float], ...] = (
    ("the {aspect} was {pred}{end}", 4.0),
    ("the {person} was {ppred}{end}", 2.0),
    ("{we} {was} {feel}{end}", 1.0),
    ("i {vpast} the {aspect}{end}", 2.0),
    ("the {aspect} was {vnoun}{end}", 1.0),
    ("this {thing} is {vnoun}{end}", 1.0),
    ("{adj} {aspect} and {padj} {person}{end}", 1.5),
    ("what a {adj} {thing} !", 1.0),
    ("the {aspect} was {opp} , but the {aspect2} was {pred}{end}", 1.0),
)

# Last sentences that sum a review up, by the polarity they express. Their sentiment words are fixed here.
_RECOMMEND_BOOSTERS = ("highly", "really", "totally", "absolutely")
_CLOSER_SENTIMENT_WORDS = ("recommend", "definitely", "avoid")
_CLOSERS_POS = (
    "i would {booster} recommend this {thing}{end}",
    "i will definitely come back{end}",
    "overall , a {adj} {thing}{end}",
)
_CLOSERS_NEG = (
    "i would {negator} recommend this {thing}{end}",
    "avoid this {thing}{end}",
    "overall , a {adj} {thing}{end}",
)

_QUESTION = "what can i say ?"  # a neutral sentence of every topic

# Aspect and person nouns that take "were" rather than "was".
_PLURAL = frozenset("effects scenes visuals actors fries portions pillows buttons instructions".split())

# Punctuation the grammar writes (a subset of what the word tokenizer splits off).
_PUNCT = (".", ",", "!", "?")

# Words that only code (not a template string) emits.
_CODE_WORDS = (
    "did",
    "a",
    "an",
    "i",
    "we",
    "was",
    "were",
    *INTENSIFIERS,
    *DAMPENERS,
    *NEGATORS,
    *_RECOMMEND_BOOSTERS,
    *_PUNCT,
)


# ------------------------------------------------------------------------------------------------ config


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Knobs of the built-in grammar. Defaults give a ~400-token vocabulary (~230 sentiment words) and 2-5 sentence reviews.

    Attributes:
      topics: which topics documents and prompts are drawn from (uniformly).
      min_sentences, max_sentences: sentence count per document, opening included (uniform in the range).
      max_tokens: documents longer than this (words plus punctuation) lose trailing sentences, down to
        min_sentences; keeps them within a tiny model's context.
      consistency: gain of P(sentence positive) = sigmoid(consistency * s); higher makes sentences agree more.
      strength_width: how tightly a word's valence rank follows |s| (0 = only words of matching strength).
      negation_rate: probability that a predicate is a negated word of the opposite polarity ("not bad").
      intensifier_rate: probability of a booster before an adjective, times |s|.
      dampener_rate: probability of "somewhat"/"slightly" before an adjective, times 1 - |s|.
      exclaim_rate: probability that a sentence ends with "!", times |s|.
      neutral_rate: probability that a body sentence is a neutral filler.
      closer_rate: probability that the last sentence is a closing verdict.
      min_abs_valence: sentiment words whose VADER valence is weaker than this are left out.
      words_per_list: keep only the first (most common) words of each sentiment word list; None keeps all.
    """

    topics: tuple[str, ...] = ("movie", "restaurant", "hotel", "product")
    min_sentences: int = 2
    max_sentences: int = 5
    max_tokens: int = 40
    consistency: float = 6.0
    strength_width: float = 0.35
    negation_rate: float = 0.15
    intensifier_rate: float = 0.5
    dampener_rate: float = 0.3
    exclaim_rate: float = 0.5
    neutral_rate: float = 0.15
    closer_rate: float = 0.4
    min_abs_valence: float = 1.0
    words_per_list: int | None = None

    def __post_init__(self):
        unknown = [t for t in self.topics if t not in _TOPICS]
        if not self.topics or unknown:
            raise ValueError(f"TextConfig.topics: unknown {unknown or 'empty'}; known topics: {sorted(_TOPICS)}")
        if not 2 <= self.min_sentences <= self.max_sentences:
            raise ValueError(
                f"TextConfig.min_sentences/max_sentences: need 2 <= min <= max, got "
                f"{self.min_sentences}, {self.max_sentences}"
            )
        for name in (
            "negation_rate",
            "intensifier_rate",
            "dampener_rate",
            "exclaim_rate",
            "neutral_rate",
            "closer_rate",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"TextConfig.{name} must be in [0, 1], got {value}")
        if self.max_tokens < 16:
            raise ValueError(f"TextConfig.max_tokens must be >= 16 (two sentences), got {self.max_tokens}")
        if self.consistency < 0 or self.strength_width <= 0:
            raise ValueError(
                f"TextConfig.consistency must be >= 0 and strength_width > 0, got "
                f"{self.consistency}, {self.strength_width}"
            )
        if self.words_per_list is not None and self.words_per_list < 1:
            raise ValueError(f"TextConfig.words_per_list must be >= 1 or None, got {self.words_per_list}")


# ------------------------------------------------------------------------------------------------ lexicon


@functools.cache
def vader_lexicon() -> Mapping[str, float]:
    """The word -> valence table VADER scores with (the package's lexicon with its documented corrections)."""
    import vader  # nltk-vader-sentiment

    return vader.SentimentIntensityAnalyzer().lexicon


_N_BINS = 11  # |s| is quantised to this many strength levels to precompute word-choice weights


class _WordList:
    """Sentiment words of one slot and polarity, with cumulative choice weights per strength bin."""

    def __init__(self, name: str, words: str, sign: int, cfg: TextConfig):
        lexicon = vader_lexicon()
        kept: list[tuple[str, float]] = []
        for w in words.split():
            if w not in lexicon:
                raise ValueError(f"built-in word list {name!r}: {w!r} is not in the VADER lexicon")
            v = lexicon[w]
            if v * sign <= 0:
                raise ValueError(f"built-in word list {name!r}: {w!r} has VADER valence {v}, not of sign {sign}")
            if abs(v) >= cfg.min_abs_valence:
                kept.append((w, abs(v)))
        kept = kept[: cfg.words_per_list]
        if not kept:
            raise ValueError(
                f"built-in word list {name!r} is empty with min_abs_valence={cfg.min_abs_valence}, "
                f"words_per_list={cfg.words_per_list}"
            )
        self.words = [w for w, _ in kept]
        # Strength of a word = its valence rank within the list, in [0, 1]; ranks rather than raw valences so
        # that every list spans the whole range whatever its spread of valences.
        order = np.argsort([v for _, v in kept], kind="stable")
        rank = np.empty(len(kept))
        rank[order] = np.linspace(0.0, 1.0, len(kept)) if len(kept) > 1 else 0.5
        levels = np.linspace(0.0, 1.0, _N_BINS)[:, None]
        weights = np.exp(-0.5 * ((rank[None, :] - levels) / cfg.strength_width) ** 2)
        self.cum = np.cumsum(weights / weights.sum(axis=1, keepdims=True), axis=1)  # [_N_BINS, len(words)]

    def pick(self, u: float, strength: float) -> str:
        row = self.cum[int(round(strength * (_N_BINS - 1)))]
        return self.words[min(int(np.searchsorted(row, u, side="right")), len(self.words) - 1)]


@dataclasses.dataclass
class _Lists:
    """The negative and positive word lists of one slot."""

    neg: _WordList
    pos: _WordList

    def get(self, positive: bool) -> _WordList:
        return self.pos if positive else self.neg


class _Grammar:
    """All word lists of one TextConfig, built once (see `_grammar`)."""

    def __init__(self, cfg: TextConfig):
        def pair(name: str, pos: str, neg: str) -> _Lists:
            return _Lists(neg=_WordList(name + "/neg", neg, -1, cfg), pos=_WordList(name + "/pos", pos, 1, cfg))

        self.cfg = cfg
        self.general = pair("general", _GENERAL_POS, _GENERAL_NEG)
        self.noun = pair("noun", _NOUN_POS, _NOUN_NEG)
        self.feel = pair("feel", _FEEL_POS, _FEEL_NEG)
        self.verb_past = pair("verb_past", _VERB_PAST_POS, _VERB_PAST_NEG)
        self.verb_base = pair("verb_base", _VERB_BASE_POS, _VERB_BASE_NEG)
        self.topic_adj = {t: pair(t + "/adj", _TOPICS[t].adj_pos, _TOPICS[t].adj_neg) for t in cfg.topics}
        self.person_adj = {t: pair(t + "/person", _TOPICS[t].person_pos, _TOPICS[t].person_neg) for t in cfg.topics}
        self.topics = [(t, _TOPICS[t]) for t in cfg.topics]
        self.body_cum = np.cumsum([w for _, w in _BODY]) / sum(w for _, w in _BODY)

    def sentiment_words(self) -> set[str]:
        """Every word of the grammar that carries VADER valence (all others score 0 alone)."""
        words: set[str] = set(_CLOSER_SENTIMENT_WORDS)
        lists = [
            self.general,
            self.noun,
            self.feel,
            self.verb_past,
            self.verb_base,
            *self.topic_adj.values(),
            *self.person_adj.values(),
        ]
        for pair in lists:
            words.update(pair.pos.words, pair.neg.words)
        return words

    def vocabulary(self) -> list[str]:
        words: set[str] = set(_CODE_WORDS) | self.sentiment_words()
        templates = [o for o, _ in _OPENERS] + [b for b, _ in _BODY] + [*_CLOSERS_POS, *_CLOSERS_NEG, _QUESTION]
        for _, topic in self.topics:
            for field in (topic.things, topic.prep, topic.visit, topic.aspects, topic.persons):
                words.update(field.split())
            templates.extend(topic.fillers)
        for values in _NEUTRAL_SLOTS.values():
            words.update(values)
        for template in templates:
            words.update(w for w in _split_template(template) if not w.startswith("{"))
        return sorted(words)


@functools.lru_cache(maxsize=8)
def _grammar(cfg: TextConfig) -> _Grammar:
    return _Grammar(cfg)


@functools.cache
def _split_template(template: str) -> tuple[str, ...]:
    # "{end}" and "." are glued to the preceding word in templates for readability; split them off.
    out: list[str] = []
    for w in template.split():
        while w.endswith("{end}") and w != "{end}":
            out.append(w[: -len("{end}")])
            w = "{end}"
        if len(w) > 1 and w[-1] in PUNCTUATION:
            out.extend((w[:-1], w[-1]))
        else:
            out.append(w)
    return tuple(out)


def vocabulary(cfg: TextConfig | None = None) -> list[str]:
    """Every token the grammar can emit under `cfg` (default: the gin-bound TextConfig), sorted."""
    return _grammar(cfg or TextConfig()).vocabulary()


def sentiment_words(cfg: TextConfig | None = None) -> list[str]:
    """The tokens of `vocabulary(cfg)` that carry VADER valence, sorted; every other token is neutral to VADER."""
    return sorted(_grammar(cfg or TextConfig()).sentiment_words())


# ------------------------------------------------------------------------------------------------ sampling


class _Draws:
    """Uniform draws from a numpy Generator, fetched in blocks (a scalar call per draw would dominate)."""

    def __init__(self, seed: int):
        self._rng = np.random.default_rng(seed)
        self._buf = np.empty(0)
        self._i = 0

    def u(self) -> float:
        if self._i == len(self._buf):
            self._buf = self._rng.random(4096)
            self._i = 0
        self._i += 1
        return float(self._buf[self._i - 1])

    def choice(self, options: Sequence[str]) -> str:
        return options[int(self.u() * len(options))]

    def bernoulli(self, p: float) -> bool:
        return self.u() < p


class _Writer:
    """Writes one document (or prompt) of a given topic and latent sentiment."""

    def __init__(self, g: _Grammar, draws: _Draws, topic: str, s: float):
        self.g, self.d, self.topic_name = g, draws, topic
        self.topic = _TOPICS[topic]
        self.strength = abs(s)
        self.p_pos = 1.0 / (1.0 + math.exp(-g.cfg.consistency * s))
        self.aspects = self.topic.aspects.split()
        self.persons = self.topic.persons.split()
        self.things = self.topic.things.split()

    # -- sentences

    def opener(self) -> tuple[list[str], list[str]]:
        """(prompt tokens, continuation tokens) of the first sentence."""
        template, kind = _OPENERS[int(self.d.u() * len(_OPENERS))]
        prompt = self.fill(template, positive=True)  # openings carry no sentiment words
        positive = self.d.bernoulli(self.p_pos)
        rest = self.predicate(positive, kind="person" if kind == "pp" else "aspect") + [self.end()]
        return prompt, rest

    def body(self) -> list[str]:
        cfg = self.g.cfg
        if self.d.bernoulli(cfg.neutral_rate):
            fillers = self.topic.fillers
            pick = int(self.d.u() * (len(fillers) + 1))
            return self.fill(fillers[pick] if pick < len(fillers) else _QUESTION, positive=True)
        i = int(np.searchsorted(self.g.body_cum, self.d.u(), side="right"))
        return self.fill(_BODY[min(i, len(_BODY) - 1)][0], positive=self.d.bernoulli(self.p_pos))

    def closer(self) -> list[str]:
        positive = self.d.bernoulli(self.p_pos)
        return self.fill(self.d.choice(_CLOSERS_POS if positive else _CLOSERS_NEG), positive)

    def fill(self, template: str, positive: bool) -> list[str]:
        out: list[str] = []
        aspect = subject = None
        for w in _split_template(template):
            if not w.startswith("{"):
                # Templates say "was"; the verb agrees with the last aspect or person named before it.
                out.append("were" if w == "was" and subject in _PLURAL else w)
                continue
            slot = w[1:-1]
            if slot == "aspect":
                aspect = subject = self.d.choice(self.aspects)
                out.append(aspect)
            elif slot == "aspect2":
                # A contrast compares two different aspects.
                subject = self.d.choice(self.aspects)
                while subject == aspect:
                    subject = self.d.choice(self.aspects)
                out.append(subject)
            elif slot == "person":
                subject = self.d.choice(self.persons)
                out.append(subject)
            elif slot == "thing":
                out.append(self.d.choice(self.things))
            elif slot in ("prep", "visit"):
                out.append(getattr(self.topic, slot))
            elif slot in _NEUTRAL_SLOTS:
                out.append(self.d.choice(_NEUTRAL_SLOTS[slot]))
            elif slot == "pred":
                out.extend(self.predicate(positive))
            elif slot == "opp":
                out.extend(self.predicate(not positive))
            elif slot == "ppred":
                out.extend(self.predicate(positive, kind="person"))
            elif slot == "feel":
                out.extend(self.predicate(positive, kind="feel"))
            elif slot == "we":
                subject = self.d.choice(("i", "we"))
                out.append(subject)
            elif slot == "was":
                out.append("were" if subject == "we" else "was")
            elif slot == "adj":
                out.extend(self.modifier() + [self.adjective(positive)])
            elif slot == "padj":
                out.append(self.adjective(positive, kind="person"))
            elif slot == "vpast":
                out.extend(self.verb(positive))
            elif slot == "vnoun":
                out.extend(self.noun_phrase(positive))
            elif slot == "booster":
                if self.d.bernoulli(0.7):
                    out.append(self.d.choice(_RECOMMEND_BOOSTERS))
            elif slot == "negator":
                out.append(self.d.choice(("not", "never")))
            elif slot == "end":
                out.append(self.end())
            else:  # a template typo; caught by the vocabulary test before it reaches a user
                raise KeyError(f"built-in grammar: unknown slot {w} in template {template!r}")
        return out

    # -- phrases

    def predicate(self, positive: bool, kind: str = "aspect") -> list[str]:
        """'[negator] [booster] adjective' expressing `positive`; negated ones use an opposite-polarity word."""
        if self.d.bernoulli(self.g.cfg.negation_rate):
            negator = self.d.choice(NEGATORS)
            return [negator, *self.modifier(), self.adjective(not positive, kind)]
        return [*self.modifier(), self.adjective(positive, kind)]

    def modifier(self) -> list[str]:
        cfg = self.g.cfg
        u = self.d.u()
        if u < cfg.intensifier_rate * self.strength:
            return [self.d.choice(INTENSIFIERS)]
        if u > 1.0 - cfg.dampener_rate * (1.0 - self.strength):
            return [self.d.choice(DAMPENERS)]
        return []

    def adjective(self, positive: bool, kind: str = "aspect") -> str:
        """A sentiment adjective for an aspect ('delicious'), a person ('rude') or a feeling ('thrilled')."""
        if kind == "person":
            lists = self.g.person_adj[self.topic_name]
        elif kind == "feel":
            lists = self.g.feel
        else:
            # Half topic-specific ("delicious", "boring"), half general ("great", "awful").
            lists = self.g.topic_adj[self.topic_name] if self.d.bernoulli(0.5) else self.g.general
        return lists.get(positive).pick(self.d.u(), self.strength)

    def verb(self, positive: bool) -> list[str]:
        if self.d.bernoulli(self.g.cfg.negation_rate):
            return ["did", "not", self.g.verb_base.get(not positive).pick(self.d.u(), self.strength)]
        return [*self.verb_booster(), self.g.verb_past.get(positive).pick(self.d.u(), self.strength)]

    def verb_booster(self) -> list[str]:
        if self.d.bernoulli(self.g.cfg.intensifier_rate * self.strength):
            return [self.d.choice(("really", "totally", "absolutely"))]
        return []

    def noun_phrase(self, positive: bool) -> list[str]:
        if self.d.bernoulli(self.g.cfg.negation_rate):
            return ["not", "a", self.g.noun.get(not positive).pick(self.d.u(), self.strength)]
        return ["a", self.g.noun.get(positive).pick(self.d.u(), self.strength)]

    def end(self) -> str:
        return "!" if self.d.bernoulli(self.g.cfg.exclaim_rate * self.strength) else "."

    # -- whole texts

    def document(self) -> list[str]:
        cfg = self.g.cfg
        n = cfg.min_sentences + int(self.d.u() * (cfg.max_sentences - cfg.min_sentences + 1))
        prompt, rest = self.opener()
        sentences = [prompt + rest]
        for k in range(1, n):
            last = k == n - 1
            sentences.append(self.closer() if last and self.d.bernoulli(cfg.closer_rate) else self.body())
        while len(sentences) > cfg.min_sentences and sum(map(len, sentences)) > cfg.max_tokens:
            sentences.pop(-2)  # keep the opening and the last sentence (often a closing verdict)
        return _articles([w for sentence in sentences for w in sentence])


def _articles(words: list[str]) -> list[str]:
    """'a' -> 'an' before a vowel sound ("an excellent inn", but "a useless cable")."""
    for i in range(len(words) - 1):
        nxt = words[i + 1]
        if words[i] == "a" and (nxt[0] in "aeio" or (nxt[0] == "u" and not nxt.startswith(("use", "uni")))):
            words[i] = "an"
    return words


@dataclasses.dataclass(frozen=True)
class Reviews:
    """Generated documents with their latents.

    Attributes:
      texts: N review strings.
      sentiment: [N] float32 latent sentiment in [-1, 1] that the word choice followed.
      topic: [N] int32 index into `topics`.
      topics: topic names.
    """

    texts: list[str]
    sentiment: np.ndarray
    topic: np.ndarray
    topics: tuple[str, ...]


def generate_reviews(n: int, seed: int, cfg: TextConfig | None = None) -> Reviews:
    """`n` reviews with their latent sentiment and topic; deterministic in (n, seed, cfg).

    Documents are drawn one after another from one stream, so the first k of `generate_reviews(n, seed)` are
    `generate_reviews(k, seed)`.
    """
    if n < 0:
        raise ValueError(f"generate_reviews: n must be >= 0, got {n}")
    cfg = cfg or TextConfig()
    g = _grammar(cfg)
    draws = _Draws(seed)
    texts: list[str] = []
    sentiment = np.empty(n, np.float32)
    topic = np.empty(n, np.int32)
    for i in range(n):
        t = int(draws.u() * len(g.topics))
        s = 2.0 * draws.u() - 1.0
        texts.append(join_words(_Writer(g, draws, g.topics[t][0], s).document()))
        sentiment[i], topic[i] = s, t
    return Reviews(texts=texts, sentiment=sentiment, topic=topic, topics=tuple(cfg.topics))


def generate_documents(n: int, seed: int, cfg: TextConfig | None = None) -> list[str]:
    """`n` review strings (2-5 short sentences, lowercase, each ending with punctuation)."""
    return generate_reviews(n, seed, cfg).texts


def generate_prompts(n: int, seed: int, cfg: TextConfig | None = None) -> list[str]:
    """`n` review openings of 3-8 words with no sentiment word ("the pasta at this place was"), for a policy to
    continue. They are the openings documents start with, so a model pretrained on documents has seen them."""
    if n < 0:
        raise ValueError(f"generate_prompts: n must be >= 0, got {n}")
    g = _grammar(cfg or TextConfig())
    draws = _Draws(seed)
    prompts: list[str] = []
    for _ in range(n):
        t = int(draws.u() * len(g.topics))
        prompt, _ = _Writer(g, draws, g.topics[t][0], 0.0).opener()
        prompts.append(join_words(prompt))
    return prompts
