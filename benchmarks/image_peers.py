"""The image flows of pushforward (``glow``, ``realnvp-image``) rebuilt layer by layer in nflows.

:func:`build` returns a :class:`Built` (the one of ``peers.py``) for ``lib`` in
``("pushforward", "nflows")``; both report ``log p(y)`` of images ``y`` in ``[0, 1)`` of shape
``(batch, C, H, W)``, the logit preprocessing and its Jacobian included, so the numbers are the
same quantity. :func:`step_time` times training steps, :func:`check_density` checks a model's
``log_prob`` against the change of variables with an autograd Jacobian.

How the architectures line up (data-to-noise direction):

* preprocessing: ``logit(alpha + (1 - 2 alpha) y)``, ``alpha = 0.05``, with its exact
  log-determinant; nflows has no such transform, so :class:`LogitTransform` is a small nflows
  ``Transform`` (inverse: the sigmoid back).
* squeeze: nflows' ``SqueezeTransform`` orders the new channels ``(c, i, j)`` like
  pushforward's ``Squeeze`` (channel ``4c + 2i + j`` holds pixel ``(2h + i, 2w + j)``).
* factor-out: ``MultiscaleCompositeTransform`` sends the first half of the channels to the base
  and the second half on, as pushforward's ``FactorOut``; its latent is flattened (pushforward
  unsqueezes back to the image shape), a permutation, so the density is unchanged.
* ``glow``: per level squeeze, then ``layers`` steps ActNorm -> invertible 1x1 convolution ->
  affine coupling over the channels (pushforward transforms the second half of the channels
  on even steps and the first half on odd steps; the nflows masks are chosen to match), then
  factor out half (all levels but the last). The 1x1 convolution is nflows'
  ``OneByOneConvolution`` (a fixed random channel permutation then an LU-parameterised
  matrix started at the identity, so a random permutation at initialisation; pushforward's
  ``InvertibleConv1x1`` is an LU matrix started at a random rotation). Both are orthogonal at
  initialisation, log-determinant 0.
* ``realnvp-image``: per scale ``layers`` checkerboard couplings, squeeze, ``layers``
  channel couplings, factor out half; the last scale ``layers + 1`` checkerboard couplings;
  ActNorm before every coupling. nflows' coupling layers only split along the channel
  dimension (a 1-d mask), so the checkerboard couplings use :class:`CheckerboardCoupling`,
  the smallest adapter: an nflows ``Transform`` whose conditioner sees the masked image at
  full resolution (transformed entries zeroed, as pushforward's ``Coupling`` does) and which
  uses nflows' affine scale formula.
* conditioners: pushforward's ``ConvResNet`` (3x3 input conv, one residual block of two 3x3
  convs with ReLU per entry of ``hidden``, ReLU, 3x3 output conv with zero weights and bias).
  nflows' ``ConvResidualNet`` uses 1x1 input/output convs, a non-zero output layer and no
  final ReLU, so it is not the same network; :class:`ConvNet` here is the same network with
  nflows' conditioner signature ``net(x, context)``.

Differences that remain:

* the affine scale: nflows' ``AffineCouplingTransform`` uses ``scale = sigmoid(h + 2) + 1e-3``
  (in ``(0.001, 1.001)``), pushforward ``log s = 5 tanh(h / 5)``. With the zero-initialised
  output conv a fresh nflows coupling therefore scales by ``sigmoid(2) + 0.001 = 0.882``
  (``log s = -0.126`` per transformed entry) where pushforward's is the identity; the
  checkerboard adapter keeps nflows' formula. (Starting nflows at scale 1 would need
  ``h = 4.9``, deep in the saturated part of the sigmoid.)
* channel couplings: both libraries' conditioners read the identity half of the channels only
  and predict the transformed half's parameters (``C/2`` channels in, ``C`` out), as Glow
  does; the checkerboard couplings (adapter) read the masked image, as pushforward's.
* the 1x1 convolution: nflows' ``LULinear`` has a bias (``C^2 + C`` parameters per layer);
  ActNorm has ``2C`` in both.

Parameter counts at 1x28x28 for the defaults of :data:`MODELS` (measured with
``python benchmarks/image_peers.py``):

==============  ===========  =======
model           pushforward  nflows
==============  ===========  =======
glow                633,344  633,344
realnvp-image       538,232  538,232
==============  ===========  =======

Every layer has the same parameter count in both libraries.

At initialisation (measured with the logit margin 0.05, the default before format 3), with
ActNorm initialised on the same ``torch.rand(8, 1, 28, 28)``, the mean ``log_prob`` per image
is -29.3 (pushforward) / -39.0 (nflows) for glow and -30.9 / -39.3 for realnvp-image: about
0.011 nats per dimension apart. Setting every nflows coupling to start at scale exactly 1
(scale bias ``logit(0.999) - 2``) gives -30.92 for realnvp-image, the pushforward value, and
-30.36 for glow, where the remaining 1 nat comes from the 1x1 convolutions' initial rotation
(pushforward) against permutation (nflows). So the flows start at the same map apart from
nflows' ``sigmoid(2) + 0.001`` scales and the 1x1 initialisation.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import Built, Unavailable  # noqa: E402

try:
    from nflows.transforms.base import Transform as _NflowsTransform
except ImportError:  # nflows missing: build("nflows", ...) raises Unavailable
    _NflowsTransform = nn.Module

__all__ = [
    "LIBS",
    "MODELS",
    "Built",
    "Unavailable",
    "build",
    "step_time",
    "interleaved_step_times",
    "check_density",
    "ConvNet",
    "LogitTransform",
    "CheckerboardCoupling",
]

#: the libraries compared
LIBS = ("pushforward", "nflows")

#: image model -> pushforward recipe options (``hidden``: one width per residual block)
MODELS: dict[str, dict] = {
    "glow": {"levels": 2, "layers": 4, "hidden": (64,)},
    "realnvp-image": {"levels": 2, "layers": 2, "hidden": (64,)},
}

#: the logit margin of both libraries' preprocessing (pushforward's default)
ALPHA = 1e-6


def build(lib: str, model: str, shape: tuple[int, int, int], options: dict | None = None) -> Built:
    """``model`` (a key of :data:`MODELS`) over images of ``shape`` ``(C, H, W)`` in ``lib``;
    ``options`` override the model's defaults (``levels``, ``layers``, ``hidden``, ``logit``)."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
    builders = {"pushforward": _pushforward, "nflows": _nflows}
    if lib not in builders:
        raise ValueError(f"unknown library {lib!r}; choose from {', '.join(LIBS)}")
    opts = {**MODELS[model], **(options or {})}
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise ValueError(f"shape must be (channels, height, width), got {shape!r}")
    try:
        return builders[lib](model, shape, opts)
    except ImportError as err:
        raise Unavailable(f"{lib} not installed ({err})") from None


# ---------------------------------------------------------------------------------------------
# pushforward: the registry


def _pushforward(model: str, shape: tuple[int, int, int], opts: dict) -> Built:
    from pushforward import flows

    if model not in flows.names():
        raise Unavailable(f"pushforward has no {model!r} recipe registered")
    flow = flows.build(model, shape, **opts)
    built = Built("pushforward", model, flow, flow.log_prob, lambda n: flow.sample((n,)))
    built.latent = flow.latent  # the noise of y, for check_density
    return built


# ---------------------------------------------------------------------------------------------
# nflows: layers composed by hand


class ConvNet(nn.Module):
    """pushforward's ``ConvResNet`` with nflows' conditioner signature ``net(x, context)``:
    3x3 conv to ``width`` channels, ``blocks`` residual blocks ``h + conv(relu(conv(relu(h))))``,
    ReLU, 3x3 output conv with zero weights and bias."""

    def __init__(self, in_channels: int, out_channels: int, width: int, blocks: int):
        super().__init__()
        self.input = nn.Conv2d(in_channels, width, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.ModuleList([nn.Conv2d(width, width, 3, padding=1) for _ in range(2)])
            for _ in range(blocks)
        )
        self.output = nn.Conv2d(width, out_channels, 3, padding=1)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        h = self.input(x)
        for conv1, conv2 in self.blocks:
            h = h + conv2(F.relu(conv1(F.relu(h))))
        return self.output(F.relu(h))


class LogitTransform(_NflowsTransform):
    """RealNVP's preprocessing as an nflows transform, data -> noise:
    ``x = logit(u)``, ``u = alpha + (1 - 2 alpha) y``, per entry
    ``log|dx/dy| = log(1 - 2 alpha) - log u - log(1 - u)``; inverse ``y = (sigmoid(x) - alpha)
    / (1 - 2 alpha)``."""

    def __init__(self, alpha: float = ALPHA):
        super().__init__()
        if not 0.0 <= alpha < 0.5:
            raise ValueError(f"alpha must be in [0, 1/2), got {alpha!r}")
        self.alpha = float(alpha)

    def forward(self, inputs: Tensor, context=None) -> tuple[Tensor, Tensor]:
        u = self.alpha + (1.0 - 2.0 * self.alpha) * inputs
        lad = math.log1p(-2.0 * self.alpha) - torch.log(u) - torch.log1p(-u)
        return torch.log(u) - torch.log1p(-u), lad.flatten(1).sum(1)

    def inverse(self, inputs: Tensor, context=None) -> tuple[Tensor, Tensor]:
        y = (torch.sigmoid(inputs) - self.alpha) / (1.0 - 2.0 * self.alpha)
        # log sigmoid'(x) = -softplus(x) - softplus(-x)
        lad = -F.softplus(inputs) - F.softplus(-inputs) - math.log1p(-2.0 * self.alpha)
        return y, lad.flatten(1).sum(1)


def _checkerboard(c: int, h: int, w: int, flip: bool) -> Tensor:
    """``True`` (transformed) where ``i + j`` is even, every channel; ``flip``: the complement
    (pushforward's ``checkerboard_mask``)."""
    parity = (torch.arange(h).unsqueeze(1) + torch.arange(w)) % 2 == 0
    mask = parity.expand(c, h, w).clone()
    return ~mask if flip else mask


class CheckerboardCoupling(_NflowsTransform):
    """Affine coupling with a mask over ``(C, H, W)``, which nflows' ``CouplingTransform``
    (channel masks only) cannot take. The conditioner sees the input with the transformed
    entries zeroed and returns ``2C`` channels, shifts then unconstrained scales as in nflows'
    ``AffineCouplingTransform``, whose scale ``sigmoid(h + 2) + 1e-3`` is kept."""

    def __init__(self, mask: Tensor, width: int, blocks: int):
        super().__init__()
        self.register_buffer("mask", mask.bool())
        c = mask.shape[0]
        self.transform_net = ConvNet(c, 2 * c, width, blocks)

    def _scale_and_shift(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        params = self.transform_net(inputs.masked_fill(self.mask, 0.0))
        shift, raw = params.chunk(2, dim=1)
        return torch.sigmoid(raw + 2.0) + 1e-3, shift

    def forward(self, inputs: Tensor, context=None) -> tuple[Tensor, Tensor]:
        scale, shift = self._scale_and_shift(inputs)
        out = torch.where(self.mask, inputs * scale + shift, inputs)
        lad = torch.where(self.mask, torch.log(scale), torch.zeros_like(scale))
        return out, lad.flatten(1).sum(1)

    def inverse(self, inputs: Tensor, context=None) -> tuple[Tensor, Tensor]:
        scale, shift = self._scale_and_shift(inputs)  # identity entries are unchanged
        out = torch.where(self.mask, (inputs - shift) / scale, inputs)
        lad = torch.where(self.mask, -torch.log(scale), torch.zeros_like(scale))
        return out, lad.flatten(1).sum(1)


def _conv_hidden(hidden) -> tuple[int, int]:
    widths = tuple(int(h) for h in hidden)
    if not widths or len(set(widths)) != 1 or widths[0] < 1:
        raise ValueError(f"hidden lists one width per residual block, all equal; got {hidden!r}")
    return widths[0], len(widths)


def _halve(c: int, h: int, w: int) -> tuple[int, int, int]:
    if h % 2 or w % 2:
        raise ValueError(f"cannot squeeze {h}x{w} images; use fewer levels")
    return 4 * c, h // 2, w // 2


def _channel_coupling(c: int, k: int, width: int, blocks: int):
    """pushforward's ``channel_mask(flip=k % 2 == 1)`` as an nflows coupling: even steps
    transform the second half of the channels, odd steps the first half."""
    from nflows.transforms.coupling import AffineCouplingTransform
    from nflows.utils import create_mid_split_binary_mask

    first_half = create_mid_split_binary_mask(c)  # 1: transformed
    mask = first_half if k % 2 == 1 else 1 - first_half
    return AffineCouplingTransform(mask, lambda i, o: ConvNet(i, o, width, blocks))


def _nflows_glow_level(shape, layers: int, width: int, blocks: int):
    from nflows.transforms.base import CompositeTransform
    from nflows.transforms.conv import OneByOneConvolution
    from nflows.transforms.normalization import ActNorm
    from nflows.transforms.reshape import SqueezeTransform

    c, h, w = _halve(*shape)
    parts: list[nn.Module] = [SqueezeTransform()]
    for k in range(layers):
        parts += [ActNorm(c), OneByOneConvolution(c), _channel_coupling(c, k, width, blocks)]
    return CompositeTransform(parts), (c, h, w)


def _nflows_realnvp_level(shape, last: bool, layers: int, width: int, blocks: int):
    from nflows.transforms.base import CompositeTransform
    from nflows.transforms.normalization import ActNorm
    from nflows.transforms.reshape import SqueezeTransform

    c, h, w = shape
    parts: list[nn.Module] = []
    for k in range(layers + 1 if last else layers):
        mask = _checkerboard(c, h, w, flip=k % 2 == 1)
        parts += [ActNorm(c), CheckerboardCoupling(mask, width, blocks)]
    if not last:
        c, h, w = _halve(c, h, w)
        parts.append(SqueezeTransform())
        for k in range(layers):
            parts += [ActNorm(c), _channel_coupling(c, k, width, blocks)]
    return CompositeTransform(parts), (c, h, w)


def _nflows(model: str, shape: tuple[int, int, int], opts: dict) -> Built:
    from nflows.distributions.normal import StandardNormal
    from nflows.flows.base import Flow
    from nflows.transforms.base import CompositeTransform, MultiscaleCompositeTransform

    opts = dict(opts)
    levels, layers = int(opts.pop("levels")), int(opts.pop("layers"))
    width, blocks = _conv_hidden(opts.pop("hidden"))
    alpha = opts.pop("logit", ALPHA)
    if opts.pop("base", "normal") != "normal":
        raise Unavailable("only a standard normal base is built for nflows")
    if opts:
        raise ValueError(f"unknown options {sorted(opts)}")
    if levels < 1 or layers < 1:
        raise ValueError("levels and layers must be positive")
    multiscale = MultiscaleCompositeTransform(levels)
    current = shape
    for level in range(levels):
        if model == "glow":
            t, out = _nflows_glow_level(current, layers, width, blocks)
        else:
            t, out = _nflows_realnvp_level(current, level == levels - 1, layers, width, blocks)
        current = multiscale.add_transform(t, out)
    pre = [] if alpha is None or alpha is False else [LogitTransform(float(alpha))]
    flow = Flow(CompositeTransform([*pre, multiscale]), StandardNormal([math.prod(shape)]))

    def sample(n: int) -> Tensor:
        with torch.no_grad():
            return flow.sample(n)

    built = Built("nflows", model, flow, flow.log_prob, sample)
    built.latent = lambda y: flow._transform(y)[0]  # the noise of y, for check_density
    return built


# ---------------------------------------------------------------------------------------------
# timing and the density check


def step_time(built: Built, batch: Tensor, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` Adam steps on the NLL of ``batch`` (after one warm-up
    step, which also initialises ActNorm)."""
    return interleaved_step_times([built], batch, repeats)[0]


def check_density(
    lib: str, model: str, shape: tuple[int, int, int] = (1, 4, 4), seed: int = 0
) -> float:
    """Largest ``|log_prob(y) - (log N(z; 0, I) + log|det dz/dy|)|`` over 3 images ``y``, with
    ``z`` the model's latent and the Jacobian from ``torch.autograd.functional.jacobian``, in
    float64, for ``levels=2, layers=1, hidden=(8,)``. ActNorm is initialised on a batch and
    every parameter is then perturbed, so no layer is the identity."""
    torch.manual_seed(seed)
    built = build(lib, model, shape, {"levels": 2, "layers": 1, "hidden": (8,)})
    module = built.module.double()
    module.train()
    built.log_prob(torch.rand(16, *shape, dtype=torch.float64))  # ActNorm's data init
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn_like(p))
    module.eval()
    d = math.prod(shape)
    y = 0.01 + 0.98 * torch.rand(3, *shape, dtype=torch.float64)
    with torch.no_grad():
        log_prob = built.log_prob(y)
    worst = 0.0
    for i in range(y.shape[0]):

        def noise(v: Tensor) -> Tensor:
            return built.latent(v.reshape(1, *shape)).reshape(-1)

        with torch.no_grad():
            z = noise(y[i].reshape(-1))
        jac = torch.autograd.functional.jacobian(noise, y[i].reshape(-1))
        log_base = -0.5 * (z**2).sum() - 0.5 * d * math.log(2 * math.pi)
        expected = log_base + torch.linalg.slogdet(jac)[1]
        worst = max(worst, abs(float(log_prob[i] - expected)))
    return worst


def interleaved_step_times(builts: list[Built], batch: Tensor, repeats: int) -> list[list[float]]:
    """Seconds of ``repeats`` training steps of each model, the models taking turns step by
    step (after one warm-up step each), so that drifts in the machine's speed hit all alike."""
    opts = [torch.optim.Adam(b.module.parameters(), lr=1e-4) for b in builts]
    sync = torch.cuda.synchronize if batch.is_cuda else (lambda: None)
    times: list[list[float]] = [[] for _ in builts]
    for r in range(repeats + 1):
        for i, (built, opt) in enumerate(zip(builts, opts)):
            built.module.train()
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            (-built.log_prob(batch).mean()).backward()
            opt.step()
            sync()
            if r:
                times[i].append(time.perf_counter() - t0)
    return times


def _main(repeats: int) -> None:
    shape = (1, 28, 28)
    torch.manual_seed(0)
    y8 = torch.rand(8, *shape)
    batch = torch.rand(64, *shape)
    for model in MODELS:
        for lib in LIBS:
            err = check_density(lib, model)
            print(f"density check {lib:11s} {model:13s} (1, 4, 4): max |error| = {err:.2e}")
            if not err < 1e-8:
                raise SystemExit(f"density check failed for {lib} {model}")
    sys.stdout.flush()
    for model in MODELS:
        builts = []
        for lib in LIBS:
            torch.manual_seed(1)
            built = build(lib, model, shape)
            built.module.train()
            lp = built.log_prob(y8)
            if not bool(torch.isfinite(lp).all()):
                raise SystemExit(f"{lib} {model}: non-finite log_prob")
            x = built.sample(4)
            if tuple(x.shape) != (4, *shape):
                raise SystemExit(f"{lib} {model}: sample shape {tuple(x.shape)}")
            print(
                f"{lib:11s} {model:13s} params {built.parameters:8d}  "
                f"init log_prob mean {lp.mean().item():10.2f}",
                flush=True,
            )
            builts.append(built)
        for built, times in zip(builts, interleaved_step_times(builts, batch, repeats)):
            print(
                f"{built.lib:11s} {model:13s} step (batch 64, interleaved, {repeats} each): "
                f"median {statistics.median(times) * 1e3:7.1f} ms, "
                f"min {min(times) * 1e3:7.1f} ms",
                flush=True,
            )


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="density checks and step times, both libraries")
    parser.add_argument("--repeats", type=int, default=15, help="timed steps per model")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    _main(args.repeats)
