"""How often `m_scaling`'s no-drop check passes WARM-by-M curves whose true shape is known (synthetic, no run).

    python scripts/claim_power.py [--pairs=2500] [--members=6] [--disagree=0.04] [--decay=0] [--trials=30] \
        [--rise 0 0.3 1]

Each trial draws per-pair correctness for WARM at M = 1 … members: M = 1 is right on ``accuracy`` of the pairs,
and going from M to M + 1 changes ``disagree`` · M^−``decay`` of the pairs (half right → wrong, half wrong →
right) plus ``rise`` points more wrong → right, so the true curve rises by ``rise`` pt per member (0: flat). With
``decay`` = 0 every member changes as many pairs; real WARM-by-M curves converge, each member changing fewer
(measured on the tuning runs: about 5% of ood pairs from M = 1 to 2, then 1–3%, so ``--disagree=0.05 --decay=1``).
The check is the claim's own:
the bootstrap CI upper bound of the largest drop below an earlier M must lie under ``claims.TOLERANCE``. Prints,
per rise, how many trials pass and the median upper bound.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from warm_jax import claims, stats


def warm_by_m_correctness(
    rng: np.random.Generator,
    pairs: int,
    members: int,
    accuracy: float,
    disagree: float,
    rise_pt: float,
    decay: float = 0.0,
) -> np.ndarray:
    """[pairs, members] 0/1 correctness of a nested WARM-by-M curve (module docstring)."""
    c = np.zeros((members, pairs), bool)
    c[0, rng.permutation(pairs)[: round(accuracy * pairs)]] = True
    gain = round(rise_pt / 100 * pairs)
    for i in range(1, members):
        swaps = round(disagree * i**-decay * pairs / 2)
        cur = c[i - 1].copy()
        right, wrong = np.flatnonzero(cur), np.flatnonzero(~cur)
        cur[rng.choice(right, swaps, replace=False)] = False
        cur[rng.choice(wrong, swaps + gain, replace=False)] = True
        c[i] = cur
    return c.T.astype(np.float64)


def pass_rate(rise_pt: float, *, pairs: int, members: int, accuracy: float, disagree: float, decay: float, trials: int):
    """(passing trials, median CI upper bound of the worst drop) over ``trials`` seeded curves."""
    uppers = []
    for t in range(trials):
        m = warm_by_m_correctness(np.random.default_rng(t), pairs, members, accuracy, disagree, rise_pt, decay)
        uppers.append(stats.bootstrap_ci([m], claims.worst_drop)["ci95"][1])
    uppers = np.asarray(uppers)
    return int(np.sum(uppers < claims.TOLERANCE)), float(np.median(uppers))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=2500)
    p.add_argument("--members", type=int, default=6)
    p.add_argument("--accuracy", type=float, default=0.8)
    p.add_argument("--disagree", type=float, default=0.04, help="fraction of pairs that change from M = 1 to 2")
    p.add_argument("--decay", type=float, default=0.0, help="from M to M+1, disagree · M^-decay of the pairs change")
    p.add_argument("--trials", type=int, default=30)
    p.add_argument("--rise", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 1.0], help="true pt per member")
    a = p.parse_args(argv)
    if (
        not (a.pairs > 0 and a.members >= 2 and a.trials > 0 and 0 < a.accuracy < 1 and 0 <= a.disagree <= 1)
        or a.decay < 0
    ):
        p.error("need --pairs > 0, --members ≥ 2, --trials > 0, 0 < --accuracy < 1, 0 ≤ --disagree ≤ 1, --decay ≥ 0")
    per = f"{100 * a.disagree:g}% · M^-{a.decay:g}" if a.decay else f"{100 * a.disagree:g}%"
    print(f"{a.pairs} pairs, M = 1…{a.members}, {per} of pairs change from M to M + 1, {a.trials} trials")
    print("| true rise per member | check passes | median CI upper bound of the worst drop |")
    print("|---|---|---|")
    for rise in a.rise:
        ok, upper = pass_rate(
            rise,
            pairs=a.pairs,
            members=a.members,
            accuracy=a.accuracy,
            disagree=a.disagree,
            decay=a.decay,
            trials=a.trials,
        )
        print(f"| {rise:+.2f} pt | {ok}/{a.trials} | {100 * upper:+.2f} pt |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
