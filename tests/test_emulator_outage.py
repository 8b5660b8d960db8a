"""Outages: every emulator taken down for a while (refuse, stall, hang), then brought back.

The websocket emulators are spoken to with a bare ``websockets`` client, the
way their own tests do; the chat-completions emulator through the openai SDK
(what the stock ``OpenAILLMService`` uses) and with a bare aiohttp client.
Nothing sleeps: each test waits on a condition, and the few waits for
something that must *not* happen are bounded by ``QUIET``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam
from pipecat.frames.frames import TTSSpeakFrame
from pipecat.services.elevenlabs.tts import ElevenLabsTTSService
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosedError, InvalidStatus

from pipecat_resilient.testing import (
    AssemblyAIEmulator,
    CartesiaEmulator,
    DeepgramSTTEmulator,
    DeepgramTTSEmulator,
    ElevenLabsEmulator,
    Fault,
    FaultPlan,
    GeminiLiveEmulator,
    OpenAIEmulator,
    OpenAIRealtimeEmulator,
    OpenAITTSEmulator,
    Scenario,
)
from pipecat_resilient.testing._server import WebsocketEmulator
from pipecat_resilient.testing.outage import Outage

from .conftest import UNIT

# Every wait in this file; a passing test takes a fraction of it.
TIMEOUT = 30 * UNIT
# How long a test waits to be sure that nothing comes.
QUIET = UNIT
# A timed outage, short enough to wait out.
SECONDS = 2 * UNIT


# -- the websocket emulators, each with a bare client -----------------------------


async def recv_until(ws: ClientConnection, done: Callable[[dict[str, Any]], bool]) -> None:
    """Read JSON messages (skipping binary audio) until ``done`` holds for one."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            message = await ws.recv()
            if isinstance(message, str) and done(json.loads(message)):
                return


async def probe_elevenlabs(ws: ClientConnection) -> None:
    for message in ({"text": " ", "context_id": "c"}, {"text": "Hi.", "context_id": "c"}):
        await ws.send(json.dumps(message))
    await ws.send(json.dumps({"context_id": "c", "close_context": True}))
    await recv_until(ws, lambda m: bool(m.get("isFinal")))


async def probe_cartesia(ws: ClientConnection) -> None:
    request = {
        "transcript": "Hi.",
        "continue": False,
        "context_id": "c",
        "model_id": "sonic-3.6",
        "voice": {"mode": "id", "id": "voice-a"},
        "output_format": {"container": "raw", "encoding": "pcm_s16le", "sample_rate": 24000},
        "add_timestamps": True,
    }
    await ws.send(json.dumps(request))
    await recv_until(ws, lambda m: bool(m.get("done")))


async def probe_deepgram_tts(ws: ClientConnection) -> None:
    await ws.send(json.dumps({"type": "Speak", "text": "Hi."}))
    await ws.send(json.dumps({"type": "Flush"}))
    await recv_until(ws, lambda m: m.get("type") == "Flushed")


async def probe_gemini(ws: ClientConnection) -> None:
    await ws.send(json.dumps({"setup": {"model": "models/test"}}))
    await recv_until(ws, lambda m: "setupComplete" in m)


async def probe_realtime(ws: ClientConnection) -> None:
    await recv_until(ws, lambda m: m.get("type") == "session.created")


async def probe_deepgram_stt(ws: ClientConnection) -> None:
    await ws.send(json.dumps({"type": "Finalize"}))
    await recv_until(ws, lambda m: bool(m.get("from_finalize")))


async def probe_assemblyai(ws: ClientConnection) -> None:
    await recv_until(ws, lambda m: m.get("type") == "Begin")


@dataclass(frozen=True)
class Target:
    """A websocket emulator, where a bare client connects, and a round trip that shows it serves.

    Parameters:
        name: The test id.
        make: A stopped emulator.
        path: The request path (with its query).
        headers: Handshake headers.
        probe: A request and its answer on an open connection.
    """

    name: str
    make: Callable[[], WebsocketEmulator]
    path: str
    headers: dict[str, str]
    probe: Callable[[ClientConnection], Awaitable[None]]

    async def connect(self, emulator: WebsocketEmulator, **options: Any) -> ClientConnection:
        ssl = getattr(emulator, "client_ssl_context", None)
        if ssl is not None:
            options["ssl"] = ssl
        return await connect(
            emulator.url + self.path, additional_headers=self.headers, close_timeout=QUIET, **options
        )

    async def served(self, emulator: WebsocketEmulator) -> None:
        """Open a connection, check it is served, close it."""
        index = len(emulator.connections)
        ws = await self.connect(emulator)
        try:
            await self.probe(ws)
        finally:
            await ws.close()
        await emulator.wait_outage_until(lambda: emulator.connections[index].closed, TIMEOUT)

    def __str__(self) -> str:
        return self.name


GEMINI_PATH = "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent"
TARGETS = [
    Target(
        "elevenlabs",
        ElevenLabsEmulator,
        "/v1/text-to-speech/v/multi-stream-input?model_id=m&output_format=pcm_24000&auto_mode=true",
        {"xi-api-key": "k"},
        probe_elevenlabs,
    ),
    Target(
        "cartesia",
        CartesiaEmulator,
        "/tts/websocket",
        {"X-API-Key": "k", "Cartesia-Version": "2026-03-01"},
        probe_cartesia,
    ),
    Target(
        "deepgram-tts",
        DeepgramTTSEmulator,
        "/v1/speak?model=aura-2-test-en&encoding=linear16&sample_rate=24000",
        {"Authorization": "Token k"},
        probe_deepgram_tts,
    ),
    Target("gemini-live", GeminiLiveEmulator, GEMINI_PATH, {"x-goog-api-key": "k"}, probe_gemini),
    Target(
        "openai-realtime",
        OpenAIRealtimeEmulator,
        "/v1/realtime?model=gpt-realtime",
        {"Authorization": "Bearer k"},
        probe_realtime,
    ),
    Target(
        "deepgram-stt",
        DeepgramSTTEmulator,
        "/v1/listen?encoding=linear16&sample_rate=16000&channels=1",
        {"Authorization": "Token k"},
        probe_deepgram_stt,
    ),
    Target(
        "assemblyai",
        AssemblyAIEmulator,
        "/v3/ws?sample_rate=16000&encoding=pcm_s16le",
        {"Authorization": "k"},
        probe_assemblyai,
    ),
]


@pytest.fixture(params=TARGETS, ids=str)
def target(request: pytest.FixtureRequest) -> Target:
    """Each websocket emulator in turn."""
    return request.param  # type: ignore[no-any-return]


async def refused_with(target: Target, emulator: WebsocketEmulator) -> InvalidStatus:
    """Connect, expecting the handshake to be refused; returns the refusal."""
    with pytest.raises(InvalidStatus) as refused:
        await target.connect(emulator)
    return refused.value


async def test_refused_while_out_then_served_when_the_timer_ends(target: Target) -> None:
    """A timed refuse outage: 503 for every handshake, then served again, on the loop's clock."""
    async with target.make() as emulator:
        await target.served(emulator)
        outage = emulator.outage("refuse", seconds=SECONDS)
        assert emulator.outage_active and emulator.current_outage is outage
        assert (await refused_with(target, emulator)).response.status_code == 503
        assert (await refused_with(target, emulator)).response.status_code == 503
        await emulator.wait_restored(TIMEOUT)
        await target.served(emulator)
    assert not emulator.outage_active
    assert outage.met == [1, 2] and outage.dropped == []
    assert outage.ended_at == outage.ends_at
    assert outage.duration == pytest.approx(SECONDS) and outage.seconds == pytest.approx(SECONDS)
    assert [(c.refused, c.outage) for c in emulator.connections] == [
        (None, None),
        (503, "refuse"),
        (503, "refuse"),
        (None, None),
    ]


async def test_an_open_connection_is_cut_then_refused_with_429_until_restore(target: Target) -> None:
    """drop_existing: the open connection drops (no close frame); reconnects get 429 and Retry-After."""
    async with target.make() as emulator:
        ws = await target.connect(emulator)
        await target.probe(ws)
        outage = emulator.outage("refuse", status=429, retry_after=1)
        with pytest.raises(ConnectionClosedError) as cut:
            await asyncio.wait_for(ws.recv(), TIMEOUT)
        assert cut.value.rcvd is None  # an abort: 1006, not a close
        refusal = await refused_with(target, emulator)
        assert refusal.response.status_code == 429
        assert refusal.response.headers["Retry-After"] == "1"
        assert emulator.restore() is outage
        assert emulator.restore() is None
        await target.served(emulator)
    assert outage.dropped == [0] and outage.met == [1]
    assert outage.duration is not None and outage.duration >= 0
    assert emulator.connections[0].cut_by_outage and emulator.connections[0].closed
    assert [c.refused for c in emulator.connections] == [None, 429, None]


async def test_stall_accepts_then_reads_and_sends_nothing_not_even_a_pong(target: Target) -> None:
    """A stalled connection is upgraded, then silent; it stays so after restore(), new ones are served."""
    async with target.make() as emulator:
        outage = emulator.outage("stall")
        ws = await target.connect(emulator)
        await ws.send(json.dumps({"hello": "anyone?"}))
        pong = await ws.ping()
        # The emulator read both; the pong it would have answered is withheld.
        await emulator.wait_outage_until(lambda: outage.messages_read >= 1 and outage.withheld > 0, TIMEOUT)
        received, ponged = asyncio.ensure_future(ws.recv()), asyncio.ensure_future(pong)
        done, _ = await asyncio.wait([received, ponged], timeout=QUIET)
        assert not done
        received.cancel()
        emulator.restore()
        await target.served(emulator)
        assert emulator.connections[0].outage == "stall" and not emulator.connections[0].closed
        ws.transport.abort()
        await ws.wait_closed()
    assert outage.met == [0] and emulator.connections[1].outage is None


async def test_hang_never_answers_the_handshake(target: Target) -> None:
    """A hung handshake gets no answer at all; once restored, handshakes are answered."""
    async with target.make() as emulator:
        outage = emulator.outage("hang", seconds=TIMEOUT)
        with pytest.raises(TimeoutError):
            await target.connect(emulator, open_timeout=QUIET)
        assert emulator.connections[0].hung and emulator.connections[0].outage == "hang"
        emulator.restore()
        await target.served(emulator)
    assert outage.met == [0] and outage.ended_at is not None and outage.ended_at < (outage.ends_at or 0)


async def test_stop_does_not_wait_for_stalled_or_hung_connections() -> None:
    """stop() ends stalled and hung connections (and the outage) at once."""
    target = TARGETS[0]
    emulator = await target.make().start()
    try:
        emulator.outage("stall")
        stalled = await target.connect(emulator)
        emulator.outage("hang", drop_existing=False)
        # A client with no timeout of its own: only the emulator can end it.
        reader, writer = await asyncio.open_connection("127.0.0.1", emulator.port)
        writer.write(f"GET {target.path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await emulator.wait_for_connections(2, TIMEOUT)
        assert [c.outage for c in emulator.connections] == ["stall", "hang"]
    finally:
        async with asyncio.timeout(5 * UNIT):
            await emulator.stop()
    assert not emulator.outage_active and all(o.ended_at is not None for o in emulator.outages)
    assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    await stalled.wait_closed()
    writer.close()


async def test_an_outage_keeps_open_connections_when_told_to() -> None:
    """drop_existing=False: the open connection goes on being served while new ones are refused."""
    target = TARGETS[0]
    async with target.make() as emulator:
        ws = await target.connect(emulator)
        outage = emulator.outage(drop_existing=False)
        assert (await refused_with(target, emulator)).response.status_code == 503
        await target.probe(ws)
        await ws.close()
    assert outage.dropped == [] and not emulator.connections[0].cut_by_outage


async def test_an_outage_takes_precedence_over_the_plan_and_leaves_armed_faults_for_later() -> None:
    """The plan's fault for the index an outage answered never happens; an armed refusal waits."""
    target = TARGETS[0]
    plan = FaultPlan(Fault.refuse(401, connection=0))
    async with target.make().__class__(plan=plan) as emulator:
        emulator.outage("refuse", status=500)
        emulator.arm(Fault.refuse(429))
        assert (await refused_with(target, emulator)).response.status_code == 500
        emulator.restore()
        assert (await refused_with(target, emulator)).response.status_code == 429
        await target.served(emulator)
    assert [c.refused for c in emulator.connections] == [500, 429, None]


async def test_a_new_outage_ends_the_one_under_way_and_time_in_outage_adds_them_up() -> None:
    """Outages are recorded in order; the one under way counts up to now."""
    async with ElevenLabsEmulator() as emulator:
        first = emulator.outage("stall")
        second = emulator.outage("refuse", seconds=SECONDS)
        assert first.ended_at == second.started_at and emulator.current_outage is second
        await emulator.wait_restored(TIMEOUT)
        third = emulator.outage("hang")
        now = third.started_at + 1.0
        assert emulator.time_in_outage(now) == pytest.approx((first.duration or 0) + SECONDS + 1.0)
    assert emulator.outages == [first, second, third]
    assert third.ended_at is not None  # stop() ends it


async def test_the_loop_clock_ends_a_timed_outage_even_before_its_timer_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past ``ends_at`` on the loop's clock an outage is over, whether or not its callback ran."""
    emulator = ElevenLabsEmulator()
    loop = asyncio.get_running_loop()
    outage = emulator.outage("refuse", seconds=60.0)
    assert emulator.outage_active
    assert outage.ends_at is not None
    ends_at = outage.ends_at
    with monkeypatch.context() as patched:
        patched.setattr(loop, "time", lambda: ends_at)
        assert not emulator.outage_active
    assert outage.ended_at == ends_at and outage.duration == pytest.approx(60.0)
    assert emulator.restore() is None


def test_outage_arguments_are_checked() -> None:
    emulator = ElevenLabsEmulator()
    cases: list[tuple[dict[str, Any], str]] = [
        ({"mode": "down"}, "mode must be one of"),
        ({"status": 200}, "between 400 and 599"),
        ({"seconds": 0}, "seconds must be positive"),
        ({"retry_after": -1}, "retry_after must not be negative"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            emulator.outage(**kwargs)
    assert emulator.outages == []


# -- the HTTP emulators ---------------------------------------------------------


HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hi."}]


def chat_body(text: str = "Hello.") -> dict[str, Any]:
    return {"model": "gpt-4.1", "stream": True, "messages": [{"role": "user", "content": text}]}


async def test_chat_completions_refused_through_the_sdk_then_answered_after_the_timer() -> None:
    """The SDK sees the outage's status and Retry-After; after the timer the stream comes whole."""
    async with OpenAIEmulator() as emulator:
        client = AsyncOpenAI(api_key="k", base_url=emulator.base_url, max_retries=0)
        outage = emulator.outage("refuse", status=429, retry_after=0.5, seconds=SECONDS)
        with pytest.raises(openai.RateLimitError) as refused:
            await client.chat.completions.create(model="gpt-4.1", messages=HI)
        assert refused.value.status_code == 429
        assert refused.value.response.headers["Retry-After"] == "0.5"
        await emulator.wait_restored(TIMEOUT)
        stream = await client.chat.completions.create(model="gpt-4.1", messages=HI, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == "You said: Hi.. That is all."
    assert outage.met == [0] and outage.duration == pytest.approx(SECONDS)
    assert [(r.status, r.outage) for r in emulator.requests] == [(429, "refuse"), (200, None)]


async def test_chat_completions_stream_cut_when_an_outage_starts_then_503() -> None:
    """An outage mid-answer: the stream in flight drops, the SDK's next request gets 503."""
    async with OpenAIEmulator(chunk_interval=UNIT) as emulator:
        client = AsyncOpenAI(api_key="k", base_url=emulator.base_url, max_retries=0)
        stream = await client.chat.completions.create(model="gpt-4.1", messages=HI, stream=True)
        chunks = aiter(stream)
        await anext(chunks)
        outage = emulator.outage()
        with pytest.raises(openai.APIError):
            async for _ in chunks:
                pass
        with pytest.raises(openai.InternalServerError) as refused:
            await client.chat.completions.create(model="gpt-4.1", messages=HI)
        assert refused.value.status_code == 503
        emulator.restore()
    assert outage.dropped == [0] and outage.met == [1]
    assert emulator.requests[0].cut_by_outage and not emulator.requests[0].completed


@pytest.mark.parametrize("make", [OpenAIEmulator, OpenAITTSEmulator], ids=["chat", "speech"])
async def test_http_stall_sends_headers_and_no_body_and_hang_sends_nothing(
    make: Callable[[], OpenAIEmulator | OpenAITTSEmulator],
) -> None:
    """stall: a 200 and its headers, then silence; hang: no status line; restore() serves again."""
    async with make() as emulator, aiohttp.ClientSession() as session:
        if isinstance(emulator, OpenAIEmulator):
            url, body = f"{emulator.base_url}/chat/completions", chat_body()
        else:
            url = f"{emulator.base_url}/audio/speech"
            body = {"model": "tts-1", "input": "Hi.", "voice": "alloy", "response_format": "pcm"}
        outage = emulator.outage("stall")
        async with session.post(url, json=body) as stalled:
            assert stalled.status == 200
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(stalled.content.read(1), QUIET)
        emulator.outage("hang")
        with pytest.raises(TimeoutError):
            await session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=QUIET))
        emulator.restore()
        async with session.post(url, json=body) as answered:
            assert answered.status == 200 and await answered.read()
        await emulator.wait_until(lambda: all(r.closed for r in emulator.requests), TIMEOUT)
    assert outage.met == [0] and emulator.outages[1].met == [1]
    assert [r.outage for r in emulator.requests] == ["stall", "hang", None]


async def test_speech_refused_while_out() -> None:
    """The speech endpoint refuses with the outage's status and an OpenAI error body."""
    async with OpenAITTSEmulator() as emulator:
        client = AsyncOpenAI(api_key="k", base_url=emulator.base_url, max_retries=0)
        outage: Outage = emulator.outage("refuse", status=502)
        with pytest.raises(openai.InternalServerError) as refused:
            await client.audio.speech.create(model="tts-1", input="Hi.", voice="alloy", response_format="pcm")
        assert refused.value.status_code == 502
    assert outage.met == [0] and emulator.requests[0].status == 502


# -- a stock Pipecat service ----------------------------------------------------


async def test_stock_service_cut_by_an_outage_is_refused_then_reconnects_after_restore() -> None:
    """The stock ElevenLabs service: its socket drops, its reconnect sees 503; after restore() it speaks.

    Measured (Pipecat 1.14): the receive loop reconnects (three attempts, with
    a backoff shortened here); the first attempt meets the outage, and two
    errors go upstream, neither fatal: the service's own "server rejected
    WebSocket connection: HTTP 503", then Pipecat's "reconnection attempt 1
    failed". The next attempt, after restore(), succeeds.
    """
    async with ElevenLabsEmulator() as emulator:
        tts = ElevenLabsTTSService(
            api_key="k",
            url=emulator.url,
            settings=ElevenLabsTTSService.Settings(voice="test-voice"),
            reconnect_backoff_min_wait=SECONDS,
            reconnect_backoff_max_wait=SECONDS,
        )
        async with Scenario(tts, spc=emulator.samples_per_char()) as run:
            await run.send(TTSSpeakFrame("Hello there."))
            await run.wait_until(lambda: run.listener.stopped == 1, TIMEOUT)
            outage = emulator.outage("refuse")
            # Restored as soon as one reconnect was refused, well before the next attempt.
            await emulator.wait_outage_until(lambda: len(outage.met) == 1, TIMEOUT)
            emulator.restore()
            await run.wait_until(lambda: any("503" in e.error for e in run.errors), TIMEOUT)
            await emulator.wait_for_connections(3, TIMEOUT)
            await run.send(TTSSpeakFrame("Back again."))
            await run.wait_until(lambda: run.listener.stopped == 2, TIMEOUT)
    assert run.heard == ["Hello", "there.", "Back", "again."]
    assert outage.dropped == [0] and outage.met == [1]
    assert [c.refused for c in emulator.connections] == [None, 503, None]
    # ElevenLabs reports the refusal, then Pipecat the failed attempt; neither is fatal.
    refusal, attempt = run.errors
    assert "HTTP 503" in refusal.error and "attempt 1 failed" in attempt.error
    assert not refusal.fatal and not attempt.fatal
