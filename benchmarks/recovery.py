"""Recovery time after a drop, minus the emulator's own connect and first-audio time.

Every utterance is cut by a close (1012, 1011) or an abort (1006) a few audio
chunks in. Recovery is measured from the moment the emulator carried out the
fault to the moment it sent the first audio on the replacement connection.
The emulator's own share is measured in the same run with a bare websocket
client doing what a fresh connection must: connect, open a context, send the
text, wait for the first audio. What remains is ResilientTTS's part: noticing
the drop, draining, making and setting up a fresh instance, replaying.

The bare stock service reconnects too, but never resends the text: it has no
recovery to time (its figure is the count of utterances it left unfinished).

    python benchmarks/recovery.py [--faults 60] [--first-audio-delay 0.1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from _common import SENTENCES, factory, median, pct, quiet
from pipecat.frames.frames import TTSSpeakFrame
from websockets.asyncio.client import connect

from pipecat_resilient import ResilientTTS
from pipecat_resilient.testing import ElevenLabsEmulator, Fault, Scenario


async def baseline(emulator: ElevenLabsEmulator, count: int) -> list[float]:
    """The emulator's own connect + first-audio time, with a bare websocket client."""
    path = "/v1/text-to-speech/v/multi-stream-input?model_id=m&output_format=pcm_24000&auto_mode=true"
    times = []
    for index in range(count):
        started = time.monotonic()
        async with connect(emulator.url + path, additional_headers={"xi-api-key": "k"}) as ws:
            await ws.send(json.dumps({"text": " ", "context_id": f"c{index}"}))
            await ws.send(json.dumps({"text": SENTENCES[0], "context_id": f"c{index}"}))
            while "audio" not in json.loads(await ws.recv()):
                pass
            times.append(time.monotonic() - started)
    return times


async def main(faults: int, first_audio_delay: float) -> None:
    quiet()
    kinds = [
        Fault.close(1012, after_audio_chunks=3),
        Fault.close(1011, after_audio_chunks=5),
        Fault.abort(after_audio_chunks=4),
    ]
    async with ElevenLabsEmulator(ms_per_char=2.0, first_audio_delay=first_audio_delay) as emulator:
        own = await baseline(emulator, 30)
        run = Scenario(ResilientTTS(factory(emulator.url)), spc=emulator.samples_per_char(24000))
        await run.start()
        for index in range(faults):
            emulator.arm(kinds[index % len(kinds)])
            await run.send(TTSSpeakFrame(SENTENCES[index % len(SENTENCES)]))
            await run.wait_until(lambda n=index + 1: run.listener.stopped >= n, 30)
        await run.end()
        recoveries = []
        for before, after in zip(emulator.connections, emulator.connections[1:], strict=False):
            if before.fault_at is not None and after.first_audio_at is not None:
                recoveries.append(after.first_audio_at - before.fault_at)
    ours = [r - median(own) for r in recoveries]
    print(
        f"{len(recoveries)} drops (close 1012, close 1011, abort), "
        f"emulator first-audio delay {first_audio_delay * 1000:.0f}ms"
    )
    print(f"{'':44}{'p50':>10}{'p95':>10}{'max':>10}")
    for label, values in (
        ("recovery: fault to replayed audio", recoveries),
        ("emulator's own connect + first audio", own),
        ("ResilientTTS's part (recovery - own p50)", ours),
    ):
        print(f"{label:44}" + "".join(f"{pct(values, q) * 1000:>8.1f}ms" for q in (0.5, 0.95, 1.0)))
    print("bare stock service: reconnects but never resends; every cut utterance stays unfinished")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faults", type=int, default=60)
    parser.add_argument("--first-audio-delay", type=float, default=0.1)
    args = parser.parse_args()
    asyncio.run(main(args.faults, args.first_audio_delay))
