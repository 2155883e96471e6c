r"""The ``pushforward`` command: fit, evaluate, sample and plot flows from the shell.

::

    pushforward fit DATA [--flow NAME] [--layers K] [--hidden 512,512] [--bins B]
                         [--epochs N] [--max-time SECONDS] [--batch-size B]
                         [--lr LR] [--seed S] [--out DIR] [--force] [--json] [--key K]
                         [--levels L] [--dequantize uniform] [--scales K]
                         [--average DECAY] [--checkpoint-every SECONDS] [--resume]
    pushforward eval MODEL_DIR DATA [--json] [--key K]
    pushforward sample MODEL_DIR -n N --out FILE.npy [--seed S] [--force] [--temperature T]
    pushforward plot MODEL_DIR [--out DIR]
    pushforward flows
    pushforward fit-target U1|U2|U3|U4 [--flow planar] [--layers K] [--steps N]
                         [--max-time S] [--lr LR] [--seed S] [--out DIR] [--force] [--json]
    pushforward distill TEACHER_DIR --out DIR [--flow iaf] [--layers K] [--hidden 512,512]
                         [--objective kl|mse|both] [--steps N] [--max-time S] [--batch-size B]
                         [--lr LR] [--seed S] [--force] [--json] [--data DATA] [--key K]
    pushforward vae DATA --out DIR [--posterior NAME] [--flow-length K]
                         [--posterior-option NAME=VALUE ...] [--latent Z] [--hidden W,W]
                         [--context H] [--epochs N] [--max-time S] [--warmup EPOCHS]
                         [--batch-size B] [--lr LR] [--levels L] [--iw-samples K] [--seed S]
                         [--force] [--json] [--key K]

``DATA`` is a built-in name (``fit`` uses its training split, ``eval`` its test split) or a
``.npy``/``.npz``/``.csv`` file (see :func:`pushforward.data.load`). Log-likelihoods are mean
nats per example in the units of the data as given (the standardisation fitted on the training
data is part of the saved model). ``bits_per_dim`` is ``-log_likelihood / (features * ln 2)``:
for continuous data this is a *differential* quantity (it can be negative), not a code length.

**Images.** ``DATA`` of shape ``(N, H, W)`` or ``(N, C, H, W)`` (the built-ins ``mnist`` and
``digits``, or such a file) holds images: integers in ``0 .. L - 1``, with ``L`` intensity
levels (``--levels``; default: 17 for ``digits``, 256 for other ``uint8`` data, else the
maximum + 1). ``fit`` then needs an image flow (default :data:`DEFAULT_IMAGE_FLOW`; ``--scales``
sets its number of multi-scale levels), does not standardise, and models uniformly dequantized
pixels :math:`y = (x + u) / L \in [0, 1)^D` (``--dequantize uniform``, the default): the
training minibatches get fresh noise every step (seeded by ``--seed``), the validation images
(10% of the training images) are dequantized once with ``--seed``, and the test images (and
``eval``'s) once with :data:`EVAL_DEQUANTIZE_SEED`, so every model is measured on the same
points. ``--dequantize variational`` learns the noise :math:`u \sim q(u \mid x)` with the flow
(Flow++'s variational dequantization, :mod:`pushforward.data.dequantization`; the dequantizer
has the options :data:`DEQUANTIZER_OPTIONS` and is saved with the model): every figure is then
the bound :math:`\log p_Y(y) - \log q(u \mid x) - D \log L` with one draw of :math:`u` per
image, from torch's generator seeded as above. Reported figures are in the discrete space
(see :mod:`pushforward.data.images`): ``log_likelihood`` is the mean over images of
:math:`\log p_Y(y) - D \log L` (nats per image, a lower bound on :math:`\log P(x)` in
expectation) and ``bits_per_dim`` is ``-log_likelihood / (D ln 2)``, as for vectors but now a
code length; the training history in ``metrics.json`` is in the same units. ``sample`` writes
integer images ``floor(y L)`` clipped to ``0 .. L - 1`` (``uint8`` when ``L <= 256``);
``--temperature T`` scales the base noise
(:math:`z \sim \mathcal N(0, T^2 I)`) for any flow with a standard normal base. The plots of
an image model are ``samples.png`` (temperatures 0.5, 0.8, 1), ``interpolation.png``
(spherical latent interpolation between test images), ``reconstruction.png`` and, where the
data has labels, ``latent_edit.png`` (see :mod:`pushforward.plots`).

``distill`` trains a student flow (default: an IAF, fast sampling) to reproduce a saved teacher
(e.g. a MAF, fast density) with :func:`pushforward.train.distill`, taking over the teacher's
``layers``, ``hidden``, ``permutation`` and ``base`` options unless given and saving the student
with the teacher's data scaling, so both log-likelihoods are in the data's units. It reports
``KL(student || teacher)``, the test log-likelihood (mean and median) of both on ``--data`` or
the teacher's own data, and the time each takes to draw 10,000 samples.

**Checkpoints and resuming.** ``fit`` checkpoints its run every ``--checkpoint-every``
seconds (default 300) in ``DIR/checkpoint/`` (see :func:`pushforward.train.fit`: weights, best
weights, Adam's state and the random states, safetensors + JSON, written atomically) and removes
the checkpoint once the model, metrics and plots are saved. A run that was killed continues with
the same command plus ``--resume``: it loses at most the steps since the last checkpoint and
ends with the weights an uninterrupted run would have. ``--resume`` needs no ``--force``; it
refuses a checkpoint of another flow, data or setting, and without a checkpoint it is an error
that leaves DIR as it is.

**Several processes.** Under ``torchrun`` ``fit`` trains data-parallel (see
:mod:`pushforward.distributed`), ``--batch-size`` being the global batch; only rank 0 prints,
checkpoints and saves::

    torchrun --standalone --nproc_per_node 2 -m pushforward fit moons --batch-size 512
    torchrun --standalone --nproc_per_node 4 -m pushforward fit mnist --flow glow

(``torchrun ... $(which pushforward) fit ...`` works too.) On the CPU the processes use
``gloo``; the command line builds its flows on the CPU, so every process trains there (set
``OMP_NUM_THREADS`` so that the processes do not oversubscribe the cores).

Every error is one line ``pushforward: error: ...`` on stderr with exit status 1 (argparse
usage errors: status 2); set ``PUSHFORWARD_DEBUG=1`` to see the traceback of an internal error.
Nothing already saved is overwritten without ``--force``, and no file is left half-written.
"""

from __future__ import annotations

import argparse
import io as _bytes_io
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from .core import PushforwardError

__all__ = ["main", "build_parser", "default_flow", "DEFAULT_FLOW", "EVAL_BATCH"]

#: the flow ``fit`` uses without ``--flow`` (the best general tabular density estimator: on the
#: MiniBooNE re-split ``nsf`` scored -15.14 against ``maf``'s -15.62, on moons -2.412 / -2.437)
DEFAULT_FLOW = "nsf"
#: seconds between ``fit``'s checkpoints without ``--checkpoint-every``
DEFAULT_CHECKPOINT_SECONDS = 300.0
#: the folder of ``fit``'s checkpoint inside the model directory
CHECKPOINT_DIR = "checkpoint"
#: the flow ``fit`` uses on images without ``--flow``
DEFAULT_IMAGE_FLOW = "glow"
#: the dequantization modes of ``--dequantize`` (the first is the default)
DEQUANTIZE_MODES = ("uniform", "variational")
#: the options of the dequantizer of ``--dequantize variational``
#: (:class:`~pushforward.data.dequantization.VariationalDequantizer`)
DEQUANTIZER_OPTIONS = {"layers": 4, "hidden": [16]}
#: seed of the single dequantization of test images (``fit``'s test figures and ``eval``)
EVAL_DEQUANTIZE_SEED = 0
#: seed of a VAE's test binarization and importance samples (``vae``'s test figures, ``eval``)
EVAL_SEED = 0
#: images per batch when evaluating or sampling an image flow (bounds memory)
IMAGE_EVAL_BATCH = 500
#: ``fit`` reports the training log-likelihood of images on at most this many training images
#: (a seeded subset: image flows are slow to evaluate on a CPU)
TRAIN_EVAL_IMAGES = 2000
#: intensity levels of the built-in image datasets (``--levels`` overrides)
BUILTIN_LEVELS = {"digits": 17, "mnist": 256}
#: the temperatures of ``samples.png``
PLOT_TEMPERATURES = (0.5, 0.8, 1.0)
#: tried in order when :data:`DEFAULT_FLOW` is not registered
_FALLBACK_FLOWS = ("maf", "realnvp", "lu", "piecewise-linear", "affine")
#: the default flow of ``fit-target``
DEFAULT_TARGET_FLOW = "planar"
#: the default number of ``fit-target`` steps (a fifth of them anneal the target)
DEFAULT_TARGET_STEPS = 5000
#: the default ``fit-target`` learning rate: planar/radial stacks fitted by reverse KL need
#: 1e-2 to reach both modes of U1 in a few thousand steps (1e-3 for 10,000 steps finds one)
DEFAULT_TARGET_LR = 1e-2
#: rows per batch when evaluating or sampling (bounds memory)
EVAL_BATCH = 4096
#: fraction of the training rows held out for validation when the data has no valid split
VALID_FRACTION = 0.1
#: at most this many rows are drawn in the data plots
PLOT_POINTS = 5000
#: the student flow of ``distill`` (fast sampling)
DEFAULT_STUDENT_FLOW = "iaf"
#: number of samples ``distill`` times each model drawing
SPEED_SAMPLES = 10_000
#: options a ``distill`` student takes over from its teacher's config unless given
_INHERITED_OPTIONS = ("layers", "hidden", "permutation", "base")


def default_flow() -> str:
    """:data:`DEFAULT_FLOW` if registered, else the first registered of the fallbacks."""
    from . import flows

    registered = flows.names()
    for name in (DEFAULT_FLOW, *_FALLBACK_FLOWS):
        if name in registered:
            return name
    if not registered:
        raise PushforwardError("no flow is registered")
    return registered[0]


# ---------------------------------------------------------------------------------------------
# argument parsing


def _number_type(cast: type, what: str, positive: bool) -> Any:
    """An argparse ``type``: ``cast`` of the text, finite, and > 0 (``positive``) or >= 0."""

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        ok = math.isfinite(value) and (value > 0 if positive else value >= 0)
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive_int = _number_type(int, "a positive integer", positive=True)
_non_negative_int = _number_type(int, "an integer >= 0", positive=False)
_positive_float = _number_type(float, "a positive number", positive=True)
_non_negative_float = _number_type(float, "a number >= 0", positive=False)


def _option(text: str) -> tuple[str, Any]:
    """``NAME=VALUE`` of a recipe option: the value an integer, a number, a comma-separated
    list of integers, or else the text."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    for parse in (int, float, lambda v: tuple(int(w) for w in v.split(","))):
        try:
            return name.strip(), parse(value)
        except ValueError:
            pass
    return name.strip(), value.strip()


def _decay(text: str) -> float:
    value = _positive_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"expected a decay in (0, 1), got {text!r}")
    return value


def _hidden(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        widths = ()
    if not widths or any(w < 1 for w in widths):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive widths like 512,512, got {text!r}"
        )
    return widths


def _levels(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 2, got {text!r}") from None
    if value < 2:
        raise argparse.ArgumentTypeError(f"need at least 2 intensity levels, got {text!r}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"seed must be in [0, 2**32), got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line (no usage block), pointing at ``--help``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"pushforward: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``pushforward`` command."""
    parser = _Parser(
        prog="pushforward",
        description="Normalizing flows: fit a density to data, evaluate, sample and plot it.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("fit", help="fit a flow to data and save it")
    p.add_argument("data", metavar="DATA", help="built-in name or .npy/.npz/.csv file")
    p.add_argument("--flow", metavar="NAME", help="registered flow (see `pushforward flows`)")
    p.add_argument("--layers", type=_positive_int, metavar="K", help="number of flow layers")
    p.add_argument(
        "--hidden", type=_hidden, metavar="W,W", help="conditioner hidden widths, e.g. 512,512"
    )
    p.add_argument("--bins", type=_positive_int, metavar="B", help="number of spline bins")
    p.add_argument("--epochs", type=_positive_int, metavar="N", help="maximum number of epochs")
    p.add_argument("--max-time", type=_positive_float, metavar="SECONDS", help="time budget")
    p.add_argument("--batch-size", type=_positive_int, metavar="B", help="minibatch size")
    p.add_argument("--lr", type=_positive_float, help="Adam learning rate")
    p.add_argument("--seed", type=_seed, default=0, metavar="S", help="random seed (default 0)")
    p.add_argument("--out", metavar="DIR", help="model directory (default runs/DATA-FLOW)")
    p.add_argument("--force", action="store_true", help="overwrite a model in DIR")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    p.add_argument("--key", metavar="K", help="array of a .npz file (default: the first)")
    p.add_argument(
        "--levels",
        type=_levels,
        metavar="L",
        help="images: number of intensity levels (default: 17 for digits, 256 for uint8 data, "
        "else max + 1)",
    )
    p.add_argument(
        "--dequantize",
        choices=DEQUANTIZE_MODES,
        help="images: how pixels are dequantized: uniform noise (default) or noise learned "
        "with the flow (variational, Flow++)",
    )
    p.add_argument(
        "--scales",
        type=_positive_int,
        metavar="K",
        help="image flows: number of multi-scale levels (the recipe option 'levels')",
    )
    p.add_argument(
        "--average",
        type=_decay,
        metavar="DECAY",
        help="validate and keep an exponential moving average of the weights with this decay, "
        "e.g. 0.999 (default: the weights themselves)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=_positive_float,
        default=DEFAULT_CHECKPOINT_SECONDS,
        metavar="SECONDS",
        help=f"seconds between checkpoints in DIR/{CHECKPOINT_DIR}/ (default "
        f"{DEFAULT_CHECKPOINT_SECONDS:g})",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help=f"continue the interrupted run in DIR from DIR/{CHECKPOINT_DIR}/ (same command)",
    )

    p = sub.add_parser("eval", help="mean log-likelihood of a saved model on data")
    p.add_argument("model", metavar="MODEL_DIR")
    p.add_argument("data", metavar="DATA")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--key", metavar="K", help="array of a .npz file (default: the first)")
    p.add_argument(
        "--iw-samples",
        type=_positive_int,
        default=1000,
        metavar="K",
        help="VAE models: importance samples of the log-likelihood estimate (default 1000)",
    )

    p = sub.add_parser(
        "vae", help="fit a VAE with a flow posterior to binarized images (or [0,1] vectors)"
    )
    p.add_argument("data", metavar="DATA", help="built-in name (mnist, digits) or a file")
    p.add_argument(
        "--posterior",
        default="gaussian",
        metavar="NAME",
        help="gaussian, or a registered flow: planar, radial, householder, iaf, cclinIAF, "
        "sylvester-orthogonal, sylvester-householder, sylvester-triangular (default gaussian)",
    )
    p.add_argument("--flow-length", type=_positive_int, metavar="K", help="posterior flow layers")
    p.add_argument(
        "--posterior-option",
        type=_option,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a further option of the posterior flow's recipe, e.g. columns=8 (the Sylvester "
        "M), reflections=4, hidden=64,64; repeatable",
    )
    p.add_argument("--latent", type=_positive_int, default=32, metavar="Z", help="default 32")
    p.add_argument(
        "--hidden", type=_hidden, metavar="W,W", help="encoder/decoder widths (default 300)"
    )
    p.add_argument(
        "--context", type=_positive_int, default=300, metavar="H", help="size of h (default 300)"
    )
    p.add_argument("--epochs", type=_positive_int, metavar="N", help="maximum number of epochs")
    p.add_argument("--max-time", type=_positive_float, metavar="SECONDS", help="time budget")
    p.add_argument(
        "--warmup", type=_non_negative_float, metavar="EPOCHS", help="KL warm-up (default 10)"
    )
    p.add_argument("--batch-size", type=_positive_int, metavar="B", help="minibatch size")
    p.add_argument("--lr", type=_positive_float, help="Adam learning rate")
    p.add_argument("--levels", type=_positive_int, metavar="L", help="intensity levels")
    p.add_argument(
        "--iw-samples",
        type=_positive_int,
        default=100,
        metavar="K",
        help="importance samples of the reported test log-likelihood (default 100; "
        "`eval` uses 1000)",
    )
    p.add_argument("--seed", type=_seed, default=0, metavar="S", help="random seed (default 0)")
    p.add_argument("--out", required=True, metavar="DIR", help="model directory")
    p.add_argument("--force", action="store_true", help="overwrite a model in DIR")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    p.add_argument("--key", metavar="K", help="array of a .npz file (default: the first)")

    p = sub.add_parser("sample", help="draw samples from a saved model into a .npy file")
    p.add_argument("model", metavar="MODEL_DIR")
    p.add_argument("-n", type=_positive_int, required=True, metavar="N", help="number of samples")
    p.add_argument("--out", required=True, metavar="FILE.npy")
    p.add_argument("--seed", type=_seed, default=0, metavar="S", help="random seed (default 0)")
    p.add_argument("--force", action="store_true", help="overwrite FILE.npy")
    p.add_argument(
        "--temperature",
        type=_non_negative_float,
        default=1.0,
        metavar="T",
        help="scale of the base noise, z ~ N(0, T^2 I) (default 1)",
    )

    p = sub.add_parser("plot", help="draw a saved model's plots again")
    p.add_argument("model", metavar="MODEL_DIR")
    p.add_argument("--out", metavar="DIR", help="folder for the images (default MODEL_DIR)")

    sub.add_parser("flows", help="list the registered flows")

    p = sub.add_parser("fit-target", help="fit a flow to an unnormalized 2-D target density")
    p.add_argument("target", metavar="TARGET", help="U1, U2, U3 or U4")
    p.add_argument(
        "--flow",
        default=DEFAULT_TARGET_FLOW,
        metavar="NAME",
        help="registered flow (default: planar)",
    )
    p.add_argument("--layers", type=_positive_int, metavar="K", help="number of flow layers")
    p.add_argument(
        "--steps",
        type=_positive_int,
        metavar="N",
        help="number of optimisation steps (default 5000)",
    )
    p.add_argument(
        "--anneal",
        type=_non_negative_int,
        metavar="STEPS",
        help="raise the target's inverse temperature from 0.01 to 1 over the first STEPS "
        "steps (Rezende & Mohamed 2015, section 6.1; default: a fifth of --steps; 0: off)",
    )
    p.add_argument(
        "--box",
        type=_non_negative_float,
        default=4.0,
        metavar="B",
        help="confine the target to [-B, B]^2 by a steep wall, which makes U2-U4 normalisable "
        "(default 4, the paper's plotting box; 0: the bare potential)",
    )
    p.add_argument("--max-time", type=_positive_float, metavar="SECONDS", help="time budget")
    p.add_argument("--lr", type=_positive_float, help="Adam learning rate (default 1e-2)")
    p.add_argument("--seed", type=_seed, default=0, metavar="S", help="random seed (default 0)")
    p.add_argument("--out", metavar="DIR", help="model directory (default runs/TARGET-FLOW)")
    p.add_argument("--force", action="store_true", help="overwrite a model in DIR")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")

    p = sub.add_parser(
        "distill", help="train a fast-sampling student (IAF) from a saved teacher flow (MAF)"
    )
    p.add_argument("teacher", metavar="TEACHER_DIR", help="model directory of the teacher")
    p.add_argument("--out", required=True, metavar="DIR", help="model directory of the student")
    p.add_argument(
        "--flow",
        default=DEFAULT_STUDENT_FLOW,
        metavar="NAME",
        help=f"registered student flow (default: {DEFAULT_STUDENT_FLOW})",
    )
    p.add_argument(
        "--layers", type=_positive_int, metavar="K", help="student layers (default: teacher's)"
    )
    p.add_argument(
        "--hidden", type=_hidden, metavar="W,W", help="student hidden widths (default: teacher's)"
    )
    p.add_argument(
        "--objective",
        default="both",
        metavar="kl|mse|both",
        help="KL(student || teacher), the MSE on the teacher's (x, z) pairs, or their sum "
        "(default: both)",
    )
    p.add_argument(
        "--steps",
        type=_positive_int,
        metavar="N",
        help="number of optimisation steps (default 10000)",
    )
    p.add_argument("--max-time", type=_positive_float, metavar="SECONDS", help="time budget")
    p.add_argument("--batch-size", type=_positive_int, metavar="B", help="samples per step")
    p.add_argument("--lr", type=_positive_float, help="Adam learning rate")
    p.add_argument("--seed", type=_seed, default=0, metavar="S", help="random seed (default 0)")
    p.add_argument("--force", action="store_true", help="overwrite a model in DIR")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    p.add_argument(
        "--data",
        metavar="DATA",
        help="data to compare teacher and student on (default: the teacher's data, test split)",
    )
    p.add_argument("--key", metavar="K", help="array of a .npz file (default: the first)")
    return parser


# ---------------------------------------------------------------------------------------------
# helpers


def _say(text: str) -> None:
    print(text, file=sys.stderr)


def _warn(text: str) -> None:
    _say(f"pushforward: warning: {_one_line(text)}")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _num(value: float | None) -> float | None:
    """A JSON-safe float (``None`` for NaN/inf)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed)


#: command-line flags of recipe options whose flag is not ``--OPTION``
_OPTION_FLAGS = {"levels": "--scales"}


def _recipe_options(flow: str, given: dict[str, Any]) -> dict[str, Any]:
    """The options the user gave, checked against the recipe before any work is done."""
    from . import flows

    recipe = flows.describe(flow)
    allowed = recipe.options
    options = _given(**given)
    for key in options:
        if key not in allowed:
            flag = _OPTION_FLAGS.get(key, "--" + key.replace("_", "-"))
            raise PushforwardError(
                f"flow {flow!r} has no option {key!r} ({flag}); its options are: "
                f"{', '.join(allowed) or 'none'}"
            )
    return options


def _given(**options: Any) -> dict[str, Any]:
    """The options the user gave (those not ``None``)."""
    return {k: v for k, v in options.items() if v is not None}


def _split_valid(rows: Any, seed: int, source: str, what: str) -> tuple[Any, Any]:
    """``(valid, fit)``: :data:`VALID_FRACTION` of ``rows`` (at least one), by a seeded
    permutation, and the rest."""
    import numpy as np
    import torch

    if len(rows) < 2:
        raise PushforwardError(f"{source}: need at least 2 {what} to fit, got {len(rows)}")
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(rows)))
    n_valid = max(1, round(VALID_FRACTION * len(rows)))
    return rows[order[:n_valid]], rows[order[n_valid:]]


def _check_out(out: Path, force: bool, resume: bool = False) -> None:
    from . import io, train

    if out.exists() and not out.is_dir():
        raise PushforwardError(f"--out {out} exists and is not a directory")
    if resume:
        if not (out / CHECKPOINT_DIR / train.CHECKPOINT_FILE).is_file():
            done = " (its run finished: the model is saved)" if io.has_model(out) else ""
            raise PushforwardError(
                f"--resume: {out} has no checkpoint{done} "
                f"({out / CHECKPOINT_DIR / train.CHECKPOINT_FILE} not found); run without "
                "--resume to start afresh"
            )
        return
    if io.has_model(out) and not force:
        raise PushforwardError(
            f"{out} already holds a model; pass --force to overwrite it or --out to choose "
            "another directory"
        )


def _checkpointing(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """``fit``'s checkpoint arguments for a run saved in ``out``."""
    return {
        "checkpoint": out / CHECKPOINT_DIR,
        "checkpoint_every": args.checkpoint_every,
        "resume": args.resume,
    }


def _drop_checkpoint(out: Path) -> None:
    """Remove the checkpoint of a run whose model, metrics and plots are saved."""
    from . import train

    folder = out / CHECKPOINT_DIR
    for name in (train.CHECKPOINT_FILE, train.CHECKPOINT_JSON):
        (folder / name).unlink(missing_ok=True)
        for partial in folder.glob(f".{name}.*.tmp"):  # left by a run killed while writing
            partial.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:  # absent, or holds files of someone else's
        pass


def _label(source: str) -> str:
    """A short name for a data source, used in default output folders."""
    from .data import is_builtin

    return source if is_builtin(source) else (Path(source).stem or "data")


def _matrix(array: Any, source: str):
    """A ``(rows, features)`` float32 tensor of the examples in ``array``."""
    import numpy as np
    import torch

    if array.ndim != 2:
        raise PushforwardError(
            f"{source}: expected a (rows, features) array, got shape {tuple(array.shape)}"
        )
    with np.errstate(over="ignore"):
        x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if not bool(torch.isfinite(x).all()):
        raise PushforwardError(f"{source}: values too large for float32 (they overflow)")
    return x


def _log_probs(flow: Any, x: Any, batch: int = EVAL_BATCH):
    """``flow.log_prob`` of every row, in batches of ``batch`` rows (float64)."""
    import torch

    dtype = next((t.dtype for t in flow.state_dict().values() if t.is_floating_point()), None)
    parts = []
    with torch.no_grad():
        for chunk in x.split(batch):
            if dtype is not None:
                chunk = chunk.to(dtype)
            parts.append(flow.log_prob(chunk).double())
    return torch.cat(parts)


def _mean_log_likelihood(flow: Any, x: Any, what: str, batch: int = EVAL_BATCH) -> float:
    import torch

    lp = _log_probs(flow, x, batch)
    bad = ~torch.isfinite(lp)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise PushforwardError(
            f"the model's log-density is not finite for {int(bad.sum())} of {len(lp)} rows of "
            f"{what} (the first is row {first})"
        )
    return float(lp.mean())


def _bits_per_dim(log_likelihood: float, features: int) -> float:
    """Differential bits per dimension: ``-log_likelihood / (features ln 2)``."""
    return -log_likelihood / (features * math.log(2.0))


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, allow_nan=False))


def _history_dict(history: Any) -> dict[str, Any]:
    to_dict = getattr(history, "to_dict", None)
    return _sanitize(to_dict() if callable(to_dict) else dict(vars(history)))


def _sanitize(obj: Any) -> Any:
    """Replace NaN/inf floats by ``None`` so the object is strict JSON."""
    if isinstance(obj, float):
        return _num(obj)
    if isinstance(obj, dict):
        return {k: _sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_sanitize(v) for v in obj]
    return obj


def _history_from_dict(d: dict[str, Any]) -> Any:
    """A ``train.History`` again (for ``plots.training_curves``), or the dict if impossible."""
    try:
        from . import train

        cls = getattr(train, "History", None)
        from_dict = getattr(cls, "from_dict", None)
        if callable(from_dict):
            return from_dict(d)
        import dataclasses

        if cls is not None and dataclasses.is_dataclass(cls):
            names = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in d.items() if k in names})
    except Exception:  # fall back to the dict: plots may accept it
        pass
    return d


def _plot_data(config: dict[str, Any]):
    """The training data a model was fitted on, or ``None`` if it cannot be found now."""
    from .data import load

    source = config.get("data_path") or config.get("data")
    if not source:
        return None
    try:
        return _matrix(load(source, "train", config.get("key")), source)
    except PushforwardError as e:
        _warn(f"skipping the data plots: {e}")
        return None


def _draw_plots(
    flow: Any,
    config: dict[str, Any],
    history: Any,
    out: Path,
    data: Any = None,
    strict: bool = False,
    results: dict[str, Any] | None = None,
) -> list[Path]:
    """Draw the plots of a model into ``out``; failures are warnings unless ``strict``. For an
    image model ``data`` is ``(images, labels)`` (either may be ``None``) and ``results``, if
    given, receives ``reconstruction_max_abs_error``."""
    import torch

    drawn: list[Path] = []

    def attempt(name: str, draw: Callable[[Path], Any]) -> None:
        path = out / name
        try:
            draw(path)
            drawn.append(path)
        except Exception as e:
            if strict:
                raise PushforwardError(f"could not draw {path}: {_one_line(e)}") from None
            _warn(f"could not draw {path}: {e}")

    try:
        from . import plots
    except ImportError as e:
        if strict:
            raise PushforwardError(f"plotting is unavailable: {e}") from None
        _warn(f"skipping plots: {e}")
        return drawn
    out.mkdir(parents=True, exist_ok=True)
    if history is not None:
        attempt("training_curves.png", lambda p: plots.training_curves(history, p))
    if _is_image_model(config):
        images, labels = data if data is not None else (None, None)
        _image_plots(plots, flow, config, images, labels, attempt, results)
        return drawn
    target = config.get("target")
    if target:
        from .data.potentials import potential

        density = potential(target, config.get("box"))
        attempt("target_vs_flow.png", lambda p: plots.target_vs_flow(flow, density, p))
        return drawn
    features = int(config["features"])
    if features == 1:
        attempt("change_of_variables.png", lambda p: plots.change_of_variables_1d(flow, p))
        return drawn
    if data is None:
        return drawn
    if len(data) > PLOT_POINTS:
        g = torch.Generator().manual_seed(0)
        data = data[torch.randperm(len(data), generator=g)[:PLOT_POINTS]]
    if features == 2:
        attempt("density.png", lambda p: plots.density_2d(flow, data, p))
    else:
        torch.manual_seed(0)

        def pairs(p: Path) -> None:
            with torch.no_grad():
                samples = flow.sample(len(data)).float()
            plots.pairs(data, samples, p)

        attempt("pairs.png", pairs)
    return drawn


# ---------------------------------------------------------------------------------------------
# images


def _holds_images(array: Any) -> bool:
    """Whether a loaded ``DATA`` array is images: ``(N, H, W)``, ``(N, C, H, W)`` or (an error
    later) more dimensions; ``(rows, features)`` is vectors."""
    return getattr(array, "ndim", 2) >= 3


def _is_image_model(config: dict[str, Any]) -> bool:
    """Whether a saved model is over images (its ``features`` is an event shape ``[C, H, W]``)."""
    features = config.get("features")
    return isinstance(features, list) and len(features) == 3


def _image_flow_names() -> str:
    from . import flows

    return ", ".join(n for n in flows.names() if flows.describe(n).image) or "none"


def _check_flow_kind(name: str, images: bool, source: str, shape: Sequence[int]) -> None:
    """One clear line when a vector flow meets images or an image flow meets vectors."""
    from . import flows

    if flows.describe(name).image == images:
        return
    if images:
        raise PushforwardError(
            f"flow {name!r} is a vector flow, but {source} holds images of shape "
            f"{tuple(shape)}; use an image flow ({_image_flow_names()})"
        )
    raise PushforwardError(
        f"flow {name!r} is an image flow, but {source} holds vectors of shape {tuple(shape)} "
        f"(rows, features); image flows need integer images (N, H, W) or (N, C, H, W), "
        f"vectors need a vector flow (e.g. {default_flow()})"
    )


def _images(array: Any, source: str, levels: int | None, hint: str = ""):
    """``(images, L)``: ``array`` as an integer ``(N, C, H, W)`` tensor and its number of
    intensity levels (``levels`` if given, else the built-in dataset's, else the
    :func:`~pushforward.data.images.as_images` default); values must lie in ``0 .. L - 1``
    (``hint`` is added to that error)."""
    from .data.images import as_images

    given = levels if levels is not None else BUILTIN_LEVELS.get(source)
    try:
        return as_images(array, given, name=source)
    except PushforwardError as e:
        if hint and given is not None and "is outside" in str(e):
            raise PushforwardError(f"{e}; {hint}") from None
        raise


def _dequantized(images: Any, levels: int, seed: int):
    """The images dequantized once, :math:`(x + u) / L`, with noise from ``seed`` (float32)."""
    import torch

    from .data.images import dequantize_uniform

    return dequantize_uniform(images, levels, generator=torch.Generator().manual_seed(seed))


def _discrete_log_likelihood(flow: Any, images: Any, levels: int, seed: int, what: str) -> float:
    """Mean over images of :math:`\\log p_Y(y) - D \\log L`, ``y`` dequantized once with
    ``seed`` (a :class:`~pushforward.data.dequantization.DequantizedFlow`: the variational
    bound, :math:`- \\log q(u \\mid x)` added, ``u`` drawn from torch's generator seeded with
    ``seed``): nats per image in the discrete space."""
    import torch

    from .data.dequantization import DequantizationBound, DequantizedFlow

    dims = math.prod(images.shape[1:])
    offset = dims * math.log(levels)
    if isinstance(flow, DequantizedFlow):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            bound = DequantizationBound(flow)
            return _mean_log_likelihood(bound, images.float(), what, IMAGE_EVAL_BATCH) - offset
    y = _dequantized(images, levels, seed)
    return _mean_log_likelihood(flow, y, what, IMAGE_EVAL_BATCH) - offset


def _discrete_history(history: Any, offset: float) -> Any:
    """``history`` with its losses and validation log-likelihoods moved by the dequantization
    offset :math:`D \\log L` into the discrete space (nats per image)."""
    import dataclasses

    if not dataclasses.is_dataclass(history):
        return history
    best = history.best_valid_log_likelihood
    return dataclasses.replace(
        history,
        train_loss=[v + offset for v in history.train_loss],
        valid_log_likelihood=[v - offset for v in history.valid_log_likelihood],
        best_valid_log_likelihood=None if best is None else best - offset,
    )


def _model_levels(config: dict[str, Any], where: Any) -> int:
    levels = config.get("levels")
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise PushforwardError(
            f"{where}: an image model's config needs 'levels' (an integer >= 2), got {levels!r}"
        )
    return levels


def _quantized(y: Any, levels: int):
    """Samples in ``[0, 1)`` as integer pixels ``floor(y L)`` clipped to ``0 .. L - 1``
    (``uint8`` for ``L <= 256``, ``uint16`` for ``L <= 65536``, else ``int64``); non-finite
    values become 0."""
    import numpy as np

    with np.errstate(invalid="ignore"):
        q = np.clip(np.floor(np.nan_to_num(y, nan=0.0) * levels), 0, levels - 1)
    dtype = np.uint8 if levels <= 256 else np.uint16 if levels <= 65536 else np.int64
    return q.astype(dtype)


def _builtin_labels(source: str, split: str):
    """The labels of a built-in image dataset's split, or ``None`` if it has none."""
    from .data.images import load_digits, load_mnist

    loader = {"mnist": load_mnist, "digits": load_digits}.get(source)
    return None if loader is None else loader(split, labels=True)[1]


def _image_plot_data(config: dict[str, Any], where: Any) -> tuple[Any, Any] | None:
    """``(images, labels)`` to draw an image model's plots with: a built-in dataset's test
    split and labels, else the model's data file (no labels); ``None`` (a warning) if the data
    cannot be read now."""
    from .data import is_builtin, load, splits

    name = config.get("data")
    source = config.get("data_path") or name
    if not source:
        return None
    levels = _model_levels(config, where)
    try:
        if isinstance(name, str) and is_builtin(name):
            split = "test" if "test" in splits(name) else "train"
            images, _ = _images(load(name, split), name, levels)
            return images, _builtin_labels(name, split)
        images, _ = _images(load(source, "train", config.get("key")), str(source), levels)
        return images, None
    except PushforwardError as e:
        _warn(f"skipping the image plots that need data: {e}")
        return None


def _image_plots(
    plots: Any,
    flow: Any,
    config: dict[str, Any],
    images: Any,
    labels: Any,
    attempt: Callable[[str, Callable[[Path], Any]], None],
    results: dict[str, Any] | None,
) -> None:
    """samples.png, then with images interpolation.png and reconstruction.png, and with labels
    latent_edit.png. Images are shown at their bin midpoints :math:`(x + 1/2) / L`."""
    import numpy as np
    import torch

    levels = _model_levels(config, "config")
    attempt(
        "samples.png",
        lambda p: plots.image_samples(flow, p, temperatures=PLOT_TEMPERATURES, levels=levels),
    )
    if images is None or len(images) == 0:
        return
    y = (images.double() + 0.5) / levels
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    shown = y[order[:8]]
    if len(shown) >= 2:
        attempt(
            "interpolation.png",
            lambda p: plots.interpolation(flow, shown, p, pairs=len(shown) // 2, levels=levels),
        )

    def reconstruction(path: Path) -> None:
        _, error = plots.reconstruction(flow, shown, path, levels=levels)
        if results is not None:
            results["reconstruction_max_abs_error"] = error

    attempt("reconstruction.png", reconstruction)
    if labels is None:
        _say(f"pushforward: note: {config.get('data')} has no labels: latent_edit.png skipped")
        return
    labels = np.asarray(labels)[order.numpy()]
    present = sorted(set(labels.tolist()))
    if len(present) < 2:
        _say("pushforward: note: the images have fewer than two labels: latent_edit.png skipped")
        return
    b, a = present[0], present[1]
    # at most 200 images of each label for the mean latents (image flows are slow on a CPU)
    keep = np.concatenate([np.flatnonzero(labels == v)[:200] for v in (a, b)])
    attempt(
        "latent_edit.png",
        lambda p: plots.latent_edit(
            flow, y[order][keep], labels[keep], p, label_a=a, label_b=b, levels=levels
        ),
    )


def _fit_images(args: argparse.Namespace, array: Any) -> int:
    """``fit`` on images (see the module docstring)."""
    import torch

    from . import io, train
    from .data import is_builtin, load, splits
    from .data.dequantization import DequantizationBound
    from .data.images import dequantize_uniform
    from .distributed import is_main

    name = args.flow or DEFAULT_IMAGE_FLOW
    _check_flow_kind(name, True, args.data, array.shape[1:])
    given = {"layers": args.layers, "hidden": args.hidden, "bins": args.bins, "levels": args.scales}
    options = _recipe_options(name, given)
    out = Path(args.out) if args.out else Path("runs") / f"{_label(args.data)}-{name}"
    _check_out(out, args.force, args.resume)
    dequantize = args.dequantize or DEQUANTIZE_MODES[0]

    builtin = is_builtin(args.data)
    images, levels = _images(
        array, args.data, args.levels, "--levels must be at least the largest pixel value + 1"
    )
    shape = tuple(int(s) for s in images.shape[1:])
    dims = math.prod(shape)
    offset = dims * math.log(levels)
    _seed_everything(args.seed)
    if builtin and "valid" in splits(args.data):
        fit_images = images
        valid_images, _ = _images(load(args.data, "valid"), args.data, levels)
    else:
        valid_images, fit_images = _split_valid(images, args.seed, args.data, "images")

    training = _given(
        epochs=args.epochs,
        max_time=args.max_time,
        batch_size=args.batch_size,
        lr=args.lr,
        average=args.average,
    )
    extras: dict[str, Any] = {
        "data": args.data,
        "levels": levels,
        "dequantize": dequantize,
        "seed": args.seed,
        "training": training,
    }
    if not builtin:
        extras["data_path"] = str(Path(args.data).expanduser().resolve())
    if args.key is not None:
        extras["key"] = args.key
    if dequantize == "variational":
        extras["dequantizer"] = DEQUANTIZER_OPTIONS
    config = io.make_config(name, list(shape), 0, options, None, **extras)
    try:
        flow = io.model_from_config(config, f"flow {name!r} on {args.data} images {shape}")
    except PushforwardError as e:
        hint = " (--scales sets a flow's levels)" if "levels" in str(e) else ""
        raise PushforwardError(f"{e}{hint}") from None

    if dequantize == "variational":  # fit trains the bound; it draws the noise itself
        trained, valid_y, preprocess = DequantizationBound(flow), valid_images.float(), None
    else:
        trained, valid_y = flow, _dequantized(valid_images, levels, args.seed)
        preprocess = lambda x: dequantize_uniform(x, levels, dtype=x.dtype)  # noqa: E731
    history = train.fit(
        trained,
        fit_images.float(),
        valid_y,
        seed=args.seed,
        progress=True,
        preprocess=preprocess,
        **_checkpointing(args, out),
        **training,
    )
    flow.eval()
    if not is_main():  # under torchrun only rank 0 measures and saves
        return 0
    history = _discrete_history(history, offset)

    g = torch.Generator().manual_seed(args.seed)
    subset = fit_images[torch.randperm(len(fit_images), generator=g)[:TRAIN_EVAL_IMAGES]]
    metrics: dict[str, Any] = {
        "data": args.data,
        "flow": name,
        "shape": list(shape),
        "features": dims,
        "levels": levels,
        "dequantize": dequantize,
        "n_train": len(fit_images),
        "n_valid": len(valid_images),
        "n_train_eval": len(subset),
    }
    ll = _discrete_log_likelihood(flow, subset, levels, args.seed, "the training images")
    metrics.update(train_log_likelihood=ll, train_bits_per_dim=_bits_per_dim(ll, dims))
    if history.best_valid_log_likelihood is not None:  # the weights kept were chosen on it
        ll = history.best_valid_log_likelihood
    else:
        ll = _discrete_log_likelihood(
            flow, valid_images, levels, args.seed, "the validation images"
        )
    metrics.update(valid_log_likelihood=ll, valid_bits_per_dim=_bits_per_dim(ll, dims))
    plot_images, plot_labels = valid_images, None
    if builtin and "test" in splits(args.data):
        test_images, _ = _images(load(args.data, "test"), args.data, levels)
        ll = _discrete_log_likelihood(
            flow, test_images, levels, EVAL_DEQUANTIZE_SEED, "the test images"
        )
        metrics.update(
            n_test=len(test_images),
            test_log_likelihood=ll,
            test_bits_per_dim=_bits_per_dim(ll, dims),
        )
        plot_images, plot_labels = test_images, _builtin_labels(args.data, "test")
    metrics.update(
        epochs=history.epochs,
        steps=history.steps,
        best_epoch=history.best_epoch,
        seconds=history.seconds,
        stopped=history.stopped,
        seed=args.seed,
        options=config["options"],
        history=_history_dict(history),
    )

    io.save_model(out, flow, config, force=args.force or args.resume)
    results: dict[str, Any] = {}
    _draw_plots(flow, config, history, out, data=(plot_images, plot_labels), results=results)
    metrics.update(results)
    metrics = _sanitize(metrics)
    io.write_json(out / io.METRICS_FILE, metrics)
    _drop_checkpoint(out)

    if args.json:
        _print_json(metrics)
    else:
        splits_done = [s for s in ("train", "valid", "test") if f"{s}_log_likelihood" in metrics]

        def row(key: str) -> str:
            values = [(s, metrics[f"{s}_{key}"]) for s in splits_done]
            return ", ".join(f"{s} {'nan' if v is None else f'{v:.4f}'}" for s, v in values)

        print(
            f"saved {out} (flow {name}, images {'x'.join(map(str, shape))}, {levels} levels, "
            f"{dequantize} dequantization)"
        )
        print(f"log-likelihood (nats/image, discrete): {row('log_likelihood')}")
        print(f"bits/dim (discrete): {row('bits_per_dim')}")
        print(
            f"epochs: {metrics['epochs']}, steps: {metrics['steps']}, seconds: "
            f"{metrics['seconds']:.1f}, stopped: {metrics['stopped']}"
        )
    return 0


def _eval_images(args: argparse.Namespace, flow: Any, config: dict[str, Any]) -> int:
    """``eval`` of an image model: discrete log-likelihood and bits/dim of DATA's images
    dequantized once with :data:`EVAL_DEQUANTIZE_SEED`."""
    from .data import load

    shape = tuple(config["features"])
    levels = _model_levels(config, Path(args.model) / "config.json")
    array = load(args.data, "test", args.key)
    if not _holds_images(array):
        raise PushforwardError(
            f"the model is an image model of shape {shape}, but {args.data} holds vectors of "
            f"shape {tuple(array.shape)} (rows, features)"
        )
    images, _ = _images(array, args.data, levels, f"the model was fitted to {levels} levels")
    if tuple(images.shape[1:]) != shape:
        raise PushforwardError(
            f"the model takes images of shape {shape} (channels, height, width), {args.data} "
            f"holds images of shape {tuple(images.shape[1:])}"
        )
    dims = math.prod(shape)
    ll = _discrete_log_likelihood(flow, images, levels, EVAL_DEQUANTIZE_SEED, args.data)
    result = {
        "log_likelihood": ll,
        "bits_per_dim": _bits_per_dim(ll, dims),
        "n": len(images),
        "features": dims,
        "levels": levels,
        "shape": list(shape),
        "dequantize": config.get("dequantize", DEQUANTIZE_MODES[0]),
        "model": str(args.model),
        "data": args.data,
    }
    if args.json:
        _print_json(_sanitize(result))
    else:
        print(f"log_likelihood: {ll:.6f} nats/image (discrete, {levels} levels)")
        print(f"bits_per_dim: {result['bits_per_dim']:.6f} (discrete)")
        print(f"n: {len(images)}")
        print(f"features: {dims} (images {'x'.join(map(str, shape))})")
    return 0


# ---------------------------------------------------------------------------------------------
# commands


def _cmd_fit(args: argparse.Namespace) -> int:

    from . import io, train
    from .data import is_builtin, load, splits
    from .distributed import is_main
    from .transforms.linear import Standardization

    array = load(args.data, "train", args.key)
    if _holds_images(array):
        return _fit_images(args, array)
    for flag, value in (("--levels", args.levels), ("--dequantize", args.dequantize)):
        if value is not None:
            raise PushforwardError(
                f"{flag} applies to images, but {args.data} holds vectors of shape "
                f"{tuple(array.shape)} (rows, features)"
            )
    name = args.flow or default_flow()
    _check_flow_kind(name, False, args.data, array.shape)
    given = {"layers": args.layers, "hidden": args.hidden, "bins": args.bins, "levels": args.scales}
    options = _recipe_options(name, given)
    out = Path(args.out) if args.out else Path("runs") / f"{_label(args.data)}-{name}"
    _check_out(out, args.force, args.resume)

    builtin = is_builtin(args.data)
    data = _matrix(array, args.data)
    _seed_everything(args.seed)
    if builtin and "valid" in splits(args.data):
        fit_rows = data
        valid_rows = _matrix(load(args.data, "valid"), args.data)
    else:
        valid_rows, fit_rows = _split_valid(data, args.seed, args.data, "rows")
    features = int(data.shape[1])
    scaling = Standardization.from_data(fit_rows)

    training = _given(
        epochs=args.epochs,
        max_time=args.max_time,
        batch_size=args.batch_size,
        lr=args.lr,
        average=args.average,
    )
    extras: dict[str, Any] = {"data": args.data, "seed": args.seed, "training": training}
    if not builtin:
        extras["data_path"] = str(Path(args.data).expanduser().resolve())
    if args.key is not None:
        extras["key"] = args.key
    config = io.make_config(name, features, 0, options, (scaling.loc, scaling.scale), **extras)
    flow = io.model_from_config(config)

    start = time.perf_counter()
    history = train.fit(
        flow,
        fit_rows,
        valid_rows,
        seed=args.seed,
        progress=True,
        **_checkpointing(args, out),
        **training,
    )
    flow.eval()
    if not is_main():  # under torchrun only rank 0 measures and saves
        return 0

    metrics: dict[str, Any] = {
        "data": args.data,
        "flow": name,
        "features": features,
        "n_train": len(fit_rows),
        "n_valid": len(valid_rows),
        "train_log_likelihood": _mean_log_likelihood(flow, fit_rows, "the training data"),
        "valid_log_likelihood": _mean_log_likelihood(flow, valid_rows, "the validation data"),
    }
    if builtin and "test" in splits(args.data):
        test_rows = _matrix(load(args.data, "test"), args.data)
        ll = _mean_log_likelihood(flow, test_rows, "the test data")
        metrics.update(
            n_test=len(test_rows),
            test_log_likelihood=ll,
            test_bits_per_dim=_bits_per_dim(ll, features),
        )
    metrics.update(
        epochs=getattr(history, "epochs", None),
        steps=getattr(history, "steps", None),
        skipped_steps=getattr(history, "skipped", 0),
        best_epoch=getattr(history, "best_epoch", None),
        seconds=getattr(history, "seconds", time.perf_counter() - start),
        stopped=getattr(history, "stopped", None),
        seed=args.seed,
        options=config["options"],
        history=_history_dict(history),
    )
    metrics = _sanitize(metrics)

    io.save_model(out, flow, config, force=args.force or args.resume)
    io.write_json(out / io.METRICS_FILE, metrics)
    _draw_plots(flow, config, history, out, data=fit_rows)
    _drop_checkpoint(out)

    if args.json:
        _print_json(metrics)
    else:
        parts = [f"train {metrics['train_log_likelihood']:.4f}"]
        parts.append(f"valid {metrics['valid_log_likelihood']:.4f}")
        if "test_log_likelihood" in metrics:
            parts.append(f"test {metrics['test_log_likelihood']:.4f}")
        print(f"saved {out} (flow {name}, {features} features)")
        print(f"log-likelihood (nats/example): {', '.join(parts)}")
        print(
            f"epochs: {metrics['epochs']}, seconds: {metrics['seconds']:.1f}, stopped: "
            f"{metrics['stopped']}"
        )
    return 0


def _vae_labels(data: str):
    """Labels of a built-in image dataset's test split (for the latent scatter), else None."""
    from .data.images import load_digits, load_mnist

    loaders = {"mnist": load_mnist, "digits": load_digits}
    return loaders[data]("test", labels=True)[1] if data in loaders else None


def _vae_test(data: str, key: str | None):
    from .data import is_builtin, load, splits

    if is_builtin(data) and "test" in splits(data):
        return load(data, "test", key)
    return None


def _cmd_vae(args: argparse.Namespace) -> int:
    import torch

    from . import vae as vaes
    from .data import load

    out = Path(args.out)
    _check_out(out, args.force)
    levels = args.levels if args.levels is not None else BUILTIN_LEVELS.get(args.data)
    x = vaes.unit_pixels(load(args.data, "train", args.key), levels, name=args.data)
    _seed_everything(args.seed)
    model = vaes.VAE(
        tuple(x.shape[1:]),
        latent=args.latent,
        posterior=args.posterior,
        flow_length=args.flow_length,
        hidden=args.hidden or (300,),
        context=args.context,
        flow_options=dict(args.posterior_option) or None,
    )
    training = _given(
        epochs=args.epochs,
        max_time=args.max_time,
        warmup=args.warmup,
        batch_size=args.batch_size,
        lr=args.lr,
    )
    start = time.perf_counter()
    history = vaes.fit_vae(model, x, seed=args.seed, progress=True, **training)
    seconds = time.perf_counter() - start
    extras = {"data": args.data, "seed": args.seed, "levels": levels, "training": training}
    vaes.save_vae(out, model, extras, force=True)  # _check_out has guarded the directory
    metrics: dict[str, Any] = {
        "data": args.data,
        "posterior": args.posterior,
        "latent": args.latent,
        "n_train": len(x),
        "best_valid_elbo": getattr(history, "best_valid_log_likelihood", None),
        "epochs": getattr(history, "epochs", None),
        "steps": history.steps,
        "skipped_steps": history.skipped,
        "seconds": seconds,
        "stopped": getattr(history, "stopped", None),
    }
    test = _vae_test(args.data, args.key)
    if test is not None:
        xt = vaes.unit_pixels(test, levels, name=args.data)
        result = vaes.evaluate_vae(model, xt, iw_samples=args.iw_samples, seed=EVAL_SEED)
        metrics.update({f"test_{k}": v for k, v in result.items()})
    metrics["history"] = _history_dict(history)
    from . import io

    io.write_json(out / io.METRICS_FILE, _sanitize(metrics))
    with torch.no_grad():
        _vae_plots(model, out, xt if test is not None else x, args.data, args.latent)
    if args.json:
        _print_json(_sanitize(metrics))
    else:
        print(f"saved {out} (VAE, posterior {args.posterior}, latent {args.latent})")
        if test is not None:
            print(
                f"test: elbo {metrics['test_elbo']:.4f}, log-likelihood "
                f"{metrics['test_log_likelihood']:.4f} nats/example "
                f"(importance-weighted, K={args.iw_samples})"
            )
    return 0


def _vae_plots(model: Any, out: Path, x: Any, data: str, latent: int) -> None:
    from . import vae as vaes

    try:
        if len(model.data_shape) == 3:
            vaes.plot_reconstructions(model, x[:10], out / "reconstructions.png")
            vaes.plot_samples(model, out / "samples.png")
        labels = _vae_labels(data) if latent == 2 else None
        if labels is not None and len(labels) == len(x):
            vaes.plot_latent(model, x, labels, out / "latent.png")
    except (ImportError, PushforwardError) as e:
        _warn(f"skipping VAE plots: {_one_line(e)}")


def _eval_vae(args: argparse.Namespace) -> int:
    import math as m

    from . import vae as vaes
    from .data import load

    model, config = vaes.load_vae(args.model)
    x = vaes.unit_pixels(load(args.data, "test", args.key), config.get("levels"), name=args.data)
    result = vaes.evaluate_vae(model, x, iw_samples=args.iw_samples, seed=EVAL_SEED)
    features = int(m.prod(model.data_shape))
    result.update(
        {
            "bits_per_dim": -result["log_likelihood"] / (features * m.log(2.0)),
            "features": features,
            "model": str(args.model),
            "data": args.data,
        }
    )
    if args.json:
        _print_json(_sanitize(result))
    else:
        print(f"elbo: {result['elbo']:.6f} nats/example")
        print(
            f"log_likelihood: {result['log_likelihood']:.6f} nats/example "
            f"(importance-weighted, K={args.iw_samples})"
        )
        print(f"n: {result['n']}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from . import io, vae
    from .data import load

    if vae.is_vae(args.model):
        return _eval_vae(args)
    flow, config = io.load_model(args.model)
    if _is_image_model(config):
        return _eval_images(args, flow, config)
    array = load(args.data, "test", args.key)
    features = int(config["features"])
    if _holds_images(array):
        raise PushforwardError(
            f"the model is a vector model of {features} features, but {args.data} holds images "
            f"of shape {tuple(array.shape)}"
        )
    x = _matrix(array, args.data)
    if x.shape[1] != features:
        raise PushforwardError(f"model has {features} features, data has {x.shape[1]}")
    ll = _mean_log_likelihood(flow, x, args.data)
    result = {
        "log_likelihood": ll,
        "bits_per_dim": _bits_per_dim(ll, features),
        "n": len(x),
        "features": features,
        "model": str(args.model),
        "data": args.data,
    }
    true_ll = _true_log_likelihood(args.data, x)
    if true_ll is not None:
        # a toy with a closed-form density: how far the model is from the truth, in nats
        result["true_log_likelihood"] = true_ll
        result["gap"] = true_ll - ll
    if args.json:
        _print_json(_sanitize(result))
    else:
        print(f"log_likelihood: {ll:.6f} nats/example")
        print(f"bits_per_dim: {result['bits_per_dim']:.6f} (differential)")
        print(f"n: {len(x)}")
        print(f"features: {features}")
        if true_ll is not None:
            print(f"true_log_likelihood: {true_ll:.6f} nats/example (gap {true_ll - ll:.6f})")
    return 0


def _true_log_likelihood(data: str, x) -> float | None:
    """The mean exact log-density of ``x`` when ``data`` names a toy that has one."""
    from .data import toy_log_prob, toy_names

    if data not in toy_names():
        return None
    try:
        return float(toy_log_prob(data, x).mean())
    except PushforwardError:
        return None


def _cmd_sample(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from . import io

    out = Path(args.out)
    if out.suffix.lower() != ".npy":
        raise PushforwardError(f"--out must name a .npy file, got {out}")
    if out.exists() and not args.force:
        raise PushforwardError(f"{out} already exists; pass --force to overwrite it")
    if out.is_dir():
        raise PushforwardError(f"{out} is a directory")
    if not out.parent.is_dir():
        raise PushforwardError(f"folder {out.parent} does not exist")
    flow, config = io.load_model(args.model)
    from .plots import sample_at_temperature

    image = _is_image_model(config)
    batch = IMAGE_EVAL_BATCH if image else EVAL_BATCH
    torch.manual_seed(args.seed)
    parts = []
    with torch.no_grad():
        for start in range(0, args.n, batch):
            m = min(batch, args.n - start)
            parts.append(sample_at_temperature(flow, m, args.temperature).float().cpu())
    samples = torch.cat(parts).numpy()
    bad = int((~np.isfinite(samples)).any(axis=tuple(range(1, samples.ndim))).sum())
    if image:
        levels = _model_levels(config, args.model)
        samples = _quantized(samples, levels)
    buffer = _bytes_io.BytesIO()
    np.save(buffer, samples, allow_pickle=False)
    io.write_atomic(out, buffer.getvalue())
    if bad:
        _warn(f"{bad} of {args.n} samples are not finite")
    if image:
        print(
            f"wrote {args.n} images of shape {tuple(samples.shape[1:])} ({levels} levels, "
            f"{samples.dtype}) to {out}"
        )
    else:
        print(f"wrote {args.n} samples of {samples.shape[1]} features to {out}")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from . import io

    flow, config = io.load_model(args.model)
    out = Path(args.out) if args.out else Path(args.model)
    metrics_path = Path(args.model) / io.METRICS_FILE
    history = None
    if metrics_path.is_file():
        metrics = io.read_json(metrics_path)
        if isinstance(metrics, dict) and isinstance(metrics.get("history"), dict):
            history = _history_from_dict(metrics["history"])
    else:
        _warn(f"{metrics_path} not found: no training curves")
    if _is_image_model(config):
        data = _image_plot_data(config, args.model)
    elif config.get("target") or config["features"] == 1:
        data = None
    else:
        data = _plot_data(config)
    drawn = _draw_plots(flow, config, history, out, data=data, strict=True)
    for path in drawn:
        print(path)
    if not drawn:
        raise PushforwardError(f"no plot could be drawn for {args.model}")
    return 0


def _cmd_flows(args: argparse.Namespace) -> int:
    from . import flows

    names = flows.names()
    width = max((len(n) for n in names), default=0)
    for name in names:
        print(f"{name:<{width}}  {flows.describe(name).summary}")
    return 0


def _cmd_fit_target(args: argparse.Namespace) -> int:
    from . import io, train
    from .data.potentials import potential, potential_names

    target = args.target.upper()
    if target not in potential_names():
        raise PushforwardError(
            f"unknown target {args.target!r}; choose from: {', '.join(potential_names())}"
        )
    name = args.flow
    options = _recipe_options(name, {"layers": args.layers})
    out = Path(args.out) if args.out else Path("runs") / f"{target}-{name}"
    _check_out(out, args.force)
    box = args.box if args.box else None
    log_density = potential(target, box)
    _seed_everything(args.seed)
    steps = args.steps if args.steps is not None else DEFAULT_TARGET_STEPS
    anneal = args.anneal if args.anneal is not None else steps // 5
    training = _given(
        steps=steps,
        anneal_steps=anneal,
        max_time=args.max_time,
        lr=args.lr if args.lr is not None else DEFAULT_TARGET_LR,
    )
    config = io.make_config(
        name, 2, 0, options, None, target=target, box=box, seed=args.seed, training=training
    )
    flow = io.model_from_config(config)
    history = train.fit_target(flow, log_density, seed=args.seed, progress=True, **training)
    flow.eval()
    kl = train.estimate_reverse_kl(flow, log_density, n=10_000)
    # with the box the target is normalisable: its log-normaliser on a grid gives the KL itself
    log_z = _log_normaliser(log_density, box) if box else None
    metrics = _sanitize(
        {
            "target": target,
            "flow": name,
            "box": box,
            "reverse_kl": kl,
            "log_normaliser": log_z,
            "kl": None if log_z is None else kl + log_z,
            "steps": getattr(history, "steps", None),
            "seconds": getattr(history, "seconds", None),
            "stopped": getattr(history, "stopped", None),
            "seed": args.seed,
            "options": config["options"],
            "history": _history_dict(history),
        }
    )
    io.save_model(out, flow, config, force=args.force)
    io.write_json(out / io.METRICS_FILE, metrics)
    _draw_plots(flow, config, history, out)
    if args.json:
        _print_json(metrics)
    else:
        print(f"saved {out} (flow {name} on {target})")
        print(f"reverse KL estimate (nats, up to the target's log-normaliser): {kl:.4f}")
        if log_z is not None:
            print(f"log-normaliser on the grid: {log_z:.4f}; KL(q || p): {kl + log_z:.4f}")
    return 0


def _log_normaliser(log_density: Any, box: float, n: int = 1000) -> float:
    """:math:`\\log \\int e^{-U}` over :math:`[-b - 1, b + 1]^2` by the midpoint rule (the
    wall leaves nothing beyond)."""
    import torch

    lo, hi = -box - 1.0, box + 1.0
    axis = lo + (hi - lo) * (torch.arange(n, dtype=torch.float64) + 0.5) / n
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        values = log_density(grid)
    return float(torch.logsumexp(values, 0) + 2 * math.log((hi - lo) / n))


def _without_scaling(flow: Any, config: dict[str, Any]) -> Any:
    """The flow before its data standardisation (see :func:`pushforward.io.model_from_config`),
    sharing its modules; the flow itself if it has none."""
    from .core import Compose
    from .distributions import Flow
    from .transforms.linear import Standardization

    t = flow.transform
    if (
        config.get("scaling") is not None
        and isinstance(t, Compose)
        and len(t) == 2
        and isinstance(t[1], Standardization)
    ):
        return Flow(flow.base, t[0], flow.context_features)
    return flow


def _sampling_seconds(flow: Any, n: int, repeats: int = 3) -> float:
    """Best of ``repeats`` wall-clock times of drawing ``n`` samples (batches of
    :data:`EVAL_BATCH`, no grad), after a small warm-up draw."""
    import torch

    best = math.inf
    with torch.no_grad():
        flow.sample(min(n, 16))
        for _ in range(repeats):
            start = time.perf_counter()
            for i in range(0, n, EVAL_BATCH):
                flow.sample(min(EVAL_BATCH, n - i))
            best = min(best, time.perf_counter() - start)
    return best


def _distill_data(args: argparse.Namespace, config: dict[str, Any], features: int):
    """``(source, rows)`` to compare teacher and student on: ``--data`` (an error if it cannot
    be read), else the teacher's data (a warning if it cannot be read now), else ``None``."""
    from .data import load

    given = args.data is not None
    source = args.data if given else (config.get("data_path") or config.get("data"))
    if not source:
        return None, None
    key = args.key if given else config.get("key")
    try:
        x = _matrix(load(source, "test", key), source)
        if x.shape[1] != features:
            raise PushforwardError(
                f"the teacher has {features} features, {source} has {x.shape[1]}"
            )
    except PushforwardError as e:
        if given:
            raise
        _warn(f"skipping the test log-likelihoods: {e}")
        return None, None
    return source, x


def _cmd_distill(args: argparse.Namespace) -> int:
    import torch

    from . import flows, io, train

    if args.objective not in train.DISTILL_OBJECTIVES:
        raise PushforwardError(
            f"unknown objective {args.objective!r}; choose from: "
            f"{', '.join(train.DISTILL_OBJECTIVES)}"
        )
    teacher_dir, out = Path(args.teacher), Path(args.out)
    if out.exists() and teacher_dir.exists() and out.resolve() == teacher_dir.resolve():
        raise PushforwardError(f"--out {out} is the teacher's directory; choose another one")
    teacher, tconfig = io.load_model(teacher_dir)
    if _is_image_model(tconfig):
        raise PushforwardError(
            f"{teacher_dir}: distill needs a teacher over vectors; this one is an image model of "
            f"shape {tuple(tconfig['features'])}"
        )
    features = int(tconfig["features"])
    if tconfig["context_features"] or tuple(teacher.event_shape) != (features,):
        raise PushforwardError(
            f"{teacher_dir}: distill needs an unconditional teacher over vectors; this one has "
            f"event shape {tuple(teacher.event_shape)} and {tconfig['context_features']} "
            "context features"
        )
    name = args.flow
    recipe = flows.describe(name)
    inherited = {
        k: v
        for k, v in tconfig["options"].items()
        if k in _INHERITED_OPTIONS and k in recipe.options
    }
    options = {**inherited, **_recipe_options(name, {"layers": args.layers, "hidden": args.hidden})}
    _check_out(out, args.force)
    source, test_rows = _distill_data(args, tconfig, features)

    training = _given(
        steps=args.steps,
        max_time=args.max_time,
        batch_size=args.batch_size,
        lr=args.lr,
    )
    extras: dict[str, Any] = {
        "teacher": str(teacher_dir.expanduser().resolve()),
        "teacher_flow": tconfig["flow"],
        "objective": args.objective,
        "seed": args.seed,
        "training": training,
    }
    for key in ("data", "data_path", "key", "target"):  # where the teacher's data came from
        if tconfig.get(key) is not None:
            extras[key] = tconfig[key]
    config = io.make_config(name, features, 0, options, None, **extras)
    config["scaling"] = tconfig["scaling"]  # the teacher's units: log-densities comparable
    _seed_everything(args.seed)
    student = io.model_from_config(config)
    dtype = next((t.dtype for t in teacher.state_dict().values() if t.is_floating_point()), None)
    if dtype is not None:
        student = student.to(dtype)
    if type(student.base) is type(teacher.base):  # start from the teacher's base
        try:
            student.base.load_state_dict(teacher.base.state_dict())
        except RuntimeError:
            pass
    if args.objective != "kl" and not train._same_base(student, teacher):
        raise PushforwardError(
            f"objective {args.objective!r} needs the student to share the teacher's base, but "
            f"a {name!r} student cannot take the teacher's {type(teacher.base).__name__}; "
            "use --objective kl"
        )

    history = train.distill(
        _without_scaling(student, config),
        _without_scaling(teacher, tconfig),
        objective=args.objective,
        seed=args.seed,
        progress=True,
        **training,
    )
    student.eval()
    io.save_model(out, student, config, force=args.force)  # first: the comparison may fail

    metrics: dict[str, Any] = {
        "teacher": str(teacher_dir),
        "teacher_flow": tconfig["flow"],
        "flow": name,
        "objective": args.objective,
        "features": features,
        "kl_student_teacher": train.estimate_reverse_kl(
            student, teacher.log_prob, n=SPEED_SAMPLES, seed=args.seed
        ),
    }
    if test_rows is not None:
        timed: dict[str, float] = {}
        for who, flow in (("teacher", teacher), ("student", student)):
            start = time.perf_counter()
            log_p = _log_probs(flow, test_rows)
            timed[f"{who}_test_seconds"] = time.perf_counter() - start
            bad = int((~torch.isfinite(log_p)).sum())
            if bad:
                _warn(f"the {who}'s log-density is not finite for {bad} of {len(log_p)} rows")
            metrics[f"{who}_test_log_likelihood"] = float(log_p.mean())
            # robust companion: a few far-off rows can dominate a student's mean
            metrics[f"{who}_test_median_log_likelihood"] = float(log_p.nanmedian())
        metrics.update(data=source, n_test=len(test_rows), **timed)
    torch.manual_seed(args.seed)
    metrics["torch_threads"] = torch.get_num_threads()
    metrics["sample_n"] = SPEED_SAMPLES
    metrics["teacher_sample_seconds"] = _sampling_seconds(teacher, SPEED_SAMPLES)
    metrics["student_sample_seconds"] = _sampling_seconds(student, SPEED_SAMPLES)
    metrics["sampling_speedup"] = metrics["teacher_sample_seconds"] / max(
        metrics["student_sample_seconds"], 1e-12
    )
    metrics.update(
        steps=history.steps,
        seconds=history.seconds,
        stopped=history.stopped,
        seed=args.seed,
        options=config["options"],
        history=_history_dict(history),
    )
    metrics = _sanitize(metrics)
    io.write_json(out / io.METRICS_FILE, metrics)
    _draw_plots(student, config, history, out, data=_plot_data(config))

    if args.json:
        _print_json(metrics)
    else:
        print(
            f"saved {out} (flow {name}, distilled from {tconfig['flow']} teacher {teacher_dir}, "
            f"objective {args.objective})"
        )
        kl = metrics["kl_student_teacher"]
        print(
            f"KL(student || teacher): {'nan' if kl is None else f'{kl:.4f}'} nats "
            f"({SPEED_SAMPLES} student samples)"
        )
        if test_rows is not None:

            def ll(key: str) -> str:
                return "nan" if metrics[key] is None else f"{metrics[key]:.4f}"

            print(
                f"test log-likelihood on {source} (nats/example, {len(test_rows)} rows): "
                f"teacher {ll('teacher_test_log_likelihood')}, "
                f"student {ll('student_test_log_likelihood')} (medians: teacher "
                f"{ll('teacher_test_median_log_likelihood')}, student "
                f"{ll('student_test_median_log_likelihood')})"
            )
            print(
                f"density of the test rows: teacher {metrics['teacher_test_seconds']:.3f} s, "
                f"student {metrics['student_test_seconds']:.3f} s"
            )
        print(
            f"sampling {SPEED_SAMPLES}: teacher {metrics['teacher_sample_seconds']:.4f} s, "
            f"student {metrics['student_sample_seconds']:.4f} s "
            f"({metrics['sampling_speedup']:.1f}x faster; best of 3, "
            f"{metrics['torch_threads']} torch thread(s))"
        )
        print(
            f"steps: {metrics['steps']}, seconds: {metrics['seconds']:.1f}, stopped: "
            f"{metrics['stopped']}"
        )
    return 0


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "fit": _cmd_fit,
    "eval": _cmd_eval,
    "sample": _cmd_sample,
    "plot": _cmd_plot,
    "flows": _cmd_flows,
    "fit-target": _cmd_fit_target,
    "vae": _cmd_vae,
    "distill": _cmd_distill,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``pushforward`` command with ``argv`` (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 1 on an error (one line on stderr), 2 on a usage error,
        130 when interrupted.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as e:  # usage errors (2) and --help (0)
        return int(e.code) if isinstance(e.code, int) else 2
    try:
        return _COMMANDS[args.command](args)
    except (PushforwardError, OSError) as e:
        _say(f"pushforward: error: {_one_line(e)}")
        return 1
    except KeyboardInterrupt:
        _say("pushforward: error: interrupted")
        return 130
    except Exception as e:
        if os.environ.get("PUSHFORWARD_DEBUG"):
            raise
        _say(
            f"pushforward: error: internal error ({type(e).__name__}: {_one_line(e)}); "
            "set PUSHFORWARD_DEBUG=1 for the traceback"
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
