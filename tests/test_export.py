"""HF export of save_params checkpoints, round-tripped through our importer (and transformers, slow)."""

from __future__ import annotations

import importlib.util
import json
import os

import jax
import numpy as np
import pytest
import tokenizers
from safetensors.numpy import load_file

from warm_jax import export, logits as logits_lib
from warm_jax.data.tokenizers import HFTokenizer
from warm_jax.params_io import save_params
from warm_jax.models import pretrained as pt
from warm_jax.models import transformer as tr
from tests.test_pretrained import TINY, WORDS  # one tiny Llama config for both files

BIAS = 0.75
TOKENS = np.array([[1, 5, 6, 7, 8, 0], [1, 9, 10, 0, 0, 0]], np.int32)  # right-padded with pad id 0
MASK = (TOKENS != 0).astype(np.int32)


def _tokenizer_dir(directory) -> str:
    wl = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    wl.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    HFTokenizer(wl, eos_id=2, bos_id=1, pad_id=0, add_bos=True).save(directory)
    return str(directory)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny untied model (reward bias set) saved with save_params, and its params on the host."""
    root = tmp_path_factory.mktemp("export")
    params = tr.init_params(TINY, jax.random.key(3))
    params["reward_head"]["bias"] = params["reward_head"]["bias"] + BIAS
    ckpt = str(root / "ckpt")
    save_params(ckpt, params, model_cfg=TINY, meta={"stage": "test"}, tokenizer_dir=_tokenizer_dir(root / "tok"))
    return ckpt, jax.tree.map(np.asarray, params), root


def _outputs(cfg, graphdef, params):
    """(logits [B, T, V], reward [B]) of the shared test batch."""
    model = tr.bind(graphdef, params)
    hidden, _ = model.hidden(TOKENS, MASK)
    return np.asarray(model.logits(hidden)), np.asarray(model.reward(hidden, MASK))


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("kind", export.KINDS)
def test_hf_layout_round_trip_is_exact(kind, tied):
    cfg = tr.ModelConfig(**{**TINY.__dict__, "tie_embeddings": tied})
    params = jax.tree.map(np.asarray, tr.init_params(cfg, jax.random.key(0)))
    tensors = export.params_to_hf(params, cfg, kind=kind)
    assert tensors["model.layers.0.self_attn.q_proj.weight"].shape == (16, 16)
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (8, 16)
    assert ("lm_head.weight" in tensors) == (not tied) and ("score.weight" in tensors) == (kind == "reward")
    back = pt.hf_to_params(tensors, cfg, source="test", reward_bias=0.0)
    compared = ["embed", "final_norm", "layer_0", "layer_1"] + ([] if tied else ["lm_head"])
    compared += ["reward_head"] if kind == "reward" else []
    for key in compared:
        jax.tree.map(np.testing.assert_array_equal, back[key], params[key])


def test_reward_export_round_trip(checkpoint):
    ckpt, params, root = checkpoint
    out = root / "hf_reward"
    assert export.main(["--checkpoint", ckpt, "--format=hf", "--output", str(out), "--kind=reward"]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["num_labels"] == 1
    assert config["pad_token_id"] == 0 and config[pt.REWARD_BIAS_KEY] == pytest.approx(BIAS)
    tensors = load_file(str(out / "model.safetensors"))
    np.testing.assert_array_equal(tensors["score.weight"], params["reward_head"]["kernel"].T)

    cfg, graphdef, loaded, tok = pt.load_pretrained(str(out))
    assert cfg == TINY and tok.pad_id == 0 and tok.add_bos
    jax.tree.map(
        np.testing.assert_array_equal,
        {k: v for k, v in loaded.items() if k != "value_head"},
        {k: v for k, v in params.items() if k != "value_head"},
    )
    graphdef0 = tr.abstract_model(TINY)[0]
    ours, back = _outputs(TINY, graphdef0, params), _outputs(cfg, graphdef, loaded)
    np.testing.assert_array_equal(back[0], ours[0])
    np.testing.assert_array_equal(back[1], ours[1])


def test_causal_lm_export_and_atomic_output(checkpoint, capsys):
    ckpt, params, root = checkpoint
    out = root / "hf_lm"
    assert export.main(["--checkpoint", ckpt, "--output", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and pt.REWARD_BIAS_KEY not in config
    assert "score.weight" not in load_file(str(out / "model.safetensors"))
    _, _, loaded, _ = pt.load_pretrained(str(out))
    np.testing.assert_array_equal(np.asarray(loaded["lm_head"]), params["lm_head"])
    # An existing output is never replaced without --overwrite; a failed export leaves no directory.
    assert export.main(["--checkpoint", ckpt, "--output", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert export.main(["--checkpoint", str(root / "nope"), "--output", str(root / "x")]) == 1
    assert not (root / "x").exists()
    assert [p for p in os.listdir(root) if ".tmp-" in p] == []


# ------------------------------------------------------------------------------------------ transformers (slow)


@pytest.mark.slow
def test_transformers_loads_reward_and_lm_exports(checkpoint):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    ckpt, params, root = checkpoint
    for kind in export.KINDS:
        export.export_hf(ckpt, str(root / f"tf_{kind}"), kind=kind, overwrite=True)
    graphdef = tr.abstract_model(TINY)[0]
    logits, reward = _outputs(TINY, graphdef, params)
    ids, mask = torch.tensor(TOKENS, dtype=torch.long), torch.tensor(MASK)
    with torch.no_grad():
        lm = transformers.AutoModelForCausalLM.from_pretrained(root / "tf_causal_lm", dtype=torch.float32)
        hf_logits = lm(ids, attention_mask=mask).logits.numpy()
        rm = transformers.AutoModelForSequenceClassification.from_pretrained(root / "tf_reward", dtype=torch.float32)
        hf_reward = rm(ids, attention_mask=mask).logits[:, 0].numpy()
    real = MASK.astype(bool)
    np.testing.assert_allclose(hf_logits[real], logits[real], atol=1e-4)
    # HF's score has no bias: it lands in config.json, and HF's reward is ours minus it.
    np.testing.assert_allclose(hf_reward + BIAS, reward, atol=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec(pt.SMOLLM2_PACKAGE) is None, reason=pt.SMOLLM2_INSTALL)
def test_smollm2_hf_export_matches_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg, graphdef, params, tok = pt.load_pretrained(pt.SMOLLM2_NAME)
    tok_dir = tmp_path / "tok"
    tok.save(tok_dir)
    save_params(str(tmp_path / "ckpt"), params, model_cfg=cfg, meta={}, tokenizer_dir=str(tok_dir))
    out = export.export_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"), kind="causal_lm")
    text = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode_prompt(text)
    forward = logits_lib.make_forward(graphdef)
    ours = logits_lib.text_logits(forward, params, ids, length=64)
    ours_greedy = logits_lib.greedy_continuations(forward, params, [ids], 32, length=64)[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
        seq = list(ids)
        for _ in range(32):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    diff = float(np.abs(ours - ref).max())
    print(f"SmolLM2 HF export vs ours: max abs logit diff {diff:.3g}, greedy equal {seq[len(ids) :] == ours_greedy}")
    assert diff <= 1e-3
    assert seq[len(ids) :] == ours_greedy
