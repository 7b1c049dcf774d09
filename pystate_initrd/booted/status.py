"""``pystate status``: what the initrd did and how the state looks now, in the booted system.

Sources: /run/pystate/boot.json (written in the initrd; /run survives switch-root),
then live facts — statvfs of /state and /state/encrypted, the size and allocation of
encrypted.img, its LUKS2 header (keyslots, the ``pystate-tpm2`` token: PCRs, bank; read
directly, no process), the TPM's PCRs against the token's sealed values (one
``tpm2_pcrread``: will the next boot unseal?) and /proc/self/mountinfo for the planned
targets. Whatever cannot
be read (no boot.json, not root for the header) is reported as such, never guessed.
``collect()`` builds the JSON; ``render()`` is the text view.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pystate_initrd.booted import factory_reset, resized
from pystate_initrd.errors import PystateError
from pystate_initrd.formats import luks2, mountinfo, names, pcr_diagnosis
from pystate_initrd.formats.resize_policy import human_size
from pystate_initrd.formats.token import pystate_tokens
from pystate_initrd.formats.tpm2_policy import SealedKey
from pystate_initrd.system import luks
from pystate_initrd.volume import binding

BOOT_JSON = Path("/run/pystate/boot.json")
INITRD_SYSROOT = "/sysroot"


def _booted_path(initrd_path: str, root: Path) -> Path:
    """Where an initrd path (/sysroot/state) is after switch-root (/state), under root."""
    if initrd_path == INITRD_SYSROOT or initrd_path.startswith(INITRD_SYSROOT + "/"):
        initrd_path = initrd_path[len(INITRD_SYSROOT) :] or "/"
    return root / initrd_path.lstrip("/")


def _space(path: Path) -> dict[str, Any]:
    try:
        st = os.statvfs(path)
    except OSError as exc:
        return {"error": f"{path}: {exc.strerror}"}
    size, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    return {"path": str(path), "size": size, "used": used, "free": free}


def _mounted(root: Path) -> dict[str, str]:
    """Mount point -> source, from mountinfo, for the mounts below root."""
    try:
        mounts = mountinfo.parse(Path(mountinfo.MOUNTINFO).read_text())
    except OSError:
        return {}
    prefix = str(root).rstrip("/")
    return {
        m.mountpoint[len(prefix) :] or "/": m.source
        for m in mounts
        if m.mountpoint.startswith(prefix)
    }


def next_boot(sealed: SealedKey, tcti: str | None, event_log: str | None) -> dict[str, Any]:
    """Would the TPM unseal at the next boot if nothing else changed? `unseal` is
    True/False, or None when it cannot be told (values not recorded, PCRs unreadable)."""
    try:
        check = binding.check_pcrs(sealed, pcr_diagnosis.Moment.NEXT_BOOT, tcti, event_log)
    except PystateError as exc:
        return {
            "unseal": None,
            "line": f"TPM2: sealed to {sealed.pcr_spec}; cannot read the PCRs now: {exc}",
            "error": str(exc),
        }
    return {
        "unseal": (not check.changed) if check.recorded else None,
        "line": pcr_diagnosis.status_line(sealed, check),
        **check.to_json(),
    }


def _header(image: Path, tcti: str | None = None, event_log: str | None = None) -> dict[str, Any]:
    try:
        header = luks.read_header(image)
    except luks.LuksError as exc:
        return {"error": str(exc)}
    slots = luks2.keyslot_infos(header.metadata)
    info: dict[str, Any] = {
        "uuid": header.uuid,
        "header_ok": header.primary_ok and header.secondary_ok,
        "data_offset": header.data_offset,
        "keyslots": {
            str(n): {"pbkdf": k.pbkdf, "iterations": k.iterations, "key_bits": k.key_bits}
            for n, k in slots.items()
        },
        "tpm2": None,
    }
    found = pystate_tokens(luks2.token_dicts(header.metadata))
    usable = next((t for t in found if t.sealed is not None), None)
    if usable is not None and usable.sealed is not None:
        sealed = usable.sealed
        info["tpm2"] = {
            "token": usable.token_id,
            "keyslot": usable.keyslot,
            "bank": sealed.bank,
            "pcrs": list(sealed.pcrs),
            "pcr15_zero": sealed.pcr15_zero,
            "primary": sealed.primary_alg,
            "next_boot": next_boot(sealed, tcti, event_log),
        }
    elif found:
        info["tpm2"] = {"token": found[-1].token_id, "error": found[-1].error}
    for n in slots:
        tpm = info["tpm2"]
        role = "tpm2" if tpm and tpm.get("keyslot") == n else "recovery?"
        if n == luks.RECOVERY_KEYSLOT:
            role = "recovery"
        info["keyslots"][str(n)]["role"] = role
    return info


def collect(
    boot_json: Path = BOOT_JSON,
    root: Path = Path("/"),
    *,
    tcti: str | None = None,
    event_log: str | None = None,
    efivars: Path | None = None,
) -> dict[str, Any]:
    """Everything `pystate status` shows, as one JSON-able dict. ``efivars``: efivarfs
    (default: under root), for a pending factory-reset request."""
    status: dict[str, Any] = {"boot_json": str(boot_json)}
    try:
        report: dict[str, Any] = json.loads(boot_json.read_text())
    except (OSError, ValueError) as exc:
        status["error"] = f"cannot read {boot_json}: {getattr(exc, 'strerror', None) or exc}"
        return status
    status["outcome"] = report.get("outcome")
    status["error"] = report.get("error")
    status["partition"] = report.get("partition")
    status["tpm2_refusal"] = report.get("tpm2_refusal")
    status["total_ms"] = report.get("total_ms")
    status["steps"] = [
        {"name": s.get("name"), "ms": s.get("ms"), "ok": s.get("ok")}
        for s in report.get("steps", [])
        if isinstance(s, dict)
    ]
    state = report.get("state") or {}
    if isinstance(state, dict) and state.get("mountpoint"):
        state_dir = _booted_path(str(state["mountpoint"]), root)
        status["outer"] = {**_space(state_dir), "fstype": state.get("fstype")}
        image = state_dir / names.IMAGE
        enc = report.get("encrypted") or {}
        status["encrypted"] = {"boot": enc}
        if image.exists():
            st = image.stat()
            status["encrypted"]["image"] = {
                "path": str(image),
                "size": st.st_size,
                "allocated": st.st_blocks * 512,
            }
            status["encrypted"]["luks"] = _header(image, tcti, event_log)
            status["encrypted"]["inner"] = _space(state_dir / names.MOUNT_DIR)
            status["resize"] = resized.status_view(state_dir)  # policy, last change, request
    live = _mounted(root)
    status["mounts"] = [
        {**m, "mounted": m.get("target") in live}
        for m in report.get("mounts", [])
        if isinstance(m, dict)
    ]
    status["rejected"] = report.get("rejected", [])
    status["factory_reset"] = _factory_reset(
        report.get("factory_reset"), efivars or root / "sys/firmware/efi/efivars"
    )
    return status


def _factory_reset(this_boot: Any, efivars: Path) -> dict[str, Any]:
    """This boot's factory-reset decision (boot.json) and a request pending for the next."""
    info: dict[str, Any] = {"boot": this_boot if isinstance(this_boot, dict) else None}
    if efivars.is_dir():
        info.update(factory_reset.read_pending(efivars).to_json())
    return info


def _factory_reset_lines(info: dict[str, Any]) -> list[str]:
    out = []
    boot = info.get("boot") or {}
    if boot.get("complete"):
        out.append(f"factory reset: done at this boot ({boot.get('reason')})")
    elif boot.get("action") in ("reset", "finish"):
        out.append(f"factory reset: NOT finished at this boot ({boot.get('reason')})")
    out.extend(f"this boot: {line}" for line in boot.get("warnings", []))
    out.extend(f"this boot: {line}" for line in boot.get("notes", []))
    request = info.get("request")
    if request is not None:
        oneshot = info.get("oneshot")
        how = (
            "the boot loader starts it once"
            if oneshot is not None and oneshot.casefold() == str(request).casefold()
            else "no one-shot entry set: pick it in the boot menu"
        )
        out.append(
            f"factory reset: REQUESTED for boot entry {request!r} ({how}): that boot "
            "crypto-erases encrypted.img and deletes the plain entries; "
            "`pystate factory-reset --cancel` withdraws it"
        )
    out.extend(f"factory reset: {error}" for error in info.get("errors", []))
    return out


def _size_line(space: dict[str, Any]) -> str:
    if "error" in space:
        return str(space["error"])
    return (
        f"{human_size(space['size'])}, {human_size(space['used'])} used, "
        f"{human_size(space['free'])} free"
    )


def render(status: dict[str, Any]) -> str:
    out = []
    if "outcome" not in status:
        return f"pystate: {status.get('error')}"
    out.append(
        f"boot: {status['outcome']} in {status['total_ms']} ms"
        + (f" — {status['error']}" if status.get("error") else "")
    )
    refusal = status.get("tpm2_refusal")
    if isinstance(refusal, dict) and refusal.get("line"):
        out.append(f"this boot: {refusal['line']}")
    part = status.get("partition") or {}
    if part:
        out.append(f"partition: {part.get('device')} PARTUUID {part.get('part_uuid')} "
                   f"({part.get('reason')})")  # fmt: skip
    if "outer" in status:
        outer = status["outer"]
        out.append(f"outer ({outer.get('fstype')}): {_size_line(outer)}")
    enc = status.get("encrypted") or {}
    if "image" in enc:
        img = enc["image"]
        how = enc["boot"].get("unlocked_by", "?")
        opened = "created at this boot" if how == "provisioned" else f"unlocked by {how}"
        out.append(
            f"encrypted.img: {human_size(img['size'])} ({human_size(img['allocated'])} allocated)"
            f", {opened}"
        )
        out.append(f"inner: {_size_line(enc.get('inner', {}))}")
        out.extend(resized.status_lines(status.get("resize") or {}))
        header = enc.get("luks", {})
        if "error" in header:
            out.append(f"LUKS2: {header['error']}")
        else:
            out.append(f"LUKS2 {header['uuid']}" + ("" if header["header_ok"] else " (DAMAGED)"))
            tpm = header.get("tpm2") or {}
            if "pcrs" in tpm:
                pcrs = "+".join(str(p) for p in tpm["pcrs"])
                out.append(f"TPM2: keyslot {tpm['keyslot']}, PCRs {tpm['bank']}:{pcrs}"
                           f"{' (15 = zero, measured)' if tpm['pcr15_zero'] else ''}")  # fmt: skip
                if tpm.get("next_boot"):
                    out.append(str(tpm["next_boot"]["line"]))
            elif tpm:
                out.append(f"TPM2: token {tpm['token']}: {tpm.get('error')}")
            for n, slot in header["keyslots"].items():
                out.append(f"  keyslot {n}: {slot['role']}, {slot['pbkdf']} {slot['iterations']}")
    elif enc:
        out.append(f"encrypted: {enc.get('boot')}")
    for m in status.get("mounts", []):
        mark = "" if m["mounted"] else "  (NOT MOUNTED)"
        out.append(f"mount: {m['area']:<9} {m['name']:<20} -> {m['target']}{mark}")
    for r in status.get("rejected", []):
        out.append(f"rejected: {r.get('area')} {r.get('name')!r}: {r.get('reason')}")
    out.extend(_factory_reset_lines(status.get("factory_reset") or {}))
    out.append("steps (ms): " + ", ".join(f"{s['name']} {s['ms']}" for s in status["steps"]))
    return "\n".join(out)
