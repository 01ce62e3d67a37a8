"""Pure tensor maths for unitary / orthogonal recurrent matrices and the modReLU nonlinearity.

Convention: matrices act on *column* vectors, as in the papers (``z = W h``). Batched states are rows
``h`` of shape ``(..., N)``, so applying ``W`` to every row is ``h @ W.T`` (a plain transpose, not the
conjugate one). Every function here is a pure function of its tensor arguments and differentiable
with respect to its *real* parameter tensors (``torch.func``-friendly), so the capacity checker can
take the Jacobian of ``theta -> W(theta)``.

Functions
---------
- :func:`random_unitary`: Haar-distributed unitary (complex dtype) or orthogonal (real dtype) matrix.
- :func:`restricted_unitary_apply` / :func:`restricted_unitary_matrix`: Arjovsky et al.'s restricted
  product ``W = D3 R2 F^-1 D2 Pi R1 F D1`` (7N real parameters), applied in O(N log N) or materialised.
- :func:`random_restricted_parameters`: a random point of that parametrisation.
- :func:`modrelu` (complex) and :func:`real_modrelu` (its real counterpart), NaN-free at zero.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "complex_dtype",
    "random_unitary",
    "random_restricted_parameters",
    "restricted_unitary_apply",
    "restricted_unitary_matrix",
    "reflection_apply",
    "modrelu",
    "real_modrelu",
    "modrelu_grouped",
    "REFLECTION_EPS",
    "MODRELU_EPS",
]

REFLECTION_EPS = 1e-12
"""Floor on ``||v||^2`` in a reflection: ``v = 0`` gives the identity, never a NaN."""

MODRELU_EPS = 1e-8
"""Default ``eps`` inside ``|z| = sqrt(Re^2 + Im^2 + eps)`` in modReLU."""


def complex_dtype(dtype: torch.dtype) -> torch.dtype:
    """The complex dtype whose real part is ``dtype`` (complex dtypes map to themselves)."""
    if dtype.is_complex:
        return dtype
    return {torch.float64: torch.complex128, torch.float32: torch.complex64}.get(dtype, torch.complex64)


def random_unitary(
    n: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.complex64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A Haar-random ``n x n`` unitary matrix (``dtype`` complex) or orthogonal matrix (``dtype`` real).

    Mezzadri's recipe: ``Z`` with i.i.d. standard (complex) Gaussian entries, ``Z = Q R`` (QR), then
    ``W = Q diag(r_ii / |r_ii|)``. The phase fix makes the distribution exactly Haar (plain ``Q`` is
    not). Computed in float64 / complex128 on the CPU with ``generator``, then cast to ``dtype`` and
    moved to ``device``.
    """
    if dtype.is_complex:
        re = torch.randn(n, n, generator=generator, dtype=torch.float64)
        im = torch.randn(n, n, generator=generator, dtype=torch.float64)
        z = torch.complex(re, im) / math.sqrt(2.0)
    elif dtype.is_floating_point:
        z = torch.randn(n, n, generator=generator, dtype=torch.float64)
    else:
        raise TypeError(f"random_unitary needs a complex or floating dtype, got {dtype}")
    q, r = torch.linalg.qr(z)
    d = torch.diagonal(r)
    phase = d / d.abs().clamp_min(torch.finfo(torch.float64).tiny)
    return (q * phase.unsqueeze(0)).to(dtype=dtype, device=device)


def _as_complex_vector(v: torch.Tensor) -> torch.Tensor:
    """A reflection vector given as complex ``(N,)`` or as real ``(2, N)`` = ``[Re; Im]``, as complex ``(N,)``."""
    if v.is_complex():
        return v
    if v.ndim != 2 or v.shape[0] != 2:
        raise ValueError(f"a real reflection vector must have shape (2, N) = [Re; Im], got {tuple(v.shape)}")
    return torch.complex(v[0], v[1])


def reflection_apply(h: torch.Tensor, v: torch.Tensor, eps: float = REFLECTION_EPS) -> torch.Tensor:
    """``R h`` for every row ``h`` (``(..., N)``), ``R = I - 2 v v^H / max(||v||^2, eps)``.

    ``v``: complex ``(N,)`` or real ``(2, N)`` = ``[Re v; Im v]``. For ``||v||^2 >= eps`` R is an exact
    Householder reflection (unitary, Hermitian); at ``v = 0`` it is the identity and the gradient with
    respect to ``v`` is finite (zero): no NaN in forward or backward.
    """
    v = _as_complex_vector(v)
    sq = (v.real.square() + v.imag.square()).sum()
    coef = (h * v.conj()).sum(-1, keepdim=True)  # v^H h for every row
    return h - (2.0 / sq.clamp_min(eps)) * coef * v


def _diag_phase(theta: torch.Tensor) -> torch.Tensor:
    return torch.polar(torch.ones_like(theta), theta)  # e^{i theta}, differentiable in theta


def restricted_unitary_apply(
    h: torch.Tensor,
    theta1: torch.Tensor,
    theta2: torch.Tensor,
    theta3: torch.Tensor,
    reflection1: torch.Tensor,
    reflection2: torch.Tensor,
    permutation: torch.Tensor,
) -> torch.Tensor:
    """``W h`` for every row ``h`` of ``(..., N)`` (i.e. ``h @ W.T``), in O(N log N), where

        W = D3 R2 F^-1 D2 Pi R1 F D1                      (Arjovsky, Shah & Bengio 2016)

    - ``Dk = diag(exp(i thetak))``, ``thetak`` real ``(N,)``;
    - ``Rk = I - 2 vk vk^H / ||vk||^2`` (see :func:`reflection_apply`), ``vk`` = ``reflectionk``,
      complex ``(N,)`` or real ``(2, N)`` = ``[Re; Im]`` (the real form is what models store, so
      the map is differentiable in real parameters);
    - ``F`` the unitary DFT (``torch.fft.fft(..., norm="ortho")``), ``F^-1`` its inverse;
    - ``Pi`` the fixed permutation ``(Pi x)_i = x_{permutation[i]}``.

    3N + 4N = 7N real parameters. ``h`` may be real or complex; the result is complex.
    """
    z = h.to(complex_dtype(theta1.dtype)) if not h.is_complex() else h
    z = z * _diag_phase(theta1)
    z = torch.fft.fft(z, dim=-1, norm="ortho")
    z = reflection_apply(z, reflection1)
    z = z[..., permutation]
    z = z * _diag_phase(theta2)
    z = torch.fft.ifft(z, dim=-1, norm="ortho")
    z = reflection_apply(z, reflection2)
    return z * _diag_phase(theta3)


def restricted_unitary_matrix(
    theta1: torch.Tensor,
    theta2: torch.Tensor,
    theta3: torch.Tensor,
    reflection1: torch.Tensor,
    reflection2: torch.Tensor,
    permutation: torch.Tensor,
) -> torch.Tensor:
    """The ``N x N`` complex matrix ``W = D3 R2 F^-1 D2 Pi R1 F D1`` of :func:`restricted_unitary_apply`.

    Built by applying the product to the identity: the rows of ``apply(I)`` are ``(W e_i)^T``, so
    ``W = apply(I).T`` and ``restricted_unitary_apply(h, ...) == h @ W.T``. O(N^2 log N).
    """
    n = theta1.shape[-1]
    eye = torch.eye(n, dtype=complex_dtype(theta1.dtype), device=theta1.device)
    return restricted_unitary_apply(eye, theta1, theta2, theta3, reflection1, reflection2, permutation).mT


def random_restricted_parameters(
    n: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """A random point of the restricted parametrisation, as in Arjovsky et al.'s code.

    ``theta1..3 ~ U(-pi, pi)``, ``reflection1..2`` real ``(2, N)`` with entries ``U(-1, 1)``,
    ``permutation`` a uniformly random permutation. Keys match the keyword arguments of
    :func:`restricted_unitary_matrix`.
    """
    def uniform(*shape, low, high):
        return torch.rand(*shape, generator=generator, dtype=torch.float64) * (high - low) + low

    out = {f"theta{k}": uniform(n, low=-math.pi, high=math.pi) for k in (1, 2, 3)}
    out.update({f"reflection{k}": uniform(2, n, low=-1.0, high=1.0) for k in (1, 2)})
    out = {k: t.to(dtype=dtype, device=device) for k, t in out.items()}
    out["permutation"] = torch.randperm(n, generator=generator).to(device)
    return out


def modrelu_grouped(z: torch.Tensor, bias: torch.Tensor, eps: float = MODRELU_EPS) -> torch.Tensor:
    """modReLU on real groups: ``z`` has shape ``(..., g, N)`` (``g = 2``: ``[Re; Im]`` of N complex units,
    ``g = 1``: N real units), ``bias`` ``(N,)``.

        n = sqrt(sum_g z^2 + eps);   out = z / n * relu(n + b)

    The building block of :func:`modrelu` and :func:`real_modrelu`, and the reference the fused
    recurrent kernel is tested against.
    """
    n = (z.square().sum(-2, keepdim=True) + eps).sqrt()
    return z * (torch.relu(n + bias) / n)


def modrelu(z: torch.Tensor, bias: torch.Tensor, eps: float = MODRELU_EPS) -> torch.Tensor:
    """modReLU (Arjovsky et al. 2016) of complex ``z`` ``(..., N)`` with real bias ``b`` ``(N,)``:

        |z| = sqrt(Re(z)^2 + Im(z)^2 + eps);   modReLU(z) = z / |z| * relu(|z| + b)

    ``eps > 0`` keeps forward and backward finite at ``z = 0`` (``torch.abs`` of a complex zero has a
    NaN gradient); the output there is 0.
    """
    if not z.is_complex():
        raise TypeError(f"modrelu needs a complex input, got {z.dtype}; use real_modrelu for real states")
    n = (z.real.square() + z.imag.square() + eps).sqrt()
    return z * (torch.relu(n + bias) / n)


def real_modrelu(x: torch.Tensor, bias: torch.Tensor, eps: float = MODRELU_EPS) -> torch.Tensor:
    """The real counterpart of modReLU, for orthogonal RNNs: ``sign(x) * relu(|x| + b)``, computed as

        |x| = sqrt(x^2 + eps);   out = x / |x| * relu(|x| + b)

    (the same smoothing of ``|x|`` as :func:`modrelu`; finite forward and backward at ``x = 0``).
    """
    n = (x.square() + eps).sqrt()
    return x * (torch.relu(n + bias) / n)
