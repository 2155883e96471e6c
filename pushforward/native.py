"""Optional compiled CPU kernels, built on first use with the machine's C++ compiler.

The kernels (sources in ``pushforward/csrc``) fuse what would otherwise be dozens of small
PyTorch calls into one pass. They are an acceleration only: every kernel has a pure-PyTorch
reference path that computes the same thing, which is used on other devices, where no
compiler is found, where the build fails, or with ``PUSHFORWARD_NATIVE=0`` in the
environment. The library is complete and correct without them.

A kernel is compiled once per machine, source and compiler (``-O3 -march=native``, or without
``-march=native`` where the compiler refuses it; about 2 s) into the cache directory,
``$PUSHFORWARD_CACHE`` or ``$XDG_CACHE_HOME/pushforward`` (default ``~/.cache/pushforward``),
written to a temporary name and renamed into place, so concurrent processes never load a
half-written library. Each load refreshes the library's modification time; after building a
new one, the loader deletes the builds of the same kernel unused for 30 days (other sources,
compilers or machines), so the cache does not grow with every upgrade. The compiler is
``$CXX`` if set, else ``c++``, ``g++`` or ``clang++`` from the ``PATH``. :func:`status` says
which kernels are in use and, for any that is not, why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

__all__ = ["library", "status", "cache_dir", "enabled"]

_SOURCES = Path(__file__).with_name("csrc")
_FLAGS = (
    "-O3",
    # no implicit fused multiply-adds (the kernels fuse explicitly where accuracy needs it)
    "-ffp-contract=off",
    "-fno-math-errno",
    "-fopenmp-simd",
    "-std=c++17",
    "-shared",
    "-fPIC",
)
#: builds of a kernel not loaded for this long are deleted when a new one is built
_STALE_SECONDS = 30 * 24 * 3600
_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}
_why: dict[str, str] = {}


def enabled() -> bool:
    """Whether compiled kernels may be used (``PUSHFORWARD_NATIVE`` is not ``0``)."""
    return os.environ.get("PUSHFORWARD_NATIVE", "1").strip().lower() not in ("0", "false", "no")


def cache_dir() -> Path:
    """Where the compiled kernels are kept."""
    if os.environ.get("PUSHFORWARD_CACHE"):
        return Path(os.environ["PUSHFORWARD_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pushforward"


def _compiler() -> str:
    if os.environ.get("CXX"):
        found = shutil.which(os.environ["CXX"])
        if found is None:
            raise RuntimeError(f"CXX={os.environ['CXX']!r} is not an executable")
        return found
    for name in ("c++", "g++", "clang++"):
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError("no C++ compiler found (set CXX, or install g++ or clang++)")


def _machine() -> str:
    """What ``-march=native`` depends on: the architecture and the CPU's feature flags."""
    text = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    text += line
    except OSError:
        pass
    return text


def _build(name: str) -> ctypes.CDLL:
    compiler = _compiler()
    source = (_SOURCES / f"{name}.cpp").read_bytes()
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, timeout=30
    ).stdout
    directory = cache_dir()
    machine = _machine()

    def target(flags: tuple[str, ...]) -> Path:
        parts = (source, compiler, version, " ".join(flags), machine)
        key = hashlib.sha256(b"\0".join(p if isinstance(p, bytes) else p.encode() for p in parts))
        return directory / f"{name}-{key.hexdigest()[:20]}.so"

    # the machine's own instruction set first; a portable build where the compiler refuses it
    variants = {flags: target(flags) for flags in [(*_FLAGS, "-march=native"), _FLAGS]}
    for path in variants.values():
        if path.exists():
            try:
                lib = ctypes.CDLL(str(path))
            except OSError:
                path.unlink(missing_ok=True)  # damaged: built again below
            else:
                _touch(path)
                return lib
    # private to the user: a library planted here would be loaded
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    errors = []
    for flags, path in variants.items():
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            src = Path(tmp) / f"{name}.cpp"
            src.write_bytes(source)
            built = Path(tmp) / f"{name}.so"
            result = subprocess.run(
                [compiler, *flags, "-o", str(built), str(src)],
                capture_output=True,
                text=True,
                timeout=300,
            )
            if result.returncode == 0:
                os.replace(built, path)
                _prune(name, keep=path)
                return ctypes.CDLL(str(path))
            errors.append((result.stderr.strip().splitlines() or ["(no message)"])[-1])
    raise RuntimeError(f"{Path(compiler).name} failed: {errors[-1]}")


def _touch(path: Path) -> None:
    """Mark a cached library as in use (its modification time: access times are often not
    kept)."""
    try:
        os.utime(path)
    except OSError:
        pass  # a read-only cache still serves


def _prune(name: str, keep: Path) -> None:
    """Delete the cached builds of kernel ``name`` other than ``keep`` that no process has
    loaded for :data:`_STALE_SECONDS`. A process that has one loaded keeps its copy (deleting
    a file never touches a mapping of it)."""
    limit = time.time() - _STALE_SECONDS
    for old in keep.parent.glob(f"{name}-*.so"):
        try:
            if old != keep and old.stat().st_mtime < limit:
                old.unlink()
        except OSError:
            pass  # gone already, or not ours to delete


def library(name: str) -> ctypes.CDLL | None:
    """The compiled kernel library ``name`` (``csrc/NAME.cpp``), built on first use, or
    ``None`` where it cannot be used (then callers take their reference path)."""
    if not enabled():
        return None
    if name in _loaded:
        return _loaded[name]
    with _lock:
        if name not in _loaded:
            try:
                _loaded[name] = _build(name)
            except Exception as err:  # optional: whatever stops the build, the reference runs
                _loaded[name] = None
                _why[name] = f"{err}" or type(err).__name__
    return _loaded[name]


def status() -> dict[str, str]:
    """For every kernel source: ``"in use"``, or why the reference path runs instead.

    Example:
        >>> sorted(status())
        ['rqspline']
    """
    report = {}
    for path in sorted(_SOURCES.glob("*.cpp")):
        name = path.stem
        if not enabled():
            report[name] = "disabled by PUSHFORWARD_NATIVE"
        elif library(name) is not None:
            report[name] = "in use"
        else:
            report[name] = f"not available: {_why.get(name, 'unknown')}"
    return report
