"""TPM2 sealing of the volume secret with tpm2-tools (SPEC §5, §10).

The pure parts (PCR policy digest, volume measurement, TSS2 PEM, the error types) are
in formats/tpm2_policy.py; error classification of tpm2-tools' output is here. It runs
tpm2-tools through `run.run` with the TCTI in
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

Parent (issue 13): the persistent SRK at 0x81000001 when srk_refusal accepts it,
else the transient primary above; the token records which, and the parent's name.

Unseal on /dev/tpmrm0 is two tpm2-tools processes: `tpm2_load` (with `-r <TSS2 PEM>`
it also creates the primary) and `tpm2_unseal -p pcr:…` (runs the policy session
itself). Without a resource manager (swtpm, /dev/tpm0) the secret travels in a session
salted with the parent (`tpm2_startauthsession -c`, `tpm2_unseal -S`), which the kernel
RM would flush between processes; `tpm2_flushcontext` then frees what is left.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from pystate_initrd.formats import pcr_diagnosis, tcg_eventlog, tpm2_policy
from pystate_initrd.formats.tpm2_policy import BadBlob as BadBlob  # noqa: PLC0414 (re-exported)
from pystate_initrd.formats.tpm2_policy import DaLockout as DaLockout  # noqa: PLC0414
from pystate_initrd.formats.tpm2_policy import NoTpm as NoTpm  # noqa: PLC0414
from pystate_initrd.formats.tpm2_policy import PcrMismatch as PcrMismatch  # noqa: PLC0414
from pystate_initrd.formats.tpm2_policy import Tpm2Error as Tpm2Error  # noqa: PLC0414
from pystate_initrd.formats.tpm2_policy import TpmBusy as TpmBusy  # noqa: PLC0414
from pystate_initrd.system import esys
from pystate_initrd.system import run as _run

DEFAULT_TCTI = "device:/dev/tpmrm0"
# The firmware's event log as the kernel shows it (securityfs); what `event_log=None`
# means below. A machine without one (BIOS, no TPM driver, no securityfs) simply has no
# event details in the token or the diagnosis.
EVENT_LOG = "/sys/kernel/security/tpm0/binary_bios_measurements"

MAX_SECRET = 128  # MAX_SYM_DATA: the largest sealed data object
PRIMARY_ATTRIBUTES = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|decrypt|noda"
SEALED_ATTRIBUTES = "fixedtpm|fixedparent|adminwithpolicy|noda"
_WORK_PARENTS = ("/dev/shm", "/run")


# ------------------------------------------------- classifying tpm2-tools' errors (pure)


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


# Warnings (format 0, TPM_RC_WARN | TPM_RC_VER1) that say "not now", not "not this key".
TPM_RC_LOCKOUT = 0x921
_TPM_RC_BUSY = {0x922: "TPM_RC_RETRY", 0x908: "TPM_RC_YIELDED", 0x90A: "TPM_RC_TESTING"}
TPM_RC_FAILURE = 0x101
# TCTI-layer codes (tss2_common.h) that mean the channel to the TPM broke mid-command.
TSS2_TCTI_LAYER = 0x0A
_TCTI_GONE = {0x0A: "TSS2_TCTI_RC_IO_ERROR", 0x08: "TSS2_TCTI_RC_NO_CONNECTION"}


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


def classify_rc(step: str, tcti: str, rc: int, what: str) -> Tpm2Error | None:
    """The typed error a TSS2_RC means whoever got it (tpm2-tools or ESAPI), or None (pure)."""
    tpm_layer = rc >> 16 == 0
    # Before the policy check: in lockout the TPM refuses before it looks at the PCRs, and
    # a lockout must never read as "the PCRs changed" (nor send anyone hunting for one).
    if tpm_layer and rc == TPM_RC_LOCKOUT:
        return DaLockout(
            f"TPM2 on {tcti} is in dictionary-attack lockout and refused the {step} of {what} "
            f"(TPM_RC_LOCKOUT {rc:#x}): wait for the lockout to expire, or clear it with "
            "tpm2_dictionarylockout --clear-lockout"
        )
    if tpm_layer and rc in _TPM_RC_BUSY:
        return TpmBusy(
            f"TPM2 on {tcti} is busy and refused the {step} of {what} "
            f"({_TPM_RC_BUSY[rc]} {rc:#x}, still after tpm2-tss resubmitted it)"
        )
    if step == "unseal" and rc and tpm_layer and _is_policy_failure(rc):
        return PcrMismatch(
            f"TPM2 on {tcti} refused to unseal {what}: PCR policy check failed, the PCRs "
            f"changed since sealing (TPM_RC {rc:#x})"
        )
    if tpm_layer and rc == TPM_RC_FAILURE:
        # Also what QEMU's TPM emulation answers once swtpm is gone.
        return Tpm2Error(
            f"TPM2 on {tcti} is in failure mode and answered the {step} of {what} with "
            f"TPM_RC_FAILURE ({rc:#x}): the TPM stopped working; a power cycle resets it"
        )
    if rc >> 16 == TSS2_TCTI_LAYER and rc & 0xFFFF in _TCTI_GONE:
        return Tpm2Error(
            f"TPM2 on {tcti} stopped answering during the {step} of {what} "
            f"({_TCTI_GONE[rc & 0xFFFF]} {rc:#x}): the TPM or its driver failed"
        )
    return None


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
    if "Expected name does not match" in stderr:  # tpm2_startauthsession -n
        return BadBlob(
            f"TPM2 on {tcti} has a parent key whose name is not the one recorded when {what} "
            "was sealed: the TPM was cleared or is another TPM (or something between the CPU "
            "and the TPM answers for it)"
        )
    rc, where = _tpm_rc(stderr) or (0, "")
    typed = classify_rc(step, tcti, rc, what)
    if typed is not None:
        return typed
    tpm_layer, mu_layer = rc >> 16 == 0, rc >> 16 == 0x09
    # Esys_Load: the TPM rejected a parameter (format-one code: integrity, size,
    # attributes…), or the client could not even marshal the public area.
    if step == "load" and (
        ("Esys_Load" in where and ((tpm_layer and rc & 0x80) or mu_layer))
        or any(m in stderr for m in _BLOB_PARSE_ERRORS)
    ):
        return BadBlob(f"TPM2 on {tcti} cannot load {what}: invalid or foreign blob ({reason})")
    return Tpm2Error(f"TPM2 {step} of {what} on {tcti} failed: {reason}")


_ESYS_STEPS = {
    "Tss2_TctiLdr_Initialize": "connect",
    "Esys_Initialize": "connect",
    "Esys_TR_FromTPMPublic": "readpublic",
    "Esys_ReadPublic": "readpublic",
    "Esys_CreatePrimary": "createprimary",
    "Esys_Load": "load",
    "Tss2_MU_TPM2B_PUBLIC_Unmarshal": "load",
    "Tss2_MU_TPM2B_PRIVATE_Unmarshal": "load",
    "Esys_StartAuthSession": "startauthsession",
    "Esys_PolicyPCR": "policypcr",
    "Esys_PolicyGetDigest": "createpolicy",
    "Esys_Unseal": "unseal",
    "Esys_Create": "create",
    "Esys_PCR_Read": "pcrread",
    "Esys_PCR_Extend": "pcrextend",
}


def classify_esys(exc: esys.CallError, tcti: str, what: str) -> Tpm2Error:
    """The typed error for a failed ESAPI call (pure, table-tested)."""
    step = _ESYS_STEPS.get(exc.call, exc.call)
    if step == "connect":
        return NoTpm(f"no TPM2 on {tcti}: {exc.text}")
    typed = classify_rc(step, tcti, exc.rc, what)
    if typed is not None:
        return typed
    tpm_layer, mu_layer = exc.layer == 0, exc.layer == 0x09
    if step == "load" and ((tpm_layer and exc.rc & 0x80) or mu_layer):
        return BadBlob(f"TPM2 on {tcti} cannot load {what}: invalid or foreign blob ({exc})")
    if step == "readpublic" and tpm_layer and exc.rc & ~0xF00 == esys.TPM2_RC_HANDLE:
        return BadBlob(
            f"TPM2 on {tcti} has no key at the parent handle recorded when {what} was sealed "
            f"({exc}): the TPM was cleared or is another TPM"
        )
    return Tpm2Error(f"TPM2 {step} of {what} on {tcti} failed: {exc}")


def _parent_mismatch(tcti: str, what: str, exc: esys.ParentMismatch) -> BadBlob:
    return BadBlob(
        f"TPM2 on {tcti} has a parent key whose name is not the one recorded when {what} "
        "was sealed: the TPM was cleared or is another TPM (or something between the CPU "
        f"and the TPM answers for it): {exc}"
    )


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
            # The fallback is missing too (an initrd carries ESAPI only): say why ESAPI was not
            # used, which is what the distributor has to fix.
            why = esys.load_failure()
            raise NoTpm(f"cannot use the TPM2 on {tcti}: {e}{f'; {why}' if why else ''}") from None
        raise classify(step, tcti, e.stderr, what) from None


def _flush(tcti: str, *, sessions: str = "") -> None:
    """Free what tpm2-tools leaves loaded on a TCTI without resource manager; best effort.

    Transient objects: every tool that loads a context leaves it loaded. Sessions
    (`sessions`: "l" loaded, "s" saved, "ls" both):
    tpm2_createpolicy 5.4 leaves its trial session loaded, a salted session is left saved
    (ContextSave) in its file. One call per kind, because `tpm2_flushcontext -t -l` in 5.4
    flushes a wrong handle list when both are non-empty.
    """
    if resource_managed(tcti):
        return
    for flag in ("-t", *(f"-{kind}" for kind in sessions)):
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
    import tempfile  # here, not at the top: a boot without TPM never needs it (1.5 ms)

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
    spec = tpm2_policy.pcr_selection(bank, pcrs)
    size = tpm2_policy.bank_digest_size(bank)
    if esys.available():
        try:
            read = esys.pcr_read(bank, pcrs, tcti=tcti)
        except esys.CallError as exc:
            raise classify_esys(exc, tcti, f"PCRs {spec}") from None
        values = {i: v for i, v in read.items() if len(v) == size}
    else:
        out = _tool(["tpm2_pcrread", spec], tcti, step="pcrread", what=f"PCRs {spec}")
        values = _parse_pcrread(out.stdout.decode(errors="replace"), size)
    if sorted(values) != sorted(pcrs):
        raise Tpm2Error(f"TPM2 on {tcti} did not return PCRs {spec} (is the {bank} bank active?)")
    return values


def _parse_pcrread(text: str, size: int) -> dict[int, bytes]:
    """`tpm2_pcrread`'s `  7: 0x…` lines, values of `size` bytes only."""
    values: dict[int, bytes] = {}
    for line in text.splitlines():
        index, sep, value = line.partition(":")
        value = value.strip()
        if sep and index.strip().isdigit() and value.startswith("0x"):
            try:
                raw = bytes.fromhex(value[2:])
            except ValueError:
                continue
            if len(raw) == size:
                values[int(index)] = raw
    return values


def read_event_log(path: str | os.PathLike[str] | None = None) -> tcg_eventlog.EventLog | None:
    """The firmware's event log (EVENT_LOG unless `path`); None when there is none.

    EventLogError when it exists but cannot be read or parsed. Reads at most
    tcg_eventlog.MAX_LOG_BYTES + 1 bytes: securityfs files have no size to trust.
    """
    name = os.fspath(EVENT_LOG if path is None else path)
    try:
        with open(name, "rb") as f:
            data = f.read(tcg_eventlog.MAX_LOG_BYTES + 1)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise tcg_eventlog.EventLogError(f"cannot read {name}: {exc.strerror}") from None
    try:
        return tcg_eventlog.parse(data)
    except tcg_eventlog.EventLogError as exc:
        raise tcg_eventlog.EventLogError(f"{name}: {exc}") from None


def pcr_extend(index: int, bank: str, digest: bytes, tcti: str | None = None) -> None:
    """Extend PCR `index` of `bank` with `digest` (a measurement, not a secret)."""
    tcti = tcti or DEFAULT_TCTI
    tpm2_policy.pcr_selection(bank, [index])
    size = tpm2_policy.bank_digest_size(bank)
    if len(digest) != size:
        raise Tpm2Error(f"digest of {len(digest)} bytes for the {bank} bank, which needs {size}")
    if esys.available():
        try:
            esys.pcr_extend(index, bank, digest, tcti=tcti)
        except esys.CallError as exc:
            raise classify_esys(exc, tcti, f"PCR {bank}:{index}") from None
        return
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
    event_log: str | os.PathLike[str] | None = None,
) -> tpm2_policy.SealedKey:
    """Seal `secret` to the current values of `pcrs` (and PCR 15 = zero if `pcr15_zero`).

    The key records the values read (for the diagnosis of a later refusal) and, when the
    firmware's event log (`event_log`, default EVENT_LOG) exists and matches them, a
    summary of its events for these PCRs. A missing or bad log never stops the seal.
    """
    tcti = tcti or DEFAULT_TCTI
    if not 0 < len(secret) <= MAX_SECRET:
        raise Tpm2Error(f"secret of {len(secret)} bytes cannot be sealed (1-{MAX_SECRET})")
    if len(set(pcrs)) != len(pcrs):
        raise Tpm2Error(f"duplicate PCR index in {list(pcrs)}")
    volume = {tpm2_policy.PCR_VOLUME} if pcr15_zero else set()
    indices = tpm2_policy.check_pcrs(sorted(set(pcrs) | volume))
    measured = [i for i in indices if not (pcr15_zero and i == tpm2_policy.PCR_VOLUME)]
    values = pcr_read(bank, measured, tcti) if measured else {}
    sealed_values = tuple(sorted(values.items()))
    pcr_logs: tuple[tpm2_policy.PcrLog, ...] = ()
    if measured:
        try:
            log = read_event_log(event_log)
        except tcg_eventlog.EventLogError:
            log = None
        if log is not None:
            pcr_logs = pcr_diagnosis.summarize(log, bank, values)
    if pcr15_zero:
        values[tpm2_policy.PCR_VOLUME] = bytes(tpm2_policy.bank_digest_size(bank))
    expected = tpm2_policy.policy_pcr_digest(bank, values)
    spec = tpm2_policy.pcr_selection(bank, indices)
    what = f"the secret to {spec}"
    if esys.available():
        pcr_digest = hashlib.sha256(b"".join(values[i] for i in indices)).digest()
        try:
            made = esys.seal(secret, policy=expected, bank=bank, pcrs=indices,
                             pcr_digest=pcr_digest, tcti=tcti)  # fmt: skip
        except esys.CallError as exc:
            raise classify_esys(exc, tcti, what) from None
        public, private = made.public, made.private
        parent, parent_name = made.parent, made.parent_name
    else:
        public, private, parent, parent_name = _seal_with_tools(
            secret, tcti, spec, values, indices, expected, what
        )
    return tpm2_policy.SealedKey(
        public=tpm2_policy.check_tpm2b(public, "public"),
        private=tpm2_policy.check_tpm2b(private, "private"),
        bank=bank,
        pcrs=indices,
        policy_hash=expected,
        pcr15_zero=pcr15_zero,
        parent=parent,
        parent_name=parent_name,
        pcr_values=sealed_values,
        pcr_logs=pcr_logs,
    )


def _seal_with_tools(
    secret: bytes | bytearray,
    tcti: str,
    spec: str,
    values: dict[int, bytes],
    indices: Sequence[int],
    expected: bytes,
    what: str,
) -> tuple[bytes, bytes, int | None, bytes]:
    """seal() through tpm2-tools: (public, private, parent handle, parent name)."""
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
        parent, parent_name = _seal_parent(tcti, work)
        parent_arg = str(work / "primary.ctx") if parent is None else f"{parent:#x}"
        # The secret goes in TPM2_Create's inSensitive: encrypted (decrypt attribute) in a
        # session salted with the parent's public key, where tpm2-tools 5.4 can do it.
        encrypt: list[str] = []
        if salted_by_default(tcti):
            _salted_session(tcti, work, parent_arg, parent_name, what)
            encrypt = ["-S", str(work / "enc.ctx")]
        _tool(
            [
                "tpm2_create", "-Q", "-C", parent_arg, "-g", "sha256",
                "-a", SEALED_ATTRIBUTES, "-L", str(work / "policy.digest"), "-i", "-",
                "-u", str(work / "sealed.pub"), "-r", str(work / "sealed.priv"), *encrypt,
            ],
            tcti, step="create", what=what, input=secret,
        )  # fmt: skip
        return (
            (work / "sealed.pub").read_bytes(),
            (work / "sealed.priv").read_bytes(),
            parent,
            parent_name,
        )
    finally:
        _flush(tcti, sessions="ls")
        _remove(work)


def _seal_parent(tcti: str, work: Path) -> tuple[int | None, bytes]:
    """The parent to seal under and its name: the persistent SRK at SRK_HANDLE when there
    is one that srk_refusal accepts, else a new transient primary (work/primary.ctx)."""
    try:
        _tool(
            ["tpm2_readpublic", "-Q", "-c", f"{tpm2_policy.SRK_HANDLE:#x}",
             "-o", str(work / "srk.pub")],
            tcti, step="readpublic", what=f"the SRK at {tpm2_policy.SRK_HANDLE:#x}",
        )  # fmt: skip
    except NoTpm:
        raise
    except Tpm2Error:
        pass  # no persistent key there (TPM_RC_HANDLE): today's transient primary
    else:
        srk = (work / "srk.pub").read_bytes()
        if tpm2_policy.srk_refusal(srk) is None:
            return tpm2_policy.SRK_HANDLE, tpm2_policy.object_name(srk)
    _tool(
        [
            "tpm2_createprimary", "-Q", "-C", "o", "-g", "sha256", "-G", "ecc256:aes128cfb",
            "-a", PRIMARY_ATTRIBUTES, "-c", str(work / "primary.ctx"),
            "-o", str(work / "primary.pub"),
        ],
        tcti, step="createprimary", what="the ECC P-256 primary key",
    )  # fmt: skip
    return None, tpm2_policy.object_name((work / "primary.pub").read_bytes())


def _salted_session(
    tcti: str, work: Path, parent_arg: str, parent_name: bytes | None, what: str
) -> None:
    """work/enc.ctx: an HMAC session salted with (and bound to) the parent key, with the
    encrypt and decrypt attributes, for one command's secret parameter (tpm2-tools'
    `tpm2_startauthsession -c`). With `parent_name`, tpm2-tools refuses a parent whose name
    differs (a key swapped in by someone between the CPU and the TPM)."""
    argv = [
        "tpm2_startauthsession",
        "--hmac-session",
        "-c",
        parent_arg,
        "-S",
        str(work / "enc.ctx"),
    ]
    if parent_name is not None:
        (work / "parent.name").write_bytes(parent_name)
        argv += ["-n", str(work / "parent.name")]
    _tool(argv, tcti, step="startauthsession", what=f"the session salted for {what}")
    if parent_arg.endswith(".ctx"):
        _flush(tcti)  # the copy of the primary it loaded (no resource manager only)


def salted_by_default(tcti: str) -> bool:
    """Whether seal and unseal use a salted session on this TCTI (docs/tpm2.md, "Salted
    sessions"): only without a resource manager. tpm2-tools 5.4 can only salt a session that
    `tpm2_startauthsession` saved to a file for the next process, and the kernel's resource
    manager (/dev/tpmrm0) flushes a client's sessions when that process exits."""
    return not resource_managed(tcti)


def unseal(
    key: tpm2_policy.SealedKey, *, tcti: str | None, salted: bool | None = None
) -> bytearray:
    """The sealed secret, if the TPM's PCRs satisfy the key's policy. Caller wipes it.

    Through ESAPI in process (esys.available(): wherever tpm2-tss's libraries load) the
    secret always comes back encrypted in a session salted with the parent key, so nobody
    listening between the CPU and the TPM sees it. With tpm2-tools, `salted` (default:
    salted_by_default(tcti)) does the same where tpm2-tools can; else `tpm2_unseal`'s own
    unsalted policy session returns it in the clear.
    """
    tcti = tcti or DEFAULT_TCTI
    salted = salted_by_default(tcti) if salted is None else salted
    if key.primary_alg != tpm2_policy.PRIMARY_ALG:
        raise BadBlob(f"sealed key has primary algorithm {key.primary_alg!r}, only ecc is used")
    spec = tpm2_policy.pcr_selection(key.bank, key.pcrs)
    what = f"the key sealed to {spec}"
    tpm2_policy.check_tpm2b(key.public, "public")
    tpm2_policy.check_tpm2b(key.private, "private")
    if esys.available():
        try:
            return esys.unseal(
                key.public, key.private, bank=key.bank, pcrs=key.pcrs, parent=key.parent,
                parent_name=key.parent_name, tcti=tcti,
            )  # fmt: skip
        except esys.ParentMismatch as exc:
            raise _parent_mismatch(tcti, what, exc) from None
        except esys.CallError as exc:
            raise classify_esys(exc, tcti, what) from None
    work = _workdir()
    try:
        parent_arg = str(work / "primary.ctx") if key.parent is None else f"{key.parent:#x}"
        if key.parent is None and not salted:
            # One process creates the primary and loads the blob (the TSS2 PEM's parent).
            pem = work / "sealed.pem"
            pem.write_text(tpm2_policy.tss2_pem(key.public, key.private), encoding="ascii")
            load = ["tpm2_load", "-Q", "-r", str(pem), "-c", str(work / "sealed.ctx")]
        else:
            if key.parent is None:
                _tool(
                    [
                        "tpm2_createprimary", "-Q", "-C", "o", "-g", "sha256",
                        "-G", "ecc256:aes128cfb", "-a", PRIMARY_ATTRIBUTES, "-c", parent_arg,
                    ],
                    tcti, step="createprimary", what="the ECC P-256 primary key",
                )  # fmt: skip
            (work / "sealed.pub").write_bytes(key.public)
            (work / "sealed.priv").write_bytes(key.private)
            load = [
                "tpm2_load", "-Q", "-C", parent_arg, "-u", str(work / "sealed.pub"),
                "-r", str(work / "sealed.priv"), "-c", str(work / "sealed.ctx"),
            ]  # fmt: skip
        if salted:
            _salted_session(tcti, work, parent_arg, key.parent_name, what)
        _tool(load, tcti, step="load", what=what)
        encrypt = ["-S", str(work / "enc.ctx")] if salted else []
        out = _tool(
            ["tpm2_unseal", "-c", str(work / "sealed.ctx"), "-p", f"pcr:{spec}", *encrypt],
            tcti,
            step="unseal",
            what=what,
            secret_output=True,  # straight into a bytearray: no immutable copy of the key
        )
        return out.secret
    finally:
        _flush(tcti, sessions="s" if salted else "")
        _remove(work)


def wait_for_tpm(tcti: str | None, seconds: float = 5.0) -> None:
    """Give a TPM the firmware announces a moment for its driver to register it."""
    name, _, conf = (tcti or DEFAULT_TCTI).partition(":")
    if name != "device" or os.path.exists(conf):
        return
    if not os.path.exists("/sys/firmware/acpi/tables/TPM2") and not any(
        Path("/sys/class/tpm").glob("tpm*")
    ):
        return  # no TPM on this machine: NoTpm right away, not after a wait
    import time

    deadline = time.monotonic() + seconds
    while not os.path.exists(conf) and time.monotonic() < deadline:
        time.sleep(0.05)
