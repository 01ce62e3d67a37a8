"""Undo a failed load: put a module tree back exactly as it was.

A load fails late (an adapter saved for another base model is found out only when PEFT maps its tensors onto the
injected layers), after modules have been replaced. :class:`ModuleTreeSnapshot` records what a load may change;
:func:`rollback_on_failure` restores it when the load raises. The snapshot is taken by HTA's own code at the first
moment it runs (`HouseholderModel.inject_adapter` calls :func:`record_before_change`), so a load that never reaches
HTA code (another PEFT method's adapter) never pays for one.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional

import torch
from torch import nn

ROLLED_BACK_NOTE = "The model was left as it was before this call."
_CONTAINERS = (dict, list, set)


class ModuleTreeSnapshot:
    """What a load may change on a module tree, to put back after a failure: every module's attributes (its child
    modules, parameters, buffers, hooks, plain dicts / lists / sets such as an adapter layer's per-adapter settings,
    the contents of each of those one level deep) and every parameter's ``requires_grad``. Tensor values are not
    copied, except those of ``values`` (parameters a load may overwrite in place)."""

    def __init__(self, model: nn.Module, values: tuple[torch.Tensor, ...] = ()) -> None:
        self.modules = []
        for module in model.modules():
            attributes = dict(module.__dict__)
            contents = {}
            for name, value in attributes.items():
                if type(value) in _CONTAINERS or isinstance(value, dict):
                    contents[name] = value.copy()
            self.modules.append((module, attributes, contents))
        self.requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        self.values = [(p, p.detach().clone()) for p in values]

    @torch.no_grad()
    def restore(self) -> None:
        for module, attributes, contents in self.modules:
            for name in [n for n in module.__dict__ if n not in attributes]:
                del module.__dict__[name]
            for name, value in attributes.items():
                module.__dict__[name] = value
                if name in contents:
                    saved = contents[name]
                    value.clear()
                    if isinstance(value, list):
                        value.extend(saved)
                    else:
                        value.update(saved)
        for parameter, requires_grad in self.requires_grad:
            parameter.requires_grad_(requires_grad)
        for parameter, value in self.values:
            parameter.copy_(value)


class _Pending:
    """The snapshot of one guarded call, once something has recorded it."""

    def __init__(self) -> None:
        self.snapshot: Optional[ModuleTreeSnapshot] = None

    def record(self, model: nn.Module, values: tuple[torch.Tensor, ...] = ()) -> None:
        if self.snapshot is None:
            self.snapshot = ModuleTreeSnapshot(model, values)


_PENDING: contextvars.ContextVar[Optional[_Pending]] = contextvars.ContextVar("hh_peft_pending_rollback", default=None)


def guarded() -> bool:
    """True inside :func:`rollback_on_failure` (an outer call restores whatever an inner one changes)."""
    return _PENDING.get() is not None


@contextlib.contextmanager
def rollback_on_failure() -> Iterator[_Pending]:
    """Run the body; if it raises after a snapshot was recorded (:func:`record_before_change`, or ``.record`` on the
    yielded object), restore the snapshot and add :data:`ROLLED_BACK_NOTE` to the error. Nested uses share the
    outermost snapshot."""
    outer = _PENDING.get()
    if outer is not None:
        yield outer
        return
    pending = _Pending()
    token = _PENDING.set(pending)
    try:
        yield pending
    except BaseException as error:
        if pending.snapshot is not None:
            pending.snapshot.restore()
            if isinstance(error, Exception):
                error.add_note(ROLLED_BACK_NOTE)
        raise
    finally:
        _PENDING.reset(token)


def record_before_change(model: nn.Module) -> None:
    """Inside :func:`rollback_on_failure`, snapshot ``model`` unless something was recorded already."""
    pending = _PENDING.get()
    if pending is not None:
        pending.record(model)
