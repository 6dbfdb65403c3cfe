"""``scan_layers``: the stacked, scanned decoder computes what the per-layer loop does, in every mode.

The same params are run in both layouts (``stack_layers`` of the loop's params): logits and rewards with left
and right padding, dropout (same key), gradients (without remat and with each remat policy), KV-cache decoding and the sampler;
then sharding of the stacked params and the HF export/import in the stacked layout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from tests import helpers
from warm_jax import export, pretrain, runtime, sharding
from warm_jax.models import pretrained as pt
from warm_jax.models import transformer as tr
from warm_jax.policy import sampler

LOOP = tr.ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64, max_len=32)
SCAN = dataclasses.replace(LOOP, scan_layers=True)
ATOL = 2e-5

# Rows 0-1 right-padded, rows 2-3 the same sequences left-padded.
TOKENS = np.array(
    [[5, 6, 7, 8, 9, 0, 0], [10, 11, 12, 0, 0, 0, 0], [0, 0, 5, 6, 7, 8, 9], [0, 0, 0, 0, 10, 11, 12]], np.int32
)
MASK = (TOKENS != 0).astype(np.int32)


@functools.lru_cache(maxsize=None)
def _params():
    """Loop-layout params (peaked logits: larger init) and the same weights stacked."""
    loop = jax.jit(lambda k: jax.tree.map(lambda x: x * 10.0 if x.ndim >= 2 else x, tr.init_params(LOOP, k)))(
        jax.random.key(0)
    )
    return loop, tr.stack_layers(loop, LOOP.n_layers)


@pytest.fixture(scope="module")
def params():
    return _params()


def _graph(cfg):
    return tr.abstract_model(cfg)[0]


def _outputs(cfg, p, key=None, rate=0.0):
    """(logits [B, T, V], reward [B]) of the shared batch."""

    @jax.jit
    def f(p, key):
        m = tr.bind(_graph(cfg), p)
        h, _ = m.hidden(TOKENS, MASK, dropout_rate=rate, key=key)
        return m.logits(h), m.reward(h, MASK)

    return f(p, key)


def test_layout_conversions_and_init(params):
    loop, stacked = params
    _, abstract, axes = tr.abstract_model(SCAN)
    assert "layer_0" not in abstract and abstract["layers"]["attn"]["wq"].shape == (3, 32, 4, 8)
    assert axes["layers"]["attn"]["wq"] == ("layers", "embed", "heads", "head_dim")
    assert axes["layers"]["attn_norm"]["scale"] == ("layers", "norm")
    assert jax.tree.map(lambda x: x.shape, stacked) == jax.tree.map(lambda x: x.shape, abstract)
    jax.tree.map(np.testing.assert_array_equal, tr.unstack_layers(stacked), loop)
    # Host trees stay numpy (the importer and the exporter rely on it).
    host = tr.stack_layers(jax.tree.map(np.asarray, loop), 3)
    assert isinstance(host["layers"]["mlp"]["w_up"], np.ndarray)
    # One seed, the same weights in either layout.
    jax.tree.map(
        np.testing.assert_array_equal,
        tr.init_params(SCAN, jax.random.key(7)),
        tr.stack_layers(tr.init_params(LOOP, jax.random.key(7)), 3),
    )
    with pytest.raises(ValueError, match="layer_2"):
        tr.stack_layers({k: v for k, v in loop.items() if k != "layer_2"}, 3)


def test_layers_init_as_if_built_one_by_one():
    """The scan over layers at init draws each layer's keys in turn from the one stream, as L
    ``Block(cfg, rngs)`` calls would, and leaves the stream where they would (the heads come after)."""
    untied = dataclasses.replace(LOOP, tie_embeddings=False)

    def one_by_one(key):
        rngs = nnx.Rngs(params=key)
        rngs.params()  # the embedding's key
        blocks = [nnx.to_pure_dict(nnx.state(tr.Block(untied, rngs))) for _ in range(untied.n_layers)]
        rngs.params()  # the LM head's key
        return blocks, nnx.to_pure_dict(nnx.state(tr.RewardHead(untied, rngs)))

    key = jax.random.key(11)
    blocks, head = jax.jit(one_by_one)(key)
    params = jax.jit(lambda k: tr.init_params(untied, k))(key)
    for i, block in enumerate(blocks):
        jax.tree.map(np.testing.assert_array_equal, params[f"layer_{i}"], block)
    jax.tree.map(np.testing.assert_array_equal, params["reward_head"], head)


def test_scan_forward_matches_loop_with_padding(params):
    loop, stacked = params
    logits_l, reward_l = _outputs(LOOP, loop)
    logits_s, reward_s = _outputs(SCAN, stacked)
    helpers.assert_close_to_scale(logits_s, logits_l)
    np.testing.assert_allclose(reward_s, reward_l, atol=ATOL)
    # Left and right padding agree at the real tokens in the scanned model too.
    np.testing.assert_allclose(reward_s[:2], reward_s[2:], atol=ATOL)
    helpers.assert_close_to_scale(logits_s[0, :5], logits_s[2, 2:])


def test_scan_dropout_matches_loop_with_the_same_key(params):
    loop, stacked = params
    key = jax.random.key(3)
    logits_l, reward_l = _outputs(LOOP, loop, key, 0.3)
    logits_s, reward_s = _outputs(SCAN, stacked, key, 0.3)
    helpers.assert_close_to_scale(logits_s, logits_l)
    np.testing.assert_allclose(reward_s, reward_l, atol=ATOL)
    # Dropout really is on (and per layer: not the same mask everywhere).
    assert np.abs(np.asarray(reward_s) - np.asarray(_outputs(SCAN, stacked)[1])).max() > 1e-3


@functools.lru_cache(maxsize=None)
def _grads(cfg):
    """Gradients of a loss touching the reward and LM heads, with dropout on (same key everywhere)."""
    loop, stacked = _params()
    key = jax.random.key(4)

    def loss(p):
        m = tr.bind(_graph(cfg), p)
        h, _ = m.hidden(TOKENS, MASK, dropout_rate=0.1, key=key)
        return jnp.sum(m.reward(h, MASK)) + 1e-3 * jnp.sum(m.logits(h) ** 2)

    g = jax.jit(jax.grad(loss))(stacked if cfg.scan_layers else loop)
    return g if cfg.scan_layers else tr.stack_layers(g, LOOP.n_layers)


@pytest.mark.parametrize("remat_policy", [None, *tr.REMAT_POLICIES])
def test_scan_and_remat_gradients_match_the_plain_loop(remat_policy):
    """Every layout × remat policy computes the plain loop's gradients: a policy only chooses what
    the backward pass keeps and what it recomputes."""
    remat = dict(remat=remat_policy is not None, remat_policy=remat_policy or "full")
    for cfg in (dataclasses.replace(SCAN, **remat), dataclasses.replace(LOOP, **remat)):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), _grads(cfg), _grads(LOOP))


def test_minimal_remat_keeps_exactly_the_named_activations(params):
    """What the 'minimal' policy stores per layer: the layer input and the activations named in the
    layer code — no norm outputs, float32 copies or SwiGLU intermediates (the bytes that made the
    GPU step memory-bound). A renamed or dropped checkpoint_name shows up here, not only as a slowdown."""
    _, stacked = params
    cfg = dataclasses.replace(SCAN, remat=True, remat_policy="minimal")

    def loss(p):
        m = tr.bind(_graph(cfg), p)
        h, _ = m.hidden(TOKENS, MASK, dropout_rate=0.1, key=jax.random.key(4))
        return jnp.sum(m.reward(h, MASK))

    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # jax's public view of the residuals: one line each
        jax.ad_checkpoint.print_saved_residuals(loss, stacked)
    stacked_out = [line.split()[0] for line in out.getvalue().splitlines() if "output of scan" in line]
    stored = sorted(a for a in stacked_out if "[3," in a)  # per layer ([L, ...]); not the final carry
    b, t, d, h, k, hd, f = 4, 7, 32, 4, 2, 8, 64
    per_layer = [
        f"f32[3,{b},{t},{d}]",  # the layer's input x
        f"f32[3,{b},{t},{h},{hd}]",  # attn_q (after RoPE)
        f"f32[3,{b},{t},{k},{hd}]",  # attn_k (after RoPE)
        f"f32[3,{b},{t},{k},{hd}]",  # attn_v
        f"f32[3,{b},{t},{h},{hd}]",  # attn_out
        f"f32[3,{b},{t},{d}]",  # resid_mid
        f"f32[3,{b},{t},{f}]",  # mlp_gate
        f"f32[3,{b},{t},{f}]",  # mlp_up
        f"bool[3,{b},{t},{d}]",  # dropout_keep, attention branch
        f"bool[3,{b},{t},{d}]",  # dropout_keep, MLP branch
    ]
    assert stored == sorted(per_layer)


def test_scan_cached_decode_matches_full_forward(params):
    _, stacked = params
    cont = np.random.default_rng(0).integers(3, 64, (4, 4)).astype(np.int32)
    prompt, pmask = TOKENS[2:].repeat(2, 0), MASK[2:].repeat(2, 0)  # left-padded prompts
    full_toks = np.concatenate([prompt, cont], axis=1)
    full_mask = np.concatenate([pmask, np.ones_like(cont)], axis=1)
    graph = _graph(SCAN)

    @jax.jit
    def decode(p):
        m = tr.bind(graph, p)
        cache = tr.init_cache(SCAN, 4, full_toks.shape[1])
        assert cache["layers"]["k"].shape == (3, 4, full_toks.shape[1], 2, 8)
        h, cache = m.hidden(prompt, pmask, cache=cache)
        steps = [m.logits(h)[:, -1]]
        for t in range(cont.shape[1] - 1):
            h, cache = m.hidden(cont[:, t : t + 1], jnp.ones((4, 1), jnp.int32), cache=cache)
            steps.append(m.logits(h)[:, -1])
        return jnp.stack(steps, axis=1), m(full_toks, full_mask)

    inc, full = decode(stacked)
    helpers.assert_close_to_scale(inc, full[:, prompt.shape[1] - 1 : -1])


@pytest.mark.parametrize("out_first", [False, True])
def test_sampler_gives_the_same_tokens_in_both_layouts(params, out_first):
    loop, stacked = params
    cfg = sampler.SamplingConfig(max_new_tokens=6, temperature=1.0, eos_id=2, pad_id=0, out_first_kernels=out_first)
    sample = jax.jit(sampler.sample, static_argnames=("graphdef", "model_cfg", "cfg"))
    prompt, pmask = TOKENS[2:], MASK[2:]
    key = jax.random.key(9)
    out_l = sample(loop, prompt, pmask, key, graphdef=_graph(LOOP), model_cfg=LOOP, cfg=cfg)
    out_s = sample(stacked, prompt, pmask, key, graphdef=_graph(SCAN), model_cfg=SCAN, cfg=cfg)
    np.testing.assert_array_equal(out_s["tokens"], out_l["tokens"])
    helpers.assert_close_to_scale(out_s["logprobs"], out_l["logprobs"])


def test_stacked_params_are_sharded_by_the_rules_with_a_replicated_layer_axis():
    mesh = runtime.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    _, p, specs = pretrain.sharded_init(SCAN, mesh, jax.random.key(0))
    layers = p["layers"]
    # Golden specs: the loop layout's (tests/test_model.py) with None in front for the layer axis.
    assert layers["attn"]["wq"].sharding.spec == P(None, "fsdp", "tensor", None)
    assert layers["attn"]["wk"].sharding.spec == P(None, "fsdp", "tensor", None)
    assert layers["attn"]["wo"].sharding.spec == P(None, "tensor", None, "fsdp")
    assert layers["mlp"]["w_down"].sharding.spec == P(None, "tensor", "fsdp")
    assert layers["attn_norm"]["scale"].sharding.spec in (P(None, None), P(None), P())
    assert p["embed"].sharding.spec == P("tensor", "fsdp")
    assert specs["layers"]["mlp"]["w_gate"] == P(None, "fsdp", "tensor")
    # An ensemble of stacked members: [M, L, ...], members over 'ensemble', layers replicated.
    assert sharding.prefix_ensemble(specs)["layers"]["attn"]["wq"] == P("ensemble", None, "fsdp", "tensor", None)


@pytest.mark.parametrize("kind", export.KINDS)
def test_hf_round_trip_in_the_stacked_layout(params, kind):
    loop, stacked = params
    host_loop, host_stacked = jax.tree.map(np.asarray, (loop, stacked))
    tensors = export.params_to_hf(host_stacked, SCAN, kind=kind)
    ref = export.params_to_hf(host_loop, LOOP, kind=kind)
    assert sorted(tensors) == sorted(ref)
    for name in ref:
        np.testing.assert_array_equal(tensors[name], ref[name], err_msg=name)
    back = pt.hf_to_params(tensors, SCAN, source="test")
    assert "layer_0" not in back
    keys = ["embed", "final_norm", "layers"] + (["reward_head"] if kind == "reward" else [])
    for k in keys:
        jax.tree.map(np.testing.assert_array_equal, back[k], host_stacked[k])


def test_import_model_stage_takes_the_layout_from_gin(tmp_path):
    """`import_model` with ModelConfig.scan_layers bound: stacked params saved, and read back by later stages."""
    import gin

    from tests.test_pretrained import TINY, _write_tiny_hf_dir
    from warm_jax.stages import RunContext

    hf_params = _write_tiny_hf_dir(tmp_path / "hf")
    mesh = runtime.make_mesh({"data": 2, "fsdp": 2}, devices=jax.devices()[:4])
    ctx = RunContext(workdir=str(tmp_path / "work"), mesh=mesh, seed=0)
    with gin.unlock_config():
        gin.bind_parameter("base_model.name", str(tmp_path / "hf"))
        gin.bind_parameter("ModelConfig.scan_layers", True)
    try:
        pretrain.run_import(ctx)
    finally:
        gin.clear_config()
    trunk = ctx.artefacts.load_trunk(ctx.mesh)
    cfg, params, specs = trunk.model_cfg, trunk.params, trunk.specs
    assert cfg == dataclasses.replace(TINY, scan_layers=True)
    assert specs["layers"]["attn"]["wq"][0] is None  # the layer axis is never split
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), b),
        params["layers"],
        tr.stack_layers(hf_params, TINY.n_layers)["layers"],
    )
