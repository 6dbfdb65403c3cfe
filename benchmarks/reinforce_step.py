"""REINFORCE step: generated tokens/s and the share of step time spent generating vs updating.

    python benchmarks/reinforce_step.py [--cases=quickstart,smollm2_135m] [--reps=3]

One step is what ``policy.reinforce.StepRunner`` does: sample ``prompts × k`` responses with the
KV-cache sampler (temperature 0.9, EOS disabled so every row yields exactly ``max_new_tokens``),
then one jitted ``reinforce_update`` (policy and reference log-probs, the reward model's score,
value baseline, Adam) — the two halves timed separately, as StepRunner times them. The reward is a
single RM of the policy's shape (a WARM merge costs the same). Random weights (throughput does not
depend on them); compile excluded; median and range over repetitions.

There is no peer in this figure: it shows where a step's time goes.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time

import numpy as np

from warm_jax import host_memory

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

CASES = {
    # name: (model kwargs, prompts per step, samples per prompt, prompt len, new tokens)
    "quickstart": (dict(vocab_size=409, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=384), 16, 4, 12, 23),
    "smollm2_135m": (
        common.SMOLLM2_135M,
        4,
        2,
        32,
        32,
    ),
}


def run_case(name: str, reps: int) -> dict:
    import jax
    import jax.numpy as jnp

    from warm_jax import train_state
    from warm_jax.models import transformer as tr
    from warm_jax.policy import reinforce, rewards, sampler

    kw, prompts, k, p_len, new = CASES[name]
    cfg = reinforce.ReinforceConfig(prompts_per_step=prompts, samples_per_prompt=k)
    model_cfg = tr.ModelConfig(max_len=p_len + new, **kw)
    graphdef, _, _ = tr.abstract_model(model_cfg)
    init = jax.jit(lambda key: tr.init_params(model_cfg, key))
    ref_params, rm_params = init(jax.random.key(0)), init(jax.random.key(1))
    tx = reinforce.make_optimizer(cfg)
    state = jax.jit(lambda p: train_state.new_state(p, tx, jax.random.key(2)))(ref_params)
    rm = rewards.RewardFn("warm", graphdef, rm_params, None)
    scfg = sampler.SamplingConfig(max_new_tokens=new, temperature=cfg.temperature, eos_id=-1, pad_id=0)
    sample = sampler.make_sampler(graphdef, model_cfg, scfg)
    update = jax.jit(
        functools.partial(reinforce.reinforce_update, graphdef=graphdef, rm_apply=rm.apply, tx=tx, cfg=cfg, pad_id=0),
        donate_argnums=0,
    )
    rows = prompts * k
    rng = np.random.default_rng(0)
    one = rng.integers(3, model_cfg.vocab_size, (prompts, p_len)).astype(np.int32)
    toks = jnp.asarray(np.repeat(one, k, axis=0))  # k consecutive rows per prompt, as the loop builds them
    mask = jnp.ones_like(toks)
    box = {"state": state, "gen": [], "upd": []}

    def step() -> float:
        s = box["state"]
        t0 = time.perf_counter()
        gen = sample(s.params, toks, mask, jax.random.fold_in(s.step_key(), 0))
        jax.block_until_ready(gen)
        t1 = time.perf_counter()
        batch = {
            "prompt_tokens": toks,
            "prompt_mask": mask,
            "response_tokens": gen["tokens"],
            "response_mask": gen["mask"],
        }
        box["state"], metrics = update(s, ref_params, rm.state, batch)
        jax.block_until_ready(metrics)
        t2 = time.perf_counter()
        box["gen"].append(t1 - t0)
        box["upd"].append(t2 - t1)
        box["generated"] = int(np.asarray(gen["mask"]).sum())
        return t2 - t0

    times = common.interleaved({"step": step}, reps)["step"]
    gen_t, upd_t = box["gen"][-reps:], box["upd"][-reps:]
    if box["generated"] != rows * new:
        raise RuntimeError(f"{name}: {box['generated']} tokens generated, expected {rows * new}")
    return {
        "case": name,
        "model": dataclasses.asdict(model_cfg),
        "rows": rows,
        "prompt_len": p_len,
        "new_tokens": new,
        "step_s": common.summary(times),
        "generate_s": common.summary(gen_t),
        "update_s": common.summary(upd_t),
        "generated_tokens_per_s": common.summary([rows * new / g for g in gen_t]),
        "step_tokens_per_s": common.summary([rows * new / t for t in times]),
        "generate_share": common.summary([g / t for g, t in zip(gen_t, times)]),
    }


def main() -> None:
    host_memory.reexec_with_hugepages()  # measured as `python -m warm_jax.train` runs
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="quickstart,smollm2_135m")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    results = []
    for name in args.cases.split(","):
        r = run_case(name, args.reps)
        results.append(r)
        common.write_json(args.output, {"benchmark": "reinforce_step", "results": results})
    print(
        common.md_table(
            [
                "case",
                "rows × (prompt + new)",
                "step (s)",
                "generate (s)",
                "update (s)",
                "generated tok/s (sampling)",
                "generated tok/s (whole step)",
                "share generating",
            ],
            [
                [
                    r["case"],
                    f"{r['rows']} × ({r['prompt_len']} + {r['new_tokens']})",
                    common.fmt(r["step_s"], 3),
                    common.fmt(r["generate_s"], 3),
                    common.fmt(r["update_s"], 3),
                    common.fmt(r["generated_tokens_per_s"], 0),
                    common.fmt(r["step_tokens_per_s"], 0),
                    common.fmt(r["generate_share"], 2, 100) + " %",
                ]
                for r in results
            ],
        )
    )


if __name__ == "__main__":
    main()
