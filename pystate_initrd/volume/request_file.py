"""The shrink request file, ``<state>/.pystate/shrink-request``, and the offline shrink's
progress file, ``shrink-progress`` beside it: written atomically, read and removed through
directory fds, never through a symlink (the partition is untrusted).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path

from pystate_initrd.formats.names import META_DIR
from pystate_initrd.formats.names import SHRINK_PROGRESS as PROGRESS
from pystate_initrd.formats.names import SHRINK_REQUEST as REQUEST
from pystate_initrd.formats.shrink_progress import (
    PROGRESS_MAX_BYTES,
    Progress,
    parse_progress,
)
from pystate_initrd.formats.shrink_request import (
    REQUEST_MAX_BYTES,
    RequestError,
    ShrinkRequest,
    parse_request,
)
from pystate_initrd.system import beneath
from pystate_initrd.volume.resize import ResizeError


def _meta_dir_fd(state_dir: Path, create: bool) -> int | None:
    """An fd of <state>/.pystate, never through a symlink (the partition is untrusted)."""
    try:
        return beneath.open_subdir(state_dir, META_DIR, create=create)
    except OSError as exc:
        raise ResizeError(
            f"{state_dir / META_DIR} is not a directory ({exc.strerror}); refusing it"
        ) from None


def write_request(state_dir: Path, req: ShrinkRequest) -> Path:
    """Write the request atomically: temp file, fsync, rename, fsync the directory."""
    return _write_atomic(state_dir, REQUEST, req.to_json())


def write_progress(state_dir: Path, progress: Progress) -> Path:
    """Record how far the offline shrink got (initrd/offline_shrink.py), atomically."""
    return _write_atomic(state_dir, PROGRESS, progress.to_json())


def _write_atomic(state_dir: Path, name: str, obj: dict[str, object]) -> Path:
    dir_fd = _meta_dir_fd(state_dir, create=True)
    assert dir_fd is not None
    tmp = f".{name}.tmp"
    data = (json.dumps(obj, sort_keys=True) + "\n").encode("ascii")
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
        fd = os.open(
            tmp,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=dir_fd,
        )
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return state_dir / META_DIR / name


def read_request(state_dir: Path) -> bytes | None:
    """The request file's bytes (at most REQUEST_MAX_BYTES + 1), None when there is none.

    A symlink, a directory or a device in its place is reported as RequestError: it
    is then removed like any invalid request, never followed.
    """
    return _read_small(state_dir, REQUEST, "shrink request", REQUEST_MAX_BYTES)


def read_progress(state_dir: Path) -> Progress | str | None:
    """The offline shrink's progress, the reason it is invalid (a str), or None."""
    try:
        data = _read_small(state_dir, PROGRESS, "shrink progress", PROGRESS_MAX_BYTES)
        return None if data is None else parse_progress(data)
    except RequestError as exc:
        return str(exc)


def _read_small(state_dir: Path, name: str, what: str, limit: int) -> bytes | None:
    dir_fd = _meta_dir_fd(state_dir, create=False)
    if dir_fd is None:
        return None
    try:
        try:
            fd = os.open(
                name,
                os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                dir_fd=dir_fd,
            )
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise RequestError(f"{what} cannot be opened: {exc.strerror}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise RequestError(f"{what} is not a regular file")
            return os.read(fd, limit + 1)
        finally:
            os.close(fd)
    finally:
        os.close(dir_fd)


def remove_request(state_dir: Path) -> bool:
    """Delete the request (whatever it is: file, symlink, directory); whether one was there."""
    return _remove(state_dir, REQUEST)


def remove_progress(state_dir: Path) -> bool:
    return _remove(state_dir, PROGRESS)


def _remove(state_dir: Path, name: str) -> bool:
    dir_fd = _meta_dir_fd(state_dir, create=False)
    if dir_fd is None:
        return False
    try:
        try:
            os.unlink(name, dir_fd=dir_fd)
        except FileNotFoundError:
            return False
        except IsADirectoryError:
            import shutil

            shutil.rmtree(name, dir_fd=dir_fd)
        os.fsync(dir_fd)
        return True
    finally:
        os.close(dir_fd)


def pending_request(state_dir: Path) -> ShrinkRequest | str | None:
    """The pending request, the reason it is invalid (a str), or None (for status)."""
    try:
        data = read_request(state_dir)
        return None if data is None else parse_request(data)
    except (RequestError, ResizeError) as exc:
        return str(exc)
