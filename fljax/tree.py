"""Tree maths over a leading ``[clients]`` axis.

Every function here takes pytrees whose leaves carry a leading clients axis
(unless said otherwise) and reduces or rescales along it with tree maps, so the
same code serves any model.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fljax.base import PyTree


def _expand(w: jax.Array, leaf: jax.Array) -> jax.Array:
    """Reshape ``w[clients]`` to broadcast against ``leaf[clients, ...]``."""
    return w.reshape(w.shape + (1,) * (leaf.ndim - 1)).astype(leaf.dtype)


def weighted_sum(tree: PyTree, weights: jax.Array) -> PyTree:
    """``sum_i weights[i] * tree[i]`` over the leading axis.

    Uses ``where(weight == 0, 0, ...)`` so a zero-weight client contributes
    exactly zero even if its values are inf or NaN.
    """

    def leaf_sum(x):
        w = _expand(weights, x)
        return jnp.sum(jnp.where(w == 0, jnp.zeros((), x.dtype), w * x), axis=0)

    return jax.tree.map(leaf_sum, tree)


def _squared_norms(tree: PyTree) -> list[jax.Array]:
    """Per-leaf squared L2 norms of each client, float32 at least: one ``[clients]`` per leaf."""
    return [
        jnp.sum(jnp.square(x.astype(jnp.float32)).reshape(x.shape[0], -1), axis=1)
        for x in jax.tree.leaves(tree)
    ]


def global_norm(tree: PyTree) -> jax.Array:
    """L2 norm of each client's whole pytree: ``[clients]``.

    Computed in float32 at least. Non-finite entries give a non-finite norm.
    """
    return jnp.sqrt(sum(_squared_norms(tree)))


def is_finite(tree: PyTree) -> jax.Array:
    """``[clients]`` bool: True where every entry of the client's pytree is finite."""
    leaves = jax.tree.leaves(tree)
    fin = [jnp.all(jnp.isfinite(x).reshape(x.shape[0], -1), axis=1) for x in leaves]
    out = fin[0]
    for f in fin[1:]:
        out = out & f
    return out


def scale(tree: PyTree, factors: PyTree) -> PyTree:
    """Multiply client ``i``'s pytree by its factor.

    Args:
      tree: leaves ``[clients, ...]``.
      factors: one ``[clients]`` array (the same factor for every leaf), or a
        pytree shaped like ``tree`` whose leaves are ``[clients]`` (one factor
        per client and leaf, as :func:`clip_factors` returns with
        ``per_leaf=True``).
    """
    if jax.tree_util.treedef_is_leaf(jax.tree.structure(factors)):
        return jax.tree.map(lambda x: x * _expand(factors, x), tree)
    return jax.tree.map(lambda x, f: x * _expand(f, x), tree, factors)


def clip_factors(
    tree: PyTree, max_norm: jax.Array | float, *, per_leaf: bool = False
) -> tuple[PyTree, jax.Array]:
    """Factors that clip each client's pytree to L2 norm at most ``max_norm``, and the norms.

    ``per_leaf=False``: client ``i`` gets ``min(1, C / ||x_i||)`` (one
    global-norm pass). ``per_leaf=True``: leaf ``l`` of client ``i`` gets
    ``min(1, C_l / ||x_i^l||)`` with ``C_l = C / sqrt(L)`` for ``L`` leaves, an
    equal split of the budget, so the whole update still has norm at most ``C``.
    A client (or leaf) is clipped iff its factor is below 1; ``max_norm=inf``
    gives factors 1. Norms are floored at the smallest normal float32, so a zero
    update gets factor 1; a non-finite update gets a non-finite norm and factor.

    Returns:
      ``(factors, norms)``: ``factors`` is ``[clients]`` float32, or with
      ``per_leaf=True`` a pytree shaped like ``tree`` of ``[clients]`` float32
      (both are accepted by :func:`scale`); ``norms`` are the whole-update norms
      before clipping, ``[clients]`` float32.
    """
    sq = _squared_norms(tree)
    norms = jnp.sqrt(sum(sq))
    c = jnp.asarray(max_norm, jnp.float32)
    tiny = jnp.finfo(jnp.float32).tiny
    if not per_leaf:
        return jnp.minimum(1.0, c / jnp.maximum(norms, tiny)), norms
    c_leaf = c / jnp.float32(math.sqrt(len(sq)))
    factors = [jnp.minimum(1.0, c_leaf / jnp.maximum(jnp.sqrt(s), tiny)) for s in sq]
    return jax.tree.unflatten(jax.tree.structure(tree), factors), norms


def clip(
    tree: PyTree, max_norm: jax.Array | float, *, per_leaf: bool = False
) -> tuple[PyTree, PyTree, jax.Array]:
    """Clip each client's pytree to L2 norm at most ``max_norm`` (see :func:`clip_factors`).

    Returns:
      ``(clipped, factors, norms)``: the clipped tree, the factors applied and
      each client's whole-update norm before clipping (``[clients]``).
    """
    factors, norms = clip_factors(tree, max_norm, per_leaf=per_leaf)
    return scale(tree, factors), factors, norms
