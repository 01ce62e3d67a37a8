"""Tests for unitary_rnn.analysis.capacity: the Jacobian-rank capacity checker."""

from __future__ import annotations

import math

import pytest
import torch

from unitary_rnn.analysis.capacity import (
    CapacityReport,
    capacity_report,
    capacity_table,
    format_table,
    main,
    manifold_dimension,
    numerical_rank,
    skew_from_coordinates,
    tangent_coordinates,
)


@pytest.mark.parametrize("manifold,n", [("unitary", 1), ("unitary", 5), ("orthogonal", 2), ("orthogonal", 6)])
def test_tangent_coordinates_round_trip(manifold, n):
    dim = manifold_dimension(n, manifold)
    theta = torch.randn(dim, dtype=torch.float64)
    S = skew_from_coordinates(theta, n, manifold)
    assert S.shape == (n, n)
    torch.testing.assert_close(S, -S.mH, rtol=0, atol=0)
    assert S.is_complex() == (manifold == "unitary")
    torch.testing.assert_close(tangent_coordinates(S, manifold), theta, rtol=0, atol=0)
    # trailing dimensions are carried
    stacked = torch.stack([S, 2 * S], dim=-1)
    torch.testing.assert_close(tangent_coordinates(stacked, manifold), torch.stack([theta, 2 * theta], -1), rtol=0, atol=0)


def test_manifold_dimension():
    assert [manifold_dimension(n) for n in (1, 2, 8)] == [1, 4, 64]
    assert [manifold_dimension(n, "orthogonal") for n in (1, 2, 8)] == [0, 1, 28]
    with pytest.raises(ValueError, match="unknown manifold 'stiefel'"):
        manifold_dimension(3, "stiefel")


def test_numerical_rank_known_matrix():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(20, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 9, generator=g, dtype=torch.float64)
    rank, gap, tol, s = numerical_rank(A)
    assert rank == 4 and gap > 1e8 and s.shape == (9,) and tol == pytest.approx(1e-8 * s[0].item())
    rank, gap, _, _ = numerical_rank(torch.eye(3, dtype=torch.float64))
    assert rank == 3 and math.isinf(gap)
    assert numerical_rank(torch.zeros(3, 3, dtype=torch.float64))[0] == 0


@pytest.mark.parametrize("n", [8, 9, 12, 16])
def test_restricted_is_not_full_capacity_for_n_at_least_8(n):
    """The seed's claim: 7N parameters, so rank <= 7N < N^2 for N >= 8."""
    report = capacity_report("restricted", n)
    assert isinstance(report, CapacityReport)
    assert report.num_parameters == 7 * n and report.manifold_dimension == n * n
    assert report.rank <= 7 * n < n * n and not report.full_capacity
    # the rank is clean (no singular values near the threshold) and the map lands on U(N)
    assert report.gap > 1e6
    assert report.tangent_residual < 1e-12 and report.unitarity_error < 1e-12
    # measured here: the product has 7 redundant directions (phases and reflection scalings)
    assert report.rank == 7 * n - 7


@pytest.mark.parametrize("n", [2, 3, 8, 16])
def test_full_is_full_capacity(n):
    report = capacity_report("full", n, seed=3)
    assert report.full_capacity and report.rank == n * n == report.num_parameters
    assert report.tangent_residual < 1e-12
    assert min(report.singular_values) > 1e-3 * max(report.singular_values)


def test_full_orthogonal():
    report = capacity_report("full", 6, manifold="orthogonal")
    assert report.manifold == "orthogonal" and report.manifold_dimension == 15 and report.rank == 15 and report.full_capacity


def test_small_restricted_covers_u_n():
    """For tiny N the 7N - 7 directions exceed N^2 and the restricted form does cover U(N)."""
    assert capacity_report("restricted", 4).full_capacity
    assert not capacity_report("restricted", 6).full_capacity


# ----------------------------------------------------------------------------------------------------
# user callables
# ----------------------------------------------------------------------------------------------------


def test_callable_exponential_map_is_full():
    n = 5
    W0 = torch.linalg.qr(torch.randn(n, n, dtype=torch.complex128))[0]

    def expmap(theta):
        return W0 @ torch.linalg.matrix_exp(skew_from_coordinates(theta, n))

    report = capacity_report(expmap, theta=0.2 * torch.randn(n * n, dtype=torch.float64))
    assert report.parametrization == "expmap" and report.hidden_size == n and report.manifold == "unitary"
    assert report.full_capacity and report.rank == 25


def test_callable_diagonal_and_redundant():
    n = 6

    def diagonal(theta):  # W = diag(e^{i theta}): an N-dimensional torus
        return torch.diag_embed(torch.polar(torch.ones_like(theta), theta))

    report = capacity_report(diagonal, theta=torch.randn(n, dtype=torch.float64))
    assert report.rank == n and not report.full_capacity

    def redundant(theta):  # two angles that only enter through their sum: rank 1 from 2 parameters
        return diagonal((theta[0] + theta[1]).expand(n).clone())

    report = capacity_report(redundant, theta=torch.randn(2, dtype=torch.float64))
    assert report.num_parameters == 2 and report.rank == 1 and report.gap > 1e10


def test_callable_real_orthogonal_complex64_and_shaped_theta():
    n = 4

    def givens_product(theta):  # theta (2, 3): six rotations in float32 -> all of SO(4)
        W = torch.eye(n, dtype=theta.dtype)
        for k, (i, j) in enumerate([(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]):
            c, s = torch.cos(theta.flatten()[k]), torch.sin(theta.flatten()[k])
            G = torch.eye(n, dtype=theta.dtype)
            G = G.index_put((torch.tensor([i, j, i, j]), torch.tensor([i, j, j, i])), torch.stack([c, c, -s, s]))
            W = W @ G
        return W

    report = capacity_report(givens_product, theta=torch.rand(2, 3) + 0.1)
    assert report.manifold == "orthogonal" and report.manifold_dimension == 6 and report.full_capacity
    # complex64 output is promoted to complex128 for the rank
    diag64 = lambda t: torch.diag_embed(torch.polar(torch.ones_like(t), t)).to(torch.complex64)  # noqa: E731
    assert capacity_report(diag64, theta=torch.randn(3)).rank == 3


def test_bad_input():
    with pytest.raises(ValueError, match="unknown parametrization 'fourier'"):
        capacity_report("fourier", 4)
    with pytest.raises(ValueError, match="hidden_size"):
        capacity_report("full")
    with pytest.raises(ValueError, match="needs theta"):
        capacity_report(lambda t: t)
    with pytest.raises(TypeError, match="real floating"):
        capacity_report(lambda t: t, theta=torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(ValueError, match="not unitary"):
        capacity_report(lambda t: torch.diag_embed(t.to(torch.complex128)), theta=torch.tensor([2.0, 3.0]))
    with pytest.raises(ValueError, match="U\\(N\\), not O\\(N\\)"):
        capacity_report("restricted", 4, manifold="orthogonal")
    with pytest.raises(ValueError, match="hidden_size=3"):
        capacity_report(lambda t: torch.diag_embed(torch.polar(torch.ones_like(t), t)), 3, theta=torch.randn(4))


def test_table_and_cli(capsys):
    reports = capacity_table(range(2, 5))
    table = format_table(reports)
    assert table.splitlines()[0].startswith("| N | dim U(N) = N^2 |") and len(table.splitlines()) == 5
    main(["--min-size", "8", "--max-size", "8"])
    out = capsys.readouterr().out
    assert "| 8 | 64 | 56 | 49 | no |" in out and "| 64 | 64 | yes |" in out
