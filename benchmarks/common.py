"""Shared helpers for the peer benchmarks: interleaved timing, summaries, peaks, machine info, JSON.

Every figure in BENCHMARKS.md is a median with its [min–max] range over ≥ 3 repetitions, and ours
and the peer's repetitions are interleaved (ours, peer, ours, peer, ...) so that load from other
processes on a shared machine falls on both sides alike.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Sequence

# The SmolLM2-135M shape (random weights) of the 135M rows, in the layout gin/models/smollm2_135m.gin uses:
# one scanned layer stack, so its 30 layers compile once (minutes → seconds on 2 cores).
SMOLLM2_135M = dict(
    vocab_size=49152,
    d_model=576,
    n_layers=30,
    n_heads=9,
    n_kv_heads=3,
    head_dim=64,
    d_ff=1536,
    rope_theta=1e5,
    # The layout gin/models/smollm2_135m.gin runs: scanned layers, 'minimal' remat (BENCHMARKS.md § GPU).
    scan_layers=True,
    remat=True,
    remat_policy="minimal",
)


def ours_env() -> dict[str, str]:
    """The environment our side runs with: the one ``warm-train --host_hugepages`` gives itself
    (huge-page malloc where the machine has it; see warm_jax/host_memory.py)."""
    from warm_jax import host_memory

    return host_memory.environ_with_hugepages()


def peer_env() -> dict[str, str]:
    """The peer's environment: as its users run it (this process's), or with our malloc setting
    too when PEER_HUGEPAGES=1 (to see what the setting alone is worth to the peer)."""
    return ours_env() if os.environ.get("PEER_HUGEPAGES") == "1" else dict(os.environ)


PACKAGES = ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "trl", "mergekit", "safetensors")


def summary(xs: Sequence[float]) -> dict:
    """{'median', 'min', 'max', 'n', 'values'} of a list of repetitions."""
    xs = [float(x) for x in xs]
    if not xs:
        raise ValueError("summary() of an empty list of repetitions")
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs), "values": xs}


def fmt(s: dict, digits: int = 2, scale: float = 1.0) -> str:
    """'median [min–max]' of a summary (values multiplied by ``scale``)."""
    d = f".{digits}f"
    return f"{s['median'] * scale:,{d}} [{s['min'] * scale:,{d}}–{s['max'] * scale:,{d}}]"


def ratio(ours: Sequence[float], peer: Sequence[float], *, higher_is_better: bool = True) -> dict:
    """Ours over the peer as a speed ratio (> 1 = we are faster / better).

    For throughputs (higher is better) it is ours / peer; for times it is peer / ours. The range
    pairs repetition i of ours with repetition i of the peer (they ran back to back).
    """
    pairs = list(zip(ours, peer))
    rs = [(a / b if higher_is_better else b / a) for a, b in pairs]
    med = statistics.median(ours) / statistics.median(peer)
    out = summary(rs)
    out["median"] = med if higher_is_better else 1.0 / med
    return out


def interleaved(fns: dict[str, Callable[[], float | None]], reps: int, *, warmup: int = 1) -> dict[str, list[float]]:
    """Runs each fn ``warmup`` times untimed, then ``reps`` rounds of all fns in turn.

    A fn may return its own measured seconds (when only part of the call should count); if it
    returns None, the wall time of the call is used. Returns name -> list of seconds.
    """
    for _ in range(warmup):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            _progress(f"warm-up {name}: {time.perf_counter() - t0:.2f} s")
    times: dict[str, list[float]] = {k: [] for k in fns}
    for rep in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            own = fn()
            times[name].append(own if own is not None else time.perf_counter() - t0)
            _progress(f"rep {rep} {name}: {times[name][-1]:.3f} s")
    return times


class Worker:
    """One side of a comparison in a process of its own, kept alive between repetitions.

    ``factory(*args)`` runs in a spawned child and returns ``(run, info)``: ``run(*call_args)`` does
    one repetition and may return a dict of outputs (kept in ``.last``); ``info`` is any picklable
    description (in ``.info``). ``worker(*call_args)`` runs one repetition and returns its seconds, as
    timed in the child, so ``worker`` (or ``lambda: worker(size)``) plugs into ``interleaved``. Two frameworks in one process share
    thread pools, allocator and caches: measured that way, our 135M step took 14.3 s beside
    PyTorch and 11.6 s alone, so every peer comparison runs each side in its own process.
    ``env``: the child's environment variables (default: this process's), e.g. ours as
    ``python -m warm_jax.train`` would run (``host_memory.environ_with_hugepages()``).
    """

    def __init__(self, factory: Callable, *args, env: dict[str, str] | None = None):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_worker_main, args=(child, factory, args), daemon=True)
        saved = dict(os.environ)
        try:  # a spawned child starts with the parent's os.environ of the moment
            if env is not None:
                os.environ.clear()
                os.environ.update(env)
            self._proc.start()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        child.close()
        self.info = self._recv()
        self.last = None

    def __call__(self, *args) -> float:
        self._conn.send(("run", args))
        seconds, self.last = self._recv()
        return seconds

    def _recv(self):
        try:
            status, payload = self._conn.recv()
        except EOFError:
            raise RuntimeError(f"benchmark worker died (exit code {self._proc.exitcode})") from None
        if status == "error":
            raise RuntimeError(f"benchmark worker failed:\n{payload}")
        return payload

    def close(self) -> None:
        if self._proc.is_alive():
            self._conn.send("stop")
            self._proc.join(60)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _worker_main(conn, factory, args) -> None:
    import traceback

    try:
        run, info = factory(*args)
        conn.send(("ok", info))
        while (msg := conn.recv()) != "stop":
            t0 = time.perf_counter()
            out = run(*msg[1])
            conn.send(("ok", (time.perf_counter() - t0, out)))
    except Exception:  # noqa: BLE001 -- reported to the parent, which raises
        conn.send(("error", traceback.format_exc()))


def _progress(msg: str) -> None:
    """Progress on stderr (stdout carries the results)."""
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# The matmul peak is the MFU denominator: the best rate over a few sizes and repetitions, since on a
# shared 2-core VM one size's best of 5 (2048² only, until 2026-11-29) ranged 0.08-0.16 TFLOP/s for
# PyTorch between runs and came out below what TRL's own training step reached.
PEAK_SIZES = (2048, 3072)
PEAK_REPS = 10


def _best_tflops(matmul, n: int, reps: int) -> float:
    """TFLOP/s of the fastest of ``reps`` timed calls of ``matmul`` (one blocking [n, n] @ [n, n])."""
    matmul()  # compile / warm up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        matmul()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def jax_matmul_peak_tflops(sizes=PEAK_SIZES, reps: int = PEAK_REPS, dtype: str = "float32") -> float:
    """Best TFLOP/s of a jitted [n, n] @ [n, n] on the default JAX device, over ``sizes`` × ``reps``."""
    import jax
    import jax.numpy as jnp

    f = jax.jit(lambda x, y: x @ y)
    best = 0.0
    for n in sizes:
        a = jnp.ones((n, n), dtype)
        best = max(best, _best_tflops(lambda: f(a, a).block_until_ready(), n, reps))
    return best


def torch_matmul_peak_tflops(sizes=PEAK_SIZES, reps: int = PEAK_REPS) -> float:
    """Best TFLOP/s of a float32 [n, n] @ [n, n] in PyTorch (CPU), over ``sizes`` × ``reps``; the
    product goes into a preallocated output, so no allocation is timed."""
    import torch

    best = 0.0
    for n in sizes:
        a, out = torch.ones((n, n), dtype=torch.float32), torch.empty((n, n), dtype=torch.float32)
        best = max(best, _best_tflops(lambda: torch.matmul(a, a, out=out), n, reps))
    return best


def peak_rss_mb() -> float:
    """This process's peak resident set size, in MB.

    ``VmHWM`` of its own address space where Linux gives it. Not ``ru_maxrss``: Linux carries that
    across fork and exec, so a subprocess started by a parent holding 2.6 GB reports at least 2.6 GB
    whatever it uses itself (it did, in this file's averaging tables, once the parent had just
    written the members).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e6  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_simd() -> str:
    """The widest vector extensions the CPU reports (hosts named only "AMD EPYC" differ in these:
    an AVX-512 host and an AVX2-only one gave JAX float32 matmul peaks of 0.18-0.21 and 0.13 TFLOP/s)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    wanted = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")
    return " ".join(x for x in wanted if x in flags) or "no avx2"


def machine_info() -> dict:
    """CPU model, cores, Python and package versions, UTC date: the header of every result."""
    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            versions[p] = None
    return {
        "cpu": _cpu_model(),
        "simd": _cpu_simd(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "versions": versions,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "glibc_tunables": {"ours": ours_env().get("GLIBC_TUNABLES", ""), "peer": peer_env().get("GLIBC_TUNABLES", "")},
    }


def write_json(path: str | None, payload: dict) -> None:
    """Writes ``payload`` (plus machine info) atomically to ``path``; no-op when path is None."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"machine": machine_info(), **payload}, f, indent=2)
    os.replace(tmp, path)


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def met(value: float, goal: float) -> str:
    return "yes" if value >= goal else "**no**"


# ----------------------------------------------------------------------------- BENCHMARKS.md generation


def extract_table(text: str) -> str:
    """The report block of a benchmark's stdout: its Markdown table plus the text lines just above it.

    JSON lines, '#'-progress lines and blank lines before the block are dropped.
    """
    lines = text.splitlines()
    first = next((i for i, l in enumerate(lines) if l.startswith("|")), None)
    if first is None:
        raise ValueError("no Markdown table in the benchmark output")
    is_text = lambda l: bool(l.strip()) and not l.startswith(("#", "{", " ", "Filtering"))
    start = first
    while start > 0:
        if is_text(lines[start - 1]):
            start -= 1
        elif start > 1 and not lines[start - 1].strip() and is_text(lines[start - 2]):
            start -= 2  # one blank line between a caption and its table
        else:
            break
    last = max(i for i, l in enumerate(lines) if l.startswith("|"))
    return "\n".join(lines[start : last + 1])


def ensemble_step_table(path: str) -> str:
    """A table from ``benchmarks/ensemble_step.py --output`` JSON (that script prints JSON lines only)."""
    with open(path) as f:
        data = json.load(f)
    rows = []
    for r in data["results"]:
        if "error" in r:
            rows.append([r["case"], r.get("attention", ""), "error: " + r["error"][:80], "", "", ""])
            continue
        rows.append(
            [
                r["case"],
                r["members"],
                f"{r['ratio_median']:.2f} [{r['ratio_range'][0]:.2f}–{r['ratio_range'][1]:.2f}]",
                f"{r['tokens_per_s_vmapped']:,.0f}",
                f"{r['mfu_vmapped']:.1%}" if r.get("mfu_vmapped") else "",
                f"{r['vmapped_s']}",
            ]
        )
    head = f"{data['device']}, matmul peak {data['peak_tflops']:.3f} TFLOP/s\n\n"
    return head + md_table(
        ["case", "M", "t(vmapped M) / (M · t(single))", "tokens/s (vmapped)", "MFU", "vmapped step times (s)"], rows
    )


def splice(markdown_path: str, name: str, block: str) -> None:
    """Replaces the text between ``<!-- BEGIN generated:name -->`` and ``<!-- END generated:name -->``."""
    begin, end = f"<!-- BEGIN generated:{name} -->", f"<!-- END generated:{name} -->"
    with open(markdown_path) as f:
        text = f.read()
    if begin not in text or end not in text:
        raise ValueError(f"{markdown_path}: markers for {name!r} not found ({begin} … {end})")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    tmp = markdown_path + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{head}{begin}\n{block.strip()}\n{end}{tail}")
    os.replace(tmp, markdown_path)


def _cli(argv: list[str]) -> None:
    """``common.py splice MD NAME STDOUT_FILE`` | ``common.py splice-ensemble MD NAME JSON`` | ``common.py machine MD``."""
    cmd = argv[0] if argv else ""
    if cmd == "splice":
        md, name, src = argv[1:4]
        with open(src) as f:
            splice(md, name, extract_table(f.read()))
    elif cmd == "splice-ensemble":
        md, name, src = argv[1:4]
        splice(md, name, ensemble_step_table(src))
    elif cmd == "machine":
        info = machine_info()
        v = info["versions"]
        block = (
            f"- machine: {info['cpu']} ({info['simd']}), {info['cores']} cores; load average at the start "
            f"{os.getloadavg()[0]:.1f} (1 min)\n"
            f"- date (UTC): {info['date_utc']}; Python {info['python']}\n"
            f"- versions: " + ", ".join(f"{k} {v[k]}" for k in PACKAGES if v.get(k))
        )
        splice(argv[1], "machine", block)
    else:
        raise SystemExit(_cli.__doc__)


if __name__ == "__main__":
    import sys

    _cli(sys.argv[1:])
