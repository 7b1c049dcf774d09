"""Thin wrappers of the kernel and of external tools, one concept a module.

System calls through cffi (mounts, symlink-free path resolution, loop devices, block
devices, device-mapper), the one command runner, and cryptsetup, tpm2-tools, fsck,
the file-system growers and the password prompt. Nothing here knows the boot pipeline
or the resize service: arguments in, results or a typed error out.
"""
