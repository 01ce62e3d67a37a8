"""Shared primitives for parameters that live on U(N) (complex) or O(N) (real).

Which parameters are on a manifold
----------------------------------
A module that owns such parameters derives from :class:`ManifoldModule` and names them in
``manifold_parameter_names``. That declaration is what counts: it survives ``copy.deepcopy``, pickling,
``load_state_dict`` (also with ``assign=True``), ``from_pretrained``, dtype / device conversions and
``accelerate``, because it lives on the module class, not on the tensor. The tensors themselves also carry
the attribute ``manifold`` (``"unitary"`` for complex, ``"orthogonal"`` for real; :func:`mark_manifold`),
which the module restores whenever a new tensor object takes the parameter's place (a plain Python
attribute on a ``Parameter`` is dropped by ``Parameter.__deepcopy__`` and by conversions that build a new
``Parameter``), so that an optimizer given bare tensors can read it with :func:`manifold_of`.
:func:`manifold_parameters` walks a model's declarations.

Guards
------
- Tolerance (:func:`manifold_tolerance`): ``||W^H W - I||_F <= sqrt(N) * c`` with ``c = 1e-4`` in single
  precision and ``1e-10`` in double, i.e. the root mean square over the columns of ``||(W^H W - I) e_j||``
  is at most ``c``. The optimizers keep W within the tolerance of its dtype; the guards below
  (:func:`check_on_manifold`) accept any matrix within the single-precision one, whatever its dtype.
  Loading (``load_state_dict`` of a :class:`ManifoldModule`) rejects a matrix outside it.
- Off-manifold edits: every forward of a :class:`ManifoldModule` calls :meth:`ManifoldModule.check_manifold`.
  It compares each manifold parameter's version counter with the last one it verified or that a manifold
  optimizer recorded (:func:`record_manifold_step`), so it costs two attribute reads when nothing else
  touched the tensor; after any other in-place change it measures ``||W^H W - I||_F`` once and raises if the
  matrix left the manifold.
- Foreign optimizers: importing this module registers a ``torch.optim`` step pre-hook that raises before any
  optimizer without the class attribute ``steps_on_manifolds = True`` steps a trainable manifold parameter
  (a Euclidean optimizer would move it off the manifold; the fused AdamW kernels reject complex tensors).
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

MANIFOLDS = ("unitary", "orthogonal")

MANIFOLD_TOLERANCE_PER_COLUMN = {"single": 1e-4, "double": 1e-10}
"""``c`` in :func:`manifold_tolerance`: the largest root mean square column error ``||(W^H W - I) e_j||``."""

_DOUBLE = (torch.float64, torch.complex128)


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
    """The manifold tag of ``param`` (``"unitary"``, ``"orthogonal"``) or ``None`` for a Euclidean parameter.
    A model's own declarations are read by :func:`manifold_parameters`."""
    return getattr(param, "manifold", None)


def manifold_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter of ``model`` on a manifold, by qualified name: those declared by a
    :class:`ManifoldModule` (re-tagged with :func:`mark_manifold` when a copy lost the tag) and any other
    parameter tagged by hand."""
    found: dict[str, nn.Parameter] = {}
    for prefix, module in model.named_modules():
        if isinstance(module, ManifoldModule):
            for name, p in module.declared_manifold_parameters():
                if manifold_of(p) is None:
                    mark_manifold(p)
                found[f"{prefix}.{name}" if prefix else name] = p
    seen = {id(p) for p in found.values()}
    for name, p in model.named_parameters():
        if id(p) not in seen and manifold_of(p) is not None:
            found[name] = p
    return found


def unitarity_error(W: torch.Tensor) -> torch.Tensor:
    """``||W^H W - I||_F``, the distance from unitarity (orthogonality for real W)."""
    eye = torch.eye(W.shape[-1], dtype=W.dtype, device=W.device)
    return torch.linalg.matrix_norm(W.mH @ W - eye)


def manifold_tolerance(n: int, dtype: torch.dtype) -> float:
    """The largest ``||W^H W - I||_F`` accepted for an ``n x n`` manifold matrix of ``dtype``:

        tol = sqrt(n) * c,    c = 1e-4 (float32 / complex64), 1e-10 (float64 / complex128)

    ``c`` bounds the root mean square over the columns of ``||(W^H W - I) e_j||``. Rounding alone leaves a
    Haar-random complex64 matrix at about ``3e-7 sqrt(n)``, and a hundred optimizer steps without
    re-projection at about ``1e-5 sqrt(n)`` (Cayley at lr 1e-2); double precision stays between ``1e-15 sqrt(n)``
    and ``1e-14 sqrt(n)``."""
    return math.sqrt(n) * MANIFOLD_TOLERANCE_PER_COLUMN["double" if dtype in _DOUBLE else "single"]


def project_to_unitary(W: torch.Tensor) -> torch.Tensor:
    """The closest unitary (orthogonal) matrix to ``W`` in Frobenius norm: the polar factor ``U V^H``
    of ``W = U S V^H``.

    A nearly unitary ``W`` (the optimizer's re-projection, the only common use) has all its singular values
    within about 1e-4 of 1, and LAPACK's divide-and-conquer SVD can fail to converge on such a cluster: it did on
    a complex64 N = 128 matrix with one thread, 8,500 steps into an adding-task run. A failed SVD is retried in
    double precision (cast back), which converges. ``W`` with NaN or inf entries raises ``ValueError`` (the SVD
    would raise on NaN but return NaN for inf).
    """
    if not bool(torch.isfinite(W).all()):  # O(N^2) beside the O(N^3) SVD; complex: both parts finite
        raise ValueError(
            f"project_to_unitary: the {tuple(W.shape)} matrix has NaN or inf entries; only a finite matrix has a "
            "closest unitary one"
        )
    try:
        U, _, Vh = torch.linalg.svd(W)
        return U @ Vh
    except torch.linalg.LinAlgError:
        wide = torch.complex128 if W.is_complex() else torch.float64
        if W.dtype == wide:
            raise
        U, _, Vh = torch.linalg.svd(W.to(wide))
        return (U @ Vh).to(W.dtype)


def check_on_manifold(W: torch.Tensor, what: str) -> None:
    """Raise ``ValueError`` naming ``what`` unless ``W`` is finite and ``||W^H W - I||_F`` is within the
    single-precision :func:`manifold_tolerance`, whatever W's dtype (a model trained in float32 and cast to
    float64 is still on the manifold to float32 precision)."""
    W = W.detach()
    if W.ndim != 2 or W.shape[0] != W.shape[1]:
        raise ValueError(f"{what}: a manifold matrix must be square, got shape {tuple(W.shape)}")
    tol = manifold_tolerance(W.shape[0], torch.float32)
    err = unitarity_error(W).item()
    if not err <= tol:  # NaN fails too
        group = "unitary" if W.is_complex() else "orthogonal"
        raise ValueError(
            f"{what} is not {group}: ||W^H W - I||_F = {err:.3g} exceeds the tolerance {tol:.3g} "
            f"(sqrt(N) * {MANIFOLD_TOLERANCE_PER_COLUMN['single']:.0e} for N = {W.shape[0]})"
        )


def check_loaded_matrix(value: torch.Tensor, param: torch.Tensor, what: str) -> None:
    """:func:`check_on_manifold` for ``value`` about to be loaded into ``param``."""
    if not isinstance(value, torch.Tensor) or value.is_meta or value.shape != param.shape:
        return  # not a manifold matrix for this parameter: the loader reports missing keys and shapes itself
    check_on_manifold(value, what)


def check_manifold_state_dict(model: nn.Module, state_dict) -> None:
    """Check every manifold matrix of ``model`` (:func:`manifold_parameters`) present in ``state_dict`` with
    :func:`check_loaded_matrix`, before anything is loaded."""
    for name, p in manifold_parameters(model).items():
        if name in state_dict:
            check_loaded_matrix(state_dict[name], p, f"{type(model).__name__}.load_state_dict: {name}")


def record_manifold_step(param: torch.Tensor) -> None:
    """Called by a manifold optimizer after it wrote ``param`` in place: the write keeps ``param`` on its
    manifold, so :meth:`ManifoldModule.check_manifold` need not measure it."""
    param._manifold_version = param._version


# ------------------------------------------------------------------------------------------------------
# modules that own manifold parameters
# ------------------------------------------------------------------------------------------------------


class ManifoldModule(nn.Module):
    """Base of modules with parameters on U(N) / O(N), listed in ``manifold_parameter_names``.

    Keeps :func:`mark_manifold`'s tag on those parameters through assignment (loaders build fresh
    ``Parameter`` objects), ``copy.deepcopy`` and unpickling (``__setstate__``); rejects a non-unitary
    matrix in ``load_state_dict``; and :meth:`check_manifold` (called by the subclass's ``forward``)
    detects an off-manifold edit made outside a manifold optimizer.
    """

    manifold_parameter_names: tuple[str, ...] = ()

    def declared_manifold_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` for each declared manifold parameter that exists on this module."""
        params = self.__dict__.get("_parameters", {})
        return [(name, params[name]) for name in self.manifold_parameter_names if params.get(name) is not None]

    def _retag_manifold_parameters(self) -> None:
        for _, p in self.declared_manifold_parameters():
            if manifold_of(p) is None:
                mark_manifold(p)

    def __setattr__(self, name, value):
        # transformers' loader makes a loaded Parameter trainable only if it is floating point, which a
        # complex tensor is not: keep the trainability of the parameter being replaced
        if isinstance(value, nn.Parameter) and name in self.manifold_parameter_names:
            old = self.__dict__.get("_parameters", {}).get(name)
            if old is not None and old.requires_grad and not value.requires_grad and value.is_complex():
                value.requires_grad_(True)
            if manifold_of(value) is None:
                mark_manifold(value)
        super().__setattr__(name, value)

    def _apply(self, fn, recurse=True):
        # a conversion that has to build a new Parameter object (new dtype) bypasses __setattr__
        result = super()._apply(fn, recurse)
        self._retag_manifold_parameters()
        return result

    def __setstate__(self, state):
        # copy.deepcopy and pickle rebuild the module from its __dict__; Parameter.__deepcopy__ drops the tag
        super().__setstate__(state)
        self._retag_manifold_parameters()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        for name, p in self.declared_manifold_parameters():
            if prefix + name in state_dict:
                check_loaded_matrix(state_dict[prefix + name], p, f"{type(self).__name__}.load_state_dict: {prefix + name}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def check_manifold(self) -> None:
        """Raise if a manifold parameter left its manifold through an in-place change that no manifold
        optimizer recorded (e.g. ``torch.optim.AdamW``, or an edit under ``torch.no_grad()``). Costs two
        attribute reads per parameter when nothing changed; measures ``||W^H W - I||_F`` once per foreign
        change. Skipped while ``torch.compile`` traces."""
        if torch.compiler.is_compiling():
            return
        verified = self.__dict__.setdefault("_manifold_verified_versions", {})
        for name, p in self.declared_manifold_parameters():
            version = p._version
            if verified.get(name) == (id(p), version) or p.is_meta:
                continue
            if getattr(p, "_manifold_version", None) != version:
                try:
                    check_on_manifold(p, f"{type(self).__name__}.{name}")
                except ValueError as err:
                    raise RuntimeError(
                        f"{err}. It was changed in place by something other than a manifold optimizer (a plain "
                        "torch.optim optimizer, or a manual edit). Train it with "
                        "unitary_rnn.training.create_optimizer(model, ...) (with transformers: "
                        f"unitary_rnn.training.UnitaryTrainer); {type(self).__name__}.project_manifold_parameters_() "
                        "puts it back on the manifold."
                    ) from None
            verified[name] = (id(p), version)

    @torch.no_grad()
    def project_manifold_parameters_(self) -> None:
        """Replace every manifold parameter by its closest point on the manifold (the polar factor)."""
        for _, p in self.declared_manifold_parameters():
            p.copy_(project_to_unitary(p.detach()))


# ------------------------------------------------------------------------------------------------------
# the guard against Euclidean optimizers
# ------------------------------------------------------------------------------------------------------

_cleared_optimizers: "weakref.WeakKeyDictionary[torch.optim.Optimizer, int]" = weakref.WeakKeyDictionary()


def refuse_euclidean_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """``torch.optim`` global step pre-hook: raise before an optimizer that is not manifold-aware (no class
    attribute ``steps_on_manifolds = True``) steps a trainable parameter tagged by :func:`mark_manifold`.
    Each optimizer is inspected once (again if its number of parameters changes)."""
    if getattr(optimizer, "steps_on_manifolds", False):
        return
    count = sum(len(group["params"]) for group in optimizer.param_groups)
    if _cleared_optimizers.get(optimizer) == count:
        return
    for index, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            kind = manifold_of(p)
            if kind is not None and p.requires_grad:
                raise RuntimeError(
                    f"{type(optimizer).__module__}.{type(optimizer).__name__} would step a parameter on "
                    f"{'U(N)' if kind == 'unitary' else 'O(N)'} (shape {tuple(p.shape)}, {p.dtype}, param group "
                    f"{index}) as an ordinary tensor and move it off the manifold. Use "
                    "unitary_rnn.training.create_optimizer(model, ...) (a UnitaryOptimizer); with transformers: "
                    "unitary_rnn.training.UnitaryTrainer, or Trainer(..., optimizers=(create_optimizer(model), None))."
                )
    _cleared_optimizers[optimizer] = count


# (a trust_remote_code copy of this file registers its own: harmless, both raise the same error)
register_optimizer_step_pre_hook(refuse_euclidean_step)
