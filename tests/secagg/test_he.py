"""CKKS secure sum (fljax.secagg.he): exact sums, the error bound, who holds which key, the aggregator contract."""

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("tenseal", reason="TenSEAL is not installed (pip install 'fljax[he]')")

from fljax import aggregators, privacy, secagg  # noqa: E402
from fljax.secagg import encoding, he, simulation  # noqa: E402
from fljax.secagg.messages import ProtocolAbort  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
SMALL = he.HEConfig(poly_modulus_degree=4096)  # 128-bit secure (109-bit modulus), 2048 slots


def test_ring_sum_is_exact_mod_2_bits_at_the_extremes_and_with_dropouts():
    rng = np.random.default_rng(0)
    bits, n, dim = 20, 6, 2 * SMALL.slots + 5  # three ciphertexts, the last one partial
    values = rng.integers(0, 2**bits, (n, dim), dtype=np.uint64).astype(np.uint32)
    values[0, :10] = 2 ** (bits - 1)  # most negative signed value
    values[1, :10] = 2 ** (bits - 1) - 1  # most positive
    alive = np.array([True, True, False, True, True, False])
    total, aborted = he.ring_sum(values, alive, bits, SMALL)
    expected = values[alive].sum(axis=0, dtype=np.uint64) % 2**bits
    assert not aborted and total.dtype == np.uint32
    np.testing.assert_array_equal(total, expected)


def test_decryption_error_within_the_stated_bound():
    rng = np.random.default_rng(1)
    n, max_abs = 8, 2**16
    x = rng.integers(-max_abs, max_abs + 1, (n, SMALL.slots))
    holder = he.KeyHolder(SMALL)
    k = SMALL.scale_bits(n, max_abs)
    cts = [he.encrypt(holder.public_context, v, SMALL, scale_bits=k, max_abs=max_abs) for v in x]
    raw = holder._decrypt_raw(he.add(holder.server_context, cts))
    err = np.max(np.abs(raw - x.sum(axis=0)))
    bound = n * SMALL.noise_bound / 2.0**k + SMALL.poly_modulus_degree * n * max_abs * 2.0**-50
    assert 0 < err <= bound <= 1 / 8  # the bound that makes rounding exact holds (and is not vacuous)
    # The same sum at a scale far below the chosen one errs by more than 1/4: the key holder refuses it.
    low = [he.encrypt(holder.public_context, v, SMALL, scale_bits=6, max_abs=max_abs) for v in x]
    with pytest.raises(ValueError, match="off an integer"):
        holder.decrypt(he.add(holder.server_context, low), dim=SMALL.slots, num_clients=n, max_abs=max_abs)


def test_server_and_clients_never_hold_the_secret_key():
    ts = pytest.importorskip("tenseal")
    holder = he.KeyHolder(SMALL)
    server_ctx = ts.context_from(holder.server_context)
    client_ctx = ts.context_from(holder.public_context)
    assert not server_ctx.is_private() and not server_ctx.has_public_key()
    assert not client_ctx.is_private() and client_ctx.has_public_key()
    cts = he.encrypt(holder.public_context, np.arange(5), SMALL, scale_bits=20, max_abs=5)
    with pytest.raises(ValueError, match="secret_key"):
        ts.ckks_vector_from(server_ctx, cts[0]).decrypt()
    private = holder._context.serialize(save_secret_key=True)
    with pytest.raises(ValueError, match="no key"):
        he.add(private, [cts])
    with pytest.raises(ValueError, match="public context"):
        he.encrypt(private, np.arange(5), SMALL, scale_bits=20, max_abs=5)


def test_bad_inputs_and_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="poly_modulus_degree"):
        he.HEConfig(poly_modulus_degree=2048)
    with pytest.raises(ValueError, match="special prime"):
        he.HEConfig(poly_modulus_degree=4096, data_primes=2)
    with pytest.raises(ValueError, match="min_clients"):
        he.HEConfig(min_clients=0)
    with pytest.raises(ValueError, match="742 clients"):
        he.HEConfig().scale_bits(742, 2**16)  # the largest exact cohort is 741 (module docstring)
    assert he.HEConfig().scale_bits(741, 2**16) <= 32 and he.HEConfig().scale_bits(100, 2**16) == 30
    holder = he.KeyHolder(SMALL)
    with pytest.raises(ValueError, match="max_abs"):
        he.encrypt(holder.public_context, np.array([3, -9]), SMALL, scale_bits=20, max_abs=8)
    with pytest.raises(ValueError, match="integer"):
        he.encrypt(holder.public_context, np.array([0.5]), SMALL, scale_bits=20, max_abs=8)
    with pytest.raises(ValueError, match="different numbers"):
        he.add(holder.server_context, [[b"a"], [b"a", b"b"]])
    values = np.ones((3, 4), np.uint32)
    cfg = he.HEConfig(poly_modulus_degree=4096, min_clients=3)
    total, aborted = he.ring_sum(values, np.array([True, True, False]), 8, cfg)
    assert aborted and not total.any()
    with pytest.raises(ProtocolAbort):
        he.run_round(values.astype(np.int64), cfg, max_abs=1, alive=np.array([True, False, True]))


def _plain_ring_reference(config):
    """``encoded_sum`` whose ring sum is a plain sum of the survivors: the exact reference."""

    def ring(values, survived, key, bits):
        del key
        kept = jnp.where(survived[:, None], values, jnp.zeros((), jnp.uint32))
        return encoding.ring_sum(kept, bits), jnp.zeros((), jnp.bool_)

    return simulation.encoded_sum(config, ring)


def test_encrypted_sum_equals_the_exact_ring_sum_in_jit_with_dropouts():
    # (Without dropouts the doctest of ``encrypted_sum`` checks equality with ``secure_sum``.)
    dropout_rate = 0.4
    sa = secagg.SecAggConfig(
        clip_range=0.5, frac_bits=12, weight_bits=8, max_weight=4.0, dropout_rate=dropout_rate
    )
    key = jax.random.key(3)
    deltas = {
        "w": jax.random.normal(jax.random.key(1), (7, 3, 5)) * 0.2,
        "b": jax.random.normal(jax.random.key(2), (7, 4)) * 0.2,
    }
    weights = jnp.array([1.0, 2.0, 3.0, 0.0, 4.0, 1.5, 2.5])  # slot 3 is padding
    params = jax.tree.map(lambda x: x[0], deltas)
    outs = []
    for agg in (he.encrypted_sum(sa, SMALL), _plain_ring_reference(sa)):
        outs.append(jax.jit(agg.aggregate)(agg.init(params), deltas, weights, key))
    (_, got, m_got), (_, want, m_want) = outs
    jax.tree.map(np.testing.assert_array_equal, got, want)
    assert {k: int(v) for k, v in m_got.items() if k != "total_weight"} == {
        k: int(v) for k, v in m_want.items() if k != "total_weight"
    }
    assert float(m_got["total_weight"]) == float(m_want["total_weight"]) and int(m_got["aborted"]) == 0
    assert 0 < int(m_got["num_dropped"]) < 6  # key 3 drops some clients: the dropout path is exercised


def test_dp_over_encrypted_sum_matches_dp_over_plain_sum_within_the_encoding_error():
    sa = secagg.SecAggConfig(frac_bits=14, weight_bits=8)
    cfg = privacy.DPConfig(clip_norm=0.7, noise_multiplier=1.1, population_size=200, cohort_size=5)
    deltas = {"w": jax.random.normal(jax.random.key(4), (6, 40)) * 0.3}
    weights = jnp.array([3.0, 1.0, 0.0, 2.0, 5.0, 1.0])  # uniform weighting: 1 per participant
    key = jax.random.key(5)
    params = {"w": jnp.zeros(40)}
    results = []
    for inner in (he.encrypted_sum(sa, SMALL), aggregators.weighted_sum()):
        agg = privacy.dp(cfg, sum=inner)
        results.append(jax.jit(agg.aggregate)(agg.init(params), deltas, weights, key)[1]["w"])
    enc, plain = results
    n = 5  # contributing clients
    bound = cfg.clip_norm * n * sa.max_weight / sa.scale_value / cfg.denominator  # docs of privacy.dp
    diff = float(jnp.max(jnp.abs(enc - plain)))
    assert diff <= bound * (1 + 1e-3) + 1e-6
    assert float(jnp.max(jnp.abs(plain))) > 100 * bound  # the noise is there and far above the error


def test_bench_secure_sum_quick(capsys):
    spec = importlib.util.spec_from_file_location(
        "bench_secure_sum", ROOT / "experiments" / "bench_secure_sum.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--quick"])  # in process: no second interpreter and JAX start-up
    out = capsys.readouterr()
    lines = [json.loads(line) for line in out.out.splitlines() if line.strip()]
    assert {r["backend"] for r in lines} == {"plaintext", "secagg", "he"}
    for r in lines:
        assert r["bench"] == "secure_sum"
        for field in ("clients", "client_sec", "server_sec", "client_bytes_sent", "client_bytes_received"):
            assert field in r
        assert r["client_sec"] > 0 and r["server_sec"] > 0 and r["client_bytes_sent"] > 0
    he_line = next(r for r in lines if r["backend"] == "he")
    assert he_line["client_bytes_sent_ratio"] > 1 and he_line["keyholder_sec"] > 0
