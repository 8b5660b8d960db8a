"""The warm standby: a drop costs no handshake, and a standby that dies or falls behind is replaced.

The stock ElevenLabs service against its emulator over real sockets; the
assertions are on what a listener heard, the context, and the handshakes the
emulator saw (when they arrived against when the fault happened).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from pipecat.frames.frames import TTSSpeakFrame, TTSUpdateSettingsFrame
from pipecat.services.elevenlabs.tts import ElevenLabsTTSService

from pipecat_resilient import ResilientTTS
from pipecat_resilient.testing import Fault, FaultPlan, Scenario

from .conftest import ELEVENLABS, NO_WAIT, SAMPLE_RATE, UNIT
from .test_tts import SECOND, SENTENCE, words


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for a condition on state outside the frame flow (the emulator's handshakes)."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


def resilient(emulator: object, **options: object) -> ResilientTTS:
    return ResilientTTS(
        ELEVENLABS.factory(emulator),
        retry=NO_WAIT,
        first_audio_timeout=3 * UNIT,
        stall_timeout=3 * UNIT,
        standby=True,
        **options,  # type: ignore[arg-type]
    )


def spoke(record: object) -> bool:
    return any(text.strip() for _, text in record.texts)  # type: ignore[attr-defined]


async def test_a_drop_is_replayed_on_the_standby_without_a_handshake() -> None:
    """The standby was connected before the fault; the replay goes to it; another standby follows."""
    async with ELEVENLABS.emulator(FaultPlan(Fault.close(1012, after_audio_chunks=4))) as emulator:
        tts = resilient(emulator)
        connected: list[object] = []

        @tts.event_handler("on_connected")
        async def on_connected(processor: object) -> None:
            connected.append(processor)

        run = Scenario(tts, spc=emulator.samples_per_char(SAMPLE_RATE))
        await run.start()
        await until(lambda: tts.standby_ready)
        await run.send(TTSSpeakFrame(SENTENCE))
        await run.wait_until(lambda: len(run.heard) >= len(words(SENTENCE)) and run.listener.stopped >= 1)
        await until(lambda: tts.standby_ready and len(emulator.connections) >= 3)
        await run.end()
        assert run.heard == words(SENTENCE)
        assert run.context_words == words(SENTENCE)
        assert run.errors == []
        first, standby, *later = emulator.connections
        assert first.fault_at is not None and standby.opened_at < first.fault_at
        assert spoke(first) and spoke(standby)
        assert tts.standbys_used == 1
        # Connected once, then again at the takeover: a standby connecting is not news.
        assert connected == [tts, tts]
        # The next standby was connected after the takeover, in the background.
        assert later and all(record.opened_at > first.fault_at for record in later)


async def test_a_standby_that_died_is_replaced_before_it_is_needed() -> None:
    """The standby's socket is cut while idle: a new one is connected, and it is the one that takes over."""
    plan = FaultPlan(Fault.abort(connection=1, after_seconds=0.05), Fault.close(1012, after_audio_chunks=4))
    async with ELEVENLABS.emulator(plan) as emulator:
        tts = resilient(emulator)
        run = Scenario(tts, spc=emulator.samples_per_char(SAMPLE_RATE))
        await run.start()
        await until(lambda: len(emulator.connections) >= 3 and tts.standby_ready)
        await run.send(TTSSpeakFrame(SENTENCE))
        await run.wait_until(lambda: len(run.heard) >= len(words(SENTENCE)) and run.listener.stopped >= 1)
        await run.end()
        assert run.heard == words(SENTENCE)
        assert run.errors == []
        first, dead, replacement, *_ = emulator.connections
        assert dead.fault is not None and not spoke(dead)
        assert spoke(replacement) and replacement.opened_at < first.fault_at
        assert tts.standbys_used == 1


async def test_a_standby_that_missed_a_voice_change_is_not_used() -> None:
    """After a voice change the standby is rebuilt with the new voice; the replay speaks in it."""
    async with ELEVENLABS.emulator() as emulator:
        tts = resilient(emulator)
        run = Scenario(tts, spc=emulator.samples_per_char(SAMPLE_RATE))
        await run.start()
        await until(lambda: tts.standby_ready)
        await run.send(TTSUpdateSettingsFrame(delta=ElevenLabsTTSService.Settings(voice="voice-b")))
        await run.send(TTSSpeakFrame(SENTENCE))
        await run.wait_until(lambda: len(run.heard) >= len(words(SENTENCE)) and run.listener.stopped >= 1)
        await until(
            lambda: (
                tts.standby_ready
                and ELEVENLABS.voice(emulator.connections[-1]) == "voice-b"
                and len(emulator.connections) >= 3
            )
        )
        emulator.arm(Fault.close(1012, after_audio_chunks=4), on="open")
        await run.send(TTSSpeakFrame(SECOND))
        await run.wait_until(
            lambda: len(run.heard) >= len(words(SENTENCE, SECOND)) and run.listener.stopped >= 2
        )
        await run.end()
        assert run.heard == words(SENTENCE, SECOND)
        assert run.context_words == words(SENTENCE, SECOND)
        assert run.errors == []
        speakers = [record for record in emulator.connections if spoke(record)]
        assert all(ELEVENLABS.voice(record) == "voice-b" for record in speakers[1:])
        assert tts.standbys_used == 1
