r"""Discrete images: MNIST and scikit-learn's digits, dequantization, bits per dimension.

A flow has a density on continuous values, images hold integers :math:`x \in \{0, \dots,
L - 1\}^D`. Uniform dequantization (Theis et al. 2016; Dinh et al. 2017) models
:math:`y = (x + u) / L` with :math:`u \sim \mathcal U[0, 1)^D`, a point of :math:`[0, 1)^D`.
Then :math:`P(x) = \int_{[0,1)^D} p_Y((x + u)/L)\, L^{-D} \, du`, so by Jensen

.. math::
    \log P(x) \ge \mathbb E_u\bigl[\log p_Y((x + u) / L)\bigr] - D \log L,

and the reported **bits per dimension in the discrete space** is

.. math::
    \text{bits/dim} = \frac{-\log p_Y(y) + D \log L}{D \log 2},

averaged over images (one dequantization draw each): an upper bound, in expectation, on the
discrete model's code length, comparable to the published MNIST/CIFAR figures.

References:
    Theis, van den Oord and Bethge (2016), "A note on the evaluation of generative models",
    arXiv:1511.01844.
    Dinh, Sohl-Dickstein and Bengio (2017), "Density estimation using Real NVP",
    arXiv:1605.08803.
    Ho, Chen, Srinivas, Duan and Abbeel (2019), "Flow++", arXiv:1902.00275 (variational
    dequantization).
"""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..core import PushforwardError, shape_str

__all__ = [
    "load_mnist",
    "load_digits",
    "as_images",
    "dequantize_uniform",
    "bits_per_dim",
    "DIGITS_SEED",
    "DIGITS_TEST",
]

#: seed of the permutation that splits scikit-learn's 1797 digits into train and test
DIGITS_SEED = 0
#: number of digits held out as the test split
DIGITS_TEST = 297

_IDX = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise PushforwardError(f"{path}: cannot read the idx file ({e})") from None
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise PushforwardError(f"{path}: not an idx file of unsigned bytes (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(data) != header + math.prod(dims):
        raise PushforwardError(
            f"{path}: idx header says {dims} but the file holds {len(data) - header} bytes"
        )
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (
        stem,
        stem + ".gz",
        stem.replace("-idx", ".idx"),
        stem.replace("-idx", ".idx") + ".gz",
    ):
        if (folder / name).is_file():
            return folder / name
    return None


def load_mnist(
    split: str = "train", labels: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """MNIST as ``uint8`` images of shape ``(N, 1, 28, 28)`` (60,000 train, 10,000 test).

    Looks for ``mnist.npz`` (arrays ``x_train``, ``y_train``, ``x_test``, ``y_test``) and
    then for the classic idx files (``train-images-idx3-ubyte[.gz]``, ...) in a folder
    ``mnist/`` or directly in ``$PUSHFORWARD_DATA``, then ``../shared/data``; never
    downloads.

    Args:
        split: ``train`` or ``test``.
        labels: also return the labels, ``(N,)`` ``uint8``.
    """
    from . import find_data_file, search_folders

    if split not in _IDX:
        raise PushforwardError(
            f"dataset 'mnist' has no {split!r} split; its splits are: train, test"
        )
    try:
        path = find_data_file("mnist.npz")
    except PushforwardError as missing:
        for folder in search_folders():
            for sub in (folder / "mnist", folder):
                img = _find_idx(sub, _IDX[split][0])
                lab = _find_idx(sub, _IDX[split][1])
                if img is not None and lab is not None:
                    x, y = _read_idx(img), _read_idx(lab)
                    return _mnist_checked(x, y, str(img), labels)
        raise PushforwardError(
            f"{missing} (nor were the idx files train-images-idx3-ubyte etc. found there)"
        ) from None
    with np.load(path, allow_pickle=False) as f:
        names = (f"x_{split}", f"y_{split}")
        if any(n not in f.files for n in names):
            raise PushforwardError(
                f"{path}: expected arrays {', '.join(names)}; the file has {', '.join(f.files)}"
            )
        x, y = f[names[0]], f[names[1]]
    return _mnist_checked(x, y, str(path), labels)


def _mnist_checked(x: np.ndarray, y: np.ndarray, where: str, labels: bool):
    if x.ndim != 3 or x.shape[1:] != (28, 28) or len(y) != len(x):
        raise PushforwardError(
            f"{where}: expected images (N, 28, 28) and N labels, got {x.shape} and {y.shape}"
        )
    x = np.ascontiguousarray(x.astype(np.uint8)[:, None])
    return (x, np.asarray(y, np.uint8)) if labels else x


def load_digits(split: str = "train", labels: bool = False):
    """scikit-learn's 8x8 digits as ``uint8`` images ``(N, 1, 8, 8)`` with 17 levels (0..16);
    a fixed permutation (seed :data:`DIGITS_SEED`) holds out :data:`DIGITS_TEST` as ``test``
    (1,500 train). Needs scikit-learn (the data ships inside it; nothing is downloaded)."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError:
        raise PushforwardError(
            "the 'digits' dataset needs scikit-learn (pip install scikit-learn)"
        ) from None
    if split not in ("train", "test"):
        raise PushforwardError(
            f"dataset 'digits' has no {split!r} split; its splits are: train, test"
        )
    bunch = sk_digits()
    x = bunch.images.astype(np.uint8)[:, None]
    y = bunch.target.astype(np.uint8)
    order = np.random.default_rng(DIGITS_SEED).permutation(len(x))
    idx = order[DIGITS_TEST:] if split == "train" else order[:DIGITS_TEST]
    x, y = np.ascontiguousarray(x[idx]), y[idx]
    return (x, y) if labels else x


def as_images(
    x: np.ndarray | Tensor, levels: int | None = None, name: str = "data"
) -> tuple[Tensor, int]:
    """Check and convert integer images to a ``(N, C, H, W)`` tensor, with their number of
    levels (default: 256 for ``uint8``, else ``max + 1``).

    Errors name the problem: wrong rank, non-integer values (say with ``--dequantize
    uniform``), values outside ``0 .. levels - 1``.
    """
    t = torch.as_tensor(np.asarray(x)) if not isinstance(x, Tensor) else x
    if t.dim() == 3:
        t = t.unsqueeze(1)
    if t.dim() != 4:
        raise PushforwardError(
            f"{name}: images must have shape (N, H, W) or (N, C, H, W), got {shape_str(t.shape)}"
        )
    if t.is_floating_point():
        if not bool(torch.isfinite(t).all()):
            raise PushforwardError(f"{name}: images contain NaN or infinite values")
        if not bool((t == t.round()).all()):
            raise PushforwardError(
                f"{name}: uniform dequantization needs integer pixel values, got non-integers "
                f"(e.g. {float(t[t != t.round()][0]):g}); scale images back to 0..levels-1"
            )
    if t.numel() and int(t.min()) < 0:
        raise PushforwardError(f"{name}: pixel values must be >= 0, got {int(t.min())}")
    if levels is None:
        levels = 256 if t.dtype == torch.uint8 else int(t.max()) + 1 if t.numel() else 1
    if levels < 2:
        raise PushforwardError(f"{name}: need at least 2 intensity levels, got {levels}")
    if t.numel() and int(t.max()) >= levels:
        raise PushforwardError(
            f"{name}: pixel value {int(t.max())} is outside 0..{levels - 1} ({levels} levels)"
        )
    return t, int(levels)


def dequantize_uniform(
    x: Tensor, levels: int, generator: torch.Generator | None = None, dtype=torch.float32
) -> Tensor:
    r""":math:`y = (x + u) / L`, :math:`u \sim \mathcal U[0, 1)`: integer images to
    :math:`[0, 1)`.

    Example:
        >>> y = dequantize_uniform(torch.tensor([[0, 255]]), 256)
        >>> bool(((y >= 0) & (y < 1)).all())
        True
    """
    u = torch.rand(x.shape, generator=generator, dtype=dtype, device=x.device)
    return (x.to(dtype) + u) / levels


def bits_per_dim(log_prob: Tensor | float, dims: int, levels: int) -> Tensor | float:
    r"""Bits per dimension in the discrete space, from the log-density of the dequantized
    images on :math:`[0, 1)^D`:
    :math:`(-\log p_Y(y) + D \log L) / (D \log 2)`.

    Example:
        >>> round(bits_per_dim(0.0, 784, 256), 6)  # the uniform density on [0, 1)^D
        8.0
    """
    return (-log_prob + dims * math.log(levels)) / (dims * math.log(2))
