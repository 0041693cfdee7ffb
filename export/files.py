"""Writing outputs so that a failure never leaves a half-written file behind."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import tempfile
import time
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
    # the name says whose it is, so that `remove_dead_staged` leaves a live export's alone
    fd, tmp = tempfile.mkstemp(prefix=f".staged-{os.getpid()}@{_host()}-", suffix=os.path.splitext(path)[1],
                               dir=folder)
    publishable(fd)
    os.close(fd)
    try:
        yield tmp
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    os.replace(tmp, path)


_STAGED = re.compile(r"\.staged-(\d+)@([\w.]*)-")
STALE_S = 86400.0  # a staged file this old is left over, whoever staged it


def _host() -> str:
    return re.sub(r"[^\w.]", "_", socket.gethostname())


def _alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill would end the process there: no test of liveness
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def remove_dead_staged(folder: str | os.PathLike) -> list:
    """Remove what exports killed mid-way (a scheduler's SIGTERM, SIGKILL) left staged in
    `folder`, a model's worth of disk each: the `.staged-*` files whose process, named in the
    file's name, is gone from this machine, and any untouched for a day (another machine's in
    a shared folder, or older names). A live export's files stay, however long it verifies.
    -> names removed."""
    removed, now, host = [], time.time(), _host()
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            if not entry.name.startswith(".staged-") or not entry.is_file(follow_symlinks=False):
                continue
            owner = _STAGED.match(entry.name)
            gone = owner is not None and owner.group(2) == host and not _alive(int(owner.group(1)))
            if gone or now - entry.stat().st_mtime > STALE_S:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(entry.name)
    return removed
