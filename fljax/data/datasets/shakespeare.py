"""Federated Shakespeare (TFF's version of LEAF's): one client per speaking role.

715 clients (``PLAY_CHARACTER``), 16,068 train / 2,356 test snippets. Local
files in folder ``shakespeare_tff``: TFF's ``shakespeare_train.h5`` /
``shakespeare_test.h5`` (layout ``/examples/<client_id>/snippets``, UTF-8
bytes; read with h5py), or ``shakespeare_tff.json.gz``
(``{"train": {client_id: [snippet, ...]}, "test": {...}}``), used when h5py is
not installed or the h5 files are absent.

Preprocessing follows TFF's next-character prediction task
(``tff.simulation.baselines.shakespeare``): the 86-character vocabulary
:data:`CHAR_VOCAB` maps to ids 1..86, ``0`` is padding, ``87`` out of
vocabulary, ``88`` beginning and ``89`` end of snippet (:data:`VOCAB_SIZE` =
90). Each snippet's UTF-8 bytes become ``[BOS] + ids + [EOS]``, zero-padded to a
multiple of ``sequence_length + 1`` and cut into chunks of that length; a chunk
is one example: ``x = chunk[:-1]``, ``y = chunk[1:]`` (both ``[sequence_length]``
int32). Targets equal to :data:`PAD` are padding and should be masked in the loss.

References:
  Caldas et al. "LEAF: A Benchmark for Federated Settings". 2018.
  McMahan et al. "Communication-Efficient Learning of Deep Networks from
  Decentralized Data". AISTATS 2017 (sequence length 80).
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Sequence

import numpy as np

from fljax.data.datasets import paths
from fljax.data.federated import FederatedData

CHAR_VOCAB = list("dhlptx@DHLPTX $(,048cgkoswCGKOSW[_#'/37;?bfjnrvzBFJNRVZ\"&*.26:\naeimquyAEIMQUY]!%)-159\r")
PAD = 0
OOV = len(CHAR_VOCAB) + 1
BOS = len(CHAR_VOCAB) + 2
EOS = len(CHAR_VOCAB) + 3
VOCAB_SIZE = len(CHAR_VOCAB) + 4
SEQUENCE_LENGTH = 80
NUM_CLIENTS = 715

_BYTE_TO_ID = np.full(256, OOV, np.int32)
for _i, _c in enumerate(CHAR_VOCAB):
    _BYTE_TO_ID[ord(_c)] = _i + 1


def tokenize(snippet: bytes | str, sequence_length: int = SEQUENCE_LENGTH) -> np.ndarray:
    """One snippet as ``[num_chunks, sequence_length + 1]`` int32 token chunks (TFF's rule)."""
    raw = snippet.encode("utf-8") if isinstance(snippet, str) else bytes(snippet)
    ids = _BYTE_TO_ID[np.frombuffer(raw, np.uint8)]
    tokens = np.concatenate([[BOS], ids, [EOS]]).astype(np.int32)
    split = sequence_length + 1
    pad = (-len(tokens)) % split
    return np.concatenate([tokens, np.zeros(pad, np.int32)]).reshape(-1, split)


def detokenize(tokens: np.ndarray) -> str:
    """Token ids back to text (special tokens dropped)."""
    return "".join(CHAR_VOCAB[t - 1] for t in np.asarray(tokens).ravel() if 1 <= t <= len(CHAR_VOCAB))


def read_snippets(
    split: str = "train", *, data_dir: str | os.PathLike | None = None
) -> dict[str, list[bytes]]:
    """``{client_id: [snippet bytes, ...]}`` for one split, from h5 or json.gz."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = paths.find("shakespeare_tff", [f"shakespeare_{split}.h5|shakespeare_tff.json.gz"], data_dir)
    h5 = folder / f"shakespeare_{split}.h5"
    try:
        import h5py
    except ImportError:
        h5py = None
    if h5.is_file() and h5py is not None:
        with h5py.File(h5, "r") as f:
            if "examples" not in f:
                raise ValueError(f"{h5}: expected TFF's layout /examples/<client_id>/snippets")
            return {cid: [bytes(s) for s in grp["snippets"][()]] for cid, grp in f["examples"].items()}
    js = folder / "shakespeare_tff.json.gz"
    if not js.is_file():
        raise FileNotFoundError(
            f"{h5} needs h5py (pip install h5py), or put shakespeare_tff.json.gz in {folder}"
        )
    with gzip.open(js, "rt", encoding="utf-8") as f:
        data = json.load(f)
    return {cid: [s.encode("utf-8") for s in snippets] for cid, snippets in data[split].items()}


def from_snippets(
    snippets: dict[str, Sequence[bytes | str]], *, sequence_length: int = SEQUENCE_LENGTH
) -> FederatedData:
    """A population from ``{client_id: snippets}``, clients in sorted id order."""
    clients, names = [], []
    for cid in sorted(snippets):
        chunks = [tokenize(s, sequence_length) for s in snippets[cid]]
        seq = np.concatenate(chunks) if chunks else np.zeros((0, sequence_length + 1), np.int32)
        clients.append((seq[:, :-1], seq[:, 1:]))
        names.append(cid)
    return FederatedData.from_clients(clients, client_names=names, num_classes=VOCAB_SIZE)


def load(
    split: str = "train",
    *,
    data_dir: str | os.PathLike | None = None,
    sequence_length: int = SEQUENCE_LENGTH,
) -> FederatedData:
    """Federated Shakespeare as a population of 715 speaking roles.

    Args:
      split: ``"train"`` (16,068 snippets) or ``"test"`` (2,356 snippets).
      data_dir: folder with the files (default: see :mod:`fljax.data.datasets.paths`).
      sequence_length: characters per example (80, as TFF).

    Returns:
      :class:`FederatedData` with ``x``, ``y`` int32 ``[N, sequence_length]``,
      ``num_classes = VOCAB_SIZE`` and the role names as ``client_names``.
    """
    return from_snippets(read_snippets(split, data_dir=data_dir), sequence_length=sequence_length)
