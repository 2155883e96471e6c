"""The compiled CPU spline kernel against the pure-PyTorch reference path (values and
gradients, every layout, both dtypes and directions, the per-row shift), and the kernel
loader: cache, fallbacks, status."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from pushforward import flows, native
from pushforward.transforms import splines
from pushforward.transforms.splines import RQSplineTransformer, rational_quadratic_spline

needs_kernel = pytest.mark.skipif(
    native.library("rqspline") is None,
    reason=f"compiled spline kernel: {native.status().get('rqspline')}",
)


def run_both(fn, monkeypatch):
    """``fn()`` on the compiled path, then on the reference path (checked: the compiled run
    calls the kernel, the reference run does not)."""
    calls = []
    compiled_forward = splines._Spline.compiled_forward

    def counted(*args):
        calls.append(1)
        return compiled_forward(*args)

    monkeypatch.setattr(splines._Spline, "compiled_forward", staticmethod(counted))
    out = []
    for flag in ("1", "0"):
        monkeypatch.setenv("PUSHFORWARD_NATIVE", flag)
        before = len(calls)
        out.append(fn())
        assert (len(calls) > before) == (flag == "1")
    return out


LAYOUTS = {
    # (rows, features, P) as a network gives them
    "native": lambda p: p.clone(),
    # (features, P, rows) in memory: a MADE's transposed output
    "feature-major": lambda p: p.permute(1, 2, 0).contiguous().permute(2, 0, 1),
    "strided": lambda p: p.transpose(0, 1).contiguous().transpose(0, 1),
    # one parameter row for the whole batch
    "broadcast": lambda p: p[:1].expand_as(p),
}


@needs_kernel
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize(
    "dtype,bins,scale", [(torch.float64, 8, 2.0), (torch.float64, 1, 1.0), (torch.float32, 3, 3.0)]
)
def test_compiled_matches_reference(layout, inverse, dtype, bins, scale, monkeypatch):
    g = torch.Generator().manual_seed(7)
    tr = RQSplineTransformer(bins=bins).to(dtype)
    rows, features = 37, 5
    z = (torch.randn(rows, features, generator=g, dtype=dtype) * 3).requires_grad_()
    with torch.no_grad():
        z[0, 0], z[1, 1], z[2, 2] = 7.0, -5.0, 5.0  # tails and the interval's ends
    base = torch.randn(rows, features, tr.params_per_feature, generator=g, dtype=dtype) * scale

    def run():
        p = LAYOUTS[layout](base).detach().requires_grad_()
        out, lad = (tr.inverse if inverse else tr)(z, p)
        gz, gp = torch.autograd.grad((out * out).sum() + (lad * z).sum(), (z, p))
        return out, lad, gz, gp

    compiled, reference = run_both(run, monkeypatch)
    tol = {"atol": 1e-11, "rtol": 1e-11} if dtype == torch.float64 else {"atol": 1e-4, "rtol": 1e-3}
    for a, b in zip(compiled, reference):
        torch.testing.assert_close(a, b, **tol)
    assert compiled[3].stride() == reference[3].stride()


@needs_kernel
@pytest.mark.parametrize("inverse", [False, True])
def test_compiled_per_row_shift_and_partial_gradients(inverse, monkeypatch):
    """Logits spanning more than the exponent range take the per-row shift on both paths; a
    gradient of y alone, of the log-derivative alone, or for x alone agrees too."""
    g = torch.Generator().manual_seed(3)
    x = torch.linspace(-6, 6, 61, dtype=torch.float64)
    w, h = (torch.randn(61, 6, generator=g, dtype=torch.float64) for _ in range(2))
    d = torch.randn(61, 5, generator=g, dtype=torch.float64)
    w = w + 2000.0 * (torch.arange(61) % 2).unsqueeze(1)

    def run():
        ww, hh, dd = (t.clone().requires_grad_() for t in (w, h, d))
        xx = x.clone().requires_grad_()
        y, lad = rational_quadratic_spline(xx, ww, hh, dd, inverse=inverse)
        g_y = torch.autograd.grad(y.sum(), (xx, ww, hh, dd), retain_graph=True)
        g_lad = torch.autograd.grad(lad.sum(), (xx, ww, hh, dd), retain_graph=True)
        (g_x,) = torch.autograd.grad(y.sum() + lad.sum(), xx)
        return (y, lad, *g_y, *g_lad, g_x)

    compiled, reference = run_both(run, monkeypatch)
    assert all(torch.isfinite(t).all() for t in compiled)
    for a, b in zip(compiled, reference):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("flag", ["1", "0"])
def test_mixed_dtypes_are_computed_in_the_promoted_one(flag, monkeypatch):
    """float32 inputs with float64 parameters (or the reverse): the same as both in float64,
    gradients included, on either path."""
    monkeypatch.setenv("PUSHFORWARD_NATIVE", flag)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, generator=g) * 3
    w, h = torch.randn(2, 9, 5, generator=g, dtype=torch.float64)
    d = torch.randn(9, 4, generator=g, dtype=torch.float64)
    for inputs, params in (((x,), (w, h, d)), ((x.double(),), (w.float(), h.float(), d.float()))):
        xx = inputs[0].clone().requires_grad_()
        y, lad = rational_quadratic_spline(xx, *params)
        (gx,) = torch.autograd.grad(y.sum() + lad.sum(), xx)
        promoted = [t.double() for t in (*inputs, *params)]
        x64 = promoted[0].requires_grad_()
        y64, lad64 = rational_quadratic_spline(x64, *promoted[1:])
        (gx64,) = torch.autograd.grad(y64.sum() + lad64.sum(), x64)
        assert y.dtype == lad.dtype == torch.float64 and gx.dtype == inputs[0].dtype
        torch.testing.assert_close(y, y64, atol=1e-12, rtol=0)
        torch.testing.assert_close(lad, lad64, atol=1e-12, rtol=0)
        torch.testing.assert_close(gx, gx64.to(gx.dtype), atol=1e-6, rtol=1e-6)


@needs_kernel
def test_nsf_flow_compiled_matches_reference(monkeypatch):
    """A whole NSF (MADE-driven, feature-major parameters) and a coupling spline flow: the same
    log-density and parameter gradients on both paths, in float64."""
    x = torch.randn(64, 4, dtype=torch.float64) * 2
    for name in ("nsf", "nsf-coupling"):
        torch.manual_seed(0)
        flow = flows.build(name, 4).double()

        def run(flow=flow):
            flow.zero_grad()
            lp = flow.log_prob(x)
            lp.sum().backward()
            return (lp, *(p.grad.clone() for p in flow.parameters() if p.grad is not None))

        compiled, reference = run_both(run, monkeypatch)
        assert len(compiled) == len(reference) > 1
        for a, b in zip(compiled, reference):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def fresh_loader(monkeypatch, tmp_path):
    """The loader with an empty in-process cache and its build cache in ``tmp_path``."""
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "_why", {})
    monkeypatch.setenv("PUSHFORWARD_CACHE", str(tmp_path))
    monkeypatch.setenv("PUSHFORWARD_NATIVE", "1")


def spline_works():
    x = torch.randn(20, dtype=torch.float64)
    w, h = torch.randn(2, 20, 4, dtype=torch.float64)
    d = torch.randn(20, 3, dtype=torch.float64)
    y, lad = rational_quadratic_spline(x, w, h, d)
    back, _ = rational_quadratic_spline(y, w, h, d, inverse=True)
    torch.testing.assert_close(back, x)


def test_without_a_compiler_the_reference_path_runs(monkeypatch, tmp_path):
    fresh_loader(monkeypatch, tmp_path)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert native.library("rqspline") is None
    assert "no-such-compiler' is not an executable" in native.status()["rqspline"]
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.delenv("CXX")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert native.library("rqspline") is None
    assert "no C++ compiler found" in native.status()["rqspline"]
    spline_works()


def test_a_failing_build_falls_back_and_says_why(monkeypatch, tmp_path):
    fresh_loader(monkeypatch, tmp_path)
    fake = tmp_path / "broken-c++"
    fake.write_text("#!/bin/sh\necho 'fake compiler: cannot build' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    assert native.library("rqspline") is None
    assert "cannot build" in native.status()["rqspline"]
    assert not list(tmp_path.glob("*.so"))  # nothing half-written left in the cache
    spline_works()


def test_disabled_by_the_environment(monkeypatch, tmp_path):
    fresh_loader(monkeypatch, tmp_path)
    monkeypatch.setenv("PUSHFORWARD_NATIVE", "0")
    assert native.library("rqspline") is None
    assert native.status() == {"rqspline": "disabled by PUSHFORWARD_NATIVE"}
    assert not list(tmp_path.iterdir())
    spline_works()


@needs_kernel
def test_built_once_then_loaded_from_the_cache(monkeypatch, tmp_path):
    fresh_loader(monkeypatch, tmp_path)
    assert native.library("rqspline") is not None
    (built,) = tmp_path.glob("rqspline-*.so")
    inode, long_ago = built.stat().st_ino, time.time() - 7 * 24 * 3600
    os.utime(built, (long_ago, long_ago))
    # a new process finds it in the cache and does not compile again
    code = (
        "import subprocess, pushforward.native as n\n"
        "real = subprocess.run\n"
        "def run(args, **kw):\n"
        "    assert '-shared' not in args, 'compiled again'\n"
        "    return real(args, **kw)\n"
        "subprocess.run = run\n"
        "assert n.library('rqspline') is not None, n.status()\n"
    )
    env = {**os.environ, "PUSHFORWARD_CACHE": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    assert built.stat().st_ino == inode  # the same file, not a new build renamed into place
    assert built.stat().st_mtime > long_ago + 3600  # marked as in use
    assert native.status() == {"rqspline": "in use"}


@needs_kernel
def test_a_new_build_deletes_the_builds_unused_for_30_days(monkeypatch, tmp_path):
    fresh_loader(monkeypatch, tmp_path)
    stale, recent = tmp_path / "rqspline-0000.so", tmp_path / "rqspline-1111.so"
    other = tmp_path / "otherkernel-2222.so"  # another kernel's build: not this one's to prune
    for f in (stale, recent, other):
        f.write_bytes(b"an earlier build")
    month_ago = time.time() - 31 * 24 * 3600
    for f in (stale, other):
        os.utime(f, (month_ago, month_ago))
    assert native.library("rqspline") is not None
    assert not stale.exists() and recent.exists() and other.exists()
    assert len(list(tmp_path.glob("rqspline-*.so"))) == 2  # the new build and the recent one


@needs_kernel
def test_a_damaged_cached_library_is_built_again(monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    fresh_loader(monkeypatch, cache)
    assert native.library("rqspline") is not None
    assert (cache.stat().st_mode & 0o777) == 0o700  # made private to the user
    (built,) = cache.glob("rqspline-*.so")
    # damaged by replacing the file: writing into it would truncate the copy this process
    # has mapped, and the next touch of its pages (at exit, at the latest) is a bus error
    damaged = cache / "damaged"
    damaged.write_bytes(b"not a shared library")
    os.replace(damaged, built)
    # a new process (this one has the library loaded already, which dlopen would reuse)
    code = "import pushforward.native as n; assert n.library('rqspline') is not None, n.status()"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})
    assert built.read_bytes() != b"not a shared library"
