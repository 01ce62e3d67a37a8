"""The capacity checker: does a parametrisation ``theta in R^P -> W(theta) in U(N)`` cover U(N)?

Wisdom et al. (2016): a smooth parametrisation reaches a neighbourhood of ``W`` in U(N) (real dimension
``N^2``) only if its Jacobian has rank ``N^2`` there; at a *generic* point the rank is the maximal one,
so a rank below ``N^2`` at a random point means the parametrisation has restricted capacity everywhere
but on a null set. The restricted product ``D3 R2 F^-1 D2 Pi R1 F D1`` has ``P = 7N`` real parameters,
so its rank is at most ``7N < N^2`` for every ``N >= 8``.

How the rank is computed (float64 / complex128):

    W0 = W(theta0),   M(theta) = W0^H W(theta),   D = dM/dtheta at theta0     (N, N, P), complex
    W unitary for all theta  =>  every slice D[..., p] is skew-Hermitian (the tangent space at I)
    J = tangent coordinates of D:  Im diag, Re and Im of the strict upper triangle   (N^2, P), real
    rank = #{singular values of J > rtol * s_max}

For O(N) (real ``W``) the tangent coordinates are the strict upper triangle of a skew-symmetric matrix,
``N(N-1)/2`` of them. The Hermitian part of ``D`` is reported (``tangent_residual``): it is zero up to
rounding exactly when the map lands on the manifold. ``gap = s[rank-1] / s[rank]`` shows how cleanly
the numerical rank is separated (a large gap, e.g. 1e10, means no doubt).

``python -m unitary_rnn.analysis.capacity`` prints the rank table for N = 2..16.
"""

from __future__ import annotations

import argparse
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..manifold import unitarity_error

DEFAULT_RTOL = 1e-8


@dataclass
class CapacityReport:
    """Result of :func:`capacity_report`."""

    parametrization: str
    hidden_size: int
    manifold: str  # "unitary" (U(N)) or "orthogonal" (O(N))
    num_parameters: int  # P, real parameters
    manifold_dimension: int  # N^2 for U(N), N(N-1)/2 for O(N)
    rank: int  # numerical rank of the Jacobian on the tangent space
    full_capacity: bool  # rank == manifold_dimension
    gap: float  # s[rank-1] / s[rank] (inf when rank == min(J.shape))
    tolerance: float  # absolute threshold used: rtol * s_max
    tangent_residual: float  # ||Hermitian part of W0^H dW|| / ||W0^H dW||: 0 when W(theta) stays on the manifold
    unitarity_error: float  # ||W0^H W0 - I||_F at the evaluation point
    singular_values: list[float] = field(repr=False, default_factory=list)

    def __str__(self) -> str:
        verdict = "full capacity" if self.full_capacity else "restricted capacity"
        return (f"{self.parametrization} N={self.hidden_size}: rank {self.rank} / dim {self.manifold_dimension} "
                f"({self.num_parameters} params) -> {verdict}, gap {self.gap:.2e}")


# ----------------------------------------------------------------------------------------------------
# pure maths
# ----------------------------------------------------------------------------------------------------


def manifold_dimension(n: int, manifold: str = "unitary") -> int:
    """Real dimension of U(N) (``N^2``) or O(N) (``N(N-1)/2``)."""
    if manifold == "unitary":
        return n * n
    if manifold == "orthogonal":
        return n * (n - 1) // 2
    raise ValueError(f"unknown manifold {manifold!r}; valid: ('unitary', 'orthogonal')")


def tangent_coordinates(S: torch.Tensor, manifold: str = "unitary") -> torch.Tensor:
    """Real coordinates of skew-Hermitian (skew-symmetric) matrices ``S`` of shape ``(N, N, ...)``:

        unitary:    [Im S_ii (N); Re S_ij, i<j (N(N-1)/2); Im S_ij, i<j (N(N-1)/2)]   -> N^2
        orthogonal: [S_ij, i<j]                                                     -> N(N-1)/2

    Trailing dimensions are kept: the result has shape ``(dim, ...)``.
    """
    n = S.shape[0]
    rows, cols = torch.triu_indices(n, n, offset=1)
    upper = S[rows, cols]  # (N(N-1)/2, ...)
    if manifold == "orthogonal":
        return upper.real if upper.is_complex() else upper
    diag = torch.diagonal(S, dim1=0, dim2=1).movedim(-1, 0)  # (N, ...)
    return torch.cat([diag.imag, upper.real, upper.imag], dim=0)


def skew_from_coordinates(theta: torch.Tensor, n: int, manifold: str = "unitary") -> torch.Tensor:
    """The skew-Hermitian (skew-symmetric) ``N x N`` matrix with tangent coordinates ``theta``
    (inverse of :func:`tangent_coordinates`); differentiable in ``theta``."""
    m = n * (n - 1) // 2
    rows, cols = torch.triu_indices(n, n, offset=1, device=theta.device)
    if manifold == "orthogonal":
        upper = torch.zeros(n, n, dtype=theta.dtype, device=theta.device).index_put((rows, cols), theta[:m])
        return upper - upper.mT
    real = torch.zeros(n, n, dtype=theta.dtype, device=theta.device).index_put((rows, cols), theta[n:n + m])
    imag = torch.zeros(n, n, dtype=theta.dtype, device=theta.device).index_put((rows, cols), theta[n + m:])
    upper = torch.complex(real, imag)
    return upper - upper.mH + torch.diag_embed(torch.complex(torch.zeros_like(theta[:n]), theta[:n]))


def numerical_rank(J: torch.Tensor, rtol: float = DEFAULT_RTOL) -> tuple[int, float, float, torch.Tensor]:
    """``(rank, gap, tolerance, singular values)`` of a real matrix ``J``: rank counts singular values
    above ``rtol * s_max``; ``gap = s[rank-1] / s[rank]``."""
    s = torch.linalg.svdvals(J)
    if s.numel() == 0 or s[0] == 0:
        return 0, math.inf, 0.0, s
    tol = rtol * s[0].item()
    rank = int((s > tol).sum().item())
    if rank == 0:
        gap = math.inf
    elif rank < s.numel():
        gap = (s[rank - 1] / s[rank]).item() if s[rank] > 0 else math.inf
    else:
        gap = math.inf
    return rank, gap, tol, s


# ----------------------------------------------------------------------------------------------------
# the built-in parametrisations
# ----------------------------------------------------------------------------------------------------


def restricted_parametrization(n: int, generator: torch.Generator | None = None):
    """``(fn, theta0)`` for the restricted product of :func:`unitary_rnn.parametrizations.restricted_unitary_matrix`
    with a random fixed permutation; ``theta`` = ``[theta1; theta2; theta3; reflection1; reflection2]`` (7N)."""
    from ..parametrizations import random_restricted_parameters, restricted_unitary_matrix

    params = random_restricted_parameters(n, generator=generator, dtype=torch.float64)
    permutation = params.pop("permutation")
    theta0 = torch.cat([params[f"theta{k}"] for k in (1, 2, 3)] + [params[f"reflection{k}"].flatten() for k in (1, 2)])

    def fn(theta: torch.Tensor) -> torch.Tensor:
        t1, t2, t3 = theta[:n], theta[n:2 * n], theta[2 * n:3 * n]
        r1, r2 = theta[3 * n:5 * n].reshape(2, n), theta[5 * n:7 * n].reshape(2, n)
        return restricted_unitary_matrix(t1, t2, t3, r1, r2, permutation)

    return fn, theta0


def full_parametrization(n: int, generator: torch.Generator | None = None, manifold: str = "unitary"):
    """``(fn, theta0)`` for the full-capacity map around a random point ``W0``:

        W(theta) = (I + S/2)^{-1} (I - S/2) W0,    S = skew(theta) skew-Hermitian (skew-symmetric for O(N))

    the Cayley retraction that the multiplicative optimizer step uses, with ``N^2`` (``N(N-1)/2``)
    parameters, evaluated at a random ``theta0``."""
    from ..parametrizations import random_unitary

    dtype = torch.complex128 if manifold == "unitary" else torch.float64
    W0 = random_unitary(n, generator=generator, dtype=dtype)
    theta0 = 0.3 * torch.randn(manifold_dimension(n, manifold), generator=generator, dtype=torch.float64)
    eye = torch.eye(n, dtype=dtype)

    def fn(theta: torch.Tensor) -> torch.Tensor:
        S = skew_from_coordinates(theta, n, manifold)
        return torch.linalg.solve(eye + S / 2, (eye - S / 2) @ W0)

    return fn, theta0


# ----------------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------------


def tangent_jacobian(fn: Callable[[torch.Tensor], torch.Tensor], theta0: torch.Tensor):
    """``(D, W0)``: ``D = d(W0^H W(theta))/dtheta`` at ``theta0``, complex ``(N, N, P)`` (real for real W),
    by forward- or reverse-mode autodiff (``torch.func``), whichever is cheaper."""
    W0 = fn(theta0).detach()
    if W0.ndim != 2 or W0.shape[0] != W0.shape[1]:
        raise ValueError(f"the parametrisation must return a square matrix, got shape {tuple(W0.shape)}")

    def local(theta):
        M = W0.mH @ fn(theta)  # (N, N)
        return torch.view_as_real(M) if M.is_complex() else M

    out_size = W0.numel() * (2 if W0.is_complex() else 1)
    if theta0.numel() <= out_size:
        with warnings.catch_warnings():
            # torch's forward-AD decompositions are registered with torch.jit.script on first use
            warnings.filterwarnings("ignore", message=r"`torch.jit.script` is deprecated", category=FutureWarning)
            J = torch.func.jacfwd(local)(theta0)
    else:
        J = torch.func.jacrev(local)(theta0)
    # J: (N, N, 2, P) or (N, N, P)
    D = torch.view_as_complex(J.movedim(2, -1).contiguous()) if W0.is_complex() else J
    return D, W0


def capacity_report(
    parametrization: str | Callable[[torch.Tensor], torch.Tensor],
    hidden_size: int | None = None,
    theta: torch.Tensor | None = None,
    *,
    manifold: str = "unitary",
    seed: int = 0,
    rtol: float = DEFAULT_RTOL,
) -> CapacityReport:
    """Numerical capacity of a parametrisation of U(N) (or O(N)) at a generic point.

    Args:
        parametrization: ``"restricted"`` (Arjovsky's ``D3 R2 F^-1 D2 Pi R1 F D1``, 7N parameters),
            ``"full"`` (the Cayley map of a skew-Hermitian matrix around a random unitary point, N^2
            parameters; with ``manifold="orthogonal"`` the real O(N) version), or a callable
            ``theta -> W`` mapping a real 1-D tensor to a square complex (unitary) or real (orthogonal)
            matrix, differentiable with ``torch.func``.
        hidden_size: N; required for the built-in names, inferred from ``W`` for a callable.
        theta: the evaluation point for a callable (real float tensor, any shape; it is flattened).
            Pick a random, generic point: special points (e.g. all zeros) can drop the rank.
        manifold: ``"unitary"`` or ``"orthogonal"`` for ``"full"``; inferred from ``W``'s dtype for a callable.
        seed: seeds the random point of the built-in parametrisations.
        rtol: singular values below ``rtol * s_max`` count as zero.
    """
    generator = torch.Generator().manual_seed(seed)
    if isinstance(parametrization, str):
        if not (isinstance(hidden_size, int) and hidden_size >= 1):
            raise ValueError(f"hidden_size must be a positive int for parametrization={parametrization!r}, got {hidden_size!r}")
        if theta is not None:
            raise ValueError("theta is only used with a callable parametrization; the built-in ones pick a random point")
        if parametrization == "restricted":
            if manifold != "unitary":
                raise ValueError("the restricted parametrization is complex: it parametrises U(N), not O(N)")
            fn, theta0 = restricted_parametrization(hidden_size, generator)
        elif parametrization == "full":
            manifold_dimension(hidden_size, manifold)  # validates manifold
            fn, theta0 = full_parametrization(hidden_size, generator, manifold)
        else:
            raise ValueError(f"unknown parametrization {parametrization!r}; valid: 'restricted', 'full', or a callable theta -> W")
        name = parametrization
    elif callable(parametrization):
        if theta is None:
            raise ValueError("a callable parametrization needs theta, the (real) point at which to evaluate it")
        if theta.is_complex() or not theta.is_floating_point():
            raise TypeError(f"theta must be a real floating tensor (use torch.view_as_real for complex parameters), got {theta.dtype}")
        shape = theta.shape
        user_fn = parametrization
        theta0 = theta.detach().to(torch.float64).flatten()
        fn = lambda t: _promote(user_fn(t.reshape(shape)))  # noqa: E731
        name = getattr(parametrization, "__name__", type(parametrization).__name__)
    else:
        raise TypeError(f"parametrization must be 'restricted', 'full' or a callable, got {type(parametrization).__name__}")

    D, W0 = tangent_jacobian(fn, theta0)  # (N, N, P)
    n = W0.shape[0]
    if hidden_size is not None and hidden_size != n:
        raise ValueError(f"hidden_size={hidden_size} but the parametrisation returns a {n} x {n} matrix")
    kind = "unitary" if W0.is_complex() else "orthogonal"
    if not isinstance(parametrization, str):
        manifold = kind
    error = unitarity_error(W0).item()
    if error > 1e-6 * n:
        raise ValueError(f"W(theta) is not {kind} at theta (||W^H W - I||_F = {error:.3e}); the capacity "
                         "checker needs a map into U(N) (complex) or O(N) (real)")
    herm = D + D.transpose(0, 1).conj()  # Hermitian (symmetric) part, times 2
    norm = torch.linalg.vector_norm(D).item()
    residual = torch.linalg.vector_norm(herm).item() / (2 * norm) if norm > 0 else 0.0
    J = tangent_coordinates((D - D.transpose(0, 1).conj()) / 2, manifold)  # (dim, P)
    rank, gap, tol, s = numerical_rank(J, rtol)
    dim = manifold_dimension(n, manifold)
    return CapacityReport(
        parametrization=name, hidden_size=n, manifold=manifold, num_parameters=theta0.numel(),
        manifold_dimension=dim, rank=rank, full_capacity=rank == dim, gap=gap, tolerance=tol,
        tangent_residual=residual, unitarity_error=error, singular_values=s.tolist(),
    )


def _promote(W: torch.Tensor) -> torch.Tensor:
    """complex64 -> complex128, float32 -> float64 (the rank needs double precision)."""
    if W.dtype == torch.complex64:
        return W.to(torch.complex128)
    if W.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return W.to(torch.float64)
    return W


def capacity_table(sizes=range(2, 17), parametrizations=("restricted", "full"), seed: int = 0) -> list[CapacityReport]:
    """:func:`capacity_report` for every size and parametrisation."""
    return [capacity_report(p, n, seed=seed) for n in sizes for p in parametrizations]


def format_table(reports: list[CapacityReport]) -> str:
    """A markdown table: N, N^2, and per parametrisation its parameter count, rank and verdict."""
    names = list(dict.fromkeys(r.parametrization for r in reports))
    by = {(r.hidden_size, r.parametrization): r for r in reports}
    sizes = sorted({r.hidden_size for r in reports})
    header = "| N | dim U(N) = N^2 | " + " | ".join(f"{p}: params | {p}: rank | {p}: full? | {p}: gap" for p in names) + " |"
    lines = [header, "|" + "---|" * (2 + 4 * len(names))]
    for n in sizes:
        cells = [str(n), str(by[(n, names[0])].manifold_dimension)]
        for p in names:
            r = by[(n, p)]
            cells += [str(r.num_parameters), str(r.rank), "yes" if r.full_capacity else "no",
                      "inf" if math.isinf(r.gap) else f"{r.gap:.1e}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Jacobian rank of unitary parametrisations (Wisdom et al. 2016).")
    parser.add_argument("--min-size", type=int, default=2)
    parser.add_argument("--max-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(format_table(capacity_table(range(args.min_size, args.max_size + 1), seed=args.seed)))


if __name__ == "__main__":
    main()
