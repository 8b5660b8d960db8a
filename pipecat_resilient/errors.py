"""Exceptions raised and reported by pipecat_resilient.

The tree is shallow, with one root::

    * ResilienceError
        * ReplayFailed   -- recovery gave up; carries the text nobody heard.
                            ``__cause__`` is the last provider error, if any.
        * InvalidState   -- the ledger was misused (a bug in the caller).

Provider errors are left as they are; they are mapped to Pipecat's
``ErrorCategory`` once, where an ``ErrorFrame`` is built.
"""

from __future__ import annotations

__all__ = ["InvalidState", "ReplayFailed", "ResilienceError"]


class ResilienceError(Exception):
    """Base class of every error raised by pipecat_resilient."""


class ReplayFailed(ResilienceError):
    """Recovery gave up, and some accepted text was never heard.

    Carried as the ``exception`` of the one ``ErrorFrame`` a resilient
    processor pushes when it gives up. Its message counts the lost text but
    never quotes it, because Pipecat logs error messages at ERROR level and
    user text belongs at DEBUG; read :attr:`unspoken` for the text itself.

    Attributes:
        unspoken: Each utterance's text that was accepted and not heard, in
            order.
        attempts: Connection attempts made before giving up.
        reason: Why recovery ended (e.g. ``"authentication"`` or
            ``"attempts exhausted"``).
    """

    def __init__(
        self, *, unspoken: tuple[str, ...], attempts: int, reason: str, lost: str | None = None
    ) -> None:
        """Create the error.

        Args:
            unspoken: The unheard text, one entry per utterance.
            attempts: Connection attempts made.
            reason: Why recovery ended.
            lost: What was lost, in words, when it is not text to speak
                (e.g. ``"1 answer"``); the default counts ``unspoken``.
        """
        super().__init__(unspoken, attempts, reason)
        self.unspoken = unspoken
        self.attempts = attempts
        self.reason = reason
        self.lost = lost

    def __str__(self) -> str:
        if self.attempts:
            plural = "" if self.attempts == 1 else "s"
            gave_up = f"gave up after {self.attempts} connection attempt{plural} ({self.reason})"
        else:
            gave_up = f"gave up without retrying ({self.reason})"
        if self.lost is not None:
            return f"{gave_up}; lost {self.lost}"
        words = sum(len(text.split()) for text in self.unspoken)
        return (
            f"{gave_up}; {words} word{'' if words == 1 else 's'} in {len(self.unspoken)} "
            f"utterance{'' if len(self.unspoken) == 1 else 's'} could not be spoken"
        )


class InvalidState(ResilienceError):
    """The ledger was driven in an order that cannot happen (a caller bug)."""
