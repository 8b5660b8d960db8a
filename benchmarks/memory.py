"""Memory over a long session: ResilientTTS's bookkeeping must follow what is in flight, not the session.

Speaks an hour of speech (at the emulator's speech rate, sent as fast as
possible) through the bare stock service and through ResilientTTS, with a
lean sink that keeps nothing. At checkpoints it records the process's
resident memory and, with tracemalloc, the memory allocated from
pipecat_resilient's own modules, and the ledger's journal length.

    python benchmarks/memory.py [--minutes 60] [--checkpoints 6]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import resource
import tracemalloc

from _common import SENTENCES, emulator_process, factory, quiet
from pipecat.frames.frames import EndFrame, Frame, TTSSpeakFrame, TTSStoppedFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from pipecat_resilient import ResilientTTS
from pipecat_resilient.testing.harness import start_worker

MS_PER_CHAR = 10.0


class Sink(FrameProcessor):
    """Counts stopped utterances and keeps nothing."""

    def __init__(self) -> None:
        super().__init__(name="Sink")
        self.stopped = 0
        self.changed = asyncio.Event()

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSStoppedFrame):
            self.stopped += 1
            self.changed.set()
        await self.push_frame(frame, direction)


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def ours_kb() -> float:
    snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, "*pipecat_resilient*")])
    return sum(stat.size for stat in snapshot.statistics("filename")) / 1024


async def session(
    side: str, url: str, minutes: float, checkpoints: int
) -> list[tuple[float, float, float, int]]:
    make = factory(url)
    tts = make() if side == "bare" else ResilientTTS(make)
    sink = Sink()
    worker, task = await start_worker(Pipeline([tts, sink]), timeout=30.0)
    chars_per_checkpoint = minutes * 60_000 / MS_PER_CHAR / checkpoints
    rows = []
    spoken = 0
    chars = 0.0
    for checkpoint in range(checkpoints + 1):
        if checkpoint:
            while chars < chars_per_checkpoint * checkpoint:
                text = SENTENCES[spoken % len(SENTENCES)]
                await worker.queue_frame(TTSSpeakFrame(text))
                spoken += 1
                chars += len(text)
                while sink.stopped < spoken:
                    sink.changed.clear()
                    await sink.changed.wait()
        gc.collect()
        in_flight = tts.ledger.in_flight if isinstance(tts, ResilientTTS) else 0
        rows.append((chars * MS_PER_CHAR / 60_000, rss_mb(), ours_kb(), in_flight))
    await worker.queue_frame(EndFrame())
    await task
    return rows


async def main(minutes: float, checkpoints: int) -> None:
    quiet()
    tracemalloc.start()
    async with emulator_process(ms_per_char=MS_PER_CHAR) as url:
        results = {side: await session(side, url, minutes, checkpoints) for side in ("bare", "resilient")}
    print(
        f"{minutes:g} minutes of speech per side ({MS_PER_CHAR:g} ms per character), sent as fast as possible"
    )
    print(
        f"{'speech':>8}  {'bare RSS':>10}  {'resilient RSS':>14}  "
        f"{'pipecat_resilient allocations':>30}  {'ledger pieces':>14}"
    )
    for (minute, bare_rss, _, _), (_, res_rss, ours, pieces) in zip(
        results["bare"], results["resilient"], strict=True
    ):
        print(f"{minute:>6.1f}m  {bare_rss:>8.1f}MB  {res_rss:>12.1f}MB  {ours:>28.1f}kB  {pieces:>14}")
    first, last = results["resilient"][1], results["resilient"][-1]
    bare_first, bare_last = results["bare"][1], results["bare"][-1]
    print(
        f"growth after the first checkpoint: bare {bare_last[1] - bare_first[1]:+.1f}MB, "
        f"resilient {last[1] - first[1]:+.1f}MB; pipecat_resilient allocations {last[2] - first[2]:+.1f}kB"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--checkpoints", type=int, default=6)
    args = parser.parse_args()
    asyncio.run(main(args.minutes, args.checkpoints))
