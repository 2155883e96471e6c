"""VAEs with amortized flow posteriors on dynamically binarized MNIST: test -ELBO and
importance-weighted NLL for every posterior family, with the same encoder, decoder and budget.

Every posterior (``gaussian``, ``planar``, ``radial``, ``householder``, ``iaf``, ``cclinIAF``,
``sylvester-orthogonal``, ``sylvester-householder``, ``sylvester-triangular``) gets the same MLP
encoder and decoder (``784 -> hidden -> context`` with ELU, mirrored), the same latent size,
flow length (where the family has one) and context-network widths (where the recipe has a
``hidden`` option), and is trained by :func:`pushforward.vae.fit_vae` with the same recipe:
Adam at a constant learning rate, batches of 100, a fresh Bernoulli binarization of every
batch, a linear KL warm-up, early stopping on the validation ELBO, and the same number of
epochs and (optionally) the same wall-clock budget. Data: ``../shared/data/mnist.npz`` through
:func:`pushforward.data.load_mnist`; the first 50,000 training images train, the last 10,000
validate (binarized once, seeded), and the test images are binarized once with a fixed seed.
Test figures come from :func:`pushforward.vae.evaluate_vae`: the ELBO is the mean of the K
log-weights per image, the NLL minus the log-mean-exp of the same K weights (K = 1000 by
default), in nats per image.

The published reference points (van den Berg et al. 2018, Table 1, -ELBO / NLL on dynamically
binarized MNIST, with gated convolutional encoders and decoders and long training on a GPU;
see the paper for its exact setup) are printed beside the results: a short CPU run with an MLP
pair is not expected to reach them, only to rank the families.

Run from the repository root::

    python benchmarks/vae.py --quick                       # smoke run, a few minutes
    python benchmarks/vae.py                               # everything, many hours on a CPU
    python benchmarks/vae.py --posteriors gaussian,planar --epochs 10 --budget 300 \\
        --test-rows 1000 --json vae.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

from pushforward import flows
from pushforward.core import PushforwardError
from pushforward.data import load_mnist
from pushforward.vae import POSTERIORS, VAE, evaluate_vae, fit_vae, unit_pixels

#: van den Berg, Hasenclever, Tomczak and Welling (2018), arXiv:1803.05649, Table 1:
#: (-ELBO, NLL) in nats on dynamically binarized MNIST
PUBLISHED = {
    "gaussian": (86.55, 82.14),
    "planar": (86.06, 81.91),
    "iaf": (84.20, 80.79),
    "sylvester-orthogonal": (83.32, 80.22),
    "sylvester-householder": (83.40, 80.29),
    "sylvester-triangular": (83.40, 80.28),
}
_PAPER_NAMES = {
    "gaussian": "VAE",
    "planar": "Planar",
    "iaf": "IAF",
    "sylvester-orthogonal": "O-SNF",
    "sylvester-householder": "H-SNF",
    "sylvester-triangular": "T-SNF",
}


def build(posterior: str, args: argparse.Namespace) -> VAE:
    """The VAE of one posterior: shared networks; flow length and context widths where the
    family has them."""
    options = {}
    length = None
    if posterior != "gaussian":
        recipe = flows.describe(posterior).options
        if "hidden" in recipe:
            options["hidden"] = tuple(args.flow_hidden)
        if "layers" in recipe:
            length = args.flow_length
    return VAE(
        (1, 28, 28),
        latent=args.latent,
        posterior=posterior,
        flow_length=length,
        hidden=tuple(args.hidden),
        context=args.context,
        flow_options=options,
    )


def widths(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--posteriors", default=",".join(POSTERIORS), help="comma-separated")
    p.add_argument("--latent", type=int, default=40)
    p.add_argument("--flow-length", type=int, default=4, help="layers, where a family has them")
    p.add_argument("--hidden", type=widths, default=[300], help="encoder/decoder widths")
    p.add_argument("--context", type=int, default=300, help="size of the encoder's h")
    p.add_argument("--flow-hidden", type=widths, default=[64], help="context-network widths")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--budget", type=float, default=None, help="training seconds per posterior")
    p.add_argument("--warmup", type=float, default=10.0, help="KL warm-up, epochs")
    p.add_argument("--patience", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--train-rows", type=int, default=None, help="first N training images")
    p.add_argument("--test-rows", type=int, default=None, help="first N test images")
    p.add_argument("--iw-samples", type=int, default=1000, help="K of the IW estimate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 2,000 training images, 1 epoch, 200 test images, K = 50",
    )
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.quick:
        args.train_rows, args.test_rows, args.iw_samples = 2000, 200, 50
        args.epochs, args.warmup = 1, 0.5
    names = args.posteriors.split(",")
    for name in names:
        if name not in POSTERIORS:
            p.error(f"unknown posterior {name!r}; choose from {', '.join(POSTERIORS)}")
    torch.set_num_threads(args.threads)

    try:
        images = unit_pixels(load_mnist("train"))
        test = unit_pixels(load_mnist("test"))
    except PushforwardError as err:
        print(f"MNIST not found: {err}", file=sys.stderr)
        return 1
    train, valid = images[:50000], images[50000:]
    if args.train_rows:
        n = args.train_rows
        train, valid = train[:n], valid[: max(1, n // 5)]
    if args.test_rows:
        test = test[: args.test_rows]

    print(f"# pushforward VAE benchmark ({time.strftime('%Y-%m-%d %H:%M')})")
    print()
    print(
        f"- data: dynamically binarized MNIST, {len(train)} training / {len(valid)} validation "
        f"/ {len(test)} test images; torch {torch.__version__}, {args.threads} thread(s)"
    )
    print(
        f"- model: MLP 784 -> {','.join(map(str, args.hidden))} -> h({args.context}) "
        f"(ELU), mirrored decoder, Bernoulli likelihood, latent {args.latent}; posterior "
        f"layers {args.flow_length} where the family has a length; context networks "
        f"{args.flow_hidden} where the recipe takes `hidden` (planar, radial, householder "
        f"and the diagonal-Gaussian base use their fixed (64, 64))"
    )
    budget = "none" if args.budget is None else f"{args.budget:g} s"
    print(
        f"- training: Adam lr {args.lr:g}, batch {args.batch_size}, KL warm-up {args.warmup:g} "
        f"epochs, at most {args.epochs} epochs, time budget {budget} per posterior, early "
        f"stopping after {args.patience} epochs, seed {args.seed}"
    )
    print(f"- test: ELBO and IW NLL from K = {args.iw_samples} samples per image")
    print()
    sys.stdout.flush()

    rows = []
    for name in names:
        torch.manual_seed(args.seed)
        vae = build(name, args)
        params = sum(q.numel() for q in vae.parameters())
        history = fit_vae(
            vae,
            train,
            valid,
            epochs=args.epochs,
            max_time=args.budget,
            warmup=args.warmup,
            lr=args.lr,
            batch_size=args.batch_size,
            patience=args.patience,
            seed=args.seed,
            progress=False,
        )
        start = time.perf_counter()
        result = evaluate_vae(vae, test, iw_samples=args.iw_samples, seed=args.seed + 1)
        row = {
            "posterior": name,
            "params": params,
            "epochs": history.epochs,
            "steps": history.steps,
            "train_seconds": history.seconds,
            "ms_per_step": 1000 * history.seconds / max(1, history.steps),
            "stopped": history.stopped,
            "best_valid_elbo": history.best_valid_log_likelihood,
            "test_elbo": result["elbo"],
            "test_log_likelihood": result["log_likelihood"],
            "elbo_stderr": result["elbo_stderr"],
            "log_likelihood_stderr": result["log_likelihood_stderr"],
            "eval_seconds": time.perf_counter() - start,
        }
        rows.append(row)
        print(
            f"  {name}: -ELBO {-row['test_elbo']:.2f}, NLL {-row['test_log_likelihood']:.2f} "
            f"after {row['steps']} steps ({row['stopped']}, {row['train_seconds']:.0f} s + "
            f"{row['eval_seconds']:.0f} s evaluation)",
            file=sys.stderr,
            flush=True,
        )

    print(
        f"| posterior | params | epochs | steps | ms/step | test -ELBO | test NLL (K = "
        f"{args.iw_samples}) | paper -ELBO / NLL |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        ref = PUBLISHED.get(r["posterior"])
        paper = f"{_PAPER_NAMES[r['posterior']]}: {ref[0]:.2f} / {ref[1]:.2f}" if ref else "-"
        print(
            f"| {r['posterior']} | {r['params']:,} | {r['epochs']} | {r['steps']} | "
            f"{r['ms_per_step']:.0f} | {-r['test_elbo']:.2f} +- {r['elbo_stderr']:.2f} | "
            f"{-r['test_log_likelihood']:.2f} +- {r['log_likelihood_stderr']:.2f} | {paper} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": rows}, f, indent=2, allow_nan=True)
    return 0 if all(math.isfinite(r["test_elbo"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
