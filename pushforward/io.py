"""Saving and loading fitted flows: safetensors weights plus a versioned JSON config.

A model directory holds

* ``model.safetensors``: the :class:`~pushforward.distributions.Flow`'s ``state_dict`` (its
  one metadata entry, ``"pushforward"``, holds the format and version as JSON);
* ``config.json``: how to rebuild it, e.g.::

      {"format": "pushforward", "format_version": 3, "library_version": "0.1.0",
       "flow": "maf", "features": 2, "context_features": 0, "options": {"layers": 5},
       "scaling": {"loc": [0.5, 0.2], "scale": [0.9, 0.5]}, "data": "moons", "seed": 0}

  plus ``weights_sha256``, the checksum of ``model.safetensors`` that :func:`save_model`
  adds and :func:`load_model` verifies (other keys are free extras, kept as they are).
  ``options`` lists only the options given; when a recipe's default changes, the format
  version goes up and an older config gets the former default (format 1 -> 2: the image
  flows' ``scale_bound`` became ``(log 2, 5)``; format-1 configs load with ``5``; 2 -> 3:
  their ``logit`` margin went from 0.05 to 1e-6, and format-2 configs load with 0.05);
* ``metrics.json``: what the command line measured (written by :mod:`pushforward.cli`).

Nothing is ever unpickled: weights are read with ``safetensors`` and configs with ``json``. Each
file is written to a temporary file in the same folder and renamed into place, so a crash never
leaves a half-written file. Every problem is a :class:`~pushforward.core.PushforwardError` naming
the file and what is wrong with it.

Example:
    >>> import tempfile
    >>> from pushforward import flows
    >>> flow = flows.build("affine", 2)
    >>> folder = tempfile.mkdtemp()
    >>> _ = save_model(folder, flow, {"flow": "affine", "features": 2})
    >>> loaded, config = load_model(folder)
    >>> bool((loaded.log_prob(torch.zeros(1, 2)) == flow.log_prob(torch.zeros(1, 2))).all())
    True
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from .core import Compose, PushforwardError
from .distributions import Flow

T = TypeVar("T", bound=torch.nn.Module)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MODEL_FILE",
    "CONFIG_FILE",
    "METRICS_FILE",
    "make_config",
    "save_model",
    "load_model",
    "load_weights",
    "model_from_config",
    "has_model",
    "read_json",
    "write_json",
    "write_atomic",
]

FORMAT = "pushforward"
#: the newest config format this version reads and the one it writes
FORMAT_VERSION = 3
#: recipe defaults that changed after a format version, ``{version: {flow: {option: old}}}``:
#: a config of that version or older that omits the option gets the old value, so a saved
#: model always rebuilds as it was trained
_FORMER_DEFAULTS: dict[int, dict[str, dict[str, Any]]] = {
    1: {"glow": {"scale_bound": 5.0}, "realnvp-image": {"scale_bound": 5.0}},
    2: {"glow": {"logit": 0.05}, "realnvp-image": {"logit": 0.05}},
}
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"


def _library_version() -> str:
    from . import __version__

    return __version__


# ---------------------------------------------------------------------------------------------
# atomic files


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an atomic
    rename: readers see the old file or the new one, never a partial one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def safetensors_bytes(tensors: dict[str, Tensor], info: dict[str, Any]) -> bytes:
    """``tensors`` as a safetensors file, with ``info`` as JSON under its one metadata key
    ``"pushforward"``.

    One key, not one per entry: safetensors writes its metadata map in hash order, which differs
    from call to call, so two identical runs would write different bytes (and checksums).
    """
    from safetensors.torch import save

    return save(tensors, metadata={"pushforward": json.dumps(info)})


def _json_bytes(obj: Any) -> bytes:
    try:
        return (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode()
    except (TypeError, ValueError) as e:
        raise PushforwardError(f"cannot write as JSON: {e}") from None


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented, strict JSON (no NaN), atomically."""
    return write_atomic(path, _json_bytes(obj))


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; a missing or invalid file is a one-line error naming it."""
    path = Path(path)
    if not path.is_file():
        raise PushforwardError(f"{path} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise PushforwardError(f"{path} is not valid JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise PushforwardError(
            f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
        ) from None


# ---------------------------------------------------------------------------------------------
# configs


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _from_json_option(value: Any) -> Any:
    """JSON has no tuples: option lists (``hidden``) come back as tuples."""
    if isinstance(value, list):
        return tuple(_from_json_option(v) for v in value)
    return value


def make_config(
    flow: str,
    features: int | tuple[int, ...],
    context_features: int = 0,
    options: dict[str, Any] | None = None,
    scaling: tuple[Tensor, Tensor] | None = None,
    **extras: Any,
) -> dict[str, Any]:
    """A complete ``config.json`` dictionary for the registered flow ``flow``.

    Args:
        flow: registered recipe name.
        features: number of features (vector flows) or the event shape ``(C, H, W)`` (image
            flows).
        context_features: size of the conditioning vector.
        options: the recipe options used (only those given; the rest are its defaults).
        scaling: ``(loc, scale)`` of the data standardisation, or ``None``.
        **extras: free entries kept in the config (data source, seed, ...).
    """
    config: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": _library_version(),
        "flow": flow,
        "features": _features_json(features),
        "context_features": int(context_features),
        "options": _jsonable(dict(options or {})),
        "scaling": None,
    }
    if scaling is not None:
        loc, scale = (torch.as_tensor(t, dtype=torch.float64) for t in scaling)
        config["scaling"] = {"loc": loc.tolist(), "scale": scale.tolist()}
    config.update(_jsonable(extras))
    return config


def _features_json(features: int | tuple[int, ...] | list[int]) -> int | list[int]:
    if isinstance(features, (tuple, list)):
        return [int(f) for f in features]
    return int(features)


def _valid_features(value: Any) -> bool:
    def positive(v: Any) -> bool:
        return not isinstance(v, bool) and isinstance(v, int) and v >= 1

    if isinstance(value, list):
        return 1 <= len(value) <= 3 and all(positive(v) for v in value)
    return positive(value)


def _check_config(config: Any, where: str) -> dict[str, Any]:
    """Validate the fixed keys of a config; returns it with defaults filled in."""
    if not isinstance(config, dict):
        raise PushforwardError(f"{where}: expected a JSON object, got {type(config).__name__}")
    config = dict(config)
    fmt = config.setdefault("format", FORMAT)
    if fmt != FORMAT:
        raise PushforwardError(f"{where}: not a pushforward model config (format: {fmt!r})")
    version = config.setdefault("format_version", FORMAT_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise PushforwardError(f"{where}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise PushforwardError(
            f"{where}: model format version {version} is newer than this pushforward "
            f"({_library_version()}) reads (up to {FORMAT_VERSION}); upgrade pushforward "
            f"(the model was written by version {config.get('library_version', '?')})"
        )
    config.setdefault("library_version", _library_version())
    name = config.get("flow")
    if not isinstance(name, str) or not name:
        raise PushforwardError(f"{where}: 'flow' must name a registered flow, got {name!r}")
    features = config.get("features")
    if not _valid_features(features):
        raise PushforwardError(
            f"{where}: 'features' must be a positive integer or a list of up to 3 positive "
            f"integers (an event shape), got {features!r}"
        )
    value = config.setdefault("context_features", 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PushforwardError(
            f"{where}: 'context_features' must be a non-negative integer, got {value!r}"
        )
    options = config.setdefault("options", {})
    if options is None:
        options = config["options"] = {}
    if not isinstance(options, dict):
        raise PushforwardError(f"{where}: 'options' must be an object, got {options!r}")
    config.setdefault("scaling", None)
    return config


def _scaling(scaling: Any, event_shape: tuple[int, ...], where: str) -> tuple[Tensor, Tensor]:
    if not isinstance(scaling, dict) or set(scaling) != {"loc", "scale"}:
        raise PushforwardError(
            f"{where}: 'scaling' must be null or {{'loc': [...], 'scale': [...]}}"
        )
    try:
        loc = torch.tensor(scaling["loc"], dtype=torch.get_default_dtype())
        scale = torch.tensor(scaling["scale"], dtype=torch.get_default_dtype())
    except (TypeError, ValueError, RuntimeError):
        raise PushforwardError(
            f"{where}: 'scaling' loc and scale must be lists of numbers"
        ) from None
    for name, t in (("loc", loc), ("scale", scale)):
        try:
            ok = torch.broadcast_shapes(t.shape, event_shape) == event_shape
        except RuntimeError:
            ok = False
        if not ok:
            raise PushforwardError(
                f"{where}: scaling {name} has shape {tuple(t.shape)}, which does not fit the "
                f"flow's event shape {event_shape}"
            )
    return loc, scale


def model_from_config(config: dict[str, Any], where: str = "config") -> Flow:
    """Build the (untrained) flow a config describes.

    ``flows.build(flow, features, context_features, **options)``; when ``scaling`` is set the
    transform becomes ``Compose(transform, Standardization(loc, scale))`` so that the flow's
    log-densities are in the units of the data as given. An image model fitted with
    variational dequantization has ``"dequantize": "variational"`` and its dequantizer's
    options under ``"dequantizer"``; it is rebuilt as a
    :class:`~pushforward.data.dequantization.DequantizedFlow` (the flow with its dequantizer).
    """
    from . import flows
    from .transforms.linear import Standardization

    config = _check_config(config, where)
    options = {k: _from_json_option(v) for k, v in config["options"].items()}
    for version, recipes in _FORMER_DEFAULTS.items():
        if config["format_version"] <= version:
            for key, value in recipes.get(config["flow"], {}).items():
                options.setdefault(key, value)
    try:
        features = config["features"]
        features = tuple(features) if isinstance(features, list) else features
        flow = flows.build(config["flow"], features, config["context_features"], **options)
    except PushforwardError as e:
        raise PushforwardError(f"{where}: {e}") from None
    except (TypeError, ValueError, RuntimeError) as e:
        raise PushforwardError(f"{where}: cannot build flow {config['flow']!r}: {e}") from None
    if config["scaling"] is not None:
        loc, scale = _scaling(config["scaling"], tuple(flow.event_shape), where)
        try:
            standardization = Standardization(loc, scale)
        except PushforwardError as e:
            raise PushforwardError(f"{where}: {e}") from None
        flow = Flow(flow.base, Compose(flow.transform, standardization), flow.context_features)
    if config.get("dequantize") == "variational":
        flow = _with_dequantizer(flow, config, where)
    return flow


def _with_dequantizer(flow: Flow, config: dict[str, Any], where: str) -> Flow:
    from .data.dequantization import DequantizedFlow, VariationalDequantizer

    options = config.get("dequantizer")
    levels = config.get("levels")
    if not isinstance(options, dict):
        raise PushforwardError(
            f"{where}: a variationally dequantized model needs the dequantizer's options under "
            f"'dequantizer' (an object), got {options!r}"
        )
    options = {k: _from_json_option(v) for k, v in options.items()}
    try:
        q = VariationalDequantizer(flow.event_shape, levels, **options)
    except PushforwardError as e:
        raise PushforwardError(f"{where}: dequantizer: {e}") from None
    except TypeError as e:
        raise PushforwardError(f"{where}: dequantizer: {e}") from None
    return DequantizedFlow(flow, q)


# ---------------------------------------------------------------------------------------------
# models


def check_save_directory(directory: str | os.PathLike, force: bool) -> Path:
    """``directory`` as a Path, after refusing a file in its place and (unless ``force``) a
    model already saved there: nothing a user saved is overwritten silently."""
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise PushforwardError(f"{d} exists and is not a directory")
    if has_model(d) and not force:
        raise PushforwardError(
            f"{d} already holds a model; pass force=True (--force) to overwrite it"
        )
    return d


def has_model(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` already holds (part of) a saved model."""
    d = Path(directory)
    return (d / MODEL_FILE).exists() or (d / CONFIG_FILE).exists()


def _state(flow: Flow) -> dict[str, Tensor]:
    # clone: safetensors refuses tensors that share memory (views, tied weights)
    return {k: v.detach().cpu().contiguous().clone() for k, v in flow.state_dict().items()}


def _compare(expected: dict[str, Tensor], got: dict[str, Tensor], where: str) -> None:
    """Name the first missing, unexpected or wrong-shape weight."""
    missing = [k for k in expected if k not in got]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise PushforwardError(f"{where}: missing weight {missing[0]!r}{more}")
    unexpected = [k for k in got if k not in expected]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise PushforwardError(f"{where}: unexpected weight {unexpected[0]!r}{more}")
    for k, v in expected.items():
        if tuple(got[k].shape) != tuple(v.shape):
            raise PushforwardError(
                f"{where}: weight {k!r} has shape {tuple(got[k].shape)}, expected {tuple(v.shape)}"
            )


def save_model(
    directory: str | os.PathLike,
    flow: Flow,
    config: dict[str, Any],
    *,
    force: bool = False,
) -> Path:
    """Save ``flow`` and its ``config`` into ``directory`` (created if needed).

    ``config`` must describe ``flow`` (see :func:`make_config`; missing ``format`` fields are
    filled in): it is checked by rebuilding the flow from it and comparing every weight's name
    and shape, so what is saved can always be loaded. Both files are first written to temporary
    files and then renamed into place.

    Args:
        directory: the model directory.
        flow: the flow to save.
        config: its configuration (free extras are kept).
        force: overwrite a model already in ``directory`` (refused otherwise).

    Returns:
        The directory.
    """
    d = check_save_directory(directory, force)
    config = _check_config(_jsonable(config), f"config for {d}")
    state = _state(flow)
    with torch.random.fork_rng(devices=[]):  # rebuilding must not move the caller's RNG
        expected = model_from_config(config, f"config for {d}").state_dict()
    _compare(expected, state, f"config for {d} does not match the flow")
    blob = safetensors_bytes(state, {"format": FORMAT, "format_version": FORMAT_VERSION})
    config["weights_sha256"] = hashlib.sha256(blob).hexdigest()
    text = _json_bytes(config)
    d.mkdir(parents=True, exist_ok=True)
    # write both to temporary files first, then rename: an error leaves the old model intact
    temps: list[tuple[str, Path]] = []
    try:
        for name, data in ((MODEL_FILE, blob), (CONFIG_FILE, text)):
            fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{name}.", suffix=".tmp")
            temps.append((tmp, d / name))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for tmp, final in temps:
            os.replace(tmp, final)
    finally:
        for tmp, _ in temps:
            Path(tmp).unlink(missing_ok=True)
    return d


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_weights(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise PushforwardError(f"{path.parent} has no {path.name} (the model's weights)")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error types for damaged files
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PushforwardError(
            f"{path} is not a valid safetensors file (truncated or corrupt?): {detail}"
        ) from None


def load_model(directory: str | os.PathLike) -> tuple[Flow, dict[str, Any]]:
    """Load a model saved by :func:`save_model`.

    The flow is rebuilt from ``config.json`` and given the weights of ``model.safetensors``
    (in the floating dtype they were saved in); it is returned in eval mode, with its config.
    """
    d = Path(directory)
    if not d.exists():
        raise PushforwardError(f"model directory not found: {d}")
    if not d.is_dir():
        raise PushforwardError(f"{d} is not a model directory (it is a file)")
    config_path = d / CONFIG_FILE
    if not config_path.is_file():
        raise PushforwardError(
            f"{d} has no {CONFIG_FILE} (is it a model directory written by `pushforward fit`?)"
        )
    config = _check_config(read_json(config_path), str(config_path))
    with torch.random.fork_rng(devices=[]):  # loading must not move the caller's RNG
        flow = model_from_config(config, str(config_path))
    flow = load_weights(flow, d, config)
    return flow, config


def load_weights(module: T, directory: str | os.PathLike, config: dict[str, Any]) -> T:
    """Fill ``module`` (built from ``config``) with ``directory/model.safetensors``, in eval
    mode: the checksum in ``config`` verified, every name and shape compared, the weights'
    dtype adopted, non-finite weights refused. Used by every kind of saved model."""
    weights_path = Path(directory) / MODEL_FILE
    weights = _read_weights(weights_path)
    digest = config.get("weights_sha256")
    if isinstance(digest, str) and _sha256(weights_path) != digest:
        raise PushforwardError(
            f"{weights_path} is corrupt or was replaced: its checksum does not match "
            f"weights_sha256 in {CONFIG_FILE}"
        )
    _compare(module.state_dict(), weights, f"{weights_path} does not match {CONFIG_FILE}")
    floats = [v.dtype for v in weights.values() if v.is_floating_point()]
    if floats:
        module = module.to(floats[0])
    for k, v in weights.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise PushforwardError(f"{weights_path}: weight {k!r} holds NaN or infinite values")
    try:
        module.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise PushforwardError(f"{weights_path}: {str(e).splitlines()[0]}") from None
    module.eval()
    return module
