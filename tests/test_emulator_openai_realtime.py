"""The OpenAI Realtime emulator, spoken to by a bare client and by the stock OpenAIRealtimeLLMService.

The stock-service tests run the service in a real pipeline
(``recorder -> user aggregator -> llm -> listener -> assistant aggregator``)
on 127.0.0.1 and pin down how it behaves when the connection fails: these are
the failures the product exists to fix, so if Pipecat ever fixes them, these
tests fail and we want to know.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
from typing import Any

import pytest
from pipecat.adapters.llm.schemas.function_schema import FunctionSchema
from pipecat.adapters.llm.schemas.tools_schema import ToolsSchema
from pipecat.services.llm_service import FunctionCallParams
from pipecat.services.openai.realtime import events
from pipecat.services.openai.realtime.llm import OpenAIRealtimeLLMService
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK, InvalidStatus

from pipecat_resilient.policy import CONTINUE_INSTRUCTION
from pipecat_resilient.testing import Fault, FaultPlan, ToolCall
from pipecat_resilient.testing.harness import SessionScenario
from pipecat_resilient.testing.openai_realtime import (
    PATH,
    SERVER_ERROR,
    SESSION_EXPIRED,
    Continuation,
    OpenAIRealtimeEmulator,
    TranscriptOrder,
)
from pipecat_resilient.testing.speech import SpeechDecoder, encode, samples_per_char

from .conftest import UNIT

# Every wait in this file; a passing test takes a fraction of it.
TIMEOUT = 30 * UNIT
MODEL = "gpt-realtime-2.1"
STORY = "Once upon a time there was a socket that never closed."
RATE = 24000


def words(text: str) -> list[str]:
    return text.split()


def audio_frames(text: str) -> int:
    """The 20 ms frames :meth:`SessionScenario.speak` sends for ``text`` at 24 kHz (10 ms a character)."""
    return -(-len(text) * 10 // 20)


# -- the protocol, with a bare client -------------------------------------------

_event_ids = itertools.count(1)


async def raw_connect(emulator: OpenAIRealtimeEmulator, **session: Any) -> ClientConnection:
    """Open a connection (after ``session.created``), and update the session when ``session`` is given."""
    ws = await connect(
        f"{emulator.base_url}?model={MODEL}", additional_headers={"Authorization": "Bearer test-key"}
    )
    created = json.loads(await ws.recv())
    assert created["type"] == "session.created"
    if session:
        await send(ws, "session.update", session={"type": "realtime", **session})
        await receive_until(ws, "session.updated")
    return ws


async def send(ws: ClientConnection, kind: str, **fields: Any) -> str:
    """Send a client event; returns its event_id."""
    event_id = f"client_{next(_event_ids)}"
    await ws.send(json.dumps({"type": kind, "event_id": event_id, **fields}))
    return event_id


async def receive_until(ws: ClientConnection, kind: str) -> list[dict[str, Any]]:
    """Server events up to and including the first of type ``kind``."""
    received = []
    async with asyncio.timeout(TIMEOUT):
        while True:
            event = json.loads(await ws.recv())
            received.append(event)
            if event["type"] == kind:
                return received


async def say(ws: ClientConnection, text: str) -> None:
    """A user text turn: a user message item, then response.create."""
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    await send(ws, "conversation.item.create", item=item)
    await send(ws, "response.create")


async def speak(ws: ClientConnection, text: str) -> None:
    """Speech-code user audio in 20 ms appends, then 100 ms of silence."""
    audio = encode(text, sample_rate=RATE, ms_per_char=10) + bytes(RATE // 10 * 2)
    for start in range(0, len(audio), RATE // 50 * 2):
        chunk = base64.b64encode(audio[start : start + RATE // 50 * 2]).decode()
        await send(ws, "input_audio_buffer.append", audio=chunk)


def kinds(received: list[dict[str, Any]]) -> list[str]:
    return [event["type"] for event in received]


def heard_in(received: list[dict[str, Any]]) -> list[str]:
    """The words the reply audio in ``received`` decodes to."""
    decoder = SpeechDecoder(samples_per_char(RATE, 10))
    for event in received:
        if event["type"] == "response.output_audio.delta":
            decoder.feed(base64.b64decode(event["delta"]))
    return decoder.heard()


def transcript_of(received: list[dict[str, Any]]) -> str:
    return "".join(e["delta"] for e in received if e["type"] == "response.output_audio_transcript.delta")


def error_of(received: list[dict[str, Any]]) -> dict[str, Any]:
    return next(e["error"] for e in received if e["type"] == "error")


AUDIO_REPLY = [
    "response.created",
    "response.output_item.added",
    "conversation.item.added",
    "response.content_part.added",
]
AUDIO_REPLY_END = [
    "response.output_audio.done",
    "response.output_audio_transcript.done",
    "response.content_part.done",
    "response.output_item.done",
    "conversation.item.done",
    "response.done",
]


async def test_text_turn_is_answered_in_audio_with_its_transcript() -> None:
    """A user message and response.create get the scripted reply: audio, transcript, usage, items."""
    async with OpenAIRealtimeEmulator(script={"Hello there.": "Hi! How can I help you today?"}) as emulator:
        ws = await raw_connect(emulator)
        await say(ws, "Hello there.")
        received = await receive_until(ws, "response.done")
        await ws.close()

    assert kinds(received)[:6] == ["conversation.item.added", "conversation.item.done", *AUDIO_REPLY]
    assert kinds(received)[-6:] == AUDIO_REPLY_END
    middle = set(kinds(received)[6:-6])
    assert middle == {"response.output_audio.delta", "response.output_audio_transcript.delta"}
    assert heard_in(received) == words("Hi! How can I help you today?")
    assert transcript_of(received) == "Hi! How can I help you today?"
    done = received[-1]["response"]
    assert (done["status"], done["status_details"]) == ("completed", None)
    assert done["output"][0]["content"] == [
        {"type": "output_audio", "transcript": "Hi! How can I help you today?"}
    ]
    assert done["usage"]["input_tokens"] == 2 and done["usage"]["output_token_details"]["text_tokens"] == 7
    # What the server holds and what the model read.
    assert emulator.session(0)["model"] == MODEL
    assert emulator.user_texts() == ["Hello there."]
    assert emulator.conversation(0) == [
        ("user", "Hello there."),
        ("assistant", "Hi! How can I help you today?"),
    ]
    assert [item["status"] for item in emulator.items(0)] == ["completed", "completed"]
    assert emulator.client_kinds(0) == ["conversation.item.create", "response.create"]


async def test_audio_turn_with_server_vad_is_transcribed_and_answered() -> None:
    """Speech-code audio: speech_started, speech_stopped after the silence, commit, transcript, reply."""
    async with OpenAIRealtimeEmulator() as emulator:
        audio_input = {
            "transcription": {"model": "gpt-realtime-whisper"},
            "turn_detection": {"type": "server_vad"},
        }
        ws = await raw_connect(emulator, audio={"input": {**audio_input}})
        await speak(ws, "What time is it?")
        received = await receive_until(ws, "response.done")
        await ws.close()

    assert kinds(received)[:6] == [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
        "conversation.item.input_audio_transcription.completed",
    ]
    started, stopped, committed = received[:3]
    assert started["audio_start_ms"] == 0 and started["item_id"] == stopped["item_id"] == committed["item_id"]
    # 16 characters of 10 ms, then the session's default 200 ms of silence.
    assert stopped["audio_end_ms"] == 160 + 200
    assert received[5]["transcript"] == "What time is it?"
    assert heard_in(received) == words("You said: What time is it.")
    assert emulator.user_texts() == ["What time is it?"]
    assert emulator.items(0)[0]["content"] == [{"type": "input_audio", "transcript": "What time is it?"}]


async def test_speech_during_a_reply_cancels_it() -> None:
    """Server VAD hears the user start speaking: the reply ends cancelled with reason turn_detected."""
    async with OpenAIRealtimeEmulator(realtime=True) as emulator:
        ws = await raw_connect(emulator)
        await say(ws, STORY)
        await receive_until(ws, "response.output_audio.delta")
        await speak(ws, "Stop.")
        cut = await receive_until(ws, "response.done")
        reply = await receive_until(ws, "response.done")
        await ws.close()

    assert "input_audio_buffer.speech_started" in kinds(cut)
    done = cut[-1]["response"]
    assert done["status"] == "cancelled"
    assert done["status_details"] == {"type": "cancelled", "reason": "turn_detected"}
    assert done["output"][0]["status"] == "incomplete"
    assert heard_in(reply) == words("You said: Stop.")


async def test_manual_turns_commit_and_refuse_an_empty_buffer() -> None:
    """With turn_detection null the client commits; nothing is said until response.create."""
    async with OpenAIRealtimeEmulator() as emulator:
        ws = await raw_connect(emulator, audio={"input": {"turn_detection": None}})
        commit = await send(ws, "input_audio_buffer.commit")
        refused = error_of(await receive_until(ws, "error"))
        await speak(ws, "Good morning.")
        await send(ws, "input_audio_buffer.commit")
        committed = await receive_until(ws, "conversation.item.done")
        await send(ws, "response.create")
        reply = await receive_until(ws, "response.done")
        await ws.close()

    assert refused["code"] == "input_audio_buffer_commit_empty" and refused["event_id"] == commit
    assert kinds(committed) == [
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
    ]
    assert heard_in(reply) == words("You said: Good morning.")
    # No transcription was asked for: the item holds none, but the model heard it.
    assert emulator.items(0)[0]["content"] == [{"type": "input_audio", "transcript": None}]
    assert emulator.conversation(0)[0] == ("user", "Good morning.")


async def test_function_call_round_trip() -> None:
    """A scripted tool call is a function_call item; its output and a response.create get the call's reply."""
    script = {"Weather in Paris?": ToolCall("get_weather", {"city": "Paris"})}
    async with OpenAIRealtimeEmulator(script=script) as emulator:
        ws = await raw_connect(emulator)
        await say(ws, "Weather in Paris?")
        call = await receive_until(ws, "response.done")
        done = next(e for e in call if e["type"] == "response.function_call_arguments.done")
        output = {"type": "function_call_output", "call_id": done["call_id"], "output": '{"sky": "clear"}'}
        await send(ws, "conversation.item.create", item=output)
        await send(ws, "response.create")
        reply = await receive_until(ws, "response.done")
        await ws.close()

    assert kinds(call)[2:] == [
        "response.created",
        "response.output_item.added",
        "conversation.item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "conversation.item.done",
        "response.done",
    ]
    assert (done["call_id"], done["name"], json.loads(done["arguments"])) == (
        "call_1",
        "get_weather",
        {"city": "Paris"},
    )
    assert call[-1]["response"]["output"][0]["type"] == "function_call"
    assert heard_in(reply) == words("The get_weather result is sky clear.")
    assert emulator.function_call_outputs() == [{**output}]
    assert [role for role, _ in emulator.conversation(0)] == [
        "user",
        "function_call",
        "function_call_output",
        "assistant",
    ]


async def test_text_responses_and_item_retrieval() -> None:
    """output_modalities ["text"] streams text deltas; items can be retrieved and deleted."""
    async with OpenAIRealtimeEmulator() as emulator:
        ws = await raw_connect(emulator)
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi."}]}
        await send(ws, "conversation.item.create", item=item)
        item_id = (await receive_until(ws, "conversation.item.done"))[-1]["item"]["id"]
        await send(ws, "response.create", response={"output_modalities": ["text"]})
        received = await receive_until(ws, "response.done")
        await send(ws, "conversation.item.retrieve", item_id=item_id)
        retrieved = (await receive_until(ws, "conversation.item.retrieved"))[-1]["item"]
        await send(ws, "conversation.item.delete", item_id=item_id)
        await receive_until(ws, "conversation.item.deleted")
        unknown = await send(ws, "conversation.item.retrieve", item_id=item_id)
        error = error_of(await receive_until(ws, "error"))
        await ws.close()

    assert (
        "".join(e["delta"] for e in received if e["type"] == "response.output_text.delta") == "You said: Hi."
    )
    assert "response.output_audio.delta" not in kinds(received)
    assert received[-1]["response"]["output"][0]["content"] == [
        {"type": "output_text", "text": "You said: Hi."}
    ]
    assert retrieved["content"] == [{"type": "input_text", "text": "Hi."}]
    assert error["code"] == "item_retrieve_invalid_item_id" and error["event_id"] == unknown
    assert emulator.conversation(0) == [("assistant", "You said: Hi.")]


@pytest.mark.parametrize(
    ("continuation", "reply"),
    [
        ("continue", "time there was a socket that never closed."),
        ("restart", STORY),
        ("repeat", "upon a time there was a socket that never closed."),
    ],
)
async def test_truncate_keeps_what_was_heard_and_the_model_picks_up_after_it(
    continuation: Continuation, reply: str
) -> None:
    """Truncation keeps the words played in full; a response.create then continues, restarts or repeats."""
    script = {"Tell me a story.": STORY}
    async with OpenAIRealtimeEmulator(script=script, continuation=continuation, repeat_words=2) as emulator:
        ws = await raw_connect(emulator)
        await say(ws, "Tell me a story.")
        first = await receive_until(ws, "response.done")
        item_id = first[-1]["response"]["output"][0]["id"]
        await send(ws, "conversation.item.truncate", item_id=item_id, content_index=0, audio_end_ms=60_000)
        too_far = error_of(await receive_until(ws, "error"))
        # "Once upon a ti": 14 characters of 10 ms.
        await send(ws, "conversation.item.truncate", item_id=item_id, content_index=0, audio_end_ms=140)
        truncated = (await receive_until(ws, "conversation.item.truncated"))[-1]
        await send(ws, "response.create")
        again = await receive_until(ws, "response.done")
        await ws.close()

    assert too_far["code"] == "invalid_value" and too_far["message"].startswith("Audio content of 540ms")
    assert truncated == {**truncated, "item_id": item_id, "content_index": 0, "audio_end_ms": 140}
    assert emulator.items(0)[1]["content"] == [{"type": "output_audio", "transcript": "Once upon a"}]
    assert heard_in(again) == words(reply)
    assert emulator.replies(0) == [STORY, reply]


@pytest.mark.parametrize("form", ["items", "packed", "marker"])
async def test_a_fresh_session_continues_a_recreated_cut_reply(form: str) -> None:
    """A new session given the conversation as heard (items, packed history, or the marker) continues it."""
    heard = "Once upon a time"
    history = [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": heard}]
    async with OpenAIRealtimeEmulator(script={"Tell me a story.": STORY}) as emulator:
        ws = await raw_connect(emulator)
        if form == "packed":
            packed = (
                f"This is a previously saved conversation. ...\n\n{json.dumps(history, indent=2)}\n\nThe end."
            )
            items = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": packed}]}]
        else:
            items = [
                {
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "Tell me a story."}],
                },
                {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": heard}]},
            ]
            if form == "marker":
                text = CONTINUE_INSTRUCTION
                items.append(
                    {"type": "message", "role": "system", "content": [{"type": "input_text", "text": text}]}
                )
        for item in items:
            await send(ws, "conversation.item.create", item=item)
        await send(ws, "response.create")
        reply = await receive_until(ws, "response.done")
        await ws.close()

    assert heard_in(reply) == words("there was a socket that never closed.")
    assert emulator.conversation(0)[:2] == [("user", "Tell me a story."), ("assistant", heard)]


@pytest.mark.parametrize(
    ("order", "audio_before_each_delta"),
    [("with_audio", [1, 2, 4, 5]), ("before_audio", [0, 1, 2, 3]), ("after_audio", [2, 3, 5, 5])],
)
async def test_transcript_deltas_lead_or_lag_the_audio(
    order: TranscriptOrder, audio_before_each_delta: list[int]
) -> None:
    """Transcript deltas go with, before or after the audio they transcribe, and join into the reply."""
    # Chunks of 5 characters: "Alpha", " beta", " gamm", "a del", "ta.".
    reply = "Alpha beta gamma delta."
    async with OpenAIRealtimeEmulator(script={"Go.": reply}, transcript=order) as emulator:
        ws = await raw_connect(emulator)
        await say(ws, "Go.")
        received = await receive_until(ws, "response.done")
        await ws.close()

    audio, positions = 0, []
    for event in received:
        if event["type"] == "response.output_audio.delta":
            audio += 1
        elif event["type"] == "response.output_audio_transcript.delta":
            positions.append(audio)
    assert positions == audio_before_each_delta
    assert transcript_of(received) == reply
    assert heard_in(received) == words(reply)
    # Two words a delta, with their spaces.
    async with OpenAIRealtimeEmulator(script={"Go.": reply}, transcript=order, words_per_delta=2) as emulator:
        ws = await raw_connect(emulator)
        await say(ws, "Go.")
        deltas = [
            e["delta"] for e in await receive_until(ws, "response.done") if "transcript.delta" in e["type"]
        ]
        await ws.close()
    assert deltas == ["Alpha beta ", "gamma delta."]


async def test_error_abandons_the_reply_and_leaves_the_socket_open() -> None:
    """An ERROR fault: an error event, the reply ends failed, the next turn is answered on the same socket."""
    fault = Fault.error(SERVER_ERROR, 500, after_audio_chunks=2)
    async with OpenAIRealtimeEmulator(script={"Tell me a story.": STORY}, plan=FaultPlan(fault)) as emulator:
        ws = await raw_connect(emulator)
        await say(ws, "Tell me a story.")
        failed = await receive_until(ws, "response.done")
        await say(ws, "Are you there?")
        reply = await receive_until(ws, "response.done")
        await ws.close()

    error = error_of(failed)
    assert error == {
        "type": "server_error",
        "code": None,
        "message": SERVER_ERROR,
        "param": None,
        "event_id": None,
    }
    assert kinds(failed).count("response.output_audio.delta") == 2
    assert kinds(failed)[kinds(failed).index("error") :] == ["error", *AUDIO_REPLY_END]
    done = failed[-1]["response"]
    assert done["status"] == "failed"
    assert done["status_details"] == {
        "type": "failed",
        "error": {"type": "server_error", "code": None, "message": SERVER_ERROR},
    }
    assert done["output"][0]["status"] == "incomplete"
    assert done["output"][0]["content"] == [{"type": "output_audio", "transcript": "Once upon "}]
    assert heard_in(reply) == words("You said: Are you there.")
    assert len(emulator.connections) == 1 and emulator.connections[0].errors == [fault]


async def test_error_on_user_audio_drops_what_was_buffered() -> None:
    """An ERROR on an audio append drops the audio buffered so far; what follows is a new utterance."""
    plan = FaultPlan(Fault.error("bad audio", 400, after_audio_received=1))
    async with OpenAIRealtimeEmulator(plan=plan) as emulator:
        ws = await raw_connect(emulator)
        await speak(ws, "Good morning.")
        received = await receive_until(ws, "response.done")
        await ws.close()

    assert error_of(received)["type"] == "invalid_request_error"
    # The first 20 ms ("Go") went with the error.
    assert emulator.user_texts() == ["od morning."]
    assert heard_in(received) == words("You said: od morning.")


async def test_session_limit_sends_session_expired_then_closes_with_1001() -> None:
    """When the session's time is up: the real API's session_expired error, then a 1001 close."""
    async with OpenAIRealtimeEmulator(session_max_seconds=2 * UNIT) as emulator:
        ws = await raw_connect(emulator)
        expired = error_of(await receive_until(ws, "error"))
        with pytest.raises(ConnectionClosedOK) as closed:
            await ws.recv()

    assert expired == {
        "type": "invalid_request_error",
        "code": "session_expired",
        "message": SESSION_EXPIRED,
        "param": None,
        "event_id": None,
    }
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1001, SESSION_EXPIRED)  # type: ignore[union-attr]


async def test_cancel_and_a_second_create_are_answered_as_the_real_api_does() -> None:
    """response.cancel ends a reply cancelled; a create while one runs, or a cancel with none, is an error."""
    async with OpenAIRealtimeEmulator(realtime=True) as emulator:
        ws = await raw_connect(emulator)
        await say(ws, STORY)
        await receive_until(ws, "response.output_audio.delta")
        busy = await send(ws, "response.create")
        busy_error = error_of(await receive_until(ws, "error"))
        await send(ws, "response.cancel")
        cancelled = (await receive_until(ws, "response.done"))[-1]["response"]
        idle = await send(ws, "response.cancel")
        idle_error = error_of(await receive_until(ws, "error"))
        await ws.close()

    assert busy_error["code"] == "conversation_already_has_active_response" and busy_error["event_id"] == busy
    assert cancelled["status_details"] == {"type": "cancelled", "reason": "client_cancelled"}
    assert idle_error["code"] == "response_cancel_not_active" and idle_error["event_id"] == idle


async def test_faults_on_user_turns_and_handshakes() -> None:
    """after_text_messages counts user turns and leaves the Nth unanswered; refusals, keys and paths fail."""
    plan = FaultPlan(Fault.close(1011, after_text_messages=2), Fault.refuse(503, connection=1))
    async with OpenAIRealtimeEmulator(plan=plan, api_key="test-key") as emulator:
        ws = await raw_connect(emulator)
        await say(ws, "One.")
        await receive_until(ws, "response.done")
        await say(ws, "Two.")
        with pytest.raises(ConnectionClosedError) as closed:
            await receive_until(ws, "never")
        assert closed.value.rcvd.code == 1011  # type: ignore[union-attr]
        assert emulator.user_texts(0) == ["One.", "Two."]
        assert [text for _, text in emulator.conversation(0)] == ["One.", "You said: One."]

        for url, key, status in [
            (emulator.base_url, "test-key", 503),
            (emulator.base_url, "wrong", 401),
            (emulator.url + "/v1/other", "test-key", 404),
        ]:
            with pytest.raises(InvalidStatus) as refused:
                await connect(url, additional_headers={"Authorization": f"Bearer {key}"})
            assert refused.value.response.status_code == status


# -- the stock service against the emulator ------------------------------------


class RealtimeRun(SessionScenario):
    """The kit's SessionScenario, waiting on the stock service's own readiness."""

    async def wait_ready(self) -> None:
        """Wait until the service has an updated session (nothing downstream marks it)."""
        llm = self.llm
        async with asyncio.timeout(TIMEOUT):
            while not llm._api_session_ready:  # type: ignore[attr-defined]
                await asyncio.sleep(UNIT / 20)

    async def say(self, text: str) -> None:
        """Speak ``text`` at the 24 kHz the API takes (no resampling, which would garble speech code)."""
        await self.speak(text, sample_rate=RATE)

    def user_texts(self) -> list[str]:
        return [
            str(m.get("content"))
            for m in self.context.get_messages()
            if isinstance(m, dict) and m.get("role") == "user"
        ]


async def eventually(predicate: Any) -> None:
    """Wait until ``predicate()`` holds, checking every few milliseconds (for state nothing signals)."""
    async with asyncio.timeout(TIMEOUT):
        while not predicate():
            await asyncio.sleep(UNIT / 20)


def stock(emulator: OpenAIRealtimeEmulator, **kwargs: Any) -> OpenAIRealtimeLLMService:
    """The stock service pointed at ``emulator``, transcribing user audio, with 100 ms of VAD silence."""
    audio_input = events.AudioInput(
        transcription=events.InputAudioTranscription(),
        turn_detection=events.TurnDetection(silence_duration_ms=int(1000 * UNIT)),
    )
    properties = events.SessionProperties(audio=events.AudioConfiguration(input=audio_input))
    return OpenAIRealtimeLLMService(
        api_key="test-key",
        base_url=emulator.base_url,
        settings=OpenAIRealtimeLLMService.Settings(model=MODEL, session_properties=properties),
        **kwargs,
    )


async def test_stock_answers_a_text_turn_and_an_audio_turn_whole() -> None:
    """A seeded user turn and a spoken one get their replies, heard whole; the context holds what was said."""
    script = {"Hello there.": "Hi! How can I help you today?"}
    async with OpenAIRealtimeEmulator(script=script, api_key="test-key") as emulator:
        async with RealtimeRun(stock(emulator), emulator.samples_per_char()) as run:
            await run.start_conversation("Hello there.")
            await run.wait_until(lambda: run.listener.responses_ended == 1, TIMEOUT)
            await run.say("What time is it?")
            await run.wait_until(lambda: run.listener.responses_ended == 2, TIMEOUT)

        assert run.listener.heard == words("Hi! How can I help you today? You said: What time is it.")
        assert run.listener.fragments == []
        assert run.assistant_texts == ["Hi! How can I help you today?", "You said: What time is it."]
        assert run.user_texts() == ["Hello there.", "What time is it?"]
        assert run.errors == []
        # Stock: a reply it asked for opens with two LLMFullResponseStartFrames (one when
        # it sends response.create, one on the assistant item); one the server VAD
        # started opens with one, after the interruption the user's speech caused.
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
        assert len(emulator.connections) == 1
        assert emulator.connections[0].path == f"{PATH}?model={MODEL}"
        assert emulator.client_kinds(0)[:4] == [
            "session.update",
            "conversation.item.create",
            "session.update",
            "response.create",
        ]
        assert emulator.session(0)["audio"]["input"]["transcription"] == {"model": "gpt-realtime-whisper"}


async def test_stock_tool_call_round_trips() -> None:
    """A scripted tool call runs the registered function once; its output reaches the model, which answers."""
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
        await params.result_callback({"temperature": 21})

    async with OpenAIRealtimeEmulator(script=script) as emulator:
        llm = stock(emulator)
        llm.register_function("get_weather", get_weather)
        run = RealtimeRun(llm, emulator.samples_per_char())
        run.context.set_tools(tools)
        async with run:
            await run.start_conversation("What's the weather in Paris?")
            await run.wait_until(lambda: run.listener.heard[-1:] == ["21."], TIMEOUT)

        assert calls == [("call_1", {"city": "Paris"})]
        outputs = emulator.function_call_outputs()
        assert [(o["type"], o["call_id"], o["output"]) for o in outputs] == [
            ("function_call_output", "call_1", '{"temperature": 21}')
        ]
        assert run.listener.heard == words("The get_weather result is temperature 21.")
        assert run.errors == []


@pytest.mark.parametrize(
    "fault",
    [Fault.close(1011, "keepalive ping timeout", after_audio_chunks=3), Fault.abort(after_audio_chunks=3)],
    ids=["1011", "abort"],
)
async def test_stock_drop_mid_reply_never_reconnects(fault: Fault) -> None:
    """Stock: a drop mid-reply ends the service for good: no reconnect, the reply left open, errors on input.

    Measured: 3 audio chunks reach the listener ("Once upon a" and the
    fragment "tim"), then nothing. No TTSStoppedFrame or
    LLMFullResponseEndFrame ever comes and the service still counts the
    response as active, so while the pipeline runs the context gets no
    assistant text at all. The receive task dies with the ConnectionClosed
    exception, which Pipecat's task manager only logs ("... unexpected
    exception"); there is never a second connection, and each of the 7 audio
    frames of the next user turn becomes an ErrorFrame "Error sending client
    event: received 1011 (internal error) ..." (or "... no close frame received
    or sent" after an abort). Only cancelling the pipeline flushes the
    aggregator, which then writes the 2 transcribed words "Once upon" - not the
    3 heard.
    """
    async with OpenAIRealtimeEmulator(script={"Tell me a story.": STORY}, plan=FaultPlan(fault)) as emulator:
        llm = stock(emulator)
        async with RealtimeRun(llm, emulator.samples_per_char()) as run:
            await run.start_conversation("Tell me a story.")
            await eventually(lambda: emulator.connections[0].closed)
            await run.say("Are you there?")
            await run.recorder.wait_until(lambda: len(run.errors) == audio_frames("Are you there?"), TIMEOUT)
            await asyncio.sleep(3 * UNIT)  # time for a reconnect to show up: none does
            assert llm._response_active
            assert run.assistant_texts == []

        assert len(emulator.connections) == 1
        assert run.listener.heard == words("Once upon a") and run.listener.fragments == ["tim"]
        assert run.listener.kinds() == ["response-start", "response-start", "started"]
        assert run.user_texts() == ["Tell me a story."]
        closed = "received 1011 (internal error)" if fault.code == 1011 else "no close frame received or sent"
        assert all(
            e.error.startswith("Error sending client event: ") and closed in e.error for e in run.errors
        )
        assert run.assistant_texts == ["Once upon"]


async def test_stock_error_event_stops_it_listening_on_an_open_socket() -> None:
    """Stock: an error event is one ErrorFrame and the end of reading; the socket stays open, unread.

    Measured: the ErrorFrame reads "Error: event_id=... type='error'
    error=RealtimeError(type='server_error', ...)"; the receive loop returns
    ("errors are fatal"), so the failed response.done is never read and the cut
    reply stays open (no stop, no end, no assistant text in the context). The
    next user turn still goes out on the open socket and the emulator answers
    it in full ("You said: Are you there."), but the listener hears none of it
    and no further ErrorFrame says so. The unread events fill the websocket's
    receive queue, so the client stops reading the socket: cancelling the
    pipeline then takes 10.0 s, the close handshake waiting out websockets'
    close timeout (shortened here). Cancelling flushes the 2 transcribed words
    "Once upon" into the context.
    """
    plan = FaultPlan(Fault.error(SERVER_ERROR, 500, after_audio_chunks=3))
    async with OpenAIRealtimeEmulator(script={"Tell me a story.": STORY}, plan=plan) as emulator:
        llm = stock(emulator)
        async with RealtimeRun(llm, emulator.samples_per_char()) as run:
            await run.start_conversation("Tell me a story.")
            await run.recorder.wait_until(lambda: len(run.errors) == 1, TIMEOUT)
            await run.say("Are you there?")
            await emulator.wait_until(lambda: emulator.sent_kinds(0).count("response.done") == 2, TIMEOUT)
            await asyncio.sleep(2 * UNIT)
            assert llm._response_active
            assert run.assistant_texts == []
            assert not emulator.connections[0].closed
            # The unread events filled websockets' queue, so the client stopped reading
            # the socket: the close on cancel would wait out its 10 s close timeout.
            websocket = llm._websocket
            assert websocket is not None
            assert not websocket.transport.is_reading()
            websocket.close_timeout = UNIT

        assert len(run.errors) == 1
        assert "type='server_error'" in run.errors[0].error and SERVER_ERROR in run.errors[0].error
        assert len(emulator.connections) == 1
        assert emulator.replies(0) == [STORY, "You said: Are you there."]
        assert (
            emulator.sent(0)[emulator.sent_kinds(0).index("response.done")]["response"]["status"] == "failed"
        )
        assert run.listener.heard == words("Once upon a")
        assert run.listener.kinds() == ["response-start", "response-start", "started"]
        assert run.assistant_texts == ["Once upon"]


async def test_stock_session_limit_ends_the_conversation() -> None:
    """Stock: session_expired is one ErrorFrame, then the 1001 close; no new session, later input errors.

    Measured: after the error the service stops reading; the server's 1001
    close leaves it with a dead socket it never replaces (one connection), so
    each of the 7 audio frames of the next turn is an ErrorFrame "Error
    sending client event: received 1001 (going away) Your session hit the
    maximum duration of 60 minutes. ...". The reply before the limit was
    whole, and stays in the context; the user's next turn never reaches it.
    """
    async with OpenAIRealtimeEmulator(session_max_seconds=5 * UNIT) as emulator:
        async with RealtimeRun(stock(emulator), emulator.samples_per_char()) as run:
            await run.start_conversation("Hello.")
            await run.wait_until(lambda: run.listener.responses_ended == 1, TIMEOUT)
            await run.recorder.wait_until(lambda: len(run.errors) == 1, TIMEOUT)
            await eventually(lambda: emulator.connections[0].closed)
            await run.say("Are you there?")
            await run.recorder.wait_until(
                lambda: len(run.errors) == 1 + audio_frames("Are you there?"), TIMEOUT
            )
            await asyncio.sleep(2 * UNIT)

        assert "code='session_expired'" in run.errors[0].error and SESSION_EXPIRED in run.errors[0].error
        assert all(f"received 1001 (going away) {SESSION_EXPIRED}" in e.error for e in run.errors[1:])
        assert len(emulator.connections) == 1
        assert run.listener.heard == words("You said: Hello.")
        assert run.assistant_texts == ["You said: Hello."]
        assert run.user_texts() == ["Hello."]
        assert emulator.user_texts() == ["Hello."]


@pytest.mark.parametrize(
    ("continuation", "said"),
    [
        ("continue", "there was a socket that never closed."),
        ("restart", STORY),
        ("repeat", "a time there was a socket that never closed."),
    ],
)
async def test_fresh_stock_service_seeded_with_a_cut_reply(continuation: Continuation, said: str) -> None:
    """A fresh stock service given the conversation as heard packs it into one message; the model picks up.

    What the user hears next depends on the model: the rest, the whole reply
    again, or the rest after a repeat of the last heard words. The context
    gets the new reply as a second assistant message.
    """
    async with OpenAIRealtimeEmulator(
        script={"Tell me a story.": STORY}, continuation=continuation, repeat_words=2
    ) as emulator:
        async with RealtimeRun(stock(emulator), emulator.samples_per_char()) as run:
            run.context.add_message({"role": "user", "content": "Tell me a story."})
            run.context.add_message({"role": "assistant", "content": "Once upon a time"})
            await run.start_conversation()
            await run.wait_until(lambda: run.listener.responses_ended == 1, TIMEOUT)

        assert run.listener.heard == words(said)
        assert run.assistant_texts == ["Once upon a time", said]
        created = emulator.client_messages("conversation.item.create", 0)
        assert (
            len(created) == 1 and "previously saved conversation" in created[0]["item"]["content"][0]["text"]
        )
