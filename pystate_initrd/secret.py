"""A key held in one mutable buffer, wiped when it is no longer needed.

Python copies immutable ``bytes`` freely and never clears freed memory, so a
key lives in a ``bytearray`` that is zeroed in place (``wipe``) on every path:
use it as a context manager. Copies made by the interpreter on the way in
(a literal, a ``str`` typed at a prompt) are beyond reach; keep them few.
"""

from __future__ import annotations

import os
from types import TracebackType

from pystate_initrd.formats import recovery


def wipe(buf: bytearray) -> None:
    """Zero buf in place, then empty it."""
    buf[:] = bytes(len(buf))  # same length: overwrites the existing storage, no realloc
    del buf[:]


class Secret:
    """A key in a bytearray; ``with Secret(...) as s: use(s.value)`` wipes it afterwards.

    A bytearray passed in is taken over (not copied) and wiped with the Secret.
    """

    __slots__ = ("_buf",)

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._buf = data if isinstance(data, bytearray) else bytearray(data)

    @classmethod
    def random(cls, size: int) -> Secret:
        """A new secret of size bytes from the kernel's random number generator."""
        return cls(bytearray(os.urandom(size)))

    @property
    def value(self) -> bytearray:
        """The key itself (the buffer, not a copy)."""
        return self._buf

    def wipe(self) -> None:
        wipe(self._buf)

    def __len__(self) -> int:
        return len(self._buf)

    def __repr__(self) -> str:
        return f"<Secret: {len(self._buf)} bytes>"

    def __enter__(self) -> Secret:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.wipe()


def new_recovery_key() -> str:
    """A new recovery key: 32 bytes from the kernel's CSPRNG, in its 71-character form."""
    return recovery.format_recovery_key(os.urandom(recovery.RECOVERY_KEY_BYTES))
