"""Test log-likelihoods of the same flows in pushforward, zuko and nflows, trained alike.

Every model of every library is trained by the one loop below (:func:`train`): Adam, the same
learning rate, batch size, gradient-norm clipping, shuffles and validation split, early
stopping on the validation log-likelihood (the best epoch's weights are kept), and the same
wall-clock budget per model. Data: MiniBooNE (``pushforward.data.load("miniboone")``, the
fixed 70/10/20 re-split of the MAF paper's preprocessed rows) and the 2-D toys of
``pushforward.data`` (20,000 training points, 10% of them held out for validation, 10,000
test points). Features are standardized with the training statistics before fitting; the
reported log-likelihoods are mean nats per test example **in the units of the data as
given** (the standardization's log-determinant is added back), so the toys' column ``exact``
(the true density's mean log-likelihood on the same test points, where it has a closed form)
is an upper reference for them.

Run from the repository root::

    python benchmarks/quality.py                    # everything (hours: see the README)
    python benchmarks/quality.py --quick            # smoke run, under a minute
    python benchmarks/quality.py --datasets miniboone --models maf,nsf --budget 600
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import peers
import torch

from pushforward import data as pfdata
from pushforward.core import PushforwardError
from pushforward.data.toy import log_prob_names


@dataclass
class Recipe:
    """The training recipe shared by every library and model."""

    lr: float = 1e-3
    batch_size: int = 256
    clip: float = 5.0
    patience: int = 20  # epochs without a better validation log-likelihood
    max_epochs: int = 1000
    eval_batch: int = 8192
    seed: int = 0


@dataclass
class Dataset:
    name: str
    train: torch.Tensor  # standardized
    valid: torch.Tensor
    test: torch.Tensor
    log_scale: float  # sum of log std: LL in data units = LL standardized - log_scale
    exact: float | None  # mean true log-density of the test points (data units), if known

    @property
    def features(self) -> int:
        return self.train.shape[1]


def load_dataset(name: str, seed: int = 0, eval_rows: int | None = None) -> Dataset:
    """``miniboone`` (its train/valid/test re-split) or a toy (train with 10% held out);
    ``eval_rows`` keeps only the first rows of the validation and test sets."""
    if name == "miniboone":
        train, valid, test = (pfdata.load("miniboone", s) for s in ("train", "valid", "test"))
    else:
        full = pfdata.load(name, "train")
        order = np.random.default_rng(seed).permutation(len(full))
        n_valid = len(full) // 10
        train, valid = full[order[n_valid:]], full[order[:n_valid]]
        test = pfdata.load(name, "test")
    valid, test = valid[:eval_rows], test[:eval_rows]
    exact = None
    if name in log_prob_names():
        exact = float(np.mean(pfdata.toy_log_prob(name, test)))
    mean = train.mean(0, dtype=np.float64)
    std = train.std(0, dtype=np.float64)

    def scale(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(((a - mean) / std).astype(np.float32))

    return Dataset(name, scale(train), scale(valid), scale(test), float(np.log(std).sum()), exact)


@dataclass
class Result:
    dataset: str
    model: str
    lib: str
    params: int | None = None
    test_ll: float | None = None  # mean nats per example, data units
    test_se: float | None = None  # its standard error
    valid_ll: float | None = None  # best validation log-likelihood (data units)
    best_epoch: int = 0
    epochs: int = 0
    steps: int = 0
    seconds: float = 0.0
    stopped: str = ""
    note: str = ""


def log_probs(built: peers.Built, x: torch.Tensor, batch: int) -> torch.Tensor:
    """Per-row log-densities (standardized units), in batches, without gradient."""
    built.module.eval()
    with torch.no_grad():
        out = torch.cat([built.log_prob(x[i : i + batch]) for i in range(0, len(x), batch)])
    built.module.train()
    return out


def train(built: peers.Built, ds: Dataset, budget: float, r: Recipe) -> Result:
    """The one training loop of the benchmark (see the module docstring); returns the test
    log-likelihood of the best validation epoch's weights."""
    res = Result(ds.name, built.model, built.lib, built.parameters)
    params = [p for p in built.module.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=r.lr, foreach=True)
    gen = torch.Generator().manual_seed(r.seed)
    n = len(ds.train)
    batch = min(r.batch_size, n)

    def validate() -> float:
        return float(log_probs(built, ds.valid, r.eval_batch).mean())

    best_ll, best_state = validate(), copy.deepcopy(built.module.state_dict())
    if not math.isfinite(best_ll):  # a NaN would never compare as improved upon
        best_ll = -math.inf
    start = time.perf_counter()
    built.module.train()
    while res.epochs < r.max_epochs and not res.stopped:
        perm = torch.randperm(n, generator=gen)
        for i in range(max(1, n // batch)):
            if time.perf_counter() - start > budget:
                res.stopped = "max-time"
                break
            loss = -built.log_prob(ds.train[perm[i * batch : (i + 1) * batch]]).mean()
            if not torch.isfinite(loss):
                res.stopped = "non-finite"
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, r.clip)
            opt.step()
            res.steps += 1
        res.epochs += 1
        if res.stopped == "non-finite":
            break
        ll = validate()
        if math.isfinite(ll) and ll > best_ll:
            best_ll, res.best_epoch = ll, res.epochs
            best_state = copy.deepcopy(built.module.state_dict())
        elif res.epochs - res.best_epoch >= r.patience and not res.stopped:
            res.stopped = "early-stopping"
    res.stopped = res.stopped or "max-epochs"
    res.seconds = time.perf_counter() - start
    built.module.load_state_dict(best_state)
    lp = log_probs(built, ds.test, r.eval_batch).double() - ds.log_scale
    finite = torch.isfinite(lp)
    if not finite.all():
        res.note = f"{int((~finite).sum())} non-finite test log-densities"
    res.test_ll = float(lp.mean())
    res.test_se = float(lp.std() / math.sqrt(len(lp))) if finite.all() else None
    res.valid_ll = best_ll - ds.log_scale
    return res


# ---------------------------------------------------------------------------------------------
# tables


def _ll(v: float | None, se: float | None = None) -> str:
    if v is None:
        return "n/a"
    if not math.isfinite(v):
        return str(v)
    return f"{v:.3f}" if se is None else f"{v:.3f} ± {se:.3f}"


def tables(results: list[Result], datasets: dict[str, Dataset], libs: list[str]) -> str:
    by = {(r.dataset, r.model, r.lib): r for r in results}
    keys = list(dict.fromkeys((r.dataset, r.model) for r in results))
    head = ["dataset", "d", "model", *libs, "exact"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for dname, model in keys:
        ds = datasets[dname]
        cells = [dname, str(ds.features), model]
        for lib in libs:
            r = by.get((dname, model, lib))
            cells.append("n/a" if r is None or r.test_ll is None else _ll(r.test_ll, r.test_se))
        cells.append(_ll(ds.exact))
        lines.append("| " + " | ".join(cells) + " |")
    detail_head = [
        "dataset",
        "model",
        "lib",
        "params",
        "test LL",
        "best valid LL",
        "best epoch",
        "epochs",
        "steps",
        "ms/step",
        "seconds",
        "stopped",
        "notes",
    ]
    detail = ["| " + " | ".join(detail_head) + " |", "|" + "---|" * len(detail_head)]
    for r in results:
        ms = f"{1e3 * r.seconds / r.steps:.1f}" if r.steps else "n/a"
        detail.append(
            "| "
            + " | ".join(
                [
                    r.dataset,
                    r.model,
                    r.lib,
                    "n/a" if r.params is None else f"{r.params:,}",
                    _ll(r.test_ll),
                    _ll(r.valid_ll),
                    str(r.best_epoch),
                    str(r.epochs),
                    str(r.steps),
                    ms,
                    f"{r.seconds:.0f}",
                    r.stopped or "-",
                    r.note,
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n\nDetails:\n\n" + "\n".join(detail)


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    all_sets = ["miniboone", *pfdata.toy_names()]
    p.add_argument("--datasets", default=",".join(all_sets), help="comma-separated")
    p.add_argument("--models", default=",".join(peers.MODELS), help="comma-separated")
    p.add_argument("--libs", default=",".join(peers.LIBS), help="comma-separated")
    p.add_argument("--budget", type=float, default=300.0, help="seconds per model, MiniBooNE")
    p.add_argument("--toy-budget", type=float, default=60.0, help="seconds per model, toys")
    p.add_argument("--lr", type=float, default=Recipe.lr)
    p.add_argument("--batch-size", type=int, default=Recipe.batch_size)
    p.add_argument("--patience", type=int, default=Recipe.patience)
    p.add_argument("--max-epochs", type=int, default=Recipe.max_epochs)
    p.add_argument("--seed", type=int, default=Recipe.seed)
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument(
        "--quick", action="store_true", help="smoke run: 2 datasets, 0.5 s budgets, 1,000 test rows"
    )
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)

    recipe = Recipe(args.lr, args.batch_size, 5.0, args.patience, args.max_epochs, seed=args.seed)
    names = args.datasets.split(",")
    budget, toy_budget = args.budget, args.toy_budget
    if args.quick:
        names = ["miniboone", "8gaussians"]
        budget = toy_budget = 0.5
    models, libs = args.models.split(","), args.libs.split(",")
    for m in models:
        if m not in peers.MODELS:
            p.error(f"unknown model {m!r}; choose from {', '.join(peers.MODELS)}")
    for name in names:
        if name not in all_sets:
            p.error(f"unknown dataset {name!r}; choose from {', '.join(all_sets)}")
    torch.set_num_threads(args.threads)

    v = peers.versions()
    print(f"# pushforward quality benchmark ({time.strftime('%Y-%m-%d %H:%M')})")
    print()
    print(f"- versions: {', '.join(f'{k} {val}' for k, val in v.items())}; threads {args.threads}")
    print(
        f"- recipe (every library, every model): Adam lr {recipe.lr:g}, batch "
        f"{recipe.batch_size}, grad-norm clip {recipe.clip:g}, early stopping after "
        f"{recipe.patience} epochs without a better validation log-likelihood, at most "
        f"{recipe.max_epochs} epochs, budget {budget:g} s per model on MiniBooNE and "
        f"{toy_budget:g} s on the toys (validation included), seed {recipe.seed}"
    )
    print(
        "- models: "
        + "; ".join(
            f"{k}: {s.layers} {s.structure} {s.transformer} layer(s), hidden {s.hidden}"
            + (f", {s.bins} bins" if s.transformer == "spline" else "")
            for k, s in peers.MODELS.items()
            if k in models
        )
    )
    print(
        "- test log-likelihood: mean nats per example +- standard error, in the units of the "
        "data as given (fitted on standardized features; the standardization's log|det| is "
        "added back); `exact`: the true density's mean log-likelihood on the same test points"
    )
    sys.stdout.flush()

    datasets: dict[str, Dataset] = {}
    results: list[Result] = []
    t0 = time.perf_counter()
    for name in names:
        try:
            ds = datasets[name] = load_dataset(name, recipe.seed, 1000 if args.quick else None)
        except PushforwardError as err:  # e.g. miniboone.npz not found
            print(f"- {name}: skipped ({err})")
            continue
        seconds = budget if name == "miniboone" else toy_budget
        for model in models:
            for lib in libs:
                torch.manual_seed(recipe.seed)
                try:
                    built = peers.build(lib, model, ds.features)
                except peers.Unavailable as err:
                    results.append(Result(name, model, lib, note=str(err)))
                    continue
                res = train(built, ds, seconds, recipe)
                results.append(res)
                print(
                    f"  {name} {model} {lib}: test {_ll(res.test_ll)} after {res.steps} steps "
                    f"({res.stopped}, {res.seconds:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
    print(f"- took {time.perf_counter() - t0:.0f} s")
    print()
    print(tables(results, datasets, libs))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"recipe": asdict(recipe), "results": [asdict(r) for r in results]}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
