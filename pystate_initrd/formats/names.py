"""The names pystate gives things on /state, inside encrypted.img and in device-mapper.

One place for them, so that provisioning, unlocking, resizing, the mount plan and
``pystate status`` can never disagree about what is reserved (SPEC §3).
"""

from __future__ import annotations

IMAGE = "encrypted.img"  # the LUKS2 image on /state
NEW_IMAGE = "encrypted.img.new"  # an image being provisioned; renamed to IMAGE when complete
MOUNT_DIR = "encrypted"  # /state/encrypted: where the opened image is mounted
META_DIR = ".pystate"  # metadata: on /state untrusted, inside the image trusted
RECOVERY_FILE = "recovery-key"  # in the image's META_DIR, mode 0400
SHRINK_REQUEST = "shrink-request"  # in /state's META_DIR: an ext4 shrink for the next boot
SHRINK_PROGRESS = "shrink-progress"  # in /state's META_DIR: how far the offline shrink got
SHRINK_SCRATCH = "shrink-scratch.img"  # in /state's META_DIR: the encrypted undo area
SHRINK_UNDO = "shrink.e2undo"  # resize2fs's undo file (e2undo), inside the undo area's fs
RESET_MARKER = "factory-reset"  # in /state's META_DIR: a factory reset under way
LOST_FOUND = "lost+found"

DM_NAME = "pystate-encrypted"  # the dm-crypt mapping of the opened image
DM_PATH = f"/dev/mapper/{DM_NAME}"
SCRATCH_DM_NAME = "pystate-shrink-undo"  # plain dm-crypt over SHRINK_SCRATCH, during a shrink

# Never an entry (SPEC §3), besides every name starting with ".".
RESERVED_PLAIN = frozenset({IMAGE, MOUNT_DIR, NEW_IMAGE, LOST_FOUND})
RESERVED_ENCRYPTED = frozenset({META_DIR, LOST_FOUND})
