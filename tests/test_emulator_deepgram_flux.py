"""The Deepgram Flux emulator, spoken to by a bare client and by the stock DeepgramFluxSTTService.

The stock-service tests run ``DeepgramFluxSTTService`` (Pipecat 1.14, a
``WebsocketService``) in a real pipeline against the emulator on 127.0.0.1,
with Flux owning the turns, and pin down what it loses when the connection
closes mid-turn. If Pipecat ever changes that, these tests fail, and we want
to know.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

from pipecat.services.deepgram.flux.stt import DeepgramFluxSTTService
from websockets.asyncio.client import ClientConnection, connect

from pipecat_resilient.testing import DeepgramFluxEmulator, Fault, FaultPlan
from pipecat_resilient.testing.speech import encode
from pipecat_resilient.testing.stt_harness import Caller, Measurement, STTScenario, measure

from .conftest import UNIT

TIMEOUT = 30 * UNIT
API_KEY = "test-key"
SR = 16000


def pcm(text: str) -> bytes:
    return encode(text, sample_rate=SR, ms_per_char=10)


def silence(seconds: float) -> bytes:
    return bytes(2 * round(seconds * SR))


async def send_audio(ws: ClientConnection, audio: bytes, chunk: int = 640) -> None:
    """Send ``audio`` in 20 ms messages."""
    for start in range(0, len(audio), chunk):
        await ws.send(audio[start : start + chunk])


async def receive_until(ws: ClientConnection, done: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    async with asyncio.timeout(TIMEOUT):
        while True:
            message = json.loads(await ws.recv())
            messages.append(message)
            if done(message):
                return messages


def end_of_turn(message: dict[str, Any]) -> bool:
    return message.get("event") == "EndOfTurn"


async def test_a_turn_starts_updates_and_ends_after_silence() -> None:
    """StartOfTurn, an Update per word with the turn so far, then EndOfTurn with the whole turn."""
    async with DeepgramFluxEmulator(api_key=API_KEY) as emulator:
        query = urlencode({"model": "flux-general-en", "sample_rate": SR, "encoding": "linear16"})
        headers = {"Authorization": f"Token {API_KEY}"}
        async with connect(f"{emulator.ws_url}?{query}", additional_headers=headers) as ws:
            connected = json.loads(await ws.recv())
            assert connected["type"] == "Connected" and connected["request_id"]
            await send_audio(ws, silence(0.1) + pcm("Hello there, friend.") + silence(0.4))
            messages = await receive_until(ws, end_of_turn)
            events = [(m["event"], m["transcript"]) for m in messages]
            assert events == [
                ("StartOfTurn", ""),
                ("Update", "Hello"),
                ("Update", "Hello there,"),
                ("Update", "Hello there, friend."),
                ("EndOfTurn", "Hello there, friend."),
            ]
            end = messages[-1]
            assert end["turn_index"] == 0 and end["end_of_turn_confidence"] > 0.7
            assert [w["word"] for w in end["words"]] == ["Hello", "there,", "friend."]
            assert end["audio_window_start"] == 0.1
            # After the turn's speech (0.1 + 0.2 s) and 300 ms of silence.
            assert 0.59 <= end["audio_window_end"] <= 0.65
            # A second turn has the next index; CloseStream ends it and closes with 1000.
            await ws.send(json.dumps({"type": "Configure", "thresholds": {"eot_threshold": 0.8}}))
            assert json.loads(await ws.recv())["type"] == "ConfigureSuccess"
            await send_audio(ws, pcm("Bye"))
            await ws.send(json.dumps({"type": "CloseStream"}))
            messages = await receive_until(ws, end_of_turn)
            assert messages[-1]["transcript"] == "Bye" and messages[-1]["turn_index"] == 1
            await ws.wait_closed()
            assert ws.close_code == 1000
    assert emulator.words_finalized() == ["Hello", "there,", "friend.", "Bye"]


async def test_a_wrong_key_or_path_is_refused() -> None:
    async with DeepgramFluxEmulator(api_key=API_KEY) as emulator:
        for url, key in ((emulator.ws_url, "nope"), (f"{emulator.url}/v1/listen", API_KEY)):
            try:
                async with connect(url, additional_headers={"Authorization": f"Token {key}"}):
                    raise AssertionError("accepted")
            except Exception as exc:  # InvalidStatus
                assert "401" in str(exc) or "404" in str(exc)


# -- the stock service ---------------------------------------------------------

CALL = [
    "I would like to book a table.",
    "For four people on Friday night.",
    "Around eight would be perfect.",
]
MS_PER_CHAR = 50


def flux_caller() -> Caller:
    return Caller(CALL, ms_per_char=MS_PER_CHAR, pause=1.6)


def mid_turn(caller: Caller) -> int:
    """The 20 ms audio message 0.1 s into "people" (after "For four"), in the second turn."""
    people = next(w for w in caller.said if w.text == "people" and w.utterance == 1)
    return math.floor((people.start + 0.1) / 0.02) + 1


async def _run(plan: FaultPlan) -> tuple[Measurement, list[str], DeepgramFluxEmulator]:
    caller = flux_caller()
    async with DeepgramFluxEmulator(plan=plan, api_key=API_KEY, ms_per_char=MS_PER_CHAR) as emulator:
        run = STTScenario(
            DeepgramFluxSTTService(api_key=API_KEY, url=emulator.ws_url), user_speech_timeout=0.6
        )
        await run.start()
        try:
            await run.speak(caller, pace=1.0, turn_timeout=TIMEOUT)
            await run.settle(
                lambda: len(run.user_messages) >= len(CALL) and not run.lost(caller),
                idle=3 * UNIT,
                limit=TIMEOUT,
            )
            measured = measure(run, caller, emulator)
            finals = run.final_texts
            await run.end()
        finally:
            await run.cancel()
    return measured, finals, emulator


async def test_stock_service_hears_every_word_with_flux_owning_the_turns() -> None:
    """Each utterance is one Flux turn and one user message (the service recommends Flux's turns)."""
    m, finals, emulator = await _run(FaultPlan())
    assert finals == CALL
    assert m.user_messages == tuple(CALL) and m.lost == () and m.extra == () and m.errors == ()
    assert len(emulator.connections) == 1
    assert emulator.stream(0).query["model"] == "flux-general-en"
    assert [m["type"] for m in emulator.connections[0].messages] == ["CloseStream"]


async def test_stock_service_splits_and_cuts_the_turn_in_flight_at_a_1011() -> None:
    """A 1011 after "For four" and into "people": the stock service ends the cut turn with "For four"
    (its last Update, unfinalized), reconnects at once, and the rest of the turn is a new Flux turn
    starting mid-word: "people" is lost and its tail heard as "ople". The aggregator joins the two
    halves into one user message that is not what was said.
    """
    m, finals, emulator = await _run(
        FaultPlan(Fault.close(1011, after_audio_received=mid_turn(flux_caller())))
    )
    assert finals == [CALL[0], "For four", "ople on Friday night.", CALL[2]]
    assert m.lost == ("people",) and m.extra == ("ople",)
    assert m.dropped == ("For", "four")  # never ended by Flux on the dead connection
    assert m.user_messages == (CALL[0], "For four ople on Friday night.", CALL[2])
    assert len(emulator.streams) == 2 and m.errors == ()
