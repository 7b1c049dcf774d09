"""The TPM2 binding of encrypted.img: a secret sealed with the configured policy, the
``pystate-tpm2`` token that stores it, and the PCR 15 measurement of the opened volume.

Provisioning and the re-seal after a recovery unlock seal the same way (``seal``); the
unlock path and ``pystate status`` find the token the same way (formats/token.py) and
compare its sealed PCR values with the TPM's the same way (``check_pcrs``; the unlock
path through ``diagnose_mismatch``, which never raises).
"""

from __future__ import annotations

from typing import Any

from pystate_initrd.config import Config
from pystate_initrd.errors import PystateError
from pystate_initrd.formats import pcr_diagnosis, tcg_eventlog, tpm2_policy
from pystate_initrd.system import tpm2


def seal(
    cfg: Config, secret: bytes | bytearray, tcti: str | None, event_log: str | None = None
) -> tpm2_policy.SealedKey:
    """Seal secret to the configured PCRs (and PCR 15 = zero when it is measured); the
    key records the sealed values and the event-log summary (tpm2.seal)."""
    return tpm2.seal(
        secret,
        pcrs=cfg.pcrs,
        bank=str(cfg.pcr_bank),
        pcr15_zero=cfg.measure_pcr15,
        tcti=tcti,
        event_log=event_log,
    )


def extend_pcr15(volume_key: bytes | bytearray, uuid: str, bank: str, tcti: str | None) -> None:
    """PCR 15 += HMAC(volume key, "pystate:<uuid>"), in the bank's size (SPEC §5)."""
    digest = tpm2_policy.volume_measurement(volume_key, uuid, bank)
    tpm2.pcr_extend(tpm2_policy.PCR_VOLUME, bank, digest, tcti)


def check_pcrs(
    key: tpm2_policy.SealedKey,
    moment: pcr_diagnosis.Moment,
    tcti: str | None,
    event_log: str | None = None,
) -> pcr_diagnosis.PcrCheck:
    """The key's sealed PCR values against the TPM's now (and the event logs, when the
    token has a summary). Tpm2Error when the PCRs cannot be read."""
    pcrs = pcr_diagnosis.compare_pcrs(key, moment)
    current = tpm2.pcr_read(key.bank, pcrs, tcti) if pcrs and key.pcr_values is not None else {}
    log, log_error = None, ""
    if key.pcr_logs:
        try:
            log = tpm2.read_event_log(event_log)
        except tcg_eventlog.EventLogError as exc:
            log_error = str(exc)
    return pcr_diagnosis.compare(key, current, log, moment, log_error)


def diagnose_mismatch(
    key: tpm2_policy.SealedKey, tcti: str | None, event_log: str | None = None
) -> tuple[str, dict[str, Any]]:
    """The console line and the boot.json record for a PcrMismatch. Never raises: it runs
    on the way to the recovery prompt, so a failure only makes the line shorter."""
    try:
        if key.pcr_values is None:
            # Nothing to compare with; the current values still help whoever reads it.
            current = tpm2.pcr_read(key.bank, key.measured_pcrs, tcti) if key.measured_pcrs else {}
            check = pcr_diagnosis.PcrCheck(key.pcr_spec, False, (), (), current)
        else:
            check = check_pcrs(key, pcr_diagnosis.Moment.UNLOCK, tcti, event_log)
        return pcr_diagnosis.mismatch_line(key, check), check.to_json()
    except Exception as exc:  # the recovery prompt must come whatever went wrong here
        reason = f"{type(exc).__name__}: {exc}" if not isinstance(exc, PystateError) else str(exc)
        line = f"TPM2 refused the key sealed to {key.pcr_spec}; cannot say which PCR changed"
        return f"{line}: {reason}", {"pcrs": key.pcr_spec, "error": reason}
