"""build.py fuzz (pystate_build/fuzz.py): the CI slice, and proof that the harness catches bugs.

The slice is 10^3 inputs per parser with a fixed seed, so the machinery itself stays working;
the full campaign (10^5 per parser) runs on demand (docs/testing.md, "Fuzzing").
"""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import pytest

from pystate_build import fuzz

SLICE = 1000
SEED = 14
fuzz._register_targets()
PARSERS = list(fuzz.TARGETS)


@pytest.fixture(scope="session")
def seed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-seeds")  # sfdisk and cryptsetup seeds, made once


def test_every_parser_of_the_issue_is_a_target() -> None:
    assert PARSERS == [
        "gpt",
        "luks2",
        "token",
        "reseal-record",
        "eventlog",
        "shrink-request",
        "config",
        "cmdline",
        "escape",
    ]


@pytest.mark.parametrize("name", PARSERS)
def test_slice_finds_no_bug(name: str, seed_dir: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    [outcome] = fuzz.fuzz([name], SLICE, SEED, out=tmp_path, seed_dir=seed_dir, report=lines.append)
    assert outcome.inputs == SLICE
    assert outcome.bugs == 0, "\n".join(lines)
    # The mutants reach both sides of the parser, not only its first check.
    assert outcome.accepted > 0
    assert outcome.refused > 0


def test_real_seeds_are_accepted(seed_dir: Path) -> None:
    gpt = fuzz.TARGETS["gpt"].seeds(seed_dir)
    sizes = {fuzz._gpt_run(d)["sector_size"] for d in gpt}  # type: ignore[index]
    assert sizes <= {512, 4096} and 512 in sizes
    for name in PARSERS:
        for data in fuzz.TARGETS[name].seeds(seed_dir):
            fuzz.TARGETS[name].run(data)
    [found] = fuzz._luks_run(fuzz.TARGETS["luks2"].seeds(seed_dir)[0])  # type: ignore[misc]
    assert found.error is None and found.keyslot == 0  # cryptsetup kept pystate's token


def _digest(name: str, seed: int, seed_dir: Path, n: int = 300) -> str:
    target = fuzz.TARGETS[name]
    pool = fuzz.hypothesis_pool(target, 20, seed)
    data = fuzz.inputs(target, n, seed, target.seeds(seed_dir), pool)
    return hashlib.sha256(b"".join(d + b"\xff\0" for d in data)).hexdigest()


@pytest.mark.parametrize("name", ["token", "gpt"])
def test_inputs_are_repeatable_for_a_seed(name: str, seed_dir: Path) -> None:
    assert _digest(name, 1, seed_dir) == _digest(name, 1, seed_dir)
    assert _digest(name, 1, seed_dir) != _digest(name, 2, seed_dir)


# --- the harness catches each kind of bug -------------------------------------------------


class Refused(Exception):
    pass


def index_error(data: bytes) -> object:
    if data[:1] == b"b":
        return data[len(data)]  # IndexError: the bug
    raise Refused("not b")


def hang(data: bytes) -> object:
    if data[:1] == b"b":
        for _ in itertools.count():  # never returns
            pass
    return data


def memory_hog(data: bytes) -> object:
    if data[:1] == b"b":
        return [0] * (4 << 20)  # 32 MiB of pointers
    return data


@pytest.mark.parametrize(
    ("parser", "kind", "detail"),
    [
        (index_error, "exception", "IndexError: index out of range"),
        (hang, "hang", "no result after 0.2 s of CPU"),
        (memory_hog, "memory", "MiB traced (bound 8 MiB)"),
    ],
)
def test_harness_reports_a_bug(parser: object, kind: str, detail: str, tmp_path: Path) -> None:
    target = fuzz.Target("broken", parser, (Refused,), lambda _: [b"a", b"b"])  # type: ignore[arg-type]
    lines: list[str] = []
    outcome = fuzz.campaign(
        target,
        4,
        SEED,
        target.seeds(tmp_path),
        out=tmp_path,
        time_bound=0.2,
        memory_bound=8 << 20,
        report=lines.append,
    )
    assert outcome.bugs >= 1
    bug = outcome.found[0]
    assert (bug.parser, bug.kind) == ("broken", kind)
    assert detail in bug.detail
    assert Path(bug.input).read_bytes()[:1] == b"b"  # the input is kept under out/
    assert lines and lines[0].startswith(f"fuzz: BUG broken: {kind}: ")
    assert outcome.accepted + outcome.refused + outcome.bugs == outcome.inputs == 4


def test_own_error_and_success_are_not_bugs(tmp_path: Path) -> None:
    target = fuzz.Target("fine", index_error, (Refused, IndexError), lambda _: [b"a"])
    outcome = fuzz.campaign(target, 50, SEED, [b"a", b"b"], out=tmp_path)
    assert outcome.bugs == 0
    assert outcome.refused > 0 and outcome.accepted == 0  # b"b" raises IndexError: its own
