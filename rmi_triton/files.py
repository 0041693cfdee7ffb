"""Files that are either fully written or not there: one place for the atomic write."""

from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
import time
from typing import BinaryIO, Iterator


def publishable(fd: int) -> None:
    """mkstemp makes 0600 files; give the result the mode a plain open() would have."""
    mask = os.umask(0)
    os.umask(mask)
    os.fchmod(fd, 0o666 & ~mask)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Yield a binary file that becomes `path` only when the block succeeds.

    A temporary file in the same folder is written, flushed and fsynced, then
    renamed over `path`, and the folder is fsynced so the rename is durable. A
    crash, a kill or an exception at any moment leaves the previous file (or none)
    in place; an exception also removes the temporary, which a killed process
    leaves behind as a `.tmp-*` file beside `path`.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
    try:
        publishable(fd)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_leftovers(folder: str | os.PathLike, suffixes=(".pt", ".jsonl", ".json"), age_s: float = 600.0,
                     prefix: str = ".tmp-") -> list:
    """Remove the temporaries an `atomic_writer` killed mid-write left in `folder` (a
    checkpoint's worth of disk each): `prefix`* files with one of `suffixes` untouched for
    `age_s` seconds (an `atomic_writer` at work writes its file to the end without pausing;
    the exporter's staged files, `prefix=".staged-"`, wait longer). -> names removed."""
    removed, now = [], time.time()
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            if entry.name.startswith(prefix) and entry.name.endswith(tuple(suffixes)) \
                    and entry.is_file(follow_symlinks=False) and now - entry.stat().st_mtime > age_s:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(entry.name)
    return removed


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file (links and relative spellings too); a path that does
    not exist yet is compared by its resolved name."""
    a, b = os.fspath(a), os.fspath(b)
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def folder_problem(path: str | os.PathLike, files=()) -> str | None:
    """Why `path` cannot be (made into) a folder that this process writes `files` into, or None.

    Asked before a run starts, so that a mistaken output path is refused at once and not
    after the training (the checks read the file system only: nothing is made). The first
    folder that exists on the way up must be a writable folder; a name of `files` taken by a
    folder inside `path` is refused too (a checkpoint could never be written there)."""
    path = os.fspath(path)
    if not path.strip():
        return "is empty"
    if os.path.exists(path) and not os.path.isdir(path):
        return "is a file, not a folder"
    taken = [name for name in files if os.path.isdir(os.path.join(path, name))]
    if taken:
        return f"holds a folder named {taken[0]}, where the run writes that file"
    there = os.path.abspath(path)
    while not os.path.exists(there):
        there = os.path.dirname(there)
    if not os.path.isdir(there):
        return f"cannot be made: {there} is a file, not a folder"
    if not os.access(there, os.W_OK | os.X_OK):
        return "is not writable" if there == os.path.abspath(path) else f"cannot be made: {there} is not writable"
    return None


def write_atomically(path: str | os.PathLike, data: bytes) -> None:
    with atomic_writer(path) as f:
        f.write(data)


def load_refusal(err: BaseException) -> str:
    """Why ``torch.load(..., weights_only=True)`` refused or failed, in one line, without
    PyTorch's advice to load the file again with ``weights_only=False`` or to allowlist what
    it names (either would run whatever the file holds: never the advice for a refused file)."""
    text = str(err)
    named = re.search(r"GLOBAL ([\w.]+)", text)
    if named:
        return f"it names {named.group(1)}, which is not a tensor or a plain container"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    kept = " ".join(line for line in lines if not any(word in line for word in _ADVICE))
    if not kept:
        return f"{type(err).__name__} (the file ends early or is empty)"
    if " " not in kept:  # a bare key or number (a KeyError's) says nothing alone
        return f"not an intact file of torch.save ({type(err).__name__}: {kept})"
    return kept


_ADVICE = ("weights_only", "Weights only", "trust", "allowlist", "safe_globals")


def json_safe(obj):
    """obj with its non-finite floats as None (JSON has no NaN or Infinity: strict readers and jq
    refuse a bare NaN) and anything else JSON cannot hold as its str."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)
