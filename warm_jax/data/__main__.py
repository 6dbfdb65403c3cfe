"""Preference dataset CLI.

  warm-data prepare --format={builtin,tldr,hh,jsonl,hf} --input=PATH --output=DIR --tokenizer=TOK
  warm-data show DIR
  (or python -m warm_jax.data ...)

`prepare` writes a TFDS dataset directory (see `warm_jax.data.builders`); bad input stops it with a message naming
file, line and field, exit status 1 and nothing at DIR, unless --skip_invalid (then bad records are counted; an input
file left with no valid record still stops it). Every failure is one line on stderr; --verbose adds the traceback.
`--format=builtin` asks `warm_jax.task.builtin_pairs.generate_splits` for the built-in task's pairs (the CLI is an
entry point: the data library itself imports no task module);
`--builtin_option KEY=VALUE` (repeatable, values parsed as JSON when they parse) are passed to it as keywords,
together with ``input_path`` (--input, may be omitted) and ``seed``.
`--format=hf` reads Hugging Face ``datasets`` tables (Parquet files, Arrow ``save_to_disk`` folders, JSON lines) with
TRL's ``chosen``/``rejected``/``prompt`` columns (see `warm_jax.data.hf_tables`); conversations are rendered with
--chat_template (a .gguf, tokenizer_config.json, .jinja or a folder holding one, or 'default'), by default the
tokenizer's own template, else the built-in one (`warm_jax.data.chat_template`). `show` prints the texts of such a
dataset as stored, chat template applied (decoding tokens would drop the template's special tokens).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from warm_jax import cli_errors
from warm_jax.data import builders
from warm_jax.data import pipeline
from warm_jax.data import preference as pref

FORMATS = ("builtin", "tldr", "hh", "jsonl", "hf")
# Flips are the built-in task's corruption study (the paper swaps 25% of training labels); real data is kept as is
# unless asked.
DEFAULT_FLIP = {"builtin": 0.25, "tldr": 0.0, "hh": 0.0, "jsonl": 0.0, "hf": 0.0}


class CliError(cli_errors.UserError):
    """A problem with the command line or its environment; printed without a traceback."""


def _check_flags(args: argparse.Namespace) -> None:
    """Every numeric option in range, before anything is read or written; the error names the flag."""
    checks = []
    if args.command == "prepare":
        checks = [
            ("--max_prompt_len", args.max_prompt_len, lambda v: v >= 1, "a positive integer"),
            ("--max_response_len", args.max_response_len, lambda v: v >= 1, "a positive integer"),
            ("--seed", args.seed, lambda v: v >= 0, "a non-negative integer"),
            ("--flip_fraction", args.flip_fraction, lambda v: v is None or 0.0 <= v <= 1.0, "a number in [0, 1]"),
            ("--validation_fraction", args.validation_fraction, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
        ]
    elif args.command == "show":
        checks = [("--num_examples", args.num_examples, lambda v: v >= 0, "a non-negative integer")]
    for flag, value, ok, want in checks:
        if (isinstance(value, float) and math.isnan(value)) or not ok(value):
            raise CliError(f"{flag}={value} is out of range: expected {want}")


def _load_tokenizer(path: str | os.PathLike) -> pref.TokenizerLike:
    try:
        from warm_jax.data.tokenizers import load_tokenizer  # pylint: disable=g-import-not-at-top
    except ImportError as e:
        raise CliError(f"cannot load tokenizer {path}: warm_jax.data.tokenizers is not available ({e})") from e
    return load_tokenizer(path)


def _builtin_options(items: Sequence[str]) -> dict[str, Any]:
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"--builtin_option {item!r} is not KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _prepare(args: argparse.Namespace) -> dict[str, Any]:
    if args.tokenizer is None:
        raise CliError("--tokenizer is required: the dataset is tokenised with the model's tokenizer")
    if args.format != "builtin" and args.input is None:
        raise CliError(f"--input is required for --format={args.format}")
    if args.chat_template is not None and args.format != "hf":
        raise CliError(f"--chat_template applies to --format=hf only, not --format={args.format}")
    builders.check_output(args.output, overwrite=args.overwrite)  # before any (long) reading or sampling
    tokenizer = _load_tokenizer(args.tokenizer)
    least = 1 + len(pref.bos_ids(tokenizer))
    if args.max_prompt_len < least:
        raise CliError(
            f"--max_prompt_len={args.max_prompt_len} leaves no room for the prompt after the tokenizer's BOS token; "
            f"use at least {least}"
        )
    flip = DEFAULT_FLIP[args.format] if args.flip_fraction is None else args.flip_fraction
    common = dict(
        tokenizer=tokenizer,
        max_prompt_len=args.max_prompt_len,
        max_response_len=args.max_response_len,
        flip_fraction=flip,
        seed=args.seed,
        skip_invalid=args.skip_invalid,
        overwrite=args.overwrite,
    )
    if args.format == "builtin":
        try:
            builtin_pairs = importlib.import_module("warm_jax.task.builtin_pairs")
        except ModuleNotFoundError as e:
            raise CliError(
                "--format=builtin needs warm_jax.task.builtin_pairs.generate_splits (the built-in task's "
                f"pair generation), which is not available: {e}"
            ) from e
        splits = builtin_pairs.generate_splits(
            input_path=args.input, seed=args.seed, **_builtin_options(args.builtin_option)
        )
        return builders.write_preference_dataset(
            args.output, splits, source="builtin", source_files=[args.input] if args.input else [], **common
        )
    if args.format == "hf":
        from warm_jax.data import chat_template  # pylint: disable=g-import-not-at-top

        common["chat_template"] = chat_template.resolve(args.chat_template, args.tokenizer)
    return builders.prepare_dataset(
        args.format, args.input, args.output, validation_fraction=args.validation_fraction, **common
    )


def _fmt_stats(stats: dict[str, Any]) -> str:
    return (
        f"mean {stats['mean']:.1f}  min {stats['min']}  p50 {stats['p50']:.0f}  p95 {stats['p95']:.0f}  "
        f"max {stats['max']}"
    )


def _clip(text: str, width: int = 300) -> str:
    text = text if len(text) <= width else text[: width // 2] + " [...] " + text[-width // 2 :]
    return textwrap.indent(text, "      ")


def show(
    dataset_dir: str | os.PathLike,
    *,
    num_examples: int = 3,
    split: str | None = None,
    tokenizer: pref.TokenizerLike | None = None,
) -> str:
    """A text summary: examples per split, flip fractions, lengths, skipped records, decoded examples.

    Examples are decoded from their stored tokens with `tokenizer` (by default the one saved in the dataset, when
    `warm_jax.data.tokenizers` can load it), so they show what the model sees; otherwise the stored texts are shown.
    A dataset whose texts were rendered with a chat template always shows the stored texts: decoding drops the
    special tokens that the template's markup is made of.
    """
    meta = pipeline.load_metadata(dataset_dir)
    if not meta["splits"]:
        raise CliError(f"{dataset_dir}: the dataset has no splits (nothing was written to it); prepare it again")
    if split is not None and split not in meta["splits"]:
        raise CliError(f"{dataset_dir} has no split '{split}'; it has {sorted(meta['splits'])}")
    split = split or ("train" if "train" in meta["splits"] else next(iter(meta["splits"])))
    if meta["splits"][split]["num_examples"] == 0:
        raise CliError(f"{dataset_dir}: split '{split}' has no examples; prepare the dataset again")
    lines = [
        f"dataset {dataset_dir}",
        f"  source: {meta['source']}  files: {len(meta['source_files'])}",
        f"  tokenizer: {meta['tokenizer']}",
        f"  max_prompt_len {meta['max_prompt_len']}  max_response_len {meta['max_response_len']}  "
        f"seq_len {meta['seq_len']}",
    ]
    for name, s in meta["splits"].items():
        lines += [
            f"  split {name}: {s['num_examples']} examples, {s['num_flipped']} flipped "
            f"({100 * s['flip_fraction']:.2f}%, configured {100 * s['configured_flip_fraction']:.2f}%)"
        ]
        lines += [
            f"    {key:16s} {_fmt_stats(s[key])}" for key in ("prompt_length", "chosen_length", "rejected_length")
        ]
        identical = s.get("num_identical_after_truncation")  # datasets written before such pairs were refused
        lines += [
            f"    truncated: {s['num_truncated']}" + (f"  identical after truncation: {identical}" if identical else "")
        ]
        if s.get("subset_counts"):
            lines += [f"    subsets: {s['subset_counts']}"]
    skipped = meta["skipped"]
    lines += [f"  skipped records: {skipped['total']} {skipped['by_reason'] if skipped['total'] else ''}".rstrip()]
    lines += [f"    {m}" for m in skipped["first_messages"][:5]]
    template = meta.get("extra", {}).get("chat_template")
    templated = bool(template and template.get("rows_rendered"))
    if template:
        lines += [
            f"  chat template: {template['source']} (sha256 {template['sha256'][:12]}), applied to "
            f"{template['rows_rendered']} of {template['rows_rendered'] + template['rows_plain']} records read"
        ]
    if templated:
        tokenizer = None  # the stored texts hold the template's special tokens, which decoding drops
    elif tokenizer is None and meta["tokenizer_dir"]:
        try:
            tokenizer = _load_tokenizer(Path(dataset_dir) / builders.TOKENIZER_DIR)
        except cli_errors.expected_errors() as e:
            lines += [f"  (saved tokenizer not loaded, showing stored texts: {cli_errors.describe(e)})"]
    source = pipeline.load_split(dataset_dir, split)
    how = "decoded from tokens" if tokenizer is not None else "stored text"
    how = "stored text, chat template applied" if templated else how
    lines += [f"  {min(num_examples, len(source))} examples from '{split}' ({how}):"]
    for i in range(min(num_examples, len(source))):
        ex = source[i]
        lines += [
            f"  [{i}] flipped={bool(ex['flipped'])} prompt_length={int(ex['prompt_length'])} "
            f"chosen_length={int(ex['chosen_length'])} rejected_length={int(ex['rejected_length'])}"
        ]
        if tokenizer is not None:
            p = int(ex["prompt_length"])
            parts = {
                "prompt": ex["chosen_tokens"][:p],
                "chosen": ex["chosen_tokens"][p : int(ex["chosen_length"])],
                "rejected": ex["rejected_tokens"][p : int(ex["rejected_length"])],
            }
            texts = {k: tokenizer.decode([int(t) for t in v]) for k, v in parts.items()}
        else:
            texts = {k: ex[k].decode("utf-8") for k in ("prompt", "chosen", "rejected")}
        for key, text in texts.items():
            lines += [f"    {key}:", _clip(text)]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    prog = "warm-data" if os.path.basename(sys.argv[0]) == "warm-data" else "python -m warm_jax.data"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="write a preference dataset")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument(
        "--input",
        help="file or directory of JSON lines; for hf a Parquet/Arrow/JSON-lines file, a save_to_disk folder or a "
        "folder of Parquet files (builtin: passed to generate_splits)",
    )
    p.add_argument("--output", required=True, help="dataset directory to create")
    p.add_argument("--tokenizer", help="tokenizer path, as warm_jax.data.tokenizers.load_tokenizer takes it")
    p.add_argument("--max_prompt_len", type=int, default=256)
    p.add_argument("--max_response_len", type=int, default=64)
    p.add_argument(
        "--flip_fraction",
        type=float,
        default=None,
        help="fraction of train labels swapped (default 0.25 for builtin, 0 otherwise)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--validation_fraction",
        type=float,
        default=0.05,
        help="share of train held out as validation when the input has no validation split",
    )
    p.add_argument("--skip_invalid", action="store_true", help="skip and count bad records instead of failing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --output")
    p.add_argument("--builtin_option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--chat_template",
        default=None,
        metavar="PATH|default",
        help="hf only: template for chat-message columns: a .gguf, tokenizer_config.json, .jinja or a folder holding "
        "one; 'default' for the built-in one; omitted: the tokenizer's own, else the built-in one",
    )
    s = sub.add_parser("show", help="summarise a dataset")
    s.add_argument("dataset_dir")
    s.add_argument("--split", default=None)
    s.add_argument("--num_examples", type=int, default=3)
    for p in (parser, *sub.choices.values()):
        # Accepted before or after the command; a subcommand's default must not reset the top-level flag.
        p.add_argument(
            "--verbose",
            action="store_true",
            default=False if p is parser else argparse.SUPPRESS,
            help="show the Python traceback of a failure",
        )
    return parser


def _run(args: argparse.Namespace) -> None:
    _check_flags(args)
    if args.command == "prepare":
        meta = _prepare(args)
        counts = {k: v["num_examples"] for k, v in meta["splits"].items()}
        print(f"wrote {args.output}: {counts}; skipped {meta['skipped']['total']}")
    else:
        print(show(args.dataset_dir, num_examples=args.num_examples, split=args.split))


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    return cli_errors.guarded(lambda: _run(args), verbose=args.verbose or cli_errors.verbose_requested(argv))


if __name__ == "__main__":
    sys.exit(main())
