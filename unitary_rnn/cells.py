"""The unitary / orthogonal recurrent cell and its fused recurrence.

Maths (DESIGN.md section 3), hidden state h in C^N, W in U(N) (or R^N and O(N) for ``field="real"``):

    z_t = W h_{t-1} + V x_t;     h_t = modReLU(z_t) = z_t / |z_t| * relu(|z_t| + b)

Speed. A Python loop over complex ops costs several small kernels per step. Here the complex state is
kept as real features ``[Re h ; Im h]`` (2N), and W as the real 2N x 2N block matrix

    M = [[A, -B], [B, A]],  W = A + iB,     so that   [Re z ; Im z] = M [Re h ; Im h],

built once per forward. ``V x_t`` is computed for all t in one matmul up front. The recurrence itself is
a custom autograd function (:class:`UnitaryRecurrence`): the forward loop runs without autograd (one
``addmm`` and a fused modReLU per step), and the backward is hand-written BPTT whose weight gradient is
one matmul over all steps at the end, ``dM^T = sum_t h_{t-1}^T dz_t``. The plain autograd loop
(:func:`reference_recurrence`) is kept as the reference it is tested against.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .manifold import ManifoldModule, mark_manifold
from .parametrizations import (
    modrelu,
    modrelu_grouped,
    random_restricted_parameters,
    random_unitary,
    restricted_unitary_apply,
    restricted_unitary_matrix,
)

logger = logging.getLogger(__name__)

__all__ = ["UnitaryRNNCell", "UnitaryRecurrence", "unitary_recurrence", "reference_recurrence", "real_block_matrix"]

RESTRICTED_PARAMETERS = ("theta1", "theta2", "theta3", "reflection1", "reflection2")
RESTRICTED_FFT_ABOVE = 512
"""``restricted_apply="auto"`` materialises the restricted W (fused recurrence) up to this many units and
applies it with FFTs above: forward + backward, batch 20, 100 steps, one CPU thread, the FFT loop
overtakes the dense step between N = 512 and N = 1024 (N = 512: 324 ms dense, 444 ms FFT; N = 1024:
1581 ms dense, 724 ms FFT)."""
PERMUTATION_SEED = 1234
"""Seed of the restricted parametrisation's fixed permutation Pi: the same N always gives the same Pi."""


def real_block_matrix(W: torch.Tensor) -> torch.Tensor:
    """The real ``2N x 2N`` matrix ``X`` with ``[Re z, Im z] = [Re h, Im h] @ X`` for ``z = W h``
    (row form): ``X = M^T = [[A^T, B^T], [-B^T, A^T]]``, ``W = A + iB``. A real W gives ``W^T``.
    Differentiable in ``W``."""
    if not W.is_complex():
        return W.mT
    A, B = W.real.mT, W.imag.mT
    return torch.cat([torch.cat([A, B], dim=1), torch.cat([-B, A], dim=1)], dim=0)


class UnitaryRecurrence(torch.autograd.Function):
    """The fused recurrence ``h_t = modReLU(h_{t-1} @ X + u_t)`` over all t, with hand-written BPTT.

    Shapes: ``u`` ``(T, B, g*N)`` (time-major), ``X`` ``(g*N, g*N)`` (:func:`real_block_matrix`), ``bias``
    ``(N,)``, ``h0`` ``(B, g*N)``; ``g = 2`` for complex states stored ``[Re ; Im]``, ``g = 1`` for real
    ones. Returns ``H`` ``(T, B, g*N)``, every step's state. Backward, with ``n_t = sqrt(sum_g z^2 + eps)``,
    ``s = relu(n + b) / n``, ``m = [n + b > 0]``, ``k = (m - s) / n^2``, ``q = <dh, z>_g``:

        dz_t = dh_t * s + z_t * k * q;   dh_{t-1} += dz_t @ X^T;   dX = sum_t h_{t-1}^T dz_t;
        du_t = dz_t;   db = sum_t m / n * q.
    """

    @staticmethod
    def forward(ctx, u, X, bias, h0, eps, groups):
        T, B, D = u.shape
        N = D // groups
        one = torch.ones((), dtype=u.dtype, device=u.device)
        eps_t = torch.full((), eps, dtype=u.dtype, device=u.device)
        Z = u.clone()  # z_t = u_t + h_{t-1} X, accumulated in place: no per-step allocation or copy
        H = torch.empty_like(u)
        norms = u.new_empty(T, B, 1, N)  # n_t = sqrt(sum_g z^2 + eps), kept for the backward
        scales = u.new_empty(T, B, 1, N)  # s_t = relu(n_t + b) / n_t
        # per-step views made once (unbind), so that the loop does no indexing
        z_rows, h_rows = Z.unbind(0), H.unbind(0)
        zg = Z.view(T, B, groups, N)
        z_groups, h_groups = zg.unbind(0), H.view(T, B, groups, N).unbind(0)
        z_parts = [zg[:, :, k : k + 1].unbind(0) for k in range(groups)]  # Re, Im parts as (B, 1, N)
        n_rows, s_rows = norms.unbind(0), scales.unbind(0)
        h = h0
        for t in range(T):
            z_rows[t].addmm_(h, X)
            n = torch.addcmul(eps_t, z_parts[0][t], z_parts[0][t], out=n_rows[t])
            if groups == 2:
                n.addcmul_(z_parts[1][t], z_parts[1][t])
            n.sqrt_()
            s = torch.addcdiv(one, bias, n, out=s_rows[t]).clamp_min_(0)  # relu(n + b) / n = relu(1 + b / n)
            torch.mul(z_groups[t], s, out=h_groups[t])
            h = h_rows[t]
        ctx.save_for_backward(X, bias, h0, Z, H, norms, scales)
        ctx.groups = groups
        return H

    @staticmethod
    @once_differentiable
    def backward(ctx, dH):
        X, bias, h0, Z, H, n, S = ctx.saved_tensors
        groups = ctx.groups
        T, B, D = Z.shape
        N = D // groups
        Zg = Z.view(T, B, groups, N)
        # k_t = (m_t - s_t) / n_t^2 for all steps at once (it does not depend on the carried gradient)
        mask = S > 0
        K = mask.to(Z.dtype).sub_(S).div_(n).div_(n)
        # G[t] = dL/dh_t: the direct gradient, plus dz_{t+1} X^T added in place when step t+1 is done
        G = dH.clone(memory_format=torch.contiguous_format)
        dZ = torch.empty_like(Z)
        Q = torch.empty_like(n)
        tmp = Z.new_empty(B, groups, N)
        kq = Z.new_empty(B, 1, N)
        Xt = X.mT
        g_rows, g_groups = G.unbind(0), G.view(T, B, groups, N).unbind(0)
        dz_rows, dz_groups = dZ.unbind(0), dZ.view(T, B, groups, N).unbind(0)
        z_groups, s_rows, k_rows, q_rows = Zg.unbind(0), S.unbind(0), K.unbind(0), Q.unbind(0)
        for t in range(T - 1, -1, -1):
            gh, zt = g_groups[t], z_groups[t]
            q = torch.sum(torch.mul(gh, zt, out=tmp), 1, keepdim=True, out=q_rows[t])
            torch.mul(gh, s_rows[t], out=dz_groups[t]).addcmul_(zt, torch.mul(k_rows[t], q, out=kq))
            if t > 0:
                g_rows[t - 1].addmm_(dz_rows[t], Xt)
        dh0 = dZ[0] @ Xt
        dX = h0.mT @ dZ[0]
        if T > 1:
            dX.addmm_(H[:-1].reshape(-1, D).mT, dZ[1:].reshape(-1, D))
        dbias = (Q.div_(n) * mask).sum(dim=(0, 1, 2))
        return dZ, dX, dbias, dh0, None, None


def unitary_recurrence(u: torch.Tensor, X: torch.Tensor, bias: torch.Tensor, h0: torch.Tensor, eps: float, groups: int) -> torch.Tensor:
    """Run :class:`UnitaryRecurrence` (see there for shapes); all tensors must share one dtype."""
    return UnitaryRecurrence.apply(u.contiguous(), X.contiguous(), bias, h0.contiguous(), eps, groups)


def reference_recurrence(u: torch.Tensor, X: torch.Tensor, bias: torch.Tensor, h0: torch.Tensor, eps: float, groups: int) -> torch.Tensor:
    """The same map as :func:`unitary_recurrence`, as a plain autograd loop (the test reference)."""
    T, B, D = u.shape
    h, out = h0, []
    for t in range(T):
        z = (h @ X + u[t]).view(B, groups, D // groups)
        h = modrelu_grouped(z, bias, eps).view(B, D)
        out.append(h)
    return torch.stack(out)


_NARROW_FLOATS = (torch.float16, torch.bfloat16)


class UnitaryRNNCell(ManifoldModule):
    """One unitary (``field="complex"``) or orthogonal (``field="real"``) recurrent layer.

    Parameters: ``input_weight`` V ``(g*N, input_size)`` (rows ``[Re V ; Im V]``), ``hidden_bias`` b ``(N,)``,
    ``initial_state`` h_0 ``(g*N,)`` (learned, ``[Re ; Im]``), and W: ``recurrent_weight``, one complex
    ``N x N`` parameter on U(N) (real, on O(N), for ``field="real"``; declared in
    ``manifold_parameter_names``, see :class:`~unitary_rnn.manifold.ManifoldModule`) for
    ``parametrization="full"``, or ``theta1..3`` ``(N,)``, ``reflection1..2`` ``(2, N)`` and the buffer
    ``permutation`` for ``"restricted"``. Each forward of the full cell first runs
    :meth:`~unitary_rnn.manifold.ManifoldModule.check_manifold` (W changed off the manifold by anything but a
    manifold optimizer raises).

    Casting: a real-dtype cast (``.to(torch.bfloat16)``, ``.half()``, ``.float()``, ``.double()``) keeps W
    on its manifold: a complex W stays complex (complex128 for float64, complex64 otherwise), and neither
    a real W nor the restricted parametrisation's angles and reflections go below float32 (there is no
    half-precision complex arithmetic on CPU, and a half-precision W drifts off the manifold). The
    recurrence runs in W's precision and returns features in the dtype of ``input_weight``. A cast to a
    complex dtype (``.to(torch.complex32)``, ``.to(torch.complex64)``) raises ``TypeError``: the
    features are real, and W's complex dtype follows the real precision.
    """

    manifold_parameter_names = ("recurrent_weight",)

    def __init__(self, config):
        super().__init__()
        self.config = config
        N = config.hidden_size
        self.hidden_size = N
        self.groups = 2 if config.field == "complex" else 1
        self.parametrization = config.parametrization
        self.eps = config.modrelu_eps
        D = self.groups * N
        self.input_weight = nn.Parameter(torch.empty(D, config.input_size))
        self.hidden_bias = nn.Parameter(torch.empty(N))
        self.initial_state = nn.Parameter(torch.empty(D))
        if config.parametrization == "full":
            dtype = torch.complex64 if config.field == "complex" else torch.float32
            self.recurrent_weight = mark_manifold(nn.Parameter(torch.empty(N, N, dtype=dtype)))
        else:
            # never below float32, even when built under a half-precision default dtype (from_pretrained(dtype=...))
            real = torch.float32 if torch.get_default_dtype() in _NARROW_FLOATS else torch.get_default_dtype()
            for k in (1, 2, 3):
                setattr(self, f"theta{k}", nn.Parameter(torch.empty(N, dtype=real)))
            for k in (1, 2):
                setattr(self, f"reflection{k}", nn.Parameter(torch.empty(2, N, dtype=real)))
            self.register_buffer("permutation", torch.empty(N, dtype=torch.long))
        if not self.input_weight.is_meta:
            self.reset_parameters()

    @torch.no_grad()
    def initial_values(self) -> dict[str, torch.Tensor]:
        """Fresh initial values of every parameter and buffer, by name (drawn from the global RNG).

        V: Glorot uniform; b: U(-0.01, 0.01); h_0: U(-sqrt(3 / D), sqrt(3 / D)) (Arjovsky et al.); W per
        ``config.unitary_init``: identity, Haar-random, or a random restricted product (for the
        restricted parametrisation: its angles U(-pi, pi), reflections U(-1, 1), and the fixed permutation
        drawn with ``PERMUTATION_SEED``)."""
        D, N = self.input_weight.shape[0], self.hidden_size
        bound = math.sqrt(6.0 / (D + self.input_weight.shape[1]))
        h_bound = math.sqrt(3.0 / D)
        values = {
            "input_weight": torch.empty(self.input_weight.shape, dtype=torch.float64).uniform_(-bound, bound),
            "hidden_bias": torch.empty(N, dtype=torch.float64).uniform_(-0.01, 0.01),
            "initial_state": torch.empty(D, dtype=torch.float64).uniform_(-h_bound, h_bound),
        }
        init = self.config.unitary_init
        if self.parametrization == "full":
            W = self.recurrent_weight
            if init == "identity":
                value = torch.eye(N, dtype=W.dtype)
            elif init == "random":
                value = random_unitary(N, dtype=W.dtype)
            else:
                value = restricted_unitary_matrix(**random_restricted_parameters(N, dtype=torch.float64))
            values["recurrent_weight"] = value
        else:
            values.update(random_restricted_parameters(N, dtype=torch.float64))
            # the permutation is a fixed (not learned) part of the architecture: a deterministic buffer
            values["permutation"] = torch.randperm(N, generator=torch.Generator().manual_seed(PERMUTATION_SEED))
        return values

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-initialise every parameter and buffer with :meth:`initial_values`."""
        for name, value in self.initial_values().items():
            target = getattr(self, name)
            target.copy_(value.to(target.dtype))

    # ------------------------------------------------------------------ W
    def recurrent_matrix(self) -> torch.Tensor:
        """W as a dense ``N x N`` matrix (complex, or real for ``field="real"``); differentiable."""
        if self.parametrization == "full":
            return self.recurrent_weight
        return restricted_unitary_matrix(
            *(getattr(self, name) for name in RESTRICTED_PARAMETERS), permutation=self.permutation
        )

    @property
    def compute_dtype(self) -> torch.dtype:
        """The real dtype the recurrence runs in: W's precision."""
        ref = self.recurrent_weight if self.parametrization == "full" else self.theta1
        return ref.real.dtype if ref.is_complex() else ref.dtype

    @property
    def uses_fft(self) -> bool:
        """Whether the restricted W is applied with FFTs every step (O(N log N)) instead of being
        materialised once per forward and run through the fused recurrence (``config.restricted_apply``;
        ``"auto"``: FFTs above ``RESTRICTED_FFT_ABOVE`` units)."""
        if self.parametrization != "restricted":
            return False
        mode = getattr(self.config, "restricted_apply", "auto")
        return mode == "fft" or (mode == "auto" and self.hidden_size > RESTRICTED_FFT_ABOVE)

    def forward(self, inputs: torch.Tensor, initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``inputs`` ``(batch, time, input_size)`` real -> (every state ``(batch, time, g*N)``, last state
        ``(batch, g*N)``) as real ``[Re ; Im]`` features. ``initial_state`` ``(batch, g*N)`` overrides h_0."""
        if inputs.ndim != 3:
            raise ValueError(f"inputs must be (batch, time, input_size), got shape {tuple(inputs.shape)}")
        if self.parametrization == "full":
            self.check_manifold()
        batch, steps, _ = inputs.shape
        out_dtype = self.input_weight.dtype
        dtype = self.compute_dtype
        if initial_state is None:
            h0 = self.initial_state.to(dtype).expand(batch, -1)
        else:
            h0 = initial_state.to(dtype)
        if steps == 0:
            return inputs.new_zeros(batch, 0, h0.shape[-1], dtype=out_dtype), h0.to(out_dtype)
        bias = self.hidden_bias.to(dtype)
        V = self.input_weight.to(dtype)
        if self.uses_fft:
            states = self._forward_fft(inputs.to(dtype) @ V.mT, h0, bias).to(out_dtype)
            return states, states[:, -1]
        X = real_block_matrix(self.recurrent_matrix()).to(dtype)
        # V x_t for every step in one matmul, laid out time-major for the loop
        u = inputs.to(dtype).transpose(0, 1) @ V.mT
        H = unitary_recurrence(u, X, bias, h0, self.eps, self.groups)
        states = H.transpose(0, 1).to(out_dtype)
        return states, states[:, -1]

    def _forward_fft(self, u: torch.Tensor, h0: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """The restricted recurrence with W applied by :func:`restricted_unitary_apply` every step, as a
        plain autograd loop over complex states; ``u`` ``(batch, time, 2N)`` -> states ``(batch, time, 2N)``."""
        N = self.hidden_size
        params = [getattr(self, name) for name in RESTRICTED_PARAMETERS]
        uc = torch.complex(u[..., :N], u[..., N:])
        h = torch.complex(h0[..., :N], h0[..., N:])
        states = []
        for t in range(uc.shape[1]):
            h = modrelu(restricted_unitary_apply(h, *params, self.permutation) + uc[:, t], bias, self.eps)
            states.append(h)
        states = torch.stack(states, dim=1)
        return torch.cat([states.real, states.imag], dim=-1)

    # ------------------------------------------------------------------ dtype safety
    def _apply(self, fn, recurse=True):
        refuse_complex_conversion(fn, type(self).__name__)
        kept = RESTRICTED_PARAMETERS if self.parametrization == "restricted" else self.manifold_parameter_names
        guarded_ids = {id(p) for name, p in self._parameters.items() if p is not None and name in kept}
        guarded_ids |= {id(p.grad) for name, p in self._parameters.items() if p is not None and name in kept and p.grad is not None}

        def guarded(t):
            if id(t) not in guarded_ids:
                return fn(t)
            return _cast_keeping_manifold(fn, t, self)

        return super()._apply(guarded, recurse)


def refuse_complex_conversion(fn, owner: str) -> None:
    """Raise ``TypeError`` if the module conversion ``fn`` casts real tensors to a complex dtype (probed on a
    float32 scalar), before anything is converted."""
    probe = fn(torch.zeros((), dtype=torch.float32))
    if isinstance(probe, torch.Tensor) and probe.dtype.is_complex:
        raise TypeError(
            f"{owner}: cannot convert to {probe.dtype}: the inputs, heads and features are real, and W's complex "
            "dtype follows the real precision (.float(): complex64 W, .double(): complex128 W; .half() / "
            ".to(torch.bfloat16) keep W in complex64)"
        )


def _cast_keeping_manifold(fn, t: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """Apply the module-conversion ``fn`` to a manifold tensor ``t`` without leaving the manifold.

    ``fn`` is probed on float32 and float64 scalars to learn which real dtype it casts to (if any):
    float64 -> complex128 (W complex) / float64; float32 -> complex64 / float32; float16 / bfloat16 ->
    the dtype is kept (there is no bfloat16 complex type, and a half-precision W drifts off the
    manifold), with a warning. Device moves apply as usual."""
    probe32 = fn(torch.zeros((), dtype=torch.float32, device=t.device))
    probe64 = fn(torch.zeros((), dtype=torch.float64, device=t.device))
    if not isinstance(probe32, torch.Tensor) or not isinstance(probe64, torch.Tensor):
        return fn(t)
    if probe32.dtype != torch.float32:
        target = probe32.dtype
    elif probe64.dtype != torch.float64:
        target = probe64.dtype
    else:
        target = None  # fn does not change real dtypes: a device move, or a no-op
    if target is None or target.is_complex:
        return fn(t)
    if target in _NARROW_FLOATS:
        if t.dtype in _NARROW_FLOATS:  # built under a half-precision default dtype: promote
            return t.to(device=probe32.device, dtype=torch.float32)
        if getattr(module, "parametrization", "full") == "restricted":
            what = "restricted parametrisation's angles and reflections"
        else:
            what = f"{'unitary' if t.is_complex() else 'orthogonal'} recurrent matrix"
        logger.warning(
            "%s: keeping the %s in %s under a cast to %s (W must stay on the manifold); the recurrence runs "
            "in that precision.", type(module).__name__, what, t.dtype, target,
        )
        return t.to(device=probe32.device)
    if t.is_complex():
        target = torch.complex128 if target == torch.float64 else torch.complex64
    return t.to(device=probe32.device, dtype=target)
