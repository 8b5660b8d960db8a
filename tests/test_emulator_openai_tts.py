"""The OpenAI TTS emulator, spoken to by a raw HTTP client and by the stock OpenAITTSService.

The protocol tests drive ``POST /v1/audio/speech`` with aiohttp, and with a
bare socket where the chunks of the body themselves matter. The
stock-service tests run ``OpenAITTSService`` (Pipecat 1.14, openai SDK 3.60)
in the kit's Scenario (``recorder -> tts -> listener -> assistant
aggregator``) over a real socket, and pin down how it behaves when a request
fails: if Pipecat or the SDK ever change it, these tests fail and we want to
know.

What the stock service does, measured here (24 kHz, 10 ms per character, so
480 bytes per character; the emulator's body in 1000-byte pieces):

* one request per sentence, made only once the previous sentence's body has
  been read to its end; the body is read in 24000-byte pieces (its
  ``chunk_size``: 0.5 s, 50 characters), so audio reaches the pipeline 0.5 s
  at a time and a body cut short loses up to 0.5 s it had received;
* each sentence's TTSTextFrame is pushed right *after* all of that
  sentence's audio (``started, audio, text, audio, text, ..., stopped``);
* an exception other than ``BadRequestError`` escapes ``run_tts``: it becomes
  one ErrorFrame "Error processing frame: ..." of category UNKNOWN, the
  sentence's TTSTextFrame is never pushed, its audio context is never closed
  (its TTSStoppedFrame only comes when ``stop_frame_timeout_s`` of silence
  ends it), and the speak frame's turn is never closed either, so a later
  TTSSpeakFrame is treated as part of a turn: it is heard at once but only
  written to the context when the pipeline ends;
* an abort after 30 pieces (30000 bytes): 10 of 22 words heard (one 24000-byte
  frame; the 6000 bytes read after it are dropped), none in the context;
* the same abort 3 pieces into the first sentence of an LLM turn: nothing of
  it heard, and the characters after the one that closed the sentence are
  lost from the LLM token being aggregated ("Tomorrow it " became "T"), so
  the next sentence is synthesized and written to the context as "Twill rain
  in the afternoon.";
* a body ended cleanly after 30 pieces: 13 of 22 words heard, all 22 in the
  context, no error at all, and the next sentence plays normally;
* a body that stalls after 30 pieces: 10 words heard, then nothing for the
  SDK's 600 s read timeout: the context is stopped by ``stop_frame_timeout_s``
  of silence, no error, the next sentence is never requested;
  with a 0.4 s ``http_client`` timeout, an ErrorFrame with an empty message
  ("Error processing frame: ") after 0.4 s, no retry, and the next sentence
  plays;
* a request never answered: retried by the SDK on its timeout (3 attempts in
  all), then "Error processing frame: Request timed out.";
* HTTP 500: 3 attempts per sentence (the SDK's ``max_retries=2``), one
  ErrorFrame per sentence (category UNKNOWN, not SERVER), one "completed with
  no audio" per sentence, nothing heard, nothing in the context;
* HTTP 429 with Retry-After, or a connection dropped before the answer: the
  SDK waits and retries, and Pipecat sees nothing;
* HTTP 401: not retried, an UNKNOWN ErrorFrame (not AUTHENTICATION), and the
  service stays usable and speaks the next sentence;
* HTTP 400: the one error ``run_tts`` catches: "Unknown error occurred", and
  the sentence's TTSTextFrame is still pushed, so the context holds a
  sentence nobody heard.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
from collections.abc import Callable
from typing import Any

import aiohttp
import openai
import pytest
from pipecat.frames.frames import (
    Frame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TTSSpeakFrame,
)
from pipecat.services.openai.tts import OpenAITTSService
from pipecat.utils.errors import ErrorCategory

from pipecat_resilient.testing import Fault, FaultKind, FaultPlan, Scenario, SpeechDecoder
from pipecat_resilient.testing.openai_tts import SAMPLE_RATE, OpenAITTSEmulator

from .conftest import UNIT

# Every wait in this file; a passing test takes a fraction of it.
TIMEOUT = 50 * UNIT
# The stock service ends an audio context after this long without audio (its
# default is 3 s). Tests where a failure leaves a context open shorten it so
# the context ends fast; the others keep the default, so a loaded machine
# cannot end a healthy context early.
STOP_FRAME_TIMEOUT = 5 * UNIT

KEY = "test-key"
MODEL = "gpt-4o-mini-tts"
# Bytes of speech code per character: 24 kHz, 10 ms, 16-bit.
CHAR_BYTES = 480
# How much the stock service reads before it pushes a frame (its chunk_size at 24 kHz).
STOCK_READ_BYTES = 24000
SENTENCE = (
    "The quick brown fox jumps over the lazy dog, and then it runs far away "
    "into the dark green forest to hide."
)
SECOND = "And a second sentence here."
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
TURN_SENTENCES = [
    "The weather today is sunny and warm.",
    "Tomorrow it will rain in the afternoon.",
    "Bring an umbrella to work.",
]


def words(*texts: str) -> list[str]:
    return " ".join(texts).split()


def speech(text: str = SENTENCE, **fields: Any) -> dict[str, Any]:
    """A request body as the stock service sends it."""
    return {"input": text, "model": MODEL, "voice": "alloy", "response_format": "pcm", **fields}


def url(emulator: OpenAITTSEmulator) -> str:
    return f"{emulator.base_url}/audio/speech"


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def read_body(response: aiohttp.ClientResponse) -> tuple[bytes, Exception | None]:
    """The body as read, and the error that cut it short (if one did)."""
    body = bytearray()
    try:
        async for data in response.content.iter_any():
            body += data
    except aiohttp.ClientPayloadError as exc:
        return bytes(body), exc
    return bytes(body), None


async def raw_post(
    emulator: OpenAITTSEmulator, body: dict[str, Any]
) -> tuple[int, dict[str, str], list[bytes], bool]:
    """POST over a bare socket and read the chunked body by hand, to see each chunk as sent.

    Returns:
        The status, the headers (lower-case names), the chunks in order, and
        whether the body ended with its terminating empty chunk.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", emulator.port)
    try:
        payload = json.dumps(body).encode()
        head = (
            f"POST /v1/audio/speech HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        )
        writer.write(head.encode() + payload)
        status = int((await reader.readline()).split()[1])
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        chunks: list[bytes] = []
        # A reset or an early EOF ends the loop without the terminating chunk.
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, ValueError):
            while True:
                size = int(await reader.readline(), 16)
                data = await reader.readexactly(size + 2)
                if size == 0:
                    return status, headers, chunks, True
                chunks.append(data[:-2])
        return status, headers, chunks, False
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def heard(emulator: OpenAITTSEmulator, audio: bytes) -> list[str]:
    decoder = SpeechDecoder(emulator.samples_per_char())
    decoder.feed(audio)
    return decoder.heard()


# -- protocol ------------------------------------------------------------------


@pytest.mark.parametrize("size", [7, 999, 1000, 4801])
async def test_answer_is_chunked_pcm_that_spells_the_input(size: int) -> None:
    """200, audio/pcm, a chunked body in pieces of the given size (odd ones too) that decodes to the input."""
    async with OpenAITTSEmulator(bytes_per_chunk=size) as emulator:
        status, headers, chunks, ended = await raw_post(emulator, speech())
    assert status == 200 and ended
    assert headers["content-type"] == "audio/pcm" and headers["transfer-encoding"] == "chunked"
    body = b"".join(chunks)
    sizes = [len(chunk) for chunk in chunks]
    assert len(body) == len(SENTENCE) * CHAR_BYTES
    assert sizes[:-1] == [size] * (len(sizes) - 1) and 0 < sizes[-1] <= size
    assert len(sizes) == math.ceil(len(body) / size)
    assert heard(emulator, body) == words(SENTENCE)
    [record] = emulator.requests
    assert (record.status, record.voice, record.model, record.input) == (200, "alloy", MODEL, SENTENCE)
    assert record.completed and record.closed and record.retry_count is None
    assert (record.bytes_sent, record.chunks_sent) == (len(body), len(sizes))
    assert record.words_sent == words(SENTENCE)


async def test_default_pieces_cut_through_characters_and_words() -> None:
    """The default 1000-byte pieces split characters (480 bytes each) and words."""
    async with OpenAITTSEmulator() as emulator:
        _, _, chunks, _ = await raw_post(emulator, speech())
    assert emulator.bytes_per_chunk == 1000 and emulator.samples_per_char() * 2 == CHAR_BYTES
    edges = list(itertools.accumulate(len(chunk) for chunk in chunks))[:-1]
    assert len([e for e in edges if e % CHAR_BYTES]) > len(edges) / 2
    assert [e for e in edges if SENTENCE[e // CHAR_BYTES] != " " and SENTENCE[e // CHAR_BYTES - 1] != " "]


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"model": MODEL, "voice": "alloy", "response_format": "pcm"}, "'input'"),
        (speech(voice="robot"), "'voice'"),
        (speech(response_format="mp3"), "pcm"),
        ({k: v for k, v in speech().items() if k != "response_format"}, "pcm"),
        (speech("a" * 4097), "too long"),
        (speech(speed=9), "speed"),
        (speech(stream_format="sse"), "stream_format"),
    ],
)
async def test_requests_it_cannot_serve_get_400(body: dict[str, Any], problem: str) -> None:
    """Missing fields, unknown voices, formats other than raw pcm, over-long input, bad speed: 400."""
    async with OpenAITTSEmulator() as emulator:
        async with aiohttp.ClientSession() as session:
            async with session.post(url(emulator), json=body) as response:
                assert response.status == 400
                error = (await response.json())["error"]
    assert error["type"] == "invalid_request_error" and problem in error["message"]
    assert emulator.requests[0].status == 400 and emulator.requests[0].bytes_sent == 0


async def test_custom_voice_key_path_and_body_are_checked() -> None:
    """A custom voice {"id"} is accepted; a wrong key gets 401, an unknown path 404, a body not JSON 400."""
    async with OpenAITTSEmulator(api_key=KEY) as emulator:
        async with aiohttp.ClientSession() as session:
            async with session.post(url(emulator), json=speech(voice={"id": "voice_1"}), headers=auth()) as r:
                assert r.status == 200 and heard(emulator, await r.read()) == words(SENTENCE)
            async with session.post(url(emulator), json=speech(), headers=auth("wrong")) as r:
                assert r.status == 401
                assert (await r.json())["error"]["code"] == "invalid_api_key"
            async with session.post(f"{emulator.base_url}/audio/voices", json=speech(), headers=auth()) as r:
                assert r.status == 404
            async with session.post(url(emulator), data=b"not json", headers=auth()) as r:
                assert r.status == 400
    assert [r.status for r in emulator.requests] == [200, 401, 400]
    assert emulator.voices == ["voice_1", "alloy", None]


async def test_refusal_sends_its_status_headers_and_an_openai_error_body() -> None:
    """refuse(): the status, the planned headers, and {"error": {message, type, param, code}}."""
    plan = FaultPlan(
        Fault.refuse(429, headers={"Retry-After": "7"}),
        Fault.refuse(503, connection=1, reason="Try later."),
    )
    async with OpenAITTSEmulator(plan=plan) as emulator:
        async with aiohttp.ClientSession() as session:
            async with session.post(url(emulator), json=speech()) as r:
                assert (r.status, r.headers["Retry-After"]) == (429, "7")
                assert (await r.json())["error"] == {
                    "message": "Rate limit reached for requests.",
                    "type": "requests",
                    "param": None,
                    "code": "rate_limit_exceeded",
                }
            async with session.post(url(emulator), json=speech()) as r:
                assert r.status == 503 and (await r.json())["error"]["message"] == "Try later."
            async with session.post(url(emulator), json=speech()) as r:
                assert r.status == 200
    assert [r.status for r in emulator.requests] == [429, 503, 200]
    assert [r.fault is not None for r in emulator.requests] == [True, True, False]


async def test_abort_resets_the_connection_in_the_middle_of_the_body() -> None:
    """abort(after_audio_chunks=3): 3 pieces arrive, then the connection is reset mid-body."""
    plan = FaultPlan(Fault.abort(after_audio_chunks=3, connection=None))
    async with OpenAITTSEmulator(plan=plan) as emulator:
        status, _, chunks, ended = await raw_post(emulator, speech())
        async with aiohttp.ClientSession() as session:
            async with session.post(url(emulator), json=speech()) as response:
                _, error = await read_body(response)
    assert status == 200 and not ended
    assert [len(chunk) for chunk in chunks] == [1000] * 3
    # An HTTP client sees the body fail.
    assert isinstance(error, aiohttp.ClientPayloadError)
    body = b"".join(chunks)
    record = emulator.requests[0]
    assert record.fault is not None and record.fault.kind is FaultKind.ABORT
    assert record.bytes_sent == 3000 and not record.completed
    # 3000 bytes are 6.25 characters: "The qu".
    assert heard(emulator, body) == record.words_sent == ["The"]


async def test_close_ends_the_body_cleanly_but_early() -> None:
    """close(after_audio_chunks=3): a normal end of the chunked body after 3000 bytes; no error at all."""
    async with OpenAITTSEmulator(plan=FaultPlan(Fault.close(1000, after_audio_chunks=3))) as emulator:
        status, _, chunks, ended = await raw_post(emulator, speech())
        async with aiohttp.ClientSession() as session:
            async with session.post(url(emulator), json=speech(SECOND)) as response:
                assert heard(emulator, await response.read()) == words(SECOND)
    assert status == 200 and ended
    assert [len(chunk) for chunk in chunks] == [1000] * 3
    assert not emulator.requests[0].completed and emulator.requests[1].completed


async def test_stall_keeps_the_connection_open_and_sends_nothing() -> None:
    """stall(after_audio_chunks=2): two pieces, then silence until the client hangs up."""
    async with OpenAITTSEmulator(plan=FaultPlan(Fault.stall(after_audio_chunks=2))) as emulator:
        async with aiohttp.ClientSession() as session:
            async with session.post(url(emulator), json=speech()) as response:
                assert await response.content.readexactly(2000)
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(response.content.read(1), 3 * UNIT)
                assert not emulator.requests[0].closed
            # Leaving the block releases the connection: the emulator sees it go.
        await emulator.wait_until(lambda: emulator.requests[0].closed, TIMEOUT)
    assert emulator.requests[0].bytes_sent == 2000


@pytest.mark.parametrize("fault", [Fault.hang(), Fault.stall()])
async def test_hang_or_an_immediate_stall_never_answers(fault: Fault) -> None:
    """hang() (or stall() with no trigger): no status line at all; the next request is answered."""
    async with OpenAITTSEmulator(plan=FaultPlan(fault)) as emulator:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(3 * UNIT):
                    await session.post(url(emulator), json=speech())
            async with session.post(url(emulator), json=speech(SECOND)) as response:
                assert heard(emulator, await response.read()) == words(SECOND)
        await emulator.wait_until(lambda: emulator.requests[0].closed, TIMEOUT)
    assert emulator.requests[0].status == 0 and emulator.requests[0].fault == fault


async def test_abort_before_the_answer_and_close_with_no_trigger() -> None:
    """abort() with no trigger drops the request unanswered; close() with none answers 200 and no audio."""
    plan = FaultPlan(Fault.abort(), Fault.close(1000, connection=1))
    async with OpenAITTSEmulator(plan=plan) as emulator:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientError):
                await session.post(url(emulator), json=speech())
            async with session.post(url(emulator), json=speech()) as response:
                assert response.status == 200 and await response.read() == b""
    assert [(r.status, r.bytes_sent) for r in emulator.requests] == [(0, 0), (200, 0)]


async def test_first_audio_waits_after_the_headers() -> None:
    """first_audio_delay and delay_first_audio add up; the headers come first."""
    plan = FaultPlan(Fault.delay_first_audio(2 * UNIT))
    async with OpenAITTSEmulator(plan=plan, first_audio_delay=1 * UNIT) as emulator:
        async with aiohttp.ClientSession() as session:
            async with session.post(url(emulator), json=speech(SECOND)) as response:
                headers_at = asyncio.get_running_loop().time()
                assert await response.content.readexactly(1000)
                audio_at = asyncio.get_running_loop().time()
    assert audio_at - headers_at >= 2.5 * UNIT
    record = emulator.requests[0]
    assert record.first_audio_at is not None and record.first_audio_at - record.received_at >= 3 * UNIT


async def test_realtime_paces_the_audio_and_after_seconds_cuts_it() -> None:
    """realtime: the body takes as long as its audio; abort(after_seconds) cuts it on time."""
    text = "One two three four five six seven."  # 34 characters: 0.34 s of audio
    plan = FaultPlan(Fault.abort(after_seconds=1.5 * UNIT, connection=1))
    async with OpenAITTSEmulator(plan=plan, realtime=True) as emulator:
        async with aiohttp.ClientSession() as session:
            async with session.post(url(emulator), json=speech(text)) as response:
                body, _ = await read_body(response)
            async with session.post(url(emulator), json=speech(text)) as response:
                cut, error = await read_body(response)
    whole, aborted = emulator.requests
    assert heard(emulator, body) == words(text)
    assert whole.closed_at is not None and whole.first_audio_at is not None
    # The last piece leaves once the audio before it has played (0.34 s minus one piece).
    assert whole.closed_at - whole.first_audio_at >= (len(text) * CHAR_BYTES - 1000) / 48000 - UNIT / 10
    assert error is not None and len(cut) == aborted.bytes_sent
    assert aborted.faulted_at is not None and aborted.faulted_at - aborted.received_at >= 1.5 * UNIT
    # Piece n is due n * 1000 / 48000 s after the first: by 0.15 s, 8 at most (n = 0..7).
    assert 1 <= aborted.chunks_sent <= 8 < whole.chunks_sent


def test_faults_and_options_without_meaning_are_refused() -> None:
    """GoAway, ERROR messages, text or received-audio triggers, and bad options raise ValueError."""
    for fault in [
        Fault.go_away(),
        Fault.error("boom", 500),
        Fault.abort(after_text_messages=1),
        Fault.stall(after_audio_received=1),
    ]:
        with pytest.raises(ValueError, match="has no meaning"):
            OpenAITTSEmulator(plan=FaultPlan(fault))
    for options in [{"ms_per_char": 0}, {"bytes_per_chunk": 0}, {"first_audio_delay": -1}]:
        with pytest.raises(ValueError):
            OpenAITTSEmulator(**options)  # type: ignore[arg-type]


# -- the stock OpenAITTSService -------------------------------------------------


def stock(emulator: OpenAITTSEmulator, **kwargs: Any) -> OpenAITTSService:
    return OpenAITTSService(api_key=KEY, base_url=emulator.base_url, **kwargs)


async def start(emulator: OpenAITTSEmulator, *frames: Frame, **kwargs: Any) -> Scenario:
    run = Scenario(stock(emulator, **kwargs), spc=emulator.samples_per_char(), sample_rate=SAMPLE_RATE)
    await run.start()
    await run.send(*frames)
    return run


def turn(tokens: list[str] = TURN_TOKENS) -> list[Frame]:
    return [LLMFullResponseStartFrame(), *[LLMTextFrame(t) for t in tokens], LLMFullResponseEndFrame()]


def kinds(run: Scenario) -> list[str]:
    return [m.kind for m in run.listener.marks]


async def holds_for(predicate: Callable[[], bool], seconds: float = 2 * UNIT) -> bool:
    """Whether ``predicate()`` holds throughout ``seconds``, checked every 10 ms: for what must not happen."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while loop.time() < end:
        if not predicate():
            return False
        await asyncio.sleep(0.01)
    return predicate()


async def test_stock_service_speaks_a_speak_frame() -> None:
    """A TTSSpeakFrame: one request for its text; every word heard; its text frame after its audio."""
    async with OpenAITTSEmulator(api_key=KEY) as emulator:
        run = await start(emulator, TTSSpeakFrame(SENTENCE))
        await run.wait_until(lambda: run.listener.stopped == 1, TIMEOUT)
        assert run.tts.chunk_size == STOCK_READ_BYTES  # type: ignore[attr-defined]
        await run.end()
    assert run.heard == words(SENTENCE)
    assert run.context_words == run.heard
    assert run.errors == []
    assert kinds(run) == ["started", "audio", "text", "stopped"]
    [record] = emulator.requests
    # No trailing space is added, and no speed or instructions are sent unless set.
    assert record.body == speech()
    assert record.retry_count == 0 and record.completed
    # 50880 bytes, read 24000 at a time: three frames.
    assert run.listener.audio_frames == 3


async def test_stock_service_speaks_a_streamed_turn() -> None:
    """An LLM turn: one request per sentence, in turn; each TTSTextFrame right after its sentence's audio."""
    settings = OpenAITTSService.Settings(voice="nova", speed=1.25, instructions="Speak calmly.")
    async with OpenAITTSEmulator(api_key=KEY) as emulator:
        run = await start(emulator, *turn(), settings=settings)
        await run.wait_until(lambda: run.listener.responses_ended == 1, TIMEOUT)
        await run.end()
    assert run.heard == words(TURN)
    assert run.context_words == run.heard
    assert run.errors == []
    assert kinds(run) == [
        "response-start",
        "started",
        "audio",
        "text",
        "audio",
        "text",
        "audio",
        "text",
        "stopped",
        "response-end",
    ]
    assert [m.detail for m in run.listener.marks if m.kind == "text"] == TURN_SENTENCES
    assert [r.input for r in emulator.requests] == TURN_SENTENCES
    assert emulator.voices == ["nova"] * 3
    assert {(r.speed, r.instructions) for r in emulator.requests} == {(1.25, "Speak calmly.")}
    # Each request starts only once the previous body was read to its end.
    for before, after in itertools.pairwise(emulator.requests):
        assert before.closed_at is not None and after.received_at >= before.closed_at


async def test_stock_service_loses_a_cut_body_and_its_context() -> None:
    """A TCP reset after 30 pieces (30000 bytes) of a 50880-byte sentence, then a second sentence.

    Measured: 10 of 22 words heard (one 24000-byte frame; the 6000 bytes read
    after it are dropped with the exception), none in the context; one
    ErrorFrame, category UNKNOWN, not fatal; no retry. The sentence's context
    is only stopped by STOP_FRAME_TIMEOUT of silence; the second sentence,
    requested at once, plays after that, but is written to the context only
    when the pipeline ends (the speak frame's turn was left open).
    """
    plan = FaultPlan(Fault.abort(after_audio_chunks=30))
    async with OpenAITTSEmulator(plan=plan) as emulator:
        run = await start(
            emulator, TTSSpeakFrame(SENTENCE), TTSSpeakFrame(SECOND), stop_frame_timeout_s=STOP_FRAME_TIMEOUT
        )
        await run.wait_until(lambda: run.listener.stopped == 2, TIMEOUT)
        assert await holds_for(lambda: run.context_messages == [])
        await run.end()
    assert run.heard == words(SENTENCE)[:10] + words(SECOND)
    assert run.context_messages == [SECOND]
    [error] = run.errors
    assert error.error == (
        "Error processing frame: peer closed connection without sending complete message body "
        "(incomplete chunked read)"
    )
    assert error.category is ErrorCategory.UNKNOWN and not error.fatal and run.tts.is_usable
    first, second = emulator.requests
    assert (first.bytes_sent, first.completed, second.input) == (30000, False, SECOND)
    assert kinds(run) == ["started", "audio", "stopped", "started", "audio", "text", "stopped"]
    stopped_at = next(m.at for m in run.listener.marks if m.kind == "stopped")
    assert first.faulted_at is not None and stopped_at - first.faulted_at >= STOP_FRAME_TIMEOUT * 0.9


async def test_stock_service_drops_text_after_a_failure_in_a_turn() -> None:
    """A TCP reset 3 pieces into the first sentence of a streamed turn.

    Measured: nothing of the first sentence heard (3000 bytes never make a
    24000-byte frame) nor written to the context; one ErrorFrame. The
    exception escaped the sentence aggregator while it was still reading the
    token "Tomorrow it ", whose first character had closed the sentence: the
    rest of that token is lost, and the second sentence is synthesized,
    heard and written to the context as "Twill rain in the afternoon."
    """
    plan = FaultPlan(Fault.abort(after_audio_chunks=3))
    async with OpenAITTSEmulator(plan=plan) as emulator:
        run = await start(emulator, *turn())
        await run.wait_until(lambda: run.listener.responses_ended == 1, TIMEOUT)
        await run.end()
    assert [r.input for r in emulator.requests] == [
        TURN_SENTENCES[0],
        "Twill rain in the afternoon.",
        TURN_SENTENCES[2],
    ]
    assert run.heard == words("Twill rain in the afternoon.", TURN_SENTENCES[2])
    assert run.context_words == run.heard
    assert len(run.errors) == 1 and "incomplete chunked read" in run.errors[0].error


async def test_stock_service_takes_a_truncated_body_for_a_whole_one() -> None:
    """A body ended cleanly after 30 pieces: 13 of 22 words heard, all 22 in the context, no error."""
    plan = FaultPlan(Fault.close(1000, after_audio_chunks=30))
    async with OpenAITTSEmulator(plan=plan) as emulator:
        run = await start(emulator, TTSSpeakFrame(SENTENCE), TTSSpeakFrame(SECOND))
        await run.wait_until(lambda: run.listener.stopped == 2, TIMEOUT)
        await run.end()
    # 30000 bytes are 62.5 characters: up to "runs" and half the space after it.
    assert run.heard == words(SENTENCE)[:13] + words(SECOND)
    assert run.context_messages == [SENTENCE, SECOND]
    assert run.errors == []
    assert kinds(run) == ["started", "audio", "text", "stopped"] * 2


async def test_stock_service_waits_out_a_stalled_body() -> None:
    """A body that stalls after 30 pieces, with the SDK's default 600 s read timeout.

    Measured within a 1 s bound after the context times out: 10 words heard,
    the context stopped by STOP_FRAME_TIMEOUT of silence, no error, and the
    next sentence never requested; the request stays open until the pipeline
    is cancelled.
    """
    plan = FaultPlan(Fault.stall(after_audio_chunks=30))
    async with OpenAITTSEmulator(plan=plan) as emulator:
        run = await start(
            emulator, TTSSpeakFrame(SENTENCE), TTSSpeakFrame(SECOND), stop_frame_timeout_s=STOP_FRAME_TIMEOUT
        )
        try:
            await run.wait_until(lambda: run.listener.stopped == 1, TIMEOUT)
            with pytest.raises(TimeoutError):
                await emulator.wait_until(lambda: len(emulator.requests) > 1, 10 * UNIT)
            assert run.heard == words(SENTENCE)[:10]
            assert run.errors == [] and run.context_messages == []
            assert not emulator.requests[0].closed
        finally:
            await run.cancel()
        await emulator.wait_until(lambda: emulator.requests[0].closed, TIMEOUT)
    assert len(emulator.requests) == 1


async def test_stock_service_with_a_read_timeout_reports_a_stall_and_moves_on() -> None:
    """The same stall with a 0.4 s http_client timeout: an empty ErrorFrame, no retry, the next sentence."""
    plan = FaultPlan(Fault.stall(after_audio_chunks=30))
    client = openai.DefaultAsyncHttpxClient(timeout=4 * UNIT)
    async with OpenAITTSEmulator(plan=plan) as emulator:
        run = await start(
            emulator,
            TTSSpeakFrame(SENTENCE),
            TTSSpeakFrame(SECOND),
            http_client=client,
            stop_frame_timeout_s=STOP_FRAME_TIMEOUT,
        )
        await run.wait_until(lambda: run.listener.stopped == 2, TIMEOUT)
        await run.end()
    stalled, second = emulator.requests
    assert second.input == SECOND and second.retry_count == 0
    assert stalled.faulted_at is not None and second.received_at - stalled.faulted_at >= 4 * UNIT
    # httpx's ReadTimeout escapes the SDK unwrapped, and its message is empty.
    assert [e.error for e in run.errors] == ["Error processing frame: "]
    assert run.heard == words(SENTENCE)[:10] + words(SECOND)


async def test_stock_service_retries_an_unanswered_request_on_its_timeout() -> None:
    """Requests never answered, with a 0.1 s timeout: the SDK tries 3 times, then 'Request timed out.'"""
    client = openai.DefaultAsyncHttpxClient(timeout=1 * UNIT)
    async with OpenAITTSEmulator(plan=FaultPlan(Fault.hang(connection=None))) as emulator:
        run = await start(
            emulator, TTSSpeakFrame(SENTENCE), http_client=client, stop_frame_timeout_s=STOP_FRAME_TIMEOUT
        )
        await run.recorder.wait_until(lambda: len(run.errors) == 2, TIMEOUT)
        await run.end()
    assert [r.retry_count for r in emulator.requests] == [0, 1, 2]
    assert sorted(e.error for e in run.errors) == [
        "Error processing frame: Request timed out.",
        f"TTS context {run.listener.marks[0].detail} completed with no audio",
    ]
    assert run.heard == []


async def test_stock_service_reports_http_500_per_sentence_after_sdk_retries() -> None:
    """HTTP 500 on every request: 3 attempts per sentence, an UNKNOWN ErrorFrame each, nothing heard."""
    # retry-after-ms keeps the SDK's waits at 10 ms instead of about 0.4 s and 0.9 s.
    plan = FaultPlan(Fault.refuse(500, connection=None, headers={"retry-after-ms": "10"}))
    async with OpenAITTSEmulator(plan=plan) as emulator:
        run = await start(
            emulator, TTSSpeakFrame(SENTENCE), TTSSpeakFrame(SECOND), stop_frame_timeout_s=STOP_FRAME_TIMEOUT
        )
        await run.wait_until(lambda: run.listener.stopped == 2, TIMEOUT)
        await run.end()
    assert [(r.input, r.retry_count) for r in emulator.requests] == [
        (SENTENCE, 0),
        (SENTENCE, 1),
        (SENTENCE, 2),
        (SECOND, 0),
        (SECOND, 1),
        (SECOND, 2),
    ]
    # (Matched on the status as the SDK words it: a context id is a random UUID, which may hold "500".)
    failures = [e for e in run.errors if "Error code: 500" in e.error]
    assert [e.error for e in failures] == [
        "Error processing frame: Error code: 500 - The server had an error while processing your request."
    ] * 2
    assert {e.category for e in failures} == {ErrorCategory.UNKNOWN}
    assert len([e for e in run.errors if "completed with no audio" in e.error]) == 2
    assert run.heard == [] and run.context_messages == [] and run.tts.is_usable


async def test_stock_service_never_sees_a_429_or_a_drop_before_the_answer() -> None:
    """A 429 with Retry-After, then a connection dropped unanswered: the SDK waits, retries, and succeeds."""
    plan = FaultPlan(Fault.refuse(429, headers={"Retry-After": str(2 * UNIT)}), Fault.abort(connection=2))
    async with OpenAITTSEmulator(plan=plan) as emulator:
        run = await start(emulator, TTSSpeakFrame(SENTENCE), TTSSpeakFrame(SECOND))
        await run.wait_until(lambda: run.listener.stopped == 2, TIMEOUT)
        await run.end()
    refused, first, dropped, second = emulator.requests
    assert (refused.status, first.status, first.retry_count) == (429, 200, 1)
    assert first.received_at - refused.received_at >= 2 * UNIT
    assert (dropped.status, second.status, second.retry_count) == (0, 200, 1)
    assert run.errors == []
    assert run.heard == words(SENTENCE, SECOND) and run.context_words == run.heard


async def test_stock_service_stays_usable_after_a_401() -> None:
    """HTTP 401: one request, an UNKNOWN ErrorFrame (not AUTHENTICATION); the next sentence is spoken."""
    async with OpenAITTSEmulator(plan=FaultPlan(Fault.refuse(401))) as emulator:
        run = await start(
            emulator, TTSSpeakFrame(SENTENCE), TTSSpeakFrame(SECOND), stop_frame_timeout_s=STOP_FRAME_TIMEOUT
        )
        await run.wait_until(lambda: run.listener.stopped == 2, TIMEOUT)
        # Like after a reset, the speak frame's turn is left open: the second
        # sentence reaches the context only when the pipeline ends.
        assert await holds_for(lambda: run.context_messages == [])
        await run.end()
    assert [r.status for r in emulator.requests] == [401, 200]
    assert run.errors[0].error == "Error processing frame: Error code: 401 - Incorrect API key provided."
    assert run.errors[0].category is ErrorCategory.UNKNOWN and run.tts.is_usable
    assert run.heard == words(SECOND)
    assert run.context_messages == [SECOND]


async def test_stock_service_writes_an_unspoken_sentence_to_the_context_on_400() -> None:
    """HTTP 400, caught in run_tts: "Unknown error occurred"; the unheard sentence enters the context."""
    async with OpenAITTSEmulator(plan=FaultPlan(Fault.refuse(400))) as emulator:
        run = await start(
            emulator, TTSSpeakFrame(SENTENCE), TTSSpeakFrame(SECOND), stop_frame_timeout_s=STOP_FRAME_TIMEOUT
        )
        await run.wait_until(lambda: run.listener.stopped == 2, TIMEOUT)
        await run.end()
    assert [r.status for r in emulator.requests] == [400, 200]
    context_id = run.listener.marks[0].detail
    assert [e.error for e in run.errors] == [
        "Unknown error occurred: Error code: 400 - Invalid request.",
        f"TTS context {context_id} completed with no audio",
    ]
    assert run.heard == words(SECOND)
    assert run.context_messages == [SENTENCE, SECOND]
    assert kinds(run) == ["started", "text", "stopped", "started", "audio", "text", "stopped"]


async def test_stock_service_is_only_slow_on_a_slow_first_audio() -> None:
    """A first audio 0.3 s late delays the sentence and nothing else."""
    async with OpenAITTSEmulator(plan=FaultPlan(Fault.delay_first_audio(3 * UNIT))) as emulator:
        run = await start(emulator, TTSSpeakFrame(SECOND))
        await run.wait_until(lambda: run.listener.stopped == 1, TIMEOUT)
        await run.end()
    record = emulator.requests[0]
    assert run.listener.first_audio_at is not None
    assert run.listener.first_audio_at - record.received_at >= 3 * UNIT
    assert run.errors == [] and run.heard == words(SECOND) and run.context_words == run.heard
