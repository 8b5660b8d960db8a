"""Shared pieces of the benchmarks: an emulator in its own process, services, a timed run.

The emulator runs in a child process (``_remote.py``) so that
this process's CPU time is the pipeline's alone, the same for both sides.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from _remote import RemoteEmulator
from loguru import logger
from pipecat.frames.frames import Frame, TTSSpeakFrame
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.elevenlabs.tts import ElevenLabsTTSService

from pipecat_resilient import ResilientTTS
from pipecat_resilient.testing import Scenario
from pipecat_resilient.testing.speech import samples_per_char

SENTENCES = [
    "Your appointment is confirmed for Tuesday at ten in the morning.",
    "The package left the warehouse and should arrive on Friday.",
    "I have moved the meeting to the afternoon and told everyone.",
    "Your balance is two hundred dollars and the next bill is due soon.",
]


def quiet() -> None:
    """Keep the services' logs out of the figures."""
    logger.remove()
    logger.add(sys.stderr, level="ERROR")


@contextlib.asynccontextmanager
async def emulator_process(*, ms_per_char: float = 1.0, first_audio_delay: float = 0.0) -> AsyncIterator[str]:
    """Run an ElevenLabs emulator in a child process (:class:`_remote.RemoteEmulator`); yield its URL."""
    async with RemoteEmulator(ms_per_char=ms_per_char, first_audio_delay=first_audio_delay) as emulator:
        yield emulator.url


def factory(url: str, **kwargs: object) -> Callable[[], ElevenLabsTTSService]:
    """A factory of stock ElevenLabs services pointed at ``url``."""

    def make() -> ElevenLabsTTSService:
        return ElevenLabsTTSService(
            api_key="bench",
            url=url,
            settings=ElevenLabsTTSService.Settings(voice="bench"),
            **kwargs,  # type: ignore[arg-type]
        )

    return make


class PassThrough(FrameProcessor):
    """A processor that only passes frames on: the cost of any one more stage in a pipeline."""

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)


def build(side: str, url: str) -> tuple[FrameProcessor, list[FrameProcessor]]:
    """The processor under test and what follows it.

    ``bare``: the stock service; ``resilient``: the same inside ResilientTTS;
    ``resilient+standby``: with a warm standby connected beside it;
    ``bare+hop``: the stock service followed by a pass-through processor.
    """
    make = factory(url)
    if side.startswith("resilient"):
        return ResilientTTS(make, standby=side == "resilient+standby"), []
    return make(), [PassThrough()] if side == "bare+hop" else []


@dataclass
class Run:
    """Figures of one timed run."""

    cpu: float
    wall: float
    audio_frames: int
    text_frames: int
    first_audio: list[float]

    @property
    def frames(self) -> int:
        return self.audio_frames + self.text_frames


async def speak(side: str, url: str, utterances: int, *, ms_per_char: float, sample_rate: int = 24000) -> Run:
    """Speak ``utterances`` TTSSpeakFrames one after the other; time CPU, wall and first audio."""
    tts, after = build(side, url)
    run = Scenario(tts, spc=samples_per_char(sample_rate, ms_per_char), sample_rate=sample_rate, after=after)
    await run.start()
    # Warm up (connection, first-use costs) outside the measurement.
    await run.send(TTSSpeakFrame(SENTENCES[0]))
    await run.wait_until(lambda: run.listener.stopped >= 1, 30)
    listener = run.listener
    audio_before = listener.audio_frames
    text_before = sum(1 for m in listener.marks if m.kind == "text")
    first_audio: list[float] = []
    cpu = time.process_time()
    wall = time.perf_counter()
    for index in range(utterances):
        frames_before = len(listener.audio_times)
        sent = time.monotonic()
        await run.send(TTSSpeakFrame(SENTENCES[index % len(SENTENCES)]))
        await run.wait_until(lambda n=index + 2: listener.stopped >= n, 30)
        first_audio.append(listener.audio_times[frames_before][0] - sent)
    cpu = time.process_time() - cpu
    wall = time.perf_counter() - wall
    text = sum(1 for m in listener.marks if m.kind == "text") - text_before
    result = Run(cpu, wall, listener.audio_frames - audio_before, text, first_audio)
    await run.end()
    return result


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def median(values: list[float]) -> float:
    return statistics.median(values)
