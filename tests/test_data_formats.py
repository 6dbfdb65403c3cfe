"""Preference formats: parsing, validation, tokenisation, label flips, TFDS writing and the CLI."""

import gzip
import json
import math
import os
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import pytest
import tokenizers as hf

from warm_jax.data import __main__ as cli
from warm_jax.data import builders, pipeline
from warm_jax.data import preference as pref

WORDS = (
    "good bad great awful movie film plot was the a it is not very and i liked hated summary post title "
    "human assistant hello hi help me please sure thanks tl dr subreddit r news article relationships "
    "one two three four five six seven eight nine ten"
).split()


class TinyTokenizer:
    """The tokenizer interface of warm_jax.data.tokenizers, over an HF WordLevel model (whitespace words)."""

    def __init__(self, add_bos: bool = True):
        vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<bos>", "<eos>", *WORDS])}
        self._tok = hf.Tokenizer(hf.models.WordLevel(vocab, unk_token="<unk>"))
        self._tok.pre_tokenizer = hf.pre_tokenizers.Whitespace()
        self.vocab_size, self.pad_id, self.bos_id, self.eos_id, self.add_bos = len(vocab), 0, 2, 3, add_bos

    def encode(self, text):
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self._tok.decode(list(ids))

    def save(self, directory):
        os.makedirs(directory, exist_ok=True)
        self._tok.save(os.path.join(directory, "tokenizer.json"))


def write_lines(path, objs):
    """Writes JSON lines; a `bytes` item is written verbatim (for malformed lines)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for obj in objs:
            f.write(obj if isinstance(obj, bytes) else json.dumps(obj).encode() + b"\n")
    return path


def tldr_record(i, split="train", choice=0, news=False):
    info = (
        {"id": f"n{i}", "article": f"news article {i}", "title": "title", "site": "cnn"}
        if news
        else {"id": f"t{i}", "post": f"i liked the movie {i}", "title": "good film", "subreddit": "relationships"}
    )
    return {
        "info": info,
        "split": split,
        "choice": choice,
        "worker": "w1",
        "extra": {"confidence": 7},
        "summaries": [
            {"text": f" good movie {i}", "policy": "sup", "note": None},
            {"text": f" bad plot {i}", "policy": "ref", "note": None},
        ],
    }


def hh_record(i):
    dialog = f"\n\nHuman: hello {i}\n\nAssistant: hi\n\nHuman: help me please\n\nAssistant:"
    return {"chosen": dialog + " sure thanks", "rejected": dialog + " not very good"}


def generic_record(i):
    return {"prompt": f"the movie {i} was", "chosen": "very good", "rejected": f"awful {i}"}


PROMPT_LEN, RESPONSE_LEN = 8, 4


def prepare(fmt, inp, out, **kw):
    return builders.prepare_dataset(
        fmt, inp, out, tokenizer=TinyTokenizer(), max_prompt_len=PROMPT_LEN, max_response_len=RESPONSE_LEN, **kw
    )


def test_tokenize_pair_truncates_prompt_left_and_appends_eos():
    tok = TinyTokenizer()
    pair = pref.PreferencePair("one two three four five six seven eight nine", "good", "bad movie was the a")
    ex = pref.tokenize_pair(pair, tok, max_prompt_len=5, max_response_len=4)
    ids = lambda s: tok.encode(s)
    # BOS + the last 4 prompt words; chosen gets EOS, rejected (5 words) is cut to 4 without EOS.
    assert ex["chosen_tokens"].tolist() == [2, *ids("six seven eight nine"), *ids("good"), 3, 0, 0]
    assert ex["rejected_tokens"].tolist() == [2, *ids("six seven eight nine"), *ids("bad movie was the")]
    assert (ex["prompt_length"], ex["chosen_length"], ex["rejected_length"]) == (5, 7, 9)
    assert ex["prompt_truncated"] and not ex["chosen_truncated"] and ex["rejected_truncated"]
    assert ex["chosen_tokens"].dtype == np.int32 and ex["chosen_tokens"].shape == (9,)
    no_bos = pref.tokenize_pair(pair, TinyTokenizer(add_bos=False), max_prompt_len=5, max_response_len=4)
    assert no_bos["chosen_tokens"][:5].tolist() == ids("five six seven eight nine")


def test_tldr_builds_splits_prompts_and_tokens(tmp_path):
    records = [
        tldr_record(0, "train", 0),
        tldr_record(1, "train", 1),
        tldr_record(2, "train", 0),
        tldr_record(3, "valid1", 1),
        tldr_record(4, "valid2", 0),
        tldr_record(5, "valid1", 0, news=True),
    ]
    write_lines(tmp_path / "in" / "batch1.json", records[:3])
    write_lines(tmp_path / "in" / "batch2.json", records[3:])
    meta = prepare("tldr", tmp_path / "in", tmp_path / "ds")
    counts = {s: v["num_examples"] for s, v in meta["splits"].items()}
    assert counts == {"train": 3, "validation": 1, "test": 1, "ood": 1}
    assert len(meta["source_files"]) == 2 and meta["skipped"]["total"] == 0
    train = pipeline.load_split(tmp_path / "ds", "train")
    ex = train[1]
    assert (
        ex["prompt"].decode() == "SUBREDDIT: r/relationships\n\nTITLE: good film\n\nPOST: i liked the movie 1\n\nTL;DR:"
    )
    # choice=1: the second summary is chosen.
    assert (ex["chosen"].decode(), ex["rejected"].decode()) == (" bad plot 1", " good movie 1")
    assert ex["index"] == 1 and not ex["flipped"] and math.isnan(ex["score_chosen"])
    tok = TinyTokenizer()
    prompt_ids = [2] + tok.encode(ex["prompt"].decode())[-(PROMPT_LEN - 1) :]
    assert ex["prompt_length"] == len(prompt_ids) == PROMPT_LEN
    assert ex["chosen_tokens"].tolist() == prompt_ids + tok.encode(" bad plot 1") + [3]
    assert ex["chosen_length"] == PROMPT_LEN + 4
    ood = pipeline.load_split(tmp_path / "ds", "ood")[0]
    assert ood["prompt"].decode() == "TITLE: title\n\nARTICLE: news article 5\n\nTL;DR:"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # temporary directory removed


def test_hh_directory_prompt_is_common_prefix(tmp_path):
    write_lines(tmp_path / "hh" / "train.jsonl", [hh_record(i) for i in range(10)])
    with gzip.open(tmp_path / "hh" / "test.jsonl.gz", "wb") as f:
        f.write(json.dumps(hh_record(99)).encode() + b"\n")
    meta = prepare("hh", tmp_path / "hh", tmp_path / "ds", validation_fraction=0.2)
    assert {s: v["num_examples"] for s, v in meta["splits"].items()} == {"train": 8, "validation": 2, "test": 1}
    ex = pipeline.load_split(tmp_path / "ds", "test")[0]
    assert ex["prompt"].decode() == "\n\nHuman: hello 99\n\nAssistant: hi\n\nHuman: help me please\n\nAssistant:"
    assert (ex["chosen"].decode(), ex["rejected"].decode()) == (" sure thanks", " not very good")


def test_jsonl_single_file_carves_validation_deterministically(tmp_path):
    write_lines(tmp_path / "pairs.jsonl", [generic_record(i) for i in range(20)])
    meta = prepare("jsonl", tmp_path / "pairs.jsonl", tmp_path / "a", validation_fraction=0.25, seed=3)
    prepare("jsonl", tmp_path / "pairs.jsonl", tmp_path / "b", validation_fraction=0.25, seed=3)
    assert meta["splits"]["validation"]["num_examples"] == 5 and meta["splits"]["train"]["num_examples"] == 15
    texts = lambda d, s: [ex["rejected"] for ex in pipeline.load_split(d, s)]
    assert texts(tmp_path / "a", "validation") == texts(tmp_path / "b", "validation")
    assert sorted(texts(tmp_path / "a", "validation") + texts(tmp_path / "a", "train")) == sorted(
        f"awful {i}".encode() for i in range(20)
    )


def test_building_leaves_no_tfds_temp_dirs(tmp_path, monkeypatch):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))  # TFDS makes its dirs under gettempdir()
    write_lines(tmp_path / "pairs.jsonl", [generic_record(i) for i in range(8)])
    prepare("jsonl", tmp_path / "pairs.jsonl", tmp_path / "a", validation_fraction=0.25, seed=0)
    assert list(tmp.iterdir()) == []


def test_flip_fraction_exact_and_mask_round_trips(tmp_path):
    n = 203
    records = [
        {
            "prompt": f"the movie {i % 10}",
            "chosen": f"good {i % 10}",
            "rejected": f"bad {i % 7}",
            "score_chosen": 1.0 + i,
            "score_rejected": -1.0 - i,
        }
        for i in range(n)
    ]
    meta = builders.write_preference_dataset(
        tmp_path / "ds",
        {"train": records, "validation": records[:20], "ood": records[:30]},
        tokenizer=TinyTokenizer(),
        max_prompt_len=PROMPT_LEN,
        max_response_len=RESPONSE_LEN,
        flip_fraction=0.25,
        seed=5,
        source="builtin",
        extra_metadata={"oracle": "vader"},
    )
    train = pipeline.load_split(tmp_path / "ds", "train")
    mask = np.array([bool(ex["flipped"]) for ex in train])
    assert mask.sum() == round(0.25 * n) == meta["splits"]["train"]["num_flipped"]
    assert abs(mask.mean() - 0.25) < 0.01
    assert meta["splits"]["validation"]["num_flipped"] == meta["splits"]["ood"]["num_flipped"] == 0
    assert meta["extra"] == {"oracle": "vader"} and meta["flip_fraction"]["train"] == 0.25
    for i, ex in enumerate(train):  # the stored texts and scores follow the mask
        flipped = mask[i]
        assert ex["chosen"].decode() == (records[i]["rejected"] if flipped else records[i]["chosen"])
        assert ex["score_chosen"] == (-1.0 - i if flipped else 1.0 + i)
    # Same seed, same mask; the stored metadata says what was configured.
    again = builders.write_preference_dataset(
        tmp_path / "ds2",
        {"train": records},
        tokenizer=TinyTokenizer(),
        max_prompt_len=PROMPT_LEN,
        max_response_len=RESPONSE_LEN,
        flip_fraction=0.25,
        seed=5,
        source="builtin",
    )
    assert [bool(e["flipped"]) for e in pipeline.load_split(tmp_path / "ds2", "train")] == mask.tolist()
    assert again["splits"]["train"]["configured_flip_fraction"] == 0.25


BAD_LINES = {
    "malformed_json": (b'{"prompt": "a", "chosen": \n', "<line>"),
    "missing_field": (json.dumps({"prompt": "the", "chosen": "good"}).encode() + b"\n", "rejected"),
    "empty_text": (json.dumps({"prompt": "the", "chosen": "  ", "rejected": "bad"}).encode() + b"\n", "chosen"),
    "identical_responses": (
        json.dumps({"prompt": "the", "chosen": "good", "rejected": "good"}).encode() + b"\n",
        "chosen/rejected",
    ),
    "invalid_utf8": (b'{"prompt": "the \xff\xfe", "chosen": "a", "rejected": "b"}\n', "<line>"),
}


@pytest.fixture
def cli_tokenizer(monkeypatch):
    monkeypatch.setattr(cli, "_load_tokenizer", lambda path: TinyTokenizer())


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_bad_jsonl_line_fails_naming_file_line_field(tmp_path, capsys, cli_tokenizer, reason):
    bad, field = BAD_LINES[reason]
    path = write_lines(tmp_path / "pairs.jsonl", [generic_record(0), generic_record(1), bad, generic_record(3)])
    rc = cli.main(["prepare", "--format=jsonl", f"--input={path}", f"--output={tmp_path / 'out'}", "--tokenizer=x"])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"{path}:3: field '{field}'" in err and f"[{reason}]" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl"]  # no dataset, no temporary left


@pytest.mark.parametrize(
    "record, field, reason",
    [
        (dict(tldr_record(0), choice=2), "choice", "bad_choice"),
        ({k: v for k, v in tldr_record(0).items() if k != "summaries"}, "summaries", "missing_field"),
        (dict(tldr_record(0), info={"id": "x", "title": "t", "subreddit": "r"}), "info.post", "missing_field"),
    ],
)
def test_bad_tldr_record_fails(tmp_path, record, field, reason):
    path = write_lines(tmp_path / "c.json", [tldr_record(1), record])
    with pytest.raises(pref.PreferenceDataError) as info:
        prepare("tldr", path, tmp_path / "out")
    assert (info.value.path, info.value.line, info.value.field, info.value.code) == (str(path), 2, field, reason)
    assert not (tmp_path / "out").exists()


def test_skip_invalid_counts_reasons_in_metadata_and_show(tmp_path, capsys, cli_tokenizer):
    lines = (
        [generic_record(i) for i in range(6)] + [bad for bad, _ in BAD_LINES.values()] + [BAD_LINES["empty_text"][0]]
    )
    path = write_lines(tmp_path / "pairs.jsonl", lines)
    out = tmp_path / "out"
    rc = cli.main(
        [
            "prepare",
            "--format=jsonl",
            f"--input={path}",
            f"--output={out}",
            "--tokenizer=x",
            "--skip_invalid",
            "--validation_fraction=0.5",
            "--flip_fraction=0.34",
        ]
    )
    assert rc == 0
    meta = pipeline.load_metadata(out)
    assert meta["skipped"]["by_reason"] == {
        "empty_text": 2,
        "identical_responses": 1,
        "invalid_utf8": 1,
        "malformed_json": 1,
        "missing_field": 1,
    }
    assert meta["skipped"]["total"] == 6 and meta["splits"]["train"]["num_examples"] == 3
    assert meta["splits"]["train"]["num_flipped"] == 1  # round(0.34 * 3)
    capsys.readouterr()
    assert cli.main(["show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "split train: 3 examples, 1 flipped (33.33%, configured 34.00%)" in shown
    assert "skipped records: 6" in shown and "'malformed_json': 1" in shown
    assert shown.count("chosen_length=") == 3 and "prompt_length" in shown
    assert "the movie" in shown  # decoded examples are printed


def test_show_decodes_tokens_with_given_tokenizer(tmp_path):
    write_lines(tmp_path / "p.jsonl", [generic_record(i) for i in range(4)])
    prepare("jsonl", tmp_path / "p.jsonl", tmp_path / "ds", validation_fraction=0.0)
    text = cli.show(tmp_path / "ds", tokenizer=TinyTokenizer(), num_examples=2)
    assert "decoded from tokens" in text and "<bos> the movie 0 was" not in text
    assert "the movie <unk> was" in text  # digits are not in the tiny vocabulary: the model sees <unk>
    assert (tmp_path / "ds" / "tokenizer" / "tokenizer.json").exists()


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    write_lines(tmp_path / "p.jsonl", [generic_record(i) for i in range(4)])
    prepare("jsonl", tmp_path / "p.jsonl", tmp_path / "ds", validation_fraction=0.0)
    with pytest.raises(FileExistsError):
        prepare("jsonl", tmp_path / "p.jsonl", tmp_path / "ds", validation_fraction=0.0)
    write_lines(tmp_path / "p.jsonl", [generic_record(i) for i in range(6)])
    meta = prepare("jsonl", tmp_path / "p.jsonl", tmp_path / "ds", validation_fraction=0.0, overwrite=True)
    assert meta["splits"]["train"]["num_examples"] == len(pipeline.load_split(tmp_path / "ds", "train")) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "p.jsonl"]


def test_builtin_cli_writes_generated_splits_with_real_tokenizer(tmp_path, monkeypatch, capsys):
    from warm_jax.data import tokenizers

    tok_dir = tmp_path / "tok"
    tokenizers.WordTokenizer.from_words(WORDS).save(tok_dir)
    calls = []

    def generate_splits(input_path=None, seed=0, **options):
        calls.append((input_path, seed, options))
        rec = lambda i: {
            "prompt": f"the movie {i % 3}",
            "chosen": "very good",
            "rejected": "bad",
            "score_chosen": 0.5,
            "score_rejected": -0.5,
        }
        return {
            "train": [rec(i) for i in range(40)],
            "validation": [rec(i) for i in range(8)],
            "ood_cue": [rec(i) for i in range(6)],
            "ood_temp": [rec(i) for i in range(5)],
        }

    monkeypatch.setitem(
        sys.modules, "warm_jax.task.builtin_pairs", types.SimpleNamespace(generate_splits=generate_splits)
    )
    out = tmp_path / "ds"
    assert (
        cli.main(
            [
                "prepare",
                "--format=builtin",
                f"--input={tmp_path / 'work'}",
                f"--output={out}",
                f"--tokenizer={tok_dir}",
                "--seed=3",
                "--builtin_option=num_train=40",
                "--builtin_option=oracle=vader",
            ]
        )
        == 0
    )
    assert calls == [(str(tmp_path / "work"), 3, {"num_train": 40, "oracle": "vader"})]
    meta = pipeline.load_metadata(out)
    assert meta["source"] == "builtin" and meta["tokenizer"]["class"] == "WordTokenizer"
    assert {s: (v["num_examples"], v["num_flipped"]) for s, v in meta["splits"].items()} == {
        "train": (40, 10),
        "validation": (8, 0),
        "ood_cue": (6, 0),
        "ood_temp": (5, 0),
    }  # default flip 0.25, train only
    capsys.readouterr()
    assert cli.main(["show", str(out), "--num_examples=1"]) == 0
    shown = capsys.readouterr().out
    assert "decoded from tokens" in shown and "the movie <unk>" in shown  # read back with the saved tokenizer


def test_builtin_without_generator_says_so(tmp_path, capsys, cli_tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "warm_jax.task.builtin_pairs", None)  # as if the module did not exist
    assert cli.main(["prepare", "--format=builtin", f"--output={tmp_path / 'o'}", "--tokenizer=x"]) == 1
    assert "warm_jax.task.builtin_pairs.generate_splits" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_evaluation_splits_are_validation_and_the_datasets_own_ood_splits(tmp_path):
    from warm_jax import eval_splits

    records = [{"prompt": f"the movie {i}", "chosen": "good", "rejected": "bad"} for i in range(8)]
    names = ("train", "validation", "test", "ood_temp", "ood_cue", "oodles")
    builders.write_preference_dataset(
        tmp_path / "ds",
        {s: records for s in names},
        tokenizer=TinyTokenizer(),
        max_prompt_len=PROMPT_LEN,
        max_response_len=RESPONSE_LEN,
        flip_fraction=0.25,
        source="jsonl",
    )
    # 'test' and 'oodles' are not evaluation splits; the ood ones come sorted, whatever the dataset's order.
    assert eval_splits.dataset_held_out(tmp_path / "ds") == ("validation", "ood_cue", "ood_temp")
    assert eval_splits.dataset_rm_splits(tmp_path / "ds") == (
        "train_clean",
        "train_corrupted",
        "validation",
        "ood_cue",
        "ood_temp",
    )
    # An external dataset (or an old workdir) with one 'ood' split.
    assert eval_splits.held_out(["ood", "train", "validation"]) == ("validation", "ood")
    assert eval_splits.ordered(["ood", "validation", "train_corrupted", "train_clean"]) == (
        "train_clean",
        "train_corrupted",
        "validation",
        "ood",
    )
    assert [eval_splits.is_eval_split(s) for s in ("ood", "ood_x", "oodles", "test", "train")] == [
        True,
        True,
        False,
        False,
        False,
    ]
