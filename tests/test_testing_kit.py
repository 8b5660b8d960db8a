"""The testing kit itself: the speech code, fault plans and the emulator's protocol."""

from __future__ import annotations

import base64
import json

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedError, InvalidStatus

from pipecat_resilient.testing import ElevenLabsEmulator, Fault, FaultKind, FaultPlan, SpeechDecoder, encode
from pipecat_resilient.testing.speech import samples_per_char

SPC = samples_per_char(24000, 10)


def pcm(text: str, **kwargs: object) -> bytes:
    return encode(text, sample_rate=24000, ms_per_char=10, **kwargs)  # type: ignore[arg-type]


def test_speech_code_round_trips_in_any_chunking() -> None:
    """Audio decodes back to its words, however it is cut into frames."""
    audio = pcm("Hello world, this is fine.") + pcm(" And more.")
    for size in (1, 7, 480, len(audio)):
        decoder = SpeechDecoder(SPC)
        for start in range(0, len(audio), size):
            decoder.feed(audio[start : start + size])
        assert decoder.heard() == ["Hello", "world,", "this", "is", "fine.", "And", "more."]
        assert decoder.fragments() == []


def test_cut_off_word_is_a_fragment_and_repeats_are_counted() -> None:
    """A word whose audio was cut is a fragment; doubled letters and words are told apart."""
    decoder = SpeechDecoder(SPC)
    decoder.feed(pcm("Hello wor", message_end=False, then="l"))
    decoder.feed(pcm("world all ll"))
    assert decoder.heard() == ["Hello", "world", "all", "ll"]
    assert decoder.fragments() == ["wor"]


def test_word_in_progress_is_a_fragment_until_it_ends() -> None:
    """The last word of a stream counts only once its end was heard."""
    decoder = SpeechDecoder(SPC)
    decoder.feed(pcm("one tw", message_end=False, then="o"))
    assert decoder.heard() == ["one"] and decoder.fragments() == ["tw"]
    decoder.feed(pcm("o three", after="w"))
    assert decoder.heard() == ["one", "two", "three"]


def test_word_ending_exactly_at_a_chunk_edge_is_heard() -> None:
    """A word whose last character was played is heard, whatever follows (or not)."""
    decoder = SpeechDecoder(SPC)
    decoder.feed(pcm("one two", message_end=False, then=" "))
    assert decoder.heard() == ["one", "two"]


def test_a_character_cut_short_spans_only_the_samples_it_had() -> None:
    """A stream that starts inside a word's last character (a replay from a chunk holding the end of
    a word) decodes its tail, spanning the samples it had, not a whole character; so does a word
    whose audio stops inside a character."""
    decoder = SpeechDecoder(SPC)
    decoder.feed(pcm("fine.")[-2 * 48 :] + b"\x00\x00" * 100 + pcm("Next"))
    assert [(w.text, w.complete, w.offset, w.end) for w in decoder.words] == [
        (".", True, 0, 48),
        ("Next", True, 148, 148 + 4 * SPC),
    ]
    decoder = SpeechDecoder(SPC)
    decoder.feed(pcm("Hello")[: 2 * (2 * SPC + 30)])
    assert [(w.text, w.complete, w.offset, w.end) for w in decoder.words] == [("Hel", False, 0, 2 * SPC + 30)]


def test_silence_is_skipped() -> None:
    """Zero samples (silence) between words decode to nothing."""
    decoder = SpeechDecoder(SPC)
    decoder.feed(pcm("a b") + b"\x00\x00" * 500 + pcm(" c"))
    assert decoder.heard() == ["a", "b", "c"]


def test_fault_validation() -> None:
    """A fault takes at most one trigger and a sane status."""
    with pytest.raises(ValueError, match="at most one trigger"):
        Fault(FaultKind.CLOSE, after_audio_chunks=1, after_seconds=1.0)
    with pytest.raises(ValueError, match="HTTP status"):
        Fault.refuse(200)
    with pytest.raises(ValueError, match="must not be negative"):
        Fault.close(1011, after_audio_chunks=-1)
    plan = FaultPlan(Fault.close(1011, connection=None), Fault.refuse(503, connection=2))
    assert len(plan.for_connection(0)) == 1
    assert plan.refusal(2) is not None and plan.refusal(1) is None


async def test_emulator_speaks_the_multi_stream_protocol() -> None:
    """Context init, text, close_context: audio with alignment, then isFinal."""
    async with ElevenLabsEmulator() as emulator:
        query = "model_id=m&output_format=pcm_24000&auto_mode=true"
        url = f"{emulator.url}/v1/text-to-speech/v/multi-stream-input?{query}"
        async with connect(url, additional_headers={"xi-api-key": "k"}) as ws:
            await ws.send(json.dumps({"text": " ", "context_id": "c"}))
            await ws.send(json.dumps({"text": "Hi there.", "context_id": "c"}))
            await ws.send(json.dumps({"context_id": "c", "close_context": True}))
            decoder = SpeechDecoder(SPC)
            chars = []
            while True:
                message = json.loads(await ws.recv())
                if message.get("isFinal"):
                    break
                assert message["contextId"] == "c"
                decoder.feed(base64.b64decode(message["audio"]))
                chars.extend(message["alignment"]["chars"])
                assert message["alignment"]["charStartTimesMs"][0] == 0
        assert decoder.heard() == ["Hi", "there."]
        assert "".join(chars) == "Hi there."
        assert emulator.connections[0].texts == [("c", "Hi there.")]


async def test_emulator_faults() -> None:
    """Refusals carry their status and headers; closes carry their code."""
    plan = FaultPlan(
        Fault.refuse(429, headers={"Retry-After": "3"}),
        Fault.close(1012, "restart", connection=1, after_text_messages=1),
    )
    async with ElevenLabsEmulator(plan=plan) as emulator:
        url = f"{emulator.url}/v1/text-to-speech/v/multi-stream-input?output_format=pcm_24000&auto_mode=true"
        with pytest.raises(InvalidStatus) as refused:
            async with connect(url):
                pass
        assert refused.value.response.status_code == 429
        assert refused.value.response.headers["Retry-After"] == "3"
        async with connect(url) as ws:
            await ws.send(json.dumps({"text": "Hello.", "context_id": "c"}))
            with pytest.raises(ConnectionClosedError) as closed:
                while True:
                    await ws.recv()
            assert closed.value.rcvd.code == 1012
        assert [c.refused for c in emulator.connections] == [429, None]


async def test_emulator_checks_the_api_key() -> None:
    """With an api_key set, a wrong key is refused with 401."""
    async with ElevenLabsEmulator(api_key="right") as emulator:
        with pytest.raises(InvalidStatus) as refused:
            async with connect(f"{emulator.url}/v1/x", additional_headers={"xi-api-key": "wrong"}):
                pass
        assert refused.value.response.status_code == 401


async def test_disarm_withdraws_faults_armed_while_running() -> None:
    """Faults armed with arm() and not fired yet are withdrawn; the next connection is clean."""
    async with ElevenLabsEmulator() as emulator:
        url = f"{emulator.url}/v1/text-to-speech/v/multi-stream-input?output_format=pcm_24000&auto_mode=true"
        emulator.arm(Fault.refuse(503))
        emulator.arm(Fault.close(1012, after_audio_chunks=1), on="next")
        emulator.disarm()
        async with connect(url) as ws:
            emulator.arm(Fault.abort(after_audio_chunks=1))
            emulator.disarm()
            await ws.send(json.dumps({"text": "Hello there.", "context_id": "c"}))
            await ws.send(json.dumps({"context_id": "c", "close_context": True}))
            while not json.loads(await ws.recv()).get("isFinal"):
                pass
        assert [(c.refused, c.fault) for c in emulator.connections] == [(None, None)]


async def test_contexts_are_generated_independently() -> None:
    """A new context's audio does not wait behind an interrupted context's rest (real-time pacing)."""
    async with ElevenLabsEmulator(realtime=True, ms_per_char=5) as emulator:
        url = f"{emulator.url}/v1/text-to-speech/v/multi-stream-input?output_format=pcm_24000&auto_mode=true"
        async with connect(url) as ws:
            long = "This answer goes on for a good while before it reaches its end. " * 3
            await ws.send(json.dumps({"text": long, "context_id": "a"}))
            first = json.loads(await ws.recv())
            assert first["contextId"] == "a"
            # The user barges in: the client closes "a" and starts "b".
            await ws.send(json.dumps({"context_id": "a", "close_context": True}))
            await ws.send(json.dumps({"text": "Yes?", "context_id": "b"}))
            await ws.send(json.dumps({"context_id": "b", "close_context": True}))
            order = []
            while len([m for m in order if m[1] == "final"]) < 2:
                message = json.loads(await ws.recv())
                order.append((message["contextId"], "final" if message.get("isFinal") else "audio"))
        assert order.index(("b", "final")) < order.index(("a", "final"))
