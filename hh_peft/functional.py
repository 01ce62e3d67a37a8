"""Pure tensor maths of Householder-SVD adaptation (HTA). No module state, no PEFT.

Torch convention: a linear layer's ``weight`` is ``out x in`` and ``y = x W^T + b``. Per layer

    delta_W = H(u_out) D H(u_in) + B A
    H(u)    = I - c(u) u u^T,   c(u) = 2 / ||u||^2 if ||u||^2 > eps else 0   ("normalized": orthogonal for every u)
                                c(u) = 1                                       ("paper": the printed I - v v^T)

``D`` is the ``out x in`` rectangular diagonal of ``m = min(in, out)`` values ``d``. Expanding the
product, with ``p = D^T u_out`` (in), ``q = D u_in`` (out) and ``s = u_out^T D u_in`` (scalar):

    H(u_out) D H(u_in) = D - c_o u_out p^T - c_i q u_in^T + c_o c_i s u_out u_in^T

so the whole update is "rectangular diagonal + rank (2 + r)":

    delta_W = D + U V^T,   U = [u_out, q, B]                         (out x (2 + r))
                           V = [c_o (c_i s u_in - p), -c_i u_in, A^T]  (in  x (2 + r))

No ``in x in`` or ``out x out`` matrix is ever built; ``delta_W`` itself costs O(in * out).
"""

from __future__ import annotations

import torch

HOUSEHOLDER_FORMS = ("normalized", "paper")


def householder_coefficient(u: torch.Tensor, form: str = "normalized", eps: float = 1e-12) -> torch.Tensor:
    """``c(u)`` in ``H(u) = I - c(u) u u^T``.

    ``"normalized"``: ``c = 2 / ||u||^2``, which makes ``H(u)`` an exact reflection (orthogonal, symmetric,
    involutory) for every non-zero ``u``; vectors with ``||u||^2 <= eps`` (a zero vector, or one whose square norm
    underflows) give ``c = 0``, i.e. ``H = I``, which is orthogonal too. The division only ever sees
    ``||u||^2 > eps`` (the "double where"), so neither the value nor its gradient can be NaN or inf.
    ``"paper"``: ``c = 1``, the printed ``I - v v^T`` (orthogonal only when ``||v||^2 = 2``).
    """
    if form == "normalized":
        square_norm = u.pow(2).sum()
        usable = square_norm > eps
        return torch.where(usable, 2.0 / torch.where(usable, square_norm, torch.ones_like(square_norm)), 0.0)
    if form == "paper":
        return torch.ones((), dtype=u.dtype, device=u.device)
    raise ValueError(f"unknown Householder form {form!r}; valid: {HOUSEHOLDER_FORMS}")


def householder_apply(x: torch.Tensor, u: torch.Tensor, coefficient: torch.Tensor) -> torch.Tensor:
    """``x H(u)`` for row vectors ``x`` (..., n): ``x - c (x . u) u``, O(n) per row. ``H(u)`` is symmetric, so this
    is also ``H(u) x`` for column vectors."""
    return x - coefficient * (x @ u).unsqueeze(-1) * u


def hta_factors(
    u_in: torch.Tensor,
    u_out: torch.Tensor,
    d: torch.Tensor,
    lora_A: torch.Tensor | None = None,
    lora_B: torch.Tensor | None = None,
    form: str = "normalized",
    eps: float = 1e-12,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Write ``delta_W = H(u_out) D H(u_in) + B A`` as ``D + U V^T`` (see the module docstring).

    Shapes: ``u_in`` (in,), ``u_out`` (out,), ``d`` (m,) with ``m = min(in, out)``, ``lora_A`` (r, in),
    ``lora_B`` (out, r). Returns ``(d, U, V)`` with ``U`` (out, 2 + r) and ``V`` (in, 2 + r). Cost O((in + out) r).
    """
    m = d.shape[0]
    c_in = householder_coefficient(u_in, form, eps)
    c_out = householder_coefficient(u_out, form, eps)
    p = torch.cat([d * u_out[:m], u_in.new_zeros(u_in.shape[0] - m)])  # D^T u_out: (in,)
    q = torch.cat([d * u_in[:m], u_out.new_zeros(u_out.shape[0] - m)])  # D u_in:    (out,)
    s = (d * u_out[:m] * u_in[:m]).sum()  # u_out^T D u_in
    U = [u_out, q]
    V = [c_out * (c_in * s * u_in - p), -c_in * u_in]
    U = torch.stack(U, dim=1)
    V = torch.stack(V, dim=1)
    if lora_A is not None and lora_A.shape[0] > 0:
        U = torch.cat([U, lora_B], dim=1)
        V = torch.cat([V, lora_A.T], dim=1)
    return d, U, V


def hta_factors_backward(
    u_in: torch.Tensor,
    u_out: torch.Tensor,
    d: torch.Tensor,
    lora_A: torch.Tensor | None,
    lora_B: torch.Tensor | None,
    grad_d: torch.Tensor,
    grad_U: torch.Tensor,
    grad_V: torch.Tensor,
    form: str = "normalized",
    eps: float = 1e-12,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The chain rule through :func:`hta_factors`, written out: from the gradients of a loss with respect to its
    outputs ``(d, U, V)`` to those with respect to its inputs ``(u_in, u_out, d, A, B)``. One pass of O(in + out + r)
    vector operations, no autograd graph (the folded layer's backward calls it once per adapter).

    With ``a = grad_V[:, 0]``, ``b = grad_V[:, 1]``, ``g_q = grad_U[:, 1]`` and the forward quantities ``c_i, c_o, p,
    q, s`` of :func:`hta_factors` (``v_0 = c_o (c_i s u_in - p)``, ``v_1 = -c_i u_in``, ``q = D u_in``, ``p = D^T u_out``):

        g_s   = c_o c_i (a . u_in)              g_p = -c_o a
        g_c_i = c_o s (a . u_in) - b . u_in     g_c_o = c_i s (a . u_in) - a . p
        g_d     = grad_d + g_q[:m] u_in[:m] + g_p[:m] u_out[:m] + g_s u_out[:m] u_in[:m]
        g_u_in  = c_o c_i s a - c_i b + [g_q[:m] d + g_s d u_out[:m]; 0] + g_c_i dc_i/du_in
        g_u_out = grad_U[:, 0] + [g_p[:m] d + g_s d u_in[:m]; 0] + g_c_o dc_o/du_out
        g_A = grad_V[:, 2:]^T,  g_B = grad_U[:, 2:]

    where ``dc/du = -c^2 u`` for ``c = 2 / ||u||^2`` (and 0 where ``c`` is 0, or for the constant ``"paper"`` form).
    """
    m = d.shape[0]
    c_in = householder_coefficient(u_in, form, eps)
    c_out = householder_coefficient(u_out, form, eps)
    u_in_m, u_out_m = u_in[:m], u_out[:m]
    s = (d * u_out_m * u_in_m).sum()
    a, b, g_q = grad_V[:, 0], grad_V[:, 1], grad_U[:, 1]
    a_dot_u_in = a @ u_in
    g_s = c_out * c_in * a_dot_u_in
    g_p_m = -c_out * a[:m]  # p is zero beyond m
    g_c_in = c_out * s * a_dot_u_in - b @ u_in
    g_c_out = c_in * s * a_dot_u_in - a[:m] @ (d * u_out_m)

    g_d = grad_d + g_q[:m] * u_in_m + g_p_m * u_out_m + g_s * u_out_m * u_in_m
    g_u_in = (c_out * c_in * s) * a - c_in * b
    g_u_in[:m] += (g_q[:m] + g_s * u_out_m) * d
    g_u_out = grad_U[:, 0].clone()
    g_u_out[:m] += (g_p_m + g_s * u_in_m) * d
    if form == "normalized":  # c = 2 / ||u||^2 (or the constant 0 below eps): dc/du = -c^2 u
        g_u_in -= (g_c_in * c_in * c_in) * u_in
        g_u_out -= (g_c_out * c_out * c_out) * u_out
    has_lora = lora_A is not None and lora_A.shape[0] > 0
    g_A = grad_V[:, 2:].T.contiguous() if has_lora else None
    g_B = grad_U[:, 2:].contiguous() if has_lora else None
    return g_u_in, g_u_out, g_d, g_A, g_B


def delta_weight(d: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``delta_W = D + U V^T`` as an ``out x in`` matrix, O(in * out)."""
    delta = U @ V.T
    m = d.shape[0]
    # Adding the diagonal out of place keeps autograd simple: diag(d) padded to (out, in).
    index = torch.arange(m, device=d.device)
    return delta.index_put((index, index), d, accumulate=True)


def folded_weight(weight: torch.Tensor, d: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``W + delta_W = W + D + U V^T`` as a new ``out x in`` matrix: one ``addmm`` pass over ``out x in`` plus an
    in-place add of ``d`` on the diagonal (O(m)). For use without autograd (the folded layer's forward/backward)."""
    folded = torch.addmm(weight, U, V.T)  # (out, in)
    folded.diagonal()[: d.shape[0]].add_(d)
    return folded


def hta_activation_delta(x: torch.Tensor, d: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``x delta_W^T`` for row vectors ``x`` (..., in) without building ``delta_W``: (..., out).

    ``x D^T`` puts ``x[..., :m] * d`` in the first ``m`` output features; the rank part is ``(x V) U^T``.
    """
    out_features = U.shape[0]
    m = d.shape[0]
    result = (x @ V) @ U.T
    diagonal_part = x[..., :m] * d
    if m == out_features:
        return result + diagonal_part
    return result + torch.nn.functional.pad(diagonal_part, (0, out_features - m))
