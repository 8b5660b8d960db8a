"""How hard to try for a fresh provider connection after a drop.

:class:`RetryPolicy` is a frozen, validated description of the retry budget;
:func:`backoff` turns it into the waits between attempts. Both are pure: the
caller passes in the random source, so tests get exact, zero-length waits.

The waits are capped exponential backoff with *full jitter* (each wait is drawn
uniformly from zero to the capped exponential value), the scheme AWS measured
to spread reconnect storms best. Pipecat's own websocket services wait at
least four seconds between attempts; the defaults here start at a twentieth of
a second, because every one of those seconds is dead air on a call.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["DEFAULT_REPLAY", "DEFAULT_RETRY", "ReplayPolicy", "RetryPolicy", "backoff"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How hard to try for a fresh provider connection after a drop.

    One *recovery* starts when a drop is detected and ends when a fresh
    instance is connected and speaking again, or when this budget is spent.
    A replacement that dies before it produced any audio counts against the
    same budget, so a provider that accepts connections and closes them at once
    cannot cause an endless loop.

    Times are in seconds; ``None`` means "no limit".

    Example::

        RetryPolicy(attempts=3, wait_initial=0.1, wait_max=1.0, timeout=8.0)
    """

    attempts: int = 5
    """Connection attempts per recovery, counting the first one."""

    timeout: float | None = 15.0
    """Total time one recovery may take, from the drop to the last attempt.

    Also bounds how long an ``EndFrame`` waits for in-flight speech that needs
    recovering."""

    attempt_timeout: float | None = 5.0
    """How long one connection attempt (set-up and start of a fresh instance)
    may take before it counts as failed."""

    wait_initial: float = 0.05
    """Upper bound of the first wait (the first attempt itself is immediate)."""

    wait_max: float = 2.0
    """Cap on any single wait."""

    wait_exp_base: float = 2.0
    """Growth factor of the wait bound from one attempt to the next."""

    jitter: bool = True
    """Full jitter: draw each wait uniformly between zero and its bound.
    ``False`` waits exactly the bound (useful to reason about, not to deploy)."""

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise TypeError(f"attempts must be an int, got {self.attempts!r}")
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {self.attempts}")
        for name in ("timeout", "attempt_timeout"):
            value = getattr(self, name)
            if value is not None and not _positive(value):
                raise ValueError(f"{name} must be a positive number of seconds or None, got {value!r}")
        for name in ("wait_initial", "wait_max"):
            value = getattr(self, name)
            if not _non_negative(value):
                raise ValueError(f"{name} must be a non-negative number of seconds, got {value!r}")
        if self.wait_max < self.wait_initial:
            raise ValueError(
                f"wait_max ({self.wait_max}) must not be smaller than wait_initial ({self.wait_initial})"
            )
        if not _finite(self.wait_exp_base) or self.wait_exp_base < 1:
            raise ValueError(f"wait_exp_base must be at least 1, got {self.wait_exp_base!r}")

    def wait_bound(self, failures: int) -> float:
        """Upper bound of the wait after ``failures`` failed attempts.

        Args:
            failures: Failed attempts so far in this recovery (at least 1).

        Returns:
            ``min(wait_max, wait_initial * wait_exp_base ** (failures - 1))``.
        """
        if failures < 1 or self.wait_initial == 0:
            return 0.0
        # Compared in logarithms, so no base, exponent or attempt count can
        # overflow: past the cap the bound is the cap.
        headroom = math.log(self.wait_max) - math.log(self.wait_initial)
        if (failures - 1) * math.log(self.wait_exp_base) >= headroom:
            return float(self.wait_max)
        return float(min(self.wait_max, self.wait_initial * self.wait_exp_base ** (failures - 1)))


CONTINUE_INSTRUCTION = (
    "Your previous reply was cut off by a network error after the text above; the user heard it "
    "up to there. Continue the reply from exactly where it stopped. Do not repeat anything already "
    "said and do not mention the interruption."
)
"""What the model is told when it must continue a cut reply."""

SESSION_CONTINUE_INSTRUCTION = (
    "If the conversation ends with a reply of yours that was cut off, the user heard that reply up to "
    "where it ends: continue it from exactly there, without repeating any of it and without mentioning "
    "the interruption."
)
"""Speech-to-speech: appended to the system instruction of a fresh session seeded to continue a cut reply."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplayPolicy:
    """What to do with an LLM answer the connection cut short.

    Example::

        ReplayPolicy(partial_answer="restart")
    """

    partial_answer: str = "continue"
    """``"continue"``: ask a fresh instance to continue the answer from what was
    already emitted, and pass on only the new suffix (nothing is said twice;
    relies on the model following the instruction, and repeated text is
    trimmed). ``"restart"``: close the cut answer and ask for a whole new one
    (the listener hears the beginning again, but the new answer does not
    depend on the model continuing well)."""

    continue_instruction: str = CONTINUE_INSTRUCTION
    """The instruction sent (as a user message after the cut answer) to continue it."""

    min_repeat_chars: int = 12
    """A continuation that starts by repeating at least this many characters of
    the end of the cut answer has them trimmed; shorter overlaps are kept."""

    answer_again: bool = True
    """Speech-to-speech sessions: after a reply was cut, have the model answer
    again on the fresh session instead of leaving the user in silence."""

    max_buffered_input_s: float = 30.0
    """Speech-to-speech sessions: seconds of user audio kept while reconnecting
    (older audio is dropped first); text and tool results are always kept."""

    continuation_hold_s: float = 0.3
    """Speech-to-speech sessions: longest the audio of a continuation is held back
    while its transcription shows whether it repeats what the user already heard
    (the repeated words' audio is dropped). Audio held this long is played
    whatever the transcription says; 0 holds nothing."""

    max_session_s: float | None = 3300.0
    """Speech-to-speech sessions: a session older than this is replaced by a fresh
    one at the next turn boundary, before the provider ends it (OpenAI Realtime
    ends a session after 60 minutes; Gemini Live announces the end of a
    connection with GoAway, which is acted on whatever this says). None: never."""

    session_instruction: str | None = SESSION_CONTINUE_INSTRUCTION
    """Speech-to-speech sessions: appended to the system instruction of a fresh
    session that is seeded to continue a cut reply (the reply itself is given to
    it as the model's own partial turn, never as a user message). None: nothing
    is added."""

    def __post_init__(self) -> None:
        if self.partial_answer not in ("continue", "restart"):
            raise ValueError(f"partial_answer must be 'continue' or 'restart', got {self.partial_answer!r}")
        if not isinstance(self.continue_instruction, str) or not self.continue_instruction.strip():
            raise ValueError("continue_instruction must be a non-empty string")
        if isinstance(self.min_repeat_chars, bool) or not isinstance(self.min_repeat_chars, int):
            raise TypeError(f"min_repeat_chars must be an int, got {self.min_repeat_chars!r}")
        if self.min_repeat_chars < 1:
            raise ValueError(f"min_repeat_chars must be at least 1, got {self.min_repeat_chars}")
        if not _non_negative(self.max_buffered_input_s):
            value = self.max_buffered_input_s
            raise ValueError(f"max_buffered_input_s must be a non-negative number of seconds, got {value!r}")
        if not _non_negative(self.continuation_hold_s):
            value = self.continuation_hold_s
            raise ValueError(f"continuation_hold_s must be a non-negative number of seconds, got {value!r}")
        if self.max_session_s is not None and not _positive(self.max_session_s):
            value = self.max_session_s
            raise ValueError(f"max_session_s must be a positive number of seconds or None, got {value!r}")
        if self.session_instruction is not None and (
            not isinstance(self.session_instruction, str) or not self.session_instruction.strip()
        ):
            raise ValueError("session_instruction must be a non-empty string or None")


def backoff(policy: RetryPolicy, rng: random.Random | None = None) -> Iterator[float]:
    """Yield the wait before each retry of ``policy``, in seconds.

    The first attempt is immediate and has no wait, so this yields
    ``policy.attempts - 1`` values.

    Args:
        policy: The retry budget.
        rng: Random source for the jitter; the module's when omitted.

    Yields:
        The wait before attempt 2, 3, ... ``policy.attempts``.
    """
    draw = (rng or random).uniform
    for failures in range(1, policy.attempts):
        bound = policy.wait_bound(failures)
        yield draw(0.0, bound) if policy.jitter and bound > 0 else bound


def _finite(value: object) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _positive(value: object) -> bool:
    return _finite(value) and value > 0  # type: ignore[operator]


def _non_negative(value: object) -> bool:
    return _finite(value) and value >= 0  # type: ignore[operator]


def check_seconds(**values: object) -> None:
    """Raise ValueError naming the first argument that is not a positive, finite number of seconds."""
    for name, value in values.items():
        if not _positive(value):
            raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")


def check_positive(**values: object) -> None:
    """Raise ValueError naming the first argument that is not a positive, finite number."""
    for name, value in values.items():
        if not _positive(value):
            raise ValueError(f"{name} must be a positive number, got {value!r}")


DEFAULT_RETRY = RetryPolicy()
"""The policy used when none is given."""

DEFAULT_REPLAY = ReplayPolicy()
"""The replay policy used when none is given."""
