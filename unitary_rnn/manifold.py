"""Shared primitives for parameters that live on U(N) (complex) or O(N) (real).

A parameter that an optimizer must keep on the manifold carries the attribute ``manifold``
(``"unitary"`` for complex, ``"orthogonal"`` for real). Modules set it with :func:`mark_manifold`
when they create the parameter; optimizers read it with :func:`manifold_of`.
"""

from __future__ import annotations

import torch
from torch import nn

MANIFOLDS = ("unitary", "orthogonal")


def mark_manifold(param: nn.Parameter, kind: str | None = None) -> nn.Parameter:
    """Tag ``param`` as living on U(N) or O(N); ``kind`` defaults from the dtype. Returns ``param``."""
    if param.ndim != 2 or param.shape[0] != param.shape[1]:
        raise ValueError(f"a manifold parameter must be a square matrix, got shape {tuple(param.shape)}")
    if kind is None:
        kind = "unitary" if param.is_complex() else "orthogonal"
    if kind not in MANIFOLDS:
        raise ValueError(f"unknown manifold {kind!r}; valid: {MANIFOLDS}")
    if (kind == "unitary") != param.is_complex():
        raise TypeError(f"manifold {kind!r} needs a {'complex' if kind == 'unitary' else 'real'} parameter, got {param.dtype}")
    param.manifold = kind
    return param


def manifold_of(param: torch.Tensor) -> str | None:
    """The manifold tag of ``param`` (``"unitary"``, ``"orthogonal"``) or ``None`` for a Euclidean parameter."""
    return getattr(param, "manifold", None)


def unitarity_error(W: torch.Tensor) -> torch.Tensor:
    """``||W^H W - I||_F``, the distance from unitarity (orthogonality for real W)."""
    eye = torch.eye(W.shape[-1], dtype=W.dtype, device=W.device)
    return torch.linalg.matrix_norm(W.mH @ W - eye)


def project_to_unitary(W: torch.Tensor) -> torch.Tensor:
    """The closest unitary (orthogonal) matrix to ``W`` in Frobenius norm: the polar factor ``U V^H``
    of ``W = U S V^H``."""
    U, _, Vh = torch.linalg.svd(W)
    return U @ Vh
