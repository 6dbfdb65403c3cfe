"""The built-in corpus: determinism, vocabulary coverage, and word choice that follows the latent sentiment."""

import dataclasses
import re

import numpy as np
import pytest
import vader

from warm_jax.data import builtin_text as bt
from warm_jax.data.tokenizers import split_words


@pytest.fixture(scope="module")
def reviews():
    return bt.generate_reviews(1000, seed=0)


@pytest.fixture(scope="module")
def analyzer():
    return vader.SentimentIntensityAnalyzer()


def test_deterministic_per_seed_and_different_across_seeds():
    a = bt.generate_reviews(50, seed=3)
    b = bt.generate_reviews(50, seed=3)
    assert a.texts == b.texts
    np.testing.assert_array_equal(a.sentiment, b.sentiment)
    np.testing.assert_array_equal(a.topic, b.topic)
    other = bt.generate_documents(50, seed=4)
    assert sum(x != y for x, y in zip(a.texts, other)) >= 45
    # One stream: a shorter request is a prefix of a longer one.
    assert bt.generate_documents(10, seed=3) == a.texts[:10]
    assert bt.generate_prompts(20, seed=1) == bt.generate_prompts(20, seed=1)
    assert bt.generate_prompts(20, seed=1) != bt.generate_prompts(20, seed=2)


def test_vocabulary_covers_every_generated_token(reviews):
    vocab = bt.vocabulary()
    assert vocab == sorted(set(vocab)) == bt.vocabulary()
    used = {w for t in reviews.texts for w in split_words(t)}
    assert used <= set(vocab), used - set(vocab)
    prompts = bt.generate_prompts(300, seed=0)
    assert {w for p in prompts for w in split_words(p)} <= set(vocab)
    assert 300 <= len(vocab) <= 600
    assert 200 <= len(bt.sentiment_words()) <= 400  # "a few hundred" VADER words


def test_document_shape(reviews):
    n_words = [len(split_words(t)) for t in reviews.texts]
    assert max(n_words) <= bt.TextConfig().max_tokens
    assert 12 <= np.mean(n_words) <= 30
    for text in reviews.texts:
        assert text == text.lower() and text[-1] in ".!?"
        sentences = re.split(r"(?<=[.!?]) ", text)
        assert 2 <= len(sentences) <= 5, text
    assert set(np.unique(reviews.topic)) == {0, 1, 2, 3}
    assert reviews.sentiment.dtype == np.float32
    assert -1 <= reviews.sentiment.min() < -0.9 and 0.9 < reviews.sentiment.max() <= 1


def test_prompts_are_neutral_openings_that_documents_start_with(reviews, analyzer):
    prompts = bt.generate_prompts(300, seed=0)
    for p in prompts:
        n = len(p.replace(",", "").split())
        assert 3 <= n <= 8, p
        assert analyzer.polarity_scores(p)["compound"] == 0.0, p
        assert p[-1] not in ".!?"
    # A document begins with a prompt-shaped opening followed by its first sentiment word.
    openings = {p for p in prompts}
    starts = sum(any(t.startswith(o + " ") for o in openings) for t in reviews.texts[:200])
    assert starts >= 100


def test_words_outside_the_sentiment_lists_are_neutral_to_vader(analyzer):
    sentiment = set(bt.sentiment_words())
    neutral = [w for w in bt.vocabulary() if w not in sentiment and w not in ".,!?"]
    assert len(neutral) > 100
    scored = [w for w in neutral if analyzer.polarity_scores(f"the {w} thing")["compound"] != 0.0]
    # Boosters and negators only modify their neighbours.
    assert scored == [], scored


def test_vader_follows_the_latent(reviews, analyzer):
    compound = np.array([analyzer.polarity_scores(t)["compound"] for t in reviews.texts])
    s = reviews.sentiment
    assert compound[s > 0.3].mean() > 0.5 and compound[s < -0.3].mean() < -0.4
    assert np.mean(np.sign(compound[np.abs(s) > 0.3]) == np.sign(s[np.abs(s) > 0.3])) > 0.9
    assert np.corrcoef(compound, s)[0, 1] > 0.8
    # Weaker latents give weaker scores: word strength follows |s|, not only its sign.
    strong, weak = np.abs(s) > 0.7, np.abs(s) < 0.3
    assert np.abs(compound[strong]).mean() > np.abs(compound[weak]).mean() + 0.2


def test_negation_makes_bag_of_words_insufficient(reviews):
    texts = " ".join(reviews.texts)
    for phrase in (" not ", " never ", "did not ", "not a ", ", but "):
        assert texts.count(phrase) >= 10, phrase
    # A negated positive word shows up in negative reviews: word identity alone does not give the label.
    neg = [t for t, s in zip(reviews.texts, reviews.sentiment) if s < -0.5]
    positive_words = set(bt._grammar(bt.TextConfig()).general.pos.words)
    assert any(re.search(r"\bnot (\w+ )?(%s)\b" % "|".join(positive_words), t) for t in neg)


def test_config_knobs(analyzer):
    small = bt.TextConfig(words_per_list=3, topics=("movie",))
    vocab = set(bt.vocabulary(small))
    assert len(vocab) < len(bt.vocabulary()) - 100
    docs = bt.generate_documents(200, seed=0, cfg=small)
    assert {w for d in docs for w in split_words(d)} <= vocab
    assert all("hotel" not in d and "pasta" not in d for d in docs)
    lengthy = bt.TextConfig(min_sentences=5, max_sentences=5, max_tokens=80)
    assert all(len(re.split(r"(?<=[.!?]) ", d)) == 5 for d in bt.generate_documents(50, 0, lengthy))
    no_negation = dataclasses.replace(bt.TextConfig(), negation_rate=0.0)
    # Only the fixed closing verdict "i would not/never recommend ..." still negates.
    stripped = [re.sub(r"would (not|never) recommend", "", d) for d in bt.generate_documents(300, 0, no_negation)]
    assert all(" not " not in f" {d} " and "never" not in d for d in stripped)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("topics", ("space",), "TextConfig.topics"),
        ("min_sentences", 1, "min_sentences"),
        ("negation_rate", 1.5, "negation_rate"),
        ("words_per_list", 0, "words_per_list"),
    ],
)
def test_config_errors(field, value, match):
    with pytest.raises(ValueError, match=match):
        bt.TextConfig(**{field: value})


def test_too_strict_valence_threshold_is_an_error():
    with pytest.raises(ValueError, match="min_abs_valence"):
        bt.vocabulary(bt.TextConfig(min_abs_valence=5.0))
