"""`python -m warm_jax.train` re-runs itself once with huge-page malloc (host_memory); libraries and other
programs never do."""

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
        ({"WARM_JAX_HUGEPAGES": "0"}, (2, 36), "madvise", None),
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


@pytest.mark.parametrize(
    "argv, module",
    [
        (["python", "-m", "warm_jax.train", "--gin_file=x"], "warm_jax.train"),
        (["python", "-u", "-X", "importtime", "-m", "warm_jax.average", "a"], "warm_jax.average"),
        (["python", "-mwarm_jax.export"], "warm_jax.export"),
        (["python", "-c", "import warm_jax", "-m", "warm_jax.train"], None),
        (["python", "script.py", "-m", "warm_jax.train"], None),
        (["python"], None),
    ],
)
def test_module_run_finds_the_dash_m_module(argv, module):
    assert host_memory.module_run(argv) == module


def _env(**updates) -> dict:
    env = helpers.subprocess_env()
    env.pop("GLIBC_TUNABLES", None)
    env.pop(host_memory.OPT_OUT, None)
    return {**env, **updates}


def _train_with_missing_gin(tmp_path, **env):
    return subprocess.run(
        [sys.executable, "-m", "warm_jax.train", "--gin_file=nope.gin", f"--workdir={tmp_path}"],
        env=_env(**env),
        cwd=helpers.REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_train_reruns_itself_with_the_same_arguments(tmp_path):
    proc = _train_with_missing_gin(tmp_path)
    # The re-executed program got its arguments: it names the missing file and fails as before.
    assert proc.returncode == 2 and "nope.gin" in proc.stderr, proc.stderr
    if host_memory.tunables(_env()) is None:  # this machine cannot have it: the program runs as started
        assert "glibc default pages" in proc.stderr and "re-executed" not in proc.stderr
    else:
        assert f"transparent huge pages (GLIBC_TUNABLES={ON}; re-executed with it)" in proc.stderr, proc.stderr
    off = _train_with_missing_gin(tmp_path, WARM_JAX_HUGEPAGES="0")
    assert off.returncode == 2 and "glibc default pages" in off.stderr and "re-executed" not in off.stderr


def test_importing_warm_jax_never_reexecutes():
    code = "import os, warm_jax; print(os.environ.get('WARM_JAX_REEXECUTED'), os.environ.get('GLIBC_TUNABLES'))"
    out = subprocess.run(
        [sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.split() == ["None", "None"], out.stdout


def _processes_that_imported_host_memory(module: str) -> int:
    """How many interpreters ``python -m MODULE --help`` ran (each imports warm_jax.host_memory once)."""
    argv = [sys.executable, "-X", "importtime", "-m", module, "--help"]
    out = subprocess.run(argv, env=_env(), cwd=helpers.REPO, capture_output=True, text=True, timeout=120)
    return sum(line.split("|")[-1].strip() == "warm_jax.host_memory" for line in out.stderr.splitlines())


def test_only_train_reexecutes():
    assert _processes_that_imported_host_memory("warm_jax.average") == 1  # its merge was slower with huge pages
    assert _processes_that_imported_host_memory("warm_jax.train") == (1 if host_memory.tunables(_env()) is None else 2)
