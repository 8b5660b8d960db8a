"""ResilientTTS with learned watchdog timeouts, against each provider's emulator.

The emulators answer in about 100 ms (``FIRST_AUDIO_S``); the fixed timeouts
(the ceilings) are 2 s. Once a few answers were measured, a half-open socket
must be caught in a fraction of the ceiling, and a slower answer, or a fresh
connection's first one, must not be taken for a dead socket.
"""

from __future__ import annotations

import time

import pytest
from pipecat.frames.frames import TTSSpeakFrame

from pipecat_resilient import ResilientTTS
from pipecat_resilient.failures import Failure
from pipecat_resilient.testing import ElevenLabsEmulator, Fault, Scenario

from .conftest import ELEVENLABS, SAMPLE_RATE, UNIT, Provider, alignment

FIRST_AUDIO_S = UNIT
CEILING = 20 * UNIT
# Enough answers for the learned timeouts to apply (MIN_SAMPLES, and one more).
WARM_UP = 6
SENTENCES = [
    "Your appointment is confirmed for Tuesday at ten.",
    "The package left the warehouse this morning.",
    "I have moved the meeting to the afternoon.",
]


class Session:
    """A ResilientTTS in a pipeline, one utterance at a time, its drops recorded with their times."""

    def __init__(self, emulator: object, tts: ResilientTTS) -> None:
        self.emulator = emulator
        self.tts = tts
        self.run = Scenario(tts, spc=emulator.samples_per_char(SAMPLE_RATE))  # type: ignore[attr-defined]
        self.lost: list[tuple[float, Failure]] = []
        self.recovered = 0
        self.expected: list[str] = []
        tts.add_event_handler("on_connection_lost", lambda _, f: self.lost.append((time.monotonic(), f)))
        tts.add_event_handler("on_connection_recovered", lambda *_: self._recovered())

    def _recovered(self) -> None:
        self.recovered += 1

    async def say(self, text: str) -> None:
        """Speak one sentence and wait until it has stopped downstream."""
        self.expected += text.split()
        count = len(self.expected)
        utterances = self.run.listener.started + 1
        await self.run.send(TTSSpeakFrame(text))
        await self.run.wait_until(
            lambda: len(self.run.heard) >= count and self.run.listener.stopped >= utterances, 100 * UNIT
        )

    def detection(self) -> float:
        """Seconds from the emulator going half-open to the drop being declared (the last drop)."""
        faulted = [c for c in self.emulator.connections if c.fault_at is not None]  # type: ignore[attr-defined]
        return self.lost[-1][0] - faulted[-1].fault_at

    def assert_honest(self, provider: Provider = ELEVENLABS) -> None:
        """Every word heard (once, with word timings), the context as meant, no error."""
        missing, repeated = alignment(self.run.heard, self.expected)
        assert missing == 0, f"lost {missing} word(s): heard {self.run.heard}"
        if provider.timings:
            assert repeated == 0
        assert self.run.context_words == self.expected
        assert self.run.errors == []


@pytest.mark.parametrize("kind", ["silent", "stalled"])
async def test_a_half_open_socket_on_a_fast_provider_is_caught_well_under_the_ceiling(
    provider: Provider, kind: str
) -> None:
    """Answers in 100 ms learned: a socket gone quiet is declared dead in a fraction of the 2 s ceiling."""
    async with provider.emulator(first_audio_delay=FIRST_AUDIO_S) as emulator:
        tts = provider.resilient(emulator, first_audio_timeout=CEILING, stall_timeout=CEILING)
        session = Session(emulator, tts)
        await session.run.start()
        for index in range(WARM_UP):
            await session.say(SENTENCES[index % len(SENTENCES)])
        first_audio, stall = tts.ledger.timeouts
        assert first_audio < CEILING / 2 and stall < CEILING / 2
        if kind == "silent":
            emulator.arm(Fault.stall(after_text_messages=1))  # takes the text, never answers
        else:
            emulator.arm(Fault.stall(after_audio_chunks=2))  # goes quiet mid-sentence
        await session.say(SENTENCES[0])
        await session.run.end()
        # The drop of the faulted connection, caught by the learned timeout. (On
        # a loaded machine the replay's connection may also miss the learned
        # bound of a third of a second and be replaced: a second recovery, with
        # nothing lost or repeated, which assert_honest checks.)
        (lost_at, failure) = session.lost[0]
        assert "learned" in failure.description
        # About the learned timeout (a third of a second); the fixed one would take 2 s.
        faulted = [c for c in emulator.connections if c.fault_at is not None]
        assert len(faulted) == 1
        assert lost_at - faulted[0].fault_at < CEILING / 2
        assert session.recovered == len(session.lost)
        session.assert_honest(provider)


async def test_fixed_timeouts_when_adaptive_timeouts_is_off() -> None:
    """adaptive_timeouts=False: the same fast provider's half-open socket takes the whole fixed timeout."""
    ceiling = 6 * UNIT
    async with ElevenLabsEmulator(first_audio_delay=FIRST_AUDIO_S) as emulator:
        tts = ELEVENLABS.resilient(
            emulator, first_audio_timeout=ceiling, stall_timeout=ceiling, adaptive_timeouts=False
        )
        session = Session(emulator, tts)
        await session.run.start()
        for index in range(WARM_UP):
            await session.say(SENTENCES[index % len(SENTENCES)])
        assert tts.ledger.timeouts == (ceiling, ceiling)
        emulator.arm(Fault.stall(after_audio_chunks=2))
        await session.say(SENTENCES[0])
        await session.run.end()
        [(_, failure)] = session.lost
        assert failure.description == "audio stalled for more than 0.6s"
        assert session.detection() >= ceiling
        session.assert_honest()


async def test_a_provider_that_slows_down_is_not_declared_dead() -> None:
    """First audio creeping from 0.1 s to 0.6 s (ceiling 2 s): every answer is waited for, no drop."""
    async with ElevenLabsEmulator(first_audio_delay=FIRST_AUDIO_S) as emulator:
        tts = ELEVENLABS.resilient(emulator, first_audio_timeout=CEILING, stall_timeout=CEILING)
        session = Session(emulator, tts)
        await session.run.start()
        for index in range(WARM_UP):
            await session.say(SENTENCES[index % len(SENTENCES)])
        for step in range(1, 6):
            emulator.first_audio_delay = FIRST_AUDIO_S + step * UNIT
            await session.say(SENTENCES[step % len(SENTENCES)])
        await session.say(SENTENCES[0])
        await session.run.end()
        assert session.lost == []
        assert len(emulator.connections) == 1
        assert tts.ledger.timeouts[0] > 6 * UNIT
        session.assert_honest()


async def test_a_provider_that_suddenly_takes_six_times_longer_costs_one_recovery_at_most() -> None:
    """First audio 0.1 s, then 0.6 s from one sentence to the next (ceiling 2 s).

    No timeout can both catch a silent socket of a 0.1 s provider in well
    under 0.6 s and wait 0.6 s for it: the first slow answer may be taken for
    a dead socket. Nothing is lost or repeated, the fresh connection's first
    answer is timed against the ceiling and measured, and from then on the
    provider's new pace is waited for.
    """
    async with ElevenLabsEmulator(first_audio_delay=FIRST_AUDIO_S) as emulator:
        tts = ELEVENLABS.resilient(emulator, first_audio_timeout=CEILING, stall_timeout=CEILING)
        session = Session(emulator, tts)
        await session.run.start()
        for index in range(WARM_UP):
            await session.say(SENTENCES[index % len(SENTENCES)])
        emulator.first_audio_delay = 6 * UNIT
        for index in range(5):
            await session.say(SENTENCES[index % len(SENTENCES)])
        await session.run.end()
        assert len(session.lost) <= 1
        assert session.recovered == len(session.lost)
        session.assert_honest()


async def test_a_slow_first_answer_after_a_recovery_is_not_a_false_drop() -> None:
    """The fresh connection after a drop answers in 1 s (warming up): waited for, not dropped again."""
    async with ElevenLabsEmulator(first_audio_delay=FIRST_AUDIO_S) as emulator:
        tts = ELEVENLABS.resilient(emulator, first_audio_timeout=CEILING, stall_timeout=CEILING)
        session = Session(emulator, tts)
        await session.run.start()
        for index in range(WARM_UP):
            await session.say(SENTENCES[index % len(SENTENCES)])
        emulator.arm(Fault.close(1012, after_audio_chunks=2))
        emulator.arm(Fault.delay_first_audio(10 * UNIT), on="next")
        await session.say(SENTENCES[0])
        await session.say(SENTENCES[1])
        await session.run.end()
        [(_, failure)] = session.lost
        assert failure.code == 1012
        session.assert_honest()


async def test_min_timeout_is_validated_against_the_ceilings() -> None:
    """A floor above a ceiling, or a flag that is not a bool, is refused at construction."""
    async with ElevenLabsEmulator() as emulator:
        with pytest.raises(ValueError, match="min_timeout .* must not be longer than first_audio_timeout"):
            ELEVENLABS.resilient(emulator, first_audio_timeout=1.0, stall_timeout=2.0, min_timeout=1.5)
        with pytest.raises(TypeError, match="adaptive_timeouts must be True or False"):
            ELEVENLABS.resilient(emulator, adaptive_timeouts="yes")
        tts = ELEVENLABS.resilient(emulator, first_audio_timeout=1.0, stall_timeout=1.0, min_timeout=0.5)
        assert tts.ledger.min_timeout == 0.5
