"""ResilientLLM around the stock GeminiLiveLLMService, against the Gemini Live emulator over TLS.

Each test asserts on what a listener where the transport would be heard
(decoded from the audio), what the context received, what the emulator got
(setups, resumption handles, tool responses), and what went upstream.
"""

from __future__ import annotations

import asyncio
import base64
import time

import pytest
from loguru import logger
from pipecat.adapters.llm.schemas.function_schema import FunctionSchema
from pipecat.adapters.llm.schemas.tools_schema import ToolsSchema
from pipecat.frames.frames import EndFrame, InputAudioRawFrame, InputTextRawFrame, InterruptionFrame
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.services.google.gemini_live.llm import GeminiLiveLLMService
from pipecat.services.llm_service import FunctionCallParams

from pipecat_resilient import ReplayPolicy, ResilientLLM, RetryPolicy, State, _gemini
from pipecat_resilient.realtime import ResilientRealtimeLLM
from pipecat_resilient.testing import Fault, FaultPlan, GeminiLiveEmulator, SessionScenario, ToolCall
from pipecat_resilient.testing.gemini_live import LAST_CHUNK_BEFORE_TURN_COMPLETE

from .conftest import UNIT
from .test_emulator_gemini_live import MODEL, words

STORY = "Once upon a time there was a socket that never closed and a bot that never stopped talking."
NO_WAIT = RetryPolicy(attempts=4, wait_initial=0.0, wait_max=0.0)
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


def make(emulator: GeminiLiveEmulator, **kwargs: object):
    def factory() -> GeminiLiveLLMService:
        service = GeminiLiveLLMService(
            api_key="test-key",
            http_options=emulator.http_options(),
            settings=GeminiLiveLLMService.Settings(model=MODEL),
        )
        for name, handler in kwargs.items():
            service.register_function(name, handler)
        return service

    return factory


def resilient(emulator: GeminiLiveEmulator, **kwargs: object) -> ResilientLLM:
    functions = kwargs.pop("functions", {})
    options: dict[str, object] = {"retry": NO_WAIT, "first_token_timeout": 1.0, "stall_timeout": 1.0}
    options.update(kwargs)
    return ResilientLLM(make(emulator, **functions), **options)  # type: ignore[arg-type]


async def wait_ready(llm: ResilientLLM) -> None:
    async with asyncio.timeout(30 * UNIT):
        while llm.service is None or not _gemini.is_ready(llm.service):
            await asyncio.sleep(UNIT / 20)


def heard_once(run: SessionScenario, text: str) -> None:
    """Every word of ``text`` heard in full exactly once, in order (cut fragments aside)."""
    assert run.listener.heard == words(text)


def context_is_heard(run: SessionScenario) -> None:
    """The assistant side of the context is what was heard."""
    assert " ".join(run.assistant_texts).split() == run.listener.heard


async def test_resilient_llm_picks_the_realtime_shell() -> None:
    """A factory of Gemini Live services gets the speech-to-speech shell."""
    async with GeminiLiveEmulator() as emulator:
        assert isinstance(resilient(emulator), ResilientRealtimeLLM)


async def test_no_fault_conversation() -> None:
    """Without faults the session behaves as the stock one."""
    script = {"Tell me a story.": STORY}
    async with GeminiLiveEmulator(script=script) as emulator:
        llm = resilient(emulator)
        async with SessionScenario(llm, emulator.samples_per_char()) as run:
            await run.start_conversation("Tell me a story.")
            await run.wait_until(lambda: run.listener.responses_ended == 1)
        heard_once(run, STORY)
        context_is_heard(run)
        assert len(emulator.connections) == 1
        assert run.errors == []


@pytest.mark.parametrize(
    "fault",
    [
        Fault.close(1011, "Internal error encountered.", after_audio_chunks=4),
        Fault.close(1007, LAST_CHUNK_BEFORE_TURN_COMPLETE, after_audio_chunks=4),
        Fault.abort(after_audio_chunks=4),
        Fault.stall(after_audio_chunks=4),
    ],
    ids=["1011", "1007", "abort", "stall"],
)
async def test_drop_mid_reply_closes_it_resumes_and_answers_the_rest(fault: Fault) -> None:
    """Cut mid-reply: the reply is closed downstream, the session resumed, the rest said once."""
    script = {"Tell me a story.": STORY}
    async with GeminiLiveEmulator(
        script=script, plan=FaultPlan(fault), bundle_transcription=True
    ) as emulator:
        llm = resilient(emulator)
        async with SessionScenario(llm, emulator.samples_per_char()) as run:
            await run.start_conversation("Tell me a story.")
            await run.wait_until(lambda: run.listener.heard[-1:] == words(STORY)[-1:])
            await run.wait_until(lambda: run.listener.responses_ended == 2)
        heard_once(run, STORY)
        context_is_heard(run)
        assert run.listener.kinds() == ["started", "response-start", "stopped", "response-end"] * 2
        assert emulator.resumption_handle(1) == emulator.handles_issued(0)[-1]
        assert run.errors == []


async def test_end_frame_does_not_wait_on_a_cut_reply() -> None:
    """The stock service defers an EndFrame 30 s behind a cut reply; here the pipeline ends at once."""
    script = {"Tell me a story.": STORY}
    plan = FaultPlan(Fault.close(1011, after_audio_chunks=4), Fault.refuse(503, connection=None))
    plan = FaultPlan(Fault.close(1011, after_audio_chunks=4))
    async with GeminiLiveEmulator(script=script, plan=plan) as emulator:
        llm = resilient(emulator)
        run = SessionScenario(llm, emulator.samples_per_char())
        await run.__aenter__()
        await run.start_conversation("Tell me a story.")
        await run.wait_until(lambda: run.listener.responses_ended >= 1)
        started = time.monotonic()
        await run.send(EndFrame())
        assert run._task is not None
        await asyncio.wait_for(run._task, 10 * UNIT * 10)
        assert time.monotonic() - started < 5.0
        assert run.errors == []


async def test_drop_before_the_reply_is_answered_on_the_fresh_session() -> None:
    """The user's turn went in, the session dropped before any reply: the answer still comes."""
    script = {"Tell me a story.": STORY}
    plan = FaultPlan(Fault.close(1011, "Internal error encountered.", after_text_messages=1))
    async with GeminiLiveEmulator(script=script, plan=plan, bundle_transcription=True) as emulator:
        llm = resilient(emulator)
        async with SessionScenario(llm, emulator.samples_per_char()) as run:
            await run.start_conversation("Tell me a story.")
            await run.wait_until(lambda: run.listener.responses_ended == 1)
        heard_once(run, STORY)
        context_is_heard(run)
        assert run.listener.kinds() == ["started", "response-start", "stopped", "response-end"]
        assert run.errors == []


async def test_refused_resumption_reseeds_the_conversation_as_heard() -> None:
    """The server refuses the handle: a fresh session is seeded with what was said and heard."""
    script = {"Tell me a story.": STORY}
    plan = FaultPlan(Fault.close(1011, after_audio_chunks=4))
    async with GeminiLiveEmulator(
        script=script, plan=plan, bundle_transcription=True, refuse_resumption=True
    ) as emulator:
        llm = resilient(emulator)
        async with SessionScenario(llm, emulator.samples_per_char()) as run:
            await run.start_conversation("Tell me a story.")
            await run.wait_until(lambda: run.listener.responses_ended == 2)
        heard_once(run, STORY)
        context_is_heard(run)
        assert emulator.resumption_handle(1) is not None  # offered, refused
        assert emulator.resumption_handle(2) is None  # seeded instead
        [seed] = emulator.client_messages("client_content", 2)
        seeded = [part["text"] for turn in seed["turns"] for part in turn["parts"]]
        assert seeded[0] == "Tell me a story."
        assert seeded[1] == " ".join(run.assistant_texts[0].split())  # only what was heard
        assert "heard only" in seeded[-1]
        assert run.errors == []


async def test_drop_on_the_replacement_continues_from_all_that_was_heard() -> None:
    """Cut again during the continuation: the next session continues after everything heard."""
    script = {"Tell me a story.": STORY}
    plan = FaultPlan(
        Fault.close(1011, after_audio_chunks=4), Fault.close(1011, after_audio_chunks=3, connection=1)
    )
    async with GeminiLiveEmulator(script=script, plan=plan, bundle_transcription=True) as emulator:
        llm = resilient(emulator)
        async with SessionScenario(llm, emulator.samples_per_char()) as run:
            await run.start_conversation("Tell me a story.")
            await run.wait_until(lambda: run.listener.responses_ended == 3)
        heard_once(run, STORY)
        context_is_heard(run)
        assert len(emulator.connections) == 3
        assert run.errors == []


async def test_tool_result_of_a_dropped_session_is_delivered_once_with_its_name() -> None:
    """The session drops while a function runs: it runs once, and its result reaches the fresh session."""
    release = asyncio.Event()
    started = asyncio.Event()
    calls: list[tuple[str, dict]] = []

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
    script = {"Tell me a story.": STORY}
    plan = FaultPlan(Fault.close(1011, after_audio_chunks=4), Fault.refuse(503, connection=1))
    retry = RetryPolicy(attempts=3, wait_initial=5 * UNIT, wait_max=5 * UNIT, jitter=False)
    async with GeminiLiveEmulator(script=script, plan=plan, bundle_transcription=True) as emulator:
        llm = resilient(emulator, retry=retry)
        async with SessionScenario(llm, emulator.samples_per_char()) as run:
            await run.start_conversation("Tell me a story.")
            await emulator.wait_for_connections(2)  # refused; the next attempt waits 0.5 s
            assert llm.state is State.RECOVERING
            await run.send(InputTextRawFrame("What time is it?"))
            await run.wait_until(lambda: run.listener.heard[-1:] == ["it."])
        assert emulator.user_texts()[-1] == "What time is it?"
        # The user moved on: their question is answered, the old story is not resumed.
        assert run.listener.heard[-len(words("You said: What time is it.")) :] == words(
            "You said: What time is it."
        )
        assert "socket" not in run.listener.heard
        assert run.errors == []


async def test_audio_over_the_buffer_bound_is_dropped_oldest_first_and_said() -> None:
    """Audio beyond max_buffered_input_s is dropped oldest first, and a warning says how much."""
    script = {"Tell me a story.": STORY}
    plan = FaultPlan(Fault.close(1011, after_audio_chunks=4), Fault.refuse(503, connection=1))
    retry = RetryPolicy(attempts=3, wait_initial=5 * UNIT, wait_max=5 * UNIT, jitter=False)
    warnings: list[str] = []
    sink = logger.add(lambda message: warnings.append(str(message)), level="WARNING")
    try:
        async with GeminiLiveEmulator(script=script, plan=plan, bundle_transcription=True) as emulator:
            llm = resilient(emulator, retry=retry, replay=ReplayPolicy(max_buffered_input_s=0.05))
            async with SessionScenario(llm, emulator.samples_per_char()) as run:
                await run.start_conversation("Tell me a story.")
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
    """The user interrupts while the session is down: the cut reply is not resumed."""
    script = {"Tell me a story.": STORY}
    plan = FaultPlan(Fault.close(1011, after_audio_chunks=4), Fault.refuse(503, connection=1))
    retry = RetryPolicy(attempts=3, wait_initial=5 * UNIT, wait_max=5 * UNIT, jitter=False)
    async with GeminiLiveEmulator(script=script, plan=plan, bundle_transcription=True) as emulator:
        llm = resilient(emulator, retry=retry)
        recovered = asyncio.Event()
        llm.add_event_handler("on_connection_recovered", lambda *_: recovered.set())
        async with SessionScenario(llm, emulator.samples_per_char()) as run:
            await run.start_conversation("Tell me a story.")
            await emulator.wait_for_connections(2)
            await run.send(InterruptionFrame())
            await asyncio.wait_for(recovered.wait(), 30 * UNIT)
        assert emulator.client_messages("client_content", 2) == []
        assert "socket" not in run.listener.heard
        assert run.errors == []


async def test_go_away_hands_over_at_a_turn_boundary_without_a_gap() -> None:
    """On GoAway the session moves to a resumed one after the reply, before the server closes."""
    plan = FaultPlan(Fault.go_away(20 * UNIT, after_text_messages=1))
    async with GeminiLiveEmulator(plan=plan, bundle_transcription=True) as emulator:
        llm = resilient(emulator)
        lost = []
        llm.add_event_handler("on_connection_lost", lambda _, failure: lost.append(failure))
        async with SessionScenario(llm, emulator.samples_per_char()) as run:
            await run.start_conversation("Hello.")
            await run.wait_until(lambda: run.listener.responses_ended == 1)
            await emulator.wait_for_connections(2)
            await wait_ready(llm)
            await run.send(InputTextRawFrame("Still there?"))
            await run.wait_until(lambda: run.listener.responses_ended == 2)
        assert lost == []
        assert emulator.user_texts(1) == ["Still there?"]
        assert emulator.resumption_handle(1) == emulator.handles_issued(0)[-1]
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
            await run.start_conversation("Tell me a story.")
            await run.recorder.wait_until(lambda: len(run.errors) >= 1, 30 * UNIT)
        [error] = run.errors
        assert "poison" in error.error and "7f3a9c21e" in error.error
        assert not llm.is_usable
        assert len(emulator.connections) == 2


async def test_lagging_transcription_loses_nothing_and_repeats_at_most_a_word() -> None:
    """When transcription trails the audio, the cut may repeat one word, never lose one."""
    script = {"Tell me a story.": STORY}
    plan = FaultPlan(Fault.close(1011, after_audio_chunks=4))
    async with GeminiLiveEmulator(script=script, plan=plan) as emulator:
        llm = resilient(emulator)
        async with SessionScenario(llm, emulator.samples_per_char()) as run:
            await run.start_conversation("Tell me a story.")
            await run.wait_until(lambda: run.listener.responses_ended == 2)
        heard = run.listener.heard
        story = words(STORY)
        assert [w for i, w in enumerate(heard) if i == 0 or w != heard[i - 1]] == story
        assert len(heard) - len(story) <= 1
        # The context holds the story once: never a word that was not heard.
        assert " ".join(run.assistant_texts).split() == story
        assert run.errors == []


def test_bad_replay_policy_for_sessions() -> None:
    """Invalid buffer bounds fail at construction."""
    with pytest.raises(ValueError, match="max_buffered_input_s"):
        ReplayPolicy(max_buffered_input_s=-1)
