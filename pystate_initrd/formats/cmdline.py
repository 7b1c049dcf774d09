"""The kernel command line, split into words exactly as systemd splits it, and encoded back.

pystate must see the same words as systemd and its generators in the same initrd, so
quoting follows systemd's extract_first_word(), not the kernel's own parser.
"""

from __future__ import annotations

from collections.abc import Iterable

from pystate_initrd.errors import PystateError


class CmdlineError(PystateError):
    """A kernel command line that cannot be read, or pairs that cannot be written as one."""


# systemd's WHITESPACE. The kernel also splits at \v and \f, but every other component in the
# initrd (systemd and its generators) splits as systemd does, and pystate must see the same words.
_CMDLINE_SEPARATORS = " \t\n\r"
_CMDLINE_QUOTES = "\"'"


def split_cmdline(text: str) -> list[str]:
    """Split a kernel command line into words as systemd does.

    systemd (since v247) splits /proc/cmdline with extract_first_word() and the flags
    EXTRACT_UNQUOTE | EXTRACT_RELAX | EXTRACT_RETAIN_ESCAPE, which means:
    words are separated by runs of space, tab, CR or LF; a double or single quote opens a quoted
    run anywhere in a word (also mid-word: ``a="b c"`` is the word ``a=b c``) which lasts to the
    same quote character; quote characters are removed and whitespace inside them is kept;
    an unterminated quote runs to the end of the line; backslashes are ordinary characters;
    ``""`` alone is an empty word.
    """
    if "\0" in text:
        # /proc/cmdline cannot hold a NUL, and C code would silently stop there.
        raise CmdlineError("kernel command line: contains a NUL character, refusing")
    words: list[str] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i] in _CMDLINE_SEPARATORS:
            i += 1
        if i >= n:
            return words
        word: list[str] = []
        quote = ""
        while i < n:
            c = text[i]
            if quote:
                if c == quote:
                    quote = ""
                else:
                    word.append(c)
            elif c in _CMDLINE_QUOTES:
                quote = c
            elif c in _CMDLINE_SEPARATORS:
                break
            else:
                word.append(c)
            i += 1
        words.append("".join(word))


def parse_cmdline(text: str) -> list[tuple[str, str | None]]:
    """The (key, value) pairs of a kernel command line, in order (later ones win on lookup).

    A word splits at its first ``=``; a word without one has the value None.
    """
    pairs: list[tuple[str, str | None]] = []
    for word in split_cmdline(text):
        key, sep, value = word.partition("=")
        pairs.append((key, value if sep else None))
    return pairs


def _quote_cmdline_part(text: str) -> str:
    if text and not any(c in _CMDLINE_SEPARATORS or c in _CMDLINE_QUOTES for c in text):
        return text
    # Double quotes keep everything but '"' literal; a '"' is closed over into single quotes.
    return '"' + text.replace('"', '"\'"\'"') + '"'


def format_cmdline(pairs: Iterable[tuple[str, str | None]]) -> str:
    """Encode (key, value) pairs so that parse_cmdline() gives them back exactly."""
    words = []
    for key, value in pairs:
        if "=" in key or "\0" in key or (value is not None and "\0" in value):
            raise CmdlineError(
                f"kernel command line: cannot encode key {key!r}: "
                "a key cannot contain '=' and no part can contain NUL"
            )
        if value is None:
            words.append(_quote_cmdline_part(key))
        elif key == "" or any(c in _CMDLINE_SEPARATORS or c in _CMDLINE_QUOTES for c in key):
            words.append(_quote_cmdline_part(f"{key}={value}"))
        else:
            words.append(f"{key}={_quote_cmdline_part(value)}" if value else f"{key}=")
    return " ".join(words)
