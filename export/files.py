"""Writing outputs so that a failure never leaves a half-written file behind."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator

from .errors import ExportError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publishable(fd: int) -> None:
    """mkstemp makes 0600 files; give the result the mode a plain open() would have."""
    os.fchmod(fd, 0o666 & ~_umask())


def check_writable(path: str | os.PathLike) -> str:
    """Fail early, naming ``path``, when a file cannot be written there; return it as str.

    A real temporary file is created and removed in the target folder, since
    permission bits alone do not tell (root, read-only mounts, ACLs).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ExportError(f"output path {path!r} is a directory, not a file")
    if not os.path.isdir(folder):
        raise ExportError(f"output path {path!r} is not writable: folder {folder!r} does not exist")
    try:
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=folder)
    except OSError as err:
        raise ExportError(f"output path {path!r} is not writable: {err.strerror}") from None
    os.close(fd)
    os.unlink(probe)
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ExportError(f"output path {path!r} is not writable: the existing file is read-only")
    return path


def write_atomically(path: str | os.PathLike, data: bytes) -> None:
    """Temp file in the same folder, fsync, rename over ``path``, fsync the folder."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
    try:
        _publishable(fd)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # makes the rename itself durable
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def staged(path: str | os.PathLike) -> Iterator[str]:
    """A temporary path beside ``path`` to build into; renamed onto ``path`` only on success.

    Lets a multi-step job (export, then verify) publish its file only once
    every step has passed.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".staged-", suffix=os.path.splitext(path)[1], dir=folder)
    _publishable(fd)
    os.close(fd)
    try:
        yield tmp
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    os.replace(tmp, path)
