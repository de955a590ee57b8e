"""File helpers: nothing a user saved is left half-written."""

from __future__ import annotations

import contextlib
import io
import os
import secrets
from pathlib import Path

__all__ = ["atomic_save_figure", "atomic_write_bytes", "atomic_write_text"]


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
