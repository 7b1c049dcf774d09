"""How far the offline ext4 shrink got, and what a boot does about it (pure).

The initrd writes ``<state>/.pystate/shrink-progress`` before it makes the encrypted undo
area (``scratch``, with the nonce its key is derived from: formats/shrink_scratch.py), before
resize2fs starts (``resize2fs``) and when it has finished (``resized``)
(initrd/offline_shrink.py). A boot that finds them learns which step a crash cut off and acts on it
before the inner file system is checked or mounted: ``decide()`` is that table, one row per
(progress, undo file) pair, and docs/resize.md shows it.

The file lies on the unencrypted /state, so it is not trusted either: ``parse_progress``
checks its form, and an undo file is applied only when the area opens with the key derived
from the nonce (only this image's volume key gives it), its own saved superblock names the
file system that the progress file names and that is on the device now, and e2undo's own
checks pass (formats/e2undo.py). The worst a forged progress file can do is have a valid
undo file applied (which undoes a half-done resize2fs: what it is for), give up a shrink, or
stop the boot (a cut-off resize2fs whose undo area cannot be used: below).
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass

from pystate_initrd.formats.shrink_request import RequestError

PROGRESS_VERSION = 2  # 2: the nonce and the scratch step (the undo area is encrypted)
PROGRESS_MAX_BYTES = 4096
MAX_ATTEMPTS = 2  # a shrink cut off this many times is given up (never a crash loop)


class Step(enum.StrEnum):
    SCRATCH = "scratch"  # the undo area is being made; resize2fs has not started
    RESIZE2FS = "resize2fs"  # resize2fs may have written (the undo file holds the old blocks)
    RESIZED = "resized"  # resize2fs finished: the file system has its new, smaller size
    GIVEN_UP = "given-up"  # cut off MAX_ATTEMPTS times: no shrink of this image size again


@dataclass(frozen=True)
class Progress:
    luks_uuid: str  # the image's ("" without LUKS: the host tests)
    fs_uuid: str  # the inner ext4's, as the undo file's saved superblock must name it
    current: int  # the image's size when the shrink started (the request's "current")
    size: int  # the image size being reached
    step: Step
    attempt: int  # 1 for the first try of this request
    nonce: str  # hex; the undo area's key is derived from it and the volume key

    def to_json(self) -> dict[str, object]:
        return {
            "version": PROGRESS_VERSION,
            "luks_uuid": self.luks_uuid,
            "fs_uuid": self.fs_uuid,
            "current": self.current,
            "size": self.size,
            "step": str(self.step),
            "attempt": self.attempt,
            "nonce": self.nonce,
        }


_KEYS = frozenset(
    {"version", "luks_uuid", "fs_uuid", "current", "size", "step", "attempt", "nonce"}
)
NONCE_HEX = 64  # formats/shrink_scratch.NONCE_BYTES as hex
_HEX = frozenset("0123456789abcdef")
_UUID_CHARS = frozenset("0123456789abcdef-")


def parse_progress(data: bytes) -> Progress:
    """A Progress from the file's bytes; RequestError for anything else."""
    if len(data) > PROGRESS_MAX_BYTES:
        raise RequestError(f"shrink progress has {len(data)} bytes, over {PROGRESS_MAX_BYTES}")
    try:
        obj = json.loads(data.decode("ascii"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise RequestError("shrink progress is not ASCII JSON") from None
    if not isinstance(obj, dict) or set(obj) != _KEYS:
        raise RequestError(f"shrink progress is not an object with the keys {sorted(_KEYS)}")
    for key in ("version", "current", "size", "attempt"):
        if type(obj[key]) is not int or not 0 <= obj[key] < 1 << 60:
            raise RequestError(f"shrink progress {key} {obj[key]!r} is not a count")
    if obj["version"] != PROGRESS_VERSION:
        raise RequestError(f"shrink progress version {obj['version']} is not {PROGRESS_VERSION}")
    for key in ("luks_uuid", "fs_uuid"):
        value = obj[key]
        if not isinstance(value, str) or len(value) not in (0, 36) or not set(value) <= _UUID_CHARS:
            raise RequestError(f"shrink progress {key} is not a lowercase UUID")
    if not obj["fs_uuid"]:
        raise RequestError("shrink progress names no file system")
    if obj["step"] not in {str(s) for s in Step}:
        raise RequestError(f"shrink progress step {obj['step']!r} is unknown")
    nonce = obj["nonce"]
    if not isinstance(nonce, str) or len(nonce) != NONCE_HEX or not set(nonce) <= _HEX:
        raise RequestError(f"shrink progress nonce is not {NONCE_HEX} lowercase hex digits")
    if not 1 <= obj["attempt"] <= MAX_ATTEMPTS:
        raise RequestError(f"shrink progress attempt {obj['attempt']} is not 1-{MAX_ATTEMPTS}")
    return Progress(
        obj["luks_uuid"], obj["fs_uuid"], obj["current"], obj["size"], Step(obj["step"]),
        obj["attempt"], nonce,
    )  # fmt: skip


class Undo(enum.StrEnum):
    """What the boot found in the undo area (only opened for a cut-off resize2fs)."""

    ABSENT = "absent"
    EMPTY = "empty"  # no header yet: resize2fs never wrote to the file system
    VALID = "valid"  # a header pystate accepts, for the file system on the device
    DAMAGED = "damaged"  # the area does not open or mount; not an undo file, a bad checksum
    FOREIGN = "foreign"  # a good undo file for another file system


class Action(enum.StrEnum):
    NOTHING = "nothing"
    CLEAN_UP = "clean-up"  # remove the leftovers (undo file, progress); apply nothing
    ROLL_BACK = "roll-back"  # e2undo, then the boot's e2fsck; the request is tried again
    CONTINUE = "continue"  # resize2fs had finished: the request goes on from there
    FSCK_ONLY = "fsck-only"  # no valid progress file: the area is removed, e2fsck decides
    STOP = "stop"  # resize2fs was cut off and its undo file cannot be used: a person decides
    GIVE_UP = "give-up"  # (after a roll-back, if any) drop the request for good


@dataclass(frozen=True)
class Decision:
    action: Action
    roll_back: bool  # run e2undo first (ROLL_BACK, and GIVE_UP after a cut-off resize2fs)
    why: str


def decide(progress: Progress | str | None, undo: Undo) -> Decision:
    """What a boot does about an unfinished offline shrink (pure; docs/resize.md's table).

    progress: the parsed file, the reason it did not parse (a str), or None when absent.
    """
    if progress is None:
        if undo is Undo.ABSENT:
            return Decision(Action.NOTHING, False, "no shrink under way")
        return Decision(
            Action.CLEAN_UP, False, "an undo file without a shrink under way: removed, not applied"
        )
    if isinstance(progress, str):
        if undo in (Undo.ABSENT, Undo.EMPTY):
            return Decision(Action.CLEAN_UP, False, f"{progress}: removed (no undo data)")
        return Decision(
            Action.FSCK_ONLY,
            False,
            f"{progress}: the undo area is not opened without it (removed); e2fsck checks the "
            "file system",
        )
    if progress.step is Step.GIVEN_UP:
        return Decision(Action.GIVE_UP, False, "this shrink was given up before")
    last = progress.attempt >= MAX_ATTEMPTS
    if progress.step is Step.RESIZED:
        # The file system is complete at its new size; what is left (mapping, truncate) is
        # repeated from the request. The old blocks are not needed any more.
        if last:
            return Decision(
                Action.GIVE_UP, False, f"cut off after resize2fs {progress.attempt} times"
            )
        return Decision(Action.CONTINUE, False, "resize2fs had finished; the shrink goes on")
    # Step.SCRATCH: cut off while the undo area was made, before resize2fs started;
    # Step.RESIZE2FS: cut off before, during, or right after resize2fs.
    if progress.step is Step.SCRATCH or undo in (Undo.ABSENT, Undo.EMPTY):
        why = f"cut off before resize2fs wrote anything (attempt {progress.attempt})"
        return Decision(Action.GIVE_UP if last else Action.CLEAN_UP, False, why)
    if undo is Undo.VALID:
        why = f"resize2fs was cut off (attempt {progress.attempt}): rolled back with e2undo"
        return Decision(Action.GIVE_UP if last else Action.ROLL_BACK, True, why)
    # The file system may be half-shrunk, and the one record that puts it back cannot be
    # used: an e2fsck would "repair" it for good (dropping what it cannot place). Stop and
    # keep everything, so that nothing is lost before a person has looked.
    return Decision(
        Action.STOP,
        False,
        f"resize2fs was cut off, and the undo area is {undo}: not applied, nothing changed",
    )
