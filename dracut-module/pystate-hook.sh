#!/bin/sh
# dracut pre-pivot hook (non-systemd initrd): the root is mounted at $NEWROOT.
# shellcheck source=/dev/null
type die >/dev/null 2>&1 || . /lib/dracut-lib.sh

if ! /usr/bin/pystate boot --sysroot "${NEWROOT:-/sysroot}"; then
	die "pystate: the state partition could not be set up (the reason is above)"
fi
