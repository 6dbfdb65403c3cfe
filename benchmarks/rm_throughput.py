"""Reward-model training throughput: warm_jax's ensemble step (M=1) vs TRL's RewardTrainer, same run.

    python benchmarks/rm_throughput.py [--cases=smollm2_135m,tiny] [--reps=3] [--output=rm.json]

Like for like: the same Llama shape (random weights; nothing downloaded), float32, the same batch
(``--pairs`` pairs = 2·pairs sequences of ``--seq`` tokens, no padding), the Bradley–Terry loss,
AdamW behind a global-norm clip at 1.0, learning rate 1e-5, no dropout.

Each side runs in a process of its own (``common.Worker``), kept alive across repetitions, which
alternate between the two. A repetition is ``BLOCK`` steps of one side back to back, timed each,
reported as their median.

* ours: ``ensemble.ensemble_step_fn`` with one member (the product path: vmap + jit + donation),
  the batch copied host → device every step as the training loop does (the same token ids every
  step — the work does not depend on them; TRL's dataloader serves fresh ones);
* peer: TRL's ``RewardTrainer`` (its collator, ``compute_loss``, HF ``Trainer.training_step``,
  the Trainer's own AdamW and scheduler), driven one step at a time so that repetitions can be
  interleaved with ours: fetch a batch from the Trainer's dataloader, ``training_step``, clip,
  ``optimizer.step()``, ``lr_scheduler.step()``, ``zero_grad()`` — the body of ``Trainer.train``.
  TRL's defaults that would change the work are turned off: gradient checkpointing (ours does not
  recompute) and bf16 autocast (float32 here).

Model FLOPs per token count the matmuls of the trunk and of attention (the reward head is a
d → 1 dot; no LM head is evaluated by either side), ×3 for training. MFU divides by the larger of
the float32 matmul peaks that JAX and PyTorch reach on this machine, measured in this script.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

CASES = {
    # name: (model kwargs, pairs, seq)
    "smollm2_135m": (
        common.SMOLLM2_135M,
        8,
        128,
    ),
    # The quickstart model's shape: framework overhead, not matmuls, sets the pace.
    "tiny": (dict(vocab_size=409, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=384), 8, 128),
}
LEARNING_RATE = 1e-5
# Steps per repetition, run back to back by one side before the other side's turn (a training job
# runs its steps back to back). Alternating single steps made every step of ours start after
# seconds of the other process's work, and on this VM memory freed that long ago is handed back
# to the host and faulted in again: ours' tiny step measured 0.72x TRL that way, 0.82-1.00x in blocks.
# Two 135M steps per block (three until 2026-11-28): ~100 s less of run_all.sh on an AVX2-only host.
BLOCK = {"smollm2_135m": 2, "tiny": 10}


def random_batch(vocab: int, pairs: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "chosen_tokens": rng.integers(3, vocab, (pairs, seq)).astype(np.int32),
        "rejected_tokens": rng.integers(3, vocab, (pairs, seq)).astype(np.int32),
        "chosen_length": np.full((pairs,), seq, np.int32),
        "rejected_length": np.full((pairs,), seq, np.int32),
    }


# ----------------------------------------------------------------------------- warm_jax


def make_ours(model_kwargs: dict, pairs: int, seq: int):
    """A zero-argument callable running one M=1 ensemble step (host batch → device → step → sync)."""
    import jax
    import jax.numpy as jnp

    from warm_jax import ensemble, pretrain, runtime, sharding
    from warm_jax.models import transformer as tr

    mesh = runtime.make_mesh({"ensemble": 1, "data": -1}, devices=jax.devices()[:1])
    model_cfg = tr.ModelConfig(max_len=seq, dtype="float32", **model_kwargs)
    cfg = ensemble.EnsembleConfig(
        num_members=1, learning_rates=(LEARNING_RATE,), dropout_rates=(0.0,), batch_size=pairs
    )
    graphdef, params, specs = pretrain.sharded_init(model_cfg, mesh, jax.random.key(0))
    tx, state_sh, state, _ = ensemble.stack_state(mesh, cfg, [params], specs, [0])
    batch_sh = sharding.batch_sharding(mesh, 3, members="stacked")
    len_sh = sharding.batch_sharding(mesh, 2, members="stacked")
    shardings = {k: (len_sh if k.endswith("length") else batch_sh) for k in ensemble.RM_FIELDS}
    member_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.ENSEMBLE))
    step = ensemble.ensemble_step_fn(graphdef, tx, cfg, state_sh, shardings, member_sh, sharding.replicated(mesh))
    host = {k: v[None] for k, v in random_batch(model_cfg.vocab_size, pairs, seq).items()}
    drops = jax.device_put(jnp.zeros((1,), jnp.float32), member_sh)
    box = {"state": state}

    def run() -> dict:
        batch = {k: jax.device_put(v, shardings[k]) for k, v in host.items()}
        box["state"], metrics = step(box["state"], batch, drops)
        jax.block_until_ready((box["state"].params, metrics))
        return {"loss": float(metrics["loss"][0])}

    return run, model_cfg, box


def ours_worker(model_kwargs: dict, pairs: int, seq: int):
    """``common.Worker`` factory: our step in its own process."""
    import jax

    run, model_cfg, box = make_ours(model_kwargs, pairs, seq)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(box["state"].params))
    return run, {"params_M": n / 1e6}


# ----------------------------------------------------------------------------- TRL


def _tokenizer():
    """A minimal fast tokenizer: the data is pre-tokenised, TRL only needs its pad/eos tokens."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "<unk>": 2}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def make_trl(model_kwargs: dict, pairs: int, seq: int, steps: int, workdir: str):
    """A zero-argument callable running one RewardTrainer step, and the trainer."""
    import datasets
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    torch.manual_seed(0)
    kw = model_kwargs
    hd = kw.get("head_dim") or kw["d_model"] // kw["n_heads"]
    config = LlamaConfig(
        vocab_size=kw["vocab_size"],
        hidden_size=kw["d_model"],
        intermediate_size=kw["d_ff"],
        num_hidden_layers=kw["n_layers"],
        num_attention_heads=kw["n_heads"],
        num_key_value_heads=kw["n_kv_heads"],
        head_dim=hd,
        max_position_embeddings=max(seq, 128),
        rope_theta=kw.get("rope_theta", 1e4),
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        num_labels=1,
        pad_token_id=0,
        attention_dropout=0.0,
    )
    model = LlamaForSequenceClassification(config).float()
    # RewardTrainer keeps pre-tokenised pairs as they are ('chosen_ids'/'rejected_ids').
    n = pairs * (steps + 2)
    b = random_batch(kw["vocab_size"], n, seq, seed=1)
    ds = datasets.Dataset.from_dict(
        {"chosen_ids": b["chosen_tokens"].tolist(), "rejected_ids": b["rejected_tokens"].tolist()}
    )
    args = RewardConfig(
        output_dir=workdir,
        per_device_train_batch_size=pairs,
        learning_rate=LEARNING_RATE,
        max_grad_norm=1.0,
        weight_decay=0.0,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        max_length=seq,
        report_to=[],
        save_strategy="no",
        logging_steps=10_000,
        dataloader_num_workers=0,
        disable_tqdm=True,
        max_steps=steps + 2,
        seed=0,
    )
    trainer = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=_tokenizer())
    trainer.create_optimizer_and_scheduler(num_training_steps=steps + 2)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop; no accumulation here
    loader = iter(trainer.get_train_dataloader())
    params = [p for p in trainer.model.parameters() if p.requires_grad]

    def run() -> dict:
        inputs = next(loader)
        loss = trainer.training_step(trainer.model, inputs)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        trainer.model.zero_grad(set_to_none=True)
        return {"loss": float(loss), "tokens": int(inputs["attention_mask"].sum())}

    return run, trainer


def trl_worker(model_kwargs: dict, pairs: int, seq: int, steps: int):
    """``common.Worker`` factory: TRL's step in its own process."""
    import atexit
    import shutil

    import torch

    workdir = tempfile.mkdtemp(prefix="rm_throughput_trl_")
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    run, trainer = make_trl(model_kwargs, pairs, seq, steps, workdir)
    n = sum(p.numel() for p in trainer.model.parameters())
    return run, {"params_M": n / 1e6, "torch_threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------- driver


def _block(worker: common.Worker, steps: int):
    """One repetition: ``steps`` steps back to back; its time is their median."""
    return lambda: statistics.median(worker() for _ in range(steps))


def run_case(name: str, reps: int, peak: float) -> dict:
    from warm_jax.models import transformer as tr

    kw, pairs, seq = CASES[name]
    block = BLOCK[name]
    with (
        common.Worker(ours_worker, kw, pairs, seq, env=common.ours_env()) as ours,
        common.Worker(trl_worker, kw, pairs, seq, reps * block + 1, env=common.peer_env()) as peer,
    ):
        ours(), peer()  # warm-up (compiling, first-touch): one step each, not a block
        t0 = time.perf_counter()
        times = common.interleaved({"warm_jax": _block(ours, block), "trl": _block(peer, block)}, reps, warmup=0)
        wall = time.perf_counter() - t0
    tokens = 2 * pairs * seq
    if peer.last["tokens"] != tokens:
        raise RuntimeError(f"TRL batch held {peer.last['tokens']} real tokens, expected {tokens}")
    model_cfg = tr.ModelConfig(max_len=seq, dtype="float32", **kw)
    flops = tr.flops_per_token(model_cfg, seq, training=True, lm_head=False) * tokens  # RMs have no LM head
    tps = {k: [tokens / t for t in v] for k, v in times.items()}
    return {
        "case": name,
        "model": dataclasses.asdict(model_cfg),
        "pairs": pairs,
        "seq_len": seq,
        "tokens_per_step": tokens,
        "params_warm_jax_M": ours.info["params_M"],
        "params_trl_M": peer.info["params_M"],
        "torch_threads": peer.info["torch_threads"],
        "step_s": {k: common.summary(v) for k, v in times.items()},
        "tokens_per_s": {k: common.summary(v) for k, v in tps.items()},
        "mfu": {k: common.summary([flops / t / 1e12 / peak for t in v]) for k, v in times.items()},
        "ratio": common.ratio(tps["warm_jax"], tps["trl"]),
        "last_loss": {"warm_jax": ours.last["loss"], "trl": peer.last["loss"]},
        "steps_per_repetition": block,
        "interleaved_wall_s": wall,
    }


GOALS = {"smollm2_135m": 1.0, "tiny": 2.0}


def table(results: list[dict], peaks: dict) -> str:
    rows = []
    for r in results:
        g = GOALS.get(r["case"], 1.0)
        rows.append(
            [
                r["case"],
                f"{r['tokens_per_step']}",
                common.fmt(r["tokens_per_s"]["warm_jax"], 0),
                common.fmt(r["tokens_per_s"]["trl"], 0),
                common.fmt(r["ratio"], 2) + "×",
                f"{r['mfu']['warm_jax']['median']:.1%} / {r['mfu']['trl']['median']:.1%}",
                f"≥ {g:g}×",
                common.met(r["ratio"]["median"], g),
            ]
        )
    head = (
        f"float32 matmul peak (best of {common.PEAK_REPS} at each of {', '.join(f'{n}²' for n in common.PEAK_SIZES)}): "
        f"JAX {peaks['jax']:.3f} TFLOP/s, PyTorch {peaks['torch']:.3f} "
        f"TFLOP/s; MFU against {peaks['used']:.3f}\n\n"
    )
    return head + common.md_table(
        [
            "case",
            "tokens/step",
            "warm_jax tokens/s",
            "TRL RewardTrainer tokens/s",
            "ratio",
            "MFU ours / TRL",
            "goal",
            "met?",
        ],
        rows,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="tiny,smollm2_135m")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    peaks = {"jax": common.jax_matmul_peak_tflops(), "torch": common.torch_matmul_peak_tflops()}
    peaks["used"] = max(peaks["jax"], peaks["torch"])
    print(f"# matmul peak float32: jax {peaks['jax']:.3f}, torch {peaks['torch']:.3f} TFLOP/s", flush=True)
    results = []
    for name in args.cases.split(","):
        r = run_case(name, args.reps, peaks["used"])
        results.append(r)
        print(
            f"# {name}: ours {common.fmt(r['tokens_per_s']['warm_jax'], 0)} tok/s, TRL "
            f"{common.fmt(r['tokens_per_s']['trl'], 0)} tok/s, ratio {common.fmt(r['ratio'])}",
            flush=True,
        )
        common.write_json(args.output, {"benchmark": "rm_throughput", "peaks_tflops": peaks, "results": results})
    print(table(results, peaks))


if __name__ == "__main__":
    main()
