"""Errors a user can act on.

Every failure caused by the user's input is raised as :class:`QvlmError` with a
one-line message that says what to change. The CLI prints it and exits 2; only
genuine bugs produce tracebacks.
"""

from __future__ import annotations


class QvlmError(Exception):
    """A user-facing error: one line, actionable, exit code 2."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))


class ParityFailure(QvlmError):
    """Validation ran fine but a parity threshold failed: exit code 1."""

    exit_code = 1
