"""Overlap gathering the next cohort with the current round.

The population stays once in host memory; each round only its cohort is
gathered (numpy fancy indexing) and copied to the device. :func:`prefetch`
runs ``make(r + 1)`` (gather + ``jax.device_put``, which is asynchronous) in a
background thread while the caller computes round ``r``.

Examples:
  >>> import jax, numpy as np
  >>> from fljax import random
  >>> from fljax.data import FederatedData, prefetch, sampling
  >>> clients = [(np.ones((n, 2), np.float32), np.zeros(n, np.int32)) for n in (1, 2, 3)]
  >>> data = FederatedData.from_clients(clients)
  >>> run_key = random.run_key(seed=0)
  >>> def make(r):  # gathers round r's cohort on the host
  ...     key = random.stream(random.round_key(run_key, r), "sample")
  ...     ids, mask = sampling.uniform(key, data.num_clients, 2)
  ...     return data.cohort(ids, client_mask=mask)
  >>> for r, cohort in enumerate(prefetch.prefetch(make, range(3))):
  ...     # state, metrics = step(state, cohort, random.round_key(run_key, r))
  ...     print(r, cohort.data.x.shape, isinstance(cohort.data.x, jax.Array))
  0 (2, 3, 2) True
  1 (2, 3, 2) True
  2 (2, 3, 2) True
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import jax

T = TypeVar("T")


def prefetch(make: Callable[[int], T], rounds: Iterable[int], *, device_put: bool = True) -> Iterator[T]:
    """Yield ``make(r)`` for each ``r`` in ``rounds``, building the next one in a thread.

    Args:
      make: builds one round's input on the host (e.g. gathers a cohort).
      rounds: round indices, in order.
      device_put: start the host-to-device copy in the thread too.

    Yields:
      ``make(r)`` (as device arrays when ``device_put``), one round ahead.
    """

    def build(r):
        out = make(r)
        return jax.device_put(out) if device_put else out

    it = iter(rounds)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        try:
            pending = pool.submit(build, next(it))
        except StopIteration:
            return
        for r in it:
            current = pending.result()
            pending = pool.submit(build, r)
            yield current
        yield pending.result()
