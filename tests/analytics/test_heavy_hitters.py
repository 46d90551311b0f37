"""Federated heavy hitters (fljax.analytics.heavy_hitters): exactness without noise, contribution
bounds, padding, noise statistics, accounting and validation."""

from __future__ import annotations

import math
from collections import Counter

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting import pld
from scipy import stats

from fljax import secagg
from fljax.analytics import budget
from fljax.analytics import heavy_hitters as hh

ALPHABET = "abc"  # a small alphabet: many shared prefixes, deep tries


def _config(**kw) -> hh.HeavyHittersConfig:
    defaults = dict(
        max_length=5,
        alphabet_size=len(ALPHABET) + 1,
        max_contributions=3,
        max_candidates=64,
        threshold=3.0,
        population_size=1000,
    )
    defaults.update(kw)
    return hh.HeavyHittersConfig(**defaults)


def _random_clients(rng, num_clients, max_words, max_length, vocab):
    """Each client lists words drawn from a skewed vocabulary, duplicates included."""
    p = 1.0 / np.arange(1, len(vocab) + 1)
    p /= p.sum()
    return [list(rng.choice(vocab, size=rng.integers(0, max_words + 1), p=p)) for _ in range(num_clients)]


def _bounded_counts(clients, m) -> Counter:
    """The reference: each client's first m distinct strings, counted once per client."""
    counts: Counter = Counter()
    for strings in clients:
        counts.update(list(dict.fromkeys(strings))[:m])
    return counts


def _vocab(rng, size, max_length):
    words = set()
    while len(words) < size:
        n = int(rng.integers(1, max_length + 1))
        words.add("".join(rng.choice(list(ALPHABET), size=n)))
    return sorted(words)


@pytest.mark.parametrize("max_length,chars_per_level", [(5, 1), (5, 2)])
def test_noiseless_finds_exactly_the_strings_at_or_above_threshold(max_length, chars_per_level):
    rng = np.random.default_rng(0)
    clients = _random_clients(rng, 60, 6, max_length, _vocab(rng, 40, max_length))
    cfg = _config(max_length=max_length, chars_per_level=chars_per_level)
    words, word_mask = hh.encode_clients(clients, alphabet=ALPHABET, max_length=max_length)
    state, metrics = hh.discover(cfg, words, word_mask, np.ones(len(clients), bool), jax.random.key(0))
    counts = _bounded_counts(clients, cfg.max_contributions)
    expected = {w: float(c) for w, c in counts.items() if c >= cfg.threshold}
    # the population has strings on both sides of the threshold, and some exactly at it
    assert any(c == cfg.threshold for c in counts.values())
    assert any(c == cfg.threshold - 1 for c in counts.values())
    assert int(metrics["num_truncated"].sum()) == 0
    assert dict(hh.found(state, alphabet=ALPHABET)) == expected
    assert metrics["num_survivors"].shape == (cfg.num_levels,)


def test_a_client_repeating_one_word_votes_once_and_malformed_strings_count_for_nothing():
    spammer = ["abc"] * 1000
    others = [["abc", "b"], ["b"], ["ca", "b"]]
    cfg = _config(threshold=1.0, max_contributions=2)
    words, word_mask = hh.encode_clients([spammer, *others], alphabet=ALPHABET, max_length=5)
    # malformed rows in the last client's free slots: a symbol after the terminator, ids out of
    # range, an empty string; they are ignored (and do not use up its bound)
    bad = np.array([[1, 0, 2, 0, 0], [9, 1, 0, 0, 0], [-1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], np.int32)
    words[3, 4:6] = words[3, :2]
    words[3, :4] = bad
    word_mask[3, :6] = True
    state, metrics = hh.discover(cfg, words, word_mask, np.ones(4, bool), jax.random.key(0))
    assert dict(hh.found(state, alphabet=ALPHABET)) == {"abc": 2.0, "b": 3.0, "ca": 1.0}
    assert metrics["num_clipped"].tolist() == [0] * cfg.num_levels  # no vote exceeded the release's bounds
    # one client's vote: entries in {0, 1}, at most m ones, whatever it holds
    votes = jax.jit(jax.vmap(hh.contribution, in_axes=(None, None, 0, 0)), static_argnums=0)
    vote = np.asarray(votes(cfg, hh.init(cfg), words[:2], word_mask[:2]))
    assert set(np.unique(vote).tolist()) <= {0.0, 1.0}
    assert vote.sum(axis=1).tolist() == [1.0, 2.0]  # "a"; then "a" and "b"


def test_bound_contributions_matches_a_python_reference():
    rng = np.random.default_rng(1)
    vocab = _vocab(rng, 6, 3)
    clients = _random_clients(rng, 20, 8, 3, vocab)
    words, mask = hh.encode_clients(clients, alphabet=ALPHABET, max_length=3, max_words=8)
    mask = mask & (rng.random(mask.shape) < 0.8)  # some masked-out words
    bound = jax.jit(jax.vmap(hh.bound_contributions, in_axes=(0, 0, None, None)), static_argnums=(2, 3))
    kept, kept_mask = bound(words, mask, 3, 4)
    for i, strings in enumerate(clients):
        listed = [s for s, keep in zip(strings, mask[i], strict=False) if keep]
        expected = list(dict.fromkeys(listed))[:3]
        got = hh.decode(np.asarray(kept[i])[np.asarray(kept_mask[i])], alphabet=ALPHABET)
        assert got == expected
        assert not np.asarray(kept[i])[~np.asarray(kept_mask[i])].any()


def test_padding_clients_contribute_exactly_zero():
    rng = np.random.default_rng(2)
    clients = _random_clients(rng, 30, 5, 5, _vocab(rng, 20, 5))
    cfg = _config(noise_multiplier=0.3)
    key = jax.random.key(3)
    client_mask = np.arange(37) < 30
    # the same 30 clients followed by 7 padding slots: empty, or holding heavy strings
    empty, empty_mask = hh.encode_clients(clients + [[]] * 7, alphabet=ALPHABET, max_length=5, max_words=5)
    heavy, heavy_mask = hh.encode_clients(
        clients + [["abc", "abc", "ba"]] * 7, alphabet=ALPHABET, max_length=5, max_words=5
    )
    a, metrics = hh.discover(cfg, empty, empty_mask, client_mask, key)
    b, _ = hh.discover(cfg, heavy, heavy_mask, client_mask, key)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert metrics["num_clients"].tolist() == [30] * cfg.num_levels
    # and the padding slots' strings are found once they are real clients
    c, _ = hh.discover(cfg, heavy, heavy_mask, np.ones(37, bool), key)
    assert "abc" in dict(hh.found(c, alphabet=ALPHABET))


def test_noisy_discovery_at_a_generous_epsilon():
    # 300 clients: 4 planted strings held by >= 120 clients each, plus one random 7-letter string
    # per client (count 1; their short prefixes are shared, e.g. ~12 clients per first letter).
    letters = "abcdefghijklmnopqrstuvwxyz"
    rng = np.random.default_rng(4)
    planted = {"the": 200, "king": 160, "and": 140, "a": 120}
    clients = [["".join(rng.choice(list(letters), size=7))] for _ in range(300)]
    assert len({c[0] for c in clients}) == 300
    for word, n in planted.items():
        for i in rng.choice(300, size=n, replace=False):
            clients[i].insert(0, word)
    base = _config(max_length=7, alphabet_size=27, max_candidates=64, max_contributions=5)
    cfg = hh.calibrate_threshold(base.replace(noise_multiplier=0.8), false_positive_rate=1e-6, count=1)
    assert hh.epsilon(cfg) < 20.0
    # Margins. A string of one client (count 1) survives a level with probability at most 1e-6
    # over the whole query (calibrate_threshold's union bound). A planted string is lost only if
    # one of its at most num_levels prefixes (count >= 120) gets noise below threshold - 120:
    sigma = cfg.noise_std
    miss = len(planted) * cfg.num_levels * stats.norm.cdf((cfg.threshold - min(planted.values())) / sigma)
    assert miss < 1e-9, (sigma, cfg.threshold)
    words, mask = hh.encode_clients(clients, alphabet=letters, max_length=7)
    state, metrics = hh.discover(cfg, words, mask, np.ones(300, bool), jax.random.key(5))
    result = dict(hh.found(state, alphabet=letters))
    assert set(result) == set(planted)
    assert int(metrics["num_truncated"].sum()) == 0
    for word, n in planted.items():  # the released count is the count plus one N(0, sigma^2) draw
        assert abs(result[word] - n) < 6 * sigma


def test_level_noise_is_gaussian_with_the_stated_std():
    # Level 0 over three first letters held by 100, 80, 60 clients: all far above the threshold,
    # so each always survives and its released count minus the true count is one noise draw.
    clients = [["a"]] * 100 + [["b"]] * 80 + [["c"]] * 60
    cfg = _config(noise_multiplier=1.5, max_contributions=2, threshold=5.0, max_candidates=4)
    words, mask = hh.encode_clients(clients, alphabet=ALPHABET, max_length=5)
    keys = jax.random.split(jax.random.key(6), 400)
    extend = jax.jit(
        jax.vmap(lambda k: hh.extend(cfg, hh.init(cfg), words, mask, np.ones(len(clients), bool), k)[0])
    )
    states = extend(keys)
    first = np.asarray(states.prefixes[:, :, 0])
    truth = np.array([0.0, 100.0, 80.0, 60.0])[first]
    assert np.asarray(states.prefix_mask).sum(axis=1).tolist() == [3] * 400
    noise = (np.asarray(states.counts) - truth)[np.asarray(states.prefix_mask)]
    sigma = cfg.noise_std
    assert sigma == pytest.approx(1.5 * math.sqrt(2))
    assert stats.kstest(noise, "norm", args=(0.0, sigma)).pvalue > 1e-3
    assert stats.kstest(noise, "norm", args=(0.0, 1.3 * sigma)).pvalue < 1e-6
    assert stats.kstest(noise, "norm", args=(0.0, sigma / 1.3)).pvalue < 1e-6


def test_survivors_beyond_capacity_are_the_most_frequent_and_reported():
    clients = [["a"]] * 9 + [["b"]] * 7 + [["c"]] * 5
    cfg = _config(threshold=2.0, max_candidates=2)
    words, mask = hh.encode_clients(clients, alphabet=ALPHABET, max_length=5)
    extend = jax.jit(hh.extend, static_argnums=0)
    state, metrics = extend(cfg, hh.init(cfg), words, mask, np.ones(len(clients), bool), jax.random.key(0))
    assert sorted(np.asarray(state.prefixes[:, 0]).tolist()) == [1, 2]  # "a" and "b"
    assert int(metrics["num_above_threshold"]) == 3 and int(metrics["num_truncated"]) == 1


def test_over_a_secure_sum_noiseless_discovery_is_still_exact():
    rng = np.random.default_rng(7)
    clients = _random_clients(rng, 12, 4, 3, _vocab(rng, 10, 3))
    cfg = _config(max_length=3, threshold=2.0, max_candidates=16)
    words, mask = hh.encode_clients(clients, alphabet=ALPHABET, max_length=3)
    secure_sum = secagg.secure_sum(secagg.SecAggConfig())  # 0/1 votes are exact in its encoding
    state, _ = hh.discover(cfg, words, mask, np.ones(len(clients), bool), jax.random.key(8), sum=secure_sum)
    counts = _bounded_counts(clients, cfg.max_contributions)
    expected = {w: float(c) for w, c in counts.items() if c >= cfg.threshold}
    assert len(expected) >= 3 and dict(hh.found(state, alphabet=ALPHABET)) == expected


def test_epsilon_is_one_gaussian_of_multiplier_z_over_sqrt_levels():
    cfg = _config(max_length=9, noise_multiplier=3.0, delta=1e-6)
    assert cfg.num_levels == 9
    acc = pld.PLDAccountant(value_discretization_interval=1e-3)
    acc.compose(dp_accounting.GaussianDpEvent(3.0 / 3.0))
    assert hh.epsilon(cfg) == pytest.approx(acc.get_epsilon(1e-6), rel=1e-2)
    assert hh.epsilon(cfg, accountant="rdp") >= hh.epsilon(cfg)  # RDP is looser
    assert hh.epsilon(cfg.replace(noise_multiplier=0.0)) == math.inf
    ledger = budget.BudgetLedger(budget_epsilon=None, delta=1e-6, accountant="pld")  # composes with others
    assert ledger.spend(hh.dp_event(cfg), label="heavy hitters") == pytest.approx(hh.epsilon(cfg), rel=1e-3)
    calibrated = hh.calibrate_noise_multiplier(cfg, target_epsilon=4.0)
    assert hh.epsilon(calibrated) == pytest.approx(4.0, rel=1e-2)
    rdp = lambda c: hh.calibrate_noise_multiplier(c, target_epsilon=4.0, accountant="rdp").noise_multiplier
    assert rdp(cfg.replace(max_length=18)) > rdp(cfg) > calibrated.noise_multiplier  # more levels, more noise


def test_calibrated_threshold_bounds_false_positives_by_a_union_bound():
    cfg = _config(noise_multiplier=2.0, max_contributions=4)
    out = hh.calibrate_threshold(cfg, false_positive_rate=0.01, count=2)
    tail = stats.norm.sf((out.threshold - 2) / cfg.noise_std)
    assert tail * cfg.num_candidates * cfg.num_levels == pytest.approx(0.01, rel=1e-6)
    assert (
        hh.calibrate_threshold(cfg.replace(noise_multiplier=0.0), false_positive_rate=0.01).threshold == 2.0
    )


def test_encode_decode_roundtrip():
    strings = ["a", "cab", "bbbbb", "ca"]
    assert hh.decode(hh.encode(strings, alphabet=ALPHABET, max_length=5), alphabet=ALPHABET) == strings


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(threshold=0.0), "threshold"),
        (dict(threshold=math.inf), "threshold"),
        (dict(alphabet_size=1), "alphabet_size"),
        (dict(max_contributions=0), "max_contributions"),
        (dict(chars_per_level=6), "chars_per_level"),
        (dict(noise_multiplier=-1.0), "noise_multiplier"),
        (dict(delta=1.0), "delta"),
        (dict(alphabet_size=27, chars_per_level=4, max_candidates=10), "candidates"),
    ],
)
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        _config(**kw)


def test_input_validation():
    cfg = _config()
    with pytest.raises(ValueError, match="outside the alphabet"):
        hh.encode(["abd"], alphabet=ALPHABET, max_length=5)
    with pytest.raises(ValueError, match="more than max_length"):
        hh.encode(["abcabc"], alphabet=ALPHABET, max_length=5)
    with pytest.raises(ValueError, match="empty"):
        hh.encode([""], alphabet=ALPHABET, max_length=5)
    with pytest.raises(ValueError, match="repeated"):
        hh.encode(["a"], alphabet="aa", max_length=5)
    with pytest.raises(ValueError, match="max_words"):
        hh.encode_clients([["a", "b"]], alphabet=ALPHABET, max_length=5, max_words=1)
    words = jnp.zeros((2, 3, 5), jnp.int32)
    with pytest.raises(ValueError, match="max_length=5"):
        hh.discover(cfg, words[..., :4], jnp.ones((2, 3), bool), jnp.ones(2, bool), jax.random.key(0))
    with pytest.raises(ValueError, match="word_mask"):
        hh.discover(cfg, words, jnp.ones((2, 4), bool), jnp.ones(2, bool), jax.random.key(0))
    with pytest.raises(ValueError, match="client_mask"):
        hh.discover(cfg, words, jnp.ones((2, 3), bool), jnp.ones(3, bool), jax.random.key(0))
    with pytest.raises(ValueError, match="integer"):
        hh.discover(
            cfg, words.astype(jnp.float32), jnp.ones((2, 3), bool), jnp.ones(2, bool), jax.random.key(0)
        )
    with pytest.raises(ValueError, match="false_positive_rate"):
        hh.calibrate_threshold(cfg, false_positive_rate=0.0)
