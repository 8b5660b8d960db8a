"""ResilientLLM around the stock GeminiLiveLLMService, against the Gemini Live emulator over TLS.

Each test asserts on what a listener where the transport would be heard
(decoded from the audio), what the context received, what the emulator got
(setups, resumption handles, turns, tool responses) and what went upstream.
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import pytest
from loguru import logger
from pipecat.adapters.llm.schemas.function_schema import FunctionSchema
from pipecat.adapters.llm.schemas.tools_schema import ToolsSchema
from pipecat.frames.frames import (
    EndFrame,
    InputAudioRawFrame,
    InputTextRawFrame,
    InterruptionFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.services.google.gemini_live.llm import GeminiLiveLLMService
from pipecat.services.llm_service import FunctionCallParams

from pipecat_resilient import Failure, ReplayPolicy, ResilientLLM, RetryPolicy, State
from pipecat_resilient._gemini import GeminiLive
from pipecat_resilient.policy import SESSION_CONTINUE_INSTRUCTION
from pipecat_resilient.realtime import ResilientRealtimeLLM
from pipecat_resilient.testing import Fault, FaultPlan, GeminiLiveEmulator, SessionScenario, Silent, ToolCall
from pipecat_resilient.testing.gemini_live import LAST_CHUNK_BEFORE_TURN_COMPLETE

from .conftest import UNIT
from .test_emulator_gemini_live import MODEL, words

STORY = "Once upon a time there was a socket that never closed and a bot that never stopped talking."
QUESTION = "Tell me a story."
NO_WAIT = RetryPolicy(attempts=4, wait_initial=0.0, wait_max=0.0)
FIRST_TOKEN_TIMEOUT = 5 * UNIT
HOLD = ReplayPolicy(continuation_hold_s=30 * UNIT)
WEATHER_TOOLS = ToolsSchema(
    standard_tools=[
        FunctionSchema(
            name="get_weather",
            description="Current weather in a city.",
            properties={"city": {"type": "string"}},
            required=["city"],
        )
    ]
)
CUTS = [
    Fault.close(1011, "Internal error encountered.", after_audio_chunks=4),
    Fault.close(1007, LAST_CHUNK_BEFORE_TURN_COMPLETE, after_audio_chunks=4),
    Fault.abort(after_audio_chunks=4),
]
CUT_IDS = ["1011", "1007", "abort"]
# What the model says when asked to go on after the user heard "Once upon a" (the
# transcription of the fourth chunk, "e the", never came: the user heard "time" too).
GOES_ON = {
    "continue": "time there was a socket that never closed and a bot that never stopped talking.",
    "restart": STORY,
    "repeat": STORY,  # the last three words heard are all of them
}


def make(
    emulator: GeminiLiveEmulator,
    *,
    keepalive: bool = False,
    keepalive_timeout: float = UNIT,
    **functions: Any,
):
    def factory() -> GeminiLiveLLMService:
        options = (
            emulator.http_options(keepalive=(UNIT, keepalive_timeout), close_timeout=UNIT)
            if keepalive
            else emulator.http_options()
        )
        service = GeminiLiveLLMService(
            api_key="test-key", http_options=options, settings=GeminiLiveLLMService.Settings(model=MODEL)
        )
        for name, handler in functions.items():
            service.register_function(name, handler)
        return service

    return factory


def resilient(
    emulator: GeminiLiveEmulator, *, keepalive: bool = False, keepalive_timeout: float = UNIT, **kwargs: Any
) -> ResilientLLM:
    functions = kwargs.pop("functions", {})
    options: dict[str, Any] = {
        "retry": NO_WAIT,
        "first_token_timeout": FIRST_TOKEN_TIMEOUT,
        "stall_timeout": FIRST_TOKEN_TIMEOUT,
        # The emulator sends a continuation at once: it is checked when it ends,
        # well within this bound even on a loaded machine.
        "replay": HOLD,
    }
    options.update(kwargs)
    return ResilientLLM(
        make(emulator, keepalive=keepalive, keepalive_timeout=keepalive_timeout, **functions), **options
    )


def losses(llm: ResilientLLM) -> list[Failure]:
    lost: list[Failure] = []
    llm.add_event_handler("on_connection_lost", lambda _, failure: lost.append(failure))
    return lost


async def eventually(predicate: Any) -> None:
    """Wait until ``predicate()`` holds (for state nothing signals)."""
    async with asyncio.timeout(30 * UNIT):
        while not predicate():
            await asyncio.sleep(UNIT / 20)


async def wait_ready(llm: ResilientLLM) -> None:
    async with asyncio.timeout(30 * UNIT):
        while llm.service is None or not GeminiLive.is_ready(llm.service):
            await asyncio.sleep(UNIT / 20)


def heard_once(run: SessionScenario, text: str) -> None:
    """Every word of ``text`` heard in full exactly once, in order (cut fragments aside)."""
    assert run.listener.heard == words(text)


def context_is_heard(run: SessionScenario) -> None:
    """The assistant side of the context is what was heard."""
    assert " ".join(run.assistant_texts).split() == run.listener.heard


def users_said_once(emulator: GeminiLiveEmulator, *said: str) -> None:
    """No session's history holds a user turn the user did not say, or said once and held twice."""
    for index in range(len(emulator.connections)):
        turns = [text for role, text in emulator.history(index) if role == "user" and text.strip()]
        assert len(turns) == len(set(turns)) and set(turns) <= set(said), turns


async def test_resilient_llm_picks_the_realtime_shell() -> None:
    """A factory of Gemini Live services gets the speech-to-speech shell."""
    async with GeminiLiveEmulator() as emulator:
        assert isinstance(resilient(emulator), ResilientRealtimeLLM)


async def test_no_fault_conversation() -> None:
    """Without faults the session behaves as the stock one."""
    async with GeminiLiveEmulator(script={QUESTION: STORY}) as emulator:
        llm = resilient(emulator)
        async with SessionScenario(llm, emulator.samples_per_char()) as run:
            await run.start_conversation(QUESTION)
            await run.wait_until(lambda: run.listener.responses_ended == 1)
        heard_once(run, STORY)
        context_is_heard(run)
        assert len(emulator.connections) == 1
        assert run.errors == []


@pytest.mark.parametrize("how", ["continue", "restart", "repeat"])
@pytest.mark.parametrize("fault", CUTS, ids=CUT_IDS)
async def test_a_cut_reply_is_heard_once_whatever_the_model_does(fault: Fault, how: str) -> None:
    """Cut mid-reply: the model gets what was heard as its own turn; whatever it does, no word twice."""
    async with GeminiLiveEmulator(
        script={QUESTION: STORY},
        plan=FaultPlan(fault),
        continuation=how,  # type: ignore[arg-type]
    ) as emulator:
        llm = resilient(emulator)
        async with SessionScenario(llm, emulator.samples_per_char()) as run:
            await run.start_conversation(QUESTION)
            await run.wait_until(lambda: run.listener.responses_ended == 2)
        heard_once(run, STORY)
        context_is_heard(run)
        assert run.listener.kinds() == ["started", "response-start", "stopped", "response-end"] * 2
        # The resumed session lacks the question (its handle came before it) and
        # is given it again, then what was heard as the model's own turn.
        assert emulator.resumption_handle(1) == emulator.handles_issued(0)[-1]
        [content] = emulator.client_messages("client_content", 1)
        assert content["turns"][:2] == [
            {"parts": [{"text": QUESTION}], "role": "user"},
            {"parts": [{"text": "Once upon a"}], "role": "model"},
        ]
        assert content["turnComplete"] is True
        assert emulator.replies() == [STORY, GOES_ON[how]]
        users_said_once(emulator, QUESTION)
        assert run.errors == []


async def test_transcription_ahead_of_the_audio_is_not_taken_as_heard() -> None:
    """Transcription two chunks ahead: words it has before their audio are not lost, nor in the context."""
    plan = FaultPlan(CUTS[0])
    async with GeminiLiveEmulator(
        script={QUESTION: STORY}, plan=plan, transcription="before_audio"
    ) as emulator:
        llm = resilient(emulator)
        async with SessionScenario(llm, emulator.samples_per_char()) as run:
            await run.start_conversation(QUESTION)
            await run.wait_until(lambda: run.listener.responses_ended == 2)
        heard_once(run, STORY)
        context_is_heard(run)
        # "there was a" had been transcribed, not heard; and with no speech rate
        # known yet, no word of a transcription ahead of its audio counts as
        # heard before the reply ends. So the model is asked afresh, and its
        # answer's "Once upon a time" (heard) is dropped and handed to the context.
        [content] = emulator.client_messages("client_content", 1)
        assert content["turns"] == [{"parts": [{"text": QUESTION}], "role": "user"}]
        assert emulator.replies() == [STORY, STORY]


async def test_transcription_behind_the_audio_repeats_at_most_what_it_had_not_confirmed() -> None:
    """Transcription two chunks behind: nothing is lost; only words it never confirmed may come twice."""
    plan = FaultPlan(CUTS[0])
    async with GeminiLiveEmulator(
        script={QUESTION: STORY}, plan=plan, transcription="after_audio", continuation="restart"
    ) as emulator:
        llm = resilient(emulator)
        async with SessionScenario(llm, emulator.samples_per_char()) as run:
            await run.start_conversation(QUESTION)
            await run.wait_until(lambda: run.listener.responses_ended == 2)
        heard, story = run.listener.heard, words(STORY)
        # "Once upon a time" was heard before the cut, and only "Once" transcribed:
        # the restart's "Once" is dropped, "upon a time" comes again.
        assert heard == story[:4] + story[1:]
        assert " ".join(run.assistant_texts).split() == story


async def test_the_hold_is_what_keeps_a_restart_from_being_heard_twice() -> None:
    """With no hold (continuation_hold_s=0) a restart is played as it comes: the heard words come twice."""
    async with GeminiLiveEmulator(
        script={QUESTION: STORY}, plan=FaultPlan(CUTS[0]), continuation="restart"
    ) as emulator:
        llm = resilient(emulator, replay=ReplayPolicy(continuation_hold_s=0.0))
        async with SessionScenario(llm, emulator.samples_per_char()) as run:
            await run.start_conversation(QUESTION)
            await run.wait_until(lambda: run.listener.responses_ended == 2)
        assert run.listener.heard == words("Once upon a time") + words(STORY)
        assert run.listener.heard[-len(words(STORY)) :] == words(STORY)  # nothing lost


async def test_a_restart_behind_its_transcription_plays_once_it_said_all_that_was_transcribed() -> None:
    """Transcription two chunks behind its audio: decided at the last word the cut had transcribed.

    The second reply is cut after "Once upon a time the" was heard, "Once" alone
    transcribed; the model restarts. Its "Once" is dropped once its
    transcription came (after the audio of "a tim"), and "upon " plays then,
    before the next chunk of audio is even sent (not a piece later, a chunk of
    audio later still): the word after "Once" is past what the cut had
    transcribed, so it cannot change what is dropped.
    """
    greeting = "Hello there, how are you?"  # five chunks, heard whole: the speech rate
    plan = FaultPlan(Fault.close(1011, "Internal error encountered.", after_audio_chunks=5 + 4))
    async with GeminiLiveEmulator(
        script={"Hi.": greeting, QUESTION: STORY},
        plan=plan,
        transcription="after_audio",
        continuation="restart",
        realtime=True,
        ms_per_char=20.0,  # 100 ms between audio chunks
    ) as emulator:
        llm = resilient(emulator, stall_timeout=2.0, first_token_timeout=2.0)
        async with SessionScenario(llm, emulator.samples_per_char()) as run:
            listener = run.listener
            await run.start_conversation("Hi.")
            await run.wait_until(lambda: listener.responses_ended == 1, 10.0)
            run.context.add_message({"role": "user", "content": QUESTION})
            await run.send(InputTextRawFrame(QUESTION))
            await run.wait_until(lambda: len(emulator.connections) == 2, 10.0)
            before = listener.audio_frames
            sent_then: list[int] = []

            def first_audio_after_the_cut() -> bool:
                if listener.audio_frames > before and not sent_then:
                    sent_then.append(emulator.sent_kinds(1).count("modelTurn"))
                return bool(sent_then)

            await run.wait_until(first_audio_after_the_cut, 10.0)
            # The greeting, the cut reply (closed downstream), the restart.
            await run.wait_until(lambda: listener.responses_ended == 3, 20.0)
        # The restart's chunks "Once ", "upon ", "a tim" were sent; "e the" was not yet.
        assert sent_then == [3]
        heard = listener.heard
        # "Once" is dropped; "upon a time the", heard but never transcribed, comes again.
        assert heard == words(greeting) + words("Once upon a time") + words(STORY)[1:]
        assert run.errors == []


async def test_a_restart_late_past_the_hold_still_drops_the_words_confirmed_heard() -> None:
    """The hold ends before the transcription shows where a restart joins: what it confirmed still goes.

    The reply is cut after "Once upon a time the" was heard ("Once upon a tim"
    transcribed); the model restarts, one chunk of audio (and its
    transcription) every 200 ms, and the hold is 50 ms: it ends with only
    "Once " in. The session's speech rate (learnt from the greeting) places
    that word in the audio: it is dropped, not heard a second time because the
    next word was not in yet. (The words the hold did not wait for may come
    twice: that is what the bound costs.)
    """
    greeting, story = "Hi there.", "Once upon a time there was a socket."
    plan = FaultPlan(Fault.close(1011, "Internal error encountered.", after_audio_chunks=2 + 4))
    async with GeminiLiveEmulator(
        script={"Hi.": greeting, QUESTION: story},
        plan=plan,
        continuation="restart",
        realtime=True,
        ms_per_char=40.0,  # 200 ms between audio chunks: the hold ends well before the second
    ) as emulator:
        llm = resilient(emulator, replay=ReplayPolicy(continuation_hold_s=0.05))
        async with SessionScenario(llm, emulator.samples_per_char()) as run:
            listener = run.listener
            await run.start_conversation("Hi.")
            await run.wait_until(lambda: listener.responses_ended == 1, 10.0)
            run.context.add_message({"role": "user", "content": QUESTION})
            await run.send(InputTextRawFrame(QUESTION))
            # The greeting, the cut reply (closed downstream), the restart.
            await run.wait_until(lambda: listener.responses_ended == 3, 20.0)
        assert emulator.replies() == [greeting, story, story]
        assert listener.heard == words(greeting) + words("Once upon a time") + words(story)[1:]
        assert run.errors == []


async def test_a_fresh_session_is_given_the_conversation_as_soon_as_it_opens(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The session is seeded the moment it reports ready, not at the next readiness poll.

    The poll interval is made a second long: the reply goes on well before it.
    """
    monkeypatch.setattr("pipecat_resilient.realtime.READY_POLL_S", 1.0)
    async with GeminiLiveEmulator(
        script={QUESTION: STORY}, plan=FaultPlan(CUTS[0]), realtime=True, ms_per_char=2.0
    ) as emulator:
        async with SessionScenario(resilient(emulator), emulator.samples_per_char()) as run:
            await run.start_conversation(QUESTION)
            await run.wait_until(lambda: run.listener.responses_ended == 2)
        heard_once(run, STORY)
        assert len(emulator.connections) == 2
        arrivals = [at for at, _ in run.listener.audio_times]
        gap = max(later - earlier for earlier, later in zip(arrivals, arrivals[1:], strict=False))
        assert gap < 0.5
        assert run.errors == []


async def test_the_next_instance_is_built_once_the_fresh_session_took_the_conversation() -> None:
    """The spare instance is not built while the fresh session connects.

    Built in a worker thread, a stock service's constructor still holds the
    GIL for tens of milliseconds: it would slow the handshake and the seed, on
    the event loop, by as much. It is built once the fresh session was seeded.
    """
    async with GeminiLiveEmulator(script={QUESTION: STORY}, plan=FaultPlan(CUTS[0])) as emulator:
        build = make(emulator)
        # At each build: the connections so far, and what the newest had been sent.
        seen: list[tuple[int, list[str]]] = []

        def factory() -> GeminiLiveLLMService:
            records = emulator.connections
            seen.append((len(records), [next(iter(m)) for m in records[-1].messages] if records else []))
            return build()

        llm = ResilientLLM(factory, retry=NO_WAIT, first_token_timeout=FIRST_TOKEN_TIMEOUT, replay=HOLD)
        async with SessionScenario(llm, emulator.samples_per_char()) as run:
            built = len(seen)
            await run.start_conversation(QUESTION)
            await run.wait_until(lambda: run.listener.responses_ended == 2)
            await eventually(lambda: len(seen) > built)
        heard_once(run, STORY)
        assert len(emulator.connections) == 2
        # The one build after the cut came once the fresh session (connection 1)
        # had been given the conversation.
        [(connections, sent)] = seen[built:]
        assert connections == 2 and sent[:2] == ["setup", "client_content"], seen
        assert run.errors == []


async def test_end_frame_does_not_wait_on_a_cut_reply() -> None:
    """The stock service defers an EndFrame 30 s behind a cut reply; here the pipeline ends at once."""
    async with GeminiLiveEmulator(script={QUESTION: STORY}, plan=FaultPlan(CUTS[0])) as emulator:
        llm = resilient(emulator)
        run = SessionScenario(llm, emulator.samples_per_char())
        await run.__aenter__()
        await run.start_conversation(QUESTION)
        await run.wait_until(lambda: run.listener.responses_ended >= 1)
        started = time.monotonic()
        await run.send(EndFrame())
        assert run._task is not None
        await asyncio.wait_for(run._task, 100 * UNIT)
        assert time.monotonic() - started < 5.0
        assert run.errors == []


async def test_drop_before_the_reply_is_answered_on_the_fresh_session() -> None:
    """The user's turn went in, the session dropped before any reply: the answer still comes."""
    plan = FaultPlan(Fault.close(1011, "Internal error encountered.", after_text_messages=1))
    async with GeminiLiveEmulator(script={QUESTION: STORY}, plan=plan) as emulator:
        llm = resilient(emulator)
        async with SessionScenario(llm, emulator.samples_per_char()) as run:
            await run.start_conversation(QUESTION)
            await run.wait_until(lambda: run.listener.responses_ended == 1)
        heard_once(run, STORY)
        context_is_heard(run)
        assert run.listener.kinds() == ["started", "response-start", "stopped", "response-end"]
        users_said_once(emulator, QUESTION)
        assert run.errors == []


async def test_refused_resumption_seeds_the_conversation_as_heard_with_the_models_own_turn() -> None:
    """The handle is refused: a fresh session gets the question, and what was heard as the model's turn."""
    plan = FaultPlan(CUTS[0])
    async with GeminiLiveEmulator(
        script={QUESTION: STORY}, plan=plan, refuse_resumption=True, continuation="restart"
    ) as emulator:
        llm = resilient(emulator)
        async with SessionScenario(llm, emulator.samples_per_char()) as run:
            await run.start_conversation(QUESTION)
            await run.wait_until(lambda: run.listener.responses_ended == 2)
        heard_once(run, STORY)
        context_is_heard(run)
        assert emulator.resumption_handle(1) is not None  # offered, refused
        assert emulator.resumption_handle(2) is None  # seeded instead
        [seed] = emulator.client_messages("client_content", 2)
        assert seed["turns"] == [
            {"parts": [{"text": QUESTION}], "role": "user"},
            {"parts": [{"text": "Once upon a"}], "role": "model"},
            {"parts": [{"text": " "}], "role": "user"},  # Gemini 2.5's padding, as the stock pads
        ]
        assert seed["turnComplete"] is True
        # The one instruction there is goes where instructions belong.
        setup = emulator.setup(2)
        assert setup is not None
        assert SESSION_CONTINUE_INSTRUCTION in str(setup.get("systemInstruction"))
        assert SESSION_CONTINUE_INSTRUCTION not in str(emulator.setup(0))
        users_said_once(emulator, QUESTION)
        assert run.errors == []


async def test_drop_on_the_replacement_continues_from_all_that_was_heard() -> None:
    """Cut again during the continuation, after some of it was heard: the next one goes on after all of it.

    A whole reply first teaches the session its speech rate, so the
    continuation is placed at once, not at its end.
    """
    hello = "Hi there, how can I help?"  # five chunks
    plan = FaultPlan(
        Fault.close(1011, after_audio_chunks=5 + 4),  # four chunks into the story
        Fault.close(1011, after_audio_chunks=7, connection=1),  # the restart's first 17 characters are heard
    )
    script = {"Hello.": hello, QUESTION: STORY}
    async with GeminiLiveEmulator(script=script, plan=plan, continuation="restart") as emulator:
        llm = resilient(emulator)
        async with SessionScenario(llm, emulator.samples_per_char()) as run:
            await run.start_conversation("Hello.")
            await run.wait_until(lambda: run.listener.responses_ended == 1)
            await run.send(InputTextRawFrame(QUESTION))
            await run.wait_until(lambda: run.listener.responses_ended == 4)
        heard_once(run, f"{hello} {STORY}")
        # (Pipecat's aggregator puts the user's InputTextRawFrame into the assistant's message.)
        assert " ".join(run.assistant_texts[1:]).split() == words(f"{QUESTION} {STORY}")
        assert len(emulator.connections) == 3
        assert emulator.replies() == [hello, STORY, STORY, STORY]
        users_said_once(emulator, "Hello.", QUESTION)
        assert run.errors == []


async def test_tool_result_of_a_dropped_session_is_delivered_once_with_its_name() -> None:
    """The session drops while a function runs: it runs once, and its result reaches the fresh session."""
    release = asyncio.Event()
    started = asyncio.Event()
    calls: list[tuple[str, dict[str, Any]]] = []

    async def get_weather(params: FunctionCallParams) -> None:
        calls.append((params.tool_call_id, dict(params.arguments)))
        started.set()
        await release.wait()
        await params.result_callback({"conditions": "sunny"})

    reply = "It is sunny in Paris today."
    script = {"What is the weather?": ToolCall("get_weather", {"city": "Paris"}, reply=reply)}
    async with GeminiLiveEmulator(script=script, bundle_transcription=True) as emulator:
        llm = resilient(emulator, functions={"get_weather": get_weather})
        context = LLMContext(tools=WEATHER_TOOLS)
        async with SessionScenario(llm, emulator.samples_per_char(), context=context) as run:
            await run.start_conversation("What is the weather?")
            await asyncio.wait_for(started.wait(), 30 * UNIT)
            await emulator.inject(Fault.close(1011, "Internal error encountered."))
            await emulator.wait_for_connections(2)
            await wait_ready(llm)
            release.set()
            await run.wait_until(lambda: run.listener.responses_ended == 1)
        assert calls == [("function-call-1", {"city": "Paris"})]
        [response] = emulator.function_responses()
        assert response["id"] == "function-call-1" and response["name"] == "get_weather"
        heard_once(run, reply)
        assert run.errors == []


async def test_input_during_recovery_is_delivered_and_answered() -> None:
    """What the user says while no session can take it is kept and answered by the fresh one."""
    plan = FaultPlan(CUTS[0], Fault.refuse(503, connection=1))
    retry = RetryPolicy(attempts=3, wait_initial=5 * UNIT, wait_max=5 * UNIT, jitter=False)
    async with GeminiLiveEmulator(script={QUESTION: STORY}, plan=plan) as emulator:
        llm = resilient(emulator, retry=retry)
        async with SessionScenario(llm, emulator.samples_per_char()) as run:
            await run.start_conversation(QUESTION)
            await emulator.wait_for_connections(2)  # refused; the next attempt waits 0.5 s
            assert llm.state is State.RECOVERING
            await run.send(InputTextRawFrame("What time is it?"))
            await run.wait_until(lambda: run.listener.heard[-1:] == ["it."])
        assert emulator.user_texts()[-1] == "What time is it?"
        # The user moved on: their question is answered, the old story is not resumed.
        assert run.listener.heard == words("Once upon a time You said: What time is it.")
        [content] = emulator.client_messages("client_content", 2)
        assert content["turnComplete"] is False  # the conversation as heard, not to be continued
        users_said_once(emulator, QUESTION, "What time is it?")
        assert run.errors == []


async def test_silence_from_the_microphone_during_recovery_does_not_stop_the_reply_going_on() -> None:
    """A transport streams silence while the session is down: not the user speaking; the reply goes on."""
    plan = FaultPlan(CUTS[0], Fault.refuse(503, connection=1))
    retry = RetryPolicy(attempts=3, wait_initial=5 * UNIT, wait_max=5 * UNIT, jitter=False)
    async with GeminiLiveEmulator(script={QUESTION: STORY}, plan=plan) as emulator:
        llm = resilient(emulator, retry=retry)
        async with SessionScenario(llm, emulator.samples_per_char()) as run:
            await run.start_conversation(QUESTION)
            await emulator.wait_for_connections(2)
            assert llm.state is State.RECOVERING
            for _ in range(10):  # 200 ms of silence, 20 ms a frame
                await run.send(InputAudioRawFrame(bytes(640), 16000, 1))
            await run.wait_until(lambda: run.listener.responses_ended == 2)
        heard_once(run, STORY)
        context_is_heard(run)
        assert len([m for m in emulator.client_messages("realtime_input", 2) if "audio" in m]) == 10
        assert run.errors == []


async def test_audio_over_the_buffer_bound_is_dropped_oldest_first_and_said() -> None:
    """Audio beyond max_buffered_input_s is dropped oldest first, and a warning says how much."""
    plan = FaultPlan(CUTS[0], Fault.refuse(503, connection=1))
    retry = RetryPolicy(attempts=3, wait_initial=5 * UNIT, wait_max=5 * UNIT, jitter=False)
    warnings: list[str] = []
    sink = logger.add(lambda message: warnings.append(str(message)), level="WARNING")
    try:
        async with GeminiLiveEmulator(script={QUESTION: STORY}, plan=plan) as emulator:
            llm = resilient(
                emulator, retry=retry, replay=ReplayPolicy(max_buffered_input_s=0.05, continuation_hold_s=3.0)
            )
            async with SessionScenario(llm, emulator.samples_per_char()) as run:
                await run.start_conversation(QUESTION)
                await emulator.wait_for_connections(2)  # refused; the next attempt waits
                assert llm.state is State.RECOVERING
                # Silence of 20, 20, 20, 10 and 30 ms: only the newest 40 ms fit in 50 ms.
                for ms in (20, 20, 20, 10, 30):
                    await run.send(InputAudioRawFrame(bytes(32 * ms), 16000, 1))
                await run.send(InputTextRawFrame("What time is it?"))
                await run.wait_until(lambda: run.listener.heard[-1:] == ["it."])
        audio = [m for m in emulator.client_messages("realtime_input", -1) if "audio" in m]
        assert [len(base64.b64decode(m["audio"]["data"])) for m in audio] == [320, 960]
    finally:
        logger.remove(sink)
    assert any("dropped the oldest 0.1s of user audio" in line for line in warnings)


async def test_interruption_during_recovery_means_no_answer_again() -> None:
    """The user interrupts while the session is down: the cut reply is not resumed, only recorded as heard."""
    plan = FaultPlan(CUTS[0], Fault.refuse(503, connection=1))
    retry = RetryPolicy(attempts=3, wait_initial=5 * UNIT, wait_max=5 * UNIT, jitter=False)
    async with GeminiLiveEmulator(script={QUESTION: STORY}, plan=plan) as emulator:
        llm = resilient(emulator, retry=retry)
        recovered = asyncio.Event()
        llm.add_event_handler("on_connection_recovered", lambda *_: recovered.set())
        async with SessionScenario(llm, emulator.samples_per_char()) as run:
            await run.start_conversation(QUESTION)
            await emulator.wait_for_connections(2)
            await run.send(InterruptionFrame())
            await asyncio.wait_for(recovered.wait(), 30 * UNIT)
            await emulator.wait_until(lambda: len(emulator.client_messages("client_content", 2)) == 1)
        [content] = emulator.client_messages("client_content", 2)
        assert content["turns"][:2] == [
            {"parts": [{"text": QUESTION}], "role": "user"},
            {"parts": [{"text": "Once upon a"}], "role": "model"},
        ]
        assert content["turnComplete"] is False
        assert emulator.replies() == [STORY]
        assert "socket" not in run.listener.heard
        assert run.errors == []


async def test_go_away_hands_over_at_a_turn_boundary_without_a_gap() -> None:
    """On GoAway the session moves to a resumed one after the reply, before the server closes."""
    plan = FaultPlan(Fault.go_away(20 * UNIT, after_text_messages=1))
    async with GeminiLiveEmulator(plan=plan) as emulator:
        llm = resilient(emulator)
        lost = losses(llm)
        async with SessionScenario(llm, emulator.samples_per_char()) as run:
            await run.start_conversation("Hello.")
            await run.wait_until(lambda: run.listener.responses_ended == 1)
            await eventually(lambda: emulator.connections[0].closed)
            await wait_ready(llm)
            await run.send(InputTextRawFrame("Still there?"))
            await run.wait_until(lambda: run.listener.responses_ended == 2)
        assert lost == []
        assert emulator.user_texts(-1) == ["Still there?"]
        assert emulator.resumption_handle(-1) == emulator.handles_issued(0)[-1]
        # The old session was left before the server would have closed it.
        go_away_at = emulator.go_away_sent_at(0)
        assert go_away_at is not None and emulator.connections[1].opened_at - go_away_at < 20 * UNIT
        heard_once(run, "You said: Hello. You said: Still there.")
        assert run.errors == []


async def test_same_1007_twice_is_poison_and_reported_once_with_its_trace_id() -> None:
    """The same 1007 comes back on the fresh session: one ErrorFrame naming the trace id, no loop."""
    reason = "Request contains an invalid argument. trace_id: 7f3a9c21e"
    plan = FaultPlan(*[Fault.close(1007, reason, after_text_messages=1, connection=i) for i in range(6)])
    async with GeminiLiveEmulator(plan=plan) as emulator:
        llm = resilient(emulator)
        async with SessionScenario(llm, emulator.samples_per_char()) as run:
            await run.start_conversation(QUESTION)
            await run.recorder.wait_until(lambda: len(run.errors) >= 1, 30 * UNIT)
        [error] = run.errors
        assert "poison" in error.error and "7f3a9c21e" in error.error
        assert not llm.is_usable
        assert len(emulator.connections) == 2


# -- silence is a failure ---------------------------------------------------------


async def test_a_reply_with_no_audio_is_asked_again_on_the_same_session() -> None:
    """A reply that comes as transcription only is not heard: the same session is asked again, at once."""
    async with GeminiLiveEmulator(silent_replies={0}) as emulator:
        llm = resilient(emulator)
        lost = losses(llm)
        async with SessionScenario(llm, emulator.samples_per_char()) as run:
            asked_at = time.monotonic()
            await run.start_conversation("Hello.")
            await run.wait_until(lambda: run.listener.responses_ended == 1)
        heard_once(run, "You said: Hello.")
        context_is_heard(run)  # the silent reply's words never reached it
        assert run.listener.kinds() == ["started", "response-start", "stopped", "response-end"]
        assert run.listener.first_audio_at is not None
        assert run.listener.first_audio_at - asked_at < FIRST_TOKEN_TIMEOUT
        assert len(emulator.connections) == 1 and lost == []
        assert emulator.replies() == ["You said: Hello.", "You said: Hello."]
        # Asked with the model's own (empty) turn, not with a user message.
        assert emulator.client_messages("client_content", 0)[-1]["turns"][0] == {
            "parts": [{"text": " "}],
            "role": "model",
        }
        users_said_once(emulator, "Hello.")
        assert run.errors == []


async def test_a_model_that_never_voices_its_replies_is_given_up_on_once() -> None:
    """Every reply silent: asked again, then fresh sessions, then one ErrorFrame; nothing in the context."""
    async with GeminiLiveEmulator(script={"Hello.": Silent("Can you hear me?")}) as emulator:
        llm = resilient(emulator)
        async with SessionScenario(llm, emulator.samples_per_char()) as run:
            await run.start_conversation("Hello.")
            await run.recorder.wait_until(lambda: len(run.errors) >= 1, 50 * UNIT)
        [error] = run.errors
        assert "no audio" in error.error
        assert not llm.is_usable
        assert run.listener.heard == [] and run.assistant_texts == []
        assert run.listener.kinds() == []
        assert len(emulator.connections) == 1 + NO_WAIT.attempts


async def test_a_session_that_stops_answering_is_recovered_within_a_timeout_and_a_handshake() -> None:
    """A muted session (socket open, pings answered) leaves a turn unanswered: a fresh session answers it."""
    async with GeminiLiveEmulator(mute_after_replies={0: 1}) as emulator:
        llm = resilient(emulator)
        lost = losses(llm)
        async with SessionScenario(llm, emulator.samples_per_char()) as run:
            await run.start_conversation("Hello.")
            await run.wait_until(lambda: run.listener.responses_ended == 1)
            await wait_ready(llm)
            audio_before = run.listener.audio_frames
            asked_at = time.monotonic()
            await run.send(InputTextRawFrame("Are you there?"))
            await run.wait_until(lambda: run.listener.responses_ended == 2, 30 * UNIT)
        answered_at = next(at for at, _ in run.listener.audio_times[audio_before:])
        handshake = emulator.connections[1].opened_at - (asked_at + FIRST_TOKEN_TIMEOUT)
        assert answered_at - asked_at < FIRST_TOKEN_TIMEOUT + max(handshake, 0) + 3 * UNIT
        [failure] = lost
        assert "no reply within" in failure.description
        heard_once(run, "You said: Hello. You said: Are you there.")
        assert run.assistant_texts[-1].endswith("You said: Are you there.")
        users_said_once(emulator, "Hello.", "Are you there?")
        assert run.errors == []


async def test_a_spoken_turn_a_session_never_took_in_is_said_again_to_the_fresh_one() -> None:
    """The user speaks to a session that stopped answering: the audio goes to the fresh one, answered."""
    async with GeminiLiveEmulator(mute_after_replies={0: 1}) as emulator:
        llm = resilient(emulator)
        async with SessionScenario(llm, emulator.samples_per_char()) as run:
            await run.start_conversation("Hello.")
            await run.wait_until(lambda: run.listener.responses_ended == 1)
            await wait_ready(llm)
            asked_at = time.monotonic()
            await run.send(UserStartedSpeakingFrame())
            await run.speak("Are you there?")
            await run.send(UserStoppedSpeakingFrame())
            await run.wait_until(lambda: run.listener.responses_ended == 2, 30 * UNIT)
        # Answered after the first-token timeout found the session mute, not after a
        # stall timeout or a give-up (a loaded CI run took 1.21 s against 1.0).
        assert run.listener.audio_times[-1][0] - asked_at < FIRST_TOKEN_TIMEOUT + 15 * UNIT
        heard_once(run, "You said: Hello. You said: Are you there.")
        # Heard (and never answered) by the mute session, said again to the resumed one.
        assert emulator.connections[0].texts[-1] == ("audio", "Are you there?")
        assert emulator.connections[1].texts == [("audio", "Are you there?")]
        assert run.errors == []


async def test_a_reply_that_goes_quiet_mid_turn_is_continued_on_a_fresh_session() -> None:
    """A reply stops after three chunks, socket open: after stall_timeout a fresh session goes on with it."""
    async with GeminiLiveEmulator(script={QUESTION: STORY}, quiet_replies={0: 3}) as emulator:
        llm = resilient(emulator)
        lost = losses(llm)
        async with SessionScenario(llm, emulator.samples_per_char()) as run:
            await run.start_conversation(QUESTION)
            await run.wait_until(lambda: run.listener.responses_ended == 2, 30 * UNIT)
        heard_once(run, STORY)
        context_is_heard(run)
        [failure] = lost
        assert "stalled" in failure.description
        assert len(emulator.connections) == 2
        assert run.errors == []


@pytest.mark.parametrize(
    ("fault", "pong_timeout", "says", "category"),
    [
        (
            Fault.close(1011, "Internal error encountered.", after_audio_chunks=4),
            # Pings every UNIT all along, but a pong late on a loaded machine
            # must not end the session before the server's close does.
            30 * UNIT,
            "sent by the server",
            "server",
        ),
        (Fault.stall(after_audio_chunks=4), UNIT, "no pong to our keepalive ping", "connectivity"),
    ],
    ids=["server-1011", "keepalive"],
)
async def test_a_server_1011_is_told_from_our_keepalive_timing_out(
    fault: Fault, pong_timeout: float, says: str, category: str
) -> None:
    """The Failure says whether the server closed with 1011 or our keepalive gave up (an event-loop stall)."""
    async with GeminiLiveEmulator(script={QUESTION: STORY}, plan=FaultPlan(fault)) as emulator:
        # The reply stall timeout is long: the keepalive sees the stall first.
        llm = resilient(emulator, keepalive=True, keepalive_timeout=pong_timeout, stall_timeout=100 * UNIT)
        lost = losses(llm)
        async with SessionScenario(llm, emulator.samples_per_char()) as run:
            await run.start_conversation(QUESTION)
            await run.wait_until(lambda: run.listener.responses_ended == 2, 50 * UNIT)
        [failure] = lost
        assert says in failure.description and failure.category == category
        heard_once(run, STORY)


async def test_a_close_from_the_server_is_acted_on_from_its_frame() -> None:
    """The server's close frame ends the session at once; the end of the closing handshake is not waited for.

    The emulator sends its close frame and reads no more: google-genai would
    raise only when the client's close timeout ends the wait, and the reply
    stall timeout (0.5 s here) would catch the silence first.
    """
    plan = FaultPlan(Fault.close(1011, "Internal error encountered.", after_audio_chunks=4, linger=True))
    async with GeminiLiveEmulator(script={QUESTION: STORY}, plan=plan) as emulator:
        llm = resilient(emulator)
        lost = losses(llm)
        async with SessionScenario(llm, emulator.samples_per_char()) as run:
            await run.start_conversation(QUESTION)
            await run.wait_until(lambda: run.listener.responses_ended == 2, 50 * UNIT)
        [failure] = lost
        assert failure.code == 1011 and "sent by the server" in failure.description
        heard_once(run, STORY)
        context_is_heard(run)


def test_bad_replay_policy_for_sessions() -> None:
    """Invalid session settings fail at construction."""
    with pytest.raises(ValueError, match="max_buffered_input_s"):
        ReplayPolicy(max_buffered_input_s=-1)
    with pytest.raises(ValueError, match="continuation_hold_s"):
        ReplayPolicy(continuation_hold_s=-0.1)
    with pytest.raises(ValueError, match="max_session_s"):
        ReplayPolicy(max_session_s=0)
    with pytest.raises(ValueError, match="session_instruction"):
        ReplayPolicy(session_instruction=" ")
    assert ReplayPolicy(max_session_s=None, session_instruction=None).max_session_s is None


def test_a_standby_session_is_refused_at_construction() -> None:
    """A spare session would hold the conversation it was opened with: ``standby=True`` is refused."""

    def factory() -> GeminiLiveLLMService:
        return GeminiLiveLLMService(api_key="k", settings=GeminiLiveLLMService.Settings(model=MODEL))

    with pytest.raises(ValueError, match="standby=True is not supported for LLMs"):
        ResilientLLM(factory, standby=True)
