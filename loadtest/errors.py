"""Typed errors of the load tester; each carries the offending value so the CLI can say it."""

from __future__ import annotations


class LoadtestError(Exception):
    """Base of every error the load tester raises on bad input; the CLI prints it and exits 2."""


class BadFlag(LoadtestError):
    def __init__(self, flag: str, value: object, reason: str) -> None:
        super().__init__(f"{flag}={value!r}: {reason}")
        self.flag, self.value, self.reason = flag, value, reason


class BadInputFile(LoadtestError):
    def __init__(self, path: str, line: int, reason: str) -> None:
        super().__init__(f"{path}:{line}: {reason}")
        self.path, self.line, self.reason = path, line, reason


class BadResultFile(LoadtestError):
    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason
