"""tpm2.py against real tpm2-tools 5.4 and a real swtpm (no mocks).

The oracles: tpm2_createpolicy / tpm2_policypcr trial sessions for the policy
digest, tpm2_encodeobject for the TSS2 PEM, openssl for the HMAC, the TPM itself
for seal/unseal/refusal.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import swtpm as swtpm_helper
from swtpm import Swtpm, needs_swtpm

from pystate_initrd.formats import tpm2_policy
from pystate_initrd.formats.tpm2_policy import (
    BadBlob,
    DaLockout,
    NoTpm,
    PcrMismatch,
    SealedKey,
    Tpm2Error,
    TpmBusy,
)
from pystate_initrd.system import run as run_module
from pystate_initrd.system import tpm2

REPO = Path(__file__).resolve().parent.parent
pytestmark = needs_swtpm
swtpm = swtpm_helper.swtpm  # the fixtures: one emulator per module, power-cycled per test
tpm = swtpm_helper.tpm_both  # every test against swtpm: ESAPI and tpm2-tools
tpm_cli = swtpm_helper.tpm_cli
SECRET = bytes(range(1, 33))


def tools(argv: Sequence[str], tcti: str, **kw: object) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "TPM2TOOLS_TCTI": tcti}
    return subprocess.run(list(argv), env=env, check=True, capture_output=True, **kw)  # type: ignore[call-overload]


@pytest.fixture
def spawns(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records the basename of every command run through pystate's runner."""
    calls: list[str] = []
    real = run_module.run

    def counting(argv: Sequence[str], **kw: object) -> run_module.Completed:
        calls.append(argv[0])
        return real(argv, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(run_module, "run", counting)
    return calls


# ------------------------------------------------------------ pure: digests


def values_for(bank: str, pcrs: Sequence[int]) -> dict[int, bytes]:
    size = tpm2_policy.bank_digest_size(bank)
    return {i: hashlib.sha512(f"{bank}{i}".encode()).digest()[:size] for i in pcrs}


DIGEST_CASES = [
    ("sha256", [7]),
    ("sha256", [7, 15]),
    ("sha256", [0, 2, 4, 7, 15, 23]),
    ("sha1", [7, 15]),
    ("sha384", [1, 8, 16]),
    ("sha512", [23]),
]


@pytest.mark.parametrize(("bank", "pcrs"), DIGEST_CASES)
def test_policy_digest_matches_createpolicy(tpm: Swtpm, bank: str, pcrs: list[int]) -> None:
    values = values_for(bank, pcrs)
    work = Path(tpm.dir)
    (work / "pcrs.bin").write_bytes(b"".join(values[i] for i in sorted(pcrs)))
    tools(
        ["tpm2_createpolicy", "--policy-pcr", "-l", tpm2_policy.pcr_selection(bank, pcrs),
         "-f", str(work / "pcrs.bin"), "-L", str(work / "policy")],
        tpm.tcti,
    )  # fmt: skip
    assert tpm2_policy.policy_pcr_digest(bank, values) == (work / "policy").read_bytes()


def test_policy_digest_matches_policypcr_trial_session(tpm: Swtpm) -> None:
    """The three-step form the issue names: startauthsession, policypcr -f, flush."""
    values = values_for("sha256", [7, 15])
    values[15] = bytes(32)
    work = Path(tpm.dir)
    (work / "pcrs.bin").write_bytes(values[7] + values[15])
    tools(["tpm2_startauthsession", "-S", str(work / "session")], tpm.tcti)
    tools(
        ["tpm2_policypcr", "-S", str(work / "session"), "-l", "sha256:7,15",
         "-f", str(work / "pcrs.bin"), "-L", str(work / "policy")],
        tpm.tcti,
    )  # fmt: skip
    tools(["tpm2_flushcontext", str(work / "session")], tpm.tcti)
    assert tpm2_policy.policy_pcr_digest("sha256", values) == (work / "policy").read_bytes()


@pytest.mark.parametrize(
    ("bank", "values", "error"),
    [
        ("md5", {7: bytes(16)}, "unknown PCR bank"),
        ("sha256", {}, "empty PCR selection"),
        ("sha256", {24: bytes(32)}, "invalid PCR index 24"),
        ("sha256", {-1: bytes(32)}, "invalid PCR index -1"),
        ("sha256", {7: bytes(20)}, "PCR 7 value has 20 bytes, sha256 needs 32"),
        ("sha1", {7: bytes(32)}, "PCR 7 value has 32 bytes, sha1 needs 20"),
    ],
)
def test_policy_digest_refusals(bank: str, values: dict[int, bytes], error: str) -> None:
    with pytest.raises(Tpm2Error, match=error):
        tpm2_policy.policy_pcr_digest(bank, values)


def test_policy_digest_known_answer() -> None:
    # tpm2_createpolicy --policy-pcr -l sha256:7,15 with both values zero (swtpm, fresh).
    assert tpm2_policy.policy_pcr_digest("sha256", {7: bytes(32), 15: bytes(32)}).hex() == (
        "f62d13a8dfa1a3dca5b7f16214692abd321889814e17d52ab9e830623eb8f15d"
    )


# ------------------------------------------------------ pure: HMAC and PEM

MEASURE_CASES = [
    (bytes(64), "01234567-89ab-cdef-0123-456789abcdef"),
    (bytes(range(64)), "8C2C9B5E-1F0A-4E3B-9D7C-6A5B4C3D2E1F"),
    (b"\xff" * 32, "00000000-0000-0000-0000-000000000000"),
]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl missing")
@pytest.mark.parametrize(("key", "uuid"), MEASURE_CASES)
def test_measure_volume_against_openssl(key: bytes, uuid: str) -> None:
    out = subprocess.run(
        ["openssl", "dgst", "-sha256", "-mac", "HMAC", "-macopt", f"hexkey:{key.hex()}"],
        input=f"pystate:{uuid.lower()}".encode(),
        capture_output=True,
        check=True,
    ).stdout.decode()
    assert tpm2_policy.measure_volume(bytearray(key), uuid).hex() == out.split()[-1]


@pytest.mark.parametrize(
    ("key", "uuid", "error"),
    [
        (b"", "01234567-89ab-cdef-0123-456789abcdef", "empty volume key"),
        (b"k", "01234567-89ab-cdef-0123-456789abcde", "invalid LUKS UUID"),
        (b"k", "0123456789abcdef0123456789abcdef", "invalid LUKS UUID"),
        (b"k", "g1234567-89ab-cdef-0123-456789abcdef", "invalid LUKS UUID"),
    ],
)
def test_measure_volume_refusals(key: bytes, uuid: str, error: str) -> None:
    with pytest.raises(Tpm2Error, match=error):
        tpm2_policy.measure_volume(key, uuid)


UUID = "01234567-89ab-cdef-0123-456789abcdef"


def test_hashes_work_without_openssl_hashlib() -> None:
    """The initrd has no _hashlib: every bank's digest and the HMAC must still work."""
    code = (
        "import sys; sys.modules['_hashlib'] = None\n"
        "from pystate_initrd.formats import tpm2_policy\n"
        "for bank in tpm2_policy.BANKS:\n"
        "    n = tpm2_policy.bank_digest_size(bank)\n"
        "    print(tpm2_policy.policy_pcr_digest(bank, {7: bytes(n), 15: bytes(n)}).hex())\n"
        f"print(tpm2_policy.measure_volume(bytes(64), {UUID!r}).hex())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, check=True, text=True
    ).stdout.split()
    expected = [
        tpm2_policy.policy_pcr_digest(
            b,
            {7: bytes(tpm2_policy.bank_digest_size(b)), 15: bytes(tpm2_policy.bank_digest_size(b))},
        ).hex()
        for b in tpm2_policy.BANKS
    ]
    expected.append(
        tpm2_policy.measure_volume(bytes(64), "01234567-89ab-cdef-0123-456789abcdef").hex()
    )
    assert out == expected


def test_tss2_pem_matches_encodeobject(tpm: Swtpm) -> None:
    key = tpm2.seal(SECRET, pcrs=[7], pcr15_zero=False, tcti=tpm.tcti)
    work = Path(tpm.dir)
    (work / "pub").write_bytes(key.public)
    (work / "priv").write_bytes(key.private)
    tools(
        ["tpm2_createprimary", "-Q", "-C", "o", "-g", "sha256", "-G", "ecc256:aes128cfb",
         "-a", tpm2.PRIMARY_ATTRIBUTES, "-c", str(work / "primary.ctx")],
        tpm.tcti,
    )  # fmt: skip
    tools(
        ["tpm2_encodeobject", "-C", str(work / "primary.ctx"), "-u", str(work / "pub"),
         "-r", str(work / "priv"), "-o", str(work / "key.pem")],
        tpm.tcti,
    )  # fmt: skip
    assert tpm2_policy.tss2_pem(key.public, key.private) == (work / "key.pem").read_text()


# --------------------------------------------------- pure: error classification

# stderr of tpm2-tools 5.4 as captured on swtpm (source paths shortened).
POLICY_FAIL = """\
WARNING:esys:Esys_Unseal.c:295:Esys_Unseal_Finish() Received TPM Error
ERROR:esys:Esys_Unseal.c:98:Esys_Unseal() Esys Finish ErrorCode (0x0000099d)
ERROR: Esys_Unseal(0x99D) - tpm:session(1):a policy check failed
ERROR: Unable to run tpm2_unseal"""
INTEGRITY = """\
ERROR:esys:esys_tr.c:96:Esys_TR_Deserialize() Unmarshal resource object ErrorCode (0x00090006)
ERROR: Esys_TR_Deserialize(0x90006) - mu:A buffer isn't large enough
ERROR: Incorrect handle value, got: "sealed.pem", expected expected [o|p|e|n|l] or a handle number
ERROR:esys:Esys_Load.c:112:Esys_Load() Esys Finish ErrorCode (0x000001df)
ERROR: Eys_Load(0x1DF) - tpm:parameter(1):integrity check failed
ERROR: Unable to run tpm2_load"""
NO_DEVICE = """\
ERROR:tcti:tcti-device.c:452:Tss2_Tcti_Device_Init() Failed to open specified TCTI device file \
/dev/tpmrm0: No such file or directory
ERROR:tcti:tctildr-dl.c:154:tcti_from_file() Could not initialize TCTI file: device
ERROR:tcti:tctildr.c:428:Tss2_TctiLdr_Initialize_Ex() Failed to instantiate TCTI
ERROR: Could not load tcti, got: "device:/dev/tpmrm0\""""
OBJECT_MEMORY = """\
ERROR:esys:Esys_ContextLoad.c:93:Esys_ContextLoad() Esys Finish ErrorCode (0x00000902)
ERROR: Esys_ContextLoad(0x902) - tpm:warn(2.0): out of memory for object contexts"""
PCR_CHANGED = "ERROR:esys:x Esys Finish ErrorCode (0x00000128)"
MARSHAL = """\
ERROR:esys:Esys_Load.c:89:Esys_Load() Error in async function ErrorCode (0x0009000b)
ERROR: Eys_Load(0x9000B) - mu:A parameter has a bad value"""
OWNER_AUTH = """\
ERROR:esys:Esys_CreatePrimary.c:134:Esys_CreatePrimary() Esys Finish ErrorCode (0x000009a2)
ERROR: Unable to create parent using createprimary"""
LOAD_LOCKOUT = """\
WARNING:esys:src/tss2-esys/api/Esys_Load.c:324:Esys_Load_Finish() Received TPM Error
ERROR:esys:src/tss2-esys/api/Esys_Load.c:112:Esys_Load() Esys Finish ErrorCode (0x00000921)
ERROR: Eys_Load(0x921) - tpm:warn(2.0): authorizations for objects subject to DA protection are \
not allowed at this time because the TPM is in DA lockout mode
ERROR: Unable to run tpm2_load"""
UNSEAL_LOCKOUT = """\
WARNING:esys:src/tss2-esys/api/Esys_Unseal.c:295:Esys_Unseal_Finish() Received TPM Error
ERROR:esys:src/tss2-esys/api/Esys_Unseal.c:98:Esys_Unseal() Esys Finish ErrorCode (0x00000921)
ERROR: Esys_Unseal(0x921) - tpm:warn(2.0): authorizations for objects subject to DA protection \
are not allowed at this time because the TPM is in DA lockout mode
ERROR: Unable to run tpm2_unseal"""


def _warning(rc: int) -> str:
    return f"ERROR:esys:Esys_Unseal.c:98:Esys_Unseal() Esys Finish ErrorCode (0x{rc:08x})"


@pytest.mark.parametrize(
    ("step", "stderr", "kind", "fragment"),
    [
        ("load", LOAD_LOCKOUT, DaLockout, "dictionary-attack lockout"),
        ("unseal", UNSEAL_LOCKOUT, DaLockout, "TPM_RC_LOCKOUT 0x921"),
        ("createprimary", UNSEAL_LOCKOUT, DaLockout, "refused the createprimary"),
        ("unseal", _warning(0x922), TpmBusy, "TPM_RC_RETRY"),
        ("unseal", _warning(0x908), TpmBusy, "TPM_RC_YIELDED"),
        ("load", _warning(0x90A), TpmBusy, "TPM_RC_TESTING"),
        ("unseal", _warning(0x80921), Tpm2Error, "ErrorCode"),  # another layer: not the TPM's
        ("unseal", _warning(0x101), Tpm2Error, "TPM_RC_FAILURE (0x101)"),
        ("unseal", _warning(0xA000A), Tpm2Error, "stopped answering during the unseal"),
        ("unseal", POLICY_FAIL, PcrMismatch, "PCR policy check failed"),
        ("unseal", PCR_CHANGED, PcrMismatch, "PCRs changed"),
        ("load", INTEGRITY, BadBlob, "integrity check failed"),
        ("load", "ERROR: Unable to read PEM from provided BIO/file", BadBlob, "invalid"),
        ("load", NO_DEVICE, NoTpm, "/dev/tpmrm0: No such file or directory"),
        ("unseal", NO_DEVICE, NoTpm, "no TPM2 on device:/dev/tpmrm0"),
        ("unseal", OBJECT_MEMORY, Tpm2Error, "out of memory for object contexts"),
        ("load", OBJECT_MEMORY, Tpm2Error, "out of memory"),
        ("load", MARSHAL, BadBlob, "mu:A parameter has a bad value"),
        ("load", OWNER_AUTH, Tpm2Error, "Unable to create parent"),
        ("load", POLICY_FAIL, Tpm2Error, "policy check failed"),
        ("unseal", INTEGRITY, Tpm2Error, "integrity"),
        ("unseal", "", Tpm2Error, "no error output"),
    ],
)
def test_classify(step: str, stderr: str, kind: type[Tpm2Error], fragment: str) -> None:
    err = tpm2.classify(step, "device:/dev/tpmrm0", stderr, "the key")
    assert type(err) is kind
    assert fragment in str(err)
    if kind in (DaLockout, TpmBusy):
        assert "PCR" not in str(err)
    assert "device:/dev/tpmrm0" in str(err)
    assert "\n" not in str(err)


# ------------------------------------------------------- against the swtpm


def test_round_trip_and_spawn_count(tpm: Swtpm, spawns: list[str]) -> None:
    key = tpm2.seal(bytearray(SECRET), pcrs=[7], pcr15_zero=True, tcti=tpm.tcti)
    assert key.pcrs == (7, 15)
    assert key.bank == "sha256"
    assert key.primary_alg == "ecc"
    assert key.pcr15_zero
    assert key.policy_hash == tpm2_policy.policy_pcr_digest("sha256", {7: bytes(32), 15: bytes(32)})
    assert key.pcr_spec == "sha256:7,15"
    seal_calls = list(spawns)
    spawns.clear()
    start = time.monotonic()
    secret = tpm2.unseal(key, tcti=tpm.tcti)
    elapsed = time.monotonic() - start
    assert isinstance(secret, bytearray)
    assert secret == SECRET
    for i in range(len(secret)):  # what callers do (secret.wipe)
        secret[i] = 0
    assert secret == bytearray(32)
    if os.environ["PYSTATE_TPM2"] == "library":
        # ESAPI in process: no process at all, for the seal (PCR read included) and unseal.
        assert spawns == []
        assert seal_calls == []
    else:
        # swtpm has no resource manager: the salted form (tests/test_tpm2_session.py has
        # the lists); on /dev/tpmrm0 two processes, load and unseal.
        assert spawns[-3:] == ["tpm2_unseal", "tpm2_flushcontext", "tpm2_flushcontext"]
        assert seal_calls[:3] == ["tpm2_pcrread", "tpm2_createpolicy", "tpm2_readpublic"]
    print(f"unseal: {len(spawns)} processes, {elapsed * 1000:.1f} ms")


def test_no_flush_on_resource_manager() -> None:
    assert tpm2.resource_managed("device:/dev/tpmrm0")
    assert tpm2.resource_managed("tabrmd:bus_type=system")
    assert not tpm2.resource_managed("device:/dev/tpm0")
    assert not tpm2.resource_managed("swtpm:path=/tmp/x")


def loaded(tcti: str) -> list[str]:
    out = [tools(["tpm2_getcap", f"handles-{kind}"], tcti).stdout.decode() for kind in
           ("transient", "loaded-session", "saved-session")]  # fmt: skip
    return "".join(out).split()


def test_repeated_seal_unseal_leave_nothing_loaded(tpm: Swtpm) -> None:
    """swtpm has 3 object and 3 session slots and no resource manager to free them."""
    for _ in range(4):
        key = tpm2.seal(SECRET, pcrs=[7], pcr15_zero=False, tcti=tpm.tcti)
        assert loaded(tpm.tcti) == []
        assert tpm2.unseal(key, tcti=tpm.tcti) == SECRET
        assert loaded(tpm.tcti) == []


@pytest.mark.parametrize(("bank", "pcrs"), [("sha1", [0, 7]), ("sha384", [7]), ("sha512", [4])])
def test_round_trip_other_banks(tpm: Swtpm, bank: str, pcrs: list[int]) -> None:
    tpm2.pcr_extend(
        pcrs[0], bank, bytes(tpm2_policy.bank_digest_size(bank) - 1) + b"\x01", tpm.tcti
    )
    key = tpm2.seal(SECRET, pcrs=pcrs, bank=bank, pcr15_zero=True, tcti=tpm.tcti)
    assert len(key.policy_hash) == tpm2_policy.POLICY_HASH_SIZE
    assert tpm2.unseal(key, tcti=tpm.tcti) == SECRET
    tpm2.pcr_extend(pcrs[0], bank, bytes(tpm2_policy.bank_digest_size(bank)), tpm.tcti)
    with pytest.raises(PcrMismatch):
        tpm2.unseal(key, tcti=tpm.tcti)


def test_unseal_refused_after_policy_pcr_extend(tpm: Swtpm) -> None:
    key = tpm2.seal(SECRET, pcrs=[7], pcr15_zero=True, tcti=tpm.tcti)
    tools(["tpm2_pcrextend", f"7:sha256={'11' * 32}"], tpm.tcti)
    with pytest.raises(PcrMismatch) as info:
        tpm2.unseal(key, tcti=tpm.tcti)
    assert tpm.tcti in str(info.value)
    assert "sha256:7,15" in str(info.value)
    assert info.value.kind == "pcr-mismatch"


def test_unseal_ignores_unselected_pcr(tpm: Swtpm) -> None:
    key = tpm2.seal(SECRET, pcrs=[7], pcr15_zero=True, tcti=tpm.tcti)
    tools(["tpm2_pcrextend", f"8:sha256={'11' * 32}"], tpm.tcti)
    assert tpm2.unseal(key, tcti=tpm.tcti) == SECRET


def test_pcr15_measurement_blocks_unseal(tpm: Swtpm) -> None:
    key = tpm2.seal(SECRET, pcrs=[7], pcr15_zero=True, tcti=tpm.tcti)
    secret = tpm2.unseal(key, tcti=tpm.tcti)
    measurement = tpm2_policy.measure_volume(bytes(64), "01234567-89ab-cdef-0123-456789abcdef")
    tpm2.pcr_extend(15, "sha256", measurement, tpm.tcti)
    assert (
        tpm2.pcr_read("sha256", [15], tpm.tcti)[15]
        == hashlib.sha256(bytes(32) + measurement).digest()
    )
    with pytest.raises(PcrMismatch):
        tpm2.unseal(key, tcti=tpm.tcti)
    assert secret == SECRET


def test_reseal_after_pcr15_extend_expects_zero(tpm: Swtpm) -> None:
    """A re-seal after a recovery unlock (PCR 15 already extended) targets the next boot."""
    tools(["tpm2_pcrextend", f"7:sha256={'07' * 32}"], tpm.tcti)
    tpm2.pcr_extend(15, "sha256", b"\x15" * 32, tpm.tcti)
    key = tpm2.seal(SECRET, pcrs=[7], pcr15_zero=True, tcti=tpm.tcti)
    assert tpm2.pcr_read("sha256", [15], tpm.tcti)[15] != bytes(32)
    with pytest.raises(PcrMismatch):
        tpm2.unseal(key, tcti=tpm.tcti)
    tpm.restart()  # next boot: PCR 15 back to zero, PCR 7 measured the same way again
    tools(["tpm2_pcrextend", f"7:sha256={'07' * 32}"], tpm.tcti)
    assert tpm2.unseal(key, tcti=tpm.tcti) == SECRET


def test_seal_without_pcr15_follows_current_value(tpm: Swtpm) -> None:
    tpm2.pcr_extend(15, "sha256", b"\x15" * 32, tpm.tcti)
    key = tpm2.seal(SECRET, pcrs=[7, 15], pcr15_zero=False, tcti=tpm.tcti)
    assert not key.pcr15_zero
    assert tpm2.unseal(key, tcti=tpm.tcti) == SECRET


def corrupt(blob: bytes, offset: int) -> bytes:
    b = bytearray(blob)
    b[offset] ^= 0x01
    return bytes(b)


def test_bad_blobs(tpm: Swtpm) -> None:
    key = tpm2.seal(SECRET, pcrs=[7], pcr15_zero=True, tcti=tpm.tcti)
    other = tpm2.seal(b"x" * 32, pcrs=[7], pcr15_zero=True, tcti=tpm.tcti)
    bad = [
        SealedKey(**{**key.__dict__, "private": corrupt(key.private, 40)}),
        SealedKey(**{**key.__dict__, "private": corrupt(key.private, len(key.private) - 1)}),
        SealedKey(**{**key.__dict__, "public": corrupt(key.public, 2)}),  # type: unmarshal
        SealedKey(**{**key.__dict__, "public": corrupt(key.public, 8)}),  # reserved attribute
        SealedKey(**{**key.__dict__, "public": corrupt(key.public, 20)}),  # the authPolicy
        SealedKey(**{**key.__dict__, "public": other.public}),
        SealedKey(**{**key.__dict__, "private": key.private[:-1]}),  # size field mismatch
        SealedKey(**{**key.__dict__, "private": b"\x00\x00"}),
        SealedKey(**{**key.__dict__, "primary_alg": "rsa"}),
    ]
    for k in bad:
        with pytest.raises(BadBlob) as info:
            tpm2.unseal(k, tcti=tpm.tcti)
        assert "\n" not in str(info.value)
    assert tpm2.unseal(key, tcti=tpm.tcti) == SECRET  # and nothing leaked a slot


def test_blob_of_another_tpm_is_bad(tpm: Swtpm) -> None:
    stranger = Swtpm()
    try:
        stranger.start()
        key = tpm2.seal(SECRET, pcrs=[7], pcr15_zero=True, tcti=stranger.tcti)
    finally:
        stranger.cleanup()
    with pytest.raises(BadBlob, match="parent key whose name is not the one recorded"):
        tpm2.unseal(key, tcti=tpm.tcti)
    # A token without the name (before issue 13): the TPM itself refuses the blob.
    old = SealedKey(**{**key.__dict__, "parent_name": None})
    with pytest.raises(BadBlob, match="integrity check failed"):
        tpm2.unseal(old, tcti=tpm.tcti)


@pytest.mark.parametrize(
    "tcti",
    ["swtpm:path=/nonexistent/sock", "device:/nonexistent/tpmrm0"],
)
def test_no_tpm(tcti: str) -> None:
    assert not tpm2.tpm_present(tcti)
    key = SealedKey(
        public=b"\x00\x01\x00", private=b"\x00\x01\x00", bank="sha256", pcrs=(7,),
        policy_hash=bytes(32), pcr15_zero=False,
    )  # fmt: skip
    with pytest.raises(NoTpm, match=f"no TPM2 on {tcti}"):
        tpm2.unseal(key, tcti=tcti)
    with pytest.raises(NoTpm):
        tpm2.seal(SECRET, pcrs=[7], pcr15_zero=True, tcti=tcti)
    with pytest.raises(NoTpm):
        tpm2.pcr_read("sha256", [7], tcti)


def test_an_initrd_without_esapi_or_tools_says_why_esapi_did_not_load(
    swtpm: Swtpm, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The dracut module copies tpm2-tss's libraries, not tpm2-tools: where a library is
    missing after all (a distributor's own initrd), the error names the library, not only
    the fallback's missing binary. Both faults are real: a dlopen() of a name that does not
    exist, and a PATH without tpm2-tools."""
    from pystate_initrd.system import esys
    from pystate_initrd.system import run as run_module

    monkeypatch.delenv("PYSTATE_TPM2", raising=False)  # auto: ESAPI, else tpm2-tools
    monkeypatch.setitem(esys.LIBRARIES, "rc", "libtss2-rc.so.999")
    esys._load.cache_clear()
    monkeypatch.setitem(run_module._BASE_ENV, "PATH", str(tmp_path))
    try:
        with pytest.raises(NoTpm) as info:
            tpm2.pcr_read("sha256", [7], swtpm.tcti)
    finally:
        esys._load.cache_clear()
    message = str(info.value)
    assert "tpm2_pcrread not found" in message
    assert "cannot load tpm2-tss's ESAPI" in message and "libtss2-rc.so.999" in message


@pytest.mark.parametrize("mode", ["library", "cli"])
def test_no_tpm_dead_port(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYSTATE_TPM2", mode)
    dead = Swtpm(tcp=True)
    try:
        dead.start()
        tcti = dead.tcti
        assert tpm2.pcr_read("sha256", [7], tcti) == {7: bytes(32)}  # TCP TCTI works
    finally:
        dead.cleanup()
    # tpm2-tools print the TCTI's reason; ESAPI's is in the library's (silenced) log.
    reason = "IO failure" if os.environ["PYSTATE_TPM2"] == "library" else "Connection refused"
    with pytest.raises(NoTpm, match=reason):
        tpm2.pcr_read("sha256", [7], tcti)


def test_tpm_present(swtpm: Swtpm) -> None:
    assert tpm2.tpm_present(swtpm.tcti)
    assert tpm2.tpm_present("device:/dev/null")
    assert tpm2.tpm_present(None) == os.path.exists("/dev/tpmrm0")


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"secret": b"", "pcrs": [7]}, "secret of 0 bytes"),
        ({"secret": bytes(129), "pcrs": [7]}, "secret of 129 bytes"),
        ({"secret": SECRET, "pcrs": [7, 7]}, "duplicate PCR"),
        ({"secret": SECRET, "pcrs": [24]}, "invalid PCR index 24"),
        ({"secret": SECRET, "pcrs": [7], "bank": "sm3_256"}, "unknown PCR bank"),
    ],
)
def test_seal_refusals(kwargs: dict[str, object], error: str) -> None:
    with pytest.raises(Tpm2Error, match=error):
        tpm2.seal(pcr15_zero=True, tcti="swtpm:path=/nonexistent", **kwargs)  # type: ignore[arg-type]


def test_pcr_extend_refuses_wrong_size() -> None:
    with pytest.raises(Tpm2Error, match="needs 32"):
        tpm2.pcr_extend(15, "sha256", bytes(20), "swtpm:path=/nonexistent")


def test_work_files_on_tmpfs_and_removed(tpm: Swtpm) -> None:
    before = set(os.listdir("/dev/shm"))
    key = tpm2.seal(SECRET, pcrs=[7], pcr15_zero=True, tcti=tpm.tcti)
    tpm2.unseal(key, tcti=tpm.tcti)
    assert set(os.listdir("/dev/shm")) == before


def test_da_lockout_for_real(monkeypatch: pytest.MonkeyPatch) -> None:
    """A TPM really in dictionary-attack lockout: what pystate reports, and what still works.

    Own swtpm: the lockout is persistent state, a power cycle does not clear it.
    """
    emu = Swtpm()
    try:
        emu.start()
        tcti, work = emu.tcti, emu.dir

        def da_state() -> tuple[int, int]:
            out = tools(["tpm2_getcap", "properties-variable"], tcti).stdout.decode()
            props = dict(ln.split(":", 1) for ln in out.splitlines() if ":" in ln)
            return int(props["  inLockout"]), int(props["TPM2_PT_LOCKOUT_COUNTER"], 16)

        key = tpm2.seal(SECRET, pcrs=[7], pcr15_zero=True, tcti=tcti)
        with monkeypatch.context() as m:  # a policy-only sealed object without noda
            m.setenv("PYSTATE_TPM2", "cli")  # the attributes are tpm2-tools' argument here
            m.setattr(tpm2, "SEALED_ATTRIBUTES", "fixedtpm|fixedparent|adminwithpolicy")
            key_da = tpm2.seal(SECRET, pcrs=[7], pcr15_zero=True, tcti=tcti)
        # A DA-protected storage parent (no noda, empty password) and a child with a password.
        tools(
            ["tpm2_createprimary", "-Q", "-C", "o", "-g", "sha256", "-G", "ecc256:aes128cfb",
             "-a", tpm2.PRIMARY_ATTRIBUTES.replace("|noda", ""), "-c", str(work / "da.ctx")],
            tcti,
        )  # fmt: skip
        tools(
            ["tpm2_create", "-Q", "-C", str(work / "da.ctx"), "-p", "good", "-i", "-",
             "-u", str(work / "c.pub"), "-r", str(work / "c.priv")],
            tcti, input=b"password-protected",
        )  # fmt: skip
        tools(["tpm2_flushcontext", "-t"], tcti)
        load = ["tpm2_load", "-Q", "-C", str(work / "da.ctx"), "-u", str(work / "c.pub"),
                "-r", str(work / "c.priv"), "-c", str(work / "c.ctx")]  # fmt: skip
        tools(load, tcti)
        tools(["tpm2_flushcontext", "-t"], tcti)
        tools(["tpm2_dictionarylockout", "-s", "-n", "1", "-t", "600", "-l", "600"], tcti)
        # A PCR policy failure does not count, even for an object without noda.
        tools(["tpm2_pcrextend", f"7:sha256={'11' * 32}"], tcti)
        for _ in range(2):
            with pytest.raises(PcrMismatch):
                tpm2.unseal(key_da, tcti=tcti)
        assert da_state() == (0, 0)
        # One wrong password: maxTries 1, so lockout.
        failed = subprocess.run(
            ["tpm2_unseal", "-c", str(work / "c.ctx"), "-p", "wrong"],
            env={**os.environ, "TPM2TOOLS_TCTI": tcti}, capture_output=True, check=False,
        )  # fmt: skip
        assert b"0x98E" in failed.stderr
        tools(["tpm2_flushcontext", "-t"], tcti)
        assert da_state() == (1, 1)

        with pytest.raises(DaLockout) as info:
            tpm2._tool(load, tcti, step="load", what="the DA-protected child")
        assert "PCR" not in str(info.value)
        assert info.value.kind == "da-lockout"
        tools(["tpm2_flushcontext", "-t"], tcti)
        with pytest.raises(DaLockout, match="TPM_RC_LOCKOUT 0x921"):
            tpm2._tool(
                ["tpm2_unseal", "-c", str(work / "c.ctx"), "-p", "good"],
                tcti, step="unseal", what="the child",
            )  # fmt: skip
        tools(["tpm2_flushcontext", "-t"], tcti)

        # pystate's objects (noda, policy-only) and its primary (owner hierarchy) still work:
        # the TPM is reset to PCR 7 = 0 by a power cycle, which keeps the lockout.
        emu.restart()
        assert da_state()[0] == 1
        assert tpm2.unseal(key, tcti=tcti) == SECRET
        assert tpm2.unseal(key_da, tcti=tcti) == SECRET  # lockout gates authValue, not policy
        again = tpm2.seal(SECRET, pcrs=[7], pcr15_zero=True, tcti=tcti)
        assert tpm2.unseal(again, tcti=tcti) == SECRET
        assert da_state()[0] == 1
        tools(["tpm2_dictionarylockout", "--clear-lockout"], tcti)
        assert da_state() == (0, 0)
    finally:
        emu.cleanup()
