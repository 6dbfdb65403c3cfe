"""Decoder: sharding follows the rules table, KV-cache decoding, reward pooling, counts."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from tests import helpers
from warm_jax import cpu_tuning, pretrain, runtime, sharding
from warm_jax.models import transformer as tr

CFG = tr.ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_len=32)


@pytest.fixture(scope="module")
def model():
    mesh = runtime.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    graphdef, params, specs = pretrain.sharded_init(CFG, mesh, jax.random.key(0))
    return mesh, graphdef, params, specs


def test_abstract_model_matches_a_traced_init_and_is_cached():
    from flax import nnx

    for cfg in (CFG, tr.ModelConfig(n_layers=3, tie_embeddings=False, param_dtype="bfloat16")):
        graphdef, abstract, axes = tr.abstract_model(cfg)
        # What abstract_model computed before it stopped tracing nnx.Rngs: the same graphdef and trees.
        graphdef0, state0 = nnx.split(nnx.eval_shape(lambda c=cfg: tr.Decoder(c, nnx.Rngs(0))))
        assert graphdef == graphdef0
        assert abstract == nnx.to_pure_dict(state0)
        assert axes == nnx.to_pure_dict(tr._axes_of(state0))
        # Cached, but each caller gets its own dicts.
        abstract["embed"] = None
        axes.clear()
        again = tr.abstract_model(cfg)
        assert again[0] is graphdef and again[1]["embed"] is not None and again[2]


def test_every_parameter_is_annotated_and_sharded_by_the_rules(model):
    mesh, _, params, _ = model
    _, abstract, axes = tr.abstract_model(CFG)
    flat_axes = dict(jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))[0])
    flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
    assert len(flat_axes) == len(flat_params)
    for path, x in flat_params:
        ax = flat_axes[path]
        assert len(ax) == x.ndim, f"{jax.tree_util.keystr(path)}: axes {ax} vs shape {x.shape}"
        expected = NamedSharding(mesh, sharding.logical_to_spec(ax, x.shape, mesh))
        assert x.sharding.is_equivalent_to(expected, x.ndim), jax.tree_util.keystr(path)
    # Golden specs for the rules table (data=2, fsdp=2, tensor=2).
    assert params["embed"].sharding.spec == P("tensor", "fsdp")
    assert params["layer_0"]["attn"]["wq"].sharding.spec == P("fsdp", "tensor", None)
    assert params["layer_0"]["attn"]["wk"].sharding.spec == P("fsdp", "tensor", None)
    assert params["layer_0"]["mlp"]["w_down"].sharding.spec == P("tensor", "fsdp")
    assert params["reward_head"]["bias"].sharding.spec in (P(None), P())
    assert params["final_norm"]["scale"].sharding.spec in (P(None), P())


def test_indivisible_dimension_is_replicated_not_an_error():
    mesh = runtime.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    # 3 KV heads (SmolLM2) on a tensor axis of 2: that dimension stays replicated.
    assert sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), (576, 3, 64), mesh) == P("fsdp", None, None)


def test_prefix_ensemble_marks_every_leaf_and_rejects_a_missing_one():
    specs = {"a": P("fsdp", None), "b": {"c": P()}}
    out = sharding.prefix_ensemble(specs)
    assert out == {"a": P("ensemble", "fsdp", None), "b": {"c": P("ensemble")}}
    with pytest.raises(ValueError, match=r"\['b'\]\['c'\]"):
        sharding.assert_ensemble_leading({"a": P("ensemble"), "b": {"c": P(None)}})


def test_mesh_sizes_and_errors():
    mesh = runtime.make_mesh({"ensemble": 2, "data": -1, "tensor": 2})
    assert dict(mesh.shape) == {"ensemble": 2, "data": 2, "fsdp": 1, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(ValueError, match="needs 16 devices"):
        runtime.make_mesh({"ensemble": 2, "data": 8})
    with pytest.raises(ValueError, match="unknown axes"):
        runtime.make_mesh({"model": 8})


def _left_pad(rows, width, pad=0):
    toks = np.full((len(rows), width), pad, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        toks[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return jnp.asarray(toks), jnp.asarray(mask)


def test_cpu_tuning_is_an_opt_in_per_program_kind_and_falls_back_when_refused(caplog):
    x = jnp.ones((64, 64))
    eltwise = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_ELTWISE"}
    with helpers.gin_config([]):
        assert cpu_tuning.compiler_options(cpu_tuning.TRAIN_STEP) == {}  # off unless asked for
    with helpers.gin_config(["cpu_tuning.enabled = True"]):
        assert cpu_tuning.compiler_options(cpu_tuning.TRAIN_STEP) == eltwise
        assert cpu_tuning.compiler_options(cpu_tuning.DECODE) == {}  # decoding keeps XLA's default
        with pytest.raises(ValueError, match="unknown program kind 'prefill'"):
            cpu_tuning.compiler_options("prefill")
    # The option reaches the compiled program: YNNPACK no longer takes the dot.
    assert "ynn" not in jax.jit(lambda a: a @ a, compiler_options=eltwise).lower(x).compile().as_text()
    assert cpu_tuning.cpu_options("") == {}
    # A value this jaxlib refuses gives XLA's default and a warning, not a crash.
    assert cpu_tuning.cpu_options("NOT_A_FUSION_TYPE") == {}
    assert "not supported" in caplog.text


def test_kv_cache_decoding_matches_full_forward_with_left_padding(model):
    _, graphdef, params, _ = model
    m = tr.bind(graphdef, params)
    rng = np.random.default_rng(0)
    rows = [list(rng.integers(3, 64, n)) for n in (7, 4, 9)]
    cont = rng.integers(3, 64, (3, 5)).astype(np.int32)
    ptoks, pmask = _left_pad(rows, 9)
    full_toks = jnp.concatenate([ptoks, cont], axis=1)
    full_mask = jnp.concatenate([pmask, jnp.ones_like(cont)], axis=1)
    full = m(full_toks, full_mask)
    cache = tr.init_cache(CFG, 3, 16)
    h, cache = m.hidden(ptoks, pmask, cache=cache)
    steps = [m.logits(h)[:, -1]]
    for t in range(cont.shape[1]):
        h, cache = m.hidden(jnp.asarray(cont[:, t : t + 1]), jnp.ones((3, 1), jnp.int32), cache=cache)
        steps.append(m.logits(h)[:, -1])
    inc = jnp.stack(steps[:-1], axis=1)
    helpers.assert_close_to_scale(inc, full[:, 8:-1])
    # And the padded forward equals an unpadded forward of each row alone.
    for i, r in enumerate(rows):
        alone = m(jnp.asarray([r + list(cont[i])], jnp.int32), jnp.ones((1, len(r) + 5), jnp.int32))
        helpers.assert_close_to_scale(alone[0, -1], full[i, -1])


def test_the_kernel_layout_is_not_part_of_a_saved_model():
    # A model.json from before the decode layout moved to the sampler still describes the same model.
    assert "out_first_kernels" not in {f.name for f in dataclasses.fields(tr.ModelConfig)}
    assert tr.config_from_dict({**dataclasses.asdict(CFG), "out_first_kernels": False}) == CFG
    with pytest.raises(TypeError, match="n_layer"):
        tr.config_from_dict({**dataclasses.asdict(CFG), "n_layer": 2})  # a real typo still fails


@pytest.mark.parametrize("tied", [True, False])
def test_out_first_kernels_compute_the_same_model(tied):
    """The sampler's decode view: kernels [*out, *in] (tr.kernels_out_first) give the same logits, and
    their shapes and logical axes are those the out-first view declares, in both layer layouts."""
    cfg = dataclasses.replace(CFG, tie_embeddings=tied)
    params = jax.jit(lambda k: tr.init_params(cfg, k))(jax.random.key(1))
    converted = tr.kernels_out_first(params)
    graph, abstract, axes = tr.abstract_model(cfg, out_first=True)
    assert jax.tree.map(lambda x: x.shape, converted) == jax.tree.map(lambda x: x.shape, abstract)
    _, _, in_axes = tr.abstract_model(cfg)
    assert axes["layer_0"]["attn"]["wo"] == ("embed", "heads", "head_dim") != in_axes["layer_0"]["attn"]["wo"]
    assert axes["layer_0"]["mlp"]["w_gate"] == ("mlp", "embed")
    assert tied or axes["lm_head"] == ("vocab", "embed")
    toks, mask = _left_pad([[5, 6, 7], [8, 9]], 4)
    ref = tr.bind(tr.abstract_model(cfg)[0], params)(toks, mask)
    helpers.assert_close_to_scale(tr.bind(graph, converted)(toks, mask), ref)
    # The stacked layout converts the same way (the layer axis leads).
    stacked = tr.kernels_out_first(tr.stack_layers(params, cfg.n_layers))
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, stacked, tr.stack_layers(converted, cfg.n_layers))))


def test_reward_pooling_left_and_right_padding(model):
    _, graphdef, params, _ = model
    m = tr.bind(graphdef, params)
    seqs = [[5, 6, 7, 8, 9], [10, 11, 12]]
    width = 7
    right = np.zeros((2, width), np.int32)
    rmask = np.zeros((2, width), np.int32)
    for i, s in enumerate(seqs):
        right[i, : len(s)] = s
        rmask[i, : len(s)] = 1
    left, lmask = _left_pad(seqs, width)
    r_right = m.reward(m.hidden(jnp.asarray(right), jnp.asarray(rmask))[0], jnp.asarray(rmask))
    r_left = m.reward(m.hidden(left, lmask)[0], lmask)
    for i, s in enumerate(seqs):
        ones = jnp.ones((1, len(s)), jnp.int32)
        r_alone = m.reward(m.hidden(jnp.asarray([s]), ones)[0], ones)[0]
        np.testing.assert_allclose(r_right[i], r_alone, atol=1e-5)
        np.testing.assert_allclose(r_left[i], r_alone, atol=1e-5)
    # Padding really is ignored: changing pad token ids changes nothing.
    right2 = np.where(rmask > 0, right, 33)
    r_right2 = m.reward(m.hidden(jnp.asarray(right2), jnp.asarray(rmask))[0], jnp.asarray(rmask))
    np.testing.assert_allclose(r_right2, r_right, atol=1e-5)


def test_right_padded_length_mask_equals_the_dense_mask_at_every_position():
    """``right_padded`` hands jax.nn.dot_product_attention causal + key lengths instead of a dense mask
    (what the cuDNN kernel takes without a [B, H, T, S] bias); 'auto' runs jax's own implementation
    of that on the CPU. Every position — pad queries too — and the gradients must be unchanged."""
    import dataclasses

    rng = np.random.default_rng(1)
    lengths = np.array([9, 3, 1, 6])
    tokens = jnp.asarray(rng.integers(3, 64, (4, 9)), jnp.int32)
    mask = jnp.asarray(np.arange(9)[None] < lengths[:, None], jnp.int32)
    params = tr.init_params(CFG, jax.random.key(3))

    def hidden(attention, right_padded):
        graphdef = tr.abstract_model(dataclasses.replace(CFG, attention=attention))[0]

        def f(p):
            h, _ = tr.bind(graphdef, p).hidden(tokens, mask, right_padded=right_padded)
            return h

        h, vjp = jax.vjp(f, params)
        return h, vjp(jnp.asarray(rng.standard_normal(h.shape), h.dtype))[0]

    rng_state = rng.bit_generator.state
    h_dense, g_dense = hidden("xla", False)
    rng.bit_generator.state = rng_state  # the same cotangent for both
    h_len, g_len = hidden("auto", True)
    helpers.assert_close_to_scale(h_len, h_dense)
    for a, b in zip(jax.tree.leaves(g_len), jax.tree.leaves(g_dense)):
        helpers.assert_close_to_scale(a, b)


def test_value_head_shape_and_counts(model):
    _, graphdef, params, _ = model
    m = tr.bind(graphdef, params)
    h, _ = m.hidden(jnp.ones((2, 5), jnp.int32), jnp.ones((2, 5), jnp.int32))
    assert m.value(h).shape == (2, 5)
    d, f, v = CFG.d_model, CFG.d_ff, CFG.vocab_size
    hd = CFG.dim_head
    per_layer = d * 4 * hd + 2 * d * 2 * hd + 4 * hd * d + 3 * d * f + 2 * d
    expected = v * d + CFG.n_layers * per_layer + d + 2 * (d + 1)
    assert tr.param_count(params) == expected
    assert tr.flops_per_token(CFG, 16) > 6 * (expected - v * d)


def test_dropout_keeps_one_minus_rate_unbiased_per_member_rate():
    """Keep fraction ≈ 1 − rate for each member's traced rate (5σ), kept values scaled by exactly the
    inverse keep probability, rate 0 the identity, rate 1 all zeros, an odd last axis covered, the same
    key the same mask and another key another mask."""
    x = jnp.ones((64, 40, 33), jnp.float32)  # odd last axis: the 16-bit halves are cut to fit
    rates = jnp.array([0.0, 0.1, 0.5, 1.0, 0.1], jnp.float32)
    keys = jax.random.split(jax.random.key(7), rates.shape[0])
    f = jax.jit(jax.vmap(tr.dropout, in_axes=(None, 0, 0)))
    y = np.asarray(f(x, rates, keys))
    np.testing.assert_array_equal(y, np.asarray(f(x, rates, keys)))
    np.testing.assert_array_equal(y[0], 1.0)
    np.testing.assert_array_equal(y[3], 0.0)
    assert (y[1] != y[4]).mean() > 0.1  # same rate, other key: another mask
    for i in (1, 2):
        rate = float(rates[i])
        kept = y[i] != 0
        assert abs(kept.mean() - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / x.size), (rate, kept.mean())
        np.testing.assert_allclose(y[i][kept], 65536 / (65536 - round(rate * 65536)), rtol=1e-6)
    # Elements j and j + 17 take the two halves of one 32-bit word: at rate 0.5 both drop a quarter of the time.
    dropped = y[2] == 0
    both = (dropped[..., :16] & dropped[..., 17:33]).mean()
    assert abs(both - 0.25) < 0.02, both


@pytest.mark.parametrize("residual", [False, True], ids=["mlp_only", "mlp_and_residual"])
@pytest.mark.parametrize("scan", [False, True], ids=["per_layer", "scanned"])
def test_permuted_hidden_units_compute_the_same_function_from_other_weights(scan, residual):
    """The LMC negative control's member: every layer's MLP units (and the residual stream's coordinates)
    reordered — logits and reward unchanged up to the rounding of reordered sums, while the MLP weights (every
    weight but the biases) moved and nothing else did."""
    cfg = dataclasses.replace(CFG, scan_layers=scan, tie_embeddings=not residual)
    graphdef = tr.abstract_model(cfg)[0]
    params = tr.init_params(cfg, jax.random.key(0))
    # Trained-looking norm scales and a non-zero bias, so that "moved" means permuted, not just changed.
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x * (1.0 + 0.1 * jnp.arange(x.shape[-1])) if "scale" in jax.tree_util.keystr(p) else x, params
    )
    params = {**params, "reward_head": {**params["reward_head"], "bias": jnp.full((1,), 0.3)}}
    permuted = jax.jit(functools.partial(tr.permute_hidden_units, residual=residual))(params, jax.random.key(5))
    toks, mask = _left_pad([[5, 6, 7, 8], [9, 10]], 5)
    for fn in (lambda m: m(toks, mask), lambda m: m.reward(m.hidden(toks, mask)[0], mask)):
        helpers.assert_close_to_scale(fn(tr.bind(graphdef, permuted)), fn(tr.bind(graphdef, params)), rel=1e-5)
    flat_a = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    flat_b = dict(jax.tree_util.tree_flatten_with_path(permuted)[0])
    for path, a in flat_a.items():
        name = jax.tree_util.keystr(path)
        moved = not np.array_equal(np.asarray(a), np.asarray(flat_b[path]))
        assert moved == (("['bias']" not in name) if residual else ("['mlp']" in name)), name
