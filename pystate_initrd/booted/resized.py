"""``pystate resized``: the resize service of the booted system (SPEC §7), and ``pystate resize``.

A loop: measure (two statvfs, one stat) -> decide (resize_policy, pure) -> act (resize.py)
-> sleep. Acting is a grow (online), a btrfs shrink (online) or, for ext4, a shrink request
for the initrd. Every decision that is not "none", and every change with its before/after
sizes and step timings, is logged (kernel log, like the initrd: the journal has it too);
the latest decision, change and pending request are kept in /run/pystate/resize.json for
``pystate status``.

Polling, not events: the kernel has no "free space crossed X" notification. The interval
(next_interval, pure) is short (0.5 s) while the image's free space is within one buffer of
the grow watermark, and otherwise follows the rate at which free space is being used: a
quarter of the time the current rate needs to reach the watermark, doubling when nothing
is being used, between 0.5 s and 30 s. A statvfs costs microseconds, so even 0.5 s is
cheap; the back-off only keeps an idle machine from waking.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from pystate_initrd.config import Config, load_config, parse_size
from pystate_initrd.errors import PystateError
from pystate_initrd.formats import names, shrink_request
from pystate_initrd.formats.resize_policy import (
    MIB,
    Action,
    Decision,
    PolicyParams,
    decide,
    human_size,
)
from pystate_initrd.log import Log
from pystate_initrd.volume import hooks, request_file, resize
from pystate_initrd.volume.policy import params_from_config

STATE_DIRS = (Path("/state"), Path("/run/pystate/state"))  # SPEC §2: and the /run fallback
STATUS_FILE = Path("/run/pystate/resize.json")
# The trusted configuration is the initrd's (SPEC §9): boot.py publishes it here. The booted
# system's /etc (from the state, perhaps) is read only where no initrd of ours published one.
PUBLISHED_CONFIG = Path("/run/pystate/pystate.conf")
BOOTED_CONFIG = Path("/etc/pystate/pystate.conf")
MIN_INTERVAL = 0.5
MAX_INTERVAL = 30.0


class ServiceError(PystateError):
    """The resize service cannot run here."""


def find_state_dir(candidates: tuple[Path, ...] = STATE_DIRS) -> Path:
    for path in candidates:
        if (path / names.IMAGE).is_file():
            return path
    raise ServiceError(
        "no encrypted.img in " + " or ".join(map(str, candidates)) + ": nothing to resize"
    )


def next_interval(
    prev: float,
    free: int,
    prev_free: int | None,
    buffer: int,
    *,
    lo: float = MIN_INTERVAL,
    hi: float = MAX_INTERVAL,
) -> float:
    """Seconds until the next look at the free space (pure; see the module docstring)."""
    headroom = free - buffer // 2  # bytes left above the grow watermark
    if headroom <= buffer // 2:
        return lo
    if prev_free is not None and prev_free > free and prev > 0:
        rate = (prev_free - free) / prev
        return min(hi, max(lo, headroom / rate / 4))
    return min(hi, max(lo, prev * 2))


@dataclass
class ServiceState:
    """What /run/pystate/resize.json holds."""

    state_dir: str
    decision: dict[str, object] = field(default_factory=dict)
    last_change: dict[str, object] | None = None
    pending_shrink: dict[str, object] | str | None = None
    error: str | None = None
    updated: float = 0.0
    pid: int = field(default_factory=os.getpid)

    def write(self, path: Path = STATUS_FILE) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.__dict__, indent=2) + "\n")
        os.replace(tmp, path)


def decision_json(d: Decision) -> dict[str, object]:
    return {
        "action": str(d.action),
        "current": d.current,
        "target": d.target,
        "offline": d.offline,
        "reasons": list(d.reasons),
        "reserve": d.reserve,
        "room": d.room,
        "pool": d.pool,
        "plain_share": d.plain_share,
        "encrypted_share": d.encrypted_share,
        "buffer": d.buffer,
        "margin": d.margin,
        "floor": d.floor,
        "plain_used": d.plain_used,
        "plain_buffer": d.plain_buffer,
        "describe": d.describe(),
    }


def request_json(
    pending: shrink_request.ShrinkRequest | str | None,
) -> dict[str, object] | str | None:
    return pending.to_json() if isinstance(pending, shrink_request.ShrinkRequest) else pending


@dataclass
class Service:
    vol: resize.Volume
    params: PolicyParams
    log: Log
    status_file: Path | None = STATUS_FILE
    hook: hooks.Hook = hooks.no_hook
    state: ServiceState = field(init=False)

    def __post_init__(self) -> None:
        self.state = ServiceState(str(self.vol.state_dir))

    def _save(self) -> None:
        self.state.updated = time.time()
        self.state.pending_shrink = request_json(request_file.pending_request(self.vol.state_dir))
        if self.status_file is not None:
            try:
                self.state.write(self.status_file)
            except OSError as exc:
                self.log.warning(f"cannot write {self.status_file}: {exc.strerror}")

    def recover(self) -> resize.Change | None:
        """Finish whatever a crash interrupted, before any decision (resize.reconcile)."""
        change = resize.reconcile(self.vol, hook=self.hook)
        if change is not None:
            self.log.notice(f"interrupted resize finished: {change.describe()}")
            self.state.last_change = change.to_json()
        return change

    def step(self, decision: Decision | None = None) -> tuple[Decision, resize.Change | None]:
        """One measure-decide-act round; the decision and the change made, if any."""
        if decision is None:
            decision = decide(resize.measure(self.vol), self.params)
        self.state.decision = decision_json(decision)
        change = None
        try:
            change = self.act(decision)
            self.state.error = None
        except resize.ResizeError as exc:
            self.state.error = str(exc)
            self.log.error(f"{decision.describe()}: failed: {exc}")
        if change is not None:
            self.state.last_change = {**change.to_json(), "reasons": list(decision.reasons)}
        self._save()
        return decision, change

    def act(self, d: Decision) -> resize.Change | None:
        vol = self.vol
        if d.action is Action.GROW:
            if request_file.remove_request(vol.state_dir):
                self.log.notice("pending shrink request withdrawn: the image grows instead")
            self.log.notice(f"decided: {d.describe()}")
            change = resize.grow(vol, d.target, hook=self.hook)
        elif d.action is Action.SHRINK and d.offline:
            pending = request_file.pending_request(vol.state_dir)
            if isinstance(pending, shrink_request.ShrinkRequest) and pending.size == d.target:
                return None  # already asked for
            req = shrink_request.ShrinkRequest(
                luks_uuid=vol.luks_uuid,
                current=d.current,
                size=d.target,
                fs_size=d.fs_size,
                requested=int(time.time()),
            )
            path = request_file.write_request(vol.state_dir, req)
            self.log.notice(f"decided: {d.describe()}; request written to {path}")
            return resize.Change("request", d.current, d.target)
        elif d.action is Action.SHRINK:
            self.log.notice(f"decided: {d.describe()}")
            change = resize.shrink_online(vol, d.target, hook=self.hook)
        else:
            return None
        after = resize.measure(vol)
        self.log.notice(
            f"{change.describe()}; inner free {human_size(after.inner_free)} of "
            f"{human_size(after.inner_size)}, outer free {human_size(after.outer_free)}"
        )
        return change

    def run(self, stop: threading.Event, *, lo: float, hi: float) -> None:
        self.recover()
        interval, prev_free, first = lo, None, True
        while not stop.is_set():
            try:
                space = resize.measure(self.vol)
            except OSError as exc:
                self.log.error(f"cannot measure {self.vol.image}: {exc.strerror}")
                stop.wait(hi)
                continue
            decision = decide(space, self.params)
            if decision.action is Action.NONE:
                # Once at start; then only with --debug: under a writer the numbers change at
                # every poll, and a line per poll would flood the journal.
                (self.log.info if first else self.log.debug)(f"decided: {decision.describe()}")
            first = False
            _, change = self.step(decision)
            if change is not None and change.action != "request":
                interval, prev_free = lo, None  # look again soon: the writer may go on
            else:
                interval = next_interval(
                    interval, space.inner_free, prev_free, decision.buffer, lo=lo, hi=hi
                )
                prev_free = space.inner_free
            if self.state.error:
                interval = hi
            stop.wait(interval)


def default_config() -> Path:
    """The configuration the initrd published, else the booted system's."""
    return PUBLISHED_CONFIG if PUBLISHED_CONFIG.exists() else BOOTED_CONFIG


def load_params(config: Path | None, overrides: dict[str, int]) -> tuple[Config, PolicyParams]:
    """The trusted configuration (``config``, default: default_config()) and the policy's
    parameters, with test overrides."""
    config = config or default_config()
    try:
        cmdline = Path("/proc/cmdline").read_text(errors="replace")
    except OSError:
        cmdline = ""
    cfg = load_config(config if config and config.exists() else None, cmdline)
    params = params_from_config(cfg)
    if "buffer_min" in overrides:
        params = replace(params, buffer_min=overrides["buffer_min"])
    if "margin_min" in overrides:
        params = replace(params, margin_min=overrides["margin_min"])
    return cfg, params


def make_service(
    state: Path | None,
    config: Path | None,
    overrides: dict[str, int],
    *,
    log: Log,
    plain: bool = False,
    hook: hooks.Hook = hooks.no_hook,
    status_file: Path | None = STATUS_FILE,
) -> Service:
    cfg, params = load_params(config, overrides)
    state_dir = state or find_state_dir()
    vol = resize.find_volume(
        state_dir,
        sparse=str(cfg.allocation) == "sparse",
        crypt_name=None if plain else names.DM_NAME,
    )
    return Service(vol, params, log, status_file=status_file, hook=hook)


def serve(service: Service, *, lo: float = MIN_INTERVAL, hi: float = MAX_INTERVAL) -> int:
    """Run until SIGTERM or SIGINT; a step in progress is finished first."""
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    p = service.params
    service.log.notice(
        f"resize service for {service.vol.image} ({service.vol.fstype}) started: weights "
        f"{p.weights[0]}:{p.weights[1]}, buffer >= {human_size(p.buffer_min)}, "
        f"poll {lo:g}-{hi:g} s"
    )
    service.run(stop, lo=lo, hi=hi)
    service.log.notice("resize service stopped")
    return 0


def resize_to(service: Service, size: int | None) -> int:
    """``pystate resize``: one step by hand; to the policy's target (size None) or to size.

    A size by hand obeys the same hard limits as the policy: never below used + margin or
    the minimum size, never into the outer reserve. Exit status 0 when something was done
    or nothing needed doing, 1 on refusal.
    """
    service.recover()
    space = resize.measure(service.vol)
    auto = decide(space, service.params)
    decision = auto if size is None else manual_decision(auto, size, space.inner_fs)
    print(decision.describe())
    if decision.action is Action.NONE:
        service._save()
        return 0 if size is None or size == decision.current else 1
    _, change = service.step(decision)
    if change is None:
        if service.state.error:
            print(f"pystate: {service.state.error}")
            return 1
        print("already requested")
        return 0
    print(change.describe())
    return 0


def manual_decision(auto: Decision, size: int, inner_fs: str) -> Decision:
    """The policy's decision with the target replaced by size, within the hard limits (pure)."""
    aligned = size - size % MIB
    floor = -(-auto.floor // MIB) * MIB
    reasons: list[str] = [f"by hand: {human_size(size)}"]
    action = Action.NONE
    if aligned > auto.current:
        cap = auto.current + auto.room - (auto.current + auto.room) % MIB
        if aligned > cap:
            reasons.append(f"refused: the outer reserve allows at most {human_size(cap)}")
        else:
            action = Action.GROW
    elif aligned < auto.current:
        if aligned < floor:
            reasons.append(f"refused: below used + margin {human_size(floor)}")
        else:
            action = Action.SHRINK
    else:
        reasons.append("already that size")
    target = aligned if action is not Action.NONE else auto.current
    return replace(
        auto,
        action=action,
        target=target,
        fs_size=max(0, target - (auto.target - auto.fs_size)),  # target - LUKS header
        offline=action is Action.SHRINK and inner_fs != "btrfs",
        reasons=tuple(reasons),
    )


# --- pystate status ---------------------------------------------------------------------


def status_view(
    state_dir: Path | None = None, status_file: Path = STATUS_FILE
) -> dict[str, object]:
    """The policy's view for ``pystate status``: the live decision (shares, buffer, target),
    the service's last change and error, and the pending shrink request. Never raises."""
    view: dict[str, object] = {}
    try:
        saved = json.loads(status_file.read_text())
        if isinstance(saved, dict):
            view["service"] = {k: saved.get(k) for k in ("last_change", "error", "updated", "pid")}
    except (OSError, ValueError):
        view["service"] = None
    try:
        state = state_dir or find_state_dir()
        vol = resize.find_volume(state)
        _, params = load_params(None, {})
        view["decision"] = decision_json(decide(resize.measure(vol), params))
        view["pending_shrink"] = request_json(request_file.pending_request(state))
    except (PystateError, OSError) as exc:
        view["error"] = str(exc)
    return view


def status_lines(view: dict[str, object]) -> list[str]:
    """The view as lines of text for ``pystate status`` (none for an empty view)."""
    if not view:
        return []
    lines = []
    d = view.get("decision")
    if isinstance(d, dict):
        size = human_size

        def n(key: str) -> int:
            value = d.get(key, 0)
            return value if isinstance(value, int) else 0

        lines.append(
            f"resize: pool {size(n('pool'))} (plain share {size(n('plain_share'))}, "
            f"encrypted share {size(n('encrypted_share'))}), buffer {size(n('buffer'))}, "
            f"plain buffer {size(n('plain_buffer'))}, "
            f"reserve {size(n('reserve'))}, floor {size(n('floor'))}"
        )
        lines.append(f"resize: {d.get('describe')}")
    elif view.get("error"):
        lines.append(f"resize: {view['error']}")
    service = view.get("service")
    if isinstance(service, dict):
        change = service.get("last_change")
        if isinstance(change, dict):
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(_num(change.get("time"))))
            lines.append(
                f"resize: last change {change.get('action')} "
                f"{human_size(_num(change.get('before')))} -> "
                f"{human_size(_num(change.get('after')))} at {when}"
            )
        if service.get("error"):
            lines.append(f"resize: last error: {service['error']}")
    else:
        lines.append("resize: service not running (no /run/pystate/resize.json)")
    pending = view.get("pending_shrink")
    if isinstance(pending, dict):
        lines.append(
            f"resize: shrink to {human_size(_num(pending.get('size')))} pending, "
            "at the next boot"
        )
    elif isinstance(pending, str):
        lines.append(f"resize: invalid shrink request (the initrd drops it): {pending}")
    return lines


def _num(value: object) -> int:
    return value if isinstance(value, int) else 0


# --- command line -----------------------------------------------------------------------


def overrides_from(args: argparse.Namespace) -> dict[str, int]:
    out = {}
    for name in ("buffer_min", "margin_min"):
        value = getattr(args, name, None)
        if value is not None:
            out[name] = parse_size(value)
    return out


def _service_from(args: argparse.Namespace) -> Service:
    """The service the command-line options describe, logging to --log (--debug: more)."""
    log = Log(
        kmsg_path=getattr(args, "log", "/dev/kmsg"), debug=getattr(args, "debug", False)
    ).install()
    return make_service(
        _path(getattr(args, "state", None)),
        _path(getattr(args, "config", None)),
        overrides_from(args),
        log=log,
        plain=getattr(args, "plain", False),
        hook=hooks.resize_hook(args, log.error),
    )


def cmd_resized(args: argparse.Namespace) -> int:
    return serve(_service_from(args), lo=args.interval_min, hi=args.interval_max)


def cmd_resize(args: argparse.Namespace) -> int:
    to = getattr(args, "to", None)
    return resize_to(_service_from(args), parse_size(to) if to else None)


def _path(value: object) -> Path | None:
    return Path(value) if isinstance(value, str) and value else None
