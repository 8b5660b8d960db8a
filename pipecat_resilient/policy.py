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

__all__ = ["DEFAULT_RETRY", "RetryPolicy", "backoff"]


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
        if failures < 1:
            return 0.0
        # Cap the exponent so a long recovery cannot overflow the float.
        exponent = min(failures - 1, 64)
        return min(self.wait_max, self.wait_initial * self.wait_exp_base**exponent)


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
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _positive(value: object) -> bool:
    return _finite(value) and value > 0  # type: ignore[operator]


def _non_negative(value: object) -> bool:
    return _finite(value) and value >= 0  # type: ignore[operator]


DEFAULT_RETRY = RetryPolicy()
"""The policy used when none is given."""
