"""Atomic directory replacement (a crash at any rename leaves the old or the new output) and the tools'
answers to bad input (one line on stderr naming the file, field or flag; exit 1; traceback with --verbose)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from warm_jax import average, checkpoints, claims, export, inspect_checkpoint, io_utils, logits, params_io
from warm_jax.models import transformer as tr

from tests.helpers import REPO, subprocess_env

CFG = tr.ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, max_len=16)


# ----------------------------------------------------------------------------- atomic directories


def _fill(directory, tag: str) -> None:
    """A small tree whose every file says which version it belongs to."""
    os.makedirs(os.path.join(directory, "sub"), exist_ok=True)
    for name in ("a.txt", os.path.join("sub", "b.txt")):
        with open(os.path.join(directory, name), "w") as f:
            f.write(tag)


def _version(directory) -> str | None:
    """'old' or 'new' when ``directory`` holds that complete tree, None when it is missing; else fails."""
    if not os.path.lexists(directory):
        return None
    tags = {open(os.path.join(directory, n)).read() for n in ("a.txt", os.path.join("sub", "b.txt"))}
    assert len(tags) == 1 and sorted(os.listdir(directory)) == ["a.txt", "sub"], f"{directory} is mixed: {tags}"
    return tags.pop()


class _Crash(OSError):
    pass


def _failing_renames(monkeypatch, parent: str, fail_at: int, crash: bool) -> list:
    """os.rename/os.replace raise at the fail_at-th rename of a directory in ``parent`` (the output's
    renames, not the files written inside it). crash: every later rename and rmtree does nothing
    but raise, as if the process had died there (no cleanup runs)."""
    calls, real_rename, real_replace, real_rmtree = [], os.rename, os.replace, shutil.rmtree
    dead = []

    def wrap(real):
        def fn(src, dst, *a, **k):
            ours = os.path.isdir(src) and os.path.dirname(os.path.abspath(src)) == parent
            if dead or (ours and len(calls) == fail_at):
                if ours:
                    calls.append((src, dst, "raised"))
                if crash:
                    dead.append(True)
                raise _Crash(f"rename {src} -> {dst}")
            if ours:
                calls.append((src, dst, "done"))
            return real(src, dst, *a, **k)

        return fn

    def rmtree(path, *a, **k):
        if dead:
            raise _Crash(f"rmtree {path}")
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(os, "rename", wrap(real_rename))
    monkeypatch.setattr(os, "replace", wrap(real_replace))
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    return calls


@pytest.mark.parametrize("crash", [False, True], ids=["error", "crash"])
@pytest.mark.parametrize("fail_at", [0, 1, 2, 3])
def test_overwrite_never_loses_the_output(tmp_path, monkeypatch, fail_at, crash):
    out = tmp_path / "merged"
    _fill(out, "old")
    failed = False
    with monkeypatch.context() as m:
        try:
            with io_utils.atomic_directory(str(out), overwrite=True) as tmp:
                _fill(tmp, "new")
                assert _version(out) == "old"  # the old one stays in place while the new one is written
                calls = _failing_renames(m, str(tmp_path), fail_at, crash)
        except _Crash:
            failed = True
    # 3 renames: the old one aside, the new one in, the old one to the bin. Failing to remove the old
    # copy (the third) is not an error: the new output is complete, the next write removes it.
    assert failed == (fail_at < 2) and len(calls) >= min(fail_at + 1, 3), calls
    if crash:
        # Killed at that rename: the output is old or new, or missing with the complete old one beside
        # it, which the next reader or writer puts back.
        assert _version(out) in ("old", "new", None)
        io_utils.recover(str(out))
    assert _version(out) == ("new" if fail_at >= 2 else "old")
    if not crash:  # the exception ran its cleanup: at most the old copy that could not be removed
        left = [p.name for p in tmp_path.iterdir() if p.name != "merged"]
        assert left == [] or (fail_at == 2 and len(left) == 1 and left[0].startswith(".merged.old-")), left
    # The next write finds a complete output and removes the leftovers of the failed one (a crashed
    # process's temporary excepted: it may be another writer's).
    with io_utils.atomic_directory(str(out), overwrite=True) as tmp:
        _fill(tmp, "new")
    assert _version(out) == "new"
    left = [p.name for p in tmp_path.iterdir() if p.name != "merged"]
    assert all(p.startswith(".merged.tmp-") for p in left) and (crash or not left), left


def test_killed_overwrite_is_recovered_by_the_reader_and_the_next_writer(tmp_path, monkeypatch):
    old = tr.init_params(CFG, jax.random.key(0))
    out = str(tmp_path / "rm")
    params_io.save_params(out, old, model_cfg=CFG, meta={"v": "old"}, tokenizer_dir=None)
    with monkeypatch.context() as m:
        calls = _failing_renames(m, str(tmp_path), 1, crash=True)  # killed once the old one is aside
        with pytest.raises(_Crash):
            params_io.save_params(
                out, tr.init_params(CFG, jax.random.key(1)), model_cfg=CFG, meta={}, tokenizer_dir=None
            )
    assert [c[2] for c in calls[:2]] == ["done", "raised"]  # then the put-back fails too: dead
    assert not os.path.exists(out) and [p for p in os.listdir(tmp_path) if ".rm.old-" in p]
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    _, _, params, meta = params_io.load_params_checkpoint(out, mesh)  # the reader puts the old one back
    assert meta["v"] == "old" and checkpoints.tree_sha256(params) == checkpoints.tree_sha256(old)
    # Killed there again: the next writer puts it back first (so without overwrite it refuses).
    with monkeypatch.context() as m:
        _failing_renames(m, str(tmp_path), 1, crash=True)
        with pytest.raises(_Crash):
            params_io.save_params(out, old, model_cfg=CFG, meta={"v": "new"}, tokenizer_dir=None)
    assert not os.path.exists(out)
    with pytest.raises(FileExistsError, match="already exists"):
        with io_utils.atomic_directory(out):
            pytest.fail("the body must not run")
    assert io_utils.read_json(os.path.join(out, "model.json"))["v"] == "old"


def test_recover_picks_the_newest_old_copy_and_writers_clean_up(tmp_path):
    out = tmp_path / "d"
    older, newer = tmp_path / ".d.old-1000000000000000000-aaaaaaaa", tmp_path / ".d.old-2000000000000000000-bbbbbbbb"
    _fill(older, "older")
    _fill(newer, "old")
    _fill(tmp_path / ".d.del-1000000000000000000-cccccccc", "half-deleted")
    _fill(tmp_path / ".dd.old-1000000000000000000-dddddddd", "another output's")
    assert io_utils.recover(str(out)) and _version(out) == "old"
    with io_utils.atomic_directory(str(out), overwrite=True) as tmp:
        _fill(tmp, "new")
    assert _version(out) == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".dd.old-1000000000000000000-dddddddd", "d"]


def test_output_that_is_a_file_is_refused_up_front(tmp_path):
    target = tmp_path / "out"
    target.write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match=f"output {target} is a file"):
            with io_utils.atomic_directory(str(target), overwrite=overwrite):
                pytest.fail("the body must not run")
    with pytest.raises(NotADirectoryError, match=f"its parent {target} is a file"):
        with io_utils.atomic_directory(str(target / "sub")):
            pass
    assert target.read_text() == "precious" and [p.name for p in tmp_path.iterdir()] == ["out"]


# ----------------------------------------------------------------------------- the tools on bad input


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Two members, and broken variants of the first: {name: directory}."""
    root = tmp_path_factory.mktemp("tools")
    d = {}
    for i in range(2):
        d[f"m{i}"] = str(root / f"m{i}")
        params_io.save_params(
            d[f"m{i}"], tr.init_params(CFG, jax.random.key(i)), model_cfg=CFG, meta={}, tokenizer_dir=None
        )
    meta = io_utils.read_json(os.path.join(d["m0"], "model.json"))
    variants = {
        "badjson": "{not json",
        "nomodel": json.dumps({"tokenizer": None}),
        "badfield": json.dumps({**meta, "model": {**meta["model"], "bogus": 1}}),
        "badtype": json.dumps({**meta, "model": {**meta["model"], "d_model": "abc"}}),
    }
    for name, text in variants.items():
        d[name] = str(root / name)
        shutil.copytree(d["m0"], d[name])
        with open(os.path.join(d[name], "model.json"), "w") as f:
            f.write(text)
    d["trunc"] = str(root / "trunc")
    shutil.copytree(d["m0"], d["trunc"])
    files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(d["trunc"], "ckpt", "0", "state")) for f in fs]
    biggest = max(files, key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 3)
    d["nockpt"] = str(root / "nockpt")
    shutil.copytree(d["m0"], d["nockpt"], ignore=shutil.ignore_patterns("ckpt"))
    d["file"] = str(root / "afile")
    with open(d["file"], "w") as f:
        f.write("not a directory")
    d["empty_gguf"] = str(root / "empty.gguf")
    open(d["empty_gguf"], "w").close()
    hf = root / "hf_trunc"  # an HF directory whose weights file is cut short
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(export.hf_config(CFG, kind="causal_lm", tokenizer=None)))
    (hf / "model.safetensors").write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{")
    d["hf_trunc"] = str(hf)
    for name, text in {"summary_bad": "{garbage", "summary_list": json.dumps({"claims": [1]})}.items():
        os.makedirs(root / name)
        (root / name / "summary.json").write_text(text)
        d[name] = str(root / name)
    d["acc"] = str(root / "acc.json")
    io_utils.atomic_write_json(d["acc"], {"m0": 0.5, "m1": 0.6})
    d["root"] = str(root)
    return d


def _avg(*checkpoints_, extra=()):
    return lambda d, out: (average.main, [*(f"--checkpoint={d[c]}" for c in checkpoints_), f"--output={out}", *extra])


CASES = {
    # name: (tool and argv from the fixture's paths and a fresh output path, what stderr must name)
    "average corrupt model.json": (_avg("badjson", "m1"), ["badjson/model.json", "not valid JSON"]),
    "average model.json without model": (_avg("nomodel", "m1"), ["nomodel/model.json", "field 'model'"]),
    "average unknown config field": (_avg("badfield", "m1"), ["badfield/model.json", "bogus"]),
    "average wrong config type": (_avg("badtype", "m1"), ["badtype/model.json", "model.d_model"]),
    "average weights overflow": (_avg("m0", "m1", extra=["--weights=1e308,1e308"]), ["--weights=", "overflow"]),
    "average weights nan": (_avg("m0", "m1", extra=["--weights=nan,1"]), ["--weights=nan,1", "finite"]),
    "average weights inf": (_avg("m0", "m1", extra=["--weights=inf,1"]), ["--weights=inf,1", "finite"]),
    "average weights negative": (_avg("m0", "m1", extra=["--weights=-1,2"]), ["--weights=-1,2", ">= 0"]),
    "average weights all zero": (_avg("m0", "m1", extra=["--weights=0,0"]), ["--weights=0,0", "all zero"]),
    "average weights count": (_avg("m0", "m1", extra=["--weights=1,2,3"]), ["--weights=1,2,3", "2 member"]),
    "average missing checkpoint": (
        lambda d, out: (average.main, [f"--checkpoint={d['root']}/nope", f"--checkpoint={d['m1']}", f"--output={out}"]),
        ["--checkpoint=", "/nope", "no such directory"],
    ),
    "average file as checkpoint": (_avg("file", "m1"), ["--checkpoint=", "afile", "not a checkpoint directory"]),
    "average truncated checkpoint": (_avg("trunc", "m1"), ["trunc/ckpt"]),
    "average checkpoint without ckpt/": (_avg("nockpt", "m1"), ["nockpt/ckpt"]),
    "average top_m without accuracies": (_avg("m0", "m1", extra=["--top_m=1"]), ["--top_m needs --accuracies"]),
    "average top_m too large": (
        lambda d, out: (
            average.main,
            [f"--checkpoint={d['m0']}", f"--checkpoint={d['m1']}", f"--accuracies={d['acc']}", "--top_m=3"]
            + [f"--output={out}"],
        ),
        ["--top_m=3"],
    ),
    "average corrupt accuracies": (
        lambda d, out: (
            average.main,
            [f"--checkpoint={d['m0']}", f"--checkpoint={d['m1']}", f"--accuracies={d['summary_bad']}/summary.json"]
            + ["--top_m=1", f"--output={out}"],
        ),
        ["summary_bad/summary.json", "not valid JSON"],
    ),
    "average bad mesh": (_avg("m0", "m1", extra=["--mesh=data=999"]), ["--mesh=data=999", "devices"]),
    "average output is a file": (
        lambda d, out: (average.main, [f"--checkpoint={d['m0']}", f"--output={d['file']}", "--overwrite"]),
        ["afile is a file"],
    ),
    "export corrupt model.json": (
        lambda d, out: (export.main, ["--checkpoint", d["badjson"], "--output", out]),
        ["badjson/model.json", "not valid JSON"],
    ),
    "export wrong config type": (
        lambda d, out: (export.main, ["--checkpoint", d["badtype"], "--output", out]),
        ["badtype/model.json", "model.d_model"],
    ),
    "export truncated checkpoint": (
        lambda d, out: (export.main, ["--checkpoint", d["trunc"], "--output", out]),
        ["trunc/ckpt", "no step verifies"],
    ),
    "export checkpoint without ckpt/": (
        lambda d, out: (export.main, ["--checkpoint", d["nockpt"], "--output", out]),
        ["nockpt/ckpt", "no such checkpoint directory"],
    ),
    "export file as checkpoint": (
        lambda d, out: (export.main, ["--checkpoint", d["file"], "--output", out]),
        ["afile", "is a file"],
    ),
    "export output is the checkpoint": (
        lambda d, out: (export.main, ["--checkpoint", d["m0"], "--output", d["m0"], "--overwrite"]),
        ["m0", "same directory"],
    ),
    "export output is a file": (
        lambda d, out: (export.main, ["--checkpoint", d["m0"], "--output", d["file"], "--overwrite"]),
        ["afile is a file"],
    ),
    "inspect missing": (
        lambda d, out: (inspect_checkpoint.main, [f"{d['root']}/nope"]),
        ["/nope", "no such checkpoint"],
    ),
    "inspect file": (lambda d, out: (inspect_checkpoint.main, [d["file"]]), ["afile", "a file"]),
    "inspect truncated": (lambda d, out: (inspect_checkpoint.main, [d["trunc"]]), ["trunc/ckpt", "no step verifies"]),
    "logits empty gguf": (
        lambda d, out: (logits.main, [f"--model={d['empty_gguf']}", "--text=hi", f"--output={out}.npy"]),
        ["empty.gguf"],
    ),
    "logits truncated safetensors": (
        lambda d, out: (logits.main, [f"--model={d['hf_trunc']}", "--text=hi", f"--output={out}.npy"]),
        ["hf_trunc"],
    ),
    "logits missing model": (
        lambda d, out: (logits.main, [f"--model={d['root']}/nope", "--text=hi", f"--output={out}.npy"]),
        ["/nope"],
    ),
    "logits output dir missing": (
        lambda d, out: (logits.main, [f"--model={d['hf_trunc']}", "--text=hi", f"--output={out}/x/l.npy"]),
        ["--output=", "does not exist"],
    ),
    "claims corrupt summary.json": (
        lambda d, out: (claims.main, [d["summary_bad"]]),
        ["summary_bad/summary.json", "not valid JSON"],
    ),
    "claims malformed claims": (
        lambda d, out: (claims.main, [d["summary_list"]]),
        ["summary_list/summary.json", "field 'claims'"],
    ),
    "claims missing run": (lambda d, out: (claims.main, [f"{d['root']}/nope"]), ["/nope", "no claims section"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_line_naming_it(ckpts, tmp_path, capsys, case):
    make, needles = CASES[case]
    main, argv = make(ckpts, str(tmp_path / "out"))
    capsys.readouterr()
    assert main(argv) == 1
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), cap.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert cap.out == "" and os.listdir(tmp_path) == []  # nothing written, no temporary left


def test_verbose_shows_the_traceback(ckpts, tmp_path, capsys):
    argv = [f"--checkpoint={ckpts['badjson']}", f"--checkpoint={ckpts['m1']}", f"--output={tmp_path / 'o'}"]
    assert average.main([*argv, "--verbose"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")


def test_average_refuses_to_replace_its_own_input(ckpts, tmp_path, monkeypatch, capsys):
    m0 = ckpts["m0"]
    before = io_utils.read_json(os.path.join(m0, "model.json"))
    os.symlink(m0, tmp_path / "link")
    monkeypatch.chdir(os.path.dirname(m0))
    for out in (m0, str(tmp_path / "link"), "./m0", os.path.join("..", os.path.basename(ckpts["root"]), "m0")):
        argv = [f"--checkpoint={m0}", f"--checkpoint={ckpts['m1']}", f"--output={out}", "--overwrite"]
        assert average.main(argv) == 1
        err = capsys.readouterr().err
        assert f"--output={out}" in err and f"--checkpoint={m0}" in err and "its own input" in err
    # The output may not contain an input either (replacing it would delete the input).
    assert average.main([f"--checkpoint={m0}", f"--output={os.path.dirname(m0)}", "--overwrite"]) == 1
    assert "would delete that input" in capsys.readouterr().err
    assert io_utils.read_json(os.path.join(m0, "model.json")) == before
    assert sorted(os.listdir(m0)) == ["ckpt", "model.json"]


def test_cli_stderr_is_one_line_in_a_fresh_process(ckpts, tmp_path):
    """No absl chatter and no traceback: the whole of stderr is the error line."""
    runs = [
        ["warm_jax.average", f"--checkpoint={ckpts['trunc']}", f"--checkpoint={ckpts['m1']}", f"--output={tmp_path}/o"],
        ["warm_jax.inspect_checkpoint", ckpts["file"]],
        ["warm_jax.export", "--checkpoint", ckpts["nockpt"], "--output", f"{tmp_path}/e"],
    ]
    for argv in runs:
        proc = subprocess.run(
            [sys.executable, "-m", *argv], env=subprocess_env(1), cwd=REPO, capture_output=True, text=True, timeout=120
        )
        lines = [x for x in proc.stderr.splitlines() if x.strip()]
        errors = [x for x in lines if x.startswith("error: ")]
        assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-3000:]
        # Only our own warnings besides it (e.g. the corrupt step skipped), never a traceback.
        assert all(x.startswith(("error: ", "WARNING:warm_jax")) for x in lines), proc.stderr[-3000:]
