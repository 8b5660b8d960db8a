"""Steady-state cost of ResilientSTT: CPU per audio frame, and latency from audio in to final transcript.

Each side (the bare stock ``DeepgramSTTService``, the same inside
``ResilientSTT``, and for reference the bare service followed by one
pass-through stage) runs the same caller through the same pipeline (Pipecat's
user aggregator included) against the Deepgram emulator in its own process, so
the CPU time measured is the pipeline's alone. No faults.

* CPU: the call is sent as fast as the pipeline takes it; CPU time over audio
  frames. Sides take turns within each round, in a rotating order; the ratio
  to the bare service is taken within each round.
* Calls: the same call once more per side under ``cProfile``, counting the
  Python function calls per audio frame: a deterministic figure, where the
  CPU time of a shared machine moves by tens of percent from run to run.
* Latency: the call is sent in real time (a 20 ms frame every 20 ms); the
  emulator finalizes a word when the frame after its end arrives, so each final
  transcript's latency is its arrival minus the send time of the last frame
  sent before it.

    python benchmarks/stt_overhead.py [--rounds 20] [--latency-rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import pstats
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from _common import PassThrough, median, pct, quiet
from pipecat.frames.frames import InputAudioRawFrame
from pipecat.processors.frame_processor import FrameProcessor
from pipecat.services.deepgram.stt import DeepgramSTTService

from pipecat_resilient import ResilientSTT
from pipecat_resilient.testing import DeepgramSTTEmulator
from pipecat_resilient.testing.stt_harness import Caller, STTScenario

SIDES = ("bare", "resilient", "bare+hop")
UTTERANCES = [
    "I would like to book a table for four people on Friday night around eight.",
    "We will need a high chair for our daughter and a table near the window.",
    "Could you also tell me whether you have parking close to the restaurant?",
    "Thank you very much, please send me a text message to confirm the booking.",
]
MS_PER_CHAR = 50.0


@contextlib.asynccontextmanager
async def emulator_process() -> AsyncIterator[str]:
    """Run the Deepgram emulator in a child process (this script with ``--serve``); yield its URL."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--serve",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 30)
    try:
        yield line.decode().strip()
    finally:
        process.terminate()
        await process.wait()


async def serve() -> None:
    quiet()
    async with DeepgramSTTEmulator(ms_per_char=MS_PER_CHAR) as emulator:
        print(emulator.url, flush=True)
        await asyncio.Event().wait()


def build(side: str, url: str) -> tuple[FrameProcessor, list[FrameProcessor]]:
    """The processor under test and what follows it."""

    def make() -> DeepgramSTTService:
        return DeepgramSTTService(api_key="bench", base_url=url)

    if side == "resilient":
        return ResilientSTT(make), []
    return make(), [PassThrough()] if side == "bare+hop" else []


@dataclass
class Run:
    cpu: float
    frames: int
    latencies: list[float]


async def run_call(side: str, url: str, caller: Caller, *, real_time: bool) -> Run:
    """Say the call through one side; CPU time per frame, or latencies in real time."""
    stt, after = build(side, url)
    run = STTScenario(stt, after=after)
    await run.start()
    # Warm up (connection, first-use costs) outside the measurement.
    await run.speak(Caller(["Hello."], ms_per_char=MS_PER_CHAR))
    await run.wait_until(lambda: len(run.user_messages) >= 1, 30)
    finals_before = len(run.transcripts.finals)
    sends: list[float] = []
    cpu = time.process_time()
    if real_time:
        loop = asyncio.get_running_loop()
        began = loop.time()
        for cue in caller.cues():
            delay = began + cue.at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            frame = cue.frame(caller.sample_rate)
            if isinstance(frame, InputAudioRawFrame):
                sends.append(time.monotonic())
            await run.send(frame)
    else:
        # As fast as the pipeline takes it (each utterance once the turn before ended).
        await run.speak(caller)
    await run.wait_until(lambda: len(run.user_messages) >= 1 + len(caller.utterances), 60)
    cpu = time.process_time() - cpu
    frames = sum(1 for cue in caller.cues() if cue.kind == "audio")
    latencies = []
    for final in run.transcripts.finals[finals_before:]:
        index = next((i for i in range(len(sends) - 1, -1, -1) if sends[i] <= final.at), None)
        if index is not None:
            latencies.append(final.at - sends[index])
    await run.end()
    return Run(cpu, frames, latencies)


async def main(rounds: int, latency_rounds: int) -> None:
    quiet()
    caller = Caller(UTTERANCES, ms_per_char=MS_PER_CHAR)
    per_frame: dict[str, list[float]] = {side: [] for side in SIDES}
    ratios: dict[str, list[float]] = {side: [] for side in SIDES[1:]}
    latencies: dict[str, list[float]] = {"bare": [], "resilient": []}
    async with emulator_process() as url:
        for round_ in range(rounds):
            shift = round_ % len(SIDES)
            order = SIDES[shift:] + SIDES[:shift]
            runs: dict[str, Run] = {}
            for side in order:
                gc.collect()
                runs[side] = await run_call(side, url, caller, real_time=False)
            for side, run in runs.items():
                per_frame[side].append(run.cpu / run.frames)
            for side in ratios:
                ratios[side].append(per_frame[side][-1] / per_frame["bare"][-1])
        calls: dict[str, float] = {}
        for side in SIDES:
            profile = cProfile.Profile()
            profile.enable()
            run = await run_call(side, url, caller, real_time=False)
            profile.disable()
            calls[side] = pstats.Stats(profile).total_calls / run.frames  # type: ignore[attr-defined]
        for round_ in range(latency_rounds):
            order = ("bare", "resilient") if round_ % 2 == 0 else ("resilient", "bare")
            for side in order:
                run = await run_call(side, url, caller, real_time=True)
                latencies[side].extend(run.latencies)
    frames = sum(1 for cue in caller.cues() if cue.kind == "audio")
    print(f"{rounds} rounds per side of a {caller.duration:.1f}s call ({frames} audio frames), unpaced")
    print(f"{'':30}" + "".join(f"{side:>14}" for side in SIDES))
    print(f"{'CPU per audio frame (us)':30}" + "".join(f"{median(per_frame[s]) * 1e6:>14.1f}" for s in SIDES))
    best = {side: min(values) for side, values in per_frame.items()}
    for side, values in ratios.items():
        values.sort()
        print(
            f"CPU per frame, {side} / bare: median within rounds {median(values):.3f} "
            f"(min {values[0]:.3f}, max {values[-1]:.3f}); fastest runs {best[side] / best['bare']:.3f}"
        )
    print(
        "Python function calls per audio frame: "
        + ", ".join(f"{side} {calls[side]:.0f} ({calls[side] / calls['bare']:.3f})" for side in SIDES)
    )
    count = len(latencies["bare"])
    if not count or not latencies["resilient"]:
        return
    print(f"latency from the last audio frame to its final transcript, real time, {count} finals per side")
    print(f"{'':10}{'bare':>12}{'resilient':>12}{'added':>12}")
    for label, q in (("p50", 0.5), ("p95", 0.95)):
        bare, res = pct(latencies["bare"], q) * 1000, pct(latencies["resilient"], q) * 1000
        print(f"{label:10}{bare:>10.3f}ms{res:>10.3f}ms{res - bare:>10.3f}ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--latency-rounds", type=int, default=3)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve())
    else:
        asyncio.run(main(args.rounds, args.latency_rounds))
