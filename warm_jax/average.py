"""Average reward-model checkpoints into one (WARM), or merge them: `python -m warm_jax.average`.

  python -m warm_jax.average --checkpoint=W/rm/members/0 --checkpoint=W/rm/members/3 \\
      [--weights=0.5,0.5] --output=OUT
  python -m warm_jax.average --checkpoint=W/rm/ckpt [--members=0,2,5] --output=OUT
  python -m warm_jax.average --checkpoint=W/rm/ckpt --accuracies=W/rm/eval.json --top_m=6 --output=OUT
  python -m warm_jax.average --method=slerp --base=INIT --checkpoint=A --checkpoint=B [--weights=0.7,0.3] --output=OUT
  python -m warm_jax.average --method=ties --base=INIT --checkpoint=A --checkpoint=B --density=0.2 --output=OUT

``--method`` picks a method of ``warm_jax.merge_methods``: linear (the default: the weighted mean,
weights normalised), slerp (SLERP of the task vectors θ_i − base, t = the second weight's share,
0.5 by default; with more than two members the documented incremental SLERP, which depends on
the members' order), task_arithmetic (base + scaling·Σ w_i δ_i, weights 1 each by default, not
normalised), ties (--density, --scaling) and dare (--density, --scaling, --seed). Every method but
linear needs ``--base``: a params checkpoint directory of the same model (the shared
initialisation). The output's metadata records the method, its parameters and the base.

Member directories (``model.json`` + ``ckpt/``) are streamed one after the other, a ~64 MB group of
leaves at a time (memory: the merged model plus two groups, whatever K); a stacked ensemble
training checkpoint (a directory of step directories, e.g. WORKDIR/rm/ckpt) is read once (its
params only) and reduced over the member axis on device. ``--top_m`` keeps the M members with the
best ``--select_split`` accuracy in ``--accuracies`` (an rm_eval ``eval.json`` or a JSON object
member → accuracy or member → {split: accuracy}). The output is a ``save_params`` checkpoint,
written to a temporary sibling and renamed when complete. Prints a JSON summary to stdout.
Exit 1, with one line on stderr naming the file, field or flag at fault (the traceback too with
``--verbose``), and the output untouched, when members cannot be averaged: bad or missing inputs,
bad --weights, an --output that is a file or one of the inputs. ``--overwrite`` replaces the output
atomically (the old one is removed only once the new one is complete).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from warm_jax import (
    averaging,
    checkpoint_averaging,
    checkpoints,
    cli_errors,
    io_utils,
    merge_methods,
    params_io,
    runtime,
    sharding,
)
from warm_jax.models import transformer as tr
from warm_jax.workdir import Workdir


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _mesh_shape(text: str) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in (p.split("=") for p in text.split(",") if p)}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected axis=size,... (e.g. data=-1,tensor=2), got {text!r}") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m warm_jax.average", description=__doc__.splitlines()[0])
    p.add_argument(
        "--checkpoint",
        action="append",
        required=True,
        help="member directory (repeat for each) or ONE stacked ensemble checkpoint directory",
    )
    p.add_argument("--members", type=_ints, default=None, help="stacked checkpoint: member indices, e.g. 0,2,5")
    p.add_argument("--weights", type=_floats, default=None, help="one non-negative weight per member (normalised)")
    p.add_argument("--accuracies", default=None, help="JSON of member accuracies (eval.json or member → acc)")
    p.add_argument("--select_split", default="validation", help="split whose accuracy ranks members")
    p.add_argument("--top_m", type=int, default=None, help="average the M best members by --select_split")
    p.add_argument(
        "--model_json",
        default=None,
        help="stacked checkpoint: model.json to build the model from (default: found beside it)",
    )
    p.add_argument("--method", default="linear", help="merge method: " + ", ".join(sorted(merge_methods.MERGE_METHODS)))
    p.add_argument("--base", default=None, help="params checkpoint the task vectors start from (all but linear)")
    p.add_argument("--density", type=float, default=None, help="ties/dare: fraction of each task vector kept")
    p.add_argument("--scaling", type=float, default=None, help="task_arithmetic/ties/dare: λ on the merged task vector")
    p.add_argument("--seed", type=int, default=None, help="dare: seed of the drop masks (default 0)")
    p.add_argument("--mesh", type=_mesh_shape, default=None, help="mesh shape, e.g. data=-1 (default all on data)")
    p.add_argument("--output", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory (atomically)")
    p.add_argument("--verbose", action="store_true", help="print the traceback of an error too")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- inputs


def is_stacked(directory: str) -> bool:
    """A Checkpointer directory (numbered step directories) without a model.json."""
    if os.path.isfile(os.path.join(directory, "model.json")) or not os.path.isdir(directory):
        return False
    return any(d.isdigit() for d in os.listdir(directory))


def stacked_member_metas(ckpt_dir: str, names: list[str]) -> dict[str, dict]:
    """The model.json of each named member exported beside a stacked WORKDIR/rm/ckpt (rm/members/<n>),
    for those that have one."""
    members = os.path.join(os.path.dirname(os.path.abspath(ckpt_dir)), "members")
    paths = {n: os.path.join(members, n, "model.json") for n in names}
    return {f"{ckpt_dir}[{n}]": io_utils.read_json(p) for n, p in paths.items() if os.path.isfile(p)}


def find_model_json(ckpt_dir: str) -> str:
    """model.json for a stacked WORKDIR/rm/ckpt: a member export beside it, else the pretrained model's."""
    rm_dir = os.path.dirname(os.path.abspath(ckpt_dir))
    members = os.path.join(rm_dir, "members")
    if os.path.isdir(members):
        for d in sorted(os.listdir(members)):
            if os.path.isfile(os.path.join(members, d, "model.json")):
                return os.path.join(members, d, "model.json")
    pretrained = Workdir(os.path.dirname(rm_dir)).pretrain_model_json
    if os.path.isfile(pretrained):
        return pretrained
    raise averaging.MergeError(f"{ckpt_dir}: no model.json found in {members}/* or at {pretrained}; pass --model_json")


def load_accuracies(path: str, split: str) -> dict[str, float]:
    """member name → accuracy on ``split`` from an rm_eval eval.json or a plain JSON object."""
    data = io_utils.read_json(path)
    if isinstance(data, dict) and "rm" in data:  # rm_eval's eval.json
        try:
            data = {str(m["id"]): m["acc"] for m in data["rm"]["members"]}
        except (KeyError, TypeError) as e:
            raise averaging.MergeError(
                f"{path}: field 'rm.members' must list {{'id', 'acc'}} objects ({e!r})"
            ) from None
    if not isinstance(data, dict):
        raise averaging.MergeError(f"{path}: expected a JSON object member → accuracy, got {type(data).__name__}")
    out = {}
    for name, v in data.items():
        if isinstance(v, dict):
            if split not in v:
                raise averaging.MergeError(
                    f"{path}: member {name!r} has no accuracy for split {split!r} (has {sorted(v)})"
                )
            v = v[split]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise averaging.MergeError(f"{path}: member {name!r}: accuracy {v!r} is not a finite number")
        out[str(name)] = float(v)
    return out


def _select(names: list[str], args) -> tuple[list[int], dict[str, float] | None]:
    """Indices into ``names`` to average (all, or the --top_m best), and the accuracies used."""
    if args.accuracies is None:
        if args.top_m is not None:
            raise averaging.MergeError("--top_m needs --accuracies")
        return list(range(len(names))), None
    acc = load_accuracies(args.accuracies, args.select_split)
    missing = [n for n in names if n not in acc]
    if missing:
        raise averaging.MergeError(f"{args.accuracies}: no accuracy for member(s) {missing}")
    if args.top_m is None:
        return list(range(len(names))), {n: acc[n] for n in names}
    if args.weights is not None:
        raise averaging.MergeError("--weights and --top_m cannot be combined")
    if not 1 <= args.top_m <= len(names):
        raise averaging.MergeError(f"--top_m={args.top_m} must be between 1 and the number of members ({len(names)})")
    return averaging.select_top_m([acc[n] for n in names], args.top_m), {n: acc[n] for n in names}


def check_weights(weights: list[float] | None, k: int) -> None:
    """--weights: one finite, non-negative weight per member, not all zero, with a finite sum."""
    if weights is None:
        return
    flag = "--weights=" + ",".join(f"{x:g}" for x in weights)
    if len(weights) != k:
        raise cli_errors.UserError(f"{flag}: {len(weights)} weight(s) for {k} member(s)")
    bad = [x for x in weights if not math.isfinite(x) or x < 0]
    if bad:
        raise cli_errors.UserError(f"{flag}: every weight must be a finite number >= 0 (not {bad[0]:g})")
    if sum(weights) == 0:
        raise cli_errors.UserError(f"{flag}: the weights are all zero")
    if not math.isfinite(sum(weights)):
        raise cli_errors.UserError(f"{flag}: the weights' sum overflows to infinity; scale them down")


def check_method(args) -> tuple[merge_methods.MergeMethod, dict, dict]:
    """(method, its parameters with defaults, the parameters to record) from --method, --base,
    --density, --scaling and --seed: one line naming the flag when they do not fit together."""
    try:
        method = merge_methods.get_merge_method(args.method)
    except ValueError as e:
        raise cli_errors.UserError(f"--method={args.method}: {e}") from None
    given = {k: v for k, v in (("density", args.density), ("scaling", args.scaling)) if v is not None}
    takes = ", ".join(f"--{k}" for k in sorted(method.defaults)) or "no parameters"
    for name, value in given.items():
        if name not in method.defaults:
            raise cli_errors.UserError(
                f"--{name}={value:g} does not apply to --method={method.name} (it takes {takes})"
            )
    try:
        params = method.resolve_params(given)
    except ValueError as e:
        flag = " ".join(f"--{k}={v:g}" for k, v in given.items())
        raise cli_errors.UserError(f"{flag}: {e}") from None
    if args.seed is not None and not method.needs_key:
        raise cli_errors.UserError(f"--seed={args.seed} applies to --method=dare only, not --method={method.name}")
    if method.needs_base and args.base is None:
        raise cli_errors.UserError(
            f"--method={method.name} needs --base=DIR: the params checkpoint its members were fine-tuned from "
            "(task vectors are member − base)"
        )
    if not method.needs_base and args.base is not None:
        raise cli_errors.UserError(f"--base={args.base}: --method={method.name} uses no base")
    recorded = dict(params)
    if method.needs_key:
        recorded["seed"] = 0 if args.seed is None else args.seed
    return method, params, recorded


def check_paths(args) -> str:
    """The resolved --output, refused up front when it is, contains or lies inside one of the
    --checkpoint (or --base) inputs (symlinks and relative paths resolved), when it is a file, or
    when it exists without --overwrite."""
    output = os.path.realpath(args.output)
    inputs = [("--checkpoint", c) for c in args.checkpoint] + ([("--base", args.base)] if args.base else [])
    for flag, ckpt in inputs:
        io_utils.recover(ckpt)
        if not os.path.exists(ckpt):
            raise cli_errors.UserError(f"{flag}={ckpt}: no such directory")
        if not os.path.isdir(ckpt):
            raise cli_errors.UserError(f"{flag}={ckpt}: a file, not a checkpoint directory")
        real = os.path.realpath(ckpt)
        if real == output:
            why = f"is the same directory ({real}): the merge would replace its own input"
        elif real.startswith(output + os.sep):
            why = f"contains it ({real}): replacing --output would delete that input"
        elif output.startswith(real + os.sep):
            why = f"lies inside it ({real}): the merge would be written into its own input"
        else:
            continue
        raise cli_errors.UserError(
            f"--output={args.output} and {flag}={ckpt}: the output {why}; choose another --output"
        )
    if args.base is not None and is_stacked(args.base):
        raise cli_errors.UserError(
            f"--base={args.base}: a stacked training checkpoint; --base takes a params checkpoint (model.json + ckpt/)"
        )
    return io_utils.output_directory(args.output, overwrite=args.overwrite)


def _method_weights(method: merge_methods.MergeMethod, weights: list[float] | None, k: int) -> np.ndarray:
    """[k] weights as the method uses them: linear's normalised, the others' as given (their
    default when None: 1 each)."""
    if method.name == "linear":
        return averaging.normalize_weights(weights, k)
    return method.default_weights(k).astype(np.float64) if weights is None else np.asarray(weights, np.float64)


# ----------------------------------------------------------------------------- main


def average(args) -> dict:
    method, params_kw, recorded = check_method(args)
    output = check_paths(args)
    key = jax.random.key(recorded["seed"]) if method.needs_key else None
    try:
        mesh = runtime.make_mesh(args.mesh)
    except ValueError as e:
        mesh_flag = ",".join(f"{k}={v}" for k, v in (args.mesh or {}).items())
        raise cli_errors.UserError(f"--mesh={mesh_flag}: {cli_errors.describe(e)}") from None
    stacked = [d for d in args.checkpoint if is_stacked(d)]
    t0 = time.perf_counter()
    if stacked:
        if len(args.checkpoint) != 1:
            raise averaging.MergeError(f"a stacked checkpoint ({stacked[0]}) must be the only --checkpoint")
        ckpt_dir = args.checkpoint[0]
        model_json = args.model_json or find_model_json(ckpt_dir)
        meta = io_utils.read_json(model_json)
        model_cfg = params_io.model_config_from_json(meta, model_json)
        params_m, step = checkpoint_averaging.restore_stacked_params(ckpt_dir, mesh, model_cfg)
        m = jax.tree_util.tree_leaves(params_m)[0].shape[0]
        ids = args.members if args.members is not None else list(range(m))
        bad = [i for i in ids if not 0 <= i < m]
        if bad or len(set(ids)) != len(ids):
            raise averaging.MergeError(f"--members={ids}: indices must be distinct and in [0, {m}) for {ckpt_dir}")
        names = [str(i) for i in ids]
        chosen, accs = _select(names, args)
        names = [names[i] for i in chosen]
        check_weights(args.weights, len(names))
        w = _method_weights(method, args.weights, len(names))
        full = np.zeros(m, np.float32)
        full[[int(n) for n in names]] = w
        base_sha = None
        if method.name == "linear":
            _, abstract, axes = tr.abstract_model(model_cfg)
            single = sharding.named(mesh, sharding.tree_specs(axes, abstract, mesh))
            params = averaging.mean_stacked(params_m, jnp.asarray(full), out_shardings=single)
        else:
            checkpoint_averaging.check_one_featurizer(stacked_member_metas(ckpt_dir, names), method.name)
            checkpoint_averaging.check_configs(
                {
                    model_json: meta["model"],
                    f"{args.base}/model.json": checkpoint_averaging.read_model_json(args.base)["model"],
                }
            )
            _, _, base_params, _ = params_io.load_params_checkpoint(args.base, mesh)
            base_sha = checkpoints.tree_sha256(base_params)
            # Members left out weigh 0 (no part in any method's merge); a member keeps its index in
            # the stack, which keys its dare masks.
            params = merge_methods.merge_stacked(
                params_m, method=method.name, base=base_params, weights=full, key=key, **params_kw
            )
            del base_params
        hashes = {n: checkpoints.tree_sha256(jax.tree.map(lambda x, i=int(n): x[i], params_m)) for n in names}
        del params_m
        members, tokenizer = [f"{ckpt_dir}@{step}[{n}]" for n in names], meta.get("tokenizer")
        hashes = {f"{ckpt_dir}@{step}[{n}]": h for n, h in hashes.items()}
    else:
        if args.members is not None:
            raise averaging.MergeError("--members selects from a stacked checkpoint; list member directories instead")
        if args.model_json is not None:
            raise averaging.MergeError(
                f"--model_json={args.model_json} applies to a stacked checkpoint; member directories have their own"
            )
        dirs = list(args.checkpoint)
        chosen, accs = _select([os.path.basename(os.path.normpath(d)) for d in dirs], args)
        dirs = [dirs[i] for i in chosen]
        check_weights(args.weights, len(dirs))
        model_cfg, _, params, info = checkpoint_averaging.merge_checkpoints(
            dirs, mesh=mesh, method=method.name, base=args.base, weights=args.weights, key=key, params=params_kw
        )
        members, w, hashes, base_sha = info["members"], info["weights"], info["hashes"], info["base_sha256"]
        tokenizer = info["meta"][dirs[0]].get("tokenizer")
    t_avg = time.perf_counter() - t0
    checkpoint_averaging.write_merged(
        output,
        params,
        model_cfg=model_cfg,
        members=members,
        weights=[float(x) for x in w],
        accuracies=accs,
        hashes=hashes,
        tokenizer_dir=tokenizer,
        method=method.name,
        method_params=recorded,
        base=args.base,
        base_sha256=base_sha,
    )
    summary = {
        "output": output,
        "method": method.name,
        "params": recorded,
        "base": args.base,
        "members": members,
        "weights": [float(x) for x in w],
        "sha256": io_utils.read_json(os.path.join(output, "model.json"))["merge"]["sha256"],
        "average_s": round(t_avg, 3),
        "total_s": round(time.perf_counter() - t0, 3),
    }
    if method.name == "slerp" and len(members) != 2:
        summary["note"] = (
            f"slerp of {len(members)} members: incremental SLERP m_k = slerp(m_k-1, delta_k, w_k / (w_1 + ... + w_k)), "
            "which depends on the members' order (warm_jax.merge_methods)"
        )
    return summary


def _run(args) -> int:
    out = average(args)
    json.dump(out, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return cli_errors.guarded(lambda: _run(args), verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
