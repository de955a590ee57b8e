"""File helpers: nothing a user saved is left half-written, or written by two processes at
once."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import secrets
import socket
import time
import warnings
from pathlib import Path

__all__ = ["DirectoryInUseError", "LOCK_FILE", "atomic_save_figure", "atomic_write_bytes",
           "atomic_write_text", "hold_directory_lock", "lock_holder", "unwritable_reason"]

#: The lock file :func:`hold_directory_lock` keeps in a directory (left there when released:
#: removing a lock file races with a process about to take it).
LOCK_FILE = ".calib_jax.lock"
# flock's answers for "another open file holds it".
_HELD = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES)
# Waits (s) before each attempt to take a lock: a lock held for an instant (lock_holder's
# probe from another process) must not refuse a process that is about to train.
_LOCK_ATTEMPT_WAITS = (0.0, 0.05, 0.2, 0.5)


def atomic_write_bytes(path, data: bytes) -> None:
    """Writes ``data`` to a new file beside ``path``, flushes it to disk, then renames it over
    ``path``: a reader, or a crash, sees either the old content or all of ``data``, never a
    part. A failed write leaves ``path`` as it was and no temporary file behind. The file
    gets the permissions an ordinary ``open(path, "wb")`` would give (the umask applies)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


def atomic_write_text(path, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    if not isinstance(text, str):
        raise TypeError(f"`text` must be a str; got {type(text).__name__} (use "
                        "atomic_write_bytes for bytes).")
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_figure(fig, path, **savefig_kwargs) -> None:
    """``fig.savefig(path, **savefig_kwargs)`` written atomically (:func:`atomic_write_bytes`):
    an evaluation killed while it draws leaves the previous image whole. The format is
    ``savefig_kwargs["format"]`` or ``path``'s suffix (``.png``, ``.pdf``, ``.svg``)."""
    path = Path(path)
    image_format = savefig_kwargs.pop("format", None) or path.suffix.lstrip(".")
    if not image_format:
        raise ValueError(f"`path` {str(path)!r} has no suffix to give the image format; "
                         "name the file e.g. 'reliability.png' or pass format='png'.")
    buffer = io.BytesIO()
    fig.savefig(buffer, format=image_format, **savefig_kwargs)
    atomic_write_bytes(path, buffer.getvalue())


def unwritable_reason(directory) -> str | None:
    """Why this process could not write into ``directory`` (or, where it does not exist yet,
    create it in the nearest existing directory above it), or None when it could. For checks
    before any work, so that a long computation does not end in a ``PermissionError``."""
    directory = Path(directory)
    existing = next(p for p in (directory, *directory.absolute().parents) if p.exists())
    what = "it" if existing == directory else f"{existing}, where it would be created,"
    if not existing.is_dir():
        return f"{what} is a file, not a directory"
    if os.access(existing, os.W_OK | os.X_OK):
        return None
    return f"{what} is not writable by this process"


class DirectoryInUseError(RuntimeError):
    """Another process holds the directory's lock (:func:`hold_directory_lock`)."""


@contextlib.contextmanager
def hold_directory_lock(directory, purpose: str):
    """Holds an exclusive lock on ``directory`` for the ``with`` block, or raises
    :class:`DirectoryInUseError` naming the process that holds it (pid, host, since when, and
    its ``purpose``).

    The lock is ``flock`` on ``directory/.calib_jax.lock`` (created, with ``directory``, if
    absent), so the operating system releases it when the holder ends, however it ends (a
    SIGKILL or a crash leaves no stale lock). It is advisory: it stops only processes that
    ask for it, e.g. a training command launched twice on one work directory. Two ``with``
    blocks of one process on one directory exclude each other too. Where the file system or
    platform offers no ``flock`` (Windows, some network or FUSE file systems) the block runs
    unlocked, with a warning.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"`directory` = {directory} is a file; give a directory to "
                                 f"lock.")
    try:
        import fcntl
    except ImportError:  # Windows
        _warn_unlocked(directory, "on this platform")
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        locked = False
        for wait in _LOCK_ATTEMPT_WAITS:
            time.sleep(wait)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
                break
            except OSError as error:
                if error.errno not in _HELD:
                    _warn_unlocked(directory, f"({error.strerror})")
                    break
        else:
            raise DirectoryInUseError(
                f"{directory} is in use by another process ({_holder(descriptor)}). Wait for "
                f"it to finish, or stop it; two processes {purpose} in one directory would "
                f"write the same files at once.")
        if locked:
            holder = {"pid": os.getpid(), "host": socket.gethostname(),
                      "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "purpose": purpose}
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, json.dumps(holder).encode(), 0)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def _warn_unlocked(directory: Path, why: str) -> None:
    warnings.warn(f"cannot lock {directory} {why}: two processes using it at once would not "
                  f"be stopped.", RuntimeWarning, stacklevel=4)  # the caller of the `with`


def lock_holder(directory) -> str | None:
    """Who holds ``directory``'s lock (:func:`hold_directory_lock`), in the words of
    :class:`DirectoryInUseError` ("pid P on H, training since T"), or None when no process
    holds it. Creates nothing: a directory without a lock file is not in use."""
    try:
        import fcntl
        descriptor = os.open(Path(directory) / LOCK_FILE, os.O_RDWR)
    except (ImportError, OSError):  # no flock here, or no lock file: nobody holds it
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return None  # free (released again as the descriptor closes)
    except OSError as error:
        return _holder(descriptor) if error.errno in _HELD else None
    finally:
        os.close(descriptor)


def _holder(descriptor: int) -> str:
    """Who holds a lock, from what the holder wrote in the lock file (best effort)."""
    try:
        holder = json.loads(os.pread(descriptor, 4096, 0) or b"{}")
        return (f"pid {holder['pid']} on {holder['host']}, {holder['purpose']} since "
                f"{holder['since']}")
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not said which"
