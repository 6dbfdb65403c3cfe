"""Export a params checkpoint to Hugging Face format: ``python -m warm_jax.export``.

    python -m warm_jax.export --checkpoint=WORKDIR/rm/warm --format=hf --output=/tmp/warm_rm --kind=reward

``--checkpoint`` is a directory written by ``warm_jax.params_io.save_params`` (``model.json`` + Orbax
``ckpt/``). The output directory holds ``model.safetensors``, ``config.json`` and, when model.json names an
HF-format tokenizer directory, ``tokenizer.json`` + ``tokenizer_config.json``; ``transformers`` loads it as

* ``--kind=causal_lm`` (policies): ``LlamaForCausalLM``. The reward and value heads are dropped.
* ``--kind=reward``: ``LlamaForSequenceClassification`` with ``num_labels=1``; ``score.weight`` [1, d] is our
  reward-head kernel transposed. HF's ``score`` has no bias, so our scalar bias is written to config.json
  as ``warm_jax_reward_bias``: HF's output equals our reward minus that constant, which changes no
  preference, Best-of-N choice or Bradley–Terry probability (they depend on reward differences only),
  and ``load_pretrained`` adds it back. HF pools at the last token that is not ``pad_token_id`` (we pool at
  the last token of the attention mask); with SmolLM2, pad is ``<|im_end|>``, so a sequence that ends in
  it is scored one token earlier by HF unless the caller strips it. When the trunk's LM head is untied,
  ``lm_head.weight`` is kept in the file (HF ignores it) so that the round trip through our importer is
  exact. The value head has no HF counterpart and is not exported.

``warm_jax.models.pretrained.load_pretrained(OUTPUT)`` reads either kind back with the same outputs. The
output is written to a temporary sibling and renamed, so it only ever holds a finished export (``--overwrite``
removes the old one only once the new one is complete). A bad input gives one line on stderr naming the file,
field or flag, and exit status 1 (the traceback too with ``--verbose``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import jax
import numpy as np

from warm_jax import cli_errors, io_utils
from warm_jax.data.tokenizers import Tokenizer, load_tokenizer
from warm_jax.models import transformer as tr
from warm_jax.models.pretrained import REWARD_BIAS_KEY, hf_layer_names

log = logging.getLogger(__name__)

KINDS = ("causal_lm", "reward")
FORMATS = ("hf",)
WEIGHTS_FILE = "model.safetensors"


def params_to_hf(params: dict, cfg: tr.ModelConfig, *, kind: str) -> dict[str, np.ndarray]:
    """Our parameter tree -> HF Llama tensors in HF layout (the inverse of ``pretrained.hf_to_params``).

    Args:
      params: pure dict of arrays (host or device), shapes as in ``transformer.abstract_model(cfg)``
        (either layer layout, as ``cfg.scan_layers`` says).
      kind: 'causal_lm' or 'reward' (adds ``score.weight`` [1, d]).
    """
    if kind not in KINDS:
        raise ValueError(f"export kind {kind!r}; known: {list(KINDS)}")
    p = jax.tree.map(np.asarray, jax.device_get(params))
    if cfg.scan_layers:
        p = tr.unstack_layers(p)
    d, h, k, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.dim_head
    out = {"model.embed_tokens.weight": p["embed"], "model.norm.weight": p["final_norm"]["scale"]}
    for i in range(cfg.n_layers):
        layer, names = p[f"layer_{i}"], hf_layer_names(i)
        attn, mlp = layer["attn"], layer["mlp"]
        # Ours keep the input dimension first ([d, heads, D]); HF's Linear weights are [out, in].
        out[names["attn/wq"]] = attn["wq"].transpose(1, 2, 0).reshape(h * hd, d)
        out[names["attn/wk"]] = attn["wk"].transpose(1, 2, 0).reshape(k * hd, d)
        out[names["attn/wv"]] = attn["wv"].transpose(1, 2, 0).reshape(k * hd, d)
        out[names["attn/wo"]] = attn["wo"].reshape(h * hd, d).T
        out[names["attn_norm/scale"]] = layer["attn_norm"]["scale"]
        out[names["mlp/w_gate"]] = mlp["w_gate"].T
        out[names["mlp/w_up"]] = mlp["w_up"].T
        out[names["mlp/w_down"]] = mlp["w_down"].T
        out[names["mlp_norm/scale"]] = layer["mlp_norm"]["scale"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = p["lm_head"].T
    if kind == "reward":
        out["score.weight"] = p["reward_head"]["kernel"].T
    return {name: np.ascontiguousarray(x) for name, x in out.items()}


def hf_config(cfg: tr.ModelConfig, *, kind: str, tokenizer: Tokenizer | None, reward_bias: float = 0.0) -> dict:
    """config.json for ``cfg`` as a Llama model of the given kind."""
    config = {
        "architectures": ["LlamaForSequenceClassification" if kind == "reward" else "LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.dim_head,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_len,
        "rms_norm_eps": cfg.norm_eps,
        # transformers >= 5 reads rope_parameters; older versions read rope_theta.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": cfg.init_std,
        "dtype": cfg.param_dtype,
        "torch_dtype": cfg.param_dtype,
    }
    if tokenizer is not None:
        config["eos_token_id"] = tokenizer.eos_id
        config["pad_token_id"] = tokenizer.pad_id
        if tokenizer.bos_id is not None:
            config["bos_token_id"] = tokenizer.bos_id
    if kind == "reward":
        config.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
        config[REWARD_BIAS_KEY] = float(reward_bias)
    return config


def _checkpoint_tokenizer(checkpoint: str, meta: dict) -> Tokenizer | None:
    """The tokenizer named by model.json, resolved as given or relative to the checkpoint directory."""
    name = meta.get("tokenizer")
    if not name:
        return None
    for candidate in (name, os.path.join(checkpoint, name)):
        if os.path.exists(candidate):
            return load_tokenizer(candidate)
    raise FileNotFoundError(f"{checkpoint}/model.json: field 'tokenizer' names {name!r}, which does not exist")


def export_hf(checkpoint: str, output: str, *, kind: str = "causal_lm", overwrite: bool = False) -> Path:
    """Writes the HF-format export of a ``save_params`` checkpoint to ``output``; returns its path."""
    from safetensors.numpy import save_file

    from warm_jax import runtime
    from warm_jax.params_io import load_params_checkpoint

    if kind not in KINDS:
        raise ValueError(f"--kind={kind!r}; known: {list(KINDS)}")
    io_utils.recover(checkpoint)
    if not os.path.isdir(checkpoint):
        what = "is a file, not a directory" if os.path.exists(checkpoint) else "does not exist"
        raise FileNotFoundError(f"{checkpoint}: {what} (expected a save_params checkpoint: model.json + ckpt/)")
    if not os.path.isfile(os.path.join(checkpoint, "model.json")):
        raise FileNotFoundError(f"{checkpoint}: no model.json (not a save_params checkpoint)")
    src, dst = os.path.realpath(checkpoint), os.path.realpath(output)
    for overlaps, why in (
        (src == dst, f"is the same directory ({src}): the export would replace its own input"),
        (src.startswith(dst + os.sep), f"contains it ({src}): replacing the output would delete the input"),
        (dst.startswith(src + os.sep), f"lies inside it ({src}): the export would be written into its input"),
    ):
        if overlaps:
            raise ValueError(f"output {output} and checkpoint {checkpoint}: the output {why}; choose another output")
    io_utils.output_directory(output, overwrite=overwrite)  # a file or an existing output: refused before any work
    # Export is a host-side conversion: one device holds the whole tree.
    mesh = runtime.make_mesh({"data": 1}, devices=jax.local_devices()[:1])
    cfg, _, params, meta = load_params_checkpoint(checkpoint, mesh)
    tokenizer = _checkpoint_tokenizer(checkpoint, meta)
    tensors = params_to_hf(params, cfg, kind=kind)
    bias = float(np.asarray(jax.device_get(params["reward_head"]["bias"])).reshape(-1)[0])
    config = hf_config(cfg, kind=kind, tokenizer=tokenizer, reward_bias=bias)
    with io_utils.atomic_directory(output, overwrite=overwrite) as tmp:
        save_file(tensors, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
        io_utils.atomic_write_json(os.path.join(tmp, "config.json"), config)
        if tokenizer is not None and tokenizer.kind == "hf":
            tokenizer.save(tmp)
        elif tokenizer is not None:
            # transformers cannot read our word-level tokenizer file; the weights still load.
            log.warning("%s: tokenizer kind %r has no HF equivalent; not exported", checkpoint, tokenizer.kind)
    return Path(output)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m warm_jax.export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a save_params directory (model.json + ckpt/)")
    parser.add_argument("--format", default="hf", choices=FORMATS)
    parser.add_argument("--output", required=True, help="output directory (written atomically)")
    parser.add_argument("--kind", default="causal_lm", choices=KINDS, help="HF model class to target")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--verbose", action="store_true", help="print the traceback of an error too")
    args = parser.parse_args(argv)

    def run() -> int:
        print(export_hf(args.checkpoint, args.output, kind=args.kind, overwrite=args.overwrite))
        return 0

    return cli_errors.guarded(run, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
