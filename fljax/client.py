"""Single-client update builders.

Everything here is written for ONE client (no clients axis in the code); the
simulation vmaps it over the cohort. A client update has the signature

    client_update(server_params, client_data, key) -> ClientOutput(delta, weight, metrics)

with ``delta = server_params - local_params``; a stateful one is a
:class:`~fljax.base.StatefulClientUpdate`. Builders here return
:class:`Configurable` updates: the round gives them its
:class:`~fljax.base.Performance` settings once, so paper files never repeat them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import optax

from fljax import fast, losses
from fljax.base import ApplyFn, ClientData, ClientOutput, ClientUpdate, Params, Performance, optimizer_update

# gradient(params, x[batch, ...], y[batch], mask[batch], key) -> (grad, loss)
GradientFn = Callable[[Params, jax.Array, jax.Array, jax.Array, jax.Array], tuple[Params, jax.Array]]


def as_apply(model) -> ApplyFn:
    """``apply(params, x)`` from a flax module, or a callable returned as is."""
    apply = getattr(model, "apply", None)
    if apply is not None and callable(apply):
        return apply
    if callable(model):
        return model
    raise TypeError(f"expected a flax module or an apply(params, x) callable, got {type(model).__name__}")


def num_steps(num_examples: int, batch_size: int, max_steps: int | None = None) -> int:
    """Minibatches per epoch for ``num_examples`` padded examples (last one partial)."""
    steps = -(-num_examples // batch_size)
    return steps if max_steps is None else min(steps, max_steps)


def make_batches(data: ClientData, batch_size: int, key: jax.Array) -> ClientData:
    """Shuffle one client's examples and cut them into minibatches.

    Real examples come first in a uniformly random order, padding after them,
    so a client with ``n`` real examples gets ``ceil(n / batch_size)`` real
    minibatches (the last one partial) followed by padding minibatches.

    Args:
      data: one client's :class:`ClientData`, leaves ``[num_examples, ...]``.
      batch_size: minibatch size.
      key: shuffling key.

    Returns:
      :class:`ClientData` with leaves ``[num_steps, batch_size, ...]`` where
      ``num_steps = ceil(num_examples / batch_size)``.
    """
    n = data.mask.shape[0]
    steps = num_steps(n, batch_size)
    total = steps * batch_size
    u = jax.random.uniform(key, (n,), jnp.float32)
    order = jnp.argsort(jnp.where(data.mask, u, 2.0 + u))
    if total > n:
        order = jnp.concatenate([order, jnp.full((total - n,), n, order.dtype)])

    def gather(a):
        a = jnp.concatenate([a, jnp.zeros((1,) + a.shape[1:], a.dtype)], axis=0)
        return a[order].reshape((steps, batch_size) + a.shape[1:])

    mask = jnp.concatenate([data.mask, jnp.zeros((1,), data.mask.dtype)])[order]
    return ClientData(
        x=jax.tree.map(gather, data.x),
        y=gather(data.y),
        mask=mask.reshape(steps, batch_size),
    )


def masked_mean_gradient(
    apply_fn: ApplyFn, loss_fn: losses.LossFn = losses.softmax_cross_entropy
) -> GradientFn:
    """Gradient of the mean loss over the real examples of a minibatch."""

    def objective(params, x, y, mask):
        per_example = loss_fn(apply_fn(params, x), y)
        m = mask.astype(per_example.dtype)
        return jnp.sum(per_example * m) / jnp.maximum(jnp.sum(m), 1.0)

    grad_fn = jax.value_and_grad(objective)

    def gradient(params, x, y, mask, key):
        del key
        loss, grad = grad_fn(params, x, y, mask)
        return grad, loss

    return gradient


class Configurable:
    """A client update built from :class:`~fljax.base.Performance` settings.

    Calls like the function ``build(performance)`` returns; ``with_performance``
    rebuilds it with other settings (the round calls it, see
    :func:`fljax.simulation.apply_performance`).
    """

    def __init__(self, build: Callable[[Performance], Callable], performance: Performance | None = None):
        self.performance = performance if performance is not None else Performance()
        self._build = build
        self._fn = build(self.performance)

    def __call__(self, *args, **kwargs):
        return self._fn(*args, **kwargs)

    def with_performance(self, performance: Performance) -> Configurable:
        return Configurable(self._build, performance)


def fast_apply(model, performance: Performance) -> ApplyFn:
    """``apply(params, x)`` of ``model`` under the performance settings (fast path, compute dtype)."""
    apply_fn = as_apply(model)
    if performance.accelerate:
        apply_fn = fast.accelerate(apply_fn, impl=performance.conv_impl, layout=performance.conv_layout)
    if performance.compute_dtype is not None:
        apply_fn = fast.with_compute_dtype(apply_fn, performance.compute_dtype)
    return apply_fn


def client_weight(num_examples: jax.Array, weighting: str) -> jax.Array:
    """A client's aggregation weight: its number of examples, or 1 if it has any (``"uniform"``)."""
    return num_examples if weighting == "num_examples" else (num_examples > 0).astype(jnp.float32)


def _check_options(batch_size: int, num_epochs: int, weighting: str, max_steps: int | None) -> None:
    if batch_size <= 0 or num_epochs <= 0:
        raise ValueError(f"batch_size and num_epochs must be positive, got {batch_size}, {num_epochs}")
    if weighting not in ("num_examples", "uniform"):
        raise ValueError(f"weighting must be 'num_examples' or 'uniform', got {weighting!r}")
    if max_steps is not None and max_steps <= 0:
        raise ValueError(f"max_steps must be positive or None, got {max_steps}")


def train_locally(
    grad_fn: GradientFn,
    optimizer: optax.GradientTransformation,
    params: Params,
    data: ClientData,
    key: jax.Array,
    *,
    batch_size: int,
    num_epochs: int,
    max_steps: int | None = None,
    unroll: int | bool = 1,
    correct: Callable[[Params, Params], Params] | None = None,
    step_budget: jax.Array | None = None,
) -> tuple[Params, jax.Array, jax.Array]:
    """Minibatch optimisation of ONE client's ``params`` on its ``data``.

    Each epoch reshuffles the examples with its own key; the optimizer starts
    from a fresh state. A minibatch made only of padding leaves parameters AND
    optimizer state untouched. ``correct(grad, params) -> grad`` adjusts each
    minibatch gradient (FedProx's proximal term, SCAFFOLD's control variates).
    ``step_budget`` (a traced integer scalar, e.g. from
    :func:`fljax.heterogeneity.work_budget`) caps the real steps over all
    epochs: the steps after the first ``step_budget`` are masked exactly like
    padding minibatches (a straggler stopped by a deadline).

    Returns:
      ``(params, mean_loss, num_steps)``: the local model, the mean minibatch
      loss over real steps and the number of real steps taken (float32).
    """
    if data.mask.ndim != 1:
        raise ValueError(
            f"client_update works on ONE client: mask must be [num_examples], got shape {data.mask.shape}"
        )

    # Keys are derived with fold_in from scanned indices rather than scanned as
    # split key arrays: same independence, and it keeps jax's key-reuse checker
    # exact under vmap.
    def epoch(carry, epoch_index):
        epoch_key = jax.random.fold_in(key, epoch_index)
        shuffle_key, step_key = jax.random.split(epoch_key)
        batches = make_batches(data, batch_size, shuffle_key)
        if max_steps is not None:
            batches = jax.tree.map(lambda a: a[:max_steps], batches)
        step_indices = jnp.arange(batches.mask.shape[0], dtype=jnp.uint32)

        def step(carry, inputs):
            params, opt_state, loss_sum, step_count = carry
            x, y, mask, step_index = inputs
            grad, loss = grad_fn(params, x, y, mask, jax.random.fold_in(step_key, step_index))
            if correct is not None:
                grad = correct(grad, params)
            updates, new_opt_state = optimizer_update(optimizer, grad, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            real = jnp.any(mask)
            if step_budget is not None:
                real = real & (step_count < jnp.asarray(step_budget).astype(jnp.float32))
            keep = lambda new, old: jnp.where(real, new, old)
            params = jax.tree.map(keep, new_params, params)
            opt_state = jax.tree.map(keep, new_opt_state, opt_state)
            loss_sum = loss_sum + jnp.where(real, loss, 0.0)
            step_count = step_count + real.astype(jnp.float32)
            return (params, opt_state, loss_sum, step_count), None

        carry, _ = jax.lax.scan(
            step, carry, (batches.x, batches.y, batches.mask, step_indices), unroll=unroll
        )
        return carry, None

    zero = jnp.zeros((), jnp.float32)
    init = (params, optimizer.init(params), zero, zero)
    (params, _, loss_sum, step_count), _ = jax.lax.scan(epoch, init, jnp.arange(num_epochs, dtype=jnp.uint32))
    return params, loss_sum / jnp.maximum(step_count, 1.0), step_count


def local_sgd(
    model,
    optimizer: optax.GradientTransformation,
    *,
    batch_size: int,
    num_epochs: int = 1,
    loss_fn: losses.LossFn = losses.softmax_cross_entropy,
    weighting: Literal["num_examples", "uniform"] = "num_examples",
    max_steps: int | None = None,
    gradient: GradientFn | None = None,
    proximal_mu: float = 0.0,
) -> Configurable:
    """Local training for ``num_epochs`` epochs of minibatch optimisation (:func:`train_locally`).

    Args:
      model: a flax module or an ``apply(params, x) -> outputs`` callable.
      optimizer: any optax optimizer (client side).
      batch_size: minibatch size.
      num_epochs: local epochs.
      loss_fn: ``loss_fn(outputs, labels) -> per-example losses``.
      weighting: ``"num_examples"`` (FedAvg) or ``"uniform"`` (1 per client with data).
      max_steps: optional cap on minibatches per epoch (as TFF and FedJAX do for
        heavy-tailed clients: a client with more data than the cap contributes
        only its first ``max_steps`` shuffled minibatches).
      gradient: optional replacement for the minibatch gradient, e.g. DP-SGD's
        per-example clipped and noised gradient (``fljax.privacy``); the
        performance settings then apply only to the scan.
      proximal_mu: FedProx's proximal term ``mu/2 ||w - w_server||^2``; 0 is FedAvg.

    Returns:
      A :class:`Configurable` ``client_update(server_params, data, key) ->
      ClientOutput``; metrics are ``train_loss`` (mean minibatch loss over real
      steps), ``num_examples`` and ``num_steps`` (real local steps taken). It also takes an optional traced
      ``step_budget`` keyword (see :func:`train_locally`), which
      :func:`fljax.heterogeneity.with_deadline` passes. The round's :class:`~fljax.base.Performance`
      decides the fast conv path, compute dtype and scan unrolling.

    Examples:
      One client with five examples and one padding example:

      >>> import jax, numpy as np, optax
      >>> from fljax import client, models
      >>> from fljax.base import ClientData
      >>> model = models.MLP(hidden=(8,), num_classes=3)
      >>> params = models.init_params(model, (4,), jax.random.key(0))
      >>> rng = np.random.default_rng(0)
      >>> client_data = ClientData(
      ...     x=rng.normal(size=(6, 4)).astype(np.float32),
      ...     y=rng.integers(0, 3, 6).astype(np.int32),
      ...     mask=np.array([True] * 5 + [False]),
      ... )
      >>> update = client.local_sgd(model, optax.sgd(0.1, momentum=0.9), batch_size=3)
      >>> out = update(params, client_data, jax.random.key(1))
      >>> float(out.weight), float(out.metrics["num_examples"])
      (5.0, 5.0)
      >>> jax.tree.map(np.shape, out.delta) == jax.tree.map(np.shape, params)
      True
    """
    _check_options(batch_size, num_epochs, weighting, max_steps)
    if proximal_mu < 0:
        raise ValueError(f"proximal_mu must be >= 0, got {proximal_mu}")

    def build(performance: Performance) -> ClientUpdate:
        grad_fn = (
            gradient
            if gradient is not None
            else masked_mean_gradient(fast_apply(model, performance), loss_fn)
        )

        def client_update(
            server_params: Params, data: ClientData, key: jax.Array, step_budget: jax.Array | None = None
        ) -> ClientOutput:
            correct = None
            if proximal_mu:
                correct = lambda g, p: jax.tree.map(
                    lambda gi, pi, si: gi + proximal_mu * (pi - si), g, p, server_params
                )
            params, loss, steps = train_locally(
                grad_fn,
                optimizer,
                server_params,
                data,
                key,
                batch_size=batch_size,
                num_epochs=num_epochs,
                max_steps=max_steps,
                unroll=performance.unroll,
                correct=correct,
                step_budget=step_budget,
            )
            n = jnp.sum(data.mask.astype(jnp.float32))
            delta = jax.tree.map(lambda s, p: s - p, server_params, params)
            metrics = {"train_loss": loss, "num_examples": n, "num_steps": steps}
            return ClientOutput(delta, client_weight(n, weighting), metrics)

        return client_update

    return Configurable(build)


def local_gradient(
    model,
    *,
    loss_fn: losses.LossFn = losses.softmax_cross_entropy,
    weighting: Literal["num_examples", "uniform"] = "num_examples",
) -> Configurable:
    """FedSGD's client: the gradient of the mean loss over ALL the client's data.

    ``delta`` is the gradient itself (one full-batch step of SGD with learning
    rate 1), so a server SGD with learning rate ``lr`` takes one centralised
    gradient step when all clients hold equal data.
    """
    _check_options(1, 1, weighting, None)

    def build(performance: Performance) -> ClientUpdate:
        grad_fn = masked_mean_gradient(fast_apply(model, performance), loss_fn)

        def client_update(server_params: Params, data: ClientData, key: jax.Array) -> ClientOutput:
            grad, loss = grad_fn(server_params, data.x, data.y, data.mask, key)
            n = jnp.sum(data.mask.astype(jnp.float32))
            return ClientOutput(grad, client_weight(n, weighting), {"train_loss": loss, "num_examples": n})

        return client_update

    return Configurable(build)
