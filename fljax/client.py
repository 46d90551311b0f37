"""Single-client update builders.

Everything here is written for ONE client (no clients axis in the code); the
simulation vmaps it over the cohort. A client update has the signature

    client_update(server_params, client_data, key) -> ClientOutput(delta, weight, metrics)

with ``delta = server_params - local_params``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import optax

from fljax import fast, losses
from fljax.base import ApplyFn, ClientData, ClientOutput, ClientUpdate, Params

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
    unroll: int | bool = 1,
    accelerate: bool = True,
    compute_dtype: jnp.dtype | None = None,
) -> ClientUpdate:
    """Local training for ``num_epochs`` epochs of minibatch optimisation.

    Each epoch reshuffles the client's examples with its own key. The optimizer
    starts from a fresh state every round. A minibatch made only of padding
    leaves parameters AND optimizer state untouched, so padding never causes
    momentum or weight-decay drift.

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
        per-example clipped and noised gradient (``fljax.privacy``).
      proximal_mu: FedProx's proximal term ``mu/2 ||w - w_server||^2``; 0 is FedAvg.
      unroll: performance setting: ``lax.scan`` unrolling of the local steps
        (same result up to float reassociation).
      accelerate: performance setting: run the model through
        :func:`fljax.fast.accelerate` (convolutions as banded or im2col matmuls and
        non-overlapping max-pools as maxima on CPU; a no-op for models without
        them and on GPU/TPU unless ``fljax.nn.set_impl("matmul")``). Same values
        and gradients up to float reassociation. Ignored when ``gradient`` is given.
      compute_dtype: performance setting: ``None`` computes in the params' dtype;
        e.g. ``jnp.bfloat16`` casts params and floating inputs to it for the
        forward and backward pass (mixed precision; params, optimizer state and
        deltas stay float32). ``jnp.float32`` changes nothing.

    Returns:
      ``client_update(server_params, data, key) -> ClientOutput``; metrics are
      ``train_loss`` (mean minibatch loss over real steps) and ``num_examples``.

    Examples:
      >>> update = local_sgd(models.LeNet(), optax.sgd(0.01, momentum=0.9), batch_size=32)
      >>> out = update(params, client_data, key)
    """
    if batch_size <= 0 or num_epochs <= 0:
        raise ValueError(f"batch_size and num_epochs must be positive, got {batch_size}, {num_epochs}")
    if weighting not in ("num_examples", "uniform"):
        raise ValueError(f"weighting must be 'num_examples' or 'uniform', got {weighting!r}")
    apply_fn = as_apply(model)
    if accelerate:
        apply_fn = fast.accelerate(apply_fn)
    if compute_dtype is not None:
        apply_fn = fast.with_compute_dtype(apply_fn, compute_dtype)
    grad_fn = gradient if gradient is not None else masked_mean_gradient(apply_fn, loss_fn)

    def client_update(server_params: Params, data: ClientData, key: jax.Array) -> ClientOutput:
        if data.mask.ndim != 1:
            raise ValueError(
                f"client_update works on ONE client: mask must be [num_examples], got shape {data.mask.shape}"
            )

        # Keys are derived with fold_in from scanned indices rather than scanned
        # as split key arrays: same independence, and it keeps jax's key-reuse
        # checker exact under vmap.
        def epoch(carry, epoch_index):
            epoch_key = jax.random.fold_in(key, epoch_index)
            params, opt_state, loss_sum, step_count = carry
            shuffle_key, step_key = jax.random.split(epoch_key)
            batches = make_batches(data, batch_size, shuffle_key)
            if max_steps is not None:
                batches = jax.tree.map(lambda a: a[:max_steps], batches)
            steps = batches.mask.shape[0]
            step_indices = jnp.arange(steps, dtype=jnp.uint32)

            def step(carry, inputs):
                params, opt_state, loss_sum, step_count = carry
                x, y, mask, step_index = inputs
                k = jax.random.fold_in(step_key, step_index)
                grad, loss = grad_fn(params, x, y, mask, k)
                if proximal_mu:
                    grad = jax.tree.map(
                        lambda g, p, s: g + proximal_mu * (p - s), grad, params, server_params
                    )
                updates, new_opt_state = optimizer.update(grad, opt_state, params)
                new_params = optax.apply_updates(params, updates)
                real = jnp.any(mask)
                keep = lambda new, old: jnp.where(real, new, old)
                params = jax.tree.map(keep, new_params, params)
                opt_state = jax.tree.map(keep, new_opt_state, opt_state)
                loss_sum = loss_sum + jnp.where(real, loss, 0.0)
                step_count = step_count + real.astype(jnp.float32)
                return (params, opt_state, loss_sum, step_count), None

            carry, _ = jax.lax.scan(
                step,
                (params, opt_state, loss_sum, step_count),
                (batches.x, batches.y, batches.mask, step_indices),
                unroll=unroll,
            )
            return carry, None

        init = (
            server_params,
            optimizer.init(server_params),
            jnp.zeros((), jnp.float32),
            jnp.zeros((), jnp.float32),
        )
        (params, _, loss_sum, step_count), _ = jax.lax.scan(
            epoch, init, jnp.arange(num_epochs, dtype=jnp.uint32)
        )
        n = jnp.sum(data.mask.astype(jnp.float32))
        if weighting == "num_examples":
            weight = n
        else:
            weight = (n > 0).astype(jnp.float32)
        delta = jax.tree.map(lambda s, p: s - p, server_params, params)
        metrics = {"train_loss": loss_sum / jnp.maximum(step_count, 1.0), "num_examples": n}
        return ClientOutput(delta=delta, weight=weight, metrics=metrics)

    return client_update


def local_gradient(
    model,
    *,
    loss_fn: losses.LossFn = losses.softmax_cross_entropy,
    weighting: Literal["num_examples", "uniform"] = "num_examples",
) -> ClientUpdate:
    """FedSGD's client: the gradient of the mean loss over ALL the client's data.

    ``delta`` is the gradient itself (one full-batch step of SGD with learning
    rate 1), so a server SGD with learning rate ``lr`` takes one centralised
    gradient step when all clients hold equal data.
    """
    apply_fn = as_apply(model)
    grad_fn = masked_mean_gradient(apply_fn, loss_fn)

    def client_update(server_params: Params, data: ClientData, key: jax.Array) -> ClientOutput:
        grad, loss = grad_fn(server_params, data.x, data.y, data.mask, key)
        n = jnp.sum(data.mask.astype(jnp.float32))
        weight = n if weighting == "num_examples" else (n > 0).astype(jnp.float32)
        return ClientOutput(delta=grad, weight=weight, metrics={"train_loss": loss, "num_examples": n})

    return client_update
