"""Learned watchdog timeouts: the estimator on its own, then as the ledger applies it (no event loop)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipecat_resilient._adaptive import MARGIN_S, MIN_SAMPLES, MIN_TIMEOUT_S, AdaptiveTimeout
from pipecat_resilient.ledger import Ledger

FLOOR = 0.25
CEILING = 2.0


def learned(*waits: float) -> AdaptiveTimeout:
    estimate = AdaptiveTimeout()
    for wait in waits:
        estimate.measured(wait)
    return estimate


# ----------------------------------------------------------------------
# The estimator
# ----------------------------------------------------------------------


def test_the_ceiling_applies_until_a_few_waits_were_measured() -> None:
    """A handful of answers says little: until MIN_SAMPLES, the fixed timeout."""
    estimate = learned(*[0.1] * (MIN_SAMPLES - 1))
    assert estimate.timeout(floor=FLOOR, ceiling=CEILING) == CEILING
    estimate.measured(0.1)
    assert estimate.timeout(floor=FLOOR, ceiling=CEILING) < CEILING


def test_rfc_6298_smoothing() -> None:
    """First wait R: smoothed R, deviation R/2; then gains 1/8 and 1/4, the deviation from the old mean."""
    estimate = learned(0.2)
    assert estimate.smoothed == pytest.approx(0.2)
    assert estimate.deviation == pytest.approx(0.1)
    estimate.measured(0.4)
    assert estimate.deviation == pytest.approx(0.75 * 0.1 + 0.25 * 0.2)
    assert estimate.smoothed == pytest.approx(0.875 * 0.2 + 0.125 * 0.4)


def test_a_steady_fast_provider_gets_its_time_plus_the_margin() -> None:
    """Answers always in 100 ms: the timeout is 100 ms plus the margin, never the bare 100 ms."""
    estimate = learned(*[0.1] * 50)
    assert estimate.timeout(floor=FLOOR, ceiling=CEILING) == pytest.approx(0.1 + MARGIN_S)


def test_never_below_the_floor() -> None:
    """Answers in 1 ms still leave the floor."""
    estimate = learned(*[0.001] * 50)
    assert estimate.timeout(floor=FLOOR, ceiling=CEILING) == FLOOR


def test_a_slow_provider_gets_up_to_the_ceiling() -> None:
    """Answers in 1.5 s: the timeout is the ceiling (twice the smoothed time is more)."""
    estimate = learned(*[1.5] * 20)
    assert estimate.timeout(floor=FLOOR, ceiling=CEILING) == CEILING


def test_one_slow_answer_widens_the_timeout_at_once() -> None:
    """After answers in 100 ms, one in 600 ms: the next 600 ms wait would not be declared dead."""
    estimate = learned(*[0.1] * 20)
    assert estimate.timeout(floor=FLOOR, ceiling=CEILING) < 0.6
    estimate.measured(0.6)
    assert estimate.timeout(floor=FLOOR, ceiling=CEILING) > 0.6


def test_fast_answers_narrow_it_again_gradually() -> None:
    """After an outlier the timeout comes down over several answers, not at the next one."""
    estimate = learned(*[0.1] * 20, 0.8)
    timeouts = []
    for _ in range(12):
        estimate.measured(0.1)
        timeouts.append(estimate.timeout(floor=FLOOR, ceiling=CEILING))
    assert timeouts == sorted(timeouts, reverse=True)
    assert timeouts[0] > 0.5
    assert timeouts[-1] < 0.35


def test_an_expired_timeout_backs_off_to_the_ceiling_until_the_next_measurement() -> None:
    """Like TCP after a timeout: the next wait is timed against the ceiling, then learning resumes."""
    estimate = learned(*[0.1] * 20)
    estimate.expired()
    assert not estimate.learned
    assert estimate.timeout(floor=FLOOR, ceiling=CEILING) == CEILING
    estimate.measured(0.7)
    assert estimate.learned
    assert 0.7 < estimate.timeout(floor=FLOOR, ceiling=CEILING) < CEILING


def test_forget() -> None:
    """Forgotten: nothing measured, the ceiling again."""
    estimate = learned(*[0.1] * 20)
    estimate.forget()
    assert estimate.samples == 0 and estimate.smoothed is None
    assert estimate.timeout(floor=FLOOR, ceiling=CEILING) == CEILING


def test_min_samples_must_be_positive() -> None:
    """At least one wait must be measured before a timeout is learned."""
    with pytest.raises(ValueError, match="min_samples"):
        AdaptiveTimeout(min_samples=0)


waits = st.lists(st.floats(min_value=0.0, max_value=5.0, allow_nan=False), max_size=60)


@given(history=waits, floor=st.floats(0.01, 1.0), ceiling=st.floats(1.0, 5.0))
def test_always_between_floor_and_ceiling(history: list[float], floor: float, ceiling: float) -> None:
    """Whatever was measured, the timeout stays between the floor and the ceiling."""
    estimate = learned(*history)
    assert floor <= estimate.timeout(floor=floor, ceiling=ceiling) <= ceiling


@given(history=waits, wait=st.floats(min_value=0.0, max_value=CEILING, allow_nan=False))
def test_a_wait_just_measured_would_not_have_timed_out(history: list[float], wait: float) -> None:
    """After any history, a wait the provider just took fits in the timeout it leaves."""
    estimate = learned(*history, wait)
    assert estimate.timeout(floor=FLOOR, ceiling=CEILING) >= wait - 1e-9


# ----------------------------------------------------------------------
# In the ledger
# ----------------------------------------------------------------------


class Provider:
    """Drives a ledger as a provider answering after ``first_audio`` seconds would (a synthetic clock)."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.now = 0.0
        self.contexts = 0

    def hand(self, *, audio_due: bool = True) -> str:
        """A TTSSpeakFrame is fed and its text handed over now; returns its context id."""
        ledger = self.ledger
        self.contexts += 1
        context_id = f"c{self.contexts}"
        u = ledger.speak_accepted(object(), "one two three four")
        ledger.to_feed()
        ledger.text_handed(u, context_id, u.text, now=self.now, audio_due=audio_due)
        ledger.closing_processed(u, now=self.now)
        return context_id

    def answer(self, context_id: str, first_audio: float, *, chunks: int = 3, gap: float = 0.01) -> None:
        """Its audio comes ``first_audio`` later, in ``chunks`` ``gap`` apart, then the context is final."""
        self.now += first_audio
        for _ in range(chunks):
            self.ledger.audio_pushed(context_id, 0.05, now=self.now)
            self.now += gap
        self.ledger.context_stopped(context_id)
        self.now += 1.0  # the next utterance comes a while later

    def speak(self, first_audio: float, count: int = 1) -> None:
        for _ in range(count):
            self.answer(self.hand(), first_audio)


def test_a_silent_socket_on_a_fast_provider_is_caught_at_the_learned_timeout() -> None:
    """Once answers in 100 ms were learned, no audio for 0.35 s is a dead socket, not 2 s."""
    provider = Provider(Ledger(first_audio_timeout=CEILING, stall_timeout=CEILING))
    provider.speak(0.1, count=10)
    assert provider.ledger.timeouts == (pytest.approx(0.1 + MARGIN_S), pytest.approx(0.1 + MARGIN_S))
    provider.hand()
    t = provider.now
    assert provider.ledger.overdue(now=t + 0.29) is None
    reason = provider.ledger.overdue(now=t + 0.31)
    assert reason is not None and reason.startswith("no audio within 0.3s") and "learned" in reason


def test_fixed_timeouts_when_adaptive_timeouts_is_off() -> None:
    """adaptive_timeouts=False: the same provider still gets the full fixed timeout."""
    provider = Provider(Ledger(first_audio_timeout=CEILING, stall_timeout=CEILING, adaptive_timeouts=False))
    provider.speak(0.1, count=10)
    assert provider.ledger.timeouts == (CEILING, CEILING)
    provider.hand()
    t = provider.now
    assert provider.ledger.overdue(now=t + 1.9) is None
    assert provider.ledger.overdue(now=t + 2.1) == "no audio within 2s of text being handed over"


def test_a_fresh_instance_first_audio_is_timed_against_the_ceiling() -> None:
    """After a recovery the fresh connection's first audio gets the fixed timeout (it may be warming up)."""
    provider = Provider(Ledger(first_audio_timeout=CEILING, stall_timeout=CEILING))
    ledger = provider.ledger
    provider.speak(0.1, count=10)
    ledger.connection_lost(now=provider.now)
    ledger.connection_restored()
    context_id = provider.hand()
    t = provider.now
    assert ledger.overdue(now=t + 1.0) is None
    provider.answer(context_id, 1.2)
    # Its first audio came: the learned timeout applies again (widened by that slow answer).
    provider.hand()
    first_audio, _ = ledger.timeouts
    assert 1.2 < first_audio < CEILING


def test_a_provider_that_became_slower_costs_one_drop_then_is_learned() -> None:
    """100 ms answers, then 600 ms ones: the first is declared dead, its replay is measured, no more."""
    provider = Provider(Ledger(first_audio_timeout=CEILING, stall_timeout=CEILING))
    ledger = provider.ledger
    provider.speak(0.1, count=10)
    context_id = provider.hand()
    assert ledger.overdue(now=provider.now + 0.6) is not None
    ledger.connection_lost(now=provider.now + 0.6)
    ledger.connection_restored()
    provider.answer(provider.hand(), 0.6)  # the replay, on the fresh instance
    for _ in range(10):
        context_id = provider.hand()
        assert ledger.overdue(now=provider.now + 0.6) is None
        provider.answer(context_id, 0.6)


def test_a_provider_that_slows_down_gradually_is_never_declared_dead() -> None:
    """First audio creeping from 100 ms to 600 ms, 50 ms an utterance: every answer fits the timeout."""
    provider = Provider(Ledger(first_audio_timeout=CEILING, stall_timeout=CEILING))
    ledger = provider.ledger
    provider.speak(0.1, count=10)
    for step in range(11):
        context_id = provider.hand()
        first_audio = 0.1 + 0.05 * step
        assert ledger.overdue(now=provider.now + first_audio) is None
        provider.answer(context_id, first_audio)


def test_a_provider_that_waits_for_the_flush_is_timed_from_the_flush() -> None:
    """Text handed long before the turn's end: the first audio is measured (and awaited) from the flush."""
    ledger = Ledger(first_audio_timeout=CEILING, stall_timeout=CEILING)
    now = 0.0
    for index in range(10):
        u = ledger.turn_started(object())
        ledger.text_accepted("one two three four. ")
        ledger.to_feed()
        ledger.text_handed(u, f"c{index}", "one two three four.", now=now, audio_due=False)
        # The LLM takes 3 s to finish the turn; nothing is owed meanwhile.
        assert ledger.overdue(now=now + 2.9) is None
        ledger.turn_ended(object())
        ledger.to_feed()
        ledger.closing_processed(u, now=now + 3.0)
        ledger.audio_pushed(f"c{index}", 0.05, now=now + 3.1)
        ledger.context_stopped(f"c{index}")
        now += 10.0
    assert ledger.timeouts[0] == pytest.approx(0.1 + MARGIN_S)


def test_the_stall_timeout_is_never_shorter_than_a_first_audio() -> None:
    """Audio owed may pause while the provider starts its next text:
    gaps of 10 ms leave the first-audio time."""
    provider = Provider(Ledger(first_audio_timeout=CEILING, stall_timeout=CEILING))
    ledger = provider.ledger
    provider.speak(0.15, count=10)
    first_audio, stall = ledger.timeouts
    assert stall == first_audio == pytest.approx(0.15 + MARGIN_S)
    context_id = provider.hand()
    ledger.audio_pushed(context_id, 0.05, now=provider.now + 0.15)
    assert ledger.overdue(now=provider.now + 0.15 + 0.3) is None
    reason = ledger.overdue(now=provider.now + 0.15 + 0.4)
    assert reason is not None and reason.startswith("audio stalled for more than 0.35s")


def test_a_settings_update_times_the_next_first_audio_against_the_ceiling() -> None:
    """A new voice or model may reconnect and answer at another pace:
    its first audio gets the fixed timeout."""
    provider = Provider(Ledger(first_audio_timeout=CEILING, stall_timeout=CEILING))
    ledger = provider.ledger
    provider.speak(0.1, count=10)
    ledger.settings_accepted(object())
    provider.hand()
    assert ledger.timeouts == (CEILING, CEILING)
    assert ledger.overdue(now=provider.now + 1.0) is None


def test_each_provider_of_a_fallback_chain_is_learned_on_its_own() -> None:
    """A fallback starts from the fixed timeouts; going back finds the primary's figures again."""
    provider = Provider(Ledger(first_audio_timeout=CEILING, stall_timeout=CEILING))
    ledger = provider.ledger
    provider.speak(0.1, count=10)
    learned_primary = ledger.timeouts
    ledger.connection_lost(now=provider.now)
    ledger.use_provider(1, word_timings=True)
    ledger.connection_restored()
    provider.speak(0.1)
    assert ledger.timeouts == (CEILING, CEILING)
    ledger.connection_lost(now=provider.now)
    ledger.use_provider(0, word_timings=True)
    ledger.connection_restored()
    provider.speak(0.1)
    assert ledger.timeouts == pytest.approx(learned_primary, abs=0.01)


def test_the_floor_defaults_to_a_quarter_second_or_the_shorter_ceiling() -> None:
    """min_timeout None: MIN_TIMEOUT_S, unless a ceiling is shorter."""
    assert Ledger().min_timeout == MIN_TIMEOUT_S
    assert Ledger(first_audio_timeout=0.2, stall_timeout=0.3).min_timeout == 0.2
    assert Ledger(min_timeout=0.5).shortest_timeout == 0.5
    assert Ledger(min_timeout=0.5, adaptive_timeouts=False).shortest_timeout == 2.0


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"min_timeout": 2.5}, ValueError, "min_timeout .* must not be longer than first_audio_timeout"),
        ({"min_timeout": 0.0}, ValueError, "min_timeout must be a positive number of seconds"),
        ({"min_timeout": float("nan")}, ValueError, "min_timeout must be a positive number of seconds"),
        ({"adaptive_timeouts": 1}, TypeError, "adaptive_timeouts must be True or False"),
    ],
)
def test_bad_configuration_is_refused(
    kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    """A floor above a ceiling, not a time, or a flag that is not a bool: a clear error."""
    with pytest.raises(error, match=message):
        Ledger(**kwargs)  # type: ignore[arg-type]
