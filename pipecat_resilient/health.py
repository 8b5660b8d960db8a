"""Per-provider health: a circuit breaker, and the store that shares it.

A fallback chain (primary TTS or LLM provider, then the next one) asks here
whether a provider is worth a call. Three layers, one way of importing:

* :class:`BreakerPolicy` -- frozen, validated numbers: how many failures in
  how long open the breaker, how long it stays open, how long a probe lasts.
* :class:`Breaker` -- the sans-I/O state machine of one provider. Methods named
  for what happened are the inputs (:meth:`Breaker.failure`,
  :meth:`Breaker.success`, :meth:`Breaker.probe_started`); the caller passes
  the time in, so it never reads a clock and is tested without one.
* :class:`HealthStore` -- the async interface the processors use, keyed by a
  provider name. :class:`LocalHealthStore` keeps breakers in this process
  (:func:`default_store` is the one every processor shares unless told
  otherwise); :class:`pipecat_resilient.redis_health.RedisHealthStore` shares
  them across a fleet, so one bot's discovery spares the others.

The states::

              failures >= policy.failures within policy.window,
              or one permanent failure
    CLOSED ---------------------------------------------> OPEN
      ^                                                  |  ^
      |                         cooldown elapsed (time)  |  | any failure (the probe's):
      |  any success                                     v  | cooldown doubles, up to
      +------------------------------------------------ HALF_OPEN   cooldown_max

While CLOSED every call goes. While OPEN none does. While HALF_OPEN one caller
at a time holds the *probe lease* and makes the one call that decides: its
success closes the breaker, its failure opens it again for longer. A lease
that is never settled (the prober crashed or hung) expires after
``probe_timeout`` and the next caller may probe.

How a fallback chain uses a store::

    store = default_store()                     # or RedisHealthStore(url)
    choice = await first_available(store, ["elevenlabs", "cartesia"])
    if choice is None:
        ...                                     # every provider is down
    try:
        ...                                     # call choice.provider
    except Exception as exc:
        failure = classify_exception(exc)       # pipecat_resilient.failures
        if failure is not None:
            await store.record_failure(choice.provider, permanent=failure.is_permanent)
        raise
    else:
        await store.record_success(choice.provider)

A success is a call that showed the provider works (connected and produced
output); a failure is one that showed it does not. Failures of *our* making
(an interruption, a cancelled task) are neither and must not be recorded.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple, Protocol

from pipecat_resilient.policy import check_seconds

__all__ = [
    "DEFAULT_BREAKER",
    "MAX_FAILURES",
    "Breaker",
    "BreakerPolicy",
    "Choice",
    "Health",
    "HealthListener",
    "HealthStore",
    "LocalHealthStore",
    "default_store",
    "first_available",
]


MAX_FAILURES = 10_000
"""Largest failure threshold a policy accepts; a breaker keeps that many timestamps at most."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerPolicy:
    """When a provider counts as down, and how it is tried again.

    Times are in seconds.

    Example::

        BreakerPolicy(failures=5, window=60.0, cooldown=5.0, cooldown_max=300.0)
    """

    failures: int = 3
    """Transient failures within :attr:`window`, with no success in between,
    that open the breaker (at most :data:`MAX_FAILURES`). A permanent failure
    (bad key, unknown voice) opens it at once."""

    window: float = 30.0
    """How far back transient failures are counted. A failure at ``t`` counts
    at ``now`` while ``now - t < window``."""

    cooldown: float = 10.0
    """How long a freshly opened breaker refuses calls before it lets one probe through."""

    cooldown_max: float = 120.0
    """Cap on the cooldown, which doubles after each failed probe. Equal to
    :attr:`cooldown` to keep it fixed."""

    probe_timeout: float = 5.0
    """How long a probe lease lasts. A probe whose result is not recorded by
    then is presumed lost, and another caller may probe."""

    def __post_init__(self) -> None:
        if isinstance(self.failures, bool) or not isinstance(self.failures, int):
            raise TypeError(f"failures must be an int, got {self.failures!r}")
        if not 1 <= self.failures <= MAX_FAILURES:
            raise ValueError(f"failures must be between 1 and {MAX_FAILURES}, got {self.failures}")
        check_seconds(
            window=self.window,
            cooldown=self.cooldown,
            cooldown_max=self.cooldown_max,
            probe_timeout=self.probe_timeout,
        )
        if self.cooldown_max < self.cooldown:
            raise ValueError(
                f"cooldown_max ({self.cooldown_max}) must not be smaller than cooldown ({self.cooldown})"
            )

    def cooldown_after(self, failed_probes: int) -> float:
        """How long the breaker stays open after ``failed_probes`` failed probes in a row.

        Args:
            failed_probes: Probes that failed since the breaker last closed;
                0 when it has just opened from closed.

        Returns:
            ``min(cooldown_max, cooldown * 2 ** failed_probes)``.
        """
        if failed_probes <= 0:
            return float(self.cooldown)
        # Compared in logarithms (each taken alone, since even the ratio of
        # two valid times can overflow) so that no number of failed probes
        # can overflow: past the cap the cooldown is the cap.
        if failed_probes * math.log(2.0) >= math.log(self.cooldown_max) - math.log(self.cooldown):
            return float(self.cooldown_max)
        return float(min(self.cooldown_max, self.cooldown * 2.0**failed_probes))


DEFAULT_BREAKER = BreakerPolicy()
"""The breaker policy used when none is given."""


class Health(Enum):
    """What a breaker says about its provider.

    Parameters:
        CLOSED: Healthy: every call may go.
        OPEN: Down: no call may go until the cooldown ends.
        HALF_OPEN: The cooldown ended: one caller at a time may probe, after
            taking the probe lease.
    """

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Breaker:
    """Sans-I/O circuit breaker of one provider.

    Feed it what happened, with the time it happened, and ask it what to do.
    It never reads a clock, never raises for any order of events or times,
    and its memory is bounded (at most ``policy.failures`` timestamps).

    Times are floats in seconds on any one clock the caller sticks to (the
    stores use ``time.monotonic``). A clock that steps back is tolerated: the
    breaker stays consistent, it may just keep a state a little longer.
    """

    def __init__(self, policy: BreakerPolicy = DEFAULT_BREAKER) -> None:
        """Create a closed breaker.

        Args:
            policy: The thresholds and times.
        """
        self._policy = policy
        # The latest transient failures while closed; only the last
        # ``policy.failures`` can matter, so older ones fall off.
        self._recent: deque[float] = deque(maxlen=policy.failures)
        self._opened_until: float | None = None  # None while closed
        self._failed_probes = 0
        self._probe_until: float | None = None  # end of the live probe lease, if any
        self._trips = 0

    @property
    def policy(self) -> BreakerPolicy:
        """The policy this breaker follows."""
        return self._policy

    # Inputs: call these as things happen.

    def failure(self, now: float, *, permanent: bool = False) -> Health:
        """A call to the provider failed.

        While closed, a permanent failure opens the breaker at once, and a
        transient one opens it when it is the ``policy.failures``-th within
        ``policy.window`` since the last success. While half-open, any failure
        is taken as the probe's: the breaker opens again and its cooldown
        doubles. While open, failures are ignored: they are calls that started
        before the breaker opened, and they must not stretch the cooldown.

        Args:
            now: When the failure was seen.
            permanent: Whether retrying cannot help (bad credentials, unknown
                voice or model); see :class:`pipecat_resilient.Verdict`.

        Returns:
            The state after the failure.
        """
        state = self.state(now)
        if state is Health.OPEN:
            return state
        if state is Health.HALF_OPEN:
            self._failed_probes += 1
            self._open(now)
            return Health.OPEN
        if not permanent:
            self._recent.append(now)
            inside = [t for t in self._recent if now - t < self._policy.window]
            if len(inside) < self._policy.failures:
                return Health.CLOSED
        self._failed_probes = 0
        self._trips += 1
        self._open(now)
        return Health.OPEN

    def success(self, now: float) -> Health:
        """A call to the provider succeeded.

        While half-open this closes the breaker (it is the probe's success, or
        as good as one). While closed it resets the count of transient
        failures, so only failures with no success between them open the
        breaker. While open it is ignored: a call that started before the
        breaker opened says nothing about the provider now.

        Args:
            now: When the success was seen.

        Returns:
            The state after the success.
        """
        state = self.state(now)
        if state is Health.OPEN:
            return state
        self._recent.clear()
        self._opened_until = None
        self._failed_probes = 0
        self._probe_until = None
        return Health.CLOSED

    def probe_started(self, now: float) -> bool:
        """A caller asks to make the one probe call of a half-open breaker.

        Args:
            now: When the probe would start.

        Returns:
            True when the caller now holds the probe lease and should make the
            call, then report it with :meth:`success` or :meth:`failure`.
            False when the breaker is not half-open or another probe's lease
            is still live; the caller must not use the provider.
        """
        if self.state(now) is not Health.HALF_OPEN or self.probe_running(now):
            return False
        self._probe_until = now + self._policy.probe_timeout
        return True

    # Outputs: ask these at any time.

    def state(self, now: float) -> Health:
        """The state at ``now``: an open breaker turns half-open once its cooldown ends."""
        if self._opened_until is None:
            return Health.CLOSED
        if now < self._opened_until:
            return Health.OPEN
        return Health.HALF_OPEN

    def allows(self, now: float) -> bool:
        """Whether any caller may use the provider at ``now`` without a probe lease (only while closed).

        While half-open the one call that may go is the probe: ask
        :meth:`probe_started`, which hands the lease to a single caller.
        """
        return self.state(now) is Health.CLOSED

    def probe_running(self, now: float) -> bool:
        """Whether a probe lease is live at ``now`` (granted, unsettled, unexpired)."""
        return self._probe_until is not None and now < self._probe_until

    @property
    def opened_until(self) -> float | None:
        """When the current cooldown ends (the breaker turns half-open); None while closed."""
        return self._opened_until

    @property
    def failed_probes(self) -> int:
        """Probes that failed in a row since the breaker last opened from closed."""
        return self._failed_probes

    @property
    def trips(self) -> int:
        """How many times the breaker opened from closed, over its lifetime."""
        return self._trips

    def _open(self, now: float) -> None:
        self._opened_until = now + self._policy.cooldown_after(self._failed_probes)
        self._recent.clear()
        self._probe_until = None


HealthListener = Callable[[str, Health, Health], None]
"""Called as ``listener(provider, old, new)`` when a recorded result changed a provider's state."""


class HealthStore(Protocol):
    """Where processors read and record provider health, keyed by provider name.

    Implementations read the time themselves. Every method is safe to call
    concurrently, from any number of tasks (and, for a shared store, from any
    number of processes); each one is one atomic step of the breaker.

    A provider name is any string the processors agree on, e.g.
    ``"elevenlabs"`` or ``"elevenlabs:eleven_flash_v2_5"`` when models fail
    separately.
    """

    async def state(self, provider: str) -> Health:
        """The provider's state now."""
        ...

    async def record_failure(self, provider: str, *, permanent: bool = False) -> Health:
        """Record a failed call (see :meth:`Breaker.failure`) and return the state after it."""
        ...

    async def record_success(self, provider: str) -> Health:
        """Record a successful call (see :meth:`Breaker.success`) and return the state after it."""
        ...

    async def try_acquire_probe(self, provider: str) -> bool:
        """Take the provider's probe lease.

        True for exactly one caller at a time while the provider is half-open,
        until the lease expires or a result is recorded.
        """
        ...


class LocalHealthStore:
    """Breakers kept in this process, one per provider.

    Every call is one synchronous step under a lock, so it is atomic for the
    tasks of an event loop and for threads alike, and never waits.

    Example::

        store = LocalHealthStore(policy=BreakerPolicy(failures=2))
        await store.record_failure("cartesia")
    """

    def __init__(
        self,
        *,
        policy: BreakerPolicy = DEFAULT_BREAKER,
        clock: Callable[[], float] = time.monotonic,
        on_change: HealthListener | None = None,
    ) -> None:
        """Create an empty store: every provider starts closed.

        Args:
            policy: The policy of every breaker in the store.
            clock: Seconds on a clock that does not step back; inject a fake
                one in tests.
            on_change: Called with ``(provider, old, new)`` after a recorded
                result changed a provider's state. It runs in the caller's
                task and should return quickly.
        """
        self._policy = policy
        self._clock = clock
        self._on_change = on_change
        self._breakers: dict[str, Breaker] = {}
        self._lock = threading.Lock()

    @property
    def policy(self) -> BreakerPolicy:
        """The policy of every breaker in the store."""
        return self._policy

    def breaker(self, provider: str) -> Breaker:
        """The breaker of ``provider`` (created closed on first use), for inspection."""
        with self._lock:
            return self._breaker(provider)

    async def state(self, provider: str) -> Health:
        """The provider's state now."""
        with self._lock:
            return self._breaker(provider).state(self._clock())

    async def record_failure(self, provider: str, *, permanent: bool = False) -> Health:
        """Record a failed call and return the state after it."""
        with self._lock:
            breaker, now = self._breaker(provider), self._clock()
            old = breaker.state(now)
            new = breaker.failure(now, permanent=permanent)
        self._changed(provider, old, new)
        return new

    async def record_success(self, provider: str) -> Health:
        """Record a successful call and return the state after it."""
        with self._lock:
            breaker, now = self._breaker(provider), self._clock()
            old = breaker.state(now)
            new = breaker.success(now)
        self._changed(provider, old, new)
        return new

    async def try_acquire_probe(self, provider: str) -> bool:
        """Take the provider's probe lease; True for one caller at a time while half-open."""
        with self._lock:
            return self._breaker(provider).probe_started(self._clock())

    def _breaker(self, provider: str) -> Breaker:
        breaker = self._breakers.get(provider)
        if breaker is None:
            breaker = self._breakers[provider] = Breaker(self._policy)
        return breaker

    def _changed(self, provider: str, old: Health, new: Health) -> None:
        if old is not new and self._on_change is not None:
            self._on_change(provider, old, new)


_default_store: LocalHealthStore | None = None
_default_lock = threading.Lock()


def default_store() -> LocalHealthStore:
    """The process-wide store every processor uses when it is given none.

    Two pipelines in one process thus share provider health. To share it
    across processes and machines, give the processors a
    :class:`~pipecat_resilient.redis_health.RedisHealthStore` instead.
    """
    global _default_store
    with _default_lock:
        if _default_store is None:
            _default_store = LocalHealthStore()
        return _default_store


class Choice(NamedTuple):
    """The provider a fallback chain should call next. Returned by :func:`first_available`."""

    provider: str
    """The provider's name."""
    probe: bool
    """Whether the call is the half-open probe (its result decides the provider's health)."""


async def first_available(store: HealthStore, providers: Sequence[str]) -> Choice | None:
    """Pick the first provider of a fallback chain that may take a call now.

    A closed provider is taken as is. A half-open one is taken only if this
    caller wins its probe lease, so a recovering provider gets one trial call
    fleet-wide while the rest of the traffic goes further down the chain.

    Args:
        store: Where health is kept.
        providers: The chain, preferred provider first.

    Returns:
        The choice, or None when every provider is open (or half-open with
        its probe taken); the caller then decides whether to wait or to try
        the preferred provider anyway.
    """
    for provider in providers:
        state = await store.state(provider)
        if state is Health.CLOSED:
            return Choice(provider, probe=False)
        if state is Health.HALF_OPEN and await store.try_acquire_probe(provider):
            return Choice(provider, probe=True)
    return None
