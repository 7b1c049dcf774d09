"""TPM2 sealing of the volume secret with tpm2-tools (SPEC §5, §10).

Pure parts (no I/O): `policy_pcr_digest`, `measure_volume`, `tss2_pem`, error
classification. I/O parts run tpm2-tools through `run.run` with the TCTI in
`TPM2TOOLS_TCTI`; secrets go to `tpm2_create` on stdin and come back from
`tpm2_unseal` on stdout, never through argv or a file.

Objects (docs/tpm2.md explains each choice):
- parent: the primary key tpm2-tools itself creates for a TSS2 PEM key whose
  parent is the owner hierarchy (lib/object.c, `primary_ecc_template`): ECC
  NIST P-256, nameAlg sha256, aes128cfb, null scheme and kdf, empty unique,
  fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|decrypt|noda.
  Deterministic: the same owner seed and template give the same key at every
  boot, so nothing is stored in the TPM's NV.
- sealed object: keyedhash, nameAlg sha256, fixedtpm|fixedparent|adminwithpolicy
  |noda, no userwithauth: only a policy session satisfying PolicyPCR unseals it.

Unseal is two tpm2-tools processes: `tpm2_load -r <TSS2 PEM>` (creates the
primary and loads the blob in one process) and `tpm2_unseal -p pcr:…` (runs the
policy session itself). On a TCTI without a resource manager (swtpm, /dev/tpm0)
a third, `tpm2_flushcontext -t`, frees the transient object slots.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pystate_initrd.errors import PystateError
from pystate_initrd.system import run as _run

DEFAULT_TCTI = "device:/dev/tpmrm0"

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
MAX_SECRET = 128  # MAX_SYM_DATA: the largest sealed data object
PRIMARY_ALG = "ecc"
PRIMARY_ATTRIBUTES = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|decrypt|noda"
SEALED_ATTRIBUTES = "fixedtpm|fixedparent|adminwithpolicy|noda"
_TPM_RH_OWNER = 0x40000001
_WORK_PARENTS = ("/dev/shm", "/run")


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


@dataclass(frozen=True)
class SealedKey:
    """A sealed secret as stored in the `pystate-tpm2` token."""

    public: bytes  # TPM2B_PUBLIC, with its 2-byte size
    private: bytes  # TPM2B_PRIVATE, with its 2-byte size
    bank: str
    pcrs: tuple[int, ...]  # sorted, unique; includes 15 when pcr15_zero
    policy_hash: bytes  # sha256 PolicyPCR digest, the object's authPolicy
    pcr15_zero: bool  # PCR 15 sealed as all zeros, the volume measured into it
    primary_alg: str = PRIMARY_ALG

    @property
    def pcr_spec(self) -> str:
        """The tpm2-tools PCR selection, e.g. `sha256:7,15`."""
        return pcr_selection(self.bank, self.pcrs)


# ---------------------------------------------------------------- pure parts


def bank_digest_size(bank: str) -> int:
    """Digest size of a PCR bank; Tpm2Error for an unknown bank."""
    try:
        return _BANKS[bank][1]
    except KeyError:
        raise Tpm2Error(f"unknown PCR bank {bank!r} (expected one of {', '.join(BANKS)})") from None


def pcr_selection(bank: str, pcrs: Sequence[int]) -> str:
    """`bank:i,j` for tpm2-tools, after validating bank and indices."""
    bank_digest_size(bank)
    indices = _check_pcrs(pcrs)
    return f"{bank}:{','.join(str(i) for i in indices)}"


def _check_pcrs(pcrs: Sequence[int]) -> tuple[int, ...]:
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
    indices = _check_pcrs(list(pcr_values))
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


def _tpm_rc(stderr: str) -> tuple[int, str] | None:
    """The last response code tpm2-tools reports (`… Esys_Load() … ErrorCode (0x000001df)`)
    and the function that got it."""
    marker = "ErrorCode (0x"
    pos = stderr.rfind(marker)
    if pos < 0:
        return None
    try:
        rc = int(stderr[pos + len(marker) : pos + len(marker) + 8], 16)
    except ValueError:
        return None
    line_start = stderr.rfind("\n", 0, pos) + 1
    return rc, stderr[line_start:pos]


def _is_policy_failure(rc: int) -> bool:
    """TPM_RC_POLICY_FAIL (format 1, any session) or TPM_RC_PCR_CHANGED."""
    rc &= 0xFFF
    return (rc & 0x80 and rc & 0x3F == 0x1D) or rc == 0x128


def _reason(stderr: str) -> str:
    """tpm2-tools' own one-line reason: its last `ERROR: X(0x…) - …` line, or the last line.

    The last: `tpm2_load -r key.pem` first tries the PEM as a context file and logs that
    failure (`Esys_TR_Deserialize(0x90006)`) even when it then loads the PEM.
    """
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("ERROR: ") and "(0x" in ln and " - " in ln:
            return ln[len("ERROR: ") :]
    return lines[-1] if lines else "no error output"


# What tpm2_load prints when the PEM's blobs do not even parse.
_BLOB_PARSE_ERRORS = (
    "Unable to read PEM",
    "Error deserializing",
    "Invalid public and private in TSS PEM",
)


def classify(step: str, tcti: str, stderr: str, what: str) -> Tpm2Error:
    """The typed error for a failed tpm2-tools call (pure, table-tested)."""
    reason = _reason(stderr)
    if "Could not load tcti" in stderr or "Failed to instantiate TCTI" in stderr:
        detail = next(
            (
                ln.split(") ", 1)[-1].strip()
                for ln in stderr.splitlines()
                if ("Failed to" in ln or "Cannot connect" in ln) and "instantiate" not in ln
            ),
            reason,
        )
        return NoTpm(f"no TPM2 on {tcti}: {detail}")
    rc, where = _tpm_rc(stderr) or (0, "")
    tpm_layer, mu_layer = rc >> 16 == 0, rc >> 16 == 0x09
    if step == "unseal" and rc and tpm_layer and _is_policy_failure(rc):
        return PcrMismatch(
            f"TPM2 on {tcti} refused to unseal {what}: PCR policy check failed, the PCRs "
            f"changed since sealing (TPM_RC {rc:#x})"
        )
    # Esys_Load: the TPM rejected a parameter (format-one code: integrity, size,
    # attributes…), or the client could not even marshal the public area.
    if step == "load" and (
        ("Esys_Load" in where and ((tpm_layer and rc & 0x80) or mu_layer))
        or any(m in stderr for m in _BLOB_PARSE_ERRORS)
    ):
        return BadBlob(f"TPM2 on {tcti} cannot load {what}: invalid or foreign blob ({reason})")
    return Tpm2Error(f"TPM2 {step} of {what} on {tcti} failed: {reason}")


def _tpm2b(blob: bytes, name: str) -> bytes:
    if len(blob) < 3 or int.from_bytes(blob[:2], "big") != len(blob) - 2:
        raise BadBlob(f"TPM2 {name} blob of {len(blob)} bytes has an inconsistent size field")
    return blob


# ------------------------------------------------------------------ I/O parts


def resource_managed(tcti: str) -> bool:
    """True for TCTIs behind a resource manager, which flushes transient objects itself."""
    return tcti.startswith(("device:/dev/tpmrm", "tabrmd"))


def tpm_present(tcti: str | None = None) -> bool:
    """Cheap check: the device node or swtpm socket exists (no TPM command is sent)."""
    tcti = tcti or DEFAULT_TCTI
    name, _, conf = tcti.partition(":")
    if name == "device":
        return os.path.exists(conf or "/dev/tpm0")
    if name == "swtpm" and conf.startswith("path="):
        return os.path.exists(conf[len("path=") :].split(",", 1)[0])
    return True


def _tool(
    argv: Sequence[str],
    tcti: str,
    *,
    step: str,
    what: str,
    input: bytes | bytearray | None = None,
    secret_output: bool = False,
) -> _run.Completed:
    try:
        return _run.run(
            argv, input=input, env={"TPM2TOOLS_TCTI": tcti}, secret_output=secret_output
        )
    except _run.CommandError as e:
        if e.returncode is None:  # binary missing
            raise NoTpm(f"cannot use the TPM2 on {tcti}: {e}") from None
        raise classify(step, tcti, e.stderr, what) from None


def _flush(tcti: str, *, sessions: bool = False) -> None:
    """Free what tpm2-tools leaves loaded on a TCTI without resource manager; best effort.

    Transient objects: every tool that loads a context leaves it loaded. Sessions:
    tpm2_createpolicy 5.4 leaves its trial session loaded. Two calls, because
    `tpm2_flushcontext -t -l` in 5.4 flushes a wrong handle list when both are non-empty.
    """
    if resource_managed(tcti):
        return
    for flag in ("-t", "-l") if sessions else ("-t",):
        with contextlib.suppress(_run.CommandError):
            _run.run(["tpm2_flushcontext", flag], env={"TPM2TOOLS_TCTI": tcti})


def _is_tmpfs(path: str) -> bool:
    best, fstype = "", ""
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                mnt = fields[1]
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(
                    best
                ):
                    best, fstype = mnt, fields[2]
    except OSError:
        return False
    return fstype in ("tmpfs", "ramfs", "rootfs")


def _workdir() -> Path:
    """A private directory on tmpfs for the blobs and TPM contexts (never the disk)."""
    for parent in _WORK_PARENTS:
        if os.path.isdir(parent) and os.access(parent, os.W_OK) and _is_tmpfs(parent):
            return Path(tempfile.mkdtemp(prefix="pystate-tpm2.", dir=parent))
    raise Tpm2Error(f"no writable tmpfs among {', '.join(_WORK_PARENTS)} for TPM2 work files")


def _remove(work: Path) -> None:
    for entry in work.iterdir():
        entry.unlink()
    work.rmdir()


def pcr_read(bank: str, pcrs: Sequence[int], tcti: str | None = None) -> dict[int, bytes]:
    """Current values of `pcrs` in `bank`."""
    tcti = tcti or DEFAULT_TCTI
    spec = pcr_selection(bank, pcrs)
    size = bank_digest_size(bank)
    out = _tool(["tpm2_pcrread", spec], tcti, step="pcrread", what=f"PCRs {spec}")
    values: dict[int, bytes] = {}
    for line in out.stdout.decode(errors="replace").splitlines():
        index, sep, value = line.partition(":")
        value = value.strip()
        if sep and index.strip().isdigit() and value.startswith("0x"):
            try:
                raw = bytes.fromhex(value[2:])
            except ValueError:
                continue
            if len(raw) == size:
                values[int(index)] = raw
    if sorted(values) != sorted(pcrs):
        raise Tpm2Error(f"TPM2 on {tcti} did not return PCRs {spec} (is the {bank} bank active?)")
    return values


def pcr_extend(index: int, bank: str, digest: bytes, tcti: str | None = None) -> None:
    """Extend PCR `index` of `bank` with `digest` (a measurement, not a secret)."""
    tcti = tcti or DEFAULT_TCTI
    pcr_selection(bank, [index])
    size = bank_digest_size(bank)
    if len(digest) != size:
        raise Tpm2Error(f"digest of {len(digest)} bytes for the {bank} bank, which needs {size}")
    _tool(
        ["tpm2_pcrextend", f"{index}:{bank}={digest.hex()}"],
        tcti,
        step="pcrextend",
        what=f"PCR {bank}:{index}",
    )


def seal(
    secret: bytes | bytearray,
    *,
    pcrs: Sequence[int],
    bank: str = "sha256",
    pcr15_zero: bool,
    tcti: str | None,
) -> SealedKey:
    """Seal `secret` to the current values of `pcrs` (and PCR 15 = zero if `pcr15_zero`)."""
    tcti = tcti or DEFAULT_TCTI
    if not 0 < len(secret) <= MAX_SECRET:
        raise Tpm2Error(f"secret of {len(secret)} bytes cannot be sealed (1-{MAX_SECRET})")
    if len(set(pcrs)) != len(pcrs):
        raise Tpm2Error(f"duplicate PCR index in {list(pcrs)}")
    indices = _check_pcrs(sorted(set(pcrs) | ({PCR_VOLUME} if pcr15_zero else set())))
    measured = [i for i in indices if not (pcr15_zero and i == PCR_VOLUME)]
    values = pcr_read(bank, measured, tcti) if measured else {}
    if pcr15_zero:
        values[PCR_VOLUME] = bytes(bank_digest_size(bank))
    expected = policy_pcr_digest(bank, values)
    spec = pcr_selection(bank, indices)
    what = f"the secret to {spec}"

    work = _workdir()
    try:
        (work / "pcrs.bin").write_bytes(b"".join(values[i] for i in indices))
        _tool(
            [
                "tpm2_createpolicy", "--policy-pcr", "-l", spec,
                "-f", str(work / "pcrs.bin"), "-L", str(work / "policy.digest"),
            ],
            tcti, step="createpolicy", what=f"the PolicyPCR over {spec}",
        )  # fmt: skip
        digest = (work / "policy.digest").read_bytes()
        if digest != expected:
            raise Tpm2Error(
                f"TPM2 on {tcti} computed policy {digest.hex()} for {spec}, "
                f"pystate computed {expected.hex()}; refusing to seal"
            )
        _tool(
            [
                "tpm2_createprimary", "-Q", "-C", "o", "-g", "sha256", "-G", "ecc256:aes128cfb",
                "-a", PRIMARY_ATTRIBUTES, "-c", str(work / "primary.ctx"),
            ],
            tcti, step="createprimary", what="the ECC P-256 primary key",
        )  # fmt: skip
        _tool(
            [
                "tpm2_create", "-Q", "-C", str(work / "primary.ctx"), "-g", "sha256",
                "-a", SEALED_ATTRIBUTES, "-L", str(work / "policy.digest"), "-i", "-",
                "-u", str(work / "sealed.pub"), "-r", str(work / "sealed.priv"),
            ],
            tcti, step="create", what=what, input=secret,
        )  # fmt: skip
        public = _tpm2b((work / "sealed.pub").read_bytes(), "public")
        private = _tpm2b((work / "sealed.priv").read_bytes(), "private")
    finally:
        _flush(tcti, sessions=True)
        _remove(work)
    return SealedKey(
        public=public,
        private=private,
        bank=bank,
        pcrs=indices,
        policy_hash=expected,
        pcr15_zero=pcr15_zero,
    )


def unseal(key: SealedKey, *, tcti: str | None) -> bytearray:
    """The sealed secret, if the TPM's PCRs satisfy the key's policy. Caller wipes it."""
    tcti = tcti or DEFAULT_TCTI
    if key.primary_alg != PRIMARY_ALG:
        raise BadBlob(f"sealed key has primary algorithm {key.primary_alg!r}, only ecc is used")
    spec = pcr_selection(key.bank, key.pcrs)
    what = f"the key sealed to {spec}"
    _tpm2b(key.public, "public")
    _tpm2b(key.private, "private")
    work = _workdir()
    try:
        pem = work / "sealed.pem"
        pem.write_text(tss2_pem(key.public, key.private), encoding="ascii")
        _tool(
            ["tpm2_load", "-Q", "-r", str(pem), "-c", str(work / "sealed.ctx")],
            tcti,
            step="load",
            what=what,
        )
        out = _tool(
            ["tpm2_unseal", "-c", str(work / "sealed.ctx"), "-p", f"pcr:{spec}"],
            tcti,
            step="unseal",
            what=what,
            secret_output=True,  # straight into a bytearray: no immutable copy of the key
        )
        return out.secret
    finally:
        _flush(tcti)
        _remove(work)
