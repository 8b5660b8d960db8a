"""The Gemini Live emulator, spoken to by the stock GeminiLiveLLMService and by a bare client.

The stock-service tests run the service in a real pipeline
(``recorder -> user aggregator -> llm -> listener -> assistant aggregator``)
over TLS on 127.0.0.1, and pin down how it behaves when the connection fails:
these are the failures the product exists to fix, so if Pipecat ever fixes
them, these tests fail and we want to know.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import time
from typing import Any

import pytest
import websockets.asyncio.client
from google import genai
from google.genai import errors, types
from pipecat.adapters.llm.schemas.function_schema import FunctionSchema
from pipecat.adapters.llm.schemas.tools_schema import ToolsSchema
from pipecat.frames.frames import (
    InputTextRawFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.services.google.gemini_live.llm import GeminiLiveLLMService, GeminiVADParams
from pipecat.services.llm_service import FunctionCallParams
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosedError, InvalidStatus

from pipecat_resilient.testing import Fault, FaultKind, FaultPlan, GeminiLiveEmulator, ToolCall
from pipecat_resilient.testing.gemini_live import (
    CLIENT_CLOSE_TIMEOUT_S,
    CLIENT_PING_INTERVAL_S,
    CLIENT_PING_TIMEOUT_S,
    INVALID_ARGUMENT,
    LAST_CHUNK_BEFORE_TURN_COMPLETE,
    PATH,
    Silent,
)
from pipecat_resilient.testing.harness import SessionScenario
from pipecat_resilient.testing.speech import SpeechDecoder, encode, samples_per_char

from .conftest import UNIT

# Every wait in this file; a passing test takes a fraction of it.
TIMEOUT = 30 * UNIT
MODEL = "models/gemini-2.5-flash-native-audio-preview-12-2025"
MODEL_3 = "models/gemini-3.8-live"
STORY = "Once upon a time there was a socket that never closed."
# How ResilientLLM asked for a continuation before it seeded the model's own turn.
ANSWER_AGAIN = (
    '(The connection dropped while you were answering. The user\'s last message was: "Tell me a story.". '
    'Of your answer the user heard only: "{heard}". Continue your answer from exactly there, without '
    "repeating it.)"
)
# How long a test waits to be sure that nothing more comes.
QUIET = 3 * UNIT


def words(text: str) -> list[str]:
    return text.split()


class LiveRun(SessionScenario):
    """The kit's SessionScenario, waiting on the stock service's own readiness."""

    async def wait_ready(self) -> None:
        """Wait until the service has a session that takes realtime input.

        Input sent before then is dropped by the stock service, and nothing
        downstream marks the moment, so this reads its state.
        """
        llm = self.llm
        async with asyncio.timeout(TIMEOUT):
            while not (llm._session is not None and llm._ready_for_realtime_input):
                await asyncio.sleep(UNIT / 20)


def stock(
    emulator: GeminiLiveEmulator, *, model: str = MODEL, keepalive: bool = False, **kwargs: Any
) -> GeminiLiveLLMService:
    """The stock service, pointed at ``emulator`` (with test keepalive timings when asked)."""
    options = (
        emulator.http_options(keepalive=(UNIT, UNIT), close_timeout=UNIT)
        if keepalive
        else emulator.http_options()
    )
    return GeminiLiveLLMService(
        api_key="test-key",
        http_options=options,
        settings=GeminiLiveLLMService.Settings(model=model),
        **kwargs,
    )


# -- the stock service against the emulator ------------------------------------


@pytest.mark.parametrize("model", [MODEL, MODEL_3])
async def test_text_turns_are_answered_in_speech(model: str) -> None:
    """A seeded user turn and a realtime text turn each get their scripted reply, heard in full."""
    script = {"Hello there.": "Hi! How can I help you today?"}
    async with GeminiLiveEmulator(script=script, api_key="test-key") as emulator:
        async with LiveRun(stock(emulator, model=model), emulator.samples_per_char()) as run:
            await run.start_conversation("Hello there.")
            await run.wait_until(lambda: run.listener.responses_ended == 1)
            await run.wait_ready()
            await run.send(InputTextRawFrame("What time is it?"))
            await run.wait_until(lambda: len(run.assistant_texts) == 2)

        assert run.listener.heard == words("Hi! How can I help you today? You said: What time is it.")
        assert run.listener.fragments == []
        assert run.listener.kinds() == ["started", "response-start", "stopped", "response-end"] * 2
        # Stock: the service passes the InputTextRawFrame on downstream, and the
        # assistant aggregator writes the user's text into the assistant message.
        assert run.assistant_texts == [
            "Hi! How can I help you today?",
            "What time is it? You said: What time is it.",
        ]
        assert run.errors == []
        # What the emulator received: one connection, both casings of a live setup.
        assert len(emulator.connections) == 1
        setup = emulator.setup(0)
        assert setup is not None and setup["model"] == model and setup["sessionResumption"] == {}
        assert emulator.user_texts() == ["Hello there.", "What time is it?"]
        contents = emulator.client_messages("client_content", 0)
        assert contents == [
            {"turns": [{"parts": [{"text": "Hello there."}], "role": "user"}], "turnComplete": True}
        ]
        nudges = [{"text": " "}] if model == MODEL_3 else []
        assert emulator.client_messages("realtime_input", 0) == [*nudges, {"text": "What time is it?"}]
        # The model's turn: audio chunks, each followed by its transcription.
        kinds = emulator.sent_kinds(0)
        assert kinds[:2] == ["setupComplete", "sessionResumptionUpdate"]
        assert kinds.count("turnComplete") == 2
        transcripts = [
            m["serverContent"]["outputTranscription"]["text"]
            for m in emulator.sent(0)
            if "outputTranscription" in m.get("serverContent", {})
        ]
        assert "".join(transcripts) == "Hi! How can I help you today?You said: What time is it."


async def test_tool_call_round_trips() -> None:
    """A scripted tool call runs the registered function once; its result reaches the model, which answers."""
    script = {"What's the weather in Paris?": ToolCall("get_weather", {"city": "Paris"})}
    tools = ToolsSchema(
        standard_tools=[
            FunctionSchema(
                name="get_weather",
                description="Current weather in a city.",
                properties={"city": {"type": "string"}},
                required=["city"],
            )
        ]
    )
    calls: list[tuple[str, dict[str, Any]]] = []

    async def get_weather(params: FunctionCallParams) -> None:
        calls.append((params.tool_call_id, dict(params.arguments)))
        await params.result_callback({"temperature": 21, "sky": "clear"})

    async with GeminiLiveEmulator(script=script) as emulator:
        llm = stock(emulator, tools=tools)
        llm.register_function("get_weather", get_weather)
        async with LiveRun(llm, emulator.samples_per_char()) as run:
            await run.start_conversation("What's the weather in Paris?")
            await run.wait_until(lambda: run.listener.responses_ended == 1)

        reply = "The get_weather result is temperature 21, sky clear."
        assert calls == [("function-call-1", {"city": "Paris"})]
        assert emulator.function_responses() == [
            {"id": "function-call-1", "name": "get_weather", "response": {"temperature": 21, "sky": "clear"}}
        ]
        assert len(emulator.client_messages("tool_response", 0)) == 1
        assert run.listener.heard == words(reply)
        assert run.listener.kinds() == ["started", "response-start", "stopped", "response-end"]
        assert run.errors == []
        declarations = emulator.setup(0)["tools"][0]["functionDeclarations"]  # type: ignore[index]
        assert [d["name"] for d in declarations] == ["get_weather"]
        assert "toolCall" in emulator.sent_kinds(0)


@pytest.mark.parametrize(
    "fault",
    [
        Fault.close(1011, "Internal error encountered.", after_audio_chunks=3),
        Fault.close(1007, LAST_CHUNK_BEFORE_TURN_COMPLETE, after_audio_chunks=3),
        Fault.abort(after_audio_chunks=3),
        Fault.stall(after_audio_chunks=3),
    ],
    ids=["1011", "1007", "abort", "stall"],
)
async def test_drop_mid_reply_resumes_but_leaves_the_reply_open(fault: Fault) -> None:
    """Stock: a drop mid-reply reconnects with the last handle, silently, and never closes the cut reply.

    The next reply is glued onto the cut one: no new start frames, a single
    stop at its end, and one assistant message holding both. A close or an
    abort is seen at once; a stall only once the client's keepalive ping
    timed out (shortened here to a ping every UNIT, answered within UNIT,
    and UNIT to close).
    """
    async with GeminiLiveEmulator(script={"Tell me a story.": STORY}, plan=FaultPlan(fault)) as emulator:
        llm = stock(emulator, keepalive=True)
        async with LiveRun(llm, emulator.samples_per_char()) as run:
            await run.start_conversation("Tell me a story.")
            await emulator.wait_for_connections(2, TIMEOUT)
            await run.wait_ready()
            # Reconnected, and the cut reply is still open: no stop, no end.
            assert run.listener.kinds() == ["started", "response-start"]
            assert llm._bot_is_responding
            await run.speak("Are you there?")
            await run.wait_until(lambda: run.listener.responses_ended == 1)

        # A stall costs at least the ping timeout and the close timeout.
        fault_at = emulator.connections[0].fault_at
        assert fault_at is not None
        waited = emulator.connections[1].opened_at - fault_at
        assert waited >= 2 * UNIT if fault.kind is FaultKind.STALL else waited < 2 * UNIT
        # It resumed with the handle issued before the cut reply began.
        assert emulator.handles_issued(0) == ["handle-1"]
        assert emulator.resumption_handle(1) == "handle-1"
        assert emulator.client_messages("client_content", 1) == []
        # The listener heard three chunks of the story, then the next reply.
        assert run.listener.heard == words("Once upon a") + words("You said: Are you there.")
        assert run.listener.fragments == ["tim"]
        # One start and one stop for two replies: the cut one was never closed,
        # so the context gets one assistant message, which holds the transcript
        # of both (the third chunk's transcription had not arrived at the cut).
        assert run.listener.kinds() == ["started", "response-start", "stopped", "response-end"]
        assert run.assistant_texts == ["Once upon You said: Are you there."]
        assert run.errors == []


async def test_go_away_is_ignored() -> None:
    """Stock: a GoAway changes nothing; the service reconnects only once the server closes."""
    plan = FaultPlan(Fault.go_away(5 * UNIT, after_text_messages=1))
    async with GeminiLiveEmulator(plan=plan) as emulator:
        async with LiveRun(stock(emulator), emulator.samples_per_char()) as run:
            await run.start_conversation("Hello.")
            await run.wait_until(lambda: run.listener.responses_ended == 1)
            connections_after_reply = len(emulator.connections)
            await emulator.wait_for_connections(2, TIMEOUT)

        assert "goAway" in emulator.sent_kinds(0)
        assert emulator.sent(0)[emulator.sent_kinds(0).index("goAway")] == {"goAway": {"timeLeft": "0.500s"}}
        # The reply went on over the condemned connection, and nothing was sent in answer.
        assert connections_after_reply == 1
        assert run.listener.heard == words("You said: Hello.")
        assert [next(iter(m)) for m in emulator.connections[0].messages] == ["setup", "client_content"]
        # The new connection came only after the server's close when time was up.
        go_away_at = emulator.go_away_sent_at(0)
        assert go_away_at is not None
        assert emulator.connections[1].opened_at - go_away_at >= 5 * UNIT
        assert emulator.connections[0].fault is not None and emulator.connections[0].fault.code == 1008
        assert emulator.resumption_handle(1) == emulator.handles_issued(0)[-1] == "handle-2"
        assert run.errors == []


@pytest.mark.parametrize("refusal", ["resumption", "http-503"])
async def test_refused_reconnect_leaves_the_service_dead(refusal: str) -> None:
    """Stock: a reconnect refused before setupComplete ends the service for good, with no error frame.

    ``connect()`` raises in the connection task, outside the code that counts
    failures and reconnects; Pipecat only logs it.
    """
    plan = FaultPlan(Fault.close(1011, after_audio_chunks=2))
    if refusal == "http-503":
        plan.add(Fault.refuse(503, connection=1))
    async with GeminiLiveEmulator(plan=plan, refuse_resumption=refusal == "resumption") as emulator:
        llm = stock(emulator)
        async with LiveRun(llm, emulator.samples_per_char()) as run:
            await run.start_conversation("Tell me a story.")
            await emulator.wait_for_connections(2, TIMEOUT)
            # Nothing marks the end downstream: wait for the service's connection task.
            async with asyncio.timeout(TIMEOUT):
                while not (llm._connection_task is not None and llm._connection_task.done()):
                    await asyncio.sleep(UNIT / 20)
            assert llm._session is None

        assert len(emulator.connections) == 2
        if refusal == "resumption":
            assert emulator.resumption_handle(1) == "handle-1"
            fault = emulator.connections[1].fault
            assert fault is not None and (fault.code, fault.reason) == (1007, INVALID_ARGUMENT)
            assert emulator.sent_kinds(1) == []
        else:
            assert emulator.connections[1].refused == 503
        assert run.listener.kinds() == ["started", "response-start"]
        assert run.errors == []


async def test_user_audio_is_transcribed_into_the_context_and_answered() -> None:
    """Speech-code user audio is decoded, sent back as inputTranscription, and answered."""
    question = "What time is it?"
    async with GeminiLiveEmulator() as emulator:
        async with LiveRun(stock(emulator), emulator.samples_per_char()) as run:
            await run.start_conversation()
            await run.wait_ready()
            await run.speak(question)
            await run.wait_until(lambda: len(run.assistant_texts) == 1)

        assert emulator.user_texts() == [question]
        assert {"serverContent": {"inputTranscription": {"text": question}}} in emulator.sent(0)
        assert run.listener.heard == words("You said: What time is it.")
        users = [m for m in run.context.get_messages() if isinstance(m, dict) and m.get("role") == "user"]
        assert [m.get("content") for m in users] == [question]


async def test_activity_window_turns_with_server_vad_off() -> None:
    """With server VAD off, an utterance is the audio between activityStart and activityEnd."""
    settings = GeminiLiveLLMService.Settings(model=MODEL, vad=GeminiVADParams(disabled=True))
    async with GeminiLiveEmulator() as emulator:
        llm = GeminiLiveLLMService(api_key="k", http_options=emulator.http_options(), settings=settings)
        async with LiveRun(llm, emulator.samples_per_char()) as run:
            await run.start_conversation()
            await run.wait_ready()
            await run.send(UserStartedSpeakingFrame())
            await run.speak("Good morning.")
            await run.send(UserStoppedSpeakingFrame())
            await run.wait_until(lambda: run.listener.responses_ended == 1)

        setup = emulator.setup(0) or {}
        assert setup["realtimeInputConfig"] == {"automatic_activity_detection": {"disabled": True}}
        inputs = [next(iter(m)) for m in emulator.client_messages("realtime_input", 0)]
        assert inputs[0] == "activityStart" and inputs[-1] == "activityEnd"
        assert set(inputs[1:-1]) == {"audio"}
        assert emulator.user_texts() == ["Good morning."]
        assert run.listener.heard == words("You said: Good morning.")


# -- the protocol, with a bare client -------------------------------------------


async def raw_connect(emulator: GeminiLiveEmulator, **setup: Any) -> ClientConnection:
    """Open a connection and send a camelCase setup; returns after setupComplete."""
    ws = await connect(
        emulator.url + PATH, ssl=emulator.client_ssl_context, additional_headers={"x-goog-api-key": "k"}
    )
    setup = {"model": "models/test", "outputAudioTranscription": {}, **setup}
    await ws.send(json.dumps({"setup": setup}))
    assert json.loads(await ws.recv()) == {"setupComplete": {}}
    return ws


async def receive_until(ws: ClientConnection, key: str) -> list[dict[str, Any]]:
    """Messages up to and including the first whose top level or serverContent has ``key``."""
    messages = []
    async with asyncio.timeout(TIMEOUT):
        while True:
            message = json.loads(await ws.recv())
            messages.append(message)
            if key in message or key in message.get("serverContent", {}):
                return messages


def heard_in(messages: list[dict[str, Any]]) -> list[str]:
    """The words the reply audio in ``messages`` decodes to."""
    decoder = SpeechDecoder(samples_per_char(24000, 10))
    for message in messages:
        for part in message.get("serverContent", {}).get("modelTurn", {}).get("parts", []):
            decoder.feed(base64.b64decode(part["inlineData"]["data"]))
    return decoder.heard()


def transcript_of(messages: list[dict[str, Any]]) -> str:
    return "".join(
        m["serverContent"]["outputTranscription"]["text"]
        for m in messages
        if "outputTranscription" in m.get("serverContent", {})
    )


async def test_camel_case_messages_and_transparent_resumption() -> None:
    """camelCase client messages work like snake_case; a resumed session keeps the handle's history."""
    script = {"Check the time.": ToolCall("clock", reply=lambda r: f"It is {r['now']}.")}
    async with GeminiLiveEmulator(script=script) as emulator:
        ws = await raw_connect(emulator, sessionResumption={"transparent": True})
        first = json.loads(await ws.recv())["sessionResumptionUpdate"]
        assert first == {"newHandle": "handle-1", "resumable": True, "lastConsumedClientMessageIndex": "0"}
        await ws.send(
            json.dumps(
                {
                    "clientContent": {
                        "turns": [{"role": "user", "parts": [{"text": "Hi."}]}],
                        "turnComplete": True,
                    }
                }
            )
        )
        reply = await receive_until(ws, "turnComplete")
        assert transcript_of(reply) == "You said: Hi."
        assert reply[-1]["usageMetadata"] == {
            "promptTokenCount": 1,
            "responseTokenCount": 3,
            "totalTokenCount": 4,
        }
        update = json.loads(await ws.recv())["sessionResumptionUpdate"]
        assert update == {"newHandle": "handle-2", "resumable": True, "lastConsumedClientMessageIndex": "1"}
        await ws.send(json.dumps({"realtimeInput": {"text": "Check the time."}}))
        call = (await receive_until(ws, "toolCall"))[-1]["toolCall"]["functionCalls"][0]
        assert call == {"id": "function-call-1", "name": "clock", "args": {}}
        response = {"id": call["id"], "name": "clock", "response": {"now": "noon"}}
        await ws.send(json.dumps({"toolResponse": {"functionResponses": [response]}}))
        reply = await receive_until(ws, "turnComplete")
        assert heard_in(reply) == words("It is noon.")
        await ws.close()
        assert emulator.function_responses() == [response]

        # Resuming with handle-2 restores the session as it was after the first reply.
        ws = await raw_connect(emulator, session_resumption={"handle": "handle-2"})
        assert emulator.resumption_handle() == "handle-2"
        assert emulator.history() == [("user", "Hi."), ("model", "You said: Hi.")]
        await ws.close()


async def test_new_input_interrupts_a_reply() -> None:
    """User text during a reply stops it and sends interrupted, then the new reply follows."""
    async with GeminiLiveEmulator(realtime=True) as emulator:
        ws = await raw_connect(emulator)
        await ws.send(json.dumps({"realtime_input": {"text": STORY}}))
        await receive_until(ws, "modelTurn")
        await ws.send(json.dumps({"realtime_input": {"text": "Stop."}}))
        messages = await receive_until(ws, "interrupted")
        reply = await receive_until(ws, "turnComplete")
        await ws.close()
        assert not any("turnComplete" in m.get("serverContent", {}) for m in messages)
        assert heard_in(reply) == words("You said: Stop.")
        assert emulator.history()[-1] == ("model", "You said: Stop.")


async def test_user_audio_in_any_framing_splits_into_utterances() -> None:
    """Speech-code audio ends an utterance where its message ends, even inside a frame."""
    audio = encode("One.", sample_rate=16000, ms_per_char=10) + encode(
        "Two.", sample_rate=16000, ms_per_char=10
    )
    async with GeminiLiveEmulator() as emulator:
        ws = await raw_connect(emulator, inputAudioTranscription={})
        for start in range(0, len(audio), 334):
            blob = {
                "data": base64.urlsafe_b64encode(audio[start : start + 334]).decode(),
                "mimeType": "audio/pcm;rate=16000",
            }
            await ws.send(json.dumps({"realtimeInput": {"audio": blob}}))
        messages = await receive_until(ws, "turnComplete")
        await ws.close()
    transcriptions = [
        m["serverContent"]["inputTranscription"]["text"]
        for m in messages
        if "inputTranscription" in m.get("serverContent", {})
    ]
    assert transcriptions == ["One.", "Two."]
    assert emulator.user_texts() == ["One.", "Two."]
    assert heard_in(messages) == words("You said: Two.")


async def test_go_away_at_open_then_close_when_time_is_up() -> None:
    """A GoAway planned for the connection's start follows setupComplete; the close follows its time."""
    plan = FaultPlan(Fault.go_away(UNIT))
    async with GeminiLiveEmulator(plan=plan, go_away_close=(1008, "bye")) as emulator:
        ws = await raw_connect(emulator)
        assert json.loads(await ws.recv()) == {"goAway": {"timeLeft": "0.100s"}}
        with pytest.raises(ConnectionClosedError) as closed:
            await ws.recv()
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1008, "bye")  # type: ignore[union-attr]


async def test_invalid_messages_and_refused_resumptions_close_with_1007() -> None:
    """A field the real service rejects, and an unknown or expired handle, close with 1007."""
    async with GeminiLiveEmulator() as emulator:
        ws = await raw_connect(emulator)
        await ws.send(json.dumps({"realtime_input": {"text": "hi", "turnComplete": True}}))
        with pytest.raises(ConnectionClosedError) as closed:
            await receive_until(ws, "never")
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1007, INVALID_ARGUMENT)  # type: ignore[union-attr]

        for handle in ["no-such-handle", "handle-1"]:
            emulator.expire_handles()
            ws = await connect(emulator.url + PATH, ssl=emulator.client_ssl_context)
            await ws.send(json.dumps({"setup": {"sessionResumption": {"handle": handle}}}))
            with pytest.raises(ConnectionClosedError) as closed:
                await ws.recv()
            assert closed.value.rcvd.code == 1007  # type: ignore[union-attr]


async def test_faults_on_user_input_and_handshakes() -> None:
    """after_text_messages leaves the Nth input unanswered; refusals, keys and paths answer HTTP errors."""
    plan = FaultPlan(Fault.close(1011, after_text_messages=2), Fault.refuse(503, connection=1))
    async with GeminiLiveEmulator(plan=plan, api_key="k") as emulator:
        ws = await raw_connect(emulator)
        await ws.send(json.dumps({"realtime_input": {"text": "One."}}))
        await receive_until(ws, "turnComplete")
        await ws.send(json.dumps({"realtime_input": {"text": "Two."}}))
        with pytest.raises(ConnectionClosedError) as closed:
            await receive_until(ws, "never")
        assert closed.value.rcvd.code == 1011  # type: ignore[union-attr]
        assert emulator.user_texts(0) == ["One.", "Two."]

        for url, headers, status in [
            (emulator.url + PATH, {"x-goog-api-key": "k"}, 503),
            (emulator.url + PATH, {"x-goog-api-key": "wrong"}, 401),
            (emulator.url + "/ws/other", {"x-goog-api-key": "k"}, 404),
        ]:
            with pytest.raises(InvalidStatus) as refused:
                await connect(url, ssl=emulator.client_ssl_context, additional_headers=headers)
            assert refused.value.response.status_code == status


# -- an unkind model -------------------------------------------------------------


async def send_turns(ws: ClientConnection, *turns: tuple[str, str], turn_complete: bool = True) -> None:
    """Send ``client_content`` with ``(role, text)`` turns, as google-genai words it."""
    content = [{"role": role, "parts": [{"text": text}]} for role, text in turns]
    await ws.send(json.dumps({"client_content": {"turns": content, "turnComplete": turn_complete}}))


async def receive_for(ws: ClientConnection, seconds: float) -> list[dict[str, Any]]:
    """Every message that arrives until none has for ``seconds``."""
    messages = []
    while True:
        try:
            messages.append(json.loads(await asyncio.wait_for(ws.recv(), seconds)))
        except TimeoutError:
            return messages


def timeline(messages: list[dict[str, Any]]) -> list[str]:
    """A reply as ``"A"`` per audio chunk and the text of each output transcription, then its end."""
    events = []
    for message in messages:
        content = message.get("serverContent", {})
        if "modelTurn" in content:
            events.append("A")
        if "outputTranscription" in content:
            events.append(content["outputTranscription"]["text"])
        if "turnComplete" in content:
            events.append("end")
    return events


async def answers_ping(ws: ClientConnection) -> bool:
    """Whether the server answers a websocket ping (it does while it reads)."""
    pong = await ws.ping()
    await asyncio.wait_for(pong, TIMEOUT)
    return True


@pytest.mark.parametrize("form", ["model-turn", "instruction"])
@pytest.mark.parametrize(
    ("how", "said"),
    [
        ("continue", "there was a socket that never closed."),
        ("restart", STORY),
        ("repeat", "upon a time there was a socket that never closed."),
    ],
)
async def test_a_cut_reply_is_continued_as_the_continuation_option_says(
    form: str, how: str, said: str
) -> None:
    """Asked to go on after "Once upon a time", the model says the rest, restarts, or repeats 3 words.

    Asked by seeding its own partial turn (``model-turn``) or by ResilientLLM's
    instruction; either way the history holds what was sent and no made-up
    user turn.
    """
    heard = "Once upon a time"
    script = {"Tell me a story.": STORY}
    # Free text to the model, never parsed, even when worded like an instruction to go on.
    instruction = {"parts": [{"text": "Tell stories. " + ANSWER_AGAIN.format(heard="Once")}]}
    async with GeminiLiveEmulator(script=script, continuation=how) as emulator:  # type: ignore[arg-type]
        ws = await raw_connect(emulator, systemInstruction=instruction)
        if form == "model-turn":
            await send_turns(ws, ("user", "Tell me a story."), ("model", heard))
            sent = [("user", "Tell me a story."), ("model", heard)]
        else:
            await send_turns(ws, ("user", ANSWER_AGAIN.format(heard=heard)))
            sent = [("user", ANSWER_AGAIN.format(heard=heard))]
        reply = await receive_until(ws, "turnComplete")
        await ws.close()

    assert transcript_of(reply) == said
    assert heard_in(reply) == words(said)
    assert emulator.replies() == [said]
    assert emulator.history(0) == [*sent, ("model", said)]
    assert emulator.user_texts() == [text for role, text in sent if role == "user"]


async def test_a_model_turn_that_is_not_a_cut_reply_is_not_continued() -> None:
    """A seed ending with a whole reply, or with words the model never said, is answered afresh."""
    async with GeminiLiveEmulator(script={"Tell me a story.": STORY}) as emulator:
        ws = await raw_connect(emulator)
        await send_turns(ws, ("user", "Tell me a story."), ("model", STORY))
        whole = await receive_until(ws, "turnComplete")
        await send_turns(ws, ("user", "Tell me a story."), ("model", "Once upon a midnight dreary"))
        other = await receive_until(ws, "turnComplete")
        await ws.close()
    assert transcript_of(whole) == transcript_of(other) == STORY
    assert emulator.replies() == [STORY, STORY]


@pytest.mark.parametrize(
    ("model", "how", "said"),
    [
        (MODEL_3, "continue", "there was a socket that never closed."),
        (MODEL_3, "restart", STORY),
        (MODEL_3, "repeat", "upon a time there was a socket that never closed."),
        (MODEL, "continue", "there was a socket that never closed."),
    ],
)
async def test_stock_service_seeded_with_the_heard_part_of_a_reply_hears_the_continuation(
    model: str, how: str, said: str
) -> None:
    """A context ending with the assistant's heard words seeds a model turn; the model goes on as told.

    Gemini 2.5 seeds get a blank user turn after the model turn (the stock
    service's padding): the model looks past it. No user turn the user did not
    say reaches the history.
    """
    heard = "Once upon a time"
    context = LLMContext(
        [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": heard}]
    )
    script = {"Tell me a story.": STORY}
    async with GeminiLiveEmulator(script=script, continuation=how) as emulator:  # type: ignore[arg-type]
        async with LiveRun(stock(emulator, model=model), emulator.samples_per_char(), context=context) as run:
            await run.start_conversation()
            await run.wait_until(lambda: run.listener.responses_ended == 1)

    assert run.listener.heard == words(said)
    [seed] = emulator.client_messages("client_content", 0)
    padding = [{"parts": [{"text": " "}], "role": "user"}] if model == MODEL else []
    assert seed["turns"] == [
        {"parts": [{"text": "Tell me a story."}], "role": "user"},
        {"parts": [{"text": heard}], "role": "model"},
        *padding,
    ]
    assert seed["turnComplete"] is True
    said_by_user = [text for role, text in emulator.history(0) if role == "user" and text.strip()]
    assert said_by_user == emulator.user_texts() == ["Tell me a story."]
    assert emulator.history(0)[-1] == ("model", said)
    assert run.assistant_texts == [heard, said]
    assert run.errors == []


TIMED = "One two three four five six."  # six chunks of five characters: "One t", "wo th", ...


@pytest.mark.parametrize(
    ("timing", "group", "expected"),
    [
        ("with_audio", 2, ["A", "One t", "A", "wo th", "A", "ree f", "A", "our f", "A", "ive s", "A", "ix."]),
        (
            "before_audio",
            2,
            ["One t", "wo th", "A", "ree f", "A", "our f", "A", "ive s", "A", "ix.", "A", "A"],
        ),
        (
            "after_audio",
            2,
            ["A", "A", "One t", "A", "wo th", "A", "ree f", "A", "our f", "A", "ive s", "ix."],
        ),
        ("grouped", 2, ["A", "A", "One two", "A", "A", " three four", "A", "A", " five six."]),
        ("grouped", 4, ["A", "A", "A", "A", "One two three four", "A", "A", " five six."]),
    ],
)
async def test_output_transcription_runs_with_ahead_of_behind_or_in_groups(
    timing: str, group: int, expected: list[str]
) -> None:
    """Transcription goes with, ahead of, behind (skew 1) the audio, or in groups; turnComplete last."""
    script = {"Count.": TIMED}
    async with GeminiLiveEmulator(
        script=script,
        transcription=timing,  # type: ignore[arg-type]
        transcription_skew=1,
        words_per_transcription=group,
    ) as emulator:
        ws = await raw_connect(emulator)
        await ws.send(json.dumps({"realtime_input": {"text": "Count."}}))
        reply = await receive_until(ws, "turnComplete")
        await ws.close()
    assert timeline(reply) == [*expected, "end"]
    assert transcript_of(reply) == TIMED
    assert heard_in(reply) == words(TIMED)


@pytest.mark.parametrize(
    ("timing", "transcribed"),
    [
        ("with_audio", "One two th"),
        ("before_audio", "One two three four f"),
        ("after_audio", "One t"),
        ("grouped", "One two"),
    ],
)
async def test_a_drop_leaves_the_transcription_past_or_short_of_the_audio(
    timing: str, transcribed: str
) -> None:
    """Cut after three chunks ("One two three f" voiced), the transcription received depends on its timing."""
    plan = FaultPlan(Fault.close(1011, after_audio_chunks=3))
    async with GeminiLiveEmulator(
        script={"Count.": TIMED},
        plan=plan,
        transcription=timing,  # type: ignore[arg-type]
        transcription_skew=1,
        words_per_transcription=2,
    ) as emulator:
        ws = await raw_connect(emulator)
        await ws.send(json.dumps({"realtime_input": {"text": "Count."}}))
        messages = []
        with pytest.raises(ConnectionClosedError):
            while True:
                messages.append(json.loads(await ws.recv()))
    assert heard_in(messages) == ["One", "two", "three"]
    assert transcript_of(messages) == transcribed
    assert emulator.history(0)[-1] == ("model", "One two three f")


async def test_silent_replies_send_transcription_without_audio() -> None:
    """A Silent script entry, and a reply numbered in silent_replies, come as transcription only."""
    script = {"Hi.": Silent("Hello, can you hear me?")}
    async with GeminiLiveEmulator(script=script, silent_replies={1}) as emulator:
        ws = await raw_connect(emulator)
        replies = []
        for text in ["Hi.", "Again.", "Last."]:
            await ws.send(json.dumps({"realtime_input": {"text": text}}))
            replies.append(await receive_until(ws, "turnComplete"))
        await ws.close()
    silent_script, silent_number, spoken = replies
    assert [transcript_of(reply) for reply in replies] == [
        "Hello, can you hear me?",
        "You said: Again.",
        "You said: Last.",
    ]
    for reply in (silent_script, silent_number):
        assert "A" not in timeline(reply) and timeline(reply)[-1] == "end"
        assert "generationComplete" in reply[-2]["serverContent"]
    assert heard_in(spoken) == words("You said: Last.")
    # The model believes it said all three.
    assert [text for role, text in emulator.history(0) if role == "model"] == emulator.replies()


async def test_stock_service_puts_a_silent_reply_in_the_context_though_nothing_was_heard() -> None:
    """Stock: a reply with transcription and no audio starts and ends a response, heard by nobody."""
    async with GeminiLiveEmulator(silent_replies={0}) as emulator:
        async with LiveRun(stock(emulator), emulator.samples_per_char()) as run:
            await run.start_conversation("Hello.")
            await run.wait_until(lambda: run.listener.responses_ended == 1)
    assert run.listener.heard == []
    assert run.listener.kinds() == ["started", "response-start", "stopped", "response-end"]
    assert run.assistant_texts == ["You said: Hello."]
    assert run.errors == []


@pytest.mark.parametrize("chunks", [2, 99], ids=["mid-audio", "before-turn-complete"])
async def test_a_quiet_reply_stops_without_closing_until_new_input_interrupts_it(chunks: int) -> None:
    """A reply in quiet_replies stops after N chunks, socket open and pinging; new input interrupts it."""
    async with GeminiLiveEmulator(script={"Tell me a story.": STORY}, quiet_replies={0: chunks}) as emulator:
        ws = await raw_connect(emulator)
        await ws.send(json.dumps({"realtime_input": {"text": "Tell me a story."}}))
        cut = await receive_for(ws, QUIET)
        assert await answers_ping(ws)
        await ws.send(json.dumps({"realtime_input": {"text": "Are you there?"}}))
        after = await receive_until(ws, "turnComplete")
        await ws.close()

    voiced = STORY[: 5 * chunks]
    chunked = [event for start in range(0, len(voiced), 5) for event in ("A", voiced[start : start + 5])]
    assert timeline(cut) == chunked  # no turnComplete
    assert not any("generationComplete" in m.get("serverContent", {}) for m in cut)
    assert after[0] == {"serverContent": {"interrupted": True}}
    assert heard_in(after) == words("You said: Are you there.")
    assert emulator.replies() == [STORY, "You said: Are you there."]
    assert ("model", voiced) in emulator.history(0)


async def test_a_muted_session_reads_and_answers_pings_but_never_replies() -> None:
    """After its one reply the session is mute: input is recorded, never answered; unmute ends that."""
    async with GeminiLiveEmulator(mute_after_replies={0: 1}) as emulator:
        ws = await raw_connect(emulator, sessionResumption={})
        await ws.send(json.dumps({"realtime_input": {"text": "One."}}))
        first = await receive_until(ws, "turnComplete")
        await ws.send(json.dumps({"realtime_input": {"text": "Two."}}))
        # The handle that closed the first reply, then nothing.
        assert await receive_for(ws, QUIET) == [
            {"sessionResumptionUpdate": {"newHandle": "handle-2", "resumable": True}}
        ]
        assert await answers_ping(ws)
        assert emulator.user_texts() == ["One.", "Two."]
        emulator.unmute()
        await ws.send(json.dumps({"realtime_input": {"text": "Three."}}))
        third = await receive_until(ws, "turnComplete")
        await ws.close()
    assert transcript_of(first) == "You said: One."
    assert transcript_of(third) == "You said: Three."
    assert emulator.replies() == ["You said: One.", "You said: Three."]
    assert ("user", "Two.") in emulator.history(0)


async def test_mute_stops_a_reply_mid_turn_with_the_socket_open() -> None:
    """mute() mid-reply: no more chunks, no turnComplete, no interrupted; pings still answered."""
    async with GeminiLiveEmulator(script={"Tell me a story.": STORY}, realtime=True) as emulator:
        ws = await raw_connect(emulator)
        await ws.send(json.dumps({"realtime_input": {"text": "Tell me a story."}}))
        await receive_until(ws, "modelTurn")
        emulator.mute()
        await ws.send(json.dumps({"realtime_input": {"text": "Hello?"}}))
        after = await receive_for(ws, QUIET)
        assert await answers_ping(ws)
        await ws.close()
    assert len([event for event in timeline(after) if event == "A"]) <= 1
    assert "end" not in timeline(after)
    assert not any("interrupted" in m.get("serverContent", {}) for m in after)
    assert emulator.user_texts() == ["Tell me a story.", "Hello?"]
    assert emulator.replies() == [STORY]


async def test_stock_service_waits_forever_on_a_mute_session() -> None:
    """Stock: a session that stops answering is never noticed: no error, no reconnect, no reply."""
    async with GeminiLiveEmulator(mute_after_replies={0: 1}) as emulator:
        async with LiveRun(stock(emulator, keepalive=True), emulator.samples_per_char()) as run:
            await run.start_conversation("Hello.")
            await run.wait_until(lambda: run.listener.responses_ended == 1)
            await run.wait_ready()
            await run.send(InputTextRawFrame("Are you there?"))
            await emulator.wait_until(lambda: "Are you there?" in emulator.user_texts())
            # Long enough for an unanswered ping to end the connection (UNIT
            # to ping, UNIT for the pong, UNIT to close): pings are answered.
            await asyncio.sleep(4 * UNIT)
    assert run.listener.heard == words("You said: Hello.")
    assert len(emulator.connections) == 1
    assert run.errors == []


async def test_error_faults_are_refused_at_plan_time() -> None:
    """The Live API has no error message: an ERROR fault in a plan, armed or injected raises ValueError."""
    with pytest.raises(ValueError, match="no error message"):
        GeminiLiveEmulator(plan=FaultPlan(Fault.error()))
    late = GeminiLiveEmulator()
    late.plan.add(Fault.error(connection=1))
    with pytest.raises(ValueError, match="Fault.close"):
        await late.start()
    async with GeminiLiveEmulator() as emulator:
        ws = await raw_connect(emulator)
        with pytest.raises(ValueError, match="no error message"):
            emulator.arm(Fault.error(after_text_messages=1))
        with pytest.raises(ValueError, match="no error message"):
            await emulator.inject(Fault.error())
        await ws.send(json.dumps({"realtime_input": {"text": "Still here?"}}))
        assert transcript_of(await receive_until(ws, "turnComplete")) == "You said: Still here."
        await ws.close()


@pytest.mark.parametrize(
    "options",
    [
        {"continuation": "resume"},
        {"transcription": "late"},
        {"transcription": "grouped", "bundle_transcription": True},
        {"words_per_transcription": 0},
        {"repeat_words": -1},
        {"quiet_replies": {0: -1}},
        {"mute_after_replies": {-1: 0}},
    ],
)
def test_options_out_of_range_are_refused(options: dict[str, Any]) -> None:
    """An unknown mode, a bundle with another timing, or a negative count raises ValueError."""
    with pytest.raises(ValueError):
        GeminiLiveEmulator(**options)


def test_documented_client_keepalive_is_websockets_default() -> None:
    """google-genai passes no keepalive arguments, so websockets' defaults are the documented timings."""
    parameters = inspect.signature(websockets.asyncio.client.connect).parameters
    assert parameters["ping_interval"].default == CLIENT_PING_INTERVAL_S
    assert parameters["ping_timeout"].default == CLIENT_PING_TIMEOUT_S
    assert parameters["close_timeout"].default == CLIENT_CLOSE_TIMEOUT_S


@pytest.mark.parametrize(
    ("fault", "code", "received", "sent"),
    [
        (Fault.close(1011, "Internal error encountered.", after_audio_chunks=2), 1011, 1011, 1011),
        (Fault.stall(after_audio_chunks=2), 1006, None, 1011),
        (Fault.abort(after_audio_chunks=2), 1006, None, None),
    ],
    ids=["1011", "stall", "abort"],
)
async def test_google_genai_tells_a_server_close_from_its_own_keepalive_timeout(
    fault: Fault, code: int, received: int | None, sent: int | None
) -> None:
    """A 1011 close is APIError 1011 at once; a stall is APIError 1006 once the keepalive ping timed out.

    The APIError's context tells a stall from an abort: the client sent a
    1011 "keepalive ping timeout" close, and received none.
    """
    async with GeminiLiveEmulator(plan=FaultPlan(fault)) as emulator:
        options = emulator.http_options(keepalive=(UNIT, UNIT), close_timeout=UNIT)
        client = genai.Client(api_key="k", http_options=options)
        config = types.LiveConnectConfig(response_modalities=[types.Modality.AUDIO])
        with pytest.raises(errors.APIError) as raised:
            async with client.aio.live.connect(model=MODEL, config=config) as session:
                turn = types.Content(role="user", parts=[types.Part(text="Tell me a story.")])
                await session.send_client_content(turns=turn, turn_complete=True)
                async with asyncio.timeout(TIMEOUT):
                    async for _ in session.receive():
                        pass
        raised_at = time.monotonic()

    assert raised.value.code == code
    closed = raised.value.__context__
    assert isinstance(closed, ConnectionClosedError)
    assert (closed.rcvd.code if closed.rcvd else None) == received
    assert (closed.sent.code if closed.sent else None) == sent
    if fault.kind is FaultKind.STALL:
        assert closed.sent is not None and closed.sent.reason == "keepalive ping timeout"
    fault_at = emulator.connections[0].fault_at
    assert fault_at is not None
    # A stall waits out the ping timeout and the close timeout; the others are seen at once.
    waited = raised_at - fault_at
    assert waited >= 2 * UNIT if fault.kind is FaultKind.STALL else waited < 2 * UNIT
