"""Per-example clipping without per-example gradients of the whole model: layer-wise norms.

DP-SGD needs ``sum_j c_j g_j`` with ``c_j = min(1, C / ||g_j||)``, where ``g_j``
is example ``j``'s gradient. The reference (:func:`fljax.privacy.dp_sgd.per_example_gradients`)
materialises every ``g_j`` by ``jax.vmap`` over examples of a batch-1 gradient,
so the whole backward pass runs once per example. Here it runs ONCE per batch:

1. One forward pass of the batch records each layer's input ``a`` and one
   backward pass, taken with respect to zero perturbations added to each
   layer's output (``flax.linen.Module.perturb``), gives each layer's output
   gradient ``G``: row ``j`` of ``G`` is ``dL_j / dy_j`` because the loss is a
   sum of per-example losses and examples do not interact. No weight gradient
   is formed in this pass.
2. Each layer's per-example squared gradient norm is computed from ``(a_j, G_j)``
   alone, choosing per layer between two formulas (Bu et al. 2022's "mixed
   ghost clipping"):

   * ``"ghost"`` (dense layers): with ``T`` positions per example (1 for
     an MLP), ``a_j`` is ``[T, d]`` and ``G_j`` is ``[T, p]``, the kernel
     gradient is ``a_j^T G_j`` and ``||a_j^T G_j||^2 = <a_j a_j^T, G_j G_j^T>``
     (Goodfellow 2015; Li et al. 2022), which for ``T = 1`` is
     ``||a_j||^2 ||G_j||^2``: no ``[d, p]`` matrix per example. Used when
     ``2 T^2 < d p`` (cost ``T^2 (d + p)`` against ``T d p``).
   * ``"direct"`` (convolutions, and dense layers with many positions): the
     layer's own per-example weight gradient, the VJP of the layer with
     respect to its parameters ``jax.vmap``-ed over ``(a_j, G_j)``. A
     convolution's kernel gradient is small (LeNet: 75x6 and 150x16; Bu et
     al.'s rule picks it for both, ``2 T^2`` being 1.2M and 20,000 against 450
     and 2,400), and is computed with :func:`fljax.nn.conv_general_dilated`'s
     matmul forms, banded or im2col, whichever moves fewer floats
     (:func:`per_example_conv_layout`): one batched matmul per layer.

3. The clip factors ``c_j`` come from the summed squared norms exactly as in
   the reference (non-finite norms and padding get ``c_j = 0``). The clipped
   sum is then formed layer by layer from the same ``(a, G)`` without a second
   backward pass (the "book-keeping" of Bu, Wang, Zha, Karypis 2023): a
   ``"ghost"`` layer's sum is the layer's batch VJP with the output gradient
   ``c_j G_j`` (one matmul, as in a plain backward pass), a ``"direct"``
   layer's is ``sum_j c_j g_j`` of its per-example gradients.

The result is the reference's clipped sum up to float reassociation (tested on
LeNet and MLPs, padded batches, norms below and above the clip), so the DP-SGD
mechanism, its sensitivity ``C`` and its accounting are unchanged.

Supported models: flax modules whose every parameter belongs to a
``flax.linen.Dense`` or ``flax.linen.Conv`` (including :class:`fljax.nn.Conv`)
called once per forward pass, with examples processed independently (no batch
statistics, as the reference's batch-1 gradients also assume). jax_privacy's
``clipped_grad`` offers per-example clipping by ``vmap`` only, the same
formulation as the reference.

References:
  Goodfellow. "Efficient Per-Example Gradient Computations". arXiv:1510.01799, 2015.
  Li, Tramèr, Liang, Hashimoto. "Large Language Models Can Be Strong
  Differentially Private Learners". ICLR 2022 (ghost clipping).
  Bu, Mao, Xu. "Scalable and Efficient Training of Large Convolutional Neural
  Networks with Differential Privacy". NeurIPS 2022 (mixed ghost clipping).
  Bu, Wang, Zha, Karypis. "Differentially Private Optimization on Large Model at
  Small Cost". ICML 2023 (book-keeping: the clipped sum without a second
  backward pass).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from fljax import fast, losses, tree
from fljax.base import Params, Performance
from fljax.nn import layers as fast_layers

_INPUTS = "dp_sgd_inputs"  # flax collection: each layer's input (sown)
_PERTURBATIONS = "dp_sgd_perturbations"  # flax collection: zeros added to each layer's output
_NAME = "dp_sgd"  # variable name inside both collections

Rule = Literal["ghost", "direct"]

# clipped_sum_fn(params, x[batch, ...], y[batch], mask[batch]) -> (clipped sum, losses[batch], norms[batch])
ClippedSumFn = Callable[[Params, Any, jax.Array, jax.Array], tuple[Params, jax.Array, jax.Array]]


class Layer(NamedTuple):
    """One parameterised layer call of the model (static: found at trace time).

    Attributes:
      path: the module's path in the params' ``"params"`` collection.
      module: an unbound copy of the module (its per-example VJP is taken on it).
      rule: ``"ghost"`` or ``"direct"`` (see the module docstring).
      output: shape and dtype of the layer's output.
    """

    path: tuple[str, ...]
    module: nn.Module
    rule: Rule
    output: jax.ShapeDtypeStruct


def _layer_input(args, kwargs):
    return args[0] if args else kwargs["inputs"]


def _is_plain_dense(module: nn.Module) -> bool:
    return type(module) is nn.Dense and module.dot_general is None and module.dot_general_cls is None


def _rule(module: nn.Module, x_shape: tuple[int, ...], kernel_shape: tuple[int, ...]) -> Rule:
    """Bu et al. 2022: ghost norm when ``2 T^2 < d p``, the per-example gradient otherwise."""
    if not _is_plain_dense(module):
        return "direct"
    positions = math.prod(x_shape[1:-1])
    return "ghost" if 2 * positions * positions < math.prod(kernel_shape) else "direct"


def _subtree(params, path):
    for name in path:
        params = params[name]
    return params


def _leaf_paths(params, prefix=()) -> set[tuple[str, ...]]:
    if isinstance(params, dict) or hasattr(params, "items"):
        out: set = set()
        for k, v in params.items():
            out |= _leaf_paths(v, (*prefix, k))
        return out
    return {prefix}


def find_layers(model: nn.Module, params: Params, x) -> tuple[Layer, ...]:
    """The model's parameterised layers, checked for layer-wise clipping.

    Args:
      model: a flax module.
      params: its variables, ``{"params": ...}`` (arrays or shapes).
      x: a batch of inputs (arrays or shapes), leaves ``[batch, ...]``.

    Returns:
      One :class:`Layer` per parameterised layer call, in call order.

    Raises:
      ValueError: naming the problem when the model is not supported: not a
        flax module, variables other than ``"params"``, a parameter owned by
        a module other than ``Dense``/``Conv``, or a layer called twice.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"layer-wise clipping needs a flax module, got {type(model).__name__}")
    if not hasattr(params, "keys") or set(params.keys()) != {"params"}:
        keys = sorted(params.keys()) if hasattr(params, "keys") else type(params).__name__
        raise ValueError(f"layer-wise clipping needs variables {{'params': ...}} only, got {keys}")
    calls: list[tuple[tuple[str, ...], nn.Module, tuple[int, ...], jax.ShapeDtypeStruct]] = []

    def record(next_fun, args, kwargs, context):
        module = context.module
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and isinstance(module, (nn.Dense, nn.Conv)):
            shape = jax.ShapeDtypeStruct(out.shape, out.dtype)
            calls.append(
                (tuple(module.path), module.clone(parent=None), _layer_input(args, kwargs).shape, shape)
            )
        return out

    spec = lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a))
    with nn.intercept_methods(record):
        jax.eval_shape(model.apply, jax.tree.map(spec, params), jax.tree.map(spec, x))
    paths = [c[0] for c in calls]
    if len(set(paths)) != len(paths):
        twice = sorted({p for p in paths if paths.count(p) > 1})
        raise ValueError(f"layer-wise clipping needs each layer called once, {twice} called more often")
    covered: set = set()
    result = []
    for path, module, x_shape, out in calls:
        own = _leaf_paths(_subtree(params["params"], path))
        covered |= {(*path, *leaf) for leaf in own}
        kernel = _subtree(params["params"], path)["kernel"]
        result.append(Layer(path, module, _rule(module, x_shape, jnp.shape(kernel)), out))
    missing = _leaf_paths(params["params"]) - covered
    if missing:
        raise ValueError(
            "layer-wise clipping supports parameters of flax Dense and Conv layers only; "
            f"not covered: {sorted('/'.join(p) for p in missing)}"
        )
    return tuple(result)


def supports(model, params: Params, x) -> bool:
    """Whether :func:`find_layers` accepts ``model`` (False instead of its ``ValueError``)."""
    try:
        find_layers(model, params, x)
    except (ValueError, KeyError, TypeError):
        return False
    return True


def _set_path(tree_: dict, path: tuple[str, ...], value) -> None:
    for name in path[:-1]:
        tree_ = tree_.setdefault(name, {})
    tree_[path[-1]] = value


def _spatial(value, n: int) -> tuple[int, ...]:
    if value is None:
        return (1,) * n
    if isinstance(value, int):
        return (value,) * n
    return tuple(value)


def per_example_conv_layout(module: nn.Conv, kernel_shape, output_shape) -> str:
    """The matmul layout of a convolution's per-example kernel gradient: ``"banded"`` or
    ``"channels_last"`` (im2col), whichever moves fewer floats per example.

    The per-example gradient needs no input gradient, so the banded form uses its
    narrow tiles (:func:`fljax.nn.band_tile` with ``input_grad=False``). Per example,
    im2col reads ``prod(out) * K * C`` patch entries and writes the ``K * C * O``
    kernel gradient; the banded form reads ``prod(out[:-1]) * tiles * K' * tile_in * C``
    row entries and writes a ``K' * tile_in * C * tile * O`` band gradient
    (``K = prod(kernel)``, ``K' = prod(kernel[:-1])``). Both of LeNet's convolutions get
    the banded form (first: 26,400 floats against 59,250; second, in tiles of 2 outputs:
    14,760 against 17,400); the minibatch's per-example clipped gradient then took 1.06x
    the CPU time of the plain minibatch gradient (10 clients x 32 examples, vmapped), where
    im2col for both took 1.7x.
    """
    nsp = len(kernel_shape) - 2
    *ksize, cin, cout = kernel_shape
    out = tuple(output_shape[1:-1])
    stride = _spatial(module.strides, nsp)[-1]
    dilation = _spatial(module.kernel_dilation, nsp)[-1]
    lead = math.prod(ksize[:-1])
    im2col = math.prod(out) * math.prod(ksize) * cin + math.prod(ksize) * cin * cout
    tile = fast_layers.band_tile(out[-1], ksize[-1], stride, dilation, lead * cin, cout, input_grad=False)
    tiles = -(-out[-1] // tile)
    tile_in = (tile - 1) * stride + (ksize[-1] - 1) * dilation + 1
    banded = math.prod(out[:-1]) * tiles * lead * tile_in * cin + lead * tile_in * cin * tile * cout
    return "banded" if banded < im2col else "channels_last"


def _per_example_module(layer: Layer, kernel_shape, performance: Performance) -> Callable:
    """``apply(params, x)`` of one layer for its per-example ("direct") gradient; a
    convolution in the layout of :func:`per_example_conv_layout`."""
    module = layer.module
    if not isinstance(module, nn.Conv):
        return lambda p, x: module.apply({"params": p}, x)
    layout = per_example_conv_layout(module, kernel_shape, layer.output.shape)
    if isinstance(module, fast_layers.Conv):
        module = module.clone(layout=layout, input_grad=False)
    apply = lambda p, x: module.apply({"params": p}, x)
    if performance.accelerate:
        apply = fast.accelerate(apply, impl=performance.conv_impl, layout=layout, argnums=0)
    return apply


def _batch_apply(module: nn.Module, performance: Performance) -> Callable:
    apply = lambda p, x: module.apply({"params": p}, x)
    if performance.accelerate and isinstance(module, nn.Conv):
        apply = fast.accelerate(apply, impl=performance.conv_impl, layout=performance.conv_layout)
    return apply


def _ghost_sq_norms(a: jax.Array, g: jax.Array, use_bias: bool) -> jax.Array:
    """Per-example squared norm of a dense layer's gradient from its input ``a[B, ..., d]`` and
    output gradient ``g[B, ..., p]``: ``<a a^T, g g^T>`` (``||a||^2 ||g||^2`` at one position),
    plus ``||sum_t g_t||^2`` for the bias."""
    b = a.shape[0]
    a = a.reshape(b, -1, a.shape[-1]).astype(jnp.float32)
    g = g.reshape(b, -1, g.shape[-1]).astype(jnp.float32)
    if a.shape[1] == 1:
        sq = jnp.sum(jnp.square(a), axis=(1, 2)) * jnp.sum(jnp.square(g), axis=(1, 2))
    else:
        aa = jnp.einsum("bti,bsi->bts", a, a, precision=jax.lax.Precision.HIGHEST)
        gg = jnp.einsum("bto,bso->bts", g, g, precision=jax.lax.Precision.HIGHEST)
        sq = jnp.sum(aa * gg, axis=(1, 2))
    if use_bias:
        sq = sq + jnp.sum(jnp.square(jnp.sum(g, axis=1)), axis=1)
    return sq


def _zero_rows(v: jax.Array, keep: jax.Array) -> jax.Array:
    return jnp.where(keep.reshape((-1,) + (1,) * (v.ndim - 1)), v, jnp.zeros((), v.dtype))


def clipped_sum(
    model: nn.Module,
    *,
    l2_norm_clip: float,
    loss_fn: losses.LossFn = losses.softmax_cross_entropy,
    performance: Performance | None = None,
) -> ClippedSumFn:
    """``fn(params, x, y, mask) -> (sum_j c_j g_j, losses[batch], norms[batch])``, layer-wise.

    ``g_j`` is the gradient of example ``j``'s loss, ``norms[j] = ||g_j||`` and
    ``c_j = min(1, l2_norm_clip / ||g_j||)`` for real (``mask_j``) examples with a
    finite norm, 0 otherwise (padding and non-finite examples contribute exactly
    zero): the reference's clipped sum (see the module docstring for how it is
    computed), a pytree shaped like ``params``. Unit of privacy: one example;
    each example's contribution has L2 norm at most ``l2_norm_clip`` (the
    sensitivity of the sum under add/remove one example).

    Args:
      model: a flax module accepted by :func:`find_layers` (checked when the
        returned function is traced).
      l2_norm_clip: the clip norm ``C`` (``inf``: no clipping).
      loss_fn: per-example loss ``loss_fn(outputs, labels) -> [batch]``.
      performance: the round's settings: with ``accelerate``, convolutions of
        plain flax layers run in :func:`fljax.fast.accelerate`'s matmul forms
        (the model's own :mod:`fljax.nn` layers already do). ``compute_dtype``
        is not applied: norms and sums are computed in the params' dtype.

    Returns:
      The function above (jittable; ``x``, ``y``, ``mask`` have a leading batch axis).

    Examples:
      Equal to clipping the ``vmap``-ed per-example gradients:

      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from fljax import models, tree
      >>> from fljax.privacy import dp_sgd, ghost_clipping
      >>> model = models.MLP(hidden=(8,), num_classes=3)
      >>> params = models.init_params(model, (4,), jax.random.key(0))
      >>> x = jax.random.normal(jax.random.key(1), (5, 4))
      >>> y = jnp.array([0, 1, 2, 0, 1])
      >>> mask = jnp.array([True, True, True, True, False])
      >>> fn = ghost_clipping.clipped_sum(model, l2_norm_clip=0.1)
      >>> total, _, norms = jax.jit(fn)(params, x, y, mask)
      >>> _, grads = dp_sgd.per_example_gradients(model)(params, x, y)
      >>> factors, ref_norms = tree.clip_factors(grads, 0.1)
      >>> ref = tree.weighted_sum(grads, jnp.where(mask, factors, 0.0))
      >>> bool(np.allclose(norms, ref_norms, rtol=1e-4))
      True
      >>> all(np.allclose(a, b, atol=1e-6) for a, b in zip(jax.tree.leaves(total), jax.tree.leaves(ref)))
      True
    """
    if not l2_norm_clip > 0:
        raise ValueError(f"l2_norm_clip must be positive, got {l2_norm_clip}")
    if not isinstance(model, nn.Module):
        raise ValueError(f"layer-wise clipping needs a flax module, got {type(model).__name__}")
    perf = performance if performance is not None else Performance()

    def forward(variables, perturbations, wanted, x):
        def capture(next_fun, args, kwargs, context):
            module = context.module
            if context.method_name != "__call__" or tuple(module.path) not in wanted:
                return next_fun(*args, **kwargs)
            module.sow(_INPUTS, _NAME, _layer_input(args, kwargs))
            return module.perturb(_NAME, next_fun(*args, **kwargs), collection=_PERTURBATIONS)

        with nn.intercept_methods(capture):
            out, state = model.apply({**variables, _PERTURBATIONS: perturbations}, x, mutable=[_INPUTS])
        return out, state[_INPUTS]

    def fn(params, x, y, mask):
        found = find_layers(model, params, x)
        wanted = frozenset(layer.path for layer in found)
        apply = lambda v, e, xs: forward(v, e, wanted, xs)
        if perf.accelerate:
            apply = fast.accelerate(apply, impl=perf.conv_impl, layout=perf.conv_layout, argnums=(0, 1))
        zeros: dict = {}
        for layer in found:
            _set_path(zeros, (*layer.path, _NAME), jnp.zeros(layer.output.shape, layer.output.dtype))

        def total_loss(perturbations):
            out, inputs = apply(params, perturbations, x)
            example_losses = loss_fn(out, y)
            return jnp.sum(example_losses), (example_losses, inputs)

        output_grads, (example_losses, inputs) = jax.grad(total_loss, has_aux=True)(zeros)
        acts = [_subtree(inputs, layer.path)[_NAME][0] for layer in found]
        outs = [_subtree(output_grads, layer.path)[_NAME] for layer in found]
        sq = []
        direct = {}
        for layer, a, g in zip(found, acts, outs, strict=True):
            own = _subtree(params["params"], layer.path)
            if layer.rule == "ghost":
                sq.append(_ghost_sq_norms(a, g, "bias" in own))
            else:
                layer_apply = _per_example_module(layer, jnp.shape(own["kernel"]), perf)

                def example_grad(aj, gj, own=own, layer_apply=layer_apply):
                    _, vjp = jax.vjp(lambda p: layer_apply(p, aj[None]), own)
                    return vjp(gj[None])[0]

                grads = jax.vmap(example_grad)(a, g)
                direct[layer.path] = grads
                sq.extend(
                    jnp.sum(jnp.square(v.astype(jnp.float32)).reshape(v.shape[0], -1), axis=1)
                    for v in jax.tree.leaves(grads)
                )
        norms = jnp.sqrt(sum(sq))
        factors = jnp.minimum(
            1.0, jnp.float32(l2_norm_clip) / jnp.maximum(norms, jnp.finfo(jnp.float32).tiny)
        )
        coef = jnp.where(mask & jnp.isfinite(norms), factors, 0.0)
        keep = coef > 0
        total: dict = {}
        for layer, a, g in zip(found, acts, outs, strict=True):
            own = _subtree(params["params"], layer.path)
            if layer.rule == "ghost":
                cg = _zero_rows(g * coef.reshape((-1,) + (1,) * (g.ndim - 1)).astype(g.dtype), keep)
                # rows of dropped examples are zeroed in the input too: 0 * inf would be NaN
                _, vjp = jax.vjp(_batch_apply(layer.module, perf), own, _zero_rows(a, keep))
                summed = vjp(cg)[0]
            else:
                summed = tree.weighted_sum(direct[layer.path], coef)
            _set_path(total, layer.path, summed)
        return {"params": total}, example_losses, norms

    return fn
