"""Bad inputs to the data tool and library (issue #27): each one is a single line on stderr, exit 1, nothing written."""

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests import helpers
from tests.test_data_formats import TinyTokenizer, generic_record, write_lines
from warm_jax.cli_errors import UserError
from warm_jax.data import __main__ as cli
from warm_jax.data import builders, pipeline
from warm_jax.data import preference as pref


@pytest.fixture
def tok(monkeypatch):
    monkeypatch.setattr(cli, "_load_tokenizer", lambda path: TinyTokenizer())


def prepare(path, out, *flags):
    return cli.main(["prepare", "--format=jsonl", f"--input={path}", f"--output={out}", "--tokenizer=x", *flags])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def listing(d):
    return sorted(p.name for p in Path(d).iterdir())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("bad") / "ds"
    builders.write_preference_dataset(
        out,
        {"train": [generic_record(i) for i in range(6)], "validation": [generic_record(9)]},
        tokenizer=TinyTokenizer(),
        max_prompt_len=8,
        max_response_len=4,
        flip_fraction=0.5,
        seed=0,
        source="test",
    )
    return out


@pytest.fixture
def copy(dataset, tmp_path):
    """A private copy of the module's dataset, to damage."""
    return Path(shutil.copytree(dataset, tmp_path / "copy"))


def edit_metadata(ds, fn):
    path = ds / builders.METADATA_FILE
    meta = json.loads(path.read_text())
    fn(meta)
    path.write_text(json.dumps(meta))


# ------------------------------------------------------------------------------------ 1: empty input
@pytest.mark.parametrize(
    "lines, flags, expect",
    [
        ([], [], "(the file holds no records)"),
        ([b"\n", b"   \n"], [], "(the file holds no records)"),
        (
            [b"{bad\n", json.dumps({"prompt": "p", "chosen": "x", "rejected": "x"}).encode() + b"\n"],
            ["--skip_invalid"],
            "(2 skipped: identical_responses 1, malformed_json 1; first: ",
        ),
    ],
    ids=["empty", "blank", "all_invalid_skipped"],
)
def test_input_without_valid_records_is_refused(tmp_path, capsys, tok, lines, flags, expect):
    path = write_lines(tmp_path / "pairs.jsonl", lines)
    assert prepare(path, tmp_path / "out", *flags) == 1
    err = one_line_error(capsys)
    assert f"{path}: no valid records {expect}" in err
    assert listing(tmp_path) == ["pairs.jsonl"]


def test_input_directory_with_an_empty_split_file_is_refused(tmp_path, capsys, tok):
    write_lines(tmp_path / "in" / "train.jsonl", [generic_record(i) for i in range(4)])
    empty = write_lines(tmp_path / "in" / "test.jsonl", [])
    assert prepare(tmp_path / "in", tmp_path / "out") == 1
    assert f"{empty}: no valid records" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_show_without_splits_or_with_an_empty_split(copy, capsys):
    edit_metadata(copy, lambda m: m["splits"]["train"].update(num_examples=0))
    assert cli.main(["show", str(copy)]) == 1
    assert f"{copy}: split 'train' has no examples" in one_line_error(capsys)
    with pytest.raises(UserError, match="has no examples"):
        pipeline.load_split(copy, "train")
    edit_metadata(copy, lambda m: m.update(splits={}))  # what an empty input used to produce
    assert cli.main(["show", str(copy)]) == 1
    assert f"{copy}: the dataset has no splits" in one_line_error(capsys)


# ------------------------------------------------------------------------------------ 2: nonsense options
@pytest.mark.parametrize(
    "flag",
    [
        "--max_response_len=-5",
        "--max_response_len=0",
        "--max_prompt_len=0",
        "--flip_fraction=1.5",
        "--flip_fraction=-0.1",
        "--flip_fraction=nan",
        "--validation_fraction=1.0",
        "--validation_fraction=-0.5",
        "--seed=-1",
    ],
)
def test_out_of_range_option_names_the_flag(tmp_path, capsys, tok, flag):
    path = write_lines(tmp_path / "pairs.jsonl", [generic_record(i) for i in range(8)])
    assert prepare(path, tmp_path / "out", flag) == 1
    assert f"error: {flag} is out of range" in one_line_error(capsys)
    assert listing(tmp_path) == ["pairs.jsonl"]


def test_prompt_length_must_leave_room_after_bos(tmp_path, capsys, tok):
    path = write_lines(tmp_path / "pairs.jsonl", [generic_record(i) for i in range(8)])
    assert prepare(path, tmp_path / "out", "--max_prompt_len=1") == 1
    assert "--max_prompt_len=1 leaves no room for the prompt after the tokenizer's BOS" in one_line_error(capsys)
    assert cli.main(["show", str(tmp_path), "--num_examples=-1"]) == 1
    assert "--num_examples=-1 is out of range" in one_line_error(capsys)


def test_library_checks_lengths_and_fractions(tmp_path):
    recs = {"train": [generic_record(i) for i in range(4)]}
    write = lambda **kw: builders.write_preference_dataset(
        tmp_path / "o",
        recs,
        tokenizer=TinyTokenizer(),
        source="t",
        **{"max_prompt_len": 8, "max_response_len": 4, **kw},
    )
    with pytest.raises(ValueError, match="max_response_len must be an integer >= 1, got -5"):
        write(max_response_len=-5)
    with pytest.raises(ValueError, match=r"flip_fraction\['train'\] must be a number in \[0, 1\]"):
        write(flip_fraction={"train": 2.0})
    assert not (tmp_path / "o").exists()


def test_responses_identical_up_to_whitespace_are_invalid(tmp_path, capsys, tok):
    same = json.dumps({"prompt": "the movie", "chosen": "same", "rejected": "same "}).encode() + b"\n"
    path = write_lines(tmp_path / "pairs.jsonl", [generic_record(0), same, generic_record(2), generic_record(3)])
    assert prepare(path, tmp_path / "out", "--validation_fraction=0") == 1
    err = one_line_error(capsys)
    assert f"{path}:2: field 'chosen/rejected'" in err and "after whitespace normalisation" in err
    assert prepare(path, tmp_path / "out", "--validation_fraction=0", "--skip_invalid") == 0
    meta = pipeline.load_metadata(tmp_path / "out")
    assert meta["skipped"]["by_reason"] == {"identical_responses": 1} and meta["splits"]["train"]["num_examples"] == 3


def test_pairs_with_identical_tokens_after_truncation_are_invalid(tmp_path, capsys, tok):
    # Responses differ only past max_response_len=2 tokens: the model would see the same sequence twice.
    late = {"prompt": "the movie", "chosen": "very good film", "rejected": "very good plot"}
    path = write_lines(tmp_path / "pairs.jsonl", [generic_record(0), generic_record(1), late, generic_record(3)])
    flags = ["--validation_fraction=0", "--max_response_len=2"]
    assert prepare(path, tmp_path / "out", *flags) == 1
    err = one_line_error(capsys)
    assert f"{path}:3: field 'chosen/rejected'" in err and "[identical_after_truncation]" in err
    assert prepare(path, tmp_path / "out", *flags, "--skip_invalid") == 0
    meta = pipeline.load_metadata(tmp_path / "out")
    assert meta["skipped"]["by_reason"] == {"identical_after_truncation": 1}
    train = pipeline.load_split(tmp_path / "out", "train")
    assert len(train) == meta["splits"]["train"]["num_examples"] == 3
    assert all(not np.array_equal(ex["chosen_tokens"], ex["rejected_tokens"]) for ex in train)


def test_flipped_examples_store_the_swapped_pair_tokens(dataset):
    train = pipeline.load_split(dataset, "train")
    flipped = [ex for ex in train if ex["flipped"]]
    assert len(flipped) == 3
    for ex in flipped:  # the stored tokens are those of the stored (swapped) texts
        pair = pref.PreferencePair(ex["prompt"].decode(), ex["chosen"].decode(), ex["rejected"].decode())
        want = pref.tokenize_pair(pair, TinyTokenizer(), 8, 4)
        for key in ("chosen_tokens", "rejected_tokens", "chosen_length", "rejected_length", "prompt_length"):
            np.testing.assert_array_equal(ex[key], want[key])


# ------------------------------------------------------------------------------------ 3: a folder runs no code
def plant_module(ds: Path, marker: Path) -> str:
    """Makes the dataset's own files name a module, shipped in the folder, that creates `marker` when imported."""
    name = f"planted_{os.getpid()}_{abs(hash(str(ds))) % 10**8}"
    (ds / f"{name}.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('imported')\n")
    features = json.loads((ds / "features.json").read_text())
    features["featuresDict"]["features"]["chosen"]["pythonClassName"] = f"{name}.Text"
    (ds / "features.json").write_text(json.dumps(features))
    info = json.loads((ds / "dataset_info.json").read_text())
    (ds / "dataset_info.json").write_text(json.dumps({**info, "moduleName": name}))
    return name


def test_dataset_folder_cannot_run_its_own_code(copy, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "MARKER"
    name = plant_module(copy, marker)
    monkeypatch.chdir(copy)
    monkeypatch.syspath_prepend(str(copy))  # as `cd DIR && python -m warm_jax.data show .` would have it
    try:
        src = pipeline.load_split(".", "train")
    finally:
        sys.modules.pop(name, None)
        assert not marker.exists(), "reading the dataset imported a module that its own files name"
    assert [ex["index"] for ex in src] == list(range(6))
    assert src[2]["chosen_tokens"].dtype == np.int32 and src[2]["chosen_tokens"].shape == (12,)
    assert cli.main(["show", "."]) == 0 and "split train: 6 examples" in capsys.readouterr().out
    assert not marker.exists()
    # And as a user would run it, in a fresh interpreter.
    proc = subprocess.run(
        [sys.executable, "-m", "warm_jax.data", "show", "."],
        cwd=copy,
        env=helpers.subprocess_env(1),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "split train: 6 examples" in proc.stdout and not marker.exists()


# ------------------------------------------------------------------------------------ 4: files that break
def test_gzip_input_that_is_not_gzip_or_truncated(tmp_path, capsys, tok):
    fake = tmp_path / "fake.jsonl.gz"
    fake.write_bytes(json.dumps(generic_record(0)).encode() + b"\n")
    assert prepare(fake, tmp_path / "out") == 1
    assert f"error: {fake}: not a gzip file, or a damaged one" in one_line_error(capsys)
    whole = gzip.compress(b"".join(json.dumps(generic_record(i)).encode() + b"\n" for i in range(200)))
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    assert prepare(cut, tmp_path / "out", "--skip_invalid") == 1  # fatal even when records are skipped
    err = one_line_error(capsys)
    assert f"error: {cut}: truncated gzip file: reading stopped after line " in err
    assert listing(tmp_path) == ["cut.jsonl.gz", "fake.jsonl.gz"]


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_output_that_is_a_file(tmp_path, capsys, tok, overwrite):
    path = write_lines(tmp_path / "pairs.jsonl", [generic_record(i) for i in range(8)])
    out = tmp_path / "taken"
    out.write_text("keep me")
    assert prepare(path, out, *overwrite) == 1
    assert f"output {out} is an existing file, not a directory" in one_line_error(capsys)
    assert prepare(path, out / "sub") == 1
    assert f"{out} is a file, not a directory" in one_line_error(capsys)
    assert out.read_text() == "keep me" and listing(tmp_path) == ["pairs.jsonl", "taken"]


def test_overwrite_replaces_only_a_dataset(tmp_path, capsys, tok):
    path = write_lines(tmp_path / "pairs.jsonl", [generic_record(i) for i in range(8)])
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")
    assert prepare(path, tmp_path / "home", "--overwrite") == 1
    assert "is a non-empty directory but not a warm_jax dataset" in one_line_error(capsys)
    assert listing(tmp_path / "home") == ["notes.txt"]


@pytest.mark.parametrize(
    "damage, expect",
    [
        (lambda p: p.write_text('{"splits": '), "malformed JSON at line 1, column 12"),
        (lambda p: p.write_bytes(b"\xff\xfe{}"), "not UTF-8 text"),
        (lambda p: p.write_text("[1, 2]"), "expected a JSON object, got list"),
        (lambda p: edit(p, lambda m: m.pop("seq_len")), "field 'seq_len' is missing"),
        (
            lambda p: edit(p, lambda m: m["splits"]["train"].update(num_examples="6")),
            "field 'splits.train.num_examples': expected int, got str",
        ),
        (
            lambda p: edit(p, lambda m: m["splits"]["train"]["chosen_length"].pop("p95")),
            "field 'splits.train.chosen_length.p95' is missing",
        ),
        (lambda p: edit(p, lambda m: m.update(tokenizer_dir="../../x")), "field 'tokenizer_dir' must be null or"),
        (lambda p: edit(p, lambda m: m["splits"].update({"../x": {}})), "field 'splits': '../x' is not a split name"),
    ],
    ids=["truncated", "binary", "not_object", "missing", "wrong_type", "missing_stat", "tokenizer_dir", "split_name"],
)
def test_corrupt_metadata_names_file_and_field(copy, capsys, damage, expect):
    path = copy / builders.METADATA_FILE
    damage(path)
    assert cli.main(["show", str(copy)]) == 1
    assert f"error: {path}: {expect}" in one_line_error(capsys)
    with pytest.raises(UserError, match="preference_metadata.json"):
        pipeline.load_split(copy, "train")


def edit(path, fn):
    meta = json.loads(path.read_text())
    fn(meta)
    path.write_text(json.dumps(meta))


def shard(ds, split="train"):
    (path,) = ds.glob(f"{builders.DATASET_NAME}-{split}.array_record-*")
    return path


def test_damaged_or_missing_shards_name_the_file(copy, capsys):
    path = shard(copy)
    data = path.read_bytes()
    path.write_bytes(data[:1000])  # truncated
    assert cli.main(["show", str(copy)]) == 1
    assert f"error: {path}: not a readable ArrayRecord file" in one_line_error(capsys)
    flipped = bytearray(data)
    flipped[200:300] = bytes(b ^ 0xFF for b in flipped[200:300])  # damaged chunk: found when read
    path.write_bytes(bytes(flipped))
    src = pipeline.load_split(copy, "train")
    with pytest.raises(UserError, match=f"{path}: record 0: unreadable"):
        src.__getitems__([3, 0])
    edit(copy / builders.METADATA_FILE, lambda m: m["splits"]["train"].update(num_examples=7))
    path.write_bytes(data)
    with pytest.raises(UserError, match="split 'train' has 6 records in its shard files but .* says 7"):
        pipeline.load_split(copy, "train")
    path.unlink()
    assert cli.main(["show", str(copy)]) == 1
    assert "split 'train' does not have a complete set of shard files" in one_line_error(capsys)


def test_split_lookup_errors(dataset, capsys):
    with pytest.raises(KeyError, match="no split 'test'"):  # a KeyError still, for callers that catch one
        pipeline.load_split(dataset, "test")
    assert cli.main(["show", str(dataset), "--split=test"]) == 1
    assert f"{dataset} has no split 'test'; it has ['train', 'validation']" in one_line_error(capsys)


def test_verbose_shows_the_traceback(copy, capsys):
    (copy / builders.METADATA_FILE).write_text("{")
    assert cli.main(["show", str(copy), "--verbose"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith(
        "malformed JSON at line 1, column 2: Expecting property name enclosed in double quotes"
    )
    assert cli.main(["--verbose", "show", str(copy)]) == 1 and "Traceback" in capsys.readouterr().err
