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

**Blocks.** A layer whose weight is a concatenation of ``k`` same-shape maps (a fused ``[W_q; W_k; W_v]``, or an
FFN cut into square blocks) can carry one such update per block (`BlockLayout`):

    delta_W = [delta_1; ...; delta_k]   (``side="out"``: row blocks, each ``out/k x in``)
    delta_W = [delta_1, ..., delta_k]   (``side="in"``: column blocks, each ``out x in/k``)
    delta_b = H(u_out_b) D_b H(u_in_b) + B_b A_b

Every function below accepts a leading batch dimension of blocks (``u_in`` (k, in_b), ``d`` (k, m_b), ``lora_A``
(k, r, in_b), ...) and computes all blocks at once; 1-D inputs are one block (``k = 1``), exactly as before. In the
whole ``out x in`` matrix the blocks' factors are again ``D + U V^T`` (`BlockLayout.dense`): ``U`` block-diagonal
and ``V`` stacked for row blocks (the other way round for column blocks), and ``D`` the ``k`` block diagonals.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

HOUSEHOLDER_FORMS = ("normalized", "paper")


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a . b`` over the last dimension (one BLAS dot for 1-D vectors, batched otherwise)."""
    return a @ b if a.dim() == 1 and b.dim() == 1 else torch.linalg.vecdot(a, b)


def _matvec(matrix: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """``matrix @ vector`` for (..., p, n) and (..., n): (..., p)."""
    return matrix @ vector if vector.dim() == 1 else (matrix @ vector.unsqueeze(-1)).squeeze(-1)


def _vecmat(vector: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``vector @ matrix`` for (..., p) and (..., p, n): (..., n)."""
    return vector @ matrix if vector.dim() == 1 else (vector.unsqueeze(-2) @ matrix).squeeze(-2)


def _column(scalar: torch.Tensor) -> torch.Tensor:
    """A per-block scalar (...,) made to broadcast against per-block vectors (..., n); a 0-d scalar as it is."""
    return scalar if scalar.dim() == 0 else scalar.unsqueeze(-1)


def householder_coefficient(u: torch.Tensor, householder: str = "normalized", eps: float = 1e-12) -> torch.Tensor:
    """``c(u)`` in ``H(u) = I - c(u) u u^T``.

    ``"normalized"``: ``c = 2 / ||u||^2``, which makes ``H(u)`` an exact reflection (orthogonal, symmetric,
    involutory) for every non-zero ``u``; vectors with ``||u||^2 <= eps`` (a zero vector, or one whose square norm
    underflows) give ``c = 0``, i.e. ``H = I``, which is orthogonal too. The division only ever sees
    ``||u||^2 > eps`` (the "double where"), so neither the value nor its gradient can be NaN or inf.
    ``"paper"``: ``c = 1``, the printed ``I - v v^T`` (orthogonal only when ``||v||^2 = 2``).
    """
    if householder == "normalized":
        square_norm = _dot(u, u)
        usable = square_norm > eps
        return torch.where(usable, 2.0 / torch.where(usable, square_norm, 1.0), 0.0)
    if householder == "paper":
        return torch.ones(u.shape[:-1], dtype=u.dtype, device=u.device)
    raise ValueError(f"unknown householder {householder!r}; valid: {HOUSEHOLDER_FORMS}")


def householder_apply(x: torch.Tensor, u: torch.Tensor, coefficient: torch.Tensor) -> torch.Tensor:
    """``x H(u)`` for row vectors ``x`` (..., n): ``x - c (x . u) u``, O(n) per row. ``H(u)`` is symmetric, so this
    is also ``H(u) x`` for column vectors."""
    return x - coefficient * (x @ u).unsqueeze(-1) * u


def hta_scalars(
    u_in: torch.Tensor, u_out: torch.Tensor, d: torch.Tensor, householder: str = "normalized", eps: float = 1e-12
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three scalars of :func:`hta_factors` and :func:`hta_factors_backward`: ``c(u_in)``, ``c(u_out)`` and
    ``s = u_out^T D u_in = sum_i d_i u_out[i] u_in[i]`` (i < m); one of each per block for batched inputs."""
    m = d.shape[-1]
    s = _dot(d * u_out[..., :m], u_in[..., :m])
    return householder_coefficient(u_in, householder, eps), householder_coefficient(u_out, householder, eps), s


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
    :func:`hta_scalars` for these parameters, when the caller already has it. With a leading block dimension
    (``u_in`` (k, in), ``lora_A`` (k, r, in), ...) every block's factors at once: ``U`` (k, out, 2 + r), ...
    """
    m = d.shape[-1]
    c_in, c_out, s = hta_scalars(u_in, u_out, d, householder, eps) if scalars is None else scalars
    c_in, c_out, s = _column(c_in), _column(c_out), _column(s)
    q_m = d * u_in[..., :m]  # D u_in (zero beyond m):    (..., m)
    p_m = d * u_out[..., :m]  # D^T u_out (zero beyond m): (..., m)
    rank = lora_A.shape[-2] if lora_A is not None else 0
    batch = u_out.shape[:-1]
    # Built as (k, out) / (k, in) rows and returned transposed: every product with U^T, V^T is then contiguous.
    U_t = u_out.new_zeros(*batch, 2 + rank, u_out.shape[-1])
    U_t[..., 0, :] = u_out
    U_t[..., 1, :m] = q_m
    V_t = u_in.new_zeros(*batch, 2 + rank, u_in.shape[-1])
    V_t[..., 0, :] = (c_out * c_in * s) * u_in
    V_t[..., 0, :m] -= c_out * p_m
    V_t[..., 1, :] = -c_in * u_in
    if rank > 0:
        U_t[..., 2:, :] = lora_B.transpose(-1, -2)
        V_t[..., 2:, :] = lora_A
    return d, U_t.transpose(-1, -2), V_t.transpose(-1, -2)


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
    of dispatch, whatever its size, and a ViT runs this for every adapted layer on every step. Batched inputs (a
    leading block dimension, as in :func:`hta_factors`) give every block's gradients in the same operations.
    """
    m = d.shape[-1]
    c_in, c_out, s = hta_scalars(u_in, u_out, d, householder, eps) if scalars is None else scalars
    u_in_m, u_out_m = u_in[..., :m], u_out[..., :m]
    a_b = grad_V[..., :2].transpose(-1, -2)  # rows a and b: (..., 2, in)
    a_m = a_b[..., 0, :m]
    a_b_dot_u_in = _matvec(a_b, u_in)  # (..., 2): (a . u_in, b . u_in)
    c_in_a_u = c_in * a_b_dot_u_in[..., 0]
    g_s = c_out * c_in_a_u
    g_p_m = a_m * -_column(c_out)  # g_p is zero beyond m, as p is
    w = torch.addcmul(grad_U[..., :m, 1], u_out_m, _column(g_s))  # g_q[:m] + g_s u_out[:m]
    z = torch.addcmul(g_p_m, u_in_m, _column(g_s))  # g_p[:m] + g_s u_in[:m]

    g_d = torch.addcmul(torch.addcmul(grad_d, u_in_m, w), g_p_m, u_out_m)
    coefficients = torch.stack([c_out * c_in * s, -c_in], dim=-1)  # of a and b in g_u_in
    g_u_in = _vecmat(coefficients, a_b)
    g_u_in[..., :m].addcmul_(w, d)
    g_u_out = grad_U[..., :, 0].clone()
    g_u_out[..., :m].addcmul_(z, d)
    if householder == "normalized":  # c = 2 / ||u||^2 (or the constant 0 below eps): dc/du = -c^2 u
        g_c_in = c_out * s * a_b_dot_u_in[..., 0] - a_b_dot_u_in[..., 1]
        g_c_out = s * c_in_a_u - _dot(a_m, d * u_out_m)
        g_u_in.sub_(u_in * _column(g_c_in * c_in * c_in))
        g_u_out.sub_(u_out * _column(g_c_out * c_out * c_out))
    has_lora = lora_A is not None and lora_A.shape[-2] > 0
    g_A = grad_V[..., 2:].transpose(-1, -2).contiguous() if has_lora else None
    g_B = grad_U[..., 2:].contiguous() if has_lora else None
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


class BlockLayout(NamedTuple):
    """How a layer's update is cut into ``blocks`` independent HTA blocks (see the module docstring).

    ``side="out"``: row blocks, ``delta_W = [delta_1; ...; delta_k]``, each block ``out/k x in`` (a fused
    ``[W_q; W_k; W_v]`` has 3). ``side="in"``: column blocks, ``delta_W = [delta_1, ..., delta_k]``, each ``out x in/k``.
    One block (the default) is the plain HTA update of the whole matrix. ``adapted``: the indices of the blocks
    that get an update (None: all; ``(0, 2)`` of a fused qkv: q and v only); the others get none and hold no
    tensors.

    An adapter's tensors are stored flat, the adapted blocks' vectors one after the other, so that one block has
    exactly the tensors of an unblocked adapter and ``a`` adapted blocks of shape ``out_b x in_b``
    (``m_b = min(out_b, in_b)``) hold

        u_in (a in_b,)   u_out (a out_b,)   d (a m_b,)   A (r, a in_b)   B (a out_b, r)

    (``A``'s column block ``j`` and ``B``'s row block ``j`` are the ``j``-th adapted block's ``A_b``, ``B_b``).
    `unpack` gives the batched views (``u_in`` (a, in_b), ``A`` (a, r, in_b), ...) that the maths above takes.
    """

    blocks: int = 1
    side: str = "out"
    adapted: Optional[tuple[int, ...]] = None

    @property
    def trivial(self) -> bool:
        return self.blocks == 1

    @property
    def count(self) -> int:
        """The number of adapted blocks."""
        return self.blocks if self.adapted is None else len(self.adapted)

    @property
    def grid(self) -> list:
        """The saved config's notation: ``[row blocks, column blocks]``, plus the adapted blocks' indices when not
        all are adapted."""
        grid = [self.blocks, 1] if self.side == "out" else [1, self.blocks]
        return grid if self.adapted is None else [*grid, list(self.adapted)]

    @classmethod
    def from_grid(cls, grid) -> "BlockLayout":
        """The layout of ``[row blocks, column blocks]`` (one of them 1) or ``[rows, columns, adapted indices]``."""
        if not isinstance(grid, (list, tuple)) or len(grid) not in (2, 3):
            raise ValueError(f"a block layout is [row blocks, column blocks(, adapted blocks)], got {grid!r}")
        rows, columns = (int(n) for n in grid[:2])
        if rows < 1 or columns < 1 or (rows > 1 and columns > 1):
            raise ValueError(f"a block layout is [row blocks, column blocks] with one of them 1, got {list(grid)}")
        layout = cls(columns, "in") if columns > 1 else cls(rows, "out")
        return layout.with_adapted(grid[2]) if len(grid) == 3 else layout

    def with_adapted(self, adapted) -> "BlockLayout":
        """This layout adapting only the blocks ``adapted`` (sorted, distinct, in range; all of them: None)."""
        indices = tuple(sorted({int(i) for i in adapted}))
        if not indices or indices[0] < 0 or indices[-1] >= self.blocks or len(indices) != len(list(adapted)):
            raise ValueError(f"adapted blocks must be distinct indices in 0..{self.blocks - 1}, got {list(adapted)!r}")
        return self._replace(adapted=None if len(indices) == self.blocks else indices)

    def _adapted_index(self, device) -> torch.Tensor:
        return torch.tensor(self.adapted if self.adapted is not None else range(self.blocks), device=device)

    def block_shape(self, out_features: int, in_features: int) -> tuple[int, int]:
        """``(out_b, in_b)`` of one block; raises a ValueError if the blocks do not tile the matrix."""
        size = out_features if self.side == "out" else in_features
        if self.blocks < 1 or size % self.blocks:
            what = "out_features" if self.side == "out" else "in_features"
            raise ValueError(f"{self.blocks} {self.side}put blocks do not divide {what}={size} of a {in_features} -> {out_features} layer")
        if self.side == "out":
            return out_features // self.blocks, in_features
        return out_features, in_features // self.blocks

    def parameter_shapes(self, out_features: int, in_features: int, rank: int) -> dict[str, tuple[int, ...]]:
        """The stored (flat) shapes of an adapter's tensors, keyed ``u_in``, ``u_out``, ``d``, ``A``, ``B``."""
        out_b, in_b = self.block_shape(out_features, in_features)
        a = self.count
        shapes = {"u_in": (a * in_b,), "u_out": (a * out_b,), "d": (a * min(out_b, in_b),)}
        if rank > 0:
            shapes.update(A=(rank, a * in_b), B=(a * out_b, rank))
        return shapes

    # ---------------------------------------------------------------- flat storage <-> batched blocks
    def unpack(self, tensors: "HTATensors") -> "HTATensors":
        """Batched per-block views of the flat stored tensors (no copy); one block: the tensors as they are."""
        if self.trivial:
            return tensors
        a = self.count
        u_in, u_out, d, A, B = tensors
        if A is not None:
            A = A.view(A.shape[0], a, -1).transpose(0, 1)  # (a, r, in_b)
            B = B.view(a, -1, B.shape[-1])  # (a, out_b, r)
        return HTATensors(u_in.view(a, -1), u_out.view(a, -1), d.view(a, -1), A, B)

    def pack(self, tensors: "HTATensors") -> "HTATensors":
        """The inverse of `unpack`: per-block tensors (gradients, new values) in the flat stored shapes."""
        if self.trivial:
            return tensors
        u_in, u_out, d, A, B = tensors
        if A is not None:
            A = A.transpose(0, 1).reshape(A.shape[1], -1)
            B = B.reshape(-1, B.shape[-1])
        return HTATensors(u_in.reshape(-1), u_out.reshape(-1), d.reshape(-1), A, B)

    # ---------------------------------------------------------------- blocks <-> the whole matrix
    def _block_diagonal(self, rows: torch.Tensor) -> torch.Tensor:
        """(a, w, size) per adapted block -> (a w, k size): each block's rows over its own column range."""
        if self.adapted is None:
            return torch.block_diag(*rows.unbind(0))
        empty = rows.new_zeros(0, rows.shape[-1])
        parts = [empty] * self.blocks
        for j, b in enumerate(self.adapted):
            parts[b] = rows[j]
        return torch.block_diag(*parts)

    def dense(self, d: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-block factors ``d`` (a, m_b), ``U`` (a, out_b, w), ``V`` (a, in_b, w) as factors of the whole matrix:
        ``d`` flat (a m_b,) and ``U`` (out, a w), ``V`` (in, a w) with ``[delta_b] = D + U V^T``. Row blocks make
        ``U`` block-diagonal and stack ``V``'s columns; column blocks the other way round. Both are transposed views
        of row-major tensors, like :func:`hta_factors`' ``U`` and ``V``."""
        if self.trivial:
            return d, U, V
        a, w = self.count, U.shape[-1]
        U_t, V_t = U.transpose(-1, -2), V.transpose(-1, -2)  # (a, w, out_b), (a, w, in_b), contiguous
        if self.side == "out":
            U_t, V_t = self._block_diagonal(U_t), V_t.reshape(a * w, -1)
        else:
            U_t, V_t = U_t.reshape(a * w, -1), self._block_diagonal(V_t)
        return d.reshape(-1), U_t.T, V_t.T

    def block_grads(self, grad_U: torch.Tensor, grad_V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The gradients of the per-block ``U`` (a, out_b, w) and ``V`` (a, in_b, w) from those of `dense`'s whole
        ``U`` (out, a w) and ``V`` (in, a w): the diagonal blocks of the block-diagonal one, the column blocks of the
        other."""
        if self.trivial:
            return grad_U, grad_V
        k, a = self.blocks, self.count
        w = grad_U.shape[-1] // a

        def diagonal_blocks(grad):  # (k size, a w) -> (a, size, w)
            grad = grad.view(k, -1, a, w)
            if self.adapted is None:
                return grad.diagonal(dim1=0, dim2=2).permute(2, 0, 1)
            return grad[self._adapted_index(grad.device), :, torch.arange(a, device=grad.device)]

        def column_blocks(grad):  # (size, a w) -> (a, size, w)
            return grad.view(grad.shape[0], a, w).transpose(0, 1)

        if self.side == "out":
            return diagonal_blocks(grad_U), column_blocks(grad_V)
        return column_blocks(grad_U), diagonal_blocks(grad_V)

    def _diagonals(self, matrix: torch.Tensor) -> torch.Tensor:
        """The ``k`` block diagonals of an (out, in) matrix as a (k, m_b) view."""
        if self.side == "out":
            return matrix.view(self.blocks, -1, matrix.shape[-1]).diagonal(dim1=1, dim2=2)
        return matrix.view(matrix.shape[0], self.blocks, -1).diagonal(dim1=0, dim2=2)

    def add_diagonal_(self, matrix: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """``matrix += D`` in place for a contiguous (out, in) ``matrix``, O(a m_b); ``d`` flat."""
        if self.trivial:
            matrix.diagonal()[: d.shape[0]].add_(d)
        elif self.adapted is None:
            self._diagonals(matrix).add_(d.view(self.blocks, -1))
        else:
            self._diagonals(matrix).index_add_(0, self._adapted_index(d.device), d.view(self.count, -1))
        return matrix

    def add_diagonal(self, matrix: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """``matrix + D`` out of place (autograd-friendly)."""
        rows, columns = self.diagonal_index(d.shape[0], matrix.shape, d.device)
        return matrix.index_put((rows, columns), d, accumulate=True)

    def diagonal_index(self, size: int, shape, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Row and column indices in the (out, in) matrix of the ``size`` flat entries of ``d``."""
        index = torch.arange(size, device=device)
        if self.trivial:
            return index, index
        m = size // self.count
        block, i = self._adapted_index(device)[index // m], index % m
        if self.side == "out":
            return block * (shape[0] // self.blocks) + i, i
        return i, block * (shape[1] // self.blocks) + i

    def diagonal_grad(self, grad_output: torch.Tensor, x: torch.Tensor, size: int) -> torch.Tensor:
        """``dL/dd`` (flat, ``size`` entries) of ``y = x (D + ...)^T`` from ``G`` (n, out) and ``X`` (n, in):
        ``sum_n G[n, row_j] X[n, col_j]``."""
        if self.trivial:
            return torch.linalg.vecdot(grad_output[:, :size], x[:, :size], dim=0)
        n, k, m = x.shape[0], self.blocks, size // self.count
        if self.side == "out":
            g, x = grad_output.view(n, k, -1)[:, :, :m], x[:, None, :m]
        else:
            g, x = grad_output[:, None, :m], x.view(n, k, -1)[:, :, :m]
        grad = torch.linalg.vecdot(g, x, dim=0)  # (k, m)
        if self.adapted is not None:
            grad = grad[self._adapted_index(grad.device)]
        return grad.reshape(-1)

    def diagonal_output(self, x: torch.Tensor, d: torch.Tensor, out_features: int) -> torch.Tensor:
        """``x D^T`` for row vectors ``x`` (..., in): (..., out)."""
        if self.trivial:
            m = d.shape[0]
            part = x[..., :m] * d
            return part if m == out_features else F.pad(part, (0, out_features - m))
        k, a = self.blocks, self.count
        d = d.view(a, -1)
        m = d.shape[-1]
        if self.adapted is not None:  # the blocks without an update get d = 0
            d = d.new_zeros(k, m).index_copy(0, self._adapted_index(d.device), d)
        if self.side == "out":
            part = x[..., None, :m] * d  # (..., k, m)
            out_b = out_features // k
            if m < out_b:
                part = F.pad(part, (0, out_b - m))
            return part.flatten(-2)
        part = (x.unflatten(-1, (k, -1))[..., :m] * d).sum(-2)  # (..., m)
        return part if m == out_features else F.pad(part, (0, out_features - m))


ONE_BLOCK = BlockLayout()


class HTATensors(NamedTuple):
    """One adapter's tensors ``(u_in, u_out, d, A, B)``, in the argument order of :func:`hta_factors` (``A``, ``B``
    None without a low-rank term). `pack_adapters` / `unpack_adapters` flatten several adapters to one argument list
    (an autograd Function takes its tensors as separate arguments) and back."""

    u_in: torch.Tensor
    u_out: torch.Tensor
    d: torch.Tensor
    A: Optional[torch.Tensor] = None
    B: Optional[torch.Tensor] = None


def pack_adapters(adapters: list[HTATensors]) -> list[Optional[torch.Tensor]]:
    return [tensor for adapter in adapters for tensor in adapter]


def unpack_adapters(flat) -> list[HTATensors]:
    width = len(HTATensors._fields)
    return [HTATensors(*flat[i : i + width]) for i in range(0, len(flat), width)]


class AdapterSpec(NamedTuple):
    """What besides its tensors shapes an adapter's update: the Householder form, ``eps`` and the block layout."""

    householder: str = "normalized"
    eps: float = 1e-12
    layout: BlockLayout = ONE_BLOCK


def adapter_factors(
    tensors: HTATensors, spec: AdapterSpec, scalars=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(d, U, V, scalars)`` of one adapter: ``delta_W = D + U V^T`` over the whole (out, in) matrix (``d`` flat,
    `BlockLayout.dense`) and the per-block `hta_scalars`."""
    blocks = spec.layout.unpack(tensors)
    if scalars is None:
        scalars = hta_scalars(blocks.u_in, blocks.u_out, blocks.d, spec.householder, spec.eps)
    d, U, V = hta_factors(*blocks, householder=spec.householder, eps=spec.eps, scalars=scalars)
    return (*spec.layout.dense(d, U, V), scalars)


def delta_weight(d: torch.Tensor, U: torch.Tensor, V: torch.Tensor, layout: BlockLayout = ONE_BLOCK) -> torch.Tensor:
    """``delta_W = D + U V^T`` as an ``out x in`` matrix, O(in * out) (``d`` flat, ``D`` placed by ``layout``)."""
    # Adding the diagonal out of place keeps autograd simple.
    return layout.add_diagonal(U @ V.T, d)


def folded_weight(
    weight: torch.Tensor, d: torch.Tensor, U: torch.Tensor, V: torch.Tensor, layout: BlockLayout = ONE_BLOCK
) -> torch.Tensor:
    """``W + delta_W = W + D + U V^T`` as a new ``out x in`` matrix: one ``addmm`` pass over ``out x in`` plus an
    in-place add of ``d`` on the (block) diagonal (O(m)). For use without autograd (the folded layer's forward/backward)."""
    return layout.add_diagonal_(torch.addmm(weight, U, V.T), d)  # (out, in)


def hta_activation_delta(
    x: torch.Tensor, d: torch.Tensor, U: torch.Tensor, V: torch.Tensor, layout: BlockLayout = ONE_BLOCK
) -> torch.Tensor:
    """``x delta_W^T`` for row vectors ``x`` (..., in) without building ``delta_W``: (..., out).

    ``x D^T`` puts ``x[..., :m] * d`` in the first ``m`` output features (of each block); the rank part is
    ``(x V) U^T``.
    """
    return (x @ V) @ U.T + layout.diagonal_output(x, d, U.shape[0])


# ----------------------------------------------------------------------------------------------------------------
# The folded linear layer
# ----------------------------------------------------------------------------------------------------------------
def combined_factors(adapters: list[HTATensors], specs: tuple[AdapterSpec, ...]):
    """Factors of the sum of several adapters' updates: ``U`` / ``V`` of every adapter side by side (their columns
    concatenate), each adapter's ``(layout, d)`` (the diagonals stay apart: layouts may differ), each adapter's
    number of columns and its `hta_scalars`."""
    factors = [adapter_factors(tensors, spec) for tensors, spec in zip(adapters, specs)]
    diagonals = [(spec.layout, f[0]) for spec, f in zip(specs, factors)]
    widths = [f[1].shape[1] for f in factors]
    scalars = [f[3] for f in factors]
    if len(factors) == 1:
        return factors[0][1], factors[0][2], diagonals, widths, scalars
    # The columns concatenate in the (k, out) / (k, in) row layout of hta_factors.
    U = torch.cat([f[1].T for f in factors]).T
    V = torch.cat([f[2].T for f in factors]).T
    return U, V, diagonals, widths, scalars


def _folded(weight, U, V, diagonals):
    folded = torch.addmm(weight, U, V.T)  # (out, in)
    for layout, d in diagonals:
        layout.add_diagonal_(folded, d)
    return folded


def _as_spec(spec) -> AdapterSpec:
    return spec if isinstance(spec, AdapterSpec) else AdapterSpec(*spec)


class FoldedHTALinear(torch.autograd.Function):
    """``y = x (W + delta_W)^T + b`` with ``delta_W = D + U V^T`` built from the raw adapter parameters: one matmul
    forward, low-rank adapter gradients backward (and the full ``dW = G^T X`` only when the base weight itself is
    trainable). ``apply(x, weight, bias, specs, *params)``: ``specs`` holds one `AdapterSpec` (or a tuple
    ``(householder, eps[, layout])``) per active adapter and ``params`` their `HTATensors`, flat (`pack_adapters`).

    With ``X`` (n, in) and ``G = dL/dy`` (n, out), ``k`` columns in ``U`` / ``V``:

        dX = G (W + D + U V^T)              one n x out x in matmul, as the frozen base layer needs anyway
        dU = G^T (X V)                      (out, k); ``X V`` is taken in forward, while X is still in cache,
        dV = X^T (G U)                      (in, k)     and saved (n x k floats)
        dd = sum_n G[:, :m] * X[:, :m]      (m,)  (per block diagonal with blocks, `BlockLayout.diagonal_grad`)

    and :func:`hta_factors_backward` carries ``(dd, dU, dV)`` to the parameters without an autograd graph (the ~40
    small vector operations that build U and V would otherwise each be a graph node); with blocks it runs once for
    all blocks, batched, on the diagonal blocks of ``dU`` or ``dV`` (`BlockLayout.block_grads`).

    What the measurements behind this layout found (``benchmarks/bench_hta.py``; CPU, MKL):

    * ``(d, U, V)`` and the scalars of `hta_scalars` come from forward (saved, O((in + out) k)) instead of being
      rebuilt in backward.
    * ``U``, ``V`` are transposed views of row-major ``(k, out)`` / ``(k, in)`` tensors, so ``X V`` and ``G U`` are
      "NT" products, which MKL runs 1.5 to 3x faster than with a row-major ``(out, k)`` operand.
    * The two products that contract over the n rows (``dU``, ``dV``) go through :func:`row_contraction`, which
      splits n across the CPU threads.
    * Backward runs the products with ``G`` first (``G`` was just written by the layer above and is in cache), then
      those with ``X``, and ``dX`` last, so that the layer below reads a ``dX`` that is still in cache.
    * ``W + delta_W`` is rebuilt in backward (one ``addmm`` over ``out x in``) instead of being stored, so the layer
      saves no more than the base layer plus ``X``.
    * Blocks make one of ``U`` / ``V`` block-diagonal (``k`` times as many columns, mostly zeros): the products
      with it cost ``k`` times those of one block, still O(n (in + out) k w), small beside the ``n x out x in`` ones.

    Under ``create_graph=True`` the backward rebuilds ``(d, U, V)`` and ``X V`` with autograd recording, and every
    operation in it is differentiable, so second-order gradients are exact (``gradgradcheck`` in the tests).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, specs, *params):
        specs = tuple(_as_spec(spec) for spec in specs)
        U, V, diagonals, widths, scalars = combined_factors(unpack_adapters(params), specs)
        xv = None
        if any(ctx.needs_input_grad[4:]):  # before the big matmul, while x (just written upstream) is in cache
            xv = x.reshape(-1, x.shape[-1]) @ V  # (n, k)
        y = F.linear(x, _folded(weight, U, V, diagonals), bias)
        ctx.specs = specs
        ctx.widths = widths
        ctx.has_bias = bias is not None
        ds = [d for _, d in diagonals]
        ctx.save_for_backward(x, weight, xv, U, V, *ds, *[c for adapter in scalars for c in adapter], *params)
        return y

    @staticmethod
    def backward(ctx, grad_output):
        n_adapters = len(ctx.specs)
        x, weight, xv, U, V, *rest = ctx.saved_tensors
        ds, rest = rest[:n_adapters], rest[n_adapters:]
        scalars = [tuple(rest[3 * i : 3 * i + 3]) for i in range(n_adapters)]  # saved flat in forward
        params = rest[3 * n_adapters :]
        adapters = unpack_adapters(params)
        diagonals = [(spec.layout, d) for spec, d in zip(ctx.specs, ds)]
        x2 = x.reshape(-1, x.shape[-1])  # (n, in)
        if torch.is_grad_enabled():
            # create_graph=True (higher-order gradients): what forward computed without a graph is rebuilt with one,
            # so that every gradient returned below is a differentiable function of x, W and the parameters.
            U, V, diagonals, _, scalars = combined_factors(adapters, ctx.specs)
            if xv is not None:
                xv = x2 @ V
        g2 = grad_output.reshape(-1, grad_output.shape[-1])  # (n, out)
        grad_x = grad_weight = grad_bias = None
        grad_params: list[Optional[torch.Tensor]] = [None] * len(params)
        if xv is not None:
            gu = g2 @ U  # (n, k)
            grad_U = row_contraction(xv, g2).T  # (out, k)
            grad_V = row_contraction(gu, x2).T  # (in, k)
            start = 0
            width_of_params = len(HTATensors._fields)
            for i, (spec, width, tensors, (layout, d)) in enumerate(zip(ctx.specs, ctx.widths, adapters, diagonals)):
                block_grad_U, block_grad_V = layout.block_grads(grad_U[:, start : start + width], grad_V[:, start : start + width])
                blocks = layout.unpack(tensors)
                grad_d = layout.diagonal_grad(g2, x2, d.shape[0]).view(blocks.d.shape)
                grads = layout.pack(HTATensors(*hta_factors_backward(
                    *blocks, grad_d, block_grad_U, block_grad_V,
                    householder=spec.householder, eps=spec.eps, scalars=scalars[i],
                )))
                for j, grad in enumerate(grads):
                    if ctx.needs_input_grad[4 + width_of_params * i + j]:
                        grad_params[width_of_params * i + j] = grad
                start += width
        if ctx.needs_input_grad[1]:  # a trainable base weight (unfrozen by the user, or FSDP's flat parameter)
            grad_weight = g2.T @ x2  # (out, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g2.sum(0)
        if ctx.needs_input_grad[0]:
            grad_x = (g2 @ _folded(weight, U, V, diagonals)).view(x.shape)
        return (grad_x, grad_weight, grad_bias, None, *grad_params)
