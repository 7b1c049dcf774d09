"""luks: real cryptsetup on image files (no device-mapper needed), its JSON dump as the oracle.

open/close need device-mapper and run only in the QEMU boot tests; here their
argument lists are checked.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pystate_initrd.errors import PystateError
from pystate_initrd.formats import luks2
from pystate_initrd.formats.recovery import recovery_passphrase
from pystate_initrd.log import Log
from pystate_initrd.secret import Secret, new_recovery_key, wipe
from pystate_initrd.system import luks

CRYPTSETUP = shutil.which("cryptsetup") or shutil.which("/usr/sbin/cryptsetup")
pytestmark = pytest.mark.skipif(CRYPTSETUP is None, reason="cryptsetup is not installed")

MiB = 1 << 20
KEY = bytes(range(32))  # the "TPM secret" of the template image
UUID = "5c8a1f0e-5e33-4c3c-9a0e-8b8f3b5d2a11"
TOKEN = {"type": "pystate-tpm2", "keyslots": ["0"], "tpm2-blob": "AAEC", "tpm2-pcrs": [7, 15]}


def cryptsetup(*args: str, key: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """The oracle: cryptsetup run the ordinary way, not through pystate."""
    assert CRYPTSETUP is not None
    return subprocess.run(
        [CRYPTSETUP, *args],
        input=key,
        stdin=None if key is not None else subprocess.DEVNULL,
        capture_output=True,
        check=False,
        env={"LANG": "C.UTF-8", "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin")},
    )


def opens(image: Path, key: bytes, slot: int) -> bool:
    args = ["open", "--test-passphrase", "--key-slot", str(slot), "--key-file=-", str(image)]
    return cryptsetup(*args, key=key).returncode == 0


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    image = tmp_path_factory.mktemp("luks") / "template.img"
    with open(image, "wb") as f:
        f.truncate(20 * MiB)
    luks.format(image, key=KEY, uuid=UUID)
    return image


@pytest.fixture
def image(template: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "encrypted.img"
    shutil.copyfile(template, copy)
    return copy


def oracle_metadata(image: Path) -> dict[str, object]:
    result = cryptsetup("luksDump", "--dump-json-metadata", str(image))
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


# --- format ----------------------------------------------------------------------------------


def test_format_parameters(image: Path) -> None:
    header = luks.read_header(image)
    assert header.metadata == oracle_metadata(image)
    assert header.uuid == UUID == luks.uuid(image)
    assert cryptsetup("luksUUID", str(image)).stdout.decode().strip() == UUID
    assert header.label == "pystate"
    assert header.primary_ok and header.secondary_ok
    assert header.header_size == 16384
    assert header.data_offset == 16 * MiB

    slots = luks.keyslots(image)
    assert list(slots) == [0]
    slot = slots[0]
    assert (slot.type, slot.key_bits, slot.cipher) == ("luks2", 512, "aes-xts-plain64")
    assert (slot.pbkdf, slot.hash, slot.iterations) == ("pbkdf2", "sha256", 1000)
    assert slot.iterations == luks.PBKDF2_MIN_ITERATIONS
    assert (slot.memory_kib, slot.parallel, slot.priority) == (None, None, 1)

    segment = header.metadata["segments"]["0"]
    assert segment["encryption"] == "aes-xts-plain64"
    assert segment["sector_size"] == 4096
    assert "integrity" not in segment
    assert luks.tokens(image) == {}
    assert opens(image, KEY, 0)


def test_pbkdf2_minimum_is_what_cryptsetup_accepts(tmp_path: Path) -> None:
    image = tmp_path / "min.img"
    image.write_bytes(bytes(17 * MiB))
    args = ["luksFormat", "--type", "luks2", "-q", "--pbkdf", "pbkdf2", "--key-file=-"]
    below = cryptsetup(*args, "--pbkdf-force-iterations", "999", str(image), key=b"k")
    assert below.returncode != 0
    assert b"minimum is 1000" in below.stderr


def test_format_with_chosen_volume_key(tmp_path: Path) -> None:
    image = tmp_path / "vk.img"
    image.write_bytes(bytes(17 * MiB))
    with Secret.random(64) as volume_key:
        luks.format(image, key=KEY, volume_key=volume_key.value)
        assert luks.volume_key(image, key=KEY, key_slot=0) == volume_key.value
    with pytest.raises(luks.LuksError, match="has 64 bytes, not 32"):
        luks.format(image, key=KEY, volume_key=bytes(32))


@pytest.mark.parametrize(
    ("key", "words"),
    [(b"", "the key is empty, refusing"), (bytes(4097), "4097 bytes, more than 4096")],
)
def test_format_refuses_bad_keys(tmp_path: Path, key: bytes, words: str) -> None:
    with pytest.raises(luks.LuksError, match=words):
        luks.format(tmp_path / "x.img", key=key)


# --- keyslots ---------------------------------------------------------------------------------


def test_recovery_keyslot(image: Path) -> None:
    typed = new_recovery_key()
    passphrase = recovery_passphrase(typed)
    luks.add_keyslot(image, existing_key=KEY, new_key=passphrase, slot=1, existing_slot=0)

    slots = luks.keyslots(image)
    assert list(slots) == [0, 1]
    assert (slots[1].pbkdf, slots[1].iterations, slots[1].key_bits) == ("pbkdf2", 1000, 512)
    # Both keys, checked by cryptsetup itself; the recovery key as systemd-cryptenroll enrols it.
    assert opens(image, KEY, 0)
    assert opens(image, typed.encode(), 1)
    assert not opens(image, KEY, 1)
    assert not opens(image, typed.encode(), 0)
    luks.check_key(image, key=recovery_passphrase(typed.upper().replace("-", " ")), key_slot=1)
    luks.check_key(image, key=KEY, key_slot=0)
    assert luks.read_header(image).metadata == oracle_metadata(image)


def test_add_keyslot_argv() -> None:
    argv = luks.add_keyslot_argv("x.img", slot=1, new_key_fd=7, existing_slot=0)
    assert argv == [
        "luksAddKey", "--batch-mode", "--key-file=-", "--key-slot", "0",
        "--new-key-slot", "1", "--new-keyfile", "/dev/fd/7",
        "--pbkdf", "pbkdf2", "--hash", "sha256", "--pbkdf-force-iterations", "1000", "x.img",
    ]  # fmt: skip
    argon = luks.add_keyslot_argv("x.img", slot=1, new_key_fd=7, pbkdf="argon2id", memory_kib=65536)
    assert argon[-5:] == ["--pbkdf", "argon2id", "--pbkdf-memory", "65536", "x.img"]
    with pytest.raises(luks.LuksError, match="unknown PBKDF 'argon2i'"):
        luks.add_keyslot_argv("x.img", slot=1, new_key_fd=7, pbkdf="argon2i")


def test_add_keyslot_with_wrong_existing_key(image: Path) -> None:
    with pytest.raises(luks.BadKey, match=r"does not open keyslot 0 of .*encrypted\.img"):
        luks.add_keyslot(image, existing_key=b"wrong", new_key=b"new", slot=1, existing_slot=0)
    assert list(luks.keyslots(image)) == [0]


def test_wrong_key_and_missing_slot(image: Path) -> None:
    with pytest.raises(luks.BadKey) as info:
        luks.check_key(image, key=b"not the key", key_slot=0)
    message = str(info.value)
    assert "\n" not in message and str(image) in message
    with pytest.raises(luks.BadKey):
        luks.volume_key(image, key=b"not the key", key_slot=0)
    with pytest.raises(luks.NoKeyslot, match="has no usable keyslot 5"):
        luks.check_key(image, key=KEY, key_slot=5)


def test_kill_keyslot(image: Path) -> None:
    luks.add_keyslot(image, existing_key=KEY, new_key=b"second", slot=3)
    assert list(luks.keyslots(image)) == [0, 3]
    luks.kill_keyslot(image, 3)
    assert list(luks.keyslots(image)) == [0]
    assert opens(image, KEY, 0)
    with pytest.raises(luks.NoKeyslot, match="has no keyslot 3 to remove"):
        luks.kill_keyslot(image, 3)


def test_erase(image: Path) -> None:
    luks.add_keyslot(image, existing_key=KEY, new_key=b"recovery", slot=1)
    luks.erase(image)
    assert luks.keyslots(image) == {}
    assert oracle_metadata(image)["keyslots"] == {}
    for key, slot in [(KEY, 0), (b"recovery", 1)]:
        assert not opens(image, key, slot)
        with pytest.raises(luks.NoKeyslot):
            luks.check_key(image, key=key, key_slot=slot)
    assert luks.uuid(image) == UUID  # the header stays, only the keys are gone


# --- tokens ----------------------------------------------------------------------------------


def test_token_round_trip(image: Path) -> None:
    assert luks.token_import(image, json.dumps(TOKEN)) == 0
    assert json.loads(luks.token_export(image, 0)) == TOKEN
    assert luks.tokens(image) == {0: TOKEN}
    assert oracle_metadata(image)["tokens"] == {"0": TOKEN}

    second = dict(TOKEN, **{"tpm2-pcrs": [7]})
    assert luks.token_import(image, json.dumps(second)) == 1
    assert luks.token_import(image, json.dumps(second), 5) == 5
    assert list(luks.tokens(image)) == [0, 1, 5]

    with pytest.raises(luks.LuksError, match="token import failed"):
        luks.token_import(image, json.dumps(second), 0)  # taken, no replace
    luks.token_import(image, json.dumps(second), 0, replace=True)
    assert luks.tokens(image)[0] == second
    assert luks.read_header(image).metadata == oracle_metadata(image)


@pytest.mark.parametrize(
    "token",
    [
        "not json",
        "[]",
        json.dumps({"keyslots": ["0"]}),  # no type
        json.dumps(dict(TOKEN, keyslots=["7"])),  # no such keyslot
    ],
)
def test_token_import_refused(image: Path, token: str) -> None:
    with pytest.raises(luks.LuksError, match=r"token import failed on .*encrypted\.img"):
        luks.token_import(image, token)
    assert luks.tokens(image) == {}


def test_token_export_missing(image: Path) -> None:
    with pytest.raises(luks.LuksError, match="Failed to get token 3"):
        luks.token_export(image, 3)


# --- volume key ------------------------------------------------------------------------------


def test_volume_key_matches_cryptsetup(image: Path) -> None:
    key = luks.volume_key(image, key=bytearray(KEY), key_slot=0)
    assert isinstance(key, bytearray) and len(key) == 64
    dump = cryptsetup("luksDump", "--dump-volume-key", "-q", "--key-file=-", str(image), key=KEY)
    assert dump.returncode == 0
    text = dump.stdout.decode()
    oracle = bytes.fromhex("".join(text.split("MK dump:")[1].split()))
    assert key == oracle
    # The second keyslot holds the same volume key.
    luks.add_keyslot(image, existing_key=KEY, new_key=b"recovery", slot=1)
    assert luks.volume_key(image, key=b"recovery", key_slot=1) == oracle
    wipe(key)
    assert key == bytearray()


DUMP = (
    b"LUKS header information for x.img\nCipher name:   \taes\n"
    b"UUID:          \t5c8a1f0e-5e33-4c3c-9a0e-8b8f3b5d2a11\nMK bits:       \t64\n"
    b"MK dump:\t01 23 45 67 \n\t\t89 ab cd ef \n"
)


@pytest.mark.parametrize(
    ("dump", "expected"),
    [
        (DUMP, bytes.fromhex("0123456789abcdef")),
        (DUMP.replace(b"64\n", b"32\n"), "longer volume key than announced"),
        (DUMP.replace(b"64\n", b"72\n"), "shorter volume key than announced"),
        (DUMP.replace(b"64\n", b"6x\n"), "unexpected volume key size"),
        (DUMP.replace(b"64\n", b"0\n"), "unexpected volume key size"),
        (DUMP.replace(b"MK dump:", b"MK dmp:"), "printed no volume key"),
        (b"", "printed no volume key"),
    ],
)
def test_parse_volume_key_dump(dump: bytes, expected: bytes | str) -> None:
    if isinstance(expected, bytes):
        assert luks.parse_volume_key_dump(bytearray(dump)) == expected
    else:
        with pytest.raises(luks.LuksError, match=expected):
            luks.parse_volume_key_dump(bytearray(dump))


# --- damaged headers -------------------------------------------------------------------------


def _damage(image: Path, ranges: list[tuple[int, int]]) -> None:
    with open(image, "r+b") as f:
        for offset, size in ranges:
            f.seek(offset)
            f.write(b"\xa5" * size)


def _digest_outside(image: Path, ranges: list[tuple[int, int]]) -> str:
    data = bytearray(image.read_bytes())
    for offset, size in ranges:
        data[offset : offset + size] = bytes(size)
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    "ranges",
    [
        [(0, 6), (16384, 6)],  # both magics
        [(0, 4096), (16384, 4096)],  # both binary headers
        [(5000, 8), (16384 + 5000, 8)],  # both JSON areas: checksums fail
    ],
    ids=["magics", "binary-headers", "json-areas"],
)
def test_damaged_header(image: Path, ranges: list[tuple[int, int]]) -> None:
    _damage(image, ranges)
    before = _digest_outside(image, ranges)
    whole = hashlib.sha256(image.read_bytes()).hexdigest()
    attempts = [
        lambda: luks.check_key(image, key=KEY, key_slot=0),
        lambda: luks.volume_key(image, key=KEY, key_slot=0),
        lambda: luks.token_export(image, 0),
        lambda: luks.add_keyslot(image, existing_key=KEY, new_key=b"x", slot=1),
        lambda: luks.keyslots(image),
        lambda: luks.uuid(image),
    ]
    for attempt in attempts:
        with pytest.raises(luks.NotLuks) as info:
            attempt()
        assert "\n" not in str(info.value)
        assert str(image) in str(info.value)
    assert hashlib.sha256(image.read_bytes()).hexdigest() == whole
    assert _digest_outside(image, ranges) == before


def test_damaged_primary_falls_back_to_secondary(image: Path) -> None:
    luks.token_import(image, json.dumps(TOKEN))
    _damage(image, [(0, 6)])
    header = luks.read_header(image)
    assert (header.primary_ok, header.secondary_ok) == (False, True)
    assert header.uuid == UUID
    assert luks.tokens(image) == {0: TOKEN}
    # Note: cryptsetup open (even --test-passphrase) then repairs the primary copy in place.


def test_not_luks(tmp_path: Path) -> None:
    plain = tmp_path / "plain.img"
    plain.write_bytes(bytes(MiB))
    with pytest.raises(luks.NotLuks, match=r"plain\.img is not a LUKS2 image \(no LUKS2 header\)"):
        luks.read_header(plain)
    with pytest.raises(luks.NotLuks, match=r"plain\.img is not a LUKS2 image or its header"):
        luks.check_key(plain, key=KEY, key_slot=0)
    with pytest.raises(luks.NotLuks):
        luks.erase(plain)
    assert plain.read_bytes() == bytes(MiB)


def test_missing_image(tmp_path: Path) -> None:
    missing = tmp_path / "missing.img"
    with pytest.raises(luks.LuksError, match=r"cannot read the LUKS2 header of .*missing\.img"):
        luks.read_header(missing)
    with pytest.raises(luks.LuksError, match=r"missing\.img does not exist") as info:
        luks.check_key(missing, key=KEY, key_slot=0)
    assert not isinstance(info.value, luks.NotLuks)


def test_luks1_is_named(tmp_path: Path) -> None:
    image = tmp_path / "luks1.img"
    image.write_bytes(bytes(4 * MiB))
    args = ["luksFormat", "--type", "luks1", "-q", "--pbkdf-force-iterations", "1000"]
    assert cryptsetup(*args, "--key-file=-", str(image), key=b"k").returncode == 0
    with pytest.raises(luks.NotLuks, match="is a LUKS1 image, not LUKS2"):
        luks.read_header(image)


def test_larger_header_is_read(tmp_path: Path) -> None:
    image = tmp_path / "big.img"
    image.write_bytes(bytes(20 * MiB))
    args = ["luksFormat", "--type", "luks2", "-q", "--pbkdf", "pbkdf2"]
    args += ["--pbkdf-force-iterations", "1000", "--luks2-metadata-size", "64k", "--key-file=-"]
    assert cryptsetup(*args, str(image), key=b"k").returncode == 0
    header = luks.read_header(image)
    assert header.header_size == 65536
    assert header.metadata == oracle_metadata(image)
    _damage(image, [(0, 6)])
    assert luks.read_header(image).metadata == header.metadata


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.tuples(st.integers(0, 32767), st.integers(0, 255)), min_size=1, max_size=8))
def test_mutated_header_parses_or_raises_not_luks(
    template: Path, changes: list[tuple[int, int]]
) -> None:
    data = bytearray(template.read_bytes()[:32768])
    for offset, value in changes:
        data[offset] = value
    try:
        header = luks2.parse_luks2_header(bytes(data))
    except luks.NotLuks as e:
        assert "\n" not in str(e)
    else:
        assert header.primary_ok or header.secondary_ok
        luks2.keyslot_infos(header.metadata)
        luks2.token_dicts(header.metadata)


@pytest.mark.parametrize(
    "data",
    [b"", b"LUKS\xba\xbe", b"LUKS\xba\xbe\0\2" + bytes(100), b"SKUL\xba\xbe" + bytes(40000)],
)
def test_truncated_headers(data: bytes) -> None:
    with pytest.raises(luks.NotLuks):
        luks2.parse_luks2_header(data)


# --- argument lists: keys never in argv, no token tried ---------------------------------------


def test_open_argv() -> None:
    argv = luks.open_argv("/dev/loop3", key_slot=0)
    assert argv == [
        "open", "--type", "luks2", "--key-slot", "0", "--key-file=-",
        "--disable-external-tokens", "--disable-keyring", "/dev/loop3", "pystate-encrypted",
    ]  # fmt: skip
    assert not any(a.startswith(("--token", "--tries")) for a in argv)
    keyring = luks.open_argv("/dev/loop3", "other", key_slot=1, keyring=True, readonly=True)
    assert "--disable-keyring" not in keyring
    assert keyring[-3:] == ["--readonly", "/dev/loop3", "other"]
    assert keyring[keyring.index("--key-slot") + 1] == "1"
    test = luks.open_argv("x.img", None, key_slot=1, test=True)
    assert test[-2:] == ["--test-passphrase", "x.img"]


def test_open_argv_no_write_workqueue_is_an_option_the_binary_takes(image: Path) -> None:
    """[image] no-write-workqueue reaches the CLI fallback as --perf-no_write_workqueue, a
    spelling the real cryptsetup accepts (a misspelt option fails before any key is read)."""
    argv = luks.open_argv("/dev/loop3", key_slot=0, no_write_workqueue=True)
    assert "--perf-no_write_workqueue" in argv
    assert "--perf-no_write_workqueue" not in luks.open_argv("/dev/loop3", key_slot=0)
    test = luks.open_argv(str(image), None, key_slot=0, no_write_workqueue=True, test=True)
    assert cryptsetup(*test, key=KEY).returncode == 0
    wrong = cryptsetup(*test, key=b"not the key")
    assert wrong.returncode == 2, wrong.stderr  # bad key, not a refused option (exit 1)
    assert cryptsetup(*test, "--perf-no_write_workqueues", key=KEY).returncode == 1


def test_open_argv_needs_name() -> None:
    with pytest.raises(luks.LuksError, match="needs a device-mapper name"):
        luks.open_argv("/dev/loop3", "", key_slot=0)


def test_format_argv() -> None:
    argv = luks.format_argv("x.img", uuid=UUID, volume_key_fd=5)
    pairs = dict(itertools.pairwise(argv))
    assert pairs["--type"] == "luks2"
    assert pairs["--cipher"] == "aes-xts-plain64"
    assert pairs["--key-size"] == "512"
    assert pairs["--sector-size"] == "4096"
    assert pairs["--pbkdf"] == "pbkdf2"
    assert pairs["--pbkdf-force-iterations"] == "1000"
    assert pairs["--key-slot"] == "0"
    assert pairs["--uuid"] == UUID
    assert pairs["--volume-key-file"] == "/dev/fd/5"
    assert "--integrity" not in argv and "--batch-mode" in argv
    assert argv[-2:] == ["--key-file=-", "x.img"]


@pytest.mark.parametrize("mode", ["cli", "library"])
def test_keys_never_in_argv(
    image: Path, tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The debug log shows every command line and library call (pystate.debug): no key in one.
    monkeypatch.setenv("PYSTATE_CRYPTSETUP", mode)
    log_file = tmp_path / "log"
    log_file.touch()
    log = Log(kmsg_path=str(log_file), debug=True).install()
    new = b"NEW-SECRET-KEY"
    try:
        luks.add_keyslot(image, existing_key=KEY, new_key=new, slot=1)
        luks.check_key(image, key=new, key_slot=1)
        luks.volume_key(image, key=new, key_slot=1).clear()
    finally:
        log.close()
    logged = log_file.read_text()
    # luksAddKey always runs the binary; check_key and volume_key only with mode=cli.
    assert logged.count("<7>pystate: run: cryptsetup") == (3 if mode == "cli" else 1)
    assert logged.count("<7>pystate: libcryptsetup: ") == (0 if mode == "cli" else 6)
    assert "NEW-SECRET" not in logged
    assert "--new-keyfile /dev/fd/" in logged and "--key-file=-" in logged


# --- secret ----------------------------------------------------------------------------------


def test_secret_wipes_in_place() -> None:
    buf = bytearray(b"key material")
    view = memoryview(buf)  # proves the same storage is overwritten
    secret = Secret(buf)
    assert secret.value is buf
    assert repr(secret) == "<Secret: 12 bytes>"
    view.release()
    with secret as s:
        assert len(s) == 12
    assert buf == bytearray() and len(secret) == 0

    buf = bytearray(b"abc")
    with memoryview(buf) as view:
        buf[:] = bytes(3)  # what wipe() does first: same length, same storage
        assert bytes(view) == bytes(3)
    with Secret.random(32) as random_secret:
        assert len(random_secret.value) == 32
    assert len(random_secret) == 0


def test_secret_copies_immutable_input() -> None:
    data = b"immutable"
    with Secret(data) as secret:
        assert secret.value == bytearray(data)
    assert data == b"immutable"


def test_errors_are_pystate_errors() -> None:
    for cls in (luks.BadKey, luks.NoKeyslot, luks.NotLuks):
        assert issubclass(cls, luks.LuksError)
    assert issubclass(luks.LuksError, PystateError)


def test_parse_volume_key_dump_reads_only_length() -> None:
    buffer = bytearray(DUMP) + b"ff ff ff" + bytes(100)  # beyond length: ignored
    key = luks.parse_volume_key_dump(buffer, length=len(DUMP))
    assert key == bytes.fromhex("0123456789abcdef")
    with pytest.raises(luks.LuksError, match="shorter volume key"):
        luks.parse_volume_key_dump(buffer, length=len(DUMP) - 4)
