"""The paper's claims as checks on synthetic run summaries: each can hold and each can fail."""

import json
import os

import pytest

from warm_jax import claims

LAM = [0.0, 0.25, 0.5, 0.75, 1.0]


def summary(**over):
    s = {
        "lmc": {
            "lambdas": LAM,
            "weight_interp": {"validation": [0.60, 0.62, 0.63, 0.62, 0.61], "ood": [0.58, 0.59, 0.60, 0.59, 0.58]},
            "pred_interp": {"validation": [0.60, 0.62, 0.625, 0.62, 0.61], "ood": [0.58, 0.59, 0.595, 0.59, 0.58]},
        },
        "negative_control": {
            "lambdas": LAM,
            "weight_interp": {"validation": [0.60, 0.55, 0.50, 0.55, 0.60], "ood": [0.58, 0.52, 0.50, 0.53, 0.58]},
        },
        "rm": {
            "warm": {"acc": {"train_corrupted": 0.50, "ood": 0.60}},
            "ens": {"acc": {"train_corrupted": 0.60, "ood": 0.59}},
            "warm_by_m": [{"acc": {"ood": a}} for a in (0.56, 0.58, 0.59, 0.59, 0.60, 0.60)],
            "members": [{"acc": {"ood": a}} for a in (0.56, 0.55, 0.57, 0.54, 0.56, 0.55)],
        },
        "bon": {"n": [1, 8, 64], "oracle": {"warm": [0.0, 0.2, 0.3], "member_best": [0.0, 0.1, 0.05]}},
        "rl": {
            "runs": {
                "member_best": {"step": [0, 10, 20, 30], "oracle": [0.0, 0.2, 0.1, 0.0], "proxy": [0, 1, 2, 3]},
                "warm": {"step": [0, 10, 20, 30], "oracle": [0.0, 0.2, 0.3, 0.35], "proxy": [0, 1, 1.5, 2]},
            },
            "win_rate": {"warm_vs_member_best": {"value": 0.6, "ci95": [0.55, 0.65], "n_prompts": 256}},
        },
    }
    for path, value in over.items():
        node = s
        *keys, last = path.split("__")
        for k in keys:
            node = node[k]
        node[last] = value
    return s


def verdicts(s):
    return {c["id"]: c["holds"] for c in claims.check_all(s)}


def test_every_claim_holds_on_a_run_that_shows_it():
    assert verdicts(summary()) == {
        k: True for k in ("lmc", "wa_close_to_ens", "memorisation", "m_scaling", "bon", "rl")
    }


@pytest.mark.parametrize(
    "claim, override",
    [
        # a 1-point dip below the chord at λ = 0.5
        (
            "lmc",
            {
                "lmc__weight_interp": {"validation": [0.60, 0.62, 0.595, 0.62, 0.61], "ood": [0.58] * 5},
                "lmc__pred_interp": {"validation": [0.60, 0.62, 0.60, 0.62, 0.61], "ood": [0.58] * 5},
            },
        ),
        # the control interpolates without a barrier: the claim's contrast is missing
        ("lmc", {"negative_control__weight_interp": {"validation": [0.6] * 5, "ood": [0.58] * 5}}),
        # WA 1.5 points above ENS is a miss too: the claim is closeness
        ("wa_close_to_ens", {"lmc__pred_interp": {"validation": [0.6, 0.6, 0.615, 0.6, 0.6], "ood": [0.58] * 5}}),
        ("memorisation", {"rm__ens": {"acc": {"train_corrupted": 0.45, "ood": 0.59}}}),
        ("memorisation", {"rm__ens": {"acc": {"train_corrupted": 0.60, "ood": 0.61}}}),
        ("m_scaling", {"rm__warm_by_m": [{"acc": {"ood": a}} for a in (0.60, 0.58, 0.59, 0.59, 0.60, 0.60)]}),
        ("bon", {"bon__oracle": {"warm": [0.0, 0.05, 0.3], "member_best": [0.0, 0.1, 0.05]}}),
        ("bon", {"bon__oracle": {"warm": [0.0, 0.2, 0.05], "member_best": [0.0, 0.1, 0.05]}}),
        # no hacking: the single RM's oracle reward peaks at the last step
        ("rl", {"rl__runs__member_best__oracle": [0.0, 0.1, 0.2, 0.3]}),
        ("rl", {"rl__win_rate": {"warm_vs_member_best": {"value": 0.55, "ci95": [0.49, 0.61], "n_prompts": 256}}}),
    ],
)
def test_each_claim_fails_when_its_numbers_say_so(claim, override):
    v = verdicts(summary(**override))
    assert v[claim] is False
    assert all(held for cid, held in v.items() if cid != claim)


def test_claims_need_their_stages():
    assert claims.check_all({}) == []


def test_across_runs_table_counts_replicates(tmp_path, capsys):
    dirs = []
    for seed, s in enumerate([summary(), summary(bon__oracle={"warm": [0, 0, 0], "member_best": [0, 1, 1]})]):
        d = tmp_path / f"run_{seed}"
        os.makedirs(d / "report")
        (d / "report" / "summary.json").write_text(json.dumps({"claims": claims.check_all(s)}))
        dirs.append(str(d))
    assert claims.main(dirs) == 0
    table = capsys.readouterr().out
    assert "| `bon` | 1/2 | yes: gaps N≥8 +0.100, +0.250 | **no**: gaps N≥8 -1.000, -1.000 |" in table
    assert "| `rl` | 2/2 |" in table
    assert claims.main([str(tmp_path / "missing")]) == 1
    assert "no claims section" in capsys.readouterr().err
