"""Atomic file writes: nothing a reader can see is ever half written.

The bytes go to a hidden temp file in the destination's folder, which is flushed,
fsynced and renamed over the destination (atomic on POSIX), then the folder is
fsynced so the rename itself survives a crash. A failure or a kill part-way leaves
the previous file untouched; the temp file is removed on failure (a SIGKILL can
leave it behind, under a name no reader matches).
"""
from __future__ import annotations

import os
import pathlib
import tempfile
from typing import BinaryIO, Callable


def fsync_dir(path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # some platforms (Windows) cannot open folders
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(dest, write: Callable[[BinaryIO], None], tmp_prefix: str | None = None,
                 tmp_suffix: str = ".tmp") -> pathlib.Path:
    """Call `write(f)` on a binary file that becomes `dest` only once complete."""
    dest = pathlib.Path(dest)
    prefix = tmp_prefix if tmp_prefix is not None else f".{dest.name}."
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=prefix, suffix=tmp_suffix)
    try:
        # mkstemp creates the file 0600; the result gets the usual umask-based mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(dest.parent)
    return dest


def os_reason(e: BaseException) -> str:
    """A short reason for a failed file operation: the OSError's strerror where there
    is one (also behind a RuntimeError that wraps it), else the first line."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
