"""WARM vs ENS scoring: reward throughput of one merged RM vs an M-member prediction ensemble.

    python benchmarks/warm_vs_ens.py [--members=4] [--reps=3] [--cases=quickstart,smollm2_135m]

Both sides score the same pairs through ``evaluation.Scorer`` (the code the evaluation stage
runs): WARM with ``Scorer.pairs`` on the averaged parameters, ENS with ``Scorer.stacked_pairs`` on
the [M, ...] stacked members (all M in one vmapped program — the fastest ENS we have; M separate
calls would be slower still). Members are M random inits of one shape (throughput does not depend
on the values). The figure is pairs/s(WARM) / pairs/s(ENS); a merge that costs one model's
inference should reach M, the goal is ≥ 0.9·M. Repetitions interleaved, compile excluded.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from warm_jax import host_memory

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

CASES = {
    # name: (model kwargs, pairs scored per repetition, seq len, scorer batch)
    "quickstart": (dict(vocab_size=409, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=384), 1024, 36, 256),
    "smollm2_135m": (
        common.SMOLLM2_135M,
        16,
        64,
        16,
    ),
}


def run_case(name: str, m: int, reps: int) -> dict:
    import jax
    import jax.numpy as jnp

    from warm_jax import averaging, evaluation, runtime
    from warm_jax.models import transformer as tr

    kw, n, seq, batch = CASES[name]
    cfg = tr.ModelConfig(max_len=seq, **kw)
    mesh = runtime.make_mesh({"data": 1}, devices=jax.devices()[:1])
    graphdef, _, _ = tr.abstract_model(cfg)
    init = jax.jit(lambda k: tr.init_params(cfg, k))
    stacked = jax.jit(lambda *ps: jax.tree.map(lambda *xs: jnp.stack(xs), *ps))(
        *[init(jax.random.key(i)) for i in range(m)]
    )
    merged = averaging.mean_stacked(stacked)
    rng = np.random.default_rng(0)
    data = evaluation.SplitRows.whole(
        {
            "chosen_tokens": rng.integers(3, cfg.vocab_size, (n, seq)).astype(np.int32),
            "rejected_tokens": rng.integers(3, cfg.vocab_size, (n, seq)).astype(np.int32),
            "chosen_length": rng.integers(seq // 2, seq + 1, (n,)).astype(np.int32),
            "rejected_length": rng.integers(seq // 2, seq + 1, (n,)).astype(np.int32),
        }
    )
    scorer = evaluation.Scorer(graphdef, mesh, batch)
    out = {}

    def warm():
        out["warm"] = scorer.pairs(merged, data)

    def ens():
        out["ens"] = scorer.stacked_pairs(stacked, data)

    times = common.interleaved({"warm": warm, "ens": ens}, reps)
    if out["ens"][0].shape != (m, n) or out["warm"][0].shape != (n,):
        raise RuntimeError(f"{name}: unexpected score shapes {out['ens'][0].shape}, {out['warm'][0].shape}")
    pps = {k: [n / t for t in v] for k, v in times.items()}
    return {
        "case": name,
        "members": m,
        "pairs": n,
        "seq_len": seq,
        "batch": batch,
        "pairs_per_s": {k: common.summary(v) for k, v in pps.items()},
        "ratio": common.ratio(pps["warm"], pps["ens"]),
        "goal": 0.9 * m,
    }


def main() -> None:
    host_memory.reexec_with_hugepages()  # measured as `python -m warm_jax.train` runs
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="quickstart,smollm2_135m")
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    results = []
    for name in args.cases.split(","):
        r = run_case(name, args.members, args.reps)
        results.append(r)
        print(
            f"# {name}: WARM {common.fmt(r['pairs_per_s']['warm'], 1)} pairs/s, ENS "
            f"{common.fmt(r['pairs_per_s']['ens'], 1)}",
            flush=True,
        )
        common.write_json(args.output, {"benchmark": "warm_vs_ens", "results": results})
    print(
        common.md_table(
            ["case", "M", "pairs × tokens", "WARM pairs/s", "ENS pairs/s", "ratio", "goal", "met?"],
            [
                [
                    r["case"],
                    r["members"],
                    f"{r['pairs']} × {r['seq_len']}",
                    common.fmt(r["pairs_per_s"]["warm"], 1),
                    common.fmt(r["pairs_per_s"]["ens"], 1),
                    common.fmt(r["ratio"]) + "×",
                    f"≥ {r['goal']:.1f}×",
                    common.met(r["ratio"]["median"], r["goal"]),
                ]
                for r in results
            ],
        )
    )


if __name__ == "__main__":
    main()
