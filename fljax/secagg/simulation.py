"""Vectorised simulation of secure aggregation inside the jitted round.

Reproduces the arithmetic of Bonawitz et al. 2017 (and of SecAgg+, Bell et
al. 2020, on a sparse graph) over the whole cohort at once, with no Python
loop over clients:

* every client ``u`` adds to its encoded input a self-mask ``PRG(b_u)`` and,
  for every neighbour ``v`` in the masking graph, ``+PRG(s_uv)`` if ``u < v``
  and ``-PRG(s_uv)`` otherwise, all modulo ``2**bits``;
* the server adds the masked inputs of the survivors, removes the survivors'
  self-masks and, for each client that dropped out after the masks were
  agreed, its pairwise masks with the survivors (which the protocol lets the
  server recompute from the dropped client's reconstructed key).

The pairwise masks of all pairs are never materialised at once: the graph is a
ring of the clients (randomly permuted for a sparse graph) where each client is
joined to the clients at ring offsets ``1..K`` (``K = ceil(k/2)``, or
``floor(n/2)`` for the complete graph), and a ``lax.scan`` over the offsets
generates, for each offset, one ``[clients, dim]`` block of masks (the pairs
``(i, i + d)``), adds it to the lower client and subtracts it from the other.
Memory is ``O(clients * dim)``; work is ``O(clients * K * dim)``.

**This mode protects nothing.** Mask seeds come from ``jax.random`` (the
``"masks"`` key stream) and are expanded by a fast counter-based integer hash;
neither is a cryptographic generator, and every secret lives in one process.
It exists to reproduce the protocol's modular arithmetic, its quantisation and
its effect on accuracy, at little cost inside ``jit``. The real protocol is
:mod:`fljax.secagg.protocol`; for the same encoded inputs and survivors both
produce the same sum bit for bit (the masks differ, the sums are equal).

:func:`secure_sum` is the aggregator: a SUM in the sense of
:mod:`fljax.aggregators`, so ``aggregators.mean(secure_sum(c))`` is the secure
weighted mean and ``privacy.dp(dp_config, sum=secure_sum(c))`` is DP-FedAvg
whose noised sum is computed by secure aggregation. :func:`protocol_sum` is the
same sum with the real protocol run on the host (``jax.pure_callback``).

References:
  Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving
  Machine Learning", CCS 2017.
  Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic
  Overhead", CCS 2020.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fljax import aggregators, random
from fljax.base import Aggregator, Params, PyTree
from fljax.secagg import encoding, messages, protocol
from fljax.secagg.config import SecAggConfig

_GOLDEN = 0x9E3779B9


def _mix(h: jax.Array) -> jax.Array:
    """A bijective 32-bit integer finaliser (non-cryptographic)."""
    h = h ^ (h >> jnp.uint32(16))
    h = h * jnp.uint32(0x21F0AAAD)
    h = h ^ (h >> jnp.uint32(15))
    h = h * jnp.uint32(0x735A2D97)
    return h ^ (h >> jnp.uint32(15))


def expand(seed0: jax.Array, seed1: jax.Array, dim: int) -> jax.Array:
    """Counter-mode expansion of ``(seed0, seed1)[...]`` into ``[..., dim]`` uint32."""
    j = jnp.arange(dim, dtype=jnp.uint32) * jnp.uint32(_GOLDEN)
    j = j.reshape((1,) * seed0.ndim + (dim,))
    h = _mix(j + seed0[..., None])
    return _mix(h ^ seed1[..., None])


def _pair_seed(lo: jax.Array, hi: jax.Array, words: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Seeds of the pair ``(lo, hi)`` (client indices, uint32) from 4 key words."""
    s0 = _mix(_mix(lo + words[0]) ^ (hi * jnp.uint32(0x85EBCA6B) + words[1]))
    s1 = _mix(_mix(hi + words[2]) ^ (lo * jnp.uint32(0xC2B2AE35) + words[3]))
    return s0, s1


def num_offsets(config: SecAggConfig, num_clients: int) -> int:
    """Ring offsets scanned: ``floor(n/2)`` (complete graph) or ``k/2``."""
    if config.is_complete(num_clients):
        return num_clients // 2
    return config.neighbors_for(num_clients) // 2


class Masks(NamedTuple):
    """All masks of one simulated round, in client order.

    Attributes:
      self_masks: ``[clients, dim]`` uint32, ``PRG(b_u)``.
      pair_masks: ``[clients, dim]`` uint32, each client's signed sum of its
        pairwise masks.
      correction: ``[dim]`` uint32, what the server removes for the dropped
        clients: the pairwise masks between survivors and dropped clients, as
        they appear in the survivors' inputs.
      holders_alive: ``[clients]`` int32, surviving share holders (the client
        itself and its graph neighbours) of each client.
    """

    self_masks: jax.Array
    pair_masks: jax.Array
    correction: jax.Array
    holders_alive: jax.Array


def make_masks(survived: jax.Array, dim: int, key: jax.Array, config: SecAggConfig, bits: int) -> Masks:
    """Generate every client's masks and the server's dropout correction.

    Args:
      survived: ``[clients]`` bool, clients whose masked input reaches the server.
      dim: vector length (encoded coordinates, weight included).
      key: the ``"masks"`` key stream of the round.
      config: masking graph.
      bits: ring bit width.
    """
    n = survived.shape[0]
    self_key, pair_key, graph_key = (jax.random.fold_in(key, i) for i in range(3))
    mask = encoding.ring_mask(bits)
    seeds = jax.random.bits(self_key, (n, 2), jnp.uint32)
    self_masks = expand(seeds[:, 0], seeds[:, 1], dim) & mask

    if config.is_complete(n):
        perm = jnp.arange(n, dtype=jnp.int32)
    else:
        perm = jax.random.permutation(graph_key, n).astype(jnp.int32)
    ids = perm.astype(jnp.uint32)  # client index at each ring position
    surv = survived[perm]
    words = jax.random.bits(pair_key, (4,), jnp.uint32)
    pos = jnp.arange(n, dtype=jnp.int32)
    zero = jnp.zeros((), jnp.uint32)

    neg_one = jnp.uint32(0xFFFFFFFF)  # -1 mod 2**32

    def pair(i, j, d):
        """Seeds and sign (+1, -1 as 2**32 - 1, or 0) of ring pair ``(i, i + d)`` as seen by ``i``."""
        a, b = ids[i], ids[j]
        s0, s1 = _pair_seed(jnp.minimum(a, b), jnp.maximum(a, b), words)
        sign = jnp.where(a < b, jnp.uint32(1), neg_one)
        sign = jnp.where((2 * d == n) & (i >= d), zero, sign)  # offset n/2: each pair once
        return s0, s1, sign

    def step(carry, d):
        # Both pairs of ring position i at offset d are generated in place (the
        # backward one regenerated rather than gathered) so that XLA fuses the
        # whole update into one elementwise pass over [clients, dim].
        p, corr, alive = carry
        nxt = (pos + d) % n
        prev = (pos - d) % n
        s0, s1, sign = pair(pos, nxt, d)
        t0, t1, back = pair(prev, pos, d)
        m = expand(s0, s1, dim)
        p = p + m * sign[:, None] - expand(t0, t1, dim) * back[:, None]
        # Server side: pairs with exactly one survivor leave their mask in the
        # survivors' sum; the server removes it (from the dropped key).
        c = jnp.where(surv & ~surv[nxt], jnp.uint32(1), jnp.where(~surv & surv[nxt], neg_one, zero))
        corr = corr + jnp.sum(m * (c * sign)[:, None], axis=0, dtype=jnp.uint32)
        alive = alive + surv[nxt].astype(jnp.int32) + jnp.where(2 * d == n, 0, surv[prev].astype(jnp.int32))
        return (p, corr, alive), None

    init = (jnp.zeros((n, dim), jnp.uint32), jnp.zeros((dim,), jnp.uint32), surv.astype(jnp.int32))
    offsets = jnp.arange(1, num_offsets(config, n) + 1, dtype=jnp.int32)
    (p, corr, alive), _ = jax.lax.scan(step, init, offsets)
    inv = jnp.argsort(perm)
    return Masks(self_masks, (p & mask)[inv], corr & mask, alive[inv])


def mask_inputs(values: jax.Array, masks: Masks, bits: int) -> jax.Array:
    """What each client sends: ``x_u + PRG(b_u) + sum_v +-PRG(s_uv)`` mod ``2**bits``."""
    return (values + masks.self_masks + masks.pair_masks) & encoding.ring_mask(bits)


def unmask_sum(masked: jax.Array, survived: jax.Array, masks: Masks, bits: int) -> jax.Array:
    """The server's result: survivors' masked inputs, minus their self-masks,
    minus the dropped clients' pairwise masks, mod ``2**bits``."""
    s = survived[:, None]
    zero = jnp.zeros((), jnp.uint32)
    total = jnp.sum(jnp.where(s, masked, zero), axis=0, dtype=jnp.uint32)
    selfs = jnp.sum(jnp.where(s, masks.self_masks, zero), axis=0, dtype=jnp.uint32)
    return (total - selfs - masks.correction) & encoding.ring_mask(bits)


def masked_ring_sum(
    values: jax.Array, survived: jax.Array, key: jax.Array, config: SecAggConfig, bits: int
) -> tuple[jax.Array, jax.Array]:
    """Masked sum of the survivors' encoded inputs.

    Args:
      values: ``[clients, dim]`` uint32 in ``Z_(2**bits)``.
      survived: ``[clients]`` bool.
      key: the round's ``"masks"`` stream.

    Returns:
      ``(total[dim], aborted)``: the sum mod ``2**bits`` of the survivors'
      inputs, and a bool that is True when some client has fewer surviving
      share holders than the threshold (the protocol would abort; ``total``
      is then zeros).
    """
    n, dim = values.shape
    masks = make_masks(survived, dim, key, config, bits)
    total = unmask_sum(mask_inputs(values, masks, bits), survived, masks, bits)
    aborted = jnp.any(masks.holders_alive < config.threshold_for(n))
    return jnp.where(aborted, jnp.zeros_like(total), total), aborted


def _init(params: Params) -> aggregators.EmptyState:
    del params
    return aggregators.EmptyState()


RingSum = Callable[[jax.Array, jax.Array, jax.Array, int], tuple[jax.Array, jax.Array]]
"""``ring_sum(values[clients, dim], survived[clients], key, bits) -> (total[dim], aborted)``."""


def encoded_sum(config: SecAggConfig, ring_sum: RingSum) -> Aggregator:
    """The sum that encodes, adds in ``Z_(2**bits)`` with ``ring_sum`` and decodes.

    Shared by :func:`secure_sum` (masking simulated in jit) and
    :func:`protocol_sum` (the real protocol on the host): sanitise, encode
    (stochastic rounding from the ``"rounding"`` stream), draw the simulated
    dropouts (``"dropout"``), ``ring_sum`` the survivors' inputs, decode.
    """

    def aggregate(state: PyTree, deltas: Params, weights: jax.Array, key: jax.Array):
        w, num_bad = aggregators.sanitize(deltas, weights)
        x = encoding.flatten(deltas)
        n = x.shape[0]
        bits = config.ring_bits(n)
        x = jnp.where((w > 0)[:, None], x, jnp.zeros((), jnp.float32))
        enc = encoding.encode(x, w, random.stream(key, "rounding"), config, bits)
        if config.dropout_rate > 0:
            u = jax.random.uniform(random.stream(key, "dropout"), (n,), jnp.float32)
            survived = u >= jnp.float32(config.dropout_rate)
        else:
            survived = jnp.ones((n,), jnp.bool_)
        total, aborted = ring_sum(enc.values, survived, key, bits)
        weighted, total_weight = encoding.decode(total, config, bits)
        counted = enc.values[:, -1] > 0
        metrics = {
            "num_nonfinite": num_bad,
            "total_weight": total_weight,
            "num_clients": jnp.sum(counted & survived & ~aborted).astype(jnp.int32),
            "num_dropped": jnp.sum(counted & ~survived).astype(jnp.int32),
            "num_range_clipped": enc.num_range_clipped,
            "aborted": aborted.astype(jnp.int32),
        }
        return state, encoding.unflatten(weighted, deltas), metrics

    return Aggregator(_init, aggregate)


def secure_sum(config: SecAggConfig) -> Aggregator:
    """Weighted sum of client deltas through simulated secure aggregation (a sum, see
    :mod:`fljax.aggregators`).

    Per round: non-finite clients get weight 0 (counted as ``num_nonfinite``);
    each client's delta is clipped to ``[-clip_range, clip_range]`` per
    coordinate, weighted, quantised stochastically (key stream
    ``"rounding"``) and appended with its integer weight
    (:mod:`fljax.secagg.encoding`); the vectors are masked and summed
    (:func:`masked_ring_sum`, key stream ``"masks"``), optionally with
    simulated dropouts (``config.dropout_rate``, stream ``"dropout"``), and
    decoded. Padding slots (weight 0) encode to exact zeros and contribute
    nothing.

    Error bound: with ``n`` contributing clients, every coordinate of the total
    is within ``n * max_weight / scale`` (plus float32 rounding, relative
    ``2**-24``) of ``sum_i w_i clip(delta_i)`` under the quantised weights
    ``w_i`` (grid ``max_weight / 2**weight_bits``; weights above ``max_weight``
    are clipped to it). The reported ``total_weight`` is the exact sum of the
    quantised weights of the survivors; ``aggregators.mean(secure_sum(c))`` is
    the secure weighted mean. The decoded sum does not depend on the masks,
    hence not on the clients' slots, except through the stochastic rounding.

    ``jax.random`` is not a cryptographic generator: this simulation protects
    nothing (see the module docstring); it reproduces the protocol's
    arithmetic.

    Args:
      config: encoding, graph and dropout settings.

    Returns:
      ``Aggregator(init, aggregate)`` returning the decoded weighted sum;
      metrics: ``num_nonfinite``, ``total_weight``, ``num_clients``
      (contributing survivors), ``num_dropped``, ``num_range_clipped``,
      ``aborted`` (int32 0/1; the total and its weight are zero when the
      survivors fall below the threshold).

    Examples:
      A secure mean agrees with the plain mean within the encoding's error:

      >>> import jax, jax.numpy as jnp
      >>> from fljax import aggregators
      >>> from fljax.secagg import SecAggConfig, secure_sum
      >>> params = {"w": jnp.zeros(3)}
      >>> deltas = {"w": jnp.array([[0.01, -0.02, 0.03], [0.05, 0.0, -0.01]])}
      >>> weights = jnp.array([1.0, 1.0])
      >>> agg = aggregators.mean(secure_sum(SecAggConfig(clip_range=0.1, frac_bits=20)))
      >>> state = agg.init(params)
      >>> state, delta, metrics = jax.jit(agg.aggregate)(state, deltas, weights, jax.random.key(0))
      >>> plain = aggregators.weighted_mean()
      >>> _, expected, _ = plain.aggregate(plain.init(params), deltas, weights, jax.random.key(1))
      >>> bool(jnp.max(jnp.abs(delta["w"] - expected["w"])) <= 2.0**-20), int(metrics["aborted"])
      (True, 0)
    """

    def ring_sum(values, survived, key, bits):
        return masked_ring_sum(values, survived, random.stream(key, "masks"), config, bits)

    return encoded_sum(config, ring_sum)


def protocol_sum(config: SecAggConfig) -> Aggregator:
    """:func:`secure_sum` with the real cryptographic protocol on the host.

    The same sanitising, encoding (``"rounding"`` stream), simulated dropouts
    (``"dropout"``) and decoding run in jit; the ring sum is one
    :func:`fljax.secagg.protocol.run_round` over the cohort (every slot a
    client; the simulated dropouts vanish before sending their masked input),
    called through ``jax.pure_callback``. Its secrets come from the OS
    (``cryptography``, ``secrets``), not from ``key``, so the masks differ from
    run to run but the sum does not: for the same key the result equals
    :func:`secure_sum`'s bit for bit. On a sparse graph (``num_neighbors``) with
    dropouts, whether a round aborts can differ, as each draws its own graph.
    Every party lives in this one process: it exercises the protocol end to
    end inside training, it does not distribute trust. Host cost is the
    protocol's (``O(n * k * dim)`` AES work): for tests and small models.
    """

    def host(values: np.ndarray, survived: np.ndarray):
        dropped = {int(i) for i in np.flatnonzero(~np.asarray(survived))}
        try:
            result = protocol.run_round(np.asarray(values), config, dropouts={messages.MASKED_INPUT: dropped})
        except messages.ProtocolAbort:
            return np.zeros(values.shape[1], np.uint32), np.bool_(True)
        return np.asarray(result.total, np.uint32), np.bool_(False)

    def ring_sum(values, survived, key, bits):
        del key, bits  # the protocol derives the ring from the config and draws its own secrets
        out = (jax.ShapeDtypeStruct(values.shape[1:], jnp.uint32), jax.ShapeDtypeStruct((), jnp.bool_))
        return jax.pure_callback(host, out, values, survived)

    return encoded_sum(config, ring_sum)
