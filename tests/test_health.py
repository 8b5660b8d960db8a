"""BreakerPolicy validation, the Breaker state machine, and the in-process LocalHealthStore."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipecat_resilient.health import (
    DEFAULT_BREAKER,
    Breaker,
    BreakerPolicy,
    Choice,
    Health,
    HealthStore,
    LocalHealthStore,
    default_store,
    first_available,
)

CLOSED, OPEN, HALF_OPEN = Health.CLOSED, Health.OPEN, Health.HALF_OPEN

# Round numbers, so every expected time below is exact.
POLICY = BreakerPolicy(failures=3, window=10.0, cooldown=4.0, cooldown_max=20.0, probe_timeout=2.0)


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def tripped(policy: BreakerPolicy = POLICY, at: float = 0.0) -> Breaker:
    """A breaker opened by a permanent failure at ``at``."""
    breaker = Breaker(policy)
    assert breaker.failure(at, permanent=True) is OPEN
    return breaker


# BreakerPolicy


def test_default_policy() -> None:
    """Three failures in 30 s open the breaker; it probes after 10 s, backing off to 2 min."""
    assert DEFAULT_BREAKER == BreakerPolicy()
    assert (DEFAULT_BREAKER.failures, DEFAULT_BREAKER.window) == (3, 30.0)
    assert (DEFAULT_BREAKER.cooldown, DEFAULT_BREAKER.cooldown_max) == (10.0, 120.0)
    assert DEFAULT_BREAKER.probe_timeout == 5.0


def test_policy_is_frozen() -> None:
    """A policy cannot change under a breaker; variants are made with replace()."""
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT_BREAKER.failures = 5  # type: ignore[misc]
    assert dataclasses.replace(DEFAULT_BREAKER, failures=5).failures == 5


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"failures": 0}, ValueError, "failures must be between 1 and 10000"),
        ({"failures": -3}, ValueError, "failures must be between 1 and 10000"),
        ({"failures": 10**20}, ValueError, "failures must be between 1 and 10000"),
        ({"failures": 2.5}, TypeError, "failures must be an int"),
        ({"failures": True}, TypeError, "failures must be an int"),
        ({"failures": "3"}, TypeError, "failures must be an int"),
        ({"window": 0}, ValueError, "window must be a positive number of seconds"),
        ({"window": -1.0}, ValueError, "window must be a positive number of seconds"),
        ({"window": math.inf}, ValueError, "window must be a positive number of seconds"),
        ({"cooldown": math.nan}, ValueError, "cooldown must be a positive number of seconds"),
        ({"cooldown": "10"}, ValueError, "cooldown must be a positive number of seconds"),
        ({"cooldown_max": 0}, ValueError, "cooldown_max must be a positive number of seconds"),
        ({"probe_timeout": 0.0}, ValueError, "probe_timeout must be a positive number of seconds"),
        ({"probe_timeout": None}, ValueError, "probe_timeout must be a positive number of seconds"),
        ({"cooldown": 30.0, "cooldown_max": 20.0}, ValueError, "must not be smaller than cooldown"),
    ],
)
def test_policy_rejects_bad_values(kwargs: dict[str, object], error: type[Exception], message: str) -> None:
    """Bad values fail at construction with a message naming the field."""
    with pytest.raises(error, match=message):
        BreakerPolicy(**kwargs)  # type: ignore[arg-type]


def test_cooldown_doubles_per_failed_probe_up_to_the_cap() -> None:
    """cooldown * 2 ** failed_probes, capped at cooldown_max, whatever the count."""
    assert [POLICY.cooldown_after(n) for n in range(5)] == [4.0, 8.0, 16.0, 20.0, 20.0]
    assert POLICY.cooldown_after(10**9) == 20.0
    fixed = BreakerPolicy(cooldown=5.0, cooldown_max=5.0)
    assert {fixed.cooldown_after(n) for n in range(10)} == {5.0}
    tiny = BreakerPolicy(cooldown=1e-300, cooldown_max=1e300)
    assert tiny.cooldown_after(10_000) == 1e300


# Breaker: closed to open


def test_starts_closed_and_allows_calls() -> None:
    """A fresh breaker lets every call through and has no probe to give."""
    breaker = Breaker(POLICY)
    assert breaker.state(0.0) is CLOSED
    assert breaker.allows(0.0)
    assert breaker.opened_until is None
    assert not breaker.probe_started(0.0)


def test_failures_below_the_threshold_keep_it_closed() -> None:
    """Two transient failures of three stay closed."""
    breaker = Breaker(POLICY)
    assert breaker.failure(1.0) is CLOSED
    assert breaker.failure(2.0) is CLOSED
    assert breaker.allows(2.0)


def test_threshold_within_the_window_opens() -> None:
    """The third transient failure within the window opens the breaker for the cooldown."""
    breaker = Breaker(POLICY)
    breaker.failure(1.0)
    breaker.failure(5.0)
    assert breaker.failure(10.9) is OPEN
    assert breaker.opened_until == 14.9
    assert not breaker.allows(10.9)
    assert breaker.trips == 1


def test_failures_spread_beyond_the_window_do_not_open() -> None:
    """A failure counts only while now - t < window: one per 5 s with a 10 s window never reaches three."""
    breaker = Breaker(POLICY)
    for t in (0.0, 5.0, 10.0, 15.0, 20.0, 25.0):
        assert breaker.failure(t) is CLOSED
    assert breaker.trips == 0


def test_success_resets_the_count() -> None:
    """Only failures with no success between them open the breaker."""
    breaker = Breaker(POLICY)
    breaker.failure(1.0)
    breaker.failure(2.0)
    assert breaker.success(3.0) is CLOSED
    assert breaker.failure(4.0) is CLOSED
    assert breaker.failure(5.0) is CLOSED
    assert breaker.failure(6.0) is OPEN


def test_permanent_failure_opens_at_once() -> None:
    """A bad key or unknown voice opens the breaker on the first failure."""
    breaker = Breaker(POLICY)
    assert breaker.failure(7.0, permanent=True) is OPEN
    assert breaker.opened_until == 11.0
    assert breaker.trips == 1


def test_single_failure_policy() -> None:
    """failures=1 opens on any failure."""
    breaker = Breaker(BreakerPolicy(failures=1))
    assert breaker.failure(0.0) is OPEN


# Breaker: open


def test_open_ignores_late_results() -> None:
    """Results of calls that started before the trip neither stretch nor cut the cooldown."""
    breaker = tripped()
    assert breaker.failure(1.0) is OPEN
    assert breaker.failure(2.0, permanent=True) is OPEN
    assert breaker.success(3.0) is OPEN
    assert breaker.opened_until == 4.0
    assert breaker.trips == 1


def test_open_gives_no_probe() -> None:
    """No caller may probe during the cooldown."""
    breaker = tripped()
    assert not breaker.probe_started(3.99)
    assert breaker.state(3.99) is OPEN


def test_cooldown_end_turns_it_half_open() -> None:
    """Time alone turns an open breaker half-open, at exactly opened_until."""
    breaker = tripped()
    assert breaker.state(4.0) is HALF_OPEN
    assert not breaker.allows(4.0)  # only the probe may go


# Breaker: half-open and the probe


def test_one_probe_at_a_time() -> None:
    """The first caller gets the lease; the others are refused while it is live."""
    breaker = tripped()
    assert breaker.probe_started(4.0)
    assert breaker.probe_running(4.0)
    assert not breaker.probe_started(4.0)
    assert not breaker.probe_started(5.99)
    assert breaker.state(5.0) is HALF_OPEN


def test_lost_probe_lease_expires() -> None:
    """A probe that never reports frees the lease after probe_timeout, for one more caller."""
    breaker = tripped()
    assert breaker.probe_started(4.0)
    assert not breaker.probe_running(6.0)
    assert breaker.probe_started(6.0)
    assert not breaker.probe_started(6.5)


def test_probe_success_closes() -> None:
    """The probe's success closes the breaker, and every call may go again."""
    breaker = tripped()
    assert breaker.probe_started(4.0)
    assert breaker.success(4.5) is CLOSED
    assert breaker.allows(4.5)
    assert breaker.opened_until is None
    assert not breaker.probe_running(4.5)


def test_probe_failure_reopens_with_a_longer_cooldown() -> None:
    """Each failed probe doubles the cooldown, up to cooldown_max."""
    breaker = tripped()
    opened = []
    t = 4.0
    for _ in range(4):
        assert breaker.probe_started(t)
        assert breaker.failure(t + 1.0) is OPEN
        assert breaker.state(t + 1.0) is OPEN
        opened.append(breaker.opened_until)
        t = breaker.opened_until  # type: ignore[assignment]
    assert opened == [13.0, 30.0, 51.0, 72.0]  # 8, 16, 20 (cap), 20 s after each failure
    assert breaker.failed_probes == 4
    assert breaker.trips == 1  # reopening from half-open is not a new trip


def test_permanent_probe_failure_counts_like_any_other() -> None:
    """A permanent failure while half-open reopens with the grown cooldown."""
    breaker = tripped()
    assert breaker.failure(4.0, permanent=True) is OPEN
    assert breaker.opened_until == 12.0


def test_closing_resets_the_backoff() -> None:
    """After a success, the next trip starts again from the base cooldown."""
    breaker = tripped()
    breaker.failure(4.0)  # failed probe: open until 12
    assert breaker.success(12.0) is CLOSED
    assert breaker.failed_probes == 0
    assert breaker.failure(20.0, permanent=True) is OPEN
    assert breaker.opened_until == 24.0
    assert breaker.trips == 2


def test_closed_breaker_forgets_pre_trip_failures() -> None:
    """Failures counted before a trip do not count again after it closes."""
    breaker = Breaker(POLICY)
    breaker.failure(0.0)
    breaker.failure(0.5)
    breaker.failure(1.0)  # trip, open until 5
    breaker.success(5.0)
    assert breaker.failure(5.5) is CLOSED
    assert breaker.failure(6.0) is CLOSED


def test_clock_stepping_back_is_tolerated() -> None:
    """A time before the trip reads as open; the lease stays single."""
    breaker = tripped(at=100.0)
    assert breaker.state(50.0) is OPEN
    assert breaker.probe_started(104.0)
    assert not breaker.probe_started(101.0)
    assert breaker.failure(-1e9) is OPEN


def test_breaker_never_reads_a_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """The core takes time from its caller only."""

    def no_clock() -> float:
        raise AssertionError("the breaker read a clock")

    for name in ("time", "monotonic", "perf_counter"):
        monkeypatch.setattr(time, name, no_clock)
    breaker = Breaker(POLICY)
    for t in range(3):
        breaker.failure(float(t))
    breaker.probe_started(10.0)
    breaker.success(10.0)
    assert breaker.state(11.0) is CLOSED


# Breaker: properties over any history


def _seconds(low: float, high: float) -> st.SearchStrategy[float]:
    """A few whole seconds half the time, so that events often land exactly on window, cooldown
    and lease ends; any float in range otherwise."""
    whole = st.integers(min_value=math.ceil(low), max_value=math.ceil(low) + 4).map(float)
    return st.one_of(whole, st.floats(min_value=low, max_value=high, allow_nan=False))


# One event: (kind, time step, permanent). Steps include zero, so events can coincide.
EVENTS = st.lists(
    st.tuples(
        st.sampled_from(["failure", "success", "probe", "look"]),
        st.one_of(st.just(0.0), _seconds(0.0, 15.0)),
        st.booleans(),
    ),
    max_size=80,
)
POLICIES = st.builds(
    lambda n, window, cooldown, extra, lease: BreakerPolicy(
        failures=n, window=window, cooldown=cooldown, cooldown_max=cooldown + extra, probe_timeout=lease
    ),
    st.integers(min_value=1, max_value=4),
    _seconds(0.5, 20.0),
    _seconds(0.5, 10.0),
    _seconds(0.0, 30.0),
    _seconds(0.5, 10.0),
)


@settings(max_examples=400, deadline=None)
@given(policy=POLICIES, events=EVENTS)
def test_breaker_properties(policy: BreakerPolicy, events: list[tuple[str, float, bool]]) -> None:
    """For any history: no exception, one live probe at most, closes only on a success,
    opens from closed exactly on a permanent failure or the failures-th transient one in the window."""
    breaker = Breaker(policy)
    t = 0.0
    after = CLOSED
    counted: list[float] = []  # transient failures while closed since the last reset, by the test's count
    lease_end: float | None = None  # the live lease, as the test tracks it
    for kind, step, permanent in events:
        t += step
        before = breaker.state(t)
        # Time alone only turns OPEN into HALF_OPEN.
        assert before is after or (after is OPEN and before is HALF_OPEN)
        if kind == "failure":
            after = breaker.failure(t, permanent=permanent)
            lease_end = None  # any result settles the probe
            if before is CLOSED:
                if not permanent:
                    counted.append(t)
                inside = [c for c in counted if t - c < policy.window]
                should_open = permanent or len(inside) >= policy.failures
                assert (after is OPEN) is should_open
                if should_open:
                    counted = []
            else:
                assert after is OPEN
        elif kind == "success":
            after = breaker.success(t)
            lease_end = None
            assert after is (OPEN if before is OPEN else CLOSED)
            if after is CLOSED:
                counted = []
        elif kind == "probe":
            granted = breaker.probe_started(t)
            if granted:
                assert before is HALF_OPEN
                assert lease_end is None or t >= lease_end, "two probes at once"
                lease_end = t + policy.probe_timeout
            else:
                assert before is not HALF_OPEN or (lease_end is not None and t < lease_end)
            after = breaker.state(t)
        else:
            after = breaker.state(t)
        assert after is breaker.state(t)
        assert breaker.allows(t) is (after is CLOSED)
        # Closes only on a success.
        if after is CLOSED and before is not CLOSED:
            assert kind == "success"


@settings(max_examples=200, deadline=None)
@given(
    events=st.lists(
        st.tuples(
            st.sampled_from(["failure", "success", "probe", "look"]),
            st.floats(min_value=-1e12, max_value=1e12, allow_nan=False),
            st.booleans(),
        ),
        max_size=60,
    )
)
def test_breaker_never_raises_whatever_the_times(events: list[tuple[str, float, bool]]) -> None:
    """Times in any order, even far apart, leave the breaker consistent and single-probed."""
    breaker = Breaker(BreakerPolicy(failures=2, window=5.0, cooldown=1.0, cooldown_max=8.0))
    lease_end: float | None = None
    for kind, t, permanent in events:
        if kind == "failure":
            breaker.failure(t, permanent=permanent)
            lease_end = None
        elif kind == "success":
            breaker.success(t)
            lease_end = None
        elif kind == "probe" and breaker.probe_started(t):
            assert lease_end is None or t >= lease_end
            lease_end = t + 5.0
        assert breaker.state(t) in Health


# LocalHealthStore


async def test_local_store_trips_and_recovers() -> None:
    """The store runs one breaker per provider on its clock."""
    clock = FakeClock()
    store = LocalHealthStore(policy=POLICY, clock=clock)
    for _ in range(2):
        assert await store.record_failure("a") is CLOSED
    assert await store.record_failure("a") is OPEN
    assert await store.state("a") is OPEN
    assert await store.state("b") is CLOSED  # providers are separate
    clock.now += 4.0
    assert await store.state("a") is HALF_OPEN
    assert await store.try_acquire_probe("a")
    assert not await store.try_acquire_probe("a")
    assert await store.record_success("a") is CLOSED
    assert store.breaker("a").trips == 1


async def test_local_store_reports_changes_once() -> None:
    """on_change fires for each change a recorded result made, not for repeats or for time passing."""
    clock = FakeClock()
    changes: list[tuple[str, Health, Health]] = []
    store = LocalHealthStore(policy=POLICY, clock=clock, on_change=lambda *change: changes.append(change))
    for _ in range(6):
        await store.record_failure("a")
    clock.now += 4.0
    await store.state("a")
    await store.try_acquire_probe("a")
    await store.record_failure("a")
    clock.now += 8.0
    await store.record_success("a")
    await store.record_success("a")
    assert changes == [("a", CLOSED, OPEN), ("a", HALF_OPEN, OPEN), ("a", HALF_OPEN, CLOSED)]


async def test_local_store_grants_one_probe_among_concurrent_tasks() -> None:
    """Fifty tasks ask for the lease at once; one gets it."""
    clock = FakeClock()
    store = LocalHealthStore(policy=POLICY, clock=clock)
    await store.record_failure("a", permanent=True)
    clock.now += 4.0
    granted = await asyncio.gather(*(store.try_acquire_probe("a") for _ in range(50)))
    assert granted.count(True) == 1
    clock.now += 2.0  # the lease expires unsettled
    assert await store.try_acquire_probe("a")


def test_local_store_is_safe_across_threads() -> None:
    """Eight threads, each with its own event loop, trip a shared store once."""
    changes: list[tuple[str, Health, Health]] = []
    store = LocalHealthStore(
        policy=BreakerPolicy(failures=5, cooldown=60.0, cooldown_max=60.0),
        on_change=lambda *change: changes.append(change),
    )
    start = threading.Barrier(8)

    def hammer() -> None:
        start.wait()
        for _ in range(200):
            asyncio.run(store.record_failure("a"))

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.breaker("a").trips == 1
    assert changes == [("a", CLOSED, OPEN)]


def test_local_store_is_a_health_store() -> None:
    """LocalHealthStore satisfies the HealthStore protocol (checked by mypy)."""
    store: HealthStore = LocalHealthStore()
    assert store is not None


def test_default_store_is_shared_by_the_process() -> None:
    """Two pipelines in one process get the same store, so they share health."""
    assert default_store() is default_store()
    assert isinstance(default_store(), LocalHealthStore)
    assert default_store().policy == DEFAULT_BREAKER


async def test_first_available_walks_the_chain() -> None:
    """Closed providers are taken, a half-open one only with its probe lease, open ones never."""
    clock = FakeClock()
    store = LocalHealthStore(policy=POLICY, clock=clock)
    chain = ["primary", "secondary", "tertiary"]
    assert await first_available(store, chain) == Choice("primary", probe=False)
    await store.record_failure("primary", permanent=True)
    assert await first_available(store, chain) == Choice("secondary", probe=False)
    clock.now += 4.0
    assert await first_available(store, chain) == Choice("primary", probe=True)
    assert await first_available(store, chain) == Choice("secondary", probe=False)  # lease taken
    await store.record_failure("secondary", permanent=True)
    await store.record_failure("tertiary", permanent=True)
    assert await first_available(store, chain) is None
    await store.record_success("primary")
    assert await first_available(store, chain) == Choice("primary", probe=False)
