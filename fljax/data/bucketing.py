"""Heavy-tailed populations: bucket a cohort's clients by size.

Padding every client to the population's largest wastes most of the
computation when a few clients hold 100x the median (FEMNIST, Shakespeare,
Stack Overflow). Here a cohort is split into a few buckets, each padded to its
own static length; every bucket runs the same vmapped client update (one
compiled shape per bucket length and slot count, each compiled once), and the
buckets' outputs are combined exactly as ONE round:

* with the default example-weighted mean, each bucket returns its weighted
  sum of deltas and its total weight (streamed over chunks of clients, so a
  cohort of 10,000 never stacks 10,000 deltas), and the server divides once;
* with any other :class:`~fljax.base.Aggregator` (DP, robust, secure
  aggregation), the buckets' :class:`~fljax.base.ClientOutput` are
  concatenated (plus zero-weight padding) before one ``aggregate``.

Because every client's key is ``fold_in(clients_stream, client_id)`` and its
shuffle puts real examples first, a client trains on the same minibatches
whatever its padded length: a bucketed round equals the padded round up to
float reassociation.

Bucket lengths come from :func:`plan`: a dynamic programme over the
population's distribution of local steps that minimises the expected number
of padding steps for a given number of buckets. Slots per bucket follow a
ladder of 8 sizes per octave (so only a handful of shapes ever compile), and
spare slots of a long bucket are filled with the next-largest clients.
Capping local steps, as TFF and FedJAX do, is the ``max_steps`` argument (it
also caps the padded length; larger clients keep a fixed random subset, see
:meth:`FederatedData.cohort`).

Random cohorts in a bounded set of shapes: :func:`gather` puts each cohort
client in the shortest bucket that holds it and pads each bucket's client
count up to a rung of :func:`count_capacities` (a geometric ladder, ratio at
most ``growth``). ``algo.update(state, tuple(gather(...)), key)``, called
without an outer ``jax.jit``, runs each bucket as one jitted call (a
``lax.map`` over chunks of clients), so the round compiles at most
``len(plan.lengths) * len(capacities)`` client-computation shapes whatever
the cohorts (:func:`max_shapes`), plus, for aggregators other than the
default streaming mean, one aggregation shape per distinct padded total
(:func:`capacity` of the summed bucket capacities). Wrapping the whole round
in one ``jax.jit`` instead compiles one program per combination of the
buckets' counts, a number that grows as a product over the buckets.
:func:`heavy_tailed` says when a population pays for buckets (the trainer's
default for such populations).

Examples:
  Six clients of 1 to 12 examples in two buckets, padded to 4 and 12 examples:

  >>> import jax, numpy as np, optax
  >>> from fljax import client, models
  >>> from fljax.algorithms import fedavg
  >>> from fljax.data import FederatedData, bucketing
  >>> rng = np.random.default_rng(0)
  >>> data = FederatedData.from_clients(
  ...     [(rng.normal(size=(n, 4)).astype(np.float32), rng.integers(0, 3, n).astype(np.int32))
  ...      for n in (1, 2, 3, 4, 10, 12)],
  ...     num_classes=3,
  ... )
  >>> p = bucketing.plan(data.sizes, batch_size=2, num_buckets=2)
  >>> p.lengths
  (4, 12)
  >>> ids, mask = np.arange(6), np.ones(6, bool)  # e.g. from fljax.data.sampling
  >>> cohorts = bucketing.split(data, ids, mask, p, slots=4)
  >>> [c.data.mask.shape for c in cohorts]  # [slots, padded examples], longest last
  [(4, 4), (4, 12)]
  >>> model = models.LogisticRegression(num_classes=3)
  >>> algo = fedavg.fedavg(client.local_sgd(model, optax.sgd(0.1), batch_size=2))
  >>> state = algo.init(models.init_params(model, (4,), jax.random.key(0)))
  >>> step = jax.jit(algo.update)
  >>> state, metrics = step(state, tuple(cohorts), jax.random.key(1))  # a tuple of cohorts: size buckets
  >>> int(state.round)
  1
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import numpy as np

from fljax.base import Cohort
from fljax.data import sampling
from fljax.data.federated import FederatedData


class Plan(NamedTuple):
    """Bucket lengths for one population.

    Attributes:
      lengths: padded examples per client of each bucket, ascending; each a
        multiple of ``batch_size`` (the last holds the largest, capped client).
      batch_size: the local minibatch size the plan was made for.
    """

    lengths: tuple[int, ...]
    batch_size: int


def num_steps(sizes: np.ndarray, batch_size: int, max_steps: int | None = None) -> np.ndarray:
    """Real local steps per epoch: ``ceil(size / batch_size)``, capped at ``max_steps``."""
    steps = -(-np.asarray(sizes, np.int64) // batch_size)
    return steps if max_steps is None else np.minimum(steps, max_steps)


def plan(sizes: np.ndarray, batch_size: int, *, num_buckets: int = 12, max_steps: int | None = None) -> Plan:
    """Choose ``num_buckets`` lengths minimising the population's padding steps.

    Exact dynamic programme over the distinct step counts (``O(K m)`` numpy
    passes over ``m`` distinct values). A uniformly sampled cohort then has
    the same expected padding fraction as the population.

    Args:
      sizes: ``[num_clients]`` examples per client (``FederatedData.sizes``).
      batch_size: local minibatch size.
      num_buckets: at most this many lengths (fewer if fewer distinct sizes).
      max_steps: optional cap on local steps (TFF / FedJAX style).

    Returns:
      A :class:`Plan`.
    """
    if batch_size <= 0 or num_buckets <= 0:
        raise ValueError(f"batch_size and num_buckets must be positive, got {batch_size}, {num_buckets}")
    steps = num_steps(np.maximum(np.asarray(sizes), 1), batch_size, max_steps)
    values, counts = np.unique(steps, return_counts=True)
    m = len(values)
    k_max = min(num_buckets, m)
    c = np.concatenate([[0], np.cumsum(counts)]).astype(np.float64)
    s = np.concatenate([[0], np.cumsum(counts * values)]).astype(np.float64)
    # cost[j, i]: clients with values[j..i] padded to values[i]
    j = np.arange(m)[:, None]
    i = np.arange(m)[None, :]
    cost = np.where(j <= i, values[None, :] * (c[i + 1] - c[j]) - (s[i + 1] - s[j]), np.inf)
    dp = [cost[0]]  # dp[k][i]: values[0..i] in k+1 buckets, the last ending at values[i]
    args = [np.zeros(m, np.int64)]
    for _ in range(1, k_max):
        prev = np.concatenate([[np.inf], dp[-1][:-1]])  # prev[j] = dp[k-1][j-1]
        total = prev[:, None] + cost
        arg = np.argmin(total, axis=0)
        dp.append(total[arg, np.arange(m)])
        args.append(arg)
    k = int(np.argmin([d[m - 1] for d in dp]))
    ends, i_end = [m - 1], m - 1
    while k > 0:
        i_end = int(args[k][i_end]) - 1
        ends.append(i_end)
        k -= 1
    lengths = tuple(int(values[e]) * batch_size for e in sorted(ends))
    return Plan(lengths=lengths, batch_size=int(batch_size))


def capacity(count: int, chunk_size: int | None = None) -> int:
    """Slots for ``count`` clients: exact up to 16, then 8 sizes per octave.

    Above ``chunk_size`` the slot count is a multiple of ``chunk_size`` (so
    the bucket can run in chunks).
    """
    if count <= 0:
        return 0
    if chunk_size is not None and count > chunk_size:
        return -(-count // chunk_size) * chunk_size
    if count <= 16:
        return count
    unit = 2 ** (int(np.floor(np.log2(count))) - 3)
    return -(-count // unit) * unit


def assign(
    sizes: np.ndarray,
    client_ids: np.ndarray,
    p: Plan,
    *,
    slots: int = 16,
    max_steps: int | None = None,
) -> list[tuple[int, np.ndarray]]:
    """Place a cohort's clients into buckets.

    Walks the buckets from the longest down: bucket ``b`` must take every
    remaining client longer than bucket ``b-1``, rounded up to a multiple of
    ``slots``, and spare slots take the next-largest clients (so only the
    shortest bucket can hold empty slots).

    Args:
      sizes: ``[clients]`` examples of each cohort client.
      client_ids: ``[clients]`` their population ids (``-1`` entries are ignored).
      p: the :class:`Plan`.
      slots: clients per compiled call: every call has shape ``[slots, length]``,
        so each bucket length compiles exactly once whatever the cohort.
      max_steps: local step cap used for the plan.

    Returns:
      ``[(length, ids[slots])]``, one entry per call, ``ids`` padded with ``-1``.
    """
    ids = np.asarray(client_ids, np.int64)
    real = ids >= 0
    ids, steps = ids[real], num_steps(np.asarray(sizes)[real], p.batch_size, max_steps)
    bucket_steps = [length // p.batch_size for length in p.lengths]
    if steps.size and steps.max() > bucket_steps[-1]:
        raise ValueError(
            f"a client needs {steps.max()} steps but the plan's longest bucket has {bucket_steps[-1]}"
        )
    order = np.argsort(-steps, kind="stable")
    ids, steps = ids[order], steps[order]
    out, start = [], 0
    for b in range(len(p.lengths) - 1, -1, -1):
        below = bucket_steps[b - 1] if b > 0 else 0
        needed = int(np.sum(steps[start:] > below))
        if b == 0:
            needed = len(ids) - start
        cap = -(-needed // slots) * slots
        if cap == 0:
            continue
        take = ids[start : start + cap]
        start += len(take)
        padded = np.full(cap, -1, np.int64)
        padded[: len(take)] = take
        out.extend((p.lengths[b], call) for call in padded.reshape(-1, slots)[::-1])
    return out[::-1]


def split(
    data: FederatedData,
    client_ids: np.ndarray,
    client_mask: np.ndarray | None,
    p: Plan,
    *,
    slots: int = 16,
    max_steps: int | None = None,
    key=None,
) -> list[Cohort]:
    """Gather a cohort as a list of ``[slots, length]`` :class:`Cohort` (host numpy), longest last.

    Args:
      data: the population.
      client_ids: ``[cohort]`` ids from a sampler (``-1`` = padding slot).
      client_mask: optional ``[cohort]`` bool from the sampler.
      p: the :class:`Plan`.
      slots: clients per call (see :func:`assign`).
      max_steps: the local step cap (also caps the padded length).
      key: typed key for subsampling clients longer than the cap (see
        :meth:`FederatedData.cohort`), e.g. ``fljax.random.stream(run_key, "data")``.
    """
    ids = np.asarray(client_ids, np.int64)
    if client_mask is not None:
        ids = np.where(np.asarray(client_mask, bool), ids, -1)
    sizes = np.where(ids >= 0, data.sizes[np.maximum(ids, 0)], 0)
    return [
        data.cohort(call, num_examples=length, key=key)
        for length, call in assign(sizes, ids, p, slots=slots, max_steps=max_steps)
    ]


def padding_fraction(cohorts: Sequence[Cohort], batch_size: int, max_steps: int | None = None) -> float:
    """Fraction of computed client-steps that are padding, over a list of cohorts."""
    computed = real = 0
    for cohort in cohorts:
        mask = np.asarray(cohort.data.mask)
        steps = num_steps(mask.shape[1], batch_size, max_steps)
        computed += mask.shape[0] * int(steps)
        real += int(num_steps(mask.sum(axis=1), batch_size, max_steps).sum())
    return 1.0 - real / computed if computed else 0.0


def naive_padding_fraction(
    sizes: np.ndarray, batch_size: int, max_size: int, max_steps: int | None = None
) -> float:
    """Padding fraction when every client is padded to ``max_size`` examples."""
    real = num_steps(sizes, batch_size, max_steps).sum()
    return float(1.0 - real / (len(sizes) * num_steps(max_size, batch_size, max_steps)))


HEAVY_TAIL_RATIO = 4.0
"""A population is heavy-tailed when its largest client needs at least this many times the
local steps of its median client (:func:`heavy_tailed`)."""


def heavy_tailed(
    sizes: np.ndarray, batch_size: int, max_steps: int | None = None, ratio: float = HEAVY_TAIL_RATIO
) -> bool:
    """Whether padding every client to the largest wastes most of a round.

    Heavy-tailed means ``max(steps) >= ratio * median(steps)``, with ``steps``
    each client's local steps per epoch (:func:`num_steps`, capped at
    ``max_steps``). At the default ratio 4, a cohort of median clients padded
    to the largest computes at least 75% padding steps.

    Examples:
      >>> heavy_tailed(np.array([10, 20, 20, 30, 400]), batch_size=10)
      True
      >>> heavy_tailed(np.array([10, 20, 20, 30, 400]), batch_size=10, max_steps=5)
      False
    """
    if batch_size <= 0 or not ratio > 0:
        raise ValueError(f"batch_size and ratio must be positive, got {batch_size}, {ratio}")
    steps = num_steps(np.maximum(np.asarray(sizes), 1), batch_size, max_steps)
    return bool(steps.max() >= ratio * np.median(steps))


def count_capacities(
    max_clients: int, *, chunk_size: int | None = None, multiple: int = 1, growth: float = 1.3
) -> tuple[int, ...]:
    """Client counts a bucket is padded to.

    :func:`fljax.data.sampling.geometric_ladder` from 1 to ``max_clients``,
    each count rounded up to a multiple of ``multiple`` (e.g. the devices the
    clients are spread over) and, above ``chunk_size``, to a multiple of
    ``chunk_size`` (so the bucket runs in whole chunks; ``chunk_size`` is then
    a multiple of ``multiple``).

    Examples:
      >>> count_capacities(40)
      (1, 2, 3, 4, 5, 6, 7, 9, 11, 14, 18, 23, 29, 37, 40)
      >>> count_capacities(40, chunk_size=8)
      (1, 2, 3, 4, 5, 6, 7, 8, 16, 24, 32, 40)
      >>> count_capacities(40, chunk_size=16, multiple=2)
      (2, 4, 6, 8, 10, 12, 14, 16, 32, 48)
    """
    if max_clients < 1 or multiple < 1:
        raise ValueError(f"max_clients and multiple must be positive, got {max_clients}, {multiple}")
    if chunk_size is not None and (chunk_size < 1 or chunk_size % multiple):
        raise ValueError(f"chunk_size must be a positive multiple of {multiple}, got {chunk_size}")
    up = lambda v, m: -(-v // m) * m
    ladder = sampling.geometric_ladder(1, int(max_clients), growth)
    if chunk_size is not None and chunk_size < max_clients:
        ladder = (*ladder, chunk_size)
    out = {
        up(v, chunk_size) if chunk_size is not None and v > chunk_size else up(v, multiple) for v in ladder
    }
    return tuple(sorted(out))


def max_shapes(p: Plan, capacities: Sequence[int]) -> int:
    """The most ``[clients, length]`` bucket shapes that :func:`gather` ever produces:
    ``len(p.lengths) * len(capacities)``, the bound on a bucketed round's client compiles."""
    return len(p.lengths) * len(capacities)


def gather(
    data: FederatedData,
    client_ids: np.ndarray,
    client_mask: np.ndarray | None,
    p: Plan,
    *,
    capacities: Sequence[int],
    max_steps: int | None = None,
    key=None,
) -> list[Cohort]:
    """A cohort as one :class:`Cohort` per bucket length, each padded to a capacity (host numpy).

    Each client goes to the shortest bucket length that holds its steps; each
    bucket's client count ``n`` is padded with ``-1`` slots to the smallest of
    ``capacities`` that is ``>= n``. Buckets without clients are left out.
    Every cohort therefore has a shape among the :func:`max_shapes` ones. The
    round over these buckets equals the round over the cohort padded to the
    population's largest client (padding slots and examples contribute zero).

    Args:
      data: the population.
      client_ids: ``[cohort]`` ids from a sampler (``-1`` = padding slot).
      client_mask: optional ``[cohort]`` bool from the sampler.
      p: the :class:`Plan`.
      capacities: ascending client counts (:func:`count_capacities`); the
        largest must hold every bucket.
      max_steps: the local step cap (also caps the padded length, see :func:`split`).
      key: typed key for subsampling clients longer than the cap.

    Returns:
      ``[Cohort]``, shortest length first, each ``[capacity, length]``.
    """
    ladder = tuple(int(c) for c in capacities)
    if not ladder or ladder[0] < 1 or any(b <= a for a, b in zip(ladder, ladder[1:], strict=False)):
        raise ValueError(f"capacities must be positive and strictly increasing, got {capacities}")
    ids = np.asarray(client_ids, np.int64)
    if client_mask is not None:
        ids = np.where(np.asarray(client_mask, bool), ids, -1)
    sizes = np.where(ids >= 0, data.sizes[np.maximum(ids, 0)], 0)
    out = []
    for length, members in assign(sizes, ids, p, slots=1, max_steps=max_steps):
        members = members[members >= 0]
        if not members.size:
            continue
        if out and out[-1][0] == length:
            out[-1][1].append(members)
        else:
            out.append((length, [members]))
    cohorts = []
    for length, parts in out:
        members = np.concatenate(parts)
        i = int(np.searchsorted(ladder, members.size))
        if i == len(ladder):
            raise ValueError(f"a bucket of {members.size} clients exceeds the largest capacity {ladder[-1]}")
        padded = np.full(ladder[i], -1, np.int64)
        padded[: members.size] = np.sort(members)
        cohorts.append(data.cohort(padded, num_examples=length, key=key))
    return cohorts


def merge(cohorts: Sequence[Cohort]) -> list[Cohort]:
    """Concatenate the calls of :func:`split` that share a padded length: one
    :class:`Cohort` per bucket length, shortest first.

    With ``Performance(chunk_size=slots)`` on the round and the same ``slots``
    given to :func:`split`, every merged bucket divides into chunks, and
    ``jax.jit(algo.update)(state, merge(cohorts), key)`` is the whole round as
    ONE jitted computation (a ``lax.map`` over chunks per bucket length). Its
    shapes depend on how many clients fall in each bucket, so it compiles
    again when that changes (e.g. every round with random cohorts); there,
    use :func:`gather` with ``algo.update`` outside ``jax.jit`` (a bounded
    set of shapes, :func:`max_shapes`).
    """
    if not cohorts:
        raise ValueError("no bucket cohorts to merge")
    groups: dict[int, list[Cohort]] = {}
    for c in cohorts:
        groups.setdefault(int(c.data.mask.shape[1]), []).append(c)
    return [
        jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs]), *groups[length])
        for length in sorted(groups)
    ]
