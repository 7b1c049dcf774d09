"""The C declarations behind system/libc.py, system/libcryptsetup.py, system/esys.py and
their users, for cffi's out-of-line ABI mode.

At build time this file turns the declarations below into ``_linux_ffi.py``, a
pure-Python module that imports only ``_cffi_backend``: the initrd then needs
the backend (Debian's python3-cffi-backend) but neither cffi's parser nor
pycparser. Nothing is compiled; libc, libcryptsetup.so.12 and tpm2-tss's libraries are
opened at run time with dlopen() (one ffi object serves them all).

    python3 -m pystate_initrd.system._ffi_build [OUTDIR]    # default: next to this file

Structures are copied from the kernel's UAPI headers (linux/loop.h,
linux/openat2.h, linux/mount.h); their sizes are checked by the tests. The
libcryptsetup functions are copied from cryptsetup 2.6's lib/libcryptsetup.h
(the ABI of libcryptsetup.so.12: only functions, the device handle stays opaque). The
declarations assume an LP64 target (x86_64, aarch64): ``long`` and ``off_t``
are 64 bits wide there, which is what fallocate() and syscall() are given.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import sys
import tempfile
from pathlib import Path

MODULE_NAME = "pystate_initrd.system._linux_ffi"
FILE_NAME = "_linux_ffi.py"

CDEF = """
/* libc */
long syscall(long number, ...);
int mount(const char *source, const char *target, const char *filesystemtype,
          unsigned long mountflags, const void *data);
int umount2(const char *target, int flags);
int ioctl(int fd, unsigned long request, ...);
int fallocate(int fd, int mode, int64_t offset, int64_t len);  /* off_t is 64-bit on LP64 */

/* linux/openat2.h */
struct open_how {
    uint64_t flags;
    uint64_t mode;
    uint64_t resolve;
};

/* linux/mount.h */
struct mount_attr {
    uint64_t attr_set;
    uint64_t attr_clr;
    uint64_t propagation;
    uint64_t userns_fd;
};

/* linux/loop.h */
struct loop_info64 {
    uint64_t lo_device;
    uint64_t lo_inode;
    uint64_t lo_rdevice;
    uint64_t lo_offset;
    uint64_t lo_sizelimit;
    uint32_t lo_number;
    uint32_t lo_encrypt_type;
    uint32_t lo_encrypt_key_size;
    uint32_t lo_flags;
    uint8_t  lo_file_name[64];
    uint8_t  lo_crypt_name[64];
    uint8_t  lo_encrypt_key[32];
    uint64_t lo_init[2];
};

struct loop_config {
    uint32_t fd;
    uint32_t block_size;
    struct loop_info64 info;
    uint64_t __reserved[8];
};

/* libcryptsetup.h (cryptsetup 2.6, libcryptsetup.so.12) */
struct crypt_device;
int crypt_init(struct crypt_device **cd, const char *device);
int crypt_init_by_name(struct crypt_device **cd, const char *name);
void crypt_free(struct crypt_device *cd);
void crypt_set_log_callback(struct crypt_device *cd,
    void (*log)(int level, const char *msg, void *usrptr), void *usrptr);
int crypt_load(struct crypt_device *cd, const char *requested_type, void *params);
int crypt_volume_key_keyring(struct crypt_device *cd, int enable);
void crypt_token_external_disable(void);
int crypt_get_volume_key_size(struct crypt_device *cd);
int crypt_keyslot_status(struct crypt_device *cd, int keyslot);  /* crypt_keyslot_info */
int crypt_activate_by_passphrase(struct crypt_device *cd, const char *name, int keyslot,
    const char *passphrase, size_t passphrase_size, uint32_t flags);
int crypt_volume_key_get(struct crypt_device *cd, int keyslot, char *volume_key,
    size_t *volume_key_size, const char *passphrase, size_t passphrase_size);
int crypt_resize(struct crypt_device *cd, const char *name, uint64_t new_size);

/* tpm2-tss 3.2 (Debian 12: libtss2-esys.so.0, -tctildr.so.0, -mu.so.0, -rc.so.0), from
   tss2_esys.h, tss2_tctildr.h, tss2_mu.h, tss2_rc.h, tss2_tpm2_types.h. Contexts stay
   opaque; the structures pystate reads or fills field by field are declared; the large
   ones it only passes through (TPM2B_PUBLIC 616 bytes, TPM2B_PRIVATE 1552) are opaque and
   filled by the library's own unmarshalling into buffers of esys.py's sizes. */
typedef struct ESYS_CONTEXT ESYS_CONTEXT;
typedef struct TSS2_TCTI_OPAQUE_CONTEXT_BLOB TSS2_TCTI_CONTEXT;
typedef struct TPM2B_PUBLIC TPM2B_PUBLIC;
typedef struct TPM2B_PRIVATE TPM2B_PRIVATE;
typedef struct TPM2B_DATA TPM2B_DATA;
typedef struct TPM2B_NONCE TPM2B_NONCE;
typedef struct TPM2B_CREATION_DATA TPM2B_CREATION_DATA;
typedef struct TPMT_TK_CREATION TPMT_TK_CREATION;
typedef struct { uint16_t size; uint8_t buffer[64]; } TPM2B_DIGEST;
typedef struct { uint16_t size; uint8_t name[68]; } TPM2B_NAME;
typedef struct { uint16_t size; uint8_t buffer[256]; } TPM2B_SENSITIVE_DATA;
typedef struct { uint16_t size; uint8_t buffer[64]; } TPM2B_AUTH;
typedef struct { TPM2B_AUTH userAuth; TPM2B_SENSITIVE_DATA data; } TPMS_SENSITIVE_CREATE;
typedef struct { uint16_t size; TPMS_SENSITIVE_CREATE sensitive; } TPM2B_SENSITIVE_CREATE;
typedef struct { uint16_t algorithm; uint16_t keyBits; uint16_t mode; } TPMT_SYM_DEF;
typedef struct { uint16_t hash; uint8_t sizeofSelect; uint8_t pcrSelect[4]; } TPMS_PCR_SELECTION;
typedef struct { uint32_t count; TPMS_PCR_SELECTION pcrSelections[16]; } TPML_PCR_SELECTION;
typedef struct { uint16_t hashAlg; uint8_t digest[64]; } TPMT_HA;
typedef struct { uint32_t count; TPMT_HA digests[16]; } TPML_DIGEST_VALUES;
typedef struct { uint32_t count; TPM2B_DIGEST digests[8]; } TPML_DIGEST;
int Tss2_TctiLdr_Initialize(const char *nameConf, TSS2_TCTI_CONTEXT **context);
void Tss2_TctiLdr_Finalize(TSS2_TCTI_CONTEXT **context);
const char *Tss2_RC_Decode(uint32_t rc);
uint32_t Tss2_MU_TPM2B_PUBLIC_Unmarshal(const uint8_t buffer[], size_t buffer_size,
    size_t *offset, TPM2B_PUBLIC *dest);
uint32_t Tss2_MU_TPM2B_PUBLIC_Marshal(const TPM2B_PUBLIC *src, uint8_t buffer[],
    size_t buffer_size, size_t *offset);
uint32_t Tss2_MU_TPM2B_PRIVATE_Unmarshal(const uint8_t buffer[], size_t buffer_size,
    size_t *offset, TPM2B_PRIVATE *dest);
uint32_t Tss2_MU_TPM2B_PRIVATE_Marshal(const TPM2B_PRIVATE *src, uint8_t buffer[],
    size_t buffer_size, size_t *offset);
uint32_t Esys_Initialize(ESYS_CONTEXT **esys_context, TSS2_TCTI_CONTEXT *tcti, void *abiVersion);
void Esys_Finalize(ESYS_CONTEXT **context);
void Esys_Free(void *ptr);
uint32_t Esys_TR_FromTPMPublic(ESYS_CONTEXT *esysContext, uint32_t tpm_handle,
    uint32_t optionalSession1, uint32_t optionalSession2, uint32_t optionalSession3,
    uint32_t *object);
uint32_t Esys_TR_Close(ESYS_CONTEXT *esys_context, uint32_t *rsrc_handle);
uint32_t Esys_TR_GetName(ESYS_CONTEXT *esysContext, uint32_t handle, TPM2B_NAME **name);
uint32_t Esys_TRSess_SetAttributes(ESYS_CONTEXT *esysContext, uint32_t session,
    uint8_t flags, uint8_t mask);
uint32_t Esys_StartAuthSession(ESYS_CONTEXT *esysContext, uint32_t tpmKey, uint32_t bind,
    uint32_t shandle1, uint32_t shandle2, uint32_t shandle3, const TPM2B_NONCE *nonceCaller,
    uint8_t sessionType, const TPMT_SYM_DEF *symmetric, uint16_t authHash,
    uint32_t *sessionHandle);
uint32_t Esys_CreatePrimary(ESYS_CONTEXT *esysContext, uint32_t primaryHandle,
    uint32_t shandle1, uint32_t shandle2, uint32_t shandle3,
    const TPM2B_SENSITIVE_CREATE *inSensitive, const TPM2B_PUBLIC *inPublic,
    const TPM2B_DATA *outsideInfo, const TPML_PCR_SELECTION *creationPCR,
    uint32_t *objectHandle, TPM2B_PUBLIC **outPublic, TPM2B_CREATION_DATA **creationData,
    TPM2B_DIGEST **creationHash, TPMT_TK_CREATION **creationTicket);
uint32_t Esys_Create(ESYS_CONTEXT *esysContext, uint32_t parentHandle,
    uint32_t shandle1, uint32_t shandle2, uint32_t shandle3,
    const TPM2B_SENSITIVE_CREATE *inSensitive, const TPM2B_PUBLIC *inPublic,
    const TPM2B_DATA *outsideInfo, const TPML_PCR_SELECTION *creationPCR,
    TPM2B_PRIVATE **outPrivate, TPM2B_PUBLIC **outPublic, TPM2B_CREATION_DATA **creationData,
    TPM2B_DIGEST **creationHash, TPMT_TK_CREATION **creationTicket);
uint32_t Esys_Load(ESYS_CONTEXT *esysContext, uint32_t parentHandle, uint32_t shandle1,
    uint32_t shandle2, uint32_t shandle3, const TPM2B_PRIVATE *inPrivate,
    const TPM2B_PUBLIC *inPublic, uint32_t *objectHandle);
uint32_t Esys_PolicyPCR(ESYS_CONTEXT *esysContext, uint32_t policySession, uint32_t shandle1,
    uint32_t shandle2, uint32_t shandle3, const TPM2B_DIGEST *pcrDigest,
    const TPML_PCR_SELECTION *pcrs);
uint32_t Esys_Unseal(ESYS_CONTEXT *esysContext, uint32_t itemHandle, uint32_t shandle1,
    uint32_t shandle2, uint32_t shandle3, TPM2B_SENSITIVE_DATA **outData);
uint32_t Esys_FlushContext(ESYS_CONTEXT *esysContext, uint32_t flushHandle);
uint32_t Esys_PCR_Extend(ESYS_CONTEXT *esysContext, uint32_t pcrHandle, uint32_t shandle1,
    uint32_t shandle2, uint32_t shandle3, const TPML_DIGEST_VALUES *digests);
uint32_t Esys_PCR_Read(ESYS_CONTEXT *esysContext, uint32_t shandle1, uint32_t shandle2,
    uint32_t shandle3, const TPML_PCR_SELECTION *pcrSelectionIn, uint32_t *pcrUpdateCounter,
    TPML_PCR_SELECTION **pcrSelectionOut, TPML_DIGEST **pcrValues);
uint32_t Esys_PolicyGetDigest(ESYS_CONTEXT *esysContext, uint32_t policySession,
    uint32_t shandle1, uint32_t shandle2, uint32_t shandle3, TPM2B_DIGEST **policyDigest);
uint32_t Esys_ReadPublic(ESYS_CONTEXT *esysContext, uint32_t objectHandle, uint32_t shandle1,
    uint32_t shandle2, uint32_t shandle3, TPM2B_PUBLIC **outPublic, TPM2B_NAME **name,
    TPM2B_NAME **qualifiedName);
"""

# Written into the generated module so libc.py can notice a stale file in a dev checkout.
CDEF_SHA256 = hashlib.sha256(CDEF.encode()).hexdigest()


def generate(out_dir: Path) -> Path:
    """Write ``_linux_ffi.py`` into out_dir (atomically) and return its path.

    Needs cffi and pycparser (build time only). The output is a function of
    CDEF alone, so builds stay byte-for-byte reproducible.
    """
    import cffi  # build-time only: the initrd never imports this module's caller path

    ffibuilder = cffi.FFI()
    ffibuilder.cdef(CDEF)
    ffibuilder.set_source(MODULE_NAME, None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / FILE_NAME
    # A temporary name plus rename: parallel test runs in a dev checkout may
    # generate at the same time, and nobody may import a half-written file.
    fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=".py", dir=out_dir)
    os.close(fd)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # cffi prints "generating …"
            ffibuilder.emit_python_code(tmp_name)
        with open(tmp_name, "a", encoding="ascii") as f:
            f.write(f"\nCDEF_SHA256 = {CDEF_SHA256!r}\n")
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    return target


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1:
        print("usage: python3 -m pystate_initrd.system._ffi_build [OUTDIR]", file=sys.stderr)
        return 2
    out_dir = Path(args[0]) if args else Path(__file__).resolve().parent
    print(generate(out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
