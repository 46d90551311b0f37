"""Fast layers and the fast round: equal to XLA's operations and to the plain round."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from fljax import client, fast, simulation
from fljax import nn as fnn
from fljax.algorithms import fedavg
from fljax.base import ClientData, Cohort, Performance
from fljax.models import zoo
from fljax.nn import layers
from tests import helpers

TOL = dict(rtol=2e-4, atol=2e-5)
DN = ("NHWC", "HWIO", "NHWC")


def close(a, b, **tol):
    helpers.assert_trees_close(a, b, **(tol or TOL))


def primitives(fn, *args):
    names = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            names.add(eqn.primitive.name)
            for v in eqn.params.values():
                vs = v if isinstance(v, tuple) else (v,)
                for j in vs:
                    if isinstance(j, jax.extend.core.ClosedJaxpr):
                        walk(j.jaxpr)
                    elif isinstance(j, jax.extend.core.Jaxpr):
                        walk(j)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return names


CONV_CASES = [
    # (input spatial, kernel, strides, padding, rhs_dilation, cin, cout)
    ((7, 7), (5, 5), (1, 1), "VALID", (1, 1), 3, 6),
    ((9, 8), (3, 3), (2, 1), "SAME", (1, 1), 2, 4),
    ((9, 9), (3, 2), (1, 2), ((1, 2), (0, 1)), (2, 1), 4, 3),
    ((7, 7), (1, 1), (2, 2), "VALID", (1, 1), 5, 7),
    ((10,), (3,), (2,), "SAME", (2,), 3, 4),
    ((6, 7, 5), (3, 2, 3), (1, 2, 2), "SAME", (1, 1, 2), 2, 3),
]


@pytest.mark.parametrize("layout", ["banded", "channels_last"])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_matches_xla_vmapped_values_and_gradients(case, layout):
    spatial, kernel, strides, padding, rd, cin, cout = case
    clients, batch = 3, 2
    nsp = len(spatial)
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k1, (clients, batch, *spatial, cin))
    w = jax.random.normal(k2, (clients, *kernel, cin, cout))
    lhs = {1: "NWC", 2: "NHWC", 3: "NDHWC"}[nsp]
    rhs = {1: "WIO", 2: "HWIO", 3: "DHWIO"}[nsp]
    dn = (lhs, rhs, lhs)

    def make(conv):
        def loss(w, x):
            y = conv(x, w, strides, padding, rhs_dilation=rd, dimension_numbers=dn)
            return jnp.sum(jnp.sin(y)), y

        return jax.jit(jax.vmap(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)))

    fast_conv = functools.partial(fnn.conv_general_dilated, impl="matmul", layout=layout)
    (_, y1), g1 = make(lax.conv_general_dilated)(w, x)
    (_, y2), g2 = make(fast_conv)(w, x)
    # Unit-normal weights: outputs and gradients of order 10, so float32
    # reassociation reaches 1e-5 in absolute terms.
    close(y1, y2, rtol=2e-4, atol=1e-4)
    close(g1, g2, rtol=2e-4, atol=1e-4)
    assert "conv_general_dilated" not in primitives(make(fast_conv), w, x)


@pytest.mark.parametrize("layout", ["auto", "banded", "channels_last", "channels_first"])
def test_conv_layouts_and_dimension_numbers(layout):
    x = jax.random.normal(jax.random.key(1), (2, 3, 8, 9))  # NCHW
    w = jax.random.normal(jax.random.key(2), (4, 3, 3, 3))  # OIHW
    conv = functools.partial(fnn.conv_general_dilated, impl="matmul", layout=layout)
    close(lax.conv_general_dilated(x, w, (2, 1), "SAME"), conv(x, w, (2, 1), "SAME"))
    xh, wh = jnp.transpose(x, (0, 2, 3, 1)), jnp.transpose(w, (2, 3, 1, 0))
    dn = ("NHWC", "HWIO", "NHWC")
    loss = lambda conv: (
        lambda w, x: jnp.sum(jnp.sin(conv(x, w, (1, 2), ((1, 0), (2, 1)), dimension_numbers=dn)))
    )
    grads = lambda conv: jax.jit(jax.vmap(jax.grad(loss(conv), argnums=(0, 1))))(
        jnp.stack([wh, 2 * wh]), jnp.stack([xh, xh])
    )
    close(grads(conv), grads(lax.conv_general_dilated))
    with pytest.raises(ValueError, match="layout"):
        fnn.conv_general_dilated(x, w, (1, 1), "SAME", impl="matmul", layout="nchw")


def test_auto_layout_is_banded_where_it_pays_and_im2col_elsewhere():
    dn = ("NHWC", "HWIO", "NHWC")

    def jaxpr(layout, width, cin=3, cout=6):
        x = jnp.zeros((2, 8, width, cin))
        w = jnp.zeros((5, 5, cin, cout))
        conv = lambda x, w: fnn.conv_general_dilated(
            x, w, (1, 1), "VALID", dimension_numbers=dn, impl="matmul", layout=layout
        )
        return str(jax.make_jaxpr(conv)(x, w))

    # LeNet's convolutions (28 and 10 outputs wide, 5x5 kernels): one band, no tiles.
    assert fnn.banded_pays(28, 5, rows_factor=5 * 3, cout=6) and fnn.banded_pays(
        10, 5, rows_factor=5 * 6, cout=16
    )
    assert fnn.band_tile(28, 5, rows_factor=5 * 3, cout=6) == 28
    assert jaxpr("auto", 32) == jaxpr("banded", 32) != jaxpr("channels_last", 32)
    # 224 wide: tiles of 22+ outputs keep the band narrow, so still banded.
    assert 22 <= fnn.band_tile(220, 5, rows_factor=15, cout=6) < 220
    assert jaxpr("auto", 224) == jaxpr("banded", 224)
    # One output channel, 224 wide: a tile must be 128 outputs wide, 26x the work.
    assert not fnn.banded_pays(220, 5, rows_factor=15, cout=1)
    assert jaxpr("auto", 224, 3, 1) == jaxpr("channels_last", 224, 3, 1) != jaxpr("banded", 224, 3, 1)
    # Many channels: even a one-column tile's band would be too large.
    assert not fnn.banded_pays(28, 5, rows_factor=5 * 256, cout=256)
    assert jaxpr("auto", 32, 256, 256) == jaxpr("channels_last", 32, 256, 256)


def test_bad_layout_is_a_clear_error_everywhere():
    x, w = jnp.zeros((1, 8, 8, 3)), jnp.zeros((3, 3, 3, 4))
    match = "layout must be one of .*got 'diagonal'"
    for impl in fnn.IMPLS:  # checked whichever implementation runs
        with pytest.raises(ValueError, match=match):
            fnn.conv_general_dilated(
                x, w, (1, 1), "VALID", dimension_numbers=DN, impl=impl, layout="diagonal"
            )
    with pytest.raises(ValueError, match=match):
        fnn.Conv(4, (3, 3), layout="diagonal")
    with pytest.raises(ValueError, match=match):
        fast.accelerate(lambda x: x, layout="diagonal")  # when accelerate is called, not traced
    with pytest.raises(ValueError, match=match):
        zoo.LeNet(conv_layout="diagonal").init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


@pytest.mark.parametrize("min_columns", [1, 12])
def test_banded_tiles_match_xla(monkeypatch, min_columns):
    # Narrow tiles (down to one output column, and tiles that overrun the width)
    # compute the same convolution and gradients.
    monkeypatch.setattr(layers, "BANDED_MIN_COLUMNS", min_columns)
    for case in CONV_CASES:
        test_conv_matches_xla_vmapped_values_and_gradients(case, "banded")


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(feature_group_count=2),
        dict(lhs_dilation=(2, 2), padding=((1, 1), (1, 1))),
        dict(padding=((-1, 0), (0, 0))),
    ],
)
def test_unsupported_conv_falls_back_to_xla(kwargs):
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
    w = jax.random.normal(jax.random.key(2), (3, 3, 4 // kwargs.get("feature_group_count", 1), 6))
    padding = kwargs.pop("padding", "VALID")
    dn = ("NHWC", "HWIO", "NHWC")
    want = lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=dn, **kwargs)
    got = fnn.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=dn, impl="matmul", **kwargs)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert not fnn.supports_conv(x.shape, w.shape, (1, 1), padding, dimension_numbers=dn, **kwargs)
    fn = lambda x, w: fast.accelerate(
        lambda x, w: lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=dn, **kwargs),
        impl="matmul",
    )(x, w)
    assert "conv_general_dilated" in primitives(fn, x, w)


def test_impl_argument():
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    w = jax.random.normal(jax.random.key(2), (3, 3, 3, 4))
    conv = lambda impl: (
        lambda x, w: fnn.conv_general_dilated(x, w, (1, 1), "VALID", impl=impl, dimension_numbers=DN)
    )
    pool = lambda impl: lambda x: fnn.max_pool(x, (2, 2), (2, 2), impl=impl)
    assert "conv_general_dilated" in primitives(conv("xla"), x, w)
    assert "conv_general_dilated" not in primitives(conv("matmul"), x, w)
    assert "reduce_window_max" in primitives(pool("xla"), x)
    assert "reduce_window_max" not in primitives(pool("matmul"), x)
    # "auto" (the default) is the matmul form on CPU.
    assert "conv_general_dilated" not in primitives(conv("auto"), x, w)
    assert "reduce_window_max" not in primitives(pool("auto"), x)
    assert str(jax.make_jaxpr(conv("auto"))(x, w)) == str(
        jax.make_jaxpr(lambda x, w: fnn.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=DN))(
            x, w
        )
    )
    m = TinyCNN()
    params = zoo.init_params(m, (8, 8, 3), jax.random.key(0))
    assert "conv_general_dilated" in primitives(fast.accelerate(m.apply, impl="xla"), params, x)
    assert "conv_general_dilated" not in primitives(fast.accelerate(m.apply), params, x)


@pytest.mark.parametrize("impl", [None, "fastest", "XLA"])
def test_bad_impl_is_a_clear_error_everywhere(impl):
    x, w = jnp.zeros((1, 8, 8, 3)), jnp.zeros((3, 3, 3, 4))
    match = f"impl must be one of .*got {impl!r}"
    with pytest.raises(ValueError, match=match):
        fnn.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=DN, impl=impl)
    with pytest.raises(ValueError, match=match):
        fnn.max_pool(x, (2, 2), (2, 2), impl=impl)
    with pytest.raises(ValueError, match=match):
        fnn.Conv(4, (3, 3), impl=impl)
    with pytest.raises(ValueError, match=match):
        fast.accelerate(lambda x: x, impl=impl)
    with pytest.raises(ValueError, match=match):
        zoo.LeNet(conv_impl=impl).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_jitted_functions_with_different_impls_coexist():
    # No hidden state: each jitted function keeps the choice it was given, whatever
    # was compiled or called before it in the same process.
    x = jax.random.normal(jax.random.key(1), (2, 10, 10, 3))
    w = jax.random.normal(jax.random.key(2), (3, 3, 3, 4))

    def net(impl, layout="auto"):
        def f(x, w):
            y = fnn.conv_general_dilated(
                x, w, (1, 1), "VALID", dimension_numbers=DN, impl=impl, layout=layout
            )
            return fnn.max_pool(jnp.tanh(y), (2, 2), (2, 2), impl=impl)

        return jax.jit(f)

    f_xla, f_matmul, f_cl = net("xla"), net("matmul"), net("matmul", "channels_last")
    first_xla = f_xla(x, w)
    got = [f_matmul(x, w), f_cl(x, w), f_xla(x, w), f_matmul(x, w)]
    for y in got:
        close(y, first_xla)
    assert "conv_general_dilated" in primitives(f_xla, x, w)
    assert "conv_general_dilated" not in primitives(f_matmul, x, w)
    assert str(jax.make_jaxpr(f_matmul)(x, w)) != str(jax.make_jaxpr(f_cl)(x, w))  # banded vs im2col
    # The same through accelerate.
    m = TinyCNN()
    params = zoo.init_params(m, (10, 10, 3), jax.random.key(0))
    applies = [jax.jit(fast.accelerate(m.apply, impl=impl)) for impl in ("xla", "matmul", "xla")]
    outs = [apply(params, x) for apply in applies]
    close(outs[1], outs[0])
    np.testing.assert_array_equal(outs[2], outs[0])


class ImplVariantsTest(chex.TestCase):
    """Every implementation and layout, jitted or not, computes the same layers."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_layers_agree_across_impls_and_layouts(self):
        x = jax.random.normal(jax.random.key(1), (2, 11, 9, 3))
        m = fnn.Conv(5, (3, 3), strides=(1, 2), padding="SAME")
        params = m.init(jax.random.key(0), x)
        want = nn.max_pool(
            nn.Conv(5, (3, 3), strides=(1, 2), padding="SAME").apply(params, x), (2, 2), (2, 2)
        )
        for impl in fnn.IMPLS:
            for layout in fnn.LAYOUTS:
                layer = m.clone(impl=impl, layout=layout)
                f = self.variant(
                    lambda p, x, layer=layer, impl=impl: fnn.max_pool(
                        layer.apply(p, x), (2, 2), (2, 2), impl=impl
                    )
                )
                chex.assert_trees_all_close(f(params, x), want, **TOL)


def test_conv_module_matches_flax_conv():
    x = jax.random.normal(jax.random.key(1), (2, 9, 9, 3))
    m = fnn.Conv(5, (3, 3), strides=2, padding="SAME")
    params = m.init(jax.random.key(0), x)
    close(m.apply(params, x), nn.Conv(5, (3, 3), strides=2, padding="SAME").apply(params, x))


@pytest.mark.parametrize("shape,window", [((3, 8, 8, 4), (2, 2)), ((2, 9, 7, 3), (2, 3)), ((4, 10, 2), (2,))])
def test_max_pool_matches_flax_values_and_gradients(shape, window):
    x = jax.random.normal(jax.random.key(3), shape)
    # Ties (including all-zero windows after a ReLU) go to the first maximum, as in XLA.
    x = jnp.where(x < 0.3, 0.0, jnp.round(x * 2) / 2)
    out_shape = nn.max_pool(x, window, window).shape
    scale = jnp.arange(1.0, 1.0 + np.prod(out_shape)).reshape(out_shape)
    want = lambda x: jnp.sum(jnp.sin(nn.max_pool(x, window, window)) * scale)
    got = lambda x: jnp.sum(jnp.sin(fnn.max_pool(x, window, window, impl="matmul")) * scale)
    np.testing.assert_array_equal(
        fnn.max_pool(x, window, window, impl="matmul"), nn.max_pool(x, window, window)
    )
    np.testing.assert_array_equal(jax.grad(got)(x), jax.grad(want)(x))


def test_overlapping_or_padded_pool_falls_back():
    x = jax.random.normal(jax.random.key(3), (2, 8, 8, 3))
    np.testing.assert_array_equal(
        fnn.max_pool(x, (3, 3), (2, 2), impl="matmul"), nn.max_pool(x, (3, 3), (2, 2))
    )
    np.testing.assert_array_equal(
        fnn.max_pool(x, (2, 2), (2, 2), "SAME", impl="matmul"), nn.max_pool(x, (2, 2), (2, 2), "SAME")
    )
    assert not fnn.supports_pool((3, 3), (2, 2), "VALID")
    assert not fnn.supports_pool((2, 2), None, "VALID")


def small_lenet():
    return zoo.LeNet(num_classes=5)


class TinyCNN(nn.Module):
    """Conv-ReLU-MaxPool-Dense: the LeNet pattern at test size (8x8 images)."""

    @nn.compact
    def __call__(self, x):
        x = nn.max_pool(nn.relu(nn.Conv(4, (3, 3), padding="VALID")(x)), (2, 2), (2, 2))
        return nn.Dense(5)(x.reshape(x.shape[0], -1))


def test_accelerate_values_gradients_and_vmap():
    m = TinyCNN()
    params = zoo.init_params(m, (8, 8, 3), jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (2, 3, 8, 8, 3))
    cohort_params = jax.tree.map(
        lambda p: p[None] + 0.01 * jnp.arange(2.0).reshape((2,) + (1,) * p.ndim), params
    )
    apply = fast.accelerate(m.apply, impl="matmul")
    loss = lambda apply: lambda p, x: jnp.sum(jnp.tanh(apply(p, x)))
    want = jax.jit(jax.vmap(jax.value_and_grad(loss(m.apply))))(cohort_params, x)
    got = jax.jit(jax.vmap(jax.value_and_grad(loss(apply))))(cohort_params, x)
    close(got, want)


def test_accelerate_rewrites_the_zoo_lenet_with_xla_layers():
    m = zoo.LeNet(num_classes=5, conv_impl="xla")
    params = zoo.init_params(m, (16, 16, 3), jax.random.key(0))
    x = jnp.zeros((2, 2, 16, 16, 3))
    cohort_params = jax.tree.map(lambda p: jnp.stack([p, p]), params)
    grad = jax.vmap(jax.grad(lambda p, x: jnp.sum(fast.accelerate(m.apply, impl="matmul")(p, x))))
    names = primitives(grad, cohort_params, x)
    assert "conv_general_dilated" not in names
    assert "reduce_window_max" not in names and "select_and_scatter_add" not in names
    assert "conv_general_dilated" in primitives(m.apply, params, x[0])


def test_accelerate_finds_nothing_to_rewrite_in_the_default_zoo_lenet():
    # The zoo's LeNet already uses fljax.nn's layers ("auto": matmul forms on CPU),
    # so accelerate calls it unchanged, and it computes what the rewritten
    # XLA-layer LeNet computes, bit for bit (same ops, same tile hints).
    m = small_lenet()
    params = zoo.init_params(m, (16, 16, 3), jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (3, 16, 16, 3))
    names = primitives(m.apply, params, x)
    assert "conv_general_dilated" not in names and "reduce_window_max" not in names
    assert str(jax.make_jaxpr(fast.accelerate(m.apply))(params, x)) == str(jax.make_jaxpr(m.apply)(params, x))
    rewritten = fast.accelerate(zoo.LeNet(num_classes=5, conv_impl="xla").apply)
    loss = lambda apply: lambda p: jnp.sum(jnp.sin(apply(p, x)))
    np.testing.assert_array_equal(jax.jit(m.apply)(params, x), jax.jit(rewritten)(params, x))
    helpers.assert_trees_equal(
        jax.jit(jax.grad(loss(m.apply)))(params), jax.jit(jax.grad(loss(rewritten)))(params)
    )


def test_accelerate_rewrites_inside_jit_and_scan_and_keeps_static_arguments():
    w = jax.random.normal(jax.random.key(2), (3, 3, 2, 2))
    x = jax.random.normal(jax.random.key(1), (1, 6, 6, 2))
    dn = ("NHWC", "HWIO", "NHWC")
    conv = jax.jit(lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn))

    def fn(w, x, *, times):
        def body(x, _):
            return jnp.tanh(conv(x, w)), None

        return jax.lax.scan(body, x, None, length=times)[0]

    fa = fast.accelerate(fn, impl="matmul")
    close(fa(w, x, times=3), fn(w, x, times=3))
    assert "conv_general_dilated" not in primitives(lambda w, x: fa(w, x, times=3), w, x)
    close(
        jax.grad(lambda w: jnp.sum(fa(w, x, times=2)))(w), jax.grad(lambda w: jnp.sum(fn(w, x, times=2)))(w)
    )


def test_accelerate_leaves_models_without_convolutions_alone():
    m = zoo.MLP(hidden=(8,), num_classes=3)
    params = zoo.init_params(m, (5,), jax.random.key(0))
    x = jnp.ones((2, 5))
    assert str(jax.make_jaxpr(fast.accelerate(m.apply, impl="matmul"))(params, x)) == str(
        jax.make_jaxpr(m.apply)(params, x)
    )


def test_compute_dtype_float32_is_identity_and_bfloat16_runs():
    m = small_lenet()
    params = zoo.init_params(m, (16, 16, 3), jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    np.testing.assert_array_equal(
        fast.with_compute_dtype(m.apply, jnp.float32)(params, x), m.apply(params, x)
    )
    out = fast.with_compute_dtype(m.apply, jnp.bfloat16)(params, x)
    assert out.dtype == jnp.float32
    close(out, m.apply(params, x), rtol=0.1, atol=0.1)


def make_cohort(num_clients=4, num_examples=20, image=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_clients, num_examples, image, image, 3)).astype(np.float32)
    y = rng.integers(0, 5, (num_clients, num_examples)).astype(np.int32)
    mask = np.ones((num_clients, num_examples), bool)
    mask[1, 13:] = False  # a smaller client: partial and padding minibatches
    mask[3] = False  # a client without data
    return Cohort(
        ClientData(jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask)),
        jnp.arange(num_clients, dtype=jnp.int32),
        jnp.asarray(mask.any(axis=1)),
    )


def round_result(cohort, model=None, chunk_size=None, **settings):
    """One FedAvg round of ``model`` (default :class:`TinyCNN`); ``settings`` are
    :class:`fljax.base.Performance` fields."""
    m = TinyCNN() if model is None else model
    params = zoo.init_params(m, (8, 8, 3), jax.random.key(0))
    update = client.local_sgd(m, optax.sgd(0.05, momentum=0.9), batch_size=8)
    algo = fedavg.fedavg(update).with_performance(Performance(chunk_size=chunk_size, **settings))
    state, metrics = jax.jit(algo.update)(algo.init(params), cohort, jax.random.key(7))
    return state.params, metrics


def test_fast_round_equals_plain_round_loop_and_chunked():
    cohort = make_cohort()
    plain = round_result(cohort, accelerate=False)
    fast_round = round_result(cohort)  # default: accelerated on CPU
    close(fast_round, plain)
    close(round_result(cohort, chunk_size=2, unroll=2, compute_dtype=jnp.float32), plain)

    # vmap == a Python loop over clients.
    m = TinyCNN()
    params = zoo.init_params(m, (8, 8, 3), jax.random.key(0))
    update = jax.jit(client.local_sgd(m, optax.sgd(0.05, momentum=0.9), batch_size=8))
    keys = jax.random.split(jax.random.key(3), 4)
    vmapped = simulation.map_clients(lambda d, k: update(params, d, k), cohort.data, keys)
    for i in range(4):
        one = update(params, jax.tree.map(lambda a, i=i: a[i], cohort.data), keys[i])
        close(jax.tree.map(lambda a, i=i: a[i], vmapped), one)


def test_sharded_cohort_equals_unsharded():
    # Placing the clients axis across devices (4 fake CPU devices in tests) is a
    # performance setting: same round up to float reassociation.
    cohort = make_cohort()
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("clients",))
    sharded = jax.device_put(cohort, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("clients")))
    close(round_result(sharded), round_result(cohort))


def test_clients_spread_over_devices_equal_one_device(monkeypatch):
    monkeypatch.setattr(simulation, "MAX_PAD_FRACTION", 1.0)  # pad rather than use fewer devices
    # shard_map over a mesh of 2 and 4 fake CPU devices (each device maps over its
    # own clients, in chunks or not): the same round up to float reassociation.
    cohort = make_cohort()
    want = round_result(cohort)
    close(round_result(cohort, mesh=simulation.client_mesh(jax.devices()[:4])), want)
    close(round_result(cohort, chunk_size=1, mesh=simulation.client_mesh(jax.devices()[:2])), want)
    # With chunks on CPU every client runs in the same chunk width as on one device and the
    # outputs are aggregated replicated: bit for bit the one-device round, also over 3 devices
    # (4 clients in chunks of 2 padded to 6 slots). Direct shard_clients still refuses.
    for devices, chunk in ((3, 2),):
        mesh = simulation.client_mesh(jax.devices()[:devices])
        sharded, one = (
            round_result(cohort, chunk_size=chunk, mesh=mesh),
            round_result(cohort, chunk_size=chunk),
        )
        chex.assert_trees_all_equal(sharded[0], one[0])  # the model; reported metrics: close
        close(sharded[1], one[1])
    with pytest.raises(ValueError, match="divide over 3 devices"):
        simulation.shard_clients(
            lambda p, d: d, simulation.client_mesh(jax.devices()[:3]), 0, jnp.zeros((4, 2))
        )


class FastTinyCNN(nn.Module):
    """:class:`TinyCNN` written with fljax.nn's layers (same params), as the zoo's models are."""

    impl: str = "auto"
    layout: str = "auto"

    @nn.compact
    def __call__(self, x):
        x = fnn.Conv(4, (3, 3), padding="VALID", impl=self.impl, layout=self.layout, input_grad=False)(x)
        x = fnn.max_pool(nn.relu(x), (2, 2), (2, 2), impl=self.impl)
        return nn.Dense(5)(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize("layout", ["banded", "channels_last", "channels_first"])
def test_round_is_the_same_under_every_layout(layout):
    cohort = make_cohort()
    plain = round_result(cohort, accelerate=False)
    # The layout given to the round (accelerate rewrites the flax model) ...
    close(round_result(cohort, conv_impl="matmul", conv_layout=layout), plain)
    # ... or to a model written with fljax.nn's layers (accelerate finds nothing to rewrite).
    close(round_result(cohort, model=FastTinyCNN(impl="matmul", layout=layout), accelerate=False), plain)
    close(round_result(cohort, model=FastTinyCNN(impl="matmul", layout=layout)), plain)


def test_argnums_hint_tiles_first_layer_and_keeps_every_gradient_exact():
    # The first convolution sees data only: with argnums=0 (params) it may use the
    # narrow tiles of a layer without input gradient. Gradients with respect to
    # params AND inputs must still equal XLA's.
    m = TinyCNN()
    x = jax.random.normal(jax.random.key(1), (3, 16, 16, 3))
    params = zoo.init_params(m, (16, 16, 3), jax.random.key(0))
    assert fnn.band_tile(14, 3, rows_factor=9, cout=4, input_grad=False) < 14
    assert fnn.band_tile(14, 3, rows_factor=9, cout=4) == 14
    loss = lambda apply: lambda p, x: jnp.sum(jnp.sin(apply(p, x)))
    want = jax.grad(loss(m.apply), argnums=(0, 1))(params, x)
    hinted = fast.accelerate(m.apply, impl="matmul")
    unhinted = fast.accelerate(m.apply, impl="matmul", argnums=None)
    close(jax.grad(loss(hinted), argnums=(0, 1))(params, x), want)
    close(jax.grad(loss(unhinted), argnums=(0, 1))(params, x), want)
    assert str(jax.make_jaxpr(hinted)(params, x)) != str(jax.make_jaxpr(unhinted)(params, x))
