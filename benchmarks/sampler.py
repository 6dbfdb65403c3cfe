"""New tokens/s of the KV-cache sampler against a plain decoding loop without a cache.

    python benchmarks/sampler.py [--models quickstart,smollm2_135m] [--reps 3]

The baseline re-runs a jitted full forward over a fixed [B, P + N] buffer for every new token
(the loop a first implementation writes); the sampler prefills once and decodes from the KV
cache inside one compiled ``lax.while_loop``. Both decode greedily with EOS disabled, so both
produce exactly N tokens per row (and the same tokens: checked). Random weights; compile time
excluded (one warm-up call each). Prints a markdown table: median and [min, max] over reps.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import common
from warm_jax.models import transformer as tr
from warm_jax.policy import sampler

MODELS = {
    "quickstart": tr.ModelConfig(
        vocab_size=409, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=384, max_len=128
    ),
    "smollm2_135m": tr.ModelConfig(max_len=128, **common.SMOLLM2_135M),
}


def no_cache_decode(params, prompt_tokens, prompt_mask, *, graphdef, n: int):
    """Greedy decoding by a full forward per new token over a fixed [B, P + n] buffer (host loop)."""

    @jax.jit
    def step(params, toks, mask, i):
        logits = tr.bind(graphdef, params)(toks, mask)  # [B, P + n, V]
        pos = prompt_tokens.shape[1] + i - 1
        nxt = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, pos, 1, keepdims=False), -1).astype(jnp.int32)
        toks = jax.lax.dynamic_update_index_in_dim(toks, nxt, pos + 1, 1)
        mask = jax.lax.dynamic_update_index_in_dim(mask, jnp.ones_like(nxt), pos + 1, 1)
        return toks, mask

    b, p = prompt_tokens.shape
    toks = jnp.concatenate([prompt_tokens, jnp.zeros((b, n), jnp.int32)], 1)
    mask = jnp.concatenate([prompt_mask, jnp.zeros((b, n), jnp.int32)], 1)

    def run(params):
        t, m = toks, mask
        for i in range(n):
            t, m = step(params, t, m, jnp.int32(i))
        return t[:, p:]

    return run


def timed(fn, reps: int) -> list[float]:
    jax.block_until_ready(fn())  # compile + warm-up
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - t0)
    return out


def bench(name: str, batch: int, reps: int, prompt_len: int, new: int) -> dict:
    cfg = MODELS[name]
    graphdef, _, _ = tr.abstract_model(cfg)
    params = jax.jit(lambda k: tr.init_params(cfg, k))(jax.random.key(0))
    rng = np.random.default_rng(0)
    prompts = jnp.asarray(rng.integers(4, cfg.vocab_size, size=(batch, prompt_len)), jnp.int32)
    mask = jnp.ones_like(prompts)
    scfg = sampler.SamplingConfig(max_new_tokens=new, temperature=0.0, eos_id=-1, pad_id=0)
    cached = sampler.make_sampler(graphdef, cfg, scfg)
    baseline = no_cache_decode(params, prompts, mask, graphdef=graphdef, n=new)
    a = np.asarray(cached(params, prompts, mask, jax.random.key(0))["tokens"])
    b = np.asarray(baseline(params))
    agree = float((a == b).mean())
    t_cache = timed(lambda: cached(params, prompts, mask, jax.random.key(0))["tokens"], reps)
    t_base = timed(lambda: baseline(params), reps)
    tps = lambda ts: sorted(batch * new / t for t in ts)
    c, n_ = tps(t_cache), tps(t_base)
    return {
        "model": name,
        "batch": batch,
        "cached": c,
        "no_cache": n_,
        "agree": agree,
        "ratio": float(np.median(c) / np.median(n_)),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="quickstart,smollm2_135m")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompt_len", type=int, default=32)
    ap.add_argument("--new_tokens", type=int, default=64)
    args = ap.parse_args()
    print(
        f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; prompt {args.prompt_len}, "
        f"{args.new_tokens} new tokens, {args.reps} reps"
    )
    print(
        "| model | batch | KV-cache sampler tok/s (median [min, max]) | no-cache loop tok/s | speed-up | same tokens |"
    )
    print("|---|---|---|---|---|---|")
    fmt = lambda v: f"{np.median(v):,.0f} [{v[0]:,.0f}, {v[-1]:,.0f}]"
    for name in args.models.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            r = bench(name, batch, args.reps, args.prompt_len, args.new_tokens)
            print(
                f"| {name} | {batch} | {fmt(r['cached'])} | {fmt(r['no_cache'])} | {r['ratio']:.1f}x | "
                f"{r['agree']:.0%} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
