"""Writing outputs so that a failure never leaves a half-written file behind."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator

from rmi_triton.files import publishable

from .errors import ExportError


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


@contextlib.contextmanager
def staged(path: str | os.PathLike) -> Iterator[str]:
    """A temporary path beside ``path`` to build into; renamed onto ``path`` only on success.

    Lets a multi-step job (export, then verify) publish its file only once
    every step has passed.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".staged-", suffix=os.path.splitext(path)[1], dir=folder)
    publishable(fd)
    os.close(fd)
    try:
        yield tmp
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    os.replace(tmp, path)


# A staged model untouched this long is what an export killed outright (SIGKILL) left: a live
# one's may sit untouched as long as it verifies and compares (SIGTERM cleans up at once).
STALE_S = 86400.0
