"""The same flows built in pushforward, zuko and nflows, behind one small interface.

Used by ``speed.py`` and ``quality.py``. Every model is described once in :data:`MODELS`
(layers, conditioner widths, transformer); :func:`build` turns a description into a
:class:`Built` for one library, or raises :class:`Unavailable` (library not installed, recipe
not registered) so that the scripts can print "n/a" instead of failing.

How the architectures line up:

* ``made``, ``maf``, ``maf10``: affine autoregressive layers, each a MADE with ReLU hidden
  layers of the given widths and 2 outputs (shift, log-scale) per feature; the ordering is
  reversed between layers (pushforward and zuko reverse the MADE's order, nflows inserts a
  ``ReversePermutation``: the same map). Standard normal base. The weight shapes, hence the
  parameter counts, are identical in the three libraries. The libraries differ only in how
  the scale is bounded (pushforward ``5 tanh(s/5)``, zuko a soft clip, nflows
  ``sigmoid(s + 2) + 1e-3``).
* ``nsf``: autoregressive rational-quadratic spline flow, 8 bins on ``[-5, 5]`` with
  identity (linear) tails, MADE ``(256, 256)``, ``3 * 8 - 1 = 23`` parameters per feature.
* ``realnvp``: affine coupling layers alternating which half of the features is transformed,
  each conditioner a plain MLP (pushforward: its ``realnvp`` recipe, if registered; zuko:
  ``zuko.flows.RealNVP``; nflows: ``AffineCouplingTransform`` with a plain MLP conditioner).
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["LIBS", "FLOOR", "MODELS", "Spec", "Built", "Unavailable", "build", "floor", "versions"]

#: the libraries compared, in table order
LIBS = ("pushforward", "zuko", "nflows")
#: the name of the plain-MLP floor in tables
FLOOR = "floor (MLP)"


@dataclass(frozen=True)
class Spec:
    """One model, described independently of any library."""

    structure: str  # "autoregressive" or "coupling"
    transformer: str  # "affine" or "spline"
    layers: int
    hidden: tuple[int, ...]
    bins: int = 8

    @property
    def heads(self) -> int:
        """Conditioner outputs per feature."""
        return 2 if self.transformer == "affine" else 3 * self.bins - 1


#: the models of the benchmarks
MODELS: dict[str, Spec] = {
    "made": Spec("autoregressive", "affine", 1, (512, 512)),
    "maf": Spec("autoregressive", "affine", 5, (512, 512)),
    "maf10": Spec("autoregressive", "affine", 10, (512, 512)),
    "nsf": Spec("autoregressive", "spline", 5, (256, 256), bins=8),
    "realnvp": Spec("coupling", "affine", 5, (512, 512)),
}

#: the half-width of the interval where the splines act (pushforward's and zuko's default)
SPLINE_BOUND = 5.0


class Unavailable(Exception):
    """A model that a library cannot build here (not installed, recipe not registered)."""


@dataclass
class Built:
    """A model of one library: its parameters, ``log_prob(x) -> (batch,)``, ``sample(n)``."""

    lib: str
    model: str
    module: nn.Module
    log_prob: Callable[[Tensor], Tensor]
    sample: Callable[[int], Tensor]

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())


def versions() -> dict[str, str]:
    """Installed versions of torch and of each library (``"missing"`` when not installed)."""
    out = {"torch": torch.__version__}
    for lib in LIBS:
        try:
            out[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            out[lib] = "missing"
    return out


def build(lib: str, model: str, features: int) -> Built:
    """``model`` (a key of :data:`MODELS`) over ``features`` dimensions in ``lib``."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
    builders = {"pushforward": _pushforward, "zuko": _zuko, "nflows": _nflows}
    if lib not in builders:
        raise ValueError(f"unknown library {lib!r}; choose from {', '.join(LIBS)}")
    try:
        return builders[lib](model, MODELS[model], features)
    except ImportError as err:
        raise Unavailable(f"{lib} not installed ({err})") from None


# ---------------------------------------------------------------------------------------------
# pushforward: the registry


def _pushforward(model: str, spec: Spec, d: int) -> Built:
    from pushforward import flows

    if spec.structure == "coupling":
        name, options = "realnvp", {"layers": spec.layers, "hidden": spec.hidden}
    elif model == "made":
        name, options = "made", {"hidden": spec.hidden}
    elif spec.transformer == "affine":
        name = "maf"
        options = {"layers": spec.layers, "hidden": spec.hidden, "permutation": "reverse"}
    else:
        name = "nsf"  # without the recipe's extra affine layer: the peers' architecture
        options = {"layers": spec.layers, "hidden": spec.hidden, "bins": spec.bins, "affine": False}
    if name not in flows.names():
        raise Unavailable(f"pushforward has no {name!r} recipe registered")
    flow = flows.build(name, d, **options)
    return Built("pushforward", model, flow, flow.log_prob, lambda n: flow.sample((n,)))


# ---------------------------------------------------------------------------------------------
# zuko: its MAF / NSF / RealNVP classes


def _zuko(model: str, spec: Spec, d: int) -> Built:
    import zuko

    if spec.structure == "coupling":
        flow = zuko.flows.RealNVP(d, 0, transforms=spec.layers, hidden_features=spec.hidden)
    elif spec.transformer == "affine":
        # orders alternate ascending / descending: the reverse permutation between layers
        flow = zuko.flows.MAF(d, 0, transforms=spec.layers, hidden_features=spec.hidden)
    else:
        flow = zuko.flows.NSF(
            d, 0, bins=spec.bins, transforms=spec.layers, hidden_features=spec.hidden
        )
    return Built(
        "zuko",
        model,
        flow,
        lambda x: flow().log_prob(x),
        lambda n: flow().sample((n,)),
    )


# ---------------------------------------------------------------------------------------------
# nflows: layers composed by hand (its MaskedAutoregressiveFlow class uses residual blocks)


class _MLP(nn.Module):
    """A plain ReLU MLP with nflows' conditioner signature ``net(x, context)``."""

    def __init__(self, inputs: int, outputs: int, hidden: tuple[int, ...]):
        super().__init__()
        widths = (inputs, *hidden)
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], outputs))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return self.net(x)


def _nflows(model: str, spec: Spec, d: int) -> Built:
    from nflows.distributions.normal import StandardNormal
    from nflows.flows.base import Flow
    from nflows.transforms.autoregressive import (
        MaskedAffineAutoregressiveTransform,
        MaskedPiecewiseRationalQuadraticAutoregressiveTransform,
    )
    from nflows.transforms.base import CompositeTransform
    from nflows.transforms.coupling import AffineCouplingTransform
    from nflows.transforms.permutations import ReversePermutation

    if spec.structure == "autoregressive" and len(set(spec.hidden)) != 1:
        raise Unavailable("nflows' MADE needs equal hidden widths")
    width, blocks = spec.hidden[0], len(spec.hidden) - 1  # an input layer + feedforward blocks
    parts: list[nn.Module] = []
    for i in range(spec.layers):
        if i > 0 and spec.structure == "autoregressive":
            parts.append(ReversePermutation(d))
        if spec.structure == "coupling":
            mask = (torch.arange(d) % 2 == i % 2).int() * 2 - 1  # > 0: transformed
            parts.append(AffineCouplingTransform(mask, lambda a, b, h=spec.hidden: _MLP(a, b, h)))
        elif spec.transformer == "affine":
            parts.append(
                MaskedAffineAutoregressiveTransform(
                    d, width, num_blocks=blocks, use_residual_blocks=False
                )
            )
        else:
            parts.append(
                MaskedPiecewiseRationalQuadraticAutoregressiveTransform(
                    d,
                    width,
                    num_bins=spec.bins,
                    tails="linear",
                    tail_bound=SPLINE_BOUND,
                    num_blocks=blocks,
                    use_residual_blocks=False,
                )
            )
    flow = Flow(CompositeTransform(parts), StandardNormal([d]))
    return Built("nflows", model, flow, flow.log_prob, flow.sample)


# ---------------------------------------------------------------------------------------------
# the floor


class Floor(nn.Module):
    """The plain-MLP floor of a model: per layer an unmasked ``nn.Sequential`` MLP with the
    conditioner's matmul shapes, ``d -> hidden... -> d * heads``, chained by keeping the first
    ``d`` outputs as the next layer's input. No masks, no transformer, no log-determinant: the
    matrix-multiply work of the model and nothing else."""

    def __init__(self, spec: Spec, features: int):
        super().__init__()
        self.features = features
        nets = []
        for _ in range(spec.layers):
            widths = (features, *spec.hidden)
            layers: list[nn.Module] = []
            for a, b in zip(widths[:-1], widths[1:]):
                layers += [nn.Linear(a, b), nn.ReLU()]
            layers.append(nn.Linear(widths[-1], features * spec.heads))
            nets.append(nn.Sequential(*layers))
        self.nets = nn.ModuleList(nets)

    def forward(self, x: Tensor) -> Tensor:
        for net in self.nets:
            x = net(x)[:, : self.features]
        return x


def floor(model: str, features: int) -> Built:
    """The floor of ``model`` as a :class:`Built` whose ``log_prob`` is the MLP chain's output
    summed per row (so ``-log_prob(x).mean()`` is a loss with the same backward shapes)."""
    net = Floor(MODELS[model], features)

    def unavailable(n: int) -> Tensor:
        raise Unavailable("the floor does not sample")

    return Built(FLOOR, model, net, lambda x: net(x).sum(-1), unavailable)
