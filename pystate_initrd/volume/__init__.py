"""What the initrd and the booted system both do to ``encrypted.img``.

Its stack (file -> loop device -> dm-crypt -> inner file system): attach, open, check,
mount and tear down; the PCR 15 measurement; the TPM2 seal and its token; the resize
steps in their crash-safe order; the shrink request on /state.
"""
