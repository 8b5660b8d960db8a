"""The Deepgram TTS emulator, spoken to by a bare websocket client and by the stock DeepgramTTSService.

The protocol tests drive ``/v1/speak`` by hand. The stock-service tests run
``DeepgramTTSService`` in the kit's Scenario (``recorder -> tts -> listener ->
assistant aggregator``) over a real socket, and pin down how it behaves when
the connection fails: if Pipecat ever changes that, these tests fail and we
want to know.

What the stock service does, measured here (24 kHz, 10 ms per character,
2000-byte audio messages, so 3 messages carry 12.5 characters: "Hello world,"
and half the space after it):

* it sends one Speak per sentence and a single Flush at the end of the turn,
  and pushes each sentence's TTSTextFrame as soon as the Speak is sent, so
  every text frame of a turn reaches the context before the turn's first
  audio (Deepgram has no word timestamps);
* a 1011 close after 3 audio messages: 2 of 10 words heard, all 10 in the
  context, one ErrorFrame (from sending Close on the dead socket while it
  reconnects), one immediate reconnect that is never sent the rest, and the
  utterance is never stopped (no TTSStoppedFrame);
* an abort (1006) after 3 audio messages: the same figures;
* the same drop with more utterances queued behind it: the reconnect races a
  connection ``run_tts`` opens itself, the receive loop is left reading an
  orphan socket, no later audio is heard, and after three silent contexts
  the service is declared unusable;
* an Error message with the socket open after 3 audio messages: 2 of 10 words
  heard, all 10 in the context, no ErrorFrame (the message is logged at debug
  level as an unknown type), no reconnect; the utterance is never stopped and
  the next one waits ``stop_frame_timeout_s`` for the dead context to time out,
  then plays in full on the same socket;
* a Warning in the middle of the audio: logged, every word heard, no error.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from pipecat.frames.frames import (
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TTSSpeakFrame,
)
from pipecat.services.deepgram.tts import DeepgramTTSService
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, InvalidStatus

from pipecat_resilient.testing import Fault, FaultKind, FaultPlan, Scenario, SpeechDecoder
from pipecat_resilient.testing.deepgram_tts import DeepgramTTSEmulator

from .conftest import UNIT

# Every wait in this file; a passing test takes a fraction of it.
TIMEOUT = 50 * UNIT
# The stock service ends an audio context after this long without audio (its
# default is 3 s); shortened so a context that never gets its Flushed ends fast.
STOP_FRAME_TIMEOUT = 5 * UNIT

KEY = "test-key"
VOICE = "aura-2-test-en"
RATE = 24000
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


def speak_url(emulator: DeepgramTTSEmulator, **params: str) -> str:
    query = {"model": VOICE, "encoding": "linear16", "sample_rate": str(RATE), **params}
    return f"{emulator.url}/v1/speak?" + "&".join(f"{k}={v}" for k, v in query.items())


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Token {key}"}


async def speak(ws: ClientConnection, *texts: str, flush: bool = True) -> None:
    for text in texts:
        await ws.send(json.dumps({"type": "Speak", "text": text}))
    if flush:
        await ws.send(json.dumps({"type": "Flush"}))


async def receive_until(ws: ClientConnection, kind: str) -> tuple[list[bytes], list[dict[str, Any]]]:
    """Read until a JSON message of type ``kind``; return the audio and JSON messages read (it included)."""
    audio: list[bytes] = []
    messages: list[dict[str, Any]] = []
    async with asyncio.timeout(TIMEOUT):
        while True:
            message = await ws.recv()
            if isinstance(message, bytes):
                audio.append(message)
                continue
            messages.append(json.loads(message))
            if messages[-1]["type"] == kind:
                return audio, messages


def heard(emulator: DeepgramTTSEmulator, audio: list[bytes]) -> list[str]:
    decoder = SpeechDecoder(emulator.samples_per_char(RATE))
    for chunk in audio:
        decoder.feed(chunk)
    return decoder.heard()


# -- protocol ----------------------------------------------------------------


async def test_speak_and_flush_give_audio_then_flushed() -> None:
    """Metadata on open; text waits for a Flush; its audio, then Flushed with the flush's sequence_id."""
    async with DeepgramTTSEmulator(api_key=KEY) as emulator:
        async with connect(speak_url(emulator), additional_headers=auth()) as ws:
            metadata = json.loads(await ws.recv())
            assert metadata["type"] == "Metadata" and metadata["model_name"] == VOICE
            await speak(ws, "Hi there, ", "friend.", flush=False)
            await speak(ws, "How are you? ")
            audio, messages = await receive_until(ws, "Flushed")
            assert messages == [{"type": "Flushed", "sequence_id": 0}]
            # Speak texts are joined exactly as sent, with no separator added.
            assert heard(emulator, audio) == ["Hi", "there,", "friend.How", "are", "you?"]
            await speak(ws, "Fine.")
            audio, messages = await receive_until(ws, "Flushed")
            assert messages == [{"type": "Flushed", "sequence_id": 1}]
            assert heard(emulator, audio) == ["Fine."]
        record = emulator.connections[0]
        assert record.texts == [
            (None, "Hi there, "),
            (None, "friend."),
            (None, "How are you? "),
            (None, "Fine."),
        ]
        assert [m["type"] for m in record.messages] == ["Speak", "Speak", "Speak", "Flush", "Speak", "Flush"]
        assert emulator.models == [VOICE]


async def test_audio_messages_cut_through_characters_and_words() -> None:
    """Binary messages have a fixed size that splits characters and words; the last of a flush is short."""
    async with DeepgramTTSEmulator() as emulator:
        async with connect(speak_url(emulator)) as ws:
            await speak(ws, SENTENCE)
            audio, _ = await receive_until(ws, "Flushed")
    char_bytes = 2 * emulator.samples_per_char(RATE)
    sizes = [len(chunk) for chunk in audio]
    assert sizes[:-1] == [emulator.bytes_per_chunk] * (len(sizes) - 1)
    assert sum(sizes) == len(SENTENCE) * char_bytes and sizes[-1] < emulator.bytes_per_chunk
    edges = [sum(sizes[: i + 1]) for i in range(len(sizes) - 1)]
    assert len([edge for edge in edges if edge % char_bytes]) > len(edges) / 2  # most cut a character
    inside_words = [
        e for e in edges if SENTENCE[e // char_bytes] != " " and SENTENCE[e // char_bytes - 1] != " "
    ]
    assert inside_words  # some cut a word too
    assert heard(emulator, audio) == words(SENTENCE)


async def test_clear_drops_the_buffer_and_the_audio_not_sent() -> None:
    """Clear stops the audio at once and answers Cleared; the cut flush never gets Flushed."""
    long = "This answer goes on for a good while before it reaches its end. " * 4
    async with DeepgramTTSEmulator(realtime=True, ms_per_char=2) as emulator:
        async with connect(speak_url(emulator)) as ws:
            await ws.recv()  # Metadata
            await speak(ws, long)
            await speak(ws, "Never flushed.", flush=False)
            first = await ws.recv()
            assert isinstance(first, bytes)
            await ws.send(json.dumps({"type": "Clear"}))
            audio, messages = await receive_until(ws, "Cleared")
            assert messages == [{"type": "Cleared", "sequence_id": 1}]
            assert len(audio) < 3
            await speak(ws, "Yes?")
            audio, messages = await receive_until(ws, "Flushed")
            assert messages == [{"type": "Flushed", "sequence_id": 1}]
            assert heard(emulator, audio) == ["Yes?"]


async def test_error_leaves_the_socket_open_and_the_next_flush_works() -> None:
    """An ERROR fault: Deepgram's Error message, the flush in progress abandoned, the connection serves on."""
    fault = Fault.error("synthesis failed", 500, after_audio_chunks=2)
    async with DeepgramTTSEmulator(plan=FaultPlan(fault)) as emulator:
        async with connect(speak_url(emulator)) as ws:
            await speak(ws, SENTENCE)
            audio, messages = await receive_until(ws, "Error")
            assert len(audio) == 2
            assert messages[-1] == {
                "type": "Error",
                "description": "synthesis failed",
                "message": "status 500",
            }
            await speak(ws, SECOND)
            audio, messages = await receive_until(ws, "Flushed")
            assert [m["type"] for m in messages] == ["Flushed"] and messages[0]["sequence_id"] == 1
            assert heard(emulator, audio) == words(SECOND)
            record = emulator.connections[0]
            assert not record.closed and record.errors == [fault]


async def test_error_on_a_speak_drops_its_text() -> None:
    """An ERROR fault on a Speak message: that flush sends no audio and no Flushed; the next one does."""
    plan = FaultPlan(Fault.error("bad text", 400, after_text_messages=1))
    async with DeepgramTTSEmulator(plan=plan) as emulator:
        async with connect(speak_url(emulator)) as ws:
            await ws.recv()  # Metadata
            await speak(ws, SENTENCE)
            assert json.loads(await ws.recv())["type"] == "Error"
            await speak(ws, SECOND)
            audio, messages = await receive_until(ws, "Flushed")
            assert messages == [{"type": "Flushed", "sequence_id": 1}]
            assert heard(emulator, audio) == words(SECOND)


async def test_warning_arrives_in_the_middle_of_the_audio() -> None:
    """warning_after_chunks sends Warning {type, description, code} between audio messages."""
    warning = ("W-TEST", "Text normalized.")
    async with DeepgramTTSEmulator(warning_after_chunks=2, warning=warning) as emulator:
        async with connect(speak_url(emulator)) as ws:
            await ws.recv()  # Metadata
            await speak(ws, SENTENCE)
            before, messages = await receive_until(ws, "Warning")
            assert messages == [{"type": "Warning", "description": "Text normalized.", "code": "W-TEST"}]
            after, _ = await receive_until(ws, "Flushed")
            assert len(before) == 2 and after
            assert heard(emulator, before + after) == words(SENTENCE)


async def test_complete_sentences_of_a_long_buffer_are_spoken_before_a_flush() -> None:
    """auto_generate_chars: the complete sentences go out unflushed; the rest waits for the Flush."""
    async with DeepgramTTSEmulator(auto_generate_chars=20) as emulator:
        async with connect(speak_url(emulator)) as ws:
            await ws.recv()  # Metadata
            await speak(ws, "The weather is sunny. Tomorrow it ", flush=False)
            early: list[bytes] = []
            size = len("The weather is sunny.") * 2 * emulator.samples_per_char(RATE)
            async with asyncio.timeout(TIMEOUT):
                while sum(len(chunk) for chunk in early) < size:
                    message = await ws.recv()
                    assert isinstance(message, bytes)
                    early.append(message)
            assert heard(emulator, early) == ["The", "weather", "is", "sunny."]
            await speak(ws, "will rain.")
            audio, messages = await receive_until(ws, "Flushed")
            assert messages == [{"type": "Flushed", "sequence_id": 0}]
            assert heard(emulator, audio) == ["Tomorrow", "it", "will", "rain."]


async def test_close_message_flushes_then_closes_normally() -> None:
    """Close speaks the buffered text, then closes with 1000."""
    async with DeepgramTTSEmulator() as emulator:
        async with connect(speak_url(emulator)) as ws:
            await speak(ws, "Goodbye now.", flush=False)
            await ws.send(json.dumps({"type": "Close"}))
            audio = [message async for message in ws if isinstance(message, bytes)]
            assert ws.close_code == 1000
        assert heard(emulator, audio) == ["Goodbye", "now."]


@pytest.mark.parametrize(
    ("message", "code"),
    [
        (b"\x00\x01", 1003),
        (json.dumps({"type": "KeepAlive"}), 1008),
        ("not json", 1008),
        (json.dumps({"type": "Speak", "text": "a" * 2001}), 1009),
    ],
)
async def test_messages_it_cannot_take_close_the_socket(message: str | bytes, code: int) -> None:
    """Binary input, unknown or unparseable messages and over-long text close with Deepgram's codes."""
    async with DeepgramTTSEmulator() as emulator:
        async with connect(speak_url(emulator)) as ws:
            await ws.send(message)
            with pytest.raises(ConnectionClosed):
                async with asyncio.timeout(TIMEOUT):
                    while True:
                        await ws.recv()
            assert ws.close_code == code


async def test_idle_connection_is_closed_with_1011() -> None:
    """idle_timeout: a client that sends nothing is disconnected with 1011."""
    async with DeepgramTTSEmulator(idle_timeout=2 * UNIT) as emulator:
        async with connect(speak_url(emulator)) as ws:
            with pytest.raises(ConnectionClosedError) as closed:
                async with asyncio.timeout(TIMEOUT):
                    while True:
                        await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011


async def test_handshake_checks_the_token_path_and_format() -> None:
    """Wrong or missing token: 401 with dg-error; unknown path 404; an encoding it cannot emulate 400."""
    async with DeepgramTTSEmulator(api_key=KEY) as emulator:
        for headers, url, status in [
            (auth("wrong"), speak_url(emulator), 401),
            ({"Authorization": KEY}, speak_url(emulator), 401),
            ({}, speak_url(emulator), 401),
            (auth(), f"{emulator.url}/v1/listen?model={VOICE}", 404),
            (auth(), speak_url(emulator, encoding="mulaw"), 400),
        ]:
            with pytest.raises(InvalidStatus) as refused:
                async with connect(url, additional_headers=headers):
                    pass
            assert refused.value.response.status_code == status
            assert refused.value.response.headers["dg-error"]
        async with connect(speak_url(emulator, model="aura-2-other-en"), additional_headers=auth("test-key")):
            pass
        assert [c.refused for c in emulator.connections] == [401, 401, 401, 404, 400, None]
        assert emulator.models[-1] == "aura-2-other-en"


async def test_faults_count_audio_messages_and_speak_messages() -> None:
    """after_audio_chunks counts binary messages sent; after_text_messages counts Speak messages only."""
    plan = FaultPlan(
        Fault.close(1011, after_audio_chunks=3),
        Fault.close(1012, after_text_messages=2, connection=1),
    )
    async with DeepgramTTSEmulator(plan=plan) as emulator:
        async with connect(speak_url(emulator)) as ws:
            await speak(ws, SENTENCE)
            audio = []
            with pytest.raises(ConnectionClosedError):
                async for message in ws:
                    if isinstance(message, bytes):
                        audio.append(message)
            assert len(audio) == 3 and ws.close_code == 1011
        async with connect(speak_url(emulator)) as ws:
            await speak(ws, "One.")  # a Speak and a Flush: one text message
            await receive_until(ws, "Flushed")
            await speak(ws, "Two.", flush=False)
            with pytest.raises(ConnectionClosedError):
                await receive_until(ws, "Flushed")
            assert ws.close_code == 1012
        assert emulator.connections[1].texts == [(None, "One."), (None, "Two.")]


# -- the stock DeepgramTTSService ---------------------------------------------


def stock(emulator: DeepgramTTSEmulator) -> DeepgramTTSService:
    return DeepgramTTSService(
        api_key=KEY,
        base_url=emulator.url,
        settings=DeepgramTTSService.Settings(voice=VOICE),
        stop_frame_timeout_s=STOP_FRAME_TIMEOUT,
    )


async def start(emulator: DeepgramTTSEmulator, *frames: object) -> Scenario:
    run = Scenario(stock(emulator), spc=emulator.samples_per_char(RATE), sample_rate=RATE)
    await run.start()
    await run.send(*frames)  # type: ignore[arg-type]
    return run


def turn(tokens: list[str]) -> list[object]:
    return [LLMFullResponseStartFrame(), *[LLMTextFrame(t) for t in tokens], LLMFullResponseEndFrame()]


async def test_stock_service_speaks_a_speak_frame() -> None:
    """A TTSSpeakFrame: one Speak, one Flush; every word heard, its text frame ahead of its audio."""
    async with DeepgramTTSEmulator(api_key=KEY) as emulator:
        run = await start(emulator, TTSSpeakFrame(SENTENCE))
        await run.wait_until(lambda: run.listener.stopped == 1, TIMEOUT)
        await run.end()
        assert run.heard == words(SENTENCE)
        assert run.context_words == run.heard
        assert run.errors == []
        assert [m.kind for m in run.listener.marks] == ["started", "text", "audio", "stopped"]
        record = emulator.connections[0]
        assert record.texts == [(None, SENTENCE + " ")]
        assert [m["type"] for m in record.messages] == ["Speak", "Flush", "Close"]
        assert emulator.models == [VOICE]


async def test_stock_service_speaks_a_streamed_turn() -> None:
    """An LLM turn: a Speak per sentence, one Flush at the end; all text frames precede the turn's audio."""
    async with DeepgramTTSEmulator(api_key=KEY) as emulator:
        run = await start(emulator, *turn(TURN_TOKENS))
        await run.wait_until(lambda: run.listener.responses_ended == 1, TIMEOUT)
        await run.end()
        assert run.heard == words(TURN)
        assert run.context_words == run.heard
        assert run.errors == []
        assert [m.kind for m in run.listener.marks] == [
            "response-start",
            "started",
            "text",
            "text",
            "text",
            "audio",
            "stopped",
            "response-end",
        ]
        record = emulator.connections[0]
        assert record.texts == [
            (None, "The weather today is sunny and warm. "),
            (None, "Tomorrow it will rain in the afternoon. "),
            (None, "Bring an umbrella to work. "),
        ]
        assert [m["type"] for m in record.messages] == ["Speak", "Speak", "Speak", "Flush", "Close"]


@pytest.mark.parametrize(
    "fault", [Fault.close(1011, after_audio_chunks=3), Fault.abort(after_audio_chunks=3)]
)
async def test_stock_service_loses_the_rest_of_a_dropped_utterance(fault: Fault) -> None:
    """A 1011 close or an abort after 3 audio messages.

    Measured: 2 of 10 words heard, all 10 in the context; one ErrorFrame, from
    sending Close on the dead socket during the reconnect; one reconnect,
    right away, to the same voice, never sent the rest; no TTSStoppedFrame.
    """
    async with DeepgramTTSEmulator(plan=FaultPlan(fault), api_key=KEY) as emulator:
        run = await start(emulator, TTSSpeakFrame(SENTENCE))
        await emulator.wait_for_connections(2, TIMEOUT)
        await run.recorder.wait_until(lambda: len(run.errors) == 1, TIMEOUT)
        await run.end()
        assert run.heard == words(SENTENCE)[:2]
        assert run.context_words == words(SENTENCE)
        [error] = run.errors
        expected = "1011" if fault.kind is FaultKind.CLOSE else "no close frame"
        assert expected in error.error and not error.fatal
        assert len(emulator.connections) == 2 and emulator.models == [VOICE, VOICE]
        assert emulator.connections[1].texts == []
        assert run.listener.started == 1 and run.listener.stopped == 0
        # The sentence's text frame was pushed before the audio that never came.
        assert [m.kind for m in run.listener.marks] == ["started", "text", "audio"]


async def test_stock_service_goes_deaf_when_it_speaks_during_a_reconnect() -> None:
    """Utterances queued behind one that is dropped: the stock service races its own reconnect.

    Measured (4 TTSSpeakFrames sent at once, every connection closed with 1011
    after 3 audio messages): the drop releases the next utterance while the
    receive loop reconnects, and ``run_tts`` opens a connection of its own, so
    two handshakes race. The receive loop keeps the first (an orphan that is
    never sent anything); the utterance goes out on the second, whose audio and
    1011 close are never read. Each later utterance finds its socket closed and
    opens another. 5 connections, 1 word heard ("Utterance", of the first), one
    reconnect error, then three contexts "completed with no audio" and the
    service is declared unusable.
    """
    plan = FaultPlan(Fault.close(1011, after_audio_chunks=3, connection=None))
    async with DeepgramTTSEmulator(plan=plan, api_key=KEY) as emulator:
        tts = stock(emulator)
        run = Scenario(tts, spc=emulator.samples_per_char(RATE), sample_rate=RATE)
        await run.start()
        await run.send(*[TTSSpeakFrame(f"Utterance number {i} is here.") for i in range(4)])
        await run.recorder.wait_until(lambda: len(run.errors) == 4, TIMEOUT)
        errors = [e.error for e in run.errors]
        await run.end()
        assert not tts.is_usable
        assert "1011" in errors[0]
        assert ["completed with no audio" in e for e in errors[1:]] == [True] * 3
        assert "3 consecutive" in errors[-1]
        assert len(emulator.connections) == 5
        assert emulator.connections[1].messages == []
        for index, record in enumerate(emulator.connections[2:], start=1):
            assert record.texts == [(None, f"Utterance number {index} is here. ")]
            assert record.audio_chunks == 3 and record.fault is not None
        assert run.heard == ["Utterance"]


async def test_stock_service_ignores_an_error_message() -> None:
    """An Error message after 3 audio messages, the socket left open.

    Measured: 2 of 10 words heard, all 10 in the context, no ErrorFrame, no
    reconnect; the utterance is never stopped, and the next one is held until
    the dead context times out (stop_frame_timeout_s), then plays in full.
    """
    plan = FaultPlan(Fault.error("synthesis failed", 500, after_audio_chunks=3))
    async with DeepgramTTSEmulator(plan=plan, api_key=KEY) as emulator:
        run = await start(emulator, TTSSpeakFrame(SENTENCE), TTSSpeakFrame(SECOND))
        await run.wait_until(lambda: run.listener.stopped == 1, TIMEOUT)
        await run.end()
        assert run.heard == words(SENTENCE)[:2] + words(SECOND)
        assert run.context_words == words(SENTENCE, SECOND)
        assert run.errors == []
        assert len(emulator.connections) == 1
        record = emulator.connections[0]
        assert record.texts == [(None, SENTENCE + " "), (None, SECOND + " ")]
        assert len(record.errors) == 1
        assert run.listener.started == 2 and run.listener.stopped == 1
        second_started = [m.at for m in run.listener.marks if m.kind == "started"][1]
        assert record.fault_at is not None and second_started - record.fault_at >= STOP_FRAME_TIMEOUT


async def test_stock_service_treats_a_warning_as_no_failure() -> None:
    """A Warning in the middle of the audio is logged; every word is heard and nothing is reported."""
    async with DeepgramTTSEmulator(warning_after_chunks=2, api_key=KEY) as emulator:
        run = await start(emulator, TTSSpeakFrame(SENTENCE))
        await run.wait_until(lambda: run.listener.stopped == 1, TIMEOUT)
        await run.end()
        assert run.heard == words(SENTENCE)
        assert run.context_words == run.heard
        assert run.errors == []
        assert len(emulator.connections) == 1
