"""Test set-up: 8 simulated CPU devices, set before jax is imported anywhere."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole session, inherited by the xdist workers and by every
# pipeline subprocess (CLI runs, kill-and-resume runs, the 2-process runs): the suite compiles the
# same tiny programs dozens of times over, and compiling is most of its time on 2 cores. Entries are
# keyed by the program, its compile options and devices, so a hit is the program a miss would build.
# Set WARM_JAX_TEST_JIT_CACHE to keep one across runs; otherwise the first process (the xdist controller)
# makes a temporary one, the workers inherit it, and the controller removes it at the end.
_OWN_CACHE = None
if "WARM_JAX_TEST_JIT_CACHE" not in os.environ:
    _OWN_CACHE = os.environ["WARM_JAX_TEST_JIT_CACHE"] = tempfile.mkdtemp(prefix="warm_jax_jit_cache_")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["WARM_JAX_TEST_JIT_CACHE"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test, skipped unless --runslow")
    config.addinivalue_line("markers", "accelerator: needs a GPU/TPU, skipped on CPU")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    import jax

    on_cpu = jax.default_backend() == "cpu"
    skip_slow = pytest.mark.skip(reason="slow: pass --runslow")
    skip_acc = pytest.mark.skip(reason="needs an accelerator")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "accelerator" in item.keywords and on_cpu:
            item.add_marker(skip_acc)


@pytest.fixture(scope="session")
def base_workdir(tmp_path_factory):
    """A tiny finished `pretrain` + `data` workdir, built once per session in this process.

    Tests that train further copy it (``copy_workdir``) so they never write into it.
    """
    from tests import helpers

    wd = str(tmp_path_factory.mktemp("base") / "wd")
    helpers.run_in_process(wd, helpers.TINY + [helpers.MESH_8, helpers.stages("pretrain", "data")])
    return wd


@pytest.fixture
def copy_workdir(base_workdir, tmp_path):
    import shutil

    def make(name="wd"):
        dst = str(tmp_path / name)
        shutil.copytree(base_workdir, dst)
        return dst

    return make


def pytest_unconfigure(config):
    if _OWN_CACHE:
        import shutil

        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
