"""The shrink request file, ``<state>/.pystate/shrink-request``: written atomically, read and
removed through directory fds, never through a symlink (the partition is untrusted).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path

from pystate_initrd.formats.names import META_DIR
from pystate_initrd.formats.names import SHRINK_REQUEST as REQUEST
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
    dir_fd = _meta_dir_fd(state_dir, create=True)
    assert dir_fd is not None
    tmp = f".{REQUEST}.tmp"
    data = (json.dumps(req.to_json(), sort_keys=True) + "\n").encode("ascii")
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
        os.rename(tmp, REQUEST, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return state_dir / META_DIR / REQUEST


def read_request(state_dir: Path) -> bytes | None:
    """The request file's bytes (at most REQUEST_MAX_BYTES + 1), None when there is none.

    A symlink, a directory or a device in its place is reported as RequestError: it
    is then removed like any invalid request, never followed.
    """
    dir_fd = _meta_dir_fd(state_dir, create=False)
    if dir_fd is None:
        return None
    try:
        try:
            fd = os.open(
                REQUEST,
                os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                dir_fd=dir_fd,
            )
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise RequestError(f"shrink request cannot be opened: {exc.strerror}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise RequestError("shrink request is not a regular file")
            return os.read(fd, REQUEST_MAX_BYTES + 1)
        finally:
            os.close(fd)
    finally:
        os.close(dir_fd)


def remove_request(state_dir: Path) -> bool:
    """Delete the request (whatever it is: file, symlink, directory); whether one was there."""
    dir_fd = _meta_dir_fd(state_dir, create=False)
    if dir_fd is None:
        return False
    try:
        try:
            os.unlink(REQUEST, dir_fd=dir_fd)
        except FileNotFoundError:
            return False
        except IsADirectoryError:
            import shutil

            shutil.rmtree(REQUEST, dir_fd=dir_fd)
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
