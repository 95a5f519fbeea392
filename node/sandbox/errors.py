"""Exceptions raised by the sandbox, one per outcome, each saying whose fault it is."""

from __future__ import annotations


class AdmissionRefused(Exception):
    """The node will not take this job now (busy) or ever (asks for more than the node has).

    Not the job's fault. `code` is safe to send to the peer; `retryable` says whether asking later may work.
    """

    def __init__(self, *, code: str, reason: str, retryable: bool) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.retryable = retryable


class SandboxUnavailable(Exception):
    """This host cannot isolate native jobs, so it refuses them. The node owner's to fix; the message says how."""


class WorkDirError(Exception):
    """The caller's work dir is unusable (exists and is not empty, or unreachable for the job uid)."""
