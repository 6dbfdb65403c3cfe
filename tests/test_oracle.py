"""Oracles: VADER scores, the registry, user callables, and output checks."""

import numpy as np
import pytest

from warm_jax import oracle as oracle_lib
from warm_jax.data import builtin_text
from warm_jax.oracle import CallableOracle, Oracle, VaderOracle, make_oracle, register_oracle


def test_vader_scores_known_sentences():
    scores = make_oracle("vader").score(
        [
            "the food was great and the staff was friendly!",
            "the food was terrible and the staff was rude.",
            "we sat near the window.",
            "the food was not bad.",
        ]
    )
    assert scores.dtype == np.float32 and scores.shape == (4,)
    assert scores[0] > 0.5 and scores[1] < -0.5 and scores[2] == 0.0
    assert scores[3] > 0  # VADER reads the negation: "not bad" is mildly positive
    # The package's published example.
    np.testing.assert_allclose(VaderOracle()(["VADER is smart, handsome, and funny!"]), [0.8439], atol=1e-4)


def test_vader_sentence_mean_does_not_saturate():
    long_pos = "the food was great. the staff was lovely. the room was wonderful. the view was amazing."
    longer_pos = long_pos + " the pool was excellent. the bed was perfect."
    text, sentences = VaderOracle("text"), VaderOracle(aggregate="sentences")
    np.testing.assert_allclose(sentences(["great. awful."]), [(0.6249 - 0.4588) / 2], atol=1e-4)
    # The whole-text score is squashed near its ceiling: two more positive sentences barely move it.
    whole = text([long_pos, longer_pos])
    assert whole.min() > 0.94 and whole[1] - whole[0] < 0.03
    assert 0.5 < sentences([long_pos])[0] < 0.9
    assert sentences([""])[0] == 0.0


def test_vader_separates_builtin_reviews_by_latent():
    reviews = builtin_text.generate_reviews(300, seed=1)
    scores = make_oracle("vader").score(reviews.texts)
    assert scores[reviews.sentiment > 0].mean() > scores[reviews.sentiment < 0].mean() + 1.0


def test_callable_oracle_and_registry():
    length = make_oracle("callable", fn=lambda texts: [len(t) for t in texts], name="length")
    np.testing.assert_array_equal(length.score(["ab", "", "abcd"]), np.array([2, 0, 4], np.float32))
    assert length.name == "length" and isinstance(length, Oracle)
    assert {"vader", "callable"} <= set(oracle_lib.ORACLES)


def test_register_a_user_oracle():
    @register_oracle("test_exclamations")
    class Exclamations(Oracle):
        name = "test_exclamations"

        def _score(self, texts):
            return [t.count("!") for t in texts]

    try:
        assert make_oracle("test_exclamations").score(["wow!!", "ok."]).tolist() == [2.0, 0.0]
        with pytest.raises(ValueError, match="already taken"):
            register_oracle("test_exclamations")(type("Other", (Exclamations,), {}))
    finally:
        del oracle_lib.ORACLES["test_exclamations"]
    with pytest.raises(TypeError, match="not an Oracle subclass"):
        register_oracle("nope")(int)


def test_registry_errors():
    with pytest.raises(ValueError, match=r"unknown oracle 'gpt'.*'callable'.*'vader'"):
        make_oracle("gpt")
    with pytest.raises(TypeError, match=r"make_oracle\('vader'\).*temperature"):
        make_oracle("vader", temperature=1.0)
    with pytest.raises(ValueError, match="aggregate"):
        make_oracle("vader", aggregate="words")
    with pytest.raises(TypeError, match="callable"):
        CallableOracle(fn=3)


def test_output_and_input_checks_name_the_oracle():
    wrong_shape = CallableOracle(lambda texts: np.zeros((len(texts), 2)), name="two_heads")
    with pytest.raises(ValueError, match=r"'two_heads'.*shape \(3, 2\)"):
        wrong_shape.score(["a", "b", "c"])
    nan = CallableOracle(lambda texts: [0.0, float("nan")], name="nan")
    with pytest.raises(ValueError, match=r"'nan'.*non-finite.*\[1\]"):
        nan.score(["a", "b"])
    vader_oracle = make_oracle("vader")
    with pytest.raises(TypeError, match="sequence of texts"):
        vader_oracle.score("just one string")
    with pytest.raises(TypeError, match="text 1 is a int"):
        vader_oracle.score(["fine", 3])
    assert vader_oracle.score([]).shape == (0,)


def test_vader_sentences_penalises_neutral_padding():
    oracle = make_oracle("vader_sentences")
    base = "the food was great. the staff was lovely."
    padded = base + " we came here for dinner. we sat near the window. it runs about two hours."
    whole, sentences = make_oracle("vader").score([base, padded]), oracle.score([base, padded])
    # Whole-text VADER barely notices neutral padding; the sentence mean drops by the share of neutral sentences.
    assert abs(whole[0] - whole[1]) < 0.05
    assert sentences[1] == pytest.approx(sentences[0] * 2 / 5, abs=1e-6)
    assert oracle.name == "vader_sentences" and "vader_sentences" in oracle_lib.ORACLES
