"""LUKS2 on encrypted.img: cryptsetup 2.6 for every change, a header reader for lookups.

The unlock path (open, check_key, volume_key) calls libcryptsetup.so.12 in process
(system/libcryptsetup.py: no process, SPEC §10) when it loads, else the cryptsetup
binary with the same options; ``libcryptsetup.available()`` decides, and
``PYSTATE_CRYPTSETUP=cli`` forces the binary. Both give the same errors.

The other commands (format, add/kill keyslot, erase, tokens, close) run
cryptsetup with argument lists. Keys never appear in argv or on disk: the first
key goes on stdin (``--key-file=-``), a second one through a pipe named as
``/dev/fd/N``. Both pipes are filled before cryptsetup starts (a key is at most
4 KiB, which an empty pipe always takes), so nothing waits on anything.

Lookups (keyslots, tokens, UUID) read the LUKS2 header straight from the file
with ``parse_luks2_header``, checksums included: no process, which counts on
the unlock path (SPEC §10). docs/luks.md explains every parameter chosen here.
"""

from __future__ import annotations

import builtins
import errno
import os
from collections.abc import Callable, Sequence
from typing import Any

from pystate_initrd.formats.luks2 import (
    BINARY_SIZE,
    HEADER_SIZES,
    MAX_KEYSLOTS,
    KeyslotInfo,
    Luks2Header,
    keyslot_infos,
    parse_luks2_header,
    token_dicts,
)
from pystate_initrd.formats.luks2 import LuksError as LuksError  # noqa: PLC0414 (re-exported)
from pystate_initrd.formats.luks2 import NotLuks as NotLuks  # noqa: PLC0414
from pystate_initrd.formats.names import DM_NAME
from pystate_initrd.secret import wipe as _wipe
from pystate_initrd.system import libcryptsetup
from pystate_initrd.system.run import CommandError, run

CRYPTSETUP = "cryptsetup"
LABEL = "pystate"
CIPHER = "aes-xts-plain64"
KEY_BITS = 512
SECTOR_SIZE = 4096
HASH = "sha256"
PBKDF2_MIN_ITERATIONS = 1000  # cryptsetup 2.6 refuses fewer ("minimum is 1000")
TPM2_KEYSLOT = 0
RECOVERY_KEYSLOT = 1
MAX_KEY_BYTES = 4096  # a key fits an empty pipe, so writing it never blocks

Key = bytes | bytearray | memoryview


class BadKey(LuksError):
    """The key does not open the keyslot."""


class NoKeyslot(LuksError):
    """The keyslot asked for is empty (killed, erased, never enrolled)."""


# --- the header, read without cryptsetup ------------------------------------------------------


def read_header(image: str | os.PathLike[str]) -> Luks2Header:
    """The LUKS2 header of image (a file or block device), read directly: no process."""
    name = os.fspath(image)
    try:
        with builtins.open(name, "rb", buffering=0) as f:  # this module has its own open()
            data = f.read(2 * HEADER_SIZES[0])
            try:
                header = parse_luks2_header(data, name)
                if header.primary_ok and header.secondary_ok:
                    return header
            except NotLuks:
                pass
            # A larger header or a damaged copy: read enough for any layout.
            f.seek(0)
            data = f.read(2 * HEADER_SIZES[-1] + BINARY_SIZE)
    except OSError as e:
        raise LuksError(f"cannot read the LUKS2 header of {name}: {e.strerror}") from None
    return parse_luks2_header(data, name)


def keyslots(image: str | os.PathLike[str]) -> dict[int, KeyslotInfo]:
    return keyslot_infos(read_header(image).metadata)


def tokens(image: str | os.PathLike[str]) -> dict[int, dict[str, Any]]:
    return token_dicts(read_header(image).metadata)


def uuid(image: str | os.PathLike[str]) -> str:
    return read_header(image).uuid


# --- running cryptsetup ----------------------------------------------------------------------


def _error(image: str, action: str, status: int, stderr: str, slot: int | None) -> LuksError:
    """The one-line error for a failed cryptsetup call."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else "no error output"
    which = f"keyslot {slot}" if slot is not None else "any keyslot"
    if status == 2 and "No key available" in stderr:
        return BadKey(f"the key does not open {which} of {image}")
    if "is not a valid LUKS" in stderr:
        return NotLuks(
            f"{image} is not a LUKS2 image or its header is damaged",
            hint="nothing was changed; restore the header from a backup",
        )
    if "No usable keyslot" in stderr or "is not active" in stderr:
        return NoKeyslot(f"{image} has no usable {which}")
    if status == 4:
        return LuksError(f"cryptsetup {action}: {image} does not exist or cannot be opened")
    return LuksError(f"cryptsetup {action} failed on {image} with status {status}: {last}")


def _library_error(
    image: str, action: str, exc: libcryptsetup.CallError, slot: int | None
) -> LuksError:
    """The one-line error for a failed libcryptsetup call: the same types as _error's."""
    which = f"keyslot {slot}" if slot is not None else "any keyslot"
    last = exc.text
    if exc.call.startswith("crypt_init("):
        return LuksError(f"{action}: {image} does not exist or cannot be opened ({last})")
    if exc.call.startswith("crypt_load") and exc.errno == -errno.EINVAL:
        return NotLuks(
            f"{image} is not a LUKS2 image or its header is damaged",
            hint="nothing was changed; restore the header from a backup",
        )
    if exc.errno == -errno.EPERM:
        return BadKey(f"the key does not open {which} of {image}")
    if exc.errno == -errno.ENOENT:
        return NoKeyslot(f"{image} has no usable {which}")
    return LuksError(f"{action} failed on {image} ({exc.call}: {-exc.errno}): {last}")


def _cryptsetup(image: str, action: str, args: Sequence[str], *, data: bytes | None = None) -> str:
    """Run cryptsetup with no key; its standard output as text."""
    try:
        result = run([CRYPTSETUP, *args], input=data, check=False)
    except CommandError as e:
        raise LuksError(str(e)) from None
    if result.returncode != 0:
        raise _error(image, action, result.returncode, result.stderr.decode(errors="replace"), None)
    return result.stdout.decode(errors="replace")


def _check_key(key: Key, what: str) -> None:
    if not key:
        raise LuksError(f"the {what} is empty, refusing")
    if len(key) > MAX_KEY_BYTES:
        raise LuksError(f"the {what} has {len(key)} bytes, more than {MAX_KEY_BYTES}, refusing")


def _key_pipe(key: Key, what: str) -> int:
    """The read end of a pipe already holding key (write end closed)."""
    _check_key(key, what)
    r, w = os.pipe()
    try:
        written = os.write(w, key)  # <= 4096 bytes (PIPE_BUF) into an empty pipe: atomic
        assert written == len(key)
    except OSError:
        os.close(r)
        raise
    finally:
        os.close(w)
    return r


def _with_keys(
    image: str,
    action: str,
    argv_for: Callable[[int | None], list[str]],
    *,
    key: Key,
    extra: Key | None = None,
    extra_what: str = "new key",
    slot: int | None = None,
    output_max: int = 65536,
) -> bytearray:
    """Run cryptsetup with key on stdin and extra on /dev/fd/N; its standard output.

    ``argv_for(fd)`` builds the argument list given the extra pipe's fd (or None).
    run.run's secret mode: the output arrives in a bytearray (never an immutable bytes
    object), which the caller wipes when it holds a secret (a volume key dump).
    """
    _check_key(key, "key")
    extra_fd = _key_pipe(extra, extra_what) if extra is not None else None
    try:
        result = run(
            [CRYPTSETUP, *argv_for(extra_fd)],
            input=key,
            check=False,
            pass_fds=() if extra_fd is None else (extra_fd,),
            secret_output=True,
            secret_max=output_max,
        )
    except CommandError as e:
        raise LuksError(f"cryptsetup {action} on {image}: {e}") from None
    finally:
        if extra_fd is not None:
            os.close(extra_fd)
    if result.returncode != 0:
        _wipe(result.secret)
        raise _error(image, action, result.returncode, result.stderr.decode(errors="replace"), slot)
    return result.secret


# --- commands --------------------------------------------------------------------------------


def format_argv(
    image: str,
    *,
    sector_size: int = SECTOR_SIZE,
    label: str = LABEL,
    uuid: str | None = None,
    key_slot: int = TPM2_KEYSLOT,
    volume_key_fd: int | None = None,
) -> list[str]:
    argv = ["luksFormat", "--type", "luks2", "--batch-mode"]
    argv += ["--cipher", CIPHER, "--key-size", str(KEY_BITS), "--sector-size", str(sector_size)]
    argv += ["--hash", HASH, "--pbkdf", "pbkdf2"]
    argv += ["--pbkdf-force-iterations", str(PBKDF2_MIN_ITERATIONS)]
    argv += ["--key-slot", str(key_slot), "--label", label]
    if uuid is not None:
        argv += ["--uuid", uuid]
    if volume_key_fd is not None:
        argv += ["--volume-key-file", f"/dev/fd/{volume_key_fd}"]
    return [*argv, "--key-file=-", image]


def format(
    image: str | os.PathLike[str],
    *,
    key: Key,
    sector_size: int = SECTOR_SIZE,
    label: str = LABEL,
    uuid: str | None = None,
    key_slot: int = TPM2_KEYSLOT,
    volume_key: Key | None = None,
) -> None:
    """Make image a LUKS2 container whose keyslot key_slot opens with key.

    aes-xts-plain64, 512-bit volume key, 4096-byte sectors, PBKDF2 at the
    minimum 1000 iterations (key has full entropy), default 16 MiB header, no
    integrity. volume_key (64 bytes), when given, is used instead of a random
    one, so the caller holds it without a dump. Overwrites any existing header.
    """
    name = os.fspath(image)
    if volume_key is not None and len(volume_key) != KEY_BITS // 8:
        raise LuksError(f"a volume key has {KEY_BITS // 8} bytes, not {len(volume_key)}")
    _with_keys(
        name,
        "luksFormat",
        lambda fd: format_argv(
            name,
            sector_size=sector_size,
            label=label,
            uuid=uuid,
            key_slot=key_slot,
            volume_key_fd=fd,
        ),
        key=key,
        extra=volume_key,
        extra_what="volume key",
        slot=key_slot,
    )


def add_keyslot_argv(
    image: str,
    *,
    slot: int,
    new_key_fd: int,
    existing_slot: int | None = None,
    pbkdf: str = "pbkdf2",
    iterations: int | None = None,
    iter_time_ms: int | None = None,
    memory_kib: int | None = None,
) -> list[str]:
    if pbkdf not in ("pbkdf2", "argon2id"):
        raise LuksError(f"unknown PBKDF {pbkdf!r}; expected pbkdf2 or argon2id")
    argv = ["luksAddKey", "--batch-mode", "--key-file=-"]
    if existing_slot is not None:
        argv += ["--key-slot", str(existing_slot)]
    argv += ["--new-key-slot", str(slot), "--new-keyfile", f"/dev/fd/{new_key_fd}"]
    argv += ["--pbkdf", pbkdf]
    if pbkdf == "pbkdf2":
        argv += ["--hash", HASH]
        argv += ["--pbkdf-force-iterations", str(iterations or PBKDF2_MIN_ITERATIONS)]
    else:
        if iterations is not None:
            argv += ["--pbkdf-force-iterations", str(iterations)]
        if iter_time_ms is not None:
            argv += ["--iter-time", str(iter_time_ms)]
        if memory_kib is not None:
            argv += ["--pbkdf-memory", str(memory_kib)]
    return [*argv, image]


def add_keyslot(
    image: str | os.PathLike[str],
    *,
    existing_key: Key,
    new_key: Key,
    slot: int,
    existing_slot: int | None = None,
    pbkdf: str = "pbkdf2",
    iterations: int | None = None,
    iter_time_ms: int | None = None,
    memory_kib: int | None = None,
) -> None:
    """Enrol new_key in keyslot slot; existing_key (in existing_slot, if given) unlocks.

    Default PBKDF2 at the minimum iterations, for keys with full entropy (the
    TPM secret, the recovery key). argon2id uses cryptsetup's benchmark unless
    iterations/iter_time_ms/memory_kib say otherwise.
    """
    name = os.fspath(image)

    def argv(fd: int | None) -> list[str]:
        assert fd is not None
        return add_keyslot_argv(
            name,
            slot=slot,
            new_key_fd=fd,
            existing_slot=existing_slot,
            pbkdf=pbkdf,
            iterations=iterations,
            iter_time_ms=iter_time_ms,
            memory_kib=memory_kib,
        )

    _with_keys(name, "luksAddKey", argv, key=existing_key, extra=new_key, slot=existing_slot)


def kill_keyslot(image: str | os.PathLike[str], slot: int) -> None:
    """Remove keyslot slot, no key needed (even the last one: the data is then lost)."""
    name = os.fspath(image)
    try:
        _cryptsetup(name, "luksKillSlot", ["luksKillSlot", "--batch-mode", name, str(slot)])
    except NoKeyslot:
        raise NoKeyslot(f"{name} has no keyslot {slot} to remove") from None


def erase(image: str | os.PathLike[str]) -> None:
    """Crypto-erase: destroy every keyslot; the data can never be decrypted again."""
    name = os.fspath(image)
    _cryptsetup(name, "erase", ["erase", "--batch-mode", name])


def token_import(
    image: str | os.PathLike[str],
    token_json: str,
    token_id: int | None = None,
    *,
    replace: bool = False,
) -> int:
    """Store token_json (a JSON object with "type" and "keyslots") as a token; its id.

    Without token_id the lowest free id is used. replace overwrites that id.
    """
    name = os.fspath(image)
    if token_id is None:
        used = token_dicts(read_header(name).metadata)
        free = [i for i in range(MAX_KEYSLOTS) if i not in used]
        if not free:
            raise LuksError(f"{name} has no free token id")
        token_id = free[0]
    argv = ["token", "import", "--json-file=-", "--token-id", str(token_id)]
    if replace:
        argv.append("--token-replace")
    _cryptsetup(name, "token import", [*argv, name], data=token_json.encode())
    return token_id


def token_remove(image: str | os.PathLike[str], token_id: int) -> None:
    """Remove token token_id (a token holds no key: nothing that opens the image is lost)."""
    name = os.fspath(image)
    _cryptsetup(name, "token remove", ["token", "remove", "--token-id", str(token_id), name])


def token_export(image: str | os.PathLike[str], token_id: int) -> str:
    """The JSON text of token token_id, as cryptsetup prints it."""
    name = os.fspath(image)
    return _cryptsetup(name, "token export", ["token", "export", "--token-id", str(token_id), name])


def open_argv(
    device: str,
    name: str | None = DM_NAME,
    *,
    key_slot: int,
    keyring: bool = False,
    readonly: bool = False,
    discards: bool = False,
    no_write_workqueue: bool = False,
    test: bool = False,
) -> list[str]:
    """``cryptsetup open`` for one keyslot, key on stdin, no token tried (SPEC §10).

    --disable-external-tokens keeps token plugins (systemd-tpm2: ~300 ms) from
    loading; --key-slot keeps cryptsetup from trying the other slots. Without
    keyring the volume key goes into the dm table instead of the kernel keyring,
    so that ``cryptsetup resize`` needs no key in the booted system (docs/luks.md).
    no_write_workqueue: dm-crypt encrypts writes in the writer's context (config.py).
    test: only check the key (--test-passphrase), no device-mapper needed.
    """
    argv = ["open", "--type", "luks2", "--key-slot", str(key_slot), "--key-file=-"]
    argv.append("--disable-external-tokens")
    if not keyring:
        argv.append("--disable-keyring")
    if readonly:
        argv.append("--readonly")
    if discards:
        argv.append("--allow-discards")
    if no_write_workqueue:
        argv.append("--perf-no_write_workqueue")
    if test:
        return [*argv, "--test-passphrase", device]
    if not name:
        raise LuksError("cryptsetup open needs a device-mapper name")
    return [*argv, device, name]


def open(
    device: str | os.PathLike[str],
    name: str = DM_NAME,
    *,
    key: Key,
    key_slot: int,
    keyring: bool = False,
    readonly: bool = False,
    discards: bool = False,
    no_write_workqueue: bool = False,
) -> None:
    """Activate /dev/mapper/name from device (a loop device or the image) with one keyslot."""
    path = os.fspath(device)
    if libcryptsetup.available():
        if not name:
            raise LuksError("cryptsetup open needs a device-mapper name")
        _check_key(key, "key")
        try:
            libcryptsetup.activate(
                path,
                name,
                key=key,
                key_slot=key_slot,
                keyring=keyring,
                readonly=readonly,
                discards=discards,
                no_write_workqueue=no_write_workqueue,
            )
        except libcryptsetup.CallError as exc:
            raise _library_error(path, "open", exc, key_slot) from None
        return
    argv = open_argv(
        path,
        name,
        key_slot=key_slot,
        keyring=keyring,
        readonly=readonly,
        discards=discards,
        no_write_workqueue=no_write_workqueue,
    )
    _with_keys(path, "open", lambda _fd: argv, key=key, slot=key_slot)


def check_key(image: str | os.PathLike[str], *, key: Key, key_slot: int) -> None:
    """Raise BadKey/NoKeyslot unless key opens key_slot (no activation, no device-mapper)."""
    path = os.fspath(image)
    if libcryptsetup.available():
        _check_key(key, "key")
        try:
            libcryptsetup.activate(path, None, key=key, key_slot=key_slot)
        except libcryptsetup.CallError as exc:
            raise _library_error(path, "open --test-passphrase", exc, key_slot) from None
        return
    argv = open_argv(path, None, key_slot=key_slot, test=True)
    _with_keys(path, "open --test-passphrase", lambda _fd: argv, key=key, slot=key_slot)


def close(name: str = DM_NAME) -> None:
    """Deactivate /dev/mapper/name."""
    _cryptsetup(f"/dev/mapper/{name}", "close", ["close", name])


def volume_key_argv(image: str, *, key_slot: int) -> list[str]:
    # --batch-mode: no "are you sure" question. No token is tried by luksDump.
    return [
        "luksDump",
        "--dump-volume-key",
        "--batch-mode",
        "--key-slot",
        str(key_slot),
        "--key-file=-",
        image,
    ]


def volume_key(image: str | os.PathLike[str], *, key: Key, key_slot: int) -> bytearray:
    """The volume key (64 bytes) from key in key_slot; caller wipes it.

    In process: crypt_volume_key_get writes it straight into the returned bytearray,
    and only key_slot is tried. The binary: ``luksDump --dump-volume-key`` prints it in
    hex on stdout, which arrives in a bytearray and is wiped after decoding (the key is
    never on disk); luksDump ignores --key-slot and tries every keyslot.
    """
    path = os.fspath(image)
    if libcryptsetup.available():
        _check_key(key, "key")
        try:
            return libcryptsetup.volume_key(path, key=key, key_slot=key_slot)
        except libcryptsetup.CallError as exc:
            raise _library_error(path, "luksDump --dump-volume-key", exc, key_slot) from None
    out = _with_keys(
        path,
        "luksDump --dump-volume-key",
        lambda _fd: volume_key_argv(path, key_slot=key_slot),
        key=key,
        slot=key_slot,
        output_max=8192,
    )
    try:
        return parse_volume_key_dump(out, path)
    finally:
        _wipe(out)


_HEX = {c: i for i, c in enumerate(b"0123456789abcdef")}


def parse_volume_key_dump(
    out: bytes | bytearray, name: str = "image", *, length: int | None = None
) -> bytearray:
    """The key from luksDump --dump-volume-key's text ("MK bits:", "MK dump:" hex lines).

    Reads out[:length] in place: no slice of the text (which holds the key) is copied.
    """
    end = len(out) if length is None else length
    marker, bits_marker = out.find(b"MK dump:", 0, end), out.find(b"MK bits:", 0, end)
    if marker < 0 or bits_marker < 0:
        raise LuksError(f"cryptsetup printed no volume key for {name}")
    bits_end = out.find(b"\n", bits_marker, end)
    bits_line = bytes(out[bits_marker + 8 : bits_end if bits_end > 0 else end]).strip()
    if not bits_line.isdigit() or int(bits_line) % 8 or not 0 < int(bits_line) <= 4096:
        raise LuksError(f"cryptsetup printed an unexpected volume key size for {name}")
    key = bytearray(int(bits_line) // 8)
    nibbles = 0
    for i in range(marker + 8, end):
        value = _HEX.get(out[i])
        if value is None:
            if out[i] in b" \t\n":
                continue
            break  # a following field
        if nibbles == 2 * len(key):
            _wipe(key)
            raise LuksError(f"cryptsetup printed a longer volume key than announced for {name}")
        key[nibbles // 2] |= value << (4 * (1 - nibbles % 2))
        nibbles += 1
    if nibbles != 2 * len(key):
        _wipe(key)
        raise LuksError(f"cryptsetup printed a shorter volume key than announced for {name}")
    return key
