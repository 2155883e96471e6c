"""How a MADE's block-triangular grouping pays: one MADE (forward + backward) per row-group size,
against the plain MLP of the same shapes (the floor's layer, ``peers.Floor``).

For each configuration (the conditioners of the speed benchmark's MAF and NSF at d = 6 and 43:
hidden widths, heads), it times ``made(x).sum().backward()`` on a batch of 512 (float32,
``--threads`` threads), for ``block_size`` = 64, 128, 256, dense (one group) and the default
(``None``: about ``BLOCK_WEIGHTS`` weights per group), round-robin with the MLP, and prints the
median time of each and its ratio to the MLP. The default should be at or near the best
column of every row. See ``benchmarks/README.md``.

Run from the repository root::

    python benchmarks/made_blocks.py
    python benchmarks/made_blocks.py --rounds 100 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import peers
import torch
from torch import nn

from pushforward.nn.made import BLOCK_WEIGHTS, MADE

SIZES: tuple[int | None, ...] = (64, 128, 256, 10**9, None)
CONFIGS = (("maf", 6), ("nsf", 6), ("maf", 43), ("nsf", 43))


def step(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        module.zero_grad(set_to_none=True)
        module(x).sum().backward()

    return run


def measure(model: str, d: int, rounds: int, batch: int) -> dict[str, float]:
    """Median seconds of each variant's step, timed round-robin."""
    spec = peers.MODELS[model]
    torch.manual_seed(0)
    x = torch.randn(batch, d)
    fns = {"mlp": step(peers.Floor(spec, d).nets[0], x)}
    for size in SIZES:
        torch.manual_seed(0)
        made = MADE(d, spec.hidden, heads=spec.heads, order="natural", block_size=size)
        fns[label(size)] = step(made, x)
    keys = list(fns)
    for _ in range(10):
        for k in keys:
            fns[k]()
    times: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(rounds):
        for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
            start = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def label(size: int | None) -> str:
    return "default" if size is None else "dense" if size >= 10**9 else str(size)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=200, help="timed rounds (default 200)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--batch", type=int, default=512)
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    torch.set_num_threads(args.threads)
    print(f"MADE forward + backward, batch {args.batch}, {args.threads} threads, median of")
    print(f"{args.rounds} round-robin runs; ms and ratio to the plain MLP of the same shapes")
    print(f"(default: block_size=None, about {BLOCK_WEIGHTS} weights per group)")
    print()
    cols = ["mlp", *(label(s) for s in SIZES)]
    print("| model | d | hidden | heads | " + " | ".join(cols) + " |")
    print("|---|---|---|---|" + "---|" * len(cols))
    for model, d in CONFIGS:
        spec = peers.MODELS[model]
        m = measure(model, d, args.rounds, args.batch)
        cells = [f"{m[c] * 1e3:.2f} ({m[c] / m['mlp']:.2f})" for c in cols]
        hidden = "x".join(map(str, spec.hidden))
        print(f"| {model} | {d} | {hidden} | {spec.heads} | " + " | ".join(cells) + " |")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
