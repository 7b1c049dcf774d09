"""The ext4 shrink request: what the resize service asks the initrd to do at the next boot.

It lies on the unencrypted /state, so nothing in it is trusted: ``parse_request`` checks
its form, ``validate_request`` its sizes against the real image, and the initrd measures
the file system before acting (initrd/offline_shrink.py). volume/request_file.py reads
and writes the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pystate_initrd.errors import PystateError
from pystate_initrd.formats.resize_policy import FS_BLOCK, MIB, human_size

REQUEST_VERSION = 1
REQUEST_MAX_BYTES = 4096


@dataclass(frozen=True)
class ShrinkRequest:
    """What the service asks the initrd to do: shrink image from `current` to `size` bytes.

    Written on the unencrypted /state, so the initrd trusts none of it: parse_request()
    checks its form, offline_shrink.py its sizes against the image and the file system.
    """

    luks_uuid: str
    current: int  # the image's size when the request was made; stale if it changed since
    size: int  # the image size to reach
    fs_size: int  # size - LUKS header: the inner file system's new size
    requested: int = 0  # Unix time, for people

    def to_json(self) -> dict[str, object]:
        return {
            "version": REQUEST_VERSION,
            "luks_uuid": self.luks_uuid,
            "current": self.current,
            "size": self.size,
            "fs_size": self.fs_size,
            "requested": self.requested,
        }


class RequestError(PystateError):
    """A shrink request that must not be acted on."""


_UUID_CHARS = frozenset("0123456789abcdef-")
_MAX_SIZE = 1 << 60


def parse_request(data: bytes) -> ShrinkRequest:
    """A ShrinkRequest from the file's bytes (pure); RequestError for anything odd.

    Exactly the keys to_json() writes, each of its type; integers in range and whole
    MiB / 4 KiB; a lowercase LUKS UUID. The size checks against the real image are
    validate_request()'s.
    """
    if len(data) > REQUEST_MAX_BYTES:
        raise RequestError(f"shrink request has {len(data)} bytes, over {REQUEST_MAX_BYTES}")
    try:
        obj = json.loads(data.decode("ascii"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise RequestError("shrink request is not ASCII JSON") from None
    if not isinstance(obj, dict):
        raise RequestError("shrink request is not a JSON object")
    keys = {"version", "luks_uuid", "current", "size", "fs_size", "requested"}
    if set(obj) != keys:
        raise RequestError(f"shrink request keys {sorted(obj)} are not {sorted(keys)}")
    ints = {k: obj[k] for k in keys - {"luks_uuid"}}
    for key, value in ints.items():
        if type(value) is not int or not 0 <= value < _MAX_SIZE:
            raise RequestError(f"shrink request {key} {value!r} is not a size")
    if obj["version"] != REQUEST_VERSION:
        raise RequestError(f"shrink request version {obj['version']} is not {REQUEST_VERSION}")
    uuid = obj["luks_uuid"]
    if not isinstance(uuid, str) or len(uuid) != 36 or not set(uuid) <= _UUID_CHARS:
        raise RequestError("shrink request luks_uuid is not a lowercase UUID")
    req = ShrinkRequest(uuid, obj["current"], obj["size"], obj["fs_size"], obj["requested"])
    if req.size % MIB or req.current % MIB:
        raise RequestError("shrink request sizes are not whole MiB")
    if req.fs_size % FS_BLOCK or req.fs_size <= 0:
        raise RequestError(f"shrink request fs_size {req.fs_size} is not whole 4 KiB blocks")
    if req.fs_size > req.size:
        raise RequestError("shrink request fs_size is larger than its size")
    if req.size >= req.current:
        raise RequestError(f"shrink request size {req.size} is not below {req.current}")
    return req


def validate_request(
    req: ShrinkRequest,
    *,
    luks_uuid: str,
    header: int,
    image_size: int,
    min_image_size: int,
) -> str | None:
    """Why req does not fit this image (pure); None when it may be carried out.

    The file-system bounds (used + margin, resize2fs's minimum) are checked offline by
    offline_shrink.py, where they can be measured for real.
    """
    if req.luks_uuid != luks_uuid:
        return f"it is for LUKS volume {req.luks_uuid}, not {luks_uuid}"
    if req.fs_size != req.size - header:
        return f"fs_size {req.fs_size} is not size {req.size} - header {header}"
    if req.size < min_image_size:
        return f"size {human_size(req.size)} is below the minimum {human_size(min_image_size)}"
    if req.current != image_size:
        return (
            f"it was made for a {human_size(req.current)} image, the image is now "
            f"{human_size(image_size)}: stale"
        )
    return None
