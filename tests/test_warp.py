"""WARP: the `warp` claim and the report's `warp` section on a synthetic front (to the number), the
configuration's checks, and the `warp` stage end to end on the tiny workdir (resumable part by part)."""

from __future__ import annotations

import os
import shutil

import jax
import numpy as np
import pytest

from tests import helpers
from tests.test_policy import make_tiny_workdir, tiny_mesh
from warm_jax.workdir import Workdir
from warm_jax import claims, export, io_utils, merge_methods, report, stats
from warm_jax.policy import policy_ensemble, reinforce, warp, winrate

P = 8  # eval prompts
# A zero-mean per-prompt pattern, so every point's mean oracle is the number it is built from.
WIGGLE = np.asarray([0.3, -0.3, 0.1, -0.1, 0.2, -0.2, 0.05, -0.05])


def _points(means):
    """Per-prompt oracle rewards [E, P] whose means over prompts are ``means``; the wiggle differs per point."""
    return np.stack([m + np.roll(WIGGLE, i) for i, m in enumerate(means)])


# Two WARP iterations and two single runs (init- and EMA-anchored). The KL budget is min(2.0, 1.5) = 1.5:
# WARP iteration 1 at η = 1 (KL 2.0, oracle 9) lies beyond it and must not count.
FRONT = [
    {"iteration": 0, "eta": [0.0, 0.5, 1.0], "kl": [0.0, 0.5, 1.0], "oracle_means": [0.0, 1.0, 1.8]},
    {"iteration": 1, "eta": [0.0, 0.5, 1.0], "kl": [0.4, 1.2, 2.0], "oracle_means": [0.6, 2.5, 9.0]},
]
SINGLE = {
    "warm": {"step": [0, 10, 20], "kl": [0.0, 0.6, 1.5], "oracle_means": [0.0, 0.8, 1.2]},
    "warm_ema": {"step": [0, 10, 20], "kl": [0.0, 0.3, 0.9], "oracle_means": [0.0, 0.5, 1.5]},
}


def synthetic(front_shift: float = 0.0):
    """(summary, evidence) as report.build_summary assembles them; ``front_shift`` moves every WARP point."""
    front, ev_warp = [], {}
    for it in FRONT:
        oracle = _points([m + front_shift for m in it["oracle_means"]])
        ev_warp[f"iter{it['iteration']}/oracle"] = oracle
        front.append(
            {
                "iteration": it["iteration"],
                "eta": it["eta"],
                "kl": it["kl"],
                "oracle": oracle.mean(1).tolist(),
                "proxy": [0.0] * 3,
                "length": [5.0] * 3,
            }
        )
    single, ev_rl = {}, {}
    for name, r in SINGLE.items():
        oracle = _points(r["oracle_means"])
        ev_rl[name] = {"step": np.asarray(r["step"]), "oracle": oracle, "proxy": oracle}
        single[name] = {
            "anchor": warp.single_runs("warm")[name],
            "step": r["step"],
            "kl": r["kl"],
            "oracle": oracle.mean(1).tolist(),
            "proxy": [0.0] * 3,
        }
    summary = {"warp": {"reward": "warm", "front": front, "single": single}}
    return summary, {"warp": ev_warp, "rl": ev_rl}


def test_warp_claim_holds_on_a_front_above_the_single_policies():
    s, ev = synthetic()
    c = claims.CHECKS["warp"](s, ev)
    assert c["status"] == claims.HOLDS and c["holds"]
    n = c["numbers"]
    assert n["kl_budget"] == 1.5
    # The best WARP point within the budget: iteration 1, η = 0.5 (oracle 2.5), not η = 1 (beyond it).
    assert (n["best_warp_iteration"], n["best_warp_eta"], n["best_warp_kl"]) == (1, 0.5, 1.2)
    assert (n["best_single_run"], n["best_single_step"], n["best_single_kl"]) == ("warm_ema", 20, 0.9)
    assert n["n_warp_points"] == 5 and n["n_single_points"] == 6
    d = c["ci"]["best_warp_minus_best_single"]
    assert d["value"] == pytest.approx(2.5 - 1.5, abs=1e-12) and d["n"] == P and d["ci95"][0] > 0
    # The interval is the paired bootstrap of the max-over-candidates difference (stats.py's draws).
    w = np.concatenate([ev["warp"]["iter0/oracle"], ev["warp"]["iter1/oracle"][:2]]).T
    sg = np.concatenate([ev["rl"]["warm"]["oracle"], ev["rl"]["warm_ema"]["oracle"]]).T
    want = stats.paired_bootstrap_ci(w, sg, lambda a, b: a.max(-1) - b.max(-1))
    assert d["ci95"] == want["ci95"]
    # Win rate of the best WARP point over the best single point, prompt by prompt.
    bw, bs = ev["warp"]["iter1/oracle"][1], ev["rl"]["warm_ema"]["oracle"][2]
    assert c["ci"]["win_rate"]["value"] == float(np.mean(bw > bs)) == 1.0
    assert c["ci"]["win_rate"]["ci95"] == winrate.win_rate(bw, bs)["ci95"]


def test_warp_claim_fails_when_the_front_lies_below():
    s, ev = synthetic(front_shift=-1.2)  # best WARP within the budget: 2.5 − 1.2 = 1.3 < 1.5
    c = claims.CHECKS["warp"](s, ev)
    assert c["status"] == claims.FAILS and not c["holds"]
    assert c["ci"]["best_warp_minus_best_single"]["value"] == pytest.approx(1.3 - 1.5, abs=1e-12)
    assert c["ci"]["best_warp_minus_best_single"]["ci95"][0] <= 0
    assert "not higher" in c["reason"]


def test_warp_claim_is_not_tested_without_evidence_or_kl():
    s, ev = synthetic()
    assert claims.CHECKS["warp"]({}, ev) is None  # no warp stage: no claim
    assert claims.CHECKS["warp"](s, {"rl": ev["rl"]})["status"] == claims.NOT_TESTED
    c = claims.CHECKS["warp"](s, {"warp": "StaleArraysError: front_examples.npz: missing", "rl": ev["rl"]})
    assert c["status"] == claims.NOT_TESTED and "missing" in c["reason"]
    no_single = {"warp": {**s["warp"], "single": {}}}
    assert "no single-policy" in claims.CHECKS["warp"](no_single, ev)["reason"]
    for r in s["warp"]["single"].values():
        r["kl"] = [0.0, 0.0, 0.0]  # single policies that never moved: nothing to match at
    c = claims.CHECKS["warp"](s, ev)
    assert c["status"] == claims.NOT_TESTED and "no KL to match at" in c["reason"]
    s, ev = synthetic()
    ev["rl"]["warm"]["oracle"] = ev["rl"]["warm"]["oracle"][:, :5]
    assert "different prompts" in claims.CHECKS["warp"](s, ev)["reason"]


def write_synthetic_workdir(wd: str, front_shift: float = 0.0) -> None:
    """rl/results.json with per-prompt eval scores, and warp/results.json with front_examples.npz."""
    s, ev = synthetic(front_shift)
    runs = {}
    for name, r in s["warp"]["single"].items():
        for i, step in enumerate(r["step"]):
            o = ev["rl"][name]["oracle"][i]
            reinforce.write_eval_scores(Workdir(wd).rl_run(name), step, {"oracle": o, "proxy": o + 1})
        runs[name] = {
            **{k: r[k] for k in ("step", "kl", "oracle")},
            "proxy": [x + 1 for x in r["oracle"]],
            "length": [5.0] * 3,
        }
    io_utils.atomic_write_json(os.path.join(wd, "rl", "results.json"), {"runs": runs, "win_rate": {}})
    records, fronts = [], []
    for it in s["warp"]["front"]:
        o = ev["warp"][f"iter{it['iteration']}/oracle"]
        front = {
            "eta": np.asarray(it["eta"]),
            "oracle": o,
            "proxy": o + 1,
            "kl": np.asarray(it["kl"])[:, None] + np.roll(WIGGLE, 1)[None],
            "length": np.full_like(o, 5.0),
        }
        records.append(warp.front_record(it["iteration"], front))
        fronts.append(front)
    warp.write_results(Workdir(wd).warp, records, fronts, reward="warm", next_eta=0.3, config={"iterations": 2})


def test_report_warp_section_from_stage_files(tmp_path):
    wd = str(tmp_path)
    write_synthetic_workdir(wd)
    summary = report.build_summary(wd)
    w = summary["warp"]
    assert w["reward"] == "warm" and w["source"] == "warp" and [it["iteration"] for it in w["front"]] == [0, 1]
    np.testing.assert_allclose(w["front"][1]["kl"], [0.4, 1.2, 2.0], atol=1e-12)
    np.testing.assert_allclose(w["front"][1]["oracle"], [0.6, 2.5, 9.0], atol=1e-12)
    np.testing.assert_allclose(w["front"][1]["proxy"], [1.6, 3.5, 10.0], atol=1e-12)
    assert {n: r["anchor"] for n, r in w["single"].items()} == {"warm": "init", "warm_ema": "ema"}
    m = w["matched"]
    assert m["kl_budget"] == pytest.approx(1.5)
    assert (m["best_warp"]["iteration"], m["best_warp"]["eta"]) == (1, 0.5)
    assert m["best_warp"]["oracle"] == pytest.approx(2.5) and m["best_warp"]["kl"] == pytest.approx(1.2)
    assert (m["best_single"]["run"], m["best_single"]["step"]) == ("warm_ema", 20)
    wr = w["win_rates"]
    assert set(wr) == {"best_warp_vs_best_single", "best_warp_vs_warm", "best_warp_vs_warm_ema"}
    # Against the init-anchored run's best point (step 20, oracle 1.2 + wiggle): 2.5 + wiggle wins everywhere.
    assert wr["best_warp_vs_warm"]["value"] == 1.0 and wr["best_warp_vs_warm"]["single"]["step"] == 20
    c = next(c for c in summary["claims"] if c["id"] == "warp")
    assert c["status"] == claims.HOLDS
    assert c["ci"]["best_warp_minus_best_single"]["value"] == pytest.approx(1.0, abs=1e-12)
    figs = report.figures(summary, str(tmp_path))
    assert "warp_front.png" in figs and os.path.getsize(tmp_path / "warp_front.png") > 0
    md = report.markdown(summary, figs)
    assert "## WARP" in md and "| 1 | 0.5 | 1.200 | 2.500 | 3.500 |" in md
    assert "budget 1.500" in md and "win rate best_warp_vs_best_single: 1.000" in md


def test_report_warp_claim_fails_and_stale_examples_are_not_tested(tmp_path):
    wd = str(tmp_path)
    write_synthetic_workdir(wd, front_shift=-1.2)
    c = next(c for c in report.build_summary(wd)["claims"] if c["id"] == "warp")
    assert c["status"] == claims.FAILS
    with open(Workdir(wd).warp.front_examples, "ab") as f:
        f.write(b"x")
    summary = report.build_summary(wd)
    c = next(c for c in summary["claims"] if c["id"] == "warp")
    assert c["status"] == claims.NOT_TESTED and "SHA-256" in c["reason"]
    assert summary["warp"]["matched"] is None and "SHA-256" in summary["warp"]["not_matched"]


def test_warp_config_names_the_bad_binding():
    for kw, field in [
        ({"etas": (0.5, 0.2)}, "WarpConfig.etas"),
        ({"etas": (0.0, 1.5)}, "WarpConfig.etas"),
        ({"next_eta": -0.1}, "WarpConfig.next_eta"),
        ({"num_policies": 1}, "WarpConfig.num_policies"),
        ({"iterations": 0}, "WarpConfig.iterations"),
        ({"reward": "nope"}, "WarpConfig.reward"),
        ({"merge_method": "nope"}, "WarpConfig.merge_method"),
        ({"merge_method": "dare", "merge_params": (("sparsity", 0.5),)}, "WarpConfig.merge_params"),
    ]:
        with pytest.raises(ValueError, match=field):
            warp.WarpConfig(**kw)


# ----------------------------------------------------------------------------- the stage end to end (tiny)

RL = {**helpers.TINY_RL, "rewards": ("warm",), "num_steps": 2}
WARP = dict(iterations=2, num_policies=2, etas=(0.0, 0.5, 1.0), next_eta=0.5)
LOOP = ["LoopConfig.save_interval_steps = 2", "LoopConfig.async_save = False", "LoopConfig.log_every = 2"]


def _run_warp(ctx):
    with helpers.gin_config(LOOP):
        warp.run(ctx, warp.WarpConfig(**WARP), reinforce.ReinforceConfig(**RL), helpers.tiny_gen())
    return io_utils.read_json(ctx.path("warp", "results.json"))


@pytest.fixture(scope="module")
def warp_run(tmp_path_factory):
    ctx = make_tiny_workdir(str(tmp_path_factory.mktemp("warp")), tiny_mesh())
    return ctx, _run_warp(ctx)


def test_warp_stage_front_merge_and_next_init(warp_run):
    ctx, res = warp_run
    assert [it["iteration"] for it in res["iterations"]] == [0, 1] and res["reward"] == "warm"
    ex = warp.read_front_examples(ctx.artefacts.read_warp())
    assert ex["iter0/kl"].shape == (3, RL["num_eval_prompts"])
    # η = 0 of iteration 0 is the SFT policy itself: KL exactly 0 on every prompt.
    assert np.all(ex["iter0/kl"][0] == 0.0)
    # LITI goes towards each iteration's init: iteration 1's η = 0 is iteration 0's η = next_eta = 0.5, the
    # same parameters sampled with the same key, so every per-prompt number is the same.
    for k in ("oracle", "proxy", "kl"):
        np.testing.assert_array_equal(ex[f"iter1/{k}"][0], ex[f"iter0/{k}"][1])
    assert res["iterations"][0]["kl"][2] > 1e-4  # the merged policies moved
    # The checkpoints: the merge is SLERP of the policies relative to the SFT policy, the next init LITI at 0.5.
    setup = reinforce.build(ctx, reinforce.ReinforceConfig(**RL), helpers.tiny_gen())
    stacked = policy_ensemble.load_policies(ctx.path("warp", "iter_0", "policies"), setup)
    want = merge_methods.merge_stacked(stacked, method="slerp", base=setup.ref_params)
    merged = warp.load_policy(setup, ctx.path("warp", "iter_0", "merged"))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), merged, want)
    nxt = warp.load_policy(setup, ctx.path("warp", "iter_0", "next_init"))
    want = merge_methods.liti(setup.ref_params, merged, 0.5)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), nxt, want)
    # DARE draws from the merge's named stream: the same name gives the same merge, another name another.
    dare = dict(method="dare", params=(("density", 0.5),))
    a = warp.merge(setup, stacked, setup.ref_params, name="warp/iter_0/merged", **dare)
    b = warp.merge(setup, stacked, setup.ref_params, name="warp/iter_0/merged", **dare)
    c = warp.merge(setup, stacked, setup.ref_params, name="warp/iter_1/merged", **dare)
    leaf = lambda t: np.asarray(jax.tree.leaves(t)[0])
    np.testing.assert_array_equal(leaf(a), leaf(b))
    assert not np.array_equal(leaf(a), leaf(c))
    assert io_utils.read_json(ctx.path("warp", "iter_1", "merged", "model.json"))["warp_iteration"] == 1
    assert os.path.exists(ctx.path("metrics", "warp_iter1.jsonl"))
    # Exportable like any policy.
    out = export.export_hf(ctx.path("warp", "iter_1", "merged"), ctx.path("exported"), kind="causal_lm")
    assert (out / export.WEIGHTS_FILE).stat().st_size > 0


def test_warp_stage_resumes_part_by_part(warp_run, monkeypatch):
    ctx, res = warp_run
    os.remove(ctx.path("warp", "iter_1", "front", "1.json"))
    shutil.rmtree(ctx.path("warp", "iter_1", "next_init"))
    os.remove(ctx.path("warp", "results.json"))

    def no_training(*a, **k):
        raise AssertionError("a finished merge was retrained")

    with monkeypatch.context() as m:
        m.setattr(policy_ensemble, "train_policies", no_training)
        again = _run_warp(ctx)
    assert again == res  # the missing η point and next init recomputed to the same numbers
    # Without the merge the finished policies are read back from their checkpoint and merged again.
    shutil.rmtree(ctx.path("warp", "iter_1", "merged"))
    shutil.rmtree(ctx.path("warp", "iter_1", "front"))
    assert _run_warp(ctx) == res


def test_policy_merge_stage_is_one_warp_iteration(warp_run):
    # The policy_ensemble stage's layout holding iteration 0's policies (trained from the SFT policy):
    # policy_merge gives iteration 0's merge and front, number for number.
    ctx, res = warp_run
    shutil.copytree(ctx.path("warp", "iter_0", "policies"), ctx.artefacts.policy_ensemble.dir)
    with helpers.gin_config(LOOP):
        warp.run_merge(ctx, warp.WarpConfig(**WARP), reinforce.ReinforceConfig(**RL), helpers.tiny_gen())
    got = io_utils.read_json(ctx.path("policy_merge", "results.json"))
    assert got["reward"] == "warm" and got["config"]["num_policies"] == 2
    for k in ("eta", "kl", "oracle", "proxy", "length"):
        assert got["iterations"][0][k] == res["iterations"][0][k]
    assert ctx.artefacts.read_warp()["source"] == "warp"  # the warp stage's results come first


def test_report_from_the_stages_pairs_warp_with_the_single_runs(warp_run):
    # The single policies (reinforce, both anchors) on the same workdir, then the report from the stages' files.
    ctx, res = warp_run
    with helpers.gin_config(LOOP):
        reinforce.run(ctx, reinforce.ReinforceConfig(**RL, anchors=("init", "ema")), helpers.tiny_gen())
    summary = report.build_summary(ctx.workdir)
    w = summary["warp"]
    assert set(w["single"]) == {"warm", "warm_ema"} and w["front"] == [
        {k: it[k] for k in ("iteration", "eta", "kl", "oracle", "proxy", "length")} for it in res["iterations"]
    ]
    # Step 0 of a single run and η = 0 of iteration 0 are the SFT policy on the same prompts with the same key.
    ex = warp.read_front_examples(ctx.artefacts.read_warp())
    for name in ("warm", "warm_ema"):
        np.testing.assert_array_equal(
            ctx.artefacts.rl_run(name).read_eval_scores([0])["oracle"][0], ex["iter0/oracle"][0]
        )
    c = next(c for c in summary["claims"] if c["id"] == "warp")
    assert c["status"] in (claims.HOLDS, claims.FAILS), c["reason"]
    assert c["ci"]["best_warp_minus_best_single"]["n"] == RL["num_eval_prompts"]
    assert w["matched"]["kl_budget"] == c["numbers"]["kl_budget"] > 0
    assert summary["updates"]["warp/iter_1/policies"]["applied"] == RL["num_steps"]
