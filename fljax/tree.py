"""Tree maths over a leading ``[clients]`` axis.

Every function here takes pytrees whose leaves carry a leading clients axis
(unless said otherwise) and reduces or rescales along it with tree maps, so the
same code serves any model.
"""

from __future__ import annotations

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


def weighted_mean(tree: PyTree, weights: jax.Array) -> PyTree:
    """Weighted mean over the leading axis; all-zero weights give zeros."""
    total = jnp.sum(weights)
    denom = jnp.where(total > 0, total, jnp.ones_like(total))
    return jax.tree.map(lambda s: s / denom.astype(s.dtype), weighted_sum(tree, weights))


def masked_sum(tree: PyTree, mask: jax.Array) -> PyTree:
    """Sum over the leading axis of the entries where ``mask`` is True."""
    return weighted_sum(tree, mask.astype(jnp.float32))


def global_norm(tree: PyTree) -> jax.Array:
    """L2 norm of each client's whole pytree: ``[clients]``.

    Computed in float32 at least. Non-finite entries give a non-finite norm.
    """
    leaves = jax.tree.leaves(tree)
    sq = [jnp.sum(jnp.square(x.astype(jnp.float32)).reshape(x.shape[0], -1), axis=1) for x in leaves]
    return jnp.sqrt(sum(sq))


def is_finite(tree: PyTree) -> jax.Array:
    """``[clients]`` bool: True where every entry of the client's pytree is finite."""
    leaves = jax.tree.leaves(tree)
    fin = [jnp.all(jnp.isfinite(x).reshape(x.shape[0], -1), axis=1) for x in leaves]
    out = fin[0]
    for f in fin[1:]:
        out = out & f
    return out


def scale(tree: PyTree, factors: jax.Array) -> PyTree:
    """Multiply client ``i``'s pytree by ``factors[i]``."""
    return jax.tree.map(lambda x: x * _expand(factors, x), tree)


def clip(tree: PyTree, max_norm: jax.Array | float) -> tuple[PyTree, jax.Array]:
    """Clip each client's pytree to L2 norm at most ``max_norm``.

    Returns the clipped tree and each client's norm before clipping
    (``[clients]``). ``max_norm=inf`` leaves the tree unchanged.
    """
    norms = global_norm(tree)
    max_norm = jnp.asarray(max_norm, jnp.float32)
    factors = jnp.minimum(1.0, max_norm / jnp.maximum(norms, jnp.finfo(jnp.float32).tiny))
    return scale(tree, factors), norms


def zeros_like_unbatched(tree: PyTree) -> PyTree:
    """Zeros shaped like one client's slice of a batched pytree."""
    return jax.tree.map(lambda x: jnp.zeros(x.shape[1:], x.dtype), tree)
