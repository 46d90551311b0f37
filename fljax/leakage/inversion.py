"""Gradient inversion: reconstruct one client's training images from the update the server sees.

The attacker is an honest-but-curious server. It knows the model, the server
parameters it broadcast and how clients train (FedSGD: one gradient of the
mean loss; FedAvg: local SGD with known learning rate, number of steps and
batch size). It observes one update (or only a noised or summed version of
it, see the threat models below) and searches for dummy images whose update
matches it::

    x* = argmin_x  D(update(x, y), observed) + tv_weight * TV(x),   lo <= x <= hi

with Adam (optionally on the sign of the gradient), a step-decay schedule and
projection onto the pixel box after every step, all inside one ``lax.scan``.
``update`` is the client's OWN update function (:func:`fljax.client.local_gradient`
or :func:`fljax.client.local_sgd`), differentiated with respect to its input
data: for FedAvg the attacker unrolls the simulated local steps
differentiably, as in Geiping et al. (section 5).

Attacks (configs :func:`dlg`, :func:`idlg`, :func:`geiping`):

* DLG (Zhu et al. 2019): squared L2 distance between updates, dummy images
  and dummy soft labels optimised jointly.
* iDLG (Zhao et al. 2020): the label of a single image is read off the
  last-layer bias gradient (the one negative entry of ``softmax - onehot``),
  then only the image is optimised. For a batch, :func:`infer_labels`
  extends this (Wainakh et al. 2022): every class with a negative bias gradient
  holds at least one image, and the rest are allotted by the estimated counts
  ``B (p_mean - g)``.
* Inverting Gradients (Geiping et al. 2020): cosine distance, total-variation
  prior, signed Adam, step decay, box constraint.

Threat models (what ``observed`` is):

* no protection: the client's update itself;
* client-level DP: :func:`clip_and_noise`, the update clipped to L2 norm ``C``
  with Gaussian noise of std ``z C`` added, i.e. DP-FedAvg's noised sum
  (:func:`fljax.privacy.dp`) for a cohort of ONE client. With ``n`` clients
  the server sees the same noise on a sum of ``n`` clipped updates, so one
  client's update is only harder to isolate; the cohort of one is the
  attacker's best case at a given ``z``;
* secure aggregation: :func:`summed`, only the sum of the cohort's updates
  (any fljax sum, e.g. :func:`fljax.secagg.secure_sum`, which reveals
  exactly this sum up to its fixed-point encoding), attacked as if it were
  the target's update.

References:
  Zhu, Liu, Han. "Deep Leakage from Gradients". NeurIPS 2019.
  Zhao, Mopuri, Bilen. "iDLG: Improved Deep Leakage from Gradients". arXiv:2001.02610, 2020.
  Geiping, Bauermeister, Dröge, Moeller. "Inverting Gradients - How easy is it
  to break privacy in federated learning?". NeurIPS 2020.
  Wainakh, Ventola, Müßig, Keim, Garcia Cordero, Zimmer, Grube, Kersting,
  Mühlhäuser. "User-Level Label Leakage from Gradients in Federated Learning". PoPETs 2022.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fljax import aggregators, losses, privacy
from fljax.base import Aggregator, ClientData, ClientUpdate, Params

UpdateFn = Callable[[jax.Array, jax.Array], Params]
"""``update(x[batch, ...], y[batch] or y[batch, classes]) -> delta``: the client's update on data ``(x, y)``."""


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy of integer labels ``[batch]`` or soft labels ``[batch, classes]``.

    With integer labels it is :func:`fljax.losses.softmax_cross_entropy`, so a
    client built with it computes exactly the usual update; soft labels (DLG's
    optimised dummy labels) need it.
    """
    if labels.ndim == logits.ndim:
        return optax.softmax_cross_entropy(logits, labels.astype(logits.dtype))
    return losses.softmax_cross_entropy(logits, labels)


@dataclasses.dataclass(frozen=True, kw_only=True)
class InversionConfig:
    """How the dummy images are optimised (frozen, hashable).

    Attributes:
      distance: ``"cosine"`` (``1 - <d, o> / (|d| |o|)`` over all parameters at
        once, Geiping et al.) or ``"l2"`` (``|d - o|^2``, DLG).
      tv_weight: weight of the total-variation prior ``mean |dx/dh| + mean |dx/dw|``.
      num_steps: optimisation steps (the attack iterations).
      learning_rate: Adam's initial learning rate.
      lr_decay: multiply the learning rate by 0.1 at 3/8, 5/8 and 7/8 of the
        steps (Geiping et al.); ``False``: constant.
      signed: feed the sign of the gradient to Adam (Geiping et al.).
      optimize_labels: optimise dummy soft labels jointly with the images
        (DLG); the client update must then accept soft labels (build it with
        ``loss_fn=`` :func:`cross_entropy`). ``False``: labels are given.
    """

    distance: Literal["cosine", "l2"] = "cosine"
    tv_weight: float = 1e-2
    num_steps: int = 1000
    learning_rate: float = 0.1
    lr_decay: bool = True
    signed: bool = True
    optimize_labels: bool = False

    def __post_init__(self):
        if self.distance not in ("cosine", "l2"):
            raise ValueError(f"distance must be 'cosine' or 'l2', got {self.distance!r}")
        if not self.tv_weight >= 0:
            raise ValueError(f"tv_weight must be >= 0, got {self.tv_weight}")
        if not (isinstance(self.num_steps, int) and self.num_steps > 0):
            raise ValueError(f"num_steps must be a positive int, got {self.num_steps!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")


def dlg(**changes) -> InversionConfig:
    """DLG (Zhu et al. 2019): L2 distance, no prior, images and soft labels optimised jointly."""
    return dataclasses.replace(
        InversionConfig(distance="l2", tv_weight=0.0, lr_decay=False, signed=False, optimize_labels=True),
        **changes,
    )


def idlg(**changes) -> InversionConfig:
    """iDLG (Zhao et al. 2020): as :func:`dlg` with the labels inferred (:func:`infer_labels`) and fixed."""
    return dlg(optimize_labels=False, **changes)


def geiping(**changes) -> InversionConfig:
    """Inverting Gradients (Geiping et al. 2020): cosine distance, TV prior, signed Adam, step decay."""
    return dataclasses.replace(InversionConfig(), **changes)


# --- the update the attacker simulates --------------------------------------------------------------


def update_function(client_update: ClientUpdate, server_params: Params, key: jax.Array) -> UpdateFn:
    """The client's update as a function of its data, ``update(x, y) -> delta``, differentiable in ``x``.

    Args:
      client_update: a client update, e.g. :func:`fljax.client.local_gradient`
        (FedSGD) or :func:`fljax.client.local_sgd` (FedAvg: the local steps are
        unrolled and differentiated through).
      server_params: the parameters the server broadcast.
      key: the client's key (its minibatch shuffling; irrelevant for
        full-batch steps). In a simulation the server derives clients' keys
        from the round key, so it knows them.

    Returns:
      ``update(x[batch, ...], y) -> delta`` with every example real (mask all true).
    """

    def update(x: jax.Array, y: jax.Array) -> Params:
        mask = jnp.ones((x.shape[0],), bool)
        return client_update(server_params, ClientData(x=x, y=y, mask=mask), key).delta

    return update


# --- threat models -------------------------------------------------------------------------------------


def clip_and_noise(delta: Params, clip_norm: float, noise_multiplier: float, key: jax.Array) -> Params:
    """What the server of DP-FedAvg sees from a cohort of one client: ``clip(delta, C) + N(0, (z C)^2 I)``.

    Runs :func:`fljax.privacy.dp` (flat clipping, uniform weighting,
    denominator 1) on the single update. Unit of privacy: one client;
    neighbouring relation: add/remove one client; sensitivity ``C``.

    Args:
      delta: one client's update.
      clip_norm: ``C`` (``inf`` with ``noise_multiplier=0``: unchanged).
      noise_multiplier: ``z``.
      key: the aggregation key (noise stream ``"noise"`` below it).

    Returns:
      The noised, clipped update.
    """
    cfg = privacy.DPConfig(
        clip_norm=clip_norm, noise_multiplier=noise_multiplier, population_size=1, cohort_size=1
    )
    agg = privacy.dp(cfg)
    deltas = jax.tree.map(lambda a: a[None], delta)
    _, out, _ = agg.aggregate(agg.init(delta), deltas, jnp.ones((1,), jnp.float32), key)
    return out


def summed(deltas: Params, key: jax.Array, sum: Aggregator | None = None) -> Params:
    """The sum of a cohort's updates (leaves ``[clients, ...]``), all weights 1: what secure aggregation reveals.

    Args:
      deltas: the cohort's updates with a leading clients axis.
      key: the aggregation key (masks and rounding of a secure sum).
      sum: any fljax sum (default :func:`fljax.aggregators.weighted_sum`; e.g.
        :func:`fljax.secagg.secure_sum`).

    Returns:
      ``sum_i delta_i``.
    """
    agg = aggregators.weighted_sum() if sum is None else sum
    sizes = {a.shape[0] for a in jax.tree.leaves(deltas)}
    if len(sizes) != 1:
        raise ValueError(f"summed: every leaf needs the same leading clients axis, got sizes {sorted(sizes)}")
    template = jax.tree.map(lambda a: a[0], deltas)
    _, total, _ = agg.aggregate(agg.init(template), deltas, jnp.ones((sizes.pop(),), jnp.float32), key)
    return total


# --- label inference --------------------------------------------------------------------------------------


def output_bias(tree: Params, num_classes: int) -> jax.Array:
    """The output layer's bias entry of a params-shaped tree (e.g. an update): the one leaf named
    ``bias`` of shape ``[num_classes]``.

    Raises:
      ValueError: if no leaf or more than one leaf matches (pass the entry yourself then).
    """
    found = [
        leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
        if path and getattr(path[-1], "key", None) == "bias" and leaf.shape == (num_classes,)
    ]
    if len(found) != 1:
        raise ValueError(
            f"expected exactly one 'bias' leaf of shape ({num_classes},), found {len(found)}; "
            "pass the output layer's bias gradient to infer_labels directly"
        )
    return found[0]


def mean_probabilities(apply_fn: Callable, params: Params, x: jax.Array) -> jax.Array:
    """``[classes]`` mean softmax of the model on inputs ``x`` (e.g. random images): the ``p_mean`` of
    :func:`infer_labels`, estimated by the attacker without the client's data."""
    return jnp.mean(jax.nn.softmax(apply_fn(params, x), axis=-1), axis=0)


def infer_labels(
    bias_gradient: jax.Array, batch_size: int, mean_probs: jax.Array | None = None
) -> np.ndarray:
    """Labels of a batch from the output bias gradient of the mean cross-entropy (host side).

    With ``p_i`` the softmax of example ``i`` and ``y_i`` its one-hot label,
    ``g = (1/B) sum_i (p_i - y_i)``. For one image only the true class is
    negative, so ``argmin g`` is its label exactly (iDLG). For ``B > 1``:
    every class with ``g_c < 0`` holds at least one example (the ``B`` most
    negative if there are more), and the remaining examples go one at a time
    to the class with the largest ``B (p_mean_c - g_c) - assigned_c``, the
    estimated count minus what it already has (Wainakh et al. 2022).

    Args:
      bias_gradient: ``[classes]`` gradient of the mean loss w.r.t. the output
        bias (from a FedAvg delta, divide by ``learning_rate * steps`` first:
        only signs and relative sizes matter).
      batch_size: ``B``.
      mean_probs: ``[classes]`` estimate of ``mean_i p_i`` (e.g.
        :func:`mean_probabilities`); default uniform ``1/classes``.

    Returns:
      ``[batch_size]`` int32 labels, sorted (a batch has no order).

    Examples:
      >>> import numpy as np
      >>> p = np.full(4, 0.25, np.float32)
      >>> infer_labels(p - np.eye(4, dtype=np.float32)[2], 1).tolist()
      [2]
    """
    g = np.asarray(bias_gradient, np.float64)
    if g.ndim != 1 or g.shape[0] < 2:
        raise ValueError(f"bias_gradient must be [classes] with classes >= 2, got shape {g.shape}")
    if not (isinstance(batch_size, int | np.integer) and batch_size >= 1):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    k = g.shape[0]
    p = np.full(k, 1.0 / k) if mean_probs is None else np.asarray(mean_probs, np.float64)
    if p.shape != g.shape:
        raise ValueError(f"mean_probs must have shape {g.shape}, got {p.shape}")
    counts = np.zeros(k, np.int64)
    negative = np.flatnonzero(g < 0)
    first = negative[np.argsort(g[negative])][:batch_size] if negative.size else np.argsort(g)[:1]
    counts[first] = 1
    estimate = batch_size * (p - g)
    for _ in range(batch_size - int(counts.sum())):
        counts[int(np.argmax(estimate - counts))] += 1
    return np.repeat(np.arange(k), counts).astype(np.int32)


# --- the attack ---------------------------------------------------------------------------------------------


class Reconstruction(NamedTuple):
    """Result of :func:`reconstruct`.

    Attributes:
      x: ``[batch, ...]`` the reconstructed inputs (inside the box).
      labels: ``[batch]`` int32: the given labels, or the argmax of the optimised soft labels.
      objective: ``[num_steps]`` the attack objective before each step.
    """

    x: jax.Array
    labels: jax.Array
    objective: jax.Array


def _distance(kind: str, dummy: Params, observed: Params) -> jax.Array:
    d = [a.ravel() for a in jax.tree.leaves(dummy)]
    o = [b.ravel() for b in jax.tree.leaves(observed)]
    if kind == "l2":
        return sum(jnp.sum((a - b) ** 2) for a, b in zip(d, o, strict=True))
    dot = sum(jnp.vdot(a, b) for a, b in zip(d, o, strict=True))
    norm_d = jnp.sqrt(sum(jnp.sum(a * a) for a in d))
    norm_o = jnp.sqrt(sum(jnp.sum(b * b) for b in o))
    return 1.0 - dot / jnp.maximum(norm_d * norm_o, 1e-30)


def total_variation(x: jax.Array) -> jax.Array:
    """Anisotropic total variation of images ``[batch, H, W, C]``: ``mean |x_{h+1} - x_h| + mean |x_{w+1} - x_w|``."""
    return jnp.mean(jnp.abs(x[:, 1:] - x[:, :-1])) + jnp.mean(jnp.abs(x[:, :, 1:] - x[:, :, :-1]))


def _schedule(config: InversionConfig) -> optax.Schedule:
    """Adam's learning rate: constant, or times 0.1 at 3/8, 5/8 and 7/8 of the steps."""
    lr = jnp.float32(config.learning_rate)
    if not config.lr_decay:
        return lambda count: lr
    n = config.num_steps
    boundaries = [int(n * f) for f in (3 / 8, 5 / 8, 7 / 8)]

    def schedule(count):
        passed = sum((count >= b).astype(jnp.float32) for b in boundaries)
        return lr * jnp.float32(0.1) ** passed

    return schedule


def reconstruct(
    update: UpdateFn,
    observed: Params,
    labels: jax.Array | None,
    x_shape: tuple[int, ...],
    bounds: tuple,
    key: jax.Array,
    *,
    config: InversionConfig,
) -> Reconstruction:
    """Invert ONE observed update: optimise dummy inputs until their update matches it.

    Written for one target (vmap it over targets with a shared ``update``).

    Args:
      update: ``update(x, y) -> delta``, e.g. :func:`update_function` of the
        client's own update.
      observed: the update the server sees (params-shaped).
      labels: ``[batch]`` int labels (inferred with :func:`infer_labels`, or
        known); ``None`` with ``config.optimize_labels``.
      x_shape: ``(batch, ...)`` shape of the client's inputs.
      bounds: ``(lo, hi)`` pixel box, scalars or arrays broadcastable to
        ``x_shape`` (e.g. per channel for standardised images).
      key: initialisation key (dummy images uniform in the box; dummy label
        logits standard normal).
      config: an :class:`InversionConfig` (:func:`dlg`, :func:`idlg`, :func:`geiping`).

    Returns:
      A :class:`Reconstruction`.

    Examples:
      A single 2x2 grey image through a linear model: its gradient reveals it.

      >>> import jax, jax.numpy as jnp
      >>> from fljax import client, models
      >>> model = models.LogisticRegression(num_classes=3)
      >>> params = models.init_params(model, (2, 2, 1), jax.random.key(0))
      >>> grad_update = client.local_gradient(model)
      >>> x = jnp.array([[[[0.2], [0.9]], [[0.5], [0.4]]]])
      >>> update = update_function(grad_update, params, jax.random.key(1))
      >>> observed = update(x, jnp.array([1]))
      >>> labels = infer_labels(output_bias(observed, 3), 1)
      >>> cfg = geiping(num_steps=300, tv_weight=0.0, learning_rate=0.05)
      >>> rec = reconstruct(update, observed, labels, x.shape, (0.0, 1.0), jax.random.key(2), config=cfg)
      >>> labels.tolist(), bool(jnp.max(jnp.abs(rec.x - x)) < 0.05)
      ([1], True)
    """
    x_shape = tuple(int(s) for s in x_shape)
    if len(x_shape) < 2 or min(x_shape) < 1:
        raise ValueError(f"x_shape must be (batch, ...) with positive sizes, got {x_shape}")
    batch = x_shape[0]
    lo, hi = (jnp.broadcast_to(jnp.asarray(b, jnp.float32), x_shape) for b in bounds)
    if config.optimize_labels:
        if labels is not None:
            raise ValueError("config.optimize_labels optimises the labels: pass labels=None")
        num_classes = int(output_bias_size(observed))
    else:
        if labels is None:
            raise ValueError(
                "labels are required unless config.optimize_labels (infer them with infer_labels)"
            )
        labels = jnp.asarray(labels, jnp.int32)
        if labels.shape != (batch,):
            raise ValueError(f"labels must be [batch]={batch}, got shape {labels.shape}")
    x_key, y_key = jax.random.split(key)
    variables = {"x": lo + (hi - lo) * jax.random.uniform(x_key, x_shape, jnp.float32)}
    if config.optimize_labels:
        variables["y"] = jax.random.normal(y_key, (batch, num_classes), jnp.float32)

    def objective(v):
        y = jax.nn.softmax(v["y"], axis=-1) if config.optimize_labels else labels
        value = _distance(config.distance, update(v["x"], y), observed)
        if config.tv_weight:
            value = value + config.tv_weight * total_variation(v["x"])
        return value

    optimizer = optax.adam(_schedule(config))
    value_and_grad = jax.value_and_grad(objective)

    def step(carry, _):
        v, opt_state = carry
        value, grad = value_and_grad(v)
        if config.signed:
            grad = jax.tree.map(jnp.sign, grad)
        updates, opt_state = optimizer.update(grad, opt_state, v)
        v = optax.apply_updates(v, updates)
        v = dict(v, x=jnp.clip(v["x"], lo, hi))
        return (v, opt_state), value

    # optax's Adam raises a python float to an int32 count (bias correction): allow it here.
    with jax.numpy_dtype_promotion("standard"):
        (variables, _), history = jax.lax.scan(
            step, (variables, optimizer.init(variables)), None, length=config.num_steps
        )
    out_labels = jnp.argmax(variables["y"], axis=-1).astype(jnp.int32) if config.optimize_labels else labels
    return Reconstruction(x=variables["x"], labels=out_labels, objective=history)


def output_bias_size(observed: Params) -> int:
    """Number of classes: the size of the last 1-D leaf named ``bias`` of an update (DLG's soft labels)."""
    sizes = [
        leaf.shape[0]
        for path, leaf in jax.tree_util.tree_flatten_with_path(observed)[0]
        if path and getattr(path[-1], "key", None) == "bias" and leaf.ndim == 1
    ]
    if not sizes:
        raise ValueError("the update has no 'bias' leaf to read the number of classes from")
    return sizes[-1]
