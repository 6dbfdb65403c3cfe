"""Fused (cuDNN) attention vs the plain XLA softmax on this machine's accelerator.

Same parameters, same tokens, left-padded rows (a dense mask) and right-padded ones (causal + key
lengths, which the fused kernel builds itself): reward, its gradient and the KV-cache
decode must agree (within bfloat16 rounding) and stay finite. A fully masked query row (a pad
position under left padding) is where fused kernels differ most: NaN there would leak into every
position of the next layer through 0 × NaN in the value matmul.

  python benchmarks/attention_parity.py              # GPU: cudnn vs xla
  python benchmarks/attention_parity.py --impl auto  # whatever jax picks
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np

from warm_jax.models import transformer as tr


def run(impl: str, dtype: str) -> dict:
    base = tr.ModelConfig(vocab_size=256, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=256, max_len=64)
    base = dataclasses.replace(base, dtype=dtype)
    params = tr.init_params(base, jax.random.key(0))
    rng = np.random.default_rng(0)
    b, t = 8, 48
    tokens = jnp.asarray(rng.integers(3, base.vocab_size, (b, t)), jnp.int32)
    lengths = np.array([48, 40, 33, 17, 48, 9, 25, 2])
    right = jnp.asarray(np.arange(t)[None] < lengths[:, None], jnp.int32)
    left = jnp.asarray(np.arange(t)[None] >= (t - lengths)[:, None], jnp.int32)

    def reward_fn(cfg, p, mask, right_padded):
        model = tr.bind(tr.abstract_model(cfg)[0], p)  # the graphdef carries cfg.attention
        h, _ = model.hidden(tokens, mask, right_padded=right_padded)  # right: the fused kernel masks by lengths
        return model.reward(h, mask)

    out = {"impl": impl, "dtype": dtype}
    for name, mask in (("right_pad", right), ("left_pad", left)):
        vals = {}
        for attention in ("xla", impl):
            cfg = dataclasses.replace(base, attention=attention)
            rp = name == "right_pad"
            f = jax.jit(lambda p, m, cfg=cfg, rp=rp: jax.value_and_grad(lambda q: reward_fn(cfg, q, m, rp).sum())(p))
            r = jax.jit(lambda p, m, cfg=cfg, rp=rp: reward_fn(cfg, p, m, rp))(params, mask)
            loss, grad = f(params, mask)
            vals[attention] = (np.asarray(r, np.float32), jax.tree.map(lambda g: np.asarray(g, np.float32), grad))
        (r0, g0), (r1, g1) = vals["xla"], vals[impl]
        gdiff = max(jax.tree.leaves(jax.tree.map(lambda a, c: float(np.max(np.abs(a - c))), g0, g1)))
        gscale = max(jax.tree.leaves(jax.tree.map(lambda a: float(np.max(np.abs(a))), g0)))
        out[name] = {
            "reward_max_abs_diff": float(np.max(np.abs(r0 - r1))),
            "reward_scale": float(np.max(np.abs(r0))),
            "grad_max_abs_diff": gdiff,
            "grad_scale": gscale,
            "finite": bool(np.isfinite(r1).all() and all(np.isfinite(g).all() for g in jax.tree.leaves(g1))),
        }
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impl", default="cudnn")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    print(f"# backend={jax.default_backend()} {jax.devices()[0].device_kind} jax {jax.__version__}", flush=True)
    print(json.dumps(run(args.impl, args.dtype)), flush=True)


if __name__ == "__main__":
    main()
