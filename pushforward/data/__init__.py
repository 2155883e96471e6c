"""Datasets: built-in names with standard splits, and arrays read from files.

:func:`load` resolves what the command line calls ``DATA``: a built-in name or a path to a
``.npy``/``.npz``/``.csv`` file (see :mod:`pushforward.data.tabular`).

Built-in names and their splits:

* the 2-D toys of :mod:`pushforward.data.toy` (``moons``, ``circles``, ``8gaussians``,
  ``checkerboard``, ``pinwheel``, ``spirals``, ``rings``): ``train`` is 20,000 points drawn
  with seed :data:`TOY_SEEDS` ``["train"]`` (= 1), ``test`` 10,000 points with seed
  ``TOY_SEEDS["test"]`` (= 2). A model fitted on a toy splits its validation set off ``train``.
* ``miniboone``: the MAF paper's preprocessed MiniBooNE features (43 columns). Only its
  official validation and test rows are available offline, so their 6,932 rows are
  concatenated and re-split 70/10/20 into ``train``/``valid``/``test`` by a permutation with
  seed :data:`MINIBOONE_SEED` (= 70). The file ``miniboone.npz`` is searched for in
  ``$PUSHFORWARD_DATA``, then ``../shared/data/`` relative to the current directory, then
  ``../shared/data/`` relative to the repository root; it is never downloaded.
* ``mnist``: 60,000 ``train`` and 10,000 ``test`` images, ``uint8`` ``(N, 1, 28, 28)``, from
  ``mnist.npz`` or the classic idx files, found the same way (:mod:`pushforward.data.images`).
* ``digits``: scikit-learn's 1,797 8x8 digits with 17 levels, ``(N, 1, 8, 8)``, split
  1,500/297 by a fixed permutation.

Example:
    >>> load("moons").shape, load("moons", "test").shape
    ((20000, 2), (10000, 2))
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..core import PushforwardError
from .images import load_digits, load_mnist
from .tabular import EXTENSIONS, load_array
from .toy import sample_toy, toy_log_prob, toy_names

__all__ = [
    "load",
    "builtin_names",
    "splits",
    "is_builtin",
    "find_data_file",
    "search_folders",
    "load_array",
    "sample_toy",
    "toy_names",
    "toy_log_prob",
    "TOY_SEEDS",
    "TOY_SIZES",
    "MINIBOONE_SEED",
    "DATA_ENV",
]

#: seeds of the toys' standard splits
TOY_SEEDS = {"train": 1, "test": 2}
#: sizes of the toys' standard splits
TOY_SIZES = {"train": 20_000, "test": 10_000}
#: seed of the permutation that re-splits MiniBooNE 70/10/20
MINIBOONE_SEED = 70
#: environment variable naming a folder of data files (searched first)
DATA_ENV = "PUSHFORWARD_DATA"

_MINIBOONE_FRACTIONS = (0.7, 0.1)  # train, valid; test is the rest
# the repository root of a source checkout (the package's parent folder)
_REPO_ROOT = Path(__file__).resolve().parents[2]


def search_folders() -> list[Path]:
    """Where data files are looked for, in order: ``$PUSHFORWARD_DATA``, ``./../shared/data``,
    ``<repository root>/../shared/data``."""
    places: list[Path] = []
    env = os.environ.get(DATA_ENV)
    if env:
        places.append(Path(env).expanduser())
    places.append(Path.cwd() / ".." / "shared" / "data")
    places.append(_REPO_ROOT / ".." / "shared" / "data")
    return places


def find_data_file(filename: str) -> Path:
    """The first existing ``filename`` in :func:`search_folders`; a clear error listing the
    places searched otherwise."""
    places = search_folders()
    for folder in places:
        candidate = folder / filename
        if candidate.is_file():
            return candidate
    searched = ", ".join(str(p) for p in places)
    raise PushforwardError(
        f"{filename} not found (searched: {searched}); put it in one of these folders or set "
        f"{DATA_ENV} to the folder holding it (it is never downloaded)"
    )


def _toy_loader(name: str) -> Callable[[str], np.ndarray]:
    def loader(split: str) -> np.ndarray:
        return sample_toy(name, TOY_SIZES[split], TOY_SEEDS[split])

    return loader


def _miniboone(split: str) -> np.ndarray:
    path = find_data_file("miniboone.npz")
    parts = [load_array(path, key) for key in ("val", "test")]
    if any(p.ndim != 2 or p.shape[1] != parts[0].shape[1] for p in parts):
        raise PushforwardError(f"{path}: 'val' and 'test' must be (rows, features) alike")
    rows = np.concatenate(parts).astype(np.float32)
    order = np.random.default_rng(MINIBOONE_SEED).permutation(len(rows))
    n_train = int(_MINIBOONE_FRACTIONS[0] * len(rows))
    n_valid = int(_MINIBOONE_FRACTIONS[1] * len(rows))
    bounds = {
        "train": (0, n_train),
        "valid": (n_train, n_train + n_valid),
        "test": (n_train + n_valid, len(rows)),
    }
    lo, hi = bounds[split]
    return np.ascontiguousarray(rows[order[lo:hi]])


# name -> (splits, loader(split) -> array); new built-ins add an entry here
_BUILTINS: dict[str, tuple[tuple[str, ...], Callable[[str], np.ndarray]]] = {
    **{name: (("train", "test"), _toy_loader(name)) for name in toy_names()},
    "miniboone": (("train", "valid", "test"), _miniboone),
    "mnist": (("train", "test"), lambda split: load_mnist(split)),
    "digits": (("train", "test"), lambda split: load_digits(split)),
}


def builtin_names() -> list[str]:
    """The built-in dataset names :func:`load` understands."""
    return list(_BUILTINS)


def is_builtin(source: str) -> bool:
    """Whether ``source`` is a built-in dataset name."""
    return source in _BUILTINS


def splits(name: str) -> tuple[str, ...]:
    """The standard splits of the built-in dataset ``name`` (e.g. ``("train", "test")``)."""
    if name not in _BUILTINS:
        raise PushforwardError(_unknown(name))
    return _BUILTINS[name][0]


def _unknown(source: str) -> str:
    return (
        f"unknown dataset {source!r}: not a file and not a built-in name; built-in names are: "
        f"{', '.join(_BUILTINS)} (or give a path to a {'/'.join(EXTENSIONS)} file)"
    )


def load(source: str, split: str = "train", key: str | None = None) -> np.ndarray:
    """The array named by ``source``: a built-in dataset's ``split``, or a whole file.

    Args:
        source: a built-in name (see :func:`builtin_names`) or a path to a ``.npy``, ``.npz``
            or ``.csv`` file. A file is read whole; ``split`` does not apply to it.
        split: ``train``, ``valid`` or ``test`` for a built-in name (see :func:`splits`).
        key: the array of a ``.npz`` file (default: its first array).

    Returns:
        An array of shape ``(rows, features, ...)``; built-in vectors are ``float32``,
        built-in images ``uint8`` of shape ``(N, C, H, W)``.
    """
    source = str(source)
    if source in _BUILTINS:
        available, loader = _BUILTINS[source]
        if key is not None:
            raise PushforwardError(f"a key ({key!r}) applies to .npz files, not to {source!r}")
        if split not in available:
            raise PushforwardError(
                f"dataset {source!r} has no {split!r} split; its splits are: {', '.join(available)}"
            )
        return loader(split)
    path = Path(source).expanduser()
    if path.exists() or path.suffix.lower() in EXTENSIONS:
        return load_array(path, key)
    raise PushforwardError(_unknown(source))
