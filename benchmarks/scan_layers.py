"""Compile and step time of one ensemble training step: layers unrolled (loop) vs scanned (``scan_layers``).

SmolLM2-135M width (d 576, 9 heads, 3 KV heads, head dim 64, d_ff 1536) at several depths, a small vocabulary
and a tiny batch, so the figure is dominated by the layers. Each (depth, layout) runs in a fresh process
(no in-process compile cache shared between cases).

  python benchmarks/scan_layers.py                         # depths 12,30; loop, scan, scan+remat
  python benchmarks/scan_layers.py --depths=30 --layouts=loop,scan --steps=3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from warm_jax import host_memory

LAYOUTS = {
    "loop": dict(scan_layers=False),
    "scan": dict(scan_layers=True),
    "scan_remat": dict(scan_layers=True, remat=True),
}
WIDTH = dict(vocab_size=512, d_model=576, n_heads=9, n_kv_heads=3, head_dim=64, d_ff=1536, rope_theta=1e5)


def one_case(depth: int, layout: str, members: int, pairs: int, seq: int, steps: int) -> dict:
    import jax

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from ensemble_step import make_step

    from warm_jax import runtime
    from warm_jax.models import transformer as tr

    mesh = runtime.make_mesh({"ensemble": 1, "data": -1})
    cfg = tr.ModelConfig(n_layers=depth, max_len=seq, **WIDTH, **LAYOUTS[layout])
    step, state, batch, drops = make_step(cfg, members, pairs, seq, mesh)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch, drops).compile()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps + 1):  # the first call also pays for buffer set-up
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch, drops)
        jax.block_until_ready((state.params, metrics))
        times.append(time.perf_counter() - t0)
    return {
        "depth": depth,
        "layout": layout,
        "members": members,
        "pairs": pairs,
        "seq": seq,
        "compile_s": round(compile_s, 1),
        "step_s_median": round(statistics.median(times[1:]), 3),
        "step_s": [round(t, 3) for t in times[1:]],
    }


def main():
    host_memory.reexec_with_hugepages()  # measured as `python -m warm_jax.train` runs
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", default="12,30")
    ap.add_argument("--layouts", default="loop,scan,scan_remat")
    ap.add_argument("--members", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)  # 'depth:layout', run in this process
    args = ap.parse_args()
    if args.case:
        depth, layout = args.case.split(":")
        print(json.dumps(one_case(int(depth), layout, args.members, args.pairs, args.seq, args.steps)), flush=True)
        return
    for depth in args.depths.split(","):
        for layout in args.layouts.split(","):
            cmd = [sys.executable, __file__, f"--case={depth}:{layout}"]
            cmd += [f"--members={args.members}", f"--pairs={args.pairs}", f"--seq={args.seq}", f"--steps={args.steps}"]
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = out.stdout.strip().splitlines()[-1:] or [
                json.dumps({"case": f"{depth}:{layout}", "error": out.stderr[-500:]})
            ]
            print(line[0], flush=True)


if __name__ == "__main__":
    main()
