"""Private quantiles from one DP hierarchical histogram (a tree of branching factor ``b``).

Choice: a hierarchical histogram rather than a private binary search. The tree is
ONE release (one round, one Gaussian event) from which every quantile (median,
quartiles, deciles...) is read by post-processing, at no extra privacy cost; a
binary search needs ``log2(range / resolution)`` sequential rounds PER quantile,
each spending budget, and its interaction is awkward in federated rounds.

The range ``[lo, hi]`` (public) is split into ``b**D`` equal leaves; level
``l = 1..D`` has ``b**l`` nodes. Each record (value clipped to ``[lo, hi]``, NaN
skipped) adds 1 to the one node containing it at every level, so a client with
at most ``k`` records contributes at most ``k`` per node and ``k`` per level:
L2 bound (sensitivity) ``k sqrt(D)``, Linf ``k``, L1 ``k D``; the whole tree,
``sum_l b**l`` counts, is released by :func:`fljax.analytics.release.release`
with noise std ``sigma = z k sqrt(D)`` on every node. Unit of privacy: one
client; neighbouring relation: add/remove one client. No consistency step: the
estimate walks the noisy tree top-down, clamping negative counts at 0.

:func:`estimate` reads quantile ``q``: ``N`` is the sum of the level-1 counts and
the target rank ``t = max(q N, tiny)``; at each level it moves to the first child
of the current node whose cumulative count reaches the remaining target, and in
the final leaf it interpolates linearly.

Error. Without noise the leaf found contains the ``ceil(q N)``-th smallest
clipped value (the inverted-CDF quantile, ``np.quantile(..., method=
"inverted_cdf")``), so the estimate is within one leaf width ``(hi - lo) / b**D``
of it. With noise, the rank used at each level sums at most ``b - 1`` noisy
sibling counts, so the rank error has std at most ``sigma sqrt(D (b - 1) + b q^2)``
(``D`` levels plus the noise of ``N``); the value error is about that rank error
divided by the data density at the quantile (records per unit), plus one leaf
width. Values outside ``[lo, hi]`` are clipped to it, so a quantile outside the
range is reported at the range's end.

References:
  Hay, Rastogi, Miklau, Suciu. "Boosting the Accuracy of Differentially Private
  Histograms Through Consistency". VLDB 2010.
  Cormode, Kulkarni, Srivastava. "Answering Range Queries Under Local
  Differential Privacy". VLDB 2019 (tree fan-out and error).

Examples:
  The median and quartiles of 0..99 (one record per client), without noise:

  >>> import jax, jax.numpy as jnp, numpy as np
  >>> from fljax.analytics import quantiles, queries
  >>> values = jnp.arange(100.0)[:, None]
  >>> tree = quantiles.tree(0.0, 128.0, branching=4, depth=4)  # leaves of width 0.5
  >>> cfg = tree.query.config(noise_multiplier=0.0, population_size=100)
  >>> levels, _ = queries.run(tree.query, cfg, values, jnp.ones((100, 1), bool), jnp.ones(100, bool),
  ...                         jax.random.key(0))
  >>> est = quantiles.estimate(levels, [0.25, 0.5, 0.75], tree)
  >>> truth = np.quantile(np.arange(100.0), [0.25, 0.5, 0.75], method="inverted_cdf")
  >>> bool(np.all(np.abs(est - truth) <= tree.leaf_width))
  True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fljax.analytics import queries


class Tree(NamedTuple):
    """A hierarchical-histogram query and its geometry.

    Attributes:
      query: the :class:`~fljax.analytics.queries.Query`; its result is a list
        of ``D`` arrays, level ``l`` holding ``b**l`` released counts.
      lo: range start. hi: range end. branching: ``b``. depth: ``D``.
    """

    query: queries.Query
    lo: float
    hi: float
    branching: int
    depth: int

    @property
    def leaf_width(self) -> float:
        """``(hi - lo) / b**D``: the resolution, and the noise-free error bound."""
        return (self.hi - self.lo) / self.branching**self.depth


def tree(lo: float, hi: float, *, branching: int = 4, depth: int = 5, max_contributions: int = 1) -> Tree:
    """The hierarchical histogram over ``[lo, hi]`` with ``branching**depth`` leaves.

    Args:
      lo: public range start. hi: public range end.
      branching: ``b >= 2``. depth: ``D >= 1``.
      max_contributions: ``k``, records per client used (its first ``k`` observed).

    Returns:
      A :class:`Tree`; release ``tree.query`` with :func:`fljax.analytics.queries.run`.
    """
    if not (isinstance(branching, int) and branching >= 2):
        raise ValueError(f"branching must be an int >= 2, got {branching!r}")
    if not (isinstance(depth, int) and depth >= 1):
        raise ValueError(f"depth must be an int >= 1, got {depth!r}")
    if branching**depth > 2**20:
        raise ValueError(f"branching**depth = {branching**depth} leaves is too many (max 2**20)")
    k = queries._check_k(max_contributions)
    lo, hi = queries._check_range(lo, hi)
    leaves = branching**depth
    sizes = [branching**level for level in range(1, depth + 1)]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)

    def contribution(values, mask):
        keep = queries.first_k(jnp.asarray(mask, jnp.bool_) & ~jnp.isnan(values), k)
        pos = (jnp.clip(jnp.where(keep, values, lo), lo, hi) - lo) / (hi - lo) * leaves
        leaf = jnp.clip(jnp.floor(pos), 0, leaves - 1).astype(jnp.int32)
        counts = jnp.zeros(int(offsets[-1]), jnp.float32)
        w = keep.astype(jnp.float32)
        for level in range(1, depth + 1):
            node = leaf // (branching ** (depth - level))
            counts = counts.at[int(offsets[level - 1]) + node].add(w)
        return counts

    def finalize(v):
        return [np.asarray(v[offsets[i] : offsets[i + 1]], np.float64) for i in range(depth)]

    query = queries.Query(
        f"tree[{lo:g}, {hi:g}](b={branching}, D={depth}, k={k})",
        contribution,
        k * math.sqrt(depth),
        float(k),
        float(k * depth),
        finalize,
    )
    return Tree(query, lo, hi, branching, depth)


def estimate(levels: Sequence[np.ndarray], qs: Sequence[float] | float, tree: Tree) -> np.ndarray:
    """Quantiles ``qs`` (in ``[0, 1]``) read from a released tree (post-processing, no privacy cost).

    Args:
      levels: the released tree (``tree.query``'s result).
      qs: one quantile or a sequence of them.
      tree: the :class:`Tree` that was released.

    Returns:
      ``[len(qs)]`` float64 estimates (a scalar array for a scalar ``qs``).
    """
    q_arr = np.asarray(qs, np.float64)
    if np.any((q_arr < 0) | (q_arr > 1)) or not np.all(np.isfinite(q_arr)):
        raise ValueError(f"quantiles must be in [0, 1], got {qs!r}")
    b, depth = tree.branching, tree.depth
    if len(levels) != depth or any(np.shape(lv) != (b ** (i + 1),) for i, lv in enumerate(levels)):
        raise ValueError(f"levels do not match the tree (b={b}, D={depth})")
    clamped = [np.maximum(np.asarray(lv, np.float64), 0.0) for lv in levels]
    total = float(np.sum(clamped[0]))
    out = []
    for q in np.atleast_1d(q_arr):
        target = max(q * total, 1e-9)
        node = 0
        for level in range(depth):
            children = clamped[level][node * b : (node + 1) * b]
            cum = np.cumsum(children)
            j = int(np.searchsorted(cum, target, side="left"))
            j = min(j, b - 1)
            target -= float(cum[j - 1]) if j > 0 else 0.0
            node = node * b + j
            if level == depth - 1:
                frac = 1.0 if children[j] <= 0 else min(max(target / children[j], 0.0), 1.0)
        width = tree.leaf_width
        out.append(tree.lo + (node + frac) * width)
    result = np.asarray(out)
    return result if q_arr.ndim else result[0]


def release_quantiles(
    tree: Tree,
    qs: Sequence[float],
    values: jax.Array,
    mask: jax.Array,
    client_mask: jax.Array,
    key: jax.Array,
    *,
    noise_multiplier: float,
    population_size: int,
    sum=None,  # noqa: A002
) -> tuple[np.ndarray, dict]:
    """Release ``tree`` over a population and read the quantiles ``qs`` from it.

    One release of noise multiplier ``noise_multiplier`` (account it with
    ``tree.query.config(...).dp_event()``); see :func:`fljax.analytics.queries.run`.

    Returns:
      ``(estimates [len(qs)], metrics)``.
    """
    config = tree.query.config(noise_multiplier=noise_multiplier, population_size=population_size)
    levels, metrics = queries.run(tree.query, config, values, mask, client_mask, key, sum=sum)
    return estimate(levels, qs, tree), metrics
