"""FedBuff: the simulated clock, staleness weighting and the FedAvg limit.

FedBuff passes the checks of ``test_conformance.py``, but registering it there
takes three separate edits of that shared file (the import, ``ALGORITHMS`` and
the factory table of ``test_one_shape_and_performance_given_once``), so the same
checks run here instead, on the jitted updates this file already compiles:
same key same result and different key different, padding slots change
nothing, finite scalar metrics and a counted round, the one factory shape,
and performance settings that change nothing but speed.
"""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fljax import random as fl_random
from fljax.algorithms import fedavg, fedbuff
from fljax.base import Performance
from tests import helpers

POP_SIZES = [6, 3, 9, 5, 4, 7]


def _local():
    return helpers.local_sgd(batch_size=4, num_epochs=1)


@functools.cache
def _jitted(**kw):
    algo = fedbuff.fedbuff(_local(), **kw)
    return algo, jax.jit(algo.update)


def _cohort(ids):
    return helpers.population(POP_SIZES).cohort(ids, num_examples=9)


def test_equal_latencies_and_k_equal_c_equal_cohort_is_fedavg_exactly():
    latency_mean = 2.0
    algo, update = _jitted(buffer_size=3, concurrency=3, latency_mean=latency_mean, latency_sigma=0.0)
    ref = fedavg.fedavg(_local())
    ref_update = jax.jit(ref.update)
    a, b = algo.init(helpers.params()), ref.init(helpers.params())
    for r, ids in enumerate(([0, 1, 2], [3, 4, 5])):
        a, ma = update(a, _cohort(ids), jax.random.key(r))
        b, mb = ref_update(b, _cohort(ids), jax.random.key(r))
        helpers.assert_trees_equal(a.params, b.params)
        assert float(ma["max_staleness"]) == 0.0 and int(ma["num_buffered"]) == 3
        assert float(ma["clock"]) == latency_mean * (r + 1)
        for k in mb:
            assert float(ma[k]) == float(mb[k]), k


def test_staleness_weighting_with_known_staleness():
    """C=4, K=2, equal latencies: the second flush takes clients 2 and 3, one server step stale."""
    algo, update = _jitted(buffer_size=2, concurrency=4, latency_sigma=0.0)
    params = helpers.params()
    k0, k1 = jax.random.key(0), jax.random.key(1)
    first = _cohort([0, 1, 2, 3])
    s1, m1 = update(algo.init(params), first, k0)  # all finish at 1 s; slots 0 and 1 arrive
    assert float(m1["max_staleness"]) == 0.0 and int(m1["num_in_flight"]) == 2
    s2, m2 = update(s1, _cohort([4, 5, -1, -1]), k1)  # 4 and 5 finish at 2 s: 2 and 3 arrive
    assert float(m2["mean_staleness"]) == 1.0 and float(m2["clock"]) == 1.0

    # Clients 2 and 3 trained on the initial params with their dispatch keys; weight s(1) each.
    # run_clients' keys for clients 2 and 3 of the first cohort, one vmapped call.
    keys = fl_random.client_keys(fl_random.stream(k0, "clients"), first.client_ids[2:])
    data = jax.tree.map(lambda a: jnp.asarray(a[2:]), first.data)
    outs = jax.jit(jax.vmap(lambda d, k: _local()(params, d, k)))(data, keys)
    w = np.asarray(outs.weight)
    s = 1.0 / np.sqrt(2.0)
    expected = jax.tree.map(lambda p, d: p - s * (w[0] * d[0] + w[1] * d[1]) / w.sum(), s1.params, outs.delta)
    helpers.assert_trees_close(s2.params, expected, rtol=1e-6, atol=1e-7)
    assert int(s2.round) == 2


def test_clock_is_monotone_and_slots_never_exceed_concurrency():
    algo, update = _jitted(**CONFORMANCE)
    state = algo.init(helpers.params())
    clocks = [0.0]
    for r in range(5):
        ids = [0, 1, 2, 3] if r == 0 else [(2 * r) % 6, (2 * r + 1) % 6, -1, -1]
        state, m = update(state, _cohort(ids), jax.random.key(r))
        clocks.append(float(m["clock"]))
        busy = np.isfinite(np.asarray(state.in_flight.finish_time))
        assert busy.sum() == int(m["num_in_flight"]) == 2
        assert np.all(np.asarray(state.in_flight.finish_time)[busy] >= clocks[-1])
        assert np.all(np.asarray(state.in_flight.weight)[~busy] == 0)
    assert all(b >= a for a, b in zip(clocks, clocks[1:], strict=False))
    assert clocks[-1] > 0 and int(state.round) == 5


def test_padding_is_never_dispatched_and_extra_clients_wait():
    algo, update = _jitted(**CONFORMANCE)
    state, m = update(algo.init(helpers.params()), _cohort([0, 1, 2, -1]), jax.random.key(0))
    assert int(m["num_dispatched"]) == 3 and int(m["num_not_dispatched"]) == 0
    state, m = update(state, _cohort([3, 4, 5, -1]), jax.random.key(1))  # 3 free slots
    assert int(m["num_dispatched"]) == 3 and int(m["num_not_dispatched"]) == 0
    state, m = update(state, _cohort([0, 1, 2, 3]), jax.random.key(2))  # 2 free slots
    assert int(m["num_dispatched"]) == 2 and int(m["num_not_dispatched"]) == 2


def test_custom_staleness_function_and_bad_arguments():
    s = fedbuff.polynomial_staleness(1.0)
    np.testing.assert_allclose(s(jnp.array([0, 1, 3], jnp.int32)), [1.0, 0.5, 0.25])
    with pytest.raises(ValueError, match="buffer_size"):
        fedbuff.fedbuff(_local(), buffer_size=5, concurrency=4)
    with pytest.raises(ValueError, match="concurrency"):
        fedbuff.fedbuff(_local(), buffer_size=1, concurrency=0)
    with pytest.raises(ValueError, match="latency_sigma"):
        fedbuff.fedbuff(_local(), buffer_size=1, concurrency=2, latency_sigma=-1.0)
    with pytest.raises(ValueError, match="exponent"):
        fedbuff.polynomial_staleness(-0.5)
    algo = fedbuff.fedbuff(_local(), buffer_size=1, concurrency=2)
    with pytest.raises(ValueError, match="concurrency"):
        algo.update(algo.init(helpers.params()), _cohort([0, 1, 2]), jax.random.key(0))


# The shared conformance checks (tests/algorithms/test_conformance.py), for FedBuff.
CONFORMANCE = dict(buffer_size=2, concurrency=4, latency_sigma=1.0)


def _rounds(update, algo, ids, key, rounds=1):
    state = algo.init(helpers.params())
    for r in range(rounds):
        state, metrics = update(state, _cohort(ids), jax.random.fold_in(key, r))
    return state, metrics


def test_conformance_same_key_same_result_different_key_different():
    algo, update = _jitted(**CONFORMANCE)
    a, _ = _rounds(update, algo, [0, 1, 2, 3], jax.random.key(0), rounds=2)
    b, _ = _rounds(update, algo, [0, 1, 2, 3], jax.random.key(0), rounds=2)
    c, _ = _rounds(update, algo, [0, 1, 2, 3], jax.random.key(1), rounds=2)
    helpers.assert_trees_equal(a, b)
    assert any(
        not np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(c.params), strict=True)
    )


def test_conformance_padding_slots_change_nothing():
    algo, update = _jitted(**CONFORMANCE)
    a, _ = _rounds(update, algo, [0, 2], jax.random.key(0))
    b, _ = _rounds(update, algo, [0, 2, -1, -1], jax.random.key(0))
    helpers.assert_trees_close(a.params, b.params, rtol=1e-6, atol=1e-7)
    assert float(a.clock) == float(b.clock)


def test_conformance_metrics_are_finite_scalars_and_round_counts():
    algo, update = _jitted(**CONFORMANCE)
    state, metrics = _rounds(update, algo, [0, 1, 2, 3], jax.random.key(0), rounds=2)
    assert int(state.round) == 2
    for k, v in metrics.items():
        assert np.shape(v) == (), k
        assert np.isfinite(float(v)), k


def test_conformance_one_shape_and_performance_given_once():
    params = list(inspect.signature(fedbuff.fedbuff).parameters.values())
    assert params[0].name == "client_update"
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[1:])
    assert params[-1].name == "aggregator" and params[-1].default is None
    assert not {"chunk_size", "mesh", "unroll", "compute_dtype", "performance"} & {p.name for p in params}
    algo, update = _jitted(**CONFORMANCE)
    other = algo.with_performance(Performance(chunk_size=2, unroll=2, accelerate=False))
    a, _ = _rounds(update, algo, [0, 1, 2, 3], jax.random.key(0))
    b, _ = _rounds(jax.jit(other.update), other, [0, 1, 2, 3], jax.random.key(0))
    helpers.assert_trees_close(a.params, b.params, rtol=1e-5, atol=1e-6)
