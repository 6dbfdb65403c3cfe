"""Streaming weight averaging of K member checkpoints: time vs the file-read floor, and peak RSS vs K.

  python benchmarks/averaging.py [--ks=2,4,8] [--reps=3] [--workdir=/tmp/warm_avg_bench]

Writes 8 member checkpoints of one model (default ~134 MB of float32 params) once with
``params_io.save_params``, then per repetition and per K:

* floor: read every file under the K member directories once untimed (to warm the page cache;
  dropping the cache needs root), then read them all again, timed, into a reused buffer;
* stream: ``checkpoint_averaging.average_checkpoints`` in a FRESH subprocess (1 CPU device), then
  ``write_merged``; its peak RSS (``common.peak_rss_mb``: VmHWM) and the RSS before the first read;
* naive: the same subprocess set-up, but all K members loaded first (``load_params_checkpoint``)
  and then reduced with ``mean_stacked`` — what a non-streaming merge costs in memory.

Prints one JSON line per measurement and a table (median and range over repetitions).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_CFG = dict(vocab_size=8192, d_model=1024, n_layers=6, n_heads=4, n_kv_heads=2, d_ff=384, max_len=128)
N_MEMBERS = 8


def member_dirs(workdir: str, k: int) -> list[str]:
    return [os.path.join(workdir, "members", str(i)) for i in range(k)]


def setup(workdir: str) -> dict:
    """Writes the 8 members (each its own random init) unless they exist with this config."""
    import jax

    from warm_jax import io_utils, params_io
    from warm_jax.models import transformer as tr

    cfg = tr.ModelConfig(**BENCH_CFG)
    dirs = member_dirs(workdir, N_MEMBERS)
    ok = all(os.path.isfile(os.path.join(d, "model.json")) for d in dirs) and all(
        io_utils.read_json(os.path.join(d, "model.json"))["model"] == dataclasses.asdict(cfg) for d in dirs
    )
    init = jax.jit(lambda key: tr.init_params(cfg, key))
    n_params = tr.param_count(jax.eval_shape(init, jax.random.key(0)))
    if not ok:
        for i, d in enumerate(dirs):
            params_io.save_params(d, init(jax.random.key(i)), model_cfg=cfg, meta={"member": i}, tokenizer_dir=None)
    return {"params": n_params, "mb": n_params * 4 / 1e6, "disk_mb_per_member": dir_bytes(dirs[0]) / 1e6}


def files_under(dirs: list[str]) -> list[str]:
    return [os.path.join(r, f) for d in dirs for r, _, fs in os.walk(d) for f in fs]


def dir_bytes(d: str) -> int:
    return sum(os.path.getsize(f) for f in files_under([d]))


def read_all(paths: list[str], buf: bytearray) -> int:
    """Reads every file fully (into a reused buffer, so only the read itself is timed); returns bytes."""
    total = 0
    view = memoryview(buf)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total


def child(mode: str, k: int, workdir: str) -> dict:
    """One measurement in this (fresh) process."""
    import psutil

    from warm_jax import averaging, checkpoint_averaging, params_io, runtime, sharding
    from warm_jax.models import transformer as tr

    import jax
    import jax.numpy as jnp

    mesh = runtime.make_mesh({"data": 1}, devices=jax.devices()[:1])
    dirs = member_dirs(workdir, k)
    rss0 = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    if mode == "stream":
        cfg, _, params, info = checkpoint_averaging.average_checkpoints(dirs, mesh=mesh)
        hashes = info["hashes"]
    else:
        loaded = [params_io.load_params_checkpoint(d, mesh) for d in dirs]
        cfg = loaded[0][0]
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[p for _, _, p, _ in loaded])
        del loaded
        _, abstract, axes = tr.abstract_model(cfg)
        single = sharding.named(mesh, sharding.tree_specs(axes, abstract, mesh))
        params = averaging.mean_stacked(stacked, out_shardings=single)
        hashes = {d: "" for d in dirs}
    jax.block_until_ready(params)
    t_avg = time.perf_counter() - t0
    checkpoint_averaging.write_merged(
        os.path.join(workdir, f"merged_{mode}"),
        params,
        model_cfg=cfg,
        members=dirs,
        weights=[1 / k] * k,
        accuracies=None,
        hashes=hashes,
        tokenizer_dir=None,
    )
    t_total = time.perf_counter() - t0
    peak = common.peak_rss_mb() * 1e6
    return {
        "mode": mode,
        "k": k,
        "average_s": t_avg,
        "total_s": t_total,
        "peak_rss_mb": peak / 1e6,
        "rss_before_mb": rss0 / 1e6,
    }


def run_child(mode: str, k: int, workdir: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's merge would run
    out = subprocess.run(
        [sys.executable, __file__, f"--child={mode}", f"--k={k}", f"--workdir={workdir}"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        raise RuntimeError(f"child {mode} k={k} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def fmt(xs: list[float], digits: int = 2) -> str:
    return f"{statistics.median(xs):.{digits}f} [{min(xs):.{digits}f}–{max(xs):.{digits}f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", default="2,4,8")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--modes", default="stream,naive")
    ap.add_argument("--workdir", default="/tmp/warm_avg_bench")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--k", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.k, args.workdir)))
        return
    ks = [int(x) for x in args.ks.split(",")]
    modes = args.modes.split(",")
    t_setup = time.perf_counter()
    model = setup(args.workdir)
    print(json.dumps({"model": BENCH_CFG, **model, "setup_s": round(time.perf_counter() - t_setup, 1)}), flush=True)
    buf = bytearray(64 << 20)
    rows: dict[tuple, list[dict]] = {}
    for rep in range(args.reps):
        for k in ks:
            paths = files_under(member_dirs(args.workdir, k))
            read_all(paths, buf)  # warm the page cache
            t0 = time.perf_counter()
            nbytes = read_all(paths, buf)
            floor = time.perf_counter() - t0
            for mode in modes:
                r = run_child(mode, k, args.workdir)
                r.update(rep=rep, floor_s=floor, read_mb=nbytes / 1e6)
                print(json.dumps(r), flush=True)
                rows.setdefault((mode, k), []).append(r)
    print(
        f"\nmodel: {model['params'] / 1e6:.1f}M float32 params = {model['mb']:.0f} MB per member "
        f"({model['disk_mb_per_member']:.0f} MB on disk); median [min–max] of {args.reps} repetitions; "
        f"{os.cpu_count()} CPU cores, 1 JAX CPU device"
    )
    print(
        "| mode | K | files read (MB) | warm read floor (s) | average (s) | average / floor | "
        "average + write (s) | peak RSS (MB) | peak − RSS before reading (MB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for (mode, k), rs in sorted(rows.items(), key=lambda kv: (kv[0][0] != "stream", kv[0][0], kv[0][1])):
        get = lambda key: [r[key] for r in rs]
        ratio = [r["average_s"] / r["floor_s"] for r in rs]
        grow = [r["peak_rss_mb"] - r["rss_before_mb"] for r in rs]
        print(
            f"| {mode} | {k} | {rs[0]['read_mb']:.0f} | {fmt(get('floor_s'), 3)} | {fmt(get('average_s'))} | "
            f"{fmt(ratio, 1)} | {fmt(get('total_s'))} | {fmt(get('peak_rss_mb'), 0)} | {fmt(grow, 0)} |"
        )


if __name__ == "__main__":
    main()
