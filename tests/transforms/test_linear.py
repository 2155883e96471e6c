"""Unit tests of the linear family and Householder reflections beyond the shared contract."""

from __future__ import annotations

import doctest

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import pushforward.transforms.householder as householder_module
import pushforward.transforms.linear as linear_module
from pushforward.core import PushforwardError
from pushforward.transforms.householder import Householder, householder_apply, householder_product
from pushforward.transforms.linear import (
    ActNorm,
    ConvexCombinationLinear,
    ElementwiseAffine,
    FullAffine,
    LULinear,
    Permutation,
    Standardization,
    TriangularLinear,
)

pytestmark = pytest.mark.usefixtures("float64_seeded")


# ActNorm ------------------------------------------------------------------------------------


@pytest.mark.parametrize("event_dim, shape", [(1, (256, 4)), (3, (32, 3, 5, 5))])
def test_actnorm_first_inverse_standardises_and_is_not_redone(event_dim, shape):
    t = ActNorm(shape[1], event_dim=event_dim)
    x = 3.0 + 2.0 * torch.randn(*shape) * torch.arange(1.0, shape[1] + 1).view(
        shape[1], *([1] * (event_dim - 1))
    )
    t(torch.randn(*shape))  # forward never initialises
    assert not t.initialized
    z, _ = t.inverse(x)
    assert t.initialized
    dims = [0, *range(2, len(shape))]
    torch.testing.assert_close(z.mean(dims), torch.zeros(shape[1]), atol=1e-10, rtol=0)
    torch.testing.assert_close(z.var(dims, unbiased=False), torch.ones(shape[1]))
    before = {k: v.clone() for k, v in t.state_dict().items()}
    t.inverse(5 * x + 7)  # a later batch does not re-initialise
    for k, v in t.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)


def test_actnorm_eval_mode_does_not_initialise():
    t = ActNorm(2).eval()
    z, _ = t.inverse(torch.randn(10, 2) + 4)
    assert not t.initialized


def test_actnorm_initialised_state_survives_save_load():
    t = ActNorm(3)
    t.inverse(torch.randn(64, 3) * 4 + 1)
    t2 = ActNorm(3)
    t2.load_state_dict(st_load(st_save(t.state_dict())))
    assert t2.initialized
    x = torch.randn(8, 3)
    torch.testing.assert_close(t2.inverse(x)[0], t.inverse(x)[0])  # training mode: no re-init


def test_actnorm_image_ladj_counts_every_pixel():
    t = ActNorm(2, event_dim=3)
    with torch.no_grad():
        t.log_scale.copy_(torch.tensor([0.5, -0.2]))
    _, ladj = t(torch.randn(4, 2, 3, 5))
    torch.testing.assert_close(ladj, torch.full((4,), 15 * 0.3))


# LU, triangular, full affine ------------------------------------------------------------------


@pytest.mark.parametrize("context_features", [0, 2])
def test_lu_dense_weight_matches_the_map(context_features):
    t = LULinear(5, context_features=context_features, seed=3)
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.2 * torch.randn_like(p))
    c = torch.randn(7, 2) if context_features else None
    z = torch.randn(7, 5)
    x, ladj = t(z, c)
    w = t.weight(c)
    shift = t.params(c)["shift"]
    expected = (w @ z.unsqueeze(-1)).squeeze(-1) if context_features else z @ w.T
    torch.testing.assert_close(x, expected + shift)
    torch.testing.assert_close(ladj, torch.linalg.slogdet(w)[1].expand(7))


def test_lu_starts_at_a_rotation_fixed_by_its_seed():
    w = LULinear(4, seed=1).weight().detach()
    torch.testing.assert_close(w @ w.T, torch.eye(4))
    torch.testing.assert_close(LULinear(4, seed=1).weight().detach(), w)
    assert not torch.allclose(LULinear(4, seed=2).weight().detach(), w)


@pytest.mark.parametrize("lower", [True, False])
def test_triangular_matrix_is_triangular_and_matches_the_map(lower):
    t = TriangularLinear(4, lower=lower)
    with torch.no_grad():
        for p in t.parameters():
            p.add_(torch.randn_like(p))
    m = t.matrix().detach()
    other = m.triu(1) if lower else m.tril(-1)
    assert (other == 0).all() and (m.diagonal() > 0).all()
    z = torch.randn(3, 4)
    torch.testing.assert_close(t(z)[0], z @ m.T + t.params()["shift"])


@pytest.mark.parametrize(
    "make",
    [
        lambda: ElementwiseAffine(3),
        lambda: FullAffine(3),
        lambda: TriangularLinear(3),
        lambda: TriangularLinear(3, context_features=2),
        lambda: FullAffine(3, context_features=2),
    ],
)
def test_identity_at_initialisation(make):
    t = make()
    c = torch.randn(5, 2) if getattr(t.params, "net", None) is not None else None
    z = torch.randn(5, 3)
    x, ladj = t(z, c)
    torch.testing.assert_close(x, z)
    torch.testing.assert_close(ladj, torch.zeros(5))


# Permutation --------------------------------------------------------------------------------


def test_random_permutation_is_a_reproducible_permutation():
    p = Permutation.random(10, seed=4).perm
    assert sorted(p.tolist()) == list(range(10))
    assert torch.equal(Permutation.random(10, seed=4).perm, p)
    assert not torch.equal(Permutation.random(10, seed=5).perm, p)
    assert Permutation.reverse(4).perm.tolist() == [3, 2, 1, 0]


def test_permutation_rejects_a_non_permutation():
    with pytest.raises(PushforwardError, match="not a permutation"):
        Permutation(torch.tensor([0, 0, 2]))


def test_permutation_of_channels():
    t = Permutation(torch.tensor([2, 0, 1]), event_dim=3)
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(t(x)[0], x[:, [2, 0, 1]])


# Householder --------------------------------------------------------------------------------


def test_householder_product_is_orthogonal_and_matches_sequential_reflections():
    v = torch.randn(2, 3, 4, 6)  # batch (2, 3), k = 4 reflections in 6 dimensions
    q = householder_product(v)
    assert q.shape == (2, 3, 6, 6)
    torch.testing.assert_close(q @ q.mT, torch.eye(6).expand(2, 3, 6, 6))
    z = torch.randn(2, 3, 6)
    sequential = z
    for i in range(4):  # H_4 H_3 H_2 H_1 z, straight from the definition
        vi = v[..., i, :, None]
        h = torch.eye(6) - 2 * vi @ vi.mT / (vi.mT @ vi)
        sequential = (h @ sequential.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close((q @ z.unsqueeze(-1)).squeeze(-1), sequential)
    torch.testing.assert_close(householder_apply(z, v), sequential)
    torch.testing.assert_close(householder_apply(sequential, v, transpose=True), z)


def test_householder_layer_matches_its_matrix_and_zero_vector_is_identity():
    t = Householder(5, reflections=3)
    z = torch.randn(4, 5)
    torch.testing.assert_close(t(z)[0], z @ t.matrix().detach().T)
    torch.testing.assert_close(householder_apply(z, torch.zeros(1, 5)), z)


def test_householder_product_rejects_a_vector():
    with pytest.raises(PushforwardError, match=r"\(\.\.\., k, d\)"):
        householder_product(torch.randn(5))


# Standardization -----------------------------------------------------------------------------


def test_standardization_from_data_handles_constant_columns():
    data = torch.stack([torch.randn(50) * 3 + 1, torch.full((50,), 2.5)], -1)
    t = Standardization.from_data(data)
    z, ladj = t.inverse(data)
    assert torch.isfinite(z).all() and torch.isfinite(ladj).all()
    torch.testing.assert_close(z[:, 1], torch.zeros(50))
    torch.testing.assert_close(z[:, 0].mean(), torch.tensor(0.0))
    torch.testing.assert_close(z[:, 0].std(unbiased=False), torch.tensor(1.0))
    torch.testing.assert_close(t.forward(z)[0], data)


def test_standardization_per_channel_of_images():
    t = Standardization(
        torch.tensor([1.0, 2.0]).view(2, 1, 1), torch.tensor([2.0, 4.0]).view(2, 1, 1)
    )
    assert t.event_dim == 3
    x, ladj = t(torch.zeros(3, 2, 4, 5))
    torch.testing.assert_close(x[:, 1], torch.full((3, 4, 5), 2.0))
    torch.testing.assert_close(ladj, torch.full((3,), 20 * (torch.log(torch.tensor(8.0)).item())))


def test_standardization_rejects_non_positive_scale():
    with pytest.raises(PushforwardError, match="positive"):
        Standardization(torch.zeros(2), torch.tensor([1.0, 0.0]))


# ccLinIAF ------------------------------------------------------------------------------------


@pytest.mark.parametrize("context_features", [0, 3])
def test_cc_linear_weights_are_convex_and_matrix_unit_lower_triangular(context_features):
    t = ConvexCombinationLinear(4, components=5, context_features=context_features)
    with torch.no_grad():
        for p in t.parameters():
            p.add_(torch.randn_like(p))
    c = torch.randn(6, 3) if context_features else None
    y = t.weights(c).detach()
    assert (y > 0).all()
    torch.testing.assert_close(y.sum(-1), torch.ones(y.shape[:-1]))
    m = t.matrix(c).detach()
    assert (m.triu(1) == 0).all()
    torch.testing.assert_close(m.diagonal(dim1=-2, dim2=-1), torch.ones(*m.shape[:-2], 4))
    z = torch.randn(6, 4)
    expected = (m @ z.unsqueeze(-1)).squeeze(-1) if context_features else z @ m.T
    torch.testing.assert_close(t(z, c)[0], expected)


# errors ----------------------------------------------------------------------------------------

_WRONG_SIZE = [
    ElementwiseAffine(3),
    FullAffine(3),
    TriangularLinear(3),
    LULinear(3),
    Permutation.reverse(3),
    Householder(3),
    ConvexCombinationLinear(3),
    ActNorm(3),
    Standardization(torch.zeros(3), torch.ones(3)),
]


@pytest.mark.parametrize("t", _WRONG_SIZE, ids=lambda t: type(t).__name__)
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_wrong_size_input_is_a_clear_error(t, direction):
    with pytest.raises(PushforwardError, match=r"expected .*got \(5, 4\)"):
        getattr(t, direction)(torch.randn(5, 4))


def test_wrong_image_shape_is_a_clear_error():
    with pytest.raises(PushforwardError, match=r"expected shape \(batch, 3, height, width\)"):
        ActNorm(3, event_dim=3).inverse(torch.randn(2, 4, 5, 5))


@pytest.mark.parametrize("bad", [0, -2, 2.5, True])
def test_bad_sizes_are_clear_errors(bad):
    with pytest.raises(PushforwardError, match="positive integer"):
        ElementwiseAffine(bad)
    with pytest.raises(PushforwardError, match="positive integer"):
        Householder(3, reflections=bad)


def test_docstring_examples_run():
    for module in (linear_module, householder_module):
        result = doctest.testmod(module, extraglobs={"torch": torch}, report=False)
        assert result.attempted > 0 and result.failed == 0, f"{module.__name__}: {result}"


def test_batchnorm_training_uses_batch_statistics_and_eval_the_running_ones() -> None:
    from pushforward.transforms.linear import BatchNorm

    torch.manual_seed(0)
    t = BatchNorm(3, momentum=1.0)
    x = 4.0 + 3.0 * torch.randn(512, 3)
    z, ladj = t.inverse(x)  # training mode
    assert torch.allclose(z.mean(0), torch.zeros(3), atol=1e-5)
    assert torch.allclose(z.std(0, unbiased=False), torch.ones(3), atol=1e-3)
    expected = -0.5 * torch.log(x.var(0, unbiased=False) + t.eps).sum()
    assert torch.allclose(ladj, expected.expand(512), atol=1e-5)
    t.eval()  # momentum 1: the running statistics are those of the last batch
    z2, _ = t.inverse(x)
    assert torch.allclose(z2, z, atol=1e-5)
    x2, _ = t(z2)
    assert torch.allclose(x2, x, atol=1e-4)
