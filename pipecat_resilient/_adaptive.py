"""Watchdog timeouts learned from the provider, the way TCP learns its retransmission timeout.

A watchdog that waits a fixed two seconds for audio takes two seconds to
notice a half-open socket, whatever the provider: on one that answers in
150 ms that is more than ten of its answers missed. TCP had the same problem
with its retransmission timer and solved it by measuring (RFC 6298, section
2): it keeps a smoothed round-trip time and a smoothed mean deviation, and
waits the one plus four times the other. :class:`AdaptiveTimeout` does the
same with the waits a watchdog times (time to first audio, gaps in audio that
is owed), with these changes for a voice call, where declaring a live
connection dead costs a reconnect:

* the timeout stays at the caller's *ceiling* (the fixed timeout it replaces)
  until :data:`MIN_SAMPLES` waits were measured: a few answers say little;
* it is never less than ``MARGIN_S`` above the smoothed wait, nor less than
  twice it (Linux puts a floor under the variance term the same way, 200 ms
  by default, so that a steady connection does not end up with a timer a
  hair above its round trip); and never below the caller's *floor*;
* a timeout that ran out (the watchdog declared the connection dead on it)
  puts the ceiling back until the next measurement: the next wait is timed
  as if nothing had been learned, so a provider that became slower is
  measured instead of being declared dead again and again (TCP backs its
  timer off the same way after a timeout).

One slow answer widens the timeout at once (its deviation enters with weight
1/4); fast answers narrow it again only gradually (by 1/4 of the excess each).

Nothing here reads a clock: the caller measures the waits and passes them in.
"""

from __future__ import annotations

__all__ = ["AdaptiveTimeout", "MIN_TIMEOUT_S"]

# RFC 6298, section 2: the gains of the smoothed wait and of its mean
# deviation, and how many deviations the timeout lies above the smoothed wait.
ALPHA = 1 / 8
BETA = 1 / 4
K = 4

# Waits measured before the learned timeout replaces the ceiling.
MIN_SAMPLES = 5

# The learned timeout lies at least this many seconds above the smoothed
# wait, and at least MARGIN_RATIO times it (a provider's answers vary with
# the text and its load more than a handful of samples shows).
MARGIN_S = 0.2
MARGIN_RATIO = 1.0

# The default floor: no learned timeout is shorter (seconds).
MIN_TIMEOUT_S = 0.25


class AdaptiveTimeout:
    """A timeout learned from measured waits: smoothed wait plus four mean deviations, clamped.

    Feed it each wait the watchdog saw end well (:meth:`measured`), tell it
    when the timeout ran out (:meth:`expired`), and ask it for the timeout to
    apply now (:meth:`timeout`).

    Example::

        first_audio = AdaptiveTimeout()
        for wait in (0.12, 0.14, 0.11, 0.13, 0.15):
            first_audio.measured(wait)
        first_audio.timeout(floor=0.25, ceiling=2.0)  # 0.33: 0.13 + 0.2 s margin

    Args:
        min_samples: Waits to measure before the learned timeout replaces the
            ceiling.
    """

    def __init__(self, *, min_samples: int = MIN_SAMPLES) -> None:
        """Create an estimator that has measured nothing."""
        if min_samples < 1:
            raise ValueError("min_samples must be at least 1")
        self.min_samples = min_samples
        self._srtt = 0.0
        self._rttvar = 0.0
        self._samples = 0
        self._backed_off = False

    # Inputs.

    def measured(self, seconds: float) -> None:
        """A wait ended well after ``seconds`` (audio came): learn from it."""
        seconds = max(0.0, seconds)
        if self._samples == 0:
            # RFC 6298 (2.2): the first measurement sets the smoothed wait,
            # and half of it the deviation.
            self._srtt = seconds
            self._rttvar = seconds / 2
        else:
            # RFC 6298 (2.3): the deviation is updated with the smoothed wait
            # from before this measurement.
            self._rttvar = (1 - BETA) * self._rttvar + BETA * abs(self._srtt - seconds)
            self._srtt = (1 - ALPHA) * self._srtt + ALPHA * seconds
        self._samples += 1
        self._backed_off = False

    def expired(self) -> None:
        """The learned timeout ran out: time the next wait against the ceiling until one is measured."""
        self._backed_off = True

    def forget(self) -> None:
        """Forget every measurement (the provider, or its configuration, changed)."""
        self._srtt = self._rttvar = 0.0
        self._samples = 0
        self._backed_off = False

    # Outputs.

    @property
    def learned(self) -> bool:
        """Whether the learned timeout applies (enough waits measured, none expired since)."""
        return self._samples >= self.min_samples and not self._backed_off

    @property
    def smoothed(self) -> float | None:
        """The smoothed wait in seconds (None before any was measured)."""
        return self._srtt if self._samples else None

    @property
    def deviation(self) -> float | None:
        """The smoothed mean deviation of the waits in seconds (None before any was measured)."""
        return self._rttvar if self._samples else None

    @property
    def samples(self) -> int:
        """How many waits were measured."""
        return self._samples

    def timeout(self, *, floor: float, ceiling: float) -> float:
        """The timeout to apply now: the learned one between ``floor`` and ``ceiling``, or ``ceiling``.

        Args:
            floor: The least it may be (seconds).
            ceiling: The most it may be, and what applies until it is learned.
        """
        if not self.learned:
            return ceiling
        margin = max(K * self._rttvar, MARGIN_S, MARGIN_RATIO * self._srtt)
        return min(ceiling, max(floor, self._srtt + margin))

    def __repr__(self) -> str:
        if not self._samples:
            return "AdaptiveTimeout(nothing measured)"
        state = "learned" if self.learned else "backed off" if self._backed_off else "learning"
        return (
            f"AdaptiveTimeout({state}: {self._srtt * 1000:.0f} ms ± {self._rttvar * 1000:.0f} ms "
            f"over {self._samples} waits)"
        )
