r"""MADE: the masked autoregressive network that drives MAF and IAF layers.

A MADE is a multilayer perceptron whose weights are multiplied by fixed binary masks so that
output :math:`i` depends only on the inputs before :math:`i` in a chosen ordering. Every unit
carries a *degree*: input :math:`j` has degree :math:`m(j) \in \{1, \dots, d\}` (its rank in the
ordering, plus one), a hidden unit a degree in :math:`\{1, \dots, d - 1\}` (from 0 when a
context is given: degree-0 units see only the context), and

.. math::
    M^{\text{hidden}}_{uv} = [\, m(u) \ge m(v) \,], \qquad
    M^{\text{output}}_{iv} = [\, m(i) > m(v) \,],

so a hidden unit of degree :math:`k` sees only inputs of degree :math:`\le k`, and output
:math:`i` only inputs of degree :math:`< m(i)`.

Hidden degrees are assigned in contiguous, equal (within one) blocks
(:func:`hidden_degrees`), so they cover the allowed range evenly, are reproducible, and hidden
units come already sorted by degree. That sorting is what makes :meth:`MADE.autoregress` cheap: when
input :math:`x_{(k)}` becomes known, the units of degree :math:`k` of every layer form one slice,
computed from prefix slices of the layer before.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import PushforwardError, check_context, check_features, check_positive_int
from ..numerics import under_functorch

__all__ = ["MADE", "hidden_degrees"]

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "tanh": torch.tanh,
    "elu": F.elu,
    "gelu": F.gelu,
    "silu": F.silu,
}
#: without gradient, :meth:`MADE.autoregress` callers run large batches in row chunks whose
#: widest hidden state takes about this many bytes. Each of the d steps re-reads a prefix of
#: every state with a product only a few rows tall; a state that stays in the cache makes
#: those reads cheap. MAF d=43 (2x512), 10,000 samples, 2 threads, AMD EPYC (32 MB L3):
#: chunks of 1,667 rows took 1,293 ms (median of 5) against 1,467 ms in one piece.
AUTOREGRESS_CHUNK_BYTES = 3_400_000

#: weights per row group of the block-triangular evaluation with the default ``block_size``
#: (``None``): a layer reading ``w`` inputs is cut into groups of about ``2**16 / w`` rows
#: (128 at ``w = 512``, 256 at ``w = 256``). Smaller groups cost more in per-call overhead
#: than the work they skip: on 2 CPU threads (``benchmarks/made_blocks.py``) the 256-wide MADE
#: of the NSF benchmark at d = 6 ran 7% slower (forward + backward) in groups of 128 rows than
#: as one dense product, while 512-wide ones ran 9-10% faster in groups of 128
BLOCK_WEIGHTS = 2**16

#: in-place forms, applied to a freshly computed pre-activation (no autograd node saves it):
#: one buffer fewer per layer, and memory that is already mapped
_ACTIVATIONS_INPLACE: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": torch.relu_,
    "tanh": torch.tanh_,
    "elu": lambda h: F.elu(h, inplace=True),
    "gelu": F.gelu,
    "silu": lambda h: F.silu(h, inplace=True),
}


def hidden_degrees(features: int, width: int, conditional: bool = False) -> Tensor:
    r"""Degrees of a hidden layer of ``width`` units for ``features`` inputs.

    .. math:: m(u) = m_0 + \lfloor u (d - m_0) / H \rfloor, \quad u = 0, \dots, H - 1

    non-decreasing, covering :math:`m_0, \dots, d - 1` in blocks whose sizes differ by at most
    one (when :math:`H \ge d - m_0`). :math:`m_0 = 1` for an unconditional MADE;
    :math:`m_0 = 0` for a conditional one (and for :math:`d = 1`): units of degree 0 see only
    the context, so that the outputs of the first input depend on it too.

    Example:
        >>> hidden_degrees(4, 7)
        tensor([1, 1, 1, 2, 2, 3, 3])
        >>> hidden_degrees(4, 7, conditional=True)
        tensor([0, 0, 1, 1, 2, 2, 3])
    """
    lowest = 0 if conditional or features == 1 else 1
    return lowest + torch.arange(width) * (features - lowest) // width


class _Stage(NamedTuple):
    """One hidden state of the network: ``act(W[layer] @ state[src] + b + C c + state[skip])``,
    or ``act(state[src])`` when ``layer`` is None (the pre-activation of a residual block)."""

    layer: int | None
    src: int
    act: bool
    context: int | None = None
    skip: int | None = None


class MADE(nn.Module):
    r"""Masked autoencoder for distribution estimation: a masked MLP with output shape
    ``(*batch, features, heads)`` whose ``[..., i, :]`` depends only on the inputs strictly
    before ``i`` in the ordering (and on the context).

    With ``residual=False`` the network is
    :math:`h^{l} = \sigma(W^{l} \odot M^{l} h^{l-1} + b^{l})`, :math:`h^0 = x`, followed by the
    masked output layer. With ``residual=True`` it is the residual MADE of Durkan et al.
    (2019, nflows' ``MADE(use_residual_blocks=True)``): a masked input layer, then one
    pre-activation residual block per entry of ``hidden``,

    .. math:: h \leftarrow h + W_2 \odot M\, \sigma(W_1 \odot M\, \sigma(h) + b_1) + b_2,

    whose second layer starts near zero (uniform :math:`\pm 10^{-3}`), then the masked output
    layer; all widths must then be equal (a block keeps the degrees of its input, which is what
    makes the skip connection respect the ordering).

    A context (``context_features > 0``) enters unmasked: it is an extra input connected to
    every unit of the first hidden layer (MAF's conditional MADE), and, with residual blocks,
    to the first layer of every block as in nflows. Hidden degrees then start at 0: units of
    degree 0 see the context only, and feed the outputs of the first input, which would
    otherwise be constant (as they are in nflows' conditional MADE). Each output depends on
    the context and on the inputs before it.

    The ordering is a buffer (``order``: the rank of each input, ``0..d-1``), so a
    ``state_dict`` restores it exactly; the hidden degrees and the masks are derived from it
    (non-persistent buffers) and rebuilt after ``load_state_dict``.

    Cost: :meth:`forward` is one pass. Masks are applied as one ``weight * mask`` product per
    layer per call, and hidden-to-hidden layers, whose masks are block lower-triangular
    because hidden units are sorted by degree, are evaluated in about ``w / block_size`` row
    groups that skip the zero blocks (by default groups of about ``BLOCK_WEIGHTS = 2**16``
    weights, where smaller ones cost more in per-call overhead than they skip): a 512-wide
    layer, in four groups, does 5/8 of the dense product's work, forward and backward, so a
    MADE trains slightly faster than the unmasked MLP of the same shapes. The output layer,
    whose rows follow the inputs, is split likewise into runs of consecutive inputs (about
    ``block_size`` rows each) where the order is natural or reversed (the orders of the
    registered flows): with many heads (a spline's ``3K - 1`` parameters per input) it is the
    widest layer, and this halves it.
    :meth:`autoregress`, the sequential evaluation that samples a MAF, does the
    matrix-multiply work of about half a dense pass, in :math:`d` steps of a few small
    operations per layer.

    Args:
        features: number :math:`d` of inputs (and of output groups).
        hidden: hidden widths; with ``residual=True`` one block per entry, all equal.
        heads: number of outputs per input (the parameters of an elementwise transformer).
        context_features: size of the conditioning vector (0: unconditional).
        order: ``"natural"`` (``0, ..., d-1``), ``"random"`` (a permutation drawn from
            ``seed``), or a tensor holding a permutation of ``0..d-1``: the rank of each input
            in the autoregressive ordering (input ``j`` is the ``order[j]``-th to be generated).
        residual: use residual blocks.
        activation: ``"relu"``, ``"tanh"``, ``"elu"``, ``"gelu"`` or ``"silu"``.
        seed: seed of the random ordering (the weights use torch's global generator).
        block_size: rows per group of the block-triangular evaluation (see above); ``None``:
            about ``BLOCK_WEIGHTS / v`` rows for a layer reading ``v`` inputs. Any value gives
            the same outputs and gradients.

    References:
        Germain, Gregor, Murray and Larochelle (2015), "MADE: Masked autoencoder for
        distribution estimation", arXiv:1502.03509.
        Papamakarios, Pavlakou and Murray (2017), "Masked autoregressive flow for density
        estimation", arXiv:1705.07057 (the conditional MADE).
        Durkan, Bekasov, Murray and Papamakarios (2019), "Neural spline flows",
        arXiv:1906.04032 (residual MADE).

    Example:
        >>> made = MADE(3, hidden=(8, 8), heads=2, order="random")
        >>> made(torch.randn(5, 3)).shape
        torch.Size([5, 3, 2])
        >>> made.input_degrees.sort().values
        tensor([1, 2, 3])
    """

    def __init__(
        self,
        features: int,
        hidden: Sequence[int] = (512, 512),
        heads: int = 1,
        context_features: int = 0,
        order: str | Tensor = "natural",
        residual: bool = False,
        activation: str = "relu",
        seed: int = 0,
        block_size: int | None = None,
    ):
        super().__init__()
        self.features = d = check_positive_int(features, "features")
        self._block_size = _check_block_size(block_size)
        self.heads = check_positive_int(heads, "heads")
        if isinstance(context_features, bool) or int(context_features) != context_features:
            raise PushforwardError(f"context_features must be an integer, got {context_features!r}")
        if context_features < 0:
            raise PushforwardError(f"context_features must be >= 0, got {context_features}")
        self.context_features = int(context_features)
        widths = [check_positive_int(h, "hidden width") for h in hidden]
        if not widths:
            raise PushforwardError("MADE needs at least one hidden layer")
        self.residual = bool(residual)
        if self.residual and len(set(widths)) != 1:
            raise PushforwardError(f"residual blocks need equal hidden widths, got {tuple(widths)}")
        if activation not in _ACTIVATIONS:
            raise PushforwardError(
                f"unknown activation {activation!r}; choose from {sorted(_ACTIVATIONS)}"
            )
        self.activation = activation
        self._act = _ACTIVATIONS[activation]
        self._act_fresh = _ACTIVATIONS_INPLACE[activation]
        self.register_buffer("order", _make_order(order, d, seed))

        # The network as a list of stages; state 0 is the input, state s + 1 the output of
        # stage s. forward() and autoregress() both interpret this one description.
        layers: list[nn.Linear] = []
        context_layers: list[nn.Linear] = []
        stages: list[_Stage] = []
        widths_of = [d]  # width of each state

        def linear(src: int, width: int, act: bool, context: bool, skip: int | None = None):
            layers.append(nn.Linear(widths_of[src], width))
            ctx = None
            if context and self.context_features:
                context_layers.append(nn.Linear(self.context_features, width, bias=False))
                ctx = len(context_layers) - 1
            stages.append(_Stage(len(layers) - 1, src, act, ctx, skip))
            widths_of.append(width)

        if not self.residual:
            for i, w in enumerate(widths):
                linear(len(widths_of) - 1, w, act=True, context=i == 0)
        else:
            w = widths[0]
            linear(0, w, act=False, context=True)
            for _ in widths:
                h = len(widths_of) - 1
                stages.append(_Stage(None, h, act=True))  # sigma(h)
                widths_of.append(w)
                linear(h + 1, w, act=True, context=True)
                linear(h + 2, w, act=False, context=False, skip=h)
                block_out = layers[-1]
                nn.init.uniform_(block_out.weight, -1e-3, 1e-3)
                nn.init.uniform_(block_out.bias, -1e-3, 1e-3)
        self.layers = nn.ModuleList(layers)
        self.context_layers = nn.ModuleList(context_layers)
        self.output = nn.Linear(widths_of[-1], d * self.heads)
        self._stages = tuple(stages)
        self._widths = tuple(widths_of)
        # the states each stage's forward can let go of (their last reader): without gradient
        # their memory is reused at once instead of new pages being touched
        last = {}
        for j, st in enumerate(stages):
            for s in (st.src, st.skip):
                if s is not None:
                    last[s] = j
        self._release = tuple(
            tuple(s for s, j_last in last.items() if j_last == j and s > 0)
            for j in range(len(stages))
        )
        self._build_masks()
        self.register_load_state_dict_post_hook(_rebuild_masks)

    # -- degrees and masks ---------------------------------------------------------------------

    @property
    def block_size(self) -> int | None:
        """Rows per group in the block-triangular evaluation of hidden-to-hidden layers and of
        the output layer (a layer of width ``w`` is split into about ``w / block_size`` groups;
        one group is the plain dense masked product); ``None``: about ``BLOCK_WEIGHTS / v``
        rows for a layer reading ``v`` inputs. Setting it regroups the layers."""
        return self._block_size

    @block_size.setter
    def block_size(self, value: int | None) -> None:
        self._block_size = _check_block_size(value)
        self._build_masks()

    def _group_rows(self, inputs: int) -> int:
        """Rows per group of a layer reading ``inputs`` inputs (see :attr:`block_size`)."""
        if self._block_size is not None:
            return self._block_size
        return max(1, round(BLOCK_WEIGHTS / inputs))  # inputs: a layer width, >= 1

    @property
    def input_degrees(self) -> Tensor:
        """Degree of each input, ``order + 1`` (shape ``(features,)``, values ``1..d``)."""
        return self.order + 1

    @property
    def degrees(self) -> list[Tensor]:
        """Degrees of every state of the network: the inputs, then each hidden state in order
        of computation (residual blocks add their pre-activation and inner states); hidden
        states are sorted by degree."""
        return [self.input_degrees] + [
            getattr(self, f"degrees{s}") for s in range(1, len(self._widths))
        ]

    @property
    def output_degrees(self) -> Tensor:
        """Degree of each output row of the last layer (``features * heads``, feature-major)."""
        return self.input_degrees.repeat_interleave(self.heads)

    def _build_masks(self) -> None:
        device, dtype = self.order.device, self.output.weight.dtype
        degrees = [self.input_degrees]
        for s, width in enumerate(self._widths[1:], start=1):
            deg = hidden_degrees(self.features, width, self.context_features > 0).to(device)
            degrees.append(deg)
            self.register_buffer(f"degrees{s}", deg, persistent=False)
        self._blocks: dict[int, tuple[tuple[int, int, int, int], ...]] = {}
        for j, st in enumerate(self._stages):
            if st.layer is None:
                continue
            mask = degrees[j + 1][:, None] >= degrees[st.src][None, :]
            self.register_buffer(f"mask{st.layer}", mask.to(dtype), persistent=False)
            if st.src > 0:  # hidden to hidden: both sides sorted by degree
                rows = self._group_rows(len(degrees[st.src]))
                blocks = _row_blocks(degrees[j + 1], degrees[st.src], rows)
                if len(blocks) > 1:
                    self._blocks[st.layer] = blocks
        mask = self.output_degrees[:, None] > degrees[-1][None, :]
        self.register_buffer("mask_output", mask.to(dtype), persistent=False)
        self._output_blocks = _feature_blocks(
            self.input_degrees, self.heads, degrees[-1], self._group_rows(len(degrees[-1]))
        )

    def autoregress_rows(self, dtype: torch.dtype = torch.float32) -> int:
        """Rows per chunk for :meth:`autoregress` without gradient (see
        ``AUTOREGRESS_CHUNK_BYTES``); at least 256, so the per-step overhead stays small."""
        return max(256, AUTOREGRESS_CHUNK_BYTES // (dtype.itemsize * max(self._widths)))

    def in_row_chunks(self, fn: Callable[..., Any], *rows: Tensor | None) -> Any:
        """``fn(*rows)``, or, without gradient and for more rows than :meth:`autoregress_rows`,
        ``fn`` on successive row chunks of ``rows`` (tensors of equal first dimension; None
        passes through) with the results (a tensor or a tuple of tensors) concatenated: how
        callers of :meth:`autoregress` sample large batches."""
        first = next(r for r in rows if r is not None)
        n = first.shape[0]
        size = n if torch.is_grad_enabled() else self.autoregress_rows(first.dtype)
        if n <= size:
            return fn(*rows)
        outs = [
            fn(*(None if r is None else r[i : i + size] for r in rows)) for i in range(0, n, size)
        ]
        if isinstance(outs[0], tuple):
            return tuple(torch.cat(parts) for parts in zip(*outs))
        return torch.cat(outs)

    def masked_weights(self) -> tuple[list[Tensor], Tensor]:
        """The masked weight of every hidden layer and of the output layer (one product each)."""
        hidden = [layer.weight * getattr(self, f"mask{i}") for i, layer in enumerate(self.layers)]
        return hidden, self.output.weight * self.mask_output

    # -- evaluation ----------------------------------------------------------------------------

    def forward(
        self, x: Tensor, context: Tensor | None = None, *, transposed: bool = False
    ) -> Tensor:
        """All outputs in one parallel pass: ``(*batch, features) -> (*batch, features, heads)``.

        With ``transposed``, the same values in another memory layout: the output layer's
        product is computed transposed, so the result is a view of a contiguous
        ``(features * heads, prod(batch))`` matrix, in which each parameter's values over the
        batch are contiguous (what a parameter-major transformer such as the spline reads
        fastest; the gradient comes back in that layout too, at no extra cost)."""
        check_features(x, self.features)
        c = check_context(context, self.context_features, x.shape[:-1])
        states: list[Tensor | None] = [x]
        plain = under_functorch()  # the dense products, which torch.func can trace
        for st, release in zip(self._stages, self._release):
            if st.layer is None:
                h = self._act(states[st.src])
            else:
                layer, mask = self.layers[st.layer], getattr(self, f"mask{st.layer}")
                blocks = None if plain else self._blocks.get(st.layer)
                if blocks is None:
                    h = F.linear(states[st.src], layer.weight * mask, layer.bias)
                else:
                    h = _BlockTriangularLinear.apply(
                        states[st.src], layer.weight, layer.bias, mask, blocks
                    )
                if st.context is not None:
                    h = h + F.linear(c, self.context_layers[st.context].weight)
                if st.skip is not None:
                    h = h + states[st.skip]
                if st.act:  # in place, unless h is a view (of a >2-D product)
                    h = self._act(h) if h._base is not None else self._act_fresh(h)
            for s in release:
                states[s] = None
            states.append(h)
        if self._output_blocks is not None and not plain:
            out = _BlockTriangularLinear.apply(
                states[-1], self.output.weight, self.output.bias, self.mask_output,
                self._output_blocks, transposed,
            )  # fmt: skip
        elif transposed:
            h = states[-1]
            weight = self.output.weight * self.mask_output
            out = torch.addmm(self.output.bias.unsqueeze(1), weight, h.reshape(-1, h.shape[-1]).t())
            out = out.t().reshape(*h.shape[:-1], weight.shape[0])
        else:
            out = F.linear(states[-1], self.output.weight * self.mask_output, self.output.bias)
        return out.unflatten(-1, (self.features, self.heads))

    def autoregress(
        self,
        step: Callable[[int, Tensor], Tensor],
        batch: int,
        context: Tensor | None = None,
    ) -> Tensor:
        r"""Generate the inputs one at a time, in the autoregressive order, at the cost of about
        one pass of the network.

        For :math:`k = 1, \dots, d`: the hidden units of degree :math:`k - 1` of every layer
        are computed from the already-known prefix (by degree) of the state before; then the
        outputs of the input :math:`i` of degree :math:`k` (which need only hidden units of
        degree :math:`< k`), and ``step(i, params)`` returns :math:`x_i`. A weight entry is used
        only where its mask is one, so the matrix-multiply work is that of half a dense pass;
        the Python overhead is a few small operations per layer per step. Without gradient
        tracking the states are filled in place; with it (``torch.is_grad_enabled()``), out
        of place, so that gradients through the whole loop are exact.

        Args:
            step: ``step(i, params) -> x_i`` with ``params`` of shape ``(batch, heads)`` and
                ``x_i`` of ``batch`` elements (``(batch,)`` or ``(batch, 1)``); called once per
                input, in the order.
            batch: number of rows (flatten leading batch dimensions first).
            context: ``(batch, context_features)`` when conditional.

        Returns:
            ``x`` of shape ``(batch, features)``, and by construction
            ``self(x, context)[:, i] == params`` passed to ``step`` for input ``i``.
        """
        d, heads = self.features, self.heads
        c = check_context(context, self.context_features, (batch,))
        track = torch.is_grad_enabled()
        weights, w_out = self.masked_weights()
        dtype, device = w_out.dtype, w_out.device
        rank = torch.argsort(self.order)  # rank[k] = the input generated k-th
        features = rank.tolist()
        # inputs in rank order: the first layer's columns and the output's rows follow them
        for st in self._stages:
            if st.layer is not None and st.src == 0:
                weights[st.layer] = weights[st.layer][:, rank]
        w_out = w_out.view(d, heads, -1)[rank]
        b_out = self.output.bias.view(d, heads)[rank].unsqueeze(-1)
        # per-stage bias, (width, 1) or with the context (width, batch); states are (width, batch)
        biases: list[Tensor | None] = []
        for st in self._stages:
            if st.layer is None:
                biases.append(None)
                continue
            b = self.layers[st.layer].bias.unsqueeze(-1)
            if st.context is not None:
                b = b + self.context_layers[st.context].weight @ c.transpose(0, 1)
            biases.append(b)
        # bounds[s][k] = number of units of state s with degree < k, k = 0..d + 1
        ks = torch.arange(d + 2, device=device)
        sorted_degrees = [torch.arange(1, d + 1, device=device)] + self.degrees[1:]
        bounds = [torch.searchsorted(g, ks).tolist() for g in sorted_degrees]
        # step k reads only units of degree <= k, written by then: no zero fill needed in place
        alloc = torch.zeros if track else torch.empty
        states = [alloc(w, batch, dtype=dtype, device=device) for w in self._widths]
        last = len(states) - 1

        def write(s: int, lo: int, hi: int, value: Tensor) -> None:
            if track:
                states[s] = states[s].slice_scatter(value, 0, lo, hi)
            else:
                states[s][lo:hi] = value

        for k in range(d):
            # hidden units of degree k (inputs of degree <= k are known)
            for j, st in enumerate(self._stages):
                lo, hi = bounds[j + 1][k], bounds[j + 1][k + 1]
                if lo == hi:
                    continue
                if st.layer is None:
                    write(j + 1, lo, hi, self._act(states[st.src][lo:hi]))
                    continue
                p = bounds[st.src][k + 1]
                args = (biases[j][lo:hi], weights[st.layer][lo:hi, :p], states[st.src][:p])
                if not track:  # straight into the state's rows, activated in place
                    h = torch.addmm(*args, out=states[j + 1][lo:hi])
                    if st.skip is not None:
                        h += states[st.skip][lo:hi]
                    if st.act:
                        activated = self._act_fresh(h)
                        if activated is not h:  # no in-place form (gelu)
                            h.copy_(activated)
                    continue
                h = torch.addmm(*args)
                if st.skip is not None:
                    h = h + states[st.skip][lo:hi]
                write(j + 1, lo, hi, self._act(h) if st.act else h)
            # the input of degree k + 1 (position k in rank order)
            p = bounds[last][k + 1]
            params = torch.addmm(b_out[k], w_out[k, :, :p], states[last][:p])
            value = step(features[k], params.transpose(0, 1))
            write(0, k, k + 1, value.reshape(1, batch).to(dtype))
        return states[0].transpose(0, 1)[:, self.order]


def _check_block_size(value: int | None) -> int | None:
    return None if value is None else check_positive_int(value, "block_size")


def _row_blocks(
    out_degrees: Tensor, in_degrees: Tensor, block_size: int
) -> tuple[tuple[int, int, int, int], ...]:
    """Split the rows of a hidden-to-hidden mask (both sides sorted by degree) into about
    ``len(out_degrees) / block_size`` groups cut at degree boundaries. Group ``(lo, hi, q, p)``
    needs only the input prefix ``[:p]`` (degrees up to its largest), and its mask is all ones
    on ``[:q]`` (degrees below its smallest)."""
    width = len(out_degrees)
    groups = max(1, round(width / block_size))
    out_list = out_degrees.tolist()
    starts = [u for u in range(1, width) if out_list[u] != out_list[u - 1]]  # degree changes
    cuts = [0]
    for i in range(1, groups):
        target = i * width / groups
        after = [u for u in starts if u > cuts[-1]]
        if after:
            cuts.append(min(after, key=lambda u: abs(u - target)))
    cuts = sorted(set(cuts)) + [width]
    blocks = []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        q = int(torch.searchsorted(in_degrees, out_degrees[lo], right=False))
        p = int(torch.searchsorted(in_degrees, out_degrees[hi - 1], right=True))
        blocks.append((lo, hi, q, p))
    return tuple(blocks)


def _feature_blocks(
    input_degrees: Tensor, heads: int, hidden_degrees: Tensor, block_size: int
) -> tuple[tuple[int, int, int, int], ...] | None:
    """Row groups ``(lo, hi, q, p)`` of the output layer (rows feature-major, ``heads`` per
    input; hidden units sorted by degree): runs of consecutive inputs of about ``block_size``
    rows, each needing the hidden prefix ``[:p]`` (degrees below its largest input degree),
    all ones on ``[:q]`` (below its smallest). With the natural or the reversed order a run's
    degrees are consecutive, so the groups skip about half the dense product; ``None`` where
    they would save less than a tenth of it (one group, or a random order), for the dense
    product."""
    d, width = len(input_degrees), len(hidden_degrees)
    per = max(1, round(block_size / heads))  # inputs per group
    blocks, work = [], 0
    for a in range(0, d, per):
        deg = input_degrees[a : a + per]
        q = int(torch.searchsorted(hidden_degrees, deg.min(), right=False))
        p = int(torch.searchsorted(hidden_degrees, deg.max(), right=False))
        blocks.append((a * heads, min(d, a + per) * heads, q, p))
        work += (blocks[-1][1] - blocks[-1][0]) * p
    if len(blocks) < 2 or work > 0.9 * d * heads * width:
        return None
    return tuple(blocks)


class _BlockTriangularLinear(torch.autograd.Function):
    r"""``h @ (W * M).T + b`` for a block lower-triangular mask ``M`` (hidden units sorted by
    degree), skipping the blocks that ``M`` zeroes: row group ``(lo, hi, q, p)`` multiplies only
    the input prefix ``[:p]``. With groups of about ``w / G`` rows this does a fraction
    :math:`(1 + 1/G) / 2` of the dense product's work (and of its mask product), in the forward
    pass and in both gradient products. Under ``create_graph`` the backward uses the dense
    differentiable formulas, so higher derivatives are exact too. With ``transposed`` the
    product is computed transposed, the result a view of a contiguous ``(out, rows)`` matrix
    (see :meth:`MADE.forward`)."""

    @staticmethod
    def forward(
        ctx, h: Tensor, weight: Tensor, bias: Tensor, mask: Tensor, blocks, transposed=False
    ):  # type: ignore[override]
        h2 = h.reshape(-1, h.shape[-1])
        rows, width = h2.shape[0], weight.shape[0]
        # transposed: the transpose of a contiguous (out features, rows) matrix, which BLAS
        # writes in place like a contiguous one
        out = h2.new_empty(width, rows).t() if transposed else h2.new_empty(rows, width)
        masked = []
        for lo, hi, _, p in blocks:
            wm = weight[lo:hi, :p] * mask[lo:hi, :p]
            torch.addmm(bias[lo:hi], h2[:, :p], wm.t(), out=out[:, lo:hi])
            masked.append(wm)
        ctx.blocks = blocks
        ctx.batch_shape = h.shape[:-1]
        ctx.save_for_backward(h, weight, mask, *masked)  # h itself: graph-connected
        # not a view for a 2-D input (the common case) unless transposed, so the caller may
        # activate in place
        return out if h.dim() == 2 else out.reshape(*h.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        h, weight, mask, *masked = ctx.saved_tensors
        h2, g2 = h.reshape(-1, h.shape[-1]), grad.reshape(-1, grad.shape[-1])
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        gh = gw = gb = None
        if torch.is_grad_enabled():  # create_graph: dense, differentiable
            if need_h:
                gh = (g2 @ (weight * mask)).reshape(*ctx.batch_shape, h.shape[-1])
            if need_w:
                gw = (g2.t() @ h2) * mask
        else:
            if need_h:
                # start from the group reading the longest prefix (usually the whole input)
                first = max(range(len(ctx.blocks)), key=lambda i: ctx.blocks[i][3])
                (lo, hi, _, p), wm = ctx.blocks[first], masked[first]
                if p == h2.shape[1]:
                    gh = g2[:, lo:hi] @ wm
                else:
                    gh = torch.zeros_like(h2)
                    gh[:, :p].addmm_(g2[:, lo:hi], wm)
                for i, ((lo, hi, _, p), wm) in enumerate(zip(ctx.blocks, masked)):
                    if i != first:
                        gh[:, :p].addmm_(g2[:, lo:hi], wm)
                gh = gh.reshape(*ctx.batch_shape, h.shape[-1])
            if need_w:
                gw = torch.empty_like(weight)
                for lo, hi, q, p in ctx.blocks:
                    torch.mm(g2[:, lo:hi].t(), h2[:, :p], out=gw[lo:hi, :p])
                    gw[lo:hi, q:p].mul_(mask[lo:hi, q:p])
                    gw[lo:hi, p:].zero_()
        if need_b:
            gb = g2.sum(0)
        return gh, gw, gb, None, None, None


def _rebuild_masks(module: MADE, incompatible_keys: object) -> None:
    """``load_state_dict`` post-hook: the masks follow the (possibly new) ``order`` buffer."""
    module._build_masks()


def _make_order(order: str | Tensor, features: int, seed: int) -> Tensor:
    """The rank of each input in the autoregressive ordering, a permutation of ``0..d-1``."""
    if isinstance(order, str):
        if order == "natural":
            return torch.arange(features)
        if order == "random":
            return torch.randperm(features, generator=torch.Generator().manual_seed(int(seed)))
        raise PushforwardError(
            f"unknown order {order!r}; use 'natural', 'random' or a permutation tensor"
        )
    order = torch.as_tensor(order)
    if order.dim() != 1 or order.is_floating_point() or order.is_complex():
        raise PushforwardError(
            f"order: expected a 1-D integer tensor, got shape {tuple(order.shape)} of {order.dtype}"
        )
    order = order.long().cpu()
    if order.numel() != features or not torch.equal(order.sort().values, torch.arange(features)):
        raise PushforwardError(f"order {order.tolist()} is not a permutation of 0..{features - 1}")
    return order.clone()
