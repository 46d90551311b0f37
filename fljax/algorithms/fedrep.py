"""FedPer and FedRep: a shared body, a personal head per client.

The model is split into a BODY (the representation, e.g. every layer but the last), shared and
aggregated, and a HEAD (e.g. the last layer), which each client keeps as client state
(:class:`fljax.data.ClientStates`) and never sends. The split is given once, as ``head``: a
predicate on a parameter's path (a tuple of strings, e.g. ``("params", "Dense_1", "kernel")``;
:func:`layers` builds one from layer names) or an optax-style mask, a pytree of bools shaped
like the params, ``True`` on the head.

Each round a cohort client puts its own head on the server's body and trains locally:

* FedPer (Arivazhagan et al. 2019): body and head together, ``num_epochs`` epochs.
* FedRep (Collins et al. 2021): first the head alone for ``head_epochs`` epochs (body frozen),
  then the body alone for ``num_epochs`` epochs (head frozen). With the body fixed the head
  problem is small and, for a linear head, convex: the paper trains it for many epochs (10)
  and the body for 1.

The client keeps its new head and sends ``body_server - body_local``; the head's entries of its
delta are exactly zero, and the server also zeroes the head's entries of the aggregate, so
that the server's head never moves, even when an aggregator adds noise (DP). The server's head
is only the starting head of every client (``init``). A client's model is the server's body
with its own head: :func:`personal_models` assembles them for
:func:`fljax.personalization.personalized_evaluate`.

References:
  Arivazhagan, Aggarwal, Singh, Choudhary. "Federated Learning with Personalization Layers".
  arXiv:1912.00818, 2019.

  Collins, Hassani, Mokhtari, Shakkottai. "Exploiting Shared Representations for Personalized
  Federated Learning". ICML 2021.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import optax

from fljax import aggregators, client, losses, simulation
from fljax import random as fl_random
from fljax.base import (
    Aggregator,
    ClientData,
    ClientOutput,
    FederatedAlgorithm,
    Params,
    Performance,
    PyTree,
    StatefulClientUpdate,
)

Head = Callable[[tuple[str, ...]], bool] | PyTree
"""A predicate on a parameter's path (tuple of strings), or a bool pytree shaped like the params."""


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def head_mask(head: Head, params: Params) -> PyTree:
    """The bool pytree (shaped like ``params``, Python bools) that is ``True`` on the head.

    Args:
      head: a predicate on each parameter's path, or a bool pytree shaped like ``params``.
      params: the model's params (or any pytree with their structure, e.g. a delta).

    Returns:
      A pytree of Python bools with ``params``'s structure.

    Raises:
      ValueError: a mask whose structure is not ``params``'s, or non-bool entries.

    Examples:
      >>> import jax.numpy as jnp
      >>> params = {"params": {"Dense_0": {"kernel": jnp.ones((2, 3))}, "Dense_1": {"kernel": jnp.ones((3, 1))}}}
      >>> head_mask(layers("Dense_1"), params)
      {'params': {'Dense_0': {'kernel': False}, 'Dense_1': {'kernel': True}}}
    """
    if callable(head):
        leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
        flags = [bool(head(tuple(_key_name(k) for k in path))) for path, _ in leaves]
        return jax.tree.unflatten(treedef, flags)
    treedef = jax.tree.structure(params)
    if jax.tree.structure(head) != treedef:
        raise ValueError(
            f"head mask must have the params' structure {treedef}, got {jax.tree.structure(head)}"
        )
    flags = jax.tree.leaves(head)
    if not all(isinstance(f, bool) for f in flags):
        raise ValueError(f"head mask entries must be Python bools, got {[type(f).__name__ for f in flags]}")
    return head


def layers(*names: str) -> Callable[[tuple[str, ...]], bool]:
    """A ``head`` predicate: the parameters of the layers (path components) called ``names``.

    Examples:
      >>> is_head = layers("Dense_1")
      >>> is_head(("params", "Dense_1", "kernel")), is_head(("params", "Dense_0", "bias"))
      (True, False)
    """
    if not names:
        raise ValueError("layers needs at least one layer name")
    wanted = frozenset(names)
    return lambda path: bool(wanted.intersection(path))


def _flags(head: Head, params: Params) -> list[bool]:
    flags = jax.tree.leaves(head_mask(head, params))
    if not any(flags):
        raise ValueError("head selects no parameter: every client would share the whole model")
    if all(flags):
        raise ValueError("head selects every parameter: nothing would be shared")
    return flags


def split(head: Head, params: Params) -> tuple[PyTree, ...]:
    """The head's leaves of ``params``, in tree order (a client's state)."""
    return tuple(x for x, f in zip(jax.tree.leaves(params), _flags(head, params), strict=True) if f)


def merge(head: Head, params: Params, head_leaves) -> Params:
    """``params`` with its head leaves replaced by ``head_leaves`` (from :func:`split`)."""
    leaves, treedef = jax.tree.flatten(params)
    it = iter(head_leaves)
    out = [next(it) if f else x for x, f in zip(leaves, _flags(head, params), strict=True)]
    return jax.tree.unflatten(treedef, out)


def zero_head(head: Head, tree: Params) -> Params:
    """``tree`` (shaped like the params) with the head's entries set to zero."""
    leaves, treedef = jax.tree.flatten(tree)
    out = [jnp.zeros_like(x) if f else x for x, f in zip(leaves, _flags(head, tree), strict=True)]
    return jax.tree.unflatten(treedef, out)


def personal_models(head: Head, params: Params, client_heads) -> Params:
    """Each client's model: the server's body with the client's own head, ``[clients, ...]``.

    Args:
      head: the split.
      params: the server's params (its body is shared).
      client_heads: the clients' heads, leaves ``[clients, ...]`` (e.g. ``ClientStates.tree``).

    Returns:
      ``params``'s pytree with a leading ``[clients]`` axis on every leaf.
    """
    heads = jax.tree.leaves(client_heads)
    if not heads:
        raise ValueError("client_heads holds no arrays")
    n = heads[0].shape[0]
    body = jax.tree.map(lambda a: jnp.broadcast_to(a, (n,) + jnp.shape(a)), params)
    return merge(head, body, heads)


def fedrep_client(
    model,
    optimizer: optax.GradientTransformation,
    *,
    head: Head,
    batch_size: int,
    num_epochs: int = 1,
    variant: Literal["fedrep", "fedper"] = "fedrep",
    head_epochs: int = 1,
    head_optimizer: optax.GradientTransformation | None = None,
    loss_fn: losses.LossFn = losses.softmax_cross_entropy,
    weighting: Literal["num_examples", "uniform"] = "num_examples",
    max_steps: int | None = None,
) -> StatefulClientUpdate:
    """The client of FedRep (head, then body) or FedPer (both together); its state is its head.

    Frozen parameters are frozen in the optimizer (``optax.multi_transform`` with
    ``optax.set_to_zero``), so no optimizer (weight decay included) moves them.

    Args:
      model: a flax module or an ``apply(params, x)`` callable.
      optimizer: the local optimizer (FedRep: of the body phase).
      head: the personal part (see the module docstring).
      batch_size: minibatch size.
      num_epochs: FedPer: local epochs; FedRep: epochs of the body phase.
      variant: ``"fedrep"`` or ``"fedper"``.
      head_epochs: FedRep: epochs of the head phase, first (ignored by FedPer).
      head_optimizer: FedRep: the head phase's optimizer (default ``optimizer``).
      loss_fn: ``loss_fn(outputs, labels) -> per-example losses``.
      weighting: ``"num_examples"`` or ``"uniform"`` (as :func:`fljax.client.local_sgd`).
      max_steps: optional cap on minibatches per epoch.

    Returns:
      A :class:`~fljax.base.StatefulClientUpdate` whose state is the tuple of the head's leaves
      (the initial model's head at first); ``delta = server - local`` with zero head entries.

    Raises:
      ValueError: an unknown ``variant``, ``head_epochs < 1`` or a bad local training option.
    """
    if variant not in ("fedrep", "fedper"):
        raise ValueError(f"variant must be 'fedrep' or 'fedper', got {variant!r}")
    if isinstance(head_epochs, bool) or not isinstance(head_epochs, int) or head_epochs < 1:
        raise ValueError(f"head_epochs must be a positive integer, got {head_epochs!r}")
    client.local_sgd(
        model,
        optimizer,
        batch_size=batch_size,
        num_epochs=num_epochs,
        weighting=weighting,
        max_steps=max_steps,
    )  # validates the options
    head_opt = optimizer if head_optimizer is None else head_optimizer

    def only(opt, train_head: bool, params):
        labels = jax.tree.map(lambda f: "train" if f == train_head else "freeze", head_mask(head, params))
        return optax.multi_transform({"train": opt, "freeze": optax.set_to_zero()}, labels)

    def build(performance: Performance):
        grad_fn = client.masked_mean_gradient(client.fast_apply(model, performance), loss_fn)
        train = lambda opt, params, data, key, epochs: client.train_locally(
            grad_fn,
            opt,
            params,
            data,
            key,
            batch_size=batch_size,
            num_epochs=epochs,
            max_steps=max_steps,
            unroll=performance.unroll,
        )

        def update(server_params: Params, own_head, data: ClientData, key: jax.Array):
            params = merge(head, server_params, own_head)
            metrics = {}
            if variant == "fedrep":
                head_key = fl_random.stream(key, "clients")
                params, head_loss, _ = train(
                    only(head_opt, True, params), params, data, head_key, head_epochs
                )
                params, loss, _ = train(only(optimizer, False, params), params, data, key, num_epochs)
                metrics["head_train_loss"] = head_loss
            else:
                params, loss, _ = train(optimizer, params, data, key, num_epochs)
            delta = zero_head(head, jax.tree.map(jnp.subtract, server_params, params))
            n = jnp.sum(data.mask.astype(jnp.float32))
            metrics |= {"train_loss": loss, "num_examples": n}
            return split(head, params), ClientOutput(delta, client.client_weight(n, weighting), metrics)

        return update

    return StatefulClientUpdate(lambda params: split(head, params), client.Configurable(build))


def fedrep(
    client_update: StatefulClientUpdate,
    *,
    head: Head,
    server_learning_rate: float = 1.0,
    aggregator: Aggregator | None = None,
) -> FederatedAlgorithm:
    """FedRep / FedPer over clients built by :func:`fedrep_client`: only the body is aggregated.

    Args:
      client_update: :func:`fedrep_client` (either variant).
      head: the personal part, as given to the client; the server zeroes its entries of the
        aggregate, so the server's head stays the initial one.
      server_learning_rate: server step size on the averaged body delta.
      aggregator: combines the deltas; default the example-weighted mean.

    Returns:
      ``FederatedAlgorithm`` with state :class:`~fljax.base.ServerState`, whose
      ``client_states`` after a round hold the cohort's new heads (padding slots unchanged)
      for :meth:`fljax.data.ClientStates.scatter`.

    Raises:
      TypeError: a stateless client update.

    Examples:
      FedRep on a two-layer MLP, the last layer personal:

      >>> import jax, numpy as np, optax
      >>> from fljax import models
      >>> from fljax.algorithms import fedrep
      >>> from fljax.data import ClientStates, FederatedData
      >>> rng = np.random.default_rng(0)
      >>> clients = [
      ...     (rng.normal(size=(n, 4)).astype(np.float32), rng.integers(0, 3, n).astype(np.int32))
      ...     for n in (6, 9, 4)
      ... ]
      >>> data = FederatedData.from_clients(clients, num_classes=3)
      >>> model = models.MLP(hidden=(8,), num_classes=3)
      >>> params = models.init_params(model, (4,), jax.random.key(0))
      >>> head = fedrep.layers("Dense_1")
      >>> update = fedrep.fedrep_client(model, optax.sgd(0.1), head=head, batch_size=3, head_epochs=2)
      >>> heads = ClientStates(update.init(params), data.num_clients)
      >>> algo = fedrep.fedrep(update, head=head)
      >>> state, step = algo.init(params), jax.jit(algo.update)
      >>> for r in range(2):
      ...     cohort = heads.attach(data.cohort([0, 1, 2]))
      ...     state, metrics = step(state, cohort, jax.random.key(r))
      ...     state = heads.scatter(cohort, state)
      >>> bool(np.all(state.params["params"]["Dense_1"]["kernel"] == params["params"]["Dense_1"]["kernel"]))
      True
      >>> [leaf.shape for leaf in jax.tree.leaves(fedrep.personal_models(head, state.params, heads.tree))]
      [(3, 8), (3, 4, 8), (3, 3), (3, 8, 3)]
    """
    return _fedrep(client_update, head, server_learning_rate, aggregator, Performance())


def _fedrep(client_update, head, server_learning_rate, aggregator, perf) -> FederatedAlgorithm:
    if not isinstance(client_update, StatefulClientUpdate):
        raise TypeError("fedrep needs a stateful client update: fedrep_client(...)")
    if not server_learning_rate > 0:
        raise ValueError(f"server_learning_rate must be positive, got {server_learning_rate!r}")
    inner = aggregator if aggregator is not None else aggregators.weighted_mean()

    def aggregate(state, deltas, weights, key):
        state, delta, metrics = inner.aggregate(state, deltas, weights, key)
        return state, zero_head(head, delta), metrics

    algo = simulation.averaging_algorithm(
        client_update,
        optax.sgd(server_learning_rate),
        aggregator=Aggregator(inner.init, aggregate),
        performance=perf,
    )

    def with_performance(performance: Performance) -> FederatedAlgorithm:
        return _fedrep(client_update, head, server_learning_rate, aggregator, performance)

    return algo._replace(with_performance=with_performance)
