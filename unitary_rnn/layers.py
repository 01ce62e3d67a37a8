"""Square linear layers whose weight lives on U(N) (:class:`UnitaryLinear`) or O(N) (:class:`OrthogonalLinear`).

Drop-in replacements for a square ``nn.Linear`` (``y = x W^T + b``) in any network, e.g. the deep feed-forward
networks of the projUNN paper. The weight is a parameter declared on the manifold (:class:`~unitary_rnn.manifold.ManifoldModule`);
it stays there only if it is trained by a manifold-aware optimizer (``unitary_rnn.training.optim.UnitaryOptimizer``
with the Cayley, projUNN-D or projUNN-T step, or the functions of :mod:`unitary_rnn.training.projunn` directly). A plain
``torch.optim`` optimizer is refused at its first step, and an off-manifold edit is reported at the next forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .manifold import ManifoldModule, mark_manifold
from .parametrizations import random_unitary

INITS = ("haar", "identity")


class _ManifoldLinear(ManifoldModule):
    """Shared body of the two layers: a square weight on the manifold, an optional bias, ``F.linear``."""

    manifold: str = ""
    manifold_parameter_names = ("weight",)

    def __init__(
        self,
        features: int,
        bias: bool = True,
        init: str = "haar",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if isinstance(features, bool) or not isinstance(features, int) or features < 1:
            raise ValueError(f"features must be a positive integer, got {features!r}")
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; valid: {INITS}")
        dtype = self._resolve_dtype(dtype)
        self.in_features = self.out_features = features
        self.init = init
        self.weight = mark_manifold(nn.Parameter(torch.empty(features, features, device=device, dtype=dtype)), self.manifold)
        self.bias = nn.Parameter(torch.empty(features, device=device, dtype=dtype)) if bias else None
        self.reset_parameters(generator)

    def _resolve_dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        raise NotImplementedError

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Weight: Haar-random (``init="haar"``, drawn with ``generator``) or the identity (``init="identity"``);
        bias: zero."""
        W = self.weight
        with torch.no_grad():
            if self.init == "identity":
                W.copy_(torch.eye(self.in_features, dtype=W.dtype, device=W.device))
            else:
                W.copy_(random_unitary(self.in_features, generator=generator, dtype=W.dtype, device=W.device))
            if self.bias is not None:
                self.bias.zero_()

    def extra_repr(self) -> str:
        return f"features={self.in_features}, bias={self.bias is not None}, dtype={self.weight.dtype}"


class UnitaryLinear(_ManifoldLinear):
    """``y = x W^T + b`` with ``W`` in U(N) (complex), ``b`` complex (optional).

    Args:
        features: N, the input and output width.
        bias: add a learned complex bias (zero at init).
        init: ``"haar"`` (Haar-random unitary) or ``"identity"``.
        dtype: a complex dtype (default ``torch.complex64``).
        generator: seeds the Haar-random init.

    Input: ``(..., N)`` complex; a real input is promoted to the weight's complex dtype. Without bias, the layer
    preserves the Euclidean norm of every input row exactly (up to rounding).
    """

    manifold = "unitary"

    def _resolve_dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        dtype = torch.complex64 if dtype is None else dtype
        if not dtype.is_complex:
            raise TypeError(f"UnitaryLinear needs a complex dtype (torch.complex64, torch.complex128), got {dtype}")
        return dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"UnitaryLinear expects inputs of shape (..., {self.in_features}), got {tuple(x.shape)}")
        self.check_manifold()
        if not x.is_complex():
            x = x.to(self.weight.dtype)
        return F.linear(x, self.weight, self.bias)


class OrthogonalLinear(_ManifoldLinear):
    """``y = x W^T + b`` with ``W`` in O(N) (real), ``b`` real (optional).

    Args:
        features: N, the input and output width.
        bias: add a learned bias (zero at init).
        init: ``"haar"`` (Haar-random orthogonal) or ``"identity"``.
        dtype: a real floating dtype (default: torch's default dtype).
        generator: seeds the Haar-random init.

    Input: ``(..., N)`` real. Without bias, the layer preserves the Euclidean norm of every input row.
    """

    manifold = "orthogonal"

    def _resolve_dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if not dtype.is_floating_point:
            raise TypeError(f"OrthogonalLinear needs a real floating dtype (e.g. torch.float32), got {dtype}")
        return dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"OrthogonalLinear expects inputs of shape (..., {self.in_features}), got {tuple(x.shape)}")
        if x.is_complex():
            raise TypeError("OrthogonalLinear takes a real input; use UnitaryLinear for complex inputs")
        self.check_manifold()
        return F.linear(x, self.weight, self.bias)


__all__ = ["INITS", "OrthogonalLinear", "UnitaryLinear"]
