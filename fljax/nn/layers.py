"""Convolution as im2col + matmul, max-pooling as pairwise maxima (see package docstring)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Impl = Literal["auto", "matmul", "xla"]
_IMPLS = ("auto", "matmul", "xla")
_impl: list[str] = ["auto"]
Layout = Literal["channels_first", "channels_last"]
_LAYOUTS = ("channels_first", "channels_last")
_layout: list[str] = ["channels_last"]


def set_layout(layout: Layout) -> None:
    """Choose the im2col layout of the matmul form (a performance setting; same result
    up to float reassociation): ``"channels_last"`` (patches ``[N, *out, K*C] @ W``) or
    ``"channels_first"`` (``W^T @`` patches ``[K*C, N, *out]``)."""
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
    _layout[0] = layout


def get_layout() -> str:
    """The im2col layout (see :func:`set_layout`)."""
    return _layout[0]


def set_impl(impl: Impl) -> None:
    """Choose the implementation used by default.

    Args:
      impl: ``"auto"`` (matmul form on CPU, XLA's operations on GPU/TPU),
        ``"matmul"`` (always the matmul/maxima form) or ``"xla"`` (always XLA's).
    """
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    _impl[0] = impl


def get_impl() -> str:
    """The default implementation (see :func:`set_impl`)."""
    return _impl[0]


def _use_matmul(impl: str | None) -> bool:
    impl = get_impl() if impl is None else impl
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if impl == "auto":
        return jax.default_backend() == "cpu"
    return impl == "matmul"


def _dim_numbers(lhs_shape, rhs_shape, dimension_numbers) -> lax.ConvDimensionNumbers:
    return lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers)


def supports_conv(
    lhs_shape: Sequence[int],
    rhs_shape: Sequence[int],
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
) -> bool:
    """Whether :func:`conv_general_dilated` has a matmul form for this configuration.

    Covered: any number of spatial dimensions, any layout (``dimension_numbers``),
    strides, ``"SAME"``/``"VALID"``/explicit (non-negative) padding and kernel
    (``rhs``) dilation. Not covered (falls back to XLA's convolution): input
    (``lhs``) dilation, i.e. transposed convolutions, and grouped convolutions
    (``feature_group_count`` or ``batch_group_count`` above 1).
    """
    del rhs_dilation, dimension_numbers
    nsp = len(lhs_shape) - 2
    if nsp < 1 or len(rhs_shape) != len(lhs_shape) or len(window_strides) != nsp:
        return False
    if feature_group_count != 1 or batch_group_count != 1:
        return False
    if lhs_dilation is not None and any(d != 1 for d in lhs_dilation):
        return False
    if not isinstance(padding, str):
        if len(padding) != nsp or any(lo < 0 or hi < 0 for lo, hi in padding):
            return False
    return True


def _conv_matmul_channels_first(
    lhs, rhs, window_strides, padding, rhs_dilation, dn, precision, preferred_element_type
):
    """Channels-first im2col: patches ``[K*C, N, *out]``, output ``W^T @ patches``.

    With the patch and channel axis leading, the matmul's long axis is the
    pixels (``N * prod(out)``). For LeNet's convolutions alone it took 20-40%
    less CPU time than the channels-last form, but the transposes back to the
    model's channels-last layout cost more than that in the whole training step
    (see docs/performance.md), so it is not the default.
    """
    nsp = lhs.ndim - 2
    # [C, N, *spatial] and [*spatial, I, O].
    lhs_perm = (dn.lhs_spec[1], dn.lhs_spec[0], *dn.lhs_spec[2:])
    rhs_perm = (*dn.rhs_spec[2:], dn.rhs_spec[1], dn.rhs_spec[0])
    x = jnp.transpose(lhs, lhs_perm) if lhs_perm != tuple(range(lhs.ndim)) else lhs
    w = jnp.transpose(rhs, rhs_perm) if rhs_perm != tuple(range(rhs.ndim)) else rhs
    ksize = w.shape[:nsp]
    rd = tuple(rhs_dilation) if rhs_dilation is not None else (1,) * nsp
    eff = tuple((k - 1) * d + 1 for k, d in zip(ksize, rd, strict=True))
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(x.shape[2:], eff, window_strides, padding)
    else:
        pads = [tuple(p) for p in padding]
    if any(lo or hi for lo, hi in pads):
        x = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), (0, 0, 0), *[(lo, hi, 0) for lo, hi in pads]])
    out_sp = tuple((x.shape[2 + i] - eff[i]) // window_strides[i] + 1 for i in range(nsp))
    if any(o <= 0 for o in out_sp):
        raise ValueError(f"convolution output would be empty: input {lhs.shape}, kernel {rhs.shape}")
    cols = []
    for offs in itertools.product(*[range(k) for k in ksize]):
        start = (0, 0, *[o * d for o, d in zip(offs, rd, strict=True)])
        limit = (
            *x.shape[:2],
            *[s + (n - 1) * st + 1 for s, n, st in zip(start[2:], out_sp, window_strides, strict=True)],
        )
        cols.append(lax.slice(x, start, limit, (1, 1, *window_strides)))
    patches = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=0)  # [K*C, N, *out]
    kernel = w.reshape(-1, w.shape[-1])  # [K*C, O], rows ordered as the patches
    y = lax.dot_general(
        kernel,
        patches,
        (((0,), (0,)), ((), ())),
        precision=precision,
        preferred_element_type=preferred_element_type,
    )  # [O, N, *out]
    # Place y's dims where out_spec says.
    out_spec = dn.out_spec
    src = (out_spec[1], out_spec[0], *out_spec[2:])  # output dim of each of y's dims
    inv = [0] * y.ndim
    for i, d in enumerate(src):
        inv[d] = i
    return jnp.transpose(y, inv) if tuple(inv) != tuple(range(y.ndim)) else y


def _conv_matmul_channels_last(
    lhs, rhs, window_strides, padding, rhs_dilation, dn, precision, preferred_element_type
):
    """Channels-last im2col: patches ``[N, *out, K*C]``, output ``patches @ W``."""
    nsp = lhs.ndim - 2
    # To channels-last [N, *spatial, C] and [*spatial, I, O].
    lhs_perm = (dn.lhs_spec[0], *dn.lhs_spec[2:], dn.lhs_spec[1])
    rhs_perm = (*dn.rhs_spec[2:], dn.rhs_spec[1], dn.rhs_spec[0])
    x = jnp.transpose(lhs, lhs_perm) if lhs_perm != tuple(range(lhs.ndim)) else lhs
    w = jnp.transpose(rhs, rhs_perm) if rhs_perm != tuple(range(rhs.ndim)) else rhs
    ksize = w.shape[:nsp]
    rd = tuple(rhs_dilation) if rhs_dilation is not None else (1,) * nsp
    eff = tuple((k - 1) * d + 1 for k, d in zip(ksize, rd, strict=True))
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(x.shape[1:-1], eff, window_strides, padding)
    else:
        pads = [tuple(p) for p in padding]
    if any(lo or hi for lo, hi in pads):
        x = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), *[(lo, hi, 0) for lo, hi in pads], (0, 0, 0)])
    out_sp = tuple((x.shape[1 + i] - eff[i]) // window_strides[i] + 1 for i in range(nsp))
    if any(o <= 0 for o in out_sp):
        raise ValueError(f"convolution output would be empty: input {x.shape}, kernel {w.shape}")
    cols = []
    for offs in itertools.product(*[range(k) for k in ksize]):
        start = (0, *[o * d for o, d in zip(offs, rd, strict=True)], 0)
        limit = (
            x.shape[0],
            *[s + (n - 1) * st + 1 for s, n, st in zip(start[1:-1], out_sp, window_strides, strict=True)],
            x.shape[-1],
        )
        cols.append(lax.slice(x, start, limit, (1, *window_strides, 1)))
    patches = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)
    kernel = w.reshape(-1, w.shape[-1])
    y = lax.dot_general(
        patches,
        kernel,
        (((patches.ndim - 1,), (0,)), ((), ())),
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    # y is [N, *spatial, O]; place its dims where out_spec says.
    out_spec = dn.out_spec
    src = (out_spec[0], *out_spec[2:], out_spec[1])  # output dim of each of y's dims
    inv = [0] * y.ndim
    for i, d in enumerate(src):
        inv[d] = i
    return jnp.transpose(y, inv) if tuple(inv) != tuple(range(y.ndim)) else y


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
    *,
    impl: Impl | None = None,
    layout: Layout | None = None,
) -> jax.Array:
    """Drop-in for ``lax.conv_general_dilated``, as im2col from shifted slices + one matmul.

    The patches are ``prod(kernel_size)`` strided slices of the (padded) input
    concatenated along the channels; the output is one ``dot_general`` with the
    reshaped kernel. Under ``jax.vmap`` over per-client kernels this becomes one
    batched matmul across clients, where XLA would emit a grouped convolution.
    Gradients are those of slices, a concatenation and a matmul (pads and matmuls).

    Args:
      lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
      dimension_numbers, feature_group_count, batch_group_count, precision,
      preferred_element_type: as in ``lax.conv_general_dilated``.
      impl: ``"auto"``, ``"matmul"`` or ``"xla"``; default :func:`get_impl`.
        Configurations outside :func:`supports_conv` always use XLA.
      layout: im2col layout of the matmul form; default :func:`get_layout`.

    Returns:
      The convolution, equal to ``lax.conv_general_dilated`` up to float reassociation.
    """
    xla = lambda: lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    if not _use_matmul(impl):
        return xla()
    if not supports_conv(
        lhs.shape,
        rhs.shape,
        window_strides,
        padding,
        lhs_dilation,
        rhs_dilation,
        dimension_numbers,
        feature_group_count,
        batch_group_count,
    ):
        return xla()
    dn = _dim_numbers(lhs.shape, rhs.shape, dimension_numbers)
    layout = get_layout() if layout is None else layout
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
    conv = _conv_matmul_channels_first if layout == "channels_first" else _conv_matmul_channels_last
    return conv(lhs, rhs, tuple(window_strides), padding, rhs_dilation, dn, precision, preferred_element_type)


def supports_pool(
    window_shape: Sequence[int], strides: Sequence[int] | None, padding: str | Sequence[tuple[int, int]]
) -> bool:
    """Whether :func:`max_pool` has a pairwise-maxima form: non-overlapping windows
    (``strides == window_shape``) without padding (``"VALID"`` or all zeros)."""
    window_shape = tuple(window_shape)
    strides = tuple(strides) if strides is not None else (1,) * len(window_shape)
    if strides != window_shape:
        return False
    if isinstance(padding, str):
        return padding == "VALID"
    return all(lo == 0 and hi == 0 for lo, hi in padding)


def window_max(x: jax.Array, window: Sequence[int]) -> jax.Array:
    """Max over non-overlapping windows (``window`` per dim, strides equal to it).

    Each dim of size ``n`` becomes ``n // w`` (a remainder is dropped, as with
    ``"VALID"`` padding). Ties go to the first maximum of the window in
    row-major order, as in ``select_and_scatter`` (XLA's max-pool gradient).
    """
    window = tuple(int(w) for w in window)
    if len(window) != x.ndim:
        raise ValueError(f"window {window} needs one entry per dim of {x.shape}")
    out = tuple(n // w for n, w in zip(x.shape, window, strict=True))
    if any(o == 0 for o in out):
        raise ValueError(f"pooling window {window} larger than the input {x.shape}")
    result = None
    for offs in itertools.product(*[range(w) for w in window]):
        limit = tuple(o + (n - 1) * w + 1 for o, n, w in zip(offs, out, window, strict=True))
        e = lax.slice(x, offs, limit, window)
        result = e if result is None else lax.select(result >= e, result, e)
    return result


def max_pool(
    inputs: jax.Array,
    window_shape: Sequence[int],
    strides: Sequence[int] | None = None,
    padding: str | Sequence[tuple[int, int]] = "VALID",
    *,
    impl: Impl | None = None,
) -> jax.Array:
    """Drop-in for ``flax.linen.max_pool`` (inputs ``[..., *spatial, features]``).

    Non-overlapping, unpadded windows are computed as pairwise maxima of strided
    slices (elementwise work, with an elementwise gradient); other
    configurations, or ``impl="xla"``, use ``flax.linen.max_pool``.
    """
    window_shape = tuple(window_shape)
    if not _use_matmul(impl) or not supports_pool(window_shape, strides, padding):
        return nn.max_pool(inputs, window_shape, strides=strides, padding=padding)
    if inputs.ndim < len(window_shape) + 1:
        raise ValueError(f"max_pool needs inputs [..., *spatial, features], got {inputs.shape}")
    first = inputs.ndim - 1 - len(window_shape)
    return window_max(inputs, (1,) * first + window_shape + (1,))


class Conv(nn.Conv):
    """``flax.linen.Conv`` whose convolution is :func:`conv_general_dilated` (same params and init)."""

    conv_general_dilated: Any = staticmethod(conv_general_dilated)
