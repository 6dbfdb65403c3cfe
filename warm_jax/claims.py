"""The paper's findings as checks on a run's own numbers (report's ``claims`` section).

Each check returns ``{"id", "holds", "numbers", "statement"}`` or None when the run lacks the
stage it needs. Thresholds are the ones issue 9 states; accuracies are fractions, so
0.5 point = 0.005.

Across replicates (runs of the same gin file with different ``SEED``):

  python -m warm_jax.claims /tmp/warm_repro_0 /tmp/warm_repro_1 /tmp/warm_repro_2

(each argument a run's workdir, its report/ folder or a summary.json; ``--verbose`` shows the traceback
of an error).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping

import numpy as np

POINT = 0.01
CHECKS: dict[str, Callable[[dict], dict | None]] = {}


def check(name: str):
    def deco(fn):
        CHECKS[name] = fn
        return fn

    return deco


def _claim(cid, holds, numbers, statement):
    return {"id": cid, "holds": bool(holds), "numbers": numbers, "statement": statement}


def _chord_gap(lambdas, accs) -> float:
    """min over λ of acc(λ) − the straight line between the endpoints (negative = below)."""
    lam, acc = np.asarray(lambdas), np.asarray(accs)
    line = (1 - lam) * acc[0] + lam * acc[-1]
    return float(np.min(acc - line))


@check("lmc")
def lmc(s):
    if "lmc" not in s:
        return None
    l = s["lmc"]
    gaps = {sp: _chord_gap(l["lambdas"], l["weight_interp"][sp]) for sp in ("validation", "ood")}
    holds = all(g >= -0.5 * POINT for g in gaps.values())
    numbers = {f"min_gap_{k}": v for k, v in gaps.items()}
    ctrl = s.get("negative_control")
    if ctrl:
        cg = {sp: _chord_gap(ctrl["lambdas"], ctrl["weight_interp"][sp]) for sp in ("validation", "ood")}
        numbers.update({f"control_min_gap_{k}": v for k, v in cg.items()})
        control_barrier = min(cg.values()) < -0.5 * POINT
        numbers["control_shows_barrier"] = control_barrier
        holds = holds and control_barrier
    return _claim(
        "lmc",
        holds,
        numbers,
        "θ(λ) stays within 0.5 pt of the chord on validation and ood; random-init control shows a barrier",
    )


@check("wa_close_to_ens")
def wa_close_to_ens(s):
    if "lmc" not in s:
        return None
    l = s["lmc"]
    i = int(np.argmin(np.abs(np.asarray(l["lambdas"]) - 0.5)))
    diffs = {sp: l["weight_interp"][sp][i] - l["pred_interp"][sp][i] for sp in ("validation", "ood")}
    return _claim(
        "wa_close_to_ens",
        all(abs(d) <= POINT for d in diffs.values()),
        {f"wa_minus_ens_{k}": v for k, v in diffs.items()},
        "|acc(WA, λ=0.5) − acc(ENS, λ=0.5)| ≤ 1 pt on validation and ood",
    )


@check("memorisation")
def memorisation(s):
    if "rm" not in s:
        return None
    w, e = s["rm"]["warm"]["acc"], s["rm"]["ens"]["acc"]
    holds = w["train_corrupted"] < e["train_corrupted"] and w["ood"] >= e["ood"]
    return _claim(
        "memorisation",
        holds,
        {
            "warm_corrupted": w["train_corrupted"],
            "ens_corrupted": e["train_corrupted"],
            "warm_ood": w["ood"],
            "ens_ood": e["ood"],
        },
        "WA fits fewer flipped labels than ENS (train_corrupted: WA < ENS) and WA ≥ ENS on ood",
    )


@check("m_scaling")
def m_scaling(s):
    if "rm" not in s:
        return None
    by_m = s["rm"]["warm_by_m"]
    accs = [r["acc"]["ood"] for r in by_m[:6]]
    worst_drop = max([0.0] + [max(accs[:k]) - accs[k] for k in range(1, len(accs))])
    mean_member = float(np.mean([m["acc"]["ood"] for m in s["rm"]["members"]]))
    holds = worst_drop <= 0.5 * POINT and accs[-1] > mean_member
    return _claim(
        "m_scaling",
        holds,
        {"warm_ood_by_m": accs, "worst_drop": worst_drop, "mean_member_ood": mean_member, "M_max": len(accs)},
        "WARM ood accuracy never falls > 0.5 pt as M grows best-first (to 6), and WARM M_max beats the mean member",
    )


@check("bon")
def bon(s):
    b = s.get("bon")
    if not b or "warm" not in b["oracle"] or "member_best" not in b["oracle"]:
        return None
    n = np.asarray(b["n"])
    w, m = np.asarray(b["oracle"]["warm"]), np.asarray(b["oracle"]["member_best"])
    sel = n >= 8
    gap_last = float(w[-1] - m[-1])
    holds = bool(np.all(w[sel] >= m[sel])) and gap_last > 0
    return _claim(
        "bon",
        holds,
        {"gaps_n_ge_8": [float(x) for x in (w - m)[sel]], "gap_at_max_n": gap_last},
        "BoN oracle reward with WARM ≥ best member at every N ≥ 8, gap at the largest N > 0",
    )


@check("rl")
def rl(s):
    r = s.get("rl")
    if not r or "warm" not in r.get("runs", {}) or "member_best" not in r["runs"]:
        return None
    single, warm = r["runs"]["member_best"], r["runs"]["warm"]
    o, p = np.asarray(single["oracle"]), np.asarray(single["proxy"])
    peak = int(np.argmax(o))
    hacked = peak < len(o) - 1 and o[-1] < o[peak] and p[-1] >= p[peak]
    warm_peak = float(np.max(warm["oracle"]))
    wr = r.get("win_rate", {}).get("warm_vs_member_best")
    wins = wr is not None and wr["value"] > 0.5 and wr["ci95"][0] > 0.5
    holds = hacked and warm_peak > float(o[peak]) and wins
    return _claim(
        "rl",
        holds,
        {
            "single_oracle_peak_step": int(single["step"][peak]),
            "single_oracle_peak": float(o[peak]),
            "single_oracle_last": float(o[-1]),
            "single_proxy_peak_to_last": float(p[-1] - p[peak]),
            "warm_oracle_peak": warm_peak,
            "win_rate": None if wr is None else wr["value"],
            "win_rate_ci_low": None if wr is None else wr["ci95"][0],
        },
        "single-RM policy hacks (oracle rises then falls while proxy rises); WARM peaks higher and wins > 0.5 (CI)",
    )


def check_all(summary: dict) -> list[dict]:
    out = []
    for fn in CHECKS.values():
        c = fn(summary)
        if c is not None:
            out.append(c)
    return out


# The numbers that decide each claim, in points (accuracy) or reward units, for the across-runs table.
HEADLINES: dict[str, Callable[[dict], str]] = {
    "lmc": lambda n: (
        f"gap val {100 * n['min_gap_validation']:+.2f} / ood {100 * n['min_gap_ood']:+.2f} pt; control "
        + (
            f"{100 * n['control_min_gap_validation']:+.2f} / {100 * n['control_min_gap_ood']:+.2f} pt"
            if "control_min_gap_ood" in n
            else "absent"
        )
    ),
    "wa_close_to_ens": lambda n: (
        f"WA−ENS val {100 * n['wa_minus_ens_validation']:+.2f} / ood {100 * n['wa_minus_ens_ood']:+.2f} pt"
    ),
    "memorisation": lambda n: (
        f"corrupted WA {n['warm_corrupted']:.3f} vs ENS {n['ens_corrupted']:.3f}; "
        f"ood WA−ENS {100 * (n['warm_ood'] - n['ens_ood']):+.2f} pt"
    ),
    "m_scaling": lambda n: (
        f"worst drop {100 * n['worst_drop']:.2f} pt; M={n['M_max']} {n['warm_ood_by_m'][-1]:.3f} "
        f"vs mean member {n['mean_member_ood']:.3f}"
    ),
    "bon": lambda n: f"gaps N≥8 {', '.join(f'{g:+.3f}' for g in n['gaps_n_ge_8'])}",
    "rl": lambda n: (
        f"single peak at step {n['single_oracle_peak_step']} ({n['single_oracle_peak']:.3f} → "
        f"{n['single_oracle_last']:.3f}); WARM peak {n['warm_oracle_peak']:.3f}; win "
        + ("n/a" if n["win_rate"] is None else f"{n['win_rate']:.3f} (CI low {n['win_rate_ci_low']:.3f})")
    ),
}


def across_runs(claims_by_run: Mapping[str, list[dict]]) -> str:
    """Markdown: one row per claim — how many runs it held in, then each run's verdict and numbers."""
    runs = list(claims_by_run)
    by_id: dict[str, dict[str, dict]] = {}
    for run, claims in claims_by_run.items():
        for c in claims:
            by_id.setdefault(c["id"], {})[run] = c
    lines = [
        "| claim | holds in | " + " | ".join(runs) + " |",
        "|---|---|" + "---|" * len(runs),
    ]
    for cid, per_run in by_id.items():
        held = sum(c["holds"] for c in per_run.values())
        cells = []
        for run in runs:
            c = per_run.get(run)
            if c is None:
                cells.append("—")
                continue
            fmt = HEADLINES.get(cid)
            nums = fmt(c["numbers"]) if fmt else json.dumps(c["numbers"])
            cells.append(f"{'yes' if c['holds'] else '**no**'}: {nums}")
        lines.append(f"| `{cid}` | {held}/{len(per_run)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _read_claims(arg: str) -> tuple[str, list[dict]]:
    """(summary.json path, its claims) for a run's workdir, its report/ folder or a summary.json."""
    from warm_jax import cli_errors, io_utils

    candidates = [arg, os.path.join(arg, "summary.json"), os.path.join(arg, "report", "summary.json")]
    path = next((c for c in candidates if os.path.isfile(c)), None)
    if path is None:
        raise cli_errors.UserError(
            f"{arg}: no claims section (no summary.json at {', '.join(candidates)}); run the report stage first"
        )
    data = io_utils.read_json(path)  # a parse error names the file
    claims = data.get("claims") if isinstance(data, dict) else None
    if claims is None:
        raise cli_errors.UserError(f"{path}: no claims section; run the report stage first")
    if not isinstance(claims, list) or not all(
        isinstance(c, dict) and {"id", "holds", "numbers"} <= c.keys() for c in claims
    ):
        raise cli_errors.UserError(f"{path}: field 'claims' must be a list of {{id, holds, numbers}} objects")
    try:
        across_runs({arg: claims})  # a claim's numbers that its headline cannot format: name the file
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise cli_errors.UserError(f"{path}: a claim's numbers are incomplete ({type(e).__name__}: {e})") from None
    return path, claims


def main(argv: list[str]) -> int:
    from warm_jax import cli_errors

    verbose = "--verbose" in argv
    argv = [a for a in argv if a != "--verbose"]
    if not argv:
        print(__doc__)
        return 2

    def run() -> int:
        claims_by_run = {}
        for arg in argv:
            _, claims = _read_claims(arg)
            claims_by_run[os.path.basename(os.path.normpath(arg))] = claims
        print(across_runs(claims_by_run))
        return 0

    return cli_errors.guarded(run, verbose=verbose)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
