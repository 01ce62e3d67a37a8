"""The pure maths of unitary_rnn.parametrizations: Haar sampling, the restricted product, modReLU."""

import math

import pytest
import torch

from unitary_rnn.manifold import unitarity_error
from unitary_rnn.parametrizations import (
    modrelu,
    modrelu_grouped,
    random_restricted_parameters,
    random_unitary,
    real_modrelu,
    reflection_apply,
    restricted_unitary_apply,
    restricted_unitary_matrix,
)


@pytest.mark.parametrize("dtype,tol", [(torch.complex64, 1e-5), (torch.complex128, 1e-12), (torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_random_unitary_is_unitary(dtype, tol):
    g = torch.Generator().manual_seed(0)
    W = random_unitary(32, generator=g, dtype=dtype)
    assert W.dtype == dtype and W.shape == (32, 32)
    assert unitarity_error(W) < tol


def test_random_unitary_seeded_and_haar_phases():
    a = random_unitary(8, generator=torch.Generator().manual_seed(3))
    b = random_unitary(8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    # Haar: the eigenphases of a Haar unitary are spread over the whole circle, and the mean of tr(W)
    # over many draws is 0 (E|tr W|^2 = 1); plain QR without the phase fix is biased toward +1.
    g = torch.Generator().manual_seed(1)
    traces = torch.stack([random_unitary(6, generator=g, dtype=torch.complex128).trace() for _ in range(2000)])
    assert traces.mean().abs() < 0.1
    assert abs(traces.abs().square().mean().item() - 1.0) < 0.15


def _restricted(n, dtype=torch.float64, seed=0):
    return random_restricted_parameters(n, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_restricted_parameter_count_is_7n():
    p = _restricted(10)
    assert sum(t.numel() for k, t in p.items() if k != "permutation") == 7 * 10
    assert p["permutation"].dtype == torch.long and sorted(p["permutation"].tolist()) == list(range(10))


@pytest.mark.parametrize("n", [1, 2, 7, 16, 33])
def test_restricted_matrix_equals_apply_and_is_unitary(n):
    p = _restricted(n)
    W = restricted_unitary_matrix(**p)
    assert W.shape == (n, n) and W.dtype == torch.complex128
    assert unitarity_error(W) < 1e-12
    h = torch.randn(5, 3, n, dtype=torch.complex128, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(restricted_unitary_apply(h, **p), h @ W.T, rtol=1e-12, atol=1e-12)
    # real input rows are accepted (the input of a cell is real)
    x = torch.randn(4, n, dtype=torch.float64)
    torch.testing.assert_close(restricted_unitary_apply(x, **p), x.to(torch.complex128) @ W.T)


def test_restricted_matrix_matches_the_written_product():
    """W = D3 R2 F^-1 D2 Pi R1 F D1 built from explicit dense factors."""
    n = 6
    p = _restricted(n)
    D = [torch.diag(torch.exp(1j * p[f"theta{k}"].to(torch.complex128))) for k in (1, 2, 3)]
    idx = torch.arange(n, dtype=torch.float64)
    F = torch.exp(-2j * math.pi * torch.outer(idx, idx) / n) / math.sqrt(n)

    def R(v):
        v = torch.complex(v[0], v[1]).unsqueeze(1)
        return torch.eye(n, dtype=torch.complex128) - 2 * (v @ v.mH) / (v.mH @ v)

    Pi = torch.eye(n, dtype=torch.complex128)[p["permutation"]]
    expected = D[2] @ R(p["reflection2"]) @ F.mH @ D[1] @ Pi @ R(p["reflection1"]) @ F @ D[0]
    torch.testing.assert_close(restricted_unitary_matrix(**p), expected, rtol=1e-12, atol=1e-12)


def test_restricted_accepts_complex_reflections():
    p = _restricted(8)
    q = dict(p, reflection1=torch.complex(p["reflection1"][0], p["reflection1"][1]))
    torch.testing.assert_close(restricted_unitary_matrix(**p), restricted_unitary_matrix(**q))
    with pytest.raises(ValueError, match=r"\(2, N\)"):
        restricted_unitary_matrix(**dict(p, reflection1=p["reflection1"].T))


def test_restricted_jacobian_with_torch_func():
    """The capacity checker differentiates theta -> W with torch.func: every real parameter must get a column."""
    n = 5
    p = _restricted(n)
    names = ["theta1", "theta2", "theta3", "reflection1", "reflection2"]
    flat = torch.cat([p[k].reshape(-1) for k in names])
    shapes = [p[k].shape for k in names]

    def w_of(theta):
        parts, i = {}, 0
        for k, s in zip(names, shapes):
            m = math.prod(s)
            parts[k] = theta[i : i + m].reshape(s)
            i += m
        return torch.view_as_real(restricted_unitary_matrix(**parts, permutation=p["permutation"])).reshape(-1)

    J = torch.func.jacrev(w_of)(flat)
    assert J.shape == (2 * n * n, 7 * n)
    assert torch.isfinite(J).all()
    assert torch.linalg.matrix_rank(J) > 3 * n  # every factor contributes


def test_reflection_is_identity_and_nan_free_at_zero():
    h = torch.randn(3, 4, dtype=torch.complex128)
    v = torch.zeros(2, 4, dtype=torch.float64, requires_grad=True)
    out = reflection_apply(h, v)
    torch.testing.assert_close(out, h)
    torch.view_as_real(out).sum().backward()
    assert torch.isfinite(v.grad).all()


def test_reflection_is_unitary_and_involutive():
    v = torch.randn(2, 7, dtype=torch.float64)
    R = reflection_apply(torch.eye(7, dtype=torch.complex128), v).T
    assert unitarity_error(R) < 1e-12
    torch.testing.assert_close(R @ R, torch.eye(7, dtype=torch.complex128))


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_modrelu_nan_free_at_zero_forward_and_backward(dtype):
    z = torch.zeros(2, 5, dtype=dtype, requires_grad=True)
    b = torch.tensor([-1.0, -1e-3, 0.0, 1e-3, 1.0], dtype=z.real.dtype, requires_grad=True)
    out = modrelu(z, b)
    assert torch.equal(out, torch.zeros_like(out))
    (torch.view_as_real(out).sum() + (out.real * out.imag).sum()).backward()
    assert torch.isfinite(torch.view_as_real(z.grad)).all() and torch.isfinite(b.grad).all()


def test_modrelu_values():
    z = torch.tensor([3 + 4j, 3 + 4j, -0.6 + 0.8j], dtype=torch.complex128)
    b = torch.tensor([1.0, -6.0, 0.5], dtype=torch.float64)
    out = modrelu(z, b, eps=0.0)
    expected = torch.tensor([(3 + 4j) * 6 / 5, 0, (-0.6 + 0.8j) * 1.5], dtype=torch.complex128)
    torch.testing.assert_close(out, expected)
    with pytest.raises(TypeError, match="real_modrelu"):
        modrelu(z.real, b)


def test_modrelu_grouped_matches_complex_and_real():
    z = torch.randn(4, 6, dtype=torch.complex128)
    b = torch.randn(6, dtype=torch.float64)
    pairs = torch.stack([z.real, z.imag], dim=-2)
    out = modrelu_grouped(pairs, b)
    ref = modrelu(z, b)
    torch.testing.assert_close(out[..., 0, :], ref.real)
    torch.testing.assert_close(out[..., 1, :], ref.imag)
    x = torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(modrelu_grouped(x.unsqueeze(-2), b).squeeze(-2), real_modrelu(x, b))


def test_real_modrelu_is_sign_relu_and_nan_free():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([-1.0, 1.0, 1.0, -1.0, 0.5], dtype=torch.float64, requires_grad=True)
    out = real_modrelu(x, b, eps=0.0 + 1e-30)
    torch.testing.assert_close(out, torch.sign(x) * torch.relu(x.abs() + b))
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(b.grad).all()
    x0 = torch.zeros(3, requires_grad=True)
    real_modrelu(x0, torch.ones(3)).sum().backward()
    assert torch.isfinite(x0.grad).all()
