"""Fast layers for vmapped cohorts: convolution and max-pooling as matmuls and maxima.

On XLA:CPU a convolution is slow, and a convolution vmapped over per-client
weights (every client of a cohort holds its own model) becomes a grouped
convolution, slower still. The same convolution written as *im2col from shifted
slices plus one matmul* vmaps into one batched matmul across clients, which
XLA:CPU runs near its matmul speed. Likewise the backward pass of
``lax.reduce_window`` max-pooling (``select_and_scatter``) is slow on CPU, while a
non-overlapping pool written as pairwise maxima of strided slices is elementwise.

* :func:`conv_general_dilated`: drop-in for ``lax.conv_general_dilated``.
* :func:`max_pool`: drop-in for ``flax.linen.max_pool``.
* :class:`Conv`: ``flax.linen.Conv`` using :func:`conv_general_dilated` (same params).
* :func:`fljax.fast.accelerate` rewrites any ``apply(params, x)`` (flax, or plain
  JAX) so that its ``conv_general_dilated`` and ``reduce_window`` max operations use
  these forms: ordinary models need no rewrite, and :func:`fljax.client.local_sgd`
  applies it by default.

Both functions compute the same values and gradients as the XLA operations they
replace (up to float reassociation; max-pool ties go to the first maximum in
the window, as ``select_and_scatter`` does). Configurations they do not cover
(grouped or input-dilated convolutions, overlapping or padded pools) fall back
to the XLA operation.

The choices are arguments, never module state: ``impl="auto"`` (the default)
uses the matmul form on CPU and XLA's own operations on GPU/TPU, ``"matmul"``
and ``"xla"`` force one; ``layout`` picks the matmul form's layout (default
``"auto"``). :class:`Conv` takes them as fields, :func:`fljax.fast.accelerate`
as keywords, and the reference models in :mod:`fljax.models` as
``conv_impl``/``conv_layout``.
"""

from fljax.nn.layers import (
    IMPLS,
    LAYOUTS,
    Conv,
    Impl,
    Layout,
    band_tile,
    banded_pays,
    conv_general_dilated,
    max_pool,
    supports_conv,
    supports_pool,
)

__all__ = [
    "IMPLS",
    "LAYOUTS",
    "Conv",
    "Impl",
    "Layout",
    "band_tile",
    "banded_pays",
    "conv_general_dilated",
    "max_pool",
    "supports_conv",
    "supports_pool",
]
