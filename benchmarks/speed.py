"""Speed of the same MAF and NSF in pushforward, zuko and nflows, against a plain-MLP floor.

For each dimension ``d`` and model, on the same random standard-normal data for every library
(float32, ``--threads`` CPU threads, 2 by default), it measures

* the training step (batch 512): zero grad, ``-log_prob(x).mean()``, backward, Adam step;
* ``log_prob`` of 10,000 rows, without gradient;
* ``sample`` of 10,000 rows, without gradient, in a fresh subprocess per measurement, whose
  peak resident set size during sampling is reported too;

each from several timed runs after warm-up runs (training steps and log_prob calls timed
round-robin across the libraries), and the ratio of the first two to the floor: unmasked
``nn.Sequential`` MLPs with the conditioners' matmul shapes doing the same forward (and
backward and Adam step) with nothing else. It prints one markdown table with the medians of
the timed runs and one with their minimums, each followed by the issue's targets checked on
it. See ``benchmarks/README.md``.

Run from the repository root::

    python benchmarks/speed.py                 # d = 6 and 43, MAF and NSF, all libraries
    python benchmarks/speed.py --quick         # fewer repeats (sampling peers still slow)
    python benchmarks/speed.py --dims 43 --models maf --libs pushforward,zuko
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import peers
import torch

from pushforward import native

HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------------------------
# timing


def timed(fn: Callable[[], object], warmup: int, repeats: int, budget: float) -> list[float]:
    """Wall-clock seconds of up to ``repeats`` runs of ``fn()`` after ``warmup`` runs; stops
    early (after at least one timed run) once the timed runs have taken ``budget`` s."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    while len(times) < repeats:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if sum(times) > budget:
            break
    return times


@dataclass
class Settings:
    threads: int = 2
    train_batch: int = 512
    eval_batch: int = 10_000
    samples: int = 10_000
    train_warmup: int = 10
    train_repeats: int = 40
    eval_warmup: int = 1
    eval_repeats: int = 7
    sample_repeats: int = 3
    budget: float = 20.0  # seconds of timed runs per measurement, at most (after one run)
    seed: int = 0


def interleaved(
    fns: dict[str, Callable[[], object]], warmup: int, repeats: int, budget: float
) -> dict[str, list[float]]:
    """Seconds of the timed runs of each ``fns[key]()``, timed round-robin: every round runs each
    function once, in an order rotated from round to round, so that a change of load on a
    shared machine falls on all of them alike. ``warmup`` untimed rounds first; a function
    stops being timed (after at least one run) once its timed runs have taken ``budget`` s."""
    keys = list(fns)
    for _ in range(warmup):
        for k in keys:
            fns[k]()
    times: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(repeats):
        for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
            if times[k] and sum(times[k]) > budget:
                continue
            start = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - start)
    return times


def train_step(built: peers.Built, x: torch.Tensor) -> tuple[Callable[[], None], list]:
    """One Adam step on ``-log_prob(x).mean()`` (zero grad, forward, backward, update), and the
    list its losses go to (to check they stayed finite: a diverging model could time
    differently). The same optimizer for every library: ``Adam(foreach=True)``."""
    opt = torch.optim.Adam(built.module.parameters(), lr=1e-4, foreach=True)
    losses: list[torch.Tensor] = []

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = -built.log_prob(x).mean()
        loss.backward()
        opt.step()
        losses.append(loss.detach())

    return step, losses


def log_prob_call(built: peers.Built, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            built.log_prob(x)

    return run


# ---------------------------------------------------------------------------------------------
# sampling, in a subprocess (for an honest peak RSS)


def _status_kb(key: str) -> int | None:
    """A ``kB`` field of /proc/self/status (Linux), e.g. ``VmRSS`` or ``VmHWM``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0: ``clear_refs`` = 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def sample_child(job: dict) -> dict:
    """Build the model, warm up, then time ``sample(n)``; return the seconds of each run, the RSS
    before sampling and the peak RSS while sampling (MB)."""
    torch.set_num_threads(job["threads"])
    torch.manual_seed(job["seed"])
    built = peers.build(job["lib"], job["model"], job["d"])
    n = job["n"]

    def run() -> None:
        with torch.no_grad():
            built.sample(n)

    with torch.no_grad():  # warm-up on a small batch: code paths, thread pool, allocator
        built.sample(min(n, 500))
    gc.collect()
    reset = _reset_peak_rss()
    before = _status_kb("VmRSS")
    times = timed(run, 0, job["repeats"], job["budget"])
    peak = _status_kb("VmHWM") if reset else None
    if peak is None:  # no reset: the whole process's peak (build included)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
    return {
        "times": times,
        "rss_before_mb": None if before is None else before / 1024,
        "peak_rss_mb": peak / 1024,
        "peak_reset": reset,
    }


def sample_in_subprocess(lib: str, model: str, d: int, s: Settings) -> dict:
    job = {
        "lib": lib,
        "model": model,
        "d": d,
        "n": s.samples,
        "threads": s.threads,
        "seed": s.seed,
        "repeats": s.sample_repeats,
        "budget": s.budget,
    }
    cmd = [sys.executable, os.path.join(HERE, "speed.py"), "--child-sample", json.dumps(job)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": tail}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# the table


@dataclass
class Row:
    model: str
    d: int
    lib: str
    params: int | None = None
    times: dict[str, list[float]] = field(default_factory=dict)  # "train", "log_prob", "sample"
    train: float | None = None  # seconds (one statistic of the times; see with_stat)
    log_prob: float | None = None
    sample: float | None = None
    rss_before: float | None = None  # MB
    peak_rss: float | None = None
    note: list[str] = field(default_factory=list)


def with_stat(rows: list[Row], stat: Callable[[list[float]], float]) -> list[Row]:
    """Copies of the rows whose ``train``, ``log_prob`` and ``sample`` are ``stat`` of their
    timed runs."""
    out = []
    for r in rows:
        values = {k: stat(v) for k, v in r.times.items() if v}
        out.append(dataclasses.replace(r, **values))
    return out


def _ms(v: float | None) -> str:
    if v is None:
        return "n/a"
    return f"{v * 1e3:,.0f}" if v >= 0.1 else f"{v * 1e3:.2f}" if v < 0.01 else f"{v * 1e3:.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None else f"{a / b:.2f}"


def table(rows: list[Row], s: Settings) -> str:
    floors = {(r.model, r.d): r for r in rows if r.lib == peers.FLOOR}
    head = [
        "model",
        "d",
        "lib",
        "params",
        f"train step ms (b={s.train_batch})",
        "train / floor",
        f"log_prob ms ({s.eval_batch:,})",
        "log_prob / floor",
        f"sample ms ({s.samples:,})",
        "sample / log_prob",
        "peak RSS MB (sampling)",
        "notes",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        f = floors.get((r.model, r.d))
        is_floor = f is r
        rss = "n/a" if r.peak_rss is None else f"{r.peak_rss:,.0f}"
        if r.peak_rss is not None and r.rss_before is not None:
            rss += f" (+{r.peak_rss - r.rss_before:,.0f})"
        cells = [
            r.model,
            str(r.d),
            r.lib,
            "n/a" if r.params is None else f"{r.params:,}",
            _ms(r.train),
            "1.00" if is_floor and r.train else _ratio(r.train, f.train if f else None),
            _ms(r.log_prob),
            "1.00" if is_floor and r.log_prob else _ratio(r.log_prob, f.log_prob if f else None),
            "-" if is_floor else _ms(r.sample),
            "-" if is_floor else _ratio(r.sample, r.log_prob),
            "-" if is_floor else rss,
            "; ".join(r.note),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(rows: list[Row]) -> list[str]:
    """The issue's targets, checked on this run's numbers (where the rows are present)."""
    by = {(r.model, r.d, r.lib): r for r in rows}
    floor_lib = peers.FLOOR
    out: list[str] = []

    def check(label: str, ok: bool | None, detail: str) -> None:
        mark = "n/a " if ok is None else "PASS" if ok else "FAIL"
        out.append(f"- {mark} {label}: {detail}")

    def get(model: str, d: int, lib: str, attr: str) -> float | None:
        r = by.get((model, d, lib))
        return None if r is None else getattr(r, attr)

    dims = sorted({r.d for r in rows})
    for d in dims:
        for attr, name in (("train", "training step"), ("log_prob", "log_prob")):
            pf = get("maf", d, "pushforward", attr)
            others = {lib: get("maf", d, lib, attr) for lib in ("zuko", "nflows")}
            others = {k: v for k, v in others.items() if v is not None}
            if pf is None or not others:
                continue
            detail = f"pushforward {_ms(pf)} ms; " + ", ".join(
                f"{k} {_ms(v)} ms" for k, v in others.items()
            )
            check(f"MAF d={d} {name} no slower than peers", pf <= min(others.values()), detail)
    for attr, name in (("train", "training step"), ("log_prob", "log_prob")):
        pf, fl = get("maf", 43, "pushforward", attr), get("maf", 43, floor_lib, attr)
        if pf is not None and fl is not None:
            check(
                f"MAF d=43 {name} within 1.1x of the floor",
                pf / fl <= 1.1,
                f"{pf / fl:.2f}x ({_ms(pf)} ms vs {_ms(fl)} ms)",
            )
    pf_s, pf_lp = get("maf", 43, "pushforward", "sample"), get("maf", 43, "pushforward", "log_prob")
    if pf_s is not None:
        for lib in ("zuko", "nflows"):
            other = get("maf", 43, lib, "sample")
            if other is not None:
                check(
                    f"MAF d=43 sampling >= 10x faster than {lib}",
                    other / pf_s >= 10,
                    f"{other / pf_s:.1f}x ({_ms(pf_s)} ms vs {_ms(other)} ms)",
                )
        if pf_lp is not None:
            check(
                "MAF d=43 sampling within 3x of its own log_prob",
                pf_s / pf_lp <= 3,
                f"{pf_s / pf_lp:.2f}x",
            )
        peak = get("maf", 43, "pushforward", "peak_rss")
        if peak is not None:
            check(
                "MAF d=43 peak RSS while sampling under 0.6 GB",
                peak < 600,
                f"{peak:,.0f} MB (whole process, torch included)",
            )
    for d in dims:
        pf, fl = get("nsf", d, "pushforward", "train"), get("nsf", d, floor_lib, "train")
        if pf is not None and fl is not None:
            peer = [get("nsf", d, lib, "train") for lib in ("zuko", "nflows")]
            peer_txt = ", ".join(f"{v / fl:.2f}x" for v in peer if v is not None)
            check(
                f"NSF d={d} training step within 1.5x of the floor",
                pf / fl <= 1.5,
                f"{pf / fl:.2f}x (peers: {peer_txt or 'n/a'})",
            )
    return out


# ---------------------------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def load_average() -> str:
    try:
        return ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def measure(model: str, d: int, libs: list[str], s: Settings, xb, xe, sample: bool) -> list[Row]:
    """The rows of ``model`` at dimension ``d``: the floor and each library, training steps
    and log_prob timed interleaved across them, then sampling one subprocess at a time."""
    rows: dict[str, Row] = {}
    built: dict[str, peers.Built] = {}
    for lib in ["floor", *libs]:
        rows[lib] = row = Row(model, d, lib)
        torch.manual_seed(s.seed)
        try:
            built[lib] = peers.floor(model, d) if lib == "floor" else peers.build(lib, model, d)
        except peers.Unavailable as err:
            row.note.append(str(err))
            continue
        row.lib, row.params = built[lib].lib, built[lib].parameters
    steps = {lib: train_step(b, xb) for lib, b in built.items()}
    fns = {lib: fn for lib, (fn, _) in steps.items()}
    for lib, times in interleaved(fns, s.train_warmup, s.train_repeats, s.budget).items():
        rows[lib].times["train"] = times
        if not bool(torch.isfinite(torch.stack(steps[lib][1])).all()):
            rows[lib].note.append("non-finite loss while timing")
    fns = {lib: log_prob_call(b, xe) for lib, b in built.items()}
    for lib, times in interleaved(fns, s.eval_warmup, s.eval_repeats, s.budget).items():
        rows[lib].times["log_prob"] = times
    del built, steps, fns
    gc.collect()
    for lib in libs:
        row = rows[lib]
        if not sample or row.params is None:
            continue
        res = sample_in_subprocess(lib, model, d, s)
        if "error" in res:
            row.note.append("sampling failed: " + res["error"])
            continue
        row.times["sample"] = res["times"]
        row.rss_before, row.peak_rss = res["rss_before_mb"], res["peak_rss_mb"]
        if not res["peak_reset"]:
            row.note.append("RSS: lifetime peak")
    return list(rows.values())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dims", default="6,43", help="comma-separated dimensions (default 6,43)")
    p.add_argument("--models", default="maf,nsf", help="comma-separated, from: maf, nsf, ...")
    p.add_argument("--libs", default=",".join(peers.LIBS), help="comma-separated libraries")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--quick", action="store_true", help="fewer warm-up and timed runs")
    p.add_argument(
        "--train-repeats", type=int, help="timed training steps per library (default 40)"
    )
    p.add_argument("--no-sample", action="store_true", help="skip the sampling measurements")
    p.add_argument("--samples", type=int, default=10_000, help="rows per sample() call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child-sample", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child_sample:
        print(json.dumps(sample_child(json.loads(args.child_sample))))
        return 0

    s = Settings(threads=args.threads, samples=args.samples, seed=args.seed)
    if args.quick:
        s.train_warmup, s.train_repeats = 1, 3
        s.eval_warmup, s.eval_repeats = 1, 2
        s.sample_repeats, s.budget = 1, 5.0
    if args.train_repeats is not None:
        if args.train_repeats < 1:
            p.error(f"--train-repeats must be at least 1, got {args.train_repeats}")
        s.train_repeats = args.train_repeats
    torch.set_num_threads(s.threads)
    dims = [int(v) for v in args.dims.split(",")]
    models = args.models.split(",")
    libs = args.libs.split(",")
    for m in models:
        if m not in peers.MODELS:
            p.error(f"unknown model {m!r}; choose from {', '.join(peers.MODELS)}")

    v = peers.versions()
    print(f"# pushforward speed benchmark ({time.strftime('%Y-%m-%d %H:%M')})")
    print()
    print(f"- versions: {', '.join(f'{k} {val}' for k, val in v.items())}")
    print(f"- CPU: {cpu_name()} ({os.cpu_count()} logical cores), torch threads: {s.threads}")
    print("- float32; data: standard normal, the same tensors for every library")
    kernels = ", ".join(f"{k} {v}" for k, v in native.status().items())
    print(f"- pushforward's compiled kernels: {kernels}")
    print(
        f"- up to {s.train_repeats} (train) / {s.eval_repeats} (log_prob) / "
        f"{s.sample_repeats} (sample) timed runs after {s.train_warmup} / {s.eval_warmup} / "
        "1 (500 rows) warm-up runs"
    )
    print(f"- load average before: {load_average()}")
    sys.stdout.flush()

    rows: list[Row] = []
    t0 = time.perf_counter()
    for d in dims:
        g = torch.Generator().manual_seed(s.seed)
        xb = torch.randn(s.train_batch, d, generator=g)
        xe = torch.randn(s.eval_batch, d, generator=g)
        for model in models:
            for row in measure(model, d, libs, s, xb, xe, not args.no_sample):
                rows.append(row)
                t = {k: " ".join(_ms(x) for x in v) for k, v in row.times.items()}
                print(
                    f"  {model} d={d} {row.lib}: ms of each timed run: {t}",
                    file=sys.stderr,
                    flush=True,
                )
    print(f"- load average after: {load_average()} (run took {time.perf_counter() - t0:.0f} s)")
    for title, stat in (
        ("Medians of the timed runs", statistics.median),
        ("Minimums of the timed runs (less sensitive to other processes' load)", min),
    ):
        summary = with_stat(rows, stat)
        print()
        print(f"## {title}")
        print()
        print(table(summary, s))
        print()
        print("Targets (issue 3), on these numbers:")
        print()
        print("\n".join(targets(summary)) or "- none applicable to the rows measured")
    return 0


if __name__ == "__main__":
    sys.exit(main())
