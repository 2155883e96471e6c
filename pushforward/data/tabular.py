"""Loading arrays of examples from files: ``.npy``, ``.npz`` and numeric ``.csv``.

Rows are examples and columns features (image arrays may have more trailing dimensions). Every
problem with a file is a :class:`~pushforward.core.PushforwardError` whose message is one line
naming the file and the problem. Nothing is ever unpickled (``allow_pickle=False``).

Example:
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "x.csv")
    >>> _ = open(path, "w").write("a,b\\n1,2\\n3,4\\n")
    >>> load_array(path)
    array([[1., 2.],
           [3., 4.]])
"""

from __future__ import annotations

import csv
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

from ..core import PushforwardError

__all__ = ["load_array", "EXTENSIONS"]

#: the file types :func:`load_array` reads
EXTENSIONS = (".npy", ".npz", ".csv")

# first bytes of a .npz (zip) and of a .npy file, by "is .npy"
_MAGIC = {False: b"PK", True: b"\x93NUMPY"}
# what numpy raises on a damaged file, beyond PushforwardError
_READ_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError)


def load_array(path: str | os.PathLike, key: str | None = None) -> np.ndarray:
    """Read an array of examples from ``path``.

    Args:
        path: a ``.npy`` file, a ``.npz`` archive (its first array, or ``key``), or a ``.csv``
            file of numbers separated by commas (an optional header line is skipped).
        key: the array to read from a ``.npz`` archive.

    Returns:
        The array, of shape ``(rows, features, ...)``: ``.npy``/``.npz`` keep their stored dtype,
        ``.csv`` gives ``float64``.

    Raises:
        PushforwardError: missing file, unknown extension, empty or corrupt file, missing key,
            non-numeric values, NaN or infinite values (how many and where the first is), or an
            array with fewer than 2 dimensions.
    """
    p = Path(path)
    if not p.exists():
        raise PushforwardError(f"file not found: {p}")
    if p.is_dir():
        raise PushforwardError(f"{p} is a directory, expected a .npy, .npz or .csv file")
    ext = p.suffix.lower()
    if ext not in EXTENSIONS:
        raise PushforwardError(
            f"{p}: unknown file type {ext or '(no extension)'!r}; expected one of "
            f"{', '.join(EXTENSIONS)}"
        )
    if key is not None and ext != ".npz":
        raise PushforwardError(f"{p}: a key ({key!r}) selects an array of a .npz file only")
    if p.stat().st_size == 0:
        raise PushforwardError(f"{p} is empty")
    if ext == ".csv":
        array, lines = _read_csv(p)
    else:
        array, lines = _read_numpy(p, key), None
    _check_array(array, str(p), lines)
    return array


def _read_numpy(p: Path, key: str | None) -> np.ndarray:
    npy = p.suffix.lower() == ".npy"
    what = ".npy file" if npy else ".npz archive"
    with open(p, "rb") as f:
        magic = f.read(6)
    if magic[: len(_MAGIC[npy])] != _MAGIC[npy]:
        raise PushforwardError(f"{p} is not a {what} (its first bytes are not a {what} header)")
    try:
        loaded = np.load(p, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return loaded
        with loaded as archive:
            names = list(archive.files)
            if not names:
                raise PushforwardError(f"{p} is an empty .npz archive (it holds no arrays)")
            if key is None:
                key = names[0]
            elif key not in names:
                raise PushforwardError(
                    f"{p} has no array {key!r}; its arrays are: {', '.join(names)}"
                )
            return archive[key]
    except PushforwardError:
        raise
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise PushforwardError(
                f"{p} holds Python objects, not numbers (refusing to unpickle them)"
            ) from None
        raise PushforwardError(f"{p} is not a valid {what} (corrupt or truncated): {e}") from None
    except _READ_ERRORS as e:
        detail = str(e) or type(e).__name__
        raise PushforwardError(
            f"{p} is not a valid {what} (corrupt or truncated): {detail}"
        ) from None


def _parse_float(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def _read_csv(p: Path) -> tuple[np.ndarray, list[int]]:
    """Parse a comma-separated numeric file; returns the array and each row's line number."""
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise PushforwardError(f"{p} is not a text .csv file (it is not valid UTF-8)") from None
    rows: list[list[float]] = []
    lines: list[int] = []
    header: list[str] | None = None
    width = None
    try:
        reader = csv.reader(text.splitlines())
        for lineno, cells in enumerate(reader, start=1):
            cells = [c.strip() for c in cells]
            if not cells or all(c == "" for c in cells):
                continue
            values = [_parse_float(c) for c in cells]
            if width is None:
                width = len(cells)
                if any(v is None for v in values):  # the first line is a header
                    header = cells
                    continue
            if len(cells) != width:
                raise PushforwardError(
                    f"{p}: line {lineno} has {len(cells)} columns, expected {width}"
                )
            for j, v in enumerate(values):
                if v is None:
                    name = f" ({header[j]!r})" if header and header[j] else ""
                    raise PushforwardError(
                        f"{p}: line {lineno}, column {j + 1}{name}: {cells[j]!r} is not a number"
                    )
            rows.append(values)  # type: ignore[arg-type]
            lines.append(lineno)
    except csv.Error as e:
        raise PushforwardError(f"{p} is not a valid .csv file: {e}") from None
    if not rows:
        what = "only a header line" if header else "no rows"
        raise PushforwardError(f"{p} holds {what}: no examples to read")
    return np.asarray(rows, dtype=np.float64), lines


def _check_array(a: np.ndarray, name: str, lines: list[int] | None = None) -> None:
    """Numbers, at least 2-D, non-empty, all finite."""
    if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_) or np.issubdtype(
        a.dtype, np.complexfloating
    ):
        raise PushforwardError(f"{name} holds values of type {a.dtype}, expected real numbers")
    if a.ndim < 2:
        shape = tuple(a.shape)
        hint = f" (for one feature, reshape it to ({shape[0]}, 1))" if a.ndim == 1 else ""
        raise PushforwardError(
            f"{name} holds a {a.ndim}-D array of shape {shape}; expected (rows, features){hint}"
        )
    if a.size == 0:
        raise PushforwardError(f"{name} holds an empty array of shape {tuple(a.shape)}")
    if np.issubdtype(a.dtype, np.floating):
        bad = ~np.isfinite(a)
        count = int(bad.sum())
        if count:
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            if lines is not None:
                where = f"line {lines[first[0]]}, column {first[1] + 1}"
            elif a.ndim == 2:
                where = f"row {first[0]}, column {first[1]} (0-based)"
            else:
                where = f"index {first} (0-based)"
            raise PushforwardError(
                f"{name} contains {count} NaN or infinite value(s); the first is at {where}"
            )
