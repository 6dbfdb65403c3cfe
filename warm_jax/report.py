"""Stage `report`: report/summary.json, report/report.md and PNG figures from the stages' outputs.

Each section comes from the file its stage wrote (rm/eval.json, bon/results.json,
rl/results.json, warp/results.json); a section whose stage did not run is left out. The ``warp``
section holds WARP's KL–reward front per iteration (η, KL to the SFT policy, oracle and proxy reward),
the single policies' REINFORCE trajectories against the same reward, and, at matched KL
(``claims.warp_matched``), the best point of each with win rates of the best WARP point over them. The ``claims`` section checks
the paper's findings against this run's own numbers with paired bootstrap intervals over the
per-example results those stages wrote beside them (``load_evidence``; see ``claims.py``): each
claim's status ("holds", "fails", "not tested") and 95% CIs are in summary.json and report.md.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from warm_jax import claims as claims_lib  # noqa: E402
from warm_jax import eval_splits, evaluation, io_utils, stats  # noqa: E402
from warm_jax.policy import bon as bon_lib  # noqa: E402
from warm_jax.policy import warp as warp_lib, winrate  # noqa: E402
from warm_jax.stages import RunContext, register_stage  # noqa: E402
from warm_jax.workdir import Workdir  # noqa: E402

log = logging.getLogger(__name__)


def build_summary(workdir: str) -> dict:
    wd = Workdir(workdir)
    summary: dict = {"workdir": os.path.abspath(workdir)}
    members = wd.read_ensemble()
    probe = (members or {}).get("probe")
    if probe:
        summary["probe"] = probe
    if members and "geometry" in members:
        summary["geometry"] = members["geometry"]
    ev = wd.read_rm_eval()
    if ev:
        summary["rm"] = ev["rm"]
        summary["lmc"] = ev["lmc"]
        if "permutation_control" in ev:
            summary["permutation_control"] = ev["permutation_control"]
        summary["reward_stats"] = ev["reward_stats"]
    control = wd.read_control()
    if control:
        summary["negative_control"] = control
    bon = wd.read_bon()
    if bon:
        summary["bon"] = bon
    rl = wd.read_rl()
    if rl:
        summary["rl"] = rl
        samples = rl_samples(wd, rl)
        if samples:
            summary["rl"]["samples"] = samples
    warp = wd.read_warp()
    if warp:
        summary["warp"] = warp_section(warp, rl)
    updates = wd.training_updates()
    if updates:
        summary["updates"] = updates
    evidence = load_evidence(workdir, ev, control, bon, rl, warp, probe)
    if warp:
        summary["warp"].update(warp_matched_section(summary, evidence))
    summary["claims"] = claims_lib.check_all(summary, evidence)
    summary["claims_method"] = {
        "interval": "paired percentile bootstrap over examples (pairs; prompts for bon and rl)",
        "level": stats.LEVEL,
        "resamples": stats.N_BOOT,
        "seed": stats.SEED,
        "accuracy_tolerance": claims_lib.TOLERANCE,
    }
    return summary


def rl_samples(wd: Workdir, rl: dict) -> dict[str, list[dict]]:
    """Per REINFORCE run, the texts its evals kept (``reinforce.SAMPLES_KEPT``) at the step of its highest mean
    oracle and at its last step: what the policy wrote where the oracle liked it best and where its reward took it.
    Runs whose evals kept no texts are left out."""
    out = {}
    for name, r in rl.get("runs", {}).items():
        steps, oracle = r["step"], r["oracle"]
        rows = []
        for i in dict.fromkeys([int(np.nanargmax(np.asarray(oracle, np.float64))), len(steps) - 1]):
            path = wd.rl_run(name).eval_scores(steps[i])
            record = io_utils.read_json(path) if os.path.exists(path) else {}
            if record.get("samples"):
                rows.append({"step": steps[i], "oracle": oracle[i], "kl": r["kl"][i], "texts": record["samples"]})
        if rows:
            out[name] = rows
    return out


def load_evidence(
    workdir: str,
    ev: dict | None,
    control: dict | None,
    bon: dict | None,
    rl: dict | None,
    warp: dict | None = None,
    probe: dict | None = None,
) -> dict:
    """The per-example arrays the claims resample, by source; a source that cannot be read is a string
    saying why (the claims that need it are then "not tested")."""

    def attempt(fn):
        try:
            return fn()
        except (io_utils.StaleArraysError, OSError, ValueError, KeyError) as e:
            return f"{type(e).__name__}: {e}" if not isinstance(e, io_utils.StaleArraysError) else str(e)

    wd = Workdir(workdir)
    out: dict = {}
    if probe:
        out["probe"] = attempt(lambda: io_utils.read_arrays(wd.rm_probe_examples, probe.get("examples_sha256")))
    if ev:
        out["rm"] = attempt(lambda: evaluation.read_examples(wd.rm_dir, ev))
    if control:
        out["control"] = attempt(lambda: evaluation.read_examples(wd.rm_control_dir, control))
    if bon:
        out["bon"] = attempt(lambda: bon_lib.read_per_prompt(wd.bon_dir, bon))
    if rl:
        out["rl"] = {
            name: attempt(lambda name=name, r=r: wd.rl_run(name).read_eval_scores(r["step"]))
            for name, r in rl.get("runs", {}).items()
        }
    if warp:
        out["warp"] = attempt(lambda: warp_lib.read_front_examples(warp))
    return out


def warp_section(warp: dict, rl: dict | None) -> dict:
    """WARP's front per iteration and the single policies' trajectories against the same reward.

    The single policies are the ``reinforce`` runs ``warp.single_runs(reward)`` names (anchored to the
    SFT policy, or to their own EMA) that this workdir holds; each point is one eval step."""
    reward = warp["reward"]
    runs = (rl or {}).get("runs", {})
    single = {
        name: {"anchor": anchor, **{k: runs[name][k] for k in ("step", "kl", "oracle", "proxy")}}
        for name, anchor in warp_lib.single_runs(reward).items()
        if name in runs
    }
    front = [{k: it[k] for k in ("iteration", "eta", "kl", "oracle", "proxy", "length")} for it in warp["iterations"]]
    return {"reward": reward, "source": warp["source"], "config": warp["config"], "front": front, "single": single}


def warp_matched_section(summary: dict, evidence: dict) -> dict:
    """The best WARP and single points within one KL budget, and win rates of that WARP point (oracle, per
    eval prompt, bootstrap CIs) over the best single point overall and over each single run's best."""
    try:
        m = claims_lib.warp_matched(summary, evidence)
    except (claims_lib.NotTested, ValueError) as e:
        return {"matched": None, "not_matched": str(e)}
    wm, sm = m["warp"], m["single"]
    bw = m["best_warp"]

    def point(part, i, keys):
        return {
            **dict(zip(keys, part["labels"][i])),
            "kl": float(part["kl"][i]),
            "oracle": float(part["oracle"][:, i].mean()),
        }

    best_warp = point(wm, bw, ("iteration", "eta"))
    best_single = point(sm, m["best_single"], ("run", "step"))
    win_rates = {"best_warp_vs_best_single": winrate.win_rate(wm["oracle"][:, bw], sm["oracle"][:, m["best_single"]])}
    for run in summary["warp"]["single"]:
        cols = [i for i, (r, _) in enumerate(sm["labels"]) if r == run]
        if cols:
            best = cols[int(np.argmax(sm["oracle"][:, cols].mean(0)))]
            win_rates[f"best_warp_vs_{run}"] = {
                **winrate.win_rate(wm["oracle"][:, bw], sm["oracle"][:, best]),
                "single": point(sm, best, ("run", "step")),
            }
    return {
        "matched": {"kl_budget": m["kl_budget"], "best_warp": best_warp, "best_single": best_single},
        "win_rates": win_rates,
    }


# ----------------------------------------------------------------------------- figures


def _fig(path):
    plt.tight_layout()
    plt.savefig(path, dpi=110)
    plt.close()
    return os.path.basename(path)


def figures(summary: dict, out: str) -> list[str]:
    made = []
    if "lmc" in summary:
        lmc = summary["lmc"]
        splits = eval_splits.ordered(lmc["weight_interp"])
        fig, axes = plt.subplots(1, len(splits), figsize=(3.5 * len(splits), 3.2), sharex=True, squeeze=False)
        axes = axes[0]
        for ax, s in zip(axes, splits):
            ax.plot(lmc["lambdas"], lmc["weight_interp"][s], "o-", label="weights (WA)")
            ax.plot(lmc["lambdas"], lmc["pred_interp"][s], "s--", label="predictions (ENS)")
            ax.set_title(s + (" (vs flipped labels)" if s == "train_corrupted" else ""), fontsize=9)
            ax.set_xlabel("λ")
        axes[0].set_ylabel("accuracy")
        axes[0].legend(fontsize=8)
        made.append(_fig(os.path.join(out, "interpolation.png")))
    if "rm" in summary:
        rm = summary["rm"]
        ms = [r["M"] for r in rm["warm_by_m"]]
        held = eval_splits.held_out(rm["warm"]["acc"])
        fig, axes = plt.subplots(1, len(held), figsize=(5 * len(held), 3.4), squeeze=False)
        axes = axes[0]
        for ax, s in zip(axes, held):
            ax.plot(ms, [r["acc"][s] for r in rm["warm_by_m"]], "o-", color="C0", label="WARM (weight average)")
            ax.plot(ms, [r["acc"][s] for r in rm["ens_by_m"]], "s--", color="C1", label="ENS (prediction average)")
            if "warm_by_m_random" in rm:
                for name, color in (("warm", "C0"), ("ens", "C1")):
                    rows = rm[f"{name}_by_m_random"]
                    ax.plot(
                        [r["M"] for r in rows],
                        [r["acc"][s] for r in rows],
                        ":",
                        color=color,
                        alpha=0.7,
                        label=f"{name.upper()}, mean over random orders",
                    )
            best = max(mb["acc"][s] for mb in rm["members"])
            mean = sum(mb["acc"][s] for mb in rm["members"]) / len(rm["members"])
            ax.axhline(best, color="gray", ls=":", label="best member")
            ax.axhline(mean, color="gray", ls="-.", label="mean member")
            ax.set_title(f"{s} accuracy vs M")
            ax.set_xlabel("M")
        axes[0].legend(fontsize=8)
        made.append(_fig(os.path.join(out, "accuracy_vs_m.png")))
        fig, ax = plt.subplots(figsize=(6, 3.4))
        names = [f"m{m['id']}" for m in rm["members"]] + ["WARM", "ENS"]
        vals = [m["acc"]["train_corrupted"] for m in rm["members"]] + [
            rm["warm"]["acc"]["train_corrupted"],
            rm["ens"]["acc"]["train_corrupted"],
        ]
        ax.bar(names, vals, color=["#999"] * len(rm["members"]) + ["C0", "C1"])
        ax.set_ylabel("accuracy vs flipped labels")
        ax.set_title("memorisation of corrupted labels (lower = more robust)")
        made.append(_fig(os.path.join(out, "memorisation.png")))
    if "bon" in summary:
        bon = summary["bon"]
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for name, ys in bon["oracle"].items():
            se = bon.get("oracle_se", {}).get(name)
            err = None if se is None else [0.0 if e is None else e for e in se]
            ax.errorbar(bon["n"], ys, yerr=err, fmt="o-", capsize=3, label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("N (KL = log N − (N−1)/N)")
        ax.set_ylabel("oracle reward of the choice (± s.e.)")
        ax.set_title("Best-of-N")
        ax.legend(fontsize=8)
        made.append(_fig(os.path.join(out, "bon.png")))
    if "rl" in summary:
        runs = summary["rl"]["runs"]
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
        for name, r in runs.items():
            axes[0].plot(r["kl"], r["oracle"], "o-", label=name)
            axes[1].plot(r["kl"], r["proxy"], "o-", label=name)
        axes[0].set_title("oracle (control) reward vs KL")
        axes[1].set_title("proxy reward vs KL")
        for ax in axes:
            ax.set_xlabel("KL(π ‖ π_ref)")
        axes[0].legend(fontsize=8)
        made.append(_fig(os.path.join(out, "rl.png")))
    if "warp" in summary:
        made.append(warp_figure(summary["warp"], os.path.join(out, "warp_front.png")))
    return made


def warp_figure(w: dict, path: str) -> str:
    """Oracle and proxy reward vs KL: WARP's front per iteration (η marked) and the single policies' trajectories."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for it in w["front"]:
        for ax, key in zip(axes, ("oracle", "proxy")):
            ax.plot(it["kl"], it[key], "o-", label=f"WARP iteration {it['iteration']} (η = 0 … 1)")
            for eta, x, y in zip(it["eta"], it["kl"], it[key]):
                if eta in (0.0, 1.0):
                    ax.annotate(f"η={eta:g}", (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
    for name, r in w["single"].items():
        style = "s--" if r["anchor"] == "init" else "^:"
        for ax, key in zip(axes, ("oracle", "proxy")):
            ax.plot(r["kl"], r[key], style, label=f"REINFORCE '{name}' (anchor: {r['anchor']}, every eval step)")
    m = w.get("matched")
    if m:
        axes[0].axvline(m["kl_budget"], color="gray", ls=":", lw=1, label="matched KL budget")
        axes[0].plot([m["best_warp"]["kl"]], [m["best_warp"]["oracle"]], "*", ms=14, color="k", label="best WARP point")
        axes[0].plot(
            [m["best_single"]["kl"]], [m["best_single"]["oracle"]], "P", ms=11, color="k", label="best single point"
        )
    axes[0].set_title(f"oracle reward vs KL (reward: {w['reward']})")
    axes[1].set_title("proxy reward vs KL")
    for ax in axes:
        ax.set_xlabel("KL(π ‖ π_SFT), mean over eval prompts")
    axes[0].legend(fontsize=7)
    return _fig(path)


# ----------------------------------------------------------------------------- markdown


def _row(cells):
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _barriers(who: str, curve: dict) -> str:
    """One line: a curve's accuracy barrier (points below the chord) and loss barrier (nats above it) per split."""
    acc = ", ".join(f"{s} {100 * curve['barrier'][s]:.2f}" for s in eval_splits.ordered(curve["barrier"]))
    loss_barrier = curve.get("loss_barrier", {})
    loss = ", ".join(f"{s} {loss_barrier[s]:.4f}" for s in eval_splits.ordered(loss_barrier))
    return f"{who}: accuracy barrier (points below the straight line) {acc}; loss barrier (nats above it) {loss}.  "


def length_bias_markdown(rm: dict) -> list[str]:
    """The correlation of each model's reward margin with the length gap, per held-out split."""
    bias = rm["length_bias"]
    splits = eval_splits.held_out(bias)

    def cells(pick):
        return [("—" if (c := pick(bias[s])["corr"]) is None else f"{c:+.3f}") for s in splits]

    lines = [
        "### Length bias",
        "",
        "Correlation of the reward margin r⁺ − r⁻ with the length gap (tokens of chosen − rejected); 0 is "
        "length-blind.",
        "Share of pairs whose chosen response is the longer: "
        + ", ".join(f"{s} {bias[s]['share_longer_chosen']:.2f}" for s in splits)
        + ". Accuracy on the longer- and shorter-chosen pairs: `summary.json` → `rm.length_bias`.",
        "",
        _row(["model", *splits]),
        _row(["---"] * (len(splits) + 1)),
    ]
    for i, m in enumerate(rm["members"]):
        lines.append(_row([f"member {m['id']}", *cells(lambda b, i=i: b["members"][i])]))
    lines.append(_row([f"**WARM** (M={rm['warm']['M']})", *cells(lambda b: b["warm"])]))
    lines.append(_row([f"ENS (M={rm['ens']['M']})", *cells(lambda b: b["ens"])]))
    for k, row in enumerate(rm["warm_by_m"]):
        lines.append(_row([f"WARM of the best {row['M']}", *cells(lambda b, k=k: b["warm_by_m"][k])]))
    return [*lines, ""]


def by_m_random_markdown(rm: dict) -> list[str]:
    """WARM's and ENS's accuracy by M averaged over random member orders, beside WARM's best-first curve."""
    splits = eval_splits.held_out(rm["warm"]["acc"])
    lines = [
        "### Accuracy by M over random member orders",
        "",
        f"The mean over {len(rm['random_orders'])} random orders of the members "
        "(`EvalConfig.random_orders_per_member` starting with each) of the model of each order's first M: M = 1 is "
        "the mean member. Best-first is WARM of the M members validation ranks first.",
        "",
        _row(["M", *(f"{s} {model}" for s in splits for model in ("WARM", "ENS", "WARM best-first"))]),
        _row(["---"] * (1 + 3 * len(splits))),
    ]
    for w, e, b in zip(rm["warm_by_m_random"], rm["ens_by_m_random"], rm["warm_by_m"], strict=True):
        lines.append(_row([w["M"], *(f"{row['acc'][s]:.3f}" for s in splits for row in (w, e, b))]))
    return [*lines, ""]


def by_share_markdown(rm: dict) -> list[str]:
    """Train accuracies of WARM and ENS by how many of WARM's members trained on each pair (members on shares)."""
    lines = [
        "### Training pairs by how many of WARM's members trained on them",
        "",
        "The members trained on shares of the pairs (`EnsembleConfig.member_data_fraction`). Accuracy against the "
        "training labels (on train_corrupted the flipped ones: higher = more memorised); the pairs no member saw "
        "are the control.",
        "",
        _row(["split", "seen by", "pairs", "WARM", "ENS"]),
        _row(["---"] * 5),
    ]
    for s, view in rm["by_share"].items():
        for r in view["seen_by"]:
            lines.append(
                _row([s, f"{r['count']} of {rm['warm']['M']}", r["pairs"], f"{r['warm']:.3f}", f"{r['ens']:.3f}"])
            )
    return [*lines, ""]


def markdown(summary: dict, figs: list[str]) -> str:
    lines = ["# warm_jax report", ""]
    if "probe" in summary:
        g = summary["probe"]
        splits = [s for s in ("train", *eval_splits.held_out(g["pretrained"])) if s in g["pretrained"]]
        lines += [
            "## Does pretraining give the reward models anything?",
            "",
            "A linear probe (BT loss, frozen features of the last token) on the pretrained trunk and on a random-init",
            f"trunk of the same shape. The gate: validation ≥ {g['accuracy_bound']:.2f} and ≥ "
            f"{100 * g['margin_bound']:.0f} pt above random features — **{'holds' if g['holds'] else 'fails'}**.",
            "",
            _row(["features", *splits]),
            _row(["---"] * (len(splits) + 1)),
            _row(["pretrained", *(f"{g['pretrained'][s]:.3f}" for s in splits)]),
            _row(["random init", *(f"{g['random'][s]:.3f}" for s in splits)]),
            "",
        ]
    if "geometry" in summary:
        geo = summary["geometry"]
        cos = np.asarray(geo["task_vector_cosine"])
        off = cos[~np.eye(len(cos), dtype=bool)]
        lines += [
            "Members' distance from their inits (‖θᵢ − θ₀,ᵢ‖ / ‖θ₀,ᵢ‖): "
            + ", ".join(f"{d:.3f}" for d in geo["distance_from_init"])
            + (f"; pairwise task-vector cosines {off.min():.2f} … {off.max():.2f}." if off.size else "."),
            "",
        ]
    if "rm" in summary:
        rm = summary["rm"]
        splits = eval_splits.ordered(rm["warm"]["acc"])
        lines += [
            "## Reward models",
            "",
            "Accuracy per split. **train_corrupted is measured against the flipped (training) labels: higher means the",
            "model memorised more label noise.**",
            *(
                f"{s}: {eval_splits.BUILTIN_SHIFTS[s]}."
                for s in eval_splits.ood_splits(splits)
                if s in eval_splits.BUILTIN_SHIFTS
            ),
            "",
            _row(["model", *splits]),
            _row(["---"] * (len(splits) + 1)),
        ]
        for m in rm["members"]:
            lines.append(_row([f"member {m['id']}", *(f"{m['acc'][s]:.3f}" for s in splits)]))
        warm_m = rm["warm"]["M"]
        lines.append(_row([f"**WARM** (M={warm_m})", *(f"**{rm['warm']['acc'][s]:.3f}**" for s in splits)]))
        lines.append(_row([f"ENS (M={rm['ens']['M']})", *(f"{rm['ens']['acc'][s]:.3f}" for s in splits)]))
        if warm_m < len(rm["members"]):
            # WARM as selected (the best M on validation) beside the uniform average of every member.
            for name, row in (("WARM", rm["warm_by_m"][-1]), ("ENS", rm["ens_by_m"][-1])):
                lines.append(_row([f"{name}, all members (M={row['M']})", *(f"{row['acc'][s]:.3f}" for s in splits)]))
        lines += [
            "",
            f"Calibration (ECE, validation): WARM {rm['warm']['ece']['validation']:.3f}, "
            f"ENS {rm['ens']['ece']['validation']:.3f}.",
            "",
        ]
        if "length_bias" in rm:
            lines += length_bias_markdown(rm)
        if "warm_by_m_random" in rm:
            lines += by_m_random_markdown(rm)
        if "by_share" in rm:
            lines += by_share_markdown(rm)
    if "negative_control" in summary:
        b = summary["negative_control"]["barrier"]
        lines_ctrl = ", ".join(f"{s} {100 * b[s]:.2f}" for s in eval_splits.ordered(b))
    if "lmc" in summary:
        lines += ["## Linear mode connectivity", "", _barriers(f"Members {summary['lmc']['members']}", summary["lmc"])]
        if "permutation_control" in summary:
            lines.append(
                _barriers(
                    "Permutation control (the second member with its MLP units and residual coordinates permuted)",
                    summary["permutation_control"],
                )
            )
        lines.append("")
        if "negative_control" in summary:
            lines += [
                f"Negative control (two RMs from different random inits, no pretraining): barrier {lines_ctrl}.",
                "",
            ]
    if "bon" in summary:
        bon = summary["bon"]
        lines += [
            "## Best-of-N (oracle reward of the choice)",
            "",
            _row(["N", "KL", *bon["oracle"].keys()]),
            _row(["---"] * (2 + len(bon["oracle"]))),
        ]
        se = bon.get("oracle_se", {})

        def with_se(name, i):
            e = se.get(name, [None] * len(bon["n"]))[i]
            return f"{bon['oracle'][name][i]:.3f}" + ("" if e is None else f" ± {e:.3f}")

        for i, n in enumerate(bon["n"]):
            lines.append(_row([n, f"{bon['kl'][i]:.2f}", *(with_se(name, i) for name in bon["oracle"])]))
        lines.append("")
        if se:
            lines += [f"Mean over {bon['num_prompts']} prompts ± its standard error over prompts.", ""]
    if "rl" in summary:
        lines += ["## REINFORCE", ""]
        for name, w in summary["rl"].get("win_rate", {}).items():
            lines.append(
                f"- win rate {name}: {w['value']:.3f} (95% CI {w['ci95'][0]:.3f}–{w['ci95'][1]:.3f}, "
                f"{w['n_prompts']} prompts)"
            )
        lines.append("")
        samples = summary["rl"].get("samples", {})
        if samples:
            lines += [
                "What each policy wrote (the first eval prompts) at its best mean oracle and at its last step:",
                "",
            ]
            for name, rows in samples.items():
                for row in rows:
                    lines.append(
                        f"- `{name}`, step {row['step']} (mean oracle {row['oracle']:.3f}, KL {row['kl']:.1f}):"
                    )
                    lines += [f"  - {text}" for text in row["texts"]]
            lines.append("")
    if "warp" in summary:
        lines += warp_markdown(summary["warp"])
    if "updates" in summary:
        lines += [
            "## Training updates",
            "",
            "Updates whose loss or gradient was non-finite are skipped (the state is kept) and counted.",
            "",
            _row(["run", "applied", "skipped", "first skipped steps"]),
            _row(["---"] * 4),
        ]
        for name, u in summary["updates"].items():
            skipped = u["skipped"] if not u["skipped"] else f"**{u['skipped']}**"
            lines.append(_row([name, u["applied"], skipped, ", ".join(map(str, u["skipped_steps"][:10])) or "–"]))
        lines.append("")
    if summary.get("claims"):
        method = summary.get("claims_method", {})
        lines += [
            "## The paper's claims, checked on this run",
            "",
            "Each claim is judged by paired bootstrap 95% intervals over the evaluation pairs (prompts for Best-of-N",
            f"and RL; {method.get('resamples', stats.N_BOOT)} resamples, seed {method.get('seed', stats.SEED)}); "
            "accuracy differences are in points. A claim whose evidence is missing or cannot decide is *not tested*.",
            "",
            _row(["claim", "status", "95% CIs", "why"]),
            _row(["---"] * 4),
        ]
        for c in summary["claims"]:
            st = claims_lib.status_of(c)
            status = {"holds": "holds", "fails": "**fails**", "not tested": "*not tested*"}[st]
            cis = "; ".join(claims_lib.format_ci(k, e) for k, e in c.get("ci", {}).items()) or "–"
            why = (c.get("reason", "") + (f" [{c['note']}]" if c.get("note") else "")).strip()
            lines.append(
                _row(
                    [f"`{c['id']}`: {c['statement']}", status, cis.replace("|", "\\|"), why.replace("|", "\\|") or "–"]
                )
            )
        lines.append("")
    for f in figs:
        lines += [f"![{f}]({f})", ""]
    return "\n".join(lines)


def warp_markdown(w: dict) -> list[str]:
    lines = [
        f"## WARP (policies merged by {w['config'].get('merge_method', 'slerp')}, then LITI towards each iteration's "
        f"init; reward: {w['reward']})",
        "",
        "KL is to the SFT policy, mean over the held-out eval prompts; rewards are means over the same prompts.",
        "",
        _row(["iteration", "η", "KL", "oracle", "proxy"]),
        _row(["---"] * 5),
    ]
    for it in w["front"]:
        for i, eta in enumerate(it["eta"]):
            lines.append(
                _row(
                    [
                        it["iteration"],
                        f"{eta:g}",
                        f"{it['kl'][i]:.3f}",
                        f"{it['oracle'][i]:.3f}",
                        f"{it['proxy'][i]:.3f}",
                    ]
                )
            )
    lines.append("")
    for name, r in w["single"].items():
        best = int(np.argmax(r["oracle"]))
        lines.append(
            f"- single policy '{name}' (anchor: {r['anchor']}): {len(r['step'])} eval points, KL up to "
            f"{max(r['kl']):.3f}; best oracle {r['oracle'][best]:.3f} at step {r['step'][best]} (KL {r['kl'][best]:.3f})"
        )
    m = w.get("matched")
    if m:
        bw, bs = m["best_warp"], m["best_single"]
        lines.append(
            f"- at matched KL (budget {m['kl_budget']:.3f}): best WARP point iteration {bw['iteration']}, "
            f"η = {bw['eta']:g} (KL {bw['kl']:.3f}, oracle {bw['oracle']:.3f}); best single point '{bs['run']}' "
            f"step {bs['step']} (KL {bs['kl']:.3f}, oracle {bs['oracle']:.3f})"
        )
        for name, wr in w.get("win_rates", {}).items():
            lines.append(
                f"- win rate {name}: {wr['value']:.3f} (95% CI {wr['ci95'][0]:.3f}–{wr['ci95'][1]:.3f}, "
                f"{wr['n_prompts']} prompts)"
            )
    elif w.get("not_matched"):
        lines.append(f"- not compared at matched KL: {w['not_matched']}")
    lines.append("")
    return lines


@register_stage("report")
def run(ctx: RunContext) -> None:
    main = jax.process_index() == 0
    out = ctx.artefacts.report_dir
    # The whole folder at once (every process takes part in the replace; process 0 writes): a crash leaves the
    # old report or the new one, never a mix of their files.
    with io_utils.atomic_directory(out, overwrite=True) as tmp:
        if main:
            summary = build_summary(ctx.workdir)
            figs = figures(summary, tmp)
            io_utils.atomic_write_json(os.path.join(tmp, "summary.json"), summary)
            io_utils.atomic_write_text(os.path.join(tmp, "report.md"), markdown(summary, figs))
    if main:
        log.info("[report] %s", os.path.join(out, "report.md"))
        print(json.dumps({c["id"]: c["status"] for c in summary["claims"]}))
