"""Shared test utilities: tiny gin bindings and ways to run the pipeline in or out of process."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import gin

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A model and task small enough that each compile takes a second or two.
TINY = [
    "ModelConfig.d_model = 32",
    "ModelConfig.n_layers = 1",
    "ModelConfig.n_heads = 2",
    "ModelConfig.n_kv_heads = 1",
    "ModelConfig.d_ff = 64",
    "ModelConfig.max_len = 40",
    "PretrainConfig.num_documents = 600",
    "PretrainConfig.num_steps = 30",
    "PretrainConfig.batch_size = 16",
    "PretrainConfig.seq_len = 40",
    "PretrainConfig.warmup_steps = 5",
    "PretrainConfig.keep_steps = (10,)",
    "PairsConfig.num_train = 96",
    "PairsConfig.num_validation = 48",
    "PairsConfig.num_ood = 48",
    # One text shape for the data and the policy stages of a pipeline (pairs of 12 response tokens with the EOS).
    "GenerationConfig.max_prompt_len = 8",
    "GenerationConfig.max_new_tokens = 11",
    "PairsConfig.sample_batch_size = 64",
    "EnsembleConfig.num_members = 4",
    "EnsembleConfig.batch_size = 8",
    "EnsembleConfig.num_steps = 12",
    "EnsembleConfig.lp_steps = 20",
    "EnsembleConfig.learning_rates = (3e-3,)",
    "EnsembleConfig.dropout_rates = (0.0, 0.1, 0.05, 0.1)",
    "LoopConfig.log_every = 2",
    "LoopConfig.save_interval_steps = 4",
    "LoopConfig.async_save = False",
    "cpu_tuning.enabled = True",  # the training steps compile as the CPU presets (gin/quickstart.gin) do
]

# Best-of-N and REINFORCE at test size (used by the whole-pipeline tests).
# ReinforceConfig keyword arguments for in-process REINFORCE tests on the tiny model.
TINY_RL = dict(
    num_steps=4,
    prompts_per_step=4,
    samples_per_prompt=2,
    num_train_prompts=32,
    eval_every=2,
    num_eval_prompts=8,
    num_winrate_prompts=8,
    learning_rate=1e-2,
)

# GenerationConfig keyword arguments for in-process policy tests: shorter responses than the pipeline's (the
# reward models score any length; a stage run in-process compares no configuration record).
TINY_GEN = dict(max_prompt_len=8, max_new_tokens=6)


def tiny_gen():
    from warm_jax.task.generation import GenerationConfig

    return GenerationConfig(**TINY_GEN)


def gen_bindings(**changes) -> list[str]:
    """TINY_GEN as gin bindings (for a stage run in a child process or under ``gin_config``)."""
    return [f"GenerationConfig.{k} = {v!r}" for k, v in {**TINY_GEN, **changes}.items()]


TINY_POLICY = [
    "BonConfig.n_values = (1, 2, 4)",
    "BonConfig.num_prompts = 8",
    "ReinforceConfig.rewards = ('warm', 'member_best')",
    "ReinforceConfig.num_steps = 2",
    "ReinforceConfig.prompts_per_step = 4",
    "ReinforceConfig.samples_per_prompt = 2",
    "ReinforceConfig.num_train_prompts = 32",
    "ReinforceConfig.eval_every = 2",
    "ReinforceConfig.num_eval_prompts = 8",
    "ReinforceConfig.num_winrate_prompts = 8",
    "EvalConfig.lmc_lambdas = 3",
]
ALL_STAGES = ("pretrain", "data", "rm_ensemble", "rm_control", "average", "rm_eval", "bon", "reinforce", "report")

MESH_8 = "make_mesh.shape = {'ensemble': 1, 'data': -1, 'fsdp': 1, 'tensor': 1}"
MESH_ENS = "make_mesh.shape = {'ensemble': 2, 'data': 2, 'fsdp': 1, 'tensor': 2}"


def stages(*names: str) -> str:
    return f"run_pipeline.stages = {list(names)!r}"


def run_in_process(workdir: str, bindings: list[str]):
    """Runs the pipeline in this process (the suite's 8 simulated devices)."""
    from warm_jax import config, stages as stages_lib

    gin.clear_config()
    try:
        config.parse([], bindings)
        return stages_lib.run_pipeline(workdir=workdir)
    finally:
        gin.clear_config()


def train_cmd(workdir: str, bindings: list[str], flags: tuple[str, ...] = ()) -> list[str]:
    cmd = [sys.executable, "-m", "warm_jax.train", f"--workdir={workdir}", *flags]
    return cmd + [f"--gin_bindings={b}" for b in bindings]


def subprocess_env(devices: int = 8) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_train(
    workdir: str, bindings: list[str], *, flags: tuple[str, ...] = (), timeout: float = 600, check: bool = True
):
    proc = subprocess.run(
        train_cmd(workdir, bindings, flags),
        env=subprocess_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"train exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def run_until_then_signal(
    workdir: str, bindings: list[str], *, ckpt_dir: str, sig: int, min_step: int = 1, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Starts training, waits until a checkpoint past ``min_step`` exists, then sends ``sig``."""
    proc = subprocess.Popen(
        train_cmd(workdir, bindings),
        env=subprocess_env(),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            break
        if os.path.isdir(ckpt_dir) and any(d.isdigit() and int(d) >= min_step for d in os.listdir(ckpt_dir)):
            proc.send_signal(sig)
            break
        time.sleep(0.05)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def final_state_hash(ckpt_dir: str) -> tuple[int, str]:
    """(latest step, sha256 over every array) of a training checkpoint, read without a target."""
    out = subprocess.run(
        [sys.executable, "-m", "warm_jax.inspect_checkpoint", ckpt_dir],
        env=subprocess_env(1),
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    import json

    info = json.loads(out.stdout)
    return info["step"], info["sha256"]


class gin_config:
    """Context manager: parse bindings for an in-process call, clear them afterwards."""

    def __init__(self, bindings: list[str]):
        self.bindings = bindings

    def __enter__(self):
        from warm_jax import config

        gin.clear_config()
        config.parse([], self.bindings)
        return self

    def __exit__(self, *exc):
        gin.clear_config()
        return False


def context(workdir: str, seed: int = 0):
    """A RunContext on the gin-configured mesh (call inside ``gin_config``)."""
    from warm_jax import runtime
    from warm_jax.stages import RunContext

    return RunContext(workdir=workdir, mesh=runtime.make_mesh(), seed=seed)


def start_processes(
    workdir: str,
    bindings: list[str],
    *,
    num: int = 2,
    devices: int = 4,
    present=None,
    port: int | None = None,
    extra_flags=(),
):
    """Starts ``num`` jax processes of one run on 127.0.0.1 (``present``: ids actually started)."""
    from warm_jax import runtime

    port = port or runtime.free_port()
    procs = {}
    for i in range(num) if present is None else present:
        env = subprocess_env(devices)
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(num), JAX_PROCESS_ID=str(i))
        procs[i] = subprocess.Popen(
            train_cmd(workdir, bindings) + list(extra_flags),
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    return procs


def wait_all(procs, timeout: float = 900) -> dict:
    out = {}
    for i, p in procs.items():
        o, e = p.communicate(timeout=timeout)
        out[i] = subprocess.CompletedProcess(p.args, p.returncode, o, e)
    return out


def copy_without(src: str, dst: str, stages: tuple[str, ...]) -> str:
    """Copies workdir ``src`` to ``dst`` leaving out what ``stages`` wrote (their ``stage_outputs``), as if those
    stages had never run there; the other stages' outputs and records are kept, so a rerun skips them."""
    import fnmatch
    import shutil

    from warm_jax import workdir

    patterns = [p for stage in stages for p in workdir.stage_outputs(stage)]

    def ignore(folder, names):
        rel = os.path.relpath(folder, src)
        paths = {n: os.path.normpath(os.path.join(rel, n)).replace(os.sep, "/") for n in names}
        return [n for n, p in paths.items() if any(fnmatch.fnmatchcase(p, pat) for pat in patterns)]

    shutil.copytree(src, dst, ignore=ignore)
    return dst


def restore_tree(ckpt_dir: str, step: int | None = None):
    """(step, numpy tree) of a step (default: the latest) of a Checkpointer directory, read without a target."""
    from warm_jax.checkpoints import Checkpointer

    ck = Checkpointer(ckpt_dir, read_only=True)
    try:
        state, _, step = ck.restore(None, step=step)
    finally:
        ck.close()
    import jax
    import numpy as np

    return step, jax.tree.map(np.asarray, state)


def assert_close_to_scale(actual, desired, rel: float = 1e-4, err_msg: str = ""):
    """``actual`` equals ``desired`` up to round-off relative to the size of the values compared.

    Two programs that sum in another order (another mesh, another kernel, other fusion) differ by a few
    float32 ulps of the largest terms, not of each element; a fixed atol that holds on one CPU breaks on
    another. The tolerance is ``rel`` times the largest magnitude in ``desired``.
    """
    import numpy as np

    actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
    scale = float(np.max(np.abs(desired))) if desired.size else 0.0
    np.testing.assert_allclose(actual, desired, rtol=0, atol=rel * max(scale, 1e-30), err_msg=err_msg)
