"""Process start-up (jax.distributed) and mesh construction.

Start-up order of precedence: explicit flags/arguments, then JAX_* environment variables
(GPU VMs, launch/local_multiprocess.sh), then SLURM's environment, then TPU pod
auto-detection. A single process with none of these needs nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Mapping

import gin
import jax
import numpy as np
from jax.sharding import AxisType, Mesh

MESH_AXES = ("ensemble", "data", "fsdp", "tensor")

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    coordinator_address: str | None
    num_processes: int
    process_id: int
    source: str  # "flags", "env", "slurm", "tpu" or "single"


def _slurm_first_host(nodelist: str) -> str:
    """First host of a SLURM nodelist such as 'gpu[003-005,9],cpu1' → 'gpu003'."""
    head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist
    if "[" not in head:
        return head
    prefix, rest = head.split("[", 1)
    first = rest.split(",")[0].split("-")[0].rstrip("]")
    return prefix + first


def detect_cluster(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    env: Mapping[str, str] | None = None,
) -> ClusterSpec:
    """Works out how this process was launched. Pure: reads only its arguments and ``env``."""
    env = os.environ if env is None else env
    if coordinator_address or num_processes is not None or process_id is not None:
        missing = [
            n
            for n, v in [
                ("--coordinator_address", coordinator_address),
                ("--num_processes", num_processes),
                ("--process_id", process_id),
            ]
            if v is None
        ]
        if missing:
            raise ValueError(f"multi-process start-up needs all three flags; missing {missing}")
        return ClusterSpec(coordinator_address, int(num_processes), int(process_id), "flags")
    if "JAX_COORDINATOR_ADDRESS" in env:
        try:
            return ClusterSpec(
                env["JAX_COORDINATOR_ADDRESS"],
                int(env["JAX_NUM_PROCESSES"]),
                int(env["JAX_PROCESS_ID"]),
                "env",
            )
        except KeyError as e:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but environment variable {e.args[0]} is not") from None
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        host = _slurm_first_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")))
        port = env.get("WARM_COORDINATOR_PORT", "12355")
        return ClusterSpec(f"{host}:{port}", int(env["SLURM_NTASKS"]), int(env["SLURM_PROCID"]), "slurm")
    if env.get("TPU_WORKER_HOSTNAMES") or env.get("CLOUD_TPU_TASK_ID") is not None:
        return ClusterSpec(None, -1, -1, "tpu")
    return ClusterSpec(None, 1, 0, "single")


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    init_timeout_s: int = 300,
) -> ClusterSpec:
    """Starts jax.distributed when launched as several processes; a no-op for one process.

    The timeout is bounded; on expiry the error says which process ids never joined (as
    far as this process can tell: the coordinator knows who joined, the others only that
    the coordinator was unreachable).
    """
    spec = detect_cluster(coordinator_address, num_processes, process_id)
    if spec.source == "single":
        return spec
    if spec.source == "tpu":
        jax.distributed.initialize(initialization_timeout=init_timeout_s)
        return spec
    rendezvous(spec, init_timeout_s)
    log.info(
        "jax.distributed: process %d/%d, coordinator %s (%s)",
        spec.process_id,
        spec.num_processes,
        spec.coordinator_address,
        spec.source,
    )
    try:
        jax.distributed.initialize(
            coordinator_address=spec.coordinator_address,
            num_processes=spec.num_processes,
            process_id=spec.process_id,
            initialization_timeout=init_timeout_s,
        )
    except Exception as e:  # jax raises XlaRuntimeError/DEADLINE_EXCEEDED with a long text
        who = (
            "the coordinator (process 0) waited for the others"
            if spec.process_id == 0
            else f"process {spec.process_id} could not reach the coordinator at {spec.coordinator_address}"
        )
        raise RuntimeError(
            f"jax.distributed start-up failed after at most {init_timeout_s}s: {who}; "
            f"expected {spec.num_processes} processes (ids 0..{spec.num_processes - 1}); "
            f"missing processes never connected. Underlying error: {str(e).splitlines()[0][:300]}"
        ) from e
    return spec


def rendezvous(spec: ClusterSpec, timeout_s: float) -> None:
    """Checks that every process is up before jax.distributed starts, naming any that is not.

    jax's own start-up aborts the whole process (a C++ fatal error) when a peer never registers,
    without saying which. Here process 0 listens on the coordinator's port + 1 and collects each
    process's id; the others connect and wait for its go-ahead. On timeout both sides raise an
    error that names the missing process ids (or the unreachable coordinator).
    """
    host, port = spec.coordinator_address.rsplit(":", 1)
    addr = (host, int(port) + 1)
    deadline = time.monotonic() + timeout_s
    if spec.process_id == 0:
        joined: dict[int, socket.socket] = {}
        with socket.create_server(("", addr[1]), reuse_port=False) as srv:
            srv.settimeout(0.5)
            while len(joined) < spec.num_processes - 1 and time.monotonic() < deadline:
                try:
                    conn, _ = srv.accept()
                except socket.timeout:
                    continue
                conn.settimeout(max(deadline - time.monotonic(), 0.1))
                try:
                    joined[int(conn.makefile().readline().strip())] = conn
                except (ValueError, OSError):
                    conn.close()
            missing = sorted(set(range(1, spec.num_processes)) - set(joined))
            for conn in joined.values():
                with contextlib.suppress(OSError):
                    conn.sendall(b"ok\n" if not missing else b"missing " + str(missing).encode() + b"\n")
                conn.close()
        if missing:
            raise RuntimeError(
                f"start-up failed: process 0 waited {timeout_s}s for {spec.num_processes} processes; "
                f"missing process id(s) {missing} never connected to {spec.coordinator_address}"
            )
        return
    while True:
        try:
            with socket.create_connection(addr, timeout=max(deadline - time.monotonic(), 0.1)) as conn:
                conn.sendall(f"{spec.process_id}\n".encode())
                conn.settimeout(max(deadline - time.monotonic(), 0.1) + 5)
                reply = conn.makefile().readline().strip()
            break
        except OSError:
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"start-up failed: process {spec.process_id} could not reach the coordinator (process 0) "
                    f"at {host}:{addr[1]} within {timeout_s}s; expected {spec.num_processes} processes"
                ) from None
            time.sleep(0.2)
    if reply != "ok":
        raise RuntimeError(
            f"start-up failed: the coordinator reports {reply or 'no answer'}; expected {spec.num_processes} processes"
        )


def is_main_process() -> bool:
    """Only process 0 writes reports, metrics and progress."""
    return jax.process_index() == 0


@gin.configurable
def make_mesh(shape: Mapping[str, int] | None = None, devices=None) -> Mesh:
    """One mesh with named Auto axes; sizes from gin, -1 = the remaining devices.

    Args:
      shape: axis name → size, e.g. ``{'ensemble': 2, 'data': -1, 'fsdp': 1, 'tensor': 1}``.
        Axes are laid out in MESH_AXES order (outermost first), so ensemble members sit on
        separate device groups and tensor parallelism on the closest devices. Default: all
        devices on 'data'.
    """
    devices = jax.devices() if devices is None else list(devices)
    shape = dict(shape or {"data": -1})
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"make_mesh.shape has unknown axes {sorted(unknown)}; use {MESH_AXES}")
    sizes = {a: int(shape.get(a, 1)) for a in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"make_mesh.shape: only one axis may be -1, got {free}")
    fixed = int(np.prod([s for s in sizes.values() if s != -1]))
    if free:
        if len(devices) % fixed:
            raise ValueError(f"make_mesh.shape={dict(shape)}: {len(devices)} devices are not divisible by {fixed}")
        sizes[free[0]] = len(devices) // fixed
    total = int(np.prod(list(sizes.values())))
    if total != len(devices):
        raise ValueError(f"make_mesh.shape={dict(shape)} needs {total} devices but {len(devices)} are available")
    axis_shape = tuple(sizes[a] for a in MESH_AXES)
    # Auto axes: jax >= 0.10 defaults to Explicit, under which vmapped ensembles and
    # sharding-in-types matmuls behave differently from what our specs assume.
    return jax.make_mesh(axis_shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sync(name: str) -> None:
    """Barrier across processes (no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
