"""Types and protocols shared by every fljax component.

This module holds no logic: only the shapes that client updates, aggregators,
algorithms and the simulation agree on. Everything here is a pytree
(NamedTuple), so it passes through ``jax.jit``, ``jax.vmap`` and ``lax.scan``.

Conventions (see STYLE.md):

* fljax-owned stateful functions are ``(state, inputs..., key) -> (state, outputs)``.
* ``delta`` is always ``server_params - local_params`` (a pseudo-gradient).
* Padding clients have weight 0 and contribute exactly zero.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax

PyTree = Any
Params = PyTree
Metrics = dict[str, jax.Array]


class ClientData(NamedTuple):
    """The examples one client holds, padded to a fixed length.

    Written for ONE client; a cohort stacks a leading ``[clients]`` axis on
    every field (see :class:`Cohort`).

    Attributes:
      x: inputs, ``[num_examples, ...]`` (any pytree of arrays with that leading axis).
      y: labels, ``[num_examples, ...]``.
      mask: ``[num_examples]`` bool; ``False`` marks a padding example, which
        changes nothing (no loss, no gradient, no optimizer step if a whole
        minibatch is padding).
    """

    x: PyTree
    y: jax.Array
    mask: jax.Array


class Cohort(NamedTuple):
    """One round's cohort: client data with a leading ``[clients]`` axis.

    Attributes:
      data: :class:`ClientData` whose leaves are ``[clients, num_examples, ...]``.
      client_ids: ``[clients]`` int32 population index of each slot, ``-1`` for
        a padding slot. Per-client keys are derived from the id, so a client's
        randomness does not depend on its slot in the cohort.
      client_mask: ``[clients]`` bool; ``False`` marks a padding slot, whose
        weight is forced to 0.
    """

    data: ClientData
    client_ids: jax.Array
    client_mask: jax.Array


class ClientOutput(NamedTuple):
    """What one client sends back.

    Attributes:
      delta: ``server_params - local_params`` (pytree shaped like the params).
      weight: scalar float32 aggregation weight (e.g. number of examples, or 1).
        A client without data has weight 0.
      metrics: dict of scalar float32 metrics (e.g. ``train_loss``).
    """

    delta: Params
    weight: jax.Array
    metrics: Metrics


ClientUpdate = Callable[[Params, ClientData, jax.Array], ClientOutput]
"""``client_update(server_params, client_data, key) -> ClientOutput``, one client."""


class Aggregator(NamedTuple):
    """A pair of pure functions that combine the cohort's deltas into one.

    ``init(params) -> state``: ``params`` is a template (shapes and dtypes of
    the model); the state is a NamedTuple pytree (``()`` when stateless).

    ``aggregate(state, deltas, weights, key) -> (state, delta, metrics)``:
    ``deltas`` has a leading ``[clients]`` axis on every leaf, ``weights`` is
    ``[clients]`` float32 (0 for padding slots, which must contribute exactly
    zero). ``metrics`` is a dict of scalars returned out of jit (e.g. how many
    clients were rejected for non-finite updates, or were clipped).

    The third output is a deliberate extension of the ``(state, delta)`` pair:
    wrappers (DP, robustness, secure aggregation) must report what they did to
    clients, and jitted code can only report by returning.

    DP, secure aggregation, compression and robustness are wrappers: functions
    that take an ``Aggregator`` (and a config) and return an ``Aggregator``.
    """

    init: Callable[[Params], PyTree]
    aggregate: Callable[[PyTree, Params, jax.Array, jax.Array], tuple[PyTree, Params, Metrics]]


class ServerState(NamedTuple):
    """Server state of the averaging family of algorithms.

    Attributes:
      params: the global model.
      opt_state: the server optimizer's (optax) state.
      aggregator_state: the aggregator's state.
      round: int32 scalar, rounds completed so far.
    """

    params: Params
    opt_state: PyTree
    aggregator_state: PyTree
    round: jax.Array


class FederatedAlgorithm(NamedTuple):
    """A federated algorithm as a pair of pure functions.

    ``init(params) -> state`` and ``update(state, cohort, key) -> (state, metrics)``;
    ``update`` is pure and jittable (one jitted computation per round over the
    whole cohort) and returns metrics rather than logging them.
    """

    init: Callable[[Params], PyTree]
    update: Callable[[PyTree, Cohort, jax.Array], tuple[PyTree, Metrics]]


class ApplyFn(Protocol):
    """``apply(params, x) -> outputs`` for a batch ``x`` of ``[batch, ...]``."""

    def __call__(self, params: Params, x: PyTree) -> jax.Array: ...
