"""Tokenizers: word-level round trips, the HF adapter on a tiny WordLevel model, save/load of both kinds."""

import json

import numpy as np
import pytest
import tokenizers as hf
from tokenizers import models, pre_tokenizers, processors

from warm_jax.data import builtin_text
from warm_jax.data.tokenizers import (
    HFTokenizer,
    WordTokenizer,
    join_words,
    load_tokenizer,
    split_words,
)


@pytest.fixture(scope="module")
def word_tok():
    return WordTokenizer.from_words(builtin_text.vocabulary())


def test_split_and_join_punctuation():
    assert split_words("Great Movie!  Not bad, really?") == ["great", "movie", "!", "not", "bad", ",", "really", "?"]
    assert join_words(["great", "movie", "!", "not", "bad", ",", "really", "?"]) == "great movie! not bad, really?"


def test_word_ids_and_specials(word_tok):
    assert (word_tok.pad_id, word_tok.bos_id, word_tok.eos_id, word_tok.unk_id) == (0, 1, 2, 3)
    assert word_tok.vocab[:4] == ("<pad>", "<bos>", "<eos>", "<unk>")
    assert word_tok.vocab_size == 4 + len(builtin_text.vocabulary())
    assert word_tok.add_bos and word_tok.kind == "word"


def test_word_round_trip_on_generated_text(word_tok):
    docs = builtin_text.generate_documents(200, seed=0)
    ids = word_tok.encode_batch(docs)
    assert all(word_tok.unk_id not in row for row in ids)
    assert all(word_tok.bos_id not in row and word_tok.eos_id not in row for row in ids)
    assert word_tok.decode_batch(ids) == docs


def test_unknown_words_become_unk(word_tok):
    ids = word_tok.encode("the zorblax was great")
    assert ids[1] == word_tok.unk_id and ids.count(word_tok.unk_id) == 1
    assert word_tok.decode(ids) == "the <unk> was great"
    # A special token typed in text is not a control id: "<eos>" must not end decoding.
    assert word_tok.encode("<eos> great") == [word_tok.unk_id, word_tok.encode("great")[0]]


def test_word_decode_stops_at_eos_and_drops_pad_and_bos(word_tok):
    great, bad = word_tok.encode("great bad")
    row = np.array([word_tok.bos_id, great, word_tok.pad_id, bad, word_tok.eos_id, great, 0, 0])
    assert word_tok.decode(row) == "great bad"
    assert word_tok.encode_prompt("great") == [word_tok.bos_id, great]
    # Ids of a padded embedding table past the vocabulary read as <unk>; negative ids are a bug.
    assert word_tok.decode([great, word_tok.vocab_size + 5]) == "great <unk>"
    with pytest.raises(ValueError, match="negative"):
        word_tok.decode([great, -1])
    with pytest.raises(ValueError, match="shape"):
        word_tok.decode(np.zeros((2, 3), np.int32))


def test_word_vocab_errors():
    with pytest.raises(ValueError, match="'great!'"):
        WordTokenizer.from_words(["good", "great!"])
    with pytest.raises(ValueError, match="twice"):
        WordTokenizer([*WordTokenizer.SPECIALS, "good", "good"])
    with pytest.raises(ValueError, match="must start with"):
        WordTokenizer(["good", "bad"])


def test_word_save_load(tmp_path, word_tok):
    path = word_tok.save(tmp_path / "tok")
    assert path.name == "tokenizer.json"
    assert json.loads(path.read_text())["warm_jax_tokenizer"] == "word"
    for source in (tmp_path / "tok", path):
        loaded = load_tokenizer(source)
        assert isinstance(loaded, WordTokenizer)
        assert loaded.vocab == word_tok.vocab
    text = "the food was not bad, really!"
    assert load_tokenizer(path).encode(text) == word_tok.encode(text)


def _tiny_hf(with_bos_post_processor: bool) -> hf.Tokenizer:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "the": 4, "food": 5, "was": 6, "great": 7, "!": 8}
    tok = hf.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<pad>", "<s>", "</s>", "<unk>"])
    if with_bos_post_processor:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def test_hf_reads_specials_from_names_and_post_processor(tmp_path):
    _tiny_hf(True).save(str(tmp_path / "tokenizer.json"))
    tok = HFTokenizer.from_file(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 0, 9)
    assert tok.add_bos and tok.kind == "hf"
    # encode adds no special tokens even though the file's post-processor would.
    assert tok.encode("the food was great !") == [4, 5, 6, 7, 8]
    assert tok.encode("the soup was great") == [4, 3, 6, 7]
    assert tok.encode_batch(["the food", "great !"]) == [[4, 5], [7, 8]]
    assert tok.encode_prompt("the food") == [1, 4, 5]
    assert tok.decode([1, 4, 5, 0, 6, 7, 2, 8, 0]) == "the food was great"
    assert tok.decode_batch(np.array([[4, 5, 2, 0], [7, 8, 0, 0]])) == ["the food", "great !"]


def test_hf_given_ids_and_pad_falls_back_to_eos(tmp_path):
    vocab = {"<unk>": 0, "<|endoftext|>": 1, "hi": 2}
    tok = hf.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|endoftext|>"])
    adapter = HFTokenizer(tok, eos_id=1)
    assert (adapter.pad_id, adapter.bos_id, adapter.add_bos) == (1, None, False)
    assert adapter.encode_prompt("hi hi") == [2, 2]
    tok.save(str(tmp_path / "tokenizer.json"))
    from_file = HFTokenizer.from_file(tmp_path / "tokenizer.json")  # found by name
    assert (from_file.eos_id, from_file.pad_id, from_file.bos_id) == (1, 1, None)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        HFTokenizer(tok, eos_id=7)


def test_hf_without_known_eos_names_the_file(tmp_path):
    tok = hf.Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"tokenizer\.json.*EOS"):
        HFTokenizer.from_file(tmp_path)
    assert HFTokenizer.from_file(tmp_path, eos_id=1).eos_id == 1


def test_hf_save_load_keeps_specials(tmp_path):
    # Roles that contradict the name heuristics ("<pad>" as EOS) must survive a save/load round trip.
    adapter = HFTokenizer(_tiny_hf(False), eos_id=0, bos_id=2, pad_id=3, add_bos=True)
    adapter.save(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    assert config == {"eos_token": "<pad>", "bos_token": "</s>", "pad_token": "<unk>", "add_bos_token": True}
    loaded = load_tokenizer(tmp_path / "saved")
    assert isinstance(loaded, HFTokenizer)
    assert (loaded.eos_id, loaded.bos_id, loaded.pad_id, loaded.add_bos) == (0, 2, 3, True)
    assert loaded.encode("the food was great !") == adapter.encode("the food was great !")


def test_hf_config_naming_unknown_token_is_an_error(tmp_path):
    _tiny_hf(False).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|nope|>"}}))
    with pytest.raises(ValueError, match=r"tokenizer_config\.json.*eos_token.*<\|nope\|>"):
        load_tokenizer(tmp_path)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"vocab": [1,\n')
    with pytest.raises(ValueError, match=r"tokenizer\.json: malformed JSON at line 2"):
        load_tokenizer(bad)
    bad.write_text('{"something": 1}')
    with pytest.raises(ValueError, match="not a tokenizer file"):
        load_tokenizer(bad)
    bad.write_text('{"warm_jax_tokenizer": "word", "format_version": 1, "vocab": ["a", "b"]}')
    with pytest.raises(ValueError, match=r"tokenizer\.json: field 'vocab'"):
        load_tokenizer(bad)
    bad.write_text('{"warm_jax_tokenizer": "bpe"}')
    with pytest.raises(ValueError, match="known kinds"):
        load_tokenizer(bad)
