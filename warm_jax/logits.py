"""Logits of a text under a pretrained model, for parity checks against other implementations.

    python -m warm_jax.logits --model=smollm2-135m --text="The capital of France is" --output=/tmp/l.npy

``--model`` is a name known to ``warm_jax.models.pretrained`` or a HF-format Llama directory. The text is
tokenised by the model's own tokenizer (BOS in front only when the tokenizer config says so); the token
ids are printed as JSON and the float32 logits ``[T, vocab]`` are written to ``--output``. With
``--greedy=N`` the N-token greedy continuation is printed too.

Every forward runs at one padded length (a multiple of ``PAD_MULTIPLE``), right-padded with a zero mask:
the causal mask keeps padding from touching earlier positions, and greedy decoding by repeated full
forwards then needs a single compile.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from warm_jax import cli_errors
from warm_jax.models import transformer as tr

PAD_MULTIPLE = 64

Forward = Callable[[dict, jax.Array, jax.Array], jax.Array]


def make_forward(graphdef) -> Forward:
    """Jitted ``(params, tokens [B, L] int32, mask [B, L]) -> logits [B, L, V] float32``."""
    return jax.jit(lambda params, tokens, mask: tr.bind(graphdef, params)(tokens, mask))


def padded_length(n: int) -> int:
    """The bucketed forward length for ``n`` tokens."""
    return max(PAD_MULTIPLE, -(-n // PAD_MULTIPLE) * PAD_MULTIPLE)


def batch_logits(
    forward: Forward, params, rows: Sequence[Sequence[int]], *, length: int | None = None
) -> list[np.ndarray]:
    """float32 logits ``[T_i, V]`` of each row of token ids (one batched forward at ``length`` columns)."""
    rows = [list(r) for r in rows]
    if not rows or not all(rows):
        raise ValueError("batch_logits: every row needs at least one token (empty text and no BOS?)")
    longest = max(len(r) for r in rows)
    length = padded_length(longest) if length is None else length
    if longest > length:
        raise ValueError(f"batch_logits: {longest} tokens exceed the forward length {length}")
    tokens = np.zeros((len(rows), length), np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
        mask[i, : len(r)] = 1
    logits = np.asarray(forward(params, jnp.asarray(tokens), jnp.asarray(mask)), np.float32)
    return [logits[i, : len(r)] for i, r in enumerate(rows)]


def text_logits(forward: Forward, params, ids: Sequence[int], *, length: int | None = None) -> np.ndarray:
    """float32 logits ``[T, V]`` of the token ids ``[T]``."""
    return batch_logits(forward, params, [ids], length=length)[0]


def greedy_continuations(
    forward: Forward, params, rows: Sequence[Sequence[int]], num_tokens: int, *, length: int | None = None
) -> list[list[int]]:
    """``num_tokens`` greedy next-token ids after each row (no stop at EOS: fixed length, for parity).

    Rows advance together, one batched forward per token, all at one compiled length.
    """
    rows = [list(r) for r in rows]
    length = padded_length(max(len(r) for r in rows) + num_tokens) if length is None else length
    outs: list[list[int]] = [[] for _ in rows]
    for _ in range(num_tokens):
        logits = batch_logits(forward, params, [r + o for r, o in zip(rows, outs)], length=length)
        for o, lg in zip(outs, logits):
            o.append(int(np.argmax(lg[-1])))
    return outs


def _load(args):
    """(graphdef, params, tokenizer) of --model; a failure names --model (and the file, where known)."""
    from safetensors import SafetensorError

    from warm_jax.models.pretrained import load_pretrained

    try:
        _, graphdef, params, tokenizer = load_pretrained(args.model, dtype=args.dtype, param_dtype=args.dtype)
    except (*cli_errors.expected_errors(), SafetensorError) as e:
        msg = cli_errors.describe(e)
        raise cli_errors.UserError(msg if args.model in msg else f"--model={args.model}: {msg}") from e
    return graphdef, params, tokenizer


def run(args) -> int:
    try:
        if not jnp.issubdtype(jnp.dtype(args.dtype), jnp.floating):
            raise TypeError
    except TypeError:
        raise cli_errors.UserError(
            f"--dtype={args.dtype}: not a floating-point dtype (e.g. float32, bfloat16)"
        ) from None
    if args.greedy < 0:
        raise cli_errors.UserError(f"--greedy={args.greedy}: must be >= 0")
    out = args.output if args.output.endswith(".npy") else args.output + ".npy"
    if os.path.isdir(out):
        raise cli_errors.UserError(f"--output={args.output}: {out} is a directory")
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise cli_errors.UserError(
            f"--output={args.output}: directory {os.path.dirname(os.path.abspath(out))} does not exist"
        )
    graphdef, params, tokenizer = _load(args)
    ids = tokenizer.encode_prompt(args.text)
    if not ids:
        raise cli_errors.UserError(f"--text={args.text!r}: no tokens (empty text, and the tokenizer adds no BOS)")
    forward = make_forward(graphdef)
    length = padded_length(len(ids) + args.greedy)
    logits = text_logits(forward, params, ids, length=length)
    # np.save appends .npy itself; write beside the target and rename so no half-written file is left.
    tmp = out[: -len(".npy")] + ".tmp.npy"
    try:
        np.save(tmp, logits)
        os.replace(tmp, out)
    except BaseException:
        if os.path.isfile(tmp):
            os.remove(tmp)
        raise
    report = {"token_ids": ids, "shape": list(logits.shape), "output": out}
    if args.greedy:
        report["greedy_ids"] = greedy_continuations(forward, params, [ids], args.greedy, length=length)[0]
        report["greedy_text"] = tokenizer.decode(report["greedy_ids"])
    print(json.dumps(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m warm_jax.logits", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="'smollm2-135m' or a HF-format Llama directory")
    parser.add_argument("--text", required=True, help="text to score")
    parser.add_argument("--output", required=True, help="where to write the float32 logits [T, vocab] (.npy)")
    parser.add_argument("--dtype", default="float32", help="parameter/activation dtype (default float32)")
    parser.add_argument("--greedy", type=int, default=0, help="also print this many greedy continuation ids")
    parser.add_argument("--verbose", action="store_true", help="print the traceback of an error too")
    args = parser.parse_args(argv)
    return cli_errors.guarded(lambda: run(args), verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
