"""Compression in a round: client-update wrappers that simulate the wire and count its bytes.

:func:`compressed` wraps any client update: the client encodes its delta and
the round aggregates the DECODED value, exactly what a server would rebuild
from the bytes it received. :func:`error_feedback` does the same with a
residual kept as client state (:class:`~fljax.base.StatefulClientUpdate`):
what the compressor dropped is added to the next round's delta before
encoding (Stich et al. 2018; Karimireddy et al. 2019, EF-SGD).

Both wrappers add two client metrics, float32 scalars:

* ``upload_bytes``: bytes of the client's encoded upload
  (:attr:`~fljax.compression.compressors.Compressor.num_bytes`; 0 for a client
  with weight 0, which sends nothing);
* ``download_bytes``: bytes of what the server broadcast, as stored (the
  float32 model; SCAFFOLD's broadcast counts its control variate too).

The round turns them into ``client_upload_bytes_weighted_mean`` and
``client_download_bytes_weighted_mean``: every participating client sends the
same number of bytes (the formats have a fixed size), so the weighted mean is
the per-client count, and the round's total upload is
``client_upload_bytes_weighted_mean * num_clients`` (``num_clients``: the
participating clients, reported by :func:`fljax.aggregators.weighted_sum` and
the aggregators built on it). The metrics are float32 (exact below ``2**24``
bytes per client, rounded to float32 above); the exact integers come from
:func:`fljax.compression.compressors.upload_bytes` and
:func:`~fljax.compression.compressors.download_bytes` on the host.

Non-finite deltas are passed on uncompressed, so the aggregator drops the
client as it would without compression (and :func:`error_feedback` keeps the
old residual).

Composition with secure aggregation. Masking (:mod:`fljax.secagg`) sums
integers modulo ``m``, so what it can add must be integers on a scale shared
by all clients. The codes of :func:`~fljax.compression.compressors.qsgd` and
:func:`~fljax.compression.compressors.rotated_quantization` are integers, but
each client scales them by its own norm (QSGD) or its own minimum and maximum
(rotation): the sum of decoded values is not a function of the sum of codes.
What the maths allows: with a range fixed in advance (clip every client to L2
norm ``C``; QSGD with the scale ``C`` in place of the client's norm, or the
rotated quantizer with the fixed range ``[-C, C]`` in place of ``[min, max]``)
the decoded value is ``scale * code + offset`` with scale and offset shared,
so ``sum_i w_i x_hat_i`` is recovered from ``sum_i w_i code_i`` when the
weights are integers, and no sum wraps around when ``m > 2 n w_max s`` (``n``
clients, ``s`` levels, or ``2**k - 1`` for ``k`` bits); the rotation seed must
then be shared by all clients too (a public per-round key). Top-k does not
compose with masking: each client sends different indices, and a masked sum
needs the same dense vector layout from everyone (a random-``k`` mask from a
shared seed would). What fljax composes today: the
round hands the DECODED deltas to the aggregator, so
:func:`fljax.secagg.secure_sum` clips, fixed-point encodes and masks them like
any delta. That is valid with every compressor here, but the masked vector
is dense and as long as the model: the bytes reported are those of the
compressed format, not of a masked upload.

Composition with DP. Central DP (:func:`fljax.privacy.dp`) clips each
client's DECODED delta, so the sensitivity (``clip_norm``, unit of privacy: one
client, add/remove neighbouring relation) holds whatever the compressor did:
compression runs before the mechanism, on the client's own data, and the
clipping bounds what leaves. Error feedback does not change that either: the
residual is the client's own state and only ever enters that client's own,
clipped, uploads. Unbiased quantization adds variance on top of the DP noise;
quantizing after noise (local or distributed DP, where the client adds noise)
is post-processing and costs no privacy, but the distributed discrete
Gaussian (:func:`fljax.privacy.distributed_dp`) already sends integers in its
own ring and is not meant to be wrapped by these compressors.

References:
  Stich, Cordonnier, Jaggi. "Sparsified SGD with Memory". NeurIPS 2018.
  Karimireddy, Rebjock, Stich, Jaggi. "Error Feedback Fixes SignSGD and other
  Gradient Compression Schemes". ICML 2019.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from fljax import client
from fljax.base import ClientData, ClientOutput, ClientUpdate, Params, Performance, StatefulClientUpdate
from fljax.compression import compressors as compressors_lib
from fljax.compression.compressors import Compressor


def _configure(fn, performance: Performance):
    configure = getattr(fn, "with_performance", None)
    return configure(performance) if configure is not None else fn


def _check(compressor) -> None:
    if not isinstance(compressor, Compressor):
        raise TypeError(f"compressor must be a fljax.compression.Compressor, got {type(compressor).__name__}")


def _metrics(out: ClientOutput, compressor: Compressor, dim: int, server_params) -> dict:
    sent = jnp.where(out.weight > 0, jnp.float32(compressor.num_bytes(dim)), jnp.float32(0.0))
    down = jnp.float32(compressors_lib.download_bytes(server_params))
    return dict(out.metrics, upload_bytes=sent, download_bytes=down)


def _send(compressor: Compressor, flat: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(decoded, finite)``: the decoded upload, and whether ``flat`` was finite."""
    payload = compressor.encode(flat, key)
    decoded = compressor.decode(payload, flat.shape[0])
    return decoded, jnp.all(jnp.isfinite(flat))


def compressed(client_update: ClientUpdate | StatefulClientUpdate, compressor: Compressor):
    """``client_update`` whose delta goes through ``compressor`` (encode, then decode).

    The client's key is split in two: one for ``client_update``, one for the
    encoder. The returned update keeps ``client_update``'s kind: a plain
    client update stays plain, a :class:`~fljax.base.StatefulClientUpdate`
    stays stateful with the same state; performance settings pass through.

    Args:
      client_update: any client update (e.g. :func:`fljax.client.local_sgd`).
      compressor: e.g. :func:`fljax.compression.compressors.qsgd`.

    Returns:
      The wrapped update; its metrics gain ``upload_bytes`` and
      ``download_bytes`` (see the module docstring).

    Examples:
      >>> import jax, numpy as np, optax
      >>> from fljax import client, models
      >>> from fljax.algorithms import fedavg
      >>> from fljax.compression import compressors
      >>> from fljax.data import FederatedData
      >>> rng = np.random.default_rng(0)
      >>> data = FederatedData.from_clients(
      ...     [(rng.normal(size=(6, 4)).astype(np.float32), rng.integers(0, 3, 6).astype(np.int32))] * 2,
      ...     num_classes=3,
      ... )
      >>> model = models.MLP(hidden=(8,), num_classes=3)
      >>> local = client.local_sgd(model, optax.sgd(0.1), batch_size=3)
      >>> algo = fedavg.fedavg(compressed(local, compressors.qsgd(4)))
      >>> params = models.init_params(model, (4,), jax.random.key(0))
      >>> state, metrics = jax.jit(algo.update)(algo.init(params), data.cohort([0, 1]), jax.random.key(1))
      >>> up = compressors.upload_bytes(compressors.qsgd(4), params)
      >>> float(metrics["client_upload_bytes_weighted_mean"]) == up, int(metrics["num_clients"])
      (True, 2)
    """
    _check(compressor)
    if isinstance(client_update, StatefulClientUpdate):
        inner = client_update.update

        def build_stateful(performance: Performance):
            fn = _configure(inner, performance)

            def update(server_params, client_state, data: ClientData, key: jax.Array):
                key_update, key_encode = jax.random.split(key)
                new_state, out = fn(server_params, client_state, data, key_update)
                return new_state, _wrap_output(out, compressor, server_params, key_encode)

            return update

        return StatefulClientUpdate(client_update.init, client.Configurable(build_stateful))

    def build(performance: Performance):
        fn = _configure(client_update, performance)

        def update(server_params: Params, data: ClientData, key: jax.Array) -> ClientOutput:
            key_update, key_encode = jax.random.split(key)
            return _wrap_output(fn(server_params, data, key_update), compressor, server_params, key_encode)

        return update

    return client.Configurable(build)


def _wrap_output(out: ClientOutput, compressor: Compressor, server_params, key: jax.Array) -> ClientOutput:
    flat, unravel = ravel_pytree(out.delta)
    decoded, finite = _send(compressor, flat, key)
    sent = jnp.where(finite, decoded, flat.astype(decoded.dtype))
    metrics = _metrics(out, compressor, flat.shape[0], server_params)
    return ClientOutput(unravel(sent.astype(flat.dtype)), out.weight, metrics)


def error_feedback(client_update: ClientUpdate, compressor: Compressor) -> StatefulClientUpdate:
    """``client_update`` compressed with error feedback: the residual is client state.

    Round ``t`` of a client with residual ``e_t`` (zeros at first) and local
    delta ``delta_t``: it encodes ``c_t = e_t + delta_t``, the round aggregates
    ``sent_t = decode(encode(c_t))`` and the client keeps ``e_{t+1} = c_t -
    sent_t`` (exactly, in float32: for :func:`~fljax.compression.compressors.top_k`
    the kept coordinates of ``e_{t+1}`` are exactly 0 and the others exactly
    ``c_t``). A client with weight 0 (no data) sends nothing and keeps ``e_t``;
    a non-finite ``c_t`` is passed on (the aggregator drops it) and ``e_t`` is
    kept. Keep the residuals with the population in
    :class:`fljax.data.ClientStates` (``ClientStates(update.init(params), n)``).

    Args:
      client_update: a plain (stateless) client update.
      compressor: typically :func:`~fljax.compression.compressors.top_k`; any
        compressor works.

    Returns:
      A :class:`~fljax.base.StatefulClientUpdate` whose state is the residual
      (shaped like the params, float32 leaves as the delta's); metrics gain
      ``upload_bytes`` and ``download_bytes``.

    References:
      Stich, Cordonnier, Jaggi. "Sparsified SGD with Memory". NeurIPS 2018.
      Karimireddy, Rebjock, Stich, Jaggi. "Error Feedback Fixes SignSGD and
      other Gradient Compression Schemes". ICML 2019.
    """
    _check(compressor)
    if isinstance(client_update, StatefulClientUpdate):
        raise TypeError("error_feedback wraps a stateless client update; got a StatefulClientUpdate")

    def init(params: Params):
        return jax.tree.map(jnp.zeros_like, params)

    def build(performance: Performance):
        fn = _configure(client_update, performance)

        def update(server_params: Params, residual, data: ClientData, key: jax.Array):
            key_update, key_encode = jax.random.split(key)
            out = fn(server_params, data, key_update)
            flat, unravel = ravel_pytree(out.delta)
            res, unravel_res = ravel_pytree(residual)
            corrected = res + flat
            decoded, finite = _send(compressor, corrected, key_encode)
            decoded = decoded.astype(corrected.dtype)
            keep = finite & (out.weight > 0)
            new_res = jnp.where(keep, corrected - decoded, res)
            sent = jnp.where(finite, decoded, corrected)
            metrics = _metrics(out, compressor, flat.shape[0], server_params)
            return unravel_res(new_res), ClientOutput(unravel(sent), out.weight, metrics)

        return update

    return StatefulClientUpdate(init, client.Configurable(build))
