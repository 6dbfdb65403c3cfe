"""Ensemble step: M vmapped members in ONE jitted step vs M single-member steps one after another.

Same per-member work in both (batch, sequence length, model); the ratio
t(vmapped M) / (M · t(single)) is what the ensemble axis buys (< 1 = faster). Also reports
tokens/s and model-FLOPs utilisation against the measured matmul peak of this machine in the
same dtype (or --peak_tflops).

  python benchmarks/ensemble_step.py                      # CPU: quickstart size and d_model=512
  python benchmarks/ensemble_step.py --preset=gpu_mfu     # one GPU: bf16, SmolLM2-135M and 1B shapes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import common
from warm_jax import ensemble, host_memory, pretrain, runtime, sharding
from warm_jax.models import transformer as tr

PRESETS = {
    # (name, model kwargs, members, pairs per member, seq len)
    "cpu": [
        (
            "quickstart d128x2",
            dict(vocab_size=409, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=384),
            4,
            32,
            36,
        ),
        ("d512x4", dict(vocab_size=409, d_model=512, n_layers=4, n_heads=8, n_kv_heads=4, d_ff=1536), 4, 8, 36),
    ],
    "gpu_mfu": [
        # Per-layer stack with the 'minimal' remat policy: on one H200 0.156 s/step, 35.4% MFU (no remat and a
        # dense attention mask, a session earlier: 0.189 s, 29.4%). Compiles for ~2.5 min.
        ("smollm2-135m shape", dict(common.SMOLLM2_135M, scan_layers=False), 4, 16, 512),
        # The scanned stack, as gin/models/smollm2_135m.gin runs it: 0.176 s/step, 32.2%.
        ("smollm2-135m scan", common.SMOLLM2_135M, 4, 16, 512),
        (
            "1B llama shape",
            dict(vocab_size=32768, d_model=2048, n_layers=16, n_heads=16, n_kv_heads=8, d_ff=8192),
            2,
            8,
            1024,
        ),
    ],
}


def measure_peak_tflops(dtype, n: int, reps: int = 10) -> float:
    """Sustained matmul throughput of one device in ``dtype`` (the MFU denominator)."""
    a = jnp.ones((n, n), dtype)
    b = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(reps):
        out = f(a, b)
    out.block_until_ready()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def make_step(model_cfg, m: int, pairs: int, seq: int, mesh, dropout: float = 0.1):
    cfg = ensemble.EnsembleConfig(num_members=m, learning_rates=(1e-4,), dropout_rates=(dropout,), batch_size=pairs)
    graphdef, params, specs = pretrain.sharded_init(model_cfg, mesh, jax.random.key(0))
    tx, state_sh, state, _ = ensemble.stack_state(mesh, cfg, [params] * m, specs, list(range(m)))
    batch_sh = sharding.batch_sharding(mesh, 3, members="stacked")
    len_sh = sharding.batch_sharding(mesh, 2, members="stacked")
    shardings = {k: (len_sh if k.endswith("length") else batch_sh) for k in ensemble.RM_FIELDS}
    member_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.ENSEMBLE))
    step = ensemble.ensemble_step_fn(graphdef, tx, cfg, state_sh, shardings, member_sh, sharding.replicated(mesh))
    rng = np.random.default_rng(0)
    batch = {
        "chosen_tokens": rng.integers(3, model_cfg.vocab_size, (m, pairs, seq)).astype(np.int32),
        "rejected_tokens": rng.integers(3, model_cfg.vocab_size, (m, pairs, seq)).astype(np.int32),
        "chosen_length": np.full((m, pairs), seq, np.int32),
        "rejected_length": np.full((m, pairs), seq - 3, np.int32),
    }
    batch = {k: jax.device_put(v, shardings[k]) for k, v in batch.items()}
    drops = jax.device_put(jnp.full((m,), dropout, jnp.float32), member_sh)
    return step, state, batch, drops


def time_steps(step, state, batch, drops, n: int, calls_per_step: int = 1):
    """Seconds per (calls_per_step chained calls) after one warm-up compile, and the last state (the
    step donates its input)."""
    state, metrics = step(state, batch, drops)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        for _ in range(calls_per_step):
            state, metrics = step(state, batch, drops)
        jax.block_until_ready((state.params, metrics))
        times.append(time.perf_counter() - t0)
    return times, state


def profile_steps(step, state, batch, drops, out_dir: str, n: int = 3) -> dict:
    """Trace n steps into out_dir (Perfetto JSON), write the optimized HLO beside it; kernel totals."""
    import gzip

    import trace_summary

    os.makedirs(out_dir, exist_ok=True)
    with gzip.open(os.path.join(out_dir, "step.hlo.txt.gz"), "wt") as f:
        f.write(step.lower(state, batch, drops).compile().as_text())
    with jax.profiler.trace(out_dir, create_perfetto_trace=True):
        for _ in range(n):
            state, metrics = step(state, batch, drops)
        jax.block_until_ready((state.params, metrics))
    summary = trace_summary.summarize(trace_summary.load_trace(out_dir), top=60)
    with open(os.path.join(out_dir, "kernels.json"), "w") as f:
        json.dump({"steps": n, "threads": summary}, f, indent=1)
    return summary


def run_case(
    name, model_kwargs, m, pairs, seq, dtype, steps, peak, attention="xla", sequential=True, dropout=0.1, profile=None
):
    mesh = runtime.make_mesh({"ensemble": 1, "data": -1})
    model_cfg = tr.ModelConfig(max_len=seq, dtype=dtype, attention=attention, **model_kwargs)
    t0 = time.perf_counter()
    step_m, state_m, batch_m, drops_m = make_step(model_cfg, m, pairs, seq, mesh, dropout)
    t_vmapped, state_m = time_steps(step_m, state_m, batch_m, drops_m, steps)
    setup_s = time.perf_counter() - t0 - sum(t_vmapped)  # init + compile + the warm-up step
    if profile:
        summary = profile_steps(step_m, state_m, batch_m, drops_m, profile)
        for where, s in list(summary.items())[:3]:
            print(f"# profile {where}: {s['total_ms']:.1f} ms / 3 steps; top: {s['top'][:8]}", flush=True)
    del state_m
    tokens = m * 2 * pairs * seq
    flops = tr.flops_per_token(model_cfg, seq, training=True, lm_head=False) * tokens  # RMs have no LM head
    med_v = statistics.median(t_vmapped)
    out = {
        "case": name,
        "dtype": dtype,
        "attention": attention,
        "members": m,
        "pairs_per_member": pairs,
        "dropout": dropout,
        "seq_len": seq,
        "params_per_member_M": round(
            tr.param_count(jax.eval_shape(lambda: tr.init_params(model_cfg, jax.random.key(0)))) / 1e6, 1
        ),
        "vmapped_s": [round(t, 4) for t in t_vmapped],
        "vmapped_setup_s": round(setup_s, 1),
        "tokens_per_s_vmapped": round(tokens / med_v, 1),
        "model_tflops_vmapped": round(flops / med_v / 1e12, 3),
        "mfu_vmapped": round(flops / med_v / 1e12 / peak, 3) if peak else None,
        "peak_tflops": round(peak, 2) if peak else None,
    }
    if sequential:
        step_1, state_1, batch_1, drops_1 = make_step(model_cfg, 1, pairs, seq, mesh, dropout)
        t_seq, _ = time_steps(step_1, state_1, batch_1, drops_1, steps, calls_per_step=m)
        med_s = statistics.median(t_seq)
        out["sequential_s"] = [round(t, 4) for t in t_seq]
        out["ratio_median"] = round(med_v / med_s, 3)
        out["ratio_range"] = [round(min(t_vmapped) / max(t_seq), 3), round(max(t_vmapped) / min(t_seq), 3)]
    return out


def main():
    host_memory.reexec_with_hugepages()  # measured as `python -m warm_jax.train` runs
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    ap.add_argument("--dtype", default=None, help="activation dtype (default: float32 on CPU, bfloat16 on GPU)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--peak_tflops", type=float, default=None, help="skip the matmul peak measurement")
    ap.add_argument("--only", default=None, help="run only cases whose name contains this")
    ap.add_argument("--output", default=None, help="also write the JSON here")
    ap.add_argument("--attention", default="xla", help="comma-separated: xla, cudnn, auto")
    ap.add_argument(
        "--no_sequential", action="store_true", help="time the vmapped step only (MFU runs: halves the compiles)"
    )
    ap.add_argument("--dropout", type=float, default=0.1, help="every member's dropout rate (0: no masks drawn)")
    ap.add_argument("--profile", default=None, help="trace 3 steps of each case into this directory (+ HLO)")
    ap.add_argument(
        "--remat_policy", default=None, help="override the preset: 'none' (no remat) or a tr.REMAT_POLICIES name"
    )
    ap.add_argument("--pairs", type=int, default=None, help="pairs per member instead of the preset's")
    args = ap.parse_args()
    dtype = args.dtype or ("bfloat16" if jax.default_backend() == "gpu" else "float32")
    peak = args.peak_tflops or measure_peak_tflops(jnp.dtype(dtype), 8192 if jax.default_backend() == "gpu" else 1024)
    print(
        f"# backend={jax.default_backend()} devices={jax.device_count()} {jax.devices()[0].device_kind} "
        f"dtype={dtype} matmul peak={peak:.2f} TFLOP/s",
        flush=True,
    )
    results = []
    for name, kw, m, pairs, seq in PRESETS[args.preset]:
        if args.only and args.only not in name:
            continue
        if args.remat_policy:
            off = args.remat_policy == "none"
            remat = dict(remat=False) if off else dict(remat=True, remat_policy=args.remat_policy)
            kw, name = dict(kw, **remat), f"{name} remat={args.remat_policy}"
        pairs = args.pairs or pairs
        for attention in args.attention.split(","):
            try:
                prof = args.profile and os.path.join(args.profile, f"{name}-{attention}".replace(" ", "_"))
                opts = dict(sequential=not args.no_sequential, dropout=args.dropout, profile=prof)
                r = run_case(name, kw, m, pairs, seq, dtype, args.steps, peak, attention, **opts)
            except Exception as e:  # e.g. a fused kernel this GPU/jax build lacks: report, go on
                r = {"case": name, "attention": attention, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            results.append(r)
            print(json.dumps(r), flush=True)
            if args.output:
                with open(args.output, "w") as f:
                    json.dump(
                        {
                            "backend": jax.default_backend(),
                            "device": jax.devices()[0].device_kind,
                            "peak_tflops": peak,
                            "results": results,
                        },
                        f,
                        indent=2,
                    )


if __name__ == "__main__":
    main()
