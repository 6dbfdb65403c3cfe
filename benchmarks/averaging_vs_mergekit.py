"""Weight averaging: warm_jax's streaming average vs mergekit's linear merge of the same K checkpoints.

    python benchmarks/averaging_vs_mergekit.py [--ks=4,8] [--reps=3] [--workdir=/tmp/warm_vs_mergekit]

Setup (once, reused while the model and the member format match): 8 members of the SmolLM2-135M
shape (each its own random init, float32, ~538 MB), written twice with the same weights: as
warm_jax checkpoints (``params_io.save_params``: Orbax, uncompressed chunks, + hash manifest) and as
HF Llama safetensors (``export.params_to_hf`` + ``hf_config``), which is what mergekit reads.

Per repetition and per K, each in a FRESH subprocess (its peak RSS is its own), interleaved:

* ours: ``checkpoint_averaging.average_checkpoints`` (read, verify, accumulate, a ~64 MB group of
  leaves in memory at a time) + ``write_merged`` — the work of ``python -m warm_jax.average``;
* mergekit: ``run_merge`` with ``merge_method: linear`` and equal weights, float32 out, on CPU
  (its defaults otherwise; no tokenizer to copy) — the work of ``mergekit-yaml``;
* floor: read every file of the K members once untimed (page cache warm; dropping it needs root),
  then once timed — for each format, since the two formats are not byte-identical.

Times are merge + write of the merged model; "/ floor" is each tool's time over the time to only
read its K inputs: the distance to the physical floor of a merge that must read every byte.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The per-layer layout its cached member checkpoints were written in (rewriting them takes minutes).
SMOLLM2 = dict(common.SMOLLM2_135M, scan_layers=False, max_len=2048)
N_MEMBERS = 8


def ours_dir(workdir: str, i: int) -> str:
    return os.path.join(workdir, "warm_jax", str(i))


def hf_dir(workdir: str, i: int) -> str:
    return os.path.join(workdir, "hf", str(i))


def files_under(dirs: list[str]) -> list[str]:
    return [os.path.join(r, f) for d in dirs for r, _, fs in os.walk(d) for f in fs]


def read_all(paths: list[str], buf: bytearray) -> int:
    """Reads every file fully into a reused buffer; returns the bytes read."""
    total, view = 0, memoryview(buf)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total


def setup(workdir: str, n: int) -> dict:
    """Writes n members in both formats unless a matching set exists."""
    import jax
    import numpy as np
    from safetensors.numpy import save_file

    from warm_jax import export, io_utils, params_io
    from warm_jax.models import transformer as tr

    cfg = tr.ModelConfig(**SMOLLM2)
    stamp = os.path.join(workdir, "setup.json")
    # The stamp names the member format too: members written before uncompressed chunks (zstd) or
    # before the manifest's xxh3-128 digests (checked with sha256 instead) would be read slower.
    want = {"model": dataclasses.asdict(cfg), "members": n, "format": "save_params, uncompressed chunks, xxh3_128"}
    if os.path.isfile(stamp) and io_utils.read_json(stamp) == want:
        return want
    init = jax.jit(lambda key: tr.init_params(cfg, key))
    for i in range(n):
        params = init(jax.random.key(i))
        params_io.save_params(ours_dir(workdir, i), params, model_cfg=cfg, meta={"member": i}, tokenizer_dir=None)
        d = hf_dir(workdir, i)
        os.makedirs(d, exist_ok=True)
        tensors = export.params_to_hf(params, cfg, kind="causal_lm")
        save_file(
            {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
            os.path.join(d, export.WEIGHTS_FILE),
            metadata={"format": "pt"},
        )
        io_utils.atomic_write_json(
            os.path.join(d, "config.json"), export.hf_config(cfg, kind="causal_lm", tokenizer=None)
        )
        del params, tensors
    io_utils.atomic_write_json(stamp, want)
    return want


# ----------------------------------------------------------------------------- children (fresh processes)


def child_ours(k: int, workdir: str) -> dict:
    import jax

    from warm_jax import checkpoint_averaging, runtime

    mesh = runtime.make_mesh({"data": 1}, devices=jax.devices()[:1])
    dirs = [ours_dir(workdir, i) for i in range(k)]
    t0 = time.perf_counter()
    cfg, _, params, info = checkpoint_averaging.average_checkpoints(dirs, mesh=mesh)
    jax.block_until_ready(params)
    t_avg = time.perf_counter() - t0
    checkpoint_averaging.write_merged(
        os.path.join(workdir, "out_warm_jax"),
        params,
        model_cfg=cfg,
        members=dirs,
        weights=info["weights"],
        accuracies=None,
        hashes=info["hashes"],
        tokenizer_dir=None,
    )
    return {"average_s": t_avg, "total_s": time.perf_counter() - t0}


def child_mergekit(k: int, workdir: str) -> dict:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    config = MergeConfiguration.model_validate(
        {
            "merge_method": "linear",
            "dtype": "float32",
            "models": [{"model": hf_dir(workdir, i), "parameters": {"weight": 1.0}} for i in range(k)],
        }
    )
    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, device="cpu")
    t0 = time.perf_counter()
    run_merge(config, os.path.join(workdir, "out_mergekit"), options)
    return {"total_s": time.perf_counter() - t0}


def run_child(tool: str, k: int, workdir: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's merge would run
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), f"--child={tool}", f"--k={k}", f"--workdir={workdir}"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        raise RuntimeError(f"{tool} k={k} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- driver


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ks", default="4,8")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/warm_vs_mergekit")
    ap.add_argument("--output", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--k", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        fn = {"warm_jax": child_ours, "mergekit": child_mergekit}[args.child]
        r = fn(args.k, args.workdir)
        r["peak_rss_mb"] = common.peak_rss_mb()
        print(json.dumps(r))
        return
    ks = [int(x) for x in args.ks.split(",")]
    t0 = time.perf_counter()
    model = setup(args.workdir, max(max(ks), 1))
    print(f"# setup {time.perf_counter() - t0:.0f}s", flush=True)
    buf = bytearray(64 << 20)
    rows: dict[tuple[str, int], list[dict]] = {}
    for rep in range(args.reps):
        for k in ks:
            for tool, dirfn in (("warm_jax", ours_dir), ("mergekit", hf_dir)):
                paths = files_under([dirfn(args.workdir, i) for i in range(k)])
                read_all(paths, buf)
                t1 = time.perf_counter()
                nbytes = read_all(paths, buf)
                floor = time.perf_counter() - t1
                r = run_child(tool, k, args.workdir)
                r.update(tool=tool, k=k, rep=rep, floor_s=floor, read_mb=nbytes / 1e6)
                print(json.dumps(r), flush=True)
                rows.setdefault((tool, k), []).append(r)
    results = []
    for k in ks:
        ours, peer = rows[("warm_jax", k)], rows[("mergekit", k)]
        results.append(
            {
                "k": k,
                "read_mb": {"warm_jax": ours[0]["read_mb"], "mergekit": peer[0]["read_mb"]},
                "total_s": {
                    "warm_jax": common.summary([r["total_s"] for r in ours]),
                    "mergekit": common.summary([r["total_s"] for r in peer]),
                },
                "average_only_s": common.summary([r["average_s"] for r in ours]),
                "floor_s": {
                    "warm_jax": common.summary([r["floor_s"] for r in ours]),
                    "mergekit": common.summary([r["floor_s"] for r in peer]),
                },
                "over_floor": {
                    "warm_jax": common.summary([r["total_s"] / r["floor_s"] for r in ours]),
                    "mergekit": common.summary([r["total_s"] / r["floor_s"] for r in peer]),
                },
                "peak_rss_mb": {
                    "warm_jax": common.summary([r["peak_rss_mb"] for r in ours]),
                    "mergekit": common.summary([r["peak_rss_mb"] for r in peer]),
                },
                "speedup": common.ratio(
                    [r["total_s"] for r in ours], [r["total_s"] for r in peer], higher_is_better=False
                ),
            }
        )
    common.write_json(args.output, {"benchmark": "averaging_vs_mergekit", "model": model["model"], "results": results})
    rows_md = []
    for r in results:
        rows_md.append(
            [
                r["k"],
                f"{r['read_mb']['warm_jax']:.0f} / {r['read_mb']['mergekit']:.0f}",
                common.fmt(r["total_s"]["warm_jax"]),
                common.fmt(r["total_s"]["mergekit"]),
                common.fmt(r["speedup"]) + "×",
                common.met(r["speedup"]["median"], 2.0),
                f"{common.fmt(r['floor_s']['warm_jax'], 2)} / {common.fmt(r['floor_s']['mergekit'], 2)}",
                f"{r['over_floor']['warm_jax']['median']:.1f}× / {r['over_floor']['mergekit']['median']:.1f}×",
                f"{common.fmt(r['peak_rss_mb']['warm_jax'], 0)} / {common.fmt(r['peak_rss_mb']['mergekit'], 0)}",
            ]
        )
    print(
        common.md_table(
            [
                "K",
                "MB read (ours / mergekit)",
                "warm_jax merge+write (s)",
                "mergekit merge+write (s)",
                "speed-up",
                "≥ 2×?",
                "read floor (s) ours / mergekit",
                "time / floor ours / mergekit",
                "peak RSS MB ours / mergekit",
            ],
            rows_md,
        )
    )


if __name__ == "__main__":
    main()
