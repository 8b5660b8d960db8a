"""The AssemblyAI streaming (v3) emulator, spoken to by a bare client and by the stock AssemblyAISTTService.

The stock-service tests run ``AssemblyAISTTService`` (Pipecat 1.14, a
``WebsocketSTTService``) in a real pipeline (``recorder -> stt -> transcripts
-> user aggregator``) against the emulator on 127.0.0.1, and pin down what it
loses when the connection fails. If Pipecat ever changes that, these tests
fail, and we want to know.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import pytest
from loguru import logger
from pipecat.services.assemblyai.stt import AssemblyAISTTService
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK, InvalidStatus

from pipecat_resilient.testing import Fault, FaultPlan
from pipecat_resilient.testing.assemblyai import AssemblyAIEmulator
from pipecat_resilient.testing.speech import encode
from pipecat_resilient.testing.stt_harness import Caller, Measurement, STTScenario, measure

from .conftest import UNIT

# Every wait in this file; a passing test takes a fraction of it.
TIMEOUT = 30 * UNIT
API_KEY = "test-key"
SR = 16000
UNIVERSAL = "universal-streaming-english"
U3_PRO = "universal-3-6-pro"


def pcm(text: str, **kwargs: Any) -> bytes:
    return encode(text, sample_rate=SR, ms_per_char=10, **kwargs)


def silence(seconds: float) -> bytes:
    return bytes(2 * round(seconds * SR))


def ws_url(emulator: AssemblyAIEmulator, **params: object) -> str:
    query: dict[str, object] = {"sample_rate": SR, "encoding": "pcm_s16le", **params}
    return f"{emulator.ws_url}?{urlencode(query)}"


async def send_audio(ws: ClientConnection, audio: bytes, chunk: int = 1600) -> None:
    """Send ``audio`` in 50 ms messages, as Pipecat does."""
    for start in range(0, len(audio), chunk):
        await ws.send(audio[start : start + chunk])


async def receive_until(ws: ClientConnection, done: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    """Every message received until one satisfies ``done`` (included)."""
    messages: list[dict[str, Any]] = []
    async with asyncio.timeout(TIMEOUT):
        while True:
            message = json.loads(await ws.recv())
            messages.append(message)
            if done(message):
                return messages


def turns(messages: list[dict[str, Any]]) -> list[tuple[bool, bool, str]]:
    """``(end_of_turn, turn_is_formatted, transcript)`` of each Turn message."""
    return [
        (m["end_of_turn"], m["turn_is_formatted"], m["transcript"]) for m in messages if m["type"] == "Turn"
    ]


def formatted_end(message: dict[str, Any]) -> bool:
    return bool(message["type"] == "Turn" and message["end_of_turn"] and message["turn_is_formatted"])


# -- the protocol, with a bare client -----------------------------------------


async def test_partials_then_an_unformatted_and_a_formatted_end_of_turn() -> None:
    """Universal-Streaming: Begin, a partial per word, then end_of_turn twice (raw, then formatted)."""
    async with AssemblyAIEmulator() as emulator:
        url = ws_url(emulator, speech_model=UNIVERSAL, format_turns="true", max_turn_silence=160)
        async with connect(url) as ws:
            await send_audio(ws, pcm("Hello there, my friend.") + silence(0.3))
            messages = await receive_until(ws, formatted_end)
    assert messages[0]["type"] == "Begin" and messages[0]["id"]
    assert turns(messages) == [
        (False, False, "hello"),
        (False, False, "hello there my"),
        (False, False, "hello there my friend"),
        (True, False, "hello there my friend"),
        (True, True, "Hello there, my friend."),
    ]
    final = messages[-1]
    assert [(w["text"], w["start"], w["end"]) for w in final["words"]] == [
        ("Hello", 0, 50),
        ("there,", 60, 120),
        ("my", 130, 150),
        ("friend.", 160, 230),
    ]
    assert final["turn_order"] == 0 and final["utterance"] == "Hello there, my friend."
    assert emulator.stream(0).words_finalized == ["Hello", "there,", "my", "friend."]


async def test_u3_pro_ends_a_turn_with_one_formatted_message() -> None:
    """Universal-3 Pro: SpeechStarted, partials, one formatted end_of_turn; turns are numbered."""
    async with AssemblyAIEmulator() as emulator:
        async with connect(ws_url(emulator, speech_model=U3_PRO, max_turn_silence=100)) as ws:
            await send_audio(ws, silence(0.1) + pcm("Hi.") + silence(0.2) + pcm("Bye now.") + silence(0.2))
            messages = await receive_until(ws, lambda m: formatted_end(m) and m["turn_order"] == 1)
    assert [m["type"] for m in messages if m["type"] != "Turn"] == ["Begin", "SpeechStarted", "SpeechStarted"]
    assert next(m for m in messages if m["type"] == "SpeechStarted")["timestamp"] == 100
    ends = [t for t in turns(messages) if t[0]]
    assert ends == [(True, True, "Hi."), (True, True, "Bye now.")]


async def test_force_endpoint_and_terminate() -> None:
    """ForceEndpoint ends the turn at once (an empty one sends nothing); Terminate ends the session."""
    async with AssemblyAIEmulator(lag=1.0) as emulator:
        async with connect(ws_url(emulator, speech_model=U3_PRO)) as ws:
            await send_audio(ws, pcm("Table for two."))
            await ws.send(json.dumps({"type": "ForceEndpoint"}))
            ended = await receive_until(ws, formatted_end)
            await ws.send(json.dumps({"type": "ForceEndpoint"}))
            await send_audio(ws, pcm("Thanks."))
            await ws.send(json.dumps({"type": "Terminate"}))
            closing = await receive_until(ws, lambda m: m["type"] == "Termination")
            with pytest.raises(ConnectionClosedOK):
                await ws.recv()
            assert ws.close_code == 1000
    # The lag held every partial back; the endpoint flushed the turn.
    assert turns(ended) == [(True, True, "Table for two.")]
    assert turns(closing) == [(True, True, "Thanks.")]
    assert closing[-1]["audio_duration_seconds"] == pytest.approx(0.21)
    assert [m["type"] for m in emulator.connections[0].messages] == [
        "ForceEndpoint",
        "ForceEndpoint",
        "Terminate",
    ]


async def test_error_sends_an_error_message_and_closes_with_its_code() -> None:
    """An ERROR fault: AssemblyAI's Error frame, then a close with its code; the turn in flight is lost."""
    plan = FaultPlan(
        Fault.error("Session Expired: Maximum session duration exceeded", 3008, after_audio_received=2)
    )
    async with AssemblyAIEmulator(plan=plan) as emulator:
        async with connect(ws_url(emulator, speech_model=U3_PRO)) as ws:
            await send_audio(ws, pcm("Lost in flight.") + silence(0.05))
            messages = await receive_until(ws, lambda m: m["type"] == "Error")
            with pytest.raises(ConnectionClosedError):
                await receive_until(ws, lambda m: False)
            assert ws.close_code == 3008
    assert messages[-1] == {
        "type": "Error",
        "error_code": 3008,
        "error": "Session Expired: Maximum session duration exceeded",
    }
    # The error came 0.1 s in, while "flight." was being spoken: it is lost too, unheard.
    assert emulator.stream(0).words_dropped == ["Lost", "in"]
    assert emulator.words_finalized() == []


async def test_each_connection_has_its_own_stream_time_and_faults() -> None:
    """Stream time restarts at 0 on a new connection; planned closes, refusals, key and path checks apply."""
    plan = FaultPlan(Fault.abort(connection=1, after_audio_received=1), Fault.refuse(503, connection=2))
    async with AssemblyAIEmulator(plan=plan, api_key=API_KEY) as emulator:
        headers = {"Authorization": API_KEY}
        with pytest.raises(InvalidStatus) as wrong_key:
            async with connect(ws_url(emulator), additional_headers={"Authorization": "nope"}):
                pass
        assert wrong_key.value.response.status_code == 401
        async with connect(ws_url(emulator, speech_model=U3_PRO), additional_headers=headers) as ws:
            await send_audio(ws, pcm("Gone."))
            with pytest.raises(ConnectionClosedError):
                await receive_until(ws, lambda m: False)
        with pytest.raises(InvalidStatus) as refused:
            async with connect(ws_url(emulator), additional_headers=headers):
                pass
        assert refused.value.response.status_code == 503
        async with connect(ws_url(emulator, speech_model=U3_PRO), additional_headers=headers) as ws:
            await send_audio(ws, pcm("Fresh start."))
            await ws.send(json.dumps({"type": "ForceEndpoint"}))
            messages = await receive_until(ws, formatted_end)
        with pytest.raises(InvalidStatus) as wrong_path:
            async with connect(f"{emulator.url}/v2/realtime/ws", additional_headers=headers):
                pass
        assert wrong_path.value.response.status_code == 404
    assert [(w["text"], w["start"]) for w in messages[-1]["words"]] == [("Fresh", 0), ("start.", 60)]
    assert [c.refused for c in emulator.connections] == [401, None, 503, None, 404]
    assert emulator.words_finalized() == ["Fresh", "start."]


async def test_a_stream_that_starts_inside_a_word_times_its_tail_by_the_audio_it_had() -> None:
    """A connection whose audio starts in the last character of a word (a replay from a chunk holding
    the end of a word already final) transcribes the tail where its audio lies: 2 ms of ".", not a
    whole 10 ms character, so a client that drops repeats by time sees it lies before the cut."""
    tail = pcm("table.")[-64:]  # the last 2 ms of the "."
    async with AssemblyAIEmulator() as emulator:
        async with connect(ws_url(emulator, speech_model=U3_PRO, max_turn_silence=100)) as ws:
            await send_audio(ws, tail + silence(0.2) + pcm("For four.") + silence(0.2))
            messages = await receive_until(ws, lambda m: formatted_end(m) and m["turn_order"] == 1)
    first, second = (m for m in messages if formatted_end(m))
    assert [(w["text"], w["start"], w["end"]) for w in first["words"]] == [(".", 0, 2)]
    assert [(w["text"], w["start"], w["end"]) for w in second["words"]] == [
        ("For", 202, 232),
        ("four.", 242, 292),
    ]


# -- the stock service, without faults ----------------------------------------

SCRIPT = [
    "I would like to book a table.",
    "For four people on Friday night.",
    "Around eight would be perfect.",
]


def stock(emulator: AssemblyAIEmulator, model: str = U3_PRO) -> AssemblyAISTTService:
    """The stock service, pointed at ``emulator``."""
    return AssemblyAISTTService(
        api_key=API_KEY,
        api_endpoint_base_url=emulator.ws_url,
        settings=AssemblyAISTTService.Settings(model=model),
    )


@pytest.mark.parametrize("model", [U3_PRO, UNIVERSAL])
async def test_stock_service_hears_every_word_and_commits_each_turn(model: str) -> None:
    """Every word said reaches the transcripts, and each utterance becomes one user message."""
    caller = Caller(SCRIPT)
    async with AssemblyAIEmulator(api_key=API_KEY) as emulator:
        async with STTScenario(stock(emulator, model)) as run:
            await run.speak(caller)
            await run.wait_until(lambda: len(run.user_messages) == len(SCRIPT), TIMEOUT)
    assert run.final_texts == SCRIPT
    assert run.user_messages == SCRIPT
    assert run.interim_texts and run.errors == []
    assert len(emulator.connections) == 1
    record = emulator.stream(0)
    assert record.query["speech_model"] == model and record.query["format_turns"] == "true"
    assert record.words_finalized == caller.words
    messages = [m["type"] for m in emulator.connections[0].messages]
    assert messages.count("ForceEndpoint") == len(SCRIPT) and messages[-1] == "Terminate"


# -- the stock service under faults: what it loses ------------------------------

# A caller booking a table, at about four words a second (50 ms a character),
# in real time. The fault strikes 2.9 s in (the 58th 50 ms message Pipecat
# sends), in the middle of the second utterance, after "For four people".
CALL = [
    "I would like to book a table.",
    "For four people on Friday night.",
    "Around eight would be perfect.",
    "We need one high chair too.",
    "Can you confirm by text message?",
    "Thank you very much for your help.",
]
MS_PER_CHAR = 50
FAULT_MESSAGE = 58
AT_THE_DROP = ("For", "four", "people")  # the turn in flight: partials only, never ended

FAULTS = {
    "close 1011": FaultPlan(Fault.close(1011, after_audio_received=FAULT_MESSAGE)),
    "close 1000": FaultPlan(Fault.close(1000, after_audio_received=FAULT_MESSAGE)),
    "abort": FaultPlan(Fault.abort(after_audio_received=FAULT_MESSAGE)),
    "stall": FaultPlan(Fault.stall(after_audio_received=FAULT_MESSAGE)),
    "refuse 429": FaultPlan(
        Fault.close(1011, after_audio_received=FAULT_MESSAGE), Fault.refuse(429, connection=1)
    ),
    "refuse 503": FaultPlan(
        Fault.close(1011, after_audio_received=FAULT_MESSAGE), Fault.refuse(503, connection=1)
    ),
    "error": FaultPlan(Fault.error("Internal server error", 3005, after_audio_received=FAULT_MESSAGE)),
}


async def _measure(plan: FaultPlan) -> Measurement:
    """Run the call through the stock service (its defaults: Universal-3 Pro) against ``plan``."""
    caller = Caller(CALL, ms_per_char=MS_PER_CHAR)
    async with AssemblyAIEmulator(plan=plan, api_key=API_KEY, ms_per_char=MS_PER_CHAR) as emulator:
        run = STTScenario(AssemblyAISTTService(api_key=API_KEY, api_endpoint_base_url=emulator.ws_url))
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


@pytest.mark.parametrize("fault", ["close 1011", "close 1000", "abort"])
def test_stock_loses_the_turn_in_flight_at_a_drop(losses: dict[str, Measurement], fault: str) -> None:
    """A drop mid-utterance: an immediate reconnect, no ErrorFrame, and the turn in flight is gone.

    Measured, for close 1011, close 1000 and abort alike: 3 of 37 words lost
    ("For four people", sent only as partials before the drop), reconnected
    about 0.02 s after it, no error upstream; the rest of the utterance is
    committed alone ("on Friday night.").
    """
    m = losses[fault]
    assert m.lost == AT_THE_DROP and m.dropped == AT_THE_DROP
    assert m.reconnect is not None and m.reconnect < 1.0
    assert m.errors == () and m.handshakes == (None, None)
    assert m.user_messages[1] == "on Friday night."


def test_stock_never_notices_a_stalled_socket(losses: dict[str, Measurement]) -> None:
    """Stall (half-open): no error, no reconnect; every word after it is lost.

    Measured: 30 of 37 words lost -- everything after "I would like to book a
    table." -- with no ErrorFrame and no second connection in the 10.5 s the
    call went on (websockets' keepalive ping would take 20 to 40 s; sends do
    not block long enough for the 5 s send timeout).
    """
    m = losses["stall"]
    assert m.lost == tuple(Caller(CALL).words[7:])
    assert m.errors == () and m.handshakes == (None,) and m.reconnect is None
    assert m.user_messages == (CALL[0],)


@pytest.mark.parametrize("status", [429, 503])
def test_stock_buffers_through_a_refused_reconnect_but_merges_turns(
    losses: dict[str, Measurement], status: int
) -> None:
    """A drop, then a refused reconnect: 4 s backoff, audio buffered and replayed, three turns merged.

    Measured, for 429 and 503 alike: 3 of 37 words lost (the turn in flight),
    reconnected 4.03 s after the drop, two ErrorFrames ("Unable to connect to
    AssemblyAI: ... HTTP 429" and "reconnection attempt 1 failed"); the 4 s of
    audio buffered meanwhile arrive at once, after their VAD turns ended, and
    go into the context as one message: "on Friday night. Around eight would
    be perfect. We need one high chair too.".
    """
    m = losses[f"refuse {status}"]
    assert m.lost == AT_THE_DROP
    assert m.handshakes == (None, status, None)
    assert m.reconnect is not None and 4.0 <= m.reconnect < 5.0
    assert len(m.errors) == 2 and f"HTTP {status}" in m.errors[0]
    assert m.user_messages[1] == " ".join([CALL[1].split(" ", 3)[3], CALL[2], CALL[3]])


def test_stock_does_not_know_assemblyais_error_message(losses: dict[str, Measurement]) -> None:
    """An Error frame then a close: one puzzled ErrorFrame, a reconnect, the turn in flight lost.

    Measured: 3 of 37 words lost, one ErrorFrame ("Unknown error occurred:
    Unknown message type: Error": the stock service does not parse AssemblyAI's
    Error message), reconnected about 0.02 s after the close.
    """
    m = losses["error"]
    assert m.lost == AT_THE_DROP and m.dropped == AT_THE_DROP
    assert m.errors == ("Unknown error occurred: Unknown message type: Error",)
    assert m.reconnect is not None and m.reconnect < 1.0
