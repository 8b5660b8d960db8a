"""The Cartesia TTS websocket emulator, and the stock CartesiaTTSService under its faults.

The protocol tests speak to the emulator with a raw ``websockets`` client. The
pipeline tests drive the stock ``CartesiaTTSService`` (Pipecat 1.14) in a real
pipeline and pin down what it does when the provider fails: if Pipecat ever
changes it, they fail, and we want to know.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from pipecat.frames.frames import (
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TTSSpeakFrame,
)
from pipecat.services.cartesia.tts import CartesiaTTSService
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosedError, InvalidStatus

from pipecat_resilient.testing import Fault, FaultPlan, Scenario, SpeechDecoder
from pipecat_resilient.testing.cartesia import TIMESTAMP_MODES, CartesiaEmulator

from .conftest import SAMPLE_RATE, UNIT

API_KEY = "test-key"
VERSION = "2026-03-01"
SENTENCE = "Hello there, how are you today? I hope all is well with you."
SECOND = "This is the second sentence we say."
TURN_TOKENS = ["The quick", " brown fox.", " It jumps over", " the lazy dog!", " Then it", " rests."]
# Pipecat's dead-context timeout (TTSService stop_frame_timeout_s, 3 s by default), shortened
# so the failure tests that wait it out stay fast. It changes when, not what.
STOP_TIMEOUT = 5 * UNIT


def words(*texts: str) -> list[str]:
    return " ".join(texts).split()


def request(context_id: str, transcript: str, *, more: bool = True, voice: str = "voice-a") -> str:
    """A generation request as Pipecat builds it (services/cartesia/tts.py ``_build_msg``)."""
    return json.dumps(
        {
            "transcript": transcript,
            "continue": more,
            "context_id": context_id,
            "model_id": "sonic-3.6",
            "voice": {"mode": "id", "id": voice},
            "output_format": {"container": "raw", "encoding": "pcm_s16le", "sample_rate": SAMPLE_RATE},
            "add_timestamps": True,
            "use_normalized_timestamps": False,
        }
    )


@asynccontextmanager
async def client(emulator: CartesiaEmulator) -> AsyncIterator[ClientConnection]:
    headers = {"X-API-Key": API_KEY, "Cartesia-Version": VERSION}
    async with connect(f"{emulator.url}/tts/websocket", additional_headers=headers) as ws:
        yield ws


@dataclass
class Received:
    """One context's messages from a raw client, with the audio decoded as it arrived."""

    spc: int
    messages: list[dict[str, Any]] = field(default_factory=list)
    # (message, seconds of audio received before it, seconds before the last chunk)
    timeline: list[tuple[dict[str, Any], float, float]] = field(default_factory=list)
    decoder: SpeechDecoder = field(init=False)
    seconds: float = 0.0
    before_last_chunk: float = 0.0

    def __post_init__(self) -> None:
        self.decoder = SpeechDecoder(self.spc)

    def add(self, message: dict[str, Any]) -> None:
        self.messages.append(message)
        self.timeline.append((message, self.seconds, self.before_last_chunk))
        if message["type"] == "chunk":
            audio = base64.b64decode(message["data"])
            self.decoder.feed(audio)
            self.before_last_chunk = self.seconds
            self.seconds += len(audio) / (2 * SAMPLE_RATE)

    @property
    def types(self) -> list[str]:
        return [m["type"] for m in self.messages]

    def stamps(self) -> Iterator[tuple[list[tuple[str, float, float]], float, float]]:
        """Each timestamps message as (words with start and end, audio before it, before its last chunk)."""
        for message, seconds, before in self.timeline:
            if message["type"] == "timestamps":
                stamps = message["word_timestamps"]
                yield list(zip(stamps["words"], stamps["start"], stamps["end"], strict=True)), seconds, before


async def receive(
    ws: ClientConnection, spc: int, until: str, *, context_ids: set[str] | None = None
) -> dict[str, Received]:
    """Read messages into one Received per context until ``until`` has sent done or an error."""
    received: dict[str, Received] = {}
    while True:
        message = json.loads(await ws.recv())
        context_id = message["context_id"]
        if context_ids is not None:
            assert context_id in context_ids, message
        received.setdefault(context_id, Received(spc)).add(message)
        if context_id == until and message["done"]:
            return received


def check_timestamps(context: Received, text: str) -> None:
    """Every word timed once, in order, at exactly the time its audio starts and ends."""
    heard = context.decoder.words
    assert [w.text for w in heard if w.complete] == words(text)
    timed = [stamp for stamps, _, _ in context.stamps() for stamp in stamps]
    assert [word for word, _, _ in timed] == words(text)
    for (word, start, end), decoded in zip(timed, heard, strict=True):
        assert start == pytest.approx(decoded.offset / SAMPLE_RATE)
        assert end == pytest.approx((decoded.offset + len(word) * context.spc) / SAMPLE_RATE)
    assert timed[-1][2] <= context.seconds + 1e-9


# -- the protocol ------------------------------------------------------------


@pytest.mark.parametrize("mode", TIMESTAMP_MODES)
async def test_continued_context_gets_chunks_timestamps_then_done(mode: str) -> None:
    """Transcripts of one context: chunks, word timestamps cumulative across them, done last."""
    parts = ["Hello there, how are you today?", " I hope all is well", " with you."]
    async with CartesiaEmulator(timestamps=mode) as emulator:
        spc = emulator.samples_per_char(SAMPLE_RATE)
        async with client(emulator) as ws:
            for part in parts:
                await ws.send(request("c", part))
            await ws.send(request("c", "", more=False))
            context = (await receive(ws, spc, until="c"))["c"]
    check_timestamps(context, "".join(parts))
    assert context.types[-1] == "done" and context.types.count("done") == 1
    chunks = [m for m in context.messages if m["type"] == "chunk"]
    # 5 characters a chunk, a transcript never sharing one with the next.
    assert len(chunks) == sum(-(-len(part) // 5) for part in parts)
    assert all(m["status_code"] == 206 and m["done"] is False for m in chunks)
    record = emulator.connections[0]
    assert record.path == "/tts/websocket"
    assert record.texts == [("c", part) for part in parts]
    assert [m["voice"]["id"] for m in record.messages] == ["voice-a"] * 4


async def test_after_mode_times_each_word_right_after_the_chunk_that_completes_it() -> None:
    """Timestamps follow the chunk that ends their words; words ended by one chunk share a message."""
    async with CartesiaEmulator(timestamps="after", chars_per_chunk=8) as emulator:
        async with client(emulator) as ws:
            await ws.send(request("c", "I am ok. A b c d e f.", more=False))
            context = (await receive(ws, emulator.samples_per_char(SAMPLE_RATE), until="c"))["c"]
    for stamps, seconds, before in context.stamps():
        assert all(before < end <= seconds for _, _, end in stamps)
    assert max(len(stamps) for stamps, _, _ in context.stamps()) > 1
    previous = [m["type"] for m, _, _ in context.timeline]
    assert all(previous[i - 1] == "chunk" for i, t in enumerate(previous) if t == "timestamps")


async def test_grouped_mode_sends_groups_after_their_audio_and_flushes_before_done() -> None:
    """Three words a message, after all their audio, across transcripts; the rest before done."""
    parts = ["One two three four.", " Five six seven eight."]
    async with CartesiaEmulator(timestamps="grouped") as emulator:
        async with client(emulator) as ws:
            for part in parts:
                await ws.send(request("c", part))
            await ws.send(request("c", "", more=False))
            context = (await receive(ws, emulator.samples_per_char(SAMPLE_RATE), until="c"))["c"]
    groups = [[word for word, _, _ in stamps] for stamps, _, _ in context.stamps()]
    assert groups == [["One", "two", "three"], ["four.", "Five", "six"], ["seven", "eight."]]
    assert all(end <= seconds for stamps, seconds, _ in context.stamps() for _, _, end in stamps)
    assert context.types[-2:] == ["timestamps", "done"]


async def test_ahead_mode_sends_timestamps_before_the_audio_they_time() -> None:
    """Each group of timestamps arrives before any audio of its first word."""
    async with CartesiaEmulator(timestamps="ahead") as emulator:
        async with client(emulator) as ws:
            await ws.send(request("c", SENTENCE, more=False))
            context = (await receive(ws, emulator.samples_per_char(SAMPLE_RATE), until="c"))["c"]
    check_timestamps(context, SENTENCE)
    assert context.types[0] == "timestamps"
    for stamps, seconds, _ in context.stamps():
        assert len(stamps) <= 3
        assert seconds <= stamps[0][1]  # no audio of the group yet


async def test_shuffled_mode_mixes_schedules_reproducibly() -> None:
    """A seed fixes the mix; it holds timestamps sent ahead of their audio and after it."""

    async def timeline(seed: int) -> list[tuple[str, tuple[str, ...]]]:
        async with CartesiaEmulator(timestamps="shuffled", seed=seed) as emulator:
            async with client(emulator) as ws:
                await ws.send(request("c", SENTENCE + " " + SECOND, more=False))
                context = (await receive(ws, emulator.samples_per_char(SAMPLE_RATE), until="c"))["c"]
        check_timestamps(context, SENTENCE + " " + SECOND)
        stamps = list(context.stamps())
        assert any(seconds <= group[0][1] for group, seconds, _ in stamps)  # ahead
        assert any(group[-1][2] <= seconds for group, seconds, _ in stamps)  # after
        return [(m["type"], tuple(m.get("word_timestamps", {}).get("words", ()))) for m in context.messages]

    assert await timeline(3) == await timeline(3)


async def test_contexts_are_synthesized_independently() -> None:
    """A new context's audio never waits behind another's (real-time pacing)."""
    async with CartesiaEmulator(realtime=True, ms_per_char=4) as emulator:
        async with client(emulator) as ws:
            await ws.send(request("a", "This answer goes on for a good while before its end.", more=False))
            assert json.loads(await ws.recv())["context_id"] == "a"
            await ws.send(request("b", "Yes?", more=False))
            order = []
            while ("a", "done") not in order:
                message = json.loads(await ws.recv())
                order.append((message["context_id"], message["type"]))
    assert order.index(("b", "done")) < order.index(("a", "done"))


async def test_cancel_stops_a_context_without_done() -> None:
    """A cancelled context sends nothing more; one started after it still completes."""
    long = "This answer goes on for a good while before it ends."  # 11 chunks
    later = "And this one goes on even longer than the one it follows did."  # 13 chunks
    async with CartesiaEmulator(realtime=True, ms_per_char=4) as emulator:
        spc = emulator.samples_per_char(SAMPLE_RATE)
        async with client(emulator) as ws:
            await ws.send(request("a", long, more=False))
            assert json.loads(await ws.recv())["context_id"] == "a"
            await ws.send(json.dumps({"context_id": "a", "cancel": True}))
            await ws.send(request("b", later, more=False))
            # Paced alike and started later, "b" would end after "a" had it gone on.
            received = await receive(ws, spc, until="b")
    assert received["b"].decoder.heard() == words(later)
    assert "done" not in received.get("a", Received(spc)).types
    assert emulator.connections[0].messages[1] == {"context_id": "a", "cancel": True}


async def test_error_abandons_the_context_and_keeps_the_socket_open() -> None:
    """An ERROR fault: Cartesia's error event (done: true) for the context, then nothing more of it."""
    plan = FaultPlan(Fault.error("boom", 500, after_audio_chunks=2))
    async with CartesiaEmulator(plan=plan) as emulator:
        spc = emulator.samples_per_char(SAMPLE_RATE)
        async with client(emulator) as ws:
            await ws.send(request("a", SENTENCE, more=False))
            failed = (await receive(ws, spc, until="a"))["a"]
            await ws.send(request("b", SECOND, more=False))
            received = await receive(ws, spc, until="b")
    assert failed.types[-1] == "error" and failed.types.count("chunk") == 2
    error = failed.messages[-1]
    assert {k: error[k] for k in ("type", "done", "status_code", "title", "message", "context_id")} == {
        "type": "error",
        "done": True,
        "status_code": 500,
        "title": "Internal Server Error",
        "message": "boom",
        "context_id": "a",
    }
    assert error["error_code"] is None and error["request_id"]
    # Nothing more of "a" after its error; "b" on the same socket is whole.
    assert set(received) == {"b"}
    check_timestamps(received["b"], SECOND)
    assert received["b"].types[-1] == "done"
    record = emulator.connections[0]
    assert len(emulator.connections) == 1 and len(record.errors) == 1 and record.audio_chunks > 2


async def test_error_on_a_request_fails_that_context() -> None:
    """An ERROR triggered by a request (after_text_messages) fails the request's context at once."""
    plan = FaultPlan(Fault.error("rate limited", 429, after_text_messages=2))
    async with CartesiaEmulator(plan=plan) as emulator:
        spc = emulator.samples_per_char(SAMPLE_RATE)
        async with client(emulator) as ws:
            await ws.send(request("a", "First one.", more=False))
            await receive(ws, spc, until="a")
            await ws.send(request("b", "Second one.", more=False))
            failed = (await receive(ws, spc, until="b", context_ids={"b"}))["b"]
            await ws.send(request("c", "Third one.", more=False))
            received = await receive(ws, spc, until="c", context_ids={"c"})
    assert failed.types == ["error"]
    assert failed.messages[0]["error_code"] == "concurrency_limited"
    assert received["c"].decoder.heard() == ["Third", "one."]


async def test_base_faults_count_chunks_and_delay_first_audio() -> None:
    """A one-shot first-audio delay holds the next transcript; an abort counts chunk messages."""
    delay = 2 * UNIT
    async with CartesiaEmulator() as emulator:
        async with client(emulator) as ws:
            emulator.arm(Fault.delay_first_audio(delay))
            emulator.arm(Fault.abort(after_audio_chunks=3))
            sent = time.monotonic()
            await ws.send(request("c", SENTENCE, more=False))
            first = json.loads(await ws.recv())
            waited = time.monotonic() - sent
            with pytest.raises(ConnectionClosedError) as closed:
                while True:
                    await ws.recv()
    assert first["type"] == "chunk" and waited >= delay
    assert closed.value.rcvd is None  # no close frame: the client sees 1006
    assert emulator.connections[0].audio_chunks == 3


async def test_emulator_checks_the_api_key() -> None:
    """With an api_key set, a handshake without the X-API-Key it names is refused with 401."""
    async with CartesiaEmulator(api_key="right") as emulator:
        with pytest.raises(InvalidStatus) as refused:
            async with connect(f"{emulator.url}/tts/websocket", additional_headers={"X-API-Key": "wrong"}):
                pass
        assert refused.value.response.status_code == 401


def test_options_are_checked() -> None:
    """An unknown timestamp mode or an empty group is refused."""
    with pytest.raises(ValueError, match="timestamps must be one of"):
        CartesiaEmulator(timestamps="sometimes")
    with pytest.raises(ValueError, match="words_per_timestamps"):
        CartesiaEmulator(words_per_timestamps=0)


# -- the stock service ------------------------------------------------------


def stock(emulator: CartesiaEmulator, **kwargs: Any) -> CartesiaTTSService:
    """The stock service pointed at the emulator."""
    return CartesiaTTSService(
        api_key=API_KEY,
        url=f"{emulator.url}/tts/websocket",
        settings=CartesiaTTSService.Settings(voice="voice-a"),
        **kwargs,
    )


def connection_events(tts: CartesiaTTSService) -> list[str]:
    """The service's connection events, in the order they fire."""
    events: list[str] = []
    for event in ("on_connected", "on_disconnected", "on_connection_error"):
        tts.add_event_handler(event, lambda *_, event=event: events.append(event))
    return events


def voices(emulator: CartesiaEmulator) -> set[str]:
    return {m["voice"]["id"] for c in emulator.connections for m in c.messages if "transcript" in m}


@pytest.mark.parametrize("mode", TIMESTAMP_MODES)
async def test_stock_service_speaks_an_utterance(mode: str) -> None:
    """A TTSSpeakFrame: every word heard, and the context holds exactly what was heard."""
    async with CartesiaEmulator(timestamps=mode) as emulator:
        async with Scenario(stock(emulator), spc=emulator.samples_per_char(SAMPLE_RATE)) as run:
            await run.send(TTSSpeakFrame(SENTENCE))
            await run.wait_until(lambda: run.listener.stopped == 1 and bool(run.context_messages))
    assert run.heard == words(SENTENCE)
    assert run.context_words == run.heard
    assert run.errors == [] and voices(emulator) == {"voice-a"}


@pytest.mark.parametrize("mode", TIMESTAMP_MODES)
async def test_stock_service_speaks_a_streamed_llm_turn(mode: str) -> None:
    """An LLM turn, sentence by sentence into one context: all heard, context == heard."""
    async with CartesiaEmulator(timestamps=mode) as emulator:
        async with Scenario(stock(emulator), spc=emulator.samples_per_char(SAMPLE_RATE)) as run:
            await run.send(
                LLMFullResponseStartFrame(),
                *[LLMTextFrame(t) for t in TURN_TOKENS],
                LLMFullResponseEndFrame(),
            )
            await run.wait_until(lambda: run.listener.responses_ended == 1 and bool(run.context_messages))
    assert run.heard == words("".join(TURN_TOKENS))
    assert run.context_words == run.heard
    assert run.errors == [] and voices(emulator) == {"voice-a"}
    # One context, one request per sentence, then the flush.
    record = emulator.connections[0]
    assert len({context_id for context_id, _ in record.texts}) == 1
    assert [text for _, text in record.texts] == [
        "The quick brown fox.",
        "It jumps over the lazy dog!",
        "Then it rests.",
    ]
    assert record.messages[-1]["transcript"] == "" and record.messages[-1]["continue"] is False


async def test_stock_service_loses_the_rest_on_1011_and_writes_it_into_the_context() -> None:
    """A 1011 mid-utterance: the rest is lost, yet Pipecat writes the unheard words into the context.

    Measured (Pipecat 1.14, 5-character chunks, close after the 4th chunk): 4 of
    13 words heard; all 13 go to the context as TTSTextFrames at once (the
    reconnect ends the audio context and Pipecat force-completes its words),
    with no TTSStoppedFrame and no error upstream (on_disconnected, then
    on_connected: the error path reconnects). The reconnect (connection 1)
    never gets the lost text; the next utterance is heard whole on it and the
    context ends up holding both sentences (26 words) for 4 + 13 heard.
    """
    plan = FaultPlan(Fault.close(1011, after_audio_chunks=4))
    async with CartesiaEmulator(plan=plan) as emulator:
        tts = stock(emulator)
        events = connection_events(tts)
        async with Scenario(tts, spc=emulator.samples_per_char(SAMPLE_RATE)) as run:
            await run.send(TTSSpeakFrame(SENTENCE))
            await run.wait_until(lambda: len(run.listener.context_words) == len(words(SENTENCE)))
            assert run.heard == words(SENTENCE)[:4]
            assert run.listener.stopped == 0
            await emulator.wait_for_connections(2)
            await run.send(TTSSpeakFrame(SECOND))
            await run.wait_until(lambda: run.listener.stopped == 1 and bool(run.context_messages))
            assert events == ["on_connected", "on_disconnected", "on_connected"]
    assert run.heard == words(SENTENCE)[:4] + words(SECOND)
    assert run.context_words == words(SENTENCE, SECOND)
    assert run.errors == []
    assert [text for c in emulator.connections for _, text in c.texts] == [SENTENCE, SECOND]
    assert emulator.connections[1].texts == [(emulator.connections[1].texts[0][0], SECOND)]


async def test_stock_service_on_an_error_message_stops_then_writes_unheard_words() -> None:
    """An error event mid-utterance, socket open: one ErrorFrame, then the unheard words enter the context.

    Measured (Pipecat 1.14, error after the 4th chunk): 4 of 13 words heard; one
    non-fatal ErrorFrame upstream (``Error: {...}`` quoting the whole event); a
    TTSStoppedFrame pushed at once by the receive task, not queued behind the
    audio (the listener saw it before the first audio). The dead audio context
    then waits out ``stop_frame_timeout_s`` (3 s by default, 0.5 s here) and
    Pipecat force-completes it: all 13 words go to the context as spoken. It
    recovers on the same socket (no reconnect, no on_disconnected), but the
    next utterance starts only when that timeout ends the dead context
    (0.51-0.52 s after the error here); the context then holds 26 words for
    4 + 13 heard.
    """
    plan = FaultPlan(Fault.error("boom", 500, after_audio_chunks=4))
    async with CartesiaEmulator(plan=plan) as emulator:
        tts = stock(emulator, stop_frame_timeout_s=STOP_TIMEOUT)
        events = connection_events(tts)
        async with Scenario(tts, spc=emulator.samples_per_char(SAMPLE_RATE)) as run:
            await run.send(TTSSpeakFrame(SENTENCE))
            await run.recorder.wait_until(lambda: len(run.errors) == 1)
            failed_at = time.monotonic()
            await run.send(TTSSpeakFrame(SECOND))
            await run.wait_until(lambda: run.listener.stopped == 2 and bool(run.context_messages))
            assert events == ["on_connected"]
    assert run.heard == words(SENTENCE)[:4] + words(SECOND)
    assert run.context_words == words(SENTENCE, SECOND)
    (error,) = run.errors
    assert not error.fatal and "'message': 'boom'" in error.error and "'status_code': 500" in error.error
    assert run.listener.kinds() == ["started", "stopped", "started", "stopped"]
    # The second utterance started only once Pipecat's timeout had ended the dead context.
    second_started = [mark.at for mark in run.listener.marks if mark.kind == "started"][1]
    assert second_started - failed_at >= STOP_TIMEOUT * 0.6
    assert len(emulator.connections) == 1 and len(emulator.connections[0].errors) == 1


async def test_stock_service_reconnects_inline_on_a_clean_close() -> None:
    """A 1000 close between utterances: Pipecat reconnects inline, with no on_disconnected.

    Measured (Pipecat 1.14): the receive loop ends without an error and
    reconnects at once; on_connected fires again, on_disconnected does not
    (nor on_connection_error); no error upstream; the next utterance is heard
    whole on connection 1.
    """
    async with CartesiaEmulator() as emulator:
        tts = stock(emulator)
        events = connection_events(tts)
        async with Scenario(tts, spc=emulator.samples_per_char(SAMPLE_RATE)) as run:
            await run.send(TTSSpeakFrame(SENTENCE))
            await run.wait_until(lambda: run.listener.stopped == 1 and bool(run.context_messages))
            await emulator.inject(Fault.close(1000))
            await emulator.wait_for_connections(2)
            await run.send(TTSSpeakFrame(SECOND))
            await run.wait_until(lambda: run.listener.stopped == 2 and len(run.context_messages) == 2)
            assert events == ["on_connected", "on_connected"]
    assert run.heard == run.context_words == words(SENTENCE, SECOND)
    assert run.errors == []
    assert emulator.connections[1].texts[0][1] == SECOND


async def test_stock_service_on_a_clean_close_mid_utterance_keeps_the_dead_context() -> None:
    """A 1000 close mid-utterance: reconnected inline, the rest lost, its words still written to the context.

    Measured (Pipecat 1.14, close after the 4th chunk): 4 of 13 words heard; no
    error upstream, on_connected twice and no on_disconnected; the audio
    context of the old socket is not closed (the inline reconnect skips
    ``_close_connection_contexts``), so it waits out
    ``stop_frame_timeout_s`` and then all 13 words go to the context, with no
    TTSStoppedFrame. The next utterance is heard whole on connection 1; the
    context holds 26 words for 4 + 13 heard.
    """
    plan = FaultPlan(Fault.close(1000, after_audio_chunks=4))
    async with CartesiaEmulator(plan=plan) as emulator:
        tts = stock(emulator, stop_frame_timeout_s=STOP_TIMEOUT)
        events = connection_events(tts)
        async with Scenario(tts, spc=emulator.samples_per_char(SAMPLE_RATE)) as run:
            await run.send(TTSSpeakFrame(SENTENCE))
            await emulator.wait_for_connections(2)
            await run.wait_until(lambda: len(run.listener.context_words) == len(words(SENTENCE)))
            assert run.heard == words(SENTENCE)[:4]
            assert run.listener.stopped == 0
            await run.send(TTSSpeakFrame(SECOND))
            await run.wait_until(lambda: run.listener.stopped == 1 and bool(run.context_messages))
            assert events == ["on_connected", "on_connected"]
    assert run.heard == words(SENTENCE)[:4] + words(SECOND)
    assert run.context_words == words(SENTENCE, SECOND)
    assert run.errors == []
