"""Numbers, not existence: the bootstrap against known cases, rm_eval's metric code on a synthetic scorer
whose accuracies, ECE, WARM-by-M and flipped-label accuracy are known, and the report's summary, claims and
markdown built from stage files written by the stages' own writers."""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest

from warm_jax.workdir import Workdir
from warm_jax import claims, evaluation, io_utils, report, rm_average, stats
from warm_jax.data import preference
from warm_jax.policy import bon, reinforce, winrate
from warm_jax.stages import RunContext

# ----------------------------------------------------------------------------- stats


def test_bootstrap_of_identical_arrays_is_exactly_zero():
    x = np.random.default_rng(0).normal(size=500)
    out = stats.paired_bootstrap_ci(x, x.copy())
    assert out["value"] == 0.0 and out["ci95"] == [0.0, 0.0] and out["se"] == 0.0 and out["n"] == 500


def test_bootstrap_of_a_constant_shift_sits_at_the_shift():
    x = np.random.default_rng(1).normal(size=300)
    out = stats.paired_bootstrap_ci(x + 0.25, x)
    assert out["value"] == pytest.approx(0.25, abs=1e-12)
    np.testing.assert_allclose(out["ci95"], [0.25, 0.25], atol=1e-12)


def test_bootstrap_interval_of_a_mean_matches_its_known_standard_error():
    # mean of N(0.3, 2²) over 4,000 draws: s.e. 2 / √4000 = 0.0316, 95% half-width 1.96 s.e. = 0.062
    x = np.random.default_rng(2).normal(0.3, 2.0, size=4000)
    out = stats.bootstrap_ci([x])
    se = x.std(ddof=1) / math.sqrt(len(x))
    assert out["se"] == pytest.approx(se, rel=0.08)
    lo, hi = out["ci95"]
    assert (hi - lo) / 2 == pytest.approx(1.96 * se, rel=0.08)
    assert lo < x.mean() < hi


def test_pairing_removes_the_shared_variance():
    """Two models that differ on 20 of 1,000 pairs: the paired CI is that of the 20, not of two accuracies."""
    rng = np.random.default_rng(3)
    a = (rng.random(1000) < 0.7).astype(float)
    b = a.copy()
    b[np.flatnonzero(a == 1)[:20]] = 0  # b is wrong on 20 pairs a gets right
    paired = stats.paired_bootstrap_ci(a, b)
    assert paired["value"] == pytest.approx(0.02) and paired["ci95"][0] > 0.01
    unpaired_se = math.sqrt(a.var() / 1000 + b.var() / 1000)
    assert paired["se"] < unpaired_se / 3


def test_bootstrap_is_deterministic_and_refuses_bad_input():
    x = np.random.default_rng(4).normal(size=(50, 3))
    stat = lambda m: m[..., 0] - m[..., 2]  # noqa: E731
    assert stats.bootstrap_ci([x], stat) == stats.bootstrap_ci([x], stat)
    assert stats.bootstrap_ci([x], stat, seed=1) != stats.bootstrap_ci([x], stat)
    with pytest.raises(ValueError, match="non-finite"):
        stats.bootstrap_ci([np.array([1.0, np.nan])])
    with pytest.raises(ValueError, match="same examples"):
        stats.paired_bootstrap_ci(np.zeros(3), np.zeros(4))
    assert stats.standard_error([1.0]) is None
    assert stats.standard_error([0.0, 1.0, 0.0, 1.0]) == pytest.approx(math.sqrt(1 / 3) / 2)


def test_correctness_counts_ties_half():
    np.testing.assert_array_equal(stats.correctness([2.0, -1.0, 0.0, -0.0]), [1.0, 0.0, 0.5, 0.5])


def test_arrays_round_trip_and_a_changed_file_is_refused(tmp_path):
    path = str(tmp_path / "x.npz")
    sha = io_utils.write_arrays(path, {"validation/warm": np.arange(3, dtype=np.float32)})
    got = io_utils.read_arrays(path, sha)
    assert list(got) == ["validation/warm"] and got["validation/warm"].dtype == np.float32
    io_utils.write_arrays(path, {"validation/warm": np.zeros(3, np.float32)})
    with pytest.raises(io_utils.StaleArraysError, match="does not match"):
        io_utils.read_arrays(path, sha)
    with pytest.raises(io_utils.StaleArraysError, match="missing"):
        io_utils.read_arrays(str(tmp_path / "nope.npz"))


# ----------------------------------------------------------------------------- rm_eval's metrics


def test_ece_known_cases():
    big = 64.0  # σ(±64) is 1 and 1.6e-28: fully confident
    # confident everywhere: ECE is the error rate
    assert evaluation.ece([big, big, big, -big], [0.0] * 4) == pytest.approx(0.25)
    # p = 0.75 for 3 of 4 right and 1 wrong: calibrated
    l3 = math.log(3)
    assert evaluation.ece([l3, l3, l3, -l3], [0.0] * 4) == pytest.approx(0.0, abs=1e-12)
    # p = 0.75 and always right: under-confident by 0.25
    assert evaluation.ece([l3] * 4, [0.0] * 4) == pytest.approx(0.25)
    assert evaluation.accuracy([1.0, 0.0, -1.0, 2.0], [0.0] * 4) == 0.625


def test_score_splits_keeps_the_flipped_labels_apart_and_scores_each_split_once():
    train = {"chosen_length": np.arange(6), "flipped": np.array([0, 1, 0, 0, 1, 0])}
    splits = {
        "train": evaluation.SplitRows.whole(train),
        "validation": evaluation.SplitRows.whole({"chosen_length": np.arange(3)}),
        "ood": evaluation.SplitRows.whole({"chosen_length": np.arange(4)}),
    }
    scored = []

    def score(d):  # rewards [2, N] (two members) of a split's pairs: r⁺ = 10 · length, r⁻ = 0
        scored.append(d.n)
        r = np.stack([10.0 * d.data["chosen_length"]] * 2)
        return r, np.zeros_like(r)

    s = evaluation.score_splits(score, splits)
    assert list(s) == ["train_clean", "train_corrupted", "validation", "ood"] and sorted(scored) == [3, 4, 6]
    np.testing.assert_array_equal(s["train_corrupted"][0], [[10, 40]] * 2)
    np.testing.assert_array_equal(s["train_clean"][0], [[0, 20, 30, 50]] * 2)
    np.testing.assert_array_equal(s["ood"][0][0], [0, 10, 20, 30])
    assert list(evaluation.score_splits(score, splits, ("train_clean",))) == ["train_clean"]
    with pytest.raises(ValueError, match="unknown evaluation split"):
        evaluation.score_splits(score, splits, ("test",))
    # The built-in task's two ood splits flow through by name, in table order, each scored once.
    splits = {k: splits[k] for k in ("train", "validation")} | {
        "ood_temp": evaluation.SplitRows.whole({"chosen_length": np.arange(5)}),
        "ood_cue": evaluation.SplitRows.whole({"chosen_length": np.arange(4)}),
    }
    scored.clear()
    s = evaluation.score_splits(score, splits)
    assert list(s) == ["train_clean", "train_corrupted", "validation", "ood_cue", "ood_temp"]
    assert sorted(scored) == [3, 4, 5, 6]
    np.testing.assert_array_equal(s["ood_temp"][0][0], [0, 10, 20, 30, 40])


# A synthetic reward model: parameters θ are one number per pair (θ_chosen; θ_rejected = 0) and its reward is
# θ³. Members are rows of THETA; the weight average of a set is mean(θ)³, which is not the prediction average
# mean(θ³): WARM and ENS differ where the members disagree in magnitude. Members 0 and 1 are 50% right on
# validation, member 2 is 75% right, so the best-first order is [2, 0, 1] (ids 12, 10, 11).
THETA = {
    "validation": [[4, -2, 4, -4], [-4, -2, 4, 4], [4, 4, -4, 4]],
    "ood": [[4, -4, 4, 4], [-2, 4, -2, 4], [4, 4, 4, -4]],
    "train_clean": [[4, 4, 4, -4], [4, -4, 4, 4], [4, 4, 4, 4]],
    "train_corrupted": [[4, 4, -4, -4], [4, 4, 4, -4], [4, -4, -4, -4]],  # vs the flipped labels
}
IDS = [10, 11, 12]


class CubeScorer:
    def __init__(self):
        self.theta = {s: np.asarray(t, np.float64) for s, t in THETA.items()}
        self.warm_calls = []

    def members(self):
        return {s: (t**3, np.zeros_like(t)) for s, t in self.theta.items()}

    def warm(self, idx, split):
        self.warm_calls.append((tuple(idx), split))
        r = self.theta[split][list(idx)].mean(0) ** 3
        return r, np.zeros_like(r)

    def interp(self, a, b, lam):
        return {s: (((1 - lam) * t[a] + lam * t[b]) ** 3, np.zeros(t.shape[1])) for s, t in self.theta.items()}


def measure(**selection):
    """rm_eval's numbers of the members that the `average` stage's selection (``selection``: AverageConfig) picks."""
    sc = CubeScorer()
    avg = rm_average.AverageConfig(**selection)
    members = sc.members()
    rc, rr = members[avg.select_split]
    order = rm_average.rank([evaluation.accuracy(rc[i], rr[i]) for i in range(len(IDS))])
    warm_acc = lambda idx: evaluation.accuracy(*sc.warm(sorted(idx), avg.select_split))  # noqa: E731
    chosen = rm_average.select_members(order, avg, warm_acc)
    sc.warm_calls.clear()
    cfg = evaluation.EvalConfig(lmc_lambdas=3)
    return (*evaluation.measure(members, IDS, cfg, sc.warm, sc.interp, chosen=chosen), chosen, sc)


def test_rm_eval_metrics_on_a_synthetic_scorer_are_known_to_the_number():
    result, examples, chosen, sc = measure()
    rm = result["rm"]
    assert [m["acc"]["validation"] for m in rm["members"]] == [0.5, 0.5, 0.75]
    assert [m["id"] for m in rm["members"]] == IDS and rm["order"] == [12, 10, 11] and chosen == [0, 1, 2]
    # WARM of the best-first top M (M = 1: member 12 alone; M = 2: 12 and 10; M = 3: all)
    acc = {s: [r["acc"][s] for r in rm["warm_by_m"]] for s in THETA}
    assert acc == {
        "validation": [0.75, 0.75, 0.875],  # M = 3: mean θ = (4/3, 0, 4/3, 4/3) → one tie
        "ood": [0.75, 0.75, 1.0],
        "train_clean": [1.0, 0.875, 1.0],
        "train_corrupted": [0.25, 0.375, 0.5],  # against the flipped labels: higher = more memorised
    }
    assert [r["members"] for r in rm["warm_by_m"]] == [[12], [12, 10], [12, 10, 11]]
    assert [r["acc"]["validation"] for r in rm["ens_by_m"]] == [0.75, 0.75, 1.0]  # mean θ³ > 0 on every pair
    assert rm["warm"]["acc"] == rm["warm_by_m"][2]["acc"] and rm["warm"]["M"] == 3
    assert rm["warm"]["members"] == IDS and rm["ens"]["acc"]["validation"] == 1.0
    # ECE: M = 1 is confident (±64), so its ECE is its error rate; M = 2 on validation has margins
    # (64, 1, 0, 0): the tied pairs are calibrated, the margin-1 pair is off by σ(−1) in both halves.
    assert rm["warm_by_m"][0]["ece"] == pytest.approx(
        {"validation": 0.25, "ood": 0.25, "train_clean": 0.0, "train_corrupted": 0.75}
    )
    assert rm["warm_by_m"][1]["ece"]["validation"] == pytest.approx(1 / (1 + math.e) / 4)
    assert rm["warm_by_m"][0]["loss"]["validation"] == pytest.approx(16.0)  # one pair wrong by 64, over 4
    assert result["reward_stats"]["warm"]["mean"] == pytest.approx(8 / 9)  # 3 × (4/3)³ over 8 rewards
    assert result["best_member"] == 12 and result["members"] == IDS
    # LMC between the two best (12, then 10): θ(½) is WARM of the two, 0.75 on validation vs a chord of 0.625.
    lmc = result["lmc"]
    assert lmc["members"] == [12, 10] and lmc["lambdas"] == [0.0, 0.5, 1.0]
    assert lmc["weight_interp"]["validation"] == [0.75, 0.75, 0.5]
    assert lmc["barrier"]["validation"] == 0.0  # eval.json's barrier counts the endpoints: never below 0
    assert lmc["pred_interp"]["validation"] == [0.75, 0.75, 0.5]
    # Every (set, split) average is scored once, though the top 3 and 'all' are the same set.
    assert len(sc.warm_calls) == 3 * 4 and len(set(sc.warm_calls)) == 12


def test_rm_eval_examples_are_the_margins_its_accuracies_come_from():
    result, ex, _, _ = measure()
    rm = result["rm"]
    np.testing.assert_array_equal(ex["member_ids"], IDS)
    np.testing.assert_array_equal(ex["order"], [12, 10, 11])
    np.testing.assert_array_equal(ex["lmc_members"], [12, 10])
    for s, t in THETA.items():
        t = np.asarray(t, np.float64)
        assert ex[f"{s}/members"].dtype == np.float32 and ex[f"{s}/members"].shape == (3, 4)
        np.testing.assert_array_equal(ex[f"{s}/members"], (t**3).astype(np.float32))
        np.testing.assert_allclose(ex[f"{s}/warm"], t.mean(0) ** 3, rtol=1e-6)
        np.testing.assert_allclose(ex[f"{s}/ens"], (t**3).mean(0), rtol=1e-6)
        assert ex[f"{s}/lmc_weight"].shape == ex[f"{s}/lmc_pred"].shape == (3, 4)
        mean_acc = lambda d: float(np.mean(stats.correctness(d)))  # noqa: E731
        assert [mean_acc(d) for d in ex[f"{s}/members"]] == [m["acc"][s] for m in rm["members"]]
        assert [mean_acc(d) for d in ex[f"{s}/warm_by_m"]] == [r["acc"][s] for r in rm["warm_by_m"]]
        assert [mean_acc(d) for d in ex[f"{s}/ens_by_m"]] == [r["acc"][s] for r in rm["ens_by_m"]]
        assert mean_acc(ex[f"{s}/warm"]) == rm["warm"]["acc"][s] and mean_acc(ex[f"{s}/ens"]) == rm["ens"]["acc"][s]
        assert [mean_acc(d) for d in ex[f"{s}/lmc_weight"]] == result["lmc"]["weight_interp"][s]
        assert [mean_acc(d) for d in ex[f"{s}/lmc_pred"]] == result["lmc"]["pred_interp"][s]


def test_length_bias_known_cases():
    gap = np.array([3, -1, 2, 0, -4])
    lb = evaluation.length_bias(2.0 * gap + 1.0, gap)  # a reward that reads length and nothing else
    assert lb["corr"] == pytest.approx(1.0) and lb["acc_longer_chosen"] == 1.0 and lb["acc_shorter_chosen"] == 0.0
    lb = evaluation.length_bias(-gap.astype(float), gap)  # one that prefers the shorter: tie at gap 0 counts in neither
    assert lb == {"corr": pytest.approx(-1.0), "acc_longer_chosen": 0.0, "acc_shorter_chosen": 1.0}
    # A constant margin: no correlation to measure.
    assert evaluation.length_bias([1.0, 1.0, 1.0, 1.0, 1.0], gap)["corr"] is None
    assert evaluation.length_bias([1.0, 2.0], [0, 0]) == {
        "corr": None,
        "acc_longer_chosen": None,
        "acc_shorter_chosen": None,
    }


def test_rm_eval_length_bias_of_every_model_on_a_synthetic_scorer():
    sc = CubeScorer()
    gaps = {s: np.array([3, -1, 2, 0]) for s in THETA}
    result, ex = evaluation.measure(
        sc.members(), IDS, evaluation.EvalConfig(lmc_lambdas=3), sc.warm, sc.interp, chosen=[0, 1, 2], length_gap=gaps
    )
    bias = result["rm"]["length_bias"]
    assert list(bias) == list(THETA)
    v = bias["validation"]
    assert v["share_longer_chosen"] == 0.5
    # Member 12 (θ = 4, 4, −4, 4): right on the shorter-chosen pair and on one of the two longer-chosen ones.
    assert v["members"][2]["acc_longer_chosen"] == 0.5 and v["members"][2]["acc_shorter_chosen"] == 1.0
    assert v["warm_by_m"][0] == v["members"][2]  # WARM of the best (id 12) alone
    # WARM of all three: mean θ = (4/3, 0, 4/3, 4/3), margins (64/27, 0, 64/27, 64/27); the shorter-chosen pair ties.
    assert v["warm"] == v["warm_by_m"][2] and v["warm"]["acc_shorter_chosen"] == 0.5
    assert v["warm"]["corr"] == pytest.approx(np.corrcoef([64 / 27, 0, 64 / 27, 64 / 27], [3, -1, 2, 0])[0, 1])
    np.testing.assert_array_equal(ex["validation/length_gap"], [3, -1, 2, 0])
    assert ex["validation/length_gap"].dtype == np.int32
    md = report.markdown({"rm": result["rm"]}, [])
    corr = {s: f"{bias[s]['warm']['corr']:+.3f}" for s in ("validation", "ood")}
    assert "### Length bias" in md and f"| **WARM** (M=3) | {corr['validation']} | {corr['ood']} |" in md
    # Member 12's margins (64, 64, −64, 64) against gaps (3, −1, 2, 0): covariance −128 / √(12288 · 10).
    assert "| member 12 | -0.365 |" in md
    no_gaps = measure()[0]["rm"]
    assert "length_bias" not in no_gaps and "Length bias" not in report.markdown({"rm": no_gaps}, [])


def test_rm_eval_splits_the_train_accuracies_by_which_members_trained_on_each_pair():
    sc = CubeScorer()
    # train_corrupted margins: member 10 (64, 64, −64, −64), 11 (64, 64, 64, −64), 12 (64, −64, −64, −64).
    seen = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]], bool)
    train_seen = {"train_clean": np.ones((3, 4), bool), "train_corrupted": seen}
    cfg = evaluation.EvalConfig(lmc_lambdas=3)
    result, ex = evaluation.measure(sc.members(), IDS, cfg, sc.warm, sc.interp, chosen=[0, 1, 2], train_seen=train_seen)
    corrupted = result["rm"]["by_share"]["train_corrupted"]
    assert corrupted["members"] == [
        {"id": 10, "seen": 1.0, "unseen": 0.0},
        {"id": 11, "seen": 1.0, "unseen": 0.5},
        {"id": 12, "seen": None, "unseen": 0.25},  # it trained on none of them
    ]
    # Seen by 2, 1, 1, 0 of the three; WARM's margins (mean θ)³ and ENS's mean θ³ have the signs +, +, −, −.
    assert corrupted["seen_by"] == [
        {"count": 0, "pairs": 1, "warm": 0.0, "ens": 0.0},
        {"count": 1, "pairs": 2, "warm": 0.5, "ens": 0.5},
        {"count": 2, "pairs": 1, "warm": 1.0, "ens": 1.0},
    ]
    assert [r["count"] for r in result["rm"]["by_share"]["train_clean"]["seen_by"]] == [3]
    np.testing.assert_array_equal(ex["train_corrupted/seen"], seen)
    md = report.markdown({"rm": result["rm"]}, [])
    assert "| train_corrupted | 1 of 3 | 2 | 0.500 | 0.500 |" in md and "| train_clean | 3 of 3 | 4 |" in md
    assert "by_share" not in measure()[0]["rm"]


def test_rm_eval_curve_over_random_member_orders_on_a_synthetic_scorer():
    sc = CubeScorer()
    orders = [(0, 1, 2), (1, 2, 0), (2, 0, 1)]  # their first two: every pair of members once
    cfg = evaluation.EvalConfig(lmc_lambdas=3, random_orders_per_member=1)
    result, ex = evaluation.measure(sc.members(), IDS, cfg, sc.warm, sc.interp, chosen=[0, 1, 2], orders=orders)
    rm = result["rm"]
    warm, ens = rm["warm_by_m_random"], rm["ens_by_m_random"]
    assert rm["random_orders"] == [[10, 11, 12], [11, 12, 10], [12, 10, 11]] and [r["M"] for r in warm] == [1, 2, 3]
    # M = 1 is the mean member (0.5, 0.5, 0.75 on validation). M = 2: (mean θ)³ of {10, 11} = (0, −2, 4, 0)
    # is right on 1 pair and tied on 2 → 0.5; {11, 12} and {12, 10} → 0.75 each; ENS has the same signs.
    # M = 3 is the best-first curve's last point: WARM ties one pair (0.875), ENS gets all (1.0).
    assert [r["acc"]["validation"] for r in warm] == pytest.approx([7 / 12, 2 / 3, 0.875])
    assert [r["acc"]["validation"] for r in ens] == pytest.approx([7 / 12, 2 / 3, 1.0])
    assert [r["acc"]["ood"] for r in warm] == pytest.approx([2 / 3, 5 / 6, 1.0])
    assert warm[-1]["acc"] == rm["warm_by_m"][-1]["acc"] and ens[-1]["acc"] == rm["ens_by_m"][-1]["acc"]
    for s in THETA:
        for name, rows in (("warm", warm), ("ens", ens)):
            right = ex[f"{s}/{name}_by_m_random"]
            assert right.shape == (3, 4) and right.dtype == np.float32
            assert [float(np.mean(r)) for r in right] == pytest.approx([r["acc"][s] for r in rows])
    # On validation at M = 2 every pair is right in 2 of the 3 orders' first two, a tie counting half.
    np.testing.assert_allclose(ex["validation/warm_by_m_random"][1], [2 / 3, 2 / 3, 2 / 3, 2 / 3])
    # One member alone is read from its rewards: no average is scored for it beyond the best-first M = 1.
    assert {idx for idx, _ in sc.warm_calls} == {(2,), (0, 2), (0, 1, 2), (0, 1), (1, 2)}
    assert len(sc.warm_calls) == len(set(sc.warm_calls)) == 5 * 4
    md = report.markdown({"rm": rm}, [])
    assert "### Accuracy by M over random member orders" in md and "The mean over 3 random orders" in md
    assert "| 2 | 0.667 | 0.667 | 0.750 | 0.833 |" in md  # validation WARM, ENS, best-first; ood WARM ...
    assert "warm_by_m_random" not in measure()[0]["rm"]


def test_random_member_orders_start_with_each_member_equally_and_are_seeded():
    orders = evaluation.member_orders(6, 2, np.random.default_rng(1))
    assert [o[0] for o in orders] == [*range(6), *range(6)]
    assert all(sorted(o) == list(range(6)) for o in orders)
    assert orders == evaluation.member_orders(6, 2, np.random.default_rng(1))
    assert orders != evaluation.member_orders(6, 2, np.random.default_rng(2))
    with pytest.raises(ValueError, match="EvalConfig.random_orders_per_member must be ≥ 0"):
        evaluation.EvalConfig(random_orders_per_member=-1)


def test_member_shares_are_the_pairs_each_member_trained_on():
    train = evaluation.SplitRows.whole({"index": np.arange(10), "flipped": np.arange(10) % 3 == 0})
    record = {"member_data_fraction": 0.5, "seeds": [7, 8, 9], "train_pairs": [5, 5, 5]}
    shares = evaluation.member_shares(record, [0, 2], train, 10)
    for row, seed in ((0, 7), (1, 9)):
        want = np.isin(np.arange(10), preference.member_subset(10, 0.5, seed))
        np.testing.assert_array_equal(shares["train_corrupted"][row], want[train.flipped])
        np.testing.assert_array_equal(shares["train_clean"][row], want[~train.flipped])
    assert evaluation.member_shares({**record, "member_data_fraction": 1.0}, [0], train, 10) is None
    assert evaluation.member_shares(None, [0], train, 10) is None
    with pytest.raises(ValueError, match=r"shares of \[5, 5, 5\] pairs, not of this training split's 12"):
        evaluation.member_shares(record, [0], train, 12)


def test_average_selections_and_what_rm_eval_reports_of_them():
    result, _, chosen, _ = measure(warm_selection="top_m", top_m=2)
    assert chosen == [2, 0] and result["rm"]["warm"]["members"] == [12, 10]
    assert result["rm"]["warm"]["acc"]["validation"] == 0.75 and result["rm"]["ens"]["M"] == 2
    # greedy: 12 (0.75), +10 → 0.75 kept (not worse), +11 → 0.875 kept
    assert measure(warm_selection="greedy")[2] == [2, 0, 1]
    # never ranked on an ood split: it judges the result
    for split in ("ood", "ood_cue", "ood_temp"):
        with pytest.raises(ValueError, match=f"AverageConfig.select_split = '{split}': .* never on an ood split"):
            rm_average.AverageConfig(select_split=split)
        with pytest.raises(ValueError, match=f"EvalConfig.select_split = '{split}'"):
            evaluation.EvalConfig(select_split=split)
    with pytest.raises(ValueError, match="lmc_lambdas"):
        evaluation.EvalConfig(lmc_lambdas=1)
    with pytest.raises(ValueError, match="AverageConfig.warm_selection"):
        rm_average.AverageConfig(warm_selection="best")
    with pytest.raises(ValueError, match="AverageConfig.select_split"):
        rm_average.AverageConfig(select_split="test")


def test_best_of_n_per_prompt_and_its_standard_error():
    proxy = np.asarray([[0.1, 0.9, 0.5, 0.2], [0.3, 0.2, 0.1, 0.0]])
    gold = np.asarray([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    go, pr = bon.best_of_n_per_prompt(proxy, gold, 2)
    np.testing.assert_allclose(go, [2.5, 6.0])  # prompt 0: groups pick 2.0 and 3.0; prompt 1: 5.0 and 7.0
    np.testing.assert_allclose(pr, [0.7, 0.2])
    assert bon.best_of_n(proxy, gold, 2) == (4.25, pytest.approx(0.45))
    assert stats.standard_error(go) == pytest.approx(1.75)  # |6 − 2.5| / 2


# ----------------------------------------------------------------------------- report and claims from stage files

N, P = 1000, 64
# The built-in task's splits as rm_eval measures them.
SPLITS = ("train_clean", "train_corrupted", "validation", "ood_cue", "ood_temp")


def pm1(acc, seed, n=N):
    d = -np.ones(n, np.float32)
    d[np.random.default_rng(seed).permutation(n)[: round(acc * n)]] = 1.0
    return d


def flip(d, to_wrong=0, to_right=0, seed=1):
    d = d.copy()
    rng = np.random.default_rng(seed)
    d[rng.choice(np.flatnonzero(d > 0), to_wrong, replace=False)] = -1.0
    d[rng.choice(np.flatnonzero(d < 0), to_right, replace=False)] = 1.0
    return d


class LookupScorer:
    """Rewards (margins, r⁻ = 0) by table: members 6 pt below a base; WARM of k members 1 pt per member above
    it, except that WARM of all fits 20 pt fewer flipped labels; θ(½) between two members is WARM of two."""

    def __init__(self, m=3, splits=SPLITS):
        self.splits = splits
        self.base = {s: pm1(0.6 if s == "train_corrupted" else 0.7, seed=i) for i, s in enumerate(splits)}
        self.member = {s: np.stack([flip(b, to_wrong=60, seed=10 + j) for j in range(m)]) for s, b in self.base.items()}
        self.by_m = {}
        for s, b in self.base.items():
            rows = [flip(b, to_right=10, seed=20)]
            for k in range(1, m):
                rows.append(flip(rows[-1], to_right=10, seed=20 + k))
            self.by_m[s] = rows
        self.m = m

    def members(self):
        return {s: (r, np.zeros_like(r)) for s, r in self.member.items()}

    def warm(self, idx, split):
        r = self.by_m[split][len(idx) - 1]
        if split == "train_corrupted" and len(idx) == self.m:
            r = flip(r, to_wrong=200)
        return r, np.zeros_like(r)

    def interp(self, a, b, lam):
        pick = {0.0: lambda s: self.member[s][a], 1.0: lambda s: self.member[s][b]}.get(lam, lambda s: self.by_m[s][1])
        return {s: (pick(s), np.zeros(N, np.float32)) for s in self.splits}


def write_run(wd: str, *, hacking: bool = False, splits=SPLITS):
    """A workdir as rm_eval, rm_control, bon and reinforce leave it, written by their own writers."""
    sc = LookupScorer(splits=splits)
    result, examples = evaluation.measure(
        sc.members(), [0, 1, 2], evaluation.EvalConfig(lmc_lambdas=3), sc.warm, sc.interp, chosen=[0, 1, 2]
    )
    w = Workdir(wd)
    evaluation.write_results(w.rm_eval, result, examples, w.rm_eval_examples)
    # The random-init control: 20 pt below the chord at λ = ½.
    ctrl = {"lambdas": np.asarray([0.0, 0.5, 1.0])}
    for i, s in enumerate(splits):
        b = pm1(0.7, seed=i)
        ctrl[f"{s}/lmc_weight"] = np.stack([b, flip(b, to_wrong=200), b])
        ctrl[f"{s}/lmc_pred"] = np.stack([b, b, b])
    curves = {"lambdas": [0.0, 0.5, 1.0], "members": [0, 1], "barrier": {s: 0.2 for s in splits}}
    evaluation.write_results(w.control_lmc, curves, ctrl, w.control_examples)
    # Best-of-N: per prompt 0 or 1 for the best member; WARM 0.1 above at N = 8, 0.005 above at N = 64 (so that
    # gap's CI straddles 0 and the claim fails).
    mb = np.tile(np.arange(P) % 2, (3, 1)).astype(np.float64)
    warm = mb + np.asarray([[0.0], [0.1], [0.0]])
    warm[2] += np.where(np.arange(P) % 4 == 0, 0.16, -0.05)  # mean 0.0025
    per_prompt = {"n": np.asarray([1, 8, 64]), "oracle/warm": warm, "oracle/member_best": mb}
    res = {
        "n": [1, 8, 64],
        "kl": [bon.bon_kl(n) for n in (1, 8, 64)],
        "oracle": {k: [float(x) for x in per_prompt[f"oracle/{k}"].mean(1)] for k in ("warm", "member_best")},
        "oracle_se": {k: [stats.standard_error(r) for r in per_prompt[f"oracle/{k}"]] for k in ("warm", "member_best")},
        "proxy": {"warm": [0, 1, 2], "member_best": [0, 1, 2]},
        "num_prompts": P,
    }
    bon.write_results(w, res, per_prompt)
    # REINFORCE: the best-member policy's oracle rises then (with hacking) falls back; WARM's keeps rising.
    rng = np.random.default_rng(0)
    steps = [0, 10, 20]
    curves = {"member_best": [0.0, 0.2, 0.05 if hacking else 0.25], "warm": [0.0, 0.2, 0.3]}
    runs, final = {}, {}
    for name, curve in curves.items():
        oracle = np.asarray(curve)[:, None] + rng.normal(0, 0.02, (3, P))
        for i, st in enumerate(steps):
            texts = [f"{name} at step {st}, prompt {j}" for j in range(P)]
            reinforce.write_eval_scores(
                w.rl_run(name), st, {"oracle": oracle[i], "proxy": np.full(P, float(i)), "texts": np.asarray(texts)}
            )
        runs[name] = {"step": steps, "kl": [0.0, 1.0, 2.0], "oracle": oracle.mean(1).tolist(), "proxy": [0, 1, 2]}
        final[name] = oracle[-1]
        with open(os.path.join(wd, "rl", name, "winrate_scores.json"), "w") as f:
            json.dump({"oracle": final[name].tolist(), "step": 20}, f)
    wr = {"warm_vs_member_best": winrate.win_rate(final["warm"], final["member_best"])}
    with open(os.path.join(wd, "rl", "results.json"), "w") as f:
        json.dump({"runs": runs, "win_rate": wr}, f)
    return sc, examples


def test_report_summary_and_markdown_from_stage_files(tmp_path):
    wd = str(tmp_path / "wd")
    sc, ex = write_run(wd)
    report.run(RunContext(workdir=wd, mesh=None, seed=0))
    with open(os.path.join(wd, "report", "summary.json")) as f:
        summary = json.loads(f.read(), parse_constant=lambda c: pytest.fail(f"summary.json holds {c}"))
    md = open(os.path.join(wd, "report", "report.md")).read()
    got = {c["id"]: c for c in summary["claims"]}
    assert {k: c["status"] for k, c in got.items()} == {
        "lmc": "holds",
        "wa_close_to_ens": "holds",
        "memorisation": "holds",
        "m_scaling": "holds",
        "bon": "fails",
        "rl": "not tested",
    }
    assert [c["holds"] for c in summary["claims"]] == [True, True, True, True, False, False]
    assert summary["claims_method"]["resamples"] == 2000 and summary["claims_method"]["seed"] == 0

    def acc(d):
        return float(np.mean(stats.correctness(d)))

    # The claims' values are the accuracies rm_eval reported, from the same margins.
    rm = summary["rm"]
    for s in SPLITS:
        assert rm["warm"]["acc"][s] == acc(ex[f"{s}/warm"]) and rm["ens"]["acc"][s] == acc(ex[f"{s}/ens"])
    for sp in ("ood_cue", "ood_temp"):
        wa = got["wa_close_to_ens"]["ci"][f"wa_minus_ens_{sp}"]
        assert wa["value"] == pytest.approx(rm["warm"]["acc"][sp] - rm["ens"]["acc"][sp], abs=1e-15)
        assert wa["ci95"][0] > -0.01 and wa["unit"] == "pt" and wa["n"] == N
        assert got["m_scaling"]["ci"][f"worst_drop_{sp}"]["value"] == pytest.approx(-0.01)  # rises 1 pt per member
        ens_curve = np.asarray([r["acc"][sp] for r in rm["ens_by_m"]])  # beside it: ENS of the same members
        ens_drop = got["m_scaling"]["ci"][f"ens_worst_drop_{sp}"]
        assert ens_drop["value"] == pytest.approx(claims.worst_drop(ens_curve), abs=1e-12)
        assert ens_drop["ci95"][1] >= claims.TOLERANCE  # so ENS fails the rule WARM holds
    assert got["m_scaling"]["numbers"]["ens_same_rule"] == "fails"
    mem = got["memorisation"]["ci"]["wa_minus_ens_train_corrupted"]
    assert mem["value"] == pytest.approx(rm["warm"]["acc"]["train_corrupted"] - rm["ens"]["acc"]["train_corrupted"])
    assert mem["ci95"][1] < 0
    # LMC: θ(½) (WARM of two) lies 7-8 pt above the chord of two members 6 pt below the base; the control
    # 20 pt below its chord.
    assert got["lmc"]["ci"]["random_init_barrier_ood_temp"]["value"] == pytest.approx(0.2)
    assert got["lmc"]["ci"]["barrier_ood_cue"]["ci95"][1] < 0
    # Best-of-N: exact gaps, the N = 8 one without spread; the N = 64 one straddles 0.
    assert got["bon"]["ci"]["gap_n8"]["ci95"] == pytest.approx([0.1, 0.1])
    lo, hi = got["bon"]["ci"]["gap_n64"]["ci95"]
    assert got["bon"]["ci"]["gap_n64"]["value"] == pytest.approx(0.0025) and lo < 0 < hi
    assert "premise unmet" in got["rl"]["reason"]

    # report.md: BoN means ± their standard error over prompts, and one row per claim with status and CIs.
    se = 0.5 * math.sqrt(P / (P - 1)) / math.sqrt(P)
    assert f"| 8 | {bon.bon_kl(8):.2f} | 0.500 ± {se:.3f} | 0.600 ± {se:.3f} |" in md  # member_best, warm
    row = next(line for line in md.splitlines() if line.startswith("| `bon`"))
    mlo, mhi = got["bon"]["ci"]["min_gap"]["ci95"]
    assert row.endswith(
        f"| **fails** | gap_n8 +0.100 [+0.100, +0.100]; gap_n64 +0.003 [{lo:+.3f}, {hi:+.3f}]; "
        f"min_gap +0.003 [{mlo:+.3f}, {mhi:+.3f}] | at some N ≥ 8 WARM's choices are not better beyond the CI |"
    )
    row = next(line for line in md.splitlines() if line.startswith("| `rl`"))
    assert "| *not tested* | single_peak_minus_final " in row and "premise unmet" in row
    row = next(line for line in md.splitlines() if line.startswith("| `m_scaling`"))
    assert (
        row.startswith("| `m_scaling`: ") and "| holds | " in row and row.endswith(f"| [{got['m_scaling']['note']}] |")
    )
    row = next(line for line in md.splitlines() if line.startswith("| `lmc`"))
    assert "| holds | barrier_validation " in row and "random_init_barrier_ood_temp +20.00 [" in row
    # The accuracy table: a column per ood split, each described.
    assert "| model | train_clean | train_corrupted | validation | ood_cue | ood_temp |" in md
    assert "ood_temp: sampled at the ood temperature, with the length cue as in training." in md
    assert "bon.png" in md and os.path.exists(os.path.join(wd, "report", "bon.png"))

    # With hacking in the REINFORCE curves, rl is tested (and holds: WARM peaks higher and wins).
    shutil.rmtree(wd)
    write_run(wd, hacking=True)
    summary = report.build_summary(wd)
    rl = next(c for c in summary["claims"] if c["id"] == "rl")
    assert rl["status"] == "holds", rl
    assert rl["ci"]["single_peak_minus_final"]["value"] == pytest.approx(0.15, abs=0.01)
    # The texts kept at each policy's best eval and at its last: two evals for the hacked policy, one for WARM's.
    kept = summary["rl"]["samples"]
    assert [r["step"] for r in kept["member_best"]] == [10, 20] and [r["step"] for r in kept["warm"]] == [20]
    assert kept["member_best"][0]["texts"] == [f"member_best at step 10, prompt {j}" for j in range(4)]
    peak = summary["rl"]["runs"]["member_best"]["oracle"][1]
    md = report.markdown(summary, [])
    assert f"- `member_best`, step 10 (mean oracle {peak:.3f}, KL 1.0):\n  - member_best at step 10, prompt 0\n" in md
    assert "  - member_best at step 20, prompt 3\n" in md and "warm at step 10" not in md


def test_report_shows_the_selected_warm_beside_the_uniform_average_of_all_members():
    result, _, chosen, _ = measure(warm_selection="top_m", top_m=2)
    rm = result["rm"]
    md = report.markdown({"rm": rm}, [])
    splits = [s for s in SPLITS if s in rm["warm"]["acc"]]
    cells = lambda r: " | ".join(f"{r['acc'][s]:.3f}" for s in splits)  # noqa: E731
    assert "| **WARM** (M=2) | " in md and f"| WARM, all members (M=3) | {cells(rm['warm_by_m'][-1])} |" in md
    assert f"| ENS, all members (M=3) | {cells(rm['ens_by_m'][-1])} |" in md
    assert rm["warm_by_m"][-1]["members"] == sorted(IDS, key=rm["order"].index)  # every member, best-first
    assert "all members" not in report.markdown({"rm": measure()[0]["rm"]}, [])  # WARM of all: no second row


def test_report_of_a_run_with_one_ood_split_is_judged_on_it(tmp_path):
    """A workdir from before the built-in task's ood split was divided (or from external data) has one ``ood``:
    its table, figures and claims use that split."""
    wd = str(tmp_path / "wd")
    write_run(wd, splits=("train_clean", "train_corrupted", "validation", "ood"))
    summary = report.build_summary(wd)
    md = report.markdown(summary, report.figures(summary, str(tmp_path)))
    assert "| model | train_clean | train_corrupted | validation | ood |" in md
    got = {c["id"]: c for c in summary["claims"]}
    assert got["wa_close_to_ens"]["status"] == got["m_scaling"]["status"] == got["lmc"]["status"] == "holds"
    assert {"wa_minus_ens_validation", "wa_minus_ens_ood"} == set(got["wa_close_to_ens"]["ci"])
    assert "worst_drop_ood" in got["m_scaling"]["ci"] and "random_init_barrier_ood" in got["lmc"]["ci"]


def test_report_claims_without_evidence_are_not_tested(tmp_path):
    wd = str(tmp_path / "wd")
    write_run(wd)
    # No control; bon's per-prompt file changed after results.json recorded it; one eval step's scores missing.
    shutil.rmtree(os.path.join(wd, "rm_control"))
    io_utils.write_arrays(Workdir(wd).bon_per_prompt, {"n": np.asarray([1, 8, 64])})
    os.remove(Workdir(wd).rl_run("warm").eval_scores(10))
    summary = report.build_summary(wd)
    got = {c["id"]: c for c in summary["claims"]}
    assert got["lmc"]["status"] == "not tested" and "no negative control" in got["lmc"]["reason"]
    assert got["bon"]["status"] == "not tested" and "does not match the SHA-256" in got["bon"]["reason"]
    assert got["rl"]["status"] == "not tested" and "10.json" in got["rl"]["reason"]
    assert all(not c["holds"] for c in (got["lmc"], got["bon"], got["rl"]))
    md = report.markdown(summary, [])
    assert "| *not tested* | – | no negative control (no permuted member in rm_eval" in md
    # A run from before per-example results (eval.json names no margins): every RM claim is not tested.
    ev = json.load(open(os.path.join(wd, "rm", "eval.json")))
    ev.pop("examples")
    json.dump(ev, open(os.path.join(wd, "rm", "eval.json"), "w"))
    got = {c["id"]: c for c in report.build_summary(wd)["claims"]}
    for cid in ("lmc", "wa_close_to_ens", "memorisation", "m_scaling"):
        assert got[cid]["status"] == "not tested", cid
    assert "records no per-pair margins" in got["wa_close_to_ens"]["reason"]
    assert claims.across_runs({"a": list(got.values())}).count("*not tested*") == 6
