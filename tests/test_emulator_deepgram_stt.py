"""The Deepgram live-transcription emulator, spoken to by a bare client and by the stock DeepgramSTTService.

The stock-service tests run ``DeepgramSTTService`` (Pipecat 1.14, deepgram-sdk
7) in a real pipeline (``recorder -> stt -> transcripts -> user aggregator``)
against the emulator on 127.0.0.1, and pin down what it loses when the
connection fails: these are the failures the product exists to fix, so if
Pipecat ever fixes them, these tests fail and we want to know.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import pytest
from loguru import logger
from pipecat.services.deepgram.stt import DeepgramSTTService
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK, InvalidStatus

from pipecat_resilient.testing import Fault, FaultPlan
from pipecat_resilient.testing.deepgram_stt import DeepgramSTTEmulator
from pipecat_resilient.testing.speech import encode
from pipecat_resilient.testing.stt_harness import Caller, Measurement, STTScenario, measure

from .conftest import UNIT

# Every wait in this file; a passing test takes a fraction of it.
TIMEOUT = 30 * UNIT
API_KEY = "test-key"
SR = 16000


def pcm(text: str, **kwargs: Any) -> bytes:
    return encode(text, sample_rate=SR, ms_per_char=10, **kwargs)


def silence(seconds: float) -> bytes:
    return bytes(2 * round(seconds * SR))


def listen_url(emulator: DeepgramSTTEmulator, **params: object) -> str:
    query: dict[str, object] = {"encoding": "linear16", "sample_rate": SR, "channels": 1, **params}
    return f"{emulator.url}/v1/listen?{urlencode(query)}"


async def send_audio(ws: ClientConnection, audio: bytes, frame: int = 640) -> None:
    """Send ``audio`` in 20 ms messages."""
    for start in range(0, len(audio), frame):
        await ws.send(audio[start : start + frame])


async def receive_until(ws: ClientConnection, done: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    """Every message received until one satisfies ``done`` (included)."""
    messages: list[dict[str, Any]] = []
    async with asyncio.timeout(TIMEOUT):
        while True:
            message = json.loads(await ws.recv())
            messages.append(message)
            if done(message):
                return messages


def results(messages: list[dict[str, Any]], *, final: bool | None = None) -> list[dict[str, Any]]:
    return [m for m in messages if m["type"] == "Results" and (final is None or m["is_final"] is final)]


def transcript(message: dict[str, Any]) -> str:
    return str(message["channel"]["alternatives"][0]["transcript"])


def timings(message: dict[str, Any]) -> list[tuple[str, float, float]]:
    return [(w["word"], w["start"], w["end"]) for w in message["channel"]["alternatives"][0]["words"]]


def from_finalize(message: dict[str, Any]) -> bool:
    return bool(message.get("from_finalize"))


# -- the protocol, with a bare client -----------------------------------------


async def test_each_word_is_shown_in_an_interim_then_finalized_with_stream_times() -> None:
    """Interim then final per word, in stream seconds; silence marks speech_final; Finalize confirms."""
    async with DeepgramSTTEmulator() as emulator:
        async with connect(listen_url(emulator, interim_results="true", punctuate="true")) as ws:
            await send_audio(ws, pcm("Hello there, my friend.") + silence(0.2))
            await ws.send(json.dumps({"type": "Finalize"}))
            messages = await receive_until(ws, from_finalize)
    kinds = [("final" if m["is_final"] else "interim", transcript(m)) for m in results(messages)]
    assert kinds == [
        ("interim", "Hello"),
        ("final", "Hello"),
        ("interim", "there,"),
        ("final", "there,"),
        ("interim", "my"),
        ("final", "my"),
        ("interim", "friend."),
        ("final", "friend."),
        ("final", ""),  # the Finalize confirmation: nothing was left
    ]
    finals = results(messages, final=True)
    assert [timings(m) for m in finals[:4]] == [
        [("hello", 0.0, 0.05)],
        [("there", 0.06, 0.12)],
        [("my", 0.13, 0.15)],
        [("friend", 0.16, 0.23)],
    ]
    assert [w["punctuated_word"] for m in finals for w in m["channel"]["alternatives"][0]["words"]] == [
        "Hello",
        "there,",
        "my",
        "friend.",
    ]
    # Finals tile the stream: each starts where the last one ended.
    for before, after in zip(finals, finals[1:], strict=False):
        assert after["start"] == pytest.approx(before["start"] + before["duration"], abs=1e-3)
    # The endpoint (10 ms of silence, Deepgram's default) is the last word's final.
    assert [m["speech_final"] for m in finals] == [False, False, False, True, False]
    assert [from_finalize(m) for m in finals] == [False] * 4 + [True]
    assert emulator.stream(0).words_finalized == ["Hello", "there,", "my", "friend."]
    assert emulator.stream(0).seconds_received == pytest.approx(0.43)


async def test_transcripts_are_bare_words_without_punctuate() -> None:
    """Without punctuate or smart_format the transcript is the lower-case words; no interims unasked."""
    async with DeepgramSTTEmulator() as emulator:
        async with connect(listen_url(emulator)) as ws:
            await send_audio(ws, pcm("Hello there.") + silence(0.1))
            await ws.send(json.dumps({"type": "Finalize"}))
            messages = await receive_until(ws, from_finalize)
    assert results(messages, final=False) == []
    # Each word final at once; then the endpoint, and the Finalize, with nothing left.
    assert [transcript(m) for m in results(messages)] == ["hello", "there", "", ""]
    assert [m["speech_final"] for m in results(messages)] == [False, False, True, False]


async def test_lag_holds_words_back_until_finalize() -> None:
    """With a lag, the newest words wait for more audio; Finalize flushes them at once."""
    async with DeepgramSTTEmulator(lag=0.3) as emulator:
        async with connect(listen_url(emulator, punctuate="true")) as ws:
            await send_audio(ws, pcm("One two three four five six seven eight nine ten."))
            await ws.send(json.dumps({"type": "Finalize"}))
            messages = await receive_until(ws, from_finalize)
    # 0.5 s of audio: only the words that ended by 0.2 s were followed by 0.3 s more.
    assert [transcript(m) for m in results(messages)] == [
        "One",
        "two",
        "three",
        "four",
        "five six seven eight nine ten.",
    ]
    assert from_finalize(results(messages)[-1])


async def test_finals_group_words_and_interims_are_revised() -> None:
    """Finals come in groups of words_per_final; revise_interims mishears each interim's newest word."""
    async with DeepgramSTTEmulator(words_per_final=3, revise_interims=True) as emulator:
        url = listen_url(emulator, interim_results="true", punctuate="true", endpointing="false")
        async with connect(url) as ws:
            await send_audio(ws, pcm("one two three four five six seven"))
            await ws.send(json.dumps({"type": "Finalize"}))
            messages = await receive_until(ws, from_finalize)
    assert [transcript(m) for m in results(messages, final=True)] == [
        "one two three",
        "four five six",
        "seven",
    ]
    interims = [transcript(m) for m in results(messages, final=False)]
    assert interims == ["on", "one tw", "one two thre", "fou", "four fiv", "four five si", "seve"]
    assert emulator.stream(0).words_finalized == "one two three four five six seven".split()


async def test_utterance_end_and_speech_started() -> None:
    """vad_events announces speech; utterance_end_ms sends UtteranceEnd after that much silence."""
    async with DeepgramSTTEmulator() as emulator:
        url = listen_url(
            emulator, interim_results="true", punctuate="true", vad_events="true", utterance_end_ms=1000
        )
        async with connect(url) as ws:
            await send_audio(ws, silence(0.1) + pcm("Hi there.") + silence(1.1))
            messages = await receive_until(ws, lambda m: m["type"] == "UtteranceEnd")
    assert messages[0] == {"type": "SpeechStarted", "channel": [0], "timestamp": 0.1}
    assert messages[-1] == {"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": 0.19}
    assert [m["speech_final"] for m in results(messages, final=True)] == [False, True]


async def test_close_stream_finalizes_sends_metadata_and_closes() -> None:
    """CloseStream: the words held back, final, then Metadata, then a 1000 close."""
    audio = pcm("Good night.")
    async with DeepgramSTTEmulator(lag=1.0) as emulator:
        async with connect(listen_url(emulator, punctuate="true")) as ws:
            await send_audio(ws, audio)
            await ws.send(json.dumps({"type": "CloseStream"}))
            messages = await receive_until(ws, lambda m: m["type"] == "Metadata")
            with pytest.raises(ConnectionClosedOK):
                await ws.recv()
            assert ws.close_code == 1000
    assert [transcript(m) for m in results(messages, final=True)] == ["Good night."]
    metadata = messages[-1]
    assert metadata["duration"] == pytest.approx(len(audio) / (2 * SR))
    assert metadata["sha256"] == hashlib.sha256(audio).hexdigest()
    assert metadata["channels"] == 1


async def test_keepalive_holds_off_the_idle_timeout() -> None:
    """KeepAlive keeps a silent connection open; without it, 1011 NET-0001 as on the real service."""
    async with DeepgramSTTEmulator(idle_timeout=3 * UNIT) as emulator:
        async with connect(listen_url(emulator)) as ws:
            for _ in range(6):
                await ws.send(json.dumps({"type": "KeepAlive"}))
                await asyncio.sleep(UNIT)
            with pytest.raises(ConnectionClosedError):
                await asyncio.wait_for(ws.recv(), TIMEOUT)
            assert ws.close_code == 1011 and ws.close_reason == "NET-0001"
    assert emulator.connections[0].messages == [{"type": "KeepAlive"}] * 6


async def test_error_leaves_the_socket_open_and_loses_what_was_not_final() -> None:
    """An ERROR fault sends Deepgram's Error message; the words not final are gone, later ones transcribed."""
    plan = FaultPlan(Fault.error("upstream model failure", 1011, after_audio_received=1))
    async with DeepgramSTTEmulator(plan=plan, words_per_final=10) as emulator:
        async with connect(listen_url(emulator, punctuate="true", endpointing="false")) as ws:
            await ws.send(pcm("one two", message_end=False, then=" "))
            error = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
            await ws.send(pcm(" three four.", after="o"))
            await ws.send(json.dumps({"type": "Finalize"}))
            messages = await receive_until(ws, from_finalize)
    assert error == {
        "type": "Error",
        "variant": "InternalServerError",
        "description": "upstream model failure",
        "code": "1011",
    }
    assert [transcript(m) for m in results(messages)] == ["three four."]
    record = emulator.stream(0)
    assert record.words_dropped == ["one", "two"]
    assert record.words_finalized == ["three", "four."]
    assert emulator.connections[0].errors == list(plan)


async def test_each_connection_has_its_own_stream_time_and_faults() -> None:
    """Stream time restarts at 0 on a new connection; planned closes, refusals and keys apply."""
    plan = FaultPlan(
        Fault.close(1011, "NET-0000", connection=1, after_audio_received=2), Fault.refuse(503, connection=2)
    )
    async with DeepgramSTTEmulator(plan=plan, api_key=API_KEY) as emulator:
        headers = {"Authorization": f"Token {API_KEY}"}
        with pytest.raises(InvalidStatus) as wrong_key:
            async with connect(listen_url(emulator), additional_headers={"Authorization": "Token nope"}):
                pass
        assert wrong_key.value.response.status_code == 401
        async with connect(listen_url(emulator, punctuate="true"), additional_headers=headers) as ws:
            await send_audio(ws, silence(0.04) + pcm("Lost words."))
            with pytest.raises(ConnectionClosedError):
                await receive_until(ws, lambda m: False)
            assert ws.close_code == 1011 and ws.close_reason == "NET-0000"
        with pytest.raises(InvalidStatus) as refused:
            async with connect(listen_url(emulator), additional_headers=headers):
                pass
        assert refused.value.response.status_code == 503
        async with connect(listen_url(emulator, punctuate="true"), additional_headers=headers) as ws:
            await send_audio(ws, pcm("Fresh start.") + silence(0.1))
            messages = await receive_until(ws, lambda m: m.get("speech_final", False))
        with pytest.raises(InvalidStatus) as wrong_path:
            async with connect(f"{emulator.url}/v1/speak", additional_headers=headers):
                pass
        assert wrong_path.value.response.status_code == 404
    assert timings(results(messages)[0]) == [("fresh", 0.0, 0.05)]
    assert [c.refused for c in emulator.connections] == [401, None, 503, None, 404]
    assert emulator.stream(1).words_dropped == []  # two messages in, no word had ended
    assert emulator.words_finalized() == ["Fresh", "start."]


async def test_a_close_reads_the_clients_close_frame_behind_a_burst_of_audio() -> None:
    """A close fault in a burst of audio (more than the server's read queue holds) completes at once:
    the emulator reads on, as a real server does, until the client's close frame; it does not wait out
    its close timeout (1 s) with the close frame unread behind the audio."""
    plan = FaultPlan(Fault.close(1011, "NET-0000", after_audio_received=1))
    async with DeepgramSTTEmulator(plan=plan) as emulator:
        async with connect(listen_url(emulator)) as ws:
            await send_audio(ws, silence(2.0))  # 100 messages; the first one triggers the close
            await asyncio.wait_for(ws.wait_closed(), TIMEOUT)
            closed_at = time.monotonic()
            assert ws.close_code == 1011
    fault_at = emulator.connections[0].fault_at
    assert fault_at is not None and closed_at - fault_at < 0.5


# -- the stock service, without faults ----------------------------------------

SCRIPT = [
    "I would like to book a table.",
    "For four people on Friday night.",
    "Around eight would be perfect.",
]


def stock(emulator: DeepgramSTTEmulator) -> DeepgramSTTService:
    """The stock service, pointed at ``emulator``."""
    return DeepgramSTTService(api_key=API_KEY, base_url=emulator.url)


async def test_stock_service_hears_every_word_and_commits_each_turn() -> None:
    """Every word said reaches the transcripts, and each utterance becomes one user message."""
    caller = Caller(SCRIPT)
    async with DeepgramSTTEmulator(api_key=API_KEY) as emulator:
        async with STTScenario(stock(emulator)) as run:
            await run.speak(caller)
            await run.wait_until(lambda: len(run.user_messages) == len(SCRIPT), TIMEOUT)
    assert run.final_words == caller.words
    assert run.user_messages == SCRIPT
    assert run.interim_texts  # interim results are on in Pipecat's defaults
    assert run.errors == []
    # One connection, with Pipecat's defaults on the query, and a Finalize per VAD stop.
    assert len(emulator.connections) == 1
    record = emulator.stream(0)
    assert record.query["interim_results"] == "true" and record.query["punctuate"] == "true"
    assert record.query["model"] == "nova-3-general" and record.query["sample_rate"] == str(SR)
    assert emulator.connections[0].messages == [{"type": "Finalize"}] * len(SCRIPT) + [
        {"type": "CloseStream"}
    ]
    assert record.words_finalized == caller.words


async def test_stock_service_survives_an_unkind_transcriber() -> None:
    """Grouped finals, a lag and revised interims: the Finalize on each VAD stop still gets every word."""
    caller = Caller(SCRIPT)
    async with DeepgramSTTEmulator(words_per_final=4, lag=0.3, revise_interims=True) as emulator:
        async with STTScenario(stock(emulator)) as run:
            await run.speak(caller)
            await run.wait_until(lambda: len(run.user_messages) == len(SCRIPT), TIMEOUT)
    assert run.final_words == caller.words
    assert run.user_messages == SCRIPT
    assert "I would lik" in run.interim_texts  # misheard, then set right
    assert all(t.finalized for t in run.transcripts.finals if t.text.endswith("."))


# -- the stock service under faults: what it loses ------------------------------

# A caller booking a table, at about four words a second (50 ms a character),
# in real time. The fault strikes 2.9 s in (the 145th 20 ms frame), in the
# middle of the second utterance, after "For four people".
CALL = [
    "I would like to book a table.",
    "For four people on Friday night.",
    "Around eight would be perfect.",
    "We need one high chair too.",
    "Can you confirm by text message?",
    "Thank you very much for your help.",
]
MS_PER_CHAR = 50
FAULT_FRAME = 145
AT_THE_DROP = ("For", "four", "people")  # heard by the dying connection, not final yet

FAULTS = {
    "close 1011": FaultPlan(Fault.close(1011, "NET-0000", after_audio_received=FAULT_FRAME)),
    "close 1000": FaultPlan(Fault.close(1000, after_audio_received=FAULT_FRAME)),
    "abort": FaultPlan(Fault.abort(after_audio_received=FAULT_FRAME)),
    "stall": FaultPlan(Fault.stall(after_audio_received=FAULT_FRAME)),
    "refuse 429": FaultPlan(
        Fault.close(1011, "NET-0000", after_audio_received=FAULT_FRAME), Fault.refuse(429, connection=1)
    ),
    "refuse 503": FaultPlan(
        Fault.close(1011, "NET-0000", after_audio_received=FAULT_FRAME), Fault.refuse(503, connection=1)
    ),
    "error": FaultPlan(Fault.error("internal server error", 1011, after_audio_received=FAULT_FRAME)),
}


async def _measure(plan: FaultPlan) -> Measurement:
    """Run the call through the stock service against ``plan``; Deepgram-like finals of 4 words."""
    caller = Caller(CALL, ms_per_char=MS_PER_CHAR)
    emulator = DeepgramSTTEmulator(plan=plan, api_key=API_KEY, ms_per_char=MS_PER_CHAR, words_per_final=4)
    async with emulator:
        run = STTScenario(stock(emulator))
        await run.start()
        try:
            await run.speak(caller, pace=1.0)
            await run.settle(lambda: not run.lost(caller), idle=5 * UNIT, limit=TIMEOUT)
            measured = measure(run, caller, emulator)
            await emulator.stop()  # a stalled socket would hold up the stock service's teardown
        finally:
            await run.cancel()
    return measured


async def _measure_all() -> dict[str, Measurement]:
    results = await asyncio.gather(*(_measure(plan) for plan in FAULTS.values()))
    return dict(zip(FAULTS, results, strict=True))


@pytest.fixture(scope="module")
def losses() -> dict[str, Measurement]:
    """Every fault's measurement, run side by side (each is a real-time call of 13 s)."""
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    return asyncio.run(_measure_all())


def test_stock_loses_the_words_around_a_1011_close(losses: dict[str, Measurement]) -> None:
    """Close 1011: one ErrorFrame, a 4 s backoff, and the caller's words of those 4 s are gone.

    Measured: 14 of 37 words lost -- the 3 the dead connection had not
    finalized and the 11 said during the 4.05 s before the new handshake (the
    stock service drops audio while it has no connection) -- and the first word
    heard after it is the tail of a cut word ("ne" of "one" in that run),
    written into the context as "ne high chair too.".
    """
    m = losses["close 1011"]
    assert set(AT_THE_DROP) <= set(m.lost) and m.dropped == AT_THE_DROP
    assert len(m.lost) >= 10
    assert m.reconnect is not None and 4.0 <= m.reconnect < 5.0
    assert len(m.errors) == 1 and "1011" in m.errors[0]
    assert m.handshakes == (None, None)
    assert m.user_messages[0] == CALL[0] and m.user_messages[-1] == CALL[-1]


def test_stock_loses_the_words_around_a_1000_close_and_says_nothing(losses: dict[str, Measurement]) -> None:
    """Close 1000: the same 4 s gap and the same loss, and no ErrorFrame at all.

    Measured: 14 of 37 words lost, reconnected 4.05 s after the close, no
    error upstream (a clean close ends the SDK's receive loop quietly).
    """
    m = losses["close 1000"]
    assert set(AT_THE_DROP) <= set(m.lost) and len(m.lost) >= 10
    assert m.reconnect is not None and 4.0 <= m.reconnect < 5.0
    assert m.errors == ()


def test_stock_loses_the_words_around_an_abort(losses: dict[str, Measurement]) -> None:
    """Abort (1006): one ErrorFrame, the 4 s backoff, the same loss.

    Measured: 14 of 37 words lost, reconnected 4.02 s after the drop.
    """
    m = losses["abort"]
    assert set(AT_THE_DROP) <= set(m.lost) and len(m.lost) >= 10
    assert m.reconnect is not None and 4.0 <= m.reconnect < 5.0
    assert len(m.errors) == 1 and "no close frame" in m.errors[0]


def test_stock_never_notices_a_stalled_socket(losses: dict[str, Measurement]) -> None:
    """Stall (half-open): no error, no reconnect; every word after it is lost.

    Measured: 30 of 37 words lost -- everything after "I would like to book a
    table." -- with no ErrorFrame and no second connection in the 10.5 s the
    call went on (the SDK's websockets keepalive would take 20 to 40 s).
    """
    m = losses["stall"]
    assert m.lost == tuple(Caller(CALL).words[7:])
    assert m.errors == () and m.handshakes == (None,) and m.reconnect is None
    assert m.user_messages == (CALL[0],)


def test_stock_gives_up_for_good_on_a_429_reconnect(losses: dict[str, Measurement]) -> None:
    """A drop, then 429 on the reconnect: the stock service gives up for good and hears nothing more.

    Measured: 30 of 37 words lost, two ErrorFrames (the 1011, then "Deepgram
    rejected the connection (status 429)", permanent), no third handshake.
    """
    m = losses["refuse 429"]
    assert m.lost == tuple(Caller(CALL).words[7:])
    assert m.handshakes == (None, 429) and m.reconnect is None
    assert len(m.errors) == 2 and "status 429" in m.errors[1]
    assert m.user_messages == (CALL[0],)


def test_stock_waits_two_backoffs_after_a_503_reconnect(losses: dict[str, Measurement]) -> None:
    """A drop, then 503 on the reconnect: 8 s without a connection, and the caller's words of those 8 s lost.

    Measured: 25 of 37 words lost, reconnected 8.06 s after the drop (4 s
    backoff, refused, 4 s more), two ErrorFrames.
    """
    m = losses["refuse 503"]
    assert set(AT_THE_DROP) <= set(m.lost) and len(m.lost) >= 20
    assert m.handshakes == (None, 503, None)
    assert m.reconnect is not None and 8.0 <= m.reconnect < 9.0
    assert len(m.errors) == 2 and "503" in m.errors[1]


def test_stock_ignores_deepgrams_error_message(losses: dict[str, Measurement]) -> None:
    """An Error message on an open socket: the words not final are lost, and nothing says so.

    Measured: 3 of 37 words lost ("For four people", heard but not final when
    the error came), no ErrorFrame, no reconnect: the stock service drops
    Error messages on the floor, and the turn is committed without them.
    """
    m = losses["error"]
    assert m.lost == AT_THE_DROP and m.dropped == AT_THE_DROP
    assert m.errors == () and m.handshakes == (None,)
    assert m.user_messages[1] == "on Friday night."
