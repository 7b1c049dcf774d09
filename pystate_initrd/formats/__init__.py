"""Pure formats and rules: bytes and text in, typed values or decisions out.

No I/O and no processes: GPT, the LUKS2 header, the ``pystate-tpm2`` token and its PCR
policy, systemd path escaping, recovery keys, superblocks, mountinfo, the kernel command
line, the mount plan, the resize policy, the shrink request and the names on /state.
Everything here imports nothing of pystate but ``errors`` and its own siblings, so it is
tested fast, with hypothesis, against the reference tools.
"""
