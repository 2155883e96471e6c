"""The shared checker: everything a transform must satisfy, proved in float64.

A new transform gets every check from one line: add a :class:`Case` to the list in
``tests/test_contract.py``. :func:`check_transform` proves, for the transform *and* its
``Inverse``:

(a) round trip ``inverse(forward(z)) == z`` and forward + inverse ladj == 0;
(b) each direction's ladj against ``slogdet`` of the full Jacobian computed by autograd;
(c) a batch of one equals the corresponding row of a batch, and leading batch shapes work;
(d) for 1-D and 2-D events, the pushed-forward density integrates to 1 (within 1e-3);
(e) second derivatives (a Hessian, a gradient penalty) are exact: autograd's
    Hessian-vector product, and its mixed derivative of the input gradient with respect to
    the parameters, converge to finite differences of the gradient;
plus: gradients reach every parameter, a state_dict round trip through safetensors gives
identical outputs, and (conditional transforms) the context changes the output and a missing
context is a clear error.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from pushforward.core import Inverse, PushforwardError, Transform
from pushforward.distributions import Base, StandardNormal


@dataclass
class Case:
    """How to build and feed one transform for the checker."""

    name: str
    make: Callable[[], Transform]
    event_shape: tuple[int, ...] = (2,)
    context_features: int = 0
    #: draws base-space inputs of shape (*batch, *event); default standard normal
    sample: Callable[[tuple[int, ...]], Tensor] | None = None
    #: base density for the integration check; default standard normal
    base: Callable[[], Base] | None = None
    #: integration box in data space (lo, hi) per coordinate; default from samples
    box: tuple[float, float] | None = None
    perturb: float = 0.3
    atol: float = 1e-8
    ladj_atol: float = 1e-6
    multi_batch: bool = True
    integrate: bool = True
    #: parameter names allowed to get an all-zero gradient (e.g. inactive spline bins)
    zero_grad_ok: tuple[str, ...] = field(default_factory=tuple)

    def __str__(self) -> str:
        return self.name


def _close(a: Tensor, b: Tensor, atol: float, what: str) -> None:
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    assert err <= atol, f"{what}: max abs error {err:.3g} > {atol:.1g}"


def perturb_parameters(module: torch.nn.Module, scale: float = 0.3) -> None:
    """Add ``scale`` times standard normal noise to every parameter (off the identity start)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


def prepare(case: Case, seed: int = 0, perturb: bool = True) -> Transform:
    """Build the transform in float64, move its parameters off their (often identity) start,
    run one training-mode pass (data-dependent init, running statistics), switch to eval."""
    torch.manual_seed(seed)
    t = case.make().double()
    if perturb and case.perturb:
        perturb_parameters(t, case.perturb)
        z = draw(case, (64,))
        c = context(case, (64,))
        t.train()
        with torch.no_grad():
            x = t(z, c)[0]
            t.inverse(x, c)
    t.eval()
    return t


def draw(case: Case, batch: tuple[int, ...]) -> Tensor:
    if case.sample is not None:
        return case.sample(batch).double()
    return torch.randn(*batch, *case.event_shape, dtype=torch.float64)


def context(case: Case, batch: tuple[int, ...]) -> Tensor | None:
    if not case.context_features:
        return None
    return torch.randn(*batch, case.context_features, dtype=torch.float64)


def _row(c: Tensor | None, i: int) -> Tensor | None:
    return None if c is None else c[i : i + 1]


def jacobian_logdet(fn: Callable[[Tensor], Tensor], v: Tensor) -> Tensor:
    """log|det| of the Jacobian of ``fn`` at one (unbatched) event ``v``, by autograd."""
    shape = v.shape

    def flat(u: Tensor) -> Tensor:
        return fn(u.reshape(1, *shape)).reshape(-1)

    jac = torch.autograd.functional.jacobian(flat, v.reshape(-1))
    assert jac.shape[0] == jac.shape[1], f"Jacobian is not square: {tuple(jac.shape)}"
    return torch.linalg.slogdet(jac)[1]


def check_directions(case: Case, t: Transform, z: Tensor, c: Tensor | None) -> None:
    """Round trip, ladj vs autograd, batch-of-one consistency, for one direction pair."""
    batch = z.shape[0]
    x, lf = t(z, c)
    assert lf.shape == (batch,), f"forward ladj shape {tuple(lf.shape)}, expected ({batch},)"
    assert torch.isfinite(x).all() and torch.isfinite(lf).all(), "non-finite forward output"
    z2, li = t.inverse(x, c)
    assert li.shape == (batch,), f"inverse ladj shape {tuple(li.shape)}, expected ({batch},)"
    _close(z2, z, case.atol, "round trip inverse(forward(z))")
    _close(lf + li, torch.zeros_like(lf), max(case.atol, 1e-9), "forward + inverse ladj")
    check_second_derivatives(t, z, c, "second derivatives")
    for i in range(min(3, batch)):
        ci = _row(c, i)
        ld = jacobian_logdet(lambda u, ci=ci: t(u, ci)[0], z[i])
        _close(lf[i], ld, case.ladj_atol, f"forward ladj vs autograd slogdet (row {i})")
        ld = jacobian_logdet(lambda u, ci=ci: t.inverse(u, ci)[0], x[i])
        _close(li[i], ld, case.ladj_atol, f"inverse ladj vs autograd slogdet (row {i})")
        xi, lfi = t(z[i : i + 1], ci)
        # float64 agreement up to summation order, relative to the size of the values
        scale = 1.0 + float(x[i].detach().abs().max()) + float(lf[i].detach().abs())
        _close(xi[0], x[i], 1e-10 * scale, f"batch of one vs row {i} of a batch (output)")
        _close(lfi[0], lf[i], 1e-10 * scale, f"batch of one vs row {i} of a batch (ladj)")


def check_second_derivatives(t: Transform, z: Tensor, c: Tensor | None, what: str) -> None:
    """Taylor tests of the second derivatives of ``s = <a, t(z)> + ladj(z)`` that autograd
    computes through its gradient ``g = ds/dz`` (``create_graph``), as a Hessian or a gradient
    penalty needs: the Hessian-vector product ``H v`` against the central differences
    ``(g(z + e v) - g(z - e v)) / 2e``, and the mixed derivative ``w^T (dg/dtheta) r`` (a
    random direction ``r`` of the parameters) against the differences of ``w^T g`` with the
    parameters moved by ``+-e r``. Both converge as ``e^2``; a derivative that autograd cannot
    see through (a hand-written backward, a root found without a graph) would leave an error
    that does not shrink with ``e``."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        x = t(z, c)[0]
    a = torch.randn(x.shape, generator=gen, dtype=z.dtype)
    v = torch.randn(z.shape, generator=gen, dtype=z.dtype)
    w = torch.randn(z.shape, generator=gen, dtype=z.dtype)
    params = [p for p in t.parameters() if p.requires_grad]
    r = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]

    def grad(u: Tensor, graph: bool = False) -> Tensor:
        """``g`` at ``u`` (a leaf that requires grad when ``graph``)."""
        u = u if graph else u.detach().requires_grad_()
        out, ladj = t(u, c)
        (g,) = torch.autograd.grad((a * out).sum() + ladj.sum(), u, create_graph=graph)
        return g if graph else g.detach()

    def converges(exact: Tensor, differences: Callable[[float], Tensor], name: str) -> None:
        errors = []
        for eps in (1e-5, 1e-6, 1e-7):
            fd = differences(eps)
            errors.append(float((exact - fd).abs().max()) / (1.0 + float(fd.abs().max())))
        # converged, or still converging quadratically (steep maps have large third
        # derivatives)
        assert min(errors) < 1e-6 or errors[-1] * 30 < errors[-2], (
            f"{what}: {name} vs finite differences of the gradient: relative errors "
            f"{', '.join(f'{e:.3g}' for e in errors)} at steps 1e-5, 1e-6, 1e-7 (not "
            "converging)"
        )

    u = z.detach().requires_grad_()
    g = grad(u, graph=True)
    # H v, with respect to the input
    hv = torch.zeros_like(z)
    if g.requires_grad:
        (found,) = torch.autograd.grad((g * v).sum(), u, retain_graph=True, allow_unused=True)
        hv = hv if found is None else found
    converges(hv, lambda e: (grad(z + e * v) - grad(z - e * v)) / (2 * e), "Hessian-vector product")
    if not params:
        return
    # w^T (dg/dtheta) r, with respect to the parameters
    mixed = torch.zeros((), dtype=z.dtype)
    if g.requires_grad:
        found = torch.autograd.grad((g * w).sum(), params, allow_unused=True)
        mixed = sum(((f * d).sum() for f, d in zip(found, r) if f is not None), mixed)
    saved = [p.detach().clone() for p in params]

    def moved(e: float) -> Tensor:
        with torch.no_grad():
            for p, p0, d in zip(params, saved, r):
                p.copy_(p0 + e * d)
        return (grad(z) * w).sum()

    try:
        converges(mixed, lambda e: (moved(e) - moved(-e)) / (2 * e), "mixed second derivative")
    finally:
        with torch.no_grad():
            for p, p0 in zip(params, saved):
                p.copy_(p0)


def check_integrates(case: Case, t: Transform) -> None:
    """The density of t(z), z ~ base, integrates to 1 over a fine grid (1-D and 2-D events)."""
    d = math.prod(case.event_shape)
    base = (case.base or (lambda: StandardNormal(case.event_shape)))().double()
    c0 = context(case, (1,))
    with torch.no_grad():
        if case.box is not None:
            lo = torch.full((d,), float(case.box[0]), dtype=torch.float64)
            hi = torch.full((d,), float(case.box[1]), dtype=torch.float64)
        else:
            zs = draw(case, (20000,))
            cs = None if c0 is None else c0.expand(20000, -1)
            xs = t(zs, cs)[0].reshape(20000, d)
            lo, hi = xs.min(0).values, xs.max(0).values
            lo, hi = lo - 0.6 * (hi - lo), hi + 0.6 * (hi - lo)
        n = 200_000 if d == 1 else 1200
        axes = [
            lo[j] + (hi[j] - lo[j]) * (torch.arange(n, dtype=torch.float64) + 0.5) / n
            for j in range(d)
        ]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, *case.event_shape)
        cell = torch.prod((hi - lo) / n)
        total = torch.zeros((), dtype=torch.float64)
        for chunk in grid.split(100_000):
            cc = None if c0 is None else c0.expand(chunk.shape[0], -1)
            z, li = t.inverse(chunk, cc)
            logp = base.log_prob(z, cc) + li
            assert not torch.isnan(logp).any(), "NaN density inside the integration box"
            total += torch.exp(logp).sum() * cell
    assert abs(total.item() - 1.0) < 1e-3, f"density integrates to {total.item():.6f}, not 1"


def check_transform(case: Case) -> None:
    """Every check of the contract, for ``case``'s transform and its ``Inverse``."""
    t = prepare(case)
    z = draw(case, (6,))
    c = context(case, (6,))
    check_directions(case, t, z, c)

    # the Inverse wrapper: swapped directions, Inverse(Inverse(t)) is t, same checks from x
    inv = Inverse(t)
    assert Inverse(inv) is t and inv.inv is t and t.inv.inv is t
    with torch.no_grad():
        x, lf = t(z, c)
    check_directions(case, inv, x, c)
    z3, l3 = inv(x, c)
    _close(z3, t.inverse(x, c)[0], 0.0, "Inverse(t).forward vs t.inverse")

    # leading batch shapes
    if case.multi_batch:
        zz = z.reshape(2, 3, *z.shape[1:])
        cc = None if c is None else c.reshape(2, 3, -1)
        xx, ll = t(zz, cc)
        assert ll.shape == (2, 3), f"ladj shape {tuple(ll.shape)} for batch (2, 3)"
        _close(xx.reshape(x.shape), x, 1e-10, "batch shape (2, 3) vs (6,)")
        zb, lb = t.inverse(xx, cc)
        _close(zb.reshape(z.shape), z, case.atol, "round trip with batch shape (2, 3)")

    # gradients reach every parameter, from both directions
    params = [(n, p) for n, p in t.named_parameters() if p.requires_grad]
    if params:
        t.zero_grad()
        g = torch.Generator().manual_seed(1)
        x, lf = t(z, c)
        z2, li = t.inverse(x.detach(), c)
        loss = (x * torch.randn(x.shape, generator=g, dtype=x.dtype)).sum() + lf.sum()
        loss = loss + (z2 * torch.randn(z2.shape, generator=g, dtype=x.dtype)).sum() + li.sum()
        loss.backward()
        for name, p in params:
            assert p.grad is not None, f"no gradient reaches parameter {name}"
            assert torch.isfinite(p.grad).all(), f"non-finite gradient for {name}"
            if p.numel() and not any(name.endswith(s) for s in case.zero_grad_ok):
                assert p.grad.abs().sum() > 0, f"zero gradient for parameter {name}"

    # context: it matters, and a missing one is a clear error
    if case.context_features:
        with torch.no_grad():
            x2, _ = t(z, context(case, (6,)))
        assert (x2 - x).abs().max() > 1e-6, "output does not depend on the context"
        try:
            t(z, None)
        except PushforwardError:
            pass
        else:
            raise AssertionError("a conditional transform accepted a missing context")

    # save/load through safetensors: a fresh build with other weights becomes identical
    blob = st_save({k: v.contiguous() for k, v in t.state_dict().items()})
    t2 = prepare(case, seed=1, perturb=False)
    t2.load_state_dict(st_load(blob))
    t2.eval()
    with torch.no_grad():
        x, lf = t(z, c)
        x2, lf2 = t2(z, c)
    _close(x2, x, 0.0, "forward after save/load")
    _close(lf2, lf, 0.0, "ladj after save/load")

    if case.integrate and len(case.event_shape) == 1 and case.event_shape[0] in (1, 2):
        check_integrates(case, t)


def check_flow(
    name: str, features: int | tuple[int, ...], context_features: int = 0, **options
) -> None:
    """Every check for a registered flow: its transform through :func:`check_transform`, then
    ``Flow``-level identities, the ``torch.distributions`` view, save/load through ``io``, and
    (1-D/2-D, unconditional) that ``log_prob`` integrates to 1."""
    import tempfile

    from pushforward import flows, io

    def make() -> Transform:
        return flows.build(name, features, context_features, **options).transform

    # In one dimension some parameters are dead by design: an unconditional MADE's first layer
    # is fully masked (it sees nothing), ccLinIAF's mixture weights combine 1x1 unit
    # triangular matrices, all equal to 1, and a Sylvester flow's Q is +-1 whatever its raw
    # matrix or Householder vectors.
    event = (features,) if isinstance(features, int) else tuple(features)
    dead = ()
    if event == (1,) and context_features == 0:
        dead = (
            "made.layers.0.weight",
            "params.params.logits",
            "params.params.q",
            "params.params.vectors",
        )
    # a parameter-free transform (MADE MoG's identity) ignores the context; the base uses it
    free = not any(True for _ in make().parameters())
    case = Case(
        name,
        make,
        event,
        0 if free else context_features,
        perturb=0.05,
        integrate=False,
        zero_grad_ok=dead,
    )
    check_transform(case)

    torch.manual_seed(0)
    flow = flows.build(name, features, context_features, **options).double()
    perturb_parameters(flow, 0.05)

    def fresh_context() -> Tensor | None:
        return torch.randn(7, context_features, dtype=torch.float64) if context_features else None

    c = fresh_context()
    flow.train()
    with torch.no_grad():
        flow.log_prob(
            flow.sample((64,), c[:1] if c is not None else None).reshape(64, *event),
            None if c is None else c[:1].expand(64, -1),
        )
    flow.eval()
    with torch.no_grad():
        x = flow.sample((), c) if c is not None else flow.sample(7)
        assert x.shape == (7, *event), f"sample shape {tuple(x.shape)}"
        lp = flow.log_prob(x, c)
        z = flow.latent(x, c)
        _, li = flow.transform.inverse(x, c)
        _close(lp, flow.base.log_prob(z, c) + li, 1e-10, "log_prob = log q(z) + ladj")
        if c is not None:
            lp_other = flow.log_prob(x, fresh_context())
            assert (lp_other - lp).abs().max() > 1e-6, "log_prob does not depend on the context"
        x2, lp2 = flow.sample_and_log_prob((), c) if c is not None else flow.sample_and_log_prob(7)
        _close(lp2, flow.log_prob(x2, c), 1e-6, "sample_and_log_prob vs log_prob")
        dist = flow.distribution(c)
        assert isinstance(dist, torch.distributions.Distribution)
        _close(dist.log_prob(x), lp, 1e-12, "distribution view log_prob")
        with tempfile.TemporaryDirectory() as tmp:
            config = {
                "flow": name,
                "features": features,
                "context_features": context_features,
                "options": options,
                "scaling": None,
            }
            io.save_model(tmp, flow, config)
            loaded, _ = io.load_model(tmp)
            loaded = loaded.double()
            _close(loaded.log_prob(x, c), lp, 1e-12, "log_prob after save/load")

    if event in ((1,), (2,)) and context_features == 0:
        features = event[0]
        with torch.no_grad():
            xs = flow.sample(20000)
            lo, hi = xs.min(0).values, xs.max(0).values
            lo, hi = lo - 0.6 * (hi - lo), hi + 0.6 * (hi - lo)
            n = 200_000 if features == 1 else 1200
            axes = [
                lo[j] + (hi[j] - lo[j]) * (torch.arange(n, dtype=torch.float64) + 0.5) / n
                for j in range(features)
            ]
            grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, features)
            cell = torch.prod((hi - lo) / n)
            total = sum(torch.exp(flow.log_prob(g)).sum() for g in grid.split(100_000)) * cell
        assert abs(float(total) - 1.0) < 1e-3, f"{name}: density integrates to {float(total):.6f}"
