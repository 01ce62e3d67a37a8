"""Make an installed hh-peft enough for PEFT: ``import hh_peft`` runs as soon as ``peft`` has finished importing.

PEFT knows its methods from a closed enum and has no plugin discovery, so a process that loads an HTA adapter
(``PeftModel.from_pretrained``, ``AutoPeftModel...``, ``PeftConfig.from_pretrained``) without having imported
``hh_peft`` would fail with ``KeyError: 'HTA'``. The installed ``hh_peft_autoload.pth`` imports this module when the
interpreter starts (``site`` runs the ``import`` lines of the ``.pth`` files in site-packages). All it does then is
put one finder at the front of ``sys.meta_path``. The finder answers nothing itself and ignores every module but
``peft``, so a process that never imports PEFT pays for this small module and one string comparison per import.
When ``peft`` is imported, the finder lets the other finders locate it and wraps its loader: once the ``peft``
package has executed, ``hh_peft`` is imported (which registers the ``"hta"`` method) and the finder removes itself.

``HH_PEFT_AUTOLOAD=0`` in the environment switches this off (then ``import hh_peft`` before loading an HTA adapter).
The hook cannot run where ``site`` does not process site-packages (``python -S``).

This module is deliberately free of imports beyond ``os`` and ``sys`` (both already loaded at start-up).
"""

import os
import sys

ENVIRONMENT_VARIABLE = "HH_PEFT_AUTOLOAD"
TRIGGER_MODULE = "peft"
REGISTERING_MODULE = "hh_peft"


class RegisterAfterPeftFinder:
    """A ``sys.meta_path`` finder that finds nothing itself: for ``peft`` it returns the spec the other finders
    give, with a loader that imports ``hh_peft`` right after ``peft`` has executed."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TRIGGER_MODULE or REGISTERING_MODULE in sys.modules:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _ExecThenRegister(spec.loader, self)
        return spec


class _ExecThenRegister:
    """Loader of ``peft``: runs the real loader, then imports ``hh_peft``. The module keeps its real loader
    (``peft.__loader__`` and ``peft.__spec__.loader`` are restored before its code runs)."""

    def __init__(self, loader, finder):
        self.loader = loader
        self.finder = finder

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        uninstall(self.finder)
        register_hta()


def register_hta():
    """``import hh_peft``. A failure never breaks ``import peft``: it is reported as a warning instead."""
    try:
        __import__(REGISTERING_MODULE)
    except Exception as error:  # noqa: BLE001  (any failure of a plugin must leave PEFT usable)
        import warnings

        warnings.warn(
            f"hh-peft is installed but `import {REGISTERING_MODULE}` failed ({type(error).__name__}: {error}); PEFT "
            "cannot load HTA adapters in this process until it imports",
            RuntimeWarning,
            stacklevel=2,
        )


def install() -> None:
    """Put the finder at the front of ``sys.meta_path`` (idempotent); nothing when ``HH_PEFT_AUTOLOAD=0`` or when
    ``hh_peft`` is already imported."""
    if os.environ.get(ENVIRONMENT_VARIABLE, "1") == "0" or REGISTERING_MODULE in sys.modules:
        return
    if any(isinstance(finder, RegisterAfterPeftFinder) for finder in sys.meta_path):
        return
    if TRIGGER_MODULE in sys.modules:  # peft came first (a sitecustomize, say): register now
        register_hta()
        return
    sys.meta_path.insert(0, RegisterAfterPeftFinder())


def uninstall(finder) -> None:
    if finder in sys.meta_path:
        sys.meta_path.remove(finder)


install()
