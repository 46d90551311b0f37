"""Where offline copies of data sets live.

A loader looks for data set ``name`` in, in order:

1. ``data_dir`` when the caller passes it (the folder holding the files);
2. ``$FLJAX_DATA_DIR/<name>``;
3. ``../shared/data/<name>`` relative to the current directory;
4. any extra system folder the loader names (e.g. Debian's
   ``/usr/share/datasets/fashion-mnist``).

Nothing is downloaded from here; downloading is opt-in through
tensorflow-datasets (``source="tfds"``) in the loaders that support it.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

ENV_VAR = "FLJAX_DATA_DIR"
DEFAULT_ROOT = pathlib.Path("..") / "shared" / "data"


def candidates(
    name: str, data_dir: str | os.PathLike | None = None, extra: Sequence[str] = ()
) -> list[pathlib.Path]:
    """The folders searched for data set ``name``, in order."""
    if data_dir is not None:
        return [pathlib.Path(data_dir)]
    found = []
    env = os.environ.get(ENV_VAR)
    if env:
        found.append(pathlib.Path(env) / name)
    found.append(DEFAULT_ROOT / name)
    found.extend(pathlib.Path(e) for e in extra)
    return found


def find(
    name: str,
    required: Sequence[str],
    data_dir: str | os.PathLike | None = None,
    extra: Sequence[str] = (),
) -> pathlib.Path:
    """The first candidate folder that holds every file in ``required``.

    Args:
      name: data set folder name (e.g. ``"mnist"``).
      required: file names that must all exist in the folder. An entry with
        alternatives separated by ``|`` is satisfied by any of them.
      data_dir: explicit folder (only this one is searched).
      extra: further folders searched after the defaults.

    Returns:
      The folder.

    Raises:
      FileNotFoundError: naming every folder searched and the files expected.
    """
    searched = candidates(name, data_dir, extra)
    for folder in searched:
        if all(any((folder / alt).is_file() for alt in r.split("|")) for r in required):
            return folder
    where = ", ".join(str(f.resolve()) for f in searched)
    raise FileNotFoundError(
        f"data set {name!r} not found: looked for {list(required)} in {where}. Pass data_dir=, or set "
        f"${ENV_VAR} to a folder with a {name!r} subfolder."
    )


def pick(folder: pathlib.Path, alternatives: str) -> pathlib.Path:
    """The first existing file among ``a|b|c`` in ``folder``."""
    for alt in alternatives.split("|"):
        if (folder / alt).is_file():
            return folder / alt
    raise FileNotFoundError(f"none of {alternatives.split('|')} in {folder}")
