"""Toy generators and their exact densities, file loading and its errors, built-in datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pushforward.core import PushforwardError
from pushforward.data import (
    MINIBOONE_SEED,
    TOY_SEEDS,
    TOY_SIZES,
    builtin_names,
    find_data_file,
    load,
    load_array,
    sample_toy,
    splits,
    toy_log_prob,
    toy_names,
)

TOYS = ["moons", "circles", "8gaussians", "checkerboard", "pinwheel", "spirals", "rings"]


# --- toys --------------------------------------------------------------------------------------


def test_toy_names() -> None:
    assert toy_names() == TOYS


@pytest.mark.parametrize("name", TOYS)
def test_toy_is_seeded_float32_and_in_range(name: str) -> None:
    x = sample_toy(name, 2000, seed=3)
    assert x.shape == (2000, 2) and x.dtype == np.float32
    assert np.isfinite(x).all()
    assert np.abs(x).max() < 5.5 and x.std() > 0.5
    np.testing.assert_array_equal(x, sample_toy(name, 2000, seed=3))
    assert not np.array_equal(x, sample_toy(name, 2000, seed=4))


def _grid_mass(name: str, half: float, n: int) -> float:
    h = 2 * half / n
    g = -half + h * (np.arange(n) + 0.5)
    grid = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    return float(np.exp(toy_log_prob(name, grid)).sum() * h * h)


@pytest.mark.parametrize("name", ["8gaussians", "checkerboard"])
def test_exact_density_integrates_to_one_and_covers_samples(name: str) -> None:
    assert abs(_grid_mass(name, 6.0, 600) - 1.0) < 1e-3
    lp = toy_log_prob(name, sample_toy(name, 20000, seed=0))
    assert np.isfinite(lp).all()


def test_exact_density_matches_samples() -> None:
    # mean log-density of samples = minus the entropy: log 32 for the checkerboard
    lp = toy_log_prob("checkerboard", sample_toy("checkerboard", 1000, seed=1))
    np.testing.assert_allclose(lp, -np.log(32.0))
    # 8gaussians: well separated components, entropy = log 8 + log(2 pi e sigma^2)
    sigma2 = 0.5**2 / 2
    expected = -(np.log(8) + np.log(2 * np.pi * np.e * sigma2))
    lp = toy_log_prob("8gaussians", sample_toy("8gaussians", 50000, seed=2))
    assert abs(lp.mean() - expected) < 0.02
    assert toy_log_prob("checkerboard", np.array([[1.0, -1.0], [9.0, 0.0]])).tolist() == [
        -np.inf,
        -np.inf,
    ]


def test_toy_errors() -> None:
    with pytest.raises(PushforwardError, match="no closed-form density"):
        toy_log_prob("moons", np.zeros((3, 2)))
    with pytest.raises(PushforwardError, match="unknown toy dataset 'blobs'"):
        sample_toy("blobs", 10)
    with pytest.raises(PushforwardError, match="positive integer"):
        sample_toy("moons", 0)
    with pytest.raises(PushforwardError, match=r"expected shape \(n, 2\)"):
        toy_log_prob("8gaussians", np.zeros((3, 3)))


# --- files -------------------------------------------------------------------------------------


def test_npy_npz_csv_round_trip(tmp_path: Path) -> None:
    a = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.save(tmp_path / "a.npy", a)
    np.savez(tmp_path / "a.npz", first=a, second=a * 2)
    np.testing.assert_array_equal(load_array(tmp_path / "a.npy"), a)
    np.testing.assert_array_equal(load_array(tmp_path / "a.npz"), a)
    np.testing.assert_array_equal(load_array(tmp_path / "a.npz", "second"), a * 2)
    (tmp_path / "h.csv").write_text("x, y ,z\n0,1,2\n\n3,4,5e0\n6,7,8\n9,10,11\n")
    (tmp_path / "n.csv").write_text("0,1,2\n3,4,5\n6,7,8\n9,10,11\n")
    for name in ("h.csv", "n.csv"):
        np.testing.assert_array_equal(load_array(tmp_path / name), a)
    assert load(str(tmp_path / "a.npy")).shape == (4, 3)  # a path through load()


def _error(path: Path, key: str | None = None) -> str:
    with pytest.raises(PushforwardError) as info:
        load_array(path, key)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_file_errors_name_the_problem(tmp_path: Path) -> None:
    assert "file not found" in _error(tmp_path / "missing.npy")
    (tmp_path / "a.txt").write_text("1,2\n")
    assert "unknown file type '.txt'" in _error(tmp_path / "a.txt")
    for name in ("e.npy", "e.npz", "e.csv"):
        (tmp_path / name).write_bytes(b"")
        assert "is empty" in _error(tmp_path / name)
    (tmp_path / "h.csv").write_text("a,b\n")
    assert "only a header line" in _error(tmp_path / "h.csv")
    np.save(tmp_path / "z.npy", np.zeros((0, 3)))
    assert "empty array of shape (0, 3)" in _error(tmp_path / "z.npy")
    np.save(tmp_path / "v.npy", np.zeros(5))
    assert "1-D array of shape (5,); expected (rows, features)" in _error(tmp_path / "v.npy")
    assert "directory" in _error(tmp_path)


def test_non_finite_values_are_counted_and_located(tmp_path: Path) -> None:
    a = np.zeros((5, 3))
    a[2, 1], a[4, 0] = np.nan, np.inf
    np.save(tmp_path / "a.npy", a)
    message = _error(tmp_path / "a.npy")
    assert "2 NaN or infinite value(s)" in message and "row 2, column 1" in message
    (tmp_path / "a.csv").write_text("a,b\n1,2\n3,nan\n")
    assert "1 NaN or infinite value(s); the first is at line 3, column 2" in _error(
        tmp_path / "a.csv"
    )


def test_csv_errors_name_row_and_column(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("a,b\n1,2\n3,x\n")
    assert "line 3, column 2 ('b'): 'x' is not a number" in _error(tmp_path / "a.csv")
    (tmp_path / "b.csv").write_text("1,2\n3\n")
    assert "line 2 has 1 columns, expected 2" in _error(tmp_path / "b.csv")
    (tmp_path / "c.csv").write_bytes(b"\xff\xfe\x00\x01garbage")
    assert "not valid UTF-8" in _error(tmp_path / "c.csv")


def test_npz_keys_and_corrupt_files(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", x=np.zeros((2, 2)), y=np.ones((2, 2)))
    assert "has no array 'w'; its arrays are: x, y" in _error(tmp_path / "a.npz", "w")
    np.save(tmp_path / "k.npy", np.zeros((2, 2)))
    assert "selects an array of a .npz file only" in _error(tmp_path / "k.npy", "x")
    np.savez(tmp_path / "none.npz")
    assert "holds no arrays" in _error(tmp_path / "none.npz")
    (tmp_path / "bad.npy").write_bytes(b"this is not numpy")
    assert "is not a .npy file" in _error(tmp_path / "bad.npy")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    assert "is not a .npz archive" in _error(tmp_path / "bad.npz")
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 broken zip")
    assert "not a valid .npz archive" in _error(tmp_path / "broken.npz")
    np.save(tmp_path / "full.npy", np.zeros((100, 10)))
    blob = (tmp_path / "full.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(blob[: len(blob) // 2])
    assert "not a valid .npy file" in _error(tmp_path / "cut.npy")


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "o.npy", np.array([[{"a": 1}]], dtype=object), allow_pickle=True)
    assert "refusing to unpickle" in _error(tmp_path / "o.npy")


# --- built-ins ---------------------------------------------------------------------------------


def test_builtin_toy_splits_are_fixed_seeds() -> None:
    train, test = load("moons"), load("moons", "test")
    assert train.shape == (TOY_SIZES["train"], 2) and test.shape == (TOY_SIZES["test"], 2)
    np.testing.assert_array_equal(train, sample_toy("moons", 20000, TOY_SEEDS["train"]))
    np.testing.assert_array_equal(test, sample_toy("moons", 10000, TOY_SEEDS["test"]))
    assert splits("moons") == ("train", "test")
    with pytest.raises(PushforwardError, match="has no 'valid' split; its splits are: train"):
        load("moons", "valid")


def test_unknown_name_lists_builtins() -> None:
    assert set(TOYS) | {"miniboone"} <= set(builtin_names())
    with pytest.raises(PushforwardError, match="unknown dataset 'nope'.*moons.*miniboone"):
        load("nope")
    with pytest.raises(PushforwardError, match="file not found"):
        load("nope.npy")


def _miniboone_file(folder: Path) -> np.ndarray:
    rng = np.random.default_rng(0)
    val, test = rng.normal(size=(30, 4)), rng.normal(size=(70, 4))
    np.savez(folder / "miniboone.npz", val=val.astype(np.float32), test=test.astype(np.float32))
    return np.concatenate([val, test]).astype(np.float32)


def test_miniboone_resplits_70_10_20(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = _miniboone_file(tmp_path)
    monkeypatch.setenv("PUSHFORWARD_DATA", str(tmp_path))
    assert find_data_file("miniboone.npz") == tmp_path / "miniboone.npz"
    parts = {s: load("miniboone", s) for s in ("train", "valid", "test")}
    assert [len(parts[s]) for s in ("train", "valid", "test")] == [70, 10, 20]
    order = np.random.default_rng(MINIBOONE_SEED).permutation(100)
    np.testing.assert_array_equal(np.concatenate(list(parts.values())), rows[order])
    np.testing.assert_array_equal(load("miniboone", "valid"), parts["valid"])  # deterministic


def test_miniboone_missing_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PUSHFORWARD_DATA", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("pushforward.data._REPO_ROOT", tmp_path / "repo")
    with pytest.raises(PushforwardError, match="miniboone.npz not found.*never downloaded"):
        load("miniboone")


def test_real_miniboone_if_present() -> None:
    try:
        find_data_file("miniboone.npz")
    except PushforwardError:
        pytest.skip("miniboone.npz not available")
    x = load("miniboone")
    assert x.shape == (4852, 43) and x.dtype == np.float32
    assert len(load("miniboone", "test")) == 6932 - 4852 - 693
