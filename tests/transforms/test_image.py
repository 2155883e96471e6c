"""Image transforms beyond the contract: squeeze layout, error messages, 1x1 conv as a conv."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pushforward.core import PushforwardError
from pushforward.transforms.image import FactorOut, InvertibleConv1x1, PerPixel, Squeeze
from pushforward.transforms.linear import LULinear


def test_squeeze_channel_layout() -> None:
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    z, ladj = Squeeze().inverse(x)
    assert z.shape == (1, 4, 2, 2) and ladj.shape == (1,)
    # channel c*4 + i*2 + j holds pixel (2h + i, 2w + j)
    for i in range(2):
        for j in range(2):
            assert torch.equal(z[0, 2 * i + j], x[0, 0, i::2, j::2])
    assert torch.equal(z[0, :, 0, 0], F.pixel_unshuffle(x, 2)[0, :, 0, 0])


def test_squeeze_errors_name_the_problem() -> None:
    with pytest.raises(PushforwardError, match="multiples of 2, got 3x4"):
        Squeeze().inverse(torch.zeros(1, 1, 3, 4))
    with pytest.raises(PushforwardError, match="multiple of 4 to unsqueeze, got 3"):
        Squeeze()(torch.zeros(1, 3, 2, 2))
    with pytest.raises(PushforwardError, match=r"expected images of shape \(batch, channels"):
        Squeeze().inverse(torch.zeros(4, 4))


def test_conv1x1_equals_a_1x1_convolution() -> None:
    conv = InvertibleConv1x1(3, seed=0)
    z = torch.randn(2, 3, 5, 4)
    x, ladj = conv(z)
    lu = conv.transform
    assert isinstance(lu, LULinear)
    w = lu.weight()
    shift = lu.params(None)["shift"]
    ref = F.conv2d(z, w[:, :, None, None], shift)
    assert torch.allclose(x, ref, atol=1e-5)
    expected = 20 * torch.linalg.slogdet(w)[1]
    assert torch.allclose(ladj, expected.expand(2), atol=1e-4)


def test_wrong_channels_and_event_dims() -> None:
    with pytest.raises(PushforwardError, match=r"expected shape \(batch, 4, height, width\)"):
        FactorOut(InvertibleConv1x1(2), channels=4)(torch.zeros(1, 3, 2, 2))
    with pytest.raises(PushforwardError, match="factored must be between 1 and 3"):
        FactorOut(InvertibleConv1x1(2), channels=4, factored=4)
    with pytest.raises(PushforwardError, match="needs an image transform"):
        FactorOut(LULinear(2), channels=4)
    with pytest.raises(PushforwardError, match="needs a vector transform"):
        PerPixel(Squeeze())


def test_leading_batch_shapes() -> None:
    t = FactorOut(InvertibleConv1x1(2, seed=0), channels=4)
    z = torch.randn(2, 3, 4, 2, 2)
    x, ladj = t(z)
    assert x.shape == z.shape and ladj.shape == (2, 3)
    x2, _ = t(z.reshape(6, 4, 2, 2))
    assert torch.allclose(x2.reshape(x.shape), x, atol=1e-6)
