"""Merge methods (linear, SLERP, task arithmetic, TIES, DARE): numpy references, degenerate cases,
the registry's errors, shardings on a mesh with the 'ensemble' axis, bf16 leaves, LITI."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from warm_jax import averaging, checkpoints, merge_methods as mm, runtime, sharding
from warm_jax.models import transformer as tr

CFG = tr.ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, max_len=16)
SHAPES = {"w": (6, 5), "b": (7,), "deep": {"k": (3, 4, 2)}}


def _tree(rng, m=None, scale=1.0):
    """A small tree of float32 leaves ([m, ...] when m is given)."""
    lead = () if m is None else (m,)
    return jax.tree.map(
        lambda s: (scale * rng.standard_normal(lead + s)).astype(np.float32),
        SHAPES,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def _flat(tree):
    return dict(checkpoints.named_leaves(tree))


# ----------------------------------------------------------------------------- numpy references


def np_slerp_pair(a, b, t):
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na * nb == 0:
        return (1 - t) * a + t * b
    cos = np.clip(np.sum(a * b) / (na * nb), -1, 1)
    if 1 - abs(cos) <= mm.SLERP_PARALLEL_TOL:
        return (1 - t) * a + t * b
    om = np.arccos(cos)
    return np.sin((1 - t) * om) / np.sin(om) * a + np.sin(t * om) / np.sin(om) * b


def np_merge(method, base, x, w, density=1.0, scaling=1.0, masks=None):
    """float64 reference of one leaf: base [...], x [M, ...], w [M] (None: the method's default)."""
    x = x.astype(np.float64)
    m = x.shape[0]
    if method == "linear":
        w = np.full(m, 1.0 / m) if w is None else np.asarray(w, np.float64)
        return np.tensordot(w / w.sum(), x, 1)
    b = base.astype(np.float64)
    d = x - b
    w = np.ones(m) if w is None else np.asarray(w, np.float64)
    if method == "slerp":
        acc, cum = d[0], w[0]
        for k in range(1, m):
            cum += w[k]
            t = w[k] / cum if cum > 0 else 0.0
            acc = d[k] if t == 1 else acc if t == 0 else np_slerp_pair(acc, d[k], t)
        return b + acc
    if method == "task_arithmetic":
        return b + scaling * np.tensordot(w, d, 1)
    if method == "ties":
        n = d[0].size
        k = max(1, int(np.floor(density * n + 1e-9)))
        flat = d.reshape(m, n)
        trimmed = np.zeros_like(flat)
        for i in range(m):
            top = np.argsort(-np.abs(flat[i]), kind="stable")[:k]
            trimmed[i, top] = flat[i, top]
        elected = np.where(np.tensordot(w, trimmed, 1) >= 0, 1.0, -1.0)
        agree = np.sign(trimmed) == elected
        num = np.tensordot(w, trimmed * agree, 1)
        den = np.tensordot(w, agree.astype(np.float64), 1)
        merged = np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)
        return b + scaling * merged.reshape(b.shape)
    if method == "dare":
        kept = d if masks is None else np.where(masks, d / density, 0.0)
        return b + scaling * np.tensordot(w, kept, 1)
    raise AssertionError(method)


def _dare_masks(key, path, m, shape, density):
    return np.stack([np.asarray(k) for k in mm.dare_masks(mm.leaf_key(key, path), m, shape, density)])


def _check(method, stacked, base, *, w=None, key=None, rtol=2e-6, atol=2e-6, **params):
    out = mm.merge_stacked(stacked, method=method, base=base, weights=w, key=key, **params)
    got, xs = _flat(out), _flat(stacked)
    bs = {} if base is None else {p: np.asarray(x) for p, x in _flat(base).items()}
    density = params.get("density", mm.get_merge_method(method).defaults.get("density", 1.0))
    scaling = params.get("scaling", 1.0)
    for path, x in xs.items():
        masks = None
        if method == "dare" and density < 1:
            masks = _dare_masks(key, path, x.shape[0], x.shape[1:], density)
        want = np_merge(method, bs.get(path), np.asarray(x, np.float32), w, density, scaling, masks)
        assert got[path].dtype == x.dtype and got[path].shape == x.shape[1:], path
        np.testing.assert_allclose(np.asarray(got[path], np.float64), want, rtol=rtol, atol=atol, err_msg=path)
    return out


@pytest.fixture(scope="module")
def trees():
    rng = np.random.default_rng(0)
    base = _tree(rng)
    stacked = jax.tree.map(lambda b, d: b + d, base, _tree(rng, m=3, scale=0.1))
    return base, stacked


@pytest.mark.parametrize(
    "method,params",
    [
        ("linear", {}),
        ("slerp", {}),
        ("task_arithmetic", {}),
        ("task_arithmetic", {"scaling": 0.7}),
        ("ties", {}),
        ("ties", {"density": 0.5, "scaling": 0.8}),
        ("dare", {}),
        ("dare", {"density": 0.3, "scaling": 1.5}),
    ],
)
@pytest.mark.parametrize("weights", [None, [0.2, 0.5, 0.3]])
def test_methods_match_numpy(trees, method, params, weights):
    base, stacked = trees
    _check(method, stacked, base, w=weights, key=jax.random.key(7), **params)


def test_two_member_slerp_is_the_warp_rule(trees):
    base, stacked = trees
    two = jax.tree.map(lambda x: x[:2], stacked)
    for w, t in ((None, 0.5), ([0.7, 0.3], 0.3), ([1.0, 3.0], 0.75)):
        out = _flat(mm.merge_stacked(two, method="slerp", base=base, weights=w))
        for path, x in _flat(two).items():
            b = _flat(base)[path].astype(np.float64)
            d1, d2 = x[0] - b, x[1] - b
            om = np.arccos(np.sum(d1 * d2) / np.linalg.norm(d1) / np.linalg.norm(d2))
            want = b + np.sin((1 - t) * om) / np.sin(om) * d1 + np.sin(t * om) / np.sin(om) * d2
            np.testing.assert_allclose(out[path], want, rtol=2e-6, atol=2e-6, err_msg=path)


def test_slerp_properties():
    base = {"w": np.zeros((4, 8), np.float32) + 0.25}
    rng = np.random.default_rng(1)
    u = rng.standard_normal((4, 8))
    v = rng.standard_normal((4, 8))
    v -= np.sum(u * v) / np.sum(u * u) * u  # orthogonal to u
    v *= np.linalg.norm(u) / np.linalg.norm(v)  # same norm
    pair = {"w": np.stack([base["w"] + u, base["w"] + v]).astype(np.float32)}
    out = mm.merge_stacked(pair, method="slerp", base=base)["w"]
    # Equal-norm orthogonal task vectors: SLERP keeps the norm (the linear mean shrinks it by √2).
    np.testing.assert_allclose(np.linalg.norm(np.asarray(out) - base["w"]), np.linalg.norm(u), rtol=1e-5)
    lin = mm.merge_stacked(pair, method="linear")["w"]
    np.testing.assert_allclose(np.linalg.norm(np.asarray(lin) - base["w"]), np.linalg.norm(u) / np.sqrt(2), rtol=1e-5)
    # Symmetric for equal weights.
    swapped = mm.merge_stacked({"w": pair["w"][::-1]}, method="slerp", base=base)["w"]
    np.testing.assert_allclose(swapped, out, rtol=1e-6, atol=1e-6)
    # t = 0 and t = 1 give the members.
    for w, i in (([1.0, 0.0], 0), ([0.0, 1.0], 1)):
        np.testing.assert_allclose(
            mm.merge_stacked(pair, method="slerp", base=base, weights=w)["w"], pair["w"][i], rtol=1e-6, atol=1e-6
        )


def test_degenerate_cases(trees):
    base, stacked = trees
    one = jax.tree.map(lambda x: x[0], stacked)
    same = jax.tree.map(lambda x: np.stack([x] * 3), one)
    # Identical members: every normalised method gives the member back.
    for method, kw in [
        ("linear", {}),
        ("slerp", {}),
        ("ties", {"density": 1.0}),
        ("task_arithmetic", {}),
        ("dare", {"density": 1.0}),
    ]:
        w = [1 / 3] * 3 if method in ("task_arithmetic", "dare") else None
        out = mm.merge_stacked(same, method=method, base=base, weights=w, key=jax.random.key(0), **kw)
        for path, x in _flat(out).items():
            np.testing.assert_allclose(x, _flat(one)[path], rtol=1e-6, atol=1e-6, err_msg=f"{method} {path}")
    # Linear gives identical members back bit for bit.
    for path, x in _flat(mm.merge_stacked(same, method="linear")).items():
        np.testing.assert_array_equal(x, _flat(one)[path])
    # Members equal to the base (zero task vectors): the base, exactly, for every method.
    at_base = jax.tree.map(lambda x: np.stack([x] * 3), base)
    for method in ("slerp", "task_arithmetic", "ties", "dare"):
        out = mm.merge_stacked(at_base, method=method, base=base, key=jax.random.key(0))
        for path, x in _flat(out).items():
            np.testing.assert_array_equal(x, _flat(base)[path], err_msg=method)
    # Parallel task vectors: SLERP is the weighted mean of the task vectors (= linear).
    delta = jax.tree.map(lambda x, b: x[0] - b, stacked, base)
    par = jax.tree.map(lambda b, d: np.stack([b + d, b + 2.5 * d, b + 0.5 * d]).astype(np.float32), base, delta)
    w = [0.2, 0.5, 0.3]
    s = _flat(mm.merge_stacked(par, method="slerp", base=base, weights=w))
    lin = _flat(mm.merge_stacked(par, method="linear", weights=w))
    for path in s:
        np.testing.assert_allclose(s[path], lin[path], rtol=1e-5, atol=1e-6, err_msg=path)
    # A zero task vector: SLERP falls back to linear interpolation, as does an antiparallel pair.
    for second in (base, jax.tree.map(lambda b, d: b - 2 * d, base, delta)):
        pair = jax.tree.map(lambda x, y: np.stack([x[0], y]).astype(np.float32), par, second)
        got = _flat(mm.merge_stacked(pair, method="slerp", base=base, weights=[0.4, 0.6]))
        for path, x in _flat(pair).items():
            np.testing.assert_allclose(got[path], 0.4 * x[0] + 0.6 * x[1], rtol=1e-5, atol=1e-6, err_msg=path)
    # density = 1: DARE is task arithmetic; TIES is too when the task vectors agree in sign (with
    # its weights normalised: TIES takes a mean).
    ta = _flat(mm.merge_stacked(stacked, method="task_arithmetic", base=base, weights=w, scaling=0.9))
    dare = _flat(
        mm.merge_stacked(stacked, method="dare", base=base, weights=w, key=jax.random.key(3), density=1.0, scaling=0.9)
    )
    for path in ta:
        np.testing.assert_array_equal(dare[path], ta[path])
    agree = jax.tree.map(
        lambda b, d: np.stack([b + np.abs(d), b + 2 * np.abs(d), b + 0.1 * np.abs(d)]).astype(np.float32), base, delta
    )
    ties = _flat(mm.merge_stacked(agree, method="ties", base=base, weights=w, density=1.0))
    ta = _flat(mm.merge_stacked(agree, method="task_arithmetic", base=base, weights=w))
    for path in ties:
        np.testing.assert_allclose(ties[path], ta[path], rtol=1e-6, atol=1e-6)


def test_ties_trims_and_elects_by_mass():
    base = {"w": np.zeros((5,), np.float32)}
    x = np.asarray([[3.0, -1.0, 0.5, 0.0, 2.0], [-1.0, -2.0, 0.2, 4.0, -3.0]], np.float32)
    out = mm.merge_stacked({"w": x}, method="ties", base=base, density=0.6)["w"]
    # Top 3 of each: [3, -1, _, _, 2] and [_, -2, _, 4, -3]; mass [3, -3, 0, 4, -1] elects + - + + -;
    # entry 2: nothing kept (0); entry 4: only -3 agrees.
    np.testing.assert_array_equal(out, [3.0, -1.5, 0.0, 4.0, -3.0])


def test_top_k_mask_is_lax_top_k_with_ties():
    rng = np.random.default_rng(3)
    rows = [
        rng.standard_normal((3, 1000)),
        np.round(rng.standard_normal((3, 1000)) * 2) / 2,  # many equal magnitudes
        np.zeros((3, 1000)),  # all tied at 0
        np.abs(rng.standard_normal((3, 1000))) * 1e-38,  # subnormals
    ]
    for a in rows:
        a = jnp.abs(jnp.asarray(a, jnp.float32))
        for k in (1, 7, 200, 999):
            _, idx = jax.lax.top_k(a, k)
            want = np.zeros(a.shape, bool)
            np.put_along_axis(want, np.asarray(idx), True, axis=1)
            np.testing.assert_array_equal(np.asarray(mm._top_k_mask(a, k)), want, err_msg=f"k={k}")


def test_dare_drops_by_leaf_name_and_member():
    base = {"a": np.zeros((200, 50), np.float32), "b": np.zeros((300, 40), np.float32)}
    x = jax.tree.map(lambda b: np.ones((2, *b.shape), np.float32), base)
    key = jax.random.key(11)
    out = mm.merge_stacked(x, method="dare", base=base, weights=[1.0, 0.0], key=key, density=0.25)
    a = np.asarray(out["a"])
    assert set(np.unique(a)) == {0.0, 4.0}  # dropped, or kept and rescaled by 1/density
    assert abs((a > 0).mean() - 0.25) < 0.02
    # A leaf's draw depends on its name, not on the other leaves: merging "b" alone gives the same.
    alone = mm.merge_stacked(
        {"b": x["b"]}, method="dare", base={"b": base["b"]}, weights=[1.0, 0.0], key=key, density=0.25
    )
    np.testing.assert_array_equal(alone["b"], out["b"])
    # Members draw different masks, leaves too, and another key gives other masks.
    both = np.asarray(mm.merge_stacked(x, method="dare", base=base, key=key, density=0.25)["a"])
    assert 0.05 < (both == 8.0).mean() < 0.08  # kept in both members: ~1/16
    assert not np.array_equal(a[:, :40], np.asarray(out["b"])[:200])
    other = mm.merge_stacked(x, method="dare", base=base, weights=[1.0, 0.0], key=jax.random.key(12), density=0.25)
    assert not np.array_equal(np.asarray(other["a"]), a)


# ----------------------------------------------------------------------------- errors


def test_registry_and_errors(trees):
    base, stacked = trees
    assert set(mm.MERGE_METHODS) >= {"linear", "slerp", "task_arithmetic", "ties", "dare"}
    with pytest.raises(
        ValueError, match=r"unknown merge method 'soup'; known: dare, linear, slerp, task_arithmetic, ties"
    ):
        mm.get_merge_method("soup")
    with pytest.raises(ValueError, match=r"'slerp' needs a base"):
        mm.merge_stacked(stacked, method="slerp")
    with pytest.raises(ValueError, match=r"'dare' needs a PRNG key"):
        mm.merge_stacked(stacked, method="dare", base=base)
    with pytest.raises(ValueError, match=r"'linear' takes no parameter 'density' \(it takes: none\)"):
        mm.merge_stacked(stacked, method="linear", density=0.5)
    with pytest.raises(ValueError, match=r"density=1.5 must be in \(0, 1\]"):
        mm.merge_stacked(stacked, method="ties", base=base, density=1.5)
    with pytest.raises(ValueError, match=r"weights must be finite, >= 0"):
        mm.merge_stacked(stacked, method="task_arithmetic", base=base, weights=[1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match=r"leaf 'w' differs"):
        mm.merge_stacked(stacked, method="ties", base={**base, "w": np.zeros((5, 6), np.float32)})
    with pytest.raises(ValueError, match=r"registered already"):
        mm.register_merge_method("linear")(lambda *a: None)


# ----------------------------------------------------------------------------- mesh, bf16, LITI


@pytest.fixture(scope="module")
def model_stacked():
    """Stacked params of 4 small transformer members and their base, on a mesh with 'ensemble'=2."""
    mesh = runtime.make_mesh({"ensemble": 2, "data": 2, "tensor": 2})
    _, abstract, axes = tr.abstract_model(CFG)
    specs = sharding.tree_specs(axes, abstract, mesh)
    single = sharding.named(mesh, specs)
    base = jax.device_get(tr.init_params(CFG, jax.random.key(0)))
    rng = np.random.default_rng(2)
    host = [jax.tree.map(lambda b: b + 0.05 * rng.standard_normal(b.shape), base) for _ in range(4)]
    stacked = jax.device_put(
        jax.tree.map(lambda *xs: np.stack(xs).astype(np.float32), *host),
        sharding.named(mesh, sharding.prefix_ensemble(specs)),
    )
    return stacked, jax.device_put(base, single), single


@pytest.mark.parametrize("method", ["linear", "slerp", "task_arithmetic", "ties", "dare"])
def test_merge_stacked_on_ensemble_mesh(model_stacked, method):
    stacked, base, single = model_stacked
    w = [0.1, 0.0, 0.6, 0.3]
    out = _check(method, stacked, base, w=w, key=jax.random.key(5), rtol=1e-5, atol=1e-6)
    for (p, x), (_, s) in zip(checkpoints.named_leaves(out), checkpoints.named_leaves(single)):
        assert x.sharding.is_equivalent_to(s, x.ndim), p
    if method == "linear":  # exactly averaging.mean_stacked
        ref = _flat(averaging.mean_stacked(stacked, jnp.asarray(w)))
        for p, x in _flat(out).items():
            np.testing.assert_array_equal(x, ref[p], err_msg=p)
        ref = _flat(averaging.mean_stacked(stacked))
        for p, x in _flat(mm.merge_stacked(stacked, method="linear")).items():
            np.testing.assert_array_equal(x, ref[p], err_msg=p)


@pytest.mark.parametrize("method", ["linear", "slerp", "task_arithmetic", "ties", "dare"])
def test_bf16_leaves(trees, method):
    base, stacked = trees
    bf_base = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), base)
    bf = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), stacked)
    w = [0.2, 0.5, 0.3]
    out = mm.merge_stacked(bf, method=method, base=bf_base, weights=w, key=jax.random.key(1))
    for path, x in _flat(bf).items():
        got = _flat(out)[path]
        assert got.dtype == jnp.bfloat16, path
        density = mm.get_merge_method(method).defaults.get("density", 1.0)
        masks = _dare_masks(jax.random.key(1), path, 3, x.shape[1:], density) if method == "dare" else None
        b = None if method == "linear" else np.asarray(_flat(bf_base)[path], np.float32)
        want = np_merge(method, b, np.asarray(x, np.float32), w, density, 1.0, masks)
        # float32 maths on the bf16 values, one rounding at the end: within one bf16 ulp.
        np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2**-8, atol=1e-6, err_msg=path)


def test_liti(trees):
    base, stacked = trees
    merged = mm.merge_stacked(stacked, method="slerp", base=base)
    for eta, want in ((1.0, merged), (0.0, base)):
        for p, x in _flat(mm.liti(base, merged, eta)).items():
            np.testing.assert_array_equal(x, np.asarray(_flat(want)[p]), err_msg=p)
    for p, x in _flat(mm.liti(base, merged, 0.3)).items():
        b, m = _flat(base)[p].astype(np.float64), np.asarray(_flat(merged)[p], np.float64)
        np.testing.assert_allclose(x, b + 0.3 * (m - b), rtol=1e-6, atol=1e-7)
    bf = mm.liti(
        jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), base),
        jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), merged),
        0.5,
    )
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(bf))
