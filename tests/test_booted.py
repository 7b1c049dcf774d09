"""booted.parse_grow: the demo's console lines (the fill unit's report) read back."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from pystate_build.booted import GROW_PREFIX, LOG_PREFIX, STATUS_PREFIX, Grow, parse_grow

sizes = st.integers(min_value=0, max_value=2**50)
log_line = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=200)
# what can precede a line on a shared console: a getty prompt, a kernel timestamp, nothing
prefix = st.sampled_from(["", "pystate-debian login: ", "[   45.105211] ", "\x1b[0m"])


@given(
    st.builds(
        Grow,
        image_before=sizes,
        image_after=sizes,
        fs_before=sizes,
        fs_after=sizes,
        free_before=sizes,
        free_after=sizes,
        written_mib=st.integers(0, 4096),
        enospc=st.booleans(),
        ms=st.integers(0, 10**7),
        service=st.sampled_from(["active", "failed"]),
        log=st.lists(log_line, max_size=6).map(tuple),
        status=st.lists(log_line, max_size=6).map(tuple),
    ),  # fmt: skip
    st.lists(log_line.filter(lambda s: "PYSTATE-DEMO" not in s), max_size=5),
    prefix,
)
def test_parse_grow_reads_back_what_the_fill_script_prints(
    grow: Grow, noise: list[str], before: str
) -> None:
    fields = {k: v for k, v in vars(grow).items() if k not in ("log", "status")}
    fields["enospc"] = int(grow.enospc)  # the shell prints 0 or 1
    console = "\n".join(
        [*noise, *(f"{before}{STATUS_PREFIX}{line}" for line in grow.status),
         *(f"{before}{LOG_PREFIX}{line}" for line in grow.log),
         f"{before}{GROW_PREFIX}{json.dumps(fields)}", *noise]
    )  # fmt: skip
    assert parse_grow(console) == grow


def test_no_grow_line_is_none() -> None:
    assert parse_grow(f"{LOG_PREFIX}pystate: resize service started\nlogin:") is None


def test_grew_needs_both_the_image_and_the_file_system_larger() -> None:
    base = dict(free_before=0, free_after=0, written_mib=16, enospc=False, ms=1, service="active")
    assert Grow(image_before=1, image_after=2, fs_before=1, fs_after=2, log=(), **base).grew
    assert not Grow(image_before=1, image_after=2, fs_before=1, fs_after=1, log=(), **base).grew
