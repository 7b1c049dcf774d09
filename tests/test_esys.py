"""system/esys.py: tpm2-tss's ESAPI in process (issue 13), against real libtss2 and swtpm.

The round trips, the refusals and the bus checks run in both modes in test_tpm2.py and
test_tpm2_session.py (their `tpm` fixture); here: what only ESAPI has — the choice of
mode, the error table, the templates against the library's own (un)marshalling, and
seal/unseal interchangeable between ESAPI and tpm2-tools.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import pytest
import swtpm as swtpm_helper
import test_tpm2
import test_tpm2_session
from hypothesis import given
from hypothesis import strategies as st
from swtpm import Swtpm, needs_swtpm

from pystate_initrd.formats import tpm2_policy
from pystate_initrd.formats.tpm2_policy import (
    BadBlob,
    DaLockout,
    NoTpm,
    PcrMismatch,
    Tpm2Error,
    TpmBusy,
)
from pystate_initrd.system import esys, tpm2

swtpm = swtpm_helper.swtpm
tpm = swtpm_helper.tpm
SECRET = b"esys-" + bytes(range(0x61, 0x7B))
TCTI = "device:/dev/tpmrm0"
tools = test_tpm2.tools


@pytest.fixture
def reload_esys() -> Iterator[None]:
    """esys._load is cached per process: forget it before and after the test."""
    esys._load.cache_clear()
    yield
    esys._load.cache_clear()


def test_mode_choice(monkeypatch: pytest.MonkeyPatch, reload_esys: None) -> None:
    monkeypatch.delenv(esys.ENV, raising=False)
    assert esys.mode() == "auto" and esys.available()
    for value, expected in (("cli", False), ("library", True), ("AUTO", True), ("bogus", True)):
        monkeypatch.setenv(esys.ENV, value)
        assert esys.available() is expected, value


def test_missing_library(monkeypatch: pytest.MonkeyPatch, reload_esys: None) -> None:
    """A real dlopen() of a SONAME that does not exist: auto falls back, library refuses."""
    monkeypatch.setitem(esys.LIBRARIES, "esys", "libtss2-esys-does-not-exist.so.0")
    monkeypatch.setenv(esys.ENV, "auto")
    assert not esys.available()
    monkeypatch.setenv(esys.ENV, "library")
    with pytest.raises(Tpm2Error, match="PYSTATE_TPM2=library, but cannot load"):
        esys.available()


def _error(call: str, rc: int) -> esys.CallError:
    return esys.CallError(call, rc, "text of the library")


@pytest.mark.parametrize(
    ("call", "rc", "kind", "fragment"),
    [
        ("Tss2_TctiLdr_Initialize", 0xA000A, NoTpm, "no TPM2 on device:/dev/tpmrm0"),
        ("Esys_Initialize", 0xA000A, NoTpm, "no TPM2"),
        ("Esys_Unseal", 0x99D, PcrMismatch, "PCR policy check failed"),
        ("Esys_Unseal", 0x128, PcrMismatch, "PCRs changed"),
        ("Esys_Unseal", 0x921, DaLockout, "dictionary-attack lockout"),
        ("Esys_Load", 0x921, DaLockout, "refused the load"),
        ("Esys_CreatePrimary", 0x922, TpmBusy, "TPM_RC_RETRY"),
        ("Esys_Unseal", 0x908, TpmBusy, "TPM_RC_YIELDED"),
        ("Esys_Load", 0x1DF, BadBlob, "invalid or foreign blob"),  # integrity
        ("Tss2_MU_TPM2B_PUBLIC_Unmarshal", 0x9000B, BadBlob, "invalid or foreign blob"),
        ("Esys_TR_FromTPMPublic", 0x18B, BadBlob, "no key at the parent handle"),
        ("Esys_Load", 0x902, Tpm2Error, "load"),  # out of object memory: not the blob
        ("Esys_PolicyPCR", 0x99D, Tpm2Error, "policypcr"),  # a policy failure elsewhere
        ("Esys_Unseal", 0x70001, Tpm2Error, "unseal"),  # ESAPI's own layer
        ("Esys_Unseal", 0x101, Tpm2Error, "is in failure mode and answered the unseal"),
        ("Esys_Load", 0xA000A, Tpm2Error, "stopped answering during the load"),
        ("Esys_Unseal", 0xA0008, Tpm2Error, "TSS2_TCTI_RC_NO_CONNECTION"),
    ],
)
def test_classify_esys(call: str, rc: int, kind: type[Tpm2Error], fragment: str) -> None:
    err = tpm2.classify_esys(_error(call, rc), TCTI, "the key")
    assert type(err) is kind
    assert fragment in str(err)
    assert TCTI in str(err)
    if kind in (DaLockout, TpmBusy):
        assert "PCR" not in str(err)


@functools.cache
def _mu() -> esys._Esys:
    """An ESAPI object without a TPM: only its (un)marshalling is used."""
    return esys._Esys(esys._lib(), TCTI)


def _round_trip(blob: bytes) -> bytes:
    mu = _mu()
    return mu.marshal("Tss2_MU_TPM2B_PUBLIC_Marshal", mu.unmarshal_public(blob), 4096)


@given(st.binary(min_size=32, max_size=32))
def test_sealed_template_is_what_tss2_reads(policy: bytes) -> None:
    assert _round_trip(tpm2_policy.sealed_template(policy)) == tpm2_policy.sealed_template(policy)


def test_primary_template_is_what_tss2_reads() -> None:
    assert _round_trip(tpm2_policy.primary_template()) == tpm2_policy.primary_template()


def test_sealed_template_refuses_other_digest_sizes() -> None:
    with pytest.raises(Tpm2Error, match="needs 32"):
        tpm2_policy.sealed_template(bytes(20))


@given(st.sets(st.integers(0, tpm2_policy.PCR_COUNT - 1), min_size=1))
def test_pcr_select_bits(pcrs: set[int]) -> None:
    bitmap = tpm2_policy.pcr_select(sorted(pcrs))
    assert len(bitmap) == 3
    assert {i for i in range(24) if bitmap[i // 8] >> (i % 8) & 1} == pcrs


@needs_swtpm
def test_primary_template_makes_the_primary_tpm2_tools_makes(tpm: Swtpm) -> None:
    """The transient parent ESAPI creates is the very key tpm2_createprimary creates."""
    expected = tpm2_policy.object_name(test_tpm2_session._primary_pub(tpm))
    with esys._esys(tpm.tcti) as c:
        _, name = c.parent(None, expected)
    assert name == expected


@needs_swtpm
@pytest.mark.parametrize(("sealer", "unsealer"), [("cli", "library"), ("library", "cli")])
def test_keys_interchangeable(
    tpm: Swtpm, sealer: str, unsealer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token sealed by one path unseals by the other: an initrd that falls back to
    tpm2-tools (or a newer one with ESAPI) reads what the other wrote."""
    monkeypatch.setenv(esys.ENV, sealer)
    key = tpm2.seal(SECRET, pcrs=[7], pcr15_zero=True, tcti=tpm.tcti)
    monkeypatch.setenv(esys.ENV, unsealer)
    assert tpm2.unseal(key, tcti=tpm.tcti) == SECRET


@needs_swtpm
def test_unseal_leaves_nothing_loaded_after_a_refusal(
    tpm: Swtpm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """swtpm has no resource manager: a refused unseal must still flush its objects and
    its session, or three refusals would fill the TPM's slots."""
    monkeypatch.setenv(esys.ENV, "library")
    key = tpm2.seal(SECRET, pcrs=[7], pcr15_zero=True, tcti=tpm.tcti)
    test_tpm2.tools(["tpm2_pcrextend", f"7:sha256={'11' * 32}"], tpm.tcti)
    for _ in range(4):
        with pytest.raises(PcrMismatch):
            tpm2.unseal(key, tcti=tpm.tcti)
        assert test_tpm2.loaded(tpm.tcti) == []
