"""Files that are whole or absent, and one writer per folder.

* :func:`atomic_write_bytes` / :func:`atomic_write_text` / :func:`atomic_save_tensors`: write
  beside the name (``name.tmp``), flush and fsync, then :func:`os.replace` into place, so a kill
  at any moment leaves the previous file or the new one, never a torn one.
* :class:`FolderLock`: an advisory ``fcntl.flock`` on ``<folder>/.lock`` held while a process
  writes the folder. The kernel drops the lock when the holder dies (``kill -9`` included), so a
  lock of a dead process is free by construction; the file only records who holds it (PID and a
  description) for the message a second writer gets.
* :func:`describe_os_error`: an ``OSError`` reported as what it is (permission, missing, ...),
  naming the file.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "FolderLock",
    "FolderLockedError",
    "atomic_save_tensors",
    "atomic_write_bytes",
    "atomic_write_text",
    "describe_os_error",
]

LOCK_NAME = ".lock"


def _tmp_of(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path.tmp``, fsync it, rename it to ``path``."""
    path = Path(path)
    tmp = _tmp_of(path)
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """:func:`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_tensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, Any],
    metadata: Mapping[str, str] | None = None,
    tmp: str | os.PathLike[str] | None = None,
) -> None:
    """safetensors ``save_file`` to a temporary name (default ``path.tmp``), fsync, rename."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = _tmp_of(path) if tmp is None else Path(tmp)
    save_file(dict(tensors), str(tmp), metadata=dict(metadata) if metadata else None)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def describe_os_error(exc: OSError, path: str | os.PathLike[str], what: str) -> str:
    """``"<what> 'path': permission denied (...)"`` — the error as it is, naming the file."""
    reason = {
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.ENOENT: "no such file or folder",
        errno.EISDIR: "is a folder",
        errno.ENOTDIR: "a part of the path is not a folder",
        errno.EROFS: "read-only file system",
        errno.ENOSPC: "no space left on device",
    }.get(exc.errno or -1, exc.strerror or type(exc).__name__)
    return f"{what} {str(path)!r}: {reason}"


class FolderLockedError(RuntimeError):
    """Another live process holds the folder's lock (the message names its PID)."""

    def __init__(self, message: str, holder: Mapping[str, Any]) -> None:
        super().__init__(message)
        self.holder = dict(holder)


class FolderLock:
    """An exclusive advisory lock on a folder (``fcntl.flock`` on ``<folder>/.lock``).

    Use as a context manager, or :meth:`acquire` / :meth:`release`. The lock file records the
    holder (``{"pid", "what", **info}``); :meth:`holder` reads it back for messages.

    Args:
        folder: the folder (created if needed).
        what: what the holder does, for the message a second writer gets ("hpd-fast distill").
        info: more JSON-able facts about the holder (e.g. a digest of its settings).
    """

    def __init__(
        self, folder: str | os.PathLike[str], what: str, info: Mapping[str, Any] | None = None
    ) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self.info = dict(info or {})
        self._fd: int | None = None

    # The lock file is opened without truncation: the holder's record is rewritten only once
    # the lock is ours, so a refused writer never erases the holder's PID.
    def _open(self) -> int:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise type(exc)(
                exc.errno, describe_os_error(exc, self.path, "cannot create the lock file")
            ) from None

    def holder(self) -> dict[str, Any]:
        """The record of the process that holds (or last held) the lock ({} if unreadable)."""
        try:
            data = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def try_acquire(self) -> bool:
        """Take the lock if it is free; False when another process holds it."""
        if self._fd is not None:
            return True
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        record = json.dumps({"pid": os.getpid(), "what": self.what, **self.info}) + "\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)
        return True

    def acquire(self, wait: bool = False, poll: float = 0.2) -> FolderLock:
        """Take the lock; if another process holds it, wait (``wait=True``) or raise
        :class:`FolderLockedError` naming the holder's PID."""
        while not self.try_acquire():
            if not wait:
                h = self.holder()
                pid = h.get("pid", "?")
                what = h.get("what", "another process")
                raise FolderLockedError(
                    f"{str(self.folder)!r} is being written by {what} (PID {pid}); wait for it "
                    f"to finish or choose another folder (the lock file {str(self.path)!r} is "
                    "released when that process exits)",
                    h,
                )
            time.sleep(poll)
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
