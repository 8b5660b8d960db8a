"""Reliability under adversarial timing and configuration: each test reproduces a reported failure.

A factory that hands back an instance it returned before, a recovery whose
every handshake hangs, a retry policy whose numbers overflow a float, a bug
inside recovery, a settings update arriving while recovering: each must end
in either a clean recovery or one clear ``ErrorFrame`` within the policy's
deadline, never a silent loss or a hang.
"""

from __future__ import annotations

import asyncio
import math
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pipecat.frames.frames import TTSSpeakFrame, TTSUpdateSettingsFrame
from pipecat.services.elevenlabs.tts import ElevenLabsTTSService

from pipecat_resilient import ReplayFailed, ResilientTTS, RetryPolicy
from pipecat_resilient.policy import backoff
from pipecat_resilient.testing import ElevenLabsEmulator, Fault, FaultPlan, Scenario

from .conftest import ELEVENLABS, SAMPLE_RATE, UNIT, resilient, stock_factory

SENTENCE = "Hello world, this is a test of a dropped socket."


def words(*texts: str) -> list[str]:
    return " ".join(texts).split()


# ----------------------------------------------------------------------
# The retry policy: nothing it accepts can make it raise
# ----------------------------------------------------------------------


def test_a_huge_growth_factor_caps_the_wait_instead_of_overflowing() -> None:
    """``wait_exp_base=1e200`` used to raise OverflowError (errno 34) inside a recovery."""
    policy = RetryPolicy(wait_exp_base=1e200, wait_max=0.2)
    assert [policy.wait_bound(n) for n in (1, 2, 3, 1000)] == [0.05, 0.2, 0.2, 0.2]
    many = RetryPolicy(attempts=70, wait_exp_base=1e5, jitter=False)
    assert list(backoff(many))[-1] == many.wait_max
    wide = RetryPolicy(attempts=5000, wait_initial=1e-300, wait_max=1e300)
    assert wide.wait_bound(4000) == 1e300


def test_an_integer_too_large_for_a_float_is_refused_at_construction() -> None:
    """``wait_exp_base=10**400`` raised OverflowError instead of the ValueError every other bad value gets."""
    with pytest.raises(ValueError, match="wait_exp_base"):
        RetryPolicy(wait_exp_base=10**400)
    with pytest.raises(ValueError, match="wait_max"):
        RetryPolicy(wait_max=10**400)


numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**500), max_value=10**500),
    st.none(),
    st.booleans(),
)


@settings(max_examples=400, deadline=None)
@given(
    attempts=st.one_of(st.integers(min_value=-5, max_value=200), st.floats(), st.booleans()),
    timeout=numbers,
    attempt_timeout=numbers,
    wait_initial=numbers,
    wait_max=numbers,
    wait_exp_base=numbers,
    jitter=st.booleans(),
)
def test_a_policy_either_refuses_its_values_or_never_raises(**values: object) -> None:
    """Any values: a TypeError or ValueError at construction, or waits that are finite, bounded numbers."""
    try:
        policy = RetryPolicy(**values)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return
    waits = [policy.wait_bound(n) for n in range(0, policy.attempts + 2)]
    assert all(math.isfinite(w) and 0 <= w <= policy.wait_max for w in waits)
    assert all(0 <= w <= policy.wait_max for w in backoff(policy))


# ----------------------------------------------------------------------
# A factory that returns an instance it returned before
# ----------------------------------------------------------------------


async def test_a_factory_handing_back_a_used_instance_gives_up_once_and_says_why() -> None:
    """A cached instance handed back after a drop is refused: one ErrorFrame naming it, no silent loss."""
    plan = FaultPlan(Fault.close(1012, after_audio_chunks=4))
    async with ElevenLabsEmulator(plan=plan) as emulator:
        make = stock_factory(emulator)
        made: list[ElevenLabsTTSService] = []

        def caching_factory() -> ElevenLabsTTSService:
            # New instances at first (construction checks two), then the first one again.
            if len(made) < 2:
                made.append(make())
                return made[-1]
            return made[0]

        tts = ResilientTTS(caching_factory, retry=RetryPolicy(attempts=3, wait_initial=0, wait_max=0))
        gave_up: list[ReplayFailed] = []
        tts.add_event_handler("on_connection_given_up", lambda _, error: gave_up.append(error))
        run = Scenario(tts, spc=emulator.samples_per_char(SAMPLE_RATE))
        await run.start()
        await run.send(TTSSpeakFrame(SENTENCE))
        await run.recorder.wait_until(lambda: len(run.errors) == 1, 50 * UNIT)
        started = time.monotonic()
        await run.end(timeout=50 * UNIT)
        assert time.monotonic() - started < 20 * UNIT
        [error] = run.errors
        assert "returned before" in error.error and "ElevenLabsTTSService" in error.error
        [failure] = gave_up
        assert failure.unspoken and " ".join(failure.unspoken) in SENTENCE
        assert not tts.is_usable


# ----------------------------------------------------------------------
# The recovery deadline holds even when every handshake hangs
# ----------------------------------------------------------------------


async def test_give_up_and_end_frame_keep_the_recovery_deadline_when_handshakes_hang() -> None:
    """Every reconnect's handshake hangs: give-up and the EndFrame come within ``timeout`` + 100 ms."""
    timeout = 1.0
    plan = FaultPlan(
        Fault.close(1012, after_audio_chunks=4), *[Fault.hang(connection=n) for n in range(1, 30)]
    )
    retry = RetryPolicy(attempts=20, timeout=timeout, attempt_timeout=5.0, wait_initial=0.0, wait_max=0.0)
    async with ElevenLabsEmulator(plan=plan) as emulator:
        tts = resilient(emulator, retry=retry)
        marks: dict[str, float] = {}
        tts.add_event_handler("on_connection_lost", lambda *_: marks.setdefault("lost", time.monotonic()))
        tts.add_event_handler(
            "on_connection_given_up", lambda *_: marks.setdefault("gave_up", time.monotonic())
        )
        run = Scenario(tts, spc=emulator.samples_per_char(SAMPLE_RATE))
        await run.start()
        await run.send(TTSSpeakFrame(SENTENCE))
        await emulator.wait_for_connections(2)
        await run.end(timeout=10.0)
        ended = time.monotonic()
        assert marks["gave_up"] - marks["lost"] <= timeout + 0.1
        assert ended - marks["lost"] <= timeout + 0.1 + 0.05  # the EndFrame passes right after
        assert [c.hung for c in emulator.connections[1:]] == [True] * (len(emulator.connections) - 1)
        [error] = run.errors
        assert isinstance(error.exception, ReplayFailed)


# ----------------------------------------------------------------------
# A bug inside recovery ends in one give-up, never a hang
# ----------------------------------------------------------------------


async def test_an_unexpected_exception_in_recovery_gives_up_once() -> None:
    """Recovery raising something unexpected: one ErrorFrame, the EndFrame passes, nothing left running."""
    plan = FaultPlan(Fault.close(1012, after_audio_chunks=4))
    async with ElevenLabsEmulator(plan=plan) as emulator:
        tts = resilient(emulator)

        async def broken(*args: object, **kwargs: object) -> None:
            raise RuntimeError("a bug")

        tts._go_live = broken  # type: ignore[method-assign]
        run = Scenario(tts, spc=emulator.samples_per_char(SAMPLE_RATE))
        await run.start()
        await run.send(TTSSpeakFrame(SENTENCE))
        await run.recorder.wait_until(lambda: len(run.errors) == 1, 50 * UNIT)
        await run.end(timeout=50 * UNIT)
        [error] = run.errors
        assert "unexpected RuntimeError in recovery" in error.error
        # The instance the broken attempt connected was torn down too.
        await asyncio.wait_for(_all_closed(emulator), 50 * UNIT)


async def _all_closed(emulator: ElevenLabsEmulator) -> None:
    while not all(c.closed for c in emulator.connections):
        await asyncio.sleep(UNIT / 10)


# ----------------------------------------------------------------------
# Settings updates while recovering
# ----------------------------------------------------------------------


async def test_a_settings_update_while_recovering_loses_nothing() -> None:
    """A voice change while the reconnect is refused: the cut utterance ends, then the new voice speaks."""
    plan = FaultPlan(Fault.close(1012, after_audio_chunks=4), Fault.refuse(503, connection=1))
    retry = RetryPolicy(attempts=4, wait_initial=3 * UNIT, wait_max=3 * UNIT, jitter=False)
    second = "Said in the second voice."
    async with ElevenLabsEmulator(plan=plan) as emulator:
        tts = resilient(emulator, retry=retry)
        run = Scenario(tts, spc=emulator.samples_per_char(SAMPLE_RATE))
        await run.start()
        await run.send(TTSSpeakFrame(SENTENCE))
        await emulator.wait_for_connections(2)  # refused: the next attempt waits
        await run.send(
            TTSUpdateSettingsFrame(delta=ElevenLabsTTSService.Settings(voice="voice-b")),
            TTSSpeakFrame(second),
        )
        await run.wait_until(lambda: run.listener.stopped == 2, 50 * UNIT)
        await run.end()
        assert run.heard == words(SENTENCE, second)
        assert run.context_words == run.heard
        assert run.errors == []
        voices = {t: c.path.split("/")[3] for c in emulator.connections for _, t in c.texts}
        assert voices[second] == "voice-b"
        assert all(v == "test-voice" for t, v in voices.items() if t != second)


# ----------------------------------------------------------------------
# A long drain never ends in a word said twice
# ----------------------------------------------------------------------


async def test_a_long_backlog_drained_across_two_drops_is_heard_once() -> None:
    """A long utterance to a fast provider, two drops: every word once, the context equal to it.

    The failed instance's backlog of received audio takes a while to push out
    (the stock service's own word bookkeeping grows with the utterance: about
    a second here); what counts as heard is the audio that actually went out,
    and the drain may take as long as the recovery's deadline allows, so no
    word is said twice (it used to be, past a fixed half-second drain).
    """
    text = " ".join(f"word{i % 97}" for i in range(700)) + "."
    plan = FaultPlan(
        Fault.close(1012, after_audio_chunks=220), Fault.close(1011, after_audio_chunks=150, connection=1)
    )
    async with ELEVENLABS.emulator(plan, ms_per_char=1.0, chars_per_chunk=12) as emulator:
        tts = ELEVENLABS.resilient(emulator)
        run = Scenario(tts, spc=emulator.samples_per_char(SAMPLE_RATE))
        await run.start()
        await run.send(TTSSpeakFrame(text))
        await run.wait_until(lambda: run.listener.stopped == 1, 600 * UNIT)
        await run.end()
        assert len(emulator.connections) == 3
        assert run.heard == text.split()
        assert run.context_words == text.split()
        assert run.errors == []
