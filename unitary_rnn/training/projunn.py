"""projUNN (Kiani et al. 2022): rank-k steps that keep a matrix exactly unitary (orthogonal) in O(k N^2).

Both steps first approximate the gradient by a rank-k matrix, ``G ~ a b^H`` (:func:`low_rank_approximation`), and
then move W on U(N) (complex) or O(N) (real) along that update without ever touching an N x N factorisation:

- projUNN-D (*direct*, :func:`projunn_direct_step`): ``W <- polar(W - lr a b^H)``, the closest unitary matrix to the
  Euclidean gradient step;
- projUNN-T (*tangent*, :func:`projunn_tangent_step`): ``W <- W exp(-lr skew(W^H a b^H))``, the exponential map along
  the projection of the update on the tangent space at W (``skew(X) = (X - X^H) / 2``).

``G`` is the gradient as PyTorch stores it in ``W.grad``: for a complex W it is the conjugate Wirtinger derivative
(times 2), the convention in which ``W - lr * G`` descends, so both steps descend for ``lr > 0``.

Both steps reduce to a Hermitian eigenproblem of size ``r = min(2k, N)``. Write the update as ``W + A B^H`` with
``A = -lr a``, ``B = b`` (N x k) and ``P = W^H A``. Then ``W + A B^H = W (I + P B^H)``, and ``P B^H`` (and its
skew-Hermitian part) act inside the span of ``[P, B]``. A thin QR ``[P, B] = Q R`` (Q: N x r with orthonormal
columns, even when ``[P, B]`` is rank deficient) gives ``P B^H = Q E Q^H`` with ``E = R_P R_B^H`` (r x r), and for
any matrix function f that maps the span of Q to itself

    f(I + Q E Q^H) = I + Q (f(I + E) - I) Q^H,      so      W_new = W + (W Q) (f(I + E) - I) Q^H,

two N x N x r products: O(k N^2). The functions return new tensors (or write into ``out=``, which may be W itself,
for an in-place optimizer step) and work for complex (unitary) and real (orthogonal) W alike.
"""

from __future__ import annotations

import math

import torch

from ..parametrizations import complex_dtype

SAMPLINGS = ("lsi", "column", "exact")

_POLAR_FACTOR_TOL = 32
"""projUNN-D's r x r polar factor Z (Newton-Schulz refined) is accepted when ``||Z^H Z - I||_F`` is below this many
``r * eps``; above, it is recomputed by an r x r SVD."""


def _check_square(W: torch.Tensor, name: str = "W") -> int:
    if W.ndim != 2 or W.shape[0] != W.shape[1]:
        raise ValueError(f"{name} must be a square N x N matrix, got shape {tuple(W.shape)}")
    if not (W.is_complex() or W.is_floating_point()):
        raise TypeError(f"{name} must be a floating or complex tensor, got {W.dtype}")
    return W.shape[0]


def _check_rank(rank: int, n: int) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= n:
        raise ValueError(f"rank must be an integer in [1, N={n}], got {rank!r}")
    return rank


def check_learning_rate(lr: float, name: str = "lr", allow_negative: bool = False) -> float:
    """``lr`` as a float; ``ValueError`` naming ``name`` unless it is finite (an infinite or NaN step would write
    NaN into W) and, unless ``allow_negative``, non-negative."""
    lr = float(lr)
    if not math.isfinite(lr) or (lr < 0 and not allow_negative):
        raise ValueError(f"{name} must be a finite{'' if allow_negative else ' non-negative'} number, got {lr!r}")
    return lr


def _check_factors(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> None:
    n = _check_square(W)
    for name, t in (("A", A), ("B", B)):
        if t.ndim != 2 or t.shape[0] != n:
            raise ValueError(f"{name} must be an N x k matrix with N={n} rows, got shape {tuple(t.shape)}")
        if t.dtype != W.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but W has dtype {W.dtype}; they must match")
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"A and B must have the same number of columns k, got {A.shape[1]} and {B.shape[1]}")


def _check_step_arguments(W: torch.Tensor, G: torch.Tensor, lr: float) -> float:
    """Validate one projUNN step's ``W``, its gradient ``G`` and ``lr``; returns ``lr`` as a float."""
    lr = check_learning_rate(lr)
    _check_square(W)
    if G.shape != W.shape or G.dtype != W.dtype:
        raise ValueError(f"G must match W: got {tuple(G.shape)} {G.dtype}, W is {tuple(W.shape)} {W.dtype}")
    return lr


# The thin products below are written as (thin x big) products, ``M X = (X^T M^T)^T`` and ``M^H X = (X^H M)^H``:
# mathematically the same, but on CPU BLAS (MKL, complex64) the N x N x k product with k = 1..8 is 3-6x faster that
# way round than ``M @ X`` / ``M.mH @ X`` (measured at N = 1024).


def _mul_thin(M: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``M X`` for N x N ``M`` and thin N x k ``X``."""
    return (X.mT @ M.mT).mT


def _adjoint_mul_thin(M: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``M^H X`` for N x N ``M`` and thin N x k ``X``."""
    return (X.mH @ M).mH


# --------------------------------------------------------------------------------------------------------------------
# rank-k approximation of the gradient
# --------------------------------------------------------------------------------------------------------------------


def _range_to_factors(G: torch.Tensor, Y: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``a b^H = Q Q^H G`` for an orthonormal basis Q of the columns of Y (N x m, m >= rank); when m > rank the
    projection is truncated to its best rank-k part by the SVD of the small m x N matrix ``Q^H G``."""
    Q = torch.linalg.qr(Y).Q  # N x m, orthonormal columns even if Y is rank deficient
    Bh = Q.mH @ G  # m x N
    if Q.shape[1] == rank:
        return Q, Bh.mH  # N x k, N x k
    Us, S, Vh = torch.linalg.svd(Bh, full_matrices=False)  # m x m, m, m x N: never N x N
    a = Q @ (Us[:, :rank] * S[:rank].to(Us.dtype))  # N x k
    return a, Vh[:rank].mH  # N x k, N x k


def low_rank_approximation(
    G: torch.Tensor,
    rank: int,
    sampling: str = "lsi",
    generator: torch.Generator | None = None,
    oversample: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``a, b`` (both N x k) with ``G ~ a b^H``.

    - ``"lsi"``: random projection (the randomized range finder of Halko, Martinsson & Tropp; projUNN's "LSI"):
      ``Y = G Omega`` with Gaussian ``Omega`` (N x (k + oversample)), ``a b^H = Q Q^H G`` for ``Q = orth(Y)``
      (truncated to rank k by a small SVD when ``oversample > 0``). Cost O(k N^2). Exact (almost surely) when
      ``rank(G) <= k``: ``range(G Omega) = range(G)`` for a generic ``Omega``.
    - ``"column"``: norm-weighted column sampling (Drineas, Kannan & Mahoney; projUNN's column sampling): draw k
      distinct column indices with probability ``p_j = ||G[:, j]||^2 / ||G||_F^2``, and project G on the span of
      those columns, ``a b^H = Q Q^H G`` with ``Q = orth(G[:, idx])``. Cost O(k N^2). Sampling *without* replacement
      makes this exact whenever ``rank(G) <= k`` and the sampled columns span ``range(G)``, which holds almost surely
      for a generic rank-k matrix (it can fail for a degenerate one, e.g. with two parallel non-zero columns).
    - ``"exact"``: the best rank-k approximation from a full SVD of G (O(N^3); a reference for tests).

    ``G = 0`` gives ``a = b = 0``. ``generator`` seeds the random choices of ``"lsi"`` and ``"column"``.
    """
    n = _check_square(G, "G")
    _check_rank(rank, n)
    if sampling not in SAMPLINGS:
        raise ValueError(f"unknown sampling {sampling!r}; valid: {SAMPLINGS}")
    if isinstance(oversample, bool) or not isinstance(oversample, int) or oversample < 0:
        raise ValueError(f"oversample must be a non-negative integer, got {oversample!r}")
    G = G.detach()

    if sampling == "exact":
        U, S, Vh = torch.linalg.svd(G)
        return U[:, :rank] * S[:rank].to(U.dtype), Vh[:rank].mH  # N x k, N x k

    if sampling == "lsi":
        m = min(rank + oversample, n)
        omega = torch.randn(n, m, dtype=G.dtype, device=G.device, generator=generator)  # N x m
        return _range_to_factors(G, _mul_thin(G, omega), rank)

    # "column": scale first so that squared norms of tiny (e.g. 1e-30 in float32) columns do not underflow to zero
    scale = G.abs().amax()
    weights = torch.linalg.vector_norm(G / scale, dim=0).square() if scale > 0 else torch.zeros(n, device=G.device)
    nonzero = int(torch.count_nonzero(weights))
    if nonzero == 0:
        zeros = torch.zeros(n, rank, dtype=G.dtype, device=G.device)
        return zeros, zeros.clone()
    idx = torch.multinomial(weights.float(), min(rank, nonzero), replacement=False, generator=generator)  # <= k
    a, b = _range_to_factors(G, G[:, idx], min(rank, nonzero))
    if a.shape[1] < rank:  # fewer non-zero columns than k: G is then exactly reproduced, pad with zero columns
        pad = torch.zeros(n, rank - a.shape[1], dtype=G.dtype, device=G.device)
        a, b = torch.cat([a, pad], dim=1), torch.cat([b, pad], dim=1)
    return a, b


# --------------------------------------------------------------------------------------------------------------------
# the two rank-k manifold updates
# --------------------------------------------------------------------------------------------------------------------


def _check_out(W: torch.Tensor, out: torch.Tensor | None) -> None:
    if out is not None and (out.shape != W.shape or out.dtype != W.dtype or out.device != W.device):
        raise ValueError(
            f"out must match W (shape {tuple(W.shape)}, {W.dtype}, {W.device}), got {tuple(out.shape)}, {out.dtype}, {out.device}"
        )


def _apply(W: torch.Tensor, Q: torch.Tensor, delta: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``W + (W Q) delta Q^H`` (N x N), into ``out`` when given (``out`` may be W itself: the thin factors are
    computed before W is overwritten). Writing in place saves allocating a fresh N x N matrix per step, which on
    CPU (page faults on a new 32 MB block at N = 2048) costs more than the arithmetic."""
    left = _mul_thin(W, Q).contiguous()  # N x r, W Q
    right = delta @ Q.mH  # r x N
    if out is None:
        return torch.addmm(W, left, right)
    if out.data_ptr() != W.data_ptr():
        out.copy_(W)
    return out.addmm_(left, right)


def _subspace(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``Q`` (N x r, orthonormal) and ``E = R_P R_B^H`` (r x r) with ``W^H A B^H = Q E Q^H``, ``r = min(2k, N)``."""
    k = A.shape[1]
    P = _adjoint_mul_thin(W, A)  # N x k, W^H A
    Q, R = torch.linalg.qr(torch.cat([P, B], dim=1))  # N x r, r x 2k
    E = R[:, :k] @ R[:, k:].mH  # r x r
    return Q, E


def polar_low_rank_update(
    W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``polar(W + A B^H)`` for unitary (orthogonal) W and A, B: N x k, in O(k N^2) through one r x r ``eigh``.

    With ``W^H A B^H = Q E Q^H`` (see the module docstring), ``W + A B^H = W (I + Q E Q^H)`` and, W being unitary,
    ``polar(W X) = W polar(X)``. For ``S = I + E`` (r x r):

        polar(S) = S (S^H S)^{-1/2},    S^H S = I + H,    H = E + E^H + E^H E  (Hermitian),
        H = V diag(mu) V^H  (eigh),     (S^H S)^{-1/2} = I + V diag(g) V^H,   g = (1 + mu)^{-1/2} - 1,
        polar(S) - I = E + S V diag(g) V^H,
        W_new = W + (W Q) (polar(S) - I) Q^H.

    (plus one r x r Newton-Schulz refinement of the factor, see the code: forming ``S^H S`` squares cond(S); a
    factor still not unitary to rounding after it is replaced by ``U V^H`` from the r x r SVD ``S = U Sigma V^H``).

    ``g`` is evaluated as ``-mu / (s (1 + s))`` with ``s = sqrt(1 + mu)``, which has no cancellation for tiny
    updates and is exactly 0 for ``mu = 0``: a zero update returns W unchanged, bit for bit. ``W + A B^H`` singular
    (only for steps of operator norm >= 1) has no unique polar factor; ``1 + mu`` is then floored at the dtype's
    machine epsilon, and the SVD fallback then returns one of the polar factors, unitary to rounding.
    ``out`` (N x N, may be W itself) receives the result instead of a new tensor.
    """
    _check_factors(W, A, B)
    _check_out(W, out)
    W = W.contiguous()  # a column-major W (e.g. straight from a QR) would make every N x N pass a strided copy
    Q, E = _subspace(W, A, B)  # N x r, r x r
    H = E + E.mH + E.mH @ E  # r x r, Hermitian
    mu, V = torch.linalg.eigh((H + H.mH) / 2)  # r, r x r
    s = torch.sqrt(torch.clamp(1 + mu, min=torch.finfo(mu.dtype).eps))
    g = (-mu / (s * (1 + s))).to(V.dtype)  # r
    eye = torch.eye(E.shape[0], dtype=E.dtype, device=E.device)
    delta = E + ((eye + E) @ V * g) @ V.mH  # r x r, polar(S) - I
    # Forming S^H S squares the condition number of S: one Newton-Schulz step Z <- Z + Z (I - Z^H Z) / 2 on the
    # r x r factor Z = I + delta restores unitarity to rounding for a well-conditioned S (it is exactly a no-op
    # for a zero update). For a large or near-singular step (||I - Z^H Z|| not small) the factor is instead the
    # polar factor U V^H of the r x r SVD S = U Sigma V^H, unitary to rounding whatever cond(S) is (S singular:
    # one of the polar factors). Either way W_new is unitary whenever W is.
    Z = eye + delta
    defect = eye - Z.mH @ Z  # r x r
    defect_norm = torch.linalg.matrix_norm(defect).item()  # Frobenius >= 2-norm
    if defect_norm < 0.5:  # Newton-Schulz converges only for ||I - Z^H Z|| < 1
        delta = delta + Z @ defect / 2
        Z = eye + delta
        defect_norm = torch.linalg.matrix_norm(eye - Z.mH @ Z).item()
    if not defect_norm <= _POLAR_FACTOR_TOL * E.shape[0] * torch.finfo(mu.dtype).eps:  # NaN included
        U, _, Vh = torch.linalg.svd(eye + E)  # r x r
        delta = U @ Vh - eye
    return _apply(W, Q, delta, out)


def expm_low_rank_tangent(
    W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``W exp(skew(W^H A B^H))``, ``skew(X) = (X - X^H) / 2``, in O(k N^2) through one r x r ``eigh``.

    With ``W^H A B^H = Q E Q^H``: ``skew(W^H A B^H) = Q K Q^H`` with ``K = (E - E^H) / 2`` (r x r, skew-Hermitian),
    and ``exp(Q K Q^H) = I + Q (exp(K) - I) Q^H`` because Q has orthonormal columns. ``i K`` is Hermitian:

        i K = V diag(lam) V^H  (eigh, complex even for real W),    exp(K) - I = V diag(e^{-i lam} - 1) V^H,
        e^{-i lam} - 1 = -2 sin^2(lam / 2) - i sin(lam)     (no cancellation for tiny lam; exactly 0 at lam = 0),
        W_new = W + (W Q) (exp(K) - I) Q^H.

    ``exp(K)`` is unitary for any K, so the step never leaves the manifold beyond rounding, whatever its size.
    ``out`` (N x N, may be W itself) receives the result instead of a new tensor.
    """
    _check_factors(W, A, B)
    _check_out(W, out)
    W = W.contiguous()  # a column-major W (e.g. straight from a QR) would make every N x N pass a strided copy
    Q, E = _subspace(W, A, B)  # N x r, r x r
    K = (E - E.mH) / 2  # r x r, skew-Hermitian
    iK = 1j * K.to(complex_dtype(K.dtype))  # r x r, Hermitian
    lam, V = torch.linalg.eigh((iK + iK.mH) / 2)  # r, r x r (complex), lam ascending
    if not W.is_complex():
        # real K: the spectrum of i K is symmetric (lam, -lam with conjugate eigenvectors); enforce that exactly so
        # that the imaginary parts of the pairs cancel and the real part below stays orthogonal even for huge lam
        lam = (lam - lam.flip(0)) / 2
    phase = torch.complex(-2 * torch.sin(lam / 2).square(), -torch.sin(lam))  # r, e^{-i lam} - 1
    delta = (V * phase) @ V.mH  # r x r, exp(K) - I
    if not W.is_complex():
        delta = delta.real  # exp of a real skew-symmetric matrix is real
    return _apply(W, Q, delta, out)


def _low_rank_step(update, W, G, lr, rank, sampling, generator, out) -> torch.Tensor:
    """``update(W, -lr a, b, out=out)`` with ``a b^H`` the rank-``rank`` approximation of the gradient G: the part
    projUNN-D and projUNN-T share (they differ in ``update``)."""
    lr = _check_step_arguments(W, G, lr)
    with torch.no_grad():
        a, b = low_rank_approximation(G, rank, sampling, generator=generator)  # N x k, N x k
        return update(W.detach(), -lr * a, b, out=out)


def projunn_direct_step(
    W: torch.Tensor,
    G: torch.Tensor,
    lr: float,
    rank: int = 1,
    sampling: str = "lsi",
    generator: torch.Generator | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """projUNN-D: ``W_new = polar(W - lr a b^H)`` with ``a b^H`` the rank-k approximation of the gradient G.

    W: N x N unitary (complex) or orthogonal (real); G: N x N, ``W.grad``. O(k N^2) (``sampling="exact"``: O(N^3)).
    Returns the new matrix (W is not modified), or writes it into ``out`` (which may be W: an in-place step).
    """
    return _low_rank_step(polar_low_rank_update, W, G, lr, rank, sampling, generator, out)


def projunn_tangent_step(
    W: torch.Tensor,
    G: torch.Tensor,
    lr: float,
    rank: int = 1,
    sampling: str = "lsi",
    generator: torch.Generator | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """projUNN-T: ``W_new = W exp(-lr skew(W^H a b^H))`` with ``a b^H`` the rank-k approximation of the gradient G.

    ``W skew(W^H G)`` is the orthogonal projection of G on the tangent space of U(N) (O(N)) at W, so this is a
    Riemannian gradient step with the exponential map. W: N x N unitary or orthogonal; G: N x N, ``W.grad``.
    O(k N^2) (``sampling="exact"``: O(N^3)). Returns the new matrix (W is not modified),
    or writes it into ``out`` (which may be W: an in-place step).
    """
    return _low_rank_step(expm_low_rank_tangent, W, G, lr, rank, sampling, generator, out)


__all__ = [
    "SAMPLINGS",
    "check_learning_rate",
    "expm_low_rank_tangent",
    "low_rank_approximation",
    "polar_low_rank_update",
    "projunn_direct_step",
    "projunn_tangent_step",
]
