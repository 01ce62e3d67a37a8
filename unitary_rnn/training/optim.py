"""Optimizers for parameters on U(N) / O(N): the multiplicative Cayley step, projUNN dispatch, and
:class:`UnitaryOptimizer`, one ``torch.optim.Optimizer`` that steps manifold parameters on the manifold
and every other parameter with RMSprop or Adam.

Conventions
-----------
``G`` is ``W.grad`` exactly as PyTorch gives it. For a real loss ``L`` of a complex ``W`` PyTorch stores
``dL/dRe(W) + i dL/dIm(W)``, the steepest *ascent* direction of ``L`` in ``C^{N x N} = R^{2 N x N}``, so
``W - lr * G`` would descend (off the manifold). The Cayley step below is the manifold version of that
descent; ``tests/unitary_rnn/training/test_optim.py`` checks that the loss goes down.

Learning-rate schedules
-----------------------
Torch schedulers (and transformers' ``Trainer``) only know ``group["lr"]``. Each group remembers the
``lr`` it was built with (``group["base_lr"]``); the manifold step uses

    effective unitary lr = group["unitary_lr"] * group["lr"] / group["base_lr"]

so warm-up, cosine decay, ... scale the unitary learning rate by the same factor as the Euclidean one.
Set ``unitary_lr_follows_schedule=False`` to keep ``unitary_lr`` fixed.

Guarantees of :class:`UnitaryOptimizer`
--------------------------------------
- Learning rates: every ``lr`` / ``unitary_lr`` must be finite and non-negative, at construction and at every
  ``step()`` (a scheduler or a hand-edited param group is checked before anything moves): ``ValueError``.
- Non-finite gradients: a step in which any gradient holds NaN or inf is skipped as a whole (no parameter and
  no optimizer state changes, as ``torch.amp.GradScaler`` does), with a ``RuntimeWarning``; ``skipped_steps``
  counts them. NaN never enters W. The test is that each gradient's sum is finite (one pass, NaN and inf
  propagate); a gradient so large that its sum overflows (above 3e38 in float32) is skipped as well.
- Unitarity: after every step, ``||W^H W - I||_F`` is estimated on ``drift_probes`` random vectors
  (:func:`unitarity_error_estimate`, O(probes N^2); default 4 for complex W, 8 for real W) and W is re-projected
  onto the manifold (its polar factor, O(N^3), rare) when the estimate exceeds ``reproject_tol`` (default: a
  quarter of ``unitary_rnn.manifold.manifold_tolerance``, sqrt(N) * 1e-4 in single precision, sqrt(N) * 1e-10
  in double). The estimate is unbiased for the squared error; with the factor 4 an error above the tolerance
  passes undetected with probability below 2e-4 per step (the chi-square tail with 8 degrees of freedom: a
  complex probe carries two), and the next step's fresh estimate catches it. The probes are drawn from torch's
  global generator (as the ``"lsi"`` sampler's are), so seeding torch seeds them.
"""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..manifold import manifold_of, manifold_parameters, manifold_tolerance, project_to_unitary, record_manifold_step
from . import projunn
from .projunn import SAMPLINGS, check_learning_rate

METHODS = ("cayley", "projunn_d", "projunn_t")
BASE_OPTIMIZERS = ("rmsprop", "adam", "adamw")
DRIFT_SAFETY_FACTOR = 4
"""``reproject_tol="auto"`` re-projects when the estimated drift exceeds ``manifold_tolerance / 4``."""


# ----------------------------------------------------------------------------------------------------
# pure maths
# ----------------------------------------------------------------------------------------------------


def skew_gradient(W: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """``A = G W^H - W G^H`` (skew-Hermitian; skew-symmetric for real ``W``). One matmul:
    ``W G^H = (G W^H)^H``."""
    X = G @ W.mH  # (N, N)
    return X - X.mH


def cayley_step(W: torch.Tensor, G: torch.Tensor, lr: float) -> torch.Tensor:
    """One multiplicative Cayley step on U(N) (complex ``W``) or O(N) (real ``W``):

        A = G W^H - W G^H
        W_new = (I + lr/2 A)^{-1} (I - lr/2 A) W

    computed with ``torch.linalg.solve`` (never an inverse). ``(I + lr/2 A)^{-1}(I - lr/2 A)`` is the
    Cayley transform of the skew-Hermitian ``-lr A``, hence unitary, so ``W_new`` is unitary whenever
    ``W`` is. To first order ``W_new = W - lr (G - W G^H W)``, a descent direction for ``G = W.grad``.
    Works on batched ``(..., N, N)`` inputs. Returns a new tensor; ``W`` and ``G`` are not modified.
    """
    if W.shape[-1] != W.shape[-2] or W.shape != G.shape:
        raise ValueError(f"cayley_step needs square W and G of the same shape, got {tuple(W.shape)} and {tuple(G.shape)}")
    if W.dtype != G.dtype:
        raise TypeError(f"W and G must share a dtype, got {W.dtype} and {G.dtype}")
    lr = check_learning_rate(lr, allow_negative=True)  # a negative lr is an ascent step, still on the manifold
    A = skew_gradient(W, G)  # (N, N)
    half = 0.5 * lr
    eye = torch.eye(W.shape[-1], dtype=W.dtype, device=W.device)
    rhs = W - half * (A @ W)  # (I - lr/2 A) W
    return torch.linalg.solve(eye + half * A, rhs)


def unitarity_error_estimate(W: torch.Tensor, probes: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """An estimate of ``||W^H W - I||_F`` from ``k = probes`` Gaussian vectors, in O(k N^2):

        est^2 = (1/k) sum_j ||(W^H W - I) x_j||^2,    x_j ~ N(0, I) (complex: E[x x^H] = I),

    unbiased for ``||W^H W - I||_F^2`` because ``E ||M x||^2 = tr(M^H M)``. ``est^2 / err^2`` is a weighted mean, over
    the eigenvalues of ``W^H W - I``, of chi-square variables with ``d = k`` (real) or ``d = 2k`` (complex) degrees of
    freedom divided by ``d``; its lower tail is heaviest when one eigenvalue carries the whole error, and then
    ``P(est < err / 4) = P(chi2_d < d / 16)``, below 2e-4 for ``d = 8``. ``probes=None``: 4 for complex W, 8 for
    real W (``d = 8`` either way).
    """
    n = W.shape[-1]
    if probes is None:
        probes = 4 if W.is_complex() else 8
    X = torch.randn(n, probes, dtype=W.dtype, device=W.device, generator=generator)  # N x k
    # thin products as (thin x big): several times faster on CPU BLAS than W @ X (see projunn)
    WX = (X.mT @ W.mT).mT  # N x k, W X
    R = (WX.mH @ W).mH - X  # N x k, W^H W X - X
    return torch.linalg.vector_norm(R) / math.sqrt(probes)


def rmsprop_scale_(G: torch.Tensor, square_avg: torch.Tensor, alpha: float, eps: float) -> torch.Tensor:
    """The reference's optional RMSprop scaling of a manifold gradient, per real component:

        square_avg <- alpha * square_avg + (1 - alpha) * g**2       (g = Re G and Im G separately)
        G_scaled    = g / (sqrt(square_avg) + eps)

    ``square_avg`` is updated in place (real, ``view_as_real(G)``'s shape for complex ``G``).
    """
    g = torch.view_as_real(G) if G.is_complex() else G
    square_avg.mul_(alpha).addcmul_(g, g, value=1 - alpha)
    scaled = g / (square_avg.sqrt() + eps)
    return torch.view_as_complex(scaled) if G.is_complex() else scaled


def manifold_step(W: torch.Tensor, G: torch.Tensor, lr: float, method: str = "cayley", rank: int = 1,
                  sampling: str = "lsi", generator: torch.Generator | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Dispatch one manifold step: ``"cayley"`` (:func:`cayley_step`), ``"projunn_d"`` / ``"projunn_t"``
    (``unitary_rnn.training.projunn.projunn_direct_step`` / ``projunn_tangent_step``, rank-``rank`` updates).

    ``out`` (may be ``W`` itself) receives the new matrix; projUNN writes it there without allocating an N x N
    temporary, the Cayley step (a dense solve) copies its result in."""
    if method == "cayley":
        new = cayley_step(W, G, lr)
        return new if out is None else out.copy_(new)
    if method in ("projunn_d", "projunn_t"):
        fn = projunn.projunn_direct_step if method == "projunn_d" else projunn.projunn_tangent_step
        return fn(W, G, lr, rank, sampling, generator=generator, out=out)
    raise ValueError(f"unknown manifold method {method!r}; valid: {METHODS}")


# ----------------------------------------------------------------------------------------------------
# the optimizer
# ----------------------------------------------------------------------------------------------------


class UnitaryOptimizer(torch.optim.Optimizer):
    """One optimizer for models with parameters on U(N)/O(N) and ordinary parameters.

    A manifold parameter (declared by a ``unitary_rnn.manifold.ManifoldModule``, or tagged with
    ``unitary_rnn.manifold.mark_manifold``) is stepped on its manifold by its group's ``method``:

    - ``"cayley"``: :func:`cayley_step` (Wisdom et al. 2016), O(N^3);
    - ``"projunn_d"`` / ``"projunn_t"``: projUNN (Kiani et al. 2022), rank-``rank`` updates with
      ``sampling`` in ``("lsi", "column", "exact")``, O(rank N^2);

    with learning rate ``unitary_lr`` (scaled by the schedule, see the module docstring), and optionally
    the gradient first divided by an RMSprop accumulator (``rmsprop_unitary=True``, decay
    ``unitary_alpha``, ``unitary_eps``). After each step W is replaced by its polar factor when the drift
    estimated on ``drift_probes`` random vectors (``None``: 4 for complex W, 8 for real W) exceeds ``reproject_tol`` (``"auto"``: a quarter of
    ``unitary_rnn.manifold.manifold_tolerance``; ``None``: never), and every ``reproject_every`` steps
    when that is set (``None``/``0``: no fixed schedule). ``reprojections`` counts the re-projections.

    Every other parameter is stepped by ``base_optimizer``:

    - ``"rmsprop"``: ``torch.optim.RMSprop``'s update (``alpha``, ``eps``, ``momentum``, L2 ``weight_decay``);
    - ``"adam"``: ``torch.optim.Adam``'s update (``betas``, ``eps``, L2 ``weight_decay``);
    - ``"adamw"``: ``torch.optim.AdamW``'s update (decoupled ``weight_decay``).

    Complex Euclidean parameters are stepped as their real view (as torch's own optimizers do).
    Every key above may be set per parameter group. A step with a non-finite gradient is skipped as a
    whole (``skipped_steps`` counts them); non-finite learning rates raise (module docstring).
    """

    steps_on_manifolds = True  # read by unitary_rnn.manifold's guard against Euclidean optimizers

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        unitary_lr: float = 1e-4,
        method: str = "cayley",
        rank: int = 1,
        sampling: str = "lsi",
        rmsprop_unitary: bool = False,
        unitary_alpha: float = 0.9,
        unitary_eps: float = 1e-6,
        base_optimizer: str = "rmsprop",
        alpha: float = 0.99,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        reproject_every: int | None = None,
        reproject_tol: float | str | None = "auto",
        drift_probes: int | None = None,
        unitary_lr_follows_schedule: bool = True,
    ):
        defaults = dict(
            lr=lr, unitary_lr=unitary_lr, method=method, rank=rank, sampling=sampling,
            rmsprop_unitary=rmsprop_unitary, unitary_alpha=unitary_alpha, unitary_eps=unitary_eps,
            base_optimizer=base_optimizer, alpha=alpha, betas=tuple(betas), eps=eps, momentum=momentum,
            weight_decay=weight_decay, reproject_every=reproject_every, reproject_tol=reproject_tol,
            drift_probes=drift_probes, unitary_lr_follows_schedule=unitary_lr_follows_schedule,
        )
        self.skipped_steps = 0
        self.reprojections = 0
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # load_state_dict and unpickling: param groups saved before drift_probes existed get its default
        super().__setstate__(state)
        self.__dict__.setdefault("skipped_steps", 0)
        self.__dict__.setdefault("reprojections", 0)
        for group in self.param_groups:
            group.setdefault("drift_probes", None)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _validate_group(group, len(self.param_groups) - 1)
        group.setdefault("base_lr", group["lr"])

    # -- helpers --------------------------------------------------------------------------------------

    @staticmethod
    def effective_unitary_lr(group: dict[str, Any]) -> float:
        """``unitary_lr * lr / base_lr`` (the schedule's factor), or ``unitary_lr`` when the schedule
        is not followed or ``base_lr`` is 0."""
        lr_u = group["unitary_lr"]
        if group["unitary_lr_follows_schedule"] and group["base_lr"] != 0:
            lr_u = lr_u * group["lr"] / group["base_lr"]
        return float(lr_u)

    def _first_non_finite_gradient(self) -> str | None:
        """Where the first non-finite gradient is (``"param group g, parameter i of shape ..."``), or None.
        One host synchronisation for all gradients."""
        located, sums = [], []
        for g, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                if p.grad is not None and not p.grad.is_sparse:
                    located.append((g, i, p))
                    sums.append(p.grad.sum())  # NaN / inf propagate; 20x cheaper than isfinite(grad).all()
        if not sums:
            return None
        finite = torch.isfinite(torch.stack(sums))
        if bool(finite.all()):
            return None
        g, i, p = located[int(finite.logical_not().nonzero()[0])]
        return f"param group {g}, parameter {i} of shape {tuple(p.shape)}"

    # -- step -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):  # a scheduler or a hand edit may have set them
            check_learning_rate(group["lr"], f"param group {index}: lr")
            check_learning_rate(self.effective_unitary_lr(group), f"param group {index}: effective unitary_lr")
        where = self._first_non_finite_gradient()
        if where is not None:
            self.skipped_steps += 1
            warnings.warn(
                f"UnitaryOptimizer: skipped a step because of a non-finite (NaN or inf) gradient in {where}; no "
                f"parameter or optimizer state was changed ({self.skipped_steps} step(s) skipped so far)",
                RuntimeWarning,
                stacklevel=2,
            )
            return loss
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("UnitaryOptimizer does not support sparse gradients")
                if manifold_of(p) is not None:
                    self._manifold_update(p, group)
                else:
                    self._euclidean_update(p, group)
        return loss

    def _manifold_update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0)
            if group["rmsprop_unitary"]:
                real = torch.view_as_real(p) if p.is_complex() else p
                state["square_avg"] = torch.zeros_like(real, memory_format=torch.preserve_format)
        G = p.grad
        if group["rmsprop_unitary"]:
            if "square_avg" not in state:  # switched on after the first step
                real = torch.view_as_real(p) if p.is_complex() else p
                state["square_avg"] = torch.zeros_like(real, memory_format=torch.preserve_format)
            G = rmsprop_scale_(G, state["square_avg"], group["unitary_alpha"], group["unitary_eps"])
        lr_u = self.effective_unitary_lr(group)
        manifold_step(p.detach(), G, lr_u, group["method"], group["rank"], group["sampling"], out=p.detach())
        state["step"] += 1
        step = int(state["step"].item())
        every, tol = group["reproject_every"], group["reproject_tol"]
        if tol == "auto":
            tol = manifold_tolerance(p.shape[-1], p.dtype) / DRIFT_SAFETY_FACTOR
        if (every and step % every == 0) or (
            tol is not None and unitarity_error_estimate(p.detach(), group["drift_probes"]).item() > tol
        ):
            p.copy_(project_to_unitary(p.detach()))
            self.reprojections += 1
        record_manifold_step(p)

    def _euclidean_update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        kind = group["base_optimizer"]
        param = torch.view_as_real(p) if p.is_complex() else p
        grad = torch.view_as_real(p.grad) if p.grad.is_complex() else p.grad
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0)
            if kind == "rmsprop":
                state["square_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                if group["momentum"] > 0:
                    state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            else:
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["step"] += 1
        if kind == "adamw":
            param.mul_(1 - lr * wd)
        elif wd != 0:
            grad = grad.add(param, alpha=wd)
        if kind == "rmsprop":
            # torch.optim.RMSprop (centered=False): v = a v + (1-a) g^2; p -= lr g / (sqrt(v) + eps)
            alpha = group["alpha"]
            square_avg = state["square_avg"]
            square_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha)
            avg = square_avg.sqrt().add_(eps)
            if group["momentum"] > 0:
                buf = state.setdefault("momentum_buffer", torch.zeros_like(param))
                buf.mul_(group["momentum"]).addcdiv_(grad, avg)
                param.add_(buf, alpha=-lr)
            else:
                param.addcdiv_(grad, avg, value=-lr)
        else:
            # torch.optim.Adam / AdamW: bias-corrected first and second moments
            beta1, beta2 = group["betas"]
            step = state["step"].item()
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            bias_correction1 = 1 - beta1**step
            bias_correction2 = 1 - beta2**step
            denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
            param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


def _validate_group(group: dict[str, Any], index: int) -> None:
    where = f"param group {index}"
    if group["method"] not in METHODS:
        raise ValueError(f"{where}: unknown method {group['method']!r}; valid: {METHODS}")
    if group["base_optimizer"] not in BASE_OPTIMIZERS:
        raise ValueError(f"{where}: unknown base_optimizer {group['base_optimizer']!r}; valid: {BASE_OPTIMIZERS}")
    if group["sampling"] not in SAMPLINGS:
        raise ValueError(f"{where}: unknown sampling {group['sampling']!r}; valid: {SAMPLINGS}")
    if not (isinstance(group["rank"], int) and group["rank"] >= 1):
        raise ValueError(f"{where}: rank must be a positive int, got {group['rank']!r}")
    for key in ("lr", "unitary_lr", "eps", "unitary_eps", "weight_decay", "momentum"):
        if not (isinstance(group[key], (int, float, torch.Tensor)) and math.isfinite(group[key]) and group[key] >= 0):
            raise ValueError(f"{where}: {key} must be a finite number >= 0, got {group[key]!r}")
    for key in ("alpha", "unitary_alpha"):
        if not 0.0 <= group[key] < 1.0:
            raise ValueError(f"{where}: {key} must be in [0, 1), got {group[key]!r}")
    b1, b2 = group["betas"]
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ValueError(f"{where}: betas must be in [0, 1), got {group['betas']!r}")
    every = group["reproject_every"]
    if every is not None and not (isinstance(every, int) and every >= 0):
        raise ValueError(f"{where}: reproject_every must be a non-negative int or None, got {every!r}")
    tol = group["reproject_tol"]
    if not (tol is None or tol == "auto" or (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0)):
        raise ValueError(f"{where}: reproject_tol must be 'auto', a finite number > 0 or None, got {tol!r}")
    probes = group["drift_probes"]
    if probes is not None and (isinstance(probes, bool) or not (isinstance(probes, int) and probes >= 1)):
        raise ValueError(f"{where}: drift_probes must be a positive int or None, got {probes!r}")
    for p in group["params"]:
        kind = manifold_of(p)
        if kind is not None and (p.ndim != 2 or p.shape[0] != p.shape[1]):
            raise ValueError(f"{where}: manifold parameter of shape {tuple(p.shape)} is not square")


# ----------------------------------------------------------------------------------------------------
# construction from a model
# ----------------------------------------------------------------------------------------------------

# the keywords UnitaryOptimizer takes besides ``params``: its signature is the one list (and holds the defaults)
_OPTIMIZER_KEYS = tuple(name for name in inspect.signature(UnitaryOptimizer.__init__).parameters
                        if name not in ("self", "params"))


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(manifold_params, euclidean_params)`` among the trainable parameters of ``model``; the manifold ones
    come from the model's declarations (``unitary_rnn.manifold.manifold_parameters``), so a copy that lost
    the tensors' tags is still split correctly."""
    on_manifold = {id(p) for p in manifold_parameters(model).values()}
    manifold, euclidean = [], []
    for p in model.parameters():
        if p.requires_grad:
            (manifold if id(p) in on_manifold else euclidean).append(p)
    return manifold, euclidean


def create_optimizer(model: nn.Module, method: str = "cayley", *, weight_decay: float = 0.0, **kwargs: Any) -> UnitaryOptimizer:
    """A :class:`UnitaryOptimizer` for ``model``: its manifold parameters in the first group, all others in
    the second. Every keyword and its default is :class:`UnitaryOptimizer`'s; the ones used most:

    Args:
        method: the manifold step on W: ``"cayley"`` (multiplicative Cayley step, O(N^3)), ``"projunn_d"`` or
            ``"projunn_t"`` (rank-``rank`` projUNN, O(rank N^2)).
        weight_decay: for the Euclidean group only (never for W).
        **kwargs: ``lr`` (the Euclidean parameters' learning rate), ``unitary_lr`` (the manifold step's),
            ``base_optimizer`` (``"rmsprop"``, ``"adam"`` or ``"adamw"``, for the Euclidean parameters), ``rank``
            (projUNN's k), ``sampling`` (projUNN's low-rank approximation of the gradient: ``"lsi"``, ``"column"``
            or ``"exact"``), ``rmsprop_unitary``, ``reproject_tol`` (re-project W when its estimated drift
            exceeds this; ``"auto"``: a quarter of ``unitary_rnn.manifold.manifold_tolerance``; ``None``:
            never), ``reproject_every``, and ``betas``, ``eps``, ``alpha``, ``momentum``, ``unitary_alpha``,
            ``unitary_eps``, ``drift_probes``, ``unitary_lr_follows_schedule``.
    """
    unknown = sorted(set(kwargs) - set(_OPTIMIZER_KEYS))
    if unknown:
        raise TypeError(f"create_optimizer got unknown keyword(s) {unknown}; valid: {list(_OPTIMIZER_KEYS)}")
    manifold, euclidean = split_parameters(model)
    if not manifold and not euclidean:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    groups = []
    if manifold:
        groups.append({"params": manifold, "weight_decay": 0.0})
    if euclidean:
        groups.append({"params": euclidean, "weight_decay": weight_decay})
    return UnitaryOptimizer(groups, method=method, **kwargs)
