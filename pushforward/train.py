r"""Fitting flows: maximum likelihood on data (:func:`fit`), reverse KL to an unnormalised
target density (:func:`fit_target`), and density distillation of a student flow from a trained
teacher (:func:`distill`).

All loops use Adam with gradient-norm clipping, run reproducibly from a seed (inside a forked
RNG state, so torch's global random state is left as it was), stop cleanly on a wall-clock
budget, and never leave non-finite weights in the model: a non-finite loss stops the run, warns,
and restores the last good weights (:func:`fit` first skips such a minibatch, and loss spikes,
with a :class:`SpikeGuard`, and stops after 50 in a row). The hot loops of :func:`fit_target`
and :func:`distill` synchronise with the device only every :data:`CHECK_EVERY` steps (loss
for the progress bar and the finiteness check); :func:`fit`'s guard reads every step's loss.

References:
    Kingma and Ba (2015), "Adam: A Method for Stochastic Optimization", arXiv:1412.6980.
    Loshchilov and Hutter (2017), "SGDR: Stochastic Gradient Descent with Warm Restarts",
    arXiv:1608.03983 (the cosine learning-rate schedule).
    Rezende and Mohamed (2015), "Variational Inference with Normalizing Flows",
    arXiv:1505.05770 (section 6.1: the annealed reverse-KL fits of 2-D targets).
    van den Oord et al. (2018), "Parallel WaveNet: Fast High-Fidelity Speech Synthesis",
    arXiv:1711.10433 (probability density distillation).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import distributed
from .core import PushforwardError, check_finite, check_positive_int, shape_str
from .losses import nll, reverse_kl

__all__ = [
    "History",
    "fit",
    "fit_target",
    "estimate_reverse_kl",
    "distill",
    "DISTILL_OBJECTIVES",
    "STOP_REASONS",
    "CHECK_EVERY",
    "CHECKPOINT_FILE",
    "CHECKPOINT_JSON",
    "optimizer_tensors",
    "load_optimizer_tensors",
    "SpikeGuard",
    "WeightAverage",
]

#: why a run ended: ``fit`` gives one of the first four, ``fit_target`` and ``distill``
#: "max-steps" or the last three
STOP_REASONS = ("max-epochs", "early-stopping", "max-time", "non-finite", "max-steps")
#: steps between device synchronisations (finiteness check, progress-bar loss); also the number
#: of steps averaged into one ``History.train_loss`` entry of :func:`fit_target` and
#: :func:`distill`
CHECK_EVERY = 100
#: rows per batch when evaluating (validation log-likelihood, reverse-KL estimates)
EVAL_BATCH = 8192
#: at most this many entries (rows x event size) per validation batch, so that large events
#: (images: 784 values and wide convolutional activations each) do not take gigabytes
EVAL_ENTRIES = 2**20
_SCHEDULES = ("cosine", "none")
#: the checkpoint of :func:`fit` in its ``checkpoint`` folder: tensors (weights, best weights,
#: Adam's moments) in safetensors, everything else as JSON in the file's metadata
CHECKPOINT_FILE = "checkpoint.safetensors"
#: a readable copy of the checkpoint's JSON metadata, written after each checkpoint (never read)
CHECKPOINT_JSON = "checkpoint.json"
#: the version of the checkpoint format written and read
CHECKPOINT_VERSION = 1


@dataclass
class History:
    """What a training run did.

    Attributes:
        train_loss: :func:`fit`: mean training loss (negative log-likelihood, nats) per epoch;
            :func:`fit_target`: mean (annealed) reverse-KL loss per ``loss_every`` steps;
            :func:`distill`: mean distillation objective per ``loss_every`` steps.
        valid_log_likelihood: mean validation log-likelihood (nats per example) per epoch
            (empty for :func:`fit_target`).
        best_epoch: the epoch whose weights the model holds at the end (0: the initial
            weights; always 0 for :func:`fit_target`).
        best_valid_log_likelihood: validation log-likelihood of ``best_epoch`` (``None`` if
            there is none).
        epochs: epochs run, the last possibly partial (0 for :func:`fit_target`).
        steps: optimiser steps taken.
        skipped: minibatches whose update was skipped as a loss spike (:class:`SpikeGuard`;
            :func:`fit` only).
        seconds: wall-clock duration of the run.
        stopped: why it ended, one of :data:`STOP_REASONS`.
        loss_every: optimiser steps per ``train_loss`` entry (``None``: one entry per epoch).
    """

    train_loss: list[float] = field(default_factory=list)
    valid_log_likelihood: list[float] = field(default_factory=list)
    best_epoch: int = 0
    best_valid_log_likelihood: float | None = None
    epochs: int = 0
    steps: int = 0
    skipped: int = 0
    seconds: float = 0.0
    stopped: str = ""
    loss_every: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields (floats may be NaN or infinite)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> History:
        """The inverse of :meth:`to_dict` (unknown keys are ignored, ``None`` losses read as
        NaN)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in names}
        for key in ("train_loss", "valid_log_likelihood"):
            if key in values:
                values[key] = [math.nan if v is None else float(v) for v in values[key]]
        return cls(**values)


# ---------------------------------------------------------------------------------------------
# helpers


def _like(flow: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The floating dtype and device of the flow's parameters (or buffers)."""
    for t in (*flow.parameters(), *flow.buffers()):
        if t.is_floating_point():
            return t.dtype, t.device
    return torch.get_default_dtype(), torch.device("cpu")


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block from ``torch.manual_seed(seed)`` and give the global RNG state back after."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _adam(params: list[Tensor], lr: float, weight_decay: float = 0.0) -> torch.optim.Adam:
    """Adam; on the CPU with the multi-tensor (``foreach``) update, which torch only picks by
    default on GPUs and which halves the optimiser's cost for flows of many small tensors."""
    cpu = all(p.device.type == "cpu" for p in params)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, foreach=True if cpu else None)


def _snapshot(flow: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in flow.state_dict().items()}


def _all_finite(params: list[Tensor]) -> bool:
    if not params:
        return True
    return bool(torch.stack([torch.isfinite(p).all() for p in params]).all())


def _check_number(value: float, name: str, low: float = 0.0, allow_low: bool = False) -> float:
    """``value`` as a finite float above ``low`` (or equal to it with ``allow_low``)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise PushforwardError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < low or (v == low and not allow_low):
        bound = f">= {low:g}" if allow_low else f"> {low:g}"
        raise PushforwardError(f"{name} must be a finite number {bound}, got {value!r}")
    return v


def _rows(x: Any, flow: nn.Module, name: str) -> Tensor:
    """``x`` as a ``(rows, *event_shape)`` tensor with finite values."""
    if not isinstance(x, Tensor):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError):
            raise PushforwardError(
                f"{name} must be a tensor or array, got {type(x).__name__}"
            ) from None
    event = tuple(flow.event_shape)
    if x.dim() != len(event) + 1 or tuple(x.shape[1:]) != event:
        raise PushforwardError(
            f"{name}: expected shape {shape_str(('rows', *event))}, got {shape_str(x.shape)}"
        )
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    check_finite(x, name)
    return x


def _context_rows(c: Any, flow: nn.Module, rows: int, name: str, data_name: str) -> Tensor | None:
    features = int(getattr(flow, "context_features", 0))
    if features == 0:
        if c is not None:
            raise PushforwardError(f"this flow is unconditional: it takes no {name}")
        return None
    if c is None:
        raise PushforwardError(
            f"this flow is conditional: {data_name} needs a {name} of shape "
            f"{shape_str((rows, features))}"
        )
    c = torch.as_tensor(c)
    if c.shape != (rows, features):
        raise PushforwardError(
            f"{name}: expected shape {shape_str((rows, features))}, got {shape_str(c.shape)}"
        )
    if not c.is_floating_point():
        c = c.to(torch.get_default_dtype())
    check_finite(c, name)
    return c


def _mean_log_prob(
    flow: nn.Module,
    x: Tensor,
    context: Tensor | None,
    world: distributed.World | None = None,
) -> float:
    """Mean ``flow.log_prob`` over the rows of ``x`` (no grad, float64 sum), in batches of
    :data:`EVAL_BATCH` rows or :data:`EVAL_ENTRIES` entries, whichever is fewer; with several
    processes each sums its share of the rows and the sums are added up."""
    rows = len(x)
    if world is not None and world.distributed:
        lo, hi = world.shard(rows)
        x = x[lo:hi]
        context = None if context is None else context[lo:hi]
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    size = max(1, x[0].numel()) if len(x) else 1
    batch = max(1, min(EVAL_BATCH, EVAL_ENTRIES // size))
    with torch.no_grad():
        for i in range(0, len(x), batch):
            c = None if context is None else context[i : i + batch]
            total += flow.log_prob(x[i : i + batch], c).double().sum()
    if world is not None:
        world.sum(total)
    return total.item() / rows


#: seconds between progress-bar refreshes when stderr is not a terminal (a log file, a pipe, a
#: CI console), so that a long run writes a line every few seconds rather than many per second
LOG_REFRESH_SECONDS = 30.0


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _progress(total: int, desc: str, enabled: bool):
    """A tqdm bar on stderr; refreshed at most every :data:`LOG_REFRESH_SECONDS` when stderr is
    not a terminal (tqdm's default of 0.1 s floods logs with carriage-return updates)."""
    from tqdm.auto import tqdm

    interval = (
        {}
        if _is_terminal(sys.stderr)
        else {
            "mininterval": LOG_REFRESH_SECONDS,
            "maxinterval": LOG_REFRESH_SECONDS,
        }
    )
    return tqdm(
        total=total,
        desc=desc,
        unit="step",
        file=sys.stderr,
        disable=not enabled,
        dynamic_ncols=True,
        leave=True,
        **interval,
    )


# ---------------------------------------------------------------------------------------------
# maximum likelihood


def fit(
    flow: nn.Module,
    train: Tensor,
    valid: Tensor | None = None,
    *,
    train_context: Tensor | None = None,
    valid_context: Tensor | None = None,
    epochs: int = 100,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    patience: int = 10,
    clip: float | None = 5.0,
    max_time: float | None = None,
    valid_fraction: float = 0.1,
    seed: int = 0,
    progress: bool = True,
    lr_schedule: str = "cosine",
    callback: Callable[[int, History], None] | None = None,
    preprocess: Callable[[Tensor], Tensor] | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: float | None = 300.0,
    checkpoint_steps: int | None = None,
    resume: bool = False,
    average: float | None = None,
) -> History:
    r"""Fit a flow to data by maximum likelihood (minibatch Adam with early stopping).

    Minimises :func:`~pushforward.losses.nll`, the mean negative log-likelihood

    .. math:: \mathcal L(\theta) = -\frac1B \sum_{b=1}^B \log q_\theta(x_b)

    over shuffled minibatches. After every epoch the mean validation log-likelihood is
    computed (eval mode, no grad); the best epoch's weights are kept and restored at the end
    (whatever stopped the run), and training stops after ``patience`` epochs without
    improvement. Each step clips the gradient norm to ``clip``; the learning rate follows a
    cosine decay from ``lr`` to 0 over ``epochs`` (``lr_schedule="cosine"``) or stays constant.
    A minibatch whose loss is non-finite or a spike far above the running mean is not stepped
    on (:class:`SpikeGuard`; counted in ``History.skipped``), and a run of 50 such batches in a
    row stops training as ``"non-finite"``. (Deciding this reads every step's loss on the host:
    one device synchronisation per step.)

    With ``average`` (a decay such as 0.999) an exponential moving average of the weights is
    kept after every step (:class:`WeightAverage`, Polyak averaging); the validation
    log-likelihood, the choice of the best epoch and the weights the run ends with are then
    those of the averaged weights, while training goes on from the last iterate. It helps
    most while the learning rate is high (long runs, noisy gradients); once the cosine
    schedule has brought the rate down the last iterate is about as good.

    The flow is in training mode while it trains (data-dependent initialisations such as
    ActNorm, batch-norm statistics) and is left in eval mode. Each epoch uses
    ``max(1, rows // batch_size)`` full batches of a fresh permutation (the few rows left over
    differ between epochs). Everything random (split, shuffles, any sampling inside the model)
    comes from ``seed``, so the same seed gives identical numbers; torch's global RNG state is
    restored afterwards.

    A non-finite validation log-likelihood, or 50 skipped training minibatches in a row, stops
    the run with ``stopped="non-finite"``, restores the best weights so far (the initial ones
    before the first validation) and emits a :class:`RuntimeWarning` naming the epoch and step.

    ``preprocess`` maps every training minibatch (already in the flow's dtype and device) to
    what the flow models, afresh at each step: uniform dequantization of integer images,
    :math:`y = (x + u) / L` with new noise :math:`u` every step, is
    ``preprocess=lambda x: dequantize_uniform(x, L, dtype=x.dtype)``. It runs inside the
    seeded RNG state, so noise drawn from torch's global generator (as there) is reproducible
    from ``seed``. The validation set must stay fixed for early stopping to compare epochs:
    a ``valid`` that is given is used as it is (pass it already preprocessed, e.g. dequantized
    once with a fixed :class:`torch.Generator`); one split off ``train`` is preprocessed once,
    right after the split. With ``preprocess=None`` the rows are used as they are.

    **Checkpoints.** With a ``checkpoint`` folder, the run is saved there every ``checkpoint_every``
    seconds and/or every ``checkpoint_steps`` steps (after an optimiser step, mid-epoch included)
    and once at the end, atomically (temporary file and rename), as :data:`CHECKPOINT_FILE`: the
    current and the best weights, the weight averages (with ``average``) and Adam's moments and step
    counts as tensors, and as JSON metadata the epoch, the steps done in it, the global step, the
    learning-rate schedule's position, the best validation figure, the patience counter, the
    :class:`History` so far, and the random states (of the epoch's shuffle and of torch's generator,
    as lists of ints). Nothing is pickled. ``resume=True`` continues from it: the run then ends with
    the same weights and history as one never interrupted (same data, flow and settings;
    ``preprocess`` noise drawn from torch's generator included), having redone at most the steps
    since the last checkpoint. A checkpoint of a different flow, data or setting (``epochs``,
    ``batch_size``, ``lr``, ``seed``, ...) is refused with an error naming the difference;
    ``max_time`` counts the time before the interruption too. A checkpoint written at the end makes
    ``resume`` return its history at once, with the final weights.

    **Several processes.** Under ``torchrun`` (environment ``WORLD_SIZE > 1``) every process
    calls ``fit`` with the same arguments; the flow is wrapped in
    :class:`~torch.nn.parallel.DistributedDataParallel` (``gloo`` on the CPU, ``nccl`` with the
    flow on ``cuda:LOCAL_RANK``), every rank draws the same shuffles and ``preprocess`` noise
    and trains on its share of each global batch of ``batch_size`` rows, the validation set is
    split between the ranks and its log-likelihood summed over them, and only rank 0 shows
    progress, calls ``callback`` and writes checkpoints. The result equals single-process
    training with the same ``batch_size`` up to the order of floating-point sums, except for
    batch normalisation, whose statistics are each rank's share (data-dependent ActNorm
    initialisation is done on the whole first batch, as in one process). For example
    ``torchrun --standalone --nproc_per_node 2 -m pushforward fit moons``.

    Args:
        flow: the model (a :class:`~pushforward.distributions.Flow` or anything with
            ``log_prob`` and ``event_shape``); trained in place.
        train: training examples, shape ``(rows, *flow.event_shape)``; moved to the flow's
            dtype and device.
        valid: validation examples; ``None`` splits ``valid_fraction`` of ``train`` off
            (seeded).
        train_context: conditioning of the training rows, ``(rows, context_features)``, for a
            conditional flow.
        valid_context: conditioning of the validation rows.
        epochs: maximum number of passes over the training rows.
        batch_size: rows per step (capped at the number of training rows).
        lr: Adam's (initial) learning rate.
        weight_decay: Adam's L2 penalty.
        patience: epochs without a better validation log-likelihood before stopping.
        clip: maximum gradient norm (``None``: no clipping).
        max_time: wall-clock budget in seconds, checked every step (``None``: none).
        valid_fraction: fraction of ``train`` held out when ``valid`` is ``None``.
        seed: the seed of every random choice.
        progress: show a tqdm progress bar (stderr) with the loss and validation
            log-likelihood.
        lr_schedule: ``"cosine"`` or ``"none"``.
        callback: called as ``callback(epoch, history)`` after every epoch.
        preprocess: applied to every training minibatch before the loss (``None``: nothing);
            see above.
        checkpoint: folder of the checkpoint (created if needed; ``None``: no checkpoints).
        checkpoint_every: seconds between checkpoints (``None``: not by time).
        checkpoint_steps: optimiser steps between checkpoints (``None``: not by steps).
        resume: continue from the checkpoint in ``checkpoint`` (an error if there is none).
        average: decay of the weight average that is validated and kept (``None``: the
            weights themselves); in ``(0, 1)``.

    Returns:
        The :class:`History` of the run.

    Example:
        >>> from pushforward.distributions import Flow, StandardNormal
        >>> from pushforward.transforms.linear import ElementwiseAffine
        >>> flow = Flow(StandardNormal(2), ElementwiseAffine(2))
        >>> data = 3.0 + 0.5 * torch.randn(1000, 2)
        >>> history = fit(flow, data, epochs=3, progress=False)
        >>> history.epochs, history.stopped
        (3, 'max-epochs')
    """
    event_shape = getattr(flow, "event_shape", None)
    if not isinstance(flow, nn.Module) or event_shape is None or not hasattr(flow, "log_prob"):
        raise PushforwardError(
            f"fit needs a Flow (a module with log_prob and event_shape), got {type(flow).__name__}"
        )
    epochs = check_positive_int(epochs, "epochs")
    batch_size = check_positive_int(batch_size, "batch_size")
    patience = check_positive_int(patience, "patience")
    lr = _check_number(lr, "lr")
    weight_decay = _check_number(weight_decay, "weight_decay", allow_low=True)
    clip = None if clip is None else _check_number(clip, "clip")
    max_time = None if max_time is None else _check_number(max_time, "max_time")
    if lr_schedule not in _SCHEDULES:
        raise PushforwardError(
            f"unknown lr_schedule {lr_schedule!r}; choose from: {', '.join(_SCHEDULES)}"
        )
    if preprocess is not None and not callable(preprocess):
        raise PushforwardError(
            f"preprocess must be a function of a minibatch, got {type(preprocess).__name__}"
        )
    params = [p for p in flow.parameters() if p.requires_grad]
    if not params:
        raise PushforwardError("the flow has no trainable parameters")
    if checkpoint is None and resume:
        raise PushforwardError("resume=True needs the checkpoint folder to resume from")
    every = (
        None if checkpoint_every is None else _check_number(checkpoint_every, "checkpoint_every")
    )
    every_steps = (
        None
        if checkpoint_steps is None
        else check_positive_int(checkpoint_steps, "checkpoint_steps")
    )
    averaged = None if average is None else WeightAverage(average)
    if resume and not (Path(checkpoint) / CHECKPOINT_FILE).is_file():
        raise PushforwardError(
            f"no checkpoint to resume from: {Path(checkpoint) / CHECKPOINT_FILE} not found"
        )

    train = _rows(train, flow, "train")
    train_context = _context_rows(train_context, flow, len(train), "train_context", "train")
    dtype, device = _like(flow)
    start = time.perf_counter()
    with _seeded(int(seed), device):
        generator = torch.Generator().manual_seed(int(seed))
        split_off = valid is None
        if split_off:
            if valid_context is not None:
                raise PushforwardError("valid_context was given without valid")
            fraction = _check_number(valid_fraction, "valid_fraction")
            if fraction >= 1:
                raise PushforwardError(f"valid_fraction must be below 1, got {valid_fraction!r}")
            n_valid = max(1, round(fraction * len(train)))
            if len(train) - n_valid < 1:
                raise PushforwardError(
                    f"train has {len(train)} row(s): too few to split off a validation set "
                    f"(need at least 2, or pass valid)"
                )
            order = torch.randperm(len(train), generator=generator)
            v_idx, t_idx = order[:n_valid], order[n_valid:]
            valid = train[v_idx]
            valid_context = None if train_context is None else train_context[v_idx]
            train = train[t_idx]
            train_context = None if train_context is None else train_context[t_idx]
        else:
            valid = _rows(valid, flow, "valid")
            valid_context = _context_rows(valid_context, flow, len(valid), "valid_context", "valid")
        if len(train) < 1 or len(valid) < 1:
            raise PushforwardError("train and valid need at least one row each")

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype)

        train, valid = move(train), move(valid)
        train_context, valid_context = move(train_context), move(valid_context)
        if preprocess is not None and split_off:
            valid = _preprocessed(preprocess, valid, "the validation rows")
        saver = None
        if checkpoint is not None:
            settings = {
                "epochs": epochs,
                "batch_size": min(batch_size, len(train)),
                "lr": lr,
                "weight_decay": weight_decay,
                "patience": patience,
                "clip": clip,
                "seed": int(seed),
                "lr_schedule": lr_schedule,
                "average": None if averaged is None else averaged.decay,
            }
            saver = _Checkpoint(
                Path(checkpoint),
                _fingerprint(flow, settings, train, valid, train_context, valid_context),
                every,
                every_steps,
            )
        world, created = distributed.join(train.device)
        try:
            history = _fit_epochs(
                flow,
                params,
                train,
                valid,
                train_context,
                valid_context,
                generator=generator,
                epochs=epochs,
                batch_size=min(batch_size, len(train)),
                lr=lr,
                weight_decay=weight_decay,
                patience=patience,
                clip=clip,
                max_time=max_time,
                start=start,
                progress=progress,
                cosine=lr_schedule == "cosine",
                callback=callback,
                preprocess=preprocess,
                saver=saver,
                resume=resume,
                world=world,
                average=averaged,
            )
        finally:
            distributed.leave(created)
    return history


def _preprocessed(preprocess: Callable[[Tensor], Tensor], x: Tensor, what: str) -> Tensor:
    """``preprocess(x)``, checked to keep the shape (a clear error otherwise)."""
    y = preprocess(x)
    if not isinstance(y, Tensor) or y.shape != x.shape:
        got = shape_str(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise PushforwardError(
            f"preprocess must return a tensor of the shape it is given: {what} have shape "
            f"{shape_str(x.shape)}, preprocess returned {got}"
        )
    return y


def _fit_epochs(
    flow: nn.Module,
    params: list[Tensor],
    train: Tensor,
    valid: Tensor,
    train_context: Tensor | None,
    valid_context: Tensor | None,
    *,
    generator: torch.Generator,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    patience: int,
    clip: float | None,
    max_time: float | None,
    start: float,
    progress: bool,
    cosine: bool,
    callback: Callable[[int, History], None] | None,
    preprocess: Callable[[Tensor], Tensor] | None,
    saver: _Checkpoint | None,
    resume: bool,
    world: distributed.World,
    average: WeightAverage | None,
) -> History:
    device = train.device
    history = History()
    per_epoch = max(1, len(train) // batch_size)
    total = epochs * per_epoch
    optimizer = _adam(params, lr, weight_decay)
    scheduler = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total) if cosine else None
    )
    best_state = _snapshot(flow)
    bad_epochs = 0
    guard = SpikeGuard()
    first_epoch, skip = 1, 0
    sums = {"epoch_sum": 0.0, "window_sum": 0.0, "window": 0, "done": 0}
    epoch_rng: list[int] | None = None
    if saver is not None and resume:
        state = saver.load(flow, optimizer, scheduler)
        best_state = state["best"]
        history = History.from_dict(state["history"])
        if state["finished"]:
            flow.load_state_dict(best_state)
            flow.eval()
            return history
        bad_epochs = state["bad_epochs"]
        if "guard" in state:
            guard.load_state_dict(state["guard"])
        if average is not None and "average_updates" in state:
            average.load_tensors(state["tensors"], state["average_updates"])
        first_epoch, skip = state["epoch"], state["batches"]
        sums = state["sums"]
        epoch_rng = state["epoch_rng"]
        _set_rng(state["rng"], device)
        start = time.perf_counter() - float(state["seconds"])
    main = world.main
    model: nn.Module = flow
    if world.distributed:
        model = nn.parallel.DistributedDataParallel(
            flow, device_ids=[device.index or 0] if device.type == "cuda" else None
        )
    bar = _progress(total, "fit", progress and main)
    bar.update(history.steps)
    postfix: dict[str, str] = {}
    stop = ""
    last_save = time.perf_counter()

    def save(epoch: int, batches: int, finished: bool = False) -> None:
        nonlocal last_save
        if saver is not None and main:
            saver.save(
                flow,
                best_state,
                optimizer,
                scheduler,
                {} if average is None else average.tensors(),
                {
                    "finished": finished,
                    "epoch": epoch,
                    "batches": batches,
                    "bad_epochs": bad_epochs,
                    "guard": guard.state_dict(),
                    "sums": sums,
                    "epoch_rng": epoch_rng,
                    "rng": _get_rng(device),
                    "seconds": time.perf_counter() - start,
                    "history": history.to_dict(),
                    **({} if average is None else {"average_updates": average.updates}),
                },
            )
        last_save = time.perf_counter()

    try:
        for epoch in range(first_epoch, epochs + 1):
            flow.train()
            if epoch_rng is not None and epoch == first_epoch:
                generator.set_state(torch.tensor(epoch_rng, dtype=torch.uint8))
            epoch_rng = generator.get_state().tolist()
            order = torch.randperm(len(train), generator=generator).to(device)
            epoch_sum = torch.tensor(float(sums["epoch_sum"]), dtype=torch.float64, device=device)
            window_sum = torch.tensor(float(sums["window_sum"]), dtype=torch.float64, device=device)
            window, done = int(sums["window"]), int(sums["done"])
            begin = skip if epoch == first_epoch else 0
            for i in range(begin, per_epoch):
                idx = order[i * batch_size : (i + 1) * batch_size]
                context = None if train_context is None else train_context[idx]
                batch = train[idx]
                if preprocess is not None:
                    batch = _preprocessed(preprocess, batch, "the training minibatches")
                if world.distributed:
                    loss = _shard_loss(flow, model, batch, context, world, history.steps == 0)
                else:
                    loss = nll(flow, batch, context)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                value = loss.detach().double()
                now = time.perf_counter()
                out_of_time = max_time is not None and now - start > max_time
                if world.distributed:  # the global batch's loss; rank 0's clock decides
                    both = torch.stack([value / world.size, value.new_tensor(out_of_time * main)])
                    value, flag = world.sum(both).unbind()
                    out_of_time = max_time is not None and bool(flag.item())
                # every rank sees the same global loss, so all take or all skip the step
                take = _guarded(guard, value.item(), history, f"epoch {epoch}")
                if take is None:
                    stop = "non-finite"
                    break
                if take:
                    if clip is not None:
                        nn.utils.clip_grad_norm_(params, clip)
                    optimizer.step()
                    if scheduler is not None:
                        scheduler.step()
                    if average is not None:
                        average.update(flow)
                    history.steps += 1
                    done += 1
                    epoch_sum += value
                    window_sum += value
                    window += 1
                bar.update(1)
                # (only finite losses pass the guard, so the window's mean is finite)
                if window and (window == CHECK_EVERY or i == per_epoch - 1 or out_of_time):
                    mean = window_sum.item() / window
                    postfix["loss"] = f"{mean:.4f}"
                    bar.set_postfix(postfix, refresh=False)
                    window_sum.zero_()
                    window = 0
                if out_of_time:
                    stop = "max-time"
                    break
                if saver is not None and saver.due(history.steps, now - last_save):
                    sums = {
                        "epoch_sum": epoch_sum.item(),
                        "window_sum": window_sum.item(),
                        "window": window,
                        "done": done,
                    }
                    save(epoch, i + 1)
            sums = {"epoch_sum": 0.0, "window_sum": 0.0, "window": 0, "done": 0}
            history.epochs = epoch
            if stop == "non-finite":
                history.train_loss.append(math.nan)
                break
            # an epoch whose every batch was skipped has no training loss
            history.train_loss.append(epoch_sum.item() / done if done else math.nan)
            flow.eval()
            # validated (and kept as the best) are the averaged weights where there are any
            with nullcontext() if average is None else average.applied(flow):
                ll = _mean_log_prob(flow, valid, valid_context, world)
                better = not (math.isnan(ll) or ll == math.inf) and (
                    history.best_valid_log_likelihood is None
                    or ll > history.best_valid_log_likelihood
                )
                if better:
                    best_state = _snapshot(flow)
            history.valid_log_likelihood.append(ll)
            if math.isnan(ll) or ll == math.inf:
                stop = "non-finite"
                _warn_non_finite(f"epoch {epoch} (validation log-likelihood {ll})", history)
                break
            if better:
                history.best_valid_log_likelihood = ll
                history.best_epoch = epoch
                bad_epochs = 0
            else:
                bad_epochs += 1
            postfix["valid LL"] = f"{ll:.4f}"
            bar.set_postfix(postfix, refresh=False)  # shown at the next refresh
            if callback is not None and main:
                history.seconds = time.perf_counter() - start
                callback(epoch, history)
            if stop:
                break
            if bad_epochs >= patience:
                stop = "early-stopping"
                break
        history.stopped = stop or "max-epochs"
        history.seconds = time.perf_counter() - start
        save(history.epochs, 0, finished=True)
    finally:
        bar.close()
        flow.load_state_dict(best_state)
        flow.eval()
    return history


def _shard_loss(
    flow: nn.Module,
    model: nn.Module,
    batch: Tensor,
    context: Tensor | None,
    world: distributed.World,
    first: bool,
) -> Tensor:
    """This rank's part of the global batch's mean negative log-likelihood, scaled so that
    DistributedDataParallel's average of the ranks' gradients is the global batch's gradient.

    Before the very first step, data-dependent initialisations (ActNorm) are run on the whole
    global batch, as a single process would, so that every rank starts from the same weights.
    """
    if first and any(
        isinstance(b, Tensor) and b.dtype == torch.bool and not bool(b.all())
        for name, b in flow.named_buffers()
        if name.rsplit(".", 1)[-1] == "initialized"
    ):
        with torch.no_grad():
            flow.log_prob(batch, context)
    lo, hi = world.shard(len(batch))
    c = None if context is None else context[lo:hi]
    return -model(batch[lo:hi], c).sum() * (world.size / len(batch))


def _get_rng(device: torch.device) -> dict[str, list[int]]:
    """Torch's generator states (CPU, and the flow's GPU), as lists of ints for JSON."""
    state = {"cpu": torch.get_rng_state().tolist()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device).tolist()
    return state


def _set_rng(state: dict[str, list[int]], device: torch.device) -> None:
    torch.set_rng_state(torch.tensor(state["cpu"], dtype=torch.uint8))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8), device)


def _digest(*tensors: Tensor | None) -> str:
    """sha256 of the tensors' shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
        t = t.detach().contiguous().cpu()
        h.update(f"{tuple(t.shape)} {t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _fingerprint(
    flow: nn.Module,
    settings: dict[str, Any],
    train: Tensor,
    valid: Tensor,
    train_context: Tensor | None,
    valid_context: Tensor | None,
) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed: the flow's structure, the settings
    that shape the run, and the data."""
    return {
        "flow": {k: [type(flow).__name__, *v.shape] for k, v in flow.state_dict().items()},
        "settings": settings,
        "train": [list(train.shape), _digest(train, train_context)],
        "valid": [list(valid.shape), _digest(valid, valid_context)],
    }


class _Checkpoint:
    """The checkpoint file of one :func:`fit` run (see :func:`fit`)."""

    def __init__(
        self,
        folder: Path,
        fingerprint: dict[str, Any],
        every: float | None,
        every_steps: int | None,
    ) -> None:
        self.folder = folder
        self.path = folder / CHECKPOINT_FILE
        self.fingerprint = fingerprint
        self.every = every
        self.every_steps = every_steps

    def due(self, step: int, since: float) -> bool:
        """Whether a checkpoint is due after global step ``step``, ``since`` seconds after
        the last one."""
        if self.every_steps is not None and step % self.every_steps == 0:
            return True
        return self.every is not None and since >= self.every

    def save(
        self,
        flow: nn.Module,
        best: dict[str, Tensor],
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        extra: dict[str, Tensor],
        meta: dict[str, Any],
    ) -> None:
        from .io import safetensors_bytes, write_atomic

        tensors = {f"model.{k}": v for k, v in _snapshot(flow).items()}
        tensors.update({f"best.{k}": v.detach().clone() for k, v in best.items()})
        tensors.update(extra)
        optim, groups = optimizer_tensors(optimizer)
        tensors.update(optim)
        meta = {
            "format": "pushforward-checkpoint",
            "version": CHECKPOINT_VERSION,
            **self.fingerprint,
            **meta,
            "param_groups": groups,
            "scheduler": None if scheduler is None else scheduler.state_dict(),
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        # contiguous: safetensors stores plain row-major tensors (convolution weights and their
        # optimizer moments may be channels-last)
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        write_atomic(self.path, safetensors_bytes(tensors, meta))
        readable = json.dumps({k: v for k, v in meta.items() if k not in ("rng", "epoch_rng")})
        write_atomic(self.folder / CHECKPOINT_JSON, (readable + "\n").encode())

    def load(
        self, flow: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
    ) -> dict[str, Any]:
        """Check the checkpoint against this run, load the weights, optimizer and schedule,
        and return the rest (the best weights under ``"best"``, the weight averages' tensors
        under ``"tensors"``)."""
        from safetensors import safe_open

        where = str(self.path)
        try:
            with safe_open(where, framework="pt") as f:
                text = (f.metadata() or {}).get("pushforward")
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except Exception as e:  # safetensors raises its own error types for damaged files
            detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise PushforwardError(f"{where} is not a valid checkpoint: {detail}") from None
        try:
            meta = json.loads(text or "")
        except json.JSONDecodeError:
            meta = None
        if not isinstance(meta, dict) or meta.get("format") != "pushforward-checkpoint":
            raise PushforwardError(f"{where} is not a pushforward checkpoint")
        if meta.get("version") != CHECKPOINT_VERSION:
            raise PushforwardError(
                f"{where} has checkpoint version {meta.get('version')!r}; this version reads "
                f"{CHECKPOINT_VERSION}"
            )
        mine = self.fingerprint
        if meta["flow"] != mine["flow"]:
            raise PushforwardError(
                f"{where} is the checkpoint of a different flow (its parameters' names or "
                "shapes differ from this flow's); start afresh without resume"
            )
        for key, value in mine["settings"].items():
            theirs = meta["settings"].get(key)
            if theirs != value:
                raise PushforwardError(
                    f"{where} was written with {key}={theirs!r}, this run has {key}={value!r}; "
                    "resume with the same settings"
                )
        for part in ("train", "valid"):
            if meta[part] != mine[part]:
                raise PushforwardError(
                    f"{where} was written for different {part} data (shape "
                    f"{shape_str(meta[part][0])}, now {shape_str(mine[part][0])}, or other "
                    "values); resume with the same data"
                )
        model = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        flow.load_state_dict(model)
        _, device = _like(flow)
        load_optimizer_tensors(optimizer, tensors, meta["param_groups"])
        if scheduler is not None and meta.get("scheduler") is not None:
            scheduler.load_state_dict(meta["scheduler"])
        meta["best"] = {k: v.to(device) for k, v in best.items()}
        meta["tensors"] = {k: v.to(device) for k, v in tensors.items() if k.startswith("average.")}
        return meta


class SpikeGuard:
    r"""Tells a training loop to skip the update of a minibatch whose loss is a spike.

    A flow can assign one unlucky minibatch a loss many orders of magnitude above the others
    (a few images the model has learnt to squeeze far into the tails). Clipping bounds that
    batch's gradient, but Adam still takes a full-size step in its direction and its second
    moments stay inflated for thousands of steps: training may never recover its previous
    loss. The guard keeps exponential moving averages of the loss, :math:`m`, and of its
    absolute deviation from :math:`m`, :math:`a` (decay ``decay``), over the accepted steps,
    and rejects a loss that is not finite or exceeds :math:`m + k\,a` (:math:`k` =
    ``threshold``; a normal loss is within about :math:`4a`). The first ``warmup`` losses are
    always accepted (they build the averages); a rejected loss leaves them unchanged.
    ``patience`` rejections in a row mean the model itself has diverged (not one batch):
    :meth:`accept` then raises :class:`~pushforward.core.PushforwardError`.

    Example:
        >>> guard = SpikeGuard(warmup=3)
        >>> [guard.accept(v) for v in (1.0, 1.1, 0.9, 1.0, 1e9, 0.95)]
        [True, True, True, True, False, True]
        >>> guard.skipped
        1
    """

    def __init__(
        self,
        threshold: float = 20.0,
        warmup: int = 100,
        decay: float = 0.99,
        patience: int = 50,
    ):
        self.threshold = _check_number(threshold, "threshold")
        self.warmup = check_positive_int(warmup, "warmup")
        self.decay = _check_number(decay, "decay")
        if self.decay >= 1.0:
            raise PushforwardError(f"decay must be below 1, got {decay!r}")
        self.patience = check_positive_int(patience, "patience")
        self.mean = 0.0
        self.deviation = 0.0
        self.count = 0  # accepted losses
        self.skipped = 0
        self.in_a_row = 0

    def accept(self, loss: float) -> bool:
        """Whether to take the optimiser step of this (scalar) ``loss``."""
        loss = float(loss)
        spike = not math.isfinite(loss) or (
            self.count >= self.warmup and loss > self.mean + self.threshold * self.deviation
        )
        if spike:
            self.skipped += 1
            self.in_a_row += 1
            if self.in_a_row >= self.patience:
                raise PushforwardError(
                    f"training diverged: {self.in_a_row} minibatches in a row had a loss far "
                    f"above the running mean {self.mean:.6g} (last: {loss:.6g}); lower the "
                    f"learning rate"
                )
            return False
        self.in_a_row = 0
        if self.count == 0:
            self.mean = loss
        # early on the averages follow quickly (a plain mean), later with weight 1 - decay
        w = max(1.0 - self.decay, 1.0 / (self.count + 1))
        self.deviation += w * (abs(loss - self.mean) - self.deviation)
        self.mean += w * (loss - self.mean)
        self.count += 1
        return True

    #: the running state (what a checkpoint keeps) and its types
    _STATE = {"mean": float, "deviation": float, "count": int, "skipped": int, "in_a_row": int}

    def state_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in self._STATE}

    def load_state_dict(self, state: dict[str, float]) -> None:
        for k, kind in self._STATE.items():
            setattr(self, k, kind(state[k]))


class WeightAverage:
    r"""An exponential moving average of a module's trainable weights (Polyak averaging).

    After every optimiser step, :meth:`update` moves each average :math:`\bar\theta` towards
    the weights: :math:`\bar\theta \leftarrow \beta_t \bar\theta + (1 - \beta_t)\theta`
    with :math:`\beta_t = \min(\text{decay}, (1 + t) / (10 + t))` at update :math:`t`, so
    early averages follow the weights closely instead of remembering the initialisation. The
    averages start at the weights of the first update (after any data-dependent
    initialisation, e.g. ActNorm's). Evaluating a density model with averaged weights (inside
    ``with average.applied(module):``) usually gives a better test likelihood than the last
    iterate of a noisy optimiser (Polyak and Juditsky 1992; Flow++, Ho et al. 2019, evaluates
    with decay 0.999). Buffers are not averaged: the live ones are used.

    Example:
        >>> m = torch.nn.Linear(1, 1, bias=False)
        >>> _ = m.weight.data.fill_(0.0)
        >>> avg = WeightAverage(decay=0.5)
        >>> avg.update(m)  # the averages start at the weights: 0
        >>> _ = m.weight.data.fill_(1.0)
        >>> avg.update(m)  # beta_1 = min(0.5, 2 / 11): 0.818
        >>> with avg.applied(m):
        ...     print(round(m.weight.item(), 3))
        0.818
        >>> m.weight.item()
        1.0
    """

    def __init__(self, decay: float = 0.999):
        self.decay = _check_number(decay, "decay")
        if self.decay >= 1.0:
            raise PushforwardError(f"decay must be below 1, got {decay!r}")
        self.updates = 0
        self.averages: dict[str, Tensor] = {}

    @staticmethod
    def _trainable(module: nn.Module) -> dict[str, Tensor]:
        return {k: p for k, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Fold the module's current weights into the averages."""
        params = self._trainable(module)
        if not self.averages:
            self.averages = {k: p.detach().clone() for k, p in params.items()}
        elif params.keys() != self.averages.keys():
            raise PushforwardError("WeightAverage.update: the module's parameters changed")
        else:
            beta = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
            torch._foreach_lerp_(
                [self.averages[k] for k in params],
                [p.detach() for p in params.values()],
                1.0 - beta,
            )
        self.updates += 1

    @contextmanager
    def applied(self, module: nn.Module) -> Iterator[None]:
        """Within the block the module holds the averaged weights; its own ones come back
        afterwards (also on an exception). A no-op before the first :meth:`update`."""
        if not self.averages:
            yield
            return
        params = self._trainable(module)
        if params.keys() != self.averages.keys():
            raise PushforwardError("WeightAverage.applied: not the module that was averaged")
        own = {k: p.detach().clone() for k, p in params.items()}
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(self.averages[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(own[k])

    def tensors(self, prefix: str = "average.") -> dict[str, Tensor]:
        """The averages as safetensors-ready copies (keys ``prefix + name``)."""
        return {prefix + k: v.detach().clone().contiguous() for k, v in self.averages.items()}

    def load_tensors(
        self, tensors: dict[str, Tensor], updates: int, prefix: str = "average."
    ) -> None:
        """Restore :meth:`tensors` (other keys ignored) and the update count."""
        self.averages = {
            k[len(prefix) :]: v.clone() for k, v in tensors.items() if k.startswith(prefix)
        }
        self.updates = int(updates)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], list]:
    """An optimizer's state as safetensors-ready tensors ``optim.{param}.{key}`` (copies) and
    its JSON-ready ``param_groups``; :func:`load_optimizer_tensors` restores it."""
    opt = optimizer.state_dict()
    tensors = {}
    for index, values in opt["state"].items():
        for key, value in values.items():
            if not isinstance(value, Tensor):
                raise PushforwardError(f"cannot checkpoint optimizer state {key!r}")
            tensors[f"optim.{index}.{key}"] = value.detach().clone().contiguous()
    return tensors, opt["param_groups"]


def load_optimizer_tensors(
    optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], groups: list
) -> None:
    """Load the state written by :func:`optimizer_tensors` (other keys of ``tensors`` are
    ignored; ``groups`` as read back from JSON)."""
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _warn_non_finite(
    where: str, history: History, what: str = "non-finite loss", stacklevel: int = 5
) -> None:
    kept = f"epoch {history.best_epoch}" if history.best_epoch else "the initial weights"
    warnings.warn(
        f"training stopped: {what} at {where}; restored the weights of {kept}",
        RuntimeWarning,
        stacklevel=stacklevel,
    )


def _guarded(guard: SpikeGuard, loss: float, history: History, epoch: str) -> bool | None:
    """The :class:`SpikeGuard`'s verdict on a step's ``loss`` (the training loops of
    :func:`fit` and :func:`~pushforward.vae.fit_vae`): whether to take the step, recorded in
    ``history.skipped``; ``None``, after the warning, when a run of bad losses means the model
    has diverged and the loop must stop."""
    try:
        take = guard.accept(loss)
    except PushforwardError:  # a run of non-finite or exploding losses
        what = f"{guard.patience} non-finite or exploding losses in a row"
        _warn_non_finite(f"{epoch}, step {history.steps}", history, what, stacklevel=6)
        return None
    finally:
        history.skipped = guard.skipped
    return take


# ---------------------------------------------------------------------------------------------
# reverse KL to an unnormalised target


def _beta(step: int, anneal_steps: int) -> float:
    """Inverse temperature at ``step`` (0-based): :math:`\\min(1, 0.01 + t / T)`."""
    if anneal_steps <= 0:
        return 1.0
    return min(1.0, 0.01 + step / anneal_steps)


def fit_target(
    flow: nn.Module,
    log_density: Callable[[Tensor], Tensor],
    *,
    steps: int = 10000,
    batch_size: int = 256,
    lr: float = 1e-3,
    anneal_steps: int = 0,
    clip: float | None = 10.0,
    max_time: float | None = None,
    seed: int = 0,
    progress: bool = True,
    callback: Callable[[int, History], None] | None = None,
) -> History:
    r"""Fit a flow to an unnormalised density :math:`\tilde p` by minimising the reverse KL.

    Each Adam step minimises the Monte Carlo estimate
    (:func:`~pushforward.losses.reverse_kl`, ``batch_size`` reparameterised samples)

    .. math::
        \mathcal F_{\beta_t}(\theta) = \mathbb E_{x \sim q_\theta}
            \bigl[\log q_\theta(x) - \beta_t \log \tilde p(x)\bigr], \qquad
        \beta_t = \min\bigl(1,\ 0.01 + t / T\bigr),

    where :math:`T` is ``anneal_steps`` (the linear warm-up of Rezende and Mohamed, 2015, who
    use :math:`T = 10^4`; ``anneal_steps=0`` means :math:`\beta_t = 1`). At :math:`\beta = 1`
    the objective is :math:`\mathrm{KL}(q_\theta \| p) - \log Z`. Only the flow's ``forward``
    direction is used (cheap for planar, radial and IAF flows).

    Annealing needs a normalisable target: at small :math:`\beta` the flow spreads towards
    the flattened target, and along a direction where the target has no decay (the
    :math:`z_1` axis of :math:`U_2, U_3, U_4` in :mod:`pushforward.data.potentials`) nothing
    brings it back. Measured with 32 planar layers, 60 s, ``lr=1e-2``: ``anneal_steps=1000``
    left 11% (:math:`U_2`) to 72% (:math:`U_4`) of the flow's mass in :math:`[-4, 4]^2`;
    ``anneal_steps=0`` gave good fits.

    ``History.train_loss`` holds the mean objective over each :data:`CHECK_EVERY` steps
    (``History.loss_every``); the model keeps its final weights, unless a non-finite loss or
    parameter stops the run (``stopped="non-finite"``, with a :class:`RuntimeWarning`), which
    restores the weights of the last finite check. The flow is left in eval mode; torch's
    global RNG state is restored afterwards.

    Args:
        flow: the model :math:`q_\theta` (trained in place).
        log_density: :math:`\log \tilde p`, mapping ``(batch, *event)`` to ``(batch,)``
            (e.g. :func:`pushforward.data.potentials.potential`).
        steps: number of optimiser steps.
        batch_size: Monte Carlo samples per step.
        lr: Adam's learning rate.
        anneal_steps: length :math:`T` of the inverse-temperature warm-up (0: none).
        clip: maximum gradient norm (``None``: no clipping).
        max_time: wall-clock budget in seconds, checked every step (``None``: none).
        seed: the seed of every random draw.
        progress: show a tqdm progress bar (stderr) with the running loss.
        callback: called as ``callback(step, history)`` after every ``train_loss`` entry.

    Returns:
        The :class:`History` of the run (``stopped`` is ``"max-steps"``, ``"max-time"`` or
        ``"non-finite"``).

    References:
        Rezende and Mohamed (2015), "Variational Inference with Normalizing Flows",
        arXiv:1505.05770 (section 6.1).

    Example:
        >>> from pushforward.distributions import Flow, StandardNormal
        >>> from pushforward.transforms.linear import ElementwiseAffine
        >>> flow = Flow(StandardNormal(2), ElementwiseAffine(2))
        >>> log_p = lambda x: -0.5 * ((x - 2) ** 2).sum(-1)
        >>> history = fit_target(flow, log_p, steps=300, lr=0.05, progress=False)
        >>> history.stopped, round(estimate_reverse_kl(flow, log_p), 1)  # -log Z = -log(2 pi)
        ('max-steps', -1.8)
    """
    if not isinstance(flow, nn.Module) or not hasattr(flow, "sample_and_log_prob"):
        raise PushforwardError(
            f"fit_target needs a Flow (with sample_and_log_prob), got {type(flow).__name__}"
        )
    if not callable(log_density):
        raise PushforwardError("log_density must be a function of the samples")
    if int(getattr(flow, "context_features", 0)):
        raise PushforwardError("fit_target needs an unconditional flow")
    steps = check_positive_int(steps, "steps")
    batch_size = check_positive_int(batch_size, "batch_size")
    if isinstance(anneal_steps, bool) or not isinstance(anneal_steps, int) or anneal_steps < 0:
        raise PushforwardError(f"anneal_steps must be a non-negative integer, got {anneal_steps!r}")
    lr = _check_number(lr, "lr")
    clip = None if clip is None else _check_number(clip, "clip")
    max_time = None if max_time is None else _check_number(max_time, "max_time")
    params = [p for p in flow.parameters() if p.requires_grad]
    if not params:
        raise PushforwardError("the flow has no trainable parameters")

    return _step_loop(
        flow,
        params,
        lambda step: reverse_kl(flow, log_density, batch_size, beta=_beta(step, anneal_steps)),
        steps=steps,
        lr=lr,
        clip=clip,
        max_time=max_time,
        seed=seed,
        progress=progress,
        desc="fit-target",
        callback=callback,
    )


def _step_loop(
    flow: nn.Module,
    params: list[Tensor],
    loss_fn: Callable[[int], Tensor],
    *,
    steps: int,
    lr: float,
    clip: float | None,
    max_time: float | None,
    seed: int,
    progress: bool,
    desc: str,
    callback: Callable[[int, History], None] | None,
) -> History:
    """Minimise ``loss_fn(step)`` (0-based step) for ``steps`` Adam steps over ``params`` of
    ``flow``: the loop of :func:`fit_target` and :func:`distill`.

    Seeded by ``seed`` (inside a forked RNG state), ``flow`` in train mode while it runs and in
    eval mode after; the mean loss of every :data:`CHECK_EVERY` steps goes to
    ``History.train_loss``; a non-finite loss or parameter stops the run with a warning and
    restores the weights of the last finite check; ``max_time`` is checked every step.
    """
    _, device = _like(flow)
    history = History(loss_every=CHECK_EVERY)
    start = time.perf_counter()
    optimizer = _adam(params, lr)
    good_state = _snapshot(flow)
    bar = _progress(steps, desc, progress)
    stop = ""
    try:
        with _seeded(int(seed), device):
            flow.train()
            chunk_sum = torch.zeros((), dtype=torch.float64, device=device)
            chunk = 0
            for step in range(steps):
                loss = loss_fn(step)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if clip is not None:
                    nn.utils.clip_grad_norm_(params, clip)
                optimizer.step()
                history.steps += 1
                chunk_sum += loss.detach().double()
                chunk += 1
                bar.update(1)
                out_of_time = max_time is not None and time.perf_counter() - start > max_time
                if chunk == CHECK_EVERY or step == steps - 1 or out_of_time:
                    mean = chunk_sum.item() / chunk
                    if not math.isfinite(mean) or not _all_finite(params):
                        stop = "non-finite"
                        warnings.warn(
                            f"training stopped: non-finite loss or parameters by step "
                            f"{history.steps}; restored the weights of step "
                            f"{history.steps - chunk}",
                            RuntimeWarning,
                            stacklevel=3,
                        )
                        break
                    good_state = _snapshot(flow)
                    history.train_loss.append(mean)
                    bar.set_postfix({"loss": f"{mean:.4f}"}, refresh=False)
                    chunk_sum.zero_()
                    chunk = 0
                    if callback is not None:
                        history.seconds = time.perf_counter() - start
                        callback(history.steps, history)
                if out_of_time:
                    stop = "max-time"
                    break
    finally:
        bar.close()
        flow.load_state_dict(good_state)
        flow.eval()
    history.stopped = stop or "max-steps"
    history.seconds = time.perf_counter() - start
    return history


def estimate_reverse_kl(
    flow: nn.Module,
    log_density: Callable[[Tensor], Tensor],
    n: int = 10000,
    *,
    seed: int | None = 0,
) -> float:
    r"""Monte Carlo estimate of :math:`\mathrm{KL}(q \| p) - \log Z` for reports.

    .. math::
        \frac1n \sum_{i=1}^n \bigl[\log q(x_i) - \log \tilde p(x_i)\bigr], \quad x_i \sim q,

    evaluated in eval mode without gradients, in batches of :data:`EVAL_BATCH`. It is at least
    :math:`-\log Z` and equals it when :math:`q = p`, so lower is better and differences
    between flows fitted to the same target are differences in :math:`\mathrm{KL}(q \| p)`.

    Args:
        flow: the model :math:`q`.
        log_density: :math:`\log \tilde p` (e.g. :func:`pushforward.data.potentials.potential`).
        n: number of samples.
        seed: seed of the samples (torch's global RNG state is left as it was); ``None``
            draws from the global RNG.

    Returns:
        The estimate in nats (NaN or infinite if the flow or target is).

    Example:
        >>> from pushforward.distributions import Flow, StandardNormal
        >>> from pushforward.transforms.linear import ElementwiseAffine
        >>> flow = Flow(StandardNormal(2), ElementwiseAffine(2))
        >>> round(estimate_reverse_kl(flow, lambda x: -0.5 * (x * x).sum(-1)), 4)
        -1.8379
    """
    n = check_positive_int(n, "n")
    was_training = flow.training
    flow.eval()
    _, device = _like(flow)
    total = torch.zeros((), dtype=torch.float64, device=device)

    def run() -> None:
        nonlocal total
        with torch.no_grad():
            for i in range(0, n, EVAL_BATCH):
                m = min(EVAL_BATCH, n - i)
                total += reverse_kl(flow, log_density, m).double() * m

    try:
        if seed is None:
            run()
        else:
            with _seeded(int(seed), device):
                run()
    finally:
        flow.train(was_training)
    return total.item() / n


# ---------------------------------------------------------------------------------------------
# density distillation

#: the objectives of :func:`distill`
DISTILL_OBJECTIVES = ("kl", "mse", "both")


def _same_base(student: nn.Module, teacher: nn.Module) -> bool:
    """Whether the two flows' bases are the same distribution (same class, equal state)."""
    a, b = student.base, teacher.base
    if type(a) is not type(b) or tuple(a.event_shape) != tuple(b.event_shape):
        return False
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        return False
    return all(
        sa[k].shape == sb[k].shape and torch.equal(sa[k].to(sb[k].device, sb[k].dtype), sb[k])
        for k in sa
    )


def distill(
    student: nn.Module,
    teacher: nn.Module,
    *,
    objective: str = "both",
    context: Tensor | None = None,
    steps: int = 10000,
    batch_size: int = 256,
    lr: float = 1e-3,
    clip: float | None = 10.0,
    max_time: float | None = None,
    seed: int = 0,
    progress: bool = True,
    callback: Callable[[int, History], None] | None = None,
) -> History:
    r"""Train a student flow to reproduce a trained teacher (density distillation), e.g. an IAF
    (fast sampling) from a MAF (fast density).

    Each Adam step minimises, on ``batch_size`` fresh samples,

    .. math::
        \mathcal L_\text{kl}(\phi) = \mathbb E_{x \sim s_\phi}
            \bigl[\log s_\phi(x) - \log t(x)\bigr] = \mathrm{KL}(s_\phi \,\|\, t),
        \qquad
        \mathcal L_\text{mse}(\phi) = \mathbb E_{z \sim q_0}
            \bigl[\|f_t(z) - f_\phi(z)\|^2 + \|z - f_t^{-1}(f_\phi(z))\|^2\bigr],

    (:func:`~pushforward.losses.distillation_kl`, :func:`~pushforward.losses.distillation_mse`),
    or their sum for ``objective="both"`` (the default), computed from the passes of the MSE
    alone: the student's :math:`x' = f_\phi(z)` and the teacher's :math:`f_t^{-1}(x')` also give
    :math:`\log s_\phi(x') - \log t(x')`. With an IAF student and a MAF teacher every pass
    that carries a gradient is a single parallel pass (student sampling, teacher density); only
    the teacher's own samples :math:`f_t(z)` of the MSE take its sequential direction, without
    gradient. The KL objective matches densities and works for any two flows of the same
    shape, but is mode-seeking: a student can leave some of the teacher's mass uncovered at
    little cost, which shows as a low test log-likelihood on a few points. The MSE matches the
    maps :math:`z \mapsto x` over the whole base, so it and ``"both"`` need the student's base
    to be the teacher's (checked: same class and equal parameters; copy it with
    ``student.base.load_state_dict(teacher.base.state_dict())``). Measured on 8 Gaussians
    (MAF teacher and IAF student with 5 layers of 512 x 512, 60 s each), ``"both"`` left the
    student closest to the teacher by KL and by test log-likelihood.

    The teacher is put in eval mode and its parameters are frozen while the student trains;
    both are given back as they were. The student ends in eval mode with its final weights,
    unless a non-finite loss or parameter stops the run (``stopped="non-finite"``, with a
    :class:`RuntimeWarning`), which restores the weights of the last finite check.
    ``History.train_loss`` holds the mean objective of every :data:`CHECK_EVERY` steps; for
    ``"kl"`` it is a running estimate of :math:`\mathrm{KL}(s_\phi \| t)` in nats, and
    :func:`estimate_reverse_kl` ``(student, teacher.log_prob)`` measures it afterwards. Torch's
    global RNG state is restored afterwards.

    Args:
        student: the flow :math:`s_\phi` to train (in place).
        teacher: the trained flow :math:`t` (same event shape and context size).
        objective: ``"kl"``, ``"mse"`` or ``"both"`` (their sum).
        context: for conditional flows, a pool of context rows ``(rows, context_features)``;
            every step draws ``batch_size`` of them (with replacement), one sample each.
        steps: number of optimiser steps.
        batch_size: samples per step.
        lr: Adam's learning rate.
        clip: maximum gradient norm (``None``: no clipping).
        max_time: wall-clock budget in seconds, checked every step (``None``: none).
        seed: the seed of every random draw.
        progress: show a tqdm progress bar (stderr) with the running loss.
        callback: called as ``callback(step, history)`` after every ``train_loss`` entry.

    Returns:
        The :class:`History` of the run (``stopped`` is ``"max-steps"``, ``"max-time"`` or
        ``"non-finite"``).

    References:
        van den Oord et al. (2018), "Parallel WaveNet: Fast High-Fidelity Speech Synthesis",
        arXiv:1711.10433 (probability density distillation).
        Krause and Shih (2021), "CaloFlow II: Even Faster and Still Accurate Generation of
        Calorimeter Showers with Normalizing Flows", arXiv:2110.11377 (an IAF student
        regressed on a MAF teacher).

    Example:
        >>> from pushforward.distributions import Flow, StandardNormal
        >>> from pushforward.transforms.linear import ElementwiseAffine
        >>> teacher = Flow(StandardNormal(2), ElementwiseAffine(2))
        >>> _ = teacher.transform.params.params["shift"].data.fill_(2.0)
        >>> student = Flow(StandardNormal(2), ElementwiseAffine(2))
        >>> history = distill(student, teacher, objective="mse", steps=200, lr=0.05,
        ...                   progress=False)
        >>> history.stopped, abs(estimate_reverse_kl(student, teacher.log_prob)) < 1e-3
        ('max-steps', True)
    """
    from .losses import _check_pair, _kl_and_mse, distillation_kl, distillation_mse

    _check_pair(student, teacher)
    if student is teacher:
        raise PushforwardError("the student and the teacher are the same flow")
    if objective not in DISTILL_OBJECTIVES:
        raise PushforwardError(
            f"unknown objective {objective!r}; choose from: {', '.join(DISTILL_OBJECTIVES)}"
        )
    if objective != "kl" and not _same_base(student, teacher):
        raise PushforwardError(
            f"the {objective!r} objective matches the maps z -> x, so the student's base must "
            f"be the teacher's, but they differ (student {type(student.base).__name__}, "
            f"teacher {type(teacher.base).__name__}); copy it with "
            "student.base.load_state_dict(teacher.base.state_dict()), or use objective='kl'"
        )
    steps = check_positive_int(steps, "steps")
    batch_size = check_positive_int(batch_size, "batch_size")
    lr = _check_number(lr, "lr")
    clip = None if clip is None else _check_number(clip, "clip")
    max_time = None if max_time is None else _check_number(max_time, "max_time")
    dtype, device = _like(student)
    if _like(teacher) != (dtype, device):
        t_dtype, t_device = _like(teacher)
        raise PushforwardError(
            f"student and teacher must share dtype and device: student {dtype} on {device}, "
            f"teacher {t_dtype} on {t_device}"
        )
    features = int(student.context_features)
    if features and context is None:
        raise PushforwardError(
            f"these flows are conditional: distill needs a pool of context rows of shape "
            f"{shape_str(('rows', features))}"
        )
    pool = None
    if context is not None and not features:
        raise PushforwardError("these flows are unconditional: distill takes no context")
    if context is not None:
        context = torch.as_tensor(context)
        if context.dim() != 2 or len(context) < 1:
            raise PushforwardError(
                f"context: expected a pool of rows of shape {shape_str(('rows', features))}, "
                f"got {shape_str(context.shape)}"
            )
        pool = _context_rows(context, student, len(context), "context", "distill")
        pool = pool.to(device=device, dtype=dtype)
    teacher_params = set(map(id, teacher.parameters()))
    params = [p for p in student.parameters() if p.requires_grad and id(p) not in teacher_params]
    if not params:
        raise PushforwardError("the student has no trainable parameters of its own")

    def loss_fn(step: int) -> Tensor:
        if pool is None:
            n, c = batch_size, None
        else:
            n, c = 1, pool[torch.randint(len(pool), (batch_size,), device=device)]
        if objective == "kl":
            return distillation_kl(student, teacher, n, c)
        if objective == "mse":
            return distillation_mse(student, teacher, n, c)
        kl, mse = _kl_and_mse(student, teacher, n, c)  # one set of passes for both
        return kl + mse

    frozen = [(p, p.requires_grad) for p in teacher.parameters()]
    was_training = teacher.training
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        teacher.eval()
        return _step_loop(
            student,
            params,
            loss_fn,
            steps=steps,
            lr=lr,
            clip=clip,
            max_time=max_time,
            seed=seed,
            progress=progress,
            desc="distill",
            callback=callback,
        )
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
        teacher.train(was_training)
