"""Score a reward checkpoint on a prepared preference dataset: ``warm-eval`` (python -m warm_jax.evaluate_checkpoint).

    warm-eval --checkpoint=WORKDIR/rm/warm --data=WORKDIR/data [--split=validation,ood_cue] [--output=scores.json]
    warm-eval --checkpoint=WORKDIR/rm/members --data=WORKDIR/data             # every member, their ENS and WARM
    warm-eval --checkpoint=WORKDIR/rm/members --member=2 --data=WORKDIR/data  # one of them
    warm-eval --checkpoint=WORKDIR/rm/ckpt --data=WORKDIR/data                # the stacked training checkpoint
    warm-eval --checkpoint=/tmp/warm_rm_hf --data=WORKDIR/data                # an HF export (--kind=reward)

``--checkpoint`` is one of: a params checkpoint (``model.json`` + ``ckpt/``: the merged WARM RM, one member, an
average written by ``warm_jax.average``); a directory of numbered member checkpoints (``rm/members``); a stacked
ensemble training checkpoint (``rm/ckpt``, its model.json found as ``warm_jax.average`` finds it); a Hugging Face
``LlamaForSequenceClassification`` directory (``warm_jax.export --kind=reward``, or any Llama reward model). A
stack reports each member, ENS (the mean of their rewards) and WARM (their uniform weight average), or the
member ``--member`` alone. ``--data`` is a dataset written by ``warm_jax.data`` (or a workdir holding one in
``data/``); its records must be tokenized with the model's vocabulary.

For every split (default: all the dataset has) and model: accuracy (r⁺ > r⁻, ties half), Bradley–Terry loss, ECE of
σ(r⁺ − r⁻), reward statistics and length bias, computed by rm_eval's own functions (``warm_jax.evaluation``), so the
numbers equal ``rm/eval.json``'s for the same model and split. A split with flipped labels (the built-in task's
``train``) is also reported as ``<split>_clean`` and ``<split>_corrupted``, the latter against the flipped
(training) labels, as rm_eval does. When the dataset names each pair's subset (RewardBench style, ``subsets.json``
from ``warm-data prepare --format=hf``), each split is broken down by subset too. A table goes to stdout, the JSON
to ``--output`` (written atomically). A bad input gives one line on stderr naming the path or flag, and exit status
1 (the traceback too with ``--verbose``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from warm_jax import averaging, checkpoint_averaging, cli_errors, ensemble, evaluation, io_utils, params_io, runtime
from warm_jax import sharding
from warm_jax.average import find_model_json, is_stacked
from warm_jax.data import builders, pipeline
from warm_jax.models import transformer as tr
from warm_jax.workdir import Workdir

SUBSET_FIELD = "subset"
LENGTH_GAP = "length_gap"
HF_REWARD_ARCHITECTURE = "LlamaForSequenceClassification"


def _mesh_shape(text: str) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in (p.split("=") for p in text.split(",") if p)}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected axis=size,... (e.g. data=-1,tensor=2), got {text!r}") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="warm-eval", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="reward checkpoint directory (see above)")
    p.add_argument("--data", required=True, help="prepared preference dataset (or a workdir with data/)")
    p.add_argument("--member", type=int, default=None, help="a stack: score only this member")
    p.add_argument("--split", default=None, help="comma-separated splits (default: every split of --data)")
    p.add_argument("--output", default=None, help="write the results as JSON here (atomically)")
    p.add_argument("--batch_size", type=int, default=evaluation.EvalConfig.batch_size, help="pairs per forward")
    p.add_argument("--max_examples", type=int, default=None, help="score at most this many pairs per split")
    p.add_argument("--ece_bins", type=int, default=evaluation.EvalConfig.ece_bins, help="bins of the ECE")
    p.add_argument("--mesh", type=_mesh_shape, default=None, help="mesh shape, e.g. data=-1 (default all on data)")
    p.add_argument("--verbose", action="store_true", help="print the traceback of an error too")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- the checkpoint


@dataclasses.dataclass
class Loaded:
    """A checkpoint on device: ``params`` is one model's tree, or [M, ...] per leaf when ``ids`` is set."""

    kind: str  # 'params', 'hf', 'members' or 'stacked'
    model_cfg: tr.ModelConfig
    graphdef: object
    params: object
    specs: object  # one model's PartitionSpecs
    ids: list[int] | None = None  # member ids of a stack, None for one model


def _specs(model_cfg, mesh):
    _, abstract, axes = tr.abstract_model(model_cfg)
    return sharding.tree_specs(axes, abstract, mesh)


def _member_dirs(directory: str) -> list[str]:
    """The numbered member checkpoints of a directory like rm/members (each with a model.json), sorted by id."""
    numbered = [d for d in os.listdir(directory) if d.isdigit() and os.path.isdir(os.path.join(directory, d))]
    if not numbered or not all(os.path.isfile(os.path.join(directory, d, "model.json")) for d in numbered):
        return []
    return sorted(numbered, key=int)


def _check_member(flag: int | None, ids: list[int], where: str) -> None:
    if flag is not None and flag not in ids:
        raise cli_errors.UserError(f"--member={flag}: {where} has members {ids}")


def load_checkpoint(path: str, mesh, member: int | None = None) -> Loaded:
    """Restores ``path`` (any kind in the module docstring) onto ``mesh``; ``member`` keeps one of a stack."""
    io_utils.recover(path)
    if not os.path.exists(path):
        raise cli_errors.UserError(f"--checkpoint={path}: no such directory")
    if not os.path.isdir(path):
        raise cli_errors.UserError(f"--checkpoint={path}: a file, not a checkpoint directory")
    whole = member is None  # else one member of a stack
    if os.path.isfile(os.path.join(path, "model.json")):
        if not whole:
            raise cli_errors.UserError(f"--member={member}: --checkpoint={path} is one model, not a stack of members")
        model_cfg, graphdef, params, _ = params_io.load_params_checkpoint(path, mesh)
        return Loaded("params", model_cfg, graphdef, params, _specs(model_cfg, mesh))
    if os.path.isfile(os.path.join(path, "config.json")):
        if not whole:
            raise cli_errors.UserError(f"--member={member}: --checkpoint={path} is one model, not a stack of members")
        return _load_hf(path, mesh)
    members = _member_dirs(path)
    if members:
        ids = [int(d) for d in members]
        _check_member(member, ids, path)
        if not whole:  # one member's own checkpoint, not the whole stack
            model_cfg, graphdef, params, _ = params_io.load_params_checkpoint(os.path.join(path, str(member)), mesh)
            return Loaded("params", model_cfg, graphdef, params, _specs(model_cfg, mesh))
        loaded = [params_io.load_params_checkpoint(os.path.join(path, d), mesh) for d in members]
        model_cfg, graphdef = loaded[0][0], loaded[0][1]
        for d, (cfg, *_rest) in zip(members, loaded):
            if cfg != model_cfg:
                raise cli_errors.UserError(
                    f"{os.path.join(path, d)}/model.json: its model differs from member {members[0]}'s; "
                    "a stack needs one architecture"
                )
        specs = _specs(model_cfg, mesh)
        stacked = sharding.stack_members([p for _, _, p, _ in loaded], mesh, specs)
        return Loaded("members", model_cfg, graphdef, stacked, specs, ids)
    if is_stacked(path):
        model_json = find_model_json(path)
        model_cfg = params_io.model_config_from_json(io_utils.read_json(model_json), model_json)
        stacked, _ = checkpoint_averaging.restore_stacked_params(path, mesh, model_cfg)
        graphdef = tr.abstract_model(model_cfg)[0]
        specs = _specs(model_cfg, mesh)
        ids = list(range(jax.tree_util.tree_leaves(stacked)[0].shape[0]))
        _check_member(member, ids, path)
        if not whole:
            return Loaded("stacked", model_cfg, graphdef, ensemble.member_slice(stacked, member, mesh, specs), specs)
        return Loaded("stacked", model_cfg, graphdef, stacked, specs, ids)
    raise cli_errors.UserError(
        f"--checkpoint={path}: not a reward checkpoint (expected model.json + ckpt/, an HF config.json, "
        "numbered member checkpoints or a stacked training checkpoint)"
    )


def _load_hf(path: str, mesh) -> Loaded:
    from warm_jax.models import pretrained

    config_path = os.path.join(path, "config.json")
    config = io_utils.read_json(config_path)
    archs = config.get("architectures") if isinstance(config, dict) else None
    if HF_REWARD_ARCHITECTURE not in (archs or []):
        raise cli_errors.UserError(
            f"{config_path}: architectures {archs} has no reward head ({HF_REWARD_ARCHITECTURE} expected; "
            "export a reward model with python -m warm_jax.export --kind=reward)"
        )
    model_cfg, graphdef, params, _ = pretrained.load_pretrained(path, mesh=mesh)
    return Loaded("hf", model_cfg, graphdef, params, _specs(model_cfg, mesh))


# ----------------------------------------------------------------------------- the data


def find_dataset(path: str) -> str:
    """``path`` when it holds a prepared dataset, else its ``data/`` (a workdir); an error names ``path``."""
    if os.path.isfile(os.path.join(path, builders.METADATA_FILE)):
        return path
    inner = Workdir(path).data
    if os.path.isfile(os.path.join(inner, builders.METADATA_FILE)):
        return inner
    what = "no such directory" if not os.path.exists(path) else f"no {builders.METADATA_FILE} in it or in its data/"
    raise cli_errors.UserError(f"--data={path}: {what} (expected a dataset written by warm_jax.data)")


@dataclasses.dataclass(frozen=True)
class View:
    """A split as reported: the pairs of the read split ``split`` where ``mask`` (bool [N]) holds, all when None;
    ``subsets`` (str [n]) names each reported pair's subset when the dataset names them."""

    split: str
    mask: np.ndarray | None = None
    subsets: np.ndarray | None = None

    def cut(self, x):
        """The reported pairs of ``x`` ([..., N]: rewards of every pair of ``split``)."""
        return x if self.mask is None else np.asarray(x)[..., self.mask]

    def num_pairs(self, n: int) -> int:
        return n if self.mask is None else int(self.mask.sum())


def read_split(dataset_dir: str, split: str, mesh, batch_size: int, max_examples: int | None):
    """One split's pairs, each process reading only its rows (``evaluation.read_split_rows``), and the subset name
    of every pair (str [N]) when the dataset names them (``subsets.json``, written by ``warm-data prepare`` from a
    subset column), else None."""
    rows = evaluation.read_split_rows(dataset_dir, split, mesh, batch_size, max_examples)
    names = builders.load_subsets(dataset_dir, split)
    if names is None:
        return rows, None
    total = pipeline.load_metadata(dataset_dir)["splits"][split]["num_examples"]
    if len(names) != total:
        raise cli_errors.UserError(
            f"{os.path.join(dataset_dir, builders.SUBSETS_FILE)}: split {split!r} names {len(names)} subsets "
            f"for {total} pairs"
        )
    return rows, np.asarray(names)[rows.gathered["index"]]


def eval_splits(
    dataset_dir: str, names: list[str], max_examples: int | None, mesh, batch_size: int
) -> tuple[dict[str, evaluation.SplitRows], dict[str, View]]:
    """The splits to read (each named one) and to report: each named one, and a split with flipped pairs also cut
    in two by its flip mask (``<split>_clean``, ``<split>_corrupted``)."""
    read, views = {}, {}
    for name in names:
        rows, subsets = read_split(dataset_dir, name, mesh, batch_size, max_examples)
        read[name] = rows
        views[name] = View(name, None, subsets)
        flipped = rows.flipped
        if flipped.any():
            for suffix, mask in (("clean", ~flipped), ("corrupted", flipped)):
                views[f"{name}_{suffix}"] = View(name, mask, None if subsets is None else subsets[mask])
    views = {k: v for k, v in views.items() if v.num_pairs(read[v.split].n)}
    return read, views


def _check_vocabulary(splits: dict, model_cfg: tr.ModelConfig, data_flag: str, ckpt_flag: str) -> None:
    """splits: {name: {field: array}} of the pairs this process read; the largest token id of all processes'."""
    from jax.experimental import multihost_utils

    top = max(int(max(d["chosen_tokens"].max(), d["rejected_tokens"].max())) for d in splits.values())
    top = int(np.max(multihost_utils.process_allgather(np.int64(top))))
    if top >= model_cfg.vocab_size:
        raise cli_errors.UserError(
            f"--data={data_flag}: token ids up to {top}, but the model at --checkpoint={ckpt_flag} has "
            f"vocab_size {model_cfg.vocab_size} (a dataset prepared with another tokenizer?)"
        )


# ----------------------------------------------------------------------------- scores


def score(
    loaded: Loaded,
    splits: dict[str, evaluation.SplitRows],
    views: dict[str, View],
    mesh,
    batch_size: int,
    name: str = "model",
) -> dict[str, dict[str, evaluation.RewardPairs]]:
    """{model: {view: (r_chosen [N], r_rejected [N])}}: one model (called ``name``), or each member
    (``member_<id>``), their ENS and their WARM for a stack. Each read split is scored once."""
    scorer = evaluation.Scorer(loaded.graphdef, mesh, batch_size)

    def per_view(score_split):
        scored = {s: score_split(d) for s, d in splits.items()}
        return {v: tuple(view.cut(x) for x in scored[view.split]) for v, view in views.items()}

    if loaded.ids is None:
        return {name: per_view(lambda d: scorer.pairs(loaded.params, d))}
    # The members in one vmapped pass per split, as rm_eval scores them.
    member_r = per_view(lambda d: scorer.stacked_pairs(loaded.params, d))
    out = {f"member_{i}": {s: (rc[k], rr[k]) for s, (rc, rr) in member_r.items()} for k, i in enumerate(loaded.ids)}
    out["ens"] = {s: (rc.mean(0), rr.mean(0)) for s, (rc, rr) in member_r.items()}
    m = len(loaded.ids)
    warm = averaging.mean_stacked(
        loaded.params, jnp.full((m,), 1.0 / m, jnp.float32), out_shardings=sharding.named(mesh, loaded.specs)
    )
    out["warm"] = per_view(lambda d: scorer.pairs(warm, d))
    return out


def pair_metrics(r_c, r_r, bins: int) -> dict:
    """rm_eval's accuracy, BT loss and ECE of one set of pairs, plus reward statistics."""
    r_c, r_r = np.asarray(r_c), np.asarray(r_r)
    return {
        "n": int(len(r_c)),
        **evaluation.split_metrics(r_c, r_r, bins),
        "reward": {
            **evaluation.score_stats(np.concatenate([r_c, r_r])),
            "chosen_mean": float(np.mean(r_c)),
            "rejected_mean": float(np.mean(r_r)),
            "margin_mean": float(np.mean(evaluation.margins(r_c, r_r))),
        },
    }


def measure(rewards: dict, splits: dict, bins: int) -> dict:
    """{model: {split: metrics (+ 'subsets': {name: metrics}, 'length_bias') }} from the rewards of ``score``.

    splits: {split: {SUBSET_FIELD: str [N], LENGTH_GAP: int [N]}}, either field optional: the subset of each pair,
    and its tokens of chosen − rejected (for ``evaluation.length_bias``)."""

    def metrics(rc, rr, gap, keep=slice(None)) -> dict:
        rc, rr = np.asarray(rc)[keep], np.asarray(rr)[keep]
        entry = pair_metrics(rc, rr, bins)
        if gap is not None:
            entry["length_bias"] = evaluation.length_bias(evaluation.margins(rc, rr), np.asarray(gap)[keep])
        return entry

    out: dict = {}
    for model, by_split in rewards.items():
        out[model] = {}
        for s, (rc, rr) in by_split.items():
            gap = splits[s].get(LENGTH_GAP)
            entry = metrics(rc, rr, gap)
            if SUBSET_FIELD in splits[s]:
                names = splits[s][SUBSET_FIELD]
                entry["subsets"] = {str(n): metrics(rc, rr, gap, names == n) for n in sorted(set(names.tolist()))}
            out[model][s] = entry
    return out


def table(metrics: dict) -> str:
    """One row per model, split (and subset): n, acc, loss, ece, reward mean and std, and the margin's correlation
    with the length gap (``len_corr``; blank when not measured or undefined)."""
    head = (
        f"{'model':<12} {'split':<28} {'n':>7} {'acc':>7} {'loss':>7} {'ece':>7} {'r_mean':>8} {'r_std':>7} "
        f"{'len_corr':>8}"
    )
    rows = [head, "-" * len(head)]

    def row(model, split, m):
        r = m["reward"]
        corr = (m.get("length_bias") or {}).get("corr")
        return (
            f"{model:<12} {split:<28} {m['n']:>7d} {m['acc']:>7.4f} {m['loss']:>7.4f} {m['ece']:>7.4f} "
            f"{r['mean']:>8.4f} {r['std']:>7.4f} {'' if corr is None else f'{corr:+.4f}':>8}"
        )

    for model, by_split in metrics.items():
        for s, m in by_split.items():
            rows.append(row(model, s, m))
            for name, sm in m.get("subsets", {}).items():
                rows.append(row(model, f"{s}/{name}", sm))
    return "\n".join(rows)


def evaluate(args) -> dict:
    if args.batch_size < 1:
        raise cli_errors.UserError(f"--batch_size={args.batch_size}: must be at least 1")
    if args.ece_bins < 1:
        raise cli_errors.UserError(f"--ece_bins={args.ece_bins}: must be at least 1")
    if args.output is not None and os.path.isdir(args.output):
        raise cli_errors.UserError(f"--output={args.output}: a directory; name a .json file")
    dataset_dir = find_dataset(args.data)
    meta = pipeline.load_metadata(dataset_dir)
    names = (
        [s for s in args.split.split(",") if s]
        if args.split
        else [s for s, v in meta["splits"].items() if v["num_examples"]]
    )
    unknown = [s for s in names if s not in meta["splits"]]
    if unknown:
        raise cli_errors.UserError(
            f"--split={args.split}: {dataset_dir} has no split {unknown[0]!r}; it has {sorted(meta['splits'])}"
        )
    try:
        mesh = runtime.make_mesh(args.mesh)
    except ValueError as e:
        flag = ",".join(f"{k}={v}" for k, v in (args.mesh or {}).items())
        raise cli_errors.UserError(f"--mesh={flag}: {cli_errors.describe(e)}") from None
    splits, views = eval_splits(dataset_dir, names, args.max_examples, mesh, args.batch_size)
    loaded = load_checkpoint(args.checkpoint, mesh, args.member)
    _check_vocabulary({s: d.data for s, d in splits.items()}, loaded.model_cfg, args.data, args.checkpoint)
    name = "model" if args.member is None else f"member_{args.member}"
    per_pair = {
        v: {LENGTH_GAP: view.cut(splits[view.split].length_gap)}
        | ({} if view.subsets is None else {SUBSET_FIELD: view.subsets})
        for v, view in views.items()
    }
    rewards = score(loaded, splits, views, mesh, args.batch_size, name)
    metrics = measure(rewards, per_pair, args.ece_bins)
    result = {
        "checkpoint": os.path.abspath(args.checkpoint),
        "kind": loaded.kind,
        "member": args.member,
        "members": loaded.ids,
        "data": os.path.abspath(dataset_dir),
        "splits": {v: view.num_pairs(splits[view.split].n) for v, view in views.items()},
        "metrics": metrics,
        "note": "<split>_corrupted accuracy is measured against the flipped (training) labels: higher = more memorisation",
    }
    if args.output is not None and jax.process_index() == 0:
        io_utils.atomic_write_json(args.output, result)
    return result


def _run(args) -> int:
    result = evaluate(args)
    print(table(result["metrics"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return cli_errors.guarded(lambda: _run(args), verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
