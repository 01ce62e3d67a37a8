"""HTA maths against dense references that build the Householder matrices explicitly (float64, 1e-10)."""

import pytest
import torch

from hh_peft.functional import (
    delta_weight,
    householder_apply,
    householder_coefficient,
    hta_activation_delta,
    hta_factors,
    hta_factors_backward,
    hta_scalars,
    row_contraction,
)


def dense_householder(u, householder, eps=1e-12):
    eye = torch.eye(u.numel(), dtype=u.dtype)
    if householder == "normalized":
        return eye - 2.0 * torch.outer(u, u) / (u @ u + eps)
    return eye - torch.outer(u, u)


def dense_delta(u_in, u_out, d, A, B, householder):
    out_features, in_features = u_out.numel(), u_in.numel()
    D = torch.zeros(out_features, in_features, dtype=d.dtype)
    D[range(d.numel()), range(d.numel())] = d
    delta = dense_householder(u_out, householder) @ D @ dense_householder(u_in, householder)
    if A is not None:
        delta = delta + B @ A
    return delta


SHAPES = [(16, 16), (12, 30), (30, 12), (1, 5)]  # (in, out): square, fused-qkv-like, fc2-like, degenerate


@pytest.mark.parametrize("in_features, out_features", SHAPES)
@pytest.mark.parametrize("householder", ["normalized", "paper"])
@pytest.mark.parametrize("rank", [0, 1, 3])
def test_delta_weight_and_activation_path_equal_dense_reference(in_features, out_features, householder, rank):
    g = torch.Generator().manual_seed(in_features * 100 + out_features + rank)
    kw = dict(dtype=torch.float64, generator=g)
    m = min(in_features, out_features)
    u_in, u_out, d = torch.randn(in_features, **kw), torch.randn(out_features, **kw), torch.randn(m, **kw)
    A = torch.randn(rank, in_features, **kw) if rank else None
    B = torch.randn(out_features, rank, **kw) if rank else None
    reference = dense_delta(u_in, u_out, d, A, B, householder)

    factors = hta_factors(u_in, u_out, d, A, B, householder=householder)
    assert factors[1].shape == (out_features, 2 + rank) and factors[2].shape == (in_features, 2 + rank)
    torch.testing.assert_close(delta_weight(*factors), reference, rtol=1e-10, atol=1e-10)

    x = torch.randn(7, 3, in_features, **kw)
    torch.testing.assert_close(hta_activation_delta(x, *factors), x @ reference.T, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("n", [1, 2, 64, 768])
def test_normalized_householder_is_orthogonal_for_any_nonzero_vector(dtype, tol, n):
    for scale in (1e-30, 1e-6, 1.0, 1e4):  # 1e-30: the square norm underflows (float32) or is below eps
        u = torch.randn(n, dtype=torch.float64).to(dtype) * scale
        c = householder_coefficient(u, "normalized")
        # Build H by applying it to the identity's rows: H is never materialised in the library itself.
        H = householder_apply(torch.eye(n, dtype=dtype), u, c)
        torch.testing.assert_close(H @ H.T, torch.eye(n, dtype=dtype), rtol=0, atol=tol * max(1, n**0.5))
        torch.testing.assert_close(H, H.T, rtol=0, atol=tol)


@pytest.mark.parametrize("householder", ["normalized", "paper"])
def test_zero_householder_vector_gives_finite_values_and_gradients(householder):
    u_in = torch.zeros(8, requires_grad=True)
    u_out = torch.zeros(6, requires_grad=True)
    d = torch.randn(6, requires_grad=True)
    A, B = torch.zeros(1, 8, requires_grad=True), torch.zeros(6, 1, requires_grad=True)
    x = torch.randn(4, 8)
    factors = hta_factors(u_in, u_out, d, A, B, householder=householder)
    out = hta_activation_delta(x, *factors).sum() + delta_weight(*factors).sum()
    out.backward()
    for t in (out, u_in.grad, u_out.grad, d.grad, A.grad, B.grad):
        assert torch.isfinite(t).all()
    # H(0) = I, so the update is exactly the rectangular diagonal
    expected = torch.zeros(6, 8)
    expected[range(6), range(6)] = d.detach()
    torch.testing.assert_close(delta_weight(*factors).detach(), expected)


def test_unknown_householder_form_is_rejected():
    with pytest.raises(ValueError, match="'householder-x'.*normalized"):
        householder_coefficient(torch.ones(3), "householder-x")


@pytest.mark.parametrize("householder", ["normalized", "paper"])
@pytest.mark.parametrize("shape", [(7, 12), (12, 7), (9, 9)])
@pytest.mark.parametrize("rank", [0, 1, 3])
@pytest.mark.parametrize("zero", [None, "u_in", "u_out"])
@pytest.mark.parametrize("scalars_given, contiguous_grads", [(False, False), (True, True)])
def test_hta_factors_backward_equals_autograd(householder, shape, rank, zero, scalars_given, contiguous_grads):
    """The written-out chain rule through hta_factors equals autograd's (float64, 1e-12), including a zero
    Householder vector (the coefficient's eps branch); with the scalars precomputed (as the folded layer passes
    them from forward) or not, and with gradients of U / V in hta_factors' transposed layout or row-major."""
    in_features, out_features = shape
    m = min(shape)
    dtype = torch.float64
    u_in = torch.randn(in_features, dtype=dtype)
    u_out = torch.randn(out_features, dtype=dtype)
    if zero == "u_in":
        u_in.zero_()
    elif zero == "u_out":
        u_out.zero_()
    d = torch.randn(m, dtype=dtype)
    A = torch.randn(rank, in_features, dtype=dtype) if rank else None
    B = torch.randn(out_features, rank, dtype=dtype) if rank else None
    inputs = [t.requires_grad_() for t in (u_in, u_out, d, A, B) if t is not None]
    d_out, U, V = hta_factors(u_in, u_out, d, A, B, householder=householder)
    grad_d, grad_U, grad_V = torch.randn_like(d_out), torch.randn_like(U), torch.randn_like(V)
    assert grad_U.stride(0) == 1  # randn_like keeps hta_factors' (k, out) row layout
    expected = torch.autograd.grad((d_out * grad_d).sum() + (U * grad_U).sum() + (V * grad_V).sum(), inputs)
    if contiguous_grads:
        grad_U, grad_V = grad_U.contiguous(), grad_V.contiguous()
    with torch.no_grad():
        scalars = hta_scalars(u_in, u_out, d, householder=householder) if scalars_given else None
        grads = hta_factors_backward(u_in, u_out, d, A, B, grad_d, grad_U, grad_V, householder=householder, scalars=scalars)
        ours = [g for g in grads if g is not None]
    assert len(ours) == len(expected)
    for a, b in zip(ours, expected):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("rows", [1, 255, 512, 1000, 1576])
def test_row_contraction_equals_transposed_matmul(threads, rows):
    """``row_contraction(a, b) = a^T b`` whether or not the rows are split across threads (n below 256 per thread,
    n not divisible by the number of chunks), float64 to 1e-12."""
    generator = torch.Generator().manual_seed(rows)
    a = torch.randn(rows, 3, dtype=torch.float64, generator=generator)
    b = torch.randn(rows, 40, dtype=torch.float64, generator=generator)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result = row_contraction(a, b)
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(result, a.T @ b, rtol=1e-12, atol=1e-12)


def test_hta_factors_returns_transposed_row_layout():
    """U and V are views of row-major (k, out) / (k, in) tensors: the layer's products with U^T and V^T need them so."""
    d, U, V = hta_factors(torch.randn(5), torch.randn(7), torch.randn(5), torch.randn(2, 5), torch.randn(7, 2))
    assert U.shape == (7, 4) and V.shape == (5, 4)
    assert U.T.is_contiguous() and V.T.is_contiguous()


@pytest.mark.parametrize("householder", ["normalized", "paper"])
@pytest.mark.parametrize("rank", [0, 2])
def test_batched_blocks_equal_one_block_at_a_time(householder, rank):
    """A leading block dimension computes every block exactly as the 1-D functions do one by one: factors, scalars
    and the written-out backward (float64, 1e-12); a zero vector in one block stays finite."""
    torch.manual_seed(0)
    k, n_in, n_out = 3, 5, 4
    u_in, u_out, d = torch.randn(k, n_in, dtype=torch.float64), torch.randn(k, n_out, dtype=torch.float64), torch.randn(k, 4, dtype=torch.float64)
    u_in[1] = 0.0
    A = torch.randn(k, rank, n_in, dtype=torch.float64) if rank else None
    B = torch.randn(k, n_out, rank, dtype=torch.float64) if rank else None
    d_b, U_b, V_b = hta_factors(u_in, u_out, d, A, B, householder=householder)
    grad_d, grad_U, grad_V = torch.randn_like(d), torch.randn_like(U_b), torch.randn_like(V_b)
    grads = hta_factors_backward(u_in, u_out, d, A, B, grad_d, grad_U, grad_V, householder=householder)
    for b in range(k):
        A_b, B_b = (A[b], B[b]) if rank else (None, None)
        _, U, V = hta_factors(u_in[b], u_out[b], d[b], A_b, B_b, householder=householder)
        torch.testing.assert_close(U_b[b], U, rtol=0, atol=1e-12)
        torch.testing.assert_close(V_b[b], V, rtol=0, atol=1e-12)
        one = hta_factors_backward(u_in[b], u_out[b], d[b], A_b, B_b, grad_d[b], grad_U[b], grad_V[b], householder=householder)
        for batched, single in zip(grads, one):
            if single is None:
                assert batched is None
            else:
                assert torch.isfinite(batched[b]).all()
                torch.testing.assert_close(batched[b], single, rtol=0, atol=1e-12)
