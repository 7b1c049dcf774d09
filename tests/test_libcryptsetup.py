"""libcryptsetup in process against the cryptsetup binary, on real LUKS2 images (no mocks).

Every image is made by the real ``cryptsetup luksFormat`` (through luks.format); the
binary (``PYSTATE_CRYPTSETUP=cli``) is the oracle for every answer of the library
(``PYSTATE_CRYPTSETUP=library``). Activation needs device-mapper, which this host lacks:
the library's open runs here up to the device-mapper call (crypt_init, crypt_load, the
keyring switch and crypt_activate_by_passphrase with a name), and the QEMU boot tests
activate for real.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import test_luks

from pystate_initrd.log import Log
from pystate_initrd.secret import wipe
from pystate_initrd.system import libcryptsetup, luks
from pystate_initrd.volume import resize

CRYPTSETUP = shutil.which("cryptsetup") or shutil.which("/usr/sbin/cryptsetup")
pytestmark = [
    pytest.mark.skipif(CRYPTSETUP is None, reason="cryptsetup is not installed"),
    pytest.mark.skipif(
        isinstance(libcryptsetup._load(), str), reason=f"no {libcryptsetup.LIBRARY} here"
    ),
]

MiB = 1 << 20
KEY = bytes(range(32))
RECOVERY = b"the-recovery-passphrase"
# Not /dev/mapper/control: libdevmapper makes that node itself (10:236) even where the
# kernel has no device-mapper, and then fails to open it.
HAS_DM = "device-mapper" in Path("/proc/misc").read_text()
image = test_luks.image  # a fixture: a fresh copy of this module's template


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    image = tmp_path_factory.mktemp("lcs") / "template.img"
    with open(image, "wb") as f:
        f.truncate(20 * MiB)
    luks.format(image, key=KEY)
    luks.add_keyslot(image, existing_key=KEY, new_key=RECOVERY, slot=1)
    return image


def in_mode(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(libcryptsetup.ENV, mode)


def outcome(call: object) -> tuple[str, str]:
    """("ok", "") or the exception's type name and message, for comparing both paths."""
    assert callable(call)
    try:
        call()
    except luks.LuksError as exc:
        return type(exc).__name__, str(exc)
    return "ok", ""


# --- the same answers as the binary -----------------------------------------------------------


def _luks1(path: Path) -> Path:
    path.write_bytes(bytes(4 * MiB))
    assert CRYPTSETUP is not None
    args = ["luksFormat", "--type", "luks1", "-q", "--pbkdf-force-iterations", "1000"]
    subprocess.run([CRYPTSETUP, *args, "--key-file=-", str(path)], input=b"k", check=True)
    return path


@pytest.mark.parametrize(
    ("which", "key", "slot", "expected"),
    [
        ("image", KEY, 0, "ok"),
        ("image", RECOVERY, 1, "ok"),
        ("image", b"not the key", 0, "BadKey"),
        ("image", RECOVERY, 0, "BadKey"),  # a key of another slot: only the slot named is tried
        ("image", KEY, 1, "BadKey"),
        ("image", KEY, 5, "NoKeyslot"),  # empty slot
        ("image", KEY, 31, "NoKeyslot"),  # the last LUKS2 slot number
        ("plain", KEY, 0, "NotLuks"),
        ("luks1", b"k", 0, "NotLuks"),
        ("missing", KEY, 0, "LuksError"),
    ],
)
def test_check_key_same_as_binary(
    image: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    which: str,
    key: bytes,
    slot: int,
    expected: str,
) -> None:
    target = {
        "image": image,
        "plain": tmp_path / "plain.img",
        "luks1": tmp_path / "luks1.img",
        "missing": tmp_path / "missing.img",
    }[which]
    if which == "plain":
        target.write_bytes(bytes(MiB))
    if which == "luks1":
        _luks1(target)
    results = {}
    for mode in ("cli", "library"):
        in_mode(mode, monkeypatch)
        results[mode] = outcome(lambda: luks.check_key(target, key=bytearray(key), key_slot=slot))
    assert results["cli"][0] == results["library"][0] == expected, results
    if expected == "LuksError":  # missing: the wording names the path on both paths
        for _kind, message in results.values():
            assert re.search(r"missing\.img does not exist or cannot be opened", message)
    else:  # the typed errors read the same, word for word
        assert results["cli"][1] == results["library"][1]


@pytest.mark.parametrize(("key", "slot"), [(KEY, 0), (RECOVERY, 1)])
def test_volume_key_same_as_luksdump(
    image: Path, monkeypatch: pytest.MonkeyPatch, key: bytes, slot: int
) -> None:
    assert CRYPTSETUP is not None
    dump = subprocess.run(
        [CRYPTSETUP, "luksDump", "--dump-volume-key", "-q", "--key-file=-", str(image)],
        input=key,
        capture_output=True,
        check=True,
    )
    oracle = bytes.fromhex("".join(dump.stdout.decode().split("MK dump:")[1].split()))
    assert len(oracle) == 64
    in_mode("library", monkeypatch)
    vk = luks.volume_key(image, key=bytearray(key), key_slot=slot)
    assert type(vk) is bytearray and vk == oracle
    in_mode("cli", monkeypatch)
    assert luks.volume_key(image, key=key, key_slot=slot) == oracle
    wipe(vk)
    assert vk == bytearray()


def test_volume_key_tries_only_the_slot_named(image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # luksDump --dump-volume-key ignores --key-slot (cryptsetup 2.6 asks crypt_volume_key_get
    # for CRYPT_ANY_SLOT); the library is asked for the slot itself, as open is.
    in_mode("cli", monkeypatch)
    assert len(luks.volume_key(image, key=RECOVERY, key_slot=0)) == 64
    in_mode("library", monkeypatch)
    with pytest.raises(luks.BadKey, match=r"does not open keyslot 0 of .*encrypted\.img"):
        luks.volume_key(image, key=RECOVERY, key_slot=0)
    with pytest.raises(luks.NoKeyslot, match="has no usable keyslot 7"):
        luks.volume_key(image, key=KEY, key_slot=7)


@pytest.mark.parametrize("mode", ["cli", "library"])
@pytest.mark.parametrize(
    ("key", "words"),
    [(b"", "the key is empty, refusing"), (bytes(4097), "4097 bytes, more than 4096")],
)
def test_bad_keys_refused_before_any_call(
    image: Path, monkeypatch: pytest.MonkeyPatch, mode: str, key: bytes, words: str
) -> None:
    in_mode(mode, monkeypatch)
    for call in (
        lambda: luks.check_key(image, key=key, key_slot=0),
        lambda: luks.volume_key(image, key=key, key_slot=0),
        lambda: luks.open(image, key=key, key_slot=0),
    ):
        with pytest.raises(luks.LuksError, match=words):
            call()


# --- key buffers --------------------------------------------------------------------------------


def test_keys_are_used_in_place(image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller's buffer goes to the library as is: a bytearray, a slice of a larger
    buffer through a memoryview (no copy could be made of it without slicing), and it
    is left as it was for the caller to wipe."""
    in_mode("library", monkeypatch)
    buf = bytearray(b"\xff" * 8 + KEY + b"\xff" * 8)
    with memoryview(buf)[8 : 8 + len(KEY)] as view:
        luks.check_key(image, key=view, key_slot=0)
        vk = luks.volume_key(image, key=view, key_slot=0)
    assert buf == b"\xff" * 8 + KEY + b"\xff" * 8
    key = bytearray(KEY)
    assert luks.volume_key(image, key=key, key_slot=0) == vk
    wipe(key)
    wipe(vk)
    assert key == vk == bytearray()


def test_no_cffi_owned_buffer_holds_key_material() -> None:
    # Keys and volume keys only ever pass through ffi.from_buffer over the caller's bytearray
    # (or the returned one): the only memory cffi allocates here is a handle and a size_t.
    source = Path(libcryptsetup.__file__).read_text()
    allocations = re.findall(r"ffi\.new\(([^,)]*)", source)
    assert sorted(set(allocations)) == ['"size_t *"', '"struct crypt_device **"']
    assert source.count("ffi.from_buffer(") == 3


def test_failed_volume_key_leaves_nothing(image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    in_mode("library", monkeypatch)
    key = bytearray(b"not the key")
    with pytest.raises(luks.BadKey):
        luks.volume_key(image, key=key, key_slot=0)
    assert key == b"not the key"  # the caller's, untouched, for the caller to wipe


# --- activation, as far as a host without device-mapper goes -------------------------------


def test_activate_flags_match_the_binary() -> None:
    # cryptsetup 2.6 src/utils_luks.c set_activation_flags: --readonly, --allow-discards,
    # and --test-passphrase with --key-slot -> ALLOW_UNBOUND_KEY; --disable-keyring is
    # crypt_volume_key_keyring(NULL, 0), not a flag.
    f = libcryptsetup.activate_flags
    assert f(check_only=True) == libcryptsetup.CRYPT_ACTIVATE_ALLOW_UNBOUND_KEY == 1 << 16
    assert f(check_only=False) == 0
    assert f(check_only=False, keyring=True) == 0
    assert f(check_only=False, readonly=True) == libcryptsetup.CRYPT_ACTIVATE_READONLY == 1
    assert f(check_only=False, discards=True) == 1 << 3
    assert f(check_only=False, readonly=True, discards=True) == 0b1001
    # --perf-no_write_workqueue: CRYPT_ACTIVATE_NO_WRITE_WORKQUEUE, libcryptsetup.h (2.3.4+)
    assert f(check_only=False, no_write_workqueue=True) == 1 << 25
    assert f(check_only=False, readonly=True, no_write_workqueue=True) == (1 << 25) | 1


@pytest.mark.skipif(HAS_DM, reason="this host has device-mapper: the QEMU tests activate")
@pytest.mark.parametrize("readonly", [False, True])
def test_open_reaches_device_mapper(
    image: Path, monkeypatch: pytest.MonkeyPatch, readonly: bool
) -> None:
    """open by the library runs crypt_init, crypt_load and crypt_activate_by_passphrase with
    the name, which asks device-mapper whether the name is free before it tries the key:
    here that fails (EOPNOTSUPP) whatever the key, with both of the library's messages."""
    in_mode("library", monkeypatch)
    with pytest.raises(luks.LuksError, match="device-mapper") as info:
        luks.open(image, "pystate-test", key=bytearray(KEY), key_slot=0, readonly=readonly)
    assert type(info.value) is luks.LuksError
    message = str(info.value)
    assert "\n" not in message and "encrypted.img" in message
    flags = libcryptsetup.CRYPT_ACTIVATE_READONLY if readonly else 0  # and not ALLOW_UNBOUND_KEY
    assert f"crypt_activate_by_passphrase(pystate-test, keyslot 0, {flags:#x})" in message
    assert message.endswith("Cannot use device pystate-test, name is invalid or still in use.")
    with pytest.raises(luks.LuksError, match="device-mapper"):
        luks.open(image, "pystate-test", key=b"wrong", key_slot=0, readonly=readonly)
    with pytest.raises(luks.LuksError, match="needs a device-mapper name"):
        luks.open(image, "", key=KEY, key_slot=0)


@pytest.mark.skipif(HAS_DM, reason="this host has device-mapper")
def test_crypt_resize_without_a_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    in_mode("library", monkeypatch)
    with pytest.raises(luks.LuksError, match=r"crypt_init_by_name\(pystate-none-such\)"):
        resize.crypt_resize("pystate-none-such")
    with pytest.raises(resize.ResizeError, match="not a multiple of 4096"):
        resize.crypt_resize("pystate-none-such", 1000)  # checked before any call


# --- the choice, and the fallback -------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, "auto"), ("", "auto"), ("auto", "auto"), ("cli", "cli"), (" CLI ", "cli"),
     ("library", "library"), ("bogus", "auto")],
)  # fmt: skip
def test_mode(monkeypatch: pytest.MonkeyPatch, value: str | None, expected: str) -> None:
    if value is None:
        monkeypatch.delenv(libcryptsetup.ENV, raising=False)
    else:
        monkeypatch.setenv(libcryptsetup.ENV, value)
    assert libcryptsetup.mode() == expected
    assert libcryptsetup.available() == (expected != "cli")  # the library loads here


@pytest.fixture
def missing_library(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A library name that does not exist: the one way to make dlopen() fail on a host
    that has libcryptsetup (an initrd without it cannot be made here), so the fallback
    is reached through the real dlopen, not a stub."""
    monkeypatch.setattr(libcryptsetup, "LIBRARY", "libcryptsetup-pystate-missing.so.12")
    libcryptsetup._load.cache_clear()
    yield
    libcryptsetup._load.cache_clear()  # the next caller loads the real one again


def test_fallback_when_the_library_does_not_load(
    missing_library: None, image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(libcryptsetup.ENV, raising=False)
    log_file = tmp_path / "log"
    log_file.touch()
    log = Log(kmsg_path=str(log_file), debug=True).install()
    try:
        assert not libcryptsetup.available()
        why = libcryptsetup.why_not()
        assert why is not None and "libcryptsetup-pystate-missing.so.12" in why
        luks.check_key(image, key=KEY, key_slot=0)
        with pytest.raises(luks.BadKey):
            luks.check_key(image, key=b"wrong", key_slot=0)
        assert len(luks.volume_key(image, key=KEY, key_slot=0)) == 64
    finally:
        log.close()
    logged = log_file.read_text()
    assert "using the cryptsetup binary" in logged
    assert logged.count("run: cryptsetup open") == 2
    assert "libcryptsetup: crypt_" not in logged
    # Insisting on the library says why it cannot have it.
    monkeypatch.setenv(libcryptsetup.ENV, "library")
    with pytest.raises(luks.LuksError, match="PYSTATE_CRYPTSETUP=library, but cannot load"):
        luks.check_key(image, key=KEY, key_slot=0)


def test_loading_sets_dm_disable_udev() -> None:
    # libdevmapper reads DM_DISABLE_UDEV in its constructor, i.e. at dlopen(): _load() puts it
    # into the environment first, as run.py puts it into every command's.
    assert not isinstance(libcryptsetup._load(), str)
    assert os.environ.get("DM_DISABLE_UDEV") == "1"


def test_initrd_python_checks_a_key_in_process(image: Path, tmp_path: Path) -> None:
    """As in the initrd: Debian's python3 -I -S, only _cffi_backend (no cffi, no pycparser),
    the generated _linux_ffi module: dlopen, the log callback and the calls all work."""
    from pystate_initrd.system import _ffi_build

    python = Path("/usr/bin/python3.11")
    backend = Path("/usr/lib/python3/dist-packages/_cffi_backend.cpython-311-x86_64-linux-gnu.so")
    if not python.exists() or not backend.exists():
        pytest.skip("needs Debian's python3.11 and python3-cffi-backend")
    pkg = tmp_path / "root/pystate_initrd"
    shutil.copytree(Path(luks.__file__).parents[1], pkg, ignore=shutil.ignore_patterns("_*ffi*"))
    _ffi_build.generate(pkg / "system")
    shutil.copy(backend, tmp_path / "root")
    script = f"""
import sys
sys.path[:0] = [{str(tmp_path / "root")!r}]
from pystate_initrd.system import libcryptsetup, luks
assert libcryptsetup.available(), libcryptsetup.why_not()
luks.check_key({str(image)!r}, key=bytearray({KEY!r}), key_slot=0)
try:
    luks.check_key({str(image)!r}, key=bytearray(b"wrong"), key_slot=0)
except luks.BadKey as exc:
    print("BadKey", exc)
print(len(luks.volume_key({str(image)!r}, key={KEY!r}, key_slot=0)))
print(sorted(m for m in sys.modules if m.split(".")[0] in ("cffi", "pycparser")))
"""
    env = {"PATH": "/usr/sbin:/usr/bin", "PYSTATE_CRYPTSETUP": "library"}
    done = subprocess.run(
        [str(python), "-I", "-S", "-c", script],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("BadKey the key does not open keyslot 0 of ")
    assert lines[1:] == ["64", "[]"]
    assert done.stderr == ""  # the library's messages go to the callback, not to stderr
