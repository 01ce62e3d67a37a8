"""projUNN-D / projUNN-T (unitary_rnn.training.projunn) against dense references, edge cases, drift and descent."""

import pytest
import torch

from unitary_rnn.manifold import project_to_unitary, unitarity_error
from unitary_rnn.training.projunn import (
    expm_low_rank_tangent,
    low_rank_approximation,
    polar_low_rank_update,
    projunn_direct_step,
    projunn_tangent_step,
)

DTYPES64 = [torch.complex128, torch.float64]
DTYPES = [torch.complex64, torch.float32, torch.complex128, torch.float64]
STEPS = [projunn_direct_step, projunn_tangent_step]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _unitary(n, dtype, seed=0):
    return project_to_unitary(torch.randn(n, n, dtype=dtype, generator=_gen(seed)))


def _skew(X):
    return (X - X.mH) / 2


def _dense_direct(W, a, b, lr):
    """polar(W - lr a b^H) by a full SVD."""
    return project_to_unitary(W - lr * a @ b.mH)


def _dense_tangent(W, a, b, lr):
    """W exp(-lr skew(W^H a b^H)) by matrix_exp."""
    return W @ torch.linalg.matrix_exp(-lr * _skew(W.mH @ a @ b.mH))


def _tol(dtype):
    return 1e-10 if dtype in (torch.float64, torch.complex128) else 1e-4


# ---------------------------------------------------------------------------------------------------------------------
# exact against dense references (float64, 1e-10)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES64)
@pytest.mark.parametrize("sampling", ["exact", "lsi", "column"])
@pytest.mark.parametrize("rank", [1, 3, 8])
@pytest.mark.parametrize("lr", [1e-3, 0.3, 2.0])
def test_steps_match_dense_references(dtype, sampling, rank, lr):
    n = 16
    W, G = _unitary(n, dtype), torch.randn(n, n, dtype=dtype, generator=_gen(1))
    a, b = low_rank_approximation(G, rank, sampling, generator=_gen(2))
    direct = projunn_direct_step(W, G, lr, rank, sampling, generator=_gen(2))
    tangent = projunn_tangent_step(W, G, lr, rank, sampling, generator=_gen(2))
    torch.testing.assert_close(direct, _dense_direct(W, a, b, lr), atol=1e-10, rtol=0)
    torch.testing.assert_close(tangent, _dense_tangent(W, a, b, lr), atol=1e-10, rtol=0)
    assert unitarity_error(direct) < 1e-12 and unitarity_error(tangent) < 1e-12


@pytest.mark.parametrize("dtype", DTYPES64)
def test_rank_above_half_n(dtype):
    """2k > N: the subspace [W^H a, b] is all of C^N and the QR is square; still exact."""
    n, rank, lr = 6, 5, 0.7
    W, G = _unitary(n, dtype), torch.randn(n, n, dtype=dtype, generator=_gen(1))
    a, b = low_rank_approximation(G, rank, "exact")
    torch.testing.assert_close(projunn_direct_step(W, G, lr, rank, "exact"), _dense_direct(W, a, b, lr), atol=1e-10, rtol=0)
    torch.testing.assert_close(projunn_tangent_step(W, G, lr, rank, "exact"), _dense_tangent(W, a, b, lr), atol=1e-10, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES64)
def test_full_rank_direct_step_is_the_polar_factor_of_the_euclidean_step(dtype):
    """At k = N the rank-k approximation is G itself: projUNN-D is polar(W - lr G), projUNN-T the full geodesic."""
    n, lr = 8, 0.2
    W, G = _unitary(n, dtype), torch.randn(n, n, dtype=dtype, generator=_gen(1))
    torch.testing.assert_close(projunn_direct_step(W, G, lr, n, "exact"), project_to_unitary(W - lr * G), atol=1e-10, rtol=0)
    expected = W @ torch.linalg.matrix_exp(-lr * _skew(W.mH @ G))
    torch.testing.assert_close(projunn_tangent_step(W, G, lr, n, "lsi", generator=_gen()), expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES64)
def test_low_level_updates_match_dense(dtype):
    n, k = 10, 2
    W = _unitary(n, dtype)
    A, B = (torch.randn(n, k, dtype=dtype, generator=_gen(s)) for s in (3, 4))
    torch.testing.assert_close(polar_low_rank_update(W, A, B), project_to_unitary(W + A @ B.mH), atol=1e-10, rtol=0)
    expected = W @ torch.linalg.matrix_exp(_skew(W.mH @ A @ B.mH))
    torch.testing.assert_close(expm_low_rank_tangent(W, A, B), expected, atol=1e-10, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# low-rank approximation
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES64)
@pytest.mark.parametrize("sampling", ["lsi", "column", "exact"])
@pytest.mark.parametrize("rank", [1, 2, 5])
def test_exactly_rank_k_gradient_is_reproduced(dtype, sampling, rank):
    """A generic rank-k G: k Gaussian probes (lsi) or k distinct sampled columns (column) span its range."""
    n = 20
    for seed in range(5):
        G = torch.randn(n, rank, dtype=dtype, generator=_gen(seed)) @ torch.randn(rank, n, dtype=dtype, generator=_gen(seed + 100))
        a, b = low_rank_approximation(G, rank, sampling, generator=_gen(seed))
        assert a.shape == b.shape == (n, rank)
        torch.testing.assert_close(a @ b.mH, G, atol=1e-10 * G.abs().max().item(), rtol=0)


@pytest.mark.parametrize("sampling", ["lsi", "column"])
def test_rank_k_gradient_makes_sampled_steps_equal_exact_steps(sampling):
    n, rank, lr, dtype = 16, 2, 0.4, torch.complex128
    W = _unitary(n, dtype)
    G = torch.randn(n, rank, dtype=dtype, generator=_gen(5)) @ torch.randn(rank, n, dtype=dtype, generator=_gen(6))
    for step in STEPS:
        torch.testing.assert_close(step(W, G, lr, rank, sampling, generator=_gen()), step(W, G, lr, rank, "exact"), atol=1e-10, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES64)
def test_lsi_oversampling_approaches_the_best_rank_k(dtype):
    n, rank = 32, 2
    G = torch.randn(n, n, dtype=dtype, generator=_gen(7))
    best = torch.linalg.matrix_norm(G - (lambda ab: ab[0] @ ab[1].mH)(low_rank_approximation(G, rank, "exact")))
    errs = []
    for p in (0, 10, n - rank):
        a, b = low_rank_approximation(G, rank, "lsi", generator=_gen(8), oversample=p)
        errs.append(torch.linalg.matrix_norm(G - a @ b.mH).item())
    assert errs[0] >= errs[1] >= best.item() - 1e-12
    assert errs[2] == pytest.approx(best.item(), abs=1e-10)  # probes span everything: truncated SVD


def test_column_sampling_prefers_heavy_columns_and_handles_few_nonzero_columns():
    n = 12
    G = torch.zeros(n, n, dtype=torch.float64)
    G[:, 3] = torch.randn(n, dtype=torch.float64, generator=_gen(0))
    a, b = low_rank_approximation(G, 4, "column", generator=_gen(1))  # only one non-zero column for rank 4
    assert a.shape == (n, 4)
    torch.testing.assert_close(a @ b.mH, G, atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# zero, rank-deficient and tiny updates
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sampling", ["lsi", "column", "exact"])
@pytest.mark.parametrize("step", STEPS)
def test_zero_gradient_leaves_w_unchanged(dtype, sampling, step):
    n = 9
    W = _unitary(n, dtype)
    out = step(W, torch.zeros_like(W), 0.5, 3, sampling, generator=_gen())
    assert torch.equal(out, W)
    assert torch.equal(step(W, torch.randn(n, n, dtype=dtype), 0.0, 2, sampling, generator=_gen()), W)  # lr = 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("update", [polar_low_rank_update, expm_low_rank_tangent])
def test_zero_factors_leave_w_unchanged(dtype, update):
    n, k = 8, 2
    W = _unitary(n, dtype)
    B = torch.randn(n, k, dtype=dtype, generator=_gen(1))
    zeros = torch.zeros(n, k, dtype=dtype)
    for A_, B_ in ((zeros, B), (B, zeros), (zeros, zeros)):
        assert torch.equal(update(W, A_, B_), W)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("update", [polar_low_rank_update, expm_low_rank_tangent])
def test_rank_deficient_factors(dtype, update):
    """a b^H of rank 1 written with k = 3 (repeated / parallel / zero columns) equals the k = 1 update."""
    n = 10
    W = _unitary(n, dtype)
    u, v = (0.3 * torch.randn(n, 1, dtype=dtype, generator=_gen(s)) for s in (1, 2))
    A = torch.cat([u, 2 * u, torch.zeros_like(u)], dim=1)
    B = torch.cat([v / 3, v / 3, v], dim=1)  # A B^H = u v^H
    out = update(W, A, B)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, update(W, u, v), atol=10 * _tol(dtype) if dtype.is_complex else _tol(dtype), rtol=0)
    assert unitarity_error(out) < 100 * torch.finfo(W.real.dtype).eps * n


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("sampling", ["lsi", "column", "exact"])
@pytest.mark.parametrize("scale", [1e-30, 1e-12])
def test_tiny_gradient(dtype, step, sampling, scale):
    """A tiny G moves W by ~lr * |G| (no NaN, no blow-up from dividing by tiny eigenvalues)."""
    n = 12
    W = _unitary(n, dtype)
    G = scale * torch.randn(n, n, dtype=dtype, generator=_gen(3))
    out = step(W, G, 0.1, 2, sampling, generator=_gen())
    assert torch.isfinite(out).all()
    assert (out - W).abs().max() <= max(10 * scale, 10 * torch.finfo(W.real.dtype).eps)
    assert unitarity_error(out) <= 10 * unitarity_error(W) + 10 * torch.finfo(W.real.dtype).eps * n


@pytest.mark.parametrize("dtype", DTYPES64)
def test_tiny_gradient_is_first_order_exact(dtype):
    """For a 1e-9 update, both steps agree with the tangent projection W skew(W^H a b^H) to second order."""
    n, lr = 10, 1e-9
    W, G = _unitary(n, dtype), torch.randn(n, n, dtype=dtype, generator=_gen(1))
    a, b = low_rank_approximation(G, 2, "exact")
    first_order = W - lr * W @ _skew(W.mH @ a @ b.mH)
    for step in STEPS:
        torch.testing.assert_close(step(W, G, lr, 2, "exact"), first_order, atol=1e-15, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_and_singular_updates_stay_finite(dtype):
    """Operator-norm >= 1 steps: the tangent step stays unitary; the direct step (polar of a possibly singular
    matrix, which is not unique) stays finite."""
    n = 8
    W = _unitary(n, dtype)
    G = torch.randn(n, n, dtype=dtype, generator=_gen(2))
    for lr in (1e3, 1e8):
        t = projunn_tangent_step(W, G, lr, 2, "lsi", generator=_gen())
        assert torch.isfinite(t).all() and unitarity_error(t) < 1e-3
        assert torch.isfinite(projunn_direct_step(W, G, lr, 2, "lsi", generator=_gen())).all()
    # W + A B^H exactly singular: A B^H = -W e1 e1^H cancels the first column of W
    e1 = torch.zeros(n, 1, dtype=dtype)
    e1[0] = 1
    assert torch.isfinite(polar_low_rank_update(W, -W[:, :1], e1)).all()


# ---------------------------------------------------------------------------------------------------------------------
# drift and descent
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("step", STEPS)
def test_unitarity_after_10000_complex64_steps(step):
    """||W^H W - I||_F < 1e-4 after 10,000 complex64 rank-1 steps, without any re-projection."""
    torch.set_num_threads(1)
    n = 16
    W = _unitary(n, torch.complex64)
    gen = _gen(0)
    for _ in range(10_000):
        W = step(W, torch.randn(n, n, dtype=torch.complex64, generator=gen), 0.05, 1, "lsi", generator=gen)
    assert unitarity_error(W) < 1e-4


@pytest.mark.parametrize("dtype", [torch.complex64, torch.float32])
@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("sampling", ["lsi", "column"])
def test_descent_with_autograd_gradients(dtype, step, sampling):
    """Fit W to a target unitary T from data (loss ||X W^T - X T^T||^2) with G = W.grad from autograd:
    every step decreases the loss, and 300 rank-1 steps cut it by more than 100x."""
    n = 8
    T, W = _unitary(n, dtype, seed=1), _unitary(n, dtype, seed=2)
    if not dtype.is_complex and torch.linalg.det(T) * torch.linalg.det(W) < 0:
        T[:, 0] = -T[:, 0]  # O(N) has two components; a step never changes det(W)
    X = torch.randn(64, n, dtype=dtype, generator=_gen(3))
    Y = X @ T.T

    def loss_and_grad(W):
        W = W.clone().requires_grad_(True)
        loss = (X @ W.T - Y).abs().square().sum(-1).mean()
        loss.backward()
        return loss.item(), W.grad

    gen = _gen(4)
    first, _ = loss_and_grad(W)
    for _ in range(300):
        loss, G = loss_and_grad(W)
        W_new = step(W, G, 0.05, 1, sampling, generator=gen)
        assert loss_and_grad(W_new)[0] <= loss * (1 + 1e-5)
        W = W_new
    assert loss_and_grad(W)[0] < 0.01 * first
    assert unitarity_error(W) < 1e-4


# ---------------------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------------------


def test_bad_input_errors_name_the_problem():
    W = _unitary(4, torch.complex128)
    G = torch.randn(4, 4, dtype=torch.complex128)
    with pytest.raises(ValueError, match="sampling"):
        projunn_direct_step(W, G, 0.1, 1, "svd")
    with pytest.raises(ValueError, match="rank"):
        projunn_tangent_step(W, G, 0.1, 0)
    with pytest.raises(ValueError, match="rank"):
        projunn_tangent_step(W, G, 0.1, 5)
    with pytest.raises(ValueError, match="lr"):
        projunn_direct_step(W, G, float("nan"))
    with pytest.raises(ValueError, match="square"):
        projunn_direct_step(W[:, :3], G[:, :3], 0.1)
    with pytest.raises(ValueError, match="G must match W"):
        projunn_tangent_step(W, G.real, 0.1)
    with pytest.raises(TypeError, match="dtype"):
        polar_low_rank_update(W, torch.ones(4, 1), torch.ones(4, 1))
    with pytest.raises(ValueError, match="oversample"):
        low_rank_approximation(G, 1, "lsi", oversample=-1)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.float64])
@pytest.mark.parametrize("step", STEPS)
def test_out_and_in_place_steps_equal_the_pure_step(dtype, step):
    n = 12
    W = _unitary(n, dtype)
    G = torch.randn(n, n, dtype=dtype, generator=_gen(1))
    expected = step(W, G, 0.3, 2, "lsi", generator=_gen(2))
    buffer = torch.empty_like(W)
    assert step(W, G, 0.3, 2, "lsi", generator=_gen(2), out=buffer) is buffer
    param = torch.nn.Parameter(W.clone())  # an optimizer's in-place step on a leaf that requires grad
    assert step(param, G, 0.3, 2, "lsi", generator=_gen(2), out=param) is param
    torch.testing.assert_close(buffer, expected, atol=0, rtol=0)
    torch.testing.assert_close(param.detach(), expected, atol=0, rtol=0)
    W_t = W.mT.contiguous().mT  # column-major W, written into a row-major out
    torch.testing.assert_close(step(W_t, G, 0.3, 2, "lsi", generator=_gen(2)), expected, atol=1e-12 if dtype == torch.float64 else 1e-6, rtol=0)
    with pytest.raises(ValueError, match="out must match W"):
        step(W, G, 0.3, 2, out=torch.empty(n, n + 1, dtype=dtype))
