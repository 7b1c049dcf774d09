"""The boot pipeline, run in the initrd before switch-root.

discover -> fsck -> mount the state partition -> provision or unlock ``encrypted.img``
(with an offline shrink carried out first when one was requested) -> plan -> bind
mounts onto /sysroot. Entry point: ``boot.run_boot``.
"""
