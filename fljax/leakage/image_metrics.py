"""Image similarity for reconstructions: PSNR, SSIM and order-free matching of a batch.

Images are ``[..., height, width, channels]`` arrays with pixel values in
``[0, data_range]``; every metric reduces the last three axes, so a batch
``[batch, H, W, C]`` gives ``[batch]`` values.

* PSNR: ``10 log10(data_range^2 / MSE)`` in dB (``inf`` for identical images).
* SSIM (Wang et al. 2004): local means, variances and covariance under an
  ``11 x 11`` Gaussian window of std 1.5, computed per channel on the windows
  that fit inside the image (no padding), combined as
  ``(2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))``
  with ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2`` (``L = data_range``), averaged
  over positions and channels. It is 1 for identical images and symmetric.
* :func:`match`: a batch reconstruction has no order (the gradient of a batch
  mean is invariant to permuting the batch), so reconstructed images are
  paired with true ones by the assignment that maximises the total PSNR
  (``scipy.optimize.linear_sum_assignment``).

References:
  Wang, Bovik, Sheikh, Simoncelli. "Image Quality Assessment: From Error
  Visibility to Structural Similarity". IEEE Trans. Image Processing 2004.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def _check_pair(x, y, what: str) -> tuple[jax.Array, jax.Array]:
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    if x.shape != y.shape:
        raise ValueError(f"{what}: images must have the same shape, got {x.shape} and {y.shape}")
    if x.ndim < 3:
        raise ValueError(f"{what}: images must be [..., height, width, channels], got shape {x.shape}")
    return x, y


def psnr(x: jax.Array, y: jax.Array, data_range: float = 1.0) -> jax.Array:
    """Peak signal-to-noise ratio in dB over the last three axes (``inf`` when ``x == y``).

    Args:
      x: images ``[..., H, W, C]``, pixels in ``[0, data_range]``.
      y: images of the same shape.
      data_range: the pixel range ``L``.

    Returns:
      ``10 log10(L^2 / mean((x - y)^2))``, shaped like the leading axes.

    Examples:
      >>> import numpy as np
      >>> x = np.full((4, 4, 1), 0.5, np.float32)
      >>> round(float(psnr(x, x + 0.1)), 3)  # MSE 0.01: 20 dB
      20.0
    """
    x, y = _check_pair(x, y, "psnr")
    if not data_range > 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    mse = jnp.mean((x - y) ** 2, axis=(-3, -2, -1))
    return 10.0 * jnp.log10(jnp.float32(data_range) ** 2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """The normalised 1-D Gaussian window ``[size]`` (the 2-D window is its outer product)."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"window size must be a positive odd integer, got {size}")
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    r = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(r**2) / (2 * sigma**2))
    return (g / g.sum()).astype(np.float32)


def _filter(a: jax.Array, g: np.ndarray) -> jax.Array:
    """Separable 'valid' filtering of ``a[..., H, W, C]`` by the window ``g`` along H and W."""
    k = g.shape[0]
    h, w = a.shape[-3] - k + 1, a.shape[-2] - k + 1
    rows = sum(float(g[i]) * a[..., i : i + h, :, :] for i in range(k))
    return sum(float(g[j]) * rows[..., :, j : j + w, :] for j in range(k))


def ssim(
    x: jax.Array, y: jax.Array, data_range: float = 1.0, *, window_size: int = 11, sigma: float = 1.5
) -> jax.Array:
    """Structural similarity (Wang et al. 2004), Gaussian window, per channel, over the last three axes.

    Args:
      x: images ``[..., H, W, C]`` with ``H, W >= window_size``.
      y: images of the same shape.
      data_range: the pixel range ``L``.
      window_size: odd side of the Gaussian window (11 in the paper).
      sigma: the window's standard deviation (1.5 in the paper).

    Returns:
      The mean SSIM over window positions and channels, shaped like the leading axes.

    Examples:
      >>> import numpy as np
      >>> x = np.random.default_rng(0).uniform(size=(16, 16, 3)).astype(np.float32)
      >>> round(float(ssim(x, x)), 6)
      1.0
    """
    x, y = _check_pair(x, y, "ssim")
    if not data_range > 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    g = gaussian_window(window_size, sigma)
    if x.shape[-3] < window_size or x.shape[-2] < window_size:
        raise ValueError(
            f"ssim: images of {x.shape[-3]}x{x.shape[-2]} pixels are smaller than the "
            f"{window_size}x{window_size} window; pass a smaller window_size"
        )
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    mu_x, mu_y = _filter(x, g), _filter(y, g)
    var_x = _filter(x * x, g) - mu_x**2
    var_y = _filter(y * y, g) - mu_y**2
    cov = _filter(x * y, g) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return jnp.mean(num / den, axis=(-3, -2, -1))


class Match(NamedTuple):
    """Reconstructions paired with true images (:func:`match`).

    Attributes:
      order: ``[batch]`` int: reconstruction ``order[i]`` is paired with true image ``i``.
      psnr: ``[batch]`` PSNR of each pair (dB).
      ssim: ``[batch]`` SSIM of each pair.
    """

    order: np.ndarray
    psnr: np.ndarray
    ssim: np.ndarray


def match(reconstructed, true, data_range: float = 1.0, *, window_size: int = 11) -> Match:
    """Pair a batch of reconstructions with the true images by the PSNR-maximising assignment.

    The gradient of a batch mean does not depend on the order of the batch, so
    a reconstruction is only defined up to a permutation. The pairing solves
    the assignment problem on the ``[batch, batch]`` PSNR matrix (infinite
    entries, exact copies, are capped at 1000 dB for the solver).

    Args:
      reconstructed: ``[batch, H, W, C]``.
      true: ``[batch, H, W, C]``, same shape.
      data_range: the pixel range.
      window_size: SSIM window (reduce it for images smaller than 11 pixels).

    Returns:
      A :class:`Match`; permuting ``reconstructed`` changes ``order`` but not
      the paired ``psnr`` and ``ssim``.

    Examples:
      >>> import numpy as np
      >>> rng = np.random.default_rng(0)
      >>> true = rng.uniform(size=(3, 16, 16, 1)).astype(np.float32)
      >>> m = match(true[[2, 0, 1]], true)
      >>> m.order.tolist(), bool(np.all(np.isinf(m.psnr)))
      ([1, 2, 0], True)
    """
    from scipy.optimize import linear_sum_assignment

    reconstructed = np.asarray(reconstructed, np.float32)
    true = np.asarray(true, np.float32)
    if reconstructed.shape != true.shape or reconstructed.ndim != 4:
        raise ValueError(
            "match: reconstructed and true must both be [batch, H, W, C] of the same shape, got "
            f"{reconstructed.shape} and {true.shape}"
        )
    shape = (true.shape[0],) + true.shape
    pair = np.asarray(  # [true, recon]
        psnr(np.broadcast_to(true[:, None], shape), np.broadcast_to(reconstructed[None], shape), data_range)
    )
    rows, cols = linear_sum_assignment(np.minimum(pair, 1000.0), maximize=True)
    order = cols[np.argsort(rows)]
    paired = reconstructed[order]
    return Match(
        order=order,
        psnr=pair[np.arange(true.shape[0]), order],
        ssim=np.asarray(ssim(paired, true, data_range, window_size=window_size)),
    )
