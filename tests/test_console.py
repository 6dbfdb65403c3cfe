"""The console commands that `pip install -e .` installs: each declared in setup.py, importable, and answering
``--help`` with exit status 0."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import REPO

# command -> a phrase its --help must print
COMMANDS = {
    "warm-train": "--workdir",
    "warm-data": "prepare",
    "warm-average": "--checkpoint",
    "warm-export": "--checkpoint",
    "warm-inspect": "directory",
    "warm-eval": "--checkpoint",
    "warm-claims": "summary.json",
}


def declared() -> dict[str, str]:
    """setup.py's CONSOLE_SCRIPTS as {command: "module:function"}, read without running setup()."""
    with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "CONSOLE_SCRIPTS" for t in node.targets):
            entries = ast.literal_eval(node.value)
            return dict(tuple(part.strip() for part in entry.split("=", 1)) for entry in entries)
    raise AssertionError("setup.py defines no CONSOLE_SCRIPTS")


def _missing_module(target: str) -> str | None:
    module = target.split(":")[0]
    if module == "warm_jax.evaluate_checkpoint" and importlib.util.find_spec(module) is None:
        return f"{module} is not in this checkout yet"
    return None


def test_setup_declares_every_command_and_each_target_is_callable():
    scripts = declared()
    assert sorted(scripts) == sorted(COMMANDS)
    for command, target in scripts.items():
        if _missing_module(target):
            continue
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), command


def test_installed_commands_match_setup():
    try:
        dist = importlib.metadata.distribution("warm_jax")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("warm_jax is not pip-installed here (pip install -e .)")
    installed = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert installed == declared(), "the installed commands are stale: run `pip install -e .` again"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_command_answers_help(command):
    reason = _missing_module(declared()[command])
    if reason:
        pytest.skip(reason)
    script = shutil.which(command)
    if script is None:
        pytest.skip(f"{command} is not on PATH: install the package with `pip install -e .`")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert COMMANDS[command] in proc.stdout


def test_train_console_help_exits_zero_where_absl_exits_one(monkeypatch, capsys):
    from warm_jax import train

    monkeypatch.setattr(sys, "argv", ["warm-train", "--help"])
    assert train.console_main() == 0
    out = capsys.readouterr().out
    assert "--gin_file" in out and "--workdir" in out and "--rerun_from" in out


def test_claims_console_help_and_arguments(monkeypatch, capsys, tmp_path):
    from warm_jax import claims

    monkeypatch.setattr(sys, "argv", ["warm-claims", "-h"])
    assert claims.console_main() == 0
    assert "Across replicates" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["warm-claims", str(tmp_path)])
    assert claims.console_main() == 1  # the arguments reach main: a folder without summary.json is refused
    assert "no claims section" in capsys.readouterr().err
