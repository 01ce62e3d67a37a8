"""Replace a folder in one step: write the new folder beside it, flush it to disk, swap the two paths.

Nothing here knows about adapters; HTA's ``save_pretrained`` (`hh_peft.peft_patches`) and the recipes' checkpoint
writer (``recipes/common/training.py``) both use it.

:func:`write_folder_atomically` is the whole protocol:

1. ``write(new)`` fills a hidden sibling ``.<name><tag>tmp-<pid>-<random>`` of the target;
2. files already in the target that ``write`` did not produce (a user's file, another adapter's sub-folder) are
   hard-linked into the new folder (a copy where the file system has no hard links), so the result is what writing
   in place would have left;
3. every new file, then every folder, is ``fsync``-ed (a rename is only as durable as the data it names);
4. the new folder takes the target's place in one step: ``renameat2(RENAME_EXCHANGE)`` on Linux swaps the two paths
   atomically, so a reader at any moment opens the old folder or the new one. Where the file system cannot
   exchange, the old folder is renamed aside (``.<name><tag>old-<pid>-<random>``) and the new one renamed in; a
   process killed between the two renames leaves no folder for an instant, and :func:`recover` (run by the next
   save or load) puts the old one back. A target that is a mount point cannot be renamed: its files are replaced
   one by one, each atomically, with a warning;
5. the old folder is removed.

A failure before step 4 (a full disk, an exception in ``write``, a kill) leaves the target as it was, and the
temporary folder is removed (by this call, or by the next one for a killed process). SIGINT, SIGTERM and SIGHUP that
arrive meanwhile are held until the swap has finished (:func:`signals_deferred`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import re
import secrets
import shutil
import signal
import sys
import threading
import warnings
from typing import Callable, Iterable, Optional


def fsync_path(path: str) -> None:
    """``fsync`` one file or folder (a no-op for a folder on Windows, whose renames NTFS journals)."""
    if os.name == "nt" and os.path.isdir(path):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str, files: bool = True) -> None:
    """``fsync`` every folder under ``root`` (and every file, if ``files``), deepest first, ``root`` last."""
    for folder, _, names in os.walk(root, topdown=False):
        if files:
            for name in names:
                path = os.path.join(folder, name)
                if not os.path.islink(path):
                    fsync_path(path)
        fsync_path(folder)


def link_missing(old: str, new: str) -> None:
    """Give ``new`` every entry of ``old`` it lacks (recursively): files as hard links (a copy where the file system
    has none), symbolic links as links. What ``new`` already holds wins."""
    for entry in os.scandir(old):
        target = os.path.join(new, entry.name)
        if entry.is_dir(follow_symlinks=False):
            if not os.path.lexists(target):
                os.mkdir(target)
                shutil.copymode(entry.path, target)
            if os.path.isdir(target) and not os.path.islink(target):
                link_missing(entry.path, target)
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


def sibling(target: str, tag: str) -> str:
    """A fresh hidden path next to ``target``: ``.<name><tag><pid>-<8 hex digits>``."""
    parent, name = os.path.split(target)
    return os.path.join(parent, f".{name}{tag}{os.getpid()}-{secrets.token_hex(4)}")


def swap_into_place(new: str, target: str, aside_tag: str) -> Optional[str]:
    """Make the complete folder ``new`` appear at ``target`` in one step (step 4 of the module docstring); return
    the path that now holds the old folder (for the caller to remove), if any. On an exception ``target`` is as it
    was."""
    if not os.path.lexists(target):
        os.rename(new, target)
        return None
    if exchange_paths(new, target):
        return new  # ``new`` now names the old folder
    old = sibling(target, aside_tag)
    os.rename(target, old)  # (callers hold signals: a Ctrl-C never lands between the two renames)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    return old


def remove_tree(path: str) -> None:
    """``shutil.rmtree``, finished even when a signal interrupts it."""
    try:
        shutil.rmtree(path)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise


DEFERRED_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextlib.contextmanager
def signals_deferred():
    """Hold SIGINT, SIGTERM and SIGHUP for the duration: each one that arrives is recorded, and on exit the previous
    handlers are put back and the signals raised again, in order of arrival (so Ctrl-C becomes ``KeyboardInterrupt``
    there, and SIGTERM with the default handler still ends the process).

    Python-level handlers, not a thread signal mask: Python runs signal handlers in the main thread whichever OS
    thread the kernel picks, and a ``KeyboardInterrupt`` raised inside a save could otherwise be turned into a
    ``ValueError`` by safetensors' Rust code or be swallowed by a ``__del__`` ("Exception ignored"). Outside the main
    thread (where handlers cannot be changed) and for a signal whose handler was not set from Python, nothing is
    held."""
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


class FolderTags:
    """The names of the hidden siblings of one kind of folder: ``.<name><prefix>tmp-<pid>-<hex>`` while being
    written, ``.<name><prefix>old-<pid>-<hex>`` while set aside by the two-rename swap."""

    def __init__(self, prefix: str) -> None:
        self.tmp = f"{prefix}tmp-"
        self.old = f"{prefix}old-"
        self._prefix = prefix

    def stale_siblings(self, target: str) -> tuple[list[str], list[str]]:
        """(temporary folders, set-aside old folders) left next to ``target`` by processes no longer running."""
        parent, name = os.path.split(target)
        pattern = re.compile(re.escape(f".{name}{self._prefix}") + r"(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]+$")
        tmp, old = [], []
        try:
            entries = os.listdir(parent or ".")
        except (FileNotFoundError, NotADirectoryError):
            return tmp, old
        for entry in entries:
            match = pattern.match(entry)
            path = os.path.join(parent, entry)
            if match and path not in _WRITING and not _pid_alive(int(match["pid"])):
                (tmp if match["kind"] == "tmp" else old).append(path)
        return tmp, old


# Temporary folders this process is writing now (another thread may write next to the same folder).
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


def recover(target: str, tags: FolderTags) -> None:
    """Repair what an interrupted write left next to ``target``: if ``target`` is missing (a kill between the two
    renames of the fallback swap) its set-aside old folder is renamed back; stale temporary folders are removed."""
    target = os.path.realpath(target)
    tmp, old = tags.stale_siblings(target)
    if old and not os.path.lexists(target):
        newest = max(old, key=os.path.getmtime)
        os.rename(newest, target)
        old.remove(newest)
    for path in tmp + old:
        shutil.rmtree(path, ignore_errors=True)


def _replace_file_by_file(new: str, target: str, last: Iterable[str]) -> None:
    """A mount point cannot be renamed: move each file of ``new`` over its namesake in ``target`` (each file is
    replaced atomically, the folder as a whole is not); the files named in ``last`` go last."""
    warnings.warn(
        f"{target} is a mount point, so the folder cannot be replaced in one step: its files are replaced one by one "
        "(each atomically). Save into a folder inside the mount for an atomic save."
    )
    last = set(last)
    for folder, _, names in os.walk(new):
        destination = os.path.join(target, os.path.relpath(folder, new))
        os.makedirs(destination, exist_ok=True)
        for name in sorted(names, key=lambda n: n in last):
            os.replace(os.path.join(folder, name), os.path.join(destination, name))
        fsync_path(destination)


def write_folder_atomically(
    target: str,
    write: Callable[[str], None],
    tags: FolderTags,
    *,
    carry_over: Iterable[str] = (),
    keep_other_files: bool = True,
    write_last: Iterable[str] = (),
) -> None:
    """Run ``write(new)`` on an empty hidden sibling of ``target``, then put the result in ``target``'s place
    (module docstring). ``carry_over``: files of the old folder copied into the new one before ``write`` runs (a
    card that ``write`` updates rather than replaces); ``keep_other_files``: link the old folder's other entries in
    (step 2); ``write_last``: on a mount point, the files replaced last (a config that says the rest is complete).
    A symbolic link ``target`` is followed: the folder it points to is replaced."""
    with signals_deferred():
        _write_folder_atomically(target, write, tags, carry_over, keep_other_files, write_last)


def _write_folder_atomically(target, write, tags, carry_over, keep_other_files, write_last) -> None:
    target = os.path.realpath(target)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    recover(target, tags)
    try:
        cwd = os.getcwd()
    except FileNotFoundError:
        cwd = None
    mount_point = os.path.ismount(target)
    new = sibling(target, tags.tmp)
    os.mkdir(new)
    _WRITING.add(new)
    leftover = None
    try:
        if os.path.isdir(target):
            shutil.copymode(target, new)
            for name in carry_over:
                if os.path.isfile(os.path.join(target, name)):
                    shutil.copy2(os.path.join(target, name), os.path.join(new, name))
        write(new)
        fsync_tree(new, files=True)
        if keep_other_files and os.path.isdir(target) and not mount_point:
            link_missing(target, new)
            fsync_tree(new, files=False)
        if not mount_point:
            leftover = swap_into_place(new, target, tags.old)
    except BaseException as error:
        shutil.rmtree(new, ignore_errors=True)
        _WRITING.discard(new)
        if isinstance(error, Exception):
            error.add_note(f"Writing {target} failed; the folder was left as it was.")
        raise
    try:
        if mount_point:
            _replace_file_by_file(new, target, write_last)
            leftover = new
        fsync_path(parent)
        if leftover is not None:
            remove_tree(leftover)
    finally:
        _WRITING.discard(new)
    if cwd is not None and (cwd == target or cwd.startswith(target + os.sep)):
        os.chdir(cwd)  # the process was inside the replaced folder: follow the path to the new one
