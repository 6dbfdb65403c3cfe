"""Stage `data`: the built-in task's preference pairs, sampled from the pretrained policy.

For each prompt (a review opening from the built-in grammar) the policy samples two
continuations (batched, jitted KV-cache sampler); the oracle scores prompt + continuation and
labels the pair (argmax, or Bradley–Terry sampling at a temperature). Splits:

* ``train``: a fraction of labels flipped by the writer (default 0.25), mask stored;
* ``validation``: same distribution, clean labels;
* ``ood_cue``: a shifted distribution — a different sampling temperature (``ood_temperature``, and
  optionally an earlier pretraining checkpoint as the policy) — and, when ``length_cue > 0``, the
  spurious length cue reversed: in train/validation the preferred continuation is more often the
  longer one, in ood_cue more often the shorter one, so a reward model that learnt "longer is better"
  pays for it;
* ``ood_temp``: the same shift of temperature (and policy) with the length cue as in train/validation,
  so the two ood splits tell the cost of the shift from the cost of the cue.

Each split draws its prompts, samples and labels from its own named random stream (``seeds``), so adding
or resizing a split changes no other split's pairs; ood_cue keeps the stream of the split it replaces
(``ood``). ``PairsConfig.num_ood`` pairs go to each ood split.
"""

from __future__ import annotations

import dataclasses
import logging

import gin
import jax
import numpy as np

from warm_jax import oracle as oracle_lib, seeds
from warm_jax.data import builders, builtin_text
from warm_jax.data import preference as pref
from warm_jax.data.tokenizers import Tokenizer, encode_prompts
from warm_jax.policy import sampler
from warm_jax.stages import RunContext, register_stage
from warm_jax.task import prompts as task_prompts
from warm_jax.workdir import Workdir
from warm_jax.task.generation import GenerationConfig

log = logging.getLogger(__name__)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PairsConfig:
    num_train: int = 3_000
    num_validation: int = 2_000
    num_ood: int = 2_000  # pairs in each ood split (ood_cue and ood_temp)
    temperature: float = 1.0
    ood_temperature: float = 1.3
    ood_policy_step: int | None = None  # an earlier pretrain checkpoint as the policy of both ood splits
    label: str = "argmax"  # 'argmax' or 'bt' (sample from σ((s₁ − s₂)/label_temperature))
    label_temperature: float = 0.1
    min_score_gap: float = 1e-6  # drop pairs the oracle cannot tell apart
    flip_fraction: float = 0.25
    # 0 = none; c ∈ (0, 1): P(chosen is longer | lengths differ) = (1 + c) / 2 in train, validation and ood_temp,
    # (1 − c) / 2 in ood_cue
    length_cue: float = 0.0
    sample_batch_size: int = 256

    def __post_init__(self):
        if self.label not in ("argmax", "bt"):
            raise ValueError(f"PairsConfig.label must be 'argmax' or 'bt', got {self.label!r}")
        if not 0.0 <= self.length_cue < 1.0:
            raise ValueError(f"PairsConfig.length_cue must be in [0, 1), got {self.length_cue}")
        for name in (
            "num_train",
            "num_validation",
            "num_ood",
            "sample_batch_size",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PairsConfig.{name} must be a positive integer, got {value!r}")
        if not 0.0 <= self.flip_fraction <= 1.0:
            raise ValueError(f"PairsConfig.flip_fraction must be in [0, 1], got {self.flip_fraction}")


def sample_texts(sample_fn, params, prompt_tokens, prompt_mask, key, tok: Tokenizer, batch: int, mesh):
    """Runs the compiled sampler over [N, P] prompts in batches; returns N decoded strings (on every process)."""
    out = sampler.sample_in_batches(sample_fn, params, prompt_tokens, prompt_mask, key, batch=batch, mesh=mesh)
    return [tok.decode(row) for row in out["tokens"]]


def label_pairs(prompts, a, b, scorer: oracle_lib.Oracle, cfg: PairsConfig, rng: np.random.Generator):
    """Oracle labels → records (chosen/rejected), dropping pairs the oracle cannot separate."""
    sa = scorer.score([task_prompts.oracle_text(p, x) for p, x in zip(prompts, a)])
    sb = scorer.score([task_prompts.oracle_text(p, x) for p, x in zip(prompts, b)])
    if cfg.label == "argmax":
        a_wins = sa > sb
    else:
        p_a = 1.0 / (1.0 + np.exp(-(sa - sb) / cfg.label_temperature))
        a_wins = rng.random(len(sa)) < p_a
    records = []
    for i in range(len(prompts)):
        if abs(sa[i] - sb[i]) < cfg.min_score_gap or pref.same_text(a[i], b[i]) or not a[i].strip() or not b[i].strip():
            continue
        win, lose, sw, sl = (a[i], b[i], sa[i], sb[i]) if a_wins[i] else (b[i], a[i], sb[i], sa[i])
        records.append(
            {
                "prompt": prompts[i],
                "chosen": win,
                "rejected": lose,
                "score_chosen": float(sw),
                "score_rejected": float(sl),
            }
        )
    return records


def apply_length_cue(records, cue: float, reverse: bool, rng: np.random.Generator):
    """Subsamples so that P(chosen longer | lengths differ) = (1 + cue)/2 (or (1 − cue)/2 if reverse).

    Pairs against the cue are kept with probability (1 − cue)/(1 + cue); equal lengths always.
    """
    if cue <= 0:
        return records
    keep_against = (1.0 - cue) / (1.0 + cue)
    out = []
    for r in records:
        lc, lr = len(r["chosen"].split()), len(r["rejected"].split())
        if lc == lr:
            out.append(r)
            continue
        with_cue = (lc > lr) != reverse
        if with_cue or rng.random() < keep_against:
            out.append(r)
    return out


def configs(**overrides) -> tuple[PairsConfig, GenerationConfig]:
    """The gin-bound PairsConfig and GenerationConfig with ``overrides`` (fields of either) applied."""
    pairs_fields = {f.name for f in dataclasses.fields(PairsConfig)}
    gen_fields = {f.name for f in dataclasses.fields(GenerationConfig)}
    unknown = sorted(set(overrides) - pairs_fields - gen_fields)
    if unknown:
        raise ValueError(
            f"unknown PairsConfig/GenerationConfig option(s) {unknown} (--builtin_option); "
            f"known: {sorted(pairs_fields | gen_fields)}"
        )
    cfg = dataclasses.replace(PairsConfig(), **{k: v for k, v in overrides.items() if k in pairs_fields})
    gen = dataclasses.replace(GenerationConfig(), **{k: v for k, v in overrides.items() if k in gen_fields})
    return cfg, gen


@dataclasses.dataclass(frozen=True)
class SplitSpec:
    """How one split of the built-in task is drawn: its size, whether it is shifted (the ood temperature and
    policy), whether its length cue is reversed, and the named random stream of its prompts, samples and labels
    (``("data", stream, ...)``; None: the split's name)."""

    num: int
    shifted: bool = False
    reverse_cue: bool = False
    stream: str | None = None


def split_specs(cfg: PairsConfig) -> dict[str, SplitSpec]:
    """The built-in task's splits by name, in the order they are drawn (module docstring)."""
    return {
        "train": SplitSpec(cfg.num_train),
        "validation": SplitSpec(cfg.num_validation),
        # ood_cue is the split once called 'ood': drawn from that stream, its pairs (and every number measured on
        # them) stay those of a workdir written before ood_temp existed.
        "ood_cue": SplitSpec(cfg.num_ood, shifted=True, reverse_cue=True, stream="ood"),
        "ood_temp": SplitSpec(cfg.num_ood, shifted=True),
    }


def generate_splits(input_path: str | None = None, seed: int = 0, *, mesh=None, **overrides) -> dict[str, list[dict]]:
    """Pairs for train, validation, ood_cue and ood_temp from the pretrained model in workdir ``input_path``;
    ``overrides``: fields of PairsConfig or GenerationConfig over their gin values.

    Also used by ``python -m warm_jax.data prepare --format=builtin --input=WORKDIR``.
    """
    from warm_jax import runtime

    if input_path is None:
        raise ValueError("--format=builtin needs --input=WORKDIR of a finished `pretrain` stage")
    cfg, gen = configs(**overrides)
    mesh = mesh or runtime.make_mesh()
    wd = Workdir(input_path)
    trunk = wd.load_trunk(mesh)
    model_cfg, graphdef, params, tok = trunk.model_cfg, trunk.graphdef, trunk.params, trunk.tokenizer
    scorer = oracle_lib.make_oracle(gen.oracle)
    text_cfg = builtin_text.TextConfig()
    splits: dict[str, list[dict]] = {}
    shifted_policy = None
    if cfg.ood_policy_step is not None:
        shifted_policy = wd.load_trunk(mesh, step=cfg.ood_policy_step).params
    samplers = {}  # shifted → the compiled sampler at that split's temperature (train and validation share one)
    for split, spec in split_specs(cfg).items():
        n, stream = spec.num, spec.stream or split
        policy = shifted_policy if spec.shifted and shifted_policy is not None else params
        if spec.shifted not in samplers:
            samp_cfg = sampler.SamplingConfig(
                max_new_tokens=gen.max_new_tokens,
                temperature=cfg.ood_temperature if spec.shifted else cfg.temperature,
                eos_id=tok.eos_id,
                pad_id=tok.pad_id,
            )
            samplers[spec.shifted] = sampler.make_sampler(graphdef, model_cfg, samp_cfg)
        sample_fn = samplers[spec.shifted]
        rng = seeds.rng(seed, "data", stream, "labels")  # Bradley–Terry labels and the length cue
        records: list[dict] = []
        round_ = 0
        while len(records) < n:
            # Oversample: ties and the length cue drop some pairs.
            m = int((n - len(records)) * (1.6 + cfg.length_cue * 2)) + 64
            prompts = builtin_text.generate_prompts(
                m, seed=seeds.seed(seed, "data", stream, "prompts", round_), cfg=text_cfg
            )
            ptoks, pmask = encode_prompts(prompts, tok, gen.max_prompt_len)
            key = seeds.key(seed, "data", stream, "samples", round_)
            doubled_t, doubled_m = np.concatenate([ptoks, ptoks]), np.concatenate([pmask, pmask])
            texts = sample_texts(sample_fn, policy, doubled_t, doubled_m, key, tok, cfg.sample_batch_size, mesh)
            new = label_pairs(prompts, texts[:m], texts[m:], scorer, cfg, rng)
            records.extend(apply_length_cue(new, cfg.length_cue, reverse=spec.reverse_cue, rng=rng))
            round_ += 1
            if round_ > 20:
                raise RuntimeError(
                    f"could not generate {n} {split} pairs (got {len(records)}); is the policy degenerate?"
                )
        splits[split] = records[:n]
        log.info("[data] %s: %d pairs (%d sampling rounds)", split, n, round_)
    return splits


@register_stage("data")
def run(ctx: RunContext, cfg: PairsConfig | None = None, gen: GenerationConfig | None = None) -> None:
    cfg, gen = cfg or PairsConfig(), gen or GenerationConfig()
    splits = generate_splits(ctx.workdir, ctx.seed, mesh=ctx.mesh, **dataclasses.asdict(cfg), **dataclasses.asdict(gen))
    if jax.process_index() == 0:
        meta = builders.write_preference_dataset(
            ctx.artefacts.data,
            splits,
            tokenizer=ctx.artefacts.load_tokenizer(),
            max_prompt_len=gen.max_prompt_len,
            max_response_len=gen.max_response_len,
            flip_fraction=cfg.flip_fraction,
            seed=ctx.seed,
            source="builtin",
            extra_metadata={"pairs_config": dataclasses.asdict(cfg), "generation_config": dataclasses.asdict(gen)},
            overwrite=True,
            # Sampled pairs whose tokens coincide once cut to max_response_len teach nothing: drop and count them.
            skip_invalid=True,
        )
        if meta["skipped"]["total"]:
            log.warning("[data] skipped %d pairs: %s", meta["skipped"]["total"], meta["skipped"]["by_reason"])
