"""Checkpoints of fljax state with orbax's ``CheckpointManager``.

A checkpoint of round ``step`` is the folder ``<directory>/round_<step:06d>``
holding three orbax items: ``state`` (the state pytree, e.g.
:class:`~fljax.base.ServerState`), ``extra`` (a small JSON document of host
facts: round, privacy spent) and ``digest`` (the SHA-256 of the state's leaves).
No key is ever stored: round keys are re-derived with
:func:`fljax.random.round_key`, so a run resumed from a checkpoint draws the
same randomness as an uninterrupted one.

Crash safety:

- a save is atomic: orbax writes into ``round_<step>.orbax-checkpoint-tmp`` and
  renames it when complete, so a process killed during a save leaves no
  checkpoint of that round (only a temporary folder that is ignored and
  replaced by the next save of the round) and never blocks a later resume;
- only the newest ``max_to_keep`` checkpoints are kept (3 by default), so an
  older one is there when the newest is damaged;
- :func:`restore` checks the digest, which catches a damaged file that orbax
  would otherwise read back as wrong numbers without an error (checkpoints
  written by earlier fljax versions, ``state`` plus ``extra.json``, are still
  read, without that check);
- :func:`restore_latest` restores the newest readable checkpoint and reports
  each newer unreadable one in one line (a :class:`CheckpointFallbackWarning`).

Examples:
  >>> import tempfile, jax.numpy as jnp
  >>> d = tempfile.mkdtemp()
  >>> _ = save(d, 2, {"w": jnp.zeros(3)}, {"round": 2})
  >>> latest_step(d)
  2
  >>> restore_latest(d, {"w": jnp.ones(3)})[2]
  {'round': 2}
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import warnings
from collections.abc import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from fljax.base import PyTree

MAX_TO_KEEP = 3  # checkpoints kept by default: the newest and two to fall back on
_PREFIX, _DIGITS = "round", 6


class CheckpointFallbackWarning(UserWarning):
    """The newest checkpoint could not be read; an older one was restored instead."""


class CorruptCheckpointError(ValueError):
    """A checkpoint was read but its state does not match the digest saved with it."""


def _step_dir(directory: os.PathLike | str, step: int) -> pathlib.Path:
    return pathlib.Path(directory).resolve() / f"{_PREFIX}_{step:0{_DIGITS}d}"


def _manager(directory: os.PathLike | str, max_to_keep: int | None = None, *, write=True):
    policy = None if max_to_keep is None else checkpoint_managers.LatestN(max_to_keep)
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy,
        step_prefix=_PREFIX,
        step_format_fixed_length=_DIGITS,
        enable_async_checkpointing=False,  # a save returns once it is committed
        create=write,
        cleanup_tmp_directories=write,
    )
    return ocp.CheckpointManager(pathlib.Path(directory).resolve(), options=options)


def digest(state: PyTree) -> str:
    """SHA-256 of the dtypes, shapes and bytes of ``state``'s leaves, in tree order."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(jax.device_get(state)):
        a = np.ascontiguousarray(leaf)
        h.update(f"{a.dtype.str}{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save(
    directory: os.PathLike | str,
    step: int,
    state: PyTree,
    extra: dict | None = None,
    *,
    max_to_keep: int | None = MAX_TO_KEEP,
) -> pathlib.Path:
    """Save ``state`` (and JSON-serialisable ``extra``) as round ``step``, atomically.

    Args:
      directory: the checkpoints folder (created if needed).
      step: the round the state is after.
      state: a pytree of arrays.
      extra: host facts to keep with it (round, privacy spent, ...).
      max_to_keep: how many of the newest checkpoints to keep (``None``: all).

    Returns:
      The checkpoint's folder.

    Raises:
      FileExistsError: a committed checkpoint of ``step`` exists already (call
        :func:`delete_after` first to recompute from an earlier round).
    """
    with _manager(directory, max_to_keep) as manager:
        if step in manager.all_steps():
            raise FileExistsError(f"checkpoint {_step_dir(directory, step)} already exists")
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                extra=ocp.args.JsonSave(dict(extra or {})),
                digest=ocp.args.JsonSave({"sha256": digest(state)}),
            ),
        )
        manager.wait_until_finished()
    return _step_dir(directory, step)


def steps(directory: os.PathLike | str) -> list[int]:
    """The committed rounds in ``directory``, oldest first (interrupted saves are not listed)."""
    if not pathlib.Path(directory).is_dir():
        return []
    with _manager(directory, write=False) as manager:
        return sorted(manager.all_steps())


def latest_step(directory: os.PathLike | str) -> int | None:
    """The highest committed round in ``directory``, or ``None``."""
    found = steps(directory)
    return found[-1] if found else None


def restore(directory: os.PathLike | str, step: int, target: PyTree) -> tuple[PyTree, dict]:
    """Restore round ``step`` into the structure, shapes and dtypes of ``target``.

    Returns:
      ``(state, extra)``.

    Raises:
      FileNotFoundError: no committed checkpoint of ``step``.
      CorruptCheckpointError: the state read back does not match its digest.
      Exception: whatever orbax raises for a checkpoint it cannot read.
    """
    if step not in steps(directory):
        raise FileNotFoundError(f"no committed checkpoint at {_step_dir(directory, step)}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    legacy = _step_dir(directory, step) / "extra.json"  # written by fljax before the digest
    if legacy.exists():
        items = {"state": ocp.args.StandardRestore(abstract)}
    else:
        items = {
            "state": ocp.args.StandardRestore(abstract),
            "extra": ocp.args.JsonRestore(),
            "digest": ocp.args.JsonRestore(),
        }
    with _manager(directory, write=False) as manager:
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    state = jax.tree.unflatten(jax.tree.structure(target), jax.tree.leaves(restored["state"]))
    if legacy.exists():
        return state, json.loads(legacy.read_text())
    if restored["digest"].get("sha256") != digest(state):
        raise CorruptCheckpointError("the state read back does not match the digest saved with it")
    return state, dict(restored["extra"])


def _warn(step: int, error: Exception, fallback: int | None) -> None:
    warnings.warn(_fallback_message(step, error, fallback), CheckpointFallbackWarning, stacklevel=3)


def _fallback_message(step: int, error: Exception, fallback: int | None) -> str:
    reason = (str(error).strip().splitlines() or [""])[0][:160]
    then = f"falling back to round {fallback}" if fallback is not None else "no older checkpoint"
    return f"checkpoint round {step} is unreadable ({type(error).__name__}: {reason}); {then}"


def restore_latest(
    directory: os.PathLike | str,
    target: PyTree,
    *,
    max_step: int | None = None,
    on_unreadable: Callable[[str], None] | None = None,
) -> tuple[int, PyTree, dict] | None:
    """Restore the newest readable checkpoint of a round ``<= max_step``.

    Each newer checkpoint that cannot be read (orbax error or digest mismatch)
    is reported in one line: ``on_unreadable(message)`` when given, else a
    :class:`CheckpointFallbackWarning`.

    Returns:
      ``(step, state, extra)``, or ``None`` when no checkpoint is readable.
    """
    candidates = [s for s in steps(directory) if max_step is None or s <= max_step]
    for i in range(len(candidates) - 1, -1, -1):
        step = candidates[i]
        try:
            state, extra = restore(directory, step, target)
        except Exception as e:  # any failure to read means: try the previous one
            fallback = candidates[i - 1] if i else None
            if on_unreadable is None:
                _warn(step, e, fallback)
            else:
                on_unreadable(_fallback_message(step, e, fallback))
            continue
        return step, state, extra
    return None


def delete_after(directory: os.PathLike | str, step: int) -> list[int]:
    """Delete the checkpoints of rounds after ``step`` (to recompute them); returns their rounds."""
    later = [s for s in steps(directory) if s > step]
    if later:
        with _manager(directory) as manager:
            for s in later:
                manager.delete(s)
    return later
