"""Half-open detection time with learned watchdog timeouts against fixed ones, and false drops.

The ElevenLabs emulator waits a first-audio delay drawn uniformly from
0.10-0.15 s before the audio of every message (a fast provider, with jitter),
and paces its audio at 2 ms a character. Two kinds of half-open socket, in
turn, each after a fault-free utterance:

* silent: the socket stops reading and sending as the utterance's text
  arrives (the first-audio watchdog must notice);
* stalled: it stops after three audio chunks (the stall watchdog must).

Detection is timed from the moment the emulator went half-open to
``on_connection_lost``. Both sides use the default ceilings (2 s); the fixed
side has ``adaptive_timeouts=False``. Each side warms up with a few
fault-free utterances (the learned timeouts need a few answers).

Then a long fault-free run (TTSSpeakFrames and streamed LLM turns of two to
three sentences, whose later sentences wait for their own first audio inside
a turn) counts drops: with no fault injected, every drop is a false one.

    python benchmarks/halfopen.py [--faults 40] [--utterances 300] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time

from _common import SENTENCES, factory, pct, quiet
from pipecat.frames.frames import (
    Frame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TTSSpeakFrame,
)

from pipecat_resilient import ResilientTTS
from pipecat_resilient.testing import ElevenLabsEmulator, Fault, Scenario

FIRST_AUDIO_S = (0.10, 0.15)
MS_PER_CHAR = 2.0
WARM_UP = 8


class JitteryEmulator(ElevenLabsEmulator):
    """The ElevenLabs emulator with a first-audio delay drawn anew for every message."""

    def __init__(self, low: float, high: float, seed: int) -> None:
        self._low, self._high = low, high
        self._rng = random.Random(seed)
        super().__init__(ms_per_char=MS_PER_CHAR, realtime=True)

    @property  # type: ignore[override]
    def first_audio_delay(self) -> float:
        return self._rng.uniform(self._low, self._high)

    @first_audio_delay.setter
    def first_audio_delay(self, value: float) -> None:
        """Fixed by the range given at construction."""


class Side:
    """One ResilientTTS in a pipeline against its own emulator, with its drops timed."""

    def __init__(self, emulator: ElevenLabsEmulator, *, adaptive: bool) -> None:
        self.emulator = emulator
        self.tts = ResilientTTS(factory(emulator.url), adaptive_timeouts=adaptive)
        self.lost: list[float] = []
        self.tts.add_event_handler("on_connection_lost", lambda _p, _f: self.lost.append(time.monotonic()))
        self.run = Scenario(self.tts, spc=emulator.samples_per_char(24000))
        self.utterances = 0

    async def say(self, *frames: Frame) -> None:
        """Send one utterance and wait until it stopped downstream."""
        self.utterances += 1
        await self.run.send(*frames)
        await self.run.wait_until(lambda n=self.utterances: self.run.listener.stopped >= n, 30)


def utterance(rng: random.Random) -> list[Frame]:
    """A TTSSpeakFrame, or an LLM turn of two or three sentences streamed a few words at a time."""
    if rng.random() < 0.5:
        return [TTSSpeakFrame(rng.choice(SENTENCES))]
    text = " ".join(rng.sample(SENTENCES, rng.randint(2, 3)))
    words = text.split(" ")
    tokens = [" ".join(words[i : i + 3]) + " " for i in range(0, len(words), 3)]
    return [LLMFullResponseStartFrame(), *[LLMTextFrame(t) for t in tokens], LLMFullResponseEndFrame()]


async def detection(adaptive: bool, faults: int, seed: int) -> dict[str, list[float]]:
    """Seconds from going half-open to the drop being declared, per kind of half-open socket."""
    times: dict[str, list[float]] = {"silent": [], "stalled": []}
    async with JitteryEmulator(*FIRST_AUDIO_S, seed) as emulator:
        side = Side(emulator, adaptive=adaptive)
        await side.run.start()
        for index in range(WARM_UP):
            await side.say(TTSSpeakFrame(SENTENCES[index % len(SENTENCES)]))
        for index in range(faults):
            await side.say(TTSSpeakFrame(SENTENCES[index % len(SENTENCES)]))
            kind = "silent" if index % 2 == 0 else "stalled"
            if kind == "silent":
                emulator.arm(Fault.stall(after_text_messages=1))
            else:
                emulator.arm(Fault.stall(after_audio_chunks=3))
            drops = len(side.lost)
            await side.say(TTSSpeakFrame(SENTENCES[(index + 1) % len(SENTENCES)]))
            faulted = [c for c in emulator.connections if c.fault_at is not None]
            if len(side.lost) == drops + 1 and faulted:
                times[kind].append(side.lost[-1] - faulted[-1].fault_at)  # type: ignore[operator]
        await side.run.end()
    return times


async def false_drops(adaptive: bool, utterances: int, seed: int) -> tuple[int, ResilientTTS]:
    """Drops declared over a fault-free run of ``utterances``."""
    rng = random.Random(seed)
    async with JitteryEmulator(*FIRST_AUDIO_S, seed) as emulator:
        side = Side(emulator, adaptive=adaptive)
        await side.run.start()
        for _ in range(utterances):
            await side.say(*utterance(rng))
        await side.run.end()
    return len(side.lost), side.tts


def row(label: str, values: list[float]) -> str:
    if not values:
        return f"{label:34}{'-':>10}"
    figures = "".join(f"{pct(values, q) * 1000:>8.0f}ms" for q in (0.5, 0.95, 1.0))
    return f"{label:34}{figures}{len(values):>8}"


async def main(faults: int, utterances: int, seed: int) -> None:
    quiet()
    low, high = FIRST_AUDIO_S
    print(f"ElevenLabs emulator, first audio {low * 1000:.0f}-{high * 1000:.0f} ms (uniform), ceilings 2 s")
    print(f"{'half-open detection':34}{'p50':>10}{'p95':>10}{'max':>10}{'n':>8}")
    for adaptive in (True, False):
        times = await detection(adaptive, faults, seed)
        name = "learned" if adaptive else "fixed"
        print(row(f"{name}: silent (first audio)", times["silent"]))
        print(row(f"{name}: stalled (mid-utterance)", times["stalled"]))
        print(row(f"{name}: both", times["silent"] + times["stalled"]))
    for adaptive in (True, False):
        drops, tts = await false_drops(adaptive, utterances, seed)
        first_audio, stall = tts.ledger.timeouts
        name = "learned" if adaptive else "fixed"
        print(
            f"{name}: {drops} false drop(s) in {utterances} fault-free utterances; "
            f"timeouts at the end: first audio {first_audio * 1000:.0f} ms, stall {stall * 1000:.0f} ms"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faults", type=int, default=40)
    parser.add_argument("--utterances", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    asyncio.run(main(args.faults, args.utterances, args.seed))
