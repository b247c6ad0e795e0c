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


class CheckFailed(QvlmError):
    """The check ran and the artifact failed it (validate, verify, check-trt): exit code 1."""

    exit_code = 1


class ParityFailure(CheckFailed):
    """Validation ran fine but a parity threshold failed: exit code 1."""


class ArtifactModified(QvlmError):
    """An artifact's files differ from its manifest.json (loads: exit 2; ``qvlm-export verify``: exit 1)."""


def reject_unknown_keys(raw: dict, allowed: set[str] | type, where: str, hidden: frozenset[str] = frozenset()) -> None:
    """One-line error naming the first unknown key of a config mapping and the allowed ones.

    ``allowed`` is a set of names or a dataclass whose field names are allowed; ``hidden``
    names are accepted but not advertised (e.g. ``version``).
    """
    import dataclasses

    names = {f.name for f in dataclasses.fields(allowed)} if isinstance(allowed, type) else set(allowed)
    unknown = sorted(set(raw) - names)
    if unknown:
        raise QvlmError(f"{where}: unknown key {unknown[0]!r}; allowed keys: {sorted(names - hidden)}")
