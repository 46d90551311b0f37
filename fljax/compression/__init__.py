"""Compression of client uploads, with the bytes they occupy on the wire.

* :mod:`fljax.compression.compressors`: :class:`Compressor` encode/decode
  pairs for one client's flat delta (:func:`qsgd`, :func:`rotated_quantization`,
  :func:`top_k`, :func:`identity`), their exact byte counts and real byte
  formats (``pack`` / ``unpack``);
* :mod:`fljax.compression.rounds`: :func:`compressed` and
  :func:`error_feedback` plug a compressor into any round; every round then
  reports ``client_upload_bytes_weighted_mean`` and
  ``client_download_bytes_weighted_mean``.

The study ``experiments/compression.py`` (results in
``experiments/results/compression.md``) trades accuracy against megabytes
uploaded on MNIST.
"""

from fljax.compression import compressors, rounds
from fljax.compression.compressors import (
    Compressor,
    download_bytes,
    identity,
    qsgd,
    rotated_quantization,
    top_k,
    upload_bytes,
)
from fljax.compression.rounds import compressed, error_feedback

__all__ = [
    "Compressor",
    "compressed",
    "compressors",
    "download_bytes",
    "error_feedback",
    "identity",
    "qsgd",
    "rotated_quantization",
    "rounds",
    "top_k",
    "upload_bytes",
]
