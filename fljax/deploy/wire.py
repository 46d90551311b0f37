"""What deployed parties send each other: named arrays packed as ``.npz`` bytes, checked on arrival.

Every request and reply between the server, a SuperNode's ClientApp and the node's runtime is
one ``bytes`` object: a dict of named numpy arrays written with :func:`numpy.savez` and read
back with ``allow_pickle=False`` (no code runs on load). ``bytes`` values travel as ``uint8``
arrays, strings as unicode arrays. :func:`unpack` refuses a message over its size limit before
parsing it, and anything that does not parse, as one :class:`MalformedMessage` or
:class:`OversizedMessage`; :func:`arrays_to_tree` refuses leaves of another shape or dtype than
the model's (:class:`ShapeMismatch`). The server catches all three (they are ``ValueError``),
drops the sender for the round and records why.
"""

from __future__ import annotations

import io
import zipfile

import jax
import numpy as np

MAX_MESSAGE_BYTES = 64 * 2**20
"""Default size limit of one message (64 MiB)."""

_BYTES, _STR = "b:", "s:"


class MalformedMessage(ValueError):
    """Bytes that do not parse as a message, or a message without an expected field."""


class OversizedMessage(ValueError):
    """A message longer than the receiver's limit (refused before it is parsed)."""


class ShapeMismatch(ValueError):
    """Arrays whose number, shapes or dtypes differ from the model's."""


def pack(fields: dict) -> bytes:
    """``fields`` (name -> array, number, bool, ``bytes`` or ``str``) as ``.npz`` bytes.

    Examples:
      >>> import numpy as np
      >>> msg = unpack(pack({"op": "train", "w": np.arange(3.0), "blob": b"ab"}))
      >>> msg["op"], msg["w"].tolist(), msg["blob"]
      ('train', [0.0, 1.0, 2.0], b'ab')
    """
    arrays = {}
    for name, value in fields.items():
        if isinstance(value, bytes | bytearray):
            arrays[_BYTES + name] = np.frombuffer(bytes(value), np.uint8)
        elif isinstance(value, str):
            arrays[_STR + name] = np.array(value)
        else:
            arrays[name] = np.asarray(value)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def unpack(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> dict:
    """The fields of a message made by :func:`pack`.

    Raises:
      OversizedMessage: ``len(data) > max_bytes`` (nothing is parsed).
      MalformedMessage: bytes that are not such a message (truncated, corrupt, pickled objects).

    Examples:
      >>> unpack(b"not a message")
      Traceback (most recent call last):
      ...
      fljax.deploy.wire.MalformedMessage: malformed message (13 bytes): not an .npz archive of arrays
    """
    if not isinstance(data, bytes | bytearray):
        raise MalformedMessage(f"malformed message: expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise OversizedMessage(f"oversized message: {len(data)} bytes > limit {max_bytes}")
    try:
        with np.load(io.BytesIO(bytes(data)), allow_pickle=False) as archive:
            raw = {name: archive[name] for name in archive.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        del e
        raise MalformedMessage(
            f"malformed message ({len(data)} bytes): not an .npz archive of arrays"
        ) from None
    out = {}
    for name, value in raw.items():
        if name.startswith(_BYTES):
            out[name[len(_BYTES) :]] = value.tobytes()
        elif name.startswith(_STR):
            out[name[len(_STR) :]] = str(value)
        else:
            out[name] = value
    return out


def field(message: dict, name: str):
    """``message[name]``, or :class:`MalformedMessage` naming the missing field."""
    if name not in message:
        raise MalformedMessage(f"malformed message: no field {name!r} (has {sorted(message)})")
    return message[name]


def tree_to_arrays(tree, prefix: str) -> dict:
    """The leaves of ``tree`` as fields ``{prefix}0, {prefix}1, ...`` (numpy, in tree order)."""
    return {f"{prefix}{i}": np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(tree))}


def arrays_to_tree(message: dict, prefix: str, template):
    """The tree shaped like ``template`` from fields ``{prefix}0, ...``, each checked.

    Raises:
      ShapeMismatch: a missing or extra leaf, or a leaf of another shape or dtype than the
        template's.

    Examples:
      >>> import numpy as np
      >>> template = {"w": np.zeros((2, 3), np.float32)}
      >>> arrays_to_tree({"d0": np.zeros((3, 2), np.float32)}, "d", template)
      Traceback (most recent call last):
      ...
      fljax.deploy.wire.ShapeMismatch: leaf 0 ('w'): shape (3, 2) float32, expected (2, 3) float32
    """
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    names = {k for k in message if k.startswith(prefix) and k[len(prefix) :].isdigit()}
    if len(names) != len(paths):
        raise ShapeMismatch(f"{len(names)} arrays {prefix}*, expected {len(paths)} (the model's leaves)")
    leaves = []
    for i, (path, ref) in enumerate(paths):
        got = message.get(f"{prefix}{i}")
        if got is None:
            raise ShapeMismatch(f"leaf {i} missing")
        ref = np.asarray(ref) if not hasattr(ref, "dtype") else ref
        if got.shape != tuple(ref.shape) or got.dtype != np.dtype(ref.dtype):
            where = jax.tree_util.keystr(path, simple=True, separator="/")
            raise ShapeMismatch(
                f"leaf {i} ({where!r}): shape {got.shape} {got.dtype}, "
                f"expected {tuple(ref.shape)} {np.dtype(ref.dtype)}"
            )
        leaves.append(got)
    return jax.tree.unflatten(treedef, leaves)
