"""Convolution as im2col + matmul, max-pooling as pairwise maxima (see package docstring)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Impl = Literal["auto", "matmul", "xla"]
IMPLS = ("auto", "matmul", "xla")
Layout = Literal["auto", "banded", "channels_last", "channels_first"]
LAYOUTS = ("auto", "banded", "channels_last", "channels_first")

# "auto" picks the banded form when its weight matrix stays small and its extra
# multiplications (a factor of about tile width / kernel width) stay few; see
# :func:`banded_pays`, :func:`band_tile` and docs/performance.md for the
# measurements behind these numbers.
BANDED_MAX_WIDTH_RATIO = 8.0
BANDED_MAX_ELEMENTS = 1 << 20
BANDED_MIN_COLUMNS = 128
BANDED_MIN_COLUMNS_NO_INPUT_GRAD = 24


def banded_pays(
    out_width: int,
    kernel_width: int,
    stride: int = 1,
    dilation: int = 1,
    rows_factor: int = 1,
    cout: int = 1,
    *,
    input_grad: bool = True,
) -> bool:
    """Whether ``"auto"`` uses the banded form for a convolution ``out_width`` wide at
    the output (last spatial dim), with ``rows_factor = prod(kernel[:-1]) * C``.

    With the tile of :func:`band_tile` (``tile_in`` input columns per ``tile``
    outputs), the band has ``rows_factor * tile_in * tile * cout`` entries and
    costs ``tile_in / kernel_width`` times im2col's multiplications; both must
    stay under :data:`BANDED_MAX_ELEMENTS` and :data:`BANDED_MAX_WIDTH_RATIO`.
    """
    tile = band_tile(out_width, kernel_width, stride, dilation, rows_factor, cout, input_grad=input_grad)
    return _band_pays(tile, kernel_width, stride, dilation, rows_factor, cout)


def _tile_in(tile: int, kernel_width: int, stride: int, dilation: int) -> int:
    """Input columns that ``tile`` consecutive outputs read."""
    return (tile - 1) * stride + (kernel_width - 1) * dilation + 1


def _band_pays(tile: int, kernel_width: int, stride: int, dilation: int, rows_factor: int, cout: int) -> bool:
    tile_in = _tile_in(tile, kernel_width, stride, dilation)
    return (
        tile_in / kernel_width <= BANDED_MAX_WIDTH_RATIO
        and rows_factor * tile_in * tile * cout <= BANDED_MAX_ELEMENTS
    )


def check_impl(impl: str) -> None:
    """Raise a ``ValueError`` naming ``impl`` unless it is one of :data:`IMPLS`."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def check_layout(layout: str) -> None:
    """Raise a ``ValueError`` naming ``layout`` unless it is one of :data:`LAYOUTS`."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def use_matmul(impl: str) -> bool:
    """Whether ``impl`` selects the matmul/maxima forms on the default backend:
    ``"matmul"`` always, ``"auto"`` on CPU only, ``"xla"`` never. Raises a
    ``ValueError`` for any other value."""
    check_impl(impl)
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


def _conv_matmul_channels_first(x, w, window_strides, rd, out_sp, precision, preferred_element_type):
    """Channels-first im2col: patches ``[K*C, N, *out]``, output ``W^T @ patches``.

    With the patch and channel axis leading, the matmul's long axis is the
    pixels (``N * prod(out)``). For LeNet's convolutions alone it took 20-40%
    less CPU time than the channels-last form, but the transposes back to the
    model's channels-last layout cost more than that in the whole training step
    (see docs/performance.md), so it is never chosen by ``"auto"``.
    """
    nsp = x.ndim - 2
    x = jnp.moveaxis(x, -1, 0)  # [C, N, *spatial]
    cols = []
    for offs in itertools.product(*[range(k) for k in w.shape[:nsp]]):
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
    return jnp.moveaxis(y, 0, -1)  # [N, *out, O]


def _channels_last_padded(lhs, rhs, window_strides, padding, rhs_dilation, dn):
    """``lhs`` as ``[N, *spatial, C]`` padded, ``rhs`` as ``[*kernel, I, O]``, the
    kernel dilation and the output's spatial shape."""
    nsp = lhs.ndim - 2
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
    return x, w, rd, out_sp


def _to_out_spec(y, dn):
    """``y`` is ``[N, *spatial, O]``; place its dims where ``dn.out_spec`` says."""
    out_spec = dn.out_spec
    src = (out_spec[0], *out_spec[2:], out_spec[1])  # output dim of each of y's dims
    inv = [0] * y.ndim
    for i, d in enumerate(src):
        inv[d] = i
    return jnp.transpose(y, inv) if tuple(inv) != tuple(range(y.ndim)) else y


def _conv_matmul_channels_last(x, w, window_strides, rd, out_sp, precision, preferred_element_type):
    """Channels-last im2col: patches ``[N, *out, K*C]``, output ``patches @ W``."""
    nsp = x.ndim - 2
    ksize = w.shape[:nsp]
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
    return lax.dot_general(
        patches,
        kernel,
        (((patches.ndim - 1,), (0,)), ((), ())),
        precision=precision,
        preferred_element_type=preferred_element_type,
    )


def _band_selector(
    in_width: int, out_width: int, kernel_width: int, stride: int, dilation: int
) -> np.ndarray:
    """``sel[w, v, j] = 1`` where input column ``w`` meets kernel column ``j`` at output column ``v``."""
    sel = np.zeros((in_width, out_width, kernel_width), np.float32)
    for v in range(out_width):
        for j in range(kernel_width):
            sel[v * stride + j * dilation, v, j] = 1.0
    return sel


def band_tile(
    out_width: int,
    kernel_width: int,
    stride: int = 1,
    dilation: int = 1,
    rows_factor: int = 1,
    cout: int = 1,
    *,
    input_grad: bool = True,
) -> int:
    """Output columns per band tile: the last spatial dim is cut into tiles of this many
    outputs, each one a slice of the input multiplied by the same (smaller) band.

    Picks the tile with the fewest multiply-adds per output row,
    ``n_tiles * rows_factor * tile_in * tile * cout`` with ``tile_in`` the input
    columns a tile reads, among tiles whose band has at least
    :data:`BANDED_MIN_COLUMNS` columns (``tile * cout``), or the whole width if
    that is narrower. When the input needs no gradient (``input_grad=False``, a
    first layer on data), the floor is :data:`BANDED_MIN_COLUMNS_NO_INPUT_GRAD`:
    overlapping tiles then cost nothing in the backward pass, while their
    input gradient would be a sum of overlapping pads. Measured on LeNet (CPU):
    the first convolution in tiles of 4 outputs, the second untiled.
    """
    floor = BANDED_MIN_COLUMNS if input_grad else BANDED_MIN_COLUMNS_NO_INPUT_GRAD
    floor = min(floor, out_width * cout)
    best = None
    for t in range(1, out_width + 1):
        if t * cout < floor:
            continue
        n = -(-out_width // t)
        macs = n * rows_factor * _tile_in(t, kernel_width, stride, dilation) * t * cout
        if best is None or macs < best[0]:
            best = (macs, t)
    return best[1]


def _conv_matmul_banded(x, w, window_strides, rd, out_sp, tile, precision, preferred_element_type):
    """Banded form: rows ``[N, *out[:-1], tiles, K'*Wt*C]`` (the input unfolded over
    every spatial dim but the last, whose ``Wt`` columns per tile are sliced out)
    times the banded matrix ``[K'*Wt*C, tile*O]`` in which the kernel slides along
    the last spatial dim."""
    nsp = x.ndim - 2
    ksize = w.shape[:nsp]
    n, cin, cout = x.shape[0], x.shape[-1], w.shape[-1]
    ow, s, d, kw = out_sp[-1], window_strides[-1], rd[-1], ksize[-1]
    tiles = -(-ow // tile)
    tile_in = _tile_in(tile, kw, s, d)
    need = _tile_in(tiles * tile, kw, s, d)
    if need > x.shape[-2]:  # the last tile runs past the input: zeros, outputs dropped below
        x = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0)] * (nsp) + [(0, need - x.shape[-2], 0), (0, 0, 0)])
    cols = []
    for offs in itertools.product(*[range(k) for k in ksize[:-1]]):
        lead_start = [o * dd for o, dd in zip(offs, rd[:-1], strict=True)]
        lead_limit = [
            st + (m - 1) * ss + 1
            for st, m, ss in zip(lead_start, out_sp[:-1], window_strides[:-1], strict=True)
        ]
        parts = []
        for j in range(tiles):
            start = (0, *lead_start, j * tile * s, 0)
            limit = (n, *lead_limit, j * tile * s + tile_in, cin)
            parts.append(lax.slice(x, start, limit, (1, *window_strides[:-1], 1, 1)))
        sl = parts[0][..., None, :, :] if tiles == 1 else jnp.stack(parts, axis=-3)
        cols.append(sl.reshape(*sl.shape[:-2], tile_in * cin))
    rows = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)  # [N, *out[:-1], tiles, F]
    sel = _band_selector(tile_in, tile, kw, s, d)
    wk = w.reshape(-1, kw, cin, cout)  # [K', kw, C, O]
    # Each band entry is one kernel entry or zero: exact at HIGHEST precision.
    band = jnp.einsum("ajco,wvj->awcvo", wk, sel.astype(w.dtype), precision=lax.Precision.HIGHEST)
    band = band.reshape(-1, tile * cout)
    y = lax.dot_general(
        rows,
        band,
        (((rows.ndim - 1,), (0,)), ((), ())),
        precision=precision,
        preferred_element_type=preferred_element_type,
    )  # [N, *out[:-1], tiles, tile*O]
    y = y.reshape(n, *out_sp[:-1], tiles * tile, cout)
    if tiles * tile != ow:
        y = y[..., :ow, :]
    return y


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
    impl: Impl = "auto",
    layout: Layout = "auto",
    input_grad: bool = True,
) -> jax.Array:
    """Drop-in for ``lax.conv_general_dilated``, as strided slices + one matmul.

    Im2col layouts: the patches are ``prod(kernel_size)`` strided slices of the
    (padded) input concatenated along the channels, times the reshaped kernel.
    Banded layout: the input unfolded over all spatial dims but the last, times
    a banded matrix built from the kernel (``layout`` below). Either way,
    under ``jax.vmap`` over per-client kernels this is one batched matmul across
    clients, where XLA would emit a grouped convolution. Gradients are those of
    slices, a concatenation and matmuls (pads and matmuls).

    ``lhs``, ``rhs``, ``window_strides``, ``padding``, ``lhs_dilation``,
    ``rhs_dilation``, ``dimension_numbers``, ``feature_group_count``,
    ``batch_group_count``, ``precision`` and ``preferred_element_type`` are as in
    ``lax.conv_general_dilated``.

    Args:
      impl: ``"auto"`` (the matmul form on CPU, XLA's convolution on GPU/TPU),
        ``"matmul"`` (always the matmul form) or ``"xla"`` (always XLA's).
        Configurations outside :func:`supports_conv` always use XLA.
      layout: how the matmul form lays the convolution out (a performance
        choice; same result up to float reassociation):

        * ``"banded"``: the input's rows (all spatial dims but the last,
          unfolded by the kernel) times a banded weight matrix that slides the
          kernel along the last spatial dim:
          ``[N, *out[:-1], K'*W*C] @ [K'*W*C, out[-1]*O]``. The unfolded input
          is ``K'`` times the input instead of ``prod(kernel)`` times, at the
          price of ``W / kernel[-1]`` times the multiplications. Fastest for
          small images and few channels (LeNet: 2x the im2col round on CPU).
        * ``"channels_last"``: im2col, patches ``[N, *out, K*C] @ W``.
        * ``"channels_first"``: im2col, ``W^T @`` patches ``[K*C, N, *out]``.
        * ``"auto"``: ``"banded"`` where :func:`banded_pays`, else
          ``"channels_last"``.
      input_grad: a performance hint, ``False`` when no gradient with respect
        to ``lhs`` will be taken (a first layer on data): the banded form may
        then use narrower tiles (:func:`band_tile`). Results and gradients are
        the same either way. :func:`fljax.fast.accelerate` sets it.

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
    check_layout(layout)
    if not use_matmul(impl):
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
    strides = tuple(window_strides)
    x, w, rd, out_sp = _channels_last_padded(lhs, rhs, strides, padding, rhs_dilation, dn)
    if layout == "channels_first":
        y = _conv_matmul_channels_first(x, w, strides, rd, out_sp, precision, preferred_element_type)
        return _to_out_spec(y, dn)
    if layout in ("auto", "banded"):
        nsp = w.ndim - 2
        kw, cin, cout = w.shape[nsp - 1], w.shape[-2], w.shape[-1]
        rows_factor = int(np.prod(w.shape[: nsp - 1])) * cin
        tile = band_tile(out_sp[-1], kw, strides[-1], rd[-1], rows_factor, cout, input_grad=input_grad)
        if layout == "banded" or _band_pays(tile, kw, strides[-1], rd[-1], rows_factor, cout):
            y = _conv_matmul_banded(x, w, strides, rd, out_sp, tile, precision, preferred_element_type)
            return _to_out_spec(y, dn)
    y = _conv_matmul_channels_last(x, w, strides, rd, out_sp, precision, preferred_element_type)
    return _to_out_spec(y, dn)


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
    impl: Impl = "auto",
) -> jax.Array:
    """Drop-in for ``flax.linen.max_pool`` (inputs ``[..., *spatial, features]``).

    Non-overlapping, unpadded windows are computed as pairwise maxima of strided
    slices (elementwise work, with an elementwise gradient); other
    configurations use ``flax.linen.max_pool``. ``inputs``, ``window_shape``,
    ``strides`` and ``padding`` are as in ``flax.linen.max_pool``.

    Args:
      impl: ``"auto"`` (pairwise maxima on CPU, ``flax.linen.max_pool`` on
        GPU/TPU), ``"matmul"`` (always pairwise maxima) or ``"xla"`` (always
        ``flax.linen.max_pool``).
    """
    window_shape = tuple(window_shape)
    if not use_matmul(impl) or not supports_pool(window_shape, strides, padding):
        return nn.max_pool(inputs, window_shape, strides=strides, padding=padding)
    if inputs.ndim < len(window_shape) + 1:
        raise ValueError(f"max_pool needs inputs [..., *spatial, features], got {inputs.shape}")
    first = inputs.ndim - 1 - len(window_shape)
    return window_max(inputs, (1,) * first + window_shape + (1,))


class _ConvFn(NamedTuple):
    """:func:`conv_general_dilated` with its keyword choices bound (compares by value)."""

    impl: str
    layout: str
    input_grad: bool

    def __call__(self, *args, **kwargs) -> jax.Array:
        return conv_general_dilated(
            *args, **kwargs, impl=self.impl, layout=self.layout, input_grad=self.input_grad
        )


class Conv(nn.Conv):
    """``flax.linen.Conv`` whose convolution is :func:`conv_general_dilated` (same params and init).

    Attributes:
      impl: ``"auto"``, ``"matmul"`` or ``"xla"``, as in :func:`conv_general_dilated`.
      layout: ``"auto"``, ``"banded"``, ``"channels_last"`` or ``"channels_first"``,
        as in :func:`conv_general_dilated`.
      input_grad: performance hint, as in :func:`conv_general_dilated`: ``False``
        for a layer whose input is data (no gradient is usually taken with respect
        to it). Results and gradients are the same either way.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from fljax import nn
      >>> x = jnp.ones((2, 8, 8, 3))
      >>> conv = nn.Conv(6, (5, 5), padding="VALID", impl="matmul")
      >>> params = conv.init(jax.random.key(0), x)
      >>> y = jax.jit(conv.apply)(params, x)
      >>> y.shape
      (2, 4, 4, 6)
      >>> y_xla = nn.Conv(6, (5, 5), padding="VALID", impl="xla").apply(params, x)  # same params
      >>> bool(jnp.allclose(y, y_xla, atol=1e-5))
      True
    """

    impl: Impl = "auto"
    layout: Layout = "auto"
    input_grad: bool = True

    def __post_init__(self) -> None:
        check_impl(self.impl)
        check_layout(self.layout)
        # flax.linen.Conv convolves with ``self.conv_general_dilated`` when it is set;
        # bound here from the fields on every construction, so clones stay in step.
        object.__setattr__(self, "conv_general_dilated", _ConvFn(self.impl, self.layout, self.input_grad))
        super().__post_init__()
