"""Stage `pretrain`: next-token training of the tiny decoder on the built-in text.

Its checkpoints are the shared initialisation of every reward model and policy; steps listed
in ``PretrainConfig.keep_steps`` are kept for "Baklava" initialisations (different featurizer
checkpoints of one pretraining run).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from warm_jax import cpu_tuning, faults, loop, params_io, seeds, sharding
from warm_jax.data import builtin_text
from warm_jax.data import pipeline
from warm_jax.data.local_rows import local_rows
from warm_jax.data.tokenizers import Tokenizer, WordTokenizer, load_tokenizer
from warm_jax.models import transformer as tr
from warm_jax.stages import RunContext, register_stage
from warm_jax.train_state import TrainState, guarded_update, new_state, state_specs

log = logging.getLogger(__name__)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    num_documents: int = 20_000
    seq_len: int = 64
    batch_size: int = 64  # global
    num_steps: int = 1_500
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    keep_steps: tuple[int, ...] = ()  # extra checkpoints for Baklava featurizers


def tokenize_documents(docs, tok: Tokenizer, seq_len: int) -> dict[str, np.ndarray]:
    """BOS + words + EOS, truncated and right-padded. Returns tokens, mask: [N, seq_len]."""
    tokens = np.full((len(docs), seq_len), tok.pad_id, np.int32)
    mask = np.zeros((len(docs), seq_len), np.int32)
    for i, ids in enumerate(tok.encode_batch(docs)):
        ids = ([tok.bos_id] if tok.add_bos and tok.bos_id is not None else []) + list(ids) + [tok.eos_id]
        ids = ids[:seq_len]
        tokens[i, : len(ids)] = ids
        mask[i, : len(ids)] = 1
    return {"tokens": tokens, "mask": mask}


def lm_loss(params, graphdef, tokens, mask, *, dropout_rate=0.0, key=None):
    """Mean next-token cross-entropy over real target tokens. tokens, mask: [B, T], right-padded (as
    ``tokenize_documents`` makes them)."""
    model = tr.bind(graphdef, params)
    h, _ = model.hidden(tokens[:, :-1], mask[:, :-1], dropout_rate=dropout_rate, key=key, right_padded=True)
    logits = model.logits(h)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    w = mask[:, 1:].astype(jnp.float32)
    return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)


def make_optimizer(cfg: PretrainConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, cfg.warmup_steps, max(cfg.num_steps, cfg.warmup_steps + 1), cfg.learning_rate * 0.1
    )
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=cfg.weight_decay))


def _train_step(state: TrainState, batch, *, graphdef, tx, model_cfg, nan_at_step):
    key = state.step_key()
    loss, grads = jax.value_and_grad(lm_loss)(
        state.params,
        graphdef,
        batch["tokens"],
        batch["mask"],
        dropout_rate=model_cfg.dropout_rate,
        key=key if model_cfg.dropout_rate > 0 else None,
    )
    new, loss, finite = guarded_update(state, loss, grads, tx, nan_at_step=nan_at_step)
    return new, {"loss": loss, "grad_norm": optax.tree.norm(grads), "finite": finite}


def build_tokenizer(ctx: RunContext, text_cfg: builtin_text.TextConfig) -> Tokenizer:
    tok_dir = ctx.artefacts.tokenizer
    if os.path.exists(tok_dir):
        return load_tokenizer(tok_dir)
    tok = WordTokenizer.from_words(builtin_text.vocabulary(text_cfg))
    if jax.process_index() == 0:
        tok.save(tok_dir)
    return tok


def model_config(tok: Tokenizer, base: tr.ModelConfig | None = None) -> tr.ModelConfig:
    """The gin-configured model, with the vocabulary size the tokenizer needs."""
    base = base or tr.ModelConfig()
    return dataclasses.replace(base, vocab_size=tok.vocab_size)


def sharded_init(model_cfg: tr.ModelConfig, mesh, key):
    """Abstract-first init: shapes → specs → one jitted init that writes straight into place."""
    graphdef, abstract, axes = tr.abstract_model(model_cfg)
    specs = sharding.tree_specs(axes, abstract, mesh)
    init = jax.jit(lambda k: tr.init_params(model_cfg, k), out_shardings=sharding.named(mesh, specs))
    return graphdef, init(key), specs


@register_stage("pretrain")
def run(
    ctx: RunContext,
    cfg: PretrainConfig | None = None,
    text_cfg: builtin_text.TextConfig | None = None,
    fault: faults.FaultInjection | None = None,
):
    cfg = cfg or PretrainConfig()
    fault = fault or faults.FaultInjection()
    text_cfg = text_cfg or builtin_text.TextConfig()
    tok = build_tokenizer(ctx, text_cfg)
    model_cfg = model_config(tok)
    mesh = ctx.mesh
    docs = builtin_text.generate_documents(
        cfg.num_documents, seed=seeds.seed(ctx.seed, "pretrain", "documents"), cfg=text_cfg
    )
    data = tokenize_documents(docs, tok, cfg.seq_len)
    records = [{"tokens": t, "mask": m} for t, m in zip(data["tokens"], data["mask"])]

    graphdef, params, param_specs = sharded_init(model_cfg, mesh, seeds.key(ctx.seed, "pretrain", "init"))
    tx = make_optimizer(cfg)
    specs = state_specs(tx, jax.eval_shape(lambda: params), param_specs)
    shardings = sharding.named(mesh, specs)
    step_key = seeds.key(ctx.seed, "pretrain", "steps")  # dropout
    state = jax.jit(lambda p: new_state(p, tx, step_key), out_shardings=shardings)(params)
    abstract_state = sharding.abstract_with_sharding(jax.eval_shape(lambda: state), shardings)

    batch_sh = sharding.batch_sharding(mesh, 2)
    # Each process reads only the rows its devices hold.
    local = local_rows(batch_sh, (cfg.batch_size,))
    iterator = pipeline.PreferenceIterator(
        records,
        batch_size=cfg.batch_size,
        seed=seeds.seed(ctx.seed, "pretrain", "data_order"),
        fields=("tokens", "mask"),
        local=local,
    )
    step = jax.jit(
        functools.partial(_train_step, graphdef=graphdef, tx=tx, model_cfg=model_cfg, nan_at_step=fault.nan_at_step),
        in_shardings=(shardings, batch_sh),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0,
        compiler_options=cpu_tuning.compiler_options(cpu_tuning.TRAIN_STEP),
    )
    to_device = lambda b: pipeline.to_global({k: b[k] for k in ("tokens", "mask")}, batch_sh, local)
    log.info("[pretrain] %d params, %d documents, vocab %d", tr.param_count(params), len(docs), tok.vocab_size)
    loop.train(
        stage="pretrain",
        workdir=ctx.workdir,
        state=state,
        abstract_state=abstract_state,
        step_fn=step,
        iterator=iterator,
        to_device=to_device,
        num_steps=cfg.num_steps,
        ckpt_dir=ctx.artefacts.pretrain_ckpt,
        keep_steps=cfg.keep_steps,
        fault=fault,
    )
    pipeline.log_reads("pretrain", iterator)
    if jax.process_index() == 0:
        ctx.artefacts.write_pretrain_meta(model_cfg)


@gin.configurable
def base_model(name: str = "smollm2-135m") -> str:
    """Which pretrained model `import_model` brings in: 'smollm2-135m' or a local HF Llama directory."""
    return name


@register_stage("import_model")
def run_import(ctx: RunContext) -> None:
    """Stage `import_model`: a real pretrained model as the shared init (instead of `pretrain`).

    Writes the same layout `pretrain` does (WORKDIR/pretrain/model.json, WORKDIR/tokenizer), with
    the weights as a standalone params checkpoint in WORKDIR/pretrain/imported.
    """
    from warm_jax.models import pretrained

    name = base_model()
    # The checkpoint fixes the model's shape; how our decoder stores and runs it (precision, attention
    # kernel, layer layout) comes from gin, as for a model pretrained here.
    run = tr.ModelConfig()
    model_cfg, _, params, tok = pretrained.load_pretrained(
        name, mesh=ctx.mesh, **{f: getattr(run, f) for f in tr.RUN_FIELDS}
    )
    wd = ctx.artefacts
    params_io.save_params(wd.pretrain_imported, params, model_cfg=model_cfg, meta={"source": name}, tokenizer_dir=None)
    if jax.process_index() == 0:
        tok.save(wd.tokenizer)
        wd.write_pretrain_meta(model_cfg, imported=name)
