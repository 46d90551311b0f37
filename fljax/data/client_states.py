"""Per-client state of a population, held on the host.

SCAFFOLD's control variates, Ditto's personal models, FedDyn's gradients and
error-feedback residuals live with each client across rounds. fljax keeps them
on the host with the population (numpy, ``[num_clients, ...]`` per leaf), so
10,000 clients with LeNet-sized state (62k floats: 2.5 GB) never sit on the
device. Each round::

    cohort = states.attach(data.cohort(ids, client_mask=mask))   # gather the cohort's states
    state, metrics = step(state, cohort, key)                   # they flow through the jitted round
    state = states.scatter(cohort, state)                       # write back; clears state.client_states

Padding slots and masked-out clients never write; clients not sampled keep
their state unchanged. :attr:`ClientStates.tree` is a pytree to checkpoint
with the server state (:mod:`fljax.checkpoint`), and :meth:`ClientStates.load`
puts it back.
"""

from __future__ import annotations

import jax
import numpy as np

from fljax.base import Cohort, PyTree


class ClientStates:
    """Every client's state, ``[num_clients, ...]`` numpy arrays per leaf.

    Args:
      template: ONE client's initial state (e.g. ``client_update.init(params)``
        of a :class:`~fljax.base.StatefulClientUpdate`); every client starts from it.
      num_clients: the population size.

    Examples:
      SCAFFOLD's control variates for a population of five clients:

      >>> import jax, numpy as np
      >>> from fljax import models
      >>> from fljax.algorithms import scaffold
      >>> from fljax.data import ClientStates, FederatedData
      >>> data = FederatedData.from_clients([(np.ones((2, 3), np.float32), np.zeros(2, np.int32))] * 5)
      >>> model = models.LogisticRegression(num_classes=2)
      >>> params = models.init_params(model, (3,), jax.random.key(0))
      >>> update = scaffold.scaffold_client(model, 0.1, batch_size=2)
      >>> states = ClientStates(update.init(params), data.num_clients)
      >>> [leaf.shape for leaf in jax.tree.leaves(states.tree)]  # [num_clients, ...] per leaf
      [(5, 2), (5, 3, 2)]
      >>> cohort = states.attach(data.cohort([3, 1, -1]))  # -1: a padding slot
      >>> [leaf.shape for leaf in jax.tree.leaves(cohort.client_states)]
      [(3, 2), (3, 3, 2)]
    """

    def __init__(self, template: PyTree, num_clients: int):
        if num_clients <= 0:
            raise ValueError(f"num_clients must be positive, got {num_clients}")
        leaves, self._treedef = jax.tree.flatten(template)
        if not leaves:
            raise ValueError(
                "the client state template has no arrays; a stateless update needs no ClientStates"
            )
        self._template = [np.asarray(x) for x in leaves]
        self._leaves = []
        for x in self._template:
            full = np.empty((num_clients,) + x.shape, x.dtype)
            full[...] = x
            self._leaves.append(full)
        self.num_clients = num_clients

    @property
    def nbytes(self) -> int:
        """Host bytes held."""
        return sum(x.nbytes for x in self._leaves)

    @property
    def tree(self) -> PyTree:
        """All clients' states as one pytree of ``[num_clients, ...]`` arrays (to checkpoint)."""
        return jax.tree.unflatten(self._treedef, self._leaves)

    def load(self, tree: PyTree) -> None:
        """Replace every client's state by ``tree`` (e.g. restored from a checkpoint)."""
        leaves = jax.tree.leaves(tree)
        if len(leaves) != len(self._leaves):
            raise ValueError(f"expected {len(self._leaves)} state arrays, got {len(leaves)}")
        for i, (old, new) in enumerate(zip(self._leaves, leaves, strict=True)):
            if old.shape != np.shape(new):
                raise ValueError(f"state leaf {i}: expected shape {old.shape}, got {np.shape(new)}")
            old[...] = np.asarray(new, old.dtype)

    def _ids(self, client_ids) -> np.ndarray:
        ids = np.asarray(client_ids, np.int64)
        if ids.ndim != 1:
            raise ValueError(f"client_ids must be 1-D, got shape {ids.shape}")
        if np.any(ids >= self.num_clients) or np.any(ids < -1):
            raise ValueError(f"client ids must lie in [-1, {self.num_clients}), got {ids.min()}..{ids.max()}")
        return ids

    def gather(self, client_ids) -> PyTree:
        """The states of ``client_ids`` (``-1``: a padding slot, given the template): ``[cohort, ...]``."""
        ids = self._ids(client_ids)
        out = []
        for full, tmpl in zip(self._leaves, self._template, strict=True):
            g = full[np.maximum(ids, 0)]
            g[ids < 0] = tmpl
            out.append(g)
        return jax.tree.unflatten(self._treedef, out)

    def attach(self, cohort: Cohort) -> Cohort:
        """``cohort`` with its clients' states gathered into ``cohort.client_states``."""
        return cohort._replace(client_states=self.gather(cohort.client_ids))

    def scatter(self, cohort: Cohort, state):
        """Write the round's new client states back; returns ``state`` without them.

        Args:
          cohort: the cohort the round ran on (its ids and ``client_mask`` say
            which slots may write: padding and masked-out slots never do).
          state: the algorithm state returned by the round, whose
            ``client_states`` holds the cohort's new states (``[cohort, ...]``).

        Returns:
          ``state`` with ``client_states=()``, so the next round's input has the
          same structure as the first (no recompilation).
        """
        new = jax.tree.leaves(jax.device_get(state.client_states))
        if len(new) != len(self._leaves):
            raise ValueError(f"expected {len(self._leaves)} client state arrays, got {len(new)}")
        ids = self._ids(cohort.client_ids)
        write = (ids >= 0) & np.asarray(cohort.client_mask, bool)
        rows = ids[write]
        if len(np.unique(rows)) != len(rows):
            raise ValueError("a client appears twice in the cohort; its state update would be ambiguous")
        for full, x in zip(self._leaves, new, strict=True):
            if x.shape != (len(ids),) + full.shape[1:]:
                raise ValueError(
                    f"client state of shape {x.shape} does not match [{len(ids)}] + {full.shape[1:]}"
                )
            full[rows] = np.asarray(x)[write]
        return state._replace(client_states=())
