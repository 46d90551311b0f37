"""The fast path: rewrite a model's slow-on-CPU operations, without touching the model.

:func:`accelerate` takes any ``apply(params, x)`` (a flax module's ``apply``,
or plain JAX) and returns a function with the same values and gradients whose
convolutions are im2col + matmul and whose non-overlapping max-pools are
pairwise maxima (:mod:`fljax.nn`). It works on the traced program (the
jaxpr), so it sees ``flax.linen.Conv``, ``flax.linen.max_pool``,
``lax.conv_general_dilated`` and ``lax.reduce_window`` alike, including inside
``jax.jit``-wrapped helpers, ``lax.scan``, ``lax.cond`` and ``lax.while_loop``
bodies. Operations inside ``custom_jvp``/``custom_vjp`` functions and
``jax.checkpoint`` are left as they are.

Why: vmapped over a cohort (every client holds its own weights), a convolution
becomes a grouped convolution, which XLA:CPU runs far below its matmul speed,
and the gradient of ``reduce_window`` max is a slow ``select_and_scatter``. The
rewritten forms vmap into batched matmuls and elementwise selects.

The client updates of :mod:`fljax.client` apply :func:`accelerate` to the
model by default, with the round's :class:`fljax.base.Performance`
(``accelerate``, ``conv_impl``, ``conv_layout``): ``impl="auto"`` rewrites on
CPU only (GPU/TPU keep XLA's operations), ``impl="xla"`` not at all. A program
without convolutions or max-pools, or one already written with
:mod:`fljax.nn`'s fast layers (the reference models in :mod:`fljax.models`),
runs unchanged, so MLPs are not affected.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from fljax.nn import layers

_CALLS = ("pjit", "jit", "closed_call", "core_call")  # inlined
_CONTROL = ("scan", "cond", "while")  # body jaxprs rewritten in place


def _conv_supported(eqn) -> bool:
    p = eqn.params
    lhs, rhs = (v.aval for v in eqn.invars)
    return layers.supports_conv(
        lhs.shape,
        rhs.shape,
        p["window_strides"],
        p["padding"],
        p["lhs_dilation"],
        p["rhs_dilation"],
        p["dimension_numbers"],
        p["feature_group_count"],
        p["batch_group_count"],
    )


def _pool_supported(eqn) -> bool:
    p = eqn.params
    return (
        tuple(p["window_dimensions"]) == tuple(p["window_strides"])
        and all(lo == 0 and hi == 0 for lo, hi in p["padding"])
        and all(d == 1 for d in p["base_dilation"])
        and all(d == 1 for d in p["window_dilation"])
    )


def _is_target(eqn) -> bool:
    name = eqn.primitive.name
    if name == "conv_general_dilated":
        return _conv_supported(eqn)
    if name == "reduce_window_max":
        return _pool_supported(eqn)
    return False


def _sub_closed(params) -> list[tuple[str, int | None, Any]]:
    """ClosedJaxprs among ``params``: (key, index in a tuple or None, jaxpr)."""
    found = []
    for k, v in params.items():
        if isinstance(v, jcore.ClosedJaxpr):
            found.append((k, None, v))
        elif isinstance(v, tuple) and v and all(isinstance(b, jcore.ClosedJaxpr) for b in v):
            found.extend((k, i, b) for i, b in enumerate(v))
    return found


def sub_jaxprs(params) -> list:
    """The jaxprs nested in an equation's ``params`` (bodies of ``jit``, ``scan``,
    ``cond``, ``while``, ...)."""
    return [c.jaxpr for _, _, c in _sub_closed(params)]


def _has_target(jaxpr) -> bool:
    for eqn in jaxpr.eqns:
        if _is_target(eqn):
            return True
        if eqn.primitive.name in _CALLS + _CONTROL:
            if any(_has_target(c.jaxpr) for _, _, c in _sub_closed(eqn.params)):
                return True
    return False


def _rewrite_closed(closed, layout: str):
    if not _has_target(closed.jaxpr):
        return closed
    avals = [v.aval for v in closed.jaxpr.invars]
    return jax.make_jaxpr(lambda *a: _eval(closed.jaxpr, closed.consts, *a, layout=layout))(*avals)


def _eval(jaxpr, consts, *args, layout: str, grad_in=None):
    """Evaluate ``jaxpr`` with the fast forms substituted. ``grad_in[i]``: whether
    ``jaxpr.invars[i]`` may be differentiated (default: all), followed through the
    program so that a convolution of data alone can be told apart (a performance
    hint only, see :func:`fljax.nn.conv_general_dilated`'s ``input_grad``).
    ``layout``: the convolutions' layout (:func:`fljax.nn.conv_general_dilated`)."""
    env: dict = {}
    grad_vars: set = set()

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    def has_grad(v):
        return not isinstance(v, jcore.Literal) and v in grad_vars

    env.update(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    grad_in = [True] * len(jaxpr.invars) if grad_in is None else grad_in
    grad_vars.update(v for v, g in zip(jaxpr.invars, grad_in, strict=True) if g)
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        in_grad = [has_grad(v) for v in eqn.invars]
        if any(in_grad):
            grad_vars.update(eqn.outvars)
        name = eqn.primitive.name
        p = eqn.params
        if name == "conv_general_dilated" and _conv_supported(eqn):
            outvals = [
                layers.conv_general_dilated(
                    *invals,
                    p["window_strides"],
                    p["padding"],
                    p["lhs_dilation"],
                    p["rhs_dilation"],
                    p["dimension_numbers"],
                    p["feature_group_count"],
                    p["batch_group_count"],
                    p["precision"],
                    p["preferred_element_type"],
                    impl="matmul",
                    layout=layout,
                    input_grad=in_grad[0],
                )
            ]
        elif name == "reduce_window_max" and _pool_supported(eqn):
            outvals = [layers.window_max(invals[0], p["window_dimensions"])]
        elif (
            name in _CALLS
            and "jaxpr" in p
            and isinstance(p["jaxpr"], jcore.ClosedJaxpr)
            and _has_target(p["jaxpr"].jaxpr)
        ):
            outvals = _eval(p["jaxpr"].jaxpr, p["jaxpr"].consts, *invals, layout=layout, grad_in=in_grad)
        else:
            if name in _CONTROL:
                subs = _sub_closed(p)
                if any(_has_target(c.jaxpr) for _, _, c in subs):
                    p = dict(p)
                    for k, i, c in subs:
                        if i is None:
                            p[k] = _rewrite_closed(c, layout)
                        else:
                            p[k] = tuple(
                                _rewrite_closed(b, layout) if j == i else b for j, b in enumerate(p[k])
                            )
            bind_params = eqn.primitive.get_bind_params(p)
            subfuns: tuple = ()
            if isinstance(bind_params, tuple):  # older JAX: (subfuns, params)
                subfuns, bind_params = bind_params
            ctx = getattr(getattr(eqn, "ctx", None), "manager", None)
            if ctx is None:
                outvals = eqn.primitive.bind(*subfuns, *invals, **bind_params)
            else:
                with ctx:
                    outvals = eqn.primitive.bind(*subfuns, *invals, **bind_params)
            if not eqn.primitive.multiple_results:
                outvals = [outvals]
        env.update(zip(eqn.outvars, outvals, strict=True))
    return [read(v) for v in jaxpr.outvars]


def accelerate(
    fn: Callable,
    *,
    impl: layers.Impl = "auto",
    layout: layers.Layout = "auto",
    argnums: int | Sequence[int] | None = 0,
) -> Callable:
    """``fn`` with its convolutions and non-overlapping max-pools in fast form.

    Args:
      fn: any function of arrays (pytrees), typically ``apply(params, x)``.
      impl: ``"auto"`` (rewrite on CPU only, the backend being read when the
        returned function is traced), ``"matmul"`` (always rewrite) or ``"xla"``
        (call ``fn`` unchanged).
      layout: the rewritten convolutions' layout: ``"auto"``, ``"banded"``,
        ``"channels_last"`` or ``"channels_first"`` (see
        :func:`fljax.nn.conv_general_dilated`).
      argnums: the positional arguments that gradients are usually taken with
        respect to (default ``0``, the params of ``apply(params, x)``; ``None``:
        all). A performance hint only: a convolution whose input depends on none
        of them (a first layer on data) needs no input gradient, and the banded
        form then uses narrower tiles. Gradients with respect to any argument
        stay exact.

    Returns:
      A function with ``fn``'s signature, values and gradients (up to float
      reassociation). It calls ``fn`` directly when there is nothing to rewrite
      (e.g. a model whose layers are already :mod:`fljax.nn`'s matmul forms).

    Raises:
      ValueError: for an unknown ``impl`` or ``layout`` (when ``accelerate`` is called).

    Examples:
      A plain flax convolution, vmapped over three clients' weights:

      >>> import jax, jax.numpy as jnp
      >>> from flax import linen
      >>> from fljax import fast
      >>> flax_model = linen.Conv(4, (3, 3), padding="VALID")
      >>> x = jnp.ones((2, 6, 6, 1))
      >>> keys = jax.random.split(jax.random.key(0), 3)
      >>> cohort_params = jax.vmap(flax_model.init, in_axes=(0, None))(keys, x)
      >>> apply = fast.accelerate(flax_model.apply, impl="matmul", layout="channels_last")
      >>> out = jax.jit(jax.vmap(apply, in_axes=(0, None)))(cohort_params, x)
      >>> out.shape
      (3, 2, 4, 4, 4)
      >>> ref = jax.jit(jax.vmap(flax_model.apply, in_axes=(0, None)))(cohort_params, x)
      >>> bool(jnp.allclose(out, ref, atol=1e-5))
      True
    """

    layers.check_impl(impl)
    layers.check_layout(layout)

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        if not layers.use_matmul(impl):
            return fn(*args, **kwargs)
        leaves, in_tree = jax.tree.flatten((args, kwargs))
        dynamic = [i for i, x in enumerate(leaves) if isinstance(x, (jax.Array, np.ndarray, np.generic))]
        flat = [leaves[i] for i in dynamic]
        if argnums is None:
            grad_leaf = [True] * len(leaves)
        else:
            nums = {argnums} if isinstance(argnums, int) else set(argnums)
            grad_leaf = []
            for i, a in enumerate(args):
                grad_leaf += [i in nums] * len(jax.tree.leaves(a))
            grad_leaf += [False] * (len(leaves) - len(grad_leaf))  # keyword arguments
        grad_in = [grad_leaf[i] for i in dynamic]

        def flat_fn(*values):
            full = list(leaves)
            for i, v in zip(dynamic, values, strict=True):
                full[i] = v
            a, k = jax.tree.unflatten(in_tree, full)
            return fn(*a, **k)

        closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*flat)
        if not _has_target(closed.jaxpr):
            return fn(*args, **kwargs)
        out = _eval(closed.jaxpr, closed.consts, *flat, layout=layout, grad_in=grad_in)
        return jax.tree.unflatten(jax.tree.structure(out_shape), out)

    return wrapped


def with_compute_dtype(apply_fn: Callable, dtype) -> Callable:
    """``apply(params, x)`` computed in ``dtype`` (mixed precision), outputs back in float32.

    Floating params and inputs are cast to ``dtype`` inside the function, so
    gradients with respect to float32 params come back in float32 (the params,
    optimizer state and deltas stay float32). ``dtype=float32`` on float32
    params is the identity.
    """
    dtype = jnp.dtype(dtype)

    def cast(a):
        return a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a

    def apply(params, x, *args, **kwargs):
        out = apply_fn(jax.tree.map(cast, params), jax.tree.map(cast, x), *args, **kwargs)
        return jax.tree.map(
            lambda o: o.astype(jnp.float32) if jnp.issubdtype(o.dtype, jnp.floating) else o, out
        )

    return apply
