"""ResilientTTS around the stock ElevenLabsTTSService, against the emulator, under each fault.

Every test asserts on what a listener at the end of the pipeline heard
(decoded from the audio), what Pipecat's assistant aggregator wrote into the
LLM context, and what went upstream.
"""

from __future__ import annotations

import asyncio

import pytest
from pipecat.frames.frames import (
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TTSSpeakFrame,
)
from pipecat.utils.errors import ErrorCategory

from pipecat_resilient import ReplayFailed, RetryPolicy, State
from pipecat_resilient.testing import ElevenLabsEmulator, Fault, FaultPlan, Scenario

from .conftest import SAMPLE_RATE, UNIT, resilient

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


def in_order(part: list[str], whole: list[str]) -> bool:
    """Whether ``part`` is a subsequence of ``whole``."""
    remaining = iter(whole)
    return all(word in remaining for word in part)


def turn(tokens: list[str]) -> list:
    return [LLMFullResponseStartFrame(), *[LLMTextFrame(t) for t in tokens], LLMFullResponseEndFrame()]


async def run_until_heard(
    emulator: ElevenLabsEmulator,
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


def assert_honest(run: Scenario, expected: list[str], *, utterances: int) -> None:
    """Every word heard once, the context equal to what was heard, no error, one start/stop per utterance."""
    assert run.heard == expected
    assert run.context_words == expected
    assert run.errors == []
    assert run.listener.started == utterances
    assert run.listener.stopped == utterances


@pytest.mark.parametrize("code", [1000, 1007, 1011, 1012])
async def test_close_mid_utterance_is_replayed_from_the_first_unheard_word(code: int) -> None:
    """A close mid-sentence: the fresh instance says the rest, the context holds what was heard."""
    plan = FaultPlan(Fault.close(code, after_audio_chunks=4))
    async with ElevenLabsEmulator(plan=plan) as emulator:
        run = await run_until_heard(
            emulator, resilient(emulator), [TTSSpeakFrame(SENTENCE)], words(SENTENCE), utterances=1
        )
        assert_honest(run, words(SENTENCE), utterances=1)
        assert len(emulator.connections) == 2
        # The replay starts at a word the listener had not heard in full.
        [(_, replayed)] = emulator.connections[1].texts
        assert SENTENCE.endswith(replayed)
        assert len(replayed) < len(SENTENCE)


async def test_abort_without_close_frame_is_replayed() -> None:
    """A connection dropped without a close frame (1006) is recovered the same way."""
    plan = FaultPlan(Fault.abort(after_audio_chunks=4))
    async with ElevenLabsEmulator(plan=plan) as emulator:
        run = await run_until_heard(
            emulator, resilient(emulator), [TTSSpeakFrame(SENTENCE)], words(SENTENCE), utterances=1
        )
        assert_honest(run, words(SENTENCE), utterances=1)
        assert len(emulator.connections) == 2


async def test_half_open_socket_is_detected_by_the_stall_watchdog() -> None:
    """A socket that stops answering mid-sentence is declared dead and the rest is replayed."""
    plan = FaultPlan(Fault.stall(after_audio_chunks=4))
    async with ElevenLabsEmulator(plan=plan) as emulator:
        run = await run_until_heard(
            emulator, resilient(emulator), [TTSSpeakFrame(SENTENCE)], words(SENTENCE), utterances=1
        )
        assert_honest(run, words(SENTENCE), utterances=1)
        assert len(emulator.connections) == 2


async def test_silent_socket_is_detected_by_the_first_audio_watchdog() -> None:
    """A socket that takes the text and never sends audio is declared dead within the timeout."""
    plan = FaultPlan(Fault.stall(after_text_messages=1))
    async with ElevenLabsEmulator(plan=plan) as emulator:
        run = await run_until_heard(
            emulator, resilient(emulator), [TTSSpeakFrame(SENTENCE)], words(SENTENCE), utterances=1
        )
        assert_honest(run, words(SENTENCE), utterances=1)
        assert emulator.connections[1].texts[0][1] == SENTENCE


async def test_drop_on_the_replacement_too() -> None:
    """The fresh instance dropping as well is just another recovery."""
    plan = FaultPlan(
        Fault.close(1012, after_audio_chunks=4),
        Fault.close(1011, after_audio_chunks=3, connection=1),
    )
    async with ElevenLabsEmulator(plan=plan) as emulator:
        run = await run_until_heard(
            emulator, resilient(emulator), [TTSSpeakFrame(SENTENCE)], words(SENTENCE), utterances=1
        )
        assert_honest(run, words(SENTENCE), utterances=1)
        assert len(emulator.connections) == 3


async def test_refused_reconnect_is_retried() -> None:
    """A reconnect refused with 503 is retried with the policy; nothing is lost, nothing reported."""
    plan = FaultPlan(
        Fault.close(1012, after_audio_chunks=4),
        Fault.refuse(503, connection=1),
        Fault.refuse(429, connection=2, headers={"Retry-After": "0"}),
    )
    async with ElevenLabsEmulator(plan=plan) as emulator:
        run = await run_until_heard(
            emulator, resilient(emulator), [TTSSpeakFrame(SENTENCE)], words(SENTENCE), utterances=1
        )
        assert_honest(run, words(SENTENCE), utterances=1)
        assert [c.refused for c in emulator.connections] == [None, 503, 429, None]


async def test_drop_during_a_streamed_llm_turn() -> None:
    """A drop in the middle of a streamed multi-sentence LLM turn: the turn is heard whole, once."""
    plan = FaultPlan(Fault.close(1011, after_audio_chunks=9))
    async with ElevenLabsEmulator(plan=plan) as emulator:
        tts = resilient(emulator)
        run = Scenario(tts, spc=emulator.samples_per_char(SAMPLE_RATE))
        await run.start()
        # The first sentences stream in, then the rest arrives while audio plays.
        await run.send(LLMFullResponseStartFrame(), *[LLMTextFrame(t) for t in TURN_TOKENS[:4]])
        await run.wait_heard(2)
        await run.send(*[LLMTextFrame(t) for t in TURN_TOKENS[4:]], LLMFullResponseEndFrame())
        await run.wait_until(lambda: len(run.heard) >= len(words(TURN)) and run.listener.stopped >= 1)
        await run.end()
        assert_honest(run, words(TURN), utterances=1)
        assert len(emulator.connections) == 2
        assert run.listener.responses_started == run.listener.responses_ended == 1
        assert len(run.context_messages) == 1


async def test_drop_after_a_whole_turn_was_sent_at_once() -> None:
    """All sentences already handed to the dead socket are replayed, none twice."""
    plan = FaultPlan(Fault.close(1012, after_audio_chunks=6))
    async with ElevenLabsEmulator(plan=plan) as emulator:
        run = await run_until_heard(
            emulator, resilient(emulator), turn(TURN_TOKENS), words(TURN), utterances=1
        )
        assert_honest(run, words(TURN), utterances=1)


async def test_drop_between_utterances() -> None:
    """A socket closed while idle is replaced; the next utterance is heard whole."""
    async with ElevenLabsEmulator() as emulator:
        tts = resilient(emulator)
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
        assert_honest(run, words(SENTENCE, SECOND), utterances=2)
        assert len(emulator.connections) == 2
        assert emulator.connections[1].texts[0][1] == SECOND


async def test_interruption_before_a_drop_is_never_replayed() -> None:
    """Text interrupted before the drop is dropped, not replayed into the fresh instance."""
    plan = FaultPlan(Fault.close(1011, after_text_messages=2))
    async with ElevenLabsEmulator(plan=plan) as emulator:
        tts = resilient(emulator)
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
        replayed = [text for c in emulator.connections[1:] for _, text in c.texts]
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


async def test_interruption_during_recovery_cancels_the_replay() -> None:
    """An interruption while reconnecting means the unheard rest is never said."""
    plan = FaultPlan(Fault.close(1012, after_audio_chunks=4), Fault.refuse(503, connection=1))
    retry = RetryPolicy(
        attempts=3, wait_initial=5 * UNIT, wait_max=5 * UNIT, jitter=False, timeout=100 * UNIT
    )
    async with ElevenLabsEmulator(plan=plan) as emulator:
        tts = resilient(emulator, retry=retry)
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
        assert [text for _, text in emulator.connections[2].texts] == [SECOND]
        assert run.heard[-len(words(SECOND)) :] == words(SECOND)
        assert len(run.heard) < len(words(SENTENCE, SECOND))
        assert in_order(run.context_words, run.heard)
        assert run.context_words[-len(words(SECOND)) :] == words(SECOND)
        assert run.errors == []


async def test_permanent_failure_on_reconnect_reports_once_and_names_the_lost_text() -> None:
    """A reconnect refused with 401 is not retried: one ErrorFrame naming the unheard text."""
    plan = FaultPlan(Fault.close(1012, after_audio_chunks=4), Fault.refuse(401, connection=None))
    # Connection 0 is not refused: the plan's catch-all refusal starts at 1.
    plan = FaultPlan(
        Fault.close(1012, after_audio_chunks=4), *[Fault.refuse(401, connection=i) for i in range(1, 5)]
    )
    async with ElevenLabsEmulator(plan=plan) as emulator:
        tts = resilient(emulator)
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
        assert run.context_words == run.heard
        assert run.listener.started == run.listener.stopped == 1


async def test_permanent_failure_at_start_is_reported_once() -> None:
    """A bad API key on the first connection: one authentication ErrorFrame, no retries."""
    async with ElevenLabsEmulator(api_key="the-right-key") as emulator:
        tts = resilient(emulator, api_key="a-wrong-key")
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


async def test_exhausted_retries_report_one_error() -> None:
    """When every reconnect is refused, recovery ends with exactly one ErrorFrame."""
    plan = FaultPlan(
        Fault.close(1012, after_audio_chunks=4), *[Fault.refuse(503, connection=i) for i in range(1, 9)]
    )
    async with ElevenLabsEmulator(plan=plan) as emulator:
        tts = resilient(emulator, retry=RetryPolicy(attempts=3, wait_initial=0, wait_max=0))
        run = Scenario(tts, spc=emulator.samples_per_char(SAMPLE_RATE))
        await run.start()
        await run.send(TTSSpeakFrame(SENTENCE))
        await run.recorder.wait_until(lambda: len(run.errors) >= 1, 50 * UNIT)
        await run.end()
        [error] = run.errors
        assert error.category is ErrorCategory.SERVER
        assert error.exception.attempts == 3
        assert len(emulator.connections) == 4
        assert run.context_words == run.heard
        assert run.listener.started == run.listener.stopped == 1


async def test_same_suspect_close_twice_is_treated_as_poison() -> None:
    """The same 1007 on the replayed text, before any progress, ends recovery instead of looping."""
    plan = FaultPlan(
        *[Fault.close(1007, "invalid payload", after_text_messages=1, connection=i) for i in range(6)]
    )
    async with ElevenLabsEmulator(plan=plan) as emulator:
        tts = resilient(emulator)
        run = Scenario(tts, spc=emulator.samples_per_char(SAMPLE_RATE))
        await run.start()
        await run.send(TTSSpeakFrame(SENTENCE))
        await run.recorder.wait_until(lambda: len(run.errors) >= 1, 50 * UNIT)
        await run.end()
        [error] = run.errors
        assert "poison" in error.error
        assert len(emulator.connections) == 2


async def test_end_frame_waits_for_recovered_speech() -> None:
    """An EndFrame right behind the text still lets the whole sentence be heard, across a drop."""
    plan = FaultPlan(Fault.close(1012, after_audio_chunks=4))
    async with ElevenLabsEmulator(plan=plan) as emulator:
        run = Scenario(resilient(emulator), spc=emulator.samples_per_char(SAMPLE_RATE))
        await run.start()
        await run.send(TTSSpeakFrame(SENTENCE))
        await run.end()
        assert_honest(run, words(SENTENCE), utterances=1)


async def test_cancel_stops_at_once_without_reconnecting() -> None:
    """A CancelFrame ends the pipeline promptly and starts no recovery."""
    plan = FaultPlan(Fault.stall(after_audio_chunks=2))
    async with ElevenLabsEmulator(plan=plan) as emulator:
        tts = resilient(emulator, first_audio_timeout=25 * UNIT, stall_timeout=25 * UNIT)
        run = Scenario(tts, spc=emulator.samples_per_char(SAMPLE_RATE))
        await run.start()
        await run.send(TTSSpeakFrame(SENTENCE))
        await emulator.wait_for_connections(1)
        await run.wait_until(lambda: run.listener.audio_frames >= 1)
        await asyncio.wait_for(run.cancel(), 30 * UNIT)
        assert len(emulator.connections) == 1


async def test_recovery_events_report_what_happened() -> None:
    """on_connection_lost and on_connection_recovered tell the drop, the downtime and the replay."""
    plan = FaultPlan(Fault.close(1012, after_audio_chunks=4))
    async with ElevenLabsEmulator(plan=plan) as emulator:
        tts = resilient(emulator)
        lost, recovered = [], []
        tts.add_event_handler("on_connection_lost", lambda _, failure: lost.append(failure))
        tts.add_event_handler("on_connection_recovered", lambda _, report: recovered.append(report))
        await run_until_heard(emulator, tts, [TTSSpeakFrame(SENTENCE)], words(SENTENCE), utterances=1)
        [failure] = lost
        assert failure.code == 1012
        [report] = recovered
        assert report.attempts == 1
        assert report.replayed_utterances == 1
        assert report.replayed_chars == len(emulator.connections[1].texts[0][1])
        assert 0 <= report.downtime < 20 * UNIT


async def test_no_fault_behaves_like_the_stock_service() -> None:
    """Without faults every frame gets through as the stock service sends it."""
    async with ElevenLabsEmulator() as emulator:
        run = await run_until_heard(
            emulator,
            resilient(emulator),
            [TTSSpeakFrame(SENTENCE), *turn(TURN_TOKENS)],
            words(SENTENCE, TURN),
            utterances=2,
        )
        assert_honest(run, words(SENTENCE, TURN), utterances=2)
        assert run.listener.kinds() == [
            "started",
            "stopped",
            "response-start",
            "started",
            "stopped",
            "response-end",
        ]
        assert len(emulator.connections) == 1


async def test_ledger_forgets_what_was_heard() -> None:
    """Once utterances are settled the ledger holds nothing (memory follows what is in flight)."""
    async with ElevenLabsEmulator() as emulator:
        tts = resilient(emulator)
        frames = [TTSSpeakFrame(SENTENCE), *turn(TURN_TOKENS), TTSSpeakFrame(SECOND)]
        await run_until_heard(emulator, tts, frames, words(SENTENCE, TURN, SECOND), utterances=3)
        assert tts.ledger.in_flight == 0


async def test_gives_up_into_a_service_switcher_failover() -> None:
    """Once it gives up it is unusable, so a failover ServiceSwitcher moves to the backup."""
    from pipecat.pipeline.service_switcher import ServiceSwitcher, ServiceSwitcherStrategyFailover

    async with (
        ElevenLabsEmulator(api_key="right") as primary_emulator,
        ElevenLabsEmulator() as backup_emulator,
    ):
        primary = resilient(primary_emulator, api_key="wrong")
        backup = resilient(backup_emulator)
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


async def test_drop_right_after_a_sentence_ends_does_not_repeat_its_last_word() -> None:
    """The last word of a sentence has audio but no timing until more comes: it is not said twice."""
    # "Alpha beta gamma." is four chunks of five characters; the drop follows the fourth.
    tokens = ["Alpha beta gamma. ", "Delta epsilon zeta eta."]
    plan = FaultPlan(Fault.close(1012, after_audio_chunks=4))
    async with ElevenLabsEmulator(plan=plan) as emulator:
        run = await run_until_heard(emulator, resilient(emulator), turn(tokens), words(*tokens), utterances=1)
        assert_honest(run, words(*tokens), utterances=1)
        assert [text for _, text in emulator.connections[1].texts] == ["Delta epsilon zeta eta."]


async def test_drop_after_the_whole_utterance_was_heard_closes_it() -> None:
    """Everything heard, the final signal lost: nothing is replayed and the utterance still ends."""
    plan = FaultPlan(Fault.close(1011, after_audio_chunks=4))
    async with ElevenLabsEmulator(plan=plan) as emulator:
        run = await run_until_heard(
            emulator,
            resilient(emulator),
            [TTSSpeakFrame("Alpha beta gamma.")],
            words("Alpha beta gamma."),
            utterances=1,
        )
        assert_honest(run, words("Alpha beta gamma."), utterances=1)
        assert emulator.connections[1].texts == []
        assert run.context_messages == ["Alpha beta gamma."]
