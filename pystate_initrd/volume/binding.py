"""The TPM2 binding of encrypted.img: a secret sealed with the configured policy, the
``pystate-tpm2`` token that stores it, and the PCR 15 measurement of the opened volume.

Provisioning and the re-seal after a recovery unlock seal the same way (``seal``); the
unlock path and ``pystate status`` find the token the same way (formats/token.py).
"""

from __future__ import annotations

from pystate_initrd.config import Config
from pystate_initrd.formats import tpm2_policy
from pystate_initrd.system import tpm2


def seal(cfg: Config, secret: bytes | bytearray, tcti: str | None) -> tpm2_policy.SealedKey:
    """Seal secret to the configured PCRs (and PCR 15 = zero when it is measured)."""
    return tpm2.seal(
        secret,
        pcrs=cfg.pcrs,
        bank=str(cfg.pcr_bank),
        pcr15_zero=cfg.measure_pcr15,
        tcti=tcti,
    )


def extend_pcr15(volume_key: bytes | bytearray, uuid: str, bank: str, tcti: str | None) -> None:
    """PCR 15 += HMAC(volume key, "pystate:<uuid>"), in the bank's size (SPEC §5)."""
    digest = tpm2_policy.volume_measurement(volume_key, uuid, bank)
    tpm2.pcr_extend(tpm2_policy.PCR_VOLUME, bank, digest, tcti)
