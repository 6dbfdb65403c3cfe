"""What huge-page malloc (warm_jax/host_memory.py) buys the reward-model step on this CPU.

    python benchmarks/hugepages.py [--cases=tiny,smollm2_135m] [--reps=3] [--output=hugepages.json]

The step of ``rm_throughput.py`` (one member, float32, 8 pairs × 128 tokens) with glibc's default
pages and as ``python -m warm_jax.train`` starts itself (``GLIBC_TUNABLES`` with
``glibc.malloc.hugetlb=1``). Each side runs **alone** on the machine, as a training job does: a
fresh process per block (warm-up, then 20 steps of the tiny model or 3 of the 135M one), blocks
alternating between the sides, ``--reps`` blocks each. (Alternating single steps of two live
processes, as the peer benchmarks do, showed no gain: 0.83-0.96x, see BENCHMARKS.md.) Besides the
step time: minor page faults and system CPU seconds per step (``getrusage`` around each step).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import rm_throughput  # noqa: E402

from warm_jax import host_memory  # noqa: E402


def counted_worker(model_kwargs: dict, pairs: int, seq: int):
    """``common.Worker`` factory: ours' RM step, reporting its page faults and system time."""
    import resource

    run, info = rm_throughput.ours_worker(model_kwargs, pairs, seq)

    def counted() -> dict:
        before = resource.getrusage(resource.RUSAGE_SELF)
        out = run()
        after = resource.getrusage(resource.RUSAGE_SELF)
        return {**out, "faults": after.ru_minflt - before.ru_minflt, "sys_s": after.ru_stime - before.ru_stime}

    return counted, {**info, "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}


def default_pages_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != host_memory.OPT_IN}
    items = [i for i in env.get("GLIBC_TUNABLES", "").split(":") if i and i.split("=")[0] != host_memory.TUNABLE]
    env["GLIBC_TUNABLES"] = ":".join(items)
    return env


def _block(side: str, env: dict, kw: dict, pairs: int, seq: int, steps: int) -> dict:
    """One side alone on the machine: a fresh process, a warm-up step, then ``steps`` timed ones."""
    with common.Worker(counted_worker, kw, pairs, seq, env=env) as w:
        w()
        seconds, faults, sys_s = [], [], []
        for _ in range(steps):
            seconds.append(w())
            faults.append(w.last["faults"])
            sys_s.append(w.last["sys_s"])
    print(f"  {side}: {statistics.median(seconds):.3f} s/step", file=sys.stderr, flush=True)
    return {
        "step_s": statistics.median(seconds),
        "faults": statistics.median(faults),
        "sys_s": statistics.median(sys_s),
    }


def run_case(name: str, rounds: int, steps: int) -> dict:
    """``rounds`` × (each side alone for ``steps`` steps), sides alternating; per side, the medians
    of its blocks."""
    kw, pairs, seq = rm_throughput.CASES[name]
    sides = {"huge": common.ours_env(), "default": default_pages_env()}
    if sides["huge"].get("GLIBC_TUNABLES", "") == sides["default"]["GLIBC_TUNABLES"]:
        raise SystemExit(f"this machine gets no huge-page malloc ({host_memory.describe()}): nothing to compare")
    blocks: dict[str, list[dict]] = {side: [] for side in sides}
    for _ in range(rounds):
        for side, env in sides.items():
            blocks[side].append(_block(side, env, kw, pairs, seq, steps))
    per = {side: {key: [b[key] for b in bs] for key in bs[0]} for side, bs in blocks.items()}
    return {
        "case": name,
        "steps_per_block": steps,
        "step_s": {side: common.summary(v["step_s"]) for side, v in per.items()},
        "faults_per_step": {side: common.summary(v["faults"]) for side, v in per.items()},
        "sys_s_per_step": {side: common.summary(v["sys_s"]) for side, v in per.items()},
        "speedup": common.ratio(per["huge"]["step_s"], per["default"]["step_s"], higher_is_better=False),
        "glibc_tunables": {side: env.get("GLIBC_TUNABLES", "") for side, env in sides.items()},
    }


def table(results: list[dict]) -> str:
    rows = [
        [
            r["case"],
            f"{r['faults_per_step']['default']['median']:,.0f} / {r['faults_per_step']['huge']['median']:,.0f}",
            f"{r['sys_s_per_step']['default']['median']:.3f} / {r['sys_s_per_step']['huge']['median']:.3f}",
            common.fmt(r["step_s"]["default"], 3),
            common.fmt(r["step_s"]["huge"], 3),
            common.fmt(r["speedup"]) + "×",
        ]
        for r in results
    ]
    header = [
        "case",
        "page faults per step, default / huge",
        "system CPU s per step, default / huge",
        "step s, default pages",
        "step s, huge pages",
        "speed-up",
    ]
    return common.md_table(header, rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="tiny,smollm2_135m")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    results = []
    for name in args.cases.split(","):
        results.append(run_case(name, args.reps, 20 if name == "tiny" else 3))
        print(f"# {name}: speed-up {common.fmt(results[-1]['speedup'])}", flush=True)
        common.write_json(args.output, {"benchmark": "hugepages", "results": results})
    print(table(results))


if __name__ == "__main__":
    main()
