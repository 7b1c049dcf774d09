"""The one base class for errors a person at the console should read.

Library modules raise a subclass naming what failed, on which device or file;
only the program's entry point turns them into a single line and an exit status.
"""


class PystateError(Exception):
    """A failure with a message fit for the console: what failed, where, what to do."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        message = super().__str__()
        return f"{message} ({self.hint})" if self.hint else message
