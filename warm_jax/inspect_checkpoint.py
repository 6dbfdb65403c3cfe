"""Describe a checkpoint without knowing the model: `python -m warm_jax.inspect_checkpoint CKPT_DIR [--step N]`.

Prints one JSON object to stdout:
  {"directory", "steps": [...], "step": N, "leaves": [{"path", "shape", "dtype"}, ...],
   "param_count": elements of the leaves under a "params" key (all leaves if there is none),
   "sha256": tree_sha256 of the restored state, "verified": whether the manifest check ran and passed,
   "meta": the step's meta item or null}
The state is read from the checkpoint's own metadata onto one local CPU device, whatever mesh wrote it.
A params checkpoint (``model.json`` + ``ckpt/``) is described through its ``ckpt/``. Exit code 1, with one
line on stderr naming the directory (the traceback too with ``--verbose``), for a missing directory, a file,
a directory without finished steps, an unknown step or a step that does not match its manifest.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import numpy as np

from warm_jax import checkpoints, cli_errors, io_utils


def param_count(leaves: list[tuple[str, Any]]) -> int:
    """Elements of the leaves with a 'params' path component, or of all leaves if none has one."""
    params = [x for path, x in leaves if "params" in path.split("/")]
    return int(sum(int(np.prod(np.shape(x))) for x in (params or [x for _, x in leaves])))


def describe(directory: str, step: int | None = None) -> dict[str, Any]:
    """The JSON-able description of one step of the checkpoint directory `directory` (default: latest)."""
    io_utils.recover(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise checkpoints.CheckpointError(f"{directory}: a file, not a checkpoint directory")
    if os.path.isfile(os.path.join(directory, "model.json")) and os.path.isdir(os.path.join(directory, "ckpt")):
        directory = os.path.join(directory, "ckpt")  # a params checkpoint: its Orbax directory
    ckpt = checkpoints.Checkpointer(directory, read_only=True, async_save=False)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise checkpoints.CheckpointError(f"{ckpt.directory}: no finished checkpoint steps")
        state, _, step = ckpt.restore(None, step=step)
        leaves = checkpoints.named_leaves(state)
        return {
            "directory": str(ckpt.directory),
            "steps": steps,
            "step": step,
            "leaves": [{"path": p, "shape": list(np.shape(x)), "dtype": str(x.dtype)} for p, x in leaves],
            "param_count": param_count(leaves),
            "sha256": checkpoints.tree_sha256(state),
            "verified": ckpt.verify,
            "meta": ckpt.restore_meta(step),
        }
    finally:
        ckpt.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m warm_jax.inspect_checkpoint", description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="checkpoint directory (the parent of the step directories)")
    parser.add_argument("--step", type=int, default=None, help="step to describe (default: latest that verifies)")
    parser.add_argument("--verbose", action="store_true", help="print the traceback of an error too")
    args = parser.parse_args(argv)

    def run() -> int:
        out = describe(args.directory, args.step)
        json.dump(out, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0

    return cli_errors.guarded(run, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
