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

import dataclasses
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, Protocol

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
      client_states: the cohort's client states, leaves ``[clients, ...]``,
        gathered on the host (:class:`fljax.data.ClientStates`); ``()`` for
        stateless client updates.
    """

    data: ClientData
    client_ids: jax.Array
    client_mask: jax.Array
    client_states: PyTree = ()


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


class StatefulClientUpdate(NamedTuple):
    """A client update with state that lives with the client across rounds.

    ``init(params) -> client_state``: one client's initial state from a params
    template (shapes and dtypes; no client axis). ``update(server_params,
    client_state, client_data, key) -> (client_state, ClientOutput)``, written
    for ONE client. ``server_params`` is whatever the algorithm broadcasts (the
    model, or e.g. SCAFFOLD's ``(model, control)``). The round gathers the
    cohort's states, maps ``update`` over the cohort and returns the new states;
    padding slots keep theirs. A stateless update is a plain :data:`ClientUpdate`.
    """

    init: Callable[[Params], PyTree]
    update: Callable[[Params, PyTree, ClientData, jax.Array], tuple[PyTree, ClientOutput]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Performance:
    """Performance settings of a round, given ONCE (``algo.with_performance(perf)``).

    None of them changes a result beyond float reassociation (tested); they
    trade memory, compile time and speed. Frozen and hashable.

    Attributes:
      chunk_size: clients per vmapped chunk (``lax.map`` over chunks): ``"auto"``
        sizes chunks from one client's per-step working set on CPU and vmaps
        the whole cohort on GPU/TPU (:func:`fljax.simulation.auto_chunk_size`);
        an int; or ``None`` (one vmap of the whole cohort).
      mesh: spread the clients over this mesh's devices
        (:func:`fljax.simulation.shard_clients`); ``None``: one device.
      unroll: ``lax.scan`` unrolling of the local steps.
      compute_dtype: ``None`` computes in the params' dtype; e.g. ``jnp.bfloat16``
        for mixed precision (params, optimizer state and deltas stay float32).
      accelerate: run the model through :func:`fljax.fast.accelerate` (conv and
        max-pool as matmuls and maxima; a no-op for models without them).
      conv_impl: ``"auto"`` (matmul form on CPU, XLA's on GPU/TPU), ``"matmul"``
        or ``"xla"``.
      conv_layout: the matmul form's layout (``"auto"``, ``"banded"``,
        ``"channels_last"``, ``"channels_first"``).
      skip_padding: with chunks, a chunk of padding slots only (``client_mask``
        False) is not computed (``lax.cond``; :func:`fljax.simulation.run_clients`),
        so a Poisson cohort padded to its Chernoff capacity costs about its sampled
        clients; every computed client's bits are unchanged. ``False`` computes
        every slot (to measure what skipping saves).
    """

    chunk_size: int | Literal["auto"] | None = "auto"
    mesh: Any = None
    unroll: int | bool = 1
    compute_dtype: Any = None
    accelerate: bool = True
    conv_impl: Literal["auto", "matmul", "xla"] = "auto"
    conv_layout: Literal["auto", "banded", "channels_last", "channels_first"] = "auto"
    skip_padding: bool = True

    def __post_init__(self):
        c = self.chunk_size
        if not (c is None or c == "auto" or (isinstance(c, int) and not isinstance(c, bool) and c > 0)):
            raise ValueError(f"chunk_size must be a positive int, None or 'auto', got {c!r}")
        if self.conv_impl not in ("auto", "matmul", "xla"):
            raise ValueError(f"conv_impl must be 'auto', 'matmul' or 'xla', got {self.conv_impl!r}")
        layouts = ("auto", "banded", "channels_last", "channels_first")
        if self.conv_layout not in layouts:
            raise ValueError(f"conv_layout must be one of {layouts}, got {self.conv_layout!r}")


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
      client_states: the last cohort's client states after its round (leaves
        ``[clients, ...]``, padding slots unchanged), for the host to scatter
        back into the population (:meth:`fljax.data.ClientStates.scatter`);
        ``()`` for stateless client updates.
    """

    params: Params
    opt_state: PyTree
    aggregator_state: PyTree
    round: jax.Array
    client_states: PyTree = ()


class FederatedAlgorithm(NamedTuple):
    """A federated algorithm as a pair of pure functions.

    ``init(params) -> state`` and ``update(state, cohort, key) -> (state, metrics)``;
    ``update`` is pure and jittable (one jitted computation per round over the
    whole cohort) and returns metrics rather than logging them. ``cohort`` is a
    :class:`Cohort`, or a tuple of them (size buckets for heavy-tailed
    populations, :mod:`fljax.data.bucketing`) where the algorithm supports it.

    ``with_performance(perf) -> FederatedAlgorithm``: the same algorithm with
    other :class:`Performance` settings (same results up to float
    reassociation); ``None`` for algorithms that have none.
    """

    init: Callable[[Params], PyTree]
    update: Callable[[PyTree, Cohort, jax.Array], tuple[PyTree, Metrics]]
    with_performance: Callable[[Performance], FederatedAlgorithm] | None = None


class ApplyFn(Protocol):
    """``apply(params, x) -> outputs`` for a batch ``x`` of ``[batch, ...]``."""

    def __call__(self, params: Params, x: PyTree) -> jax.Array: ...


def optimizer_update(optimizer, updates, opt_state, params=None):
    """``optimizer.update(updates, opt_state, params)`` under jax's standard dtype promotion.

    optax's transformations are written for the default (standard) promotion: Adam's and Yogi's
    bias correction raise a Python float to the power of an int32 count, which
    ``jax_numpy_dtype_promotion="strict"`` rejects. Every optimizer fljax applies (clients',
    servers', Mime-lite's) goes through here, so the rounds also run under strict promotion.
    """
    with jax.numpy_dtype_promotion("standard"):
        return optimizer.update(updates, opt_state, params)
