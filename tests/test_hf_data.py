"""`warm-data prepare --format=hf`: Hugging Face tables (Parquet, Arrow save_to_disk, JSON lines) with TRL's columns,
chat messages rendered through the model's chat template, and bad rows refused naming file, row and column.

The fixtures in tests/fixtures/hf were written by `datasets` itself (tests/fixtures/hf/make_hf_fixtures.py); the
malformed tables are written here with pyarrow.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from warm_jax.cli_errors import UserError
from warm_jax.data import __main__ as cli
from warm_jax.data import builders, chat_template, hf_tables, pipeline
from warm_jax.data import preference as pref
from warm_jax.data import tokenizers

FIX = Path(__file__).resolve().parent / "fixtures" / "hf"
TOK = FIX / "tokenizer"
CHATML_PROMPT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
SYSTEM = "<|im_start|>system\nyou are careful .<|im_end|>\n"
# The first and third training rows of every chat fixture, as the ChatML template in tokenizer/ renders them.
ROW0 = (CHATML_PROMPT.format("is the film good ?"), "yes , the film is great .<|im_end|>\n", "no .<|im_end|>\n")
ROW2 = (
    SYSTEM + CHATML_PROMPT.format("how do i pick a lock ?"),
    "i can not help with that .<|im_end|>\n",
    "sure , take a pin .<|im_end|>\n",
)


def prepare(tmp_path, inp, *flags, name="ds"):
    out = tmp_path / name
    argv = ["prepare", "--format=hf", f"--input={inp}", f"--output={out}", f"--tokenizer={TOK}"]
    argv += ["--max_prompt_len=48", "--max_response_len=16", "--validation_fraction=0", *flags]
    return cli.main(argv), out


def texts(out, split="train"):
    source = pipeline.load_split(out, split)
    return [tuple(source[i][k].decode() for k in ("prompt", "chosen", "rejected")) for i in range(len(source))]


@pytest.mark.parametrize("layout", ["parquet_chat", "arrow_chat", "jsonl_chat"])
def test_chat_columns_are_rendered_with_the_tokenizers_template(tmp_path, layout):
    # Explicit prompt (parquet), implicit prompt (arrow DatasetDict), string prompt beside whole conversations
    # (jsonl): the same conversations, so the same texts.
    rc, out = prepare(tmp_path, FIX / layout)
    assert rc == 0
    meta = pipeline.load_metadata(out)
    want_splits = {"train": 6} if layout == "jsonl_chat" else {"train": 6, "test": 2}
    assert {s: v["num_examples"] for s, v in meta["splits"].items()} == want_splits
    got = texts(out)
    assert got[0] == ROW0 and got[2] == ROW2
    assert all(p.startswith("<|im_start|>") and p.endswith("<|im_start|>assistant\n") for p, _, _ in got)
    template = meta["extra"]["chat_template"]
    assert template["source"] == f"{TOK / 'tokenizer_config.json'} (chat_template)"
    assert (template["rows_rendered"], template["rows_plain"]) == (sum(want_splits.values()), 0)
    # The template's markers are the tokenizer's special tokens, not text: prompt + response + EOS, exactly.
    tok = tokenizers.load_tokenizer(TOK)
    ex = pipeline.load_split(out, "train")[2]
    want = tok.encode(ROW2[0]) + tok.encode(ROW2[1]) + [tok.eos_id]
    assert ex["chosen_tokens"][: ex["chosen_length"]].tolist() == want
    assert int(ex["prompt_length"]) == len(tok.encode(ROW2[0]))
    assert want[0] == tok.backend.token_to_id("<|im_start|>")


def test_parquet_hub_layout_splits_and_subsets(tmp_path):
    rc, out = prepare(tmp_path, FIX / "parquet_chat")
    assert rc == 0
    assert builders.load_subsets(out, "train") == ["chat", "chat", "safety", "reasoning", "chat", "reasoning"]
    assert builders.load_subsets(out, "test") == ["chat", "reasoning"]
    meta = pipeline.load_metadata(out)
    assert meta["splits"]["train"]["subset_counts"] == {"chat": 3, "reasoning": 2, "safety": 1}
    assert meta["source"] == "hf" and sorted(Path(f).name for f in meta["source_files"]) == [
        "test-00000-of-00001.parquet",
        "train-00000-of-00001.parquet",
    ]
    rc, plain = prepare(tmp_path, FIX / "arrow_chat", name="no_subsets")
    assert rc == 0 and builders.load_subsets(plain, "train") is None


def test_show_prints_the_chat_template_applied(tmp_path, capsys):
    rc, out = prepare(tmp_path, FIX / "arrow_chat")
    assert rc == 0
    capsys.readouterr()
    assert cli.main(["show", str(out), "--num_examples=3"]) == 0
    shown = capsys.readouterr().out
    assert "3 examples from 'train' (stored text, chat template applied):" in shown
    assert f"chat template: {TOK / 'tokenizer_config.json'} (chat_template)" in shown
    assert "applied to 8 of 8 records read" in shown
    assert "      <|im_start|>system\n      you are careful .<|im_end|>\n      <|im_start|>user\n" in shown
    assert "      i can not help with that .<|im_end|>\n" in shown


@pytest.mark.parametrize("layout", ["parquet_text", "arrow_text", "jsonl_text"])
def test_string_columns_are_kept_as_they_are(tmp_path, capsys, layout):
    rc, out = prepare(tmp_path, FIX / layout)
    assert rc == 0
    got = texts(out)
    assert len(got) == 6
    if layout == "jsonl_text":  # no prompt column: the shared leading text, cut after its last whitespace
        assert got[0] == ("\n\nHuman: is the film good ?\n\nAssistant: ", "yes , the film is great .", "no .")
    else:
        assert got[0] == ("is the film good ?", "yes , the film is great .", "no .")
        assert got[2] == ("how do i pick a lock ?", "i can not help with that .", "sure , take a pin .")
    meta = pipeline.load_metadata(out)
    template = meta["extra"]["chat_template"]
    assert (template["rows_rendered"], template["rows_plain"]) == (0, 6)
    source = pipeline.load_split(out, "train")
    if layout == "parquet_text":
        scores = [(float(source[i]["score_chosen"]), float(source[i]["score_rejected"])) for i in range(6)]
        assert scores == [(8.0 - i, 2.5) for i in range(6)]
    else:
        assert np.isnan(float(source[0]["score_chosen"]))
    capsys.readouterr()
    assert cli.main(["show", str(out), "--num_examples=1"]) == 0
    assert "(decoded from tokens)" in capsys.readouterr().out  # no template applied, so tokens decode faithfully


def test_default_template_where_the_tokenizer_has_none(tmp_path):
    bare = tmp_path / "bare_tokenizer"
    bare.mkdir()
    shutil.copy(TOK / "tokenizer.json", bare)
    config = json.loads((TOK / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    assert chat_template.resolve(None, bare).source == "default"
    out = tmp_path / "ds"
    argv = ["prepare", "--format=hf", f"--input={FIX / 'parquet_chat'}", f"--output={out}", f"--tokenizer={bare}"]
    assert cli.main([*argv, "--max_prompt_len=48", "--max_response_len=16", "--validation_fraction=0"]) == 0
    got = texts(out)
    assert got[0] == ("\n\nHuman: is the film good ?\n\nAssistant:", " yes , the film is great .", " no .")
    assert got[2][0] == "\n\nSystem: you are careful .\n\nHuman: how do i pick a lock ?\n\nAssistant:"
    meta = pipeline.load_metadata(out)
    assert meta["extra"]["chat_template"]["source"] == "default"
    assert meta["extra"]["chat_template"]["sha256"] == chat_template.default().sha256
    # --chat_template names the template explicitly, whatever the tokenizer has.
    rc, forced = prepare(tmp_path, FIX / "parquet_chat", "--chat_template=default", name="forced")
    assert rc == 0 and texts(forced)[0] == got[0]


def test_template_from_tokenizer_config_renders_exactly():
    t = chat_template.load(TOK / "tokenizer_config.json")
    assert (t.bos_token, t.eos_token) == ("", "<|im_end|>")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert t.render(messages, add_generation_prompt=True) == (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert chat_template.load(TOK).sha256 == t.sha256  # the folder holding the config


def _gguf_string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def write_gguf(path: Path, fields: dict) -> Path:
    """A GGUF v3 file with metadata only (no tensors); values are str, int (u32) or list of str."""
    body = b""
    for key, value in fields.items():
        body += _gguf_string(key)
        if isinstance(value, str):
            body += struct.pack("<I", 8) + _gguf_string(value)
        elif isinstance(value, int):
            body += struct.pack("<II", 4, value)
        else:
            body += struct.pack("<IIQ", 9, 8, len(value)) + b"".join(_gguf_string(v) for v in value)
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(fields)) + body)
    return path


# Llama 2's layout, with the checks real templates make: roles must alternate, BOS printed by the template.
LLAMA2_STYLE = (
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + message['content'] | trim + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}{% endfor %}"
)


def test_template_from_a_gguf_renders_exactly(tmp_path):
    path = write_gguf(
        tmp_path / "tiny.gguf",
        {
            "general.architecture": "llama",
            "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>"],
            "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.chat_template": LLAMA2_STYLE,
        },
    )
    t = chat_template.resolve(None, path)  # a GGUF given as the tokenizer carries its own template
    assert t.source == f"{path} (tokenizer.chat_template)" and (t.bos_token, t.eos_token) == ("<s>", "</s>")
    talk = [{"role": "user", "content": " hi "}, {"role": "assistant", "content": "hello"}]
    assert t.render(talk) == "<s>[INST] hi [/INST] hello </s>"
    with pytest.raises(chat_template.ChatTemplateError, match="roles must alternate"):
        t.render([{"role": "assistant", "content": "x"}])
    # A row the template refuses names the file, row and column; the BOS it prints is dropped where the
    # tokenizer adds its own.
    where = hf_tables._Row("t.parquet", 3, "row")
    with pytest.raises(pref.PreferenceDataError) as err:
        hf_tables.pair_from_row({"prompt": talk[1:], "chosen": talk[:1], "rejected": talk[:1]}, where, t)
    assert str(err.value) == (
        "t.parquet row 3 column 'prompt': Conversation roles must alternate user/assistant/user/assistant/..."
    )
    row = {"prompt": talk[:1], "chosen": talk[1:], "rejected": [{"role": "assistant", "content": "no"}]}
    pair, rendered = hf_tables.pair_from_row(row, where, t, strip_bos=True)
    assert rendered and (pair.prompt, pair.chosen, pair.rejected) == ("[INST] hi [/INST]", " hello </s>", " no </s>")
    assert hf_tables.pair_from_row(row, where, t)[0].prompt == "<s>[INST] hi [/INST]"
    empty = write_gguf(tmp_path / "none.gguf", {"general.architecture": "llama"})
    with pytest.raises(UserError, match=r"none.gguf holds no chat template"):
        chat_template.load(empty)
    assert chat_template.resolve(None, empty).source == "default"


def test_smollm2_gguf_template_renders_exactly():
    from warm_jax.models import pretrained

    try:
        path = pretrained.smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    t = chat_template.load(path)
    assert t.render([{"role": "user", "content": "hi"}], add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize(
    "name,value,message",
    [
        ("x.parquet", "gone", "row 1 column 'chosen': missing"),
        ("x.parquet", "no_content", "row 3 column 'chosen': message 0 has no 'content'"),
        (
            "x.parquet",
            "struct",
            "row 0 column 'chosen': expected a string or a list of {role, content} messages, got dict",
        ),
        ("x.parquet", "int", "row 0 column 'chosen': expected a string or a list of {role, content} messages, got int"),
        ("x.jsonl", 5, "line 4 column 'chosen': expected a string or a list of {role, content} messages, got int"),
        (
            "x.jsonl",
            "mixed",
            "line 4 column 'rejected': is a string but 'chosen' is a list of messages; both must be of one kind",
        ),
        (
            "x.jsonl",
            "no_prompt",
            "line 4 column 'chosen/rejected': no 'prompt' column, and the two texts share no leading words to take as the prompt",
        ),
        ("x.jsonl", "bad_json", "line 4: malformed JSON: Expecting value at column 1"),
    ],
)
def test_malformed_row_is_refused_naming_file_row_and_column(tmp_path, capsys, name, value, message):
    good = [{"prompt": "say hello", "chosen": "hello there", "rejected": "go away"} for _ in range(5)]
    path = tmp_path / name
    if name.endswith(".parquet"):
        messages = [[{"role": "assistant", "content": r["chosen"]}] for r in good]
        columns = {"prompt": [r["prompt"] for r in good], "rejected": [r["rejected"] for r in good]}
        if value == "gone":
            columns["chosen"] = [r["chosen"] if i != 1 else None for i, r in enumerate(good)]
        elif value == "no_content":
            messages[3] = [{"role": "assistant", "content": None}]
            columns["chosen"] = messages
            columns["rejected"] = [[{"role": "assistant", "content": "go away"}]] * 5
        elif value == "struct":
            columns["chosen"] = [{"role": "assistant", "content": "hello"}] * 5
        else:
            columns["chosen"] = list(range(5))
        pq.write_table(pa.table(columns), path)
    else:
        lines = [json.dumps(r) for r in good]
        lines[3] = {
            5: json.dumps({**good[3], "chosen": 5}),
            "mixed": json.dumps({**good[3], "chosen": [{"role": "assistant", "content": "hi"}]}),
            "no_prompt": json.dumps({"chosen": "yes", "rejected": "no"}),
            "bad_json": "not json",
        }[value]
        path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    argv = ["prepare", "--format=hf", f"--input={path}", f"--output={out}", f"--tokenizer={TOK}"]
    assert cli.main(argv) == 1
    assert capsys.readouterr().err == f"error: {path} {message}\n"
    assert not out.exists()


def _write_saved_dataset(folder: Path, table: pa.Table) -> None:
    """The layout Dataset.save_to_disk writes: an Arrow IPC stream per shard and state.json listing them."""
    folder.mkdir(parents=True)
    with pa.ipc.new_stream(folder / "data-00000-of-00001.arrow", table.schema) as writer:
        writer.write_table(table)
    state = {"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_split": "test"}
    (folder / "state.json").write_text(json.dumps(state))


def test_arrow_folder_errors_and_skip_invalid(tmp_path, capsys):
    talk = lambda text: [{"role": "assistant", "content": text}]
    table = pa.table(
        {
            "prompt": [[{"role": "user", "content": f"q{i}"}] for i in range(4)],
            "chosen": [talk("yes"), talk("yes"), None, talk("yes")],
            "rejected": [talk("no"), talk("yes"), talk("no"), talk("no")],
        }
    )
    _write_saved_dataset(tmp_path / "saved", table)
    rc, out = prepare(tmp_path, tmp_path / "saved")
    assert rc == 1 and not out.exists()
    arrow = tmp_path / "saved" / "data-00000-of-00001.arrow"
    assert capsys.readouterr().err == (
        f"error: {arrow} row 1 column 'chosen/rejected': chosen and rejected are identical\n"
    )
    rc, out = prepare(tmp_path, tmp_path / "saved", "--skip_invalid")
    assert rc == 0
    meta = pipeline.load_metadata(out)
    assert list(meta["splits"]) == ["test"] and meta["splits"]["test"]["num_examples"] == 2  # state.json's split
    assert meta["skipped"]["by_reason"] == {"identical_responses": 1, "missing_field": 1}
    assert meta["skipped"]["first_messages"][1] == f"{arrow} row 2 column 'chosen': missing"
    assert [t[0] for t in texts(out, "test")] == [CHATML_PROMPT.format(q) for q in ("q0", "q3")]


def test_missing_columns_name_the_file_and_the_columns_found(tmp_path, capsys):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"prompt": ["a"], "chosen": ["b"], "answer": ["c"]}), path)
    rc, out = prepare(tmp_path, path)
    assert rc == 1 and not out.exists()
    assert capsys.readouterr().err == (
        f"error: {path}: no column 'rejected' (a preference table needs 'chosen' and 'rejected', optionally "
        "'prompt'); columns found: ['prompt', 'chosen', 'answer']\n"
    )


def test_a_template_that_cannot_be_split_is_refused(tmp_path, capsys):
    odd = tmp_path / "odd.jinja"
    odd.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}>{% endif %}")
    rc, _ = prepare(tmp_path, FIX / "parquet_chat", f"--chat_template={odd}")
    assert rc == 1
    test_file = FIX / "parquet_chat" / "data" / "test-00000-of-00001.parquet"
    assert capsys.readouterr().err == (
        f"error: {test_file} row 0 column 'chosen': the chat template ({odd}) does not render prompt + chosen as the "
        "prompt's text followed by the reply's, so the two cannot be told apart; use another --chat_template\n"
    )


def test_split_names_follow_the_hub_layouts(tmp_path):
    cases = {
        "data/train-00000-of-00001.parquet": "train",
        "data/test-00001-of-00002-5a6b7c8d9e0f1a2b.parquet": "test",
        "filtered-00000-of-00001.parquet": "filtered",  # RewardBench's split
        "valid.jsonl.gz": "validation",
        "validation/0000.parquet": "validation",
        "preferences.parquet": "train",
    }
    assert {name: hf_tables.split_of(tmp_path / name) for name in cases} == cases
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "train.parquet").write_bytes(b"")
    (mixed / "test.jsonl").write_text("")
    with pytest.raises(UserError, match="holds both Parquet .1. and JSON lines .1. files"):
        hf_tables.table_files(mixed)


def test_chat_template_flag_is_for_hf_only(tmp_path, capsys):
    argv = ["prepare", "--format=jsonl", f"--input={tmp_path}", f"--output={tmp_path / 'o'}", f"--tokenizer={TOK}"]
    assert cli.main([*argv, "--chat_template=default"]) == 1
    assert capsys.readouterr().err == "error: --chat_template applies to --format=hf only, not --format=jsonl\n"
