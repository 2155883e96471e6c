"""Image flows on MNIST under a fixed CPU time budget: test bits/dim, step time, samples/s.

Every model of every library is trained by the one loop of :func:`train`: uniformly
dequantized pixels :math:`y = (x + u) / 256` drawn afresh for every minibatch, Adam
(``--lr``, linearly warmed up over the first ``--warmup`` steps, then constant, or with
``--schedule cosine`` decaying to 0 at the end of the budget), batch ``--batch-size``,
gradient-norm clipping at ``--clip``, the same shuffles, optionally an exponential moving
average of the weights (``--ema 0.999``, :class:`pushforward.train.WeightAverage`) evaluated
alongside the weights themselves, and a budget of ``--budget`` seconds
of *training* time (evaluations and checkpoints are not counted). A minibatch whose loss is a
spike (:class:`pushforward.train.SpikeGuard`: far above the running mean) is drawn and timed
but not stepped on; the table counts them. There is no early stopping: the weights at the end
of the budget are the ones reported.

At each milestone of ``--milestones`` (seconds of training; the budget is the last one) the
script measures test bits/dim on the first ``--test-rows`` MNIST test images (all 10,000 by
default), each dequantized once with a fixed seed (the same noise for every library), in the
discrete space: :math:`(-\\log p_Y(y) + D \\log 256) / (D \\log 2)`, :math:`D = 784`
(:func:`pushforward.data.images.bits_per_dim`). The curve (every ``--curve-every`` seconds of
training: running training bits/dim and validation bits/dim on 2,000 held-out training
images) is printed and written to ``--json``.

Long runs checkpoint to ``--checkpoint DIR`` every ``--checkpoint-every`` seconds (weights and
Adam's state in safetensors, the rest as JSON metadata; nothing is pickled) and continue with
``--resume``: a run interrupted in one session finishes in the next.

The models: pushforward's registered ``glow`` and ``realnvp-image`` with the options of
``image_peers.MODELS`` (sizes chosen to train on a CPU; ``--options`` overrides them with a
JSON object, e.g. ``'{"logit": 0.05}'``), and the same architectures built in
nflows by ``image_peers.py`` (its docstring lists how they line up). Before training, the
script times one training step (forward, backward, Adam) on a batch of ``--step-batch`` 28x28
images for every library and model (median of ``--step-repeats``), and after training the
sampling rate.

Run from the repository root::

    python benchmarks/images.py --quick                       # smoke run, ~2 minutes
    python benchmarks/images.py --budget 600                  # both models, both libraries
    python benchmarks/images.py --models glow --libs pushforward --budget 7200 \\
        --milestones 3600,7200 --checkpoint runs/images --json runs/images/glow.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import image_peers
import torch
from image_peers import LIBS, MODELS, Built

from pushforward.core import PushforwardError
from pushforward.data.images import bits_per_dim, dequantize_uniform, load_mnist
from pushforward.train import (
    SpikeGuard,
    WeightAverage,
    load_optimizer_tensors,
    optimizer_tensors,
)

SHAPE = (1, 28, 28)
LEVELS = 256
#: seeds of the fixed dequantization of the evaluation images and of the validation split
EVAL_SEED, SPLIT_SEED = 1234, 0
VALID_ROWS = 2000
EVAL_BATCH = 500


@dataclass
class Data:
    train: torch.Tensor  # integer pixels as float32, (N, 1, 28, 28)
    valid: torch.Tensor  # dequantized once, in [0, 1)
    test: torch.Tensor  # dequantized once, in [0, 1)


def load(test_rows: int | None) -> Data:
    images = torch.from_numpy(load_mnist("train")).float()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(SPLIT_SEED))
    valid = images[order[:VALID_ROWS]]
    train = images[order[VALID_ROWS:]]
    test = torch.from_numpy(load_mnist("test")).float()[:test_rows]

    def once(x: torch.Tensor, seed: int) -> torch.Tensor:
        return dequantize_uniform(x, LEVELS, generator=torch.Generator().manual_seed(seed))

    return Data(train, once(valid, EVAL_SEED + 1), once(test, EVAL_SEED))


def mean_bpd(built: Built, y: torch.Tensor) -> float:
    """Mean discrete bits/dim of the dequantized images ``y`` (no gradient)."""
    built.module.eval()
    with torch.no_grad():
        lp = torch.cat(
            [built.log_prob(y[i : i + EVAL_BATCH]) for i in range(0, len(y), EVAL_BATCH)]
        )
    built.module.train()
    return float(bits_per_dim(lp.double().mean(), math.prod(SHAPE), LEVELS))


@dataclass
class Run:
    lib: str
    model: str
    parameters: int
    steps: int = 0  # optimiser steps taken
    batches: int = 0  # minibatches drawn (steps + skipped spikes)
    skipped: int = 0
    epochs: float = 0.0
    seconds: float = 0.0  # training time
    stopped: str = ""
    curve: list[dict[str, float]] = field(default_factory=list)
    milestones: list[dict[str, float]] = field(default_factory=list)
    samples_per_second: float | None = None
    step_ms: float | None = None


@dataclass
class Recipe:
    lr: float = 1e-3
    warmup: int = 200
    batch_size: int = 64
    clip: float = 50.0
    seed: int = 0
    schedule: str = "constant"
    ema: float = 0.0  # decay of the weight average evaluated alongside the weights; 0: none


def _checkpoint_path(folder: Path, run: Run) -> Path:
    return folder / f"{run.lib}-{run.model}.safetensors"


def _save(
    path: Path,
    built: Built,
    opt: torch.optim.Optimizer,
    run: Run,
    rng: Any,
    guard: SpikeGuard,
    average: WeightAverage | None,
) -> None:
    from safetensors.torch import save_file

    tensors = {
        f"model.{k}": v.detach().clone().contiguous() for k, v in built.module.state_dict().items()
    }
    optim, groups = optimizer_tensors(opt)
    tensors.update(optim)
    meta = {"run": asdict(run), "rng": rng, "param_groups": groups, "guard": guard.state_dict()}
    if average is not None:
        tensors.update(average.tensors())
        meta["average_updates"] = average.updates
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tensors = {k: v.contiguous() for k, v in tensors.items()}  # channels-last moments
    save_file(tensors, str(tmp), metadata={"benchmark": json.dumps(meta)})
    tmp.replace(path)


def _load(
    path: Path,
    built: Built,
    opt: torch.optim.Optimizer,
    guard: SpikeGuard,
    average: WeightAverage | None,
) -> tuple[Run, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["benchmark"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    built.module.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    load_optimizer_tensors(opt, tensors, meta["param_groups"])
    if "guard" in meta:
        guard.load_state_dict(meta["guard"])
    if average is not None and "average_updates" in meta:
        average.load_tensors(tensors, meta["average_updates"])
    return Run(**meta["run"]), meta["rng"]


def learning_rate(r: Recipe, steps: int, seconds: float, budget: float) -> float:
    """Linear warm-up over ``r.warmup`` steps, then constant or (``cosine``) decaying to 0 at
    the end of the budget of training seconds."""
    rate = r.lr * min(1.0, (steps + 1) / max(1, r.warmup))
    if r.schedule == "cosine":
        rate *= 0.5 * (1.0 + math.cos(math.pi * min(1.0, seconds / budget)))
    return rate


def train(
    built: Built,
    data: Data,
    milestones: list[float],
    r: Recipe,
    curve_every: float,
    checkpoint: Path | None,
    checkpoint_every: float,
    resume: bool,
) -> Run:
    """The one training loop (see the module docstring)."""
    run = Run(built.lib, built.model, built.parameters)
    params = [p for p in built.module.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=r.lr, foreach=True)
    torch.manual_seed(r.seed)
    gen = torch.Generator().manual_seed(r.seed)
    n, batch = len(data.train), r.batch_size
    per_epoch = n // batch
    path = None if checkpoint is None else _checkpoint_path(checkpoint, run)
    guard = SpikeGuard()
    average = WeightAverage(r.ema) if r.ema > 0 else None
    if resume and path is not None and path.is_file():
        run, rng = _load(path, built, opt, guard, average)
        gen.set_state(torch.tensor(rng["gen"], dtype=torch.uint8))
        torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
        print(f"  resumed {path} at {run.seconds:.0f} s, step {run.steps}", flush=True)
    todo = sorted(m for m in milestones if m > run.seconds)
    budget = max(milestones)
    window: list[float] = []
    last_curve, last_save = run.seconds, time.perf_counter()
    perm = None
    with_rng = lambda: {"gen": gen.get_state().tolist(), "torch": torch.get_rng_state().tolist()}  # noqa: E731
    built.module.train()
    while run.seconds < budget:
        i = run.batches % per_epoch
        if i == 0 or perm is None:
            # a resumed run draws a fresh shuffle (it continues, not bit-identically)
            perm = torch.randperm(n, generator=gen)
        t0 = time.perf_counter()
        y = dequantize_uniform(data.train[perm[i * batch : (i + 1) * batch]], LEVELS)
        loss = -built.log_prob(y).mean()
        run.batches += 1
        try:
            take = guard.accept(loss.item())
        except PushforwardError as e:
            print(f"  {built.lib} {built.model}: {e}", flush=True)
            run.stopped = "diverged"
            break
        if take:
            for g in opt.param_groups:
                g["lr"] = learning_rate(r, run.steps, run.seconds, budget)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, r.clip)
            opt.step()
            if average is not None:
                average.update(built.module)
            run.steps += 1
            window.append(float(bits_per_dim(-loss.detach().double(), math.prod(SHAPE), LEVELS)))
        else:
            run.skipped += 1
            print(
                f"  {built.lib} {built.model}: skipped the update of batch {run.batches} "
                f"(loss {loss.item():.6g}, running mean {guard.mean:.6g})",
                flush=True,
            )
        run.seconds += time.perf_counter() - t0
        run.epochs = run.batches / per_epoch
        if run.seconds - last_curve >= curve_every or run.seconds >= budget:
            point = {
                "seconds": round(run.seconds, 1),
                "steps": run.steps,
                "epochs": round(run.epochs, 3),
                "train_bpd": statistics.fmean(window) if window else math.nan,
                "skipped": run.skipped,
                "valid_bpd": mean_bpd(built, data.valid),
            }
            if average is not None:
                with average.applied(built.module):
                    point["valid_bpd_average"] = mean_bpd(built, data.valid)
            run.curve.append(point)
            window, last_curve = [], run.seconds
            print(f"  {built.lib} {built.model}: {point}", flush=True)
        while todo and run.seconds >= todo[0]:
            m = todo.pop(0)
            test = mean_bpd(built, data.test)
            point = {
                "milestone": m,
                "seconds": round(run.seconds, 1),
                "steps": run.steps,
                "test_bpd": test,
            }
            said = f"test bits/dim {test:.4f}"
            if average is not None:
                with average.applied(built.module):
                    point["test_bpd_average"] = mean_bpd(built, data.test)
                said += f" ({point['test_bpd_average']:.4f} with averaged weights)"
            run.milestones.append(point)
            print(
                f"  {built.lib} {built.model}: {said} after {run.seconds:.0f} s",
                flush=True,
            )
        if path is not None and time.perf_counter() - last_save >= checkpoint_every:
            _save(path, built, opt, run, with_rng(), guard, average)
            last_save = time.perf_counter()
    run.stopped = run.stopped or "budget"
    if path is not None:
        _save(path, built, opt, run, with_rng(), guard, average)
    return run


def sampling_rate(built: Built, n: int) -> float:
    built.module.eval()
    with torch.no_grad():
        built.sample(2)
        t0 = time.perf_counter()
        built.sample(n)
    return n / (time.perf_counter() - t0)


def table(runs: list[Run]) -> str:
    rows = [
        "| library | model | params | step ms | steps | skipped | epochs | train s | "
        + " | ".join(
            f"test bpd @{m['milestone']:.0f}s" for m in (runs[0].milestones if runs else [])
        )
        + " | samples/s |",
    ]
    rows.append("|" + "---|" * (rows[0].count("|") - 1))
    for r in runs:
        tests = " | ".join(
            f"{m['test_bpd']:.4f}"
            + (f" / {m['test_bpd_average']:.4f} avg" if "test_bpd_average" in m else "")
            for m in r.milestones
        )
        step = "n/a" if r.step_ms is None else f"{r.step_ms:.0f}"
        rate = "n/a" if r.samples_per_second is None else f"{r.samples_per_second:.0f}"
        rows.append(
            f"| {r.lib} | {r.model} | {r.parameters:,} | {step} | {r.steps} | {r.skipped} | "
            f"{r.epochs:.2f} | "
            f"{r.seconds:.0f} | {tests} | {rate} |"
        )
    return "\n".join(rows)


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--libs", default=",".join(LIBS))
    p.add_argument("--budget", type=float, default=600.0, help="seconds of training per model")
    p.add_argument("--milestones", default="", help="seconds of training, e.g. 3600,7200")
    p.add_argument("--curve-every", type=float, default=None)
    p.add_argument("--test-rows", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--clip", type=float, default=50.0)
    p.add_argument("--schedule", choices=("constant", "cosine"), default="constant")
    p.add_argument(
        "--ema",
        type=float,
        default=0.0,
        help="also evaluate an exponential moving average of the weights with this decay "
        "(e.g. 0.999; 0: off)",
    )
    p.add_argument(
        "--options",
        type=_json_object,
        default={},
        help="JSON object of recipe options over image_peers.MODELS, "
        "e.g. '{\"split_prior\": true}'",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--step-batch", type=int, default=64)
    p.add_argument("--step-repeats", type=int, default=5)
    p.add_argument("--samples", type=int, default=100, help="images drawn to time sampling")
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--checkpoint-every", type=float, default=300.0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--quick", action="store_true", help="30 s per model on 1,000 test images")
    a = p.parse_args(argv)
    if a.quick:
        a.budget, a.test_rows, a.step_repeats, a.samples = 30.0, 1000, 2, 16
    torch.set_num_threads(a.threads)
    models = [m for m in a.models.split(",") if m]
    libs = [lib for lib in a.libs.split(",") if lib]
    for m in models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    milestones = sorted({float(s) for s in a.milestones.split(",") if s} | {a.budget})
    if not 0.0 <= a.ema < 1.0:
        p.error(f"--ema must be in [0, 1), got {a.ema}")
    recipe = Recipe(a.lr, a.warmup, a.batch_size, a.clip, a.seed, a.schedule, a.ema)
    try:
        data = load(a.test_rows)
    except PushforwardError as e:
        print(f"images.py: {e}", file=sys.stderr)
        return 1
    print(
        f"MNIST: {len(data.train)} training, {len(data.valid)} validation, {len(data.test)} test "
        f"images; torch {torch.__version__}, {a.threads} thread(s); budget {a.budget:.0f} s",
        flush=True,
    )
    runs: list[Run] = []
    for model in models:
        for lib in libs:
            torch.manual_seed(a.seed)
            try:
                built = image_peers.build(lib, model, SHAPE, a.options)
            except Exception as e:  # a peer that cannot build the model: say so, go on
                print(f"  {lib} {model}: n/a ({e})", flush=True)
                continue
            step_ms = None
            if a.step_repeats > 0:
                times = image_peers.step_time(built, data.valid[: a.step_batch], a.step_repeats)
                step_ms = 1000 * statistics.median(times)
                torch.manual_seed(a.seed)  # the timing steps changed the weights: start again
                built = image_peers.build(lib, model, SHAPE, a.options)
                print(
                    f"  {lib} {model}: {built.parameters:,} parameters, step {step_ms:.1f} ms",
                    flush=True,
                )
            run = train(
                built,
                data,
                milestones,
                recipe,
                a.curve_every or max(milestones) / 10,
                a.checkpoint,
                a.checkpoint_every,
                a.resume,
            )
            run.step_ms = step_ms
            run.samples_per_second = sampling_rate(built, a.samples)
            runs.append(run)
    print()
    print(table(runs))
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps([asdict(r) for r in runs], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
