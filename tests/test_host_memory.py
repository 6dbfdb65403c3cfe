"""`warm-train --host_hugepages` (or WARM_JAX_HUGEPAGES=1) re-runs itself once with huge-page malloc
(host_memory); without the opt-in, and on importing warm_jax, nothing re-executes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests import helpers
from warm_jax import host_memory

ON = "glibc.malloc.hugetlb=1"


@pytest.mark.parametrize(
    "environ, glibc, thp, expected",
    [
        ({}, (2, 36), "madvise", ON),
        ({}, (2, 36), "always", ON),
        ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, (2, 36), "madvise", "glibc.malloc.arena_max=2:" + ON),
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, (2, 36), "madvise", None),  # the user's choice stands
        ({}, (2, 31), "madvise", None),  # glibc without the tunable
        ({}, None, "madvise", None),  # musl or another C library
        ({}, (2, 36), "never", None),
        ({}, (2, 36), None, None),  # no transparent huge pages in this kernel
    ],
)
def test_tunables_decides_from_environment_libc_and_kernel(environ, glibc, thp, expected):
    assert host_memory.tunables(environ, glibc=glibc, thp=thp) == expected


def test_thp_mode_reads_the_bracketed_word(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert host_memory.thp_mode(str(path)) == "madvise"
    assert host_memory.thp_mode(str(tmp_path / "missing")) is None


def _env(**updates) -> dict:
    env = helpers.subprocess_env()
    env.pop("GLIBC_TUNABLES", None)
    env.pop(host_memory.OPT_IN, None)
    return {**env, **updates}


def _train_with_missing_gin(tmp_path, *flags, **env):
    return subprocess.run(
        [sys.executable, "-m", "warm_jax.train", "--gin_file=nope.gin", f"--workdir={tmp_path}", *flags],
        env=_env(**env),
        cwd=helpers.REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("flags, env", [(("--host_hugepages",), {}), ((), {"WARM_JAX_HUGEPAGES": "1"})])
def test_train_opted_in_reruns_itself_with_the_same_arguments(tmp_path, flags, env):
    proc = _train_with_missing_gin(tmp_path, *flags, **env)
    # The re-executed program got its arguments: it names the missing file and fails as before.
    assert proc.returncode == 2 and "nope.gin" in proc.stderr, proc.stderr
    if host_memory.tunables(_env()) is None:  # this machine cannot have it: the program runs as started
        assert "glibc default pages" in proc.stderr and "re-executed" not in proc.stderr
    else:
        assert f"transparent huge pages (GLIBC_TUNABLES={ON}; re-executed with it)" in proc.stderr, proc.stderr


def test_train_without_the_opt_in_runs_as_started(tmp_path):
    proc = _train_with_missing_gin(tmp_path)
    assert proc.returncode == 2 and "nope.gin" in proc.stderr, proc.stderr
    assert "glibc default pages" in proc.stderr and "re-executed" not in proc.stderr, proc.stderr


def test_importing_warm_jax_never_reexecutes():
    code = "import os, warm_jax; print(os.environ.get('WARM_JAX_REEXECUTED'), os.environ.get('GLIBC_TUNABLES'))"
    out = subprocess.run(
        [sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.split() == ["None", "None"], out.stdout
