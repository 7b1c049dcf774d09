"""The TPM2 side of the seal, pure: PCR banks and selections, the PolicyPCR digest, the
PCR 15 volume measurement, the TSS2 PEM that tpm2_load reads, and the error types.

system/tpm2.py runs tpm2-tools with these; the token (token.py) stores a ``SealedKey``.
docs/tpm2.md explains each choice.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from pystate_initrd.errors import PystateError

# bank name -> (TPM_ALG_ID, digest size, constructor). hashlib.shaNNN, not
# hashlib.new(): the initrd has no _hashlib (OpenSSL); Debian's python has the
# _sha1/_sha256/_sha512 modules built in.
_BANKS: dict[str, tuple[int, int, Callable[..., hashlib._Hash]]] = {
    "sha1": (0x0004, 20, hashlib.sha1),
    "sha256": (0x000B, 32, hashlib.sha256),
    "sha384": (0x000C, 48, hashlib.sha384),
    "sha512": (0x000D, 64, hashlib.sha512),
}
BANKS = tuple(_BANKS)
# The policy session's hash (and the sealed object's nameAlg) is always sha256,
# whatever the PCR bank: `tpm2_unseal -p pcr:` opens a sha256 session.
POLICY_HASH_SIZE = 32
TPM_CC_POLICY_PCR = 0x0000017F
PCR_COUNT = 24
PCR_VOLUME = 15
PRIMARY_ALG = "ecc"
_TPM_RH_OWNER = 0x40000001
# The TCG's persistent storage root key handle (TCG TPM v2.0 Provisioning Guidance; systemd
# >= 254 and Windows keep their SRK there): the only persistent parent pystate uses.
SRK_HANDLE = 0x81000001
NAME_SIZE = 2 + 32  # a sha256 object's name: nameAlg ‖ sha256(TPMT_PUBLIC)

# TPMA_OBJECT bits (TPM 2.0 Part 2, 8.3)
_FIXED_TPM = 1 << 1
_FIXED_PARENT = 1 << 4
_SENSITIVE_DATA_ORIGIN = 1 << 5
_USER_WITH_AUTH = 1 << 6
_NO_DA = 1 << 10
_RESTRICTED = 1 << 16
_DECRYPT = 1 << 17
_SIGN = 1 << 18
_ADMIN_WITH_POLICY = 1 << 7
_SRK_REQUIRED = {
    _FIXED_TPM: "fixedtpm",
    _FIXED_PARENT: "fixedparent",
    _SENSITIVE_DATA_ORIGIN: "sensitivedataorigin",
    _USER_WITH_AUTH: "userwithauth",
    _NO_DA: "noda",
    _RESTRICTED: "restricted",
    _DECRYPT: "decrypt",
}
_TPM_ALG_RSA, _TPM_ALG_ECC, _TPM_ALG_SHA256 = 0x0001, 0x0023, 0x000B
_TPM_ALG_KEYEDHASH, _TPM_ALG_AES, _TPM_ALG_CFB, _TPM_ALG_NULL = 0x0008, 0x0006, 0x0043, 0x0010
_TPM_ECC_NIST_P256 = 0x0003
# The parent tpm2-tools makes (`tpm2_createprimary -C o -g sha256 -G ecc256:aes128cfb -a
# fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|decrypt|noda`) and the
# sealed object's attributes (`tpm2_create -a fixedtpm|fixedparent|adminwithpolicy|noda`).
PRIMARY_OBJECT_ATTRIBUTES = (
    _FIXED_TPM | _FIXED_PARENT | _SENSITIVE_DATA_ORIGIN | _USER_WITH_AUTH | _RESTRICTED
    | _DECRYPT | _NO_DA
)  # fmt: skip
SEALED_OBJECT_ATTRIBUTES = _FIXED_TPM | _FIXED_PARENT | _ADMIN_WITH_POLICY | _NO_DA


class Tpm2Error(PystateError):
    """A TPM2 operation failed; `kind` says how (subclasses for the ones that matter)."""

    kind = "tpm2"


class NoTpm(Tpm2Error):
    """No TPM answers on the TCTI (device missing, socket refused, tools absent)."""

    kind = "no-tpm"


class PcrMismatch(Tpm2Error):
    """The PCR policy check failed: the PCRs differ from those sealed to."""

    kind = "pcr-mismatch"


class BadBlob(Tpm2Error):
    """The sealed blob is malformed or does not belong to this TPM."""

    kind = "bad-blob"


class DaLockout(Tpm2Error):
    """The TPM is in dictionary-attack lockout (TPM_RC_LOCKOUT) and refuses authorizations
    with DA-protected objects: not a PCR change, and nothing pystate's own noda objects
    should ever meet (docs/tpm2.md, "Dictionary-attack lockout")."""

    kind = "da-lockout"


class TpmBusy(Tpm2Error):
    """The TPM kept answering TPM_RC_RETRY, _YIELDED or _TESTING (self test still running)
    after tpm2-tss resubmitted the command."""

    kind = "tpm-busy"


@dataclass(frozen=True)
class LoggedEvent:
    """One firmware event-log entry as the token records it (formats/pcr_diagnosis.py)."""

    type: int  # TCG event type, e.g. 0x80000001 EV_EFI_VARIABLE_DRIVER_CONFIG
    name: str  # the UEFI variable's name, an action's text, or ""
    digest: bytes  # the event's digest in the key's bank


@dataclass(frozen=True)
class PcrLog:
    """The firmware events that made one sealed PCR value: `count` in all, the first
    `len(events)` of them recorded (the token caps their number)."""

    pcr: int
    count: int
    events: tuple[LoggedEvent, ...]

    @property
    def complete(self) -> bool:
        return self.count == len(self.events)


@dataclass(frozen=True)
class SealedKey:
    """A sealed secret as stored in the `pystate-tpm2` token.

    `pcr_values` (PCR -> value at sealing, for the measured PCRs of the policy: without
    PCR 15 when `pcr15_zero`) and `pcr_logs` are for diagnosing a refusal; None / () in
    tokens written before pystate recorded them.
    """

    public: bytes  # TPM2B_PUBLIC, with its 2-byte size
    private: bytes  # TPM2B_PRIVATE, with its 2-byte size
    bank: str
    pcrs: tuple[int, ...]  # sorted, unique; includes 15 when pcr15_zero
    policy_hash: bytes  # sha256 PolicyPCR digest, the object's authPolicy
    pcr15_zero: bool  # PCR 15 sealed as all zeros, the volume measured into it
    primary_alg: str = PRIMARY_ALG
    # The parent that sealed it: None = the transient ECC primary (every token before issue
    # 13), SRK_HANDLE = the persistent SRK. parent_name = the parent's TPM name at sealing,
    # which the salted session's key must have at unseal (None in older tokens: not checked).
    parent: int | None = None
    parent_name: bytes | None = None
    pcr_values: tuple[tuple[int, bytes], ...] | None = None  # sorted by PCR
    pcr_logs: tuple[PcrLog, ...] = ()  # sorted by PCR, a subset of pcr_values' PCRs

    @property
    def measured_pcrs(self) -> tuple[int, ...]:
        """The policy's PCRs whose sealed value was read from the TPM (not PCR 15 = zero)."""
        return tuple(i for i in self.pcrs if not (self.pcr15_zero and i == PCR_VOLUME))

    def policy_values(self) -> dict[int, bytes] | None:
        """Every PCR value of the policy (PCR 15 = zero included), if they were recorded."""
        if self.pcr_values is None:
            return None
        values = dict(self.pcr_values)
        if self.pcr15_zero:
            values[PCR_VOLUME] = bytes(bank_digest_size(self.bank))
        return values

    @property
    def pcr_spec(self) -> str:
        """The tpm2-tools PCR selection, e.g. `sha256:7,15`."""
        return pcr_selection(self.bank, self.pcrs)


def bank_digest_size(bank: str) -> int:
    """Digest size of a PCR bank; Tpm2Error for an unknown bank."""
    try:
        return _BANKS[bank][1]
    except KeyError:
        raise Tpm2Error(f"unknown PCR bank {bank!r} (expected one of {', '.join(BANKS)})") from None


def bank_alg_id(bank: str) -> int:
    """TPM_ALG_ID of a PCR bank (sha256: 0x000b); Tpm2Error for an unknown bank."""
    bank_digest_size(bank)
    return _BANKS[bank][0]


def bank_of_alg(alg: int) -> str | None:
    """The bank name of a TPM_ALG_ID, None when pystate does not know it."""
    return next((name for name, (a, _, _) in _BANKS.items() if a == alg), None)


def extend_value(bank: str, old: bytes, digest: bytes) -> bytes:
    """What a PCR of bank holds after extending `old` with `digest`: H(old ‖ digest)."""
    size = bank_digest_size(bank)
    if len(old) != size or len(digest) != size:
        raise Tpm2Error(f"PCR extend of {len(old)}/{len(digest)} bytes in {bank} needs {size}")
    return _BANKS[bank][2](old + digest).digest()


def pcr_selection(bank: str, pcrs: Sequence[int]) -> str:
    """`bank:i,j` for tpm2-tools, after validating bank and indices."""
    bank_digest_size(bank)
    indices = check_pcrs(pcrs)
    return f"{bank}:{','.join(str(i) for i in indices)}"


def check_pcrs(pcrs: Sequence[int]) -> tuple[int, ...]:
    for i in pcrs:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < PCR_COUNT:
            raise Tpm2Error(f"invalid PCR index {i!r} (expected 0-{PCR_COUNT - 1})")
    if len(set(pcrs)) != len(pcrs):
        raise Tpm2Error(f"duplicate PCR index in {list(pcrs)}")
    if not pcrs:
        raise Tpm2Error("empty PCR selection")
    return tuple(sorted(pcrs))


def policy_pcr_digest(bank: str, pcr_values: Mapping[int, bytes]) -> bytes:
    """The sha256 policy digest of a trial PolicyPCR over `pcr_values` of `bank`.

    digest = sha256(0^32 ‖ TPM_CC_PolicyPCR ‖ TPML_PCR_SELECTION ‖ pcrDigest) with
    pcrDigest = sha256(the values concatenated in ascending PCR order) and the
    selection one TPMS_PCR_SELECTION (hash alg, sizeofSelect 3, bitmap).
    """
    size = bank_digest_size(bank)
    alg = _BANKS[bank][0]
    indices = check_pcrs(list(pcr_values))
    bitmap = bytearray(3)
    concat = bytearray()
    for i in indices:
        value = pcr_values[i]
        if len(value) != size:
            raise Tpm2Error(f"PCR {i} value has {len(value)} bytes, {bank} needs {size}")
        bitmap[i // 8] |= 1 << (i % 8)
        concat += value
    selection = (1).to_bytes(4, "big") + alg.to_bytes(2, "big") + b"\x03" + bytes(bitmap)
    pcr_digest = hashlib.sha256(concat).digest()
    return hashlib.sha256(
        bytes(POLICY_HASH_SIZE) + TPM_CC_POLICY_PCR.to_bytes(4, "big") + selection + pcr_digest
    ).digest()


def measure_volume(volume_key: bytes | bytearray, luks_uuid: str) -> bytes:
    """HMAC-SHA256 keyed by the volume key over `pystate:<luks uuid>` (SPEC §5).

    The UUID is the canonical 8-4-4-4-12 form, lowercased, as cryptsetup prints it.
    """
    if not volume_key:
        raise Tpm2Error("empty volume key, refusing to measure")
    uuid = luks_uuid.lower()
    parts = uuid.split("-")
    if [len(p) for p in parts] != [8, 4, 4, 4, 12] or not all(
        c in "0123456789abcdef" for p in parts for c in p
    ):
        raise Tpm2Error(f"invalid LUKS UUID {luks_uuid!r}")
    return hmac.new(volume_key, f"pystate:{uuid}".encode(), hashlib.sha256).digest()


def volume_measurement(volume_key: bytes | bytearray, luks_uuid: str, bank: str) -> bytes:
    """What is extended into PCR 15 of bank: measure_volume's HMAC, hashed to the bank's
    digest size unless the bank is sha256 (SPEC §11.4)."""
    digest = measure_volume(volume_key, luks_uuid)
    size = bank_digest_size(bank)
    return digest if size == len(digest) else _BANKS[bank][2](digest).digest()


def _der(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + body


def tss2_pem(public: bytes, private: bytes) -> str:
    """The TSS2 PRIVATE KEY PEM for a blob whose parent is the owner-hierarchy primary.

    Byte for byte what `tpm2_encodeobject` writes (OID 2.23.133.10.1.3, emptyAuth
    FALSE, parent TPM2_RH_OWNER); `tpm2_load -r` then recreates the primary itself.
    """
    body = (
        _der(0x06, bytes.fromhex("6781050a0103"))
        + _der(0xA0, _der(0x01, b"\x00"))
        + _der(0x02, _TPM_RH_OWNER.to_bytes(4, "big"))
        + _der(0x04, public)
        + _der(0x04, private)
    )
    b64 = base64.b64encode(_der(0x30, body)).decode()
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return (
        "-----BEGIN TSS2 PRIVATE KEY-----\n"
        + "\n".join(lines)
        + "\n-----END TSS2 PRIVATE KEY-----\n"
    )


def object_name(public: bytes) -> bytes:
    """The TPM name of an object from its TPM2B_PUBLIC: nameAlg ‖ H_nameAlg(TPMT_PUBLIC).

    Only sha256 names (all pystate makes or accepts); BadBlob for anything else.
    """
    check_tpm2b(public, "public")
    if len(public) < 6 or int.from_bytes(public[4:6], "big") != _TPM_ALG_SHA256:
        raise BadBlob("TPM2 public area without a sha256 name algorithm")
    return public[4:6] + hashlib.sha256(public[2:]).digest()


def srk_refusal(public: bytes) -> str | None:
    """Why the public area (TPM2B_PUBLIC) read at SRK_HANDLE is no SRK for pystate, or None.

    It must be an ECC or RSA restricted decryption (storage) key that never left the TPM
    (fixedtpm|fixedparent|sensitivedataorigin: TPM2_Import cannot make fixedTPM objects, so
    nobody knows its private part), used with its (empty) password (userwithauth), exempt
    from dictionary-attack lockout (noda: else a lockout would block every unseal), sha256.
    """
    if len(public) < 10 or int.from_bytes(public[:2], "big") != len(public) - 2:
        return f"public area of {len(public)} bytes has an inconsistent size"
    kind = int.from_bytes(public[2:4], "big")
    name_alg = int.from_bytes(public[4:6], "big")
    attrs = int.from_bytes(public[6:10], "big")
    if kind not in (_TPM_ALG_ECC, _TPM_ALG_RSA):
        return f"type {kind:#06x} is not an ECC or RSA key"
    if name_alg != _TPM_ALG_SHA256:
        return f"name algorithm {name_alg:#06x} is not sha256"
    missing = [name for bit, name in _SRK_REQUIRED.items() if not attrs & bit]
    if missing:
        return f"attributes {attrs:#010x} lack {'|'.join(missing)}"
    if attrs & _SIGN:
        return f"attributes {attrs:#010x} include sign: not a storage key"
    return None


def _tpm2b(body: bytes) -> bytes:
    return len(body).to_bytes(2, "big") + body


def primary_template() -> bytes:
    """TPM2B_PUBLIC of the transient parent, marshalled: ECC NIST P-256, nameAlg sha256,
    aes128cfb for its children, null scheme and kdf, empty unique. The TPM derives the same
    key from the owner seed every time, so its name is the one the token records."""
    return _tpm2b(
        struct.pack(">HHI", _TPM_ALG_ECC, _TPM_ALG_SHA256, PRIMARY_OBJECT_ATTRIBUTES)
        + _tpm2b(b"")  # authPolicy
        + struct.pack(">HHH", _TPM_ALG_AES, 128, _TPM_ALG_CFB)  # symmetric
        # scheme, curve, kdf; then unique: empty x and y
        + struct.pack(">HHH", _TPM_ALG_NULL, _TPM_ECC_NIST_P256, _TPM_ALG_NULL)
        + _tpm2b(b"")
        + _tpm2b(b"")
    )


def sealed_template(policy: bytes) -> bytes:
    """TPM2B_PUBLIC of a sealed data object, marshalled: keyedhash, nameAlg sha256, no
    userwithauth (only a policy session satisfying `policy` unseals it), null scheme."""
    if len(policy) != POLICY_HASH_SIZE:
        raise Tpm2Error(f"policy digest of {len(policy)} bytes, sha256 needs {POLICY_HASH_SIZE}")
    return _tpm2b(
        struct.pack(">HHI", _TPM_ALG_KEYEDHASH, _TPM_ALG_SHA256, SEALED_OBJECT_ATTRIBUTES)
        + _tpm2b(policy)
        + struct.pack(">H", _TPM_ALG_NULL)  # TPMT_KEYEDHASH_SCHEME
        + _tpm2b(b"")  # unique
    )


def pcr_select(pcrs: Sequence[int]) -> bytes:
    """The 3-byte PCR bitmap of a TPMS_PCR_SELECTION (PCR i is bit i % 8 of byte i // 8)."""
    bitmap = bytearray(PCR_COUNT // 8)
    for i in check_pcrs(pcrs):
        bitmap[i // 8] |= 1 << (i % 8)
    return bytes(bitmap)


def check_tpm2b(blob: bytes, name: str) -> bytes:
    if len(blob) < 3 or int.from_bytes(blob[:2], "big") != len(blob) - 2:
        raise BadBlob(f"TPM2 {name} blob of {len(blob)} bytes has an inconsistent size field")
    return blob
