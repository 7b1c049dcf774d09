"""tpm2-tss's ESAPI in process: seal and unseal without tpm2-tools, in a salted session.

Why (issue 13): the unsealed secret must not cross the bus between CPU and TPM in the
clear. tpm2-tools 5.4 can salt a session only through a context file that the kernel's
resource manager (/dev/tpmrm0, what every booted machine has) flushes when the saving
process exits, so its unseal there answers in plaintext. ESAPI salts and encrypts by
itself, as systemd-cryptsetup does; in one process nothing has to survive a process end.
It also replaces the two tpm2-tools processes of an unseal (tpm2_load, tpm2_unseal), and
pcr_read / pcr_extend (TPM2_PCR_Read, TPM2_PCR_Extend) replace tpm2_pcrread and
tpm2_pcrextend, so an unlocking boot starts no TPM process at all.

The unseal, as commands to the TPM:
- the parent: ``TPM2_ReadPublic`` of the persistent SRK (``Esys_TR_FromTPMPublic``) or
  ``TPM2_CreatePrimary`` of the transient ECC primary (formats/tpm2_policy
  ``primary_template``); its name must be the one the token recorded, or someone between
  CPU and TPM could answer with a key of their own and read the salt;
- ``TPM2_Load`` of the sealed object under it;
- ``TPM2_StartAuthSession``: a policy session salted with the parent (ECDH with its
  public key: only that TPM learns the session key), AES-128-CFB parameter encryption;
- ``TPM2_PolicyPCR`` over the token's PCRs (the TPM compares them itself);
- ``TPM2_Unseal`` with the session's *encrypt* attribute: the TPM encrypts the secret in
  its response under the session key, ESAPI decrypts it here. continueSession is clear, so
  the TPM ends the session with the command.
Seal: the same parent, an HMAC session salted with it carrying the *decrypt* attribute
(``TPM2_Create``'s first parameter, the secret, travels encrypted), the sealed object made
from formats/tpm2_policy ``sealed_template``.

cffi in out-of-line ABI mode, like libcryptsetup.py: declarations in _ffi_build.py (from
tpm2-tss 3.2's headers), libraries opened with dlopen() by SONAME. They are the ones
tpm2-tools links (DT_NEEDED), so an initrd with tpm2-tools has them; the TCTI comes from
Tss2_TctiLdr (``device:/dev/tpmrm0``, ``swtpm:…``: pystate's TCTI strings as they are).
``available()`` decides between this module and tpm2-tools:

    PYSTATE_TPM2 unset or "auto"   ESAPI if the libraries load, else tpm2-tools
    PYSTATE_TPM2=cli               always tpm2-tools (benchmarks, tests)
    PYSTATE_TPM2=library           always ESAPI; a Tpm2Error if it does not load

The secret: written by ESAPI into a TPM2B it allocates, copied from there straight into a
bytearray (the caller wipes it), the TPM2B zeroed before Esys_Free. ESAPI's own command
and response buffers, which held the decrypted response, are freed unwiped by
Esys_Finalize (as in systemd-cryptsetup): a limit of the library, named in docs/tpm2.md.
Failures are ``CallError`` (a Tpm2Error) with the function and its TSS2_RC; system/tpm2.py
turns them into NoTpm / PcrMismatch / BadBlob / DaLockout / TpmBusy as for tpm2-tools.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pystate_initrd.formats import tpm2_policy
from pystate_initrd.formats.tpm2_policy import Tpm2Error
from pystate_initrd.log import installed as installed_log
from pystate_initrd.system import library_mode

LIBRARIES = {
    "esys": "libtss2-esys.so.0",
    "tctildr": "libtss2-tctildr.so.0",
    "mu": "libtss2-mu.so.0",
    "rc": "libtss2-rc.so.0",
}
ENV = "PYSTATE_TPM2"
MODES = library_mode.MODES

# tss2_esys.h, tss2_tpm2_types.h
ESYS_TR_NONE, ESYS_TR_PASSWORD, ESYS_TR_RH_OWNER, ESYS_TR_PCR0 = 0xFFF, 0x0FF, 0x101, 0
TPM2_SE_HMAC, TPM2_SE_POLICY, TPM2_SE_TRIAL = 0x00, 0x01, 0x03
TPMA_SESSION_CONTINUESESSION, TPMA_SESSION_DECRYPT, TPMA_SESSION_ENCRYPT = 0x01, 0x20, 0x40
TPM2_ALG_AES, TPM2_ALG_CFB, TPM2_ALG_SHA256, TPM2_ALG_NULL = 0x0006, 0x0043, 0x000B, 0x0010
# sizeof() on LP64 in tpm2-tss 3.2 (616, 1552); twice that, so a library whose structures
# grew still writes inside the buffer. Only the library reads and writes these.
PUBLIC_BUFFER, PRIVATE_BUFFER, DATA_BUFFER = 2 * 616, 2 * 1552, 2 * 66
TPM2_RC_HANDLE, TPM2_RC_N_MASK = 0x08B, 0xF00  # format one: "handle N is not …"
TSS2_RC_LAYER_SHIFT = 16
TSS2_TCTI_RC_LAYER = 10  # the TCTI: no such device, cannot connect…


class CallError(Tpm2Error):
    """An ESAPI (or TCTI) call returned a TSS2_RC other than success."""

    def __init__(self, call: str, rc: int, text: str) -> None:
        self.call, self.rc, self.text = call, rc, text
        super().__init__(f"{call}: {text} ({rc:#x})")

    @property
    def layer(self) -> int:
        return self.rc >> TSS2_RC_LAYER_SHIFT


class ParentMismatch(Tpm2Error):
    """The parent key the TPM has is not the one whose name the token recorded."""

    def __init__(self, handle: int | None, found: bytes, expected: bytes) -> None:
        self.found, self.expected = found, expected
        where = "the transient primary" if handle is None else f"the key at {handle:#x}"
        super().__init__(f"{where} has name {found.hex()}, the token recorded {expected.hex()}")


@dataclass(frozen=True)
class _Lib:
    ffi: Any
    esys: Any
    tctildr: Any
    mu: Any
    rc: Any


@functools.cache
def _load() -> _Lib | str:
    """The loaded libraries, or why they could not be loaded (tried once per process)."""
    try:
        from pystate_initrd.system.libc import ffi_libc

        ffi, _libc = ffi_libc()
        libs = {key: ffi.dlopen(name) for key, name in LIBRARIES.items()}
        libs["esys"].Esys_Initialize  # noqa: B018 (a missing symbol fails here, not mid-unseal)
        return _Lib(ffi, **libs)
    except (OSError, ImportError, AttributeError) as exc:
        why = f"cannot load tpm2-tss's ESAPI: {exc}"
        log = installed_log()
        if log is not None:
            log.debug(f"esys: {why}; using tpm2-tools")
        return why


def mode() -> str:
    return library_mode.mode(ENV)


def load_failure() -> str | None:
    """Why "auto" does not use ESAPI (its libraries did not load), else None."""
    if mode() != "auto":
        return None
    loaded = _load()
    return loaded if isinstance(loaded, str) else None


def available() -> bool:
    """ESAPI in process (True) or tpm2-tools (False): the one place that decides."""
    return library_mode.use_library(ENV, _load, Tpm2Error)


def _lib() -> _Lib:
    loaded = _load()
    if isinstance(loaded, str):
        raise Tpm2Error(loaded)
    return loaded


class _Esys:
    """One ESAPI context on one TCTI; the transient objects it made are flushed on close
    (a resource manager would flush them too, swtpm and /dev/tpm0 would not)."""

    def __init__(self, lib: _Lib, tcti: str) -> None:
        self.lib, self.ffi, self.tcti = lib, lib.ffi, tcti
        self.transient: list[int] = []
        self._owners: list[Any] = []  # buffers behind cast pointers: ffi.cast keeps no owner
        self._tcti = self.ffi.new("TSS2_TCTI_CONTEXT **")
        self._ctx = self.ffi.new("ESYS_CONTEXT **")

    def open(self) -> None:
        rc = self.lib.tctildr.Tss2_TctiLdr_Initialize(self.tcti.encode(), self._tcti)
        try:
            self._check("Tss2_TctiLdr_Initialize", rc)
        except CallError as exc:
            # The TCTI's own reason is only in the library's log: for a device, ask the OS.
            name, _, path = self.tcti.partition(":")
            if name == "device":
                try:
                    os.close(os.open(path or "/dev/tpm0", os.O_RDWR | os.O_CLOEXEC))
                except OSError as os_exc:
                    raise CallError(exc.call, exc.rc, f"{path}: {os_exc.strerror}") from None
            raise
        self._check("Esys_Initialize", self.lib.esys.Esys_Initialize(
            self._ctx, self._tcti[0], self.ffi.NULL
        ))  # fmt: skip

    def close(self) -> None:
        if self._ctx[0] != self.ffi.NULL:
            for handle in reversed(self.transient):
                self.lib.esys.Esys_FlushContext(self._ctx[0], handle)  # best effort
            self.lib.esys.Esys_Finalize(self._ctx)
        if self._tcti[0] != self.ffi.NULL:
            self.lib.tctildr.Tss2_TctiLdr_Finalize(self._tcti)

    def _check(self, call: str, rc: int) -> None:
        if rc:
            text = self.ffi.string(self.lib.rc.Tss2_RC_Decode(rc)).decode(errors="replace")
            raise CallError(call, rc, text)

    def call(self, name: str, *args: Any) -> None:
        begin = time.monotonic()
        rc = getattr(self.lib.esys, name)(self._ctx[0], *args)
        log = installed_log()
        if log is not None and log.debug_enabled:
            log.debug(f"esys: {name} -> {rc:#x} in {(time.monotonic() - begin) * 1000:.1f} ms")
        self._check(name, rc)

    def forget(self, handle: int) -> None:
        """The TPM ended this object or session itself (continueSession clear)."""
        self.transient.remove(handle)

    # -- the pieces of a seal and an unseal

    def parent(self, handle: int | None, expected_name: bytes | None) -> tuple[int, bytes]:
        """ESYS_TR of the parent (persistent `handle`, or the transient primary), its name."""
        out = self.ffi.new("uint32_t *")
        if handle is None:
            public = self.unmarshal_public(tpm2_policy.primary_template())
            sensitive = self.ffi.new("TPM2B_SENSITIVE_CREATE *")  # empty auth and data
            outside = self.buffer("TPM2B_DATA *", DATA_BUFFER)
            creation = self.ffi.new("TPML_PCR_SELECTION *")
            null = self.ffi.NULL
            self.call("Esys_CreatePrimary", ESYS_TR_RH_OWNER, ESYS_TR_PASSWORD, ESYS_TR_NONE,
                      ESYS_TR_NONE, sensitive, public, outside, creation, out, null, null,
                      null, null)  # fmt: skip
            self.transient.append(out[0])
        else:
            self.call("Esys_TR_FromTPMPublic", handle, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                      out)  # fmt: skip
        name = self.name(out[0])
        if expected_name is not None and name != expected_name:
            raise ParentMismatch(handle, name, expected_name)
        return out[0], name

    def srk_accepted(self) -> bool:
        """Whether the TPM has a persistent key at SRK_HANDLE fit to be the parent."""
        out = self.ffi.new("uint32_t *")
        try:
            self.call("Esys_TR_FromTPMPublic", tpm2_policy.SRK_HANDLE, ESYS_TR_NONE,
                      ESYS_TR_NONE, ESYS_TR_NONE, out)  # fmt: skip
        except CallError as exc:
            if exc.rc & ~TPM2_RC_N_MASK == TPM2_RC_HANDLE:
                return False  # nothing there
            raise
        public = self.ffi.new("TPM2B_PUBLIC **")
        null = self.ffi.NULL
        try:
            self.call("Esys_ReadPublic", out[0], ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                      public, null, null)  # fmt: skip
            blob = self.marshal("Tss2_MU_TPM2B_PUBLIC_Marshal", public[0], PUBLIC_BUFFER)
        finally:
            self.lib.esys.Esys_Free(public[0])
            self.lib.esys.Esys_TR_Close(self._ctx[0], out)
        return tpm2_policy.srk_refusal(blob) is None

    def name(self, handle: int) -> bytes:
        ptr = self.ffi.new("TPM2B_NAME **")
        self.call("Esys_TR_GetName", handle, ptr)
        try:
            return bytes(self.ffi.buffer(ptr[0].name, ptr[0].size))
        finally:
            self.lib.esys.Esys_Free(ptr[0])

    def salted_session(self, parent: int, kind: int, attributes: int) -> int:
        """A session salted with `parent`, AES-128-CFB parameter encryption, sha256."""
        symmetric = self.ffi.new("TPMT_SYM_DEF *", [TPM2_ALG_AES, 128, TPM2_ALG_CFB])
        out = self.ffi.new("uint32_t *")
        self.call("Esys_StartAuthSession", parent, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                  ESYS_TR_NONE, self.ffi.NULL, kind, symmetric, TPM2_ALG_SHA256, out)  # fmt: skip
        self.transient.append(out[0])
        self.call("Esys_TRSess_SetAttributes", out[0], attributes, 0xFF)
        return int(out[0])

    def trial_policy(self, bank: str, pcrs: Sequence[int], pcr_digest: bytes) -> bytes:
        """The policy digest of PolicyPCR(pcrs, pcr_digest) as the TPM computes it."""
        symmetric = self.ffi.new("TPMT_SYM_DEF *", [TPM2_ALG_NULL, 0, 0])
        out = self.ffi.new("uint32_t *")
        self.call("Esys_StartAuthSession", ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                  ESYS_TR_NONE, ESYS_TR_NONE, self.ffi.NULL, TPM2_SE_TRIAL, symmetric,
                  TPM2_ALG_SHA256, out)  # fmt: skip
        self.transient.append(out[0])
        digest = self.ffi.new("TPM2B_DIGEST *")
        digest.size = len(pcr_digest)
        digest.buffer[0 : len(pcr_digest)] = list(pcr_digest)
        self.call("Esys_PolicyPCR", out[0], ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, digest,
                  self.pcr_selection(bank, pcrs))  # fmt: skip
        result = self.ffi.new("TPM2B_DIGEST **")
        self.call("Esys_PolicyGetDigest", out[0], ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                  result)  # fmt: skip
        try:
            return bytes(self.ffi.buffer(result[0].buffer, result[0].size))
        finally:
            self.lib.esys.Esys_Free(result[0])
            self.lib.esys.Esys_FlushContext(self._ctx[0], out[0])
            self.forget(out[0])

    def buffer(self, ctype: str, size: int) -> Any:
        """A zeroed buffer of `size` bytes as a `ctype` pointer, alive as long as this context."""
        owner = self.ffi.new("uint8_t[]", size)
        self._owners.append(owner)
        return self.ffi.cast(ctype, owner)

    def unmarshal_public(self, blob: bytes) -> Any:
        dest = self.buffer("TPM2B_PUBLIC *", PUBLIC_BUFFER)
        self._unmarshal("Tss2_MU_TPM2B_PUBLIC_Unmarshal", blob, dest)
        return dest

    def _unmarshal(self, call: str, blob: bytes, dest: Any) -> None:
        offset = self.ffi.new("size_t *")
        self._check(call, getattr(self.lib.mu, call)(blob, len(blob), offset, dest))
        if offset[0] != len(blob):
            raise tpm2_policy.BadBlob(f"{call}: {len(blob) - offset[0]} bytes left over")

    def marshal(self, call: str, src: Any, size: int) -> bytes:
        buf = self.ffi.new("uint8_t[]", size)
        offset = self.ffi.new("size_t *")
        self._check(call, getattr(self.lib.mu, call)(src, buf, size, offset))
        return bytes(self.ffi.buffer(buf, offset[0]))

    def load(self, parent: int, public: bytes, private: bytes) -> int:
        pub = self.unmarshal_public(public)
        priv = self.buffer("TPM2B_PRIVATE *", PRIVATE_BUFFER)
        self._unmarshal("Tss2_MU_TPM2B_PRIVATE_Unmarshal", private, priv)
        out = self.ffi.new("uint32_t *")
        self.call("Esys_Load", parent, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE, priv, pub,
                  out)  # fmt: skip
        self.transient.append(out[0])
        return int(out[0])

    def pcr_selection(self, bank: str, pcrs: Sequence[int]) -> Any:
        selection = self.ffi.new("TPML_PCR_SELECTION *")
        selection.count = 1
        entry = selection.pcrSelections[0]
        entry.hash = tpm2_policy.bank_alg_id(bank)
        bitmap = tpm2_policy.pcr_select(pcrs)
        entry.sizeofSelect = len(bitmap)
        entry.pcrSelect[0 : len(bitmap)] = list(bitmap)
        return selection


@contextmanager
def _quiet_library() -> Iterator[None]:
    """tpm2-tss logs every TPM error to stderr ("ERROR:esys:… ErrorCode (0x18b)" when there
    is no SRK, which is normal) and reads TSS2_LOG once per log module, on its first line:
    silenced while ESAPI runs, unless the user set TSS2_LOG or pystate's debug is on. The
    errors that matter reach the user as CallError, with the code and its decoded text."""
    log = installed_log()
    if "TSS2_LOG" in os.environ or (log is not None and log.debug_enabled):
        yield
        return
    os.environ["TSS2_LOG"] = "all+none"
    try:
        yield
    finally:
        os.environ.pop("TSS2_LOG", None)


@contextmanager
def _esys(tcti: str) -> Iterator[_Esys]:
    context = _Esys(_lib(), tcti)
    with _quiet_library():
        try:
            context.open()
            yield context
        finally:
            context.close()


def unseal(
    public: bytes,
    private: bytes,
    *,
    bank: str,
    pcrs: Sequence[int],
    parent: int | None,
    parent_name: bytes | None,
    tcti: str,
) -> bytearray:
    """The secret of the sealed object (public, private: TPM2B blobs), through a policy
    session salted with the parent; the caller wipes it. CallError, ParentMismatch."""
    with _esys(tcti) as c:
        parent_tr, _ = c.parent(parent, parent_name)
        sealed = c.load(parent_tr, public, private)
        session = c.salted_session(parent_tr, TPM2_SE_POLICY, TPMA_SESSION_ENCRYPT)
        empty = c.ffi.new("TPM2B_DIGEST *")  # size 0: the TPM takes the PCRs as they are
        c.call("Esys_PolicyPCR", session, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, empty,
               c.pcr_selection(bank, pcrs))  # fmt: skip
        out = c.ffi.new("TPM2B_SENSITIVE_DATA **")
        c.call("Esys_Unseal", sealed, session, ESYS_TR_NONE, ESYS_TR_NONE, out)
        c.forget(session)  # continueSession was clear: the TPM has ended it
        data = out[0]
        try:
            return bytearray(c.ffi.buffer(data.buffer, data.size))
        finally:
            c.ffi.memmove(data, bytes(c.ffi.sizeof("TPM2B_SENSITIVE_DATA")),
                          c.ffi.sizeof("TPM2B_SENSITIVE_DATA"))  # fmt: skip
            c.lib.esys.Esys_Free(data)


@dataclass(frozen=True)
class Sealed:
    public: bytes  # TPM2B_PUBLIC
    private: bytes  # TPM2B_PRIVATE
    parent: int | None  # SRK_HANDLE, or None for the transient primary
    parent_name: bytes


def seal(
    secret: bytes | bytearray,
    *,
    policy: bytes,
    bank: str,
    pcrs: Sequence[int],
    pcr_digest: bytes,
    tcti: str,
) -> Sealed:
    """A new object sealing `secret` to `policy`, under the SRK when the TPM has one that
    tpm2_policy.srk_refusal accepts, else under the transient primary; the secret is sent
    in a session salted with that parent. `policy` is first checked against the TPM's own
    PolicyPCR over `pcrs` of `bank` with `pcr_digest` (sha256 of their values) in a trial
    session: a key nobody could unseal is never made. CallError, Tpm2Error."""
    with _esys(tcti) as c:
        computed = c.trial_policy(bank, pcrs, pcr_digest)
        if computed != policy:
            raise Tpm2Error(
                f"TPM2 on {tcti} computed policy {computed.hex()}, pystate computed "
                f"{policy.hex()}; refusing to seal"
            )
        parent = tpm2_policy.SRK_HANDLE if c.srk_accepted() else None
        parent_tr, parent_name = c.parent(parent, None)
        session = c.salted_session(parent_tr, TPM2_SE_HMAC, TPMA_SESSION_DECRYPT)
        sensitive = c.ffi.new("TPM2B_SENSITIVE_CREATE *")
        try:
            data = sensitive.sensitive.data
            data.size = len(secret)
            c.ffi.memmove(data.buffer, c.ffi.from_buffer(secret), len(secret))
            public = c.unmarshal_public(tpm2_policy.sealed_template(policy))
            outside = c.buffer("TPM2B_DATA *", DATA_BUFFER)
            creation = c.ffi.new("TPML_PCR_SELECTION *")
            out_private = c.ffi.new("TPM2B_PRIVATE **")
            out_public = c.ffi.new("TPM2B_PUBLIC **")
            null = c.ffi.NULL
            c.call("Esys_Create", parent_tr, ESYS_TR_PASSWORD, session, ESYS_TR_NONE, sensitive,
                   public, outside, creation, out_private, out_public, null, null,
                   null)  # fmt: skip
        finally:
            c.ffi.memmove(sensitive, bytes(c.ffi.sizeof("TPM2B_SENSITIVE_CREATE")),
                          c.ffi.sizeof("TPM2B_SENSITIVE_CREATE"))  # fmt: skip
        c.forget(session)
        try:
            return Sealed(
                c.marshal("Tss2_MU_TPM2B_PUBLIC_Marshal", out_public[0], PUBLIC_BUFFER),
                c.marshal("Tss2_MU_TPM2B_PRIVATE_Marshal", out_private[0], PRIVATE_BUFFER),
                parent,
                parent_name,
            )
        finally:
            c.lib.esys.Esys_Free(out_public[0])
            c.lib.esys.Esys_Free(out_private[0])


def pcr_read(bank: str, pcrs: Sequence[int], *, tcti: str) -> dict[int, bytes]:
    """The current values of `pcrs` in `bank`; the TPM answers at most 8 per command, and
    only those of an active bank: what it left out is asked again, and missing ones are
    simply absent from the result. CallError."""
    wanted = sorted(set(tpm2_policy.check_pcrs(pcrs)))
    values: dict[int, bytes] = {}
    with _esys(tcti) as c:
        while wanted:
            counter = c.ffi.new("uint32_t *")
            out_sel = c.ffi.new("TPML_PCR_SELECTION **")
            out_val = c.ffi.new("TPML_DIGEST **")
            c.call("Esys_PCR_Read", ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                   c.pcr_selection(bank, wanted), counter, out_sel, out_val)  # fmt: skip
            try:
                got = [
                    i for i in wanted
                    if out_sel[0].count == 1
                    and out_sel[0].pcrSelections[0].sizeofSelect > i // 8
                    and out_sel[0].pcrSelections[0].pcrSelect[i // 8] >> (i % 8) & 1
                ]  # fmt: skip
                digests = out_val[0]
                for n, index in enumerate(got[: digests.count]):
                    d = digests.digests[n]
                    values[index] = bytes(c.ffi.buffer(d.buffer, d.size))
            finally:
                c.lib.esys.Esys_Free(out_sel[0])
                c.lib.esys.Esys_Free(out_val[0])
            done = [i for i in wanted if i in values]
            if not done:
                break  # the TPM returns nothing more for this bank
            wanted = [i for i in wanted if i not in values]
    return values


def pcr_extend(index: int, bank: str, digest: bytes, *, tcti: str) -> None:
    """Extend PCR `index` of `bank` with `digest` (TPM2_PCR_Extend, empty platform auth on
    the PCR, as tpm2_pcrextend sends it). CallError."""
    tpm2_policy.check_pcrs([index])
    with _esys(tcti) as c:
        values = c.ffi.new("TPML_DIGEST_VALUES *")
        values.count = 1
        values.digests[0].hashAlg = tpm2_policy.bank_alg_id(bank)
        values.digests[0].digest[0 : len(digest)] = list(digest)
        c.call("Esys_PCR_Extend", ESYS_TR_PCR0 + index, ESYS_TR_PASSWORD, ESYS_TR_NONE,
               ESYS_TR_NONE, values)  # fmt: skip
