"""systemd path escaping: the names of the entries on the state partition.

``escape_path`` and ``unescape_path`` give byte for byte what ``systemd-escape --path``
and ``systemd-escape --unescape --path`` give (systemd's unit_name_path_escape and
unit_name_path_unescape, checked against systemd 252), and accept and reject the same
inputs, with one deliberate exception: an escaped NUL byte (``\\x00``). systemd
silently cuts the result at that byte (``a\\x00b`` becomes ``/a``); here it is refused.

Strings are paths as Python's os module hands them out: bytes that are not UTF-8
appear as surrogate escapes (U+DC80..U+DCFF). The byte encoding is always UTF-8
with surrogateescape, whatever the locale, so results do not depend on LANG.

Pure functions, no I/O; on failure they raise EscapeError and return nothing.
"""

from __future__ import annotations

from pystate_initrd.errors import PystateError

# Linux limits as systemd applies them (path_is_valid): a component may have at
# most NAME_MAX bytes and a whole path, with its terminating NUL, PATH_MAX.
NAME_MAX = 255
PATH_MAX = 4096

# Bytes that stay as they are (unit_name_escape's VALID_CHARS minus '-' and '\').
_PLAIN = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:_.")
_HEX = frozenset(b"0123456789abcdefABCDEF")


class EscapeError(PystateError, ValueError):
    """A path that cannot be escaped, or a name that is not a valid escaped path.

    The message names the input; .reason is the reason alone, for callers that
    report the input themselves.
    """

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


def _fail(verb: str, text: str, reason: str) -> EscapeError:
    return EscapeError(f"cannot {verb} {text!r}: {reason}", reason)


def _to_bytes(text: str, what: str) -> bytes:
    try:
        data = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        # Surrogates outside U+DC80..U+DCFF stand for no byte at all.
        raise _fail(what, text, "it contains a lone surrogate") from None
    if b"\0" in data:
        raise _fail(what, text, "it contains a NUL byte")
    return data


def _path_problem(path: bytes) -> str | None:
    """Why systemd's path_is_normalized() would refuse path, or None if it would not.

    path is already free of empty components except those the caller checks for.
    """
    components = path.split(b"/")
    for component in components:
        if component == b"..":
            return "it contains a '..' component"
        if len(component) > NAME_MAX:
            return f"a component is longer than {NAME_MAX} bytes"
    if len(path) >= PATH_MAX:
        return f"the path is {len(path)} bytes long, PATH_MAX allows {PATH_MAX - 1}"
    return None


def escape_path(path: str) -> str:
    """Escape an absolute path to a single name, as ``systemd-escape --path`` does.

    Like systemd, the path is simplified first (``//``, ``.`` components and trailing
    ``/`` go away) and ``..`` components are refused. Also like systemd, relative paths
    and the empty string are accepted and escaped as if they began with ``/`` (the
    binary only warns that this cannot be reversed).
    """
    data = _to_bytes(path, "escape path")
    if not data:
        return "-"
    # path_simplify(): drop empty and "." components, keep "..".
    components = [c for c in data.split(b"/") if c not in (b"", b".")]
    absolute = data.startswith(b"/")
    if not components:
        if absolute:
            return "-"
        # A relative path of only "." components simplifies to "." itself.
        raise _fail("escape path", path, "it names the current directory")
    simplified = b"/" * absolute + b"/".join(components)
    problem = _path_problem(simplified)
    if problem:
        raise _fail("escape path", path, problem)

    out: list[str] = []
    for i, byte in enumerate(b"/".join(components)):
        if byte == 0x2F:
            out.append("-")
        elif byte in _PLAIN and not (i == 0 and byte == 0x2E):
            # A leading "." would make a hidden file name; systemd escapes it.
            out.append(chr(byte))
        else:
            out.append(f"\\x{byte:02x}")
    return "".join(out)


def unescape_path(name: str) -> str:
    """Turn an escaped name back into its absolute path, as ``systemd-escape -u --path``.

    Refused: the empty name, ``\\`` not followed by ``x`` and two hex digits (either
    case, as systemd), results with a leading or trailing ``/`` (``-`` or ``\\x2f`` at
    either end), and results that are not normalized (``//``, ``.``, ``..``, over-long).
    Only ``-`` maps to ``/``. Non-canonical names such as ``.home`` or ``a\\x2Db`` are
    accepted, as by systemd: compare with escape_path() to insist on the canonical form.
    """
    data = _to_bytes(name, "unescape")
    if not data:
        raise _fail("unescape", name, "it is empty")
    if data == b"-":
        return "/"

    out = bytearray()
    i = 0
    while i < len(data):
        byte = data[i]
        if byte == 0x2D:
            out.append(0x2F)
        elif byte == 0x5C:
            digits = data[i + 2 : i + 4]
            if data[i + 1 : i + 2] != b"x" or len(digits) != 2 or not set(digits) <= _HEX:
                raise _fail(
                    "unescape",
                    name,
                    f"'\\' at offset {i} is not followed by 'x' and two hex digits",
                )
            value = int(digits, 16)
            if value == 0:
                # systemd would truncate the path here; a truncated target is never wanted.
                raise _fail("unescape", name, "it escapes a NUL byte")
            out.append(value)
            i += 3
        else:
            out.append(byte)
        i += 1

    if out.startswith(b"/"):
        raise _fail("unescape", name, "it starts with '-' or an escaped '/'")
    if out.endswith(b"/"):
        raise _fail("unescape", name, "it ends with '-' or an escaped '/'")
    if b"//" in out:
        raise _fail("unescape", name, "it has an empty component ('--' or an escaped '/')")
    if b"." in out.split(b"/"):
        raise _fail("unescape", name, "it contains a '.' component")
    path = b"/" + bytes(out)
    problem = _path_problem(path)
    if problem:
        raise _fail("unescape", name, problem)
    return path.decode("utf-8", "surrogateescape")
