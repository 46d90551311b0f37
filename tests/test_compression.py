"""Compressors (unbiasedness, variance, byte formats) and their wrappers in a round."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fljax import compression
from fljax.algorithms import fedavg
from fljax.base import ClientOutput, StatefulClientUpdate
from fljax.compression import compressors, rounds
from fljax.data import ClientStates
from fljax.privacy import discrete
from tests import helpers

DIM = 300
_params = functools.cache(helpers.params)
NUM_SAMPLES = 2000


def _vector(seed: int = 0, dim: int = DIM) -> jax.Array:
    # Mixed magnitudes, some exact zeros: the quantizers' edge cases.
    x = jax.random.normal(jax.random.key(seed), (dim,)) * jnp.linspace(0.05, 3.0, dim)
    return x.at[::17].set(0.0)


@functools.cache
def _sampler(compressor: compressors.Compressor, dim: int):
    """``(decoded[NUM_SAMPLES, dim], payloads)`` of independent encodes of one ``x`` (jitted, cached)."""

    def one(x, key):
        payload = compressor.encode(x, key)
        return compressor.decode(payload, dim), payload

    return jax.jit(lambda x, key: jax.vmap(one, in_axes=(None, 0))(x, jax.random.split(key, NUM_SAMPLES)))


UNBIASED = {
    "qsgd_s3_bucket64": compressors.qsgd(3, bucket_size=64),
    "rotated_1bit": compressors.rotated_quantization(1),
    "rotated_3bit_block64": compressors.rotated_quantization(3, block_size=64),
}


@functools.cache
def _samples(name: str):
    """float64 ``(x, decoded samples, payloads)`` for ``UNBIASED[name]``."""
    x = _vector()
    decoded, payloads = _sampler(UNBIASED[name], DIM)(x, jax.random.key(2))
    return np.asarray(x, np.float64), np.asarray(decoded, np.float64), payloads


def _assert_unbiased(samples: np.ndarray, x: np.ndarray, num_sd: float = 5.0) -> None:
    """Mean error along fixed directions within ``num_sd`` standard errors of 0.

    Projections onto ``x`` itself (catches any shrinkage or inflation) and onto 8
    random directions; each projection averages many coordinates, so its sample
    mean is close to normal.
    """
    rng = np.random.default_rng(1)
    dirs = np.concatenate([x[None] / np.linalg.norm(x), rng.normal(size=(8, x.shape[0]))])
    proj = (samples - x[None]) @ dirs.T  # [samples, directions]
    z = proj.mean(0) / (proj.std(0, ddof=1) / np.sqrt(proj.shape[0]))
    assert np.all(np.abs(z) < num_sd), z


@pytest.mark.parametrize("name", sorted(UNBIASED))
def test_quantizers_are_unbiased(name):
    x, samples, _ = _samples(name)
    _assert_unbiased(samples, x)


@pytest.mark.parametrize("name", ["qsgd_s3_bucket64", "rotated_3bit_block64"])
def test_a_biased_quantizer_is_rejected(name):
    # The same quantizer's output shrunk by 3%: the test above must fail on it.
    x, samples, _ = _samples(name)
    with pytest.raises(AssertionError):
        _assert_unbiased(0.97 * samples, x)


def test_qsgd_variance_matches_its_formula_and_bound():
    # Exact E||Q(x) - x||^2 = sum_i (n_b / s)^2 p_i (1 - p_i), p_i = frac(s |x_i| / n_b);
    # Alistarh et al. Lemma 3.1 bounds it by min(d / s^2, sqrt(d) / s) ||x_b||^2 per bucket.
    s, bucket = 3, 64
    x, samples, _ = _samples("qsgd_s3_bucket64")
    err = ((samples - x) ** 2).sum(1)
    exact, bound = 0.0, 0.0
    for start in range(0, DIM, bucket):
        b = x[start : start + bucket]
        n = np.linalg.norm(b)
        p = s * np.abs(b) / n - np.floor(s * np.abs(b) / n)
        exact += (n / s) ** 2 * np.sum(p * (1 - p))
        d = b.shape[0]
        bound += min(d / s**2, np.sqrt(d) / s) * n**2
    se = err.std(ddof=1) / np.sqrt(err.shape[0])
    assert abs(err.mean() - exact) < 5 * se
    assert exact <= bound


def test_rotation_and_quantization_error_within_theorem():
    # pi_srk, given the rotation y = H D x: E||y_hat - y||^2 = sum_j (hi - y_j)(y_j - lo) / (2**k - 1)**2
    # (k = 1 here), and ||x_hat - x|| <= ||y_hat - y|| (the padding's share of the error is cut off).
    # The payload's lo and hi are min(y) and max(y).
    x, samples, p = _samples("rotated_1bit")
    dim = discrete.padded_dim(DIM)

    @jax.jit
    def rotated(seed):
        return discrete.rotate(
            jnp.asarray(x, jnp.float32), discrete.random_signs(jax.random.wrap_key_data(seed), dim)
        )

    y = np.asarray(jax.vmap(rotated)(p.seed), np.float64)  # [samples, dim]
    lo, hi = np.asarray(p.lo[:, 0], np.float64), np.asarray(p.hi[:, 0], np.float64)
    np.testing.assert_allclose(lo, y.min(1), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(hi, y.max(1), rtol=1e-6, atol=1e-7)
    expected = np.sum((hi[:, None] - y) * (y - lo[:, None]), axis=1)
    diff = ((samples - x) ** 2).sum(1) - expected
    assert diff.mean() < 5 * diff.std(ddof=1) / np.sqrt(diff.shape[0])


FORMATS = {
    "identity": compressors.identity(),
    "qsgd_s5_bucket7": compressors.qsgd(5, bucket_size=7),
    "qsgd_max": compressors.qsgd(compressors.MAX_LEVELS),
    "rotated_5bit_block16": compressors.rotated_quantization(5, block_size=16),
    "top_k": compressors.top_k(13),
    "top_k_all": compressors.top_k(10_000),
}


def _check_format(comp: compressors.Compressor, payload, dim: int) -> None:
    data = comp.pack(payload)
    assert isinstance(data, bytes) and len(data) == comp.num_bytes(dim)
    back = comp.unpack(data, dim)
    for a, b in zip(jax.tree.leaves(payload), jax.tree.leaves(back), strict=True):
        a = np.asarray(a)
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="bytes"):
        comp.unpack(data + b"\0", dim)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_byte_count_is_the_packed_size_and_unpack_inverts_pack(name):
    comp = FORMATS[name]
    x = _vector(8, 37)
    _check_format(comp, jax.jit(comp.encode)(x, jax.random.key(9)), 37)
    if not name.startswith("rotated"):  # one coordinate
        _check_format(comp, comp.encode(x[:1], jax.random.key(10)), 1)


@pytest.mark.parametrize("name", sorted(UNBIASED))
def test_sampled_payloads_round_trip(name):
    _, _, payloads = _samples(name)
    _check_format(UNBIASED[name], jax.tree.map(lambda a: a[0], payloads), DIM)


def test_byte_counts_follow_the_stated_formats():
    dim = 1000
    assert compressors.identity().num_bytes(dim) == 4000
    assert compressors.qsgd(1).num_bytes(dim) == 4 + 250  # 2 bits a level
    assert compressors.qsgd(7, bucket_size=300).num_bytes(dim) == 4 * 4 + 500  # 4 bits, 4 buckets
    assert compressors.rotated_quantization(1).num_bytes(dim) == 8 + 8 + 128  # padded to 1024
    assert compressors.rotated_quantization(2, block_size=256).num_bytes(dim) == 8 + 4 * 8 + 256
    assert compressors.top_k(10).num_bytes(dim) == 80
    params = _params()
    n = compressors.num_params(params)
    assert compressors.download_bytes(params) == 4 * n
    assert compressors.upload_bytes(compressors.top_k(5), params) == 40


@pytest.mark.parametrize(
    "make",
    [
        lambda: compressors.qsgd(0),
        lambda: compressors.qsgd(compressors.MAX_LEVELS + 1),
        lambda: compressors.qsgd(2, bucket_size=0),
        lambda: compressors.rotated_quantization(0),
        lambda: compressors.rotated_quantization(2, block_size=12),
        lambda: compressors.top_k(0),
    ],
)
def test_bad_arguments_raise(make):
    with pytest.raises(ValueError):
        make()


def test_top_k_keeps_the_largest_and_k_dim_is_exact():
    x = _vector(10, 50)
    sent = compressors.top_k(5).decode(compressors.top_k(5).encode(x, jax.random.key(0)), 50)
    kept = np.flatnonzero(np.asarray(sent))
    assert set(kept) == set(np.argsort(-np.abs(np.asarray(x)))[:5].tolist())
    np.testing.assert_array_equal(sent[kept], x[kept])
    full = compressors.top_k(50)
    np.testing.assert_array_equal(full.decode(full.encode(x, jax.random.key(1)), 50), x)


def _local():
    # One full-batch step: the result does not depend on the shuffling key.
    return helpers.local_sgd(batch_size=16, num_epochs=1, optimizer=optax.sgd(0.1))


def _fixed(params, data, key):
    """A cheap deterministic client: its delta depends on its data, not on the key."""
    del key
    n = jnp.sum(data.mask.astype(jnp.float32))
    m = jnp.sum(jnp.where(data.mask[:, None], data.x, 0.0)) / jnp.maximum(n, 1.0)
    delta = jax.tree.map(lambda p: jnp.tanh(p + m) * 0.1, params)
    return ClientOutput(delta, n, {"num_examples": n})


SIZES = [5, 9, 7, 0]


@functools.cache
def _data():
    return helpers.population(SIZES)


@functools.cache
def _step(algo):
    return jax.jit(algo.update)


@functools.cache
def _algo(name: str, wrapper: str = "compressed"):
    # The cheap client keeps compile time low; the rounds module's doctest trains with local_sgd.
    wrap = rounds.compressed if wrapper == "compressed" else rounds.error_feedback
    return fedavg.fedavg(wrap(_fixed, FORMATS[name]))


@functools.cache
def _plain(ids: tuple[int, ...]):
    plain = fedavg.fedavg(_fixed)
    return _step(plain)(plain.init(_params()), _data().cohort(list(ids)), jax.random.key(1))


def _run(algo, ids, states=None):
    cohort = _data().cohort(ids)
    if states is not None:
        cohort = states.attach(cohort)
    state, metrics = _step(algo)(algo.init(_params()), cohort, jax.random.key(1))
    return state, metrics, cohort


def _check_bytes(metrics, name):
    params = _params()
    assert float(metrics["client_upload_bytes_weighted_mean"]) == compressors.upload_bytes(
        FORMATS[name], params
    )
    assert float(metrics["client_download_bytes_weighted_mean"]) == compressors.download_bytes(params)


def test_rotated_round_reports_bytes_and_padding_contributes_zero():
    # Slot 3: a padding slot, then a real client without data (weight 0): the same round.
    algo = _algo("rotated_5bit_block16")
    padded, padded_metrics, _ = _run(algo, [0, 1, 2, -1])
    state, metrics, _ = _run(algo, [0, 1, 2, 3])
    helpers.assert_trees_equal(state.params, padded.params)
    assert int(metrics["num_clients"]) == 3 and int(padded_metrics["num_clients"]) == 3
    _check_bytes(metrics, "rotated_5bit_block16")
    _check_bytes(padded_metrics, "rotated_5bit_block16")
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(state.params))


@pytest.mark.parametrize("name", ["identity", "top_k_all", "qsgd_max"])
def test_no_compression_equals_plain_fedavg(name):
    ids = [0, 1, 2, -1]
    ref, _ = _plain(tuple(ids))
    state, metrics, _ = _run(_algo(name), ids)
    _check_bytes(metrics, name)
    if name == "qsgd_max":  # 2**24 levels: quantization error ~ 2**-24 of the norm
        helpers.assert_trees_close(state.params, ref.params, rtol=1e-4, atol=1e-5)
    else:  # the decoded delta is the delta itself (up to XLA fusing the client's arithmetic)
        helpers.assert_trees_close(state.params, ref.params, rtol=1e-6, atol=1e-8)


def test_error_feedback_accumulates_exactly_what_was_dropped():
    comp = compressors.top_k(7)
    # The client's delta is the broadcast itself, so the test knows it bit for bit.
    echo = lambda params, data, key: ClientOutput(params, jnp.float32(1.0), {})  # noqa: E731
    update = rounds.error_feedback(echo, comp)
    params = _params()
    one = jax.tree.map(lambda a: a[0], _data().cohort([1]).data)
    residual = jax.tree.map(lambda p: jax.random.normal(jax.random.key(3), p.shape) * 0.01, params)
    new_res, out = jax.jit(update.update)(params, residual, one, jax.random.key(11))
    delta = params
    flat = lambda t: jax.flatten_util.ravel_pytree(t)[0]  # noqa: E731
    corrected = flat(residual) + flat(delta)
    sent = flat(out.delta)
    np.testing.assert_array_equal(flat(new_res), corrected - sent)
    assert int(jnp.sum(sent != 0)) == 7
    np.testing.assert_array_equal(flat(new_res)[sent != 0], 0.0)


def test_error_feedback_round_keeps_residuals_and_padding_contributes_zero():
    params = _params()
    update = rounds.error_feedback(_fixed, FORMATS["top_k"])
    states = ClientStates(update.init(params), len(SIZES))
    state, metrics, cohort = _run(_algo("top_k", "error_feedback"), [0, 1, 2, 3, -1], states)
    states.scatter(cohort, state)
    sums = np.array(
        [sum(float(jnp.sum(jnp.abs(leaf[i]))) for leaf in jax.tree.leaves(states.tree)) for i in range(4)]
    )
    assert np.all(sums[:3] > 0)  # what top-k dropped
    assert sums[3] == 0.0  # no data: sends nothing, keeps its (zero) residual
    assert int(metrics["num_clients"]) == 3
    _check_bytes(metrics, "top_k")


def test_non_finite_delta_is_dropped_by_the_aggregator():
    def broken(params, data, key):
        out = _fixed(params, data, key)
        bad = jax.tree.map(lambda d: d.at[(0,) * d.ndim].set(jnp.nan), out.delta)
        return out._replace(delta=bad)

    algo = fedavg.fedavg(compression.compressed(broken, compressors.top_k(3)))
    _, metrics = jax.jit(algo.update)(algo.init(_params()), _data().cohort([0, 1]), jax.random.key(1))
    assert int(metrics["num_nonfinite"]) == 2 and int(metrics["num_clients"]) == 0


def test_wrappers_reject_bad_arguments():
    with pytest.raises(TypeError, match="compressor"):
        rounds.compressed(_local(), "qsgd")
    with pytest.raises(TypeError, match="stateless"):
        rounds.error_feedback(rounds.error_feedback(_local(), compressors.top_k(2)), compressors.top_k(2))


def test_compressed_keeps_a_stateful_update_stateful():
    def update(params, count, data, key):
        return count + 1, _fixed(params, data, key)

    inner = StatefulClientUpdate(lambda params: jnp.zeros((), jnp.int32), update)
    wrapped = compression.compressed(inner, compressors.top_k(1))
    assert isinstance(wrapped, StatefulClientUpdate)
    params = _params()
    one = jax.tree.map(lambda a: a[0], _data().cohort([1]).data)
    count, out = jax.jit(wrapped.update)(params, wrapped.init(params), one, jax.random.key(0))
    assert int(count) == 1
    assert sum(int(jnp.sum(leaf != 0)) for leaf in jax.tree.leaves(out.delta)) == 1
    assert float(out.metrics["upload_bytes"]) == 8.0
