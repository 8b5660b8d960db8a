"""ResilientTTS around the stock OpenAITTSService (HTTP, one request per sentence), against its emulator.

Each test drives the stock service through ``ResilientTTS`` over a real socket
to :class:`~pipecat_resilient.testing.openai_tts.OpenAITTSEmulator` and asserts
on what a listener heard (decoded from the audio), what Pipecat's assistant
aggregator wrote into the context, what went upstream, and, from the
emulator's own clock, when the fault happened and when the replay was asked
for. Without word timings, what was heard of a cut sentence is estimated
from the speaking rate learned in the session, so a word or two may be said
again; none is lost, and the context holds each word once.

Most sessions start with a warm-up sentence: it teaches the wrapper the
voice's speaking rate, as the first sentence of any real session does.
Where a fault must be caught by the adapter rather than by a watchdog, the
watchdogs wait 2.5 s and recovery must come within 0.3 s of the fault.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from pipecat.frames.frames import (
    Frame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TTSSpeakFrame,
)
from pipecat.services.openai.tts import OpenAITTSService
from pipecat.utils.errors import ErrorCategory

from pipecat_resilient import RecoveryReport, ReplayFailed, ResilientTTS, State
from pipecat_resilient.failures import Failure, Verdict
from pipecat_resilient.providers import tts_adapter_for
from pipecat_resilient.providers.openai import MIN_JUDGED_LETTERS, OpenAITTSAdapter
from pipecat_resilient.testing import Fault, FaultPlan, Scenario
from pipecat_resilient.testing.kits import OPENAI_TTS_KIT
from pipecat_resilient.testing.openai_tts import OpenAITTSEmulator

from .conftest import NO_WAIT, UNIT, alignment

KIT = OPENAI_TTS_KIT
# Watchdogs this slow make any recovery faster than them the adapter's.
SLOW_WATCHDOG = 25 * UNIT
# How soon after the fault the replay must be requested when the adapter caught it.
AT_ONCE = 3 * UNIT
TIMEOUT = 100 * UNIT
# The stock service pushes audio one read at a time: 24000 bytes, 0.5 s of audio.
READ_S = 0.5

# The emulator sends the body in 1000-byte pieces at 10 ms (480 bytes) a character.
WARM = "The first sentence teaches the wrapper how fast this voice is speaking."
SENTENCE = (
    "The quick brown fox jumps over the lazy dog, and then it runs far away "
    "into the dark green forest to hide."
)
SECOND = "And here is a second sentence for the wrapper to say."
TURN_TOKENS = [
    "The weather ",
    "today is sunny and warm. ",
    "Tomorrow it will rain ",
    "heavily in the afternoon and all through the evening. ",
    "Bring an umbrella to work.",
]
TURN = "".join(TURN_TOKENS)


def words(*texts: str) -> list[str]:
    return " ".join(texts).split()


def turn(tokens: list[str]) -> list[Frame]:
    return [LLMFullResponseStartFrame(), *[LLMTextFrame(t) for t in tokens], LLMFullResponseEndFrame()]


def resilient(emulator: OpenAITTSEmulator, *, watchdog: float = SLOW_WATCHDOG, **kwargs: Any) -> ResilientTTS:
    """A ResilientTTS around the stock OpenAITTSService, retrying at once."""
    options: dict[str, Any] = {"retry": NO_WAIT, "first_audio_timeout": watchdog, "stall_timeout": watchdog}
    options.update(kwargs)
    return ResilientTTS(KIT.factory(emulator), **options)


class Session:
    """A scenario around a ResilientTTS, with its recovery events recorded."""

    def __init__(self, emulator: OpenAITTSEmulator, tts: ResilientTTS) -> None:
        self.emulator = emulator
        self.tts = tts
        self.run = Scenario(tts, spc=emulator.samples_per_char())
        self.lost: list[tuple[float, Failure]] = []
        self.recovered: list[RecoveryReport] = []
        tts.add_event_handler("on_connection_lost", lambda _, f: self.lost.append((time.monotonic(), f)))
        tts.add_event_handler("on_connection_recovered", lambda _, r: self.recovered.append(r))

    async def __aenter__(self) -> Session:
        await self.run.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if exc_info[0] is None:
            await self.run.end()
        else:
            await self.run.cancel()

    async def say(self, *frames: Frame, utterances: int, expected: list[str] | None = None) -> None:
        """Send ``frames``; wait until ``utterances`` in all have stopped (and ``expected`` was heard)."""
        await self.run.send(*frames)

        def done() -> bool:
            heard = expected is None or alignment(self.run.heard, expected)[0] == 0
            return heard and self.run.listener.stopped >= utterances

        await self.run.wait_until(done, TIMEOUT)

    async def warm_up(self) -> None:
        """Speak WARM: the wrapper learns the voice's speaking rate."""
        await self.say(TTSSpeakFrame(WARM), utterances=1)

    def recovery_time(self, faulted: int) -> float:
        """Seconds from the fault on request ``faulted`` to the next request (the replay)."""
        fault_at = self.emulator.requests[faulted].faulted_at
        assert fault_at is not None
        return self.emulator.requests[faulted + 1].received_at - fault_at


def assert_recovered(run: Scenario, expected: list[str], *, faults: int = 1) -> None:
    """Nothing lost, at most two words said again per fault, the context holds each word once, no error."""
    missing, repeated = alignment(run.heard, expected)
    assert missing == 0, f"lost {missing} word(s): heard {run.heard}"
    assert repeated <= 2 * faults, f"{repeated} word(s) said again: heard {run.heard}"
    assert run.context_words == expected
    assert run.errors == []


def assert_no_sdk_retry(emulator: OpenAITTSEmulator) -> None:
    assert [r.retry_count for r in emulator.requests] == [0] * len(emulator.requests)


# ----------------------------------------------------------------------
# A response cut: reset, truncated, stalled
# ----------------------------------------------------------------------


async def test_a_reset_mid_body_is_replayed_from_the_first_unheard_word() -> None:
    """A connection reset mid-body: caught at once, the rest replayed from the first unheard word."""
    plan = FaultPlan(Fault.abort(after_audio_chunks=30, connection=1))
    async with KIT.emulator(plan) as emulator:
        async with Session(emulator, resilient(emulator)) as session:
            await session.warm_up()
            expected = words(WARM, SENTENCE, SECOND)
            await session.say(TTSSpeakFrame(SENTENCE), TTSSpeakFrame(SECOND), utterances=3, expected=expected)
        assert_recovered(session.run, expected)
        # The failed instance does not go on to the next sentence: the fresh one says both.
        warm, cut, replay, second = emulator.requests
        assert cut.bytes_sent == 30000 and not cut.completed
        # The replay starts inside the sentence, at a word the listener had not heard in full.
        assert SENTENCE.endswith(replay.input) and len(replay.input) < len(SENTENCE)
        assert second.input == SECOND
        assert session.recovery_time(1) < AT_ONCE
        [(lost_at, failure)] = session.lost
        assert cut.faulted_at is not None and lost_at - cut.faulted_at < AT_ONCE
        assert failure.category == "connectivity" and "cut off" in failure.description
        assert_no_sdk_retry(emulator)


async def test_a_reset_before_the_headers_is_retried_at_once_by_the_wrapper() -> None:
    """A connection dropped before the answer: no SDK retry after 0.4 s; a fresh instance asks at once."""
    plan = FaultPlan(Fault.abort(connection=1))
    async with KIT.emulator(plan) as emulator:
        async with Session(emulator, resilient(emulator)) as session:
            await session.warm_up()
            await session.say(TTSSpeakFrame(SENTENCE), utterances=2, expected=words(WARM, SENTENCE))
        assert session.run.heard == words(WARM, SENTENCE)
        assert_recovered(session.run, words(WARM, SENTENCE))
        assert [r.input for r in emulator.requests] == [WARM, SENTENCE, SENTENCE]
        assert emulator.requests[1].status == 0
        assert session.recovery_time(1) < AT_ONCE
        assert_no_sdk_retry(emulator)


async def test_a_body_that_ends_early_is_caught_by_its_length() -> None:
    """A body truncated cleanly (no error at all), the rate known: caught at once, the rest replayed."""
    # 10000 bytes are 21 of the sentence's 106 characters.
    plan = FaultPlan(Fault.close(1000, after_audio_chunks=10, connection=1))
    async with KIT.emulator(plan) as emulator:
        async with Session(emulator, resilient(emulator)) as session:
            await session.warm_up()
            await session.say(TTSSpeakFrame(SENTENCE), utterances=2, expected=words(WARM, SENTENCE))
        assert_recovered(session.run, words(WARM, SENTENCE))
        warm, cut, replay = emulator.requests
        assert (cut.status, cut.bytes_sent, cut.completed) == (200, 10000, False)
        assert SENTENCE.endswith(replay.input) and len(replay.input) < len(SENTENCE)
        assert session.recovery_time(1) < AT_ONCE
        [(_, failure)] = session.lost
        assert failure.description == "OpenAI TTS response ended early"


async def test_an_empty_body_is_a_cut_even_before_the_rate_is_known() -> None:
    """A 200 with no audio at all, on the session's first sentence: replayed whole."""
    plan = FaultPlan(Fault.close(1000, connection=0))
    async with KIT.emulator(plan) as emulator:
        async with Session(emulator, resilient(emulator)) as session:
            await session.say(TTSSpeakFrame(SENTENCE), utterances=1, expected=words(SENTENCE))
        assert session.run.heard == words(SENTENCE)
        assert_recovered(session.run, words(SENTENCE))
        assert [(r.input, r.bytes_sent) for r in emulator.requests][:2] == [(SENTENCE, 0), (SENTENCE, 50880)]
        assert session.recovery_time(0) < AT_ONCE


async def test_the_rate_outlives_a_recovery() -> None:
    """The rate measured on one instance judges its successor's responses: a later truncation is caught."""
    plan = FaultPlan(
        Fault.abort(after_audio_chunks=30, connection=1),
        Fault.close(1000, after_audio_chunks=5, connection=3),
    )
    async with KIT.emulator(plan) as emulator:
        async with Session(emulator, resilient(emulator)) as session:
            await session.warm_up()
            await session.say(TTSSpeakFrame(SENTENCE), utterances=2, expected=words(WARM, SENTENCE))
            await session.say(TTSSpeakFrame(SECOND), utterances=3, expected=words(WARM, SENTENCE, SECOND))
        assert_recovered(session.run, words(WARM, SENTENCE, SECOND), faults=2)
        assert [r.input for r in emulator.requests][3] == SECOND
        assert len(session.recovered) == 2
        assert session.recovery_time(3) < AT_ONCE


async def test_a_stalled_body_is_given_up_after_the_stall_timeout() -> None:
    """A body that stops after its first audio: dead after stall_timeout past one read, the rest replayed."""
    stall_timeout = 3 * UNIT
    plan = FaultPlan(Fault.stall(after_audio_chunks=30, connection=1))
    async with KIT.emulator(plan) as emulator:
        tts = resilient(emulator, first_audio_timeout=SLOW_WATCHDOG, stall_timeout=stall_timeout)
        async with Session(emulator, tts) as session:
            await session.warm_up()
            await session.say(TTSSpeakFrame(SENTENCE), utterances=2, expected=words(WARM, SENTENCE))
        assert_recovered(session.run, words(WARM, SENTENCE))
        stalled = emulator.requests[1]
        # Detected from the stall_timeout (past the time one read takes at
        # real-time pace), not from the SDK's 600 s read timeout.
        assert stall_timeout <= session.recovery_time(1) < stall_timeout + READ_S + AT_ONCE
        [(_, failure)] = session.lost
        assert "stalled" in failure.description
        # The stalled request was hung up on.
        await emulator.wait_until(lambda: stalled.closed, TIMEOUT)


async def test_a_body_streamed_at_real_time_pace_is_no_stall() -> None:
    """Audio paced at real time comes 0.5 s a push: with a shorter stall_timeout, still no stall."""
    async with KIT.emulator(realtime=True) as emulator:
        tts = resilient(emulator, first_audio_timeout=10 * UNIT, stall_timeout=3 * UNIT)
        async with Session(emulator, tts) as session:
            await session.say(TTSSpeakFrame(SENTENCE), utterances=1, expected=words(SENTENCE))
        assert session.lost == []
        assert session.run.heard == words(SENTENCE)
        assert len(emulator.requests) == 1


async def test_a_request_never_answered_is_caught_by_the_first_audio_watchdog() -> None:
    """A request never answered (no status line): the first_audio_timeout watchdog replays the sentence."""
    first_audio_timeout = 3 * UNIT
    plan = FaultPlan(Fault.hang(connection=1))
    async with KIT.emulator(plan) as emulator:
        tts = resilient(emulator, first_audio_timeout=first_audio_timeout, stall_timeout=SLOW_WATCHDOG)
        async with Session(emulator, tts) as session:
            await session.warm_up()
            await session.say(TTSSpeakFrame(SENTENCE), utterances=2, expected=words(WARM, SENTENCE))
        assert session.run.heard == words(WARM, SENTENCE)
        assert_recovered(session.run, words(WARM, SENTENCE))
        assert first_audio_timeout * 0.9 <= session.recovery_time(1) < first_audio_timeout + AT_ONCE
        await emulator.wait_until(lambda: emulator.requests[1].closed, TIMEOUT)


@pytest.mark.parametrize(
    "fault",
    [
        Fault.abort(after_audio_chunks=12, connection=2),
        Fault.close(1000, after_audio_chunks=12, connection=2),
    ],
    ids=["reset", "truncated"],
)
async def test_a_turn_cut_in_its_second_sentence(fault: Fault) -> None:
    """A streamed LLM turn cut in its second sentence: the first is not said again, the turn is heard once."""
    async with KIT.emulator(FaultPlan(fault)) as emulator:
        async with Session(emulator, resilient(emulator)) as session:
            await session.warm_up()
            expected = words(WARM, TURN)
            await session.say(*turn(TURN_TOKENS), utterances=2, expected=expected)
            await session.run.wait_until(lambda: session.run.listener.responses_ended == 1, TIMEOUT)
        run = session.run
        assert_recovered(run, expected)
        first = "".join(TURN_TOKENS[:2]).strip()
        second = "".join(TURN_TOKENS[2:4]).strip()
        inputs = [r.input for r in emulator.requests]
        assert inputs[:3] == [WARM, first, second]
        # The replay picks up at the end of the first sentence at the earliest.
        replayed = " ".join(inputs[3:])
        assert TURN.endswith(replayed) and first not in replayed
        assert session.recovery_time(2) < AT_ONCE
        # One response, one assistant message for it.
        assert run.listener.responses_started == run.listener.responses_ended == 1
        assert run.context_messages == [WARM, TURN]


async def test_a_first_cut_without_a_rate_is_replayed_from_the_sentence_start() -> None:
    """A reset in the session's first sentence, no rate known yet: that sentence is said again whole."""
    plan = FaultPlan(Fault.abort(after_audio_chunks=30))
    async with KIT.emulator(plan) as emulator:
        async with Session(emulator, resilient(emulator)) as session:
            await session.say(TTSSpeakFrame(SENTENCE), utterances=1, expected=words(SENTENCE))
        missing, repeated = alignment(session.run.heard, words(SENTENCE))
        assert missing == 0 and repeated > 0
        assert [r.input for r in emulator.requests] == [SENTENCE, SENTENCE]
        assert session.run.context_words == words(SENTENCE)
        assert session.run.errors == []


# ----------------------------------------------------------------------
# HTTP error statuses
# ----------------------------------------------------------------------


async def test_a_503_is_retried_at_once_by_the_wrapper() -> None:
    """HTTP 503: no SDK retries (0.4 s, then 0.9 s); the wrapper asks again at once."""
    plan = FaultPlan(Fault.refuse(503, connection=1))
    async with KIT.emulator(plan) as emulator:
        async with Session(emulator, resilient(emulator)) as session:
            await session.warm_up()
            await session.say(TTSSpeakFrame(SENTENCE), utterances=2, expected=words(WARM, SENTENCE))
        assert session.run.heard == words(WARM, SENTENCE)
        assert_recovered(session.run, words(WARM, SENTENCE))
        assert [r.status for r in emulator.requests] == [200, 503, 200]
        assert session.recovery_time(1) < AT_ONCE
        [(_, failure)] = session.lost
        assert (failure.verdict, failure.category, failure.code) == (Verdict.TRANSIENT, "server", 503)
        assert_no_sdk_retry(emulator)


async def test_a_429_waits_out_its_retry_after() -> None:
    """HTTP 429 with OpenAI's retry-after-ms: the wrapper waits that long (not less), then replays."""
    # Long enough that the watchdog (half of it) does not run out before a
    # loaded machine has read the 429 itself (a CI run with 3 * UNIT did).
    wait = 6 * UNIT
    plan = FaultPlan(Fault.refuse(429, connection=1, headers={"retry-after-ms": str(int(wait * 1000))}))
    async with KIT.emulator(plan) as emulator:
        # The first-audio watchdog, shorter than the wait, must not cut it short.
        tts = resilient(emulator, first_audio_timeout=wait / 2, stall_timeout=wait / 2)
        async with Session(emulator, tts) as session:
            await session.warm_up()
            await session.say(TTSSpeakFrame(SENTENCE), utterances=2, expected=words(WARM, SENTENCE))
        assert session.run.heard == words(WARM, SENTENCE)
        assert_recovered(session.run, words(WARM, SENTENCE))
        assert [r.status for r in emulator.requests] == [200, 429, 200]
        assert wait <= session.recovery_time(1) < wait + AT_ONCE
        [(_, failure)] = session.lost
        assert (failure.category, failure.code) == ("rate_limit", 429)
        assert failure.retry_after == pytest.approx(wait)
        assert_no_sdk_retry(emulator)


async def test_a_401_is_permanent_one_error_and_no_retry() -> None:
    """HTTP 401: one AUTHENTICATION ErrorFrame naming the unsaid text, no other request, an empty context."""
    async with KIT.emulator(FaultPlan(Fault.refuse(401, connection=None))) as emulator:
        tts = resilient(emulator, api_key="a-wrong-key")
        given_up: list[ReplayFailed] = []
        tts.add_event_handler("on_connection_given_up", lambda _, error: given_up.append(error))
        async with Session(emulator, tts) as session:
            await session.run.send(TTSSpeakFrame(SENTENCE), TTSSpeakFrame(SECOND))
            await session.run.recorder.wait_until(lambda: len(session.run.errors) >= 1, TIMEOUT)
        run = session.run
        [error] = run.errors
        assert error.category is ErrorCategory.AUTHENTICATION
        assert isinstance(error.exception, ReplayFailed)
        assert list(error.exception.unspoken) == [SENTENCE, SECOND]
        assert SENTENCE not in error.error and "a-wrong-key" not in error.error
        assert given_up == [error.exception]
        # Neither the wrapper nor the failed instance asked again.
        assert [r.status for r in emulator.requests] == [401]
        assert not tts.is_usable and tts.state is State.FAILED
        assert run.heard == [] and run.context_words == []


async def test_a_400_is_permanent_and_never_enters_the_context() -> None:
    """HTTP 400 (caught by the stock service, which then writes the sentence to the context): one error."""
    async with KIT.emulator(FaultPlan(Fault.refuse(400, connection=None))) as emulator:
        async with Session(emulator, resilient(emulator)) as session:
            await session.run.send(TTSSpeakFrame(SENTENCE))
            await session.run.recorder.wait_until(lambda: len(session.run.errors) >= 1, TIMEOUT)
        [error] = session.run.errors
        assert error.category is ErrorCategory.INVALID_REQUEST
        assert [r.status for r in emulator.requests] == [400]
        assert session.run.heard == [] and session.run.context_words == []


async def test_an_unknown_voice_is_permanent_and_never_requested() -> None:
    """A voice the stock service refuses before any request: one error, the sentence not in the context."""
    async with KIT.emulator() as emulator:
        tts = ResilientTTS(KIT.factory(emulator, voice="no-such-voice"), retry=NO_WAIT)
        async with Session(emulator, tts) as session:
            await session.run.send(TTSSpeakFrame(SENTENCE))
            await session.run.recorder.wait_until(lambda: len(session.run.errors) >= 1, TIMEOUT)
        [error] = session.run.errors
        assert error.category is ErrorCategory.INVALID_REQUEST
        assert emulator.requests == []
        assert session.run.context_words == []


# ----------------------------------------------------------------------
# No fault
# ----------------------------------------------------------------------


async def test_complete_responses_are_never_taken_for_cut_ones() -> None:
    """Sentences of every shape, complete: no recovery, one request each, every word heard once."""
    sentences = [
        WARM,
        "Okay.",
        "Call 555-0100, extension 42, between 9 and 17 o'clock on weekdays!",
        "It is *really* -- truly -- quite (very) fine; isn't it?",
        SENTENCE,
        "Yes, absolutely, that works perfectly well for all of us here.",
    ]
    async with KIT.emulator() as emulator:
        async with Session(emulator, resilient(emulator, watchdog=3 * UNIT)) as session:
            for index, sentence in enumerate(sentences):
                await session.say(TTSSpeakFrame(sentence), utterances=index + 1)
        assert session.lost == []
        assert [r.input for r in emulator.requests] == sentences
        assert session.run.heard == words(*sentences)
        assert session.run.context_words == words(*sentences)


# ----------------------------------------------------------------------
# The adapter itself
# ----------------------------------------------------------------------


class _Sink:
    stall_timeout = 1.0

    async def words_timed(self, *args: Any, **kwargs: Any) -> None:
        pass

    async def provider_failed(self, failure: Failure, context_id: str | None) -> None:
        pass


def test_the_adapter_is_chosen_for_the_stock_service() -> None:
    """OpenAITTSService gets the OpenAI adapter: no word timings."""
    adapter = tts_adapter_for(OpenAITTSService(api_key="k"))
    assert isinstance(adapter, OpenAITTSAdapter) and not adapter.word_timings


@pytest.mark.parametrize(
    ("make", "retries"),
    [
        (lambda: OpenAITTSService(api_key="k"), 0),
        (lambda: _with_client_retries(OpenAITTSService(api_key="k"), 3), 3),
    ],
    ids=["default", "factory-chosen"],
)
def test_sdk_retries_are_left_to_the_wrapper(make: Callable[[], OpenAITTSService], retries: int) -> None:
    """The SDK's default retries are turned off; a count the factory chose is kept."""
    service = make()
    OpenAITTSAdapter().hook(service, _Sink())
    assert service._client.max_retries == retries


def _with_client_retries(service: OpenAITTSService, retries: int) -> OpenAITTSService:
    service._client = service._client.with_options(max_retries=retries)
    return service


def test_a_response_is_judged_cut_only_when_clearly_short() -> None:
    """Before the rate is known only an empty body is a cut; after, less than half the fastest pace is."""
    adapter = OpenAITTSAdapter()
    assert adapter.cut_short(60, 0.0)
    assert not adapter.cut_short(60, 0.01)
    assert not adapter.cut_short(0, 0.0)  # nothing to say, nothing said
    adapter.measured(60, 0.75)  # 12.5 ms a letter
    assert adapter.cut_short(60, 0.3)
    assert not adapter.cut_short(60, 0.4)
    assert not adapter.cut_short(MIN_JUDGED_LETTERS - 1, 0.01)


async def test_a_retired_instance_makes_no_request() -> None:
    """Once the adapter saw an instance fail, it asks for nothing more (not even the next sentence)."""
    plan = FaultPlan(Fault.refuse(503, connection=0))
    async with KIT.emulator(plan) as emulator:
        async with Session(emulator, resilient(emulator)) as session:
            await session.say(
                TTSSpeakFrame(SENTENCE), TTSSpeakFrame(SECOND), utterances=2, expected=words(SENTENCE, SECOND)
            )
        assert [(r.input, r.status) for r in emulator.requests] == [
            (SENTENCE, 503),
            (SENTENCE, 200),
            (SECOND, 200),
        ]
        assert_no_sdk_retry(emulator)
        assert len(session.lost) == 1
        assert_recovered(session.run, words(SENTENCE, SECOND))
