"""UnitaryLinear / OrthogonalLinear: nn.Linear semantics, manifold tags, norm preservation, training with the
projUNN and Cayley steps through UnitaryOptimizer, safetensors round trip, errors."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from unitary_rnn.layers import OrthogonalLinear, UnitaryLinear
from unitary_rnn.manifold import manifold_of, unitarity_error
from unitary_rnn.training.optim import create_optimizer
from unitary_rnn.training.projunn import projunn_tangent_step

pytestmark = pytest.mark.filterwarnings("ignore:Complex modules are a new feature")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    "cls, dtype, manifold",
    [(UnitaryLinear, torch.complex64, "unitary"), (UnitaryLinear, torch.complex128, "unitary"),
     (OrthogonalLinear, torch.float32, "orthogonal"), (OrthogonalLinear, torch.float64, "orthogonal")],
)
@pytest.mark.parametrize("init", ["haar", "identity"])
def test_weight_is_tagged_and_on_the_manifold(cls, dtype, manifold, init):
    layer = cls(12, dtype=dtype, init=init, generator=_gen())
    assert manifold_of(layer.weight) == manifold
    assert layer.weight.dtype == layer.bias.dtype == dtype
    assert layer.in_features == layer.out_features == 12
    tol = 1e-12 if dtype in (torch.float64, torch.complex128) else 1e-5
    assert unitarity_error(layer.weight) < tol
    assert torch.count_nonzero(layer.bias) == 0
    if init == "identity":
        assert torch.equal(layer.weight.detach(), torch.eye(12, dtype=dtype))
    assert "features=12" in repr(layer)


def test_default_dtypes_and_no_bias():
    assert UnitaryLinear(4).weight.dtype == torch.complex64
    assert OrthogonalLinear(4).weight.dtype == torch.get_default_dtype()
    assert UnitaryLinear(4, bias=False).bias is None
    assert len(list(OrthogonalLinear(4, bias=False).parameters())) == 1


@pytest.mark.parametrize("cls, dtype", [(UnitaryLinear, torch.complex128), (OrthogonalLinear, torch.float64)])
def test_forward_is_nn_linear_and_preserves_norms(cls, dtype):
    layer = cls(8, dtype=dtype, generator=_gen(1))
    with torch.no_grad():
        layer.bias.copy_(torch.randn(8, dtype=dtype, generator=_gen(2)))
    ref = nn.Linear(8, 8, dtype=dtype)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(3, 5, 8, dtype=dtype, generator=_gen(3))
    torch.testing.assert_close(layer(x), ref(x), atol=1e-12, rtol=0)
    no_bias = cls(8, bias=False, dtype=dtype, generator=_gen(1))
    torch.testing.assert_close(torch.linalg.vector_norm(no_bias(x), dim=-1), torch.linalg.vector_norm(x, dim=-1), atol=1e-12, rtol=0)


def test_unitary_linear_promotes_real_input():
    layer = UnitaryLinear(5, dtype=torch.complex128, generator=_gen())
    x = torch.randn(2, 5, dtype=torch.float64)
    torch.testing.assert_close(layer(x), layer(x.to(torch.complex128)), atol=0, rtol=0)


@pytest.mark.parametrize("method", ["projunn_t", "projunn_d", "cayley"])
@pytest.mark.parametrize("field", ["real", "complex"])
def test_deep_network_trains_through_unitary_optimizer(method, field):
    """A 4-layer feed-forward net of manifold layers fits a random teacher; weights stay on the manifold."""
    torch.manual_seed(0)
    n = 16
    if field == "real":
        layers = [OrthogonalLinear(n, generator=_gen(i)) for i in range(4)]
        act = nn.Tanh
    else:
        layers = [UnitaryLinear(n, generator=_gen(i)) for i in range(4)]
        act = None
    body = []
    for i, layer in enumerate(layers):
        body.append(layer)
        if act is not None and i < len(layers) - 1:
            body.append(act())
    model = nn.Sequential(*body)
    X = torch.randn(256, n, generator=_gen(10))
    teacher = torch.randn(n, 1, generator=_gen(11)) / n**0.5

    def loss_fn():
        out = model(X)
        out = out.abs() if out.is_complex() else out
        return (out @ teacher - torch.sin(X @ teacher)).square().mean()

    opt = create_optimizer(model, method=method, rank=1, unitary_lr=0.05, lr=1e-2, base_optimizer="adam")
    start = [layer.weight.detach().clone() for layer in layers]
    first = loss_fn().item()
    for _ in range(150):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    assert loss_fn().item() < 0.5 * first
    for layer, w0 in zip(layers, start):
        assert unitarity_error(layer.weight.detach()) < 1e-4
        assert torch.linalg.matrix_norm(layer.weight.detach() - w0) > 0.1  # the manifold step did the work too


def test_layer_trained_by_projunn_functions_directly():
    """Without the optimizer: W.grad from autograd, W <- projUNN-T step, the output approaches a target map."""
    layer = OrthogonalLinear(10, bias=False, dtype=torch.float64, generator=_gen(0))
    target = OrthogonalLinear(10, bias=False, dtype=torch.float64, generator=_gen(1)).weight.detach()
    if torch.linalg.det(target) * torch.linalg.det(layer.weight.detach()) < 0:
        target = target * torch.tensor([-1.0] + [1.0] * 9, dtype=torch.float64)
    X = torch.randn(128, 10, dtype=torch.float64, generator=_gen(2))
    losses = []
    for _ in range(400):
        layer.zero_grad()
        loss = (layer(X) - X @ target.T).square().sum(-1).mean()
        loss.backward()
        losses.append(loss.item())
        with torch.no_grad():
            layer.weight.copy_(projunn_tangent_step(layer.weight, layer.weight.grad, 0.05, 1, "column", generator=_gen()))
    assert losses[-1] < 1e-3 * losses[0]
    assert unitarity_error(layer.weight.detach()) < 1e-12


def test_safetensors_round_trip_and_dtype_change_keep_the_tag(tmp_path):
    layer = UnitaryLinear(6, generator=_gen())
    path = tmp_path / "layer.safetensors"
    save_file(layer.state_dict(), path)
    other = UnitaryLinear(6, generator=_gen(5))
    other.load_state_dict(load_file(path))
    assert torch.equal(other.weight, layer.weight) and manifold_of(other.weight) == "unitary"
    other.to(torch.complex128)
    assert other.weight.dtype == torch.complex128 and manifold_of(other.weight) == "unitary"


def test_bad_arguments():
    with pytest.raises(TypeError, match="complex dtype"):
        UnitaryLinear(4, dtype=torch.float32)
    with pytest.raises(TypeError, match="real floating dtype"):
        OrthogonalLinear(4, dtype=torch.complex64)
    with pytest.raises(ValueError, match="features"):
        OrthogonalLinear(0)
    with pytest.raises(ValueError, match="init"):
        OrthogonalLinear(4, init="zeros")
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\)"):
        OrthogonalLinear(4)(torch.randn(2, 5))
    with pytest.raises(TypeError, match="UnitaryLinear"):
        OrthogonalLinear(4)(torch.randn(2, 4, dtype=torch.complex64))
