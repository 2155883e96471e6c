"""Saving and loading models: identical densities, atomic refusal to overwrite, clear errors for
every kind of damaged directory, and no pickle anywhere."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pushforward import io
from pushforward.core import Compose, PushforwardError
from pushforward.distributions import Flow
from pushforward.transforms.linear import Standardization
from pushforward.transforms.transformers import AffineTransformer

OPTIONS = {"layers": 2}


def _config(features: int = 3, scaling: bool = True) -> dict:
    loc_scale = (torch.arange(features) * 1.0, torch.arange(features) + 0.5) if scaling else None
    return io.make_config("lu", features, 0, OPTIONS, loc_scale, data="moons", seed=4)


def _trained_flow(config: dict):
    torch.manual_seed(0)
    flow = io.model_from_config(config)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return flow


@pytest.fixture
def saved(tmp_path: Path):
    config = _config()
    flow = _trained_flow(config)
    directory = tmp_path / "model"
    io.save_model(directory, flow, config)
    return directory, flow, config


def _error(directory: Path) -> str:
    with pytest.raises(PushforwardError) as info:
        io.load_model(directory)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_save_load_gives_identical_log_prob(saved) -> None:
    directory, flow, config = saved
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]
    loaded, loaded_config = io.load_model(directory)
    assert not loaded.training
    x = torch.randn(50, 3) * 3
    assert torch.equal(loaded.log_prob(x), flow.log_prob(x))
    for key in ("flow", "features", "context_features", "options", "scaling", "data", "seed"):
        assert loaded_config[key] == config[key]
    assert (
        loaded_config["format"] == "pushforward"
        and loaded_config["format_version"] == io.FORMAT_VERSION
    )


def test_saving_again_writes_the_same_bytes(saved, tmp_path: Path) -> None:
    # safetensors writes a metadata map of several keys in an order that changes from call to
    # call; eight saves would all agree by chance once in 128 tries
    directory, flow, config = saved
    for i in range(8):
        again = io.save_model(tmp_path / f"again{i}", flow, config)
        for name in ("model.safetensors", "config.json"):
            assert (again / name).read_bytes() == (directory / name).read_bytes(), name
    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        info = json.loads(f.metadata()["pushforward"])
    assert info == {"format": "pushforward", "format_version": io.FORMAT_VERSION}


def test_scaling_wraps_the_transform_in_data_units() -> None:
    loc, scale = torch.tensor([1.0, -2.0]), torch.tensor([2.0, 0.5])
    config = io.make_config("lu", 2, 0, OPTIONS, (loc, scale))
    flow = io.model_from_config(config)
    assert isinstance(flow.transform, Compose)
    assert isinstance(flow.transform[-1], Standardization)
    inner = Flow(flow.base, flow.transform[0])
    x = torch.randn(20, 2)
    # change of variables: log p(x) = log p_inner((x - loc) / scale) - sum log scale
    expected = inner.log_prob((x - loc) / scale) - torch.log(scale).sum()
    torch.testing.assert_close(flow.log_prob(x), expected)


def test_float64_flows_keep_their_precision(tmp_path: Path) -> None:
    config = _config(scaling=False)
    flow = _trained_flow(config).double()
    io.save_model(tmp_path, flow, config)  # an existing, empty folder is fine
    loaded, _ = io.load_model(tmp_path)
    x = torch.randn(10, 3, dtype=torch.float64)
    assert torch.equal(loaded.log_prob(x), flow.log_prob(x))


def test_save_and_load_leave_the_random_state_alone(saved, tmp_path: Path) -> None:
    directory, flow, config = saved
    state = torch.random.get_rng_state()
    io.load_model(directory)
    io.save_model(tmp_path / "again", flow, config)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_refuses_to_overwrite_without_force(saved) -> None:
    directory, flow, config = saved
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    other = _trained_flow(config)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    with pytest.raises(PushforwardError, match="already holds a model.*force"):
        io.save_model(directory, other, config)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    io.save_model(directory, other, config, force=True)
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]
    x = torch.randn(5, 3)
    assert torch.equal(io.load_model(directory)[0].log_prob(x), other.log_prob(x))


def test_a_config_that_does_not_describe_the_flow_is_refused(tmp_path: Path) -> None:
    config = _config()
    flow = _trained_flow(config)
    with pytest.raises(PushforwardError, match="does not match the flow.*weight"):
        io.save_model(tmp_path / "m", flow, {**config, "options": {"layers": 3}})
    assert not (tmp_path / "m" / "model.safetensors").exists()


def test_missing_directory_and_files(saved, tmp_path: Path) -> None:
    directory, _, _ = saved
    assert "model directory not found" in _error(tmp_path / "nowhere")
    (directory / "model.safetensors").unlink()
    assert "has no model.safetensors" in _error(directory)
    (directory / "config.json").unlink()
    assert "has no config.json" in _error(directory)


def _edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_damaged_config(saved) -> None:
    directory, _, _ = saved
    path = directory / "config.json"
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    assert "config.json is not valid JSON (line" in _error(directory)
    path.write_text(text)
    _edit_config(directory, format="other")
    assert "not a pushforward model config (format: 'other')" in _error(directory)
    _edit_config(directory, format="pushforward", format_version=io.FORMAT_VERSION + 1)
    assert f"format version {io.FORMAT_VERSION + 1} is newer" in _error(directory)
    _edit_config(directory, format_version=1, flow="no-such-flow")
    assert "unknown flow 'no-such-flow'" in _error(directory)
    _edit_config(directory, flow="lu", features=4)
    message = _error(directory)
    assert "scaling loc has shape (3,)" in message
    _edit_config(directory, scaling={"loc": [0.0] * 4, "scale": [1.0] * 4})
    message = _error(directory)
    assert "has shape" in message and "expected" in message and "weight '" in message
    _edit_config(directory, scaling=None, features=3)
    assert "missing weight '" in _error(directory)  # the scaling's weights
    _edit_config(directory, scaling=_config()["scaling"], options={"layers": 3})
    assert "missing weight '" in _error(directory)
    _edit_config(directory, options={"layers": 1})
    assert "unexpected weight '" in _error(directory)
    _edit_config(directory, options={"bins": 3})
    assert "has no option 'bins'" in _error(directory)


def test_damaged_weights(saved) -> None:
    directory, flow, _ = saved
    path = directory / "model.safetensors"
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    assert "not a valid safetensors file" in _error(directory)
    path.write_bytes(b"")
    assert "not a valid safetensors file" in _error(directory)
    path.write_bytes(pickle.dumps({"a": 1}))
    assert "not a valid safetensors file" in _error(directory)
    flipped = bytearray(blob)
    flipped[-5] ^= 0xFF
    path.write_bytes(bytes(flipped))
    assert "checksum does not match" in _error(directory)
    # a foreign (but valid) safetensors file: the config's checksum catches it; without one,
    # the weights are named
    save_file({"weight": torch.zeros(3, 3)}, str(path))
    assert "checksum does not match" in _error(directory)
    config = json.loads((directory / "config.json").read_text())
    del config["weights_sha256"]
    (directory / "config.json").write_text(json.dumps(config))
    assert "missing weight '" in _error(directory)
    state = {k: v.contiguous() for k, v in flow.state_dict().items()}
    key = next(iter(state))
    save_file({**state, key: torch.zeros(7)}, str(path))
    assert f"weight {key!r} has shape (7,)" in _error(directory)
    save_file({**state, "extra.weight": torch.zeros(1)}, str(path))
    assert "unexpected weight 'extra.weight'" in _error(directory)


def test_writes_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _config()
    flow = _trained_flow(config)
    io.save_model(tmp_path, flow, config)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(io.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        io.save_model(tmp_path, _trained_flow(config), config, force=True)
    with pytest.raises(OSError, match="disk full"):
        io.write_json(tmp_path / "metrics.json", {"a": 1})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp files left


def test_no_pickle_anywhere() -> None:
    source = Path(io.__file__).read_text()
    tabular = Path(io.__file__).parent / "data" / "tabular.py"
    for text in (source, tabular.read_text()):
        assert "torch.load" not in text and "import pickle" not in text
        assert "allow_pickle=True" not in text


def _rebuilt(config: dict, kind: type, value) -> set:
    """``value`` of every module of type ``kind`` in the flow that ``config`` rebuilds."""
    return {value(m) for m in io.model_from_config(config).modules() if isinstance(m, kind)}


@pytest.mark.parametrize("flow", ["glow", "realnvp-image"])
def test_a_format_1_image_config_rebuilds_with_the_scale_bound_it_was_trained_with(flow) -> None:
    """The image flows' couplings got an asymmetric scale clamp in format 2; an old config
    that omits ``scale_bound`` must not silently load as a different model."""
    old = io.make_config(flow, [1, 4, 4], 0, {"levels": 1, "layers": 1, "hidden": [8]})
    old["format_version"] = 1

    def bounds(config):
        return _rebuilt(config, AffineTransformer, lambda m: (m.lower_bound, m.scale_bound))

    assert bounds(old) == {(5.0, 5.0)}
    assert bounds({**old, "format_version": 2}) == {(math.log(2), 5.0)}
    old["options"]["scale_bound"] = [0.5, 3.0]
    assert bounds(old) == {(0.5, 3.0)}


@pytest.mark.parametrize("flow", ["glow", "realnvp-image"])
def test_a_format_2_image_config_rebuilds_with_the_logit_margin_it_was_trained_with(flow) -> None:
    """The image flows' logit margin went from 0.05 to 1e-6 in format 3."""
    from pushforward.transforms.elementwise import Logit

    old = io.make_config(flow, [1, 4, 4], 0, {"levels": 1, "layers": 1, "hidden": [8]})

    def margins(config):
        return _rebuilt(config, Logit, lambda m: m.alpha)

    assert margins(old) == {1e-6}
    for version in (1, 2):
        assert margins({**old, "format_version": version}) == {0.05}
    old["options"]["logit"] = 0.01
    assert margins({**old, "format_version": 2}) == {0.01}
