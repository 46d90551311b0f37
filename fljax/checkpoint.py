"""Checkpoints of fljax state with orbax.

A checkpoint holds the state pytree (e.g. :class:`~fljax.base.ServerState`)
and a small JSON document of host-side facts (round, privacy spent). No key is
ever stored: round keys are re-derived with :func:`fljax.random.round_key`, so a
run resumed from a checkpoint draws the same randomness as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
import orbax.checkpoint as ocp

from fljax.base import PyTree


def _step_dir(directory: os.PathLike | str, step: int) -> pathlib.Path:
    return pathlib.Path(directory).resolve() / f"round_{step:06d}"


def save(directory: os.PathLike | str, step: int, state: PyTree, extra: dict | None = None) -> pathlib.Path:
    """Save ``state`` (and JSON-serialisable ``extra``) as round ``step``; returns its folder."""
    path = _step_dir(directory, step)
    if path.exists():
        raise FileExistsError(f"checkpoint {path} already exists")
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path / "state", state)
        ckpt.wait_until_finished()
    (path / "extra.json").write_text(json.dumps(extra or {}, indent=1, sort_keys=True))
    return path


def latest_step(directory: os.PathLike | str) -> int | None:
    """The highest saved round in ``directory``, or ``None``."""
    d = pathlib.Path(directory)
    if not d.is_dir():
        return None
    steps = [
        int(p.name.split("_")[1])
        for p in d.iterdir()
        if p.name.startswith("round_") and (p / "extra.json").exists()
    ]
    return max(steps) if steps else None


def restore(directory: os.PathLike | str, step: int, target: PyTree) -> tuple[PyTree, dict]:
    """Restore round ``step`` into the structure, shapes and dtypes of ``target``."""
    path = _step_dir(directory, step)
    if not (path / "extra.json").exists():
        raise FileNotFoundError(f"no complete checkpoint at {path}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    with ocp.StandardCheckpointer() as ckpt:
        state = ckpt.restore(path / "state", abstract)
    state = jax.tree.unflatten(jax.tree.structure(target), jax.tree.leaves(state))
    return state, json.loads((path / "extra.json").read_text())
