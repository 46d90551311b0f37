import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fljax import client, privacy, random, simulation
from fljax.algorithms import fedavg
from fljax.base import ClientData, Cohort, Performance
from tests import helpers


def _cohort(sizes, ids=None, pad_to=None, seed=0):
    pop = helpers.population(sizes, seed=seed)
    ids = np.arange(len(sizes)) if ids is None else ids
    return pop, pop.cohort(ids, num_examples=pad_to)


def test_vmap_equals_python_loop_over_clients():
    params = helpers.params()
    _, cohort = _cohort([5, 9, 3, 12])
    update = helpers.local_sgd()
    key = jax.random.key(0)
    out = simulation.run_clients(update, params, cohort, key)[1]
    keys = random.client_keys(random.stream(key, "clients"), cohort.client_ids)
    for i in range(4):
        data_i = jax.tree.map(lambda a, i=i: jnp.asarray(a[i]), cohort.data)
        ref = update(params, data_i, keys[i])
        helpers.assert_trees_close(jax.tree.map(lambda a, i=i: a[i], out.delta), ref.delta)
        assert float(out.weight[i]) == float(ref.weight)


def test_chunked_equals_unchunked():
    params = helpers.params()
    _, cohort = _cohort([5, 9, 3, 12, 7, 1])
    update = helpers.local_sgd()
    key = jax.random.key(1)
    full = simulation.run_clients(update, params, cohort, key)[1]
    chunked = simulation.run_clients(update, params, cohort, key, Performance(chunk_size=2))[1]
    helpers.assert_trees_close(full.delta, chunked.delta)
    np.testing.assert_array_equal(np.asarray(full.weight), np.asarray(chunked.weight))


def test_auto_chunk_size_follows_the_per_client_working_set(monkeypatch):
    params = helpers.params()
    _, cohort = _cohort([5, 9, 3, 12, 7, 1])
    update = helpers.local_sgd()
    key = jax.random.key(1)
    keys = jax.random.split(key, 6)
    fn = lambda d, k: update(params, d, k)
    per_client = simulation.step_bytes(
        fn, *jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), (cohort.data, keys))
    )
    assert per_client > 0
    # A small model fits whole: no chunks (plain vmap).
    assert simulation.auto_chunk_size(fn, cohort.data, keys) is None
    # Room for 4 clients' steps: the largest divisor of 6 that fits is 3 ...
    monkeypatch.setattr(simulation, "CHUNK_BYTES", 4 * per_client)
    assert simulation.auto_chunk_size(fn, cohort.data, keys) == 3
    # ... for 1: one client at a time.
    monkeypatch.setattr(simulation, "CHUNK_BYTES", per_client)
    assert simulation.auto_chunk_size(fn, cohort.data, keys) == 1
    # "auto" is a performance setting: the same outputs as one vmap.
    monkeypatch.setattr(simulation, "CHUNK_BYTES", 4 * per_client)
    full = simulation.run_clients(update, params, cohort, key, Performance(chunk_size=None))[1]
    auto = simulation.run_clients(update, params, cohort, key)[1]  # default "auto"
    helpers.assert_trees_close(full.delta, auto.delta)
    with pytest.raises(ValueError, match="chunk_size"):
        Performance(chunk_size="half")


def test_chunk_size_must_divide_cohort():
    params = helpers.params()
    _, cohort = _cohort([5, 9, 3])
    with pytest.raises(ValueError, match="divide"):
        simulation.run_clients(
            helpers.local_sgd(), params, cohort, jax.random.key(0), Performance(chunk_size=2)
        )[1]


def test_client_randomness_follows_client_id_not_slot():
    params = helpers.params()
    pop = helpers.population([5, 9, 3, 12])
    key = jax.random.key(2)
    a = simulation.run_clients(helpers.local_sgd(), params, pop.cohort([1, 3], num_examples=12), key)[1]
    b = simulation.run_clients(helpers.local_sgd(), params, pop.cohort([3, 1], num_examples=12), key)[1]
    helpers.assert_trees_close(jax.tree.map(lambda x: x[0], a.delta), jax.tree.map(lambda x: x[1], b.delta))


def test_padding_slots_contribute_exactly_zero():
    params = helpers.params()
    pop = helpers.population([5, 9, 3, 12])
    algo = fedavg.fedavg(helpers.local_sgd())
    state = algo.init(params)
    key = jax.random.key(3)
    plain, _ = algo.update(state, pop.cohort([0, 2], num_examples=12), key)
    padded, m = algo.update(state, pop.cohort([0, 2, -1, -1], num_examples=12), key)
    helpers.assert_trees_close(plain.params, padded.params, rtol=1e-6, atol=1e-7)
    assert float(m["total_weight"]) == 8.0


def test_fedavg_server_step_is_weighted_average_of_local_models():
    params = helpers.params()
    pop, cohort = _cohort([4, 8, 2])
    update = helpers.local_sgd()
    key = jax.random.key(4)
    algo = fedavg.fedavg(update)
    state, _ = algo.update(algo.init(params), cohort, key)
    out = simulation.run_clients(update, params, cohort, key)[1]
    w = np.asarray(out.weight) / np.asarray(out.weight).sum()
    local = jax.tree.map(lambda p, d: p[None] - d, params, out.delta)
    expected = jax.tree.map(lambda leaf: jnp.tensordot(jnp.asarray(w, leaf.dtype), leaf, axes=1), local)
    helpers.assert_trees_close(state.params, expected)


def test_check_cohort_names_the_problem():
    _, cohort = _cohort([4, 4])
    bad = cohort._replace(data=ClientData(x=cohort.data.x[:, :3], y=cohort.data.y, mask=cohort.data.mask))
    with pytest.raises(ValueError, match="num_examples"):
        simulation.check_cohort(bad)
    bad_ids = cohort._replace(client_ids=np.zeros(3, np.int32))
    with pytest.raises(ValueError, match="client_ids"):
        simulation.check_cohort(bad_ids)


def test_no_recompilation_across_rounds():
    pop = helpers.population([5, 9, 3, 12, 6])
    algo = fedavg.fedavg(helpers.local_sgd())
    state = algo.init(helpers.params())
    update = jax.jit(algo.update)
    from fljax.data import sampling

    for r in range(4):
        k = random.round_key(jax.random.key(0), r)
        ids, mask = sampling.uniform(random.stream(k, "sample"), pop.num_clients, 3)
        state, _ = update(state, pop.cohort(ids, client_mask=mask, num_examples=12), k)
    assert update._cache_size() == 1
    assert int(state.round) == 4


def test_map_clients_checks_leading_axis():
    with pytest.raises(ValueError, match="leading clients axis"):
        simulation.map_clients(lambda a, b: a + b, jnp.zeros((3, 2)), jnp.zeros((4, 2)))


def test_cohort_type_is_pytree():
    _, cohort = _cohort([2, 3])
    assert isinstance(jax.tree.map(lambda a: a, cohort), Cohort)


def test_fedavg_learns_separable_task():
    rng = np.random.default_rng(0)
    w_true = rng.normal(size=(helpers.NUM_FEATURES, helpers.NUM_CLASSES))
    clients = []
    for _ in range(6):
        x = rng.normal(size=(40, helpers.NUM_FEATURES)).astype(np.float32)
        clients.append((x, np.argmax(x @ w_true, axis=1).astype(np.int32)))
    from fljax.data import FederatedData

    pop = FederatedData.from_clients(clients, num_classes=helpers.NUM_CLASSES)
    algo = fedavg.fedavg(client.local_sgd(helpers.model(), optax.sgd(0.1), batch_size=8))
    state = algo.init(helpers.params())
    update = jax.jit(algo.update)
    losses = []
    for r in range(15):
        state, m = update(state, pop.cohort(np.arange(6)), random.round_key(jax.random.key(0), r))
        losses.append(float(m["client_train_loss_weighted_mean"]))
    assert losses[-1] < 0.5 * losses[0]


def test_chunks_of_inactive_clients_are_skipped_and_the_rest_unchanged():
    x = jnp.arange(12.0)
    active = jnp.array([True, True, True, False, False, False, False, False, True, False, False, False])
    fn = lambda v: (v * 2.0 + 1.0, jnp.sin(v))
    full = simulation.map_clients(fn, x, chunk_size=3)
    skipped = simulation.map_clients(fn, x, chunk_size=3, active=active)
    computed = np.repeat(np.asarray(active).reshape(4, 3).any(axis=1), 3)  # chunks 0 and 2
    for a, b in zip(full, skipped, strict=True):
        np.testing.assert_array_equal(np.asarray(b)[computed], np.asarray(a)[computed])  # bit for bit
        np.testing.assert_array_equal(np.asarray(b)[~computed], 0.0)  # never computed
    # an inactive slot inside a computed chunk is computed as before (the round masks it)
    assert float(skipped[0][7]) == 15.0
    # without chunks nothing can be skipped: one vmap of every slot
    np.testing.assert_array_equal(simulation.map_clients(fn, x, active=active)[0], full[0])
    with pytest.raises(ValueError, match=r"active must be bool\[12\]"):
        simulation.map_clients(fn, x, chunk_size=3, active=active[:4])


@pytest.mark.parametrize("devices", [1, 2, 3])
def test_skipping_padding_chunks_changes_no_bit_of_the_round(devices):
    # A Poisson cohort: the sampled clients first, then padding slots, in chunks of 2; with a mesh
    # the chunks are dealt to the devices in turn. Skipping the all-padding chunks gives the
    # round computing every slot, bit for bit, on one device or several (the model and metrics),
    # also under DP (clipping, noise).
    pop = helpers.population([5, 9, 3, 12, 7, 4, 6])
    cohort = pop.cohort([0, 2, 3, 5, 6, -1, -1, -1, -1, -1], num_examples=12)  # padded over 2, 3 devices
    mesh = None if devices == 1 else simulation.client_mesh(jax.devices()[:devices])
    dp = privacy.DPConfig(clip_norm=0.1, noise_multiplier=1.0, population_size=7, cohort_size=4)
    algo = fedavg.fedavg(helpers.local_sgd(), aggregator=privacy.dp(dp) if devices == 2 else None)
    state = algo.init(helpers.params())
    results = [
        jax.jit(algo.with_performance(perf).update)(state, cohort, jax.random.key(5))
        for perf in (
            Performance(chunk_size=2, skip_padding=False),
            Performance(chunk_size=2, mesh=mesh),
        )
    ]
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(results[1][1]["num_clients"]) == 5
