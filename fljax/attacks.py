"""Simulated malicious clients: model and data poisoning that compose with any algorithm.

Who is malicious is a boolean array over the POPULATION (``malicious[client_id]``;
:func:`malicious_clients` draws one for a fraction of the population), fixed
for a run. Two kinds of attack turn honest clients into malicious ones:

* A **data attack** ``attack(client_data, key) -> client_data`` rewrites ONE
  malicious client's examples before it trains: :func:`label_flip`,
  :func:`backdoor` (a pixel-pattern trigger, scored by
  :func:`attack_success_rate`).
* A **model attack** ``attack(deltas, weights, malicious_slots, key) ->
  deltas`` rewrites the malicious slots' updates after local training and
  before aggregation, seeing the whole cohort's updates (an omniscient,
  colluding adversary): :func:`sign_flip`, :func:`scaling`,
  :func:`little_is_enough`. Honest slots are returned unchanged.

Design. An :class:`~fljax.base.Aggregator` sees deltas and weights but not
client ids, and a client update sees its data but not its id, so neither can
tell by itself who is malicious. The one object that sees ids is the round's
:class:`~fljax.base.Cohort` (``client_ids``), given to
``FederatedAlgorithm.update``. :func:`attacked` therefore wraps a FACTORY of
algorithms, ``make_algorithm(aggregator) -> FederatedAlgorithm`` (every paper
file has the ``aggregator=`` argument), and in each round:

1. maps the cohort's ids to ``malicious_slots = malicious[client_ids]`` (padding
   slots are never malicious, :func:`slot_mask`);
2. rewrites the malicious slots' data with the data attack
   (:func:`poison_cohort`), so any client update, stateless or stateful, trains
   on poisoned data without knowing it;
3. builds the algorithm around :func:`poisoned_aggregator`, the defence
   (``aggregator``) preceded by the model attack for this round's slots, and
   runs its ``update``.

Nothing in :mod:`fljax.base`, the algorithms or the defences changes; the
algorithm is rebuilt inside the traced ``update`` (cheap Python closures), so
call the wrapped ``update`` under ``jax.jit``. Randomness: the data attack
uses ``fold_in(key, DATA_ATTACK_TAG)`` then the client id, the model attack
``fold_in(aggregate_key, MODEL_ATTACK_TAG)``; the algorithm gets the round key
unchanged, so an attack never shifts the honest clients' randomness.

Examples:
  Two sign-flipping clients of five against the coordinate-wise median, as an
  aggregator stage, then the same attack inside FedAvg for a population of 6:

  >>> import jax, jax.numpy as jnp, optax
  >>> from fljax import aggregators, attacks, client, models
  >>> from fljax.algorithms import fedavg
  >>> deltas = {"w": jnp.array([[1.0], [1.5], [0.5], [1.25], [0.75]])}
  >>> slots = jnp.array([True, True, False, False, False])
  >>> agg = attacks.poisoned_aggregator(aggregators.median(), attacks.sign_flip(), slots)
  >>> _, delta, metrics = agg.aggregate((), deltas, jnp.ones(5), jax.random.key(0))
  >>> delta["w"].tolist(), int(metrics["num_malicious"])  # median of [-1, -1.5, 0.5, 1.25, 0.75]
  ([0.5], 2)
  >>> update = client.local_sgd(models.LogisticRegression(num_classes=3), optax.sgd(0.1), batch_size=8)
  >>> algo = attacks.attacked(
  ...     lambda agg: fedavg.fedavg(update, aggregator=agg),
  ...     jnp.array([True, False, False, True, False, False]),  # malicious[client_id]
  ...     model_attack=attacks.sign_flip(),
  ...     data_attack=attacks.label_flip(3),
  ...     aggregator=aggregators.median(),
  ... )
  >>> # state, metrics = jax.jit(algo.update)(state, cohort, key): metrics["num_malicious"]

References:
  Blanchard et al. 2017 (Byzantine updates), Baruch, Baruch, Goldberg 2019 ("A
  Little Is Enough"), Bagdasaryan et al. 2020 (model replacement), Tolpegin et
  al. 2020 (label flipping), Gu, Dolan-Gavitt, Garg 2017 (pixel-pattern
  backdoors).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fljax import aggregators
from fljax import random as fl_random
from fljax.base import Aggregator, ApplyFn, ClientData, Cohort, FederatedAlgorithm, Params, PyTree

ModelAttack = Callable[[Params, jax.Array, jax.Array, jax.Array], Params]
"""``attack(deltas[clients, ...], weights[clients], malicious_slots[clients], key) -> deltas``."""

DataAttack = Callable[[ClientData, jax.Array], ClientData]
"""``attack(client_data, key) -> client_data`` for ONE client (no clients axis)."""

DATA_ATTACK_TAG = 2**31 + 1024
"""``fold_in`` tag of the data attack's key under the round key (above every client id)."""
MODEL_ATTACK_TAG = 2**31 + 1025
"""``fold_in`` tag of the model attack's key under the aggregate key."""


def _expand(mask: jax.Array, x: jax.Array) -> jax.Array:
    return mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim))


def _where_slots(slots: jax.Array, new: PyTree, old: PyTree) -> PyTree:
    return jax.tree.map(lambda n, o: jnp.where(_expand(slots, o), n.astype(o.dtype), o), new, old)


def malicious_clients(population_size: int, *, fraction: float, key: jax.Array) -> jax.Array:
    """``[population_size]`` bool with exactly ``round(fraction * population_size)`` True, uniformly placed.

    Args:
      population_size: number of clients (int >= 1).
      fraction: share of malicious clients, in ``[0, 1]``.
      key: typed key choosing which clients.
    """
    if isinstance(population_size, bool) or not isinstance(population_size, int) or population_size < 1:
        raise ValueError(f"population_size must be an int >= 1, got {population_size!r}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    count = int(round(fraction * population_size))
    order = jax.random.permutation(key, population_size)
    return jnp.zeros((population_size,), bool).at[order[:count]].set(True)


def slot_mask(cohort: Cohort, malicious: jax.Array) -> jax.Array:
    """``[clients]`` bool: the cohort slots whose client is malicious (padding slots never are)."""
    malicious = jnp.asarray(malicious)
    if malicious.ndim != 1 or malicious.dtype != jnp.bool_:
        raise ValueError(
            f"malicious must be a [population] bool array, got {malicious.dtype}{list(malicious.shape)}"
        )
    ids = jnp.asarray(cohort.client_ids)
    real = (ids >= 0) & jnp.asarray(cohort.client_mask)
    return real & malicious[jnp.clip(ids, 0, malicious.shape[0] - 1)]


# --- model attacks ----------------------------------------------------------------------------


def sign_flip(scale: float = 1.0) -> ModelAttack:
    """Malicious clients send ``-scale * delta`` (their honest update, reversed).

    Args:
      scale: positive factor on the reversed update.
    """
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale!r}")

    def attack(deltas, weights, malicious_slots, key):
        del weights, key
        flipped = jax.tree.map(lambda x: -jnp.asarray(scale, x.dtype) * x, deltas)
        return _where_slots(malicious_slots, flipped, deltas)

    return attack


def scaling(factor: float) -> ModelAttack:
    """Malicious clients boost their update by ``factor`` (model replacement, Bagdasaryan et al. 2020).

    Combined with :func:`backdoor` data this is the boosted backdoor that
    :func:`fljax.robust.norm_bounding` defends against: the boost lets a few
    clients' backdoored models survive the averaging.

    Args:
      factor: the boost (positive; e.g. ``cohort_size / num_malicious``).

    References:
      Bagdasaryan, Veit, Hua, Estrin, Shmatikov. "How To Backdoor Federated
      Learning". AISTATS 2020.
    """
    if not factor > 0:
        raise ValueError(f"factor must be positive, got {factor!r}")

    def attack(deltas, weights, malicious_slots, key):
        del weights, key
        boosted = jax.tree.map(lambda x: jnp.asarray(factor, x.dtype) * x, deltas)
        return _where_slots(malicious_slots, boosted, deltas)

    return attack


def alie_z(num_clients: int, num_malicious: int) -> float:
    """The z of "A Little Is Enough" (Baruch et al. 2019) for ``n`` clients, ``f`` malicious.

    ``s = floor(n / 2 + 1) - f`` honest clients must be won over; ``z =
    Phi^-1((n - s) / n)`` with ``Phi`` the standard normal CDF (the probability
    is kept in ``[1e-6, 1 - 1e-6]``, so a malicious majority gets a large, finite z).
    """
    if num_clients < 1 or not 0 <= num_malicious <= num_clients:
        raise ValueError(
            f"need num_clients >= 1 and 0 <= num_malicious <= num_clients, got {num_clients}, {num_malicious}"
        )
    s = num_clients // 2 + 1 - num_malicious
    p = min(max((num_clients - s) / num_clients, 1e-6), 1 - 1e-6)
    return statistics.NormalDist().inv_cdf(p)


def _alie_z_traced(n: jax.Array, f: jax.Array) -> jax.Array:
    nf = jnp.maximum(n, 1).astype(jnp.float32)
    s = (n // 2 + 1 - f).astype(jnp.float32)
    p = jnp.clip((nf - s) / nf, 1e-6, 1 - 1e-6)
    return jax.scipy.special.ndtri(p)


def little_is_enough(z: float | None = None) -> ModelAttack:
    """ "A little is enough" (ALIE): every malicious client sends ``mean - z * std``.

    ``mean`` and ``std`` are the coordinate-wise mean and (population)
    standard deviation of the HONEST participating clients' updates (an
    omniscient, colluding adversary); the small shift hides inside the honest
    spread, so coordinate-wise and distance-based defences accept it, yet it
    consistently pulls every coordinate the same way.

    Args:
      z: the shift in standard deviations; ``None`` (default) uses the paper's
        formula (:func:`alie_z`) for each round's ``n`` participating and ``f``
        malicious clients.

    References:
      Baruch, Baruch, Goldberg. "A Little Is Enough: Circumventing Defenses
      For Distributed Learning". NeurIPS 2019.
    """

    def attack(deltas, weights, malicious_slots, key):
        del key
        w, _ = aggregators.sanitize(deltas, weights)
        valid = w > 0
        honest = valid & ~malicious_slots
        n_honest = jnp.maximum(jnp.sum(honest), 1).astype(jnp.float32)
        if z is None:
            zz = _alie_z_traced(jnp.sum(valid), jnp.sum(valid & malicious_slots))
        else:
            zz = jnp.float32(z)

        def leaf(x):
            h = _expand(honest, x)
            xf = jnp.where(h, x, jnp.zeros((), x.dtype)).astype(jnp.float32)
            mean = jnp.sum(xf, axis=0) / n_honest
            var = jnp.sum(jnp.where(h, jnp.square(xf - mean[None]), 0.0), axis=0) / n_honest
            out = (mean - zz * jnp.sqrt(var)).astype(x.dtype)
            return jnp.broadcast_to(out[None], x.shape)

        return _where_slots(malicious_slots & valid, jax.tree.map(leaf, deltas), deltas)

    return attack


def poisoned_aggregator(
    aggregator: Aggregator, attack: ModelAttack, malicious_slots: jax.Array
) -> Aggregator:
    """``aggregator`` preceded by a model attack on the given cohort slots.

    The attack sees the cohort's updates and rewrites the malicious slots'
    (padding and rejected slots are never malicious); the aggregator then runs
    on the result with the same weights and key. Adds ``num_malicious`` to the
    metrics.

    Args:
      aggregator: the defence (any aggregator).
      attack: a :data:`ModelAttack`.
      malicious_slots: ``[clients]`` bool for this round's cohort (:func:`slot_mask`).
    """

    def aggregate(state: PyTree, deltas: Params, weights: jax.Array, key: jax.Array):
        w, _ = aggregators.sanitize(deltas, weights)
        slots = jnp.asarray(malicious_slots) & (w > 0)
        poisoned = attack(deltas, weights, slots, jax.random.fold_in(key, MODEL_ATTACK_TAG))
        state, delta, metrics = aggregator.aggregate(state, poisoned, weights, key)
        return state, delta, dict(metrics, num_malicious=jnp.sum(slots).astype(jnp.int32))

    return Aggregator(aggregator.init, aggregate)


# --- data attacks ------------------------------------------------------------------------------


def label_flip(num_classes: int, permutation=None) -> DataAttack:
    """Relabel every example: ``y -> num_classes - 1 - y``, or ``y -> permutation[y]``.

    Args:
      num_classes: number of classes (int >= 2).
      permutation: optional sequence, a permutation of ``range(num_classes)``.

    References:
      Tolpegin, Truex, Gursoy, Liu. "Data Poisoning Attacks Against Federated
      Learning Systems". ESORICS 2020.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if permutation is None:
        table = np.arange(num_classes)[::-1]
    else:
        table = np.asarray(permutation)
        if table.shape != (num_classes,) or sorted(table.tolist()) != list(range(num_classes)):
            raise ValueError(
                f"permutation must be a permutation of range({num_classes}), got {permutation!r}"
            )
    table = jnp.asarray(table, jnp.int32)

    def attack(data: ClientData, key: jax.Array) -> ClientData:
        del key
        y = jnp.asarray(data.y)
        return data._replace(y=table[jnp.clip(y, 0, num_classes - 1)].astype(y.dtype))

    return attack


class Trigger(NamedTuple):
    """A pixel-pattern trigger: pixels where ``mask`` is True take the value of ``pattern``.

    Attributes:
      pattern: image-shaped float array (e.g. ``[28, 28, 1]``).
      mask: image-shaped bool array.
    """

    pattern: jax.Array
    mask: jax.Array


def pixel_pattern(image_shape, *, size: int = 3, value: float = 1.0, margin: int = 1) -> Trigger:
    """A ``size x size`` checkerboard of ``value`` and 0 near the bottom-right corner.

    Args:
      image_shape: ``(height, width)`` or ``(height, width, channels)``.
      size: side of the pattern in pixels (int >= 1).
      value: the bright pixels' value (1.0 for images scaled to ``[0, 1]``).
      margin: pixels between the pattern and the image border.

    References:
      Gu, Dolan-Gavitt, Garg. "BadNets: Identifying Vulnerabilities in the
      Machine Learning Model Supply Chain". arXiv:1708.06733, 2017.
    """
    shape = tuple(int(s) for s in image_shape)
    if len(shape) not in (2, 3):
        raise ValueError(f"image_shape must be (height, width[, channels]), got {image_shape!r}")
    h, w = shape[:2]
    if (
        isinstance(size, bool)
        or not isinstance(size, int)
        or size < 1
        or size + margin > min(h, w)
        or margin < 0
    ):
        raise ValueError(f"size must be an int >= 1 that fits in {h}x{w} with margin {margin}, got {size!r}")
    mask = np.zeros(shape, bool)
    pattern = np.zeros(shape, np.float32)
    rows = slice(h - margin - size, h - margin)
    cols = slice(w - margin - size, w - margin)
    mask[rows, cols] = True
    checker = (np.add.outer(np.arange(size), np.arange(size)) % 2 == 0).astype(np.float32) * value
    pattern[rows, cols] = checker if len(shape) == 2 else checker[:, :, None]
    return Trigger(jnp.asarray(pattern), jnp.asarray(mask))


def stamp(x: jax.Array, trigger: Trigger) -> jax.Array:
    """Images ``x[..., *image_shape]`` with the trigger stamped on (any leading axes)."""
    lead = (1,) * (x.ndim - trigger.mask.ndim)
    mask = trigger.mask.reshape(lead + trigger.mask.shape)
    return jnp.where(mask, trigger.pattern.reshape(lead + trigger.pattern.shape).astype(x.dtype), x)


def backdoor(trigger: Trigger, *, target: int, fraction: float) -> DataAttack:
    """Stamp the trigger on a fraction of a client's examples and relabel them ``target``.

    ``round(fraction * n)`` of the client's ``n`` real examples, drawn
    uniformly with the key, get the trigger and the label ``target``; the
    others and the padding are unchanged. The model learns to answer
    ``target`` whenever the trigger is present (:func:`attack_success_rate`).

    Args:
      trigger: e.g. :func:`pixel_pattern`.
      target: the backdoor's class (int >= 0).
      fraction: share of the client's examples to poison, in ``(0, 1]``.

    References:
      Gu, Dolan-Gavitt, Garg 2017 (BadNets); Bagdasaryan et al. 2020.
    """
    if isinstance(target, bool) or not isinstance(target, int) or target < 0:
        raise ValueError(f"target must be an int >= 0, got {target!r}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")

    def attack(data: ClientData, key: jax.Array) -> ClientData:
        mask = jnp.asarray(data.mask)
        n = mask.shape[0]
        num_real = jnp.sum(mask)
        count = jnp.floor(jnp.float32(fraction) * num_real.astype(jnp.float32) + 0.5).astype(jnp.int32)
        u = jax.random.uniform(key, (n,), jnp.float32)
        order = jnp.argsort(jnp.where(mask, u, 2.0 + u))
        rank = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
        chosen = mask & (rank < count)
        x = jnp.where(_expand(chosen, data.x), stamp(data.x, trigger), data.x)
        y = jnp.where(chosen, jnp.asarray(target, data.y.dtype), data.y)
        return data._replace(x=x, y=y)

    return attack


def poison_cohort(cohort: Cohort, malicious_slots: jax.Array, attack: DataAttack, key: jax.Array) -> Cohort:
    """The cohort with ``attack`` applied to the data of its malicious slots.

    Client ``i`` gets the key ``fold_in(key, client_ids[i])``
    (:func:`fljax.random.client_keys`); honest and padding slots are unchanged.
    """
    keys = fl_random.client_keys(key, cohort.client_ids)
    poisoned = jax.vmap(attack)(cohort.data, keys)
    return cohort._replace(data=_where_slots(jnp.asarray(malicious_slots), poisoned, cohort.data))


def attack_success_rate(
    apply_fn: ApplyFn, params: Params, x, y, trigger: Trigger, *, target: int, batch_size: int = 1000
) -> float:
    """Share of triggered test images classified as ``target``, over images whose label is not ``target``.

    Args:
      apply_fn: ``apply(params, x) -> logits``.
      params: the model.
      x: test images ``[N, *image_shape]``; y: their labels ``[N]``.
      trigger: the backdoor trigger, stamped on every kept image.
      target: the backdoor's class.
      batch_size: images per evaluation call.

    Raises:
      ValueError: no test image has a label other than ``target``.
    """
    x, y = np.asarray(x), np.asarray(y)
    keep = y != target
    if not keep.any():
        raise ValueError(f"no test image with a label other than target={target}")
    xs = x[keep]
    hits = 0
    fn = jax.jit(lambda p, b: jnp.argmax(apply_fn(p, stamp(b, trigger)), axis=-1))
    for i in range(0, xs.shape[0], batch_size):
        hits += int(np.sum(np.asarray(fn(params, jnp.asarray(xs[i : i + batch_size]))) == target))
    return hits / int(keep.sum())


# --- composition -------------------------------------------------------------------------------


def attacked(
    make_algorithm: Callable[[Aggregator], FederatedAlgorithm],
    malicious,
    *,
    model_attack: ModelAttack | None = None,
    data_attack: DataAttack | None = None,
    aggregator: Aggregator | None = None,
) -> FederatedAlgorithm:
    """Any algorithm with some of its population turned malicious (see the module docstring).

    Args:
      make_algorithm: ``aggregator -> FederatedAlgorithm``, e.g.
        ``lambda agg: fedavg.fedavg(update, aggregator=agg)``.
      malicious: ``[population]`` bool, True for malicious clients
        (:func:`malicious_clients`); may be a traced array.
      model_attack: a :data:`ModelAttack` on the malicious updates, or None.
      data_attack: a :data:`DataAttack` on the malicious clients' data, or None.
      aggregator: the defence (default :func:`fljax.aggregators.weighted_mean`).

    Returns:
      A :class:`~fljax.base.FederatedAlgorithm` with the algorithm's state;
      its round metrics add ``num_malicious`` (the cohort's malicious clients).
      Call its ``update`` under ``jax.jit``. Bucketed cohorts (tuples) are not
      supported.
    """
    agg = aggregators.weighted_mean() if aggregator is None else aggregator
    base = make_algorithm(agg)

    def update(state, cohort: Cohort, key: jax.Array):
        if not isinstance(cohort, Cohort):
            raise ValueError(f"attacked takes one Cohort per round, got {type(cohort).__name__}")
        slots = slot_mask(cohort, malicious)
        if data_attack is not None:
            cohort = poison_cohort(cohort, slots, data_attack, jax.random.fold_in(key, DATA_ATTACK_TAG))
        if model_attack is None:
            state, metrics = base.update(state, cohort, key)
            return state, dict(metrics, num_malicious=jnp.sum(slots).astype(jnp.int32))
        return make_algorithm(poisoned_aggregator(agg, model_attack, slots)).update(state, cohort, key)

    def with_performance(performance):
        if base.with_performance is None:
            raise ValueError("the wrapped algorithm has no performance settings")
        return attacked(
            lambda a: make_algorithm(a).with_performance(performance),
            malicious,
            model_attack=model_attack,
            data_attack=data_attack,
            aggregator=aggregator,
        )

    return FederatedAlgorithm(base.init, update, with_performance)
