"""ResilientLLM around the stock OpenAIRealtimeLLMService, against the OpenAI Realtime emulator.

Pipecat 1.14's service has no recovery at all (``test_emulator_openai_realtime.py``
pins that down): each test here drives the same stock service, wrapped, over a
real socket, and asserts on what a listener heard (decoded from the audio),
what the context received, and what the emulator's sessions hold.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from pipecat.adapters.llm.schemas.function_schema import FunctionSchema
from pipecat.adapters.llm.schemas.tools_schema import ToolsSchema
from pipecat.frames.frames import LLMServiceMetadataFrame
from pipecat.services.llm_service import FunctionCallParams, LLMService

from pipecat_resilient import Failure, ReplayPolicy, ResilientLLM, RetryPolicy
from pipecat_resilient._openai_realtime import OpenAIRealtime
from pipecat_resilient.realtime import ResilientRealtimeLLM
from pipecat_resilient.testing import Fault, FaultPlan, ToolCall
from pipecat_resilient.testing.openai_realtime import SERVER_ERROR, OpenAIRealtimeEmulator

from .conftest import UNIT
from .test_emulator_openai_realtime import RealtimeRun, eventually, stock, words

STORY = "Once upon a time there was a socket that never closed."
QUESTION = "Tell me a story."
HELLO = "Hello."
HI = "Hi! How can I help you today?"
NO_WAIT = RetryPolicy(attempts=4, wait_initial=0.0, wait_max=0.0)
TIMEOUT = 30 * UNIT
CUTS = [
    Fault.close(1011, "Internal error encountered.", after_audio_chunks=6 + 3),
    Fault.abort(after_audio_chunks=6 + 3),
]
CUT_IDS = ["1011", "1006"]
# What the model says when asked to go on after the user heard "Once upon a" ("tim" in part).
GOES_ON = {"continue": "time there was a socket that never closed.", "restart": STORY, "repeat": STORY}
TOOLS = ToolsSchema(
    standard_tools=[
        FunctionSchema(
            name="get_weather",
            description="Current weather in a city.",
            properties={"city": {"type": "string"}},
            required=["city"],
        )
    ]
)


def resilient(
    emulator: OpenAIRealtimeEmulator, *, functions: dict[str, Any] | None = None, **kwargs: Any
) -> ResilientLLM:
    def factory() -> Any:
        service = stock(emulator)
        for name, handler in (functions or {}).items():
            service.register_function(name, handler)
        return service

    options: dict[str, Any] = {
        "retry": NO_WAIT,
        "first_token_timeout": 5 * UNIT,
        "stall_timeout": 5 * UNIT,
        # The emulator sends a continuation at once: it is checked when it ends,
        # well within this bound even on a loaded machine.
        "replay": ReplayPolicy(continuation_hold_s=30 * UNIT),
    }
    options.update(kwargs)
    return ResilientLLM(factory, **options)


def losses(llm: ResilientLLM) -> list[Failure]:
    lost: list[Failure] = []
    llm.add_event_handler("on_connection_lost", lambda _, failure: lost.append(failure))
    return lost


async def ready(llm: ResilientLLM) -> None:
    await eventually(lambda: llm.service is not None and OpenAIRealtime.is_ready(llm.service))


async def hello_then(run: RealtimeRun, llm: ResilientLLM, text: str) -> None:
    """A whole first exchange (the session learns its speech rate from it), then ``text`` said aloud."""
    await run.start_conversation(HELLO)
    await run.wait_until(lambda: run.listener.responses_ended == 1, TIMEOUT)
    await ready(llm)
    await run.say(text)


async def story_after_hello(
    plan: FaultPlan, *, responses: int = 0, **options: Any
) -> tuple[RealtimeRun, list[Failure], OpenAIRealtimeEmulator]:
    """A greeting, then the story under ``plan`` (transcripts ahead of audio) until its last word."""
    async with OpenAIRealtimeEmulator(
        script={HELLO: HI, QUESTION: STORY}, plan=plan, transcript="before_audio", **options
    ) as emulator:
        llm = resilient(emulator)
        lost = losses(llm)
        async with RealtimeRun(llm, emulator.samples_per_char()) as run:
            await hello_then(run, llm, QUESTION)
            await run.wait_until(lambda: run.listener.heard[-1:] == ["closed."], TIMEOUT)
            if responses:
                await run.wait_until(lambda: run.listener.responses_ended == responses, TIMEOUT)
    return run, lost, emulator


def created(emulator: OpenAIRealtimeEmulator, connection: int) -> list[tuple[str, str]]:
    """The items a client created on a connection, as (role or type, text)."""
    items = []
    for event in emulator.client_messages("conversation.item.create", connection):
        item = event["item"]
        if item["type"] == "message":
            items.append((item["role"], " ".join(part.get("text", "") for part in item["content"])))
        else:
            items.append((item["type"], item.get("output") or item.get("arguments") or ""))
    return items


def no_packed_history(emulator: OpenAIRealtimeEmulator) -> None:
    """No session got the stock service's packed history (a user message the user never said)."""
    for index in range(len(emulator.connections)):
        assert all("previously saved conversation" not in text for _, text in created(emulator, index))


async def test_resilient_llm_takes_openai_realtime() -> None:
    """A factory of OpenAI Realtime services gets the speech-to-speech shell; it says it is realtime."""
    async with OpenAIRealtimeEmulator() as emulator:
        llm = resilient(emulator)
        assert isinstance(llm, ResilientRealtimeLLM) and isinstance(llm, LLMService)
        async with RealtimeRun(llm, emulator.samples_per_char()) as run:
            await run.start_conversation(HELLO)
            await run.wait_until(lambda: run.listener.responses_ended == 1, TIMEOUT)
        [metadata] = [m for m in run.listener.service_metadata if isinstance(m, LLMServiceMetadataFrame)]
        assert metadata.service_name == llm.name and metadata.is_realtime_service


async def test_no_fault_conversation_is_the_stock_ones() -> None:
    """Without faults: a text turn and a spoken one answered on one session, framed as the stock does."""
    async with OpenAIRealtimeEmulator(script={HELLO: HI}) as emulator:
        llm = resilient(emulator)
        async with RealtimeRun(llm, emulator.samples_per_char()) as run:
            await hello_then(run, llm, "What time is it?")
            await run.wait_until(lambda: run.listener.responses_ended == 2, TIMEOUT)
        assert run.listener.heard == words(f"{HI} You said: What time is it.")
        assert run.assistant_texts == [HI, "You said: What time is it."]
        assert run.listener.kinds() == [
            "response-start",
            "response-start",
            "started",
            "stopped",
            "response-end",
            "interruption",
            "response-start",
            "started",
            "stopped",
            "response-end",
        ]
        assert len(emulator.connections) == 1 and run.errors == []


async def test_the_hold_waits_for_a_slow_continuations_first_audio() -> None:
    """A restart whose audio comes well after its response began is still checked against what was heard.

    Each response's first audio comes 0.3 s after ``response.created`` (a
    fresh session given a long conversation item by item was seen to take
    longer still); the hold is 0.1 s. Counted from the response's start it
    ended with nothing in, found nothing repeated, and the restart's "Once upon
    a" was heard twice. It counts from the first audio.
    """
    async with OpenAIRealtimeEmulator(
        script={HELLO: HI, QUESTION: STORY},
        plan=FaultPlan(CUTS[0]),
        continuation="restart",
        transcript="before_audio",
        first_audio_delay=0.3,
    ) as emulator:
        llm = resilient(emulator, replay=ReplayPolicy(continuation_hold_s=0.1))
        async with RealtimeRun(llm, emulator.samples_per_char()) as run:
            await hello_then(run, llm, QUESTION)
            await run.wait_until(lambda: run.listener.heard[-1:] == ["closed."], TIMEOUT)
            await run.wait_until(lambda: run.listener.responses_ended == 3, TIMEOUT)
        assert run.listener.heard == words(f"{HI} {STORY}")
        assert " ".join(run.assistant_texts).split() == run.listener.heard
        assert run.errors == []


@pytest.mark.parametrize("how", ["continue", "restart", "repeat"])
@pytest.mark.parametrize("fault", CUTS, ids=CUT_IDS)
async def test_a_cut_reply_is_recreated_as_heard_and_heard_once(fault: Fault, how: str) -> None:
    """Dropped mid-reply: a fresh session gets the conversation item by item, the cut reply as heard."""
    run, lost, emulator = await story_after_hello(FaultPlan(fault), responses=3, continuation=how)
    assert run.listener.heard == words(f"{HI} {STORY}")
    assert " ".join(run.assistant_texts).split() == run.listener.heard
    # The cut reply (begun by the server's VAD) closed; the continuation asked for.
    assert run.listener.kinds()[5:] == [
        "interruption",
        "response-start",
        "started",
        "stopped",
        "response-end",
        "response-start",
        "response-start",
        "started",
        "stopped",
        "response-end",
    ]
    assert [failure.code for failure in lost] == [1011 if fault.kind.name == "CLOSE" else 1006]
    assert created(emulator, 1) == [
        ("user", HELLO),
        ("assistant", HI),
        ("user", QUESTION),
        ("assistant", "Once upon a"),
    ]
    assert emulator.replies(1) == [GOES_ON[how]]
    no_packed_history(emulator)
    assert run.errors == []


async def test_a_close_from_the_server_is_acted_on_from_its_frame() -> None:
    """The server's close frame ends the session at once; the end of the closing handshake is not waited for.

    The emulator sends its close frame and reads no more: the stock service's
    reader would end only when the client's close timeout ends the wait, and
    the stall timeout (0.5 s here) would catch the silence first.
    """
    plan = FaultPlan(Fault.close(1011, "Internal error encountered.", after_audio_chunks=6 + 3, linger=True))
    run, [failure], _ = await story_after_hello(plan)
    assert failure.code == 1011
    assert run.listener.heard == words(f"{HI} {STORY}")
    assert " ".join(run.assistant_texts).split() == run.listener.heard


async def test_transcription_behind_the_audio_repeats_only_the_last_word_it_had_not_named() -> None:
    """Transcripts after their audio: the word heard just before the cut, never transcribed, comes again."""
    async with OpenAIRealtimeEmulator(
        script={QUESTION: STORY}, plan=FaultPlan(Fault.close(1011, after_audio_chunks=3))
    ) as emulator:
        llm = resilient(emulator)
        async with RealtimeRun(llm, emulator.samples_per_char()) as run:
            await run.start_conversation(QUESTION)
            await run.wait_until(lambda: run.listener.heard[-1:] == ["closed."], TIMEOUT)
        # "Once upon a" heard, "Once upon" transcribed: "a" comes twice, nothing is lost.
        assert run.listener.heard == words("Once upon a a time there was a socket that never closed.")
        assert " ".join(run.assistant_texts).split() == words(STORY)
        assert run.errors == []


async def test_an_error_event_on_an_open_socket_is_recovered() -> None:
    """A server_error event mid-reply (the stock stops reading for good): a fresh session goes on with it."""
    plan = FaultPlan(Fault.error(SERVER_ERROR, 500, after_audio_chunks=6 + 3))
    run, [failure], emulator = await story_after_hello(plan, continuation="restart")
    assert "server_error" in failure.description and failure.category == "server"
    assert run.listener.heard == words(f"{HI} {STORY}")
    assert " ".join(run.assistant_texts).split() == run.listener.heard
    assert len(emulator.connections) == 2 and run.errors == []


async def test_the_session_is_replaced_at_a_turn_boundary_before_its_limit() -> None:
    """Sessions end after a limit (60 minutes): a fresh one takes over at a turn boundary, before the end."""
    async with OpenAIRealtimeEmulator(session_max_seconds=20 * UNIT) as emulator:
        llm = resilient(emulator, replay=ReplayPolicy(max_session_s=3 * UNIT, continuation_hold_s=30 * UNIT))
        lost = losses(llm)
        async with RealtimeRun(llm, emulator.samples_per_char()) as run:
            await run.start_conversation(HELLO)
            await run.wait_until(lambda: run.listener.responses_ended == 1, TIMEOUT)
            await eventually(lambda: len(emulator.connections) == 2 and emulator.connections[0].closed)
            await ready(llm)
            await run.say("Are you there?")
            await run.wait_until(lambda: run.listener.responses_ended == 2, TIMEOUT)
        assert lost == [] and run.errors == []
        assert run.listener.heard == words("You said: Hello. You said: Are you there.")
        assert emulator.conversation(1) == [
            ("user", HELLO),
            ("assistant", "You said: Hello."),
            ("user", "Are you there?"),
            ("assistant", "You said: Are you there."),
        ]
        # The old session was left before the server ended it.
        assert "error" not in emulator.sent_kinds(0)
        no_packed_history(emulator)


async def test_a_session_that_reaches_its_limit_is_recovered() -> None:
    """No rotation (max_session_s=None): session_expired, 1001; the next turn is answered on a fresh one."""
    async with OpenAIRealtimeEmulator(session_max_seconds=5 * UNIT) as emulator:
        llm = resilient(emulator, replay=ReplayPolicy(max_session_s=None, continuation_hold_s=30 * UNIT))
        lost = losses(llm)
        async with RealtimeRun(llm, emulator.samples_per_char()) as run:
            await run.start_conversation(HELLO)
            await run.wait_until(lambda: run.listener.responses_ended == 1, TIMEOUT)
            await eventually(lambda: len(lost) == 1)
            await ready(llm)
            await run.say("Are you there?")
            await run.wait_until(lambda: run.listener.responses_ended == 2, TIMEOUT)
        assert "session_expired" in lost[0].description
        assert run.listener.heard == words("You said: Hello. You said: Are you there.")
        assert run.errors == []


async def test_a_drop_during_a_function_call_delivers_its_result_once_with_its_call_id() -> None:
    """The socket drops while a function runs: it runs once; its output answers its call id afresh."""
    release = asyncio.Event()
    started = asyncio.Event()
    calls: list[str] = []

    async def get_weather(params: FunctionCallParams) -> None:
        calls.append(params.tool_call_id)
        started.set()
        await release.wait()
        await params.result_callback({"temperature": 21})

    script = {"What's the weather in Paris?": ToolCall("get_weather", {"city": "Paris"})}
    async with OpenAIRealtimeEmulator(script=script) as emulator:
        llm = resilient(emulator, functions={"get_weather": get_weather})
        run = RealtimeRun(llm, emulator.samples_per_char())
        run.context.set_tools(TOOLS)
        async with run:
            await run.start_conversation("What's the weather in Paris?")
            await asyncio.wait_for(started.wait(), TIMEOUT)
            await emulator.inject(Fault.close(1011, "Internal error encountered."))
            await emulator.wait_for_connections(2)
            await ready(llm)
            release.set()
            await run.wait_until(lambda: run.listener.heard[-1:] == ["21."], TIMEOUT)
        assert calls == ["call_1"]
        [output] = emulator.function_call_outputs()
        assert (output["call_id"], json.loads(output["output"])) == ("call_1", {"temperature": 21})
        assert [kind for kind, _ in created(emulator, 1)] == ["user", "function_call", "function_call_output"]
        assert [role for role, _ in emulator.conversation(1)] == [
            "user",
            "function_call",
            "function_call_output",
            "assistant",
        ]
        assert run.listener.heard == words("The get_weather result is temperature 21.")
        assert run.errors == []


async def test_user_speech_during_recovery_is_delivered_and_answered() -> None:
    """The user speaks while no session can listen: the audio is kept, delivered, and answered."""
    plan = FaultPlan(CUTS[0], Fault.refuse(503, connection=1))
    retry = RetryPolicy(attempts=3, wait_initial=5 * UNIT, wait_max=5 * UNIT, jitter=False)
    async with OpenAIRealtimeEmulator(
        script={HELLO: HI, QUESTION: STORY}, plan=plan, transcript="before_audio"
    ) as emulator:
        llm = resilient(emulator, retry=retry)
        async with RealtimeRun(llm, emulator.samples_per_char()) as run:
            await hello_then(run, llm, QUESTION)
            await emulator.wait_for_connections(2)  # refused: the next attempt waits
            await run.say("Are you there?")
            await run.wait_until(lambda: run.listener.heard[-1:] == ["there."], TIMEOUT)
        # The user moved on: their question is answered, the story is not resumed.
        assert run.listener.heard == words(f"{HI} Once upon a You said: Are you there.")
        assert " ".join(run.assistant_texts).split() == run.listener.heard
        kinds = emulator.client_kinds(2)
        assert kinds.index("input_audio_buffer.append") > max(
            i for i, kind in enumerate(kinds) if kind == "conversation.item.create"
        )
        assert [text for role, text in emulator.conversation(2) if role == "user"][-1] == "Are you there?"
        assert run.errors == []


async def test_a_drop_before_any_reply_is_answered_on_the_fresh_session() -> None:
    """The user's turn went in, the session dropped before the reply: the fresh session answers it."""
    plan = FaultPlan(Fault.close(1011, "Internal error encountered.", after_text_messages=1))
    async with OpenAIRealtimeEmulator(script={QUESTION: STORY}, plan=plan) as emulator:
        llm = resilient(emulator)
        async with RealtimeRun(llm, emulator.samples_per_char()) as run:
            await run.start_conversation(QUESTION)
            await run.wait_until(lambda: run.listener.heard[-1:] == ["closed."], TIMEOUT)
        assert run.listener.heard == words(STORY)
        assert run.assistant_texts == [STORY]
        assert created(emulator, 1) == [("user", QUESTION)]
        assert run.errors == []
