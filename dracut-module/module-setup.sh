#!/bin/bash
# shellcheck disable=SC2154 # moddir, initdir, systemdsystemunitdir, SYSTEMCTL come from dracut
# dracut module "pystate": mounts the state partition and binds its entries
# onto the new root before switch-root (see README.md and docs/).
# The frozen program comes from a payload directory built by
# `build.py payload DIR` (default /usr/lib/pystate): pystate (the launcher script),
# pystate.zip (the package), python311.zip, lib-dynload/.

# Only when asked for (dracut --add pystate), never by host-only autodetection.
check() {
	require_binaries python3.11 e2fsck cryptsetup mkfs.ext4 cp || return 1
	[[ -e "${PYSTATE_PAYLOAD:-/usr/lib/pystate}/pystate.zip" ]] || return 1
	return 255
}

depends() {
	return 0
}

installkernel() {
	# dm-crypt with aes-xts-plain64; cryptsetup decrypts keyslots through AF_ALG.
	hostonly='' instmods loop ext4 btrfs xfs erofs squashfs overlay \
		tpm_tis tpm_crb tpm_tis_core dm_crypt xts ecb aesni_intel algif_skcipher
}

install() {
	local payload="${PYSTATE_PAYLOAD:-/usr/lib/pystate}" so
	inst_binary /usr/bin/python3.11
	ln_r /usr/bin/python3.11 /usr/bin/python3
	inst_simple "$payload/python311.zip" /usr/lib/python311.zip
	# The launcher finds pystate.zip beside its real path: both in /usr/lib/pystate, as in
	# the booted system, and /usr/bin/pystate (pystate.service's ExecStart) a link to it.
	inst_simple "$payload/pystate" /usr/lib/pystate/pystate
	inst_simple "$payload/pystate.zip" /usr/lib/pystate/pystate.zip
	ln_r /usr/lib/pystate/pystate /usr/bin/pystate
	for so in "$payload"/lib-dynload/*.so; do
		[[ -e "$so" ]] && inst_library "$so" "/usr/lib/python3.11/lib-dynload/${so##*/}"
	done
	# What those link: dracut-install resolves the libraries of executable files only, and
	# extension modules are 0644 (_cffi_backend: libffi; _uuid: libuuid).
	inst_libdir_file "libffi.so.8*" "libuuid.so.1*"

	# cp (coreutils, for xattrs and ACLs) seeds new entries; mkfs makes the image's fs.
	inst_multiple e2fsck resize2fs e2undo cryptsetup mkfs.ext4 cp
	inst_multiple -o btrfs mkfs.btrfs xfs_growfs fsck.ext4 /etc/mke2fs.conf \
		systemd-ask-password
	# pystate dlopen()s libcryptsetup (system/libcryptsetup.py); cryptsetup links it too.
	inst_libdir_file "libcryptsetup.so.12*"
	# Every TPM command goes through tpm2-tss's ESAPI in process (system/esys.py): these
	# libraries and the TCTI that libtss2-tctildr dlopen()s (dracut cannot see that) are all
	# the initrd needs. tpm2-tools, pystate's fallback where ESAPI does not load, are not
	# copied: they link these same libraries, so they could not run where ESAPI cannot, and
	# the `tpm2` binary brings libcurl, GnuTLS, Kerberos and LDAP (docs/performance.md).
	inst_libdir_file "libtss2-esys.so.0*" "libtss2-tctildr.so.0*" "libtss2-mu.so.0*" \
		"libtss2-rc.so.0*" "libtss2-sys.so.1*" "libtss2-tcti-device.so.0*"

	local conf="${PYSTATE_CONF:-/etc/pystate/pystate.conf}"
	[[ -e "$conf" ]] && inst_simple "$conf" /etc/pystate/pystate.conf

	if dracut_module_included "systemd"; then
		inst_simple "$moddir/pystate.service" "$systemdsystemunitdir/pystate.service"
		$SYSTEMCTL -q --root "$initdir" add-wants initrd-root-fs.target pystate.service
		# With dracut's systemd-repart module, repart makes the state partition on a
		# factory-fresh disk: after /sysroot is mounted, before pystate (docs/repart.md).
		if dracut_module_included "systemd-repart"; then
			inst_simple "$moddir/systemd-repart-pystate.conf" \
				"$systemdsystemunitdir/systemd-repart.service.d/50-pystate.conf"
		fi
	else
		inst_hook pre-pivot 50 "$moddir/pystate-hook.sh"
	fi
}
