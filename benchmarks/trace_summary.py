"""Where a jitted step's device time goes: per-kernel totals from a ``jax.profiler`` Perfetto trace.

    python benchmarks/trace_summary.py TRACE_DIR [--top=40]

``TRACE_DIR`` is a ``jax.profiler.trace(..., create_perfetto_trace=True)`` directory (or the trace file). Complete
events ("X") are summed by (process, thread, name); device processes (GPU streams, or the CPU's XLA
op lines) are what matter. Kernel names are XLA's fusion and custom-call names, so an optimized HLO
dump of the same program maps them back to operations.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os


def load_trace(log_dir: str) -> dict:
    """The newest perfetto_trace.json.gz under ``log_dir`` (or ``log_dir`` itself if it is a trace file)."""
    paths = [log_dir] if os.path.isfile(log_dir) else []
    paths = paths or sorted(glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True))
    if not paths:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {log_dir}")
    with gzip.open(paths[-1], "rt") as f:
        return json.load(f)


def summarize(trace: dict, top: int = 40) -> dict:
    """{thread: {"total_ms", "events", "top": [[name, ms, count], ...]}} for every thread with events."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    procs, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e["tid"])] = e["args"]["name"]
    by_thread: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        where = f"{procs.get(e['pid'], e['pid'])} / {threads.get((e['pid'], e['tid']), e['tid'])}"
        by_thread[where][e["name"]] += float(e["dur"]) / 1e3  # µs → ms
        counts[where][e["name"]] += 1
    out = {}
    for where, c in sorted(by_thread.items(), key=lambda kv: -sum(kv[1].values())):
        out[where] = {
            "total_ms": round(sum(c.values()), 3),
            "events": sum(counts[where].values()),
            "top": [[name, round(ms, 3), counts[where][name]] for name, ms in c.most_common(top)],
        }
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace_dir")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--threads", type=int, default=6, help="print this many busiest threads")
    args = ap.parse_args()
    summary = summarize(load_trace(args.trace_dir), args.top)
    for where, s in list(summary.items())[: args.threads]:
        print(f"== {where}: {s['total_ms']:.1f} ms in {s['events']} events")
        for name, ms, n in s["top"]:
            print(f"  {ms:10.3f} ms {n:6d}×  {name[:110]}")


if __name__ == "__main__":
    main()
