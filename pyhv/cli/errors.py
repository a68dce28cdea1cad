"""The one error a command raises for bad input or a failure it can explain."""

from __future__ import annotations


class CliError(Exception):
    """A clear message and a non-zero exit (2 for bad input, 1 otherwise), never a traceback."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code
