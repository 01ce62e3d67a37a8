"""Atomic saving and all-or-nothing loading of HTA adapters.

:func:`install_persistence_hooks` (called once by ``import hh_peft``) wraps three methods of ``PeftModel``. Each
changes behaviour only for HTA adapters; every other PEFT model takes PEFT's own code path unchanged.

**Saving** (``save_pretrained``, for a model whose adapters are all HTA). PEFT writes the weights, the config and the
card one file after another into the folder itself, so a process killed mid-save (or a full disk) leaves a mix of two
adapters or an empty ``adapter_config.json``. Here the whole folder is written next to it, in a hidden sibling
``.<name>.hta-tmp-<pid>-<random>``, by PEFT's own ``save_pretrained`` (so the card, sub-folders of non-default
adapters and ``selected_adapters`` behave exactly as in PEFT). Then:

1. files already in the folder that this save does not write (another adapter's sub-folder, a user's file) are
   hard-linked into the new folder, so the result is what PEFT's in-place save would leave; ``README.md`` is copied in
   before the save, because the card is updated, not replaced;
2. every new file, then every folder, is ``fsync``-ed;
3. the new folder takes the old one's place in one step: ``renameat2(RENAME_EXCHANGE)`` on Linux swaps the two paths
   atomically, so a reader at any moment opens the old adapter or the new one. Where the file system cannot exchange,
   the old folder is renamed aside (``.<name>.hta-old-...``) and the new one renamed in; a process killed between the
   two renames leaves no folder for an instant, and the next save or load puts the old folder back. A folder that is
   a mount point cannot be renamed: its files are replaced one by one, each atomically (with a warning);
4. the old folder is removed.

Any failure before step 3 (a full disk, an error in the card, a kill) removes the temporary folder (or leaves it for
the next save to remove) and leaves the old adapter and its card as they were. SIGINT, SIGTERM and SIGHUP that
arrive during a save are held until it has finished, then take effect (``KeyboardInterrupt`` for Ctrl-C). Stale siblings of dead processes are removed by the next save.

The weights file also records ``hta_sha256`` in its safetensors metadata: a digest of every tensor (name, dtype,
shape, bytes), checked on load, so a file whose bytes changed after saving is refused instead of loaded silently.

**Loading** (``PeftModel.from_pretrained`` and ``PeftModel.load_adapter``, for a folder whose config says HTA or
whose tensors are HTA's). Before anything is injected the folder is checked: the config is JSON with
``"peft_type": "HTA"`` and valid values; the weights file is a complete safetensors file whose digest matches; every
adapted layer has the five tensors with consistent shapes and the config's ``lora_rank``. Each problem raises a
``ValueError`` naming the file and what is wrong. A failure after injection (e.g. an adapter saved for another base
model) restores the model exactly: the module tree, every parameter's ``requires_grad``, hooks and attributes, the
adapters it had before.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import errno
import functools
import hashlib
import inspect
import json
import os
import re
import secrets
import shutil
import signal
import struct
import sys
import threading
import warnings
from typing import Any, Optional

import torch
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from torch import nn

from .registration import HTA_PEFT_TYPE

CARD_FILE = "README.md"
DIGEST_KEY = "hta_sha256"
TMP_TAG = ".hta-tmp-"
OLD_TAG = ".hta-old-"
# A saved HTA tensor: "<prefix>.<module path>.hta_<name>" (the adapter name is not part of saved keys).
_HTA_KEY = re.compile(r"^(?P<module>.+)\.hta_(?P<name>u_in|u_out|d|A|B)$")
# Set while our from_pretrained runs: its own rollback covers the load_adapter call inside it.
_IN_FROM_PRETRAINED = contextvars.ContextVar("hh_peft_in_from_pretrained", default=False)


# ----------------------------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------------------------
def hta_only(peft_model) -> bool:
    """True when ``peft_model`` has adapters and all of them are HTA."""
    configs = getattr(peft_model, "peft_config", None) or {}
    return bool(configs) and all(getattr(c, "peft_type", None) == HTA_PEFT_TYPE for c in configs.values())


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors in name order, each as ``name|dtype|shape`` then its raw bytes."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def _add_digest(path: str) -> None:
    """Rewrite the safetensors file ``path`` with :func:`tensors_digest` of its tensors in the metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(path, "pt") as handle:
        metadata = dict(handle.metadata() or {})
    tensors = load_file(path)
    metadata[DIGEST_KEY] = tensors_digest(tensors)
    save_file(tensors, path, metadata=metadata)


def _fsync(path: str) -> None:
    if os.name == "nt" and os.path.isdir(path):
        return  # Windows cannot open a folder for fsync; its renames are journaled by NTFS
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: str, files: bool) -> None:
    """fsync every folder under ``root`` (and every file, if ``files``), deepest first, ``root`` last."""
    for folder, _, names in os.walk(root, topdown=False):
        if files:
            for name in names:
                path = os.path.join(folder, name)
                if not os.path.islink(path):
                    _fsync(path)
        _fsync(folder)


def _link_missing(old: str, new: str) -> None:
    """Give ``new`` every entry of ``old`` it lacks (recursively): files as hard links (a copy where the file system
    has none), symbolic links as links. What ``new`` already holds wins."""
    for entry in os.scandir(old):
        target = os.path.join(new, entry.name)
        if entry.is_dir(follow_symlinks=False):
            if not os.path.lexists(target):
                os.mkdir(target)
                shutil.copymode(entry.path, target)
            if os.path.isdir(target) and not os.path.islink(target):
                _link_missing(entry.path, target)
        elif not os.path.lexists(target):
            if entry.is_symlink():
                os.symlink(os.readlink(entry.path), target)
            else:
                try:
                    os.link(entry.path, target)
                except OSError:
                    shutil.copy2(entry.path, target)


@functools.lru_cache(maxsize=1)
def _renameat2():
    """libc's ``renameat2`` (Linux, glibc >= 2.28), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# Set to False to force the two-rename swap (what file systems without RENAME_EXCHANGE get).
use_rename_exchange = True


def exchange_paths(a: str, b: str) -> bool:
    """Swap the two existing paths ``a`` and ``b`` in one atomic step; False where the system cannot."""
    function = _renameat2() if use_rename_exchange else None
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # this file system (or kernel) has no RENAME_EXCHANGE
    raise OSError(code, os.strerror(code), a, None, b)


def _sibling(target: str, tag: str) -> str:
    parent, name = os.path.split(target)
    return os.path.join(parent, f".{name}{tag}{os.getpid()}-{secrets.token_hex(4)}")


# Temporary folders this process is writing now (another thread may save next to the same folder).
_WRITING: set[str] = set()


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process's own folders in use are in _WRITING
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale_siblings(target: str) -> tuple[list[str], list[str]]:
    """(temporary folders, set-aside old folders) left next to ``target`` by saves of processes no longer running."""
    parent, name = os.path.split(target)
    pattern = re.compile(re.escape(f".{name}") + r"(?P<tag>\.hta-(?:tmp|old)-)(?P<pid>\d+)-[0-9a-f]+$")
    tmp, old = [], []
    try:
        entries = os.listdir(parent)
    except FileNotFoundError:
        return tmp, old
    for entry in entries:
        match = pattern.match(entry)
        path = os.path.join(parent, entry)
        if match and path not in _WRITING and not _pid_alive(int(match["pid"])):
            (tmp if match["tag"] == TMP_TAG else old).append(path)
    return tmp, old


def recover(target: str) -> None:
    """Repair what an interrupted save left next to ``target``: if ``target`` is missing (a kill between the two
    renames of the fallback swap) its set-aside old folder is renamed back; stale temporary folders are removed."""
    target = os.path.realpath(target)
    tmp, old = _stale_siblings(target)
    if old and not os.path.lexists(target):
        newest = max(old, key=os.path.getmtime)
        os.rename(newest, target)
        old.remove(newest)
    for path in tmp + old:
        shutil.rmtree(path, ignore_errors=True)


def _swap_into_place(new: str, target: str) -> Optional[str]:
    """Make the complete folder ``new`` appear at ``target`` in one step (module docstring, step 3); return the path
    that now holds the old folder (to remove), if any. On an exception ``target`` is as it was."""
    if not os.path.lexists(target):
        os.rename(new, target)
        return None
    if exchange_paths(new, target):
        return new  # ``new`` now names the old folder
    old = _sibling(target, OLD_TAG)
    os.rename(target, old)  # (signals are held for the whole save: a Ctrl-C never lands between the two renames)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    return old


def _replace_file_by_file(new: str, target: str) -> None:
    """A mount point cannot be renamed: move each file of ``new`` over its namesake in ``target`` (each file is
    replaced atomically, the folder as a whole is not)."""
    warnings.warn(
        f"{target} is a mount point, so the adapter folder cannot be replaced in one step: its files are replaced one "
        "by one (each atomically). Save into a folder inside the mount for an atomic save."
    )
    for folder, _, names in os.walk(new):
        destination = os.path.join(target, os.path.relpath(folder, new))
        os.makedirs(destination, exist_ok=True)
        for name in sorted(names, key=lambda n: n == CONFIG_NAME):  # the config last
            os.replace(os.path.join(folder, name), os.path.join(destination, name))
        _fsync(destination)


def _remove_tree(path: str) -> None:
    """``shutil.rmtree``, finished even when a signal interrupts it."""
    try:
        shutil.rmtree(path)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise


DEFERRED_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT, SIGTERM and SIGHUP for the duration: each one that arrives is recorded, and on exit the previous
    handlers are put back and the signals raised again, in order of arrival (so Ctrl-C becomes ``KeyboardInterrupt``
    there, and SIGTERM with the default handler still ends the process).

    Python-level handlers, not a thread signal mask: Python runs signal handlers in the main thread whichever OS
    thread the kernel picks, and a ``KeyboardInterrupt`` raised inside the save could otherwise be turned into a
    ``ValueError`` by safetensors' Rust code or be swallowed by a ``__del__`` ("Exception ignored"), both seen here
    under load. Outside the main thread (where handlers cannot be changed) and for a signal whose handler was not set
    from Python, nothing is held."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {}
    for signum in DEFERRED_SIGNALS:
        handler = signal.getsignal(signum)
        if handler is None or handler == signal.SIG_IGN:  # set outside Python, or ignored: left alone
            continue
        previous[signum] = handler
        signal.signal(signum, lambda number, frame: received.append(number))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in received:
            signal.raise_signal(signum)


def atomic_save_pretrained(original, peft_model, save_directory, *args, **kwargs) -> None:
    """PEFT's ``save_pretrained`` (``original``) into a temporary sibling folder, then swapped in whole. A Ctrl-C
    (or SIGTERM, SIGHUP) during the save takes effect once it has finished (:func:`_signals_deferred`)."""
    with _signals_deferred():
        _atomic_save(original, peft_model, save_directory, *args, **kwargs)


def _atomic_save(original, peft_model, save_directory, *args, **kwargs) -> None:
    if os.path.isfile(save_directory):
        raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file")
    # Follow a symbolic link: the folder it points to is the one replaced.
    target = os.path.realpath(save_directory)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    recover(target)
    try:
        cwd = os.getcwd()
    except FileNotFoundError:
        cwd = None
    mount_point = os.path.ismount(target)
    new = _sibling(target, TMP_TAG)
    os.mkdir(new)
    _WRITING.add(new)
    leftover = None
    try:
        if os.path.isdir(target):
            shutil.copymode(target, new)
            card = os.path.join(target, CARD_FILE)
            if os.path.isfile(card):  # PEFT updates an existing card in place rather than replacing it
                shutil.copy2(card, os.path.join(new, CARD_FILE))
        original(peft_model, new, *args, **kwargs)
        for folder, _, names in os.walk(new):
            if SAFETENSORS_WEIGHTS_NAME in names:
                _add_digest(os.path.join(folder, SAFETENSORS_WEIGHTS_NAME))
        _fsync_tree(new, files=True)
        if os.path.isdir(target) and not mount_point:
            _link_missing(target, new)
            _fsync_tree(new, files=False)
        if not mount_point:
            leftover = _swap_into_place(new, target)
    except BaseException as error:
        shutil.rmtree(new, ignore_errors=True)
        _WRITING.discard(new)
        if isinstance(error, Exception):
            error.add_note(f"Saving the HTA adapter to {target} failed; the folder was left as it was.")
        raise
    try:
        if mount_point:
            _replace_file_by_file(new, target)
            leftover = new
        _fsync(parent)
        if leftover is not None:
            _remove_tree(leftover)
    finally:
        _WRITING.discard(new)
    if cwd is not None and (cwd == target or cwd.startswith(target + os.sep)):
        os.chdir(cwd)  # the process was inside the replaced folder: follow the path to the new one


# ----------------------------------------------------------------------------------------------------------------
# Checking a saved adapter before loading it
# ----------------------------------------------------------------------------------------------------------------
def _read_config(path: str) -> tuple[Optional[dict], Optional[str]]:
    """(the JSON object in ``path``, None) or (None, what is wrong with the file)."""
    if not os.path.isfile(path):
        return None, "the file is missing"
    with open(path, "rb") as handle:
        raw = handle.read()
    if not raw.strip():
        return None, "the file is empty"
    try:
        loaded = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return None, f"the file is not valid JSON ({error})"
    if not isinstance(loaded, dict):
        return None, f"the file holds a JSON {type(loaded).__name__}, not an object"
    return loaded, None


def _read_safetensors_header(path: str) -> tuple[Optional[dict], Optional[str]]:
    """(the safetensors header of ``path``, None) or (None, what is wrong). Format: 8 bytes little-endian header
    length ``n``, ``n`` bytes of JSON, then the data; a header that parses tells the tensor names even when the data
    is cut short."""
    if not os.path.isfile(path):
        return None, "the file is missing"
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        if size < 8:
            return None, f"the file is truncated ({size} bytes, shorter than a safetensors header)"
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > size - 8:
            return None, f"the file is truncated or not a safetensors file (header of {length} bytes, file of {size})"
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            return None, f"the file is corrupted or not a safetensors file (unreadable header: {error})"
    if not isinstance(header, dict):
        return None, "the file is corrupted (its header is not a JSON object)"
    return header, None


def _hta_keys(header: Optional[dict]) -> list[str]:
    return [key for key in (header or {}) if _HTA_KEY.match(key)]


def _check_tensor_shapes(tensors: dict[str, torch.Tensor], lora_rank: int, config_path: str, weights_path: str):
    """Every adapted layer holds ``u_in`` (in), ``u_out`` (out), ``d`` (min(in, out)) and, when ``lora_rank`` > 0,
    ``A`` (lora_rank, in) and ``B`` (out, lora_rank)."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _HTA_KEY.match(key)
        if match:
            layers.setdefault(match["module"], {})[match["name"]] = tensor
    if not layers:
        raise ValueError(f"{weights_path} holds no HTA tensors (no '.hta_' keys), but {config_path} says HTA")
    for module, found in layers.items():
        missing = [name for name in ("u_in", "u_out", "d") if name not in found]
        if missing:
            raise ValueError(f"{weights_path} is incomplete: layer {module} lacks {', '.join('hta_' + n for n in missing)}")
        u_in, u_out, d = found["u_in"], found["u_out"], found["d"]
        if u_in.dim() != 1 or u_out.dim() != 1:
            raise ValueError(f"{weights_path}: {module}.hta_u_in / hta_u_out must be vectors, got shapes "
                             f"{tuple(u_in.shape)} and {tuple(u_out.shape)}")
        n_in, n_out = u_in.numel(), u_out.numel()
        if tuple(d.shape) != (min(n_in, n_out),):
            raise ValueError(f"{weights_path}: {module}.hta_d has shape {tuple(d.shape)}, expected ({min(n_in, n_out)},) "
                             f"for a layer of {n_in} inputs and {n_out} outputs")
        has_low_rank = "A" in found or "B" in found
        if lora_rank == 0 and has_low_rank:
            saved = found["A"].shape[0] if "A" in found else found["B"].shape[-1]
            raise ValueError(
                f"{config_path} says lora_rank 0, but {weights_path} holds {module}.hta_A / hta_B, saved with "
                f"lora_rank {saved}: the config and the weights belong to different adapters (or the config was edited)"
            )
        if lora_rank > 0:
            if "A" not in found or "B" not in found:
                raise ValueError(
                    f"{config_path} says lora_rank {lora_rank}, but {weights_path} has no {module}.hta_A / hta_B "
                    "(saved with lora_rank 0): the config and the weights belong to different adapters"
                )
            A, B = found["A"], found["B"]
            if tuple(A.shape) != (lora_rank, n_in) or tuple(B.shape) != (n_out, lora_rank):
                raise ValueError(
                    f"{config_path} says lora_rank {lora_rank}, but in {weights_path} {module}.hta_A has shape "
                    f"{tuple(A.shape)} and hta_B {tuple(B.shape)} (expected ({lora_rank}, {n_in}) and "
                    f"({n_out}, {lora_rank})): the config and the weights belong to different adapters"
                )


def check_adapter_folder(folder: str, config=None) -> bool:
    """Check the adapter saved in ``folder`` before anything is injected; True if it is an HTA adapter (its config
    says HTA or its tensors are HTA's), False otherwise (PEFT's own code path, unchecked here).

    ``config``: the config the caller passed instead of the folder's ``adapter_config.json``.
    Raises a ``ValueError`` that names the file and the problem.
    """
    from .config import HouseholderConfig

    config_path = os.path.join(folder, CONFIG_NAME)
    weights_path = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
    header, header_problem = _read_safetensors_header(weights_path)
    hta_tensors = bool(_hta_keys(header))
    if config is not None:
        if config.peft_type != HTA_PEFT_TYPE:
            return False
    else:
        loaded, config_problem = _read_config(config_path)
        peft_type = (loaded or {}).get("peft_type")
        if peft_type != HTA_PEFT_TYPE and not hta_tensors:
            return False  # not ours (or not decidable): PEFT's own checks and errors apply
        if config_problem:
            raise ValueError(f"Cannot load the HTA adapter in {folder}: {config_path}: {config_problem}")
        if peft_type is None:
            raise ValueError(
                f'{config_path} has no "peft_type"; the tensors in {weights_path} are HTA\'s (".hta_" keys): '
                'add "peft_type": "HTA"'
            )
        if peft_type != HTA_PEFT_TYPE:
            raise ValueError(
                f"{config_path} says peft_type {peft_type!r}, but {weights_path} holds HTA tensors "
                f"(e.g. {_hta_keys(header)[0]!r}); the config and the weights belong to different adapters "
                '(an HTA adapter has "peft_type": "HTA")'
            )
        try:
            config = HouseholderConfig.from_pretrained(folder)
        except (ValueError, TypeError) as error:
            raise ValueError(f"{config_path} holds an invalid HTA config: {error}") from error
    if header_problem == "the file is missing" and os.path.isfile(os.path.join(folder, WEIGHTS_NAME)):
        return True  # a pickled adapter_model.bin: PEFT loads it; nothing to check before
    if header_problem:
        raise ValueError(f"Cannot load the HTA adapter in {folder}: {weights_path}: {header_problem}")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(weights_path)
    except SafetensorError as error:
        raise ValueError(f"Cannot load the HTA adapter in {folder}: {weights_path} is truncated or corrupted ({error})") from error
    recorded = (header.get("__metadata__") or {}).get(DIGEST_KEY)
    if recorded is not None and tensors_digest(tensors) != recorded:
        raise ValueError(
            f"Cannot load the HTA adapter in {folder}: {weights_path} is corrupted: its tensors do not match the "
            f"{DIGEST_KEY} digest recorded when it was saved"
        )
    _check_tensor_shapes(tensors, config.lora_rank, config_path, weights_path)
    return True


# ----------------------------------------------------------------------------------------------------------------
# Undoing a failed load
# ----------------------------------------------------------------------------------------------------------------
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


def _local_folder(model_id, subfolder: Optional[str]) -> Optional[str]:
    """The local folder ``model_id`` (plus ``subfolder``) names, or None for a Hub id."""
    if not isinstance(model_id, (str, os.PathLike)):
        return None
    folder = os.path.join(model_id, subfolder) if subfolder else os.fspath(model_id)
    if not os.path.exists(folder):
        recover(folder)  # a save interrupted between the two renames of the fallback swap
    return folder if os.path.isdir(folder) else None


def _has_hta_layer(model: nn.Module) -> bool:
    from .layer import HouseholderLayer

    return any(isinstance(module, HouseholderLayer) for module in model.modules())


_ROLLED_BACK = "The model was left as it was before this call."


def _from_pretrained(original, cls, *args, **kwargs):
    bound = inspect.signature(original).bind(cls, *args, **kwargs)
    arguments = {**bound.arguments, **bound.arguments.get("kwargs", {})}
    model = arguments["model"]
    folder = _local_folder(arguments["model_id"], arguments.get("subfolder"))
    is_hta = folder is not None and check_adapter_folder(folder, arguments.get("config"))
    had_hta_layer = _has_hta_layer(model)
    snapshot = ModuleTreeSnapshot(model)
    token = _IN_FROM_PRETRAINED.set(True)
    try:
        return original(cls, *args, **kwargs)
    except BaseException as error:
        if is_hta or (not had_hta_layer and _has_hta_layer(model)):
            snapshot.restore()
            if isinstance(error, Exception):
                error.add_note(_ROLLED_BACK)
        raise
    finally:
        _IN_FROM_PRETRAINED.reset(token)


def _check_every_layer_loaded(peft_model, adapter_name: str, load_result, model_id) -> None:
    """An HTA layer the config targets but the file has no tensors for would keep its fresh initialisation (PEFT only
    warns): refuse it, since the config and the weights then belong to different adapters."""
    if getattr(peft_model.peft_config.get(adapter_name), "peft_type", None) != HTA_PEFT_TYPE:
        return
    missing = [key for key in load_result.missing_keys if ".hta_" in key]
    if missing:
        layers = sorted({key.removeprefix("base_model.model.").split(".hta_")[0] for key in missing})
        raise ValueError(
            f"The HTA adapter in {model_id} has no saved tensors for {len(layers)} layer(s) its config targets, e.g. "
            f"{layers[0]!r} (missing {missing[0]!r}): the config and the weights belong to different adapters"
        )


def _load_adapter(original, peft_model, *args, **kwargs):
    bound = inspect.signature(original).bind(peft_model, *args, **kwargs)
    arguments = {**bound.arguments, **bound.arguments.get("kwargs", {})}
    adapter_name, model_id = arguments["adapter_name"], arguments["model_id"]
    if _IN_FROM_PRETRAINED.get():  # checked before, and rolled back on failure, by our from_pretrained
        result = original(peft_model, *args, **kwargs)
        _check_every_layer_loaded(peft_model, adapter_name, result, model_id)
        return result
    folder = _local_folder(model_id, arguments.get("subfolder"))
    existing = peft_model.peft_config.get(adapter_name)
    is_hta = folder is not None and check_adapter_folder(folder, existing)
    overwritten = ()
    if existing is not None:  # PEFT loads into the existing adapter's parameters
        overwritten = tuple(p for n, p in peft_model.named_parameters() if n.endswith(f".{adapter_name}") or f".{adapter_name}." in n)
    snapshot = ModuleTreeSnapshot(peft_model, overwritten)
    try:
        result = original(peft_model, *args, **kwargs)
        _check_every_layer_loaded(peft_model, adapter_name, result, model_id)
        return result
    except BaseException as error:
        config = peft_model.peft_config.get(adapter_name)
        if is_hta or getattr(config, "peft_type", None) == HTA_PEFT_TYPE:
            snapshot.restore()
            if isinstance(error, Exception):
                error.add_note(_ROLLED_BACK)
        raise


def install_persistence_hooks() -> None:
    """Wrap ``PeftModel.save_pretrained``, ``from_pretrained`` and ``load_adapter`` (see the module docstring).
    Idempotent; other PEFT methods keep PEFT's behaviour exactly."""
    from peft import PeftModel

    if getattr(PeftModel, "_hh_peft_persistence_hooks", False):
        return
    original_save = PeftModel.save_pretrained
    original_from_pretrained = PeftModel.from_pretrained.__func__
    original_load_adapter = PeftModel.load_adapter

    save_signature = inspect.signature(original_save)

    @functools.wraps(original_save)
    def save_pretrained(self, *args, **kwargs):
        if not hta_only(self) or not save_signature.bind(self, *args, **kwargs).arguments.get("is_main_process", True):
            return original_save(self, *args, **kwargs)
        return atomic_save_pretrained(original_save, self, *args, **kwargs)

    @functools.wraps(original_from_pretrained)
    def from_pretrained(cls, *args, **kwargs):
        return _from_pretrained(original_from_pretrained, cls, *args, **kwargs)

    @functools.wraps(original_load_adapter)
    def load_adapter(self, *args, **kwargs):
        return _load_adapter(original_load_adapter, self, *args, **kwargs)

    PeftModel.save_pretrained = save_pretrained
    PeftModel.from_pretrained = classmethod(from_pretrained)
    PeftModel.load_adapter = load_adapter
    PeftModel._hh_peft_persistence_hooks = True
