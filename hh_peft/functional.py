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


def householder_coefficient(u: torch.Tensor, householder: str = "normalized", eps: float = 1e-12) -> torch.Tensor:
    """``c(u)`` in ``H(u) = I - c(u) u u^T``.

    ``"normalized"``: ``c = 2 / ||u||^2``, which makes ``H(u)`` an exact reflection (orthogonal, symmetric,
    involutory) for every non-zero ``u``; vectors with ``||u||^2 <= eps`` (a zero vector, or one whose square norm
    underflows) give ``c = 0``, i.e. ``H = I``, which is orthogonal too. The division only ever sees
    ``||u||^2 > eps`` (the "double where"), so neither the value nor its gradient can be NaN or inf.
    ``"paper"``: ``c = 1``, the printed ``I - v v^T`` (orthogonal only when ``||v||^2 = 2``).
    """
    if householder == "normalized":
        square_norm = u @ u
        usable = square_norm > eps
        return torch.where(usable, 2.0 / torch.where(usable, square_norm, 1.0), 0.0)
    if householder == "paper":
        return torch.ones((), dtype=u.dtype, device=u.device)
    raise ValueError(f"unknown householder {householder!r}; valid: {HOUSEHOLDER_FORMS}")


def householder_apply(x: torch.Tensor, u: torch.Tensor, coefficient: torch.Tensor) -> torch.Tensor:
    """``x H(u)`` for row vectors ``x`` (..., n): ``x - c (x . u) u``, O(n) per row. ``H(u)`` is symmetric, so this
    is also ``H(u) x`` for column vectors."""
    return x - coefficient * (x @ u).unsqueeze(-1) * u


def hta_scalars(
    u_in: torch.Tensor, u_out: torch.Tensor, d: torch.Tensor, householder: str = "normalized", eps: float = 1e-12
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three scalars of :func:`hta_factors` and :func:`hta_factors_backward`: ``c(u_in)``, ``c(u_out)`` and
    ``s = u_out^T D u_in = sum_i d_i u_out[i] u_in[i]`` (i < m)."""
    m = d.shape[0]
    return householder_coefficient(u_in, householder, eps), householder_coefficient(u_out, householder, eps), (d * u_out[:m]) @ u_in[:m]


def hta_factors(
    u_in: torch.Tensor,
    u_out: torch.Tensor,
    d: torch.Tensor,
    lora_A: torch.Tensor | None = None,
    lora_B: torch.Tensor | None = None,
    householder: str = "normalized",
    eps: float = 1e-12,
    scalars: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Write ``delta_W = H(u_out) D H(u_in) + B A`` as ``D + U V^T`` (see the module docstring).

    Shapes: ``u_in`` (in,), ``u_out`` (out,), ``d`` (m,) with ``m = min(in, out)``, ``lora_A`` (r, in),
    ``lora_B`` (out, r). Returns ``(d, U, V)`` with ``U`` (out, 2 + r) and ``V`` (in, 2 + r), both transposed views of
    row-major ``(2 + r, out)`` / ``(2 + r, in)`` tensors. Cost O((in + out) r). ``scalars``: the result of
    :func:`hta_scalars` for these parameters, when the caller already has it.
    """
    m = d.shape[0]
    c_in, c_out, s = hta_scalars(u_in, u_out, d, householder, eps) if scalars is None else scalars
    q_m = d * u_in[:m]  # D u_in (zero beyond m):    (m,)
    p_m = d * u_out[:m]  # D^T u_out (zero beyond m): (m,)
    rank = lora_A.shape[0] if lora_A is not None else 0
    # Built as (k, out) / (k, in) rows and returned transposed: every product with U^T, V^T is then contiguous.
    U_t = u_out.new_zeros(2 + rank, u_out.shape[0])
    U_t[0] = u_out
    U_t[1, :m] = q_m
    V_t = u_in.new_zeros(2 + rank, u_in.shape[0])
    V_t[0] = (c_out * c_in * s) * u_in
    V_t[0, :m] -= c_out * p_m
    V_t[1] = -c_in * u_in
    if rank > 0:
        U_t[2:] = lora_B.T
        V_t[2:] = lora_A
    return d, U_t.T, V_t.T


def hta_factors_backward(
    u_in: torch.Tensor,
    u_out: torch.Tensor,
    d: torch.Tensor,
    lora_A: torch.Tensor | None,
    lora_B: torch.Tensor | None,
    grad_d: torch.Tensor,
    grad_U: torch.Tensor,
    grad_V: torch.Tensor,
    householder: str = "normalized",
    eps: float = 1e-12,
    scalars: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The chain rule through :func:`hta_factors`, written out: from the gradients of a loss with respect to its
    outputs ``(d, U, V)`` to those with respect to its inputs ``(u_in, u_out, d, A, B)``. One pass of O(in + out + r)
    vector operations, no autograd graph (the folded layer's backward calls it once per adapter). ``scalars``: the
    result of :func:`hta_scalars` (recomputed when None).

    With ``a = grad_V[:, 0]``, ``b = grad_V[:, 1]``, ``g_q = grad_U[:, 1]`` and the forward quantities ``c_i, c_o, p,
    q, s`` of :func:`hta_factors` (``v_0 = c_o (c_i s u_in - p)``, ``v_1 = -c_i u_in``, ``q = D u_in``, ``p = D^T u_out``):

        g_s   = c_o c_i (a . u_in)              g_p = -c_o a
        g_c_i = c_o s (a . u_in) - b . u_in     g_c_o = c_i s (a . u_in) - a . p
        g_d     = grad_d + g_q[:m] u_in[:m] + g_p[:m] u_out[:m] + g_s u_out[:m] u_in[:m]
        g_u_in  = c_o c_i s a - c_i b + [g_q[:m] d + g_s d u_out[:m]; 0] + g_c_i dc_i/du_in
        g_u_out = grad_U[:, 0] + [g_p[:m] d + g_s d u_in[:m]; 0] + g_c_o dc_o/du_out
        g_A = grad_V[:, 2:]^T,  g_B = grad_U[:, 2:]

    where ``dc/du = -c^2 u`` for ``c = 2 / ||u||^2`` (and 0 where ``c`` is 0, or for the constant ``"paper"`` form).
    The code groups these terms so that each line is one tensor operation: every operation here costs microseconds
    of dispatch, whatever its size, and a ViT runs this for every adapted layer on every step.
    """
    m = d.shape[0]
    c_in, c_out, s = hta_scalars(u_in, u_out, d, householder, eps) if scalars is None else scalars
    u_in_m, u_out_m = u_in[:m], u_out[:m]
    a_b = grad_V[:, :2].T  # rows a and b: (2, in)
    a_m = a_b[0, :m]
    a_b_dot_u_in = a_b @ u_in  # (a . u_in, b . u_in)
    c_in_a_u = c_in * a_b_dot_u_in[0]
    g_s = c_out * c_in_a_u
    g_p_m = a_m * -c_out  # g_p is zero beyond m, as p is
    w = torch.addcmul(grad_U[:m, 1], u_out_m, g_s)  # g_q[:m] + g_s u_out[:m]
    z = torch.addcmul(g_p_m, u_in_m, g_s)  # g_p[:m] + g_s u_in[:m]

    g_d = torch.addcmul(torch.addcmul(grad_d, u_in_m, w), g_p_m, u_out_m)
    coefficients = torch.stack([c_out * c_in * s, -c_in])  # of a and b in g_u_in
    g_u_in = coefficients @ a_b
    g_u_in[:m].addcmul_(w, d)
    g_u_out = grad_U[:, 0].clone()
    g_u_out[:m].addcmul_(z, d)
    if householder == "normalized":  # c = 2 / ||u||^2 (or the constant 0 below eps): dc/du = -c^2 u
        g_c_in = c_out * s * a_b_dot_u_in[0] - a_b_dot_u_in[1]
        g_c_out = s * c_in_a_u - a_m @ (d * u_out_m)
        g_u_in.sub_(u_in * (g_c_in * c_in * c_in))
        g_u_out.sub_(u_out * (g_c_out * c_out * c_out))
    has_lora = lora_A is not None and lora_A.shape[0] > 0
    g_A = grad_V[:, 2:].T.contiguous() if has_lora else None
    g_B = grad_U[:, 2:].contiguous() if has_lora else None
    return g_u_in, g_u_out, g_d, g_A, g_B


def row_contraction(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a^T b`` for tall ``a`` (n, k) and ``b`` (n, c): the sum over the n rows of ``a[i]^T b[i]``, (k, c).

    For small ``k`` and long ``n`` (the adapter gradients ``(X V)^T G``, ``(G U)^T X``) CPU BLAS runs this on a single
    thread: it parallelises over the output, which is tiny, not over the contraction. On CPU the rows are split into
    one chunk per thread and the chunks run as one batched matmul (``(p, k, n/p) @ (p, n/p, c)``, then a sum over
    ``p``), which uses every thread; on other devices, or when there is one thread or few rows, it is plain ``a.T @ b``.
    """
    parts = min(torch.get_num_threads(), a.shape[0] // 256) if a.device.type == "cpu" else 1
    if parts <= 1:
        return a.T @ b
    n = a.shape[0] - a.shape[0] % parts
    rows = n // parts
    result = torch.bmm(a[:n].view(parts, rows, -1).transpose(1, 2), b[:n].view(parts, rows, -1)).sum(0)
    if n < a.shape[0]:
        result += a[n:].T @ b[n:]
    return result


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
