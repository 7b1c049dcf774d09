"""The trusted configuration (SPEC §9): the initrd's pystate.conf plus the kernel command line.

Nothing else is trusted: in particular nothing read from the state partition ends up here.
Every setting is declared once, in ``SETTINGS`` (and ``LAYOUT_KEYS`` for the per-target
layout sections); parsing, defaults, error messages and the reference in
docs/configuration.md are all derived from those tables.

Pure logic apart from reading the one file; every bad value raises ``ConfigError`` with one
line naming where it came from (file:line or the command-line word), the key, the value and
what is accepted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from pystate_initrd.errors import PystateError
from pystate_initrd.formats.cmdline import CmdlineError, format_cmdline, parse_cmdline
from pystate_initrd.formats.escape import NAME_MAX, EscapeError, escape_path

# Re-exported (the explicit form mypy --strict wants): the layout's vocabulary is plan's.
from pystate_initrd.formats.plan import Area as Area  # noqa: PLC0414
from pystate_initrd.formats.plan import MountMode as MountMode  # noqa: PLC0414
from pystate_initrd.formats.plan import target_refusal
from pystate_initrd.formats.reset_decision import RequestSource as RequestSource  # noqa: PLC0414

if TYPE_CHECKING:
    from configparser import ConfigParser

CONF_PATH = Path("/etc/pystate/pystate.conf")
MIB = 1024 * 1024
MIN_IMAGE_SIZE = 256 * MIB  # SPEC §6/§7: the image never goes below this
# A configuration file is a few hundred bytes. 64 KiB (~2000 layout sections) loads in well
# under a second; 1 MiB of them took seconds (build.py fuzz).
MAX_CONF_SIZE = 64 * 1024
MAX_PCR = 23  # a TPM2 has PCRs 0-23


class ConfigError(PystateError):
    """A bad configuration value, file or command-line word."""


class InnerFs(StrEnum):
    EXT4 = "ext4"
    BTRFS = "btrfs"


class Allocation(StrEnum):
    FULL = "full"
    SPARSE = "sparse"


class PcrBank(StrEnum):
    SHA1 = "sha1"
    SHA256 = "sha256"
    SHA384 = "sha384"
    SHA512 = "sha512"


# --------------------------------------------------------------------------------------------
# Value parsers. Each takes the raw text and returns the typed value or raises ConfigError
# with the problem alone; the loader adds where the value came from and what is accepted.


def _show(value: str) -> str:
    """A value quoted for a one-line message, backslashes, quotes and unprintables escaped."""
    escaped = (
        c if c.isprintable() and c not in '"\\' else repr(c)[1:-1] if c != '"' else '\\"'
        for c in value
    )
    return '"' + "".join(escaped) + '"'


def _parse_uint(text: str) -> int:
    # int() would also take "+5", " 5", "1_000" and non-ASCII digits.
    if not (text.isascii() and text.isdigit()):
        raise ConfigError(f"{_show(text)} is not a non-negative whole number")
    if len(text) > 20:
        raise ConfigError(f"{_show(text)} is too large")
    return int(text)


_BOOL_TRUE = frozenset({"1", "yes", "y", "true", "t", "on"})
_BOOL_FALSE = frozenset({"0", "no", "n", "false", "f", "off"})


def parse_bool(text: str) -> bool:
    """A boolean as systemd's parse_boolean() takes it."""
    lowered = text.strip().lower()
    if lowered in _BOOL_TRUE:
        return True
    if lowered in _BOOL_FALSE:
        return False
    raise ConfigError(f"{_show(text)} is not a boolean")


def format_bool(value: bool) -> str:
    return "yes" if value else "no"


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gib": 1 << 30,
    "t": 1 << 40,
    "tib": 1 << 40,
}


def parse_size(text: str) -> int:
    """Bytes from ``4096``, ``256M``, ``1G``, ``2T`` (binary units; K/M/G/T or KiB/MiB/...)."""
    stripped = text.strip()
    digits = len(stripped) - len(stripped.lstrip("0123456789"))
    number, unit = stripped[:digits], stripped[digits:].lower()
    if not number:
        raise ConfigError(f"{_show(text)} is not a size")
    if unit not in _SIZE_UNITS:
        raise ConfigError(f"{_show(text)} has an unknown unit (K, M, G, T are powers of 1024)")
    return _parse_uint(number) * _SIZE_UNITS[unit]


def format_size(size: int) -> str:
    """The shortest exact spelling of a size that parse_size() reads back."""
    for suffix, factor in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if size and size % factor == 0:
            return f"{size // factor}{suffix}"
    return str(size)


def parse_percent(text: str) -> float:
    """A percentage such as ``1%`` or ``0.5%``, 0 to 50."""
    stripped = text.strip()
    if not stripped.endswith("%"):
        raise ConfigError(f"{_show(text)} is not a percentage (it needs a '%')")
    whole, dot, fraction = stripped[:-1].partition(".")
    _parse_uint(whole)
    if dot:
        _parse_uint(fraction)
    percent = float(stripped[:-1])
    if percent > 50:
        raise ConfigError(f"{_show(text)} is more than 50%")
    return percent


def format_percent(value: float) -> str:
    return f"{value:g}%"


def parse_pcrs(text: str) -> tuple[int, ...]:
    """PCR indexes joined by ``+`` (systemd-cryptenroll's syntax) or ``,``; sorted, unique.

    The empty string is the empty list (seal to no PCR), as for systemd-cryptenroll.
    """
    if not text.strip():
        return ()
    pcrs = set()
    for item in text.replace(",", "+").split("+"):
        item = item.strip()
        if not item:
            raise ConfigError(f"{_show(text)} has an empty item")
        if not (item.isascii() and item.isdigit()) or int(item) > MAX_PCR:
            raise ConfigError(f"{_show(item)} is not a PCR index (0-{MAX_PCR})")
        pcrs.add(int(item))
    return tuple(sorted(pcrs))


def format_pcrs(pcrs: Iterable[int]) -> str:
    return "+".join(str(pcr) for pcr in pcrs)


def parse_weights(text: str) -> tuple[int, int]:
    """``plain:encrypted`` resize weights, each 1 to 1000."""
    plain, sep, encrypted = text.strip().partition(":")
    if not sep:
        raise ConfigError(f"{_show(text)} is not two weights joined by ':'")
    weights = (_parse_uint(plain.strip()), _parse_uint(encrypted.strip()))
    if not all(1 <= weight <= 1000 for weight in weights):
        # A zero weight would let one area starve the other, which SPEC §7 rules out.
        raise ConfigError(f"{_show(text)} has a weight outside 1-1000")
    return weights


def format_weights(weights: tuple[int, int]) -> str:
    return f"{weights[0]}:{weights[1]}"


def _int_range(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = _parse_uint(text.strip())
        if not low <= value <= high:
            raise ConfigError(f"{_show(text)} is outside {low}-{high}")
        return value

    return parse


def _min_image_size(text: str) -> int:
    size = parse_size(text)
    if size < MIN_IMAGE_SIZE:
        raise ConfigError(f"{_show(text)} is below the floor of {format_size(MIN_IMAGE_SIZE)}")
    return size


def _choice(enum: type[StrEnum]) -> Callable[[str], Any]:
    def parse(text: str) -> StrEnum:
        try:
            return enum(text.strip().lower())
        except ValueError:
            raise ConfigError(f"{_show(text)} is not one of the choices") from None

    return parse


def _choices(enum: type[StrEnum]) -> str:
    return " | ".join(member.value for member in enum)


_HEX = frozenset("0123456789abcdefABCDEF")


def _is_uuid(text: str) -> bool:
    groups = text.split("-")
    return [len(g) for g in groups] == [8, 4, 4, 4, 12] and all(
        c in _HEX for g in groups for c in g
    )


def parse_state_device(text: str) -> str:
    """``PARTUUID=<uuid>``, ``UUID=<uuid>`` (UUIDs lowercased) or a normalized ``/dev/...`` path."""
    for prefix in ("PARTUUID=", "UUID="):
        if text.startswith(prefix):
            uuid = text[len(prefix) :]
            if not _is_uuid(uuid):
                raise ConfigError(f"{_show(uuid)} is not a UUID (8-4-4-4-12 hex digits)")
            return prefix + uuid.lower()
    if text.startswith("/dev/"):
        if not _is_normalized_path(text) or any(_is_control(c) for c in text):
            raise ConfigError(f"{_show(text)} is not a normalized path")
        return text
    raise ConfigError(f"{_show(text)} is not PARTUUID=, UUID= or a /dev/ path")


def _is_control(c: str) -> bool:
    return ord(c) < 0x20 or ord(c) == 0x7F


def _is_normalized_path(path: str) -> bool:
    if not path.startswith("/") or path == "/" or path.endswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in path[1:].split("/"))


def parse_target(text: str) -> str:
    """A mount target: a normalized absolute path, not forbidden or reserved (SPEC §3, §4)."""
    target = text.strip()
    if not _is_normalized_path(target) or any(_is_control(c) for c in target):
        raise ConfigError(f"{_show(text)} is not a normalized absolute path other than /")
    # The same refusals plan.py applies at boot, so a distributor learns of them when the
    # initrd is built rather than from a rejected entry.
    refusal = target_refusal(target)
    if refusal is not None:
        raise ConfigError(f"{_show(text)} can never be a target: {refusal}")
    try:
        too_long = len(escape_path(target).encode()) > NAME_MAX
    except EscapeError:
        too_long = True  # a component over NAME_MAX already
    if too_long:
        raise ConfigError(f"{_show(text)} escapes to a name longer than {NAME_MAX} bytes")
    return target


def parse_targets(text: str) -> frozenset[str]:
    """Whitespace-separated targets (an empty list is allowed: no plain entry is mounted)."""
    return frozenset(parse_target(word) for word in text.split())


def format_targets(targets: Iterable[str]) -> str:
    return " ".join(sorted(targets))


# --------------------------------------------------------------------------------------------
# The settings table


@dataclass(frozen=True, kw_only=True)
class Setting:
    """One setting: where it is read from, how it is parsed, its default and its documentation."""

    field: str  # the Config field
    default: Any
    parse: Callable[[str], Any]
    show: Callable[[Any], str]  # default -> text that parse() reads back (docs, round trips)
    accepted: str  # what is accepted, for error messages and the docs
    doc: str
    section: str | None = None  # INI section and key; None: command line only
    key: str | None = None
    cmdline: str | None = None  # kernel command-line key; None: file only
    bare: str | None = None  # what a bare command-line word means; None: a value is required
    default_doc: str | None = None  # the default as the docs show it, if show() cannot

    @property
    def file_key(self) -> str | None:
        return f"[{self.section}] {self.key}" if self.section else None


_BOOL = "yes | no (also 1/0, true/false, on/off)"

SETTINGS: tuple[Setting, ...] = (
    Setting(
        field="enabled",
        default=True,
        parse=parse_bool,
        show=format_bool,
        accepted=_BOOL,
        doc="Whether pystate runs at all. `pystate=0` wins over everything else: the file and the "
        "other options are then not read, so it also gets a broken configuration out of the way.",
        cmdline="pystate",
        bare="1",
    ),
    Setting(
        field="state_device",
        default=None,
        parse=parse_state_device,
        show=str,
        accepted="PARTUUID=<uuid> | UUID=<uuid> | /dev/<path>",
        doc="The state partition, overriding the discovery rules of SPEC §2.",
        cmdline="pystate.state",
        default_doc="found by the rules of SPEC §2",
    ),
    Setting(
        field="factory_reset",
        default=False,
        parse=parse_bool,
        show=format_bool,
        accepted="1 (or yes/true/on; 0 to cancel)",
        doc="Crypto-erase the image and delete the plain entries, then provision afresh (SPEC §6), "
        "once: only with a request made by `pystate factory-reset` in the booted system, from "
        "the one-shot boot entry it names (SPEC §11.6, docs/factory-reset.md); the word alone is "
        "a warning and nothing is erased (unless `[state] factory-reset-request = none`). "
        "Needs an explicit value: a bare word is refused.",
        cmdline="pystate.factory-reset",
    ),
    Setting(
        field="debug",
        default=False,
        parse=parse_bool,
        show=format_bool,
        accepted="a bare word, or " + _BOOL,
        doc="Log every external command at debug priority (argv, exit status, duration; "
        "never a key), and the traceback of an internal error. `pystate.debug=0` is off. The "
        "booted service's switch is `pystate resized --debug`.",
        cmdline="pystate.debug",
        bare="1",
    ),
    Setting(
        field="plain_allowlist",
        default=frozenset({"/home"}),
        parse=parse_targets,
        show=format_targets,
        accepted="absolute targets separated by spaces or newlines; may be empty",
        doc="The only targets a plain (unencrypted, offline-writable) entry on /state is "
        "mounted on (exact paths, not subtrees). Every `area = plain` layout target must be "
        "listed.",
        section="state",
        key="plain-allowlist",
    ),
    Setting(
        field="check_outer_fs",
        default=True,
        parse=parse_bool,
        show=format_bool,
        accepted=_BOOL,
        doc="Check the outer file system with `fsck -p` semantics before mounting it (SPEC §2). "
        "Only turn off if the initrd cannot carry the fsck tool.",
        section="state",
        key="check-fs",
    ),
    Setting(
        field="factory_reset_request",
        default=RequestSource.EFI_VARIABLE,
        parse=_choice(RequestSource),
        show=str,
        accepted=_choices(RequestSource),
        doc="What `pystate.factory-reset=1` needs besides itself (SPEC §11.6, "
        "docs/factory-reset.md). `efi-variable`: a request made by `pystate factory-reset` (the "
        "EFI variable PystateFactoryReset) and, where the boot loader says which entry it booted "
        "(LoaderEntrySelected), that entry being the one the request names; "
        "the word alone is a warning and nothing is erased. `none`: the word alone resets, for a "
        "boot loader with its own one-shot entries (grub-reboot) on a machine without EFI "
        "variables; a command line that keeps the word then erases the state at every boot: "
        "the distributor's risk. Not on the command line, which it guards.",
        section="state",
        key="factory-reset-request",
    ),
    Setting(
        field="inner_fs",
        default=InnerFs.EXT4,
        parse=_choice(InnerFs),
        show=str,
        accepted=_choices(InnerFs),
        doc="File system inside encrypted.img, made at provisioning. btrfs shrinks online; "
        "ext4 shrinks offline at the next boot.",
        section="image",
        key="inner-fs",
    ),
    Setting(
        field="allocation",
        default=Allocation.FULL,
        parse=_choice(Allocation),
        show=str,
        accepted=_choices(Allocation),
        doc="`full` allocates every byte of encrypted.img with fallocate, so the inner file system "
        "never meets an I/O error because the outer one ran full. `sparse` leaves holes: faster "
        "to grow, but writes inside the image can then fail when /state is full.",
        section="image",
        key="allocation",
    ),
    Setting(
        field="min_image_size",
        default=MIN_IMAGE_SIZE,
        parse=_min_image_size,
        show=format_size,
        accepted="a size of at least 256M (bytes, or with K, M, G, T)",
        doc="The image is never made or shrunk below this.",
        section="image",
        key="min-size",
    ),
    Setting(
        field="no_write_workqueue",
        default=True,
        parse=parse_bool,
        show=format_bool,
        accepted=_BOOL,
        doc="Open the mapping with dm-crypt's `no_write_workqueue` (cryptsetup "
        "`--perf-no_write_workqueue`, crypttab `no-write-workqueue`): writes are encrypted in "
        "the writer's context instead of being queued for dm-crypt's own thread. An online grow "
        "swaps the mapping's table, which waits for the writes in flight: with the flag a grow "
        "under a writer is usable in well under a second, without it in seconds "
        "(docs/performance.md). Only where the work is done changes, not what is written: "
        "`no` is the kernel's default, for a device that profits from dm-crypt sorting writes "
        "(a spinning disk). Read at every unlock; the grows keep the mapping's flags.",
        section="image",
        key="no-write-workqueue",
        cmdline="pystate.no-write-workqueue",
        bare="1",
    ),
    Setting(
        field="pcrs",
        default=(7,),
        parse=parse_pcrs,
        show=format_pcrs,
        accepted="PCR indexes 0-23 joined by + or , (e.g. 7, 7+11, 0,7); empty: no PCR",
        doc="PCRs the key is sealed to, besides PCR 15 when `measure-pcr15` is on. "
        "Read when sealing (provisioning, re-seal after recovery); an existing seal keeps "
        "its PCRs.",
        section="tpm2",
        key="pcrs",
        cmdline="pystate.tpm2-pcrs",
    ),
    Setting(
        field="pcr_bank",
        default=PcrBank.SHA256,
        parse=_choice(PcrBank),
        show=str,
        accepted=_choices(PcrBank),
        doc="PCR bank of the seal policy. sha1 only for TPMs without a sha256 bank.",
        section="tpm2",
        key="pcr-bank",
    ),
    Setting(
        field="measure_pcr15",
        default=True,
        parse=parse_bool,
        show=format_bool,
        accepted=_BOOL,
        doc="Extend a measurement identifying the volume into PCR 15 after unlocking, and seal to "
        "PCR 15's initial value, so a swapped-in volume cannot reach the real key (SPEC §5).",
        section="tpm2",
        key="measure-pcr15",
    ),
    Setting(
        field="tpm2_required",
        default=True,
        parse=parse_bool,
        show=format_bool,
        accepted=_BOOL,
        doc="A first boot (no encrypted.img yet) on a machine without a TPM2 stops with a clear "
        "message, as for too little space (SPEC §11.1): /etc and /var would otherwise stay on the "
        "read-only image. `no`: the boot goes on with the plain entries only and an error line; "
        "the image is made at the first boot that finds a TPM. A later boot without a TPM asks "
        "for the recovery key either way.",
        section="tpm2",
        key="required",
    ),
    Setting(
        field="recovery_tries",
        default=3,
        parse=_int_range(0, 10),
        show=str,
        accepted="0-10",
        doc="How many times the recovery key is asked for when the TPM does not unlock; "
        "0 never asks (the boot then fails).",
        section="recovery",
        key="tries",
    ),
    Setting(
        field="reseal_on_recovery",
        default=True,
        parse=parse_bool,
        show=format_bool,
        accepted=_BOOL,
        doc="After a recovery-key unlock, seal the key again to the current PCR values.",
        section="recovery",
        key="reseal",
    ),
    Setting(
        field="weights",
        default=(50, 50),
        parse=parse_weights,
        show=format_weights,
        accepted="plain:encrypted, each a whole number 1-1000",
        doc="How a nearly full disk is split between the plain entries and encrypted.img "
        "(SPEC §7).",
        section="resize",
        key="weights",
    ),
    Setting(
        field="reserve_percent",
        default=1.0,
        parse=parse_percent,
        show=format_percent,
        accepted="a percentage 0-50, e.g. 1% or 0.5%",
        doc="Free space of the outer file system that resizing never takes.",
        section="resize",
        key="reserve",
    ),
    Setting(
        field="reserve_min_bytes",
        default=256 * MIB,
        parse=parse_size,
        show=format_size,
        accepted="a size (bytes, or with K, M, G, T)",
        doc="Lower bound of the reserve: the reserve is the larger of `reserve` and this.",
        section="resize",
        key="reserve-min",
    ),
)

_BY_FIELD = {s.field: s for s in SETTINGS}
_BY_CMDLINE = {s.cmdline: s for s in SETTINGS if s.cmdline}
_BY_FILE = {(s.section, s.key): s for s in SETTINGS if s.section}
FILE_SECTIONS = ("state", "image", "tpm2", "recovery", "resize")
LAYOUT_SECTION = "layout"


_DEFAULTS: dict[str, Any] = {s.field: s.default for s in SETTINGS}


# --------------------------------------------------------------------------------------------
# The layout


@dataclass(frozen=True)
class LayoutEntry:
    """A target of the default layout, created at provisioning (SPEC §6)."""

    target: str
    area: Area = Area.ENCRYPTED
    mode: MountMode = MountMode.BIND
    seed: bool = True  # copy the image's content of the target into the new entry

    @property
    def encrypted(self) -> bool:
        return self.area is Area.ENCRYPTED


@dataclass(frozen=True, kw_only=True)
class LayoutKey:
    key: str
    parse: Callable[[str], Any]
    accepted: str
    default_doc: str
    doc: str


LAYOUT_KEYS: tuple[LayoutKey, ...] = (
    LayoutKey(
        key="area",
        parse=_choice(Area),
        accepted=_choices(Area),
        default_doc="encrypted",
        doc="`encrypted`: a directory inside encrypted.img; `plain`: a directory on /state itself, "
        "readable and writable offline, so the target must be on `plain-allowlist`.",
    ),
    LayoutKey(
        key="mode",
        parse=_choice(MountMode),
        accepted=_choices(MountMode),
        default_doc="bind",
        doc="`bind` mounts the entry on the target; `overlay` mounts an overlay whose lower "
        "layer is the image's own directory and whose upper layer is the entry.",
    ),
    LayoutKey(
        key="seed",
        parse=parse_bool,
        accepted=_BOOL,
        default_doc="yes for bind, no for overlay",
        doc="Copy what the image has at the target into the new entry at provisioning "
        "(owners, modes, timestamps, xattrs, ACLs). Not with overlay, which shows it already.",
    ),
)
_LAYOUT_BY_KEY = {k.key: k for k in LAYOUT_KEYS}

DEFAULT_LAYOUT: tuple[LayoutEntry, ...] = (
    LayoutEntry("/etc", Area.ENCRYPTED, MountMode.BIND, seed=True),
    LayoutEntry("/home", Area.PLAIN, MountMode.BIND, seed=False),
    LayoutEntry("/var", Area.ENCRYPTED, MountMode.BIND, seed=True),
)


def _layout_order(entry: LayoutEntry) -> tuple[int, str]:
    # Parents before children, as the mount plan orders them (SPEC §4).
    return (entry.target.count("/"), entry.target)


# --------------------------------------------------------------------------------------------
# The configuration


@dataclass(frozen=True)
class Config:
    """The whole trusted configuration. ``Config()`` is the built-in default."""

    enabled: bool = _DEFAULTS["enabled"]
    state_device: str | None = _DEFAULTS["state_device"]
    factory_reset: bool = _DEFAULTS["factory_reset"]
    factory_reset_request: RequestSource = _DEFAULTS["factory_reset_request"]
    debug: bool = _DEFAULTS["debug"]
    layout: tuple[LayoutEntry, ...] = DEFAULT_LAYOUT
    plain_allowlist: frozenset[str] = _DEFAULTS["plain_allowlist"]
    check_outer_fs: bool = _DEFAULTS["check_outer_fs"]
    inner_fs: InnerFs = _DEFAULTS["inner_fs"]
    allocation: Allocation = _DEFAULTS["allocation"]
    min_image_size: int = _DEFAULTS["min_image_size"]
    no_write_workqueue: bool = _DEFAULTS["no_write_workqueue"]
    pcrs: tuple[int, ...] = _DEFAULTS["pcrs"]
    tpm2_required: bool = _DEFAULTS["tpm2_required"]
    pcr_bank: PcrBank = _DEFAULTS["pcr_bank"]
    measure_pcr15: bool = _DEFAULTS["measure_pcr15"]
    recovery_tries: int = _DEFAULTS["recovery_tries"]
    reseal_on_recovery: bool = _DEFAULTS["reseal_on_recovery"]
    weights: tuple[int, int] = _DEFAULTS["weights"]
    reserve_percent: float = _DEFAULTS["reserve_percent"]
    reserve_min_bytes: int = _DEFAULTS["reserve_min_bytes"]
    warnings: tuple[str, ...] = ()
    source: str | None = field(default=None, compare=False)  # the file read, for the log

    @property
    def mount_modes(self) -> Mapping[str, str]:
        """Target -> "bind" or "overlay" for the layout targets; others are "bind"."""
        return MappingProxyType({entry.target: entry.mode for entry in self.layout})

    def mount_mode(self, target: str) -> MountMode:
        for entry in self.layout:
            if entry.target == target:
                return entry.mode
        return MountMode.BIND

    @property
    def policy_pcrs(self) -> tuple[int, ...]:
        """The PCRs of the seal policy: ``pcrs`` plus 15 when it is measured."""
        return tuple(sorted({*self.pcrs, 15})) if self.measure_pcr15 else self.pcrs


# --------------------------------------------------------------------------------------------
# Loading


def _cmdline_word(key: str, value: str | None) -> str:
    return format_cmdline([(key, value)])


def _apply(setting: Setting, raw: str | None, where: str) -> Any:
    if raw is None:  # a bare command-line word for a setting that needs a value
        raise ConfigError(f"{where}: needs a value; accepted: {setting.accepted}")
    try:
        return setting.parse(raw)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}; accepted: {setting.accepted}") from None


def _read_cmdline(cmdline: str) -> tuple[dict[str, tuple[str, str | None]], list[str]]:
    """The winning pystate options (field -> (where, raw value)) and warnings."""
    found: dict[str, tuple[str, str | None]] = {}
    warnings: list[str] = []
    try:
        pairs = parse_cmdline(cmdline)
    except CmdlineError as exc:
        raise ConfigError(str(exc)) from None
    for key, value in pairs:
        if key != "pystate" and not key.startswith("pystate."):
            continue
        # systemd treats '-' and '_' in command-line keys alike; so does pystate.
        name = key[:8] + key[8:].replace("_", "-")
        word = _cmdline_word(key, value)
        setting = _BY_CMDLINE.get(name)
        if setting is None:
            warnings.append(f"kernel command line: unknown option {word} ignored")
            continue
        where = f"kernel command line: {word}"
        if value is None:
            value = setting.bare  # None stays None: _apply() refuses it if this word wins
        # Later words win, and only the winner is parsed: appending a good value at the boot
        # menu overrides a bad one in the boot loader entry.
        found[setting.field] = (where, value)
    return found, warnings


def _strip_inline_comment(line: str) -> str:
    # As configparser with inline_comment_prefixes=("#",): a '#' after whitespace.
    for i, c in enumerate(line):
        if c == "#" and i > 0 and line[i - 1].isspace():
            return line[:i]
    return line


def _line_numbers(text: str) -> dict[tuple[str, str | None], int]:
    """(section, key) and (section, None) -> first line number, for error messages.

    configparser does not keep line numbers; this follows its syntax closely enough for that.
    """
    lines: dict[tuple[str, str | None], int] = {}
    section = ""
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = _strip_inline_comment(line).strip()
        if not stripped or stripped[0] in "#;":
            continue
        if stripped.startswith("[") and stripped.endswith("]"):
            section = stripped[1:-1]
            lines.setdefault((section, None), number)
        elif "=" in stripped:
            key = stripped.partition("=")[0].strip().lower()
            lines.setdefault((section, key), number)
    return lines


def _parse_ini(path: Path, text: str) -> ConfigParser:
    import configparser  # only when there is a file: it pulls in re

    parser = configparser.ConfigParser(
        interpolation=None,  # "1%" must stay literal
        delimiters=("=",),
        comment_prefixes=("#", ";"),
        inline_comment_prefixes=("#",),
        empty_lines_in_values=False,
        default_section="\0",  # no DEFAULT section whose keys leak into every other one
        strict=True,
    )
    try:
        parser.read_string(text, source=str(path))
    except configparser.DuplicateSectionError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: section [{exc.section}] repeated") from None
    except configparser.DuplicateOptionError as exc:
        raise ConfigError(
            f"{path}:{exc.lineno}: [{exc.section}] {exc.option} set twice in one section"
        ) from None
    except configparser.MissingSectionHeaderError as exc:
        raise ConfigError(
            f"{path}:{exc.lineno}: a setting before any [section]; "
            f"sections: {', '.join(FILE_SECTIONS)}, layout <target>"
        ) from None
    except configparser.ParsingError as exc:
        lineno, line = exc.errors[0]
        raise ConfigError(f"{path}:{lineno}: not 'key = value': {_show(line.strip())}") from None
    except configparser.Error as exc:
        raise ConfigError(f"{path}: {exc.message.splitlines()[0]}") from None
    return parser


def _read_layout(
    parser: ConfigParser, section: str, where: str, lines: dict[Any, int]
) -> LayoutEntry:
    rest = section[len(LAYOUT_SECTION) :]
    line = lines.get((section, None))
    here = f"{where}:{line}" if line else where
    if not rest[:1].isspace():
        raise ConfigError(f"{here}: [{section}]: a layout section is [layout /absolute/target]")
    try:
        target = parse_target(rest.strip())
    except ConfigError as exc:
        raise ConfigError(f"{here}: [{section}]: {exc}") from None
    values: dict[str, Any] = {}
    for key, raw in parser.items(section):
        line = lines.get((section, key))
        here = f"{where}:{line}" if line else where
        spec = _LAYOUT_BY_KEY.get(key)
        if spec is None:
            raise ConfigError(
                f"{here}: [{section}] unknown key {_show(key)}; "
                f"accepted: {', '.join(_LAYOUT_BY_KEY)}"
            )
        try:
            values[key] = spec.parse(raw)
        except ConfigError as exc:
            raise ConfigError(
                f"{here}: [{section}] {key} = {_show(raw)}: {exc}; accepted: {spec.accepted}"
            ) from None
    mode = values.get("mode", MountMode.BIND)
    seed = values.get("seed", mode is MountMode.BIND)
    if seed and mode is MountMode.OVERLAY:
        line = lines.get((section, "seed"))
        raise ConfigError(
            f"{where}:{line}: [{section}] seed = yes with mode = overlay: the overlay already "
            "shows the image's files; accepted: seed = no"
        )
    return LayoutEntry(target, values.get("area", Area.ENCRYPTED), mode, seed)


@dataclass
class _FileSettings:
    found: dict[str, tuple[str, str]] = field(default_factory=dict)  # field -> (where, raw)
    layout: dict[str, tuple[str, LayoutEntry]] = field(default_factory=dict)  # target -> ...
    read: bool = False


def _read_file(path: Path) -> _FileSettings:
    """The settings and the layout sections of a pystate.conf; nothing if it is missing."""
    result = _FileSettings()
    try:
        with path.open("rb") as f:
            data = f.read(MAX_CONF_SIZE + 1)
    except FileNotFoundError:
        return result
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    if len(data) > MAX_CONF_SIZE:
        raise ConfigError(f"{path}: larger than {format_size(MAX_CONF_SIZE)}, refusing")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 (byte {exc.start})") from None
    parser = _parse_ini(path, text)
    lines = _line_numbers(text)
    result.read = True
    for section in parser.sections():
        where = f"{path}:{lines[(section, None)]}" if (section, None) in lines else str(path)
        if section.startswith(LAYOUT_SECTION):
            entry = _read_layout(parser, section, str(path), lines)
            if entry.target in result.layout:
                # "[layout /var]" and "[layout  /var]" are different sections to configparser.
                raise ConfigError(f"{where}: [{section}]: {entry.target} already has a section")
            result.layout[entry.target] = (f"{where}: [{section}]", entry)
            continue
        if section not in FILE_SECTIONS:
            raise ConfigError(
                f"{where}: unknown section [{section}]; "
                f"accepted: {', '.join(f'[{s}]' for s in FILE_SECTIONS)}, [layout <target>]"
            )
        for key, raw in parser.items(section):
            line = lines.get((section, key))
            here = f"{path}:{line}" if line else str(path)
            setting = _BY_FILE.get((section, key))
            if setting is None:
                known = ", ".join(s.key for s in SETTINGS if s.section == section and s.key)
                raise ConfigError(
                    f"{here}: [{section}] unknown key {_show(key)}; accepted: {known}"
                )
            result.found[setting.field] = (f"{here}: [{section}] {key} = {_show(raw)}", raw)
    return result


def load_config(conf_path: Path | None, cmdline: str) -> Config:
    """The configuration from conf_path (None or missing: defaults) and a kernel command line.

    A setting on the command line overrides the same setting in the file.
    """
    from_cmdline, warnings = _read_cmdline(cmdline)
    if "enabled" in from_cmdline:
        where, raw = from_cmdline["enabled"]
        if not _apply(_BY_FIELD["enabled"], raw, where):
            return Config(enabled=False, warnings=tuple(warnings))
    from_file = _read_file(conf_path) if conf_path else _FileSettings()
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        source: tuple[str, str | None] | None = from_cmdline.get(setting.field)
        if source is None:
            source = from_file.found.get(setting.field)
        if source is not None:
            values[setting.field] = _apply(setting, source[1], source[0])
    # Layout sections replace the default layout as a whole: what a distributor writes is
    # the complete list, never merged with entries they cannot see.
    layout = (
        tuple(sorted((e for _, e in from_file.layout.values()), key=_layout_order))
        if from_file.layout
        else DEFAULT_LAYOUT
    )
    config = Config(
        **values,
        layout=layout,
        warnings=tuple(warnings),
        source=str(conf_path) if from_file.read else None,
    )
    for entry in config.layout:
        if entry.area is Area.PLAIN and entry.target not in config.plain_allowlist:
            if entry.target in from_file.layout:
                where = from_file.layout[entry.target][0]
            else:  # the default layout and an allowlist from the file disagree
                allowlist = from_file.found["plain_allowlist"][0]
                where = f"{allowlist}: the default layout's [layout {entry.target}]"
            raise ConfigError(
                f"{where}: area = plain but {entry.target} is not on [state] plain-allowlist; "
                "accepted: add it to plain-allowlist, or area = encrypted"
            )
    return config


# --------------------------------------------------------------------------------------------
# Documentation


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;")


def _default_cell(s: Setting) -> str:
    if s.default_doc:
        return _md(s.default_doc)
    shown = s.show(s.default)
    return f"`{shown}`" if shown else "(empty)"


def reference_markdown() -> str:
    """The option reference of docs/configuration.md, generated from the tables."""
    out = [
        "### pystate.conf",
        "",
        "| section | key | default | accepted | meaning |",
        "|---|---|---|---|---|",
    ]
    for s in SETTINGS:
        if s.section:
            out.append(
                f"| `[{s.section}]` | `{s.key}` | {_default_cell(s)} | {_md(s.accepted)} "
                f"| {_md(s.doc)} |"
            )
    out += [
        "",
        "### [layout TARGET] sections",
        "",
        "| key | default | accepted | meaning |",
        "|---|---|---|---|",
    ]
    for k in LAYOUT_KEYS:
        out.append(f"| `{k.key}` | {_md(k.default_doc)} | {_md(k.accepted)} | {_md(k.doc)} |")
    out += [
        "",
        "Without any `[layout …]` section the default layout is:",
        "",
        "| target | area | mode | seed |",
        "|---|---|---|---|",
    ]
    for e in DEFAULT_LAYOUT:
        out.append(f"| `{e.target}` | {e.area} | {e.mode} | {format_bool(e.seed)} |")
    out += [
        "",
        "### Kernel command line",
        "",
        "| option | default | accepted | file setting it overrides | meaning |",
        "|---|---|---|---|---|",
    ]
    for s in SETTINGS:
        if s.cmdline:
            option = f"`{s.cmdline}=`" + ("" if s.bare is None else f" or bare `{s.cmdline}`")
            overrides = f"`{s.file_key}`" if s.file_key else "—"
            out.append(
                f"| {option} | {_default_cell(s)} | {_md(s.accepted)} | {overrides} "
                f"| {_md(s.doc)} |"
            )
    return "\n".join(out) + "\n"
