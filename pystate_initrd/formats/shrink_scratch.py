"""The encrypted undo area of the offline ext4 shrink: its key, size and commands (pure).

resize2fs's undo file holds the plaintext old contents of every block it overwrites, and it
must survive a power cut, so it cannot live in memory and must not lie in the clear on /state.
It lives in a small ext4 inside a plain dm-crypt mapping over a sparse file on /state
(``.pystate/shrink-scratch.img``; volume/scratch.py does the I/O). The mapping's key is not
stored anywhere: it is derived from the image's LUKS volume key and a random nonce that the
(plaintext) progress file keeps:

    key = HMAC-SHA512(volume_key, b"pystate shrink undo" + nonce)     # 64 bytes: aes-xts 512

So only a boot that unlocked the image can read or write the area; someone who can write /state
can neither read the old blocks nor forge an undo record (anything they write decrypts to
noise, which e2undo's checksums refuse). A fresh nonce per shrink gives a fresh key, so an area
copied from an earlier shrink does not open under a later one's key either.

The HMAC is written out (RFC 2104) instead of ``hmac.new`` so that the padded keys are
bytearrays wiped here; the one ``bytes`` digest the hash object returns is beyond reach.
"""

from __future__ import annotations

import hashlib

CONTEXT = b"pystate shrink undo"
NONCE_BYTES = 32
KEY_BYTES = 64  # aes-xts-plain64 with a 512-bit key: two AES-256 keys
_BLOCK = 128  # SHA-512's block size
MIB = 1 << 20
# The area's own ext4: 4 MiB journal (the minimum), group descriptors and bitmaps; the rest
# is the undo file. undo_io adds one 16-byte key per extent in 4 KiB key blocks, a header
# block and the saved superblock: under 1 % on top of the data it saves.
OVERHEAD = 32 * MIB


def derive_key(volume_key: bytes | bytearray, nonce: bytes) -> bytearray:
    """HMAC-SHA512(volume_key, CONTEXT + nonce), in a bytearray the caller wipes."""
    if not 16 <= len(volume_key) <= _BLOCK:
        raise ValueError(f"a volume key of {len(volume_key)} bytes")
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"a nonce of {len(nonce)} bytes, not {NONCE_BYTES}")
    pad = bytearray(_BLOCK)
    try:
        pad[: len(volume_key)] = volume_key
        for i in range(_BLOCK):
            pad[i] ^= 0x36
        inner = hashlib.sha512(pad)
        inner.update(CONTEXT + nonce)
        for i in range(_BLOCK):
            pad[i] ^= 0x36 ^ 0x5C
        outer = hashlib.sha512(pad)
        outer.update(inner.digest())
        return bytearray(outer.digest())
    finally:
        pad[:] = bytes(_BLOCK)


def undo_bound(used: int, fs_now: int, fs_new: int) -> int:
    """The most undo data a shrink from fs_now to fs_new bytes can write (pure).

    resize2fs saves each block once, before its first overwrite. It overwrites the free
    blocks that the data it moves out of the tail goes to (at most the tail's used blocks:
    min(used, fs_now - fs_new)), and metadata in the part it keeps: inode tables where moved
    inodes land (at most 1/64 of the fs: 256-byte inodes, one per 16 KiB), directories,
    bitmaps and group descriptors (a few blocks per 128 MiB group).
    """
    moved = min(used, max(fs_now - fs_new, 0))
    return moved + fs_new // 64 + 4 * MIB


def scratch_size(used: int, fs_now: int, fs_new: int) -> int:
    """The sparse file's length (whole MiB): room for the worst case plus the area's ext4."""
    size = undo_bound(used, fs_now, fs_new) + OVERHEAD
    return -(-size // MIB) * MIB


def open_argv(loop: str, name: str) -> list[str]:
    """cryptsetup's plain mode with the key on stdin as raw bytes. ``--hash plain`` is needed:
    cryptsetup 2.6 reads ``--key-file=-`` like a passphrase and hashes it with the default
    plain hash otherwise (found by the QEMU test: the table's key was not the one given).
    volume/scratch.py reads the table back and compares the key, so a cryptsetup that
    changed this would be caught, not silently keyed differently at the next boot."""
    return [
        "cryptsetup", "open", "--type", "plain", "--cipher", "aes-xts-plain64",
        "--key-size", str(KEY_BYTES * 8), "--hash", "plain", "--key-file=-",
        "--keyfile-size", str(KEY_BYTES), loop, name,
    ]  # fmt: skip


def mkfs_argv(device: str) -> list[str]:
    """A small ext4 for one file: few inodes, the smallest journal, nothing zeroed or
    discarded (the file stays sparse: only what is written takes space on /state)."""
    return [
        "mkfs.ext4", "-q", "-F", "-b", "4096", "-m", "0", "-N", "16", "-J", "size=4",
        "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard", "-L", "pystate-undo",
        device,
    ]  # fmt: skip
