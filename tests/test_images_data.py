"""Image data: MNIST (npz and idx), digits, checks, dequantization, bits/dim."""

from __future__ import annotations

import gzip
import math

import numpy as np
import pytest
import torch

from pushforward.core import PushforwardError
from pushforward.data import find_data_file, load
from pushforward.data.images import (
    as_images,
    bits_per_dim,
    dequantize_uniform,
    load_digits,
    load_mnist,
)


def _idx(array: np.ndarray) -> bytes:
    head = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return head + array.astype(np.uint8).tobytes()


@pytest.fixture
def fake_mnist_idx(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, 5, dtype=np.uint8)
    folder = tmp_path / "mnist"
    folder.mkdir()
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(x)))
    (folder / "t10k-labels-idx1-ubyte").write_bytes(_idx(y))
    monkeypatch.setenv("PUSHFORWARD_DATA", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # no ../shared/data from here, nor from the repository
    monkeypatch.setattr("pushforward.data._REPO_ROOT", tmp_path / "repo")
    return x, y, folder


def test_mnist_from_idx_files(fake_mnist_idx) -> None:
    x, y, _ = fake_mnist_idx
    images, labels = load_mnist("test", labels=True)
    assert images.shape == (5, 1, 28, 28) and images.dtype == np.uint8
    assert np.array_equal(images[:, 0], x) and np.array_equal(labels, y)


def test_corrupt_idx_is_a_clear_error(fake_mnist_idx) -> None:
    _, _, folder = fake_mnist_idx
    (folder / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x09abc")
    with pytest.raises(PushforwardError, match="idx header says"):
        load_mnist("test")


def test_mnist_npz_from_the_data_folder(tmp_path, monkeypatch) -> None:
    x = np.zeros((3, 28, 28), np.uint8)
    np.savez(tmp_path / "mnist.npz", x_train=x, y_train=np.zeros(3), x_test=x[:2], y_test=[1, 2])
    monkeypatch.setenv("PUSHFORWARD_DATA", str(tmp_path))
    assert load("mnist", "test").shape == (2, 1, 28, 28)
    with pytest.raises(PushforwardError, match="no 'valid' split"):
        load("mnist", "valid")


def test_real_mnist_when_present() -> None:
    try:
        find_data_file("mnist.npz")
    except PushforwardError:
        pytest.skip("../shared/data/mnist.npz is not available in this checkout")
    x = load("mnist", "test")
    assert x.shape == (10000, 1, 28, 28) and x.dtype == np.uint8
    assert abs(x.mean() / 255 - 0.1325) < 0.01  # the test set's mean intensity


def test_digits_split() -> None:
    pytest.importorskip("sklearn")
    train, ytr = load_digits("train", labels=True)
    test = load_digits("test")
    assert train.shape == (1500, 1, 8, 8) and test.shape == (297, 1, 8, 8)
    assert train.max() == 16 and len(ytr) == 1500
    flat = {r.tobytes() for r in train.reshape(1500, -1)}
    assert sum(r.tobytes() in flat for r in test.reshape(297, -1)) < 10  # (a few duplicates exist)


def test_as_images_checks() -> None:
    t, levels = as_images(np.zeros((2, 4, 4), np.uint8))
    assert t.shape == (2, 1, 4, 4) and levels == 256
    assert as_images(np.array([[[[0, 16]]]]))[1] == 17
    with pytest.raises(PushforwardError, match="needs integer pixel values"):
        as_images(np.full((1, 2, 2), 0.5))
    with pytest.raises(PushforwardError, match=r"must have shape \(N, H, W\) or \(N, C, H, W\)"):
        as_images(np.zeros((4, 4)))
    with pytest.raises(PushforwardError, match="outside 0..15"):
        as_images(np.full((1, 2, 2), 16), levels=16)
    with pytest.raises(PushforwardError, match="NaN or infinite"):
        as_images(np.full((1, 2, 2), np.nan))
    with pytest.raises(PushforwardError, match=">= 0"):
        as_images(np.full((1, 2, 2), -1))


def test_dequantize_and_bits_per_dim() -> None:
    x = torch.randint(0, 17, (100, 1, 8, 8))
    y = dequantize_uniform(x, 17, torch.Generator().manual_seed(0))
    assert ((y >= x / 17) & (y < (x + 1) / 17)).all()
    # the uniform density on [0,1)^D is the uniform distribution over the L^D images
    assert bits_per_dim(0.0, 64, 17) == pytest.approx(math.log2(17))
    lp = torch.tensor([-10.0, 0.0])
    expected = (-lp + 64 * math.log(17)) / (64 * math.log(2))
    assert torch.allclose(bits_per_dim(lp, 64, 17), expected)
