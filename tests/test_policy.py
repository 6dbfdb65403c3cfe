"""Policy side: the KV-cache sampler against full forwards, reward re-packing, ENS rewards, BoN, win rates."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import helpers
from warm_jax import io_utils, params_io, pretrain, rm_scoring, runtime
from warm_jax.checkpoints import Checkpointer
from warm_jax.data import builtin_text
from warm_jax.data.tokenizers import WordTokenizer
from warm_jax.models import transformer as tr
from warm_jax.policy import bon, rewards, sampler, winrate
from warm_jax.stages import RunContext
from warm_jax.train_state import new_state

TINY = dict(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, max_len=40)


def tiny_mesh():
    return runtime.make_mesh({"data": 2, "fsdp": 2}, devices=jax.devices()[:4])


def make_tiny_workdir(workdir: str, mesh, num_members: int = 3, seed: int = 0) -> RunContext:
    """A workdir as the earlier stages leave it: tokenizer, pretrain checkpoint, RM members, WARM, the selection."""
    tok = WordTokenizer.from_words(builtin_text.vocabulary())
    tok.save(os.path.join(workdir, "tokenizer"))
    cfg = tr.ModelConfig(vocab_size=tok.vocab_size, **TINY)
    ctx = RunContext(workdir=workdir, mesh=mesh, seed=seed)
    _, policy, _ = pretrain.sharded_init(cfg, mesh, jax.random.key(seed))
    # Larger init scale so the tiny policy has a peaked, non-uniform distribution.
    policy = jax.tree.map(lambda x: x * 20.0 if x.ndim >= 2 else x, policy)
    state = new_state(policy, pretrain.make_optimizer(pretrain.PretrainConfig()), jax.random.key(1))
    ck = Checkpointer(ctx.path("pretrain", "ckpt"), async_save=False)
    ck.save(0, state, force=True)
    ck.close()
    io_utils.atomic_write_json(
        ctx.path("pretrain", "model.json"), {"model": dataclasses.asdict(cfg), "tokenizer": "tokenizer"}
    )
    members = []
    for i in range(num_members):
        p = pretrain.sharded_init(cfg, mesh, jax.random.key(100 + i))[1]
        p = {**p, "reward_head": jax.tree.map(lambda x: x * 50.0, p["reward_head"])}
        members.append(p)
        params_io.save_params(
            ctx.path("rm", "members", str(i)), p, model_cfg=cfg, meta={"member": i}, tokenizer_dir=ctx.path("tokenizer")
        )
    warm = jax.tree.map(lambda *xs: sum(xs) / len(xs), *members)
    params_io.save_params(ctx.path("rm", "warm"), warm, model_cfg=cfg, meta={}, tokenizer_dir=ctx.path("tokenizer"))
    stats = {"mean": 0.1, "std": 0.5}
    io_utils.atomic_write_json(
        ctx.artefacts.selection,
        {
            "best_member": 1,
            "members": list(range(num_members)),
            "reward_stats": {"warm": stats, "member_best": stats, "ens": stats},
        },
    )
    return ctx


@pytest.fixture(scope="module")
def model():
    cfg = tr.ModelConfig(vocab_size=50, **TINY)
    graphdef, _, _ = tr.abstract_model(cfg)
    # Larger weights give peaked, varied logits (jitted: eager init is slow on a busy CPU).
    init = jax.jit(lambda k: jax.tree.map(lambda x: x * 20.0 if x.ndim >= 2 else x, tr.init_params(cfg, k)))
    return cfg, graphdef, init(jax.random.key(0))


# Jitted once per shape: the eager loops are op-by-op and slow.
greedy_reference = sampler.greedy_reference
sample = jax.jit(sampler.sample, static_argnames=("graphdef", "model_cfg", "cfg"))


def _left_pad(rows, width, pad=0):
    toks = np.full((len(rows), width), pad, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        toks[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return jnp.asarray(toks), jnp.asarray(mask)


PROMPTS = [[1, 5, 9, 4], [1, 7], [1, 30, 31, 32, 33, 34], [1]]


@pytest.mark.parametrize("out_first", [False, True])
def test_cached_greedy_decoding_equals_full_forward_and_logprobs_match(model, out_first):
    cfg, graphdef, params = model
    toks, mask = _left_pad(PROMPTS, 6)
    n = 8
    ref = np.asarray(greedy_reference(params, graphdef, toks, mask, n))
    eos = -1  # never produced: compare all n tokens
    out = sample(
        params,
        toks,
        mask,
        jax.random.key(0),
        graphdef=graphdef,
        model_cfg=cfg,
        cfg=sampler.SamplingConfig(
            max_new_tokens=n, temperature=0.0, eos_id=eos, pad_id=0, out_first_kernels=out_first
        ),
    )
    np.testing.assert_array_equal(np.asarray(out["tokens"]), ref)
    # Log-probs of the sampled tokens equal a full forward over prompt + response.
    full_t = jnp.concatenate([toks, out["tokens"]], 1)
    full_m = jnp.concatenate([mask, jnp.ones_like(out["tokens"])], 1)
    lp = sampler.sequence_logprobs(params, graphdef, full_t, full_m, toks.shape[1])
    helpers.assert_close_to_scale(np.asarray(out["logprobs"]), np.asarray(lp))
    assert float(jnp.std(lp)) > 1e-3  # a non-degenerate check


def test_out_first_kernels_by_default_only_for_several_rows_of_a_large_model():
    big = {"w": jax.ShapeDtypeStruct((sampler.OUT_FIRST_MIN_BYTES // 4,), jnp.float32)}
    small = {"w": jax.ShapeDtypeStruct((1000,), jnp.float32)}
    auto = sampler.SamplingConfig()
    assert sampler._use_out_first(auto, big, rows=16) == (jax.default_backend() == "cpu")
    assert not sampler._use_out_first(auto, big, rows=1)
    assert not sampler._use_out_first(auto, small, rows=16)
    assert sampler._use_out_first(sampler.SamplingConfig(out_first_kernels=True), small, rows=1)
    assert not sampler._use_out_first(sampler.SamplingConfig(out_first_kernels=False), big, rows=16)


def test_eos_stops_a_row_and_pads_after_it(model):
    cfg, graphdef, params = model
    toks, mask = _left_pad(PROMPTS, 6)
    n = 8
    ref = np.asarray(greedy_reference(params, graphdef, toks, mask, n))
    eos = int(ref[0, 2])  # row 0 emits this at step 2: call it EOS
    # A pad id the model never emits (the sampler treats an emitted pad id as not generated).
    pad = int(np.setdiff1d(np.arange(4, 50), np.concatenate([ref.ravel(), *PROMPTS]))[0])
    out = jax.device_get(
        sample(
            params,
            toks,
            mask,
            jax.random.key(0),
            graphdef=graphdef,
            model_cfg=cfg,
            cfg=sampler.SamplingConfig(max_new_tokens=n, temperature=0.0, eos_id=eos, pad_id=pad),
        )
    )
    for i in range(len(PROMPTS)):
        hits = np.flatnonzero(ref[i] == eos)
        length = int(hits[0]) + 1 if hits.size else n
        assert out["length"][i] == length
        np.testing.assert_array_equal(out["tokens"][i, :length], ref[i, :length])
        assert (out["tokens"][i, length:] == pad).all() and (out["logprobs"][i, length:] == 0).all()
        np.testing.assert_array_equal(out["mask"][i], (np.arange(n) < length).astype(np.int32))
    assert out["length"][0] == 3


def test_top_k_and_top_p_keep_only_allowed_tokens(model):
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    k2 = sampler.filter_logits(logits, temperature=1.0, top_k=2, top_p=1.0)
    assert np.isfinite(np.asarray(k2)).sum() == 2 and np.isfinite(np.asarray(k2[0, :2])).all()
    p = sampler.filter_logits(logits, temperature=1.0, top_k=0, top_p=0.7)  # 0.5 + 0.3 reaches 0.7
    assert np.isfinite(np.asarray(p[0])).tolist() == [True, True, False, False]
    p1 = sampler.filter_logits(logits, temperature=1.0, top_k=0, top_p=0.4)  # the top token alone
    assert np.isfinite(np.asarray(p1[0])).tolist() == [True, False, False, False]
    # In the sampler: top-k = 2 at temperature 1 only ever picks one of the two most likely tokens.
    cfg, graphdef, params = model
    toks, mask = _left_pad(PROMPTS * 4, 6)
    out = sample(
        params,
        toks,
        mask,
        jax.random.key(3),
        graphdef=graphdef,
        model_cfg=cfg,
        cfg=sampler.SamplingConfig(max_new_tokens=6, temperature=1.0, top_k=2, eos_id=-1),
    )
    full_t = jnp.concatenate([toks, out["tokens"]], 1)
    full_m = jnp.concatenate([mask, jnp.ones_like(out["tokens"])], 1)
    logits = tr.bind(graphdef, params)(full_t, full_m)[:, toks.shape[1] - 1 : -1]
    rank = jnp.sum(logits > jnp.take_along_axis(logits, out["tokens"][..., None], -1), -1)
    assert int(rank.max()) <= 1
    # top-p tiny = greedy
    greedy = greedy_reference(params, graphdef, toks, mask, 6)
    tp = sample(
        params,
        toks,
        mask,
        jax.random.key(4),
        graphdef=graphdef,
        model_cfg=cfg,
        cfg=sampler.SamplingConfig(max_new_tokens=6, temperature=1.0, top_p=1e-6, eos_id=-1),
    )
    np.testing.assert_array_equal(np.asarray(tp["tokens"]), np.asarray(greedy))


def test_new_params_swap_into_the_compiled_sampler_without_recompiling(model):
    cfg, graphdef, params = model
    fn = sampler.make_sampler(graphdef, cfg, sampler.SamplingConfig(max_new_tokens=4, temperature=1.0))
    toks, mask = _left_pad(PROMPTS, 6)
    a = fn(params, toks, mask, jax.random.key(0))
    b = fn(jax.tree.map(lambda x: x * 1.5, params), toks, mask, jax.random.key(0))
    assert fn._cache_size() == 1
    assert not np.array_equal(np.asarray(a["logprobs"]), np.asarray(b["logprobs"]))


def test_sample_in_batches_keys_each_batch_by_its_first_row_and_drops_padding(model):
    cfg, graphdef, params = model
    fn = sampler.make_sampler(graphdef, cfg, sampler.SamplingConfig(max_new_tokens=4, temperature=1.0))
    mesh = runtime.make_mesh({"data": 1}, devices=jax.devices()[:1])
    toks, mask = (np.asarray(x) for x in _left_pad(PROMPTS + [[1, 2, 3]], 6))  # 5 rows: batches 2 + 2 + 1
    key = jax.random.key(3)
    got = sampler.sample_in_batches(fn, params, toks, mask, key, batch=2, mesh=mesh)
    assert fn._cache_size() == 1  # one compile served every batch, the padded last one too
    assert got["tokens"].shape == (5, 4) and got["length"].shape == (5,)
    for start in (0, 2, 4):
        rows = slice(start, start + 2)
        t, m = toks[rows], mask[rows]
        if len(t) < 2:  # the last batch is padded with its last row
            t, m = np.concatenate([t, t]), np.concatenate([m, m])
        want = fn(params, jnp.asarray(t), jnp.asarray(m), jax.random.fold_in(key, start))
        n = len(toks[rows])
        for k in ("tokens", "mask", "length"):
            np.testing.assert_array_equal(got[k][rows], np.asarray(want[k])[:n], err_msg=f"{k} rows {start}:")


def test_repack_moves_left_padded_prompt_and_response_to_a_right_padded_sequence():
    pt = jnp.asarray([[0, 0, 5, 6], [7, 8, 9, 10]])
    pm = (pt > 0).astype(jnp.int32)
    rt = jnp.asarray([[11, 2, 0], [12, 13, 14]])
    rm = jnp.asarray([[1, 1, 0], [1, 1, 1]])
    toks, lens = rewards.repack_jit(pt, pm, rt, rm, pad_id=0)
    np.testing.assert_array_equal(np.asarray(toks), [[5, 6, 11, 2, 0, 0, 0], [7, 8, 9, 10, 12, 13, 14]])
    np.testing.assert_array_equal(np.asarray(lens), [4, 7])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("policy"))
    return make_tiny_workdir(path, tiny_mesh())


def test_rewards_by_name_ensemble_is_vmapped_mean_and_conservative_subtracts_std(workdir):
    ctx = workdir
    rng = np.random.default_rng(0)
    toks = jnp.asarray(rng.integers(4, 300, size=(8, 10)), jnp.int32)
    lens = jnp.asarray([10, 3, 5, 7, 10, 1, 4, 9], jnp.int32)
    members = [params_io.load_params_checkpoint(ctx.path("rm", "members", str(i)), ctx.mesh) for i in range(3)]
    per = np.stack([np.asarray(rm_scoring.score(p, g, toks, lens)) for _, g, p, _ in members])  # [M, B]
    ens = rewards.load_reward(ctx, "ens")
    r, std = ens(toks, lens)
    np.testing.assert_allclose(np.asarray(r), (per.mean(0) - 0.1) / 0.5, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(std), per.std(0) / 0.5, rtol=1e-4, atol=1e-5)
    assert per.std(0).min() > 0
    cons = rewards.load_reward(ctx, "ens_conservative", conservative_lambda=2.0)
    np.testing.assert_allclose(np.asarray(cons(toks, lens)[0]), np.asarray(r - 2.0 * std), rtol=1e-4, atol=1e-5)
    best = rewards.load_reward(ctx, "member_best", normalise=False)
    np.testing.assert_allclose(np.asarray(best(toks, lens)[0]), per[1], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="unknown reward"):
        rewards.load_reward(ctx, "nope")


def test_best_of_n_maths():
    assert bon.bon_kl(1) == 0.0
    np.testing.assert_allclose(bon.bon_kl(4), np.log(4) - 0.75)
    proxy = np.asarray([[0.1, 0.9, 0.5, 0.2]])
    gold = np.asarray([[1.0, 2.0, 3.0, 4.0]])
    assert bon.best_of_n(proxy, gold, 1) == (2.5, pytest.approx(0.425))
    assert bon.best_of_n(proxy, gold, 2) == (2.5, pytest.approx(0.7))  # groups {0.1,0.9}→2.0, {0.5,0.2}→3.0
    assert bon.best_of_n(proxy, gold, 4) == (2.0, 0.9)


def test_bon_stage_writes_results_and_n1_is_the_plain_sample_mean(workdir):
    cfg = bon.BonConfig(
        n_values=(1, 2, 4, 8),
        num_prompts=8,
        sample_batch_size=32,
        score_batch_size=32,
    )
    bon.run(workdir, cfg, helpers.tiny_gen())
    res = json.load(open(workdir.path("bon", "results.json")))
    assert res["n"] == [1, 2, 4, 8]
    np.testing.assert_allclose(res["kl"], [bon.bon_kl(n) for n in (1, 2, 4, 8)])
    assert set(res["oracle"]) == set(res["proxy"]) == {"warm", "member_best", "ens", "ens_conservative"}
    for name in res["oracle"]:
        assert res["oracle"][name][0] == pytest.approx(res["oracle_mean_all_samples"], abs=1e-6)
        assert all(b >= a - 1e-6 for a, b in zip(res["proxy"][name], res["proxy"][name][1:]))  # nested groups
        assert res["proxy"][name][-1] > res["proxy"][name][0]


def test_win_rate_counts_ties_half_and_bootstraps_an_interval():
    out = winrate.win_rate([1.0, 0.0, 0.5, 0.3], [0.0, 0.0, 1.0, 0.2], num_bootstrap=500)
    assert out["value"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    lo, hi = out["ci95"]
    assert 0.0 <= lo <= out["value"] <= hi <= 1.0 and out["n_prompts"] == 4
    assert winrate.win_rate([1.0] * 50, [0.0] * 50)["ci95"] == [1.0, 1.0]
    with pytest.raises(ValueError):
        winrate.win_rate([1.0], [1.0, 2.0])
