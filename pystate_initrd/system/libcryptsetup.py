"""libcryptsetup.so.12 in process: the unlock path's LUKS2 calls without a cryptsetup process.

cffi in out-of-line ABI mode, like libc.py: the declarations are in _ffi_build.py (copied
from cryptsetup 2.6's libcryptsetup.h), the library is opened with dlopen() by its SONAME,
so it resolves exactly as the ``cryptsetup`` binary's own DT_NEEDED entry does (the initrd
holds it because it holds cryptsetup). ``available()`` is the one place that decides
between this module and the cryptsetup binary (system/luks.py asks it before each call):

    PYSTATE_CRYPTSETUP unset or "auto"   the library if dlopen() works, else the binary
    PYSTATE_CRYPTSETUP=cli               always the binary (benchmarks, tests)
    PYSTATE_CRYPTSETUP=library           always the library; a LuksError if it does not load

What a ``cryptsetup open --type luks2 --key-slot N --key-file=- --disable-external-tokens
--disable-keyring [--readonly] [--allow-discards] DEVICE NAME`` does, as calls:
``crypt_token_external_disable()`` (once; no token plugin is ever loaded),
``crypt_volume_key_keyring(NULL, 0)`` (the volume key goes into the dm table, not the
kernel keyring), ``crypt_init(DEVICE)``, ``crypt_load(LUKS2)``,
``crypt_activate_by_passphrase(NAME, N, key, flags)``, ``crypt_free``. With NAME = NULL
the same call only checks the key (``--test-passphrase``). ``luksDump --dump-volume-key``
becomes ``crypt_volume_key_get`` for one keyslot.

libdevmapper reads ``DM_DISABLE_UDEV`` once, in its ELF constructor, i.e. when dlopen()
loads it: it is put into this process's environment before the dlopen, as run.py puts it
into every command's (libdevmapper then makes /dev/mapper/NAME itself instead of waiting
for a udev confirmation that never comes in an initrd without the dm rules).

Keys: the caller's buffer is handed to the library with ``ffi.from_buffer`` (no copy); a
volume key is written by the library straight into a bytearray that the caller wipes.
The library's own copies live in its crypt_safe_alloc() memory, which it wipes on free.
Failures are ``CallError`` (a LuksError) carrying the negative errno and the library's
error messages (through ``crypt_set_log_callback``); system/luks.py turns them into
BadKey / NoKeyslot / NotLuks as it does for the binary's exit status and stderr.
"""

from __future__ import annotations

import errno as _errno
import functools
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pystate_initrd.formats.luks2 import LuksError
from pystate_initrd.log import installed as installed_log
from pystate_initrd.system import library_mode

LIBRARY = "libcryptsetup.so.12"  # Debian 12: libcryptsetup12 (cryptsetup 2.6)
ENV = "PYSTATE_CRYPTSETUP"
MODES = library_mode.MODES

# libcryptsetup.h
CRYPT_LUKS2 = b"LUKS2"
CRYPT_ANY_SLOT = -1
CRYPT_LOG_ERROR = 1
CRYPT_SLOT_ACTIVE, CRYPT_SLOT_ACTIVE_LAST = 2, 3  # enum crypt_keyslot_info
CRYPT_ACTIVATE_READONLY = 1 << 0
CRYPT_ACTIVATE_ALLOW_DISCARDS = 1 << 3
CRYPT_ACTIVATE_KEYRING_KEY = 1 << 11
CRYPT_ACTIVATE_NO_WRITE_WORKQUEUE = 1 << 25  # dm-crypt's no_write_workqueue (kernel 5.9)
CRYPT_ACTIVATE_ALLOW_UNBOUND_KEY = 1 << 16

Key = bytes | bytearray | memoryview


class CallError(LuksError):
    """A libcryptsetup call returned a negative errno."""

    def __init__(self, call: str, device: str, err: int, messages: list[str]) -> None:
        self.call, self.device, self.errno, self.messages = call, device, err, messages
        super().__init__(f"libcryptsetup {call} on {device} failed ({-err}): {self.text}")

    @property
    def text(self) -> str:
        """The library's error messages on one line (the cause comes first), or strerror."""
        return " ".join(self.messages[-3:]) if self.messages else os.strerror(-self.errno)


class _Lib:
    """The loaded library, its ffi, and the log callback that collects error messages."""

    def __init__(self, ffi: Any, lib: Any) -> None:
        self.ffi, self.lib = ffi, lib
        self.messages: list[str] = []

        def log(level: int, msg: Any, _usrptr: Any) -> None:
            if level == CRYPT_LOG_ERROR and msg != ffi.NULL:
                self.messages.append(ffi.string(msg).decode(errors="replace").strip())

        # Kept referenced here: the library calls it until the process ends.
        self.callback = ffi.callback("void(int, const char *, void *)", log)
        lib.crypt_set_log_callback(ffi.NULL, self.callback, ffi.NULL)  # every device's default
        lib.crypt_token_external_disable()  # global and final: no token plugin ever loads


@functools.cache
def _load() -> _Lib | str:
    """The loaded library, or why it could not be loaded (tried once per process)."""
    os.environ["DM_DISABLE_UDEV"] = "1"  # before dlopen: libdevmapper's constructor reads it
    try:
        from pystate_initrd.system.libc import ffi_libc

        ffi, _libc = ffi_libc()
        return _Lib(ffi, ffi.dlopen(LIBRARY))
    except (OSError, ImportError, AttributeError) as exc:
        # cffi's dlopen raises OSError for a missing file; a missing symbol raises
        # AttributeError when first used, and _Lib uses two right away.
        why = f"cannot load {LIBRARY}: {exc}"
        log = installed_log()
        if log is not None:
            log.debug(f"libcryptsetup: {why}; using the cryptsetup binary")
        return why


def why_not() -> str | None:
    """Why the library is not used, or None when it loaded."""
    loaded = _load()
    return loaded if isinstance(loaded, str) else None


def mode() -> str:
    return library_mode.mode(ENV)


def available() -> bool:
    """Use the library (True) or the cryptsetup binary (False): the one place that decides."""
    return library_mode.use_library(ENV, _load, LuksError)


def _lib() -> _Lib:
    loaded = _load()
    if isinstance(loaded, str):
        raise LuksError(f"libcryptsetup is not available: {loaded}")
    return loaded


def _debug(call: str, result: int, begin: float) -> None:
    log = installed_log()
    if log is not None and log.debug_enabled:
        ms = (time.monotonic() - begin) * 1000
        log.debug(f"libcryptsetup: {call} -> {result} in {ms:.1f} ms")


def _check(h: _Lib, call: str, device: str, result: int, begin: float) -> int:
    _debug(call, result, begin)
    if result < 0:
        raise CallError(call, device, result, list(h.messages))
    return result


@contextmanager
def _luks2(h: _Lib, device: str) -> Iterator[Any]:
    """A crypt_device for device with its LUKS2 header loaded; freed on the way out."""
    h.messages.clear()
    cdp = h.ffi.new("struct crypt_device **")
    begin = time.monotonic()
    _check(h, f"crypt_init({device})", device, h.lib.crypt_init(cdp, os.fsencode(device)), begin)
    cd = cdp[0]
    try:
        begin = time.monotonic()
        r = h.lib.crypt_load(cd, CRYPT_LUKS2, h.ffi.NULL)
        _check(h, "crypt_load(LUKS2)", device, r, begin)
        yield cd
    finally:
        h.lib.crypt_free(cd)


def activate_flags(
    *,
    check_only: bool,
    keyring: bool = False,
    readonly: bool = False,
    discards: bool = False,
    no_write_workqueue: bool = False,
) -> int:
    """The CRYPT_ACTIVATE_* flags cryptsetup 2.6's CLI sets for the same options (pure).

    ``--test-passphrase --key-slot N`` adds ALLOW_UNBOUND_KEY (src/utils_luks.c); the
    keyring choice is not a flag but crypt_volume_key_keyring() (KEYRING_KEY means "load
    the key into the keyring only", which ``cryptsetup open`` never asks for).
    """
    del keyring  # see crypt_volume_key_keyring in activate()
    flags = CRYPT_ACTIVATE_ALLOW_UNBOUND_KEY if check_only else 0
    if readonly:
        flags |= CRYPT_ACTIVATE_READONLY
    if discards:
        flags |= CRYPT_ACTIVATE_ALLOW_DISCARDS
    if no_write_workqueue:  # --perf-no_write_workqueue
        flags |= CRYPT_ACTIVATE_NO_WRITE_WORKQUEUE
    return flags


def activate(
    device: str,
    name: str | None,
    *,
    key: Key,
    key_slot: int,
    keyring: bool = False,
    readonly: bool = False,
    discards: bool = False,
    no_write_workqueue: bool = False,
) -> int:
    """Open keyslot key_slot of device with key and map it as /dev/mapper/name; the slot.

    name None: only check the key (no device-mapper), as ``open --test-passphrase``.
    """
    h = _lib()
    ffi, lib = h.ffi, h.lib
    flags = activate_flags(
        check_only=name is None,
        keyring=keyring,
        readonly=readonly,
        discards=discards,
        no_write_workqueue=no_write_workqueue,
    )
    # Global in the library, so set for every call: off = the key in the dm table.
    lib.crypt_volume_key_keyring(ffi.NULL, 1 if keyring else 0)
    with _luks2(h, device) as cd:
        c_name = ffi.NULL if name is None else name.encode()
        begin = time.monotonic()
        with ffi.from_buffer("char[]", key) as c_key:  # the caller's buffer, not a copy
            r = lib.crypt_activate_by_passphrase(cd, c_name, key_slot, c_key, len(key), flags)
        call = f"crypt_activate_by_passphrase({name or 'NULL'}, keyslot {key_slot}, {flags:#x})"
        return _check(h, call, device, r, begin)


def volume_key(device: str, *, key: Key, key_slot: int) -> bytearray:
    """The volume key behind keyslot key_slot (which key opens), in a bytearray the caller wipes.

    Only key_slot is tried (``luksDump --dump-volume-key`` tries every slot).
    """
    h = _lib()
    ffi, lib = h.ffi, h.lib
    with _luks2(h, device) as cd:
        if lib.crypt_keyslot_status(cd, key_slot) not in (
            CRYPT_SLOT_ACTIVE,
            CRYPT_SLOT_ACTIVE_LAST,
        ):
            # crypt_volume_key_get says EINVAL for an empty slot; activation says ENOENT.
            raise CallError("crypt_keyslot_status", device, -_errno.ENOENT, [])
        size = lib.crypt_get_volume_key_size(cd)
        if size <= 0:
            raise CallError("crypt_get_volume_key_size", device, -_errno.EINVAL, list(h.messages))
        out = bytearray(size)
        c_size = ffi.new("size_t *", size)
        begin = time.monotonic()
        try:
            with ffi.from_buffer("char[]", key) as c_key, ffi.from_buffer(out) as c_out:
                r = lib.crypt_volume_key_get(cd, key_slot, c_out, c_size, c_key, len(key))
            _check(h, f"crypt_volume_key_get(keyslot {key_slot})", device, r, begin)
            if not 0 < c_size[0] <= size:
                raise CallError("crypt_volume_key_get", device, -_errno.EINVAL, ["bad key size"])
        except BaseException:
            out[:] = bytes(size)
            raise
        if c_size[0] < size:
            del out[c_size[0] :]  # zeros: the library wrote only the first c_size bytes
        return out


def resize(name: str, sectors: int = 0) -> None:
    """Resize the active mapping /dev/mapper/name to sectors (512 bytes), 0 = to its device.

    No key: the mapping holds its key in the dm table (opened without the keyring), as
    ``cryptsetup resize`` needs none then either.
    """
    h = _lib()
    ffi, lib = h.ffi, h.lib
    h.messages.clear()
    cdp = ffi.new("struct crypt_device **")
    begin = time.monotonic()
    device = f"/dev/mapper/{name}"
    r = lib.crypt_init_by_name(cdp, name.encode())
    _check(h, f"crypt_init_by_name({name})", device, r, begin)
    try:
        begin = time.monotonic()
        r = lib.crypt_resize(cdp[0], name.encode(), sectors)
        _check(h, f"crypt_resize({name}, {sectors})", device, r, begin)
    finally:
        lib.crypt_free(cdp[0])
