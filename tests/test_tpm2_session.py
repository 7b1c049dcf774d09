"""Issue 13: the salted session that hides the unsealed secret on the TPM bus, and the
persistent SRK at 0x81000001 as the parent (real tpm2-tools 5.4, real swtpm).

The oracle for "the secret does not cross the bus in the clear" is swtpm's own log at
level 20, which shows every command and response the TPM received and sent, in hex.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import swtpm as swtpm_helper
import test_tpm2
from swtpm import Swtpm, needs_swtpm

from pystate_initrd.formats import token, tpm2_policy
from pystate_initrd.formats.tpm2_policy import BadBlob, SealedKey
from pystate_initrd.system import tpm2

pytestmark = needs_swtpm
swtpm = swtpm_helper.swtpm
tpm = swtpm_helper.tpm_both  # every test against swtpm: ESAPI and tpm2-tools
tpm_cli = swtpm_helper.tpm_cli
spawns = test_tpm2.spawns  # a fixture: the commands pystate's runner started
tools = test_tpm2.tools
SECRET = b"pystate-secret-" + bytes(range(0x41, 0x52))  # 32 bytes, easy to spot
TPM_CC_UNSEAL = 0x15E
TPM_CC_CREATE = 0x153


# --------------------------------------------------- swtpm's log: what crossed the bus


def exchanges(log: str) -> Iterator[tuple[bytes, bytes]]:
    """(command, response) pairs from a swtpm log at level 20 (SWTPM_IO_Read/_Write)."""
    blocks: list[tuple[str, bytearray]] = []
    for line in log.splitlines():
        head = line.strip()
        if head.startswith(("SWTPM_IO_Read:", "SWTPM_IO_Write:")):
            blocks.append((head.split(":")[0], bytearray()))
        elif blocks and head and all(len(w) == 2 for w in head.split()):
            try:
                blocks[-1][1].extend(bytes.fromhex(head))
            except ValueError:
                blocks.append(("other", bytearray()))
        else:
            blocks.append(("other", bytearray()))
    command = None
    for kind, data in blocks:
        if kind == "SWTPM_IO_Read":
            command = bytes(data)
        elif kind == "SWTPM_IO_Write" and command is not None:
            yield command, bytes(data)
            command = None


def session_attributes(command: bytes, handles: int = 1) -> list[int]:
    """The TPMA_SESSION byte of each session in a command with `handles` handles."""
    end = 10 + 4 * handles + 4 + int.from_bytes(command[10 + 4 * handles : 14 + 4 * handles], "big")
    pos, found = 14 + 4 * handles, []
    while pos < end:
        pos += 4  # session handle
        pos += 2 + int.from_bytes(command[pos : pos + 2], "big")  # nonceCaller
        found.append(command[pos])
        pos += 1
        pos += 2 + int.from_bytes(command[pos : pos + 2], "big")  # hmac
    return found


def on_the_bus(emu: Swtpm, code: int) -> list[tuple[bytes, bytes]]:
    log = (emu.dir / "log").read_text(errors="replace")
    return [(c, r) for c, r in exchanges(log) if int.from_bytes(c[6:10], "big") == code]


@pytest.fixture
def traced() -> Iterator[Swtpm]:
    emu = Swtpm(log_level=20)
    try:
        emu.start()
        yield emu
    finally:
        emu.cleanup()


def make_srk(
    tcti: str,
    work: os.PathLike[str],
    attributes: str = tpm2.PRIMARY_ATTRIBUTES,
    alg: str = "ecc256:aes128cfb",
) -> None:
    """A persistent key at 0x81000001: by default the SRK systemd makes (ECC P-256, noda)."""
    ctx = os.path.join(work, "srk.ctx")
    tools(
        ["tpm2_createprimary", "-Q", "-C", "o", "-g", "sha256", "-G", alg,
         "-a", attributes, "-c", ctx],
        tcti,
    )  # fmt: skip
    tools(["tpm2_evictcontrol", "-Q", "-C", "o", "-c", ctx, "0x81000001"], tcti)
    tools(["tpm2_flushcontext", "-t"], tcti)


def drop_srk(tcti: str) -> None:
    tools(["tpm2_evictcontrol", "-Q", "-C", "o", "-c", "0x81000001"], tcti)


@pytest.mark.parametrize("mode", ["library", "cli"])
@pytest.mark.parametrize("parent", ["primary", "srk"])
def test_salted_unseal_hides_the_secret_on_the_bus(
    traced: Swtpm, parent: str, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYSTATE_TPM2", mode)
    if parent == "srk":
        make_srk(traced.tcti, traced.dir)
    key = tpm2.seal(SECRET, pcrs=[7], pcr15_zero=True, tcti=traced.tcti)
    assert (key.parent is not None) == (parent == "srk")
    (traced.dir / "log").write_text("")
    # The control: tpm2_unseal's own policy session returns the secret in the clear.
    with monkeypatch.context() as m:
        m.setenv("PYSTATE_TPM2", "cli")
        assert tpm2.unseal(key, tcti=traced.tcti, salted=False) == SECRET
    [(_, plain)] = on_the_bus(traced, TPM_CC_UNSEAL)
    assert SECRET in plain
    (traced.dir / "log").write_text("")
    assert tpm2.unseal(key, tcti=traced.tcti) == SECRET  # salted: ESAPI, or tools on swtpm
    [(command, response)] = on_the_bus(traced, TPM_CC_UNSEAL)
    assert SECRET not in response
    assert int.from_bytes(response[6:10], "big") == 0  # TPM_RC_SUCCESS
    assert command[:2] == b"\x80\x02"  # with sessions
    if mode == "cli":
        # Two sessions: the PCR policy session and the encrypt session (TPMA_SESSION 0x41
        # = continueSession|encrypt), and the 34-byte response parameter.
        assert session_attributes(command) == [0x01, 0x41]
        assert len(response) > len(plain)
    else:
        # One: the salted policy session with the encrypt attribute alone (0x40: the TPM
        # ends it with the command), so the response's parameter is the same size as
        # the plaintext one but not the same bytes.
        assert session_attributes(command) == [0x40]
        assert len(response) == len(plain) and response != plain


@pytest.mark.parametrize("mode", ["library", "cli"])
def test_salted_seal_hides_the_secret_on_the_bus(
    traced: Swtpm, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYSTATE_TPM2", mode)
    tpm2.seal(SECRET, pcrs=[7], pcr15_zero=True, tcti=traced.tcti)
    [(command, _)] = on_the_bus(traced, TPM_CC_CREATE)
    assert SECRET not in command
    with monkeypatch.context() as m:  # the control: the same TPM2_Create, unsalted
        m.setattr(tpm2, "salted_by_default", lambda tcti: False)
        m.setenv("PYSTATE_TPM2", "cli")
        (traced.dir / "log").write_text("")
        tpm2.seal(SECRET, pcrs=[7], pcr15_zero=True, tcti=traced.tcti)
        [(command, _)] = on_the_bus(traced, TPM_CC_CREATE)
        assert SECRET in command


def test_esys_unseal_starts_no_process(
    swtpm: Swtpm, spawns: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYSTATE_TPM2", "library")
    tpm = swtpm
    tpm.restart()
    key = tpm2.seal(SECRET, pcrs=[7], pcr15_zero=True, tcti=tpm.tcti)
    assert spawns == []
    assert tpm2.unseal(key, tcti=tpm.tcti) == SECRET
    make_srk(tpm.tcti, tpm.dir)
    try:
        srk_key = tpm2.seal(SECRET, pcrs=[7], pcr15_zero=True, tcti=tpm.tcti)
        assert srk_key.parent == tpm2_policy.SRK_HANDLE
        spawns.clear()
        assert tpm2.unseal(srk_key, tcti=tpm.tcti) == SECRET
        assert spawns == []
    finally:
        drop_srk(tpm.tcti)


def test_salted_session_checks_the_parent_name(tpm: Swtpm) -> None:
    key = tpm2.seal(SECRET, pcrs=[7], pcr15_zero=True, tcti=tpm.tcti)
    assert key.parent_name == tpm2_policy.object_name(_primary_pub(tpm))
    forged = SealedKey(**{**key.__dict__, "parent_name": b"\x00\x0b" + bytes(32)})
    with pytest.raises(BadBlob, match="parent key whose name is not the one recorded"):
        tpm2.unseal(forged, tcti=tpm.tcti)
    # Without a resource manager nothing may stay behind, even after the refusal.
    assert tpm2.unseal(key, tcti=tpm.tcti) == SECRET


def _primary_pub(emu: Swtpm) -> bytes:
    out = emu.dir / "p.pub"
    tools(
        ["tpm2_createprimary", "-Q", "-C", "o", "-g", "sha256", "-G", "ecc256:aes128cfb",
         "-a", tpm2.PRIMARY_ATTRIBUTES, "-c", str(emu.dir / "p.ctx"), "-o", str(out)],
        emu.tcti,
    )  # fmt: skip
    tools(["tpm2_flushcontext", "-t"], emu.tcti)
    return out.read_bytes()


def test_object_name_matches_readpublic(tpm: Swtpm) -> None:
    public = _primary_pub(tpm)
    tools(
        ["tpm2_readpublic", "-c", str(tpm.dir / "p.ctx"), "-n", str(tpm.dir / "p.name")], tpm.tcti
    )
    tools(["tpm2_flushcontext", "-t"], tpm.tcti)
    assert tpm2_policy.object_name(public) == (tpm.dir / "p.name").read_bytes()


def test_spawns_salted_and_unsalted(tpm_cli: Swtpm, spawns: list[str]) -> None:
    tpm = tpm_cli
    key = tpm2.seal(SECRET, pcrs=[7], pcr15_zero=True, tcti=tpm.tcti)
    assert spawns == [
        "tpm2_pcrread", "tpm2_createpolicy", "tpm2_readpublic", "tpm2_createprimary",
        "tpm2_startauthsession", "tpm2_flushcontext", "tpm2_create",
        "tpm2_flushcontext", "tpm2_flushcontext", "tpm2_flushcontext",
    ]  # fmt: skip
    spawns.clear()
    assert tpm2.unseal(key, tcti=tpm.tcti) == SECRET
    assert spawns == [
        "tpm2_createprimary", "tpm2_startauthsession", "tpm2_flushcontext", "tpm2_load",
        "tpm2_unseal", "tpm2_flushcontext", "tpm2_flushcontext",
    ]  # fmt: skip
    spawns.clear()
    assert tpm2.unseal(key, tcti=tpm.tcti, salted=False) == SECRET  # the /dev/tpmrm0 form
    assert spawns == ["tpm2_load", "tpm2_unseal", "tpm2_flushcontext"]
    spawns.clear()
    make_srk(tpm.tcti, tpm.dir)
    try:
        srk_key = tpm2.seal(SECRET, pcrs=[7], pcr15_zero=True, tcti=tpm.tcti)
        spawns.clear()
        assert tpm2.unseal(srk_key, tcti=tpm.tcti) == SECRET
        assert spawns == [
            "tpm2_startauthsession", "tpm2_load", "tpm2_unseal",
            "tpm2_flushcontext", "tpm2_flushcontext",
        ]  # fmt: skip
        spawns.clear()
        assert tpm2.unseal(srk_key, tcti=tpm.tcti, salted=False) == SECRET
        assert spawns == ["tpm2_load", "tpm2_unseal", "tpm2_flushcontext"]
    finally:
        drop_srk(tpm.tcti)


def test_salted_by_default_only_without_resource_manager() -> None:
    assert tpm2.salted_by_default("swtpm:path=/x")
    assert tpm2.salted_by_default("device:/dev/tpm0")
    assert not tpm2.salted_by_default("device:/dev/tpmrm0")
    assert not tpm2.salted_by_default("tabrmd:bus_type=system")


# ------------------------------------------------------------ the persistent SRK


def test_srk_is_used_and_recorded(tpm: Swtpm) -> None:
    make_srk(tpm.tcti, tpm.dir)
    try:
        key = tpm2.seal(SECRET, pcrs=[7], pcr15_zero=True, tcti=tpm.tcti)
        assert key.parent == 0x81000001
        tools(["tpm2_readpublic", "-c", "0x81000001", "-n", str(tpm.dir / "srk.name")], tpm.tcti)
        assert key.parent_name == (tpm.dir / "srk.name").read_bytes()
        decoded, _ = token.decode_token(token.encode_token_json(key, 1))
        assert decoded == key
        assert tpm2.unseal(decoded, tcti=tpm.tcti) == SECRET
        assert tpm2.unseal(decoded, tcti=tpm.tcti, salted=False) == SECRET
        # A transient-primary key sealed before the SRK existed still unseals beside it.
    finally:
        drop_srk(tpm.tcti)
    with pytest.raises(tpm2.Tpm2Error):
        tpm2.unseal(key, tcti=tpm.tcti)  # the SRK is gone: nothing else can load the blob


@pytest.mark.parametrize(
    ("attributes", "alg"),
    [
        # without noda a dictionary-attack lockout would block every unseal
        (tpm2.PRIMARY_ATTRIBUTES.replace("|noda", ""), "ecc256:aes128cfb"),
        # not fixedtpm|fixedparent: could be duplicated out of the TPM
        (tpm2.PRIMARY_ATTRIBUTES.replace("fixedtpm|fixedparent|", ""), "ecc256:aes128cfb"),
        # a signing key, no storage key
        (
            "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign|noda",
            "ecc256:ecdsa-sha256:null",
        ),
    ],
)
def test_unsuitable_srk_is_not_used(tpm: Swtpm, attributes: str, alg: str) -> None:
    make_srk(tpm.tcti, tpm.dir, attributes, alg)
    try:
        key = tpm2.seal(SECRET, pcrs=[7], pcr15_zero=True, tcti=tpm.tcti)
        assert key.parent is None
        assert tpm2.unseal(key, tcti=tpm.tcti) == SECRET
    finally:
        drop_srk(tpm.tcti)


def test_token_without_parent_fields_unseals(tpm: Swtpm) -> None:
    """A token written before issue 13 (no pystate-parent, no pystate-parent-name)."""
    key = tpm2.seal(SECRET, pcrs=[7], pcr15_zero=True, tcti=tpm.tcti)
    text = token.encode_token(key, 1)
    del text[token.PARENT_NAME]
    assert token.PARENT not in text
    old, _ = token.decode_token(text)
    assert old.parent is None and old.parent_name is None
    assert tpm2.unseal(old, tcti=tpm.tcti) == SECRET
    assert tpm2.unseal(old, tcti=tpm.tcti, salted=False) == SECRET


# -------------------------------------------------------------------- pure: tables


def _public(kind: int = 0x23, alg: int = 0x0B, attrs: int = 0x00030472) -> bytes:
    body = kind.to_bytes(2, "big") + alg.to_bytes(2, "big") + attrs.to_bytes(4, "big") + b"\0\0"
    return len(body).to_bytes(2, "big") + body


@pytest.mark.parametrize(
    ("public", "reason"),
    [
        (_public(), None),
        (_public(kind=0x01), None),  # RSA SRK (Windows)
        (_public(kind=0x08), "not an ECC or RSA key"),
        (_public(alg=0x04), "name algorithm 0x0004"),
        (_public(attrs=0x00030072), "lack noda"),
        (_public(attrs=0x00030460), "lack fixedtpm|fixedparent"),
        (_public(attrs=0x00020472), "lack restricted"),
        (_public(attrs=0x00070472), "include sign"),
        (_public(attrs=0x00030432), "lack userwithauth"),
        (_public()[:-1], "inconsistent size"),
        (b"", "inconsistent size"),
    ],
)
def test_srk_refusal(public: bytes, reason: str | None) -> None:
    got = tpm2_policy.srk_refusal(public)
    assert got == reason if reason is None else reason in (got or "")


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        (token.PARENT, "0x81000002", "is not 0x81000001"),
        (token.PARENT, 0x81000001, "is not 0x81000001"),
        (token.PARENT_NAME, "000b" + "00" * 31, "is not 68 lowercase hex digits"),
        (token.PARENT_NAME, "0004" + "00" * 32, "not a sha256 name"),
        (token.PARENT_NAME, "000B" + "00" * 32, "lowercase hex"),
    ],
)
def test_token_parent_refusals(field: str, value: object, error: str) -> None:
    key = SealedKey(
        public=_sealed_public(), private=b"\x00\x01\x00", bank="sha256", pcrs=(7,),
        policy_hash=bytes(32), pcr15_zero=False, parent=0x81000001,
        parent_name=b"\x00\x0b" + bytes(32),
    )  # fmt: skip
    obj = token.encode_token(key, 1)
    assert token.decode_token(obj)[0] == key
    obj[field] = value
    with pytest.raises(token.TokenError, match=error):
        token.decode_token(obj)


def _sealed_public() -> bytes:
    body = b"\x00\x08\x00\x0b" + (0x00000412).to_bytes(4, "big") + b"\x00\x20" + bytes(32)
    body += b"\x00\x10\x00\x00"  # keyedhash scheme null, empty unique
    return len(body).to_bytes(2, "big") + body
