"""VAEs with amortized flow posteriors: the ELBO against quadrature (analytic KL for the Gaussian
posterior, a grid integral for every flow posterior), the importance-weighted bound against the
exact log p(x) of a 2-D latent model, every posterior layer driven by the encoder, save/load,
a CI-sized training run on binarized digits, plots and errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from pushforward import flows
from pushforward.core import Compose, Inverse, Parameters, PushforwardError
from pushforward.nn.made import MADE
from pushforward.vae import (
    POSTERIORS,
    VAE,
    evaluate_vae,
    fit_vae,
    is_vae,
    load_vae,
    plot_latent,
    plot_reconstructions,
    plot_samples,
    save_vae,
    unit_pixels,
)

FLOWS = [p for p in POSTERIORS if p != "gaussian"]
SHAPE = (1, 3, 3)


def tiny(posterior: str, latent: int = 2, **kw) -> VAE:
    """A float64 VAE on 3x3 images with small networks (two flow layers where it applies)."""
    options = {}
    if posterior != "gaussian" and "hidden" in flows.describe(posterior).options:
        options["hidden"] = (8,)
    length = {} if posterior in ("gaussian", "cclinIAF") else {"flow_length": 2}
    vae = VAE(
        SHAPE,
        latent=latent,
        posterior=posterior,
        hidden=(8,),
        context=4,
        flow_options=options,
        **length,
        **kw,
    )
    return vae.double()


def perturb(module: torch.nn.Module, scale: float, seed: int = 0) -> None:
    """Move every parameter by seeded noise: the context networks' output layers start at zero
    weights (the posterior starts independent of x), this makes every layer depend on it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def binary(n: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((n, *SHAPE), 0.5, dtype=torch.float64), generator=g)


def monte_carlo(vae: VAE, x: Tensor, draws: int) -> tuple[Tensor, Tensor]:
    """Mean and standard error of ``draws`` independent single-sample ELBOs per example."""
    e = vae.elbo(x.repeat(draws, 1, 1, 1)).reshape(draws, len(x))
    return e.mean(0), e.std(0) / math.sqrt(draws)


# ---------------------------------------------------------------------------------------------
# the bounds against quadrature


def test_gaussian_elbo_is_expected_log_likelihood_minus_analytic_kl() -> None:
    torch.manual_seed(0)
    vae = tiny("gaussian")
    perturb(vae.posterior, 0.3)
    x = binary(2)
    with torch.no_grad():
        p = vae.posterior.base.params(vae.encode(x))
        mu, log_s = p["loc"], p["log_scale"]
        kl = 0.5 * (torch.exp(2 * log_s) + mu**2 - 1 - 2 * log_s).sum(-1)
        # E_q[log p(x|z)] by tensor-product Gauss-Hermite quadrature (weights of N(0, 1))
        t, w = np.polynomial.hermite_e.hermegauss(60)
        t, w = torch.tensor(t), torch.tensor(w / math.sqrt(2 * math.pi))
        tt = torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)
        ww = (w[:, None] * w[None, :]).reshape(-1)
        z = mu[:, None] + torch.exp(log_s)[:, None] * tt  # (batch, nodes, 2)
        log_px = vae._log_px(x[:, None], vae.decode(z))
        exact = (ww * log_px).sum(-1) - kl
        mc, se = monte_carlo(vae, x, 10000)
        # the Monte Carlo KL term alone matches the analytic KL too
        zs, log_q = vae.posterior.sample_and_log_prob((20000,), context=vae.encode(x))
        kl_mc = (log_q - vae.prior.log_prob(zs)).mean(0)
    assert float((exact - mc).abs().max()) < 4 * float(se.max()) + 1e-3
    torch.testing.assert_close(kl_mc, kl, atol=0.05, rtol=0.0)


@pytest.mark.parametrize("posterior", FLOWS)
def test_flow_elbo_matches_grid_integral(posterior: str) -> None:
    """ELBO = integral of q(z|x) [log p(x, z) - log q(z|x)] on a grid, with q from the flow's
    density direction (inverse), against the estimate from its sampling direction."""
    torch.manual_seed(0)
    vae = tiny(posterior)
    perturb(vae.posterior, 0.1)
    x = binary(2, seed=1)
    with torch.no_grad():
        h = vae.encode(x)
        zs = vae.posterior.sample((2000,), context=h)
        centre, spread = zs.mean(0), zs.std(0).max(-1).values
        n = 161
        g = torch.linspace(-8, 8, n, dtype=torch.float64)
        for b in range(len(x)):
            axes = [centre[b, i] + spread[b] * g for i in range(2)]
            z = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 2)
            area = float(spread[b] * 16 / (n - 1)) ** 2
            log_q = vae.posterior.log_prob(z, context=h[b].expand(len(z), -1))
            log_joint = vae._log_px(x[b], vae.decode(z)) + vae.prior.log_prob(z)
            q = log_q.exp()
            assert float(q.sum()) * area == pytest.approx(1.0, abs=2e-3)
            exact = float((q * (log_joint - log_q)).sum()) * area
            mc, se = monte_carlo(vae, x[b : b + 1], 4000)
            assert abs(exact - float(mc)) < 4.5 * float(se) + 2e-3, (exact, float(mc), float(se))


def test_iw_bound_increases_with_k_towards_exact_log_likelihood() -> None:
    """Measured (two examples, means of 1000 repetitions, standard errors in brackets):
    log p(x) = -6.492 / -6.078 by the grid; L_1 = -7.12 / -6.59 (0.04), L_10 = -6.55 / -6.15
    (0.012), L_100 = -6.499 / -6.084 (0.004); L_10000 = -6.493 / -6.079."""
    torch.manual_seed(0)
    vae = tiny("gaussian")
    perturb(vae.posterior, 0.2)  # a poor q: a gap of about 0.5 nats for the IW bound to close
    x = binary(2, seed=2)
    with torch.no_grad():
        n = 401
        g = torch.linspace(-8, 8, n, dtype=torch.float64)
        z = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
        log_prior = vae.prior.log_prob(z)
        logits = vae.decode(z)
        area = (16 / (n - 1)) ** 2
        log_px = torch.stack(
            [torch.logsumexp(vae._log_px(xb, logits) + log_prior, 0) for xb in x]
        ) + math.log(area)
        reps = 1000
        xr = x.repeat(reps, 1, 1, 1)
        means = {}
        for k in (1, 10, 100):
            torch.manual_seed(k)
            elbo, iw = vae.bounds(xr, k=k, chunk=7)  # chunks smaller than k: several passes
            assert bool((iw >= elbo - 1e-12).all())  # log-mean-exp >= mean, draw by draw
            means[k] = iw.reshape(reps, len(x)).mean(0)
        big = vae.iw_log_likelihood(x.repeat(4, 1, 1, 1), k=10000, chunk=2500)
        big = big.reshape(4, len(x)).mean(0)
        single = vae.elbo(xr).reshape(reps, len(x)).mean(0)
    assert bool((means[1] < means[10] - 0.2).all()), means
    assert bool((means[10] < means[100] - 0.03).all()), means
    assert bool((means[100] < log_px + 0.02).all()), (means, log_px)
    torch.testing.assert_close(big, log_px, atol=0.02, rtol=0.0)
    torch.testing.assert_close(means[1], single, atol=0.2, rtol=0.0)  # L_1 is the ELBO
    assert bool((single < log_px - 0.3).all())


# ---------------------------------------------------------------------------------------------
# amortization: every layer of every posterior is a function of the encoder's context


def _layers(flow) -> list:
    t = flow.transform
    return list(t.transforms) if isinstance(t, Compose) else [t]


@pytest.mark.parametrize("posterior", FLOWS)
def test_every_posterior_layer_is_driven_by_the_encoder(posterior: str) -> None:
    torch.manual_seed(0)
    vae = tiny(posterior, latent=3)
    # structure: the base and every parametric part take the context (no free parameters)
    assert vae.posterior.context_features == vae.context
    parametric = [m for m in vae.posterior.modules() if isinstance(m, (Parameters, MADE))]
    assert parametric
    for m in parametric:
        assert m.context_features == vae.context
    # a fresh model: the ELBO's gradient reaches every parameter, finite
    vae.elbo(binary(4)).sum().backward()
    for name, p in vae.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
    # behaviour: different images give every layer (and the base) a different map
    perturb(vae.posterior, 0.1)
    x1, x2 = binary(5, seed=3), binary(5, seed=4)
    with torch.no_grad():
        h1, h2 = vae.encode(x1), vae.encode(x2)
        z = torch.randn(5, 3, dtype=torch.float64)
        layers = _layers(vae.posterior)
        assert len(layers) == (1 if posterior in ("householder", "cclinIAF") else 2)
        for layer in layers:
            out1, out2 = layer(z, h1)[0], layer(z, h2)[0]
            assert not torch.allclose(out1, out2), type(layer).__name__
        base = vae.posterior.base.params(h1), vae.posterior.base.params(h2)
        assert not torch.allclose(base[0]["loc"], base[1]["loc"])
    if posterior == "iaf":  # IAF: the inverse of a MADE layer that sees the context
        assert all(isinstance(t, Inverse) for t in layers)


@pytest.mark.parametrize("posterior", POSTERIORS)
def test_shared_context_draws_equal_the_flow_path(posterior: str) -> None:
    """Many draws per example compute the context networks once per example; the numbers are
    those of Flow.sample_and_log_prob, which expands the context to every draw."""
    torch.manual_seed(0)
    vae = tiny(posterior, latent=3)
    perturb(vae.posterior, 0.1)
    h = vae.encode(binary(4))
    torch.manual_seed(1)
    z_flow, log_q_flow = vae.posterior.sample_and_log_prob((6,), context=h)
    torch.manual_seed(1)
    z, log_q = vae.sample_posterior(h, 6)
    assert z.shape == (6, 4, 3) and log_q.shape == (6, 4)
    torch.testing.assert_close(z, z_flow, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(log_q, log_q_flow, rtol=1e-12, atol=1e-12)


def test_gaussian_posterior_has_no_layers() -> None:
    vae = tiny("gaussian")
    x = binary(3)
    z, log_q = vae.posterior.sample_and_log_prob((), context=vae.encode(x))
    torch.testing.assert_close(log_q, vae.posterior.base.log_prob(z, vae.encode(x)))
    q = vae.posterior_distribution(x)  # a torch.distributions view of q(z|x)
    assert isinstance(q, torch.distributions.Distribution) and q.batch_shape == (3,)
    torch.testing.assert_close(q.log_prob(z), log_q)


# ---------------------------------------------------------------------------------------------
# save / load


@pytest.mark.parametrize("posterior", ["householder", "iaf"])
def test_save_load_round_trip(tmp_path: Path, posterior: str) -> None:
    torch.manual_seed(0)
    vae = tiny(posterior)
    perturb(vae, 0.05)
    save_vae(tmp_path / "m", vae, {"data": "digits", "seed": 3})
    loaded, config = load_vae(tmp_path / "m")
    assert is_vae(tmp_path / "m") and not is_vae(tmp_path)
    assert config["kind"] == "vae" and config["data"] == "digits"
    assert config["options"]["posterior"] == posterior
    assert loaded.options == vae.options
    assert loaded.sample(1).dtype == torch.float64
    for i in range(4):  # the same bytes every time (safetensors' metadata order is random)
        save_vae(tmp_path / f"again{i}", vae, {"data": "digits", "seed": 3})
        for name in ("model.safetensors", "config.json"):
            assert (tmp_path / f"again{i}" / name).read_bytes() == (
                tmp_path / "m" / name
            ).read_bytes()
    x = binary(4)
    torch.manual_seed(1)
    a = vae.elbo(x)
    torch.manual_seed(1)
    b = loaded.elbo(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_save_load_errors(tmp_path: Path) -> None:
    vae = tiny("planar")
    save_vae(tmp_path / "m", vae)
    with pytest.raises(PushforwardError, match="already holds a model"):
        save_vae(tmp_path / "m", vae)
    save_vae(tmp_path / "m", vae, force=True)
    weights = tmp_path / "m" / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 1
    weights.write_bytes(bytes(blob))
    with pytest.raises(PushforwardError, match="checksum"):
        load_vae(tmp_path / "m")
    with pytest.raises(PushforwardError, match="model directory not found"):
        load_vae(tmp_path / "nothing")
    with pytest.raises(PushforwardError, match="may not replace"):
        save_vae(tmp_path / "n", vae, {"kind": "flow"})
    from pushforward import io

    io.save_model(tmp_path / "f", flows.build("affine", 2), {"flow": "affine", "features": 2})
    assert not is_vae(tmp_path / "f")
    with pytest.raises(PushforwardError, match="not a VAE"):
        load_vae(tmp_path / "f")


# ---------------------------------------------------------------------------------------------
# training on binarized digits (CI-sized)


@pytest.fixture(scope="module")
def digits() -> tuple[Tensor, Tensor, np.ndarray]:
    pytest.importorskip("sklearn")
    from pushforward.data.images import load_digits

    x, y = load_digits("train", labels=True)
    return unit_pixels(x, levels=17), unit_pixels(load_digits("test"), levels=17), y


def _digits_vae(posterior: str) -> VAE:
    torch.manual_seed(0)
    options = {"hidden": (32,)} if "hidden" in flows.describe(posterior).options else {}
    return VAE(
        (1, 8, 8),
        latent=2,
        posterior=posterior,
        flow_length=4,
        hidden=(64,),
        context=32,
        flow_options=options,
    )


def test_fit_on_binarized_digits(digits) -> None:
    """Measured (seed 0; 12 epochs of 13 steps, warm-up 4 epochs, lr 3e-3; test ELBO / IW with
    K = 200, nats per image): gaussian -26.73 / -26.64, planar -26.68 / -26.61, iaf -26.67 /
    -26.62; about -44.5 at initialisation. The bound of 28 leaves a margin of about 1.3 nats."""
    train, test, _ = digits
    results = {}
    for posterior in ("gaussian", "planar", "iaf"):
        if posterior == "gaussian":
            torch.manual_seed(0)
            vae = VAE((1, 8, 8), latent=2, hidden=(64,), context=32)
        else:
            vae = _digits_vae(posterior)
        history = fit_vae(
            vae, train, epochs=12, warmup=4, lr=3e-3, batch_size=100, seed=0, progress=False
        )
        assert history.epochs == 12 and history.best_epoch >= 8
        assert history.train_loss[-1] < history.train_loss[0] - 10
        results[posterior] = evaluate_vae(vae, test, iw_samples=200, chunk=200, seed=0)
    for posterior, r in results.items():
        assert r["log_likelihood"] >= r["elbo"]
        assert -r["elbo"] < 28.0, (posterior, r)
        assert -r["log_likelihood"] < 28.0, (posterior, r)
    for posterior in ("planar", "iaf"):
        assert results[posterior]["elbo"] > results["gaussian"]["elbo"] - 0.75


def test_fit_is_reproducible_and_leaves_the_rng_alone(digits) -> None:
    train = digits[0][:300]
    runs = []
    for _ in range(2):
        vae = _digits_vae("householder")
        state = torch.get_rng_state()
        history = fit_vae(vae, train, epochs=2, warmup=1, seed=5, progress=False)
        assert torch.equal(state, torch.get_rng_state())
        runs.append((history.train_loss, history.valid_log_likelihood, vae.state_dict()))
    assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1]
    for k, v in runs[0][2].items():
        assert torch.equal(v, runs[1][2][k]), k


def test_warmup_schedule_and_early_stopping(digits) -> None:
    from pushforward.vae import _beta

    assert [_beta(t, 4) for t in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert _beta(0, 0) == 1.0
    vae = _digits_vae("planar")
    history = fit_vae(
        vae, digits[0][:200], epochs=60, warmup=0, lr=0.05, patience=2, seed=0, progress=False
    )
    assert history.stopped == "early-stopping"
    assert history.epochs == history.best_epoch + 2


# ---------------------------------------------------------------------------------------------
# architectures, plots, errors


def test_conv_networks() -> None:
    vae = VAE((1, 8, 8), latent=3, posterior="sylvester-triangular", hidden=(4, 8), context=16)
    assert vae.network == "mlp"
    conv = VAE((1, 8, 8), latent=3, hidden=(4, 8), context=16, network="conv")
    x = torch.bernoulli(torch.full((5, 1, 8, 8), 0.3))
    assert conv.elbo(x).shape == (5,) and conv.reconstruct(x).shape == (5, 1, 8, 8)
    assert any(isinstance(m, torch.nn.Conv2d) for m in conv.modules())
    assert vae.sample(2, mean=True).shape == (2, 1, 8, 8)
    with pytest.raises(PushforwardError, match="divisible by 16"):
        VAE((1, 8, 8), hidden=(4, 4, 4, 4), network="conv")


def test_plots(tmp_path: Path, digits) -> None:
    train, _, labels = digits
    vae = _digits_vae("radial")
    png = b"\x89PNG\r\n\x1a\n"
    paths = [
        plot_reconstructions(vae, train[:20], tmp_path / "a" / "rec.png", n=8),
        plot_samples(vae, tmp_path / "samples.png", n=16),
        plot_latent(vae, train[:300], labels[:300], tmp_path / "latent.png"),
    ]
    for path in paths:
        assert path.read_bytes()[:8] == png and path.stat().st_size > 1000
    with pytest.raises(PushforwardError, match="2-D latent"):
        plot_latent(VAE((1, 8, 8), latent=3, hidden=(8,), context=4), train[:5], labels[:5], "x")
    # matplotlib is imported lazily, inside the drawing functions only
    import ast

    import pushforward.vae as module

    tree = ast.parse(Path(module.__file__).read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in top for a in n.names]
    names += [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if "matplotlib" in n or n.endswith("plots")]


def test_errors() -> None:
    with pytest.raises(PushforwardError, match="unknown flow 'nope'"):
        VAE(4, posterior="nope")
    with pytest.raises(PushforwardError, match="image flow"):
        VAE(4, posterior="glow")
    with pytest.raises(PushforwardError, match="has no flow length"):
        VAE(4, posterior="cclinIAF", flow_length=3)
    with pytest.raises(PushforwardError, match="has no flow"):
        VAE(4, flow_length=3)
    with pytest.raises(PushforwardError, match="has no option 'bins'"):
        VAE(4, posterior="planar", flow_options={"bins": 3})
    with pytest.raises(PushforwardError, match="latent must be a positive integer"):
        VAE(4, latent=0)
    vae = VAE(4, latent=2, hidden=(8,), context=4)
    with pytest.raises(PushforwardError, match=r"expected shape \(batch, 4\), got \(3, 5\)"):
        vae.elbo(torch.zeros(3, 5))
    with pytest.raises(PushforwardError, match="must be binary"):
        vae.elbo(torch.full((3, 4), 0.5))
    with pytest.raises(PushforwardError, match=r"intensities in \[0, 1\]"):
        fit_vae(vae, torch.full((10, 4), 2.0), progress=False)
    with pytest.raises(PushforwardError, match="outside 0..16"):
        unit_pixels(np.array([[0, 17]]), levels=17)


def test_a_loss_spike_is_skipped_and_training_goes_on(digits, monkeypatch) -> None:
    """One minibatch whose ELBO is made non-finite is not stepped on and is counted; the run
    goes on to the end with finite weights, one step short of the run without it."""
    train = digits[0][:300]
    runs = []
    for spike_at in (5, None):
        vae = _digits_vae("planar")
        calls = {"n": 0}
        elbo = vae.elbo

        def spiking(x, beta=1.0, _elbo=elbo, _calls=calls, _at=spike_at, _vae=vae):
            _calls["n"] += 1
            out = _elbo(x, beta)
            return out * math.inf if _vae.training and _calls["n"] == _at else out

        monkeypatch.setattr(vae, "elbo", spiking)
        runs.append((fit_vae(vae, train, epochs=3, warmup=1, seed=0, progress=False), vae))
    (spiked, model), (plain, _) = runs
    assert (spiked.skipped, plain.skipped) == (1, 0)
    assert spiked.steps == plain.steps - 1 and spiked.stopped == plain.stopped == "max-epochs"
    assert all(math.isfinite(v) for v in spiked.train_loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())
