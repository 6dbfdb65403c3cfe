"""The paper's findings as checks on a run's own numbers (report's ``claims`` section).

Every claim is judged by paired bootstrap 95% confidence intervals (``stats.py``: 2,000 resamples,
numpy seed 0, percentile intervals), never by a point estimate against a fixed threshold:

* reward-model claims resample the preference pairs of a split, the two models compared scored on
  the same pairs (per-pair margins in rm/eval_examples.npz and rm_control/lmc_examples.npz);
* ``bon`` resamples the Best-of-N prompts (per-prompt oracle rewards of the choices, bon/per_prompt.npz);
* ``rl`` resamples the held-out eval prompts (per-prompt oracle rewards per eval step,
  rl/<reward>/eval_scores/) and takes the win rate's interval over the win-rate prompts;
* ``warp`` resamples the same held-out eval prompts: the WARP front (warp/front_examples.npz, every
  iteration and η) against the single policies' eval steps (rl/<reward>/eval_scores/, init- and
  EMA-anchored runs against WARP's reward), both held to one KL budget (``warp_matched``).

A statistic that takes a max or min over λ, M, N or steps is recomputed inside every resample, so its
interval carries the selection. Each CI is a marginal 95% interval; a claim that needs several
(validation and each ood split) needs each. Accuracy tolerances are ``TOLERANCE`` = 1 point.

The held-out splits are the run's own (``eval_splits``): ``validation`` and every ood split whose per-example
margins rm_eval wrote — ``ood_cue`` and ``ood_temp`` for the built-in task, ``ood`` for external data and for
workdirs written before the ood split was divided. A CI's name ends with its split (``barrier_ood_temp``), and a
claim that fails names the split where it does.

Each check returns ``{"id", "status", "holds", "reason", "statement", "numbers", "ci"}`` or None when the
run lacks the stage it needs. ``status`` is "holds", "fails" or "not tested" (the evidence is missing or
cannot decide: no negative control, one member, no interior λ, no N ≥ 8, no hacking to protect against,
per-example files absent); ``holds`` is True only for "holds". ``ci`` maps each quantity judged to
{"value", "ci95": [lo, hi], "se", "n", "unit"} ("pt": accuracy as a fraction, shown ×100; "reward";
"rate"), and a few informational quantities the verdict does not read (``rl``'s peaks at matched KL); ``numbers``
holds the same values and a few counts as plain scalars, or a short reason where an informational comparison
could not be made.

Across replicates (runs of the same gin file with different ``SEED``):

  python -m warm_jax.claims /tmp/warm_repro_0 /tmp/warm_repro_1 /tmp/warm_repro_2

(each argument a run's workdir, its report/ folder or a summary.json; ``--verbose`` shows the traceback
of an error).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from warm_jax import eval_splits, stats
from warm_jax.policy import winrate

POINT = 0.01
TOLERANCE = 1 * POINT  # accuracy: "no barrier", "not worse", "matched" mean within 1 pt, judged by the CI
LOSS_TOLERANCE = 0.01  # nats: a control "shows a loss barrier" when its CI lies above this
SCALING_MAX_M = 6  # the paper's WARM-by-M curve goes to M = 6
BON_MIN_N = 8
KL_SLACK = 1e-6  # a policy point "within the KL budget" may exceed it by float rounding only
PROBE_ACCURACY = 0.70  # the probe gate (feature_probe.GATE_ACCURACY / GATE_MARGIN), its margin judged by the CI
PROBE_MARGIN = 0.05
HOLDS, FAILS, NOT_TESTED = "holds", "fails", "not tested"
STATUSES = (HOLDS, FAILS, NOT_TESTED)

CHECKS: dict[str, Callable[[dict, Mapping], dict | None]] = {}
STATEMENTS: dict[str, str] = {
    "pretraining": (
        "pretraining gives the reward models something: a linear probe on the pretrained features reaches "
        f"≥ {100 * PROBE_ACCURACY:.0f}% validation accuracy, and the 95% CI lower bound of its accuracy minus that "
        f"of the same probe on random-init features is ≥ {100 * PROBE_MARGIN:.0f} pt on validation"
    ),
    "lmc": (
        "no accuracy barrier between the two interpolated members: 95% CI upper bound of the barrier "
        "(max over interior λ of chord − acc(θ(λ))) < 1 pt on validation and on each ood split; and the negative control "
        "shows one — a copy of the second member with its MLP units and residual coordinates permuted (the "
        "same function in another basin), else the random-init pair: CI lower bound of its accuracy barrier "
        "> 1 pt or of its loss barrier > 0.01 nats on validation or an ood split"
    ),
    "wa_close_to_ens": (
        "WARM is not worse than ENS of the same members (M ≥ 2): 95% CI lower bound of acc(WARM) − acc(ENS) "
        "> −1 pt on validation and on each ood split"
    ),
    "memorisation": (
        "at matched fit to the clean labels (CI lower bound of WARM − ENS on train_clean > −1 pt, else not "
        "tested), WARM fits fewer flipped labels than ENS: CI upper bound of WARM − ENS on train_corrupted < 0"
    ),
    "m_scaling": (
        f"on each ood split, WARM's accuracy never falls as M grows best-first to min(M, {SCALING_MAX_M}): CI upper "
        "bound of the largest drop below an earlier M < 1 pt; and WARM at that M beats the mean member: CI lower "
        "bound of the difference > 0. Reported beside it, not judged: the same rule applied to ENS of the same "
        "best-first members (`ens_*`), which tells a failure of weight averaging from members that no ensemble of "
        "them improves on; and, with `EvalConfig.random_orders_per_member`, the largest drop of WARM's curve over "
        "random member orders (`random_worst_drop_*`), which starts at the mean member rather than the one "
        "validation ranks first"
    ),
    "bon": (
        f"Best-of-N picks better samples with WARM than with the best member at every N ≥ {BON_MIN_N}: CI lower "
        "bound of min over those N of the mean oracle gap (over prompts) > 0"
    ),
    "rl": (
        "given that the best-member policy hacks (CI lower bound of its eval oracle peak − final > 0, its proxy "
        "no lower at the end; else not tested), the WARM policy peaks higher (CI lower bound of peak − peak > 0) "
        "and wins (win-rate CI lower bound > 0.5). Reported beside it, not judged: the two policies' best oracle "
        "within a shared KL budget (the smaller of their largest mean KL), as `warp` compares"
    ),
    "warp": (
        "WARP's KL–reward front lies above the single policies' (REINFORCE against the same reward, init- and "
        "EMA-anchored, every eval step) at matched KL: with both held to the same KL budget (the smaller of the "
        "two families' largest mean KL to the SFT policy), the best WARP point's mean oracle reward minus the best "
        "single point's has a 95% CI lower bound > 0 (the best points re-chosen in every resample of the eval prompts)"
    ),
}


class NotTested(Exception):
    """The evidence a claim needs is missing or degenerate; the message says which."""


def check(name: str):
    def deco(fn):
        def run(s: dict, ev: Mapping) -> dict | None:
            try:
                return fn(s, ev)
            except NotTested as e:
                return _claim(name, NOT_TESTED, reason=str(e))
            except ValueError as e:  # per-example data the statistics refuse (shapes, non-finite values)
                return _claim(name, NOT_TESTED, reason=f"per-example data unusable: {e}")

        CHECKS[name] = run
        return run

    return deco


def _claim(
    cid: str, status: str, *, reason: str = "", ci: dict | None = None, numbers: dict | None = None, note: str = ""
) -> dict:
    """A claim's verdict; ``note``: what is reported beside it and not judged."""
    ci = ci or {}
    nums = {k: v["value"] for k, v in ci.items()}
    nums.update(numbers or {})
    out = {
        "id": cid,
        "status": status,
        "holds": status == HOLDS,
        "reason": reason,
        "statement": STATEMENTS[cid],
        "numbers": nums,
        "ci": ci,
    }
    if note:
        out["note"] = note
    return out


def _entry(res: dict, unit: str) -> dict:
    return {"value": res["value"], "ci95": res["ci95"], "se": res["se"], "n": res["n"], "unit": unit}


def _source(ev: Mapping, name: str, what: str) -> Mapping:
    """The per-example arrays of one stage; NotTested naming why they are absent."""
    src = ev.get(name)
    if isinstance(src, Mapping):
        return src
    raise NotTested(f"no per-example {what}" + (f" ({src})" if isinstance(src, str) and src else ""))


def _arr(src: Mapping, key: str) -> np.ndarray:
    if key not in src:
        raise NotTested(f"per-example data lacks '{key}' (rerun the stage that writes it)")
    return np.asarray(src[key])


def _held_out(src: Mapping, model: str) -> tuple[str, ...]:
    """``validation`` and every ood split whose margins ``<split>/<model>`` the per-example source holds.

    NotTested when it holds no ood split: a claim judged "on validation and ood" is not judged on validation alone."""
    oods = eval_splits.ood_splits(k.rpartition("/")[0] for k in src if k.endswith("/" + model))
    if not oods:
        raise NotTested(f"per-example data holds no ood split ('{model}' margins of 'ood' or 'ood_<shift>')")
    return (eval_splits.VALIDATION, *oods)


def _pt(x: float) -> str:
    return f"{100 * x:+.2f} pt"


# ----------------------------------------------------------------------------- statistics (of resampled means)


def barrier_statistic(lambdas):
    """max over interior λ of (chord between the endpoints − acc(λ)), of means [..., L] → [...]."""
    lam = np.asarray(lambdas, np.float64)
    t = (lam - lam[0]) / (lam[-1] - lam[0])

    def stat(m):
        line = (1 - t) * m[..., :1] + t * m[..., -1:]
        return np.max((line - m)[..., 1:-1], axis=-1)

    return stat


def worst_drop(m):
    """Largest fall below the best earlier entry along the last axis (negative: it always rose). [..., K] → [...]."""
    prev_best = np.maximum.accumulate(m, axis=-1)[..., :-1]
    return np.max(prev_best - m[..., 1:], axis=-1)


def _barrier_ci(margins_ln, lambdas) -> dict:
    """Bootstrap CI of the accuracy barrier from per-pair margins [L, N]."""
    return stats.bootstrap_ci([stats.correctness(margins_ln).T], barrier_statistic(lambdas))


def _acc_diff_ci(margins_a, margins_b) -> dict:
    return stats.paired_bootstrap_ci(stats.correctness(margins_a), stats.correctness(margins_b))


# ----------------------------------------------------------------------------- the claims


def _loss_barrier_ci(margins_ln, lambdas) -> dict:
    """Bootstrap CI of the loss barrier (max over interior λ of BT loss − chord, nats) from margins [L, N]."""
    loss = np.logaddexp(0.0, -np.asarray(margins_ln, np.float64))  # −log σ(margin) per pair
    return stats.bootstrap_ci([-loss.T], barrier_statistic(lambdas))


@check("pretraining")
def pretraining(s, ev):
    if "probe" not in s:
        return None
    src = _source(ev, "probe", "probe margins from rm_ensemble")
    pre, rand = _arr(src, "pretrained/validation"), _arr(src, "random/validation")
    acc = _entry(stats.bootstrap_ci([stats.correctness(pre)]), "pt")
    ci = {"pretrained_validation": acc, "pretrained_minus_random_validation": _entry(_acc_diff_ci(pre, rand), "pt")}
    # The gate is judged on validation; each ood split's margin is shown beside it.
    for sp in eval_splits.ood_splits(k.partition("/")[2] for k in src if k.startswith("pretrained/")):
        if f"random/{sp}" in src:
            ood = _acc_diff_ci(_arr(src, f"pretrained/{sp}"), _arr(src, f"random/{sp}"))
            ci[f"pretrained_minus_random_{sp}"] = _entry(ood, "pt")
    low_acc = acc["value"] < PROBE_ACCURACY
    low_margin = ci["pretrained_minus_random_validation"]["ci95"][0] < PROBE_MARGIN
    reasons = [
        f"the pretrained probe's validation accuracy {100 * acc['value']:.1f}% is below {100 * PROBE_ACCURACY:.0f}%"
    ] * low_acc + [
        f"the CI of pretrained − random features does not lie above {100 * PROBE_MARGIN:.0f} pt"
    ] * low_margin
    return _claim("pretraining", FAILS if reasons else HOLDS, reason="; ".join(reasons), ci=ci)


@check("lmc")
def lmc(s, ev):
    if "lmc" not in s:
        return None
    l = s["lmc"]
    lambdas = [float(x) for x in l["lambdas"]]
    n_members = len(s["rm"]["members"]) if "rm" in s else len(set(l["members"]))
    if n_members < 2 or len(set(l["members"])) < 2:
        raise NotTested("fewer than two members: a member interpolated with itself has no barrier to find")
    if len(lambdas) < 3:
        raise NotTested(f"EvalConfig.lmc_lambdas = {len(lambdas)}: no interior λ between the endpoints")
    # The controls, primary first: (name, λ, per-example source, margins key).
    controls = []
    if "permutation_control" in s:
        controls.append(("permuted", s["permutation_control"]["lambdas"], "rm", "perm_weight"))
    if s.get("negative_control"):
        controls.append(("random_init", s["negative_control"]["lambdas"], "control", "lmc_weight"))
    if not controls:
        raise NotTested(
            "no negative control (no permuted member in rm_eval, no rm_control stage): nothing shows the test can "
            "see a barrier"
        )
    sources = {"rm": "margins from rm_eval", "control": "margins from rm_control"}
    ci = {}
    rm = _source(ev, "rm", sources["rm"])
    held = _held_out(rm, "lmc_weight")
    for sp in held:
        ci[f"barrier_{sp}"] = _entry(_barrier_ci(_arr(rm, f"{sp}/lmc_weight"), lambdas), "pt")
        ci[f"loss_barrier_{sp}"] = _entry(_loss_barrier_ci(_arr(rm, f"{sp}/lmc_weight"), lambdas), "nats")
    for name, c_lambdas, src, key in controls:
        c_lambdas = [float(x) for x in c_lambdas]
        if len(c_lambdas) < 3:
            raise NotTested(f"the {name} control has {len(c_lambdas)} λ: no interior point")
        margins_src = _source(ev, src, sources[src])
        for sp in held:
            m = _arr(margins_src, f"{sp}/{key}")
            ci[f"{name}_barrier_{sp}"] = _entry(_barrier_ci(m, c_lambdas), "pt")
            ci[f"{name}_loss_barrier_{sp}"] = _entry(_loss_barrier_ci(m, c_lambdas), "nats")
    primary = controls[0][0]
    flat = all(ci[f"barrier_{sp}"]["ci95"][1] < TOLERANCE for sp in held)
    control = any(
        ci[f"{primary}_barrier_{sp}"]["ci95"][0] > TOLERANCE
        or ci[f"{primary}_loss_barrier_{sp}"]["ci95"][0] > LOSS_TOLERANCE
        for sp in held
    )
    why = []
    if not flat:
        why.append(
            "the members' barrier CI reaches 1 pt on "
            + ", ".join(sp for sp in held if ci[f"barrier_{sp}"]["ci95"][1] >= TOLERANCE)
        )
    if not control:
        why.append(
            f"the {primary} control shows no barrier (accuracy beyond 1 pt or loss beyond {LOSS_TOLERANCE} nats): "
            "this task cannot tell connected models from unconnected ones"
        )
    numbers = {"members": ",".join(str(m) for m in l["members"]), "lambdas": len(lambdas), "control": primary}
    return _claim("lmc", HOLDS if flat and control else FAILS, reason="; ".join(why), ci=ci, numbers=numbers)


def _chosen_m(s) -> int:
    m = int(s["rm"]["warm"]["M"])
    if m < 2:
        raise NotTested(f"WARM averages M = {m} member(s): it is that member, and ENS equals it")
    return m


@check("wa_close_to_ens")
def wa_close_to_ens(s, ev):
    if "rm" not in s:
        return None
    m = _chosen_m(s)
    rm = _source(ev, "rm", "margins from rm_eval")
    held = _held_out(rm, "warm")
    ci = {
        f"wa_minus_ens_{sp}": _entry(_acc_diff_ci(_arr(rm, f"{sp}/warm"), _arr(rm, f"{sp}/ens")), "pt") for sp in held
    }
    worse = [sp for sp in held if ci[f"wa_minus_ens_{sp}"]["ci95"][0] <= -TOLERANCE]
    reason = f"WARM may be worse than ENS by 1 pt or more on {', '.join(worse)}" if worse else ""
    return _claim("wa_close_to_ens", FAILS if worse else HOLDS, reason=reason, ci=ci, numbers={"M": m})


@check("memorisation")
def memorisation(s, ev):
    if "rm" not in s:
        return None
    m = _chosen_m(s)
    rm = _source(ev, "rm", "margins from rm_eval")
    warm_c, ens_c = _arr(rm, "train_corrupted/warm"), _arr(rm, "train_corrupted/ens")
    if warm_c.size == 0:
        raise NotTested("no flipped labels in the training set (train_corrupted is empty)")
    clean = _entry(_acc_diff_ci(_arr(rm, "train_clean/warm"), _arr(rm, "train_clean/ens")), "pt")
    corrupted = _entry(_acc_diff_ci(warm_c, ens_c), "pt")
    ci = {"wa_minus_ens_train_clean": clean, "wa_minus_ens_train_corrupted": corrupted}
    numbers = {"M": m, "n_flipped": int(warm_c.size)}
    if clean["ci95"][0] <= -TOLERANCE:
        return _claim(
            "memorisation",
            NOT_TESTED,
            reason=f"not matched: WARM may fit the clean labels worse than ENS by 1 pt or more "
            f"(train_clean CI low {_pt(clean['ci95'][0])}), so fewer flipped labels could be under-fitting",
            ci=ci,
            numbers=numbers,
        )
    fewer = corrupted["ci95"][1] < 0
    reason = "" if fewer else "the train_corrupted CI of WARM − ENS does not lie below 0"
    return _claim("memorisation", HOLDS if fewer else FAILS, reason=reason, ci=ci, numbers=numbers)


@check("m_scaling")
def m_scaling(s, ev):
    if "rm" not in s:
        return None
    m = len(s["rm"]["members"])
    if m < 2:
        raise NotTested("one member: there is no M to grow")
    k = min(m, SCALING_MAX_M)
    rm = _source(ev, "rm", "margins from rm_eval")
    ci, why, ens_why, notes = {}, [], [], []
    held = _held_out(rm, "warm_by_m")[1:]
    for sp in held:
        mean_member = stats.correctness(_arr(rm, f"{sp}/members")).mean(0)  # [N]: per pair, the members' mean
        why += _scaling_rule(_arr(rm, f"{sp}/warm_by_m")[:k], mean_member, sp, k, "WARM", ci)
        if f"{sp}/ens_by_m" in rm:
            ens_why += _scaling_rule(_arr(rm, f"{sp}/ens_by_m")[:k], mean_member, sp, k, "ENS", ci)
    numbers = {"M_max": k}
    if any(key.startswith("ens_") for key in ci):
        numbers["ens_same_rule"] = FAILS if ens_why else HOLDS
        notes.append(
            "ENS of the same members, by this rule: " + ("fails — " + "; ".join(ens_why) if ens_why else "holds")
        )
    if all(f"{sp}/warm_by_m_random" in rm for sp in held):
        # The curve over random member orders starts at the mean member, not at the member validation ranks first.
        drops = []
        for sp in held:
            right = _arr(rm, f"{sp}/warm_by_m_random")[:k].T  # [N, k]: per pair, the share of orders right
            d = ci[f"random_worst_drop_{sp}"] = _entry(stats.bootstrap_ci([right], worst_drop), "pt")
            drops.append(f"{sp} {_pt(d['value'])} [{_pt(d['ci95'][0])}, {_pt(d['ci95'][1])}]")
        notes.append("WARM over random member orders, largest drop as M grows: " + ", ".join(drops))
    return _claim(
        "m_scaling", FAILS if why else HOLDS, reason="; ".join(why), ci=ci, numbers=numbers, note="; ".join(notes)
    )


def _scaling_rule(margins_by_m, mean_member, sp: str, k: int, model: str, ci: dict) -> list[str]:
    """m_scaling's rule on one split for the best-first curve ``margins_by_m`` [k, N] of ``model`` ('WARM' or
    'ENS'); fills ``ci`` and returns why it fails (empty when it holds)."""
    by_m = stats.correctness(margins_by_m).T  # [N, k]
    prefix = "" if model == "WARM" else f"{model.lower()}_"  # WARM's keys predate ENS's
    drop = ci[f"{prefix}worst_drop_{sp}"] = _entry(stats.bootstrap_ci([by_m], worst_drop), "pt")
    beats = ci[f"{model.lower()}_m{k}_minus_mean_member_{sp}"] = _entry(
        stats.paired_bootstrap_ci(by_m[:, -1], mean_member), "pt"
    )
    why = []
    if drop["ci95"][1] >= TOLERANCE:
        why.append(f"{model}'s {sp} accuracy may fall by 1 pt or more as M grows")
    if beats["ci95"][0] <= 0:
        why.append(f"{model} at M = {k} does not beat the mean member on {sp} beyond its CI")
    return why


@check("bon")
def bon(s, ev):
    b = s.get("bon")
    if not b:
        return None
    if "warm" not in b["oracle"] or "member_best" not in b["oracle"]:
        raise NotTested("Best-of-N did not select with both 'warm' and 'member_best'")
    n = np.asarray(b["n"])
    big = n >= BON_MIN_N
    if not big.any():
        raise NotTested(f"no N ≥ {BON_MIN_N} (BonConfig.n_values = {list(map(int, n))})")
    src = _source(ev, "bon", "oracle rewards from bon")
    if list(map(int, _arr(src, "n"))) != list(map(int, n)):
        raise NotTested("bon/per_prompt.npz does not hold the N of results.json")
    w, mb = _arr(src, "oracle/warm")[big].T, _arr(src, "oracle/member_best")[big].T  # [P, K]
    ci = {
        f"gap_n{int(v)}": _entry(stats.paired_bootstrap_ci(w[:, i], mb[:, i]), "reward") for i, v in enumerate(n[big])
    }
    ci["min_gap"] = _entry(stats.paired_bootstrap_ci(w, mb, lambda a, c: np.min(a - c, axis=-1)), "reward")
    ok = ci["min_gap"]["ci95"][0] > 0
    reason = "" if ok else f"at some N ≥ {BON_MIN_N} WARM's choices are not better beyond the CI"
    return _claim("bon", HOLDS if ok else FAILS, reason=reason, ci=ci, numbers={"n_prompts": int(w.shape[0])})


@check("rl")
def rl(s, ev):
    r = s.get("rl")
    if not r:
        return None
    runs = r.get("runs", {})
    if "warm" not in runs or "member_best" not in runs:
        raise NotTested("REINFORCE did not train against both 'warm' and 'member_best'")
    src = _source(ev, "rl", "eval scores from reinforce")
    per = {}
    for name in ("member_best", "warm"):
        one = src.get(name)
        if not isinstance(one, Mapping):
            raise NotTested(f"no per-prompt eval scores of the '{name}' policy" + (f" ({one})" if one else ""))
        per[name] = one
    single, warm = _arr(per["member_best"], "oracle"), _arr(per["warm"], "oracle")  # [S, P]
    if single.shape[1] != warm.shape[1]:
        raise NotTested("the two policies were evaluated on different prompts")
    if single.shape[0] < 2:
        raise NotTested("the best-member policy was evaluated at fewer than two steps")
    hacked = _entry(stats.bootstrap_ci([single.T], lambda m: np.max(m, axis=-1) - m[..., -1]), "reward")
    peak = int(np.argmax(single.mean(1)))
    proxy = _arr(per["member_best"], "proxy").mean(1)
    proxy_rise = float(proxy[-1] - proxy[peak])
    steps = _arr(per["member_best"], "step")
    numbers = {
        "single_oracle_peak_step": int(steps[peak]),
        "single_proxy_peak_to_last": proxy_rise if np.isfinite(proxy_rise) else None,
    }
    ci = {"single_peak_minus_final": hacked}
    numbers.update(_matched_kl_peaks(runs, single, warm, ci))
    wr = r.get("win_rate", {}).get("warm_vs_member_best")
    if wr is not None:
        ci["win_rate"] = {"value": wr["value"], "ci95": wr["ci95"], "se": None, "n": wr["n_prompts"], "unit": "rate"}
    if not (hacked["ci95"][0] > 0 and np.isfinite(proxy_rise) and proxy_rise >= 0):
        what = "its oracle's fall from the peak is within the CI" if hacked["ci95"][0] <= 0 else "its proxy fell too"
        return _claim(
            "rl",
            NOT_TESTED,
            reason=f"premise unmet: the best-member policy shows no reward hacking ({what})",
            ci=ci,
            numbers=numbers,
        )
    ci["warm_peak_minus_single_peak"] = _entry(
        stats.paired_bootstrap_ci(warm.T, single.T, lambda a, b: np.max(a, axis=-1) - np.max(b, axis=-1)), "reward"
    )
    if wr is None:
        return _claim(
            "rl",
            NOT_TESTED,
            reason="no win rate of the WARM policy over the best-member policy",
            ci=ci,
            numbers=numbers,
        )
    why = []
    if ci["warm_peak_minus_single_peak"]["ci95"][0] <= 0:
        why.append("the WARM policy's oracle peak is not higher beyond the CI")
    if wr["ci95"][0] <= 0.5:
        why.append("the win rate's CI reaches 0.5")
    return _claim("rl", FAILS if why else HOLDS, reason="; ".join(why), ci=ci, numbers=numbers)


def _matched_kl_peaks(runs: Mapping, single: np.ndarray, warm: np.ndarray, ci: dict) -> dict:
    """Informational, not part of the verdict: the two policies' best oracle within a shared KL budget (the
    paper reads RL as reward against KL), as ci['warm_minus_single_at_matched_kl']. single, warm: [S, P].
    Returns the numbers to report (the budget, or why there is none)."""
    kls = {name: runs[name].get("kl") for name in ("member_best", "warm")}
    if any(kl is None or len(kl) != len(o) for kl, o in zip(kls.values(), (single, warm))):
        return {"matched_kl": "no mean KL per evaluation step of both policies"}
    try:
        budget, within = kl_budget(kls)
    except NotTested as e:
        return {"matched_kl": str(e)}
    ci["warm_minus_single_at_matched_kl"] = _entry(
        stats.paired_bootstrap_ci(warm[within["warm"]].T, single[within["member_best"]].T, _best_max_difference),
        "reward",
    )
    return {"matched_kl_budget": budget}


def kl_budget(kls: Mapping[str, Sequence[float]]) -> tuple[float, dict[str, np.ndarray]]:
    """The KL budget at which families of policy points are compared, and which points lie within it.

    kls: {family: mean KL of each of its points [K]}. The budget is the smallest of the families' largest KL
    (so every family reaches it); returns (budget, {family: bool [K]}). Raises NotTested when a KL is not finite,
    a family never moved from the SFT policy, or one has no point within the budget.
    """
    arrs = {name: np.asarray(kl, np.float64) for name, kl in kls.items()}
    if not all(a.size and np.all(np.isfinite(a)) for a in arrs.values()):
        raise NotTested("a non-finite mean KL among the points")
    budget = float(min(a.max() for a in arrs.values()))
    if budget <= 0:
        raise NotTested(
            f"no KL to match at: the largest mean KL of one family is {budget:.4g} (a policy that never "
            "moved from the SFT policy)"
        )
    within = {name: a <= budget + KL_SLACK for name, a in arrs.items()}
    for name, keep in within.items():
        if not keep.any():
            raise NotTested(f"no point of {name} lies within the KL budget {budget:.4g}")
    return budget, within


def warp_matched(s: Mapping, ev: Mapping) -> dict:
    """The WARP and single-policy points compared at matched KL, with their per-prompt oracle rewards.

    s: a summary with a ``warp`` section ({"reward", "front": [{"iteration", "eta" [E], "kl" [E], ...}],
    "single": {run: {"step" [S], "kl" [S], ...}}}); ev: the evidence, ``ev["warp"]`` holding
    "iter<k>/oracle" [E, P] and ``ev["rl"][run]`` {"step" [S], "oracle" [S, P]}. The KL budget is the
    smaller of the two families' largest mean KL; a point is a candidate when its mean KL is within it
    (candidates are chosen by mean KL, which the bootstrap does not resample). Returns {"kl_budget",
    "warp": {"labels" [(iteration, η)], "kl" [Kw], "oracle" [P, Kw]}, "single": {"labels" [(run, step)],
    "kl" [Ks], "oracle" [P, Ks]}, "best_warp", "best_single" (indices of the highest mean oracle)}.
    Raises NotTested when the evidence is missing or cannot be matched.
    """
    w = s.get("warp") or {}
    front, single = w.get("front") or [], w.get("single") or {}
    if not front:
        raise NotTested("no WARP front (the warp stage wrote no iteration)")
    if not single:
        raise NotTested(f"no single-policy REINFORCE run against WARP's reward '{w.get('reward')}' to compare with")
    src = _source(ev, "warp", "oracle rewards of the WARP front")
    w_labels, w_kl, w_oracle = [], [], []
    for it in front:
        k = int(it["iteration"])
        oracle = _arr(src, f"iter{k}/oracle")  # [E, P]
        if oracle.shape[0] != len(it["eta"]) or len(it["kl"]) != len(it["eta"]):
            raise NotTested(f"WARP iteration {k}: the per-prompt rewards do not hold the η of results.json")
        w_labels += [(k, float(e)) for e in it["eta"]]
        w_kl += [float(x) for x in it["kl"]]
        w_oracle.append(oracle)
    rl_src = _source(ev, "rl", "eval scores from reinforce")
    s_labels, s_kl, s_oracle = [], [], []
    for run, r in single.items():
        one = rl_src.get(run)
        if not isinstance(one, Mapping):
            raise NotTested(f"no per-prompt eval scores of the single policy '{run}'" + (f" ({one})" if one else ""))
        if list(map(int, _arr(one, "step"))) != list(map(int, r["step"])) or len(r["kl"]) != len(r["step"]):
            raise NotTested(f"the per-prompt eval scores of '{run}' are not at the steps of its curve")
        s_labels += [(run, int(st)) for st in r["step"]]
        s_kl += [float(x) for x in r["kl"]]
        s_oracle.append(_arr(one, "oracle"))
    prompts = {a.shape[1] if a.ndim == 2 else None for a in w_oracle + s_oracle}
    if len(prompts) != 1 or None in prompts:
        raise NotTested(
            f"WARP and the single policies were evaluated on different prompts (counts {sorted(map(str, prompts))})"
        )
    w_mat = np.concatenate(w_oracle, axis=0).T  # [P, Kw]
    s_mat = np.concatenate(s_oracle, axis=0).T  # [P, Ks]
    if not (np.all(np.isfinite(w_mat)) and np.all(np.isfinite(s_mat))):
        raise NotTested("a non-finite per-prompt oracle reward among the points")
    budget, within = kl_budget({"WARP": w_kl, "the single policies": s_kl})
    out = {"kl_budget": budget}
    for name, labels, kl, mat, keep in (
        ("warp", w_labels, np.asarray(w_kl, np.float64), w_mat, within["WARP"]),
        ("single", s_labels, np.asarray(s_kl, np.float64), s_mat, within["the single policies"]),
    ):
        mat = mat[:, keep]
        out[name] = {"labels": [lb for lb, k in zip(labels, keep) if k], "kl": kl[keep], "oracle": mat}
        out[f"best_{name}"] = int(np.argmax(mat.mean(0)))
    return out


def _best_max_difference(a, b):
    """max over a's candidates of their mean − the same of b's: [..., Ka], [..., Kb] → [...]."""
    return np.max(a, axis=-1) - np.max(b, axis=-1)


@check("warp")
def warp(s, ev):
    if "warp" not in s:
        return None
    m = warp_matched(s, ev)
    wm, sm = m["warp"], m["single"]
    ci = {
        "best_warp_minus_best_single": _entry(
            stats.paired_bootstrap_ci(wm["oracle"], sm["oracle"], _best_max_difference), "reward"
        )
    }
    bw, bs = m["best_warp"], m["best_single"]
    wr = winrate.win_rate(wm["oracle"][:, bw], sm["oracle"][:, bs])
    ci["win_rate"] = {"value": wr["value"], "ci95": wr["ci95"], "se": None, "n": wr["n_prompts"], "unit": "rate"}
    (it, eta), (run, step) = wm["labels"][bw], sm["labels"][bs]
    numbers = {
        "kl_budget": m["kl_budget"],
        "best_warp_iteration": it,
        "best_warp_eta": eta,
        "best_warp_kl": float(wm["kl"][bw]),
        "best_single_run": run,
        "best_single_step": step,
        "best_single_kl": float(sm["kl"][bs]),
        "n_warp_points": len(wm["labels"]),
        "n_single_points": len(sm["labels"]),
    }
    above = ci["best_warp_minus_best_single"]["ci95"][0] > 0
    reason = "" if above else "the best WARP point's oracle reward is not higher beyond the CI at matched KL"
    return _claim("warp", HOLDS if above else FAILS, reason=reason, ci=ci, numbers=numbers)


def check_all(summary: dict, evidence: Mapping | None = None) -> list[dict]:
    """The claims a run's stages allow. ``evidence``: the per-example arrays (``report.load_evidence``):
    {"probe": probe_examples.npz, "rm": eval_examples.npz, "control": lmc_examples.npz, "bon": per_prompt.npz,
    "rl": {reward: {"step" [S], "oracle" [S, P], "proxy" [S, P]}}, "warp": front_examples.npz}; a source that could not be read
    is a string saying why. Without it every claim that needs it is "not tested"."""
    evidence = evidence or {}
    out = []
    for fn in CHECKS.values():
        c = fn(summary, evidence)
        if c is not None:
            out.append(c)
    return out


# ----------------------------------------------------------------------------- tables


def status_of(c: Mapping) -> str:
    """A claim's status; summaries written before statuses existed say only ``holds``."""
    st = c.get("status")
    return st if st in STATUSES else (HOLDS if c.get("holds") else FAILS)


def format_value(x, unit: str) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:+.2f}" if unit == "pt" else f"{x:.3f}" if unit == "rate" else f"{x:+.3f}"


def format_ci(name: str, e: Mapping) -> str:
    """``name +0.40 [−0.30, +1.10] pt`` (accuracy in points; rewards and rates as they are)."""
    unit = e.get("unit", "")
    lo, hi = e["ci95"]
    suffix = " pt" if unit == "pt" else ""
    return f"{name} {format_value(e['value'], unit)} [{format_value(lo, unit)}, {format_value(hi, unit)}]{suffix}"


def cell(c: Mapping) -> str:
    """One claim of one run: its status, then each CI (or the numbers of an old summary), then the reason."""
    st = status_of(c)
    label = {HOLDS: "holds", FAILS: "**fails**", NOT_TESTED: "*not tested*"}[st]
    if "ci" in c:
        body = "; ".join(format_ci(k, e) for k, e in c["ci"].items())
    else:
        body = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in c["numbers"].items())
    parts = [label + (f": {body}" if body else "")]
    if c.get("reason"):
        parts.append(f"({c['reason']})")
    if c.get("note"):
        parts.append(f"[{c['note']}]")
    return " ".join(parts).replace("|", "\\|")


def across_runs(claims_by_run: Mapping[str, list[dict]]) -> str:
    """Markdown: one row per claim — in how many runs it held of those that tested it, then each run's
    status, 95% CIs and reason."""
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
        st = [status_of(c) for c in per_run.values()]
        tested = sum(x != NOT_TESTED for x in st)
        held = f"{st.count(HOLDS)}/{tested} tested"
        if tested < len(st):
            held += f", {len(st) - tested} not tested"
        cells = [cell(per_run[r]) if r in per_run else "—" for r in runs]
        lines.append(f"| `{cid}` | {held} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _valid_claim(c) -> bool:
    if not (isinstance(c, dict) and {"id", "holds", "numbers"} <= c.keys() and isinstance(c["numbers"], dict)):
        return False
    ci = c.get("ci", {})
    return isinstance(ci, dict) and all(
        isinstance(e, dict) and "value" in e and isinstance(e.get("ci95"), list) and len(e["ci95"]) == 2
        for e in ci.values()
    )


def _read_claims(arg: str) -> tuple[str, list[dict]]:
    """(summary.json path, its claims) for a run's workdir, its report/ folder or a summary.json."""
    from warm_jax import cli_errors, io_utils
    from warm_jax.workdir import Workdir

    candidates = [arg, os.path.join(arg, "summary.json"), Workdir(arg).summary_json]
    path = next((c for c in candidates if os.path.isfile(c)), None)
    if path is None:
        raise cli_errors.UserError(
            f"{arg}: no claims section (no summary.json at {', '.join(candidates)}); run the report stage first"
        )
    data = io_utils.read_json(path)  # a parse error names the file
    claims = data.get("claims") if isinstance(data, dict) else None
    if claims is None:
        raise cli_errors.UserError(f"{path}: no claims section; run the report stage first")
    if not isinstance(claims, list) or not all(_valid_claim(c) for c in claims):
        raise cli_errors.UserError(
            f"{path}: field 'claims' must be a list of {{id, holds, numbers}} objects (with 'ci' entries "
            "{value, ci95: [lo, hi]})"
        )
    try:
        across_runs({arg: claims})  # a claim's numbers that the table cannot format: name the file
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


def console_main() -> int:
    """The ``warm-claims`` command: `main` on the command line's arguments; ``-h``/``--help`` prints the usage."""
    argv = sys.argv[1:]
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    return main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
