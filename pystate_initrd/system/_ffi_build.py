"""The C declarations behind system/libc.py, system/libcryptsetup.py and their users,
for cffi's out-of-line ABI mode.

At build time this file turns the declarations below into ``_linux_ffi.py``, a
pure-Python module that imports only ``_cffi_backend``: the initrd then needs
the backend (Debian's python3-cffi-backend) but neither cffi's parser nor
pycparser. Nothing is compiled; libc and libcryptsetup.so.12 are opened at run
time with dlopen() (one ffi object serves both).

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
