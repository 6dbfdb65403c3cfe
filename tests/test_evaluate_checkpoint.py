"""`warm-eval`: the scores of every kind of reward checkpoint equal rm_eval's eval.json for the same model and
split; the subset breakdown; one-line errors for bad inputs."""

from __future__ import annotations

import glob
import json
import os
import shutil

import numpy as np
import pytest

from tests import helpers
from warm_jax import evaluate_checkpoint, evaluation

SPLITS = ("train_clean", "train_corrupted", "validation", "ood_cue", "ood_temp")  # the built-in task's


@pytest.fixture(scope="module")
def finished(base_workdir, tmp_path_factory):
    """The tiny workdir trained through rm_ensemble, average and rm_eval (on the default mesh, data=8), and its eval.json.

    Metrics go to W&B too, offline (when wandb is installed; else one log line says it is not)."""
    wd = str(tmp_path_factory.mktemp("eval") / "wd")
    shutil.copytree(base_workdir, wd)
    bindings = [helpers.MESH_8, helpers.stages("rm_ensemble", "average", "rm_eval"), "EvalConfig.lmc_lambdas = 2"]
    bindings += ["metrics.writers = ['tensorboard', 'wandb']"]
    saved = {k: os.environ.get(k) for k in ("WANDB_MODE", "WANDB_SILENT")}
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true")
    try:
        helpers.run_in_process(wd, helpers.TINY + bindings)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    return wd, json.load(open(os.path.join(wd, "rm", "eval.json")))


def test_the_stages_wandb_run_holds_the_jsonl_scalars(finished):
    pytest.importorskip("wandb", reason="the wandb package is not installed (pip install 'warm_jax[wandb]')")
    from tests.test_metric_writers import _read_run
    from warm_jax import metrics

    wd, _ = finished
    (folder,) = glob.glob(os.path.join(wd, "wandb", "offline-run-*"))  # rm_eval logs no step metrics
    run = _read_run(folder)
    jsonl = {r["step"]: metrics.flat_scalars(r) for r in metrics.read_metrics(wd, "rm_ensemble")}
    assert run["name"] == "rm_ensemble" and sorted(jsonl) == list(range(2, 13, 2))
    assert run["history"] == jsonl  # e.g. loss/0 … loss/3, one per member
    assert run["config"]["EnsembleConfig.num_members"] == 4 and run["config"]["ModelConfig.d_model"] == 32
    assert glob.glob(os.path.join(wd, "tensorboard", "rm_ensemble", "events.out.tfevents.*"))


def _eval(tmp_path, capsys, *flags) -> tuple[dict, str]:
    out = str(tmp_path / "scores.json")
    assert evaluate_checkpoint.main([*flags, f"--output={out}"]) == 0
    return json.load(open(out)), capsys.readouterr().out


def _view(metrics: dict) -> dict:
    """acc, loss, ece per split, in eval.json's layout."""
    return {k: {s: metrics[s][k] for s in SPLITS} for k in ("acc", "loss", "ece")}


def _approx(got: dict, want: dict) -> None:
    for k in ("acc", "loss", "ece"):
        for s in SPLITS:
            assert got[k][s] == pytest.approx(want[k][s], rel=1e-5, abs=1e-6), (k, s)


def test_warm_checkpoint_scores_equal_eval_json(finished, tmp_path, capsys):
    wd, want = finished
    got, table = _eval(tmp_path, capsys, f"--checkpoint={wd}/rm/warm", f"--data={wd}/data")
    assert got["kind"] == "params" and list(got["metrics"]) == ["model"]
    assert got["splits"] == {
        "train": 96,
        "train_clean": got["splits"]["train_clean"],
        "train_corrupted": 96 - got["splits"]["train_clean"],
        "validation": 48,
        "ood_cue": 48,
        "ood_temp": 48,
    }
    m = got["metrics"]["model"]
    _approx(_view(m), want["rm"]["warm"])
    # The whole train split mixes both halves: its accuracy is their pair-weighted mean.
    n = got["splits"]
    mixed = (m["train_clean"]["acc"] * n["train_clean"] + m["train_corrupted"]["acc"] * n["train_corrupted"]) / 96
    assert m["train"]["acc"] == pytest.approx(mixed)
    # The reward statistics on validation are rm_eval's (used to normalise the reward in RL).
    assert m["validation"]["reward"]["mean"] == pytest.approx(want["reward_stats"]["warm"]["mean"], abs=1e-6)
    assert m["validation"]["reward"]["std"] == pytest.approx(want["reward_stats"]["warm"]["std"], rel=1e-5)
    line = next(l for l in table.splitlines() if l.split()[:2] == ["model", "validation"])
    assert float(line.split()[3]) == pytest.approx(want["rm"]["warm"]["acc"]["validation"], abs=1e-4)
    # Length bias as rm_eval measures it, from the same margins and length gaps.
    for s in SPLITS:
        assert m[s]["length_bias"] == pytest.approx(want["rm"]["length_bias"][s]["warm"], rel=1e-5, abs=1e-6), s
    assert float(line.split()[-1]) == pytest.approx(m["validation"]["length_bias"]["corr"], abs=1e-4)


def test_member_stack_reports_each_member_ens_and_warm(finished, tmp_path, capsys):
    wd, want = finished
    got, table = _eval(tmp_path, capsys, f"--checkpoint={wd}/rm/members", f"--data={wd}/data")
    assert got["kind"] == "members" and got["members"] == [0, 1, 2, 3]
    assert set(got["metrics"]) == {"member_0", "member_1", "member_2", "member_3", "ens", "warm"}
    for entry in want["rm"]["members"]:
        acc = {s: got["metrics"][f"member_{entry['id']}"][s]["acc"] for s in SPLITS}
        assert acc == pytest.approx(entry["acc"], abs=1e-9), entry["id"]
    _approx(_view(got["metrics"]["ens"]), want["rm"]["ens"])
    _approx(_view(got["metrics"]["warm"]), want["rm"]["warm"])
    assert sum(l.startswith("member_") for l in table.splitlines()) == 4 * (len(SPLITS) + 1)


def test_one_member_alone_and_the_stacked_training_checkpoint(finished, tmp_path, capsys):
    wd, want = finished
    member0 = {s: want["rm"]["members"][0]["acc"][s] for s in SPLITS}
    # One member scored alone (a program without the member axis): the same pairs are right, to round-off.
    got, _ = _eval(tmp_path, capsys, f"--checkpoint={wd}/rm/members", "--member=0", f"--data={wd}/data")
    assert list(got["metrics"]) == ["member_0"]
    assert {s: got["metrics"]["member_0"][s]["acc"] for s in SPLITS} == pytest.approx(member0, abs=1e-9)
    # The training checkpoint holds the same members, stacked.
    got, _ = _eval(tmp_path, capsys, f"--checkpoint={wd}/rm/ckpt", f"--data={wd}", "--split=validation,ood_temp")
    assert got["kind"] == "stacked" and set(got["splits"]) == {"validation", "ood_temp"}
    for entry in want["rm"]["members"]:
        for s in ("validation", "ood_temp"):
            assert got["metrics"][f"member_{entry['id']}"][s]["acc"] == pytest.approx(entry["acc"][s], abs=1e-9)


def test_hf_export_scores_as_the_checkpoint_it_came_from(finished, tmp_path, capsys):
    import tokenizers

    from warm_jax import export
    from warm_jax.data.tokenizers import HFTokenizer, load_tokenizer

    wd, want = finished
    hf = str(tmp_path / "hf")
    assert export.main([f"--checkpoint={wd}/rm/warm", f"--output={hf}", "--kind=reward"]) == 0
    # The word tokenizer has no HF form, and the importer wants a tokenizer.json: give it one over the same
    # words (warm-eval scores the dataset's token ids; the tokenizer itself is not used).
    words = load_tokenizer(os.path.join(wd, "tokenizer"))
    wl = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({w: i for i, w in enumerate(words.vocab)}, unk_token=words.vocab[0])
    )
    HFTokenizer(wl, eos_id=words.eos_id, bos_id=words.bos_id, pad_id=words.pad_id, add_bos=words.add_bos).save(hf)
    got, _ = _eval(tmp_path, capsys, f"--checkpoint={hf}", f"--data={wd}/data", "--split=validation")
    assert got["kind"] == "hf"
    acc = got["metrics"]["model"]["validation"]["acc"]
    assert acc == pytest.approx(want["rm"]["warm"]["acc"]["validation"], abs=1e-9)
    # A causal-LM export has no reward head to score with.
    lm = str(tmp_path / "lm")
    assert export.main([f"--checkpoint={wd}/rm/warm", f"--output={lm}", "--kind=causal_lm"]) == 0
    capsys.readouterr()
    assert evaluate_checkpoint.main([f"--checkpoint={lm}", f"--data={wd}/data"]) == 1
    assert "has no reward head" in capsys.readouterr().err


def test_a_dataset_with_subsets_is_broken_down_by_them(tmp_path, capsys):
    """A RewardBench-style table (subset column) prepared by warm-data, scored by a model of its vocabulary."""
    import jax

    from tests.test_hf_data import FIX, TOK, prepare
    from warm_jax.data.tokenizers import load_tokenizer
    from warm_jax.models import transformer as tr
    from warm_jax.params_io import save_params

    rc, data = prepare(tmp_path, FIX / "parquet_chat")
    assert rc == 0
    cfg = tr.ModelConfig(
        vocab_size=load_tokenizer(TOK).vocab_size, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32
    )
    ckpt = str(tmp_path / "rm")
    save_params(ckpt, tr.init_params(cfg, jax.random.key(0)), model_cfg=cfg, meta={}, tokenizer_dir=str(TOK))
    got, table = _eval(tmp_path, capsys, f"--checkpoint={ckpt}", f"--data={data}")
    train = got["metrics"]["model"]["train"]
    assert {k: v["n"] for k, v in train["subsets"].items()} == {"chat": 3, "reasoning": 2, "safety": 1}
    assert {k: v["n"] for k, v in got["metrics"]["model"]["test"]["subsets"].items()} == {"chat": 1, "reasoning": 1}
    # The subsets partition the split: their pair-weighted accuracy is the split's.
    assert sum(v["acc"] * v["n"] for v in train["subsets"].values()) / 6 == pytest.approx(train["acc"])
    assert "train/safety" in table


def test_subset_breakdown_uses_rm_evals_metrics():
    rng = np.random.default_rng(0)
    rc, rr = rng.normal(size=40), rng.normal(size=40)
    names = np.asarray(["chat", "safety"] * 20)
    gap = rng.integers(-5, 6, size=40)
    per_pair = {"test": {"subset": names, "length_gap": gap}}
    got = evaluate_checkpoint.measure({"model": {"test": (rc, rr)}}, per_pair, bins=10)
    entry = got["model"]["test"]
    assert set(entry["subsets"]) == {"chat", "safety"}
    assert entry["length_bias"] == evaluation.length_bias(evaluation.margins(rc, rr), gap)
    for n in ("chat", "safety"):
        sel = names == n
        assert entry["subsets"][n]["n"] == 20
        assert entry["subsets"][n]["acc"] == evaluation.accuracy(rc[sel], rr[sel])
        assert entry["subsets"][n]["ece"] == evaluation.ece(rc[sel], rr[sel], 10)
        assert entry["subsets"][n]["length_bias"] == evaluation.length_bias(
            evaluation.margins(rc[sel], rr[sel]), gap[sel]
        )
    assert entry["acc"] == evaluation.accuracy(rc, rr) and "subsets" not in got["model"]["test"]["subsets"]["chat"]
    assert "test/safety" in evaluate_checkpoint.table(got)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--checkpoint={tmp}/nope", "--data={wd}/data"], "error: --checkpoint={tmp}/nope: no such directory"),
        (["--checkpoint={wd}/rm/eval.json", "--data={wd}/data"], "a file, not a checkpoint directory"),
        (
            ["--checkpoint={wd}/metrics", "--data={wd}/data"],
            "error: --checkpoint={wd}/metrics: not a reward checkpoint",
        ),
        (["--checkpoint={wd}/rm/warm", "--data={tmp}"], "error: --data={tmp}: no preference_metadata.json in it"),
        (["--checkpoint={wd}/rm/warm", "--data={tmp}/nope"], "error: --data={tmp}/nope: no such directory"),
        (["--checkpoint={wd}/rm/warm", "--data={wd}/data", "--split=test"], "has no split 'test'; it has"),
        (["--checkpoint={wd}/rm/warm", "--data={wd}/data", "--member=1"], "is one model, not a stack"),
        (["--checkpoint={wd}/rm/members", "--data={wd}/data", "--member=7"], "--member=7: {wd}/rm/members has members"),
        (["--checkpoint={wd}/rm/warm", "--data={wd}/data", "--output={tmp}"], "--output={tmp}: a directory"),
    ],
)
def test_bad_inputs_are_one_line_naming_the_path(finished, tmp_path, capsys, flags, message):
    wd, _ = finished
    fill = lambda s: s.format(wd=wd, tmp=str(tmp_path))  # noqa: E731
    assert evaluate_checkpoint.main([fill(f) for f in flags]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and fill(message) in err[0], err


def test_a_dataset_of_another_vocabulary_is_refused():
    splits = {"validation": {"chosen_tokens": np.asarray([[5, 10_000]]), "rejected_tokens": np.asarray([[1, 2]])}}
    from warm_jax.models import transformer as tr

    with pytest.raises(
        evaluate_checkpoint.cli_errors.UserError, match=r"--data=D: token ids up to 10000, .* vocab_size 99"
    ):
        evaluate_checkpoint._check_vocabulary(splits, tr.ModelConfig(vocab_size=99), "D", "C")
