"""ResilientTTS around each stock TTS service, against its emulator, under each fault.

Every test runs once per provider kit (``provider``: ElevenLabs; Cartesia with
word timings after, grouped after, ahead of and shuffled against the audio;
Deepgram, without word timings) and asserts on what a listener at the end of
the pipeline heard (decoded from the audio), what Pipecat's assistant
aggregator wrote into the LLM context, and what went upstream.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest
from pipecat.frames.frames import (
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TTSSpeakFrame,
)
from pipecat.utils.errors import ErrorCategory

from pipecat_resilient import Failure, ReplayFailed, RetryPolicy, State
from pipecat_resilient.testing import Fault, FaultPlan, Scenario

from .conftest import ELEVENLABS, PROVIDERS, SAMPLE_RATE, UNIT, Provider, alignment

SENTENCE = "Hello world, this is a test of a dropped socket."
SECOND = "And here is a second sentence to say."
TURN_TOKENS = [
    "The weather ",
    "today is ",
    "sunny and warm. ",
    "Tomorrow it ",
    "will rain ",
    "in the afternoon. ",
    "Bring an ",
    "umbrella to work.",
]
TURN = "".join(TURN_TOKENS)


def words(*texts: str) -> list[str]:
    return " ".join(texts).split()


def spoken_on(emulator) -> list:
    """The connections that were given text (a stock service may open one of its own as it dies)."""
    return [c for c in emulator.connections if c.texts]


def in_order(part: list[str], whole: list[str]) -> bool:
    """Whether ``part`` is a subsequence of ``whole``."""
    remaining = iter(whole)
    return all(word in remaining for word in part)


def turn(tokens: list[str]) -> list:
    return [LLMFullResponseStartFrame(), *[LLMTextFrame(t) for t in tokens], LLMFullResponseEndFrame()]


async def run_until_heard(
    emulator,
    tts,
    frames: list,
    expected: list[str],
    *,
    utterances: int,
    timeout: float = 100 * UNIT,
) -> Scenario:
    """Send ``frames``, wait until every expected word was heard and every utterance stopped, then end."""
    run = Scenario(tts, spc=emulator.samples_per_char(SAMPLE_RATE))
    await run.start()
    await run.send(*frames)
    try:
        await run.wait_until(
            lambda: len(run.heard) >= len(expected) and run.listener.stopped >= utterances, timeout
        )
    except TimeoutError:
        pass  # the assertions below say what is missing
    await run.end()
    return run


def assert_context_honest(run: Scenario, provider: Provider) -> None:
    """The context holds what was heard (without word timings: a word or two of it may be missing).

    Giving up, the unheard rest is not in the context. Without timings the
    estimate of what the audio covered may fall a word or two short, so those
    words, heard, are missing from the context: never the other way round.
    """
    if provider.timings:
        assert run.context_words == run.heard
    else:
        assert run.heard[: len(run.context_words)] == run.context_words
        assert len(run.heard) - len(run.context_words) <= 2


def assert_honest(
    run: Scenario, expected: list[str], *, utterances: int, provider: Provider = ELEVENLABS
) -> None:
    """Every word heard (once, with word timings), the context equal to what was meant, no error.

    Without word timings a cut sentence may be heard again in part (the
    estimate of what its audio covered errs that way); nothing is lost and the
    context still holds each word once.
    """
    missing, repeated = alignment(run.heard, expected)
    assert missing == 0, f"lost {missing} word(s): heard {run.heard}"
    if provider.timings:
        assert run.heard == expected
    assert run.context_words == expected
    assert run.errors == []
    assert run.listener.started == utterances
    assert run.listener.stopped == utterances


@pytest.mark.parametrize("code", [1000, 1007, 1011, 1012])
async def test_close_mid_utterance_is_replayed_from_the_first_unheard_word(
    code: int, provider: Provider
) -> None:
    """A close mid-sentence: the fresh instance says the rest, the context holds what was heard."""
    plan = FaultPlan(Fault.close(code, after_audio_chunks=4))
    async with provider.emulator(plan) as emulator:
        run = await run_until_heard(
            emulator, provider.resilient(emulator), [TTSSpeakFrame(SENTENCE)], words(SENTENCE), utterances=1
        )
        assert_honest(run, words(SENTENCE), utterances=1, provider=provider)
        assert len(spoken_on(emulator)) == 2
        # The replay starts at a word the listener had not heard in full.
        [(_, replayed)] = spoken_on(emulator)[1].texts
        assert SENTENCE.endswith(replayed.strip())
        if provider.timings:
            assert len(replayed.strip()) < len(SENTENCE)


async def test_abort_without_close_frame_is_replayed(provider: Provider) -> None:
    """A connection dropped without a close frame (1006) is recovered the same way."""
    plan = FaultPlan(Fault.abort(after_audio_chunks=4))
    async with provider.emulator(plan) as emulator:
        run = await run_until_heard(
            emulator, provider.resilient(emulator), [TTSSpeakFrame(SENTENCE)], words(SENTENCE), utterances=1
        )
        assert_honest(run, words(SENTENCE), utterances=1, provider=provider)
        assert len(spoken_on(emulator)) == 2


async def test_half_open_socket_is_detected_by_the_stall_watchdog(provider: Provider) -> None:
    """A socket that stops answering mid-sentence is declared dead and the rest is replayed."""
    plan = FaultPlan(Fault.stall(after_audio_chunks=4))
    async with provider.emulator(plan) as emulator:
        run = await run_until_heard(
            emulator, provider.resilient(emulator), [TTSSpeakFrame(SENTENCE)], words(SENTENCE), utterances=1
        )
        assert_honest(run, words(SENTENCE), utterances=1, provider=provider)
        assert len(spoken_on(emulator)) == 2


async def test_silent_socket_is_detected_by_the_first_audio_watchdog(provider: Provider) -> None:
    """A socket that takes the text and never sends audio is declared dead within the timeout."""
    plan = FaultPlan(Fault.stall(after_text_messages=1))
    async with provider.emulator(plan) as emulator:
        run = await run_until_heard(
            emulator, provider.resilient(emulator), [TTSSpeakFrame(SENTENCE)], words(SENTENCE), utterances=1
        )
        assert_honest(run, words(SENTENCE), utterances=1, provider=provider)
        assert spoken_on(emulator)[1].texts[0][1].strip() == SENTENCE


async def test_drop_on_the_replacement_too(provider: Provider) -> None:
    """The fresh instance dropping as well is just another recovery."""
    plan = FaultPlan(
        Fault.close(1012, after_audio_chunks=4),
        Fault.close(1011, after_audio_chunks=3, connection=1),
    )
    async with provider.emulator(plan) as emulator:
        run = await run_until_heard(
            emulator, provider.resilient(emulator), [TTSSpeakFrame(SENTENCE)], words(SENTENCE), utterances=1
        )
        assert_honest(run, words(SENTENCE), utterances=1, provider=provider)
        assert len(spoken_on(emulator)) == 3


async def test_refused_reconnect_is_retried(provider: Provider) -> None:
    """A reconnect refused with 503 is retried with the policy; nothing is lost, nothing reported."""
    plan = FaultPlan(
        Fault.close(1012, after_audio_chunks=4),
        Fault.refuse(503, connection=1),
        Fault.refuse(429, connection=2, headers={"Retry-After": "0"}),
    )
    async with provider.emulator(plan) as emulator:
        run = await run_until_heard(
            emulator, provider.resilient(emulator), [TTSSpeakFrame(SENTENCE)], words(SENTENCE), utterances=1
        )
        assert_honest(run, words(SENTENCE), utterances=1, provider=provider)
        assert [c.refused for c in emulator.connections] == [None, 503, 429, None]


async def test_drop_during_a_streamed_llm_turn(provider: Provider) -> None:
    """A drop in the middle of a streamed multi-sentence LLM turn: the turn is heard whole, once."""
    plan = FaultPlan(Fault.close(1011, after_audio_chunks=9))
    async with provider.emulator(plan) as emulator:
        tts = provider.resilient(emulator)
        run = Scenario(tts, spc=emulator.samples_per_char(SAMPLE_RATE))
        await run.start()
        # The first sentences stream in, then the rest arrives while audio plays.
        await run.send(LLMFullResponseStartFrame(), *[LLMTextFrame(t) for t in TURN_TOKENS[:4]])
        await run.wait_heard(2)
        await run.send(*[LLMTextFrame(t) for t in TURN_TOKENS[4:]], LLMFullResponseEndFrame())
        await run.wait_until(lambda: len(run.heard) >= len(words(TURN)) and run.listener.stopped >= 1)
        await run.end()
        assert_honest(run, words(TURN), utterances=1, provider=provider)
        assert len(spoken_on(emulator)) == 2
        assert run.listener.responses_started == run.listener.responses_ended == 1
        assert len(run.context_messages) == 1


async def test_drop_after_a_whole_turn_was_sent_at_once(provider: Provider) -> None:
    """All sentences already handed to the dead socket are replayed, none twice."""
    plan = FaultPlan(Fault.close(1012, after_audio_chunks=6))
    async with provider.emulator(plan) as emulator:
        run = await run_until_heard(
            emulator, provider.resilient(emulator), turn(TURN_TOKENS), words(TURN), utterances=1
        )
        assert_honest(run, words(TURN), utterances=1, provider=provider)


async def test_drop_between_utterances(provider: Provider) -> None:
    """A socket closed while idle is replaced; the next utterance is heard whole."""
    async with provider.emulator() as emulator:
        tts = provider.resilient(emulator)
        run = Scenario(tts, spc=emulator.samples_per_char(SAMPLE_RATE))
        await run.start()
        await run.send(TTSSpeakFrame(SENTENCE))
        await run.wait_until(lambda: run.listener.stopped == 1)
        lost = asyncio.Event()
        tts.add_event_handler("on_connection_recovered", lambda *_: lost.set())
        await emulator.inject(Fault.close(1000))
        await asyncio.wait_for(lost.wait(), 50 * UNIT)
        await run.send(TTSSpeakFrame(SECOND))
        await run.wait_until(lambda: run.listener.stopped == 2)
        await run.end()
        assert_honest(run, words(SENTENCE, SECOND), utterances=2, provider=provider)
        assert len(spoken_on(emulator)) == 2
        assert spoken_on(emulator)[1].texts[0][1].strip() == SECOND


async def test_interruption_before_a_drop_is_never_replayed(provider: Provider) -> None:
    """Text interrupted before the drop is dropped, not replayed into the fresh instance."""
    plan = FaultPlan(Fault.close(1011, after_text_messages=2))
    async with provider.emulator(plan) as emulator:
        tts = provider.resilient(emulator)
        run = Scenario(tts, spc=emulator.samples_per_char(SAMPLE_RATE))
        await run.start()
        await run.send(TTSSpeakFrame(SENTENCE))
        await run.wait_heard(2)
        await run.send(InterruptionFrame())
        heard_before = list(run.heard)
        # The next utterance's text reaches the server, which then drops.
        await run.send(TTSSpeakFrame(SECOND))
        await run.wait_until(lambda: run.heard[-1:] == words(SECOND)[-1:] and run.listener.stopped >= 1)
        await run.end()
        replayed = [text.strip() for c in emulator.connections[1:] for _, text in c.texts]
        assert replayed == [SECOND]
        assert run.heard[: len(heard_before)] == heard_before
        assert run.heard[-len(words(SECOND)) :] == words(SECOND)
        assert len(run.heard) < len(words(SENTENCE, SECOND))
        # Nothing unheard reaches the context. (The last word heard before an
        # interruption may be missing from it, as with the stock service: a
        # real transport drops the audio it had not played yet.)
        assert in_order(run.context_words, run.heard)
        assert run.context_words[-len(words(SECOND)) :] == words(SECOND)
        assert run.errors == []


async def test_interruption_during_recovery_cancels_the_replay(provider: Provider) -> None:
    """An interruption while reconnecting means the unheard rest is never said."""
    plan = FaultPlan(Fault.close(1012, after_audio_chunks=4), Fault.refuse(503, connection=1))
    retry = RetryPolicy(
        attempts=3, wait_initial=5 * UNIT, wait_max=5 * UNIT, jitter=False, timeout=100 * UNIT
    )
    async with provider.emulator(plan) as emulator:
        tts = provider.resilient(emulator, retry=retry)
        run = Scenario(tts, spc=emulator.samples_per_char(SAMPLE_RATE))
        await run.start()
        await run.send(TTSSpeakFrame(SENTENCE))
        await emulator.wait_for_connections(2)  # the refused attempt; the next waits 0.5 s
        await run.send(InterruptionFrame())
        recovered = asyncio.Event()
        tts.add_event_handler("on_connection_recovered", lambda *_: recovered.set())
        await asyncio.wait_for(recovered.wait(), 50 * UNIT)
        await run.send(TTSSpeakFrame(SECOND))
        await run.wait_until(lambda: run.heard[-1:] == words(SECOND)[-1:])
        await run.end()
        assert [text.strip() for _, text in spoken_on(emulator)[-1].texts] == [SECOND]
        assert run.heard[-len(words(SECOND)) :] == words(SECOND)
        assert len(run.heard) < len(words(SENTENCE, SECOND))
        assert in_order(run.context_words, run.heard)
        assert run.context_words[-len(words(SECOND)) :] == words(SECOND)
        assert run.errors == []


async def test_permanent_failure_on_reconnect_reports_once_and_names_the_lost_text(
    provider: Provider,
) -> None:
    """A reconnect refused with 401 is not retried: one ErrorFrame naming the unheard text."""
    plan = FaultPlan(Fault.close(1012, after_audio_chunks=4), Fault.refuse(401, connection=None))
    # Connection 0 is not refused: the plan's catch-all refusal starts at 1.
    plan = FaultPlan(
        Fault.close(1012, after_audio_chunks=4), *[Fault.refuse(401, connection=i) for i in range(1, 5)]
    )
    async with provider.emulator(plan) as emulator:
        tts = provider.resilient(emulator)
        given_up: list[ReplayFailed] = []
        tts.add_event_handler("on_connection_given_up", lambda _, error: given_up.append(error))
        run = Scenario(tts, spc=emulator.samples_per_char(SAMPLE_RATE))
        await run.start()
        await run.send(TTSSpeakFrame(SENTENCE))
        await run.recorder.wait_until(lambda: len(run.errors) >= 1, 50 * UNIT)
        await run.end()
        [error] = run.errors
        assert error.category is ErrorCategory.AUTHENTICATION
        assert isinstance(error.exception, ReplayFailed)
        [unspoken] = error.exception.unspoken
        assert SENTENCE.endswith(unspoken) and unspoken
        # The error message counts the lost words but never quotes them.
        assert unspoken not in error.error
        assert not tts.is_usable
        assert tts.state is State.FAILED
        assert len(emulator.connections) == 2  # no retry after the 401
        assert given_up and given_up[0] is error.exception
        # What was heard is in the context; what was lost is not.
        assert_context_honest(run, provider)
        assert run.listener.started == run.listener.stopped == 1


async def test_permanent_failure_at_start_is_reported_once(provider: Provider) -> None:
    """A bad API key on the first connection: one authentication ErrorFrame, no retries."""
    async with provider.emulator(api_key="the-right-key") as emulator:
        tts = provider.resilient(emulator, api_key="a-wrong-key")
        run = Scenario(tts, spc=emulator.samples_per_char(SAMPLE_RATE))
        await run.start()
        await run.recorder.wait_until(lambda: len(run.errors) >= 1, 50 * UNIT)
        await run.send(TTSSpeakFrame(SENTENCE))
        await run.end()
        [error] = run.errors
        assert error.category is ErrorCategory.AUTHENTICATION
        assert "a-wrong-key" not in error.error
        assert not tts.is_usable
        assert len(emulator.connections) == 1
        assert run.heard == []
        assert run.context_words == []


async def test_exhausted_retries_report_one_error(provider: Provider) -> None:
    """When every reconnect is refused, recovery ends with exactly one ErrorFrame."""
    plan = FaultPlan(
        Fault.close(1012, after_audio_chunks=4), *[Fault.refuse(503, connection=i) for i in range(1, 9)]
    )
    async with provider.emulator(plan) as emulator:
        tts = provider.resilient(emulator, retry=RetryPolicy(attempts=3, wait_initial=0, wait_max=0))
        run = Scenario(tts, spc=emulator.samples_per_char(SAMPLE_RATE))
        await run.start()
        await run.send(TTSSpeakFrame(SENTENCE))
        await run.recorder.wait_until(lambda: len(run.errors) >= 1, 50 * UNIT)
        await run.end()
        [error] = run.errors
        assert error.category is ErrorCategory.SERVER
        assert error.exception.attempts == 3
        assert len(emulator.connections) == 4
        assert_context_honest(run, provider)
        assert run.listener.started == run.listener.stopped == 1


async def test_same_suspect_close_twice_is_treated_as_poison(provider: Provider) -> None:
    """The same 1007 on the replayed text, before any progress, ends recovery instead of looping."""
    plan = FaultPlan(
        *[Fault.close(1007, "invalid payload", after_text_messages=1, connection=i) for i in range(6)]
    )
    async with provider.emulator(plan) as emulator:
        tts = provider.resilient(emulator)
        run = Scenario(tts, spc=emulator.samples_per_char(SAMPLE_RATE))
        await run.start()
        await run.send(TTSSpeakFrame(SENTENCE))
        await run.recorder.wait_until(lambda: len(run.errors) >= 1, 50 * UNIT)
        await run.end()
        [error] = run.errors
        assert "poison" in error.error
        assert len(emulator.connections) == 2


async def test_end_frame_waits_for_recovered_speech(provider: Provider) -> None:
    """An EndFrame right behind the text still lets the whole sentence be heard, across a drop."""
    plan = FaultPlan(Fault.close(1012, after_audio_chunks=4))
    async with provider.emulator(plan) as emulator:
        run = Scenario(provider.resilient(emulator), spc=emulator.samples_per_char(SAMPLE_RATE))
        await run.start()
        await run.send(TTSSpeakFrame(SENTENCE))
        await run.end()
        assert_honest(run, words(SENTENCE), utterances=1, provider=provider)


async def test_cancel_stops_at_once_without_reconnecting(provider: Provider) -> None:
    """A CancelFrame ends the pipeline promptly and starts no recovery."""
    plan = FaultPlan(Fault.stall(after_audio_chunks=2))
    async with provider.emulator(plan) as emulator:
        tts = provider.resilient(emulator, first_audio_timeout=25 * UNIT, stall_timeout=25 * UNIT)
        run = Scenario(tts, spc=emulator.samples_per_char(SAMPLE_RATE))
        await run.start()
        await run.send(TTSSpeakFrame(SENTENCE))
        await emulator.wait_for_connections(1)
        await run.wait_until(lambda: run.listener.audio_frames >= 1)
        await asyncio.wait_for(run.cancel(), 30 * UNIT)
        assert len(emulator.connections) == 1


async def test_recovery_events_report_what_happened(provider: Provider) -> None:
    """on_connection_lost and on_connection_recovered tell the drop, the downtime and the replay."""
    plan = FaultPlan(Fault.close(1012, after_audio_chunks=4))
    async with provider.emulator(plan) as emulator:
        tts = provider.resilient(emulator)
        lost, recovered = [], []
        tts.add_event_handler("on_connection_lost", lambda _, failure: lost.append(failure))
        tts.add_event_handler("on_connection_recovered", lambda _, report: recovered.append(report))
        await run_until_heard(emulator, tts, [TTSSpeakFrame(SENTENCE)], words(SENTENCE), utterances=1)
        [failure] = lost
        assert failure.code == 1012
        [report] = recovered
        assert report.attempts == 1
        assert report.replayed_utterances == 1
        assert report.replayed_chars == len(spoken_on(emulator)[1].texts[0][1].strip())
        assert 0 <= report.downtime < 20 * UNIT


async def test_no_fault_behaves_like_the_stock_service(provider: Provider) -> None:
    """Without faults every frame gets through as the stock service sends it."""
    async with provider.emulator() as emulator:
        run = await run_until_heard(
            emulator,
            provider.resilient(emulator),
            [TTSSpeakFrame(SENTENCE), *turn(TURN_TOKENS)],
            words(SENTENCE, TURN),
            utterances=2,
        )
        assert_honest(run, words(SENTENCE, TURN), utterances=2, provider=provider)
        assert run.listener.kinds() == [
            "started",
            "stopped",
            "response-start",
            "started",
            "stopped",
            "response-end",
        ]
        assert len(emulator.connections) == 1


async def test_ledger_forgets_what_was_heard(provider: Provider) -> None:
    """Once utterances are settled the ledger holds nothing (memory follows what is in flight)."""
    async with provider.emulator() as emulator:
        tts = provider.resilient(emulator)
        frames = [TTSSpeakFrame(SENTENCE), *turn(TURN_TOKENS), TTSSpeakFrame(SECOND)]
        await run_until_heard(emulator, tts, frames, words(SENTENCE, TURN, SECOND), utterances=3)
        assert tts.ledger.in_flight == 0


async def test_gives_up_into_a_service_switcher_failover() -> None:
    """Once it gives up it is unusable, so a failover ServiceSwitcher moves to the backup."""
    from pipecat.pipeline.service_switcher import ServiceSwitcher, ServiceSwitcherStrategyFailover

    async with (
        ELEVENLABS.emulator(api_key="right") as primary_emulator,
        ELEVENLABS.emulator() as backup_emulator,
    ):
        primary = ELEVENLABS.resilient(primary_emulator, api_key="wrong")
        backup = ELEVENLABS.resilient(backup_emulator)
        switcher = ServiceSwitcher([primary, backup], strategy_type=ServiceSwitcherStrategyFailover)
        gave_up = asyncio.Event()
        primary.add_event_handler("on_connection_given_up", lambda *_: gave_up.set())
        run = Scenario(switcher, spc=backup_emulator.samples_per_char(SAMPLE_RATE))
        await run.start()
        await asyncio.wait_for(gave_up.wait(), 50 * UNIT)
        assert switcher.strategy.active_service is backup
        await run.send(TTSSpeakFrame(SECOND))
        await run.wait_until(lambda: run.listener.stopped == 1)
        await run.end()
        assert not primary.is_usable and backup.is_usable
        assert run.heard == words(SECOND)
        assert run.context_words == words(SECOND)
        # The switcher answered for the primary's error by switching.
        assert run.errors == []


async def test_drop_right_after_a_sentence_ends_does_not_repeat_its_last_word(provider: Provider) -> None:
    """The last word of a sentence has audio but no timing until more comes: it is not said twice."""
    # "Alpha beta gamma." is four chunks of five characters; the drop follows the fourth.
    tokens = ["Alpha beta gamma. ", "Delta epsilon zeta eta."]
    plan = FaultPlan(Fault.close(1012, after_audio_chunks=4))
    async with provider.emulator(plan) as emulator:
        run = await run_until_heard(
            emulator, provider.resilient(emulator), turn(tokens), words(*tokens), utterances=1
        )
        assert_honest(run, words(*tokens), utterances=1, provider=provider)
        if provider.timings:
            assert [text for _, text in spoken_on(emulator)[1].texts] == ["Delta epsilon zeta eta."]


async def test_drop_after_the_whole_utterance_was_heard_closes_it(provider: Provider) -> None:
    """Everything heard, the final signal lost: nothing is replayed and the utterance still ends."""
    plan = FaultPlan(Fault.close(1011, after_audio_chunks=4))
    async with provider.emulator(plan) as emulator:
        run = await run_until_heard(
            emulator,
            provider.resilient(emulator),
            [TTSSpeakFrame("Alpha beta gamma.")],
            words("Alpha beta gamma."),
            utterances=1,
        )
        assert_honest(run, words("Alpha beta gamma."), utterances=1, provider=provider)
        if provider.timings:
            assert len(spoken_on(emulator)) == 1  # nothing left to replay
        assert run.context_messages == ["Alpha beta gamma."]


# ----------------------------------------------------------------------
# Provider failures that are not socket drops
# ----------------------------------------------------------------------


async def test_a_provider_error_message_is_recovered_at_once(provider: Provider) -> None:
    """The provider's error message, socket left open: recovered at once (no watchdog), nothing lost."""
    plan = FaultPlan(Fault.error("internal server error", 500, after_audio_chunks=4))
    async with provider.emulator(plan) as emulator:
        tts = provider.resilient(emulator, first_audio_timeout=25 * UNIT, stall_timeout=25 * UNIT)
        lost: list[float] = []
        tts.add_event_handler("on_connection_lost", lambda *_: lost.append(time.monotonic()))
        run = await run_until_heard(emulator, tts, [TTSSpeakFrame(SENTENCE)], words(SENTENCE), utterances=1)
        assert_honest(run, words(SENTENCE), utterances=1, provider=provider)
        [errored] = [c for c in emulator.connections if c.errors]
        assert errored.fault_at is not None
        # Detected from the message itself: the watchdogs here wait 2.5 s.
        assert lost[0] - errored.fault_at < 5 * UNIT


async def test_a_permanent_provider_error_message_is_not_retried(provider: Provider) -> None:
    """An error message saying the request can never work (400, an unknown voice): one error, no retry."""
    plan = FaultPlan(Fault.error("unknown voice", 400, after_audio_chunks=2))
    async with provider.emulator(plan) as emulator:
        tts = provider.resilient(emulator, first_audio_timeout=25 * UNIT, stall_timeout=25 * UNIT)
        run = Scenario(tts, spc=emulator.samples_per_char(SAMPLE_RATE))
        await run.start()
        await run.send(TTSSpeakFrame(SENTENCE))
        await run.recorder.wait_until(lambda: len(run.errors) >= 1, 50 * UNIT)
        await run.end()
        [error] = run.errors
        assert error.category is ErrorCategory.INVALID_REQUEST
        assert len(spoken_on(emulator)) == 1
        assert_context_honest(run, provider)


async def test_a_normal_close_is_recovered_at_once(provider: Provider) -> None:
    """A close 1000 mid-sentence (stock Cartesia reconnects quietly): caught at once, not by a watchdog."""
    plan = FaultPlan(Fault.close(1000, after_audio_chunks=4))
    async with provider.emulator(plan) as emulator:
        tts = provider.resilient(emulator, first_audio_timeout=25 * UNIT, stall_timeout=25 * UNIT)
        recovered: list[float] = []
        tts.add_event_handler("on_connection_recovered", lambda _, report: recovered.append(report.downtime))
        lost: list[float] = []
        tts.add_event_handler("on_connection_lost", lambda *_: lost.append(time.monotonic()))
        run = await run_until_heard(emulator, tts, [TTSSpeakFrame(SENTENCE)], words(SENTENCE), utterances=1)
        assert_honest(run, words(SENTENCE), utterances=1, provider=provider)
        fault_at = emulator.connections[0].fault_at
        assert fault_at is not None and lost[0] - fault_at < 5 * UNIT


@pytest.mark.parametrize("name", ["deepgram", "cartesia-grouped"])
async def test_a_first_cut_before_any_timing_is_replayed_never_lost(name: str) -> None:
    """No word timing yet and no speaking rate: the cut sentence is said again from its start, none lost."""
    [kit] = [p for p in PROVIDERS if p.name == name]
    cold = replace(kit, tts_options={})
    plan = FaultPlan(Fault.close(1011, after_audio_chunks=4))
    async with cold.emulator(plan) as emulator:
        run = await run_until_heard(
            emulator, cold.resilient(emulator), [TTSSpeakFrame(SENTENCE)], words(SENTENCE), utterances=1
        )
        missing, repeated = alignment(run.heard, words(SENTENCE))
        assert missing == 0 and repeated > 0
        assert [text.strip() for _, text in spoken_on(emulator)[1].texts] == [SENTENCE]
        # The context holds each word once, and nothing unheard.
        assert run.context_words == words(SENTENCE)
        assert run.errors == []


async def test_without_word_timings_a_cut_is_said_again_by_two_words_at_most() -> None:
    """Deepgram, its rate measured on the first sentence: each later cut repeats at most two words."""
    [kit] = [p for p in PROVIDERS if p.name == "deepgram"]
    cold = replace(kit, tts_options={})  # the rate is learned, not given
    sentences = [
        "The first sentence teaches the speaking rate to the wrapper.",
        "Then a second sentence is cut in the middle of its words.",
        "And a third one is cut somewhere else along the way home.",
    ]
    async with cold.emulator() as emulator:
        tts = cold.resilient(emulator)
        run = Scenario(tts, spc=emulator.samples_per_char(SAMPLE_RATE))
        await run.start()
        for index, sentence in enumerate(sentences):
            if index:
                emulator.arm(Fault.close(1011, after_audio_chunks=3 + 2 * index))
            await run.send(TTSSpeakFrame(sentence))
            await run.wait_until(lambda i=index: run.listener.stopped == i + 1, 50 * UNIT)
        await run.end()
        expected = words(*sentences)
        missing, repeated = alignment(run.heard, expected)
        assert missing == 0
        assert repeated <= 2 * 2
        assert len(spoken_on(emulator)) == 3
        assert run.context_words == expected


@pytest.mark.parametrize("provider", PROVIDERS, ids=str)
async def test_a_drop_after_the_provider_finished_its_audio_recovers_at_once(provider: Provider) -> None:
    """The socket is cut after the provider sent all of an utterance's audio but before it was all
    pushed out: the drain does not wait for a marker queued behind the context's end; the next
    utterance is spoken at once (not after the recovery timeout)."""
    async with provider.emulator(first_audio_delay=0.05) as emulator:
        tts = provider.resilient(emulator, retry=RetryPolicy(attempts=4, wait_initial=0.0, wait_max=0.0))
        run = Scenario(tts, spc=emulator.samples_per_char(SAMPLE_RATE))
        await run.start()
        await run.send(TTSSpeakFrame(SENTENCE))
        await run.wait_until(lambda: len(run.heard) >= 3)
        await until_sent(emulator)
        emulator.outage("refuse", status=503)  # cuts the open connection
        emulator.restore()
        await run.send(TTSSpeakFrame(SECOND))
        # Well within the policy's 15 s timeout, which a stuck drain would run into.
        await run.wait_until(
            lambda: len(run.heard) >= len(words(SENTENCE, SECOND)) and run.listener.stopped >= 2, 3.0
        )
        await run.end()
        assert run.heard == words(SENTENCE, SECOND)
        assert run.context_words == words(SENTENCE, SECOND)
        assert run.errors == []


async def until_sent(emulator: object, timeout: float = 5.0) -> None:
    """Wait until the emulator has finished sending the first connection's audio."""
    async with asyncio.timeout(timeout):
        while not emulator.connections[0].finished:  # type: ignore[attr-defined]
            await asyncio.sleep(0.002)


async def test_a_close_is_acted_on_from_its_frame_not_after_the_tcp_close(provider: Provider) -> None:
    """The provider's close frame starts the recovery; the end of the closing handshake is not waited for.

    The emulator sends its close frame and reads no more, so the TCP
    connection stays open until the client's own close timeout (2 s in
    Pipecat): ``websockets`` raises in ``recv`` only then, and the stall
    watchdog (0.3 s here) would catch the silence first. Acted on from the
    frame, the drop is reported as the close it is.
    """
    plan = FaultPlan(Fault.close(1011, after_audio_chunks=4, linger=True))
    async with provider.emulator(plan) as emulator:
        tts = provider.resilient(emulator)
        lost: list[Failure] = []
        tts.add_event_handler("on_connection_lost", lambda _, failure: lost.append(failure))
        run = await run_until_heard(emulator, tts, [TTSSpeakFrame(SENTENCE)], words(SENTENCE), utterances=1)
        assert_honest(run, words(SENTENCE), utterances=1, provider=provider)
        assert [failure.code for failure in lost] == [1011]
